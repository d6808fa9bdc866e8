/**
 * The client's side of channels: one cursor (epoch + seq) per channel, moved only by MSGs
 * delivered in order. Decides for each incoming MSG whether to deliver it, drop it as a
 * duplicate, or ask for a re-SUB because of a gap; turns SUB responses into resets.
 */
import {
  type ChannelCursor,
  type ChannelState,
  channelRecord,
  entryOf,
  type MsgEnvelope,
} from '../protocol/index.js';
import type { SyncStorage } from './storage.js';

interface Cursor {
  epoch?: string;
  /** Last seq delivered; undefined until the first MSG or SUB response tells us the head. */
  seq?: number;
  /** What the app asked for the first SUB (rewind), used once. */
  rewind?: number;
  /** SUB requests for this channel not yet answered. */
  subsInFlight: number;
  /** A replayed MSG jumped over a gap or an epoch change during the current SUB. */
  jumped: boolean;
  /** Subscribed with `snapshot: true`: a reset asks for a new snapshot. */
  wantsSnapshot: boolean;
  /** The next SUB asks for a snapshot; MSGs wait in the client until it is answered. */
  snapshotPending: boolean;
}

/** `own`: the client's own publication with its payload (`echo: true`); `echo`: without. */
export type MsgVerdict = 'deliver' | 'own' | 'echo' | 'duplicate' | 'gap' | 'unknown';

/** A snapshot a SUB response carried, for `snapshots$`. */
export interface SnapshotEvent {
  channel: string;
  epoch: string;
  /** The channel seq the snapshot corresponds to: changes after it follow on `changes$`. */
  seq: number;
  /** What the server's `snapshot` hook returned. */
  data: unknown;
}

export interface SubscribeOptions {
  /** Replay messages after this seq (with the epoch last seen, from storage or the option). */
  since?: number;
  epoch?: string;
  /** Replay the last k messages. */
  rewind?: number;
  /**
   * Start from the server's snapshot of the channel (its `snapshot` hook): the snapshot is
   * emitted on `snapshots$` (and in the resolved value) before any change after it, and
   * again after every reset. Overrides `since`, `rewind` and a stored cursor. See
   * docs/consistency.md. @default false
   */
  snapshot?: boolean;
}

/** What `cursors` is until the first channel is added: shared, never written (see `add`). */
const NO_CURSORS: ReadonlyMap<string, Cursor> = new Map();

export class ChannelCursors {
  /**
   * Made at the first `add()`: most clients never use a channel, and an empty Map still
   * allocates its hash table (issue 14's connect row, S7C2). Until then the shared empty one.
   */
  private cursors: Map<string, Cursor> = NO_CURSORS as Map<string, Cursor>;
  private dirty = false;
  /** The stored cursors, parsed once per tick (not once per add(): FIX14E F6, quadratic). */
  private storedCache: Record<string, { epoch?: string; seq?: number }> | undefined;

  constructor(
    private readonly storage: SyncStorage,
    private readonly storageKey: string,
  ) {}

  get names(): string[] {
    return [...this.cursors.keys()];
  }

  get size(): number {
    return this.cursors.size;
  }

  has(channel: string): boolean {
    return this.cursors.has(channel);
  }

  /** Current cursor for the visualizer and `client.cursors()`. */
  snapshot(): Record<string, { epoch?: string; seq?: number }> {
    const out = channelRecord<{ epoch?: string; seq?: number }>();
    for (const [k, c] of this.cursors) out[k] = { epoch: c.epoch, seq: c.seq };
    return out;
  }

  /** Start tracking a channel. A stored cursor is resumed unless the options say otherwise. */
  add(channel: string, opts: SubscribeOptions = {}): void {
    const stored = entryOf(this.loadStored(), channel);
    // Re-registering keeps the count of SUBs still out for it (their answers come back).
    const c: Cursor = {
      subsInFlight: this.cursors.get(channel)?.subsInFlight ?? 0,
      jumped: false,
      wantsSnapshot: false,
      snapshotPending: false,
    };
    if (opts.snapshot) {
      c.wantsSnapshot = true;
      c.snapshotPending = true;
    } else if (opts.since !== undefined) {
      c.seq = opts.since;
      c.epoch = opts.epoch;
    } else if (opts.rewind !== undefined) {
      c.rewind = opts.rewind;
    } else if (stored) {
      c.seq = stored.seq;
      c.epoch = stored.epoch;
    }
    if (this.cursors === NO_CURSORS) this.cursors = new Map();
    this.cursors.set(channel, c);
  }

