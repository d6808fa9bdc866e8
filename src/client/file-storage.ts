/**
 * A client storage in a JSON file, for Node clients (`syncwire/storage/file`). Kept out of the
 * main entry so browser bundlers never see `node:fs`.
 */
import { readFileSync, renameSync, writeFileSync } from 'node:fs';
import { MapOutbox, type SyncStorage } from './storage.js';

/** Key of the outbox inside the file (clientId → { ops, batches }). */
const OUTBOX = '#outbox';

/**
 * A JSON file holding clientId, cursors and the outbox. Read once at creation (a missing or
 * unreadable file starts empty). Every write goes through a temporary file and a rename, so a
 * crash never leaves half a file. Outbox changes are written synchronously, before the
 * operation is sent (so a process that exits right after `send()` keeps it); cursor changes are
 * coalesced to one write per tick.
 *
 * A write that fails (missing folder, read-only directory, full disk) never throws: it goes to
 * the handler the client installs (`failures$`, kind `storage`) and the data stays in memory;
 * the next change tries the whole file again.
 */
export function fileStorage(path: string): SyncStorage {
  let data: Record<string, unknown> = {};
  try {
    data = JSON.parse(readFileSync(path, 'utf8'));
    if (!data || typeof data !== 'object') data = {};
  } catch {
    data = {};
  }
  let onError: (err: unknown) => void = () => {};
  let dirty = false;
  const flush = () => {
    dirty = false;
    try {
      const tmp = `${path}.${process.pid}.tmp`;
      writeFileSync(tmp, JSON.stringify({ ...data, [OUTBOX]: outbox.toJSON() }));
      renameSync(tmp, path);
    } catch (err) {
      try {
        onError(err);
      } catch {
        // A failing handler must not turn a storage failure into a crash.
      }
    }
  };
  const outbox = MapOutbox.fromJSON(data[OUTBOX], flush);
  delete data[OUTBOX];
  return {
    get: (k) => (typeof data[k] === 'string' ? (data[k] as string) : null),
    set: (k, v) => {
      data[k] = v;
      if (!dirty) {
        dirty = true;
        queueMicrotask(() => {
          if (dirty) flush();
        });
      }
    },
    outbox,
    onError: (handler) => {
      onError = handler;
    },
  };
}

export type { SyncStorage } from './storage.js';
