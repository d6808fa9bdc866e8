/**
 * Backoff and jitter in real deployments (issue 13, PROTOCOL §4 "healthy", "jitter"):
 *
 * - a server that accepts the socket, answers the ping and dies 150 ms later, over and over
 *   (a crash loop behind a balancer): the redial backoff keeps growing, because a socket only
 *   counts healthy after `healthyAfter` (2T) with nothing failing;
 * - a socket that did stay healthy for 2T resets the backoff;
 * - 200 clients dropped at once by a server restart: their first redials, first polls and HTTP
 *   retries (with and without Retry-After) spread over their windows instead of arriving
 *   together.
 *
 * Real `ws` servers and real HTTP on 127.0.0.1. Assertions are on counts, order and the spread
 * of times relative to each window, never on absolute durations.
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import { WebSocket, WebSocketServer } from 'ws';
import { createSyncClient, type SyncClient } from '../src/client/index.js';
import { createSyncServer, type SyncServer } from '../src/server/index.js';
import { until } from './helpers/harness.js';

const cleanups: Array<() => Promise<void> | void> = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

interface Dial {
  at: number;
  /** The client's dialAttempt when the server saw the dial. */
  attempt: number;
}

/** A server that accepts, ACKs pings, and kills each socket `lifeMs(n)` after its first ACK. */
async function crashLoopServer(lifeMs: (n: number) => number) {
  const http = createServer((_req, res) => res.writeHead(404).end());
  const wss = new WebSocketServer({ server: http, path: '/sync' });
  let connections = 0;
  const onConnection: Array<() => void> = [];
  wss.on('connection', (ws) => {
    const n = connections++;
    for (const f of onConnection) f();
    let acked = false;
    ws.on('message', (data) => {
      const f = JSON.parse(String(data)) as { id: string; type: string };
      ws.send(JSON.stringify({ type: 'ACK', id: f.id }));
      if (f.type === 'PNG' && !acked) {
        acked = true;
        setTimeout(() => ws.terminate(), lifeMs(n));
      }
    });
  });
  await new Promise<void>((r) => http.listen(0, '127.0.0.1', r));
  const { port } = http.address() as AddressInfo;
  cleanups.push(
    () =>
      new Promise<void>((r) => {
        for (const c of wss.clients) c.terminate();
        wss.close();
        http.close(() => r());
      }),
  );
  return { url: `ws://127.0.0.1:${port}/sync`, onConnection, count: () => connections };
}

