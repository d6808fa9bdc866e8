/**
 * Issue 12, second fresh attacker (FAIR): channel look-ups are fair and bounded server-wide.
 *
 * - Several principals' SUBs (sockets) and HTTP polls naming many fresh channels: the store
 *   sees at most one slice (32) of look-ups per event-loop turn, all principals together, and
 *   an honest principal's SUB of one channel is answered while their look-ups still wait
 *   (round-robin: it waits at most one slice per principal with work waiting); the honest
 *   client's PNGs are answered all along, and every attacker's SUB is answered in the end.
 * - Past the server-wide backlog (`maxChannelLookupsPerSecond`), a principal that already has
 *   look-ups waiting is refused `NAK rate_limited`; one with none waiting is admitted; the
 *   shipped client retries its refused SUB and gets the channel.
 * - `maxChannels` keeps a reserve for principals that follow few channels: principals holding
 *   many fill it up to `maxChannels - maxChannels/10`, then only a SUB after which its
 *   principal follows at most `maxChannelsPerPrincipal/10` channels may add records (memory,
 *   SQLite and Redis).
 * Real `ws` server on 127.0.0.1, real SQLite files, real redis-server.
 */

import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { WebSocket } from 'ws';
import { createSyncClient, type SyncClient } from '../src/client/index.js';
import type { SyncServer } from '../src/server/index.js';
import { memoryStore } from '../src/stores/memory.js';
import { redisStore } from '../src/stores/redis.js';
import { sqliteStore } from '../src/stores/sqlite.js';
import type { HistoryStore } from '../src/stores/types.js';
import { eventually, harness, httpUrl, post, RawSocket, wsUrl } from './helpers/raw.js';
import { describeWith, REDIS_SERVER, type RedisServer, startRedis } from './helpers/redis.js';
import { authenticate, fresh } from './helpers/users.js';

const h = harness();
const dir = mkdtempSync(join(tmpdir(), 'syncwire-fair-'));
let redis: RedisServer | undefined;
afterAll(async () => {
  await redis?.stop();
  rmSync(dir, { recursive: true, force: true });
});

const clients: SyncClient[] = [];
const sockets: RawSocket[] = [];
afterEach(async () => {
  await Promise.all(clients.splice(0).map((c) => c.close()));
  for (const s of sockets.splice(0)) s.ws.terminate();
});

const open = async (server: SyncServer, clientId: string, user: string): Promise<RawSocket> => {
  const sock = await RawSocket.open(`${wsUrl(server, clientId)}&user=${user}`);
  sockets.push(sock);
  return sock;
};

/**
 * `store` with its look-ups (`head`, `heads`) counted per event-loop turn: a `setImmediate`
 * loop closes a turn's count each time it runs (once per loop iteration).
 */
function countedPerTurn(store: HistoryStore, watched = '', onWatched: () => void = () => {}) {
  let count = 0;
  let max = 0;
  let total = 0;
  let running = true;
  const tick = () => {
    max = Math.max(max, count);
    count = 0;
    if (running) setImmediate(tick);
  };
  setImmediate(tick);
  const counted: HistoryStore = {
    ...store,
    head: (channel) => {
      count++;
      total++;
      if (channel === watched) onWatched();
      return store.head(channel);
    },
  };
  if (store.heads) {
    const heads = store.heads;
    counted.heads = (names) => {
      count += names.length;
      total += names.length;
      if (names.includes(watched)) onWatched();
      return heads(names);
    };
  }
  return {
    store: counted,
    maxPerTurn: () => Math.max(max, count),
    total: () => total,
    stop: () => {
      running = false;
    },
  };
}

const stores: Array<{ name: string; make: () => HistoryStore }> = [
  { name: 'memory', make: () => memoryStore() },
  { name: 'sqlite', make: () => sqliteStore({ file: join(dir, `f-${Date.now()}-${Math.random()}.db`) }) },
];

const PRINCIPALS = 8;
const EACH = 500;
/** The server's slice (index.ts LOOKUP_SLICE). */
const SLICE = 32;

