/**
 * Real processes for the Redis and multi-process suites: a throw-away `redis-server` on a free
 * loopback port, syncwire server processes (test/fixtures/server-process.ts, run with tsx),
 * and Debian's nginx with a generated config. Every child is registered and killed by
 * `stopAll()` (call it in afterAll) and, as a last resort, when the test process exits.
 *
 * A missing `redis-server` or `nginx` skips the suite with a clear message, except under
 * `CI=true`, where the suite fails instead: CI must never go green without running it.
 */

import { type ChildProcess, spawn } from 'node:child_process';
import { accessSync, constants, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createServer, Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { delimiter, dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { filter, firstValueFrom, type Observable, timeout as rxTimeout } from 'rxjs';
import { describe, it } from 'vitest';
import { WebSocket } from 'ws';
import { createSyncClient, type SyncClient, type SyncClientOptions } from '../../src/client/index.js';

export const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '../..');
export const IN_CI = ['true', '1'].includes(String(process.env.CI ?? '').toLowerCase());

/** T for the clients of these suites. */
export const T = 200;

// ---- binaries and the skip-or-fail rule ---------------------------------------------------

/** The absolute path of an executable on PATH (plus the sbin dirs nginx lives in), or null. */
export function findBinary(name: string): string | null {
  const dirs = [...(process.env.PATH ?? '').split(delimiter), '/usr/sbin', '/usr/local/sbin', '/sbin'];
  for (const dir of dirs) {
    if (!dir) continue;
    const file = join(dir, name);
    try {
      accessSync(file, constants.X_OK);
      return file;
    } catch {
      // not here
    }
  }
  return null;
}

/** An executable named by `$override` when that is set (and only there), else found on PATH. */
function chooseBinary(override: string, name: string): string | null {
  const chosen = process.env[override];
  if (chosen === undefined || chosen === '') return findBinary(name);
  try {
    accessSync(chosen, constants.X_OK);
    return chosen;
  } catch {
    return null;
  }
}

/** `$REDIS_SERVER` or `redis-server` on PATH. */
export const REDIS_SERVER = chooseBinary('REDIS_SERVER', 'redis-server');
/** `$NGINX` or `nginx` on PATH (or in an sbin directory). */
export const NGINX = chooseBinary('NGINX', 'nginx');

/**
 * `describe` when `binary` exists. Without it: under CI a suite with one failing test,
 * elsewhere a skipped suite whose title says what to install.
 */
export function describeWith(binary: string | null, what: string, title: string, fn: () => void): void {
  if (binary) {
    describe(title, fn);
    return;
  }
  if (IN_CI) {
    describe(title, () => {
      it(`needs ${what}`, () => {
        throw new Error(
          `${what} is not installed, and CI=true forbids skipping "${title}" (apt-get install ${what})`,
        );
      });
    });
    return;
  }
  console.warn(`[syncwire tests] skipping "${title}": ${what} is not installed (apt-get install ${what})`);
  describe.skip(`${title} (skipped: ${what} not installed)`, fn);
}

// ---- children -------------------------------------------------------------------------------

const children = new Set<ChildProcess>();
const cleanups = new Set<() => void>();

process.once('exit', () => {
  // Synchronous last resort for a run that died before afterAll.
  for (const c of children) c.kill('SIGKILL');
  for (const f of cleanups) f();
});

function register(child: ChildProcess): ChildProcess {
  children.add(child);
  child.once('exit', () => children.delete(child));
  return child;
}

/** SIGKILL (or `signal`) a child and wait for it to be gone, bounded. */
export async function killChild(
  child: ChildProcess,
  signal: NodeJS.Signals = 'SIGKILL',
  ms = 5000,
): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const gone = new Promise<void>((res) => child.once('exit', () => res()));
  child.kill(signal);
  await Promise.race([gone, rejectAfter(ms, `process ${child.pid} to exit`)]).catch(() =>
    child.kill('SIGKILL'),
  );
}

