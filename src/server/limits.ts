/**
 * What the reference server refuses before doing any work for it, shared by both transports:
 * the origin check (cross-site WebSocket hijacking and cross-site requests, README
 * "Origins and CSWSH") and the budget of request bytes held in memory, per client and for
 * the whole server (README "Limits").
 */

import type { IncomingMessage } from 'node:http';
import { isIP } from 'node:net';

/**
 * Which `Origin`s may open a socket or send a request. Requests without an `Origin` header
 * (non-browser clients) and same-host requests (the `Origin`'s scheme and host, port
 * included, equal the request's: `Host` header, and `https` when the connection is TLS or a
 * proxy says so in `X-Forwarded-Proto` / `Forwarded: proto=`, else `http`) are always
 * accepted by the list form.
 * - `'same-host'`: nothing else (the default).
 * - a list: also these exact origins (`'https://app.example.org'`, scheme and port as the
 *   browser sends them); `'*'` in the list accepts every origin.
 * - a function: decides alone, for every request that carries an `Origin`.
 */
export type AllowedOrigins =
  | 'same-host'
  | readonly string[]
  | ((origin: string, req: IncomingMessage) => boolean);

/**
 * Whether `req` may go on, by its `Origin` header (RFC 6454 §7; browsers send it on every
 * WebSocket upgrade and every cross-origin or non-GET fetch). Never throws: a function that
 * throws refuses.
 */
export function originAllowed(req: IncomingMessage, allowed: AllowedOrigins): boolean {
  const origin = req.headers.origin;
  if (origin === undefined) return true;
  if (typeof allowed === 'function') {
    try {
      return allowed(origin, req) === true;
    } catch {
      return false;
    }
  }
  if (allowed !== 'same-host' && (allowed.includes('*') || allowed.includes(origin))) return true;
  return sameHost(origin, req);
}

/**
 * The scheme the client used to reach this server: `https` on a TLS socket; else what a
 * TLS-terminating proxy says (`X-Forwarded-Proto`, or `proto=` of RFC 7239 `Forwarded`,
 * first hop); else `http`. A browser page cannot set either header on an upgrade or a simple
 * request, so a page cannot use them to pass the check.
 */
export function requestScheme(req: IncomingMessage): 'http' | 'https' {
  if ((req.socket as { encrypted?: boolean } | undefined)?.encrypted) return 'https';
  const xfp = req.headers['x-forwarded-proto'];
  const first = (Array.isArray(xfp) ? xfp[0] : xfp)?.split(',')[0]?.trim().toLowerCase();
  if (first === 'https' || first === 'wss') return 'https';
  if (first) return 'http';
  const fwd = req.headers.forwarded;
  const m = fwd ? /(?:^|[;\s])proto="?([a-z]+)"?/i.exec(fwd.split(',')[0] ?? '') : null;
  return m && /^(https|wss)$/i.test(m[1]!) ? 'https' : 'http';
}

/**
 * Whether a serialized origin names the scheme and host (`hostname[:port]`) the request was
 * sent to: an `http:` page for a plain connection, an `https:` page for a TLS one (or one a
 * proxy says was TLS). A page on `http://host` talking to `wss://host`, or the reverse, is
 * another origin and is refused unless listed.
 */
function sameHost(origin: string, req: IncomingMessage): boolean {
  const host = req.headers.host;
  if (!host || origin === 'null') return false;
  let url: URL;
  try {
    url = new URL(origin);
  } catch {
    return false;
  }
  if (url.protocol !== `${requestScheme(req)}:`) return false;
  // `URL.host` drops the scheme's default port; a Host header may carry it, so compare both.
  const defaultPort = url.protocol === 'https:' ? '443' : url.protocol === 'http:' ? '80' : '';
  const h = host.toLowerCase();
  return h === url.host || (defaultPort !== '' && url.port === '' && h === `${url.host}:${defaultPort}`);
}

export interface BudgetOptions {
  /** Most request bytes held for one clientId at once (queued or being processed). */
  perClient: number;
  /**
   * Most request bytes held for one principal at once, all its clientIds together: its share
   * of `total`, so that one principal can never take the whole server's budget.
   */
  perPrincipal: number;
  /** Most request bytes held for all clients together. */
  total: number;
}

/**
 * Who holds bytes: the clientId, and the key its principal's limits count under
 * (`p:<principalKey>`; for the anonymous principal `a:<address>`, or `c:<clientId>` with
 * `anonymousKey: 'clientId'`).
 */
