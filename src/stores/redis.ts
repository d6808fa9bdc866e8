/**
 * The history store for several server processes (`syncwire/stores/redis`): channel history
 * in Redis Streams, fan-out between processes, and dedupe memory that every process shares.
 *
 * Per channel, one hash `<prefix>m:<channel>` holds `epoch` and the last `seq`, and one stream
 * `<prefix>s:<channel>` holds the retained messages under the stream id `0-<seq>`, so stream
 * ids ARE the protocol's seqs: a replay is one XRANGE and Redis itself refuses an id out of
 * order. Every append is one Lua script (allocate seq, XADD, trim, announce on the feed), so
 * a process dying half-way can never leave a hole in `seq`.
 *
 * Lost data is never silent: the epoch lives in Redis next to the counter, and when it is
 * missing (a Redis restarted without persistence, FLUSHALL, an evicted key) or inconsistent
 * with the stream, the next script that touches the channel starts a new epoch. Clients that
 * come back with the old epoch are answered `recovered: false`.
 *
 * Fan-out (`watch`): every append also adds `{ c: channel, s: seq, e: epoch }` to one feed
 * stream, `<prefix>feed` (capped). Each process follows the feed with a blocking XREAD on a
 * connection of its own, and the feed only says "there is something new": the process then
 * reads the channel's stream from the last seq it delivered. A slow, late or reconnecting
 * reader therefore delays messages but never drops or reorders one, and listeners get each
 * channel's messages strictly as `last + 1`. Because the feed has positions, a process also
 * knows exactly where its view starts: a channel is followed from its first feed entry after
 * the watch began, or from a head or append this process made once the reader has passed it.
 *
 * Dedupe (`claim`/`complete`/`release`): `SET NX` of a pending marker with a lease the owner
 * renews while it processes, then the response with the dedupe TTL. A retry that lands on
 * another process waits for the response; a claim whose process died lapses after the lease.
 * Answers are indexed in `<prefix>dedupe-index` (a sorted set by time) with their sizes, and
 * by holder (`DedupeLimits.holder`), so `complete` honours the server's `dedupeMaxEntries` and
 * `dedupeMaxBytes` taking from the largest holder first, oldest first within it (FIX14C).
 * ClientId bindings (`bind`, docs/PROTOCOL.md "Principal binding") are `<prefix>bind:<clientId>`
 * keys holding the owner, with the dedupe window as TTL, refreshed on use. Redis must not evict
 * them: a `maxmemory-policy` other than `noeviction` is reported to `onError`
 * (`'maxmemory-policy'`) when the store opens.
 *
 * Every script is safe to run twice (ioredis resends a command whose reply a dropped
 * connection lost): an append remembers its outcome under a one-off token for a while.
 *
 * ioredis is an optional peer dependency, imported only when a store is made.
 * Needs Redis ≥ 6.2 (XTRIM MINID, exclusive XRANGE); not for Redis Cluster (one process reads
 * every channel's stream).
 */

import { createHash } from 'node:crypto';
import type { Redis, RedisOptions } from 'ioredis';
import { randomId, SyncError } from '../protocol/index.js';
import {
  type ChannelHead,
  DEFAULT_RETENTION,
  type DedupeClaim,
  type DedupeLimits,
  type DedupeStore,
  type HistoryStore,
  type RetentionOptions,
  type StoredMessage,
} from './types.js';

/** Where the store connects: a URL (the store owns the connection) or a client you own. */
export type RedisConnection =
  | {
      /** e.g. `redis://127.0.0.1:6379/0`. */
      url: string;
      /** Extra ioredis options for the connections the store opens. @default {} */
      redisOptions?: RedisOptions;
    }
  | {
      /**
       * An ioredis client. The store uses it for commands and `duplicate()`s it for the
       * feed reader; `close()` leaves it open. Do not give it a `keyPrefix` (use `prefix`) nor
       * `autoResendUnfulfilledCommands: false` (ioredis then never settles a command that was
       * in flight when the connection dropped; appends are made safe to resend instead).
       */
      client: Redis;
    };

export interface RedisStoreOptions extends RetentionOptions {
  /**
   * Prefix of every key the store writes. Processes that share history must use the same
   * one; different apps (or test runs) on one Redis use different ones.
   * @default 'syncwire:'
   */
  prefix?: string;
  /**
   * How long a dedupe claim survives its process: the owner renews it while it processes the
   * batch, so it only expires when the process died. A retry that lands elsewhere waits at
   * most this long before processing the batch itself.
   * @default 10000
   */
  claimLeaseMs?: number;
  /**
   * Entries kept in the feed every process follows (approximately; Redis trims in whole
   * nodes). A process whose reader was away for longer than this many appends catches up
   * from its channels' streams instead.
   * @default 10000
   */
  feedMaxLen?: number;
  /**
   * Channels a watching process keeps a cursor for. Beyond it, the oldest idle ones are
   * forgotten (memory stays bounded with many short-lived channels) and followed again from
   * their next append; only their catch-up after a lost connection is given up.
   * @default 50000
   */
  maxFollowedChannels?: number;
  /** Clock used to stamp and age messages; tests inject one instead of sleeping. @default Date.now */
  now?: () => number;
  /**
   * Where background failures go (a feed or catch-up read that failed: it is retried on the
   * channel's next feed entry and after every reconnect).
   * @default logs to console.error
   */
  onError?: (error: unknown, where: string) => void;
}

/**
 * A `HistoryStore` in Redis, with shared dedupe: also a `DedupeStore`, `release` included.
 */
export interface RedisHistoryStore extends HistoryStore, DedupeStore {
  readonly kind: 'redis';
  /**
   * As `HistoryStore.append`, plus `key`: an idempotency key. An append whose key was used in
   * the last two minutes appends nothing and resolves with that append's message (the
   * payload given now is not stored). A batch re-run by another process after its first
   * process died can pass the same keys (e.g. `<dedupe key>#<n>` for its n-th publication)
   * so that its publications are not made twice.
   */
  append(
    channel: string,
    payload: unknown,
    opts?: { except?: string; author?: string; key?: string },
  ): Promise<StoredMessage>;
  /**
   * `HistoryStore.releaseChannels`: frees a record only while it has no message and no other
   * process sharing the store ever looked at it (only this process knows who follows it);
   * the others go at housekeeping (`trim({ free })`). Atomic with appends of every process.
   */
  releaseChannels(channels: string[], free: (name: string) => boolean): Promise<number>;
  hasChannel(channel: string): Promise<boolean>;
  claim(key: string, ttlMs: number): Promise<DedupeClaim>;
  complete(key: string, response: unknown, ttlMs: number, limits?: DedupeLimits): Promise<void>;
  release(key: string): Promise<void>;
  bind(clientId: string, owner: string, ttlMs: number): Promise<boolean>;
}

