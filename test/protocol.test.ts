/**
 * The frame parsers: every way a frame can be wrong comes back as a typed result with a
 * protocol code, never as an exception; valid frames come back normalised.
 */
import { describe, expect, it } from 'vitest';
import {
  channelRefusalOf,
  channelStateProblem,
  encode,
  isValidChannel,
  MAX_ID_LENGTH,
  nak,
  parseClientFrame,
  parseServerFrame,
  randomId,
  SyncError,
} from '../src/protocol/index.js';

const bad = (frame: string | Uint8Array, opts?: { maxBytes?: number }) => {
  const r = parseClientFrame(frame, opts);
  if (r.ok) throw new Error(`accepted ${String(frame).slice(0, 60)}`);
  return r;
};

describe('parseClientFrame', () => {
  it('accepts each client type and normalises it', () => {
    expect(parseClientFrame('{"id":"a:1","type":"SYN","payload":[{"x":1}]}')).toEqual({
      ok: true,
      envelope: { id: 'a:1', type: 'SYN', payload: [{ x: 1 }] },
    });
    expect(parseClientFrame('{"id":"a:2","type":"PNG","payload":"ignored"}')).toEqual({
      ok: true,
      envelope: { id: 'a:2', type: 'PNG' },
    });
    expect(
      parseClientFrame('{"id":"a:3","type":"SUB","payload":{"channels":{"c":{"since":4,"epoch":"e"}}}}'),
    ).toEqual({
      ok: true,
      envelope: { id: 'a:3', type: 'SUB', payload: { channels: { c: { since: 4, epoch: 'e' } } } },
    });
    expect(parseClientFrame('{"id":"a:4","type":"UNS","payload":{"channels":["c"]}}')).toMatchObject({
      ok: true,
    });
    expect(parseClientFrame(new TextEncoder().encode('{"id":"a:5","type":"PNG"}'))).toMatchObject({
      ok: true,
    });
  });

  it.each([
    ['not JSON', '{"id":', null],
    ['an array', '[1,2]', null],
    ['null', 'null', null],
    ['no id', '{"type":"PNG"}', null],
    ['an empty id', '{"id":"","type":"PNG"}', null],
    ['a numeric id', '{"id":7,"type":"PNG"}', null],
    ['an over-long id', JSON.stringify({ id: 'x'.repeat(MAX_ID_LENGTH + 1), type: 'PNG' }), null],
    ['an unknown type', '{"id":"a","type":"HELLO"}', 'a'],
    ['a server-only type', '{"id":"a","type":"ACK"}', 'a'],
    ['an empty SYN', '{"id":"a","type":"SYN","payload":[]}', 'a'],
    ['a SYN with an object payload', '{"id":"a","type":"SYN","payload":{}}', 'a'],
    ['a SUB without channels', '{"id":"a","type":"SUB","payload":{}}', 'a'],
    ['a SUB naming no channel', '{"id":"a","type":"SUB","payload":{"channels":{}}}', 'a'],
    ['a negative since', '{"id":"a","type":"SUB","payload":{"channels":{"c":{"since":-1}}}}', 'a'],
    ['a fractional since', '{"id":"a","type":"SUB","payload":{"channels":{"c":{"since":1.5}}}}', 'a'],
    ['an unsafe since', '{"id":"a","type":"SUB","payload":{"channels":{"c":{"since":1e300}}}}', 'a'],
    ['a numeric epoch', '{"id":"a","type":"SUB","payload":{"channels":{"c":{"epoch":5}}}}', 'a'],
    [
      'a channel with a control character',
      '{"id":"a","type":"SUB","payload":{"channels":{"a\\u0000b":{}}}}',
      'a',
    ],
    ['an UNS with a bad name', '{"id":"a","type":"UNS","payload":{"channels":[""]}}', 'a'],
  ])('refuses %s with bad_request', (_name, frame, id) => {
    const r = bad(frame);
    expect(r.code).toBe('bad_request');
    expect(r.id).toBe(id);
    expect(r.message.length).toBeGreaterThan(0);
  });

  it('refuses an oversized frame with too_large, counting UTF-8 bytes', () => {
    expect(bad('x'.repeat(2000), { maxBytes: 1000 }).code).toBe('too_large');
    // 400 three-byte characters: 1,200 bytes though only 400 UTF-16 units.
    const wide = JSON.stringify({ id: 'a', type: 'SYN', payload: ['€'.repeat(400)] });
    expect(bad(wide, { maxBytes: 1000 }).code).toBe('too_large');
    expect(parseClientFrame(wide, { maxBytes: 2000 }).ok).toBe(true);
  });
});

