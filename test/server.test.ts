/**
 * The reference server over real sockets on loopback: acknowledgement, malformed input and
 * every NAK it can produce, hooks, dedupe, per-client order, the HTTP transport, memory
 * bounds and shutdown. Channels and replay live in server-replay.test.ts.
 */

import { describe, expect, it } from 'vitest';
import { CloseCodes, SyncError } from '../src/protocol/index.js';
import type { DedupeStore, HistoryStore } from '../src/server/index.js';
import { memoryStore } from '../src/stores/memory.js';
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

const h = harness();

describe('acknowledgement', () => {
  it('answers PNG with ACK', async () => {
    const server = await h.start();
    const sock = await h.socket(server);
    sock.send({ id: 'p1', type: 'PNG' });
    expect(await sock.next()).toEqual({ id: 'p1', type: 'ACK' });
  });

  it('sends ACK before the response, and results aligned with the operations', async () => {
    const server = await h.start({
      onSync: (ops) => ops.map((op) => ({ double: (op as { n: number }).n * 2 })),
    });
    const sock = await h.socket(server);
    const frames = await sock.request({ id: 's1', type: 'SYN', payload: [{ n: 1 }, { n: 2 }, { n: 3 }] });
    expect(frames).toEqual([
      { id: 's1', type: 'ACK' },
      { id: 's1', type: 'SYN', payload: [{ double: 2 }, { double: 4 }, { double: 6 }] },
    ]);
  });

  it('ACKs on receipt, while onSync is still running', async () => {
    const gate = deferred();
    const server = await h.start({
      onSync: async (ops) => {
        await gate.promise;
        return ops;
      },
    });
    const sock = await h.socket(server);
    sock.send({ id: 's1', type: 'SYN', payload: ['x'] });
    expect(await sock.next()).toEqual({ id: 's1', type: 'ACK' });
    gate.resolve();
    expect(await sock.next()).toEqual({ id: 's1', type: 'SYN', payload: ['x'] });
  });

  it('gives onSync the clientId and the principal', async () => {
    const seen: unknown[] = [];
    const server = await h.start<{ user: string }>({
      authenticate: (req) => ({ user: String(req.headers['x-user'] ?? 'anon') }),
      onSync: (ops, ctx) => {
        seen.push({ clientId: ctx.clientId, principal: ctx.principal });
        return ops;
      },
    });
    const reply = await post(
      httpUrl(server),
      'c-http',
      { id: 's1', type: 'SYN', payload: [1] },
      { 'X-User': 'ada' },
    );
    expect(reply.status).toBe(200);
    expect(seen).toEqual([{ clientId: 'c-http', principal: { user: 'ada' } }]);
  });
});

