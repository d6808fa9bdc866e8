/**
 * The benchmark scenarios, client side. Each one starts a fresh server child for its
 * contender (bench/servers/*), drives it from this process over 127.0.0.1, checks the
 * answers for correctness (every ack received and matched, nothing lost or duplicated), and
 * returns numbers. The same code runs `npm run bench` (bench/run.ts) and the smoke test
 * (test/bench.smoke.test.ts, tiny sizes, correctness only).
 */

import { resolve } from 'node:path';
import { performance } from 'node:perf_hooks';
import { pathToFileURL } from 'node:url';
import { filter, firstValueFrom, timeout as rxTimeout } from 'rxjs';
import { type Socket as SioSocket, io as sioConnect } from 'socket.io-client';
import { WebSocket } from 'ws';
import type { SyncClient } from '../src/client/index.js';
import * as sourceClient from '../src/client/index.js';
import { type ServerProc, type System, startServer } from './proc.js';

/**
 * The syncwire client the scenarios drive: its TypeScript source through tsx (the default),
 * or, with `BENCH_CLIENT=dist/src/client/index.js` (after `npm run build`), the built package
 * as it ships. tsx compiles with esbuild's `keepNames`, which wraps every named function
 * created at run time in a `__name(fn, 'name')` call (`Object.defineProperty`): the client's
 * per-client closures then cost more CPU and heap than they do in the package (issue 14,
 * connect row, docs/benchmarks.md "session 5"). socket.io and ws are always their built JS.
 */
const { createSyncClient }: typeof sourceClient = process.env.BENCH_CLIENT
  ? await import(pathToFileURL(resolve(process.env.BENCH_CLIENT)).href)
  : sourceClient;

/** ~200 bytes of JSON per operation (checked by `opBytes`), the same for every contender. */
const FILLER = 'x'.repeat(108);
export interface Op {
  id: number;
  type: 'set';
  doc: string;
  path: string;
  value: string;
  at: number;
}
export const makeOp = (i: number): Op => ({
  id: i,
  type: 'set',
  doc: `doc-${i % 97}`,
  path: 'fields/title',
  value: FILLER,
  at: 1_700_000_000_000 + i,
});
export const opBytes = JSON.stringify(makeOp(12_345)).length;
/** Payload filler of published messages, so a replayed message is about as big as an op. */
export const MSG_FILLER = 'y'.repeat(160);

interface Result {
  id: number;
  ok: boolean;
}

const swUrl = (port: number) => `ws://127.0.0.1:${port}/sync`;
const sioUrl = (port: number) => `http://127.0.0.1:${port}`;
const wsUrl = (port: number) => `ws://127.0.0.1:${port}`;

// ---- connecting, per contender ----------------------------------------------------------

function swClient(
  port: number,
  extra: Parameters<typeof createSyncClient>[0] extends infer O ? Partial<O> : never = {},
) {
  return createSyncClient<Op, Result>({ url: swUrl(port), WebSocket: WebSocket as never, ...extra });
}

async function swOpen(client: SyncClient<Op, Result>, ms = 10_000): Promise<void> {
  await firstValueFrom(
    client.state$.pipe(
      filter((s) => s === 'open'),
      rxTimeout(ms),
    ),
  );
}

function sioClient(port: number, opts: Parameters<typeof sioConnect>[1] = {}): SioSocket {
  return sioConnect(sioUrl(port), { transports: ['websocket'], forceNew: true, ...opts });
}

function sioOpen(socket: SioSocket, ms = 10_000): Promise<void> {
  if (socket.connected) return Promise.resolve();
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('socket.io: no connect')), ms);
    socket.once('connect', () => {
      clearTimeout(timer);
      resolve();
    });
    socket.once('connect_error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
  });
}

function wsOpen(port: number, ms = 10_000): Promise<WebSocket> {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(wsUrl(port), { perMessageDeflate: false });
    const timer = setTimeout(() => reject(new Error('ws: no open')), ms);
    ws.once('open', () => {
      clearTimeout(timer);
      resolve(ws);
    });
    ws.once('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
  });
}

