/**
 * The HistoryStore contract run against every store. To add one (e.g. Redis), append its
 * factory to `factories`.
 */

import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe } from 'vitest';
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
    place: () => join(dir, `store-${++files}.db`),
    open: (file, opts) => sqliteStore({ file, ...opts }),
  },
];

describe.each(factories)('$name store', (factory) => storeContract(factory));
