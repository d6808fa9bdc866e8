/**
 * The dedupe memory is fair across principals (FIX14C, issue 14 F1): under the entry and
 * byte caps, eviction takes from the largest holder first (the key a client's limits count
 * under), oldest first within it, and reduces responses to fingerprints before it drops
 * entries. So one principal flooding `SYN`s within its frame rate evicts its own answers, and
 * another client's retry of an answered batch is answered from memory, not applied twice
 * (README "applied and acknowledged exactly once"; PROTOCOL §3 rule 3).
 * - a fast-check property of the policy on the in-process structure (`Dedupe`), seed printed;
 * - the flood scenario (scratch g.mjs) on a real server: memory and a real SQLite file.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import fc from 'fast-check';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { WebSocket } from 'ws';
import type { SynEnvelope } from '../src/protocol/index.js';
import { Dedupe, notRemembered, type SynResponse } from '../src/server/dedupe.js';
import { createSyncServer, type SyncServer } from '../src/server/index.js';
import { redisStore } from '../src/stores/redis.js';
import { sqliteStore } from '../src/stores/sqlite.js';
import { describeWith, REDIS_SERVER, type RedisServer, startRedis, stopAll } from './helpers/redis.js';
import { authenticate } from './helpers/users.js';

const SEED = Number(process.env.SEED ?? Date.now() % 2 ** 31);
console.log(`[dedupe-fair] seed ${SEED} (SEED=${SEED} replays)`);

const syn = (id: string, payload: unknown[]): SynEnvelope => ({ id, type: 'SYN', payload });

describe('Dedupe eviction: largest holder first, oldest within it (property)', () => {
  const step = fc.record({ holder: fc.integer({ min: 0, max: 5 }), size: fc.integer({ min: 0, max: 3000 }) });

  const run = (d: Dedupe, i: number, holder: number, size: number) =>
    d.run(
      'o',
      `c${holder}`,
      syn(`s${i}`, [i]),
      (): SynResponse => ({ id: `s${i}`, type: 'SYN', payload: ['x'.repeat(size)] }),
      `h${holder}`,
    );

  it('holds the entry cap and takes only from holders left with at least as many as any other, oldest first', () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 1, max: 150 }),
        fc.array(step, { minLength: 1, maxLength: 400 }),
        (cap, steps) => {
          const d = new Dedupe({
            windowMs: 1e9,
            maxEntries: cap,
            maxBytes: 1e12,
            maxResponseBytes: 1e9,
            maxQueuedPerClient: 10,
            store: undefined,
            onError: () => {},
          });
          steps.forEach(({ holder, size }, i) => {
            const before = d.holdings();
            run(d, i, holder, size);
            const after = d.holdings();
            expect(d.size).toBeLessThanOrEqual(cap);
            const count = (m: typeof after, h: string) => m.get(h)?.entries ?? 0;
            const names = new Set([...before.keys(), ...after.keys()]);
            const lost = [...names].filter((h) => {
              const b = before.get(h)?.keys ?? [];
              const a = new Set(after.get(h)?.keys ?? []);
              return b.some((k) => !a.has(k));
            });
            for (const a of lost) {
              // Oldest first: what it lost is a prefix of what it held.
              const b = before.get(a)!.keys;
              const kept = new Set(after.get(a)?.keys ?? []);
              const gone = b.filter((k) => !kept.has(k));
              expect(gone).toEqual(b.slice(0, gone.length));
              // Taken from only while it held at least as many as anyone not taken from.
              for (const other of names) {
                if (lost.includes(other)) continue;
                expect(count(after, a) + 1).toBeGreaterThanOrEqual(count(after, other));
              }
            }
          });
        },
      ),
      { seed: SEED, numRuns: 150 },
    );
  });

  it('holds the byte cap, reduces responses before dropping entries, and reduces the largest holder first', () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 2_000, max: 40_000 }),
        fc.array(step, { minLength: 1, maxLength: 200 }),
        (maxBytes, steps) => {
          const d = new Dedupe({
            windowMs: 1e9,
            maxEntries: 1e9,
            maxBytes,
            maxResponseBytes: 1e9,
            maxQueuedPerClient: 10,
            store: undefined,
            onError: () => {},
          });
          steps.forEach(({ holder, size }, i) => {
            const before = d.holdings();
            const n0 = d.size;
            run(d, i, holder, size);
            const after = d.holdings();
            expect(d.sizeBytes).toBeLessThanOrEqual(maxBytes);
            let total = 0;
            for (const h of after.values()) total += h.bytes;
            expect(total).toBe(d.sizeBytes);
            // An entry dropped under byte pressure: every response had been reduced first.
            if (d.size < n0 + 1) for (const h of after.values()) expect(h.kept).toBe(0);
            // A holder that lost a response (reduced or dropped) was left with at least as many
            // bytes, less one entry's, as any holder that lost none.
            const lostSome = (h: string) => (before.get(h)?.kept ?? 0) > (after.get(h)?.kept ?? 0);
            const biggest = 256 + 3100 * 2 + 64;
            for (const a of after.keys()) {
              if (!lostSome(a)) continue;
              for (const [o, v] of after) {
                if (lostSome(o) || o === `h${holder}`) continue;
                expect(after.get(a)!.bytes + biggest).toBeGreaterThanOrEqual(v.bytes);
              }
            }
          });
        },
      ),
      { seed: SEED, numRuns: 100 },
    );
  });
});

describe('Dedupe memory lists (session 6: per-holder lists threaded through the entries)', () => {
  it('after any run under both caps, every entry listed is answered from memory, as kept or not kept, and only those (property)', () => {
    const step = fc.record({
      holder: fc.integer({ min: 0, max: 4 }),
      size: fc.integer({ min: 0, max: 3000 }),
    });
    fc.assert(
      fc.property(
        fc.integer({ min: 1, max: 60 }),
        fc.integer({ min: 2_000, max: 40_000 }),
        fc.integer({ min: 500, max: 4_000 }),
        fc.array(step, { minLength: 1, maxLength: 150 }),
        (maxEntries, maxBytes, maxResponseBytes, steps) => {
          const d = new Dedupe({
            windowMs: 1e9,
            maxEntries,
            maxBytes,
            maxResponseBytes,
            maxQueuedPerClient: 10,
            store: undefined,
            onError: () => {},
          });
          const answers = new Map<string, SynResponse>();
          steps.forEach(({ holder, size }, i) => {
            const r = d.run(
              'o',
              `c${holder}`,
              syn(`s${i}`, [i]),
              (): SynResponse => {
                const response: SynResponse = { id: `s${i}`, type: 'SYN', payload: ['x'.repeat(size)] };
                answers.set(`s${i}`, response);
                return response;
              },
              `h${holder}`,
            );
            expect(r).toEqual(answers.get(`s${i}`));
          });
          const holdings = d.holdings();
          let entries = 0;
          let kept = 0;
          const listed = new Set<string>();
          for (const [name, h] of holdings) {
            expect(h.keys.length).toBe(h.entries);
            entries += h.entries;
            kept += h.kept;
            // Oldest first: ids rise along each holder's list.
            const ids = h.keys.map((k) => Number(k.slice(k.lastIndexOf(':s') + 2)));
            expect(ids).toEqual([...ids].sort((a, b) => a - b));
            for (const k of h.keys) listed.add(`${name}/${k.slice(k.lastIndexOf(':') + 1)}`);
          }
          expect(entries).toBe(d.size);
          // Replays: a listed id is answered from memory (its response, or result_not_kept),
          // an id not listed runs again; as many full answers as entries counted kept.
          let full = 0;
          steps.forEach(({ holder }, i) => {
            let ran = false;
            const r = d.run(
              'o',
              `c${holder}`,
              syn(`s${i}`, [i]),
              (): SynResponse => {
                ran = true;
                return notRemembered({
                  id: `s${i}`,
                  type: 'NAK',
                  error: { code: 'server_error', message: 'x' },
                });
              },
              `h${holder}`,
            );
            if (listed.has(`h${holder}/s${i}`)) {
              expect(ran).toBe(false);
              if ((r as { type: string }).type === 'SYN') {
                expect(r).toEqual(answers.get(`s${i}`));
                full++;
              } else expect(r).toMatchObject({ type: 'NAK', error: { code: 'result_not_kept' } });
            } else expect(ran).toBe(true);
          });
          expect(full).toBe(kept);
        },
      ),
      { seed: SEED, numRuns: 100 },
    );
  });
});

describe('Dedupe eviction regressions (shrunk counterexamples)', () => {
  it("reduces a smaller holder's responses once the largest has none left to reduce, before dropping entries", () => {
    // fast-check seed 779800599: the largest holder's responses were all reduced and the
    // smaller holder's one kept response was skipped, so whole entries were dropped instead.
    const d = new Dedupe({
      windowMs: 1e9,
      maxEntries: 1e9,
      maxBytes: 2000,
      maxResponseBytes: 1e9,
      maxQueuedPerClient: 10,
      store: undefined,
      onError: () => {},
    });
    const steps = [0, 0, 0, 0, 0].map((h) => ({ h, size: 0 })).concat([{ h: 1, size: 248 }]);
    steps.forEach(({ h, size }, i) => {
      const n0 = d.size;
      d.run(
        'o',
        `c${h}`,
        syn(`s${i}`, [i]),
        () => ({ id: `s${i}`, type: 'SYN', payload: ['x'.repeat(size)] }),
        `h${h}`,
      );
      if (d.size < n0 + 1) for (const v of d.holdings().values()) expect(v.kept).toBe(0);
      expect(d.sizeBytes).toBeLessThanOrEqual(2000);
    });
  });
});

type Reply = { id: string; type: string; payload?: Array<{ n?: number }>; error?: { code: string } };

/** A socket of `user` as `clientId`, with a reply waiter by id. */
async function socket(port: number, user: string, clientId: string) {
  const ws = new WebSocket(`ws://127.0.0.1:${port}/sync?clientId=${clientId}&user=${user}`);
  const waiting = new Map<string, (r: Reply) => void>();
  ws.on('message', (d) => {
    const m = JSON.parse(String(d)) as Reply;
    if (m.type === 'ACK') return;
    waiting.get(m.id)?.(m);
    waiting.delete(m.id);
  });
  await new Promise((resolve, reject) => {
    ws.once('open', resolve);
    ws.once('error', reject);
  });
  const ask = (id: string, payload: unknown[]) =>
    new Promise<Reply>((resolve, reject) => {
      const t = setTimeout(() => reject(new Error(`no answer to ${id}`)), 10_000);
      waiting.set(id, (r) => {
        clearTimeout(t);
        resolve(r);
      });
      ws.send(JSON.stringify({ id, type: 'SYN', payload }));
    });
  return { ws, ask };
}

