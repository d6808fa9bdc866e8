/**
 * Exactly-once processing of `SYN`s (PROTOCOL §3 rules 3 and 4): remembers each
 * `(principal, clientId, SYN id)` with the fingerprint of its payload and its response, on
 * either transport, and runs one client's batches one at a time in arrival order.
 *
 * A known key whose payload fingerprint (SHA-256 of the payload's JSON; in this process's own
 * memory, the JSON itself when short: `localFingerprint`) differs is refused
 * `NAK id_reused`, whether the first copy is finished or still in flight: a request is never
 * answered with another's result (idempotency keys at Stripe work the same way).
 *
 * Memory stays bounded in count and bytes: remembered responses by age (`windowMs`), count
 * (`maxEntries`) and bytes (`maxBytes`: responses are kept as their JSON text, so the bytes
 * counted are the bytes held, and decoded again on replay); a response over `maxResponseBytes` is kept as its
 * fingerprint only, and under byte pressure responses are reduced to fingerprints before any
 * entry is dropped. Under either cap, eviction takes from the largest holder first (the key
 * the client's limits count under), oldest first within it (`shed`, stores/evict.ts; FIX14C):
 * one principal's flood evicts its own answers. A replay of an id whose response was not kept
 * is answered `NAK result_not_kept` ("applied, result not kept"). A NAK marked
 * `notRemembered` (onSync threw) is answered but not kept. Per-client queues are dropped when
 * idle, queued batches per client capped.
 *
 * When given a `DedupeStore` (`claim/complete/release`, e.g. a store shared by several server
 * processes), it is the memory of record, so a retry that lands on another process is still
 * answered from the first one's response; the store gets the limits with each `complete`.
 * Without one, the in-process map is the memory.
 */

import { createHash, type Hash, hash as oneShotHash } from 'node:crypto';
import { encode, type NakEnvelope, nak, type SynEnvelope } from '../protocol/index.js';
import { evictionSlack, shed } from '../stores/evict.js';
import type { DedupeClaim, DedupeLimits, DedupeStore } from '../stores/types.js';

export type SynResponse = SynEnvelope | NakEnvelope;

export interface DedupeOptions {
  windowMs: number;
  maxEntries: number;
  /** Most bytes of remembered responses (UTF-8 JSON) plus per-entry overhead. */
  maxBytes: number;
  /** A response larger than this (UTF-8 JSON bytes) is remembered as its fingerprint only. */
  maxResponseBytes: number;
  maxQueuedPerClient: number;
  /** The shared or durable memory of record; `undefined` keeps dedupe in this process. */
  store: DedupeStore | undefined;
  /** Where failures of the store's dedupe calls are reported. */
  onError: (err: unknown, where: string) => void;
  now?: () => number;
}

interface Remembered {
  /** Fingerprint of the request's payload. */
  fp: string;
  /**
   * The response as its JSON text, absent when not kept (too large, or reduced under byte
   * pressure). Kept encoded, not as the live object: a parsed response can take many times
   * its JSON size on the heap (issue 12: 221 MiB of heap at a 64 MiB cap), a flat string
   * takes what `bytes` counts. Decoded again on replay.
   */
  text: string | undefined;
  at: number;
  /** What this entry counts against `maxBytes`. */
  bytes: number;
  /** Whose entries it counts among (`Holder`): eviction takes from the largest first. */
  holder: Holding;
  /** Its key in `done` (what eviction drops). */
  key: string;
  /** Its holder's entries, oldest first: the one before and after it (`Holding.first`). */
  prev: Remembered | undefined;
  next: Remembered | undefined;
  /** Its holder's entries still holding their response, oldest first (`Holding.firstKept`). */
  prevKept: Remembered | undefined;
  nextKept: Remembered | undefined;
}

/**
 * What one holder (the key its client's limits count under: `p:<principalKey>`, `a:<address>`
 * or `c:<clientId>`) has remembered: its entries oldest first, those still holding their
 * response oldest first, and their count and bytes. Under the caps, eviction takes from the
 * largest holder first (FIX14C): a flooding principal evicts its own answers, not another's.
 */
