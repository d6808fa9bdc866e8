/**
 * Issue 12, third round (a second fresh attacker): limits a client cannot dodge by choosing its
 * clientId, and a server-wide socket cap. Against a real `ws` server on 127.0.0.1 (SQLite files
 * where the attack used SQLite, real nginx for `trustProxy`). Linux loopback routes all of
 * 127.0.0.0/8, so a client binding `localAddress: '127.0.0.2'` is another address on the same
 * server: each attack comes from one address and an honest client from another keeps being
 * answered.
 */

import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { request } from 'node:http';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { WebSocket } from 'ws';
import { createSyncClient, type SyncClient } from '../src/client/index.js';
import { addressKey, compileTrust } from '../src/server/identity.js';
import type { SyncServer } from '../src/server/index.js';
import { defaultMaxSockets } from '../src/server/index.js';
import { hostnameOf } from '../src/server/limits.js';
import { sqliteStore } from '../src/stores/sqlite.js';
import { findNginx, type Nginx, startNginx } from './helpers/nginx.js';
import { eventually, harness, wsUrl } from './helpers/raw.js';

const h = harness();
const opened: WebSocket[] = [];
const clients: SyncClient[] = [];
const dir = mkdtempSync(join(tmpdir(), 'syncwire-anon-'));
afterEach(async () => {
  for (const ws of opened.splice(0)) ws.terminate();
  await Promise.all(clients.splice(0).map((c) => c.close()));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

interface Reply {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  body: any;
}

/** POST `body` to `port`'s /sync from `localAddress`, with `headers`; bounded by 5 s. */
function postFrom(
  port: number,
  from: string,
  clientId: string,
  body: unknown,
  headers: Record<string, string> = {},
): Promise<Reply> {
  return new Promise((resolve, reject) => {
    const text = JSON.stringify(body);
    const req = request(
      {
        host: '127.0.0.1',
        port,
        path: '/sync',
        method: 'POST',
        localAddress: from,
        timeout: 5000,
        headers: {
          'X-Client-Id': clientId,
          'Content-Type': 'application/json',
          'Content-Length': String(Buffer.byteLength(text)),
          ...headers,
        },
      },
      (res) => {
        let t = '';
        res.on('data', (d) => {
          t += d;
        });
        res.on('end', () => {
          let parsed: unknown = t;
          try {
            parsed = JSON.parse(t);
          } catch {}
          resolve({ status: res.statusCode ?? 0, headers: res.headers, body: parsed });
        });
      },
    );
    req.on('timeout', () => req.destroy(new Error('request timed out')));
    req.on('error', reject);
    req.end(text);
  });
}

/** A `ws` socket from `localAddress`, recording its frames; resolves with the upgrade's status. */
function socketFrom(
  server: SyncServer,
  from: string,
  clientId: string,
  headers: Record<string, string> = {},
) {
  const ws = new WebSocket(wsUrl(server, clientId), { localAddress: from, headers });
  opened.push(ws);
  const frames: any[] = [];
  ws.on('message', (d) => frames.push(JSON.parse(String(d))));
  ws.on('error', () => {});
  const status = new Promise<{ status: number; retryAfter?: string }>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('upgrade got no answer within 5 s')), 5000);
    ws.once('open', () => {
      clearTimeout(timer);
      resolve({ status: 101 });
    });
    ws.once('unexpected-response', (_req, res) => {
      clearTimeout(timer);
      res.resume();
      resolve({ status: res.statusCode ?? 0, retryAfter: res.headers['retry-after'] as string });
    });
  });
  return { ws, frames, status };
}

const sub = (id: string, names: string[]) => ({
  id,
  type: 'SUB',
  payload: { channels: Object.fromEntries(names.map((n) => [n, {}])) },
});
const names = (prefix: string, n: number) => Array.from({ length: n }, (_, i) => `${prefix}-${i}`);

