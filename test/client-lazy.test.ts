/**
 * What a client makes only when first used (issue 14's connect row, S7C2): the facade's
 * streams (`changes$` … `restored$`, `pending$`, `send$`, `subscriptions$`'s subject) are made
 * at their first read or subscriber, and the channel machinery (cursor map, subscription
 * actors, SUB/UNS bookkeeping, held MSGs) at the first channel use. Each lazy part is checked
 * used late: after open, after many sends, after close(), with the `channels` option, with
 * an inspector on, and beside a client that never uses it (the shared empty stand-ins must
 * never be written). Against a real reference server on 127.0.0.1 over `ws`.
 */

import { afterEach, describe, expect, it } from 'vitest';
import type { InspectionEvent } from 'xstate';
import type { ChannelMessage, Restored, SubscriptionState } from '../src/client/index.js';
import { next, type Rig, reach, rig, until } from './helpers/harness.js';

let r: Rig | undefined;
afterEach(async () => {
  await r?.close();
  r = undefined;
});

/** Every value and whether it completed, for a stream subscribed to now. */
function record<V>(source: { subscribe(o: { next(v: V): void; complete(): void }): unknown }) {
  const out = { values: [] as V[], complete: false };
  source.subscribe({ next: (v) => out.values.push(v), complete: () => (out.complete = true) });
  return out;
}

describe('facade streams first read late', () => {
  it('after open and many sends: hot streams see only what comes after, pending$ the count now', async () => {
    r = await rig();
    const c = r.client();
    await reach(c, 'open');
    for (let i = 0; i < 20; i++) await c.send({ id: `early-${i}` });
    // One stream object per property, whenever read.
    expect(c.successes$).toBe(c.successes$);
    expect(c.pending$).toBe(c.pending$);
    const successes = record(c.successes$);
    const messages = record(c.messages$);
    expect(successes.values).toEqual([]);
    // pending$ made while operations wait: it starts from the count as it is.
    let release!: () => void;
    r.ledger.gate = new Promise<void>((res) => {
      release = res;
    });
    const held = [c.send({ id: 'late-1' }), c.send({ id: 'late-2' })];
    expect(c.pending).toBe(2);
    const pending = record(c.pending$);
    expect(pending.values).toEqual([2]);
    r.ledger.gate = null;
    release();
    await Promise.all(held);
    expect(successes.values.flat()).toEqual(['late-1', 'late-2']);
    expect(pending.values.at(-1)).toBe(0);
    expect(messages.values).toEqual([]);
  });

  it('send$ first read late sends through send(); a bad operation lands on rejected$', async () => {
    r = await rig();
    const c = r.client();
    await reach(c, 'open');
    await c.send({ id: 'first' });
    const rejected = record(c.rejected$);
    const done = next(c.successes$, (l) => l.includes('via-subject'));
    c.send$.next({ id: 'via-subject' });
    await done;
    expect(r.ledger.applied.get('via-subject')).toBe(1);
    c.send$.next({ id: 10n } as never);
    await until(() => rejected.values.length === 1);
    expect((rejected.values[0] as { error: { code: string } }).error.code).toBe('bad_request');
  });

  it('after close(): every stream first read then is complete at once, with no value', async () => {
    r = await rig();
    const c = r.client();
    await reach(c, 'open');
    await c.send({ id: 'before-close' });
    await c.close();
    const streams = {
      changes$: c.changes$,
      successes$: c.successes$,
      allowed$: c.allowed$,
      disallowed$: c.disallowed$,
      errors$: c.errors$,
      messages$: c.messages$,
      failures$: c.failures$,
      resets$: c.resets$,
      refused$: c.refused$,
      snapshots$: c.snapshots$,
      rejected$: c.rejected$,
      restored$: c.restored$,
      pending$: c.pending$,
      subscriptions$: c.subscriptions$,
      send$: c.send$,
    };
    for (const [name, s] of Object.entries(streams)) {
      const got = record(s as never);
      expect({ name, ...got }).toEqual({ name, values: [], complete: true });
    }
    expect(c.pending).toBe(0);
    // send$ after close: completed, nothing sent, nothing rejected.
    c.send$.next({ id: 'after-close' });
    await Promise.resolve();
    expect(r.ledger.applied.has('after-close')).toBe(false);
  });

  it('subscribed before close(): each completes on close()', async () => {
    r = await rig();
    const c = r.client();
    await reach(c, 'open');
    const successes = record(c.successes$);
    const restored = record(c.restored$);
    const pending = record(c.pending$);
    const subs = record(c.subscriptions$);
    await c.send({ id: 'x' });
    await c.close();
    expect(successes).toEqual({ values: [['x']], complete: true });
    expect(restored).toEqual({ values: [], complete: true });
    expect(pending.complete).toBe(true);
    expect(pending.values.at(-1)).toBe(0);
    expect(subs).toEqual({ values: [{}], complete: true });
  });
});

