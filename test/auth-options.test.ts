/**
 * Credentials that expire, and options that are wrong (issue 13).
 *
 * - `params` / `headers` / `url` as (async) functions are called for each dial and each HTTP
 *   request: after a token rotates, the next dial carries the fresh one;
 * - a dial refused with 401 resolves them again and redials at once (a refresh); a second
 *   refusal stops the client: `failures$` kind `unauthorized`, pending sends reject with
 *   `SyncError('unauthorized')`, `state$` ends `closed`, and no more dials;
 * - the same over HTTP (a socket that cannot connect, so every op goes over HTTP);
 * - bad numbers throw `RangeError` naming the option and its range.
 *
 * A real reference server with a real `authenticate` on 127.0.0.1; real `ws` clients.
 */
import type { IncomingMessage } from 'node:http';
import { afterEach, describe, expect, it } from 'vitest';
import { WebSocket } from 'ws';
import {
  createSyncClient,
  type Failure,
  type ResolveContext,
  type SyncClient,
  SyncError,
} from '../src/client/index.js';
import { createSyncServer, type SyncServer } from '../src/server/index.js';
import { next, reach, until } from './helpers/harness.js';
import { freePort } from './helpers/nginx.js';

const T = 200;
let server: SyncServer | null = null;
const clients: SyncClient[] = [];
afterEach(async () => {
  await Promise.all(clients.splice(0).map((c) => c.close()));
  await server?.close();
  server = null;
});

/** A server that lets in only the tokens in `valid`, from `?token=` or `authorization: Bearer`. */
async function tokenServer(valid: Set<string>, onRefuse: () => void = () => {}) {
  const seen: Array<{ via: 'ws' | 'http'; token: string | null; ok: boolean }> = [];
  server = await createSyncServer({
    port: 0,
    onSync: (ops) => ops.map((op) => ({ ok: op })),
    authenticate: (req: IncomingMessage) => {
      const q = new URL(req.url ?? '/', 'http://x').searchParams.get('token');
      const h = req.headers.authorization?.replace(/^Bearer /, '') ?? null;
      const token = q ?? h;
      const ok = token !== null && valid.has(token);
      seen.push({ via: req.method === 'GET' ? 'ws' : 'http', token, ok });
      if (!ok) onRefuse();
      // One user whose token rotates: the principal (and so the clientId binding) stays the same.
      return ok ? { id: 'user-1', token } : null;
    },
  });
  const { port } = server.address();
  return { url: `ws://127.0.0.1:${port}/sync`, httpUrl: `http://127.0.0.1:${port}/sync`, seen };
}

