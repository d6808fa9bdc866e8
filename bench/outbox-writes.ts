/**
 * What one `fileStorage` outbox write per `send()` would cost against one per tick (README
 * "When an operation is on disk"): n operations of ~60 bytes added one by one (a file rewrite
 * each) or in one `add` (one rewrite). `node --import tsx bench/outbox-writes.ts`
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileStorage } from '../src/client/file-storage.js';
import type { OutboxEntry } from '../src/client/storage.js';

async function run(n: number, perOp: boolean): Promise<number> {
  const dir = mkdtempSync(join(tmpdir(), 'syncwire-writes-'));
  const s = fileStorage(join(dir, 'c.json'));
  const release = await s.locks!.claim('c');
  const entries: OutboxEntry[] = Array.from({ length: n }, (_, i) => ({
    key: `inst:o${i}`,
    at: Date.now(),
    n: i,
    json: JSON.stringify({ id: `op-${i}`, value: 'x'.repeat(32) }),
  }));
  const t0 = performance.now();
  if (perOp) for (const e of entries) s.outbox!.add('c', [e]);
  else s.outbox!.add('c', entries);
  const ms = performance.now() - t0;
  await release?.();
  rmSync(dir, { recursive: true, force: true });
  return ms;
}

for (const n of [100, 1000, 5000]) {
  const tick = await run(n, false);
  const each = await run(n, true);
  console.log(`n=${n}: one write per tick ${tick.toFixed(1)} ms, one write per send() ${each.toFixed(1)} ms`);
}
