/**
 * The clientId on the wire is the client's own, and only a valid one (fix7, a fresh breaker's
 * findings F1–F3). Real syncwire server on 127.0.0.1 (socket and HTTP), real `ws` client.
 * F1: a `clientId` key in `params` (or an `X-Client-Id` entry in `headers`) replaced the
 *     socket's clientId while HTTP sent the client's own: a batch in `onSync` when the socket
 *     died was retried under another id and applied twice. Now a static one is a TypeError at
 *     creation, and one from a function is overridden by the client's own.
 * F2: a `url`/`httpUrl` with a #fragment is refused at creation (every dial failed before).
 * F3: a clientId outside PROTOCOL §1 (1–128 characters, well-formed UTF-16) is refused at
 *     creation; one read back from storage is replaced by a new one.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { WebSocket } from 'ws';
import { createSyncClient, memoryStorage } from '../src/client/index.js';
import { isValidClientId } from '../src/client/transports.js';
import type { SyncServer } from '../src/server/index.js';
import { memoryStore } from '../src/stores/memory.js';
import { deferred, eventually, harness, httpUrl } from './helpers/raw.js';

const h = harness();
const clients: { close(): Promise<unknown> }[] = [];
afterEach(async () => {
  for (const c of clients.splice(0)) await c.close();
});
const client = (opts: Parameters<typeof createSyncClient>[0]) => {
  const c = createSyncClient<{ k: string }, { k: string; cid: string }>({
    WebSocket: WebSocket as never,
    ...opts,
  });
  clients.push(c);
  return c;
};
const wsUrl = (s: SyncServer) => `ws://127.0.0.1:${s.address().port}/sync`;

/** A server whose onSync counts each op's applications and answers with the clientId it saw. */
/** Every visible ASCII character, U+0021–U+007E (94): what a clientId may hold (PROTOCOL §1). */
const VISIBLE_ASCII = Array.from({ length: 94 }, (_, i) => String.fromCharCode(0x21 + i)).join('');

async function recordingServer(gate?: () => Promise<void>) {
  const applied = new Map<string, number>();
  const seen: string[] = [];
  const entered = { n: 0 };
  const server = await h.start({
    store: memoryStore(),
    onSync: async (ops: unknown[], ctx: { clientId: string }) => {
      entered.n++;
      seen.push(ctx.clientId);
      for (const o of ops as { k: string }[]) applied.set(o.k, (applied.get(o.k) ?? 0) + 1);
      if (gate) await gate();
      return (ops as { k: string }[]).map((o) => ({ k: o.k, cid: ctx.clientId }));
    },
  });
  return { server, applied, seen, entered };
}

describe('F1: params and headers cannot replace the clientId on the wire', () => {
  it('a static params with a clientId key, or headers with X-Client-Id (any case), is a TypeError naming the option', () => {
    const url = 'ws://127.0.0.1:1/sync';
    expect(() => client({ url, params: { clientId: 'theirs' } })).toThrow(
      /option params must not have a clientId key/,
    );
    expect(() => client({ url, params: { token: 't', clientId: '' } })).toThrow(TypeError);
    expect(() => client({ url, headers: { 'X-Client-Id': 'theirs' } })).toThrow(
      /option headers must not have an X-Client-Id/,
    );
    expect(() => client({ url, headers: { 'x-client-id': 'theirs' } })).toThrow(TypeError);
    // Other keys still pass.
    expect(() =>
      client({ url, params: { token: 't', clientid: 'other-case' }, headers: { 'x-token': 't' } }),
    ).not.toThrow();
  });

  it("a params function returning clientId: the socket carries the client's own; a batch retried after the socket dies in onSync is applied once", async () => {
    for (let t = 0; t < 3; t++) {
      const gate = deferred();
      let holding = false;
      const { server, applied, seen, entered } = await recordingServer(() =>
        holding ? gate.promise : Promise.resolve(),
      );
      const seenParams: unknown[] = [];
      const c = client({
        url: wsUrl(server),
        clientId: `mine-${t}`,
        timeout: 400,
        params: (ctx) => {
          seenParams.push(ctx);
          return { clientId: `theirs-${t}`, token: 'x' };
        },
      });
      const first = await c.send({ k: 'warm' });
      expect(first.cid).toBe(`mine-${t}`);
      holding = true;
      const before = entered.n;
      const p = c.send({ k: 'held' });
      await eventually(() => entered.n > before, 5000, 'onSync entered for the held batch');
      c.debug.killSocket();
      holding = false;
      gate.resolve();
      const r = await p;
      // The retry (socket redial or HTTP) is deduped under the same clientId: applied once.
      expect(applied.get('held')).toBe(1);
      expect(r.cid).toBe(`mine-${t}`);
      expect(new Set(seen)).toEqual(new Set([`mine-${t}`]));
      expect(seenParams.length).toBeGreaterThan(0);
    }
  });

  it("over HTTP, a headers function returning X-Client-Id does not replace the client's own", async () => {
    const { server, seen } = await recordingServer();
    const failures: string[] = [];
    const c = client({
      // No socket server there: the client works over HTTP.
      url: 'ws://127.0.0.1:1/sync',
      httpUrl: httpUrl(server),
      clientId: 'mine-http',
      timeout: 400,
      headers: () => ({ 'X-Client-Id': 'theirs-http', 'x-client-id': 'theirs-too', 'x-token': 't' }),
      params: () => ({ clientId: 'theirs-param' }),
    });
    c.failures$.subscribe((f) => failures.push(f.kind));
    const r = await c.send({ k: 'over-http' });
    expect(r.cid).toBe('mine-http');
    expect(seen).toEqual(['mine-http']);
  });
});

