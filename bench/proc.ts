/**
 * Parent side of the benchmark servers: fork one server child per contender (TypeScript via
 * tsx, with --expose-gc so it can measure its own live memory), wait for its port, and talk
 * to it over IPC. Children exit when asked, or by themselves when the parent goes away.
 */
import { type ChildProcess, fork } from 'node:child_process';
import { fileURLToPath } from 'node:url';

export type System = 'syncwire' | 'socketio' | 'ws';
export const SYSTEMS: readonly System[] = ['syncwire', 'socketio', 'ws'];

export interface ServerProc {
  readonly system: System;
  readonly port: number;
  readonly pid: number;
  call<T = unknown>(cmd: string, args?: Record<string, unknown>, timeoutMs?: number): Promise<T>;
  /** Ask the child to close and exit; kill it if it does not within a few seconds. */
  stop(): Promise<void>;
}

const live = new Set<ChildProcess>();
process.once('exit', () => {
  for (const c of live) c.kill('SIGKILL');
});

export async function startServer(system: System, env: Record<string, string> = {}): Promise<ServerProc> {
  const file = fileURLToPath(new URL(`./servers/${system}.ts`, import.meta.url));
  const child = fork(file, [], {
    // BENCH_CPU_PROF=<dir>: each server child writes a V8 CPU profile there on exit.
    execArgv: [
      '--import',
      'tsx',
      '--expose-gc',
      ...(process.env.BENCH_CPU_PROF ? ['--cpu-prof', `--cpu-prof-dir=${process.env.BENCH_CPU_PROF}`] : []),
    ],
    env: { ...process.env, ...env },
    stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
  });
  live.add(child);
  let nextRef = 1;
  const waiting = new Map<number, { resolve(v: unknown): void; reject(e: Error): void }>();
  let exited = false;
  const port = await new Promise<number>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`${system} server did not start in 20 s`)), 20_000);
    child.on('message', (raw) => {
      const m = raw as { type?: string; port?: number; ref?: number; result?: unknown; error?: string };
      if (m.type === 'ready') {
        clearTimeout(timer);
        resolve(m.port!);
        return;
      }
      const w = m.ref === undefined ? undefined : waiting.get(m.ref);
      if (!w) return;
      waiting.delete(m.ref!);
      if (m.error !== undefined) w.reject(new Error(`${system} server: ${m.error}`));
      else w.resolve(m.result);
    });
    child.once('exit', (code, signal) => {
      exited = true;
      live.delete(child);
      clearTimeout(timer);
      const err = new Error(`${system} server exited (${code ?? signal})`);
      reject(err);
      for (const w of waiting.values()) w.reject(err);
      waiting.clear();
    });
  });
  const call = <T>(cmd: string, args: Record<string, unknown> = {}, timeoutMs = 60_000): Promise<T> =>
    new Promise<T>((resolve, reject) => {
      if (exited) return reject(new Error(`${system} server is gone`));
      const ref = nextRef++;
      const timer = setTimeout(() => {
        waiting.delete(ref);
        reject(new Error(`${system} server: ${cmd} timed out`));
      }, timeoutMs);
      waiting.set(ref, {
        resolve: (v) => {
          clearTimeout(timer);
          resolve(v as T);
        },
        reject: (e) => {
          clearTimeout(timer);
          reject(e);
        },
      });
      child.send({ ref, cmd, ...args });
    });
  return {
    system,
    port,
    pid: child.pid!,
    call,
    async stop() {
      if (exited) return;
      const gone = new Promise<void>((resolve) => child.once('exit', () => resolve()));
      call('exit', {}, 5000).catch(() => undefined);
      const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
      await gone;
      clearTimeout(timer);
    },
  };
}
