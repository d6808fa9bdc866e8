/**
 * Replay answers bounded in bytes (issue 12, fresh attacker findings 1, 2 and 7; PROTOCOL §3
 * rules 8 and 12), against a real server in a child process (`--expose-gc`,
 * test/fixtures/fault-server.ts) on the memory store and a real SQLite file.
 *
 * Before: an HTTP `SUB` built its whole answer at once (up to `replayLimit` messages per
 * channel, no byte bound): 6 unread polls of a 200 × 400 KB channel took a 512 MiB server to
 * SIGABRT, and unread answers stayed in the heap as long as their connection stayed open.
 * Now an answer holds at most `replayPageBytes` of `MSG` text (at least one message), says
 * `more` when cut, answer bytes not yet flushed count against `maxResponseBufferedBytes`
 * (beyond it: 429 with `Retry-After`), and an answer not flushed within
 * `responseDrainTimeoutMs` is destroyed.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { request } from 'node:http';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { type ChildServer, startChildServer } from './helpers/child-server.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const HISTORY = 40;
const MSG_BYTES = 400_000;
const ATTACKERS = 8;
const CHANNEL = 'big';
/**
 * What the unread polls may cost: one answer (≤ replayPageBytes = 1 MiB of text, held as a
 * string and as the buffer written) each, plus slack for GC and the store's own buffers. The
 * code before this bound held each whole 16 MB answer: ≥ 128 MB for 8 of them.
 */
const HEAP_BOUND = ATTACKERS * 2 * MiB + 12 * MiB;

