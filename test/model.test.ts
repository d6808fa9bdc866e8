/**
 * Model-based tests generated from the connection statechart with xstate/graph.
 *
 * The chart is the model: a TestModel walks it (events are generated from each state's own
 * transitions, so a new event in the chart fails here until it has an executor), and every
 * path is replayed against the real client (`createSyncClient`, its real socket and HTTP
 * actors) driving a controllable socket, fetch and clock. After each step the client must
 * be in the state the model predicts, with the same request in flight, the same frame on the
 * wire, and every `send()` either still queued or settled exactly once. Coverage is measured
 * from the client's own inspection stream (the transitions it actually took).
 */
import { describe, expect, it } from 'vitest';
import { type AnyStateNode, fromCallback, fromPromise } from 'xstate';
import { TestModel } from 'xstate/graph';
import {
  type ConnectionContext,
  type ConnectionSnapshot,
  connectionMachine,
  flatState,
} from '../machines/connection.js';
import { createSyncClient, type SyncClient, SyncError } from '../src/client/index.js';
import { FakeFetch, FakeWebSocket, flush, ModelClock } from './helpers/fakes.js';

const T = 1000;
const input = {
  clientId: 'm',
  // A fixed request-id prefix: the graph walk builds initial snapshots more than once, and the
  // frames it makes must name ids of the representative snapshots (translate() maps them).
  instance: 'i',
  timeout: T,
  maxBatch: 2,
  pollInterval: 3 * T,
  maxBackoff: 8 * T,
  random: () => 1,
};

/** The model: the same chart, with inert actors (the graph walk must not do I/O). */
const modelMachine = connectionMachine.provide({
  actors: {
    socket: fromCallback(() => () => {}) as never,
    http: fromPromise(() => new Promise(() => {})) as never,
  },
});

type Ev = { type: string; [k: string]: unknown };

const inflightOf = (s: ConnectionSnapshot) => s.context.inflight;
const has = (s: ConnectionSnapshot, path: string) => s.matches(path as never);

/** Every event the chart accepts in this snapshot, made concrete. */
function eventsFor(s: ConnectionSnapshot): Ev[] {
  if (s.status !== 'active') return [];
  const ctx = s.context;
  const types = new Set<string>();
  for (const node of (s as unknown as { _nodes: AnyStateNode[] })._nodes) {
    for (const type of node.transitions.keys()) types.add(type);
  }
  const dialling = has(s, 'connecting') || has(s, { degraded: { socket: 'dialling' } } as never);
  const down = has(s, { degraded: { socket: 'down' } } as never);
  const out: Ev[] = [];
  // Offline, the walk only brings the socket down or the network back (or closes): every other
  // event behaves as online, and exploring them all twice would double the graph for nothing.
  if (!ctx.online) {
    for (const type of types) {
      if (type === 'NETWORK_ONLINE' || type === 'CLOSE') out.push({ type });
      else if (type === 'WS.DOWN' && ctx.socketOpen)
        out.push({ type, code: 1006, reason: '', wasOpen: true });
    }
    return out;
  }
  for (const type of types) {
    if (type.startsWith('xstate.after.')) {
      out.push({ type });
      continue;
    }
    switch (type) {
      case 'SEND':
        if (ctx.queue.length < 2) out.push({ type, item: { key: 0, kind: 'op', op: { n: ctx.counter } } });
        break;
      case 'CLOSE':
        out.push({ type });
        break;
      case 'WS.OPEN':
        out.push({ type });
        break;
      case 'WS.DOWN':
        if (ctx.socketOpen || dialling) out.push({ type, code: 1006, reason: '', wasOpen: ctx.socketOpen });
        // An upgrade refused with 401 (how `ws` reports it; the transport turns it into the code).
        if (dialling && !ctx.socketOpen) out.push({ type, code: 401, reason: '', wasOpen: false });
        break;
      case 'HEALTHY':
        if (ctx.probation) out.push({ type });
        break;
      case 'NETWORK_OFFLINE':
        if (dialling || down || has(s, { open: 'idle' } as never)) out.push({ type });
        break;
      case 'NETWORK_ONLINE':
        if (down) out.push({ type });
        break;
      case 'VISIBLE':
        out.push({ type });
        break;
      case 'BAD_FRAME':
        if (ctx.socketOpen) out.push({ type, reason: 'bad_request: frame is not JSON' });
        break;
      case 'FRAME': {
        if (!ctx.socketOpen) break;
        const f = ctx.inflight;
        if (f) {
          out.push({ type, frame: { type: 'ACK', id: f.id } });
          out.push({ type, frame: { type: 'SYN', id: f.id, payload: resultsFor(f.keys.length) } });
          out.push({ type, frame: { type: 'NAK', id: f.id, error: { code: 'forbidden', message: 'no' } } });
        }
        if (ctx.pingId) out.push({ type, frame: { type: 'ACK', id: ctx.pingId } });
        if (has(s, 'open')) out.push({ type, frame: { type: 'ACK', id: 'stale:1' } });
        out.push({ type, frame: { type: 'MSG', id: 's1', channel: 'x', seq: 1, epoch: 'e', payload: {} } });
        break;
      }
      case 'xstate.done.actor.http': {
        const f = ctx.inflight!;
        const ack = { type: 'ACK', id: f.id };
        out.push({
          type,
          output: {
            kind: 'reply',
            status: 200,
            frames: [ack, { type: 'SYN', id: f.id, payload: resultsFor(f.keys.length) }],
          },
        });
        out.push({
          type,
          output: {
            kind: 'reply',
            status: 200,
            frames: [ack, { type: 'NAK', id: f.id, error: { code: 'server_error', message: 'boom' } }],
          },
        });
        out.push({ type, output: { kind: 'reply', status: 200, frames: [ack] } });
        out.push({ type, output: { kind: 'retry', status: 503, reason: 'HTTP 503', retryAfterMs: 2000 } });
        out.push({ type, output: { kind: 'unauthorized', reason: 'HTTP 401 twice' } });
        break;
      }
      case 'xstate.error.actor.http':
        out.push({ type, error: new TypeError('fetch failed') });
        break;
      default:
        throw new Error(`model: no executor for event ${type}; add one to eventsFor() and exec()`);
    }
  }
  return out;
}

