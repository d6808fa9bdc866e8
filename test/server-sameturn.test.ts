/**
 * A `SYN` to a server without `authenticate` whose `onSync` returns its results (not a
 * promise) is answered in the turn its frame arrived (docs/benchmarks.md, session 5 LANE2;
 * FIX14C): the response is handed to the socket before a microtask queued when the frame
 * arrived runs. If any step of the path (`applySyn`, `Dedupe.run`, `dispatch`) went through a
 * promise, that microtask would run first. An async `onSync`, and a server with
 * `authenticate` (its binding is refreshed first), are answered after it: the check can tell
 * the two paths apart. Real parts: a reference server on 127.0.0.1 and a `ws` client.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { WebSocket, WebSocketServer } from 'ws';
import { createSyncServer, type SyncServer, type SyncServerOptions } from '../src/server/index.js';
import { until } from './helpers/harness.js';

describe('a synchronous onSync without authenticate is answered in the same turn', () => {
  let server: SyncServer | undefined;
  let client: WebSocket | undefined;
  const handleUpgrade = WebSocketServer.prototype.handleUpgrade;
  afterEach(async () => {
    WebSocketServer.prototype.handleUpgrade = handleUpgrade;
    client?.terminate();
    await server?.close();
  });

  /** The order in which, on the server side, the ACK, the answer and the frame's microtask came. */
  async function orderOf(opts: Partial<SyncServerOptions<unknown, unknown, unknown>>): Promise<string[]> {
    let serverSide: WebSocket | undefined;
    WebSocketServer.prototype.handleUpgrade = function (this: WebSocketServer, req, socket, head, cb) {
      return handleUpgrade.call(this, req, socket, head, (ws, r) => {
        serverSide = ws;
        cb(ws, r);
      });
    };
    server = await createSyncServer({ port: 0, onSync: (ops) => ops.map(() => ({ ok: true })), ...opts });
    client = new WebSocket(`ws://127.0.0.1:${server.address().port}/sync?clientId=c1`, {
      headers: { authorization: 'Bearer u1' },
    });
    await new Promise((resolve, reject) => {
      client?.once('open', resolve);
      client?.once('error', reject);
    });
    await until(() => serverSide !== undefined, 2000);
    const side = serverSide as WebSocket;
    const order: string[] = [];
    // Runs before the server's own listener: a microtask queued here runs once the frame's
    // synchronous handling is over, before any promise callback that handling started.
    side.prependListener('message', () => {
      order.push('frame');
      queueMicrotask(() => order.push('microtask'));
    });
    const send = side.send.bind(side);
    side.send = ((data: unknown, ...rest: unknown[]) => {
      const type = (JSON.parse(String(data)) as { type: string }).type;
      order.push(type);
      return (send as (...a: unknown[]) => void)(data, ...rest);
    }) as typeof side.send;
    const replies: string[] = [];
    client.on('message', (d) => replies.push((JSON.parse(String(d)) as { type: string }).type));
    client.send(JSON.stringify({ id: 's1', type: 'SYN', payload: [{ a: 1 }] }));
    await until(() => replies.includes('SYN') || replies.includes('NAK'), 5000);
    await until(() => order.includes('microtask'), 2000);
    return order;
  }

  it("writes the ACK and the answer before a microtask queued on the frame's arrival runs", async () => {
    expect(await orderOf({})).toEqual(['frame', 'ACK', 'SYN', 'microtask']);
  });

  it('answers an async onSync after that microtask (the check tells the paths apart)', async () => {
    expect(await orderOf({ onSync: async (ops) => ops.map(() => ({ ok: true })) })).toEqual([
      'frame',
      'ACK',
      'microtask',
      'SYN',
    ]);
  });

  it('answers after it with authenticate (the binding is refreshed first)', async () => {
    expect(
      await orderOf({ authenticate: () => ({ id: 'u1' }), principalKey: (p) => (p as { id: string }).id }),
    ).toEqual(['frame', 'ACK', 'microtask', 'SYN']);
  });
});
