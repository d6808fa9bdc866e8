/**
 * The two transports as XState actors the connection machine invokes: `socket` (a callback
 * actor that owns at most one WebSocket at a time) and `http` (a promise actor per POST).
 * They turn the outside world into machine events and nothing more: no timers, no retries
 * (the machine's named delays own all timing).
 */
import { fromCallback, fromPromise } from 'xstate';
import type {
  ConnectionEvent,
  HttpInput,
  HttpOutcome,
  OutgoingFrame,
  SocketCommand,
} from '../../machines/connection.js';
import {
  encodeRequest,
  type MsgEnvelope,
  parseServerFrame,
  type ServerEnvelope,
  validateServerEnvelope,
} from '../protocol/index.js';

/**
 * An event handler property, checked bivariantly (as DOM handlers are) so that the browser's
 * `WebSocket` and `ws`'s (whose handlers take their own `Event` classes) both fit.
 */
type Handler<E> = { bivarianceHack(ev: E): void }['bivarianceHack'];

/** The part of the WebSocket API syncwire uses; the browser's and `ws`'s both fit. */
export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: Handler<unknown> | null;
  onclose: Handler<{ code: number; reason: string }> | null;
  onerror: Handler<unknown> | null;
  onmessage: Handler<{ data: unknown }> | null;
}
/**
 * A WebSocket class: the browser's, or `ws`'s `WebSocket` in Node. Declared with the
 * `protocols` parameter and a structural instance type so that both typecheck as written
 * (`createSyncClient({ url, WebSocket })` with `import { WebSocket } from 'ws'`).
 */
export type WebSocketConstructor = new (url: string, ...rest: any[]) => WebSocketLike;

/**
 * What a credential or URL function is told when it is called (the first argument of a
 * `Resolvable` function). Modelled on centrifuge-js `getToken(ctx)` and Ably's
 * `authCallback(tokenParams)`: the function learns which transport asks, and whether the
 * credentials it gave last were just refused.
 */
export interface ResolveContext {
  /** `'ws'`: resolving for a socket dial (`url`, `params`); `'http'`: for one HTTP request (`url`/`httpUrl`, `headers`). */
  transport: 'ws' | 'http';
  /**
   * `true` when the server refused the previous credentials with 401: a token cache must be
   * bypassed (`getToken({ forceRefresh: true })`), since a second 401 in a row stops the
   * client with `unauthorized`. HTTP: the one retry right after a 401. Socket: the dial right
   * after a refused upgrade, and any redial after it until a socket opens. `false` on every
   * other dial and request.
   */
  refresh: boolean;
}

/**
 * A value, or a function returning it (or a promise of it), called again for each dial and
 * each HTTP request with a `ResolveContext`: how a token that expires is refreshed
 * (graphql-ws `connectionParams`, centrifuge-js `getToken`, Ably `authCallback`). A function
 * that takes no argument fits too.
 */
export type Resolvable<T> = T | ((ctx: ResolveContext) => T | Promise<T>);

/** Resolve a `Resolvable`: synchronously when it is a plain value or a sync function. */
export function resolveValue<T>(v: Resolvable<T>, ctx: ResolveContext): T | Promise<T> {
  return typeof v === 'function' ? (v as (ctx: ResolveContext) => T | Promise<T>)(ctx) : v;
}

const isPlainRecordOfStrings = (v: unknown): v is Record<string, string> =>
  !!v &&
  typeof v === 'object' &&
  !Array.isArray(v) &&
  Object.values(v as object).every((x) => typeof x === 'string');

/**
 * Check what a `params` or `headers` function returned (`undefined`/`null` mean none):
 * anything but a record of strings throws a `TypeError`, which the transport treats as a
 * failed dial or request (reported on `failures$`, retried with backoff).
 */
export function checkRecord(name: 'params' | 'headers', v: unknown): Record<string, string> {
  if (v === undefined || v === null) return {};
  if (!isPlainRecordOfStrings(v)) {
    throw new TypeError(`syncwire: option ${name} resolved to ${describe(v)}, not a record of strings`);
  }
  return v;
}

