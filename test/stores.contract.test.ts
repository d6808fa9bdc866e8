/**
 * The HistoryStore contract run against every store. To add one (e.g. Redis), append its
 * factory to `factories`.
 */

import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { memoryStore } from '../src/stores/memory.js';
import { sqliteStore } from '../src/stores/sqlite.js';
import { type StoreFactory, storeContract } from './helpers/store-contract.js';

const dir = mkdtempSync(join(tmpdir(), 'syncwire-stores-'));
let files = 0;
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const factories: StoreFactory[] = [
  { name: 'memory', durable: false, place: () => 'memory', open: (_place, opts) => memoryStore(opts) },
  {
    name: 'sqlite',
    durable: true,
    dedupe: true,
    place: () => join(dir, `store-${++files}.db`),
    open: (file, opts) => sqliteStore({ file, ...opts }),
  },
];

describe.each(factories)('$name store', (factory) => storeContract(factory));

describe('sqlite store, one process per file', () => {
  it('opens a file made before the author column and adds it; old rows have no author', async () => {
    const file = join(dir, `store-${++files}.db`);
    const first = sqliteStore({ file });
    await first.append('old', 'before');
    await first.close();
    // Take the file back to the older schema (no author_id column).
    const { default: Database } = await import('better-sqlite3');
    const db = new Database(file);
    db.exec('ALTER TABLE messages DROP COLUMN author_id');
    db.close();
    const again = sqliteStore({ file });
    try {
      await again.append('old', 'after', { author: 'c-1' });
      const read = await again.read('old', 0, 10);
      expect(read.map((m) => [m.payload, m.author])).toEqual([
        ['before', undefined],
        ['after', 'c-1'],
      ]);
    } finally {
      await again.close();
    }
  });

  it('a reopened file remembers answered dedupe claims and forgets pending ones', async () => {
    const file = join(dir, `store-${++files}.db`);
    const store = sqliteStore({ file });
    await store.claim('c3:done', 60_000);
    await store.complete('c3:done', { answered: true }, 60_000);
    await store.claim('c3:pending', 60_000);
    await store.close();
    // The process that held 'c3:pending' is gone: nobody is processing it any more.
    const again = sqliteStore({ file });
    try {
      expect(await again.claim('c3:done', 60_000)).toEqual({ status: 'done', response: { answered: true } });
      expect(await again.claim('c3:pending', 60_000)).toEqual({ status: 'new' });
    } finally {
      await again.close();
    }
  });
});
