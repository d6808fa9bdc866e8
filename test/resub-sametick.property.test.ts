/**
 * subscribe()/unsubscribe() in any order, in one tick or across ticks, while SUBs and UNSs are
 * queued or in flight, over the socket, over the HTTP fallback and across a redial (FIX6A F1).
 *
 * The bug: on a subscribed channel `unsubscribe(x); subscribe(x); unsubscribe(x); subscribe(x)`
 * in one tick sent UNS, SUB, UNS and nothing more: the last subscribe() joined the waiting SUB,
 * and the UNS queued after that SUB ended the subscription on the server. Every promise
 * resolved, the client said `subscribed`, the server had no subscription, no message came.
 *
 * The property, against a real server (real `ws` on 127.0.0.1, memory store): after the queue
 * drains,
 * - every subscribe()/unsubscribe() promise has settled, and the last call of each channel
 *   resolved (not rejected);
 * - each channel's `subscriptionState` is what the app's last call on it says;
 * - `server.subscriptionsOf(clientId)` is exactly the client's subscribed channels;
 * - when the last subscribe() of a channel resolved, the server had the subscription (it
 *   resolves only when the channel is live), unless a redial or the HTTP
 *   fallback overlapped the call (over HTTP a channel is polled: the server holds no socket
 *   subscription; a socket killed meanwhile drops the server's subscriptions until the redial);
 * - a message published to each channel reaches the client for the subscribed ones.
 *
 * RESUB_RUNS (default 50) sequences; RESUB_SEED=… replays one (printed, and with any failure);
 * RESUB_PATH=… with it replays the failing case. Shrunk counterexamples are named tests below.
 */
import fc from 'fast-check';
import { describe, it } from 'vitest';
import { WebSocket } from 'ws';
import { createSyncClient, type SyncClient } from '../src/client/index.js';
import { createSyncServer, type SyncServer } from '../src/server/index.js';
import { memoryStore } from '../src/stores/memory.js';
import { T, until } from './helpers/harness.js';

const RUNS = Number(process.env.RESUB_RUNS ?? 50);
const SEED =
  process.env.RESUB_SEED === undefined
    ? Date.now() ^ (Math.random() * 2 ** 31)
    : Number(process.env.RESUB_SEED);
const PATH = process.env.RESUB_PATH;
const QUIET_MS = 10_000;

const CHANNELS = ['a', 'b', 'c'] as const;
type Channel = (typeof CHANNELS)[number];

interface Call {
  kind: 'sub' | 'uns';
  ch: Channel;
}
/**
 * What happens after a call: `none` the next call runs in the same tick, `tick` one macrotask
 * later (requests still queued or in flight), `await` once every promise so far settled,
 * `drop` the socket is killed (a redial), `http` the calls up to the next `back` go over the
 * HTTP fallback (ACKs dropped until the client degrades).
 */
type Sep = 'none' | 'tick' | 'await' | 'drop' | 'http' | 'back';
type Step = [Call, Sep];

const call: fc.Arbitrary<Call> = fc.record({
  kind: fc.constantFrom('sub' as const, 'uns' as const),
  ch: fc.constantFrom(...CHANNELS),
});
const sep: fc.Arbitrary<Sep> = fc.oneof(
  { weight: 8, arbitrary: fc.constant('none' as const) },
  { weight: 3, arbitrary: fc.constant('tick' as const) },
  { weight: 2, arbitrary: fc.constant('await' as const) },
  { weight: 1, arbitrary: fc.constant('drop' as const) },
  { weight: 1, arbitrary: fc.constant('http' as const) },
  { weight: 1, arbitrary: fc.constant('back' as const) },
);
const sequence = fc.array(fc.tuple(call, sep), { minLength: 1, maxLength: 14 });

const macrotask = () => new Promise<void>((r) => setImmediate(r));

/**
 * Run one sequence; `initial` channels are subscribed (and awaited) first. Throws with a
 * description of the state when a property is broken.
 */
