/**
 * A request over the HTTP fallback is serialized in the turn its local answer is checked, as
 * the socket writes it (second fresh breaker of session 6, F1).
 *
 * The bug: in the HTTP fallback, `subscribe('x'); unsubscribe('x')` in one tick posted
 * `{"type":"SUB","payload":{"channels":{}}}`. The HTTP actor checked the SUB's local answer
 * (none: `x` was still subscribed), awaited the URL and headers, then serialized the SUB,
 * whose channels are read as it is serialized: by then `x` was unsubscribed, so the SUB named
 * no channel, the server answered 400 `bad_request`, and `subscribe()` rejected with
 * `bad_request` (README: it rejects with a refusal's code or `closed`). Real server, real
 * `ws`, real `fetch`; the client's `fetch` only records what it posts.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { WebSocket } from 'ws';
import { createSyncClient, type SyncClient } from '../src/client/index.js';
import { createSyncServer, type SyncServer } from '../src/server/index.js';
import { memoryStore } from '../src/stores/memory.js';
import { T, until } from './helpers/harness.js';

interface Posted {
  body: { type?: string; payload?: { channels?: unknown } };
  status: number;
}

let server: SyncServer | undefined;
let client: SyncClient | undefined;
afterEach(async () => {
  if (client) client.debug.faults.dropAcks = false;
  await client?.close();
  await server?.close();
  client = undefined;
  server = undefined;
});

async function degradedClient(): Promise<{
  c: SyncClient;
  s: SyncServer;
  posted: Posted[];
  clientId: string;
}> {
  const s = await createSyncServer({
    port: 0,
    store: memoryStore(),
    onError: () => {},
    onSync: (ops) => ops.map(() => ({ ok: 1 })),
  });
  server = s;
  const posted: Posted[] = [];
  const recording: typeof fetch = async (url, init) => {
    const res = await fetch(url, init);
    if (typeof init?.body === 'string') posted.push({ body: JSON.parse(init.body), status: res.status });
    return res;
  };
  const clientId = `H${Math.random().toString(36).slice(2)}`;
  const c = createSyncClient({
    url: `ws://127.0.0.1:${s.address().port}/sync`,
    clientId,
    timeout: T,
    pollInterval: T / 2,
    maxBackoff: 4 * T,
    WebSocket: WebSocket as never,
    fetch: recording,
  });
  client = c;
  await until(() => c.state === 'open', 10_000, 'the first open');
  // A request whose ACK never comes: the client degrades to HTTP after T.
  c.debug.faults.dropAcks = true;
  void c.send({ id: 'degrade' }).catch(() => {});
  await until(() => c.state === 'degraded' || c.state === 'rePinging', 10_000, 'the HTTP fallback');
  return { c, s, posted, clientId };
}

describe('HTTP fallback: a request is serialized when its local answer is checked', () => {
  it('subscribe(x); unsubscribe(x) in one tick: no SUB naming no channel is posted, both resolve', async () => {
    const { c, s, posted, clientId } = await degradedClient();
    const results = await Promise.allSettled([c.subscribe('x'), c.unsubscribe('x')]);
    expect(
      results.map((r) => (r.status === 'rejected' ? (r.reason as { code?: string }).code : 'ok')),
    ).toEqual(['ok', 'ok']);
    const subs = posted.filter((p) => p.body.type === 'SUB');
    expect(subs.length).toBeGreaterThan(0);
    for (const p of subs) {
      expect(Object.keys(p.body.payload?.channels ?? {})).not.toHaveLength(0);
      expect(p.status).toBe(200);
    }
    expect(posted.filter((p) => p.status === 400)).toEqual([]);
    expect(c.subscriptionState('x')).toBe('unsubscribed');
    // Back on the socket: the server holds no subscription of x.
    c.debug.faults.dropAcks = false;
    await until(() => c.state === 'open', 10_000, 'the socket again');
    await until(() => !s.subscriptionsOf(clientId).includes('x'), 10_000, 'x not held');
    expect(s.subscriptionsOf(clientId)).not.toContain('x');
  });

  it('subscribe(x) alone over HTTP still names x and subscribes it', async () => {
    const { c, posted } = await degradedClient();
    await c.subscribe('x');
    const sub = posted.find((p) => p.body.type === 'SUB');
    expect(sub?.body.payload?.channels).toHaveProperty('x');
    expect(c.subscriptionState('x')).toBe('subscribed');
  });
});
