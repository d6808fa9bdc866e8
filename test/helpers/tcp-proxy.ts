/**
 * A byte-level TCP proxy on 127.0.0.1, for what frame-level proxies (proxy.ts,
 * fault-proxy.ts) cannot show: they terminate the WebSocket and answer pings themselves.
 *
 * - `blackhole()`: from now on every byte of the live connections is silently dropped, both
 *   ways, and nothing is ever closed: the server sees a half-open socket, as after a cable
 *   pull or a NAT that forgot the flow (no FIN or RST ever arrives).
 * - `idleCutMs`: a connection over which no byte went either way for that long is cut (both
 *   sides destroyed), as an idle load balancer or proxy does.
 */

import type { AddressInfo } from 'node:net';
import { createServer, type Socket } from 'node:net';

export interface TcpProxy {
  port: number;
  /** Connections accepted so far. */
  readonly connections: number;
  /** Connections cut for idleness so far. */
  readonly idleCuts: number;
  /** Live connections. */
  live(): number;
  /** Drop every byte of the live connections from now on, both ways; close nothing. */
  blackhole(): void;
  close(): Promise<void>;
}

interface Pair {
  client: Socket;
  upstream: Socket;
  dropping: boolean;
  lastByte: number;
}

export async function startTcpProxy(
  upstream: { host: string; port: number },
  opts: { idleCutMs?: number } = {},
): Promise<TcpProxy> {
  const pairs = new Set<Pair>();
  let connections = 0;
  let idleCuts = 0;
  const end = (p: Pair) => {
    if (!pairs.delete(p)) return;
    p.client.destroy();
    p.upstream.destroy();
  };
  const server = createServer((client) => {
    connections++;
    const up = new (client.constructor as typeof Socket)();
    const p: Pair = { client, upstream: up, dropping: false, lastByte: Date.now() };
    pairs.add(p);
    const forward = (from: Socket, to: Socket) =>
      from.on('data', (chunk) => {
        if (p.dropping) return;
        p.lastByte = Date.now();
        to.write(chunk);
      });
    forward(client, up);
    forward(up, client);
    // A blackholed connection is never closed from here, whatever its ends do.
    const onEnd = () => {
      if (!p.dropping) end(p);
    };
    for (const s of [client, up]) {
      s.on('error', onEnd);
      s.on('close', onEnd);
    }
    up.connect(upstream.port, upstream.host);
  });
  const idleTimer =
    opts.idleCutMs === undefined
      ? undefined
      : setInterval(
          () => {
            const now = Date.now();
            for (const p of pairs) {
              if (!p.dropping && now - p.lastByte >= opts.idleCutMs!) {
                idleCuts++;
                end(p);
              }
            }
          },
          Math.max(10, Math.floor(opts.idleCutMs / 10)),
        );
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    port: (server.address() as AddressInfo).port,
    get connections() {
      return connections;
    },
    get idleCuts() {
      return idleCuts;
    },
    live: () => pairs.size,
    blackhole() {
      for (const p of pairs) p.dropping = true;
    },
    async close() {
      clearInterval(idleTimer);
      for (const p of [...pairs]) {
        pairs.delete(p);
        p.client.destroy();
        p.upstream.destroy();
      }
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}
