/**
 * A number beyond a double's range in a client's `SYN` (FIX14C, issue 14 F4): `JSON.parse`
 * reads `1e400` as `Infinity`, which JSON cannot carry (it would be fingerprinted, stored and
 * published as `null`, so `[1e400]` and `[null]` were "the same request"). The parser refuses
 * it `bad_request` (PROTOCOL §2), over a socket and over HTTP, and nothing is applied.
 * Real parts for the server cases: a reference server on 127.0.0.1, a `ws` client, `fetch`.
 */
import fc from 'fast-check';
import { afterEach, describe, expect, it } from 'vitest';
import { WebSocket } from 'ws';
import { hasDigitRun, mayHoldNonFinite, parseClientFrame } from '../src/protocol/index.js';
import { createSyncServer, type SyncServer } from '../src/server/index.js';

const SEED = Number(process.env.SEED ?? Date.now() % 2 ** 31);
console.log(`[nonfinite] seed ${SEED} (SEED=${SEED} replays)`);

describe('numbers beyond a double in a SYN', () => {
  it.each([
    '[1e400]',
    '[-1E+400]',
    '[1.5e+999]',
    `[${'9'.repeat(309)}]`,
    `["xe123",1e400]`,
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

  it('walks only texts that may hold such a number: a digit before an exponent of 3+ digits, or 100 digits (session 6)', () => {
    for (const n of ['1e400', '-1E+400', '1.5e+999', '0.5e0309', '9'.repeat(100), `${'1'.repeat(250)}e99`]) {
      expect(mayHoldNonFinite(`{"id":"s1","type":"SYN","payload":[${n}]}`)).toBe(true);
    }
    // Ids and strings with e/E and 3 digits (not after a digit) are not walked any more.
    for (const text of [
      '{"id":"xe123","type":"SYN","payload":["xe123",{"Ae+100":"E9999"},1e99,-2.5E-400,12e+45]}',
      '{"id":"c:abcE1234:7","type":"SYN","payload":[{"op":"e123"}]}',
    ]) {
      expect(mayHoldNonFinite(text)).toBe(false);
      expect(parseClientFrame(text).ok).toBe(true);
    }
  });

  it('the pre-filter says what one lookbehind regex says, on any text of digits, e/E, signs and letters (property)', () => {
    const chunk = fc.oneof(
      fc.integer({ min: 1, max: 130 }).map((n) => '7'.repeat(n)),
      fc.constantFrom('e', 'E', '+', '-', '.', 'x', ' ', '"', 'e1', 'e+', '5e', '12'),
    );
    const reference = (t: string, min: number) =>
      /(?<=\d)[eE]\+?\d{3}/.test(t) || new RegExp(`\\d{${min}}`).test(t);
    fc.assert(
      fc.property(fc.array(chunk, { maxLength: 40 }), fc.integer({ min: 1, max: 120 }), (chunks, min) => {
        const t = chunks.join('');
        expect(mayHoldNonFinite(t)).toBe(reference(t, 100));
        expect(hasDigitRun(t, min)).toBe(new RegExp(`\\d{${min}}`).test(t));
      }),
      { seed: SEED, numRuns: 2000 },
    );
  });

  it('never lets a number beyond a double through the pre-filter (property over number texts)', () => {
    const digits = (min: number, max: number) =>
      fc.array(fc.constantFrom(...'0123456789'), { minLength: min, maxLength: max }).map((d) => d.join(''));
    const numberText = fc
      .tuple(
        fc.constantFrom('', '-'),
        fc.oneof(
          fc.constant('0'),
          fc.tuple(fc.constantFrom(...'123456789'), digits(0, 330)).map(([a, b]) => a + b),
        ),
        fc.option(digits(1, 120), { nil: undefined }),
        fc.option(fc.tuple(fc.constantFrom('e', 'E'), fc.constantFrom('', '+', '-'), digits(1, 5)), {
          nil: undefined,
        }),
      )
      .map(
        ([sign, int, frac, exp]) =>
          `${sign}${int}${frac === undefined ? '' : `.${frac}`}${exp ? exp.join('') : ''}`,
      );
    fc.assert(
      fc.property(numberText, (n) => {
        const text = `{"id":"p1","type":"SYN","payload":[{"v":${n}}]}`;
        if (!Number.isFinite(Number(n))) {
          expect(mayHoldNonFinite(text)).toBe(true);
          expect(parseClientFrame(text)).toMatchObject({ ok: false, code: 'bad_request', id: 'p1' });
        } else {
          expect(parseClientFrame(text).ok).toBe(true);
        }
      }),
      { seed: SEED, numRuns: 500 },
    );
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
