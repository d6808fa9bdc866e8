/**
 * The server's per-operation shortcuts (session 5, LANE2) keep the rules they shortcut:
 * - in-process dedupe fingerprints (`localFingerprint`: the payload's JSON when short, else the
 *   SHA-256 of that JSON) tell payloads apart exactly when their JSON texts differ, so a
 *   reused id with another payload is still refused `id_reused` (PROTOCOL §3 rule 4), short
 *   or long, in flight or answered, and the same payload is still answered from memory;
 * - a batch of a client with nothing queued starts at once, but a client's batches still run
 *   one at a time in arrival order, and its queue is dropped once idle;
 * - the comma count that spares small frames the `payloadOver` scan never lets a SYN of more
 *   than `maxBatch` operations through (it is refused `too_large` as before).
 * - `peerAddress` reads a socket's peer as `remoteAddress` does, without the cache that getter
 *   leaves on every socket (idle memory).
 * fast-check properties with bounded runs; the seed is printed (SEED=… replays).
 */
import { createHash } from 'node:crypto';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { parseClientFrame, type SynEnvelope } from '../src/protocol/index.js';
import {
  Dedupe,
  LOCAL_FP_MAX_CHARS,
  localFingerprint,
  type SynResponse,
  stringBytes,
} from '../src/server/dedupe.js';
import { peerAddress } from '../src/server/index.js';

const SEED = Number(process.env.SEED ?? Date.now() % 2 ** 31);
console.log(`[server-perop] seed ${SEED} (SEED=${SEED} replays)`);

const newDedupe = () =>
  new Dedupe({
    windowMs: 60_000,
    maxEntries: 1000,
    maxBytes: 10_000_000,
    maxResponseBytes: 100_000,
    maxQueuedPerClient: 10,
    store: undefined,
    onError: () => {},
  });

const syn = (id: string, payload: unknown[]): SynEnvelope => ({ id, type: 'SYN', payload });
const answer = (id: string, v: unknown): Promise<SynResponse> =>
  Promise.resolve({ id, type: 'SYN', payload: [v] });

function deferred<T>() {
  let resolve!: (v: T) => void;
  const promise = new Promise<T>((r) => {
    resolve = r;
  });
  return { promise, resolve };
}

describe('localFingerprint', () => {
  it('is equal for two payloads exactly when their JSON texts are equal (property)', () => {
    const payload = fc.array(fc.jsonValue({ maxDepth: 3 }), { minLength: 1, maxLength: 4 });
    fc.assert(
      fc.property(payload, payload, (a, b) => {
        // Through JSON, as the server gets them (a parsed frame holds no -0 or undefined).
        const x = JSON.parse(JSON.stringify(a)) as unknown[];
        const y = JSON.parse(JSON.stringify(b)) as unknown[];
        const same = JSON.stringify(x) === JSON.stringify(y);
        expect(localFingerprint(x) === localFingerprint(y)).toBe(same);
        expect(localFingerprint(x)).toBe(localFingerprint(JSON.parse(JSON.stringify(x))));
      }),
      { seed: SEED, numRuns: 300 },
    );
  });

  it('is the JSON up to LOCAL_FP_MAX_CHARS, the SHA-256 of the JSON beyond and for payloads deeper than the stack', () => {
    const sha = (text: string) => createHash('sha256').update(text).digest('base64url');
    const short = [{ a: 1 }];
    expect(localFingerprint(short)).toBe('[{"a":1}]');
    const long = ['x'.repeat(LOCAL_FP_MAX_CHARS)];
    expect(localFingerprint(long)).toBe(sha(JSON.stringify(long)));
    const atBound = ['y'.repeat(LOCAL_FP_MAX_CHARS - 4)]; // ["…"] is exactly the bound
    expect(localFingerprint(atBound)).toBe(JSON.stringify(atBound));
    const deepText = `[${'['.repeat(100_000)}${']'.repeat(100_000)}]`;
    const deep = JSON.parse(deepText) as unknown[];
    expect(() => JSON.stringify(deep)).toThrow(RangeError);
    expect(localFingerprint(deep)).toBe(sha(deepText));
  });
});

