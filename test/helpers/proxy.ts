/**
 * A real fault-injecting proxy on 127.0.0.1 between a client and a real server: WebSocket
 * frames are forwarded both ways through a filter the test sets (drop ACKs, stop answering,
 * drop one response), connections can be killed or refused, and HTTP POSTs are forwarded
 * unless the test scripts an answer (503 with Retry-After, a network cut). It also records
 * the traffic, so tests can assert what went over the wire and in which order.
 */
import { createServer, type IncomingMessage, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { WebSocket, WebSocketServer } from 'ws';

export type Direction = 'up' | 'down';
export interface Frame {
  id?: string | null;
  type?: string;
  payload?: unknown;
  [k: string]: unknown;
}
export type Filter = (dir: Direction, frame: Frame) => 'pass' | 'drop';

export interface Traffic {
  dir: Direction;
  via: 'ws' | 'http';
  frame: Frame;
  conn: number;
}

export interface ScriptedHttp {
  status: number;
  headers?: Record<string, string>;
  body?: string;
}

export interface Proxy {
  wsUrl: string;
  httpUrl: string;
  filter: Filter;
  /** Refuse new socket connections (the dial fails). */
  refuse: boolean;
  /** Scripted HTTP answers, used first to last before forwarding resumes. */
  httpScript: Array<ScriptedHttp | 'network'>;
  traffic: Traffic[];
  /** Socket connections accepted so far. */
  connections: number;
  /** Live client sockets. */
  live(): number;
  /** Kill every live socket abruptly (no close handshake). */
  kill(): void;
  /** Resolves when a recorded frame matches, or rejects after `ms`. */
  waitFor(pred: (t: Traffic) => boolean, ms?: number, label?: string): Promise<Traffic>;
  close(): Promise<void>;
}

const pass: Filter = () => 'pass';

export async function startProxy(upstream: { host: string; port: number }, path = '/sync'): Promise<Proxy> {
  const clients = new Set<WebSocket>();
  const waiters: Array<{ pred: (t: Traffic) => boolean; resolve(t: Traffic): void }> = [];
  const record = (t: Traffic) => {
    proxy.traffic.push(t);
    for (const w of [...waiters]) {
      if (w.pred(t)) {
        waiters.splice(waiters.indexOf(w), 1);
        w.resolve(t);
      }
    }
  };
  const parse = (data: unknown): Frame => {
    try {
      return JSON.parse(String(data));
    } catch {
      return { type: '?raw' };
    }
  };

  const http: Server = createServer(async (req, res) => {
    const chunks: Buffer[] = [];
    for await (const c of req) chunks.push(c as Buffer);
    const body = Buffer.concat(chunks).toString('utf8');
    const frame = parse(body);
    record({ dir: 'up', via: 'http', frame, conn: 0 });
    const scripted = proxy.httpScript.shift();
    if (scripted === 'network') {
      req.socket.destroy();
      return;
    }
    if (scripted) {
      res.writeHead(scripted.status, scripted.headers ?? {});
      res.end(scripted.body ?? '');
      return;
    }
    try {
      const r = await fetch(`http://${upstream.host}:${upstream.port}${req.url}`, {
        method: req.method,
        headers: headersOf(req),
        body: req.method === 'POST' ? body : undefined,
      });
      const text = await r.text();
      try {
        for (const f of JSON.parse(text) as Frame[]) record({ dir: 'down', via: 'http', frame: f, conn: 0 });
      } catch {
        // not an envelope array
      }
      res.writeHead(r.status, Object.fromEntries(r.headers));
      res.end(text);
    } catch {
      res.writeHead(502);
      res.end();
    }
  });
  const wss = new WebSocketServer({
    server: http,
    // A refused dial: the upgrade is answered 503, so the client never sees the socket open.
    verifyClient: (_info, cb) => cb(!proxy.refuse, 503),
  });
  wss.on('connection', (client, req) => {
    const conn = ++proxy.connections;
    clients.add(client);
    const up = new WebSocket(`ws://${upstream.host}:${upstream.port}${req.url ?? path}`);
    const pending: string[] = [];
    up.on('open', () => {
      for (const p of pending.splice(0)) up.send(p);
    });
    up.on('message', (data) => {
      const frame = parse(data);
      if (proxy.filter('down', frame) === 'drop') return;
      record({ dir: 'down', via: 'ws', frame, conn });
      if (client.readyState === WebSocket.OPEN) client.send(String(data));
    });
    client.on('message', (data) => {
      const frame = parse(data);
      if (proxy.filter('up', frame) === 'drop') return;
      record({ dir: 'up', via: 'ws', frame, conn });
      if (up.readyState === WebSocket.OPEN) up.send(String(data));
      else pending.push(String(data));
    });
    const end = () => {
      clients.delete(client);
      client.terminate();
      up.terminate();
    };
    client.on('close', end);
    client.on('error', end);
    up.on('close', end);
    up.on('error', end);
  });
  await new Promise<void>((r) => http.listen(0, '127.0.0.1', r));
  const { port } = http.address() as AddressInfo;

  const proxy: Proxy = {
    wsUrl: `ws://127.0.0.1:${port}${path}`,
    httpUrl: `http://127.0.0.1:${port}${path}`,
    filter: pass,
    refuse: false,
    httpScript: [],
    traffic: [],
    connections: 0,
    live: () => clients.size,
    kill() {
      for (const c of clients) c.terminate();
    },
    waitFor(pred, ms = 5000, label = 'frame') {
      const found = proxy.traffic.find(pred);
      if (found) return Promise.resolve(found);
      return new Promise((resolve, reject) => {
        const w = {
          pred,
          resolve: (t: Traffic) => {
            clearTimeout(timer);
            resolve(t);
          },
        };
        const timer = setTimeout(() => {
          waiters.splice(waiters.indexOf(w), 1);
          reject(new Error(`proxy: no ${label} within ${ms} ms`));
        }, ms);
        waiters.push(w);
      });
    },
    async close() {
      for (const c of clients) c.terminate();
      wss.close();
      http.closeAllConnections?.();
      await new Promise<void>((r) => http.close(() => r()));
    },
  };
  return proxy;
}

function headersOf(req: IncomingMessage): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [k, v] of Object.entries(req.headers)) {
    if (typeof v === 'string' && !['host', 'content-length', 'connection'].includes(k)) out[k] = v;
  }
  return out;
}
