/**
 * The WebSocket transport of the reference server, on `ws`: the upgrade (path, `Origin`,
 * clientId, `authenticate`, sockets per clientId and per principal), one `SocketConn` per
 * socket (the byte budget checked before a frame is parsed, frame parsing, bad-frame
 * counting, the send buffer bound and drain waits for slow consumers), protocol-level pings
 * that reap dead peers, and closing every socket at shutdown.
 * What a frame means is the dispatcher's business (dispatcher.ts).
 *
 * Nothing a client sends may escape into the event loop: every entry point here catches,
 * answers the client, and reports through `onError`.
 */

import { type IncomingMessage, STATUS_CODES } from 'node:http';
import type { Duplex } from 'node:stream';
import { type RawData, WebSocket, WebSocketServer } from 'ws';
import {
  CloseCodes,
  encode,
  MAX_ID_LENGTH,
  type NakEnvelope,
  nak,
  parseClientFrame,
  type ServerEnvelope,
} from '../protocol/index.js';
import type { Channels, Subscription } from './channels.js';
import { Deadlines } from './deadlines.js';
import { type Dispatcher, type LivePeer, type Peer, validClientId } from './dispatcher.js';
import { requestUrl } from './http.js';
import {
  type AllowedHosts,
  type AllowedOrigins,
  type Budget,
  bucketNow,
  drainTokens,
  FrameBucket,
  type Holder,
  hostAllowed,
  leadingId,
  originAllowed,
  type TokenState,
  takeToken,
} from './limits.js';

/** How long `close()` waits for clients to answer the close handshake before cutting them. */
const CLOSE_GRACE_MS = 1000;

/** Standard close code for "the server hit an unexpected condition"; the client redials. */
const INTERNAL_ERROR = 1011;
/** Standard close code "try again later" (RFC 6455 §7.4.1, IANA registry): over the budget. */
const TRY_AGAIN_LATER = 1013;

/** What `ws` (8.x) keeps of the message a socket is receiving; its fields are not public. */
interface ReceiverState {
  _bufferedBytes?: unknown;
  _messageLength?: unknown;
  _writableState?: { length?: unknown; errored?: unknown };
}

/** A positive finite number, else 0 (a field of `ws`'s receiver that may not be there). */
const positive = (v: unknown) => (typeof v === 'number' && Number.isFinite(v) && v > 0 ? v : 0);

/**
 * Bytes `ws` holds for the message still being received on `ws`: bytes read but not yet
 * parsed into a complete frame, the payload of the fragments received so far, and chunks
 * queued in front of its parser. Reads `ws`'s receiver state (ws 8; test/harden-budgets
 * checks it against a real unfinished message); 0 when the fields are not there, `null` when
 * the parser failed (ws closes the socket itself).
 */
function receivingBytes(ws: WebSocket): number | null {
  const r = (ws as unknown as { _receiver?: ReceiverState })._receiver;
  if (!r) return 0;
  // The parser failed on this chunk (its 'error' event comes on the next tick).
  if (r._writableState?.errored) return null;
  // `_messageLength`: the payload of the fragments kept so far (no compression here), 0 for
  // a message in one frame; `_bufferedBytes`: read, not yet a whole frame.
  return positive(r._bufferedBytes) + positive(r._messageLength) + positive(r._writableState?.length);
}

const ignore = () => {};

export interface WsTransportOptions<P> {
  /** The one path upgrades are accepted on. */
  path: string;
  /** Largest frame answered normally, in bytes; up to 4 × this is read and refused with a NAK. */
  maxPayloadBytes: number;
  /** Send-buffer bytes above which a socket is closed as a slow consumer. */
  maxBufferedBytes: number;
  /**
   * Replay backpressure (PROTOCOL §3, "Replay flow control"): a replay sends its next
   * message only while the socket's send buffer holds less than this many bytes.
   */
  replayHighWaterBytes: number;
  /** Replay bytes not yet handed to the kernel, all sockets together, before replays wait. */
  maxReplayBufferedBytes: number;
  /** A replaying socket whose send buffer does not drain within this is closed (4429). */
  replayDrainTimeoutMs: number;
  /** Consecutive unparseable frames after which a socket is closed. */
  maxBadFrames: number;
  /** Most operations in one `SYN` (`NAK too_large` beyond). */
  maxBatch: number;
  /** Which `Origin`s may upgrade; others are answered 403. */
  allowedOrigins: AllowedOrigins;
  /** Which `Host` headers may upgrade; others are answered 403 (DNS rebinding). */
  allowedHosts: AllowedHosts;
  /** The server's own `host` option, allowed by `allowedHosts: 'auto'`. */
  ownHost: string | undefined;
  /** Frames per second one socket may send (token bucket refill); `NAK rate_limited` beyond. */
  maxFramesPerSecond: number;
  /** Frames one socket may send at once above its rate (token bucket size). */
  maxFrameBurst: number;
  /** Frames per second the sockets of one principal may send together (bucket size: the same). */
  maxFramesPerSecondPerPrincipal: number;
  /** Milliseconds an upgraded socket has to send its first frame; then closed with 4408. */
  firstFrameTimeoutMs: number;
  /** Request bytes held per client and in all; a frame past them gets `NAK rate_limited`. */
  budget: Budget;
  /**
   * Milliseconds between protocol-level pings; a socket that showed no sign of life (pong or
   * frame) since the previous ping is terminated. A dead peer is freed within 2 × this.
   */
  pingIntervalMs: number;
  /** Open sockets per clientId; a new one beyond closes the oldest (4409). */
  maxSocketsPerClient: number;
  /** Open sockets per principal key; an upgrade beyond is answered 429. */
  maxSocketsPerPrincipal: number;
  /** Open sockets in all; an upgrade beyond is answered 503 before `authenticate`. */
  maxSockets: number;
  dispatcher: Dispatcher<P>;
  channels: Channels;
  /**
   * The key a socket's per-principal limits count under (sockets, frame rate, request bytes,
   * channels, look-ups) and it is revoked by: `p:<principalKey>`, or for the anonymous
   * principal `a:<address>` / `c:<clientId>` (the server's `anonymousKey`).
   */
  limitKey(principal: P, clientId: string, req: IncomingMessage): string;
  /** Whether the server is closing: upgrades are refused with 503. */
  closing(): boolean;
  onError(err: unknown, where: string): void;
}

