/**
 * What the Chromium suites that drive the client inside a page share (test/browser-signals,
 * test/cursor-reload): the real client source bundled by esbuild into an IIFE that puts the
 * named exports of `src/client/index.ts` on `globalThis`, a page on 127.0.0.1 loading it, a
 * reference server allowing that page's origin (another port: a cross-origin page it must
 * allow), and headless Chromium (playwright-core).
 */
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { type Browser, chromium } from 'playwright-core';
import { createSyncServer, type SyncServer } from '../../src/server/index.js';

export const CHROMIUM = process.env.CHROMIUM_PATH ?? '/usr/bin/chromium';

export interface ClientPage {
  /** The page's URL (loads the bundled client). */
  pageUrl: string;
  sync: SyncServer;
  browser: Browser;
  close(): Promise<void>;
}

/** Serve a page exposing `exports` of the client (e.g. `['createSyncClient']`) as globals. */
export async function clientPage(exports: string[], title: string): Promise<ClientPage> {
  const root = join(import.meta.dirname, '..', '..');
  const { build } = await import('esbuild');
  const out = await build({
    stdin: {
      contents: `import { ${exports.join(', ')} } from ${JSON.stringify(join(root, 'src/client/index.ts'))};
        ${exports.map((e) => `globalThis.${e} = ${e};`).join('\n')}`,
      resolveDir: root,
      loader: 'ts',
    },
    bundle: true,
    platform: 'browser',
    format: 'iife',
    write: false,
    logLevel: 'silent',
  });
  const js = out.outputFiles[0]!.text;
  const pages = createServer((req, res) => {
    if (req.url === '/client.js') res.writeHead(200, { 'content-type': 'text/javascript' }).end(js);
    else
      res
        .writeHead(200, { 'content-type': 'text/html' })
        .end(`<!doctype html><title>${title}</title><script src="/client.js"></script>`);
  });
  await new Promise<void>((r) => pages.listen(0, '127.0.0.1', r));
  const pageUrl = `http://127.0.0.1:${(pages.address() as AddressInfo).port}/`;
  const sync = await createSyncServer({
    port: 0,
    onSync: (ops) => ops.map(() => ({})),
    allowedOrigins: [new URL(pageUrl).origin],
  });
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking'],
  });
  return {
    pageUrl,
    sync,
    browser,
    close: async () => {
      await browser.close();
      await new Promise<void>((r) => pages.close(() => r()));
      await sync.close();
    },
  };
}
