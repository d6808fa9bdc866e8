/**
 * Channel subscriptions for the reference server (PROTOCOL §3 rules 5–8): replay from the
 * history store, the hand-over from replay to live with no gap and no duplicate, fan-out of
 * the store's live feed to sockets, and the one-shot replay that answers an HTTP `SUB`.
 *
 * Fan-out is driven only by `store.watch`, never by `publish` directly, so a store shared by
 * several server processes delivers everybody's messages to everybody's sockets.
 *
 * Echo suppression (our fix to the protocol as first written): a message published with
 * `except: X` still reaches client X's sockets, as a `MSG` with `echo: true` and no payload.
 * Skipping it instead would leave a hole in X's `seq`, which X must read as lost messages
 * and answer with a new `SUB`, forever. Replays to X carry the same payload-less echo.
 *
 * The author (`author: X`, what `ctx.publish` sets by default) gets its own message with the
 * payload, marked `echo: true`, at its seq like everybody else (docs/consistency.md).
 */

import {
  type ChannelCursor,
  type ChannelSnapshot,
  type ChannelState,
  channelRecord,
  type MsgEnvelope,
} from '../protocol/index.js';
import type { ChannelHead, HistoryStore, StoredMessage } from '../stores/types.js';
import { type LookupJob, type LookupScheduler, RequesterGone } from './lookups.js';

/** Smallest history page read again after a replay had to wait for its socket. */
const MIN_REPLAY_PAGE = 64;

/** Channels of one `SUB` set up between two turns given to the event loop, without a scheduler. */
const SUB_YIELD_EVERY = 32;

/**
 * Cut `names` into slices granted by `job` (the server-wide look-up scheduler, lookups.ts), or
 * without one into slices of `SUB_YIELD_EVERY` with a turn given to the event loop between two.
 * `each` gets a slice's start index and length; the next slice is asked for only after it.
 * Throws `RequesterGone` when `job`'s requester left.
 */
async function bySlices(
  count: number,
  job: LookupJob | undefined,
  each: (start: number, n: number) => Promise<void>,
): Promise<void> {
  for (let start = 0; start < count; ) {
    let n: number;
    if (job) {
      n = Math.min(await job.turn(count - start), count - start);
      // Its requester left (socket closed, request aborted): stop here (lookups.ts).
      if (n <= 0) throw new RequesterGone();
    } else {
      if (start > 0) await yieldTurn();
      n = Math.min(SUB_YIELD_EVERY, count - start);
    }
    await each(start, n);
    start += n;
  }
}

/** Let the event loop run other sockets' I/O before going on (between replay pages). */
const yieldTurn = () => new Promise<void>((resolve) => setImmediate(resolve));

/** The socket side of a subscription, as the channel layer needs it. */
export interface ChannelPeer {
  readonly clientId: string;
  /** Who the peer is, as `authenticate` said; re-asked of `authorize` by `server.recheck()`. */
  readonly principal: unknown;
  /**
   * The key the per-principal channel cap and `server.unsubscribe({ principal })` count by:
   * `p:<principalKey>`, or `c:<clientId>` for the anonymous principal.
   */
  readonly subscriberKey: string;
  /** The peer's subscriptions by channel; owned by `Channels`. */
  readonly subs: Map<string, Subscription>;
  /** False once the socket is closing: nothing more is sent. */
  readonly open: boolean;
  /** Send a frame already encoded. */
  sendText(text: string): void;
  /** Send a replayed frame already encoded (counted against the server's replay budget). */
  sendReplay(text: string): void;
  /**
   * `undefined` when the next replayed message may be sent now, else a promise to wait for
   * before asking again (the socket's send buffer or the server's replay budget is full).
   */
  replayReady(): Promise<void> | undefined;
  /** Give up on the socket after an internal failure; the client reconnects and replays. */
  fail(reason: string): void;
  /** Run `task` after every task queued before it (a socket's SUBs, UNSs and revocations). */
  serial<T>(task: () => Promise<T>): Promise<T>;
  /**
   * Charge `n` more frames to the socket's (and its principal's) frame rate, as far as tokens
   * are left: a `SUB` counts a frame per channel it names, not one (README "Limits").
   */
  chargeFrames?(n: number): void;
}

