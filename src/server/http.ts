/**
 * The HTTP transport of the reference server (PROTOCOL "HTTP"): one `POST` per request
 * envelope on the sync path, answered with every envelope it produced. Requests from a
 * foreign `Origin` are refused (403) before anything else; CORS headers come from the `cors`
 * package; bodies are bounded in bytes (413) and in time (408), and held against the byte
 * budget before they are parsed (429). What an envelope means is the dispatcher's business
 * (dispatcher.ts).
 *
 * `handleHttp(req, res)` only needs `node:http`'s request and response, so it can later be
 * mounted elsewhere (e.g. as framework middleware) besides the server's own `request` event.
 *
 * Nothing a client sends may escape into the event loop: every entry point here catches,
 * answers the client, and reports through `onError`.
 */

import type { IncomingMessage, ServerResponse } from 'node:http';
import cors, { type CorsOptions } from 'cors';
import {
  encode,
  HTTP_STATUS_OF,
  MAX_ID_LENGTH,
  nak,
  parseClientFrame,
  type ServerEnvelope,
} from '../protocol/index.js';
import { type Dispatcher, validClientId } from './dispatcher.js';
import {
  type AllowedHosts,
  type AllowedOrigins,
  type Budget,
  drop,
  type Holder,
  hostAllowed,
  KeyedBuckets,
  leadingId,
  originAllowed,
} from './limits.js';

/**
 * CORS for the HTTP transport, before the server's `cors` option is laid over it. Only
 * requests whose `Origin` passed `allowedOrigins` reach CORS, so reflecting the origin
 * (`origin: true`) grants no origin more than `allowedOrigins` does.
 */
export const DEFAULT_CORS: CorsOptions = {
  origin: true,
  methods: ['POST', 'OPTIONS'],
  allowedHeaders: ['X-Client-Id', 'Content-Type', 'Authorization'],
  exposedHeaders: ['Retry-After'],
  maxAge: 86400,
};

export interface HttpTransportOptions<P> {
  /** The one path requests are answered on. */
  path: string;
  /** Largest body accepted, in bytes; a larger one answers 413. */
  maxPayloadBytes: number;
  /** Most operations in one `SYN` (413 `too_large` beyond). */
  maxBatch: number;
  /** Which `Origin`s may send requests; others are answered 403. */
  allowedOrigins: AllowedOrigins;
  /** Which `Host` headers may send requests; others are answered 403 (DNS rebinding). */
  allowedHosts: AllowedHosts;
  /** The server's own `host` option, allowed by `allowedHosts: 'auto'`. */
  ownHost: string | undefined;
  /** CORS options laid over `DEFAULT_CORS`; `false` sends no CORS headers. */
  cors: CorsOptions | false;
  /** Request bytes held per client, per principal and in all; a body past them answers 429. */
  budget: Budget;
  /**
   * The key a request's per-principal limits count under (request rate, answer bytes,
   * request bytes, channel look-ups): `p:<principalKey>`, or for the anonymous principal
   * `a:<address>` / `c:<clientId>` (the server's `anonymousKey`).
   */
  limitKey(principal: P, clientId: string, req: IncomingMessage): string;
  /** Milliseconds a body may take to arrive once the handler reads it; then 408. */
  bodyTimeoutMs: number;
  /**
   * Answer bytes written and not yet flushed, all requests together; while reached, a new
   * request answers 429 with `Retry-After: 1` (issue 12: unread poll answers held 100 MiB).
   */
  maxResponseBufferedBytes: number;
  /**
   * The share of `maxResponseBufferedBytes` one principal's unread answers may hold; past it
   * that principal's new requests answer 429, others' are still served.
   */
  maxResponseBufferedBytesPerPrincipal: number;
  /** HTTP requests per second one principal may make (burst the same); past it, 429. */
  maxHttpRequestsPerSecondPerPrincipal: number;
  /**
   * The channel look-up rate per principal: a `SUB` in a request costs the request rate
   * `channels × maxHttpRequestsPerSecondPerPrincipal / this` more requests (after the fact,
   * into debt down to minus one burst: `KeyedBuckets.charge`), so the two budgets run out
   * together and the polls that follow are refused 429 before their bodies are read or parsed.
   */
  maxChannelLookupsPerSecondPerPrincipal: number;
  /** Milliseconds an answer may take to flush; then its response is destroyed. */
  responseDrainTimeoutMs: number;
  dispatcher: Dispatcher<P>;
  /** Whether the server is closing: requests answer 503 with `Retry-After: 1`. */
  closing(): boolean;
  onError(err: unknown, where: string): void;
}

