/**
 * The reference server against hostile clients and dead networks (issue 12), over real
 * sockets on loopback: cross-site WebSocket hijacking and cross-site requests (Origin),
 * limits in bytes and counts (maxBatch, queued bytes per client and per server, sockets per
 * clientId and per principal, HTTP header and body deadlines), a frame nested 400,000 deep,
 * and liveness (half-open sockets reaped by protocol pings; a throttled client kept alive
 * behind an idle-cutting proxy by the server's pings). Each attack asserts the documented
 * refusal and that a well-behaved client on the same server is still answered.
 * Heap under a 1 MiB-frame flood is measured in harden-memory.test.ts.
 */
import { connect, type Socket } from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import { WebSocket } from 'ws';
import { type Clock, createSyncClient, type Failure, type SyncClient } from '../src/client/index.js';
import { CloseCodes } from '../src/protocol/index.js';
import type { SyncServer } from '../src/server/index.js';
import {
  deferred,
  eventually,
  harness,
  http,
  httpUrl,
  is,
  post,
  RawSocket,
  upgradeStatus,
  wsUrl,
} from './helpers/raw.js';
import { startTcpProxy, type TcpProxy } from './helpers/tcp-proxy.js';

const h = harness();
const proxies: TcpProxy[] = [];
const clients: SyncClient[] = [];
const rawSockets: Socket[] = [];
afterEach(async () => {
  for (const s of rawSockets.splice(0)) s.destroy();
  await Promise.all(clients.splice(0).map((c) => c.close()));
  for (const p of proxies.splice(0)) await p.close();
});

const origin = (server: SyncServer) => `http://127.0.0.1:${server.address().port}`;

/** Send a PNG on `sock` and wait for its ACK. */
async function pinged(sock: RawSocket, id = 'png'): Promise<void> {
  sock.send({ id, type: 'PNG' });
  expect(await sock.next((f) => f.id === id)).toEqual({ id, type: 'ACK' });
}

let wellBehaved = 0;
/**
 * A well-behaved client on `server` is answered: a socket's PNG gets its ACK, a socket's SYN
 * its results, and an HTTP SYN its results (with `headers`, e.g. its cookie, on both).
 */
async function stillAnswered(server: SyncServer, headers: Record<string, string> = {}): Promise<void> {
  const clientId = `c-well-${++wellBehaved}`;
  const ws = new WebSocket(wsUrl(server, clientId), { headers });
  try {
    const frames: unknown[] = [];
    ws.on('message', (d) => frames.push(JSON.parse(String(d))));
    await new Promise((resolve, reject) => {
      ws.once('open', resolve);
      ws.once('error', reject);
    });
    ws.send(JSON.stringify({ id: 'wp', type: 'PNG' }));
    ws.send(JSON.stringify({ id: 'ws1', type: 'SYN', payload: [1] }));
    await eventually(() => frames.length >= 3, 3000, 'the well-behaved socket answered');
    expect(frames).toContainEqual({ id: 'wp', type: 'ACK' });
    expect(frames).toContainEqual({ id: 'ws1', type: 'SYN', payload: [{ ok: 1 }] });
  } finally {
    ws.terminate();
  }
  const reply = await post(httpUrl(server), clientId, { id: 'w1', type: 'SYN', payload: [1] }, headers);
  expect(reply.status).toBe(200);
  expect(reply.body).toContainEqual({ id: 'w1', type: 'SYN', payload: [{ ok: 1 }] });
}

/** A cookie-authenticated server (the README's example), recording who got in. */
async function cookieServer(extra: Parameters<typeof h.start>[0] = {}) {
  const authenticated: string[] = [];
  const applied: unknown[] = [];
  const server = await h.start<{ id: string }>({
    authenticate: (req) => {
      const m = /session=(\w+)/.exec(req.headers.cookie ?? '');
      if (!m) return null;
      authenticated.push(m[1]!);
      return { id: m[1]! };
    },
    onSync: (ops) => {
      applied.push(...ops);
      return ops.map((op) => ({ ok: op }));
    },
    ...(extra as object),
  });
  return { server, authenticated, applied };
}

