/**
 * S6D item 1, the reload: a page reload does not call `close()`, so the cursor write waiting
 * for its turn (paced when the storage is slow: FIX14E F6) died with the page, and the reloaded
 * page resumed from an older cursor: the messages after it came again (duplicates). The client
 * now writes the pending cursor on `pagehide` and when the page becomes hidden.
 *
 * Real Chromium (playwright-core, /usr/bin/chromium), the real package source bundled by
 * esbuild into a page, `webStorage()` over the tab's real `sessionStorage` behind a `setItem`
 * that takes SLOW_MS for the cursors (a slow storage stand-in), a real reference server on
 * 127.0.0.1. Headless Chromium never changes `document.visibilityState`, so for the hidden
 * case that property is emulated and the real `visibilitychange` event dispatched (as in
 * test/browser-signals.test.ts). Under CI=true a missing Chromium fails; elsewhere it skips.
 */
import { existsSync } from 'node:fs';
import type { Browser, Page } from 'playwright-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { SyncServer } from '../src/server/index.js';
import { CHROMIUM, type ClientPage, clientPage } from './helpers/client-page.js';

const IN_CI = process.env.CI === 'true' || process.env.CI === '1';
const HAVE_CHROMIUM = existsSync(CHROMIUM);
const SOON = 10_000;
const SLOW_MS = 40;

type W = {
  seen: number[];
  client: { subscribe(ch: string): Promise<unknown> };
};

describe.skipIf(!HAVE_CHROMIUM && !IN_CI)('the pending cursor write survives a reload (Chromium)', () => {
  let sync: SyncServer;
  let browser: Browser;
  let pageUrl: string;

  let setup: ClientPage | undefined;
  beforeAll(async () => {
    if (!HAVE_CHROMIUM) throw new Error(`CI=true and no Chromium at ${CHROMIUM}`);
    setup = await clientPage(['createSyncClient', 'webStorage'], 'reload');
    ({ sync, browser, pageUrl } = setup);
  }, 120_000);

  afterAll(async () => {
    await setup?.close();
  });

  /** In the page: a client on the slow sessionStorage, subscribed to `ch`, recording seqs. */
  async function boot(page: Page) {
    const { port } = sync.address();
    await page.evaluate(
      async ({ url, slowMs }) => {
        const w = globalThis as unknown as Record<string, unknown>;
        const slow = {
          getItem: (k: string) => sessionStorage.getItem(k),
          setItem: (k: string, v: string) => {
            if (k.endsWith(':cursors')) {
              const end = performance.now() + slowMs;
              while (performance.now() < end) {
                // a slow storage
              }
            }
            sessionStorage.setItem(k, v);
          },
        };
        const client = (w.createSyncClient as (o: unknown) => W['client'] & Record<string, any>)({
          url,
          timeout: 60_000,
          storage: (w.webStorage as (s: unknown, o: unknown) => unknown)(slow, { outbox: false }),
        });
        const seen: number[] = [];
        w.seen = seen;
        w.client = client;
        client.messages$.subscribe((m: { channel: string; seq: number }) => {
          if (m.channel === 'ch') seen.push(m.seq);
        });
        await client.subscribe('ch');
      },
      { url: `ws://127.0.0.1:${port}/sync`, slowMs: SLOW_MS },
    );
  }

  const seen = (page: Page) => page.evaluate(() => (globalThis as unknown as W).seen);
  const stored = (page: Page) =>
    page.evaluate(
      () =>
        (JSON.parse(sessionStorage.getItem('syncwire:cursors') ?? '{}') as Record<string, { seq?: number }>)
          .ch?.seq,
    );
  const waitSeen = (page: Page, seq: number) =>
    page.waitForFunction((s) => (globalThis as unknown as W).seen.includes(s), seq, { timeout: SOON });

  /** Seq 1 written (slowly), seq 2 delivered with its write waiting for the throttle. */
  async function twoMessages(page: Page, channel: string) {
    await sync.publish(channel, { changes: [1] });
    await waitSeen(page, 1);
    await page.waitForFunction(
      () =>
        (JSON.parse(sessionStorage.getItem('syncwire:cursors') ?? '{}') as Record<string, { seq?: number }>)
          .ch?.seq === 1,
      null,
      { timeout: SOON },
    );
    await sync.publish(channel, { changes: [2] });
    await waitSeen(page, 2);
  }

  it('reload right after a message: the reloaded page resumes after it (no duplicate)', async () => {
    const context = await browser.newContext();
    const page = await context.newPage();
    await page.goto(pageUrl);
    await boot(page);
    await twoMessages(page, 'ch');
    // The write of seq 2 is waiting (9 × 40 ms): the case at hand.
    expect(await stored(page)).toBe(1);
    await page.reload();
    expect(await stored(page), 'written on pagehide').toBe(2);
    await boot(page);
    await sync.publish('ch', { changes: [3] });
    await waitSeen(page, 3);
    expect(await seen(page)).toEqual([3]);
    await context.close();
  }, 60_000);

  it('a page becoming hidden writes the pending cursor at once', async () => {
    const context = await browser.newContext();
    const page = await context.newPage();
    await page.goto(pageUrl);
    await boot(page);
    const head = (await sync.publish('ch', { changes: ['h'] })).seq;
    await waitSeen(page, head);
    await sync.publish('ch', { changes: [head + 1] });
    await waitSeen(page, head + 1);
    // The write of head + 1 is waiting for the throttle (the case at hand).
    expect(await stored(page)).not.toBe(head + 1);
    await page.evaluate(() => {
      Object.defineProperty(document, 'visibilityState', { configurable: true, get: () => 'hidden' });
      document.dispatchEvent(new Event('visibilitychange'));
    });
    // Read in the same turn as nothing else: the write happened inside the event.
    expect(await stored(page)).toBe(head + 1);
    await context.close();
  }, 60_000);
});
