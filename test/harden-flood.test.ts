/**
 * Issue 12, second round of attacks, against a real `ws` server on 127.0.0.1:
 * - floods of small frames (PNGs, WebSocket pings) are held to a frame rate per socket and
 *   per principal: `NAK rate_limited`, then close 4420;
 * - a SYN of more operations than `maxBatch` is refused from a scan, before JSON.parse;
 * - TCP connections that never send a request, and sockets that never send a frame, are cut;
 * - `allowedHosts` refuses a DNS-rebinding Host, and 'same-host' compares the scheme;
 * - the client's `headers` reach a Node `ws` upgrade.
 * Each attack is checked together with a well-behaved client on the same server.
 */

import { connect } from 'node:net';
import fc from 'fast-check';
import { afterEach, describe, expect, it } from 'vitest';
import { WebSocket } from 'ws';
import { createSyncClient, type SyncClient } from '../src/client/index.js';
import { CloseCodes, parseClientFrame } from '../src/protocol/index.js';
import type { SyncServer } from '../src/server/index.js';
import { eventually, harness, http, httpUrl, post, upgradeStatus, wsUrl } from './helpers/raw.js';

const h = harness();
const clients: SyncClient[] = [];
const opened: WebSocket[] = [];
afterEach(async () => {
  for (const ws of opened.splice(0)) ws.terminate();
  await Promise.all(clients.splice(0).map((c) => c.close()));
});

/** A `ws` socket recording what it gets; resolves once open. */
async function socket(server: SyncServer, clientId: string, headers: Record<string, string> = {}) {
  const ws = new WebSocket(wsUrl(server, clientId), { headers });
  opened.push(ws);
  const frames: any[] = [];
  ws.on('message', (d) => frames.push(JSON.parse(String(d))));
  const closed = new Promise<number>((resolve) => ws.on('close', (code) => resolve(code)));
  ws.on('error', () => {});
  await new Promise((resolve, reject) => {
    ws.once('open', resolve);
    ws.once('error', reject);
  });
  return { ws, frames, closed };
}

let n = 0;
/** A well-behaved client on `server` gets its PNG acknowledged and its SYN answered (socket and HTTP). */
async function stillAnswered(server: SyncServer, headers: Record<string, string> = {}): Promise<number> {
  const clientId = `well-${++n}`;
  const { ws, frames } = await socket(server, clientId, headers);
  const t0 = performance.now();
  ws.send(JSON.stringify({ id: 'wp', type: 'PNG' }));
  ws.send(JSON.stringify({ id: 'ws1', type: 'SYN', payload: [1] }));
  await eventually(() => frames.length >= 3, 5000, 'the well-behaved socket answered');
  const ms = performance.now() - t0;
  expect(frames).toContainEqual({ id: 'wp', type: 'ACK' });
  expect(frames).toContainEqual({ id: 'ws1', type: 'SYN', payload: [{ ok: 1 }] });
  ws.terminate();
  const reply = await post(httpUrl(server), clientId, { id: 'w1', type: 'SYN', payload: [1] }, headers);
  expect(reply.status).toBe(200);
  expect(reply.body).toContainEqual({ id: 'w1', type: 'SYN', payload: [{ ok: 1 }] });
  return ms;
}

const cookieAuth = {
  authenticate: (req: { headers: { cookie?: string } }) => {
    const m = /session=(\w+)/.exec(req.headers.cookie ?? '');
    return m ? { id: m[1]! } : null;
  },
};

