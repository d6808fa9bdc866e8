/**
 * The syncwire wire protocol, version 1: envelope types, the error type, and the parser
 * that validates every incoming frame. Shared by the client, the server and the stores.
 * docs/PROTOCOL.md is the prose form of this file; keep the two in agreement.
 */

export const PROTOCOL_VERSION = 1;

/** Envelope types, as they travel on the wire. */
export const MESSAGE_TYPES = ['SYN', 'ACK', 'PNG', 'NAK', 'SUB', 'UNS', 'MSG'] as const;
export type MessageType = (typeof MESSAGE_TYPES)[number];

/** Codes a server puts in a `NAK`. */
export const NAK_CODES = [
  'bad_request',
  'too_large',
  'forbidden',
  'unauthorized',
  'rate_limited',
  'server_error',
  'client_id_taken',
  'id_reused',
  'result_not_kept',
  'too_many_channels',
  'too_many_clients',
] as const;
/**
 * - `client_id_taken`: the clientId is bound to another principal (PROTOCOL §1 "principal
 *   binding"); the request was not processed. HTTP 409; also the upgrade's status.
 * - `id_reused`: a `SYN` id this client already used came with a different payload (its
 *   SHA-256 fingerprint differs); the batch was not applied and nothing remembered is returned.
 * - `result_not_kept`: the `SYN` was applied before, but its response was too large to keep
 *   (`dedupeMaxResponseBytes`) or was reduced to a fingerprint under `dedupeMaxBytes`: do not
 *   resend, the operations were applied once.
 * - `too_many_clients`: the server holds as many clientId bindings as it may (in all, or for
 *   this principal) and this clientId is new; nothing was processed. HTTP 503 with
 *   `Retry-After` (retried); on an open socket the request is refused.
 */
export type NakCode = (typeof NAK_CODES)[number];

/**
 * Codes a `SyncError` can carry: the protocol's `NAK` codes, plus the client's own.
 * - `closed`: `close()` was called before the operation settled.
 * - `queue_full`: the outbox already holds `maxQueue` operations.
 * - `bad_response`: the server answered in a way the protocol forbids (a lying server).
 */
export type SyncErrorCode = NakCode | 'closed' | 'queue_full' | 'bad_response';

/** The one error type syncwire rejects with. `code` is stable; `message` is for people. */
export class SyncError extends Error {
  override readonly name = 'SyncError';
  constructor(
    readonly code: SyncErrorCode,
    message: string,
    readonly details?: unknown,
  ) {
    super(message);
  }
}

/** Close codes the reference server uses on the socket (4000–4999 is the application range). */
export const CloseCodes = {
  normal: 1000,
  goingAway: 1001,
  /** A frame larger than `maxPayloadBytes`. */
  tooLarge: 1009,
  /** The server is shutting down. */
  serverShutdown: 1012,
  /** Too many unparseable frames in a row. */
  badFrames: 4400,
  /**
   * No first frame arrived within the server's `firstFrameTimeoutMs` of the upgrade: a
   * socket that never identifies itself is not kept. The client redials as after any close.
   */
  handshakeTimeout: 4408,
  /**
   * The client kept sending frames after `maxBadFrames` of them in a row were refused
   * `NAK rate_limited` for passing the server's frame rate (`maxFramesPerSecond` per socket,
   * `maxFramesPerSecondPerPrincipal` per principal). The client redials with backoff.
   */
  frameRate: 4420,
  /**
   * This socket was the oldest of more than `maxSocketsPerClient` open for its clientId and
   * was closed to make room for the newest (the one a live client is using).
   */
  tooManySockets: 4409,
  /**
   * The socket fell too far behind: more than the server's `maxBufferedBytes` waiting to be
   * sent. The client reconnects and replays from its cursors, so nothing is lost.
   */
  slowConsumer: 4429,
  /**
   * `server.disconnect()` closed the socket on purpose. The client redials as after any close;
   * to keep it out, `authenticate` must refuse it.
   */
  disconnected: 4001,
} as const;

/** Longest allowed envelope id and clientId. */
export const MAX_ID_LENGTH = 128;

/** Default limits. */
export const DEFAULT_MAX_PAYLOAD_BYTES = 1_048_576;

export interface ChannelCursor {
  since?: number;
  epoch?: string;
  rewind?: number;
  /**
   * Ask for the server's `snapshot` of the channel (docs/consistency.md): the answer carries
   * the snapshot and the seq it corresponds to, and the replay starts right after that seq.
   * `since` and `rewind` are then ignored.
   */
  snapshot?: boolean;
}

/** A snapshot in a SUB response: the application's state of the channel as of `seq`. */
export interface ChannelSnapshot {
  /** The channel's head (in the response's epoch) read before the snapshot was taken. */
  seq: number;
  /** What the server's `snapshot` hook returned (JSON). */
  data: unknown;
}

/**
 * One publication a batch made through `ctx.publish`, as listed in the response `SYN`'s
 * `published` field: where the author's change sits in the channel's order.
 */
export interface Publication {
  channel: string;
  seq: number;
  epoch: string;
}

export interface ChannelState {
  epoch: string;
  seq: number;
  recovered: boolean;
  more?: boolean;
  /** Present when the SUB asked `snapshot: true` and the server has a `snapshot` hook. */
  snapshot?: ChannelSnapshot;
}

/**
 * One channel's entry in a `SUB` response that was not granted: `forbidden` (`authorize` said
 * no), `too_many_channels` (the principal's cap), `server_error` (`authorize` threw). The other
 * channels of the same `SUB` are answered on their own (PROTOCOL §3 rule 7).
 */
export interface ChannelRefusal {
  error: { code: NakCode; message: string };
}

/** An entry of a `SUB` response: the channel's state, or why it was refused. */
export type ChannelEntry = ChannelState | ChannelRefusal;

/** Whether a `SUB` response entry is a refusal. */
export const isChannelRefusal = (e: unknown): e is ChannelRefusal =>
  typeof e === 'object' &&
  e !== null &&
  typeof (e as { error?: unknown }).error === 'object' &&
  (e as { error?: unknown }).error !== null;