describe('F2: a url with a #fragment is refused at creation', () => {
  it('url string, each url array entry, httpUrl: TypeError naming the option', () => {
    expect(() => client({ url: 'ws://127.0.0.1:1/sync#x' })).toThrow(
      /option url .* must not contain a #fragment/,
    );
    expect(() => client({ url: 'ws://127.0.0.1:1/sync#' })).toThrow(TypeError);
    expect(() => client({ url: ['ws://127.0.0.1:1/sync', 'ws://127.0.0.1:2/sync#b'] })).toThrow(/#fragment/);
    expect(() => client({ url: 'ws://127.0.0.1:1/sync', httpUrl: 'http://127.0.0.1:1/sync#h' })).toThrow(
      /option httpUrl .* must not contain a #fragment/,
    );
    // A %23 in the query is data, not a fragment.
    expect(() => client({ url: 'ws://127.0.0.1:1/sync?room=%23general' })).not.toThrow();
  });

  it('a url function returning one: the dial fails with a dial_error that says why', async () => {
    const { server } = await recordingServer();
    const reasons: string[] = [];
    const c = client({ url: () => `${wsUrl(server)}#frag`, timeout: 400 });
    c.failures$.subscribe((f) => {
      if (f.kind === 'dial_error') reasons.push(String(f.reason));
    });
    await eventually(() => reasons.length > 0, 5000, 'a dial_error');
    expect(reasons[0]).toMatch(/fragment/);
  });
});

describe('F3: clientId is checked against PROTOCOL §1', () => {
  it('isValidClientId: 1–128 visible ASCII characters', () => {
    for (const ok of ['a', 'x'.repeat(128), 'c-7f3a', VISIBLE_ASCII]) expect(isValidClientId(ok)).toBe(true);
    for (const bad of [
      '',
      // Not carried the same way by the socket URL and the X-Client-Id header (fetch trims
      // whitespace at either end; a header cannot hold characters above U+00FF).
      'mine ',
      ' mine',
      'mine\t',
      'mine\n',
      'mine\r\n',
      'a b',
      'é',
      '日本',
      '😀',
      'a\uD83D\uDE00b',
      '\u00a0x',
      'x\u0000',
      'x'.repeat(129),
      'abc\uD800',
      '\uD800abc',
      'abc\uDC00',
      '\uDC00',
      '\uDE00\uD83D',
      'a\uD800\uD800\uDC00x\uDC00',
      5,
      null,
      undefined,
    ])
      expect(isValidClientId(bad)).toBe(false);
  });

  it('createSyncClient refuses 129+ characters, whitespace, non-ASCII and lone surrogates with a TypeError naming the option', () => {
    const url = 'ws://127.0.0.1:1/sync';
    for (const bad of [
      'x'.repeat(129),
      'x'.repeat(5000),
      'abc\uD800',
      'abc\uDC00def',
      'mine ',
      ' mine\n',
      '日本',
    ])
      expect(() => client({ url, clientId: bad })).toThrow(
        /option clientId must be a string of 1–128 visible ASCII characters/,
      );
    expect(() => client({ url, clientId: 'x'.repeat(128) })).not.toThrow();
  });

  it('a 128-character clientId and every visible ASCII character reach the server as they are, over the socket and over HTTP', async () => {
    const { server, seen } = await recordingServer();
    const ids = ['x'.repeat(128), VISIBLE_ASCII];
    for (const id of ids) {
      const c = client({ url: wsUrl(server), clientId: id, timeout: 1000 });
      const r = await c.send({ k: `k-${id.length}` });
      expect(r.cid).toBe(id);
      await c.close();
    }
    for (const id of ids) {
      // No socket server there: the client works over HTTP (the X-Client-Id header).
      const c = client({
        url: 'ws://127.0.0.1:1/sync',
        httpUrl: httpUrl(server),
        clientId: id,
        timeout: 400,
      });
      const r = await c.send({ k: `h-${id.length}` });
      expect(r.cid).toBe(id);
      await c.close();
    }
    expect(seen).toEqual([...ids, ...ids]);
  });

  it('an invalid clientId in storage is not used: a new one is taken and stored', async () => {
    const { server, seen } = await recordingServer();
    for (const stored of ['y'.repeat(200), 'abc\uD800', '', 'mine ', ' mine\n', '日本']) {
      const storage = memoryStorage();
      storage.set('syncwire:clientId', stored);
      const c = client({ url: wsUrl(server), storage, timeout: 1000 });
      expect(c.clientId).not.toBe(stored);
      expect(isValidClientId(c.clientId)).toBe(true);
      expect(storage.get('syncwire:clientId')).toBe(c.clientId);
      const r = await c.send({ k: `s-${stored.length}` });
      expect(r.cid).toBe(c.clientId);
      await c.close();
    }
    // A valid stored one is still reused.
    const storage = memoryStorage();
    storage.set('syncwire:clientId', 'kept-id');
    const c = client({ url: wsUrl(server), storage });
    expect(c.clientId).toBe('kept-id');
    expect(seen.every(isValidClientId)).toBe(true);
  });
});