/** Check what a `url`/`httpUrl` function returned: a non-empty list of absolute ws/http URLs, else a `TypeError`. */
export function checkUrls(name: 'url' | 'httpUrl', v: unknown): string[] {
  const list: unknown[] = Array.isArray(v) ? v : [v];
  if (list.length === 0) throw new TypeError(`syncwire: option ${name} resolved to no URL`);
  for (const u of list) checkUrl(name, u);
  return list as string[];
}

/**
 * URL strings `checkUrl` accepted, so that the same URL is parsed once per process, not at each
 * `createSyncClient` (its options check) and again at each dial (issue 14, connect row: two
 * `new URL` per client). Bounded: cleared when it reaches `URL_CACHE` entries.
 */
const checkedUrls = new Set<string>();
const URL_CACHE = 256;

/** Throw a `TypeError` naming the option unless `u` is an absolute ws:, wss:, http: or https: URL. */
export function checkUrl(name: 'url' | 'httpUrl', u: unknown): void {
  if (typeof u === 'string' && checkedUrls.has(u)) return;
  let parsed: URL;
  try {
    if (typeof u !== 'string' || u.length === 0) throw new TypeError();
    parsed = new URL(u);
  } catch {
    throw new TypeError(`syncwire: option ${name} ${describe(u)} is not an absolute URL`);
  }
  if (!/^(wss?|https?):$/.test(parsed.protocol)) {
    throw new TypeError(`syncwire: option ${name} ${describe(u)} must use ws:, wss:, http: or https:`);
  }
  // WHATWG WebSocket refuses a URL with a fragment ("The URL contains a fragment identifier"):
  // every dial would fail. `hash` is '' for a bare trailing '#' too, hence the string test.
  if ((u as string).includes('#')) {
    throw new TypeError(`syncwire: option ${name} ${describe(u)} must not contain a #fragment`);
  }
  if (checkedUrls.size >= URL_CACHE) checkedUrls.clear();
  checkedUrls.add(u as string);
}

function describe(v: unknown): string {
  try {
    return (JSON.stringify(v) ?? String(v)).slice(0, 100);
  } catch {
    return String(v).slice(0, 100);
  }
}

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
  /** WebSocket URLs, tried in turn on each dial (failover); resolved again for each dial. */
  urls: Resolvable<string | string[]>;
  /** HTTP URL for each WebSocket URL (same index); `undefined`: derived from `urls`. */
  httpUrls?: Resolvable<string | string[]>;
  WebSocket: WebSocketConstructor;
  fetch: typeof fetch;
  /** Extra query parameters for the socket and headers for HTTP (authentication), resolved per use. */
  params: Resolvable<Record<string, string>>;
  headers: Resolvable<Record<string, string>>;
  faults: FaultSwitches;
  /** Called with the live socket whenever one is dialled (for `killSocket()`). */
  onSocket?: (ws: WebSocketLike | null) => void;
  /**
   * Where the socket delivers `MSG` frames, bypassing the chart (issue 14, replay row): a
   * `MSG` changes no state of the connection chart, whose `onFrame` only re-emits it as a
   * `message`, and that macrostep was ~80 % of the client's CPU per replayed message. Frames
   * keep their order: a held `ACK` is released to the chart first, and a frame that arrives
   * while the socket actor is itself running a chart command (a socket stand-in answering
   * inside `send()`) still goes through the chart. Without it, `MSG`s go to the chart as
   * `FRAME` events (the chart's own tests, and the inspector then sees them).
   */
  onMessage?: (frame: MsgEnvelope) => void;
  /**
   * Told of each envelope of an HTTP `200` reply that is not a valid server frame (it is
   * skipped, as on the socket, where such a frame is the chart's `BAD_FRAME`), with the
   * reason (`bad_request: …`): the client reports it on `failures$` as `bad_frame`
   * (PROTOCOL §4).
   */
  onBadFrame?: (reason: string) => void;
}

/** Which URL index the last successful or attempted dial used; HTTP follows it. */
export interface TransportCursor {
  index: number;
}

