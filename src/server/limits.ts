/**
 * What the reference server refuses before doing any work for it, shared by both transports:
 * the origin check (cross-site WebSocket hijacking and cross-site requests, README
 * "Origins and CSWSH") and the budget of request bytes held in memory, per client and for
 * the whole server (README "Limits").
 */

import type { IncomingMessage } from 'node:http';

/**
 * Which `Origin`s may open a socket or send a request. Requests without an `Origin` header
 * (non-browser clients) and same-host requests (the `Origin`'s host, port included, equals
 * the `Host` header) are always accepted by the list form.
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
  return sameHost(origin, req.headers.host);
}

/** Whether a serialized origin names the host (`hostname[:port]`) the request was sent to. */
function sameHost(origin: string, host: string | undefined): boolean {
  if (!host || origin === 'null') return false;
  let url: URL;
  try {
    url = new URL(origin);
  } catch {
    return false;
  }
  // `URL.host` drops the scheme's default port; a Host header may carry it, so compare both.
  const defaultPort = url.protocol === 'https:' ? '443' : url.protocol === 'http:' ? '80' : '';
  const h = host.toLowerCase();
  return h === url.host || (defaultPort !== '' && url.port === '' && h === `${url.host}:${defaultPort}`);
}

export interface BudgetOptions {
  /** Most request bytes held for one clientId at once (queued or being processed). */
  perClient: number;
  /** Most request bytes held for all clients together. */
  total: number;
}

/**
 * Bytes of requests received and not yet answered, per clientId and in all, counted from
 * the frame or body as it arrived, before it is parsed. A request that would take either
 * count past its bound is refused (`NAK rate_limited`) without being parsed: parsed JSON can
 * take about 21 × its size on the heap (a frame of `[{},{},…]`), so the bytes held here are
 * what bounds that memory.
 */
export class Budget {
  private readonly held = new Map<string, number>();
  private sum = 0;

  constructor(private readonly o: BudgetOptions) {}

  /** Bytes held in all. */
  get total(): number {
    return this.sum;
  }

  /** Reserve `bytes` for `clientId`; `false` (nothing reserved) when a bound would be passed. */
  take(clientId: string, bytes: number): boolean {
    const mine = this.held.get(clientId) ?? 0;
    if (mine + bytes > this.o.perClient || this.sum + bytes > this.o.total) return false;
    this.held.set(clientId, mine + bytes);
    this.sum += bytes;
    return true;
  }

  /** Give back what `take` reserved. */
  release(clientId: string, bytes: number): void {
    const mine = (this.held.get(clientId) ?? 0) - bytes;
    if (mine > 0) this.held.set(clientId, mine);
    else this.held.delete(clientId);
    this.sum = Math.max(0, this.sum - bytes);
  }
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
