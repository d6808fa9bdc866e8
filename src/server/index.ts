/**
 * The reference syncwire server (`syncwire/server`): both transports of PROTOCOL.md on one
 * path of a `node:http` server, with `ws` for the socket. This file owns the transports,
 * the hooks and the lifecycle; dedupe.ts makes `SYN`s exactly-once and ordered, channels.ts
 * does subscriptions, replay and fan-out.
 *
 * Nothing a client sends and nothing a hook throws may escape into the event loop: every
 * entry point here catches, answers the client, and reports through `onError`.
 */

import {
  createServer,
  type IncomingMessage,
  type Server,
  type ServerResponse,
  STATUS_CODES,
} from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Duplex } from 'node:stream';
import { type RawData, WebSocket, WebSocketServer } from 'ws';
import {
  CloseCodes,
  DEFAULT_MAX_PAYLOAD_BYTES,
  encode,
  HTTP_STATUS_OF,
  isValidChannel,
  MAX_ID_LENGTH,
  NAK_CODES,
  type NakCode,
  type NakEnvelope,
  nak,
  parseClientFrame,
  type RequestEnvelope,
  type ServerEnvelope,
  type SubEnvelope,
  SyncError,
} from '../protocol/index.js';
import { memoryStore } from '../stores/memory.js';
import type { AppendOptions, HistoryStore } from '../stores/types.js';
import { type ChannelPeer, Channels, type Subscription } from './channels.js';
import { Dedupe, type SynResponse } from './dedupe.js';

export { type MemoryStoreOptions, memoryStore } from '../stores/memory.js';
export type {
  ChannelHead,
  DedupeClaim,
  HistoryStore,
  RetentionOptions,
  StoredMessage,
} from '../stores/types.js';

/** What `onSync` is given besides the operations. */
export interface SyncContext<P = unknown> {
  /** The client that sent the batch. */
  clientId: string;
  /** What `authenticate` returned for the request or socket; `null` without that hook. */
  principal: P;
  /**
   * `server.publish`, except that `except` defaults to this client, so the author gets a
   * payload-less echo rather than its own change back. Pass `{ except: undefined }` to send
   * the author the payload too.
   */
  publish(channel: string, payload: unknown, opts?: PublishOptions): Promise<PublishResult>;
}

export interface PublishOptions {
  /** clientId whose sockets get the message as a payload-less `echo` (PROTOCOL "echo"). */
  except?: string | undefined;
  /**
   * Idempotency key: a shared store (Redis) publishes once per key. `ctx.publish` in `onSync`
   * sets one per batch and call, so a batch re-run after a crash does not publish twice.
   */
  key?: string | undefined;
}

export interface PublishResult {
  seq: number;
  epoch: string;
}

