/**
 * The transport-free half of the reference server: what a valid envelope means, whichever
 * transport brought it (graphql-ws's `makeServer` beside its `use/ws.ts` is the model).
 * `dispatch` answers one envelope through a `Peer`'s `send`; `publish`, `applySyn`,
 * `authenticate` and the subscription handling live here too. ws.ts and http.ts parse frames
 * and bodies and hand them over; index.ts wires everything together.
 *
 * Nothing a client sends and nothing a hook throws may escape: every entry point here
 * catches, answers the peer, and reports through `onError`.
 */

import type { IncomingMessage } from 'node:http';
import {
  type ChannelCursor,
  type ChannelEntry,
  type ChannelRefusal,
  channelRecord,
  encode,
  encodeOnce,
  entryOf,
  HTTP_STATUS_OF,
  isValidChannel,
  MAX_ID_LENGTH,
  NAK_CODES,
  type NakCode,
  type NakEnvelope,
  nak,
  type Publication,
  type RequestEnvelope,
  type RevokeEnvelope,
  randomId,
  type ServerEnvelope,
  type SubEnvelope,
  SyncError,
} from '../protocol/index.js';
import type { AppendOptions, HistoryStore } from '../stores/types.js';
import type { ChannelPeer, Channels } from './channels.js';
import { type Dedupe, notRemembered, type SynResponse } from './dedupe.js';
import { type Bindings, type BindOutcome, ownerOf } from './identity.js';
import type { PublishOptions, PublishResult, SyncContext, SyncServerOptions } from './index.js';
import { KeyedBuckets } from './limits.js';
import { type LookupJob, type LookupScheduler, RequesterGone } from './lookups.js';

/** A peer whose subscriptions are live (a socket): `Channels` delivers to it directly. */
export type LivePeer = ChannelPeer;

/** Whoever sent an envelope, on whichever transport. */
export interface Peer<P> {
  clientId: string;
  principal: P;
  send(env: ServerEnvelope): void;
  /** Set for sockets: subscriptions are live; HTTP gets a one-shot replay. */
  conn?: LivePeer;
  /**
   * The key its per-principal limits count under (`p:<principalKey>`, or `a:<address>` /
   * `c:<clientId>` for the anonymous principal: index.ts `limitKey`); a socket's is its
   * `subscriberKey`. @default `lookupKey(principal, clientId)`
   */
  limitKey?: string;
  /**
   * Whether the requester left (its HTTP request aborted): a `SUB` then stops at its next
   * look-up turn. A socket's is `!conn.open`. @default never
   */
  gone?(): boolean;
  /**
   * HTTP only: charge the request rate for the `n` channels a `SUB` names (http.ts), so a
   * principal's polls after its look-ups ran out are refused before their bodies are read,
   * as a socket's `chargeFrames` does for its frames.
   */
  chargeChannels?(n: number): void;
}

/** A refusal: the HTTP status, the NAK to refuse with, and extra headers. */
export type AuthRefusal = { ok: false; status: number; nak: NakEnvelope; headers?: Record<string, string> };

/** What `authenticate` decided: the principal, or the HTTP status and NAK to refuse with. */
export type AuthResult<P> = { ok: true; principal: P } | AuthRefusal;

/** `Retry-After` (seconds) of a `too_many_clients` refusal. */
const TOO_MANY_CLIENTS_RETRY_S = 30;

