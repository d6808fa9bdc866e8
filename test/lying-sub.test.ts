/**
 * What the client does with server answers the protocol forbids (FIX14B), against a tiny
 * lying `ws` server on 127.0.0.1 (a real reference server cannot be made to lie):
 *
 * - a `SUB` answer whose entry for a channel is not an object, has a `seq` that is not an
 *   integer ≥ 0 (`"x"`, `-5`, `1e300`) or a `snapshot` that is not `{ seq, data }` fails that
 *   channel only: `subscribe()` rejects `bad_response`, `failures$` gets `bad_frame`, the
 *   channel is not `subscribed` and its cursor is not moved, the `SUB` is asked again after
 *   the documented backoff (T, doubling, capped at `maxBackoff`: no tight loop), and the other
 *   channels of the same answer are served (docs/PROTOCOL.md §2 "SUB answers");
 * - a response with the wrong number of results and a bad frame inside an HTTP `200` reply
 *   are reported on `failures$` as `bad_frame` (PROTOCOL §4);
 * - an unknown refusal code in a `SUB` entry is `server_error`, as in a `NAK`;
 * - `subscribe()` before the socket opens sends one `SUB` (a real reference server counts).
 */
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { WebSocket } from 'ws';
import {
  type ChannelMessage,
  createSyncClient,
  type Failure,
  type SyncClient,
  type SyncClientOptions,
  SyncError,
} from '../src/client/index.js';
import { type Rig, rig, until } from './helpers/harness.js';
import { type Envelope, honest, type LyingServer, startLyingServer } from './helpers/lying-server.js';

const j = (v: unknown) => JSON.stringify(v);
let n = 0;
const clientId = (s: string) => `${s}-${process.pid}-${++n}`;
const T = 150;
const MAX_BACKOFF = 600;

/** A SUB answer giving `entry` for `bad` and an honest entry for every other channel named. */
const subAnswer = (env: Envelope, entries: Record<string, unknown>) => {
  const names = Object.keys((env.payload as { channels: Record<string, unknown> }).channels);
  return {
    id: env.id,
    type: 'SYN',
    payload: [
      {
        channels: Object.fromEntries(
          names.map((name) => [
            name,
            name in entries ? entries[name] : { epoch: 'e1', seq: 0, recovered: true },
          ]),
        ),
      },
    ],
  };
};

const LIES: Array<[string, unknown]> = [
  ['an entry that is a number (5)', 5],
  ['seq "x"', { epoch: 'e1', seq: 'x', recovered: true }],
  ['seq -5', { epoch: 'e1', seq: -5, recovered: true }],
  ['seq 1e300', { epoch: 'e1', seq: 1e300, recovered: true }],
  ['snapshot 7', { epoch: 'e1', seq: 3, recovered: true, snapshot: 7 }],
];