describe('channel look-ups are fair across principals, server-wide', () => {
  it.each(stores)(
    '$name: 8 principals SUB 500 fresh channels each on sockets: ≤ 32 look-ups per turn; an honest SUB and PNGs answered meanwhile',
    async ({ make }) => {
      let server: SyncServer | undefined;
      /** Attackers' look-ups still waiting when the honest channel is looked up. */
      let waitingAtHonest = -1;
      const counted = countedPerTurn(make(), 'honest-board', () => {
        waitingAtHonest = server!.stats().lookupBacklog;
      });
      server = await h.start<{ id: string }>({
        authenticate,
        store: counted.store,
        // 4 000 look-ups at 2 000 per second (burst 2 000): about one second of work waiting
        // (the backlog bound, max(rate, maxChannelsPerPrincipal), admits all 8 SUBs).
        maxChannelLookupsPerSecond: 2000,
        maxChannelsPerPrincipal: 4000,
        maxChannelLookupsPerSecondPerPrincipal: 1_000_000,
      });
      const honest = await open(server, 'c-honest', 'honest');
      const attackers = await Promise.all(
        Array.from({ length: PRINCIPALS }, (_, u) => open(server, `c-atk-${u}`, `atk${u}`)),
      );
      const answers = attackers.map((sock, u) =>
        sock.request({ id: `a${u}`, type: 'SUB', payload: { channels: fresh(`atk${u}`, EACH) } }, 60_000),
      );
      // Many look-ups are waiting…
      await eventually(() => server!.stats().lookupBacklog > 1000, 10_000);
      // …and an honest SUB of one channel is looked up before they are done: it waited for at
      // most one slice per principal (8 × 32), not behind the ≥ 1 000 look-ups waiting.
      const reply = await honest.request(
        { id: 'h1', type: 'SUB', payload: { channels: { 'honest-board': {} } } },
        30_000,
      );
      expect(reply.at(-1)).toMatchObject({ id: 'h1', type: 'SYN' });
      expect(reply.at(-1).payload[0].channels['honest-board']).toMatchObject({ seq: 0 });
      expect(waitingAtHonest).toBeGreaterThan(1000 - (PRINCIPALS + 1) * SLICE);
      // PNGs are answered while the look-ups go on.
      for (let i = 0; i < 5; i++) {
        const pong = honest.until((f) => f.id === `p${i}` && f.type === 'ACK', 30_000);
        honest.send({ id: `p${i}`, type: 'PNG' });
        await pong;
      }
      // Every attacker's SUB is answered in the end, each channel subscribed.
      for (const [u, answer] of (await Promise.all(answers)).entries()) {
        const syn = answer.at(-1);
        expect(syn).toMatchObject({ id: `a${u}`, type: 'SYN' });
        expect(Object.keys(syn.payload[0].channels)).toHaveLength(EACH);
      }
      counted.stop();
      console.log(
        `[fair] sockets: ${counted.total()} look-ups, at most ${counted.maxPerTurn()} in one event-loop turn`,
      );
      expect(counted.total()).toBeGreaterThanOrEqual(PRINCIPALS * EACH);
      expect(counted.maxPerTurn()).toBeLessThanOrEqual(SLICE);
      expect(server!.stats().lookupBacklog).toBe(0);
    },
    90_000,
  );

  it.each(stores)(
    '$name: 8 principals poll 500 fresh channels each over HTTP: ≤ 32 look-ups per turn; an honest SUB answered meanwhile',
    async ({ make }) => {
      let server: SyncServer | undefined;
      let waitingAtHonest = -1;
      const counted = countedPerTurn(make(), 'honest-board', () => {
        waitingAtHonest = server!.stats().lookupBacklog;
      });
      server = await h.start<{ id: string }>({
        authenticate,
        store: counted.store,
        maxChannelLookupsPerSecond: 2000,
        maxChannelsPerPrincipal: 4000,
        maxChannelLookupsPerSecondPerPrincipal: 1_000_000,
      });
      const honest = await open(server, 'c-honest', 'honest');
      const polls = Array.from({ length: PRINCIPALS }, (_, u) =>
        post(
          httpUrl(server),
          `c-poll-${u}`,
          { id: `q${u}`, type: 'SUB', payload: { channels: fresh(`poll${u}`, EACH) } },
          { 'X-User': `poll${u}` },
        ),
      );
      await eventually(() => server!.stats().lookupBacklog > 1000, 10_000);
      const reply = await honest.request(
        { id: 'h1', type: 'SUB', payload: { channels: { 'honest-board': {} } } },
        30_000,
      );
      expect(reply.at(-1)).toMatchObject({ id: 'h1', type: 'SYN' });
      expect(waitingAtHonest).toBeGreaterThan(1000 - (PRINCIPALS + 1) * SLICE);
      for (const [u, r] of (await Promise.all(polls)).entries()) {
        expect(r.status).toBe(200);
        const syn = r.body.at(-1);
        expect(syn).toMatchObject({ id: `q${u}`, type: 'SYN' });
        expect(Object.keys(syn.payload[0].channels)).toHaveLength(EACH);
      }
      counted.stop();
      console.log(
        `[fair] polls: ${counted.total()} look-ups, at most ${counted.maxPerTurn()} in one event-loop turn`,
      );
      expect(counted.maxPerTurn()).toBeLessThanOrEqual(SLICE);
      // The polls' records were freed (in slices too) once answered: only the honest one is left.
      await expect.poll(() => counted.store.channelCount?.(), { timeout: 10_000 }).toBe(1);
    },
    90_000,
  );
});