export interface SynEnvelope {
  id: string;
  type: 'SYN';
  payload: unknown[];
  /**
   * On a response `SYN` only: the publications the batch made (docs/consistency.md). Absent
   * when it published nothing.
   */
  published?: Publication[];
}
export interface AckEnvelope {
  id: string;
  type: 'ACK';
}
export interface PngEnvelope {
  id: string;
  type: 'PNG';
}
export interface NakEnvelope {
  id: string | null;
  type: 'NAK';
  error: { code: NakCode; message: string };
}
export interface SubEnvelope {
  id: string;
  type: 'SUB';
  payload: { channels: Record<string, ChannelCursor> };
}
export interface UnsEnvelope {
  id: string;
  type: 'UNS';
  payload: { channels: string[] };
}
export interface MsgEnvelope {
  id: string;
  type: 'MSG';
  channel: string;
  seq: number;
  epoch: string;
  /** Absent on a payload-less echo (published with `except: clientId`). */
  payload?: unknown;
  replay?: boolean;
  /**
   * The client's own publication. By default (`ctx.publish` in `onSync`) it carries its
   * payload, so the author sees its own change at its seq like everybody else's
   * (docs/consistency.md). Published with `except: clientId` it comes without payload, so
   * that the author's cursor stays dense (PROTOCOL rule 9).
   */
  echo?: boolean;
}

/**
 * Server to client: the server ended the socket's subscriptions to `channels` (revocation,
 * PROTOCOL §3 rule 11). `error.code` is `forbidden` when `authorize` no longer allows them,
 * `unsubscribed` when the server dropped them by `server.unsubscribe()`. The client does not
 * re-subscribe them by itself. It is not acknowledged and carries a server-made `id`.
 */
export interface RevokeEnvelope {
  id: string;
  type: 'UNS';
  payload: { channels: string[] };
  error: { code: NakCode | 'unsubscribed'; message: string };
}

export type Envelope =
  | RevokeEnvelope
  | SynEnvelope
  | AckEnvelope
  | PngEnvelope
  | NakEnvelope
  | SubEnvelope
  | UnsEnvelope
  | MsgEnvelope;

/** Envelopes a client sends and expects an `ACK` for. */
export type RequestEnvelope = SynEnvelope | PngEnvelope | SubEnvelope | UnsEnvelope;
/** Envelopes a server sends. */
export type ServerEnvelope = SynEnvelope | AckEnvelope | NakEnvelope | MsgEnvelope | RevokeEnvelope;

/** What `parseFrame` returns: never throws. `id` is set when the frame had a usable one. */
export type ParseResult<T> =
  | { ok: true; envelope: T }
  | { ok: false; code: NakCode; message: string; id: string | null };

export interface ParseOptions {
  /** Largest accepted frame, in bytes (UTF-8). @default 1048576 */
  maxBytes?: number;
  /**
   * Most operations in one `SYN`; a longer one is refused with `too_large` (and its id).
   * @default Infinity (no limit; the server passes its `maxBatch`)
   */
  maxBatch?: number;
}

const isObject = (v: unknown): v is Record<string, unknown> =>
  typeof v === 'object' && v !== null && !Array.isArray(v);

const validId = (v: unknown): v is string =>
  typeof v === 'string' && v.length > 0 && v.length <= MAX_ID_LENGTH;

/**
 * A record keyed by channel names, without a prototype: every name `isValidChannel` accepts
 * (`__proto__`, `constructor`, `toString`, …) is an ordinary key. On a plain object,
 * `o['__proto__'] = x` sets the prototype instead of a key and `o.toString` reads
 * `Object.prototype` when the channel is absent. `JSON.stringify` writes it as any object.
 */
export const channelRecord = <T>(): Record<string, T> => Object.create(null) as Record<string, T>;

/** A channel's own entry in a record (from the wire or not), `undefined` when it has none. */
export const entryOf = <T>(r: Record<string, T> | null | undefined, channel: string): T | undefined =>
  r != null && Object.hasOwn(r, channel) ? r[channel] : undefined;

/**
 * A channel name: 1–200 UTF-16 code units (`length`), no control character (U+0000–U+001F,
 * U+007F). Any other string is a name, `__proto__` included (keep names in `channelRecord`s).
 * The rule of docs/PROTOCOL.md §2 "Channel names", on both sides.
 */
export const isValidChannel = (v: unknown): v is string =>
  typeof v === 'string' && v.length > 0 && v.length <= 200 && !hasControlChar(v);

function hasControlChar(s: string): boolean {
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c < 0x20 || c === 0x7f) return true;
  }
  return false;
}

const isSeq = (v: unknown): v is number => typeof v === 'number' && Number.isSafeInteger(v) && v >= 0;

/**
 * What is wrong with one channel's cursor (`{ since?, epoch?, rewind?, snapshot? }`), or
 * `undefined` when nothing is. One rule for the server's SUB parser and the client's
 * `subscribe()`/`channels` option, so a client never registers a cursor the server refuses
 * (PROTOCOL §2, SUB): `since` and `rewind` integers ≥ 0, `epoch` a string of at most
 * 128 characters, `snapshot` a boolean.
 */
export function cursorProblem(c: Record<string, unknown>): string | undefined {
  if (c.since !== undefined && !isSeq(c.since)) return 'since must be an integer ≥ 0';
  if (c.rewind !== undefined && !isSeq(c.rewind)) return 'rewind must be an integer ≥ 0';
  if (c.epoch !== undefined && (typeof c.epoch !== 'string' || c.epoch.length > MAX_ID_LENGTH))
    return 'epoch must be a string';
  if (c.snapshot !== undefined && typeof c.snapshot !== 'boolean') return 'snapshot must be a boolean';
  return undefined;
}