function wsClose(ws: WebSocket): Promise<void> {
  if (ws.readyState === WebSocket.CLOSED) return Promise.resolve();
  return new Promise((resolve) => {
    ws.once('close', () => resolve());
    ws.close();
  });
}

/**
 * One acknowledged operation at a time or many: the three contenders behind one shape.
 * `window` bounds how many are unacknowledged at once.
 */
interface Driver {
  /** Send ops `from … from + n - 1`, at most `window` unacknowledged; resolves when all are acked. */
  run(from: number, n: number, window: number): Promise<void>;
  /** One operation, resolved when acknowledged. */
  one(i: number): Promise<void>;
  close(): Promise<void>;
}

class AckMismatch extends Error {}

/** Keep `window` in flight over a per-op `sendOne`; every ack must carry its op's id. */
function windowed(
  sendOne: (op: Op) => Promise<Result>,
  from: number,
  n: number,
  window: number,
): Promise<void> {
  return new Promise((resolve, reject) => {
    let next = from;
    const end = from + n;
    let acked = 0;
    let failed = false;
    const launch = () => {
      const op = makeOp(next++);
      sendOne(op).then(
        (r) => {
          if (failed) return;
          if (!r || r.id !== op.id || r.ok !== true) {
            failed = true;
            reject(new AckMismatch(`ack for ${op.id} was ${JSON.stringify(r)}`));
            return;
          }
          acked++;
          if (acked === n) resolve();
          else if (next < end) launch();
        },
        (err: unknown) => {
          failed = true;
          reject(err);
        },
      );
    };
    const first = Math.min(window, n);
    for (let k = 0; k < first; k++) launch();
  });
}

async function swDriver(port: number): Promise<Driver> {
  const client = swClient(port);
  await swOpen(client);
  return {
    run: (from, n, window) => windowed((op) => client.send(op), from, n, window),
    one: (i) => windowed((op) => client.send(op), i, 1, 1),
    close: () => client.close(),
  };
}

async function sioDriver(port: number): Promise<Driver> {
  const socket = sioClient(port, { reconnection: false });
  await sioOpen(socket);
  // Ack callbacks rather than emitWithAck: one promise less per operation, same wire.
  const sendOne = (op: Op) =>
    new Promise<Result>((resolve) => {
      socket.emit('op', op, resolve);
    });
  return {
    run: (from, n, window) => windowed(sendOne, from, n, window),
    one: (i) => windowed(sendOne, i, 1, 1),
    close: async () => {
      socket.disconnect();
    },
  };
}

async function wsDriver(port: number): Promise<Driver> {
  const ws = await wsOpen(port);
  const pending = new Map<number, (r: Result) => void>();
  ws.on('message', (data) => {
    const r = JSON.parse(String(data)) as Result;
    const done = pending.get(r.id);
    pending.delete(r.id);
    done?.(r);
  });
  const sendOne = (op: Op) =>
    new Promise<Result>((resolve) => {
      pending.set(op.id, resolve);
      ws.send(JSON.stringify(op));
    });
  return {
    run: (from, n, window) => windowed(sendOne, from, n, window),
    one: (i) => windowed(sendOne, i, 1, 1),
    close: () => wsClose(ws),
  };
}

const DRIVERS: Record<System, (port: number) => Promise<Driver>> = {
  syncwire: swDriver,
  socketio: sioDriver,
  ws: wsDriver,
};

async function withServer<T>(
  system: System,
  env: Record<string, string>,
  fn: (srv: ServerProc) => Promise<T>,
): Promise<T> {
  const srv = await startServer(system, env);
  try {
    return await fn(srv);
  } finally {
    await srv.stop();
  }
}

// ---- throughput -------------------------------------------------------------------------

/** CPU time used by this process so far, user + system, µs. */
const cpuNow = () => {
  const u = process.cpuUsage();
  return u.user + u.system;
};

/**
 * CPU time per operation of the client (this process) and of the server child over `fn`:
 * steadier than wall time on a shared machine, since waiting for a core is not counted.
 */
