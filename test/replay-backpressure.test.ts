/**
 * Replay flow control (issue 12 finding 3; PROTOCOL §3 "Replay flow control"), against a real
 * server in a child process (`--expose-gc`, test/fixtures/fault-server.ts) on the memory,
 * SQLite and Redis stores.
 *
 * Before: a replay waited only when a socket's send buffer passed half of `maxBufferedBytes`
 * (4 MiB), so every socket that stopped reading during a catch-up held ~4–5 MiB of heap, with
 * no limit over all sockets (128 such sockets crashed a server). Now a replay sends its next
 * message only under `replayHighWaterBytes`, drops its page while it waits, all replays
 * together wait while `maxReplayBufferedBytes` is reached, and a socket that does not drain
 * within `replayDrainTimeoutMs` is closed with 4429.
 *
 * Scenario: a channel holds HISTORY messages of ~MSG_BYTES (~20 MB, more than the kernel's
 * socket buffers take). ATTACKERS raw `ws` sockets pause reading and ask for the whole
 * history. Asserted while they stall the server: the server's heap + external after GC grew by
 * less than HEAP_BOUND (the old code: ≥ 4 MiB per socket), `stats().replayBufferedBytes` stays
 * within the budget plus one frame, a well-behaved client's operation is answered, and its
 * own catch-up of the whole history arrives complete and in order. Then every attacker was
 * closed by the server, and the code it reads once it reads again is 4429.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, expect, it } from 'vitest';
import { WebSocket } from 'ws';
import { createSyncClient, type SyncClient } from '../src/client/index.js';
import { CloseCodes } from '../src/protocol/index.js';
import { type ChildServer, startChildServer } from './helpers/child-server.js';
import { describeWith, REDIS_SERVER, type RedisServer, startRedis } from './helpers/redis.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const HISTORY = 2500;
const MSG_BYTES = 8000;
const ATTACKERS = 8;
const HIGH_WATER = 64 * KiB;
/** Smaller than ATTACKERS × HIGH_WATER: the server-wide budget is what stops them. */
const BUDGET = 256 * KiB;
const DRAIN_TIMEOUT_MS = 1500;
/**
 * What the attackers may cost: their high-water marks and one frame each, plus slack for the
 * stores' own buffers and GC (measured +0.9 memory, +5.7 SQLite, +1.9 Redis MiB; the code
 * before this bound: +33.5 MiB memory, +95.9 MiB SQLite).
 */
const HEAP_BOUND = ATTACKERS * (HIGH_WATER + 9 * KiB) + 12 * MiB;
const CHANNEL = 'history';

