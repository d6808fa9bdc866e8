/**
 * One channel subscription of a syncwire client, as its own statechart (issue 11). The client
 * runs one actor of it per channel, as a child of the connection actor (same actor system),
 * so the inspector and the visualizer see it beside the connection chart.
 *
 * States (centrifuge-js's `Subscription` states are the model, plus the two syncwire needs):
 * - `unsubscribed`: not followed. Where a channel starts, and where `unsubscribe()` and
 *   `close()` leave it. Also after the server ended it with `server.unsubscribe()`.
 * - `subscribing`: a `SUB` naming it is on its way and the channel is not live yet (the first
 *   one, or the re-SUB after a socket was lost).
 * - `subscribed`: the server answered with the channel's state: messages flow in order.
 * - `resetting`: live, but catching up with a re-SUB from its cursor (a gap, more to poll),
 *   or answered `recovered: false` (history that could not be recovered): the app hears the
 *   reset on `resets$` while the channel is here, and it is `subscribed` again once the
 *   answer needs no further catch-up.
 * - `refused`: the server refused it (`forbidden`, `too_many_channels`, `server_error`) or
 *   revoked it. The client stops asking for it until the app calls `subscribe()` again;
 *   `context.error` says why.
 * - `forgotten` (final, internal): the client dropped an `unsubscribed` channel's actor; it
 *   is never reported (the channel reads `unsubscribed` from then on).
 *
 * A `SUB` that fails as a whole for another reason (`server_error`, `bad_response`, …) is
 * not a refusal: the channel stays where it was (`subscribing` / `resetting`) with
 * `context.error` set, in that state's `backoff` substate: a delayed transition (`subRetry`:
 * `timeout` ms, doubling with each failure in a row, capped at `maxBackoff`) takes it back to
 * `asking` and emits `retry`, and the client then sends the channel's `SUB` again. A `SUB`
 * sent for it meanwhile (a new socket's re-SUB, `subscribe()`, a catch-up) ends the wait at
 * once; so does leaving the state (`UNSUBSCRIBE`, a refusal, a grant). `GRANTED` clears the
 * error and the failure count. A failure with `retry: false` (a poll's answer: the next poll
 * asks again) sets the error without a wait.
 *
 * `subscribing` and `resetting` are compound (`asking` | `backoff`); what the client reports
 * is the top-level name (`subscriptionStateOf`), so the wait is not a state of its own for
 * the app.
 *
 * Pure: it sends nothing; the client drives it with events that mirror what happened on the
 * wire (PROTOCOL §3 rules 7 and 11, §5), and acts on its one emitted event, `retry`.
 */
import { type ActorRefFrom, type AnyActorRef, assign, createActor, emit, setup } from 'xstate';

/** The names `subscriptions$` reports. */
export const SUBSCRIPTION_STATES = [
  'unsubscribed',
  'subscribing',
  'subscribed',
  'resetting',
  'refused',
] as const;
export type SubscriptionState = (typeof SUBSCRIPTION_STATES)[number];

/** Why a channel is `refused`: a NAK code from its `SUB` entry or revocation notice. */
export interface SubscriptionError {
  code: string;
  message: string;
}

export interface SubscriptionContext {
  channel: string;
  error: SubscriptionError | null;
  /** `FAILED` events (with a retry) since the last grant or `subscribe()`: the backoff's exponent. */
  failures: number;
  /** The client's T, in ms: the first retry's delay. */
  timeout: number;
  /** The retry delay's cap, in ms. */
  maxBackoff: number;
}

/** What a subscription actor is started with; `timeout` and `maxBackoff` as the client's options. */
export interface SubscriptionInput {
  channel: string;
  /** ms. @default 15000 (the client's default T) */
  timeout?: number;
  /** ms. @default 30000 (the client's default `maxBackoff`) */
  maxBackoff?: number;
}

/** The one event the chart emits: its retry wait is over, send the channel's `SUB` again. */
export interface SubscriptionRetry {
  type: 'retry';
  channel: string;
}