/** A `NAK` or refusal code as the client reads it: a code it does not know is `server_error`. */
export function knownNakCode(code: unknown): NakCode {
  return (NAK_CODES as readonly unknown[]).includes(code) ? (code as NakCode) : 'server_error';
}

/**
 * A refusal entry of a `SUB` response, read the way a `NAK` is (PROTOCOL §2, `NAK` codes): a
 * code the client does not know becomes `server_error` (its text kept in the message), a
 * missing message `refused`. `unsubscribed` (the server ended the channel: rule 11) is kept.
 */
export function channelRefusalOf(e: ChannelRefusal): ChannelRefusal {
  const err = e.error as { code?: unknown; message?: unknown };
  const message = typeof err.message === 'string' ? err.message : 'refused';
  if (err.code === 'unsubscribed' || (NAK_CODES as readonly unknown[]).includes(err.code))
    return { error: { code: err.code as NakCode, message } };
  const raw = typeof err.code === 'string' ? err.code.slice(0, 64) : typeof err.code;
  return { error: { code: 'server_error', message: `${message} (unknown code ${raw})` } };
}

/**
 * What is wrong with one granted channel entry of a `SUB` response (PROTOCOL §2, `SUB` row:
 * `{ epoch, seq, recovered, more?, snapshot? }`), or `undefined` when nothing is: `epoch` a
 * string of at most 128 characters (what the client sends back in its next cursor, where the
 * server accepts no more), `seq` an integer ≥ 0 no larger than `Number.MAX_SAFE_INTEGER`,
 * `recovered` a boolean, `more` absent or a boolean, `snapshot` absent or
 * `{ seq: integer ≥ 0, data }`. Refusals (`{ error }`, `isChannelRefusal`) are not checked here.
 * The reference client treats an entry with a problem as that channel's `bad_response`.
 */
export function channelStateProblem(e: unknown): string | undefined {
  if (!isObject(e))
    return `entry must be an object, got ${e === null ? 'null' : Array.isArray(e) ? 'an array' : typeof e}`;
  if (typeof e.epoch !== 'string' || e.epoch.length > MAX_ID_LENGTH)
    return 'epoch must be a string of at most 128 characters';
  if (!isSeq(e.seq)) return 'seq must be an integer ≥ 0 (a safe integer)';
  if (typeof e.recovered !== 'boolean') return 'recovered must be a boolean';
  if (e.more !== undefined && typeof e.more !== 'boolean') return 'more must be a boolean';
  if (e.snapshot !== undefined && (!isObject(e.snapshot) || !isSeq(e.snapshot.seq)))
    return 'snapshot must be { seq: integer ≥ 0, data }';
  return undefined;
}

function byteLength(frame: string | Uint8Array, max: number): number {
  if (typeof frame !== 'string') return frame.byteLength;
  // Fast path: a string can never be more bytes than 3 × its UTF-16 length, so one that
  // short is under `max` whatever it holds (the length returned is then only a lower bound).
  if (frame.length * 3 <= max) return frame.length;
  return utf8Encoder.encode(frame).byteLength;
}

/** One encoder and decoder for every frame (made once: a `TextDecoder` per frame showed in profiles). */
const utf8Encoder = new TextEncoder();
const utf8Decoder = new TextDecoder();

const QUOTE = 0x22;
const BACKSLASH = 0x5c;
const COMMA = 0x2c;
const COLON = 0x3a;
const OPEN_ARRAY = 0x5b;
const CLOSE_ARRAY = 0x5d;
const OPEN_OBJECT = 0x7b;
const CLOSE_OBJECT = 0x7d;
/** `payload` as UTF-8 / UTF-16 code units, without its quotes. */
const PAYLOAD_KEY = [0x70, 0x61, 0x79, 0x6c, 0x6f, 0x61, 0x64];
/** `id`, the same way. */
const ID_KEY = [0x69, 0x64];

/**
 * Where the last `payloadOver` scan saw the string value of the top-level `id` member (code
 * unit offsets inside the quotes; -1 when it saw none before it stopped). Module state rather
 * than a returned object, so the scan allocates nothing.
 */
let idStart = -1;
let idEnd = -1;

/** The top-level `id` the last scan saw, when it is a valid id; else `null`. */
function scannedId(text: string): string | null {
  if (idStart < 0 || idEnd - idStart > 6 * MAX_ID_LENGTH) return null;
  try {
    const id: unknown = JSON.parse(`"${text.slice(idStart, idEnd)}"`);
    return validId(id) ? id : null;
  } catch {
    return null;
  }
}

/**
 * Index of the `"` that closes the string whose opening `"` is at `open`, or -1 when it is
 * not closed. A native `indexOf` per quote, then the backslashes before it are counted (an
 * odd number escapes it): the characters inside a string are never looked at one by one
 * (issue 14, session 7: the per-character loop over a 64-operation SYN's 13 kB cost more
 * than its `JSON.parse`).
 */
function closingQuote(text: string, open: number): number {
  let from = open + 1;
  for (;;) {
    const q = text.indexOf('"', from);
    if (q < 0) return -1;
    let b = q - 1;
    while (b > open && text.charCodeAt(b) === BACKSLASH) b--;
    if ((q - 1 - b) % 2 === 0) return q;
    from = q + 1;
  }
}

/**
 * Whether an array that is the value of a `payload` member of the top-level object holds
 * more than `limit` elements, found by one pass over the frame's text that allocates
 * nothing (structure and strings only; values are not validated). Stops as soon as it knows.
 * Strings are skipped with a native search for their closing quote (`closingQuote`).
 * A key written with escapes (`"p\u0061yload"`) is decoded before it is compared, so it
 * cannot slip past. Malformed input answers `false`: JSON.parse then says what is wrong.
 * Duplicate `payload` keys: any one over the limit refuses the frame (no client sends them).
 * Remembers the top-level `id`'s string when it comes before the point the scan stops (every
 * client writes `id` first), so the refusal can name the request. The scan runs on the
 * decoded text: every character it looks at is ASCII, and no byte of a multi-byte UTF-8
 * sequence (nor the U+FFFD a bad one decodes to) is, so it finds what a scan of the bytes
 * would.
 */
