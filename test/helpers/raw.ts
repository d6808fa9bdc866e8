/**
 * A tiny raw client for server tests: speaks envelopes over a real `ws` socket or a plain
 * HTTP POST, with no retry or protocol logic of its own, so tests see exactly what the server
 * sent. Every wait is bounded and fails with what was received instead.
 */

import { request } from 'node:http';
import { afterEach } from 'vitest';
import WebSocket from 'ws';
import { createSyncServer, type SyncServer, type SyncServerOptions } from '../../src/server/index.js';

export type Frame = any;
export type Pred = (f: Frame) => boolean;

/** How long any single wait may take on loopback before the test fails. */
export const WAIT_MS = 2000;

export const wsUrl = (server: SyncServer, clientId?: string, path = '/sync') => {
  const { port } = server.address();
  const q = clientId === undefined ? '' : `?clientId=${encodeURIComponent(clientId)}`;
  return `ws://127.0.0.1:${port}${path}${q}`;
};

export const httpUrl = (server: SyncServer, path = '/sync') =>
  `http://127.0.0.1:${server.address().port}${path}`;

/** Frame predicates. */
export const is = {
  ack:
    (id: string): Pred =>
    (f) =>
      f.type === 'ACK' && f.id === id,
  syn:
    (id: string): Pred =>
    (f) =>
      f.type === 'SYN' && f.id === id,
  nak:
    (id: string | null): Pred =>
    (f) =>
      f.type === 'NAK' && f.id === id,
  reply:
    (id: string): Pred =>
    (f) =>
      (f.type === 'SYN' || f.type === 'NAK') && f.id === id,
  msg:
    (channel: string, seq?: number): Pred =>
    (f) =>
      f.type === 'MSG' && f.channel === channel && (seq === undefined || f.seq === seq),
};

interface Waiter {
  pred: Pred;
  all: boolean;
  resolve: (v: Frame) => void;
  reject: (e: Error) => void;
  timer: NodeJS.Timeout;
}

export class RawSocket {
  /** Every frame received, in order. */
  readonly received: Frame[] = [];
  /** Frames not yet taken by `next`/`until`. */
  private unread: Frame[] = [];
  private waiters: Waiter[] = [];
  /** Resolves with the close code and reason once the socket closed. */
  readonly closed: Promise<{ code: number; reason: string }>;

  private constructor(readonly ws: WebSocket) {
    this.closed = new Promise((resolve) => {
      ws.on('close', (code, reason) => resolve({ code, reason: reason.toString() }));
    });
    ws.on('message', (data) => {
      const text = data.toString();
      let frame: Frame;
      try {
        frame = JSON.parse(text);
      } catch {
        frame = { unparseable: text };
      }
      this.received.push(frame);
      this.unread.push(frame);
      this.settle();
    });
    ws.on('error', () => {
      // Surfaced through `closed` and timeouts.
    });
  }

  /** Open a socket; rejects (bounded) if it does not open. */
  static open(url: string, timeoutMs = WAIT_MS): Promise<RawSocket> {
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(url);
      const sock = new RawSocket(ws);
      const timer = setTimeout(() => {
        ws.terminate();
        reject(new Error(`socket to ${url} did not open within ${timeoutMs} ms`));
      }, timeoutMs);
      ws.once('open', () => {
        clearTimeout(timer);
        resolve(sock);
      });
      ws.once('unexpected-response', (_req, res) => {
        clearTimeout(timer);
        reject(new Error(`upgrade answered ${res.statusCode}`));
      });
      ws.once('error', (err) => {
        clearTimeout(timer);
        reject(err);
      });
    });
  }

  /** Send an envelope (objects are JSON-encoded; strings and buffers go as they are). */
  send(data: unknown, opts: { binary?: boolean } = {}): void {
    const payload = typeof data === 'string' || Buffer.isBuffer(data) ? data : JSON.stringify(data);
    this.ws.send(payload, { binary: opts.binary ?? false });
  }

  /** The first unread frame matching `pred`; frames before it stay unread. */
  next(pred: Pred = () => true, timeoutMs = WAIT_MS): Promise<Frame> {
    return this.wait(pred, false, timeoutMs);
  }

  /** Every unread frame up to and including the first matching `pred`, all taken. */
  until(pred: Pred, timeoutMs = WAIT_MS): Promise<Frame[]> {
    return this.wait(pred, true, timeoutMs);
  }

  /** Send a request and collect everything up to its response (`SYN` or `NAK`). */
  async request(
    env: { id: string; type: string; [k: string]: unknown },
    timeoutMs = WAIT_MS,
  ): Promise<Frame[]> {
    const done = this.until(is.reply(env.id), timeoutMs);
    this.send(env);
    return done;
  }

  close(): Promise<{ code: number; reason: string }> {
    if (this.ws.readyState === WebSocket.OPEN || this.ws.readyState === WebSocket.CONNECTING) this.ws.close();
    return this.closed;
  }

  private wait(pred: Pred, all: boolean, timeoutMs: number): Promise<Frame> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiters = this.waiters.filter((w) => w !== waiter);
        const seen = JSON.stringify(this.unread.slice(-5)).slice(0, 600);
        reject(new Error(`no matching frame within ${timeoutMs} ms; last unread: ${seen}`));
      }, timeoutMs);
      const waiter: Waiter = { pred, all, resolve, reject, timer };
      this.waiters.push(waiter);
      this.settle();
    });
  }

  private settle(): void {
    for (const w of [...this.waiters]) {
      const i = this.unread.findIndex(w.pred);
      if (i < 0) continue;
      clearTimeout(w.timer);
      this.waiters = this.waiters.filter((x) => x !== w);
      if (w.all) w.resolve(this.unread.splice(0, i + 1));
      else w.resolve(this.unread.splice(i, 1)[0]);
    }
  }
}

