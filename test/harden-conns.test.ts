/**
 * Issue 12, fourth round (a fresh attacker, F4 and F5): TCP connections that never send a
 * byte, bounded in count (per peer address, and all together by `maxConnections`) and not
 * only in time; `X-Forwarded-For` entries that are not bare IP addresses. Against a real
 * server on 127.0.0.1 and real sockets. Linux loopback routes all of 127.0.0.0/8, so a socket
 * bound to `localAddress: '127.0.0.2'` is another peer address of the same server.
 */

import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { WebSocket } from 'ws';
import { addressKey, normalizeAddress } from '../src/server/identity.js';
import { defaultMaxConnections, type SyncServer } from '../src/server/index.js';
import { eventually, harness, wsUrl } from './helpers/raw.js';

const h = harness();
const raw: Socket[] = [];
const opened: WebSocket[] = [];
const dir = mkdtempSync(join(tmpdir(), 'syncwire-conns-'));
afterEach(() => {
  for (const s of raw.splice(0)) s.destroy();
  for (const ws of opened.splice(0)) ws.terminate();
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** A TCP connection from `from` that sends nothing; `closed` tells whether it was closed. */
function idle(server: SyncServer, from: string) {
  const socket = connect({ port: server.address().port, host: '127.0.0.1', localAddress: from });
  raw.push(socket);
  const state = { socket, closed: false, connected: false };
  socket.on('connect', () => {
    state.connected = true;
  });
  socket.on('error', () => {});
  socket.on('close', () => {
    state.closed = true;
  });
  return state;
}

/** Resolves with the upgrade's HTTP status (101 when it opened), within 5 s. */
function upgrade(server: SyncServer, from: string, clientId: string, headers: Record<string, string> = {}) {
  const ws = new WebSocket(wsUrl(server, clientId), { localAddress: from, headers });
  opened.push(ws);
  ws.on('error', () => {});
  return new Promise<number>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('upgrade got no answer within 5 s')), 5000);
    ws.once('open', () => {
      clearTimeout(timer);
      resolve(101);
    });
    ws.once('unexpected-response', (_req, res) => {
      clearTimeout(timer);
      res.resume();
      resolve(res.statusCode ?? 0);
    });
    ws.once('close', () => {
      clearTimeout(timer);
      resolve(0);
    });
  });
}