export interface WsTransport {
  /**
   * Handle an `upgrade` of the http server. Returns `false`, touching nothing, when the
   * request is not for `path` (its owner decides); `true` once it took the socket over.
   */
  handleUpgrade(req: IncomingMessage, socket: Duplex, head: Buffer): boolean;
  /** Open sockets. */
  readonly size: number;
  /** Upgrades refused because `maxSockets` sockets were open. */
  readonly refused: number;
  /** Replay bytes sent and not yet handed to the kernel, all sockets together. */
  readonly replayBufferedBytes: number;
  /** clientIds of the open sockets. */
  clientIds(): Iterable<string>;
  /** Channels the open sockets of `clientId` are live-subscribed to, sorted. */
  subscriptionsOf(clientId: string): string[];
  /**
   * Close (`CloseCodes.disconnected`) the sockets of `clientId` and/or principal key `key`;
   * both undefined matches nothing. Returns how many were closed.
   */
  disconnect(m: { clientId?: string | undefined; principalKey?: string | undefined }): number;
  /**
   * Close every socket (1001), wait up to `CLOSE_GRACE_MS` for the close handshakes, cut the
   * rest, and close the `WebSocketServer`.
   */
  close(): Promise<void>;
}

/** What a `SocketConn` shares with its transport. */
interface ConnContext<P> {
  readonly o: WsTransportOptions<P>;
  /**
   * Open sockets by their upgraded TCP socket (the shared event listeners find their socket
   * here: `this` is the TCP socket for its `data` listener, and `ws`'s `_socket` for the
   * `ws` events).
   */
  readonly conns: Map<Duplex, SocketConn<P>>;
  /** Open sockets per clientId, and per principal key, oldest first (no scan per upgrade). */
  readonly byClient: Map<string, Slot<SocketConn<P>>>;
  readonly byPrincipal: Map<string, Slot<SocketConn<P>>>;
  readonly replay: ReplayBudget;
  /** Frame buckets of the principals with open sockets, by principal key. */
  readonly principalBuckets: Map<string, FrameBucket>;
  /** Sockets that have not sent their first frame yet, and their deadlines. */
  readonly firstFrame: Deadlines<SocketConn<P>>;
}

/**
 * The server-wide bound on replay bytes buffered: each socket counts the bytes of the replay
 * frames it sent that were not yet handed to the kernel (`ws.send`'s callback says when they
 * were); while the sum is at `max`, replays wait here, first come first served, and are woken
 * as bytes drain or sockets close.
 */
class ReplayBudget {
  total = 0;
  private waiters: Array<() => void> = [];

  constructor(readonly max: number) {}

  get full(): boolean {
    return this.total >= this.max;
  }

  add(bytes: number): void {
    this.total += bytes;
  }

  release(bytes: number): void {
    if (bytes <= 0) return;
    this.total -= bytes;
    while (this.waiters.length > 0 && !this.full) this.waiters.shift()!();
  }

  /** Resolves when the budget has room (re-check: another waiter may have taken it). */
  room(): Promise<void> {
    return new Promise((resolve) => this.waiters.push(resolve));
  }
}

/**
 * Open sockets under one key, oldest first: the socket itself when it is the only one (the
 * usual case; no collection per idle connection), else an array.
 */
type Slot<V> = V | V[];

