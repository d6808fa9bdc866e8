/**
 * The seams between the reference server and where channel history (`HistoryStore`) and
 * dedupe memory (`DedupeStore`) live. memoryStore (default), sqliteStore and redisStore
 * implement `HistoryStore`, the last two `DedupeStore` too; one contract suite
 * (test/stores.contract.test.ts) runs against every one of them.
 */

/** One published message, as the store keeps it. */
export interface StoredMessage {
  channel: string;
  /** Dense per channel, starting at 1 within an epoch. */
  seq: number;
  /** Changes whenever the channel's history is lost or reset. */
  epoch: string;
  /** Server-made message id (unique across channels). */
  id: string;
  payload: unknown;
  /** Milliseconds since the epoch, when it was appended. */
  at: number;
  /** clientId of the author not to echo the payload to (see docs/PROTOCOL.md, "echo"). */
  except?: string;
  /**
   * clientId of the author: its copies carry `echo: true` (with the payload unless `except`
   * names it too). See docs/consistency.md.
   */
  author?: string;
}

/** Where a channel stands. */
export interface ChannelHead {
  epoch: string;
  /** Last seq appended, 0 when nothing was. */
  seq: number;
  /** Oldest seq still retained; `seq + 1` when nothing is retained. */
  first: number;
}

/** What a dedupe key holds: nothing yet (`new`, now claimed), a claim being processed, or the stored answer. */
export type DedupeClaim = { status: 'new' } | { status: 'pending' } | { status: 'done'; response: unknown };

export interface AppendOptions {
  /** clientId not to echo the payload to. */
  except?: string;
  /** clientId of the author, whose copies are marked `echo: true`. */
  author?: string;
  /**
   * Idempotency key. A shared store appends once per key (within a window) and answers a
   * repeat with the first append's message: a batch re-run by another process after a crash
   * does not publish twice. Single-process stores may ignore it.
   */
  key?: string;
}

export interface HistoryStore {
  /** Store name for logs and the visualizer: 'memory', 'sqlite', 'redis'. */
  readonly kind: string;
  /**
   * Append a message to a channel: the next dense `seq` in the current epoch.
   * Concurrent appends (also from other processes, for shared stores) never share a seq.
   */
  append(channel: string, payload: unknown, opts?: AppendOptions): Promise<StoredMessage>;
  /**
   * Messages with `seq > after`, ascending, at most `limit`. Only retained ones. With
   * `maxBytes`, the store may also stop early once the messages read hold that many payload
   * bytes (measured as the length of the payload's JSON text), always returning at least one
   * message when any is there, so a reader makes progress (issue 12: one 1 000-message page of
   * 400 KB messages was 400 MB read at once). The SQLite, memory and Redis stores honour it; a
   * store that ignores it is still correct, only less bounded (the server pages on).
   */
  read(channel: string, after: number, limit: number, maxBytes?: number): Promise<StoredMessage[]>;
  /** The channel's epoch, last seq and first retained seq. Creates the epoch when new. */
  head(channel: string): Promise<ChannelHead>;
  /**
   * `head` of several channels at once, in order (one transaction for SQLite: a `SUB` of
   * 1 000 new channels took ~200 ms as 1 000 transactions). Optional: the server calls `head`
   * per channel without it.
   */
  heads?(channels: string[]): Promise<ChannelHead[]>;
  /**
   * Apply the store's `maxMessages` / `maxAgeMs` now (stores also trim on their own). With
   * `free`, also forget every channel that has no message left and for which `free(name)` is
   * true (the server passes "no live subscriber here"): its entry, row or keys are deleted, so
   * channel names that come and go leave nothing behind. A freed channel that is used again
   * starts a new epoch (clients with an old cursor learn `recovered: false`, never a silent gap).
   */
  trim(opts?: TrimOptions): Promise<void>;
  /**
   * How many channels the store keeps state for (entries, rows or key pairs). With it the
   * server bounds channel records server-wide (`maxChannels`); it is asked before each `SUB`,
   * so it must be cheap (memory, SQLite and Redis answer it in O(1)).
   */
  channelCount?(): Promise<number>;
  /**
   * Forget, right away, the records of those `channels` that were never appended to (seq 0,
   * no history) and for which `free(name)` is true, asked synchronously at the moment of
   * deletion (the server passes "no live subscriber here"); resolves with how many were
   * forgotten. A record `head` made for a `SUB` or poll then lives only as long as someone
   * follows it, not until housekeeping. Safe for cursors: a client that saw nothing of the
   * channel (`since: 0`) is not reset by the new epoch the record gets when made again
   * (PROTOCOL §3 rule 6). Optional: without it, only `trim({ free })` frees records.
   */
  releaseChannels?(channels: string[], free: (name: string) => boolean): Promise<number>;
  /**
   * Whether the store keeps state for `channel`, without creating it (unlike `head`). The
   * server asks it for the channels of a `SUB` while `maxChannels` are kept; without it every
   * channel not live in the process counts as new there.
   */
  hasChannel?(channel: string): Promise<boolean>;
  /**
   * A message to every other server process sharing this store (revocations across
   * processes). Stores without processes to share with leave it out: the server then acts
   * in its own process only.
   */
  broadcast?(message: unknown): Promise<void>;
  /**
   * Receive `broadcast`s of every process (own included). Resolves, once receiving, with an
   * unsubscribe.
   */
  onBroadcast?(listener: (message: unknown) => void): Promise<() => void>;
  /**
   * The live feed: every message appended to any channel, by this process or, for a shared
   * store, by any other, delivered per channel in `seq` order. Returns an unsubscribe.
   */
  watch(listener: (msg: StoredMessage) => void): () => void;

