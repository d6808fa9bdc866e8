/**
 * The client's per-operation fast path, against a real `ws` server on 127.0.0.1
 * (test/helpers/lying-server.ts).
 * (1) The socket transport folds an ACK into its own response when both arrive in one
 * synchronous run of frames (one TCP write from a server that corks them; the helper corks its
 * socket while it replies, so the frames really share one write): the response alone goes
 * through the chart (awaitingAck → open), one macrostep fewer per round trip. An ACK that
 * arrives alone, or that is followed by anything but its response, reaches the chart as before
 * and in order.
 * (2) An operation is turned into JSON once, in send(), and that text is what its SYN carries.
 * (3) The chart alone: a send while open (see that describe).
 * (4) MSGs from the socket reach the client without a chart macrostep (TransportConfig.onMessage),
 * in wire order with the frames that do go through the chart.
 */
import { execFileSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { firstValueFrom } from 'rxjs';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { WebSocket } from 'ws';
import { createActor, fromCallback } from 'xstate';
import {
  type ConnectionEmitted,
  connectionMachine,
  flatState,
  type OutgoingFrame,
  type SocketCommand,
} from '../machines/connection.js';
import {
  type ChannelMessage,
  type ConnectionState,
  createSyncClient,
  type SyncClient,
} from '../src/client/index.js';
import { next, reach, until } from './helpers/harness.js';
import { honest, type LyingServer, startLyingServer } from './helpers/lying-server.js';

let liar: LyingServer;
let c: SyncClient;
let states: ConnectionState[];

beforeEach(async () => {
  liar = await startLyingServer();
  c = createSyncClient({
    url: liar.wsUrl,
    clientId: `ack-${Math.random().toString(36).slice(2)}`,
    timeout: 2000,
    WebSocket: WebSocket as never,
  });
  states = [];
  c.state$.subscribe((s) => states.push(s));
  await reach(c, 'open');
});

afterEach(async () => {
  await c.close();
  await liar.close();
});

/** The states seen from the SYN going out to the client being open again. */
const roundTrip = () => states.slice(states.lastIndexOf('awaitingAck'));

describe('ACK and response in one write', () => {
  it('the response alone settles the send: awaitingAck → open, no awaitingSyn', async () => {
    liar.cork = true;
    const results: unknown[] = [];
    for (let i = 0; i < 5; i++) {
      states = [];
      results.push(await c.send({ i }));
      await reach(c, 'open');
      expect(roundTrip()).toEqual(['awaitingAck', 'open']);
    }
    expect(results).toEqual([0, 1, 2, 3, 4].map((i) => ({ ok: { i } })));
  });

  it('an ACK alone (its response in a later write) moves to awaitingSyn as before', async () => {
    let pending: unknown[] = [];
    liar.onFrame = (env, reply) => {
      const [ack, ...rest] = honest(env);
      reply(ack);
      pending = rest;
    };
    const p = c.send({ alone: true });
    await reach(c, 'awaitingSyn');
    for (const f of pending) liar.push(f);
    expect(await p).toEqual({ ok: { alone: true } });
    await reach(c, 'open');
    expect(roundTrip()).toEqual(['awaitingAck', 'awaitingSyn', 'open']);
  });

  it('an ACK and a NAK for the same request in one write reject the send with its code', async () => {
    liar.cork = true;
    liar.onFrame = (env, reply) => {
      reply({ id: env.id, type: 'ACK' });
      reply({ id: env.id, type: 'NAK', error: { code: 'forbidden', message: 'no' } });
    };
    await expect(c.send({ refused: true })).rejects.toMatchObject({ code: 'forbidden' });
    await reach(c, 'open');
    expect(roundTrip()).toEqual(['awaitingAck', 'open']);
  });

  it('an ACK followed in the same write by another request’s frame is delivered first, in order', async () => {
    liar.cork = true;
    // ACK, then a MSG-less oddity the chart reports (a NAK without id: bad_frame), then the
    // response: the ACK must reach the chart before the NAK (awaitingSyn seen), nothing lost.
    liar.onFrame = (env, reply) => {
      reply({ id: env.id, type: 'ACK' });
      reply({ id: null, type: 'NAK', error: { code: 'bad_request', message: 'odd' } });
      reply({ id: env.id, type: 'SYN', payload: [{ ok: 'late' }] });
    };
    const failure = next(c.failures$, (f) => f.kind === 'bad_frame');
    expect(await c.send({ x: 1 })).toEqual({ ok: 'late' });
    expect((await failure).state).toBe('awaitingSyn');
    await reach(c, 'open');
    expect(roundTrip()).toEqual(['awaitingAck', 'awaitingSyn', 'open']);
  });
});

/**
 * The fold holds an ACK until the end of its run of frames; a server that lies or a socket that
 * dies must still get each operation settled exactly once, with its own result.
 */
describe('the ACK fold with odd servers', () => {
  /** SYNs the server got for `id`. */
  const synsFor = (id: string) => liar.received.filter((e) => e.type === 'SYN' && e.id === id).length;

  it('a response with no ACK at all settles the send once: awaitingAck → open', async () => {
    liar.onFrame = (env, reply) => reply(honest(env)[1]);
    for (let i = 0; i < 3; i++) {
      states = [];
      expect(await c.send({ noAck: i })).toEqual({ ok: { noAck: i } });
      await reach(c, 'open');
      expect(roundTrip()).toEqual(['awaitingAck', 'open']);
    }
    expect(liar.received.filter((e) => e.type === 'SYN').length).toBe(3);
    expect(await firstValueFrom(c.pending$)).toBe(0);
  });

  it('a stray ACK (another id) in the same write as the response is ignored; the send settles once', async () => {
    liar.cork = true;
    liar.onFrame = (env, reply) => {
      reply({ id: 'someone-else:9', type: 'ACK' });
      reply(honest(env)[1]);
    };
    expect(await c.send({ stray: true })).toEqual({ ok: { stray: true } });
    await reach(c, 'open');
    expect(roundTrip()).toEqual(['awaitingAck', 'open']);
    expect(synsFor(liar.received.at(-1)!.id)).toBe(1);
  });

  it('a duplicate ACK then the response in one write: the first ACK reaches the chart, the send settles once', async () => {
    liar.cork = true;
    liar.onFrame = (env, reply) => {
      reply({ id: env.id, type: 'ACK' });
      reply({ id: env.id, type: 'ACK' });
      reply(honest(env)[1]);
    };
    expect(await c.send({ dup: true })).toEqual({ ok: { dup: true } });
    await reach(c, 'open');
    expect(roundTrip()).toEqual(['awaitingAck', 'awaitingSyn', 'open']);
    // The next send is answered with its own result, not a leftover of the first.
    liar.onFrame = (env, reply) => {
      for (const f of honest(env)) reply(f);
    };
    expect(await c.send({ after: true })).toEqual({ ok: { after: true } });
  });

  it('the response before its ACK (same write, or the ACK in a later task): settled once, the late ACK changes nothing', async () => {
    for (const cork of [true, false]) {
      liar.cork = cork;
      liar.onFrame = (env, reply) => {
        const [ack, res] = honest(env);
        reply(res);
        reply(ack);
      };
      states = [];
      expect(await c.send({ cork })).toEqual({ ok: { cork } });
      await reach(c, 'open');
      // The late ACK arrives while open: no state left open, nothing settled twice.
      liar.onFrame = (env, reply) => {
        for (const f of honest(env)) reply(f);
      };
      expect(await c.send({ next: cork })).toEqual({ ok: { next: cork } });
      expect(states.filter((s) => s === 'degraded')).toEqual([]);
    }
    expect(await firstValueFrom(c.pending$)).toBe(0);
  });

  it('an ACK, then the socket dies before the response: the ACK is delivered before WS.DOWN, the resend (same id) settles once', async () => {
    liar.cork = true;
    let first = true;
    liar.onFrame = (env, reply) => {
      if (!first) {
        for (const f of honest(env)) reply(f);
        return;
      }
      first = false;
      reply({ id: env.id, type: 'ACK' });
      // Close the socket in the same turn: the close frame shares the ACK's write.
      liar.closeSockets();
    };
    const result = await c.send({ dies: true });
    expect(result).toEqual({ ok: { dies: true } });
    const id = liar.received.find((e) => e.type === 'SYN')!.id;
    const seen = states.join(',');
    expect(seen.indexOf('awaitingSyn')).toBeGreaterThan(-1);
    expect(seen.indexOf('awaitingSyn')).toBeLessThan(seen.indexOf('degraded'));
    // Resent with the same id (over HTTP or on a new socket), answered once.
    const resent =
      liar.received.filter((e) => e.id === id).length + liar.posted.filter((e) => e.id === id).length;
    expect(resent).toBeGreaterThanOrEqual(2);
    expect(await firstValueFrom(c.pending$)).toBe(0);
  });
});

describe('MSGs from the socket skip the chart', () => {
  const msg = (seq: number) => ({
    id: `m${seq}`,
    type: 'MSG',
    channel: 'news',
    epoch: 'e1',
    seq,
    payload: { seq },
  });
  /** Snapshots the chart publishes from now on: one per event it processes. */
  const chartSteps = (client: SyncClient) => {
    let n = 0;
    const sub = client.actor.subscribe(() => n++);
    return {
      get count() {
        return n;
      },
      stop: () => sub.unsubscribe(),
    };
  };

  it('a MSG is delivered with its cursor advanced, and the chart processes no event for it', async () => {
    await c.subscribe('news');
    const got: ChannelMessage[] = [];
    c.messages$.subscribe((m) => got.push(m));
    const steps = chartSteps(c);
    for (let seq = 1; seq <= 3; seq++) liar.push(msg(seq));
    await until(() => got.length === 3, 5000, 'three MSGs');
    steps.stop();
    expect(got.map((m) => m.seq)).toEqual([1, 2, 3]);
    expect(c.cursors().news).toEqual({ epoch: 'e1', seq: 3 });
    expect(steps.count).toBe(0);
  });

  it('ACK, MSGs, then the response in one write: the ACK reaches the chart before the MSGs are delivered, the response after', async () => {
    await c.subscribe('news');
    liar.cork = true;
    const order: string[] = [];
    c.messages$.subscribe((m) => order.push(`msg ${m.seq} in ${c.state}`));
    liar.onFrame = (env, reply) => {
      reply({ id: env.id, type: 'ACK' });
      reply(msg(1));
      reply(msg(2));
      reply({ id: env.id, type: 'SYN', payload: [{ ok: true }] });
    };
    expect(await c.send({ x: 1 })).toEqual({ ok: true });
    // Each MSG came after the ACK was applied (awaitingSyn) and before the response (open).
    expect(order).toEqual(['msg 1 in awaitingSyn', 'msg 2 in awaitingSyn']);
  });

  it('with an inspector, MSGs still go through the chart as FRAME events (what syncwire/inspect counts)', async () => {
    const seen: string[] = [];
    const d = createSyncClient({
      url: liar.wsUrl,
      clientId: `msg-${Math.random().toString(36).slice(2)}`,
      timeout: 2000,
      WebSocket: WebSocket as never,
      inspect: (e) => {
        if (e.type !== '@xstate.event' || e.event.type !== 'FRAME') return;
        seen.push((e.event as unknown as { frame: { type: string } }).frame.type);
      },
    });
    try {
      await reach(d, 'open');
      await d.subscribe('news');
      const got: ChannelMessage[] = [];
      d.messages$.subscribe((m) => got.push(m));
      for (let seq = 1; seq <= 2; seq++) liar.push(msg(seq));
      await until(() => got.length === 2, 5000, 'two MSGs');
      expect(got.map((m) => m.seq)).toEqual([1, 2]);
      expect(seen.filter((t) => t === 'MSG')).toHaveLength(2);
    } finally {
      await d.close();
    }
  });
});

describe('an operation is serialized once, in send()', () => {
  it('the SYN carries the operation as it was when send() was called, whatever the app changes after', async () => {
    const op = { n: 1, tags: ['a'] };
    const p = c.send(op);
    op.n = 2;
    op.tags.push('b');
    expect(await p).toEqual({ ok: { n: 1, tags: ['a'] } });
    const syn = liar.received.filter((e) => e.type === 'SYN').at(-1)!;
    expect(syn.payload).toEqual([{ n: 1, tags: ['a'] }]);
  });

  it('a batch of several operations is one well-formed SYN with each one’s JSON, in order', async () => {
    const ops = [{ a: 1 }, 'text', 3, null, [true, { nested: 'x"y' }]];
    const results = await Promise.all(ops.map((o) => c.send(o)));
    expect(results).toEqual(ops.map((o) => ({ ok: o })));
    const sent = liar.received.filter((e) => e.type === 'SYN').flatMap((e) => e.payload as unknown[]);
    expect(sent).toEqual(ops);
  });
});

/**
 * (3) The chart's send while open, in-process (the chart alone, its socket a recorder): a run
 * of operations is queued and taken in one step by built-in actions (`takeSent`, `emitBatched`,
 * `sendTaken`); anything else (a SUB, a restored batch) is queued by the root and taken by
 * open's `always`, exactly as it was before the fast path: same request, same frame, no `batched`.
 */
describe('a send while open (the chart alone)', () => {
  const rig = () => {
    const frames: OutgoingFrame[] = [];
    const machine = connectionMachine.provide({
      actors: {
        socket: fromCallback<SocketCommand, { clientId: string }>(({ receive }) => {
          receive((cmd) => {
            if (cmd.type === 'SEND') frames.push(cmd.frame);
          });
          return () => {};
        }),
      },
    });
    const actor = createActor(machine, {
      input: {
        clientId: 'c',
        instance: 'i',
        timeout: 60_000,
        maxBatch: 64,
        pollInterval: 60_000,
        maxBackoff: 60_000,
      },
    });
    const emitted: ConnectionEmitted[] = [];
    actor.on('*', (e) => emitted.push(e));
    actor.start();
    actor.send({ type: 'WS.OPEN' });
    expect(flatState(actor.getSnapshot())).toBe('open');
    expect(emitted).toEqual([{ type: 'socketReady' }]);
    emitted.length = 0;
    return { actor, frames, emitted };
  };

  it('operations: in flight at once, one batched naming its id and keys, the frame with their JSON', () => {
    const { actor, frames, emitted } = rig();
    actor.send({
      type: 'SEND',
      items: [
        { key: 1, kind: 'op', op: { a: 1 }, json: '{"a":1}' },
        { key: 2, kind: 'op', op: { b: 2 }, json: '{"b":2}' },
      ],
    });
    const ctx = actor.getSnapshot().context;
    expect(flatState(actor.getSnapshot())).toBe('awaitingAck');
    expect(ctx.queue).toEqual([]);
    expect(ctx.inflight).toMatchObject({
      id: 'i:1',
      type: 'SYN',
      keys: [1, 2],
      via: 'ws',
      json: '[{"a":1},{"b":2}]',
    });
    expect(emitted).toEqual([{ type: 'batched', id: 'i:1', keys: [1, 2] }]);
    expect(frames).toEqual([
      { id: 'i:1', type: 'SYN', payload: [{ a: 1 }, { b: 2 }], json: '[{"a":1},{"b":2}]' },
    ]);
    actor.send({
      type: 'FRAME',
      frame: { id: 'i:1', type: 'SYN', payload: [{ ok: 1 }, { ok: 2 }] },
    } as never);
    expect(flatState(actor.getSnapshot())).toBe('open');
    expect(emitted[1]).toEqual({
      type: 'settled',
      id: 'i:1',
      keys: [1, 2],
      request: 'SYN',
      payload: [{ ok: 1 }, { ok: 2 }],
    });
    actor.stop();
  });

  it('a SUB, then a restored batch: each goes out as it is, with no batched', () => {
    const { actor, frames, emitted } = rig();
    actor.send({ type: 'SEND', item: { key: 7, kind: 'SUB', payload: { channels: { x: {} } } } });
    expect(flatState(actor.getSnapshot())).toBe('awaitingAck');
    expect(actor.getSnapshot().context.inflight).toMatchObject({ id: 'i:1', type: 'SUB', keys: [7] });
    expect(frames).toEqual([{ id: 'i:1', type: 'SUB', payload: { channels: { x: {} } } }]);
    actor.send({ type: 'FRAME', frame: { id: 'i:1', type: 'SYN', payload: [{}] } } as never);
    expect(flatState(actor.getSnapshot())).toBe('open');
    actor.send({ type: 'SEND', items: [{ key: 9, kind: 'batch', id: 'old:5', ops: [{ c: 3 }], keys: [9] }] });
    expect(actor.getSnapshot().context.inflight).toMatchObject({ id: 'old:5', type: 'SYN', keys: [9] });
    expect(frames[1]).toEqual({ id: 'old:5', type: 'SYN', payload: [{ c: 3 }] });
    expect(emitted.filter((e) => e.type === 'batched')).toEqual([]);
    actor.stop();
  });

  it('every context of a round trip keeps at most 16 fields (XState copies it per assign; V8 makes a copy with 20+ a slow dictionary)', () => {
    const { actor } = rig();
    const sizes = new Set<number>();
    actor.subscribe((s) => sizes.add(Object.keys(s.context).length));
    actor.send({ type: 'SEND', items: [{ key: 1, kind: 'op', op: { a: 1 }, json: '{"a":1}' }] });
    actor.send({ type: 'FRAME', frame: { id: 'i:1', type: 'ACK' } } as never);
    actor.send({ type: 'FRAME', frame: { id: 'i:1', type: 'SYN', payload: [{ ok: 1 }] } } as never);
    actor.send({ type: 'WS.DOWN', code: 1006, reason: 'gone', wasOpen: true });
    expect(flatState(actor.getSnapshot())).toBe('degraded');
    expect(sizes.size).toBeGreaterThan(0);
    expect(Math.max(...sizes)).toBeLessThanOrEqual(16);
    // The fixed settings travel as one object, read by the delays and the request ids.
    expect(actor.getSnapshot().context.settings).toMatchObject({
      instance: 'i',
      maxBatch: expect.any(Number),
    });
    actor.stop();
  });

  it('V8 keeps every context of a round trip a fast (non-dictionary) object (checked with %HasFastProperties in a child node)', () => {
    // The property itself, not only the field count above: a context that V8 turns into a
    // dictionary costs ~6 µs per assign copy (docs/benchmarks.md, session 5).
    const script = [
      "import { createActor, fromCallback } from 'xstate';",
      "import { connectionMachine } from './machines/connection.ts';",
      'const m = connectionMachine.provide({ actors: { socket: fromCallback(({ receive }) => { receive(() => {}); return () => {}; }) } });',
      "const a = createActor(m, { input: { clientId: 'c', instance: 'i', timeout: 60000, maxBatch: 64, pollInterval: 60000, maxBackoff: 60000 } });",
      "a.start(); a.send({ type: 'WS.OPEN' });",
      'const fast = [];',
      'a.subscribe((s) => fast.push(%HasFastProperties(s.context)));',
      "a.send({ type: 'SEND', items: [{ key: 1, kind: 'op', op: 1, json: '1' }] });",
      "a.send({ type: 'FRAME', frame: { id: 'i:1', type: 'ACK' } });",
      "a.send({ type: 'FRAME', frame: { id: 'i:1', type: 'SYN', payload: [1] } });",
      'a.stop();',
      'console.log(JSON.stringify(fast));',
    ].join('\n');
    const out = execFileSync(
      process.execPath,
      ['--allow-natives-syntax', '--import', 'tsx', '--input-type=module', '-e', script],
      { cwd: fileURLToPath(new URL('..', import.meta.url)), encoding: 'utf8', timeout: 60_000 },
    );
    expect(JSON.parse(out.trim())).toEqual([true, true, true]);
  });

  it('an empty send while open leaves it open with nothing sent', () => {
    const { actor, frames, emitted } = rig();
    actor.send({ type: 'SEND', items: [] });
    expect(flatState(actor.getSnapshot())).toBe('open');
    expect(actor.getSnapshot().context.inflight).toBeNull();
    expect(frames).toEqual([]);
    expect(emitted).toEqual([]);
    actor.stop();
  });
});
