/**
 * `createSyncClient`: the RxJS facade over the connection statechart. Application code
 * touches this file's API only: `send`, `send$`, the result streams, `subscribe`, `close`.
 * It keeps the outbox's promises, the channel cursors and the storage; the machine
 * (machines/connection.ts) decides everything about timing and transports.
 */
import { BehaviorSubject, distinctUntilChanged, type Observable, Subject } from 'rxjs';
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
  type QueueItem,
} from '../../machines/connection.js';
import {
  type ChannelState,
  isValidChannel,
  type MsgEnvelope,
  randomId,
  SyncError,
} from '../protocol/index.js';
import { ChannelCursors, type SubscribeOptions } from './channels.js';
import { memoryStorage, type SyncStorage } from './storage.js';
import {
  deriveHttpUrl,
  type FaultSwitches,
  httpActor,
  socketActor,
  type WebSocketConstructor,
  type WebSocketLike,
} from './transports.js';

export type { ConnectionState, FailureKind } from '../../machines/connection.js';
export { connectionMachine, flatState, STATE_NAMES } from '../../machines/connection.js';
export type { ChannelState, NakCode, SyncErrorCode } from '../protocol/index.js';
export { SyncError } from '../protocol/index.js';
export type { SubscribeOptions } from './channels.js';
export { memoryStorage, type SyncStorage, webStorage } from './storage.js';
export type { FaultSwitches, WebSocketConstructor, WebSocketLike } from './transports.js';

export interface SyncClientOptions {
  /**
   * WebSocket endpoint, e.g. `wss://example.org/sync`. Several URLs (server processes) are
   * tried in turn on each redial.
   */
  url: string | string[];
  /** HTTP endpoint for the fallback. @default `url` with ws→http, wss→https */
  httpUrl?: string | string[];
  /** T, in milliseconds: every timeout of the statechart derives from it. @default 15000 */
  timeout?: number;
  /** Operations per SYN. @default 100 */
  maxBatch?: number;
  /** Operations the outbox holds before `send()` rejects with `queue_full`. @default 10000 */
  maxQueue?: number;
  /** Polling period while degraded to HTTP. @default timeout */
  pollInterval?: number;
  /** Upper bound of the redial and HTTP retry backoff. @default 30000 */
  maxBackoff?: number;
  /** Stable client identity for dedupe. @default the stored one, else a random one (then stored) */
  clientId?: string;
  /** Channels to subscribe to at once, with their cursors. @default {} */
  channels?: Record<string, SubscribeOptions>;
  /** Keeps clientId and cursors across reloads. @default memoryStorage() */
  storage?: SyncStorage;
  /** Prefix of the storage keys, for several clients in one storage. @default 'syncwire' */
  storageKey?: string;
  /** WebSocket implementation (Node 20 has none: pass `ws`). @default globalThis.WebSocket */
  WebSocket?: WebSocketConstructor;
  /** fetch implementation. @default globalThis.fetch */
  fetch?: typeof fetch;
  /** Extra query parameters on the socket URL (e.g. a token). @default {} */
  params?: Record<string, string>;
  /** Extra headers on HTTP requests. @default {} */
  headers?: Record<string, string>;
  /** XState inspection observer (see `syncwire/inspect`). @default none */
  inspect?: Observer<InspectionEvent> | ((event: InspectionEvent) => void);
  /** Telemetry hook: called with every `failures$` event (send them to Sentry). @default none */
  onFailure?: (failure: Failure) => void;
  /** Jitter source for backoff. @default Math.random */
  random?: () => number;
  /**
   * The clock every named delay of the statechart runs on (XState's `Clock`). Tests pass
   * XState's `SimulatedClock` or their own. @default the platform's setTimeout
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

/** One MSG as the app sees it. */
export interface ChannelMessage {
  channel: string;
  seq: number;
  epoch: string;
  payload: unknown;
  replay: boolean;
}

export interface ResetEvent {
  channel: string;
  epoch: string;
}

const LISTS = ['changes', 'successes', 'allowed', 'disallowed', 'errors'] as const;
type ListName = (typeof LISTS)[number];

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
};

