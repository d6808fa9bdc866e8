/**
 * `createSyncClient`: the RxJS facade over the connection statechart. Application code
 * touches this file's API only: `send`, `send$`, the result streams, `subscribe`, `close`.
 * It keeps the outbox's promises, the channel cursors and the storage; the machine
 * (machines/connection.ts) decides everything about timing and transports.
 */
import { BehaviorSubject, distinctUntilChanged, Observable, Subject } from 'rxjs';
import { createActor, type InspectionEvent, type Observer } from 'xstate';

/** XState's clock interface: what the statechart's delays are scheduled on. */
export interface Clock {
  setTimeout(fn: (...args: any[]) => void, timeout: number): any;
  clearTimeout(id: any): void;
}

import {
  type ConnectionActor,
  type ConnectionEmitted,
  type ConnectionState,
  connectionMachine,
  type FailureKind,
  flatState,
  frameFor,
  type QueueItem,
  randomInstance,
} from '../../machines/connection.js';
import {
  createSubscriptionActor,
  type SubscriptionActor,
  type SubscriptionState,
  subscriptionStateOf,
} from '../../machines/subscription.js';
import {
  type ChannelState,
  channelRecord,
  channelRefusalOf,
  channelStateProblem,
  cursorProblem,
  entryOf,
  isChannelRefusal,
  isValidChannel,
  type MsgEnvelope,
  type NakCode,
  type Publication,
  randomId,
  SyncError,
} from '../protocol/index.js';
import { ChannelCursors, type SnapshotEvent, type SubscribeOptions } from './channels.js';
import { LazyClock } from './clock.js';
import {
  MapOutbox,
  memoryStorage,
  type OutboxEntry,
  type SyncLocks,
  type SyncOutbox,
  type SyncStorage,
} from './storage.js';
import {
  type FaultSwitches,
  httpActor,
  isValidClientId,
  type Resolvable,
  socketActor,
  type TransportIo,
  type WebSocketConstructor,
  type WebSocketLike,
} from './transports.js';
import { validateOptions } from './validate.js';

export type { ConnectionState, FailureKind } from '../../machines/connection.js';
export { connectionMachine, flatState, STATE_NAMES } from '../../machines/connection.js';
export type { SubscriptionState } from '../../machines/subscription.js';
export { SUBSCRIPTION_STATES, subscriptionMachine } from '../../machines/subscription.js';
export type {
  ChannelSnapshot,
  ChannelState,
  NakCode,
  Publication,
  SyncErrorCode,
} from '../protocol/index.js';
export { SyncError } from '../protocol/index.js';
export type { SnapshotEvent, SubscribeOptions } from './channels.js';
export {
  memoryStorage,
  type OutboxBatch,
  type OutboxEntry,
  type OutboxSnapshot,
  type SyncLocks,
  type SyncOutbox,
  type SyncStorage,
  type WebStorageOptions,
  webStorage,
} from './storage.js';
export type {
  FaultSwitches,
  Resolvable,
  ResolveContext,
  WebSocketConstructor,
  WebSocketLike,
} from './transports.js';

/** A network or page signal, as browsers report them (see `SyncClient.network`). */
export type NetworkSignal = 'online' | 'offline' | 'visible';

export interface SyncClientOptions {
  /**
   * WebSocket endpoint, e.g. `wss://example.org/sync`. Several URLs (server processes) are
   * tried in turn on each redial. May be a function (sync or async), called for each dial and
   * each HTTP request with a `ResolveContext` (`{ transport, refresh }`); what it returns is
   * checked like a plain value, and a bad value (not an absolute ws/http URL, or one with a
   * `#fragment`, which WebSocket refuses) fails that dial or request (`failures$`), which is
   * retried with backoff. A plain value that is bad throws a `TypeError` here.
   */
  url: Resolvable<string | string[]>;
  /** HTTP endpoint for the fallback (a value or a function, like `url`). @default `url` with ws→http, wss→https */
  httpUrl?: Resolvable<string | string[]>;
  /** T, in milliseconds: every timeout of the statechart derives from it. @default 15000 */
  timeout?: number;
  /** Operations per SYN. @default 100 */
  maxBatch?: number;
  /**
   * Bytes of operations per SYN, counted as the length of each operation's JSON (UTF-16 code
   * units: a byte each for ASCII, up to 3 bytes each for other text). A batch is cut before the
   * operation that would pass it; an operation alone over it is sent alone (and gets the
   * server's answer: `too_large` over its `maxPayloadBytes`). Integer 1 to 2^31−1.
   * @default 262144 (256 KiB: a batch stays under the reference server's `maxPayloadBytes`,
   * 1 MiB, whatever its text; README "Limits")
   */
  maxBatchBytes?: number;
  /** Operations the outbox holds before `send()` rejects with `queue_full`. @default 10000 */
  maxQueue?: number;
  /** Polling period while degraded to HTTP. @default timeout */
  pollInterval?: number;
  /** Upper bound of the redial and HTTP retry backoff. @default 30000 */
  maxBackoff?: number;
  /**
   * Stable client identity for dedupe. @default the stored one, else a random one (then
   * stored). With a storage that has `locks` (`webStorage()` in a browser) a stored id whose
   * lock another live client holds (a duplicated tab) is replaced by a new random one; an id
   * given here is used as given. 1–128 visible ASCII characters (U+0021–U+007E, the ones the
   * socket URL and the `X-Client-Id` header both carry as they are), PROTOCOL §1: anything else
   * throws a `TypeError`; a stored id that is not is replaced by a new random one. It is always the one on the wire (see `params`, `headers`).
   */
  clientId?: string;
  /** Channels to subscribe to at once, with their cursors. @default {} */
  channels?: Record<string, SubscribeOptions>;
  /**
   * Keeps clientId, cursors and the outbox across reloads: `memoryStorage()` (nothing survives
   * the process), `webStorage()` (per tab, outbox in IndexedDB), `fileStorage(path)` from
   * `syncwire/storage/file` (Node; one live client per file: a second one reports a `storage`
   * failure and works from memory). One live client per clientId on a `memoryStorage()`
   * object too: a second one reports a `storage` failure ("in use") and works from a memory
   * storage of its own under its own clientId; after `close()` resolves, a new client on the
   * object takes the identity and the outbox (one made while `close()` is under way waits for
   * it, then takes them: `SyncLocks.closing`). The outbox keeps the JSON `send()` made of each
   * operation, in every storage. @default a memory storage of the client's own, which nothing
   * else can reach: as `memoryStorage()` for the clientId and cursors; it keeps no outbox (no
   * later client could load it)
   */
  storage?: SyncStorage;
  /** Prefix of the storage keys, for several clients in one storage. @default 'syncwire' */
  storageKey?: string;
  /** WebSocket implementation (Node 20 has none: pass `ws`). @default globalThis.WebSocket */
  WebSocket?: WebSocketConstructor;
  /** fetch implementation. @default globalThis.fetch */
  fetch?: typeof fetch;
  /**
   * Extra query parameters on the socket URL (e.g. a token), or a function returning them
   * (sync or async), called for each dial with `{ transport: 'ws', refresh }`: how an expiring
   * token is refreshed. After a dial refused with 401 it is called again with `refresh: true`
   * (the previous credentials were refused: bypass any token cache, as with centrifuge-js
   * `getToken` / Ably `authCallback`) and the client redials at once; a second 401 in a row
   * stops the client (`failures$` kind `unauthorized`, pending sends reject with
   * `SyncError('unauthorized')`). Browsers do not expose the status of a refused upgrade, so
   * there the HTTP side's 401 is what detects it. A function's result must be a record of
   * strings (`undefined`/`null`: none); anything else fails that dial (`failures$` kind
   * `dial_error`) and is retried with backoff. The client's `clientId` query parameter is set
   * after these: a plain record with a `clientId` key throws a `TypeError`, and a `clientId` in
   * a function's result is overridden (the socket and HTTP must carry one id, PROTOCOL §1).
   * @default {}
   */
  params?: Resolvable<Record<string, string>>;
  /**
   * Extra headers on HTTP requests and on the socket's upgrade, or a function returning
   * them, called for each HTTP request with `{ transport: 'http', refresh }` and for each
   * dial with `{ transport: 'ws', refresh }` (same 401 rule: the one retry after a 401 has
   * `refresh: true`; same result check, a bad result is an `http_error` / `dial_error`).
   * On the upgrade they reach the server only where the WebSocket implementation takes
   * headers: Node's `ws` does (its third constructor argument); browsers' WebSocket cannot
   * set headers at all, and Node's built-in (undici) one ignores them, so there the socket
   * needs `params`. `X-Client-Id` (any case) is the client's own: in a plain record it throws
   * a `TypeError`, in a function's result it is dropped. @default {}
   */
  headers?: Resolvable<Record<string, string>>;
  /**
   * Listen to the browser's `online`/`offline` (window) and `visibilitychange` (document)
   * events and feed them to the chart (`NETWORK_ONLINE`, `NETWORK_OFFLINE`, `VISIBLE`).
   * `false` leaves them alone; feed the same signals with `client.network` or `signals`.
   * @default true where `window` and `document` exist
   */
  browserSignals?: boolean;
  /**
   * Signals from elsewhere (React Native's NetInfo / AppState, Node): any subscribable of
   * `'online' | 'offline' | 'visible'`, e.g. an RxJS Observable. @default none
   */
  signals?: { subscribe(next: (signal: NetworkSignal) => void): { unsubscribe(): void } };
  /**
   * XState inspection observer (see `syncwire/inspect`). With one, every socket frame, `MSG`s
   * included, goes through the chart as a `FRAME` event it can see; without one, `MSG`s skip
   * the chart (they change none of its state). @default none
   */
  inspect?: Observer<InspectionEvent> | ((event: InspectionEvent) => void);
  /** Telemetry hook: called with every `failures$` event (send them to Sentry). @default none */
  onFailure?: (failure: Failure) => void;
  /** Jitter source for backoff. @default Math.random */
  random?: () => number;
  /**
   * The clock every named delay of the statechart runs on (XState's `Clock`). Tests pass
   * XState's `SimulatedClock` or their own. @default a `LazyClock`: every delay on one
   * platform `setTimeout`, re-armed only when a deadline is earlier (src/client/clock.ts)
   */
  clock?: Clock;
}

/** One socket or transport failure, for telemetry. */
export interface Failure {
  kind: FailureKind;
  /** The state$ name when it happened. */
  state: ConnectionState;
  /** Milliseconds since the epoch. */
  at: number;
  /** Close code, or HTTP status. */
  code?: number;
  reason?: string;
}

/**
 * The outcome of an operation restored from the durable outbox (sent by an earlier instance
 * on the same storage, or by a closed tab whose outbox this client adopted): it has no promise
 * any more, so it is delivered here. `id` is the request (SYN) id that carried it; `clientId`
 * is the identity it was sent under (this client's, or the adopted one's).
 */
export type Restored =
  | {
      id: string;
      clientId: string;
      op: unknown;
      result: unknown;
      /** The batch's publications (docs/consistency.md); its `changes` come from the channels. */
      published?: Publication[];
    }
  | { id: string; clientId: string; op: unknown; error: SyncError };

/** One MSG as the app sees it. */
export interface ChannelMessage {
  channel: string;
  seq: number;
  epoch: string;
  payload: unknown;
  replay: boolean;
  /** This client's own publication (docs/consistency.md). */
  echo: boolean;
}

export interface ResetEvent {
  channel: string;
  epoch: string;
}