let places = 0;
function floodSuite(kind: 'memory' | 'sqlite' | 'redis', redis?: () => RedisServer) {
  describe(`a flooding principal under the dedupe caps evicts its own answers (${kind})`, () => {
    let server: SyncServer | undefined;
    let dir: string | undefined;
    const sockets: WebSocket[] = [];
    afterEach(async () => {
      for (const s of sockets) s.terminate();
      sockets.length = 0;
      await server?.close();
      if (dir) rmSync(dir, { recursive: true, force: true });
      dir = undefined;
    });

    async function flood(opts: { maxEntries: number; maxBytes: number; reply: number; batches: number }) {
      let applied = 0;
      dir = kind === 'sqlite' ? mkdtempSync(join(tmpdir(), 'syncwire-fair-')) : undefined;
      server = await createSyncServer({
        port: 0,
        authenticate,
        principalKey: (p) => (p as { id: string }).id,
        ...(dir ? { store: sqliteStore({ file: join(dir, 'db.sqlite') }) } : {}),
        ...(redis
          ? {
              store: await redisStore(
                { url: redis().url },
                { prefix: `fair${process.pid}-${++places}:`, onError: () => {} },
              ),
            }
          : {}),
        dedupeMaxEntries: opts.maxEntries,
        dedupeMaxBytes: opts.maxBytes,
        maxFramesPerSecond: 1_000_000,
        onSync: (ops) => ops.map(() => ({ n: ++applied, pad: 'p'.repeat(opts.reply) })),
      });
      const port = server.address().port;
      const victim = await socket(port, 'victim', 'c-victim');
      sockets.push(victim.ws);
      const first = await victim.ask('v:1', [{ h: 'transfer 100' }]);
      expect(first.type).toBe('SYN');
      const attackers = await Promise.all([0, 1, 2, 3].map((a) => socket(port, 'attacker', `c-att${a}`)));
      for (const a of attackers) sockets.push(a.ws);
      // One principal, 4 sockets, 16 batches in flight each, until `batches` are answered.
      let next = 0;
      await Promise.all(
        attackers.map(async (a) => {
          const lane = async () => {
            while (next < opts.batches) {
              const i = next++;
              const r = await a.ask(`x${i}`, [{}]);
              expect(r.type).toBe('SYN');
            }
          };
          await Promise.all(Array.from({ length: 16 }, lane));
        }),
      );
      return { victim, attackers, first, applied: () => applied };
    }

    it("answers the victim's retry from memory after the flood filled the entry cap many times over; the flooder's oldest went first", async () => {
      const { victim, attackers, first, applied } = await flood({
        maxEntries: 200,
        maxBytes: 64 * 1024 * 1024,
        reply: 0,
        batches: 2000,
      });
      // redisStore does not report its entries in stats() (README): its caps are checked by
      // the store contract (test/redis.test.ts).
      if (kind !== 'redis') {
        expect(server!.stats().dedupeEntries).toBeLessThanOrEqual(200);
        expect(server!.stats().dedupeEntries).toBeGreaterThan(100);
      }
      const n = applied();
      const again = await victim.ask('v:1', [{ h: 'transfer 100' }]);
      expect(again).toEqual(first);
      expect(applied()).toBe(n);
      // The flooder's own first batch was evicted: its retry is applied again (what a client
      // that floods past the caps gets; the window is the caps' share, README).
      const x0 = await attackers[0]!.ask('x0', [{}]);
      expect(x0.type).toBe('SYN');
      expect(applied()).toBe(n + 1);
    }, 60_000);

    it("keeps the victim's response whole under the byte cap while the flooder's large responses are reduced and dropped", async () => {
      const { victim, first, applied } = await flood({
        maxEntries: 100_000,
        maxBytes: 400_000,
        reply: 6_000,
        batches: 600,
      });
      if (kind !== 'redis') expect(server!.stats().dedupeBytes).toBeLessThanOrEqual(400_000);
      const n = applied();
      const again = await victim.ask('v:1', [{ h: 'transfer 100' }]);
      expect(again).toEqual(first);
      expect(applied()).toBe(n);
    }, 60_000);
  });
}

floodSuite('memory');
floodSuite('sqlite');
describeWith(REDIS_SERVER, 'redis-server', 'dedupe fairness on redis', () => {
  let redis: RedisServer;
  beforeAll(async () => {
    redis = await startRedis();
  }, 30_000);
  afterAll(stopAll);
  floodSuite('redis', () => redis);
});
