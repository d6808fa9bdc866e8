/**
 * Smoke test of the benchmark (bench/): every scenario once, at a tiny size, against real
 * server processes. Asserts correctness only (every operation acknowledged with its own
 * result, nothing lost or duplicated in replay, the bundle builds without `ws`), never
 * speed: these machines are too noisy for that, and speed is what `npm run bench` reports.
 */
import { describe, expect, it } from 'vitest';
import { bundleSizes, librariesEntry } from '../bench/bundle.js';
import { SYSTEMS } from '../bench/proc.js';
import {
  connectTime,
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

    it(`1 in flight, ${system}: sequential round trips complete`, async () => {
      const r = await latency(system, 50, 10);
      expect(r.n).toBe(50);
      expect(r.p99us).toBeGreaterThanOrEqual(r.p50us);
      expect(r.opsPerSec).toBeGreaterThan(0);
      expect(r.clientCpuUs).toBeGreaterThan(0);
    });

    it(`throughput at 64 in flight, ${system}: every operation acknowledged`, async () => {
      const r = await throughputAt(system, 200, 64, 50);
      expect({ acked: r.acked, window: r.window }).toEqual({ acked: 200, window: 64 });
    });

    it(`connect, ${system}: every client opens and has its one operation acknowledged`, async () => {
      // Each client's ack is checked against its own operation's id (a mismatch throws), and
      // the server process must count all of them before the measure returns.
      const r = await connectTime(system, 60, 20);
      expect({ ready: r.ready, clients: r.clients }).toEqual({ ready: 60, clients: 60 });
    });

    it(`memory, ${system}: the server sees every idle connection`, async () => {
      // Resolves only once the server process counts all 50 (else it throws).
      const r = await memoryPerConnection(system, 50);
      expect(r.connections).toBe(50);
      expect(Number.isFinite(r.heapPerConn)).toBe(true);
    });
  }

  it('replay, syncwire: 500 missed messages, none lost, none duplicated, cursor recovered', async () => {
    const r = await replay('syncwire', 500);
    expect({ lost: r.lost, duplicated: r.duplicated, recovered: r.recovered }).toEqual({
      lost: 0,
      duplicated: 0,
      recovered: true,
    });
    // The server's heap was watched during the replay (a number, not a failed probe).
    expect(Number.isFinite(r.serverPeakBytes)).toBe(true);
  });

  it('replay, syncwire: 2,500 missed messages (more than one replayLimit page) arrive whole', async () => {
    const r = await replay('syncwire', 2500);
    expect({ lost: r.lost, duplicated: r.duplicated, recovered: r.recovered }).toEqual({
      lost: 0,
      duplicated: 0,
      recovered: true,
    });
  });

  it('replay at equal counts, socket.io connectionStateRecovery: 500 missed messages recovered', async () => {
    const r = await replay('socketio', 500);
    expect({ lost: r.lost, duplicated: r.duplicated, recovered: r.recovered }).toEqual({
      lost: 0,
      duplicated: 0,
      recovered: true,
    });
  });

  it('bundle: the browser build of the client bundles, without ws', async () => {
    const { syncwire, socketio, libraries } = await bundleSizes();
    expect(syncwire.gzipBytes).toBeGreaterThan(0);
    expect(socketio.gzipBytes).toBeGreaterThan(0);
    expect(syncwire.wsInputs).toEqual([]);
    // The "libraries alone" reference: what the client imports from xstate, rxjs and idb
    // (values only), and none of syncwire's own files.
    const entry = librariesEntry(syncwire.meta);
    expect(entry).toMatch(/export \{[^}]*\bsetup\b[^}]*\} from 'xstate';/);
    expect(entry).toMatch(/export \{[^}]*\bBehaviorSubject\b[^}]*\} from 'rxjs';/);
    expect(entry).toMatch(/export \{[^}]*\bopenDB\b[^}]*\} from 'idb';/);
    expect(entry).not.toMatch(/\btype\b|InspectionEvent|IDBPDatabase/);
    expect(
      Object.keys(libraries.meta.inputs).filter((f) => !f.includes('node_modules') && f !== '<stdin>'),
    ).toEqual([]);
    expect(Object.keys(libraries.byPackage)).toEqual(expect.arrayContaining(['xstate', 'rxjs', 'idb']));
    expect(libraries.gzipBytes).toBeLessThan(syncwire.gzipBytes);
  });
});
