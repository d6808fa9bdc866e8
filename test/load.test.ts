/**
 * Load soak: 1,000 real clients (this process) against one reference server in a child
 * process (test/fixtures/fault-server.ts, with `--expose-gc`), over real sockets on
 * 127.0.0.1. Each client is subscribed to one of 10 channels that the server publishes to
 * every 500 ms, and sends an operation every 1–2 s, for LOAD_SECONDS (default 60; use
 * LOAD_SECONDS=10 for a quick local run).
 *
 * Reported (logged): ops acked per second, send→result latency p50/p99/max, MSG deliveries
 * per second and their p99 publish→delivery latency, client failures by kind, and the
 * server's heapUsed after GC before the clients, at the 25 % mark and at the end.
 *
 * Fails when: an op is not acked exactly once (each send settles once, with its own result;
 * the server's ledger has every op once and nothing else), a client misses a message or sees
 * one out of order or twice, a client resets, or the server's heapUsed after GC grows by
 * HEAP_BOUND_MB or more between the 25 % mark and the end.
 */
import { afterAll, describe, expect, it } from 'vitest';
import { WebSocket } from 'ws';
import { createSyncClient, type SyncClient } from '../src/client/index.js';
import { type ChildServer, startChildServer } from './helpers/child-server.js';
import { until } from './helpers/harness.js';

const SECONDS = Number(process.env.LOAD_SECONDS ?? 60);
const CLIENTS = Number(process.env.LOAD_CLIENTS ?? 1000);
const CHANNELS = 10;
const PUBLISH_MS = 500;
/** The bound on heapUsed growth (after GC) between the 25 % mark and the end. */
const HEAP_BOUND_MB = 50;
/** Clients dialled at once while connecting. */
const WAVE = 100;

const MB = 1024 * 1024;
const mb = (n: number) => Math.round((n / MB) * 10) / 10;

interface Tracker {
  channel: string;
  last: number;
  received: number;
  anomalies: string[];
  sent: number;
  settledOnce: number;
  wrong: string[];
  timer?: NodeJS.Timeout;
}

function percentile(sorted: number[], p: number): number {
  if (sorted.length === 0) return Number.NaN;
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]!;
}

let child: ChildServer | undefined;
const clients: SyncClient[] = [];
afterAll(async () => {
  await Promise.all(clients.map((c) => c.close()));
  await child?.stop();
}, 60_000);