function indexAdd<K, V extends object>(index: Map<K, Slot<V>>, key: K, v: V): void {
  const slot = index.get(key);
  if (slot === undefined) index.set(key, v);
  else if (Array.isArray(slot)) slot.push(v);
  else index.set(key, [slot, v]);
}

function indexDelete<K, V extends object>(index: Map<K, Slot<V>>, key: K, v: V): void {
  const slot = index.get(key);
  if (slot === v) index.delete(key);
  else if (Array.isArray(slot)) {
    const rest = slot.filter((x) => x !== v);
    if (rest.length === 0) index.delete(key);
    else index.set(key, rest.length === 1 ? rest[0]! : rest);
  }
}

function slotItems<V extends object>(slot: Slot<V> | undefined): V[] {
  return slot === undefined ? [] : Array.isArray(slot) ? [...slot] : [slot];
}

/** `setImmediate` callback: write out what a socket corked (no closure per socket). */
const flushConn = (conn: { flush(): void }) => conn.flush();

/** Sockets answered in this turn, written out by one microtask for all (`flushSoon`). */
const toFlush: Array<{ flush(): void }> = [];
function flushQueued(): void {
  // A socket may be listed once per frame it answered; `flush` is a no-op once done.
  try {
    for (let i = 0; i < toFlush.length; i++) toFlush[i]!.flush();
  } finally {
    toFlush.length = 0;
  }
}
/** Write out what `conn` corked once the current synchronous work is done. */
function flushSoon(conn: { flush(): void }): void {
  if (toFlush.push(conn) === 1) queueMicrotask(flushQueued);
}

/** The settled promise every socket's serial lane starts from (one for all: idle memory). */
const SETTLED: Promise<unknown> = Promise.resolve();

/** `SocketConn.flags`: a pong or a frame arrived since the last ping. */
const ALIVE = 1;
/** `SocketConn.flags`: closed (by either side); nothing more is sent or read. */
const ENDED = 2;
/** `SocketConn.flags`: the TCP socket is corked, frames sent are held until `flush`. */
const CORKED = 4;
/** `SocketConn.flags`: no frame arrived yet, the socket is in `ctx.firstFrame`. */
const AWAITING_FIRST = 8;

/**
 * What few sockets need, made on first use (an idle socket holds one field for all of it):
 * subscriptions, the serial lane, replay bytes, bytes of an unfinished message.
 */
interface ConnExtras {
  subs: Map<string, Subscription> | undefined;
  tail: Promise<unknown>;
  replayHeld: number;
  receiving: number;
}

class SocketConn<P> implements LivePeer, Peer<P> {
  badFrames = 0;
  /** Frames refused in a row for passing the frame rate. */
  private refused = 0;
  /**
   * `ALIVE | ENDED | CORKED | AWAITING_FIRST` in one small integer (one field, not four:
   * idle memory), read and written through the accessors below.
   */
  private flags = ALIVE | AWAITING_FIRST;
  /** `ConnExtras`, once one of them is needed. */
  private more: ConnExtras | undefined;
  /** `subscriberKey` of a socket without a `principalKey`, made on first use. */
  private subKey: string | undefined;
  /**
   * The socket's own frame bucket (`takeToken`), inline: numbers on this object, no object
   * of their own (idle memory).
   */
  tokens: number;
  last: number;

  constructor(
    private readonly ctx: ConnContext<P>,
    readonly ws: WebSocket,
    /** The upgraded TCP socket `ws` writes to; corked to coalesce frames into one write. */
    private readonly sock: Duplex,
    readonly clientId: string,
    readonly principal: P,
    /**
     * The frame bucket shared by the sockets of this socket's `principalKey` (its `key`);
     * `undefined` for an anonymous socket keyed by its clientId (`anonymousKey: 'clientId'`).
     */
    private readonly principalBucket: FrameBucket | undefined,
  ) {
    this.tokens = ctx.o.maxFrameBurst * 1000;
    this.last = bucketNow();
    ctx.firstFrame.add(this);
  }

  /**
   * The key this socket's per-principal limits count under and it is revoked by (the
   * transport's `limitKey`), its `subscriberKey`; `undefined` for an anonymous socket keyed
   * by its clientId (`anonymousKey: 'clientId'`), which is counted by `maxSocketsPerClient`
   * and its own frame rate only, as before 0.2 (no string, bucket or index entry per idle
   * socket). Kept by its shared frame bucket (one field less per socket).
   */
  get principalKey(): string | undefined {
    return this.principalBucket?.key;
  }

