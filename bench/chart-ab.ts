/**
 * Two versions of the connection statechart in one process, timed in alternating blocks
 * (so that the load of a shared machine falls on both alike): CPU per round trip (SEND →
 * ACK → response, or FOLD=1: SEND → response) of each, median and range over the blocks.
 *
 *   CHART_B=/path/to/other/machines/connection.ts node --import tsx bench/chart-ab.ts
 *   (CHART_A: the first version, default this checkout's machines/connection.ts)
 */
import { type AnyStateMachine, createActor, fromCallback } from 'xstate';
import { LazyClock } from '../src/client/clock.js';

const fold = process.env.FOLD === '1';
const blocks = Number(process.env.BLOCKS ?? 20);
const per = Number(process.env.PER ?? 3000);
const a = (await import(process.env.CHART_A ?? '../machines/connection.js'))
  .connectionMachine as AnyStateMachine;
const b = (await import(process.env.CHART_B!)).connectionMachine as AnyStateMachine;

function rig(machine: AnyStateMachine) {
  const m = machine.provide({
    actors: {
      socket: fromCallback(({ receive }) => {
        receive(() => {});
        return () => {};
      }),
    },
  });
  const actor = createActor(m, {
    input: {
      clientId: 'c',
      instance: 'i',
      timeout: 10_000,
      maxBatch: 64,
      pollInterval: 10_000,
      maxBackoff: 30_000,
    },
    clock: new LazyClock(),
  });
  actor.start();
  actor.send({ type: 'WS.OPEN' });
  let k = 0;
  return () => {
    k++;
    actor.send({ type: 'SEND', items: [{ key: k, kind: 'op', op: { k }, json: `{"k":${k}}` }] });
    const id = actor.getSnapshot().context.inflight.id;
    if (!fold) actor.send({ type: 'FRAME', frame: { id, type: 'ACK' } });
    actor.send({ type: 'FRAME', frame: { id, type: 'SYN', payload: [{ ok: true }] } });
    if (actor.getSnapshot().context.inflight !== null) throw new Error('not settled');
  };
}
const ra = rig(a);
const rb = rig(b);
const time = (round: () => void) => {
  const c0 = process.cpuUsage();
  for (let i = 0; i < per; i++) round();
  const c = process.cpuUsage(c0);
  return (c.user + c.system) / per;
};
for (let i = 0; i < 3; i++) {
  time(ra);
  time(rb);
}
const ta: number[] = [];
const tb: number[] = [];
for (let i = 0; i < blocks; i++) {
  if (i % 2) {
    ta.push(time(ra));
    tb.push(time(rb));
  } else {
    tb.push(time(rb));
    ta.push(time(ra));
  }
}
const med = (x: number[]) => [...x].sort((p, q) => p - q)[x.length >> 1]!;
const show = (x: number[]) =>
  `${med(x).toFixed(1)} µs (${Math.min(...x).toFixed(1)}–${Math.max(...x).toFixed(1)})`;
console.log(
  `round trip${fold ? ' (ACK folded)' : ''}: this ${show(ta)}, B ${show(tb)}, ratio ${(med(ta) / med(tb)).toFixed(2)}`,
);
process.exit(0);