describe('the bytes a remembered response counts (session 6: no scan for an all-ASCII one)', () => {
  it('counts one byte a character for Latin-1 text (ASCII or not), two for any other, whether its UTF-8 size is given or not', () => {
    for (const [s, bytes] of [
      ['abc', 19],
      ['é', 17],
      ['aéÿ', 19],
      ['€', 18],
      ['a€', 20],
      ['\ud83d\ude00', 20],
    ] as const) {
      expect(stringBytes(s)).toBe(bytes);
      expect(stringBytes(s, Buffer.byteLength(s))).toBe(bytes);
    }
  });

  it("counts a kept response's text in sizeBytes at the heap size of its JSON", async () => {
    const sizeWith = (text: string) => {
      const dedupe = newDedupe();
      dedupe.run('o', 'c', syn('b:1', [1]), () => ({ id: 'b:1', type: 'SYN', payload: [text] }));
      return dedupe.sizeBytes;
    };
    const ascii = sizeWith('x'.repeat(100));
    // The same length of JSON: Latin-1 stays one byte a character, anything else two.
    expect(sizeWith('é'.repeat(100))).toBe(ascii);
    const json = JSON.stringify({ id: 'b:1', type: 'SYN', payload: ['€'.repeat(100)] });
    expect(sizeWith('€'.repeat(100))).toBe(ascii + json.length);
  });
});

describe('dedupe without a shared store', () => {
  for (const [name, make] of [
    ['short', (v: string) => [{ op: v }]],
    ['long (hashed)', (v: string) => [{ op: v, pad: 'p'.repeat(2 * LOCAL_FP_MAX_CHARS) }]],
  ] as const) {
    it(`refuses a reused id with another ${name} payload id_reused, answered or in flight; the same payload is answered from memory`, async () => {
      const dedupe = newDedupe();
      let runs = 0;
      const first = await dedupe.run('o', 'c', syn('k:1', make('one')), () => {
        runs++;
        return answer('k:1', 'ONE');
      });
      expect(first).toEqual({ id: 'k:1', type: 'SYN', payload: ['ONE'] });
      const reused = await dedupe.run('o', 'c', syn('k:1', make('two')), () => {
        runs++;
        return answer('k:1', 'TWO');
      });
      expect(reused).toMatchObject({ id: 'k:1', type: 'NAK', error: { code: 'id_reused' } });
      const again = await dedupe.run('o', 'c', syn('k:1', make('one')), () => {
        runs++;
        return answer('k:1', 'AGAIN');
      });
      expect(again).toEqual(first);

      // In flight: the first copy is still running when the other payload arrives.
      const gate = deferred<void>();
      const slow = dedupe.run('o', 'c', syn('k:2', make('slow')), async () => {
        runs++;
        await gate.promise;
        return answer('k:2', 'SLOW');
      });
      const inflight = await dedupe.run('o', 'c', syn('k:2', make('other')), () => {
        runs++;
        return answer('k:2', 'OTHER');
      });
      expect(inflight).toMatchObject({ id: 'k:2', type: 'NAK', error: { code: 'id_reused' } });
      const duplicate = dedupe.run('o', 'c', syn('k:2', make('slow')), () => {
        runs++;
        return answer('k:2', 'TWICE');
      });
      gate.resolve();
      expect(await slow).toEqual({ id: 'k:2', type: 'SYN', payload: ['SLOW'] });
      expect(await duplicate).toEqual({ id: 'k:2', type: 'SYN', payload: ['SLOW'] });
      expect(runs).toBe(2);
    });
  }

  it("runs a client's batches one at a time in arrival order, the first at once, and drops its queue when idle", async () => {
    const dedupe = newDedupe();
    const log: string[] = [];
    const gates = [deferred<void>(), deferred<void>(), deferred<void>()];
    const runs = [0, 1, 2].map((i) =>
      dedupe.run('o', 'c', syn(`q:${i}`, [i]), async () => {
        log.push(`start ${i}`);
        await gates[i]!.promise;
        log.push(`end ${i}`);
        return { id: `q:${i}`, type: 'SYN', payload: [i] };
      }),
    );
    // The first started in the same turn (nothing of this client's was queued)…
    expect(log).toEqual(['start 0']);
    // …another client's batch is not held behind it.
    const other = await dedupe.run('o', 'd', syn('q:9', [9]), () => answer('q:9', 9));
    expect(other).toEqual({ id: 'q:9', type: 'SYN', payload: [9] });
    expect([...dedupe.activeClientIds()]).toEqual(['c']);
    gates[2]!.resolve();
    gates[1]!.resolve();
    await new Promise((r) => setImmediate(r));
    expect(log).toEqual(['start 0']);
    gates[0]!.resolve();
    expect(await Promise.all(runs)).toEqual(
      [0, 1, 2].map((i) => ({ id: `q:${i}`, type: 'SYN', payload: [i] })),
    );
    expect(log).toEqual(['start 0', 'end 0', 'start 1', 'end 1', 'start 2', 'end 2']);
    expect([...dedupe.activeClientIds()]).toEqual([]);
    // Idle again: the next batch starts at once.
    const next = dedupe.run('o', 'c', syn('q:3', [3]), async () => {
      log.push('start 3');
      return { id: 'q:3', type: 'SYN', payload: [3] };
    });
    expect(log.at(-1)).toBe('start 3');
    await next;
  });

  it('answers server_error (not remembered) when processing rejects, and the client goes on', async () => {
    const dedupe = newDedupe();
    const failed = await dedupe.run('o', 'c', syn('f:1', [1]), () => Promise.reject(new Error('boom')));
    expect(failed).toMatchObject({ id: 'f:1', type: 'NAK', error: { code: 'server_error' } });
    // Not remembered: a retry runs.
    const retry = await dedupe.run('o', 'c', syn('f:1', [1]), () => answer('f:1', 'ok'));
    expect(retry).toEqual({ id: 'f:1', type: 'SYN', payload: ['ok'] });
    expect([...dedupe.activeClientIds()]).toEqual([]);
    expect(dedupe.runningCount).toBe(0);
  });
});

