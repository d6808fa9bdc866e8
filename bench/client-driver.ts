/**
 * Client-side profiling driver (not part of `npm run bench`): runs syncwire's 1-in-flight and
 * throughput scenarios against a real server child, in this process, so that
 * `node --cpu-prof --import tsx bench/client-driver.ts` profiles the client alone.
 * DRIVER_ONLY=latency|throughput|full, DRIVER_N (default 5000).
 */
import { latency, throughputAt } from './scenarios.js';

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
process.exit(0);
