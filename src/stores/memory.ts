/**
 * The default history store: channel history in this process's memory. Fast and free of
 * dependencies, but history dies with the process, which is why every channel gets a fresh
 * epoch when first seen: a restarted server tells its clients `recovered: false` instead of
 * pretending that seq 1 now is seq 1 then. Dedupe stays in the server (not a `DedupeStore`).
 */

import { randomId, SyncError } from '../protocol/index.js';
import {
  type ChannelHead,
  DEFAULT_RETENTION,
  type HistoryStore,
  notify,
  type RetentionOptions,
  type StoredMessage,
} from './types.js';

export interface MemoryStoreOptions extends RetentionOptions {
  /** Clock used to stamp and age messages; tests inject one instead of sleeping. @default Date.now */
  now?: () => number;
  /**
   * Most payload bytes (UTF-8 of the payload's JSON) one channel retains; its oldest messages
   * are evicted first to stay under it (the newest one is always kept, whatever its size).
   * Replay from before the eviction is a reset (`recovered: false`, PROTOCOL §3 rule 6).
   * @default 33554432 (32 MiB)
   */
  maxBytesPerChannel?: number;
  /**
   * Most payload bytes all channels together retain; the oldest message of the whole store
   * is evicted first (the newest one is always kept). @default 67108864 (64 MiB)
   */
  maxBytes?: number;
}

/** Defaults of the memory store's byte bounds (README "Limits"). */
export const MEMORY_STORE_DEFAULTS = {
  maxBytesPerChannel: 32 * 1024 * 1024,
  maxBytes: 64 * 1024 * 1024,
} as const;

interface ChannelLog {
  epoch: string;
  /** Last seq appended. */
  seq: number;
  /** Retained messages live in `msgs[start..]`, seqs dense and ascending. */
  msgs: StoredMessage[];
  /** Payload bytes of `msgs[i]`, same indexes. */
  sizes: number[];
  start: number;
  /** Payload bytes of the retained messages. */
  bytes: number;
}

/** One append, in store-wide append order, for the `maxBytes` eviction. */
interface Appended {
  c: ChannelLog;
  seq: number;
}

/** The memory store: a `HistoryStore` that also tells how many payload bytes it retains. */
export interface MemoryStore extends HistoryStore {
  /** Payload bytes retained, all channels together (bounded by `maxBytes`). */
  retainedBytes(): number;
}

/**
 * A `HistoryStore` in this process's memory. Retention per channel: the newest `maxMessages`
 * (10 000) messages, none older than `maxAgeMs` (a day), at most `maxBytesPerChannel`
 * (32 MiB) of payload; and at most `maxBytes` (64 MiB) of payload in all, oldest evicted
 * first. Throws `RangeError` for a bound that is not > 0.
 */