describe('load', () => {
  it(
    `${CLIENTS} clients for ${SECONDS} s: every op acked once, every message delivered in order, bounded server memory`,
    async () => {
      child = await startChildServer();
      const url = `ws://127.0.0.1:${child.port}/sync`;
      const before = await child.call('memory');
      expect(before.gc).toBe(true);

      const trackers: Tracker[] = [];
      const failures = new Map<string, number>();
      let resets = 0;
      const opLatency: number[] = [];
      const msgLatency: number[] = [];
      let liveMsgs = 0;

      // ---- connect, in waves; each subscribes to its channel before publishing starts -------
      const t0 = Date.now();
      let wave: Promise<unknown>[] = [];
      for (let i = 0; i < CLIENTS; i++) {
        const channel = `load-${i % CHANNELS}`;
        const tr: Tracker = {
          channel,
          last: 0,
          received: 0,
          anomalies: [],
          sent: 0,
          settledOnce: 0,
          wrong: [],
        };
        trackers.push(tr);
        const c = createSyncClient({
          url,
          clientId: `L${i}-${process.pid}`,
          timeout: 10_000,
          WebSocket: WebSocket as never,
        });
        clients.push(c);
        c.messages$.subscribe((m) => {
          if (m.seq !== tr.last + 1 && tr.anomalies.length < 5)
            tr.anomalies.push(`${m.seq} after ${tr.last}`);
          tr.last = m.seq;
          tr.received++;
          if (!m.replay) {
            liveMsgs++;
            msgLatency.push(Date.now() - (m.payload as { at: number }).at);
          }
        });
        c.failures$.subscribe((f) => failures.set(f.kind, (failures.get(f.kind) ?? 0) + 1));
        c.resets$.subscribe(() => resets++);
        wave.push(c.subscribe(channel, { since: 0 }));
        if (wave.length === WAVE || i === CLIENTS - 1) {
          const pending = wave;
          wave = [];
          await Promise.race([
            Promise.all(pending),
            new Promise((_, reject) =>
              setTimeout(
                () => reject(new Error(`clients up to ${i} did not subscribe within 60 s`)),
                60_000,
              ).unref(),
            ),
          ]);
        }
      }
      await until(() => clients.every((c) => c.state === 'open'), 60_000, 'every client open');
      const connectMs = Date.now() - t0;

      // ---- soak ------------------------------------------------------------------------------
      await child.call('startPublishing', {
        channels: Array.from({ length: CHANNELS }, (_, i) => `load-${i}`),
        intervalMs: PUBLISH_MS,
      });
      let sending = true;
      const inflight = new Set<Promise<void>>();
      const sendOne = (i: number) => {
        const tr = trackers[i]!;
        const k = ++tr.sent;
        const started = performance.now();
        let settled = 0;
        const p = clients[i]!.send({ c: i, k }).then(
          (res) => {
            settled++;
            if (settled === 1) tr.settledOnce++;
            opLatency.push(performance.now() - started);
            const r = res as { c?: number; k?: number };
            if (r?.c !== i || r?.k !== k) tr.wrong.push(`op ${k} answered ${JSON.stringify(res)}`);
          },
          (err: unknown) => {
            settled++;
            tr.wrong.push(`op ${k} rejected: ${String(err)}`);
          },
        );
        inflight.add(p);
        void p.finally(() => inflight.delete(p));
      };
      const schedule = (i: number) => {
        trackers[i]!.timer = setTimeout(
          () => {
            if (!sending) return;
            sendOne(i);
            schedule(i);
          },
          1000 + Math.random() * 1000,
        );
      };
      const soakStart = Date.now();
      for (let i = 0; i < CLIENTS; i++) schedule(i);

      // The soak's length is the test's parameter, not a wait for a result: the run is checked
      // on the way (25 % mark) and after it.
      const at = (fraction: number) =>
        new Promise((r) => setTimeout(r, Math.max(0, soakStart + fraction * SECONDS * 1000 - Date.now())));
      await at(0.25);
      const quarter = await child.call('memory');
      await at(1);
      sending = false;
      for (const tr of trackers) clearTimeout(tr.timer);
      const soakMs = Date.now() - soakStart;

      // ---- drain and check ---------------------------------------------------------------------
      await until(() => inflight.size === 0, 60_000, 'every send to settle');
      const heads = (await child.call('stopPublishing')) as Record<string, number>;
      await until(
        () => trackers.every((tr) => tr.last === heads[tr.channel]),
        60_000,
        'every client to receive every message of its channel',
      );
      const end = await child.call('memory');
      const sent = Object.fromEntries(trackers.map((tr, i) => [i, tr.sent]));
      const ledger = await child.call('ledger', { sent });
      const counts = await child.call('counts');

      const totalSent = trackers.reduce((s, tr) => s + tr.sent, 0);
      const totalMsgs = trackers.reduce((s, tr) => s + tr.received, 0);
      opLatency.sort((a, b) => a - b);
      msgLatency.sort((a, b) => a - b);
      const growth = end.memory.heapUsed - quarter.memory.heapUsed;
      const report = {
        clients: CLIENTS,
        seconds: Math.round(soakMs / 100) / 10,
        connectMs,
        opsAcked: totalSent,
        opsPerSecond: Math.round(totalSent / (soakMs / 1000)),
        opLatencyMs: {
          p50: Math.round(percentile(opLatency, 50) * 10) / 10,
          p99: Math.round(percentile(opLatency, 99) * 10) / 10,
          max: Math.round((opLatency.at(-1) ?? 0) * 10) / 10,
        },
        messagesDelivered: totalMsgs,
        messagesPerSecond: Math.round(liveMsgs / (soakMs / 1000)),
        msgLatencyMs: {
          p50: percentile(msgLatency, 50),
          p99: percentile(msgLatency, 99),
          max: msgLatency.at(-1),
        },
        failures: Object.fromEntries(failures),
        resets,
        serverHeapMB: {
          beforeClients: mb(before.memory.heapUsed),
          at25: mb(quarter.memory.heapUsed),
          end: mb(end.memory.heapUsed),
          growth25toEnd: mb(growth),
          bound: HEAP_BOUND_MB,
        },
        serverRssMB: {
          beforeClients: mb(before.memory.rss),
          at25: mb(quarter.memory.rss),
          end: mb(end.memory.rss),
        },
        serverStats: end.stats,
        serverCpuSeconds: Math.round((counts.cpu.user + counts.cpu.system) / 1e5) / 10,
        serverErrors: counts.errors,
        clientHeapMB: mb(process.memoryUsage().heapUsed),
        ledger,
      };
      console.log(`[load] ${JSON.stringify(report, null, 2)}`);

      const wrong = trackers.flatMap((tr, i) => tr.wrong.map((w) => `client ${i}: ${w}`));
      expect(wrong.slice(0, 10)).toEqual([]);
      expect(trackers.reduce((s, tr) => s + tr.settledOnce, 0)).toBe(totalSent);
      expect(ledger).toMatchObject({ applied: totalSent, missing: 0, duplicated: 0, unexpected: 0 });
      const anomalies = trackers.flatMap((tr, i) =>
        tr.anomalies.map((a) => `client ${i} on ${tr.channel}: ${a}`),
      );
      expect(anomalies.slice(0, 10)).toEqual([]);
      for (const tr of trackers) expect(tr.received).toBe(heads[tr.channel]);
      expect(resets).toBe(0);
      expect(end.stats.sockets).toBe(CLIENTS);
      expect(growth).toBeLessThan(HEAP_BOUND_MB * MB);
    },
    SECONDS * 1000 + 240_000,
  );
});