interface Holding {
  name: string;
  /**
   * Its entries, oldest first, as a list threaded through them (`Remembered.prev`/`next`),
   * and those still holding their response (`prevKept`/`nextKept`). Lists, not `Set`s of
   * keys (session 6): appending and unlinking touch the entry and its neighbours only, where
   * two more hash tables as large as `done` were written and read per batch (~2 µs of a
   * 1-in-flight operation's server CPU, in situ).
   */
  first: Remembered | undefined;
  last: Remembered | undefined;
  firstKept: Remembered | undefined;
  lastKept: Remembered | undefined;
  /** How many entries, and how many of them hold their response. */
  count: number;
  kept: number;
  bytes: number;
}

/** Append `e` to its holder's entries. */
function link(h: Holding, e: Remembered): void {
  e.prev = h.last;
  e.next = undefined;
  if (h.last) h.last.next = e;
  else h.first = e;
  h.last = e;
  h.count++;
}

/** Take `e` out of its holder's entries. */
function unlink(h: Holding, e: Remembered): void {
  if (e.prev) e.prev.next = e.next;
  else h.first = e.next;
  if (e.next) e.next.prev = e.prev;
  else h.last = e.prev;
  e.prev = e.next = undefined;
  h.count--;
}

/** Append `e` to its holder's entries holding their response. */
function linkKept(h: Holding, e: Remembered): void {
  e.prevKept = h.lastKept;
  e.nextKept = undefined;
  if (h.lastKept) h.lastKept.nextKept = e;
  else h.firstKept = e;
  h.lastKept = e;
  h.kept++;
}

/** Take `e` out of its holder's entries holding their response (when it is among them). */
function unlinkKept(h: Holding, e: Remembered): void {
  if (e.text === undefined) return;
  if (e.prevKept) e.prevKept.nextKept = e.nextKept;
  else h.firstKept = e.nextKept;
  if (e.nextKept) e.nextKept.prevKept = e.prevKept;
  else h.lastKept = e.prevKept;
  e.prevKept = e.nextKept = undefined;
  h.kept--;
}

/** What the server stores in a `DedupeStore`: the fingerprint, and the response when kept. */
export interface StoredAnswer {
  f: string;
  r?: SynResponse;
}

/**
 * Bytes an entry costs besides its key and response text: the fingerprint string (43
 * characters), the entry object, its two Map/Set slots. Measured on Node 22 (about 230 bytes
 * with V8's hidden classes and hash-table slack); rounded up. Session 6 (the holder's Sets
 * became links in the entry): about 220 bytes measured on Node 20 (263 before), still under.
 */
const ENTRY_OVERHEAD = 256;

/** A character outside Latin-1 (one regex object for every call, not one per call). */
// biome-ignore lint/suspicious/noControlCharactersInRegex: the whole Latin-1 range is meant
const NON_LATIN1 = /[^\u0000-\u00ff]/;

/**
 * Heap bytes of a flat V8 string: one byte per character when every character fits in
 * Latin-1, else two (V8 then stores UTF-16), plus the string header. `utf8Bytes`, when the
 * caller knows it: its UTF-8 size, which equals its length exactly when it is all ASCII
 * (then no scan is needed).
 */
export function stringBytes(s: string, utf8Bytes?: number): number {
  if (utf8Bytes === s.length) return 16 + s.length;
  return 16 + (NON_LATIN1.test(s) ? 2 * s.length : s.length);
}

/** Characters of fingerprint text gathered before they are hashed (bounds that string). */
const FP_CHUNK = 64 * 1024;

const CLOSE_ARRAY = Symbol('close array');
const CLOSE_OBJECT = Symbol('close object');
class MemberName {
  constructor(readonly name: string) {}
}

/**
 * SHA-256 of the payload's JSON, base64url: what makes "the same request" (`id_reused`).
 * Walked with an explicit stack, not `JSON.stringify`, so that a payload nested deeper than
 * the call stack (the parser accepts what fits in `maxPayloadBytes`) is hashed, not thrown on.
 * Equal to hashing the JSON text with a `,` after every element and member.
 */
