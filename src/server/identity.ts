/**
 * Who owns a clientId (docs/PROTOCOL.md §1, "principal binding"): the first principal that
 * uses a clientId owns it; another principal presenting it is refused `client_id_taken`
 * (HTTP 409, on the upgrade and on HTTP requests). A binding lasts `ttlMs` (the dedupe window)
 * after its last use and is refreshed on use, so it outlives every response remembered for
 * that client: dedupe keys are scoped to the principal too (dedupe.ts), and the binding is
 * what keeps a second principal from even sharing a clientId's echo suppression.
 *
 * With a `DedupeStore` that has `bind` (sqliteStore, redisStore) the store holds bindings, so
 * every process agrees; this class then only caches confirmations for a tenth of the window.
 * Without one, bindings live here for their whole window: never evicted early, a new clientId
 * is refused (`too_many_clients`) while `maxEntries`, or the owner's `maxPerOwner`, are held.
 */

import { createHash } from 'node:crypto';
import type { IncomingMessage } from 'node:http';
import ipaddr from 'ipaddr.js';
import proxyaddr from 'proxy-addr';
import type { DedupeStore } from '../stores/types.js';

/**
 * Which proxies in front of the server are trusted to say who the client is (the server's
 * `trustProxy` option; the values Express's `trust proxy` and Fastify's `trustProxy` take,
 * evaluated by the `proxy-addr` package they use):
 * - `false` (the default): nobody; the client is the socket's peer address.
 * - `true`: every hop; the client is the left-most `X-Forwarded-For` entry (only behind a
 *   proxy that overwrites the header: a client can put anything in it).
 * - a number `n`: the `n` hops nearest the server (`1`: one reverse proxy).
 * - addresses / CIDR ranges, or the names `'loopback'`, `'linklocal'`, `'uniquelocal'`, as
 *   a list or one comma-separated string: hops at those addresses.
 * - a function `(address, hopIndex) => boolean`: decides per hop (0 is the socket's peer).
 */
export type TrustProxy =
  | boolean
  | number
  | string
  | readonly string[]
  | ((address: string, hop: number) => boolean);

/**
 * `trustProxy` as the function `proxy-addr` calls per hop. Throws `TypeError` for an
 * address or range `proxy-addr` cannot parse (at `createSyncServer`, not per request).
 */
export function compileTrust(v: TrustProxy | undefined): (address: string, hop: number) => boolean {
  if (v === undefined || v === false) return () => false;
  if (v === true) return () => true;
  if (typeof v === 'number') {
    if (!(Number.isInteger(v) && v >= 0))
      throw new TypeError('trustProxy: a hop count must be an integer ≥ 0');
    return (_address, hop) => hop < v;
  }
  if (typeof v === 'function') return v;
  const list = typeof v === 'string' ? v.split(',').map((s) => s.trim()) : [...v];
  return proxyaddr.compile(list);
}

/**
 * An address as an IP address in canonical form, or `undefined` when it is none. What a proxy
 * may write in `X-Forwarded-For` besides a bare IP is normalised (issue 12, F5: a port made
 * every connection a new address for the per-address limits): a port (`1.2.3.4:5678`,
 * `[2001:db8::1]:5678`), brackets (`[::1]`), an IPv6 zone (`fe80::1%eth0`), surrounding
 * white space; IPv4-mapped IPv6 becomes IPv4, and IPv4 with leading zeros a dotted quad.
 */
export function normalizeAddress(raw: string | undefined): string | undefined {
  if (!raw) return undefined;
  let s = raw.trim();
  const bracketed = /^\[([^\]]+)\](?::\d{1,5})?$/.exec(s);
  if (bracketed?.[1]) s = bracketed[1];
  else {
    const v4port = /^([^:]+):\d{1,5}$/.exec(s);
    if (v4port?.[1]) s = v4port[1];
  }
  const zone = s.indexOf('%');
  if (zone >= 0) s = s.slice(0, zone);
  if (!ipaddr.isValid(s)) return undefined;
  try {
    return ipaddr.process(s).toString();
  } catch {
    return undefined;
  }
}

/**
 * The client's address: the socket's peer, or, through the trusted proxies, the address the
 * last trusted one says it served (`proxy-addr`, reading `X-Forwarded-For`), normalised by
 * `normalizeAddress`. An entry that is no IP address even then (`unknown`, a host name,
 * garbage) is not used as a key of its own: the client is then keyed by the address of the
 * trusted hop that wrote it (the nearest one that is an IP; the socket's peer at worst), so
 * varying that entry cannot multiply a client's per-address limits. `undefined` when the
 * socket has none (destroyed).
 */
export function clientAddress(
  req: IncomingMessage,
  trust: (address: string, hop: number) => boolean,
): string | undefined {
  const peer = req.socket?.remoteAddress;
  if (!peer) return undefined;
  // [peer, …trusted hops, client], nearest first.
  const chain = proxyaddr.all(req, trust);
  for (let i = chain.length - 1; i >= 0; i--) {
    const ip = normalizeAddress(chain[i]);
    if (ip) return ip;
  }
  return peer;
}

