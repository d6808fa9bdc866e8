/**
 * Mounting syncwire next to an application's own routes (README "Frameworks"), in real
 * Express 5, Fastify 5 and plain node:http apps on 127.0.0.1:
 *
 * - operations over the socket (the upgrade on the shared server);
 * - operations over HTTP with the socket unavailable (a socket URL nothing listens on, so every
 *   request goes through the framework to the mounted handler), each applied once;
 * - the app's own routes still answer, including a JSON body route behind the app's parser.
 *
 * Without `handleHttp: false` two `request` listeners (the framework's and syncwire's) both
 * answer `POST /sync`: whichever writes first wins and the other fails on a taken response
 * (issue 13 saw Express's 404 win).
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import express from 'express';
import Fastify from 'fastify';
import { afterEach, describe, expect, it } from 'vitest';
import { WebSocket } from 'ws';
import { createSyncClient, type SyncClient } from '../src/client/index.js';
import { createSyncServer, type SyncServer } from '../src/server/index.js';
import { reach } from './helpers/harness.js';
import { freePort } from './helpers/nginx.js';

const T = 300;
const cleanups: Array<() => Promise<void> | void> = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

const applied = new Map<string, number>();
const onSync = (ops: unknown[]) =>
  ops.map((op) => {
    const id = String((op as { id: string }).id);
    applied.set(id, (applied.get(id) ?? 0) + 1);
    return { id, ok: true };
  });

function listen(server: Server): Promise<number> {
  return new Promise((r) => server.listen(0, '127.0.0.1', () => r((server.address() as AddressInfo).port)));
}

/** What every app must do, whatever mounts it. */
async function exercise(port: number) {
  const base = `http://127.0.0.1:${port}`;
  // The app's own routes.
  const hello = await fetch(`${base}/hello`);
  expect(hello.status).toBe(200);
  expect(await hello.text()).toBe('hi');
  const echo = await fetch(`${base}/api/echo`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ a: 1 }),
  });
  expect(echo.status).toBe(200);
  expect(await echo.json()).toEqual({ echoed: { a: 1 } });

  // Over the socket.
  const ws: SyncClient = createSyncClient({ url: `ws://127.0.0.1:${port}/sync`, timeout: T, WebSocket });
  cleanups.push(() => ws.close());
  await reach(ws, 'open');
  const tag = `${port}-${Math.random()}`;
  expect(await ws.send({ id: `ws-${tag}` })).toEqual({ id: `ws-${tag}`, ok: true });
  expect(ws.state).not.toBe('degraded');

  // Over HTTP only: the socket URL has nothing behind it.
  const dead = `ws://127.0.0.1:${await freePort()}/sync`;
  const http: SyncClient = createSyncClient({ url: dead, httpUrl: `${base}/sync`, timeout: T, WebSocket });
  cleanups.push(() => http.close());
  const failures: string[] = [];
  http.failures$.subscribe((f) => failures.push(`${f.kind} ${f.code ?? ''} ${f.reason ?? ''}`));
  const results = await Promise.all([1, 2, 3].map((n) => http.send({ id: `http-${tag}-${n}` })));
  expect(results.map((r) => (r as { id: string }).id)).toEqual([1, 2, 3].map((n) => `http-${tag}-${n}`));
  expect(
    failures.filter((f) => f.startsWith('http_error')),
    'no HTTP failure',
  ).toEqual([]);
  for (const id of [`ws-${tag}`, ...[1, 2, 3].map((n) => `http-${tag}-${n}`)])
    expect(applied.get(id)).toBe(1);
  // Unknown paths still reach the app's own 404.
  expect((await fetch(`${base}/nope`)).status).toBe(404);
}

describe('mounting syncwire in a framework', () => {
  it('Express 5: app.use(sync.middleware) before the body parser; upgrade on the shared server', async () => {
    const app = express();
    const server = createServer(app);
    const sync: SyncServer = await createSyncServer({ server, handleHttp: false, onSync });
    app.use(sync.middleware);
    app.use(express.json());
    app.get('/hello', (_req, res) => {
      res.send('hi');
    });
    app.post('/api/echo', (req, res) => {
      res.json({ echoed: req.body });
    });
    const port = await listen(server);
    cleanups.push(async () => {
      await sync.close();
      server.closeAllConnections();
      await new Promise<void>((r) => server.close(() => r()));
    });
    await exercise(port);
  });

  it('Fastify 5: an onRequest hook hands /sync to sync.handleRequest; upgrade on fastify.server', async () => {
    const app = Fastify();
    const sync: SyncServer = await createSyncServer({ server: app.server, handleHttp: false, onSync });
    app.addHook('onRequest', (req, reply, done) => {
      // Before Fastify reads the body: the raw request is still unread.
      if (sync.handleRequest(req.raw, reply.raw)) reply.hijack();
      else done();
    });
    app.get('/hello', async () => 'hi');
    app.post('/api/echo', async (req) => ({ echoed: req.body }));
    await app.listen({ port: 0, host: '127.0.0.1' });
    cleanups.push(async () => {
      await sync.close();
      await app.close();
    });
    await exercise((app.server.address() as AddressInfo).port);
  });

  it('plain node:http: one request listener routes /sync to sync.handleRequest, the rest to the app', async () => {
    let sync: SyncServer | null = null;
    const server = createServer((req: IncomingMessage, res: ServerResponse) => {
      if (sync?.handleRequest(req, res)) return;
      if (req.method === 'GET' && req.url === '/hello') return void res.end('hi');
      if (req.method === 'POST' && req.url === '/api/echo') {
        let body = '';
        req.setEncoding('utf8');
        req.on('data', (c: string) => {
          body += c;
        });
        req.on('end', () => {
          res.setHeader('content-type', 'application/json');
          res.end(JSON.stringify({ echoed: JSON.parse(body) }));
        });
        return;
      }
      res.statusCode = 404;
      res.end();
    });
    sync = await createSyncServer({ server, handleHttp: false, onSync });
    const port = await listen(server);
    cleanups.push(async () => {
      await sync?.close();
      server.closeAllConnections();
      await new Promise<void>((r) => server.close(() => r()));
    });
    await exercise(port);
  });
});
