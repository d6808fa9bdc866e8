/**
 * Issue 12, third attacker round (F2): channel records and the cost of SUBs naming many
 * channels, the memory store's retention in bytes, and what `stats()` shows of them.
 *
 * - One principal SUBs 1000 fresh channels and UNSs them, again and again (socket), or polls
 *   1000 fresh ones (HTTP): records nobody follows and nobody published to are freed at once
 *   (`HistoryStore.releaseChannels`), so `maxChannels` is never filled and another principal
 *   can still SUB a new channel.
 * - SUBs are charged by the channels they name against a per-principal budget
 *   (`maxChannelLookupsPerSecondPerPrincipal`): past it, `NAK rate_limited`, while another
 *   principal is answered; the shipped client retries a refused SUB after a backoff.
 * - `memoryStore` keeps at most `maxBytesPerChannel` / `maxBytes` of payload, oldest first;
 *   replay from before the eviction is a reset.
 * Real `ws` server on 127.0.0.1, real SQLite files.
 */

import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { WebSocket } from 'ws';
import { createSyncClient, type SyncClient } from '../src/client/index.js';
import type { HistoryStore, SyncServer } from '../src/server/index.js';
import { memoryStore } from '../src/stores/memory.js';
import { sqliteStore } from '../src/stores/sqlite.js';
import { harness, httpUrl, post, RawSocket, wsUrl } from './helpers/raw.js';
import { authenticate, fresh } from './helpers/users.js';