  remove(channel: string): void {
    this.cursors.delete(channel);
    this.persist();
  }

  /**
   * A SUB payload for these channels (all by default). It reads the cursors when it is
   * serialized, that is when the request goes on the wire (and again on each resend), not
   * when it was queued: a re-SUB that waited behind other requests asks from where the
   * client is now, not from where it was.
   */
  subPayload(
    channels: string[] = this.names,
    sent?: Map<string, { epoch?: string; seq?: number }>,
  ): { toJSON(): { channels: Record<string, ChannelCursor> } } {
    for (const name of channels) {
      const c = this.cursors.get(name);
      if (!c) continue;
      c.subsInFlight++;
      c.jumped = false;
      if (c.snapshotPending) {
        // The snapshot replaces what the client had: it starts over from the answer.
        c.seq = undefined;
        c.epoch = undefined;
      }
    }
    return { toJSON: () => ({ channels: this.cursorsOf(channels, sent) }) };
  }

  private cursorsOf(
    channels: string[],
    sent?: Map<string, { epoch?: string; seq?: number }>,
  ): Record<string, ChannelCursor> {
    const out = channelRecord<ChannelCursor>();
    for (const name of channels) {
      const c = this.cursors.get(name);
      if (!c) continue;
      // What went on the wire (the last serialization): its answer is judged against it.
      sent?.set(name, c.snapshotPending ? { seq: Number.NaN } : { epoch: c.epoch, seq: c.seq });
      if (c.snapshotPending) out[name] = { snapshot: true };
      else if (c.seq !== undefined) out[name] = c.epoch ? { since: c.seq, epoch: c.epoch } : { since: c.seq };
      else if (c.rewind !== undefined) out[name] = { rewind: c.rewind };
      else out[name] = {};
    }
    return out;
  }

  /** A MSG arrived: what to do with it. Moves the cursor when the answer is deliver/echo. */
  onMessage(m: MsgEnvelope): MsgVerdict {
    const c = this.cursors.get(m.channel);
    if (!c) return 'unknown';
    const kind = m.echo ? ('payload' in m ? 'own' : 'echo') : 'deliver';
    if (c.seq === undefined) {
      c.epoch = m.epoch;
      return this.advance(c, m.seq, kind);
    }
    if (m.replay && c.subsInFlight > 0) {
      // During a replay the server is the authority: an epoch change or a jump forward means
      // history we had was lost; the SUB response will say recovered: false.
      if (c.epoch === undefined) {
        // `since: n` without an epoch: the replay tells us the epoch. The server resolved the
        // cursor in it, so only a jump past n + 1 (below) says history was lost.
        c.epoch = m.epoch;
      } else if (c.epoch !== m.epoch) {
        // Seeing a new epoch from its first message, having seen nothing, loses nothing.
        if (c.seq > 0 || m.seq > 1) c.jumped = true;
        c.epoch = m.epoch;
        return this.advance(c, m.seq, kind);
      }
      if (m.seq <= c.seq) return 'duplicate';
      if (m.seq > c.seq + 1) c.jumped = true;
      return this.advance(c, m.seq, kind);
    }
    if (c.epoch !== undefined && c.epoch !== m.epoch && !(c.seq === 0 && m.seq === 1)) return 'gap';
    if (m.seq <= c.seq) return 'duplicate';
    if (m.seq > c.seq + 1) return 'gap';
    c.epoch = m.epoch;
    return this.advance(c, m.seq, kind);
  }