/** An honest client on `from` gets its HTTP SYN and a small SUB answered. */
async function honestAnswered(server: SyncServer, from: string, tag: string): Promise<void> {
  const { port } = server.address();
  const syn = await postFrom(port, from, `honest-${tag}`, { id: 'h1', type: 'SYN', payload: [1] });
  expect(syn.status).toBe(200);
  expect(syn.body).toContainEqual({ id: 'h1', type: 'SYN', payload: [{ ok: 1 }] });
  const poll = await postFrom(port, from, `honest-${tag}`, sub('h2', ['news']));
  expect(poll.status).toBe(200);
  expect(poll.body.at(-1)).toMatchObject({ id: 'h2', type: 'SYN' });
}

describe('anonymous limits count per client address, whatever the clientId', () => {
  it('1000-channel polls with a fresh X-Client-Id each, from one address: refused by the look-up budget (SQLite); another address is answered', async () => {
    const file = join(dir, 'polls.db');
    const server = await h.start({ store: sqliteStore({ file }) });
    const { port } = server.address();
    // Twelve polls at once, each a new clientId naming 1000 new channels (the attack ran 8 loops of these).
    const replies = await Promise.all(
      Array.from({ length: 12 }, (_, g) =>
        postFrom(port, '127.0.0.2', `ap-${g}`, sub(`p${g}`, names(`a-${g}`, 1000))),
      ),
    );
    // An HTTP SUB refused by the look-up budget is a NAK rate_limited in the 200 answer (after its ACK).
    const refused = replies.filter((r) =>
      r.body.some?.((f: any) => f.type === 'NAK' && f.error.code === 'rate_limited'),
    );
    // Burst 2000 look-ups per address: at most 2 polls (plus what refilled meanwhile) are served.
    expect(refused.length, JSON.stringify(replies.map((r) => r.body.at?.(-1)?.type))).toBeGreaterThanOrEqual(
      8,
    );
    await honestAnswered(server, '127.0.0.3', 'polls');
  });

  it('a poll naming many channels costs the request rate in proportion: once the look-ups ran out, the next polls are refused 429 before their bodies are read', async () => {
    // Defaults: 2000 look-ups and 200 requests per second per principal, so a channel named
    // costs a tenth of a request, and a 1000-channel poll 1 + 100.
    const server = await h.start({});
    const { port } = server.address();
    const first = await postFrom(port, '127.0.0.2', 'seq-1', sub('q1', names('s1', 1000)));
    expect(first.status).toBe(200);
    expect(first.body.at(-1)).toMatchObject({ id: 'q1', type: 'SYN' });
    const second = await postFrom(port, '127.0.0.2', 'seq-2', sub('q2', names('s2', 1000)));
    expect(second.status).toBe(200);
    // Before: every further poll was read, parsed and answered 200 with NAK rate_limited by
    // the look-up budget (issue 12: each refused poll still cost its parse; 200 of them per
    // second per principal). Now the two polls put the address's request rate into debt
    // (~1 s of it), so the next ones are refused 429 before their bodies are read.
    const statuses: number[] = [];
    for (let i = 3; i <= 10; i++) {
      const r = await postFrom(port, '127.0.0.2', `seq-${i}`, sub(`q${i}`, names(`s${i}`, 1000)));
      statuses.push(r.status);
      if (r.status === 429) {
        expect(r.body[0].error.message).toMatch(/HTTP requests per second/);
        expect(r.headers['retry-after']).toBe('1');
      }
    }
    expect(statuses.filter((s) => s === 429).length, String(statuses)).toBeGreaterThanOrEqual(6);
    // A small poll of another address is not charged for it.
    await honestAnswered(server, '127.0.0.3', 'charge');
  });

  it("anonymousKey 'clientId' keeps the old keying: the same polls are all served", async () => {
    const server = await h.start({ anonymousKey: 'clientId' });
    const { port } = server.address();
    const replies = await Promise.all(
      Array.from({ length: 6 }, (_, g) =>
        postFrom(port, '127.0.0.2', `ap-${g}`, sub(`p${g}`, names(`b-${g}`, 1000))),
      ),
    );
    expect(replies.map((r) => r.status)).toEqual(Array(6).fill(200));
    expect(replies.map((r) => r.body.at(-1).type)).toEqual(Array(6).fill('SYN'));
  });

  it('HTTP request rate: fresh clientIds from one address share its rate; another address is answered', async () => {
    const server = await h.start({ maxHttpRequestsPerSecondPerPrincipal: 3 });
    const { port } = server.address();
    const replies = await Promise.all(
      Array.from({ length: 20 }, (_, i) =>
        postFrom(port, '127.0.0.2', `r-${i}`, { id: `s${i}`, type: 'PNG' }),
      ),
    );
    const statuses = replies.map((r) => r.status);
    expect(statuses.filter((s) => s === 429).length, String(statuses)).toBeGreaterThanOrEqual(15);
    expect(replies.find((r) => r.status === 429)?.headers['retry-after']).toBe('1');
    await honestAnswered(server, '127.0.0.3', 'rate');
  });

  it('sockets: anonymous sockets of one address are counted (429 past maxSocketsPerPrincipal); another address opens', async () => {
    const server = await h.start({ maxSocketsPerPrincipal: 3 });
    const mine = [0, 1, 2].map((i) => socketFrom(server, '127.0.0.2', `s-${i}`));
    for (const s of mine) expect((await s.status).status).toBe(101);
    const fourth = socketFrom(server, '127.0.0.2', 's-3');
    expect(await fourth.status).toEqual({ status: 429, retryAfter: '5' });
    const other = socketFrom(server, '127.0.0.3', 'o-1');
    expect((await other.status).status).toBe(101);
    other.ws.send(JSON.stringify({ id: 'p', type: 'PNG' }));
    await eventually(() => other.frames.some((f) => f.id === 'p'), 5000, 'the other address answered');
    expect(server.stats().sockets).toBe(4);
  });

  it("frame rate: an address's sockets share maxFramesPerSecondPerPrincipal; another address is answered", async () => {
    const server = await h.start({ maxFramesPerSecondPerPrincipal: 10, maxBadFrames: 1000 });
    const a = socketFrom(server, '127.0.0.2', 'f-1');
    const b = socketFrom(server, '127.0.0.2', 'f-2');
    expect((await a.status).status).toBe(101);
    expect((await b.status).status).toBe(101);
    for (let i = 0; i < 15; i++) {
      a.ws.send(JSON.stringify({ id: `a${i}`, type: 'PNG' }));
      b.ws.send(JSON.stringify({ id: `b${i}`, type: 'PNG' }));
    }
    const all = () => [...a.frames, ...b.frames];
    await eventually(() => all().length >= 30, 5000, 'every PNG answered (ACK or NAK)');
    const nak = all().filter((f) => f.type === 'NAK' && f.error?.code === 'rate_limited');
    // 30 frames against one bucket of 10 (plus what refills while they arrive).
    expect(nak.length).toBeGreaterThanOrEqual(10);
    const other = socketFrom(server, '127.0.0.3', 'f-3');
    expect((await other.status).status).toBe(101);
    other.ws.send(JSON.stringify({ id: 'o', type: 'PNG' }));
    await eventually(() => other.frames.length > 0, 5000, 'the other address answered');
    expect(other.frames[0]).toEqual({ id: 'o', type: 'ACK' });
  });

  it('channels: the sockets of one address share maxChannelsPerPrincipal; another address subscribes in full', async () => {
    const server = await h.start({ maxChannelsPerPrincipal: 3 });
    const a = socketFrom(server, '127.0.0.2', 'ch-1');
    const b = socketFrom(server, '127.0.0.2', 'ch-2');
    expect((await a.status).status).toBe(101);
    expect((await b.status).status).toBe(101);
    a.ws.send(JSON.stringify(sub('s1', ['x1', 'x2'])));
    await eventually(() => a.frames.some((f) => f.id === 's1' && f.type === 'SYN'), 5000, 'first SUB');
    b.ws.send(JSON.stringify(sub('s2', ['y1', 'y2'])));
    await eventually(() => b.frames.some((f) => f.id === 's2' && f.type === 'SYN'), 5000, 'second SUB');
    const entries = b.frames.find((f) => f.id === 's2' && f.type === 'SYN').payload[0].channels;
    expect(Object.values(entries).filter((e: any) => e.error?.code === 'too_many_channels')).toHaveLength(1);
    const c = socketFrom(server, '127.0.0.3', 'ch-3');
    expect((await c.status).status).toBe(101);
    c.ws.send(JSON.stringify(sub('s3', ['z1', 'z2', 'z3'])));
    await eventually(() => c.frames.some((f) => f.id === 's3' && f.type === 'SYN'), 5000, 'third SUB');
    const third = c.frames.find((f) => f.id === 's3' && f.type === 'SYN').payload[0].channels;
    expect(Object.values(third).every((e: any) => e.error === undefined)).toBe(true);
  });

  it('request bytes: slow bodies of fresh clientIds from one address share maxQueuedBytesPerPrincipal', async () => {
    const KB = 1024;
    const server = await h.start({ maxPayloadBytes: 64 * KB, maxQueuedBytesPerPrincipal: 128 * KB });
    const { port } = server.address();
    const body = Buffer.from(`{"id":"slow","type":"SYN","payload":["${'a'.repeat(60 * KB)}"]}`);
    // Bodies that never finish, each from a fresh clientId on 127.0.0.2.
    const held = Array.from({ length: 4 }, (_, i) => {
      const req = request({
        host: '127.0.0.1',
        port,
        path: '/sync',
        method: 'POST',
        localAddress: '127.0.0.2',
        headers: { 'X-Client-Id': `slow-${i}`, 'Content-Length': String(body.length) },
      });
      req.on('error', () => {});
      const status = new Promise<number>((resolve) => req.on('response', (r) => resolve(r.statusCode ?? 0)));
      req.write(body.subarray(0, body.length - 1));
      return { req, status };
    });
    // Two are held (2 × 60 KiB ≤ 128 KiB), the others answered 429 at once.
    const refused = await Promise.all(held.slice(2).map((x) => x.status));
    expect(refused).toEqual([429, 429]);
    expect(server.stats().queuedBytes).toBeLessThanOrEqual(128 * KB);
    await honestAnswered(server, '127.0.0.3', 'bytes');
    for (const x of held) x.req.destroy();
  });
});

