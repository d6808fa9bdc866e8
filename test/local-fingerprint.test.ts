/**
 * The in-process dedupe fingerprint (`localFingerprint`, session 6): a payload's JSON text when
 * at most `LOCAL_FP_MAX_CHARS`, else ONE SHA-256 of the text `JSON.stringify` made (no second
 * walk of the payload). A payload too deep for `JSON.stringify` at the stack left where it is
 * called gets the same digest from an explicit-stack walk (`jsonDigest`) that hashes exactly
 * `JSON.stringify`'s text, so the same payload gets the same fingerprint whatever the stack.
 * The exactly-once rules it serves (PROTOCOL §3 rules 3 and 4) are asserted on a real
 * reference server over a real `ws` socket: a reused id with another long payload is refused
 * `id_reused`; value-equal variants of a payload (whitespace, `\u` escapes) on either side of
 * the 256-character bound are the same request; a retry is answered from memory; a payload
 * too deep to stringify is deduped too.
 * fast-check properties with bounded runs; the seed is printed (SEED=… replays).
 */
import { createHash } from 'node:crypto';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import type { SynEnvelope } from '../src/protocol/index.js';
import { Dedupe, jsonDigest, LOCAL_FP_MAX_CHARS, localFingerprint } from '../src/server/dedupe.js';
import { harness, is } from './helpers/raw.js';

const SEED = Number(process.env.SEED ?? Date.now() % 2 ** 31);
console.log(`[local-fingerprint] seed ${SEED} (SEED=${SEED} replays)`);

const sha = (text: string) => createHash('sha256').update(text).digest('base64url');

/** Arrays nested `depth` deep around `inner` (built by JSON.parse, as the server gets them). */
const nested = (depth: number, inner = '') => JSON.parse(`${'['.repeat(depth)}${inner}${']'.repeat(depth)}`);

/** Run `f` under `frames` extra stack frames (so less stack is left for it). */
function underStack<T>(frames: number, f: () => T): T {
  const go = (n: number): T => {
    if (n === 0) return f();
    const r = go(n - 1);
    return r; // not a tail call: each frame stays on the stack
  };
  return go(frames);
}

/** Strings of any UTF-16 code units: lone surrogates, pairs, controls, quotes, backslashes. */
const anyString = fc.oneof(
  fc.string({ unit: 'binary', maxLength: 12 }),
  fc.string({ unit: fc.integer({ min: 0, max: 0xffff }).map((c) => String.fromCharCode(c)), maxLength: 12 }),
  fc.constantFrom(
    '__proto__',
    'constructor',
    'toJSON',
    '',
    '"',
    '\\',
    '\u2028',
    '\ud800',
    '\udfff',
    '\ud83d\ude00',
  ),
);
const anyKey = fc.oneof(anyString, fc.constantFrom('__proto__', '0', '1', '10', '4294967295', '-1', 'a'));
const anyNumber = fc.oneof(
  fc.double(),
  fc.constantFrom(-0, 0, Number.NaN, Number.POSITIVE_INFINITY, -1e-320, 1e21, 1.7976931348623157e308),
  fc.integer(),
);

/** JSON values plus what JSON.stringify leaves out or writes as null (undefined, functions). */
const { value } = fc.letrec<{ value: unknown; array: unknown[]; object: Record<string, unknown> }>((tie) => ({
  value: fc.oneof(
    { depthSize: 'small', withCrossShrink: true },
    anyNumber,
    anyString,
    fc.boolean(),
    fc.constant(null),
    fc.constant(undefined),
    fc.constant(() => 1),
    tie('array'),
    tie('object'),
  ),
  array: fc.array(tie('value'), { maxLength: 5 }),
  // Object.fromEntries defines own properties, so `__proto__` is an own key, as JSON.parse makes it.
  object: fc
    .array(fc.tuple(anyKey, tie('value')), { maxLength: 5 })
    .map((entries) => Object.fromEntries(entries) as Record<string, unknown>),
}));