export interface ChannelsOptions {
  store: HistoryStore;
  /** Page size for history reads, and the most `MSG`s one HTTP `SUB` returns per channel. */
  replayLimit: number;
  /**
   * Bytes of payload one history page holds (the store stops there, always after at least one
   * message), and the most `MSG` bytes one HTTP `SUB` answer holds, all channels together.
   */
  replayPageBytes: number;
  onError: (err: unknown, where: string) => void;
  /**
   * The server-wide look-up scheduler (lookups.ts): records are freed (`release`) a slice at a
   * time as it grants, charged to the principal that left them. Without it, by slices of 32
   * with a turn given to the event loop between two.
   */
  lookups?: LookupScheduler;
}

/** How a stored message goes to one recipient: everybody's copy, its author's, or a bare echo. */
export type MsgVariant = 'live' | 'own' | 'echo';

/** Which variant `clientId` gets: `except` wins over `author` (docs/consistency.md). */
export function variantFor(m: StoredMessage, clientId: string): MsgVariant {
  if (m.except !== undefined && m.except === clientId) return 'echo';
  if (m.author !== undefined && m.author === clientId) return 'own';
  return 'live';
}

/**
 * Build the wire form of a stored message for one recipient: `echo` drops the payload
 * (PROTOCOL rule 9), `own` keeps it and marks it `echo: true`.
 */
export function msgEnvelope(m: StoredMessage, replay: boolean, variant: MsgVariant | boolean): MsgEnvelope {
  const v: MsgVariant = variant === true ? 'echo' : variant === false ? 'live' : variant;
  const env: MsgEnvelope = { id: m.id, type: 'MSG', channel: m.channel, seq: m.seq, epoch: m.epoch };
  if (v !== 'echo') env.payload = m.payload;
  if (v !== 'live') env.echo = true;
  if (replay) env.replay = true;
  return env;
}

/**
 * The application's snapshot of a channel for a `SUB` with `snapshot: true`; resolves with
 * JSON. Given by the server's `snapshot` option, bound to the subscriber's principal.
 */
export type SnapshotReader = (channel: string) => unknown | Promise<unknown>;

/**
 * Where a replay starts (`after`: the last seq the client is taken to have) and whether the
 * client's copy is still good. PROTOCOL §3 rule 6, plus one case the text leaves implicit: a
 * client ahead of the head means the server lost history (e.g. a store restored from an old
 * backup), so its copy is stale too.
 */
export function resolveCursor(head: ChannelHead, c: ChannelCursor): { after: number; recovered: boolean } {
  const sameEpoch = c.epoch === undefined || c.epoch === head.epoch;
  if (c.since !== undefined) {
    // A client that has seen nothing (since 0) lost nothing in an epoch change, as long as the
    // new epoch's history is whole from seq 1: no spurious reset after a restart.
    const nothingSeen = c.since === 0 && head.first <= 1;
    const recovered = (sameEpoch || nothingSeen) && c.since + 1 >= head.first && c.since <= head.seq;
    return { after: recovered ? c.since : head.first - 1, recovered };
  }
  if (c.rewind !== undefined) {
    return { after: Math.max(head.seq - c.rewind, head.first - 1), recovered: sameEpoch };
  }
  return { after: head.seq, recovered: sameEpoch };
}

/**
 * One socket's subscription to one channel. `last` is the last seq sent. While `busy`, the
 * subscription is reading history and live messages wait in `pending`; otherwise live
 * messages go out as they come, as long as they are exactly `last + 1`.
 */
export class Subscription {
  last = 0;
  /**
   * The channel's head seq when the subscription was made: the replay is not over before
   * `last` reaches it (or the store has nothing more), since a page cut by bytes is short.
   */
  target = 0;
  epoch = '';
  busy = true;
  closed = false;
  private pending: StoredMessage[] = [];
  /** Set when `pending` overflowed and was dropped: the store has those messages. */
  private overflow = false;

  constructor(
    readonly channel: string,
    readonly peer: ChannelPeer,
    private readonly owner: Channels,
  ) {}

