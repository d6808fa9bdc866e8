/**
 * S6D item 1: the channel cursors' last write belongs to `close()`.
 *
 * Cursor writes are throttled when the storage is slow (FIX14E F6: a write that took w ms
 * lets the next start 9·w ms after it). The throttled write used to be a timer `close()` did
 * not clear: it landed after `close()` resolved. A client opened right after on the same
 * storage (a reload) then read the older cursor (it resumed too early: duplicates), and the
 * late write could put the old cursor back over its newer one. Now `close()` writes the
 * latest cursor once (none when unchanged) before it resolves, and nothing is written after.
 *
 * Against a real reference server on loopback, with a slow storage stand-in (a `set` that
 * takes SLOW_MS, wrapping `memoryStorage()` or a real `fileStorage` file): after `close()`
 * resolves, the test waits past the deadline of the write the old code left behind (known:
 * the last write's end + 9 × its duration) and checks that nothing was written, that the
 * next client resumed from the cursor `close()` wrote (no duplicate), and that the stored
 * cursor never went back.
 */
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { fileStorage } from '../src/client/file-storage.js';
import type { ChannelMessage, SyncClient } from '../src/client/index.js';
import { memoryStorage, type SyncStorage } from '../src/client/storage.js';
import { type Rig, rig, until } from './helpers/harness.js';

const SLOW_MS = 40;
const KEY = 'syncwire:cursors';

