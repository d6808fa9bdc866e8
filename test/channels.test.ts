/**
 * Channels as first-class state (issue 11), against a real server on loopback: per-channel
 * refusals, revocation (`server.recheck`, `server.unsubscribe`, `server.disconnect`), the
 * per-principal cap, every promise settling after `close()`, and channel housekeeping that
 * frees what 100,000 abandoned channel names left in the memory and SQLite stores.
 */

import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { afterEach, describe, expect, it } from 'vitest';
import type { ChannelMessage, RefusedEvent, SyncClient } from '../src/client/index.js';
import type { HistoryStore, SyncServer } from '../src/server/index.js';
import { memoryStore } from '../src/stores/memory.js';
import { sqliteStore } from '../src/stores/sqlite.js';
import { next, type Rig, reach, rig, until } from './helpers/harness.js';
import { harness, httpUrl, is, post } from './helpers/raw.js';

let r: Rig | undefined;
const dirs: string[] = [];
afterEach(async () => {
  await r?.close();
  r = undefined;
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});
const tmp = () => {
  const d = mkdtempSync(join(tmpdir(), 'syncwire-channels-'));
  dirs.push(d);
  return d;
};
const h = harness();

function record(c: SyncClient) {
  const msgs: ChannelMessage[] = [];
  const refused: RefusedEvent[] = [];
  c.messages$.subscribe((m) => msgs.push(m));
  c.refused$.subscribe((e) => refused.push(e));
  return { msgs, refused, seqs: (ch: string) => msgs.filter((m) => m.channel === ch).map((m) => m.seq) };
}

/**
 * SUB frames the client sent through the proxy after `from`, as lists of channel names; with
 * `via`, only those over that transport (a poll over HTTP may run while the socket redials).
 */
const subsSent = (rg: Rig, from = 0, via?: 'ws' | 'http') =>
  rg.proxy.traffic
    .slice(from)
    .filter((t) => t.dir === 'up' && t.frame.type === 'SUB' && (via === undefined || t.via === via))
    .map((t) => Object.keys((t.frame.payload as { channels: object }).channels).sort());

