/**
 * The browser storage: identity and cursors in `sessionStorage` (per tab, survives the tab's
 * reload), the outbox in IndexedDB (through `idb`), batch records in `localStorage` (written
 * synchronously just before a batch is sent, readable by other tabs), Web Locks to tell live
 * clients from dead ones and to adopt the outbox a closed tab left behind.
 */
import { type IDBPDatabase, openDB } from 'idb';
import type {
  OutboxBatch,
  OutboxEntry,
  OutboxSnapshot,
  SyncLocks,
  SyncOutbox,
  SyncStorage,
} from './storage.js';

export interface WebStorageOptions {
  /**
   * Name of the IndexedDB database, of the Web Locks (`${name}:${clientId}`), of the
   * BroadcastChannel and prefix of the `localStorage` batch records. Two apps on one origin
   * must use different names. @default 'syncwire'
   */
  name?: string;
  /** Keep a durable outbox in IndexedDB (when the platform has it). @default true */
  outbox?: boolean;
}

type KV = Pick<Storage, 'getItem' | 'setItem'>;

interface Row extends OutboxEntry {
  clientId: string;
}

/**
 * A browser storage. `store` keeps clientId and cursors: `sessionStorage` by default, so that
 * each tab is its own client (pass `localStorage` to share one identity, which the tabs then
 * must not use at the same time). Failures (quota, private mode, IndexedDB blocked) go to the
 * client's `failures$` (kind `storage`); the client then keeps working from memory.
 */
export function webStorage(store?: KV, options: WebStorageOptions = {}): SyncStorage {
  const kv: KV | undefined = store ?? (globalThis as { sessionStorage?: Storage }).sessionStorage;
  const name = options.name ?? 'syncwire';
  let onError: (err: unknown) => void = () => {};
  const report = (err: unknown) => {
    try {
      onError(err);
    } catch {
      // never into the event loop
    }
  };
  const storage: SyncStorage = {
    get: (k) => {
      try {
        return kv?.getItem(k) ?? null;
      } catch (err) {
        report(err);
        return null;
      }
    },
    set: (k, v) => {
      try {
        kv?.setItem(k, v);
      } catch (err) {
        // Quota exceeded or private mode: the value then lives only in memory.
        report(err);
      }
    },
    onError: (h) => {
      onError = h;
    },
  };
  const idb = (globalThis as { indexedDB?: IDBFactory }).indexedDB;
  const local = (globalThis as { localStorage?: Storage }).localStorage;
  if (options.outbox !== false && idb && local) storage.outbox = idbOutbox(name, local);
  const locks = (globalThis as { navigator?: { locks?: LockManager } }).navigator?.locks;
  if (locks && storage.outbox) storage.locks = webLocks(name, locks, storage.outbox);
  return storage;
}

function idbOutbox(name: string, local: Storage): SyncOutbox & { owners(): Promise<string[]> } {
  let db: Promise<IDBPDatabase> | undefined;
  const open = () => {
    db ??= openDB(name, 1, {
      upgrade(d) {
        const s = d.createObjectStore('ops', { keyPath: ['clientId', 'key'] });
        s.createIndex('clientId', 'clientId');
      },
    });
    // A failed open is retried on the next call.
    db.catch(() => {
      db = undefined;
    });
    return db;
  };
  const batchKey = (clientId: string) => `${name}:batches:${clientId}`;
  const readBatches = (clientId: string): OutboxBatch[] => {
    const raw = local.getItem(batchKey(clientId));
    if (!raw) return [];
    const parsed = JSON.parse(raw) as unknown;
    return Array.isArray(parsed) ? (parsed as OutboxBatch[]) : [];
  };
  const writeBatches = (clientId: string, list: OutboxBatch[]) => {
    if (list.length === 0) local.removeItem(batchKey(clientId));
    else local.setItem(batchKey(clientId), JSON.stringify(list));
  };
  return {
    async load(clientId): Promise<OutboxSnapshot> {
      const d = await open();
      const rows = (await d.getAllFromIndex('ops', 'clientId', clientId)) as Row[];
      return {
        // Rows hold the operation as a value (`op`), as every version wrote them.
        ops: rows.map(({ key, at, n, op, json }) =>
          typeof json === 'string' ? { key, at, n, json } : { key, at, n, op },
        ),
        batches: readBatches(clientId),
      };
    },
    async add(clientId, entries) {
      const d = await open();
      const tx = d.transaction('ops', 'readwrite');
      // The value parsed from the JSON send() made (never the app's object, which it may change
      // after send()): the row format earlier versions wrote and read, `op` as a value.
      for (const e of entries) {
        const op = e.json !== undefined ? JSON.parse(e.json) : e.op;
        void tx.store.put({ key: e.key, at: e.at, n: e.n, op, clientId });
      }
      await tx.done;
    },
    batch(clientId, batch) {
      writeBatches(clientId, [...readBatches(clientId).filter((b) => b.id !== batch.id), batch]);
    },
    async remove(clientId, keys) {
      const gone = new Set(keys);
      writeBatches(
        clientId,
        readBatches(clientId).filter((b) => !b.keys.some((k) => gone.has(k))),
      );
      const d = await open();
      const tx = d.transaction('ops', 'readwrite');
      for (const k of keys) void tx.store.delete([clientId, k]);
      await tx.done;
    },
    async owners() {
      const d = await open();
      const ids = new Set<string>();
      let cursor = await d.transaction('ops').store.index('clientId').openKeyCursor(null, 'nextunique');
      while (cursor) {
        ids.add(String(cursor.key));
        cursor = await cursor.continue();
      }
      return [...ids];
    },
  };
}