function payloadOver(text: string, limit: number): boolean {
  const n = text.length;
  let depth = 0;
  /** Depth of the payload array being counted, 0 when none. */
  let counting = 0;
  let count = 0;
  /** The last string at depth 1 was the key `payload` and a `:` may follow. */
  let keyIsPayload = false;
  let afterColon = false;
  /** The same for the key `id`, whose string value is remembered (`idStart`/`idEnd`). */
  let keyIsId = false;
  let afterIdColon = false;
  idStart = -1;
  idEnd = -1;
  for (let i = 0; i < n; i++) {
    const c = text.charCodeAt(i);
    if (c === QUOTE) {
      const start = i + 1;
      i = closingQuote(text, i);
      if (i < 0) return false;
      if (counting !== 0 && depth === counting && count === 0) count = 1;
      if (depth === 1 && afterIdColon) {
        idStart = start;
        idEnd = i;
      } else if (depth === 1 && !afterColon) {
        keyIsPayload = isKey(PAYLOAD_KEY, text, start, i);
        keyIsId = !keyIsPayload && isKey(ID_KEY, text, start, i);
      }
      afterColon = false;
      afterIdColon = false;
      continue;
    }
    if (c === COLON) {
      afterColon = depth === 1 && keyIsPayload;
      afterIdColon = depth === 1 && keyIsId;
      keyIsPayload = false;
      keyIsId = false;
      continue;
    }
    if (c === OPEN_ARRAY || c === OPEN_OBJECT) {
      depth++;
      if (c === OPEN_ARRAY && afterColon && depth === 2) {
        counting = depth;
        count = 0;
      } else if (counting !== 0 && depth === counting + 1 && count === 0) count = 1;
      afterColon = false;
      afterIdColon = false;
      continue;
    }
    if (c === CLOSE_ARRAY || c === CLOSE_OBJECT) {
      if (depth === counting) counting = 0;
      depth--;
      if (depth < 0) return false;
      continue;
    }
    if (c === COMMA) {
      if (counting !== 0 && depth === counting && ++count > limit) return true;
      afterColon = false;
      afterIdColon = false;
      continue;
    }
    // Whitespace, or a scalar's characters (digits, true, false, null).
    if (counting !== 0 && depth === counting && count === 0 && c > 0x20) count = 1;
    if (c > 0x20) {
      afterColon = false;
      afterIdColon = false;
    }
  }
  return false;
}

function isKey(key: readonly number[], text: string, start: number, end: number): boolean {
  // Longer than any key, escaped or not (a bounded look at each key below).
  if (end - start > 64) return false;
  let escaped = false;
  for (let k = start; k < end && !escaped; k++) escaped = text.charCodeAt(k) === BACKSLASH;
  if (!escaped) {
    if (end - start !== key.length) return false;
    for (let k = 0; k < key.length; k++) if (text.charCodeAt(start + k) !== key[k]) return false;
    return true;
  }
  // Rare (no client escapes plain letters): the key is decoded alone.
  try {
    return JSON.parse(`"${text.slice(start, end)}"`) === String.fromCharCode(...key);
  } catch {
    return false;
  }
}

function decode(frame: string | Uint8Array): string {
  return typeof frame === 'string' ? frame : utf8Decoder.decode(frame);
}

/**
 * FIX3 (issue 12): `JSON.parse` of a `SUB` whose `channels` object has fresh names builds a
 * new hidden class per name (~1.5 µs a name: 150 µs for 100 names, 15 × the same text as an
 * array), and `SUB`s refused after parsing (rate limits) were most of a flooded server's CPU.
 * So the `channels` object of `payload` is parsed as an array of alternating names and
 * cursors: `subChannelsText` rewrites `{"a":{},"b":{}}` to `["a",{},"b",{}]` (same length)
 * when it can tell for sure which object that is, and the names are then gathered
 * (`pairsToMap`, then the envelope's `channelRecord`) with `JSON.parse`'s semantics (a repeated
 * name: the last cursor, at the first place). Anything unusual (an escaped key at the top or payload
 * level, `payload` or `channels` twice, a malformed `channels` object) is left as it is, and
 * then parsed as before. @internal exported for tests only.
 */
