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

/**
 * One operation waiting in a durable outbox.
 *
 * The client hands `add` entries with `json`: the operation as the JSON text `send()` made of
 * it, once, when it was called (README "Operations are JSON"), which is what its `SYN` carries.
 * A storage keeps that text (or a value parsed from it), never a reference to the caller's
 * object, which the caller may change after `send()`. `load` returns entries with `json`, or
 * with the operation as a value in `op` (IndexedDB rows, state files, and anything an earlier
 * version wrote, whose entries had only `op`); the client resends `json` as it is.
 */
export interface OutboxEntry {
  /** Unique for the clientId across instances: `${instance}:o${n}`. */
  key: string;
  /** Milliseconds since the epoch when `send()` accepted it, then `n`: the replay order. */
  at: number;
  n: number;
  /** The operation as JSON text, exactly as `send()` made it. Set on every entry given to `add`. */
  json?: string;
  /** The operation as a value (parsed from `json`): what `load` may return instead of `json`. */
  op?: unknown;
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
   * Take the exclusive lock of `clientId` (the browser, memory) or of the whole storage (a
   * file) for this instance's life. Gives (or resolves with) its release function (the client
   * awaits it in `close()`), or `null` when another live instance holds it (a duplicated tab,
   * a second process on the same file, a second live client on one `memoryStorage()` object).
   * May complete synchronously (memory).
   */
  claim(clientId: string): Promise<(() => void | Promise<void>) | null> | (() => void | Promise<void>) | null;
  /**
   * What a client whose `claim` gave `null` does (and it was given no `clientId` option):
   * `'rename'` takes a new clientId in this same storage (webStorage: the key/value store is
   * the tab's own `sessionStorage`, a duplicated tab's copy); `'private'` leaves this storage
   * alone, as fileStorage's second live client does: it reports a `storage` failure saying the
   * storage is in use and works from a new `memoryStorage()` of its own, under a new clientId
   * (or the `clientId` option), so nothing of it is kept in, or read from, the shared storage
   * (memoryStorage: the key/value store is shared by every client of the object).
   * @default 'rename'
   */
  refused?: 'rename' | 'private';
  /**
   * The live client holding `clientId`'s claim has begun `close()` (called once, synchronously,
   * by `close()` before anything is awaited, and by a client closed while its claim was under
   * way as soon as it holds it). From then on a claim of `clientId` on this storage object
   * waits for that holder's release and is then granted (it takes the identity and the outbox,
   * as a reload does) instead of being refused. Storages without it refuse such a claim until
   * the release. @default none
   */
  closing?(clientId: string): void;
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

/** The entry a Map outbox keeps: `json` only (never the caller's object); null when unusable. */
function keep(e: Partial<OutboxEntry> | null | undefined): OutboxEntry | null {
  if (!e || typeof e.key !== 'string') return null;
  let json = e.json;
  if (typeof json !== 'string') {
    // Written by an earlier version (or a value read from a file): its JSON, made once here.
    try {
      json = JSON.stringify(e.op);
    } catch {
      return null;
    }
    if (json === undefined) return null;
  }
  return { key: e.key, at: Number(e.at) || 0, n: Number(e.n) || 0, json };
}

/**
 * An outbox kept in a Map: what a memory or file storage builds on. It keeps each operation's
 * JSON text (`OutboxEntry.json`), never the object given to `send()`: changing that object
 * afterwards changes nothing stored or resent.
 */
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
    for (const e of entries) {
      // The client's entries carry `json` (and no `op`): kept as they are, no copy per op.
      const k = e.json !== undefined && e.op === undefined ? e : keep(e);
      if (k) d.ops.set(k.key, k);
    }
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

  /**
   * JSON text of the whole outbox, for the file storage (clientIds with nothing stored are
   * left out): `{ [clientId]: { ops: [{ key, at, n, op }], batches: [{ id, keys }] } }`, each
   * `op` written as the entry's JSON text as it is (no second stringify per operation). The
   * format is the one earlier versions wrote, so either version reads the other's file.
   */
  toText(): string {
    let out = '{';
    for (const [id, d] of this.data) {
      if (d.ops.size === 0 && d.batches.size === 0) continue;
      if (out.length > 1) out += ',';
      out += `${JSON.stringify(id)}:{"ops":[`;
      let first = true;
      for (const e of d.ops.values()) {
        out += `${first ? '' : ','}{"key":${JSON.stringify(e.key)},"at":${JSON.stringify(e.at)},"n":${JSON.stringify(e.n)},"op":${e.json}}`;
        first = false;
      }
      out += `],"batches":${JSON.stringify([...d.batches.values()])}}`;
    }
    return `${out}}`;
  }

  /** The outbox as a value (`toText` parsed). */
  toJSON(): Record<string, OutboxSnapshot> {
    return JSON.parse(this.toText()) as Record<string, OutboxSnapshot>;
  }

  /** Inverse of toText/toJSON (entries with `op` or `json`); ignores malformed entries. */
  static fromJSON(raw: unknown, changed?: () => void): MapOutbox {
    const o = new MapOutbox(changed);
    if (!raw || typeof raw !== 'object') return o;
    for (const [id, snap] of Object.entries(raw as Record<string, Partial<OutboxSnapshot>>)) {
      const d = o.of(id);
      for (const e of Array.isArray(snap?.ops) ? snap.ops : []) {
        const k = keep(e);
        if (k) d.ops.set(k.key, k);
      }
      for (const b of Array.isArray(snap?.batches) ? snap.batches : []) {
        if (b && typeof b.id === 'string' && Array.isArray(b.keys)) d.batches.set(b.id, b);
      }
    }
    return o;
  }
}