const resultsFor = (n: number) => Array.from({ length: n }, (_, i) => ({ ok: i, successes: [i] }));

/** What must agree between model and client, beyond the state value. */
const summary = (c: ConnectionContext) => ({
  queue: c.queue.length,
  inflight: c.inflight && { type: c.inflight.type, via: c.inflight.via, n: c.inflight.keys.length },
  ping: c.pingId !== null,
  missedPings: c.missedPings,
  socketOpen: c.socketOpen,
  // The graph folds attempt counts above 1 into one state; the delays check the exact ones.
  dialAttempt: Math.min(c.dialAttempt, 1),
  httpAttempt: Math.min(c.httpAttempt, 1),
  retryAfterMs: c.retryAfterMs,
  probation: c.probation,
  online: c.online,
  authRetry: c.authRetry,
});

const serializeState = (s: ConnectionSnapshot) =>
  JSON.stringify([
    s.value,
    s.status,
    Math.min(s.context.queue.length, 2),
    s.context.inflight && [s.context.inflight.via, s.context.inflight.keys.length],
    !!s.context.pingId,
    s.context.missedPings,
    s.context.socketOpen,
    Math.min(s.context.dialAttempt, 1),
    Math.min(s.context.httpAttempt, 1),
    s.context.probation,
    s.context.online,
    s.context.authRetry,
  ]);

const serializeEvent = (e: Ev) => {
  const { type, ...rest } = e;
  if (type === 'SEND') return 'SEND';
  return JSON.stringify([
    type,
    rest.code ?? '',
    rest.frame
      ? [(rest.frame as Ev).type, (rest.frame as { id: string }).id === 'stale:1']
      : (rest.output ?? rest.error ?? ''),
  ]);
};

/** The delay each named timer must have been set with, from the context it started in. */
function expectedDelay(name: string, c: ConnectionContext): number {
  switch (name) {
    case 'connectTimeout':
    case 'keepalive':
    case 'pingTimeout':
    case 'ackTimeout':
    case 'synTimeout':
      return c.timeout;
    case 'pollInterval':
      return c.settings.pollInterval * (0.5 + c.settings.random() / 2);
    case 'httpTimeout':
      return 2 * c.timeout;
    case 'redialBackoff':
      return (
        Math.min(c.settings.maxBackoff, (c.timeout / 2) * 2 ** c.dialAttempt) *
        (0.5 + c.settings.random() / 2)
      );
    case 'httpBackoff':
      return c.retryAfterMs !== null
        ? c.retryAfterMs * (1 + c.settings.random() / 2)
        : Math.min(c.settings.maxBackoff, (c.timeout / 4) * 2 ** c.httpAttempt) *
            (0.5 + c.settings.random() / 2);
    case 'healthyAfter':
      return 2 * c.timeout;
    default:
      throw new Error(`unknown delay ${name}`);
  }
}

