/**
 * Server CPU per operation, 1 in flight, with syncwire's own work isolated from the client's:
 * the reference server (bench/servers/syncwire.ts's options) in this process, one real `ws`
 * client socket on 127.0.0.1 whose received bytes are discarded unread, and each `SYN` handed
 * to the server's socket as `ws` hands a received message over (its `message` event), then one
 * `setImmediate` for the ACK and the response to be written. Measured: `process.cpuUsage()`
 * over SERVER_N operations (default 20000) after 2000 of warm-up: the server's frame handling,
 * `ws`'s send path and the write syscalls, without `ws`'s frame parsing or any client work.
 * Not part of `npm run bench` and not a test: a steadier signal than the bench on a loaded
 * machine, for comparing two versions of the server (run each a few times, interleaved).
 *
 *   node --import tsx bench/server-cpu.ts
 *   node --cpu-prof --import tsx bench/server-cpu.ts
 *   BENCH_SERVER=dist/src/server/index.js node --import tsx bench/server-cpu.ts   (the built package)
 *   SERVER_CPU_BATCH=32 node --import tsx bench/server-cpu.ts   (32 operations per SYN, as the
 *     outbox batches them at 64 in flight; the figure is then per operation)
 */
import { resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import { WebSocket, WebSocketServer } from 'ws';
import type * as ServerModule from '../src/server/index.js';
import { makeOp } from './scenarios.js';

// The server module measured: the source by default, or a built one (BENCH_SERVER, as in the bench).
const { createSyncServer, memoryStore } = (await import(
  process.env.BENCH_SERVER ? pathToFileURL(resolve(process.env.BENCH_SERVER)).href : '../src/server/index.js'
)) as typeof ServerModule;
/** Operations per SYN. */
const batch = Number(process.env.SERVER_CPU_BATCH ?? 1);

// The server-side socket of the one connection, as `ws` hands it to the server.
let serverSide: WebSocket | undefined;
const handleUpgrade = WebSocketServer.prototype.handleUpgrade;
WebSocketServer.prototype.handleUpgrade = function (this: WebSocketServer, req, socket, head, cb) {
  return handleUpgrade.call(this, req, socket, head, (ws, r) => {
    serverSide = ws;
    cb(ws, r);
  });
};

// SERVER_CPU_SYSTEM=ws: bench/servers/ws.ts's raw ws handler instead (the floor: `ws`'s send
// path and the write syscalls alone).
const raw = process.env.SERVER_CPU_SYSTEM === 'ws';
const server = raw
  ? undefined
  : await createSyncServer({
      port: 0,
      store: memoryStore({ maxMessages: 100_000 }),
      anonymousKey: 'clientId',
      // One socket sends far more frames per second here than the default rate lets through
      // (the bucket is still charged per frame, as in the bench).
      maxFramesPerSecond: 1_000_000,
      onSync: (ops) => ops.map((op) => ({ id: (op as { id: unknown }).id, ok: true })),
    });
const wss = raw ? new WebSocketServer({ host: '127.0.0.1', port: 0, perMessageDeflate: false }) : undefined;
wss?.on('connection', (ws) => {
  ws.on('message', (data) => {
    const op = JSON.parse(String(data)) as { id: unknown };
    ws.send(JSON.stringify({ id: op.id, ok: true }));
  });
});
if (wss) await new Promise<void>((resolve) => wss.once('listening', () => resolve()));
const port = server ? server.address().port : (wss!.address() as { port: number }).port;
const client = new WebSocket(`ws://127.0.0.1:${port}/sync?clientId=bench-cpu`);
await new Promise<void>((resolve, reject) => {
  client.once('open', () => resolve());
  client.once('error', reject);
});
// The replies are read off the socket and dropped: no client-side parsing in this process.
const tcp = (client as unknown as { _socket: import('node:net').Socket })._socket;
tcp.removeAllListeners('data');
let received = '';
let naks = 0;
tcp.on('data', (b: Buffer) => {
  const text = b.toString('latin1');
  if (text.includes('"NAK"')) naks++;
  received = (received + text).slice(-2000);
});
while (serverSide === undefined) await new Promise((r) => setImmediate(r));
const ws = serverSide;

const turn = () => new Promise<void>((resolve) => setImmediate(resolve));
async function run(from: number, n: number): Promise<void> {
  for (let i = from; i < from + n; i++) {
    const payload = Array.from({ length: batch }, (_, k) => makeOp(i * batch + k));
    const frame = Buffer.from(JSON.stringify({ id: `s-${i}`, type: 'SYN', payload }));
    ws.emit('message', frame, false);
    await turn();
  }
}

const n = Number(process.env.SERVER_N ?? 20_000);
await run(0, 2000);
const t0 = process.cpuUsage();
await run(2000, n);
const d = process.cpuUsage(t0);
console.log(
  `server CPU per op (${batch} per SYN, 1 SYN in flight, in process): ${((d.user + d.system) / (n * batch)).toFixed(2)} µs`,
);
// Every op must have been answered (not refused): the first frames the client got, as a check.
if (!received.includes('"ok":true') || naks > 0)
  throw new Error(`unexpected replies: ${received.slice(0, 300)}`);
client.terminate();
await server?.close();
wss?.close();
process.exit(0);
