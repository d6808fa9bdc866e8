/**
 * Request identity on the server (issue 9, server half; issue 12, dedupe memory): a clientId
 * is bound to the first principal that uses it, dedupe is scoped to the principal, a reused
 * id with another payload is refused `id_reused`, and dedupe memory is bounded in bytes
 * (`result_not_kept`). Real sockets and HTTP on loopback, on the memory store, a real SQLite
 * file, and a real redis-server with two server instances sharing it.
 */

import { createHash } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import type { IncomingMessage } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { WebSocket } from 'ws';
import { createSyncClient, type SyncClient } from '../src/client/index.js';
import { SyncError } from '../src/protocol/index.js';
import { Dedupe, fingerprint } from '../src/server/dedupe.js';
import type { SyncServer, SyncServerOptions } from '../src/server/index.js';
import { memoryStore } from '../src/stores/memory.js';
import { redisStore } from '../src/stores/redis.js';
import { sqliteStore } from '../src/stores/sqlite.js';
import {
  deferred,
  eventually,
  harness,
  httpUrl,
  is,
  post,
  RawSocket,
  upgradeStatus,
  wsUrl,
} from './helpers/raw.js';
import { REDIS_SERVER, type RedisServer, startRedis, stopAll } from './helpers/redis.js';

const h = harness();
const dir = mkdtempSync(join(tmpdir(), 'syncwire-identity-'));
let files = 0;
let redis: RedisServer | undefined;
let prefixes = 0;

beforeAll(async () => {
  if (REDIS_SERVER) redis = await startRedis();
}, 30_000);
afterAll(async () => {
  closeSockets();
  await stopAll();
  rmSync(dir, { recursive: true, force: true });
});

interface User {
  id: string;
}

/** The principal from `?user=` (socket) or `X-User` (HTTP); none → 401. */
const authenticate = (req: IncomingMessage): User | null => {
  const q = new URL(req.url ?? '/', 'http://x').searchParams.get('user');
  const header = req.headers['x-user'];
  const id = q ?? (typeof header === 'string' ? header : null);
  return id ? { id } : null;
};

/** Every result says who it was applied for and which op it was: nothing can be mistaken. */
function recorder() {
  const applied: { by: string; op: unknown }[] = [];
  const onSync: SyncServerOptions<unknown, unknown, User>['onSync'] = (ops, ctx) =>
    ops.map((op) => {
      applied.push({ by: ctx.principal.id, op });
      return { by: ctx.principal.id, op };
    });
  return { applied, onSync };
}

/**
 * Two servers a client and an attacker may reach: the same server for memory and SQLite (one
 * process owns the file), two servers on one Redis prefix for Redis (as two processes).
 */
interface Setup {
  name: string;
  start(opts: Partial<SyncServerOptions<unknown, unknown, User>>): Promise<[SyncServer, SyncServer]>;
}

const setups: Setup[] = [
  {
    name: 'memory',
    async start(opts) {
      const s = await h.start<User>({ store: memoryStore(), ...opts });
      return [s, s];
    },
  },
  {
    name: 'sqlite',
    async start(opts) {
      const s = await h.start<User>({ store: sqliteStore({ file: join(dir, `id-${++files}.db`) }), ...opts });
      return [s, s];
    },
  },
  {
    name: 'redis (two servers)',
    async start(opts) {
      if (!redis) throw new Error('redis-server is not installed (apt-get install redis-server)');
      const prefix = `id${process.pid}-${++prefixes}:`;
      const quiet = () => {};
      const open = () => redisStore({ url: redis!.url }, { prefix, onError: quiet, claimLeaseMs: 1000 });
      const one = await h.start<User>({ store: await open(), ...opts });
      const two = await h.start<User>({ store: await open(), ...opts });
      return [one, two];
    },
  },
];

const as = (server: SyncServer, clientId: string, user: string) =>
  `${wsUrl(server, clientId)}&user=${encodeURIComponent(user)}`;

async function socketAs(server: SyncServer, clientId: string, user: string): Promise<RawSocket> {
  const sock = await RawSocket.open(as(server, clientId, user));
  sockets.push(sock);
  return sock;
}
const sockets: RawSocket[] = [];
const closeSockets = () => {
  for (const s of sockets.splice(0)) s.ws.terminate();
};

