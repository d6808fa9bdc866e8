/**
 * The connection statechart: the whole client lifecycle of syncwire in one XState v5 machine.
 *
 * Pure: it opens no socket and sets no timer of its own. Every timeout is a named delay
 * derived from T (`context.timeout`); the socket and HTTP transports are actors the machine
 * invokes by name (`socket`, `http`), and the client supplies the real ones with
 * `machine.provide()`. The machine tells the client what happened through emitted events
 * (`settled`, `message`, `revoked`, `failure`, `poll`, `socketReady`); see `ConnectionEmitted`.
 *
 * Flat names reported by `state$` (see `flatState`): connecting, open, awaitingAck,
 * awaitingSyn, degraded, rePinging, closed.
 */
import {
  type ActorRefFrom,
  assign,
  cancel,
  emit,
  enqueueActions,
  fromCallback,
  fromPromise,
  raise,
  type SnapshotFrom,
  sendTo,
  setup,
} from 'xstate';
import type { NakCode, Publication, ServerEnvelope } from '../src/protocol/index.js';

/** The names `state$` emits. */
export const STATE_NAMES = [
  'connecting',
  'open',
  'awaitingAck',
  'awaitingSyn',
  'degraded',
  'rePinging',
  'closed',
] as const;
export type ConnectionState = (typeof STATE_NAMES)[number];

/**
 * An entry of the outbox: one operation, one channel request (which travels alone), or a
 * batch formed by an earlier client instance and restored from storage (`kind: 'batch'`): it
 * is sent as it is, with its own `id` and exactly its `ops`, so that the server's dedupe
 * recognises it. `key` of a batch is its first key; `keys` are the keys of its operations.
 */
export type QueueItem =
  /** `json`: the operation as JSON, made once by `send()` and written as it is (optional). */
  | { key: number; kind: 'op'; op: unknown; json?: string }
  | { key: number; kind: 'SUB' | 'UNS'; payload: unknown }
  | { key: number; kind: 'batch'; id: string; ops: unknown[]; keys: number[] };

/** The request on the wire: it keeps its id across every resend, on either transport. */
export interface InFlight {
  id: string;
  type: 'SYN' | 'SUB' | 'UNS';
  payload: unknown;
  /** Outbox keys of the items it carries, so the client can settle them. */
  keys: number[];
  /** Transport it was last sent on. */
  via: 'ws' | 'http';
  /**
   * `payload` already as JSON, when every operation it carries came with its `json`: the
   * transports write it as it is instead of serializing the operations again.
   */
  json?: string;
}

/**
 * What the `http` actor resolves with for every HTTP answer. It rejects only when no answer
 * came (a network error), which the chart retries like a 5xx.
 */
export type HttpOutcome =
  | { kind: 'reply'; frames: ServerEnvelope[]; status: number }
  | { kind: 'retry'; reason: string; status?: number; retryAfterMs?: number }
  /** Refused with 401 twice in a row (the second time after the credentials were resolved again). */
  | { kind: 'unauthorized'; reason: string };

/** Failure kinds reported once per socket failure (telemetry). */
export type FailureKind =
  | 'dial_error'
  | 'dial_timeout'
  | 'close'
  | 'ack_timeout'
  | 'syn_timeout'
  | 'ping_timeout'
  | 'http_error'
  | 'bad_frame'
  /** The client's storage could not be read or written (reported by the client, not the chart). */
  | 'storage'
  /** Refused (401) twice in a row, the second time with freshly resolved credentials: the client stops. */
  | 'unauthorized';

export interface ConnectionInput {
  clientId: string;
  /**
   * The random part of this instance's request ids: ids are `${instance}:${n}`, n from 1.
   * Must differ between every instance that uses the same clientId (the server dedupes on
   * `(clientId, id)`). @default 16 hex digits (64 bits) from `crypto.getRandomValues`
   */
  instance?: string;
  /** T, in milliseconds. */
  timeout: number;
  maxBatch: number;
  /**
   * Bytes of operations per `SYN`, counted as the length of each operation's JSON (`QueueItem`
   * `json`; UTF-16 code units: a byte each for ASCII text, up to 3 bytes each otherwise): a run
   * is cut before the operation that would pass it; an operation alone over it goes alone.
   * @default 262144 (256 KiB: under the reference server's `maxPayloadBytes`, 1 MiB, even at
   * 3 bytes per unit)
   */
  maxBatchBytes?: number;
  /** Polling period while degraded. */
  pollInterval: number;
  /** Upper bound of the redial and HTTP retry backoff. */
  maxBackoff: number;
  /** Source of jitter; tests pass a fixed one. */
  random?: () => number;
  /**
   * Opaque to the chart: handed as `io` to the invoked `socket` and `http` actors, so that a
   * machine provided once can serve many clients (the client passes its transport here).
   */
  io?: unknown;
}

/**
 * What the input fixed when the actor was made: the chart reads it and never changes it. One
 * object in the context, not six fields of it (see `ConnectionContext`).
 */