describe('redial backoff while connections die young', () => {
  it('a server that answers the ping and dies 150 ms later, repeatedly: dials stay few and the backoff grows', async () => {
    const T = 200;
    const srv = await crashLoopServer(() => 150);
    const dials: Dial[] = [];
    let client: SyncClient | null = null;
    srv.onConnection.push(() => {
      dials.push({ at: performance.now(), attempt: client!.actor.getSnapshot().context.dialAttempt });
    });
    client = createSyncClient({
      url: srv.url,
      timeout: T,
      maxBackoff: 1500,
      WebSocket: WebSocket,
      // Jitter pinned at its top, so the order of the gaps is the backoff's own.
      random: () => 1,
    });
    cleanups.push(() => client.close());
    // The window the issue measured in: 8 s (26 dials before the fix).
    const windowEnd = performance.now() + 8000;
    await until(() => performance.now() >= windowEnd, 9000, '8 s window');
    const n = dials.length;
    console.log(
      `crash loop, 8 s: ${n} dials, attempts ${dials.map((d) => d.attempt).join(',')}, gaps ${dials
        .slice(1)
        .map((d, i) => Math.round(d.at - dials[i]!.at))
        .join(',')} ms`,
    );
    // Backoff T/2·2^k capped at 1.5 s, plus 150 ms of life: at most 11 dials fit in 8 s.
    expect(n, `dials in 8 s: ${n}`).toBeGreaterThanOrEqual(5);
    expect(n, `dials in 8 s: ${n}`).toBeLessThanOrEqual(11);
    // The attempt counter never went back to 0 once sockets started dying young...
    const attempts = dials.map((d) => d.attempt);
    for (let i = 1; i < attempts.length; i++) {
      expect(attempts[i]!, `attempts ${attempts.join(',')}`).toBeGreaterThan(attempts[i - 1]!);
    }
    // ...so the gaps grew: the 2nd to 4th each longer than the one before, the last at least
    // twice the first.
    const gaps = dials.slice(1).map((d, i) => d.at - dials[i]!.at);
    // (The first gap also holds the first socket's keepalive wait of T, so it is compared last.)
    for (let i = 2; i < 4; i++)
      expect(gaps[i]!, `gaps ${gaps.map(Math.round)}`).toBeGreaterThan(gaps[i - 1]!);
    expect(gaps.at(-1)!, `gaps ${gaps.map(Math.round)}`).toBeGreaterThan(2 * gaps[0]!);
  }, 20_000);

  it('a socket that stays healthy for 2T resets the backoff; one that dies younger does not', async () => {
    const T = 200;
    // Connections 0–2 die young; connection 3 lives until the client counts it healthy.
    const srv = await crashLoopServer((n) => (n === 3 ? 60_000 : 100));
    let client: SyncClient | null = null;
    const attempts: number[] = [];
    srv.onConnection.push(() => attempts.push(client!.actor.getSnapshot().context.dialAttempt));
    client = createSyncClient({ url: srv.url, timeout: T, maxBackoff: 5000, WebSocket: WebSocket });
    cleanups.push(() => client.close());
    await until(() => srv.count() >= 4, 10_000, 'fourth connection');
    expect(client.actor.getSnapshot().context.dialAttempt).toBe(3);
    // 2T after it opened with nothing failing, HEALTHY resets the counter.
    await until(() => client.actor.getSnapshot().context.dialAttempt === 0, 5000, 'counted healthy');
    expect(attempts).toEqual([0, 1, 2, 3]);
  }, 20_000);
});

/** A "server restarted but not back yet" stand-in: refuses upgrades, answers POSTs 503 (from the second on, with Retry-After: 1). */
function recordingDownServer(port: number, retryAfterOnSecond: boolean) {
  const upgrades = new Map<string, number>();
  const posts = new Map<string, number[]>();
  const http: Server = createServer((req: IncomingMessage, res: ServerResponse) => {
    const id = String(req.headers['x-client-id']);
    const list = posts.get(id) ?? [];
    list.push(performance.now());
    posts.set(id, list);
    // Read the body first and close the connection: a keep-alive connection the server drops
    // under a pooled fetch would show up as network errors, not 503s.
    const headers: Record<string, string> = { connection: 'close' };
    if (retryAfterOnSecond && list.length >= 2) headers['retry-after'] = '1';
    req.resume();
    req.on('end', () => res.writeHead(503, headers).end());
  });
  http.on('upgrade', (req, socket) => {
    socket.on('error', () => {});
    const id = new URL(req.url ?? '/', 'http://x').searchParams.get('clientId') ?? '?';
    if (!upgrades.has(id)) upgrades.set(id, performance.now());
    socket.end('HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n');
  });
  return {
    upgrades,
    posts,
    listen: () => new Promise<void>((r) => http.listen(port, '127.0.0.1', r)),
    close: () =>
      new Promise<void>((r) => {
        http.closeAllConnections();
        http.close(() => r());
      }),
  };
}

const spread = (xs: number[]) => Math.max(...xs) - Math.min(...xs);