const postAs = (server: SyncServer, clientId: string, user: string, env: unknown) =>
  post(httpUrl(server), clientId, env, { 'X-User': user });

/** What a reply body or frame list says, as one string: to assert nothing of a victim leaks. */
const text = (v: unknown) => JSON.stringify(v);

describe.each(setups)('principal binding on $name', (setup) => {
  afterAll(closeSockets);

  it('refuses a second principal presenting the clientId, on the upgrade and over HTTP, and leaks nothing', async () => {
    const { applied, onSync } = recorder();
    const [one, two] = await setup.start({ authenticate, onSync });
    const victim = await socketAs(one, 'c-victim', 'alice');
    const first = await victim.request({ id: 'v:1', type: 'SYN', payload: [{ secret: 'alice-1' }] });
    expect(first.at(-1)).toEqual({
      id: 'v:1',
      type: 'SYN',
      payload: [{ by: 'alice', op: { secret: 'alice-1' } }],
    });

    // The upgrade: 409.
    expect(await upgradeStatus(as(two, 'c-victim', 'mallory'))).toBe(409);
    // HTTP, replaying the victim's id: 409 with NAK client_id_taken, nothing of alice's.
    const replay = await postAs(two, 'c-victim', 'mallory', {
      id: 'v:1',
      type: 'SYN',
      payload: [{ secret: 'alice-1' }],
    });
    expect(replay.status).toBe(409);
    expect(replay.body).toEqual([
      { id: null, type: 'NAK', error: { code: 'client_id_taken', message: expect.any(String) } },
    ]);
    expect(text(replay.body)).not.toContain('alice');
    // A PNG or a SUB over HTTP is refused the same way.
    expect((await postAs(two, 'c-victim', 'mallory', { id: 'p', type: 'PNG' })).status).toBe(409);

    // The victim's next operation is applied and answered with its own result.
    const next = await victim.request({ id: 'v:2', type: 'SYN', payload: [{ secret: 'alice-2' }] });
    expect(next.at(-1)).toEqual({
      id: 'v:2',
      type: 'SYN',
      payload: [{ by: 'alice', op: { secret: 'alice-2' } }],
    });
    // Over HTTP on the other server too, as alice.
    const viaHttp = await postAs(two, 'c-victim', 'alice', { id: 'v:3', type: 'SYN', payload: ['x'] });
    expect(viaHttp.status).toBe(200);
    expect(viaHttp.body.at(-1)).toEqual({ id: 'v:3', type: 'SYN', payload: [{ by: 'alice', op: 'x' }] });
    expect(applied.filter((a) => a.by === 'mallory')).toEqual([]);
    expect(applied.map((a) => a.op)).toEqual([{ secret: 'alice-1' }, { secret: 'alice-2' }, 'x']);
  });

  it("does not let an attacker's request for the victim's next id decide the victim's result", async () => {
    const { applied, onSync } = recorder();
    const [one, two] = await setup.start({ authenticate, onSync });
    const victim = await socketAs(one, 'c-next', 'alice');
    await victim.request({ id: 'n:1', type: 'SYN', payload: ['warm'] });
    // The attacker sends the victim's next id first, with its own payload, on both transports.
    const attack = await postAs(two, 'c-next', 'mallory', { id: 'n:2', type: 'SYN', payload: ['evil'] });
    expect(attack.status).toBe(409);
    expect(await upgradeStatus(as(two, 'c-next', 'mallory'))).toBe(409);
    const real = await victim.request({ id: 'n:2', type: 'SYN', payload: ['mine'] });
    expect(real.at(-1)).toEqual({ id: 'n:2', type: 'SYN', payload: [{ by: 'alice', op: 'mine' }] });
    expect(applied).toEqual([
      { by: 'alice', op: 'warm' },
      { by: 'alice', op: 'mine' },
    ]);
  });

  it('lets the attacker use a clientId of its own, and keeps the victim unaffected', async () => {
    const { applied, onSync } = recorder();
    const [one, two] = await setup.start({ authenticate, onSync });
    const victim = await socketAs(one, 'c-v2', 'alice');
    await victim.request({ id: 'x:1', type: 'SYN', payload: ['a'] });
    const own = await socketAs(two, 'c-mallory', 'mallory');
    const reply = await own.request({ id: 'x:1', type: 'SYN', payload: ['a'] });
    expect(reply.at(-1)).toEqual({ id: 'x:1', type: 'SYN', payload: [{ by: 'mallory', op: 'a' }] });
    expect(applied).toHaveLength(2);
  });

  it('refuses a reused id with another payload: id_reused, once answered and while in flight, on both transports', async () => {
    const gate = deferred();
    const applied: unknown[] = [];
    const [one, two] = await setup.start({
      authenticate,
      onSync: async (ops, ctx) => {
        applied.push(...ops);
        if (ops[0] === 'slow') await gate.promise;
        return ops.map((op) => ({ by: ctx.principal.id, op }));
      },
    });
    const sock = await socketAs(one, 'c-reuse', 'alice');
    const done = await sock.request({ id: 'r:1', type: 'SYN', payload: ['one'] });
    expect(done.at(-1)).toEqual({ id: 'r:1', type: 'SYN', payload: [{ by: 'alice', op: 'one' }] });

    // Completed, then reused with another payload: WS and HTTP (on the other server).
    const again = await sock.request({ id: 'r:1', type: 'SYN', payload: ['two'] });
    expect(again.at(-1)).toMatchObject({ id: 'r:1', type: 'NAK', error: { code: 'id_reused' } });
    const overHttp = await postAs(two, 'c-reuse', 'alice', { id: 'r:1', type: 'SYN', payload: ['two'] });
    expect(overHttp.status).toBe(200);
    expect(overHttp.body).toEqual([
      { id: 'r:1', type: 'ACK' },
      { id: 'r:1', type: 'NAK', error: { code: 'id_reused', message: expect.any(String) } },
    ]);
    // The same payload is still answered from memory, not applied again.
    const same = await postAs(two, 'c-reuse', 'alice', { id: 'r:1', type: 'SYN', payload: ['one'] });
    expect(same.body.at(-1)).toEqual(done.at(-1));

    // In flight: the first copy is held in onSync.
    sock.send({ id: 'r:2', type: 'SYN', payload: ['slow'] });
    await sock.next(is.ack('r:2'));
    await eventually(() => applied.includes('slow'));
    const inflightWs = await socketAs(one, 'c-reuse', 'alice');
    const wsReused = inflightWs.request({ id: 'r:2', type: 'SYN', payload: ['other'] });
    const httpReused = postAs(two, 'c-reuse', 'alice', { id: 'r:2', type: 'SYN', payload: ['other'] });
    if (one === two) {
      // One process sees the copy in flight and refuses at once, before the first ends.
      expect((await wsReused).at(-1)).toMatchObject({ id: 'r:2', type: 'NAK', error: { code: 'id_reused' } });
      expect((await httpReused).body.at(-1)).toMatchObject({ type: 'NAK', error: { code: 'id_reused' } });
      gate.resolve();
    } else {
      // Another process learns the fingerprint when the first copy is answered.
      gate.resolve();
      expect((await wsReused).at(-1)).toMatchObject({ id: 'r:2', type: 'NAK', error: { code: 'id_reused' } });
      expect((await httpReused).body.at(-1)).toMatchObject({ type: 'NAK', error: { code: 'id_reused' } });
    }
    expect(await sock.next(is.reply('r:2'))).toEqual({
      id: 'r:2',
      type: 'SYN',
      payload: [{ by: 'alice', op: 'slow' }],
    });
    expect(applied).toEqual(['one', 'slow']);
  });

  it('keeps a response over dedupeMaxResponseBytes as its fingerprint: a replay gets result_not_kept', async () => {
    const applied: unknown[] = [];
    const [one, two] = await setup.start({
      authenticate,
      dedupeMaxResponseBytes: 2048,
      onSync: (ops) => {
        applied.push(...ops);
        return ops.map((op) => ({ op, blob: op === 'big' ? 'b'.repeat(4096) : '' }));
      },
    });
    const sock = await socketAs(one, 'c-big', 'alice');
    const first = await sock.request({ id: 'b:1', type: 'SYN', payload: ['big'] });
    expect(first.at(-1).payload[0].blob).toHaveLength(4096);
    const replay = await postAs(two, 'c-big', 'alice', { id: 'b:1', type: 'SYN', payload: ['big'] });
    expect(replay.body.at(-1)).toMatchObject({ id: 'b:1', type: 'NAK', error: { code: 'result_not_kept' } });
    // Still known as used: another payload is id_reused, not applied.
    const reused = await postAs(two, 'c-big', 'alice', { id: 'b:1', type: 'SYN', payload: ['small'] });
    expect(reused.body.at(-1)).toMatchObject({ error: { code: 'id_reused' } });
    expect(applied).toEqual(['big']);
  });

  it('honours dedupeMaxEntries: the oldest response is forgotten first', async () => {
    const applied: unknown[] = [];
    const [one, two] = await setup.start({
      authenticate,
      dedupeMaxEntries: 3,
      onSync: (ops) => {
        applied.push(...ops);
        return ops;
      },
    });
    const sock = await socketAs(one, 'c-cap', 'alice');
    for (let i = 1; i <= 6; i++) await sock.request({ id: `e:${i}`, type: 'SYN', payload: [i] });
    // The three newest are remembered (not applied again)…
    for (let i = 4; i <= 6; i++) {
      const r = await postAs(two, 'c-cap', 'alice', { id: `e:${i}`, type: 'SYN', payload: [i] });
      expect(r.body.at(-1)).toEqual({ id: `e:${i}`, type: 'SYN', payload: [i] });
    }
    expect(applied).toEqual([1, 2, 3, 4, 5, 6]);
    // …the oldest was forgotten: a replay of it is processed again.
    await postAs(two, 'c-cap', 'alice', { id: 'e:1', type: 'SYN', payload: [1] });
    expect(applied).toEqual([1, 2, 3, 4, 5, 6, 1]);
  });
});