async function runSequence(steps: Step[], initial: Channel[] = []): Promise<void> {
  const server: SyncServer = await createSyncServer({
    port: 0,
    store: memoryStore(),
    onError: () => {},
    onSync: (ops) => ops.map(() => ({ ok: 1 })),
  });
  const clientId = `R${Math.random().toString(36).slice(2)}`;
  const client: SyncClient = createSyncClient({
    url: `ws://127.0.0.1:${server.address().port}/sync`,
    clientId,
    timeout: T,
    maxBackoff: 4 * T,
    WebSocket: WebSocket as never,
  });
  const got = new Map<string, unknown[]>();
  client.messages$.subscribe((m) => {
    const l = got.get(m.channel) ?? [];
    l.push(m.payload);
    got.set(m.channel, l);
  });
  /** The app's last call on each channel, and a counter changed by every call. */
  const last = new Map<Channel, 'sub' | 'uns'>();
  const gen = new Map<Channel, number>();
  const pending: Array<{ what: string; settled: boolean; error?: unknown; lastCall: () => boolean }> = [];
  const liveAtResolve: string[] = [];
  const log: string[] = [];
  const state = () =>
    `steps ${JSON.stringify(steps)}; client ${client.state}; states ${JSON.stringify(
      Object.fromEntries(CHANNELS.map((c) => [c, client.subscriptionState(c)])),
    )}; last calls ${JSON.stringify(Object.fromEntries(last))}; server subs ${JSON.stringify(
      server.subscriptionsOf(clientId),
    )}; unsettled ${JSON.stringify(pending.filter((p) => !p.settled).map((p) => p.what))}; log ${JSON.stringify(log.slice(-6))}`;

  /**
   * Sockets killed so far: an answer read from a socket being killed resolves subscribe() while
   * the server is dropping that socket's subscriptions (the redial subscribes again, replaying
   * from the cursor); liveness at resolve time is checked for calls no redial overlapped.
   */
  let drops = 0;
  /** Between an `http` step and the next `back`: requests go over HTTP (polled, no socket subscription). */
  let onHttp = false;
  /** `drops` when the client last became `open` again after not being open. */
  let dropsReopened = 0;
  let prev = client.state;
  client.state$.subscribe((st) => {
    if (st === 'open' && prev !== 'open') dropsReopened = drops;
    prev = st;
  });
  const doCall = (c: Call, i: number) => {
    const steady = drops === dropsReopened && !onHttp;
    const dropsAtCall = drops;
    const g = (gen.get(c.ch) ?? 0) + 1;
    gen.set(c.ch, g);
    last.set(c.ch, c.kind);
    const rec: (typeof pending)[number] = {
      what: `${i}:${c.kind} ${c.ch}`,
      settled: false,
      lastCall: () => gen.get(c.ch) === g,
    };
    pending.push(rec);
    const p = c.kind === 'sub' ? client.subscribe(c.ch) : client.unsubscribe(c.ch);
    p.then(
      () => {
        rec.settled = true;
        // Resolved while still the app's last call: the channel must be live on the server now.
        if (
          c.kind === 'sub' &&
          rec.lastCall() &&
          steady &&
          drops === dropsAtCall &&
          !onHttp &&
          client.state === 'open' &&
          !server.subscriptionsOf(clientId).includes(c.ch)
        )
          liveAtResolve.push(rec.what);
      },
      (err) => {
        rec.settled = true;
        rec.error = err;
      },
    );
  };
  const settledAll = () => until(() => pending.every((p) => p.settled), QUIET_MS, 'every promise');
  const back = () => {
    client.debug.faults.dropAcks = false;
    onHttp = false;
  };

  try {
    await until(() => client.state === 'open', QUIET_MS, 'the first open');
    for (const ch of initial) {
      last.set(ch, 'sub');
      await client.subscribe(ch);
    }
    for (const [i, [c, s]] of steps.entries()) {
      log.push(`${i} ${c.kind} ${c.ch} ${s}`);
      doCall(c, i);
      switch (s) {
        case 'none':
          break;
        case 'tick':
          await macrotask();
          break;
        case 'await':
          await settledAll();
          break;
        case 'drop':
          drops++;
          client.debug.killSocket();
          break;
        case 'http':
          if (onHttp || client.state !== 'open') break;
          client.debug.faults.dropAcks = true;
          onHttp = true;
          // A request whose ACK never comes: the client degrades to HTTP after T.
          void client.send({ id: `h${i}` }).catch(() => {});
          await until(
            () => client.state === 'degraded' || client.state === 'rePinging',
            QUIET_MS,
            'the HTTP fallback',
          );
          break;
        case 'back':
          back();
          break;
      }
    }
    back();
    try {
      await until(
        () =>
          client.state === 'open' &&
          pending.every((p) => p.settled) &&
          CHANNELS.every((c) => {
            const s = client.subscriptionState(c);
            return s === ((last.get(c) ?? 'uns') === 'sub' ? 'subscribed' : 'unsubscribed');
          }) &&
          JSON.stringify(server.subscriptionsOf(clientId)) ===
            JSON.stringify(CHANNELS.filter((c) => last.get(c) === 'sub')),
        QUIET_MS,
        'the queue to drain with client and server agreeing',
      );
    } catch (err) {
      throw new Error(`${(err as Error).message}: ${state()}`);
    }
    const failedLast = pending.filter((p) => p.error !== undefined && p.lastCall());
    if (failedLast.length > 0)
      throw new Error(
        `the last call rejected: ${failedLast.map((p) => `${p.what} ${String(p.error)}`).join(', ')}: ${state()}`,
      );
    if (liveAtResolve.length > 0)
      throw new Error(
        `subscribe() resolved before the server had it: ${liveAtResolve.join(', ')}: ${state()}`,
      );
    // Messages flow for the subscribed channels (and only for them).
    const mark = `m${Date.now()}`;
    for (const c of CHANNELS) await server.publish(c, { mark });
    const subscribed = CHANNELS.filter((c) => last.get(c) === 'sub');
    const has = (c: string) => (got.get(c) ?? []).some((d) => (d as { mark?: string })?.mark === mark);
    try {
      await until(() => subscribed.every(has), QUIET_MS, 'a message on every subscribed channel');
    } catch (err) {
      throw new Error(
        `${(err as Error).message}: got ${JSON.stringify([...got.keys()].filter(has))}: ${state()}`,
      );
    }
    for (const c of CHANNELS)
      if (!subscribed.includes(c) && has(c))
        throw new Error(`a message of unsubscribed ${c} arrived: ${state()}`);
  } finally {
    await client.close();
    await server.close();
  }
}