describe('frame rate', () => {
  it("HTTP requests beyond a principal's rate are answered 429 before their body is read; another principal is served", async () => {
    const server = await h.start({ ...cookieAuth, maxHttpRequestsPerSecondPerPrincipal: 1 });
    const flooder = { Cookie: 'session=mallory' };
    // Sent at once: a burst of 1 is served (and 1 more per second), the rest refused whatever their body (a 1000-channel
    // poll here, which would otherwise be parsed and looked up).
    const channels = Object.fromEntries(Array.from({ length: 1000 }, (_, i) => [`c${i}`, { since: 0 }]));
    const replies = await Promise.all(
      Array.from({ length: 30 }, (_, i) =>
        post(httpUrl(server), 'mallory-1', { id: `p${i}`, type: 'SUB', payload: { channels } }, flooder),
      ),
    );
    const refused = replies.filter((r) => r.status === 429);
    expect(refused.length).toBeGreaterThanOrEqual(20);
    for (const r of refused) {
      expect(r.body[0]).toMatchObject({ type: 'NAK', error: { code: 'rate_limited' } });
      expect(r.body[0].error.message).toContain('HTTP requests per second per principal');
    }
    await stillAnswered(server, { Cookie: 'session=alice' });
  });

  it('a PNG flood on one socket: a burst is answered, the rest NAK rate_limited unparsed, then close 4420; others are answered', async () => {
    const server = await h.start({ maxFramesPerSecond: 1, maxFrameBurst: 20 });
    const flood = await socket(server, 'flooder');
    const frames = 500;
    for (let i = 0; i < frames; i++) flood.ws.send(`{"id":"f${i}","type":"PNG"}`);
    // An honest client asks while the flood is being read.
    const honest = stillAnswered(server);
    expect(await flood.closed).toBe(CloseCodes.frameRate);
    console.log(
      `[harden-flood] honest PNG + SYN answered in ${(await honest).toFixed(1)} ms during a PNG flood`,
    );
    const acks = flood.frames.filter((f) => f.type === 'ACK').length;
    const refused = flood.frames.filter((f) => f.type === 'NAK' && f.error.code === 'rate_limited');
    expect(acks).toBeGreaterThanOrEqual(20);
    expect(acks).toBeLessThan(frames);
    // Refused frames are named by their id (read from the first bytes); the maxBadFrames-th
    // (100th) refusal in a row closes the socket instead, and the rest is not read at all.
    expect(refused.length).toBeGreaterThanOrEqual(99);
    expect(refused[0].id).toMatch(/^f\d+$/);
    expect(acks + refused.length).toBeLessThan(frames);
  });

  it('WebSocket ping frames count too: pongs stop at the rate and the flooder is closed 4420', async () => {
    const server = await h.start({ maxFramesPerSecond: 1, maxFrameBurst: 20 });
    const flood = await socket(server, 'pinger');
    let pongs = 0;
    flood.ws.on('pong', () => pongs++);
    for (let i = 0; i < 500; i++) flood.ws.ping();
    expect(await flood.closed).toBe(CloseCodes.frameRate);
    expect(pongs).toBeGreaterThanOrEqual(20);
    expect(pongs).toBeLessThan(500);
    await stillAnswered(server);
  });

  it('the sockets of one principal share a rate: a quiet socket of the flooder is refused, another principal is not', async () => {
    const server = await h.start({ ...cookieAuth, maxFramesPerSecondPerPrincipal: 30 });
    const a = await socket(server, 'm-a', { Cookie: 'session=mallory' });
    const b = await socket(server, 'm-b', { Cookie: 'session=mallory' });
    // 60 frames each: far below the per-socket rate (10 000), above the principal's 30.
    for (let i = 0; i < 60; i++) {
      a.ws.send(`{"id":"a${i}","type":"PNG"}`);
      b.ws.send(`{"id":"b${i}","type":"PNG"}`);
    }
    const honest = stillAnswered(server, { Cookie: 'session=alice' });
    await eventually(() => a.frames.length === 60 && b.frames.length === 60, 5000, 'every frame answered');
    const acked = [...a.frames, ...b.frames].filter((f) => f.type === 'ACK').length;
    expect(acked).toBeGreaterThanOrEqual(30);
    expect(acked).toBeLessThan(120);
    expect(b.frames.some((f) => f.type === 'NAK' && f.error.code === 'rate_limited')).toBe(true);
    console.log(`[harden-flood] another principal answered in ${(await honest).toFixed(1)} ms`);
  });
});

