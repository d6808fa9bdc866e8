/**
 * The client's connect path after issue 14's connect-row work (LANE3, session 5):
 * (1) `socketOpened` is one context update plus the built-in `cancelHealthy`/`armHealthy`
 * (it was an `enqueueActions` with two `assign`s): a socket that opens, on the first dial or a
 * redial, starts exactly one probation timer, and `HEALTHY` still ends the probation and resets
 * the redial backoff 2T later. Checked on the chart alone with XState's `SimulatedClock` and a
 * clock that counts the deadlines armed and not yet fired or cleared.
 * (2) `on()`'s table of streams is made at its first call, not by every `createSyncClient`:
 * each event name still reaches its stream, with that stream's documented replay (`state` and
 * `subscriptions` emit the current value at once, the others only what comes after), whenever
 * `on()` is first called. Against a real reference server on 127.0.0.1 over `ws`.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { createActor, fromCallback, SimulatedClock } from 'xstate';
import { connectionMachine, flatState, type SocketCommand } from '../machines/connection.js';
import type { Clock, ConnectionState, Failure, SubscriptionState } from '../src/client/index.js';
import { next, type Rig, reach, rig } from './helpers/harness.js';

describe('a socket that opens starts one probation (the chart alone)', () => {
  const T = 1000;
  const setup = () => {
    const sim = new SimulatedClock();
    /** Deadlines armed and neither fired nor cleared. */
    const live = new Set<unknown>();
    const clock: Clock = {
      setTimeout: (fn, ms) => {
        const id: unknown = sim.setTimeout(() => {
          live.delete(id);
          fn();
        }, ms);
        live.add(id);
        return id;
      },
      clearTimeout: (id) => {
        live.delete(id);
        sim.clearTimeout(id);
      },
    };
    const dials: SocketCommand[] = [];
    const machine = connectionMachine.provide({
      actors: {
        socket: fromCallback<SocketCommand, { clientId: string }>(({ receive }) => {
          receive((cmd) => {
            if (cmd.type === 'DIAL') dials.push(cmd);
          });
          return () => {};
        }),
      },
    });
    const actor = createActor(machine, {
      input: { clientId: 'c', instance: 'i', timeout: T, maxBatch: 10, pollInterval: T, maxBackoff: 8 * T },
      clock,
    });
    actor.start();
    return { actor, sim, live, dials };
  };

  it('first dial: open with probation on, one HEALTHY deadline at 2T that ends it', () => {
    const { actor, sim, live } = setup();
    expect(live.size).toBe(1); // connectTimeout
    actor.send({ type: 'WS.OPEN' });
    const ctx = actor.getSnapshot().context;
    expect(flatState(actor.getSnapshot())).toBe('open');
    expect(ctx).toMatchObject({ socketOpen: true, probation: true, missedPings: 0, pingId: null });
    // connectTimeout cleared; HEALTHY (2T) and keepalive (T) armed: two, not three.
    expect(live.size).toBe(2);
    // Keep the socket answering pings so it stays open until HEALTHY.
    sim.increment(T);
    expect(actor.getSnapshot().value).toEqual({ open: 'pinging' });
    const ping = actor.getSnapshot().context.pingId!;
    actor.send({ type: 'FRAME', frame: { id: ping, type: 'ACK' } });
    expect(actor.getSnapshot().context.probation).toBe(true);
    sim.increment(T);
    expect(actor.getSnapshot().context.probation).toBe(false);
    expect(actor.getSnapshot().context.dialAttempt).toBe(0);
    actor.stop();
  });

  it('redial after a socket that died young: still one HEALTHY deadline, backoff kept until it fires', () => {
    const { actor, sim, live, dials } = setup();
    actor.send({ type: 'WS.OPEN' });
    actor.send({ type: 'WS.DOWN', code: 1006, reason: 'gone', wasOpen: true });
    expect(flatState(actor.getSnapshot())).toBe('degraded');
    expect(actor.getSnapshot().context).toMatchObject({ probation: false, dialAttempt: 1 });
    // The redial backoff (≤ T/2 · 2 = T): then a second DIAL.
    sim.increment(T);
    expect(dials.length).toBe(2);
    const before = live.size;
    actor.send({ type: 'WS.OPEN' });
    expect(actor.getSnapshot().value).toMatchObject({ degraded: { socket: 'rePinging' } });
    expect(actor.getSnapshot().context).toMatchObject({ socketOpen: true, probation: true, dialAttempt: 1 });
    // dialling's connectTimeout cleared; HEALTHY and rePinging's pingTimeout armed.
    expect(live.size).toBe(before + 1);
    const ping = actor.getSnapshot().context.pingId!;
    actor.send({ type: 'FRAME', frame: { id: ping, type: 'ACK' } });
    expect(flatState(actor.getSnapshot())).toBe('open');
    // The probation that began at the redial's open is the one running: no second one armed.
    expect(actor.getSnapshot().context.probation).toBe(true);
    sim.increment(T);
    const p2 = actor.getSnapshot().context.pingId!;
    actor.send({ type: 'FRAME', frame: { id: p2, type: 'ACK' } });
    sim.increment(T);
    expect(actor.getSnapshot().context).toMatchObject({ probation: false, dialAttempt: 0 });
    actor.stop();
  });
});