/**
 * A channel the server refused or ended (PROTOCOL §3 rules 7 and 11). `code`: `forbidden`
 * (`authorize` said no, at subscribe time or by a re-check), `too_many_channels` (the
 * principal's cap), `server_error` (`authorize` failed), `unsubscribed` (the server ended
 * it with `server.unsubscribe()`). The client no longer asks for the channel; the others go on.
 */
export interface RefusedEvent {
  channel: string;
  code: NakCode | 'unsubscribed';
  message: string;
}

const LISTS = ['changes', 'successes', 'allowed', 'disallowed', 'errors'] as const;
type ListName = (typeof LISTS)[number];
/** A batch that published: its changes come from the channels, at their seq. */
const NOT_CHANGES = LISTS.filter((n) => n !== 'changes');

/** `on()`'s event names and the stream each one is (`state` and `subscriptions` apart). */
const EVENT_STREAM = {
  changes: 'changes',
  successes: 'successes',
  allowed: 'allowed',
  disallowed: 'disallowed',
  errors: 'errors',
  message: 'messages',
  failure: 'failures',
  reset: 'resets',
  refused: 'refused',
  snapshot: 'snapshots',
} as const;

type EventMap = {
  changes: unknown[];
  successes: unknown[];
  allowed: unknown[];
  disallowed: unknown[];
  errors: unknown[];
  message: ChannelMessage;
  state: ConnectionState;
  failure: Failure;
  reset: ResetEvent;
  refused: RefusedEvent;
  subscriptions: Record<string, SubscriptionState>;
  snapshot: SnapshotEvent;
};

export interface SyncClient<Op = unknown, Result = unknown> {
  /**
   * Send one operation; resolves with its own result, or rejects with a `SyncError`. An
   * operation `JSON.stringify` cannot turn into JSON (`undefined`, a circular reference, a
   * BigInt, a throwing `toJSON`) is rejected at once with `bad_request` and never queued.
   * The JSON made here is what every (re)send carries, on either transport: changing the
   * object after `send()` changes nothing that is sent.
   */
  send(op: Op): Promise<Result>;
  /** Outgoing operations as a subject; rejections are reported on `rejected$`. */
  readonly send$: Subject<Op>;
  readonly changes$: Observable<unknown[]>;
  readonly successes$: Observable<unknown[]>;
  readonly allowed$: Observable<unknown[]>;
  readonly disallowed$: Observable<unknown[]>;
  readonly errors$: Observable<unknown[]>;
  readonly messages$: Observable<ChannelMessage>;
  readonly state$: Observable<ConnectionState>;
  readonly failures$: Observable<Failure>;
  /** A channel whose history could not be recovered: refetch it. */
  readonly resets$: Observable<ResetEvent>;
  /** A channel the server refused or ended; only that channel is affected. */
  readonly refused$: Observable<RefusedEvent>;
  /**
   * Every channel's subscription state (machines/subscription.ts): `subscribing`,
   * `subscribed`, `resetting`, `refused`; channels unsubscribed by the app leave the map.
   * Emits the current map at once, then on every change.
   */
  readonly subscriptions$: Observable<Record<string, SubscriptionState>>;
  /** One channel's subscription state now (`unsubscribed` for a channel never subscribed). */
  subscriptionState(channel: string): SubscriptionState;
  /**
   * Snapshots of channels subscribed with `snapshot: true`, each before any change after it
   * (docs/consistency.md): replace the channel's view with it.
   */
  readonly snapshots$: Observable<SnapshotEvent>;
  /** Operations from `send$` that were rejected. */
  readonly rejected$: Observable<{ op: Op; error: SyncError }>;
  /**
   * Results (or `SyncError`s) of operations restored from the durable outbox, which have no
   * promise: `{ id, clientId, op, result } | { id, clientId, op, error }`. Their results also
   * feed `changes$` and the other list streams, like any result. Completes on `close()`.
   */
  readonly restored$: Observable<Restored>;
  /**
   * Operations accepted (by `send()`, `send$` or restored from storage) and not yet settled,
   * as a count; emits the current value on subscription (BehaviorSubject), then every change.
   * Completes on `close()`.
   */
  readonly pending$: Observable<number>;
  /**
   * Resolves, with the number of operations restored, once the client knows its identity and
   * has loaded its stored outbox (at once for memory storage; for `fileStorage` once its file
   * lock is taken, up to `stale` + 1 s after a crashed holder or when another live client holds
   * it; after IndexedDB and Web Locks answer in a browser). Operations sent before are queued
   * after the restored ones.
   */
  readonly loaded: Promise<number>;
  on<K extends keyof EventMap>(event: K, handler: (value: EventMap[K]) => void): () => void;
  /**
   * Follow a channel. Resolves with its state once the replay was delivered; rejects with a
   * `SyncError` whose code is the refusal's (`forbidden`, `too_many_channels`, …) or `closed`
   * (the client was closed, or the channel was unsubscribed — by `unsubscribe()` or the
   * server — before its SUB was answered). A refusal that arrived while this SUB waited in the
   * outbox settles it without sending it.
   */
  subscribe(channel: string, opts?: SubscribeOptions): Promise<ChannelState>;
  /** Stop following a channel. Always settles: at once when closed or not subscribed. */
  unsubscribe(channel: string): Promise<void>;
  /** Current cursors, per channel. */
  cursors(): Record<string, { epoch?: string; seq?: number }>;
  /**
   * The identity the server dedupes on. With `webStorage()` it may change once, before the
   * first connection (before `loaded` resolves), if another live tab holds the stored one.
   */
  readonly clientId: string;
  /** Current flat state. */
  readonly state: ConnectionState;
  /**
   * Operations not yet settled (the current value of `pending$`): in the outbox, in flight,
   * or applied and waiting for their publications to reach this client (docs/consistency.md).
   */
  readonly pending: number;
  /**
   * Stop for good: pending promises reject with `closed`, their operations stay in the durable
   * outbox for the next client on the same storage (written now if `send()` accepted them this
   * tick). Called before `loaded` resolves, it waits for the storage (`fileStorage`: its lock,
   * at most `stale` + 1 s), writes them, then releases it (README "When an operation is on disk").
   */
  close(): Promise<void>;
  readonly actor: ConnectionActor;
  /** Fault switches and a socket killer, for the playground and chaos testing. */
  readonly debug: { faults: FaultSwitches; killSocket(): boolean };
  /**
   * Feed the platform's signals by hand (React Native, Node, tests): `online()` redials at
   * once, skipping the backoff; `offline()` stops dialling until `online()`; `visible()` checks
   * the socket at once with a `PNG`.
   */
  readonly network: { online(): void; offline(): void; visible(): void };
}

interface Waiter {
  resolve(value: unknown): void;
  reject(err: SyncError): void;
  /** For SUB: the channels it named. */
  channels?: string[];
  /** For UNS: the channels it named (kept apart: a failed UNS fails no subscription). */
  unsubscribed?: string[];
  /** A SUB that only polls while on HTTP (its failure waits for the next poll). */
  poll?: boolean;
  /** For SUB: each channel's cursor as it last went on the wire (what its answer is judged against). */
  sent?: Map<string, { epoch?: string; seq?: number }>;
  kind: QueueItem['kind'];
}

/**
 * `op` as JSON (what its SYN carries, made once here and written as it is), or why it cannot
 * travel: `JSON.stringify` throws (a circular reference, a BigInt, a `toJSON` that throws) or
 * yields nothing (`undefined`, a function, a symbol).
 */
function toJson(op: unknown): string | { problem: string } {
  try {
    const json = JSON.stringify(op);
    if (json === undefined) return { problem: `an operation must be JSON; got ${typeof op}` };
    // The text itself, no wrapper object: once per operation (issue 14).
    return json;
  } catch (err) {
    return { problem: `an operation must be JSON: ${String((err as Error)?.message ?? err)}` };
  }
}

/**
 * What a client's channel-only Maps and Sets are until their first write: one shared empty
 * Map / Set that throws if written (a missed write site fails loudly). Most clients never use
 * a channel, and each empty Map or Set still allocates its hash table (issue 14's connect
 * row, S7C2: 13 per client before). A write site swaps in a Map of the client's own
 * (`own()`, `ownSet()`).
 */
class NoMap<K, V> extends Map<K, V> {
  override set(): this {
    throw new Error('syncwire internal: write to the shared empty map');
  }
}
class NoSet<T> extends Set<T> {
  override add(): this {
    throw new Error('syncwire internal: write to the shared empty set');
  }
}
const NO_MAP = new NoMap<never, never>();
const NO_SET = new NoSet<never>();
const noMap = <K, V>() => NO_MAP as unknown as Map<K, V>;
const noSet = <T>() => NO_SET as unknown as Set<T>;
/** `m`, or a new Map when `m` is the shared empty one (the caller stores it). */
const own = <K, V>(m: Map<K, V>): Map<K, V> => (m === (NO_MAP as unknown) ? new Map() : m);
const ownSet = <T>(m: Set<T>): Set<T> => (m === (NO_SET as unknown) ? new Set() : m);

/** The facade's hot streams: plain Subjects (no replay), made at their first subscriber. */
type HotName =
  | ListName
  | 'messages'
  | 'failures'
  | 'resets'
  | 'refused'
  | 'snapshots'
  | 'rejected'
  | 'restored';
/** In the order `close()` completes them. */
const HOT_NAMES: readonly HotName[] = [
  ...LISTS,
  'messages',
  'failures',
  'resets',
  'refused',
  'snapshots',
  'rejected',
  'restored',
];

/**
 * A client's facade streams, each made when first asked for (issue 14's connect row, S7C2: a
 * client made 16 Subjects and 13 Observables whatever the app listened to). A hot stream
 * (`changes$`, `failures$`, …) is a Subject: one nobody asked for yet has no subscriber, so an
 * event for it goes nowhere, as it would have through a Subject without observers; a stream
 * first asked for after `close()` is complete at once, as the closed client's would be.
 * `pending$` is a BehaviorSubject made with the current count; `send$` is the Subject whose
 * operations go to `send()` (rejections on `rejected$`). Methods, not closures: shared by
 * every client.
 */
class Streams {
  closed = false;
  /** The hot Subjects made so far, by name. */
  made: { [K in HotName]?: Subject<any> } | undefined = undefined;
  /** Their `asObservable()` views, as the facade hands them out (one per stream). */
  views: { [K in HotName]?: Observable<any> } | undefined = undefined;
  /** The pending count (`SyncClient.pending`), kept whether `pending$` exists or not. */
  pendingN = 0;
  pending: BehaviorSubject<number> | undefined = undefined;
  pendingView: Observable<number> | undefined = undefined;
  send$: Subject<unknown> | undefined = undefined;
  /** The facade's `clientId`, `actor` and `state` (kept by the client as they change). */
  clientId = '';
  actor: ConnectionActor | undefined = undefined;
  stateSubject: BehaviorSubject<ConnectionState> | undefined = undefined;
  /** For `network` and `debug`, made at their first read. */
  signal: ((sig: NetworkSignal) => void) | undefined = undefined;
  faults: FaultSwitches | undefined = undefined;
  transport: { live: WebSocketLike | null } | undefined = undefined;
  networkObj: SyncClient['network'] | undefined = undefined;
  debugObj: SyncClient['debug'] | undefined = undefined;
  /** The client's `send()`, for `send$`. */
  sendOp: ((op: any) => Promise<unknown>) | undefined = undefined;

