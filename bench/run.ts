/**
 * `npm run bench`: syncwire against socket.io 4.8 and raw `ws` in one run, on 127.0.0.1,
 * each server in its own child process and the clients in this one. Every measure is taken
 * BENCH_RUNS times (default 5), contenders interleaved and their order rotated each run;
 * the report gives medians, min–max spread and the ratios taken within each run, and checks
 * each target of issue 14 in every run (met in ≥ 80 % of the runs counts as met). Writes
 * bench/results.json and bench/results.md. Method and notes: docs/benchmarks.md.
 *
 * Environment: BENCH_RUNS, BENCH_OPS (64-in-flight ops, default 20000), BENCH_LATENCY
 * (sequential round trips at 1 in flight, default 2000), BENCH_CONNECT (clients connected,
 * default 1000), BENCH_CONNECTIONS (idle connections for memory, default 1000),
 * BENCH_REPLAY (missed messages on both sides, default 1000), BENCH_BIG_REPLAY (syncwire
 * alone, default 10000), BENCH_ONLY (comma list of measures:
 * throughput,latency,connect,memory,replay,bundle).
 */
import { writeFileSync } from 'node:fs';
import { cpus, loadavg } from 'node:os';
import { performance } from 'node:perf_hooks';
import { type BundleResult, bundleSizes } from './bundle.js';
import { SYSTEMS, type System } from './proc.js';
import {
  connectTime,
  latency,
  memoryPerConnection,
  opBytes,
  replay,
  throughput,
  throughputAt,
} from './scenarios.js';
import { cell, markdownTable, num, ratioCell, ratios, type Spread, summarize, textTable } from './stats.js';

const env = process.env;
const int = (v: string | undefined, d: number) =>
  v && Number.isFinite(Number(v)) ? Math.max(1, Math.floor(Number(v))) : d;
const RUNS = int(env.BENCH_RUNS, 5);
const SIZES = {
  ops: int(env.BENCH_OPS, 20_000),
  latency: int(env.BENCH_LATENCY, 2000),
  connect: int(env.BENCH_CONNECT, 1000),
  connections: int(env.BENCH_CONNECTIONS, 1000),
  replay: int(env.BENCH_REPLAY, 1000),
  bigReplay: int(env.BENCH_BIG_REPLAY, 10_000),
};
const ALL = ['throughput', 'latency', 'connect', 'memory', 'replay', 'bundle'] as const;
type Measure = (typeof ALL)[number];
const ONLY = new Set<Measure>((env.BENCH_ONLY ? env.BENCH_ONLY.split(',') : ALL) as Measure[]);
/** A target counts as met when its per-run check passes in at least this share of the runs (4 of 5). */
const MET_SHARE = 0.8;

const NAMES: Record<System, string> = { syncwire: 'syncwire', socketio: 'socket.io', ws: 'raw ws' };

/** series[key] = one value per run (NaN when that run failed). */
const series: Record<string, number[]> = {};
const failures: string[] = [];
const integrity = {
  syncwireLost: 0,
  syncwireDup: 0,
  sioLost: 0,
  sioDup: 0,
  swNotRecovered: 0,
  sioNotRecovered: 0,
};
const record = (key: string, run: number, value: number) => {
  let values = series[key];
  if (!values) {
    values = Array.from({ length: RUNS }, () => Number.NaN);
    series[key] = values;
  }
  values[run] = value;
};
const log = (msg: string) => process.stderr.write(`${msg}\n`);
const gc = () => (globalThis as { gc?: () => void }).gc?.();
const load = () => loadavg().map((x) => x.toFixed(2));

/** Rotate the contenders' order each run so that none always goes first (JIT, heat). */
const order = <T>(list: readonly T[], run: number): T[] => list.map((_, i) => list[(i + run) % list.length]!);

async function attempt(what: string, fn: () => Promise<void>): Promise<void> {
  gc();
  try {
    await fn();
  } catch (err) {
    failures.push(`${what}: ${(err as Error).message}`);
    log(`  ✗ ${what}: ${(err as Error).message}`);
  }
}