describe('malformed frames', () => {
  const cases: [string, string | object, string | null][] = [
    ['bad JSON', '{"id": "x", ', null],
    ['a JSON non-object', '[1, 2]', null],
    ['a SYN payload of the wrong type', { id: 'w1', type: 'SYN', payload: 'nope' }, 'w1'],
    ['an empty SYN payload', { id: 'w2', type: 'SYN', payload: [] }, 'w2'],
    ['an id of the wrong type', { id: 7, type: 'PNG' }, null],
    ['an unknown type', { id: 'u1', type: 'HELLO' }, 'u1'],
    ['an over-long id', { id: 'x'.repeat(129), type: 'PNG' }, null],
    ['a client sending ACK', { id: 'a1', type: 'ACK' }, 'a1'],
    ['a client sending MSG', { id: 'm1', type: 'MSG', channel: 'c', seq: 1, epoch: 'e', payload: 1 }, 'm1'],
    ['a SUB without channels', { id: 'b1', type: 'SUB', payload: {} }, 'b1'],
  ];

  it.each(cases)('answers %s with NAK bad_request and its id', async (_name, frame, id) => {
    const server = await h.start();
    const sock = await h.socket(server);
    sock.send(frame);
    const reply = await sock.next();
    expect(reply).toMatchObject({
      id,
      type: 'NAK',
      error: { code: 'bad_request', message: expect.any(String) },
    });
    // No ACK for a frame that was refused.
    expect(sock.received.filter((f) => f.type === 'ACK')).toEqual([]);
  });

  it('answers the same over HTTP with 400 and [NAK]', async () => {
    const server = await h.start();
    for (const [, frame, id] of cases) {
      const reply = await post(httpUrl(server), 'c1', frame);
      expect(reply.status).toBe(400);
      expect(reply.body).toEqual([
        { id, type: 'NAK', error: { code: 'bad_request', message: expect.any(String) } },
      ]);
    }
  });

  it('reads binary frames as UTF-8 JSON', async () => {
    const server = await h.start();
    const sock = await h.socket(server);
    sock.send(Buffer.from(JSON.stringify({ id: 'bin', type: 'PNG' })), { binary: true });
    expect(await sock.next()).toEqual({ id: 'bin', type: 'ACK' });
  });

  it('keeps a client that sends garbage connected, and other clients unaffected', async () => {
    const server = await h.start();
    const bad = await h.socket(server);
    const good = await h.socket(server);
    for (let i = 0; i < 20; i++) bad.send(`garbage ${i}`);
    const goodReply = good.request({ id: 'g1', type: 'SYN', payload: ['fine'] });
    const naks = await Promise.all(Array.from({ length: 20 }, () => bad.next(is.nak(null))));
    expect(naks.every((f) => f.error.code === 'bad_request')).toBe(true);
    bad.send({ id: 'still-here', type: 'PNG' });
    expect(await bad.next()).toEqual({ id: 'still-here', type: 'ACK' });
    expect((await goodReply).at(-1)).toEqual({ id: 'g1', type: 'SYN', payload: [{ ok: 'fine' }] });
  });

  it(`closes a socket after maxBadFrames bad frames in a row with ${CloseCodes.badFrames}`, async () => {
    const server = await h.start({ maxBadFrames: 5 });
    const sock = await h.socket(server);
    for (let i = 0; i < 4; i++) sock.send('nope');
    sock.send({ id: 'ok', type: 'PNG' }); // a good frame resets the count
    await sock.next(is.ack('ok'));
    for (let i = 0; i < 5; i++) sock.send('nope');
    expect((await sock.closed).code).toBe(CloseCodes.badFrames);
  });
});

describe('size limits', () => {
  it('answers a socket frame over maxPayloadBytes with NAK too_large, naming its id', async () => {
    const server = await h.start({ maxPayloadBytes: 1024 });
    const sock = await h.socket(server);
    sock.send({ id: 'big', type: 'SYN', payload: ['x'.repeat(2000)] });
    expect(await sock.next()).toMatchObject({ id: 'big', type: 'NAK', error: { code: 'too_large' } });
    sock.send({ id: 'small', type: 'SYN', payload: ['x'] });
    expect(await sock.until(is.reply('small'))).toEqual([
      { id: 'small', type: 'ACK' },
      { id: 'small', type: 'SYN', payload: [{ ok: 'x' }] },
    ]);
  });

  it('closes the socket with 1009 above 4 × maxPayloadBytes', async () => {
    const server = await h.start({ maxPayloadBytes: 1024 });
    const sock = await h.socket(server);
    sock.send({ id: 'huge', type: 'SYN', payload: ['x'.repeat(5000)] });
    expect((await sock.closed).code).toBe(CloseCodes.tooLarge);
  });

  it('answers an HTTP body over maxPayloadBytes with 413 and [NAK too_large]', async () => {
    const server = await h.start({ maxPayloadBytes: 1024 });
    const reply = await post(httpUrl(server), 'c1', { id: 'big', type: 'SYN', payload: ['x'.repeat(5000)] });
    expect(reply.status).toBe(413);
    expect(reply.body).toEqual([
      { id: null, type: 'NAK', error: { code: 'too_large', message: expect.any(String) } },
    ]);
  });

  it('answers 413 for a chunked body that grows too large', async () => {
    const server = await h.start({ maxPayloadBytes: 1024 });
    const reply = await http(httpUrl(server), {
      clientId: 'c1',
      body: JSON.stringify({ id: 'big', type: 'SYN', payload: ['x'.repeat(5000)] }),
      headers: { 'Transfer-Encoding': 'chunked' },
    });
    expect(reply.status).toBe(413);
  });
});

