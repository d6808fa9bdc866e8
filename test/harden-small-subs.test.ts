/**
 * Issue 12, eighth fresh attacker (FIX3).
 *
 * - F2 many loops of small `SUB`s: principals each `SUB` 100 fresh channels, `UNS` them after
 *   the answer and `SUB` again (two in flight per socket), retrying after a refusal. The
 *   scheduler used to give a whole slice (32 look-ups) to one request a turn, so a round of K
 *   keys took K turns and an honest `SUB` of one channel waited 1–6 s (5–8 of 12 unanswered
 *   after 5 s in the attacker's run): now a request gets at most `max(1, floor(slice / keys))`
 *   a turn and a round is `ceil(K / slice)` turns. Checked on the scheduler itself (turns
 *   counted) and end to end (memory, SQLite): the honest `SUB`s and `PNG`s are answered while
 *   the loops run.
 * - F3 those who leave: the freeing of the records of channels left (`UNS`, sockets closed) was
 *   counted in the admission backlog and never refused, so 89 principals leaving 1 000
 *   channels each took it to 4.4 × its hard bound and refused honest `SUB`s 31 % of the time.
 *   Now it is counted apart (`stats().lookupFreeing`): the backlog stays within 2 × B and an
 *   honest `SUB` is admitted while the records are freed.
 * Real `ws` server on 127.0.0.1, real SQLite files.
 */

import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { WebSocket } from 'ws';
import type { SyncServer } from '../src/server/index.js';
import { LookupScheduler } from '../src/server/lookups.js';
import { memoryStore } from '../src/stores/memory.js';
import { sqliteStore } from '../src/stores/sqlite.js';
import type { HistoryStore } from '../src/stores/types.js';
import { eventually, harness, RawSocket, wsUrl } from './helpers/raw.js';
import { authenticate, fresh } from './helpers/users.js';

const h = harness();
const dir = mkdtempSync(join(tmpdir(), 'syncwire-small-subs-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const attackers: WebSocket[] = [];
const honestSockets: RawSocket[] = [];
afterEach(() => {
  for (const ws of attackers.splice(0)) ws.terminate();
  for (const s of honestSockets.splice(0)) s.ws.terminate();
});

const stores: Array<{ name: string; make: () => HistoryStore }> = [
  { name: 'memory', make: () => memoryStore() },
  { name: 'sqlite', make: () => sqliteStore({ file: join(dir, `s-${Date.now()}-${Math.random()}.db`) }) },
];

/** An attacker's socket, opened. */
function dial(server: SyncServer, user: string): Promise<WebSocket> {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(`${wsUrl(server, `atk-${user}`)}&user=${user}`);
    attackers.push(ws);
    ws.once('open', () => resolve(ws));
    ws.once('error', reject);
  });
}

describe('FIX3 F2: a round of K keys is ceil(K / slice) turns (scheduler)', () => {
  it('100 keys with 100-look-up requests waiting: a new key is granted within ceil(101 / 32) turns', async () => {
    const s = new LookupScheduler({
      slice: 32,
      rate: Number.POSITIVE_INFINITY,
      maxBacklog: 1e9,
      smallJob: 100,
    });
    const jobs = Array.from({ length: 100 }, (_, k) => s.admit(`k${k}`, 100)!);
    // Each attacker job asks for all it has left, again and again, as a SUB does.
    let stop = false;
    const loops = jobs.map(async (job) => {
      let left = 100;
      while (left > 0 && !stop) left -= await job.turn(left);
      job.done();
    });
    let turns = 0;
    let ticking = true;
    const tick = () => {
      if (!ticking) return;
      turns++;
      setImmediate(tick);
    };
    // Let the round settle, then the honest key asks for one look-up.
    for (let i = 0; i < 3; i++) await new Promise<void>((r) => setImmediate(r));
    const honest = s.admit('honest', 1)!;
    expect(honest).toBeDefined();
    setImmediate(tick);
    const granted = await honest.turn(1);
    const waited = turns;
    ticking = false;
    honest.done();
    expect(granted).toBe(1);
    // Before FIX3: one request a turn, ~100 turns.
    expect(waited).toBeLessThanOrEqual(Math.ceil(101 / 32) + 1);
    stop = true;
    s.close();
    await Promise.all(loops);
  });

  it('freeing records (background) is not in the admission backlog and does not take a key its exemption', () => {
    const s = new LookupScheduler({ slice: 32, rate: 1000, maxBacklog: 100, hardBacklog: 200, smallJob: 10 });
    const freeing = s.background('leaver', 5_000);
    expect(s.backlog).toBe(0);
    expect(s.freeing).toBe(5_000);
    // A SUB of 100 is admitted (the backlog is 0), and the honest key's own freeing does not
    // take its small-SUB exemption.
    const big = s.admit('a', 100);
    expect(big).toBeDefined();
    const own = s.background('honest', 3);
    expect(s.admit('honest', 1)).toBeDefined();
    freeing.done();
    own.done();
    big?.done();
    expect(s.freeing).toBe(0);
    s.close();
  });
});