describe('refusals affect only the channel refused', () => {
  it('a subscribe() with a cursor the server would refuse rejects bad_request and registers nothing: the next reconnect still serves the other channels', async () => {
    r = await rig();
    const c = r.client();
    const rec = record(c);
    await c.subscribe('board-1');
    for (const opts of [{ since: -1 }, { rewind: 1.5 }, { epoch: 7 }, { snapshot: 'yes' }]) {
      await expect(c.subscribe('board-x', opts as never)).rejects.toMatchObject({ code: 'bad_request' });
    }
    expect(Object.keys(c.cursors())).toEqual(['board-1']);
    expect(() => r!.client({ channels: { 'board-y': { since: -1 } } })).toThrow(TypeError);
    const mark = r.proxy.traffic.length;
    expect(c.debug.killSocket()).toBe(true);
    await until(() => subsSent(r!, mark).length > 0 && c.state === 'open', 5000, 're-SUB after the drop');
    expect(subsSent(r, mark).every((names) => !names.includes('board-x'))).toBe(true);
    await r.server.publish('board-1', { n: 1 });
    await until(() => rec.seqs('board-1').length === 1, 5000, 'board-1 message after the drop');
    expect(rec.seqs('board-1')).toEqual([1]);
  });

  it('one refused channel does not silence the others: board-1 keeps receiving after board-2 is revoked and the socket drops', async () => {
    const allowed = new Set(['board-1', 'board-2', 'board-3']);
    r = await rig({ authorize: (_p, channel) => allowed.has(channel) });
    const c = r.client();
    const rec = record(c);
    await c.subscribe('board-1');
    await c.subscribe('board-2');
    expect(c.subscriptionState('board-2')).toBe('subscribed');
    allowed.delete('board-2');
    const mark = r.proxy.traffic.length;
    expect(c.debug.killSocket()).toBe(true);
    const refusal = await next(c.refused$, (e) => e.channel === 'board-2');
    expect(refusal).toEqual({ channel: 'board-2', code: 'forbidden', message: expect.any(String) });
    await until(() => c.subscriptionState('board-1') === 'subscribed', 5000, 'board-1 subscribed again');
    expect(c.subscriptionState('board-2')).toBe('refused');
    expect(await next(c.subscriptions$, (m) => m['board-1'] === 'subscribed')).toEqual({
      'board-1': 'subscribed',
      'board-2': 'refused',
    });
    await r.server.publish('board-1', { n: 1 });
    await r.server.publish('board-2', { n: 1 });
    await r.server.publish('board-1', { n: 2 });
    await until(() => rec.seqs('board-1').length === 2, 5000, 'board-1 messages');
    expect(rec.seqs('board-1')).toEqual([1, 2]);
    expect(rec.seqs('board-2')).toEqual([]);
    // The client stops asking for board-2: the next reconnect's SUB names board-1 only.
    const mark2 = r.proxy.traffic.length;
    c.debug.killSocket();
    await until(() => subsSent(r!, mark2, 'ws').length > 0, 5000, 'a re-SUB over the new socket');
    await c.subscribe('board-3');
    // The re-SUB over the new socket names board-1 alone; every SUB since (polls over HTTP
    // while the socket redialled, board-3's own, over whichever transport was up) leaves
    // board-2 out.
    expect(subsSent(r, mark2, 'ws')[0]).toEqual(['board-1']);
    const since = subsSent(r, mark2);
    expect(since.filter((names) => names.includes('board-2'))).toEqual([]);
    expect(since).toContainEqual(['board-3']);
    expect(subsSent(r, mark).every((names) => !names.includes('board-2') || names.includes('board-1'))).toBe(
      true,
    );
    expect(rec.refused).toHaveLength(1);
    await reach(c, 'open');
  });

  it('a SUB naming an allowed and a refused channel serves the allowed one (subscribe of each)', async () => {
    r = await rig({ authorize: (_p, channel) => channel !== 'secret' });
    const c = r.client({ channels: { public: {}, secret: {} } });
    const rec = record(c);
    await until(() => c.subscriptionState('public') === 'subscribed', 5000, 'public subscribed');
    await until(() => c.subscriptionState('secret') === 'refused', 5000, 'secret refused');
    expect(rec.refused.map((e) => [e.channel, e.code])).toEqual([['secret', 'forbidden']]);
    await r.server.publish('public', 'x');
    await until(() => rec.seqs('public').length === 1, 5000, 'public message');
  });

  it('concurrent subscribe() of a, b, c with b refused: b rejects forbidden, a and c resolve, and no SUB naming no channel goes on the wire', async () => {
    r = await rig({ authorize: (_p, channel) => channel !== 'b' });
    const c = r.client();
    const rec = record(c);
    // Issued before the socket is open: its first SUB names a, b and c, and b's own SUB
    // still waits in the outbox when that answer refuses b.
    const results = await Promise.allSettled(['a', 'b', 'c'].map((ch) => c.subscribe(ch)));
    expect(results.map((x) => x.status)).toEqual(['fulfilled', 'rejected', 'fulfilled']);
    expect((results[1] as PromiseRejectedResult).reason).toMatchObject({
      name: 'SyncError',
      code: 'forbidden',
    });
    expect(c.subscriptionState('b')).toBe('refused');
    expect(rec.refused.map((e) => [e.channel, e.code])).toEqual([['b', 'forbidden']]);
    const subs = subsSent(r);
    expect(subs.some((names) => names.length === 0)).toBe(false);
    expect(subs.filter((names) => names.includes('b'))).toHaveLength(1);
    const naks = r.proxy.traffic.filter((t) => t.dir === 'down' && t.frame.type === 'NAK');
    expect(naks).toEqual([]);
  });

  it('subscribe() then unsubscribe() of the same channel before the SUB goes out: subscribe rejects closed and no empty SUB is sent', async () => {
    r = await rig();
    const c = r.client();
    const sub = c.subscribe('x');
    const uns = c.unsubscribe('x');
    await expect(sub).rejects.toMatchObject({ name: 'SyncError', code: 'closed' });
    await expect(uns).resolves.toBeUndefined();
    expect(subsSent(r).some((names) => names.length === 0)).toBe(false);
    expect(r.proxy.traffic.filter((t) => t.dir === 'down' && t.frame.type === 'NAK')).toEqual([]);
    expect(c.subscriptionState('x')).toBe('unsubscribed');
    await expect(c.subscribe('y')).resolves.toMatchObject({ seq: 0 });
  });

  it('the per-principal cap refuses the channels beyond it with too_many_channels', async () => {
    r = await rig({ maxChannelsPerPrincipal: 2 });
    const c = r.client();
    await c.subscribe('a');
    await c.subscribe('b');
    await expect(c.subscribe('c')).rejects.toMatchObject({ name: 'SyncError', code: 'too_many_channels' });
    expect(c.subscriptionState('c')).toBe('refused');
    await c.unsubscribe('a');
    await expect(c.subscribe('c')).resolves.toMatchObject({ seq: 0 });
    expect(c.subscriptionState('c')).toBe('subscribed');
  });
});

