/**
 * The client's per-operation fast path, against a real `ws` server on 127.0.0.1
 * (test/helpers/lying-server.ts).
 * (1) The socket transport folds an ACK into its own response when both arrive in one
 * synchronous run of frames (one TCP write from a server that corks them; the helper corks its
 * socket while it replies, so the frames really share one write): the response alone goes
 * through the chart (awaitingAck → open), one macrostep fewer per round trip. An ACK that
 * arrives alone, or that is followed by anything but its response, reaches the chart as before
 * and in order.
 * (2) An operation is turned into JSON once, in send(), and that text is what its SYN carries.
 */
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { WebSocket } from 'ws';
import { type ConnectionState, createSyncClient, type SyncClient } from '../src/client/index.js';
import { next, reach } from './helpers/harness.js';
import { honest, type LyingServer, startLyingServer } from './helpers/lying-server.js';

let liar: LyingServer;
let c: SyncClient;
let states: ConnectionState[];

beforeEach(async () => {
  liar = await startLyingServer();
  c = createSyncClient({
    url: liar.wsUrl,
    clientId: `ack-${Math.random().toString(36).slice(2)}`,
    timeout: 2000,
    WebSocket: WebSocket as never,
  });
  states = [];
  c.state$.subscribe((s) => states.push(s));
  await reach(c, 'open');
});

afterEach(async () => {
  await c.close();
  await liar.close();
});

/** The states seen from the SYN going out to the client being open again. */
const roundTrip = () => states.slice(states.lastIndexOf('awaitingAck'));

describe('ACK and response in one write', () => {
  it('the response alone settles the send: awaitingAck → open, no awaitingSyn', async () => {
    liar.cork = true;
    const results: unknown[] = [];
    for (let i = 0; i < 5; i++) {
      states = [];
      results.push(await c.send({ i }));
      await reach(c, 'open');
      expect(roundTrip()).toEqual(['awaitingAck', 'open']);
    }
    expect(results).toEqual([0, 1, 2, 3, 4].map((i) => ({ ok: { i } })));
  });

  it('an ACK alone (its response in a later write) moves to awaitingSyn as before', async () => {
    let pending: unknown[] = [];
    liar.onFrame = (env, reply) => {
      const [ack, ...rest] = honest(env);
      reply(ack);
      pending = rest;
    };
    const p = c.send({ alone: true });
    await reach(c, 'awaitingSyn');
    for (const f of pending) liar.push(f);
    expect(await p).toEqual({ ok: { alone: true } });
    await reach(c, 'open');
    expect(roundTrip()).toEqual(['awaitingAck', 'awaitingSyn', 'open']);
  });

  it('an ACK and a NAK for the same request in one write reject the send with its code', async () => {
    liar.cork = true;
    liar.onFrame = (env, reply) => {
      reply({ id: env.id, type: 'ACK' });
      reply({ id: env.id, type: 'NAK', error: { code: 'forbidden', message: 'no' } });
    };
    await expect(c.send({ refused: true })).rejects.toMatchObject({ code: 'forbidden' });
    await reach(c, 'open');
    expect(roundTrip()).toEqual(['awaitingAck', 'open']);
  });

  it('an ACK followed in the same write by another request’s frame is delivered first, in order', async () => {
    liar.cork = true;
    // ACK, then a MSG-less oddity the chart reports (a NAK without id: bad_frame), then the
    // response: the ACK must reach the chart before the NAK (awaitingSyn seen), nothing lost.
    liar.onFrame = (env, reply) => {
      reply({ id: env.id, type: 'ACK' });
      reply({ id: null, type: 'NAK', error: { code: 'bad_request', message: 'odd' } });
      reply({ id: env.id, type: 'SYN', payload: [{ ok: 'late' }] });
    };
    const failure = next(c.failures$, (f) => f.kind === 'bad_frame');
    expect(await c.send({ x: 1 })).toEqual({ ok: 'late' });
    expect((await failure).state).toBe('awaitingSyn');
    await reach(c, 'open');
    expect(roundTrip()).toEqual(['awaitingAck', 'awaitingSyn', 'open']);
  });
});

describe('an operation is serialized once, in send()', () => {
  it('the SYN carries the operation as it was when send() was called, whatever the app changes after', async () => {
    const op = { n: 1, tags: ['a'] };
    const p = c.send(op);
    op.n = 2;
    op.tags.push('b');
    expect(await p).toEqual({ ok: { n: 1, tags: ['a'] } });
    const syn = liar.received.filter((e) => e.type === 'SYN').at(-1)!;
    expect(syn.payload).toEqual([{ n: 1, tags: ['a'] }]);
  });

  it('a batch of several operations is one well-formed SYN with each one’s JSON, in order', async () => {
    const ops = [{ a: 1 }, 'text', 3, null, [true, { nested: 'x"y' }]];
    const results = await Promise.all(ops.map((o) => c.send(o)));
    expect(results).toEqual(ops.map((o) => ({ ok: o })));
    const sent = liar.received.filter((e) => e.type === 'SYN').flatMap((e) => e.payload as unknown[]);
    expect(sent).toEqual(ops);
  });
});