  subject(name: HotName): Subject<any> {
    if (!this.made) this.made = {};
    let s = this.made[name];
    if (!s) {
      s = new Subject();
      this.made[name] = s;
      if (this.closed) s.complete();
    }
    return s;
  }
  view(name: HotName): Observable<any> {
    if (!this.views) this.views = {};
    let v = this.views[name];
    if (!v) {
      v = this.subject(name).asObservable();
      this.views[name] = v;
    }
    return v;
  }
  /** An event for `name`'s subscribers; none when nobody asked for the stream. */
  next(name: HotName, value: unknown): void {
    this.made?.[name]?.next(value);
  }
  setPending(n: number): void {
    if (n === this.pendingN) return;
    this.pendingN = n;
    this.pending?.next(n);
  }
  pending$(): Observable<number> {
    if (!this.pendingView) {
      const p = new BehaviorSubject(this.pendingN);
      this.pending = p;
      if (this.closed) p.complete();
      this.pendingView = p.pipe(distinctUntilChanged());
    }
    return this.pendingView;
  }
  sendSubject(): Subject<unknown> {
    if (!this.send$) {
      const s = new Subject<unknown>();
      this.send$ = s;
      s.subscribe((op) => this.sendOne(op));
      if (this.closed) s.complete();
    }
    return this.send$;
  }
  private sendOne(op: unknown): void {
    this.sendOp!(op).catch((error: SyncError) => this.next('rejected', { op, error }));
  }
  /** `SyncClient.network` (its functions work unbound, as before). */
  network(): SyncClient['network'] {
    if (!this.networkObj)
      this.networkObj = {
        online: () => this.signal!('online'),
        offline: () => this.signal!('offline'),
        visible: () => this.signal!('visible'),
      };
    return this.networkObj;
  }
  /** `SyncClient.debug`. */
  debug(): SyncClient['debug'] {
    if (!this.debugObj)
      this.debugObj = { faults: this.faults!, killSocket: () => killSocket(this.transport!.live) };
    return this.debugObj;
  }
  /** `close()`: the count goes to 0, then every stream made completes (and any made later is). */
  close(): void {
    this.pendingN = 0;
    this.pending?.next(0);
    this.closed = true;
    for (const name of HOT_NAMES) this.made?.[name]?.complete();
    this.send$?.complete();
    this.pending?.complete();
  }
}

/**
 * Key/value access through the storage in use: `store` is the client's storage, or a memory
 * storage of its own when another live client holds its identity there. A class, not two
 * closures per client.
 */
class StoreRef implements SyncStorage {
  constructor(public store: SyncStorage) {}
  get(key: string): string | null {
    return this.store.get(key);
  }
  set(key: string, value: string): void {
    this.store.set(key, value);
  }
}

/**
 * The outbox of a client given no `storage`: nothing outside the client can reach its storage,
 * so no later client can ever load what it would keep, and the client itself loads its outbox
 * only once, at start, when it is empty. Keeping operations there (a `MapOutbox`: a Map per
 * clientId, two more at the first send, a Set per settled batch) did nothing a program can
 * see. Issue 14's connect row (S7C2).
 */
const NO_OUTBOX: SyncOutbox = {
  load: () => ({ ops: [], batches: [] }),
  add: () => {},
  batch: () => {},
  remove: () => {},
};

/**
 * The storage of a client given none (`SyncClientOptions.storage`'s default): the key/value
 * part of `memoryStorage()` (the clientId, the channel cursors), no locks (nothing else can hold it) and `NO_OUTBOX`. A
 * class, not `memoryStorage()`'s closures, Holders and MapOutbox per client.
 */
class PrivateStorage implements SyncStorage {
  private readonly map = new Map<string, string>();
  readonly outbox = NO_OUTBOX;
  get(key: string): string | null {
    return this.map.get(key) ?? null;
  }
  set(key: string, value: string): void {
    this.map.set(key, value);
  }
}

/** `TransportConfig.onSocket`, called on the client's transport object: the socket open now. */
function rememberSocket(this: { live: WebSocketLike | null }, ws: WebSocketLike | null): void {
  this.live = ws;
}

/** Where the facade keeps its client's `Streams`. */
const STREAMS = Symbol('syncwire.streams');
type Facade = { [STREAMS]: Streams };
/**
 * The prototype of every client object: the stream properties as getters that make the stream
 * at the first read, and the other read-only properties as getters (one shared object, not a
 * closure per stream per client; and an object literal with getters is made in dictionary
 * mode by V8, which made each client object a ~0.8 kB hash table).
 */
const FACADE = {
  get changes$() {
    return (this as unknown as Facade)[STREAMS].view('changes');
  },
  get successes$() {
    return (this as unknown as Facade)[STREAMS].view('successes');
  },
  get allowed$() {
    return (this as unknown as Facade)[STREAMS].view('allowed');
  },
  get disallowed$() {
    return (this as unknown as Facade)[STREAMS].view('disallowed');
  },
  get errors$() {
    return (this as unknown as Facade)[STREAMS].view('errors');
  },
  get messages$() {
    return (this as unknown as Facade)[STREAMS].view('messages');
  },
  get failures$() {
    return (this as unknown as Facade)[STREAMS].view('failures');
  },
  get resets$() {
    return (this as unknown as Facade)[STREAMS].view('resets');
  },
  get refused$() {
    return (this as unknown as Facade)[STREAMS].view('refused');
  },
  get snapshots$() {
    return (this as unknown as Facade)[STREAMS].view('snapshots');
  },
  get rejected$() {
    return (this as unknown as Facade)[STREAMS].view('rejected');
  },
  get restored$() {
    return (this as unknown as Facade)[STREAMS].view('restored');
  },
  get pending$() {
    return (this as unknown as Facade)[STREAMS].pending$();
  },
  get send$() {
    return (this as unknown as Facade)[STREAMS].sendSubject();
  },
  get pending() {
    return (this as unknown as Facade)[STREAMS].pendingN;
  },
  get clientId() {
    return (this as unknown as Facade)[STREAMS].clientId;
  },
  get state() {
    return (this as unknown as Facade)[STREAMS].stateSubject!.value;
  },
  get actor() {
    return (this as unknown as Facade)[STREAMS].actor!;
  },
  get network() {
    return (this as unknown as Facade)[STREAMS].network();
  },
  get debug() {
    return (this as unknown as Facade)[STREAMS].debug();
  },
};

/** `debug.killSocket()`: an abrupt drop of the socket open now (its close event is what the chart sees). */
function killSocket(live: WebSocketLike | null): boolean {
  if (!live) return false;
  const s = live as WebSocketLike & { terminate?: () => void };
  if (typeof s.terminate === 'function') s.terminate();
  else s.close(4000, 'killed by debug.killSocket');
  return true;
}
type FacadeKeys = keyof typeof FACADE;
/** The object `createSyncClient` builds: FACADE's getters come from its prototype. */
type ClientObject<Op, Result> = Omit<SyncClient<Op, Result>, FacadeKeys> & {
  __proto__: typeof FACADE;
  [STREAMS]: Streams;
};

/** Defaults, in one place. */
const DEFAULTS = {
  timeout: 15_000,
  maxBatch: 100,
  maxQueue: 10_000,
  maxBackoff: 30_000,
  storageKey: 'syncwire',
};

/**
 * The chart with the real transports and its own actions, for clients given an `inspect`
 * observer: made once, at the first such client (a `provide()` costs ~650 µs; most programs
 * never inspect). Each client's transport reaches the actors through the `io` input (building
 * a provided machine per client cost ~650 µs of each `createSyncClient`, issue 14's connect row).
 */
let inspectedMachine: typeof connectionMachine | undefined;
const inspectedChart = () =>
  (inspectedMachine ??= connectionMachine.provide({ actors: { socket: socketActor(), http: httpActor() } }));

/** A client's `io` (`ConnectionInput.io`): its transport, and where a batch formed is persisted. */
interface ClientIo extends TransportIo {
  /** What the client does on the chart's `batched` event: the batch's id and members stored. */
  persistBatch(id: string, keys: number[]): void;
}

/**
 * The chart as a client without an inspector runs it (made once, for every such client):
 * `emitBatched` and `sendTaken` (the two actions of `open`'s SEND, once per request taken)
 * done directly instead of through an emitted event and a `SEND` command to the `socket`
 * actor's mailbox: the batch is persisted, then the
 * request written through the live socket actor's handle (`TransportIo.write`), in the order the
 * chart's own actions would (durable before the SYN leaves). Issue 14: one actor step and one
 * emitted event fewer per request. With an inspector the chart's own actions run (it counts the
 * frames out from the `SEND` commands).
 */
const providedMachine = connectionMachine.provide({
  actors: { socket: socketActor(), http: httpActor() },
  actions: {
    emitBatched: ({ context }) => {
      const f = context.inflight!;
      (context.settings.io as ClientIo).persistBatch(f.id, f.keys);
    },
    // No live socket actor (it runs as long as the chart does): nothing written, the ACK
    // deadline then fails the socket like any lost write.
    sendTaken: ({ context }) => (context.settings.io as ClientIo).write?.(frameFor(context.inflight!)),
  },
});

