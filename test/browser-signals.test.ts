/**
 * The browser's own signals drive the client as documented (README "Network and tab
 * signals", PROTOCOL §4), in real Chromium (playwright-core, Debian's /usr/bin/chromium):
 *
 * - `context.setOffline(true)`: the `offline` event reaches the chart (`NETWORK_OFFLINE`); a
 *   socket that goes down then waits in `degraded.socket.offline`, with no redial timer;
 * - `context.setOffline(false)`: `online` → `NETWORK_ONLINE` → `dialling` at once (no backoff
 *   wait), and the client is open again;
 * - a tab hidden then shown: `visibilitychange` → `VISIBLE` → a `PNG` at once (`open.pinging`),
 *   not at the next keepalive (T = 60 s here, so only the signal can explain it). Headless
 *   Chromium never changes `document.visibilityState`, so that one property is emulated and
 *   the real `visibilitychange` event dispatched to the client's own listener.
 *
 * The client is the real package source bundled by esbuild into a page, against a real
 * reference server on 127.0.0.1. Under CI=true a missing Chromium fails; elsewhere it skips.
 */
import { existsSync } from 'node:fs';
import type { Browser, BrowserContext, Page } from 'playwright-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { SyncServer } from '../src/server/index.js';
import { CHROMIUM, type ClientPage, clientPage } from './helpers/client-page.js';

const IN_CI = process.env.CI === 'true' || process.env.CI === '1';
const HAVE_CHROMIUM = existsSync(CHROMIUM);
const SOON = 10_000;

/** What the page records: every event the actor got, with the state it led to. */
interface Step {
  event: string;
  value: unknown;
}

describe.skipIf(!HAVE_CHROMIUM && !IN_CI)('browser signals in Chromium', () => {
  let sync: SyncServer;
  let browser: Browser;
  let pageUrl: string;

  let setup: ClientPage | undefined;
  beforeAll(async () => {
    if (!HAVE_CHROMIUM) throw new Error(`CI=true and no Chromium at ${CHROMIUM}`);
    setup = await clientPage(['createSyncClient'], 'signals');
    ({ sync, browser, pageUrl } = setup);
  }, 120_000);

  afterAll(async () => {
    await setup?.close();
  });

  /** A page running one client with T = 60 s, recording every event and the state after it. */
  async function start(): Promise<{ context: BrowserContext; page: Page }> {
    const context = await browser.newContext();
    const page = await context.newPage();
    await page.goto(pageUrl);
    const { port } = sync.address();
    await page.evaluate((url) => {
      const w = globalThis as unknown as Record<string, unknown>;
      const steps: Step[] = [];
      w.steps = steps;
      const client = (
        w.createSyncClient as (o: unknown) => {
          actor: { subscribe(f: (s: { value: unknown }) => void): void };
          state: string;
          debug: { killSocket(): boolean };
        }
      )({
        url,
        timeout: 60_000,
        inspect: (ev: { type: string; event?: { type: string }; actorRef?: unknown }) => {
          if (ev.type === '@xstate.event' && ev.actorRef === w.actorRef) {
            steps.push({ event: ev.event!.type, value: null });
          }
        },
      });
      w.client = client;
      w.actorRef = (client as unknown as { actor: unknown }).actor;
      client.actor.subscribe((s) => {
        const last = steps.at(-1);
        if (last && last.value === null) last.value = s.value;
      });
    }, `ws://127.0.0.1:${port}/sync`);
    await page.waitForFunction(
      () => (globalThis as unknown as { client: { state: string } }).client.state === 'open',
      null,
      {
        timeout: SOON,
      },
    );
    return { context, page };
  }

  const steps = (page: Page) => page.evaluate(() => (globalThis as unknown as { steps: Step[] }).steps);
  const stateValue = (page: Page) =>
    page.evaluate(() =>
      JSON.stringify(
        (
          globalThis as unknown as { client: { actor: { getSnapshot(): { value: unknown } } } }
        ).client.actor.getSnapshot().value,
      ),
    );

  it('offline stops dialling; online redials at once and the client is open again', async () => {
    const { context, page } = await start();
    await context.setOffline(true);
    await page.waitForFunction(() => navigator.onLine === false, null, { timeout: SOON });
    // Whether or not Chromium cut the socket, take it down: the client must not redial.
    await page.evaluate(() =>
      (globalThis as unknown as { client: { debug: { killSocket(): boolean } } }).client.debug.killSocket(),
    );
    await page.waitForFunction(
      () =>
        JSON.stringify(
          (
            globalThis as unknown as { client: { actor: { getSnapshot(): { value: unknown } } } }
          ).client.actor.getSnapshot().value,
        ).includes('"socket":"offline"'),
      null,
      { timeout: SOON },
    );
    expect(await stateValue(page)).toContain('"socket":"offline"');
    const offlineSteps = await steps(page);
    expect(offlineSteps.map((s) => s.event)).toContain('NETWORK_OFFLINE');

    await context.setOffline(false);
    await page.waitForFunction(
      () => (globalThis as unknown as { client: { state: string } }).client.state === 'open',
      null,
      {
        timeout: SOON,
      },
    );
    const all = await steps(page);
    const i = all.findIndex((s) => s.event === 'NETWORK_ONLINE');
    expect(i, JSON.stringify(all.map((s) => s.event))).toBeGreaterThan(-1);
    // The online event itself started the dial (no backoff timer in between).
    expect(JSON.stringify(all[i]!.value)).toContain('"socket":"dialling"');
    await context.close();
  }, 60_000);

  it('a hidden tab that becomes visible pings its socket at once', async () => {
    const { context, page } = await start();
    // Headless Chromium never changes document.visibilityState (background tabs, minimised
    // windows and CDP lifecycle states all stay "visible"; tried), so the page's visibility is
    // emulated: the property is overridden and the real DOM event dispatched to the client's
    // real listener.
    const setVisibility = (state: 'hidden' | 'visible') =>
      page.evaluate((v) => {
        Object.defineProperty(document, 'visibilityState', { configurable: true, get: () => v });
        document.dispatchEvent(new Event('visibilitychange'));
      }, state);
    await setVisibility('hidden');
    // Hidden is not a signal: nothing reaches the chart.
    expect((await steps(page)).some((s) => s.event === 'VISIBLE')).toBe(false);
    await setVisibility('visible');
    await page.waitForFunction(
      () => (globalThis as unknown as { steps: Step[] }).steps.some((s) => s.event === 'VISIBLE'),
      null,
      { timeout: SOON },
    );
    const all = await steps(page);
    const v = all.find((s) => s.event === 'VISIBLE')!;
    expect(v.value).toEqual({ open: 'pinging' });
    // And the server answered that ping: back to idle, open.
    await page.waitForFunction(
      () =>
        (globalThis as unknown as { steps: Step[] }).steps.some(
          (s, i, a) => i > a.findIndex((x) => x.event === 'VISIBLE') && s.event === 'FRAME',
        ),
      null,
      { timeout: SOON },
    );
    expect(await stateValue(page)).toBe(JSON.stringify({ open: 'idle' }));
    await context.close();
  }, 60_000);
});