/**
 * The clientIds held by live clients of one storage object (one live client per clientId), and
 * which of those holders began `close()` (`SyncLocks.closing`): a claim of such a clientId waits
 * for its release, then takes the identity and the outbox. Used by `memoryStorage` and
 * `fileStorage`.
 */
export class Holders {
  private readonly held = new Set<string>();
  private readonly closing = new Map<string, { done: Promise<void>; resolve: () => void }>();
  has(clientId: string): boolean {
    return this.held.has(clientId);
  }
  add(clientId: string): void {
    this.held.add(clientId);
  }
  /** No longer held; a claim waiting for its release still waits (see `release`). */
  delete(clientId: string): void {
    this.held.delete(clientId);
  }
  /** Released: no longer held, and a claim waiting for it goes on. */
  release(clientId: string): void {
    this.held.delete(clientId);
    const l = this.closing.get(clientId);
    this.closing.delete(clientId);
    l?.resolve();
  }
  /** `SyncLocks.closing`: the holder began `close()` (nothing when not held or already marked). */
  markClosing(clientId: string): void {
    if (!this.held.has(clientId) || this.closing.has(clientId)) return;
    let resolve!: () => void;
    const done = new Promise<void>((r) => {
      resolve = r;
    });
    this.closing.set(clientId, { done, resolve });
  }
  /** The release a claim of `clientId` waits for, when its holder is closing. */
  leaving(clientId: string): Promise<void> | undefined {
    return this.closing.get(clientId)?.done;
  }
}

/**
 * In memory: survives nothing across processes or reloads; the outbox survives a `close()` and a
 * new client on the same storage object (same process). The default.
 *
 * **One live client per clientId.** A client holds its clientId's claim on this object from
 * its creation until `close()` (synchronous `locks`, `refused: 'private'`). A second live
 * client on the same object that would take the same clientId (the stored one, or the same
 * `clientId` option) gets a `storage` failure saying the storage is in use, and works from a
 * memory storage of its own under its own new clientId (or the option's): it never loads the
 * first one's outbox (which would send its operations twice) nor writes its identity or
 * cursors here. Once the first is closed, a new client on the object takes the identity and
 * sends what is left; one created while the first is closing (its `close()` called, not yet
 * resolved: `SyncLocks.closing`) waits for its release and then takes them, whatever the tick. Clients with different `storageKey`s have different clientIds and
 * share the object freely. No orphan adoption (nothing outlives the process).
 */
export function memoryStorage(): SyncStorage {
  const map = new Map<string, string>();
  const holders = new Holders();
  const take = (clientId: string) => {
    holders.add(clientId);
    return () => holders.release(clientId);
  };
  const claim = (clientId: string): (() => void) | null | Promise<(() => void) | null> => {
    const leaving = holders.leaving(clientId);
    // The holder is closing: wait for its release, then take the identity and the outbox.
    if (leaving) return leaving.then(() => claim(clientId));
    if (holders.has(clientId)) return null;
    return take(clientId);
  };
  return {
    get: (k) => map.get(k) ?? null,
    set: (k, v) => void map.set(k, v),
    outbox: new MapOutbox(),
    locks: {
      claim,
      closing: (clientId) => holders.markClosing(clientId),
      refused: 'private',
      watch: () => () => {},
    },
  };
}

export { type WebStorageOptions, webStorage } from './web-storage.js';
