/**
 * Issue 12, seventh fresh attacker (FIX1): limits that held for `SUB`s one at a time, checked
 * with `SUB`s arriving at once and with requesters that leave.
 *
 * - F1 `maxChannels` and its reserve under concurrent `SUB`s: 30 principals each `SUB` 100
 *   fresh channels at the same moment (sockets, and HTTP polls): the store never keeps more
 *   than `maxChannels - reserve` records for them (before: every `SUB` passed the same count,
 *   1.5 × `maxChannels` in the attacker's run), and an honest principal following one channel
 *   still gets new ones (memory, SQLite, Redis).
 * - F2 the server-wide look-up backlog is bounded for everyone: 40 principals' big `SUB`s and 60
 *   principals' small ones at once: the backlog never passes `2 × max(rate,
 *   maxChannelsPerPrincipal)`, the rest is refused `rate_limited` (before: a principal with
 *   nothing waiting was always admitted, 896 809 waited), and an honest `SUB` and `PNG`s are
 *   answered meanwhile.
 * - F3 no work for requesters that left: once the attackers' sockets close (or an HTTP poll is
 *   aborted), the backlog, the queued request bytes and the records their `SUB`s made fall to 0
 *   within a bounded wait, nothing more is looked up for them, and an honest client's `SYN`
 *   and `SUB` are answered.
 * Real `ws` server on 127.0.0.1, real SQLite files, real redis-server.
 */

import { mkdtempSync, rmSync } from 'node:fs';
import { request } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import type { SyncServer } from '../src/server/index.js';
import { memoryStore } from '../src/stores/memory.js';
import { redisStore } from '../src/stores/redis.js';
import { sqliteStore } from '../src/stores/sqlite.js';
import type { HistoryStore } from '../src/stores/types.js';
import { eventually, harness, httpUrl, post, RawSocket, wsUrl } from './helpers/raw.js';
import { describeWith, REDIS_SERVER, type RedisServer, startRedis } from './helpers/redis.js';
import { authenticate, fresh } from './helpers/users.js';

const h = harness();
const dir = mkdtempSync(join(tmpdir(), 'syncwire-concurrent-'));
let redis: RedisServer | undefined;
afterAll(async () => {
  await redis?.stop();
  rmSync(dir, { recursive: true, force: true });
});

const sockets: RawSocket[] = [];
afterEach(() => {
  for (const s of sockets.splice(0)) s.ws.terminate();
});

const open = async (server: SyncServer, clientId: string, user: string): Promise<RawSocket> => {
  const sock = await RawSocket.open(`${wsUrl(server, clientId)}&user=${user}`);
  sockets.push(sock);
  return sock;
};

/**
 * `store` with its look-ups (`head`, `heads`) counted, and after each the store's record
 * count read: `peak()` is the most records it kept at any look-up.
 */
function watched(store: HistoryStore) {
  let looked = 0;
  let peak = 0;
  const sample = async () => {
    peak = Math.max(peak, (await store.channelCount?.()) ?? 0);
  };
  const counted: HistoryStore = { ...store };
  counted.head = async (channel) => {
    looked++;
    const head = await store.head(channel);
    await sample();
    return head;
  };
  if (store.heads) {
    const heads = store.heads.bind(store);
    counted.heads = async (names) => {
      looked += names.length;
      const out = await heads(names);
      await sample();
      return out;
    };
  }
  return { store: counted, looked: () => looked, peak: () => peak };
}

interface Made {
  name: string;
  make: () => Promise<HistoryStore>;
}
const local: Made[] = [
  { name: 'memory', make: async () => memoryStore() },
  {
    name: 'sqlite',
    make: async () => sqliteStore({ file: join(dir, `c-${Date.now()}-${Math.random()}.db`) }),
  },
];
const redisMade: Made = {
  name: 'redis',
  make: async () => {
    redis ??= await startRedis();
    return redisStore({ url: redis.url }, { prefix: `conc${process.pid}-${Date.now()}-${Math.random()}:` });
  },
};

/** `maxChannels: 1000`, `maxChannelsPerPrincipal: 100`: reserve 100 records, share 10 channels. */
const CAP = { maxChannels: 1000, maxChannelsPerPrincipal: 100 };
const RESERVE = 100;
const ATTACKERS = 30;
const EACH = 100;

