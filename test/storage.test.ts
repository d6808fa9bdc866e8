/**
 * Client storage: what keeps clientId and cursors across reloads. The file storage is what a
 * Node client uses; a reload is a second storage reading the same file.
 */
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { fileStorage } from '../src/client/file-storage.js';
import { memoryStorage, webStorage } from '../src/client/index.js';
import { type Rig, rig, until } from './helpers/harness.js';

let r: Rig | undefined;
const dirs: string[] = [];
afterEach(async () => {
  await r?.close();
  r = undefined;
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

describe('storage', () => {
  it('fileStorage survives a reload: clientId and cursors come back from the file', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'syncwire-storage-'));
    dirs.push(dir);
    const path = join(dir, 'client.json');
    r = await rig();
    const a = r.client({ storage: fileStorage(path) });
    const got: number[] = [];
    a.messages$.subscribe((m) => got.push(m.seq));
    await a.subscribe('notes', { since: 0 });
    for (let i = 0; i < 3; i++) await r.server.publish('notes', { i });
    await until(() => got.length === 3, 5000, 'three messages');
    await a.close();
    await until(
      () => JSON.parse(readFileSync(path, 'utf8'))['syncwire:cursors']?.includes('"seq":3'),
      5000,
      'flush',
    );
    for (let i = 3; i < 5; i++) await r.server.publish('notes', { i });

    const b = r.client({ storage: fileStorage(path), channels: { notes: {} } });
    expect(b.clientId).toBe(a.clientId);
    const later: number[] = [];
    b.messages$.subscribe((m) => later.push(m.seq));
    await until(() => later.length === 2, 5000, 'the two missed');
    expect(later).toEqual([4, 5]);
  });

  it('webStorage reads and writes through a Storage, and swallows quota errors', () => {
    const map = new Map<string, string>();
    const s = webStorage({ getItem: (k) => map.get(k) ?? null, setItem: (k, v) => void map.set(k, v) });
    s.set('a', '1');
    expect(s.get('a')).toBe('1');
    const full = webStorage({
      getItem: () => null,
      setItem: () => {
        throw new Error('QuotaExceededError');
      },
    });
    expect(() => full.set('a', '1')).not.toThrow();
  });

  it('memoryStorage is the default and keeps nothing across instances', () => {
    const a = memoryStorage();
    a.set('k', 'v');
    expect(a.get('k')).toBe('v');
    expect(memoryStorage().get('k')).toBeNull();
  });
});