export interface SyncServerOptions<P = unknown> {
  /**
   * Port to listen on; `0` picks a free one (read it back with `address()`). Ignored with
   * `server`.
   * @default 0
   */
  port?: number;
  /**
   * Interface to listen on. Ignored with `server`.
   * @default '127.0.0.1'
   */
  host?: string;
  /**
   * An existing `http.Server` to attach to instead of creating one. It is not listened on nor
   * closed by this server; requests and upgrades for other paths are left to its owner.
   * @default undefined (a new server is created and listened on)
   */
  server?: Server;
  /**
   * The one path both transports answer on.
   * @default '/sync'
   */
  path?: string;
  /**
   * Apply a batch of operations. Return one result per operation, in order. Throwing, or
   * returning anything but an array of `ops.length` results, answers `NAK server_error` (the
   * batch counts as not applied); throw a `SyncError` with a NAK code (e.g. `forbidden`,
   * `rate_limited`) to refuse the batch with that code and message instead.
   */
  onSync(ops: unknown[], ctx: SyncContext<P>): unknown[] | Promise<unknown[]>;
  /**
   * Who is asking, from the upgrade or the HTTP request (cookie, header, `token` query
   * parameter). Called on every upgrade and every HTTP request. `null`/`undefined` refuses
   * with 401; throw `SyncError('forbidden')` for 403. Any other exception answers 500.
   * @default undefined (everybody is let in, with principal `null`)
   */
  authenticate?(req: IncomingMessage): P | null | undefined | Promise<P | null | undefined>;
  /**
   * Whether `principal` may do `action` on `channel`; asked for every channel of a `SUB`
   * before anything is replayed. One refusal answers the whole `SUB` with `NAK forbidden`.
   * @default undefined (everything is allowed)
   */
  authorize?(principal: P, channel: string, action: 'subscribe'): boolean | Promise<boolean>;
  /**
   * Where channel history lives. Closed by `server.close()`.
   * @default memoryStore()
   */
  store?: HistoryStore;
  /**
   * How long the response to each `(clientId, SYN id)` is remembered.
   * @default 600000 (10 minutes)
   */
  dedupeWindowMs?: number;
  /**
   * Most responses remembered at once (the oldest go first); bounds dedupe memory.
   * @default 100000
   */
  dedupeMaxEntries?: number;
  /**
   * Largest request accepted, in bytes: a larger HTTP body answers 413, a larger socket frame
   * `NAK too_large`. Socket frames above 4 × this are not read at all: `ws` closes the socket
   * with 1009.
   * @default 1048576
   */
  maxPayloadBytes?: number;
  /**
   * Page size when reading history for a socket `SUB`, and the most `MSG`s per channel one
   * HTTP `SUB` returns (the channel's entry then says `more: true`).
   * @default 1000
   */
  replayLimit?: number;
  /**
   * A socket with more than this many bytes waiting to be sent is closed with
   * `CloseCodes.slowConsumer`; the client reconnects and replays, and memory stays bounded.
   * @default 8388608 (8 MiB)
   */
  maxBufferedBytes?: number;
  /**
   * Consecutive unparseable frames after which a socket is closed with `CloseCodes.badFrames`.
   * @default 100
   */
  maxBadFrames?: number;
  /**
   * `SYN`s of one client waiting for their turn beyond which new ones get `NAK rate_limited`
   * (a well-behaved client has one in flight).
   * @default 100
   */
  maxQueuedPerClient?: number;
  /**
   * Where internal failures and hook exceptions are reported.
   * @default logs to console.error
   */
  onError?(error: unknown, where: string): void;
}

export interface SyncServerStats {
  /** Open sockets. */
  sockets: number;
  /** Distinct clientIds with an open socket or a `SYN` queued or running. */
  clients: number;
  /** `SYN` responses remembered in this process for dedupe. */
  dedupeEntries: number;
  /** Channels with at least one live socket subscription. */
  channels: number;
}

export interface SyncServer {
  /** Where the server listens, as bound (port 0 resolved). */
  address(): { host: string; port: number };
  /**
   * Append to a channel's history; every socket subscribed to it gets the `MSG`. Resolves
   * once stored, with the message's seq and the channel's epoch. The payload must be JSON.
   */
  publish(channel: string, payload: unknown, opts?: PublishOptions): Promise<PublishResult>;
  /** Counts that show memory stays bounded. */
  stats(): SyncServerStats;
  /** Close sockets (1001), the http server if this server made it, the store and timers. */
  close(): Promise<void>;
  /** The http server in use, created or given. */
  readonly httpServer: Server;
}

const DEFAULTS = {
  port: 0,
  host: '127.0.0.1',
  path: '/sync',
  dedupeWindowMs: 600_000,
  dedupeMaxEntries: 100_000,
  maxPayloadBytes: DEFAULT_MAX_PAYLOAD_BYTES,
  replayLimit: 1000,
  maxBufferedBytes: 8 * 1024 * 1024,
  maxBadFrames: 100,
  maxQueuedPerClient: 100,
} as const;

const POSITIVE_OPTIONS = [
  'dedupeWindowMs',
  'dedupeMaxEntries',
  'maxPayloadBytes',
  'replayLimit',
  'maxBufferedBytes',
  'maxBadFrames',
  'maxQueuedPerClient',
] as const;

/** How often expired dedupe entries are dropped and the store trimmed, at most. */
const HOUSEKEEPING_MS = 60_000;
/** How long `close()` waits for clients to answer the close handshake before cutting them. */
const CLOSE_GRACE_MS = 1000;
/** How often a replay checks whether a socket's send buffer has drained. */
const DRAIN_POLL_MS = 5;
/** How long a replay waits for a socket's send buffer to drain before giving up on it. */
const DRAIN_GRACE_MS = 30_000;