/** Kill every child these helpers started and remove their temp dirs. */
export async function stopAll(): Promise<void> {
  await Promise.all([...children].map((c) => killChild(c)));
  for (const f of cleanups) f();
  cleanups.clear();
}

function rejectAfter(ms: number, label: string): Promise<never> {
  return new Promise((_, reject) => {
    setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${label}`)), ms).unref();
  });
}

/** A port nobody listens on right now (the OS picks it). */
export function freePort(): Promise<number> {
  return new Promise((res, rej) => {
    const srv = createServer();
    srv.once('error', rej);
    srv.listen(0, '127.0.0.1', () => {
      const port = (srv.address() as { port: number }).port;
      srv.close(() => res(port));
    });
  });
}

/** Keep the last lines a child printed, for error messages. */
function tail(child: ChildProcess): () => string {
  let text = '';
  const keep = (chunk: Buffer) => {
    text = (text + chunk.toString()).slice(-4000);
  };
  child.stdout?.on('data', keep);
  child.stderr?.on('data', keep);
  return () => text;
}

// ---- waiting ------------------------------------------------------------------------------

/** Poll `cond` every few ms until it holds, or fail after `ms`: for states with no event. */
export async function waitFor(
  cond: () => boolean | Promise<boolean>,
  ms = 5000,
  label = 'condition',
): Promise<void> {
  const end = Date.now() + ms;
  while (!(await cond())) {
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${label}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** The first value of `source` matching `pred`, or fail after `ms`. */
export function nextValue<V>(
  source: Observable<V>,
  pred: (v: V) => boolean = () => true,
  ms = 5000,
): Promise<V> {
  return firstValueFrom(source.pipe(filter(pred), rxTimeout(ms)));
}

// ---- redis-server ---------------------------------------------------------------------------

export interface RedisServer {
  readonly port: number;
  readonly url: string;
  /** Kill it (SIGKILL: no save, data gone). */
  stop(): Promise<void>;
  /** Start it again on the same port, empty (no persistence). */
  start(): Promise<void>;
  /** Send one inline command on a fresh connection; resolves with the raw reply. */
  command(line: string): Promise<string>;
}

/** One inline command over a raw socket; resolves with the first reply line(s). */
function rawCommand(port: number, line: string, ms = 2000): Promise<string> {
  return new Promise((res, rej) => {
    const sock = new Socket();
    let buf = '';
    const timer = setTimeout(() => {
      sock.destroy();
      rej(new Error(`redis on ${port} did not answer ${line}`));
    }, ms);
    sock.once('error', (err) => {
      clearTimeout(timer);
      rej(err);
    });
    sock.on('data', (d) => {
      buf += d.toString();
      if (buf.includes('\r\n')) {
        clearTimeout(timer);
        sock.end();
        res(buf.trim());
      }
    });
    sock.connect(port, '127.0.0.1', () => sock.write(`${line}\r\n`));
  });
}

async function spawnRedis(port: number): Promise<ChildProcess> {
  if (!REDIS_SERVER) throw new Error('redis-server is not installed');
  const child = register(
    spawn(
      REDIS_SERVER,
      [
        '--port',
        String(port),
        '--bind',
        '127.0.0.1',
        '--save',
        '',
        '--appendonly',
        'no',
        '--loglevel',
        'warning',
      ],
      { stdio: ['ignore', 'pipe', 'pipe'], cwd: tmpdir() },
    ),
  );
  const log = tail(child);
  const exited = new Promise<never>((_, rej) =>
    child.once('exit', (code) => rej(new Error(`redis-server exited (${code}) on port ${port}: ${log()}`))),
  );
  // Ready once it answers PING; poll (bounded) because readiness prints nothing at this log level.
  const ready = waitFor(
    () =>
      rawCommand(port, 'PING', 500).then(
        (r) => r === '+PONG',
        () => false,
      ),
    10_000,
    `redis-server PING on ${port}`,
  );
  await Promise.race([ready, exited]);
  exited.catch(() => undefined);
  return child;
}

/** Start a throw-away redis-server on a free port (retried if the port was taken meanwhile). */
export async function startRedis(): Promise<RedisServer> {
  let port = 0;
  let child: ChildProcess | null = null;
  for (let attempt = 0; ; attempt++) {
    port = await freePort();
    try {
      child = await spawnRedis(port);
      break;
    } catch (err) {
      if (attempt >= 2) throw err;
    }
  }
  return {
    port,
    url: `redis://127.0.0.1:${port}`,
    async stop() {
      if (child) await killChild(child);
      child = null;
    },
    async start() {
      if (child) return;
      child = await spawnRedis(port);
    },
    command: (line) => rawCommand(port, line),
  };
}

// ---- syncwire server processes --------------------------------------------------------------

export interface ServerProcess {
  readonly name: string;
  readonly port: number;
  readonly wsUrl: string;
  readonly httpUrl: string;
  readonly child: ChildProcess;
  /** Hard kill (SIGKILL), as a crash. */
  kill(): Promise<void>;
  publish(channel: string, payload: unknown): Promise<{ seq: number; epoch: string }>;
  stats(): Promise<ProcessStats>;
}

export interface ProcessStats {
  name: string;
  /** Operations onSync started, and finished. */
  applied: number;
  completed: number;
  requests: number;
  upgrades: number;
  sockets: number;
  errors: string[];
}

export interface ServerProcessOptions {
  name: string;
  redisUrl: string;
  prefix: string;
  claimLeaseMs?: number;
}

const FIXTURE = join(ROOT, 'test/fixtures/server-process.ts');

/** Start one server process; resolves once it listens. */
export async function startServerProcess(o: ServerProcessOptions): Promise<ServerProcess> {
  const child = register(
    spawn(process.execPath, ['--import', 'tsx', FIXTURE], {
      cwd: ROOT,
      stdio: ['ignore', 'pipe', 'pipe', 'ipc'],
      env: {
        ...process.env,
        SYNCWIRE_NAME: o.name,
        SYNCWIRE_REDIS_URL: o.redisUrl,
        SYNCWIRE_PREFIX: o.prefix,
        SYNCWIRE_CLAIM_LEASE_MS: String(o.claimLeaseMs ?? 1000),
      },
    }),
  );
  const log = tail(child);
  let ref = 0;
  const waiting = new Map<number, { res(v: unknown): void; rej(e: Error): void }>();
  const port = await Promise.race([
    new Promise<number>((res) => {
      child.on('message', (raw) => {
        const m = raw as { type?: string; port?: number; ref?: number; result?: unknown; error?: string };
        if (m.type === 'ready') res(m.port!);
        else if (m.ref !== undefined) {
          const w = waiting.get(m.ref);
          waiting.delete(m.ref);
          if (m.error !== undefined) w?.rej(new Error(m.error));
          else w?.res(m.result);
        }
      });
    }),
    new Promise<never>((_, rej) =>
      child.once('exit', (code) => rej(new Error(`server process ${o.name} exited (${code}): ${log()}`))),
    ),
    rejectAfter(30_000, `server process ${o.name} to listen`),
  ]);
  child.once('exit', () => {
    for (const w of waiting.values()) w.rej(new Error(`server process ${o.name} is gone`));
    waiting.clear();
  });
  const request = <R>(msg: Record<string, unknown>): Promise<R> =>
    new Promise<R>((res, rej) => {
      if (!child.connected) return rej(new Error(`server process ${o.name} is gone`));
      const r = ++ref;
      waiting.set(r, { res: res as (v: unknown) => void, rej });
      child.send({ ...msg, ref: r });
    });
  return {
    name: o.name,
    port,
    wsUrl: `ws://127.0.0.1:${port}/sync`,
    httpUrl: `http://127.0.0.1:${port}/sync`,
    child,
    kill: () => killChild(child),
    publish: (channel, payload) => request({ type: 'publish', channel, payload }),
    stats: () => request({ type: 'stats' }),
  };
}

// ---- nginx --------------------------------------------------------------------------------

export interface Nginx {
  readonly port: number;
  readonly wsUrl: string;
  readonly httpUrl: string;
  readonly config: string;
  stop(): Promise<void>;
}

/**
 * The nginx config of docs/multi-process.md, for a round-robin upstream of `ports`, with
 * every path (pid, logs, temp dirs) under `dir` so it runs unprivileged and leaves nothing
 * behind.
 */
export function nginxConfig(o: {
  dir: string;
  listen: number;
  upstreams: number[];
  readTimeout: string;
}): string {
  const d = o.dir;
  return `worker_processes 1;
daemon off;
master_process on;
pid ${d}/nginx.pid;
error_log ${d}/error.log warn;
${process.getuid?.() === 0 ? 'user root;\n' : ''}
events { worker_connections 2048; }

http {
  access_log off;
  client_body_temp_path ${d}/client_body;
  proxy_temp_path ${d}/proxy;
  fastcgi_temp_path ${d}/fastcgi;
  uwsgi_temp_path ${d}/uwsgi;
  scgi_temp_path ${d}/scgi;

  map $http_upgrade $connection_upgrade {
    default upgrade;
    ''      close;
  }

  upstream syncwire {
${o.upstreams.map((p) => `    server 127.0.0.1:${p} max_fails=1 fail_timeout=2s;`).join('\n')}
    keepalive 16;
  }

  server {
    listen 127.0.0.1:${o.listen};

    location /sync {
      proxy_pass http://syncwire;
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection $connection_upgrade;
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_read_timeout ${o.readTimeout};
      proxy_send_timeout ${o.readTimeout};
      proxy_buffering off;
      proxy_next_upstream error timeout http_502 http_503;
    }
  }
}
`;
}

/** Start Debian's nginx on a free loopback port in front of `upstreams`. */
export async function startNginx(upstreams: number[]): Promise<Nginx> {
  if (!NGINX) throw new Error('nginx is not installed');
  const dir = mkdtempSync(join(tmpdir(), 'syncwire-nginx-'));
  for (const sub of ['client_body', 'proxy', 'fastcgi', 'uwsgi', 'scgi']) mkdirSync(join(dir, sub));
  const remove = () => rmSync(dir, { recursive: true, force: true });
  cleanups.add(remove);
  let lastError: unknown;
  for (let attempt = 0; attempt < 3; attempt++) {
    const port = await freePort();
    const config = nginxConfig({ dir, listen: port, upstreams, readTimeout: '60s' });
    writeFileSync(join(dir, 'nginx.conf'), config);
    const child = register(
      spawn(NGINX, ['-p', dir, '-c', join(dir, 'nginx.conf'), '-e', join(dir, 'error.log')], {
        stdio: ['ignore', 'pipe', 'pipe'],
      }),
    );
    const log = tail(child);
    const exited = new Promise<never>((_, rej) =>
      child.once('exit', (code) => rej(new Error(`nginx exited (${code}): ${log()}`))),
    );
    try {
      await Promise.race([
        waitFor(
          () =>
            fetch(`http://127.0.0.1:${port}/nope`).then(
              () => true,
              () => false,
            ),
          10_000,
          'nginx to listen',
        ),
        exited,
      ]);
      exited.catch(() => undefined);
      return {
        port,
        wsUrl: `ws://127.0.0.1:${port}/sync`,
        httpUrl: `http://127.0.0.1:${port}/sync`,
        config,
        async stop() {
          await killChild(child, 'SIGTERM');
          remove();
          cleanups.delete(remove);
        },
      };
    } catch (err) {
      lastError = err;
      await killChild(child);
    }
  }
  throw lastError;
}

// ---- clients ------------------------------------------------------------------------------

/** A syncwire client on `ws`, with the suites' short T. */
export function makeClient(opts: Partial<SyncClientOptions> & Pick<SyncClientOptions, 'url'>): SyncClient {
  return createSyncClient({ timeout: T, maxBackoff: 1000, WebSocket: WebSocket as never, ...opts });
}