describe('parseServerFrame (a server that lies)', () => {
  it('accepts ACK, response SYN, NAK and MSG', () => {
    expect(parseServerFrame('{"id":"a","type":"ACK"}')).toMatchObject({ ok: true });
    expect(parseServerFrame('{"id":"a","type":"SYN","payload":[1]}')).toMatchObject({ ok: true });
    expect(
      parseServerFrame('{"id":null,"type":"NAK","error":{"code":"bad_request","message":"m"}}'),
    ).toMatchObject({
      ok: true,
      envelope: { id: null, error: { code: 'bad_request' } },
    });
    expect(
      parseServerFrame('{"id":"m","type":"MSG","channel":"c","seq":1,"epoch":"e","payload":2,"replay":true}'),
    ).toEqual({
      ok: true,
      envelope: { id: 'm', type: 'MSG', channel: 'c', seq: 1, epoch: 'e', payload: 2, replay: true },
    });
  });

  it("an echo MSG keeps the author's payload when it has one, and has none when it had none", () => {
    const own = parseServerFrame(
      '{"id":"m","type":"MSG","channel":"c","seq":3,"epoch":"e","payload":"x","echo":true}',
    );
    expect(own).toEqual({
      ok: true,
      envelope: { id: 'm', type: 'MSG', channel: 'c', seq: 3, epoch: 'e', payload: 'x', echo: true },
    });
    const bare = parseServerFrame('{"id":"m","type":"MSG","channel":"c","seq":3,"epoch":"e","echo":true}');
    expect(bare).toEqual({
      ok: true,
      envelope: { id: 'm', type: 'MSG', channel: 'c', seq: 3, epoch: 'e', echo: true },
    });
    expect(bare.ok && 'payload' in bare.envelope).toBe(false);
  });

  it('a response SYN keeps a valid published list and refuses a malformed one', () => {
    const ok = parseServerFrame(
      '{"id":"s","type":"SYN","payload":[1],"published":[{"channel":"c","seq":4,"epoch":"e"}]}',
    );
    expect(ok).toEqual({
      ok: true,
      envelope: { id: 's', type: 'SYN', payload: [1], published: [{ channel: 'c', seq: 4, epoch: 'e' }] },
    });
    expect(
      parseServerFrame('{"id":"s","type":"SYN","payload":[1],"published":[{"channel":"c","seq":0}]}'),
    ).toMatchObject({
      ok: false,
      code: 'bad_request',
    });
  });

  it('a SUB cursor may ask for a snapshot; a non-boolean is refused', () => {
    expect(
      parseClientFrame('{"id":"a","type":"SUB","payload":{"channels":{"c":{"snapshot":true}}}}'),
    ).toEqual({
      ok: true,
      envelope: { id: 'a', type: 'SUB', payload: { channels: { c: { snapshot: true } } } },
    });
    expect(
      parseClientFrame('{"id":"a","type":"SUB","payload":{"channels":{"c":{"snapshot":1}}}}'),
    ).toMatchObject({
      ok: false,
      code: 'bad_request',
    });
  });

  it('an unknown NAK code becomes server_error rather than an unknown code', () => {
    const r = parseServerFrame('{"id":"a","type":"NAK","error":{"code":"weird"}}');
    expect(r).toMatchObject({
      ok: true,
      envelope: { error: { code: 'server_error', message: 'refused (unknown code weird)' } },
    });
  });

  it('a SUB answer entry: channelStateProblem accepts the documented shape and names what is wrong', () => {
    expect(channelStateProblem({ epoch: 'e1', seq: 0, recovered: true })).toBeUndefined();
    expect(
      channelStateProblem({
        epoch: 'e1',
        seq: 4,
        recovered: false,
        more: true,
        snapshot: { seq: 3, data: [] },
      }),
    ).toBeUndefined();
    expect(
      channelStateProblem({ epoch: 'e1', seq: 3, recovered: true, snapshot: { seq: 3 } }),
    ).toBeUndefined();
    const bad: Array<[unknown, string]> = [
      [5, 'entry must be an object'],
      [null, 'entry must be an object'],
      [[], 'entry must be an object'],
      [{ seq: 0, recovered: true }, 'epoch'],
      [{ epoch: 'e'.repeat(129), seq: 0, recovered: true }, 'epoch'],
      [{ epoch: 'e1', seq: 'x', recovered: true }, 'seq'],
      [{ epoch: 'e1', seq: -5, recovered: true }, 'seq'],
      [{ epoch: 'e1', seq: 1.5, recovered: true }, 'seq'],
      [{ epoch: 'e1', seq: 1e300, recovered: true }, 'seq'],
      [{ epoch: 'e1', seq: 2 ** 53, recovered: true }, 'seq'],
      [{ epoch: 'e1', seq: 0 }, 'recovered'],
      [{ epoch: 'e1', seq: 0, recovered: true, more: 'yes' }, 'more'],
      [{ epoch: 'e1', seq: 3, recovered: true, snapshot: 7 }, 'snapshot'],
      [{ epoch: 'e1', seq: 3, recovered: true, snapshot: { seq: -1, data: 1 } }, 'snapshot'],
    ];
    for (const [entry, what] of bad)
      expect(channelStateProblem(entry), JSON.stringify(entry)).toContain(what);
  });

  it('a SUB answer refusal: an unknown code is server_error (as a NAK), known ones and unsubscribed are kept', () => {
    expect(channelRefusalOf({ error: { code: 'forbidden', message: 'no' } })).toEqual({
      error: { code: 'forbidden', message: 'no' },
    });
    expect(channelRefusalOf({ error: { code: 'unsubscribed' as never, message: 'x' } }).error.code).toBe(
      'unsubscribed',
    );
    expect(channelRefusalOf({ error: { code: 'weird' as never, message: 'm' } })).toEqual({
      error: { code: 'server_error', message: 'm (unknown code weird)' },
    });
    expect(channelRefusalOf({ error: { code: 7 as never, message: 8 as never } })).toEqual({
      error: { code: 'server_error', message: 'refused (unknown code number)' },
    });
  });

  it.each([
    ['not JSON', 'nope'],
    ['a type a server may not send', '{"id":"a","type":"PNG"}'],
    ['an ACK without id', '{"type":"ACK"}'],
    ['a response SYN with an object payload', '{"id":"a","type":"SYN","payload":{}}'],
    ['a MSG with seq 0', '{"id":"m","type":"MSG","channel":"c","seq":0,"epoch":"e"}'],
    ['a MSG with a negative seq', '{"id":"m","type":"MSG","channel":"c","seq":-4,"epoch":"e"}'],
    ['a MSG with a string seq', '{"id":"m","type":"MSG","channel":"c","seq":"1","epoch":"e"}'],
    ['a MSG without epoch', '{"id":"m","type":"MSG","channel":"c","seq":1}'],
    ['a MSG with a bad channel', '{"id":"m","type":"MSG","channel":"","seq":1,"epoch":"e"}'],
  ])('refuses %s', (_name, frame) => {
    const r = parseServerFrame(frame);
    expect(r.ok).toBe(false);
  });
});

