/**
 * Validation of `createSyncClient` options: a wrong value throws at construction, naming the
 * option and the range it must be in, instead of being accepted silently and misbehaving
 * later (`timeout: -5` fires every timer at once; `maxBatch: 0` never sends).
 */
import type { SyncClientOptions } from './index.js';
import { CLIENT_ID_HEADER, checkUrl, isValidClientId } from './transports.js';

/** Upper bound for every duration option: the largest delay `setTimeout` honours (2^31 − 1 ms). */
export const MAX_DELAY_MS = 2_147_483_647;

/** A value for an error message: JSON where it says something, `String()` for NaN, ±Infinity, undefined. */
function show(value: unknown): string {
  if (typeof value === 'number' && !Number.isFinite(value)) return String(value);
  try {
    return JSON.stringify(value) ?? String(value);
  } catch {
    return String(value);
  }
}

function integerIn(name: string, value: unknown, min: number, max: number): void {
  if (value === undefined) return;
  if (typeof value !== 'number' || !Number.isInteger(value) || value < min || value > max) {
    throw new RangeError(
      `syncwire: option ${name} must be an integer in [${min}, ${max}], got ${show(value)}`,
    );
  }
}

function durationIn(name: string, value: unknown, min: number): void {
  if (value === undefined) return;
  if (typeof value !== 'number' || !Number.isFinite(value) || value < min || value > MAX_DELAY_MS) {
    throw new RangeError(
      `syncwire: option ${name} must be a number of milliseconds in [${min}, ${MAX_DELAY_MS}], got ${show(value)}`,
    );
  }
}

function isResolvable(v: unknown, ok: (x: unknown) => boolean): boolean {
  return typeof v === 'function' || ok(v);
}

const isRecordOfStrings = (v: unknown) =>
  !!v && typeof v === 'object' && !Array.isArray(v) && Object.values(v).every((x) => typeof x === 'string');

const isUrlList = (v: unknown) =>
  (typeof v === 'string' && v.length > 0) ||
  (Array.isArray(v) && v.length > 0 && v.every((x) => typeof x === 'string' && x.length > 0));

/**
 * Throws `RangeError` for a number out of range, `TypeError` for a value of the wrong kind.
 * Ranges: `timeout` [1, 2^31−1] ms; `pollInterval` [1, 2^31−1] ms; `maxBackoff` [1, 2^31−1] ms;
 * `maxBatch` integer [1, 100 000]; `maxBatchBytes` integer [1, 2^31−1]; `maxQueue` integer [1, 2^31−1].
 */
export function validateOptions(o: SyncClientOptions): void {
  if (!o || typeof o !== 'object') throw new TypeError('syncwire: options object is required');
  if (!isResolvable(o.url, isUrlList)) {
    throw new TypeError(
      'syncwire: option url must be a non-empty string, a non-empty array of strings, or a function',
    );
  }
  // The same check runs on what a url/httpUrl function returns, at each dial and request.
  if (typeof o.url !== 'function') for (const u of Array.isArray(o.url) ? o.url : [o.url]) checkUrl('url', u);
  if (o.httpUrl !== undefined && !isResolvable(o.httpUrl, isUrlList)) {
    throw new TypeError(
      'syncwire: option httpUrl must be a non-empty string, array of strings, or a function',
    );
  }
  if (o.httpUrl !== undefined && typeof o.httpUrl !== 'function') {
    for (const u of Array.isArray(o.httpUrl) ? o.httpUrl : [o.httpUrl]) checkUrl('httpUrl', u);
  }
  if (
    o.channels !== undefined &&
    (!o.channels ||
      typeof o.channels !== 'object' ||
      Array.isArray(o.channels) ||
      (Object.getPrototypeOf(o.channels) !== Object.prototype && Object.getPrototypeOf(o.channels) !== null))
  ) {
    throw new TypeError(
      `syncwire: option channels must be a plain object { [channel]: { since? } }, got ${
        Array.isArray(o.channels) ? 'an array' : show(o.channels)
      }`,
    );
  }
  durationIn('timeout', o.timeout, 1);
  durationIn('pollInterval', o.pollInterval, 1);
  durationIn('maxBackoff', o.maxBackoff, 1);
  integerIn('maxBatch', o.maxBatch, 1, 100_000);
  integerIn('maxBatchBytes', o.maxBatchBytes, 1, 2 ** 31 - 1);
  integerIn('maxQueue', o.maxQueue, 1, 2 ** 31 - 1);
  if (o.params !== undefined && !isResolvable(o.params, isRecordOfStrings)) {
    throw new TypeError('syncwire: option params must be a record of strings or a function returning one');
  }
  if (o.headers !== undefined && !isResolvable(o.headers, isRecordOfStrings)) {
    throw new TypeError('syncwire: option headers must be a record of strings or a function returning one');
  }
  // The clientId is the client's own on the wire (PROTOCOL §1): a static `params`/`headers`
  // entry that would replace it is a mistake said at once. A function's result is not checked
  // here: the client's clientId is set after it, at each dial and request.
  if (o.params && typeof o.params === 'object' && Object.hasOwn(o.params, 'clientId')) {
    throw new TypeError(
      'syncwire: option params must not have a clientId key (the client sends its own clientId; use option clientId)',
    );
  }
  if (
    o.headers &&
    typeof o.headers === 'object' &&
    Object.keys(o.headers).some((k) => k.toLowerCase() === CLIENT_ID_HEADER)
  ) {
    throw new TypeError(
      'syncwire: option headers must not have an X-Client-Id key (the client sends its own clientId; use option clientId)',
    );
  }
  if (o.clientId !== undefined && !isValidClientId(o.clientId)) {
    const id: unknown = o.clientId;
    throw new TypeError(
      `syncwire: option clientId must be a string of 1–128 visible ASCII characters, U+0021–U+007E (PROTOCOL §1), got ${
        typeof id === 'string' ? `a string of length ${id.length}` : show(id)
      }`,
    );
  }
  if (o.storageKey !== undefined && (typeof o.storageKey !== 'string' || o.storageKey.length === 0)) {
    throw new TypeError('syncwire: option storageKey must be a non-empty string');
  }
  for (const name of ['random', 'onFailure', 'fetch', 'WebSocket'] as const) {
    if (o[name] !== undefined && typeof o[name] !== 'function') {
      throw new TypeError(`syncwire: option ${name} must be a function`);
    }
  }
}
