/**
 * What a NAK from `onSync` means (PROTOCOL §2 `NAK`, README "A throwing `onSync` is not a
 * rollback", docs/consistency.md "all-or-nothing"): the server did not complete the batch, not
 * that nothing was applied. An `onSync` that applies and publishes op 1, then throws on op 2,
 * leaves op 1 applied and its change reaches the views through the channel while both sends
 * reject; the documented pattern (a per-operation error result instead of a throw) resolves
 * each send with its own outcome and feeds `errors$`. Real parts: a reference server on
 * 127.0.0.1 and the reference client on `ws`.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { WebSocket } from 'ws';
import { createSyncClient, type SyncClient, SyncError } from '../src/client/index.js';
import { createSyncServer, type SyncServer } from '../src/server/index.js';
import { until } from './helpers/harness.js';

type Op = { id: string; bad?: boolean };

describe('a NAK from onSync: the batch was not completed, not rolled back', () => {
  let server: SyncServer | undefined;
  let client: SyncClient<Op> | undefined;
  afterEach(async () => {
    await client?.close();
    await server?.close();
  });

  const setUp = async (throwOnBad: boolean) => {
    const db = new Map<string, unknown>();
    server = await createSyncServer({
      port: 0,
      snapshot: () => [...db.values()],
      onError: () => {},
      onSync: async (ops, { publish }) => {
        const out: unknown[] = [];
        for (const op of ops as Op[]) {
          if (op.bad) {
            if (throwOnBad) throw new Error('validation failed');
            out.push({ errors: [{ id: op.id, reason: 'invalid' }] });
            continue;
          }
          const value = { id: op.id };
          db.set(op.id, value);
          await publish('list', { changes: [{ id: op.id, value }] });
          out.push({ ok: op.id });
        }
        return out;
      },
    });
    client = createSyncClient<Op>({
      url: `ws://127.0.0.1:${server.address().port}/sync`,
      WebSocket: WebSocket as never,
      timeout: 400,
    });
    const view = new Map<string, unknown>();
    const errors: unknown[] = [];
    client.snapshots$.subscribe((s) => {
      view.clear();
      for (const i of s.data as Array<{ id: string }>) view.set(i.id, i);
    });
    client.changes$.subscribe((cs) => {
      for (const c of cs as Array<{ id: string; value: unknown }>)
        c.value ? view.set(c.id, c.value) : view.delete(c.id);
    });
    client.errors$.subscribe((e) => errors.push(...e));
    await client.subscribe('list', { snapshot: true });
    return { db, view, errors, c: client };
  };

  it('onSync publishes op 1 then throws on op 2: both sends reject server_error, op 1 stays applied and reaches the view', async () => {
    const { db, view, c } = await setUp(true);
    const settle = (p: Promise<unknown>) =>
      p.then(
        (r) => ({ ok: r }),
        (e: unknown) => ({ err: e }),
      );
    // Same tick: one batch [a, b].
    const [a, b] = await Promise.all([settle(c.send({ id: 'a' })), settle(c.send({ id: 'b', bad: true }))]);
    for (const r of [a, b]) {
      expect('err' in r && r.err instanceof SyncError && r.err.code === 'server_error').toBe(true);
    }
    // Not rolled back: the server's state holds a, and the channel carried it to the view.
    expect([...db.keys()]).toEqual(['a']);
    await until(() => view.has('a'), 5000, 'a in the view');
    expect(c.cursors().list?.seq).toBe(1);
  });

  it('the documented pattern: a per-operation error result instead of a throw settles each send with its own outcome', async () => {
    const { db, view, errors, c } = await setUp(false);
    const [a, b] = await Promise.all([c.send({ id: 'a' }), c.send({ id: 'b', bad: true })]);
    expect(a).toEqual({ ok: 'a' });
    expect(b).toEqual({ errors: [{ id: 'b', reason: 'invalid' }] });
    expect(errors).toEqual([{ id: 'b', reason: 'invalid' }]);
    expect([...db.keys()]).toEqual(['a']);
    // Read-your-writes: a is in the view once its send resolved.
    expect([...view.keys()]).toEqual(['a']);
  });
});
