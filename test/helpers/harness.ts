/**
 * Shared set-up for the client suites: a real reference server on 127.0.0.1 with a ledger of
 * applied operations (to prove exactly-once), a fault-injecting proxy in front of it, and
 * clients built on `ws` with a short T. Helpers wait for events with a bounded timeout.
 */
import { filter, firstValueFrom, type Observable, timeout as rxTimeout } from 'rxjs';
import { WebSocket } from 'ws';
import { createSyncClient, type SyncClient, type SyncClientOptions } from '../../src/client/index.js';
import { createSyncServer, type SyncServer, type SyncServerOptions } from '../../src/server/index.js';
import { type Proxy as LoopbackProxy, startProxy } from './proxy.js';

export const T = 200;

export interface Ledger {
  /** How many times each operation id was applied. */
  applied: Map<string, number>;
  /** onSync calls, with their batch sizes, in order. */
  batches: string[][];
  /** While set, onSync waits for it before answering. */
  gate: Promise<void> | null;
}

export interface Rig {
  server: SyncServer;
  proxy: LoopbackProxy;
  ledger: Ledger;
  clients: SyncClient[];
  client(opts?: Partial<SyncClientOptions>): SyncClient;
  close(): Promise<void>;
}

export async function rig(serverOpts: Partial<SyncServerOptions> = {}): Promise<Rig> {
  const ledger: Ledger = { applied: new Map(), batches: [], gate: null };
  const server = await createSyncServer({
    port: 0,
    onSync: async (ops) => {
      if (ledger.gate) await ledger.gate;
      const ids = ops.map((o) => String((o as { id: string }).id));
      ledger.batches.push(ids);
      for (const id of ids) ledger.applied.set(id, (ledger.applied.get(id) ?? 0) + 1);
      return ids.map((id) => ({ id, successes: [id] }));
    },
    ...serverOpts,
  });
  const proxy = await startProxy(server.address());
  const clients: SyncClient[] = [];
  return {
    server,
    proxy,
    ledger,
    clients,
    client(opts = {}) {
      const c = createSyncClient({
        url: proxy.wsUrl,
        timeout: T,
        WebSocket: WebSocket as never,
        ...opts,
      });
      clients.push(c);
      return c;
    },
    async close() {
      await Promise.all(clients.map((c) => c.close()));
      await proxy.close();
      await server.close();
    },
  };
}

/** Resolve when `source` emits a value matching `pred`, or fail after `ms`. */
export function next<V>(source: Observable<V>, pred: (v: V) => boolean = () => true, ms = 5000): Promise<V> {
  return firstValueFrom(source.pipe(filter(pred), rxTimeout(ms)));
}

/** Resolve when the client reaches `state` (already there counts), or fail after `ms`. */
export function reach(client: SyncClient, state: string, ms = 5000): Promise<string> {
  return next(client.state$, (s) => s === state, ms);
}

/** Poll a condition on each event-loop turn, bounded; for conditions with no event to await. */
export async function until(cond: () => boolean, ms = 5000, label = 'condition'): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${label}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

/** Every operation id applied exactly once. */
export function appliedOnce(ledger: Ledger, ids: string[]): void {
  for (const id of ids) {
    const n = ledger.applied.get(id) ?? 0;
    if (n !== 1) throw new Error(`operation ${id} applied ${n} times`);
  }
}