/**
 * A URL with `clientId=<sentinel>` set the way `URLSearchParams` sets it, cut at the sentinel:
 * the socket URL of any clientId the form encoding leaves as it is is then `before + clientId
 * + after`, without parsing the URL again at each dial (issue 14, connect row). Bounded like
 * `checkedUrls`. `null`: the sentinel did not come out once and intact (never expected).
 */
const socketUrlParts = new Map<string, readonly [string, string] | null>();
const SENTINEL = 'syncwireClientIdSentinel0';
/** Characters `application/x-www-form-urlencoded` serializing leaves as they are (WHATWG URL). */
const FORM_SAFE = /^[A-Za-z0-9*._-]+$/;

/**
 * Whether `v` can be a clientId (PROTOCOL §1): a string of 1–128 visible ASCII characters
 * (U+0021–U+007E), the characters both transports carry exactly as they are. Others do not
 * reach the server the same way on both: `fetch` trims leading and trailing whitespace from a
 * header (`' a'` over HTTP is `a` on the socket's `' a'`), a header cannot carry characters
 * above U+00FF at all, and a lone surrogate becomes U+FFFD. A clientId that differs between
 * the socket and HTTP is deduped under two ids, so a batch retried over the other transport
 * would be applied twice (second fresh breaker of session 7, N1 and N2).
 */
export function isValidClientId(v: unknown): v is string {
  return typeof v === 'string' && CLIENT_ID.test(v);
}
const CLIENT_ID = /^[\x21-\x7e]{1,128}$/;

/** The header that carries the clientId over HTTP (PROTOCOL §1); no `headers` entry may replace it. */
export const CLIENT_ID_HEADER = 'x-client-id';

/** `headers` without any spelling of `X-Client-Id` (header names are case-insensitive). */
export function withoutClientIdHeader(headers: Record<string, string>): Record<string, string> {
  let out: Record<string, string> | undefined;
  for (const k of Object.keys(headers)) {
    if (k.toLowerCase() === CLIENT_ID_HEADER) {
      out ??= { ...headers };
      delete out[k];
    }
  }
  return out ?? headers;
}

/**
 * The socket URL: `url` with `params` and then `clientId` set as query parameters. The
 * clientId is set last, so a `clientId` key in `params` (or in `url`'s query) never replaces
 * it: the socket and HTTP always carry the same clientId (one id on the wire, or a request
 * retried over HTTP would be deduped under another id and applied twice).
 */
export function wsUrlWithParams(url: string, clientId: string, params: Record<string, string>): string {
  if (FORM_SAFE.test(clientId) && isEmpty(params)) {
    let parts = socketUrlParts.get(url);
    if (parts === undefined) {
      const u = new URL(url);
      u.searchParams.set('clientId', SENTINEL);
      const cut = u.toString().split(SENTINEL);
      parts = cut.length === 2 ? ([cut[0]!, cut[1]!] as const) : null;
      if (socketUrlParts.size >= URL_CACHE) socketUrlParts.clear();
      socketUrlParts.set(url, parts);
    }
    if (parts) return parts[0] + clientId + parts[1];
  }
  const u = new URL(url);
  for (const [k, v] of Object.entries(params)) u.searchParams.set(k, v);
  u.searchParams.set('clientId', clientId);
  return u.toString();
}

/** No own enumerable key (what `Object.keys(o).length === 0` says, without the array). */
function isEmpty(o: object): boolean {
  for (const k in o) if (Object.hasOwn(o, k)) return false;
  return true;
}

/** `ws://host/path` → `http://host/path`, `wss` → `https`. */
export function deriveHttpUrl(wsUrl: string): string {
  const u = new URL(wsUrl);
  u.protocol = u.protocol === 'wss:' ? 'https:' : 'http:';
  u.search = '';
  return u.toString();
}

const OPEN = 1;

