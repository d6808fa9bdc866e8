/**
 * A tiny server that lies to the client, on 127.0.0.1: what a real reference server cannot be
 * made to do (answer with the wrong id, the wrong number of results, a MSG with a bad seq, a
 * frame that is not JSON). Both transports: the test decides, frame by frame, what the socket
 * answers (`onFrame`) and what each HTTP POST answers (`onHttp`); by default it behaves like an
 * honest server (ACK, then a response with one `{ ok: op }` per operation).
 */
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { WebSocket, WebSocketServer } from 'ws';

export interface Envelope {
  id: string;
  type: string;
  payload?: unknown;
  [k: string]: unknown;
}
/** A status and body; `'network'`: the connection is cut; `'hang'`: never answered (until close). */
export type HttpAnswer =
  | { status: number; body: string; headers?: Record<string, string> }
  | 'network'
  | 'hang';

export interface LyingServer {
  wsUrl: string;
  httpUrl: string;
  /** Frames the client sent over the socket, parsed. */
  received: Envelope[];
  /** Envelopes the client POSTed. */
  posted: Envelope[];
  /** What the socket does with each client frame. Reset by the test as it likes. */
  onFrame: (env: Envelope, reply: (frame: unknown) => void) => void;
  /** What each POST is answered with. */
  onHttp: (env: Envelope) => HttpAnswer;
  /**
   * Frames `onFrame` replies with synchronously leave in ONE TCP write (the socket is corked
   * for the call), as a server that corks its ACK and a ready response sends them. @default false
   */
  cork: boolean;
  /** Send a raw frame (a string, an object to encode, or a Buffer as binary) on every socket. */
  push(frame: unknown, binary?: boolean): void;
  sockets(): number;
  /**
   * Close every socket now with `code` (a close frame, not a cut): called inside `onFrame` with
   * `cork`, the close frame leaves in the same TCP write as the frames replied before it.
   */
  closeSockets(code?: number): void;
  /**
   * Between tests: forget what was received and posted, and answer honestly again (`onFrame`
   * and `onHttp` back to `honest`). `cork` is left as it is.
   */
  reset(): void;
  close(): Promise<void>;
}

/** What an honest server answers to one request. */
export function honest(env: Envelope): unknown[] {
  const out: unknown[] = [{ id: env.id, type: 'ACK' }];
  if (env.type === 'SYN') {
    out.push({ id: env.id, type: 'SYN', payload: (env.payload as unknown[]).map((op) => ({ ok: op })) });
  } else if (env.type === 'SUB') {
    const names = Object.keys((env.payload as { channels: Record<string, unknown> }).channels);
    out.push({
      id: env.id,
      type: 'SYN',
      payload: [
        { channels: Object.fromEntries(names.map((n) => [n, { epoch: 'e1', seq: 0, recovered: true }])) },
      ],
    });
  } else if (env.type === 'UNS') out.push({ id: env.id, type: 'SYN', payload: [{}] });
  return out;
}

const answerHonestly: LyingServer['onFrame'] = (env, reply) => {
  for (const f of honest(env)) reply(f);
};
const postHonestly: LyingServer['onHttp'] = (env) => ({ status: 200, body: JSON.stringify(honest(env)) });

export async function startLyingServer(): Promise<LyingServer> {
  const socks = new Set<WebSocket>();
  const http: Server = createServer(async (req, res) => {
    const chunks: Buffer[] = [];
    for await (const c of req) chunks.push(c as Buffer);
    let env: Envelope;
    try {
      env = JSON.parse(Buffer.concat(chunks).toString('utf8'));
    } catch {
      res.writeHead(400);
      res.end();
      return;
    }
    server.posted.push(env);
    const answer = server.onHttp(env);
    if (answer === 'network') {
      req.socket.destroy();
      return;
    }
    if (answer === 'hang') return;
    res.writeHead(answer.status, { 'content-type': 'application/json', ...answer.headers });
    res.end(answer.body);
  });
  const wss = new WebSocketServer({ server: http });
  wss.on('connection', (ws) => {
    socks.add(ws);
    ws.on('close', () => socks.delete(ws));
    ws.on('error', () => socks.delete(ws));
    ws.on('message', (data) => {
      let env: Envelope;
      try {
        env = JSON.parse(String(data));
      } catch {
        return;
      }
      server.received.push(env);
      const tcp = (ws as unknown as { _socket?: { cork(): void; uncork(): void } })._socket;
      const corked = server.cork && tcp !== undefined;
      if (corked) tcp.cork();
      server.onFrame(env, (frame) => {
        if (ws.readyState !== WebSocket.OPEN) return;
        if (Buffer.isBuffer(frame)) ws.send(frame, { binary: true });
        else ws.send(typeof frame === 'string' ? frame : JSON.stringify(frame));
      });
      if (corked) tcp.uncork();
    });
  });
  await new Promise<void>((r) => http.listen(0, '127.0.0.1', r));
  const { port } = http.address() as AddressInfo;

  const server: LyingServer = {
    wsUrl: `ws://127.0.0.1:${port}/sync`,
    httpUrl: `http://127.0.0.1:${port}/sync`,
    received: [],
    posted: [],
    onFrame: answerHonestly,
    onHttp: postHonestly,
    cork: false,
    push(frame, binary = false) {
      for (const ws of socks) {
        if (ws.readyState !== WebSocket.OPEN) continue;
        if (Buffer.isBuffer(frame)) ws.send(frame, { binary });
        else ws.send(typeof frame === 'string' ? frame : JSON.stringify(frame), { binary });
      }
    },
    sockets: () => socks.size,
    reset() {
      server.received.length = 0;
      server.posted.length = 0;
      server.onFrame = answerHonestly;
      server.onHttp = postHonestly;
    },
    closeSockets(code = 1012) {
      for (const ws of socks) ws.close(code, 'closed by the test');
    },
    async close() {
      for (const ws of socks) ws.terminate();
      wss.close();
      http.closeAllConnections();
      await new Promise<void>((r) => http.close(() => r()));
    },
  };
  return server;
}