const h = harness();
const dir = mkdtempSync(join(tmpdir(), 'syncwire-hc-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const clients: SyncClient[] = [];
afterEach(async () => {
  await Promise.all(clients.splice(0).map((c) => c.close()));
});

const open = async (server: SyncServer, clientId: string, user: string): Promise<RawSocket> => {
  const sock = await RawSocket.open(`${wsUrl(server, clientId)}&user=${user}`);
  return sock;
};

const stores: Array<{ name: string; make: () => HistoryStore }> = [
  { name: 'memory', make: () => memoryStore() },
  { name: 'sqlite', make: () => sqliteStore({ file: join(dir, `s-${Date.now()}-${Math.random()}.db`) }) },
];

describe('one principal cannot fill maxChannels with fresh names (records freed at once)', () => {
  it.each(stores)(
    '$name: 20 rounds of SUB 1000 fresh + UNS, and 10 polls of 1000 fresh',
    async ({ make }) => {
      const store = make();
      const server = await h.start<{ id: string }>({
        authenticate,
        store,
        maxChannels: 5000,
        // Isolate the record bound from the look-up budget (tested below).
        maxChannelLookupsPerSecondPerPrincipal: 1_000_000,
      });
      await server.publish('kept', 'history');
      const atk = await open(server, 'atk-1', 'attacker');
      for (let g = 0; g < 20; g++) {
        const channels = fresh(`f-${g}`, 1000);
        const sub = await atk.request({ id: `s${g}`, type: 'SUB', payload: { channels } }, 20_000);
        // Served (the cap is not hit), and the records stay within one SUB's worth.
        expect(sub.at(-1)).toMatchObject({ id: `s${g}`, type: 'SYN' });
        expect(await store.channelCount!()).toBeLessThanOrEqual(1001);
        await atk.request({ id: `u${g}`, type: 'UNS', payload: { channels: Object.keys(channels) } });
        // Freed right after the UNS, a slice per event-loop turn (the look-up scheduler).
        await expect.poll(() => store.channelCount!(), { timeout: 5000 }).toBe(1);
      }
      for (let g = 0; g < 10; g++) {
        const r = await post(
          httpUrl(server),
          'atk-http',
          { id: `p${g}`, type: 'SUB', payload: { channels: fresh(`p-${g}`, 1000) } },
          { 'X-User': 'attacker' },
        );
        expect(r.body.at(-1)).toMatchObject({ id: `p${g}`, type: 'SYN' });
      }
      // A poll frees its records once answered (the release runs right after the reply).
      await expect.poll(() => store.channelCount!(), { timeout: 2000 }).toBe(1);
      expect(server.stats().channelRecords).toBeLessThanOrEqual(1001);
      // Another principal can SUB a new channel, and the kept channel kept its history.
      const honest = await open(server, 'honest-1', 'honest');
      const reply = await honest.request({
        id: 'h1',
        type: 'SUB',
        payload: { channels: { 'my-new-board': {}, kept: { since: 0 } } },
      });
      expect(reply.filter((f) => f.type === 'MSG').map((f) => f.payload)).toEqual(['history']);
      expect(reply.at(-1)).toMatchObject({
        id: 'h1',
        type: 'SYN',
        payload: [{ channels: { 'my-new-board': { seq: 0, recovered: true }, kept: { seq: 1 } } }],
      });
      atk.ws.terminate();
      honest.ws.terminate();
    },
  );

  it('a cursor on an empty channel whose record was freed and made again is not reset', async () => {
    const server = await h.start({ store: memoryStore() });
    const a = await RawSocket.open(wsUrl(server, 'c-empty'));
    const first = await a.request({ id: 's1', type: 'SUB', payload: { channels: { empty: {} } } });
    const state = first.at(-1).payload[0].channels.empty;
    expect(state).toMatchObject({ seq: 0, recovered: true });
    await a.request({ id: 'u1', type: 'UNS', payload: { channels: ['empty'] } });
    // Freed: the next SUB makes a new record, with a new epoch…
    const again = await a.request({
      id: 's2',
      type: 'SUB',
      payload: { channels: { empty: { epoch: state.epoch, since: 0 } } },
    });
    const next = again.at(-1).payload[0].channels.empty;
    expect(next.epoch).not.toBe(state.epoch);
    // …and the client, which has seen nothing, keeps its (empty) copy: recovered.
    expect(next).toMatchObject({ seq: 0, recovered: true });
    a.ws.terminate();
  });
});

describe('SUBs are charged by the channels they name (maxChannelLookupsPerSecondPerPrincipal)', () => {
  it.each(stores)(
    '$name: 1000-channel SUBs of one principal on 8 sockets are refused past the budget; another principal is answered',
    async ({ make }) => {
      const server = await h.start<{ id: string }>({
        authenticate,
        store: make(),
        maxChannelLookupsPerSecondPerPrincipal: 1000,
      });
      const channels = fresh('c', 1000);
      const atk = await Promise.all(
        Array.from({ length: 8 }, (_, k) => open(server, `atk-${k}`, 'attacker')),
      );
      // Every socket sends its 1000-channel SUB at once: one budget for the principal.
      const replies = await Promise.all(
        atk.map((s, k) => s.request({ id: `s${k}`, type: 'SUB', payload: { channels } }, 20_000)),
      );
      const kinds = replies.map((r) => (r.at(-1).type === 'NAK' ? r.at(-1).error.code : r.at(-1).type));
      // The burst is max(rate, maxChannelsPerPrincipal) = 1000 look-ups: one SUB passes.
      expect(kinds.filter((k) => k === 'SYN').length).toBeLessThanOrEqual(2);
      expect(kinds.filter((k) => k === 'rate_limited').length).toBeGreaterThanOrEqual(6);
      // HTTP polls of the same principal draw on the same budget.
      const polled = await post(
        httpUrl(server),
        'atk-http',
        { id: 'p1', type: 'SUB', payload: { channels } },
        { 'X-User': 'attacker' },
      );
      expect(polled.body.at(-1)).toMatchObject({ id: 'p1', type: 'NAK', error: { code: 'rate_limited' } });
      // Another principal: a new channel is subscribed, a SYN answered.
      const honest = await open(server, 'honest-1', 'honest');
      const sub = await honest.request({ id: 'h1', type: 'SUB', payload: { channels: { 'new-board': {} } } });
      expect(sub.at(-1)).toMatchObject({ id: 'h1', type: 'SYN' });
      const syn = await honest.request({ id: 'y1', type: 'SYN', payload: [1] });
      expect(syn.at(-1)).toEqual({ id: 'y1', type: 'SYN', payload: [{ ok: 1 }] });
      for (const s of [...atk, honest]) s.ws.terminate();
    },
  );

  it('a SUB counts a frame per channel named: the frames after it are refused before parsing', async () => {
    const server = await h.start<{ id: string }>({
      authenticate,
      maxFramesPerSecond: 100,
      maxFrameBurst: 100,
      maxFramesPerSecondPerPrincipal: 100,
      maxChannelLookupsPerSecondPerPrincipal: 1000,
    });
    const atk = await open(server, 'atk-f', 'attacker');
    const sub = await atk.request({ id: 's1', type: 'SUB', payload: { channels: fresh('c', 1000) } }, 20_000);
    expect(sub.at(-1)).toMatchObject({ id: 's1', type: 'SYN' });
    // The SUB took all the socket's frames (100 a second refill it): of 50 frames sent now,
    // most are refused unparsed.
    for (let i = 0; i < 50; i++) atk.send({ id: `p${i}`, type: 'PNG' });
    const refusal = await atk.next((f) => f.type === 'NAK');
    expect(refusal).toMatchObject({
      type: 'NAK',
      error: { code: 'rate_limited', message: 'too many frames; slow down' },
    });
    // Another principal is answered.
    const honest = await open(server, 'honest-f', 'honest');
    const syn = await honest.request({ id: 'y1', type: 'SYN', payload: [1] });
    expect(syn.at(-1)).toEqual({ id: 'y1', type: 'SYN', payload: [{ ok: 1 }] });
    atk.ws.terminate();
    honest.ws.terminate();
  });

  it('the shipped client retries a SUB refused rate_limited after a backoff, and gets the channel', async () => {
    const server = await h.start<{ id: string }>({
      authenticate,
      maxChannelLookupsPerSecondPerPrincipal: 1,
      maxChannelsPerPrincipal: 10,
    });
    // The principal's budget is spent by a raw socket…
    const raw = await open(server, 'spender', 'shared');
    const spent = await raw.request({ id: 's1', type: 'SUB', payload: { channels: fresh('x', 10) } });
    expect(spent.at(-1)).toMatchObject({ type: 'SYN' });
    const refused = await raw.request({ id: 's2', type: 'SUB', payload: { channels: fresh('y', 10) } });
    expect(refused.at(-1)).toMatchObject({ type: 'NAK', error: { code: 'rate_limited' } });
    // (Its channels are let go: the principal's live-channel cap is not what refuses below.)
    await raw.request({ id: 'u1', type: 'UNS', payload: { channels: Object.keys(fresh('x', 10)) } });
    // …so the client's first SUB (same principal) may be refused; it asks again and gets it.
    const client = createSyncClient({
      url: `ws://127.0.0.1:${server.address().port}/sync?user=shared`,
      WebSocket: WebSocket as never,
      timeout: 500,
    });
    clients.push(client);
    // One look-up per second refills the budget: the client's SUB, sent a few ms after the
    // refusal above, is refused too, and the client says so…
    const first = await client.subscribe('board').then(
      () => 'subscribed',
      (e: { code?: string }) => e.code,
    );
    expect(first).toBe('rate_limited');
    // …and asks again after its backoff (T = 500 ms, doubling) until the server has room.
    await expect.poll(() => client.subscriptionState('board'), { timeout: 10_000 }).toBe('subscribed');
    await server.publish('board', 'hello');
    await expect.poll(() => client.cursors().board?.seq, { timeout: 5000 }).toBe(1);
    raw.ws.terminate();
  });
});

describe('memoryStore retention is bounded in bytes (oldest evicted first)', () => {
  it('one channel of 100 KB messages keeps at most maxBytesPerChannel; a replay from before is a reset', async () => {
    const store = memoryStore({ maxBytesPerChannel: 1024 * 1024, maxBytes: 4 * 1024 * 1024 });
    const server = await h.start({ store });
    const big = 'x'.repeat(100 * 1024);
    for (let i = 0; i < 100; i++) await server.publish('big', { i, big });
    expect(store.retainedBytes()).toBeLessThanOrEqual(1024 * 1024);
    const head = await store.head('big');
    expect(head.seq).toBe(100);
    // 1 MiB holds 10 of them (each ~100 KB + a few bytes of JSON): the newest ones.
    expect(head.first).toBe(91);
    const sock = await RawSocket.open(wsUrl(server, 'c-big'));
    const reply = await sock.request({
      id: 's',
      type: 'SUB',
      payload: { channels: { big: { since: 5, epoch: head.epoch } } },
    });
    const msgs = reply.filter((f) => f.type === 'MSG');
    expect(msgs.map((m) => m.payload.i)).toEqual(Array.from({ length: 10 }, (_, k) => 90 + k));
    expect(reply.at(-1).payload[0].channels.big).toMatchObject({ seq: 100, recovered: false });
    sock.ws.terminate();
  });

  it('all channels together keep at most maxBytes, the oldest of the store evicted first', async () => {
    const store = memoryStore({ maxBytesPerChannel: 1024 * 1024, maxBytes: 1024 * 1024 });
    const big = 'y'.repeat(100 * 1024);
    for (let i = 0; i < 30; i++) await store.append(`ch-${i % 3}`, { i, big });
    expect(store.retainedBytes()).toBeLessThanOrEqual(1024 * 1024);
    // 10 fit: appends 20..29 are kept, the older ones went, whatever their channel.
    const kept: number[] = [];
    for (const ch of ['ch-0', 'ch-1', 'ch-2']) {
      for (const m of await store.read(ch, 0, 100)) kept.push((m.payload as { i: number }).i);
    }
    expect(kept.sort((a, b) => a - b)).toEqual(Array.from({ length: 10 }, (_, k) => 20 + k));
    // A single message larger than the bound is still kept (the newest always is).
    await store.append('huge', 'z'.repeat(2 * 1024 * 1024));
    expect((await store.read('huge', 0, 1)).length).toBe(1);
  });

  it('rejects bounds that are not > 0', () => {
    expect(() => memoryStore({ maxBytes: 0 })).toThrow(RangeError);
    expect(() => memoryStore({ maxBytesPerChannel: -1 })).toThrow(RangeError);
  });
});

describe('stats() shows channel records and bindings', () => {
  it('channelRecords is what maxChannels counts; bindings what maxClientIds counts', async () => {
    const store = memoryStore();
    const server = await h.start<{ id: string }>({ authenticate, store, maxChannels: 100 });
    await server.publish('a', 1);
    await server.publish('b', 1);
    const sock = await open(server, 'c-stats', 'u1');
    await sock.request({ id: 's', type: 'SUB', payload: { channels: { c: {} } } });
    await server.housekeeping();
    const s = server.stats();
    expect(s.channelRecords).toBe(3);
    expect(s.channels).toBe(1);
    expect(s.bindings).toBeGreaterThanOrEqual(1);
    sock.ws.terminate();
  });
});