describe('the server-wide look-up rate (maxChannelLookupsPerSecond)', () => {
  it('past the backlog, a principal with look-ups waiting, or any SUB larger than the reserve share, is refused rate_limited; a small one without is admitted; the shipped client retries', async () => {
    const server = await h.start<{ id: string }>({
      authenticate,
      // 40 look-ups per second server-wide (burst 40); backlog bound
      // max(40, maxChannelsPerPrincipal) = 200, hard bound 400; small SUBs: ≤ 200 / 10 = 20.
      maxChannelLookupsPerSecond: 40,
      maxChannelsPerPrincipal: 200,
      maxChannelLookupsPerSecondPerPrincipal: 1_000_000,
    });
    const socks = await Promise.all(Array.from({ length: 2 }, (_, u) => open(server, `c-r-${u}`, `r${u}`)));
    // (A socket's SUBs are answered one after the other: the second SUBs come on other sockets.)
    const others = await Promise.all(Array.from({ length: 2 }, (_, u) => open(server, `c-r2-${u}`, `r${u}`)));
    // Each of 2 principals sends a SUB of 100 fresh channels: admitted (200 ≤ 200); 160 wait
    // after the burst, draining at 40 per second…
    const firsts = socks.map((s, u) =>
      s.request({ id: `f${u}`, type: 'SUB', payload: { channels: fresh(`r${u}a`, 100) } }, 30_000),
    );
    await eventually(() => server.stats().lookupBacklog >= 150, 10_000);
    // …6 principals with nothing waiting and small SUBs (20) are admitted past the bound (under
    // the hard one)…
    const smalls = await Promise.all(Array.from({ length: 6 }, (_, u) => open(server, `c-s-${u}`, `s${u}`)));
    const smallAnswers = smalls.map((s, u) =>
      s.request({ id: `m${u}`, type: 'SUB', payload: { channels: fresh(`s${u}`, 20) } }, 30_000),
    );
    await eventually(() => server.stats().lookupBacklog > 240, 10_000);
    // …so a second SUB of each principal, on another socket, is refused (its key has some waiting)…
    const seconds = others.map((s, u) =>
      s.request({ id: `s${u}`, type: 'SUB', payload: { channels: fresh(`r${u}b`, 100) } }, 30_000),
    );
    for (const [u, r] of (await Promise.all(seconds)).entries()) {
      expect(r.at(-1)).toMatchObject({ id: `s${u}`, type: 'NAK', error: { code: 'rate_limited' } });
    }
    // …and so is a principal with nothing waiting whose SUB is larger than the small share
    // (before FIX1 it was admitted).
    const big = await open(server, 'c-big', 'big');
    const rb = await big.request({ id: 'b1', type: 'SUB', payload: { channels: fresh('big', 21) } }, 30_000);
    expect(rb.at(-1)).toMatchObject({ id: 'b1', type: 'NAK', error: { code: 'rate_limited' } });
    expect(server.stats().lookupBacklog).toBeGreaterThan(210);
    // The shipped client of a principal with look-ups waiting: refused, then asks again after
    // its backoff and gets the channel once the backlog is under the bound.
    const client = createSyncClient({
      url: `ws://127.0.0.1:${server.address().port}/sync?user=r0`,
      WebSocket: WebSocket as never,
      // Long enough for the retried SUB's look-ups, which wait behind r0's first SUB's.
      timeout: 10_000,
    });
    clients.push(client);
    client.failures$.subscribe((f) => console.log('[fair] client failure', JSON.stringify(f)));
    const first = client.subscribe('r-board').then(
      () => 'subscribed',
      (e: { code?: string }) => e.code,
    );
    // A principal with nothing waiting and a small SUB is admitted under the hard bound, and answered.
    const honest = await open(server, 'c-honest', 'honest');
    const reply = await honest.request(
      { id: 'h1', type: 'SUB', payload: { channels: { 'h-board': {} } } },
      30_000,
    );
    expect(reply.at(-1)).toMatchObject({ id: 'h1', type: 'SYN' });
    expect(await first).toBe('rate_limited');
    await expect.poll(() => client.subscriptionState('r-board'), { timeout: 20_000 }).toBe('subscribed');
    await server.publish('r-board', 'hello');
    await expect.poll(() => client.cursors()['r-board']?.seq, { timeout: 5000 }).toBe(1);
    // Every admitted SUB is answered in the end.
    for (const [u, r] of (await Promise.all(firsts)).entries()) {
      expect(r.at(-1)).toMatchObject({ id: `f${u}`, type: 'SYN' });
    }
    for (const [u, r] of (await Promise.all(smallAnswers)).entries()) {
      expect(r.at(-1)).toMatchObject({ id: `m${u}`, type: 'SYN' });
    }
  }, 60_000);
});

