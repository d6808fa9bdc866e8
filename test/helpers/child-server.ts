/**
 * Spawn test/fixtures/fault-server.ts as a child process with `--expose-gc`, and talk to it
 * over IPC with bounded waits. Every child started here is also killed when the test process
 * exits, so a crashed run leaves nothing behind.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';

const FIXTURE = fileURLToPath(new URL('../fixtures/fault-server.ts', import.meta.url));
const ROOT = fileURLToPath(new URL('../..', import.meta.url));

export interface ChildServer {
  port: number;
  pid: number;
  proc: ChildProcess;
  call<R = any>(type: string, args?: Record<string, unknown>, ms?: number): Promise<R>;
  /** Ask it to close; SIGKILL if it has not exited within `ms`. Idempotent. */
  stop(ms?: number): Promise<void>;
}

const live = new Set<ChildProcess>();
process.once('exit', () => {
  for (const p of live) p.kill('SIGKILL');
});

export async function startChildServer(
  env: Record<string, string> = {},
  readyMs = 20_000,
): Promise<ChildServer> {
  const proc = spawn(process.execPath, ['--expose-gc', '--import', 'tsx', FIXTURE], {
    cwd: ROOT,
    env: { ...process.env, ...env },
    stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
  });
  live.add(proc);
  const exited = new Promise<void>((resolve) => proc.once('exit', () => resolve()));
  exited.then(() => live.delete(proc));

  let ref = 0;
  const waiting = new Map<number, { resolve(v: unknown): void; reject(e: Error): void }>();
  const ready = new Promise<{ port: number; pid: number }>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`child server not ready within ${readyMs} ms`)), readyMs);
    proc.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`child server exited with ${code} before it was ready`));
    });
    proc.on('message', (raw) => {
      const m = raw as {
        type?: string;
        ref?: number;
        port?: number;
        pid?: number;
        result?: unknown;
        error?: string;
      };
      if (m.type === 'ready') {
        clearTimeout(timer);
        resolve({ port: m.port!, pid: m.pid! });
        return;
      }
      const w = m.ref === undefined ? undefined : waiting.get(m.ref);
      if (!w) return;
      waiting.delete(m.ref!);
      if (m.error !== undefined) w.reject(new Error(m.error));
      else w.resolve(m.result);
    });
  });
  proc.once('exit', () => {
    for (const w of waiting.values()) w.reject(new Error('child server exited'));
    waiting.clear();
  });
  let info: { port: number; pid: number };
  try {
    info = await ready;
  } catch (err) {
    proc.kill('SIGKILL');
    throw err;
  }

  let stopping: Promise<void> | undefined;
  const server: ChildServer = {
    ...info,
    proc,
    call(type, args = {}, ms = 30_000) {
      return new Promise((resolve, reject) => {
        const r = ++ref;
        const timer = setTimeout(() => {
          waiting.delete(r);
          reject(new Error(`child server: no answer to ${type} within ${ms} ms`));
        }, ms);
        waiting.set(r, {
          resolve: (v) => {
            clearTimeout(timer);
            resolve(v as never);
          },
          reject: (e) => {
            clearTimeout(timer);
            reject(e);
          },
        });
        if (!proc.connected) {
          waiting.delete(r);
          clearTimeout(timer);
          reject(new Error('child server is not connected'));
          return;
        }
        proc.send({ ref: r, type, ...args });
      });
    },
    stop(ms = 5000) {
      stopping ??= (async () => {
        if (proc.exitCode !== null || proc.signalCode !== null) return;
        if (proc.connected) server.call('close', {}, ms).catch(() => {});
        const timer = setTimeout(() => proc.kill('SIGKILL'), ms);
        await exited;
        clearTimeout(timer);
      })();
      return stopping;
    },
  };
  return server;
}
