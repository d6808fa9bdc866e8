/**
 * Benchmark server: raw `ws` 8, the floor every contender is compared with. Each text frame
 * is a JSON operation `{ id, … }`; the server parses it and answers `{ id, ok: true }` (the
 * ACK). No batching, no dedupe, no replay: the least work an acknowledged message can cost.
 */
import { WebSocketServer } from 'ws';
import { serve } from './common.js';

const wss = new WebSocketServer({ host: '127.0.0.1', port: 0, perMessageDeflate: false });
let open = 0;
wss.on('connection', (ws) => {
  open++;
  ws.on('message', (data) => {
    const op = JSON.parse(String(data)) as { id: unknown };
    ws.send(JSON.stringify({ id: op.id, ok: true }));
  });
  ws.on('close', () => open--);
  ws.on('error', () => {});
});
await new Promise<void>((resolve) => wss.once('listening', () => resolve()));
const { port } = wss.address() as { port: number };

serve(
  port,
  { connections: () => open },
  () =>
    new Promise<void>((resolve) => {
      for (const c of wss.clients) c.terminate();
      wss.close(() => resolve());
    }),
);