describe('a lying SUB answer is refused, channel by channel', () => {
  let liar: LyingServer;
  let c: SyncClient;
  let failures: Failure[];
  let messages: ChannelMessage[];
  /** When each SUB naming `ch` reached the lying server (performance.now()). */
  let subsAt: number[];
  const make = (opts: Partial<SyncClientOptions> = {}) => {
    c = createSyncClient({
      url: liar.wsUrl,
      clientId: clientId('lying-sub'),
      timeout: T,
      maxBackoff: MAX_BACKOFF,
      WebSocket: WebSocket as never,
      ...opts,
    });
    failures = [];
    messages = [];
    c.failures$.subscribe((f) => failures.push(f));
    c.messages$.subscribe((m) => messages.push(m));
    return c;
  };
  const badFrames = () => failures.filter((f) => f.kind === 'bad_frame').map((f) => f.reason ?? '');
  /** The lying server answers SUBs naming `ch` with `lie` while `lying()` is true. */
  const lieAbout = (lie: unknown, lying: () => boolean = () => true) => {
    liar.onFrame = (env, reply) => {
      if (env.type === 'SUB') {
        const names = Object.keys((env.payload as { channels: object }).channels);
        if (names.includes('ch')) subsAt.push(performance.now());
        reply({ id: env.id, type: 'ACK' });
        reply(subAnswer(env, lying() ? { ch: lie } : {}));
        return;
      }
      for (const f of honest(env)) reply(f);
    };
  };
  beforeAll(async () => {
    liar = await startLyingServer();
  });
  afterEach(async () => {
    await c?.close();
    liar.reset();
    subsAt = [];
  });
  afterAll(async () => {
    await liar?.close();
  });
  subsAt = [];

  for (const [name, lie] of LIES) {
    it(`${name}: subscribe() rejects bad_response, bad_frame reported, not subscribed, cursor untouched, re-SUB only after the backoff`, async () => {
      lieAbout(lie);
      make();
      await until(() => c.state === 'open', 5000, 'open');
      const err = await c.subscribe('ch').catch((e: unknown) => e);
      expect(err).toBeInstanceOf(SyncError);
      expect((err as SyncError).code).toBe('bad_response');
      expect(badFrames().some((r) => r.includes('SUB answer entry for ch'))).toBe(true);
      expect(c.subscriptionState('ch')).toBe('subscribing');
      expect(c.cursors().ch?.seq).toBeUndefined();
      // Asked again, but after T, then 2T, then 4T (capped at maxBackoff): four SUBs, not a loop.
      await until(() => subsAt.length >= 4, 5000, 'three re-SUBs');
      const gaps = subsAt.slice(1, 4).map((at, i) => at - subsAt[i]!);
      // Lower bounds only (a loaded machine makes them longer): 0.8 × T, 2T, 4T.
      expect(gaps[0]).toBeGreaterThanOrEqual(0.8 * T);
      expect(gaps[1]).toBeGreaterThanOrEqual(0.8 * 2 * T);
      expect(gaps[2]).toBeGreaterThanOrEqual(0.8 * Math.min(MAX_BACKOFF, 4 * T));
      expect(c.subscriptionState('ch')).toBe('subscribing');
      expect(c.cursors().ch?.seq).toBeUndefined();
      // Still a working client: a send goes through.
      expect(await c.send({ n: 1 })).toEqual({ ok: { n: 1 } });
    });
  }

  for (const [name, lie] of [
    ['seq -5', { epoch: 'e1', seq: -5, recovered: true }],
    ['seq 1e300', { epoch: 'e1', seq: 1e300, recovered: true }],
  ] as const) {
    it(`${name} once, then an honest answer: live messages 1-3 are delivered (no garbage cursor kept)`, async () => {
      let lies = 1;
      lieAbout(lie, () => lies-- > 0);
      make();
      await until(() => c.state === 'open', 5000, 'open');
      await expect(c.subscribe('ch')).rejects.toMatchObject({ code: 'bad_response' });
      await until(() => c.subscriptionState('ch') === 'subscribed', 5000, 'subscribed after the retry');
      expect(c.cursors().ch).toEqual({ epoch: 'e1', seq: 0 });
      for (let seq = 1; seq <= 3; seq++)
        liar.push({ id: `m${seq}`, type: 'MSG', channel: 'ch', seq, epoch: 'e1', payload: { seq } });
      await until(() => messages.length >= 3, 5000, 'three messages');
      expect(messages.map((m) => m.seq)).toEqual([1, 2, 3]);
      expect(c.cursors().ch).toEqual({ epoch: 'e1', seq: 3 });
      // One SUB from subscribe(), one retry: nothing more while the answers are good.
      expect(subsAt.length).toBe(2);
    });
  }

  it('the other channels of the same answer are served', async () => {
    lieAbout({ epoch: 'e1', seq: -5, recovered: true });
    make({ channels: { good: {}, ch: {} } });
    await until(() => c.subscriptionState('good') === 'subscribed', 5000, 'good subscribed');
    await until(() => badFrames().length > 0, 5000, 'bad_frame');
    expect(badFrames().every((r) => r.includes('entry for ch'))).toBe(true);
    expect(c.subscriptionState('ch')).toBe('subscribing');
    expect(c.cursors()).toEqual({ good: { epoch: 'e1', seq: 0 }, ch: { epoch: undefined, seq: undefined } });
    liar.push({ id: 'g1', type: 'MSG', channel: 'good', seq: 1, epoch: 'e1', payload: { g: 1 } });
    await until(() => messages.length >= 1, 5000, 'message on good');
    expect(messages.map((m) => [m.channel, m.seq])).toEqual([['good', 1]]);
  });

  it('an unknown refusal code in a SUB entry is server_error (as in a NAK): the channel is refused', async () => {
    lieAbout({ error: { code: 'weird', message: 'm' } });
    make();
    await until(() => c.state === 'open', 5000, 'open');
    const err = (await c.subscribe('ch').catch((e: unknown) => e)) as SyncError;
    expect(err).toBeInstanceOf(SyncError);
    expect(err.code).toBe('server_error');
    expect(err.message).toContain('unknown code weird');
    expect(c.subscriptionState('ch')).toBe('refused');
  });

  it('a NAK with an unknown code: server_error, its code named in the message', async () => {
    make();
    await until(() => c.state === 'open', 5000, 'open');
    liar.onFrame = (env, reply) => {
      if (env.type !== 'SYN') return honest(env).forEach(reply);
      reply({ id: env.id, type: 'ACK' });
      reply({ id: env.id, type: 'NAK', error: { code: 'weird', message: 'm' } });
    };
    const err = (await c.send({ n: 1 }).catch((e: unknown) => e)) as SyncError;
    expect(err.code).toBe('server_error');
    expect(err.message).toContain('unknown code weird');
  });

  it('a response with the wrong number of results: bad_response for the batch and bad_frame on failures$', async () => {
    make();
    await until(() => c.state === 'open', 5000, 'open');
    liar.onFrame = (env, reply) => {
      if (env.type !== 'SYN') return honest(env).forEach(reply);
      reply({ id: env.id, type: 'ACK' });
      reply({ id: env.id, type: 'SYN', payload: [] });
    };
    await expect(c.send({ n: 1 })).rejects.toMatchObject({ code: 'bad_response' });
    expect(badFrames()).toEqual(['server answered 0 results for 1 operations']);
  });

  it('a bad frame inside an HTTP 200 reply is skipped and reported as bad_frame; the batch still settles', async () => {
    make({ pollInterval: 60_000 });
    await until(() => c.state === 'open', 5000, 'open');
    liar.onFrame = () => {}; // the socket stops answering: the request moves to HTTP
    liar.onHttp = (env) =>
      env.type === 'SYN'
        ? {
            status: 200,
            body: j([
              { id: env.id, type: 'ACK' },
              { id: env.id, type: 'SYN', payload: 'nope' },
              ...honest(env).slice(1),
            ]),
          }
        : { status: 200, body: j(honest(env)) };
    expect(await c.send({ n: 'http' })).toEqual({ ok: { n: 'http' } });
    expect(liar.posted.some((e) => e.type === 'SYN')).toBe(true);
    expect(badFrames()).toEqual(['bad_request: response SYN payload must be an array']);
  });
});