let r: Rig | undefined;
const dirs: string[] = [];
afterEach(async () => {
  await r?.close();
  r = undefined;
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

/** Burn `ms` of CPU: a storage whose `set` is slow (a busy disk, a big localStorage value). */
function busy(ms: number) {
  const end = performance.now() + ms;
  while (performance.now() < end) {
    // spin
  }
}

interface Write {
  seq: number | undefined;
  /** performance.now() when the write ended. */
  end: number;
  took: number;
}

/**
 * `inner` seen through one client: every cursor write is logged (with its seq of `ch`), and
 * takes `slowMs` when asked. Outbox, locks and error handler are the inner storage's.
 */
function tap(inner: SyncStorage, slowMs: number) {
  const writes: Write[] = [];
  const storage: SyncStorage = {
    get: (k) => inner.get(k),
    set: (k, v) => {
      const t0 = performance.now();
      if (k === KEY) busy(slowMs);
      inner.set(k, v);
      if (k === KEY) {
        const end = performance.now();
        writes.push({
          seq: (JSON.parse(v) as Record<string, { seq?: number }>).ch?.seq,
          end,
          took: end - t0,
        });
      }
    },
    outbox: inner.outbox,
    locks: inner.locks,
    onError: inner.onError ? (h) => inner.onError!(h) : undefined,
  };
  return { storage, writes };
}

/** Every value the cursor key takes in `inner`, from whichever client, must not go back. */
function monotonic(inner: SyncStorage) {
  const seen: Array<number | undefined> = [];
  const set = inner.set.bind(inner);
  inner.set = (k, v) => {
    if (k === KEY) seen.push((JSON.parse(v) as Record<string, { seq?: number }>).ch?.seq);
    set(k, v);
  };
  return seen;
}

const storedSeq = (s: SyncStorage) =>
  (JSON.parse(s.get(KEY) ?? '{}') as Record<string, { seq?: number }>).ch?.seq;

function seqs(c: SyncClient) {
  const out: number[] = [];
  c.messages$.subscribe((m: ChannelMessage) => {
    if (m.channel === 'ch') out.push(m.seq);
  });
  return out;
}

/**
 * Client A (slow storage) gets seq 1 (written at once, slowly) and seq 2 (its write now
 * waits for the throttle), then closes. Client B opens on the same storage right after,
 * resumes, gets 3 and 4. Returns what the checks need.
 */
async function reload(inner: SyncStorage, readStored: () => number | undefined) {
  r = await rig();
  const everyValue = monotonic(inner);
  const a = tap(inner, SLOW_MS);
  const A = r.client({ storage: a.storage });
  const seenA = seqs(A);
  await A.subscribe('ch');
  await r.server.publish('ch', { changes: [1] });
  await until(() => a.writes.some((w) => w.seq === 1), 5000, 'A writes seq 1');
  await r.server.publish('ch', { changes: [2] });
  await until(() => seenA.includes(2), 5000, 'A gets seq 2');
  const last = a.writes.at(-1)!;
  // The write of seq 2 waits for the throttle (not yet due): the case this suite is about.
  const pendingUntil = last.end + 9 * last.took;
  expect(performance.now()).toBeLessThan(pendingUntil);
  expect(readStored()).toBe(1);
  const writesBeforeClose = a.writes.length;
  await A.close();
  const writesAtClose = a.writes.length;
  const storedAtClose = readStored();

  // Reloaded: a new client on the same storage, resuming from the stored cursor.
  const b = tap(inner, 0);
  const B = r.client({ storage: b.storage });
  const seenB = seqs(B);
  await B.subscribe('ch');
  await r.server.publish('ch', { changes: [3] });
  await r.server.publish('ch', { changes: [4] });
  await until(() => seenB.includes(4), 5000, 'B gets seq 4');
  await until(() => readStored() === 4, 5000, 'B writes seq 4');
  // Past the deadline of the write the old code left pending (a timer due at `pendingUntil`).
  await until(
    () => performance.now() > pendingUntil + 50,
    pendingUntil - performance.now() + 5000,
    'A deadline',
  );
  return { a, writesBeforeClose, writesAtClose, storedAtClose, seenB, everyValue, B };
}

describe('close() writes the latest cursor once, and nothing after', () => {
  it('slow memory storage: the cursor pending at close() is written before it resolves; the next client resumes there and its cursor never goes back', async () => {
    const inner = memoryStorage();
    const x = await reload(inner, () => storedSeq(inner));
    expect(x.writesAtClose - x.writesBeforeClose, 'one write in close()').toBe(1);
    expect(x.storedAtClose, 'stored when close() resolved').toBe(2);
    expect(x.a.writes.length, 'no write after close() resolved').toBe(x.writesAtClose);
    expect(x.seenB, 'B resumed after seq 2: no duplicate').toEqual([3, 4]);
    expect(storedSeq(inner)).toBe(4);
    const values = x.everyValue.filter((v) => v !== undefined) as number[];
    expect(values, 'the stored cursor never goes back').toEqual([...values].sort((p, q) => p - q));
  });

  it('slow fileStorage (a real file, one storage object reloaded): the file holds the cursor when close() resolves, and B keeps its newer one', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'syncwire-cursor-close-'));
    dirs.push(dir);
    const path = join(dir, 'state.json');
    const inner = fileStorage(path);
    const fromFile = () => {
      try {
        const d = JSON.parse(readFileSync(path, 'utf8')) as Record<string, unknown>;
        return typeof d[KEY] === 'string'
          ? (JSON.parse(d[KEY] as string) as Record<string, { seq?: number }>).ch?.seq
          : undefined;
      } catch {
        return undefined;
      }
    };
    const x = await reload(inner, fromFile);
    expect(x.writesAtClose - x.writesBeforeClose, 'one write in close()').toBe(1);
    expect(x.storedAtClose, 'in the file when close() resolved').toBe(2);
    expect(x.a.writes.length, 'no write after close() resolved').toBe(x.writesAtClose);
    expect(x.seenB, 'B resumed after seq 2: no duplicate').toEqual([3, 4]);
    await x.B.close();
    expect(fromFile(), 'the file keeps B’s cursor').toBe(4);
    const values = x.everyValue.filter((v) => v !== undefined) as number[];
    expect(values, 'the stored cursor never goes back').toEqual([...values].sort((p, q) => p - q));
  });

  it('close() with no cursor change since the last write writes nothing', async () => {
    r = await rig();
    const inner = memoryStorage();
    const a = tap(inner, 0);
    const A = r.client({ storage: a.storage });
    const seen = seqs(A);
    await A.subscribe('ch');
    await r.server.publish('ch', { changes: [1] });
    await until(() => seen.includes(1) && a.writes.some((w) => w.seq === 1), 5000, 'seq 1 written');
    const before = a.writes.length;
    await A.close();
    expect(a.writes.length).toBe(before);
    expect(storedSeq(inner)).toBe(1);
  });
});
