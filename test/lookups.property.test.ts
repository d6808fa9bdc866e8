/**
 * The server-wide look-up scheduler (src/server/lookups.ts) whatever the interleaving
 * (fast-check): jobs of several keys, of random sizes, arriving at random event-loop turns,
 * asking for random slice sizes. Checked:
 * - at most `slice` look-ups are granted per event-loop turn, all keys together;
 * - round-robin: between a key's request and its grant, the other keys are granted at most
 *   one slice each per round (≤ (keys − 1) × slice look-ups when the key had nothing else
 *   waiting);
 * - every job gets all it asked for, and the backlog returns to 0;
 * - `admit` refuses only a key that already has look-ups waiting, and only past `maxBacklog`.
 * LOOKUP_RUNS (default 40) cases; LOOKUP_SEED=… replays one (the seed is printed).
 */

import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { LookupScheduler } from '../src/server/lookups.js';

const RUNS = Number(process.env.LOOKUP_RUNS ?? 40);
const SEED =
  process.env.LOOKUP_SEED === undefined
    ? Math.floor(Math.random() * 2 ** 31)
    : Number(process.env.LOOKUP_SEED);

const nextTurn = () => new Promise<void>((r) => setImmediate(r));

interface JobSpec {
  key: number;
  size: number;
  /** Event-loop turns to wait before it arrives. */
  at: number;
  /** Largest slice it asks for at a time. */
  ask: number;
}

const scenario = fc.record({
  slice: fc.integer({ min: 1, max: 40 }),
  maxBacklog: fc.integer({ min: 1, max: 600 }),
  jobs: fc.array(
    fc.record({
      key: fc.integer({ min: 0, max: 5 }),
      size: fc.integer({ min: 1, max: 150 }),
      at: fc.integer({ min: 0, max: 6 }),
      ask: fc.integer({ min: 1, max: 64 }),
    }),
    { minLength: 1, maxLength: 14 },
  ),
});

async function run({ slice, maxBacklog, jobs }: { slice: number; maxBacklog: number; jobs: JobSpec[] }) {
  const s = new LookupScheduler({ slice, rate: Number.POSITIVE_INFINITY, maxBacklog });
  /** Look-ups granted per event-loop turn (a setImmediate ticker closes each turn). */
  let turn = 0;
  let inTurn = 0;
  let maxInTurn = 0;
  let ticking = true;
  const tick = () => {
    turn++;
    inTurn = 0;
    if (ticking) setImmediate(tick);
  };
  setImmediate(tick);
  /** Granted so far, by key. */
  const grantedTo = new Map<number, number>();
  const total = () => [...grantedTo.values()].reduce((a, b) => a + b, 0);
  const waiting = new Map<number, number>();
  const done: Array<Promise<void>> = [];
  for (const spec of [...jobs].sort((a, b) => a.at - b.at)) {
    while (turn < spec.at) await nextTurn();
    const key = `k${spec.key}`;
    const hadWaiting = (waiting.get(spec.key) ?? 0) > 0;
    const backlogBefore = s.backlog;
    const job = s.admit(key, spec.size);
    if (!job) {
      // Refused only with look-ups of its own waiting and the server's backlog past the bound.
      expect(hadWaiting).toBe(true);
      expect(backlogBefore + spec.size).toBeGreaterThan(maxBacklog);
      continue;
    }
    waiting.set(spec.key, (waiting.get(spec.key) ?? 0) + 1);
    done.push(
      (async () => {
        let left = spec.size;
        while (left > 0) {
          const alone = s.waitingKeys;
          const othersBefore = total() - (grantedTo.get(spec.key) ?? 0);
          const firstOfKey = (waiting.get(spec.key) ?? 0) === 1;
          const n = await job.turn(Math.min(spec.ask, left));
          expect(n).toBeGreaterThanOrEqual(1);
          expect(n).toBeLessThanOrEqual(Math.min(spec.ask, left, slice));
          inTurn += n;
          maxInTurn = Math.max(maxInTurn, inTurn);
          const others = total() - (grantedTo.get(spec.key) ?? 0) - othersBefore;
          // Round-robin: other keys waiting then got at most one slice each, maybe one round
          // more for keys served in the turn this request came in.
          if (firstOfKey) expect(others).toBeLessThanOrEqual((alone + 1) * slice);
          grantedTo.set(spec.key, (grantedTo.get(spec.key) ?? 0) + n);
          left -= n;
        }
        job.done();
        waiting.set(spec.key, (waiting.get(spec.key) ?? 0) - 1);
      })(),
    );
  }
  await Promise.all(done);
  ticking = false;
  expect(maxInTurn).toBeLessThanOrEqual(slice);
  expect(s.backlog).toBe(0);
  expect(s.waitingKeys).toBe(0);
}

describe('look-up scheduler: fair and bounded whatever the interleaving (fast-check)', () => {
  it(`${RUNS} cases of jobs of several keys`, async () => {
    try {
      await fc.assert(fc.asyncProperty(scenario, run), { numRuns: RUNS, seed: SEED, verbose: 1 });
    } catch (err) {
      console.error(`[lookups.property] failed with LOOKUP_SEED=${SEED}`);
      throw err;
    }
    console.log(`[lookups.property] seed ${SEED}: ${RUNS} cases`);
  }, 60_000);

  it('a rate in look-ups per second: past the burst, grants wait for the clock', async () => {
    let now = 0;
    const s = new LookupScheduler({ slice: 10, rate: 20, maxBacklog: 1000, now: () => now });
    const job = s.admit('a', 40)!;
    // The burst (one second: 20) goes at once, a slice per turn.
    expect(await job.turn(40)).toBe(10);
    expect(await job.turn(40)).toBe(10);
    // Then nothing until the clock has earned the next slice (10 look-ups = 500 ms)…
    let granted = 0;
    const next = job.turn(40).then((n) => {
      granted = n;
    });
    for (let i = 0; i < 5; i++) await nextTurn();
    expect(granted).toBe(0);
    now = 500;
    await next;
    expect(granted).toBe(10);
    job.done();
    expect(s.backlog).toBe(0);
    s.close();
  });
});