export function fingerprint(payload: unknown): string {
  // Created only when the text passes `FP_CHUNK`: a small operation (the usual case) is
  // hashed in one call (`crypto.hash`, Node ≥ 20.12), without a `Hash` object and three
  // crossings into C++. The digest is that of the same text either way.
  let hash: Hash | undefined;
  // The text is gathered in a string and handed to the hash in chunks of about
  // `FP_CHUNK` characters: one `update` per token crossed into C++ for every token and was
  // most of the cost of a small operation. The digest is that of the same text, so
  // fingerprints are unchanged (shared stores keep matching across versions).
  let text = '';
  const stack: unknown[] = [payload];
  while (stack.length > 0) {
    const v = stack.pop();
    if (typeof v === 'symbol') {
      text += v === CLOSE_ARRAY ? '],' : '},';
    } else if (v instanceof MemberName) {
      text += `${JSON.stringify(v.name)}:`;
    } else if (Array.isArray(v)) {
      text += '[';
      stack.push(CLOSE_ARRAY);
      for (let i = v.length - 1; i >= 0; i--) stack.push(v[i]);
    } else if (typeof v === 'object' && v !== null) {
      text += '{';
      stack.push(CLOSE_OBJECT);
      const entries = Object.entries(v);
      for (let i = entries.length - 1; i >= 0; i--) {
        stack.push(entries[i]![1]);
        stack.push(new MemberName(entries[i]![0]));
      }
    } else {
      text += `${JSON.stringify(v) ?? 'null'},`;
    }
    if (text.length >= FP_CHUNK) {
      hash ??= createHash('sha256');
      hash.update(text);
      text = '';
    }
  }
  if (hash === undefined) return oneShotHash('sha256', text, 'base64url');
  hash.update(text);
  return hash.digest('base64url');
}

/**
 * Longest payload JSON (UTF-16 code units) `localFingerprint` keeps as it is; longer ones are
 * hashed. At most 256 + 16 bytes per remembered entry, counted against `maxBytes`.
 */
export const LOCAL_FP_MAX_CHARS = 256;

/**
 * What tells two payloads apart in this process's dedupe memory (never stored elsewhere, so
 * its form may change between versions; the shared stores' `fingerprint` may not): the
 * payload's JSON text (`JSON.stringify`) when it is at most `LOCAL_FP_MAX_CHARS` UTF-16 code
 * units (a small operation, the usual case: no SHA-256 per batch), else the SHA-256 of that
 * text, base64url (43 characters). Equal exactly when the payloads' JSON texts are equal: a
 * SYN payload's text starts with `[`, which no base64url digest holds, so the two forms
 * never meet.
 *
 * `JSON.stringify` throws `RangeError` for a payload nested deeper than the stack left at the
 * call (the parser accepts what fits in `maxPayloadBytes`), and the stack left differs between
 * a batch answered in the same turn and one run later. Such a payload is walked instead
 * (`jsonDigest`), hashing the very text `JSON.stringify` would have made, so the same payload
 * gets the same fingerprint whatever the stack (its text is then far longer than the bound).
 * Session 6: the long form was `fingerprint(payload)` (a second walk of the payload, token by
 * token, after the `JSON.stringify` that measured it); it is now one hash of that text.
 */
export function localFingerprint(payload: unknown): string {
  let text: string | undefined;
  try {
    text = JSON.stringify(payload);
  } catch (err) {
    if (!(err instanceof RangeError)) throw err;
    return jsonDigest(payload);
  }
  if (text === undefined) return 'undefined'; // not a JSON value (never a parsed payload)
  return text.length <= LOCAL_FP_MAX_CHARS ? text : oneShotHash('sha256', text, 'base64url');
}

/** Marks, on `jsonDigest`'s stack, the end of a container. */
const END_ARRAY = Symbol('end array');
const END_OBJECT = Symbol('end object');
/** Marks, on `jsonDigest`'s stack, that a `,` goes before the next item. */
const COMMA = Symbol('comma');

/** A member's key and value, on `jsonDigest`'s stack (written `"key":value`). */
class Member {
  constructor(
    readonly key: string,
    readonly value: unknown,
  ) {}
}

/** Whether `JSON.stringify` leaves `v` out of an object (and writes `null` for it in an array). */
const omitted = (v: unknown) => v === undefined || typeof v === 'function' || typeof v === 'symbol';

/**
 * `v` as `JSON.stringify` serializes it under `key` (ECMA-262 SerializeJSONProperty): its
 * `toJSON(key)` result when it has one, boxed primitives unboxed. A parsed payload has
 * neither, so this returns `v` itself there.
 */
