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
}

interface ChannelLog {
  epoch: string;
  /** Last seq appended. */
  seq: number;
  /** Retained messages live in `msgs[start..]`, seqs dense and ascending. */
  msgs: StoredMessage[];
  start: number;
}

/** A `HistoryStore` in this process's memory. */
export function memoryStore(options: MemoryStoreOptions = {}): HistoryStore {
  const maxMessages = options.maxMessages ?? DEFAULT_RETENTION.maxMessages;
  const maxAgeMs = options.maxAgeMs ?? DEFAULT_RETENTION.maxAgeMs;
  const now = options.now ?? Date.now;
  const channels = new Map<string, ChannelLog>();
  const listeners = new Set<(msg: StoredMessage) => void>();
  let closed = false;

  const log = (channel: string): ChannelLog => {
    let c = channels.get(channel);
    if (!c) {
      c = { epoch: randomId('e'), seq: 0, msgs: [], start: 0 };
      channels.set(channel, c);
    }
    return c;
  };

  const trimLog = (c: ChannelLog, at: number) => {
    const cutoff = at - maxAgeMs;
    const minStart = c.msgs.length - maxMessages;
    if (c.start < minStart) c.start = minStart;
    // Appends are in time order, so aged messages are all at the front.
    while (c.start < c.msgs.length && c.msgs[c.start]!.at < cutoff) c.start++;
    // Compact lazily so trimming one message is O(1) amortised rather than a shift.
    if (c.start > 64 && c.start * 2 >= c.msgs.length) {
      c.msgs = c.msgs.slice(c.start);
      c.start = 0;
    }
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
      c.msgs.push(msg);
      trimLog(c, at);
      notify(listeners, msg);
      return msg;
    },

    async read(channel, after, limit, maxBytes = Number.POSITIVE_INFINITY) {
      ensureOpen();
      const c = channels.get(channel);
      if (!c || limit <= 0) return [];
      const firstSeq = c.seq - (c.msgs.length - c.start) + 1;
      const from = c.start + Math.max(0, after + 1 - firstSeq);
      const to = Math.min(c.msgs.length, from + limit);
      if (maxBytes === Number.POSITIVE_INFINITY) return c.msgs.slice(from, to);
      // The payloads are held as values: their size is their JSON text's length, measured
      // only for the messages this page returns (plus the one that stops it).
      let end = from;
      let bytes = 0;
      while (end < to) {
        const size = JSON.stringify(c.msgs[end]!.payload)?.length ?? 0;
        if (end > from && bytes + size > maxBytes) break;
        bytes += size;
        end++;
      }
      return c.msgs.slice(from, end);
    },

    async head(channel): Promise<ChannelHead> {
      ensureOpen();
      const c = log(channel);
      return { epoch: c.epoch, seq: c.seq, first: c.seq - (c.msgs.length - c.start) + 1 };
    },

    async heads(names) {
      ensureOpen();
      return names.map((channel) => {
        const c = log(channel);
        return { epoch: c.epoch, seq: c.seq, first: c.seq - (c.msgs.length - c.start) + 1 };
      });
    },

    async trim(opts = {}) {
      ensureOpen();
      const at = now();
      for (const [name, c] of channels) {
        trimLog(c, at);
        if (opts.free && c.start >= c.msgs.length && opts.free(name)) channels.delete(name);
      }
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
    },
  };
}
