/**
 * Bytes on the wire per publication, for the author and for one other subscriber
 * (docs/consistency.md). One batch of one op, whose onSync publishes one state-assigning
 * change, over real sockets on 127.0.0.1; frames are counted as the server sends them (JSON
 * text, no WebSocket framing).
 *
 *   node --import tsx bench/publication-bytes.ts [path/to/src]   # default: this checkout's src
 *
 * Run against another checkout's src to compare (how the before/after numbers were made).
 */
import { resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import { WebSocket } from 'ws';

const src = resolve(process.argv[2] ?? 'src');
const { createSyncServer } = (await import(
  pathToFileURL(`${src}/server/index.ts`).href
)) as typeof import('../src/server/index.js');

const change = { id: 'i-3k9x2a', value: { id: 'i-3k9x2a', text: 'milk', done: false } };

async function measure(label: string, resultsCarryChanges: boolean) {
  const server = await createSyncServer({
    port: 0,
    onSync: async (ops, ctx) => {
      await ctx.publish('list', { changes: [change] });
      return ops.map(() => (resultsCarryChanges ? { ok: true, changes: [change] } : { ok: true }));
    },
  });
  const url = `ws://127.0.0.1:${server.address().port}/sync`;
  const open = (id: string) =>
    new Promise<{ ws: WebSocket; frames: string[] }>((res) => {
      const ws = new WebSocket(`${url}?clientId=${id}`);
      const frames: string[] = [];
      ws.on('message', (d) => frames.push(String(d)));
      ws.on('open', () => res({ ws, frames }));
    });
  const until = async (cond: () => boolean) => {
    for (let i = 0; i < 1000 && !cond(); i++) await new Promise((r) => setTimeout(r, 2));
    if (!cond()) throw new Error('timed out');
  };
  const author = await open('c-author1');
  const other = await open('c-other01');
  for (const p of [author, other]) {
    p.ws.send(JSON.stringify({ id: 'c-x:1', type: 'SUB', payload: { channels: { list: {} } } }));
    await until(() => p.frames.some((f) => f.includes('"SYN"')));
    p.frames.length = 0;
  }
  author.ws.send(JSON.stringify({ id: 'c-author1:2', type: 'SYN', payload: [{ op: 'add', text: 'milk' }] }));
  await until(() => author.frames.some((f) => f.includes('"SYN"')) && other.frames.length > 0);
  const bytes = (fs: string[], type: string) =>
    fs.filter((f) => JSON.parse(f).type === type).reduce((n, f) => n + Buffer.byteLength(f), 0);
  const row = {
    label,
    authorMsg: bytes(author.frames, 'MSG'),
    authorResponse: bytes(author.frames, 'SYN'),
    authorAck: bytes(author.frames, 'ACK'),
    otherMsg: bytes(other.frames, 'MSG'),
  };
  console.log(JSON.stringify(row));
  console.log(`  frames to the author: ${author.frames.join(' ')}`);
  author.ws.close();
  other.ws.close();
  await server.close();
}

await measure('results with changes', true);
await measure('results without changes', false);
