/**
 * What the design's statechart alone costs on the client, in situ (issue 14): raw `ws` driven
 * through a minimal XState v5 machine, beside raw `ws` and socket.io, in one process, against
 * the same bench servers. Not part of `npm run bench` and not a test.
 *
 * The minimal machine has what the design asks of every client message and nothing
 * else: a state per phase (`idle` → `awaiting` → `idle`), two events per operation (the send,
 * the answer), one delayed transition per state (the timeout, armed on entry and cleared on
 * exit), one `assign` per event; the socket write and the promise are called from its
 * actions. No child actor, no RxJS, no outbox, no validation. syncwire's chart does all of that
 * and more, so whatever this machine costs beyond raw `ws` is a lower bound of syncwire's own.
 *
 * Two more rows run the same chart another way, to tell XState's runtime from the chart's shape:
 * - `ws + XState transition()`: no actor; XState's pure `transition()` computes each step and a
 *   small loop runs the delayed raises and cancels it returns as platform timers.
 * - `ws + hand-written chart`: the same states, events and per-state timeout as a `switch`, no
 *   XState at all.
 *
 *   node --import tsx bench/floor.ts                 # both rows, RUNS=3
 *   FLOOR_ONLY=latency|connect|hot RUNS=5 N=5000 node --import tsx bench/floor.ts
 *
 * - latency: N sequential round trips after 2,000 of warm-up; client CPU µs per op
 *   (process.cpuUsage, user + system) and ops/s.
 * - hot (only when asked): the three runners of the chart in a loop with no I/O (`hotRow`).
 * - connect: 1,000 clients, at most 100 dialling at once, each until open and one operation
 *   acknowledged (as `connectTime` in scenarios.ts); each client of the XState row creates one
 *   actor and sends it three events (open, send, answer). Client CPU µs per client, wall ms.
 */
import { io as sioConnect } from 'socket.io-client';
import { WebSocket } from 'ws';
import { type AnyEventObject, assign, createActor, initialTransition, setup, transition } from 'xstate';
import { startServer } from './proc.js';
import { makeOp, type Op } from './scenarios.js';

type Answer = { id: number; ok: boolean };
type FloorEvent =
  | { type: 'OPEN'; ws: WebSocket }
  | { type: 'SEND'; op: Op; settle: (a: Answer) => void }
  | { type: 'ANSWER'; answer: Answer };

/** The minimal machine: one timeout per state as a delayed transition, two events per op. */
const floorMachine = setup({
  types: {} as {
    context: { ws: WebSocket | null; settle: ((a: Answer) => void) | null };
    events: FloorEvent;
  },
  actions: {
    opened: assign(({ event }) => ({ ws: (event as Extract<FloorEvent, { type: 'OPEN' }>).ws })),
    write: assign(({ context, event }) => {
      const e = event as Extract<FloorEvent, { type: 'SEND' }>;
      context.ws!.send(JSON.stringify(e.op));
      return { settle: e.settle };
    }),
    answer: assign(({ context, event }) => {
      context.settle?.((event as Extract<FloorEvent, { type: 'ANSWER' }>).answer);
      return { settle: null };
    }),
  },
  delays: { timeout: 15_000 },
}).createMachine({
  context: { ws: null, settle: null },
  initial: 'connecting',
  states: {
    connecting: { on: { OPEN: { target: 'idle', actions: 'opened' } }, after: { timeout: 'failed' } },
    idle: { on: { SEND: { target: 'awaiting', actions: 'write' } }, after: { timeout: 'idle' } },
    awaiting: { on: { ANSWER: { target: 'idle', actions: 'answer' } }, after: { timeout: 'failed' } },
    failed: {},
  },
});

type Row =
  | 'ws'
  | 'ws + minimal XState'
  | 'ws + XState transition()'
  | 'ws + hand-written chart'
  | 'socket.io';
const ROWS: readonly Row[] = [
  'ws',
  'ws + minimal XState',
  'ws + XState transition()',
  'ws + hand-written chart',
  'socket.io',
];

/**
 * The same machine without an actor: XState's pure `transition()` computes each step, and
 * this loop runs what it returns (a delayed `xstate.raise` becomes a platform timer, an
 * `xstate.cancel` clears it). No mailbox, no system, no observers, no inspection: the
 * cheapest way to run an XState v5 chart with delayed transitions.
 */
