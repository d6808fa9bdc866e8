/**
 * The inspector model (src/inspect/model.ts, what the visualizer panel draws) and a channel
 * the client forgets after unsubscribe() (FIX14E F5: the channel's actor goes to the final
 * state `forgotten` and leaves the actor system). The panel must keep showing the channel as
 * `unsubscribed`, not as `forgotten` (the browser suite's relay test saw the last snapshot
 * win, depending on how the relay batched them). Real server, real socket.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { serializeInspectionEvent } from '../src/inspect/index.js';
import { InspectModel } from '../src/inspect/model.js';
import { next, type Rig, reach, rig, until } from './helpers/harness.js';

describe('inspector model: a forgotten channel', () => {
  let r: Rig | undefined;
  afterEach(async () => {
    await r?.close();
    r = undefined;
  });

  it('shows an unsubscribed channel as unsubscribed after its actor is forgotten', async () => {
    r = await rig();
    const model = new InspectModel();
    // The model reads serialized events, as the relay and the visualizer page hand them over.
    const c = r.client({
      inspect: (ev) => {
        const e = serializeInspectionEvent(ev);
        if (e) model.push(e);
      },
      channels: { list: { since: 0 } },
    });
    await reach(c, 'open');
    await next(c.subscriptions$, (m) => m.list === 'subscribed');
    const session = () => [...model.sessions.values()][0]!;
    await until(() => session().subscriptions.list?.state === 'subscribed', 5000, 'subscribed in the model');
    await c.unsubscribe('list');
    // forget() sends UNSUBSCRIBE then FORGET in the same turn: both snapshots are in.
    expect(c.actor.system.get('subscription:list')).toBeUndefined();
    expect(session().subscriptions.list?.state).toBe('unsubscribed');
    const trail = session().timeline.map((t) => t.detail ?? '');
    expect(trail.some((d) => d.includes('list: subscribed → unsubscribed'))).toBe(true);
    expect(trail.some((d) => d.includes('forgotten'))).toBe(false);
  });
});