const CORS_HEADERS = {
  'Access-Control-Allow-Origin': '*',
  'Access-Control-Allow-Methods': 'POST, OPTIONS',
  'Access-Control-Allow-Headers': 'X-Client-Id, Content-Type, Authorization',
  'Access-Control-Expose-Headers': 'Retry-After',
  'Access-Control-Max-Age': '86400',
};

const ignore = () => {};

/** Standard close code for "the server hit an unexpected condition"; the client redials. */
const INTERNAL_ERROR = 1011;

const validClientId = (v: unknown): v is string =>
  typeof v === 'string' && v.length > 0 && v.length <= MAX_ID_LENGTH;

const isNakCode = (v: unknown): v is NakCode => (NAK_CODES as readonly unknown[]).includes(v);

const defaultOnError = (error: unknown, where: string) => {
  console.error(`[syncwire] ${where}:`, error);
};

/** Start a server; resolves once it listens (or at once, attached to a given `server`). */
export async function createSyncServer<P = unknown>(options: SyncServerOptions<P>): Promise<SyncServer> {
  const o = {
    ...DEFAULTS,
    ...Object.fromEntries(Object.entries(options).filter(([, v]) => v !== undefined)),
  } as typeof DEFAULTS & SyncServerOptions<P>;
  if (typeof o.onSync !== 'function') throw new TypeError('createSyncServer: onSync is required');
  for (const key of POSITIVE_OPTIONS) {
    if (!(Number.isFinite(o[key]) && o[key] > 0))
      throw new RangeError(`createSyncServer: ${key} must be > 0`);
  }
  const store = o.store ?? memoryStore();
  const onError = (err: unknown, where: string) => {
    try {
      (o.onError ?? defaultOnError)(err, where);
    } catch {
      // A failing logger must not become the next failure.
    }
  };
  const ownServer = !o.server;
  const httpServer = o.server ?? createServer();
  const wss = new WebSocketServer({
    noServer: true,
    maxPayload: 4 * o.maxPayloadBytes,
    perMessageDeflate: false,
    clientTracking: false,
  });
  const dedupe = new Dedupe({
    windowMs: o.dedupeWindowMs,
    maxEntries: o.dedupeMaxEntries,
    maxQueuedPerClient: o.maxQueuedPerClient,
    store,
    onError,
  });
  const channels = new Channels({ store, replayLimit: o.replayLimit, onError });
  const conns = new Set<SocketConn>();
  let closing: Promise<void> | undefined;

  const housekeeping = setInterval(
    () => {
      dedupe.sweep();
      store.trim().catch((err: unknown) => onError(err, 'store.trim'));
    },
    Math.min(HOUSEKEEPING_MS, o.dedupeWindowMs),
  );
  housekeeping.unref();

  // ---- shared request handling -------------------------------------------------------

  interface Peer {
    clientId: string;
    principal: P;
    send(env: ServerEnvelope): void;
    /** Set for sockets: subscriptions are live; HTTP gets a one-shot replay. */
    conn?: SocketConn;
  }

  async function publish(
    channel: string,
    payload: unknown,
    opts: PublishOptions = {},
  ): Promise<PublishResult> {
    if (closing) throw new SyncError('closed', 'server is closed');
    if (!isValidChannel(channel)) throw new SyncError('bad_request', 'bad channel name');
    // Checked here, once: a payload that cannot be encoded would otherwise fail every
    // delivery and every replay of it, and its subscribers would never get past its seq.
    let json: string | undefined;
    try {
      json = JSON.stringify(payload);
    } catch {
      json = undefined;
    }
    if (json === undefined) throw new SyncError('bad_request', 'payload must be JSON-serializable');
    const appendOpts: AppendOptions = {};
    if (opts.except !== undefined) appendOpts.except = opts.except;
    if (opts.key !== undefined) appendOpts.key = opts.key;
    const msg = await store.append(channel, payload, appendOpts);
    return { seq: msg.seq, epoch: msg.epoch };
  }

  async function applySyn(syn: { id: string; payload: unknown[] }, peer: Peer): Promise<SynResponse> {
    // A batch still queued at shutdown is left for the client to resend to the next server.
    if (closing) return nak(syn.id, 'server_error', 'server is closing');
    const { clientId } = peer;
    // The n-th publish of this batch has the same key whichever process runs it, so a batch
    // re-run after its process died publishes nothing twice (with a store that honours keys).
    const batchKey = `${clientId.length}:${clientId}:${syn.id}`;
    let n = 0;
    const ctx: SyncContext<P> = {
      clientId,
      principal: peer.principal,
      publish: (channel, payload, opts) =>
        publish(channel, payload, {
          except: opts && 'except' in opts ? opts.except : clientId,
          key: opts?.key ?? `${batchKey}#${n++}`,
        }),
    };
    let results: unknown;
    try {
      results = await o.onSync(syn.payload, ctx);
    } catch (err) {
      if (err instanceof SyncError && isNakCode(err.code)) return nak(syn.id, err.code, err.message);
      onError(err, 'onSync');
      return nak(syn.id, 'server_error', 'the server failed to apply the batch');
    }
    if (!Array.isArray(results) || results.length !== syn.payload.length) {
      onError(
        new Error(
          `onSync returned ${Array.isArray(results) ? results.length : typeof results} for ${syn.payload.length} ops`,
        ),
        'onSync',
      );
      return nak(syn.id, 'server_error', 'the server returned results not aligned with the operations');
    }
    const response: SynResponse = { id: syn.id, type: 'SYN', payload: results };
    try {
      JSON.stringify(response);
    } catch (err) {
      onError(err, 'onSync results');
      return nak(syn.id, 'server_error', 'the server returned results that are not JSON');
    }
    return response;
  }

  async function refusal(principal: P, id: string, names: string[]): Promise<NakEnvelope | null> {
    if (!o.authorize) return null;
    for (const name of names) {
      let allowed: boolean;
      try {
        allowed = (await o.authorize(principal, name, 'subscribe')) === true;
      } catch (err) {
        onError(err, 'authorize');
        return nak(id, 'server_error', 'authorization failed');
      }
      if (!allowed) return nak(id, 'forbidden', `not allowed to subscribe to ${name}`);
    }
    return null;
  }

  async function subscribe(env: SubEnvelope, peer: Peer): Promise<void> {
    const cursors = env.payload.channels;
    const refused = await refusal(peer.principal, env.id, Object.keys(cursors));
    if (refused) return peer.send(refused);
    try {
      if (peer.conn) {
        const states = await channels.subscribe(peer.conn, cursors);
        peer.send({ id: env.id, type: 'SYN', payload: [{ channels: states }] });
      } else {
        const { messages, states } = await channels.poll(peer.clientId, cursors);
        for (const m of messages) peer.send(m);
        peer.send({ id: env.id, type: 'SYN', payload: [{ channels: states }] });
      }
    } catch (err) {
      onError(err, 'subscribe');
      peer.send(nak(env.id, 'server_error', 'subscription failed'));
    }
  }

  /** Answer one valid envelope. Resolves when its last reply was sent; never rejects. */
  async function dispatch(env: RequestEnvelope, peer: Peer): Promise<void> {
    // ACK on receipt, before any processing (PROTOCOL §3 rule 1).
    peer.send({ id: env.id, type: 'ACK' });
    try {
      switch (env.type) {
        case 'PNG':
          return;
        case 'SYN':
          peer.send(await dedupe.run(peer.clientId, env, () => applySyn(env, peer)));
          return;
        case 'SUB':
          // A socket's SUBs and UNSs apply in order, or an UNS could overtake its SUB.
          if (peer.conn) return await peer.conn.serial(() => subscribe(env, peer));
          return await subscribe(env, peer);
        case 'UNS':
          if (peer.conn) {
            const conn = peer.conn;
            await conn.serial(async () => channels.unsubscribe(conn, env.payload.channels));
          }
          peer.send({ id: env.id, type: 'SYN', payload: [{}] });
          return;
      }
    } catch (err) {
      onError(err, `dispatch ${env.type}`);
      peer.send(nak(env.id, 'server_error', 'internal error'));
    }
  }

  /** Run `authenticate`: the principal, or the status and NAK to refuse with. */
  async function authenticate(
    req: IncomingMessage,
  ): Promise<{ ok: true; principal: P } | { ok: false; status: number; nak: NakEnvelope }> {
    if (!o.authenticate) return { ok: true, principal: null as P };
    try {
      const principal = await o.authenticate(req);
      if (principal === null || principal === undefined) {
        return {
          ok: false,
          status: HTTP_STATUS_OF.unauthorized,
          nak: nak(null, 'unauthorized', 'authentication required'),
        };
      }
      return { ok: true, principal };
    } catch (err) {
      if (err instanceof SyncError && (err.code === 'forbidden' || err.code === 'unauthorized')) {
        return { ok: false, status: HTTP_STATUS_OF[err.code], nak: nak(null, err.code, err.message) };
      }
      onError(err, 'authenticate');
      return {
        ok: false,
        status: HTTP_STATUS_OF.server_error,
        nak: nak(null, 'server_error', 'authentication failed'),
      };
    }
  }

  // ---- WebSocket ---------------------------------------------------------------------

  class SocketConn implements ChannelPeer, Peer {
    readonly subs = new Map<string, Subscription>();
    badFrames = 0;
    private tail: Promise<unknown> = Promise.resolve();
    private ended = false;

    constructor(
      readonly ws: WebSocket,
      readonly clientId: string,
      readonly principal: P,
    ) {}

    get conn(): SocketConn {
      return this;
    }

    get open(): boolean {
      return !this.ended && this.ws.readyState === WebSocket.OPEN;
    }

    send(env: ServerEnvelope): void {
      this.sendText(encode(env));
    }

    sendText(text: string): void {
      if (!this.open) return;
      this.ws.send(text);
      if (this.ws.bufferedAmount > o.maxBufferedBytes) this.close(CloseCodes.slowConsumer, 'slow consumer');
    }

    /**
     * Replays wait here so history never fills the send buffer past half the bound; live
     * sends are what trip the bound. A socket that does not drain within the grace period
     * is a slow consumer too.
     */
    drained(): Promise<void> | undefined {
      if (!this.open || this.ws.bufferedAmount <= o.maxBufferedBytes / 2) return undefined;
      return (async () => {
        const deadline = Date.now() + DRAIN_GRACE_MS;
        while (this.open && this.ws.bufferedAmount > o.maxBufferedBytes / 2) {
          if (Date.now() > deadline) return this.close(CloseCodes.slowConsumer, 'slow consumer');
          await new Promise((resolve) => setTimeout(resolve, DRAIN_POLL_MS));
        }
      })();
    }

    fail(reason: string): void {
      this.close(INTERNAL_ERROR, reason);
    }

    serial<T>(task: () => Promise<T>): Promise<T> {
      const run = this.tail.then(task);
      this.tail = run.catch(() => undefined);
      return run;
    }

    close(code: number, reason: string): void {
      if (this.ended) return;
      this.ended = true;
      channels.dropPeer(this);
      try {
        this.ws.close(code, reason);
      } catch {
        this.ws.terminate();
      }
    }

    onMessage(data: RawData): void {
      const frame = Array.isArray(data)
        ? Buffer.concat(data)
        : Buffer.isBuffer(data)
          ? data
          : Buffer.from(data);
      // Binary frames go through the same parser as text: UTF-8 JSON either way.
      const parsed = parseClientFrame(frame, { maxBytes: o.maxPayloadBytes });
      if (!parsed.ok) {
        const id = parsed.code === 'too_large' ? salvageId(frame) : parsed.id;
        this.send(nak(id, parsed.code, parsed.message));
        if (++this.badFrames >= o.maxBadFrames) this.close(CloseCodes.badFrames, 'too many bad frames');
        return;
      }
      this.badFrames = 0;
      void dispatch(parsed.envelope, this);
    }

    onClose(): void {
      this.ended = true;
      conns.delete(this);
      channels.dropPeer(this);
    }
  }

  function onUpgrade(req: IncomingMessage, socket: Duplex, head: Buffer): void {
    const url = requestUrl(req);
    if (url?.pathname !== o.path) {
      if (ownServer) rejectUpgrade(socket, 404);
      return;
    }
    // A client vanishing mid-handshake is not a server failure; ws takes the socket over after.
    socket.on('error', ignore);
    upgrade(req, socket, head, url).catch((err: unknown) => {
      onError(err, 'upgrade');
      rejectUpgrade(socket, 500);
    });
  }

  async function upgrade(req: IncomingMessage, socket: Duplex, head: Buffer, url: URL): Promise<void> {
    if (closing) return rejectUpgrade(socket, 503);
    const clientId = url.searchParams.get('clientId');
    if (!validClientId(clientId)) {
      return rejectUpgrade(
        socket,
        400,
        nak(null, 'bad_request', `clientId must be 1–${MAX_ID_LENGTH} characters`),
      );
    }
    const auth = await authenticate(req);
    if (!auth.ok) return rejectUpgrade(socket, auth.status, auth.nak);
    if (socket.destroyed || closing) {
      socket.destroy();
      return;
    }
    wss.handleUpgrade(req, socket, head, (ws) => {
      socket.off('error', ignore);
      const conn = new SocketConn(ws, clientId, auth.principal);
      conns.add(conn);
      ws.on('message', (data) => {
        try {
          conn.onMessage(data);
        } catch (err) {
          onError(err, 'message');
        }
      });
      // Protocol errors of the client's making (frames over 4 × maxPayloadBytes, bad UTF-8,
      // resets): ws closes the socket itself (1009 for size). Not reported: a misbehaving
      // client must not be able to flood the server's logs.
      ws.on('error', ignore);
      ws.on('close', () => conn.onClose());
    });
  }

  // ---- HTTP --------------------------------------------------------------------------

  function reply(
    res: ServerResponse,
    status: number,
    body?: ServerEnvelope[],
    headers: Record<string, string> = {},
  ) {
    if (res.headersSent) return;
    const text = body ? encode(body) : '';
    res.writeHead(status, {
      ...CORS_HEADERS,
      'Cache-Control': 'no-store',
      ...(body
        ? { 'Content-Type': 'application/json', 'Content-Length': String(Buffer.byteLength(text)) }
        : {}),
      ...headers,
    });
    res.end(text);
  }

  function onRequest(req: IncomingMessage, res: ServerResponse): void {
    const url = requestUrl(req);
    if (url?.pathname !== o.path) {
      if (ownServer) reply(res, 404);
      return;
    }
    request(req, res).catch((err: unknown) => {
      onError(err, 'http');
      reply(res, 500, [nak(null, 'server_error', 'internal error')]);
    });
  }

  async function request(req: IncomingMessage, res: ServerResponse): Promise<void> {
    if (req.method === 'OPTIONS') return reply(res, 204);
    if (req.method !== 'POST') return reply(res, 405, undefined, { Allow: 'POST, OPTIONS' });
    if (closing)
      return reply(res, 503, [nak(null, 'server_error', 'server is closing')], { 'Retry-After': '1' });
    const clientId = req.headers['x-client-id'];
    if (!validClientId(clientId)) {
      return reply(res, 400, [nak(null, 'bad_request', `X-Client-Id must be 1–${MAX_ID_LENGTH} characters`)]);
    }
    const tooLarge = () =>
      // Closing the connection is what stops reading the rest of the body.
      reply(res, 413, [nak(null, 'too_large', `body exceeds ${o.maxPayloadBytes} bytes`)], {
        Connection: 'close',
      });
    if (Number(req.headers['content-length'] ?? 0) > o.maxPayloadBytes) return tooLarge();
    const auth = await authenticate(req);
    if (!auth.ok) return reply(res, auth.status, [auth.nak]);
    const body = await readBody(req, o.maxPayloadBytes);
    if (body === 'aborted') return;
    if (body === 'too_large') return tooLarge();
    const parsed = parseClientFrame(body, { maxBytes: o.maxPayloadBytes });
    if (!parsed.ok)
      return reply(res, HTTP_STATUS_OF[parsed.code], [nak(parsed.id, parsed.code, parsed.message)]);
    const out: ServerEnvelope[] = [];
    await dispatch(parsed.envelope, { clientId, principal: auth.principal, send: (env) => out.push(env) });
    // Closed meanwhile (e.g. a batch left unprocessed): "retry later" keeps the batch alive.
    if (closing)
      return reply(res, 503, [nak(null, 'server_error', 'server is closing')], { 'Retry-After': '1' });
    reply(res, 200, out);
  }

  // ---- lifecycle ---------------------------------------------------------------------

  httpServer.on('request', onRequest);
  httpServer.on('upgrade', onUpgrade);

  if (ownServer) {
    await new Promise<void>((resolve, reject) => {
      httpServer.once('error', reject);
      httpServer.listen(o.port, o.host, () => {
        httpServer.off('error', reject);
        resolve();
      });
    }).catch(async (err: unknown) => {
      clearInterval(housekeeping);
      channels.close();
      await store.close().catch(() => undefined);
      throw err;
    });
  }

  async function shutdown(): Promise<void> {
    clearInterval(housekeeping);
    httpServer.off('request', onRequest);
    httpServer.off('upgrade', onUpgrade);
    channels.close();
    dedupe.close();
    const all = [...conns];
    const closed = all.map((c) => new Promise<void>((resolve) => c.ws.once('close', () => resolve())));
    for (const c of all) c.close(CloseCodes.goingAway, 'server closing');
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([
      Promise.all(closed),
      new Promise<void>((resolve) => {
        timer = setTimeout(resolve, CLOSE_GRACE_MS);
      }),
    ]);
    clearTimeout(timer);
    for (const c of all) if (c.ws.readyState !== WebSocket.CLOSED) c.ws.terminate();
    wss.close();
    if (ownServer) {
      const done = new Promise<void>((resolve) => httpServer.close(() => resolve()));
      httpServer.closeAllConnections();
      await done;
    }
    await store.close().catch((err: unknown) => onError(err, 'store.close'));
  }

  return {
    httpServer,
    address() {
      const info = httpServer.address() as AddressInfo | string | null;
      if (!info || typeof info === 'string')
        throw new Error('the http server is not listening on a TCP port');
      return { host: info.address, port: info.port };
    },
    publish: (channel, payload, opts) => publish(channel, payload, opts),
    stats() {
      const clients = new Set(dedupe.activeClientIds());
      for (const c of conns) clients.add(c.clientId);
      return {
        sockets: conns.size,
        clients: clients.size,
        dedupeEntries: dedupe.size,
        channels: channels.size,
      };
    },
    close() {
      closing ??= shutdown();
      return closing;
    },
  };
}