/**
 * Handle one HTTP request. Returns `false`, touching neither `req` nor `res`, when the request
 * is not for `path` (its owner decides what to answer); `true` when it answers it (the answer
 * may be written later). Never throws.
 */
export interface HttpHandler {
  (req: IncomingMessage, res: ServerResponse): boolean;
  /** Answer bytes written to responses and not yet flushed to the kernel. */
  responseBufferedBytes(): number;
}

/** Build the HTTP side; attach the returned handler to the http server's `request` event. */
export function createHttpHandler<P>(o: HttpTransportOptions<P>): HttpHandler {
  const { onError } = o;
  const corsHeaders = o.cors === false ? undefined : cors({ ...DEFAULT_CORS, ...o.cors });
  /** Answer bytes handed to `res` whose `finish` (flushed to the kernel) has not come yet. */
  let outstanding = 0;
  /** The same, per principal (`subscriberKey`); entries go when they reach 0. */
  const outstandingOf = new Map<string, number>();
  /** Requests per principal: the HTTP side's frame rate (the socket side has FrameBucket). */
  const requestRate = new KeyedBuckets(
    o.maxHttpRequestsPerSecondPerPrincipal,
    o.maxHttpRequestsPerSecondPerPrincipal,
  );
  /** Requests a channel named in a `SUB` costs (`maxChannelLookupsPerSecondPerPrincipal`). */
  const requestsPerLookup =
    o.maxChannelLookupsPerSecondPerPrincipal > 0 && Number.isFinite(o.maxChannelLookupsPerSecondPerPrincipal)
      ? o.maxHttpRequestsPerSecondPerPrincipal / o.maxChannelLookupsPerSecondPerPrincipal
      : 0;
  const tooManyAnswerBytes = (res: ServerResponse, what: string) =>
    reply(res, 429, [nak(null, 'rate_limited', `too many answer bytes waiting to be read ${what}`)], {
      'Retry-After': '1',
      Connection: 'close',
    });

  /** `reply`, with the answer's bytes held until flushed, and destroyed if it is not in time. */
  const answer = (res: ServerResponse, status: number, body: ServerEnvelope[], principal: string) => {
    const bytes = reply(res, status, body);
    if (bytes === 0) return;
    if (res.writableFinished) return;
    outstanding += bytes;
    outstandingOf.set(principal, (outstandingOf.get(principal) ?? 0) + bytes);
    const timer = setTimeout(() => res.destroy(), o.responseDrainTimeoutMs);
    timer.unref();
    const done = () => {
      clearTimeout(timer);
      res.off('finish', done);
      res.off('close', done);
      outstanding -= bytes;
      drop(outstandingOf, principal, bytes);
    };
    res.on('finish', done);
    res.on('close', done);
  };

  /** Set the CORS headers (or answer a preflight); resolves `true` when the response ended. */
  const applyCors = (req: IncomingMessage, res: ServerResponse) =>
    new Promise<boolean>((resolve, reject) => {
      if (!corsHeaders) return resolve(false);
      res.once('finish', () => resolve(true));
      corsHeaders(req as never, res as never, (err?: unknown) => (err ? reject(err) : resolve(false)));
    });

  async function request(req: IncomingMessage, res: ServerResponse): Promise<unknown> {
    // Before anything else: a Host this server does not answer to (DNS rebinding), then a
    // foreign page's request, which carries the victim's cookies (CSRF).
    if (!hostAllowed(req, o.allowedHosts, o.ownHost)) {
      return reply(res, 403, [
        nak(null, 'forbidden', 'host not allowed (list it in the server option allowedHosts)'),
      ]);
    }
    if (!originAllowed(req, o.allowedOrigins)) {
      return reply(res, 403, [nak(null, 'forbidden', 'origin not allowed')]);
    }
    if (await applyCors(req, res)) return; // a preflight, answered by `cors`
    if (req.method === 'OPTIONS') return reply(res, 204);
    if (req.method !== 'POST') return reply(res, 405, undefined, { Allow: 'POST, OPTIONS' });
    if (o.closing())
      return reply(res, 503, [nak(null, 'server_error', 'server is closing')], { 'Retry-After': '1' });
    if (outstanding >= o.maxResponseBufferedBytes) return tooManyAnswerBytes(res, 'on this server');
    const clientId = req.headers['x-client-id'];
    if (!validClientId(clientId)) {
      return reply(res, 400, [nak(null, 'bad_request', `X-Client-Id must be 1–${MAX_ID_LENGTH} characters`)]);
    }
    const tooLarge = () =>
      // Closing the connection is what stops reading the rest of the body.
      reply(res, 413, [nak(null, 'too_large', `body exceeds ${o.maxPayloadBytes} bytes`)], {
        Connection: 'close',
      });
    if (Number(req.headers['content-length'] ?? 0) > o.maxPayloadBytes) return tooLarge();
    const auth = await o.dispatcher.authenticate(req);
    if (!auth.ok) return reply(res, auth.status, [auth.nak], auth.headers);
    // The body's bytes are held against the budget as they arrive, not once complete: a slow
    // body is memory held too (issue 12: 17 slow 1 MiB bodies held 200 MiB outside it).
    const who: Holder = { clientId, principal: o.limitKey(auth.principal, clientId, req) };
    // Before its body is read or parsed: a principal's requests beyond its rate cost little
    // (issue 12: eight concurrent 1000-channel polls of one principal slowed others 18×).
    if (!requestRate.take(who.principal, 1)) {
      return reply(
        res,
        429,
        [nak(null, 'rate_limited', `at most ${requestRate.rate} HTTP requests per second per principal`)],
        { 'Retry-After': '1', Connection: 'close' },
      );
    }
    // One principal's unread answers cannot take the whole budget from the others (the
    // budget-lock shape of issue 12's finding 4, on answers).
    if ((outstandingOf.get(who.principal) ?? 0) >= o.maxResponseBufferedBytesPerPrincipal) {
      return tooManyAnswerBytes(res, 'for this principal');
    }
    // Only now the clientId's binding is written (a store write on SQLite and Redis): every
    // refusal that needs none came first (issue 12: rate-limited requests wrote bindings).
    const refused = await o.dispatcher.bind(clientId, auth.principal);
    if (refused) return reply(res, refused.status, [refused.nak], refused.headers);
    const body = await readBody(req, o.maxPayloadBytes, o.bodyTimeoutMs, o.budget, who);
    if (body === 'aborted') return;
    if (body === 'too_large') return tooLarge();
    if (body === 'timeout') {
      return reply(res, 408, [nak(null, 'bad_request', `body not received within ${o.bodyTimeoutMs} ms`)], {
        Connection: 'close',
      });
    }
    if (!Buffer.isBuffer(body)) {
      // Refused before parsing (limits.ts), by the id its first bytes name; the rest of the
      // body is not read.
      return reply(res, 429, [nak(body.id, 'rate_limited', 'too many request bytes waiting')], {
        'Retry-After': '1',
        Connection: 'close',
      });
    }
    const out: ServerEnvelope[] = [];
    try {
      const parsed = parseClientFrame(body, { maxBytes: o.maxPayloadBytes, maxBatch: o.maxBatch });
      if (!parsed.ok) {
        // A batch refused before parsing (too many operations) has no parsed id: read it
        // from the first bytes, as the socket side does.
        const id = parsed.code === 'too_large' && parsed.id === null ? leadingId(body) : parsed.id;
        return reply(res, HTTP_STATUS_OF[parsed.code], [nak(id, parsed.code, parsed.message)]);
      }
      await o.dispatcher.dispatch(parsed.envelope, {
        clientId,
        principal: auth.principal,
        limitKey: who.principal,
        send: (env) => out.push(env),
        // The client went away: a SUB stops at its next look-up turn (lookups.ts).
        gone: () => res.destroyed || req.socket.destroyed,
        chargeChannels: (n) => requestRate.charge(who.principal, n * requestsPerLookup),
      });
    } finally {
      o.budget.release(who, body.byteLength);
    }
    // Closed meanwhile (e.g. a batch left unprocessed): "retry later" keeps the batch alive.
    if (o.closing())
      return reply(res, 503, [nak(null, 'server_error', 'server is closing')], { 'Retry-After': '1' });
    answer(res, 200, out, who.principal);
  }

  const handleHttp = (req: IncomingMessage, res: ServerResponse) => {
    const url = requestUrl(req);
    if (url?.pathname !== o.path) return false;
    request(req, res).catch((err: unknown) => {
      onError(err, 'http');
      reply(res, 500, [nak(null, 'server_error', 'internal error')]);
    });
    return true;
  };
  return Object.assign(handleHttp, { responseBufferedBytes: () => outstanding });
}