describe.each(setups)('a flood of fresh clientIds on $name (issue 12)', (setup) => {
  afterAll(closeSockets);

  it("never evicts a victim's binding: the attacker cannot take its clientId, and the victim is still answered", async () => {
    const { onSync } = recorder();
    const [one, two] = await setup.start({
      authenticate,
      onSync,
      maxClientIds: 40,
      maxClientIdsPerPrincipal: 20,
    });
    const victim = await socketAs(one, 'c-victim-f', 'alice');
    expect((await victim.request({ id: 'v:1', type: 'SYN', payload: ['a'] })).at(-1)).toMatchObject({
      type: 'SYN',
    });
    // 100 fresh clientIds of one principal: 2.5 × the table, 5 × the principal's share.
    const answers: { status: number; code?: string; retryAfter?: unknown }[] = [];
    for (let i = 0; i < 100; i++) {
      const r = await postAs(two, `c-flood-${i}`, 'mallory', { id: `p${i}`, type: 'PNG' });
      answers.push({
        status: r.status,
        code: r.body?.[0]?.error?.code,
        retryAfter: r.headers['retry-after'],
      });
    }
    if (setup.name === 'memory') {
      // Bindings live in this process: the principal's share is bound, the rest refused.
      expect(answers.slice(0, 20).every((a) => a.status === 200)).toBe(true);
      expect(answers.slice(20)).toEqual(
        Array(80).fill({ status: 503, code: 'too_many_clients', retryAfter: '30' }),
      );
    } else {
      // The store holds every binding (the process keeps only a cache of them).
      expect(answers.every((a) => a.status === 200)).toBe(true);
    }
    // The victim's clientId still belongs to the victim…
    expect(await upgradeStatus(as(two, 'c-victim-f', 'mallory'))).toBe(409);
    const stolen = await postAs(two, 'c-victim-f', 'mallory', { id: 'v:2', type: 'SYN', payload: ['m'] });
    expect(stolen.status).toBe(409);
    // …and the victim is answered on its socket, over HTTP and on a new socket.
    expect((await victim.request({ id: 'v:3', type: 'SYN', payload: ['b'] })).at(-1)).toMatchObject({
      type: 'SYN',
      payload: [{ by: 'alice', op: 'b' }],
    });
    const overHttp = await postAs(two, 'c-victim-f', 'alice', { id: 'v:4', type: 'SYN', payload: ['c'] });
    expect(overHttp.body.at(-1)).toMatchObject({ type: 'SYN', payload: [{ by: 'alice', op: 'c' }] });
    const again = await socketAs(two, 'c-victim-f', 'alice');
    expect((await again.request({ id: 'v:5', type: 'SYN', payload: ['d'] })).at(-1)).toMatchObject({
      type: 'SYN',
    });
    // Another principal's new clientId is taken: one principal cannot fill the table.
    const bob = await postAs(one, 'c-bob-f', 'bob', { id: 'b:1', type: 'SYN', payload: ['e'] });
    expect(bob.body.at(-1)).toMatchObject({ type: 'SYN', payload: [{ by: 'bob', op: 'e' }] });
  });
});

