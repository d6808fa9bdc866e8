/**
 * Several server processes on one Redis, as in production: real child processes
 * (test/fixtures/server-process.ts) on a real redis-server, real clients over loopback.
 * Fan-out across processes, dedupe of a batch retried on another process, failover when a
 * process dies, lost Redis data showing up as new epochs, 300 clients on 3 processes, and
 * nginx round-robin in front with no sticky sessions.
 */

import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type {
  ChannelMessage,
  Failure,
  ResetEvent,
  SyncClient,
  SyncClientOptions,
} from '../src/client/index.js';
import { type RedisHistoryStore, redisStore } from '../src/stores/redis.js';
import {
  describeWith,
  makeClient,
  NGINX,
  nextValue,
  REDIS_SERVER,
  type RedisServer,
  type ServerProcess,
  startNginx,
  startRedis,
  startServerProcess,
  stopAll,
  T,
  waitFor,
} from './helpers/redis.js';

const PREFIX = `mp${process.pid}:`;
const range = (from: number, to: number) =>
  Array.from({ length: Math.max(0, to - from + 1) }, (_, i) => from + i);

interface PublishResult {
  id: string;
  by: string;
  seq: number;
  epoch: string;
}
interface Published {
  id: string;
  by: string;
  payload: unknown;
}

/** What one client received, per channel, and what it was told. */
function recorder(client: SyncClient) {
  const got = new Map<string, ChannelMessage[]>();
  const resets: ResetEvent[] = [];
  const failures: Failure[] = [];
  client.messages$.subscribe((m) => {
    const list = got.get(m.channel) ?? [];
    if (list.length === 0) got.set(m.channel, list);
    list.push(m);
  });
  client.resets$.subscribe((r) => resets.push(r));
  client.failures$.subscribe((f) => failures.push(f));
  // What the connection did, for the message of a failed wait (cheap; printed only then).
  const log: string[] = [];
  const t0 = Date.now();
  const note = (line: string) => log.length < 2000 && log.push(`${Date.now() - t0} ${line}`);
  client.actor.on('*', (e) => {
    if (e.type === 'message') note(`MSG ${e.frame.channel}#${e.frame.seq}${e.frame.replay ? ' replay' : ''}`);
    else if (e.type === 'settled' && e.request !== 'SYN')
      note(`${e.request} -> ${JSON.stringify('error' in e ? e.error : e.payload)}`);
    else if (e.type === 'failure') note(`failure ${e.kind}`);
    else note(`${e.type} ${JSON.stringify(client.cursors())}`);
  });
  client.state$.subscribe((st) => note(`state ${st}`));
  return {
    log,
    got,
    resets,
    failures,
    of: (channel: string) => got.get(channel) ?? [],
    ids: (channel: string) => (got.get(channel) ?? []).map((m) => (m.payload as Published).id),
  };
}

/** Every seq once, ascending and dense from `from`. */
function expectDense(msgs: ChannelMessage[], from: number, to: number, label: string) {
  expect(
    msgs.map((m) => m.seq),
    label,
  ).toEqual(range(from, to));
}