const DEFAULTS = {
  prefix: 'syncwire:',
  claimLeaseMs: 10_000,
  feedMaxLen: 10_000,
  maxFollowedChannels: 50_000,
};

/** How long the feed reader blocks per XREAD; it loops, so this only bounds idle round trips. */
const FEED_BLOCK_MS = 5000;
/**
 * How long an append remembers its outcome for a resend of the same command (see APPEND_LUA):
 * longer than ioredis keeps retrying a command across reconnects.
 */
const APPEND_TOKEN_TTL_MS = 120_000;
/** Feed entries per XREAD. */
const FEED_COUNT = 1000;

/** Entries read per round trip when a watcher catches up. */
const WATCH_PAGE = 500;
/** Channels per SSCAN step in `trim()`. */
const TRIM_SCAN = 200;

// ---- Lua ------------------------------------------------------------------------------------

/**
 * Shared by the scripts that may create a channel. KEYS[1] meta hash, KEYS[2] stream,
 * KEYS[3] channel set, KEYS[4] feed. A channel is intact when its hash has both fields and, once something
 * was appended, its stream exists (Redis keeps empty streams, so trimming never removes it).
 * Anything else means data was lost: the stream is dropped and a new epoch begins.
 * `lastFeedId` is the feed's newest id (or 0-0): where this script stands in the feed.
 */
const ENSURE_LUA = `
local function ensure(meta, stream, set, channel, newEpoch)
  local m = redis.call('HMGET', meta, 'epoch', 'seq')
  local epoch, seq = m[1], tonumber(m[2])
  if epoch and seq and (seq == 0 or redis.call('EXISTS', stream) == 1) then
    return epoch, seq
  end
  redis.call('DEL', stream)
  redis.call('HSET', meta, 'epoch', newEpoch, 'seq', 0)
  redis.call('SADD', set, channel)
  return newEpoch, 0
end
local function lastFeedId(feed)
  local last = redis.call('XREVRANGE', feed, '+', '-', 'COUNT', 1)
  if #last == 0 then return '0-0' end
  return last[1][1]
end
`;

/** Drops the stream's entries stamped before `cutoff`; cost is the number dropped. */
const TRIM_AGE_LUA = `
local function stamp(entry)
  local f = entry[2]
  for j = 1, #f, 2 do
    if f[j] == 't' then return tonumber(f[j + 1]) end
  end
  return 0
end
local function trimAge(stream, cutoff)
  local start = '-'
  while true do
    local batch = redis.call('XRANGE', stream, start, '+', 'COUNT', 100)
    for i, entry in ipairs(batch) do
      if stamp(entry) >= cutoff then
        if i > 1 or start ~= '-' then redis.call('XTRIM', stream, 'MINID', entry[1]) end
        return
      end
    end
    if #batch < 100 then
      if #batch > 0 or start ~= '-' then redis.call('XTRIM', stream, 'MAXLEN', 0) end
      return
    end
    start = '(' .. batch[#batch][1]
  end
end
`;

/**
 * KEYS: meta, stream, set, feed, token. ARGV: channel, newEpoch, at, payload JSON, except
 * ('' = none), maxMessages ('' = none), age cutoff ('' = none), feed max length, token ttl,
 * author ('' = none).
 * Returns { epoch, seq, feed id, at }.
 *
 * The token key makes the script safe to run twice: ioredis resends a command whose reply a
 * dropped connection lost, and the second run then answers what the first one did. With a
 * caller's `key` as the token, the same holds for an append repeated by another process.
 */
const APPEND_LUA = `${ENSURE_LUA}${TRIM_AGE_LUA}
local done = redis.call('GET', KEYS[5])
if done then
  local a = string.find(done, ' ', 1, true)
  local b = string.find(done, ' ', a + 1, true)
  local c = string.find(done, ' ', b + 1, true)
  return { string.sub(done, 1, a - 1), tonumber(string.sub(done, a + 1, b - 1)),
    string.sub(done, b + 1, c - 1), string.sub(done, c + 1) }
end
local epoch = ensure(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2])
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local args = { 'XADD', KEYS[2] }
if ARGV[6] ~= '' then
  args[#args + 1] = 'MAXLEN'
  args[#args + 1] = ARGV[6]
end
args[#args + 1] = '0-' .. seq
args[#args + 1] = 'e'
args[#args + 1] = epoch
args[#args + 1] = 't'
args[#args + 1] = ARGV[3]
args[#args + 1] = 'p'
args[#args + 1] = ARGV[4]
if ARGV[5] ~= '' then
  args[#args + 1] = 'x'
  args[#args + 1] = ARGV[5]
end
if ARGV[10] ~= nil and ARGV[10] ~= '' then
  args[#args + 1] = 'a'
  args[#args + 1] = ARGV[10]
end
redis.call(unpack(args))
if ARGV[7] ~= '' then trimAge(KEYS[2], tonumber(ARGV[7])) end
local fid = redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[8], '*', 'c', ARGV[1], 's', seq, 'e', epoch)
redis.call('SET', KEYS[5], epoch .. ' ' .. seq .. ' ' .. fid .. ' ' .. ARGV[3], 'PX', ARGV[9])
return { epoch, seq, fid, ARGV[3] }
`;

/**
 * KEYS: meta, stream, set, feed. ARGV: channel, newEpoch, process id. Returns { epoch, seq,
 * first, feed id }. A record never appended to remembers who looked at it (field `o`): the
 * process that made it, or `*` once another process (or an older version) looked too; only
 * its maker may free it at once (RELEASE_LUA), since only the maker knows who follows it.
 */
const HEAD_LUA = `${ENSURE_LUA}
local epoch, seq = ensure(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2])
if seq == 0 then
  local o = redis.call('HGET', KEYS[1], 'o')
  if epoch == ARGV[2] then redis.call('HSET', KEYS[1], 'o', ARGV[3])
  elseif o ~= ARGV[3] and o ~= '*' then redis.call('HSET', KEYS[1], 'o', '*') end
end
local oldest = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
local first = seq + 1
if #oldest > 0 then first = tonumber(string.sub(oldest[1][1], 3)) end
return { epoch, seq, first, lastFeedId(KEYS[4]) }
`;