describe('trustProxy, through a real nginx that appends X-Forwarded-For', () => {
  const binary = findNginx();
  let nginx: Nginx | undefined;
  afterEach(async () => {
    await nginx?.dispose();
    nginx = undefined;
  });

  it.runIf(binary || process.env.CI)(
    'with trustProxy 1, clients behind nginx are limited by their own address (a forged X-Forwarded-For is not believed)',
    async () => {
      const server = await h.start({ maxHttpRequestsPerSecondPerPrincipal: 2, trustProxy: 1 });
      nginx = await startNginx({
        binary: binary!,
        upstreamPort: server.address().port,
        readTimeout: '5s',
        forwardedFor: true,
      });
      const via = nginx.port;
      // The attacker on 127.0.0.2, each request claiming another address; nginx appends the real one.
      const replies = await Promise.all(
        Array.from({ length: 8 }, (_, i) =>
          postFrom(
            via,
            '127.0.0.2',
            `x-${i}`,
            { id: `x${i}`, type: 'PNG' },
            { 'X-Forwarded-For': `203.0.113.${i}` },
          ),
        ),
      );
      const statuses = replies.map((r) => r.status);
      expect(statuses.filter((s) => s === 429).length, String(statuses)).toBeGreaterThanOrEqual(5);
      // Another address behind the same proxy has a rate of its own.
      const other = await postFrom(via, '127.0.0.3', 'y-1', { id: 'y', type: 'SYN', payload: [1] });
      expect(other.status).toBe(200);
      expect(h.errors.filter((e) => e.where === 'trustProxy')).toEqual([]);
    },
  );

  it.runIf(binary || process.env.CI)(
    'without trustProxy, a forwarded request is reported once to onError, and clients behind nginx share its address',
    async () => {
      const server = await h.start({ maxHttpRequestsPerSecondPerPrincipal: 2 });
      nginx = await startNginx({
        binary: binary!,
        upstreamPort: server.address().port,
        readTimeout: '5s',
        forwardedFor: true,
      });
      const via = nginx.port;
      const replies = await Promise.all(
        Array.from({ length: 4 }, (_, i) =>
          postFrom(via, '127.0.0.2', `x-${i}`, { id: `x${i}`, type: 'PNG' }),
        ),
      );
      expect(replies.filter((r) => r.status === 429).length).toBeGreaterThanOrEqual(1);
      // The proxy's address is the only one the server sees: another client is refused too.
      const other = await postFrom(via, '127.0.0.3', 'y-1', { id: 'y', type: 'PNG' });
      expect(other.status).toBe(429);
      const reported = h.errors.filter((e) => e.where === 'trustProxy');
      expect(reported).toHaveLength(1);
      expect((reported[0]!.error as { code?: string }).code).toBe('ERR_SYNCWIRE_UNEXPECTED_X_FORWARDED_FOR');
    },
  );
});