// ---- targets (issue 14), checked within each run ------------------------------------------

interface Target {
  label: string;
  /** The same-run value the target bounds (a ratio, or a 0/1 flag); NaN when not measured. */
  value(run: number): number;
  ok(v: number): boolean;
  /** How `value` is shown. */
  show(v: number): string;
}
const at = (key: string, run: number) => series[key]?.[run] ?? Number.NaN;
const ratioAt = (a: string, b: string) => (run: number) => at(a, run) / at(b, run);
const x = (v: number) => `${v.toFixed(2)}×`;
const TARGETS: Target[] = [];
if (ONLY.has('latency')) {
  TARGETS.push(
    {
      label: 'acked ops/s, 1 in flight ≥ 1.0× socket.io',
      value: ratioAt('seq.syncwire', 'seq.socketio'),
      ok: (v) => v >= 1,
      show: x,
    },
    {
      label: 'ack latency p50, 1 in flight ≤ 1.0× socket.io',
      value: ratioAt('p50.syncwire', 'p50.socketio'),
      ok: (v) => v <= 1,
      show: x,
    },
    {
      label: 'client CPU per op, 1 in flight ≤ 1.0× socket.io',
      value: ratioAt('latCpuC.syncwire', 'latCpuC.socketio'),
      ok: (v) => v <= 1,
      show: x,
    },
    {
      label: 'server CPU per op, 1 in flight ≤ 1.0× socket.io',
      value: ratioAt('latCpuS.syncwire', 'latCpuS.socketio'),
      ok: (v) => v <= 1,
      show: x,
    },
  );
}
if (ONLY.has('throughput')) {
  TARGETS.push({
    label: 'acked ops/s, 64 in flight ≥ 2.0× socket.io',
    value: ratioAt('tp.syncwire', 'tp.socketio'),
    ok: (v) => v >= 2,
    show: x,
  });
}
if (ONLY.has('connect')) {
  TARGETS.push({
    label: `time to connect ${SIZES.connect} clients ≤ 1.0× socket.io`,
    value: ratioAt('connect.syncwire', 'connect.socketio'),
    ok: (v) => v <= 1,
    show: x,
  });
}
if (ONLY.has('replay')) {
  TARGETS.push(
    {
      label: `${SIZES.replay} missed messages recovered ≤ 1.0× socket.io (0 lost, 0 dup)`,
      value: (run) =>
        at('replayClean.syncwire', run) === 1
          ? at('replayMs.syncwire', run) / at('replayMs.socketio', run)
          : Infinity,
      ok: (v) => v <= 1,
      show: (v) => (v === Infinity ? 'lost/dup' : x(v)),
    },
    {
      label: `${SIZES.bigReplay} recovered, server heap bounded (peak growth ≤ 3× the ${SIZES.replay} replay's)`,
      value: (run) =>
        at('bigClean.syncwire', run) === 1
          ? at('bigHeap.syncwire', run) / at('replayHeap.syncwire', run)
          : Infinity,
      ok: (v) => v <= 3,
      show: (v) => (v === Infinity ? 'lost/dup' : x(v)),
    },
  );
}
if (ONLY.has('memory')) {
  TARGETS.push(
    {
      label: 'idle memory per connection (heap+external) ≤ 1.1× raw ws',
      value: ratioAt('heap.syncwire', 'heap.ws'),
      ok: (v) => v <= 1.1,
      show: x,
    },
    {
      label: 'idle memory per connection (RSS) ≤ 1.1× raw ws',
      value: ratioAt('rss.syncwire', 'rss.ws'),
      ok: (v) => v <= 1.1,
      show: x,
    },
  );
}

const started = performance.now();
const loadSamples: number[][] = [];
const loadTimer = setInterval(() => loadSamples.push(loadavg()), 10_000);
loadTimer.unref();
const loadAtStart = loadavg();
log(
  `syncwire bench: ${RUNS} runs, ${cpus().length} cores (${cpus()[0]?.model ?? '?'}), Node ${process.version}, op ${opBytes} bytes, load average ${load().join(' ')}`,
);