  /** A pong or a frame arrived since the last ping. */
  get alive(): boolean {
    return (this.flags & ALIVE) !== 0;
  }
  set alive(v: boolean) {
    this.flags = v ? this.flags | ALIVE : this.flags & ~ALIVE;
  }
  private get ended(): boolean {
    return (this.flags & ENDED) !== 0;
  }
  private set ended(v: boolean) {
    this.flags = v ? this.flags | ENDED : this.flags & ~ENDED;
  }
  private get corked(): boolean {
    return (this.flags & CORKED) !== 0;
  }
  private set corked(v: boolean) {
    this.flags = v ? this.flags | CORKED : this.flags & ~CORKED;
  }
  private get awaitingFirst(): boolean {
    return (this.flags & AWAITING_FIRST) !== 0;
  }
  private set awaitingFirst(v: boolean) {
    this.flags = v ? this.flags | AWAITING_FIRST : this.flags & ~AWAITING_FIRST;
  }

  private extras(): ConnExtras {
    this.more ??= { subs: undefined, tail: SETTLED, replayHeld: 0, receiving: 0 };
    return this.more;
  }
  private get subsMap(): Map<string, Subscription> | undefined {
    return this.more?.subs;
  }
  /** Replay bytes this socket sent that are not yet handed to the kernel (`ReplayBudget`). */
  private get replayHeld(): number {
    return this.more?.replayHeld ?? 0;
  }
  private set replayHeld(v: number) {
    if (v === 0 && this.more === undefined) return;
    this.extras().replayHeld = v;
  }
  /** Bytes of an unfinished message held against the budget (`accountReceiving`). */
  private get receiving(): number {
    return this.more?.receiving ?? 0;
  }
  private set receiving(v: number) {
    if (v === 0 && this.more === undefined) return;
    this.extras().receiving = v;
  }

  /** No frame within `firstFrameTimeoutMs` (called by `ctx.firstFrame`). */
  firstFrameMissed(): void {
    this.awaitingFirst = false;
    this.cut(CloseCodes.handshakeTimeout, 'no frame within firstFrameTimeoutMs');
  }

  /**
   * Count one frame (message, ping or pong) against the socket's and the principal's frame
   * rate. `false`: refused; after `maxBadFrames` refusals in a row the socket is cut (4420).
   * O(1), allocates nothing.
   */
  admit(): boolean {
    const now = bucketNow();
    const { o } = this.ctx;
    if (
      takeToken(this as TokenState, o.maxFramesPerSecond, o.maxFrameBurst, now) &&
      (this.principalBucket === undefined || this.principalBucket.take(now))
    ) {
      this.refused = 0;
      return true;
    }
    if (++this.refused >= this.ctx.o.maxBadFrames) this.cut(CloseCodes.frameRate, 'too many frames');
    return false;
  }

  /** `ChannelPeer.chargeFrames`: `n` frames more against both frame buckets, down to empty. */
  chargeFrames(n: number): void {
    if (n <= 0) return;
    const now = bucketNow();
    const { o } = this.ctx;
    drainTokens(this as TokenState, o.maxFramesPerSecond, o.maxFrameBurst, now, n);
    this.principalBucket?.drain(now, n);
  }

  /**
   * Close with `code` and stop reading: a flooding or silent peer gets the close frame but
   * no more of its bytes are read, and the socket is destroyed after `CLOSE_GRACE_MS` (as
   * every socket the server closes, `close`).
   */
  private cut(code: number, reason: string): void {
    if (this.ended) return;
    this.close(code, reason);
    this.ws.pause();
  }

  /**
   * The key its channel subscriptions are counted and revoked by: `principalKey`, or
   * `c:<clientId>` made on first use (most sockets never subscribe).
   */
  get subscriberKey(): string {
    const key = this.principalKey;
    if (key !== undefined) return key;
    this.subKey ??= `c:${this.clientId}`;
    return this.subKey;
  }

  /** `Peer.limitKey`: the same key, for the channel look-up budget. */
  get limitKey(): string {
    return this.subscriberKey;
  }

  get conn(): SocketConn<P> {
    return this;
  }

  /** The socket's subscriptions by channel (made on first use: most sockets have none). */
  get subs(): Map<string, Subscription> {
    const more = this.extras();
    more.subs ??= new Map();
    return more.subs;
  }

  get open(): boolean {
    return !this.ended && this.ws.readyState === WebSocket.OPEN;
  }

  send(env: ServerEnvelope): void {
    this.sendText(encode(env));
  }

  /**
   * Send one encoded frame. Frames sent in the same turn of the event loop leave in one TCP
   * write: the first corks the socket and `flush` (at the end of the request that sent it, or
   * in this turn's check phase at the latest) uncorks it. So an `ACK` and the response
   * that follows it in the same turn are one write and one read for the client, and a replay
   * page is one write instead of one per `MSG`. Nothing waits for I/O: a response that needs
   * the store or the app's I/O goes in a later write, after the `ACK` has left.
   */
  sendText(text: string): void {
    if (!this.open) return;
    if (!this.corked) {
      this.corked = true;
      this.sock.cork();
      setImmediate(flushConn, this);
    }
    this.ws.send(text);
    if (this.ws.bufferedAmount > this.ctx.o.maxBufferedBytes)
      this.close(CloseCodes.slowConsumer, 'slow consumer');
  }

