/**
 * Server heap under a flood of 1 MiB `SYN`s of `[[{},{},…],…]` (issue 12), on the memory, SQLite
 * and Redis stores. The server runs in a child process with `--expose-gc`
 * (test/fixtures/fault-server.ts with FAULT_SERVER_HOLD=1: the flood's batches are held in a
 * slow `onSync` until released), default limits. Three sockets flood, two of them sharing a
 * clientId, FRAMES frames each; a well-behaved client syncs before, during and after.
 *
 * Each such frame parses to ~21 MiB of heap, so unbounded queueing (main before issue 12)
 * grows the heap by ~21 MiB per frame (60 frames: ~1.2 GiB). The worst shape measured is
 * deeply nested arrays, `[[[[…]]]]`: 28.0 × its bytes (Node 20; README "Limits"), also run
 * below on the memory store. With the byte budget a clientId holds at most
 * `maxQueuedBytesPerClient` (2 MiB by default) of requests, so the flood's two clientIds hold
 * at most 4 MiB of frames: at most 28 × 4 = 112 MiB parsed (~84 MiB for `[[{},…],…]`).
 * Asserted: heapUsed after GC grows by less than HEAP_BOUND_MB while the flood is held, every
 * frame is either taken (ACK) or refused `NAK rate_limited`, and the well-behaved client gets
 * every result.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, expect, it } from 'vitest';
import { WebSocket } from 'ws';
import { createSyncClient, type SyncClient } from '../src/client/index.js';
import { type ChildServer, startChildServer } from './helpers/child-server.js';
import { describeWith, REDIS_SERVER, type RedisServer, startRedis } from './helpers/redis.js';

const MB = 1024 * 1024;
/** The documented bound: 28 × (2 flooding clientIds × 2 MiB) = 112 MiB, plus slack. */
const HEAP_BOUND_MB = 140;
const FRAMES = 20;
const mb = (n: number) => Math.round((n / MB) * 10) / 10;

/** `batch`: `[[{},{},…],…]` (~21 ×); `deep`: `[[[[…]]]]` (~28 ×, the worst shape measured). */
type Shape = 'batch' | 'deep';

/**
 * A SYN just under 1 MiB (the default maxPayloadBytes) of 1,000 operations (the default
 * maxBatch), each an array of empty objects: `[[{},{},…],…]`, ~21 MiB once parsed.
 */
function floodFrame(id: string, shape: Shape): string {
  const head = `{"id":"${id}","type":"SYN","payload":[`;
  if (shape === 'deep') {
    // One operation: arrays nested ~524,000 deep, `[[[…]]]`, just under 1 MiB.
    const depth = Math.floor((MB - head.length - 4) / 2);
    return `${head}${'['.repeat(depth)}${']'.repeat(depth)}]}`;
  }
  const perOp = Math.floor((MB - head.length - 2) / 1000 / 3) - 1;
  const op = `[${Array(perOp).fill('{}').join(',')}]`;
  return `${head}${Array(1000).fill(op).join(',')}]}`;
}

let child: ChildServer | undefined;
let redis: RedisServer | undefined;
const dirs: string[] = [];
const clients: SyncClient[] = [];
afterEach(async () => {
  await Promise.all(clients.splice(0).map((c) => c.close()));
  await child?.stop();
  child = undefined;
});
afterAll(async () => {
  await redis?.stop();
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

interface Flooder {
  ws: WebSocket;
  acks: number;
  limited: number;
  other: string[];
}

function openFlooder(port: number, clientId: string): Promise<Flooder> {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(`ws://127.0.0.1:${port}/sync?clientId=${clientId}`);
    const f: Flooder = { ws, acks: 0, limited: 0, other: [] };
    ws.on('message', (d) => {
      const m = JSON.parse(String(d)) as { type: string; error?: { code: string } };
      if (m.type === 'ACK') f.acks++;
      else if (m.type === 'NAK' && m.error?.code === 'rate_limited') f.limited++;
      else f.other.push(String(d).slice(0, 100));
    });
    ws.once('open', () => resolve(f));
    ws.once('error', reject);
  });
}