for (let run = 0; run < RUNS; run++) {
  log(`run ${run + 1}/${RUNS} (load average ${load().join(' ')})`);
  if (ONLY.has('latency')) {
    for (const s of order(SYSTEMS, run)) {
      await attempt(`1 in flight ${s}`, async () => {
        const r = await latency(s, SIZES.latency);
        record(`seq.${s}`, run, r.opsPerSec);
        record(`p50.${s}`, run, r.p50us);
        record(`p99.${s}`, run, r.p99us);
        record(`latCpuC.${s}`, run, r.clientCpuUs);
        record(`latCpuS.${s}`, run, r.serverCpuUs);
        log(
          `  1 in flight  ${NAMES[s].padEnd(9)} ${num(r.opsPerSec)} ops/s, p50 ${num(r.p50us)} µs, p99 ${num(r.p99us)} µs; CPU/op client ${num(r.clientCpuUs)} µs, server ${num(r.serverCpuUs)} µs`,
        );
      });
    }
  }
  if (ONLY.has('throughput')) {
    // syncwire@outbox (send() as fast as the outbox takes them, up to maxQueue) is a
    // reference, not a target; it takes its turn in the rotation like the others.
    for (const v of order([...SYSTEMS, 'syncwire@outbox'] as const, run)) {
      const s: System = v === 'syncwire@outbox' ? 'syncwire' : v;
      await attempt(`64 in flight ${v}`, async () => {
        const r =
          v === 'syncwire@outbox' ? await throughput(s, SIZES.ops) : await throughputAt(s, SIZES.ops, 64);
        const key = v === 'syncwire@outbox' ? 'syncwireOutbox' : s;
        record(`tp.${key}`, run, r.opsPerSec);
        record(`tpCpuC.${key}`, run, r.clientCpuUs);
        record(`tpCpuS.${key}`, run, r.serverCpuUs);
        log(
          `  throughput   ${v.padEnd(9)} ${num(r.opsPerSec)} ops/s (${r.window} in flight); CPU/op client ${num(r.clientCpuUs)} µs, server ${num(r.serverCpuUs)} µs`,
        );
      });
    }
  }
  if (ONLY.has('connect')) {
    for (const s of order(SYSTEMS, run)) {
      await attempt(`connect ${s}`, async () => {
        const r = await connectTime(s, SIZES.connect);
        if (r.ready !== r.clients) throw new Error(`${r.ready} of ${r.clients} clients ready`);
        record(`connect.${s}`, run, r.ms);
        record(`connectCpuC.${s}`, run, r.clientCpuUs);
        record(`connectCpuS.${s}`, run, r.serverCpuUs);
        log(
          `  connect      ${NAMES[s].padEnd(9)} ${r.clients} clients open + 1 round trip each in ${num(r.ms)} ms, CPU µs per client: client ${num(r.clientCpuUs)}, server ${num(r.serverCpuUs)}`,
        );
      });
    }
  }
  if (ONLY.has('memory')) {
    for (const s of order(SYSTEMS, run)) {
      await attempt(`memory ${s}`, async () => {
        const r = await memoryPerConnection(s, SIZES.connections);
        record(`heap.${s}`, run, r.heapPerConn);
        record(`rss.${s}`, run, r.rssPerConn);
        log(
          `  memory       ${NAMES[s].padEnd(9)} ${num(r.heapPerConn)} B heap+ext, ${num(r.rssPerConn)} B rss per connection`,
        );
      });
    }
  }
  if (ONLY.has('replay')) {
    for (const v of order(['syncwire', 'socketio', 'syncwire@big'] as const, run)) {
      const s = v === 'socketio' ? 'socketio' : 'syncwire';
      const big = v === 'syncwire@big';
      await attempt(`replay ${v}`, async () => {
        const n = big ? SIZES.bigReplay : SIZES.replay;
        const r = await replay(s, n);
        const clean = r.lost === 0 && r.duplicated === 0 && r.recovered ? 1 : 0;
        if (big) {
          record('bigMs.syncwire', run, r.ms);
          record('bigHeap.syncwire', run, r.serverPeakBytes);
          record('bigClean.syncwire', run, clean);
        } else {
          record(`replayMs.${s}`, run, r.ms);
          record(`replayHeap.${s}`, run, r.serverPeakBytes);
          record(`replayClean.${s}`, run, clean);
          record(`replayCpu.${s}`, run, r.clientCpuUs);
        }
        if (s === 'syncwire') {
          integrity.syncwireLost += r.lost;
          integrity.syncwireDup += r.duplicated;
          if (!r.recovered) integrity.swNotRecovered++;
        } else {
          integrity.sioLost += r.lost;
          integrity.sioDup += r.duplicated;
          if (!r.recovered) integrity.sioNotRecovered++;
        }
        log(
          `  replay       ${NAMES[s].padEnd(9)} ${n} msgs in ${num(r.ms)} ms, server peak +${num(r.serverPeakBytes / 1e6)} MB, client ${num(r.clientCpuUs)} µs/msg, lost ${r.lost}, dup ${r.duplicated}, recovered ${r.recovered}`,
        );
      });
    }
  }
  const marks = TARGETS.map((t) => {
    const v = t.value(run);
    return `${Number.isNaN(v) ? 'not measured' : t.ok(v) ? 'met' : 'MISSED'} (${Number.isNaN(v) ? '–' : t.show(v)})`;
  });
  log(`  targets, run ${run + 1}:`);
  TARGETS.forEach((t, i) => {
    log(`    ${marks[i]!.padEnd(22)} ${t.label}`);
  });
}
clearInterval(loadTimer);
const loadAtEnd = loadavg();