export interface ConnectionSettings {
  /** `ConnectionInput.instance` (or the random default). */
  instance: string;
  maxBatch: number;
  /** `ConnectionInput.maxBatchBytes` (or its default). */
  maxBatchBytes: number;
  pollInterval: number;
  maxBackoff: number;
  random: () => number;
  /** `ConnectionInput.io`, passed through to the invoked actors. */
  io: unknown;
}

/**
 * The chart's context. XState copies it on every `assign` with `Object.assign({}, context,
 * update)`; V8 (Node 20) turns an object built that way with 20 or more properties into a
 * dictionary (measured: ~6 µs per copy at 20 fields, ~0.3 µs at 19 and fewer, and slower
 * property reads after), so the fields fixed at creation are grouped in `settings` and the
 * context stays well below that (15 fields). Keep it so when adding fields (issue 14).
 */
export interface ConnectionContext {
  clientId: string;
  /** T, in milliseconds. */
  timeout: number;
  settings: ConnectionSettings;
  /** Next request number; ids are `${instance}:${n}`. */
  counter: number;
  queue: QueueItem[];
  inflight: InFlight | null;
  /** Id of the ping awaiting its ACK. */
  pingId: string | null;
  /** Unacknowledged pings since the socket was last healthy. */
  missedPings: number;
  /** Whether a socket is open (it may be sick). */
  socketOpen: boolean;
  dialAttempt: number;
  httpAttempt: number;
  retryAfterMs: number | null;
  /**
   * The open socket is on probation: the `HEALTHY` timer (`healthyAfter`, 2T) is running. It
   * ends with `HEALTHY` (then `dialAttempt` resets) or with any failure (then it does not).
   */
  probation: boolean;
  /** What the platform last said about the network (`NETWORK_ONLINE` / `NETWORK_OFFLINE`). */
  online: boolean;
  /** The last dial (or HTTP request) was refused with 401 and the next one re-resolves the credentials. */
  authRetry: boolean;
}

export type ConnectionEvent =
  | { type: 'SEND'; item: QueueItem; front?: boolean }
  /** Several operations in order: the client coalesces the operations sent in one tick. */
  | { type: 'SEND'; items: QueueItem[]; front?: undefined }
  | { type: 'CLOSE' }
  | { type: 'WS.OPEN' }
  | { type: 'WS.DOWN'; code: number; reason: string; wasOpen: boolean }
  | { type: 'FRAME'; frame: ServerEnvelope }
  | { type: 'BAD_FRAME'; reason: string }
  /** Raised by the chart itself `healthyAfter` after a socket opened, unless it failed since. */
  | { type: 'HEALTHY' }
  /** The platform's network signals (`online` / `offline` events, or `client.network`). */
  | { type: 'NETWORK_ONLINE' }
  | { type: 'NETWORK_OFFLINE' }
  /** The page became visible again (`visibilitychange`), or `client.network.visible()`. */
  | { type: 'VISIBLE' };

export type SettledEvent =
  | {
      type: 'settled';
      id: string;
      keys: number[];
      request: InFlight['type'];
      payload: unknown[];
      /** The response SYN's `published` (docs/consistency.md), when the batch published. */
      published?: Publication[];
    }
  | {
      type: 'settled';
      id: string;
      keys: number[];
      request: InFlight['type'];
      error: { code: NakCode; message: string };
    };

export type ConnectionEmitted =
  | SettledEvent
  | { type: 'message'; frame: Extract<ServerEnvelope, { type: 'MSG' }> }
  /** A server `UNS`: the server ended subscriptions (PROTOCOL §3 rule 11). */
  | { type: 'revoked'; frame: Extract<ServerEnvelope, { type: 'UNS' }> }
  | { type: 'failure'; kind: FailureKind; code?: number; reason?: string }
  | { type: 'poll' }
  | { type: 'socketReady' }
  /**
   * A SYN was formed from queued operations (not a restored batch): emitted before it is sent,
   * so the client can persist its id and members.
   */
  | { type: 'batched'; id: string; keys: number[] };

/** Commands the machine sends to its `socket` actor. */
export type SocketCommand =
  /** Open a socket; `refresh`: the last dial was refused with 401, resolve credentials with `refresh: true`. */
  { type: 'DIAL'; refresh?: boolean } | { type: 'DROP' } | { type: 'SEND'; frame: OutgoingFrame };

/** A request as the transports get it: `json`, when present, is `payload` as JSON already. */
export interface OutgoingFrame {
  id: string;
  type: string;
  payload?: unknown;
  json?: string;
}

const frameOf = (e: ConnectionEvent) => (e.type === 'FRAME' ? e.frame : undefined);

/** Placeholder transports; the client provides the real ones with `machine.provide()`. */
const socketPlaceholder = fromCallback<SocketCommand, { clientId: string; io?: unknown }>(() => () => {});
/** What the `http` actor is given: the request to POST. */
export interface HttpInput {
  envelope: OutgoingFrame;
  /** `ConnectionInput.io`, unread by the chart. */
  io?: unknown;
}
const httpPlaceholder = fromPromise<HttpOutcome, HttpInput>(async () => {
  throw new Error('syncwire: no http actor was provided');
});

