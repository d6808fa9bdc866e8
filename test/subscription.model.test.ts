/**
 * Model-based tests of the subscription chart (machines/subscription.ts), as test/model.test.ts
 * does for the connection chart: `xstate/graph`'s TestModel generates paths from the chart
 * (transition cover: every state reached by its shortest path, then each of its edges), and
 * each path is replayed on a real actor whose microsteps are recorded. Asserted at every
 * step: the actor is where the model says, `error` is set exactly when the server refused or
 * ended the subscription, and `unsubscribed` after UNSUBSCRIBE whatever came before.
 * Prints the paths run and the chart's transitions covered.
 */

import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { type AnyStateNode, createActor } from 'xstate';
import { TestModel } from 'xstate/graph';
import {
  type SubscriptionEvent,
  subRetryDelay,
  subscriptionMachine,
  subscriptionStateOf,
} from '../machines/subscription.js';
import type { Clock } from '../src/client/index.js';

const INPUT = { channel: 'board-1', timeout: 100, maxBackoff: 350 };

const EVENTS: SubscriptionEvent[] = [
  { type: 'SUBSCRIBE' },
  { type: 'RESUBSCRIBE' },
  { type: 'CATCH_UP' },
  { type: 'GRANTED' },
  { type: 'RESET' },
  { type: 'FAILED', error: { code: 'server_error', message: 'internal error' } },
  { type: 'FAILED', error: { code: 'bad_response', message: 'a poll answer' }, retry: false },
  { type: 'REFUSED', error: { code: 'forbidden', message: 'no' } },
  { type: 'REFUSED', error: { code: 'too_many_channels', message: 'cap' } },
  { type: 'REVOKED', error: { code: 'forbidden', message: 'revoked' } },
  { type: 'REVOKED', error: { code: 'unsubscribed', message: 'ended' } },
  { type: 'UNSUBSCRIBE' },
  { type: 'FORGET' },
];
type AnyEvent = SubscriptionEvent | { type: `xstate.after.${string}` };
const key = (e: AnyEvent) => ('error' in e ? `${e.type}:${e.error.code}` : e.type);
const isAfter = (e: AnyEvent) => e.type.startsWith('xstate.after.');

type Snap = ReturnType<ReturnType<typeof createActor<typeof subscriptionMachine>>['getSnapshot']>;
const vkeyOf = (s: Snap) => `${JSON.stringify(s.value)}|${s.context.error?.code ?? ''}`;

/** The delayed events the state's active nodes take (the `backoff` states' `subRetry`). */
function afterEvents(s: Snap): AnyEvent[] {
  const out: AnyEvent[] = [];
  for (const node of (s as unknown as { _nodes: AnyStateNode[] })._nodes)
    for (const type of node.transitions.keys())
      if (type.startsWith('xstate.after.')) out.push({ type: type as `xstate.after.${string}` });
  return out;
}

/** A clock whose timers fire only when the test says so, with the delay each was armed with. */
function manualClock() {
  let next = 1;
  const timers = new Map<number, { fn: () => void; ms: number }>();
  const clock: Clock = {
    setTimeout: (fn: () => void, ms: number) => {
      const id = next++;
      timers.set(id, { fn, ms });
      return id;
    },
    clearTimeout: (id: number) => void timers.delete(id),
  };
  return { clock, timers };
}

function transitionKeys(node: AnyStateNode): string[] {
  const out: string[] = [];
  for (const list of node.transitions.values())
    for (const t of list)
      out.push(
        `${t.source.id} --${t.eventType}${t.guard ? '[g]' : ''}--> ${(t.target ?? []).map((x) => x.id).join(',')}`,
      );
  for (const child of Object.values(node.states)) out.push(...transitionKeys(child as AnyStateNode));
  return out;
}

