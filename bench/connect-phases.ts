/**
 * Client CPU of the connect path, phase by phase, with no network and no server: per client,
 * `createSyncClient` (+ a `state$` subscriber), the socket's `open`, one `send()` until its SYN
 * is written, its ACK + response (in one synchronous run, as from a server that corks them),
 * and `close()`. An in-process WebSocket stand-in that the script drives by hand. Not part of
 * `npm run bench` and not a test: for finding where the connect row's client CPU goes
 * (issue 14). Wall-clock phases are inflated on a loaded machine; the CPU total is steadier.
 *
 *   node --import tsx bench/connect-phases.ts          # N=3000 clients after 1000 warm-up
 *   TWICE=1 node --import tsx bench/connect-phases.ts  # a second round trip per client too
 */
import { createSyncClient, type WebSocketLike } from '../src/client/index.js';

type H<E> = ((ev: E) => void) | null;
let last: Stand | null = null;
class Stand implements WebSocketLike {
  readyState = 0;
  onopen: H<unknown> = null;
  onclose: H<{ code: number; reason: string }> = null;
  onerror: H<unknown> = null;
  onmessage: H<{ data: unknown }> = null;
  sent: string[] = [];
  constructor(_url: string) {
    last = this;
  }
  send(d: string) {
    this.sent.push(d);
  }
  close() {
    this.readyState = 3;
  }
}
const N = Number(process.env.N ?? 3000);
const twice = process.env.TWICE === '1';
const t = { create: 0, open: 0, send: 0, reply: 0, send2: 0, reply2: 0, close: 0 };
const cpu = () => {
  const c = process.cpuUsage();
  return c.user + c.system;
};
const now = () => performance.now() * 1000;
const ticks = async () => {
  await Promise.resolve();
  await Promise.resolve();
};

/** One op sent and answered; returns the µs of each half. */
async function roundTrip(s: Stand, c: ReturnType<typeof createSyncClient>, i: number) {
  s.sent.length = 0;
  let a = now();
  const p = c.send({ id: i });
  await ticks();
  const send = now() - a;
  const f = JSON.parse(s.sent[0]!) as { id: string };
  a = now();
  s.onmessage!({ data: JSON.stringify({ id: f.id, type: 'ACK' }) });
  s.onmessage!({ data: JSON.stringify({ id: f.id, type: 'SYN', payload: [{ ok: true }] }) });
  await ticks();
  const reply = now() - a;
  await p;
  return { send, reply };
}

async function one(i: number, rec: boolean) {
  let a = now();
  const c = createSyncClient({ url: 'ws://stand-in/sync', WebSocket: Stand as never });
  let opened = false;
  c.state$.subscribe((st) => {
    if (st === 'open') opened = true;
  });
  const s = last!;
  const create = now() - a;
  a = now();
  s.readyState = 1;
  s.onopen!({});
  const open = now() - a;
  if (!opened) throw new Error('not open');
  const r1 = await roundTrip(s, c, i);
  const r2 = twice ? await roundTrip(s, c, i + 1) : { send: 0, reply: 0 };
  a = now();
  await c.close();
  const close = now() - a;
  if (!rec) return;
  t.create += create;
  t.open += open;
  t.send += r1.send;
  t.reply += r1.reply;
  t.send2 += r2.send;
  t.reply2 += r2.reply;
  t.close += close;
}

for (let i = 0; i < 1000; i++) await one(i, false);
const c0 = cpu();
for (let i = 0; i < N; i++) await one(i, true);
const total = (cpu() - c0) / N;
const phases = Object.entries(t)
  .filter(([, v]) => v > 0)
  .map(([k, v]) => `${k} ${(v / N).toFixed(0)}`)
  .join(', ');
console.log(`connect phases: ${total.toFixed(0)} µs client CPU per client; wall µs: ${phases}`);
process.exit(0);