function pureRunner(): { send(event: FloorEvent): void; stop(): void } {
  const timers = new Map<string, ReturnType<typeof setTimeout>>();
  const run = (actions: ReturnType<typeof transition>[1]) => {
    for (const a of actions) {
      const params = a.params as { delay?: number; id?: string; event?: AnyEventObject; sendId?: string };
      if (a.type === 'xstate.raise' && params.delay !== undefined) {
        const id = params.id!;
        const event = params.event as FloorEvent;
        timers.set(
          id,
          setTimeout(() => {
            timers.delete(id);
            step(event);
          }, params.delay),
        );
      } else if (a.type === 'xstate.cancel') {
        const t = timers.get(params.sendId!);
        if (t !== undefined) {
          clearTimeout(t);
          timers.delete(params.sendId!);
        }
      }
    }
  };
  let [snapshot, first] = initialTransition(floorMachine);
  const step = (event: FloorEvent) => {
    const [next, actions] = transition(floorMachine, snapshot, event);
    snapshot = next;
    run(actions);
  };
  run(first);
  return {
    send: step,
    stop: () => {
      for (const t of timers.values()) clearTimeout(t);
      timers.clear();
    },
  };
}

/**
 * The same chart written by hand, no XState: a `switch` per event, the state's timeout armed
 * on entry and cleared on exit as a platform timer. What the design's shape costs without
 * XState's runtime.
 */
function handRunner(): { send(event: FloorEvent): void; stop(): void } {
  let state: 'connecting' | 'idle' | 'awaiting' | 'failed' = 'connecting';
  let ws: WebSocket | null = null;
  let settle: ((a: Answer) => void) | null = null;
  let timer: ReturnType<typeof setTimeout> | undefined;
  const enter = (next: typeof state) => {
    clearTimeout(timer);
    state = next;
    timer =
      next === 'failed' ? undefined : setTimeout(() => enter(next === 'idle' ? 'idle' : 'failed'), 15_000);
  };
  enter('connecting');
  return {
    send(event) {
      if (state === 'connecting' && event.type === 'OPEN') {
        ws = event.ws;
        enter('idle');
      } else if (state === 'idle' && event.type === 'SEND') {
        ws!.send(JSON.stringify(event.op));
        settle = event.settle;
        enter('awaiting');
      } else if (state === 'awaiting' && event.type === 'ANSWER') {
        const s = settle;
        settle = null;
        s?.(event.answer);
        enter('idle');
      }
    },
    stop: () => clearTimeout(timer),
  };
}

interface Client {
  send(op: Op): Promise<unknown>;
  close(): void;
}

function openWs(port: number): Promise<WebSocket> {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(`ws://127.0.0.1:${port}`, { perMessageDeflate: false });
    ws.once('open', () => resolve(ws));
    ws.once('error', reject);
  });
}

async function open(row: Row, port: number): Promise<Client> {
  if (row === 'socket.io') {
    const s = sioConnect(`http://127.0.0.1:${port}`, {
      transports: ['websocket'],
      forceNew: true,
      reconnection: false,
    });
    await new Promise<void>((resolve, reject) => {
      s.once('connect', () => resolve());
      s.once('connect_error', reject);
    });
    return {
      send: (op) => new Promise((resolve) => s.emit('op', op, resolve)),
      close: () => void s.disconnect(),
    };
  }
  if (row === 'ws') {
    const ws = await openWs(port);
    const pending = new Map<number, (a: Answer) => void>();
    ws.on('message', (data) => {
      const a = JSON.parse(String(data)) as Answer;
      const done = pending.get(a.id);
      pending.delete(a.id);
      done?.(a);
    });
    return {
      send: (op) =>
        new Promise((resolve) => {
          pending.set(op.id, resolve);
          ws.send(JSON.stringify(op));
        }),
      close: () => ws.close(),
    };
  }
  const actor =
    row === 'ws + XState transition()'
      ? pureRunner()
      : row === 'ws + hand-written chart'
        ? handRunner()
        : createActor(floorMachine).start();
  const ws = await openWs(port);
  actor.send({ type: 'OPEN', ws });
  ws.on('message', (data) => actor.send({ type: 'ANSWER', answer: JSON.parse(String(data)) as Answer }));
  return {
    send: (op) => new Promise((resolve) => actor.send({ type: 'SEND', op, settle: resolve })),
    close: () => {
      actor.stop();
      ws.close();
    },
  };
}

const serverFor = (row: Row) => (row === 'socket.io' ? 'socketio' : 'ws');