/**
 * The watcher's read: the channel's epoch and the entries from a stream id, in one atomic
 * step so that entries are never attributed to the wrong epoch. KEYS: meta, stream.
 * ARGV: start id, count. Returns { epoch or '', entries }.
 */
const WATCH_READ_LUA = `
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then return { '', {} } end
return { epoch, redis.call('XRANGE', KEYS[2], ARGV[1], '+', 'COUNT', ARGV[2]) }
`;

/**
 * KEYS: meta, stream. ARGV: maxMessages ('' = none), age cutoff ('' = none), free ('1' =
 * delete the channel when no message is left). 0 = gone.
 */
const TRIM_LUA = `${TRIM_AGE_LUA}
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[1] ~= '' then redis.call('XTRIM', KEYS[2], 'MAXLEN', ARGV[1]) end
if ARGV[2] ~= '' then trimAge(KEYS[2], tonumber(ARGV[2])) end
if ARGV[3] == '1' and redis.call('XLEN', KEYS[2]) == 0 then
  redis.call('DEL', KEYS[1], KEYS[2])
  return 0
end
return 1
`;

/**
 * `releaseChannels` for one channel, atomic with every append and head (Lua scripts run one at
 * a time): the record goes only while it was never appended to (seq 0, no stream) and only
 * this process ever looked at it (`o` = this process, see HEAD_LUA), so no other process has a
 * subscriber holding its epoch. An append that comes after finds no record and starts a new
 * epoch at seq 1 (nothing lost; an epoch never reused: each is a fresh random id); one that
 * came before made seq 1 and the record stays. KEYS: meta, stream, set. ARGV: channel,
 * process id. 1 = freed.
 */
const RELEASE_LUA = `
local m = redis.call('HMGET', KEYS[1], 'seq', 'o')
if m[1] ~= '0' or m[2] ~= ARGV[2] then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[3], ARGV[1])
return 1
`;

/**
 * Dedupe values: 'p:<token>' while a process holds the claim, 'd:<json>' once answered. A
 * resent claim (same token) is still 'new'.
 * KEYS: key. ARGV: token, lease ms. Returns { 'new' } | { 'pending' } | { 'done', json }.
 */
const CLAIM_LUA = `
local v = redis.call('GET', KEYS[1])
if not v or v == 'p:' .. ARGV[1] then
  redis.call('SET', KEYS[1], 'p:' .. ARGV[1], 'PX', ARGV[2])
  return { 'new' }
end
if string.sub(v, 1, 2) == 'p:' then return { 'pending' } end
return { 'done', string.sub(v, 3) }
`;

/** Renew (ARGV[2] = lease ms) or drop (ARGV[2] = '') a claim, only while we still hold it. */
const LEASE_LUA = `
if redis.call('GET', KEYS[1]) ~= 'p:' .. ARGV[1] then return 0 end
if ARGV[2] == '' then return redis.call('DEL', KEYS[1]) end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
`;

/**
 * Store an answer and keep the answered entries under the caps: the largest holder first,
 * oldest first within it (FIX14C; the policy of src/stores/evict.ts, here with sorted sets so
 * each step finds the largest holder in O(log n), atomically for every process).
 * KEYS: dedupe key, index (zset member → time answered), sizes (hash member → bytes), total
 * bytes, holders by count (zset holder → entries), holders by bytes (zset holder → bytes),
 * holders with kept responses by bytes (zset), member → holder (hash).
 * ARGV: value, ttl ms, now ms, max entries ('' = none), max bytes ('' = none), member,
 * key prefix of dedupe keys, holder, key prefix of a holder's entries (zset member → time),
 * key prefix of a holder's entries that still hold their response, '1' when the value is the
 * server's `{ f, r }` (reducible to `{ f }`).
 * Past max entries: drop the oldest entries of the holder with the most, while it still has
 * more than the runner-up. Past max bytes: reduce the oldest kept responses of the holder
 * with the most bytes among those with kept ones to `{ f }`, the same way, then drop whole
 * entries of the holder with the most bytes if that is not enough. An entry still pending
 * (claimed again after it lapsed) is never deleted here, only taken out of the index until
 * its own answer puts it back. Entries made before holders existed (no holder) are dropped
 * oldest first only when no holder is left to take from.
 */
