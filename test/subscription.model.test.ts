/**
 * Model-based tests of the subscription chart (machines/subscription.ts), as test/model.test.ts
 * does for the connection chart: `xstate/graph`'s TestModel generates paths from the chart
 * (transition cover: every state reached by its shortest path, then each of its edges), and
 * each path is replayed on a real actor whose microsteps are recorded. Asserted at every
 * step: the actor is where the model says, `error` is set exactly when the server refused or
 * ended the subscription, and `unsubscribed` after UNSUBSCRIBE whatever came before.
 * Prints the paths run and the chart's transitions covered.
 */

import { describe, expect, it } from 'vitest';
import { type AnyStateNode, createActor } from 'xstate';
import { TestModel } from 'xstate/graph';
import { type SubscriptionEvent, subscriptionMachine } from '../machines/subscription.js';

const EVENTS: SubscriptionEvent[] = [
  { type: 'SUBSCRIBE' },
  { type: 'RESUBSCRIBE' },
  { type: 'CATCH_UP' },
  { type: 'GRANTED' },
  { type: 'RESET' },
  { type: 'FAILED', error: { code: 'server_error', message: 'internal error' } },
  { type: 'REFUSED', error: { code: 'forbidden', message: 'no' } },
  { type: 'REFUSED', error: { code: 'too_many_channels', message: 'cap' } },
  { type: 'REVOKED', error: { code: 'forbidden', message: 'revoked' } },
  { type: 'REVOKED', error: { code: 'unsubscribed', message: 'ended' } },
  { type: 'UNSUBSCRIBE' },
  { type: 'FORGET' },
];
const key = (e: SubscriptionEvent) => ('error' in e ? `${e.type}:${e.error.code}` : e.type);

type Snap = ReturnType<ReturnType<typeof createActor<typeof subscriptionMachine>>['getSnapshot']>;

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
      events: () => EVENTS,
      serializeState: (s: Snap) => `${String(s.value)}|${s.context.error?.code ?? ''}`,
      serializeEvent: (e: SubscriptionEvent) => key(e),
      input: { channel: 'board-1' },
    } as never,
  );
  const shortest = model.getShortestPaths({ allowDuplicatePaths: true }) as unknown as Array<{
    state: Snap;
    steps: Array<{ event: SubscriptionEvent; state: Snap }>;
  }>;
  const adjacency = model.getAdjacencyMap() as Record<
    string,
    { state: Snap; transitions: Record<string, { event: SubscriptionEvent; state: Snap }> }
  >;
  const toVertex = new Map(
    shortest.map((p) => [`${String(p.state.value)}|${p.state.context.error?.code ?? ''}`, p]),
  );
  const paths: Array<{ name: string; steps: Array<{ event: SubscriptionEvent; state: Snap }> }> = [];
  for (const [vkey, vertex] of Object.entries(adjacency)) {
    const prefix = toVertex.get(vkey);
    if (!prefix) continue;
    for (const [ekey, nxt] of Object.entries(vertex.transitions))
      paths.push({
        name: `${vkey} --${ekey}-->`,
        steps: [...prefix.steps, { event: nxt.event, state: nxt.state }],
      });
  }

  it(`replays ${paths.length} paths through ${Object.keys(adjacency).length} model states`, () => {
    const taken = new Set<string>();
    for (const path of paths) {
      const actor = createActor(subscriptionMachine, {
        input: { channel: 'board-1' },
        inspect: (e) => {
          if (e.type !== '@xstate.microstep') return;
          for (const t of e._transitions)
            taken.add(
              `${t.source.id} --${t.eventType}${t.guard ? '[g]' : ''}--> ${(t.target ?? []).map((x) => x.id).join(',')}`,
            );
        },
      }).start();
      for (const [i, step] of path.steps.entries()) {
        if (step.event.type === ('xstate.init' as never)) continue;
        actor.send(step.event);
        const snap = actor.getSnapshot();
        const where = `${path.name} step ${i} ${key(step.event)}`;
        expect(snap.value, where).toBe(step.state.value);
        // error is set exactly in refused, or in unsubscribed right after the server ended it.
        if (snap.value === 'refused') expect(snap.context.error, where).not.toBeNull();
        if (snap.value === 'subscribing' || snap.value === 'subscribed' || snap.value === 'resetting')
          if (step.event.type === 'SUBSCRIBE') expect(snap.context.error, where).toBeNull();
        if (step.event.type === 'UNSUBSCRIBE' && snap.value !== 'forgotten')
          expect(snap.value, where).toBe('unsubscribed');
        // FORGET ends the actor only from `unsubscribed` (FIX14E F5); anywhere else it is ignored.
        if (step.event.type === 'FORGET')
          expect(snap.status === 'done', where).toBe(snap.value === 'forgotten');
        if (
          step.event.type === 'GRANTED' &&
          String(path.steps[i - 1]?.state.value ?? '').match(/subscribing|resetting/)
        )
          expect(snap.value, where).toBe('subscribed');
      }
      actor.stop();
    }
    const chart = transitionKeys(subscriptionMachine.root);
    const covered = chart.filter((k) => taken.has(k));
    const missing = chart.filter((k) => !taken.has(k));
    console.log(
      `subscription model: ${paths.length} paths over ${Object.keys(adjacency).length} states; ` +
        `covered ${covered.length}/${chart.length} transitions` +
        (missing.length ? `; not covered: ${missing.join(', ')}` : ''),
    );
    expect(missing).toEqual([]);
  });
});
