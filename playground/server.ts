/**
 * The playground's server side: the reference syncwire server with the SQLite store (the
 * shared list app), plus a small HTTP server for the pages, the admin endpoint that restarts
 * the sync server, and the inspection relay for clients in other processes.
 *
 * Two ports on purpose: restarting the sync server must look like a real outage to the
 * clients (refused connections, a closed socket) while the page itself stays up.
 *
 * `npm start` runs this through playground/start.mjs; the browser tests start it in-process.
 */
import { existsSync, mkdirSync, readFileSync, statSync } from 'node:fs';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { extname, join, normalize, resolve, sep } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createInspectRelay, type InspectRelay } from '../src/inspect/index.js';
import { statelyBridgePage } from '../src/inspect/relay.js';
import { randomId } from '../src/protocol/index.js';
import { createSyncServer, type SyncServer } from '../src/server/index.js';
import { sqliteStore } from '../src/stores/sqlite.js';

const HERE = fileURLToPath(new URL('.', import.meta.url));
const DIST = resolve(HERE, '../visualizer/dist');
const VITE_CONFIG = resolve(HERE, '../visualizer/vite.config.ts');

export interface PlaygroundOptions {
  /** Port of the pages, the admin endpoint and the relay; 0 picks a free one. @default 4300 */
  port?: number;
  /** Port of the sync server; 0 picks a free one (kept across restarts). @default 4301 */
  syncPort?: number;
  /** Interface to bind both servers to. @default '127.0.0.1' */
  host?: string;
  /** Folder of the SQLite file (`playground.db`). @default './.data' */
  dataDir?: string;
  /** The timeout T the page gives its clients, in ms; `?T=` in the page overrides it. @default 2000 (the playground shows faults within seconds; the client's own default is 15000) */
  timeout?: number;
  /** Build the pages with Vite before serving (skip only when visualizer/dist is fresh). @default true */
  build?: boolean;
  /** Where progress lines go. @default console.log */
  log?: (line: string) => void;
}

export interface Playground {
  /** The playground page. */
  readonly url: string;
  /** The relay visualizer page (for Node clients streaming to `relayUrl`). */
  readonly visualizerUrl: string;
  /** The sync server's WebSocket URL. */
  readonly syncUrl: string;
  /** The inspection relay, for `createRelayInspector({ url })`. */
  readonly relayUrl: string;
  /** The SQLite file. */
  readonly dbFile: string;
  /** Close the sync server and start it again on the same port and file. */
  restartSync(): Promise<{ ms: number }>;
  /** The server-side list, as rebuilt from history and kept by onSync. */
  list(): ListItem[];
  close(): Promise<void>;
}

export interface ListItem {
  id: string;
  text: string;
  done: boolean;
}

/** Operations the list app sends. */
export type ListOp =
  | { op: 'add'; text: string }
  | { op: 'remove'; id: string }
  | { op: 'toggle'; id: string };
/**
 * One change of the list, state-assigning (docs/consistency.md): the item's new value, or
 * `null` for its deletion. The channel `list` carries `{ changes: ListChange[] }`.
 */
export type ListChange = { id: string; value: ListItem | null };

const MIME: Record<string, string> = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.svg': 'image/svg+xml',
  '.png': 'image/png',
  '.json': 'application/json',
  '.map': 'application/json',
};

/** Build the pages into visualizer/dist (a few seconds; elkjs is most of it). */
export async function buildPages(): Promise<void> {
  const { build } = await import('vite');
  await build({ configFile: VITE_CONFIG, logLevel: 'warn' });
}

function listen(server: Server, port: number, host: string): Promise<number> {
  return new Promise((resolvePort, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => {
      server.off('error', reject);
      const a = server.address();
      resolvePort(a && typeof a === 'object' ? a.port : port);
    });
  });
}

