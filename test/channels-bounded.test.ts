/**
 * FIX14E: channel subscriptions cost what they should.
 *
 * - F4: a `SUB` answer with `more: true` (or a head past the cursor) that did not move the
 *   cursor is a bad answer for that channel: `bad_frame` on `failures$`, no re-SUB at once (a
 *   lying server got 98 259 SUBs in 20 s), the next SUB only when the backoff timer fires. A
 *   manual clock drives the retry timer, so the test counts SUBs, not milliseconds. Honest
 *   paging (`more` with progress) still re-SUBs at once.
 * - F5: subscribe() + unsubscribe() of fresh channel names leaves no actor behind in the
 *   actor system (counted), and a channel subscribed again later works.
 * - F6: the `channels` option and many subscribe() calls publish `subscriptions$` a bounded
 *   number of times (a counter, not a timer): per-channel publication of an O(channels) map
 *   was the quadratic cost.
 * - F7: one SUB answer with many bad entries is one `bad_frame` failure, with the count.
 * - F8: subscribe() twice, and the `channels` option plus subscribe(), send one SUB (counted
 *   at a real reference server through the rig's proxy).
 */
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { WebSocket } from 'ws';
import {
  type ChannelMessage,
  type Clock,
  createSyncClient,
  type Failure,
  type SyncClient,
  SyncError,
} from '../src/client/index.js';
import { type Rig, rig, until } from './helpers/harness.js';
import { type Envelope, honest, type LyingServer, startLyingServer } from './helpers/lying-server.js';

let n = 0;
const clientId = (s: string) => `${s}-${process.pid}-${++n}`;

/** A clock whose timers fire only when the test says so (the SUB retry timer uses it). */
function manualClock() {
  let next = 1;
  const timers = new Map<number, () => void>();
  const clock: Clock = {
    setTimeout: (fn: () => void) => {
      const id = next++;
      timers.set(id, fn);
      return id;
    },
    clearTimeout: (id: number) => {
      timers.delete(id);
    },
  };
  return {
    clock,
    pending: () => timers.size,
    /** Fire every timer set so far. */
    fire() {
      const due = [...timers];
      timers.clear();
      for (const [, fn] of due) fn();
    },
  };
}

const subNames = (env: Envelope) => Object.keys((env.payload as { channels: object }).channels);

