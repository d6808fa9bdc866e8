/**
 * Channels over real sockets on loopback: replay from a cursor, the hand-over from replay
 * to live under load, recovery verdicts, authorization, HTTP polling, echo suppression and
 * a durable store surviving a server restart.
 */

import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import type { HistoryStore, StoredMessage, SyncServer } from '../src/server/index.js';
import { memoryStore } from '../src/stores/memory.js';
import { sqliteStore } from '../src/stores/sqlite.js';
import { eventually, type Frame, harness, httpUrl, is, post, type RawSocket } from './helpers/raw.js';

const h = harness();
const range = (from: number, to: number) =>
  Array.from({ length: Math.max(0, to - from + 1) }, (_, i) => from + i);
const msgs = (frames: Frame[], channel?: string) =>
  frames.filter((f) => f.type === 'MSG' && (channel === undefined || f.channel === channel));

async function publishMany(server: SyncServer, channel: string, n: number) {
  let last = { seq: 0, epoch: '' };
  for (let i = 1; i <= n; i++) last = await server.publish(channel, { n: i });
  return last;
}

/** Resolves once everything sent before now was handled: the PNG's ACK comes after it. */
async function settle(sock: RawSocket, id = `png-${Math.random()}`) {
  sock.send({ id, type: 'PNG' });
  return sock.until(is.ack(id));
}

const sub = (id: string, channels: Record<string, object>) => ({ id, type: 'SUB', payload: { channels } });

describe('replay', () => {
  it('gives a late joiner with since 0 the whole history in order, then the response', async () => {
    const server = await h.start();
    const { epoch } = await publishMany(server, 'chat', 5);
    const sock = await h.socket(server);
    const frames = await sock.request(sub('s1', { chat: { since: 0 } }));
    expect(frames[0]).toEqual({ id: 's1', type: 'ACK' });
    expect(frames.slice(1, -1)).toEqual(
      range(1, 5).map((seq) => ({
        id: expect.any(String),
        type: 'MSG',
        channel: 'chat',
        seq,
        epoch,
        payload: { n: seq },
        replay: true,
      })),
    );
    expect(frames.at(-1)).toEqual({
      id: 's1',
      type: 'SYN',
      payload: [{ channels: { chat: { epoch, seq: 5, recovered: true } } }],
    });
  });

  it('replays only what follows since when the epoch matches', async () => {
    const server = await h.start();
    const { epoch } = await publishMany(server, 'chat', 5);
    const sock = await h.socket(server);
    const frames = await sock.request(sub('s1', { chat: { since: 3, epoch } }));
    expect(msgs(frames).map((m) => m.seq)).toEqual([4, 5]);
    expect(frames.at(-1).payload[0].channels.chat).toEqual({ epoch, seq: 5, recovered: true });
  });

  it('replays the last k with rewind, never before what is retained', async () => {
    const server = await h.start({ store: memoryStore({ maxMessages: 6 }) });
    await publishMany(server, 'chat', 10);
    const sock = await h.socket(server);
    const three = await sock.request(sub('r3', { chat: { rewind: 3 } }));
    expect(msgs(three).map((m) => m.seq)).toEqual([8, 9, 10]);
    expect(msgs(three).every((m) => m.replay === true)).toBe(true);
    expect(three.at(-1).payload[0].channels.chat).toMatchObject({ seq: 10, recovered: true });
    const all = await sock.request(sub('r100', { chat: { rewind: 100 } }));
    expect(msgs(all).map((m) => m.seq)).toEqual(range(5, 10));
  });

  it('starts live from the head with no cursor', async () => {
    const server = await h.start();
    const { epoch } = await publishMany(server, 'chat', 4);
    const sock = await h.socket(server);
    const frames = await sock.request(sub('s1', { chat: {} }));
    expect(frames).toEqual([
      { id: 's1', type: 'ACK' },
      { id: 's1', type: 'SYN', payload: [{ channels: { chat: { epoch, seq: 4, recovered: true } } }] },
    ]);
    await server.publish('chat', 'live');
    expect(await sock.next()).toEqual({
      id: expect.any(String),
      type: 'MSG',
      channel: 'chat',
      seq: 5,
      epoch,
      payload: 'live',
    });
  });

  it('goes live after the replay', async () => {
    const server = await h.start();
    await publishMany(server, 'chat', 3);
    const sock = await h.socket(server);
    await sock.request(sub('s1', { chat: { since: 0 } }));
    await server.publish('chat', 'four');
    await server.publish('chat', 'five');
    const live = [await sock.next(), await sock.next()];
    expect(live.map((m) => [m.seq, m.payload, m.replay])).toEqual([
      [4, 'four', undefined],
      [5, 'five', undefined],
    ]);
  });

  it('replays and answers several channels in one SUB', async () => {
    const server = await h.start();
    const a = await publishMany(server, 'a', 2);
    const b = await publishMany(server, 'b', 3);
    const sock = await h.socket(server);
    const frames = await sock.request(sub('s1', { a: { since: 0 }, b: { since: 1 }, c: {} }));
    expect(msgs(frames, 'a').map((m) => m.seq)).toEqual([1, 2]);
    expect(msgs(frames, 'b').map((m) => m.seq)).toEqual([2, 3]);
    expect(frames.at(-1).payload[0].channels).toEqual({
      a: { epoch: a.epoch, seq: 2, recovered: true },
      b: { epoch: b.epoch, seq: 3, recovered: true },
      c: { epoch: expect.any(String), seq: 0, recovered: true },
    });
  });

  it('restarts the replay when a subscribed channel is subscribed again', async () => {
    const server = await h.start();
    await publishMany(server, 'chat', 3);
    const sock = await h.socket(server);
    await sock.request(sub('s1', { chat: { since: 0 } }));
    const again = await sock.request(sub('s2', { chat: { since: 1 } }));
    expect(msgs(again).map((m) => m.seq)).toEqual([2, 3]);
    await server.publish('chat', 'four');
    const rest = await settle(sock);
    expect(msgs(rest).map((m) => m.seq)).toEqual([4]); // once, not once per SUB
  });

  it('stops a channel on UNS and answers [{}]', async () => {
    const server = await h.start();
    const sock = await h.socket(server);
    await sock.request(sub('s1', { chat: {}, other: {} }));
    const frames = await sock.request({
      id: 'u1',
      type: 'UNS',
      payload: { channels: ['chat', 'never-subscribed'] },
    });
    expect(frames).toEqual([
      { id: 'u1', type: 'ACK' },
      { id: 'u1', type: 'SYN', payload: [{}] },
    ]);
    await server.publish('chat', 'gone');
    await server.publish('other', 'kept');
    expect(msgs(await settle(sock)).map((m) => m.channel)).toEqual(['other']);
  });
});