export async function startPlayground(options: PlaygroundOptions = {}): Promise<Playground> {
  const host = options.host ?? '127.0.0.1';
  const log = options.log ?? ((line: string) => console.log(line));
  const timeout = options.timeout ?? 2000;
  const dataDir = resolve(options.dataDir ?? '.data');
  mkdirSync(dataDir, { recursive: true });
  const dbFile = join(dataDir, 'playground.db');

  if (options.build ?? true) await buildPages();
  if (!existsSync(join(DIST, 'playground', 'index.html'))) {
    throw new Error(`playground: ${DIST} has no build; start with build: true`);
  }

  // ---- the list app: state rebuilt from the channel's history, so it survives restarts ----
  const items = new Map<string, ListItem>();
  const applyChange = (c: ListChange) => {
    if (c.value) items.set(c.id, c.value);
    else items.delete(c.id);
  };
  /** History entries of this shape only (a data dir from an older playground is skipped). */
  const changesOf = (payload: unknown): ListChange[] => {
    const list = (payload as { changes?: unknown } | null)?.changes;
    return Array.isArray(list)
      ? list.filter((c): c is ListChange => typeof c?.id === 'string' && c.value !== undefined)
      : [];
  };

  let sync: SyncServer | null = null;
  let syncPort = options.syncPort ?? 4301;
  const startSync = async () => {
    const store = sqliteStore({ file: dbFile, maxMessages: 100_000, maxAgeMs: 365 * 24 * 3600_000 });
    items.clear();
    for (let after = 0; ; ) {
      const page = await store.read('list', after, 1000);
      for (const m of page) for (const c of changesOf(m.payload)) applyChange(c);
      if (page.length < 1000) break;
      after = page[page.length - 1]!.seq;
    }
    const server = await createSyncServer({
      port: syncPort,
      host,
      store,
      // The page is served from another port than the sync server, so it is cross-origin
      // there (whose default accepts only same-host pages): accept the page's own port on
      // the host the request was sent to.
      allowedOrigins: (origin, req) => {
        const page = new URL(origin);
        return (
          page.port === String(state.port) && page.hostname === new URL(`http://${req.headers.host}`).hostname
        );
      },
      onError: (err, where) => log(`[sync] ${where}: ${(err as Error)?.message ?? String(err)}`),
      // A late joiner or a reset starts from here: the list as of the channel's head.
      snapshot: (channel) => (channel === 'list' ? [...items.values()] : null),
      onSync: async (ops, ctx) => {
        const results: unknown[] = [];
        for (const raw of ops) {
          const op = raw as (Partial<ListOp> & { id?: unknown; text?: unknown }) | null;
          const item = typeof op?.id === 'string' ? items.get(op.id) : undefined;
          let change: ListChange | null = null;
          if (op?.op === 'add' && typeof op.text === 'string' && op.text.trim() && op.text.length <= 200) {
            const id = randomId('i', 6);
            change = { id, value: { id, text: op.text.trim(), done: false } };
          } else if (op?.op === 'remove' && item) {
            change = { id: item.id, value: null };
          } else if (op?.op === 'toggle' && item) {
            change = { id: item.id, value: { ...item, done: !item.done } };
          }
          if (!change) {
            results.push({ ok: false, errors: [{ op: raw, error: 'not applicable' }] });
            continue;
          }
          // The README's rule: assign the new state and publish in one synchronous step, so
          // the order of the list's states is the channel's seq order. Every client, the
          // author too, gets the change from the channel at its seq.
          applyChange(change);
          const { seq } = await ctx.publish('list', { changes: [change] });
          results.push({ ok: true, seq, changes: [change] });
        }
        return results;
      },
    });
    syncPort = server.address().port;
    sync = server;
  };
  await startSync();

  // ---- pages, config, admin ---------------------------------------------------------------
  let relay: InspectRelay | null = null;
  const state = { port: 0 };
  const config = () => ({
    syncUrl: `ws://${host}:${syncPort}/sync`,
    relayUrl: `ws://${host}:${state.port}/inspect`,
    timeout,
    dbFile,
  });

  let restarting: Promise<{ ms: number }> | null = null;
  const restartSync = () => {
    restarting ??= (async () => {
      const t0 = Date.now();
      try {
        await sync?.close();
        sync = null;
        await startSync();
        log(`[playground] sync server restarted on port ${syncPort} (${Date.now() - t0} ms)`);
        return { ms: Date.now() - t0 };
      } finally {
        restarting = null;
      }
    })();
    return restarting;
  };

  const serveFile = (res: ServerResponse, file: string) => {
    const type = MIME[extname(file)] ?? 'application/octet-stream';
    // Built files have hashed names, HTML does not: never cache the HTML.
    const cache = extname(file) === '.html' ? 'no-store' : 'public, max-age=31536000, immutable';
    res.writeHead(200, { 'content-type': type, 'cache-control': cache });
    res.end(readFileSync(file));
  };

  const json = (res: ServerResponse, status: number, body: unknown) => {
    res.writeHead(status, { 'content-type': 'application/json', 'cache-control': 'no-store' });
    res.end(JSON.stringify(body));
  };

  const onRequest = async (req: IncomingMessage, res: ServerResponse) => {
    const url = new URL(req.url ?? '/', 'http://playground');
    const path = decodeURIComponent(url.pathname);
    try {
      if (path === '/') {
        res.writeHead(302, { location: `/playground/${url.search}` });
        res.end();
        return;
      }
      if (path === '/config.json') return json(res, 200, config());
      if (path === '/admin/restart') {
        // POST only: a stray GET (a prefetch, a crawler) must not restart anything.
        if (req.method !== 'POST') return json(res, 405, { error: 'POST only' });
        const r = await restartSync();
        return json(res, 200, { ok: true, ...r, syncUrl: config().syncUrl });
      }
      if (path === '/admin/list') return json(res, 200, [...items.values()]);
      if (path === '/stately') {
        res.writeHead(200, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' });
        res.end(statelyBridgePage('/inspect'));
        return;
      }
      if (path === '/inspect') {
        res.writeHead(426, { 'content-type': 'text/plain' });
        res.end('the relay speaks WebSocket');
        return;
      }
      if (req.method !== 'GET' && req.method !== 'HEAD') return json(res, 405, { error: 'GET only' });
      let rel = normalize(path).replace(/^([/\\])+/, '');
      if (rel.endsWith('/') || rel === '') rel += 'index.html';
      const file = resolve(DIST, rel);
      if (!file.startsWith(DIST + sep)) return json(res, 403, { error: 'outside' });
      if (existsSync(file) && statSync(file).isFile()) return serveFile(res, file);
      if (existsSync(join(file, 'index.html'))) {
        res.writeHead(302, { location: `${path}/${url.search}` });
        res.end();
        return;
      }
      return json(res, 404, { error: 'not found' });
    } catch (err) {
      log(`[playground] ${req.method} ${path}: ${(err as Error)?.message ?? String(err)}`);
      if (!res.headersSent) json(res, 500, { error: 'internal error' });
      else res.end();
    }
  };

  const http = createServer((req, res) => void onRequest(req, res));
  try {
    state.port = await listen(http, options.port ?? 4300, host);
  } catch (err) {
    await (sync as SyncServer | null)?.close();
    throw err;
  }
  relay = await createInspectRelay({ server: http, path: '/inspect' });

  const base = `http://${host}:${state.port}`;
  return {
    url: `${base}/playground/`,
    visualizerUrl: `${base}/visualizer/`,
    get syncUrl() {
      return config().syncUrl;
    },
    relayUrl: config().relayUrl,
    dbFile,
    restartSync,
    list: () => [...items.values()],
    async close() {
      await restarting?.catch(() => undefined);
      await relay?.close();
      await sync?.close();
      sync = null;
      await new Promise<void>((done) => {
        http.close(() => done());
        http.closeAllConnections();
      });
    },
  };
}