describe('connections that have not sent a request, per peer address (maxPendingConnectionsPerAddress)', () => {
  it('beyond the cap, one address is destroyed at accept; another address still connects', async () => {
    const server = await h.start({ maxPendingConnectionsPerAddress: 4 });
    const silent = Array.from({ length: 10 }, () => idle(server, '127.0.0.2'));
    await eventually(() => silent.filter((s) => s.closed).length === 6, 5000, '6 of 10 closed');
    expect(server.stats()).toMatchObject({ connectionsRefused: 6, pendingConnections: 4 });
    const kept = silent.filter((s) => !s.closed);
    expect(kept).toHaveLength(4);
    // An honest client on another address upgrades while the four are held.
    expect(await upgrade(server, '127.0.0.3', 'honest')).toBe(101);
    expect(server.stats().connectionsRefused).toBe(6);
    // A connection that sent its request head does not count while its request runs; once
    // answered, an idle keep-alive connection counts as pending again (fifth round, F1: one
    // address held 1 791 connections that each sent an OPTIONS, then half a second head).
    const answered = new Promise<string>((resolve) => {
      let text = '';
      kept[0]!.socket.on('data', (d) => {
        text += d;
        if (text.includes('\r\n\r\n')) resolve(text.split('\r\n')[0]!);
      });
    });
    kept[0]!.socket.write(`GET /elsewhere HTTP/1.1\r\nHost: 127.0.0.1:${server.address().port}\r\n\r\n`);
    expect(await answered).toBe('HTTP/1.1 404 Not Found');
    expect(kept[0]!.closed).toBe(false);
    expect(server.stats()).toMatchObject({ pendingConnections: 4, connectionsRefused: 6 });
    // A fifth makes one go: itself while the four are fresh, else the stalest of them.
    const fifth = idle(server, '127.0.0.2');
    await eventually(() => server.stats().connectionsRefused === 7, 5000, 'one more closed');
    await eventually(() => [...kept, fifth].filter((s) => s.closed).length === 1, 5000, 'one closed');
    expect(server.stats().pendingConnections).toBe(4);
  });

  it('an address holding silent connections: the stalest goes, so a client sharing it gets in', async () => {
    const server = await h.start({ maxPendingConnectionsPerAddress: 3 });
    const hoard = Array.from({ length: 3 }, () => idle(server, '127.0.0.2'));
    await eventually(() => server.stats().pendingConnections === 3, 5000, 'three pending');
    // While they are fresh (under 1 s) a newcomer is refused; once they have been silent
    // for 1 s, it gets in and the oldest silent one is destroyed. Dial until it does.
    let status = 0;
    for (let i = 0; status !== 101 && i < 50; i++) {
      status = await upgrade(server, '127.0.0.2', `nat-${i}`);
      if (status !== 101) await new Promise((r) => setTimeout(r, 100));
    }
    expect(status).toBe(101);
    await eventually(() => hoard[0]!.closed, 5000, 'the oldest closed');
    expect(hoard[1]!.closed).toBe(false);
    expect(hoard[2]!.closed).toBe(false);
    expect(server.stats().pendingConnections).toBe(2);
  });

  it('closed connections stop counting', async () => {
    const server = await h.start({ maxPendingConnectionsPerAddress: 2 });
    const first = [idle(server, '127.0.0.2'), idle(server, '127.0.0.2')];
    await eventually(() => server.stats().pendingConnections === 2, 5000, 'two pending');
    for (const s of first) s.socket.destroy();
    await eventually(() => server.stats().pendingConnections === 0, 5000, 'both gone');
    const again = [idle(server, '127.0.0.2'), idle(server, '127.0.0.2')];
    await eventually(() => server.stats().pendingConnections === 2, 5000, 'two pending again');
    expect(again.some((s) => s.closed)).toBe(false);
    expect(server.stats().connectionsRefused).toBe(0);
  });

  it('a handshake timeout frees its place too', async () => {
    const server = await h.start({ maxPendingConnectionsPerAddress: 1, handshakeTimeoutMs: 200 });
    const one = idle(server, '127.0.0.2');
    await eventually(() => one.closed, 5000, 'timed out');
    expect(server.stats()).toMatchObject({ connectionsRefused: 0, pendingConnections: 0 });
    expect(await upgrade(server, '127.0.0.2', 'after')).toBe(101);
  });

  it("a trusted proxy's address is not capped; other addresses are", async () => {
    const server = await h.start({ maxPendingConnectionsPerAddress: 2, trustProxy: '127.0.0.2' });
    const proxied = Array.from({ length: 6 }, () => idle(server, '127.0.0.2'));
    await eventually(() => server.stats().pendingConnections === 6, 5000, 'six from the proxy pending');
    expect(proxied.some((s) => s.closed)).toBe(false);
    const other = Array.from({ length: 3 }, () => idle(server, '127.0.0.4'));
    await eventually(() => other.filter((s) => s.closed).length === 1, 5000, 'one of three closed');
    expect(server.stats()).toMatchObject({ connectionsRefused: 1, pendingConnections: 8 });
  });
});

