/**
 * The two transports as XState actors the connection machine invokes: `socket` (a callback
 * actor that owns at most one WebSocket at a time) and `http` (a promise actor per POST).
 * They turn the outside world into machine events and nothing more: no timers, no retries
 * (the machine's named delays own all timing).
 */
import { fromCallback, fromPromise } from 'xstate';
import type { ConnectionEvent, HttpInput, HttpOutcome, SocketCommand } from '../../machines/connection.js';
import { parseServerFrame, type ServerEnvelope, validateServerEnvelope } from '../protocol/index.js';

/** The part of the WebSocket API syncwire uses; the browser's and `ws`'s both fit. */
export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: unknown) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
}
export type WebSocketConstructor = new (url: string) => WebSocketLike;

/**
 * Faults a developer can switch on in one client, to see what syncwire does about them
 * (the playground's buttons). Off by default; costs one property read per frame.
 */
export interface FaultSwitches {
  /** Drop every ACK the socket receives. */
  dropAcks: boolean;
  /** Drop everything the socket receives (a server that stopped answering). */
  blackhole: boolean;
  /** Fail every HTTP request as a network error. */
  blockHttp: boolean;
}

export interface TransportConfig {
  /** WebSocket URLs, tried in turn on each dial (failover). */
  urls: string[];
  /** HTTP URL for each WebSocket URL (same index). */
  httpUrls: string[];
  WebSocket: WebSocketConstructor;
  fetch: typeof fetch;
  /** Extra query parameters for the socket and headers for HTTP (authentication). */
  params: Record<string, string>;
  headers: Record<string, string>;
  faults: FaultSwitches;
  /** Called with the live socket whenever one is dialled (for `killSocket()`). */
  onSocket?: (ws: WebSocketLike | null) => void;
}

/** Which URL index the last successful or attempted dial used; HTTP follows it. */
export interface TransportCursor {
  index: number;
}

export function wsUrlWithParams(url: string, clientId: string, params: Record<string, string>): string {
  const u = new URL(url);
  u.searchParams.set('clientId', clientId);
  for (const [k, v] of Object.entries(params)) u.searchParams.set(k, v);
  return u.toString();
}

/** `ws://host/path` → `http://host/path`, `wss` → `https`. */
export function deriveHttpUrl(wsUrl: string): string {
  const u = new URL(wsUrl);
  u.protocol = u.protocol === 'wss:' ? 'https:' : 'http:';
  u.search = '';
  return u.toString();
}

const OPEN = 1;

/** The socket actor: DIAL opens a new socket (dropping any old one), SEND writes, DROP closes. */
export function socketActor(config: TransportConfig, cursor: TransportCursor) {
  return fromCallback<SocketCommand, { clientId: string }>(({ sendBack, receive, input }) => {
    let ws: WebSocketLike | null = null;
    let dials = 0;

    const detach = (sock: WebSocketLike | null) => {
      if (!sock) return;
      sock.onopen = sock.onmessage = null;
      sock.onclose = null;
      // Keep a no-op error handler: `ws` emits 'error' when a connecting socket is closed,
      // and an EventEmitter error without a listener would crash the process.
      sock.onerror = () => {};
      try {
        sock.close(1000, 'client closing');
      } catch {
        // Closing a socket that never connected throws in some implementations.
      }
    };

    const dial = () => {
      detach(ws);
      // Failover: each dial after the first moves to the next URL, round robin.
      if (dials++ > 0 && config.urls.length > 1) cursor.index = (cursor.index + 1) % config.urls.length;
      const url = wsUrlWithParams(config.urls[cursor.index]!, input.clientId, config.params);
      let sock: WebSocketLike;
      try {
        sock = new config.WebSocket(url);
      } catch (err) {
        ws = null;
        sendBack({
          type: 'WS.DOWN',
          code: 1006,
          reason: String(err),
          wasOpen: false,
        } satisfies ConnectionEvent);
        return;
      }
      ws = sock;
      config.onSocket?.(sock);
      let wasOpen = false;
      let down = false;
      sock.onopen = () => {
        wasOpen = true;
        sendBack({ type: 'WS.OPEN' } satisfies ConnectionEvent);
      };
      sock.onmessage = (ev) => {
        if (config.faults.blackhole) return;
        const data = ev.data;
        const text =
          typeof data === 'string' ? data : data instanceof ArrayBuffer ? new Uint8Array(data) : String(data);
        const parsed = parseServerFrame(text as string | Uint8Array);
        if (!parsed.ok) {
          sendBack({
            type: 'BAD_FRAME',
            reason: `${parsed.code}: ${parsed.message}`,
          } satisfies ConnectionEvent);
          return;
        }
        if (config.faults.dropAcks && parsed.envelope.type === 'ACK') return;
        sendBack({ type: 'FRAME', frame: parsed.envelope } satisfies ConnectionEvent);
      };
      const onDown = (code: number, reason: string) => {
        // error and close both arrive for one failure: report it once.
        if (down || ws !== sock) return;
        down = true;
        ws = null;
        config.onSocket?.(null);
        sendBack({ type: 'WS.DOWN', code, reason, wasOpen } satisfies ConnectionEvent);
      };
      sock.onclose = (ev) => onDown(ev.code, ev.reason);
      sock.onerror = () => {
        // A browser gives no detail on errors; the close that follows carries the code.
      };
    };

    receive((cmd) => {
      if (cmd.type === 'DIAL') dial();
      else if (cmd.type === 'DROP') {
        const sock = ws;
        ws = null;
        config.onSocket?.(null);
        detach(sock);
      } else if (cmd.type === 'SEND') {
        if (ws && ws.readyState === OPEN && !config.faults.blackhole) {
          try {
            ws.send(JSON.stringify(cmd.frame));
          } catch {
            // A send on a dying socket: the close event follows and the machine resends.
          }
        }
      }
    });
    return () => {
      const sock = ws;
      ws = null;
      detach(sock);
    };
  });
}

