/**
 * What the server's maxBatch pre-count and maxBadFrames count (fix7 F4, F5), on a real server
 * over a real socket. The pre-count runs before the frame's type is known, so any frame's
 * top-level `payload` array over maxBatch is refused `too_large`, and its NAK names the payload,
 * not a SYN. Frames refused that way count toward maxBadFrames (a client cannot send refused
 * frames forever); a frame that parses resets the count.
 */
import { describe, expect, it } from 'vitest';
import { CloseCodes } from '../src/protocol/index.js';
import { harness } from './helpers/raw.js';

const h = harness();
const arr = (n: number) => Array.from({ length: n }, (_, i) => i);

describe('maxBatch pre-count (F4)', () => {
  it('a SYN, a PNG and a SUB with a payload array over maxBatch are refused too_large, the NAK saying payload, not SYN', async () => {
    const server = await h.start({ maxBatch: 5 });
    const sock = await h.socket(server);
    for (const [id, type] of [
      ['s1', 'SYN'],
      ['p1', 'PNG'],
      ['u1', 'SUB'],
    ] as const) {
      sock.send(JSON.stringify({ id, type, payload: arr(6) }));
      const nak = await sock.next((f) => f.id === id);
      expect(nak).toMatchObject({ id, type: 'NAK', error: { code: 'too_large' } });
      expect(nak.error.message).toBe('payload of more than 5 elements (maxBatch)');
    }
    // Duplicate payload keys: any one over maxBatch refuses the frame, though JSON.parse keeps the last.
    sock.send(`{"id":"d1","type":"SYN","payload":${JSON.stringify(arr(7))},"payload":[1]}`);
    expect(await sock.next((f) => f.id === 'd1')).toMatchObject({
      type: 'NAK',
      error: { code: 'too_large' },
    });
    // Within maxBatch: applied.
    const reply = await sock.request({ id: 'ok1', type: 'SYN', payload: arr(5) });
    expect(reply.some((f) => f.type === 'SYN' && f.id === 'ok1')).toBe(true);
  });
});

describe('maxBadFrames counts maxBatch refusals (F5)', () => {
  it('maxBadFrames over-maxBatch SYNs in a row close 4400; one good frame between resets the count', async () => {
    const server = await h.start({ maxBatch: 2, maxBadFrames: 4 });
    const sock = await h.socket(server);
    const over = (id: string) => sock.send(JSON.stringify({ id, type: 'SYN', payload: arr(3) }));
    for (let i = 0; i < 3; i++) over(`a${i}`);
    await sock.next((f) => f.id === 'a2');
    // A frame that parses: the count starts again.
    await sock.request({ id: 'good', type: 'SYN', payload: [1] });
    for (let i = 0; i < 3; i++) over(`b${i}`);
    expect(await sock.next((f) => f.id === 'b2')).toMatchObject({
      type: 'NAK',
      error: { code: 'too_large' },
    });
    expect(sock.ws.readyState).toBe(sock.ws.OPEN);
    over('b3');
    expect((await sock.closed).code).toBe(CloseCodes.badFrames);
    expect(CloseCodes.badFrames).toBe(4400);
  });
});
