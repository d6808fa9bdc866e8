/**
 * Debian's nginx as a real load balancer in front of a syncwire server, for test/nginx.test.ts.
 * Everything lives in a temporary prefix (config, pid, logs, temp paths), nginx runs in the
 * foreground (`daemon off; master_process off;`) as a child of the test, listens on a free
 * 127.0.0.1 port and proxies `/sync` (WebSocket upgrade headers included, and the HTTP
 * fallback) with a short `proxy_read_timeout`. `stop()` then `start()` is a restart on the
 * same port. Every nginx started here is killed when the test process exits.
 */
import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { type AddressInfo, connect, createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

/**
 * Where nginx is: $NGINX when set (and only there), else /usr/sbin/nginx, else the PATH.
 * `undefined` when missing.
 */
export function findNginx(): string | undefined {
  const chosen = process.env.NGINX;
  if (chosen) return existsSync(chosen) ? chosen : undefined;
  if (existsSync('/usr/sbin/nginx')) return '/usr/sbin/nginx';
  try {
    return execFileSync('sh', ['-c', 'command -v nginx'], { encoding: 'utf8' }).trim() || undefined;
  } catch {
    return undefined;
  }
}

export interface Nginx {
  port: number;
  dir: string;
  /** Start (again) on the same port; resolves once it accepts connections. */
  start(): Promise<void>;
  /** Fast shutdown (SIGTERM: connections are cut, as a restarting balancer does). */
  stop(): Promise<void>;
  /** Stop, and remove the prefix. */
  dispose(): Promise<void>;
  errorLog(): string;
  running(): boolean;
}

const live = new Set<ChildProcess>();
process.once('exit', () => {
  for (const p of live) p.kill('SIGKILL');
});

export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address() as AddressInfo;
      srv.close(() => resolve(port));
    });
  });
}

/** Resolve once a TCP connection to `port` succeeds; bounded. */
export async function waitForPort(port: number, ms = 10_000): Promise<void> {
  const end = Date.now() + ms;
  for (;;) {
    const ok = await new Promise<boolean>((resolve) => {
      const s = connect(port, '127.0.0.1');
      s.once('connect', () => {
        s.destroy();
        resolve(true);
      });
      s.once('error', () => resolve(false));
    });
    if (ok) return;
    if (Date.now() > end) throw new Error(`nothing listens on 127.0.0.1:${port} after ${ms} ms`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

export interface NginxOptions {
  binary: string;
  upstreamPort: number;
  /** nginx time syntax, e.g. '1s'. */
  readTimeout: string;
  path?: string;
  /** Append the client's address to `X-Forwarded-For` (`$proxy_add_x_forwarded_for`, as docs/nginx.conf). */
  forwardedFor?: boolean;
}

export async function startNginx(opts: NginxOptions): Promise<Nginx> {
  const dir = mkdtempSync(join(tmpdir(), 'syncwire-nginx-'));
  for (const d of ['client_body', 'proxy', 'fastcgi', 'uwsgi', 'scgi', 'logs']) mkdirSync(join(dir, d));
  const path = opts.path ?? '/sync';
  let proc: ChildProcess | undefined;
  let exited: Promise<void> = Promise.resolve();
  let port = 0;

  const writeConfig = () =>
    writeFileSync(
      join(dir, 'nginx.conf'),
      `daemon off;
master_process off;
worker_processes 1;
pid ${dir}/nginx.pid;
error_log ${dir}/logs/error.log info;
events { worker_connections 1024; }
http {
  access_log ${dir}/logs/access.log;
  client_body_temp_path ${dir}/client_body;
  proxy_temp_path ${dir}/proxy;
  fastcgi_temp_path ${dir}/fastcgi;
  uwsgi_temp_path ${dir}/uwsgi;
  scgi_temp_path ${dir}/scgi;
  map $http_upgrade $connection_upgrade { default upgrade; '' close; }
  server {
    listen 127.0.0.1:${port};
    location ${path} {
      proxy_pass http://127.0.0.1:${opts.upstreamPort};
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection $connection_upgrade;
      proxy_set_header Host $host;${opts.forwardedFor ? '\n      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;' : ''}
      proxy_buffering off;
      proxy_read_timeout ${opts.readTimeout};
      proxy_send_timeout ${opts.readTimeout};
    }
  }
}
`,
    );

  const spawnOnce = async (): Promise<void> => {
    writeConfig();
    const p = spawn(
      opts.binary,
      ['-p', dir, '-c', join(dir, 'nginx.conf'), '-e', join(dir, 'logs/error.log')],
      {
        stdio: ['ignore', 'ignore', 'pipe'],
      },
    );
    let stderr = '';
    p.stderr?.on('data', (d: Buffer) => {
      stderr += d.toString();
    });
    live.add(p);
    proc = p;
    exited = new Promise((resolve) => p.once('exit', () => resolve()));
    void exited.then(() => live.delete(p));
    const died = exited.then(() => {
      throw new Error(`nginx exited at start: ${stderr || nginx.errorLog().slice(-500)}`);
    });
    await Promise.race([waitForPort(port), died]);
  };

  const nginx: Nginx = {
    get port() {
      return port;
    },
    dir,
    async start() {
      if (nginx.running()) return;
      await spawnOnce();
    },
    async stop() {
      if (!proc || !nginx.running()) return;
      proc.kill('SIGTERM');
      const timer = setTimeout(() => proc?.kill('SIGKILL'), 5000);
      await exited;
      clearTimeout(timer);
    },
    async dispose() {
      await nginx.stop();
      rmSync(dir, { recursive: true, force: true });
    },
    errorLog() {
      try {
        return readFileSync(join(dir, 'logs/error.log'), 'utf8');
      } catch {
        return '';
      }
    },
    running: () => proc !== undefined && proc.exitCode === null && proc.signalCode === null,
  };

  // A free port can be taken between the probe and nginx's bind: try a few.
  let lastError: unknown;
  for (let attempt = 0; attempt < 5; attempt++) {
    port = await freePort();
    try {
      await spawnOnce();
      return nginx;
    } catch (err) {
      lastError = err;
      await nginx.stop();
    }
  }
  rmSync(dir, { recursive: true, force: true });
  throw lastError;
}
