/**
 * The socket URL and URL checks after issue 14's connect-row work (session 7, S7C): a URL
 * `checkUrl` accepted is remembered (a bounded Set), and the socket URL of a clientId the form
 * encoding leaves as it is, with no `params`, is built from a template cut at a sentinel
 * (a bounded Map per URL) instead of `new URL` + `searchParams.set` at each dial.
 * (1) Whatever the URL and clientId, `wsUrlWithParams` gives exactly what the URL API gives
 *     (fast-check; SOCKET_URL_SEED=… replays a run, the seed is printed), also once the caches
 *     were cleared by their bound.
 * (2) A remembered URL never lets a bad one through: every bad URL still throws, each time.
 * (3) Against a real `ws` server on 127.0.0.1: clients made on one URL (the template's cache
 *     hit) each dial with their own clientId, and the URL's own query stays.
 */
import type { IncomingMessage } from 'node:http';
import type { AddressInfo } from 'node:net';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { WebSocket, WebSocketServer } from 'ws';
import { createSyncClient, type SyncClient } from '../src/client/index.js';
import { checkUrl, wsUrlWithParams } from '../src/client/transports.js';

/** What the socket URL was before the cache (and still is on the slow path): the URL API. */
function reference(url: string, clientId: string, params: Record<string, string>): string {
  const u = new URL(url);
  for (const [k, v] of Object.entries(params)) u.searchParams.set(k, v);
  // Last: a `clientId` key in params never replaces the client's own (fix7 F1).
  u.searchParams.set('clientId', clientId);
  return u.toString();
}

const BASES = [
  'ws://127.0.0.1:8080/sync',
  'wss://example.org/sync',
  'ws://example.org',
  'ws://example.org/a%20b/sync?room=a&x=1',
  'ws://example.org/sync?clientId=old&clientId=older&y=2',
  'ws://example.org/sync?q=a+b c',
  'ws://user:pw@example.org:9000/sync#frag',
  'WS://EXAMPLE.org/Sync?',
  'http://example.org/sync',
];
const FORM_SAFE = 'abcXYZ019*._-';

const SEED = Number(process.env.SOCKET_URL_SEED ?? Date.now() % 2 ** 31);
const RUNS = Number(process.env.SOCKET_URL_RUNS ?? 500);

describe('wsUrlWithParams (the template cache) gives what the URL API gives', () => {
  it(`${RUNS} URLs × clientIds × params (fast-check)`, () => {
    console.log(`[socket-url] seed ${SEED} (SOCKET_URL_SEED=${SEED} replays it)`);
    const clientId = fc.oneof(
      // Form-safe: the template path.
      fc.string({ unit: fc.constantFrom(...FORM_SAFE.split('')), minLength: 1, maxLength: 24 }),
      // Anything else (spaces, +, ~, %, &, =, #, unicode, lone surrogates): the URL API's path.
      fc.string({ unit: 'binary', minLength: 1, maxLength: 24 }),
      fc.string({ minLength: 1, maxLength: 24 }),
    );
    const params = fc.oneof(
      fc.constant({} as Record<string, string>),
      fc.dictionary(fc.string({ minLength: 1, maxLength: 8 }), fc.string({ maxLength: 8 }), { maxKeys: 3 }),
    );
    try {
      fc.assert(
        fc.property(fc.constantFrom(...BASES), clientId, params, (url, id, p) => {
          expect(wsUrlWithParams(url, id, p)).toBe(reference(url, id, p));
          // Asked again (the cache hit), the same.
          expect(wsUrlWithParams(url, id, p)).toBe(reference(url, id, p));
        }),
        { numRuns: RUNS, seed: SEED },
      );
    } catch (err) {
      console.error(`[socket-url] failed with SOCKET_URL_SEED=${SEED}`);
      throw err;
    }
  });

  it('past the cache bound (more distinct URLs than it keeps), every URL is still right', () => {
    const urls = Array.from({ length: 600 }, (_, i) => `ws://host-${i}.example/sync?n=${i}`);
    for (const round of [0, 1]) {
      for (const url of urls) {
        const id = `c-${round}-${url.length}`;
        expect(wsUrlWithParams(url, id, {})).toBe(reference(url, id, {}));
      }
    }
  });

  it('a clientId that is a sentinel-like text or empty-looking still comes out as the URL API says', () => {
    for (const id of ['syncwireClientIdSentinel0', 'a', '-', '*', '.', '_']) {
      expect(wsUrlWithParams(BASES[3]!, id, {})).toBe(reference(BASES[3]!, id, {}));
    }
  });
});