  /** A message from the live feed. `text` is its shared encoding for this recipient, if made. */
  offer(msg: StoredMessage, text?: () => string): void {
    if (this.closed) return;
    if (!this.busy && msg.epoch !== this.epoch) {
      // The channel's history was reset under a live subscriber (a shared store can do that):
      // seqs start over, so the socket is dropped and the client's re-SUB gets recovered:false.
      this.owner.failed(this, new Error(`epoch of ${this.channel} changed`), 'channel history was reset');
      return;
    }
    if (msg.seq <= this.last) return;
    if (this.busy) {
      this.pending.push(msg);
      if (this.pending.length > this.owner.replayLimit) {
        // Bounded memory for a socket that replays slowly while the channel is hot.
        this.pending = [];
        this.overflow = true;
      }
      return;
    }
    if (msg.seq === this.last + 1) {
      this.deliver(msg, false, text);
      return;
    }
    // A gap in the live feed (e.g. pending dropped earlier): fetch the missing ones first.
    this.busy = true;
    this.pending.push(msg);
    this.pump().catch((err: unknown) => this.owner.failed(this, err));
  }

  /**
   * Send history after `last` page by page, then the buffered live messages, until caught
   * up; then go live. Resolves when live (or cancelled); rejects if the store fails.
   */
  async pump(): Promise<void> {
    let emptyReads = 0;
    const { replayLimit, replayPageBytes } = this.owner;
    let limit = replayLimit;
    while (!this.closed) {
      this.overflow = false;
      let page: StoredMessage[] | undefined = await this.owner.store.read(
        this.channel,
        this.last,
        limit,
        replayPageBytes,
      );
      if (this.closed) return;
      const { sent, wait } = this.sendPage(page);
      const read = page.length;
      page = undefined; // not kept across the waits below
      if (wait) {
        // The socket must drain (or the server's replay budget has no room): wait without
        // holding the rest of the page, which is read again after, in a page twice the size
        // of what the socket took (PROTOCOL §3, "Replay flow control").
        limit = Math.min(replayLimit, Math.max(MIN_REPLAY_PAGE, 2 * sent));
        for (let w: Promise<void> | undefined = wait; w; w = this.peer.replayReady()) {
          await w;
          if (this.closed) return;
        }
        continue;
      }
      // A page cut by bytes is short: read on while the head seen at subscribe time is ahead.
      const full = read >= limit || (read > 0 && this.last < this.target);
      limit = replayLimit;
      if (full) {
        // Yield between pages: one socket's long replay must not hold the event loop.
        await yieldTurn();
        if (this.closed) return;
        continue;
      }
      emptyReads = read === 0 ? emptyReads + 1 : 0;
      this.flushPending();
      if (this.overflow) continue;
      const next = this.pending[0];
      if (!next) {
        this.busy = false;
        return;
      }
      // Messages before `next` were appended before it; a second empty read means the store
      // no longer has them (trimmed), so accept the hole rather than wait forever.
      if (emptyReads >= 2) {
        this.last = next.seq - 1;
        this.flushPending();
      }
    }
  }

  /**
   * Send a history page while the socket has room; stop at the first message it has none for
   * and return what to wait for (the caller drops the page meanwhile).
   */
  private sendPage(page: StoredMessage[]): { sent: number; wait?: Promise<void> } {
    let sent = 0;
    for (const m of page) {
      if (m.seq <= this.last) continue;
      const wait = this.peer.replayReady();
      if (wait) return { sent, wait };
      this.deliver(m, true);
      sent++;
    }
    return { sent };
  }

  cancel(): void {
    this.closed = true;
    this.pending = [];
  }

  private flushPending(): void {
    let i = 0;
    while (i < this.pending.length) {
      const m = this.pending[i]!;
      if (m.seq <= this.last) i++;
      else if (m.seq === this.last + 1) {
        this.deliver(m, false);
        i++;
      } else break;
    }
    this.pending = i === 0 ? this.pending : this.pending.slice(i);
  }