export interface SyncClient<Op = unknown, Result = unknown> {
  /** Send one operation; resolves with its own result, or rejects with a `SyncError`. */
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
  /** Operations from `send$` that were rejected. */
  readonly rejected$: Observable<{ op: Op; error: SyncError }>;
  on<K extends keyof EventMap>(event: K, handler: (value: EventMap[K]) => void): () => void;
  subscribe(channel: string, opts?: SubscribeOptions): Promise<ChannelState>;
  unsubscribe(channel: string): Promise<void>;
  /** Current cursors, per channel. */
  cursors(): Record<string, { epoch?: string; seq?: number }>;
  readonly clientId: string;
  /** Current flat state. */
  readonly state: ConnectionState;
  /** Operations waiting in the outbox or in flight. */
  readonly pending: number;
  close(): Promise<void>;
  readonly actor: ConnectionActor;
  /** Fault switches and a socket killer, for the playground and chaos testing. */
  readonly debug: { faults: FaultSwitches; killSocket(): boolean };
}

interface Waiter {
  resolve(value: unknown): void;
  reject(err: SyncError): void;
  /** For SUB/UNS: the channels it named. */
  channels?: string[];
  kind: QueueItem['kind'];
}

/** Defaults, in one place. */
const DEFAULTS = {
  timeout: 15_000,
  maxBatch: 100,
  maxQueue: 10_000,
  maxBackoff: 30_000,
  storageKey: 'syncwire',
};