describe('channel names that are keys of Object.prototype are channels like any', () => {
  // Every name isValidChannel accepts works: `__proto__` on a plain object sets the prototype
  // instead of a key, `toString` reads Object.prototype when absent.
  const NAMES = ['__proto__', 'constructor', 'prototype', 'toString', 'hasOwnProperty'];
  /** `{ name: {} }` for each name, as own keys (an object literal `{ __proto__: … }` would not be). */
  const subPayload = (cursor = '{}') =>
    JSON.parse(`{"channels":{${NAMES.map((n) => `"${n}":${cursor}`).join(',')}}}`);

  it('raw socket: a SUB naming them is answered for each, and each one receives its MSGs', async () => {
    const server = await h.start({ authorize: (_p, channel) => channel !== 'toString' });
    const sock = await h.socket(server);
    const frames = await sock.request({ id: 's1', type: 'SUB', payload: subPayload() });
    const syn = frames.at(-1);
    expect(syn.type).toBe('SYN');
    const answer = syn.payload[0].channels;
    expect(Object.keys(answer)).toEqual(NAMES);
    for (const n of NAMES) {
      if (n === 'toString')
        expect(answer[n]).toEqual({ error: { code: 'forbidden', message: expect.any(String) } });
      else expect(answer[n]).toMatchObject({ seq: 0, recovered: true });
    }
    expect(server.stats().channels).toBe(NAMES.length - 1);
    for (const n of NAMES) await server.publish(n, n);
    sock.send({ id: 'p1', type: 'PNG' });
    const rest = await sock.until(is.ack('p1'));
    expect(rest.filter((f) => f.type === 'MSG').map((f) => [f.channel, f.seq])).toEqual(
      NAMES.filter((n) => n !== 'toString').map((n) => [n, 1]),
    );
  });

  it('HTTP: a SUB naming them is answered for each with its replay', async () => {
    const server = await h.start();
    for (const n of NAMES) await server.publish(n, n);
    const reply = await post(httpUrl(server), 'c-http-proto', {
      id: 'h1',
      type: 'SUB',
      payload: subPayload('{"since":0}'),
    });
    expect(reply.status).toBe(200);
    const frames = reply.body as Array<{
      type: string;
      channel?: string;
      payload?: Array<{ channels: object }>;
    }>;
    const syn = frames.find((f) => f.type === 'SYN');
    expect(Object.keys(syn?.payload?.[0]?.channels ?? {})).toEqual(NAMES);
    expect(frames.filter((f) => f.type === 'MSG').map((f) => f.channel)).toEqual(NAMES);
  });

  it('client: subscribe() to each resolves, the state is subscribed, MSGs arrive, cursors and subscriptions$ name them', async () => {
    r = await rig();
    const c = r.client();
    const rec = record(c);
    let states: Record<string, string> = {};
    c.subscriptions$.subscribe((x) => {
      states = x;
    });
    for (const n of NAMES) await expect(c.subscribe(n)).resolves.toMatchObject({ seq: 0, recovered: true });
    for (const n of NAMES) expect(c.subscriptionState(n)).toBe('subscribed');
    expect(Object.keys(states).sort()).toEqual([...NAMES].sort());
    for (const n of NAMES) await r.server.publish(n, n);
    await until(() => rec.msgs.length === NAMES.length, 5000, 'one MSG per channel');
    expect(rec.msgs.map((m) => m.channel).sort()).toEqual([...NAMES].sort());
    const cursors = c.cursors();
    for (const n of NAMES) expect(Object.hasOwn(cursors, n) && cursors[n]?.seq).toBe(1);
    // A reconnect re-SUBs every one of them from its cursor: nothing is delivered twice.
    const from = r.proxy.traffic.length;
    r.proxy.kill();
    await until(() => subsSent(r!, from).some((names) => names.length === NAMES.length), 5000, 're-SUB');
    for (const n of NAMES) await r.server.publish(n, `${n}-2`);
    await until(() => rec.msgs.length === 2 * NAMES.length, 5000, 'second MSG per channel');
    for (const n of NAMES) expect(rec.seqs(n)).toEqual([1, 2]);
    expect(rec.refused).toEqual([]);
  });
});