describe('jsonDigest', () => {
  it('is the SHA-256 of exactly the text JSON.stringify makes, for any value (property)', () => {
    fc.assert(
      fc.property(value, (v) => {
        const text = JSON.stringify(v);
        if (text === undefined) return; // not a JSON value at the top (no payload is)
        expect(jsonDigest(v)).toBe(sha(text));
      }),
      { seed: SEED, numRuns: 1000 },
    );
  });

  it('writes __proto__ keys, -0, lone surrogates and nested arrays as JSON.stringify does', () => {
    const v = JSON.parse('[{"__proto__":{"a":-0}},"\\ud800x\\udfff",[[[]],[1,[2]]],{"b":[null,-0.0]}]');
    expect(Object.hasOwn(v[0], '__proto__')).toBe(true);
    expect(jsonDigest(v)).toBe(sha(JSON.stringify(v)));
    expect(jsonDigest([-0])).toBe(sha('[0]'));
    expect(jsonDigest(['\ud800'])).toBe(sha('["\\ud800"]'));
    expect(jsonDigest([{ a: undefined, b: 1 }, undefined])).toBe(sha('[{"b":1},null]'));
  });

  it('regression (shrunk counterexample, seed 787183361): a member whose value has toJSON is written as its toJSON result', () => {
    const v = [
      { '': { toJSON: () => 1 } },
      { a: { toJSON: (key: string) => (key === 'a' ? undefined : 2) } },
    ];
    expect(JSON.stringify(v)).toBe('[{"":1},{}]');
    expect(jsonDigest(v)).toBe(sha('[{"":1},{}]'));
  });

  it('hashes a text spanning several chunks and a payload deeper than the stack', () => {
    const big = Array.from({ length: 20_000 }, (_, i) => ({ i, s: 'é\ud83d\ude00'.repeat(i % 7) }));
    const text = JSON.stringify(big);
    expect(text.length).toBeGreaterThan(3 * 64 * 1024);
    expect(jsonDigest(big)).toBe(sha(text));
    const deepText = `[${'['.repeat(200_000)}1${']'.repeat(200_000)}]`;
    expect(jsonDigest(JSON.parse(deepText))).toBe(sha(deepText));
  });
});

describe('localFingerprint', () => {
  it('is the JSON text up to LOCAL_FP_MAX_CHARS and the SHA-256 of that text beyond (property)', () => {
    fc.assert(
      fc.property(fc.array(fc.jsonValue({ maxDepth: 3 }), { minLength: 1, maxLength: 8 }), (a) => {
        const x = JSON.parse(JSON.stringify(a)) as unknown[];
        const text = JSON.stringify(x);
        expect(localFingerprint(x)).toBe(text.length <= LOCAL_FP_MAX_CHARS ? text : sha(text));
      }),
      { seed: SEED, numRuns: 300 },
    );
  });

  it('gives a payload too deep for JSON.stringify the same fingerprint whatever the stack left (deep call or shallow, twice)', () => {
    // The deepest nesting JSON.stringify handles here, found by bisection…
    let ok = 1;
    let bad = 1 << 20;
    while (bad - ok > 1) {
      const mid = (ok + bad) >> 1;
      try {
        JSON.stringify(nested(mid));
        ok = mid;
      } catch {
        bad = mid;
      }
    }
    const payload = [nested(ok - 10)];
    const text = JSON.stringify(payload);
    // …so that with less stack left it throws: the walk then makes the same digest.
    expect(() => underStack(2000, () => JSON.stringify(payload))).toThrow(RangeError);
    const shallow = localFingerprint(payload);
    const deep = underStack(2000, () => localFingerprint(payload));
    expect(shallow).toBe(sha(text));
    expect(deep).toBe(shallow);
    expect(underStack(2000, () => localFingerprint(payload))).toBe(shallow);

    // In the dedupe memory: remembered from a deep call, the retry from a shallow one is the
    // same request (answered from memory), a deeper payload under the same id is not.
    const dedupe = new Dedupe({
      windowMs: 60_000,
      maxEntries: 100,
      maxBytes: 1_000_000,
      maxResponseBytes: 10_000,
      maxQueuedPerClient: 4,
      store: undefined,
      onError: () => {},
    });
    const syn = (p: unknown[]): SynEnvelope => ({ id: 'd1', type: 'SYN', payload: p });
    let runs = 0;
    const first = underStack(2000, () =>
      dedupe.run('o', 'c', syn(payload), () => {
        runs++;
        return { id: 'd1', type: 'SYN', payload: ['first'] };
      }),
    );
    expect(first).toEqual({ id: 'd1', type: 'SYN', payload: ['first'] });
    const again = dedupe.run('o', 'c', syn(JSON.parse(text)), () => {
      runs++;
      return { id: 'd1', type: 'SYN', payload: ['again'] };
    });
    expect(again).toEqual(first);
    const other = dedupe.run('o', 'c', syn([nested(ok - 9)]), () => {
      runs++;
      return { id: 'd1', type: 'SYN', payload: ['other'] };
    });
    expect(other).toMatchObject({ id: 'd1', type: 'NAK', error: { code: 'id_reused' } });
    expect(runs).toBe(1);
  });
});

