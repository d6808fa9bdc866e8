/**
 * Where a client keeps what must survive a reload: its clientId and its channel cursors.
 * Synchronous by design (localStorage is; a file is read once), so a client starts at once.
 * The Node file storage lives in `syncwire/storage/file` (./file-storage.ts), so that
 * browser bundles never meet `node:fs`.
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
