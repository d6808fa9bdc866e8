/**
 * Message replay from the client's side (PROTOCOL.md §3 rules 5–8): late joiners, clients
 * that were away, a restarted server on its SQLite file, trimmed history, forbidden channels,
 * polling while degraded, and resuming from storage. Real server, real sockets, real SQLite.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { type ChannelMessage, memoryStorage, type SyncClient } from '../src/client/index.js';
import { createSyncServer } from '../src/server/index.js';
import { sqliteStore } from '../src/stores/sqlite.js';
import { next, type Rig, reach, rig, T, until } from './helpers/harness.js';

let r: Rig | undefined;
const dirs: string[] = [];
afterEach(async () => {
  await r?.close();
  r = undefined;
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

const tmp = () => {
  const d = mkdtempSync(join(tmpdir(), 'syncwire-replay-'));
  dirs.push(d);
  return d;
};

/** Record a channel's messages and assert density: seqs strictly consecutive, no duplicate. */
function recorder(c: SyncClient, channel: string) {
  const got: ChannelMessage[] = [];
  c.messages$.subscribe((m) => {
    if (m.channel === channel) got.push(m);
  });
  return {
    got,
    seqs: () => got.map((m) => m.seq),
    waitCount: (n: number, ms = 10_000) => until(() => got.length >= n, ms, `${n} messages on ${channel}`),
  };
}

const range = (a: number, b: number) => Array.from({ length: b - a + 1 }, (_, i) => a + i);

async function publishN(rg: Rig, channel: string, n: number, from = 1) {
  for (let i = 0; i < n; i++) await rg.server.publish(channel, { n: from + i });
}