/** Parse `Retry-After` (seconds or an HTTP date) into milliseconds. */
export function parseRetryAfter(value: string | null, now = Date.now()): number | undefined {
  if (!value) return undefined;
  const secs = Number(value);
  if (Number.isFinite(secs) && secs >= 0) return Math.min(secs * 1000, 3_600_000);
  const at = Date.parse(value);
  return Number.isFinite(at) ? Math.max(0, Math.min(at - now, 3_600_000)) : undefined;
}

/** The HTTP actor: one POST of one envelope, normalised into an `HttpOutcome`. */
export function httpActor(config: TransportConfig, cursor: TransportCursor, getClientId: () => string) {
  return fromPromise<HttpOutcome, HttpInput>(async ({ input, signal }) => {
    if (config.faults.blockHttp) throw new Error('network: http blocked (fault switch)');
    const { envelope } = input;
    // A network error rejects: the chart's onError edge retries it with backoff.
    const res = await config.fetch(config.httpUrls[cursor.index]!, {
      method: 'POST',
      headers: { 'content-type': 'application/json', 'x-client-id': getClientId(), ...config.headers },
      body: JSON.stringify(envelope),
      signal,
    });
    const { status } = res;
    if (status === 429 || status === 408 || status >= 500) {
      await res.body?.cancel().catch(() => {});
      return {
        kind: 'retry',
        status,
        reason: `HTTP ${status}`,
        retryAfterMs: parseRetryAfter(res.headers.get('retry-after')),
      };
    }
    let body: unknown = null;
    try {
      body = await res.json();
    } catch {
      body = null;
    }
    const frames: ServerEnvelope[] = [];
    if (Array.isArray(body)) {
      for (const raw of body) {
        const parsed = validateServerEnvelope(raw);
        if (parsed.ok) frames.push(parsed.envelope);
      }
    }
    if (status === 200) {
      if (!Array.isArray(body)) return { kind: 'retry', status, reason: 'HTTP 200 without a JSON array' };
      return { kind: 'reply', status, frames };
    }
    // 4xx: only the server's NAK refuses the request (PROTOCOL §4: a NAK replaces the response;
    // nothing was applied). A status without one (a 404 or 405 from a misrouted proxy, an HTML
    // error page) is no word from syncwire: the request may have been applied, so it is retried
    // with the same id, like a 5xx, and dedupe makes the retry safe.
    const refusal = frames.find((f) => f.type === 'NAK');
    if (!refusal) return { kind: 'retry', status, reason: `HTTP ${status} without a syncwire NAK body` };
    return { kind: 'reply', status, frames: [{ ...refusal, id: envelope.id }] };
  });
}