function requestUrl(req: IncomingMessage): URL | undefined {
  try {
    return new URL(req.url ?? '/', 'http://localhost');
  } catch {
    return undefined;
  }
}

/** The id of a frame refused as too large, so the client knows which batch failed. */
function salvageId(frame: Buffer): string | null {
  try {
    const raw = JSON.parse(frame.toString('utf8')) as unknown;
    if (typeof raw === 'object' && raw !== null && 'id' in raw) {
      const id = (raw as { id: unknown }).id;
      if (validClientId(id)) return id;
    }
  } catch {
    // Not JSON either: nothing to salvage.
  }
  return null;
}

/**
 * The body; `'too_large'` as soon as it grows past `max` (the rest is not read); `'aborted'`
 * when the client went away, which is not worth reporting.
 */
function readBody(req: IncomingMessage, max: number): Promise<Buffer | 'too_large' | 'aborted'> {
  return new Promise((resolve) => {
    const chunks: Buffer[] = [];
    let size = 0;
    const onData = (chunk: Buffer) => {
      size += chunk.length;
      if (size > max) {
        req.off('data', onData);
        req.pause();
        resolve('too_large');
        return;
      }
      chunks.push(chunk);
    };
    req.on('data', onData);
    req.once('end', () => resolve(Buffer.concat(chunks)));
    req.once('error', () => resolve('aborted'));
    req.once('close', () => resolve('aborted')); // no-op once 'end' resolved it
  });
}

function rejectUpgrade(socket: Duplex, status: number, body?: NakEnvelope): void {
  if (socket.destroyed) return;
  const text = body ? encode([body]) : '';
  socket.once('finish', () => socket.destroy());
  socket.end(
    `HTTP/1.1 ${status} ${STATUS_CODES[status] ?? ''}\r\n` +
      'Connection: close\r\n' +
      'Content-Type: application/json\r\n' +
      `Content-Length: ${Buffer.byteLength(text)}\r\n\r\n${text}`,
  );
}