/**
 * The retry delay after `failures` failed `SUB`s in a row, in ms: `timeout · 2^(failures − 1)`,
 * capped at `maxBackoff` (the rule the client's SUB retry always had; PROTOCOL §5).
 */
export function subRetryDelay(c: Pick<SubscriptionContext, 'failures' | 'timeout' | 'maxBackoff'>): number {
  return Math.min(c.maxBackoff, c.timeout * 2 ** Math.max(0, c.failures - 1));
}

/**
 * The name `subscriptions$` and `subscriptionState()` report for a snapshot value: the
 * top-level state (`{ subscribing: 'backoff' }` → `subscribing`).
 */
export function subscriptionStateOf(value: unknown): SubscriptionState | 'forgotten' {
  if (typeof value === 'string') return value as SubscriptionState | 'forgotten';
  return Object.keys(value as object)[0] as SubscriptionState;
}

export type SubscriptionActor = ActorRefFrom<typeof subscriptionMachine>;

export type SubscriptionEvent =
  /** The app called `subscribe()`. */
  | { type: 'SUBSCRIBE' }
  /** A re-SUB was sent for it after the socket was replaced (it is not live there yet). */
  | { type: 'RESUBSCRIBE' }
  /** A re-SUB from the cursor was sent while live (gap, `more`, reset). */
  | { type: 'CATCH_UP' }
  /** The server answered its `SUB` entry with a state. */
  | { type: 'GRANTED' }
  /** The server answered its `SUB` entry with `recovered: false`: the app must reset. */
  | { type: 'RESET' }
  /**
   * Its `SUB` failed as a whole, or its entry was bad (not a refusal): the chart waits in
   * `backoff`, then emits `retry`. `retry: false` (a poll's failure): the error only, no wait.
   */
  | { type: 'FAILED'; error: SubscriptionError; retry?: boolean }
  /** The server answered its `SUB` entry with an error. */
  | { type: 'REFUSED'; error: SubscriptionError }
  /** The server ended it (server `UNS`): `forbidden` → refused, `unsubscribed` → unsubscribed. */
  | { type: 'REVOKED'; error: SubscriptionError }
  /** The app called `unsubscribe()`, or the client closed. */
  | { type: 'UNSUBSCRIBE' }
  /**
   * The client forgets an `unsubscribed` channel (FIX14E F5): the actor ends (a final state,
   * which removes it from the actor system); a later `subscribe()` makes a new one.
   */
  | { type: 'FORGET' };

const DEFAULT_TIMEOUT = 15_000;
const DEFAULT_MAX_BACKOFF = 30_000;

/**
 * The SUB retry's wait, the same in `subscribing` and `resetting` (one object: the browser
 * bundle carries it once). `asking`: a `SUB` naming the channel is out (or about to be);
 * `backoff`: its last `SUB` failed, asked again when `subRetry` has passed.
 */
const retryWait = {
  initial: 'asking',
  states: {
    asking: {},
    backoff: { after: { subRetry: { target: 'asking', actions: 'retry' } } },
  },
} as const;
/** A failure while a `SUB` is out: wait (and count it), or with `retry: false` only note it. */
const onFailed = [
  { guard: 'retries', target: '.backoff', reenter: true, actions: ['refuse', 'failed'] },
  { actions: 'refuse' },
] as const;
/** How a live or pending subscription ends: refused, revoked, ended by the server or the app. */
const ended = {
  REFUSED: { target: 'refused', actions: 'refuse' },
  REVOKED: [
    { guard: 'isEndedByServer', target: 'unsubscribed', actions: 'refuse' },
    { target: 'refused', actions: 'refuse' },
  ],
  UNSUBSCRIBE: 'unsubscribed',
} as const;