function jsonValueOf(v: unknown, key: string): unknown {
  if (typeof v !== 'object' || v === null) return v;
  const toJSON = (v as { toJSON?: unknown }).toJSON;
  if (typeof toJSON === 'function') v = toJSON.call(v, key);
  if (v instanceof Number) return Number(v);
  if (v instanceof String) return String(v);
  if (v instanceof Boolean) return v.valueOf();
  return v;
}

/**
 * SHA-256 (base64url) of exactly the text `JSON.stringify(value)` makes, made with an
 * explicit stack (no recursion: any depth the heap holds), hashed in chunks of about
 * `FP_CHUNK` characters cut between tokens (so never inside a surrogate pair: the digest is
 * that of the whole text's UTF-8). Follows `JSON.stringify`'s rules (ECMA-262 §25.5.2): key
 * order of `Object.keys` (`__proto__` own keys included), members whose value is `undefined`,
 * a function or a symbol left out (`null` in arrays), non-finite numbers as `null`, `-0` as
 * `0`, `toJSON` and boxed primitives. Throws `TypeError` for a `bigint` as `JSON.stringify`
 * does; a cyclic value (never a parsed payload) is not detected. @internal exported for tests.
 */
export function jsonDigest(value: unknown): string {
  const hash = createHash('sha256');
  let text = '';
  const top = jsonValueOf(value, '');
  const stack: unknown[] = [omitted(top) ? null : top];
  while (stack.length > 0) {
    let v = stack.pop();
    if (v === COMMA) {
      text += ',';
      continue;
    }
    if (v === END_ARRAY) {
      text += ']';
      continue;
    }
    if (v === END_OBJECT) {
      text += '}';
      continue;
    }
    if (v instanceof Member) {
      text += `${JSON.stringify(v.key)}:`;
      v = v.value;
    }
    if (Array.isArray(v)) {
      text += '[';
      stack.push(END_ARRAY);
      for (let i = v.length - 1; i >= 0; i--) {
        const item = jsonValueOf(v[i], String(i));
        stack.push(omitted(item) ? null : item);
        if (i > 0) stack.push(COMMA);
      }
    } else if (typeof v === 'object' && v !== null) {
      text += '{';
      stack.push(END_OBJECT);
      const keys = Object.keys(v);
      const members: Member[] = [];
      for (const key of keys) {
        const item = jsonValueOf((v as Record<string, unknown>)[key], key);
        if (!omitted(item)) members.push(new Member(key, item));
      }
      for (let i = members.length - 1; i >= 0; i--) {
        stack.push(members[i]);
        if (i > 0) stack.push(COMMA);
      }
    } else {
      // A scalar: JSON.stringify's own text for it (non-finite numbers are `null`).
      text += JSON.stringify(v) ?? 'null';
    }
    if (text.length >= FP_CHUNK) {
      hash.update(text);
      text = '';
    }
  }
  hash.update(text);
  return hash.digest('base64url');
}

/** Heap bytes a remembered fingerprint takes beyond the 43-character digest `ENTRY_OVERHEAD` counts. */
const fpExtraBytes = (fp: string) => (fp.length > 43 ? stringBytes(fp) : 0);

const idReused = (id: string) =>
  nak(id, 'id_reused', 'this request id was used before with a different payload; use a new id');
const notKept = (id: string) =>
  nak(id, 'result_not_kept', 'this request was applied before; its result was not kept');

/** Responses `notRemembered` marked: answered, but not kept as their id's answer. */
const UNREMEMBERED = new WeakSet<object>();

/**
 * Mark `response` as not to be remembered as its id's answer (FIX14C, PROTOCOL §2
 * `server_error`): a NAK for a batch whose `onSync` threw or rejected (an `onSync` is
 * all-or-nothing, README, so a throw applied nothing and a retry runs it again: it may pass),
 * or one refused before `onSync` ran (the server closing). Returns `response`.
 */
export function notRemembered<T extends object>(response: T): T {
  UNREMEMBERED.add(response);
  return response;
}

/** How often a process polls a shared store for a duplicate another process is processing. */
const POLL_MS = 20;