describe('credentials as functions', () => {
  it('a token that expires: the next dial uses a fresh one', async () => {
    const valid = new Set(['t1']);
    const srv = await tokenServer(valid);
    let current = 't1';
    let calls = 0;
    const c = createSyncClient({
      url: srv.url,
      timeout: T,
      WebSocket,
      params: async () => {
        calls++;
        return { token: current };
      },
    });
    clients.push(c);
    await reach(c, 'open');
    expect(await c.send('a')).toEqual({ ok: 'a' });
    // The token rotates; the socket dies (as it would when the server expires the session).
    current = 't2';
    valid.clear();
    valid.add('t2');
    const callsBefore = calls;
    c.debug.killSocket();
    await until(() => srv.seen.some((s) => s.via === 'ws' && s.token === 't2' && s.ok), 5000, 'dial with t2');
    await reach(c, 'open');
    expect(await c.send('b')).toEqual({ ok: 'b' });
    expect(calls).toBeGreaterThan(callsBefore);
    expect(srv.seen.filter((s) => s.via === 'ws').map((s) => s.token)).toEqual(['t1', 't2']);
  });

  it('a dial refused with 401 resolves the params again and redials at once (refresh)', async () => {
    const valid = new Set(['t1']);
    // The app's token source learns of the rotation only when the server refuses t1 (as a
    // token cache would, on its first refusal).
    let issued = 't1';
    const srv = await tokenServer(valid, () => {
      issued = 't2';
    });
    const c = createSyncClient({
      url: srv.url,
      timeout: T,
      maxBackoff: 60_000,
      WebSocket,
      params: () => ({ token: issued }),
    });
    clients.push(c);
    const failures: Failure[] = [];
    c.failures$.subscribe((f) => failures.push(f));
    await reach(c, 'open');
    valid.clear();
    valid.add('t2');
    c.debug.killSocket();
    // The first redial (after the backoff) is refused with 401; the immediate re-dial asks the
    // token source again and gets t2.
    await until(() => srv.seen.some((s) => s.via === 'ws' && s.token === 't2' && s.ok), 5000, 'dial with t2');
    await reach(c, 'open');
    const dials = srv.seen.filter((s) => s.via === 'ws');
    expect(dials.map((d) => [d.token, d.ok])).toEqual([
      ['t1', true],
      ['t1', false],
      ['t2', true],
    ]);
    expect(failures.map((f) => [f.kind, f.code])).toContainEqual(['dial_error', 401]);
    expect(failures.some((f) => f.kind === 'unauthorized')).toBe(false);
    expect(await c.send('x')).toEqual({ ok: 'x' });
  });

  it('a refused refresh ends in a typed error: failures$ unauthorized, pending sends reject, no more dials', async () => {
    const valid = new Set(['t1']);
    const srv = await tokenServer(valid);
    const c = createSyncClient({
      url: srv.url,
      timeout: T,
      WebSocket,
      params: async () => ({ token: 't1' }),
      headers: async () => ({ authorization: 'Bearer t1' }),
    });
    clients.push(c);
    await reach(c, 'open');
    valid.clear();
    const unauthorized = next(c.failures$, (f) => f.kind === 'unauthorized');
    c.debug.killSocket();
    const pending = c.send('lost?');
    const f = await unauthorized;
    expect(f.code).toBe(401);
    const err = await pending.then(
      () => null,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(SyncError);
    expect((err as SyncError).code).toBe('unauthorized');
    expect(c.state).toBe('closed');
    expect(c.actor.getSnapshot().status).toBe('done');
    // Stopped: at most one refused dial and its one refresh, however long we look.
    const refusedDials = srv.seen.filter((s) => s.via === 'ws' && !s.ok).length;
    expect(refusedDials).toBeLessThanOrEqual(2);
    await expect(c.send('after')).rejects.toMatchObject({ code: 'closed' });
  });

  it('over HTTP: a 401 resolves the headers again and retries at once; the op is applied once', async () => {
    const valid = new Set(['fresh']);
    const srv = await tokenServer(valid);
    // A socket URL nothing listens on: every op goes over HTTP.
    const dead = `ws://127.0.0.1:${await freePort()}/sync`;
    const tokens = ['stale', 'fresh'];
    let calls = 0;
    const c = createSyncClient({
      url: dead,
      httpUrl: srv.httpUrl,
      timeout: T,
      WebSocket,
      // Counted per HTTP request: dials resolve headers too (transport 'ws'), for the upgrade.
      headers: async (ctx): Promise<Record<string, string>> =>
        ctx.transport === 'http' ? { authorization: `Bearer ${tokens[Math.min(calls++, 1)]}` } : {},
    });
    clients.push(c);
    expect(await c.send('h')).toEqual({ ok: 'h' });
    const http = srv.seen.filter((s) => s.via === 'http');
    expect(http.map((s) => [s.token, s.ok])).toEqual([
      ['stale', false],
      ['fresh', true],
    ]);
  });

  it('url as an async function is called for each dial', async () => {
    const srv = await tokenServer(new Set(['k']));
    let calls = 0;
    const c = createSyncClient({
      url: async () => {
        calls++;
        return `${srv.url}?token=k`;
      },
      timeout: T,
      WebSocket,
    });
    clients.push(c);
    await reach(c, 'open');
    c.debug.killSocket();
    await until(() => srv.seen.filter((s) => s.via === 'ws' && s.ok).length === 2, 5000, 'second dial');
    expect(calls).toBeGreaterThanOrEqual(2);
  });
});

/**
 * An app-side token cache, as apps write them (Firebase `getIdToken(forceRefresh)`,
 * centrifuge-js `getToken`): it hands out the cached token until told to refresh.
 */
function tokenCache(mint: () => string) {
  let cached: string | null = null;
  const contexts: ResolveContext[] = [];
  return {
    contexts,
    async getToken({ forceRefresh }: { forceRefresh: boolean }) {
      if (cached === null || forceRefresh) cached = mint();
      return cached;
    },
  };
}

describe('refresh after a 401 (the functions are told to bypass their cache)', () => {
  it('ws: a cached token refreshed only when told to: after a 401 the client recovers instead of closing', async () => {
    const valid = new Set(['t1']);
    const srv = await tokenServer(valid);
    let minted = 0;
    const auth = tokenCache(() => `t${++minted}`);
    const c = createSyncClient({
      url: srv.url,
      timeout: T,
      WebSocket,
      params: async (ctx) => {
        auth.contexts.push(ctx);
        return { token: await auth.getToken({ forceRefresh: ctx.refresh }) };
      },
    });
    clients.push(c);
    const failures: Failure[] = [];
    c.failures$.subscribe((f) => failures.push(f));
    await reach(c, 'open');
    expect(await c.send('a')).toEqual({ ok: 'a' });
    // The server revokes t1 and will accept the next token the app mints; the socket dies.
    valid.clear();
    valid.add('t2');
    c.debug.killSocket();
    await until(() => srv.seen.some((s) => s.via === 'ws' && s.token === 't2' && s.ok), 5000, 'dial with t2');
    await reach(c, 'open');
    expect(await c.send('b')).toEqual({ ok: 'b' });
    expect(c.state).toBe('open');
    expect(failures.some((f) => f.kind === 'unauthorized')).toBe(false);
    expect(srv.seen.filter((s) => s.via === 'ws').map((s) => [s.token, s.ok])).toEqual([
      ['t1', true],
      ['t1', false],
      ['t2', true],
    ]);
    // Told exactly once to refresh: on the dial right after the 401.
    expect(auth.contexts.map((x) => [x.transport, x.refresh])).toEqual([
      ['ws', false],
      ['ws', false],
      ['ws', true],
    ]);
  });

  it('http: a cached token refreshed only when told to: the 401 retry carries the fresh one; op applied once', async () => {
    const valid = new Set(['t2']);
    const srv = await tokenServer(valid);
    const dead = `ws://127.0.0.1:${await freePort()}/sync`;
    let minted = 0;
    const auth = tokenCache(() => `t${++minted}`);
    const c = createSyncClient({
      url: dead,
      httpUrl: srv.httpUrl,
      timeout: T,
      WebSocket,
      headers: async (ctx): Promise<Record<string, string>> => {
        // Dials (to a dead socket URL) resolve headers too, with transport 'ws': not counted.
        if (ctx.transport !== 'http') return {};
        auth.contexts.push(ctx);
        return { authorization: `Bearer ${await auth.getToken({ forceRefresh: ctx.refresh })}` };
      },
    });
    clients.push(c);
    expect(await c.send('h')).toEqual({ ok: 'h' });
    expect(srv.seen.filter((s) => s.via === 'http').map((s) => [s.token, s.ok])).toEqual([
      ['t1', false],
      ['t2', true],
    ]);
    expect(auth.contexts.slice(0, 2).map((x) => [x.transport, x.refresh])).toEqual([
      ['http', false],
      ['http', true],
    ]);
  });
});

describe('what a params/headers/url function returns is checked at each call', () => {
  it('params returning a nested object: a dial_error naming params, nothing dialled; fixed values connect', async () => {
    const srv = await tokenServer(new Set(['ok']));
    let bad = true;
    const c = createSyncClient({
      url: srv.url,
      timeout: T,
      maxBackoff: 50,
      WebSocket,
      params: async () => (bad ? ({ token: { nested: 1 } } as never) : { token: 'ok' }),
    });
    clients.push(c);
    const f = await next(c.failures$, (x) => x.kind === 'dial_error');
    expect(f.reason).toMatch(/option params resolved to .*not a record of strings/);
    expect(srv.seen.filter((s) => s.via === 'ws')).toEqual([]);
    bad = false;
    await reach(c, 'open');
    expect(await c.send('p')).toEqual({ ok: 'p' });
  });

  it('headers returning a string: an http_error naming headers, retried; fixed values deliver the op once', async () => {
    const srv = await tokenServer(new Set(['ok']));
    const dead = `ws://127.0.0.1:${await freePort()}/sync`;
    let bad = true;
    const c = createSyncClient({
      url: dead,
      httpUrl: srv.httpUrl,
      timeout: T,
      maxBackoff: 50,
      WebSocket,
      headers: () => (bad ? ('garbage' as never) : { authorization: 'Bearer ok' }),
    });
    clients.push(c);
    const sent = c.send('q');
    const f = await next(c.failures$, (x) => x.kind === 'http_error' && /headers/.test(x.reason ?? ''));
    expect(f.reason).toMatch(/option headers resolved to "garbage"/);
    expect(srv.seen.filter((s) => s.via === 'http')).toEqual([]);
    bad = false;
    expect(await sent).toEqual({ ok: 'q' });
  });

  it('url returning garbage: a dial_error naming url; the client keeps running', async () => {
    const srv = await tokenServer(new Set(['k']));
    let value: unknown = 'not a url';
    const c = createSyncClient({ url: async () => value as string, timeout: T, maxBackoff: 50, WebSocket });
    clients.push(c);
    const f = await next(c.failures$, (x) => x.kind === 'dial_error');
    expect(f.reason).toMatch(/option url "not a url" is not an absolute URL/);
    value = `${srv.url}?token=k`;
    await reach(c, 'open');
  });
});

describe('option validation', () => {
  const base = { url: 'ws://127.0.0.1:1/sync', WebSocket };
  it.each([
    ['timeout', -5, /timeout .*\[1, 2147483647\]/],
    ['timeout', 0, /timeout/],
    ['timeout', Number.NaN, /timeout/],
    ['maxBatch', 0, /maxBatch .*integer in \[1, 100000\]/],
    ['maxBatch', 1.5, /maxBatch/],
    ['maxQueue', 0, /maxQueue .*\[1, /],
    ['pollInterval', -1, /pollInterval/],
    ['maxBackoff', Number.POSITIVE_INFINITY, /maxBackoff/],
  ])('%s: %s throws a RangeError naming the option and its range', (name, value, message) => {
    const make = () => createSyncClient({ ...base, [name]: value });
    expect(make).toThrow(RangeError);
    expect(make).toThrow(message);
  });

  it.each([
    ['url', ''],
    ['url', []],
    ['url', 'not a url'],
    ['url', 'ftp://x/sync'],
    ['params', { token: 5 }],
    ['headers', 'x'],
    ['clientId', ''],
    ['channels', ['a', 'b']],
    ['channels', [{}, {}]],
    ['channels', 'room'],
    ['channels', null],
    ['httpUrl', 'not a url'],
    ['httpUrl', ['http://127.0.0.1:1/sync', 'relative/path']],
    ['httpUrl', 'ftp://x/sync'],
  ])('%s: %j throws a TypeError naming the option', (name, value) => {
    const make = () => createSyncClient({ ...base, [name]: value } as never);
    expect(make).toThrow(TypeError);
    expect(make).toThrow(new RegExp(`option ${name}`));
  });

  it.each([
    ['timeout', Number.NaN, 'got NaN'],
    ['timeout', Number.POSITIVE_INFINITY, 'got Infinity'],
    ['maxQueue', Number.NEGATIVE_INFINITY, 'got -Infinity'],
  ])('%s: %s prints the value it got, not null', (name, value, shown) => {
    expect(() => createSyncClient({ ...base, [name]: value })).toThrow(shown);
  });

  it('accepts the documented edge values', () => {
    const c = createSyncClient({ ...base, timeout: 1, maxBatch: 100_000, maxQueue: 1, maxBackoff: 1 });
    clients.push(c);
    expect(c.state).toBe('connecting');
  });
});