/** How long a tab waits for its stored identity's lock before taking a new identity. */
const CLAIM_GRACE_MS = 1000;

function webLocks(
  name: string,
  locks: LockManager,
  outbox: SyncOutbox & { owners?: () => Promise<string[]> },
): SyncLocks {
  const lockName = (clientId: string) => `${name}:${clientId}`;
  return {
    async claim(clientId) {
      const take = (opts: LockOptions) =>
        new Promise<(() => void) | null>((resolve, reject) => {
          locks
            .request(lockName(clientId), opts, (lock) => {
              if (!lock) {
                resolve(null);
                return undefined;
              }
              // Held until released (or until the page goes away).
              return new Promise<void>((release) => resolve(() => release()));
            })
            .catch((err: unknown) => {
              if ((err as { name?: string })?.name === 'AbortError') resolve(null);
              else reject(err);
            });
        });
      const now = await take({ ifAvailable: true });
      if (now) return now;
      // Held: by the tab this one was duplicated from (alive: give up after the grace), or
      // briefly by another tab checking this id's outbox after our own reload (then it is
      // released within the grace and this tab keeps its identity).
      const stop = new AbortController();
      const timer = setTimeout(() => stop.abort(), CLAIM_GRACE_MS);
      try {
        return await take({ signal: stop.signal });
      } finally {
        clearTimeout(timer);
      }
    },
    watch(self, adopt) {
      const stop = new AbortController();
      const waiting = new Set<string>();
      const waitFor = (clientId: string) => {
        if (clientId === self || waiting.has(clientId) || stop.signal.aborted) return;
        waiting.add(clientId);
        // Granted when the owner's page goes away (or at once when it already has).
        locks
          .request(lockName(clientId), { signal: stop.signal }, async () => {
            waiting.delete(clientId);
            if (stop.signal.aborted) return;
            const snap = await outbox.load(clientId);
            if (snap.ops.length > 0) await adopt(clientId);
          })
          .catch(() => waiting.delete(clientId));
      };
      const Channel = (globalThis as { BroadcastChannel?: typeof BroadcastChannel }).BroadcastChannel;
      const channel = Channel ? new Channel(`${name}:clients`) : undefined;
      if (channel) {
        channel.onmessage = (ev: MessageEvent) => {
          const m = ev.data as { hello?: string; here?: string };
          if (typeof m?.hello === 'string') {
            waitFor(m.hello);
            channel.postMessage({ here: self });
          } else if (typeof m?.here === 'string') waitFor(m.here);
        };
        channel.postMessage({ hello: self });
      }
      outbox
        .owners?.()
        .then((ids) => {
          for (const id of ids) waitFor(id);
        })
        .catch(() => {});
      return () => {
        stop.abort();
        channel?.close();
      };
    },
  };
}