describe('channel machinery made at the first channel use', () => {
  it('first subscribe() after many sends: replay, live MSGs, cursors, subscriptions$, unsubscribe', async () => {
    r = await rig();
    const c = r.client();
    await reach(c, 'open');
    for (let i = 0; i < 30; i++) await c.send({ id: `s-${i}` });
    expect(c.cursors()).toEqual({});
    expect(c.subscriptionState('news')).toBe('unsubscribed');
    await r.server.publish('news', { n: 1 });
    const messages: ChannelMessage[] = [];
    c.messages$.subscribe((m) => messages.push(m));
    const state = await c.subscribe('news', { rewind: 1 });
    expect(state.seq).toBe(1);
    await until(() => messages.length === 1);
    expect(messages[0]).toMatchObject({ channel: 'news', seq: 1, payload: { n: 1 }, replay: true });
    const maps: Array<Record<string, SubscriptionState>> = [];
    c.subscriptions$.subscribe((m) => maps.push(m));
    expect(maps).toEqual([{ news: 'subscribed' }]);
    await r.server.publish('news', { n: 2 });
    await until(() => messages.length === 2);
    expect(messages[1]).toMatchObject({ seq: 2, replay: false });
    expect(c.cursors().news).toMatchObject({ seq: 2 });
    await c.unsubscribe('news');
    expect(c.subscriptionState('news')).toBe('unsubscribed');
    expect(maps.at(-1)).toEqual({});
    // And again, after the machinery exists: a new subscription works.
    await c.subscribe('news');
    expect(c.subscriptionState('news')).toBe('subscribed');
  });

  it('the `channels` option subscribes at creation, as before', async () => {
    r = await rig();
    await r.server.publish('feed', { n: 1 });
    const c = r.client({ channels: { feed: { rewind: 1 } } });
    const first = await next(c.messages$, (m) => m.channel === 'feed');
    expect(first).toMatchObject({ seq: 1, payload: { n: 1 } });
    await until(() => c.subscriptionState('feed') === 'subscribed');
    expect(c.cursors()).toEqual({ feed: expect.objectContaining({ seq: 1 }) });
  });

  it('a client that never uses channels beside one that does: nothing shared between them', async () => {
    r = await rig();
    const plain = r.client();
    const user = r.client();
    await Promise.all([reach(plain, 'open'), reach(user, 'open')]);
    await user.subscribe('a');
    await user.subscribe('b');
    await r.server.publish('a', { n: 1 });
    await next(user.messages$, (m) => m.channel === 'a');
    await user.unsubscribe('b');
    expect(plain.cursors()).toEqual({});
    expect(plain.subscriptionState('a')).toBe('unsubscribed');
    const maps = record(plain.subscriptions$);
    expect(maps.values).toEqual([{}]);
    await plain.send({ id: 'plain-op' });
    // A third client made after the others used channels starts with none as well.
    const third = r.client();
    await reach(third, 'open');
    expect(third.cursors()).toEqual({});
    const state = await third.subscribe('a', { rewind: 1 });
    expect(state.seq).toBe(1);
    expect(plain.cursors()).toEqual({});
  });

  it('with an inspector: channels first used late still work, and the inspector sees the frames', async () => {
    r = await rig();
    const events: InspectionEvent[] = [];
    const c = r.client({ inspect: (e) => events.push(e) });
    await reach(c, 'open');
    for (let i = 0; i < 5; i++) await c.send({ id: `i-${i}` });
    const got = next(c.messages$, (m) => m.channel === 'inspected');
    await c.subscribe('inspected');
    await r.server.publish('inspected', { n: 1 });
    expect((await got).payload).toEqual({ n: 1 });
    const frames = events
      .map((e) => (e.type === '@xstate.event' ? (e as { event: { type: string } }).event : undefined))
      .filter((ev) => ev?.type === 'FRAME');
    expect(frames.some((ev) => JSON.stringify(ev).includes('"MSG"'))).toBe(true);
  });

  it('close() with channels never used, and with channels used: both resolve, state closed', async () => {
    r = await rig();
    const never = r.client();
    const used = r.client();
    await Promise.all([reach(never, 'open'), reach(used, 'open')]);
    await used.subscribe('c1');
    const subs = record(used.subscriptions$);
    await Promise.all([never.close(), used.close()]);
    expect(never.state).toBe('closed');
    expect(used.state).toBe('closed');
    expect(subs.complete).toBe(true);
    await expect(used.subscribe('c2')).rejects.toMatchObject({ code: 'closed' });
    await expect(never.subscribe('c2')).rejects.toMatchObject({ code: 'closed' });
    await expect(never.unsubscribe('c2')).resolves.toBeUndefined();
  });

  it('restored operations reach restored$ subscribed after the client was made', async () => {
    r = await rig();
    // A first client on a shared storage queues an operation while the server is gated, and
    // closes: the operation stays in the outbox; the next client restores it.
    const { memoryStorage } = await import('../src/client/index.js');
    const storage = memoryStorage();
    let release!: () => void;
    r.ledger.gate = new Promise<void>((res) => {
      release = res;
    });
    const a = r.client({ storage, clientId: 'restorer' });
    await reach(a, 'open');
    const lost = a.send({ id: 'kept' }).catch(() => 'closed');
    await a.close();
    expect(await lost).toBe('closed');
    r.ledger.gate = null;
    release();
    const b = r.client({ storage, clientId: 'restorer' });
    const restored: Restored[] = [];
    b.restored$.subscribe((x) => restored.push(x));
    await until(() => restored.length === 1);
    expect(restored[0]).toMatchObject({ op: { id: 'kept' }, result: { id: 'kept' } });
  });
});

