/**
 * FIX3 (issue 12): a `SUB`'s `channels` object is parsed as an array of pairs when the text
 * allows it (src/protocol/index.ts `subChannelsText`), because `JSON.parse` of an object with
 * fresh names cost ~1.5 µs a name and `SUB`s refused after parsing were most of a flooded
 * server's CPU. Checked (fast-check, printed seed, PAIRS_RUNS cases, PAIRS_SEED=… replays):
 * whatever the frame, valid or not, `parseClientFrame` gives exactly what it gives for the
 * same frame parsed the old way (forced by an escaped top-level key, which the rewrite never
 * touches): same result, same channels, same order, same cursors, same error.
 */

import fc from 'fast-check';
import { describe, expect, it, vi } from 'vitest';
import { parseClientFrame, subChannelsText } from '../src/protocol/index.js';

const RUNS = Number(process.env.PAIRS_RUNS ?? 2000);
const SEED =
  process.env.PAIRS_SEED === undefined ? Math.floor(Math.random() * 2 ** 31) : Number(process.env.PAIRS_SEED);

/** The frame parsed without the rewrite: an escaped top-level key (`"\u0078"`) disables it. */
function reference(text: string): ReturnType<typeof parseClientFrame> {
  const i = text.indexOf('{');
  if (i < 0 || text.slice(0, i).trim() !== '') return parseClientFrame(text);
  const rest = text.slice(i + 1).trimStart();
  const forced = `{"\\u0078":0${rest.startsWith('}') ? '' : ','}${text.slice(i + 1)}`;
  return parseClientFrame(forced);
}

const shown = (r: ReturnType<typeof parseClientFrame>) =>
  r.ok ? JSON.stringify(['ok', r.envelope]) : JSON.stringify(['err', r.code, r.message, r.id]);

const name = fc.oneof(
  fc.constantFrom(
    'a',
    'b',
    '__proto__',
    'constructor',
    '10',
    '2',
    '0',
    '01',
    '4294967294',
    '4294967295',
    '-1',
    'x:y',
    'p,q',
    'c"d',
    'e\\f',
    '{',
    '}',
  ),
  fc.string({ maxLength: 6 }),
);
const cursor = fc.oneof(
  fc.constant({}),
  fc.record({ since: fc.nat(5) }, { requiredKeys: [] }),
  fc.record({ epoch: fc.string({ maxLength: 3 }), snapshot: fc.boolean() }, { requiredKeys: [] }),
  fc.jsonValue({ maxDepth: 2 }),
);
/** Entries as text, names possibly repeated. */
const channelsText = fc
  .array(fc.tuple(name, cursor), { maxLength: 6 })
  .map((es) => `{${es.map(([k, v]) => `${JSON.stringify(k)}:${JSON.stringify(v)}`).join(',')}}`);
const frameText = fc
  .tuple(
    fc.constantFrom('SUB', 'UNS', 'PNG', 'SYN'),
    fc.oneof(
      channelsText,
      fc.jsonValue({ maxDepth: 2 }).map((v) => JSON.stringify(v)),
    ),
    fc.boolean(),
    fc.boolean(),
  )
  .map(([type, ch, payloadFirst, twice]) => {
    const payload = `{"channels":${ch}${twice ? `,"channels":${ch}` : ''}}`;
    return payloadFirst
      ? `{"payload":${payload},"type":"${type}","id":"s1"}`
      : `{"id":"s1","type":"${type}","payload":${payload}}`;
  });
/** Valid frames, spaced out, and broken ones: a character deleted, replaced or inserted. */
const frame = fc.oneof(
  frameText,
  frameText.map((t) => JSON.stringify(JSON.parse(t), null, 1)),
  fc
    .tuple(
      frameText,
      fc.nat(),
      fc.constantFrom('', '{', '}', '[', ']', ':', ',', '"', '\\', ' ', 'a', '1'),
      fc.nat(2),
    )
    .map(([t, at, ch, how]) => {
      const i = at % (t.length + 1);
      return how === 0 ? t.slice(0, i) + ch + t.slice(i) : t.slice(0, i) + ch + t.slice(i + 1);
    }),
);