  /**
   * Send one replayed frame, counted against the server-wide replay budget until `ws` has
   * handed it to the kernel (its send callback).
   */
  sendReplay(text: string): void {
    if (!this.open) return;
    // Bytes of the frame as `ws` buffers it (UTF-8; `length` is a lower bound, close enough
    // for a budget and much cheaper than counting).
    const bytes = text.length;
    this.replayHeld += bytes;
    this.ctx.replay.add(bytes);
    if (!this.corked) {
      this.corked = true;
      this.sock.cork();
      setImmediate(flushConn, this);
    }
    this.ws.send(text, () => this.releaseReplay(bytes));
  }

  private releaseReplay(bytes: number): void {
    // Released all at once when the socket ended (a later callback must not count twice).
    const n = Math.min(bytes, this.replayHeld);
    this.replayHeld -= n;
    this.ctx.replay.release(n);
  }

  /**
   * Replay flow control (PROTOCOL §3, "Replay flow control"): `undefined` when the next
   * replayed message may be sent at once, else a promise that settles when it is worth
   * asking again. A socket whose send buffer is at `replayHighWaterBytes` waits for it to
   * drain, at most `replayDrainTimeoutMs`, after which it is closed as a slow consumer (4429);
   * a socket with room waits while the server-wide replay budget is full, without a
   * deadline (the sockets holding the budget drain or are closed by theirs).
   */
  replayReady(): Promise<void> | undefined {
    if (!this.open) return undefined;
    const { o, replay } = this.ctx;
    if (this.ws.bufferedAmount >= o.replayHighWaterBytes) return this.drain(o.replayDrainTimeoutMs);
    if (replay.full) return replay.room();
    return undefined;
  }

  /** Resolves once the send buffer drained or the socket ended; closes it after `ms`. */
  private drain(ms: number): Promise<void> {
    this.flush();
    // No `drain` owed (written out meanwhile): ask again after other I/O had its turn.
    if (!this.sock.writableNeedDrain) return new Promise((resolve) => setImmediate(resolve));
    return new Promise<void>((resolve) => {
      const done = () => {
        clearTimeout(timer);
        this.sock.off('drain', done);
        this.sock.off('close', done);
        resolve();
      };
      const timer = setTimeout(() => {
        this.close(CloseCodes.slowConsumer, 'slow consumer: replay not read');
        done();
      }, ms);
      // `drain` comes once the buffer is empty: it was over the writable high-water mark
      // (`replayHighWaterBytes` is at least 64 KiB), so Node owes that event.
      this.sock.once('drain', done);
      this.sock.once('close', done);
    });
  }

  /** Write out what is corked (no-op when nothing is). */
  flush(): void {
    if (!this.corked) return;
    this.corked = false;
    this.sock.uncork();
  }

  fail(reason: string): void {
    this.close(INTERNAL_ERROR, reason);
  }

  serial<T>(task: () => Promise<T>): Promise<T> {
    const more = this.extras();
    const run = more.tail.then(task);
    more.tail = run.catch(() => undefined);
    return run;
  }

  close(code: number, reason: string): void {
    if (this.ended) return;
    this.flush();
    this.ended = true;
    this.releaseReplay(this.replayHeld);
    if (this.subsMap) this.ctx.o.channels.dropPeer(this);
    try {
      this.ws.close(code, reason);
    } catch {
      this.ws.terminate();
      return;
    }
    // A peer that does not answer the close frame is destroyed after the grace: it has left
    // every count already (issue 12: evicted sockets of one clientId, their close frames never
    // answered, were held by ws's own 30 s close timeout, 1 791 of them from one address).
    const ws = this.ws;
    setTimeout(() => {
      if (ws.readyState !== WebSocket.CLOSED) ws.terminate();
    }, CLOSE_GRACE_MS).unref();
  }

  /** Who this socket's bytes are held for in the budget. */
  get holder(): Holder {
    return { clientId: this.clientId, principal: this.subscriberKey };
  }

  /**
   * After each chunk the socket read: hold the bytes `ws` keeps of the message still being
   * received (its unfinished frame and the fragments before it) against the budget, before
   * the message is complete, so N sockets × an unfinished 4 × `maxPayloadBytes` message is
   * no longer memory outside it (issue 12: 64 sockets held 252 MiB). A socket whose unfinished
   * message would pass its principal's share or the server's total is closed `1013` (try
   * again later); the client redials, its request goes on over HTTP.
   */
  accountReceiving(): void {
    const pending = receivingBytes(this.ws);
    // Closing, or ws refused the frame (over its 4 × maxPayloadBytes cap: it closes 1009
    // itself): nothing more is read.
    if (!this.open || pending === null) {
      this.releaseReceiving();
      return;
    }
    if (pending === this.receiving) return;
    if (pending < this.receiving) {
      this.ctx.o.budget.release(this.holder, this.receiving - pending);
      this.receiving = pending;
      return;
    }
    if (this.ctx.o.budget.take(this.holder, pending - this.receiving, { perClient: false })) {
      this.receiving = pending;
      return;
    }
    this.releaseReceiving();
    this.close(TRY_AGAIN_LATER, 'too many request bytes waiting');
    // Stop reading what it goes on sending: the close handshake is not waited for.
    this.ws.terminate();
  }

