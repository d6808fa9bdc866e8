/**
 * The read-your-writes wait is bounded by protocol facts (docs/consistency.md "bound of the
 * wait"). A lying or buggy server (a tiny lying server on 127.0.0.1, since a real one cannot
 * be made to lie) names in a response's `published` a seq it never delivers: far ahead of its
 * head, or in another epoch. The client asks again (a re-SUB on the socket, a poll over HTTP),
 * and when the answer shows the server does not have that publication it stops waiting,
 * resolves the send with its result and reports a `bad_frame` failure; later sends are not
 * stuck behind it. An honest server whose MSG comes after the response still gets
 * read-your-writes (the re-SUB replays it), and a refused re-SUB ends the wait too.
 */
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { WebSocket } from 'ws';
import { type ChannelMessage, createSyncClient, type Failure, type SyncClient } from '../src/client/index.js';
import { until } from './helpers/harness.js';
import { type Envelope, honest, type LyingServer, startLyingServer } from './helpers/lying-server.js';

const j = (v: unknown) => JSON.stringify(v);
let n = 0;
const clientId = (s: string) => `${s}-${process.pid}-${++n}`;

/** The response to a SYN, naming `published`. */
const answer = (env: Envelope, published: unknown) => ({
  id: env.id,
  type: 'SYN',
  payload: (env.payload as unknown[]).map((op) => ({ ok: op })),
  published,
});