describe('SUB channels parsed as pairs: the same result as before, whatever the frame (fast-check)', () => {
  it(`${RUNS} frames, valid and broken`, () => {
    try {
      fc.assert(
        fc.property(frame, (t) => {
          expect(shown(parseClientFrame(t))).toBe(shown(reference(t)));
        }),
        { numRuns: RUNS, seed: SEED },
      );
    } catch (err) {
      console.error(`[protocol-subpairs] failed with PAIRS_SEED=${SEED}`);
      throw err;
    }
    console.log(`[protocol-subpairs] seed ${SEED}: ${RUNS} cases`);
  });

  it('the rewrite is used for ordinary SUBs (else the property above would check nothing)', () => {
    const t = '{"id":"s","type":"SUB","payload":{"channels":{"a":{"since":1},"b":{"x":{"y":[1,":"]}}}}}';
    expect(subChannelsText(t)).toBe(
      '{"id":"s","type":"SUB","payload":{"channels":["a",{"since":1},"b",{"x":{"y":[1,":"]}}]}}',
    );
    expect(subChannelsText(JSON.stringify(JSON.parse(t), null, 2))).toBeDefined();
    expect(subChannelsText(`{"\\u0078":0,${t.slice(1)}`)).toBeUndefined();
  });

  it('parseClientFrame reaches the rewrite for ordinary SUBs, with or without spaces (its cheap pre-check lets them through)', () => {
    const parse = vi.spyOn(JSON, 'parse');
    try {
      for (const t of [
        '{"id":"s","type":"SUB","payload":{"channels":{"a":{"since":1},"b":{}}}}',
        '{ "id" : "s" , "type" : "SUB" , "payload" : { "channels" : { "a" : { "since" : 1 } , "b" : { } } } }',
      ]) {
        parse.mockClear();
        const r = parseClientFrame(t);
        expect(r).toMatchObject({
          ok: true,
          envelope: { payload: { channels: { a: { since: 1 }, b: {} } } },
        });
        // The text JSON.parse got holds the channels as an array of pairs.
        expect(String(parse.mock.calls[0]?.[0])).toMatch(/"channels"\s*:\s*\[\s*"a"/);
      }
    } finally {
      parse.mockRestore();
    }
  });

  it('repeated names, __proto__ and integer-like names: last cursor, JSON.parse order', () => {
    const t =
      '{"id":"s","type":"SUB","payload":{"channels":{"b":{},"10":{},"__proto__":{"since":1},"2":{},"b":{"since":3}}}}';
    const r = parseClientFrame(t);
    expect(r.ok).toBe(true);
    if (!r.ok || r.envelope.type !== 'SUB') throw new Error('not a SUB');
    expect(Object.keys(r.envelope.payload.channels)).toEqual(['2', '10', 'b', '__proto__']);
    expect(r.envelope.payload.channels.b).toEqual({ since: 3 });
    expect(Object.getPrototypeOf(r.envelope.payload.channels)).toBe(null);
    expect(shown(r)).toBe(shown(reference(t)));
  });

  it('regression (seed 293195723): an integer-like name is validated first, as JSON.parse orders it', () => {
    const t = '{"id":"s1","type":"SUB","payload":{"channels":{"":[],"2":[]}}}';
    const r = parseClientFrame(t);
    expect(r.ok ? '' : r.message).toBe('cursor of 2 must be an object');
    expect(shown(r)).toBe(shown(reference(t)));
  });

  it('a malformed channels object is refused as before, not repaired by the rewrite', () => {
    for (const ch of ['{"a",{}}', '{"a":}', '{"a"::{}}', '{,"a":{}}', '{"a":{},}', '{"a":{} "b":{}}']) {
      const t = `{"id":"s","type":"SUB","payload":{"channels":${ch}}}`;
      const r = parseClientFrame(t);
      expect(r.ok).toBe(false);
      expect(shown(r)).toBe(shown(reference(t)));
    }
  });
});
