/**
 * `npm run bench`: syncwire against socket.io 4.8 and raw `ws` in one run, on 127.0.0.1,
 * each server in its own child process and the clients in this one. Every measure is taken
 * BENCH_RUNS times (default 5), contenders interleaved and their order rotated each run;
 * the report gives medians, min–max spread and the ratios taken within each run. Writes
 * bench/results.json and bench/results.md. Method and notes: docs/benchmarks.md.
 *
 * Environment: BENCH_RUNS, BENCH_OPS (throughput ops, default 20000), BENCH_LATENCY (round
 * trips, default 2000), BENCH_CONNECTIONS (default 1000), BENCH_REPLAY (syncwire, default
 * 10000), BENCH_SIO_REPLAY (socket.io, default 1000), BENCH_ONLY (comma list of measures:
 * throughput,latency,memory,replay,bundle).
 */
import { writeFileSync } from 'node:fs';
import { cpus } from 'node:os';
import { performance } from 'node:perf_hooks';
import { type BundleResult, bundleSizes } from './bundle.js';
import { SYSTEMS, type System } from './proc.js';
import { latency, memoryPerConnection, opBytes, replay, throughput, throughputAt } from './scenarios.js';
import { cell, markdownTable, num, ratioCell, ratios, type Spread, summarize, textTable } from './stats.js';

const env = process.env;
const int = (v: string | undefined, d: number) =>
  v && Number.isFinite(Number(v)) ? Math.max(1, Math.floor(Number(v))) : d;
const RUNS = int(env.BENCH_RUNS, 5);
const SIZES = {
  ops: int(env.BENCH_OPS, 20_000),
  latency: int(env.BENCH_LATENCY, 2000),
  connections: int(env.BENCH_CONNECTIONS, 1000),
  replay: int(env.BENCH_REPLAY, 10_000),
  sioReplay: int(env.BENCH_SIO_REPLAY, 1000),
};
const ALL = ['throughput', 'latency', 'memory', 'replay', 'bundle'] as const;
type Measure = (typeof ALL)[number];
const ONLY = new Set<Measure>((env.BENCH_ONLY ? env.BENCH_ONLY.split(',') : ALL) as Measure[]);

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

const started = performance.now();
log(
  `syncwire bench: ${RUNS} runs, ${cpus().length} cores (${cpus()[0]?.model ?? '?'}), Node ${process.version}, op ${opBytes} bytes`,
);

for (let run = 0; run < RUNS; run++) {
  log(`run ${run + 1}/${RUNS}`);
  if (ONLY.has('throughput')) {
    // syncwire@64 (syncwire held to the others' 64 outstanding operations) is a reference,
    // not a target; it takes its turn in the rotation like the others.
    for (const v of order([...SYSTEMS, 'syncwire@64'] as const, run)) {
      const s: System = v === 'syncwire@64' ? 'syncwire' : v;
      await attempt(`throughput ${v}`, async () => {
        const r = v === 'syncwire@64' ? await throughputAt(s, SIZES.ops, 64) : await throughput(s, SIZES.ops);
        const key = v === 'syncwire@64' ? 'syncwire64' : s;
        record(`tp.${key}`, run, r.opsPerSec);
        record(`tpCpuC.${key}`, run, r.clientCpuUs);
        record(`tpCpuS.${key}`, run, r.serverCpuUs);
        log(
          `  throughput ${NAMES[s].padEnd(9)} ${num(r.opsPerSec)} ops/s (${r.window} in flight); CPU/op client ${num(r.clientCpuUs)} µs, server ${num(r.serverCpuUs)} µs`,
        );
      });
    }
  }
  if (ONLY.has('latency')) {
    for (const s of order(SYSTEMS, run)) {
      await attempt(`latency ${s}`, async () => {
        const r = await latency(s, SIZES.latency);
        record(`p50.${s}`, run, r.p50us);
        record(`p99.${s}`, run, r.p99us);
        record(`latCpuC.${s}`, run, r.clientCpuUs);
        record(`latCpuS.${s}`, run, r.serverCpuUs);
        log(
          `  latency    ${NAMES[s].padEnd(9)} p50 ${num(r.p50us)} µs, p99 ${num(r.p99us)} µs; CPU/op client ${num(r.clientCpuUs)} µs, server ${num(r.serverCpuUs)} µs`,
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
          `  memory     ${NAMES[s].padEnd(9)} ${num(r.heapPerConn)} B heap+ext, ${num(r.rssPerConn)} B rss per connection`,
        );
      });
    }
  }
  if (ONLY.has('replay')) {
    for (const s of order(['syncwire', 'socketio'] as const, run)) {
      await attempt(`replay ${s}`, async () => {
        const n = s === 'syncwire' ? SIZES.replay : SIZES.sioReplay;
        const r = await replay(s, n);
        record(`replay.${s}`, run, r.perMsgUs);
        record(`replayMs.${s}`, run, r.ms);
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
          `  replay     ${NAMES[s].padEnd(9)} ${n} msgs in ${num(r.ms)} ms = ${num(r.perMsgUs)} µs/msg, lost ${r.lost}, dup ${r.duplicated}, recovered ${r.recovered}`,
        );
      });
    }
  }
}