let child: ChildServer | undefined;
let redis: RedisServer | undefined;
const dirs: string[] = [];
const clients: SyncClient[] = [];
const sockets: WebSocket[] = [];
afterEach(async () => {
  for (const s of sockets.splice(0)) s.terminate();
  await Promise.all(clients.splice(0).map((c) => c.close()));
  await child?.stop();
  child = undefined;
});
afterAll(async () => {
  await redis?.stop();
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

interface Memory {
  memory: NodeJS.MemoryUsage;
  stats: { replayBufferedBytes: number; sockets: number };
}

/** Poll `check` every 20 ms until it is true; fail after `ms` with `what`. */
async function until(what: string, check: () => Promise<boolean> | boolean, ms = 30_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** A raw socket that asks for the whole history and stops reading. */
function openAttacker(port: number, i: number): Promise<WebSocket> {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(`ws://127.0.0.1:${port}/sync?clientId=attacker-${i}`);
    sockets.push(ws);
    ws.once('open', () => {
      ws.pause();
      ws.send(
        JSON.stringify({ id: `s${i}`, type: 'SUB', payload: { channels: { [CHANNEL]: { since: 0 } } } }),
      );
      resolve(ws);
    });
    ws.once('error', reject);
  });
}

async function scenario(store: string): Promise<void> {
  child = await startChildServer({
    FAULT_SERVER_STORE: store,
    FAULT_SERVER_OPTIONS: JSON.stringify({
      replayHighWaterBytes: HIGH_WATER,
      maxReplayBufferedBytes: BUDGET,
      replayDrainTimeoutMs: DRAIN_TIMEOUT_MS,
    }),
  });
  const server = child;
  const { port } = server;
  await server.call('publishMany', { channel: CHANNEL, n: HISTORY, bytes: MSG_BYTES }, 60_000);

  const honest = createSyncClient({
    url: `ws://127.0.0.1:${port}/sync`,
    WebSocket: WebSocket as never,
  });
  clients.push(honest);
  const seqs: number[] = [];
  let resets = 0;
  honest.messages$.subscribe((m) => {
    if (m.channel === CHANNEL) seqs.push(m.seq);
  });
  honest.resets$.subscribe(() => resets++);
  const failures: string[] = [];
  honest.failures$.subscribe((f) => failures.push(`${f.kind}${f.code === undefined ? '' : ` ${f.code}`}`));
  expect(await honest.send({ id: 'before' })).toEqual({ id: 'before' });
  const before = await server.call<Memory>('memory');

  const attackers = await Promise.all(Array.from({ length: ATTACKERS }, (_, i) => openAttacker(port, i)));
  await until('the replay budget to fill', async () => {
    const { stats } = await server.call<Memory>('counts');
    return stats.replayBufferedBytes >= BUDGET;
  });
  const during = await server.call<Memory>('memory');
  const growth =
    during.memory.heapUsed + during.memory.external - (before.memory.heapUsed + before.memory.external);
  console.log(
    `[replay-backpressure] ${store.split(':')[0]}: heap+external +${(growth / MiB).toFixed(1)} MiB ` +
      `with ${ATTACKERS} non-reading replays of ${((HISTORY * MSG_BYTES) / MiB).toFixed(0)} MB ` +
      `(bound ${(HEAP_BOUND / MiB).toFixed(1)} MiB); replayBufferedBytes ${during.stats.replayBufferedBytes}`,
  );
  expect(growth).toBeLessThan(HEAP_BOUND);
  expect(during.stats.replayBufferedBytes).toBeLessThanOrEqual(BUDGET + 9 * KiB);

  // The well-behaved client is answered while the attackers hold the budget, and its own
  // catch-up of the whole history arrives once they are closed: complete, in order.
  expect(await honest.send({ id: 'during' })).toEqual({ id: 'during' });
  const state = await honest.subscribe(CHANNEL, { since: 0 });
  expect(state.recovered).toBe(true);
  // (Should the catch-up outlast the client's patience, it redials and resumes from its
  // cursor: the whole history still arrives, once each.)
  await until('the whole history at the honest client', () => seqs.length >= HISTORY, 60_000);
  expect(seqs).toEqual(Array.from({ length: HISTORY }, (_, i) => i + 1));
  expect(resets).toBe(0);
  if (failures.length > 0)
    console.log(`[replay-backpressure] honest client socket failures: ${failures.join(', ')}`);

  // Every attacker was given up on by the server (its subscription is gone) ...
  await until('every attacker to be closed by the server', async () => {
    for (let i = 0; i < ATTACKERS; i++) {
      const subs = await server.call<string[]>('subscriptionsOf', { clientId: `attacker-${i}` });
      if (subs.length > 0) return false;
    }
    return true;
  });
  // ... and its connection is gone: it reads 4429 if it got to the close frame within the close
  // grace (1 s), else the server cut the TCP connection after it (1006 on this side) rather than
  // keep a peer that does not read (fifth round, F1: unanswered close frames held descriptors).
  const codes = await Promise.all(
    attackers.map(
      (ws) =>
        new Promise<number>((resolve) => {
          ws.on('message', () => {});
          ws.once('close', (code) => resolve(code));
          ws.resume();
        }),
    ),
  );
  for (const code of codes) expect([CloseCodes.slowConsumer, 1006]).toContain(code);
  const after = await server.call<Memory>('counts');
  expect(after.stats.replayBufferedBytes).toBe(0);
  expect(await honest.send({ id: 'after' })).toEqual({ id: 'after' });
}

it('memory store: non-reading replays stay within the high-water marks and the budget; an honest client is served', async () => {
  await scenario('memory');
}, 120_000);

it('SQLite store: non-reading replays stay within the high-water marks and the budget; an honest client is served', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'syncwire-replay-bp-'));
  dirs.push(dir);
  await scenario(`sqlite:${join(dir, 'history.db')}`);
}, 120_000);

describeWith(REDIS_SERVER, 'redis-server', 'Redis store', () => {
  it('non-reading replays stay within the high-water marks and the budget; an honest client is served', async () => {
    redis ??= await startRedis();
    await scenario(`redis:${redis.url}`);
  }, 120_000);
});