/** F1 on sockets: 30 principals × 100 fresh channels at the same moment. */
async function concurrentSockets({ make }: Made): Promise<void> {
  const w = watched(await make());
  const server = await h.start<{ id: string }>({
    authenticate,
    store: w.store,
    ...CAP,
    maxChannelLookupsPerSecond: 1_000_000,
    maxChannelLookupsPerSecondPerPrincipal: 1_000_000,
  });
  const honest = await open(server, 'c-honest', 'honest');
  const h0 = await honest.request({ id: 'h0', type: 'SUB', payload: { channels: { 'honest-0': {} } } });
  expect(h0.at(-1)).toMatchObject({ id: 'h0', type: 'SYN' });
  const attackers = await Promise.all(
    Array.from({ length: ATTACKERS }, (_, u) => open(server, `c-atk-${u}`, `atk${u}`)),
  );
  // Every SUB is on the wire before any is answered.
  const answers = await Promise.all(
    attackers.map((s, u) =>
      s.request({ id: `a${u}`, type: 'SUB', payload: { channels: fresh(`atk${u}`, EACH) } }, 30_000),
    ),
  );
  let admitted = 0;
  for (const [u, r] of answers.entries()) {
    const last = r.at(-1);
    if (last.type === 'SYN') admitted++;
    else expect(last).toMatchObject({ id: `a${u}`, type: 'NAK', error: { code: 'rate_limited' } });
  }
  const kept = (await w.store.channelCount?.()) ?? 0;
  console.log(
    `[concurrent] sockets: ${admitted}/${ATTACKERS} SUBs admitted, ${kept} records, peak ${w.peak()}`,
  );
  // The attackers hold what they got: at most maxChannels - reserve records, honest's included.
  expect(kept).toBeLessThanOrEqual(CAP.maxChannels - RESERVE);
  expect(w.peak()).toBeLessThanOrEqual(CAP.maxChannels - RESERVE);
  expect(admitted).toBeLessThanOrEqual(Math.floor((CAP.maxChannels - RESERVE - 1) / EACH));
  expect(admitted).toBeGreaterThan(0);
  // The honest principal following one channel still gets new ones (the reserve).
  for (let i = 1; i <= 3; i++) {
    const r = await honest.request({
      id: `h${i}`,
      type: 'SUB',
      payload: { channels: { [`honest-${i}`]: {} } },
    });
    expect(r.at(-1)).toMatchObject({ id: `h${i}`, type: 'SYN' });
    expect(r.at(-1).payload[0].channels[`honest-${i}`].error).toBeUndefined();
  }
  expect((await w.store.channelCount?.()) ?? 0).toBeLessThanOrEqual(CAP.maxChannels);
}

/** F1 over HTTP: 30 principals poll 100 fresh channels each at the same moment. */
async function concurrentPolls({ make }: Made): Promise<void> {
  const w = watched(await make());
  const server = await h.start<{ id: string }>({
    authenticate,
    store: w.store,
    ...CAP,
    maxChannelLookupsPerSecond: 1_000_000,
    maxChannelLookupsPerSecondPerPrincipal: 1_000_000,
  });
  const honest = await open(server, 'c-honest', 'honest');
  const polls = Array.from({ length: ATTACKERS }, (_, u) =>
    post(
      httpUrl(server),
      `c-poll-${u}`,
      { id: `q${u}`, type: 'SUB', payload: { channels: fresh(`poll${u}`, EACH) } },
      { 'X-User': `poll${u}` },
    ),
  );
  // An honest SUB of one channel, at the same moment, is answered.
  const mine = honest.request({ id: 'h1', type: 'SUB', payload: { channels: { 'honest-1': {} } } }, 30_000);
  let admitted = 0;
  for (const [u, r] of (await Promise.all(polls)).entries()) {
    expect(r.status).toBe(200);
    const last = r.body.at(-1);
    if (last.type === 'SYN') admitted++;
    else expect(last).toMatchObject({ id: `q${u}`, type: 'NAK', error: { code: 'rate_limited' } });
  }
  const reply = (await mine).at(-1);
  expect(reply).toMatchObject({ id: 'h1', type: 'SYN' });
  expect(reply.payload[0].channels['honest-1'].error).toBeUndefined();
  console.log(`[concurrent] polls: ${admitted}/${ATTACKERS} admitted, peak ${w.peak()} records`);
  // The polls' records together never passed maxChannels - reserve (+ the honest one).
  expect(w.peak()).toBeLessThanOrEqual(CAP.maxChannels - RESERVE + 1);
  expect(admitted).toBeGreaterThan(0);
  // And they are freed once answered: only the honest one is left.
  await expect.poll(() => w.store.channelCount?.(), { timeout: 10_000 }).toBe(1);
}