describe('a SYN over maxBatch is refused before it is parsed', () => {
  it('1 MiB of [{},{},…]: NAK too_large with its id on the socket, 413 over HTTP; others are answered', async () => {
    const server = await h.start();
    const head = '{"id":"big","type":"SYN","payload":[';
    const body = `${head}${'{},'.repeat(340_000)}{}]}`;
    const s = await socket(server, 'cpu');
    s.ws.send(body);
    await eventually(() => s.frames.length >= 1, 5000, 'the refusal');
    expect(s.frames[0]).toMatchObject({ id: 'big', type: 'NAK', error: { code: 'too_large' } });
    const reply = await post(httpUrl(server), 'cpu', JSON.parse(body));
    expect(reply.status).toBe(413);
    expect(reply.body).toEqual([
      expect.objectContaining({ id: 'big', error: expect.objectContaining({ code: 'too_large' }) }),
    ]);
    await stillAnswered(server);
  });

  it('the scan agrees with parsing: whatever the values and spacing, too_large exactly when the payload has more than maxBatch', () => {
    const maxBatch = 6;
    fc.assert(
      fc.property(
        fc.array(fc.jsonValue({ maxDepth: 3 }), { maxLength: 14 }),
        fc.constantFrom(undefined, 1, '\t'),
        fc.boolean(),
        fc.boolean(),
        (payload, space, escapedKey, binary) => {
          let text = JSON.stringify({ id: 'x', type: 'SYN', payload }, null, space as never);
          if (escapedKey) text = text.replace('"payload"', '"p\\u0061yload"');
          const r = parseClientFrame(binary ? Buffer.from(text) : text, { maxBatch });
          if (payload.length === 0) expect(r).toMatchObject({ ok: false, code: 'bad_request' });
          else if (payload.length > maxBatch)
            expect(r).toMatchObject({ ok: false, code: 'too_large', id: 'x' });
          else expect(r.ok).toBe(true);
        },
      ),
      { numRuns: 300, verbose: true },
    );
  });

  it('a payload key inside an operation, or another member with many elements, is not the payload', () => {
    const inner = `{"id":"x","type":"SYN","payload":[{"payload":[${Array(50).fill(1).join(',')}]}]}`;
    expect(parseClientFrame(inner, { maxBatch: 5 }).ok).toBe(true);
    const other = `{"id":"x","type":"PNG","extra":[${Array(50).fill('"a,b"').join(',')}]}`;
    expect(parseClientFrame(other, { maxBatch: 5 }).ok).toBe(true);
    // The refusal names the request when its id comes first (as clients write it), else null.
    const many = Array(50).fill(1).join(',');
    expect(
      parseClientFrame(`{"type":"SYN","id":"y\\u0031","payload":[${many}]}`, { maxBatch: 5 }),
    ).toMatchObject({
      ok: false,
      code: 'too_large',
      id: 'y1',
    });
    expect(parseClientFrame(`{"type":"SYN","payload":[${many}],"id":"z"}`, { maxBatch: 5 })).toMatchObject({
      ok: false,
      code: 'too_large',
      id: null,
    });
  });
});

describe('connections that never identify themselves', () => {
  it('a TCP connection that sends nothing is destroyed after handshakeTimeoutMs; a client meanwhile is answered', async () => {
    const server = await h.start({ handshakeTimeoutMs: 300 });
    const live = await socket(server, 'early');
    live.ws.send('{"id":"p0","type":"PNG"}');
    const silent = connect(server.address().port, '127.0.0.1');
    silent.on('error', () => {});
    const closedAt = await new Promise<number>((resolve, reject) => {
      silent.on('close', () => resolve(Date.now()));
      setTimeout(() => reject(new Error('silent connection still open after 5 s')), 5000);
    });
    expect(closedAt).toBeGreaterThan(0);
    // The socket opened before it (an upgraded connection) was not cut by the deadline.
    live.ws.send('{"id":"p1","type":"PNG"}');
    await eventually(() => live.frames.some((f) => f.id === 'p1'), 3000, 'the earlier socket answered');
    await stillAnswered(server);
  });

  it('a WebSocket that sends no frame is closed 4408 after firstFrameTimeoutMs; one that spoke stays', async () => {
    const server = await h.start({ firstFrameTimeoutMs: 300 });
    const talker = await socket(server, 'talker');
    talker.ws.send('{"id":"t0","type":"PNG"}');
    const mute = await socket(server, 'mute');
    expect(await mute.closed).toBe(CloseCodes.handshakeTimeout);
    talker.ws.send('{"id":"t1","type":"PNG"}');
    await eventually(() => talker.frames.some((f) => f.id === 't1'), 3000, 'the talker answered');
    expect(talker.ws.readyState).toBe(WebSocket.OPEN);
    await stillAnswered(server);
  });
});