export interface DispatcherOptions<P> {
  /** The user's hooks, called as methods of this object (the server passes its options). */
  hooks: Pick<SyncServerOptions<unknown, unknown, P>, 'onSync' | 'authenticate' | 'authorize' | 'snapshot'>;
  store: HistoryStore;
  dedupe: Dedupe;
  /** clientId → principal bindings (identity.ts). */
  bindings: Bindings;
  /** A principal's stable key (the server's `principalKey` option). */
  principalKey(principal: P): string;
  channels: Channels;
  /** Whether the server is closing: batches not started yet are answered `server_error`. */
  closing(): boolean;
  /**
   * Whether publishes are refused: once the store is about to close. Batches still running
   * in `onSync` while the server drains (`closeTimeoutMs`) may publish. @default `closing`
   */
  publishClosed?(): boolean;
  onError(err: unknown, where: string): void;
  /** Most live channel subscriptions per principal key in this process (PROTOCOL rule 7). */
  maxChannelsPerPrincipal: number;
  /**
   * Most channels the store may keep state for (its `channelCount`), server-wide: a `SUB`
   * that would take the count past it and names a channel the store does not keep yet is
   * refused whole, `NAK rate_limited`. @default no bound
   */
  maxChannels?: number;
  /**
   * Most `SUB`/`UNS` frames waiting in one socket's lane (behind a replay, say) before new
   * ones get `NAK rate_limited`, like `SYN`s past `maxQueuedPerClient`. @default 100
   */
  maxQueuedPerSocket?: number;
  /**
   * Channel look-ups per second one principal may make with its `SUB`s (socket and HTTP
   * together): each `SUB` costs the number of channels it names; beyond, the whole `SUB` is
   * answered `NAK rate_limited` before any look-up. Burst: `max(rate, maxChannelsPerPrincipal)`.
   * @default no bound
   */
  maxChannelLookupsPerSecondPerPrincipal?: number;
  /**
   * The server-wide scheduler every `SUB`'s and poll's look-ups go through, a slice per
   * event-loop turn, round-robin across `lookupKey`s, under the server-wide rate
   * (`maxChannelLookupsPerSecond`; lookups.ts). Without it each `SUB` yields on its own.
   */
  lookups?: LookupScheduler;
  /**
   * Channel records kept for principals that hold few: once the store keeps
   * `maxChannels - channelReserve`, a `SUB` naming a new channel is refused unless its
   * principal's live channels here plus the new ones stay within `reserveShare`.
   * @default 0 (no reserve)
   */
  channelReserve?: number;
  /** See `channelReserve`. @default 0 */
  reserveShare?: number;
  /** Told the store's `channelCount` each time it is read (for `stats().channelRecords`). */
  onChannelCount?(n: number): void;
  /**
   * The key look-ups are charged to when the peer has no `limitKey`: `p:<principalKey>`, or
   * `c:<clientId>` when anonymous. Both transports set `Peer.limitKey` (for the anonymous
   * principal, `a:<address>` by default).
   */
  lookupKey?(principal: P, clientId: string): string;
}

/** Which live subscriptions a revocation is about. */
export interface RevokeMatch {
  channel?: string | undefined;
  clientId?: string | undefined;
  /** A principal key (`principalKey(principal)`), not the principal itself. */
  principalKey?: string | undefined;
}

export interface Dispatcher<P> {
  /**
   * End the live subscriptions matching `m` in this process; each socket concerned gets one
   * server `UNS` naming its channels, with `error`. Resolves with how many were ended.
   */
  revoke(m: RevokeMatch, error: { code: 'forbidden' | 'unsubscribed'; message: string }): Promise<number>;
  /** Re-ask `authorize` for every live subscription of this process; revoke the refused ones. */
  recheck(): Promise<number>;
  /** `server.publish`: append to a channel's history. */
  publish(channel: string, payload: unknown, opts?: PublishOptions): Promise<PublishResult>;
  /**
   * Answer one valid envelope: `undefined` when its last reply was sent synchronously, else
   * a promise that resolves when it was. Never throws or rejects.
   */
  dispatch(env: RequestEnvelope, peer: Peer<P>): Promise<void> | undefined;
  /**
   * Run `authenticate`: the principal, or the status and NAK to refuse with. Writes nothing:
   * the transports check the refusals that need no binding (rates, byte budgets, socket
   * caps) next, and only then `bind` (issue 12: a rate-limited request wrote its binding to
   * SQLite). Never rejects.
   */
  authenticate(req: IncomingMessage): Promise<AuthResult<P>>;
  /**
   * Bind `clientId` to the principal `authenticate` returned, or refresh that binding
   * (PROTOCOL §1): `null` when it may use `clientId`, else the refusal (409
   * `client_id_taken` when another principal owns it, 503 `too_many_clients` when the
   * table is full, 500 when the store fails). Without `authenticate` nothing is bound.
   * Never rejects.
   */
  bind(clientId: string, principal: P): Promise<AuthRefusal | null>;
  /**
   * Run `onSync` for one batch and check its results: the response itself when `onSync`
   * returned its results (not a promise) and published nothing, else a promise of it. Never
   * throws or rejects.
   */
  applySyn(syn: { id: string; payload: unknown[] }, peer: Peer<P>): SynResponse | Promise<SynResponse>;
  /** Answer a `SUB`: live subscriptions for a socket, a one-shot replay otherwise. */
  subscribe(env: SubEnvelope, peer: Peer<P>): Promise<void>;
}