describe('all TCP connections (maxConnections)', () => {
  it('Node drops connections beyond it at accept, counted; a freed place is taken again', async () => {
    const server = await h.start({ maxConnections: 5 });
    expect(server.httpServer.maxConnections).toBe(5);
    // Eight peers, one connection each: the per-address cap plays no part.
    const silent = Array.from({ length: 8 }, (_, i) => idle(server, `127.0.0.${10 + i}`));
    await eventually(() => server.stats().connectionsRefused === 3, 5000, 'three dropped');
    await eventually(() => silent.filter((s) => s.closed).length === 3, 5000, 'three closed');
    expect(server.stats().pendingConnections).toBe(5);
    // Full: an honest upgrade is refused at TCP level now...
    expect(await upgrade(server, '127.0.0.30', 'honest-1')).not.toBe(101);
    // ...and gets in once a place is free.
    for (const s of silent.filter((x) => !x.closed).slice(0, 2)) s.socket.destroy();
    await eventually(() => server.stats().pendingConnections === 3, 5000, 'two freed');
    expect(await upgrade(server, '127.0.0.30', 'honest-2')).toBe(101);
  });

  it('the default is derived from the soft open-files limit, less a reserve', () => {
    const file = join(dir, 'limits');
    const limits = (soft: string) =>
      writeFileSync(
        file,
        'Limit                     Soft Limit           Hard Limit           Units     \n' +
          `Max open files            ${soft}                 1048576              files     \n`,
      );
    limits('2048');
    expect(defaultMaxConnections(file)).toBe(1792);
    limits('256');
    expect(defaultMaxConnections(file)).toBe(224);
    limits('unlimited');
    expect(defaultMaxConnections(file)).toBeUndefined();
    expect(defaultMaxConnections(join(dir, 'missing'))).toBeUndefined();
  });

  it('on a server of your own, syncwire leaves maxConnections to you', async () => {
    const { createServer } = await import('node:http');
    const own = createServer();
    await new Promise<void>((r) => own.listen(0, '127.0.0.1', r));
    try {
      await h.start({ server: own, maxPendingConnectionsPerAddress: 1 });
      expect(own.maxConnections).toBeFalsy();
    } finally {
      own.closeAllConnections();
      await new Promise((r) => own.close(r));
    }
  });
});

describe('trustProxy: X-Forwarded-For entries that are not bare addresses (F5)', () => {
  it('normalises a port, brackets and a zone; refuses what is no IP', () => {
    expect(normalizeAddress('127.0.0.3:1234')).toBe('127.0.0.3');
    expect(normalizeAddress(' 127.0.0.3 ')).toBe('127.0.0.3');
    expect(normalizeAddress('[2001:db8::1]:443')).toBe('2001:db8::1');
    expect(normalizeAddress('[::1]')).toBe('::1');
    expect(normalizeAddress('fe80::1%eth0')).toBe('fe80::1');
    expect(normalizeAddress('::ffff:10.0.0.1')).toBe('10.0.0.1');
    expect(normalizeAddress('unknown')).toBeUndefined();
    expect(normalizeAddress('evil.example:80')).toBeUndefined();
    expect(normalizeAddress('')).toBeUndefined();
    expect(addressKey('127.0.0.3:9')).toBe(addressKey('127.0.0.3'));
    expect(addressKey('[2001:db8:0:1::7]:443')).toBe('a:2001:db8:0:1::/64');
  });

  it('a client varying the port in X-Forwarded-For is one address (maxSocketsPerPrincipal holds)', async () => {
    const server = await h.start({ trustProxy: 1, maxSocketsPerPrincipal: 4 });
    const statuses = await Promise.all(
      Array.from({ length: 12 }, (_, i) =>
        upgrade(server, '127.0.0.9', `p-${i}`, { 'X-Forwarded-For': `127.0.0.3:${1000 + i}` }),
      ),
    );
    expect(statuses.filter((s) => s === 101)).toHaveLength(4);
    expect(statuses.filter((s) => s === 429)).toHaveLength(8);
    // The bare address is the same client.
    expect(await upgrade(server, '127.0.0.9', 'p-bare', { 'X-Forwarded-For': '127.0.0.3' })).toBe(429);
    // Another address is not.
    expect(await upgrade(server, '127.0.0.9', 'p-other', { 'X-Forwarded-For': '127.0.0.5:80' })).toBe(101);
  });

  it('an entry that is no IP is keyed by the trusted hop that wrote it, not as written', async () => {
    const server = await h.start({ trustProxy: true, maxSocketsPerPrincipal: 4 });
    const statuses = await Promise.all(
      Array.from({ length: 10 }, (_, i) =>
        upgrade(server, '127.0.0.9', `g-${i}`, { 'X-Forwarded-For': `garbage-${i}` }),
      ),
    );
    expect(statuses.filter((s) => s === 101)).toHaveLength(4);
    // Keyed by the socket's peer, 127.0.0.9: its own connections share the four places.
    expect(await upgrade(server, '127.0.0.9', 'g-direct')).toBe(429);
    // "junk-i, 10.1.2.3": the hop at 10.1.2.3 wrote junk; that hop is the key, from any peer.
    const behind = await Promise.all(
      Array.from({ length: 6 }, (_, i) =>
        upgrade(server, `127.0.0.${20 + i}`, `j-${i}`, { 'X-Forwarded-For': `junk-${i}, 10.1.2.3` }),
      ),
    );
    expect(behind.filter((s) => s === 101)).toHaveLength(4);
    expect(await upgrade(server, '127.0.0.30', 'j-ip', { 'X-Forwarded-For': '10.1.2.3' })).toBe(429);
  });
});

