/**
 * What every benchmark server child shares: the IPC request/answer loop with the parent
 * (`{ ref, cmd, ...args }` → `{ ref, result }` or `{ ref, error }`), the memory probe
 * (after forced GC; the child runs with --expose-gc), and exit when the parent goes away.
 */

import { getHeapStatistics } from 'node:v8';

export type Handler = (args: Record<string, unknown>) => unknown | Promise<unknown>;

/** Heap and RSS after repeated full GCs, so the numbers are live memory, not garbage. */
export async function memory(): Promise<{
  rss: number;
  heapUsed: number;
  external: number;
  arrayBuffers: number;
}> {
  const gc = (globalThis as { gc?: () => void }).gc;
  if (!gc) throw new Error('bench server: run with --expose-gc');
  for (let i = 0; i < 4; i++) {
    gc();
    // Let weak callbacks and finalizers of the previous pass run before the next one.
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  const m = process.memoryUsage();
  return { rss: m.rss, heapUsed: m.heapUsed, external: m.external, arrayBuffers: m.arrayBuffers };
}

/** Poll `cond` every few ms until true or `ms` passed (then reject). */
export async function until(cond: () => boolean, ms = 30_000, what = 'condition'): Promise<void> {
  const deadline = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`bench server: timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 2));
  }
}

/**
 * Announce `{ type: 'ready', port }` and answer the parent's commands. `memory` and `exit`
 * are built in; each server adds `connections`, `publish`, … .
 */
export function serve(port: number, handlers: Record<string, Handler>, close: () => Promise<void>): void {
  let watch: { timer: ReturnType<typeof setInterval>; baseline: number; peak: number } | undefined;
  // The same two numbers as process.memoryUsage()'s heapUsed + external, without its RSS
  // read: 1–3 µs a sample instead of 16–30 µs (measured on Node 20 with a 40 MB heap), so
  // the 1 ms sampler takes less of the server's time while it replays.
  const sample = () => {
    const h = getHeapStatistics();
    if (watch) watch.peak = Math.max(watch.peak, h.used_heap_size + h.external_memory);
  };
  const all: Record<string, Handler> = {
    memory: () => memory(),
    /**
     * Start watching this process's heap: after forced GC, the baseline is heapUsed +
     * external (bytes); then a sample every millisecond keeps the peak. Garbage not yet
     * collected counts too, so the peak is an upper bound of what was live.
     */
    async watchStart() {
      if (watch) clearInterval(watch.timer);
      const m = await memory();
      const baseline = m.heapUsed + m.external;
      watch = { timer: setInterval(sample, 1), baseline, peak: baseline };
      return baseline;
    },
    /** Stop watching; `{ baseline, peak }` in bytes (heapUsed + external). */
    watchStop() {
      if (!watch) throw new Error('bench server: watchStop without watchStart');
      sample();
      clearInterval(watch.timer);
      const { baseline, peak } = watch;
      watch = undefined;
      return { baseline, peak };
    },
    /** CPU time this process has used, user + system, in µs (for CPU per operation). */
    cpu: () => {
      const u = process.cpuUsage();
      return u.user + u.system;
    },
    ...handlers,
  };
  process.on('message', (raw) => {
    const { ref, cmd, ...args } = raw as { ref: number; cmd: string } & Record<string, unknown>;
    if (cmd === 'exit') {
      void close()
        .catch(() => undefined)
        .finally(() => {
          process.send?.({ ref, result: true });
          process.exit(0);
        });
      return;
    }
    const h = all[cmd];
    if (!h) {
      process.send?.({ ref, error: `unknown command ${cmd}` });
      return;
    }
    Promise.resolve()
      .then(() => h(args))
      .then(
        (result) => process.send?.({ ref, result: result ?? null }),
        (err: unknown) => process.send?.({ ref, error: String((err as Error)?.stack ?? err) }),
      );
  });
  // A crashed or interrupted parent must not leave servers behind.
  process.on('disconnect', () => process.exit(0));
  process.send?.({ type: 'ready', port });
}
