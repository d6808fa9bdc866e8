/**
 * Benchmark server: the syncwire reference server (src/server), default options except a
 * memory store retaining 100,000 messages per channel (the default 10,000 is exactly the
 * replay size; the bench should not measure a boundary), and `anonymousKey: 'clientId'`: the
 * bench connects up to 1000 anonymous clients from 127.0.0.1, which the default per-address
 * limits (64 sockets, 200 HTTP requests/s) would refuse (docs/benchmarks.md). `onSync` does no work: one result
 * `{ id, ok: true }` per operation. `publish` appends to a channel from inside this process.
 *
 * Which build: `BENCH_SERVER=<path to the built server index.js>` (what `npm run bench` sets,
 * after building: the package as it ships), otherwise the TypeScript source through tsx, whose
 * `keepNames` wraps every function created at run time in a `__name` call (docs/benchmarks.md).
 */
import { resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import type * as SourceServer from '../../src/server/index.js';
import { serve } from './common.js';

const { createSyncServer, memoryStore }: typeof SourceServer = process.env.BENCH_SERVER
  ? await import(pathToFileURL(resolve(process.env.BENCH_SERVER)).href)
  : await import('../../src/server/index.js');

const server = await createSyncServer({
  port: 0,
  store: memoryStore({ maxMessages: 100_000 }),
  anonymousKey: 'clientId',
  onSync: (ops) => ops.map((op) => ({ id: (op as { id: unknown }).id, ok: true })),
});

serve(
  server.address().port,
  {
    connections: () => server.stats().sockets,
    /** Publish `n` messages `{ i, filler }` to `channel`, in order; resolves with the last seq. */
    async publish(args) {
      const channel = String(args.channel);
      const n = Number(args.n);
      const from = Number(args.from ?? 0);
      const filler = String(args.filler ?? '');
      let seq = 0;
      for (let i = from; i < from + n; i++) seq = (await server.publish(channel, { i, filler })).seq;
      return seq;
    },
  },
  () => server.close(),
);