describe('maxSockets: a server-wide socket cap', () => {
  const cookie = {
    authenticate: (req: { headers: { cookie?: string } }) => {
      const m = /session=(\w+)/.exec(req.headers.cookie ?? '');
      return m ? { id: m[1]! } : null;
    },
  };

  it('refuses the upgrade past maxSockets with 503 + Retry-After, counts it in stats(), and opens again once one closes', async () => {
    const server = await h.start({ ...cookie, maxSockets: 3 });
    // Three principals, one socket each: no per-principal limit is near.
    const held = ['a', 'b', 'c'].map((u) =>
      socketFrom(server, '127.0.0.1', `k-${u}`, { Cookie: `session=${u}` }),
    );
    for (const s of held) expect((await s.status).status).toBe(101);
    const refused = socketFrom(server, '127.0.0.2', 'k-d', { Cookie: 'session=d' });
    expect(await refused.status).toEqual({ status: 503, retryAfter: '5' });
    expect(server.stats()).toMatchObject({ sockets: 3, socketsRefused: 1 });
    // HTTP is still answered meanwhile.
    const { port } = server.address();
    const viaHttp = await postFrom(
      port,
      '127.0.0.2',
      'k-d',
      { id: 'd1', type: 'SYN', payload: [1] },
      {
        Cookie: 'session=d',
      },
    );
    expect(viaHttp.status).toBe(200);
    held[0]!.ws.terminate();
    await eventually(() => server.stats().sockets === 2, 5000, 'a socket freed');
    const again = socketFrom(server, '127.0.0.2', 'k-d', { Cookie: 'session=d' });
    expect((await again.status).status).toBe(101);
  });

  it('anonymous sockets from many addresses fill it; an upgrade past it is refused before authenticate runs', async () => {
    let authCalls = 0;
    const server = await h.start({
      maxSockets: 4,
      authenticate: () => {
        authCalls++;
        return { id: `u${authCalls}` };
      },
    });
    const held = [2, 3, 4, 5].map((n) => socketFrom(server, `127.0.0.${n}`, `m-${n}`));
    for (const s of held) expect((await s.status).status).toBe(101);
    const before = authCalls;
    const refused = socketFrom(server, '127.0.0.6', 'm-6');
    expect((await refused.status).status).toBe(503);
    expect(authCalls).toBe(before);
  });

  it('the reference client goes on over HTTP while the server is full', async () => {
    const server = await h.start({ maxSockets: 1 });
    const hog = socketFrom(server, '127.0.0.2', 'hog');
    expect((await hog.status).status).toBe(101);
    const client = createSyncClient({ url: wsUrl(server), timeout: 300, maxBackoff: 1000, WebSocket });
    clients.push(client);
    const result = await Promise.race([
      client.send(41),
      new Promise((_, reject) =>
        setTimeout(() => reject(new Error('send not answered within 10 s')), 10_000),
      ),
    ]);
    expect(result).toEqual({ ok: 41 });
    expect(server.stats().sockets).toBe(1);
    expect(server.stats().socketsRefused).toBeGreaterThanOrEqual(1);
  });

  it('defaults to half the soft open-files limit, at most 10 000', () => {
    const file = join(dir, 'limits');
    const write = (soft: string) =>
      writeFileSync(
        file,
        `Limit                     Soft Limit           Hard Limit           Units\nMax open files            ${soft}                1048576              files\n`,
      );
    write('1024');
    expect(defaultMaxSockets(file)).toBe(512);
    write('1048576');
    expect(defaultMaxSockets(file)).toBe(10_000);
    write('unlimited');
    expect(defaultMaxSockets(file)).toBe(10_000);
    expect(defaultMaxSockets(join(dir, 'missing'))).toBe(10_000);
  });
});

