/**
 * The frame parsers never throw, whatever the input (issue 12): fast-check over arbitrary
 * strings, bytes, JSON values, envelope-shaped JSON with wrong field types, and values nested
 * up to 400,000 deep in every field. Every result is typed: `{ ok: true, envelope }` with a
 * known type, or `{ ok: false, code, message, id }` with a protocol code.
 * Bounded runs; the seed is printed (FUZZ_SEED=… replays a run, FUZZ_RUNS=… runs more).
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { MESSAGE_TYPES, NAK_CODES, parseClientFrame, parseServerFrame } from '../src/protocol/index.js';

const SEED = Number(process.env.FUZZ_SEED ?? Date.now() % 2 ** 31);
const RUNS = Number(process.env.FUZZ_RUNS ?? 300);
console.log(`[protocol.fuzz] seed ${SEED} (FUZZ_SEED=${SEED} replays), runs ${RUNS}`);

type Input = string | Uint8Array;

function typed(r: ReturnType<typeof parseClientFrame> | ReturnType<typeof parseServerFrame>): boolean {
  if (r.ok) return (MESSAGE_TYPES as readonly string[]).includes(r.envelope.type);
  return (
    (NAK_CODES as readonly string[]).includes(r.code) &&
    typeof r.message === 'string' &&
    (r.id === null || (typeof r.id === 'string' && r.id.length > 0 && r.id.length <= 128))
  );
}

function check(input: Input): void {
  const opts = { maxBytes: 4 * 1024 * 1024, maxBatch: 5 };
  const c = parseClientFrame(input, opts);
  if (!typed(c)) throw new Error(`untyped client result ${JSON.stringify(c).slice(0, 200)}`);
  const s = parseServerFrame(input, opts);
  if (!typed(s)) throw new Error(`untyped server result ${JSON.stringify(s).slice(0, 200)}`);
}

/** `depth` nested arrays or objects around `inner`, as text (no recursion, so any depth). */
const nested = fc
  .record({
    depth: fc.oneof(fc.integer({ min: 1, max: 2000 }), fc.integer({ min: 100_000, max: 400_000 })),
    kind: fc.constantFrom('array', 'object', 'mixed'),
    inner: fc.constantFrom('', '1', '"x"', '{}', '[]', 'null'),
  })
  .map(({ depth, kind, inner }) => {
    if (kind === 'array') return '['.repeat(depth) + inner + ']'.repeat(depth);
    if (kind === 'object') return '{"a":'.repeat(depth) + (inner || '0') + '}'.repeat(depth);
    const half = Math.floor(depth / 2);
    return `${'[{"a":'.repeat(half)}${inner || '0'}${'}]'.repeat(half)}`;
  });

const FIELDS = ['id', 'type', 'payload', 'channels', 'error', 'seq', 'whole'] as const;
/** An envelope with one field (or the whole frame) replaced by a deeply nested value. */
const deepEnvelope = fc
  .record({ field: fc.constantFrom(...FIELDS), value: nested })
  .map(({ field, value }) => {
    switch (field) {
      case 'whole':
        return value;
      case 'channels':
        return `{"id":"i","type":"SUB","payload":{"channels":{"c":${value}}}}`;
      case 'error':
        return `{"id":"i","type":"NAK","error":${value}}`;
      case 'seq':
        return `{"id":"i","type":"MSG","channel":"c","seq":${value},"epoch":"e"}`;
      default: {
        const env: Record<string, string> = { id: '"i"', type: '"SYN"', payload: '[1]' };
        env[field] = value;
        return `{"id":${env.id},"type":${env.type},"payload":${env.payload}}`;
      }
    }
  });

/** Envelope-shaped JSON whose fields take any JSON value. */
const shaped = fc
  .record(
    {
      id: fc.oneof(fc.string({ maxLength: 140 }), fc.jsonValue({ maxDepth: 3 })),
      type: fc.oneof(fc.constantFrom(...MESSAGE_TYPES, 'HELLO', ''), fc.jsonValue({ maxDepth: 3 })),
      payload: fc.oneof(
        fc.array(fc.jsonValue({ maxDepth: 2 }), { maxLength: 8 }),
        fc.record({ channels: fc.jsonValue({ maxDepth: 3 }) }),
        fc.jsonValue({ maxDepth: 4 }),
      ),
      channel: fc.jsonValue({ maxDepth: 2 }),
      seq: fc.oneof(fc.integer(), fc.double(), fc.jsonValue({ maxDepth: 2 })),
      epoch: fc.jsonValue({ maxDepth: 2 }),
      error: fc.jsonValue({ maxDepth: 3 }),
    },
    { requiredKeys: [] },
  )
  .map((v) => JSON.stringify(v));

describe('frame parsers never throw (fast-check, seed printed)', () => {
  const run = (arb: fc.Arbitrary<Input>, numRuns = RUNS) =>
    fc.assert(
      fc.property(arb, (input) => {
        check(input);
      }),
      { seed: SEED, numRuns },
    );

  it('arbitrary strings, unicode included', () => {
    run(fc.oneof(fc.string({ maxLength: 300 }), fc.string({ unit: 'binary', maxLength: 300 })));
  });

  it('arbitrary bytes, read as UTF-8', () => {
    run(fc.uint8Array({ maxLength: 300 }));
  });

  it('arbitrary JSON values', () => {
    run(fc.json({ maxDepth: 6 }));
  });

  it('envelope-shaped JSON with fields of any type', () => {
    run(shaped, RUNS * 3);
  });

  it('values nested up to 400,000 deep in any field', () => {
    run(deepEnvelope, Math.max(20, Math.floor(RUNS / 10)));
  });

  // Shrunk and hand-found counterexamples, kept as named regressions.
  it('regression: a type nested 400,000 deep (RangeError from JSON.stringify on main)', () => {
    const deep = '['.repeat(400_000) + ']'.repeat(400_000);
    const r = parseClientFrame(`{"id":"a","type":${deep}}`, { maxBytes: 4 * 1024 * 1024 });
    expect(r).toMatchObject({ ok: false, code: 'bad_request', id: 'a' });
    const s = parseServerFrame(`{"id":"a","type":${deep}}`);
    expect(s).toMatchObject({ ok: false, code: 'bad_request' });
  });

  it('regression: a SYN over maxBatch is too_large with its id', () => {
    expect(parseClientFrame('{"id":"b","type":"SYN","payload":[1,2,3]}', { maxBatch: 2 })).toMatchObject({
      ok: false,
      code: 'too_large',
      id: 'b',
    });
  });
});
