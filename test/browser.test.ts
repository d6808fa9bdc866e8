/**
 * The playground and the visualizer in real Chromium (playwright-core driving Debian's
 * /usr/bin/chromium): the page loads clean, the live chart follows each client's state,
 * faults show up and heal, edits travel between clients (over HTTP when ACKs are dropped),
 * a late client replays history, the server restarts on its SQLite file, and a Node client
 * is watched through the relay. T = 300 ms. Writes test-artifacts/playground.png (and
 * docs/playground.png with SYNCWIRE_DOCS_SHOT=1).
 *
 * Under CI=true a missing Chromium fails; elsewhere the suite skips and says why.
 */
import { existsSync, mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { type Browser, chromium, type Page } from 'playwright-core';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import WebSocket from 'ws';
import { type Playground, startPlayground } from '../playground/server.js';
import { createSyncClient } from '../src/client/index.js';
import { createRelayInspector } from '../src/inspect/index.js';

/** What the page's `window.playground.clients` entries offer the tests. */
interface PlaygroundClient {
  pending: number;
  cursors(): Record<string, { seq?: number }>;
}

const CHROMIUM = process.env.CHROMIUM_PATH ?? '/usr/bin/chromium';
const IN_CI = process.env.CI === 'true' || process.env.CI === '1';
const HAVE_CHROMIUM = existsSync(CHROMIUM);
const T = 300;
/** Bound for anything that should happen within a few T. */
const SOON = 10_000;

if (!HAVE_CHROMIUM && !IN_CI) {
  console.warn(`[browser.test] skipped: no Chromium at ${CHROMIUM} (install chromium, or set CHROMIUM_PATH)`);
}

describe.skipIf(!HAVE_CHROMIUM && !IN_CI)('playground in Chromium', () => {
  let pg: Playground;
  let browser: Browser;
  let dataDir: string;
  const pages: Page[] = [];

  beforeAll(async () => {
    if (!HAVE_CHROMIUM)
      throw new Error(`CI=true and no Chromium at ${CHROMIUM}: the browser tests cannot run`);
    dataDir = mkdtempSync(join(tmpdir(), 'syncwire-playground-'));
    pg = await startPlayground({ port: 0, syncPort: 0, dataDir, timeout: T, log: () => {} });
    browser = await chromium.launch({
      executablePath: CHROMIUM,
      args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking'],
    });
  }, 120_000);

  afterEach(async () => {
    for (const p of pages.splice(0)) await p.close().catch(() => {});
  });

  afterAll(async () => {
    await browser?.close();
    await pg?.close();
    if (dataDir) rmSync(dataDir, { recursive: true, force: true });
  });

  /** A fresh playground tab, with its console errors and uncaught exceptions collected. */
  async function open(width = 1600) {
    const page = await browser.newPage({ viewport: { width, height: 1000 } });
    pages.push(page);
    const consoleErrors: string[] = [];
    const pageErrors: string[] = [];
    page.on('console', (m) => {
      if (m.type() === 'error') consoleErrors.push(m.text());
    });
    page.on('pageerror', (e) => pageErrors.push(String(e)));
    await page.goto(`${pg.url}?T=${T}`);
    return { page, consoleErrors, pageErrors };
  }

  const client = (page: Page, name: string) => page.locator(`[data-client="${name}"]`);
  /** The client's badge once it shows traffic moved to HTTP. */
  const degraded = (page: Page, name: string) =>
    client(page, name).locator(
      '[data-testid="state"][data-state="degraded"], [data-testid="state"][data-state="rePinging"]',
    );

  async function waitOpen(page: Page, name: string) {
    await client(page, name).locator('[data-testid="state"][data-state="open"]').waitFor({ timeout: SOON });
  }

  /** Item names unique in this run (the data directory is fresh per run). */
  let made = 0;
  const unique = (name: string) => `${name} ${++made}`;

  async function add(page: Page, name: string, text: string) {
    await client(page, name).locator('[data-testid="new-item"]').fill(text);
    await client(page, name).locator('[data-testid="add"]').click();
  }

  async function waitItem(page: Page, name: string, text: string) {
    await client(page, name)
      .locator('[data-testid="item"] .text', { hasText: new RegExp(`^${text}$`) })
      .waitFor({ timeout: SOON });
  }

  /** Flat states the client's badge has shown since its trail had `from` steps. */
  async function trailSince(page: Page, name: string, from: number): Promise<string[]> {
    const all = await client(page, name).locator('[data-testid="trail"] .trail-step').allTextContents();
    return all.slice(from);
  }

  it('loads with no console errors and draws both clients open', async () => {
    const { page, consoleErrors, pageErrors } = await open();
    await waitOpen(page, 'A');
    await waitOpen(page, 'B');
    // The chart is the machine's: one node per state node, the active ones lit.
    const chart = client(page, 'A').locator('svg.chart');
    await expect(chart.locator('[data-state="connection.awaitingAck"]').count()).resolves.toBe(1);
    await expect(chart.locator('[data-state="connection.degraded.socket.rePinging"]').count()).resolves.toBe(
      1,
    );
    await chart.locator('[data-state="connection.open"].active').waitFor({ timeout: SOON });
    expect(await chart.locator('[data-state="connection.degraded"].active').count()).toBe(0);
    // The first transition taken out of connecting is marked.
    expect(await chart.locator('.edge.hot, .edge.warm').count()).toBeGreaterThan(0);
    // The timeline saw the socket open and the SUB for the list.
    await client(page, 'A')
      .locator('tr[data-dir="out"][data-via="ws"][data-type="SUB"]')
      .first()
      .waitFor({ timeout: SOON });
    expect(pageErrors).toEqual([]);
    expect(consoleErrors).toEqual([]);
  });

  it('shows degraded (or connecting) when the socket is killed, then open again', async () => {
    const { page, pageErrors } = await open();
    await waitOpen(page, 'A');
    const before = (await trailSince(page, 'A', 0)).length;
    await client(page, 'A').locator('[data-action="kill-socket"]').click();
    await expect
      .poll(
        async () =>
          (await trailSince(page, 'A', before)).some((s) => /degraded|rePinging|connecting/.test(s)),
        {
          timeout: SOON,
        },
      )
      .toBe(true);
    await waitOpen(page, 'A');
    const trail = await trailSince(page, 'A', before);
    expect(trail.at(-1)).toBe('open');
    // The timeline says what happened: the socket closed, a failure was counted, a new one dialled.
    const a = client(page, 'A');
    await a
      .locator('tr[data-kind="socket"]', { hasText: /closed/ })
      .first()
      .waitFor({ timeout: SOON });
    await a.locator('tr[data-kind="failure"]').first().waitFor({ timeout: SOON });
    expect(pageErrors).toEqual([]);
  });

  it('shows an edit made in one client in the other', async () => {
    const { page, pageErrors } = await open();
    await waitOpen(page, 'A');
    await waitOpen(page, 'B');
    const text = unique('bread');
    await add(page, 'A', text);
    await waitItem(page, 'B', text);
    await waitItem(page, 'A', text);
    // B's cursor counter moved with the MSG.
    await expect
      .poll(async () => client(page, 'B').locator('[data-counter="cursors"]').textContent(), {
        timeout: SOON,
      })
      .toMatch(/list #\d+/);
    // Each panel shows the channel's subscription chart with its state lit (issue 11).
    for (const name of ['A', 'B']) {
      const row = client(page, name).locator('[data-testid="subscriptions"] tr[data-channel="list"]');
      await row.and(page.locator('[data-sub-state="subscribed"]')).waitFor({ timeout: SOON });
      expect(await row.locator('td.current').textContent()).toBe('subscribed');
      expect(await row.locator('td').allTextContents()).toEqual([
        'unsubscribed',
        'subscribing',
        'subscribed',
        'resetting',
        'refused',
      ]);
    }
    expect(pageErrors).toEqual([]);
  });

  it('with ACKs dropped, delivers the edit over HTTP', async () => {
    const { page, pageErrors } = await open();
    await waitOpen(page, 'A');
    await waitOpen(page, 'B');
    const a = client(page, 'A');
    await a.locator('[data-fault="dropAcks"]').click();
    // The keepalive PNG goes unanswered: the client moves its traffic to HTTP.
    await degraded(page, 'A').waitFor({ timeout: SOON });
    const text = unique('eggs');
    await add(page, 'A', text);
    await waitItem(page, 'B', text);
    await waitItem(page, 'A', text);
    // The SYN carrying it went out over HTTP, and its response came back on the same transport.
    const out = a.locator('tr[data-kind="frame"][data-dir="out"][data-via="http"][data-type="SYN"]').first();
    await out.waitFor({ timeout: SOON });
    const id = await out.getAttribute('data-id');
    expect(id).toBeTruthy();
    await a
      .locator(`tr[data-dir="in"][data-via="http"][data-type="SYN"][data-id="${id}"]`)
      .waitFor({ timeout: SOON });
    await a.locator('[data-fault="dropAcks"]').click();
    await waitOpen(page, 'A');
    expect(pageErrors).toEqual([]);
  });

  it('starts a client that joins late from the snapshot, then follows the changes', async () => {
    const { page, pageErrors } = await open();
    await waitOpen(page, 'A');
    const text = unique('cheese');
    await add(page, 'A', text);
    await waitItem(page, 'A', text);
    const count = await client(page, 'A').locator('[data-testid="item"]').count();
    await page.locator('[data-testid="join-late"]').click();
    await waitOpen(page, 'C');
    await waitItem(page, 'C', text);
    await expect
      .poll(() => client(page, 'C').locator('[data-testid="item"]').count(), { timeout: SOON })
      .toBe(count);
    await client(page, 'C')
      .locator('[data-testid="snapshot"]', { hasText: /snapshot at seq \d+/ })
      .waitFor({ timeout: SOON });
    // A change after the snapshot reaches C through the channel.
    const later = unique('after joining');
    await add(page, 'A', later);
    await waitItem(page, 'C', later);
    expect(pageErrors).toEqual([]);
  });

  it('two clients toggling the same item at the same moment: both lists end equal to the server', async () => {
    const { page, pageErrors } = await open();
    await waitOpen(page, 'A');
    await waitOpen(page, 'B');
    const text = unique('shared');
    await add(page, 'A', text);
    await waitItem(page, 'A', text);
    await waitItem(page, 'B', text);
    const id = await client(page, 'A')
      .locator('[data-testid="item"]', { has: page.locator('.text', { hasText: new RegExp(`^${text}$`) }) })
      .getAttribute('data-id');
    expect(id).toBeTruthy();
    const doneOf = (name: string) =>
      client(page, name).locator(`[data-testid="item"][data-id="${id}"]`).getAttribute('data-done');
    const listOf = (name: string) =>
      page.evaluate(
        (n) =>
          [...document.querySelectorAll(`[data-client="${n}"] [data-testid="item"]`)]
            .map((li) => `${li.getAttribute('data-id')}:${li.getAttribute('data-done')}`)
            .sort(),
        name,
      );
    for (let round = 0; round < 10; round++) {
      // Both checkboxes clicked in the same task: the two toggles race on the server.
      await page.evaluate((itemId) => {
        for (const n of ['A', 'B']) {
          document
            .querySelector<HTMLInputElement>(
              `[data-client="${n}"] [data-id="${itemId}"] [data-testid="toggle"]`,
            )
            ?.click();
        }
      }, id);
      // Both sends resolved (so each author's view holds its own toggle) and both clients at
      // the same seq (so each holds the other's too).
      await page.waitForFunction(
        () => {
          const { clients } = (
            window as unknown as { playground: { clients: Record<string, PlaygroundClient> } }
          ).playground;
          const a = clients.A!;
          const b = clients.B!;
          return a.pending === 0 && b.pending === 0 && a.cursors().list?.seq === b.cursors().list?.seq;
        },
        undefined,
        { timeout: SOON },
      );
      // Each round's two toggles cancel out on the server, and both lists show it.
      expect(String(pg.list().find((i) => i.id === id)?.done)).toBe('false');
      expect(await doneOf('A')).toBe('false');
      expect(await doneOf('B')).toBe('false');
    }
    const truth = pg
      .list()
      .map((i) => `${i.id}:${i.done}`)
      .sort();
    await expect.poll(() => listOf('A'), { timeout: SOON }).toEqual(truth);
    await expect.poll(() => listOf('B'), { timeout: SOON }).toEqual(truth);
    expect(pageErrors).toEqual([]);
  });

  it('restarts the server on the same SQLite file and port; clients come back and keep the list', async () => {
    const { page, pageErrors } = await open();
    await waitOpen(page, 'A');
    await waitOpen(page, 'B');
    const before = pg.list().length;
    const port = new URL(pg.syncUrl).port;
    const trailA = (await trailSince(page, 'A', 0)).length;
    await page.locator('[data-testid="restart-server"]').click();
    await page.locator('[data-testid="notice"]', { hasText: 'server restarted' }).waitFor({ timeout: SOON });
    expect(new URL(pg.syncUrl).port).toBe(port);
    expect(pg.list().length).toBe(before);
    await expect
      .poll(async () => (await trailSince(page, 'A', trailA)).some((s) => s !== 'open'), { timeout: SOON })
      .toBe(true);
    await waitOpen(page, 'A');
    await waitOpen(page, 'B');
    const text = unique('after restart');
    await add(page, 'B', text);
    await waitItem(page, 'A', text);
    expect(pageErrors).toEqual([]);
  });

  it('shows a Node client streaming through the relay on the visualizer page', async () => {
    const relay = createRelayInspector({ url: pg.relayUrl, WebSocket: WebSocket as never, retryMs: 100 });
    const node = createSyncClient({
      url: pg.syncUrl,
      clientId: `node-${Date.now()}`,
      timeout: T,
      WebSocket: WebSocket as never,
      channels: { list: { since: 0 } },
      inspect: relay.inspect,
    });
    try {
      const page = await browser.newPage({ viewport: { width: 1200, height: 900 } });
      pages.push(page);
      const pageErrors: string[] = [];
      page.on('pageerror', (e) => pageErrors.push(String(e)));
      await page.goto(pg.visualizerUrl);
      const panel = page.locator('.panel', {
        has: page.locator(`[data-testid="client-id"]`, { hasText: node.clientId }),
      });
      await panel.locator('[data-testid="state"][data-state="open"]').waitFor({ timeout: SOON });
      await node.send({ op: 'add', text: unique('from node') });
      await panel.locator('tr[data-dir="out"][data-type="SYN"]').first().waitFor({ timeout: SOON });
      await panel.locator('svg.chart [data-state="connection.open"].active').waitFor({ timeout: SOON });
      // The channel's state comes through the relay too, and follows the client's.
      await panel
        .locator('[data-testid="subscriptions"] tr[data-channel="list"][data-sub-state="subscribed"]')
        .waitFor({ timeout: SOON });
      await node.unsubscribe('list');
      await panel
        .locator('[data-testid="subscriptions"] tr[data-channel="list"][data-sub-state="unsubscribed"]')
        .waitFor({ timeout: SOON });
      expect(pageErrors).toEqual([]);
    } finally {
      await node.close();
      relay.stop();
    }
  });

  it('writes a screenshot of the playground', async () => {
    const { page, pageErrors } = await open(1600);
    await waitOpen(page, 'A');
    await waitOpen(page, 'B');
    for (const text of ['milk', 'coffee', 'apples']) {
      await add(page, 'A', text);
      await waitItem(page, 'B', text);
    }
    await page.locator('[data-testid="join-late"]').click();
    await waitOpen(page, 'C');
    for (const box of await page.locator('[data-testid="hide-pings"]').all()) await box.check();
    // B with its ACKs dropped: degraded, its edit carried over HTTP, drawn as such.
    await client(page, 'B').locator('[data-fault="dropAcks"]').click();
    await degraded(page, 'B').waitFor({ timeout: SOON });
    await add(page, 'B', 'butter');
    await waitItem(page, 'A', 'butter');
    await client(page, 'B')
      .locator('tr[data-dir="in"][data-via="http"][data-type="SYN"]')
      .first()
      .waitFor({ timeout: SOON });
    mkdirSync('test-artifacts', { recursive: true });
    const shot = await page.screenshot({ path: 'test-artifacts/playground.png', fullPage: true });
    expect(shot.byteLength).toBeGreaterThan(50_000);
    if (process.env.SYNCWIRE_DOCS_SHOT === '1') {
      // The README's picture: A and B side by side (C, below them, makes the page very tall).
      const boxes = await Promise.all(['A', 'B'].map((n) => client(page, n).boundingBox()));
      const bottom = Math.max(...boxes.map((b) => (b ? b.y + b.height : 0)));
      mkdirSync('docs', { recursive: true });
      await page.screenshot({
        path: 'docs/playground.png',
        fullPage: true,
        clip: { x: 0, y: 0, width: 1600, height: Math.ceil(bottom + 12) },
      });
    }
    expect(pageErrors).toEqual([]);
  });
});
