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
  HTTP_STATUS_OF,
  isValidChannel,
  MAX_ID_LENGTH,
  NAK_CODES,
  type NakCode,
  type NakEnvelope,
  nak,
  type Publication,
  type RequestEnvelope,
  type ServerEnvelope,
  type SubEnvelope,
  SyncError,
} from '../protocol/index.js';
import type { AppendOptions, HistoryStore } from '../stores/types.js';
import type { ChannelPeer, Channels } from './channels.js';
import type { Dedupe, SynResponse } from './dedupe.js';
import { type Bindings, ownerOf } from './identity.js';
import type { PublishOptions, PublishResult, SyncContext, SyncServerOptions } from './index.js';

/** A peer whose subscriptions are live (a socket): `Channels` delivers to it directly. */
export interface LivePeer extends ChannelPeer {
  /** Run `task` after every task queued before it (a socket's SUBs and UNSs keep their order). */
  serial<T>(task: () => Promise<T>): Promise<T>;
}

/** Whoever sent an envelope, on whichever transport. */
export interface Peer<P> {
  clientId: string;
  principal: P;
  send(env: ServerEnvelope): void;
  /** Set for sockets: subscriptions are live; HTTP gets a one-shot replay. */
  conn?: LivePeer;
}

/** What `authenticate` decided: the principal, or the HTTP status and NAK to refuse with. */
export type AuthResult<P> = { ok: true; principal: P } | { ok: false; status: number; nak: NakEnvelope };

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
}

export interface Dispatcher<P> {
  /** `server.publish`: append to a channel's history. */
  publish(channel: string, payload: unknown, opts?: PublishOptions): Promise<PublishResult>;
  /** Answer one valid envelope. Resolves when its last reply was sent; never rejects. */
  dispatch(env: RequestEnvelope, peer: Peer<P>): Promise<void>;
  /**
   * Run `authenticate`, then bind `clientId` to the principal (PROTOCOL §1): the principal, or
   * the status and NAK to refuse with (409 `client_id_taken` when another principal owns
   * `clientId`). Never rejects.
   */
  authenticate(req: IncomingMessage, clientId: string): Promise<AuthResult<P>>;
  /** Run `onSync` for one batch and check its results; never rejects. */
  applySyn(syn: { id: string; payload: unknown[] }, peer: Peer<P>): Promise<SynResponse>;
  /** Answer a `SUB`: live subscriptions for a socket, a one-shot replay otherwise. */
  subscribe(env: SubEnvelope, peer: Peer<P>): Promise<void>;
}

/** Whether `v` is a usable clientId (1 to `MAX_ID_LENGTH` characters). */
export const validClientId = (v: unknown): v is string =>
  typeof v === 'string' && v.length > 0 && v.length <= MAX_ID_LENGTH;

/** Owner key of the one principal of a server without `authenticate`. */
const ANONYMOUS = 'anonymous';