/**
 * A memory store whose reads take a turn of the event loop, as a networked store's do, so
 * that a replay really overlaps live publishes (an in-process read finishes in one turn).
 */
function slowReads(store: HistoryStore): HistoryStore {
  return {
    ...store,
    kind: store.kind,
    read: async (channel, after, limit) => {
      await new Promise((r) => setImmediate(r));
      return store.read(channel, after, limit);
    },
  };
}

describe('hand-over from replay to live', () => {
  it.each([
    ['memory', 1000, 1],
    ['slow-read', 1000, 1],
    ['slow-read', 7, 1],
    // Publishing outruns the replay: the live buffer overflows and is re-read from the store.
    ['slow-read', 5, 20],
  ] as const)(
    'delivers seq 1..N exactly once, in order, while a publisher hammers the channel (%s store, replayLimit %i, %i per turn)',
    { timeout: 15_000 },
    async (kind, replayLimit, burst) => {
      const store = kind === 'memory' ? memoryStore() : slowReads(memoryStore());
      const server = await h.start({ replayLimit, store });
      const N = 2000;
      const replaying = await h.socket(server);
      const joiningLive = await h.socket(server);
      const responded = (sock: RawSocket) => sock.received.some((f) => f.type === 'SYN');
      for (let i = 1; i <= N; i++) {
        if (i === 201) {
          replaying.send(sub('s1', { storm: { since: 0 } }));
          joiningLive.send(sub('s2', { storm: {} }));
        }
        // The last quarter goes out after both SUBs were answered, so the live side of the
        // hand-over is exercised as well as the replay side.
        if (i === 1500)
          await eventually(() => responded(replaying) && responded(joiningLive), 10_000, 'responses');
        await server.publish('storm', { i });
        // Let socket traffic in between publishes, as a real server's would.
        if (i % burst === 0) await new Promise((r) => setImmediate(r));
      }
      for (const sock of [replaying, joiningLive]) {
        await eventually(() => sock.received.some(is.msg('storm', N)), 10_000, 'last message');
      }

      for (const [sock, id] of [
        [replaying, 's1'],
        [joiningLive, 's2'],
      ] as const) {
        const seqs = msgs(sock.received).map((m) => m.seq);
        expect(seqs).toEqual(range(id === 's1' ? 1 : seqs[0]!, N));
        expect(msgs(sock.received).every((m) => m.payload.i === m.seq)).toBe(true);
        // The response reports the last seq sent before it.
        const response = sock.received.find(is.syn(id));
        const before = msgs(sock.received.slice(0, sock.received.indexOf(response)));
        expect(before.at(-1)?.seq ?? seqs[0]! - 1).toBe(response.payload[0].channels.storm.seq);
        expect(response.payload[0].channels.storm.seq).toBeLessThan(1500);
      }
    },
  );
});