async function latencyRow(row: Row, n: number): Promise<{ opsPerSec: number; clientUs: number }> {
  const srv = await startServer(serverFor(row));
  try {
    const c = await open(row, srv.port);
    for (let i = 0; i < 2000; i++) await c.send(makeOp(i));
    const c0 = process.cpuUsage();
    const t0 = performance.now();
    for (let i = 0; i < n; i++) await c.send(makeOp(2000 + i));
    const ms = performance.now() - t0;
    const cpu = process.cpuUsage(c0);
    c.close();
    return { opsPerSec: (n / ms) * 1000, clientUs: (cpu.user + cpu.system) / n };
  } finally {
    await srv.stop();
  }
}

async function connectRow(row: Row, n = 1000, parallel = 100): Promise<{ ms: number; clientUs: number }> {
  const srv = await startServer(serverFor(row));
  const opened: Client[] = [];
  try {
    const warm = await Promise.all(Array.from({ length: 20 }, () => open(row, srv.port)));
    for (const w of warm) w.close();
    let next = 0;
    const c0 = process.cpuUsage();
    const t0 = performance.now();
    const lane = async () => {
      while (next < n) {
        const i = next++;
        const c = await open(row, srv.port);
        await c.send(makeOp(i));
        opened.push(c);
      }
    };
    await Promise.all(Array.from({ length: parallel }, lane));
    const ms = performance.now() - t0;
    const cpu = process.cpuUsage(c0);
    return { ms, clientUs: (cpu.user + cpu.system) / n };
  } finally {
    for (const c of opened) c.close();
    await srv.stop();
  }
}

/**
 * The chart's runtime alone, hot, no I/O: µs of wall time per operation (two events) over
 * 200,000 operations, for the actor, the pure `transition()` loop and the hand-written chart.
 * The socket is a stub whose `send` does nothing; the answer settles a no-op.
 */
function hotRow(): Record<'actor' | 'transition()' | 'hand-written', number> {
  const ops = 200_000;
  const stub = { send() {} } as unknown as WebSocket;
  const op = makeOp(0);
  const answer: Answer = { id: 0, ok: true };
  const settle = () => {};
  const time = (runner: { send(event: FloorEvent): void; stop(): void }) => {
    runner.send({ type: 'OPEN', ws: stub });
    const t0 = performance.now();
    for (let i = 0; i < ops; i++) {
      runner.send({ type: 'SEND', op, settle });
      runner.send({ type: 'ANSWER', answer });
    }
    const us = ((performance.now() - t0) * 1000) / ops;
    runner.stop();
    return us;
  };
  return {
    actor: time(createActor(floorMachine).start()),
    'transition()': time(pureRunner()),
    'hand-written': time(handRunner()),
  };
}

const runs = Number(process.env.RUNS ?? 3);
const n = Number(process.env.N ?? 5000);
const only = new Set((process.env.FLOOR_ONLY ?? 'latency,connect').split(','));
const fmt = (v: number) => v.toFixed(0).padStart(6);
for (let run = 1; run <= runs; run++) {
  if (only.has('hot')) {
    const r = hotRow();
    console.log(
      `run ${run} hot, no I/O, µs per op (2 events): actor ${r.actor.toFixed(2)}, transition() ${r['transition()'].toFixed(2)}, hand-written ${r['hand-written'].toFixed(2)}`,
    );
  }
  if (only.has('latency')) {
    const got = new Map<Row, { opsPerSec: number; clientUs: number }>();
    for (const row of ROWS) got.set(row, await latencyRow(row, n));
    const sio = got.get('socket.io')!;
    for (const row of ROWS) {
      const r = got.get(row)!;
      console.log(
        `run ${run} 1 in flight ${row.padEnd(20)} ${fmt(r.opsPerSec)} ops/s ${fmt(r.clientUs)} µs client CPU/op (${(r.clientUs / sio.clientUs).toFixed(2)}× socket.io)`,
      );
    }
  }
  if (only.has('connect')) {
    const got = new Map<Row, { ms: number; clientUs: number }>();
    for (const row of ROWS) got.set(row, await connectRow(row));
    const sio = got.get('socket.io')!;
    for (const row of ROWS) {
      const r = got.get(row)!;
      console.log(
        `run ${run} connect 1,000 ${row.padEnd(20)} ${fmt(r.ms)} ms (${(r.ms / sio.ms).toFixed(2)}×) ${fmt(r.clientUs)} µs client CPU/client (${(r.clientUs / sio.clientUs).toFixed(2)}×)`,
      );
    }
  }
}
process.exit(0);
