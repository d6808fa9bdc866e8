/**
 * Memory and byte budgets against a hostile client (issue 12, second attacker round): each
 * attack from /work/break12 as a regression test, asserting the documented refusal or bound
 * and that a well-behaved client on the same server keeps being answered.
 *
 * - dedupe memory is what `dedupeMaxBytes` counts (responses kept as JSON text), measured as
 *   heapUsed after GC in a child server (`--expose-gc`, test/fixtures/fault-server.ts);
 * - clientId bindings are never evicted by a flood of fresh clientIds (memory store), which
 *   is refused `too_many_clients` instead; SQLite and Redis hold theirs in the store;
 * - one principal cannot take the server-wide byte budget (`maxQueuedBytesPerPrincipal`),
 *   and `SUB`/`UNS` frames are bounded per socket like `SYN`s;
 * - bytes still being received (HTTP bodies, unfinished WebSocket messages) count against
 *   the budgets;
 * - channel records that only housekeeping frees are bounded server-wide (`maxChannels`).
 */
import type { IncomingMessage } from 'node:http';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { WebSocket } from 'ws';
import { createSyncClient, type SyncClient } from '../src/client/index.js';
import { type ChildServer, startChildServer } from './helpers/child-server.js';
import { deferred, harness, httpUrl, post, RawSocket, wsUrl } from './helpers/raw.js';

const h = harness();
/** The principal from `?user=` (socket) or `X-User` (HTTP); none → 401. */
const authenticate = (req: IncomingMessage): { id: string } | null => {
  const q = new URL(req.url ?? '/', 'http://x').searchParams.get('user');
  const header = req.headers['x-user'];
  const id = q ?? (typeof header === 'string' ? header : null);
  return id ? { id } : null;
};

const MB = 1024 * 1024;
const mb = (n: number) => Math.round((n / MB) * 10) / 10;

let child: ChildServer | undefined;
const clients: SyncClient[] = [];
const sockets: WebSocket[] = [];
afterEach(async () => {
  for (const s of sockets.splice(0)) s.terminate();
  await Promise.all(clients.splice(0).map((c) => c.close()));
  await child?.stop();
  child = undefined;
});
afterAll(async () => {
  await child?.stop();
});

/** A well-behaved client of `port` (principal `user` when the server authenticates). */
function wellBehaved(port: number, user?: string): { client: SyncClient; sync(): Promise<void> } {
  const q = user === undefined ? '' : `?user=${user}`;
  const client = createSyncClient({
    url: `ws://127.0.0.1:${port}/sync${q}`,
    WebSocket: WebSocket as never,
    timeout: 5000,
    ...(user === undefined ? {} : { headers: { 'X-User': user } }),
  });
  clients.push(client);
  let n = 0;
  return {
    client,
    async sync() {
      const id = `well-${++n}`;
      expect(await client.send({ id })).toEqual({ id });
    },
  };
}

/** A raw socket that answers with every frame it receives, parsed. */
function rawSocket(url: string): Promise<{ ws: WebSocket; frames: any[] }> {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url);
    sockets.push(ws);
    const frames: any[] = [];
    ws.on('message', (d) => frames.push(JSON.parse(String(d))));
    ws.once('open', () => resolve({ ws, frames }));
    ws.once('error', reject);
  });
}