describe('every promise settles', () => {
  it('unsubscribe after close settles', async () => {
    r = await rig();
    const c = r.client();
    await c.subscribe('board-1');
    await c.close();
    await expect(c.unsubscribe('board-1')).resolves.toBeUndefined();
    await expect(c.unsubscribe('never')).resolves.toBeUndefined();
    await expect(c.subscribe('board-2')).rejects.toMatchObject({ code: 'closed' });
    expect(c.subscriptionState('board-1')).toBe('unsubscribed');
  });

  it('unsubscribe and subscribe in flight at close() settle', async () => {
    r = await rig();
    const c = r.client();
    await c.subscribe('board-1');
    r.ledger.gate = new Promise(() => {}); // the server never answers the SYN: the lane is held
    const sent = c.send({ id: 'x' });
    const sub = c.subscribe('board-2');
    const uns = c.unsubscribe('board-1');
    await c.close();
    await expect(sent).rejects.toMatchObject({ code: 'closed' });
    await expect(sub).rejects.toMatchObject({ code: 'closed' });
    await expect(uns).rejects.toMatchObject({ code: 'closed' });
    r.ledger.gate = null;
  });
});

describe('revocation', () => {
  it('a SUB naming more channels than the cap is refused whole before any authorize call or store look-up (socket and HTTP)', async () => {
    let asked = 0;
    const store = memoryStore();
    const server = await h.start({
      store,
      maxChannelsPerPrincipal: 5,
      authorize: () => {
        asked++;
        return true;
      },
    });
    const many = Object.fromEntries(Array.from({ length: 6 }, (_, i) => [`c-${i}`, {}]));
    const sock = await h.socket(server);
    const frames = await sock.request({ id: 's1', type: 'SUB', payload: { channels: many } });
    expect(frames.at(-1)).toMatchObject({ type: 'NAK', id: 's1', error: { code: 'too_many_channels' } });
    const reply = await post(httpUrl(server), 'c-http', {
      id: 's2',
      type: 'SUB',
      payload: { channels: many },
    });
    expect(reply.body.at(-1)).toMatchObject({ type: 'NAK', id: 's2', error: { code: 'too_many_channels' } });
    expect(asked).toBe(0);
    expect(await store.channelCount?.()).toBe(0);
    // At the cap it is served, and the socket is still usable.
    const five = Object.fromEntries(Array.from({ length: 5 }, (_, i) => [`c-${i}`, {}]));
    const ok = await sock.request({ id: 's3', type: 'SUB', payload: { channels: five } });
    expect(Object.keys(ok.at(-1).payload[0].channels)).toHaveLength(5);
    expect(asked).toBe(5);
  });

  it('a refused re-SUB ends the live subscription (raw socket)', async () => {
    const allowed = new Set(['doc']);
    const server = await h.start({ authorize: (_p, channel) => allowed.has(channel) });
    const sock = await h.socket(server);
    const first = await sock.request({ id: 's1', type: 'SUB', payload: { channels: { doc: {} } } });
    expect(first.at(-1).payload[0].channels.doc).toMatchObject({ seq: 0, recovered: true });
    expect(server.stats().channels).toBe(1);
    allowed.delete('doc');
    const again = await sock.request({ id: 's2', type: 'SUB', payload: { channels: { doc: {} } } });
    expect(again.at(-1).payload[0].channels.doc).toEqual({
      error: { code: 'forbidden', message: expect.any(String) },
    });
    expect(server.stats().channels).toBe(0);
    await server.publish('doc', 'after');
    sock.send({ id: 'p1', type: 'PNG' });
    const rest = await sock.until(is.ack('p1'));
    expect(rest.filter((f) => f.type === 'MSG')).toEqual([]);
  });

  it('server.recheck() ends refused subscriptions: a server UNS, a typed refusal, the others go on', async () => {
    const allowed = new Set(['board-1', 'board-2']);
    r = await rig({ authorize: (_p, channel) => allowed.has(channel) });
    const c = r.client();
    const rec = record(c);
    await c.subscribe('board-1');
    await c.subscribe('board-2');
    allowed.delete('board-2');
    expect(await r.server.recheck()).toBe(1);
    expect(await next(c.refused$)).toEqual({
      channel: 'board-2',
      code: 'forbidden',
      message: expect.any(String),
    });
    expect(r.server.stats().channels).toBe(1);
    expect(c.subscriptionState('board-2')).toBe('refused');
    await r.server.publish('board-2', 'no');
    await r.server.publish('board-1', 'yes');
    await until(() => rec.seqs('board-1').length === 1, 5000, 'board-1 message');
    expect(rec.seqs('board-2')).toEqual([]);
    // Allowed again: the app may subscribe again.
    allowed.add('board-2');
    await expect(c.subscribe('board-2')).resolves.toMatchObject({ seq: 1 });
    expect(c.subscriptionState('board-2')).toBe('subscribed');
  });

  it('server.unsubscribe({ channel, clientId }) ends one client subscription; the client hears code unsubscribed', async () => {
    r = await rig();
    const a = r.client();
    const b = r.client();
    const recA = record(a);
    const recB = record(b);
    await a.subscribe('room');
    await b.subscribe('room');
    expect(await r.server.unsubscribe({ channel: 'room', clientId: a.clientId })).toBe(1);
    expect(await next(a.refused$)).toMatchObject({ channel: 'room', code: 'unsubscribed' });
    expect(a.subscriptionState('room')).toBe('unsubscribed');
    await r.server.publish('room', 1);
    await until(() => recB.seqs('room').length === 1, 5000, 'b gets room');
    expect(recA.seqs('room')).toEqual([]);
    expect(recB.refused).toEqual([]);
  });

  it('server.unsubscribe({ channel, principal }) ends every socket of that principal', async () => {
    r = await rig({
      authenticate: (req) => new URL(req.url ?? '/', 'http://x').searchParams.get('user') ?? 'anon',
    });
    const alice1 = r.client({ params: { user: 'alice' } });
    const alice2 = r.client({ params: { user: 'alice' } });
    const bob = r.client({ params: { user: 'bob' } });
    for (const c of [alice1, alice2, bob]) await c.subscribe('room');
    expect(await r.server.unsubscribe({ channel: 'room', principal: 'alice' })).toBe(2);
    await next(alice1.refused$);
    await next(alice2.refused$);
    expect(bob.subscriptionState('room')).toBe('subscribed');
    expect(r.server.stats().channels).toBe(1);
  });

  it('server.disconnect({ clientId }) closes that socket with 4001 (raw socket)', async () => {
    const server = await h.start();
    const target = await h.socket(server, 'c-target');
    const other = await h.socket(server, 'c-other');
    expect(await server.disconnect({ clientId: 'c-target' })).toBe(1);
    expect((await target.closed).code).toBe(4001);
    other.send({ id: 'p', type: 'PNG' });
    expect(await other.until(is.ack('p'))).toEqual([{ id: 'p', type: 'ACK' }]);
  });

  it('server.disconnect({ clientId }): the client redials and re-subscribes', async () => {
    r = await rig();
    const c = r.client();
    await c.subscribe('room');
    const failure = next(c.failures$, (f) => f.kind === 'close');
    expect(await r.server.disconnect({ clientId: c.clientId })).toBe(1);
    await failure;
    // Back on a socket (not only polling over HTTP), the server has the subscription again.
    await until(
      () => c.subscriptionState('room') === 'subscribed' && r!.server.stats().channels === 1,
      5000,
      're-subscribed after the redial',
    );
  });
});