describe('recovery verdict', () => {
  it('answers recovered:false and replays what is retained when the epoch differs', async () => {
    const server = await h.start();
    const { epoch } = await publishMany(server, 'chat', 3);
    const sock = await h.socket(server);
    const frames = await sock.request(sub('s1', { chat: { since: 2, epoch: 'e-from-before-a-restart' } }));
    expect(msgs(frames).map((m) => m.seq)).toEqual([1, 2, 3]);
    expect(frames.at(-1).payload[0].channels.chat).toEqual({ epoch, seq: 3, recovered: false });
  });

  it('answers recovered:false when the cursor is older than what is retained', async () => {
    const server = await h.start({ store: memoryStore({ maxMessages: 5 }) });
    const { epoch } = await publishMany(server, 'chat', 10); // retains 6..10
    const sock = await h.socket(server);
    const stale = await sock.request(sub('old', { chat: { since: 4, epoch } }));
    expect(msgs(stale).map((m) => m.seq)).toEqual(range(6, 10));
    expect(stale.at(-1).payload[0].channels.chat).toEqual({ epoch, seq: 10, recovered: false });
    const justInTime = await sock.request(sub('edge', { chat: { since: 5, epoch } }));
    expect(msgs(justInTime).map((m) => m.seq)).toEqual(range(6, 10));
    expect(justInTime.at(-1).payload[0].channels.chat.recovered).toBe(true);
  });

  it('answers recovered:false when the client is ahead of the server', async () => {
    const server = await h.start();
    const { epoch } = await publishMany(server, 'chat', 3);
    const sock = await h.socket(server);
    const frames = await sock.request(sub('s1', { chat: { since: 50, epoch } }));
    expect(msgs(frames).map((m) => m.seq)).toEqual([1, 2, 3]);
    expect(frames.at(-1).payload[0].channels.chat).toEqual({ epoch, seq: 3, recovered: false });
  });
});

describe('history reset under a live subscriber', () => {
  it('drops the socket (1011) so that the client re-subscribes and learns recovered:false', async () => {
    const inner = memoryStore();
    const listeners: ((m: StoredMessage) => void)[] = [];
    const store: HistoryStore = {
      ...inner,
      watch: (l) => {
        listeners.push(l);
        return inner.watch(l);
      },
    };
    const server = await h.start({ store });
    await publishMany(server, 'chat', 2);
    const sock = await h.socket(server);
    await sock.request(sub('s1', { chat: {} }));
    // What a shared store reports after its history was wiped: a new epoch, seq from 1.
    const reset = { channel: 'chat', seq: 1, epoch: 'e-reset', id: 'm-reset', payload: 'x', at: Date.now() };
    for (const l of listeners) l(reset);
    expect((await sock.closed).code).toBe(1011);
    expect(msgs(sock.received)).toEqual([]);
  });
});