let bundles: { syncwire: BundleResult; socketio: BundleResult } | undefined;
if (ONLY.has('bundle')) {
  await attempt('bundle', async () => {
    bundles = await bundleSizes();
    log(
      `bundle: syncwire ${num(bundles.syncwire.gzipBytes / 1000)} kB gz, socket.io-client ${num(bundles.socketio.gzipBytes / 1000)} kB gz`,
    );
  });
}

// ---- report -----------------------------------------------------------------------------

const S = (key: string): Spread => summarize(series[key] ?? []);
const R = (a: string, b: string): Spread => ratios(series[a] ?? [], series[b] ?? []);
/** How many runs satisfied `ok` on the same-run ratio. */
const runsMeeting = (a: string, b: string, ok: (r: number) => boolean) => {
  const x = series[a] ?? [];
  const y = series[b] ?? [];
  let k = 0;
  let n = 0;
  for (let i = 0; i < RUNS; i++) {
    if (!Number.isFinite(x[i]!) || !Number.isFinite(y[i]!)) continue;
    n++;
    if (ok(x[i]! / y[i]!)) k++;
  }
  return { k, n };
};
const verdict = (checks: Array<{ k: number; n: number }>, medianOk: boolean) => {
  if (checks.some((c) => c.n === 0)) return 'not measured';
  const worst = Math.min(...checks.map((c) => c.k));
  const n = checks[0]!.n;
  return `${medianOk ? 'met' : 'MISSED'} (${worst}/${n} runs)`;
};

/** A row with the three contenders and the two same-run ratios, no target. */
const plainRow = (label: string, key: string, note = '(reported)') => [
  label,
  cell(S(`${key}.syncwire`)),
  cell(S(`${key}.socketio`)),
  cell(S(`${key}.ws`)),
  ratioCell(R(`${key}.syncwire`, `${key}.socketio`)),
  ratioCell(R(`${key}.syncwire`, `${key}.ws`)),
  note,
  '',
];

const header = [
  'measure',
  'syncwire',
  'socket.io',
  'raw ws',
  'syncwire ÷ socket.io',
  'syncwire ÷ raw ws',
  'target',
  'verdict',
];
const rows: string[][] = [];
if (ONLY.has('throughput')) {
  const a = runsMeeting('tp.syncwire', 'tp.socketio', (r) => r >= 2);
  const b = runsMeeting('tp.syncwire', 'tp.ws', (r) => r >= 1);
  rows.push([
    `acked ops/s, ${opBytes} B ops`,
    cell(S('tp.syncwire')),
    cell(S('tp.socketio')),
    cell(S('tp.ws')),
    ratioCell(R('tp.syncwire', 'tp.socketio')),
    ratioCell(R('tp.syncwire', 'tp.ws')),
    '≥ 2× sio, ≥ 1× ws',
    verdict([a, b], R('tp.syncwire', 'tp.socketio').median >= 2 && R('tp.syncwire', 'tp.ws').median >= 1),
  ]);
  rows.push([
    '↳ syncwire at 64 in flight (reference)',
    cell(S('tp.syncwire64')),
    '',
    '',
    ratioCell(R('tp.syncwire64', 'tp.socketio')),
    ratioCell(R('tp.syncwire64', 'tp.ws')),
    '',
    '',
  ]);
  rows.push(plainRow('↳ client CPU µs per op', 'tpCpuC'));
  rows.push(plainRow('↳ server CPU µs per op', 'tpCpuS'));
}
if (ONLY.has('latency')) {
  const a = runsMeeting('p50.syncwire', 'p50.ws', (r) => r <= 1.3);
  rows.push([
    'ack latency p50, µs',
    cell(S('p50.syncwire')),
    cell(S('p50.socketio')),
    cell(S('p50.ws')),
    ratioCell(R('p50.syncwire', 'p50.socketio')),
    ratioCell(R('p50.syncwire', 'p50.ws')),
    '≤ 1.3× raw ws',
    verdict([a], R('p50.syncwire', 'p50.ws').median <= 1.3),
  ]);
  rows.push([
    'ack latency p99, µs',
    cell(S('p99.syncwire')),
    cell(S('p99.socketio')),
    cell(S('p99.ws')),
    ratioCell(R('p99.syncwire', 'p99.socketio')),
    ratioCell(R('p99.syncwire', 'p99.ws')),
    '(reported)',
    '',
  ]);
  rows.push(plainRow('↳ client CPU µs per round trip', 'latCpuC'));
  rows.push(plainRow('↳ server CPU µs per round trip', 'latCpuS'));
}
if (ONLY.has('memory')) {
  const a = runsMeeting('heap.syncwire', 'heap.ws', (r) => r <= 1.5);
  const b = runsMeeting('rss.syncwire', 'rss.ws', (r) => r <= 1.5);
  rows.push([
    `server B/idle conn, heap+ext (${SIZES.connections})`,
    cell(S('heap.syncwire')),
    cell(S('heap.socketio')),
    cell(S('heap.ws')),
    ratioCell(R('heap.syncwire', 'heap.socketio')),
    ratioCell(R('heap.syncwire', 'heap.ws')),
    '≤ 1.5× raw ws',
    verdict([a], R('heap.syncwire', 'heap.ws').median <= 1.5),
  ]);
  rows.push([
    `server B/idle conn, RSS (${SIZES.connections})`,
    cell(S('rss.syncwire')),
    cell(S('rss.socketio')),
    cell(S('rss.ws')),
    ratioCell(R('rss.syncwire', 'rss.socketio')),
    ratioCell(R('rss.syncwire', 'rss.ws')),
    '≤ 1.5× raw ws',
    verdict([b], R('rss.syncwire', 'rss.ws').median <= 1.5),
  ]);
}
if (ONLY.has('replay')) {
  const a = runsMeeting('replay.syncwire', 'replay.socketio', (r) => r < 1);
  const clean = integrity.syncwireLost === 0 && integrity.syncwireDup === 0 && integrity.swNotRecovered === 0;
  rows.push([
    `replay µs/msg (${SIZES.replay} vs ${SIZES.sioReplay})`,
    cell(S('replay.syncwire')),
    cell(S('replay.socketio')),
    'n/a',
    ratioCell(R('replay.syncwire', 'replay.socketio')),
    '',
    '0 lost/dup, < socket.io',
    `${verdict([a], clean && R('replay.syncwire', 'replay.socketio').median < 1)}; lost ${integrity.syncwireLost}, dup ${integrity.syncwireDup} (socket.io: lost ${integrity.sioLost}, dup ${integrity.sioDup})`,
  ]);
  rows.push([
    '↳ replay total, ms',
    cell(S('replayMs.syncwire')),
    cell(S('replayMs.socketio')),
    '',
    '',
    '',
    '',
    '',
  ]);
}
if (bundles) {
  const sw = bundles.syncwire;
  const sio = bundles.socketio;
  const okWs = sw.wsInputs.length === 0;
  rows.push([
    'client bundle, kB min+gz',
    `${num(sw.gzipBytes / 1000)} (${num(sw.minBytes / 1000)} min)`,
    `${num(sio.gzipBytes / 1000)} (${num(sio.minBytes / 1000)} min)`,
    '',
    `${(sw.gzipBytes / sio.gzipBytes).toFixed(2)}×`,
    '',
    '≤ 25 kB, no ws',
    `${sw.gzipBytes <= 25_000 && okWs ? 'met' : 'MISSED'}${okWs ? '' : ` (ws bundled: ${sw.wsInputs.length} files)`}`,
  ]);
}

