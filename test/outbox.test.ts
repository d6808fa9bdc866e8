/**
 * The durable outbox and request identity, against a real server (test/helpers/harness.ts),
 * real files and real child processes: restarts on one file storage never collide on request
 * ids; operations left by a process that exited (or was killed mid-batch) are sent by the next
 * one, each applied once, the restored batch with its own id; a storage that cannot be written
 * is reported and never crashes the process; the machine sends a restored batch as it is.
 */
import { spawn } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterEach, describe, expect, it } from 'vitest';
import { createActor, fromCallback, fromPromise } from 'xstate';
import { connectionMachine } from '../machines/connection.js';
import { fileStorage } from '../src/client/file-storage.js';
import {
  type Failure,
  memoryStorage,
  type OutboxSnapshot,
  type Restored,
  SyncError,
} from '../src/client/index.js';
import { appliedOnce, type Rig, rig, until } from './helpers/harness.js';
import { startLyingServer } from './helpers/lying-server.js';
import { closedPort, outboxIn, scratch } from './helpers/outbox-files.js';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const CHILD = fileURLToPath(new URL('./fixtures/outbox-client.ts', import.meta.url));

let r: Rig | undefined;
const { tempDir, children, cleanup } = scratch('outbox');
afterEach(() =>
  cleanup(async () => {
    await r?.close();
    r = undefined;
  }),
);

interface ChildInfo {
  clientId: string;
  ops: number;
  batches: number;
  failures: string[];
}

/** Run the outbox client fixture; resolves with its `written` report (and its exit, if any). */
function runChild(env: Record<string, string>) {
  const proc = spawn(process.execPath, ['--import', 'tsx', CHILD], {
    cwd: ROOT,
    env: { ...process.env, ...env },
    stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
  });
  children.add(proc);
  const exited = new Promise<number | null>((resolve) => proc.once('exit', (code) => resolve(code)));
  const written = new Promise<ChildInfo>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('child: no written report within 20 s')), 20_000);
    proc.on('message', (m) => {
      const msg = m as ChildInfo & { type: string };
      if (msg.type === 'written') {
        clearTimeout(timer);
        resolve(msg);
      }
    });
    proc.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`child exited with ${code} before its report`));
    });
  });
  return { proc, written, exited };
}

