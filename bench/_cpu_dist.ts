/**
 * Client CPU per operation with no network and no server process: `createSyncClient` over an
 * in-process WebSocket stand-in that answers each SYN with its ACK and response (CPU_CORK=1:
 * both in one synchronous run, as from a server that writes them in one TCP write; otherwise
 * each on its own macrotask). Not part of `npm run bench` and not a test: a steadier signal
 * than the bench on a loaded machine, for comparing two versions of the client (run each a
 * few times, interleaved). The stand-in's own JSON work (~5–10 µs per op) is included.
 *
 *   node --import tsx bench/client-cpu.ts                 # CPU_MODE=seq (1 in flight), N 20000
 *   CPU_MODE=w64 CPU_CORK=1 node --import tsx bench/client-cpu.ts
 *   CPU_MODE=full node --cpu-prof --import tsx bench/client-cpu.ts   # outbox full (10,000)
 *   CPU_MODE=connect node --import tsx bench/client-cpu.ts   # per client: create, open, 1 op, close
 */
import { createSyncClient, type WebSocketLike } from '../dist/src/client/index.js';
import { makeOp, type Op } from './scenarios.js';

type Handler<E> = ((ev: E) => void) | null;

/** Answers like an honest server: `{ id, ok: true }` per operation. */
class StandInSocket implements WebSocketLike {
  readyState = 0;
  onopen: Handler<unknown> = null;
  onclose: Handler<{ code: number; reason: string }> = null;
  onerror: Handler<unknown> = null;
  onmessage: Handler<{ data: unknown }> = null;
  constructor(_url: string) {
    setImmediate(() => {
      this.readyState = 1;
      this.onopen?.({});
    });
  }
  send(data: string): void {
    const f = JSON.parse(data) as { id: string; type: string; payload?: Array<{ id: number }> };
    const ack = JSON.stringify({ id: f.id, type: 'ACK' });
    if (f.type !== 'SYN') {
      setImmediate(() => this.onmessage?.({ data: ack }));
      return;
    }
    const res = JSON.stringify({
      id: f.id,
      type: 'SYN',
      payload: f.payload!.map((o) => ({ id: o.id, ok: true })),
    });
    if (process.env.CPU_CORK === '1') {
      setImmediate(() => {
        this.onmessage?.({ data: ack });
        this.onmessage?.({ data: res });
      });
    } else {
      setImmediate(() => {
        this.onmessage?.({ data: ack });
        setImmediate(() => this.onmessage?.({ data: res }));
      });
    }
  }
  close(): void {
    this.readyState = 3;
  }
}

const check = (r: { id: number }, i: number) => {
  if (r.id !== i) throw new Error(`result for ${r.id} answered op ${i}`);
};
const mode = process.env.CPU_MODE ?? 'seq';
const n = Number(process.env.N ?? 20_000);
if (mode === 'connect') {
  // Per client: createSyncClient, open, one operation acknowledged, close; 100 at a time.
  const one = async (i: number) => {
    const c = createSyncClient<Op, { id: number; ok: boolean }>({
      url: 'ws://stand-in/sync',
      WebSocket: StandInSocket,
    });
    await new Promise<void>((resolve) => {
      c.state$.subscribe((s) => s === 'open' && resolve());
    });
    check(await c.send(makeOp(i)), i);
    await c.close();
  };
  const lanes = async (count: number) => {
    let next = 0;
    const lane = async () => {
      while (next < count) await one(next++);
    };
    await Promise.all(Array.from({ length: Number(process.env.LANES ?? 100) }, lane));
  };
  const clients = Math.min(n, 2000);
  await lanes(Math.min(clients, 500));
  const cpu0 = process.cpuUsage();
  await lanes(clients);
  const cpu = process.cpuUsage(cpu0);
  console.log(
    `connect: ${((cpu.user + cpu.system) / clients).toFixed(1)} µs client CPU per client, ${clients} clients`,
  );
  process.exit(0);
}
const client = createSyncClient<Op, { id: number; ok: boolean }>({
  url: 'ws://stand-in/sync',
  WebSocket: StandInSocket,
});
await new Promise<void>((resolve) => {
  client.state$.subscribe((s) => s === 'open' && resolve());
});

async function sequential(count: number, from: number) {
  for (let i = from; i < from + count; i++) check(await client.send(makeOp(i)), i);
}
function windowed(count: number, from: number, window: number) {
  return new Promise<void>((resolve) => {
    let next = from;
    let open = 0;
    const pump = () => {
      while (open < window && next < from + count) {
        const i = next++;
        open++;
        void client.send(makeOp(i)).then((r) => {
          check(r, i);
          open--;
          if (next >= from + count && open === 0) resolve();
          else pump();
        });
      }
    };
    pump();
  });
}
const run = (count: number, from: number) =>
  mode === 'seq' ? sequential(count, from) : windowed(count, from, mode === 'w64' ? 64 : 10_000);

await run(Math.min(5000, n), 0);
const cpu0 = process.cpuUsage();
const t0 = performance.now();
await run(n, 1_000_000);
const cpu = process.cpuUsage(cpu0);
const ms = performance.now() - t0;
console.log(
  `${mode}${process.env.CPU_CORK === '1' ? ' (ACK+response together)' : ''}: ${((cpu.user + cpu.system) / n).toFixed(1)} µs client CPU/op, ${((n / ms) * 1000).toFixed(0)} ops/s, ${n} ops`,
);
await client.close();
process.exit(0);