  private deliver(m: StoredMessage, replay: boolean, text?: () => string): void {
    this.last = m.seq;
    this.epoch = m.epoch;
    if (!this.peer.open) return;
    const frame = text ? text() : JSON.stringify(msgEnvelope(m, replay, variantFor(m, this.peer.clientId)));
    if (replay) this.peer.sendReplay(frame);
    else this.peer.sendText(frame);
  }
}

/** Every socket subscription of one server, indexed by channel for fan-out. */
export class Channels {
  readonly store: HistoryStore;
  readonly replayLimit: number;
  readonly replayPageBytes: number;
  private readonly index = new Map<string, Set<Subscription>>();
  /** Live subscriptions per principal key, for the per-principal cap. */
  private readonly perPrincipal = new Map<string, number>();
  private readonly onError: ChannelsOptions['onError'];
  private readonly lookups: LookupScheduler | undefined;
  private readonly unwatch: () => void;

  constructor(opts: ChannelsOptions) {
    this.store = opts.store;
    this.replayLimit = opts.replayLimit;
    this.replayPageBytes = opts.replayPageBytes;
    this.onError = opts.onError;
    this.lookups = opts.lookups;
    this.unwatch = this.store.watch((msg) => this.fanOut(msg));
  }

  /** Channels with at least one live socket subscription. */
  get size(): number {
    return this.index.size;
  }

  /**
   * Subscribe a socket: for each channel, replay what its cursor missed, then go live. A
   * channel the socket already has restarts from the new cursor (the client drops
   * duplicates by seq). Resolves with the states for the response `SYN`.
   */
  async subscribe(
    peer: ChannelPeer,
    cursors: Record<string, ChannelCursor>,
    snapshot?: SnapshotReader,
    job?: LookupJob,
  ): Promise<Record<string, ChannelState>> {
    const names = Object.keys(cursors);
    const subs: Subscription[] = [];
    /** Register one channel's subscription (cancelling the socket's old one to it). */
    const register = (name: string): Subscription => {
      const old = peer.subs.get(name);
      if (old) {
        old.cancel();
        this.remove(old);
      } else this.count(peer.subscriberKey, 1);
      const sub = new Subscription(name, peer, this);
      peer.subs.set(name, sub);
      let set = this.index.get(name);
      if (!set) {
        set = new Set();
        this.index.set(name, set);
      }
      set.add(sub);
      return sub;
    };
    const recovered: boolean[] = [];
    const snapshots: Array<ChannelSnapshot | undefined> = [];
    try {
      // A SUB of many channels must not hold the event loop, and N principals' SUBs together
      // must not either: the look-ups go a slice at a time, as the server-wide scheduler grants
      // them (lookups.ts). A slice's heads are read at once when the store can (one SQLite
      // transaction).
      await bySlices(names.length, job, async (start, n) => {
        // The socket closed: nothing more is registered or looked up (FIX1).
        if (!peer.open) throw new RequesterGone();
        const slice = names.slice(start, start + n);
        // A slice's subscriptions are registered when its look-ups are granted (FIX1: not all
        // of a SUB's ahead of them, 897 001 entries waited for 1 000 attackers' look-ups), and
        // before its heads are read, so no live message can slip between the read and the
        // registration; whatever arrives meanwhile waits in `pending`.
        for (const name of slice) subs.push(register(name));
        const heads = slice.length > 1 && this.store.heads ? await this.store.heads(slice) : undefined;
        for (let j = 0; j < n; j++) {
          const i = start + j;
          const sub = subs[i]!;
          const cursor = cursors[sub.channel]!;
          // The head first, then the snapshot: the snapshot holds every change up to the head
          // (and maybe some after it, which the replay repeats; docs/consistency.md).
          const head = heads?.[j] ?? (await this.store.head(sub.channel));
          if (cursor.snapshot && snapshot) {
            const data = await snapshot(sub.channel);
            snapshots[i] = { seq: head.seq, data: data === undefined ? null : data };
            sub.last = head.seq;
            recovered[i] = true;
          } else {
            const start = resolveCursor(head, cursor);
            sub.last = start.after;
            recovered[i] = start.recovered;
          }
          sub.epoch = head.epoch;
          sub.target = head.seq;
          if (sub.closed) continue;
          await sub.pump();
        }
      });
    } catch (err) {
      // What was registered goes, and the records its look-ups made with it.
      const emptied: string[] = [];
      for (const sub of subs) if (this.drop(peer, sub)) emptied.push(sub.channel);
      this.release(emptied, peer.subscriberKey);
      throw err;
    }
    const states = channelRecord<ChannelState>();
    for (const [i, sub] of subs.entries()) {
      const state: ChannelState = { epoch: sub.epoch, seq: sub.last, recovered: recovered[i]! };
      const snap = snapshots[i];
      if (snap) state.snapshot = snap;
      states[sub.channel] = state;
    }
    return states;
  }