/**
 * The key an anonymous client's limits count under: `a:<address>`, IPv4 as dotted quad
 * (IPv4-mapped IPv6 too), IPv6 grouped by its /64 (`a:2001:db8:0:1::/64`: one subscriber's
 * network usually gets a whole /64, so per-address limits by full IPv6 address are dodged by
 * changing the interface id; express-rate-limit does the same). Never throws; the address is
 * normalised first (`normalizeAddress`); one that is still no IP is used as it is.
 */
export function addressKey(address: string | undefined): string {
  if (!address) return 'a:unknown';
  const normal = normalizeAddress(address);
  if (normal === undefined) return `a:${address}`;
  const ip = ipaddr.parse(normal);
  if (ip.kind() === 'ipv6') {
    const v6 = ip as ipaddr.IPv6;
    return `a:${v6.parts
      .slice(0, 4)
      .map((n) => n.toString(16))
      .join(':')}::/64`;
  }
  return `a:${ip.toString()}`;
}

/**
 * The default principal key: strings and numbers as they are, objects with a string or
 * number `id` by that id, anything else (including `null`, the anonymous principal) as JSON.
 */
export function defaultPrincipalKey(principal: unknown): string {
  if (typeof principal === 'string') return principal;
  if (typeof principal === 'number' || typeof principal === 'bigint') return String(principal);
  if (typeof principal === 'object' && principal !== null) {
    const id = (principal as { id?: unknown }).id;
    if (typeof id === 'string' || typeof id === 'number') return String(id);
  }
  return JSON.stringify(principal) ?? 'null';
}

/** A principal's owner key: SHA-256 (base64url) of its principal key; fixed length. */
export function ownerOf(principalKey: string): string {
  return createHash('sha256').update(principalKey).digest('base64url');
}

export interface BindingsOptions {
  ttlMs: number;
  /**
   * Most clientIds bound at once in this process (without a store that binds). A binding is
   * never evicted before its window ends: past this, a new clientId is refused `full`.
   */
  maxEntries: number;
  /** Most clientIds one owner may have bound at once in this process (same rule). */
  maxPerOwner: number;
  /** Holds bindings shared by processes when it has `bind`. */
  store: DedupeStore | undefined;
  now?: () => number;
}

/**
 * What `bind` decided: `bound` (bound or refreshed), `taken` (another owner holds the
 * clientId), `full` (a new clientId while the binding table, or the owner's share of it, is
 * full: `too_many_clients`).
 */
export type BindOutcome = 'bound' | 'taken' | 'full';

export class Bindings {
  /**
   * clientId → owner and when it was last used. Map order is use order (a refresh moves the
   * entry to the end), so the entries whose window ended are at the front.
   */
  private readonly local = new Map<string, { owner: string; at: number }>();
  /** Bindings per owner in `local` (only without a store that binds). */
  private readonly perOwner = new Map<string, number>();
  private readonly now: () => number;

  constructor(private readonly opts: BindingsOptions) {
    this.now = opts.now ?? Date.now;
  }

  /** Bindings held (or cached) in this process. */
  get size(): number {
    return this.local.size;
  }

  /**
   * Bind `clientId` to `owner` or refresh that binding. Rejects only when the store fails.
   *
   * Without a store that binds, the table here is the memory of record: a binding lives
   * `ttlMs` after its last use and is never evicted earlier, whatever the pressure (issue 12:
   * a flood of fresh clientIds evicting a victim's binding let another principal take its
   * clientId). A new clientId past `maxEntries`, or past the owner's `maxPerOwner`, is
   * refused (`full`) instead.
   */
  async bind(clientId: string, owner: string): Promise<BindOutcome> {
    const at = this.now();
    const store = this.opts.store?.bind ? this.opts.store : undefined;
    const entry = this.local.get(clientId);
    if (store) {
      // A confirmation younger than a tenth of the window cannot have lapsed in the store.
      if (entry && entry.owner === owner && at - entry.at < this.opts.ttlMs / 10) return 'bound';
      const ok = await store.bind!(clientId, owner, this.opts.ttlMs);
      // Here only a cache of the store's answers: dropping its oldest loses nothing.
      if (ok) {
        this.local.delete(clientId);
        this.local.set(clientId, { owner, at });
        while (this.local.size > this.opts.maxEntries) {
          this.local.delete(this.local.keys().next().value as string);
        }
      } else this.local.delete(clientId);
      return ok ? 'bound' : 'taken';
    }
    this.expire(at);
    if (entry && this.local.has(clientId)) {
      if (entry.owner !== owner) return 'taken';
      this.local.delete(clientId);
      this.local.set(clientId, { owner, at });
      return 'bound';
    }
    if (this.local.size >= this.opts.maxEntries || (this.perOwner.get(owner) ?? 0) >= this.opts.maxPerOwner) {
      return 'full';
    }
    this.local.set(clientId, { owner, at });
    this.perOwner.set(owner, (this.perOwner.get(owner) ?? 0) + 1);
    return 'bound';
  }

  /** Drop the bindings whose window ended (all at the front: Map order is use order). */
  expire(at = this.now()): void {
    if (this.opts.store?.bind) return;
    const cutoff = at - this.opts.ttlMs;
    for (const [clientId, e] of this.local) {
      if (e.at > cutoff) break;
      this.local.delete(clientId);
      const n = (this.perOwner.get(e.owner) ?? 1) - 1;
      if (n > 0) this.perOwner.set(e.owner, n);
      else this.perOwner.delete(e.owner);
    }
  }
}
