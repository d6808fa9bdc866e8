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
 * `context.error` set, and the client asks again after a backoff (T, doubling, up to
 * `maxBackoff`), or at once when a socket becomes ready. `GRANTED` clears the error.
 *
 * Pure: it sends nothing; the client drives it with events that mirror what happened on the
 * wire (PROTOCOL §3 rules 7 and 11, §5).
 */
import { type ActorRefFrom, type AnyActorRef, assign, createActor, setup } from 'xstate';

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
  /** Its `SUB` failed as a whole (not a refusal): the client retries after a backoff. */
  | { type: 'FAILED'; error: SubscriptionError }
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

export const subscriptionMachine = setup({
  types: {
    context: {} as SubscriptionContext,
    events: {} as SubscriptionEvent,
    input: {} as { channel: string },
  },
  actions: {
    refuse: assign({
      error: ({ event }) =>
        event.type === 'REFUSED' || event.type === 'REVOKED' || event.type === 'FAILED' ? event.error : null,
    }),
    clear: assign({ error: null }),
  },
  guards: {
    isEndedByServer: ({ event }) => event.type === 'REVOKED' && event.error.code === 'unsubscribed',
  },
}).createMachine({
  id: 'subscription',
  context: ({ input }) => ({ channel: input.channel, error: null }),
  initial: 'unsubscribed',
  states: {
    unsubscribed: {
      on: { SUBSCRIBE: { target: 'subscribing', actions: 'clear' }, FORGET: 'forgotten' },
    },
    /** Not a subscription state: the actor's end, never reported (it has left the client). */
    forgotten: { type: 'final' },
    subscribing: {
      on: {
        GRANTED: { target: 'subscribed', actions: 'clear' },
        RESET: 'resetting',
        FAILED: { actions: 'refuse' },
        SUBSCRIBE: { actions: 'clear' },
        REFUSED: { target: 'refused', actions: 'refuse' },
        REVOKED: [
          { guard: 'isEndedByServer', target: 'unsubscribed', actions: 'refuse' },
          { target: 'refused', actions: 'refuse' },
        ],
        UNSUBSCRIBE: 'unsubscribed',
      },
    },
    subscribed: {
      on: {
        RESUBSCRIBE: 'subscribing',
        CATCH_UP: 'resetting',
        RESET: 'resetting',
        SUBSCRIBE: 'subscribing',
        REFUSED: { target: 'refused', actions: 'refuse' },
        REVOKED: [
          { guard: 'isEndedByServer', target: 'unsubscribed', actions: 'refuse' },
          { target: 'refused', actions: 'refuse' },
        ],
        UNSUBSCRIBE: 'unsubscribed',
      },
    },
    resetting: {
      on: {
        GRANTED: { target: 'subscribed', actions: 'clear' },
        FAILED: { actions: 'refuse' },
        SUBSCRIBE: { actions: 'clear' },
        RESUBSCRIBE: 'subscribing',
        REFUSED: { target: 'refused', actions: 'refuse' },
        REVOKED: [
          { guard: 'isEndedByServer', target: 'unsubscribed', actions: 'refuse' },
          { target: 'refused', actions: 'refuse' },
        ],
        UNSUBSCRIBE: 'unsubscribed',
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

/**
 * Start nothing yet: a subscription actor for `channel` as a child of `parent` (the
 * connection actor), so it shares its actor system and its inspector; registered in that
 * system as `subscription:<channel>` (`client.actor.system.get(...)`).
 */
export function createSubscriptionActor(channel: string, parent: AnyActorRef): SubscriptionActor {
  return createActor(subscriptionMachine, {
    parent,
    id: `subscription:${channel}`,
    systemId: `subscription:${channel}`,
    input: { channel },
  });
}