export function memoryStore(options: MemoryStoreOptions = {}): MemoryStore {
  const maxMessages = options.maxMessages ?? DEFAULT_RETENTION.maxMessages;
  const maxAgeMs = options.maxAgeMs ?? DEFAULT_RETENTION.maxAgeMs;
  const maxBytesPerChannel = options.maxBytesPerChannel ?? MEMORY_STORE_DEFAULTS.maxBytesPerChannel;
  const maxBytes = options.maxBytes ?? MEMORY_STORE_DEFAULTS.maxBytes;
  for (const [k, v] of [
    ['maxMessages', maxMessages],
    ['maxAgeMs', maxAgeMs],
    ['maxBytesPerChannel', maxBytesPerChannel],
    ['maxBytes', maxBytes],
  ] as const) {
    if (!(v > 0)) throw new RangeError(`memoryStore: ${k} must be > 0`);
  }
  const now = options.now ?? Date.now;
  /** Payload bytes retained by every channel together. */
  let total = 0;
  /** Every retained append (and some already trimmed, skipped when met), oldest first. */
  let order: Appended[] = [];
  let orderStart = 0;
  const channels = new Map<string, ChannelLog>();
  const listeners = new Set<(msg: StoredMessage) => void>();
  let closed = false;

  const log = (channel: string): ChannelLog => {
    let c = channels.get(channel);
    if (!c) {
      c = { epoch: randomId('e'), seq: 0, msgs: [], sizes: [], start: 0, bytes: 0 };
      channels.set(channel, c);
    }
    return c;
  };

  /** Seq of the first retained message of `c`. */
  const firstSeq = (c: ChannelLog) => c.seq - (c.msgs.length - c.start) + 1;

  /** Drop the oldest retained message of `c`. */
  const evictOne = (c: ChannelLog) => {
    const size = c.sizes[c.start]!;
    c.bytes -= size;
    total -= size;
    c.start++;
  };

  const compact = (c: ChannelLog) => {
    // Compact lazily so trimming one message is O(1) amortised rather than a shift.
    if (c.start > 64 && c.start * 2 >= c.msgs.length) {
      c.msgs = c.msgs.slice(c.start);
      c.sizes = c.sizes.slice(c.start);
      c.start = 0;
    }
  };

  const trimLog = (c: ChannelLog, at: number) => {
    const cutoff = at - maxAgeMs;
    const minStart = c.msgs.length - maxMessages;
    while (c.start < minStart) evictOne(c);
    // Appends are in time order, so aged messages are all at the front.
    while (c.start < c.msgs.length && c.msgs[c.start]!.at < cutoff) evictOne(c);
    // The byte bound, oldest first; the newest message stays whatever its size.
    while (c.bytes > maxBytesPerChannel && c.start < c.msgs.length - 1) evictOne(c);
    compact(c);
  };

  /**
   * Evict the store's oldest messages until `maxBytes` holds (the newest append stays). The
   * oldest retained message of the store is the first retained of its channel, since each
   * channel appends in order; entries of messages trimmed already are skipped.
   */
  const trimTotal = () => {
    while (total > maxBytes && orderStart < order.length - 1) {
      const { c, seq } = order[orderStart]!;
      orderStart++;
      if (c.start < c.msgs.length && seq === firstSeq(c) && channels.get(c.msgs[c.start]!.channel) === c) {
        evictOne(c);
        compact(c);
      }
    }
    if (orderStart > 1024 && orderStart * 2 >= order.length) {
      order = order.slice(orderStart);
      orderStart = 0;
    }
  };

  /** Forget the `order` entries of trimmed messages once they are most of it (bounded memory). */
  const pruneOrder = () => {
    if (order.length - orderStart <= 1024) return;
    let live = 0;
    for (const c of channels.values()) live += c.msgs.length - c.start;
    if (order.length - orderStart <= 2 * live) return;
    order = order
      .slice(orderStart)
      .filter(({ c, seq }) => channels.get(c.msgs[0]?.channel ?? '') === c && seq >= firstSeq(c));
    orderStart = 0;
  };

  const ensureOpen = () => {
    if (closed) throw new SyncError('closed', 'memory store is closed');
  };

  return {
    kind: 'memory',

    async append(channel, payload, opts = {}) {
      ensureOpen();
      const c = log(channel);
      const at = now();
      const seq = ++c.seq;
      const msg: StoredMessage = { channel, seq, epoch: c.epoch, id: `${c.epoch}.${seq}`, payload, at };
      if (opts.except !== undefined) msg.except = opts.except;
      if (opts.author !== undefined) msg.author = opts.author;
      const size = Buffer.byteLength(JSON.stringify(payload) ?? 'null');
      c.msgs.push(msg);
      c.sizes.push(size);
      c.bytes += size;
      total += size;
      order.push({ c, seq });
      trimLog(c, at);
      trimTotal();
      notify(listeners, msg);
      return msg;
    },

    async read(channel, after, limit, maxBytes = Number.POSITIVE_INFINITY) {
      ensureOpen();
      const c = channels.get(channel);
      if (!c || limit <= 0) return [];
      const from = c.start + Math.max(0, after + 1 - firstSeq(c));
      const to = Math.min(c.msgs.length, from + limit);
      if (maxBytes === Number.POSITIVE_INFINITY) return c.msgs.slice(from, to);
      // Each message's size (its payload's JSON text) is kept beside it for retention: a page
      // stops at the bound, always after at least one message.
      let end = from;
      let bytes = 0;
      while (end < to) {
        const size = c.sizes[end]!;
        if (end > from && bytes + size > maxBytes) break;
        bytes += size;
        end++;
      }
      return c.msgs.slice(from, end);
    },

    async head(channel): Promise<ChannelHead> {
      ensureOpen();
      const c = log(channel);
      return { epoch: c.epoch, seq: c.seq, first: firstSeq(c) };
    },

    async heads(names) {
      ensureOpen();
      return names.map((channel) => {
        const c = log(channel);
        return { epoch: c.epoch, seq: c.seq, first: firstSeq(c) };
      });
    },

    async trim(opts = {}) {
      ensureOpen();
      const at = now();
      for (const [name, c] of channels) {
        trimLog(c, at);
        if (opts.free && c.start >= c.msgs.length && opts.free(name)) channels.delete(name);
      }
      pruneOrder();
    },

    async releaseChannels(names: string[], free: (name: string) => boolean): Promise<number> {
      ensureOpen();
      let n = 0;
      for (const name of names) {
        const c = channels.get(name);
        if (c && c.seq === 0 && free(name)) {
          channels.delete(name);
          n++;
        }
      }
      return n;
    },

    async channelCount() {
      return channels.size;
    },

    async hasChannel(channel) {
      return channels.has(channel);
    },

    watch(listener) {
      listeners.add(listener);
      return () => {
        listeners.delete(listener);
      };
    },

    async close() {
      closed = true;
      listeners.clear();
      channels.clear();
      order = [];
      total = 0;
    },

    retainedBytes() {
      return total;
    },
  };
}