async function cpuPerOp(srv: ServerProc, ops: number, fn: () => Promise<void>) {
  const s0 = await srv.call<number>('cpu');
  const c0 = cpuNow();
  const t0 = performance.now();
  await fn();
  const ms = performance.now() - t0;
  const c1 = cpuNow();
  const s1 = await srv.call<number>('cpu');
  return { ms, clientCpuUs: (c1 - c0) / ops, serverCpuUs: (s1 - s0) / ops };
}

export interface ThroughputResult {
  /** Client (this process) and server CPU time per acknowledged operation, µs. */
  clientCpuUs: number;
  serverCpuUs: number;
  opsPerSec: number;
  ops: number;
  /** Operations acknowledged with their own result (the run rejects on any mismatch). */
  acked: number;
  window: number;
  ms: number;
}

/**
 * Acknowledged operations per second. syncwire: `send()` as fast as the outbox takes them
 * (window = its `maxQueue`, default 10,000; the client batches up to `maxBatch` per SYN, one
 * SYN in flight). socket.io and raw ws: 64 in flight. Warm-up of `warmup` ops first.
 */
export function throughput(system: System, ops: number, warmup?: number): Promise<ThroughputResult> {
  return throughputAt(system, ops, system === 'syncwire' ? 10_000 : 64, warmup);
}

/** Throughput with an explicit bound on unacknowledged operations. */
export async function throughputAt(
  system: System,
  ops: number,
  window: number,
  warmup = Math.min(5000, ops),
): Promise<ThroughputResult> {
  return withServer(system, {}, async (srv) => {
    const d = await DRIVERS[system](srv.port);
    try {
      await d.run(0, warmup, window);
      const { ms, clientCpuUs, serverCpuUs } = await cpuPerOp(srv, ops, () => d.run(warmup, ops, window));
      return { opsPerSec: (ops / ms) * 1000, ops, acked: ops, window, ms, clientCpuUs, serverCpuUs };
    } finally {
      await d.close();
    }
  });
}

// ---- latency ----------------------------------------------------------------------------

export interface LatencyResult {
  /** Acknowledged operations per second with one in flight: n / wall time of the measured phase. */
  opsPerSec: number;
  p50us: number;
  p99us: number;
  n: number;
  /** Client and server CPU time per round trip, µs. */
  clientCpuUs: number;
  serverCpuUs: number;
}

export const percentile = (sorted: number[], p: number): number => {
  if (sorted.length === 0) return Number.NaN;
  const k = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[k]!;
};

/**
 * One operation in flight: `n` sequential round trips after `warmup` of them. Gives the
 * acked ops/s at 1 in flight, the p50/p99 of each round trip, and CPU per operation.
 */
export async function latency(system: System, n: number, warmup = Math.min(2000, n)): Promise<LatencyResult> {
  return withServer(system, {}, async (srv) => {
    const d = await DRIVERS[system](srv.port);
    try {
      for (let i = 0; i < warmup; i++) await d.one(i);
      const samples: number[] = [];
      const { ms, clientCpuUs, serverCpuUs } = await cpuPerOp(srv, n, async () => {
        for (let i = 0; i < n; i++) {
          const t0 = performance.now();
          await d.one(warmup + i);
          samples.push((performance.now() - t0) * 1000);
        }
      });
      samples.sort((a, b) => a - b);
      return {
        opsPerSec: (n / ms) * 1000,
        p50us: percentile(samples, 50),
        p99us: percentile(samples, 99),
        n,
        clientCpuUs,
        serverCpuUs,
      };
    } finally {
      await d.close();
    }
  });
}

// ---- time to connect many clients -------------------------------------------------------

export interface ConnectResult {
  /** From the first dial to the last client's first acknowledged round trip, ms. */
  ms: number;
  /** Clients that opened and had their one operation acknowledged with its own result. */
  ready: number;
  clients: number;
  parallel: number;
  /** CPU µs per client over the timed phase, this process (the clients) and the server child. */
  clientCpuUs: number;
  serverCpuUs: number;
}

