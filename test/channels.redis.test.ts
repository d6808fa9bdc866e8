/**
 * Issue 11 on Redis: revocation reaching a socket held by another server instance (through
 * Redis pub/sub; each instance has its own redisStore and connections, so nothing is shared
 * in memory), and channel keys freed after 100,000 distinct channel names were subscribed
 * and abandoned. Real redis-server.
 */
import { Redis } from 'ioredis';
import { afterAll, afterEach, beforeAll, expect, it } from 'vitest';
import { WebSocket } from 'ws';
import { createSyncClient, type SyncClient } from '../src/client/index.js';
import { createSyncServer, type SyncServer } from '../src/server/index.js';
import { redisStore } from '../src/stores/redis.js';
import { next, until } from './helpers/harness.js';
import { harness } from './helpers/raw.js';
import { describeWith, REDIS_SERVER, type RedisServer, startRedis, stopAll } from './helpers/redis.js';

let redis: RedisServer;
let n = 0;
const servers: SyncServer[] = [];
const clients: SyncClient[] = [];
const quiet = () => {};
const h = harness();

describeWith(REDIS_SERVER, 'redis-server', 'channels on redis', () => {
  beforeAll(async () => {
    redis = await startRedis();
  }, 30_000);
  afterAll(stopAll);
  afterEach(async () => {
    for (const c of clients.splice(0)) await c.close();
    for (const s of servers.splice(0)) await s.close();
  });

  async function serverOn(prefix: string, opts: Parameters<typeof createSyncServer>[0] | object = {}) {
    const s = await createSyncServer({
      onSync: (ops) => ops,
      store: await redisStore({ url: redis.url }, { prefix, onError: quiet }),
      onError: quiet,
      ...opts,
    });
    servers.push(s);
    return s;
  }

  it('server.recheck() on instance A revokes a subscription held by a socket on instance B', async () => {
    const prefix = `ch${process.pid}-${++n}:`;
    const allowed = new Set(['board-1', 'board-2']);
    const authorize = (_p: unknown, channel: string) => allowed.has(channel);
    const a = await serverOn(prefix, { authorize });
    const b = await serverOn(prefix, { authorize });
    const c = createSyncClient({
      url: `ws://127.0.0.1:${b.address().port}/sync`,
      WebSocket: WebSocket as never,
      timeout: 500,
    });
    clients.push(c);
    const got: string[] = [];
    c.messages$.subscribe((m) => got.push(`${m.channel}:${m.seq}`));
    await c.subscribe('board-1');
    await c.subscribe('board-2');
    allowed.delete('board-2');
    expect(await a.recheck()).toBe(0); // A holds no subscription itself
    expect(await next(c.refused$)).toMatchObject({ channel: 'board-2', code: 'forbidden' });
    expect(c.subscriptionState('board-2')).toBe('refused');
    await a.publish('board-2', 'no');
    await a.publish('board-1', 'yes');
    await until(() => got.includes('board-1:1'), 5000, 'board-1 through B');
    expect(got).toEqual(['board-1:1']);
    expect(b.stats().channels).toBe(1);

    // server.unsubscribe and disconnect from A reach B as well.
    const ended = next(c.refused$);
    await a.unsubscribe({ channel: 'board-1', clientId: c.clientId });
    expect(await ended).toMatchObject({ channel: 'board-1', code: 'unsubscribed' });
    await until(() => b.stats().channels === 0, 5000, 'B dropped board-1');
    const closed = next(c.failures$, (f) => f.kind === 'close');
    await a.disconnect({ clientId: c.clientId });
    await closed;
  });

  it('channel keys are flat after 100,000 distinct channel names subscribed and abandoned', async () => {
    const prefix = `flat${process.pid}-${++n}:`;
    const s = await serverOn(prefix, {
      maxChannelsPerPrincipal: 100_000,
      maxChannels: 200_000,
      maxChannelLookupsPerSecond: 1_000_000,
    });
    const admin = new Redis(redis.url);
    const countKeys = async () => {
      let cursor = '0';
      let total = 0;
      do {
        const [nextCursor, keys] = await admin.scan(cursor, 'MATCH', `${prefix}*`, 'COUNT', 5000);
        cursor = nextCursor;
        total += keys.filter(
          (k) => !k.startsWith(`${prefix}feed`) && !k.startsWith(`${prefix}append:`),
        ).length;
      } while (cursor !== '0');
      return total;
    };
    try {
      await s.publish('kept', 'history');
      const sock = await h.socket(s);
      await sock.request({ id: 'l', type: 'SUB', payload: { channels: { live: {} } } });
      const before = await countKeys();
      for (let i = 0; i < 100_000; i += 1000) {
        const channels: Record<string, object> = {};
        for (let j = i; j < i + 1000; j++) channels[`tmp-${j}`] = {};
        await sock.request({ id: `s${i}`, type: 'SUB', payload: { channels } }, 30_000);
        await sock.request({ id: `u${i}`, type: 'UNS', payload: { channels: Object.keys(channels) } });
      }
      // Records of never-published channels only this process looked at are freed as soon as
      // nobody follows them (releaseChannels, in slices after each UNS): no growth.
      await expect.poll(countKeys, { timeout: 10_000 }).toBe(before);
      const peak = await countKeys();
      await s.housekeeping();
      const after = await countKeys();
      console.log(
        `redis keys under the prefix: before ${before}, after 100,000 abandoned ${peak}, after housekeeping ${after}`,
      );
      expect(after).toBe(before);
    } finally {
      admin.disconnect();
    }
  }, 180_000);
});