  /**
   * A SUB was answered (or refused). Returns, per channel, whether the app must treat its
   * copy as stale (reset) and whether another SUB is needed (more to replay, or a gap).
   */
  onSubResponse(
    requested: string[],
    entries: Record<string, ChannelState> | undefined,
    sent?: Map<string, { epoch?: string; seq?: number }>,
  ): {
    resets: Array<{ channel: string; epoch: string }>;
    resub: string[];
    snapshots: SnapshotEvent[];
    /** Channels whose snapshot wait ended (with or without a snapshot): flush their MSGs. */
    settled: string[];
    /**
     * Channels whose answer asked for more (`more`, or a head past the cursor) while the
     * cursor did not move from what the SUB sent: a bad answer (FIX14E F4), not re-SUBbed at
     * once (a lying server would get a tight loop) but retried after the SUB backoff.
     */
    stalled: string[];
  } {
    const resets: Array<{ channel: string; epoch: string }> = [];
    const resub: string[] = [];
    let stalled: string[] = [];
    // Another SUB at once only when the answer made progress (PROTOCOL §3 rule 8). An honest
    // server may leave a channel's cursor where it was when the page filled before its turn
    // (rule 8: `seq` = the cursor), but then it replayed others: the answer is judged as a
    // whole, and a channel is stalled only when no channel of it moved.
    let moved = false;
    const unmoved = (name: string, c: Cursor) => {
      const s = sent?.get(name);
      return s !== undefined && s.epoch === c.epoch && s.seq === c.seq;
    };
    const wantMore = (name: string, c: Cursor) => {
      if (unmoved(name, c)) stalled.push(name);
      else resub.push(name);
    };
    const snapshots: SnapshotEvent[] = [];
    const settled: string[] = [];
    for (const name of requested) {
      const c = this.cursors.get(name);
      if (!c) continue;
      c.subsInFlight = Math.max(0, c.subsInFlight - 1);
      const e = entryOf(entries, name);
      if (!e) continue;
      c.rewind = undefined;
      if (c.snapshotPending) {
        c.snapshotPending = false;
        settled.push(name);
      }
      if (e.snapshot) {
        // The snapshot stands for everything up to its seq; what the replay delivered after
        // it is kept, anything older (an earlier subscription's MSGs) is not a gap.
        snapshots.push({ channel: name, epoch: e.epoch, seq: e.snapshot.seq, data: e.snapshot.data });
        if (c.epoch !== e.epoch || c.seq === undefined || c.seq < e.snapshot.seq) c.seq = e.snapshot.seq;
        c.epoch = e.epoch;
        c.jumped = false;
        if (e.more || c.seq < e.seq) wantMore(name, c);
        continue;
      }
      if (!e.recovered || c.jumped) {
        resets.push({ channel: name, epoch: e.epoch });
        if (c.wantsSnapshot) {
          // A reset of a channel started from a snapshot: ask for a new one at once.
          c.snapshotPending = true;
          c.jumped = false;
          resub.push(name);
          continue;
        }
      }
      c.jumped = false;
      if (c.epoch === undefined) {
        // First sight of the epoch (`since: n` without one, and no MSG of the replay got
        // through): adopt it but keep the cursor, so what was missed is asked for again below.
        c.epoch = e.epoch;
        if (c.seq === undefined) c.seq = e.seq;
      } else if (c.epoch !== e.epoch) {
        // Nothing was replayed in the new epoch: start there from the head.
        c.epoch = e.epoch;
        c.seq = e.seq;
      } else if (c.seq === undefined) c.seq = e.seq;
      if (e.more || (c.seq !== undefined && c.seq < e.seq)) wantMore(name, c);
    }
    if (stalled.length > 0)
      for (const name of requested) {
        const c = this.cursors.get(name);
        if (c && sent?.has(name) && entryOf(entries, name) && !unmoved(name, c)) {
          moved = true;
          break;
        }
      }
    if (moved && stalled.length > 0) {
      resub.push(...stalled);
      stalled = [];
    }
    this.persist();
    return { resets, resub, snapshots, settled, stalled };
  }

