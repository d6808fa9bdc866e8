/**
 * The reference syncwire server (`syncwire/server`): both transports of PROTOCOL.md on one
 * path of a `node:http` server, with `ws` for the socket. This file owns the options, the
 * wiring and the lifecycle (listen, housekeeping, shutdown, stats); dispatcher.ts answers
 * envelopes whatever the transport (hooks, publish, SUB/UNS); ws.ts is the socket transport,
 * http.ts the HTTP one; dedupe.ts makes `SYN`s exactly-once and ordered, channels.ts does
 * subscriptions, replay and fan-out.
 *
 * Nothing a client sends and nothing a hook throws may escape into the event loop: every
 * entry point catches, answers the client, and reports through `onError`.
 */

import { readFileSync } from 'node:fs';
import { createServer, type IncomingMessage, type Server, ServerResponse } from 'node:http';
import type { AddressInfo, Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import type { CorsOptions } from 'cors';
import { DEFAULT_MAX_PAYLOAD_BYTES, randomId } from '../protocol/index.js';
import { memoryStore } from '../stores/memory.js';
import { type DedupeStore, type HistoryStore, isDedupeStore } from '../stores/types.js';
import { Channels } from './channels.js';
import { Deadlines } from './deadlines.js';
import { Dedupe } from './dedupe.js';
import { makeDispatcher, type RevokeMatch } from './dispatcher.js';
import { createHttpHandler, reply } from './http.js';
import {
  addressKey,
  Bindings,
  clientAddress,
  compileTrust,
  defaultPrincipalKey,
  type TrustProxy,
} from './identity.js';
import { type AllowedHosts, type AllowedOrigins, Budget } from './limits.js';
import { LookupScheduler } from './lookups.js';
import { createWsTransport, rejectUpgrade } from './ws.js';

export type { CorsOptions } from 'cors';
export {
  MEMORY_STORE_DEFAULTS,
  type MemoryStore,
  type MemoryStoreOptions,
  memoryStore,
} from '../stores/memory.js';
export type {
  ChannelHead,
  DedupeClaim,
  DedupeLimits,
  DedupeStore,
  HistoryStore,
  RetentionOptions,
  StoredMessage,
} from '../stores/types.js';
export { defaultPrincipalKey, type TrustProxy } from './identity.js';
export type { AllowedHosts, AllowedOrigins } from './limits.js';

/**
 * Payload type per channel name, for typed `publish`: e.g.
 * `{ [K: \`board-${number}\`]: { changes: Change[] } }`. The default lets any name carry anything.
 */
export type ChannelMap = Record<string, unknown>;

/** What `onSync` is given besides the operations. */
export interface SyncContext<P = unknown, Channels extends ChannelMap = ChannelMap> {
  /** The client that sent the batch. */
  clientId: string;
  /** What `authenticate` returned for the request or socket; `null` without that hook. */
  principal: P;
  /**
   * `server.publish`, with `author` set to this client: the author's own sockets get the
   * message with its payload, marked `echo: true`, at its seq like every other subscriber,
   * and the response lists it under `published` (docs/consistency.md). The seq is taken
   * when this is called (synchronously for memory and SQLite), so assign the new state and
   * call it in one synchronous step. `{ except: clientId }` sends the author a payload-less
   * echo instead (the consistency guarantee is then lost for that client).
   */
  publish<K extends keyof Channels & string>(
    channel: K,
    payload: Channels[K],
    opts?: PublishOptions,
  ): Promise<PublishResult>;
}

export interface PublishOptions {
  /** clientId whose sockets get the message as a payload-less `echo` (PROTOCOL "echo"). */
  except?: string | undefined;
  /**
   * clientId of the author: its sockets get the message with its payload, marked
   * `echo: true`. `ctx.publish` sets it to the batch's client. @default undefined
   */
  author?: string | undefined;
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

/**
 * Options of `createSyncServer`. Type parameters: `Op` (one operation of a `SYN`), `Result`
 * (its result), `P` (the principal `authenticate` returns), `Channels` (payload per channel
 * name). All default to `unknown`/any name; inferred from `onSync` and `authenticate` when
 * they are annotated. (Before 0.2 the only parameter was `P`: write `<unknown, unknown, P>`.)
 */
export interface SyncServerOptions<
  Op = unknown,
  Result = unknown,
  P = unknown,
  Channels extends ChannelMap = ChannelMap,
> {
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
   * Whether to answer HTTP requests for `path` from a `request` listener of its own on the http
   * server. Set `false` when an application framework owns the server's requests (Express,
   * Fastify, a router of your own) and mount `middleware` / `handleRequest` in it instead:
   * Express and Fastify answer every request they see, so a second listener would answer
   * twice (or, without mounting, the framework answers `POST /sync` with 404 first). The
   * WebSocket upgrade is always handled on the server (frameworks leave upgrades alone).
   * @default true
   */
  handleHttp?: boolean;
  /**
   * The one path both transports answer on.
   * @default '/sync'
   */
  path?: string;
  /**
   * Apply a batch of operations. Return one result per operation, in order. Throwing, or
   * returning anything but an array of `ops.length` results, answers `NAK server_error`;
   * throw a `SyncError` with a NAK code (e.g. `forbidden`, `rate_limited`) to refuse the
   * batch with that code and message instead. A NAK means the server did not complete the
   * batch (every `send()` of it rejects), not that nothing was applied: the server cannot
   * undo what this hook did before throwing (an op applied and published before the throw
   * stays applied, and its change reaches subscribers). So make it all-or-nothing (one
   * database transaction, publishing inside it), or return a per-operation error result
   * (e.g. `{ errors: [...] }`, fed to the client's `errors$`) for an operation that fails
   * instead of throwing; throw only when nothing was applied (PROTOCOL §2 `NAK`, README
   * "A throwing `onSync` is not a rollback"). On `server.close()` a running call is awaited
   * up to `closeTimeoutMs` and may still publish.
   */
  onSync(ops: Op[], ctx: SyncContext<P, Channels>): Result[] | Promise<Result[]>;
  /**
   * Who is asking, from the upgrade or the HTTP request (cookie, header, `token` query
   * parameter). Called on every upgrade and every HTTP request. `null`/`undefined` refuses
   * with 401; throw `SyncError('forbidden')` for 403. Any other exception answers 500.
   * @default undefined (everybody is let in, with principal `null`)
   */
  authenticate?(req: IncomingMessage): P | null | undefined | Promise<P | null | undefined>;
  /**
   * A principal's stable key: what makes two principals "the same" for the clientId binding
   * and for dedupe (PROTOCOL §1 "principal binding", §3 rule 3). Keys are hashed (SHA-256)
   * before they are stored. Must not throw.
   * @default strings and numbers as they are; objects with a string or number `id` by that
   *   `id`; anything else as its JSON (`defaultPrincipalKey`). Without `authenticate` every
   *   client is the one anonymous principal.
   */
  principalKey?(principal: P): string;
  /**
   * Whether `principal` may do `action` on `channel`; asked for every channel of a `SUB`
   * before anything is replayed, and again by `server.recheck()`. A refused channel gets
   * `{ error: { code: 'forbidden' } }` in the response; the others are served (PROTOCOL §3
   * rule 7). Throwing refuses that channel with `server_error`.
   * @default undefined (everything is allowed)
   */
  authorize?(principal: P, channel: string, action: 'subscribe'): boolean | Promise<boolean>;
  /**
   * The application's state of a channel, for a `SUB` asking `snapshot: true`
   * (`client.subscribe(ch, { snapshot: true })`). Called after the channel's head was read,
   * so it must include every change published up to that head; the answer is
   * `{ epoch, seq, recovered: true, snapshot: { seq: head, data } }` and the replay starts
   * after the head (docs/consistency.md). Must return JSON; throwing answers the `SUB`
   * `NAK server_error`. Without this hook `snapshot` is ignored (no `snapshot` in the answer).
   * @default undefined
   */
  snapshot?(channel: string, principal: P): unknown | Promise<unknown>;
  /**
   * Where channel history lives. Closed by `server.close()`.
   * @default memoryStore()
   */
  store?: HistoryStore;
  /**
   * Where dedupe memory lives (`claim/complete/release`), when not on `store`. Not closed by
   * `server.close()`.
   * @default `store` when it is a `DedupeStore` (sqliteStore, redisStore), else none: dedupe
   *   is then kept in this process's memory (bounded by `dedupeMaxEntries`).
   */
  dedupeStore?: DedupeStore;
  /**
   * How long the response to each `(principal, clientId, SYN id)` is remembered, and how long
   * a clientId stays bound to its principal after its last use.
   * @default 600000 (10 minutes)
   */
  dedupeWindowMs?: number;
  /**
   * Most responses remembered at once (the oldest go first); bounds dedupe memory in count,
   * in this process and (passed with every `complete`) in sqliteStore and redisStore.
   * @default 100000
   */
  dedupeMaxEntries?: number;
  /**
   * Most clientIds bound to a principal at once in this process (PROTOCOL §1 "Principal
   * binding"), when bindings live here (a store without `bind`, e.g. memoryStore). A binding
   * lasts `dedupeWindowMs` after its last use and is never evicted earlier; a new clientId
   * past this is refused `too_many_clients` (HTTP 503, `Retry-After`) until bindings expire.
   * Only with `authenticate` (without it nothing is bound).
   * @default 100000
   */
  maxClientIds?: number;
  /**
   * Most clientIds one principal may have bound at once in this process (same rule and
   * refusal as `maxClientIds`), so one principal cannot fill the table for everyone.
   * @default 1000
   */
  maxClientIdsPerPrincipal?: number;
  /**
   * Most bytes of dedupe memory: remembered responses (UTF-8 JSON) plus about 160 bytes per
   * entry. Over it, the oldest responses are reduced to their fingerprints (a replay of them
   * is answered `NAK result_not_kept`), then the oldest entries dropped. Stores drop whole
   * entries, oldest first.
   * @default 67108864 (64 MiB)
   */
  dedupeMaxBytes?: number;
  /**
   * A response larger than this (UTF-8 JSON bytes) is remembered as its fingerprint only: a
   * replay of that request is answered `NAK result_not_kept` ("applied, result not kept").
   * @default 65536 (64 KiB)
   */
  dedupeMaxResponseBytes?: number;
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
   * Replay flow control (PROTOCOL §3): a socket's catch-up sends its next `MSG` only while the
   * socket's send buffer holds less than this many bytes, so a client that stops reading
   * during a replay costs the server at most one history page (`replayLimit` messages) plus
   * about this. At least 65536 (the writable high-water mark Node signals `drain` from).
   * @default 262144 (256 KiB)
   */
  replayHighWaterBytes?: number;
  /**
   * Replay bytes sent to sockets and not yet handed to the kernel, all sockets of this process
   * together. While it is reached, every replay waits (first come, first served) until bytes
   * drain or the sockets holding them are closed; live messages are not held back.
   * @default 67108864 (64 MiB)
   */
  maxReplayBufferedBytes?: number;
  /**
   * A replaying socket whose send buffer stays at `replayHighWaterBytes` this long is closed
   * with `CloseCodes.slowConsumer` (4429); the client redials and resumes from its cursor.
   * @default 30000
   */
  replayDrainTimeoutMs?: number;
  /**
   * Bytes of history one replay page holds (payload JSON text; the store stops reading there,
   * always after at least one message), and the most `MSG` text one HTTP `SUB` answer holds,
   * all channels together; a channel cut short says `more: true` and the client asks again
   * (PROTOCOL §3 rules 8 and 12; issue 12).
   * @default 1048576 (1 MiB)
   */
  replayPageBytes?: number;
  /**
   * HTTP answer bytes handed to responses and not yet flushed to the kernel, all requests of
   * this process together. A request arriving while it is reached is answered 429
   * `rate_limited` with `Retry-After: 1` before its body is read.
   * @default 33554432 (32 MiB)
   */
  maxResponseBufferedBytes?: number;
  /**
   * The share of `maxResponseBufferedBytes` one principal's unread HTTP answers may hold
   * (without `authenticate`, each clientId is its own principal). Past it, that principal's
   * new requests are answered 429 `rate_limited` with `Retry-After: 1` while others' are still
   * served: one reader that never reads cannot lock every client out of polling.
   * @default 4194304 (4 MiB: four full answers of the default replayPageBytes)
   */
  maxResponseBufferedBytesPerPrincipal?: number;
  /**
   * HTTP requests per second one principal may make (burst: as many at once); the HTTP side's
   * frame rate (without `authenticate`, per clientId). Past it a request is answered 429
   * `rate_limited` with `Retry-After: 1` before its body is read. A degraded client makes about
   * one request per operation batch and one poll per `pollInterval`.
   * @default 200
   */
  maxHttpRequestsPerSecondPerPrincipal?: number;
  /**
   * An HTTP answer not flushed to the kernel this long after it was written (a client that
   * does not read it) is destroyed, and its bytes released.
   * @default 30000
   */
  responseDrainTimeoutMs?: number;
  /**
   * Consecutive unparseable frames after which a socket is closed with `CloseCodes.badFrames`.
   * @default 100
   */
  maxBadFrames?: number;
  /**
   * `SYN`s of one client waiting for their turn beyond which new ones get `NAK rate_limited`
   * (a well-behaved client has one in flight); also the most `SUB`/`UNS` frames waiting in
   * one socket's lane (behind a replay) before new ones get `NAK rate_limited`.
   * @default 100
   */
  maxQueuedPerClient?: number;
  /**
   * Most channels the sockets of one principal (by `principalKey`; without `authenticate`,
   * each clientId on its own) may be subscribed to at once in this process. Channels of a `SUB` beyond it get the entry
   * `{ error: { code: 'too_many_channels' } }`; the others are served.
   * @default 1000
   */
  maxChannelsPerPrincipal?: number;
  /**
   * Most channel records the store keeps (its `channelCount`: memory entries, SQLite rows,
   * Redis key pairs), server-wide. Every socket `SUB` and HTTP poll creates a record for each
   * channel it names (up to `maxChannelsPerPrincipal` per `SUB`); one never published to is
   * freed once nobody here follows it (`HistoryStore.releaseChannels`), others by housekeeping
   * (every minute), so principals that stay subscribed hold theirs. A `SUB` that names a
   * channel the store does not keep yet while this many are kept is refused whole,
   * `NAK rate_limited` (HTTP 429): the client asks again after a backoff. The last tenth is a
   * reserve (issue 12: 100 principals × 1 000 held channels filled it for everyone): past
   * `0.9 × maxChannels`, only a `SUB` after which its principal follows at most
   * `maxChannelsPerPrincipal / 10` channels here may make new records. A record costs ~430 B
   * of heap (memory store), ~58 B of file (SQLite), ~220 B (Redis). Channels created by `publish` are not refused, but
   * count. Checked before each `SUB`, so concurrent `SUB`s may pass it by one `SUB`'s names.
   * Needs a store with `channelCount` (memory, SQLite and Redis have it).
   * @default 100000
   */
  maxChannels?: number;
  /**
   * Channel look-ups per second the `SUB`s of one principal (by `principalKey`; without
   * `authenticate`, each clientId on its own) may cost, sockets and HTTP polls together: a
   * `SUB` costs the number of channels it names, charged before any `authorize` call or store
   * read; past the budget the whole `SUB` is answered `NAK rate_limited` (HTTP 429) and the
   * client asks again after a backoff. Burst: `max(this, maxChannelsPerPrincipal)`, so one
   * full `SUB` always passes a rested budget. Keeps SUBs of many channels (each a store
   * look-up) from occupying the event loop other principals need.
   * @default 2000
   */
  maxChannelLookupsPerSecondPerPrincipal?: number;
  /**
   * Channel look-ups per second all `SUB`s and HTTP polls together may cost, server-wide.
   * Every look-up goes through one scheduler: at most 32 per event-loop turn, all principals
   * together, round-robin across principals (the key the per-principal limits count under), so
   * another client's frame waits at most about one slice whatever the number of principals,
   * and an honest `SUB` of one channel waits at most one slice per principal with look-ups
   * waiting. Past this rate the look-ups wait their turn (no refusal); a principal that
   * already has look-ups waiting while more than one second of them (this many) wait
   * server-wide is refused, whole `SUB` `NAK rate_limited` (HTTP: in a 200), before any look-up,
   * and the client asks again after a backoff. A principal with nothing waiting is always
   * admitted.
   * Chosen by measurement (README "Limits"): with 8 principals polling 1 000 fresh channels,
   * 10 000 kept an honest client's p50 at 0.4–0.5 ms where 4 000 gave 2–3 ms (more `SUB`s
   * waited, were refused and sent again); it also bounds how fast many clients re-subscribe
   * after a restart (100 000 channels: at least 10 s).
   * @throws RangeError when not a finite number > 0.
   * @default 10000
   */
  maxChannelLookupsPerSecond?: number;
  /**
   * Which browser pages may use this server: the `Origin` of every upgrade and HTTP request
   * is checked before `authenticate`, and a refused one is answered `403` (README "Origins
   * and CSWSH"). Requests without `Origin` (non-browser clients) are accepted; so are
   * same-host ones (the `Origin`'s `host:port` equals the `Host` header). A list adds exact
   * origins (`'https://app.example.org'`; `'*'` accepts all); a function decides alone for
   * every request with an `Origin` (throwing refuses). Behind a proxy that rewrites `Host`,
   * list the public origin.
   * @default 'same-host'
   */
  allowedOrigins?: AllowedOrigins;
  /**
   * CORS for the HTTP transport, as options of the `cors` package laid over the defaults
   * (reflect the request's origin, which already passed `allowedOrigins`; methods POST,
   * OPTIONS; headers X-Client-Id, Content-Type, Authorization; exposed Retry-After; max age
   * 86400 s). Pass `{ credentials: true }` for cross-origin cookie auth over HTTP; `false`
   * sends no CORS headers (same-origin pages only).
   * @default {}
   */
  cors?: CorsOptions | false;
  /**
   * Most operations in one `SYN`; a longer one is answered `NAK too_large` (HTTP 413) before
   * `onSync` runs. Keep it at or above the clients' `maxBatch` (100 by default).
   * @default 1000
   */
  maxBatch?: number;
  /**
   * Request bytes (frames and HTTP bodies, as received) held for one clientId at once, from
   * arrival until answered, across its sockets and HTTP. A frame past it is answered
   * `NAK rate_limited` (HTTP 429) without being parsed. At least `maxPayloadBytes`.
   * @default 2 × maxPayloadBytes (2 MiB)
   */
  maxQueuedBytesPerClient?: number;
  /**
   * Request bytes held for one principal at once (by `principalKey`; each clientId on its own
   * for the anonymous principal, i.e. without `authenticate`), all its clientIds, sockets and
   * HTTP requests together, bodies and unfinished socket messages included while they arrive.
   * Past it, its requests are answered `NAK rate_limited` (HTTP 429) without being parsed,
   * and a socket whose unfinished message passes it is closed `1013` (README "Limits"): one
   * principal can never take more than this share of `maxQueuedBytes`. At least
   * `maxPayloadBytes`.
   * @default 4 × maxPayloadBytes (4 MiB)
   */
  maxQueuedBytesPerPrincipal?: number;
  /**
   * Request bytes held for all clients together (same rules); past it, requests are answered
   * `NAK rate_limited` (HTTP 429) without being parsed. Parsed JSON can take up to ~28× its
   * bytes on the heap (`[[{},{},…],…]`, README "Limits"), so requests waiting take at most
   * ~28 × this.
   * @default 16777216 (16 MiB)
   */
  maxQueuedBytes?: number;
  /**
   * Open sockets per clientId. A new socket beyond closes the oldest with
   * `CloseCodes.tooManySockets` (4409): the newest is the one a live client uses.
   * @default 4
   */
  maxSocketsPerClient?: number;
  /**
   * Open sockets per principal (counted under `principalKey`; the anonymous principal, i.e.
   * without `authenticate`, per client address: `anonymousKey`). An upgrade beyond is
   * answered `429` with `Retry-After`; the client goes on over HTTP meanwhile.
   * @default 64
   */
  maxSocketsPerPrincipal?: number;
  /**
   * Open sockets of this server, all principals together (file descriptors: past the
   * process's `ulimit -n` nobody can connect, issue 12). An upgrade beyond is answered `503`
   * with `Retry-After: 5` before `authenticate` and before anything is stored; the reference
   * client goes on over HTTP meanwhile and redials after its backoff. Refusals are counted in
   * `stats().socketsRefused`.
   * @default min(10000, half the process's soft open-files limit (`/proc/self/limits`, Linux;
   *   10000 elsewhere)): the other half is left to HTTP connections, handshakes in progress,
   *   the store and the application.
   */
  maxSockets?: number;
  /**
   * Open TCP connections of a server this one creates, of every kind together (idle ones,
   * HTTP requests, handshakes in progress, WebSockets): Node's `server.maxConnections`. A
   * connection beyond is closed by Node as soon as it is accepted, so the process never runs
   * out of file descriptors for its store and application (issue 12: idle connections,
   * bounded only in time by `handshakeTimeoutMs`, took every descriptor `maxSockets` left
   * free and new clients got `ECONNRESET`). Counted in `stats().connectionsRefused`. Keep it
   * above `maxSockets` (WebSockets are connections too). On a `server` of your own set
   * `server.maxConnections` yourself (README "Limits").
   * @default the process's soft open-files limit (`/proc/self/limits`, Linux) less a reserve
   *   of max(32, an eighth of it) (2048 → 1792); no cap where that file cannot be read or
   *   says `unlimited`
   */
  maxConnections?: number;
  /**
   * TCP connections from one peer address (IPv6 by /64, as `addressKey`) to a server this
   * one creates that have not yet sent a complete request or upgrade head (issue 12: one
   * address held 2 027 silent connections, every descriptor the process had). When a new
   * connection finds this many: if the address's oldest such connection has been silent for
   * 1 s or more, that one is destroyed and the new one let in (so a silent hoarder sharing a
   * NAT address with honest clients cannot lock them out); otherwise (a burst of fresh
   * connections) the new one is destroyed at accept, before a byte is read. Either way it is
   * counted in `stats().connectionsRefused`. A connection stops counting at its first request
   * head, or when it closes or times out (`handshakeTimeoutMs`). Honest clients send their
   * request within a round trip; a load generator dialling more than this many at once from
   * one process sees some reset (the reference client redials). The addresses of trusted
   * proxies (`trustProxy`) are exempt: behind a proxy every connection comes from it. With
   * `trustProxy: true` or a hop count every peer may be a proxy, so nobody is capped: list
   * the proxies' addresses. Only on a server this one creates.
   * @default 128
   */
  maxPendingConnectionsPerAddress?: number;
  /**
   * What the per-principal limits of the anonymous principal (a server without
   * `authenticate`) count under: every `…PerPrincipal` option, the channel look-up budget and
   * the HTTP request rate.
   * - `'address'` (the default): the client's address (`a:<ip>`, IPv6 by /64), taken from
   *   the socket or, with `trustProxy`, from `X-Forwarded-For`. A client cannot dodge it by
   *   choosing a new clientId (issue 12: eight pollers with a fresh `X-Client-Id` per poll
   *   slowed another client 49–330×). Clients behind one NAT or proxy share it.
   * - `'clientId'`: each clientId on its own (before 0.2 the only behaviour). The client
   *   chooses its clientId, so this protects nothing against a hostile client: for test
   *   rigs, benchmarks and trusted networks that open many clients from one address.
   * Authenticated principals count under their `principalKey` either way.
   * @default 'address'
   */
  anonymousKey?: 'address' | 'clientId';
  /**
   * Which proxies may say who the client is (`X-Forwarded-For`), for the address anonymous
   * clients are limited by (`anonymousKey`): Express's `trust proxy` values, evaluated by
   * `proxy-addr` (`TrustProxy`: `true`, a hop count, addresses/CIDRs/`'loopback'`, or a
   * function). Unset, the socket's peer is the client; a request that carries
   * `X-Forwarded-For` or `Forwarded` is then reported once to `onError` (code
   * `ERR_SYNCWIRE_UNEXPECTED_X_FORWARDED_FOR`): behind a proxy every anonymous client would
   * share the proxy's address and its limits.
   * @default false
   */
  trustProxy?: TrustProxy;
  /**
   * Milliseconds between WebSocket protocol-level pings to every socket. A socket that sent
   * no pong and no frame since the previous ping is terminated, freeing it and its
   * subscriptions: a dead peer (no FIN or RST ever arrived) is freed within 2 × this of its
   * last sign of life (plus timer latency). The
   * pings also keep idle proxies and load balancers from cutting a healthy connection whose
   * page is throttled (browsers answer pings without running page code). Keep it under the
   * shortest idle timeout on the path (e.g. nginx `proxy_read_timeout`, 60 s by default).
   * @default 25000
   */
  pingIntervalMs?: number;
  /**
   * Milliseconds an HTTP request's headers may take to arrive (`server.headersTimeout`;
   * answered 408 and closed). Only on a server this one creates; set it on your own `server`.
   * @default 10000
   */
  headersTimeoutMs?: number;
  /**
   * Milliseconds a whole HTTP request may take to arrive: `server.requestTimeout` on a server
   * this one creates, and on any server the deadline for reading a sync request's body once
   * its headers are in (answered 408, connection closed). At least `headersTimeoutMs`.
   * @default 30000
   */
  requestTimeoutMs?: number;
  /**
   * Milliseconds a TCP connection to a server this one creates has to send a complete
   * request (or upgrade) head; then it is destroyed. Node's `headersTimeout` only starts at
   * the first byte, so a connection that never sent one was held forever. On a `server` of
   * your own this is yours to do.
   * @default 10000
   */
  handshakeTimeoutMs?: number;
  /**
   * Milliseconds an upgraded WebSocket has to send its first frame; then it is closed with
   * `CloseCodes.handshakeTimeout` (4408) and destroyed. A reference client sends its first
   * frame at the latest one keepalive (T, default 15 000) after the socket opened (at once
   * when it has channels or operations), so keep this above the clients' `timeout`.
   * @default 60000 (4 × the default T)
   */
  firstFrameTimeoutMs?: number;
  /**
   * Frames per second one socket may send, sustained (a token bucket refilled at this rate;
   * every frame counts: `SYN`, `PNG`, `SUB`, `UNS`, unparseable ones, and WebSocket ping and
   * pong control frames). A frame over it is answered `NAK rate_limited` (a ping: no pong)
   * and not parsed; after `maxBadFrames` refusals in a row the socket is closed with
   * `CloseCodes.frameRate` (4420). A reference client has one request in flight, so it sends
   * about one frame per round trip plus a `PNG` per T: 10 000 leaves loopback benchmarks
   * (≈2 000–5 000 round trips per second) alone. Lower it for a public server.
   * @default 10000
   */
  maxFramesPerSecond?: number;
  /**
   * Frames one socket may send at once above `maxFramesPerSecond` (the bucket's size).
   * @default maxFramesPerSecond
   */
  maxFrameBurst?: number;
  /**
   * Frames per second the sockets of one principal (by `principalKey`) may send together,
   * with a burst of one second's worth; over it, as `maxFramesPerSecond`. The anonymous
   * principal (no `authenticate`) is not counted: each of its sockets has only its own rate.
   * @default 20000
   */
  maxFramesPerSecondPerPrincipal?: number;
  /**
   * Which `Host` headers the server answers (`AllowedHosts`); a request or upgrade naming
   * another is answered `403` before the `Origin` check. The default, `'auto'`, allows
   * `localhost`, `*.localhost`, IP literals and the `host` option: a server reached by a
   * domain name must list it (`['sync.example.org']`, `'.example.org'` for subdomains) or
   * pass `'all'`. This is what refuses a DNS-rebinding page (README "Origins").
   * @default 'auto'
   */
  allowedHosts?: AllowedHosts;
  /**
   * Milliseconds `close()` waits for batches already running in `onSync` to finish and for
   * their responses to be stored in the dedupe store (so a client's retry on the restarted
   * server is answered from it, not applied again). Batches still queued, not started, are
   * not run: the client resends them. Past this bound the store is closed anyway and a batch
   * still running is in the crash window of docs/multi-process.md. `0` does not wait.
   * @default 10000
   */
  closeTimeoutMs?: number;
  /**
   * Where internal failures and hook exceptions are reported.
   * @default logs to console.error
   */
  onError?(error: unknown, where: string): void;
}

export interface SyncServerStats {
  /** Open sockets. */
  sockets: number;
  /** Upgrades refused since start because `maxSockets` sockets were open. */
  socketsRefused: number;
  /**
   * TCP connections closed since start by `maxConnections` (at accept, Node's `drop` event)
   * or `maxPendingConnectionsPerAddress` (the new one at accept, or the address's stalest
   * silent one to make room), on a server this one creates.
   */
  connectionsRefused: number;
  /**
   * TCP connections open now that have not yet sent a request or upgrade head, and keep-alive
   * connections waiting for their next request from an untrusted peer (both count against
   * `maxPendingConnectionsPerAddress`).
   */
  pendingConnections: number;
  /** Distinct clientIds with an open socket or a `SYN` queued or running. */
  clients: number;
  /**
   * `SYN` responses remembered for dedupe: in this process, or in the dedupe store when it
   * reports them (`DedupeStore.dedupeStats`: sqliteStore does, counting this process's file;
   * redisStore does not, read Redis's own memory there).
   */
  dedupeEntries: number;
  /** Bytes those entries count against `dedupeMaxBytes`. */
  dedupeBytes: number;
  /** Channels with at least one live socket subscription. */
  channels: number;
  /**
   * Channel records the store keeps (its `channelCount`, what `maxChannels` bounds), as last
   * read: by each `SUB`'s `maxChannels` check, by housekeeping, and by the previous `stats()`
   * call (so it lags by one call). `0` for a store without `channelCount`.
   */
  channelRecords: number;
  /** ClientId → principal bindings held in this process (what `maxClientIds` bounds). */
  bindings: number;
  /** Request bytes received and not yet answered (bounded by `maxQueuedBytes`). */
  queuedBytes: number;
  /**
   * Replay bytes sent to sockets and not yet handed to the kernel (bounded by
   * `maxReplayBufferedBytes` plus one message per replaying socket).
   */
  replayBufferedBytes: number;
  /**
   * HTTP answer bytes written and not yet flushed to the kernel (bounded by
   * `maxResponseBufferedBytes` plus one answer per request let in before it was reached).
   */
  responseBufferedBytes: number;
  /**
   * Channel look-ups admitted and waiting for their turn in the server-wide scheduler, all
   * principals together (`maxChannelLookupsPerSecond`; the server refuses a principal that
   * already waits while this is over that many). Never more than 2 × B (README "Limits").
   * The freeing of records of channels left is not in it: see `lookupFreeing`.
   */
  lookupBacklog: number;
  /**
   * Look-ups waiting to free the records of channels nobody here follows any more (`UNS`,
   * sockets closed, polls answered): never refused, refuse nobody, and share the turns of
   * the principal that left them (README "Limits", maxChannelLookupsPerSecond).
   */
  lookupFreeing: number;
}

export interface SyncServer<Channels extends ChannelMap = ChannelMap> {
  /** Where the server listens, as bound (port 0 resolved). */
  address(): { host: string; port: number };
  /**
   * Append to a channel's history; every socket subscribed to it gets the `MSG`. Resolves
   * once stored, with the message's seq and the channel's epoch. The payload must be JSON.
   */
  publish<K extends keyof Channels & string>(
    channel: K,
    payload: Channels[K],
    opts?: PublishOptions,
  ): Promise<PublishResult>;
  /** Counts that show memory stays bounded. */
  stats(): SyncServerStats;
  /**
   * Introspection (tests, admin pages): the channels `clientId` is live-subscribed to on
   * this process's open sockets, sorted by name. A client on the HTTP fallback has none
   * (an HTTP `SUB` is a one-shot replay); other processes' sockets are not counted.
   */
  subscriptionsOf(clientId: string): string[];
  /**
   * End live subscriptions to `channel`: every socket's, or those of one `principal` and/or
   * one `clientId`. Each socket concerned gets a server `UNS` (PROTOCOL §3 rule 11, code
   * `unsubscribed`) and its client stops following the channel. With a store shared by
   * several processes (Redis) every process does the same. A client may subscribe again:
   * to keep it out, make `authorize` refuse and call `recheck()`. Resolves with how many
   * subscriptions this process ended.
   */
  unsubscribe<Q = unknown>(target: { channel: string; principal?: Q; clientId?: string }): Promise<number>;
  /**
   * Ask `authorize` again for every live subscription (in every process with a shared
   * store) and end the refused ones, each socket told with a server `UNS` (code
   * `forbidden`). Call it after permissions changed. Resolves with how many this process
   * ended.
   */
  recheck(): Promise<number>;
  /**
   * Close the sockets of a `clientId` and/or a `principal` (close code
   * `CloseCodes.disconnected`, 4001), in every process with a shared store. The client
   * redials as after any close; to keep it out, make `authenticate` refuse. Resolves with how
   * many sockets this process closed.
   */
  disconnect<Q = unknown>(target: { clientId?: string; principal?: Q }): Promise<number>;
  /**
   * Run housekeeping now (it also runs every minute): drop expired dedupe entries, trim the
   * store, and free channels with no message left and no live subscriber in this process.
   */
  housekeeping(): Promise<void>;
  /** Close sockets (1001), the http server if this server made it, the store and timers. */
  close(): Promise<void>;
  /** The http server in use, created or given. */
  readonly httpServer: Server;
  /**
   * The HTTP transport as a plain handler: answers a request for `path` and returns `true`, or
   * returns `false` without touching `req`/`res` (route it elsewhere). Give it the raw node
   * objects, before any body parser read the body (Fastify: `req.raw`, `reply.raw`).
   */
  handleRequest(req: IncomingMessage, res: ServerResponse): boolean;
  /**
   * The HTTP transport as connect/Express middleware: answers `path`, else calls `next()`.
   * Mount it before any body parser: `app.use(server.middleware)`.
   */
  middleware(req: IncomingMessage, res: ServerResponse, next: (err?: unknown) => void): void;
  /**
   * The WebSocket side as an `upgrade` handler: takes a request for `path` and returns `true`,
   * or returns `false` untouched. Attached to the http server already; exposed for servers that
   * route upgrades themselves.
   */
  handleUpgrade(req: IncomingMessage, socket: Duplex, head: Buffer): boolean;
}

const DEFAULTS = {
  port: 0,
  host: '127.0.0.1',
  path: '/sync',
  dedupeWindowMs: 600_000,
  dedupeMaxEntries: 100_000,
  dedupeMaxBytes: 64 * 1024 * 1024,
  dedupeMaxResponseBytes: 64 * 1024,
  maxClientIds: 100_000,
  maxClientIdsPerPrincipal: 1000,
  maxPayloadBytes: DEFAULT_MAX_PAYLOAD_BYTES,
  replayLimit: 1000,
  maxBufferedBytes: 8 * 1024 * 1024,
  replayHighWaterBytes: 256 * 1024,
  maxReplayBufferedBytes: 64 * 1024 * 1024,
  replayDrainTimeoutMs: 30_000,
  replayPageBytes: 1024 * 1024,
  maxResponseBufferedBytes: 32 * 1024 * 1024,
  maxResponseBufferedBytesPerPrincipal: 4 * 1024 * 1024,
  maxHttpRequestsPerSecondPerPrincipal: 200,
  responseDrainTimeoutMs: 30_000,
  maxBadFrames: 100,
  maxQueuedPerClient: 100,
  maxChannelsPerPrincipal: 1000,
  maxChannels: 100_000,
  maxChannelLookupsPerSecondPerPrincipal: 2000,
  maxChannelLookupsPerSecond: 10_000,
  allowedOrigins: 'same-host',
  cors: {},
  maxBatch: 1000,
  maxQueuedBytes: 16 * 1024 * 1024,
  maxSocketsPerClient: 4,
  maxSocketsPerPrincipal: 64,
  anonymousKey: 'address' as 'address' | 'clientId',
  pingIntervalMs: 25_000,
  headersTimeoutMs: 10_000,
  handshakeTimeoutMs: 10_000,
  maxPendingConnectionsPerAddress: 128,
  firstFrameTimeoutMs: 60_000,
  maxFramesPerSecond: 10_000,
  maxFramesPerSecondPerPrincipal: 20_000,
  allowedHosts: 'auto',
  requestTimeoutMs: 30_000,
  closeTimeoutMs: 10_000,
} as const;

const POSITIVE_OPTIONS = [
  'dedupeWindowMs',
  'dedupeMaxEntries',
  'dedupeMaxBytes',
  'dedupeMaxResponseBytes',
  'maxClientIds',
  'maxClientIdsPerPrincipal',
  'maxPayloadBytes',
  'replayLimit',
  'maxBufferedBytes',
  'replayHighWaterBytes',
  'maxReplayBufferedBytes',
  'replayDrainTimeoutMs',
  'replayPageBytes',
  'maxResponseBufferedBytes',
  'maxResponseBufferedBytesPerPrincipal',
  'maxHttpRequestsPerSecondPerPrincipal',
  'responseDrainTimeoutMs',
  'maxBadFrames',
  'maxQueuedPerClient',
  'maxChannelsPerPrincipal',
  'maxChannels',
  'maxChannelLookupsPerSecondPerPrincipal',
  'maxChannelLookupsPerSecond',
  'maxBatch',
  'maxQueuedBytes',
  'maxSocketsPerClient',
  'maxSocketsPerPrincipal',
  'pingIntervalMs',
  'headersTimeoutMs',
  'requestTimeoutMs',
  'handshakeTimeoutMs',
  'maxPendingConnectionsPerAddress',
  'firstFrameTimeoutMs',
  'maxFramesPerSecond',
  'maxFramesPerSecondPerPrincipal',
] as const;

/** Channel look-ups granted per event-loop turn, all principals together (lookups.ts). */
const LOOKUP_SLICE = 32;
/**
 * `maxChannels / this` records are kept for principals that follow at most
 * `maxChannelsPerPrincipal / this` channels (README "Limits", `maxChannels`).
 */
const CHANNEL_RESERVE_DIVISOR = 10;

/**
 * Milliseconds after which a connection that has not sent a request head counts as silent
 * (`maxPendingConnectionsPerAddress`): an honest client sends its head one round trip after
 * connecting.
 */
const STALE_PENDING_MS = 1000;

/** What Node's TCP socket keeps of its peer (`net.Socket` internals, Node 18–24). */
interface PeerHandle {
  _peername?: unknown;
  _handle?: { getpeername?(out: { address?: string }): number } | null;
}

/**
 * The peer address of an accepted TCP socket, read without `remoteAddress`'s cache: that
 * getter adds a `_peername` object (and its address string) to the socket for its whole life,
 * ~180 B of every idle connection (a heap snapshot: the object, the string, and the socket's
 * out-of-object property store). Falls back to `remoteAddress` when the handle is not there.
 */
export function peerAddress(socket: Duplex): string | undefined {
  const s = socket as unknown as PeerHandle;
  const handle = s._handle;
  if (s._peername === undefined && handle && typeof handle.getpeername === 'function') {
    const out: { address?: string } = {};
    if (handle.getpeername(out) === 0 && typeof out.address === 'string') return out.address;
  }
  return (socket as Socket).remoteAddress;
}

/** How often expired dedupe entries are dropped and the store trimmed, at most. */
const HOUSEKEEPING_MS = 60_000;

/** What processes sharing a store tell each other (`store.broadcast`). */
type ControlMessage =
  | { from: string; kind: 'unsubscribe'; match: RevokeMatch }
  | { from: string; kind: 'recheck' }
  | { from: string; kind: 'disconnect'; match: RevokeMatch };

/**
 * The soft open-files limit (Linux `/proc/self/limits`, "Max open files"); `undefined` where
 * that file cannot be read or says `unlimited`.
 */
function softOpenFiles(limits: string): number | undefined {
  try {
    const m = /^Max open files\s+(\d+|unlimited)/m.exec(readFileSync(limits, 'utf8'));
    if (!m?.[1] || m[1] === 'unlimited') return undefined;
    return Number(m[1]);
  } catch {
    return undefined;
  }
}

/**
 * The default `maxSockets`: half the soft open-files limit (Linux `/proc/self/limits`), at
 * most 10 000; 10 000 where that file cannot be read or says `unlimited`.
 */
export function defaultMaxSockets(limits = '/proc/self/limits'): number {
  const n = softOpenFiles(limits);
  return n === undefined ? 10_000 : Math.max(1, Math.min(10_000, Math.floor(n / 2)));
}

/**
 * The default `maxConnections`: the soft open-files limit (Linux `/proc/self/limits`) less a
 * reserve of max(32, an eighth of it) for the store, log files and the application (2048 →
 * 1792), at least 1; `undefined` (no cap) where that file cannot be read or says `unlimited`.
 */
export function defaultMaxConnections(limits = '/proc/self/limits'): number | undefined {
  const n = softOpenFiles(limits);
  return n === undefined ? undefined : Math.max(1, n - Math.max(32, Math.floor(n / 8)));
}

const defaultOnError = (error: unknown, where: string) => {
  console.error(`[syncwire] ${where}:`, error);
};

/** Start a server; resolves once it listens (or at once, attached to a given `server`). */
export async function createSyncServer<
  Op = unknown,
  Result = unknown,
  P = unknown,
  Channels extends ChannelMap = ChannelMap,
>(options: SyncServerOptions<Op, Result, P, Channels>): Promise<SyncServer<Channels>> {
  const o = {
    ...DEFAULTS,
    ...Object.fromEntries(Object.entries(options).filter(([, v]) => v !== undefined)),
  } as typeof DEFAULTS & SyncServerOptions<unknown, unknown, P>;
  if (typeof o.onSync !== 'function') throw new TypeError('createSyncServer: onSync is required');
  for (const key of POSITIVE_OPTIONS) {
    if (!(Number.isFinite(o[key]) && o[key] > 0))
      throw new RangeError(`createSyncServer: ${key} must be a finite number > 0`);
  }
  const maxQueuedBytesPerClient = o.maxQueuedBytesPerClient ?? 2 * o.maxPayloadBytes;
  if (!(Number.isFinite(maxQueuedBytesPerClient) && maxQueuedBytesPerClient >= o.maxPayloadBytes))
    throw new RangeError('createSyncServer: maxQueuedBytesPerClient must be ≥ maxPayloadBytes');
  if (!(Number.isFinite(o.closeTimeoutMs) && o.closeTimeoutMs >= 0))
    throw new RangeError('createSyncServer: closeTimeoutMs must be ≥ 0');
  if (o.replayHighWaterBytes < 65_536)
    throw new RangeError('createSyncServer: replayHighWaterBytes must be ≥ 65536');
  const hosts: unknown = o.allowedHosts;
  if (
    !(
      hosts === 'auto' ||
      hosts === 'all' ||
      hosts === true ||
      (Array.isArray(hosts) && hosts.every((h: unknown) => typeof h === 'string' && h.length > 0))
    )
  )
    throw new TypeError("createSyncServer: allowedHosts must be 'auto', 'all', true or a list of host names");
  if (o.anonymousKey !== 'address' && o.anonymousKey !== 'clientId')
    throw new TypeError("createSyncServer: anonymousKey must be 'address' or 'clientId'");
  const trust = compileTrust(o.trustProxy);
  const maxSockets = o.maxSockets ?? defaultMaxSockets();
  if (!(Number.isInteger(maxSockets) && maxSockets >= 1))
    throw new RangeError('createSyncServer: maxSockets must be an integer ≥ 1');
  const maxConnections = o.maxConnections ?? (o.server ? undefined : defaultMaxConnections());
  if (maxConnections !== undefined && !(Number.isInteger(maxConnections) && maxConnections > 0))
    throw new RangeError('createSyncServer: maxConnections must be an integer > 0');
  const maxFrameBurst = o.maxFrameBurst ?? o.maxFramesPerSecond;
  if (!(Number.isFinite(maxFrameBurst) && maxFrameBurst >= 1))
    throw new RangeError('createSyncServer: maxFrameBurst must be ≥ 1');
  if (o.requestTimeoutMs < o.headersTimeoutMs)
    throw new RangeError('createSyncServer: requestTimeoutMs must be ≥ headersTimeoutMs');
  const maxQueuedBytesPerPrincipal = o.maxQueuedBytesPerPrincipal ?? 4 * o.maxPayloadBytes;
  if (!(Number.isFinite(maxQueuedBytesPerPrincipal) && maxQueuedBytesPerPrincipal >= o.maxPayloadBytes))
    throw new RangeError('createSyncServer: maxQueuedBytesPerPrincipal must be ≥ maxPayloadBytes');
  const budget = new Budget({
    perClient: maxQueuedBytesPerClient,
    perPrincipal: maxQueuedBytesPerPrincipal,
    total: o.maxQueuedBytes,
  });
  const store = o.store ?? memoryStore();
  const onError = (err: unknown, where: string) => {
    try {
      (o.onError ?? defaultOnError)(err, where);
    } catch {
      // A failing logger must not become the next failure.
    }
  };
  const ownServer = !o.server;
  // Node checks these deadlines on a timer (30 s by default), so it runs often enough for
  // the bounds to hold within about a quarter of the shorter one.
  const httpServer =
    o.server ??
    createServer({
      headersTimeout: o.headersTimeoutMs,
      requestTimeout: o.requestTimeoutMs,
      connectionsCheckingInterval: Math.max(50, Math.min(1000, Math.floor(o.headersTimeoutMs / 4))),
    });
  const dedupeStore = o.dedupeStore ?? (isDedupeStore(store) ? store : undefined);
  const dedupe = new Dedupe({
    windowMs: o.dedupeWindowMs,
    maxEntries: o.dedupeMaxEntries,
    maxBytes: o.dedupeMaxBytes,
    maxResponseBytes: o.dedupeMaxResponseBytes,
    maxQueuedPerClient: o.maxQueuedPerClient,
    store: dedupeStore,
    onError,
  });
  const bindings = new Bindings({
    ttlMs: o.dedupeWindowMs,
    maxEntries: o.maxClientIds,
    maxPerOwner: o.maxClientIdsPerPrincipal,
    store: dedupeStore,
  });
  /** Every SUB's and poll's channel look-ups, server-wide (lookups.ts). */
  // Backlog: one second of look-ups (at least one full SUB); twice that refuses everybody;
  // below it, a SUB of at most the reserve's share from a key with nothing waiting is admitted
  // (README "Limits", maxChannelLookupsPerSecond).
  const lookupBacklog = Math.max(o.maxChannelLookupsPerSecond, o.maxChannelsPerPrincipal);
  const lookups = new LookupScheduler({
    slice: LOOKUP_SLICE,
    rate: o.maxChannelLookupsPerSecond,
    maxBacklog: lookupBacklog,
    hardBacklog: 2 * lookupBacklog,
    smallJob: Math.max(1, Math.floor(o.maxChannelsPerPrincipal / CHANNEL_RESERVE_DIVISOR)),
  });
  const channels = new Channels({
    store,
    replayLimit: o.replayLimit,
    replayPageBytes: o.replayPageBytes,
    onError,
    lookups,
  });

  let closing: Promise<void> | undefined;
  const isClosing = () => closing !== undefined;
  /** Set once running batches drained (or `closeTimeoutMs` passed): publishes are refused. */
  let storeClosing = false;

  /** The store's `channelCount` as last read (`stats().channelRecords`). */
  let channelRecords = 0;
  const dispatcher = makeDispatcher<P>({
    hooks: o,
    store,
    dedupe,
    bindings,
    principalKey: o.principalKey ?? defaultPrincipalKey,
    channels,
    closing: isClosing,
    publishClosed: () => storeClosing,
    onError,
    maxChannelsPerPrincipal: o.maxChannelsPerPrincipal,
    maxQueuedPerSocket: o.maxQueuedPerClient,
    maxChannels: o.maxChannels,
    maxChannelLookupsPerSecondPerPrincipal: o.maxChannelLookupsPerSecondPerPrincipal,
    lookupKey: (principal, clientId) => subscriberKey(principal, clientId),
    lookups,
    channelReserve: Math.floor(o.maxChannels / CHANNEL_RESERVE_DIVISOR),
    reserveShare: Math.max(1, Math.floor(o.maxChannelsPerPrincipal / CHANNEL_RESERVE_DIVISOR)),
    onChannelCount: (n) => {
      channelRecords = n;
    },
  });
  /** Whether a forwarded request was reported (once per server) while `trustProxy` is unset. */
  let forwardedReported = false;
  /** `a:<address>` of an anonymous request (`anonymousKey: 'address'`). */
  const anonymousAddressKey = (req: IncomingMessage): string => {
    if (
      o.trustProxy === undefined &&
      !forwardedReported &&
      (req.headers['x-forwarded-for'] !== undefined || req.headers.forwarded !== undefined)
    ) {
      forwardedReported = true;
      onError(
        Object.assign(
          new Error(
            'a request carries X-Forwarded-For or Forwarded but trustProxy is unset: behind a proxy every ' +
              "anonymous client shares the proxy's address and its limits; set trustProxy (reported once)",
          ),
          { code: 'ERR_SYNCWIRE_UNEXPECTED_X_FORWARDED_FOR' },
        ),
        'trustProxy',
      );
    }
    try {
      return addressKey(clientAddress(req, trust));
    } catch (err) {
      // A `trustProxy` function that throws: the socket's peer is the client.
      onError(err, 'trustProxy');
      return addressKey(req.socket?.remoteAddress);
    }
  };
  /**
   * The key every per-principal limit of a request or socket counts under, and live
   * subscriptions are matched by (`unsubscribe`/`disconnect` by principal): `p:<principalKey>`
   * for a principal; for the anonymous one `a:<address>` (`anonymousKey: 'address'`) or
   * `c:<clientId>`. The prefixes keep a principal's key from ever equalling an anonymous one.
   */
  const limitKey = (principal: P, clientId: string, req: IncomingMessage | undefined): string => {
    if (principal !== null && principal !== undefined) {
      try {
        return `p:${(o.principalKey ?? defaultPrincipalKey)(principal)}`;
      } catch (err) {
        onError(err, 'principalKey');
      }
    }
    return o.anonymousKey === 'clientId' || req === undefined ? `c:${clientId}` : anonymousAddressKey(req);
  };
  const subscriberKey = (principal: P, clientId: string): string => limitKey(principal, clientId, undefined);
  const ws = createWsTransport<P>({
    limitKey,
    maxSockets,
    path: o.path,
    maxPayloadBytes: o.maxPayloadBytes,
    maxBufferedBytes: o.maxBufferedBytes,
    replayHighWaterBytes: o.replayHighWaterBytes,
    maxReplayBufferedBytes: o.maxReplayBufferedBytes,
    replayDrainTimeoutMs: o.replayDrainTimeoutMs,
    maxBadFrames: o.maxBadFrames,
    maxBatch: o.maxBatch,
    allowedOrigins: o.allowedOrigins,
    allowedHosts: o.allowedHosts,
    ownHost: ownServer ? o.host : undefined,
    maxFramesPerSecond: o.maxFramesPerSecond,
    maxFrameBurst,
    maxFramesPerSecondPerPrincipal: o.maxFramesPerSecondPerPrincipal,
    firstFrameTimeoutMs: o.firstFrameTimeoutMs,
    budget,
    pingIntervalMs: o.pingIntervalMs,
    maxSocketsPerClient: o.maxSocketsPerClient,
    maxSocketsPerPrincipal: o.maxSocketsPerPrincipal,
    dispatcher,
    channels,
    closing: isClosing,
    onError,
  });
  const handleHttp = createHttpHandler<P>({
    path: o.path,
    maxPayloadBytes: o.maxPayloadBytes,
    maxBatch: o.maxBatch,
    allowedOrigins: o.allowedOrigins,
    allowedHosts: o.allowedHosts,
    ownHost: ownServer ? o.host : undefined,
    cors: o.cors,
    budget,
    limitKey,
    bodyTimeoutMs: o.requestTimeoutMs,
    maxResponseBufferedBytes: o.maxResponseBufferedBytes,
    maxResponseBufferedBytesPerPrincipal: o.maxResponseBufferedBytesPerPrincipal,
    maxHttpRequestsPerSecondPerPrincipal: o.maxHttpRequestsPerSecondPerPrincipal,
    maxChannelLookupsPerSecondPerPrincipal: o.maxChannelLookupsPerSecondPerPrincipal,
    responseDrainTimeoutMs: o.responseDrainTimeoutMs,
    dispatcher,
    closing: isClosing,
    onError,
  });

  const housekeep = async (): Promise<void> => {
    dedupe.sweep();
    bindings.expire();
    await store.trim({ free: (name) => !channels.isLive(name) });
    if (store.channelCount) channelRecords = await store.channelCount();
  };
  const housekeeping = setInterval(
    () => {
      housekeep().catch((err: unknown) => onError(err, 'store.trim'));
    },
    Math.min(HOUSEKEEPING_MS, o.dedupeWindowMs),
  );
  housekeeping.unref();

  // ---- revocation, in this process and (with a shared store) in every other ----------

  const serverId = randomId('s');
  const apply = (m: ControlMessage): Promise<number> => {
    switch (m.kind) {
      case 'unsubscribe':
        return dispatcher.revoke(m.match, {
          code: 'unsubscribed',
          message: 'the server ended this subscription',
        });
      case 'recheck':
        return dispatcher.recheck();
      case 'disconnect':
        return Promise.resolve(ws.disconnect(m.match));
    }
  };
  let stopControl: (() => void) | undefined;
  if (store.broadcast && store.onBroadcast) {
    stopControl = await store.onBroadcast((raw) => {
      const m = raw as ControlMessage | null;
      if (!m || typeof m !== 'object' || m.from === serverId || isClosing()) return;
      apply(m).catch((err: unknown) => onError(err, `broadcast ${m.kind}`));
    });
  }
  /** Apply here, and tell the other processes; resolves with this process's count. */
  const control = async (m: ControlMessage): Promise<number> => {
    const here = apply(m);
    if (store.broadcast) await store.broadcast(m).catch((err: unknown) => onError(err, 'broadcast'));
    return here;
  };
  const keyOf = (principal: unknown): string | undefined =>
    principal === undefined ? undefined : subscriberKey(principal as P, '');

  // ---- lifecycle ---------------------------------------------------------------------

  // Requests and upgrades for other paths are answered 404 on a server of our own, and left
  // to the owner of a given one.
  const onRequest = (req: IncomingMessage, res: ServerResponse) => {
    if (!handleHttp(req, res) && ownServer) reply(res, 404);
  };
  const onUpgrade = (req: IncomingMessage, socket: Duplex, head: Buffer) => {
    if (!ws.handleUpgrade(req, socket, head) && ownServer) rejectUpgrade(socket, 404);
  };
  const attachHttp = o.handleHttp !== false;
  if (attachHttp) httpServer.on('request', onRequest);
  httpServer.on('upgrade', onUpgrade);
  // A TCP connection that never sends a request head is destroyed after handshakeTimeoutMs:
  // Node's headersTimeout starts at the first byte, so a silent one was held forever. Its
  // first request or upgrade (any path) clears the deadline; after that Node's own timeouts
  // (headers, request, keep-alive) apply. Only on a server of our own (a TLS server's
  // `connection` sockets are not its requests' sockets).
  // One timer for all connections' deadlines, a shared `close` listener, nothing per socket
  // left once it is identified (a Timeout, a closure and a `once` wrapper per connection
  // were ~400 B of every idle connection's memory).
  const handshakes = new Deadlines<Duplex>(o.handshakeTimeoutMs, (socket) => {
    socket.off('close', onEarlyClose);
    unpend(socket);
    socket.destroy();
  });
  // Connections not yet identified, per peer address key (maxPendingConnectionsPerAddress),
  // oldest first (Set order is accept order), and each such socket's key and accept time (its
  // remoteAddress may be gone once it is destroyed). Both hold only connections in
  // `handshakes`, so they are bounded by the caps themselves.
  const pendingBy = new Map<string, Set<Duplex>>();
  const pendingOf = new Map<Duplex, { key: string; at: number }>();
  let connectionsRefused = 0;
  /** Keep-alive connections pending again after an answer (counted in `pendingConnections`). */
  const idleKeepAlive = new Set<Duplex>();
  const unpend = (socket: Duplex) => {
    idleKeepAlive.delete(socket);
    const p = pendingOf.get(socket);
    if (p === undefined) return;
    pendingOf.delete(socket);
    const set = pendingBy.get(p.key);
    set?.delete(socket);
    if (set?.size === 0) pendingBy.delete(p.key);
  };
  /** A trusted proxy's address (`trustProxy`, asked as hop 0): never capped per address. */
  const trustedPeer = (address: string): boolean => {
    if (o.trustProxy === undefined || o.trustProxy === false) return false;
    try {
      return trust(address, 0);
    } catch (err) {
      onError(err, 'trustProxy');
      return false;
    }
  };
  function onEarlyClose(this: Duplex): void {
    handshakes.delete(this);
    unpend(this);
  }
  /**
   * Count `socket` as pending for its peer address (`maxPendingConnectionsPerAddress`); `false`
   * when it was destroyed for it. Past the cap, the address's stalest pending connection goes
   * if it has been silent for `STALE_PENDING_MS`, else this one.
   */
  const pend = (socket: Duplex): boolean => {
    const peer = peerAddress(socket);
    if (peer === undefined || trustedPeer(peer)) return true;
    const key = addressKey(peer);
    const now = performance.now();
    const mine = pendingBy.get(key);
    if (mine && mine.size >= o.maxPendingConnectionsPerAddress) {
      connectionsRefused++;
      const oldest = mine.values().next().value as Duplex;
      const since = pendingOf.get(oldest)?.at ?? now;
      if (now - since < STALE_PENDING_MS) {
        // A burst of fresh connections: the new one goes.
        socket.destroy();
        return false;
      }
      // The address holds connections silent for a while: the stalest goes, the new one
      // comes in (a silent hoarder sharing an address with honest clients cannot lock
      // them out).
      oldest.off('close', onEarlyClose);
      handshakes.delete(oldest);
      unpend(oldest);
      oldest.destroy();
    }
    const set = pendingBy.get(key) ?? new Set<Duplex>();
    if (set.size === 0) pendingBy.set(key, set);
    set.add(socket);
    pendingOf.set(socket, { key, at: now });
    return true;
  };
  /**
   * A keep-alive connection whose answer went out is pending again until its next request
   * head (issue 12: one address held 1 791 connections that each sent an `OPTIONS`, then half
   * of a second head, each held for `headersTimeoutMs`). Node's `keepAliveTimeout` and
   * `headersTimeout` still bound how long; this bounds how many per address.
   */
  const onAnswered = (socket: Duplex) => {
    if (socket.destroyed || pendingOf.has(socket)) return;
    // A trusted proxy's connection is not counted (and gets no listener per request).
    if (pend(socket) && pendingOf.has(socket)) {
      idleKeepAlive.add(socket);
      socket.on('close', onEarlyClose);
    }
  };
  const identified = (req: IncomingMessage, res?: unknown) => {
    const socket = req.socket;
    if (handshakes.has(socket)) handshakes.delete(socket);
    if (pendingOf.has(socket)) {
      socket.off('close', onEarlyClose);
      unpend(socket);
    }
    // A request (an upgrade's second argument is its socket). The response is detached from
    // its socket before `finish` listeners run, so the socket is kept here.
    if (res !== socket && res instanceof ServerResponse) res.once('finish', () => onAnswered(socket));
  };
  const onConnection = (socket: Duplex) => {
    if (!pend(socket)) return;
    handshakes.add(socket);
    socket.on('close', onEarlyClose);
  };
  const onDrop = () => {
    connectionsRefused++;
  };
  if (ownServer) {
    if (maxConnections !== undefined) httpServer.maxConnections = maxConnections;
    httpServer.on('drop', onDrop);
    httpServer.on('connection', onConnection);
    httpServer.prependListener('request', identified);
    httpServer.prependListener('upgrade', identified);
  }

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
      lookups.close();
      await store.close().catch(() => undefined);
      throw err;
    });
  }

  async function shutdown(): Promise<void> {
    clearInterval(housekeeping);
    stopControl?.();
    httpServer.off('request', onRequest);
    httpServer.off('upgrade', onUpgrade);
    httpServer.off('connection', onConnection);
    httpServer.off('drop', onDrop);
    httpServer.off('request', identified);
    httpServer.off('upgrade', identified);
    // No new batch starts; queued ones are left for their clients to resend (their answers
    // go nowhere: the sockets and connections close below).
    dedupe.stop();
    await ws.close();
    let done: Promise<void> | undefined;
    if (ownServer) {
      done = new Promise<void>((resolve) => httpServer.close(() => resolve()));
      httpServer.closeAllConnections();
    }
    // Batches already in onSync finish (they may still publish) and their responses reach
    // the dedupe store before it closes, so a retry elsewhere is answered, not re-applied.
    const running = dedupe.runningCount;
    if (!(await dedupe.drain(o.closeTimeoutMs))) {
      onError(
        new Error(`${running} batch(es) still running after closeTimeoutMs (${o.closeTimeoutMs} ms)`),
        'close',
      );
    }
    storeClosing = true;
    channels.close();
    lookups.close();
    dedupe.close();
    await done;
    await store.close().catch((err: unknown) => onError(err, 'store.close'));
  }

  return {
    httpServer,
    handleRequest: (req, res) => handleHttp(req, res),
    middleware(req, res, next) {
      if (!handleHttp(req, res)) next();
    },
    handleUpgrade: (req, socket, head) => ws.handleUpgrade(req, socket, head),
    address() {
      const info = httpServer.address() as AddressInfo | string | null;
      if (!info || typeof info === 'string')
        throw new Error('the http server is not listening on a TCP port');
      return { host: info.address, port: info.port };
    },
    publish: (channel, payload, opts) => dispatcher.publish(channel, payload, opts),
    stats() {
      // Refreshed for the next call: `stats()` is synchronous and `channelCount` is not.
      store
        .channelCount?.()
        .then((n) => {
          channelRecords = n;
        })
        .catch(() => {});
      const clients = new Set(dedupe.activeClientIds());
      for (const id of ws.clientIds()) clients.add(id);
      return {
        sockets: ws.size,
        socketsRefused: ws.refused,
        connectionsRefused,
        pendingConnections: handshakes.size + idleKeepAlive.size,
        clients: clients.size,
        dedupeEntries: dedupeStore?.dedupeStats?.().entries ?? dedupe.size,
        dedupeBytes: dedupeStore?.dedupeStats?.().bytes ?? dedupe.sizeBytes,
        channels: channels.size,
        channelRecords,
        bindings: bindings.size,
        queuedBytes: budget.total,
        replayBufferedBytes: ws.replayBufferedBytes,
        responseBufferedBytes: handleHttp.responseBufferedBytes(),
        lookupBacklog: lookups.backlog,
        lookupFreeing: lookups.freeing,
      };
    },
    subscriptionsOf: (clientId) => ws.subscriptionsOf(clientId),
    unsubscribe(target) {
      return control({
        from: serverId,
        kind: 'unsubscribe',
        match: { channel: target.channel, clientId: target.clientId, principalKey: keyOf(target.principal) },
      });
    },
    recheck() {
      return control({ from: serverId, kind: 'recheck' });
    },
    disconnect(target) {
      return control({
        from: serverId,
        kind: 'disconnect',
        match: { clientId: target.clientId, principalKey: keyOf(target.principal) },
      });
    },
    housekeeping: housekeep,
    close() {
      closing ??= shutdown();
      return closing;
    },
  };
}