describe('F4: `more` without progress is a bad answer, retried after the backoff only', () => {
  let liar: LyingServer;
  let c: SyncClient | undefined;
  beforeAll(async () => {
    liar = await startLyingServer();
  });
  afterEach(async () => {
    await c?.close();
    c = undefined;
    liar.reset();
  });
  afterAll(async () => {
    await liar?.close();
  });

  it('a server answering more: true at the same seq gets one SUB per backoff timer, and bad_frame each time', async () => {
    let answers = 0;
    liar.onFrame = (env, reply) => {
      if (env.type === 'SUB' && subNames(env).includes('ch')) {
        answers++;
        reply({ id: env.id, type: 'ACK' });
        reply({
          id: env.id,
          type: 'SYN',
          payload: [{ channels: { ch: { epoch: 'e1', seq: 5, recovered: true, more: true } } }],
        });
        return;
      }
      for (const f of honest(env)) reply(f);
    };
    const mc = manualClock();
    const failures: Failure[] = [];
    c = createSyncClient({
      url: liar.wsUrl,
      clientId: clientId('more-liar'),
      timeout: 150,
      clock: mc.clock,
      WebSocket: WebSocket as never,
    });
    c.failures$.subscribe((f) => failures.push(f));
    const subs = () => liar.received.filter((e) => e.type === 'SUB' && subNames(e).includes('ch')).length;
    // The cursor the SUB sends is e1:5; the answer says more at seq 5 and replays nothing.
    const err = await c.subscribe('ch', { since: 5, epoch: 'e1' }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(SyncError);
    expect((err as SyncError).code).toBe('bad_response');
    // A full round trip after the answer: had the client re-SUBbed at once, the SUB would be
    // at the server before this send's answer (one socket, in order).
    expect(await c.send({ n: 1 })).toEqual({ ok: { n: 1 } });
    expect(subs()).toBe(1);
    expect(answers).toBe(1);
    const bad = failures.filter((f) => f.kind === 'bad_frame');
    expect(bad).toHaveLength(1);
    expect(bad[0]!.reason).toContain('did not move the cursor');
    expect(c.subscriptionState('ch')).not.toBe('subscribed');
    expect(c.cursors().ch).toEqual({ epoch: 'e1', seq: 5 });
    // The retry waits for its timer; each firing is one SUB and one more bad_frame.
    for (let round = 2; round <= 4; round++) {
      expect(mc.pending()).toBeGreaterThan(0);
      mc.fire();
      await until(() => answers === round, 5000, `SUB ${round}`);
      await c.send({ n: round });
      expect(subs()).toBe(round);
      await until(() => failures.filter((f) => f.kind === 'bad_frame').length === round, 5000, 'bad_frame');
    }
  });

  it('honest paging (more with progress) re-SUBs at once and ends subscribed with every message', async () => {
    liar.onFrame = (env, reply) => {
      if (env.type === 'SUB' && subNames(env).includes('ch')) {
        const cur = (env.payload as { channels: { ch: { since?: number } } }).channels.ch;
        const from = cur.since ?? 0;
        reply({ id: env.id, type: 'ACK' });
        // Two messages per page, up to seq 6.
        const last = Math.min(from + 2, 6);
        for (let s = from + 1; s <= last; s++)
          reply({
            id: `m${s}`,
            type: 'MSG',
            channel: 'ch',
            epoch: 'e1',
            seq: s,
            replay: true,
            payload: { changes: [s] },
          });
        reply({
          id: env.id,
          type: 'SYN',
          payload: [
            {
              channels: {
                ch:
                  last < 6
                    ? { epoch: 'e1', seq: last, recovered: true, more: true }
                    : { epoch: 'e1', seq: 6, recovered: true },
              },
            },
          ],
        });
        return;
      }
      for (const f of honest(env)) reply(f);
    };
    const mc = manualClock();
    const failures: Failure[] = [];
    const seen: ChannelMessage[] = [];
    c = createSyncClient({
      url: liar.wsUrl,
      clientId: clientId('more-honest'),
      timeout: 150,
      clock: mc.clock,
      WebSocket: WebSocket as never,
    });
    c.failures$.subscribe((f) => failures.push(f));
    c.messages$.subscribe((m) => seen.push(m));
    await c.subscribe('ch', { since: 0, epoch: 'e1' });
    await until(() => c!.subscriptionState('ch') === 'subscribed' && seen.length === 6, 5000, 'all pages');
    expect(seen.map((m) => m.seq)).toEqual([1, 2, 3, 4, 5, 6]);
    expect(liar.received.filter((e) => e.type === 'SUB').length).toBe(3);
    expect(failures.filter((f) => f.kind === 'bad_frame')).toEqual([]);
  });

  it('F7: one SUB answer with many bad entries is one bad_frame failure, with the count', async () => {
    const names = Array.from({ length: 50 }, (_, i) => `b${i}`);
    liar.onFrame = (env, reply) => {
      if (env.type === 'SUB') {
        reply({ id: env.id, type: 'ACK' });
        reply({
          id: env.id,
          type: 'SYN',
          payload: [
            {
              channels: Object.fromEntries(
                subNames(env).map((nm) => [nm, { epoch: 'e1', seq: -1, recovered: true }]),
              ),
            },
          ],
        });
        return;
      }
      for (const f of honest(env)) reply(f);
    };
    const mc = manualClock();
    const failures: Failure[] = [];
    c = createSyncClient({
      url: liar.wsUrl,
      clientId: clientId('many-bad'),
      timeout: 150,
      clock: mc.clock,
      channels: Object.fromEntries(names.map((nm) => [nm, {}])),
      WebSocket: WebSocket as never,
    });
    c.failures$.subscribe((f) => failures.push(f));
    await until(() => liar.received.some((e) => e.type === 'SUB'), 5000, 'SUB');
    await c.send({ n: 1 });
    const bad = failures.filter((f) => f.kind === 'bad_frame');
    expect(bad).toHaveLength(1);
    expect(bad[0]!.reason).toContain('50 bad entries');
  });
});

describe('against a real reference server', () => {
  let r: Rig | undefined;
  afterEach(async () => {
    await r?.close();
    r = undefined;
  });

  it('F5: subscribe + unsubscribe of 300 fresh channels leaves no actor and no cursor; a channel subscribed again works', async () => {
    r = await rig({ maxChannelsPerPrincipal: 100_000 });
    const c = r.client({ clientId: clientId('churn') });
    const states: Array<Record<string, string>> = [];
    c.subscriptions$.subscribe((s) => states.push(s));
    const N = 300;
    for (let i = 0; i < N; i++) {
      await c.subscribe(`churn-${i}`);
      expect(c.actor.system.get(`subscription:churn-${i}`)).toBeDefined();
      await c.unsubscribe(`churn-${i}`);
    }
    for (let i = 0; i < N; i++) {
      expect(c.actor.system.get(`subscription:churn-${i}`), `churn-${i}`).toBeUndefined();
      expect(c.subscriptionState(`churn-${i}`)).toBe('unsubscribed');
    }
    expect(c.cursors()).toEqual({});
    expect(states.at(-1)).toEqual({});
    // Subscribed again: a new actor, live messages flow.
    const seen: number[] = [];
    c.messages$.subscribe((m) => seen.push(m.seq));
    await c.subscribe('churn-7');
    expect(c.subscriptionState('churn-7')).toBe('subscribed');
    expect(c.actor.system.get('subscription:churn-7')).toBeDefined();
    r.server.publish('churn-7', { changes: [1] });
    await until(() => seen.length === 1, 5000, 'live message');
    await c.unsubscribe('churn-7');
    expect(c.actor.system.get('subscription:churn-7')).toBeUndefined();
  });

  it('F6: subscriptions$ is published a bounded number of times for 1 000 channels of the `channels` option', async () => {
    r = await rig({ maxChannelsPerPrincipal: 100_000 });
    const N = 1000;
    const names = Array.from({ length: N }, (_, i) => `opt-${i}`);
    const c = r.client({
      clientId: clientId('opt'),
      channels: Object.fromEntries(names.map((nm) => [nm, {}])),
    });
    let emissions = 0;
    let last: Record<string, string> = {};
    c.subscriptions$.subscribe((s) => {
      emissions++;
      last = s;
    });
    await until(
      () => names.every((nm) => c.subscriptionState(nm) === 'subscribed'),
      20_000,
      'all subscribed',
    );
    await until(() => Object.keys(last).length === N, 5000, 'map complete');
    expect(Object.values(last).every((v) => v === 'subscribed')).toBe(true);
    // Per answer, not per channel: was 2 × N + 1 (each an O(N) map: quadratic).
    expect(emissions).toBeLessThanOrEqual(10);
  });

  it('F8: subscribe() twice, and the channels option plus subscribe(), before the socket opens send one SUB each', async () => {
    r = await rig();
    const from = r.proxy.traffic.length;
    const subs = () => r!.proxy.traffic.slice(from).filter((t) => t.dir === 'up' && t.frame.type === 'SUB');
    const c = r.client({ clientId: clientId('twice') });
    expect(c.state).toBe('connecting');
    const [a, b] = await Promise.all([c.subscribe('board'), c.subscribe('board')]);
    expect(a.epoch).toBe(b.epoch);
    expect(c.subscriptionState('board')).toBe('subscribed');
    expect(subs().length).toBe(1);
    const c2 = r.client({ clientId: clientId('opt-plus'), channels: { board: {} } });
    expect(c2.state).toBe('connecting');
    await c2.subscribe('board');
    expect(c2.subscriptionState('board')).toBe('subscribed');
    expect(subs().length).toBe(2);
    // Both live: one publication reaches each client once.
    const seen: string[] = [];
    c.messages$.subscribe(() => seen.push('c'));
    c2.messages$.subscribe(() => seen.push('c2'));
    r.server.publish('board', { changes: [1] });
    await until(() => seen.length === 2, 5000, 'live messages');
    expect(seen.sort()).toEqual(['c', 'c2']);
  });
});