describe('subscribe() before the socket opens (a real reference server)', () => {
  let r: Rig | undefined;
  afterEach(async () => {
    await r?.close();
    r = undefined;
  });

  it('sends one SUB per channel, not a second one from the cursor when the socket opens', async () => {
    r = await rig();
    const seen: number[] = [];
    const c = r.client({ clientId: clientId('one-sub') });
    c.messages$.subscribe((m) => seen.push(m.seq));
    const from = r.proxy.traffic.length;
    expect(c.state).toBe('connecting');
    await c.subscribe('board');
    expect(c.subscriptionState('board')).toBe('subscribed');
    const subs = () => r!.proxy.traffic.slice(from).filter((t) => t.dir === 'up' && t.frame.type === 'SUB');
    // The channels option too: its SUB is queued before the socket opens.
    const c2 = r.client({ clientId: clientId('one-sub-opt'), channels: { board: {} } });
    await until(() => c2.subscriptionState('board') === 'subscribed', 5000, 'c2 subscribed');
    expect(subs().length).toBe(2);
    // The subscription is live: a publication reaches it.
    r.server.publish('board', { changes: [1] });
    await until(() => seen.length === 1, 5000, 'live message');
    expect(seen).toEqual([1]);
    // A reconnect still re-subscribes (a new socket carries no subscriptions).
    const before = subs().length;
    c.debug.killSocket();
    await until(
      () => subs().length > before && c.subscriptionState('board') === 'subscribed',
      5000,
      'resubscribed',
    );
    r.server.publish('board', { changes: [2] });
    await until(() => seen.length === 2, 5000, 'live message after the reconnect');
    expect(seen).toEqual([1, 2]);
  });
});