export const subscriptionMachine = setup({
  types: {
    context: {} as SubscriptionContext,
    events: {} as SubscriptionEvent,
    input: {} as SubscriptionInput,
    emitted: {} as SubscriptionRetry,
  },
  actions: {
    refuse: assign({
      error: ({ event }) =>
        event.type === 'REFUSED' || event.type === 'REVOKED' || event.type === 'FAILED' ? event.error : null,
    }),
    clear: assign({ error: null, failures: 0 }),
    failed: assign({ failures: ({ context }) => context.failures + 1 }),
    regained: assign({ failures: 0 }),
    retry: emit(({ context }) => ({ type: 'retry' as const, channel: context.channel })),
  },
  guards: {
    isEndedByServer: ({ event }) => event.type === 'REVOKED' && event.error.code === 'unsubscribed',
    retries: ({ event }) => event.type === 'FAILED' && event.retry !== false,
  },
  delays: {
    /** See `subRetryDelay`: T, doubling per failure in a row, capped at `maxBackoff`. */
    subRetry: ({ context }) => subRetryDelay(context),
  },
}).createMachine({
  id: 'subscription',
  context: ({ input }) => ({
    channel: input.channel,
    error: null,
    failures: 0,
    timeout: input.timeout ?? DEFAULT_TIMEOUT,
    maxBackoff: input.maxBackoff ?? DEFAULT_MAX_BACKOFF,
  }),
  initial: 'unsubscribed',
  states: {
    unsubscribed: {
      on: { SUBSCRIBE: { target: 'subscribing', actions: 'clear' }, FORGET: 'forgotten' },
    },
    /** Not a subscription state: the actor's end, never reported (it has left the client). */
    forgotten: { type: 'final' },
    subscribing: {
      ...retryWait,
      on: {
        GRANTED: { target: 'subscribed', actions: 'clear' },
        RESET: { target: 'resetting', actions: 'regained' },
        FAILED: onFailed,
        SUBSCRIBE: { target: '.asking', actions: 'clear' },
        RESUBSCRIBE: '.asking',
        CATCH_UP: '.asking',
        ...ended,
      },
    },
    subscribed: {
      on: {
        RESUBSCRIBE: 'subscribing',
        CATCH_UP: 'resetting',
        RESET: 'resetting',
        SUBSCRIBE: 'subscribing',
        ...ended,
      },
    },
    resetting: {
      ...retryWait,
      on: {
        GRANTED: { target: 'subscribed', actions: 'clear' },
        FAILED: onFailed,
        SUBSCRIBE: { target: '.asking', actions: 'clear' },
        CATCH_UP: '.asking',
        RESUBSCRIBE: 'subscribing',
        ...ended,
      },
    },
    refused: {
      on: {
        SUBSCRIBE: { target: 'subscribing', actions: 'clear' },
        UNSUBSCRIBE: { target: 'unsubscribed', actions: 'clear' },
      },
    },
  },
});

/** The `id` of every channel's actor (its `systemId` is `subscription:<channel>`). */
export const SUBSCRIPTION_ACTOR_ID = 'subscription';

/**
 * Start nothing yet: a subscription actor for `channel` as a child of `parent` (the
 * connection actor), so it shares its actor system, its clock (the `subRetry` delay runs on
 * it) and its inspector; registered in that system as `subscription:<channel>`
 * (`client.actor.system.get(...)`). `backoff`: the client's T and `maxBackoff`, in ms.
 */
export function createSubscriptionActor(
  channel: string,
  parent: AnyActorRef,
  backoff: { timeout?: number; maxBackoff?: number } = {},
): SubscriptionActor {
  return createActor(subscriptionMachine, {
    parent,
    // One id for every channel: a child that reaches its final state sends its parent
    // `xstate.done.actor.<id>`, and XState memoizes the connection machine's candidate
    // transitions per event type on the (process-wide, shared) machine: an id per channel grew
    // that memo by ~0.2 KB per channel ever forgotten, for the life of the process. The
    // channel is in the actor's context and in its `systemId`.
    id: SUBSCRIPTION_ACTOR_ID,
    systemId: `subscription:${channel}`,
    input: { channel, timeout: backoff.timeout, maxBackoff: backoff.maxBackoff },
  });
}