  /** Waiting for a snapshot: the channel's MSGs are held back until it arrives. */
  snapshotting(channel: string): boolean {
    return this.cursors.get(channel)?.snapshotPending === true;
  }

  /** The cursor of one channel, `undefined` when not subscribed. */
  position(channel: string): { epoch?: string; seq?: number } | undefined {
    const c = this.cursors.get(channel);
    return c ? { epoch: c.epoch, seq: c.seq } : undefined;
  }

  /** A SUB failed or was abandoned: it is no longer in flight. */
  subFailed(requested: string[]): void {
    for (const name of requested) {
      const c = this.cursors.get(name);
      if (c) c.subsInFlight = Math.max(0, c.subsInFlight - 1);
    }
  }

  private advance(c: Cursor, seq: number, verdict: 'deliver' | 'own' | 'echo'): MsgVerdict {
    c.seq = seq;
    this.persist();
    return verdict;
  }

  private loadStored(): Record<string, { epoch?: string; seq?: number }> {
    if (this.storedCache) return this.storedCache;
    let out: Record<string, { epoch?: string; seq?: number }>;
    try {
      out = JSON.parse(this.storage.get(this.storageKey) ?? '{}') ?? {};
    } catch {
      out = {};
    }
    if (out === null || typeof out !== 'object') out = {};
    this.storedCache = out;
    queueMicrotask(() => {
      this.storedCache = undefined;
    });
    return out;
  }

  /** When the next write may start (performance.now() ms): see persist(). */
  private nextWriteAt = 0;
  /** The throttled write waiting for its turn (persist()), cleared by close(). */
  private timer: ReturnType<typeof setTimeout> | undefined;
  /** After close(): the cursors may still move in memory, nothing is written any more. */
  private closed = false;

  /**
   * Coalesced: one write per tick, however many MSGs arrived in it. A write serializes every
   * channel's cursor (O(channels)); with many channels answered one per tick that made the
   * client quadratic (FIX14E F6). So a write that took w ms lets the next one start no
   * earlier than 9·w ms after it ended (the writes take at most ~10 % of the time): with a
   * few channels (µs per write) that is still every tick. The wait is a timer of this
   * object's own (not the chart's: it is storage pacing, not protocol time), and `close()`
   * ends it: it writes what is pending once, and nothing after.
   */
  private persist(): void {
    if (this.dirty || this.closed) return;
    this.dirty = true;
    const wait = this.nextWriteAt - performance.now();
    if (wait <= 1) queueMicrotask(() => this.write());
    else {
      this.timer = setTimeout(() => this.write(), wait);
      (this.timer as { unref?: () => void }).unref?.();
    }
  }

  private write(): void {
    this.timer = undefined;
    // Written already (by close()), or closed since: nothing to do.
    if (!this.dirty || this.closed) return;
    this.dirty = false;
    const t0 = performance.now();
    const out = channelRecord<{ epoch?: string; seq?: number }>();
    for (const [k, c] of this.cursors) if (c.seq !== undefined) out[k] = { epoch: c.epoch, seq: c.seq };
    this.storage.set(this.storageKey, JSON.stringify(out));
    const t1 = performance.now();
    this.nextWriteAt = t1 + 9 * (t1 - t0);
  }

  /**
   * Write now what waits for the throttle (nothing when nothing changed since the last write),
   * then go on as before: the page is being hidden or unloaded (a reload does not call
   * `close()`), and a paced write would die with it. Throws what the storage's `set` throws.
   */
  flush(): void {
    if (!this.dirty || this.closed) return;
    if (this.timer !== undefined) clearTimeout(this.timer);
    this.write();
  }

  /**
   * The client is closing: the cursors as they are now are written once, at once (none when
   * nothing changed since the last write), and never again (a write after the client closed
   * could land after a new client on the same storage wrote newer cursors: that client would
   * resume too early). Throws what the storage's `set` throws (the client reports it).
   */
  close(): void {
    if (this.closed) return;
    if (this.timer !== undefined) clearTimeout(this.timer);
    this.timer = undefined;
    try {
      this.write();
    } finally {
      this.closed = true;
      this.dirty = false;
    }
  }
}
