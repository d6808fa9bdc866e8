/**
 * Benchmark server: socket.io 4.8 on the websocket transport only (no HTTP long-polling),
 * per-message deflate off like the others. Operations are `emit('op', op, ack)` answered
 * `ack({ id, ok: true })`. With BENCH_RECOVERY=1, `connectionStateRecovery` is on (its
 * default two minutes) and every socket joins the room `bench`, for the replay measure.
 */
import { createServer } from 'node:http';
import { Server } from 'socket.io';
import { serve, until } from './common.js';

const recovery = process.env.BENCH_RECOVERY === '1';
const http = createServer();
const io = new Server(http, {
  transports: ['websocket'],
  perMessageDeflate: false,
  serveClient: false,
  ...(recovery
    ? { connectionStateRecovery: { maxDisconnectionDuration: 120_000, skipMiddlewares: true } }
    : {}),
});
let recovered = 0;
io.on('connection', (socket) => {
  if (socket.recovered) recovered++;
  else if (recovery) socket.join('bench');
  socket.on('op', (op: { id: unknown }, ack?: (r: unknown) => void) => ack?.({ id: op.id, ok: true }));
});
await new Promise<void>((resolve) => http.listen(0, '127.0.0.1', () => resolve()));
const { port } = http.address() as { port: number };

serve(
  port,
  {
    connections: () => io.engine.clientsCount,
    recovered: () => recovered,
    /**
     * Emit `n` messages `{ i, filler }` to the room `bench`. With `whenEmpty`, first wait
     * until no live socket is in the room (the client's disconnect has been seen), so that
     * every message goes to the recovery buffer and none to a socket that is already dead.
     */
    async publish(args) {
      const n = Number(args.n);
      const from = Number(args.from ?? 0);
      const filler = String(args.filler ?? '');
      if (args.whenEmpty) {
        await until(() => (io.of('/').adapter.rooms.get('bench')?.size ?? 0) === 0, 10_000, 'room to empty');
      }
      for (let i = from; i < from + n; i++) io.to('bench').emit('msg', { i, filler });
      return n;
    },
  },
  () =>
    new Promise<void>((resolve) => {
      io.close(() => resolve());
    }),
);
