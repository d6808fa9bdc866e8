/**
 * `server.close()` while a batch is inside `onSync` (README "Shutdown", docs/multi-process.md
 * crash window): the server starts no new batch, but waits (up to `closeTimeoutMs`) for the
 * running one to finish, publish and have its response stored in the dedupe store before the
 * store closes. A client whose socket closed retries the batch on the server restarted on the
 * same SQLite file and is answered from dedupe: every operation applied once. Real parts: a
 * reference server on 127.0.0.1, a real SQLite file, the reference client on `ws`.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { WebSocket } from 'ws';
import { createSyncClient, type SyncClient } from '../src/client/index.js';
import { createSyncServer, type SyncServer } from '../src/server/index.js';
import { sqliteStore } from '../src/stores/sqlite.js';
import { until } from './helpers/harness.js';

type Op = { id: string; hold?: boolean };

describe('server.close() drains batches running in onSync', () => {
  const dirs: string[] = [];
  const servers: SyncServer[] = [];
  const clients: SyncClient<Op>[] = [];
  afterEach(async () => {
    await Promise.all(clients.splice(0).map((c) => c.close()));
    await Promise.all(servers.splice(0).map((s) => s.close()));
    for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
  });

  /** A server on the SQLite file whose onSync counts applications and can hold an op. */
  const start = async (
    file: string,
    port: number,
    app: {
      applied: Map<string, number>;
      db: Map<string, unknown>;
      entered?: () => void;
      gate?: Promise<void>;
      errors: string[];
    },
    closeTimeoutMs?: number,
  ) => {
    const server = await createSyncServer({
      port,
      store: sqliteStore({ file }),
      snapshot: () => [...app.db.values()],
      closeTimeoutMs,
      onError: (_err, where) => app.errors.push(where),
      onSync: async (ops, { publish }) => {
        const out: unknown[] = [];
        for (const op of ops as Op[]) {
          if (op.hold) {
            app.entered?.();
            await app.gate;
          }
          const value = { id: op.id };
          app.db.set(op.id, value);
          app.applied.set(op.id, (app.applied.get(op.id) ?? 0) + 1);
          await publish('list', { changes: [{ id: op.id, value }] });
          out.push({ ok: op.id });
        }
        return out;
      },
    });
    servers.push(server);
    return server;
  };

  it('a batch mid-onSync at close(): it finishes, its response is kept; the retry on the restarted server is answered from dedupe', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'syncwire-close-'));
    dirs.push(dir);
    const file = join(dir, 'close.db');
    let release!: () => void;
    let entered!: () => void;
    const inside = new Promise<void>((r) => {
      entered = r;
    });
    const app = {
      applied: new Map<string, number>(),
      db: new Map<string, unknown>(),
      entered,
      gate: new Promise<void>((r) => {
        release = r;
      }),
      errors: [] as string[],
    };
    const first = await start(file, 0, app);
    const { port } = first.address();
    const client = createSyncClient<Op>({
      url: `ws://127.0.0.1:${port}/sync`,
      WebSocket: WebSocket as never,
      timeout: 300,
      maxBackoff: 600,
    });
    clients.push(client);
    const view = new Map<string, unknown>();
    client.snapshots$.subscribe((s) => {
      view.clear();
      for (const i of s.data as Array<{ id: string }>) view.set(i.id, i);
    });
    client.changes$.subscribe((cs) => {
      for (const c of cs as Array<{ id: string; value: unknown }>)
        c.value ? view.set(c.id, c.value) : view.delete(c.id);
    });
    await client.subscribe('list', { snapshot: true });
    // One batch [a, b]: a is applied and published, then onSync waits inside b.
    const sa = client.send({ id: 'a' });
    const sb = client.send({ id: 'b', hold: true });
    await inside;
    expect(app.applied.get('a')).toBe(1);
    const closed = first.close();
    // The socket is gone (the client saw it) while b is still inside onSync.
    await until(() => client.state !== 'open' && client.state !== 'awaitingSyn', 5000, 'socket closed');
    release();
    await closed;
    expect(app.errors).not.toContain('store.complete');
    expect(app.errors).not.toContain('close');
    // b finished during the drain, and its publish was accepted.
    expect(app.applied.get('b')).toBe(1);

    // Restart on the same file and port: the client's retry of [a, b] is answered from dedupe.
    await start(file, port, { ...app, entered: undefined, gate: undefined });
    await expect(sa).resolves.toEqual({ ok: 'a' });
    await expect(sb).resolves.toEqual({ ok: 'b' });
    expect(Object.fromEntries(app.applied)).toEqual({ a: 1, b: 1 });
    await until(() => view.size === 2, 5000, 'view caught up');
    expect([...view.keys()].sort()).toEqual(['a', 'b']);
    expect(client.cursors().list?.seq).toBe(2);
  });

  it('closeTimeoutMs bounds the wait: an onSync that never ends does not hold close() forever; reported to onError', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'syncwire-close-'));
    dirs.push(dir);
    let release!: () => void;
    let entered!: () => void;
    const inside = new Promise<void>((r) => {
      entered = r;
    });
    const app = {
      applied: new Map<string, number>(),
      db: new Map<string, unknown>(),
      entered,
      gate: new Promise<void>((r) => {
        release = r;
      }),
      errors: [] as string[],
    };
    const server = await start(join(dir, 'stuck.db'), 0, app, 100);
    const client = createSyncClient<Op>({
      url: `ws://127.0.0.1:${server.address().port}/sync`,
      WebSocket: WebSocket as never,
      timeout: 300,
    });
    clients.push(client);
    client.send({ id: 'x', hold: true }).catch(() => undefined);
    await inside;
    await server.close();
    expect(app.errors).toContain('close');
    release();
  });

  it('closeTimeoutMs must be a number ≥ 0', async () => {
    await expect(createSyncServer({ port: 0, onSync: () => [], closeTimeoutMs: -1 })).rejects.toThrow(
      /closeTimeoutMs/,
    );
  });
});