describe('origins (CSWSH)', () => {
  it('refuses an upgrade from a foreign Origin carrying the victim cookie with 403, before authenticate', async () => {
    const { server, authenticated } = await cookieServer();
    const url = wsUrl(server, 'victim');
    expect(await upgradeStatus(url, { Origin: 'https://evil.example', Cookie: 'session=victim' })).toBe(403);
    expect(authenticated).toEqual([]);
    // Same host (Origin's host:port = Host) and no Origin at all are accepted.
    expect(await upgradeStatus(url, { Origin: origin(server), Cookie: 'session=victim' })).toBe(101);
    expect(await upgradeStatus(url, { Cookie: 'session=victim' })).toBe(101);
    // A look-alike on another port of the same host is another origin.
    expect(await upgradeStatus(url, { Origin: 'http://127.0.0.1:1', Cookie: 'session=victim' })).toBe(403);
    expect(authenticated).toEqual(['victim', 'victim']);
  });

  it('refuses an HTTP request from a foreign Origin carrying the victim cookie with 403, applying nothing', async () => {
    const { server, applied } = await cookieServer();
    const envelope = { id: 'x1', type: 'SYN', payload: ['transfer all'] };
    const evil = await post(httpUrl(server), 'victim', envelope, {
      Origin: 'https://evil.example',
      Cookie: 'session=victim',
    });
    expect(evil.status).toBe(403);
    expect(evil.body).toEqual([
      { id: null, type: 'NAK', error: { code: 'forbidden', message: expect.any(String) } },
    ]);
    expect(evil.headers['access-control-allow-origin']).toBeUndefined();
    expect(applied).toEqual([]);
    const same = await post(httpUrl(server), 'victim', envelope, {
      Origin: origin(server),
      Cookie: 'session=victim',
    });
    expect(same.status).toBe(200);
    const none = await post(
      httpUrl(server),
      'victim',
      { id: 'x2', type: 'SYN', payload: ['b'] },
      { Cookie: 'session=victim' },
    );
    expect(none.status).toBe(200);
    expect(applied).toEqual(['transfer all', 'b']);
    await stillAnswered(server, { Cookie: 'session=alice' });
  });

  it('accepts listed origins and a function decides alone (throwing refuses)', async () => {
    const listed = await h.start({ allowedOrigins: ['https://app.example'] });
    expect(await upgradeStatus(wsUrl(listed, 'c1'), { Origin: 'https://app.example' })).toBe(101);
    expect(await upgradeStatus(wsUrl(listed, 'c1'), { Origin: 'https://app.example:8443' })).toBe(403);
    expect(await upgradeStatus(wsUrl(listed, 'c1'), { Origin: origin(listed) })).toBe(101);
    const fn = await h.start({
      allowedOrigins: (o) => {
        if (o === 'https://boom.example') throw new Error('boom');
        return o.endsWith('.good.example');
      },
    });
    expect(await upgradeStatus(wsUrl(fn, 'c1'), { Origin: 'https://a.good.example' })).toBe(101);
    expect(await upgradeStatus(wsUrl(fn, 'c1'), { Origin: origin(fn) })).toBe(403);
    expect(await upgradeStatus(wsUrl(fn, 'c1'), { Origin: 'https://boom.example' })).toBe(403);
    expect(await upgradeStatus(wsUrl(fn, 'c1'))).toBe(101);
  });

  it('CORS comes from the cors option: credentials on request, none at all with false', async () => {
    const withCreds = await h.start({ allowedOrigins: ['https://app.example'], cors: { credentials: true } });
    const r = await post(
      httpUrl(withCreds),
      'c1',
      { id: 'p', type: 'PNG' },
      { Origin: 'https://app.example' },
    );
    expect(r.status).toBe(200);
    expect(r.headers['access-control-allow-origin']).toBe('https://app.example');
    expect(r.headers['access-control-allow-credentials']).toBe('true');
    const off = await h.start({ allowedOrigins: ['https://app.example'], cors: false });
    const r2 = await post(httpUrl(off), 'c1', { id: 'p', type: 'PNG' }, { Origin: 'https://app.example' });
    expect(r2.status).toBe(200);
    expect(r2.headers['access-control-allow-origin']).toBeUndefined();
  });
});

