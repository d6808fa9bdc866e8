/**
 * A client storage in a JSON file, for Node clients (`syncwire/storage/file`). Kept out of the
 * main entry so browser bundlers never see `node:fs`.
 */
import { readFileSync, renameSync, writeFileSync } from 'node:fs';
import { lock } from 'proper-lockfile';
import { Holders, MapOutbox, type SyncStorage } from './storage.js';

/** Key of the outbox inside the file (clientId → { ops, batches }). */
const OUTBOX = '#outbox';

export interface FileStorageOptions {
  /**
   * Milliseconds after which the lock of a holder that stopped refreshing it (a crashed or
   * killed process) counts as stale and is taken over. The holder refreshes it every
   * `stale / 2` ms. proper-lockfile's minimum is 2000. @default 3000
   */
  stale?: number;
}

const message = (err: unknown) => String((err as Error)?.message ?? err);

/**
 * A JSON file holding clientId, cursors and the outbox, held by ONE live client at a time.
 *
 * - **Exclusive.** The client that uses it takes the file's lock (`<path>.lock`, a directory,
 *   through `proper-lockfile`) before it loads the outbox; `close()` and a normal process exit
 *   release it. A lock whose holder died (SIGKILL, crash, power loss) is stale after `stale` ms
 *   and taken over, so a restart recovers the outbox; `loaded` waits for that (≤ `stale` + 1 s).
 *   A second live client on the same file (another process, or another client in this one)
 *   gets a `storage` failure saying the file is in use, never loads or writes that file, and
 *   works from memory with its own random identity (nothing of it survives its process).
 *   The same when one `fileStorage` object is given to two live clients that would share a
 *   clientId (the second reports the storage in use and works from a memory storage of its
 *   own); clients with different `storageKey`s share an object. A client made on the object
 *   while the holder of its clientId is closing (`close()` called, not resolved, even in the
 *   same tick: `SyncLocks.closing`) waits for its release, then takes the file, the identity
 *   and the outbox; a refused one stays refused (memory only) even if the holder releases
 *   before its claim completes.
 * - **What was sent.** The outbox keeps each operation as the JSON text `send()` made of it:
 *   changing the object after `send()` changes neither the file nor what a restart resends.
 *   The file's format is unchanged (`op` is the operation as JSON), so a file written by an
 *   earlier version loads, and an earlier version loads this one's.
 * - **Atomic.** Every write goes through a temporary file and a rename, so a crash never leaves
 *   half a file. Each outbox change the client makes is written synchronously, before the
 *   operation is sent; the client makes one per tick for the operations `send()` accepted in
 *   it (one microtask after the first, once `loaded` has resolved), so a process that exits in
 *   the same tick as `send()` loses them: `await client.close()` before exiting writes them
 *   (README "When an operation is on disk"). Cursor changes are coalesced to one write per tick.
 * - **Failures are reported, never thrown** (`failures$`/`onFailure`, kind `storage`): a write
 *   that fails (missing folder, read-only directory, full disk) keeps the data in memory and the
 *   next change tries the whole file again; a file that cannot be parsed (truncated JSON) is
 *   renamed to `<path>.corrupt-<ms since epoch>` (kept for inspection) and the client starts
 *   fresh: a new identity, an empty outbox.
 */