let child: ChildServer | undefined;
const dirs: string[] = [];
const conns: net.Socket[] = [];
afterEach(async () => {
  for (const s of conns.splice(0)) s.destroy();
  await child?.stop();
  child = undefined;
});
afterAll(() => {
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

interface Memory {
  memory: NodeJS.MemoryUsage;
  stats: { responseBufferedBytes: number };
}

/** Poll `check` every 20 ms until it is true; fail after `ms` with `what`. */
async function until(what: string, check: () => Promise<boolean> | boolean, ms = 30_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

const subBody = (id: string, since: number) =>
  JSON.stringify({ id, type: 'SUB', payload: { channels: { [CHANNEL]: { since } } } });

/**
 * A raw HTTP poll of the whole history whose answer is not read: resolves once its first bytes
 * arrived (so the server has answered it), then the socket stops reading. `closed` resolves
 * when the server drops the connection.
 */
function unreadPoll(port: number, i: number): Promise<{ socket: net.Socket; closed: Promise<void> }> {
  return new Promise((resolve, reject) => {
    const body = subBody(`s${i}`, 0);
    const socket = net.connect(port, '127.0.0.1', () => {
      socket.write(
        `POST /sync HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Client-Id: attacker-${i}\r\n` +
          `Content-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`,
      );
    });
    conns.push(socket);
    const closed = new Promise<void>((r) => socket.once('close', () => r()));
    socket.once('data', () => {
      socket.pause();
      resolve({ socket, closed });
    });
    socket.once('error', reject);
  });
}

/** One HTTP poll on its own connection (node:http, no keep-alive pool). */
function poll(port: number, clientId: string, since: number) {
  const body = subBody('h', since);
  return new Promise<{ status: number; retryAfter: string | undefined; body: any[] }>((resolve, reject) => {
    const req = request(
      {
        host: '127.0.0.1',
        port,
        path: '/sync',
        method: 'POST',
        agent: false,
        headers: { 'Content-Type': 'application/json', 'X-Client-Id': clientId },
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.once('end', () =>
          resolve({
            status: res.statusCode ?? 0,
            retryAfter: res.headers['retry-after'] as string | undefined,
            body: JSON.parse(Buffer.concat(chunks).toString()),
          }),
        );
        res.once('error', reject);
      },
    );
    req.once('error', reject);
    req.end(body);
  });
}

/** An honest HTTP client: polls from its cursor, again at once on `more`, after Retry-After on 429. */
async function recoverOverHttp(port: number, clientId: string): Promise<{ seqs: number[]; polls: number }> {
  const seqs: number[] = [];
  let since = 0;
  let polls = 0;
  for (;;) {
    polls++;
    if (polls > 500) throw new Error('too many polls');
    const r = await poll(port, clientId, since);
    if (r.status === 429) {
      await new Promise((res) => setTimeout(res, 1000 * Number(r.retryAfter ?? 1)));
      continue;
    }
    expect(r.status).toBe(200);
    for (const f of r.body) if (f.type === 'MSG') seqs.push(f.seq);
    const state = r.body.at(-1).payload[0].channels[CHANNEL];
    since = state.seq;
    if (!state.more) return { seqs, polls };
  }
}

const stores = (): Array<[string, () => string]> => [
  ['memory', () => 'memory'],
  [
    'SQLite',
    () => {
      const d = mkdtempSync(join(tmpdir(), 'syncwire-pages-'));
      dirs.push(d);
      return `sqlite:${join(d, 'h.db')}`;
    },
  ],
];

describe.each(stores())('%s store', (name, spec) => {
  it('unread HTTP polls of a large history hold about one answer page each; an honest poller recovers everything in order', async () => {
    child = await startChildServer({
      FAULT_SERVER_STORE: spec(),
      FAULT_SERVER_OPTIONS: JSON.stringify({
        maxResponseBufferedBytes: 4 * MiB,
        responseDrainTimeoutMs: 2000,
      }),
    });
    const { port } = child;
    await child.call('publishMany', { channel: CHANNEL, n: HISTORY, bytes: MSG_BYTES }, 60_000);
    const before = await child.call<Memory>('memory');

    await Promise.all(Array.from({ length: ATTACKERS }, (_, i) => unreadPoll(port, i)));
    const during = await child.call<Memory>('memory');
    const growth =
      during.memory.heapUsed + during.memory.external - (before.memory.heapUsed + before.memory.external);
    console.log(
      `[replay-pages] ${name}: heap+external +${(growth / MiB).toFixed(1)} MiB with ${ATTACKERS} unread polls ` +
        `of ${((HISTORY * MSG_BYTES) / MiB).toFixed(0)} MB (bound ${(HEAP_BOUND / MiB).toFixed(1)} MiB); ` +
        `responseBufferedBytes ${during.stats.responseBufferedBytes}`,
    );
    expect(growth).toBeLessThan(HEAP_BOUND);
    // The budget is checked before an answer is built: one answer (≤ 1 MiB + the SYN) past it.
    expect(during.stats.responseBufferedBytes).toBeLessThanOrEqual(4 * MiB + 1.1 * MiB);

    // Another client, meanwhile: every message, in order, in answers cut by bytes.
    const { seqs, polls } = await recoverOverHttp(port, 'honest');
    expect(seqs).toEqual(Array.from({ length: HISTORY }, (_, i) => i + 1));
    expect(polls).toBeGreaterThanOrEqual(HISTORY / 2); // 1 MiB holds 2 messages of 400 KB
  }, 90_000);
});

it('an unflushed answer counts against maxResponseBufferedBytes (429 + Retry-After meanwhile) and is destroyed after responseDrainTimeoutMs', async () => {
  // One answer of the whole 24 MB history, more than the loopback socket buffers take.
  child = await startChildServer({
    FAULT_SERVER_OPTIONS: JSON.stringify({
      replayPageBytes: 64 * MiB,
      maxResponseBufferedBytes: 8 * MiB,
      responseDrainTimeoutMs: 1500,
    }),
  });
  const { port } = child;
  await child.call('publishMany', { channel: CHANNEL, n: 60, bytes: MSG_BYTES }, 60_000);
  const attacker = await unreadPoll(port, 0);
  await until('the answer to be held', async () => {
    const m = await child!.call<Memory>('counts');
    return m.stats.responseBufferedBytes > 8 * MiB;
  });
  const refused = await poll(port, 'honest', 0);
  expect(refused.status).toBe(429);
  expect(refused.retryAfter).toBe('1');
  expect(refused.body[0]).toMatchObject({ type: 'NAK', error: { code: 'rate_limited' } });

  // The answer cannot have been flushed (the attacker reads nothing): only its destruction
  // releases the bytes.
  await until('the held bytes to be released', async () => {
    const m = await child!.call<Memory>('counts');
    return m.stats.responseBufferedBytes === 0;
  });
  // Reading again, the attacker finds its connection closed with the answer cut short.
  let got = 0;
  attacker.socket.on('data', (c: Buffer) => {
    got += c.length;
  });
  attacker.socket.resume();
  await attacker.closed;
  expect(got).toBeLessThan(24_000_000);
  const served = await poll(port, 'honest', 58);
  expect(served.status).toBe(200);
  expect(served.body.filter((f) => f.type === 'MSG').map((f) => f.seq)).toEqual([59, 60]);
}, 60_000);

it("one principal's unread answers hold at most its share (maxResponseBufferedBytesPerPrincipal): its next poll is refused 429, another's is served", async () => {
  child = await startChildServer({
    FAULT_SERVER_OPTIONS: JSON.stringify({
      replayPageBytes: 64 * MiB,
      maxResponseBufferedBytes: 64 * MiB,
      maxResponseBufferedBytesPerPrincipal: 2 * MiB,
      responseDrainTimeoutMs: 1500,
    }),
  });
  const { port } = child;
  await child.call('publishMany', { channel: CHANNEL, n: 60, bytes: MSG_BYTES }, 60_000);
  // Without authenticate each clientId is its own principal: `attacker-0` holds ~24 MB unread.
  await unreadPoll(port, 0);
  await until('the answer to be held', async () => {
    const m = await child!.call<Memory>('counts');
    return m.stats.responseBufferedBytes > 2 * MiB;
  });
  const again = await poll(port, 'attacker-0', 58);
  expect(again.status).toBe(429);
  expect(again.retryAfter).toBe('1');
  expect(again.body[0]).toMatchObject({ type: 'NAK', error: { code: 'rate_limited' } });
  expect(again.body[0].error.message).toContain('for this principal');
  // The server-wide budget is far from reached: another principal is served meanwhile.
  const other = await poll(port, 'honest', 58);
  expect(other.status).toBe(200);
  expect(other.body.filter((f) => f.type === 'MSG').map((f) => f.seq)).toEqual([59, 60]);
  // Once the unread answer is destroyed, the share is free again.
  await until('the held bytes to be released', async () => {
    const m = await child!.call<Memory>('counts');
    return m.stats.responseBufferedBytes === 0;
  });
  const later = await poll(port, 'attacker-0', 58);
  expect(later.status).toBe(200);
}, 60_000);