describe('authentication and authorization', () => {
  it('answers HTTP with 401 and [NAK unauthorized] when authenticate returns null', async () => {
    const server = await h.start({
      authenticate: (req) => (req.headers.authorization === 'Bearer ok' ? 'me' : null),
    });
    const refused = await post(httpUrl(server), 'c1', { id: 'p', type: 'PNG' });
    expect(refused.status).toBe(401);
    expect(refused.body).toEqual([
      { id: null, type: 'NAK', error: { code: 'unauthorized', message: expect.any(String) } },
    ]);
    const allowed = await post(
      httpUrl(server),
      'c1',
      { id: 'p', type: 'PNG' },
      { Authorization: 'Bearer ok' },
    );
    expect(allowed).toMatchObject({ status: 200, body: [{ id: 'p', type: 'ACK' }] });
  });

  it('answers a refused upgrade with 401, an accepted one with 101', async () => {
    const server = await h.start({
      authenticate: async (req) =>
        new URL(req.url!, 'http://x').searchParams.get('token') === 't' ? 'me' : null,
    });
    expect(await upgradeStatus(wsUrl(server, 'c1'))).toBe(401);
    expect(await upgradeStatus(`${wsUrl(server, 'c1')}&token=t`)).toBe(101);
  });

  it('answers 403 when authenticate throws SyncError forbidden, 500 for other errors', async () => {
    const server = await h.start({
      authenticate: (req) => {
        if (req.headers['x-mode'] === 'boom') throw new Error('boom');
        throw new SyncError('forbidden', 'banned');
      },
    });
    expect(await upgradeStatus(wsUrl(server, 'c1'))).toBe(403);
    const forbidden = await post(httpUrl(server), 'c1', { id: 'p', type: 'PNG' });
    expect(forbidden).toMatchObject({ status: 403, body: [{ type: 'NAK', error: { code: 'forbidden' } }] });
    const failed = await post(httpUrl(server), 'c1', { id: 'p', type: 'PNG' }, { 'X-Mode': 'boom' });
    expect(failed).toMatchObject({ status: 500, body: [{ type: 'NAK', error: { code: 'server_error' } }] });
    expect(h.errors.map((e) => e.where)).toContain('authenticate');
  });
});

describe('onSync failures', () => {
  const failing: [string, (ops: unknown[]) => unknown][] = [
    ['throws', () => Promise.reject(new Error('db down'))],
    ['returns a non-array', () => ({ nope: true })],
    ['returns too few results', (ops) => ops.slice(1)],
    ['returns results that are not JSON', (ops) => ops.map(() => 10n)],
  ];

  it.each(failing)('answers NAK server_error when onSync %s', async (_name, onSync) => {
    const server = await h.start({ onSync: onSync as (ops: unknown[]) => unknown[] });
    const sock = await h.socket(server);
    const frames = await sock.request({ id: 's1', type: 'SYN', payload: [1, 2] });
    expect(frames).toEqual([
      { id: 's1', type: 'ACK' },
      { id: 's1', type: 'NAK', error: { code: 'server_error', message: expect.any(String) } },
    ]);
    // The server is still serving.
    sock.send({ id: 'p', type: 'PNG' });
    expect(await sock.next()).toEqual({ id: 'p', type: 'ACK' });
  });

  it('answers with the code of a SyncError onSync throws', async () => {
    const server = await h.start({
      onSync: () => {
        throw new SyncError('rate_limited', 'slow down');
      },
    });
    const reply = await post(httpUrl(server), 'c1', { id: 's1', type: 'SYN', payload: [1] });
    expect(reply).toMatchObject({
      status: 200,
      body: [
        { id: 's1', type: 'ACK' },
        { id: 's1', type: 'NAK', error: { code: 'rate_limited', message: 'slow down' } },
      ],
    });
  });
});

