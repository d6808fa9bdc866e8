/**
 * redisStore against a real redis-server: the store contract every store passes, then what
 * only a shared store has to get right: fan-out between store instances (as between server
 * processes), lost data showing up as new epochs, and dedupe claims shared across instances.
 */

import { Redis } from 'ioredis';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { type RedisHistoryStore, redisStore } from '../src/stores/redis.js';
import type { StoredMessage } from '../src/stores/types.js';
import {
  describeWith,
  REDIS_SERVER,
  type RedisServer,
  startRedis,
  stopAll,
  waitFor,
} from './helpers/redis.js';
import { storeContract } from './helpers/store-contract.js';

let redis: RedisServer;
let places = 0;
const prefix = () => `t${process.pid}-${++places}:`;
const quiet = (e: unknown, w: string) => {
  if (process.env.DBG) console.log('store error', w, String(e));
};

describeWith(REDIS_SERVER, 'redis-server', 'redis store', () => {
  beforeAll(async () => {
    redis = await startRedis();
  }, 30_000);
  afterAll(stopAll);

  describe('contract', () => {
    storeContract({
      name: 'redis',
      durable: true,
      dedupe: true,
      place: prefix,
      open: (place, opts) => redisStore({ url: redis.url }, { ...opts, prefix: place, onError: quiet }),
    });
  });

  const opened: RedisHistoryStore[] = [];
  const clients: Redis[] = [];
  const open = async (opts: Parameters<typeof redisStore>[1] = {}) => {
    const s = await redisStore({ url: redis.url }, { onError: quiet, ...opts });
    opened.push(s);
    return s;
  };
  const admin = () => {
    const c = new Redis(redis.url, { lazyConnect: false });
    clients.push(c);
    return c;
  };
  afterEach(async () => {
    for (const s of opened.splice(0)) await s.close().catch(() => undefined);
    for (const c of clients.splice(0)) c.disconnect();
  });

  /** Two stores on one prefix: two server processes, as far as Redis can tell. */
  const pair = async (opts: Parameters<typeof redisStore>[1] = {}) => {
    const p = prefix();
    return [await open({ prefix: p, ...opts }), await open({ prefix: p, ...opts })] as const;
  };

  const bySeq = (msgs: StoredMessage[], channel: string) =>
    msgs.filter((m) => m.channel === channel).map((m) => m.seq);
  const range = (from: number, to: number) => Array.from({ length: to - from + 1 }, (_, i) => from + i);

  describe('releaseChannels across processes (two stores on one prefix)', () => {
    it('frees only records no other process looked at; a publication racing the release is kept', async () => {
      const place = prefix();
      const a = await open({ prefix: place });
      const b = await open({ prefix: place });
      // `shared` was looked at by both (b may have a subscriber holding its epoch): a keeps it.
      await a.head('shared');
      const sharedHead = await b.head('shared');
      // `mine` was only looked at by a: freed at once.
      await a.head('mine');
      expect(await a.releaseChannels(['shared', 'mine'], () => true)).toBe(1);
      expect(await b.hasChannel('mine')).toBe(false);
      expect(await b.head('shared')).toEqual(sharedHead);
      // Records a alone made, released by a while b publishes to them at the same time (two
      // connections): every publication is kept, at seq 1 of the epoch the channel has now.
      const names = Array.from({ length: 200 }, (_, i) => `race-${i}`);
      await Promise.all(names.map((n) => a.head(n)));
      // The release goes first and backwards, the appends forwards: the two orders meet.
      const release = a.releaseChannels([...names].reverse(), () => true);
      const [msgs, freed] = await Promise.all([Promise.all(names.map((n) => b.append(n, n))), release]);
      console.log(
        `[redis] release racing 200 appends from another process: ${freed} freed before their append`,
      );
      for (const [i, n] of names.entries()) {
        expect(await a.head(n)).toMatchObject({ epoch: msgs[i]!.epoch, seq: 1 });
        expect((await a.read(n, 0, 10)).map((m) => m.payload)).toEqual([n]);
      }
      // A freed record's new epoch is new: never the one it had before.
      const before = await a.head('again');
      expect(await a.releaseChannels(['again'], () => true)).toBe(1);
      expect((await b.head('again')).epoch).not.toBe(before.epoch);
    });
  });

  describe('fan-out between instances', () => {
    it('delivers concurrent appends from both instances to both, per channel in order, once', async () => {
      const [a, b] = await pair();
      const seenA: StoredMessage[] = [];
      const seenB: StoredMessage[] = [];
      a.watch((m) => seenA.push(m));
      b.watch((m) => seenB.push(m));
      // watch() is synchronous, its SUBSCRIBE is not: probe until each hears the other.
      await waitFor(
        async () => {
          await Promise.all([a.append('warm', 'a'), b.append('warm', 'b')]);
          return seenA.some((m) => m.channel === 'warm') && seenB.some((m) => m.channel === 'warm');
        },
        5000,
        'both watchers to be subscribed',
      );

      const N = 300;
      await Promise.all(
        Array.from({ length: N }, (_, i) =>
          (i % 2 ? a : b).append(`c${i % 3}`, { i, from: i % 2 ? 'a' : 'b' }),
        ),
      );
      for (const seen of [seenA, seenB]) {
        await waitFor(() => seen.filter((m) => m.channel !== 'warm').length >= N, 5000, 'every append');
        for (const c of ['c0', 'c1', 'c2']) expect(bySeq(seen, c), c).toEqual(range(1, N / 3));
      }
      // Both saw the same messages, byte for byte (the order between channels may differ).
      const sorted = (seen: StoredMessage[]) =>
        seen
          .filter((m) => m.channel !== 'warm')
          .sort((x, y) => x.channel.localeCompare(y.channel) || x.seq - y.seq);
      expect(sorted(seenA)).toEqual(sorted(seenB));
    });

    it('delivers a channel first published on another instance', async () => {
      const [a, b] = await pair();
      const seen: StoredMessage[] = [];
      a.watch((m) => seen.push(m));
      await a.head('never-published-here-yet'); // any command: the subscription is on its way
      await waitFor(
        async () => {
          await b.append('probe', 'x');
          return seen.some((m) => m.channel === 'probe');
        },
        5000,
        'the watcher to be subscribed',
      );
      const sent = await b.append('elsewhere', { hello: 1 });
      await waitFor(() => seen.some((m) => m.channel === 'elsewhere'), 5000, 'the remote append');
      expect(seen.filter((m) => m.channel === 'elsewhere')).toEqual([sent]);
    });

    it('fills in order when a local append overtakes a remote one it has not seen yet', async () => {
      const [a, b] = await pair();
      const seen: StoredMessage[] = [];
      a.watch((m) => seen.push(m));
      await a.append('x', 1); // tracked by a at seq 1
      // b appends twice; a appends right away, before the notifications reach it.
      await Promise.all([b.append('x', 2), b.append('x', 3)]);
      const mine = await a.append('x', 4);
      // By the time a's append resolved, a's listeners had everything up to it, in order.
      expect(bySeq(seen, 'x')).toEqual([1, 2, 3, 4]);
      expect(seen.at(-1)).toEqual(mine);
    });
  });

  it('forgets idle channels beyond maxFollowedChannels without skipping or repeating', async () => {
    const [a, b] = await pair({ maxFollowedChannels: 10 });
    const seen: StoredMessage[] = [];
    a.watch((m) => seen.push(m));
    await waitFor(
      async () => {
        await b.append('probe', 'x');
        return seen.some((m) => m.channel === 'probe');
      },
      5000,
      'the watcher to be following',
    );
    const names = range(1, 40).map((i) => `many-${i}`);
    for (let round = 1; round <= 5; round++) {
      // From both sides: b's appends reach a through the feed, a's through its own path.
      await Promise.all(names.map((n, i) => (i % 2 ? a : b).append(n, round)));
    }
    await waitFor(
      () => seen.filter((m) => m.channel.startsWith('many-')).length >= 200,
      5000,
      'every append',
    );
    for (const n of names) expect(bySeq(seen, n), n).toEqual([1, 2, 3, 4, 5]);
  });

  describe('lost data', () => {
    it('starts a new epoch after FLUSHALL, and the watcher follows it from seq 1', async () => {
      const [a, b] = await pair();
      const seen: StoredMessage[] = [];
      a.watch((m) => seen.push(m));
      for (let i = 0; i < 5; i++) await a.append('ch', i);
      const before = await a.head('ch');
      expect(before.seq).toBe(5);
      await admin().flushall();
      const after = await b.head('ch');
      expect(after.epoch).not.toBe(before.epoch);
      expect(after).toMatchObject({ seq: 0, first: 1 });
      const m1 = await b.append('ch', 'new-1');
      expect(m1).toMatchObject({ seq: 1, epoch: after.epoch });
      await waitFor(() => seen.some((m) => m.epoch === after.epoch), 5000, 'the new epoch on a');
      expect(seen.filter((m) => m.epoch === after.epoch)).toEqual([m1]);
      expect(bySeq(seen, 'ch')).toEqual([1, 2, 3, 4, 5, 1]);
    });

    it('treats a lost counter or a lost stream as lost history', async () => {
      const p = prefix();
      const store = await open({ prefix: p });
      const r = admin();
      for (let i = 0; i < 3; i++) await store.append('m', i);
      const e1 = (await store.head('m')).epoch;
      // The epoch and counter gone, the stream still there (e.g. evicted): not a fresh channel.
      await r.del(`${p}m:m`);
      const h2 = await store.head('m');
      expect(h2.epoch).not.toBe(e1);
      expect(h2).toMatchObject({ seq: 0, first: 1 });
      expect(await store.read('m', 0, 10)).toEqual([]);
      // Now the stream gone and the counter left: also lost.
      for (let i = 0; i < 2; i++) await store.append('m', i);
      await r.del(`${p}s:m`);
      const h3 = await store.head('m');
      expect(h3.epoch).not.toBe(h2.epoch);
      expect(h3.seq).toBe(0);
      expect((await store.append('m', 'again')).seq).toBe(1);
    });

    it('survives a redis-server restart without persistence: reconnects, new epoch, watch resumes', async () => {
      const [a, b] = await pair();
      const seen: StoredMessage[] = [];
      a.watch((m) => seen.push(m));
      await a.append('r', 'before');
      const e1 = (await a.head('r')).epoch;
      await redis.stop();
      await redis.start();
      // Commands wait for the reconnection; the first one after it sees an empty Redis.
      const h = await b.head('r');
      expect(h.epoch).not.toBe(e1);
      expect(h.seq).toBe(0);
      // a's subscriber connection comes back on its own; an append from b reaches it.
      await waitFor(
        async () => {
          await b.append('r', 'after');
          return seen.some((m) => m.epoch === h.epoch);
        },
        10_000,
        'a to hear b after the restart',
      );
      const fresh = seen.filter((m) => m.epoch === h.epoch).map((m) => m.seq);
      expect(fresh).toEqual(range(1, fresh.length));
    }, 20_000);
  });

  describe('dedupe', () => {
    it('claims once across instances; the response is shared', async () => {
      const [a, b] = await pair();
      expect(await a.claim('k1', 60_000)).toEqual({ status: 'new' });
      expect(await b.claim('k1', 60_000)).toEqual({ status: 'pending' });
      expect(await a.claim('k1', 60_000)).toEqual({ status: 'pending' });
      const response = { id: 's1', type: 'SYN', payload: [{ ok: true }] };
      await a.complete('k1', response, 60_000);
      expect(await b.claim('k1', 60_000)).toEqual({ status: 'done', response });
    });

    it('release lets another instance claim; the response expires after its ttl', async () => {
      const [a, b] = await pair();
      expect((await a.claim('k2', 60_000)).status).toBe('new');
      await a.release('k2');
      expect((await b.claim('k2', 60_000)).status).toBe('new');
      await b.complete('k2', [1], 150);
      expect(await a.claim('k2', 60_000)).toEqual({ status: 'done', response: [1] });
      await waitFor(
        async () => (await a.claim('k2', 60_000)).status === 'new',
        3000,
        'the response to expire',
      );
    });

    it('renews a claim while its process lives and frees it when the process is gone', async () => {
      const p = prefix();
      const a = await open({ prefix: p, claimLeaseMs: 300 });
      const b = await open({ prefix: p, claimLeaseMs: 300 });
      const r = admin();
      expect((await a.claim('k3', 60_000)).status).toBe('new');
      const key = `${p}dedupe:k3`;
      // The lease is 300 ms, renewed every 100 ms: watch its TTL go down, then back up.
      const ttls: number[] = [];
      await waitFor(
        async () => {
          ttls.push(await r.pttl(key));
          return ttls.length > 1 && ttls.at(-1)! > ttls.at(-2)!;
        },
        3000,
        'the lease to be renewed',
      );
      expect(Math.min(...ttls)).toBeGreaterThan(0);
      expect((await b.claim('k3', 60_000)).status).toBe('pending');
      // a dies without completing (close stops the renewals, as a crash would).
      await a.close();
      await waitFor(async () => (await b.claim('k3', 60_000)).status === 'new', 3000, 'the lease to lapse');
    });
  });

  describe('idempotent appends', () => {
    it('an append repeated with its key, on any instance, is made once', async () => {
      const [a, b] = await pair();
      const first = await a.append('idem', { v: 1 }, { key: 'c-1:syn-9#0' });
      // The batch re-run elsewhere (its first process died before answering) repeats it.
      expect(await b.append('idem', { v: 1 }, { key: 'c-1:syn-9#0' })).toEqual(first);
      const other = await b.append('idem', { v: 2 }, { key: 'c-1:syn-9#1' });
      expect(other.seq).toBe(first.seq + 1);
      expect((await a.read('idem', 0, 10)).map((m) => m.payload)).toEqual([{ v: 1 }, { v: 2 }]);
    });
  });

  describe('connection', () => {
    it('works on a client you own and leaves it open on close', async () => {
      const client = admin();
      const s = await redisStore({ client }, { prefix: prefix(), onError: quiet });
      const m = await s.append('own', { a: 1 });
      expect(await s.read('own', 0, 10)).toEqual([m]);
      await s.close();
      expect(await client.ping()).toBe('PONG');
      await expect(s.append('own', 1)).rejects.toMatchObject({ code: 'closed' });
    });

    it('keeps apps apart by prefix', async () => {
      const a = await open({ prefix: prefix() });
      const b = await open({ prefix: prefix() });
      await a.append('same', 'a');
      expect(await b.head('same')).toMatchObject({ seq: 0 });
      expect(await b.read('same', 0, 10)).toEqual([]);
    });
  });
});
