/**
 * The write handle (issue 14, session 6): a request the chart takes off the outbox while open
 * is written through the live socket actor's handle (`TransportIo.write`), and its batch
 * persisted directly, instead of a `SEND` command through the actor's mailbox and an emitted
 * `batched` event. Against a real `ws` server on 127.0.0.1 (test/helpers/lying-server.ts).
 * (1) Each operation goes on the wire exactly once and settles once, the ACK folded into its
 *     response or apart.
 * (2) The batch is durable before its SYN is written (the order the chart's own actions keep).
 * (3) The socket dying inside the write: the request keeps its id, goes over HTTP, settles once.
 * (4) The handle follows the socket actor: set while it runs, cleared when it stops, a redial
 *     writes on the new socket, and a stopped actor does not clear a newer actor's handle.
 * (5) With an inspector the chart's own actions run: each SYN is a SEND command it sees.
 */
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { WebSocket } from 'ws';
import { createActor } from 'xstate';
import { connectionMachine } from '../machines/connection.js';
import { createSyncClient, type SyncClient } from '../src/client/index.js';
import { memoryStorage, type OutboxBatch, type SyncStorage } from '../src/client/storage.js';
import { socketActor, type TransportIo } from '../src/client/transports.js';
import { reach, until } from './helpers/harness.js';
import { type Envelope, type LyingServer, startLyingServer } from './helpers/lying-server.js';

let liar: LyingServer;
beforeAll(async () => {
  liar = await startLyingServer();
});
afterAll(async () => {
  await liar.close();
});
const clients: SyncClient[] = [];
afterEach(async () => {
  for (const c of clients.splice(0)) await c.close();
  liar.cork = false;
  liar.reset();
});

const id = (p: string) => `${p}-${Math.random().toString(36).slice(2)}`;
const client = (opts: Partial<Parameters<typeof createSyncClient>[0]> = {}) => {
  const c = createSyncClient({
    url: liar.wsUrl,
    clientId: id('w'),
    timeout: 2000,
    WebSocket: WebSocket as never,
    ...opts,
  });
  clients.push(c);
  return c;
};
const syns = (): Envelope[] => liar.received.filter((e) => e.type === 'SYN');

describe('every operation written once through the handle', () => {
  for (const cork of [true, false]) {
    it(`${cork ? 'ACK folded into the response' : 'ACK apart'}: 30 ticks of 10 operations, each on the wire once, each settled once with its result`, async () => {
      liar.cork = cork;
      const c = client();
      await reach(c, 'open');
      const settled = new Map<number, unknown[]>();
      const all: Promise<void>[] = [];
      // Each tick's operations go out while the chart is open with nothing in flight (the
      // previous tick settled): one SYN per tick, each taken and written by open's SEND.
      for (let t = 0; t < 30; t++) {
        const tick: Promise<void>[] = [];
        for (let i = 0; i < 10; i++) {
          const n = t * 10 + i;
          tick.push(
            c.send({ n }).then((r) => {
              settled.set(n, [...(settled.get(n) ?? []), r]);
            }),
          );
        }
        all.push(...tick);
        await Promise.all(tick);
      }
      await Promise.all(all);
      expect(settled.size).toBe(300);
      for (const [n, rs] of settled) expect(rs).toEqual([{ ok: { n } }]);
      const ids = syns().map((e) => e.id);
      expect(ids).toHaveLength(30);
      expect(new Set(ids).size).toBe(30);
      const ops = syns().flatMap((e) => e.payload as { n: number }[]);
      expect(ops.map((o) => o.n)).toEqual(Array.from({ length: 300 }, (_, n) => n));
      expect(await reach(c, 'open')).toBe('open');
    });
  }
});

describe('the batch is durable before its SYN leaves', () => {
  it('outbox.batch(id) is called before the socket writes that id, for every SYN', async () => {
    const log: string[] = [];
    const base = memoryStorage();
    const outbox = base.outbox!;
    const storage: SyncStorage = {
      ...base,
      outbox: {
        load: (cid) => outbox.load(cid),
        add: (cid, e) => outbox.add(cid, e),
        batch: (cid, b: OutboxBatch) => {
          log.push(`batch ${b.id}`);
          outbox.batch(cid, b);
        },
        remove: (cid, keys) => outbox.remove(cid, keys),
      },
    };
    class LoggingWS extends WebSocket {
      override send(data: string) {
        const f = JSON.parse(data) as Envelope;
        if (f.type === 'SYN') log.push(`write ${f.id}`);
        super.send(data);
      }
    }
    const c = client({ storage, WebSocket: LoggingWS as never });
    await reach(c, 'open');
    for (let t = 0; t < 5; t++) await Promise.all([c.send({ t, i: 0 }), c.send({ t, i: 1 })]);
    const writes = log.filter((l) => l.startsWith('write '));
    expect(writes).toHaveLength(5);
    for (const w of writes) {
      const at = log.indexOf(w);
      expect(
        log.indexOf(`batch ${w.slice(6)}`),
        `${w} persisted before it was written`,
      ).toBeGreaterThanOrEqual(0);
      expect(log.indexOf(`batch ${w.slice(6)}`)).toBeLessThan(at);
    }
  });
});