export interface HttpReply {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  /** Parsed JSON when the body is JSON, else the text. */
  body: Frame;
}

/** One HTTP request; `body` objects are JSON-encoded. */
export function http(
  url: string,
  opts: { method?: string; clientId?: string; body?: unknown; headers?: Record<string, string> } = {},
  timeoutMs = WAIT_MS,
): Promise<HttpReply> {
  return new Promise((resolve, reject) => {
    const body =
      opts.body === undefined
        ? undefined
        : typeof opts.body === 'string' || Buffer.isBuffer(opts.body)
          ? opts.body
          : JSON.stringify(opts.body);
    const headers: Record<string, string> = { ...opts.headers };
    if (opts.clientId !== undefined) headers['X-Client-Id'] = opts.clientId;
    if (body !== undefined) {
      headers['Content-Type'] ??= 'application/json';
      if (!headers['Transfer-Encoding']) headers['Content-Length'] = String(Buffer.byteLength(body));
    }
    const req = request(url, { method: opts.method ?? 'POST', headers, timeout: timeoutMs }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => {
        const text = Buffer.concat(chunks).toString();
        let parsed: Frame = text;
        try {
          parsed = text ? JSON.parse(text) : text;
        } catch {
          // Not JSON: keep the text.
        }
        resolve({ status: res.statusCode ?? 0, headers: res.headers, body: parsed });
      });
      res.on('error', reject);
    });
    req.on('timeout', () => req.destroy(new Error(`HTTP request to ${url} timed out`)));
    req.on('error', reject);
    req.end(body);
  });
}

/** POST one envelope as the protocol's HTTP transport does. */
export const post = (url: string, clientId: string, envelope: unknown, headers?: Record<string, string>) =>
  http(url, { clientId, body: envelope, ...(headers ? { headers } : {}) });

/** The HTTP status an upgrade attempt is answered with (101 when it opens). */
export function upgradeStatus(
  url: string,
  headers: Record<string, string> = {},
  timeoutMs = WAIT_MS,
): Promise<number> {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, { headers });
    const timer = setTimeout(() => {
      ws.terminate();
      reject(new Error(`upgrade to ${url} got no answer within ${timeoutMs} ms`));
    }, timeoutMs);
    ws.once('open', () => {
      clearTimeout(timer);
      ws.close();
      resolve(101);
    });
    ws.once('unexpected-response', (_req, res) => {
      clearTimeout(timer);
      res.resume();
      resolve(res.statusCode ?? 0);
      ws.terminate();
    });
    ws.once('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
  });
}

/** Resolve once `check()` is true, polling on a short interval; bounded. */
export async function eventually(
  check: () => boolean,
  timeoutMs = WAIT_MS,
  what = 'condition',
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`${what} not met within ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

/** A promise with its resolve handle, for hooks a test wants to hold open. */
export function deferred<T = void>() {
  let resolve!: (v: T) => void;
  let reject!: (e: unknown) => void;
  const promise = new Promise<T>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  return { promise, resolve, reject };
}

/**
 * Servers and sockets for one test file, closed after each test. Servers default to an
 * `onSync` that answers `{ ok: op }` per operation and to collecting errors in `errors`.
 */
export function harness() {
  const servers: SyncServer[] = [];
  const sockets: RawSocket[] = [];
  const errors: { error: unknown; where: string }[] = [];
  let n = 0;

  afterEach(async () => {
    for (const s of sockets.splice(0)) s.ws.terminate();
    for (const s of servers.splice(0)) await s.close();
    errors.length = 0;
  });

  return {
    errors,
    async start<P = unknown>(
      opts: Partial<SyncServerOptions<unknown, unknown, P>> = {},
    ): Promise<SyncServer> {
      const server = await createSyncServer<unknown, unknown, P>({
        onSync: (ops) => ops.map((op) => ({ ok: op })),
        onError: (error, where) => errors.push({ error, where }),
        ...opts,
      });
      servers.push(server);
      return server;
    },
    async socket(server: SyncServer, clientId = `c-${process.pid}-${++n}`): Promise<RawSocket> {
      const sock = await RawSocket.open(wsUrl(server, clientId));
      sockets.push(sock);
      return sock;
    },
  };
}