describe('dedupe', () => {
  it('applies a SYN sent over the socket and then over HTTP once; both get the same response', async () => {
    let calls = 0;
    const server = await h.start({ onSync: (ops) => ops.map(() => ++calls) });
    const sock = await h.socket(server, 'c-dup');
    const first = await sock.request({ id: 'd1', type: 'SYN', payload: ['op'] });
    const again = await post(httpUrl(server), 'c-dup', { id: 'd1', type: 'SYN', payload: ['op'] });
    expect(again.status).toBe(200);
    expect(again.body).toEqual(first);
    expect(first.at(-1)).toEqual({ id: 'd1', type: 'SYN', payload: [1] });
    expect(calls).toBe(1);
  });

  it('keeps dedupe per clientId: the same id from another client is applied', async () => {
    let calls = 0;
    const server = await h.start({ onSync: (ops) => ops.map(() => ++calls) });
    const a = await post(httpUrl(server), 'c-a', { id: 'same', type: 'SYN', payload: [0] });
    const b = await post(httpUrl(server), 'c-b', { id: 'same', type: 'SYN', payload: [0] });
    expect([a.body[1].payload, b.body[1].payload]).toEqual([[1], [2]]);
  });

  it('answers a duplicate that arrives while the first is processing when it ends, applied once', async () => {
    const gate = deferred();
    let calls = 0;
    const server = await h.start({
      onSync: async (ops) => {
        calls++;
        await gate.promise;
        return ops.map(() => 'done');
      },
    });
    const sock = await h.socket(server, 'c-dup');
    sock.send({ id: 'd1', type: 'SYN', payload: ['op'] });
    await sock.next(is.ack('d1'));
    sock.send({ id: 'd1', type: 'SYN', payload: ['op'] });
    await sock.next(is.ack('d1'));
    const overHttp = post(httpUrl(server), 'c-dup', { id: 'd1', type: 'SYN', payload: ['op'] });
    await eventually(() => calls === 1);
    gate.resolve();
    const replies = [await sock.next(is.reply('d1')), await sock.next(is.reply('d1'))];
    const expected = { id: 'd1', type: 'SYN', payload: ['done'] };
    expect(replies).toEqual([expected, expected]);
    expect((await overHttp).body).toEqual([{ id: 'd1', type: 'ACK' }, expected]);
    expect(calls).toBe(1);
  });

  // FIX14C (PROTOCOL §2 `server_error`): a throwing onSync applied nothing (it must be
  // all-or-nothing), so its NAK is not remembered and a retry runs it again; results not
  // aligned with the operations are remembered (onSync returned: it applied).
  it('does not remember the NAK of a throwing onSync (a retry runs it again); remembers a misaligned result NAK', async () => {
    let calls = 0;
    const server = await h.start({
      onSync: (ops) => {
        calls++;
        if ((ops[0] as number) === 1) throw new Error('nope');
        return [];
      },
    });
    const a = await post(httpUrl(server), 'c1', { id: 'n1', type: 'SYN', payload: [1] });
    const b = await post(httpUrl(server), 'c1', { id: 'n1', type: 'SYN', payload: [1] });
    expect(a.body[1]).toMatchObject({ type: 'NAK', error: { code: 'server_error' } });
    expect(b.body).toEqual(a.body);
    expect(calls).toBe(2);
    const c = await post(httpUrl(server), 'c1', { id: 'n2', type: 'SYN', payload: [2] });
    const d = await post(httpUrl(server), 'c1', { id: 'n2', type: 'SYN', payload: [2] });
    expect(c.body[1]).toMatchObject({ type: 'NAK', error: { code: 'server_error' } });
    expect(d.body).toEqual(c.body);
    expect(calls).toBe(3);
  });

  it('stays within dedupeMaxEntries, forgetting the oldest first', async () => {
    let calls = 0;
    const server = await h.start({ dedupeMaxEntries: 5, onSync: (ops) => ops.map(() => ++calls) });
    const sock = await h.socket(server, 'c-many');
    for (let i = 1; i <= 20; i++) {
      await sock.request({ id: `s${i}`, type: 'SYN', payload: [i] });
      expect(server.stats().dedupeEntries).toBeLessThanOrEqual(5);
    }
    expect(server.stats().dedupeEntries).toBe(5);
    await sock.request({ id: 's20', type: 'SYN', payload: [20] }); // remembered
    expect(calls).toBe(20);
    await sock.request({ id: 's1', type: 'SYN', payload: [1] }); // forgotten: applied again
    expect(calls).toBe(21);
  });
});