describe('F1: maxChannels and its reserve hold when SUBs arrive at once', () => {
  it.each(local)(
    '$name: 30 principals SUB 100 fresh channels each on sockets at once',
    concurrentSockets,
    60_000,
  );
  it.each(local)(
    '$name: 30 principals poll 100 fresh channels each over HTTP at once',
    concurrentPolls,
    60_000,
  );
  describeWith(REDIS_SERVER, 'redis-server', 'Redis store', () => {
    it('sockets at once', () => concurrentSockets(redisMade), 60_000);
    it('polls at once', () => concurrentPolls(redisMade), 60_000);
  });
});

describe('F2: the look-up backlog is bounded for everyone', () => {
  it.each(local)(
    '$name: 40 big and 60 small SUBs of as many principals at once: backlog ≤ 2 × bound, the rest refused; an honest SUB and PNGs answered',
    async ({ make }) => {
      const w = watched(await make());
      let server: SyncServer | undefined;
      let peakBacklog = 0;
      const sample = () => {
        peakBacklog = Math.max(peakBacklog, server?.stats().lookupBacklog ?? 0);
      };
      const store: HistoryStore = {
        ...w.store,
        head: async (c) => {
          sample();
          return w.store.head(c);
        },
      };
      if (w.store.heads) {
        const heads = w.store.heads;
        store.heads = async (names) => {
          sample();
          return heads(names);
        };
      }
      // Bound max(200, 100) = 200, hard bound 400; small SUBs: at most 10 channels.
      server = await h.start<{ id: string }>({
        authenticate,
        store,
        maxChannelLookupsPerSecond: 200,
        maxChannelsPerPrincipal: 100,
        maxChannelLookupsPerSecondPerPrincipal: 1_000_000,
      });
      const honest = await open(server, 'c-honest', 'honest');
      const bigs = await Promise.all(
        Array.from({ length: 40 }, (_, u) => open(server!, `c-big-${u}`, `big${u}`)),
      );
      const smalls = await Promise.all(
        Array.from({ length: 60 }, (_, u) => open(server!, `c-small-${u}`, `small${u}`)),
      );
      const answers = [
        ...bigs.map((s, u) =>
          s.request({ id: `b${u}`, type: 'SUB', payload: { channels: fresh(`big${u}`, 100) } }, 60_000),
        ),
        ...smalls.map((s, u) =>
          s.request({ id: `s${u}`, type: 'SUB', payload: { channels: fresh(`small${u}`, 10) } }, 60_000),
        ),
      ];
      await eventually(() => {
        sample();
        return server!.stats().lookupBacklog > 150;
      }, 10_000);
      // An honest SUB of one channel is admitted (or, past the hard bound, refused and asked
      // again) and answered; PNGs are answered meanwhile.
      let honestReply: Record<string, unknown> | undefined;
      for (let i = 0; !honestReply; i++) {
        const r = (
          await honest.request(
            { id: `h${i}`, type: 'SUB', payload: { channels: { 'honest-board': {} } } },
            30_000,
          )
        ).at(-1);
        sample();
        if (r.type === 'SYN') honestReply = r;
        else {
          expect(r).toMatchObject({ type: 'NAK', error: { code: 'rate_limited' } });
          await honest.request({ id: `hp${i}`, type: 'PNG' }).catch(() => undefined);
        }
      }
      for (let i = 0; i < 5; i++) {
        const pong = honest.until((f) => f.id === `p${i}` && f.type === 'ACK', 30_000);
        honest.send({ id: `p${i}`, type: 'PNG' });
        await pong;
      }
      let refused = 0;
      for (const r of await Promise.all(answers)) {
        const last = r.at(-1);
        if (last.type === 'NAK') {
          expect(last).toMatchObject({ error: { code: 'rate_limited' } });
          refused++;
        } else expect(last.type).toBe('SYN');
      }
      console.log(`[concurrent] backlog peak ${peakBacklog}; ${refused}/100 SUBs refused`);
      expect(peakBacklog).toBeLessThanOrEqual(400);
      // 40 × 100 + 60 × 10 = 4 600 look-ups asked: most had to be refused.
      expect(refused).toBeGreaterThanOrEqual(40 - 4);
      await eventually(() => server!.stats().lookupBacklog === 0, 20_000);
    },
    90_000,
  );
});

