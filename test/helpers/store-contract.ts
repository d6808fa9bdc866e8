/**
 * The contract every HistoryStore must meet, as one reusable suite. A new store joins by
 * adding one `StoreFactory` to the list in test/stores.contract.test.ts.
 */

import { afterEach, describe, expect, it } from 'vitest';
import { type HistoryStore, isDedupeStore, type StoredMessage } from '../../src/stores/types.js';

export interface ContractStoreOptions {
  maxMessages?: number;
  maxAgeMs?: number;
  now?: () => number;
}

export interface StoreFactory {
  name: string;
  /** Whether reopening the same place after `close()` finds the same epochs and history. */
  durable: boolean;
  /** A fresh, empty place (file path, key prefix…) for one test. */
  place(): string | Promise<string>;
  /** Open a store on `place`. */
  open(place: string, opts: ContractStoreOptions): HistoryStore | Promise<HistoryStore>;
  /** Whether the store keeps dedupe claims (`claim/complete/release`). @default false */
  dedupe?: boolean;
}

/** A clock tests move by hand. */
function manualClock(start = 1_700_000_000_000) {
  let t = start;
  return {
    now: () => t,
    advance: (ms: number) => {
      t += ms;
    },
  };
}

/** Wait (bounded) for watch deliveries. */
async function delivered(check: () => boolean, timeoutMs = 2000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`watch did not deliver within ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 2));
  }
}

const seqs = (msgs: StoredMessage[]) => msgs.map((m) => m.seq);
const range = (from: number, to: number) => Array.from({ length: to - from + 1 }, (_, i) => from + i);

export function storeContract(factory: StoreFactory): void {
  const opened: HistoryStore[] = [];
  const open = async (opts: ContractStoreOptions = {}, place?: string) => {
    const where = place ?? (await factory.place());
    const store = await factory.open(where, opts);
    opened.push(store);
    return { store, place: where };
  };

  afterEach(async () => {
    for (const s of opened.splice(0)) await s.close().catch(() => undefined);
  });

  describe('seq and head', () => {
    it('numbers appends densely from 1 in one epoch', async () => {
      const { store } = await open();
      const out: StoredMessage[] = [];
      for (let i = 0; i < 5; i++) out.push(await store.append('a', { i }));
      expect(seqs(out)).toEqual([1, 2, 3, 4, 5]);
      expect(new Set(out.map((m) => m.epoch)).size).toBe(1);
      expect(new Set(out.map((m) => m.id)).size).toBe(5);
      expect(out.every((m) => m.channel === 'a' && typeof m.at === 'number')).toBe(true);
      expect(await store.head('a')).toEqual({ epoch: out[0]!.epoch, seq: 5, first: 1 });
    });

    it('creates an epoch for an unknown channel and keeps it', async () => {
      const { store } = await open();
      const h = await store.head('fresh');
      expect(h).toEqual({ epoch: expect.any(String), seq: 0, first: 1 });
      expect(h.epoch.length).toBeGreaterThan(0);
      expect((await store.head('fresh')).epoch).toBe(h.epoch);
      expect((await store.append('fresh', 1)).epoch).toBe(h.epoch);
    });

    it('heads(names), when there, answers what head() answers, in order, creating new channels', async () => {
      const { store } = await open();
      await store.append('b', 1);
      await store.append('b', 2);
      const known = await store.head('a');
      if (!store.heads) return;
      const heads = await store.heads(['b', 'a', 'new-1', 'new-2']);
      expect(heads[0]).toEqual(await store.head('b'));
      expect(heads[1]).toEqual(known);
      expect(heads[2]).toEqual({ epoch: expect.any(String), seq: 0, first: 1 });
      expect(await store.head('new-2')).toEqual(heads[3]);
    });

    it('hasChannel and channelCount, when there, see channels without creating them', async () => {
      const { store } = await open();
      if (!store.hasChannel || !store.channelCount) return;
      const before = await store.channelCount();
      expect(await store.hasChannel('nope')).toBe(false);
      expect(await store.channelCount()).toBe(before);
      await store.head('yes');
      expect(await store.hasChannel('yes')).toBe(true);
      expect(await store.channelCount()).toBe(before + 1);
    });
    it('releaseChannels frees never-published records that free() allows, and nothing else', async () => {
      const { store } = await open();
      // Every store of this package frees records at once (memory, SQLite, Redis).
      expect(typeof store.releaseChannels).toBe('function');
      if (!store.releaseChannels || !store.channelCount || !store.hasChannel) return;
      const looked = await store.head('looked');
      await store.head('kept-live');
      await store.head('published');
      await store.append('published', 'x');
      const before = await store.channelCount();
      const asked: string[] = [];
      const freed = await store.releaseChannels(
        ['looked', 'kept-live', 'published', 'never-seen'],
        (name) => {
          asked.push(name);
          return name !== 'kept-live';
        },
      );
      expect(freed).toBe(1);
      expect(asked).toContain('looked');
      expect(await store.hasChannel('looked')).toBe(false);
      expect(await store.hasChannel('kept-live')).toBe(true);
      expect(await store.hasChannel('never-seen')).toBe(false);
      expect(await store.channelCount()).toBe(before - 1);
      // The published channel keeps its history and epoch.
      expect((await store.read('published', 0, 10)).map((m) => m.payload)).toEqual(['x']);
      // A freed record made again is a new epoch at seq 0, and an append to it is kept.
      const again = await store.head('looked');
      expect(again).toEqual({ epoch: expect.any(String), seq: 0, first: 1 });
      expect(again.epoch).not.toBe(looked.epoch);
      const m = await store.append('looked', 'after');
      expect([m.seq, m.epoch]).toEqual([1, again.epoch]);
    });

    it('releaseChannels racing appends to the same fresh channels loses no publication', async () => {
      const { store } = await open();
      if (!store.releaseChannels) return;
      const names = Array.from({ length: 40 }, (_, i) => `race-${i}`);
      for (const n of names) await store.head(n);
      // Appends and the release in one step, not awaited in between: each channel is freed
      // before its append (which then makes a new record) or kept because of it.
      const appends = names.map((n) => store.append(n, n));
      const released = store.releaseChannels(names, () => true);
      const msgs = await Promise.all(appends);
      await released;
      for (const [i, n] of names.entries()) {
        const head = await store.head(n);
        expect(head).toMatchObject({ epoch: msgs[i]!.epoch, seq: 1 });
        expect((await store.read(n, 0, 10)).map((m) => m.payload)).toEqual([n]);
      }
    });
  });

  describe('read', () => {
    it('returns retained messages after a seq, ascending, at most limit', async () => {
      const { store } = await open();
      for (let i = 1; i <= 10; i++) await store.append('a', { n: i });
      expect(seqs(await store.read('a', 0, 3))).toEqual([1, 2, 3]);
      expect(seqs(await store.read('a', 3, 100))).toEqual(range(4, 10));
      expect(seqs(await store.read('a', 9, 5))).toEqual([10]);
      expect(await store.read('a', 10, 5)).toEqual([]);
      expect(await store.read('a', 0, 0)).toEqual([]);
      expect(await store.read('nope', 0, 10)).toEqual([]);
    });

    it('with maxBytes returns a prefix of the same page, at least one message (stops at the bound)', async () => {
      const { store } = await open();
      const fill = 'x'.repeat(1000);
      for (let i = 1; i <= 20; i++) await store.append('b', { n: i, fill });
      const size = JSON.stringify({ n: 10, fill }).length;
      const whole = seqs(await store.read('b', 0, 20));
      for (const maxBytes of [0, 1, size, 3 * size + 1, 100 * size]) {
        const page = seqs(await store.read('b', 0, 20, maxBytes));
        expect(page.length).toBeGreaterThanOrEqual(1);
        expect(page).toEqual(whole.slice(0, page.length));
        // issue 12: the store stops at the bound.
        expect(page.length).toBe(Math.min(20, Math.max(1, Math.floor(maxBytes / size))));
      }
      expect(seqs(await store.read('b', 18, 20, 0))).toEqual([19]);
    });

    it('round-trips payloads and except exactly', async () => {
      const { store } = await open();
      const payloads = [{ deep: { list: [1, 'two', null, true] } }, 'text', 42, null, [1, [2]]];
      const appended = [];
      for (const p of payloads) appended.push(await store.append('p', p));
      appended.push(await store.append('p', { mine: true }, { except: 'client-1' }));
      const read = await store.read('p', 0, 100);
      expect(read.map((m) => m.payload)).toEqual([...payloads, { mine: true }]);
      expect(read[5]!.except).toBe('client-1');
      expect(read[0]!.except).toBeUndefined();
      expect(read).toEqual(appended);
    });

    it('round-trips the author, in reads and on the live feed', async () => {
      const { store } = await open();
      const fed: StoredMessage[] = [];
      const stop = store.watch((m) => {
        if (m.channel === 'au') fed.push(m);
      });
      try {
        await store.append('au', 'plain');
        await store.append('au', 'mine', { author: 'client-7' });
        await store.append('au', 'quiet', { author: 'client-7', except: 'client-7' });
        const read = await store.read('au', 0, 10);
        expect(read.map((m) => [m.author, m.except])).toEqual([
          [undefined, undefined],
          ['client-7', undefined],
          ['client-7', 'client-7'],
        ]);
        await delivered(() => fed.length === 3);
        expect(fed.map((m) => m.author)).toEqual([undefined, 'client-7', 'client-7']);
      } finally {
        stop();
      }
    });

    it('takes seqs in call order: appends called in one step, not awaited in between (docs/consistency.md)', async () => {
      const { store } = await open();
      const calls = Array.from({ length: 20 }, (_, i) => store.append('order', { call: i }));
      const done = await Promise.all(calls);
      expect(done.map((m) => m.seq)).toEqual(range(1, 20));
      expect((await store.read('order', 0, 100)).map((m) => (m.payload as { call: number }).call)).toEqual(
        range(0, 19),
      );
    });
  });

  describe('retention', () => {
    it('trims by count on append, keeping seq and epoch', async () => {
      const { store } = await open({ maxMessages: 5 });
      let epoch = '';
      for (let i = 1; i <= 12; i++) epoch = (await store.append('a', i)).epoch;
      expect(await store.head('a')).toEqual({ epoch, seq: 12, first: 8 });
      expect(seqs(await store.read('a', 0, 100))).toEqual(range(8, 12));
      expect(seqs(await store.read('a', 9, 100))).toEqual([10, 11, 12]);
    });

    it('trims by age with trim() and on append', async () => {
      const clock = manualClock();
      const { store } = await open({ maxAgeMs: 1000, now: clock.now });
      for (let i = 0; i < 3; i++) await store.append('a', i); // at t
      clock.advance(500);
      for (let i = 0; i < 2; i++) await store.append('a', i); // at t+500
      clock.advance(700); // t+1200: the first three are older than 1000 ms
      await store.trim();
      expect(seqs(await store.read('a', 0, 100))).toEqual([4, 5]);
      expect((await store.head('a')).first).toBe(4);
      clock.advance(400); // t+1600: the two at t+500 are now too old as well
      await store.append('a', 'new');
      expect(seqs(await store.read('a', 0, 100))).toEqual([6]);
      expect(await store.head('a')).toMatchObject({ seq: 6, first: 6 });
    });

    it('reports first = seq + 1 when everything aged out', async () => {
      const clock = manualClock();
      const { store } = await open({ maxAgeMs: 100, now: clock.now });
      await store.append('a', 1);
      await store.append('a', 2);
      clock.advance(1000);
      await store.trim();
      expect(await store.head('a')).toMatchObject({ seq: 2, first: 3 });
      expect(await store.read('a', 0, 10)).toEqual([]);
    });
  });

  describe('reopen', () => {
    it(
      factory.durable
        ? 'keeps epoch, seq and history across close and reopen'
        : 'starts a new epoch after close and reopen (history is gone)',
      async () => {
        const first = await open();
        for (let i = 1; i <= 3; i++) await first.store.append('a', { i });
        const before = await first.store.head('a');
        await first.store.close();
        const { store } = await open({}, first.place);
        const after = await store.head('a');
        if (factory.durable) {
          expect(after).toEqual(before);
          expect((await store.read('a', 0, 10)).map((m) => m.payload)).toEqual([
            { i: 1 },
            { i: 2 },
            { i: 3 },
          ]);
          expect((await store.append('a', { i: 4 })).seq).toBe(4);
        } else {
          expect(after.epoch).not.toBe(before.epoch);
          expect(after.seq).toBe(0);
        }
      },
    );
  });

  describe('watch', () => {
    it('delivers 200 concurrent appends per channel in seq order, each once', async () => {
      const { store } = await open();
      const seen: StoredMessage[] = [];
      const stop = store.watch((m) => seen.push(m));
      const results = await Promise.all(
        Array.from({ length: 200 }, (_, i) => store.append(i % 4 === 0 ? 'b' : 'a', { i })),
      );
      // A shared store may deliver on its own schedule; a local one has delivered already.
      await delivered(() => seen.length >= 200);
      const a = results.filter((m) => m.channel === 'a');
      const b = results.filter((m) => m.channel === 'b');
      expect(seqs(a).sort((x, y) => x - y)).toEqual(range(1, 150));
      expect(seqs(b).sort((x, y) => x - y)).toEqual(range(1, 50));
      expect(seqs(seen.filter((m) => m.channel === 'a'))).toEqual(range(1, 150));
      expect(seqs(seen.filter((m) => m.channel === 'b'))).toEqual(range(1, 50));
      // What watch saw is what append returned and what read returns.
      const byKey = (m: StoredMessage) => `${m.channel}/${m.seq}`;
      const returned = new Map(results.map((m) => [byKey(m), m]));
      for (const m of seen) expect(m).toEqual(returned.get(byKey(m)));
      expect(await store.read('b', 0, 100)).toEqual(seen.filter((m) => m.channel === 'b'));
      stop();
      await store.append('a', 'after stop');
      expect(seen).toHaveLength(200);
    });

    it('has a message appended when its listener runs', async () => {
      const { store } = await open();
      const reads: Promise<StoredMessage[]>[] = [];
      store.watch((m) => reads.push(store.read(m.channel, m.seq - 1, 1)));
      await store.append('a', 'x');
      await delivered(() => reads.length === 1);
      const [read] = await Promise.all(reads);
      expect(read?.map((m) => m.payload)).toEqual(['x']);
    });
  });

  describe('channels', () => {
    it('keeps seq, epoch and retention per channel', async () => {
      const { store } = await open({ maxMessages: 3 });
      for (let i = 0; i < 6; i++) await store.append('a', i);
      await store.append('b', 'only');
      const [ha, hb] = [await store.head('a'), await store.head('b')];
      expect(ha).toMatchObject({ seq: 6, first: 4 });
      expect(hb).toMatchObject({ seq: 1, first: 1 });
      expect(ha.epoch).not.toBe(hb.epoch);
      expect((await store.read('b', 0, 10)).map((m) => m.payload)).toEqual(['only']);
      const ids = [...(await store.read('a', 0, 10)), ...(await store.read('b', 0, 10))].map((m) => m.id);
      expect(new Set(ids).size).toBe(ids.length);
    });
  });

  // Dedupe memory: only stores that keep it (shared or durable) implement DedupeStore.
  if (!factory.dedupe) return;
  describe('dedupe claims', () => {
    it('claims once; a second claim is pending until complete; then done with the response', async () => {
      const { store } = await open();
      if (!isDedupeStore(store)) throw new Error(`${factory.name} says dedupe but lacks claim/complete`);
      expect(await store.claim('c1:7', 60_000)).toEqual({ status: 'new' });
      expect(await store.claim('c1:7', 60_000)).toEqual({ status: 'pending' });
      const response = { id: '7', type: 'SYN', payload: [{ ok: true }] };
      await store.complete('c1:7', response, 60_000);
      expect(await store.claim('c1:7', 60_000)).toEqual({ status: 'done', response });
      expect(await store.claim('c1:8', 60_000)).toEqual({ status: 'new' });
    });

    it('binds a clientId to its first owner: another owner is refused, the owner refreshes it', async () => {
      const { store } = await open();
      if (!isDedupeStore(store) || !store.bind) throw new Error(`${factory.name} lacks bind`);
      expect(await store.bind('cid-1', 'owner-a', 60_000)).toBe(true);
      expect(await store.bind('cid-1', 'owner-b', 60_000)).toBe(false);
      expect(await store.bind('cid-1', 'owner-a', 60_000)).toBe(true);
      expect(await store.bind('cid-1', 'owner-b', 60_000)).toBe(false);
      expect(await store.bind('cid-2', 'owner-b', 60_000)).toBe(true);
    });

    it('lets another owner take a clientId once its binding lapsed', async () => {
      const { store } = await open();
      if (!isDedupeStore(store) || !store.bind) throw new Error(`${factory.name} lacks bind`);
      expect(await store.bind('cid-3', 'owner-a', 100)).toBe(true);
      expect(await store.bind('cid-3', 'owner-b', 60_000)).toBe(false);
      const deadline = Date.now() + 3000;
      let taken = false;
      while (!taken && Date.now() < deadline) {
        taken = await store.bind('cid-3', 'owner-b', 60_000);
        if (!taken) await new Promise((r) => setTimeout(r, 20));
      }
      expect(taken).toBe(true);
      expect(await store.bind('cid-3', 'owner-a', 60_000)).toBe(false);
    });

    it('keeps at most limits.maxEntries answered entries, dropping the oldest first', async () => {
      const { store } = await open();
      if (!isDedupeStore(store)) throw new Error(`${factory.name} lacks claim/complete`);
      const limits = { maxEntries: 3, maxBytes: 1_000_000 };
      for (let i = 0; i < 10; i++) {
        expect((await store.claim(`cap:${i}`, 60_000)).status).toBe('new');
        await store.complete(`cap:${i}`, { i }, 60_000, limits);
      }
      for (let i = 7; i < 10; i++) {
        expect(await store.claim(`cap:${i}`, 60_000)).toEqual({ status: 'done', response: { i } });
      }
      // Dropped entries are unknown again (claimed anew by this probe).
      for (let i = 0; i < 7; i++) expect((await store.claim(`cap:${i}`, 60_000)).status).toBe('new');
    });

    it('keeps answered entries under limits.maxBytes, dropping the oldest first', async () => {
      const { store } = await open();
      if (!isDedupeStore(store)) throw new Error(`${factory.name} lacks claim/complete`);
      const big = 'x'.repeat(1000);
      const limits = { maxEntries: 1000, maxBytes: 3500 }; // room for three ~1 kB values
      for (let i = 0; i < 10; i++) {
        await store.claim(`bytes:${i}`, 60_000);
        await store.complete(`bytes:${i}`, { i, big }, 60_000, limits);
      }
      for (let i = 7; i < 10; i++) {
        expect(await store.claim(`bytes:${i}`, 60_000)).toEqual({ status: 'done', response: { i, big } });
      }
      for (let i = 0; i < 7; i++) expect((await store.claim(`bytes:${i}`, 60_000)).status).toBe('new');
    });

    it('never drops a pending claim to make room', async () => {
      const { store } = await open();
      if (!isDedupeStore(store)) throw new Error(`${factory.name} lacks claim/complete`);
      expect((await store.claim('pend:0', 60_000)).status).toBe('new');
      for (let i = 1; i <= 5; i++) {
        await store.claim(`pend:${i}`, 60_000);
        await store.complete(`pend:${i}`, { i }, 60_000, { maxEntries: 1, maxBytes: 1_000_000 });
      }
      expect(await store.claim('pend:0', 60_000)).toEqual({ status: 'pending' });
    });

    it('release lets the key be claimed again', async () => {
      const { store } = await open();
      if (!isDedupeStore(store) || !store.release) throw new Error(`${factory.name} lacks claim/release`);
      expect((await store.claim('c2:1', 60_000)).status).toBe('new');
      await store.release('c2:1');
      expect((await store.claim('c2:1', 60_000)).status).toBe('new');
    });
  });
}