export function createSyncClient<Op = unknown, Result = unknown>(
  options: SyncClientOptions,
): SyncClient<Op, Result> {
  const timeout = options.timeout ?? DEFAULTS.timeout;
  const maxBatch = options.maxBatch ?? DEFAULTS.maxBatch;
  const maxQueue = options.maxQueue ?? DEFAULTS.maxQueue;
  const storage = options.storage ?? memoryStorage();
  const storageKey = options.storageKey ?? DEFAULTS.storageKey;
  const urls = Array.isArray(options.url) ? options.url : [options.url];
  if (urls.length === 0) throw new TypeError('syncwire: url is required');
  const httpUrls = options.httpUrl
    ? Array.isArray(options.httpUrl)
      ? options.httpUrl
      : urls.map(() => options.httpUrl as string)
    : urls.map(deriveHttpUrl);
  const WS = options.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
  if (!WS)
    throw new TypeError('syncwire: no WebSocket implementation; pass options.WebSocket (e.g. from "ws")');
  const fetchImpl = options.fetch ?? globalThis.fetch?.bind(globalThis);
  if (!fetchImpl) throw new TypeError('syncwire: no fetch implementation; pass options.fetch');

  const clientId = options.clientId ?? storage.get(`${storageKey}:clientId`) ?? randomId('c');
  storage.set(`${storageKey}:clientId`, clientId);

  const faults: FaultSwitches = { dropAcks: false, blackhole: false, blockHttp: false };
  let liveSocket: WebSocketLike | null = null;
  const transport = {
    urls,
    httpUrls,
    WebSocket: WS,
    fetch: fetchImpl,
    params: options.params ?? {},
    headers: options.headers ?? {},
    faults,
    onSocket: (ws: WebSocketLike | null) => {
      liveSocket = ws;
    },
  };
  const cursor = { index: 0 };
  const machine = connectionMachine.provide({
    actors: {
      socket: socketActor(transport, cursor),
      http: httpActor(transport, cursor, () => clientId),
    },
  });

  const lists = Object.fromEntries(LISTS.map((n) => [n, new Subject<unknown[]>()])) as Record<
    ListName,
    Subject<unknown[]>
  >;
  const messages$ = new Subject<ChannelMessage>();
  const failures$ = new Subject<Failure>();
  const resets$ = new Subject<ResetEvent>();
  const rejected$ = new Subject<{ op: Op; error: SyncError }>();
  const channels = new ChannelCursors(storage, `${storageKey}:cursors`);
  const waiters = new Map<number, Waiter>();
  let nextKey = 1;
  let closed = false;
  let pollQueued = false;

  const inspect = options.inspect;
  const actor = createActor(machine, {
    input: {
      clientId,
      timeout,
      maxBatch,
      pollInterval: options.pollInterval ?? timeout,
      maxBackoff: options.maxBackoff ?? DEFAULTS.maxBackoff,
      random: options.random,
    },
    inspect,
    ...(options.clock ? { clock: options.clock } : {}),
  });
  const stateSubject = new BehaviorSubject<ConnectionState>('connecting');
  const state$ = stateSubject.pipe(distinctUntilChanged());
  actor.subscribe({
    next: (snap) => stateSubject.next(flatState(snap)),
    error: () => stateSubject.next('closed'),
  });

  /** Results and MSG payloads feed the list streams under their keys. */
  const fanOutLists = (value: unknown) => {
    if (!value || typeof value !== 'object') return;
    for (const name of LISTS) {
      const list = (value as Record<string, unknown>)[name];
      if (Array.isArray(list) && list.length > 0) lists[name].next(list);
    }
  };

  // Operations sent in the same tick reach the machine as one SEND: one macrostep and one
  // copy of the outbox per tick, not per operation (a loop of send() was O(n²) in the outbox).
  let burst: QueueItem[] = [];
  const flushBurst = () => {
    if (burst.length === 0) return;
    const items = burst;
    burst = [];
    if (!closed) actor.send({ type: 'SEND', items });
  };
  const enqueue = (item: QueueItem, waiter: Waiter, front = false) => {
    waiters.set(item.key, waiter);
    if (item.kind === 'op' && !front) {
      if (burst.length === 0) queueMicrotask(flushBurst);
      burst.push(item);
      return;
    }
    // A SUB/UNS keeps its place after the operations sent before it.
    flushBurst();
    actor.send({ type: 'SEND', item, front });
  };

  const requestSub = (names: string[], front: boolean, poll = false): Promise<unknown> =>
    new Promise((resolve, reject) => {
      if (names.length === 0) return resolve({ channels: {} });
      const payload = channels.subPayload(names);
      const key = nextKey++;
      if (poll) pollQueued = true;
      enqueue(
        { key, kind: 'SUB', payload },
        {
          kind: 'SUB',
          channels: names,
          resolve: (v) => {
            if (poll) pollQueued = false;
            resolve(v);
          },
          reject: (e) => {
            if (poll) pollQueued = false;
            reject(e);
          },
        },
        front,
      );
    });

  const resubscribe = (names: string[], front: boolean, poll = false) => {
    requestSub(names, front, poll).catch(() => {
      // A refused re-SUB already surfaced as a failure; the next reconnect tries again.
    });
  };

  const settle = (e: Extract<ConnectionEmitted, { type: 'settled' }>) => {
    const ws = e.keys.map((k) => waiters.get(k));
    for (const k of e.keys) waiters.delete(k);
    if ('error' in e) {
      const err = new SyncError(e.error.code, e.error.message, { id: e.id });
      for (const w of ws) {
        if (w?.channels) channels.subFailed(w.channels);
        w?.reject(err);
      }
      return;
    }
    if (e.request === 'SYN') {
      if (e.payload.length !== e.keys.length) {
        const err = new SyncError(
          'bad_response',
          `server answered ${e.payload.length} results for ${e.keys.length} operations`,
          { id: e.id },
        );
        for (const w of ws) w?.reject(err);
        return;
      }
      e.payload.forEach((result, i) => {
        fanOutLists(result);
        ws[i]?.resolve(result);
      });
      return;
    }
    // SUB / UNS: one waiter, payload [{ channels: {…} }] or [{}].
    const w = ws[0];
    const body = (e.payload[0] ?? {}) as { channels?: Record<string, ChannelState> };
    if (e.request === 'SUB' && w?.channels) {
      const { resets, resub } = channels.onSubResponse(w.channels, body.channels);
      for (const r of resets) resets$.next(r);
      if (resub.length > 0) resubscribe(resub, true);
    }
    w?.resolve(body);
  };

  actor.on('*', (e: ConnectionEmitted) => {
    switch (e.type) {
      case 'settled':
        settle(e);
        break;
      case 'message': {
        const m = e.frame as MsgEnvelope;
        const verdict = channels.onMessage(m);
        if (verdict === 'deliver') {
          fanOutLists(m.payload);
          messages$.next({
            channel: m.channel,
            seq: m.seq,
            epoch: m.epoch,
            payload: m.payload,
            replay: m.replay === true,
          });
        } else if (verdict === 'gap') resubscribe([m.channel], true);
        break;
      }
      case 'failure': {
        const f: Failure = { kind: e.kind, state: stateSubject.value, at: Date.now() };
        if (e.code !== undefined) f.code = e.code;
        if (e.reason !== undefined) f.reason = e.reason;
        failures$.next(f);
        try {
          options.onFailure?.(f);
        } catch {
          // A telemetry hook must never break the connection.
        }
        break;
      }
      case 'socketReady':
        // A new (or recovered) socket carries no subscriptions: re-SUB from the cursors first.
        if (channels.names.length > 0) resubscribe(channels.names, true);
        break;
      case 'poll':
        if (channels.names.length > 0 && !pollQueued) resubscribe(channels.names, false, true);
        break;
    }
  });

  actor.start();

  const send = (op: Op): Promise<Result> =>
    new Promise<Result>((resolve, reject) => {
      if (closed) return reject(new SyncError('closed', 'the client is closed'));
      if (waiters.size >= maxQueue) {
        return reject(new SyncError('queue_full', `the outbox holds ${maxQueue} operations`));
      }
      const key = nextKey++;
      enqueue({ key, kind: 'op', op }, { kind: 'op', resolve: resolve as (v: unknown) => void, reject });
    });

  const send$ = new Subject<Op>();
  send$.subscribe((op) => {
    send(op).catch((error: SyncError) => rejected$.next({ op, error }));
  });

  for (const [name, opts] of Object.entries(options.channels ?? {})) {
    if (!isValidChannel(name)) throw new TypeError(`syncwire: bad channel name ${JSON.stringify(name)}`);
    channels.add(name, opts);
  }
  if (channels.names.length > 0) resubscribe(channels.names, false);

  const streams: { [K in keyof EventMap]: Observable<EventMap[K]> } = {
    ...lists,
    message: messages$,
    state: state$,
    failure: failures$,
    reset: resets$,
  };

  return {
    send,
    send$,
    changes$: lists.changes.asObservable(),
    successes$: lists.successes.asObservable(),
    allowed$: lists.allowed.asObservable(),
    disallowed$: lists.disallowed.asObservable(),
    errors$: lists.errors.asObservable(),
    messages$: messages$.asObservable(),
    state$,
    failures$: failures$.asObservable(),
    resets$: resets$.asObservable(),
    rejected$: rejected$.asObservable(),
    on(event, handler) {
      const sub = (streams[event] as Observable<unknown>).subscribe(handler as (v: unknown) => void);
      return () => sub.unsubscribe();
    },
    async subscribe(channel, opts = {}) {
      if (closed) throw new SyncError('closed', 'the client is closed');
      if (!isValidChannel(channel)) throw new SyncError('bad_request', `bad channel name`);
      channels.add(channel, opts);
      const body = (await requestSub([channel], false)) as { channels?: Record<string, ChannelState> };
      const entry = body.channels?.[channel];
      if (!entry) throw new SyncError('bad_response', `SUB response names no ${channel}`);
      return entry;
    },
    async unsubscribe(channel) {
      if (!channels.has(channel)) return;
      channels.remove(channel);
      await new Promise((resolve, reject) => {
        const key = nextKey++;
        enqueue({ key, kind: 'UNS', payload: { channels: [channel] } }, { kind: 'UNS', resolve, reject });
      });
    },
    cursors: () => channels.snapshot(),
    clientId,
    get state() {
      return stateSubject.value;
    },
    get pending() {
      let n = 0;
      for (const w of waiters.values()) if (w.kind === 'op') n++;
      return n;
    },
    async close() {
      if (closed) return;
      closed = true;
      actor.send({ type: 'CLOSE' });
      const err = new SyncError('closed', 'the client was closed before this settled');
      for (const w of waiters.values()) w.reject(err);
      waiters.clear();
      stateSubject.next('closed');
      for (const s of [...Object.values(lists), messages$, failures$, resets$, rejected$, send$])
        s.complete();
      stateSubject.complete();
    },
    actor,
    debug: {
      faults,
      killSocket() {
        if (!liveSocket) return false;
        // Simulate an abrupt drop: the socket's close event is what the machine sees.
        const s = liveSocket as WebSocketLike & { terminate?: () => void };
        if (typeof s.terminate === 'function') s.terminate();
        else s.close(4000, 'killed by debug.killSocket');
        return true;
      },
    },
  };
}
