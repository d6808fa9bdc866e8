/**
 * Tabs, reloads and the durable outbox in real Chromium (playwright-core, /usr/bin/chromium):
 * pages of one origin load a bundle of the client (esbuild) from a small HTTP server and use
 * `webStorage()` (identity in sessionStorage, outbox in IndexedDB, Web Locks). The sync server
 * is the harness's real one, with a ledger of applications; a page is made "offline" by giving
 * it its own proxy that refuses sockets and cuts every HTTP request. T = 300 ms.
 *
 * Under CI=true a missing Chromium fails; elsewhere the suite skips and says why.
 */
import { existsSync } from 'node:fs';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { fileURLToPath } from 'node:url';
import { build } from 'esbuild';
import { type Browser, type BrowserContext, chromium, type Page } from 'playwright-core';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { appliedOnce, type Rig, rig, until } from './helpers/harness.js';
import { type Proxy as LoopbackProxy, startProxy } from './helpers/proxy.js';

const CHROMIUM = process.env.CHROMIUM_PATH ?? '/usr/bin/chromium';
const IN_CI = process.env.CI === 'true' || process.env.CI === '1';
const HAVE_CHROMIUM = existsSync(CHROMIUM);
const SOON = 15_000;
const ROOT = fileURLToPath(new URL('..', import.meta.url));

if (!HAVE_CHROMIUM && !IN_CI) {
  console.warn(`[tabs.test] skipped: no Chromium at ${CHROMIUM} (install chromium, or set CHROMIUM_PATH)`);
}

/** The app every page runs: one client on webStorage(), subscribed to `notes`. */
const PAGE = `<!doctype html><meta charset="utf-8"><script src="/bundle.js"></script><script>
const q = new URLSearchParams(location.search);
const { createSyncClient, webStorage } = window.syncwire;
const client = createSyncClient({
  url: q.get('ws'), httpUrl: q.get('http'), timeout: 300,
  storage: webStorage(), channels: { notes: {} },
});
window.app = { client, restored: [], messages: [], failures: [] };
client.restored$.subscribe((r) => app.restored.push({ id: r.id, clientId: r.clientId, op: r.op, result: r.result, error: r.error && r.error.code }));
client.messages$.subscribe((m) => app.messages.push(m.payload));
client.failures$.subscribe((f) => app.failures.push(f.kind));
/** Operations of this client in IndexedDB. */
app.stored = () => new Promise((resolve, reject) => {
  const open = indexedDB.open('syncwire');
  open.onerror = () => reject(open.error);
  open.onsuccess = () => {
    const db = open.result;
    if (!db.objectStoreNames.contains('ops')) { db.close(); return resolve(0); }
    const req = db.transaction('ops').objectStore('ops').index('clientId').count(client.clientId);
    req.onsuccess = () => { db.close(); resolve(req.result); };
    req.onerror = () => reject(req.error);
  };
});
</script>`;