  private releaseReceiving(): void {
    if (this.receiving === 0) return;
    this.ctx.o.budget.release(this.holder, this.receiving);
    this.receiving = 0;
  }

  onMessage(data: RawData): void {
    if (this.ended) return;
    const { o } = this.ctx;
    this.alive = true;
    if (this.awaitingFirst) {
      this.awaitingFirst = false;
      this.ctx.firstFrame.delete(this);
    }
    // The message is complete: what was held while it arrived is now held as the frame
    // below (the next chunk's accounting takes what is left of a following message).
    this.releaseReceiving();
    const frame = Array.isArray(data)
      ? Buffer.concat(data)
      : Buffer.isBuffer(data)
        ? data
        : Buffer.from(data);
    // Before anything else, frames are counted: a flood of small frames (PNGs) costs the
    // server a parse and an answer each, and starved everybody else (issue 12).
    if (!this.admit()) {
      if (!this.ended) this.send(nak(leadingId(frame), 'rate_limited', 'too many frames; slow down'));
      return;
    }
    const size = frame.byteLength;
    // Before parsing: the bytes held for this client and for the server bound the heap that
    // parsed requests waiting for their turn can take (limits.ts). Checked here, reserved only
    // once the frame turns out to wait (`pending` below): nothing else runs in between, and a
    // frame answered in this turn (the usual case) holds nothing past it.
    const who = this.holder;
    if (size <= o.maxPayloadBytes && !o.budget.fits(who, size)) {
      this.send(nak(leadingId(frame), 'rate_limited', 'too many request bytes waiting; retry later'));
      return;
    }
    const held = size <= o.maxPayloadBytes ? size : 0;
    // Binary frames go through the same parser as text: UTF-8 JSON either way.
    const parsed = parseClientFrame(frame, { maxBytes: o.maxPayloadBytes, maxBatch: o.maxBatch });
    if (!parsed.ok) {
      // The id of a frame refused as too large, so the client knows which batch failed: read
      // from its first bytes only, since parsing up to 4 × maxPayloadBytes of JSON (~21× that
      // on the heap) is the work the refusal saves.
      const id = parsed.code === 'too_large' && parsed.id === null ? leadingId(frame) : parsed.id;
      this.send(nak(id, parsed.code, parsed.message));
      if (++this.badFrames >= o.maxBadFrames) this.close(CloseCodes.badFrames, 'too many bad frames');
      return;
    }
    this.badFrames = 0;
    // Corked here, so the ACK and a response made in this turn leave in one write.
    const corkedHere = !this.corked;
    if (corkedHere) {
      this.corked = true;
      this.sock.cork();
    }
    let pending: Promise<void> | undefined;
    try {
      pending = o.dispatcher.dispatch(parsed.envelope, this);
    } finally {
      if (pending === undefined) {
        // Answered in this turn: written out once this turn's synchronous work is done (the
        // frames `ws` read in the same chunk are answered in the same write), no timer.
        flushSoon(this);
      } else {
        // Waits for its answer: its bytes are held until then (`fits` said yes above).
        o.budget.add(who, held);
        // The ACK leaves with the response when that comes in a microtask, else in this
        // turn's check phase at the latest (as every frame `sendText` corks).
        if (corkedHere) setImmediate(flushConn, this);
      }
    }
    if (pending === undefined) return;
    void pending.finally(() => {
      o.budget.release(who, held);
      this.flush();
    });
  }

  onClose(): void {
    this.flush();
    this.releaseReceiving();
    this.ended = true;
    this.releaseReplay(this.replayHeld);
    const { ctx } = this;
    if (this.awaitingFirst) {
      this.awaitingFirst = false;
      ctx.firstFrame.delete(this);
    }
    if (ctx.conns.get(this.sock) === this) {
      ctx.conns.delete(this.sock);
      const bucket = this.principalBucket;
      if (bucket && --bucket.users === 0 && ctx.principalBuckets.get(bucket.key) === bucket) {
        ctx.principalBuckets.delete(bucket.key);
      }
    }
    indexDelete(ctx.byClient, this.clientId, this);
    if (this.principalBucket) indexDelete(ctx.byPrincipal, this.principalBucket.key, this);
    if (this.subsMap) ctx.o.channels.dropPeer(this);
  }
}