describe('a SUB that fails without a refusal', () => {
  it('server_error: subscribe() rejects, the channel stays subscribing with the error, then a retry subscribes it', async () => {
    const inner = memoryStore();
    let failures = 1;
    // The store fails once under the SUB (its head read): the whole SUB is answered server_error.
    const store = new Proxy(inner, {
      get(target, prop, receiver) {
        if (prop === 'head' && failures > 0)
          return async () => {
            failures--;
            throw new Error('store down');
          };
        const v = Reflect.get(target, prop, receiver);
        return typeof v === 'function' ? v.bind(target) : v;
      },
    }) as HistoryStore;
    r = await rig({ store, onError: () => {} });
    const c = r.client();
    const rec = record(c);
    await reach(c, 'open');
    await expect(c.subscribe('board-1')).rejects.toMatchObject({ code: 'server_error' });
    expect(c.subscriptionState('board-1')).toBe('subscribing');
    expect(c.actor.system.get('subscription:board-1')?.getSnapshot().context.error).toMatchObject({
      code: 'server_error',
    });
    await until(() => c.subscriptionState('board-1') === 'subscribed', 5000, 'the retry to subscribe');
    expect(c.actor.system.get('subscription:board-1')?.getSnapshot().context.error).toBeNull();
    expect(rec.refused).toEqual([]);
    await r.server.publish('board-1', 'x');
    await until(() => rec.seqs('board-1').length === 1, 5000, 'a message after the retry');
  });

  it('recovered: false passes through resetting, with the reset heard there, then subscribed', async () => {
    r = await rig();
    await r.server.publish('board-1', 'a');
    const c = r.client();
    const seen: string[] = [];
    c.subscriptions$.subscribe((m) => {
      if (m['board-1'] && seen.at(-1) !== m['board-1']) seen.push(m['board-1']);
    });
    const atReset: string[] = [];
    c.resets$.subscribe((e) => atReset.push(c.subscriptionState(e.channel)));
    const state = await c.subscribe('board-1', { since: 7, epoch: 'an-old-epoch' });
    expect(state).toMatchObject({ recovered: false, seq: 1 });
    expect(atReset).toEqual(['resetting']);
    expect(seen).toEqual(['subscribing', 'resetting', 'subscribed']);
    expect(c.cursors()['board-1']?.seq).toBe(1);
  });
});