describe('durable outbox (Node, file storage)', () => {
  it('a client restarted three times on one file: each operation applied once, each resolving with its own result', async () => {
    const path = join(tempDir(), 'client.json');
    r = await rig();
    const ids = new Set<string>();
    for (let i = 0; i < 3; i++) {
      const c = r.client({ storage: fileStorage(path) });
      ids.add(c.clientId);
      const pending: number[] = [];
      c.pending$.subscribe((n) => pending.push(n));
      const res = await c.send({ id: `restart-${i}` });
      expect(res).toEqual({ id: `restart-${i}`, successes: [`restart-${i}`] });
      expect(pending).toEqual([0, 1, 0]);
      await c.close();
    }
    expect(ids.size).toBe(1);
    appliedOnce(r.ledger, ['restart-0', 'restart-1', 'restart-2']);
    expect(r.ledger.applied.size).toBe(3);
    expect(outboxIn(path, [...ids][0]!)).toBeUndefined();
  });

  it('operations queued while the server is down survive the process exiting; the next process sends them once, results on restored$', async () => {
    const path = join(tempDir(), 'client.json');
    const port = await closedPort();
    const child = runChild({
      SYNCWIRE_FILE: path,
      SYNCWIRE_URL: `ws://127.0.0.1:${port}/sync`,
      SYNCWIRE_OPS: '3',
      SYNCWIRE_EXIT: 'written',
    });
    const info = await child.written;
    expect(await child.exited).toBe(0);
    // On disk: the three operations and the batch the dead process formed (and tried to send).
    const left = outboxIn(path, info.clientId)!;
    expect(left.ops).toHaveLength(3);
    expect(left.batches).toHaveLength(1);
    const batchId = left.batches[0]!.id;

    r = await rig();
    const c = r.client({ storage: fileStorage(path) });
    expect(c.clientId).toBe(info.clientId);
    const restored: Restored[] = [];
    const changes: unknown[] = [];
    c.restored$.subscribe((x) => restored.push(x));
    c.successes$.subscribe((x) => changes.push(...x));
    expect(await c.loaded).toBe(3);
    await until(() => restored.length === 3, 10_000, 'three restored results');
    expect(restored.map((x) => ('result' in x ? x.result : x.error))).toEqual(
      [0, 1, 2].map((i) => ({
        id: `crash-${i}`,
        successes: [`crash-${i}`],
      })),
    );
    // The batch went again with the id the first process gave it.
    expect(new Set(restored.map((x) => x.id))).toEqual(new Set([batchId]));
    expect(changes).toEqual(['crash-0', 'crash-1', 'crash-2']);
    appliedOnce(r.ledger, ['crash-0', 'crash-1', 'crash-2']);
    await until(() => c.pending === 0, 5000, 'pending 0');
    await until(() => outboxIn(path, info.clientId) === undefined, 5000, 'outbox emptied on disk');
    // A new operation after the restored ones: its own result.
    expect(await c.send({ id: 'after' })).toEqual({ id: 'after', successes: ['after'] });
  }, 40_000);

  it('a process killed while the server processes its batch: the next one resends the same id, the server applies it once', async () => {
    const path = join(tempDir(), 'client.json');
    let release!: () => void;
    const held = new Promise<void>((resolve) => {
      release = resolve;
    });
    let entered!: () => void;
    const inOnSync = new Promise<void>((resolve) => {
      entered = resolve;
    });
    r = await rig({
      // The harness's ledger, with a signal when the first batch reaches onSync and is held.
      onSync: async (ops) => {
        entered();
        await held;
        const ids = ops.map((o) => String((o as { id: string }).id));
        r!.ledger.batches.push(ids);
        for (const id of ids) r!.ledger.applied.set(id, (r!.ledger.applied.get(id) ?? 0) + 1);
        return ids.map((id) => ({ id, successes: [id] }));
      },
    });
    const child = runChild({ SYNCWIRE_FILE: path, SYNCWIRE_URL: r.proxy.wsUrl, SYNCWIRE_OPS: '3' });
    const info = await child.written;
    await until(() => outboxIn(path, info.clientId)?.batches.length === 1, 10_000, 'batch recorded');
    const batchId = outboxIn(path, info.clientId)!.batches[0]!.id;
    await inOnSync;
    // The batch is on the server (recorded before it was sent; the server is holding it): kill.
    child.proc.kill('SIGKILL');
    await child.exited;
    release();
    await until(() => r!.ledger.batches.length === 1, 10_000, 'the held batch applied');

    const c = r.client({ storage: fileStorage(path) });
    const restored: Restored[] = [];
    c.restored$.subscribe((x) => restored.push(x));
    await until(() => restored.length === 3, 10_000, 'three restored results');
    expect(restored.every((x) => x.id === batchId && 'result' in x)).toBe(true);
    // Dedupe answered the resend: still one application each, one onSync call.
    appliedOnce(r.ledger, ['crash-0', 'crash-1', 'crash-2']);
    expect(r.ledger.batches).toHaveLength(1);
  }, 40_000);

  it('memoryStorage: operations a closed client never sent are sent by the next client on the same storage', async () => {
    r = await rig();
    const storage = memoryStorage();
    r.proxy.refuse = true;
    r.proxy.httpScript = Array.from({ length: 10_000 }, () => 'network' as const);
    const a = r.client({ storage });
    const rejected: string[] = [];
    for (const id of ['mem-0', 'mem-1']) a.send({ id }).catch((e: SyncError) => rejected.push(e.code));
    await until(
      () => a.pending === 2 && (storage.outbox!.load(a.clientId) as OutboxSnapshot).ops.length === 2,
      5000,
      'stored',
    );
    await a.close();
    expect(rejected).toEqual(['closed', 'closed']);
    expect(r.ledger.applied.size).toBe(0);
    r.proxy.refuse = false;
    r.proxy.httpScript = [];
    const b = r.client({ storage });
    expect(b.clientId).toBe(a.clientId);
    const restored: Restored[] = [];
    b.restored$.subscribe((x) => restored.push(x));
    expect(await b.loaded).toBe(2);
    await until(() => restored.length === 2, 10_000, 'restored');
    expect(restored.map((x) => x.op)).toEqual([{ id: 'mem-0' }, { id: 'mem-1' }]);
    appliedOnce(r.ledger, ['mem-0', 'mem-1']);
    expect((storage.outbox!.load(b.clientId) as OutboxSnapshot).ops).toEqual([]);
  });

  it('a storage whose writes fail: no uncaught exception, failures$ reports kind storage, sends still resolve', async () => {
    const dir = tempDir();
    // A folder that does not exist, and a "folder" that is a file (a read-only directory is no
    // test when the suite runs as root, which CI containers often do).
    const notDir = join(dir, 'plain-file');
    writeFileSync(notDir, 'x');
    const uncaught: unknown[] = [];
    const onUncaught = (e: unknown) => uncaught.push(e);
    process.on('uncaughtException', onUncaught);
    try {
      r = await rig();
      for (const path of [join(dir, 'missing', 'folder', 'client.json'), join(notDir, 'client.json')]) {
        const failures: Failure[] = [];
        const c = r.client({ storage: fileStorage(path), onFailure: (f) => failures.push(f) });
        const id = `rofs-${failures.length}-${path.length}`;
        expect(await c.send({ id })).toEqual({ id, successes: [id] });
        await c.subscribe('notes', { since: 0 });
        await r.server.publish('notes', { x: 1 });
        await until(() => failures.some((f) => f.kind === 'storage'), 5000, 'storage failure');
        expect(failures.find((f) => f.kind === 'storage')?.reason).toMatch(/ENOENT|ENOTDIR/);
        appliedOnce(r.ledger, [id]);
        await c.close();
      }
      // One more turn of the loop for any late write.
      await new Promise((resolve) => setImmediate(resolve));
      expect(uncaught).toEqual([]);
    } finally {
      process.off('uncaughtException', onUncaught);
    }
  });
});