/**
 * Answer with `status`, `Cache-Control: no-store` and `body` as JSON, plus `headers` (CORS
 * headers were set on `res` before, when they apply). Does nothing once headers were sent.
 * Returns the body's length in bytes (0 when nothing was written).
 */
export function reply(
  res: ServerResponse,
  status: number,
  body?: ServerEnvelope[],
  headers: Record<string, string> = {},
): number {
  if (res.headersSent) return 0;
  const text = body ? encode(body) : '';
  const bytes = Buffer.byteLength(text);
  res.writeHead(status, {
    'Cache-Control': 'no-store',
    ...(body ? { 'Content-Type': 'application/json', 'Content-Length': String(bytes) } : {}),
    ...headers,
  });
  res.end(text);
  return bytes;
}

/** The request's URL, resolved against a dummy origin; `undefined` when it does not parse. */
export function requestUrl(req: IncomingMessage): URL | undefined {
  try {
    return new URL(req.url ?? '/', 'http://localhost');
  } catch {
    return undefined;
  }
}

/** A body refused because a chunk would pass the budget; `id` read from its first bytes. */
interface OverBudget {
  id: string | null;
}

/**
 * The body; `'too_large'` as soon as it grows past `max` (the rest is not read);
 * an `OverBudget` as soon as a chunk would pass `budget` for `who` (every chunk is taken from
 * it as it arrives; on success the caller releases `body.byteLength`, otherwise it is released
 * here); `'timeout'` when it has not all arrived within `timeoutMs` (a slow-body client holds
 * nothing longer); `'aborted'` when the client went away, which is not worth reporting.
 */
