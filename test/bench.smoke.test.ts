/**
 * Smoke test of the benchmark (bench/): every scenario once, at a tiny size, against real
 * server processes. Asserts correctness only (every operation acknowledged with its own
 * result, nothing lost or duplicated in replay, the bundle builds without `ws`), never
 * speed: these machines are too noisy for that, and speed is what `npm run bench` reports.
 */
import { describe, expect, it } from 'vitest';
import { bundleSizes } from '../bench/bundle.js';
import { SYSTEMS } from '../bench/proc.js';
import {
  latency,
  memoryPerConnection,
  opBytes,
  replay,
  throughput,
  throughputAt,
} from '../bench/scenarios.js';

describe('bench smoke', () => {
  it('operations are about 200 bytes of JSON', () => {
    expect(opBytes).toBeGreaterThanOrEqual(190);
    expect(opBytes).toBeLessThanOrEqual(210);
  });

  for (const system of SYSTEMS) {
    it(`throughput, ${system}: every operation acknowledged with its own result`, async () => {
      const r = await throughput(system, 200, 50);
      expect(r.acked).toBe(200);
    });

    it(`latency, ${system}: sequential round trips complete`, async () => {
      const r = await latency(system, 50, 10);
      expect(r.n).toBe(50);
      expect(r.p99us).toBeGreaterThanOrEqual(r.p50us);
    });

    it(`memory, ${system}: the server sees every idle connection`, async () => {
      // Resolves only once the server process counts all 50 (else it throws).
      const r = await memoryPerConnection(system, 50);
      expect(r.connections).toBe(50);
      expect(Number.isFinite(r.heapPerConn)).toBe(true);
    });
  }

  it('throughput, syncwire held to 64 in flight: every operation acknowledged', async () => {
    const r = await throughputAt('syncwire', 200, 64, 50);
    expect(r.acked).toBe(200);
  });

  it('replay, syncwire: 500 missed messages, none lost, none duplicated, cursor recovered', async () => {
    const r = await replay('syncwire', 500);
    expect({ lost: r.lost, duplicated: r.duplicated, recovered: r.recovered }).toEqual({
      lost: 0,
      duplicated: 0,
      recovered: true,
    });
  });

  it('replay, socket.io connectionStateRecovery: 200 missed messages recovered', async () => {
    const r = await replay('socketio', 200);
    expect({ lost: r.lost, duplicated: r.duplicated, recovered: r.recovered }).toEqual({
      lost: 0,
      duplicated: 0,
      recovered: true,
    });
  });

  it('bundle: the browser build of the client bundles, without ws', async () => {
    const { syncwire, socketio } = await bundleSizes();
    expect(syncwire.gzipBytes).toBeGreaterThan(0);
    expect(socketio.gzipBytes).toBeGreaterThan(0);
    expect(syncwire.wsInputs).toEqual([]);
  });
});