export const connectionMachine = setup({
  types: {
    context: {} as ConnectionContext,
    events: {} as ConnectionEvent,
    input: {} as ConnectionInput,
    emitted: {} as ConnectionEmitted,
  },
  actors: { socket: socketPlaceholder, http: httpPlaceholder },
  delays: {
    /** T: how long a dial may take. */
    connectTimeout: ({ context }) => context.timeout,
    /** T after the last ACK or response, the keepalive PNG goes. */
    keepalive: ({ context }) => context.timeout,
    /** T for a PNG's ACK. */
    pingTimeout: ({ context }) => context.timeout,
    /** T for a SYN's ACK. */
    ackTimeout: ({ context }) => context.timeout,
    /** T more, after the ACK, for the response (2T in all). */
    synTimeout: ({ context }) => context.timeout,
    /**
     * Redial backoff: min(maxBackoff, T/2 · 2^attempt) · jitter, jitter uniform in [0.5, 1]: the
     * upper bound is min(maxBackoff, T/2 · 2^attempt). `dialAttempt` resets only when a socket
     * stayed healthy for `healthyAfter`, so sockets that die young keep the backoff growing.
     */
    redialBackoff: ({ context }) =>
      Math.min(context.settings.maxBackoff, (context.timeout / 2) * 2 ** context.dialAttempt) *
      (0.5 + context.settings.random() / 2),
    /**
     * HTTP retry: min(maxBackoff, T/4 · 2^attempt) · jitter in [0.5, 1]; when the server gave a
     * Retry-After, that · jitter in [1, 1.5] (never earlier than asked, spread so that the
     * clients one overloaded server answered together do not come back together).
     */
    httpBackoff: ({ context }) =>
      context.retryAfterMs !== null
        ? context.retryAfterMs * (1 + context.settings.random() / 2)
        : Math.min(context.settings.maxBackoff, (context.timeout / 4) * 2 ** context.httpAttempt) *
          (0.5 + context.settings.random() / 2),
    /**
     * Polling beat while degraded (a sick socket is re-pinged on the same beat):
     * pollInterval · jitter in [0.5, 1], so the clients one restart dropped together do not poll
     * in lockstep. Upper bound: pollInterval.
     */
    pollInterval: ({ context }) => context.settings.pollInterval * (0.5 + context.settings.random() / 2),
    /** 2T: how long a socket must stay open with nothing failing before it counts healthy. */
    healthyAfter: ({ context }) => 2 * context.timeout,
    /** 2T for an HTTP request to be answered (one sync, request to response); then it is retried. */
    httpTimeout: ({ context }) => 2 * context.timeout,
  },
  guards: {
    hasQueued: ({ context }) => context.queue.length > 0,
    /** A SEND event whose first item is an operation (it starts a run of operations). */
    sendsOps: ({ event }) =>
      event.type === 'SEND' && ('items' in event ? event.items[0]?.kind === 'op' : event.item.kind === 'op'),
    hasInflight: ({ context }) => context.inflight !== null,
    noInflight: ({ context }) => context.inflight === null,
    hasWork: ({ context }) => context.inflight !== null || context.queue.length > 0,
    socketOpen: ({ context }) => context.socketOpen,
    canRePing: ({ context }) => context.socketOpen && context.missedPings < 3,
    lastPingMissedThrice: ({ context }) => context.missedPings >= 3,
    socketClosed: ({ context }) => !context.socketOpen,
    isAckForInflight: ({ context, event }) => {
      const f = frameOf(event);
      return f?.type === 'ACK' && f.id === context.inflight?.id;
    },
    isReplyForInflight: ({ context, event }) => {
      const f = frameOf(event);
      return (f?.type === 'SYN' || f?.type === 'NAK') && f.id !== null && f.id === context.inflight?.id;
    },
    isAckForPing: ({ context, event }) => {
      const f = frameOf(event);
      return f?.type === 'ACK' && f.id === context.pingId;
    },
    isAckOrReply: ({ event }) => {
      const f = frameOf(event);
      return f?.type === 'ACK' || f?.type === 'SYN';
    },
    httpRetry: ({ event }) => (event as unknown as { output: HttpOutcome }).output.kind === 'retry',
    httpUnauthorized: ({ event }) =>
      (event as unknown as { output: HttpOutcome }).output.kind === 'unauthorized',
    /** A dial refused with 401 (the upgrade's status), the first time: re-resolve and redial at once. */
    dialRefusedFirst: ({ context, event }) =>
      event.type === 'WS.DOWN' && !event.wasOpen && event.code === 401 && !context.authRetry,
    /** A dial refused with 401 again, right after the credentials were resolved afresh. */
    dialRefusedAgain: ({ context, event }) =>
      event.type === 'WS.DOWN' && !event.wasOpen && event.code === 401 && context.authRetry,
    isOffline: ({ context }) => !context.online,
  },
  actions: {
    enqueue: assign({ queue: ({ context, event }) => queued(context.queue, event) }),
    /**
     * Take the next request off the outbox: a restored batch as it is, a run of operations up
     * to maxBatch (announced with `batched` before it goes out), or one SUB/UNS.
     */
    takeBatch: enqueueActions(({ context, enqueue }) => {
      const taken = take(context, context.queue);
      if (!taken) return;
      enqueue.assign(taken.update);
      if (taken.batched) enqueue.emit(taken.batched);
    }),
    /**
     * `enqueue` then `takeBatch` in one context update, for a send of operations while `open`
     * (nothing queued, nothing in flight: `sendsOps`), so that it goes out in the same microstep
     * instead of through `open`'s `always`; `emitBatched` then announces the run taken. Built-in
     * `assign` and `emit`, not one `enqueueActions`: that one allocates an `enqueue` object with
     * nine closures and new action objects on every call (about a fifth of a chart round trip).
     */
    takeSent: assign(({ context, event }) => {
      const queue = queued(context.queue, event);
      return take(context, queue)?.update ?? { queue };
    }),
    /** The `batched` event for the run of operations `takeSent` just put in flight. */
    emitBatched: emit(({ context }) => ({
      type: 'batched' as const,
      id: context.inflight!.id,
      keys: context.inflight!.keys,
    })),
    /**
     * Send the request in flight on the socket, as it is (it was just taken off the outbox,
     * so it is marked `ws` already): one built-in `sendTo`, no `enqueueActions`.
     */
    sendTaken: sendTo('socket', ({ context }) => ({
      type: 'SEND' as const,
      frame: frameFor(context.inflight!),
    })),
    sendInflightOverWs: enqueueActions(({ context, enqueue }) => {
      const f = context.inflight;
      if (!f) return;
      // Already marked ws when just taken off the queue: no context copy then.
      if (f.via !== 'ws') enqueue.assign({ inflight: { ...f, via: 'ws' } });
      const frame: OutgoingFrame = { id: f.id, type: f.type, payload: f.payload };
      if (f.json !== undefined) frame.json = f.json;
      enqueue.sendTo('socket', { type: 'SEND', frame });
    }),
    markInflightHttp: assign({
      inflight: ({ context }) => (context.inflight ? { ...context.inflight, via: 'http' as const } : null),
    }),
    sendPing: enqueueActions(({ context, enqueue }) => {
      const id = `${context.settings.instance}:${context.counter}`;
      enqueue.assign({ counter: context.counter + 1, pingId: id });
      enqueue.sendTo('socket', { type: 'SEND', frame: { id, type: 'PNG' } });
    }),
    pingAcked: assign({ pingId: null, missedPings: 0 }),
    /** A sick socket that answered a ping again starts a new probation (unless one is running). */
    restartProbationIfIdle: enqueueActions(({ context, enqueue }) => {
      if (context.probation) return;
      enqueue.raise({ type: 'HEALTHY' }, { id: 'healthy', delay: 'healthyAfter' });
      enqueue.assign({ probation: true });
    }),
    endProbation: enqueueActions(({ context, enqueue }) => {
      if (!context.probation) return;
      enqueue.cancel('healthy');
      enqueue.assign({ probation: false });
    }),
    /** The socket stayed healthy for `healthyAfter`: the redial backoff starts over. */
    markHealthy: assign({ probation: false, dialAttempt: 0 }),
    setOnline: assign({ online: true }),
    setOffline: assign({ online: false }),
    markAuthRetry: assign({ authRetry: true }),
    failUnauthorized: emit(({ event }) => ({
      type: 'failure' as const,
      kind: 'unauthorized' as const,
      code: 401,
      reason:
        event.type === 'WS.DOWN'
          ? 'upgrade refused with 401 twice'
          : ((event as unknown as { output?: HttpOutcome }).output as { reason?: string } | undefined)
              ?.reason,
    })),
    pingMissed: assign({ pingId: null, missedPings: ({ context }) => context.missedPings + 1 }),
    /**
     * Settle the request in flight with the response or NAK in the event: `emitSettled` then
     * `clearInflight`, two built-in actions (only after `isReplyForInflight`, so both the frame
     * and the request are there). Not one `enqueueActions`: that allocates an `enqueue` object
     * with nine closures and new action objects on every call, on every round trip.
     */
    emitSettled: emit(({ context, event }) => settledFor(context.inflight!, frameOf(event)!)),
    clearInflight: assign({ inflight: null, httpAttempt: 0, retryAfterMs: null }),
    dial: sendTo('socket', ({ context }) => ({ type: 'DIAL' as const, refresh: context.authRetry })),
    drop: enqueueActions(({ context, enqueue }) => {
      enqueue.sendTo('socket', { type: 'DROP' });
      if (context.probation) enqueue.cancel('healthy');
      enqueue.assign({ socketOpen: false, pingId: null, probation: false });
    }),
    /**
     * A socket opened: one context update (probation starts with it), then `armHealthy`.
     * Built-in actions, not one `enqueueActions` with two `assign`s: each `assign` copies the
     * whole context and the snapshot, and `enqueueActions` allocates its `enqueue` helper on
     * every call (issue 14, connect row).
     */
    socketOpened: assign({
      socketOpen: true,
      missedPings: 0,
      pingId: null,
      authRetry: false,
      probation: true,
    }),
    /**
     * The probation timer, re-armed after `socketOpened`: `cancelHealthy` first, so that a timer
     * still armed (none should be: probation ends with every failure) is never doubled, then
     * `armHealthy` raises `HEALTHY` after `healthyAfter`.
     */
    cancelHealthy: cancel('healthy'),
    armHealthy: raise({ type: 'HEALTHY' }, { id: 'healthy', delay: 'healthyAfter' }),
    socketDown: enqueueActions(({ context, enqueue }) => {
      if (context.probation) enqueue.cancel('healthy');
      enqueue.assign({
        socketOpen: false,
        pingId: null,
        probation: false,
        dialAttempt: context.dialAttempt + 1,
      });
    }),
    socketReady: emit({ type: 'socketReady' as const }),
    poll: emit({ type: 'poll' as const }),
    /**
     * MSG frames and server UNS notices go to the client whatever the state; NAKs without id
     * are a lying or confused server.
     */
    onFrame: enqueueActions(({ event, enqueue }) => {
      const f = frameOf(event);
      if (f?.type === 'MSG') enqueue.emit({ type: 'message', frame: f });
      else if (f?.type === 'UNS') enqueue.emit({ type: 'revoked', frame: f });
      else if (f?.type === 'NAK' && f.id === null) {
        enqueue.emit({ type: 'failure', kind: 'bad_frame', reason: `${f.error.code}: ${f.error.message}` });
      }
    }),
    onBadFrame: emit(({ event }) => ({
      type: 'failure' as const,
      kind: 'bad_frame' as const,
      reason: event.type === 'BAD_FRAME' ? event.reason : 'bad frame',
    })),
    failClose: emit(({ event }) => ({
      type: 'failure' as const,
      kind: event.type === 'WS.DOWN' && !event.wasOpen ? ('dial_error' as const) : ('close' as const),
      code: event.type === 'WS.DOWN' ? event.code : undefined,
      reason: event.type === 'WS.DOWN' ? event.reason : undefined,
    })),
    failDialTimeout: emit({ type: 'failure' as const, kind: 'dial_timeout' as const }),
    failAckTimeout: emit({ type: 'failure' as const, kind: 'ack_timeout' as const }),
    failSynTimeout: emit({ type: 'failure' as const, kind: 'syn_timeout' as const }),
    failPingTimeout: emit({ type: 'failure' as const, kind: 'ping_timeout' as const }),
    /** Apply what an HTTP reply carried, in order: MSGs out, the response settles the batch. */
    applyHttpReply: enqueueActions(({ context, event, enqueue }) => {
      const out = (event as unknown as { output: HttpOutcome }).output;
      if (out.kind !== 'reply') return;
      let inflight = context.inflight;
      for (const f of out.frames) {
        if (f.type === 'MSG') enqueue.emit({ type: 'message', frame: f });
        else if ((f.type === 'SYN' || f.type === 'NAK') && inflight && f.id === inflight.id) {
          enqueue.emit(settledFor(inflight, f));
          inflight = null;
        }
      }
      if (inflight === null) enqueue.assign({ inflight: null, httpAttempt: 0, retryAfterMs: null });
      else {
        // A 200 without the response is a server that lies: retry the same id later.
        enqueue.assign({ httpAttempt: context.httpAttempt + 1, retryAfterMs: null });
        enqueue.emit({ type: 'failure', kind: 'http_error', reason: 'reply without a response' });
      }
    }),
    httpTimedOut: enqueueActions(({ context, enqueue }) => {
      enqueue.assign({ httpAttempt: context.httpAttempt + 1, retryAfterMs: null });
      enqueue.emit({ type: 'failure', kind: 'http_error', reason: 'no answer within 2T' });
    }),
    httpFailed: enqueueActions(({ context, event, enqueue }) => {
      const out = (event as unknown as { output?: HttpOutcome; error?: unknown }).output;
      const retryAfterMs = out?.kind === 'retry' ? (out.retryAfterMs ?? null) : null;
      const reason =
        out?.kind === 'retry' ? out.reason : String((event as { error?: unknown }).error ?? 'http failed');
      enqueue.assign({ httpAttempt: context.httpAttempt + 1, retryAfterMs });
      enqueue.emit({
        type: 'failure',
        kind: 'http_error',
        reason,
        code: out?.kind === 'retry' ? out.status : undefined,
      });
    }),
  },
}).createMachine({
  id: 'connection',
  context: ({ input }) => ({
    clientId: input.clientId,
    timeout: input.timeout,
    settings: {
      instance: input.instance ?? randomInstance(),
      maxBatch: input.maxBatch,
      maxBatchBytes: input.maxBatchBytes ?? MAX_BATCH_BYTES,
      pollInterval: input.pollInterval,
      maxBackoff: input.maxBackoff,
      random: input.random ?? Math.random,
      io: input.io,
    },
    counter: 1,
    queue: [],
    inflight: null,
    pingId: null,
    missedPings: 0,
    socketOpen: false,
    dialAttempt: 0,
    httpAttempt: 0,
    retryAfterMs: null,
    probation: false,
    online: true,
    authRetry: false,
  }),
  invoke: {
    id: 'socket',
    src: 'socket',
    input: ({ context }) => ({ clientId: context.clientId, io: context.settings.io }),
  },
  initial: 'connecting',
  on: {
    SEND: { actions: 'enqueue' },
    FRAME: { actions: 'onFrame' },
    BAD_FRAME: { actions: 'onBadFrame' },
    CLOSE: '.closed',
    HEALTHY: { actions: 'markHealthy' },
    NETWORK_ONLINE: { actions: 'setOnline' },
    NETWORK_OFFLINE: { actions: 'setOffline' },
  },
  states: {
    connecting: {
      entry: 'dial',
      on: {
        // `connecting` is only ever the initial state: no probation has started yet, so there is
        // no `healthy` timer to cancel first (issue 14, connect row: one cancel fewer per client).
        'WS.OPEN': {
          target: 'open',
          actions: ['socketOpened', 'armHealthy', 'socketReady'],
        },
        'WS.DOWN': [
          {
            guard: 'dialRefusedFirst',
            target: '#connection.degraded.socket.dialling',
            actions: ['socketDown', 'failClose', 'markAuthRetry'],
          },
          { target: 'degraded', actions: ['socketDown', 'failClose'] },
        ],
        // Offline: stop dialling until the network is back.
        NETWORK_OFFLINE: { target: 'degraded', actions: ['drop', 'setOffline'] },
      },
      after: { connectTimeout: { target: 'degraded', actions: ['drop', 'failDialTimeout'] } },
    },
    open: {
      initial: 'idle',
      always: [
        { guard: 'hasInflight', target: 'awaitingAck', actions: 'sendInflightOverWs' },
        { guard: 'hasQueued', target: 'awaitingAck', actions: ['takeBatch', 'sendInflightOverWs'] },
      ],
      on: {
        'WS.DOWN': { target: 'degraded', actions: ['socketDown', 'failClose'] },
        // Nothing is queued or in flight while open (the `always` above): a send of operations
        // goes out at once, queued and taken in this one microstep. Any other send (a SUB/UNS, a
        // restored batch, nothing) is queued by the root's handler and taken by the `always`.
        SEND: {
          guard: 'sendsOps',
          target: 'awaitingAck',
          actions: ['takeSent', 'emitBatched', 'sendTaken'],
        },
      },
      states: {
        idle: {
          on: {
            FRAME: { guard: 'isAckOrReply', target: 'idle', reenter: true },
            // The page came back to the foreground: check the socket now, not at the next keepalive.
            VISIBLE: { target: 'pinging', actions: 'sendPing' },
          },
          after: { keepalive: { target: 'pinging', actions: 'sendPing' } },
        },
        pinging: {
          on: { FRAME: { guard: 'isAckForPing', target: 'idle', actions: 'pingAcked' } },
          after: {
            pingTimeout: { target: '#connection.degraded', actions: ['pingMissed', 'failPingTimeout'] },
          },
        },
      },
    },
    awaitingAck: {
      on: {
        FRAME: [
          { guard: 'isAckForInflight', target: 'awaitingSyn' },
          { guard: 'isReplyForInflight', target: 'open', actions: ['emitSettled', 'clearInflight'] },
          { actions: 'onFrame' },
        ],
        'WS.DOWN': { target: 'degraded', actions: ['socketDown', 'failClose'] },
      },
      after: { ackTimeout: { target: 'degraded', actions: ['failAckTimeout'] } },
    },
    awaitingSyn: {
      on: {
        FRAME: [
          { guard: 'isReplyForInflight', target: 'open', actions: ['emitSettled', 'clearInflight'] },
          { actions: 'onFrame' },
        ],
        'WS.DOWN': { target: 'degraded', actions: ['socketDown', 'failClose'] },
      },
      after: { synTimeout: { target: 'degraded', actions: ['failSynTimeout'] } },
    },
    degraded: {
      type: 'parallel',
      // A socket that failed in any way is no longer on probation.
      entry: ['markInflightHttp', 'endProbation'],
      on: {
        // A late response on the socket still settles the batch (the server deduped the HTTP copy).
        FRAME: [
          { guard: 'isReplyForInflight', actions: ['emitSettled', 'clearInflight'] },
          { actions: 'onFrame' },
        ],
      },
      states: {
        http: {
          initial: 'idle',
          states: {
            idle: {
              always: [
                { guard: 'hasInflight', target: 'posting' },
                { guard: 'hasQueued', target: 'posting', actions: ['takeBatch', 'markInflightHttp'] },
              ],
            },
            posting: {
              invoke: {
                id: 'http',
                src: 'http',
                input: ({ context }) => {
                  const f = context.inflight!;
                  const envelope: OutgoingFrame = { id: f.id, type: f.type, payload: f.payload };
                  if (f.json !== undefined) envelope.json = f.json;
                  return { envelope, io: context.settings.io };
                },
                onDone: [
                  { guard: 'httpUnauthorized', target: '#connection.unauthorized' },
                  { guard: 'httpRetry', target: 'retryWait', actions: 'httpFailed' },
                  { target: 'settling', actions: 'applyHttpReply' },
                ],
                onError: { target: 'retryWait', actions: 'httpFailed' },
              },
              // The socket answered first (degraded's FRAME handler settled it): the HTTP copy is
              // moot, the server dedupes it.
              always: { guard: 'noInflight', target: 'idle' },
              // A request nobody answers (a half-open connection) must not hold the outbox: the
              // invoked request is aborted on exit and resent, same id, after the backoff.
              after: { httpTimeout: { target: 'retryWait', actions: 'httpTimedOut' } },
            },
            /** A reply settled the batch (→ idle) or lacked the response (→ retry). */
            settling: {
              always: [{ guard: 'hasInflight', target: 'retryWait' }, { target: 'idle' }],
            },
            retryWait: {
              always: { guard: 'noInflight', target: 'idle' },
              after: { httpBackoff: 'posting' },
            },
          },
        },
        poll: {
          initial: 'waiting',
          states: {
            waiting: { after: { pollInterval: { target: 'waiting', reenter: true, actions: 'poll' } } },
          },
        },
        socket: {
          initial: 'sick',
          states: {
            /** The socket is open but missed a ping or a reply. Each send, and each poll beat, re-pings it. */
            sick: {
              always: [
                { guard: 'lastPingMissedThrice', target: 'down', actions: 'drop' },
                { guard: 'socketClosed', target: 'down' },
              ],
              on: {
                // This handler replaces the root's for the event, so it enqueues too.
                SEND: { guard: 'canRePing', target: 'rePinging', actions: ['enqueue', 'sendPing'] },
                VISIBLE: { guard: 'canRePing', target: 'rePinging', actions: 'sendPing' },
                'WS.DOWN': { target: 'down', actions: ['socketDown', 'failClose'] },
              },
              after: { pollInterval: { guard: 'canRePing', target: 'rePinging', actions: 'sendPing' } },
            },
            rePinging: {
              on: {
                FRAME: {
                  guard: 'isAckForPing',
                  target: '#connection.open',
                  actions: ['pingAcked', 'restartProbationIfIdle', 'socketReady'],
                },
                'WS.DOWN': { target: 'down', actions: ['socketDown', 'failClose'] },
              },
              after: { pingTimeout: { target: 'sick', actions: ['pingMissed', 'failPingTimeout'] } },
            },
            /** No socket: wait out the backoff, then dial again; the network coming back skips it. */
            down: {
              always: { guard: 'isOffline', target: 'offline' },
              on: {
                NETWORK_ONLINE: { target: 'dialling', actions: 'setOnline' },
                NETWORK_OFFLINE: { target: 'offline', actions: 'setOffline' },
              },
              after: { redialBackoff: 'dialling' },
            },
            /** The platform says there is no network: no dialling until it says there is. */
            offline: {
              on: { NETWORK_ONLINE: { target: 'dialling', actions: 'setOnline' } },
            },
            dialling: {
              entry: 'dial',
              on: {
                'WS.OPEN': {
                  target: 'rePinging',
                  actions: ['socketOpened', 'cancelHealthy', 'armHealthy', 'sendPing'],
                },
                'WS.DOWN': [
                  { guard: 'dialRefusedAgain', target: '#connection.unauthorized' },
                  {
                    guard: 'dialRefusedFirst',
                    target: 'dialling',
                    reenter: true,
                    actions: ['socketDown', 'failClose', 'markAuthRetry'],
                  },
                  { target: 'down', actions: ['socketDown', 'failClose'] },
                ],
                NETWORK_OFFLINE: { target: 'offline', actions: ['drop', 'setOffline'] },
              },
              after: {
                connectTimeout: { target: 'down', actions: ['drop', 'socketDown', 'failDialTimeout'] },
              },
            },
          },
        },
      },
    },
    closed: { type: 'final', entry: 'drop' },
    /**
     * Refused twice in a row (401), the second time with credentials resolved afresh: the
     * client stops rather than redial forever; `state$` reports `closed`, pending sends reject
     * with `SyncError('unauthorized')`.
     */
    unauthorized: { type: 'final', entry: ['drop', 'failUnauthorized'] },
  },
});

