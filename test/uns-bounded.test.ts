/**
 * S6D item 3: what the client keeps of unsubscribed channels is bounded while one socket lives.
 *
 * The client remembers channels unsubscribed since its socket became ready, to repeat their
 * `UNS` on a socket that recovers after the HTTP fallback (PROTOCOL §3 rule 11: an `UNS` over
 * HTTP ends nothing on the socket the server still holds). It kept every name until the next
 * socket opened: ~0.45 KB per churned channel for as long as one socket lives. Now a name goes
 * as soon as its `UNS` is answered on the socket.
 *
 * 10,000 subscribe/unsubscribe churns of fresh channel names on one live socket against a real
 * reference server in a child process (test/fixtures/fault-server.ts: this process's heap is
 * the client's), heapUsed after a full GC measured after the first 2,000 (warm) and after all
 * 10,000: the client's growth over the last 8,000 must stay under GROWTH_BOUND.
 * The socket is the same one throughout (no redial: no `socketReady` to clear anything).
 */
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { afterEach, describe, expect, it } from 'vitest';
import { WebSocket } from 'ws';
import { createSyncClient, type SyncClient } from '../src/client/index.js';
import { type ChildServer, startChildServer } from './helpers/child-server.js';
import { reach, T } from './helpers/harness.js';

setFlagsFromString('--expose-gc');
const gc = runInNewContext('gc') as () => void;

const TOTAL = 10_000;
const WARM = 2_000;
/**
 * Bytes. A name kept per churn costs ~100 B here (a Set entry and a 64-character string):
 * 8,000 of them ~0.8 MiB; the client with nothing kept grows ~0.1 MiB (code, caches).
 */
const GROWTH_BOUND = 400 * 1024;
/** A fresh channel name of realistic length (64 characters), distinct per `i`. */
const nameOf = (i: number) => `org-1/board-${String(i).padStart(6, '0')}/${'0123456789abcdef'.repeat(3)}-x`;

let child: ChildServer | undefined;
let c: SyncClient | undefined;
afterEach(async () => {
  await c?.close();
  c = undefined;
  await child?.stop();
  child = undefined;
});

const heap = () => {
  gc();
  gc();
  return process.memoryUsage().heapUsed;
};

describe('unsubscribed channels are not kept while one socket lives', () => {
  it(`${TOTAL} subscribe/unsubscribe churns of fresh names on one socket: heap after GC grows < 400 KiB over the last ${TOTAL - WARM}`, async () => {
    child = await startChildServer({
      FAULT_SERVER_OPTIONS: JSON.stringify({ maxChannelsPerPrincipal: 100_000 }),
    });
    const client = createSyncClient({
      url: `ws://127.0.0.1:${child.port}/sync`,
      clientId: `uns-bounded-${process.pid}`,
      timeout: T,
      WebSocket: WebSocket as never,
    });
    c = client;
    await reach(client, 'open');
    let sockets = 0;
    client.failures$.subscribe((f) => {
      if (f.kind === 'close') sockets++;
    });
    let lastStates: Record<string, string> | undefined;
    client.subscriptions$.subscribe((s) => {
      lastStates = s;
    });
    const churn = async (from: number, to: number) => {
      const CONCURRENT = 50;
      for (let i = from; i < to; i += CONCURRENT) {
        await Promise.all(
          Array.from({ length: Math.min(CONCURRENT, to - i) }, async (_, k) => {
            const name = nameOf(i + k);
            await client.subscribe(name);
            await client.unsubscribe(name);
          }),
        );
      }
    };
    await churn(0, WARM);
    const warm = heap();
    await churn(WARM, TOTAL);
    const after = heap();
    const growth = after - warm;
    console.log(
      `[uns-bounded] heapUsed after GC: ${(warm / 1048576).toFixed(2)} MiB after ${WARM} churns, ` +
        `${(after / 1048576).toFixed(2)} MiB after ${TOTAL} (+${(growth / 1024).toFixed(0)} KiB, bound ${GROWTH_BOUND / 1024} KiB)`,
    );
    // One socket throughout, and the churn really left nothing subscribed.
    expect(sockets).toBe(0);
    expect(client.state).toBe('open');
    expect(client.cursors()).toEqual({});
    expect(lastStates).toEqual({});
    const server = await child.call<{ stats: { channels: number } }>('memory');
    expect(server.stats.channels).toBe(0);
    expect(growth).toBeLessThan(GROWTH_BOUND);
  }, 120_000);
});