let bundles: { syncwire: BundleResult; socketio: BundleResult; libraries: BundleResult } | undefined;
if (ONLY.has('bundle')) {
  await attempt('bundle', async () => {
    bundles = await bundleSizes();
    log(
      `bundle: syncwire ${num(bundles.syncwire.gzipBytes / 1000)} kB gz, socket.io-client ${num(bundles.socketio.gzipBytes / 1000)} kB gz, xstate + rxjs + idb alone ${num(bundles.libraries.gzipBytes / 1000)} kB gz`,
    );
  });
}

// ---- report -----------------------------------------------------------------------------

const S = (key: string): Spread => summarize(series[key] ?? []);
const R = (a: string, b: string): Spread => ratios(series[a] ?? [], series[b] ?? []);

/** A row with the three contenders and the two same-run ratios. */
const row = (label: string, key: string, scale = 1) => {
  const sc = (sp: Spread): Spread => ({
    ...sp,
    median: sp.median * scale,
    min: sp.min * scale,
    max: sp.max * scale,
  });
  return [
    label,
    cell(sc(S(`${key}.syncwire`))),
    cell(sc(S(`${key}.socketio`))),
    cell(sc(S(`${key}.ws`))),
    ratioCell(R(`${key}.syncwire`, `${key}.socketio`)),
    ratioCell(R(`${key}.syncwire`, `${key}.ws`)),
  ];
};

