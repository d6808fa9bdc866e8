/**
 * LazyClock (src/client/clock.ts): the client's default statechart clock, every named delay
 * on one platform timer. A scripted platform (manual time, recorded timers) checks the order,
 * the cancellations and the re-arming; the real platform checks that a delay fires and that a
 * clock with nothing left holds no timer.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { type ClockPlatform, LazyClock } from '../src/client/clock.js';

/** A platform whose time moves only when told; `run()` fires the due platform timers. */
function scripted() {
  let t = 0;
  let next = 1;
  const timers = new Map<number, { at: number; fn: () => void }>();
  const platform: ClockPlatform = {
    now: () => t,
    setTimeout: (fn, ms) => {
      const id = next++;
      timers.set(id, { at: t + ms, fn });
      return id;
    },
    clearTimeout: (id) => void timers.delete(id as number),
  };
  const advance = (to: number) => {
    // Fire platform timers in deadline order as time moves to `to`.
    for (;;) {
      const due = [...timers].filter(([, x]) => x.at <= to).sort((a, b) => a[1].at - b[1].at || a[0] - b[0]);
      if (due.length === 0) break;
      const [id, x] = due[0]!;
      timers.delete(id);
      t = Math.max(t, x.at);
      x.fn();
    }
    t = to;
  };
  return { platform, timers, advance, now: () => t };
}

