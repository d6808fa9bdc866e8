/**
 * What the durable outbox keeps is the JSON `send()` made (README "Operations are JSON"), for
 * memoryStorage and fileStorage, against a real server and real files: an operation changed
 * after `send()` (in the same tick, or later) and left in flight or queued by a client closed
 * mid-flight is resent by the next client on the same storage as it was sent: the in-flight
 * batch under its id (answered by dedupe, its real result on `restored$`, not `id_reused`),
 * the queued one applied with its original payload. And one live client per clientId on a
 * memoryStorage object: a second one works from its own memory under its own clientId
 * (nothing applied or settled twice); after `close()` the next client takes the identity and
 * the outbox.
 */
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { fileStorage } from '../src/client/file-storage.js';
import {
  type Failure,
  memoryStorage,
  type OutboxSnapshot,
  type Restored,
  type SyncError,
  type SyncStorage,
} from '../src/client/index.js';
import { type Rig, rig, until } from './helpers/harness.js';

let r: Rig | undefined;
const dirs: string[] = [];
/** Lets a held onSync go, so that a failed test does not hold the server's close. */
let letGo: (() => void) | undefined;
afterEach(async () => {
  letGo?.();
  letGo = undefined;
  await r?.close();
  r = undefined;
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

const tempFile = () => {
  const d = mkdtempSync(join(tmpdir(), 'syncwire-snap-'));
  dirs.push(d);
  return join(d, 'client.json');
};

interface Op {
  id: string;
  v: string;
}

/**
 * A rig whose onSync records each operation it is called with (`id=v`) and can be held: the
 * batch stays in flight until `open()`.
 */
async function heldRig() {
  const seen: string[] = [];
  let release: (() => void) | null = null;
  let gate: Promise<void> | null = null;
  const rg = await rig({
    onSync: async (ops) => {
      for (const o of ops as Op[]) seen.push(`${o.id}=${o.v}`);
      if (gate) await gate;
      return (ops as Op[]).map((o) => ({ id: o.id, v: o.v }));
    },
  });
  const h = {
    rg,
    seen,
    hold() {
      gate = new Promise<void>((resolve) => {
        release = resolve;
      });
    },
    open() {
      gate = null;
      release?.();
    },
  };
  letGo = h.open;
  return h;
}

const turn = () => new Promise<void>((resolve) => setImmediate(resolve));

describe('the outbox keeps what send() accepted', () => {
  for (const kind of ['memory', 'file'] as const) {
    for (const when of ['same tick', 'later'] as const) {
      it(`${kind}Storage, op changed ${when} after send(), closed mid-flight: the next client resends the original; in-flight one answered by dedupe, queued one applied as sent`, async () => {
        const h = await heldRig();
        r = h.rg;
        const path = tempFile();
        const shared = memoryStorage();
        const mk = (): SyncStorage => (kind === 'memory' ? shared : fileStorage(path));
        const a = r.client({ storage: mk() });
        await a.loaded;
        h.hold();
        const first: Op = { id: `${kind}-${when}-first`, v: 'orig' };
        const queued: Op = { id: `${kind}-${when}-queued`, v: 'orig' };
        const outcomes: string[] = [];
        const pa = a.send(first).then(
          () => outcomes.push('first resolved'),
          (e: SyncError) => outcomes.push(`first ${e.code}`),
        );
        if (when === 'same tick') first.v = 'MUT';
        await until(() => h.seen.length === 1, 5000, 'first batch at the server');
        if (when === 'later') first.v = 'MUT';
        const pb = a.send(queued).then(
          () => outcomes.push('queued resolved'),
          (e: SyncError) => outcomes.push(`queued ${e.code}`),
        );
        if (when === 'same tick') {
          queued.v = 'MUT';
          await turn();
        } else {
          await turn();
          queued.v = 'MUT';
          // One more write of the whole outbox (the file storage rewrites it per change).
          a.send({ id: `${kind}-${when}-third`, v: 'x' }).catch(() => {});
          await turn();
        }
        if (kind === 'file') {
          const box = JSON.parse(readFileSync(path, 'utf8'))['#outbox'][a.clientId] as OutboxSnapshot;
          // The file holds the operations as sent, in the format earlier versions read (`op`).
          expect(box.ops.map((o) => o.op).filter((o) => (o as Op).id !== `${kind}-${when}-third`)).toEqual([
            { id: first.id, v: 'orig' },
            { id: queued.id, v: 'orig' },
          ]);
          expect(box.batches).toHaveLength(1);
        }
        await a.close();
        await Promise.all([pa, pb]);
        expect(outcomes.sort()).toEqual(['first closed', 'queued closed']);
        // The server finishes the first batch after its client went.
        h.open();
        const b = r.client({ storage: mk() });
        expect(b.clientId).toBe(a.clientId);
        const restored: Restored[] = [];
        b.restored$.subscribe((x) => restored.push(x));
        expect(await b.loaded).toBe(when === 'later' ? 3 : 2);
        await until(() => restored.length === (when === 'later' ? 3 : 2), 10_000, 'restored results');
        const byId = new Map(restored.map((x) => [(x.op as Op).id, x]));
        const got = byId.get(first.id)!;
        expect('error' in got ? got.error.code : undefined).toBeUndefined();
        expect('result' in got ? got.result : undefined).toEqual({ id: first.id, v: 'orig' });
        expect(got.op).toEqual({ id: first.id, v: 'orig' });
        const q = byId.get(queued.id)!;
        expect('result' in q ? q.result : undefined).toEqual({ id: queued.id, v: 'orig' });
        expect(q.op).toEqual({ id: queued.id, v: 'orig' });
        // Applied once each, with the payload send() accepted; the first one was not called
        // again (dedupe answered its resend).
        expect(h.seen.filter((s) => s.startsWith(first.id))).toEqual([`${first.id}=orig`]);
        expect(h.seen.filter((s) => s.startsWith(queued.id))).toEqual([`${queued.id}=orig`]);
        expect(h.seen.some((s) => s.endsWith('=MUT'))).toBe(false);
        await until(() => b.pending === 0, 5000, 'settled');
        if (kind === 'memory') expect((shared.outbox!.load(b.clientId) as OutboxSnapshot).ops).toEqual([]);
        await b.close();
      });
    }
  }

  it('a state file written by an earlier version (operations as values) loads and is sent', async () => {
    const h = await heldRig();
    r = h.rg;
    const path = tempFile();
    // The format before this change (and after it): `op` is the operation as a value.
    writeFileSync(
      path,
      JSON.stringify({
        'syncwire:clientId': 'c-old',
        '#outbox': {
          'c-old': {
            ops: [
              { key: 'aaaa:o1', at: 1, n: 1, op: { id: 'old-1', v: 'one' } },
              { key: 'aaaa:o2', at: 1, n: 2, op: { id: 'old-2', v: 'two' } },
            ],
            batches: [{ id: 'aaaa:1', keys: ['aaaa:o1'] }],
          },
        },
      }),
    );
    const c = r.client({ storage: fileStorage(path) });
    expect(c.clientId).toBe('c-old');
    const restored: Restored[] = [];
    c.restored$.subscribe((x) => restored.push(x));
    expect(await c.loaded).toBe(2);
    await until(() => restored.length === 2, 10_000, 'restored');
    expect(restored.map((x) => ('result' in x ? x.result : x.error.code))).toEqual([
      { id: 'old-1', v: 'one' },
      { id: 'old-2', v: 'two' },
    ]);
    expect(restored[0]!.id).toBe('aaaa:1');
    expect(h.seen).toEqual(['old-1=one', 'old-2=two']);
    await c.close();
  });
});

describe('memoryStorage: one live client per clientId', () => {
  it('a second live client on one memoryStorage works from its own memory: nothing applied or settled twice; after close() the next client takes the identity and what is left', async () => {
    const h = await heldRig();
    r = h.rg;
    const storage = memoryStorage();
    const a = r.client({ storage });
    await a.loaded;
    h.hold();
    const settled = new Map<string, string[]>();
    const note = (id: string, how: string) => settled.set(id, [...(settled.get(id) ?? []), how]);
    const aIds = Array.from({ length: 20 }, (_, i) => `a-${i}`);
    const pa = aIds.map((id) =>
      a.send({ id, v: 'a' }).then(
        () => note(id, 'A resolved'),
        (e: SyncError) => note(id, `A ${e.code}`),
      ),
    );
    a.restored$.subscribe((x) => note((x.op as Op).id, 'A restored'));
    await until(() => h.seen.length > 0, 5000, 'a batch in flight');

    const b = r.client({ storage });
    const bFailures: Failure[] = [];
    b.failures$.subscribe((f) => bFailures.push(f));
    b.restored$.subscribe((x) => note((x.op as Op).id, 'B restored'));
    expect(await b.loaded).toBe(0);
    expect(b.clientId).not.toBe(a.clientId);
    await until(() => bFailures.some((f) => f.kind === 'storage'), 5000, 'in use failure');
    expect(bFailures.find((f) => f.kind === 'storage')!.reason).toMatch(/in use by another live client/);
    // The shared storage still names A's identity; B's operations never enter it.
    expect(storage.get('syncwire:clientId')).toBe(a.clientId);
    const bIds = Array.from({ length: 5 }, (_, i) => `b-${i}`);
    const pb = bIds.map((id) =>
      b.send({ id, v: 'b' }).then(
        () => note(id, 'B resolved'),
        (e: SyncError) => note(id, `B ${e.code}`),
      ),
    );
    await turn();
    expect((storage.outbox!.load(b.clientId) as OutboxSnapshot).ops).toEqual([]);
    h.open();
    await Promise.all([...pa, ...pb]);
    await until(() => a.pending === 0 && b.pending === 0, 5000, 'all settled');
    for (const id of aIds) expect(settled.get(id)).toEqual(['A resolved']);
    for (const id of bIds) expect(settled.get(id)).toEqual(['B resolved']);
    const counts = new Map<string, number>();
    for (const s of h.seen) counts.set(s.split('=')[0]!, (counts.get(s.split('=')[0]!) ?? 0) + 1);
    expect([...counts.values()].every((n) => n === 1)).toBe(true);
    expect(counts.size).toBe(25);

    // A leaves operations behind; B is still live; C, after A's close(), takes A's identity.
    h.hold();
    const left = ['left-0', 'left-1'];
    const pl = left.map((id) => a.send({ id, v: 'a' }).catch((e: SyncError) => e.code));
    await until(() => h.seen.length === 27, 5000, 'their batch in flight');
    await a.close();
    expect(await Promise.all(pl)).toEqual(['closed', 'closed']);
    h.open();
    const c = r.client({ storage });
    expect(c.clientId).toBe(a.clientId);
    const restored: Restored[] = [];
    c.restored$.subscribe((x) => restored.push(x));
    expect(await c.loaded).toBe(2);
    await until(() => restored.length === 2, 10_000, 'restored');
    expect(restored.map((x) => ('result' in x ? x.result : x.error.code))).toEqual([
      { id: 'left-0', v: 'a' },
      { id: 'left-1', v: 'a' },
    ]);
    expect(h.seen.filter((s) => s.startsWith('left-'))).toEqual(['left-0=a', 'left-1=a']);
    await b.close();
    await c.close();
  });

  it("one fileStorage object given to two live clients (made in one tick): the second works from memory; the file keeps the first one's identity and outbox", async () => {
    r = await rig();
    const path = tempFile();
    const storage = fileStorage(path);
    r.proxy.refuse = true;
    r.proxy.httpScript = Array.from({ length: 10_000 }, () => 'network' as const);
    const a = r.client({ storage });
    const b = r.client({ storage });
    const bFailures: Failure[] = [];
    b.failures$.subscribe((f) => bFailures.push(f));
    expect(await a.loaded).toBe(0);
    expect(await b.loaded).toBe(0);
    expect(b.clientId).not.toBe(a.clientId);
    await until(() => bFailures.some((f) => f.kind === 'storage'), 5000, 'in use failure');
    expect(bFailures.find((f) => f.kind === 'storage')!.reason).toMatch(/in use by another live client/);
    const pa = ['fa-0', 'fa-1'].map((id) => a.send({ id }).catch((e: SyncError) => e.code));
    const pb = b.send({ id: 'fb-0' }).catch((e: SyncError) => e.code);
    await turn();
    const file = JSON.parse(readFileSync(path, 'utf8'));
    expect(file['syncwire:clientId']).toBe(a.clientId);
    expect(Object.keys(file['#outbox'])).toEqual([a.clientId]);
    await a.close();
    await b.close();
    expect(await Promise.all([...pa, pb])).toEqual(['closed', 'closed', 'closed']);
    r.proxy.refuse = false;
    r.proxy.httpScript = [];
    const c = r.client({ storage: fileStorage(path) });
    expect(c.clientId).toBe(a.clientId);
    const restored: Restored[] = [];
    c.restored$.subscribe((x) => restored.push(x));
    expect(await c.loaded).toBe(2);
    await until(() => restored.length === 2, 10_000, 'restored');
    expect(r.ledger.applied.get('fa-0')).toBe(1);
    expect(r.ledger.applied.get('fa-1')).toBe(1);
    expect(r.ledger.applied.has('fb-0')).toBe(false);
  });

  it('the same clientId option twice on one memoryStorage: the second is refused the storage; different storageKeys share it', async () => {
    r = await rig();
    const storage = memoryStorage();
    const a = r.client({ storage, clientId: 'same' });
    const b = r.client({ storage, clientId: 'same' });
    const bFailures: Failure[] = [];
    b.failures$.subscribe((f) => bFailures.push(f));
    await Promise.all([a.loaded, b.loaded]);
    await until(() => bFailures.some((f) => f.kind === 'storage'), 5000, 'in use failure');
    expect(await b.send({ id: 'by-b' })).toEqual({ id: 'by-b', successes: ['by-b'] });
    expect(await a.send({ id: 'by-a' })).toEqual({ id: 'by-a', successes: ['by-a'] });

    const x = r.client({ storage, storageKey: 'x' });
    const y = r.client({ storage, storageKey: 'y' });
    const fails: Failure[] = [];
    x.failures$.subscribe((f) => fails.push(f));
    y.failures$.subscribe((f) => fails.push(f));
    await Promise.all([x.loaded, y.loaded]);
    expect(x.clientId).not.toBe(y.clientId);
    expect(storage.get('x:clientId')).toBe(x.clientId);
    expect(storage.get('y:clientId')).toBe(y.clientId);
    expect(await x.send({ id: 'by-x' })).toEqual({ id: 'by-x', successes: ['by-x'] });
    expect(await y.send({ id: 'by-y' })).toEqual({ id: 'by-y', successes: ['by-y'] });
    expect(fails).toEqual([]);
  });
});