/** A store with claim/complete/release over one table, as several processes sharing Redis see it. */
function sharedDedupe(
  store: HistoryStore,
  table: Map<string, { response?: unknown }>,
  seen: { pending: number },
): HistoryStore & DedupeStore {
  return { ...store, ...dedupeTable(table, seen) };
}

/** claim/complete/release over one table, on an object of its own (a `dedupeStore`). */
function dedupeTable(table: Map<string, { response?: unknown }>, seen: { pending: number }): DedupeStore {
  return {
    claim: async (key) => {
      const entry = table.get(key);
      if (entry && !('response' in entry)) seen.pending++;
      if (!entry) {
        table.set(key, {});
        return { status: 'new' };
      }
      return 'response' in entry ? { status: 'done', response: entry.response } : { status: 'pending' };
    },
    complete: async (key, response) => {
      table.set(key, { response });
    },
    release: async (key) => {
      table.delete(key);
    },
  };
}

describe('dedupe across processes (store claim/complete)', () => {
  it("answers a retry on another server from the first one's response, applied once", async () => {
    const table = new Map<string, { response?: unknown }>();
    const seen = { pending: 0 };
    const gate = deferred();
    let calls = 0;
    const onSync = async (ops: unknown[]) => {
      calls++;
      await gate.promise;
      return ops.map(() => 'applied');
    };
    const one = await h.start({ onSync, store: sharedDedupe(memoryStore(), table, seen) });
    const two = await h.start({ onSync, store: sharedDedupe(memoryStore(), table, seen) });
    const sock = await h.socket(one, 'c-shared');
    sock.send({ id: 'x1', type: 'SYN', payload: ['op'] });
    await sock.next(is.ack('x1'));
    await eventually(() => calls === 1);
    const retry = post(httpUrl(two), 'c-shared', { id: 'x1', type: 'SYN', payload: ['op'] });
    await eventually(() => seen.pending >= 2, undefined, 'the second server polling'); // found it pending, twice
    gate.resolve();
    const expected = { id: 'x1', type: 'SYN', payload: ['applied'] };
    expect(await sock.next(is.reply('x1'))).toEqual(expected);
    expect((await retry).body).toEqual([{ id: 'x1', type: 'ACK' }, expected]);
    const later = await post(httpUrl(two), 'c-shared', { id: 'x1', type: 'SYN', payload: ['op'] });
    expect(later.body.at(-1)).toEqual(expected);
    expect(calls).toBe(1);
    expect(one.stats().dedupeEntries + two.stats().dedupeEntries).toBe(0); // the store holds them
  });

  it('uses a separate dedupeStore beside a history store without one', async () => {
    const table = new Map<string, { response?: unknown }>();
    const seen = { pending: 0 };
    let calls = 0;
    const onSync = (ops: unknown[]) => ops.map(() => ++calls);
    const dedupeStore = dedupeTable(table, seen);
    const one = await h.start({ onSync, store: memoryStore(), dedupeStore });
    const two = await h.start({ onSync, store: memoryStore(), dedupeStore });
    const syn = { id: 'd1', type: 'SYN', payload: ['op'] };
    const expected = { id: 'd1', type: 'SYN', payload: [1] };
    expect((await post(httpUrl(one), 'c-sep', syn)).body.at(-1)).toEqual(expected);
    expect((await post(httpUrl(two), 'c-sep', syn)).body.at(-1)).toEqual(expected);
    expect(calls).toBe(1);
    expect(table.size).toBe(1);
    expect(one.stats().dedupeEntries + two.stats().dedupeEntries).toBe(0); // the dedupeStore holds them
  });
});