describe('a full binding table (memory store)', () => {
  it('refuses a new clientId with 503 too_many_clients on both transports, and takes it once bindings expire', async () => {
    const { onSync } = recorder();
    const server = await h.start<User>({
      authenticate,
      onSync,
      maxClientIds: 5,
      dedupeWindowMs: 1000,
    });
    const first = await socketAs(server, 'c-full-0', 'u0');
    for (let i = 1; i < 5; i++) {
      expect((await postAs(server, `c-full-${i}`, `u${i}`, { id: 'p', type: 'PNG' })).status).toBe(200);
    }
    const refused = await postAs(server, 'c-full-5', 'u5', { id: 'p', type: 'PNG' });
    expect(refused.status).toBe(503);
    expect(refused.headers['retry-after']).toBe('30');
    expect(refused.body).toEqual([
      { id: null, type: 'NAK', error: { code: 'too_many_clients', message: expect.any(String) } },
    ]);
    expect(await upgradeStatus(as(server, 'c-full-5', 'u5'))).toBe(503);
    // Bound clientIds are still served.
    expect((await first.request({ id: 's:1', type: 'SYN', payload: ['x'] })).at(-1)).toMatchObject({
      type: 'SYN',
      payload: [{ by: 'u0', op: 'x' }],
    });
    // Once the window of the others ends (u0's socket refreshes its own), a new clientId is bound.
    const deadline = Date.now() + 10_000;
    for (;;) {
      await first.request({ id: `s:${Date.now()}`, type: 'SYN', payload: ['keep'] });
      const r = await postAs(server, 'c-full-5', 'u5', { id: 'p', type: 'PNG' });
      if (r.status === 200) break;
      expect(r.status).toBe(503);
      if (Date.now() > deadline) throw new Error('the binding table never freed a slot');
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
    // u0 kept its clientId through all of it.
    expect(await upgradeStatus(as(server, 'c-full-0', 'u5'))).toBe(409);
  });
});

describe('dedupe memory in bytes (in-process)', () => {
  it('stays under dedupeMaxBytes with many large responses; an id reduced to its fingerprint answers result_not_kept', async () => {
    const maxBytes = 64 * 1024;
    let calls = 0;
    const server = await h.start({
      dedupeMaxBytes: maxBytes,
      dedupeMaxResponseBytes: 16 * 1024,
      onSync: (ops) => ops.map((op) => ({ op, n: ++calls, blob: 'r'.repeat(10_000) })),
    });
    const sock = await h.socket(server, 'c-bytes');
    for (let i = 1; i <= 60; i++) {
      await sock.request({ id: `m:${i}`, type: 'SYN', payload: [i] });
      expect(server.stats().dedupeBytes).toBeLessThanOrEqual(maxBytes);
    }
    // 60 × ~10 kB of responses went through; the memory holds at most 64 kB.
    expect(server.stats().dedupeEntries).toBe(60); // every id is still known (as a fingerprint)
    const old = await sock.request({ id: 'm:1', type: 'SYN', payload: [1] });
    expect(old.at(-1)).toMatchObject({ id: 'm:1', type: 'NAK', error: { code: 'result_not_kept' } });
    const recent = await sock.request({ id: 'm:60', type: 'SYN', payload: [60] });
    expect(recent.at(-1)).toMatchObject({ id: 'm:60', type: 'SYN', payload: [{ op: 60, n: 60 }] });
    expect(calls).toBe(60);
  });
});

describe('dedupe keys are scoped to the principal', () => {
  it('runs the same (clientId, id) of two owners separately', async () => {
    const dedupe = new Dedupe({
      windowMs: 60_000,
      maxEntries: 100,
      maxBytes: 1_000_000,
      maxResponseBytes: 10_000,
      maxQueuedPerClient: 10,
      store: undefined,
      onError: () => {},
    });
    const syn = { id: 'k:1', type: 'SYN' as const, payload: ['op'] };
    const a = await dedupe.run('owner-a', 'c', syn, async () => ({ id: 'k:1', type: 'SYN', payload: ['A'] }));
    const b = await dedupe.run('owner-b', 'c', syn, async () => ({ id: 'k:1', type: 'SYN', payload: ['B'] }));
    expect([a, b]).toEqual([
      { id: 'k:1', type: 'SYN', payload: ['A'] },
      { id: 'k:1', type: 'SYN', payload: ['B'] },
    ]);
    const again = await dedupe.run('owner-a', 'c', syn, async () => {
      throw new Error('must not run');
    });
    expect(again).toEqual(a);
  });
});

describe('the reference client', () => {
  const clients: SyncClient[] = [];
  afterAll(() => {
    for (const c of clients) c.close();
  });

  it('rejects sends with a typed client_id_taken when its clientId belongs to another principal', async () => {
    const { applied, onSync } = recorder();
    const server = await h.start<User>({ authenticate, onSync });
    const victim = await socketAs(server, 'c-shared-id', 'alice');
    await victim.request({ id: 'a:1', type: 'SYN', payload: ['alice'] });
    const client = createSyncClient({
      url: wsUrl(server),
      clientId: 'c-shared-id',
      params: { user: 'mallory' },
      headers: { 'X-User': 'mallory' },
      timeout: 200,
      WebSocket: WebSocket as never,
    });
    clients.push(client);
    const err = await client.send({ op: 1 }).then(
      () => null,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(SyncError);
    expect((err as SyncError).code).toBe('client_id_taken');
    expect(applied).toEqual([{ by: 'alice', op: 'alice' }]);
  });
});

describe('fingerprints', () => {
  it('hash a payload deeper than the call stack, and tell payloads apart', () => {
    const deep = JSON.parse(`[${'['.repeat(10_000)}${']'.repeat(10_000)}]`);
    expect(fingerprint(deep)).toMatch(/^[\w-]{43}$/);
    const text = `[${'['.repeat(10_000)}${']'.repeat(10_000)}]`;
    expect(fingerprint(deep)).toBe(fingerprint(JSON.parse(text)));
    expect(fingerprint(deep)).not.toBe(fingerprint(JSON.parse(`[${text}]`)));
    const distinct = [
      [1],
      ['1'],
      [[1]],
      [{ a: 1 }],
      [{ a: '1' }],
      [{ 'a:1': null }],
      [1, 2],
      [12],
      [null],
      [{}],
      [[]],
    ];
    expect(new Set(distinct.map((p) => fingerprint(p))).size).toBe(distinct.length);
    expect(fingerprint([{ a: 1, b: [2] }])).toBe(fingerprint(JSON.parse('[{"a":1,"b":[2]}]')));
  });

  it('are SHA-256 of the documented text, whatever its size (hashed in chunks): stable across versions and processes', () => {
    const sha = (text: string) => createHash('sha256').update(text).digest('base64url');
    // The JSON with a `,` after every element and member (dedupe.ts), fixed since shared
    // stores compare fingerprints made by other processes and earlier versions.
    expect(fingerprint([{ a: 1, b: ['x', null] }])).toBe(sha('[{"a":1,"b":["x",null,],},],'));
    const big = Array.from({ length: 20_000 }, (_, i) => ({ i, s: 'é'.repeat(i % 7) }));
    const text = `[${big.map(({ i, s }) => `{"i":${i},"s":${JSON.stringify(s)},},`).join('')}],`;
    expect(text.length).toBeGreaterThan(3 * 64 * 1024); // spans several chunks
    expect(fingerprint(big)).toBe(sha(text));
  });
});