describe('hosts and schemes (DNS rebinding)', () => {
  it('refuses a Host the server does not answer to (the rebinding shape: Origin matches Host) with 403, before authenticate', async () => {
    const authenticated: string[] = [];
    const server = await h.start({
      authenticate: (req) => {
        authenticated.push(String(req.headers.host));
        return { id: 'u' };
      },
    });
    const { port } = server.address();
    const url = wsUrl(server, 'r');
    const rebound = { Host: `evil.example:${port}`, Origin: `http://evil.example:${port}` };
    expect(await upgradeStatus(url, rebound)).toBe(403);
    const viaHttp = await http(httpUrl(server), {
      headers: { ...rebound, 'x-client-id': 'r' },
      body: JSON.stringify({ id: 'h1', type: 'SYN', payload: [1] }),
    });
    expect(viaHttp.status).toBe(403);
    expect(authenticated).toEqual([]);
    // localhost names and IP literals are allowed by default.
    expect(await upgradeStatus(url, { Host: `localhost:${port}`, Origin: `http://localhost:${port}` })).toBe(
      101,
    );
    expect(await upgradeStatus(url, { Host: `127.0.0.1:${port}` })).toBe(101);
    await stillAnswered(server);
  });

  it('allowedHosts lists names (a leading dot: subdomains too); all turns the check off', async () => {
    const listed = await h.start({ allowedHosts: ['sync.example.org', '.apps.example'] });
    const url = wsUrl(listed, 'l');
    expect(await upgradeStatus(url, { Host: 'sync.example.org' })).toBe(101);
    expect(await upgradeStatus(url, { Host: 'a.apps.example:8443' })).toBe(101);
    expect(await upgradeStatus(url, { Host: 'apps.example' })).toBe(101);
    expect(await upgradeStatus(url, { Host: 'evil.example' })).toBe(403);
    expect(await upgradeStatus(url, { Host: 'xapps.example' })).toBe(403);
    const open = await h.start({ allowedHosts: 'all' });
    expect(await upgradeStatus(wsUrl(open, 'o'), { Host: 'anything.example' })).toBe(101);
    // A single name instead of a list is a mistake caught at once, not a list of its letters.
    await expect(h.start({ allowedHosts: 'sync.example.org' as never })).rejects.toThrow(TypeError);
  });

  it("'same-host' compares the scheme: an https page to a plain server is refused unless a proxy says https", async () => {
    const server = await h.start();
    const { port } = server.address();
    const url = wsUrl(server, 's');
    expect(await upgradeStatus(url, { Origin: `http://127.0.0.1:${port}` })).toBe(101);
    expect(await upgradeStatus(url, { Origin: `https://127.0.0.1:${port}` })).toBe(403);
    // Behind a TLS-terminating proxy that says so, the https page is the same origin and the
    // http one is not.
    expect(
      await upgradeStatus(url, { Origin: `https://127.0.0.1:${port}`, 'X-Forwarded-Proto': 'https' }),
    ).toBe(101);
    expect(
      await upgradeStatus(url, { Origin: `http://127.0.0.1:${port}`, 'X-Forwarded-Proto': 'https' }),
    ).toBe(403);
    expect(
      await upgradeStatus(url, { Origin: `https://127.0.0.1:${port}`, Forwarded: 'for=1.2.3.4;proto=https' }),
    ).toBe(101);
    await stillAnswered(server);
  });
});

describe('client headers on a Node upgrade', () => {
  it('headers reach the ws upgrade (no params needed) and each dial resolves them with transport ws', async () => {
    const seen: { via: string; auth: string | undefined }[] = [];
    const server = await h.start({
      authenticate: (req) => {
        const auth = req.headers.authorization;
        seen.push({ via: req.headers.upgrade ? 'ws' : 'http', auth });
        return auth === 'Bearer good' ? { id: 'u' } : null;
      },
    });
    const contexts: string[] = [];
    const c = createSyncClient({
      url: wsUrl(server),
      WebSocket,
      timeout: 2000,
      headers: (ctx) => {
        contexts.push(ctx.transport);
        return { authorization: 'Bearer good' };
      },
    });
    clients.push(c);
    expect(await c.send('op')).toEqual({ ok: 'op' });
    await eventually(() => c.state === 'open', 5000, 'the socket open');
    expect(seen.find((s) => s.via === 'ws')).toEqual({ via: 'ws', auth: 'Bearer good' });
    expect(contexts).toContain('ws');
    await stillAnswered(server, { authorization: 'Bearer good' });
  });
});