/** Whether `v` is a promise (what `process` returns when it does not answer at once). */
const isPromise = <T>(v: T | Promise<T>): v is Promise<T> =>
  typeof (v as { then?: unknown } | null)?.then === 'function';

/** The settled promise an idle client's queue starts from. */
const SETTLED: Promise<unknown> = Promise.resolve();

const sleep = (ms: number) =>
  new Promise<void>((resolve) => {
    setTimeout(resolve, ms).unref?.();
  });

export class Dedupe {
  /** Every remembered entry, oldest first (expired ones are at the front). */
  private readonly done = new Map<string, Remembered>();
  /** Each holder's entries (see `Holding`); a holder with none is removed. */
  private readonly holders = new Map<string, Holding>();
  private bytes = 0;
  /** Batches being processed or queued in this process, so duplicates share one promise. */
  private readonly inflight = new Map<string, { fp: string; promise: Promise<SynResponse> }>();
  private readonly queues = new Map<string, { tail: Promise<unknown>; size: number }>();
  private readonly now: () => number;
  private closed = false;
  /** Set by `stop()`: batches not started yet are answered `server_error` and not run. */
  private stopping = false;
  /** Batches whose processing started (onSync running, or its response being stored). */
  private readonly running = new Set<Promise<unknown>>();

  constructor(private readonly opts: DedupeOptions) {
    this.now = opts.now ?? Date.now;
  }

  /** Remembered responses held in this process (bounded by `maxEntries`). */
  get size(): number {
    return this.done.size;
  }

  /** Bytes the remembered entries count against `maxBytes`. */
  get sizeBytes(): number {
    return this.bytes;
  }

  /** clientIds with batches queued or running. */
  activeClientIds(): IterableIterator<string> {
    return this.queues.keys();
  }

  /**
   * Answer a `SYN` of `owner` (the principal's key, see identity.ts): the remembered response
   * of a duplicate, `NAK id_reused` for a known id with another payload, `NAK result_not_kept`
   * for a duplicate whose response was not kept, or `process(ops)` run in this client's turn.
   * The response itself when it is known in this turn (a refusal, a remembered answer, or a
   * `process` that answered synchronously with nothing of the client's queued), else a
   * promise of it. Never throws or rejects: `process` is expected to turn its own failures
   * into NAKs, marked `notRemembered` when a retry should run it again (one that throws or
   * rejects anyway is answered `server_error`, not remembered either).
   */
  run(
    owner: string,
    clientId: string,
    syn: SynEnvelope,
    process: () => SynResponse | Promise<SynResponse>,
    holder: string = owner,
  ): SynResponse | Promise<SynResponse> {
    // Length-prefixed so that no (owner, clientId, id) triple can collide with another.
    const key = `${owner.length}:${owner}:${clientId.length}:${clientId}:${syn.id}`;
    const shared = this.opts.store;
    // A shared store compares fingerprints made by other processes and versions: SHA-256.
    // In this process, the cheaper `localFingerprint` tells payloads apart as well.
    const fp = shared ? fingerprint(syn.payload) : localFingerprint(syn.payload);
    const running = this.inflight.get(key);
    if (running) return running.fp === fp ? running.promise : idReused(syn.id);
    const known = this.lookup(key);
    if (known) return answerText(syn.id, known.fp, known.text, fp);

    const queue = this.queues.get(clientId);
    if (queue && queue.size >= this.opts.maxQueuedPerClient) {
      // Not remembered: the batch was refused before processing, a later retry may pass.
      return nak(syn.id, 'rate_limited', 'too many batches queued for this client');
    }
    let promise: Promise<SynResponse>;
    if (queue) {
      queue.size++;
      const result = queue.tail.then(() => this.start(key, fp, syn, process, holder));
      promise = result.then(
        (response) => this.settled(key, fp, response, holder),
        (err: unknown) => this.failed(key, syn.id, err),
      );
      queue.tail = promise.then(() => this.dequeue(clientId, queue));
    } else {
      // Nothing of this client's is queued or running (the usual case: one batch in flight):
      // started now, in this turn, not a microtask later behind an empty queue.
      if (this.stopping) return nak(syn.id, 'server_error', 'server is shutting down');
      let out: SynResponse | Promise<SynResponse>;
      try {
        out = shared ? this.runShared(shared, key, fp, syn, process, holder) : process();
      } catch (err) {
        return this.failed(key, syn.id, err);
      }
      // Answered in this very turn (a synchronous onSync): nothing ran meanwhile, so nothing
      // was queued behind it or could see it in flight; remembered, and answered as it is.
      if (!isPromise(out)) return this.settled(key, fp, out, holder);
      const started = Promise.resolve(out);
      this.track(started);
      // Its queue entry makes the client's batches arriving meanwhile wait for it.
      const q = { tail: SETTLED, size: 1 };
      this.queues.set(clientId, q);
      promise = started.then(
        (response) => {
          this.dequeue(clientId, q);
          return this.settled(key, fp, response, holder);
        },
        (err: unknown) => {
          this.dequeue(clientId, q);
          return this.failed(key, syn.id, err);
        },
      );
      q.tail = promise;
    }
    this.inflight.set(key, { fp, promise });
    return promise;
  }