const header = ['measure', 'syncwire', 'socket.io', 'raw ws', 'syncwire ÷ socket.io', 'syncwire ÷ raw ws'];
const rows: string[][] = [];
if (ONLY.has('latency')) {
  rows.push(row('acked ops/s, 1 in flight', 'seq'));
  rows.push(row('↳ ack latency p50, µs', 'p50'));
  rows.push(row('↳ ack latency p99, µs', 'p99'));
  rows.push(row('↳ client CPU µs per op', 'latCpuC'));
  rows.push(row('↳ server CPU µs per op', 'latCpuS'));
}
if (ONLY.has('throughput')) {
  rows.push(row('acked ops/s, 64 in flight', 'tp'));
  rows.push(row('↳ client CPU µs per op', 'tpCpuC'));
  rows.push(row('↳ server CPU µs per op', 'tpCpuS'));
  rows.push([
    '↳ syncwire, outbox full (up to 10,000 in flight; reference)',
    cell(S('tp.syncwireOutbox')),
    '',
    '',
    ratioCell(R('tp.syncwireOutbox', 'tp.socketio')),
    ratioCell(R('tp.syncwireOutbox', 'tp.ws')),
  ]);
}
if (ONLY.has('connect')) {
  rows.push(row(`${SIZES.connect} clients connected (+1 round trip each), ms`, 'connect'));
  rows.push(row('↳ client CPU µs per client', 'connectCpuC'));
  rows.push(row('↳ server CPU µs per client', 'connectCpuS'));
}
if (ONLY.has('replay')) {
  rows.push([
    `${SIZES.replay} missed messages recovered after a drop, ms`,
    cell(S('replayMs.syncwire')),
    cell(S('replayMs.socketio')),
    'n/a',
    ratioCell(R('replayMs.syncwire', 'replayMs.socketio')),
    '',
  ]);
  rows.push([
    '↳ server peak heap+ext growth, MB',
    cell(summarize((series['replayHeap.syncwire'] ?? []).map((v) => v / 1e6))),
    cell(summarize((series['replayHeap.socketio'] ?? []).map((v) => v / 1e6))),
    '',
    ratioCell(R('replayHeap.syncwire', 'replayHeap.socketio')),
    '',
  ]);
  rows.push([
    '↳ client CPU µs per message',
    cell(S('replayCpu.syncwire')),
    cell(S('replayCpu.socketio')),
    '',
    ratioCell(R('replayCpu.syncwire', 'replayCpu.socketio')),
    '',
  ]);
  rows.push([
    `syncwire: ${SIZES.bigReplay} missed messages recovered, ms`,
    cell(S('bigMs.syncwire')),
    '',
    '',
    '',
    '',
  ]);
  rows.push([
    '↳ server peak heap+ext growth, MB',
    cell(summarize((series['bigHeap.syncwire'] ?? []).map((v) => v / 1e6))),
    '',
    '',
    '',
    '',
  ]);
}
if (ONLY.has('memory')) {
  rows.push(row(`server B per idle connection, heap+ext (${SIZES.connections})`, 'heap'));
  rows.push(row(`server B per idle connection, RSS (${SIZES.connections})`, 'rss'));
}
if (bundles) {
  const sw = bundles.syncwire;
  const sio = bundles.socketio;
  rows.push([
    'client bundle, kB min+gz',
    `${num(sw.gzipBytes / 1000)} (${num(sw.minBytes / 1000)} min)`,
    `${num(sio.gzipBytes / 1000)} (${num(sio.minBytes / 1000)} min)`,
    '',
    `${(sw.gzipBytes / sio.gzipBytes).toFixed(2)}×`,
    '',
  ]);
  const lib = bundles.libraries;
  rows.push([
    '↳ xstate + rxjs + idb alone (what the client imports from them)',
    `${num(lib.gzipBytes / 1000)} (${num(lib.minBytes / 1000)} min)`,
    '',
    '',
    '',
    '',
  ]);
}

/** Targets: per-run marks, runs met, the median (min–max) of the same-run value, verdict. */
const tHeader = ['target (issue 14)', 'per run', 'runs met', 'same-run value, median (min–max)', 'verdict'];
const tRows: string[][] = TARGETS.map((t) => {
  const values = Array.from({ length: RUNS }, (_, run) => t.value(run));
  const measured = values.filter((v) => !Number.isNaN(v));
  const k = measured.filter((v) => t.ok(v)).length;
  const n = measured.length;
  const finite = summarize(measured.filter((v) => Number.isFinite(v)));
  const perRun = values.map((v) => (Number.isNaN(v) ? '·' : t.ok(v) ? '✓' : '✗')).join('');
  return [
    t.label,
    perRun,
    `${k}/${n}`,
    finite.n === 0 ? '–' : ratioCell(finite),
    n === 0 ? 'not measured' : k >= Math.ceil(MET_SHARE * n) ? 'met' : 'MISSED',
  ];
});
if (bundles) {
  const sw = bundles.syncwire;
  const okWs = sw.wsInputs.length === 0;
  const ok = sw.gzipBytes <= 25_000 && okWs;
  tRows.push([
    'client bundle ≤ 25 kB min+gzip, no ws',
    ok ? '✓' : '✗',
    ok ? '1/1' : '0/1',
    `${num(sw.gzipBytes / 1000)} kB${okWs ? '' : ` (ws bundled: ${sw.wsInputs.length} files)`}`,
    ok ? 'met' : 'MISSED',
  ]);
}