describe('F3: no work for requesters that left', () => {
  it.each(local)(
    '$name: attackers close their sockets: backlog, queued bytes and their records fall to 0, nothing more looked up; an honest SYN and SUB answered',
    async ({ make }) => {
      const w = watched(await make());
      const server = await h.start<{ id: string }>({
        authenticate,
        store: w.store,
        // 100 look-ups per second; bound max(100, 400) = 400.
        maxChannelLookupsPerSecond: 100,
        maxChannelsPerPrincipal: 400,
        maxChannelLookupsPerSecondPerPrincipal: 1_000_000,
      });
      const attackers = await Promise.all(
        Array.from({ length: 4 }, (_, u) => open(server, `c-atk-${u}`, `atk${u}`)),
      );
      // Each sends a SUB of 100 fresh channels, then 5 more that wait in its socket's lane.
      for (const [u, s] of attackers.entries()) {
        for (let k = 0; k < 6; k++) {
          s.send({ id: `a${u}-${k}`, type: 'SUB', payload: { channels: fresh(`atk${u}-${k}`, 100) } });
        }
      }
      await eventually(
        () => server.stats().lookupBacklog > 200 && server.stats().queuedBytes > 0 && w.looked() > 0,
        10_000,
      );
      for (const s of attackers) s.ws.terminate();
      const lookedAtClose = w.looked();
      // Within a bounded wait: the backlog is given back, the queued bytes released and the
      // records their SUBs made freed (before FIX1: 2 400 look-ups went on at 100 per second).
      await eventually(
        () => server.stats().lookupBacklog === 0 && server.stats().queuedBytes === 0,
        5_000,
        'backlog and queued bytes at 0',
      );
      await expect.poll(() => w.store.channelCount?.(), { timeout: 5_000 }).toBe(0);
      const lookedAfter = w.looked();
      console.log(`[concurrent] left: ${lookedAtClose} looked up at close, ${lookedAfter} after`);
      // At most the slices granted before the sockets closed were looked up after it.
      expect(lookedAfter - lookedAtClose).toBeLessThanOrEqual(4 * 32);
      // An honest client: a 20 KB SYN and a SUB, answered.
      const honest = await open(server, 'c-honest', 'honest');
      const syn = await honest.request({ id: 'y1', type: 'SYN', payload: ['x'.repeat(20_000)] });
      expect(syn.at(-1)).toMatchObject({ id: 'y1', type: 'SYN' });
      const sub = await honest.request({
        id: 'h1',
        type: 'SUB',
        payload: { channels: { 'honest-board': {} } },
      });
      expect(sub.at(-1)).toMatchObject({ id: 'h1', type: 'SYN' });
    },
    60_000,
  );

  it.each(local)(
    '$name: an HTTP poll aborted by its client: its backlog and records fall to 0, nothing more looked up',
    async ({ make }) => {
      const w = watched(await make());
      const server = await h.start<{ id: string }>({
        authenticate,
        store: w.store,
        // 100 look-ups per second; bound max(100, 600) = 600: the poll's 600 take ~6 s.
        maxChannelLookupsPerSecond: 100,
        maxChannelsPerPrincipal: 600,
        maxChannelLookupsPerSecondPerPrincipal: 1_000_000,
      });
      const body = JSON.stringify({ id: 'q1', type: 'SUB', payload: { channels: fresh('gone', 600) } });
      const req = request(httpUrl(server), {
        method: 'POST',
        headers: {
          'Content-Type': 'application/json',
          'Content-Length': String(Buffer.byteLength(body)),
          'X-Client-Id': 'c-gone',
          'X-User': 'gone',
        },
      });
      req.on('error', () => undefined);
      req.end(body);
      await eventually(() => server.stats().lookupBacklog > 0 && server.stats().lookupBacklog < 500, 10_000);
      req.destroy();
      const lookedAtAbort = w.looked();
      await eventually(() => server.stats().lookupBacklog === 0, 3_000, 'backlog at 0');
      await expect.poll(() => w.store.channelCount?.(), { timeout: 3_000 }).toBe(0);
      const lookedAfter = w.looked();
      expect(lookedAfter - lookedAtAbort).toBeLessThanOrEqual(32);
      expect(lookedAfter).toBeLessThan(600);
      // Another client is answered.
      const r = await post(
        httpUrl(server),
        'c-other',
        { id: 'o1', type: 'SUB', payload: { channels: { 'other-board': {} } } },
        { 'X-User': 'other' },
      );
      expect(r.body.at(-1)).toMatchObject({ id: 'o1', type: 'SYN' });
    },
    60_000,
  );
});
