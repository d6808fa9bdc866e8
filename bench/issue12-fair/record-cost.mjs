// Cost of one channel record (a head of a never-published channel): heap on memory, file+heap on SQLite, used_memory on Redis.

import { rmSync, statSync } from 'node:fs';
import { memoryStore } from 'syncwire/server';
import { redisStore } from 'syncwire/stores/redis';
import { sqliteStore } from 'syncwire/stores/sqlite';

const N = +(process.env.N ?? 100000);
const names = Array.from({ length: N }, (_, i) => `f-${i % 100}-${Math.floor(i / 100)}`);
const gc = () => {
  global.gc();
  global.gc();
  return process.memoryUsage().heapUsed;
};
async function fill(store) {
  for (let i = 0; i < N; i += 500) await store.heads(names.slice(i, i + 500));
}
{
  const s = memoryStore();
  const b = gc();
  await fill(s);
  const a = gc();
  console.log('memory: heap bytes/record', ((a - b) / N).toFixed(0), 'count', await s.channelCount());
  await s.close();
}
{
  const f = `/tmp/fair-rc-${process.pid}.db`;
  const s = sqliteStore({ file: f });
  const b = gc();
  await fill(s);
  const a = gc();
  await s.close();
  const size = statSync(f).size + (statSync(f + '-wal', { throwIfNoEntry: false })?.size ?? 0);
  console.log(
    'sqlite: file bytes/record',
    (size / N).toFixed(0),
    'heap bytes/record',
    ((a - b) / N).toFixed(0),
  );
  rmSync(f, { force: true });
  rmSync(f + '-wal', { force: true });
  rmSync(f + '-shm', { force: true });
}
if (process.env.REDIS_URL) {
  const { Redis } = await import('ioredis');
  const c = new Redis(process.env.REDIS_URL);
  const used = async () => Number(/used_memory:(\d+)/.exec(await c.info('memory'))[1]);
  const s = await redisStore({ url: process.env.REDIS_URL }, { prefix: 'rc:' });
  const b = await used();
  for (let i = 0; i < N; i += 500) await Promise.all(names.slice(i, i + 500).map((n) => s.head(n)));
  const a = await used();
  console.log('redis: used_memory bytes/record', ((a - b) / N).toFixed(0), 'count', await s.channelCount());
  await s.close();
  await c.flushall();
  c.disconnect();
}
process.exit(0);