describe('dedupe on a real server (localFingerprint)', () => {
  const h = harness();

  /** A server counting the operations applied, answering `{ n }` per operation (n: the run). */
  async function counting() {
    let runs = 0;
    const server = await h.start({
      onSync: (ops) => {
        runs++;
        return ops.map(() => ({ n: runs }));
      },
    });
    return { server, runs: () => runs };
  }

  it('refuses a reused id with another payload over 256 characters id_reused, and answers a retry from memory', async () => {
    const { server, runs } = await counting();
    const sock = await h.socket(server);
    const pad = 'p'.repeat(2 * LOCAL_FP_MAX_CHARS);
    const frame = (op: string) => JSON.stringify({ id: 'L1', type: 'SYN', payload: [{ op, pad }] });
    sock.send(frame('one'));
    const first = await sock.next(is.reply('L1'));
    expect(first).toEqual({ id: 'L1', type: 'SYN', payload: [{ n: 1 }] });
    sock.send(frame('two'));
    expect(await sock.next(is.reply('L1'))).toMatchObject({ type: 'NAK', error: { code: 'id_reused' } });
    // Another payload differing only past the 256th character is another request too.
    sock.send(JSON.stringify({ id: 'L1', type: 'SYN', payload: [{ op: 'one', pad: `${pad}q` }] }));
    expect(await sock.next(is.reply('L1'))).toMatchObject({ type: 'NAK', error: { code: 'id_reused' } });
    sock.send(frame('one'));
    expect(await sock.next(is.reply('L1'))).toEqual(first);
    expect(runs()).toBe(1);
  });

  for (const [name, padLength] of [
    ['whose JSON is under 256 characters', 100],
    ['whose JSON is over 256 characters', 400],
  ] as const) {
    it(`dedupes value-equal texts of a payload ${name} (whitespace, \\u escapes, the same key order), whatever side of 256 they fall`, async () => {
      const { server, runs } = await counting();
      const sock = await h.socket(server);
      const pad = 'a'.repeat(padLength);
      const canonical = JSON.stringify([{ op: 'é', pad, k: [1, 2.5, -0] }]);
      const variants = [
        `{"id":"V1","type":"SYN","payload":${canonical}}`,
        // Whitespace everywhere JSON allows it (the text grows past 256 for the short payload).
        `{ "id" : "V1" , "type" : "SYN" , "payload" : [ { "op" : "é" ,\n "pad" : "${pad}" , "k" : [ 1 , 2.50 , -0 ] } ${' '.repeat(300)}] }`,
        // Every character of the pad and key escaped as \u: longer text, the same value.
        `{"id":"V1","type":"SYN","payload":[{"\\u006fp":"\\u00e9","pad":"${'\\u0061'.repeat(padLength)}","k":[1,25e-1,0]}]}`,
      ];
      expect(variants[1]!.length).toBeGreaterThan(LOCAL_FP_MAX_CHARS);
      const replies = [];
      for (const v of variants) {
        sock.send(v);
        replies.push(await sock.next(is.reply('V1')));
      }
      expect(replies).toEqual(variants.map(() => ({ id: 'V1', type: 'SYN', payload: [{ n: 1 }] })));
      expect(runs()).toBe(1);
    });
  }

  it('dedupes a payload too deep for JSON.stringify: the retry is answered from memory, a deeper one is id_reused', async () => {
    const { server, runs } = await counting();
    const sock = await h.socket(server);
    const depth = 200_000; // 400 kB of brackets: within maxPayloadBytes, far beyond any stack
    const frame = (d: number) => `{"id":"D1","type":"SYN","payload":[${'['.repeat(d)}${']'.repeat(d)}]}`;
    sock.send(frame(depth));
    const first = await sock.next(is.reply('D1'), 10_000);
    expect(first).toEqual({ id: 'D1', type: 'SYN', payload: [{ n: 1 }] });
    sock.send(frame(depth));
    expect(await sock.next(is.reply('D1'), 10_000)).toEqual(first);
    sock.send(frame(depth + 1));
    expect(await sock.next(is.reply('D1'), 10_000)).toMatchObject({
      type: 'NAK',
      error: { code: 'id_reused' },
    });
    expect(runs()).toBe(1);
  });
});