const NOTES = [
  `1 in flight: ${SIZES.latency} sequential round trips after a warm-up, every contender: send one ~${opBytes}-byte JSON operation, wait for its acknowledgement (syncwire: send() resolved with its result; socket.io: ack callback; raw ws: the server's {id, ok}). Ops/s = round trips / wall time; p50/p99 per round trip.`,
  `64 in flight: at most 64 unacknowledged operations for every contender, ${SIZES.ops} ops after a warm-up; no server-side work. The reference row lets syncwire fill its outbox (up to maxQueue 10,000; it batches up to maxBatch 100 per SYN, one SYN in flight).`,
  'CPU per op: process.cpuUsage() (user + system) of the client process and of the server child over the measured phase, divided by operations; steadier than wall time on a shared machine.',
  `Connect: ${SIZES.connect} clients, at most 100 dialling at once (a sliding window), each until open (syncwire: state open, after its handshake) and one operation acknowledged; from the first dial to the last acknowledgement.`,
  `Replay: ${SIZES.replay} missed messages on both sides. both clients have their transport closed under them after one message; once the server saw the disconnect it publishes (syncwire: to the channel, its redial held back meanwhile; socket.io, connectionStateRecovery: emits to the room), then the client reconnects (syncwire by itself, from its cursor). Timed from the redial to the last message, handshake included; every message checked (0 lost, 0 duplicated, recovered). syncwire also replays ${SIZES.bigReplay}. Server heap: heapUsed + external sampled every 1 ms in the server during the replay, peak minus the post-GC baseline taken after the messages were stored (includes young garbage: an upper bound of what was live).`,
  `Memory: measured inside the server process after forced GC, before and after opening ${SIZES.connections} idle connections; delta / ${SIZES.connections}.`,
  'Bundle: esbuild, platform browser, ESM, minified, tree-shaken, gzip -9; nothing external (a node:* import would fail the build). The "alone" row bundles only the values the client imports from xstate, rxjs and idb (read from its sources): what those libraries weigh before any syncwire code.',
  `Targets: each checked on the same-run ratio in every run (✓ met, ✗ missed, · not measured); a target counts as met when it is met in at least ${Math.round(MET_SHARE * 100)} % of the runs (4 of 5).`,
];
const elapsed = (performance.now() - started) / 1000;
const meta = {
  date: new Date().toISOString(),
  node: process.version,
  cpu: cpus()[0]?.model ?? 'unknown',
  cores: cpus().length,
  runs: RUNS,
  sizes: SIZES,
  opBytes,
  /** What was measured: the built package (`npm run bench` builds first) or the source through tsx. */
  build: {
    client: env.BENCH_CLIENT ?? 'src (tsx)',
    server: env.BENCH_SERVER ?? 'src (tsx)',
  },
  seconds: Math.round(elapsed),
  /** os.loadavg() (1, 5, 15 min) at the start, every 10 s during the runs, and at the end. */
  load: {
    start: loadAtStart,
    end: loadAtEnd,
    range1min: loadSamples.length
      ? [Math.min(...loadSamples.map((l) => l[0]!)), Math.max(...loadSamples.map((l) => l[0]!))]
      : [loadAtStart[0]!, loadAtEnd[0]!],
  },
};
const loadLine = `load average (1 min) ${meta.load.range1min.map((v) => v.toFixed(2)).join('–')} during the runs (start ${loadAtStart.map((v) => v.toFixed(2)).join(' ')}, end ${loadAtEnd.map((v) => v.toFixed(2)).join(' ')})`;
console.log('');
console.log(textTable(header, rows));
console.log('');
console.log(textTable(tHeader, tRows));
console.log('');
if (bundles) {
  const kb = (b: number) => `${(b / 1000).toFixed(1)} kB`;
  console.log(
    `syncwire bundle by package (minified): ${Object.entries(bundles.syncwire.byPackage)
      .sort((a, b) => b[1] - a[1])
      .map(([k, v]) => `${k} ${kb(v)}`)
      .join(
        ', ',
      )}; ws files in bundle: ${bundles.syncwire.wsInputs.length}; node: imports: ${bundles.syncwire.nodeImports.join(', ') || 'none'}`,
  );
}
if (failures.length) console.log(`failures (${failures.length}):\n  ${failures.join('\n  ')}`);
console.log(
  `${RUNS} runs in ${meta.seconds} s on ${meta.cores} cores, ${meta.cpu}, Node ${meta.node}; ${loadLine}`,
);