  /** Release connections, files and timers. */
  close(): Promise<void>;
}

/** Caps the server passes to `DedupeStore.complete`: the store evicts its oldest answered entries to stay under both. */
export interface DedupeLimits {
  /** Most answered entries kept (the server's `dedupeMaxEntries`). */
  maxEntries: number;
  /** Most bytes of stored values kept, UTF-8 of their JSON (the server's `dedupeMaxBytes`). */
  maxBytes: number;
  /**
   * Whose entry this is: the key the client's limits count under (`p:<principalKey>`,
   * `a:<address>` or `c:<clientId>`). Under the caps a store evicts from the holder with the
   * most entries (or bytes) first, oldest first within it (FIX14C), so one principal's flood
   * evicts its own answers. Absent: one holder for all (oldest first overall).
   */
  holder?: string;
}

/**
 * Dedupe memory for `(principal, clientId, SYN id)`, kept apart from `HistoryStore` so that
 * the two can live in different places. `claim` atomically marks a key as being processed; a
 * second claim sees `pending` until `complete` stores the response. Entries live `ttlMs`
 * (milliseconds). Keys and values are made by the server: values are JSON (the response with
 * the fingerprint of the request's payload), opaque to the store.
 * sqliteStore and redisStore implement it on the same object as their `HistoryStore`;
 * memoryStore does not: without a `DedupeStore` the server keeps dedupe in its own memory.
 */
export interface DedupeStore {
  claim(key: string, ttlMs: number): Promise<DedupeClaim>;
  /**
   * Store the answer of a claimed key for `ttlMs`. With `limits`, evict the oldest answered
   * entries (whole) until at most `limits.maxEntries` remain and their values total at most
   * `limits.maxBytes`. A store that ignores `limits` is unbounded but still correct.
   */
  complete(key: string, response: unknown, ttlMs: number, limits?: DedupeLimits): Promise<void>;
  /**
   * Drop a claim whose processing failed before a response existed. Optional: without it the
   * claim stays `pending` until its `ttlMs` lapses.
   */
  release?(key: string): Promise<void>;
  /**
   * Answered entries the store holds now and the bytes they count against `maxBytes` (what
   * the server's `stats().dedupeEntries`/`dedupeBytes` report with this store). Optional:
   * without it those stats report the server's in-process memory (0 with a store).
   */
  dedupeStats?(): { entries: number; bytes: number };
  /**
   * The principal binding of a clientId (docs/PROTOCOL.md §1): atomically, when `clientId` is
   * unbound, or bound to `owner`, bind it to `owner` for `ttlMs` from now and resolve `true`;
   * when it is bound to another owner (and not expired), change nothing and resolve `false`.
   * Optional: without it the server keeps bindings in its own memory (then one process does
   * not see another's bindings).
   */
  bind?(clientId: string, owner: string, ttlMs: number): Promise<boolean>;
}

/**
 * Whether `value` implements `DedupeStore` (`claim` and `complete` are functions). The server
 * uses this on its `store` when no `dedupeStore` is given, as it always has.
 */
export function isDedupeStore(value: unknown): value is DedupeStore {
  const v = value as Partial<DedupeStore> | null | undefined;
  return typeof v?.claim === 'function' && typeof v.complete === 'function';
}

export interface TrimOptions {
  /** Forget channels with no message left for which this answers true. */
  free?: (channel: string) => boolean;
}

/** Options every store understands. */
export interface RetentionOptions {
  /** Keep at most this many messages per channel. @default 10000 */
  maxMessages?: number;
  /** Drop messages older than this. @default 86400000 (one day) */
  maxAgeMs?: number;
}

export const DEFAULT_RETENTION: Required<RetentionOptions> = {
  maxMessages: 10_000,
  maxAgeMs: 86_400_000,
};

/**
 * Hand an appended message to every `watch` listener. A listener's failure must not undo an
 * append that already happened, nor keep the message from the other listeners.
 */
export function notify(listeners: Iterable<(msg: StoredMessage) => void>, msg: StoredMessage): void {
  for (const l of listeners) {
    try {
      l(msg);
    } catch {
      // swallowed on purpose, see above
    }
  }
}
