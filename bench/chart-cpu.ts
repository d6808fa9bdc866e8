/**
 * The connection statechart alone: CPU per round trip (SEND → ACK → response, or SEND →
 * response with the ACK folded) with no client, no socket and no server: a `socket` actor
 * that records nothing, the default clock or `LazyClock`. For finding what one event costs in
 * the interpreter (issue 14); not part of `npm run bench` and not a test.
 *
 *   node --import tsx bench/chart-cpu.ts            # N=50000, ACK then response
 *   FOLD=1 node --import tsx bench/chart-cpu.ts     # the response alone (ACK folded)
 *   SUBS=1 node --import tsx bench/chart-cpu.ts     # with a snapshot subscriber and actor.on('*')
 *   COUNT=1 node --import tsx bench/chart-cpu.ts    # counts per round trip (inspection on: slower)
 */
import { createActor, fromCallback } from 'xstate';
import { type ConnectionEvent, connectionMachine, flatState } from '../machines/connection.js';
import { LazyClock } from '../src/client/clock.js';

const n = Number(process.env.N ?? 50_000);
const fold = process.env.FOLD === '1';
const subs = process.env.SUBS === '1';
let sent = 0;
const machine = connectionMachine.provide({
  actors: {
    socket: fromCallback(({ receive }) => {
      receive(() => {
        sent++;
      });
      return () => {};
    }),
  },
});
const count = process.env.COUNT === '1';
const counts = { macrosteps: 0, microsteps: 0, actions: 0, timersSet: 0, timersCleared: 0 };
const actionTypes = new Map<string, number>();
const clock = new LazyClock();
const countingClock = {
  setTimeout: (fn: () => void, ms: number) => {
    counts.timersSet++;
    return clock.setTimeout(fn, ms);
  },
  clearTimeout: (id: unknown) => {
    counts.timersCleared++;
    clock.clearTimeout(id);
  },
};
let rootSession = '';
const actor = createActor(machine, {
  input: {
    clientId: 'c',
    instance: 'i',
    timeout: 10_000,
    maxBatch: 64,
    pollInterval: 10_000,
    maxBackoff: 30_000,
  },
  clock: count ? countingClock : clock,
  inspect: count
    ? (e) => {
        // Only the machine itself (not its socket child).
        if (e.actorRef.sessionId !== rootSession) return;
        if (e.type === '@xstate.event') counts.macrosteps++;
        else if (e.type === '@xstate.microstep') counts.microsteps++;
        else if (e.type === '@xstate.action') {
          counts.actions++;
          const t = (e as unknown as { action: { type: string } }).action.type;
          actionTypes.set(t, (actionTypes.get(t) ?? 0) + 1);
        }
      }
    : undefined,
});
rootSession = actor.sessionId;
let snaps = 0;
let emitted = 0;
if (subs) {
  actor.subscribe((s) => {
    snaps++;
    flatState(s);
  });
  actor.on('*', () => {
    emitted++;
  });
}
actor.start();
actor.send({ type: 'WS.OPEN' });
const item = (k: number) => ({ key: k, kind: 'op' as const, op: { k }, json: `{"k":${k}}` });
const round = (k: number) => {
  actor.send({ type: 'SEND', items: [item(k)] });
  const id = actor.getSnapshot().context.inflight!.id;
  if (!fold) actor.send({ type: 'FRAME', frame: { id, type: 'ACK' } } as ConnectionEvent);
  actor.send({
    type: 'FRAME',
    frame: { id, type: 'SYN', payload: [{ ok: true }] },
  } as unknown as ConnectionEvent);
};
for (let k = 0; k < 5000; k++) round(k);
if (count) {
  for (const k of Object.keys(counts) as Array<keyof typeof counts>) counts[k] = 0;
  actionTypes.clear();
}
const c0 = process.cpuUsage();
const t0 = performance.now();
for (let k = 0; k < n; k++) round(k);
const c = process.cpuUsage(c0);
const ms = performance.now() - t0;
if (actor.getSnapshot().context.inflight !== null) throw new Error('not settled');
console.log(
  `chart round trip${fold ? ' (ACK folded)' : ''}${subs ? ' +subscribers' : ''}: ${((c.user + c.system) / n).toFixed(1)} µs CPU, ${((ms * 1000) / n).toFixed(1)} µs wall, ${sent} frames, ${snaps} snapshots, ${emitted} emitted`,
);
if (count) {
  const per = (v: number) => (v / n).toFixed(2);
  console.log(
    Object.entries(counts)
      .map(([k, v]) => `${k} ${per(v)}`)
      .join(', '),
    'per round trip',
  );
  console.log([...actionTypes].map(([k, v]) => `${k} ${per(v)}`).join(', '));
}
actor.stop();
process.exit(0);