const md = [
  '<!-- Generated by `npm run bench` (bench/run.ts); method and notes in docs/benchmarks.md. -->',
  '',
  `Measured ${meta.date.slice(0, 10)} on ${meta.cores} cores (${meta.cpu}), Node ${meta.node}, 127.0.0.1, each server in its own process; ${RUNS} runs, median (min–max), ratios taken within each run; ${loadLine}. syncwire measured as client ${meta.build.client}, server ${meta.build.server}.`,
  '',
  markdownTable(header, rows),
  '',
  markdownTable(tHeader, tRows),
  '',
  ...(bundles
    ? [
        `syncwire bundle by package (minified bytes in the output): ${Object.entries(
          bundles.syncwire.byPackage,
        )
          .sort((p, q) => q[1] - p[1])
          .map(([k, v]) => `${k} ${(v / 1000).toFixed(1)} kB`)
          .join(', ')}.`,
        '',
      ]
    : []),
  ...NOTES.map((n) => `- ${n}`),
  '',
  ...(failures.length ? [`Failures: ${failures.join('; ')}`, ''] : []),
].join('\n');
const dir = new URL('.', import.meta.url);
writeFileSync(new URL('results.md', dir), md);
/**
 * JSON as the repository's formatter (biome) writes it, so a committed results.json passes
 * `npm run lint`: two-space indent, and arrays of numbers or strings on one line when they
 * fit. Numbers are rounded to 4 significant digits; more would be noise.
 */
function formatJson(value: unknown): string {
  const round = (_: string, v: unknown) =>
    typeof v === 'number' && Number.isFinite(v) && !Number.isInteger(v) ? Number(v.toPrecision(4)) : v;
  const text = JSON.stringify(value, round, 2);
  return text.replace(
    /\[\n((?:\s*(?:-?[\d.e+-]+|null|"[^"\n]*"),?\n)+)\s*\]/g,
    (whole, body: string, offset: number) => {
      const items = body
        .split('\n')
        .map((l) => l.trim().replace(/,$/, ''))
        .filter(Boolean);
      const line = `[${items.join(', ')}]`;
      const indent = text.slice(text.lastIndexOf('\n', offset) + 1, offset).length;
      return indent + line.length <= 110 ? line : whole;
    },
  );
}
/** The bundle results without esbuild's metafiles (thousands of lines each; `byPackage` is their summary). */
function withoutMetafiles<T extends Record<string, BundleResult>>(
  b: T,
): Record<keyof T, Omit<BundleResult, 'meta'>> {
  return Object.fromEntries(Object.entries(b).map(([k, { meta: _meta, ...rest }]) => [k, rest])) as Record<
    keyof T,
    Omit<BundleResult, 'meta'>
  >;
}
writeFileSync(
  new URL('results.json', dir),
  `${formatJson({ meta, series, integrity, bundles: bundles && withoutMetafiles(bundles), failures, targets: Object.fromEntries(tRows.map((r) => [r[0], { perRun: r[1], runsMet: r[2], value: r[3], verdict: r[4] }])), summary: Object.fromEntries(Object.keys(series).map((k) => [k, S(k)])) })}\n`,
);
console.log('wrote bench/results.md and bench/results.json');
process.exit(failures.length ? 1 : 0);