describe('channel housekeeping', () => {
  /** Subscribe and abandon `total` distinct channel names through one raw socket. */
  async function churn(server: SyncServer, total: number, batch = 1000) {
    const sock = await h.socket(server);
    for (let i = 0; i < total; i += batch) {
      const channels: Record<string, object> = {};
      for (let j = i; j < Math.min(total, i + batch); j++) channels[`tmp-${j}`] = {};
      const subbed = await sock.request({ id: `s${i}`, type: 'SUB', payload: { channels } }, 20_000);
      expect(Object.keys(subbed.at(-1).payload[0].channels)).toHaveLength(Object.keys(channels).length);
      await sock.request({ id: `u${i}`, type: 'UNS', payload: { channels: Object.keys(channels) } });
    }
    return sock;
  }

  const stores: Array<{ name: string; open: () => { store: HistoryStore; rows?: () => number } }> = [
    { name: 'memory', open: () => ({ store: memoryStore() }) },
    {
      name: 'sqlite',
      open: () => {
        const file = join(tmp(), 'h.db');
        const store = sqliteStore({ file });
        return {
          store,
          rows: () => {
            const db = new Database(file, { readonly: true });
            try {
              return (db.prepare('SELECT COUNT(*) AS n FROM channels').get() as { n: number }).n;
            } finally {
              db.close();
            }
          },
        };
      },
    },
  ];

  it.each(stores)(
    'channel state is flat after 100,000 distinct channel names subscribed and abandoned ($name)',
    async ({ open }) => {
      const { store, rows } = open();
      const server = await h.start({
        store,
        maxChannelsPerPrincipal: 100_000,
        maxChannels: 200_000,
        maxChannelLookupsPerSecond: 1_000_000,
      });
      // One channel with history and one live subscriber: both must survive housekeeping.
      await server.publish('kept', 'history');
      const live = await h.socket(server);
      await live.request({ id: 'l1', type: 'SUB', payload: { channels: { live: {} } } });
      const before = await store.channelCount!();
      expect(before).toBe(2);
      await churn(server, 100_000);
      // Records of never-published channels are freed at each UNS (releaseChannels, in slices
      // through the look-up scheduler right after it), not only by housekeeping: no growth.
      await expect.poll(() => store.channelCount!(), { timeout: 10_000 }).toBe(before);
      const peak = await store.channelCount!();
      await server.housekeeping();
      const after = await store.channelCount!();
      console.log(
        `channels in the store: before ${before}, after 100,000 abandoned ${peak}, after housekeeping ${after}`,
      );
      expect(after).toBe(before);
      if (rows) expect(rows()).toBe(before);
      expect(server.stats().channels).toBe(1);
      // The kept channel still has its history and epoch.
      const sock = await h.socket(server);
      const frames = await sock.request({
        id: 'k',
        type: 'SUB',
        payload: { channels: { kept: { since: 0 } } },
      });
      expect(frames.filter((f) => f.type === 'MSG').map((f) => f.payload)).toEqual(['history']);
    },
    120_000,
  );
});
