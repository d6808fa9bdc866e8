/**
 * Which failed batches the dedupe memory remembers (FIX14C, issue 14 F3; PROTOCOL §2
 * `server_error`, README "A throwing `onSync` is not a rollback"):
 * - `onSync` threw or rejected (with an `Error` or a `SyncError`): the NAK is not remembered
 *   as the id's answer, so a retry of the same id runs `onSync` again (an all-or-nothing
 *   `onSync` applied nothing; a transient failure passes on retry). Memory and SQLite (the
 *   shared-store path drops its claim).
 * - `onSync` returned results not aligned with the operations: it returned, so it applied;
 *   the `server_error` is remembered and a retry does not run it again.
 * Real parts: a reference server on 127.0.0.1, a real SQLite file, a `ws` client.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { WebSocket } from 'ws';
import { SyncError } from '../src/protocol/index.js';
import { createSyncServer, type SyncServer } from '../src/server/index.js';
import { sqliteStore } from '../src/stores/sqlite.js';

type Reply = { id: string; type: string; payload?: unknown[]; error?: { code: string } };

describe.each(['memory', 'sqlite'] as const)('a failed batch and its retry (%s)', (kind) => {
  let server: SyncServer | undefined;
  let ws: WebSocket | undefined;
  let dir: string | undefined;
  afterEach(async () => {
    ws?.terminate();
    await server?.close();
    if (dir) rmSync(dir, { recursive: true, force: true });
    dir = undefined;
  });

  /** A server whose onSync fails the first `failures` calls as `how`, then answers; its call count. */
  async function setUp(how: 'throw' | 'reject' | 'syncerror' | 'wrong') {
    let calls = 0;
    dir = kind === 'sqlite' ? mkdtempSync(join(tmpdir(), 'syncwire-failed-')) : undefined;
    server = await createSyncServer({
      port: 0,
      ...(dir ? { store: sqliteStore({ file: join(dir, 'db.sqlite') }) } : {}),
      onError: () => {},
      onSync: (ops) => {
        calls++;
        const ok = ops.map(() => ({ ok: calls }));
        if (calls > 1) return ok;
        if (how === 'throw') throw new Error('database unavailable');
        if (how === 'reject') return Promise.reject(new Error('database unavailable'));
        if (how === 'syncerror') throw new SyncError('forbidden', 'not now');
        return [...ok, { extra: true }];
      },
    });
    ws = new WebSocket(`ws://127.0.0.1:${server.address().port}/sync?clientId=c1`);
    const socket = ws;
    const waiting = new Map<string, (r: Reply) => void>();
    socket.on('message', (d) => {
      const m = JSON.parse(String(d)) as Reply;
      if (m.type !== 'ACK') waiting.get(m.id)?.(m);
    });
    await new Promise((resolve, reject) => {
      socket.once('open', resolve);
      socket.once('error', reject);
    });
    const ask = (id: string, payload: unknown[]) =>
      new Promise<Reply>((resolve, reject) => {
        const t = setTimeout(() => reject(new Error(`no answer to ${id}`)), 5000);
        waiting.set(id, (r) => {
          clearTimeout(t);
          waiting.delete(id);
          resolve(r);
        });
        socket.send(JSON.stringify({ id, type: 'SYN', payload }));
      });
    return { ask, calls: () => calls };
  }

  it.each([
    ['throw', 'server_error'],
    ['reject', 'server_error'],
    ['syncerror', 'forbidden'],
  ] as const)(
    'onSync %s: the NAK (%s) is not remembered, a retry of the same id runs onSync again',
    async (how, code) => {
      const { ask, calls } = await setUp(how);
      const first = await ask('s1', [{ a: 1 }]);
      expect(first.type).toBe('NAK');
      expect(first.error?.code).toBe(code);
      const retry = await ask('s1', [{ a: 1 }]);
      expect(retry).toEqual({ id: 's1', type: 'SYN', payload: [{ ok: 2 }] });
      expect(calls()).toBe(2);
      // And that answer is remembered as usual.
      expect(await ask('s1', [{ a: 1 }])).toEqual(retry);
      expect(calls()).toBe(2);
    },
  );

  it('onSync returned results not aligned with the operations: the server_error is remembered, a retry does not run it again', async () => {
    const { ask, calls } = await setUp('wrong');
    const first = await ask('s1', [{ a: 1 }]);
    expect(first.error?.code).toBe('server_error');
    expect(await ask('s1', [{ a: 1 }])).toEqual(first);
    expect(calls()).toBe(1);
  });
});