const isNakCode = (v: unknown): v is NakCode => (NAK_CODES as readonly unknown[]).includes(v);

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
  async function bind(clientId: string, principal: P): Promise<Exclude<AuthResult<P>, { ok: true }> | null> {
    // Without authenticate there is one principal: nobody else can hold a binding.
    if (!hooks.authenticate) return null;
    let ok: boolean;
    try {
      ok = await bindings.bind(clientId, ownerKey(principal));
    } catch (err) {
      onError(err, 'bind');
      return {
        ok: false,
        status: HTTP_STATUS_OF.server_error,
        nak: nak(null, 'server_error', 'identity store unavailable'),
      };
    }
    if (ok) return null;
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

  async function applySyn(syn: { id: string; payload: unknown[] }, peer: Peer<P>): Promise<SynResponse> {
    // A batch still queued at shutdown is left for the client to resend to the next server.
    if (o.closing()) return nak(syn.id, 'server_error', 'server is closing');
    const { clientId } = peer;
    // The n-th publish of this batch has the same key whichever process runs it, so a batch
    // re-run after its process died publishes nothing twice (with a store that honours keys).
    const batchKey = `${clientId.length}:${clientId}:${syn.id}`;
    let n = 0;
    // Every publication of the batch, in call order, for the response's `published`.
    const publications: Array<Promise<Publication | undefined>> = [];
    const ctx: SyncContext<P> = {
      clientId,
      principal: peer.principal,
      publish: (channel, payload, opts) => {
        const made = publish(channel, payload, {
          except: opts?.except,
          author: opts && 'author' in opts ? opts.author : clientId,
          key: opts?.key ?? `${batchKey}#${n++}`,
        });
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
      results = await hooks.onSync(syn.payload, ctx);
    } catch (err) {
      // A NAK here says the batch was not completed, not that nothing of it was applied:
      // what onSync did (and published) before throwing stays (SyncServerOptions.onSync).
      if (err instanceof SyncError && isNakCode(err.code)) return nak(syn.id, err.code, err.message);
      onError(err, 'onSync');
      return nak(syn.id, 'server_error', 'the server failed to apply the batch');
    }
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
    const published = (await Promise.all(publications)).filter((p): p is Publication => p !== undefined);
    if (published.length > 0) response.published = published;
    try {
      JSON.stringify(response);
    } catch (err) {
      onError(err, 'onSync results');
      return nak(syn.id, 'server_error', 'the server returned results that are not JSON');
    }
    return response;
  }

  async function refusal(principal: P, id: string, names: string[]): Promise<NakEnvelope | null> {
    if (!hooks.authorize) return null;
    for (const name of names) {
      let allowed: boolean;
      try {
        allowed = (await hooks.authorize(principal, name, 'subscribe')) === true;
      } catch (err) {
        onError(err, 'authorize');
        return nak(id, 'server_error', 'authorization failed');
      }
      if (!allowed) return nak(id, 'forbidden', `not allowed to subscribe to ${name}`);
    }
    return null;
  }

  async function subscribe(env: SubEnvelope, peer: Peer<P>): Promise<void> {
    const cursors = env.payload.channels;
    const refused = await refusal(peer.principal, env.id, Object.keys(cursors));
    if (refused) return peer.send(refused);
    const snapshot = hooks.snapshot
      ? (channel: string) => hooks.snapshot?.(channel, peer.principal)
      : undefined;
    try {
      if (peer.conn) {
        const states = await channels.subscribe(peer.conn, cursors, snapshot);
        peer.send({ id: env.id, type: 'SYN', payload: [{ channels: states }] });
      } else {
        const { messages, states } = await channels.poll(peer.clientId, cursors, snapshot);
        for (const m of messages) peer.send(m);
        peer.send({ id: env.id, type: 'SYN', payload: [{ channels: states }] });
      }
    } catch (err) {
      onError(err, 'subscribe');
      peer.send(nak(env.id, 'server_error', 'subscription failed'));
    }
  }

  /** Answer one valid envelope. Resolves when its last reply was sent; never rejects. */
  async function dispatch(env: RequestEnvelope, peer: Peer<P>): Promise<void> {
    // ACK on receipt, before any processing (PROTOCOL §3 rule 1).
    peer.send({ id: env.id, type: 'ACK' });
    try {
      switch (env.type) {
        case 'PNG':
          return;
        case 'SYN': {
          // Refreshes the binding (so it outlives the dedupe entries) and re-checks it.
          const refused = await bind(peer.clientId, peer.principal);
          if (refused) return peer.send({ ...refused.nak, id: env.id });
          const owner = ownerKey(peer.principal);
          peer.send(await dedupe.run(owner, peer.clientId, env, () => applySyn(env, peer)));
          return;
        }
        case 'SUB':
          // A socket's SUBs and UNSs apply in order, or an UNS could overtake its SUB.
          if (peer.conn) return await peer.conn.serial(() => subscribe(env, peer));
          return await subscribe(env, peer);
        case 'UNS':
          if (peer.conn) {
            const conn = peer.conn;
            await conn.serial(async () => channels.unsubscribe(conn, env.payload.channels));
          }
          peer.send({ id: env.id, type: 'SYN', payload: [{}] });
          return;
      }
    } catch (err) {
      onError(err, `dispatch ${env.type}`);
      peer.send(nak(env.id, 'server_error', 'internal error'));
    }
  }

  /** Run `authenticate`: the principal, or the status and NAK to refuse with. */
  async function authenticate(req: IncomingMessage, clientId: string): Promise<AuthResult<P>> {
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
      return (await bind(clientId, principal)) ?? { ok: true, principal };
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

  return { publish, dispatch, authenticate, applySyn, subscribe };
}