export interface Holder {
  readonly clientId: string;
  readonly principal: string;
}

/**
 * Bytes of requests received and not yet answered, per clientId, per principal and in all,
 * counted from the frame or body as it arrived (HTTP bodies while they arrive), before it is
 * parsed. A request that would take any count past its bound is refused (`NAK rate_limited`)
 * without being parsed: parsed JSON can take up to ~28 × its size on the heap (a frame of
 * `[[{},{},…],…]`, README "Limits"), so the bytes held here are what bounds that memory. The
 * per-principal share keeps one principal (however many clientIds and sockets it opens)
 * from taking the budget every other client needs.
 */
export class Budget {
  private readonly byClient = new Map<string, number>();
  private readonly byPrincipal = new Map<string, number>();
  private sum = 0;

  constructor(private readonly o: BudgetOptions) {}

  /** Bytes held in all. */
  get total(): number {
    return this.sum;
  }

  /** Bytes held for one principal key. */
  ofPrincipal(principal: string): number {
    return this.byPrincipal.get(principal) ?? 0;
  }

  /**
   * Reserve `bytes` for `who`; `false` (nothing reserved) when a bound would be passed.
   * `perClient: false` checks only the principal's share and the total (still counting the
   * bytes for the client): for an unfinished socket message, which may be up to 4 ×
   * `maxPayloadBytes` before it is refused `too_large`.
   */
  take(who: Holder, bytes: number, opts: { perClient?: boolean } = {}): boolean {
    if (!this.fits(who, bytes, opts)) return false;
    this.add(who, bytes);
    return true;
  }

  /** Whether `take(who, bytes, opts)` would reserve them; reserves nothing. */
  fits(who: Holder, bytes: number, opts: { perClient?: boolean } = {}): boolean {
    return (
      (opts.perClient === false || (this.byClient.get(who.clientId) ?? 0) + bytes <= this.o.perClient) &&
      (this.byPrincipal.get(who.principal) ?? 0) + bytes <= this.o.perPrincipal &&
      this.sum + bytes <= this.o.total
    );
  }

  /**
   * Reserve `bytes` for `who` without checking the bounds: only right after `fits` said yes,
   * in the same synchronous run (nothing else can have taken any meanwhile). A socket frame
   * answered in the turn it arrived is checked with `fits` and never reserved (session 6:
   * two Map writes and two deletes per frame saved); one whose answer comes later is added
   * when that is known, before anything else runs.
   */
  add(who: Holder, bytes: number): void {
    if (bytes <= 0) return;
    this.byClient.set(who.clientId, (this.byClient.get(who.clientId) ?? 0) + bytes);
    this.byPrincipal.set(who.principal, (this.byPrincipal.get(who.principal) ?? 0) + bytes);
    this.sum += bytes;
  }

  /** Give back what `take` reserved. */
  release(who: Holder, bytes: number): void {
    if (bytes <= 0) return;
    drop(this.byClient, who.clientId, bytes);
    drop(this.byPrincipal, who.principal, bytes);
    this.sum = Math.max(0, this.sum - bytes);
  }
}

/** Subtract `bytes` from `key`'s count, dropping the entry at 0 (maps of held bytes stay small). */
export function drop(m: Map<string, number>, key: string, bytes: number): void {
  const left = (m.get(key) ?? 0) - bytes;
  if (left > 0) m.set(key, left);
  else m.delete(key);
}

/**
 * The id of a frame refused before parsing, when it starts with one (`{"id":"…"`, as every
 * client this project ships writes it), so the client knows which request was refused.
 * Looks at the first bytes only: reading more would be the work the refusal saves.
 */
export function leadingId(frame: Buffer | string): string | null {
  const head = (typeof frame === 'string' ? frame.slice(0, 300) : frame.subarray(0, 300).toString('utf8'))
    .trimStart()
    .slice(0, 300);
  const m = /^\{\s*"id"\s*:\s*"((?:[^"\\]|\\.){1,128})"/.exec(head);
  if (!m) return null;
  try {
    return JSON.parse(`"${m[1]}"`) as string;
  } catch {
    return null;
  }
}

/**
 * The two numbers of a token bucket (`takeToken`), kept wherever is cheapest. Both stay
 * small integers for an integer rate (V8 keeps them in the object, not as a boxed heap
 * number each: idle memory per socket).
 */
export interface TokenState {
  /** Tokens left, in thousandths of a token. */
  tokens: number;
  /** When `tokens` was last refilled, in ms of `bucketNow()`. */
  last: number;
}