describe('request identity', () => {
  it('two instances on one stored clientId make different request ids, none longer than 128 characters', async () => {
    const liar = await startLyingServer();
    try {
      const storage = memoryStorage();
      const long = 'c'.repeat(120);
      const a = createClient(liar.wsUrl, storage, long);
      await a.send({ n: 1 });
      await a.close();
      const b = createClient(liar.wsUrl, storage, long);
      await b.send({ n: 2 });
      await b.close();
      const syns = liar.received.filter((e) => e.type === 'SYN');
      expect(syns).toHaveLength(2);
      expect(syns[0]!.id).not.toBe(syns[1]!.id);
      for (const s of liar.received) expect(s.id.length).toBeLessThanOrEqual(128);
    } finally {
      await liar.close();
    }
  });

  it('NAK id_reused rejects the operations with SyncError id_reused; the outbox lets them go', async () => {
    const liar = await startLyingServer();
    try {
      liar.onFrame = (env, reply) => {
        reply({ id: env.id, type: 'ACK' });
        if (env.type === 'SYN')
          reply({ id: env.id, type: 'NAK', error: { code: 'id_reused', message: 'other payload' } });
        else reply({ id: env.id, type: 'SYN', payload: [{}] });
      };
      const storage = memoryStorage();
      const c = createClient(liar.wsUrl, storage);
      const err = await c.send({ n: 1 }).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(SyncError);
      expect((err as SyncError).code).toBe('id_reused');
      expect(storage.outbox!.load(c.clientId)).toEqual({ ops: [], batches: [] });
      expect(c.pending).toBe(0);
      await c.close();
    } finally {
      await liar.close();
    }
  });
});

describe('the machine and restored batches', () => {
  const inert = connectionMachine.provide({
    actors: {
      socket: fromCallback(() => () => {}) as never,
      http: fromPromise(() => new Promise(() => {})) as never,
    },
  });
  const input = { clientId: 'c', timeout: 1000, maxBatch: 2, pollInterval: 1000, maxBackoff: 1000 };

  it('sends a restored batch as it is (its id, its ops), before newer operations, and announces only batches it forms', () => {
    const actor = createActor(inert, { input });
    const batched: unknown[] = [];
    actor.on('batched', (e) => batched.push(e));
    actor.start();
    actor.send({
      type: 'SEND',
      items: [
        { key: 1, kind: 'batch', id: 'old:7', ops: ['a', 'b', 'c'], keys: [1, 2, 3] },
        { key: 4, kind: 'op', op: 'd' },
        { key: 5, kind: 'op', op: 'e' },
        { key: 6, kind: 'op', op: 'f' },
      ],
    });
    actor.send({ type: 'WS.OPEN' });
    const s1 = actor.getSnapshot().context;
    // A restored batch ignores maxBatch (2): it must be reproduced exactly.
    expect(s1.inflight).toMatchObject({
      id: 'old:7',
      type: 'SYN',
      payload: ['a', 'b', 'c'],
      keys: [1, 2, 3],
    });
    expect(batched).toEqual([]);
    actor.send({ type: 'FRAME', frame: { type: 'SYN', id: 'old:7', payload: [1, 2, 3] } });
    const s2 = actor.getSnapshot().context;
    expect(s2.inflight).toMatchObject({ type: 'SYN', payload: ['d', 'e'], keys: [4, 5] });
    expect(s2.inflight!.id).toMatch(/^[0-9a-f]{16}:\d+$/);
    expect(batched).toEqual([{ type: 'batched', id: s2.inflight!.id, keys: [4, 5] }]);
    actor.stop();
  });
});

import { WebSocket } from 'ws';
import { createSyncClient, type SyncStorage } from '../src/client/index.js';

function createClient(url: string, storage: SyncStorage, clientId?: string) {
  return createSyncClient({
    url,
    storage,
    timeout: 200,
    WebSocket: WebSocket as never,
    ...(clientId ? { clientId } : {}),
  });
}
