/**
 * `client.subscribe(ch, { snapshot: true })` resolves with the snapshot (README "Replay":
 * `const { snapshot } = await client.subscribe(…)`), also when `ch` is in the client's
 * `channels` option (issue 12, new-user finding N1: the `channels` option's SUB, still queued,
 * carried the snapshot and the call's own SUB resumed after it, so the result had none).
 * Against a real server on 127.0.0.1 with a `snapshot` hook.
 */

import { afterEach, describe, expect, it } from 'vitest';
import { WebSocket } from 'ws';
import { createSyncClient, type SnapshotEvent, type SyncClient } from '../src/client/index.js';
import { harness, wsUrl } from './helpers/raw.js';

const h = harness();
const clients: SyncClient[] = [];
afterEach(async () => {
  await Promise.all(clients.splice(0).map((c) => c.close()));
});

const SNAPSHOT = [{ id: 'a', title: 'first' }];

describe('subscribe(ch, { snapshot: true }) resolves with the snapshot', () => {
  for (const [name, channels] of [
    ['with ch also in the channels option', { 'channel-1': {} }],
    ['without the channels option', undefined],
  ] as const) {
    it(name, async () => {
      const server = await h.start({ port: 0, snapshot: () => SNAPSHOT });
      const client = createSyncClient({
        url: wsUrl(server),
        timeout: 2000,
        WebSocket: WebSocket as never,
        ...(channels ? { channels } : {}),
      });
      clients.push(client);
      const emitted: SnapshotEvent[] = [];
      client.snapshots$.subscribe((s) => emitted.push(s));
      const state = await client.subscribe('channel-1', { snapshot: true });
      expect(state.snapshot).toEqual({ seq: 0, data: SNAPSHOT });
      expect(state.epoch).toEqual(expect.any(String));
      // The same snapshot snapshots$ emitted, once.
      expect(emitted).toEqual([{ channel: 'channel-1', epoch: state.epoch, seq: 0, data: SNAPSHOT }]);
    });
  }

  it('after publications: the snapshot at its seq, in the result and on snapshots$', async () => {
    const server = await h.start({ port: 0, snapshot: () => SNAPSHOT });
    await server.publish('channel-1', { n: 1 });
    await server.publish('channel-1', { n: 2 });
    const client = createSyncClient({
      url: wsUrl(server),
      timeout: 2000,
      WebSocket: WebSocket as never,
      channels: { 'channel-1': {} },
    });
    clients.push(client);
    const emitted: SnapshotEvent[] = [];
    client.snapshots$.subscribe((s) => emitted.push(s));
    const state = await client.subscribe('channel-1', { snapshot: true });
    expect(state.snapshot).toEqual({ seq: 2, data: SNAPSHOT });
    expect(emitted.map((s) => [s.seq, s.data])).toEqual([[2, SNAPSHOT]]);
  });
});