describe('limits', () => {
  it('refuses a SYN of more than maxBatch operations with NAK too_large before onSync, on both transports', async () => {
    let calls = 0;
    const server = await h.start({
      maxBatch: 3,
      onSync: (ops) => {
        calls++;
        return ops;
      },
    });
    const sock = await h.socket(server);
    sock.send({ id: 'big', type: 'SYN', payload: [1, 2, 3, 4] });
    expect(await sock.next()).toMatchObject({ id: 'big', type: 'NAK', error: { code: 'too_large' } });
    const reply = await post(httpUrl(server), 'c1', { id: 'big2', type: 'SYN', payload: [1, 2, 3, 4] });
    expect(reply).toMatchObject({
      status: 413,
      body: [{ id: 'big2', type: 'NAK', error: { code: 'too_large' } }],
    });
    expect(calls).toBe(0);
    const ok = await sock.request({ id: 'fits', type: 'SYN', payload: [1, 2, 3] });
    expect(ok).toContainEqual({ id: 'fits', type: 'SYN', payload: [1, 2, 3] });
  });

  it('holds at most maxQueuedBytesPerClient of one client (all its sockets) and answers the rest rate_limited unparsed', async () => {
    const gate = deferred();
    const server = await h.start({
      maxPayloadBytes: 10_000,
      maxQueuedBytesPerClient: 25_000,
      onSync: async (ops) => {
        if ((ops[0] as { slow?: boolean })?.slow) await gate.promise;
        return ops.map((op) => ({ ok: op }));
      },
    });
    const a = await h.socket(server, 'flooder');
    const b = await h.socket(server, 'flooder');
    const filler = 'x'.repeat(9000);
    for (let i = 0; i < 6; i++)
      (i % 2 ? a : b).send({ id: `f${i}`, type: 'SYN', payload: [{ slow: true, filler }] });
    // Two 9 kB frames fit in 25 kB; the others are refused, by id, without being parsed.
    const limited = () =>
      [...a.received, ...b.received].filter((f) => f.type === 'NAK' && f.error.code === 'rate_limited');
    const acked = () => [...a.received, ...b.received].filter((f) => f.type === 'ACK');
    await eventually(
      () => limited().length === 4 && acked().length === 2,
      5000,
      '4 rate_limited NAKs, 2 ACKs',
    );
    // Each frame either taken (ACKed) or refused by its id; which ones depends on arrival.
    const ids = [...limited(), ...acked()].map((f) => f.id as string);
    expect(ids.sort()).toEqual(['f0', 'f1', 'f2', 'f3', 'f4', 'f5']);
    expect(server.stats().queuedBytes).toBeLessThanOrEqual(25_000);
    expect(server.stats().queuedBytes).toBeGreaterThan(18_000);
    // HTTP counts against the same client.
    const http429 = await post(httpUrl(server), 'flooder', { id: 'h1', type: 'SYN', payload: [{ filler }] });
    expect(http429).toMatchObject({ status: 429, body: [{ id: 'h1', error: { code: 'rate_limited' } }] });
    expect(http429.headers['retry-after']).toBe('1');
    await stillAnswered(server);
    gate.resolve();
    await eventually(() => server.stats().queuedBytes === 0, 5000, 'queued bytes back to 0');
    const after = await a.request({ id: 'later', type: 'SYN', payload: [{ filler }] });
    expect(after).toContainEqual(expect.objectContaining({ id: 'later', type: 'SYN' }));
  });

  it('holds nothing past its turn for a frame answered in it (session 6: checked, not reserved): a burst far over maxQueuedBytesPerClient all passes', async () => {
    const server = await h.start({
      maxPayloadBytes: 10_000,
      maxQueuedBytesPerClient: 25_000,
      onSync: (ops) => ops.map(() => ({ ok: true })), // answered in the turn the frame arrived
    });
    const sock = await h.socket(server, 'burst');
    const filler = 'x'.repeat(9000);
    // 20 × 9 kB sent at once: 180 kB, seven times the client's share, none of it held.
    for (let i = 0; i < 20; i++) sock.send({ id: `b${i}`, type: 'SYN', payload: [{ filler }] });
    const replies = await sock.until(is.reply('b19'), 5000);
    const answered = replies.filter((f) => f.type === 'SYN').map((f) => f.id);
    expect(answered).toEqual(Array.from({ length: 20 }, (_, i) => `b${i}`));
    expect(replies.filter((f) => f.type === 'NAK')).toEqual([]);
    expect(server.stats().queuedBytes).toBe(0);
  });

  it('holds at most maxQueuedBytes for the whole server', async () => {
    const gate = deferred();
    const server = await h.start({
      maxPayloadBytes: 10_000,
      maxQueuedBytes: 20_000,
      onSync: async (ops) => {
        await gate.promise;
        return ops;
      },
    });
    const filler = 'x'.repeat(9000);
    const socks = await Promise.all(['c1', 'c2', 'c3'].map((id) => h.socket(server, id)));
    socks[0]!.send({ id: 'a', type: 'SYN', payload: [filler] });
    await socks[0]!.next();
    socks[1]!.send({ id: 'b', type: 'SYN', payload: [filler] });
    await socks[1]!.next();
    socks[2]!.send({ id: 'c', type: 'SYN', payload: [filler] });
    expect(await socks[2]!.next()).toMatchObject({ id: 'c', type: 'NAK', error: { code: 'rate_limited' } });
    expect(server.stats().queuedBytes).toBeLessThanOrEqual(20_000);
    gate.resolve();
    await eventually(() => server.stats().queuedBytes === 0, 5000, 'queued bytes back to 0');
  });

  it('keeps at most maxSocketsPerClient sockets per clientId, closing the oldest with 4409', async () => {
    const server = await h.start({ maxSocketsPerClient: 2 });
    const first = await h.socket(server, 'one-id');
    await h.socket(server, 'one-id');
    const others: RawSocket[] = [];
    for (let i = 0; i < 30; i++) others.push(await h.socket(server, 'one-id'));
    expect((await first.closed).code).toBe(CloseCodes.tooManySockets);
    await eventually(() => server.stats().sockets === 2, 5000, 'two sockets left');
    await pinged(others.at(-1)!);
    await stillAnswered(server);
  });

  it('refuses an upgrade past maxSocketsPerPrincipal with 429', async () => {
    const { server } = await cookieServer({ maxSocketsPerPrincipal: 2 });
    const open = (clientId: string, user: string) =>
      upgradeStatus(wsUrl(server, clientId), { Cookie: `session=${user}` });
    // Keep two sockets of mallory open.
    const keep = [new WebSocket(wsUrl(server, 'm1'), { headers: { Cookie: 'session=mallory' } })];
    keep.push(new WebSocket(wsUrl(server, 'm2'), { headers: { Cookie: 'session=mallory' } }));
    await Promise.all(keep.map((ws) => new Promise((r) => ws.once('open', r))));
    try {
      expect(await upgradeStatus(wsUrl(server, 'm3'), { Cookie: 'session=mallory' })).toBe(429);
      expect(await open('a1', 'alice')).toBe(101);
    } finally {
      for (const ws of keep) ws.terminate();
    }
  });

  it('answers a frame nested 400,000 deep with NAK bad_request (a bad frame), and HTTP with 400', async () => {
    const server = await h.start({ maxBadFrames: 2 });
    const deep = '['.repeat(400_000) + ']'.repeat(400_000);
    const frame = `{"id":"d1","type":${deep}}`;
    const sock = await h.socket(server);
    sock.send(frame);
    expect(await sock.next()).toMatchObject({ id: 'd1', type: 'NAK', error: { code: 'bad_request' } });
    sock.send(frame);
    expect((await sock.closed).code).toBe(CloseCodes.badFrames);
    const reply = await http(httpUrl(server), { clientId: 'c1', body: frame });
    expect(reply.status).toBe(400);
    expect(reply.body).toMatchObject([{ type: 'NAK', error: { code: 'bad_request' } }]);
    expect(h.errors).toEqual([]);
    await stillAnswered(server);
  });

  it('closes an HTTP connection whose headers or body trickle past headersTimeoutMs / requestTimeoutMs', async () => {
    const server = await h.start({ headersTimeoutMs: 300, requestTimeoutMs: 600 });
    const { port } = server.address();
    const slow = (text: string) =>
      new Promise<{ answer: string; closed: boolean }>((resolve) => {
        const s = connect(port, '127.0.0.1', () => s.write(text));
        rawSockets.push(s);
        let answer = '';
        s.on('data', (d) => {
          answer += d.toString();
        });
        s.on('error', () => {});
        s.on('close', () => resolve({ answer, closed: true }));
      });
    const bounded = <T>(p: Promise<T>, ms: number, what: string) =>
      Promise.race([
        p,
        new Promise<never>((_, reject) =>
          setTimeout(() => reject(new Error(`${what} not closed in ${ms} ms`)), ms),
        ),
      ]);
    const headers = slow('POST /sync HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Client-Id: slow\r\n');
    const body = slow(
      'POST /sync HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Client-Id: slow\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"id":',
    );
    await stillAnswered(server);
    const [hRes, bRes] = await Promise.all([
      bounded(headers, 5000, 'slow headers'),
      bounded(body, 5000, 'slow body'),
    ]);
    expect(hRes.closed).toBe(true);
    expect(bRes.closed).toBe(true);
    expect(bRes.answer).toMatch(/^HTTP\/1\.1 408/);
  });

  it('bounds a body read with requestTimeoutMs on a server it was given, too', async () => {
    const { createServer } = await import('node:http');
    const given = createServer();
    await new Promise<void>((r) => given.listen(0, '127.0.0.1', r));
    try {
      const server = await h.start({ server: given, requestTimeoutMs: 400, headersTimeoutMs: 200 });
      const port = (given.address() as { port: number }).port;
      const res = await new Promise<string>((resolve, reject) => {
        const s = connect(port, '127.0.0.1', () =>
          s.write(
            'POST /sync HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Client-Id: slow\r\nContent-Length: 50\r\n\r\n{"id"',
          ),
        );
        rawSockets.push(s);
        let answer = '';
        s.on('data', (d) => {
          answer += d.toString();
        });
        s.on('error', reject);
        s.on('close', () => resolve(answer));
        setTimeout(() => reject(new Error('slow body not answered within 5 s')), 5000);
      });
      expect(res).toMatch(/^HTTP\/1\.1 408/);
      expect(server.stats().queuedBytes).toBe(0);
    } finally {
      given.closeAllConnections();
      await new Promise((r) => given.close(r));
    }
  });
});