describe('LazyClock', () => {
  it('runs each callback once, at or after its deadline, in deadline order, on one platform timer', () => {
    const s = scripted();
    const clock = new LazyClock(s.platform);
    const fired: Array<[string, number]> = [];
    clock.setTimeout(() => fired.push(['c', s.now()]), 300);
    clock.setTimeout(() => fired.push(['a', s.now()]), 100);
    clock.setTimeout(() => fired.push(['b', s.now()]), 200);
    expect(s.timers.size).toBe(1);
    s.advance(1000);
    expect(fired).toEqual([
      ['a', 100],
      ['b', 200],
      ['c', 300],
    ]);
    expect(clock.size).toBe(0);
    expect(s.timers.size).toBe(0);
  });

  it('a cancelled delay never runs; cancelling the last one clears the platform timer at the end of the job', async () => {
    const s = scripted();
    const clock = new LazyClock(s.platform);
    const fired: string[] = [];
    const a = clock.setTimeout(() => fired.push('a'), 100);
    const b = clock.setTimeout(() => fired.push('b'), 200);
    clock.clearTimeout(a);
    expect(s.timers.size).toBe(1);
    s.advance(150);
    expect(fired).toEqual([]);
    clock.clearTimeout(b);
    await Promise.resolve();
    expect(s.timers.size).toBe(0);
    s.advance(1000);
    expect(fired).toEqual([]);
    // Unknown and repeated ids are ignored.
    clock.clearTimeout(b);
    clock.clearTimeout(12345);
  });

  it('the last deadline cancelled and a later one set in the same job: the platform timer is neither cleared nor armed again', async () => {
    const s = scripted();
    const cleared: unknown[] = [];
    let armed = 0;
    const platform: ClockPlatform = {
      now: s.platform.now,
      setTimeout: (fn, ms) => {
        armed++;
        return s.platform.setTimeout(fn, ms);
      },
      clearTimeout: (id) => {
        cleared.push(id);
        s.platform.clearTimeout(id);
      },
    };
    const clock = new LazyClock(platform);
    const fired: string[] = [];
    // A round trip at one in flight: the keepalive cancelled, the ACK deadline set, and back.
    let pending = clock.setTimeout(() => fired.push('first'), 100);
    for (let i = 1; i <= 50; i++) {
      clock.clearTimeout(pending);
      pending = clock.setTimeout(() => fired.push(`d${i}`), 100);
      await Promise.resolve();
      s.advance(s.now() + 1);
    }
    expect(armed).toBe(1);
    expect(cleared).toEqual([]);
    // The timer armed for the first deadline wakes for nothing and re-arms for the live one.
    s.advance(s.now() + 60);
    expect(fired).toEqual([]);
    expect(armed).toBe(2);
    s.advance(s.now() + 100);
    expect(fired).toEqual(['d50']);
    await Promise.resolve();
    expect(s.timers.size).toBe(0);
  });

  it('a later deadline does not re-arm the platform timer; an earlier one does', () => {
    const s = scripted();
    const clock = new LazyClock(s.platform);
    clock.setTimeout(() => {}, 100);
    const first = [...s.timers.keys()];
    for (let i = 0; i < 50; i++) clock.setTimeout(() => {}, 200 + i);
    expect([...s.timers.keys()]).toEqual(first);
    clock.setTimeout(() => {}, 10);
    expect([...s.timers.keys()]).not.toEqual(first);
    expect(s.timers.size).toBe(1);
  });

  it('callbacks may set and cancel delays while it fires', () => {
    const s = scripted();
    const clock = new LazyClock(s.platform);
    const fired: Array<[string, number]> = [];
    let b = 0;
    clock.setTimeout(() => {
      fired.push(['a', s.now()]);
      clock.clearTimeout(b);
      clock.setTimeout(() => fired.push(['c', s.now()]), 50);
    }, 100);
    b = clock.setTimeout(() => fired.push(['b', s.now()]), 100);
    s.advance(1000);
    expect(fired).toEqual([
      ['a', 100],
      ['c', 150],
    ]);
  });

  it('whatever the schedule of sets, cancels and time steps: each live delay runs once, never early, in order', () => {
    type Step =
      | { kind: 'set'; ms: number }
      | { kind: 'clear'; pick: number }
      | { kind: 'advance'; by: number };
    const step = fc.oneof(
      fc.record({ kind: fc.constant('set' as const), ms: fc.integer({ min: 0, max: 500 }) }),
      fc.record({ kind: fc.constant('clear' as const), pick: fc.nat() }),
      fc.record({ kind: fc.constant('advance' as const), by: fc.integer({ min: 0, max: 300 }) }),
    );
    const seed = Number(process.env.CLOCK_SEED ?? Date.now() % 2 ** 31);
    console.log(`[clock] seed ${seed} (CLOCK_SEED=${seed} replays it)`);
    fc.assert(
      fc.property(fc.array(step, { maxLength: 60 }), (steps: Step[]) => {
        const s = scripted();
        const clock = new LazyClock(s.platform);
        const live = new Map<number, number>();
        const runs: Array<{ id: number; at: number; deadline: number }> = [];
        const ids: number[] = [];
        for (const st of steps) {
          if (st.kind === 'set') {
            const deadline = s.now() + st.ms;
            const id: number = clock.setTimeout(() => {
              runs.push({ id, at: s.now(), deadline });
              live.delete(id);
            }, st.ms);
            live.set(id, deadline);
            ids.push(id);
          } else if (st.kind === 'clear' && ids.length > 0) {
            const id = ids[st.pick % ids.length]!;
            clock.clearTimeout(id);
            live.delete(id);
          } else if (st.kind === 'advance') s.advance(s.now() + st.by);
        }
        const left = new Map(live);
        s.advance(s.now() + 1000);
        for (const r of runs) expect(r.at).toBeGreaterThanOrEqual(r.deadline);
        expect(new Set(runs.map((r) => r.id)).size).toBe(runs.length);
        for (let i = 1; i < runs.length; i++) expect(runs[i]!.at).toBeGreaterThanOrEqual(runs[i - 1]!.at);
        for (const id of left.keys()) expect(runs.some((r) => r.id === id)).toBe(true);
        expect(live.size).toBe(0);
        expect(s.timers.size).toBe(0);
      }),
      { numRuns: 300, seed, verbose: true },
    );
  });

  it('on the real platform: a delay fires, and a cleared clock leaves no timer behind', async () => {
    const clock = new LazyClock();
    const fired = await new Promise<boolean>((resolve) => {
      const guard = setTimeout(() => resolve(false), 5000);
      clock.setTimeout(() => {
        clearTimeout(guard);
        resolve(true);
      }, 5);
    });
    expect(fired).toBe(true);
    expect(clock.size).toBe(0);
    const id = clock.setTimeout(() => {
      throw new Error('cancelled delay ran');
    }, 1);
    clock.clearTimeout(id);
    expect(clock.size).toBe(0);
    // Another delay set after it still fires (the clock re-arms from nothing).
    expect(await new Promise<boolean>((resolve) => clock.setTimeout(() => resolve(true), 2))).toBe(true);
  });
});