export function createSyncClient<Op = unknown, Result = unknown>(
  options: SyncClientOptions,
): SyncClient<Op, Result> {
  validateOptions(options);
  const timeout = options.timeout ?? DEFAULTS.timeout;
  const maxBatch = options.maxBatch ?? DEFAULTS.maxBatch;
  const maxQueue = options.maxQueue ?? DEFAULTS.maxQueue;
  const storage: SyncStorage = options.storage ?? new PrivateStorage();
  const storageKey = options.storageKey ?? DEFAULTS.storageKey;
  const WS = options.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
  if (!WS)
    throw new TypeError('syncwire: no WebSocket implementation; pass options.WebSocket (e.g. from "ws")');
  const fetchImpl = options.fetch ?? globalThis.fetch?.bind(globalThis);
  if (!fetchImpl) throw new TypeError('syncwire: no fetch implementation; pass options.fetch');

  const idKey = `${storageKey}:clientId`;
  // A stored clientId that is not a valid one (PROTOCOL §1: too long, not visible ASCII, another
  // program's value) is not used: a new one is taken, as when none is stored.
  const stored = options.clientId === undefined ? storage.get(idKey) : null;
  const storedId = isValidClientId(stored) ? stored : null;
  let clientId = options.clientId ?? storedId ?? randomId('c');
  if (options.clientId === undefined) storage.set(idKey, clientId);
  /** The random part of this instance's request ids and outbox keys (64 bits). */
  const instance = randomInstance();
  /**
   * The storage in use: `storage`, or a memory storage of this client's own when another live
   * client holds this identity in it (`SyncLocks.refused: 'private'`, memoryStorage).
   */
  /** Key/value access through the storage in use (the cursors keep this, not `storage`). */
  const kv = new StoreRef(storage);
  let outbox: SyncOutbox = storage.outbox ?? new MapOutbox();

  const faults: FaultSwitches = { dropAcks: false, blackhole: false, blockHttp: false };
  const transport = {
    /** The socket open now (`onSocket`), for `debug.killSocket`. */
    live: null as WebSocketLike | null,
    urls: options.url,
    httpUrls: options.httpUrl,
    WebSocket: WS,
    fetch: fetchImpl,
    params: options.params ?? {},
    headers: options.headers ?? {},
    faults,
    onSocket: rememberSocket,
    // MSGs skip the chart's macrostep (see TransportConfig.onMessage); `onMsg` is below. Not
    // with an inspector: it sees every frame as a chart event (syncwire/inspect counts MSGs,
    // cursors and traffic from them).
    onMessage: options.inspect ? undefined : (m: MsgEnvelope) => onMsg(m),
    // A bad frame inside an HTTP 200 reply: reported like one on the socket (PROTOCOL §4).
    onBadFrame: (reason: string) => {
      if (!closed) reportFailure({ kind: 'bad_frame', state: stateSubject.value, at: Date.now(), reason });
    },
  };
  const cursor = { index: 0 };
  /** This client's transport, handed to the shared actors through the chart's `io` input. */
  const io: ClientIo = {
    config: transport,
    cursor,
    clientId: () => clientId,
    persistBatch: (id, keys) => persistBatch(id, keys),
  };

  /** The facade's streams, each made at its first subscriber (see `Streams`). */
  const streams = new Streams();
  /** MSGs of channels waiting for their snapshot, delivered after it. */
  let held$: Map<string, ChannelMessage[]> = noMap();
  /**
   * Batches whose response arrived but whose operations wait for the client's cursors to
   * reach the batch's publications (read-your-writes, docs/consistency.md), oldest first.
   */
  const held: Array<{
    results: unknown[];
    /** Per result: resolve its promise, or report it on `restored$`. */
    deliver: Array<(result: unknown) => void>;
    published: Publication[];
    /** Each channel's reset count when the response arrived: a reset since releases it. */
    resetsAt: Map<string, number>;
    /**
     * Publications no longer waited for: the server's own answers showed it does not have
     * them, or the channel's SUB was refused (docs/consistency.md "bound of the wait").
     */
    gaveUp: Set<Publication>;
  }> = [];
  let resetCount = noMap<string, number>();
  const channels = new ChannelCursors(kv, `${storageKey}:cursors`);
  /** One subscription actor per channel ever subscribed, children of the connection actor. */
  let subActors = noMap<string, SubscriptionActor>();
  /**
   * `subscriptions$`'s subject, made at its first subscriber with the map as it is then (a
   * client that never looks at it never makes it: issue 14, S7C2).
   */
  let subscriptionsSubject: BehaviorSubject<Record<string, SubscriptionState>> | undefined;
  /**
   * Inside `batched()` (a SUB answer, the `channels` option, a re-SUB of many channels) the
   * map is published once at the end, not once per channel's transition: each publication
   * costs O(channels), so per-channel publishing made those paths quadratic (FIX14E F6).
   */
  let batching = 0;
  let batchDirty = false;
  const batched = <T>(fn: () => T): T => {
    batching++;
    try {
      return fn();
    } finally {
      if (--batching === 0 && batchDirty) {
        batchDirty = false;
        publishSubscriptions();
      }
    }
  };
  /** Publish now what a batch changed so far (before `resets$`: the app hears a reset in `resetting`). */
  const flushSubscriptions = () => {
    if (!batchDirty) return;
    batchDirty = false;
    const b = batching;
    batching = 0;
    publishSubscriptions();
    batching = b;
  };
  const publishSubscriptions = () => {
    if (batching > 0) {
      batchDirty = true;
      return;
    }
    if (!liveChanged) return;
    // Nobody listens: the map is built when someone subscribes (`subscriptions$` is deferred),
    // not on every transition of every channel (O(channels) each: FIX14E F6).
    if (!subscriptionsSubject?.observed) {
      liveStale = true;
      return;
    }
    emitSubscriptions();
  };
  const mapOfLive = () => {
    const out = channelRecord<SubscriptionState>();
    for (const [name, v] of live) out[name] = v;
    return out;
  };
  const emitSubscriptions = () => {
    liveChanged = false;
    liveStale = false;
    subscriptionsSubject!.next(mapOfLive());
  };
  /** Each channel's state but `unsubscribed`, kept per transition in O(1). */
  let live = noMap<string, SubscriptionState>();
  let liveChanged = false;
  let liveStale = false;
  const noteState = (channel: string, v: string) => {
    if (v === 'unsubscribed' || v === 'forgotten') {
      if (live.delete(channel)) liveChanged = true;
    } else if (live.get(channel) !== v) {
      live = own(live);
      live.set(channel, v as SubscriptionState);
      liveChanged = true;
    }
    if (liveChanged) publishSubscriptions();
  };
  // What rxjs's `defer` does here, without it: `defer` brings `innerFrom` (promises, async
  // iterables, tslib's async helpers) into the browser bundle, +3.5 kB minified.
  const subscriptions$ = new Observable<Record<string, SubscriptionState>>((subscriber) => {
    if (!subscriptionsSubject) {
      // The map as it is now; `{}` and complete once the client closed, as the subject made at
      // creation would be by then (a completed BehaviorSubject gives a late subscriber nothing).
      subscriptionsSubject = new BehaviorSubject<Record<string, SubscriptionState>>(
        closed ? {} : mapOfLive(),
      );
      liveChanged = false;
      liveStale = false;
      if (closed) subscriptionsSubject.complete();
    } else if (liveStale) emitSubscriptions();
    return subscriptionsSubject.subscribe(subscriber);
  });
  const subActor = (channel: string): SubscriptionActor => {
    let a = subActors.get(channel);
    if (!a) {
      const made = createSubscriptionActor(channel, actor, {
        timeout,
        maxBackoff: options.maxBackoff ?? DEFAULTS.maxBackoff,
      });
      a = made;
      subActors = own(subActors);
      subActors.set(channel, a);
      a.subscribe((snap) => {
        // A forgotten actor's last transitions no longer speak for the channel.
        if (subActors.get(channel) === made) noteState(channel, subscriptionStateOf(snap.value));
      });
      // Its backoff after a failed SUB is over (the chart's `subRetry` delay): ask again.
      made.on('retry', () => {
        if (subActors.get(channel) === made) retrySub(channel);
      });
      a.start();
    }
    return a;
  };
  /** Tell a channel's machine what happened (a channel never subscribed has none). */
  const tell = (channel: string, event: Parameters<SubscriptionActor['send']>[0]) => {
    subActors.get(channel)?.send(event);
  };
  /**
   * A channel the app unsubscribed (or the server ended) is forgotten: its actor is stopped
   * (which removes it from the actor system) and its per-channel entries go, so subscribing
   * to ever new channel names does not grow the client (FIX14E F5). A later `subscribe()`
   * makes a new actor.
   */
  const forget = (channel: string) => {
    if (channels.has(channel)) return;
    const a = subActors.get(channel);
    noteState(channel, 'unsubscribed');
    if (a) {
      subActors.delete(channel);
      // A child of the connection actor cannot be stopped directly: its final state ends it.
      a.send({ type: 'UNSUBSCRIBE' });
      a.send({ type: 'FORGET' });
    }
    resetCount.delete(channel);
    publishSubscriptions();
  };
  /**
   * The last refusal of each channel not subscribed again since: what a SUB still waiting in
   * the outbox is answered with locally when none of its channels is wanted any more.
   */
  let refusals = noMap<string, { code: RefusedEvent['code']; message: string }>();
  const refuse = (channel: string, code: RefusedEvent['code'], message: string, revoked: boolean) => {
    if (!channels.has(channel)) return;
    refusals = own(refusals);
    refusals.set(channel, { code, message });
    channels.remove(channel);
    // As unsubscribe(): messages held for its snapshot go, and sends waiting on it settle.
    held$.delete(channel);
    tell(channel, { type: revoked ? 'REVOKED' : 'REFUSED', error: { code, message } });
    if (revoked && code === 'unsubscribed') forget(channel);
    streams.next('refused', { channel, code, message } satisfies RefusedEvent);
    releaseHeld();
  };
  const waiters = new Map<number, Waiter>();
  /** Operations in the durable outbox, by their key in the machine's queue. */
  /**
   * Operations accepted and not settled, by outbox key. An entry `send()` made is exactly the
   * `OutboxEntry` the durable outbox is given (`{ key, at, n, json }`, no copy per operation);
   * a restored one carries `restored: true` on top, and the outbox gets a copy without it.
   */
  const entries = new Map<number, OutboxEntry & { restored?: true }>();
  let nextKey = 1;
  let nextOp = 1;
  let closed = false;
  let pollQueued = false;
  /**
   * Channels unsubscribed since the last socket became ready whose `UNS` has not been answered
   * on a socket. An `UNS` sent while degraded went over HTTP, which ends nothing on a socket
   * the server still holds (the one being re-pinged): when a socket is ready again they are
   * unsubscribed on it too (PROTOCOL §3 rule 11). One answered on the socket (the client
   * `open`) ended the channel there: its name goes at once, so the set holds only the `UNS`s
   * in flight or answered over HTTP, not one name per channel ever unsubscribed while one
   * socket lives.
   */
  let unsubscribedSinceSocket = noSet<string>();
  /**
   * Channels whose SUB failed (not a refusal) and whose chart's backoff is over (it emitted
   * `retry`, machines/subscription.ts): asked for again in one SUB per tick (their waits,
   * started by one failed SUB, end together).
   */
  let retryDue: string[] = [];
  const retrySub = (channel: string) => {
    if (closed) return;
    if (retryDue.length === 0)
      queueMicrotask(() => {
        const names = retryDue.filter((name) => channels.has(name));
        retryDue = [];
        if (names.length > 0 && !closed) resubscribe(names, false);
      });
    retryDue.push(channel);
  };
  const sendUns = (names: string[], front: boolean, waiter?: Pick<Waiter, 'resolve' | 'reject'>) => {
    unsubscribedSinceSocket = ownSet(unsubscribedSinceSocket);
    unsWaiting = own(unsWaiting);
    for (const name of names) {
      unsubscribedSinceSocket.add(name);
      // A SUB queued before this UNS is ended by it on the server: a later subscribe() must not
      // join that SUB (FIX6A F1: the channel looked subscribed, the server had none), it sends
      // its own, after this UNS.
      subPromises.delete(name);
      unsWaiting.set(name, (unsWaiting.get(name) ?? 0) + 1);
    }
    const done = () => {
      for (const name of names) {
        const n = (unsWaiting.get(name) ?? 0) - 1;
        if (n > 0) unsWaiting.set(name, n);
        else unsWaiting.delete(name);
      }
    };
    const key = nextKey++;
    enqueue(
      { key, kind: 'UNS', payload: { channels: names } },
      {
        kind: 'UNS',
        unsubscribed: names,
        resolve: (v) => {
          done();
          waiter?.resolve(v);
        },
        reject: (e) => {
          done();
          waiter?.reject(e);
        },
      },
      front,
    );
  };
  let releaseLock: (() => void | Promise<void>) | null = null;
  /** The locks this client claimed its identity from (the storage's, or its private memory's). */
  let claimLocks: SyncLocks | undefined;
  let stopWatching: (() => void) | null = null;
  let adopted = noSet<SyncClient<Op, Result>>();

  const inspect = options.inspect;
  const makeActor = () =>
    createActor(inspect ? inspectedChart() : providedMachine, {
      input: {
        clientId,
        instance,
        timeout,
        maxBatch,
        maxBatchBytes: options.maxBatchBytes,
        pollInterval: options.pollInterval ?? timeout,
        maxBackoff: options.maxBackoff ?? DEFAULTS.maxBackoff,
        random: options.random,
        io,
      },
      inspect,
      // Every named delay on one platform timer (./clock.ts): the chart re-arms a deadline on
      // nearly every frame, and nearly none of them fires.
      clock: options.clock ?? new LazyClock(),
    });
  let actor = makeActor();
  /**
   * A new random clientId and the connection actor made for it (before it starts), also where
   * the facade's getters read them (`streams`).
   */
  const newIdentity = () => {
    clientId = randomId('c');
    actor = makeActor();
    streams.clientId = clientId;
    streams.actor = actor;
  };
  const stateSubject = new BehaviorSubject<ConnectionState>('connecting');
  // What FACADE's getters read (`clientId`, `actor` change together when the identity does).
  streams.clientId = clientId;
  streams.actor = actor;
  streams.stateSubject = stateSubject;
  streams.faults = faults;
  streams.transport = transport;
  const state$ = stateSubject.pipe(distinctUntilChanged());

  const reportFailure = (f: Failure) => {
    streams.next('failures', f);
    try {
      options.onFailure?.(f);
    } catch {
      // A telemetry hook must never break the connection.
    }
  };
  /** A storage that failed: reported, never thrown; the client goes on from memory. */
  const storageFailed = (err: unknown) => {
    if (closed) return;
    reportFailure({
      kind: 'storage',
      state: stateSubject.value,
      at: Date.now(),
      reason: String((err as Error)?.message ?? err),
    });
  };
  storage.onError?.(storageFailed);
  /** Run a storage call that may throw or reject; failures are reported. */
  const guarded = (fn: () => void | Promise<void>): void | Promise<void> => {
    try {
      const r = fn();
      if (r && typeof (r as Promise<void>).then === 'function')
        return (r as Promise<void>).catch(storageFailed);
    } catch (err) {
      storageFailed(err);
    }
  };
  /**
   * The pending count, kept as it changes (O(1) per send and settle; walking every waiter on
   * each one made a full outbox quadratic): operations with a waiter, restored operations not
   * settled yet, and applied ones waiting for their publications to reach this client's cursors.
   */
  let opWaiters = 0;
  let restoredLeft = 0;
  let heldOps = 0;
  const setPending = () => {
    if (closed) return;
    const n = opWaiters + restoredLeft + heldOps;
    streams.setPending(n);
  };

  /** Results and MSG payloads feed the list streams under their keys. */
  const fanOutLists = (value: unknown, names: readonly ListName[] = LISTS) => {
    if (!value || typeof value !== 'object') return;
    for (const name of names) {
      const list = (value as Record<string, unknown>)[name];
      if (Array.isArray(list) && list.length > 0) streams.next(name, list);
    }
  };

  /** One channel message to the app: its own carry only `changes` (the rest came with the result). */
  const deliver = (m: ChannelMessage) => {
    fanOutLists(m.payload, m.echo ? ['changes'] : LISTS);
    streams.next('messages', m);
  };

  /** Whether the client's view already holds this publication (or never will: reset, gone). */
  const reached = (p: Publication, resetsAt: Map<string, number>): boolean => {
    const at = channels.position(p.channel);
    if (!at) return true;
    if ((resetCount.get(p.channel) ?? 0) !== (resetsAt.get(p.channel) ?? 0)) return true;
    if (channels.snapshotting(p.channel)) return false;
    return at.epoch === p.epoch && at.seq !== undefined && at.seq >= p.seq;
  };

  /** Whether a held batch still waits for this publication. */
  const waiting = (h: (typeof held)[number], p: Publication) => !h.gaveUp.has(p) && !reached(p, h.resetsAt);

  /** Settle held batches, oldest first, as far as their publications were delivered. */
  const releaseHeld = (force = false) => {
    let released = false;
    while (held.length > 0) {
      const h = held[0]!;
      if (!force && h.published.some((p) => waiting(h, p))) break;
      held.shift();
      heldOps -= h.deliver.length;
      released = true;
      h.results.forEach((result, i) => {
        fanOutLists(result, h.published.length > 0 ? NOT_CHANGES : LISTS);
        h.deliver[i]!(result);
      });
    }
    if (released) setPending();
    if (held.length === 0 || pollQueued || closed) return;
    const s = stateSubject.value;
    if (s === 'degraded' || s === 'rePinging' || s === 'connecting') {
      // Still waiting and not on the socket: poll at once rather than after pollInterval.
      if (channels.names.length > 0) resubscribe(channels.names, false, true);
      return;
    }
    // On the socket the MSG normally came before the response. A cursor still behind asks
    // the server again (a re-SUB from the cursor replays what is missing), so that the wait
    // ends on the server's answer, not never (docs/consistency.md "bound of the wait").
    const behind = new Set<string>();
    for (const h of held)
      for (const p of h.published)
        if (waiting(h, p) && !channels.snapshotting(p.channel)) behind.add(p.channel);
    if (behind.size > 0) resubscribe([...behind], false, true);
  };

  /**
   * A SUB was answered: a publication a held batch waits for, on a channel this answer
   * settled (no `more`, no re-SUB pending, no reset), that the cursor has still not reached
   * is one the server does not have: its head is below it, in another epoch, or its replay
   * skipped it. Stop waiting for it and report a `bad_frame` failure.
   */
  const checkHeld = (
    requested: string[],
    answered: Record<string, ChannelState> | undefined,
    unsettled: Set<string>,
  ) => {
    const asked = new Set(requested);
    // One bad_frame per answer, with the count (FIX14E F7: a SYN naming 100 000 publications
    // the server does not have made 100 000 failures).
    let missing = 0;
    let first = '';
    for (const h of held) {
      for (const p of h.published) {
        if (!asked.has(p.channel) || unsettled.has(p.channel) || !waiting(h, p)) continue;
        const e = entryOf(answered, p.channel);
        if (e?.more || channels.snapshotting(p.channel)) continue;
        h.gaveUp.add(p);
        const at = channels.position(p.channel);
        const why = !e
          ? 'its SUB answer does not name the channel'
          : e.epoch !== p.epoch
            ? `the channel is in epoch ${e.epoch}`
            : e.seq < p.seq
              ? `its head is ${e.seq}`
              : `its replay stopped at ${at?.seq ?? 'nothing'}`;
        if (missing++ === 0)
          first = `the server named publication ${p.channel}#${p.seq} (epoch ${p.epoch}) it does not have: ${why}`;
      }
    }
    if (missing > 0)
      reportFailure({
        kind: 'bad_frame',
        state: stateSubject.value,
        at: Date.now(),
        reason:
          missing === 1 ? first : `${missing} publications the server does not have; the first: ${first}`,
      });
  };
  /** A SUB naming these channels was refused: their held publications are not waited for. */
  const giveUpOn = (names: string[]) => {
    const set = new Set(names);
    for (const h of held) for (const p of h.published) if (set.has(p.channel)) h.gaveUp.add(p);
  };

  // Everything reaches the machine through this lane, in order: an outbox write (which may be
  // asynchronous: IndexedDB) completes before the operations it wrote are handed over, and
  // nothing passes before the stored outbox has been loaded and queued.
  interface Step {
    write?: () => void | Promise<void>;
    event: Parameters<ConnectionActor['send']>[0];
  }
  const steps: Step[] = [];
  let ready = false;
  /** Network signals that arrived before the actor started (identity or outbox loading). */
  const earlySignals: NetworkSignal[] = [];
  let pumping = false;
  const pump = () => {
    if (pumping || !ready) return;
    pumping = true;
    while (steps.length > 0) {
      const step = steps[0]!;
      if (step.write) {
        const write = step.write;
        step.write = undefined;
        const r = guarded(write);
        if (r) {
          r.then(() => {
            pumping = false;
            pump();
          });
          return;
        }
      }
      steps.shift();
      if (!closed) actor.send(step.event);
    }
    pumping = false;
  };

  // Operations sent in the same tick reach the machine as one SEND: one macrostep and one
  // copy of the outbox per tick, not per operation (a loop of send() was O(n²) in the outbox).
  let burst: QueueItem[] = [];
  const flushBurst = () => {
    if (burst.length === 0) return;
    const items = burst;
    burst = [];
    if (closed) return;
    // What the durable outbox keeps of each: the JSON send() made, never the app's object
    // (without the client's `restored` mark).
    const stored: OutboxEntry[] = [];
    for (const i of items) {
      const x = entries.get(i.key);
      if (x !== undefined) stored.push(x.restored ? { key: x.key, at: x.at, n: x.n, json: x.json } : x);
    }
    steps.push({ write: () => outbox.add(clientId, stored), event: { type: 'SEND', items } });
    pump();
  };
  const enqueue = (item: QueueItem, waiter: Waiter, front = false) => {
    waiters.set(item.key, waiter);
    if (waiter.kind === 'op') opWaiters++;
    if (item.kind === 'op' && !front) {
      if (burst.length === 0) queueMicrotask(flushBurst);
      burst.push(item);
      return;
    }
    // A SUB/UNS keeps its place after the operations sent before it.
    flushBurst();
    steps.push({ event: { type: 'SEND', item, front } });
    pump();
  };

  /**
   * SUBs queued or in flight (not answered yet) naming each channel. When a socket becomes
   * ready every one of them goes out on it (the request in flight is resent there first, then
   * the queue), each reading the cursor as it leaves: such a channel needs no re-SUB of its own.
   */
  let subsWaiting = noMap<string, number>();
  const subDone = (names: string[]) => {
    for (const name of names) {
      const n = (subsWaiting.get(name) ?? 0) - 1;
      if (n > 0) subsWaiting.set(name, n);
      else subsWaiting.delete(name);
    }
  };
  /**
   * The latest SUB (queued or in flight) naming each channel, with whether it has gone on the
   * wire yet: a `subscribe()` of a channel that already has one joins it (PROTOCOL §5: one SUB
   * per channel; FIX14E F8) instead of sending its own.
   */
  let subPromises = noMap<string, { p: Promise<unknown>; sent: Map<string, unknown> }>();
  /**
   * UNSs queued or in flight (not answered yet) naming each channel. A SUB put at the front of
   * the queue (a re-SUB) may overtake a queued UNS of its channel: it is then no SUB a
   * `subscribe()` may join (the UNS after it ends what it asked for).
   */
  let unsWaiting = noMap<string, number>();
  const requestSub = (names: string[], front: boolean, poll = false): Promise<unknown> => {
    const sent = new Map<string, { epoch?: string; seq?: number }>();
    const p = new Promise((resolve, reject) => {
      if (names.length === 0) return resolve({ channels: {} });
      subsWaiting = own(subsWaiting);
      for (const name of names) subsWaiting.set(name, (subsWaiting.get(name) ?? 0) + 1);
      const cursors = channels.subPayload(names, sent);
      // Serialized when it goes on the wire: a channel refused or unsubscribed meanwhile is
      // left out, and a SUB left with none is not sent at all (the server would NAK it) but
      // answered locally with what the client knows of each channel (its refusal, if any).
      const payload = {
        toJSON: cursors.toJSON,
        localReply: () => {
          if (names.some((name) => channels.has(name))) return undefined;
          const answer = channelRecord<unknown>();
          for (const name of names) {
            const r = refusals.get(name);
            if (r) answer[name] = { error: { code: r.code, message: r.message } };
          }
          return [{ channels: answer }];
        },
      };
      const key = nextKey++;
      if (poll) pollQueued = true;
      enqueue(
        { key, kind: 'SUB', payload },
        {
          kind: 'SUB',
          channels: names,
          poll,
          sent,
          resolve: (v) => {
            if (poll) pollQueued = false;
            subDone(names);
            forgetSubPromise(names, p);
            resolve(v);
          },
          reject: (e) => {
            if (poll) pollQueued = false;
            subDone(names);
            forgetSubPromise(names, p);
            reject(e);
          },
        },
        front,
      );
    });
    // Joinable only when no UNS of the channel is queued or in flight after it (FIX6A): a SUB
    // at the back of the queue is after every UNS; one at the front may be before a queued one.
    if (!poll) {
      subPromises = own(subPromises);
      for (const name of names) if (!front || !unsWaiting.has(name)) subPromises.set(name, { p, sent });
    }
    return p;
  };
  const forgetSubPromise = (names: string[], p: Promise<unknown>) => {
    for (const name of names) if (subPromises.get(name)?.p === p) subPromises.delete(name);
  };

  /** A SUB the client makes by itself; `why` is what each channel's machine is told. */
  const resubscribe = (names: string[], front: boolean, poll = false, why?: 'RESUBSCRIBE' | 'CATCH_UP') => {
    if (why)
      batched(() => {
        for (const name of names) tell(name, { type: why });
      });
    requestSub(names, front, poll).catch(() => {
      // A refused re-SUB already surfaced as a failure; the next reconnect tries again.
    });
  };

  /** One answer: the subscription map is published once for it, not per channel (F6). */
  const settle = (e: Extract<ConnectionEmitted, { type: 'settled' }>) => batched(() => settleOne(e));
  const settleOne = (e: Extract<ConnectionEmitted, { type: 'settled' }>) => {
    // One pass over the keys (once per round trip: no map/filter chains).
    const n = e.keys.length;
    const ws: Array<Waiter | undefined> = new Array(n);
    const es: Array<(OutboxEntry & { restored?: true }) | undefined> = new Array(n);
    const storeKeys: string[] = [];
    for (let i = 0; i < n; i++) {
      const k = e.keys[i]!;
      const w = waiters.get(k);
      const x = entries.get(k);
      ws[i] = w;
      es[i] = x;
      if (w?.kind === 'op') opWaiters--;
      if (x !== undefined) {
        if (x.restored) restoredLeft--;
        storeKeys.push(x.key);
        entries.delete(k);
      }
      waiters.delete(k);
    }
    // A result or a NAK is final: the operations leave the durable outbox.
    if (storeKeys.length > 0) void guarded(() => outbox.remove(clientId, storeKeys));
    const restoredError = (err: SyncError) => {
      for (const x of es)
        if (x?.restored) streams.next('restored', { id: e.id, clientId, op: x.op, error: err });
    };
    try {
      if ('error' in e) {
        const err = new SyncError(e.error.code, e.error.message, { id: e.id });
        for (const w of ws) {
          if (w?.channels) {
            channels.subFailed(w.channels);
            giveUpOn(w.channels);
          }
          // A server that refuses a SUB whole (protocol before rule 7's per-channel entries):
          // a one-channel SUB's refusal is that channel's.
          if (w?.kind === 'SUB' && w.channels?.length === 1 && e.error.code === 'forbidden')
            refuse(w.channels[0]!, e.error.code, e.error.message, false);
          else if (w?.kind === 'SUB' && w.channels && !w.poll && !closed) {
            // Failed, not refused (server_error, bad_response, …): the channels still wanted
            // stay subscribing/resetting with the error, and their charts ask again after
            // their backoff (machines/subscription.ts, `subRetry`).
            for (const name of w.channels) {
              if (!channels.has(name)) continue;
              tell(name, { type: 'FAILED', error: { code: e.error.code, message: e.error.message } });
            }
          }
          w?.reject(err);
        }
        restoredError(err);
        releaseHeld();
        return;
      }
      if (e.request === 'SYN') {
        if (e.payload.length !== e.keys.length) {
          const err = new SyncError(
            'bad_response',
            `server answered ${e.payload.length} results for ${e.keys.length} operations`,
            { id: e.id },
          );
          // A frame the client could not accept (PROTOCOL §4): reported, as the socket's are.
          reportFailure({
            kind: 'bad_frame',
            state: stateSubject.value,
            at: Date.now(),
            reason: err.message,
          });
          for (const w of ws) w?.reject(err);
          restoredError(err);
          return;
        }
        const published = e.published ?? [];
        if (published.length === 0 && held.length === 0) {
          // Nothing to wait for and nothing older waiting: settle now, as releaseHeld would,
          // without the held record (closures, Map, Set per batch).
          for (let i = 0; i < n; i++) {
            const result = e.payload[i];
            fanOutLists(result, LISTS);
            const x = es[i];
            if (x?.restored) streams.next('restored', { id: e.id, clientId, op: x.op, result });
            else ws[i]?.resolve(result);
          }
          return;
        }
        heldOps += e.payload.length;
        held.push({
          results: e.payload,
          deliver: e.payload.map((_, i) => {
            const x = es[i];
            if (x?.restored) {
              return (result: unknown) =>
                streams.next(
                  'restored',
                  published.length > 0
                    ? { id: e.id, clientId, op: x.op, result, published }
                    : { id: e.id, clientId, op: x.op, result },
                );
            }
            return (result: unknown) => ws[i]?.resolve(result);
          }),
          published,
          resetsAt: new Map(published.map((p) => [p.channel, resetCount.get(p.channel) ?? 0])),
          gaveUp: new Set(),
        });
        releaseHeld();
        return;
      }
      // SUB / UNS: one waiter, payload [{ channels: {…} }] or [{}].
      const w = ws[0];
      // An UNS answered on the socket ended its channels there: nothing to repeat on it later.
      // (Answered while the chart is on its socket: `open`, `awaitingAck`, `awaitingSyn`; over
      // HTTP it is `degraded` or `rePinging`.)
      if (w?.unsubscribed && onSocket(flatState(actor.getSnapshot())))
        for (const name of w.unsubscribed) unsubscribedSinceSocket.delete(name);
      let body = (e.payload[0] ?? {}) as { channels?: Record<string, unknown> };
      if (e.request === 'SUB' && w?.channels) {
        // Each channel on its own (PROTOCOL §3 rule 7): refusals end that channel only, and an
        // entry the protocol forbids (docs/PROTOCOL.md §2 "SUB answers the client checks") fails that channel
        // only: reported as bad_frame, its cursor untouched, asked for again after a backoff.
        const granted = channelRecord<ChannelState>();
        // What the waiter (subscribe()) sees: entries checked, refusals' codes normalized.
        const checked = channelRecord<unknown>();
        const raw = body as unknown;
        const answer =
          raw !== null && typeof raw === 'object' && !Array.isArray(raw)
            ? (body.channels as unknown)
            : undefined;
        const record =
          answer !== null && typeof answer === 'object' && !Array.isArray(answer)
            ? (answer as Record<string, unknown>)
            : undefined;
        const invalid: string[] = [];
        // One bad_frame failure per answer, however many entries are bad (README: failures$
        // fires once per failure; FIX14E F7): the first problem, and how many there were.
        const problems: string[] = [];
        for (const name of w.channels) {
          const entry = entryOf(record, name);
          if (isChannelRefusal(entry)) {
            const r = channelRefusalOf(entry);
            checked[name] = r;
            refuse(name, r.error.code, r.error.message, false);
            continue;
          }
          // A channel no longer wanted (unsubscribed, refused meanwhile) has nothing to fail.
          const problem =
            entry === undefined ? 'the answer does not name the channel' : channelStateProblem(entry);
          if (problem === undefined) {
            granted[name] = entry as ChannelState;
            checked[name] = entry;
          } else if (channels.has(name)) {
            invalid.push(name);
            const message = `SUB answer entry for ${name}: ${problem}`;
            checked[name] = { error: { code: 'bad_response', message } };
            problems.push(message);
          }
        }
        body = { channels: checked };
        // Granted but no longer wanted (unsubscribed or revoked while the SUB travelled): the
        // server must not keep a subscription the client does not know of.
        const stale = Object.keys(granted).filter((name) => !channels.has(name));
        if (stale.length > 0) sendUns(stale, true);
        const { resets, resub, snapshots, settled, stalled } = channels.onSubResponse(
          w.channels,
          granted,
          w.sent,
        );
        const stalledSet = new Set(stalled);
        for (const name of stalled) {
          // `more` (or a head past the cursor) while the cursor did not move: the server made
          // no progress; asking again at once would loop (FIX14E F4). A bad entry like the rest.
          const entry = granted[name]!;
          const message = `SUB answer entry for ${name}: ${entry.more ? '`more` set' : `head ${entry.seq} ahead`} but the replay did not move the cursor`;
          delete granted[name];
          checked[name] = { error: { code: 'bad_response', message } };
          invalid.push(name);
          problems.push(message);
        }
        if (problems.length > 0)
          reportFailure({
            kind: 'bad_frame',
            state: stateSubject.value,
            at: Date.now(),
            reason:
              problems.length === 1
                ? problems[0]!
                : `${problems.length} bad entries in one SUB answer; the first: ${problems[0]}`,
          });
        if (invalid.length > 0) {
          // As a SUB that failed whole: the channel keeps its state with the error, sends waiting
          // for its publications stop waiting, and it is asked for again after the backoff (a
          // poll needs no retry: the next poll asks again).
          giveUpOn(invalid);
          for (const name of invalid) {
            const message = (checked[name] as { error: { message: string } }).error.message;
            tell(name, { type: 'FAILED', error: { code: 'bad_response', message }, retry: !w.poll });
          }
        }
        // recovered: false → `resetting` while the app hears the reset, then `subscribed`
        // (or still `resetting` while a catch-up SUB is needed).
        const resetNames = new Set(resets.map((r) => r.channel));
        const resubSet = new Set(resub);
        for (const name of resetNames)
          if (channels.has(name) && !stalledSet.has(name)) tell(name, { type: 'RESET' });
        if (resets.length > 0) flushSubscriptions();
        for (const r of resets) {
          resetCount = own(resetCount);
          resetCount.set(r.channel, (resetCount.get(r.channel) ?? 0) + 1);
          streams.next('resets', r);
        }
        // A snapshot first, then the changes after it that arrived while it was awaited.
        const snapOf = new Map(snapshots.map((x) => [x.channel, x]));
        for (const name of settled) {
          const snap = snapOf.get(name);
          if (snap) streams.next('snapshots', snap);
          const buffered = held$.get(name) ?? [];
          held$.delete(name);
          for (const m of buffered) if (!snap || (m.epoch === snap.epoch && m.seq > snap.seq)) deliver(m);
        }
        for (const name of Object.keys(granted))
          if (channels.has(name) && !(resetNames.has(name) && resubSet.has(name)))
            tell(name, { type: 'GRANTED' });
        checkHeld(w.channels, granted, new Set([...resub, ...invalid]));
        if (resub.length > 0) resubscribe(resub, true, false, 'CATCH_UP');
      }
      w?.resolve(body);
      releaseHeld();
    } finally {
      setPending();
    }
  };

  /**
   * One MSG, in wire order: the cursor decides (deliver, own echo, duplicate, gap), then the
   * app sees it. Called by the socket directly (`TransportConfig.onMessage`: no chart step) and
   * for MSGs the chart emits (HTTP replies, and a socket frame that came inside a chart step).
   */
  const onMsg = (m: MsgEnvelope) => {
    const verdict = channels.onMessage(m);
    if (verdict === 'deliver' || verdict === 'own') {
      const cm: ChannelMessage = {
        channel: m.channel,
        seq: m.seq,
        epoch: m.epoch,
        payload: m.payload,
        replay: m.replay === true,
        echo: verdict === 'own',
      };
      if (channels.snapshotting(m.channel)) {
        const buf = held$.get(m.channel) ?? [];
        buf.push(cm);
        held$ = own(held$);
        held$.set(m.channel, buf);
      } else deliver(cm);
    } else if (verdict === 'gap') resubscribe([m.channel], true, false, 'CATCH_UP');
    if (verdict !== 'gap' && verdict !== 'unknown' && verdict !== 'duplicate') releaseHeld();
  };

  /** A batch formed (the chart's `batched`): durable before the SYN leaves, a new instance must resend this id with these ops. */
  const persistBatch = (id: string, outboxKeys: number[]) => {
    const keys: string[] = [];
    for (const k of outboxKeys) {
      const x = entries.get(k);
      if (x !== undefined) keys.push(x.key);
    }
    if (keys.length > 0) void guarded(() => outbox.batch(clientId, { id, keys }));
  };

  const onEmitted = (e: ConnectionEmitted) => {
    switch (e.type) {
      case 'settled':
        settle(e);
        break;
      case 'batched':
        persistBatch(e.id, e.keys);
        break;
      case 'message':
        onMsg(e.frame as MsgEnvelope);
        break;
      case 'revoked': {
        const { code, message } = e.frame.error;
        for (const name of e.frame.payload.channels) refuse(name, code, message, true);
        break;
      }
      case 'failure': {
        const f: Failure = { kind: e.kind, state: stateSubject.value, at: Date.now() };
        if (e.kind === 'unauthorized')
          queueMicrotask(() =>
            shutdown(() => new SyncError('unauthorized', e.reason ?? 'refused with 401 twice')),
          );
        if (e.code !== undefined) f.code = e.code;
        if (e.reason !== undefined) f.reason = e.reason;
        reportFailure(f);
        break;
      }
      case 'socketReady': {
        // A new socket carries no subscriptions: re-SUB from the cursors first. A socket that
        // recovered (re-pinged after the HTTP fallback) may still carry channels unsubscribed
        // over HTTP meanwhile: end those on it.
        // (Nothing to do, and no arrays made, for a client that never unsubscribed: S7C2.)
        if (unsubscribedSinceSocket.size > 0) {
          const lingering = [...unsubscribedSinceSocket].filter((name) => !channels.has(name));
          unsubscribedSinceSocket.clear();
          if (lingering.length > 0) sendUns(lingering, true);
          unsubscribedSinceSocket.clear();
        }
        // Every channel below is told RESUBSCRIBE: a chart waiting in its SUB backoff stops
        // waiting (the SUB goes on this socket now).
        // One SUB per channel (PROTOCOL §5): a channel with a SUB already queued or in flight
        // (subscribe() before the socket opened, the `channels` option, a poll) gets it on this
        // socket; a second one from the cursor would be a round trip for nothing.
        if (channels.size > 0)
          batched(() => {
            const names: string[] = [];
            for (const name of channels.names) {
              if (subsWaiting.has(name)) tell(name, { type: 'RESUBSCRIBE' });
              else names.push(name);
            }
            if (names.length > 0) resubscribe(names, true, false, 'RESUBSCRIBE');
          });
        break;
      }
      case 'poll':
        if (channels.names.length > 0 && !pollQueued) resubscribe(channels.names, false, true);
        break;
    }
  };

  /** Queue what the stored outbox holds, before anything sent by this instance. */
  const restore = (snap: { ops: OutboxEntry[]; batches: { id: string; keys: string[] }[] }): number => {
    // Nothing stored (every new client on a fresh storage): nothing to order or queue.
    if (snap.ops.length === 0 && snap.batches.length === 0) return 0;
    // Each entry's operation as a value (for restored$ and a batch's payload) and its JSON
    // (resent as it is): from `json` (what send() made), or from `op` (IndexedDB rows, and
    // entries written by earlier versions). One that yields neither cannot be resent: reported,
    // and left out (a batch holding it is dropped below, as for a missing member).
    const usable: OutboxEntry[] = [];
    const unusable: string[] = [];
    for (const o of snap.ops) {
      try {
        if (typeof o.json === 'string')
          usable.push({ key: o.key, at: o.at, n: o.n, json: o.json, op: JSON.parse(o.json) });
        else {
          const json = o.op === undefined ? undefined : JSON.stringify(o.op);
          if (json === undefined) throw new Error('no operation');
          usable.push({ key: o.key, at: o.at, n: o.n, json, op: o.op });
        }
      } catch (err) {
        unusable.push(o.key);
        storageFailed(
          new Error(
            `stored operation ${o.key} is not JSON (${String((err as Error)?.message ?? err)}); dropped`,
          ),
        );
      }
    }
    if (unusable.length > 0) void guarded(() => outbox.remove(clientId, unusable));
    const byKey = new Map(usable.map((o) => [o.key, o]));
    const order = (o: OutboxEntry) => [o.at, o.n] as const;
    const before = (a: OutboxEntry, b: OutboxEntry) => {
      const [x, y] = [order(a), order(b)];
      return x[0] - y[0] || x[1] - y[1] || (a.key < b.key ? -1 : a.key > b.key ? 1 : 0);
    };
    type Unit = { first: OutboxEntry; item: QueueItem };
    const units: Unit[] = [];
    const inBatch = new Set<string>();
    const track = (o: OutboxEntry) => {
      const key = nextKey++;
      entries.set(key, { ...o, restored: true });
      restoredLeft++;
      return key;
    };
    for (const b of snap.batches) {
      const members = b.keys.map((k) => byKey.get(k));
      if (members.some((m) => m === undefined) || members.length === 0) {
        // Settled, but its record outlived its operations (a failed removal): drop it, and
        // never resend what is left of it under another id (that could apply it twice).
        for (const m of members) if (m) inBatch.add(m.key);
        const left = members.filter((m) => m !== undefined).map((m) => m!.key);
        void guarded(() => outbox.remove(clientId, left.length > 0 ? left : b.keys));
        continue;
      }
      const ms = members as OutboxEntry[];
      for (const m of ms) inBatch.add(m.key);
      const keys = ms.map(track);
      const first = [...ms].sort(before)[0]!;
      units.push({ first, item: { key: keys[0]!, kind: 'batch', id: b.id, ops: ms.map((m) => m.op), keys } });
    }
    for (const o of usable) {
      if (inBatch.has(o.key)) continue;
      units.push({ first: o, item: { key: 0, kind: 'op', op: o.op, json: o.json } });
    }
    units.sort((a, b) => before(a.first, b.first));
    const items: QueueItem[] = [];
    let n = 0;
    for (const u of units) {
      if (u.item.kind === 'op') u.item = { ...u.item, key: track(u.first) };
      n += u.item.kind === 'batch' ? u.item.keys.length : 1;
      items.push(u.item);
    }
    // Batches travel one per SEND at the head; single operations may join new ones.
    if (items.length > 0) steps.unshift({ event: { type: 'SEND', items } });
    setPending();
    return n;
  };

  const start = () => {
    actor.subscribe({
      // Most snapshots keep the flat name (each SYN, ACK and response makes one): only a
      // change goes through the subject (state$ is distinct anyway; this skips its operators).
      next: (snap) => {
        const name = flatState(snap);
        if (name !== stateSubject.value) stateSubject.next(name);
      },
      error: () => stateSubject.next('closed'),
    });
    actor.on('*', onEmitted);
    actor.start();
    for (const sig of earlySignals.splice(0)) actor.send(signalEvent(sig));
  };

  const adopt = async (orphanId: string) => {
    // An id read back from storage that no client could have used (PROTOCOL §1) is not adopted:
    // createSyncClient would refuse it.
    if (closed || !isValidClientId(orphanId)) return;
    const child = createSyncClient<Op, Result>({
      ...options,
      clientId: orphanId,
      channels: {},
      storage: { get: () => null, set: () => {}, outbox, onError: () => {} },
      inspect: undefined,
    });
    adopted = ownSet(adopted);
    adopted.add(child);
    child.restored$.subscribe((r) => {
      // Its changes reach this client through the channels when its batch published.
      if ('result' in r) fanOutLists(r.result, r.published?.length ? NOT_CHANGES : LISTS);
      streams.next('restored', r);
    });
    try {
      await child.loaded;
      await new Promise<void>((resolve) => {
        child.pending$.subscribe({ next: (n) => n === 0 && resolve(), complete: () => resolve() });
      });
    } finally {
      adopted.delete(child);
      await child.close();
    }
  };

  /**
   * Closed before the storage was ready (its claim or load still under way): the outbox writes
   * of the operations `send()` accepted, which the lane held back, are made now, in order, and
   * nothing is handed to the machine (never started). Resolves with 0 (nothing restored).
   */
  const keepSteps = (): number | Promise<number> => {
    while (steps.length > 0) {
      const write = steps.shift()!.write;
      if (!write) continue;
      const r = guarded(write);
      if (r) return r.then(keepSteps);
    }
    return 0;
  };

  /** Identity (lock), then the stored outbox; synchronous when the storage is. */
  const init = (): number | Promise<number> => {
    // The default storage (PrivateStorage) is this client's alone: nothing to claim.
    const locks = options.storage ? storage.locks : undefined;
    const load = (): number | Promise<number> => {
      if (closed) return keepSteps();
      const finish = (snap: Parameters<typeof restore>[0]): number | Promise<number> => {
        // Closed while the outbox was loading (IndexedDB): write what send() accepted, start nothing.
        if (closed) return keepSteps();
        const n = restore(snap);
        ready = true;
        if (!closed) start();
        pump();
        if (locks && !closed) stopWatching = locks.watch(clientId, adopt);
        return n;
      };
      const failed = (err: unknown) => {
        storageFailed(err);
        return finish({ ops: [], batches: [] });
      };
      let snap: ReturnType<SyncOutbox['load']>;
      try {
        snap = outbox.load(clientId);
      } catch (err) {
        return failed(err);
      }
      if (snap && typeof (snap as Promise<unknown>).then === 'function') {
        return (snap as Promise<Parameters<typeof restore>[0]>).then(finish, failed);
      }
      return finish(snap as Parameters<typeof restore>[0]);
    };
    if (!locks) return load();
    type Release = (() => void | Promise<void>) | null;
    type Claimed = Release | Promise<Release>;
    const isPromise = (r: Claimed): r is Promise<Release> =>
      r !== null && typeof (r as Promise<Release>).then === 'function';
    const held = (release: Release): number | Promise<number> => {
      if (!closed) {
        releaseLock = release;
        return load();
      }
      // A client made from now on for this identity waits for our release, then takes it.
      if (release) void guarded(() => claimLocks?.closing?.(clientId));
      // Closed while the claim was under way: what send() accepted is written to the outbox
      // (now that this instance holds it), then the lock goes (README "close()").
      const free = (n: number) =>
        Promise.resolve()
          .then(() => release?.())
          .catch(storageFailed)
          .then(() => n);
      const n = load();
      return typeof n === 'number' ? free(n) : n.then(free);
    };
    /** Another live client holds this identity in this storage. */
    const refused = (): Claimed => {
      if (locks.refused === 'private') {
        // One key/value store shared with that client (memoryStorage): leave it alone, as
        // fileStorage's second client does, and go on from a memory storage of our own.
        const own = memoryStorage();
        claimLocks = own.locks;
        kv.store = own;
        outbox = own.outbox!;
        if (options.clientId === undefined) newIdentity();
        own.set(idKey, clientId);
        const reason = new Error(
          `the storage is in use by another live client (clientId ${storedId ?? options.clientId}); this client works from memory with its own identity`,
        );
        // After createSyncClient has returned, so that failures$ subscribers see it.
        queueMicrotask(() => storageFailed(reason));
        return own.locks!.claim(clientId);
      }
      if (options.clientId !== undefined) return null;
      // A duplicated tab copies sessionStorage: take a new identity in this storage.
      newIdentity();
      storage.set(idKey, clientId);
      return locks.claim(clientId);
    };
    let first: Claimed;
    claimLocks = locks;
    try {
      first = locks.claim(clientId);
    } catch (err) {
      storageFailed(err);
      return held(null);
    }
    // Synchronous locks (memoryStorage) keep the whole start synchronous.
    if (!isPromise(first)) {
      let release: Claimed = first;
      if (!release) {
        try {
          release = refused();
        } catch (err) {
          storageFailed(err);
          release = null;
        }
      }
      if (!isPromise(release)) return held(release);
      return release.then(held, (err: unknown) => {
        storageFailed(err);
        return held(null);
      });
    }
    const claim = async () => {
      let release: Release = null;
      try {
        release = await first;
        if (!release) release = await refused();
      } catch (err) {
        storageFailed(err);
      }
      return held(release);
    };
    return claim();
  };
  const initResult = init();
  const loaded = Promise.resolve(initResult);

  // The platform's signals: the browser's events unless disabled, and any `signals` source.
  const signal = (sig: NetworkSignal) => {
    if (closed) return;
    if (!ready) earlySignals.push(sig);
    else actor.send(signalEvent(sig));
  };
  streams.signal = signal;
  const teardown: Array<() => void> = [];
  const g = globalThis as {
    window?: {
      addEventListener(t: string, f: () => void): void;
      removeEventListener(t: string, f: () => void): void;
    };
    document?: {
      visibilityState?: string;
      addEventListener(t: string, f: () => void): void;
      removeEventListener(t: string, f: () => void): void;
    };
    navigator?: { onLine?: boolean };
  };
  if (options.browserSignals !== false && g.window?.addEventListener && g.document?.addEventListener) {
    const win = g.window;
    const doc = g.document;
    const onOnline = () => signal('online');
    const onOffline = () => signal('offline');
    // A page hidden (it may be discarded without another event) or unloaded (a reload does not
    // call close()): the cursor write waiting for its turn is made now, or the next page would
    // resume from an older cursor and see messages again.
    const flushCursors = () => void guarded(() => channels.flush());
    const onVisibility = () => {
      if (doc.visibilityState === 'visible') signal('visible');
      else flushCursors();
    };
    win.addEventListener('online', onOnline);
    win.addEventListener('offline', onOffline);
    win.addEventListener('pagehide', flushCursors);
    doc.addEventListener('visibilitychange', onVisibility);
    teardown.push(() => {
      win.removeEventListener('online', onOnline);
      win.removeEventListener('offline', onOffline);
      win.removeEventListener('pagehide', flushCursors);
      doc.removeEventListener('visibilitychange', onVisibility);
    });
    if (g.navigator?.onLine === false) signal('offline');
  }
  if (options.signals) {
    const sub = options.signals.subscribe(signal);
    teardown.push(() => sub.unsubscribe());
  }

  /**
   * Stop for good: reject every pending promise with the error `reason` makes (`closed`, or `unauthorized` when
   * the chart gave up after two 401s), complete the streams. Operations stay in the durable
   * outbox either way.
   */
  const shutdown = async (reason: () => SyncError): Promise<void> => {
    if (closed) return;
    // Holding the identity: a client made for it from now on (in this very tick, say) waits
    // for our release and then takes the identity and the outbox, instead of being refused.
    if (releaseLock) void guarded(() => claimLocks?.closing?.(clientId));
    // Operations accepted this tick are written to the outbox before the client goes.
    flushBurst();
    // Applied batches still waiting for their channel messages settle with their results.
    releaseHeld(true);
    closed = true;
    for (const t of teardown) t();
    // An actor not started yet (identity or outbox still loading) is never started.
    if (ready && actor.getSnapshot().status === 'active') actor.send({ type: 'CLOSE' });
    // The promises end here; the operations stay in the durable outbox, and the next client
    // on the same storage sends them (their outcomes then arrive on its `restored$`).
    // Made only when a promise needs it: an Error's stack trace is most of a close's cost.
    const err = waiters.size > 0 ? reason() : undefined;
    for (const w of waiters.values()) w.reject(err!);
    waiters.clear();
    opWaiters = 0;
    // Children of the connection actor: they end with it; their state says unsubscribed.
    for (const a of subActors.values()) a.send({ type: 'UNSUBSCRIBE' });
    stopWatching?.();
    await Promise.all([...adopted].map((c) => c.close()));
    // Closed before the storage was ready: init writes what send() accepted once it holds the
    // storage (fileStorage: the lock, ≤ its `stale` + 1 s), then releases it; wait for that.
    if (!ready) await loaded.catch(() => 0);
    // The cursors' last write, now and once (a throttled one would otherwise land after close()
    // resolved, maybe over a newer client's), before the storage is released.
    void guarded(() => channels.close());
    try {
      await releaseLock?.();
    } catch (lockErr) {
      storageFailed(lockErr);
    }
    stateSubject.next('closed');
    streams.close();
    stateSubject.complete();
    subscriptionsSubject?.complete();
  };

  const send = (op: Op): Promise<Result> =>
    new Promise<Result>((resolve, reject) => {
      if (closed) return reject(new SyncError('closed', 'the client is closed'));
      if (waiters.size >= maxQueue) {
        return reject(new SyncError('queue_full', `the outbox holds ${maxQueue} operations`));
      }
      // An operation travels as JSON (and is stored as JSON): one that cannot be turned into it
      // is refused here, before it can enter the outbox and jam every later one.
      const json = toJson(op);
      if (typeof json !== 'string') return reject(new SyncError('bad_request', json.problem));
      const key = nextKey++;
      const n = nextOp++;
      // The outbox keeps `json`, the text the SYN carries: changing `op` later changes
      // neither (README "Operations are JSON").
      entries.set(key, { key: `${instance}:o${n}`, at: Date.now(), n, json });
      enqueue(
        { key, kind: 'op', op, json },
        { kind: 'op', resolve: resolve as (v: unknown) => void, reject },
      );
      setPending();
    });

  streams.sendOp = send;

  batched(() => {
    for (const [name, opts] of Object.entries(options.channels ?? {})) {
      if (!isValidChannel(name)) throw new TypeError(`syncwire: bad channel name ${JSON.stringify(name)}`);
      const problem =
        opts && typeof opts === 'object'
          ? cursorProblem(opts as Record<string, unknown>)
          : 'must be an object';
      if (problem) throw new TypeError(`syncwire: channels.${name}: ${problem}`);
      channels.add(name, opts);
      subActor(name).send({ type: 'SUBSCRIBE' });
    }
  });
  if (channels.size > 0) resubscribe(channels.names, false);

  // The stream properties (and `pending`) are FACADE's getters, over `streams`.
  const client: ClientObject<Op, Result> = {
    __proto__: FACADE,
    // First: a computed key after the plain ones gives each client object a hidden class of its own.
    [STREAMS]: streams,
    send,
    state$,
    subscriptions$,
    subscriptionState(channel) {
      const a = subActors.get(channel);
      return a ? (subscriptionStateOf(a.getSnapshot().value) as SubscriptionState) : 'unsubscribed';
    },
    loaded,
    on(event, handler) {
      const stream: Observable<unknown> =
        event === 'state'
          ? state$
          : event === 'subscriptions'
            ? subscriptions$
            : streams.subject(EVENT_STREAM[event as Exclude<keyof EventMap, 'state' | 'subscriptions'>]);
      const sub = stream.subscribe(handler as (v: unknown) => void);
      return () => sub.unsubscribe();
    },
    async subscribe(channel, opts = {}) {
      if (closed) throw new SyncError('closed', 'the client is closed');
      if (!isValidChannel(channel)) throw new SyncError('bad_request', `bad channel name`);
      // Checked before the channel is registered: a cursor the server refuses would otherwise
      // ride along in every later re-SUB and poll, and take the other channels down with it.
      const problem =
        opts && typeof opts === 'object'
          ? cursorProblem(opts as Record<string, unknown>)
          : 'options must be an object';
      if (problem) throw new SyncError('bad_request', `${problem} (subscribe ${channel})`);
      // A SUB naming the channel already waits (the `channels` option or another subscribe()
      // before the socket opened, a subscribe() called twice): this call joins it rather than
      // sending a second one (PROTOCOL §5, one SUB per channel). Joined when it has not gone on
      // the wire yet (it will carry these options), or when these options ask for nothing
      // (no `since` / `rewind` / `snapshot`) and the channel is subscribed already.
      const plain = opts.since === undefined && opts.rewind === undefined && !opts.snapshot;
      const pendingSub = subPromises.get(channel);
      const join =
        pendingSub !== undefined &&
        !refusals.has(channel) &&
        ((plain && channels.has(channel)) || !pendingSub.sent.has(channel));
      if (!(join && plain && channels.has(channel))) channels.add(channel, opts);
      refusals.delete(channel);
      subActor(channel).send({ type: 'SUBSCRIBE' });
      // The snapshot may come in the answer to another SUB than this one: a SUB of the
      // `channels` option (or a re-SUB) still queued when this call re-registered the channel
      // carries `snapshot: true` when it goes on the wire, and this call's own SUB then
      // resumes from the snapshot's seq. The result still carries the snapshot (README
      // "Replay"): the last one `snapshots$` emitted for the channel since this call.
      let seen: SnapshotEvent | undefined;
      const watch = opts.snapshot
        ? streams.subject('snapshots').subscribe((s: SnapshotEvent) => {
            if (s.channel === channel) seen = s;
          })
        : undefined;
      let body: { channels?: Record<string, unknown> };
      try {
        body = (await (join ? pendingSub.p : requestSub([channel], false))) as {
          channels?: Record<string, unknown>;
        };
      } finally {
        watch?.unsubscribe();
      }
      const entry = entryOf(body.channels, channel);
      if (!entry) {
        if (!channels.has(channel))
          throw new SyncError('closed', `unsubscribed from ${channel} before its SUB was answered`);
        throw new SyncError('bad_response', `SUB response names no ${channel}`);
      }
      if (isChannelRefusal(entry)) {
        // `unsubscribed`: the server ended it (server.unsubscribe) before this SUB went out.
        const code = (entry.error.code as string) === 'unsubscribed' ? 'closed' : entry.error.code;
        throw new SyncError(code, entry.error.message);
      }
      const state = entry as ChannelState;
      if (opts.snapshot && state.snapshot === undefined && seen && seen.epoch === state.epoch)
        return { ...state, snapshot: { seq: seen.seq, data: seen.data } };
      return state;
    },
    async unsubscribe(channel) {
      // After close() every subscription is over already; a refused one has nothing on the server.
      tell(channel, { type: 'UNSUBSCRIBE' });
      if (closed || !channels.has(channel)) {
        if (!closed) forget(channel);
        return;
      }
      channels.remove(channel);
      held$.delete(channel);
      forget(channel);
      releaseHeld();
      await new Promise((resolve, reject) => sendUns([channel], false, { resolve, reject }));
    },
    cursors: () => channels.snapshot(),
    async close() {
      await shutdown(CLOSED);
    },
  };
  return client as unknown as SyncClient<Op, Result>;
}

/** The chart's flat states in which requests travel, and are answered, on the socket. */
const onSocket = (s: ConnectionState) => s === 'open' || s === 'awaitingAck' || s === 'awaitingSyn';

/** What `close()` rejects the pending promises with. */
const CLOSED = () => new SyncError('closed', 'the client was closed before this settled');

/** The chart's event for a platform signal. */
function signalEvent(sig: NetworkSignal): { type: 'NETWORK_ONLINE' | 'NETWORK_OFFLINE' | 'VISIBLE' } {
  if (sig === 'online') return { type: 'NETWORK_ONLINE' };
  if (sig === 'offline') return { type: 'NETWORK_OFFLINE' };
  return { type: 'VISIBLE' };
}