/** Key of a transition: its source, its event and its place among that event's transitions. */
function transitionKey(t: { source: AnyStateNode; eventType: string }): string {
  const list = t.eventType === '' ? (t.source.always ?? []) : (t.source.transitions.get(t.eventType) ?? []);
  return `${t.source.id} ${t.eventType || 'always'} #${list.indexOf(t as never)}`;
}

function allTransitions(node: AnyStateNode): string[] {
  const keys: string[] = [];
  for (const list of node.transitions.values()) for (const t of list) keys.push(transitionKey(t));
  for (const t of node.always ?? []) keys.push(transitionKey(t));
  for (const child of Object.values(node.states)) keys.push(...allTransitions(child as AnyStateNode));
  return keys;
}

interface Harness {
  client: SyncClient;
  clock: ModelClock;
  fetch: FakeFetch;
  sends: Array<{ settled: number; value?: unknown; error?: unknown }>;
  taken: Set<string>;
}

function startClient(taken: Set<string>): Harness {
  FakeWebSocket.instances = [];
  const clock = new ModelClock();
  const fetch = new FakeFetch();
  const client = createSyncClient({
    url: 'ws://model.invalid/sync',
    clientId: input.clientId,
    // instance is the client's own (random): translate() maps the model's ids onto it.
    timeout: input.timeout,
    maxBatch: input.maxBatch,
    pollInterval: input.pollInterval,
    maxBackoff: input.maxBackoff,
    random: input.random,
    WebSocket: FakeWebSocket,
    fetch: fetch.fetch as typeof globalThis.fetch,
    clock,
    inspect: (ev) => {
      if (ev.type === '@xstate.microstep' && ev.actorRef === client?.actor) {
        for (const t of (
          ev as unknown as { _transitions: Array<{ source: AnyStateNode; eventType: string }> }
        )._transitions) {
          taken.add(transitionKey(t));
        }
      }
    },
  });
  clock.actor = client.actor;
  return { client, clock, fetch, sends: [], taken };
}

/**
 * The graph keeps one representative snapshot per abstract state, so the model's ids and
 * counters can differ from the client's: map the model's inflight and ping ids onto the
 * client's before sending a frame.
 */
function translate(frame: unknown, model: ConnectionContext, sut: ConnectionContext): unknown {
  const f = frame as { id?: string | null };
  if (f.id && f.id === model.inflight?.id) return { ...f, id: sut.inflight?.id };
  if (f.id && f.id === model.pingId) return { ...f, id: sut.pingId };
  return f;
}

async function exec(h: Harness, e: Ev, model: ConnectionSnapshot, before: ConnectionSnapshot): Promise<void> {
  const ws = () => FakeWebSocket.latest();
  if (e.type.startsWith('xstate.after.')) {
    const name = e.type.split('.')[2]!;
    const delay = h.clock.fire(e.type);
    expect(delay, `${name} delay`).toBe(expectedDelay(name, before.context));
  } else if (e.type === 'SEND') {
    const rec: Harness['sends'][number] = { settled: 0 };
    h.sends.push(rec);
    h.client.send((e.item as { op: unknown }).op).then(
      (value) => {
        rec.settled++;
        rec.value = value;
      },
      (error) => {
        rec.settled++;
        rec.error = error;
      },
    );
  } else if (e.type === 'HEALTHY') {
    expect(h.clock.fire('HEALTHY'), 'healthyAfter delay').toBe(expectedDelay('healthyAfter', before.context));
  } else if (e.type === 'NETWORK_ONLINE') h.client.network.online();
  else if (e.type === 'NETWORK_OFFLINE') h.client.network.offline();
  else if (e.type === 'VISIBLE') h.client.network.visible();
  else if (e.type === 'CLOSE') await h.client.close();
  else if (e.type === 'WS.OPEN') ws().open();
  else if (e.type === 'WS.DOWN') ws().drop(e.code as number);
  else if (e.type === 'BAD_FRAME') ws().receive('this is not json');
  else if (e.type === 'FRAME') {
    const tf = translate(e.frame, model.context, before.context);
    ws().receive(tf);
  } else if (e.type === 'xstate.done.actor.http') {
    const out = e.output as { kind: string; frames?: unknown[]; retryAfterMs?: number };
    if (out.kind === 'reply')
      h.fetch.reply(out.frames!.map((f) => translate(f, model.context, before.context)));
    else if (out.kind === 'unauthorized') {
      // Refused, the credentials resolved again and the request retried at once, refused again.
      h.fetch.status(401);
      await flush();
      h.fetch.status(401);
    } else h.fetch.status(503, { 'retry-after': String((out.retryAfterMs ?? 0) / 1000) });
  } else if (e.type === 'xstate.error.actor.http') h.fetch.networkError();
  else throw new Error(`no executor for ${e.type}`);
  await flush();
}

