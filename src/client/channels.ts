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

export class ChannelCursors {
  private readonly cursors = new Map<string, Cursor>();
  private dirty = false;

  constructor(
    private readonly storage: SyncStorage,
    private readonly storageKey: string,
  ) {}

  get names(): string[] {
    return [...this.cursors.keys()];
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
    const c: Cursor = { subsInFlight: 0, jumped: false, wantsSnapshot: false, snapshotPending: false };
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
  subPayload(channels: string[] = this.names): { toJSON(): { channels: Record<string, ChannelCursor> } } {
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
    return { toJSON: () => ({ channels: this.cursorsOf(channels) }) };
  }

  private cursorsOf(channels: string[]): Record<string, ChannelCursor> {
    const out = channelRecord<ChannelCursor>();
    for (const name of channels) {
      const c = this.cursors.get(name);
      if (!c) continue;
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
  ): {
    resets: Array<{ channel: string; epoch: string }>;
    resub: string[];
    snapshots: SnapshotEvent[];
    /** Channels whose snapshot wait ended (with or without a snapshot): flush their MSGs. */
    settled: string[];
  } {
    const resets: Array<{ channel: string; epoch: string }> = [];
    const resub: string[] = [];
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
        if (e.more || c.seq < e.seq) resub.push(name);
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
      if (e.more || (c.seq !== undefined && c.seq < e.seq)) resub.push(name);
    }
    this.persist();
    return { resets, resub, snapshots, settled };
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
    try {
      return JSON.parse(this.storage.get(this.storageKey) ?? '{}') ?? {};
    } catch {
      return {};
    }
  }

  /** Coalesced: one write per tick, however many MSGs arrived in it. */
  private persist(): void {
    if (this.dirty) return;
    this.dirty = true;
    queueMicrotask(() => {
      this.dirty = false;
      const out = channelRecord<{ epoch?: string; seq?: number }>();
      for (const [k, c] of this.cursors) if (c.seq !== undefined) out[k] = { epoch: c.epoch, seq: c.seq };
      this.storage.set(this.storageKey, JSON.stringify(out));
    });
  }
}