describe('replay', () => {
  it('a late joiner with since: 0 gets the whole history, in order, before subscribe() resolves', async () => {
    r = await rig();
    await publishN(r, 'doc', 50);
    const c = r.client();
    const rec = recorder(c, 'doc');
    const res = await c.subscribe('doc', { since: 0 });
    expect(res).toMatchObject({ seq: 50, recovered: true });
    expect(rec.seqs()).toEqual(range(1, 50));
    expect(rec.got.every((m) => m.replay)).toBe(true);
    expect(rec.got.map((m) => (m.payload as { n: number }).n)).toEqual(range(1, 50));
    // …then live, with no gap
    await r.server.publish('doc', { n: 51 });
    await rec.waitCount(51);
    expect(rec.got.at(-1)).toMatchObject({ seq: 51, replay: false });
  });

  it('rewind: k replays the last k; no option means live from the head', async () => {
    r = await rig();
    await publishN(r, 'rw', 10);
    const a = r.client();
    const ra = recorder(a, 'rw');
    await a.subscribe('rw', { rewind: 3 });
    expect(ra.seqs()).toEqual([8, 9, 10]);
    const b = r.client();
    const rb = recorder(b, 'rw');
    expect(await b.subscribe('rw')).toMatchObject({ seq: 10, recovered: true });
    expect(rb.got).toEqual([]);
    await r.server.publish('rw', { n: 11 });
    await rb.waitCount(1);
    await ra.waitCount(4);
    expect(rb.seqs()).toEqual([11]);
  });

  it('a client that misses 1,000 messages while disconnected gets all on reconnect: 0 lost, 0 duplicated, five times in a row', async () => {
    r = await rig();
    const c = r.client({ pollInterval: 600_000, maxBackoff: 4 * T });
    const rec = recorder(c, 'feed');
    await c.subscribe('feed', { since: 0 });
    let published = 0;
    for (let round = 0; round < 5; round++) {
      r.proxy.refuse = true;
      r.proxy.kill();
      await reach(c, 'degraded');
      await publishN(r, 'feed', 1000, published + 1);
      published += 1000;
      r.proxy.refuse = false;
      await reach(c, 'open', 30 * T);
      await rec.waitCount(published, 20_000);
      expect(rec.seqs()).toEqual(range(1, published));
    }
    expect(new Set(rec.got.map((m) => (m.payload as { n: number }).n)).size).toBe(5000);
  }, 60_000);

  it('a client that had received nothing before its socket dropped still recovers', async () => {
    r = await rig();
    const c = r.client({ pollInterval: 600_000, maxBackoff: 4 * T });
    const rec = recorder(c, 'empty');
    expect(await c.subscribe('empty')).toMatchObject({ seq: 0, recovered: true });
    r.proxy.refuse = true;
    r.proxy.kill();
    await reach(c, 'degraded');
    await publishN(r, 'empty', 20);
    r.proxy.refuse = false;
    await reach(c, 'open', 30 * T);
    await rec.waitCount(20);
    expect(rec.seqs()).toEqual(range(1, 20));
  });

  it('a server restarted on the same SQLite file: clients resume with recovered: true', async () => {
    const file = join(tmp(), 'history.db');
    const first = await createSyncServer({ port: 0, onSync: async (o) => o, store: sqliteStore({ file }) });
    const port = first.address().port;
    for (let i = 1; i <= 30; i++) await first.publish('durable', { n: i });
    const { WebSocket } = await import('ws');
    const { createSyncClient } = await import('../src/client/index.js');
    const c = createSyncClient({
      url: `ws://127.0.0.1:${port}/sync`,
      timeout: T,
      maxBackoff: 2 * T,
      pollInterval: 600_000,
      WebSocket: WebSocket as never,
    });
    try {
      const rec = recorder(c, 'durable');
      const sub = await c.subscribe('durable', { since: 0 });
      expect(sub.recovered).toBe(true);
      const epoch = sub.epoch;
      await first.close();
      await reach(c, 'degraded');
      const second = await createSyncServer({ port, onSync: async (o) => o, store: sqliteStore({ file }) });
      try {
        for (let i = 31; i <= 40; i++) await second.publish('durable', { n: i });
        const resets: string[] = [];
        c.resets$.subscribe((x) => resets.push(x.channel));
        await reach(c, 'open', 30 * T);
        await rec.waitCount(40);
        expect(rec.seqs()).toEqual(range(1, 40));
        expect(c.cursors().durable).toEqual({ epoch, seq: 40 });
        expect(resets).toEqual([]);
      } finally {
        await second.close();
      }
    } finally {
      await c.close();
    }
  });

  it('a restart that loses history (memory store) resets a client that had messages, not one that had none', async () => {
    const first = await createSyncServer({ port: 0, onSync: async (o) => o });
    const port = first.address().port;
    const { WebSocket } = await import('ws');
    const { createSyncClient } = await import('../src/client/index.js');
    const mk = () =>
      createSyncClient({
        url: `ws://127.0.0.1:${port}/sync`,
        timeout: T,
        maxBackoff: 2 * T,
        pollInterval: 600_000,
        WebSocket: WebSocket as never,
      });
    const had = mk();
    const none = mk();
    try {
      await had.subscribe('lost', { since: 0 });
      await none.subscribe('quiet', { since: 0 });
      const hadRec = recorder(had, 'lost');
      await first.publish('lost', { n: 1 });
      await hadRec.waitCount(1);
      const resets: string[] = [];
      had.resets$.subscribe((x) => resets.push(x.channel));
      none.resets$.subscribe((x) => resets.push(x.channel));
      await first.close();
      await reach(had, 'degraded');
      const second = await createSyncServer({ port, onSync: async (o) => o });
      try {
        await second.publish('quiet', { n: 1 });
        const noneRec = recorder(none, 'quiet');
        await reach(had, 'open', 30 * T);
        await reach(none, 'open', 30 * T);
        await until(() => resets.includes('lost'), 5000, 'reset of lost');
        await noneRec.waitCount(1);
        expect(noneRec.seqs()).toEqual([1]);
        expect(resets).toEqual(['lost']);
      } finally {
        await second.close();
      }
    } finally {
      await had.close();
      await none.close();
    }
  });

  it('dedupe survives a restart on the SQLite file: a batch retried after it is not applied again', async () => {
    const file = join(tmp(), 'dedupe.db');
    const applied = new Map<string, number>();
    const onSync = async (ops: unknown[]) =>
      ops.map((o) => {
        const id = (o as { id: string }).id;
        applied.set(id, (applied.get(id) ?? 0) + 1);
        return { id, n: applied.get(id) };
      });
    const syn = JSON.stringify({ id: 'dd:1', type: 'SYN', payload: [{ id: 'once' }] });
    const post = (port: number) =>
      fetch(`http://127.0.0.1:${port}/sync`, {
        method: 'POST',
        headers: { 'content-type': 'application/json', 'x-client-id': 'dd' },
        body: syn,
      }).then((res) => res.json());
    const first = await createSyncServer({ port: 0, onSync, store: sqliteStore({ file }) });
    const port = first.address().port;
    const before = await post(port);
    await first.close();
    const second = await createSyncServer({ port, onSync, store: sqliteStore({ file }) });
    try {
      const after = await post(port);
      expect(after).toEqual(before);
      expect(before[1]).toEqual({ id: 'dd:1', type: 'SYN', payload: [{ id: 'once', n: 1 }] });
      expect(applied.get('once')).toBe(1);
    } finally {
      await second.close();
    }
  });

  it('history trimmed past the cursor: recovered: false and a reset event', async () => {
    r = await rig({ store: (await import('../src/server/index.js')).memoryStore({ maxMessages: 10 }) });
    const c = r.client({ pollInterval: 600_000, maxBackoff: 4 * T });
    const rec = recorder(c, 'trim');
    await publishN(r, 'trim', 5);
    await c.subscribe('trim', { since: 0 });
    expect(rec.seqs()).toEqual(range(1, 5));
    r.proxy.refuse = true;
    r.proxy.kill();
    await reach(c, 'degraded');
    await publishN(r, 'trim', 50, 6); // seqs 6..55; only 46..55 retained
    const reset = next(c.resets$, (x) => x.channel === 'trim', 30 * T);
    r.proxy.refuse = false;
    await reach(c, 'open', 30 * T);
    expect(await reset).toMatchObject({ channel: 'trim' });
    await rec.waitCount(15);
    expect(rec.seqs()).toEqual([...range(1, 5), ...range(46, 55)]);
  });

  it('a forbidden channel: subscribe rejects with forbidden and no MSG of it reaches the client', async () => {
    r = await rig({ authorize: (_p, channel) => !channel.startsWith('secret') });
    await publishN(r, 'secret-1', 5);
    const c = r.client();
    const seen: ChannelMessage[] = [];
    c.messages$.subscribe((m) => seen.push(m));
    await expect(c.subscribe('secret-1', { since: 0 })).rejects.toMatchObject({
      name: 'SyncError',
      code: 'forbidden',
    });
    await c.subscribe('public', { since: 0 });
    await r.server.publish('secret-1', { n: 6 });
    await r.server.publish('public', { n: 1 });
    await until(() => seen.length >= 1, 5000, 'public message');
    expect(seen.map((m) => m.channel)).toEqual(['public']);
    expect(r.proxy.traffic.some((t) => t.frame.type === 'MSG' && t.frame.channel === 'secret-1')).toBe(false);
  });

  it('while degraded, polling delivers every message exactly once; back on the socket, none lost or repeated', async () => {
    r = await rig();
    const c = r.client({ pollInterval: T, maxBackoff: 60_000 });
    const rec = recorder(c, 'poll');
    await c.subscribe('poll', { since: 0 });
    r.proxy.refuse = true;
    r.proxy.kill();
    await reach(c, 'degraded');
    await publishN(r, 'poll', 30);
    await rec.waitCount(30, 10_000);
    expect(r.proxy.traffic.some((t) => t.via === 'http' && t.frame.type === 'SUB')).toBe(true);
    r.proxy.refuse = false;
    // Publish across the switch back to the socket.
    const publishing = publishN(r, 'poll', 30, 31);
    await reach(c, 'open', 120 * T);
    await publishing;
    await publishN(r, 'poll', 10, 61);
    await rec.waitCount(70, 10_000);
    expect(rec.seqs()).toEqual(range(1, 70));
  }, 60_000);

  it('while degraded, a backlog larger than replayPageBytes arrives whole over polls paged by more (issue 12)', async () => {
    // 40 messages of ~8 KB and answers of at most 32 KiB of MSGs: at least 10 polls, each
    // continued on `more`, not on the poll interval (which is far longer than the wait).
    r = await rig({ replayPageBytes: 32 * 1024 });
    const c = r.client({ pollInterval: 60_000, maxBackoff: 60_000 });
    const rec = recorder(c, 'pages');
    await c.subscribe('pages', { since: 0 });
    r.proxy.refuse = true;
    r.proxy.kill();
    await reach(c, 'degraded');
    const fill = 'x'.repeat(8000);
    for (let i = 1; i <= 40; i++) await r.server.publish('pages', { n: i, fill });
    // The degraded client's first poll happens on entering degraded or after pollInterval; a
    // resubscribe forces one now.
    await c.subscribe('pages', { since: 0 });
    await rec.waitCount(40, 20_000);
    expect(rec.seqs()).toEqual(range(1, 40));
    const polls = r.proxy.traffic.filter((t) => t.via === 'http' && t.frame.type === 'SUB').length;
    expect(polls).toBeGreaterThanOrEqual(10);
  }, 60_000);

  it.each(['memory', 'sqlite'] as const)(
    'a socket catch-up larger than replayPageBytes arrives whole and in order (%s store, issue 12)',
    async (kind) => {
      const store = kind === 'sqlite' ? sqliteStore({ file: join(tmp(), 'pages.db') }) : undefined;
      r = await rig({ replayPageBytes: 32 * 1024, ...(store ? { store } : {}) });
      const fill = 'x'.repeat(8000);
      for (let i = 1; i <= 40; i++) await r.server.publish('pages', { n: i, fill });
      const c = r.client();
      const rec = recorder(c, 'pages');
      await c.subscribe('pages', { since: 0 });
      await rec.waitCount(40);
      expect(rec.seqs()).toEqual(range(1, 40));
      expect(rec.got.map((m) => (m.payload as { n: number }).n)).toEqual(range(1, 40));
    },
  );

  it('a seq gap (a MSG lost on the wire) triggers a re-SUB from the cursor; nothing lost', async () => {
    r = await rig();
    const c = r.client();
    const rec = recorder(c, 'gap');
    await c.subscribe('gap', { since: 0 });
    let dropped = false;
    r.proxy.filter = (dir, f) => {
      if (dir === 'down' && f.type === 'MSG' && f.seq === 3 && !f.replay && !dropped) {
        dropped = true;
        return 'drop';
      }
      return 'pass';
    };
    await publishN(r, 'gap', 6);
    await rec.waitCount(6);
    expect(dropped).toBe(true);
    expect(rec.seqs()).toEqual(range(1, 6));
    const subs = r.proxy.traffic.filter((t) => t.dir === 'up' && t.frame.type === 'SUB');
    expect(subs.length).toBeGreaterThanOrEqual(2);
  });

  it('a reloaded client (same storage) keeps its clientId and resumes from its cursors', async () => {
    r = await rig();
    const storage = memoryStorage();
    const a = r.client({ storage });
    const ra = recorder(a, 'saved');
    await a.subscribe('saved', { since: 0 });
    await publishN(r, 'saved', 5);
    await ra.waitCount(5);
    const id = a.clientId;
    await a.close();
    await until(() => r!.server.stats().sockets === 0, 5000, 'socket closed');
    await publishN(r, 'saved', 5, 6);
    const b = r.client({ storage, channels: { saved: {} } });
    const rb = recorder(b, 'saved');
    expect(b.clientId).toBe(id);
    await rb.waitCount(5);
    expect(rb.seqs()).toEqual(range(6, 10));
  });
});