/** Everything a dial needs, resolved and checked: sync when every part is a plain value. */
function resolveDial(config: TransportConfig, refresh: boolean): Dial | Promise<Dial> {
  const ctx: ResolveContext = { transport: 'ws', refresh };
  const urls = resolveValue(config.urls, ctx);
  const params = resolveValue(config.params, ctx);
  const headers = resolveValue(config.headers, ctx);
  if (urls instanceof Promise || params instanceof Promise || headers instanceof Promise) {
    return Promise.all([urls, params, headers]).then(([u, p, h]) => ({
      urls: checkUrls('url', u),
      params: checkRecord('params', p),
      headers: withoutClientIdHeader(checkRecord('headers', h)),
    }));
  }
  return {
    urls: checkUrls('url', urls),
    params: checkRecord('params', params),
    headers: withoutClientIdHeader(checkRecord('headers', headers)),
  };
}

/** A dial's resolved parts: URLs, query parameters, and upgrade headers (honoured by `ws`). */
interface Dial {
  urls: string[];
  params: Record<string, string>;
  headers: Record<string, string>;
}

/** The HTTP URL for the cursor's index, and the headers, resolved and checked for one request. */
async function resolveHttp(
  config: TransportConfig,
  cursor: TransportCursor,
  refresh: boolean,
): Promise<{ url: string; headers: Record<string, string> }> {
  const ctx: ResolveContext = { transport: 'http', refresh };
  const [urls, headers] = await Promise.all([
    resolveValue(config.httpUrls ?? config.urls, ctx),
    resolveValue(config.headers, ctx),
  ]);
  const list = checkUrls(config.httpUrls ? 'httpUrl' : 'url', urls);
  const one = list[cursor.index % list.length]!;
  return { url: config.httpUrls ? one : deriveHttpUrl(one), headers: checkRecord('headers', headers) };
}

/** `ws` reports a refused upgrade as an error "Unexpected server response: 401"; browsers say nothing. */
function upgradeStatus(ev: unknown): number | undefined {
  const e = ev as { message?: unknown; error?: { message?: unknown } } | null;
  const text = String(e?.message ?? e?.error?.message ?? '');
  const m = /Unexpected server response: (\d{3})/.exec(text);
  return m ? Number(m[1]) : undefined;
}

/**
 * A request payload may carry a local answer (`localReply`): when it returns one at the
 * moment the request would go on the wire, the request is not sent and the transport answers
 * it with a `SYN` of that payload instead. The client uses it for a `SUB` whose every channel
 * was refused or unsubscribed while it waited in the outbox: the server would NAK a SUB that
 * names no channel (PROTOCOL §3), and the client already knows each channel's outcome.
 */
export interface LocalReply {
  localReply(): unknown[] | undefined;
}

/** The local answer of a request, as the `SYN` the server would have sent; `undefined` to send it. */
export function localReplyOf(frame: { id: string; payload?: unknown }): ServerEnvelope | undefined {
  const p = frame.payload as Partial<LocalReply> | undefined;
  const payload = typeof p?.localReply === 'function' ? p.localReply() : undefined;
  return payload ? ({ id: frame.id, type: 'SYN', payload } as ServerEnvelope) : undefined;
}

/** The socket actor: DIAL opens a new socket (dropping any old one), SEND writes, DROP closes. */
/**
 * One client's transport, as the actors receive it: either fixed when the actor is made, or
 * through the chart's `io` input (`ConnectionInput.io`), so that one provided machine serves
 * every client (`provide()` per client cost ~650 µs of `createSyncClient`, issue 14).
 */
export interface TransportIo {
  config: TransportConfig;
  cursor: TransportCursor;
  /** The client's current clientId (it may be replaced after `client_id_taken`). */
  clientId: () => string;
  /**
   * The write handle of the live `socket` actor: set by the actor when it starts, cleared by
   * its cleanup (when the chart stops it), `undefined` otherwise. `write(frame)` does what a
   * `{ type: 'SEND', frame }` command to the actor does (a local answer, or one `ws.send` on
   * the open socket, or nothing when there is none), without the command's trip through the
   * actor's mailbox. The client's chart writes each request it takes off the outbox through
   * it (issue 14: one actor step fewer per request); DIAL, DROP and pings stay commands.
   */
  write?: ((frame: OutgoingFrame) => void) | undefined;
}