describe.skipIf(!HAVE_CHROMIUM && !IN_CI)('tabs, reloads and the outbox in Chromium', () => {
  let browser: Browser;
  let web: Server;
  let origin: string;
  let r: Rig;
  const contexts: BrowserContext[] = [];
  const proxies: LoopbackProxy[] = [];
  let made = 0;
  const unique = (name: string) => `${name}-${++made}`;

  beforeAll(async () => {
    if (!HAVE_CHROMIUM)
      throw new Error(`CI=true and no Chromium at ${CHROMIUM}: the browser tests cannot run`);
    const bundle = await build({
      stdin: {
        contents:
          "import { createSyncClient, webStorage } from './src/client/index.ts'; window.syncwire = { createSyncClient, webStorage };",
        resolveDir: ROOT,
        loader: 'ts',
      },
      absWorkingDir: ROOT,
      bundle: true,
      platform: 'browser',
      format: 'iife',
      target: 'es2020',
      write: false,
      logLevel: 'silent',
    });
    const js = bundle.outputFiles[0]!.text;
    web = createServer((req, res) => {
      if (req.url?.startsWith('/blank')) {
        res.writeHead(200, { 'content-type': 'text/html' });
        res.end('<!doctype html><title>blank</title>');
      } else if (req.url?.startsWith('/bundle.js')) {
        res.writeHead(200, { 'content-type': 'text/javascript' });
        res.end(js);
      } else {
        res.writeHead(200, { 'content-type': 'text/html' });
        res.end(PAGE);
      }
    });
    await new Promise<void>((resolve) => web.listen(0, '127.0.0.1', resolve));
    origin = `http://127.0.0.1:${(web.address() as AddressInfo).port}`;
    r = await rig({
      // The harness's ledger, and each operation published on `notes` (echo-suppressed to its author).
      onSync: async (ops, ctx) => {
        const ids = ops.map((o) => String((o as { id: string }).id));
        r.ledger.batches.push(ids);
        for (const id of ids) {
          r.ledger.applied.set(id, (r.ledger.applied.get(id) ?? 0) + 1);
          await ctx.publish('notes', { id });
        }
        return ids.map((id) => ({ id, successes: [id] }));
      },
    });
    browser = await chromium.launch({
      executablePath: CHROMIUM,
      args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking'],
    });
  }, 120_000);

  afterEach(async () => {
    for (const c of contexts.splice(0)) await c.close().catch(() => {});
    for (const p of proxies.splice(0)) await p.close().catch(() => {});
  });

  afterAll(async () => {
    await browser?.close();
    await r?.close();
    await new Promise((resolve) => web?.close(resolve));
  });

  /** A fresh browser profile (its own IndexedDB, storage and locks). */
  async function profile() {
    const c = await browser.newContext();
    contexts.push(c);
    return c;
  }

  /** A proxy of its own for one page, to take that page offline and back. */
  async function ownProxy() {
    const p = await startProxy(r.server.address());
    proxies.push(p);
    return p;
  }
  const offline = (p: LoopbackProxy) => {
    p.refuse = true;
    p.httpScript = Array.from({ length: 100_000 }, () => 'network' as const);
    p.kill();
  };
  const online = (p: LoopbackProxy) => {
    p.refuse = false;
    p.httpScript = [];
  };

  async function tab(ctx: BrowserContext, via: LoopbackProxy = r.proxy): Promise<Page> {
    const page = await ctx.newPage();
    const errors: string[] = [];
    page.on('pageerror', (e) => errors.push(String(e)));
    (page as Page & { errors?: string[] }).errors = errors;
    await page.goto(`${origin}/?ws=${encodeURIComponent(via.wsUrl)}&http=${encodeURIComponent(via.httpUrl)}`);
    await page.waitForFunction(() => (window as any).app?.client, null, { timeout: SOON });
    return page;
  }
  const waitOpen = (page: Page) =>
    page.waitForFunction(() => (window as any).app.client.state === 'open', null, { timeout: SOON });
  const clientIdOf = (page: Page) => page.evaluate(() => (window as any).app.client.clientId as string);
  const send = (page: Page, id: string) =>
    page.evaluate((id) => (window as any).app.client.send({ id }), id) as Promise<unknown>;
  const sendLater = (page: Page, ids: string[]) =>
    page.evaluate((ids) => {
      for (const id of ids) (window as any).app.client.send({ id }).catch(() => {});
    }, ids);
  const stored = (page: Page) => page.evaluate(() => (window as any).app.stored() as Promise<number>);

  it('two tabs: separate clients, each edit applied once with its own result, each sees the other', async () => {
    const ctx = await profile();
    const a = await tab(ctx);
    const b = await tab(ctx);
    await Promise.all([waitOpen(a), waitOpen(b)]);
    expect(await clientIdOf(a)).not.toBe(await clientIdOf(b));
    const [x, y] = [unique('tabA'), unique('tabB')];
    expect(await send(a, x)).toEqual({ id: x, successes: [x] });
    expect(await send(b, y)).toEqual({ id: y, successes: [y] });
    appliedOnce(r.ledger, [x, y]);
    await a.waitForFunction((y) => (window as any).app.messages.some((m: any) => m?.id === y), y, {
      timeout: SOON,
    });
    await b.waitForFunction((x) => (window as any).app.messages.some((m: any) => m?.id === x), x, {
      timeout: SOON,
    });
  });

  it('a duplicated tab (sessionStorage copied) becomes a client of its own while the original lives', async () => {
    const ctx = await profile();
    const a = await tab(ctx);
    await waitOpen(a);
    const id = await clientIdOf(a);
    // What "Duplicate tab" does: a new tab whose sessionStorage is a copy of the original's.
    const b = await ctx.newPage();
    await b.goto(`${origin}/blank`);
    await b.evaluate((id) => sessionStorage.setItem('syncwire:clientId', id), id);
    await b.goto(
      `${origin}/?ws=${encodeURIComponent(r.proxy.wsUrl)}&http=${encodeURIComponent(r.proxy.httpUrl)}`,
    );
    await b.waitForFunction(() => (window as any).app?.client, null, { timeout: SOON });
    await waitOpen(b);
    expect(await clientIdOf(b)).not.toBe(id);
    const [x, y] = [unique('orig'), unique('dup')];
    expect(await send(a, x)).toEqual({ id: x, successes: [x] });
    expect(await send(b, y)).toEqual({ id: y, successes: [y] });
    appliedOnce(r.ledger, [x, y]);
  });

  it('a reloaded tab keeps its identity (also with another tab waiting for its lock) and its next edit is applied once with its own result', async () => {
    const ctx = await profile();
    const a = await tab(ctx);
    await waitOpen(a);
    // A second live tab of the app, which waits for the first one's lock (orphan watch).
    const other = await tab(ctx);
    await waitOpen(other);
    const id = await clientIdOf(a);
    const [x, y] = [unique('before-reload'), unique('after-reload')];
    expect(await send(a, x)).toEqual({ id: x, successes: [x] });
    await a.reload();
    await a.waitForFunction(() => (window as any).app?.client, null, { timeout: SOON });
    await waitOpen(a);
    expect(await clientIdOf(a)).toBe(id);
    expect(await send(a, y)).toEqual({ id: y, successes: [y] });
    appliedOnce(r.ledger, [x, y]);
  });

  it('edits made offline survive a reload made offline; back online they are applied once, results on restored$', async () => {
    const ctx = await profile();
    const p = await ownProxy();
    const a = await tab(ctx, p);
    await waitOpen(a);
    const id = await clientIdOf(a);
    offline(p);
    await a.waitForFunction(() => (window as any).app.client.state !== 'open', null, { timeout: SOON });
    const ops = [unique('offline'), unique('offline'), unique('offline')];
    await sendLater(a, ops);
    await expect.poll(() => stored(a), { timeout: SOON }).toBe(3);
    await a.reload();
    await a.waitForFunction(() => (window as any).app?.client, null, { timeout: SOON });
    expect(await a.evaluate(() => (window as any).app.client.loaded)).toBe(3);
    expect(await clientIdOf(a)).toBe(id);
    online(p);
    await a.waitForFunction(() => (window as any).app.restored.length === 3, null, { timeout: SOON });
    const restored = await a.evaluate(() => (window as any).app.restored);
    expect(restored.map((x: { result: unknown }) => x.result)).toEqual(
      ops.map((o) => ({ id: o, successes: [o] })),
    );
    appliedOnce(r.ledger, ops);
    await expect.poll(() => stored(a), { timeout: SOON }).toBe(0);
  });

  it('edits changed after send() (same tick, and once stored) and restored by a reload: sent as send() accepted them', async () => {
    const ctx = await profile();
    const p = await ownProxy();
    const a = await tab(ctx, p);
    await waitOpen(a);
    offline(p);
    await a.waitForFunction(() => (window as any).app.client.state !== 'open', null, { timeout: SOON });
    const now = [unique('mutnow'), unique('mutnow')];
    const later = [unique('mutlater'), unique('mutlater')];
    // Changed in the tick of send(), before the outbox's IndexedDB write.
    await a.evaluate((ids) => {
      for (const id of ids) {
        const op = { id };
        (window as any).app.client.send(op).catch(() => {});
        op.id = `${id}-MUT`;
      }
    }, now);
    await a.evaluate((ids) => {
      (window as any).kept = ids.map((id) => {
        const op = { id };
        (window as any).app.client.send(op).catch(() => {});
        return op;
      });
    }, later);
    await expect.poll(() => stored(a), { timeout: SOON }).toBe(4);
    // Changed once stored.
    await a.evaluate(() => {
      for (const op of (window as any).kept) op.id = `${op.id}-MUT`;
    });
    await a.reload();
    await a.waitForFunction(() => (window as any).app?.client, null, { timeout: SOON });
    expect(await a.evaluate(() => (window as any).app.client.loaded)).toBe(4);
    online(p);
    await a.waitForFunction(() => (window as any).app.restored.length === 4, null, { timeout: SOON });
    const restored = await a.evaluate(() => (window as any).app.restored);
    const all = [...now, ...later];
    expect(restored.map((x: { op: unknown }) => x.op)).toEqual(all.map((id) => ({ id })));
    expect(restored.map((x: { result: unknown }) => x.result)).toEqual(
      all.map((o) => ({ id: o, successes: [o] })),
    );
    appliedOnce(r.ledger, all);
    for (const id of all) expect(r.ledger.applied.has(`${id}-MUT`)).toBe(false);
  });

  it('a tab closed with unsent edits: another live tab of the app flushes them, each applied once', async () => {
    const ctx = await profile();
    const b = await tab(ctx);
    await waitOpen(b);
    const p = await ownProxy();
    const a = await tab(ctx, p);
    await waitOpen(a);
    const orphan = await clientIdOf(a);
    offline(p);
    await a.waitForFunction(() => (window as any).app.client.state !== 'open', null, { timeout: SOON });
    const ops = [unique('orphan'), unique('orphan')];
    await sendLater(a, ops);
    await expect.poll(() => stored(a), { timeout: SOON }).toBe(2);
    await a.close();
    await b.waitForFunction(() => (window as any).app.restored.length === 2, null, { timeout: SOON });
    const restored = await b.evaluate(() => (window as any).app.restored);
    expect(restored.map((x: { clientId: string }) => x.clientId)).toEqual([orphan, orphan]);
    expect(restored.map((x: { result: unknown }) => x.result)).toEqual(
      ops.map((o) => ({ id: o, successes: [o] })),
    );
    appliedOnce(r.ledger, ops);
    await until(() => ops.every((o) => r.ledger.applied.get(o) === 1), SOON, 'applied');
  });
});
