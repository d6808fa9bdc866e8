/**
 * The inspection relay (Node only): a small WebSocket fan-out so a visualizer page can watch
 * a client that runs in another process or tab. Every text frame a connection sends that
 * parses as an inspection event goes to every other connection; a connection that arrives
 * late first gets the live actors and recent events. It speaks the wire of
 * `@statelyai/inspect`'s WebSocket inspector and `createInspectorServer`, and serves
 * `/stately`, a bridge page that feeds the same stream to Stately's hosted inspector.
 *
 * Load it through `createInspectRelay` from `syncwire/inspect`.
 */
import { createServer, type IncomingMessage, type Server } from 'node:http';
import type { Duplex } from 'node:stream';
import { type WebSocket, WebSocketServer } from 'ws';
import { isInspectionEvent, ReplayBuffer, type SyncwireInspectionEvent } from './index.js';

export interface InspectRelayOptions {
  /** Port to listen on; 0 picks a free one. Ignored with `server`. @default 4300 */
  port?: number;
  /** Interface to bind. Ignored with `server`. @default '127.0.0.1' */
  host?: string;
  /**
   * Attach to an existing HTTP server instead of listening: only upgrades on `path` are
   * taken, others are left to the server's other listeners. @default none
   */
  server?: Server;
  /** WebSocket path. Any path is accepted when the relay owns its server. @default '/inspect' */
  path?: string;
  /** Events replayed to a connection that arrives late. @default 2000 */
  bufferSize?: number;
  /** Largest frame accepted, in bytes. @default 4194304 */
  maxPayload?: number;
  /**
   * Origins allowed to connect (a page on another origin could otherwise read the stream).
   * Connections without an Origin header (Node producers) are always allowed.
   * @default loopback origins only
   */
  allowOrigin?: (origin: string) => boolean;
}

export interface InspectRelay {
  /** Where it listens; the URL to give `createRelayInspector` and visualizer pages. */
  readonly url: string;
  address(): { host: string; port: number };
  /** Connections currently open (producers and viewers). */
  readonly connections: number;
  close(): Promise<void>;
}

const LOOPBACK = /^https?:\/\/(127\.\d+\.\d+\.\d+|localhost|\[::1\])(:\d+)?$/;

/**
 * The bridge page: Stately's hosted inspector in an iframe, fed from the relay at `wsPath` on
 * the page's own host. Served at `/stately` by a relay that owns its server; a server the
 * relay is attached to can serve it too.
 */
export function statelyBridgePage(wsPath: string): string {
  return `<!doctype html>
<meta charset="utf-8"><title>syncwire → Stately inspector</title>
<style>html,body,iframe{margin:0;height:100%;width:100%;border:0}</style>
<iframe id="inspector" src="https://stately.ai/inspect"></iframe>
<script>
const frame = document.getElementById('inspector');
const queue = [];
let ready = false;
addEventListener('message', (e) => {
  if (e.data && e.data.type === '@statelyai.connected') {
    ready = true;
    for (const ev of queue.splice(0)) frame.contentWindow.postMessage(ev, '*');
  }
});
const ws = new WebSocket((location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + ${JSON.stringify(wsPath)});
ws.onmessage = (m) => {
  const ev = JSON.parse(m.data);
  // Stately's inspector knows three event types; syncwire's extra two stay here.
  if (!['@xstate.actor', '@xstate.event', '@xstate.snapshot'].includes(ev.type)) return;
  if (ready) frame.contentWindow.postMessage(ev, '*');
  else queue.push(ev);
};
</script>`;
}

export async function startInspectRelay(options: InspectRelayOptions = {}): Promise<InspectRelay> {
  const path = options.path ?? '/inspect';
  const allowOrigin = options.allowOrigin ?? ((o: string) => LOOPBACK.test(o));
  const buffer = new ReplayBuffer(options.bufferSize ?? 2000);
  const wss = new WebSocketServer({ noServer: true, maxPayload: options.maxPayload ?? 4 * 1024 * 1024 });
  const owned = !options.server;
  const server =
    options.server ??
    createServer((req, res) => {
      const url = new URL(req.url ?? '/', 'http://relay');
      if (url.pathname === '/stately') {
        res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
        res.end(statelyBridgePage(path));
        return;
      }
      res.writeHead(200, { 'content-type': 'text/plain; charset=utf-8' });
      res.end(
        `syncwire inspection relay.\nProducers: createRelayInspector({ url: 'ws://${req.headers.host}${path}' }).\n` +
          `Viewers: the syncwire visualizer (?relay=ws://${req.headers.host}${path}), or /stately for Stately's inspector.\n`,
      );
    });

  const onUpgrade = (req: IncomingMessage, socket: Duplex, head: Buffer) => {
    const url = new URL(req.url ?? '/', 'http://relay');
    if (!owned && url.pathname !== path) return; // someone else's upgrade
    const origin = req.headers.origin;
    if (origin && !allowOrigin(origin)) {
      socket.end('HTTP/1.1 403 Forbidden\r\nConnection: close\r\n\r\n');
      return;
    }
    wss.handleUpgrade(req, socket, head, (ws) => wss.emit('connection', ws, req));
  };
  server.on('upgrade', onUpgrade);

  wss.on('connection', (ws: WebSocket) => {
    for (const e of buffer.replay()) ws.send(JSON.stringify(e));
    ws.on('message', (data, isBinary) => {
      if (isBinary) return;
      const text = data.toString();
      let parsed: unknown;
      try {
        parsed = JSON.parse(text);
      } catch {
        return;
      }
      if (!isInspectionEvent(parsed)) return;
      buffer.push(parsed as SyncwireInspectionEvent);
      for (const other of wss.clients) {
        // A slow viewer would hold unbounded memory; it misses events instead (it can reload).
        if (other !== ws && other.readyState === other.OPEN && other.bufferedAmount < 8 * 1024 * 1024) {
          other.send(text);
        }
      }
    });
    ws.on('error', () => {
      // A broken connection closes; nothing else to do.
    });
  });

  if (owned) {
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(options.port ?? 4300, options.host ?? '127.0.0.1', () => {
        server.off('error', reject);
        resolve();
      });
    });
  }

  const address = () => {
    const a = server.address();
    if (a && typeof a === 'object') return { host: a.address, port: a.port };
    return { host: options.host ?? '127.0.0.1', port: options.port ?? 0 };
  };
  const { host, port } = address();
  const shownHost = host.includes(':') ? `[${host}]` : host;

  return {
    url: `ws://${shownHost}:${port}${path}`,
    address,
    get connections() {
      return wss.clients.size;
    },
    async close() {
      server.off('upgrade', onUpgrade);
      for (const ws of wss.clients) ws.terminate();
      await new Promise<void>((resolve) => wss.close(() => resolve()));
      if (owned) {
        await new Promise<void>((resolve) => {
          server.close(() => resolve());
          server.closeAllConnections?.();
        });
      }
    },
  };
}