/** What must hold in the client after each step, against the model's prediction. */
function check(h: Harness, expected: ConnectionSnapshot, where: string): void {
  const snap = h.client.actor.getSnapshot();
  expect(snap.value, `${where}: state`).toEqual(expected.value);
  expect(h.client.state, `${where}: state$ name`).toBe(flatState(expected));
  if (expected.status === 'done') {
    // closed: nothing left pending, everything unsettled was rejected with `closed`.
    for (const s of h.sends) expect(s.settled, `${where}: settled once`).toBe(1);
    return;
  }
  expect(summary(snap.context), `${where}: context`).toEqual(summary(expected.context));
  const inflight = inflightOf(snap);
  const flat = flatState(snap);
  const lastWs = FakeWebSocket.instances.at(-1)?.sent.at(-1);
  if (flat === 'awaitingAck') expect(lastWs?.id, `${where}: SYN on the socket`).toBe(inflight?.id);
  if (flat === 'rePinging' || snap.matches({ open: 'pinging' } as never)) {
    expect(lastWs, `${where}: PNG on the socket`).toEqual({ id: snap.context.pingId, type: 'PNG' });
  }
  if (snap.matches({ degraded: { http: 'posting' } } as never)) {
    expect(h.fetch.latest().body.id, `${where}: same id over HTTP`).toBe(inflight?.id);
  }
  // Exactly-once: every send is settled once, or still in the outbox / in flight.
  const waiting = snap.context.queue.length + (inflight?.type === 'SYN' ? inflight.keys.length : 0);
  const settled = h.sends.filter((s) => s.settled > 0);
  for (const s of settled) expect(s.settled, `${where}: settled at most once`).toBe(1);
  expect(settled.length + waiting, `${where}: no send lost`).toBe(h.sends.length);
}

describe('model-based: the connection chart against the real client', () => {
  const model = new TestModel(
    modelMachine as never,
    {
      events: eventsFor as never,
      serializeState: serializeState as never,
      serializeEvent: serializeEvent as never,
      input,
    } as never,
  );
  const shortest = model.getShortestPaths({ allowDuplicatePaths: true }) as unknown as Array<{
    state: ConnectionSnapshot;
    steps: Array<{ event: Ev; state: ConnectionSnapshot }>;
  }>;
  const adjacency = model.getAdjacencyMap() as Record<
    string,
    { state: ConnectionSnapshot; transitions: Record<string, { event: Ev; state: ConnectionSnapshot }> }
  >;
  const toVertex = new Map(shortest.map((p) => [serializeState(p.state), p]));

  // Transition cover: reach every vertex by its shortest path, then take each of its edges.
  const paths: Array<{ name: string; steps: Array<{ event: Ev; state: ConnectionSnapshot }> }> = [];
  for (const [key, vertex] of Object.entries(adjacency)) {
    const prefix = toVertex.get(key);
    if (!prefix) continue;
    for (const [evKey, next] of Object.entries(vertex.transitions)) {
      paths.push({
        name: `${key} --${evKey}-->`,
        steps: [...prefix.steps, { event: next.event, state: next.state }],
      });
    }
  }

  const taken = new Set<string>();
  const chart = allTransitions(connectionMachine.root);

  it(`replays ${paths.length} paths through ${Object.keys(adjacency).length} model states`, async () => {
    let n = 0;
    for (const path of paths) {
      const h = startClient(taken);
      let model = path.steps[0]!.state;
      for (const [i, step] of path.steps.entries()) {
        if (step.event.type === 'xstate.init') continue;
        // Events were made from the vertex's representative snapshot: translate from that one.
        const from = adjacency[serializeState(model)]?.state ?? model;
        await exec(h, step.event, from, h.client.actor.getSnapshot());
        check(h, step.state, `path ${n} (${path.name}) step ${i} ${step.event.type}`);
        model = step.state;
      }
      await h.client.close();
      for (const s of h.sends) {
        expect(s.settled).toBe(1);
        if (s.error) expect(s.error).toBeInstanceOf(SyncError);
      }
      n++;
    }
    const covered = chart.filter((k) => taken.has(k));
    const missing = chart.filter((k) => !taken.has(k));
    console.log(
      `model-based: ${paths.length} paths over ${Object.keys(adjacency).length} states; ` +
        `covered ${covered.length}/${chart.length} transitions of the chart` +
        (missing.length ? `; not covered: ${missing.join(', ')}` : ''),
    );
    expect(missing).toEqual([]);
  }, 600_000);
});