/** What the invoked socket actor is given by the chart. */
export interface SocketInput {
  clientId: string;
  /** The client's `TransportIo`, when the actor was made without one. */
  io?: unknown;
}

/**
 * The socket actor: DIAL opens a new socket (dropping any old one), SEND writes, DROP closes.
 * Without `fixed`, each invocation takes its transport from its input's `io`.
 */
export function socketActor(fixed?: TransportIo) {
  return fromCallback<SocketCommand, SocketInput>(({ sendBack, receive, input }) => {
    const io = fixed ?? (input.io as TransportIo);
    const { config, cursor } = io;
    let ws: WebSocketLike | null = null;
    let dials = 0;
    /** Bumped by every DIAL and DROP: an async credential lookup that lost the race is dropped. */
    let generation = 0;
    let stopped = false;
    /** Chart commands being run now: a frame delivered inside one goes through the chart. */
    let commands = 0;

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

    const failDial = (err: unknown) =>
      sendBack({
        type: 'WS.DOWN',
        code: 1006,
        reason: String(err),
        wasOpen: false,
      } satisfies ConnectionEvent);

    const dial = (refresh: boolean) => {
      detach(ws);
      ws = null;
      const mine = ++generation;
      let resolved: ReturnType<typeof resolveDial>;
      try {
        resolved = resolveDial(config, refresh);
      } catch (err) {
        failDial(err);
        return;
      }
      if (resolved instanceof Promise) {
        resolved.then(
          (r) => {
            if (mine === generation && !stopped) open(r);
          },
          (err) => {
            if (mine === generation && !stopped) failDial(err);
          },
        );
      } else open(resolved);
    };

    const open = ({ urls, params, headers }: Dial) => {
      // Failover: each dial after the first moves to the next URL, round robin.
      if (dials++ > 0 && urls.length > 1) cursor.index = (cursor.index + 1) % urls.length;
      cursor.index %= urls.length;
      let sock: WebSocketLike;
      try {
        const url = wsUrlWithParams(urls[cursor.index]!, input.clientId, params);
        // Headers on the upgrade: Node's `ws` takes them as its third argument (browsers'
        // WebSocket has no such argument and ignores it, so there `params` is the way).
        sock = isEmpty(headers)
          ? new config.WebSocket(url)
          : new config.WebSocket(url, undefined, { headers });
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
      let refusedWith: number | undefined;
      // An ACK is held until the end of the synchronous run of frames it arrived in: when its
      // own response follows in the same run (the server wrote both in one TCP write), the
      // response alone goes to the chart (awaitingAck → open: the response implies the ACK,
      // PROTOCOL §3), one macrostep per round trip fewer. Any other frame releases it first,
      // so the order of frames is kept.
      let heldAck: ServerEnvelope | null = null;
      const releaseAck = () => {
        const ack = heldAck;
        heldAck = null;
        if (ack && ws === sock) sendBack({ type: 'FRAME', frame: ack } satisfies ConnectionEvent);
      };
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
          releaseAck();
          sendBack({
            type: 'BAD_FRAME',
            reason: `${parsed.code}: ${parsed.message}`,
          } satisfies ConnectionEvent);
          return;
        }
        const f = parsed.envelope;
        if (f.type === 'ACK') {
          if (config.faults.dropAcks) return;
          if (heldAck) releaseAck();
          else queueMicrotask(releaseAck);
          heldAck = f;
          return;
        }
        if (heldAck) {
          if ((f.type === 'SYN' || f.type === 'NAK') && f.id === heldAck.id) heldAck = null;
          else releaseAck();
        }
        if (f.type === 'MSG' && config.onMessage && commands === 0) {
          config.onMessage(f);
          return;
        }
        sendBack({ type: 'FRAME', frame: f } satisfies ConnectionEvent);
      };
      const onDown = (code: number, reason: string) => {
        // error and close both arrive for one failure: report it once.
        if (down || ws !== sock) return;
        releaseAck();
        down = true;
        ws = null;
        config.onSocket?.(null);
        sendBack({ type: 'WS.DOWN', code, reason, wasOpen } satisfies ConnectionEvent);
      };
      // A refused upgrade (Node's `ws` only) is reported with its HTTP status as the code.
      sock.onclose = (ev) => onDown(!wasOpen && refusedWith !== undefined ? refusedWith : ev.code, ev.reason);
      sock.onerror = (ev) => {
        // A browser gives no detail on errors; the close that follows carries the code.
        refusedWith = upgradeStatus(ev) ?? refusedWith;
      };
    };

    const command = (cmd: SocketCommand) => {
      if (cmd.type === 'DIAL') dial(cmd.refresh === true);
      else if (cmd.type === 'DROP') {
        generation++;
        const sock = ws;
        ws = null;
        config.onSocket?.(null);
        detach(sock);
      } else if (cmd.type === 'SEND') send(cmd.frame);
    };
    /** A SEND command's work: the local answer, or the frame on the open socket. */
    const send = (frame: OutgoingFrame) => {
      const local = localReplyOf(frame);
      if (local) sendBack({ type: 'FRAME', frame: local });
      else if (ws && ws.readyState === OPEN && !config.faults.blackhole) {
        try {
          ws.send(encodeRequest(frame));
        } catch {
          // A send on a dying socket: the close event follows and the machine resends.
        }
      }
    };
    receive((cmd) => {
      commands++;
      try {
        command(cmd);
      } finally {
        commands--;
      }
    });
    // The write handle (`TransportIo.write`): a SEND without the mailbox, counted as a command
    // all the same (a frame answered locally inside it goes through the chart).
    const write = (frame: OutgoingFrame) => {
      if (stopped) return;
      commands++;
      try {
        send(frame);
      } finally {
        commands--;
      }
    };
    io.write = write;
    return () => {
      stopped = true;
      // Only this actor's handle: a newer actor on the same io may have set its own.
      if (io.write === write) io.write = undefined;
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
export function httpActor(fixed?: TransportIo) {
  return fromPromise<HttpOutcome, HttpInput>(async ({ input, signal }) => {
    const { config, cursor, clientId: getClientId } = fixed ?? (input.io as TransportIo);
    const { envelope } = input;
    // Answered without the network (see `LocalReply`).
    const local = localReplyOf(envelope);
    if (local) return { kind: 'reply', frames: [local], status: 200 };
    // Serialized here, in the same turn as the `localReply` check and before any await, as
    // the socket writes it: a SUB's channels are read as it is serialized, and a channel
    // unsubscribed while the URL or headers resolve would otherwise leave a SUB naming none
    // (the server NAKs it `bad_request`). One text for both POSTs of a 401 refresh, too.
    const requestText = encodeRequest(envelope);
    if (config.faults.blockHttp) throw new Error('network: http blocked (fault switch)');
    // A network error rejects: the chart's onError edge retries it with backoff. The URL and
    // headers are resolved for each request; a 401 resolves them once more and retries at
    // once with `refresh: true` (the app bypasses its token cache), and a second 401 is final.
    const post = async (refresh: boolean) => {
      const { url, headers } = await resolveHttp(config, cursor, refresh);
      return config.fetch(url, {
        method: 'POST',
        // The client's own clientId last: no `headers` entry replaces it (see withoutClientIdHeader).
        headers: {
          'content-type': 'application/json',
          ...withoutClientIdHeader(headers),
          [CLIENT_ID_HEADER]: getClientId(),
        },
        body: requestText,
        signal,
      });
    };
    let res = await post(false);
    if (res.status === 401) {
      await res.body?.cancel().catch(() => {});
      res = await post(true);
      if (res.status === 401) {
        await res.body?.cancel().catch(() => {});
        return { kind: 'unauthorized', reason: 'HTTP 401 twice, the second time with fresh credentials' };
      }
    }
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
        // A bad frame in a syncwire reply is skipped and reported, as the socket's are; the
        // body of another status is no word from a syncwire server (retried below).
        else if (status === 200) config.onBadFrame?.(`${parsed.code}: ${parsed.message}`);
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