describe('the socket dies inside the write', () => {
  it('ws.send throws on a socket that is going down: the request keeps its id, goes over HTTP, settles once', async () => {
    let failNext = true;
    const tried: string[] = [];
    class DyingWS extends WebSocket {
      override send(data: string) {
        const f = JSON.parse(data) as Envelope;
        if (f.type === 'SYN' && failNext) {
          failNext = false;
          tried.push(f.id);
          this.terminate();
          throw new Error('socket going down');
        }
        super.send(data);
      }
    }
    const c = client({ WebSocket: DyingWS as never });
    await reach(c, 'open');
    const results: unknown[] = [];
    await c.send({ x: 1 }).then((r) => results.push(r));
    expect(results).toEqual([{ ok: { x: 1 } }]);
    expect(tried).toHaveLength(1);
    // Never on the socket (the write threw), answered over HTTP under the same id.
    expect(syns()).toHaveLength(0);
    expect(liar.posted.map((e) => e.id)).toEqual(tried);
    await reach(c, 'open', 10_000);
    const more = await c.send({ x: 2 });
    expect(more).toEqual({ ok: { x: 2 } });
  });
});

describe('the handle follows the socket actor', () => {
  const input = {
    clientId: 'c',
    instance: 'i',
    timeout: 60_000,
    maxBatch: 64,
    pollInterval: 60_000,
    maxBackoff: 60_000,
  };
  const ioFor = (): TransportIo => ({
    config: {
      urls: liar.wsUrl,
      WebSocket: WebSocket as never,
      fetch,
      params: {},
      headers: {},
      faults: { dropAcks: false, blackhole: false, blockHttp: false },
    },
    cursor: { index: 0 },
    clientId: () => 'c',
  });

  it('set while the socket actor runs, cleared when the chart stops; a stopped actor leaves a newer one’s handle', () => {
    const io = ioFor();
    expect(io.write).toBeUndefined();
    const a = createActor(connectionMachine.provide({ actors: { socket: socketActor(io) } }), { input });
    a.start();
    const first = io.write;
    expect(typeof first).toBe('function');
    a.stop();
    expect(io.write).toBeUndefined();

    const b = createActor(connectionMachine.provide({ actors: { socket: socketActor(io) } }), { input });
    const c = createActor(connectionMachine.provide({ actors: { socket: socketActor(io) } }), { input });
    b.start();
    c.start();
    const newest = io.write;
    expect(newest).not.toBe(first);
    b.stop();
    expect(io.write).toBe(newest);
    c.stop();
    expect(io.write).toBeUndefined();
  });

  it('after a redial the handle writes on the new socket: sends settle once, nothing written twice', async () => {
    liar.cork = true;
    const c = client({ timeout: 400 });
    const states: string[] = [];
    c.state$.subscribe((s) => states.push(s));
    await reach(c, 'open');
    expect(await c.send({ before: 1 })).toEqual({ ok: { before: 1 } });
    liar.closeSockets(1012);
    await until(() => states.includes('degraded'), 5000, 'the socket down');
    await until(() => states.at(-1) === 'open', 10_000, 'open again on a new socket');
    const rs = await Promise.all([c.send({ after: 1 }), c.send({ after: 2 })]);
    expect(rs).toEqual([{ ok: { after: 1 } }, { ok: { after: 2 } }]);
    const ids = [...syns(), ...liar.posted.filter((e) => e.type === 'SYN')].map((e) => e.id);
    const ops = syns().flatMap((e) => e.payload as unknown[]);
    expect(ops).toEqual([{ before: 1 }, { after: 1 }, { after: 2 }]);
    expect(new Set(ids).size).toBe(ids.length);
  });
});

describe('with an inspector', () => {
  it('the chart’s own actions run: every SYN is a SEND command to the socket actor the inspector sees', async () => {
    const commands: string[] = [];
    const c = client({
      inspect: (e) => {
        if (e.type !== '@xstate.event' || e.event.type !== 'SEND') return;
        const f = (e.event as unknown as { frame?: { type: string; id: string } }).frame;
        if (f?.type === 'SYN') commands.push(f.id);
      },
    });
    await reach(c, 'open');
    await c.send({ a: 1 });
    await c.send({ a: 2 });
    expect(commands).toEqual(syns().map((e) => e.id));
    expect(commands).toHaveLength(2);
  });
});