/** Origin of `bucketNow()`: the time this module was loaded. */
const BUCKET_EPOCH = Date.now();

/**
 * The clock of every token bucket: ms since this module was loaded (a small integer for
 * ~24 days, where `Date.now()` is a boxed double).
 */
export const bucketNow = (): number => Date.now() - BUCKET_EPOCH;

/** Add what `rate` tokens per second earned since `b.last`, up to `burst`, at `now`. */
function refill(b: TokenState, rate: number, burst: number, now: number): void {
  const elapsed = now - b.last;
  if (elapsed > 0) {
    b.tokens = Math.min(burst * 1000, b.tokens + elapsed * rate);
    b.last = now;
  }
}

/**
 * Take one token from a token bucket (RFC 2697's single-rate shape): `rate` tokens per second
 * refill it up to `burst`; each frame takes one. `false` when it is empty. `now` is
 * `bucketNow()`. O(1), allocates nothing: the two numbers are updated in place, counted in
 * thousandths of a token (`elapsed ms × rate per s` is then exact). Sockets keep them as
 * fields of their own (no object per socket: idle memory); a principal's sockets share one
 * `FrameBucket`.
 */
export function takeToken(b: TokenState, rate: number, burst: number, now: number): boolean {
  refill(b, rate, burst, now);
  if (b.tokens < 1000) return false;
  b.tokens -= 1000;
  return true;
}

/**
 * Take `cost` tokens at once from a token bucket (`takeToken`'s shape): `false`, and nothing
 * taken, when fewer are left. A cost above `burst` can never pass.
 */
export function takeTokens(b: TokenState, rate: number, burst: number, now: number, cost: number): boolean {
  refill(b, rate, burst, now);
  if (b.tokens < cost * 1000) return false;
  b.tokens -= cost * 1000;
  return true;
}

/**
 * Take up to `cost` tokens from a token bucket (`takeToken`'s shape), leaving it empty rather
 * than refusing when fewer are left: work already done is charged after the fact (a `SUB`
 * costs a frame per channel it names), so that the frames that follow are refused before
 * they are parsed.
 */
export function drainTokens(b: TokenState, rate: number, burst: number, now: number, cost: number): void {
  refill(b, rate, burst, now);
  b.tokens = Math.max(0, b.tokens - cost * 1000);
}

/**
 * Token buckets by key (a principal's), each `rate` tokens per second up to `burst`, for
 * charging work by its size (channel look-ups of a `SUB`). A bucket back at `burst` is the
 * same as none, so full ones are dropped when the map grows: memory stays proportional to
 * the keys that spent tokens in the last `burst / rate` seconds.
 */
export class KeyedBuckets {
  private readonly buckets = new Map<string, TokenState>();

  constructor(
    readonly rate: number,
    readonly burst: number,
  ) {}

  /** Take `cost` tokens from `key`'s bucket at `now` (`bucketNow()`); `false` when too few are left. */
  take(key: string, cost: number, now: number = bucketNow()): boolean {
    return takeTokens(this.bucket(key, now), this.rate, this.burst, now, cost);
  }

  /**
   * Charge `cost` tokens to `key`'s bucket after the fact (work already done), into debt down
   * to minus one burst: the key's next `take` succeeds only once the debt is earned back, so
   * expensive work admitted by one token is paid for at the bucket's rate.
   */
  charge(key: string, cost: number, now: number = bucketNow()): void {
    const b = this.bucket(key, now);
    refill(b, this.rate, this.burst, now);
    b.tokens = Math.max(-this.burst * 1000, b.tokens - cost * 1000);
  }

  /** `key`'s bucket, made full when it has none (pruning full ones when the map is large). */
  private bucket(key: string, now: number): TokenState {
    let b = this.buckets.get(key);
    if (!b) {
      if (this.buckets.size >= 1024) this.prune(now);
      b = { tokens: this.burst * 1000, last: now };
      this.buckets.set(key, b);
    }
    return b;
  }

  /** Buckets kept (keys that spent tokens recently). */
  get size(): number {
    return this.buckets.size;
  }

  private prune(now: number): void {
    for (const [key, b] of this.buckets) {
      if (b.tokens + (now - b.last) * this.rate >= this.burst * 1000) this.buckets.delete(key);
    }
  }
}

/**
 * A token bucket of frames (`takeToken`) as an object: one per principal, shared by its
 * sockets.
 */