  /** Start processing a batch (its turn came); counted in `running` until it settles. */
  private start(
    key: string,
    fp: string,
    syn: SynEnvelope,
    process: () => SynResponse | Promise<SynResponse>,
    holder: string,
  ): Promise<SynResponse> {
    // Queued behind others when the server began to close: left for the client to resend.
    if (this.stopping) return Promise.resolve(nak(syn.id, 'server_error', 'server is shutting down'));
    const shared = this.opts.store;
    const started = shared
      ? this.runShared(shared, key, fp, syn, process, holder)
      : Promise.resolve(process());
    this.track(started);
    return started;
  }

  /** Count `started` in `running` (what `drain` waits for) until it settles. */
  private track(started: Promise<SynResponse>): void {
    this.running.add(started);
    started.then(
      () => this.running.delete(started),
      () => this.running.delete(started),
    );
  }

  /** A batch was answered: no longer in flight, and remembered (without a shared store). */
  private settled(key: string, fp: string, response: SynResponse, holder: string): SynResponse {
    this.inflight.delete(key);
    if (!this.opts.store && !UNREMEMBERED.has(response)) this.remember(key, fp, response, holder);
    return response;
  }

  /** A batch failed: not remembered, since nothing says whether it was applied (a retry decides). */
  private failed(key: string, id: string, err: unknown): SynResponse {
    this.inflight.delete(key);
    this.opts.onError(err, 'dedupe');
    return nak(id, 'server_error', 'internal error');
  }

  /** Drop expired responses; called on a timer so idle memory shrinks too. */
  sweep(): void {
    const cutoff = this.now() - this.opts.windowMs;
    // Map order is insertion order and entries are inserted at completion, so expired
    // entries are all at the front.
    for (const [key, entry] of this.done) {
      if (entry.at > cutoff) break;
      this.drop(key, entry);
    }
  }

  /**
   * Start no new batch: those still queued (and any that arrive) are answered `server_error`
   * without running, and not remembered, so the client resends them to the next server.
   * Batches already running go on; `drain` waits for them.
   */
  stop(): void {
    this.stopping = true;
  }

  /**
   * Resolves once every batch that had started when called has finished, its response
   * stored in the dedupe store, or after `timeoutMs`, whichever comes first; `true` when all
   * finished in time.
   */
  async drain(timeoutMs: number): Promise<boolean> {
    if (this.running.size === 0) return true;
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timedOut = new Promise<false>((resolve) => {
      timer = setTimeout(() => resolve(false), timeoutMs);
    });
    const all = Promise.allSettled([...this.running]).then(() => true as const);
    try {
      return await Promise.race([all, timedOut]);
    } finally {
      clearTimeout(timer);
    }
  }

  /** Batches running now (started and not finished). */
  get runningCount(): number {
    return this.running.size;
  }

  /** Stop polling shared stores; batches still queued are answered `server_error`. */
  close(): void {
    this.stopping = true;
    this.closed = true;
    this.done.clear();
    this.holders.clear();
    this.bytes = 0;
  }

  private lookup(key: string): Remembered | undefined {
    const entry = this.done.get(key);
    if (!entry) return undefined;
    if (entry.at <= this.now() - this.opts.windowMs) {
      this.drop(key, entry);
      return undefined;
    }
    return entry;
  }