for (const { name, make } of stores) {
  describe(`FIX3 F2/F3 end to end (${name})`, () => {
    it('an honest SUB of one channel and PNGs are answered while 30 principals loop small SUBs', async () => {
      const server = await h.start<{ id: string }>({ authenticate, store: make() });
      let answered = 0;
      let stop = false;
      const N = 30;
      for (let i = 0; i < N; i++) {
        const ws = await dial(server, `atk${i}`);
        let g = 0;
        const go = () => {
          if (stop || ws.readyState !== WebSocket.OPEN) return;
          g++;
          ws.send(
            JSON.stringify({ id: `s${g}`, type: 'SUB', payload: { channels: fresh(`a${i}-${g}`, 100) } }),
          );
        };
        ws.on('message', (d) => {
          const m = JSON.parse(String(d)) as { id: string; type: string; payload?: [{ channels?: object }] };
          if (!m.id.startsWith('s') || (m.type !== 'SYN' && m.type !== 'NAK')) return;
          answered++;
          if (m.type === 'SYN') {
            const names = Object.keys(m.payload?.[0]?.channels ?? {});
            ws.send(JSON.stringify({ id: `u${m.id}`, type: 'UNS', payload: { channels: names } }));
            setImmediate(go);
          } else setTimeout(go, 50);
        });
        go();
        go();
      }
      await eventually(() => server.stats().lookupBacklog > 500 && answered > N, 10_000, 'attack running');
      const honest = await RawSocket.open(`${wsUrl(server, 'c-honest')}&user=honest`);
      honestSockets.push(honest);
      for (let k = 0; k < 5; k++) {
        const frames = await honest.request(
          { id: `h${k}`, type: 'SUB', payload: { channels: { [`honest-${k}`]: {} } } },
          5_000,
        );
        const reply = frames.at(-1) as { type: string; payload?: [{ channels: Record<string, unknown> }] };
        expect(reply.type).toBe('SYN');
        expect(reply.payload?.[0]?.channels[`honest-${k}`]).toMatchObject({ seq: 0 });
        honest.send({ id: `p${k}`, type: 'PNG' });
        const png = await honest.next((f) => (f as { id?: string }).id === `p${k}`, 5_000);
        expect((png as { type: string }).type).toBe('ACK');
        honest.send({ id: `uh${k}`, type: 'UNS', payload: { channels: [`honest-${k}`] } });
      }
      // The attack was still going: the loops kept being answered.
      const before = answered;
      await eventually(() => answered > before, 10_000, 'attackers still answered');
      stop = true;
    }, 60_000);

    it('60 principals leave 100 channels each at once: the backlog stays within 2 × B, honest SUBs admitted', async () => {
      // B = max(rate, maxChannelsPerPrincipal) = 2 000, hard bound 4 000; 6 000 records to free.
      const server = await h.start<{ id: string }>({
        authenticate,
        store: make(),
        maxChannelLookupsPerSecond: 2_000,
        maxChannelsPerPrincipal: 100,
      });
      const N = 60;
      const held: WebSocket[] = [];
      await Promise.all(
        Array.from({ length: N }, async (_, i) => {
          const ws = await dial(server, `hold${i}`);
          held.push(ws);
          await new Promise<void>((resolve) => {
            const sub = () =>
              ws.send(
                JSON.stringify({ id: 'hold', type: 'SUB', payload: { channels: fresh(`h${i}`, 100) } }),
              );
            ws.on('message', (d) => {
              const m = JSON.parse(String(d)) as { id: string; type: string };
              if (m.id !== 'hold' || (m.type !== 'SYN' && m.type !== 'NAK')) return;
              if (m.type === 'SYN') resolve();
              else setTimeout(sub, 50);
            });
            sub();
          });
        }),
      );
      expect(server.stats().channels).toBe(N * 100);
      const honest = await RawSocket.open(`${wsUrl(server, 'c-honest2')}&user=honest2`);
      honestSockets.push(honest);
      let peak = 0;
      let peakFreeing = 0;
      const sample = setInterval(() => {
        peak = Math.max(peak, server.stats().lookupBacklog);
        peakFreeing = Math.max(peakFreeing, server.stats().lookupFreeing);
      }, 5);
      try {
        for (const ws of held) ws.terminate();
        await eventually(() => server.stats().lookupFreeing > 0, 5_000, 'freeing started');
        let k = 0;
        // Honest SUBs while the leavers' records are freed: every one admitted and answered.
        while (server.stats().lookupFreeing > 0 && k < 20) {
          const frames = await honest.request(
            { id: `f${k}`, type: 'SUB', payload: { channels: { [`honest2-${k}`]: {} } } },
            5_000,
          );
          expect((frames.at(-1) as { type: string }).type).toBe('SYN');
          k++;
        }
        console.log('[F3] honest SUBs during freeing', k, JSON.stringify(server.stats()));
        expect(k).toBeGreaterThan(0);
        await eventually(() => server.stats().lookupFreeing === 0, 20_000, 'records freed');
      } finally {
        clearInterval(sample);
      }
      expect(peakFreeing).toBeGreaterThan(4_000 - 1_000);
      expect(peak).toBeLessThanOrEqual(4_000);
      expect(server.stats().channels).toBeLessThanOrEqual(20);
    }, 60_000);
  });
}

describe('FIX3 minor: option messages', () => {
  it('maxChannelLookupsPerSecond: Infinity is refused as not finite; maxSockets: 1.5 as not an integer', async () => {
    await expect(h.start({ maxChannelLookupsPerSecond: Number.POSITIVE_INFINITY })).rejects.toThrow(
      /maxChannelLookupsPerSecond must be a finite number > 0/,
    );
    await expect(h.start({ maxSockets: 1.5 })).rejects.toThrow(/maxSockets must be an integer ≥ 1/);
  });
});