function readBody(
  req: IncomingMessage,
  max: number,
  timeoutMs: number,
  budget: Budget,
  who: Holder,
): Promise<Buffer | 'too_large' | 'timeout' | 'aborted' | OverBudget> {
  return new Promise((resolve) => {
    const chunks: Buffer[] = [];
    let size = 0;
    let settled = false;
    const finish = (result: Buffer | 'too_large' | 'timeout' | 'aborted' | OverBudget) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      req.off('data', onData);
      if (!Buffer.isBuffer(result)) {
        budget.release(who, size);
        size = 0;
        chunks.length = 0;
        if (result !== 'aborted') req.pause();
      }
      resolve(result);
    };
    const timer = setTimeout(() => finish('timeout'), timeoutMs);
    const onData = (chunk: Buffer) => {
      if (size + chunk.length > max) return finish('too_large');
      if (!budget.take(who, chunk.length)) {
        return finish({ id: leadingId(Buffer.concat([...chunks, chunk]).subarray(0, 300)) });
      }
      size += chunk.length;
      chunks.push(chunk);
    };
    req.on('data', onData);
    req.once('end', () => finish(Buffer.concat(chunks, size)));
    req.once('error', () => finish('aborted'));
    req.once('close', () => finish('aborted')); // no-op once 'end' settled it
  });
}
