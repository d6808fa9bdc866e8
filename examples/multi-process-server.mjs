// One syncwire server process on a shared Redis: run several with different PORTs behind a
// round-robin balancer (README, "Several server processes"). Needs `npm run build` first.
import { createSyncServer } from 'syncwire/server';
import { redisStore } from 'syncwire/stores/redis';

const port = Number(process.env.PORT ?? 8081);
const store = await redisStore(
  { url: process.env.REDIS_URL ?? 'redis://127.0.0.1:6379' },
  { prefix: 'example:' },
);
const server = await createSyncServer({
  port,
  store,
  // Every client, the author too, gets each change from the channel at its seq
  // (docs/consistency.md); the results need not repeat them.
  onSync: async (ops, { publish }) => {
    for (const op of ops) await publish('board', { changes: [op], by: port });
    return ops.map(() => ({ ok: true, by: port }));
  },
});
console.log(`syncwire process on ws://127.0.0.1:${server.address().port}/sync`);
for (const sig of ['SIGINT', 'SIGTERM']) process.on(sig, () => server.close().then(() => process.exit(0)));