const NOTES = [
  `Throughput: syncwire calls send() as fast as its outbox takes operations (up to maxQueue 10,000 outstanding; the client batches up to maxBatch 100 per SYN, one SYN in flight); socket.io (ack callbacks, websocket transport) and raw ws (server answers {id, ok}) keep 64 in flight. ${SIZES.ops} ops after a warm-up; no server-side work.`,
  `Latency: one operation in flight, ${SIZES.latency} sequential round trips after a warm-up.`,
  'CPU per op: process.cpuUsage() of the client process and of the server child over the measured phase, divided by operations; steadier than wall time on a shared machine.',
  `Memory: measured inside the server process after forced GC, before and after opening ${SIZES.connections} idle connections; delta / ${SIZES.connections}.`,
  `Replay: syncwire closes a subscribed client, publishes ${SIZES.replay}, and a new client with the same storage (clientId, cursor) resubscribes; socket.io (connectionStateRecovery) has its transport closed, the server emits ${SIZES.sioReplay} to the room, the client reconnects. Timed from reconnecting to the last message; includes the handshake.`,
  'Bundle: esbuild, platform browser, ESM, minified, tree-shaken, gzip -9; nothing external (a node:* import would fail the build).',
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
  seconds: Math.round(elapsed),
};
console.log('');
console.log(textTable(header, rows));
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
console.log(`${RUNS} runs in ${meta.seconds} s on ${meta.cores} cores, ${meta.cpu}, Node ${meta.node}`);

const md = [
  '<!-- Generated by `npm run bench` (bench/run.ts); method and notes in docs/benchmarks.md. -->',
  '',
  `Measured ${meta.date.slice(0, 10)} on ${meta.cores} cores (${meta.cpu}), Node ${meta.node}, 127.0.0.1, each server in its own process; ${RUNS} runs, median (min–max), ratios taken within each run.`,
  '',
  markdownTable(header, rows),
  '',
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
writeFileSync(
  new URL('results.json', dir),
  `${formatJson({ meta, series, integrity, bundles, failures, summary: Object.fromEntries(Object.keys(series).map((k) => [k, S(k)])) })}\n`,
);
console.log('wrote bench/results.md and bench/results.json');
process.exit(failures.length ? 1 : 0);