/**
 * Random bytes for `randomInstance`, drawn 1,024 at a time: one `getRandomValues` call cost
 * ~30-40 µs in Node 20 whatever its size, a visible part of each `createSyncClient` (issue 14,
 * connect row). Each byte is handed out once.
 */
const INSTANCE_POOL = 1024;
let instancePool: Uint8Array | undefined;
let instanceAt = INSTANCE_POOL;

/** 64 random bits (platform crypto) as 16 hex digits: the default `instance` part of request ids. */
export function randomInstance(): string {
  if (instancePool === undefined || instanceAt + 8 > INSTANCE_POOL) {
    instancePool ??= new Uint8Array(INSTANCE_POOL);
    globalThis.crypto.getRandomValues(instancePool);
    instanceAt = 0;
  }
  let s = '';
  for (let i = instanceAt; i < instanceAt + 8; i++) s += instancePool[i]!.toString(16).padStart(2, '0');
  instanceAt += 8;
  return s;
}

/** `ConnectionInput.maxBatchBytes`'s default: 256 KiB of operations' JSON per `SYN`. */
export const MAX_BATCH_BYTES = 262_144;

/** The outbox after a `SEND` event (the same outbox for any other event). */
function queued(queue: QueueItem[], event: ConnectionEvent): QueueItem[] {
  if (event.type !== 'SEND') return queue;
  if ('items' in event) return queue.concat(event.items);
  return event.front ? [event.item, ...queue] : [...queue, event.item];
}