export function subChannelsText(text: string): string | undefined {
  /** Open containers: 1 top object, 2 `payload` object, 3 `channels` object, 0 anything else; -1 array. */
  const tags: number[] = [];
  /** For each open object: the last key read at its level (`null`: escaped), and whether a key comes next. */
  const keys: Array<string | null> = [];
  const expectKey: boolean[] = [];
  let payloads = 0;
  let channelsSeen = 0;
  let open = -1;
  let close = -1;
  const colons: number[] = [];
  /** In the `channels` object: 0 a key or `}` comes next, 1 a `:`, 2 a value, then `,` or `}`. */
  let chState = 0;
  const n = text.length;
  for (let i = 0; i < n; i++) {
    const c = text.charCodeAt(i);
    const depth = tags.length;
    const tag = depth > 0 ? tags[depth - 1]! : -2;
    if (c === 0x20 || c === 0x0a || c === 0x0d || c === 0x09) continue;
    if (tag === 3) {
      // Directly inside `channels`: only its own punctuation, keys and the start of values.
      if (chState === 0) {
        if (c === 0x7d) {
          // `}` (also the empty object)
          close = i;
          tags.pop();
          keys.pop();
          expectKey.pop();
          continue;
        }
        if (c !== QUOTE) return undefined;
        i = stringEnd(text, i);
        if (i < 0) return undefined;
        chState = 1;
        continue;
      }
      if (chState === 1) {
        if (c !== 0x3a) return undefined;
        colons.push(i);
        chState = 2;
        continue;
      }
      if (chState === 3) {
        if (c === COMMA) {
          chState = 4;
          continue;
        }
        if (c !== 0x7d) return undefined;
        close = i;
        tags.pop();
        keys.pop();
        expectKey.pop();
        continue;
      }
      if (chState === 4) {
        // After a `,`: a key, nothing else.
        if (c !== QUOTE) return undefined;
        i = stringEnd(text, i);
        if (i < 0) return undefined;
        chState = 1;
        continue;
      }
      // chState 2: a value starts here.
      if (c === 0x7d || c === 0x5d || c === COMMA || c === 0x3a) return undefined;
      if (c === 0x7b || c === 0x5b) {
        tags.push(c === 0x7b ? 0 : -1);
        keys.push(null);
        expectKey.push(c === 0x7b);
        continue;
      }
      if (c === QUOTE) {
        i = stringEnd(text, i);
        if (i < 0) return undefined;
        chState = 3;
        continue;
      }
      // A number, true, false or null: to the next delimiter.
      while (i + 1 < n) {
        const d = text.charCodeAt(i + 1);
        if (d === COMMA || d === 0x7d || d === 0x20 || d === 0x0a || d === 0x0d || d === 0x09) break;
        i++;
      }
      chState = 3;
      continue;
    }
    if (c === QUOTE) {
      const start = i;
      i = stringEnd(text, i);
      if (i < 0) return undefined;
      if (depth > 0 && tag >= 0 && expectKey[depth - 1]) {
        const raw = text.slice(start + 1, i);
        const escaped = raw.includes('\\');
        if (escaped && (tag === 1 || tag === 2)) return undefined;
        keys[depth - 1] = escaped ? null : raw;
        if (tag === 1 && raw === 'payload') payloads++;
        if (tag === 2 && raw === 'channels') channelsSeen++;
      }
      continue;
    }
    if (c === 0x7b || c === 0x5b) {
      let t = 0;
      if (c === 0x5b) t = -1;
      else if (depth === 0) t = 1;
      else if (tag === 1 && keys[depth - 1] === 'payload') t = 2;
      else if (tag === 2 && keys[depth - 1] === 'channels') t = 3;
      if (t === 3) {
        if (open >= 0) return undefined;
        open = i;
        chState = 0;
      }
      tags.push(t);
      keys.push(null);
      expectKey.push(c === 0x7b);
      continue;
    }
    if (c === 0x7d || c === 0x5d) {
      if (depth === 0) return undefined;
      tags.pop();
      keys.pop();
      expectKey.pop();
      // A value of `channels` ended: a `,` or `}` comes next.
      if (depth - 1 > 0 && tags[depth - 2] === 3) chState = 3;
      continue;
    }
    if (depth > 0 && tag >= 0) {
      if (c === 0x3a) expectKey[depth - 1] = false;
      else if (c === COMMA) expectKey[depth - 1] = true;
    }
  }
  if (open < 0 || close < 0 || payloads !== 1 || channelsSeen !== 1 || tags.length !== 0) return undefined;
  let out = `${text.slice(0, open)}[`;
  let from = open + 1;
  for (const at of colons) {
    out += `${text.slice(from, at)},`;
    from = at + 1;
  }
  return `${out}${text.slice(from, close)}]${text.slice(close + 1)}`;
}

/**
 * Whether `frame` holds at least `n` commas (a native search per comma, stopping at `n`):
 * a payload of more than `n` elements has `n` commas between them, so a frame with fewer
 * needs no `payloadOver` scan (a small SYN, the usual case: ~0.2 µs instead of ~3 µs).
 */
function hasCommas(text: string, n: number): boolean {
  let at = -1;
  for (let k = 0; k < n; k++) {
    at = text.indexOf(',', at + 1);
    if (at < 0) return false;
  }
  return true;
}

/** Index of the `"` closing the string opened at `start`, or −1. */
function stringEnd(text: string, start: number): number {
  for (let i = start + 1; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c === BACKSLASH) i++;
    else if (c === QUOTE) return i;
  }
  return -1;
}

/**
 * `[name, cursor, name, cursor, …]` as a `Map`, with `JSON.parse`'s semantics for a repeated
 * name (the last cursor, at the first place). A `Map`, not a record: adding fresh names to an
 * object costs ~0.5 µs each (measured), to a `Map` ~0.05 µs; the envelope's record is made
 * once, from the names that pass validation.
 */
function pairsToMap(pairs: unknown[]): Map<string, unknown> {
  const map = new Map<string, unknown>();
  for (let i = 0; i + 1 < pairs.length; i += 2) map.set(pairs[i] as string, pairs[i + 1]);
  return map;
}

/** Whether `k` is an array index (`0`–`2³² − 2`, canonical): objects list those keys first, ascending. */
const isArrayIndex = (k: string): boolean => /^(?:0|[1-9]\d{0,9})$/.test(k) && Number(k) < 4_294_967_295;

/** A `Map`'s entries in the order `Object.entries` lists an object's: array indices first, ascending. */
function objectOrder(map: Map<string, unknown>): Array<[string, unknown]> {
  const indices: Array<[string, unknown]> = [];
  const rest: Array<[string, unknown]> = [];
  for (const e of map) (isArrayIndex(e[0]) ? indices : rest).push(e);
  if (indices.length === 0) return rest;
  indices.sort((a, b) => Number(a[0]) - Number(b[0]));
  return indices.concat(rest);
}

const fail = (code: NakCode, message: string, id: string | null = null) =>
  ({ ok: false, code, message, id }) as const;

/**
 * What a JSON text holding a number beyond a double's range must contain (`hasNonFinite`): an
 * exponent of 3 digits or more, not negative, after a digit (a number's mantissa ends in one),
 * or a run of 100 digits. A number with neither is below 1e99 × 1e99. Strings holding `e` and
 * 3 digits not after a digit (ids such as `xe123`) do not count: only `1e400`-like text does
 * (a string holding that still counts; the walk then finds no number beyond range).
 * The exponent is found by a regex led by `[eE]` (the engine skips ahead to each `e`), the
 * digit before it checked by hand; the run of digits by `hasDigitRun`. Session 6: one
 * `\d[eE]\+?\d{3}|\d{100}` regex tried every position (~0.8 µs for a 230-character frame,
 * ~20 µs for a 7 kB batch of 32 operations).
 */