  private drop(key: string, entry: Remembered): void {
    this.done.delete(key);
    const h = entry.holder;
    unlinkKept(h, entry);
    unlink(h, entry);
    h.bytes -= entry.bytes;
    this.bytes -= entry.bytes;
    if (h.count === 0 && this.holders.get(h.name) === h) this.holders.delete(h.name);
  }

  /** Reduce a kept response to its fingerprint (a replay of it is still known as applied). */
  private reduce(key: string, entry: Remembered): void {
    const reduced = ENTRY_OVERHEAD + stringBytes(key) + fpExtraBytes(entry.fp);
    const freed = entry.bytes - reduced;
    entry.bytes = reduced;
    entry.holder.bytes -= freed;
    this.bytes -= freed;
    unlinkKept(entry.holder, entry);
    entry.text = undefined;
  }

  /**
   * Keep the caps (FIX14C): past `maxEntries`, drop entries of the holders with the most,
   * oldest first, down to a slack below the cap; past `maxBytes`, reduce the responses of the
   * holders with the most bytes to fingerprints, oldest first, then drop whole entries the
   * same way if fingerprints alone exceed it. Holders are levelled from the top (`shed`): one
   * is taken from only while it holds more than the others taken from, so one with few
   * entries keeps them while anyone holds more. One scan and sort of the holders per
   * `evictionSlack` entries or bytes, not per completion.
   */
  private evict(): void {
    const { maxEntries, maxBytes } = this.opts;
    if (this.done.size > maxEntries) {
      shed(
        this.holders.values(),
        (h) => h.count,
        this.done.size - maxEntries + evictionSlack(maxEntries),
        (h) => {
          const e = h.first!;
          this.drop(e.key, e);
          return 1;
        },
      );
    }
    if (this.bytes > maxBytes) {
      const need = () => this.bytes - maxBytes + evictionSlack(maxBytes);
      const withResponses = [...this.holders.values()].filter((h) => h.kept > 0);
      shed(
        withResponses,
        (h) => h.bytes,
        need(),
        (h) => {
          const e = h.firstKept;
          if (e === undefined) return 0;
          const before = this.bytes;
          this.reduce(e.key, e);
          return before - this.bytes;
        },
      );
      if (this.bytes > maxBytes) {
        shed(
          this.holders.values(),
          (h) => h.bytes,
          need(),
          (h) => {
            const e = h.first;
            if (e === undefined) return 0;
            const before = this.bytes;
            this.drop(e.key, e);
            return before - this.bytes;
          },
        );
      }
    }
  }

  /** Remembered entries and bytes per holder (for tests and stats): name → count, bytes. */
  holdings(): Map<string, { entries: number; bytes: number; kept: number; keys: string[] }> {
    const out = new Map<string, { entries: number; bytes: number; kept: number; keys: string[] }>();
    for (const h of this.holders.values()) {
      const keys: string[] = [];
      for (let e = h.first; e !== undefined; e = e.next) keys.push(e.key);
      out.set(h.name, { entries: h.count, bytes: h.bytes, kept: h.kept, keys });
    }
    return out;
  }

  private remember(key: string, fp: string, response: SynResponse, holderName: string): void {
    // While closing, this memory is about to go: a shutdown NAK must not be kept as an answer.
    if (this.closed || this.stopping) return;
    const old = this.done.get(key);
    if (old) this.drop(key, old);
    const text = encodeResponse(response);
    // The cap is on the response's UTF-8 size (what the stores keep, what the docs promise);
    // the memory counted is the string's size on the heap.
    const utf8 = text === undefined ? Number.POSITIVE_INFINITY : Buffer.byteLength(text);
    const kept = text !== undefined && utf8 <= this.opts.maxResponseBytes;
    const base = ENTRY_OVERHEAD + stringBytes(key) + fpExtraBytes(fp);
    let holder = this.holders.get(holderName);
    if (!holder) {
      holder = {
        name: holderName,
        first: undefined,
        last: undefined,
        firstKept: undefined,
        lastKept: undefined,
        count: 0,
        kept: 0,
        bytes: 0,
      };
      this.holders.set(holderName, holder);
    }
    const entry: Remembered = {
      fp,
      text: kept ? text : undefined,
      at: this.now(),
      bytes: base + (kept ? stringBytes(text, utf8) : 0),
      holder,
      key,
      prev: undefined,
      next: undefined,
      prevKept: undefined,
      nextKept: undefined,
    };
    this.done.set(key, entry);
    link(holder, entry);
    if (kept) linkKept(holder, entry);
    holder.bytes += entry.bytes;
    this.bytes += entry.bytes;
    this.sweep();
    this.evict();
  }