/**
 * The next request off `queue` (see the `takeBatch` action) as a context update, with the
 * `batched` event to emit for a run of operations; `null` when nothing can be taken.
 */
function take(
  context: ConnectionContext,
  queue: QueueItem[],
): { update: Partial<ConnectionContext>; batched?: Extract<ConnectionEmitted, { type: 'batched' }> } | null {
  const head = queue[0];
  if (!head || context.inflight) return null;
  if (head.kind === 'batch') {
    return {
      update: {
        queue: queue.slice(1),
        inflight: { id: head.id, type: 'SYN', payload: head.ops, keys: head.keys, via: 'ws' },
      },
    };
  }
  const id = `${context.settings.instance}:${context.counter}`;
  if (head.kind !== 'op') {
    return {
      update: {
        counter: context.counter + 1,
        queue: queue.slice(1),
        inflight: { id, type: head.kind, payload: head.payload, keys: [head.key], via: 'ws' },
      },
    };
  }
  const ops: unknown[] = [];
  const keys: number[] = [];
  let json: string | undefined = '[';
  let i = 0;
  const { maxBatch, maxBatchBytes } = context.settings;
  let bytes = 0;
  for (; i < queue.length && ops.length < maxBatch; i++) {
    const item = queue[i]!;
    if (item.kind !== 'op') break;
    // Bounded in bytes too (a frame the server refuses `too_large`, or closes 1009, would fail
    // every operation in it): an operation that would pass the budget starts the next SYN.
    const size = item.json === undefined ? 0 : item.json.length;
    if (i > 0 && bytes + size > maxBatchBytes) break;
    bytes += size;
    ops.push(item.op);
    keys.push(item.key);
    if (json !== undefined)
      json = item.json === undefined ? undefined : `${json}${i > 0 ? ',' : ''}${item.json}`;
  }
  const inflight: InFlight = { id, type: 'SYN', payload: ops, keys, via: 'ws' };
  if (json !== undefined) inflight.json = `${json}]`;
  return {
    update: { counter: context.counter + 1, queue: queue.slice(i), inflight },
    batched: { type: 'batched', id, keys },
  };
}

