/**
 * A client storage in a JSON file, for Node clients (`syncwire/storage/file`). Kept out of the
 * main entry so browser bundlers never see `node:fs`.
 */
import { readFileSync, renameSync, writeFileSync } from 'node:fs';
import type { SyncStorage } from './storage.js';

/**
 * A JSON file. Read once at creation; writes are coalesced to one per tick and go through a
 * temporary file and a rename, so a crash never leaves half a file.
 */
export function fileStorage(path: string): SyncStorage {
  let data: Record<string, string> = {};
  try {
    data = JSON.parse(readFileSync(path, 'utf8'));
  } catch {
    data = {};
  }
  let dirty = false;
  const flush = () => {
    dirty = false;
    const tmp = `${path}.${process.pid}.tmp`;
    writeFileSync(tmp, JSON.stringify(data));
    renameSync(tmp, path);
  };
  return {
    get: (k) => data[k] ?? null,
    set: (k, v) => {
      data[k] = v;
      if (!dirty) {
        dirty = true;
        queueMicrotask(flush);
      }
    },
  };
}

export type { SyncStorage } from './storage.js';