  private dequeue(clientId: string, q: { size: number }): void {
    q.size--;
    if (q.size === 0 && this.queues.get(clientId) === q) this.queues.delete(clientId);
  }

  private async runShared(
    store: DedupeStore,
    key: string,
    fp: string,
    syn: SynEnvelope,
    process: () => SynResponse | Promise<SynResponse>,
    holder: string,
  ): Promise<SynResponse> {
    const deadline = this.now() + this.opts.windowMs;
    const limits: DedupeLimits = { maxEntries: this.opts.maxEntries, maxBytes: this.opts.maxBytes, holder };
    for (;;) {
      if (this.closed || this.stopping) return nak(syn.id, 'server_error', 'server is shutting down');
      let claim: DedupeClaim;
      try {
        claim = await store.claim(key, this.opts.windowMs);
      } catch (err) {
        this.opts.onError(err, 'store.claim');
        return nak(syn.id, 'server_error', 'dedupe store unavailable');
      }
      if (claim.status === 'done') {
        const stored = claim.response as Partial<StoredAnswer> | null;
        if (typeof stored?.f !== 'string') return notKept(syn.id); // not written by this server
        return answer(syn.id, stored.f, stored.r, fp);
      }
      if (claim.status === 'new') {
        if (this.stopping) {
          // The server began to close while the claim was being taken: do not start now.
          await store.release?.(key).catch((e: unknown) => this.opts.onError(e, 'store.release'));
          return nak(syn.id, 'server_error', 'server is shutting down');
        }
        let response: SynResponse;
        try {
          response = await process();
        } catch (err) {
          await store.release?.(key).catch((e: unknown) => this.opts.onError(e, 'store.release'));
          throw err;
        }
        if (UNREMEMBERED.has(response)) {
          // onSync threw (nothing applied, README): the claim is dropped, a retry runs it again.
          await store.release?.(key).catch((e: unknown) => this.opts.onError(e, 'store.release'));
          return response;
        }
        const stored: StoredAnswer = { f: fp };
        if (responseBytes(response) <= this.opts.maxResponseBytes) stored.r = response;
        try {
          await store.complete(key, stored, this.opts.windowMs, limits);
        } catch (err) {
          // The batch was applied; answering it still beats a retry that fails the same way.
          this.opts.onError(err, 'store.complete');
        }
        return response;
      }
      // Another process holds the claim: wait for its response (and then compare fingerprints).
      if (this.now() > deadline) return nak(syn.id, 'server_error', 'duplicate still being processed');
      await sleep(POLL_MS);
    }
  }
}

/** A response's JSON text; `undefined` when it cannot be encoded here (too deep). */
function encodeResponse(response: SynResponse): string | undefined {
  try {
    // The text the dispatcher already made for it when it did (encodeOnce), else made here.
    return encode(response);
  } catch {
    // Too deep to encode here: not kept (the transport encodes it on its own terms).
    return undefined;
  }
}

/** UTF-8 bytes of a response's JSON. */
function responseBytes(response: SynResponse): number {
  const text = encodeResponse(response);
  return text === undefined ? Number.POSITIVE_INFINITY : Buffer.byteLength(text);
}

/** `answer` for a response kept as JSON text: decoded only when it is the same request. */
function answerText(id: string, storedFp: string, text: string | undefined, fp: string): SynResponse {
  if (storedFp !== fp) return idReused(id);
  if (text === undefined) return notKept(id);
  return JSON.parse(text) as SynResponse;
}

/** What a duplicate gets: the response when it is the same request and it was kept. */
function answer(id: string, storedFp: string, response: SynResponse | undefined, fp: string): SynResponse {
  if (storedFp !== fp) return idReused(id);
  return response ?? notKept(id);
}
