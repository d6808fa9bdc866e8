/**
 * A fault-injecting loopback proxy that can also *hold* traffic, for the randomized fault
 * suite (test/helpers/proxy.ts drops and scripts, but cannot delay). Each WebSocket frame
 * goes through `rule(dir, frame, conn)`: `'pass'`, `'drop'`, or a number of milliseconds to
 * hold it. Holding is TCP-like: a held frame also holds every later frame of the same
 * connection and direction behind it, so order is kept (a late ACK arrives before the
 * response it precedes). HTTP POSTs are forwarded unless an answer is scripted: a status,
 * a network cut, or a delay before the upstream's answer is passed on.
 *
 * One-shot faults are what the random schedules arm: `once(match, action)` applies `action`
 * to the first frame `match` accepts, then disarms itself; `disarm()` drops them all, which
 * is how a schedule says "faults stop".
 */
import { createServer, type IncomingMessage, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { WebSocket, WebSocketServer } from 'ws';

export type Direction = 'up' | 'down';
export interface Frame {
  id?: string | null;
  type?: string;
  [k: string]: unknown;
}
/** What happens to one frame: forwarded, dropped, or held for that many milliseconds. */
export type FrameAction = 'pass' | 'drop' | number;
export interface ConnInfo {
  /** 1-based connection counter. */
  n: number;
  /** The `clientId` query parameter of the upgrade. */
  clientId: string;
}
export type Rule = (dir: Direction, frame: Frame, conn: ConnInfo) => FrameAction;

export type HttpFault =
  | { kind: 'status'; status: number; headers?: Record<string, string>; body?: string }
  | { kind: 'network' }
  /** Forward, then hold the upstream's answer this long before passing it on. */
  | { kind: 'delay'; ms: number };

export interface FaultProxy {
  wsUrl: string;
  httpUrl: string;
  /** The standing rule; one-shot faults are consulted first. */
  rule: Rule;
  /** Refuse new socket upgrades (answered 503, the dial fails). */
  refuse: boolean;
  /** HTTP faults, used first to last; a `clientId` restricts one to that client. */
  httpScript: Array<HttpFault & { clientId?: string }>;
  /** Arm a one-shot fault: the first frame `match` accepts gets `action`. */
  once(
    match: (dir: Direction, frame: Frame, conn: ConnInfo) => boolean,
    action: Exclude<FrameAction, 'pass'>,
  ): void;
  /** Remove every armed one-shot fault and scripted HTTP answer, and reset `rule` and `refuse`. */
  disarm(): void;
  /** Kill sockets abruptly (no close handshake); only `clientId`'s when given. Held frames are lost. */
  kill(clientId?: string): number;
  /** Counters for the report. */
  stats: {
    connections: number;
    framesUp: number;
    framesDown: number;
    dropped: number;
    held: number;
    http: number;
  };
  live(): number;
  close(): Promise<void>;
}

const parse = (data: unknown): Frame => {
  try {
    const v = JSON.parse(String(data));
    return typeof v === 'object' && v !== null ? (v as Frame) : { type: '?raw' };
  } catch {
    return { type: '?raw' };
  }
};

/** Close codes a peer may put on the wire (1005/1006/1015 are reserved for reporting). */
const sendable = (code: number) =>
  (code >= 1000 && code <= 1003) || (code >= 1007 && code <= 1014) || (code >= 3000 && code <= 4999);

/** A per-direction FIFO that releases items no earlier than their due time, in order. */
class Lane {
  private queue: Array<{ due: number; run: () => void }> = [];
  private timer: NodeJS.Timeout | null = null;
  private dead = false;

  push(holdMs: number, run: () => void): void {
    if (this.dead) return;
    const due = Date.now() + holdMs;
    if (this.queue.length === 0 && holdMs <= 0) {
      run();
      return;
    }
    // Never earlier than what is ahead of it: TCP-like head-of-line.
    const last = this.queue.at(-1);
    this.queue.push({ due: last ? Math.max(last.due, due) : due, run });
    this.arm();
  }

  kill(): void {
    this.dead = true;
    this.queue = [];
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
  }

  private arm(): void {
    if (this.timer || this.queue.length === 0) return;
    const wait = Math.max(0, this.queue[0]!.due - Date.now());
    this.timer = setTimeout(() => {
      this.timer = null;
      const now = Date.now();
      while (this.queue.length > 0 && this.queue[0]!.due <= now) this.queue.shift()!.run();
      this.arm();
    }, wait);
  }
}

interface Conn {
  info: ConnInfo;
  client: WebSocket;
  up: WebSocket;
  lanes: Record<Direction, Lane>;
  ended: boolean;
}

export async function startFaultProxy(
  upstream: { host: string; port: number },
  path = '/sync',
): Promise<FaultProxy> {
  const conns = new Set<Conn>();
  let oneShots: Array<{ match: (d: Direction, f: Frame, c: ConnInfo) => boolean; action: 'drop' | number }> =
    [];
  const timers = new Set<NodeJS.Timeout>();

  const decide = (dir: Direction, frame: Frame, info: ConnInfo): FrameAction => {
    const i = oneShots.findIndex((o) => o.match(dir, frame, info));
    if (i >= 0) return oneShots.splice(i, 1)[0]!.action;
    return proxy.rule(dir, frame, info);
  };

  const http: Server = createServer(async (req, res) => {
    const chunks: Buffer[] = [];
    try {
      for await (const c of req) chunks.push(c as Buffer);
    } catch {
      return;
    }
    proxy.stats.http++;
    const clientId = String(req.headers['x-client-id'] ?? '');
    const at = proxy.httpScript.findIndex((s) => s.clientId === undefined || s.clientId === clientId);
    const fault = at >= 0 ? proxy.httpScript.splice(at, 1)[0] : undefined;
    if (fault?.kind === 'network') {
      req.socket.destroy();
      return;
    }
    if (fault?.kind === 'status') {
      res.writeHead(fault.status, fault.headers ?? {});
      res.end(fault.body ?? '');
      return;
    }
    let status = 502;
    let headers: Record<string, string> = {};
    let text = '';
    try {
      const r = await fetch(`http://${upstream.host}:${upstream.port}${req.url}`, {
        method: req.method,
        headers: headersOf(req),
        body: req.method === 'POST' ? Buffer.concat(chunks) : undefined,
      });
      text = await r.text();
      status = r.status;
      headers = Object.fromEntries(r.headers);
      delete headers['content-length'];
      delete headers['transfer-encoding'];
      delete headers.connection;
      delete headers['keep-alive'];
    } catch {
      // Upstream down (a restart in progress): a gateway error, which the client retries.
    }
    const answer = () => {
      if (res.destroyed) return;
      res.writeHead(status, headers);
      res.end(text);
    };
    if (fault?.kind === 'delay') {
      const t = setTimeout(() => {
        timers.delete(t);
        answer();
      }, fault.ms);
      timers.add(t);
    } else answer();
  });

  const wss = new WebSocketServer({
    server: http,
    perMessageDeflate: false,
    verifyClient: (_info, cb) => cb(!proxy.refuse, 503),
  });
  wss.on('connection', (client, req) => {
    const url = new URL(req.url ?? path, 'http://x');
    const info: ConnInfo = { n: ++proxy.stats.connections, clientId: url.searchParams.get('clientId') ?? '' };
    const up = new WebSocket(`ws://${upstream.host}:${upstream.port}${req.url ?? path}`, {
      perMessageDeflate: false,
    });
    const conn: Conn = { info, client, up, lanes: { up: new Lane(), down: new Lane() }, ended: false };
    conns.add(conn);
    const pending: Array<{ data: string; binary: boolean }> = [];
    up.on('open', () => {
      for (const p of pending.splice(0)) up.send(p.data, { binary: p.binary });
    });
    const end = (code?: number, reason?: string) => {
      if (conn.ended) return;
      conn.ended = true;
      conns.delete(conn);
      conn.lanes.up.kill();
      conn.lanes.down.kill();
      if (code !== undefined && sendable(code) && client.readyState === WebSocket.OPEN) {
        client.close(code, reason);
        const t = setTimeout(() => client.terminate(), 500);
        t.unref();
      } else client.terminate();
      up.terminate();
    };
    up.on('message', (data, binary) => {
      const text = String(data);
      const frame = parse(text);
      const action = decide('down', frame, info);
      if (action === 'drop') {
        proxy.stats.dropped++;
        return;
      }
      if (typeof action === 'number') proxy.stats.held++;
      conn.lanes.down.push(typeof action === 'number' ? action : 0, () => {
        proxy.stats.framesDown++;
        if (client.readyState === WebSocket.OPEN) client.send(text, { binary });
      });
    });
    client.on('message', (data, binary) => {
      const text = String(data);
      const frame = parse(text);
      const action = decide('up', frame, info);
      if (action === 'drop') {
        proxy.stats.dropped++;
        return;
      }
      if (typeof action === 'number') proxy.stats.held++;
      conn.lanes.up.push(typeof action === 'number' ? action : 0, () => {
        proxy.stats.framesUp++;
        if (up.readyState === WebSocket.OPEN) up.send(text, { binary });
        else if (up.readyState === WebSocket.CONNECTING) pending.push({ data: text, binary });
      });
    });
    // The server's close travels behind the frames held before it, as it would over TCP.
    up.on('close', (code, reason) => conn.lanes.down.push(0, () => end(code, reason.toString())));
    up.on('error', () => end());
    client.on('close', () => end());
    client.on('error', () => end());
  });
  await new Promise<void>((r) => http.listen(0, '127.0.0.1', r));
  const { port } = http.address() as AddressInfo;

  const proxy: FaultProxy = {
    wsUrl: `ws://127.0.0.1:${port}${path}`,
    httpUrl: `http://127.0.0.1:${port}${path}`,
    rule: () => 'pass',
    refuse: false,
    httpScript: [],
    once(match, action) {
      oneShots.push({ match, action });
    },
    disarm() {
      oneShots = [];
      proxy.httpScript.length = 0;
      proxy.rule = () => 'pass';
      proxy.refuse = false;
    },
    kill(clientId) {
      let n = 0;
      for (const c of [...conns]) {
        if (clientId !== undefined && c.info.clientId !== clientId) continue;
        n++;
        c.lanes.up.kill();
        c.lanes.down.kill();
        c.client.terminate();
        c.up.terminate();
      }
      return n;
    },
    stats: { connections: 0, framesUp: 0, framesDown: 0, dropped: 0, held: 0, http: 0 },
    live: () => conns.size,
    async close() {
      proxy.kill();
      for (const t of timers) clearTimeout(t);
      wss.close();
      http.closeAllConnections();
      await new Promise<void>((r) => http.close(() => r()));
    },
  };
  return proxy;
}

function headersOf(req: IncomingMessage): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [k, v] of Object.entries(req.headers)) {
    if (typeof v === 'string' && !['host', 'content-length', 'connection', 'keep-alive'].includes(k))
      out[k] = v;
  }
  return out;
}