describe('jitter: 200 clients dropped at once by a server restart', () => {
  it('first redials, first polls and HTTP retries (backoff and Retry-After) spread over their windows', async () => {
    const T = 2000;
    const N = 200;
    // 200 anonymous clients on 127.0.0.1, and the test is about their timing, not limits: each
    // clientId counts alone (the default per-address limits allow 64 sockets).
    const server: SyncServer = await createSyncServer({
      port: 0,
      onSync: (ops) => ops.map(() => ({})),
      anonymousKey: 'clientId',
    });
    const { port } = server.address();
    const clients: SyncClient[] = [];
    cleanups.push(async () => {
      await Promise.all(clients.map((c) => c.close()));
    });
    // Client-side records: when each client saw its socket drop, and when it dialled after.
    const dropped = new Map<string, number>();
    const dialled = new Map<string, number[]>();
    let restarted = false;
    /**
     * The delay each client's chart asked its clock for, per named timer, after the restart:
     * XState records the delayed event just before it asks the clock, so the newest scheduled
     * event names the timer being set.
     */
    const asked = new Map<string, Map<string, number[]>>();
    const recordingClock = (id: string, actorOf: () => SyncClient['actor'] | undefined) => ({
      setTimeout(fn: () => void, ms: number) {
        const actor = actorOf();
        if (restarted && actor) {
          const scheduled = Object.values(
            (actor.system.getSnapshot() as { _scheduledEvents: Record<string, { event: { type: string } }> })
              ._scheduledEvents,
          );
          const name = scheduled.at(-1)?.event.type.split('.')[2];
          if (name) {
            const mine = asked.get(id) ?? new Map<string, number[]>();
            mine.set(name, [...(mine.get(name) ?? []), ms]);
            asked.set(id, mine);
          }
        }
        return setTimeout(fn, ms);
      },
      clearTimeout: (t: ReturnType<typeof setTimeout>) => clearTimeout(t),
    });
    /** Per client, each HTTP request after the drop: when it started, when its answer came, what. */
    const requests = new Map<
      string,
      Array<{ start: number; end?: number; retryAfter: boolean; status?: number }>
    >();
    const recordingFetch: typeof fetch = async (url, init) => {
      const id = String((init?.headers as Record<string, string> | undefined)?.['x-client-id']);
      const rec: { start: number; end?: number; retryAfter: boolean; status?: number } = {
        start: performance.now(),
        retryAfter: false,
      };
      if (restarted) requests.set(id, [...(requests.get(id) ?? []), rec]);
      try {
        const res = await fetch(url, init);
        rec.retryAfter = res.headers.has('retry-after');
        rec.status = res.status;
        return res;
      } finally {
        rec.end = performance.now();
      }
    };
    class RecordingWebSocket extends WebSocket {
      constructor(url: string) {
        super(url);
        const id = new URL(url).searchParams.get('clientId')!;
        if (restarted) dialled.set(id, [...(dialled.get(id) ?? []), performance.now()]);
      }
    }
    // Connected in waves of 25: 200 handshakes at once take longer than T on a busy 2-core box.
    for (let i = 0; i < N; i++) {
      if (i % 25 === 0) {
        const wave = clients.slice();
        await until(
          () => wave.every((c) => c.state === 'open' && c.cursors().room?.seq !== undefined),
          30_000,
          'wave open',
        );
      }
      let self: SyncClient | undefined;
      clients.push(
        createSyncClient({
          url: `ws://127.0.0.1:${port}/sync`,
          clientId: `c${i}`,
          clock: recordingClock(`c${i}`, () => self?.actor),
          timeout: T,
          maxBackoff: 4000, // bounded, so a client that met many failures still comes back soon
          WebSocket: RecordingWebSocket,
          fetch: recordingFetch,
          channels: { room: {} },
        }),
      );
      const c = clients.at(-1)!;
      self = c;
      c.failures$.subscribe((f) => {
        if (restarted && f.kind === 'close' && !dropped.has(c.clientId))
          dropped.set(c.clientId, performance.now());
      });
    }
    await until(
      () => clients.every((c) => c.state === 'open' && c.cursors().room?.seq !== undefined),
      30_000,
      'all open and subscribed',
    );

    const ids0 = () => clients.map((c) => c.clientId);
    // The restart: every socket drops at the same moment; the new process is not ready yet.
    const down = recordingDownServer(port, true);
    restarted = true;
    await server.close();
    await down.listen();
    cleanups.push(() => down.close());
    await until(
      () =>
        dialled.size === N &&
        [...requests.values()].filter((r) => r.some((x, i) => x.retryAfter && r[i + 1])).length === N,
      60_000,
      'every client redialled once and posted three times',
    ).catch((err) => {
      const counts = ids0().map((id) =>
        (requests.get(id) ?? [])
          .map((x) => (x.retryAfter ? 'R' : x.status ? String(x.status) : x.end ? 'e' : '.'))
          .join(''),
      );
      console.log(
        `dialled ${dialled.size}, dropped ${dropped.size}; requests: ${JSON.stringify(counts.slice(0, 20))}`,
      );
      throw err;
    });

    expect(dropped.size).toBe(N);
    const ids = [...dropped.keys()];
    const firstDials = ids.map((id) => dialled.get(id)![0]! - dropped.get(id)!);
    const firstPolls = ids.map((id) => requests.get(id)![0]!.start - dropped.get(id)!);
    // From the answer (or network error) to the first request to the next request, and from
    // the answer that carried Retry-After to the request that followed it.
    const backoffRetries = ids.map((id) => requests.get(id)![1]!.start - requests.get(id)![0]!.end!);
    const retryAfterRetries = ids.map((id) => {
      const r = requests.get(id)!;
      const i = r.findIndex((x, k) => x.retryAfter && r[k + 1]);
      return r[i + 1]!.start - r[i]!.end!;
    });
    // Per client, from its own drop. Windows (PROTOCOL §4): first redial T·[0.5, 1]; first poll pollInterval (= T)·[0.5, 1];
    // an HTTP retry after one failure T/2·[0.5, 1]; after Retry-After: 1 s, 1 s·[1, 1.5].
    // Asserted: each spread covers at least 30 % of its window.
    // Without jitter each spread would be only the event loop's skew, a few percent of it.
    const report = {
      firstDials: Math.round(spread(firstDials)),
      firstPolls: Math.round(spread(firstPolls)),
      backoffRetries: Math.round(spread(backoffRetries)),
      retryAfterRetries: Math.round(spread(retryAfterRetries)),
    };
    // What each chart asked for (exact, whatever the machine's load): the first redial backoff
    // and the first poll beat after the drop, per client.
    const firstAsked = (name: string) => ids.map((id) => asked.get(id)?.get(name)?.[0] ?? Number.NaN);
    const askedDials = firstAsked('redialBackoff');
    const askedPolls = firstAsked('pollInterval');
    const askedRetries = firstAsked('httpBackoff');
    console.log(
      `spread over ${N} clients (ms): wall ${JSON.stringify(report)}; asked ${JSON.stringify({
        redialBackoff: Math.round(spread(askedDials)),
        pollInterval: Math.round(spread(askedPolls)),
        httpBackoff: Math.round(spread(askedRetries)),
      })}`,
    );
    for (const [name, xs, top] of [
      ['redialBackoff', askedDials, T],
      ['pollInterval', askedPolls, T],
    ] as const) {
      expect(xs.every(Number.isFinite), `${name} asked by every client`).toBe(true);
      // Within the documented bounds [top/2, top]...
      expect(Math.min(...xs), `${name} floor`).toBeGreaterThanOrEqual(top / 2);
      expect(Math.max(...xs), `${name} upper bound`).toBeLessThanOrEqual(top);
      // ...and spread over them (a uniform draw of 200 covers nearly all of it).
      expect(spread(xs), `${name} spread`).toBeGreaterThanOrEqual(0.8 * (top / 2));
    }
    expect(askedRetries.every(Number.isFinite), 'httpBackoff asked by every client').toBe(true);
    expect(spread(askedRetries), 'httpBackoff spread').toBeGreaterThan(0);
    // Never earlier than the window's floor (jitter only ever shortens to half)...
    expect(Math.min(...firstDials), 'first redial floor').toBeGreaterThanOrEqual(T / 2 - 5);
    expect(Math.min(...firstPolls), 'first poll floor').toBeGreaterThanOrEqual(T / 2 - 5);
    // ...and spread over it.
    expect(spread(firstDials), 'first redials').toBeGreaterThanOrEqual(0.3 * (T / 2));
    expect(spread(firstPolls), 'first polls').toBeGreaterThanOrEqual(0.3 * (T / 2));
    expect(spread(backoffRetries), 'HTTP retries').toBeGreaterThanOrEqual(0.3 * (T / 4));
    expect(spread(retryAfterRetries), 'retries after Retry-After').toBeGreaterThanOrEqual(0.3 * 500);
    // Retry-After is a floor: nobody came back earlier than asked.
    expect(Math.min(...retryAfterRetries)).toBeGreaterThanOrEqual(1000 - 5);
  }, 120_000);
});