describe('the client object', () => {
  it('methods work unbound, properties read through the object', async () => {
    r = await rig();
    const c = r.client({ clientId: 'plain-object' });
    const { send, subscribe, unsubscribe, cursors, on, subscriptionState } = c;
    const { online } = c.network;
    const states: string[] = [];
    const off = on('state', (s) => states.push(s));
    await reach(c, 'open');
    expect(states.at(-1)).toBe('open');
    expect(await send({ id: 'unbound' })).toEqual({ id: 'unbound', successes: ['unbound'] });
    expect(c.clientId).toBe('plain-object');
    expect(c.state).toBe('open');
    expect(c.actor.getSnapshot().status).toBe('active');
    expect(c.pending).toBe(0);
    for (const name of ['changes$', 'pending$', 'send$', 'state$', 'subscriptions$', 'clientId', 'state'])
      expect(name in c).toBe(true);
    await r.server.publish('kept', { n: 1 });
    await subscribe('kept', { rewind: 1 });
    expect(cursors()).toEqual({ kept: expect.objectContaining({ seq: 1 }) });
    await unsubscribe('kept');
    expect(subscriptionState('kept')).toBe('unsubscribed');
    expect(cursors()).toEqual({});
    online();
    // `debug` first read late: the same object each time, its killSocket unbound drops the
    // live socket (the client reconnects), its faults are the client's switches.
    expect(c.debug).toBe(c.debug);
    expect(c.network).toBe(c.network);
    const { killSocket, faults } = c.debug;
    expect(faults).toEqual({ dropAcks: false, blackhole: false, blockHttp: false });
    const dropped = next(c.failures$, (f) => f.kind === 'close');
    expect(killSocket()).toBe(true);
    await dropped;
    await reach(c, 'open');
    expect(await send({ id: 'after-kill' })).toEqual({ id: 'after-kill', successes: ['after-kill'] });
    off();
    await c.close();
    expect(killSocket()).toBe(false);
  });
});
