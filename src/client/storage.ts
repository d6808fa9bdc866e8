/**
 * Where a client keeps what must survive a reload: its clientId, its channel cursors (small,
 * synchronous key/value: `get`/`set`) and its outbox (the operations accepted by `send()` and
 * not yet settled: `outbox`, possibly asynchronous). The Node file storage lives in
 * `syncwire/storage/file` (./file-storage.ts), so that browser bundles never meet `node:fs`;
 * the browser storage is ./web-storage.ts.
 *
 * Storages never throw into the event loop: a failed write is handed to the handler the client
 * installs with `onError` (the client reports it on `failures$` with kind `storage`) and the
 * client keeps working from memory.
 */

/** One operation waiting in a durable outbox. */
export interface OutboxEntry {
  /** Unique for the clientId across instances: `${instance}:o${n}`. */
  key: string;
  /** Milliseconds since the epoch when `send()` accepted it, then `n`: the replay order. */
  at: number;
  n: number;
  /** The operation, as given to `send()` (must be JSON / structured-clone serializable). */
  op: unknown;
}

/** A SYN formed from outbox entries: resent after a restart with this id and exactly these keys. */
export interface OutboxBatch {
  id: string;
  keys: string[];
}

/** What a durable outbox holds for one clientId. */
export interface OutboxSnapshot {
  ops: OutboxEntry[];
  batches: OutboxBatch[];
}

/**
 * A durable outbox, per clientId. Methods may return a promise (IndexedDB) or complete
 * synchronously (memory, file). A rejected promise or a throw is a storage failure: the client
 * reports it and keeps the operation in memory.
 */
export interface SyncOutbox {
  /** Everything stored for `clientId`, in any order. */
  load(clientId: string): OutboxSnapshot | Promise<OutboxSnapshot>;
  /** Store entries; the client sends them only once this has completed. */
  add(clientId: string, entries: OutboxEntry[]): void | Promise<void>;
  /**
   * Record a batch just before it is sent. Synchronous, and durable when it returns: a crash
   * right after must not lose it (the next instance must resend the same id with the same ops).
   */
  batch(clientId: string, batch: OutboxBatch): void;
  /** Remove settled entries, and every batch that holds one of them. */
  remove(clientId: string, keys: string[]): void | Promise<void>;
}

/**
 * Exclusive use of a storage by one live client: per clientId in a browser (Web Locks; absent
 * without `navigator.locks`), per file for `fileStorage` (proper-lockfile).
 */
export interface SyncLocks {
  /**
   * Take the exclusive lock of `clientId` (the browser) or of the whole storage (a file) for
   * this instance's life. Resolves with its release function (the client awaits it in
   * `close()`), or `null` when another live instance holds it (a duplicated tab, a second
   * process on the same file).
   */
  claim(clientId: string): Promise<(() => void | Promise<void>) | null>;
  /**
   * Watch for orphaned outboxes: `adopt(clientId)` runs, holding that clientId's lock, for each
   * clientId of this app whose owner went away leaving operations; the lock is released when the
   * returned promise settles. Returns a function that stops watching.
   */
  watch(self: string, adopt: (clientId: string) => Promise<void>): () => void;
}

export interface SyncStorage {
  get(key: string): string | null;
  set(key: string, value: string): void;
  /** The durable outbox. @default none: the client keeps its outbox in memory only */
  outbox?: SyncOutbox;
  /** Exclusive use and orphan adoption (web and file storages). @default none */
  locks?: SyncLocks;
  /** The client installs its failure handler here (kind `storage` on `failures$`). */
  onError?(handler: (err: unknown) => void): void;
}

/** An outbox kept in a Map: what a memory or file storage builds on. */
export class MapOutbox implements SyncOutbox {
  readonly data = new Map<string, { ops: Map<string, OutboxEntry>; batches: Map<string, OutboxBatch> }>();

  constructor(private readonly changed: () => void = () => {}) {}

  private of(clientId: string) {
    let d = this.data.get(clientId);
    if (!d) {
      d = { ops: new Map(), batches: new Map() };
      this.data.set(clientId, d);
    }
    return d;
  }

  load(clientId: string): OutboxSnapshot {
    const d = this.data.get(clientId);
    return { ops: d ? [...d.ops.values()] : [], batches: d ? [...d.batches.values()] : [] };
  }

  add(clientId: string, entries: OutboxEntry[]): void {
    const d = this.of(clientId);
    for (const e of entries) d.ops.set(e.key, e);
    this.changed();
  }

  batch(clientId: string, batch: OutboxBatch): void {
    this.of(clientId).batches.set(batch.id, batch);
    this.changed();
  }

  remove(clientId: string, keys: string[]): void {
    const d = this.data.get(clientId);
    if (!d) return;
    const gone = new Set(keys);
    for (const k of keys) d.ops.delete(k);
    for (const [id, b] of d.batches) if (b.keys.some((k) => gone.has(k))) d.batches.delete(id);
    // An emptied clientId keeps its (empty) maps: the next add reuses them instead of making
    // new ones per operation; toJSON leaves it out.
    this.changed();
  }

  /** JSON form, for the file storage (clientIds with nothing stored are left out). */
  toJSON(): Record<string, OutboxSnapshot> {
    const out: Record<string, OutboxSnapshot> = {};
    for (const [id, d] of this.data) if (d.ops.size > 0 || d.batches.size > 0) out[id] = this.load(id);
    return out;
  }

  /** Inverse of toJSON; ignores malformed entries. */
  static fromJSON(raw: unknown, changed?: () => void): MapOutbox {
    const o = new MapOutbox(changed);
    if (!raw || typeof raw !== 'object') return o;
    for (const [id, snap] of Object.entries(raw as Record<string, Partial<OutboxSnapshot>>)) {
      const d = o.of(id);
      for (const e of Array.isArray(snap?.ops) ? snap.ops : []) {
        if (e && typeof e.key === 'string') d.ops.set(e.key, e);
      }
      for (const b of Array.isArray(snap?.batches) ? snap.batches : []) {
        if (b && typeof b.id === 'string' && Array.isArray(b.keys)) d.batches.set(b.id, b);
      }
    }
    return o;
  }
}

/**
 * In memory: survives nothing across processes or reloads; the outbox survives a `close()` and a
 * new client on the same storage object (same process). The default.
 */
export function memoryStorage(): SyncStorage {
  const map = new Map<string, string>();
  return { get: (k) => map.get(k) ?? null, set: (k, v) => void map.set(k, v), outbox: new MapOutbox() };
}

export { type WebStorageOptions, webStorage } from './web-storage.js';