export function fileStorage(path: string, options: FileStorageOptions = {}): SyncStorage {
  const stale = Math.max(options.stale ?? 3000, 2000);
  let handler: ((err: unknown) => void) | null = null;
  /** Failures seen before the client installed its handler. */
  const early: unknown[] = [];
  const fail = (err: unknown) => {
    if (!handler) return void early.push(err);
    try {
      handler(err);
    } catch {
      // A failing handler must not turn a storage failure into a crash.
    }
  };

  /**
   * The file's content; `{}` when missing. Only the lock holder (`owner`) reports a bad file
   * and moves a corrupt one aside: the file of another live client is not ours to touch.
   */
  const read = (owner: boolean): Record<string, unknown> => {
    let text: string;
    try {
      text = readFileSync(path, 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException)?.code !== 'ENOENT' && owner) fail(err);
      return {};
    }
    try {
      const d = JSON.parse(text) as unknown;
      if (d && typeof d === 'object' && !Array.isArray(d)) return d as Record<string, unknown>;
      throw new Error('not a JSON object');
    } catch (err) {
      if (!owner) return {};
      const aside = `${path}.corrupt-${Date.now()}`;
      try {
        renameSync(path, aside);
        fail(new Error(`state file ${path} is corrupt (${message(err)}); kept as ${aside}; starting fresh`));
      } catch (err2) {
        fail(
          new Error(
            `state file ${path} is corrupt (${message(err)}) and could not be kept aside: ${message(err2)}`,
          ),
        );
      }
      return {};
    }
  };

  /**
   * `waiting`: not (yet) holding the lock, nothing is written; `owner`: holding it;
   * `elsewhere`: another live client holds it, memory only; `lost`: the lock was taken from us.
   */
  let mode: 'waiting' | 'owner' | 'elsewhere' | 'lost' = 'waiting';
  /** ClientIds held by live clients of this object, and which of them are closing. */
  const holders = new Holders();
  const left = (clientId: string) => holders.release(clientId);
  /**
   * Why the last claim was refused, fixed when it was refused (not when the client asks: by
   * then the holder may have released the file, and a refused client must not take a new
   * identity in it).
   */
  let refusal: 'private' | 'rename' = 'rename';
  /** The claim under way, if any. */
  let claiming: Promise<void> | null = null;
  // Read once, unlocked (writes are atomic renames), for the identity `createSyncClient` reads
  // synchronously; read again once the lock is held.
  let data: Record<string, unknown> = read(false);
  /** The file's values as this object last knew them (its first read, then each locked read). */
  let seen: Record<string, unknown> = { ...data };
  /** Keys set before the lock was held: they win over the file's on the second read. */
  const local = new Map<string, string>();
  let dirty = false;
  const flush = () => {
    if (mode !== 'owner') return;
    dirty = false;
    try {
      const tmp = `${path}.${process.pid}.tmp`;
      // The outbox's operations go in as the JSON text send() made (MapOutbox.toText), not
      // re-serialized from objects the app may have changed since.
      const head = JSON.stringify(data);
      const box = `${JSON.stringify(OUTBOX)}:${outbox.toText()}`;
      writeFileSync(tmp, head === '{}' ? `{${box}}` : `${head.slice(0, -1)},${box}}`);
      renameSync(tmp, path);
    } catch (err) {
      fail(err);
    }
  };
  const outbox = MapOutbox.fromJSON(data[OUTBOX], () => {
    dirty = true;
    flush();
  });
  delete data[OUTBOX];
  /** Replace what is in memory with `raw` (outbox in place: the client holds that object). */
  const adopt = (raw: Record<string, unknown>) => {
    const fresh = MapOutbox.fromJSON(raw[OUTBOX]);
    outbox.data.clear();
    for (const [k, v] of fresh.data) outbox.data.set(k, v);
    data = { ...raw };
    delete data[OUTBOX];
    for (const [k, v] of local) data[k] = v;
  };

  return {
    get: (k) => (typeof data[k] === 'string' ? (data[k] as string) : null),
    set: (k, v) => {
      data[k] = v;
      if (mode === 'waiting') local.set(k, v);
      if (!dirty) {
        dirty = true;
        queueMicrotask(() => {
          if (dirty) flush();
        });
      }
    },
    outbox,
    locks: {
      async claim(clientId) {
        for (;;) {
          // One claim at a time on this object (two clients made in one tick on one object).
          while (claiming) await claiming;
          // Its holder is closing: wait for its release (the file's last write), then take it.
          const leaving = holders.leaving(clientId);
          if (!leaving) break;
          await leaving;
        }
        if (mode === 'owner') {
          // Another client on this same object: one live client per clientId (different
          // storageKeys share the object); refused, it goes on from memory (`refused`).
          if (holders.has(clientId)) {
            refusal = 'private';
            return null;
          }
          holders.add(clientId);
          return () => left(clientId);
        }
        if (mode !== 'waiting') {
          refusal = 'rename';
          return () => {};
        }
        const first = takeFile(clientId);
        claiming = first.then(
          () => {},
          () => {},
        );
        try {
          return await first;
        } finally {
          claiming = null;
        }
      },
      /**
       * Refused by this object (its owner already holds the clientId): the client leaves the
       * object alone and works from memory; refused by the file's lock (another process or
       * object), the storage has already gone memory-only and the client takes a new identity.
       */
      get refused() {
        return refusal;
      },
      closing: (clientId) => holders.markClosing(clientId),
      watch: () => () => {},
    },
    onError: (h) => {
      handler = h;
      for (const err of early.splice(0)) fail(err);
    },
  };

  /** Take the file's lock for `clientId`'s client (the first claim on this object). */
  async function takeFile(clientId: string): Promise<(() => Promise<void>) | null> {
    let release: () => Promise<void>;
    try {
      // Only a held lock is waited for (long enough to see a dead holder's go stale); any
      // other error (a missing folder) is final at once.
      const deadline = Date.now() + stale + 1000;
      for (;;) {
        try {
          release = await lock(path, {
            stale,
            realpath: false,
            onCompromised: (err) => {
              mode = 'lost';
              fail(new Error(`lost the lock of ${path} (${message(err)}); this client goes on from memory`));
            },
          });
          break;
        } catch (err) {
          if ((err as NodeJS.ErrnoException)?.code !== 'ELOCKED' || Date.now() >= deadline) throw err;
          await new Promise((resolve) => setTimeout(resolve, 250));
        }
      }
    } catch (err) {
      if ((err as NodeJS.ErrnoException)?.code === 'ELOCKED') {
        mode = 'elsewhere';
        refusal = 'rename';
        adopt(Object.fromEntries(local));
        fail(
          new Error(
            `state file ${path} is in use by another live client (lock ${path}.lock); this client works from memory with its own identity`,
          ),
        );
        return null;
      }
      // No lock possible (a missing folder, a read-only one): reported; the file is used
      // unlocked, its writes then fail and are reported in turn.
      fail(err);
      mode = 'owner';
      adopt(read(true));
      local.clear();
      if (dirty) flush();
      holders.add(clientId);
      return async () => left(clientId);
    }
    const raw = read(true);
    // The file changed since this object read it (another object or process gave it an
    // identity meanwhile, e.g. both made on a new file) and the client chose `clientId` from
    // that stale read: taking the file would overwrite the file's identity and strand its
    // outbox. Refused instead, like a file in use: this client goes on from memory, the file
    // keeps its identity and operations for the next client.
    const stranded = [...local].find(
      ([k, v]) => v === clientId && typeof raw[k] === 'string' && raw[k] !== v && raw[k] !== seen[k],
    );
    if (stranded) {
      mode = 'elsewhere';
      refusal = 'rename';
      adopt(Object.fromEntries(local));
      fail(
        new Error(
          `state file ${path} was given another identity (${String(raw[stranded[0]])}) since this storage object read it; this client works from memory with its own identity`,
        ),
      );
      try {
        await release();
      } catch (err) {
        fail(err);
      }
      return null;
    }
    mode = 'owner';
    adopt(raw);
    seen = { ...raw };
    local.clear();
    if (dirty) flush();
    holders.add(clientId);
    return async () => {
      holders.delete(clientId);
      try {
        if (mode !== 'owner') return;
        if (dirty) flush();
        mode = 'waiting';
        try {
          await release();
        } catch (err) {
          fail(err);
        }
      } finally {
        // A client waiting for this one's release (created while it was closing) goes on.
        left(clientId);
      }
    };
  }
}

export type { SyncStorage } from './storage.js';