describe('authorization', () => {
  it('refuses only the forbidden channel of a SUB: its entry says forbidden, the others are served', async () => {
    const asked: unknown[] = [];
    const server = await h.start<string>({
      authenticate: () => 'alice',
      authorize: (principal, channel, action) => {
        asked.push([principal, channel, action]);
        return channel !== 'secret';
      },
    });
    const { epoch } = await publishMany(server, 'public', 2);
    await publishMany(server, 'secret', 2);
    const sock = await h.socket(server);
    const frames = await sock.request(sub('s1', { public: { since: 0 }, secret: { since: 0 } }));
    expect(frames[0]).toEqual({ id: 's1', type: 'ACK' });
    expect(msgs(frames, 'secret')).toEqual([]);
    expect(msgs(frames, 'public').map((m) => m.seq)).toEqual([1, 2]);
    expect(frames.at(-1)).toEqual({
      id: 's1',
      type: 'SYN',
      payload: [
        {
          channels: {
            public: { epoch, seq: 2, recovered: true },
            secret: { error: { code: 'forbidden', message: expect.any(String) } },
          },
        },
      ],
    });
    expect(asked).toContainEqual(['alice', 'secret', 'subscribe']);
    // The allowed channel is live; the refused one is not.
    await server.publish('public', 'later');
    await server.publish('secret', 'later');
    const later = msgs(await settle(sock));
    expect(later.map((m) => [m.channel, m.seq])).toEqual([['public', 3]]);
    expect(server.stats().channels).toBe(1);
  });

  it('answers a forbidden channel with its error entry over HTTP too', async () => {
    const server = await h.start({ authorize: async (_p, channel) => channel !== 'secret' });
    await publishMany(server, 'secret', 2);
    const reply = await post(httpUrl(server), 'c1', sub('s1', { secret: { since: 0 } }));
    expect(reply.status).toBe(200);
    expect(reply.body).toEqual([
      { id: 's1', type: 'ACK' },
      {
        id: 's1',
        type: 'SYN',
        payload: [{ channels: { secret: { error: { code: 'forbidden', message: expect.any(String) } } } }],
      },
    ]);
  });
});

describe('HTTP polling', () => {
  it('returns [ACK, MSG…, SYN] at once, at most replayLimit per channel, with more:true when cut', async () => {
    const server = await h.start({ replayLimit: 5 });
    const { epoch } = await publishMany(server, 'chat', 12);
    const poll = async (since: number) =>
      (await post(httpUrl(server), 'c1', sub('p', { chat: { since, epoch } }))).body;

    const first = await poll(0);
    expect(first[0]).toEqual({ id: 'p', type: 'ACK' });
    expect(msgs(first).map((m) => [m.seq, m.replay])).toEqual(range(1, 5).map((s) => [s, true]));
    expect(first.at(-1)).toEqual({
      id: 'p',
      type: 'SYN',
      payload: [{ channels: { chat: { epoch, seq: 5, recovered: true, more: true } } }],
    });
    const second = await poll(5);
    expect(msgs(second).map((m) => m.seq)).toEqual(range(6, 10));
    expect(second.at(-1).payload[0].channels.chat.more).toBe(true);
    const last = await poll(10);
    expect(msgs(last).map((m) => m.seq)).toEqual([11, 12]);
    expect(last.at(-1).payload[0].channels.chat).toEqual({ epoch, seq: 12, recovered: true });
    const idle = await poll(12);
    expect(idle).toEqual([
      { id: 'p', type: 'ACK' },
      { id: 'p', type: 'SYN', payload: [{ channels: { chat: { epoch, seq: 12, recovered: true } } }] },
    ]);
    expect(server.stats().channels).toBe(0); // no live subscription for HTTP
  });

  it('answers UNS over HTTP with [ACK, SYN [{}]]', async () => {
    const server = await h.start();
    const reply = await post(httpUrl(server), 'c1', {
      id: 'u',
      type: 'UNS',
      payload: { channels: ['chat'] },
    });
    expect(reply.body).toEqual([
      { id: 'u', type: 'ACK' },
      { id: 'u', type: 'SYN', payload: [{}] },
    ]);
  });
});