describeWith(REDIS_SERVER, 'redis-server', 'several server processes on one Redis', () => {
  let redis: RedisServer;
  let A: ServerProcess;
  let B: ServerProcess;
  let C: ServerProcess;
  /** The test's own view of the shared history (same Redis, same prefix). */
  let store: RedisHistoryStore;
  const clients: SyncClient[] = [];
  const client = (opts: Partial<SyncClientOptions> & Pick<SyncClientOptions, 'url'>) => {
    const c = makeClient(opts);
    clients.push(c);
    return c;
  };
  const closeClients = async (list: SyncClient[]) => {
    await Promise.all(list.map((c) => c.close()));
    for (const c of list) clients.splice(clients.indexOf(c), 1);
  };
  const history = async (channel: string) =>
    (await store.read(channel, 0, 100_000)).map((m) => m.payload as Published);

  beforeAll(async () => {
    redis = await startRedis();
    const started = await Promise.all(
      ['A', 'B', 'C'].map((name) => startServerProcess({ name, redisUrl: redis.url, prefix: PREFIX })),
    );
    [A, B, C] = started as [ServerProcess, ServerProcess, ServerProcess];
    store = await redisStore({ url: redis.url }, { prefix: PREFIX, onError: () => undefined });
  }, 60_000);

  afterAll(async () => {
    await Promise.all(clients.splice(0).map((c) => c.close().catch(() => undefined)));
    await store?.close().catch(() => undefined);
    await stopAll();
  }, 30_000);

  it('a client on A receives what B and C publish, in seq order, nothing twice', async () => {
    const ch = 'fan-out';
    const sub = client({ url: A.wsUrl });
    const rec = recorder(sub);
    expect(await sub.subscribe(ch)).toMatchObject({ seq: 0, recovered: true });
    const pb = client({ url: B.wsUrl });
    const pc = client({ url: C.wsUrl });
    const N = 60;
    // Both publishers at once, so the two processes interleave their appends.
    const results = (await Promise.all([
      ...range(1, N).map((i) => pb.send({ id: `b${i}`, publish: ch, payload: i })),
      ...range(1, N).map((i) => pc.send({ id: `c${i}`, publish: ch, payload: i })),
      C.publish(ch, { id: 'server-c', by: 'C', payload: 'from server.publish' }),
    ])) as PublishResult[];
    expect(new Set(results.slice(0, N).map((r) => r.by))).toEqual(new Set(['B']));
    expect(new Set(results.slice(N, 2 * N).map((r) => r.by))).toEqual(new Set(['C']));

    await waitFor(() => rec.of(ch).length >= 2 * N + 1, 10_000, 'every message on A');
    expectDense(rec.of(ch), 1, 2 * N + 1, 'seqs seen on A');
    expect(rec.ids(ch)).toEqual((await history(ch)).map((p) => p.id));
    // Each publisher's own order survives the interleaving.
    expect(rec.ids(ch).filter((id) => id.startsWith('b'))).toEqual(range(1, N).map((i) => `b${i}`));
    expect(rec.ids(ch).filter((id) => id.startsWith('c'))).toEqual(range(1, N).map((i) => `c${i}`));
    expect(rec.resets).toEqual([]);
    await closeClients([sub, pb, pc]);
  }, 30_000);

  describe('dedupe across processes', () => {
    it('a batch applied on A whose replies are lost is retried over HTTP to B and applied once', async () => {
      const ch = 'dedupe-lost-reply';
      // The socket goes to A, HTTP to B: the same batch id reaches two processes.
      const c = client({ url: [A.wsUrl], httpUrl: [B.httpUrl] });
      await nextValue(c.state$, (s) => s === 'open');
      const [a0, b0] = [await A.stats(), await B.stats()];
      c.debug.faults.blockHttp = true;
      const gaveUp = nextValue(
        c.failures$,
        (f) => f.kind === 'syn_timeout' || f.kind === 'ack_timeout',
        5000,
      );
      const sending = c.send({ id: 'once-1', publish: ch, payload: 'x', delayMs: 3 * T });
      // A has the batch and is applying it (its ACK reached the client): from now on nothing A
      // sends reaches the client, so its response is lost.
      await waitFor(async () => (await A.stats()).applied > a0.applied, 5000, 'A to start applying');
      c.debug.faults.blackhole = true;
      // The client gives up on A's socket and retries over HTTP, blocked until A is done.
      await gaveUp;
      await waitFor(async () => (await A.stats()).completed > a0.completed, 5000, 'A to finish');
      c.debug.faults.blockHttp = false;
      // Now the retry reaches B, which finds A's response in Redis.
      const result = (await sending) as PublishResult;
      c.debug.faults.blackhole = false;
      expect(result.by).toBe('A');
      expect((await A.stats()).applied - a0.applied).toBe(1);
      expect((await B.stats()).applied - b0.applied).toBe(0);
      expect((await B.stats()).requests).toBeGreaterThan(b0.requests);
      expect((await history(ch)).map((p) => p.id)).toEqual(['once-1']);
      await closeClients([c]);
    }, 20_000);

    it('an ACK lost while A is still processing: B waits for A and answers with its response', async () => {
      const ch = 'dedupe-lost-ack';
      const c = client({ url: [A.wsUrl], httpUrl: [B.httpUrl] });
      await nextValue(c.state$, (s) => s === 'open');
      const [a0, b0] = [await A.stats(), await B.stats()];
      c.debug.faults.dropAcks = true;
      // Slower than T: the ACK wait runs out and the batch goes over HTTP to B mid-processing.
      const failure = nextValue(c.failures$, (f) => f.kind === 'ack_timeout', 5000);
      const result = (await c.send({
        id: 'once-2',
        publish: ch,
        payload: 'y',
        delayMs: 4 * T,
      })) as PublishResult;
      await failure;
      c.debug.faults.dropAcks = false;
      expect(result.by).toBe('A');
      expect((await A.stats()).applied - a0.applied).toBe(1);
      expect((await B.stats()).applied - b0.applied).toBe(0);
      expect((await B.stats()).requests).toBeGreaterThan(b0.requests);
      expect((await history(ch)).map((p) => p.id)).toEqual(['once-2']);
      await closeClients([c]);
    }, 20_000);
  });

  it('3 processes × 100 clients, publishers on each: every client sees every message of its channels once, in order', async () => {
    const procs = [A, B, C];
    const CHANNELS = 6;
    const PER_PROCESS = 100;
    const PUBLISHERS = 10; // per process
    const OPS = 10; // per publisher
    const chan = (k: number) => `load-${k % CHANNELS}`;
    // Clients join in waves (300 clients dialling at once from one test process would starve
    // its event loop past T) and subscribe with the `channels` option: their first SUB is
    // queued before the socket opens and a re-SUB follows on open; both read the cursor when
    // sent, so neither skips anything.
    const all: Array<{ c: SyncClient; rec: ReturnType<typeof recorder>; channels: string[] }> = [];
    for (let wave = 0; wave < PER_PROCESS / 25; wave++) {
      const joined = range(0, procs.length * 25 - 1).map((k) => {
        const i = all.length + k;
        const channels = [chan(i), chan(i + 1)];
        const c = client({
          url: procs[i % procs.length]!.wsUrl,
          timeout: 300,
          channels: Object.fromEntries(channels.map((ch) => [ch, {}])),
        });
        return { c, rec: recorder(c), channels };
      });
      all.push(...joined);
      await Promise.all(joined.map(({ c }) => nextValue(c.state$, (st) => st === 'open', 20_000)));
      // Live from the head, which is 0: nothing is published before everybody is in.
      await waitFor(
        () => joined.every(({ c, channels }) => channels.every((ch) => c.cursors()[ch]?.seq === 0)),
        20_000,
        'every wave subscribed',
      );
    }
    expect(all).toHaveLength(procs.length * PER_PROCESS);

    const publishers = all.slice(0, procs.length * PUBLISHERS);
    await Promise.all(
      publishers.map(({ c }, i) =>
        Promise.all(range(1, OPS).map((n) => c.send({ id: `p${i}-${n}`, publish: chan(i), payload: n }))),
      ),
    );
    const perChannel = new Map<string, string[]>();
    for (let k = 0; k < CHANNELS; k++)
      perChannel.set(
        chan(k),
        (await history(chan(k))).map((p) => p.id),
      );
    const total = [...perChannel.values()].reduce((n, ids) => n + ids.length, 0);
    expect(total).toBe(procs.length * PUBLISHERS * OPS);

    const missing = () =>
      all.flatMap(({ c, rec, channels }, i) =>
        channels
          .filter((ch) => rec.of(ch).length < perChannel.get(ch)!.length)
          .map((ch) => ({ i, c, rec, ch })),
      );
    await waitFor(
      () => missing().length === 0,
      30_000,
      'every client to receive every message of its channels',
    ).catch((err: Error) => {
      const lines = missing().map(
        ({ i, c, rec, ch }) =>
          `client ${i} (${procs[i % procs.length]!.name}, ${c.state}) ${ch}: ` +
          `got ${rec
            .of(ch)
            .map((m) => m.seq)
            .join(',')} of ${perChannel.get(ch)!.length}, ` +
          `cursor ${JSON.stringify(c.cursors()[ch])}, resets ${rec.resets.length}`,
      );
      const first = missing()[0];
      throw new Error(`${err.message}\n${lines.slice(0, 10).join('\n')}\n${first?.rec.log.join('\n')}`);
    });
    for (const [i, { rec, channels }] of all.entries()) {
      for (const ch of channels) {
        const want = perChannel.get(ch)!;
        expectDense(rec.of(ch), 1, want.length, `client ${i} on ${ch}`);
        expect(rec.ids(ch), `client ${i} on ${ch}`).toEqual(want);
      }
      expect(rec.resets, `client ${i}`).toEqual([]);
    }
    await closeClients(all.map(({ c }) => c));
  }, 90_000);

  it('kill the process a client is on, mid-traffic: it redials another, resumes, loses and repeats nothing', async () => {
    const D = await startServerProcess({ name: 'D', redisUrl: redis.url, prefix: PREFIX });
    const ch = 'failover';
    const own = 'failover-own';
    // On D first; each redial moves to the next URL (failover round robin), HTTP follows.
    const s = client({ url: [D.wsUrl, A.wsUrl, B.wsUrl], httpUrl: [D.httpUrl, A.httpUrl, B.httpUrl] });
    const rec = recorder(s);
    await s.subscribe(ch);
    await s.subscribe(own);
    const pa = client({ url: A.wsUrl });
    const pb = client({ url: B.wsUrl });
    const N = 150;
    const publishing = Promise.all(
      [pa, pb].map(async (p, k) => {
        for (let i = 1; i <= N; i++) await p.send({ id: `${k ? 'b' : 'a'}${i}`, publish: ch, payload: i });
      }),
    );
    // The client's own traffic through D, one operation at a time, also across the kill.
    let stop = false;
    const sent: string[] = [];
    const sending = (async () => {
      for (let i = 1; !stop || i <= 5; i++) {
        const id = `own${i}`;
        sent.push(id);
        await s.send({ id, publish: own, payload: i });
      }
    })();

    await waitFor(() => rec.of(ch).length >= N / 2, 20_000, 'traffic before the kill');
    await D.kill();
    const down = await nextValue(
      s.failures$,
      (f) => f.kind === 'close' || f.kind === 'dial_error',
      5000,
    ).catch(() => rec.failures[0]);
    expect(down).toBeDefined();
    await publishing;
    stop = true;
    await sending;

    const want = (await history(ch)).map((p) => p.id);
    expect(want).toHaveLength(2 * N);
    await waitFor(() => rec.of(ch).length >= 2 * N, 20_000, 'every message after the failover');
    expectDense(rec.of(ch), 1, 2 * N, 'seqs across the failover');
    expect(rec.ids(ch)).toEqual(want);
    // Resumed with recovered: true: nothing was reported lost.
    expect(rec.resets).toEqual([]);
    // Its own operations: every one answered, none lost. The one D was applying when it died
    // is applied again on A once D's claim lapses; its publication carries the batch's
    // idempotency key, so even when D died between publishing and recording its response,
    // it is published once.
    const ownIds = (await history(own)).map((p) => p.id);
    for (const id of sent) expect(ownIds, id).toContain(id);
    expect(ownIds.length - new Set(ownIds).size).toBe(0);
    await waitFor(() => rec.of(own).length >= ownIds.length, 10_000, 'own channel caught up');
    expectDense(rec.of(own), 1, ownIds.length, 'own channel');
    await closeClients([s, pa, pb]);
  }, 60_000);

  describeWith(NGINX, 'nginx', 'behind nginx (round robin, no sticky sessions)', () => {
    it('clients through nginx land on every process, fall back to HTTP on any, and miss nothing', async () => {
      const nginx = await startNginx([A.port, B.port, C.port]);
      try {
        const ch = 'via-nginx';
        const before = await Promise.all([A, B, C].map((p) => p.stats()));
        const subs = range(1, 6).map(() => client({ url: nginx.wsUrl }));
        const recs = subs.map(recorder);
        await Promise.all(subs.map((c) => c.subscribe(ch)));
        // Round robin: the six sockets are spread over all three processes.
        const mid = await Promise.all([A, B, C].map((p) => p.stats()));
        for (const [i, s] of mid.entries())
          expect(s.upgrades - before[i]!.upgrades, s.name).toBeGreaterThan(0);

        // One publisher on a healthy socket, one whose socket is deaf: its batches go over
        // HTTP, and each POST may reach a different process than the socket (and the last POST).
        const [healthy, deaf] = subs;
        deaf!.debug.faults.blackhole = true;
        const N = 20;
        const results = (await Promise.all([
          Promise.all(range(1, N).map((i) => healthy!.send({ id: `h${i}`, publish: ch, payload: i }))),
          (async () => {
            const out: PublishResult[] = [];
            for (let i = 1; i <= 6; i++)
              out.push((await deaf!.send({ id: `d${i}`, publish: ch, payload: i })) as PublishResult);
            return out;
          })(),
        ])) as [PublishResult[], PublishResult[]];
        deaf!.debug.faults.blackhole = false;
        expect(results[1].map((r) => r.id)).toEqual(range(1, 6).map((i) => `d${i}`));

        const want = (await history(ch)).map((p) => p.id);
        expect(want).toHaveLength(N + 6);
        expect(new Set(want).size).toBe(want.length);
        await waitFor(
          () => recs.every((r) => r.of(ch).length >= want.length),
          15_000,
          'everyone through nginx',
        );
        for (const [i, r] of recs.entries()) {
          expectDense(r.of(ch), 1, want.length, `client ${i}`);
          expect(r.ids(ch), `client ${i}`).toEqual(want);
        }
        // HTTP requests were spread too: no process had to see a client's earlier requests.
        const after = await Promise.all([A, B, C].map((p) => p.stats()));
        const served = after.filter((s, i) => s.requests > mid[i]!.requests);
        expect(served.length).toBeGreaterThanOrEqual(2);
        await closeClients(subs);
      } finally {
        await nginx.stop();
      }
    }, 60_000);
  });

  describe('Redis loses its data', () => {
    it('after FLUSHALL: new epochs, clients told recovered: false through resets$, no message missing', async () => {
      const ch = 'flushed';
      const x = client({ url: A.wsUrl });
      const y = client({ url: B.wsUrl });
      const [rx, ry] = [recorder(x), recorder(y)];
      await Promise.all([x.subscribe(ch), y.subscribe(ch)]);
      const p = client({ url: C.wsUrl });
      for (let i = 1; i <= 5; i++) await p.send({ id: `old${i}`, publish: ch, payload: i });
      await waitFor(() => rx.of(ch).length === 5 && ry.of(ch).length === 5, 5000, 'the old epoch');
      const oldEpoch = rx.of(ch)[0]!.epoch;

      expect(await redis.command('FLUSHALL')).toBe('+OK');
      const fresh = (await p.send({ id: 'new1', publish: ch, payload: 1 })) as PublishResult;
      expect(fresh.seq).toBe(1);
      expect(fresh.epoch).not.toBe(oldEpoch);

      for (const [c, r] of [
        [x, rx],
        [y, ry],
      ] as const) {
        await waitFor(() => r.resets.length > 0, 5000, 'resets$');
        expect(r.resets[0]).toEqual({ channel: ch, epoch: fresh.epoch });
        await waitFor(() => r.of(ch).some((m) => m.epoch === fresh.epoch), 5000, 'the new epoch');
        expect(
          r
            .of(ch)
            .filter((m) => m.epoch === fresh.epoch)
            .map((m) => (m.payload as Published).id),
        ).toEqual(['new1']);
        expect(c.cursors()[ch]).toEqual({ epoch: fresh.epoch, seq: 1 });
      }
      // A client coming back with the old cursor is told its copy is stale.
      const late = client({ url: C.wsUrl });
      expect(await late.subscribe(ch, { since: 5, epoch: oldEpoch })).toEqual({
        epoch: fresh.epoch,
        seq: 1,
        recovered: false,
      });
      await closeClients([x, y, p, late]);
    }, 30_000);

    it('after a redis-server restart without persistence: the same, and redialled clients too', async () => {
      const ch = 'restarted';
      const x = client({ url: A.wsUrl });
      const rx = recorder(x);
      await x.subscribe(ch);
      const p = client({ url: C.wsUrl });
      for (let i = 1; i <= 3; i++) await p.send({ id: `old${i}`, publish: ch, payload: i });
      await waitFor(() => rx.of(ch).length === 3, 5000, 'the old epoch');
      const oldEpoch = rx.of(ch)[0]!.epoch;

      await redis.stop();
      await redis.start();
      // The processes reconnect on their own; publishing works again once they have.
      let fresh: { seq: number; epoch: string } | undefined;
      await waitFor(
        async () => {
          fresh = await B.publish(ch, { id: 'new1', by: 'B', payload: 1 }).catch(() => undefined);
          return fresh !== undefined;
        },
        15_000,
        'B to publish after the restart',
      );
      expect(fresh!.epoch).not.toBe(oldEpoch);
      await waitFor(() => rx.resets.length > 0, 5000, 'resets$ on a live socket');
      expect(rx.resets[0]!.epoch).toBe(fresh!.epoch);

      // A client that redials (socket dropped) resumes with the old cursor: not recovered.
      const y = client({ url: [A.wsUrl, B.wsUrl] });
      const ry = recorder(y);
      await y.subscribe(ch, { since: 3, epoch: oldEpoch }).then((st) => expect(st.recovered).toBe(false));
      expect(ry.resets.map((r) => r.epoch)).toContain(fresh!.epoch);
      await closeClients([x, y, p]);
    }, 40_000);
  });
});