/** Whether `v` is a usable clientId (1 to `MAX_ID_LENGTH` characters). */
export const validClientId = (v: unknown): v is string =>
  typeof v === 'string' && v.length > 0 && v.length <= MAX_ID_LENGTH;

/** Owner key of the one principal of a server without `authenticate`. */
const ANONYMOUS = 'anonymous';

const isNakCode = (v: unknown): v is NakCode => (NAK_CODES as readonly unknown[]).includes(v);

/** Whether `v` is a promise or promise-like (what `await` would wait for). */
const isThenable = (v: unknown): v is PromiseLike<unknown> =>
  typeof v === 'object' && v !== null && typeof (v as { then?: unknown }).then === 'function';

/** Build the dispatcher; it owns no transport, timer or connection. */
export function makeDispatcher<P>(o: DispatcherOptions<P>): Dispatcher<P> {
  const { hooks, store, dedupe, channels, bindings, onError } = o;

  // Owner keys of object principals, computed once per object (a socket's principal is one).
  const owners = new WeakMap<object, string>();
  /** The principal's owner key; everyone is the one anonymous principal without `authenticate`. */
  const ownerKey = (principal: P): string => {
    if (!hooks.authenticate) return ANONYMOUS;
    const cacheable = typeof principal === 'object' && principal !== null;
    const cached = cacheable ? owners.get(principal) : undefined;
    if (cached !== undefined) return cached;
    const owner = ownerOf(o.principalKey(principal));
    if (cacheable) owners.set(principal, owner);
    return owner;
  };

  /** Bind or refresh; `null` when the principal may use `clientId`, else the refusal. */
  async function bind(clientId: string, principal: P): Promise<AuthRefusal | null> {
    // Without authenticate there is one principal: nobody else can hold a binding.
    if (!hooks.authenticate) return null;
    let outcome: BindOutcome;
    try {
      outcome = await bindings.bind(clientId, ownerKey(principal));
    } catch (err) {
      onError(err, 'bind');
      return {
        ok: false,
        status: HTTP_STATUS_OF.server_error,
        nak: nak(null, 'server_error', 'identity store unavailable'),
      };
    }
    if (outcome === 'bound') return null;
    if (outcome === 'full') {
      return {
        ok: false,
        status: HTTP_STATUS_OF.too_many_clients,
        nak: nak(null, 'too_many_clients', 'too many clientIds in use; retry later'),
        headers: { 'Retry-After': String(TOO_MANY_CLIENTS_RETRY_S) },
      };
    }
    return {
      ok: false,
      status: HTTP_STATUS_OF.client_id_taken,
      nak: nak(null, 'client_id_taken', 'this clientId belongs to another principal; use a new one'),
    };
  }

  async function publish(
    channel: string,
    payload: unknown,
    opts: PublishOptions = {},
  ): Promise<PublishResult> {
    if ((o.publishClosed ?? o.closing)()) throw new SyncError('closed', 'server is closed');
    if (!isValidChannel(channel)) throw new SyncError('bad_request', 'bad channel name');
    // Checked here, once: a payload that cannot be encoded would otherwise fail every
    // delivery and every replay of it, and its subscribers would never get past its seq.
    let json: string | undefined;
    try {
      json = JSON.stringify(payload);
    } catch {
      json = undefined;
    }
    if (json === undefined) throw new SyncError('bad_request', 'payload must be JSON-serializable');
    const appendOpts: AppendOptions = {};
    if (opts.except !== undefined) appendOpts.except = opts.except;
    if (opts.author !== undefined) appendOpts.author = opts.author;
    if (opts.key !== undefined) appendOpts.key = opts.key;
    const msg = await store.append(channel, payload, appendOpts);
    return { seq: msg.seq, epoch: msg.epoch };
  }

  function applySyn(
    syn: { id: string; payload: unknown[] },
    peer: Peer<P>,
  ): SynResponse | Promise<SynResponse> {
    // A batch still queued at shutdown is left for the client to resend to the next server.
    if (o.closing()) return notRemembered(nak(syn.id, 'server_error', 'server is closing'));
    const { clientId } = peer;
    let n = 0;
    // Every publication of the batch, in call order, for the response's `published` (made on
    // the first publish: most batches publish nothing).
    let publications: Array<Promise<Publication | undefined>> | undefined;
    const ctx: SyncContext<P> = {
      clientId,
      principal: peer.principal,
      // A method, not an arrow: destructuring it (`const { publish } = ctx`) still works (it
      // uses no `this`).
      publish(channel, payload, opts) {
        const made = publish(channel, payload, {
          except: opts?.except,
          author: opts && 'author' in opts ? opts.author : clientId,
          // The n-th publish of this batch has the same key whichever process runs it, so a
          // batch re-run after its process died publishes nothing twice (with a store that
          // honours keys).
          key: opts?.key ?? `${clientId.length}:${clientId}:${syn.id}#${n++}`,
        });
        publications ??= [];
        publications.push(
          made.then(
            ({ seq, epoch }) => ({ channel, seq, epoch }),
            () => undefined,
          ),
        );
        return made;
      },
    };
    let results: unknown;
    try {
      results = hooks.onSync(syn.payload, ctx);
    } catch (err) {
      return onSyncFailed(syn.id, err);
    }
    // A synchronous onSync (results, not a promise) is answered without a turn of the
    // microtask queue: the response itself goes back to `Dedupe.run`, which then answers in
    // this turn too (docs/benchmarks.md, session 5 LANE2, FIX14C); a promise is awaited.
    if (isThenable(results)) {
      return Promise.resolve(results).then(
        (r) => synResponse(syn, r, publications),
        (err: unknown) => onSyncFailed(syn.id, err),
      );
    }
    return synResponse(syn, results, publications);
  }

  /**
   * What a batch whose `onSync` threw (or rejected with) `err` is answered: not remembered as
   * its id's answer (FIX14C; PROTOCOL §2 `server_error`, "HTTP 5xx is retried"): an `onSync`
   * is all-or-nothing (README "A throwing `onSync` is not a rollback"), so a throw applied
   * nothing and a retry of the same id runs `onSync` again. Results not aligned with the
   * operations (`synResponse`) are remembered instead: that `onSync` returned, so it applied.
   */
  function onSyncFailed(id: string, err: unknown): SynResponse {
    // A NAK here says the batch was not completed, not that nothing of it was applied:
    // what onSync did (and published) before throwing stays (SyncServerOptions.onSync).
    if (err instanceof SyncError && isNakCode(err.code)) return notRemembered(nak(id, err.code, err.message));
    onError(err, 'onSync');
    return notRemembered(nak(id, 'server_error', 'the server failed to apply the batch'));
  }

  /** The response to a batch `onSync` answered with `results` (checked here). */
  function synResponse(
    syn: { id: string; payload: unknown[] },
    results: unknown,
    publications: Array<Promise<Publication | undefined>> | undefined,
  ): SynResponse | Promise<SynResponse> {
    if (!Array.isArray(results) || results.length !== syn.payload.length) {
      onError(
        new Error(
          `onSync returned ${Array.isArray(results) ? results.length : typeof results} for ${syn.payload.length} ops`,
        ),
        'onSync',
      );
      return nak(syn.id, 'server_error', 'the server returned results not aligned with the operations');
    }
    const response: SynResponse = { id: syn.id, type: 'SYN', payload: results };
    // Publications onSync started, also those it did not await; failed ones are left out.
    if (publications !== undefined) {
      return Promise.all(publications).then((all) => {
        const published = all.filter((p): p is Publication => p !== undefined);
        if (published.length > 0) response.published = published;
        return checked(syn.id, response);
      });
    }
    return checked(syn.id, response);
  }

  /** `response`, its JSON text made (kept for the dedupe memory's size and for sending). */
  function checked(id: string, response: SynResponse): SynResponse {
    try {
      encodeOnce(response);
    } catch (err) {
      onError(err, 'onSync results');
      return nak(id, 'server_error', 'the server returned results that are not JSON');
    }
    return response;
  }

  /** `authorize` for one channel: `null` when allowed, else the refusal entry. */
  async function refusal(principal: P, name: string): Promise<ChannelRefusal | null> {
    if (!hooks.authorize) return null;
    try {
      if ((await hooks.authorize(principal, name, 'subscribe')) === true) return null;
      return { error: { code: 'forbidden', message: `not allowed to subscribe to ${name}` } };
    } catch (err) {
      onError(err, 'authorize');
      return { error: { code: 'server_error', message: 'authorization failed' } };
    }
  }

  /**
   * Whether looking `names` up would take the store past `maxChannels` channel records:
   * only when the count is that close is each name checked, and then a name the store does
   * not keep yet (and no socket here follows) is one too many. Every HTTP poll and socket
   * `SUB` creates the records of the channels it names (`head`); `releaseChannels` frees
   * those never published to once nobody here follows them, housekeeping the others.
   *
   * The last `channelReserve` records are kept for principals that hold few (issue 12: 100
   * principals holding 1 000 new channels each filled the 100 000 and every later principal
   * was refused a new channel): past `maxChannels - channelReserve`, only a `SUB` after which
   * its principal (`key`) follows at most `reserveShare` channels here may make new records.
   */
  /**
   * New channel records that admitted `SUB`s and polls may still make (issue 12, FIX1): a
   * `SUB` admitted under `maxChannels` holds here, from the moment of its decision (synchronous)
   * until it is answered, the number of fresh names it may create, so `SUB`s arriving at once
   * cannot all pass the same count (150 principals' SUBs of 1 000 fresh channels at the same
   * moment made 150 000 records of a 100 000 bound). By key too, for the reserve's share.
   */
  let reservedTotal = 0;
  const reservedBy = new Map<string, number>();
  /**
   * Reservations given back so far, all time: a `SUB` that read the store's count before some
   * were given back (their records made after the read) counts them as still reserved.
   */
  let releasedTotal = 0;
  const unreserve = (key: string, n: number): void => {
    if (n <= 0) return;
    reservedTotal -= n;
    releasedTotal += n;
    const left = (reservedBy.get(key) ?? 0) - n;
    if (left > 0) reservedBy.set(key, left);
    else reservedBy.delete(key);
  };

  /**
   * Whether looking `names` up would take the store past `maxChannels` channel records; if
   * not, the number of records reserved for the `SUB` (give them back with `unreserve(key, n)`
   * once it is answered). Every HTTP poll and socket `SUB` creates the records of the channels
   * it names (`head`); `releaseChannels` frees those never published to once nobody here
   * follows them, housekeeping the others.
   *
   * The count read from the store is taken with every reservation held by `SUB`s still being
   * answered and every one given back since just before the read (their records may be
   * missing from it), so concurrent `SUB`s cannot pass the same count. Only when that is
   * close to the bound is each name checked, and then a name the store does not keep yet (and
   * no socket here follows) is one too many; the decision and the reservation are made in
   * the same synchronous step.
   *
   * The last `channelReserve` records are kept for principals that hold few (issue 12: 100
   * principals holding 1 000 new channels each filled the 100 000 and every later principal
   * was refused a new channel): past `maxChannels - channelReserve`, only a `SUB` after which
   * its principal (`key`) follows at most `reserveShare` channels here (counting its other
   * `SUB`s' reservations) may make new records.
   */
  async function overChannelCap(
    names: string[],
    key: string,
    job?: LookupJob,
  ): Promise<{ over: true } | { over: false; reserved: number }> {
    if (o.maxChannels === undefined || !store.channelCount) return { over: false, reserved: 0 };
    const cap = o.maxChannels;
    const released0 = releasedTotal;
    const kept = await store.channelCount();
    o.onChannelCount?.(kept);
    const reserve = Math.min(o.channelReserve ?? 0, cap);
    /** Records that may exist once the others' reservations are used, as of now. */
    const taken = () => kept + reservedTotal + (releasedTotal - released0);
    const take = (n: number) => {
      reservedTotal += n;
      reservedBy.set(key, (reservedBy.get(key) ?? 0) + n);
      return { over: false as const, reserved: n };
    };
    if (taken() + names.length <= cap - reserve) return take(names.length);
    let fresh = 0;
    for (let i = 0; i < names.length; ) {
      // These are look-ups too: a slice at a time, as the scheduler grants them.
      const n = job ? await job.turn(names.length - i) : names.length - i;
      if (n <= 0) throw new RequesterGone();
      for (const name of names.slice(i, i + n)) {
        if (channels.isLive(name)) continue;
        if (store.hasChannel && (await store.hasChannel(name))) continue;
        fresh++;
      }
      i += n;
    }
    if (fresh === 0) return { over: false, reserved: 0 };
    const small = channels.countOf(key) + (reservedBy.get(key) ?? 0) + fresh <= (o.reserveShare ?? 0);
    if (taken() + fresh > (small ? cap : cap - reserve)) return { over: true };
    return take(fresh);
  }

  /**
   * Answer a `SUB` channel by channel (PROTOCOL §3 rule 7): a refused channel gets an `error`
   * entry and the others are served. On a socket, a refused channel also ends any live
   * subscription the socket had to it, and channels beyond the principal's cap are refused
   * `too_many_channels`.
   */
  const lookups =
    o.maxChannelLookupsPerSecondPerPrincipal === undefined
      ? undefined
      : new KeyedBuckets(
          o.maxChannelLookupsPerSecondPerPrincipal,
          Math.max(o.maxChannelLookupsPerSecondPerPrincipal, o.maxChannelsPerPrincipal),
        );

  async function subscribe(env: SubEnvelope, peer: Peer<P>): Promise<void> {
    // Queued behind others on a socket that closed meanwhile (or an aborted request): no work
    // for a requester that left (FIX1: 700 attackers' SUBs were looked up ~2 minutes after).
    if (peer.conn ? !peer.conn.open : peer.gone?.()) return;
    const cursors = env.payload.channels;
    const names = Object.keys(cursors);
    // More channels in one SUB than a principal may hold at all is refused whole, before any
    // `authorize` call or store look-up: each look-up costs the store an entry and the event
    // loop time, so the count is checked before the work it protects.
    if (names.length > o.maxChannelsPerPrincipal) {
      peer.send(
        nak(
          env.id,
          'too_many_channels',
          `a SUB may name at most ${o.maxChannelsPerPrincipal} channels (it named ${names.length})`,
        ),
      );
      return;
    }
    // On a socket, the SUB counts as a frame per channel it names (the frame itself took one):
    // SUBs that keep coming after a refusal are then refused before they are parsed.
    peer.conn?.chargeFrames?.(names.length - 1);
    peer.chargeChannels?.(names.length);
    // Each channel named costs the store a look-up (and a record) and the event loop time, so
    // a SUB is charged by its channels against its principal's budget, not as one frame.
    const key =
      peer.limitKey ?? (o.lookupKey ? o.lookupKey(peer.principal, peer.clientId) : `c:${peer.clientId}`);
    if (lookups && names.length > 0) {
      if (!lookups.take(key, names.length)) {
        peer.send(
          nak(
            env.id,
            'rate_limited',
            `at most ${lookups.rate} channel look-ups per second per principal; retry later`,
          ),
        );
        return;
      }
    }
    // Then server-wide: the look-ups wait for their turn in one scheduler for every principal;
    // a principal that already has look-ups waiting while the server's backlog is full is
    // refused (lookups.ts).
    const gone = peer.conn ? () => !peer.conn?.open : peer.gone;
    const job = o.lookups && names.length > 0 ? o.lookups.admit(key, names.length, gone) : undefined;
    if (o.lookups && names.length > 0 && !job) {
      peer.send(nak(env.id, 'rate_limited', 'the server has too many channel look-ups waiting; retry later'));
      return;
    }
    try {
      await answerSub(env, peer, names, key, job);
    } finally {
      job?.done();
    }
  }

  async function answerSub(
    env: SubEnvelope,
    peer: Peer<P>,
    names: string[],
    key: string,
    job: LookupJob | undefined,
  ): Promise<void> {
    let cap: Awaited<ReturnType<typeof overChannelCap>>;
    try {
      cap = await overChannelCap(names, key, job);
    } catch (err) {
      if (err instanceof RequesterGone) return;
      onError(err, 'subscribe');
      peer.send(nak(env.id, 'server_error', 'subscription failed'));
      return;
    }
    if (cap.over) {
      peer.send(nak(env.id, 'rate_limited', `this server keeps ${o.maxChannels} channels; retry later`));
      return;
    }
    try {
      await answerAdmitted(env, peer, names, key, job);
    } finally {
      // The records are made (or were not): the store's count has them from now on.
      unreserve(key, cap.reserved);
    }
  }

  async function answerAdmitted(
    env: SubEnvelope,
    peer: Peer<P>,
    names: string[],
    key: string,
    job: LookupJob | undefined,
  ): Promise<void> {
    const cursors = env.payload.channels;
    const entries = channelRecord<ChannelEntry>();
    const allowed = channelRecord<ChannelCursor>();
    for (const name of names) {
      const refused = await refusal(peer.principal, name);
      if (refused) entries[name] = refused;
      else allowed[name] = cursors[name]!;
    }
    const conn = peer.conn;
    if (conn) {
      channels.unsubscribe(
        conn,
        names.filter((n) => entryOf(entries, n)),
      );
      let used = channels.countOf(conn.subscriberKey);
      for (const name of Object.keys(allowed)) {
        if (conn.subs.has(name)) continue;
        if (used >= o.maxChannelsPerPrincipal) {
          delete allowed[name];
          entries[name] = {
            error: {
              code: 'too_many_channels',
              message: `at most ${o.maxChannelsPerPrincipal} channels per principal`,
            },
          };
        } else used++;
      }
    }
    const snapshot = hooks.snapshot
      ? (channel: string) => hooks.snapshot?.(channel, peer.principal)
      : undefined;
    try {
      if (Object.keys(allowed).length > 0) {
        if (conn) {
          Object.assign(entries, await channels.subscribe(conn, allowed, snapshot, job));
        } else {
          /** The names looked up, so far: a poll stopped early made no record for the rest. */
          const polled: string[] = [];
          try {
            const { messages, states } = await channels.poll(peer.clientId, allowed, snapshot, job, polled);
            for (const m of messages) peer.send(m);
            Object.assign(entries, states);
          } finally {
            // A poll follows nothing: the records its look-ups made for never-published
            // channels are freed now, not at the next housekeeping (HistoryStore.releaseChannels).
            channels.release(polled, key);
          }
        }
      }
      // Entries in the order the SUB named them.
      const ordered = channelRecord<ChannelEntry>();
      for (const name of names) ordered[name] = entries[name]!;
      peer.send({ id: env.id, type: 'SYN', payload: [{ channels: ordered }] });
    } catch (err) {
      // The socket closed or the request was aborted: nobody to answer (lookups.ts).
      if (err instanceof RequesterGone) return;
      onError(err, 'subscribe');
      peer.send(nak(env.id, 'server_error', 'subscription failed'));
    }
  }

  function matches(m: RevokeMatch, peer: ChannelPeer): boolean {
    if (m.clientId !== undefined && peer.clientId !== m.clientId) return false;
    if (m.principalKey !== undefined && peer.subscriberKey !== m.principalKey) return false;
    return true;
  }

  /** End `names` for one socket, in its serial lane, and tell it; `check` re-decides there. */
  function endFor(
    peer: ChannelPeer,
    names: string[],
    error: { code: 'forbidden' | 'unsubscribed'; message: string },
    check?: (name: string) => Promise<boolean>,
  ): Promise<number> {
    return peer.serial(async () => {
      const ended: string[] = [];
      for (const name of names) {
        // Unsubscribed meanwhile, or re-allowed: nothing to end.
        if (!peer.subs.has(name)) continue;
        if (check && !(await check(name))) continue;
        if (!peer.subs.has(name)) continue;
        channels.unsubscribe(peer, [name]);
        ended.push(name);
      }
      if (ended.length > 0 && peer.open) {
        const notice: RevokeEnvelope = {
          id: randomId('u'),
          type: 'UNS',
          payload: { channels: ended },
          error,
        };
        peer.sendText(encode(notice));
      }
      return ended.length;
    });
  }

  function byPeer(m: RevokeMatch): Map<ChannelPeer, string[]> {
    const out = new Map<ChannelPeer, string[]>();
    for (const { peer, channel } of channels.live(m.channel)) {
      if (!matches(m, peer)) continue;
      const list = out.get(peer);
      if (list) list.push(channel);
      else out.set(peer, [channel]);
    }
    return out;
  }

  async function revoke(
    m: RevokeMatch,
    error: { code: 'forbidden' | 'unsubscribed'; message: string },
  ): Promise<number> {
    const counts = await Promise.all([...byPeer(m)].map(([peer, names]) => endFor(peer, names, error)));
    return counts.reduce((a, b) => a + b, 0);
  }

  async function recheck(): Promise<number> {
    const counts = await Promise.all(
      [...byPeer({})].map(([peer, names]) =>
        endFor(
          peer,
          names,
          { code: 'forbidden', message: 'no longer allowed to subscribe' },
          async (name) => (await refusal(peer.principal as P, name)) !== null,
        ),
      ),
    );
    return counts.reduce((a, b) => a + b, 0);
  }

  /** SUB/UNS frames waiting in (or running from) each socket's lane. */
  const laned = new WeakMap<LivePeer, number>();
  const maxLaned = o.maxQueuedPerSocket ?? 100;
  /**
   * Run `task` in the socket's serial lane, unless `maxQueuedPerSocket` SUB/UNS frames are
   * already waiting there: then `NAK rate_limited` (not remembered; the client may retry).
   * Bytes are bounded by the budget (limits.ts); this bounds the count, as for `SYN`s.
   */
  async function inLane(conn: LivePeer, id: string, peer: Peer<P>, task: () => Promise<void>): Promise<void> {
    const n = laned.get(conn) ?? 0;
    if (n >= maxLaned) {
      peer.send(nak(id, 'rate_limited', 'too many SUB/UNS waiting on this socket; retry later'));
      return;
    }
    laned.set(conn, n + 1);
    try {
      await conn.serial(task);
    } finally {
      laned.set(conn, (laned.get(conn) ?? 1) - 1);
    }
  }

  /**
   * Answer one valid envelope: `undefined` when its last reply was sent in this turn, else a
   * promise that resolves when it was. Never throws or rejects.
   */
  function dispatch(env: RequestEnvelope, peer: Peer<P>): Promise<void> | undefined {
    // ACK on receipt, before any processing (PROTOCOL §3 rule 1).
    peer.send({ id: env.id, type: 'ACK' });
    // A SYN without `authenticate` (no binding to refresh): answered in this turn when onSync
    // is synchronous, with no turn of the microtask queue between the ACK and the response.
    if (env.type === 'SYN' && !hooks.authenticate) {
      try {
        const answered = dedupe.run(ANONYMOUS, peer.clientId, env, () => applySyn(env, peer), holderOf(peer));
        if (!isThenable(answered)) {
          peer.send(answered);
          return undefined;
        }
        return Promise.resolve(answered).then(
          (response) => peer.send(response),
          (err: unknown) => dispatchFailed(env, peer, err),
        );
      } catch (err) {
        dispatchFailed(env, peer, err);
        return undefined;
      }
    }
    return answer(env, peer);
  }

  /**
   * Whose dedupe entry a peer's batch makes: the key its limits count under, so eviction under
   * the dedupe caps takes from the largest holder first (dedupe.ts `shed`, FIX14C).
   */
  function holderOf(peer: Peer<P>): string {
    return peer.limitKey ?? (o.lookupKey ? o.lookupKey(peer.principal, peer.clientId) : `c:${peer.clientId}`);
  }

  function dispatchFailed(env: RequestEnvelope, peer: Peer<P>, err: unknown): void {
    onError(err, `dispatch ${env.type}`);
    peer.send(nak(env.id, 'server_error', 'internal error'));
  }

  /** `dispatch` once the ACK was sent: every envelope but an unauthenticated SYN. */
  async function answer(env: RequestEnvelope, peer: Peer<P>): Promise<void> {
    try {
      switch (env.type) {
        case 'PNG':
          return;
        case 'SYN': {
          // Refreshes the binding (so it outlives the dedupe entries) and re-checks it.
          // (Without `authenticate` there is nothing to bind: no promise, no turn of the loop.)
          const refused = hooks.authenticate ? await bind(peer.clientId, peer.principal) : null;
          if (refused) return peer.send({ ...refused.nak, id: env.id });
          const owner = ownerKey(peer.principal);
          peer.send(await dedupe.run(owner, peer.clientId, env, () => applySyn(env, peer), holderOf(peer)));
          return;
        }
        case 'SUB':
          // A socket's SUBs and UNSs apply in order, or an UNS could overtake its SUB.
          if (peer.conn) return await inLane(peer.conn, env.id, peer, () => subscribe(env, peer));
          return await subscribe(env, peer);
        case 'UNS':
          if (peer.conn) {
            const conn = peer.conn;
            await inLane(conn, env.id, peer, async () => {
              channels.unsubscribe(conn, env.payload.channels);
              peer.send({ id: env.id, type: 'SYN', payload: [{}] });
            });
            return;
          }
          peer.send({ id: env.id, type: 'SYN', payload: [{}] });
          return;
      }
    } catch (err) {
      dispatchFailed(env, peer, err);
    }
  }

  /** Run `authenticate`: the principal, or the status and NAK to refuse with. */
  async function authenticate(req: IncomingMessage): Promise<AuthResult<P>> {
    if (!hooks.authenticate) return { ok: true, principal: null as P };
    try {
      const principal = await hooks.authenticate(req);
      if (principal === null || principal === undefined) {
        return {
          ok: false,
          status: HTTP_STATUS_OF.unauthorized,
          nak: nak(null, 'unauthorized', 'authentication required'),
        };
      }
      return { ok: true, principal };
    } catch (err) {
      if (err instanceof SyncError && (err.code === 'forbidden' || err.code === 'unauthorized')) {
        return { ok: false, status: HTTP_STATUS_OF[err.code], nak: nak(null, err.code, err.message) };
      }
      onError(err, 'authenticate');
      return {
        ok: false,
        status: HTTP_STATUS_OF.server_error,
        nak: nak(null, 'server_error', 'authentication failed'),
      };
    }
  }

  return { publish, dispatch, authenticate, bind, applySyn, subscribe, revoke, recheck };
}