describe('echo suppression', () => {
  it('sends the author a payload-less echo (except: author) and everybody else the payload', async () => {
    const server = await h.start({
      onSync: async (ops, ctx) => {
        for (const op of ops) await ctx.publish('chat', op, { except: ctx.clientId });
        return ops.map(() => 'ok');
      },
    });
    const author = await h.socket(server, 'author');
    const reader = await h.socket(server, 'reader');
    await author.request(sub('s', { chat: {} }));
    await reader.request(sub('s', { chat: {} }));
    const frames = await author.request({ id: 'w1', type: 'SYN', payload: [{ text: 'hi' }] });
    const echo = msgs(frames)[0];
    expect(echo).toEqual({
      id: expect.any(String),
      type: 'MSG',
      channel: 'chat',
      seq: 1,
      epoch: expect.any(String),
      echo: true,
    });
    expect(echo).not.toHaveProperty('payload');
    expect(await reader.next(is.msg('chat', 1))).toMatchObject({ seq: 1, payload: { text: 'hi' } });
    expect(msgs(await settle(reader))).toEqual([]); // once

    // Replays carry the echo too, on either transport, so the author's cursor stays dense.
    const again = await h.socket(server, 'author');
    const replay = msgs(await again.request(sub('r', { chat: { since: 0 } })));
    expect(replay).toEqual([expect.objectContaining({ seq: 1, echo: true, replay: true })]);
    expect(replay[0]).not.toHaveProperty('payload');
    const polled = msgs((await post(httpUrl(server), 'author', sub('p', { chat: { since: 0 } }))).body);
    expect(polled[0]).toMatchObject({ seq: 1, echo: true });
    expect(polled[0]).not.toHaveProperty('payload');
    const others = msgs((await post(httpUrl(server), 'reader', sub('p', { chat: { since: 0 } }))).body);
    expect(others[0]).toMatchObject({ seq: 1, payload: { text: 'hi' } });
  });

  it('by default sends the author its payload marked echo, before the response that lists it', async () => {
    const server = await h.start({
      onSync: async (ops, ctx) => {
        await ctx.publish('chat', ops[0]);
        return ops;
      },
    });
    const author = await h.socket(server, 'author');
    await author.request(sub('s', { chat: {} }));
    const frames = await author.request({ id: 'w1', type: 'SYN', payload: ['mine'] });
    const m = msgs(frames)[0]!;
    expect(m).toMatchObject({ seq: 1, payload: 'mine', echo: true });
    const response = frames.find((f) => f.type === 'SYN' && f.id === 'w1') as { published?: unknown };
    expect(response.published).toEqual([{ channel: 'chat', seq: 1, epoch: m.epoch }]);
    expect(frames.indexOf(m)).toBeLessThan(frames.indexOf(response as never));
    // Replays carry the payload and the mark too.
    const polled = msgs((await post(httpUrl(server), 'author', sub('p', { chat: { since: 0 } }))).body);
    expect(polled[0]).toMatchObject({ seq: 1, payload: 'mine', echo: true });
  });

  it('sends the author the payload without the mark when author is cleared', async () => {
    const server = await h.start({
      onSync: async (ops, ctx) => {
        await ctx.publish('chat', ops[0], { author: undefined });
        return ops;
      },
    });
    const author = await h.socket(server, 'author');
    await author.request(sub('s', { chat: {} }));
    const frames = await author.request({ id: 'w1', type: 'SYN', payload: ['mine'] });
    expect(msgs(frames)[0]).toMatchObject({ seq: 1, payload: 'mine' });
    expect(msgs(frames)[0]).not.toHaveProperty('echo');
  });

  it('honours except on server.publish', async () => {
    const server = await h.start();
    const a = await h.socket(server, 'a');
    await a.request(sub('s', { chat: {} }));
    await server.publish('chat', 'not for a', { except: 'a' });
    const m = await a.next(is.msg('chat', 1));
    expect(m.echo).toBe(true);
    expect(m).not.toHaveProperty('payload');
  });
});

describe('durable history (sqlite)', () => {
  const dir = mkdtempSync(join(tmpdir(), 'syncwire-replay-'));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it('resumes with recovered:true and the rest after a server restart on the same file', async () => {
    const file = join(dir, 'restart.db');
    const first = await h.start({ store: sqliteStore({ file }) });
    const { epoch } = await publishMany(first, 'chat', 5);
    await first.close();

    const second = await h.start({ store: sqliteStore({ file }) });
    expect(await second.publish('chat', { n: 6 })).toEqual({ seq: 6, epoch });
    const sock = await h.socket(second);
    const frames = await sock.request(sub('s1', { chat: { since: 3, epoch } }));
    expect(msgs(frames).map((m) => [m.seq, m.payload, m.epoch])).toEqual([
      [4, { n: 4 }, epoch],
      [5, { n: 5 }, epoch],
      [6, { n: 6 }, epoch],
    ]);
    expect(frames.at(-1).payload[0].channels.chat).toEqual({ epoch, seq: 6, recovered: true });
  });

  it('answers recovered:false after a restart on a memory store (history lost)', async () => {
    const first = await h.start();
    const { epoch } = await publishMany(first, 'chat', 3);
    await first.close();
    const second = await h.start();
    const sock = await h.socket(second);
    const frames = await sock.request(sub('s1', { chat: { since: 3, epoch } }));
    expect(frames.at(-1).payload[0].channels.chat).toMatchObject({ seq: 0, recovered: false });
    expect(frames.at(-1).payload[0].channels.chat.epoch).not.toBe(epoch);
  });
});