  /** Live subscriptions of sockets whose principal has this key, in this process. */
  countOf(subscriberKey: string): number {
    return this.perPrincipal.get(subscriberKey) ?? 0;
  }

  /** Whether any socket of this process is subscribed to `channel` (housekeeping keeps it). */
  isLive(channel: string): boolean {
    return this.index.has(channel);
  }

  /** Every live subscription, as (peer, channel) pairs, for revocation and re-checks. */
  *live(channel?: string): Iterable<{ peer: ChannelPeer; channel: string }> {
    const sets = channel === undefined ? [...this.index.values()] : [this.index.get(channel) ?? new Set()];
    for (const set of sets) for (const sub of [...set]) yield { peer: sub.peer, channel: sub.channel };
  }

  /** Stop the named subscriptions of a socket; unknown names are ignored. */
  unsubscribe(peer: ChannelPeer, names: string[]): void {
    const emptied: string[] = [];
    for (const name of names) {
      const sub = peer.subs.get(name);
      if (sub && this.drop(peer, sub)) emptied.push(name);
    }
    this.release(emptied, peer.subscriberKey);
  }

  /** Forget a socket that closed. */
  dropPeer(peer: ChannelPeer): void {
    const emptied: string[] = [];
    for (const sub of [...peer.subs.values()]) if (this.drop(peer, sub)) emptied.push(sub.channel);
    this.release(emptied, peer.subscriberKey);
  }

  /**
   * Free at once the store records of `names` that no socket here follows any more and that
   * were never published to (`HistoryStore.releaseChannels`): a `SUB`'s or poll's look-ups leave no
   * record behind once nobody follows them, so one principal cannot fill `maxChannels` by
   * subscribing to fresh names and leaving them. Liveness is asked again by the store at the
   * moment of deletion, so a `SUB` made meanwhile keeps its record (and its epoch).
   * Freeing is store work too: a slice at a time, as the look-up scheduler grants it to `key`
   * (the principal that left them), never refused.
   */
  release(names: string[], key = ''): void {
    const releaseChannels = this.store.releaseChannels?.bind(this.store);
    if (names.length === 0 || !releaseChannels) return;
    const job = this.lookups?.background(key, names.length);
    bySlices(names.length, job, async (start, n) => {
      await releaseChannels(names.slice(start, start + n), (name) => !this.index.has(name));
    })
      .catch((err: unknown) => this.onError(err, 'store.releaseChannels'))
      .finally(() => job?.done());
  }