async function until(check: () => boolean, ms: number, what: string): Promise<void> {
  const deadline = Date.now() + ms;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`${what} not met within ${ms} ms`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

describe('dedupe memory is the bytes dedupeMaxBytes counts', () => {
  /** The cap of this test; the default is 64 MiB. */
  const CAP = 16 * MB;
  /**
   * Documented bound (README "Limits"): remembered responses take at most dedupeMaxBytes of
   * heap (JSON text, plus the per-entry overhead that the cap counts too). Before the fix the
   * live result objects were kept: ~16 × their JSON size for `[[{},…],…]` results.
   */
  const BOUND = 1.25 * CAP;

  it('results shaped like the request keep the heap under dedupeMaxBytes; replays decode the kept text', async () => {
    child = await startChildServer({
      FAULT_SERVER_ECHO: '1',
      FAULT_SERVER_OPTIONS: JSON.stringify({ dedupeMaxBytes: CAP }),
    });
    const { port } = child;
    const well = wellBehaved(port);
    await well.sync();
    const before = await child.call('memory');
    expect(before.gc).toBe(true);

    // 800 operations of 20 empty objects: ~50 KB of JSON (under dedupeMaxResponseBytes, so
    // kept), ~800 KB of heap once parsed. Echoed back as the results.
    const payload = Array.from({ length: 800 }, () => Array.from({ length: 20 }, () => ({})));
    const text = JSON.stringify(payload);
    const SOCKETS = 4;
    const PER_SOCKET = 150; // 600 responses × ~50 KB = ~30 MB through a 16 MiB cap
    const socks = await Promise.all(
      Array.from({ length: SOCKETS }, (_, s) => rawSocket(`ws://127.0.0.1:${port}/sync?clientId=flood-${s}`)),
    );
    const flooding = socks.map(async ({ ws, frames }, s) => {
      for (let i = 0; i < PER_SOCKET; i++) {
        const id = `f${s}-${i}`;
        ws.send(`{"id":"${id}","type":"SYN","payload":${text}}`);
        await until(() => frames.some((f) => f.id === id && f.type !== 'ACK'), 20_000, `the answer to ${id}`);
        // Keep only what the test reads later, so this process's heap stays small.
        const answer = frames.find((f) => f.id === id && f.type !== 'ACK');
        expect(answer.type).toBe('SYN');
        frames.length = 0;
      }
    });
    await well.sync(); // answered during the flood
    await Promise.all(flooding);
    const during = await child.call('memory');
    const growth = during.memory.heapUsed - before.memory.heapUsed;
    console.log(
      `[harden-budgets] dedupe: heapUsed after GC ${mb(before.memory.heapUsed)} MiB before, ` +
        `${mb(during.memory.heapUsed)} MiB after ${SOCKETS * PER_SOCKET} echoed responses ` +
        `(+${mb(growth)} MiB; dedupeBytes ${mb(during.stats.dedupeBytes)} MiB, cap ${mb(CAP)}, bound ${mb(BOUND)})`,
    );
    expect(during.stats.dedupeBytes).toBeLessThanOrEqual(CAP);
    expect(during.stats.dedupeEntries).toBe(SOCKETS * PER_SOCKET + 2); // every id still known (+ 2 well-behaved)
    expect(growth).toBeLessThan(BOUND);

    // A replay of the newest is answered from the kept text, equal to the first answer…
    const { ws, frames } = socks[0]!;
    const last = `f0-${PER_SOCKET - 1}`;
    ws.send(`{"id":"${last}","type":"SYN","payload":${text}}`);
    await until(() => frames.some((f) => f.id === last && f.type !== 'ACK'), 10_000, 'the replay');
    expect(frames.find((f) => f.id === last && f.type !== 'ACK')).toEqual({
      id: last,
      type: 'SYN',
      payload,
    });
    // …the oldest was reduced to its fingerprint: applied, result not kept.
    ws.send(`{"id":"f0-0","type":"SYN","payload":${text}}`);
    await until(() => frames.some((f) => f.id === 'f0-0' && f.type !== 'ACK'), 10_000, 'the old replay');
    expect(frames.find((f) => f.id === 'f0-0' && f.type !== 'ACK')).toMatchObject({
      type: 'NAK',
      error: { code: 'result_not_kept' },
    });
    const counts = await child.call('counts');
    expect(counts.applied).toBe(SOCKETS * PER_SOCKET * 800 + 2); // no replay applied again
    await well.sync();
  }, 120_000);
});

describe('one principal cannot take the server-wide byte budget', () => {
  const KB = 1024;
  /** Frames of this test: limits scaled down from the defaults by 4 (same ratios). */
  const opts = {
    authenticate,
    maxPayloadBytes: 256 * KB, // per client 512 KiB, per principal 1 MiB (the defaults' ratios)
    maxQueuedBytes: 4 * MB,
  };

  it('SUBs held behind a busy lane: the attacker holds at most its share, SUB/UNS counts are bounded, another principal is answered', async () => {
    const gate = deferred();
    let held = 0;
    const server = await h.start<{ id: string }>({
      ...opts,
      maxQueuedPerClient: 10,
      // Mallory's subscriptions wait here, as behind a paused replay (scratch/21-budget-lock.ts).
      authorize: async (user) => {
        if (user.id === 'mallory') {
          held++;
          await gate.promise;
        }
        return true;
      },
    });
    const open = async (clientId: string, user: string) => {
      const sock = await RawSocket.open(`${wsUrl(server, clientId)}&user=${user}`);
      sockets.push(sock.ws);
      return sock;
    };
    const pad = 'p'.repeat(200 * KB);
    const mallory = await Promise.all(Array.from({ length: 10 }, (_, i) => open(`m-${i}`, 'mallory')));
    for (const [i, sock] of mallory.entries()) {
      sock.send({ id: `L${i}`, type: 'SUB', payload: { channels: { 'ch-1': { since: 0 } } } });
      for (let j = 0; j < 2; j++) {
        sock.send({ id: `Q${i}-${j}`, type: 'SUB', payload: { channels: { 'ch-1': {} } }, pad });
      }
    }
    // Every padded frame is answered at once: ACKed (held) or refused rate_limited.
    const padded = mallory.flatMap((sock, i) =>
      [0, 1].map((j) => sock.next((f) => f.id === `Q${i}-${j}`, 10_000)),
    );
    const first = await Promise.all(padded);
    const taken = first.filter((f) => f.type === 'ACK').length;
    const refused = first.filter((f) => f.type === 'NAK' && f.error.code === 'rate_limited').length;
    expect(taken + refused).toBe(20);
    // 1 MiB share / ~200 KiB frames (the small SUBs hold a little of it too).
    expect(taken).toBeLessThanOrEqual(5);
    expect(server.stats().queuedBytes).toBeLessThanOrEqual(1 * MB);

    // Count bound: small SUB/UNS frames past maxQueuedPerClient in one lane are refused.
    const lane = mallory[0]!;
    const ids = Array.from({ length: 15 }, (_, k) => `S${k}`);
    for (const [k, id] of ids.entries()) {
      lane.send(
        k % 2 === 0
          ? { id, type: 'SUB', payload: { channels: { [`c-${k}`]: {} } } }
          : { id, type: 'UNS', payload: { channels: [`c-${k}`] } },
      );
    }
    // Each is ACKed on receipt; those past the lane's bound are then refused.
    const limitedNow = () =>
      lane.received.filter((f) => f.type === 'NAK' && ids.includes(f.id) && f.error.code === 'rate_limited')
        .length;
    await until(() => limitedNow() >= ids.length - 10 + 1, 10_000, 'SUB/UNS past the lane bound refused');
    // 10 in the lane at most: the held SUB and the taken padded ones count too.
    expect(lane.received.filter((f) => ids.includes(f.id) && f.type === 'SYN')).toEqual([]);

    // Another principal: its sends and its subscription are answered while mallory holds on.
    const alice = createSyncClient({
      url: `${wsUrl(server)}?user=alice`,
      WebSocket: WebSocket as never,
      headers: { 'X-User': 'alice' },
      timeout: 5000,
    });
    clients.push(alice);
    for (let i = 0; i < 5; i++) expect(await alice.send({ i })).toEqual({ ok: { i } });
    await alice.subscribe('ch-1');
    const overHttp = await post(
      httpUrl(server),
      'c-alice-http',
      { id: 'a:1', type: 'SYN', payload: [1] },
      {
        'X-User': 'alice',
      },
    );
    expect(overHttp.status).toBe(200);
    expect(held).toBeGreaterThan(0);
    gate.resolve();
    await until(() => server.stats().queuedBytes === 0, 10_000, 'the held bytes released');
  });

  it('SYNs held in a slow onSync from many clientIds of one principal: capped at its share, another principal answered', async () => {
    const gate = deferred();
    const server = await h.start<{ id: string }>({
      ...opts,
      onSync: async (ops, ctx) => {
        if (ctx.principal.id === 'mallory') await gate.promise;
        return ops.map((op) => ({ ok: op }));
      },
    });
    const frame = (id: string) => `{"id":"${id}","type":"SYN","payload":["${'x'.repeat(200 * KB)}"]}`;
    const mallory: RawSocket[] = [];
    for (let i = 0; i < 10; i++) {
      const sock = await RawSocket.open(`${wsUrl(server, `ms-${i}`)}&user=mallory`);
      sockets.push(sock.ws);
      mallory.push(sock);
      for (let j = 0; j < 2; j++) sock.send(frame(`m${i}-${j}`));
    }
    const first = await Promise.all(
      mallory.flatMap((sock, i) => [0, 1].map((j) => sock.next((f) => f.id === `m${i}-${j}`, 10_000))),
    );
    const taken = first.filter((f) => f.type === 'ACK').length;
    expect(first.filter((f) => f.type === 'NAK' && f.error.code === 'rate_limited').length).toBe(20 - taken);
    expect(taken).toBeLessThanOrEqual(5);
    expect(server.stats().queuedBytes).toBeLessThanOrEqual(1 * MB);
    // Alice, a 200 KiB SYN included, on the socket and over HTTP.
    const alice = await RawSocket.open(`${wsUrl(server, 'c-alice')}&user=alice`);
    sockets.push(alice.ws);
    expect(
      (await alice.request({ id: 'a:1', type: 'SYN', payload: ['x'.repeat(200 * KB)] })).at(-1),
    ).toMatchObject({
      type: 'SYN',
    });
    const overHttp = await post(
      httpUrl(server),
      'c-alice-2',
      { id: 'a:2', type: 'SYN', payload: [2] },
      {
        'X-User': 'alice',
      },
    );
    expect(overHttp.body.at(-1)).toEqual({ id: 'a:2', type: 'SYN', payload: [{ ok: 2 }] });
    gate.resolve();
    await until(() => server.stats().queuedBytes === 0, 10_000, 'the held bytes released');
  });
});