const EXPONENT_3 = /[eE]\+?\d{3}/g;
/** Digits in a run that `mayHoldNonFinite` counts. */
const DIGIT_RUN = 100;

const isDigit = (c: number) => c >= 0x30 && c <= 0x39;

/**
 * Whether `text` holds `min` (≥ 1) digits in a row, as `/\d{min}/` would say. Looks at the last
 * character of the next window of `min` first, and skips the whole window when it is not a
 * digit (no run of `min` can start in it), so ordinary text costs about one look per `min`
 * characters. @internal exported for tests.
 */
export function hasDigitRun(text: string, min: number): boolean {
  // Invariant: no run of `min` digits starts before `start`.
  let start = 0;
  let end = min - 1;
  while (end < text.length) {
    if (!isDigit(text.charCodeAt(end))) {
      start = end + 1;
    } else {
      let j = end - 1;
      while (j >= start && isDigit(text.charCodeAt(j))) j--;
      if (j < start) return true; // text[start..end] is all digits: `min` of them
      start = j + 1; // every window holding j is out
    }
    end = start + min - 1;
  }
  return false;
}

/**
 * Whether `text` may hold a number beyond a double's range, so that the parsed payload must be
 * walked (`hasNonFinite`). Never `false` for a text holding one. @internal exported for tests.
 */
export function mayHoldNonFinite(text: string): boolean {
  EXPONENT_3.lastIndex = 0;
  for (let m = EXPONENT_3.exec(text); m !== null; m = EXPONENT_3.exec(text)) {
    if (isDigit(text.charCodeAt(m.index - 1))) return true;
    EXPONENT_3.lastIndex = m.index + 1;
  }
  return hasDigitRun(text, DIGIT_RUN);
}

/** Whether `value` holds a number that is not finite (walked with a stack: no recursion). */
function hasNonFinite(value: unknown): boolean {
  const stack: unknown[] = [value];
  while (stack.length > 0) {
    const v = stack.pop();
    if (typeof v === 'number') {
      if (!Number.isFinite(v)) return true;
    } else if (Array.isArray(v)) {
      for (const x of v) stack.push(x);
    } else if (typeof v === 'object' && v !== null) {
      for (const x of Object.values(v)) stack.push(x);
    }
  }
  return false;
}

/**
 * Parse and validate a frame a server received from a client. Never throws, whatever the
 * input: every way a frame can be wrong comes back as `{ ok: false, code, message, id }`
 * (`too_large` over `maxBytes` or with more than `maxBatch` operations, else `bad_request`).
 */
export function parseClientFrame(
  frame: string | Uint8Array,
  opts: ParseOptions = {},
): ParseResult<RequestEnvelope> {
  // Whatever the input, a typed result: anything that throws below (a RangeError from a
  // value nested too deeply to stringify, a decoder failure) is a bad frame like any other.
  try {
    return parseClientFrameUnsafe(frame, opts);
  } catch (err) {
    const message = err instanceof RangeError ? 'frame nests too deeply' : 'frame could not be read';
    return fail('bad_request', message);
  }
}