  /**
   * The HTTP `SUB`: what each cursor missed, at most `replayLimit` per channel and
   * `replayPageBytes` of `MSG` text in all (always at least one message when any is missed),
   * at once. A channel cut short, or not read because the answer is full, says `more: true`
   * with `seq` the last one included (PROTOCOL §3 rule 8). No live subscription is made;
   * polling is repeating the request with the new cursors. `looked` gets the names looked up
   * (whose records the caller frees), also when the poll stops early (`RequesterGone`).
   */
  async poll(
    clientId: string,
    cursors: Record<string, ChannelCursor>,
    snapshot?: SnapshotReader,
    job?: LookupJob,
    looked?: string[],
  ): Promise<{ messages: MsgEnvelope[]; states: Record<string, ChannelState> }> {
    const messages: MsgEnvelope[] = [];
    const states = channelRecord<ChannelState>();
    const names = Object.keys(cursors);
    /** `MSG` text left in this answer (issue 12: 6 unbounded polls of 80 MB crashed a server). */
    let room = this.replayPageBytes;
    // A slice of look-ups at a time, as the server-wide scheduler grants them (lookups.ts).
    await bySlices(names.length, job, async (start, n) => {
      const slice = names.slice(start, start + n);
      looked?.push(...slice);
      const heads = slice.length > 1 && this.store.heads ? await this.store.heads(slice) : undefined;
      for (let j = 0; j < n; j++) {
        const name = slice[j]!;
        const cursor = cursors[name]!;
        const head = heads?.[j] ?? (await this.store.head(name));
        let snap: ChannelSnapshot | undefined;
        if (cursor.snapshot && snapshot) {
          const data = await snapshot(name);
          snap = { seq: head.seq, data: data === undefined ? null : data };
        }
        const { after, recovered } = snap
          ? { after: head.seq, recovered: true }
          : resolveCursor(head, cursor);
        let seq = after;
        let more = false;
        if (after < head.seq && room <= 0 && messages.length > 0) {
          more = true; // the answer is full: this channel waits for the next poll
        } else {
          // One extra tells whether the page was cut by count without a second query.
          const page = await this.store.read(name, after, this.replayLimit + 1, Math.max(room, 0));
          more = page.length > this.replayLimit;
          if (more) page.length = this.replayLimit;
          for (const m of page) {
            const env = msgEnvelope(m, true, variantFor(m, clientId));
            const size = JSON.stringify(env).length;
            if (messages.length > 0 && size > room) {
              more = true;
              break;
            }
            room -= size;
            messages.push(env);
            seq = m.seq;
          }
          // Cut by bytes (in the store or here): the head seen before the read is ahead.
          if (seq < head.seq && seq > after) more = true;
        }
        const state: ChannelState = { epoch: head.epoch, seq, recovered };
        if (more) state.more = true;
        if (snap) state.snapshot = snap;
        states[name] = state;
      }
    });
    return { messages, states };
  }

  /** A subscription cannot go on (store failure, history reset): give up on its socket. */
  failed(sub: Subscription, err: unknown, reason = 'history store failed'): void {
    this.onError(err, `subscription to ${sub.channel}`);
    if (this.drop(sub.peer, sub)) this.release([sub.channel], sub.peer.subscriberKey);
    sub.peer.fail(reason);
  }

  close(): void {
    this.unwatch();
    for (const set of this.index.values()) for (const sub of set) sub.cancel();
    this.index.clear();
    this.perPrincipal.clear();
  }

  /** End one subscription; `true` when it was the channel's last one here. */
  private drop(peer: ChannelPeer, sub: Subscription): boolean {
    sub.cancel();
    if (peer.subs.get(sub.channel) === sub) {
      peer.subs.delete(sub.channel);
      this.count(peer.subscriberKey, -1);
    }
    return this.remove(sub);
  }

  private count(key: string, delta: number): void {
    const n = (this.perPrincipal.get(key) ?? 0) + delta;
    if (n > 0) this.perPrincipal.set(key, n);
    else this.perPrincipal.delete(key);
  }

  /** Unindex `sub`; `true` when it was the channel's last subscription here. */
  private remove(sub: Subscription | undefined): boolean {
    if (!sub) return false;
    const set = this.index.get(sub.channel);
    if (!set) return false;
    set.delete(sub);
    if (set.size > 0) return false;
    this.index.delete(sub.channel);
    return true;
  }

  private fanOut(msg: StoredMessage): void {
    const set = this.index.get(msg.channel);
    if (!set) return;
    // Encode once per message and variant, however many subscribers there are.
    const texts: Partial<Record<MsgVariant, string>> = {};
    const textOf = (v: MsgVariant) => () => {
      texts[v] ??= JSON.stringify(msgEnvelope(msg, false, v));
      return texts[v];
    };
    const liveText = textOf('live');
    const ownText = textOf('own');
    const echoText = textOf('echo');
    for (const sub of set) {
      try {
        const v = variantFor(msg, sub.peer.clientId);
        sub.offer(msg, v === 'live' ? liveText : v === 'own' ? ownText : echoText);
      } catch (err) {
        this.onError(err, `fan-out to ${msg.channel}`);
      }
    }
  }
}
