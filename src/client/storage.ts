/**
 * Where a client keeps what must survive a reload: its clientId and its channel cursors.
 * Synchronous by design (localStorage is; a file is read once), so a client starts at once.
 */

export interface SyncStorage {
  get(key: string): string | null;
  set(key: string, value: string): void;
}

/** In memory: survives nothing. The default. */
export function memoryStorage(): SyncStorage {
  const map = new Map<string, string>();
  return { get: (k) => map.get(k) ?? null, set: (k, v) => void map.set(k, v) };
}

/** A browser's `localStorage` (or `sessionStorage`). */
export function webStorage(
  store: Pick<Storage, 'getItem' | 'setItem'> = globalThis.localStorage,
): SyncStorage {
  return {
    get: (k) => store.getItem(k),
    set: (k, v) => {
      try {
        store.setItem(k, v);
      } catch {
        // Quota exceeded or private mode: cursors then live only in memory.
      }
    },
  };
}

/**
 * A JSON file, for Node. Read once at creation; writes are coalesced to one per tick and
 * go through a temporary file and a rename, so a crash never leaves half a file.
 */
export async function fileStorage(path: string): Promise<SyncStorage> {
  const fs = await import('node:fs');
  let data: Record<string, string> = {};
  try {
    data = JSON.parse(fs.readFileSync(path, 'utf8'));
  } catch {
    data = {};
  }
  let dirty = false;
  const flush = () => {
    dirty = false;
    const tmp = `${path}.${process.pid}.tmp`;
    fs.writeFileSync(tmp, JSON.stringify(data));
    fs.renameSync(tmp, path);
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