/**
 * A raw TCP upgrade from `from` for `clientId` that never answers anything the server sends
 * (its close frame included); resolves once the 101 arrived. `closed` tells whether the server
 * has closed the TCP connection.
 */
async function zombie(server: SyncServer, from: string, clientId: string) {
  const socket = connect({ port: server.address().port, host: '127.0.0.1', localAddress: from });
  raw.push(socket);
  const state = { socket, closed: false, text: '' };
  socket.on('error', () => {});
  socket.on('close', () => {
    state.closed = true;
  });
  socket.on('data', (d) => {
    if (state.text.length < 200) state.text += d.toString('latin1');
  });
  socket.on('connect', () => {
    socket.write(
      `GET /sync?clientId=${clientId} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n` +
        'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n',
    );
  });
  await eventually(() => state.text.startsWith('HTTP/1.1 101'), 5000, 'the upgrade is answered 101');
  return state;
}

describe('connections the server has let go of (fifth round: a fresh attacker, F1)', () => {
  it('sockets evicted by maxSocketsPerClient (4409) whose peer never answers the close frame are destroyed after the 1 s grace, not held for ws’s 30 s', async () => {
    const server = await h.start({ maxSocketsPerClient: 2 });
    const socks: Awaited<ReturnType<typeof zombie>>[] = [];
    for (let i = 0; i < 8; i++) socks.push(await zombie(server, '127.0.0.5', 'same-client'));
    // Six were evicted (close 4409 sent, never answered): before, each held its TCP connection
    // (and a descriptor) for ws's 30 s close timeout, outside every count.
    await eventually(() => socks.slice(0, 6).every((s) => s.closed), 5000, 'the six evicted ones are closed');
    expect(socks.slice(6).some((s) => s.closed)).toBe(false);
    expect(server.stats().sockets).toBe(2);
    expect(await upgrade(server, '127.0.0.3', 'honest')).toBe(101);
  });

  it('a keep-alive connection whose answer went out counts as pending again: one address cannot hold connections with half-sent second requests', async () => {
    const server = await h.start({ maxPendingConnectionsPerAddress: 4 });
    const { port } = server.address();
    const conns: { socket: Socket; closed: boolean; text: string }[] = [];
    for (let i = 0; i < 10; i++) {
      const socket = connect({ port, host: '127.0.0.1', localAddress: '127.0.0.2' });
      raw.push(socket);
      const c = { socket, closed: false, text: '' };
      socket.on('error', () => {});
      socket.on('close', () => {
        c.closed = true;
      });
      socket.on('data', (d) => {
        c.text += d.toString('latin1');
      });
      socket.on('connect', () => {
        socket.write('OPTIONS /sync HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n');
      });
      conns.push(c);
      await eventually(() => c.text.includes('HTTP/1.1 204') || c.closed, 5000, 'OPTIONS answered');
      // Then half of a second request head, never finished.
      if (!c.closed) socket.write('POST /sync HTTP/1.1\r\nHost: 127.0.0.1\r\n');
    }
    // Before: all ten were held (each until headersTimeoutMs), 1 791 from one address in the
    // attack. Now at most four at a time count as pending for the address; the rest are closed.
    await eventually(() => conns.filter((c) => !c.closed).length <= 4, 5000, 'at most 4 left open');
    expect(server.stats().connectionsRefused).toBeGreaterThanOrEqual(6);
    // Another address is served meanwhile.
    expect(await upgrade(server, '127.0.0.3', 'honest-ka')).toBe(101);
  });
});