/**
 * The frame that carries `f` (its `json` when it has one): what `sendTaken` sends. Exported
 * for the client, which provides its own `sendTaken` (the same frame, written through the
 * socket actor's write handle).
 */
export function frameFor(f: InFlight): OutgoingFrame {
  const frame: OutgoingFrame = { id: f.id, type: f.type, payload: f.payload };
  if (f.json !== undefined) frame.json = f.json;
  return frame;
}

/** The `settled` event for `inflight` answered by `f` (object literals, no spread: once per round trip). */
function settledFor(inflight: InFlight, f: ServerEnvelope): SettledEvent {
  const { id, keys, type: request } = inflight;
  if (f.type === 'NAK') return { type: 'settled', id, keys, request, error: f.error };
  if (f.type !== 'SYN') return { type: 'settled', id, keys, request, payload: [] };
  return f.published
    ? { type: 'settled', id, keys, request, payload: f.payload, published: f.published }
    : { type: 'settled', id, keys, request, payload: f.payload };
}

export type ConnectionMachine = typeof connectionMachine;
export type ConnectionActor = ActorRefFrom<ConnectionMachine>;
export type ConnectionSnapshot = SnapshotFrom<ConnectionMachine>;

/** The flat name `state$` reports for a snapshot; deeper detail stays in the snapshot. */
export function flatState(snapshot: { value: unknown; status?: string }): ConnectionState {
  const v = snapshot.value;
  if (v === 'unauthorized') return 'closed';
  if (typeof v === 'string') return v as ConnectionState;
  if (v && typeof v === 'object') {
    if ('open' in v) return 'open';
    if ('degraded' in v) {
      const d = (v as { degraded: { socket?: unknown } }).degraded;
      return d.socket === 'rePinging' ? 'rePinging' : 'degraded';
    }
  }
  return 'closed';
}