/** Build the WebSocket side; attach `handleUpgrade` to the http server's `upgrade` event. */
export function createWsTransport<P>(o: WsTransportOptions<P>): WsTransport {
  const { onError } = o;
  const wss = new WebSocketServer({
    noServer: true,
    maxPayload: 4 * o.maxPayloadBytes,
    perMessageDeflate: false,
    clientTracking: false,
    // Pings from the client are frames too: answered only within the frame rate (below).
    autoPong: false,
  });
  const conns = new Map<Duplex, SocketConn<P>>();
  const principalBuckets = new Map<string, FrameBucket>();
  const ctx: ConnContext<P> = {
    o,
    conns,
    byClient: new Map(),
    byPrincipal: new Map(),
    replay: new ReplayBudget(o.maxReplayBufferedBytes),
    principalBuckets,
    firstFrame: new Deadlines(o.firstFrameTimeoutMs, (c: SocketConn<P>) => c.firstFrameMissed()),
  };

  // Liveness: one protocol-level ping per socket per interval (browsers answer pings without
  // running page code, so a throttled tab answers too, and the traffic keeps idle proxies
  // from cutting the connection). A socket with no pong and no frame since the previous
  // ping is a dead peer: terminated, which frees it and its subscriptions.
  const pinger = setInterval(() => {
    for (const c of conns.values()) {
      if (!c.alive) {
        c.ws.terminate();
        continue;
      }
      c.alive = false;
      try {
        c.ws.ping();
      } catch {
        c.ws.terminate();
      }
    }
  }, o.pingIntervalMs);
  pinger.unref();

  /** The socket a `ws` event is about (`ws` 8 keeps its TCP socket in `_socket`). */
  const connOf = (ws: WebSocket) => conns.get((ws as unknown as { _socket: Duplex })._socket);

  function onPong(this: WebSocket): void {
    const conn = connOf(this);
    if (!conn) return;
    conn.alive = true;
    conn.admit();
  }
  function onPing(this: WebSocket, data: Buffer): void {
    const conn = connOf(this);
    if (!conn) return;
    conn.alive = true;
    if (conn.admit() && this.readyState === WebSocket.OPEN) this.pong(data);
  }
  function onWsMessage(this: WebSocket, data: RawData): void {
    try {
      connOf(this)?.onMessage(data);
    } catch (err) {
      onError(err, 'message');
    }
  }
  function onWsClose(this: WebSocket): void {
    connOf(this)?.onClose();
  }
  /** After each chunk a socket read (`this` is the TCP socket). */
  function onSocketData(this: Duplex): void {
    conns.get(this)?.accountReceiving();
  }

  /** Sockets of one clientId, and of one principal key, oldest first. */
  const ofClient = (clientId: string) => slotItems(ctx.byClient.get(clientId));
  const principalCount = (key: string) => slotItems(ctx.byPrincipal.get(key)).length;

  /** Upgrades refused by `maxSockets` (`WsTransport.refused`). */
  let refusedFull = 0;
  const refuseFull = (socket: Duplex) => {
    refusedFull++;
    rejectUpgrade(socket, 503, nak(null, 'rate_limited', 'too many sockets on this server; use HTTP'), {
      'Retry-After': '5',
    });
  };
  const refusePrincipal = (socket: Duplex) =>
    rejectUpgrade(socket, 429, nak(null, 'rate_limited', 'too many sockets for this principal'), {
      'Retry-After': '5',
    });

  function handleUpgrade(req: IncomingMessage, socket: Duplex, head: Buffer): boolean {
    const url = requestUrl(req);
    if (url?.pathname !== o.path) return false;
    // A client vanishing mid-handshake is not a server failure; ws takes the socket over after.
    socket.on('error', ignore);
    upgrade(req, socket, head, url).catch((err: unknown) => {
      onError(err, 'upgrade');
      rejectUpgrade(socket, 500);
    });
    return true;
  }

  async function upgrade(req: IncomingMessage, socket: Duplex, head: Buffer, url: URL): Promise<void> {
    if (o.closing()) return rejectUpgrade(socket, 503);
    // A Host this server does not answer to: a DNS-rebinding page (README "Origins").
    if (!hostAllowed(req, o.allowedHosts, o.ownHost)) {
      return rejectUpgrade(
        socket,
        403,
        nak(null, 'forbidden', 'host not allowed (list it in the server option allowedHosts)'),
      );
    }
    // Before authenticate: a foreign page's upgrade carries the victim's cookies (CSWSH).
    if (!originAllowed(req, o.allowedOrigins)) {
      return rejectUpgrade(socket, 403, nak(null, 'forbidden', 'origin not allowed'));
    }
    const clientId = url.searchParams.get('clientId');
    if (!validClientId(clientId)) {
      return rejectUpgrade(
        socket,
        400,
        nak(null, 'bad_request', `clientId must be 1–${MAX_ID_LENGTH} characters`),
      );
    }
    // Refusals that cost nothing come first: the server-wide cap before `authenticate` (a
    // full server spends nothing on a socket it will refuse), the principal's before the
    // binding is written (issue 12: refused requests wrote bindings to SQLite).
    if (conns.size >= o.maxSockets) return refuseFull(socket);
    const auth = await o.dispatcher.authenticate(req);
    if (!auth.ok) return rejectUpgrade(socket, auth.status, auth.nak, auth.headers);
    const key = o.limitKey(auth.principal, clientId, req);
    if (principalCount(key) >= o.maxSocketsPerPrincipal) return refusePrincipal(socket);
    const refused = await o.dispatcher.bind(clientId, auth.principal);
    if (refused) return rejectUpgrade(socket, refused.status, refused.nak, refused.headers);
    if (socket.destroyed || o.closing()) {
      socket.destroy();
      return;
    }
    // Again after the awaits: upgrades authenticated meanwhile may have taken the room.
    if (conns.size >= o.maxSockets) return refuseFull(socket);
    if (principalCount(key) >= o.maxSocketsPerPrincipal) return refusePrincipal(socket);
    wss.handleUpgrade(req, socket, head, (ws) => {
      socket.off('error', ignore);
      // The newest socket of a clientId is the one its client uses; older ones are most
      // likely dead peers not reaped yet, so they make room.
      const mine = ofClient(clientId);
      for (const old of mine.slice(0, Math.max(0, mine.length - o.maxSocketsPerClient + 1))) {
        old.close(CloseCodes.tooManySockets, 'too many sockets for this clientId');
        old.onClose();
      }
      // A clientId key (`anonymousKey: 'clientId'`) is the clientId's own: maxSocketsPerClient
      // and the socket's frame rate already bound it.
      const counted = !key.startsWith('c:');
      let shared: FrameBucket | undefined;
      if (counted) {
        shared = principalBuckets.get(key);
        if (!shared) {
          const rate = o.maxFramesPerSecondPerPrincipal;
          shared = new FrameBucket(rate, rate, bucketNow(), key);
          principalBuckets.set(key, shared);
        }
        shared.users++;
      }
      const conn = new SocketConn(ctx, ws, socket, clientId, auth.principal, shared);
      conns.set(socket, conn);
      indexAdd(ctx.byClient, clientId, conn);
      if (counted) indexAdd(ctx.byPrincipal, key, conn);
      // One listener function per event for all sockets (`this` is the socket): closures per
      // socket were a good part of an idle connection's memory.
      ws.on('pong', onPong);
      ws.on('ping', onPing);
      ws.on('message', onWsMessage);
      // Protocol errors of the client's making (frames over 4 × maxPayloadBytes, bad UTF-8,
      // resets): ws closes the socket itself (1009 for size). Not reported: a misbehaving
      // client must not be able to flood the server's logs.
      ws.on('error', ignore);
      ws.on('close', onWsClose);
      // After ws's own listener (added when it took the socket over): the chunk is parsed.
      socket.on('data', onSocketData);
    });
  }

  async function close(): Promise<void> {
    clearInterval(pinger);
    ctx.firstFrame.stop();
    const all = [...conns.values()];
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
  }

  return {
    handleUpgrade,
    get size() {
      return conns.size;
    },
    get refused() {
      return refusedFull;
    },
    get replayBufferedBytes() {
      return ctx.replay.total;
    },
    *clientIds() {
      for (const c of conns.values()) yield c.clientId;
    },
    subscriptionsOf(clientId) {
      const out = new Set<string>();
      for (const c of conns.values()) {
        if (c.clientId !== clientId || !c.open) continue;
        for (const [name, sub] of c.subs) if (!sub.closed) out.add(name);
      }
      return [...out].sort();
    },
    disconnect(m) {
      if (m.clientId === undefined && m.principalKey === undefined) return 0;
      let n = 0;
      for (const c of [...conns.values()]) {
        if (m.clientId !== undefined && c.clientId !== m.clientId) continue;
        if (m.principalKey !== undefined && c.subscriberKey !== m.principalKey) continue;
        c.close(CloseCodes.disconnected, 'disconnected by the server');
        n++;
      }
      return n;
    },
    close,
  };
}

/** Answer an upgrade with a plain HTTP status (and a NAK body) and close the socket. */
export function rejectUpgrade(
  socket: Duplex,
  status: number,
  body?: NakEnvelope,
  headers: Record<string, string> = {},
): void {
  if (socket.destroyed) return;
  const text = body ? encode([body]) : '';
  socket.once('finish', () => socket.destroy());
  socket.end(
    `HTTP/1.1 ${status} ${STATUS_CODES[status] ?? ''}\r\n` +
      'Connection: close\r\n' +
      Object.entries(headers)
        .map(([k, v]) => `${k}: ${v}\r\n`)
        .join('') +
      'Content-Type: application/json\r\n' +
      `Content-Length: ${Buffer.byteLength(text)}\r\n\r\n${text}`,
  );
}