describe('a refused request writes no clientId binding (SQLite)', () => {
  const bindingsIn = (file: string) => {
    const db = new Database(file, { readonly: true });
    try {
      return (db.prepare('SELECT client_id FROM bindings').all() as { client_id: string }[])
        .map((r) => r.client_id)
        .sort();
    } finally {
      db.close();
    }
  };
  const bearer = {
    authenticate: (req: { headers: { authorization?: string } }) => {
      const t = (req.headers.authorization ?? '').replace(/^Bearer /, '');
      return t ? { id: t } : null;
    },
  };

  it('HTTP: rate-limited requests with fresh clientIds bind nothing; the served one is bound', async () => {
    const file = join(dir, 'bind-http.db');
    const server = await h.start({
      ...bearer,
      store: sqliteStore({ file }),
      maxHttpRequestsPerSecondPerPrincipal: 1,
    });
    const { port } = server.address();
    const replies = await Promise.all(
      Array.from({ length: 10 }, (_, i) =>
        postFrom(
          port,
          '127.0.0.2',
          `bind-${i}`,
          { id: `b${i}`, type: 'PNG' },
          { Authorization: 'Bearer mallory' },
        ),
      ),
    );
    const served = replies.flatMap((r, i) => (r.status === 200 ? [`bind-${i}`] : []));
    expect(replies.filter((r) => r.status === 429).length).toBeGreaterThanOrEqual(8);
    expect(bindingsIn(file)).toEqual(served.sort());
  });

  it('upgrade: a socket refused past maxSocketsPerPrincipal binds nothing', async () => {
    const file = join(dir, 'bind-ws.db');
    const server = await h.start({ ...bearer, store: sqliteStore({ file }), maxSocketsPerPrincipal: 1 });
    const first = socketFrom(server, '127.0.0.2', 'w-0', { Authorization: 'Bearer mallory' });
    expect((await first.status).status).toBe(101);
    for (let i = 1; i <= 5; i++) {
      const s = socketFrom(server, '127.0.0.2', `w-${i}`, { Authorization: 'Bearer mallory' });
      expect((await s.status).status).toBe(429);
    }
    expect(bindingsIn(file)).toEqual(['w-0']);
  });
});