describe('model-based: the subscription chart', () => {
  const model = new TestModel(
    subscriptionMachine as never,
    {
      events: (s: Snap) => [...EVENTS, ...afterEvents(s)],
      serializeState: vkeyOf,
      serializeEvent: (e: AnyEvent) => key(e),
      input: INPUT,
    } as never,
  );
  const shortest = model.getShortestPaths({ allowDuplicatePaths: true }) as unknown as Array<{
    state: Snap;
    steps: Array<{ event: AnyEvent; state: Snap }>;
  }>;
  const adjacency = model.getAdjacencyMap() as Record<
    string,
    { state: Snap; transitions: Record<string, { event: AnyEvent; state: Snap }> }
  >;
  const toVertex = new Map(shortest.map((p) => [vkeyOf(p.state), p]));
  const paths: Array<{ name: string; steps: Array<{ event: AnyEvent; state: Snap }> }> = [];
  for (const [vkey, vertex] of Object.entries(adjacency)) {
    const prefix = toVertex.get(vkey);
    if (!prefix) continue;
    // A final state has no transitions: the model lists every event as a self-loop there, but
    // a done actor takes no event (XState: "sent to stopped actor"). Not a path to replay.
    if (vertex.state.status === 'done') continue;
    for (const [ekey, nxt] of Object.entries(vertex.transitions))
      paths.push({
        name: `${vkey} --${ekey}-->`,
        steps: [...prefix.steps, { event: nxt.event, state: nxt.state }],
      });
  }

  let warnings: unknown[][] = [];
  beforeEach(() => {
    warnings = [];
    vi.spyOn(console, 'warn').mockImplementation((...args: unknown[]) => void warnings.push(args));
  });
  afterEach(() => {
    vi.restoreAllMocks();
  });

  it(`replays ${paths.length} paths through ${Object.keys(adjacency).length} model states`, () => {
    const taken = new Set<string>();
    let retries = 0;
    for (const path of paths) {
      const mc = manualClock();
      const actor = createActor(subscriptionMachine, {
        input: INPUT,
        clock: mc.clock,
        inspect: (e) => {
          if (e.type !== '@xstate.microstep') return;
          for (const t of e._transitions)
            taken.add(
              `${t.source.id} --${t.eventType}${t.guard ? '[g]' : ''}--> ${(t.target ?? []).map((x) => x.id).join(',')}`,
            );
        },
      }).start();
      let emitted = 0;
      actor.on('retry', (ev) => {
        expect(ev.channel).toBe('board-1');
        emitted++;
      });
      for (const [i, step] of path.steps.entries()) {
        if (step.event.type === ('xstate.init' as never)) continue;
        const where = `${path.name} step ${i} ${key(step.event)}`;
        const before = actor.getSnapshot();
        // Nothing is ever sent to a done (forgotten) actor.
        expect(before.status, where).toBe('active');
        if (isAfter(step.event)) {
          // The wait's one timer, armed with the chart's backoff for the failures so far.
          expect(mc.timers.size, where).toBe(1);
          const [id, t] = [...mc.timers][0]!;
          expect(t.ms, where).toBe(subRetryDelay(before.context));
          mc.timers.delete(id);
          const was = emitted;
          t.fn();
          expect(emitted, `${where}: one retry emitted`).toBe(was + 1);
          retries++;
        } else actor.send(step.event as SubscriptionEvent);
        const snap = actor.getSnapshot();
        expect(snap.value, where).toEqual(step.state.value);
        const top = subscriptionStateOf(snap.value);
        // A retry timer is armed exactly while the actor waits in a `backoff` state: anything
        // that leaves the wait (UNSUBSCRIBE, a refusal, a grant, a new SUB) cancels it.
        const waiting = snap.matches({ subscribing: 'backoff' }) || snap.matches({ resetting: 'backoff' });
        expect(mc.timers.size, `${where}: timers while ${JSON.stringify(snap.value)}`).toBe(waiting ? 1 : 0);
        if (waiting) expect(snap.context.error, where).not.toBeNull();
        // A failure while a SUB is out counts once towards the backoff (and waits: above).
        const wasAsking = /subscribing|resetting/.test(JSON.stringify(before.value));
        if (step.event.type === 'FAILED' && step.event.retry !== false && wasAsking) {
          expect(snap.context.failures, where).toBe(before.context.failures + 1);
          expect(waiting, where).toBe(true);
        }
        // error is set exactly in refused, or in unsubscribed right after the server ended it.
        if (top === 'refused') expect(snap.context.error, where).not.toBeNull();
        if (top === 'subscribing' || top === 'subscribed' || top === 'resetting')
          if (step.event.type === 'SUBSCRIBE') {
            expect(snap.context.error, where).toBeNull();
            expect(snap.context.failures, where).toBe(0);
          }
        if (step.event.type === 'UNSUBSCRIBE' && top !== 'forgotten') expect(top, where).toBe('unsubscribed');
        // FORGET ends the actor only from `unsubscribed` (FIX14E F5); anywhere else it is ignored.
        if (step.event.type === 'FORGET') expect(snap.status === 'done', where).toBe(top === 'forgotten');
        if (
          step.event.type === 'GRANTED' &&
          /subscribing|resetting/.test(JSON.stringify(path.steps[i - 1]?.state.value ?? ''))
        )
          expect(top, where).toBe('subscribed');
      }
      actor.stop();
      // Stopped, its clock holds nothing: no retry fires after the actor is gone.
      expect(mc.timers.size, `${path.name}: timers after stop`).toBe(0);
    }
    expect(retries).toBeGreaterThan(0);
    const chart = transitionKeys(subscriptionMachine.root);
    const covered = chart.filter((k) => taken.has(k));
    const missing = chart.filter((k) => !taken.has(k));
    console.log(
      `subscription model: ${paths.length} paths over ${Object.keys(adjacency).length} states; ` +
        `covered ${covered.length}/${chart.length} transitions` +
        (missing.length ? `; not covered: ${missing.join(', ')}` : ''),
    );
    expect(missing).toEqual([]);
    expect(warnings, 'XState warnings while replaying the chart').toEqual([]);
  });

  it('the backoff doubles per failure in a row and stops at maxBackoff; a grant starts it over', () => {
    const mc = manualClock();
    const actor = createActor(subscriptionMachine, { input: INPUT, clock: mc.clock }).start();
    const fail = { type: 'FAILED', error: { code: 'server_error', message: 'x' } } as const;
    const armed = () => [...mc.timers.values()].map((t) => t.ms);
    actor.send({ type: 'SUBSCRIBE' });
    const delays: number[] = [];
    for (let i = 0; i < 4; i++) {
      actor.send(fail);
      delays.push(...armed());
      const [id, t] = [...mc.timers][0]!;
      mc.timers.delete(id);
      t.fn();
    }
    expect(delays).toEqual([100, 200, 350, 350]);
    actor.send({ type: 'GRANTED' });
    actor.send({ type: 'CATCH_UP' });
    actor.send(fail);
    expect(armed()).toEqual([100]);
    actor.stop();
    expect(warnings).toEqual([]);
  });
});