describe('subscribe/unsubscribe in one tick (FIX6A F1)', () => {
  it("the tester's sequence: on a subscribed channel, unsubscribe, subscribe, unsubscribe, subscribe in one tick leaves it live on the server", async () => {
    await runSequence(
      [
        [{ kind: 'uns', ch: 'a' }, 'none'],
        [{ kind: 'sub', ch: 'a' }, 'none'],
        [{ kind: 'uns', ch: 'a' }, 'none'],
        [{ kind: 'sub', ch: 'a' }, 'none'],
      ],
      ['a'],
    );
  }, 30_000);

  it('the same three times over in one tick', async () => {
    const pair: Step[] = [
      [{ kind: 'uns', ch: 'a' }, 'none'],
      [{ kind: 'sub', ch: 'a' }, 'none'],
    ];
    await runSequence([...pair, ...pair, ...pair], ['a']);
  }, 30_000);

  it('the same with a redial after the first pair and one tick between pairs', async () => {
    await runSequence(
      [
        [{ kind: 'uns', ch: 'a' }, 'none'],
        [{ kind: 'sub', ch: 'a' }, 'drop'],
        [{ kind: 'uns', ch: 'a' }, 'tick'],
        [{ kind: 'sub', ch: 'a' }, 'none'],
      ],
      ['a'],
    );
  }, 30_000);

  it('the same over the HTTP fallback', async () => {
    await runSequence(
      [
        [{ kind: 'sub', ch: 'b' }, 'http'],
        [{ kind: 'uns', ch: 'a' }, 'none'],
        [{ kind: 'sub', ch: 'a' }, 'none'],
        [{ kind: 'uns', ch: 'a' }, 'none'],
        [{ kind: 'sub', ch: 'a' }, 'none'],
      ],
      ['a'],
    );
  }, 30_000);

  // Found on main by RESUB_SEED=329937110 (path 36:3:6:10:11:11:11): the SUB of c went on the
  // wire, the UNS of c followed a tick later, and the next subscribe('c') joined the SUB sent
  // before that UNS.
  it('counterexample: subscribe, unsubscribe a tick later, subscribe joins the SUB before the UNS', async () => {
    await runSequence([
      [{ kind: 'sub', ch: 'a' }, 'none'],
      [{ kind: 'sub', ch: 'c' }, 'none'],
      [{ kind: 'uns', ch: 'c' }, 'tick'],
      [{ kind: 'sub', ch: 'c' }, 'none'],
      [{ kind: 'sub', ch: 'a' }, 'back'],
    ]);
  }, 30_000);

  it(
    `${RUNS} random sequences of subscribe/unsubscribe with ticks, awaits, redials and HTTP (fast-check)`,
    async () => {
      console.log(`[resub-sametick] seed ${SEED} (RESUB_SEED=${SEED} replays it)`);
      try {
        await fc.assert(
          fc.asyncProperty(sequence, fc.subarray([...CHANNELS]), (steps, initial) =>
            runSequence(steps, initial),
          ),
          {
            numRuns: RUNS,
            seed: SEED,
            ...(PATH === undefined ? {} : { path: PATH }),
            verbose: 1,
          },
        );
      } catch (err) {
        console.error(`[resub-sametick] failed with RESUB_SEED=${SEED}`);
        throw err;
      }
    },
    60_000 + RUNS * 8_000,
  );
});