describe('read-your-writes wait: bounded by what the server answers', () => {
  let liar: LyingServer;
  let c: SyncClient;
  let failures: Failure[];
  let messages: ChannelMessage[];
  const make = (opts: { pollInterval?: number } = {}) => {
    c = createSyncClient({
      url: liar.wsUrl,
      clientId: clientId('rwy'),
      timeout: 150,
      maxBackoff: 600,
      WebSocket: WebSocket as never,
      ...opts,
    });
    failures = [];
    messages = [];
    c.failures$.subscribe((f) => failures.push(f));
    c.messages$.subscribe((m) => messages.push(m));
    return c;
  };
  beforeAll(async () => {
    liar = await startLyingServer();
  });
  afterEach(async () => {
    await c?.close();
    liar.reset();
  });
  afterAll(async () => {
    await liar?.close();
  });
  const openSubscribed = async () => {
    make();
    await until(() => c.state === 'open', 5000, 'open');
    expect(await c.subscribe('list')).toEqual({ epoch: 'e1', seq: 0, recovered: true });
  };
  const badFrames = () => failures.filter((f) => f.kind === 'bad_frame').map((f) => f.reason ?? '');

  it('a published seq far beyond the head (socket): the send resolves after a re-SUB, bad_frame reported, later sends go on', async () => {
    await openSubscribed();
    liar.onFrame = (env, reply) => {
      if (env.type !== 'SYN') return honest(env).forEach(reply);
      reply({ id: env.id, type: 'ACK' });
      reply(answer(env, [{ channel: 'list', seq: 1_000_000, epoch: 'e1' }]));
    };
    const subsBefore = liar.received.filter((e) => e.type === 'SUB').length;
    await expect(c.send({ n: 1 })).resolves.toEqual({ ok: { n: 1 } });
    // The wait ended on the server's answer to a re-SUB, not on a timer.
    expect(liar.received.filter((e) => e.type === 'SUB').length).toBeGreaterThan(subsBefore);
    expect(badFrames().some((r) => r.includes('list#1000000') && r.includes('head is 0'))).toBe(true);
    await expect(c.send({ n: 2 })).resolves.toEqual({ ok: { n: 2 } });
    await expect(c.send({ n: 3 })).resolves.toEqual({ ok: { n: 3 } });
    expect(c.pending).toBe(0);
    expect(c.cursors()).toEqual({ list: { epoch: 'e1', seq: 0 } });
  });

  it('a publication in another epoch than the channel (no reset): the send resolves, bad_frame reported', async () => {
    await openSubscribed();
    liar.onFrame = (env, reply) => {
      if (env.type !== 'SYN') return honest(env).forEach(reply);
      reply({ id: env.id, type: 'ACK' });
      reply(answer(env, [{ channel: 'list', seq: 1, epoch: 'e-other' }]));
    };
    await expect(c.send({ n: 1 })).resolves.toEqual({ ok: { n: 1 } });
    expect(badFrames().some((r) => r.includes('epoch e-other') && r.includes('epoch e1'))).toBe(true);
    await expect(c.send({ n: 2 })).resolves.toEqual({ ok: { n: 2 } });
    expect(c.pending).toBe(0);
  });

  it('over HTTP (the SYN is never ACKed on the socket): the poll answers it, the send resolves, bad_frame reported', async () => {
    await openSubscribed();
    liar.onFrame = (env, reply) => {
      if (env.type === 'SYN') return; // never ACKed: resent over HTTP after T
      honest(env).forEach(reply);
    };
    liar.onHttp = (env) =>
      env.type === 'SYN'
        ? {
            status: 200,
            body: j([{ id: env.id, type: 'ACK' }, answer(env, [{ channel: 'list', seq: 77, epoch: 'e1' }])]),
          }
        : { status: 200, body: j(honest(env)) };
    const subsBefore = liar.received.filter((e) => e.type === 'SUB').length;
    await expect(c.send({ n: 1 })).resolves.toEqual({ ok: { n: 1 } });
    // The re-SUB that ends the wait goes over HTTP while degraded, or over the socket when
    // the client's re-ping has brought it back to open first (a race a loaded machine shows).
    const resubscribed =
      liar.posted.some((e) => e.type === 'SUB') ||
      liar.received.filter((e) => e.type === 'SUB').length > subsBefore;
    expect(resubscribed).toBe(true);
    expect(badFrames().some((r) => r.includes('list#77'))).toBe(true);
  });

  it('an honest server whose own MSG comes after the response: the re-SUB replays it; read-your-writes, no failure', async () => {
    await openSubscribed();
    const change = { changes: [{ id: 'a', value: 1 }] };
    let synced = false;
    liar.onFrame = (env, reply) => {
      if (env.type === 'SYN') {
        reply({ id: env.id, type: 'ACK' });
        reply(answer(env, [{ channel: 'list', seq: 1, epoch: 'e1' }]));
        synced = true;
        return;
      }
      if (env.type === 'SUB' && synced) {
        // The re-SUB from the cursor (since 0, epoch e1): replay seq 1, then the answer.
        expect((env.payload as { channels: Record<string, unknown> }).channels).toEqual({
          list: { since: 0, epoch: 'e1' },
        });
        reply({ id: env.id, type: 'ACK' });
        reply({
          type: 'MSG',
          id: 'm1',
          channel: 'list',
          seq: 1,
          epoch: 'e1',
          payload: change,
          replay: true,
          echo: true,
        });
        reply({
          id: env.id,
          type: 'SYN',
          payload: [{ channels: { list: { epoch: 'e1', seq: 1, recovered: true } } }],
        });
        return;
      }
      honest(env).forEach(reply);
    };
    await expect(c.send({ n: 1 })).resolves.toEqual({ ok: { n: 1 } });
    // Resolved only once its own change was delivered.
    expect(messages.map((m) => [m.seq, m.echo])).toEqual([[1, true]]);
    expect(c.cursors()).toEqual({ list: { epoch: 'e1', seq: 1 } });
    expect(badFrames()).toEqual([]);
  });

  it('a re-SUB answer that does not name the channel ends the wait (no SUB loop), bad_frame reported', async () => {
    await openSubscribed();
    liar.onFrame = (env, reply) => {
      if (env.type === 'SYN') {
        reply({ id: env.id, type: 'ACK' });
        reply(answer(env, [{ channel: 'list', seq: 3, epoch: 'e1' }]));
        return;
      }
      if (env.type === 'SUB') {
        reply({ id: env.id, type: 'ACK' });
        reply({ id: env.id, type: 'SYN', payload: [{ channels: {} }] });
        return;
      }
      honest(env).forEach(reply);
    };
    const subsBefore = liar.received.filter((e) => e.type === 'SUB').length;
    await expect(c.send({ n: 1 })).resolves.toEqual({ ok: { n: 1 } });
    expect(badFrames().some((r) => r.includes('does not name the channel'))).toBe(true);
    // One re-SUB asked, not a loop of them.
    expect(liar.received.filter((e) => e.type === 'SUB').length - subsBefore).toBe(1);
  });

  it('a re-SUB refused (NAK forbidden) while waiting: the send resolves with its result', async () => {
    await openSubscribed();
    liar.onFrame = (env, reply) => {
      if (env.type === 'SYN') {
        reply({ id: env.id, type: 'ACK' });
        reply(answer(env, [{ channel: 'list', seq: 5, epoch: 'e1' }]));
        return;
      }
      if (env.type === 'SUB') {
        reply({ id: env.id, type: 'ACK' });
        reply({ id: env.id, type: 'NAK', error: { code: 'forbidden', message: 'no longer allowed' } });
        return;
      }
      honest(env).forEach(reply);
    };
    await expect(c.send({ n: 1 })).resolves.toEqual({ ok: { n: 1 } });
    await expect(c.send({ n: 2 })).resolves.toEqual({ ok: { n: 2 } });
    expect(c.pending).toBe(0);
  });
});