function parseClientFrameUnsafe(
  frame: string | Uint8Array,
  opts: ParseOptions,
): ParseResult<RequestEnvelope> {
  const max = opts.maxBytes ?? DEFAULT_MAX_PAYLOAD_BYTES;
  const size = typeof frame === 'string' && frame.length > max ? frame.length : byteLength(frame, max);
  if (size > max) return fail('too_large', `frame of ${size} bytes exceeds ${max}`);
  // Before JSON.parse: parsing costs about one allocation per value (~60–200 ms and ~21× the
  // bytes for 1 MiB of `[{},{},…]`), so a payload with more elements than maxBatch is
  // refused from a scan that allocates nothing. n elements take at least 2n − 1 bytes, so
  // frames too short to hold more than maxBatch skip the scan. The scans read the decoded
  // text (a `Buffer`'s `indexOf` crosses into C++ per call, and a byte read through a
  // closure per character cost ~80 µs of a 64-operation SYN: issue 14, session 7).
  const text = decode(frame);
  const maxBatch = opts.maxBatch;
  if (
    maxBatch !== undefined &&
    text.length > 2 * maxBatch + 1 &&
    hasCommas(text, maxBatch) &&
    payloadOver(text, maxBatch)
  ) {
    return fail('too_large', `payload of more than ${maxBatch} elements (maxBatch)`, scannedId(text));
  }
  let raw: unknown;
  // A SUB's channels are parsed as pairs when the text allows it (subChannelsText, FIX3).
  // (`hannels"` rather than `"channels"`: the same frames and more, found ~8× faster, since a
  // search starting with `"` stops at every quote; subChannelsText decides.)
  const pairs = text.includes('hannels"') ? subChannelsText(text) : undefined;
  try {
    raw = JSON.parse(pairs ?? text);
    if (pairs !== undefined) {
      const payload = isObject(raw) && raw.type === 'SUB' && isObject(raw.payload) ? raw.payload : undefined;
      if (payload && Array.isArray(payload.channels)) payload.channels = pairsToMap(payload.channels);
      else raw = JSON.parse(text); // not a SUB: parsed as it is
    }
  } catch {
    try {
      // (The rewritten text is valid JSON exactly when the text is; parsed as it is to be sure.)
      raw = pairs === undefined ? undefined : JSON.parse(text);
      if (raw === undefined) return fail('bad_request', 'frame is not JSON');
    } catch {
      return fail('bad_request', 'frame is not JSON');
    }
  }
  if (!isObject(raw)) return fail('bad_request', 'envelope must be a JSON object');
  const { id, type, payload } = raw;
  if (!validId(id)) return fail('bad_request', `id must be a string of 1–${MAX_ID_LENGTH} characters`);
  if (typeof type !== 'string' || !(MESSAGE_TYPES as readonly string[]).includes(type)) {
    // Only a string is quoted back: stringifying an arbitrary value (400,000 nested arrays)
    // would throw RangeError.
    const shown = typeof type === 'string' ? JSON.stringify(type.slice(0, 40)) : typeof type;
    return fail('bad_request', `unknown type ${shown}`, id);
  }
  switch (type) {
    case 'SYN':
      if (!Array.isArray(payload) || payload.length === 0) {
        return fail('bad_request', 'SYN payload must be a non-empty array', id);
      }
      if (opts.maxBatch !== undefined && payload.length > opts.maxBatch) {
        return fail('too_large', `SYN of ${payload.length} operations exceeds ${opts.maxBatch}`, id);
      }
      // A number beyond a double's range (1e400) parses as ±Infinity, which JSON cannot carry
      // (it would be stored, fingerprinted and published as null): refused (FIX14C). Only
      // texts that could hold one (an exponent of 3 digits or more, or a 100-digit run) are
      // walked, so ordinary frames pay one native scan (`mayHoldNonFinite`).
      if (mayHoldNonFinite(text) && hasNonFinite(payload)) {
        return fail('bad_request', 'a number in the payload is beyond the range of a double', id);
      }
      return { ok: true, envelope: { id, type, payload } };
    case 'PNG':
      return { ok: true, envelope: { id, type } };
    case 'SUB': {
      if (!isObject(payload) || !isObject(payload.channels)) {
        return fail('bad_request', 'SUB payload must be { channels: { name: cursor } }', id);
      }
      const channels = channelRecord<ChannelCursor>();
      const entries =
        payload.channels instanceof Map ? objectOrder(payload.channels) : Object.entries(payload.channels);
      if (entries.length === 0) return fail('bad_request', 'SUB names no channel', id);
      for (const [name, c] of entries) {
        if (!isValidChannel(name)) return fail('bad_request', 'bad channel name', id);
        if (!isObject(c)) return fail('bad_request', `cursor of ${name} must be an object`, id);
        const problem = cursorProblem(c);
        if (problem) return fail('bad_request', `${problem} of ${name}`, id);
        const cursor: ChannelCursor = {};
        if (c.since !== undefined) cursor.since = c.since as number;
        if (c.rewind !== undefined) cursor.rewind = c.rewind as number;
        if (c.epoch !== undefined) cursor.epoch = c.epoch as string;
        if (c.snapshot === true) cursor.snapshot = true;
        channels[name] = cursor;
      }
      return { ok: true, envelope: { id, type, payload: { channels } } };
    }
    case 'UNS': {
      if (!isObject(payload) || !Array.isArray(payload.channels) || !payload.channels.every(isValidChannel)) {
        return fail('bad_request', 'UNS payload must be { channels: [name, …] }', id);
      }
      return { ok: true, envelope: { id, type, payload: { channels: payload.channels as string[] } } };
    }
    default:
      // ACK, NAK and MSG are server-to-client only.
      return fail('bad_request', `a client may not send ${type}`, id);
  }
}

/**
 * Parse and validate a frame a client received from a server. A server that lies (wrong
 * types, unknown `type`, bad `seq`) gets a typed error here, never an exception.
 */
/**
 * A client request as one JSON text: `{ id, type, payload }`, the same text `JSON.stringify`
 * gives. `json`, when given, is `payload` as JSON already (the client serializes each
 * operation once, in `send()`) and is written as it is.
 */
export const encodeRequest = (f: { id: string; type: string; payload?: unknown; json?: string }): string =>
  f.json !== undefined
    ? `{"id":${JSON.stringify(f.id)},"type":${JSON.stringify(f.type)},"payload":${f.json}}`
    : JSON.stringify({ id: f.id, type: f.type, payload: f.payload });

export function parseServerFrame(
  frame: string | Uint8Array,
  opts: ParseOptions = {},
): ParseResult<ServerEnvelope> {
  try {
    const max = opts.maxBytes ?? 64 * DEFAULT_MAX_PAYLOAD_BYTES;
    if (byteLength(frame, max) > max) return fail('too_large', 'frame too large');
    let raw: unknown;
    try {
      raw = JSON.parse(decode(frame));
    } catch {
      return fail('bad_request', 'frame is not JSON');
    }
    return validateServerEnvelope(raw);
  } catch {
    // Never throws, whatever the input (see parseClientFrame).
    return fail('bad_request', 'frame could not be read');
  }
}