export class FrameBucket implements TokenState {
  tokens: number;
  last: number;
  /** Sockets sharing this bucket (per-principal buckets are dropped at 0). */
  users = 0;

  constructor(
    private readonly rate: number,
    private readonly burst: number,
    now: number,
    /** The principal key whose sockets share this bucket (`''` when not shared by key). */
    readonly key = '',
  ) {
    this.tokens = burst * 1000;
    this.last = now;
  }

  /** Take one token at time `now` (`bucketNow()`); `false` when the bucket is empty. */
  take(now: number): boolean {
    return takeToken(this, this.rate, this.burst, now);
  }

  /** Take up to `cost` tokens at time `now` (`drainTokens`). */
  drain(now: number, cost: number): void {
    drainTokens(this, this.rate, this.burst, now, cost);
  }
}

/**
 * Which `Host` headers the server answers to (DNS rebinding: a page on `evil.example` whose
 * name was re-pointed at this server's address sends `Host: evil.example`, and its `Origin`
 * then matches that `Host`, so `'same-host'` alone lets it in).
 * - `'auto'` (the default): `localhost` and `*.localhost`, every IP address literal (a
 *   rebinding page always uses a name), and the server's own `host` option when it is a name.
 * - a list: those as well, plus these names; an entry starting with `.` also allows every
 *   subdomain (`'.example.org'`: `example.org`, `a.example.org`), like Vite's
 *   `server.allowedHosts`.
 * - `'all'` (or `true`): every Host (the check is off).
 * Requests without a `Host` header (HTTP/1.0, non-browser clients) are accepted; a `Host`
 * that is not a valid `host[:port]` (`hostnameOf`), or a second `Host` header, is refused
 * whatever the setting but `'all'`.
 */
export type AllowedHosts = 'auto' | 'all' | true | readonly string[];

/**
 * The hostname of a `Host` header (RFC 9110 §7.2: `uri-host [ ":" port ]`, RFC 3986 §3.2.2),
 * lower case, without port or brackets; `undefined` unless the whole value is one of:
 * an `[IPv6]` literal, or a name of dot-separated labels of letters, digits, `-` and `_`
 * (IPv4 literals included), then optionally `:` and up to 5 digits. Nothing is trimmed or
 * skipped (issue 12: ` localhost`, `[::1].evil.example` passed a lenient parse). A trailing
 * dot (`localhost.`) is refused: it is another spelling of the name that no page needs, and
 * browsers treat it as another origin.
 */
export function hostnameOf(host: string): string | undefined {
  const h = host.toLowerCase();
  let name: string;
  let rest: string;
  if (h.startsWith('[')) {
    const end = h.indexOf(']');
    if (end < 0) return undefined;
    name = h.slice(1, end);
    if (isIP(name) !== 6) return undefined;
    rest = h.slice(end + 1);
  } else {
    const colon = h.indexOf(':');
    name = colon < 0 ? h : h.slice(0, colon);
    rest = colon < 0 ? '' : h.slice(colon);
    if (!/^[a-z0-9_-]+(?:\.[a-z0-9_-]+)*$/.test(name)) return undefined;
  }
  if (rest !== '' && !/^:[0-9]{0,5}$/.test(rest)) return undefined;
  return name;
}

/** Whether `req`'s `Host` header names a host this server answers to (`AllowedHosts`). Never throws. */
export function hostAllowed(
  req: IncomingMessage,
  allowed: AllowedHosts,
  ownHost: string | undefined,
): boolean {
  if (allowed === 'all' || allowed === true) return true;
  const host = req.headers.host;
  if (host === undefined) return true;
  // Node keeps the first of several `Host` headers; RFC 9112 §3.2 says such a request is bad.
  let hosts = 0;
  for (let i = 0; i < req.rawHeaders.length; i += 2) {
    if (req.rawHeaders[i]!.length === 4 && req.rawHeaders[i]!.toLowerCase() === 'host' && ++hosts > 1)
      return false;
  }
  const name = hostnameOf(host);
  if (name === undefined) return false;
  if (isIP(name) !== 0 || name === 'localhost' || name.endsWith('.localhost')) return true;
  if (ownHost !== undefined && ownHost.toLowerCase() === name) return true;
  if (allowed === 'auto') return false;
  for (const entry of allowed) {
    const e = entry.toLowerCase();
    if (e.startsWith('.') ? name === e.slice(1) || name.endsWith(e) : name === e) return true;
  }
  return false;
}