/**
 * `maxChannels: 100`, `maxChannelsPerPrincipal: 20`: a reserve of 10 records for principals
 * that follow at most 2 channels.
 */
async function reserve(makeStore: () => Promise<HistoryStore>): Promise<void> {
  const store = await makeStore();
  const server = await h.start<{ id: string }>({
    authenticate,
    store,
    maxChannels: 100,
    maxChannelsPerPrincipal: 20,
    maxChannelLookupsPerSecondPerPrincipal: 1_000_000,
  });
  // Five principals hold 18 fresh channels each: 90 records, the edge of the reserve.
  const holders: RawSocket[] = [];
  for (let u = 0; u < 5; u++) {
    const sock = await open(server, `c-big-${u}`, `big${u}`);
    holders.push(sock);
    const r = await sock.request({ id: `b${u}`, type: 'SUB', payload: { channels: fresh(`big${u}`, 18) } });
    expect(r.at(-1)).toMatchObject({ id: `b${u}`, type: 'SYN' });
  }
  expect(await store.channelCount?.()).toBe(90);
  // A sixth principal's SUB of 5 fresh channels would reach into the reserve: refused…
  const sixth = await open(server, 'c-big-5', 'big5');
  const r6 = await sixth.request({ id: 'b5', type: 'SUB', payload: { channels: fresh('big5', 5) } });
  expect(r6.at(-1)).toMatchObject({ id: 'b5', type: 'NAK', error: { code: 'rate_limited' } });
  // …and so is one more fresh channel for a principal that holds 18.
  const more = await holders[0]!.request({
    id: 'm',
    type: 'SUB',
    payload: { channels: { 'big0-more': {} } },
  });
  expect(more.at(-1)).toMatchObject({ id: 'm', type: 'NAK', error: { code: 'rate_limited' } });
  // Late principals that follow few channels still get new ones, on sockets and over HTTP…
  for (let u = 0; u < 4; u++) {
    const sock = await open(server, `c-late-${u}`, `late${u}`);
    const r = await sock.request({ id: `l${u}`, type: 'SUB', payload: { channels: fresh(`late${u}`, 2) } });
    expect(r.at(-1)).toMatchObject({ id: `l${u}`, type: 'SYN' });
    expect(Object.values(r.at(-1).payload[0].channels).every((e) => !(e as { error?: unknown }).error)).toBe(
      true,
    );
  }
  const polled = await post(
    httpUrl(server),
    'c-late-poll',
    { id: 'lp', type: 'SUB', payload: { channels: { 'late-poll': {} } } },
    { 'X-User': 'latepoll' },
  );
  expect(polled.body.at(-1)).toMatchObject({ id: 'lp', type: 'SYN' });
  // …until maxChannels itself (98 now: 90 + 4 × 2; a 3-channel SUB of a new principal is
  // over its share, two 1-channel ones fill the last records, a third is refused).
  const over = await open(server, 'c-over', 'over');
  const o1 = await over.request({ id: 'o1', type: 'SUB', payload: { channels: fresh('over', 3) } });
  expect(o1.at(-1)).toMatchObject({ id: 'o1', type: 'NAK', error: { code: 'rate_limited' } });
  for (const u of [0, 1]) {
    const sock = await open(server, `c-last-${u}`, `last${u}`);
    const r = await sock.request({ id: `z${u}`, type: 'SUB', payload: { channels: { [`last-${u}`]: {} } } });
    expect(r.at(-1)).toMatchObject({ id: `z${u}`, type: 'SYN' });
  }
  expect(await store.channelCount?.()).toBe(100);
  const full = await open(server, 'c-full', 'full');
  const rf = await full.request({ id: 'zf', type: 'SUB', payload: { channels: { 'one-too-many': {} } } });
  expect(rf.at(-1)).toMatchObject({ id: 'zf', type: 'NAK', error: { code: 'rate_limited' } });
  // Channels the store keeps are still served to anyone.
  const kept = await full.request({ id: 'zk', type: 'SUB', payload: { channels: { 'big1-3': {} } } });
  expect(kept.at(-1)).toMatchObject({ id: 'zk', type: 'SYN' });
}

describe('maxChannels keeps a reserve for principals that follow few channels', () => {
  it('memory store', async () => {
    await reserve(async () => memoryStore());
  });
  it('SQLite store', async () => {
    await reserve(async () => sqliteStore({ file: join(dir, `r-${Date.now()}.db`) }));
  });
  describeWith(REDIS_SERVER, 'redis-server', 'Redis store', () => {
    it('the same', async () => {
      redis ??= await startRedis();
      const url = redis.url;
      await reserve(() => redisStore({ url }, { prefix: `fair${process.pid}-${Date.now()}:` }));
    });
  });
});