const COMPLETE_LUA = `
local idx, sizes, total = KEYS[2], KEYS[3], KEYS[4]
local hn, hb, hkb, hof = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local HP, HK = ARGV[9], ARGV[10]
local function addBytes(h, d)
  redis.call('ZINCRBY', hb, d, h)
  if redis.call('ZSCORE', hkb, h) then redis.call('ZINCRBY', hkb, d, h) end
end
local function forget(m)
  redis.call('ZREM', idx, m)
  local sz = tonumber(redis.call('HGET', sizes, m) or '0')
  if redis.call('HDEL', sizes, m) == 1 then redis.call('DECRBY', total, sz) end
  local h = redis.call('HGET', hof, m)
  if h then
    redis.call('HDEL', hof, m)
    addBytes(h, -sz)
    redis.call('ZREM', HP .. h, m)
    if redis.call('ZREM', HK .. h, m) == 1 and redis.call('ZCARD', HK .. h) == 0 then redis.call('ZREM', hkb, h) end
    if tonumber(redis.call('ZINCRBY', hn, -1, h)) <= 0 then
      redis.call('ZREM', hn, h)
      redis.call('ZREM', hb, h)
      redis.call('ZREM', hkb, h)
    end
  end
  local k = ARGV[7] .. m
  local v = redis.call('GET', k)
  if v and string.sub(v, 1, 2) == 'd:' then redis.call('DEL', k) end
end
local function reduce(m, h)
  redis.call('ZREM', HK .. h, m)
  if redis.call('ZCARD', HK .. h) == 0 then redis.call('ZREM', hkb, h) end
  local k = ARGV[7] .. m
  local v = redis.call('GET', k)
  if not v or string.sub(v, 1, 2) ~= 'd:' then return end
  local ok, obj = pcall(cjson.decode, string.sub(v, 3))
  if not ok or type(obj) ~= 'table' or type(obj.f) ~= 'string' then return end
  local nv = 'd:' .. cjson.encode({ f = obj.f })
  local ttl = redis.call('PTTL', k)
  if ttl > 0 then redis.call('SET', k, nv, 'PX', ttl) else redis.call('SET', k, nv) end
  local old = tonumber(redis.call('HGET', sizes, m) or '0')
  local new = string.len(nv)
  redis.call('HSET', sizes, m, new)
  redis.call('DECRBY', total, old - new)
  addBytes(h, new - old)
end
local function top2(z)
  local r = redis.call('ZREVRANGE', z, 0, 1, 'WITHSCORES')
  return r[1], tonumber(r[4] or '0')
end
local function score(z, h) return tonumber(redis.call('ZSCORE', z, h) or '0') end
local function bytes() return tonumber(redis.call('GET', total) or '0') end
local function oldestOverall()
  local o = redis.call('ZRANGE', idx, 0, 0)
  if #o == 0 then return false end
  forget(o[1])
  return true
end
local m, h = ARGV[6], ARGV[8]
if redis.call('HEXISTS', sizes, m) == 1 then forget(m) end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
local size = string.len(ARGV[1])
redis.call('HSET', sizes, m, size)
redis.call('INCRBY', total, size)
redis.call('ZADD', idx, ARGV[3], m)
redis.call('HSET', hof, m, h)
redis.call('ZINCRBY', hn, 1, h)
addBytes(h, size)
redis.call('ZADD', HP .. h, ARGV[3], m)
if ARGV[11] == '1' then
  redis.call('ZADD', HK .. h, ARGV[3], m)
  redis.call('ZADD', hkb, score(hb, h), h)
end
local cutoff = tonumber(ARGV[3]) - tonumber(ARGV[2])
for _, e in ipairs(redis.call('ZRANGEBYSCORE', idx, '-inf', cutoff, 'LIMIT', 0, 100)) do forget(e) end
local maxN = tonumber(ARGV[4])
local maxB = tonumber(ARGV[5])
if maxN then
  while redis.call('ZCARD', idx) > maxN do
    local top, nxt = top2(hn)
    if not top then
      if not oldestOverall() then break end
    else
      repeat
        local o = redis.call('ZRANGE', HP .. top, 0, 0)
        if #o == 0 then redis.call('ZREM', hn, top) break end
        forget(o[1])
      until redis.call('ZCARD', idx) <= maxN or score(hn, top) <= nxt
    end
  end
end
if maxB then
  while bytes() > maxB do
    local top, nxt = top2(hkb)
    if not top then break end
    repeat
      local o = redis.call('ZRANGE', HK .. top, 0, 0)
      if #o == 0 then redis.call('ZREM', hkb, top) break end
      reduce(o[1], top)
    until bytes() <= maxB or score(hkb, top) <= nxt
  end
  while bytes() > maxB do
    local top, nxt = top2(hb)
    if not top then
      if not oldestOverall() then break end
    else
      repeat
        local o = redis.call('ZRANGE', HP .. top, 0, 0)
        if #o == 0 then redis.call('ZREM', hb, top) break end
        forget(o[1])
      until bytes() <= maxB or score(hb, top) <= nxt
    end
  end
end
return 1
`;

/** KEYS: binding. ARGV: owner, ttl ms. 1 = bound (or refreshed) to owner, 0 = another owner's. */
const BIND_LUA = `
local v = redis.call('GET', KEYS[1])
if v and v ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
`;

interface Script {
  lua: string;
  sha: string;
}

const script = (lua: string): Script => ({ lua, sha: createHash('sha1').update(lua).digest('hex') });

const SCRIPTS = {
  append: script(APPEND_LUA),
  head: script(HEAD_LUA),
  watchRead: script(WATCH_READ_LUA),
  trim: script(TRIM_LUA),
  claim: script(CLAIM_LUA),
  lease: script(LEASE_LUA),
  complete: script(COMPLETE_LUA),
  bind: script(BIND_LUA),
};

// ---- the store ------------------------------------------------------------------------------

/** What the watcher knows of one channel. */
interface Tracked {
  epoch: string;
  /** Last seq delivered to listeners. */
  last: number;
  /** The catch-up read running now, if any. */
  pumping: Promise<void> | null;
  /** Something new was announced while pumping: read again. */
  dirty: boolean;
  /** An append of this process is waiting on this entry: not to be forgotten meanwhile. */
  holds: number;
  /**
   * Highest seq of this epoch the reader has seen in the feed. Deliveries can run ahead of
   * the feed (own appends, catch-up reads); until the feed catches up, forgetting the channel
   * would make its pending feed entries deliver those messages again.
   */
  announced: number;
}

type RawEntry = [id: string, fields: string[]];

/** A stream id as numbers, `<ms>-<n>`, for comparing feed positions. */
type FeedId = [ms: number, n: number];

/** The length of an entry's payload text (field `p`), 0 when it has none. */
const payloadLength = ([, fields]: RawEntry): number => {
  for (let i = 0; i + 1 < fields.length; i += 2) if (fields[i] === 'p') return fields[i + 1]!.length;
  return 0;
};

const parseFeedId = (id: string): FeedId => {
  const dash = id.indexOf('-');
  return [Number(id.slice(0, dash)), Number(id.slice(dash + 1))];
};
const formatFeedId = ([ms, n]: FeedId) => `${ms}-${n}`;
const compareFeedIds = (a: FeedId, b: FeedId) => a[0] - b[0] || a[1] - b[1];

async function loadDriver(): Promise<typeof import('ioredis').Redis> {
  try {
    const mod = await import('ioredis');
    return mod.Redis ?? mod.default;
  } catch (err) {
    throw new Error('redisStore needs the optional peer dependency ioredis: npm install ioredis', {
      cause: err,
    });
  }
}

const defaultOnError = (error: unknown, where: string) => {
  console.error(`[syncwire] redis store, ${where}:`, error);
};

/**
 * A `HistoryStore` in Redis, shared by every server process that uses the same Redis and
 * `prefix`. Resolves once the driver is loaded; connecting happens in the background
 * (commands wait for it).
 */