/** Open one client, send one operation, wait for its acknowledgement (checked by id). */
async function openAndRoundTrip(system: System, port: number, i: number): Promise<Closer> {
  const op = makeOp(i);
  const check = (r: Result) => {
    if (!r || r.id !== op.id || r.ok !== true)
      throw new AckMismatch(`ack for ${op.id} was ${JSON.stringify(r)}`);
  };
  switch (system) {
    case 'syncwire': {
      const c = swClient(port);
      await swOpen(c);
      check(await c.send(op));
      return c;
    }
    case 'socketio': {
      const s = sioClient(port, { reconnection: false });
      await sioOpen(s);
      check(
        await new Promise<Result>((resolve) => {
          s.emit('op', op, resolve);
        }),
      );
      return { close: () => void s.disconnect() };
    }
    case 'ws': {
      const ws = await wsOpen(port);
      check(
        await new Promise<Result>((resolve, reject) => {
          const timer = setTimeout(() => reject(new Error('ws: no ack')), 10_000);
          ws.once('message', (data) => {
            clearTimeout(timer);
            resolve(JSON.parse(String(data)) as Result);
          });
          ws.send(JSON.stringify(op));
        }),
      );
      return { close: () => wsClose(ws) };
    }
  }
}

/**
 * Time to connect `n` clients: each one is dialled, waits until open (syncwire: state
 * `open`, after its handshake; socket.io: `connect`; ws: `open`) and has one operation
 * acknowledged. At most `parallel` are in progress at once (a sliding window: the listen
 * backlog is finite, and a refused SYN would measure the kernel's retry timer). After
 * a warm-up of 20 clients opened and closed, so lazily loaded code is already in.
 */
export async function connectTime(system: System, n: number, parallel = 100): Promise<ConnectResult> {
  return withServer(system, {}, async (srv) => {
    const warm = await openMany(system, srv.port, 20);
    await Promise.all(warm.map((c) => c.close()));
    await waitConnections(srv, 0);
    const open: Closer[] = [];
    try {
      let next = 0;
      const s0 = await srv.call<number>('cpu');
      const c0 = process.cpuUsage();
      const t0 = performance.now();
      const lane = async () => {
        while (next < n) {
          const i = next++;
          open.push(await openAndRoundTrip(system, srv.port, i));
        }
      };
      await Promise.all(Array.from({ length: Math.min(parallel, n) }, lane));
      const ms = performance.now() - t0;
      const c = process.cpuUsage(c0);
      const s1 = await srv.call<number>('cpu');
      await waitConnections(srv, n);
      return {
        ms,
        ready: open.length,
        clients: n,
        parallel,
        clientCpuUs: (c.user + c.system) / n,
        serverCpuUs: (s1 - s0) / n,
      };
    } finally {
      await Promise.all(open.map((c) => c.close()));
    }
  });
}

// ---- memory per idle connection ---------------------------------------------------------

export interface MemoryResult {
  /** Bytes per connection: V8 heap used + external (Buffers), after GC. */
  heapPerConn: number;
  /** Bytes per connection: resident set size, after GC. */
  rssPerConn: number;
  connections: number;
}

interface Closer {
  close(): Promise<void> | void;
}

async function openIdle(system: System, port: number): Promise<Closer> {
  switch (system) {
    case 'syncwire': {
      const c = swClient(port);
      await swOpen(c);
      return c;
    }
    case 'socketio': {
      const s = sioClient(port, { reconnection: false });
      await sioOpen(s);
      return { close: () => void s.disconnect() };
    }
    case 'ws': {
      const ws = await wsOpen(port);
      return { close: () => wsClose(ws) };
    }
  }
}

/** Open `n` connections, at most `parallel` dialling at once (the listen backlog is finite). */
async function openMany(system: System, port: number, n: number, parallel = 50): Promise<Closer[]> {
  const out: Closer[] = [];
  for (let i = 0; i < n; i += parallel) {
    const batch = await Promise.all(
      Array.from({ length: Math.min(parallel, n - i) }, () => openIdle(system, port)),
    );
    out.push(...batch);
  }
  return out;
}