describe('strict Host parse', () => {
  it('accepts host[:port] of a name, an IPv4 or an [IPv6] literal; refuses the rest with 403', async () => {
    expect(hostnameOf('LocalHost:8080')).toBe('localhost');
    expect(hostnameOf('[::1]:80')).toBe('::1');
    expect(hostnameOf('127.0.0.1')).toBe('127.0.0.1');
    expect(hostnameOf('app.localhost')).toBe('app.localhost');
    for (const bad of [
      ' localhost',
      'localhost ',
      'localhost.',
      '[::1].evil.example',
      '[::1]evil',
      '[127.0.0.1]',
      'localhost:80x',
      'localhost:123456',
      'local host',
      'localhost:80:81',
      '',
      'a..b',
    ]) {
      expect(hostnameOf(bad), JSON.stringify(bad)).toBeUndefined();
    }
    const server = await h.start();
    const { port } = server.address();
    const withHost = (host: string) =>
      postFrom(port, '127.0.0.1', 'hc', { id: 'h', type: 'PNG' }, { Host: host }).then((r) => r.status);
    expect(await withHost('localhost.')).toBe(403);
    expect(await withHost('[::1].evil.example')).toBe(403);
    expect(await withHost(`localhost:${port}`)).toBe(200);
    expect(await withHost(`[::1]:${port}`)).toBe(200);
    // Two Host headers (Node would keep the first): refused.
    const twice = await new Promise<string>((resolve, reject) => {
      const sock = connect(port, '127.0.0.1', () =>
        sock.write(
          `POST /sync HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\nHost: evil.example\r\nX-Client-Id: h2\r\n` +
            'Content-Length: 23\r\nConnection: close\r\n\r\n{"id":"a","type":"PNG"}',
        ),
      );
      let text = '';
      sock.on('data', (d) => {
        text += d;
      });
      sock.on('close', () => resolve(text.split('\r\n')[0]!));
      sock.on('error', reject);
    });
    expect(twice).toBe('HTTP/1.1 403 Forbidden');
    const ws = socketFrom(server, '127.0.0.1', 'hw', { Host: '[::1].evil.example' });
    expect((await ws.status).status).toBe(403);
  });
});

