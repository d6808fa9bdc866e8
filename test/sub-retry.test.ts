/**
 * S6D item 2: the retry of a failed SUB is the subscription chart's delayed transition
 * (machines/subscription.ts, `subscribing.backoff` / `resetting.backoff`, delay `subRetry`),
 * not a timer of the client's own: it runs on the chart's clock, the inspector model (the
 * visualizer's panel) shows the wait, and leaving the wait (unsubscribe, close) cancels it.
 *
 * A real reference server whose store fails the SUB's head read on demand (the whole SUB is
 * answered `server_error`), and a manual clock given to the client (`clock`): its timers
 * fire only when the test says so, and each records its delay. `maxBackoff` (70 ms) is below
 * every delay the connection chart arms while a socket is open (T = 200 ms and more), so the
 * retry's timer is the one armed with 70 ms.
 */
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import type { Clock, SyncClient } from '../src/client/index.js';
import { serializeInspectionEvent } from '../src/inspect/index.js';
import { InspectModel } from '../src/inspect/model.js';
import type { HistoryStore } from '../src/server/index.js';
import { memoryStore } from '../src/stores/memory.js';
import { type Rig, reach, rig, until } from './helpers/harness.js';

const BACKOFF = 70;

let r: Rig | undefined;
/** XState's warnings (an event sent to a stopped or forgotten actor): there must be none. */
let warnings: unknown[][] = [];
beforeEach(() => {
  warnings = [];
  vi.spyOn(console, 'warn').mockImplementation((...args: unknown[]) => void warnings.push(args));
});
afterEach(async () => {
  await r?.close();
  r = undefined;
  vi.restoreAllMocks();
  expect(warnings).toEqual([]);
});

function manualClock() {
  let next = 1;
  const timers = new Map<number, { fn: () => void; ms: number }>();
  const clock: Clock = {
    setTimeout: (fn: () => void, ms: number) => {
      const id = next++;
      timers.set(id, { fn, ms });
      return id;
    },
    clearTimeout: (id: number) => void timers.delete(id),
  };
  return {
    clock,
    /** Timers armed with the retry's delay and not yet fired or cleared. */
    retries: () => [...timers.values()].filter((t) => t.ms === BACKOFF).length,
    /** Fire the retry's timers (the chart's delayed transition). */
    fireRetries() {
      for (const [id, t] of [...timers]) {
        if (t.ms !== BACKOFF) continue;
        timers.delete(id);
        t.fn();
      }
    },
  };
}

/** A server whose store fails the next `failNext` SUB head reads: those SUBs fail whole. */
async function failingRig() {
  const inner = memoryStore();
  const ctl = { failNext: 0 };
  const store = new Proxy(inner, {
    get(target, prop, receiver) {
      if (prop === 'head' && ctl.failNext > 0)
        return async () => {
          ctl.failNext--;
          throw new Error('store down');
        };
      const v = Reflect.get(target, prop, receiver);
      return typeof v === 'function' ? v.bind(target) : v;
    },
  }) as HistoryStore;
  r = await rig({ store, onError: () => {} });
  return ctl;
}

const subsFor = (rg: Rig, channel: string) =>
  rg.proxy.traffic.filter(
    (t) =>
      t.dir === 'up' &&
      t.frame.type === 'SUB' &&
      Object.hasOwn((t.frame.payload as { channels: object }).channels, channel),
  ).length;

const snapOf = (c: SyncClient, channel: string) =>
  c.actor.system.get(`subscription:${channel}`)?.getSnapshot();

describe('the failed-SUB retry is a delayed transition of the subscription chart', () => {
  it('a failed SUB waits in subscribing.backoff on the chart clock; when the delay passes the chart asks again and the channel is subscribed', async () => {
    const ctl = await failingRig();
    const mc = manualClock();
    // The inspector model (what the visualizer panel draws) sees the wait.
    const model = new InspectModel();
    const c = r!.client({
      clock: mc.clock,
      maxBackoff: BACKOFF,
      inspect: (ev) => {
        const e = serializeInspectionEvent(ev);
        if (e) model.push(e);
      },
    });
    const inModel = () => [...model.sessions.values()][0]?.subscriptions.ch;
    await reach(c, 'open');
    ctl.failNext = 1;
    await expect(c.subscribe('ch')).rejects.toMatchObject({ code: 'server_error' });
    expect(snapOf(c, 'ch')?.value).toEqual({ subscribing: 'backoff' });
    expect(c.subscriptionState('ch')).toBe('subscribing');
    expect(inModel()).toEqual({ state: 'subscribing', error: 'server_error', retrying: true });
    expect(snapOf(c, 'ch')?.context.error).toMatchObject({ code: 'server_error' });
    expect(mc.retries()).toBe(1);
    expect(subsFor(r!, 'ch')).toBe(1);
    // A full round trip: nothing else asks for the channel before the delay passes.
    await c.send({ id: 'x' });
    expect(subsFor(r!, 'ch')).toBe(1);
    mc.fireRetries();
    await until(() => c.subscriptionState('ch') === 'subscribed', 5000, 'subscribed after the retry');
    expect(subsFor(r!, 'ch')).toBe(2);
    expect(snapOf(c, 'ch')?.context).toMatchObject({ error: null, failures: 0 });
    expect(inModel()).toEqual({ state: 'subscribed' });
    expect(mc.retries()).toBe(0);
  });

  it('unsubscribe() during the wait cancels it: no timer left, no SUB for the channel when the delay would have passed', async () => {
    const ctl = await failingRig();
    const mc = manualClock();
    const c = r!.client({ clock: mc.clock, maxBackoff: BACKOFF });
    await reach(c, 'open');
    ctl.failNext = 1;
    await expect(c.subscribe('ch')).rejects.toMatchObject({ code: 'server_error' });
    expect(snapOf(c, 'ch')?.value).toEqual({ subscribing: 'backoff' });
    expect(mc.retries()).toBe(1);
    await c.unsubscribe('ch');
    expect(snapOf(c, 'ch')).toBeUndefined();
    expect(mc.retries(), 'the retry timer is cleared').toBe(0);
    mc.fireRetries();
    await c.send({ id: 'y' });
    expect(subsFor(r!, 'ch')).toBe(1);
  });

  it('close() during the wait cancels it: no timer left', async () => {
    const ctl = await failingRig();
    const mc = manualClock();
    const c = r!.client({ clock: mc.clock, maxBackoff: BACKOFF });
    await reach(c, 'open');
    ctl.failNext = 1;
    await expect(c.subscribe('ch')).rejects.toMatchObject({ code: 'server_error' });
    expect(mc.retries()).toBe(1);
    await c.close();
    expect(mc.retries()).toBe(0);
  });
});