describe('order', () => {
  it("processes one client's SYNs one at a time in arrival order, across transports", async () => {
    const gate = deferred();
    const log: string[] = [];
    const server = await h.start({
      onSync: async (ops) => {
        log.push(`start ${ops[0]}`);
        if (ops[0] === 'slow') await gate.promise;
        log.push(`end ${ops[0]}`);
        return ops;
      },
    });
    const sock = await h.socket(server, 'c-order');
    sock.send({ id: 's1', type: 'SYN', payload: ['slow'] });
    await sock.next(is.ack('s1'));
    sock.send({ id: 's2', type: 'SYN', payload: ['fast'] });
    await sock.next(is.ack('s2'));
    const overHttp = post(httpUrl(server), 'c-order', { id: 's3', type: 'SYN', payload: ['http'] });
    await eventually(() => log.length === 1);
    expect(log).toEqual(['start slow']);
    gate.resolve();
    const replies = await sock.until(is.reply('s2'));
    expect(replies.map((f) => f.id)).toEqual(['s1', 's2']);
    expect((await overHttp).body.at(-1)).toEqual({ id: 's3', type: 'SYN', payload: ['http'] });
    expect(log).toEqual(['start slow', 'end slow', 'start fast', 'end fast', 'start http', 'end http']);
    await eventually(() => server.stats().clients === 1, undefined, 'idle client queue dropped');
  });

  it('does not hold other clients behind a slow one', async () => {
    const gate = deferred();
    const server = await h.start({
      onSync: async (ops) => {
        if (ops[0] === 'slow') await gate.promise;
        return ops;
      },
    });
    const slow = await h.socket(server);
    const quick = await h.socket(server);
    slow.send({ id: 's1', type: 'SYN', payload: ['slow'] });
    await slow.next(is.ack('s1'));
    expect((await quick.request({ id: 'q1', type: 'SYN', payload: ['quick'] })).at(-1)).toMatchObject({
      type: 'SYN',
    });
    gate.resolve();
    expect(await slow.next(is.reply('s1'))).toMatchObject({ type: 'SYN', payload: ['slow'] });
  });

  it('refuses SYNs beyond maxQueuedPerClient with NAK rate_limited', async () => {
    const gate = deferred();
    const server = await h.start({
      maxQueuedPerClient: 2,
      onSync: async (ops) => {
        await gate.promise;
        return ops;
      },
    });
    const sock = await h.socket(server);
    for (const id of ['q1', 'q2', 'q3']) sock.send({ id, type: 'SYN', payload: [id] });
    expect(await sock.next(is.reply('q3'))).toMatchObject({ type: 'NAK', error: { code: 'rate_limited' } });
    gate.resolve();
    expect(await sock.next(is.reply('q1'))).toMatchObject({ type: 'SYN' });
    expect(await sock.next(is.reply('q2'))).toMatchObject({ type: 'SYN' });
  });
});

describe('HTTP transport', () => {
  it('answers POST with 200 and the envelopes the socket would carry', async () => {
    const server = await h.start();
    const reply = await post(httpUrl(server), 'c1', { id: 's1', type: 'SYN', payload: [1, 2] });
    expect(reply.status).toBe(200);
    expect(reply.headers['content-type']).toBe('application/json');
    expect(reply.body).toEqual([
      { id: 's1', type: 'ACK' },
      { id: 's1', type: 'SYN', payload: [{ ok: 1 }, { ok: 2 }] },
    ]);
    const png = await post(httpUrl(server), 'c1', { id: 'p1', type: 'PNG' });
    expect(png.body).toEqual([{ id: 'p1', type: 'ACK' }]);
  });

  it('answers the CORS preflight of an allowed origin with 204, reflecting the origin', async () => {
    const server = await h.start({ allowedOrigins: ['https://app.example'] });
    const reply = await http(httpUrl(server), {
      method: 'OPTIONS',
      headers: { Origin: 'https://app.example', 'Access-Control-Request-Method': 'POST' },
    });
    expect(reply.status).toBe(204);
    expect(reply.headers['access-control-allow-origin']).toBe('https://app.example');
    expect(String(reply.headers['access-control-allow-headers']).toLowerCase()).toContain('x-client-id');
    expect(String(reply.headers['access-control-allow-headers']).toLowerCase()).toContain('content-type');
  });

  it('answers 405 to other methods, 404 to other paths, 400 without a valid X-Client-Id', async () => {
    const server = await h.start();
    expect((await http(httpUrl(server), { method: 'GET' })).status).toBe(405);
    expect((await post(httpUrl(server, '/other'), 'c1', { id: 'p', type: 'PNG' })).status).toBe(404);
    const missing = await http(httpUrl(server), { body: { id: 'p', type: 'PNG' } });
    expect(missing).toMatchObject({ status: 400, body: [{ type: 'NAK', error: { code: 'bad_request' } }] });
    expect((await post(httpUrl(server), 'c'.repeat(129), { id: 'p', type: 'PNG' })).status).toBe(400);
  });

  it('refuses an upgrade without a valid clientId with 400, and on another path with 404', async () => {
    const server = await h.start();
    expect(await upgradeStatus(wsUrl(server))).toBe(400);
    expect(await upgradeStatus(wsUrl(server, 'c'.repeat(129)))).toBe(400);
    expect(await upgradeStatus(wsUrl(server, 'c1', '/elsewhere'))).toBe(404);
  });
});

