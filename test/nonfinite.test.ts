/**
 * A number beyond a double's range in a client's `SYN` (FIX14C, issue 14 F4): `JSON.parse`
 * reads `1e400` as `Infinity`, which JSON cannot carry (it would be fingerprinted, stored and
 * published as `null`, so `[1e400]` and `[null]` were "the same request"). The parser refuses
 * it `bad_request` (PROTOCOL §2), over a socket and over HTTP, and nothing is applied.
 * Real parts for the server cases: a reference server on 127.0.0.1, a `ws` client, `fetch`.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { WebSocket } from 'ws';
import { parseClientFrame } from '../src/protocol/index.js';
import { createSyncServer, type SyncServer } from '../src/server/index.js';

describe('numbers beyond a double in a SYN', () => {
  it.each([
    '[1e400]',
    '[-1E+400]',
    '[{"a":[0.5e0309]}]',
    `[${'9'.repeat(400)}]`,
    `[{"x":${'1'.repeat(250)}e99}]`,
  ])('refuses %s bad_request, with its id', (payload) => {
    const r = parseClientFrame(`{"id":"s1","type":"SYN","payload":${payload}}`);
    expect(r).toMatchObject({ ok: false, code: 'bad_request', id: 's1' });
  });

  it.each([
    '[1.7976931348623157e308]',
    '[1e-400]',
    '["1e400"]',
    '[{"e400":123e100}]',
    `["${'9'.repeat(400)}"]`,
  ])('accepts finite %s', (payload) => {
    expect(parseClientFrame(`{"id":"s1","type":"SYN","payload":${payload}}`).ok).toBe(true);
  });

  describe('on a server', () => {
    let server: SyncServer | undefined;
    let ws: WebSocket | undefined;
    afterEach(async () => {
      ws?.terminate();
      await server?.close();
    });

    it('answers bad_request over a socket and HTTP, applies nothing, and does not answer it as [null]', async () => {
      const seen: unknown[] = [];
      server = await createSyncServer({
        port: 0,
        onSync: (ops) => {
          seen.push(...ops);
          return ops.map(() => ({ ok: true }));
        },
      });
      const port = server.address().port;
      ws = new WebSocket(`ws://127.0.0.1:${port}/sync?clientId=c1`);
      const socket = ws;
      const replies: Array<{ id: string; type: string; error?: { code: string } }> = [];
      socket.on('message', (d) => replies.push(JSON.parse(String(d))));
      await new Promise((resolve, reject) => {
        socket.once('open', resolve);
        socket.once('error', reject);
      });
      const next = async (id: string) => {
        const end = Date.now() + 5000;
        for (;;) {
          const r = replies.find((m) => m.id === id && m.type !== 'ACK');
          if (r) return r;
          if (Date.now() > end) throw new Error(`no answer to ${id}`);
          await new Promise((resolve) => setImmediate(resolve));
        }
      };
      socket.send('{"id":"s1","type":"SYN","payload":[null]}');
      expect((await next('s1')).type).toBe('SYN');
      replies.length = 0;
      socket.send('{"id":"s1","type":"SYN","payload":[1e400]}');
      expect(await next('s1')).toMatchObject({ type: 'NAK', error: { code: 'bad_request' } });
      const res = await fetch(`http://127.0.0.1:${port}/sync?clientId=c2`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: '{"id":"h1","type":"SYN","payload":[{"v":-1e999}]}',
      });
      const body = (await res.json()) as unknown;
      expect(JSON.stringify(body)).toContain('bad_request');
      expect(seen).toEqual([null]);
    });
  });
});