/** Validate an already-decoded server envelope (the HTTP transport gets arrays of them). */
export function validateServerEnvelope(raw: unknown): ParseResult<ServerEnvelope> {
  if (!isObject(raw)) return fail('bad_request', 'envelope must be a JSON object');
  const { id, type } = raw;
  switch (type) {
    case 'ACK':
      if (!validId(id)) return fail('bad_request', 'ACK without a valid id');
      return { ok: true, envelope: { id, type } };
    case 'SYN':
      if (!validId(id)) return fail('bad_request', 'SYN without a valid id');
      if (!Array.isArray(raw.payload))
        return fail('bad_request', 'response SYN payload must be an array', id);
      if (raw.published !== undefined) {
        const pubs = raw.published;
        if (!Array.isArray(pubs) || !pubs.every(isPublication))
          return fail('bad_request', 'response SYN published must be [{ channel, seq, epoch }]', id);
        return { ok: true, envelope: { id, type, payload: raw.payload, published: pubs } };
      }
      return { ok: true, envelope: { id, type, payload: raw.payload } };
    case 'NAK': {
      if (id !== null && !validId(id)) return fail('bad_request', 'NAK with a bad id');
      // A code the client does not know is `server_error`, as in a SUB entry's refusal
      // (`channelRefusalOf`); its text is kept in the message (PROTOCOL §2, NAK codes).
      const err = raw.error;
      const code = isObject(err) ? knownNakCode(err.code) : 'server_error';
      let message = isObject(err) && typeof err.message === 'string' ? err.message : 'refused';
      if (isObject(err) && err.code !== undefined && code !== err.code)
        message = `${message} (unknown code ${typeof err.code === 'string' ? err.code.slice(0, 64) : typeof err.code})`;
      return { ok: true, envelope: { id, type, error: { code, message } } };
    }
    case 'MSG': {
      const { channel, seq, epoch } = raw;
      if (!validId(id)) return fail('bad_request', 'MSG without a valid id');
      if (!isValidChannel(channel)) return fail('bad_request', 'MSG with a bad channel', id);
      if (!isSeq(seq) || seq < 1) return fail('bad_request', 'MSG seq must be an integer ≥ 1', id);
      if (typeof epoch !== 'string') return fail('bad_request', 'MSG epoch must be a string', id);
      const env: MsgEnvelope = { id, type, channel, seq, epoch, payload: raw.payload };
      if (raw.replay === true) env.replay = true;
      if (raw.echo === true) env.echo = true;
      // A payload-less echo has no payload at all (not `payload: undefined`).
      if (!('payload' in raw)) delete env.payload;
      return { ok: true, envelope: env };
    }
    case 'UNS': {
      if (!validId(id)) return fail('bad_request', 'UNS without a valid id');
      const p = raw.payload;
      if (!isObject(p) || !Array.isArray(p.channels) || !p.channels.every(isValidChannel))
        return fail('bad_request', 'server UNS payload must be { channels: [name, …] }', id);
      const err = raw.error;
      const code =
        isObject(err) &&
        (err.code === 'unsubscribed' || (NAK_CODES as readonly string[]).includes(err.code as string))
          ? (err.code as NakCode | 'unsubscribed')
          : 'forbidden';
      const message = isObject(err) && typeof err.message === 'string' ? err.message : 'revoked';
      return {
        ok: true,
        envelope: { id, type, payload: { channels: p.channels as string[] }, error: { code, message } },
      };
    }
    default:
      return fail(
        'bad_request',
        `unexpected type from server: ${typeof type === 'string' ? type.slice(0, 20) : typeof type}`,
        validId(id) ? id : null,
      );
  }
}

function isPublication(v: unknown): v is Publication {
  return (
    isObject(v) &&
    isValidChannel(v.channel) &&
    isSeq(v.seq) &&
    (v.seq as number) >= 1 &&
    typeof v.epoch === 'string'
  );
}

/** Wire text already made for an envelope of `ENCODED_MIN_CHARS` or more, by `encodeOnce`. */
const encoded = new WeakMap<object, string>();
/**
 * Texts shorter than this are not kept in `encoded`: a `WeakMap` entry per response cost more
 * (~1–2 µs, measured) than encoding a small envelope again; the last one `encodeOnce` made is
 * kept (`lastEnvelope`), which is the one sent next in the usual case.
 */
const ENCODED_MIN_CHARS = 1024;
/** The envelope `encodeOnce` encoded last, and its text (one entry: bounded memory). */
let lastEnvelope: object | undefined;
let lastText = '';

/**
 * Serialize an envelope for the wire: `JSON.stringify`, or the text `encodeOnce` already made
 * for this very object (which must not have changed since).
 */
export const encode = (env: Envelope | Envelope[]): string =>
  env === lastEnvelope ? lastText : (encoded.get(env) ?? JSON.stringify(env));

/**
 * Serialize an envelope and remember the text for later `encode` calls on the same object, so
 * a response checked for JSON-ness, measured for the dedupe memory and sent is encoded once
 * (a small one: as long as it is the last one encoded). Throws like `JSON.stringify`. The
 * envelope must not be changed afterwards.
 */
export function encodeOnce(env: Envelope): string {
  if (env === lastEnvelope) return lastText;
  let text = encoded.get(env);
  if (text === undefined) {
    text = JSON.stringify(env);
    if (text.length >= ENCODED_MIN_CHARS) encoded.set(env, text);
  }
  lastEnvelope = env;
  lastText = text;
  return text;
}

/** A `NAK` envelope. */
export const nak = (id: string | null, code: NakCode, message: string): NakEnvelope => ({
  id,
  type: 'NAK',
  error: { code, message },
});

/**
 * Random bytes from the platform's crypto (`crypto.getRandomValues`), drawn from a pool of
 * `ENTROPY_POOL` bytes refilled in one call when used up: one call per id crossed into the
 * platform's C++ each time (~15–35 µs per client created, on a loaded machine), as Node's
 * own `randomUUID` avoids with its cache. Each byte is handed out once.
 */
const ENTROPY_POOL = 1024;
let pool: Uint8Array | undefined;
let poolAt = ENTROPY_POOL;

function entropy(bytes: number): Uint8Array {
  if (bytes > ENTROPY_POOL) return globalThis.crypto.getRandomValues(new Uint8Array(bytes));
  if (pool === undefined || poolAt + bytes > ENTROPY_POOL) {
    pool ??= new Uint8Array(ENTROPY_POOL);
    globalThis.crypto.getRandomValues(pool);
    poolAt = 0;
  }
  const out = pool.subarray(poolAt, poolAt + bytes);
  poolAt += bytes;
  return out;
}

/** A random identifier, URL-safe, from the platform's crypto: `<prefix>-` and `bytes` random bytes. */
export function randomId(prefix = 'c', bytes = 9): string {
  const buf = entropy(bytes);
  let s = '';
  for (let i = 0; i < buf.length; i++) s += buf[i]!.toString(36).padStart(2, '0');
  return `${prefix}-${s}`;
}

/** HTTP status a `NAK` code maps to on the HTTP transport. */
export const HTTP_STATUS_OF: Record<NakCode, number> = {
  bad_request: 400,
  too_large: 413,
  forbidden: 403,
  unauthorized: 401,
  rate_limited: 429,
  server_error: 500,
  client_id_taken: 409,
  id_reused: 422,
  result_not_kept: 410,
  too_many_channels: 429,
  too_many_clients: 503,
};