describe('bounded memory', () => {
  it(`closes a socket that stops reading with ${CloseCodes.slowConsumer}`, async () => {
    const server = await h.start({ maxBufferedBytes: 256 * 1024 });
    const sock = await h.socket(server, 'c-slow');
    await sock.request({ id: 'sub', type: 'SUB', payload: { channels: { firehose: {} } } });
    const raw = (sock.ws as unknown as { _socket: import('node:net').Socket })._socket;
    raw.pause();
    const big = 'x'.repeat(64 * 1024);
    for (let i = 0; i < 400 && server.stats().channels > 0; i++) await server.publish('firehose', big);
    expect(server.stats().channels).toBe(0); // the subscription was dropped with the socket
    raw.resume();
    expect((await sock.closed).code).toBe(CloseCodes.slowConsumer);
  });

  it('forgets sockets and idle clients once they are gone', async () => {
    const server = await h.start();
    const a = await h.socket(server, 'c-a');
    const b = await h.socket(server, 'c-b');
    await a.request({ id: 'sub', type: 'SUB', payload: { channels: { x: {} } } });
    expect(server.stats()).toMatchObject({ sockets: 2, clients: 2, channels: 1 });
    await a.close();
    await b.close();
    await eventually(() => server.stats().sockets === 0);
    expect(server.stats()).toMatchObject({ sockets: 0, clients: 0, channels: 0 });
  });
});

describe('lifecycle', () => {
  it('listens on a free port on 127.0.0.1', async () => {
    const server = await h.start();
    expect(server.address()).toEqual({ host: '127.0.0.1', port: expect.any(Number) });
    expect(server.address().port).toBeGreaterThan(0);
  });

  it('close() resolves, closes sockets with 1001 and stops listening', async () => {
    const server = await h.start();
    const sock = await RawSocket.open(wsUrl(server, 'c1'));
    const url = httpUrl(server);
    await server.close();
    expect((await sock.closed).code).toBe(CloseCodes.goingAway);
    await expect(post(url, 'c1', { id: 'p', type: 'PNG' })).rejects.toThrow();
    await expect(server.publish('x', 1)).rejects.toMatchObject({ code: 'closed' });
    await server.close(); // idempotent
  });

  it('attaches to a given http.Server and leaves its other paths alone', async () => {
    const { createServer } = await import('node:http');
    const own = createServer((req, res) => {
      if (req.url !== '/sync') res.end('app');
    });
    await new Promise<void>((resolve) => own.listen(0, '127.0.0.1', resolve));
    try {
      const server = await h.start({ server: own });
      expect((await http(httpUrl(server, '/'), { method: 'GET' })).body).toBe('app');
      expect((await post(httpUrl(server), 'c1', { id: 'p', type: 'PNG' })).body).toEqual([
        { id: 'p', type: 'ACK' },
      ]);
      const sock = await h.socket(server);
      expect(await sock.request({ id: 's', type: 'SYN', payload: [1] })).toHaveLength(2);
      await server.close();
      expect(own.listening).toBe(true);
    } finally {
      own.closeAllConnections();
      await new Promise((resolve) => own.close(resolve));
    }
  });
});