describe('helpers', () => {
  it('SyncError carries a code and is an Error', () => {
    const e = new SyncError('queue_full', 'full', { n: 1 });
    expect(e).toBeInstanceOf(Error);
    expect(e).toMatchObject({ name: 'SyncError', code: 'queue_full', details: { n: 1 } });
  });
  it('nak, encode, randomId, isValidChannel', () => {
    expect(JSON.parse(encode(nak(null, 'too_large', 'big')))).toEqual({
      id: null,
      type: 'NAK',
      error: { code: 'too_large', message: 'big' },
    });
    const a = randomId('c');
    expect(a).toMatch(/^c-[0-9a-z]+$/);
    expect(randomId('c')).not.toBe(a);
    expect(isValidChannel('board-7')).toBe(true);
    expect(isValidChannel('x'.repeat(201))).toBe(false);
    expect(isValidChannel('tab\there')).toBe(false);
  });

  it('randomId draws from a pooled entropy buffer: ids across many refills are distinct, of the asked size', () => {
    // 9 bytes each from a 1,024-byte pool: 3,000 ids refill it ~26 times; 2,000 bytes pass it.
    const ids = Array.from({ length: 3000 }, () => randomId('c'));
    for (const id of ids) expect(id).toMatch(/^c-[0-9a-z]{18}$/);
    expect(new Set(ids).size).toBe(ids.length);
    const big = randomId('b', 2000);
    expect(big).toMatch(/^b-[0-9a-z]{4000}$/);
    expect(randomId('b', 2000)).not.toBe(big);
  });
});
