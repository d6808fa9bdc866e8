/**
 * Client-side profiling driver (not part of `npm run bench`): runs syncwire's 1-in-flight and
 * throughput scenarios against a real server child, in this process, so that
 * `node --cpu-prof --import tsx bench/client-driver.ts` profiles the client alone.
 * DRIVER_ONLY=latency|throughput|full|connect|replay (comma-separated), DRIVER_N (default 5000;
 * connect opens DRIVER_N / 5 clients, replay replays 2 × DRIVER_N missed messages),
 * DRIVER_REPEAT (default 1: each selected scenario is run that many times), DRIVER_SYSTEM
 * (connect and replay: syncwire, the default, or socketio).
 */
import { connectTime, latency, replay, throughputAt } from './scenarios.js';

const n = Number(process.env.DRIVER_N ?? 5000);
const only = (process.env.DRIVER_ONLY ?? 'latency,throughput,full').split(',');
if (only.includes('latency')) {
  const r = await latency('syncwire', n, 2000);
  console.log(
    `latency: ${r.opsPerSec.toFixed(0)} ops/s p50 ${r.p50us.toFixed(0)} µs client ${r.clientCpuUs.toFixed(1)} µs/op server ${r.serverCpuUs.toFixed(1)} µs/op`,
  );
}
if (only.includes('throughput')) {
  const r = await throughputAt('syncwire', 4 * n, 64);
  console.log(
    `64 in flight: ${r.opsPerSec.toFixed(0)} ops/s client ${r.clientCpuUs.toFixed(1)} µs/op server ${r.serverCpuUs.toFixed(1)} µs/op`,
  );
}
if (only.includes('full')) {
  const r = await throughputAt('syncwire', 4 * n, 10_000);
  console.log(
    `outbox full: ${r.opsPerSec.toFixed(0)} ops/s client ${r.clientCpuUs.toFixed(1)} µs/op server ${r.serverCpuUs.toFixed(1)} µs/op`,
  );
}
for (let k = 0; k < Number(process.env.DRIVER_REPEAT ?? 1); k++) {
  if (only.includes('connect')) {
    const r = await connectTime((process.env.DRIVER_SYSTEM ?? 'syncwire') as 'syncwire' | 'socketio', n / 5);
    console.log(
      `connect ${r.clients}: ${r.ms.toFixed(0)} ms, CPU µs per client: client ${r.clientCpuUs.toFixed(0)}, server ${r.serverCpuUs.toFixed(0)}`,
    );
  }
  if (only.includes('replay')) {
    const r = await replay((process.env.DRIVER_SYSTEM ?? 'syncwire') as 'syncwire' | 'socketio', 2 * n);
    console.log(
      `replay ${r.messages}: ${r.ms.toFixed(0)} ms, lost ${r.lost} dup ${r.duplicated} recovered ${r.recovered}, client CPU ${r.clientCpuUs.toFixed(1)} µs/msg, server peak ${(r.serverPeakBytes / 1e6).toFixed(2)} MB`,
    );
  }
}
process.exit(0);