export async function redisStore(
  connection: RedisConnection,
  options: RedisStoreOptions = {},
): Promise<RedisHistoryStore> {
  const maxMessages = options.maxMessages ?? DEFAULT_RETENTION.maxMessages;
  const maxAgeMs = options.maxAgeMs ?? DEFAULT_RETENTION.maxAgeMs;
  const prefix = options.prefix ?? DEFAULTS.prefix;
  const claimLeaseMs = options.claimLeaseMs ?? DEFAULTS.claimLeaseMs;
  const now = options.now ?? Date.now;
  const onError = (err: unknown, where: string) => {
    try {
      (options.onError ?? defaultOnError)(err, where);
    } catch {
      // A failing logger must not become the next failure.
    }
  };
  if (!(maxMessages >= 1)) throw new RangeError('redisStore: maxMessages must be at least 1');

  let redis: Redis;
  let owned: boolean;
  if ('client' in connection) {
    redis = connection.client;
    owned = false;
  } else {
    const RedisClass = await loadDriver();
    redis = new RedisClass(connection.url, { ...connection.redisOptions });
    owned = true;
  }
  // A client error is also a rejected command; keep it from becoming an unhandled 'error'.
  const onClientError = (err: unknown) => onError(err, 'connection');
  if (owned) redis.on('error', onClientError);
  // ClientId bindings and dedupe answers are keys with a TTL: a Redis that evicts under memory
  // pressure (`volatile-*`, `allkeys-*`) drops them, and a dropped binding lets another
  // principal take a clientId (issue 12). Reported, not refused: the operator decides. A Redis
  // that refuses CONFIG (managed services) is not checked.
  redis.call('CONFIG', 'GET', 'maxmemory-policy').then(
    (reply) => {
      const policy = Array.isArray(reply) ? String(reply[1] ?? '') : '';
      if (policy !== '' && policy !== 'noeviction') {
        onError(
          new Error(
            `redis maxmemory-policy is ${policy}: under memory pressure Redis evicts clientId bindings and dedupe answers; use noeviction`,
          ),
          'maxmemory-policy',
        );
      }
    },
    () => {},
  );

  const keys = {
    meta: (channel: string) => `${prefix}m:${channel}`,
    stream: (channel: string) => `${prefix}s:${channel}`,
    channels: `${prefix}channels`,
    dedupe: (key: string) => `${prefix}dedupe:${key}`,
    dedupeIndex: `${prefix}dedupe-index`,
    dedupeSizes: `${prefix}dedupe-sizes`,
    dedupeBytes: `${prefix}dedupe-bytes`,
    dedupeHoldersN: `${prefix}dedupe-holders-n`,
    dedupeHoldersB: `${prefix}dedupe-holders-b`,
    dedupeHoldersKB: `${prefix}dedupe-holders-kb`,
    dedupeHolderOf: `${prefix}dedupe-holder-of`,
    dedupeHolder: `${prefix}dedupe-h:`,
    dedupeHolderKept: `${prefix}dedupe-hk:`,
    binding: (clientId: string) => `${prefix}bind:${clientId}`,
    token: (token: string) => `${prefix}append:${token}`,
    feed: `${prefix}feed`,
    control: `${prefix}control`,
  };
  const maxLenArg = Number.isFinite(maxMessages) ? String(Math.floor(maxMessages)) : '';
  const maxTracked = Math.max(1, options.maxFollowedChannels ?? DEFAULTS.maxFollowedChannels);
  const feedLength = Math.max(100, Math.floor(options.feedMaxLen ?? DEFAULTS.feedMaxLen));
  const feedMaxLen = String(feedLength);
  /** A feed read this long means the reader is behind (see checkBehind). */
  const behindAt = Math.min(FEED_COUNT, Math.floor(feedLength / 2));
  const cutoffArg = () => (Number.isFinite(maxAgeMs) ? String(now() - maxAgeMs) : '');

  /** Who this store is among the processes sharing the Redis (see HEAD_LUA, RELEASE_LUA). */
  const processId = randomId('p');
  let closed = false;
  const ensureOpen = () => {
    if (closed) throw new SyncError('closed', 'redis store is closed');
  };

  /** EVALSHA, loading the script when Redis does not know it (first use, or a restart). */
  async function run(s: Script, keyList: string[], args: (string | number)[]): Promise<unknown> {
    try {
      return await redis.call('EVALSHA', s.sha, keyList.length, ...keyList, ...args);
    } catch (err) {
      if (!String((err as Error)?.message).includes('NOSCRIPT')) throw err;
      return redis.call('EVAL', s.lua, keyList.length, ...keyList, ...args);
    }
  }

  const channelKeys = (channel: string) => [
    keys.meta(channel),
    keys.stream(channel),
    keys.channels,
    keys.feed,
  ];

  function parseEntry(channel: string, epoch: string, [id, fields]: RawEntry): StoredMessage | null {
    const f: Record<string, string> = {};
    for (let i = 0; i + 1 < fields.length; i += 2) f[fields[i]!] = fields[i + 1]!;
    const seq = Number(id.slice(id.indexOf('-') + 1));
    if (f.p === undefined || !Number.isSafeInteger(seq)) return null;
    const e = f.e ?? epoch;
    const msg: StoredMessage = {
      channel,
      seq,
      epoch: e,
      id: `${e}.${seq}`,
      payload: JSON.parse(f.p),
      at: Number(f.t),
    };
    if (f.x !== undefined) msg.except = f.x;
    if (f.a !== undefined) msg.author = f.a;
    return msg;
  }

  // ---- watch: the cross-process live feed ---------------------------------------------------

  const listeners = new Set<(msg: StoredMessage) => void>();
  const tracked = new Map<string, Tracked>();
  /** Set once watch() was called; resolves when the reader knows where the feed starts. */
  let watching: Promise<void> | null = null;
  let reader: Redis | null = null;
  /** The last feed id the reader has processed. */
  let cursor: FeedId = [0, 0];
  /** Appends and heads waiting for the reader to pass their feed position. */
  let waiters: Array<{ at: FeedId; resolve: () => void }> = [];

  const deliver = (msg: StoredMessage) => {
    for (const l of listeners) {
      try {
        l(msg);
      } catch {
        // A listener's failure must not stop the others nor the feed.
      }
    }
  };

  /** Channels forgotten so far (see `forget`). */
  let forgotten = 0;

  const track = (channel: string, epoch: string, last: number): Tracked => {
    let t = tracked.get(channel);
    if (!t) {
      // Before adding: the new entry is idle too, and must not be forgotten at once.
      if (tracked.size >= maxTracked) forget();
      t = { epoch, last, pumping: null, dirty: false, holds: 0, announced: last };
      tracked.set(channel, t);
    }
    return t;
  };

  /**
   * Bound memory: forget the oldest idle channels. Idle means everything the feed announced
   * for it was delivered and nothing beyond, so when its next entry comes it is followed from
   * that entry on, exactly as a channel never seen: nothing is skipped and nothing repeated.
   */
  function forget(): void {
    for (const [channel, t] of tracked) {
      if (tracked.size <= maxTracked * 0.9) break;
      if (t.pumping || t.dirty || t.holds > 0 || t.announced !== t.last) continue;
      tracked.delete(channel);
      forgotten++;
    }
  }

  /**
   * Read the channel's stream after the last delivered seq and deliver in order, until
   * nothing new is announced. One pump per channel at a time; calls made while it runs make
   * it read once more and share its promise.
   */
  function pump(channel: string, t: Tracked): Promise<void> {
    t.dirty = true;
    if (t.pumping) return t.pumping;
    // (The loop below always awaits at least once, so `t.pumping` is set before it ends.)
    if (closed) return Promise.resolve();
    const p = (async () => {
      try {
        while (t.dirty && !closed) {
          t.dirty = false;
          const [epoch, entries] = (await run(
            SCRIPTS.watchRead,
            [keys.meta(channel), keys.stream(channel)],
            [`0-${t.last + 1}`, WATCH_PAGE],
          )) as [string, RawEntry[]];
          if (closed) return;
          if (epoch === '') continue; // gone (flushed): the next append starts a new epoch
          if (epoch !== t.epoch) {
            // History was lost and restarted: the new epoch is delivered from its seq 1.
            t.epoch = epoch;
            t.last = 0;
            t.announced = 0;
            t.dirty = true;
            continue;
          }
          for (const raw of entries) {
            const msg = parseEntry(channel, epoch, raw);
            // Anything below last + 1 was trimmed before this process read it: the hole is
            // real, and subscribers see it as a gap and re-SUB (answered recovered: false).
            if (!msg || msg.seq <= t.last) continue;
            t.last = msg.seq;
            deliver(msg);
          }
          if (entries.length >= WATCH_PAGE) t.dirty = true;
        }
      } finally {
        // In the same turn as the loop's last check, so a pump() call after it starts anew
        // rather than joining a pump that has already decided to stop.
        t.pumping = null;
      }
    })();
    t.pumping = p;
    return p;
  }

  const pumpQuietly = (channel: string, t: Tracked) => {
    pump(channel, t).catch((err: unknown) => onError(err, `watch read of ${channel}`));
  };

  /** One feed entry: start following its channel, or read it further. */
  const onFeedEntry = (fields: string[]) => {
    let channel: string | undefined;
    let seq = 0;
    let epoch = '';
    for (let i = 0; i + 1 < fields.length; i += 2) {
      const v = fields[i + 1]!;
      if (fields[i] === 'c') channel = v;
      else if (fields[i] === 's') seq = Number(v);
      else if (fields[i] === 'e') epoch = v;
    }
    if (channel === undefined || !(seq >= 1)) return;
    // The first entry of a channel since the watch began: nothing before it is owed.
    const t = track(channel, epoch, seq - 1);
    if (t.epoch === epoch) {
      if (seq > t.announced) t.announced = seq;
      if (seq <= t.last) return;
    }
    pumpQuietly(channel, t);
  };

  const releaseWaiters = (all: boolean) => {
    if (waiters.length === 0) return;
    const keep: typeof waiters = [];
    for (const w of waiters) {
      if (all || compareFeedIds(w.at, cursor) <= 0) w.resolve();
      else keep.push(w);
    }
    waiters = keep;
  };

  /** Resolves once the reader has processed the feed up to `id` (or gave up on it). */
  const passed = (id: FeedId): Promise<void> | undefined =>
    compareFeedIds(id, cursor) <= 0 || !reader
      ? undefined
      : new Promise((resolve) => waiters.push({ at: id, resolve }));

  async function readFeed(conn: Redis): Promise<void> {
    let failures = 0;
    while (!closed && reader === conn) {
      let reply: Array<[string, RawEntry[]]> | null;
      try {
        reply = (await conn.call(
          'XREAD',
          'COUNT',
          FEED_COUNT,
          'BLOCK',
          FEED_BLOCK_MS,
          'STREAMS',
          keys.feed,
          formatFeedId(cursor),
        )) as Array<[string, RawEntry[]]> | null;
        failures = 0;
      } catch (err) {
        if (closed || reader !== conn) return;
        onError(err, 'feed read');
        // Entries may be gone (Redis restarted or the reader fell too far behind): nothing
        // waits for them any more, and every followed channel re-reads its own stream.
        releaseWaiters(true);
        for (const [channel, t] of tracked) pumpQuietly(channel, t);
        await new Promise((resolve) => setTimeout(resolve, Math.min(1000, 50 * ++failures)).unref());
        continue;
      }
      const entries = reply?.[0]?.[1] ?? [];
      for (const [id, fields] of entries) {
        onFeedEntry(fields);
        cursor = parseFeedId(id);
      }
      releaseWaiters(false);
      if (entries.length >= behindAt) await checkBehind(conn, entries[0]![0]);
    }
  }

  /**
   * A large batch means the reader is behind. If that batch began at the oldest entry the feed
   * still has, entries it never read may have been trimmed away: every followed channel then
   * re-reads its own stream, so none waits for its next append to catch up.
   */
  async function checkBehind(conn: Redis, batchStart: string): Promise<void> {
    try {
      const oldest = (await conn.call('XRANGE', keys.feed, '-', '+', 'COUNT', 1)) as RawEntry[];
      const first = oldest[0]?.[0];
      if (first === undefined || compareFeedIds(parseFeedId(first), parseFeedId(batchStart)) >= 0) {
        for (const [channel, t] of tracked) pumpQuietly(channel, t);
      }
    } catch (err) {
      onError(err, 'feed read');
    }
  }

  // ---- broadcast: a pub/sub channel between the processes (revocations) -------------------

  const controlListeners = new Set<(message: unknown) => void>();
  let controlConn: Redis | null = null;
  /** Resolves once this process receives broadcasts (the SUBSCRIBE was answered). */
  let controlReady: Promise<unknown> | null = null;

  function startControl(): void {
    if (controlConn || closed) return;
    const conn = redis.duplicate();
    controlConn = conn;
    conn.on('error', (err: unknown) => onError(err, 'broadcast connection'));
    conn.on('message', (_channel: string, text: string) => {
      let message: unknown;
      try {
        message = JSON.parse(text);
      } catch {
        return;
      }
      for (const l of controlListeners) {
        try {
          l(message);
        } catch (err) {
          onError(err, 'broadcast listener');
        }
      }
    });
    // ioredis re-subscribes by itself after a reconnect.
    controlReady = conn.subscribe(keys.control).catch((err: unknown) => onError(err, 'broadcast subscribe'));
  }

  /**
   * Start following the feed. Where it starts is read on the command connection right away,
   * so every command issued after watch() (an append, say) is after the start.
   */
  function startWatcher(): void {
    if (watching || closed) return;
    const start = redis.call('XREVRANGE', keys.feed, '+', '-', 'COUNT', 1) as Promise<RawEntry[]>;
    watching = start.then(
      (last) => {
        if (closed) return;
        cursor = parseFeedId(last[0]?.[0] ?? '0-0');
        const conn = redis.duplicate();
        conn.on('error', (err: unknown) => onError(err, 'feed connection'));
        reader = conn;
        void readFeed(conn);
      },
      (err: unknown) => {
        // Without a start the watch cannot begin; a later watch() tries again.
        onError(err, 'watch start');
        watching = null;
      },
    );
  }

  /**
   * After this process appended `msg` (at feed position `fid`): deliver it, in order. The
   * common case is a followed channel where it is the next seq: it goes out at once.
   * Otherwise the reader first passes its feed entry (which starts following the channel at
   * the right place), then a catch-up read fills in. Resolves once listeners have seen it,
   * as with the in-process stores.
   */
  async function afterAppend(msg: StoredMessage, fid: FeedId): Promise<void> {
    if (!watching || closed) return;
    await watching;
    let t = tracked.get(msg.channel);
    if (t && t.epoch === msg.epoch && msg.seq === t.last + 1) {
      t.last = msg.seq;
      deliver(msg);
      return;
    }
    if (!t) {
      await passed(fid);
      t = tracked.get(msg.channel);
      // The reader passed its entry, which made the channel followed; if it is not any more,
      // it was forgotten, which only happens once everything announced was delivered.
      if (!t && compareFeedIds(fid, cursor) <= 0) return;
      // Otherwise the reader gave up on the feed (error): follow from here.
      t ??= track(msg.channel, msg.epoch, msg.seq - 1);
    }
    t.holds++;
    try {
      while (!closed && (t.epoch !== msg.epoch || t.last < msg.seq)) {
        const before = `${t.epoch}.${t.last}`;
        await pump(msg.channel, t);
        // Nothing moved: the message is already trimmed or the epoch moved on again.
        if (`${t.epoch}.${t.last}` === before) break;
      }
    } catch (err) {
      // Stored all the same; the feed catches up on the next entry or reconnect.
      onError(err, `watch read of ${msg.channel}`);
    } finally {
      t.holds--;
    }
  }

  /** A head this process read: follow the channel from it, once the reader is past it. */
  function afterHead(channel: string, epoch: string, seq: number, fid: FeedId): void {
    if (!watching || closed || tracked.has(channel)) return;
    const before = forgotten;
    void watching.then(async () => {
      await passed(fid);
      // Followed meanwhile, or forgotten (it may have been followed past this head).
      if (closed || !reader || tracked.has(channel) || forgotten !== before) return;
      // Not in the feed since the watch began up to this head: nothing before it is owed.
      track(channel, epoch, seq);
    });
  }

  // ---- dedupe ---------------------------------------------------------------------------

  /** Claims this process holds, with the timer that renews their lease. */
  const claims = new Map<string, { token: string; timer: NodeJS.Timeout }>();

  const dropClaim = (key: string) => {
    const c = claims.get(key);
    if (!c) return undefined;
    clearInterval(c.timer);
    claims.delete(key);
    return c;
  };

  // ---- the interface ----------------------------------------------------------------------

  const store: RedisHistoryStore = {
    kind: 'redis',

    async append(channel, payload, opts = {}) {
      ensureOpen();
      const json = JSON.stringify(payload);
      if (json === undefined) throw new SyncError('bad_request', 'payload is not JSON-serializable');
      const at = now();
      const except = opts.except ?? '';
      const token = opts.key === undefined ? `r:${randomId('a')}` : `k:${opts.key}`;
      const [epoch, seq, fid, stamped] = (await run(
        SCRIPTS.append,
        [...channelKeys(channel), keys.token(token)],
        [
          channel,
          randomId('e'),
          String(at),
          json,
          except,
          maxLenArg,
          cutoffArg(),
          feedMaxLen,
          APPEND_TOKEN_TTL_MS,
          opts.author ?? '',
        ],
      )) as [string, number, string, string];
      // `at` of the first append when `key` repeats one.
      const msg: StoredMessage = { channel, seq, epoch, id: `${epoch}.${seq}`, payload, at: Number(stamped) };
      if (opts.except !== undefined) msg.except = opts.except;
      if (opts.author !== undefined) msg.author = opts.author;
      await afterAppend(msg, parseFeedId(fid));
      return msg;
    },

    async read(channel, after, limit, maxBytes = Number.POSITIVE_INFINITY) {
      ensureOpen();
      if (!(limit > 0)) return [];
      let left = Math.min(Math.floor(limit), 1_000_000);
      let from = Math.max(0, Math.floor(after)) + 1;
      const out: StoredMessage[] = [];
      let bytes = 0;
      let seen = 0;
      // With a byte bound, XRANGE in growing batches sized from the payloads seen so far, so
      // a page of large messages fetches about `maxBytes` (plus one batch), not `limit` of
      // them (issue 12); without one, a single XRANGE as before.
      let count = maxBytes === Number.POSITIVE_INFINITY ? left : Math.min(left, 16);
      while (left > 0) {
        const entries = (await redis.call(
          'XRANGE',
          keys.stream(channel),
          `0-${from}`,
          '+',
          'COUNT',
          count,
        )) as RawEntry[];
        for (const raw of entries) {
          const size = payloadLength(raw);
          if (out.length > 0 && bytes + size > maxBytes) return out;
          bytes += size;
          seen++;
          const msg = parseEntry(channel, '', raw);
          if (msg) out.push(msg);
        }
        left -= entries.length;
        const last = entries.at(-1);
        if (entries.length < count || !last || maxBytes === Number.POSITIVE_INFINITY) return out;
        from = Number(last[0].slice(last[0].indexOf('-') + 1)) + 1;
        const average = Math.max(1, bytes / Math.max(1, seen));
        count = Math.max(1, Math.min(left, Math.ceil((maxBytes - bytes) / average) + 1));
      }
      return out;
    },

    async head(channel): Promise<ChannelHead> {
      ensureOpen();
      const [epoch, seq, first, fid] = (await run(SCRIPTS.head, channelKeys(channel), [
        channel,
        randomId('e'),
        processId,
      ])) as [string, number, number, string];
      // A channel a client asks about is followed from here, wherever it is published.
      afterHead(channel, epoch, seq, parseFeedId(fid));
      return { epoch, seq, first };
    },

    async trim(opts = {}) {
      ensureOpen();
      const free = opts.free;
      let cursor = '0';
      do {
        const [next, names] = (await redis.call('SSCAN', keys.channels, cursor, 'COUNT', TRIM_SCAN)) as [
          string,
          string[],
        ];
        cursor = next;
        const cutoff = cutoffArg();
        for (const channel of names) {
          const alive = await run(
            SCRIPTS.trim,
            [keys.meta(channel), keys.stream(channel)],
            [maxLenArg, cutoff, free?.(channel) ? '1' : ''],
          );
          if (alive === 0) await redis.call('SREM', keys.channels, channel);
        }
      } while (cursor !== '0' && !closed);
    },

    async releaseChannels(names: string[], free: (name: string) => boolean): Promise<number> {
      ensureOpen();
      // `free` is asked as each script is sent; a head this process sends after it (a new
      // SUB) runs after it on the same connection and makes a new record. EVAL, not EVALSHA:
      // a NOSCRIPT retry would be sent after such a head and free the record it just read.
      const sent: Array<Promise<unknown>> = [];
      for (const name of names) {
        if (!free(name)) continue;
        sent.push(
          redis.call(
            'EVAL',
            RELEASE_LUA,
            3,
            keys.meta(name),
            keys.stream(name),
            keys.channels,
            name,
            processId,
          ),
        );
      }
      let n = 0;
      for (const r of await Promise.all(sent)) if (Number(r) === 1) n++;
      return n;
    },

    async channelCount() {
      ensureOpen();
      return Number(await redis.call('SCARD', keys.channels));
    },

    async hasChannel(channel) {
      ensureOpen();
      return Number(await redis.call('SISMEMBER', keys.channels, channel)) === 1;
    },

    async broadcast(message) {
      ensureOpen();
      await redis.call('PUBLISH', keys.control, JSON.stringify(message));
    },

    async onBroadcast(listener) {
      ensureOpen();
      controlListeners.add(listener);
      startControl();
      await controlReady;
      return () => {
        controlListeners.delete(listener);
      };
    },

    watch(listener) {
      listeners.add(listener);
      startWatcher();
      return () => {
        listeners.delete(listener);
      };
    },

    async claim(key, ttlMs) {
      ensureOpen();
      const token = randomId('k');
      const lease = Math.max(1, Math.min(claimLeaseMs, ttlMs));
      const reply = (await run(SCRIPTS.claim, [keys.dedupe(key)], [token, lease])) as [string, string?];
      if (reply[0] === 'new') {
        dropClaim(key);
        const timer = setInterval(
          () => {
            run(SCRIPTS.lease, [keys.dedupe(key)], [token, lease])
              .then((held) => {
                if (held === 0) dropClaim(key);
              })
              .catch((err: unknown) => onError(err, 'claim renewal'));
          },
          Math.max(1, Math.floor(lease / 3)),
        );
        timer.unref();
        claims.set(key, { token, timer });
        return { status: 'new' };
      }
      if (reply[0] === 'pending') return { status: 'pending' };
      return { status: 'done', response: JSON.parse(reply[1] ?? 'null') };
    },

    async complete(key, response, ttlMs, limits) {
      ensureOpen();
      dropClaim(key);
      const json = JSON.stringify(response) ?? 'null';
      // The server's `{ f, r }` (dedupe.ts `StoredAnswer`) may be reduced to `{ f }` under byte
      // pressure; any other value is opaque and only dropped whole.
      const v = response as { f?: unknown; r?: unknown } | null;
      const reducible = typeof v?.f === 'string' && v.r !== undefined;
      const cap = (n: number | undefined) =>
        n !== undefined && Number.isFinite(n) ? String(Math.max(0, Math.floor(n))) : '';
      await run(
        SCRIPTS.complete,
        [
          keys.dedupe(key),
          keys.dedupeIndex,
          keys.dedupeSizes,
          keys.dedupeBytes,
          keys.dedupeHoldersN,
          keys.dedupeHoldersB,
          keys.dedupeHoldersKB,
          keys.dedupeHolderOf,
        ],
        [
          `d:${json}`,
          Math.max(1, Math.floor(ttlMs)),
          now(),
          cap(limits?.maxEntries),
          cap(limits?.maxBytes),
          key,
          keys.dedupe(''),
          limits?.holder ?? '',
          keys.dedupeHolder,
          keys.dedupeHolderKept,
          reducible ? '1' : '0',
        ],
      );
    },

    async bind(clientId, owner, ttlMs) {
      ensureOpen();
      const ok = await run(SCRIPTS.bind, [keys.binding(clientId)], [owner, Math.max(1, Math.floor(ttlMs))]);
      return ok === 1;
    },

    async release(key) {
      ensureOpen();
      const c = dropClaim(key);
      if (c) await run(SCRIPTS.lease, [keys.dedupe(key)], [c.token, '']);
    },

    async close() {
      if (closed) return;
      closed = true;
      listeners.clear();
      for (const key of [...claims.keys()]) dropClaim(key);
      tracked.clear();
      releaseWaiters(true);
      const conn = reader;
      reader = null;
      conn?.disconnect();
      controlListeners.clear();
      controlConn?.disconnect();
      controlConn = null;
      if (owned) {
        await redis.quit().catch(() => redis.disconnect());
        redis.off('error', onClientError);
      }
    },
  };
  return store;
}