describe('checkUrl remembers good URLs only', () => {
  it('a bad URL throws every time, before and after good ones were remembered', () => {
    const bad = ['', 'not a url', '/relative/sync', 'ftp://example.org/x', 'ws//missing-colon'];
    for (let round = 0; round < 3; round++) {
      for (const u of bad) expect(() => checkUrl('url', u)).toThrow(TypeError);
      expect(() => checkUrl('url', 42)).toThrow(TypeError);
      expect(() => checkUrl('url', null)).toThrow(TypeError);
      // Good ones, the second time from the Set.
      expect(() => checkUrl('url', 'ws://127.0.0.1:1/sync')).not.toThrow();
      expect(() => checkUrl('httpUrl', 'https://example.org/sync')).not.toThrow();
    }
  });

  it('past the bound (the Set is cleared), bad URLs still throw and good ones still pass', () => {
    for (let i = 0; i < 600; i++) checkUrl('url', `ws://h${i}.example/sync`);
    expect(() => checkUrl('url', 'ftp://example.org/x')).toThrow(/must use ws:, wss:, http: or https:/);
    expect(() => checkUrl('url', 'ws://h0.example/sync')).not.toThrow();
  });

  it('createSyncClient still refuses a bad url after a good one was used', () => {
    const c = createSyncClient({ url: 'ws://127.0.0.1:1/sync', WebSocket: WebSocket as never });
    void c.close();
    expect(() => createSyncClient({ url: 'ftp://127.0.0.1/sync', WebSocket: WebSocket as never })).toThrow(
      TypeError,
    );
  });
});

describe('clients dialled on one URL each use their own clientId (real ws server)', () => {
  let wss: WebSocketServer;
  let port = 0;
  const seen: string[] = [];
  beforeAll(async () => {
    wss = new WebSocketServer({ host: '127.0.0.1', port: 0 });
    wss.on('connection', (_ws, req: IncomingMessage) => {
      seen.push(req.url ?? '');
    });
    await new Promise<void>((resolve) => wss.once('listening', () => resolve()));
    port = (wss.address() as AddressInfo).port;
  });
  afterAll(async () => {
    for (const ws of wss.clients) ws.terminate();
    await new Promise<void>((resolve) => wss.close(() => resolve()));
  });

  /** Resolves with the request URL the server saw for the next connection. */
  const nextUpgrade = async (from: number): Promise<string> => {
    const deadline = Date.now() + 10_000;
    while (seen.length <= from) {
      if (Date.now() > deadline) throw new Error('no upgrade within 10 s');
      await new Promise((resolve) => setImmediate(resolve));
    }
    return seen[from]!;
  };

  it('form-safe ids (template path), other ids (URL API path), params, and the URL query', async () => {
    const url = `ws://127.0.0.1:${port}/sync?room=a%20b&keep=1`;
    const cases: Array<{ clientId?: string; params?: Record<string, string> }> = [
      { clientId: 'c-first' },
      { clientId: 'c-second' },
      {},
      // Visible ASCII the form encoding escapes (PROTOCOL §1 allows no other): the URL API path.
      { clientId: 'needs+enc/%&?#="~' },
      { clientId: 'c-third', params: { token: 't 1', room: 'override' } },
    ];
    const clients: SyncClient[] = [];
    try {
      for (const opts of cases) {
        const at = seen.length;
        const c = createSyncClient({ url, WebSocket: WebSocket as never, ...opts });
        clients.push(c);
        const got = new URL(await nextUpgrade(at), 'http://x');
        expect(got.pathname).toBe('/sync');
        expect(got.searchParams.get('clientId')).toBe(c.clientId);
        expect(got.searchParams.getAll('clientId')).toHaveLength(1);
        expect(got.searchParams.get('keep')).toBe('1');
        expect(got.searchParams.get('room')).toBe(opts.params?.room ?? 'a b');
        if (opts.params?.token) expect(got.searchParams.get('token')).toBe('t 1');
        // What the URL API makes of it, to the byte.
        expect(`ws://127.0.0.1:${port}${seen[at]}`).toBe(reference(url, c.clientId, opts.params ?? {}));
      }
      // The generated ids differ, and each client dialled with its own.
      expect(new Set(clients.map((c) => c.clientId)).size).toBe(cases.length);
    } finally {
      await Promise.all(clients.map((c) => c.close()));
    }
  });
});