describe('on(): its streams, made at the first call', () => {
  let r: Rig | undefined;
  afterEach(async () => {
    await r?.close();
    r = undefined;
  });

  it('first called after open: state replays the current state, successes only what comes after', async () => {
    r = await rig();
    const c = r.client();
    await reach(c, 'open');
    await c.send({ id: 'before-on' });
    const states: ConnectionState[] = [];
    const successes: unknown[] = [];
    const offState = c.on('state', (s) => states.push(s));
    const offSuccesses = c.on('successes', (list) => successes.push(...list));
    // The current state at once (state$ is a BehaviorSubject, distinct).
    expect(states).toEqual(['open']);
    await c.send({ id: 'after-on' });
    expect(successes).toEqual(['after-on']);
    offSuccesses();
    await c.send({ id: 'after-off' });
    expect(successes).toEqual(['after-on']);
    offState();
  });

  it('subscriptions emits the current map at once; failure, refused, message reach their streams', async () => {
    r = await rig({ authorize: (_p, channel) => channel !== 'secret' });
    const c = r.client({ clientId: 'on-late' });
    await reach(c, 'open');
    await c.subscribe('news');
    const maps: Array<Record<string, SubscriptionState>> = [];
    c.on('subscriptions', (m) => maps.push(m));
    expect(maps).toEqual([{ news: 'subscribed' }]);
    const refused: string[] = [];
    c.on('refused', (e) => refused.push(`${e.channel}:${e.code}`));
    await expect(c.subscribe('secret')).rejects.toMatchObject({ code: 'forbidden' });
    expect(refused).toEqual(['secret:forbidden']);
    const messages: unknown[] = [];
    c.on('message', (m) => messages.push(m.payload));
    const got = next(c.messages$, (m) => m.channel === 'news');
    await r.server.publish('news', { n: 1 });
    await got;
    expect(messages).toEqual([{ n: 1 }]);
    const failures: Failure[] = [];
    c.on('failure', (f) => failures.push(f));
    const failed = next(c.failures$, (f) => f.kind === 'close');
    r.proxy.kill();
    await failed;
    expect(failures.map((f) => f.kind)).toContain('close');
  });

  it('on() after close(): completed streams, the handler sees only the replayed state', async () => {
    r = await rig();
    const c = r.client();
    await reach(c, 'open');
    await c.close();
    const states: ConnectionState[] = [];
    const successes: unknown[] = [];
    c.on('state', (s) => states.push(s));
    c.on('successes', (l) => successes.push(...l));
    expect(states).toEqual([]);
    expect(successes).toEqual([]);
  });
});