async function flood(store: string, shape: Shape = 'batch'): Promise<void> {
  child = await startChildServer({ FAULT_SERVER_HOLD: '1', FAULT_SERVER_STORE: store });
  const { port } = child;
  const well = createSyncClient({
    url: `ws://127.0.0.1:${port}/sync`,
    WebSocket: WebSocket as never,
    timeout: 5000,
  });
  clients.push(well);
  let n = 0;
  const sync = async () => {
    const id = `well-${++n}`;
    expect(await well.send({ id })).toEqual({ id });
  };
  await sync();
  const before = await child.call('memory');
  expect(before.gc).toBe(true);

  const flooders = await Promise.all(['flood-a', 'flood-a', 'flood-b'].map((id) => openFlooder(port, id)));
  const sending = flooders.map(async (f, s) => {
    for (let i = 0; i < FRAMES; i++) {
      f.ws.send(floodFrame(`f${s}-${i}`, shape));
      // Let the socket drain: the flood measures the server, not this process's buffers.
      while (f.ws.bufferedAmount > 2 * MB) await new Promise((r) => setImmediate(r));
    }
  });
  await sync(); // answered during the flood
  await Promise.all(sending);
  const answered = () => flooders.every((f) => f.acks + f.limited >= FRAMES);
  const deadline = Date.now() + 60_000;
  while (!answered()) {
    if (Date.now() > deadline)
      throw new Error(
        `the flood was not answered within 60 s: ${JSON.stringify(flooders.map((f) => [f.acks, f.limited, f.other]))}`,
      );
    await new Promise((r) => setTimeout(r, 20));
  }
  const during = await child.call('memory');
  await sync(); // answered while the flood is held
  const growth = during.memory.heapUsed - before.memory.heapUsed;
  const taken = flooders.reduce((s, f) => s + f.acks, 0);
  const refused = flooders.reduce((s, f) => s + f.limited, 0);
  console.log(
    `[harden-memory] ${store.split(':')[0]} (${shape}): heapUsed after GC ${mb(before.memory.heapUsed)} MiB before, ` +
      `${mb(during.memory.heapUsed)} MiB with the flood held (+${mb(growth)} MiB, bound ${HEAP_BOUND_MB}); ` +
      `${taken} frames taken, ${refused} refused rate_limited, queuedBytes ${during.stats.queuedBytes}`,
  );
  expect(flooders.flatMap((f) => f.other)).toEqual([]);
  expect(taken + refused).toBe(3 * FRAMES);
  // Two flooding clientIds × 2 MiB: at most 2 frames each held.
  expect(taken).toBeLessThanOrEqual(4);
  expect(during.stats.queuedBytes).toBeLessThanOrEqual(2 * 2 * MB);
  expect(growth).toBeLessThan(HEAP_BOUND_MB * MB);

  await child.call('release');
  const deadline2 = Date.now() + 30_000;
  while ((await child.call('memory')).stats.queuedBytes > 0) {
    if (Date.now() > deadline2) throw new Error('queued bytes not released within 30 s');
    await new Promise((r) => setTimeout(r, 50));
  }
  const after = await child.call('memory');
  console.log(
    `[harden-memory] ${store.split(':')[0]}: heapUsed after release ${mb(after.memory.heapUsed)} MiB`,
  );
  await sync();
  for (const f of flooders) f.ws.terminate();
}

it('memory store: the 1 MiB-frame flood keeps the heap bounded and a well-behaved client answered', async () => {
  await flood('memory');
}, 120_000);

it('memory store: a flood of 1 MiB frames of deeply nested arrays (the worst shape, 28×) stays under the same bound', async () => {
  await flood('memory', 'deep');
}, 120_000);

it('SQLite store: the 1 MiB-frame flood keeps the heap bounded and a well-behaved client answered', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'syncwire-harden-'));
  dirs.push(dir);
  await flood(`sqlite:${join(dir, 'history.db')}`);
}, 120_000);

describeWith(REDIS_SERVER, 'redis-server', 'Redis store', () => {
  it('the 1 MiB-frame flood keeps the heap bounded and a well-behaved client answered', async () => {
    redis ??= await startRedis();
    await flood(`redis:${redis.url}`);
  }, 120_000);
});