describe('the maxBatch pre-scan', () => {
  it('refuses every SYN of more than maxBatch operations too_large, and passes every one within (property)', () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 1, max: 40 }),
        fc.integer({ min: 1, max: 60 }),
        fc.constantFrom('1', '"a,b"', '{}', '[]', '{"k":[1,2]}', '"x"'),
        fc.boolean(),
        (maxBatch, n, op, binary) => {
          const text = JSON.stringify({ id: 'b', type: 'SYN', payload: Array(n).fill(JSON.parse(op)) });
          const r = parseClientFrame(binary ? Buffer.from(text) : text, { maxBatch });
          if (n > maxBatch) expect(r).toMatchObject({ ok: false, code: 'too_large', id: 'b' });
          else expect(r).toMatchObject({ ok: true, envelope: { id: 'b', type: 'SYN' } });
        },
      ),
      { seed: SEED, numRuns: 300 },
    );
  });

  // Session 7: the scan skips each string with a native search for its closing quote and counts
  // the backslashes before it. Strings full of quotes, backslashes, structure characters and
  // non-ASCII text, an id with escapes, any indentation, a `payload` key written with escapes,
  // bytes or text: the verdict is the parsed payload's length against maxBatch, and a refusal
  // names the id.
  it('counts exactly whatever the strings hold (escaped quotes, backslash runs, brackets, non-ASCII), formatted or not (property)', () => {
    const tricky = fc.string({
      unit: fc.constantFrom('\\', '"', ',', '[', ']', '{', '}', ':', 'a', 'é', '😀', '\n', ' '),
      maxLength: 12,
    });
    const element = fc.oneof(tricky, fc.record({ k: tricky, [`"q\\`]: fc.array(tricky, { maxLength: 3 }) }));
    fc.assert(
      fc.property(
        fc.integer({ min: 1, max: 12 }),
        fc.array(element, { maxLength: 20 }),
        tricky,
        fc.constantFrom(undefined, 1, '\t'),
        fc.boolean(),
        fc.boolean(),
        (maxBatch, payload, idTail, indent, binary, escapedKey) => {
          const id = `i${idTail}`;
          let text = JSON.stringify({ id, type: 'SYN', payload }, null, indent);
          if (escapedKey) text = text.replace('"payload"', '"p\\u0061yload"');
          const r = parseClientFrame(binary ? Buffer.from(text) : text, { maxBatch });
          if (payload.length === 0) expect(r).toMatchObject({ ok: false, code: 'bad_request' });
          else if (payload.length > maxBatch) expect(r).toMatchObject({ ok: false, code: 'too_large', id });
          else expect(r).toEqual({ ok: true, envelope: { id, type: 'SYN', payload } });
        },
      ),
      { seed: SEED, numRuns: 500 },
    );
  });
});

describe('peerAddress', () => {
  it("reads an accepted socket's peer address as remoteAddress does, without leaving remoteAddress's cache on the socket", async () => {
    const net = await import('node:net');
    const server = net.createServer();
    const accepted = new Promise<import('node:net').Socket>((resolve) => {
      server.once('connection', resolve);
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const client = net.connect((server.address() as import('node:net').AddressInfo).port, '127.0.0.1');
    try {
      const socket = await accepted;
      const address = peerAddress(socket);
      expect(Object.hasOwn(socket, '_peername')).toBe(false);
      expect(address).toBe(socket.remoteAddress);
      expect(address).toMatch(/127\.0\.0\.1$/);
      socket.destroy();
    } finally {
      client.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    }
  });
});