describe('address keys', () => {
  it('IPv4 as it is, IPv4-mapped IPv6 as IPv4, IPv6 by its /64', () => {
    expect(addressKey('127.0.0.2')).toBe('a:127.0.0.2');
    expect(addressKey('::ffff:10.1.2.3')).toBe('a:10.1.2.3');
    expect(addressKey('2001:db8:0:1:aaaa::1')).toBe('a:2001:db8:0:1::/64');
    expect(addressKey('2001:db8:0:1:bbbb::2')).toBe(addressKey('2001:db8:0:1:aaaa::1'));
    expect(addressKey('2001:db8:0:2::1')).not.toBe(addressKey('2001:db8:0:1::1'));
    expect(addressKey(undefined)).toBe('a:unknown');
  });

  it('trustProxy takes what proxy-addr and Express take', () => {
    expect(compileTrust(undefined)('10.0.0.1', 0)).toBe(false);
    expect(compileTrust(true)('10.0.0.1', 5)).toBe(true);
    expect(compileTrust(2)('x', 1)).toBe(true);
    expect(compileTrust(2)('x', 2)).toBe(false);
    expect(compileTrust('loopback')('127.0.0.1', 0)).toBe(true);
    expect(compileTrust('loopback, 10.0.0.0/8')('10.9.9.9', 0)).toBe(true);
    expect(compileTrust(['192.168.0.0/16'])('10.9.9.9', 0)).toBe(false);
    expect(() => compileTrust(['not-an-address'])).toThrow(TypeError);
  });

  it('an authenticated principal named like an address key is not matched as one', async () => {
    const server = await h.start({
      authenticate: (req: { headers: { authorization?: string } }) =>
        (req.headers.authorization ?? '').replace(/^Bearer /, '') || null,
    });
    // Principal "a:127.0.0.2" is counted as p:a:127.0.0.2, apart from anonymous a:127.0.0.2.
    const s = socketFrom(server, '127.0.0.2', 'n-1', { Authorization: 'Bearer a:127.0.0.2' });
    expect((await s.status).status).toBe(101);
    expect(await server.disconnect({ principal: 'a:127.0.0.2' })).toBe(1);
    expect(await server.disconnect({ principal: null })).toBe(0);
  });
});