describe('liveness', () => {
  it('frees half-open sockets and their subscriptions within 2 × pingIntervalMs', async () => {
    const PING = 200;
    const server = await h.start({ pingIntervalMs: PING });
    const proxy = await startTcpProxy(server.address());
    proxies.push(proxy);
    const well = await h.socket(server, 'well');
    const doomed: RawSocket[] = [];
    for (const id of ['d1', 'd2']) {
      const s = await RawSocket.open(`ws://127.0.0.1:${proxy.port}/sync?clientId=${id}`);
      doomed.push(s);
      const frames = await s.request({ id: 's', type: 'SUB', payload: { channels: { [`ch-${id}`]: {} } } });
      expect(frames.at(-1)).toMatchObject({ id: 's', type: 'SYN' });
    }
    expect(server.stats()).toMatchObject({ sockets: 3, channels: 2 });
    const t0 = Date.now();
    proxy.blackhole(); // no byte either way from now on, and no FIN or RST ever
    await eventually(() => server.stats().sockets === 1, 10 * PING, 'half-open sockets freed');
    const reapMs = Date.now() - t0;
    console.log(
      `[harden] half-open sockets reaped after ${reapMs} ms (pingIntervalMs ${PING}, bound ${2 * PING})`,
    );
    expect(server.stats().channels).toBe(0);
    expect(proxy.live()).toBe(2); // the proxy still holds both ends: nothing was closed
    await pinged(well);
    for (const s of doomed) s.ws.terminate();
  });

  /** A clock whose timers fire only on TICK boundaries, like a hidden tab's (once a minute). */
  function throttledClock(tick: number) {
    const state = { fired: 0 };
    const clock: Clock = {
      setTimeout(fn, ms) {
        const due = Date.now() + ms;
        const at = Math.ceil(due / tick) * tick;
        return setTimeout(
          () => {
            state.fired++;
            fn();
          },
          Math.max(0, at - Date.now()),
        );
      },
      clearTimeout: (id) => clearTimeout(id),
    };
    return { clock, state };
  }

  async function throttledBehindIdleCut(pingIntervalMs: number) {
    const TICK = 2000;
    const IDLE_CUT = 700;
    const server = await h.start({ pingIntervalMs });
    const proxy = await startTcpProxy(server.address(), { idleCutMs: IDLE_CUT });
    proxies.push(proxy);
    const { clock, state } = throttledClock(TICK);
    const failures: Failure[] = [];
    const client = createSyncClient({
      url: `ws://127.0.0.1:${proxy.port}/sync`,
      httpUrl: httpUrl(server),
      WebSocket: WebSocket as never,
      timeout: 400,
      clock,
    });
    clients.push(client);
    client.failures$.subscribe((f) => failures.push(f));
    expect(await client.send({ n: 1 })).toEqual({ ok: { n: 1 } });
    const firedAtStart = state.fired;
    // Three throttled timer rounds: at least two TICKs, each several idle cuts long.
    await eventually(() => state.fired >= firedAtStart + 3, 4 * TICK + 2000, 'three throttled timer rounds');
    return { server, proxy, client, failures };
  }

  it('keeps a throttled client socket alive behind an idle-cutting proxy by pinging it', async () => {
    const { server, proxy, client, failures } = await throttledBehindIdleCut(200);
    expect(proxy.idleCuts).toBe(0);
    expect(proxy.connections).toBe(1);
    expect(failures.filter((f) => f.kind === 'close')).toEqual([]);
    expect(server.stats().sockets).toBe(1);
    expect(await client.send({ n: 2 })).toEqual({ ok: { n: 2 } });
  });

  it('without server pings the same proxy cuts the throttled client socket (the control)', async () => {
    const { proxy, failures } = await throttledBehindIdleCut(60_000);
    expect(proxy.idleCuts).toBeGreaterThanOrEqual(1);
    expect(failures.some((f) => f.kind === 'close')).toBe(true);
  });
});