async function waitConnections(srv: ServerProc, n: number, ms = 30_000): Promise<void> {
  const deadline = Date.now() + ms;
  for (;;) {
    const k = await srv.call<number>('connections');
    if (k === n) return;
    if (Date.now() > deadline) throw new Error(`${srv.system}: server sees ${k} connections, expected ${n}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

/**
 * Server memory per idle connection: the server child measures itself after forced GC with
 * a few connections opened and closed (so lazily loaded code is already in), then with `n`
 * idle connections open; per connection = delta / n.
 */
export async function memoryPerConnection(system: System, n: number): Promise<MemoryResult> {
  return withServer(system, {}, async (srv) => {
    const warm = await openMany(system, srv.port, 20);
    await Promise.all(warm.map((c) => c.close()));
    await waitConnections(srv, 0);
    type Mem = { rss: number; heapUsed: number; external: number };
    const before = await srv.call<Mem>('memory');
    const conns = await openMany(system, srv.port, n);
    try {
      await waitConnections(srv, n);
      const after = await srv.call<Mem>('memory');
      return {
        heapPerConn: (after.heapUsed + after.external - before.heapUsed - before.external) / n,
        rssPerConn: (after.rss - before.rss) / n,
        connections: n,
      };
    } finally {
      await Promise.all(conns.map((c) => c.close()));
    }
  });
}

// ---- replay after a disconnect ----------------------------------------------------------

export interface ReplayResult {
  messages: number;
  /** From reconnecting to the last missed message received. */
  ms: number;
  perMsgUs: number;
  lost: number;
  duplicated: number;
  /** The system said it recovered the session / cursor (not a reset). */
  recovered: boolean;
  /**
   * Server heap + external growth during the replay, bytes: the peak of 1 ms samples minus
   * the baseline after GC taken once the missed messages were stored (bench/servers/common.ts).
   */
  serverPeakBytes: number;
  /**
   * CPU of this process (the client side) from the redial to the last message, µs per
   * message, `process.cpuUsage()` user + system (the wait loop's 1 ms polls included).
   */
  clientCpuUs: number;
}

/** Tally received message indexes `from … from + n - 1`; done when all arrived. */
class Tally {
  private readonly seen: Uint8Array;
  got = 0;
  dup = 0;
  stray = 0;
  constructor(
    readonly from: number,
    readonly n: number,
  ) {
    this.seen = new Uint8Array(n);
  }
  add(i: number): void {
    const k = i - this.from;
    if (!(k >= 0 && k < this.n)) {
      this.stray++;
      return;
    }
    if (this.seen[k]) this.dup++;
    else {
      this.seen[k] = 1;
      this.got++;
    }
  }
  get complete(): boolean {
    return this.got === this.n;
  }
}

function waitFor(cond: () => boolean, ms: number, what: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const deadline = Date.now() + ms;
    const tick = () => {
      if (cond()) return resolve();
      if (Date.now() > deadline) return reject(new Error(`timed out waiting for ${what}`));
      setTimeout(tick, 1);
    };
    tick();
  });
}

/**
 * syncwire, the same drop as socket.io's: a client subscribes and receives one message (so
 * it has a cursor), then its WebSocket is terminated under it (what a network drop looks
 * like). Its redials are held at a gate (the `url` function, called for each dial, waits)
 * while the server, once it has seen the disconnect, publishes `n`. Then the gate opens and
 * the client reconnects and resubscribes by itself from its cursor. Timed from the dial
 * passing the gate to the last of the `n` (handshake included), then a short grace period
 * to catch duplicates. Recovered = no `resets$` event (the cursor was honoured).
 */
async function swReplay(n: number): Promise<ReplayResult> {
  return withServer('syncwire', {}, async (srv) => {
    let socket: WebSocket | undefined;
    class Tapped extends WebSocket {
      constructor(...args: ConstructorParameters<typeof WebSocket>) {
        super(...args);
        socket = this;
      }
    }
    let gate: Promise<void> = Promise.resolve();
    let openGate = () => {};
    let timing = false;
    let t0 = Number.NaN;
    let cpu0 = process.cpuUsage();
    const client = createSyncClient<Op, Result>({
      url: async () => {
        await gate;
        if (timing && Number.isNaN(t0)) {
          t0 = performance.now();
          cpu0 = process.cpuUsage();
        }
        return swUrl(srv.port);
      },
      WebSocket: Tapped as never,
    });
    let resets = 0;
    client.resets$.subscribe(() => resets++);
    let tally = new Tally(0, 1);
    client.messages$.subscribe((m) => tally.add((m.payload as { i: number }).i));
    try {
      await client.subscribe('bench');
      await srv.call('publish', { channel: 'bench', n: 1, from: 0, filler: MSG_FILLER });
      await waitFor(() => tally.complete, 10_000, 'the first message');

      gate = new Promise<void>((resolve) => {
        openGate = resolve;
      });
      if (!socket) throw new Error('syncwire: no socket to drop');
      socket.terminate();
      await waitServer(srv, 'connections', 0);
      await srv.call('publish', { channel: 'bench', n, from: 1, filler: MSG_FILLER }, 120_000);

      await srv.call('watchStart');
      tally = new Tally(1, n);
      timing = true;
      openGate();
      await waitFor(() => tally.complete, 60_000, 'replayed messages');
      if (Number.isNaN(t0)) throw new Error('syncwire: the replay arrived without a redial through the gate');
      const ms = performance.now() - t0;
      const cpu = process.cpuUsage(cpu0);
      const heap = await srv.call<{ baseline: number; peak: number }>('watchStop');
      await new Promise((resolve) => setTimeout(resolve, 50));
      return {
        messages: n,
        ms,
        perMsgUs: (ms * 1000) / n,
        lost: n - tally.got,
        duplicated: tally.dup + tally.stray,
        recovered: resets === 0,
        serverPeakBytes: heap.peak - heap.baseline,
        clientCpuUs: (cpu.user + cpu.system) / n,
      };
    } finally {
      openGate();
      await client.close();
    }
  });
}

/** Poll a server counter until it equals `value` (bounded). */
async function waitServer(srv: ServerProc, cmd: string, value: number, ms = 10_000): Promise<void> {
  const deadline = Date.now() + ms;
  for (;;) {
    const k = await srv.call<number>(cmd);
    if (k === value) return;
    if (Date.now() > deadline) throw new Error(`${srv.system}: ${cmd} is ${k}, expected ${value}`);
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}

/**
 * socket.io with `connectionStateRecovery`: a client in the room receives one message (so it
 * has an offset), its transport is closed under it (`socket.io.engine.close()`, what a
 * network drop looks like), the server emits `n` to the room once it has seen the
 * disconnect, then the client reconnects. Timed from `connect()` to the last of the `n`.
 */
async function sioReplay(n: number): Promise<ReplayResult> {
  return withServer('socketio', { BENCH_RECOVERY: '1' }, async (srv) => {
    const socket = sioClient(srv.port, { reconnection: false });
    let tally = new Tally(0, 1);
    socket.on('msg', (m: { i: number }) => tally.add(m.i));
    await sioOpen(socket);
    await srv.call('publish', { n: 1, from: 0, filler: MSG_FILLER });
    await waitFor(() => tally.complete, 10_000, 'the first message');

    const down = new Promise<void>((resolve) => socket.once('disconnect', () => resolve()));
    socket.io.engine.close();
    await down;
    await srv.call('publish', { n, from: 1, filler: MSG_FILLER, whenEmpty: true }, 120_000);

    await srv.call('watchStart');
    tally = new Tally(1, n);
    const t0 = performance.now();
    const cpu0 = process.cpuUsage();
    socket.connect();
    await sioOpen(socket);
    await waitFor(() => tally.complete, 60_000, 'recovered messages');
    const ms = performance.now() - t0;
    const cpu = process.cpuUsage(cpu0);
    const heap = await srv.call<{ baseline: number; peak: number }>('watchStop');
    await new Promise((resolve) => setTimeout(resolve, 50));
    const recovered = socket.recovered;
    socket.disconnect();
    return {
      messages: n,
      ms,
      perMsgUs: (ms * 1000) / n,
      lost: n - tally.got,
      duplicated: tally.dup + tally.stray,
      recovered,
      serverPeakBytes: heap.peak - heap.baseline,
      clientCpuUs: (cpu.user + cpu.system) / n,
    };
  });
}

export function replay(system: 'syncwire' | 'socketio', n: number): Promise<ReplayResult> {
  return system === 'syncwire' ? swReplay(n) : sioReplay(n);
}
