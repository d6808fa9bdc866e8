/**
 * Bad input, both ways. Towards the server (a reference server in a child process with
 * `--expose-gc`, channels outside `ok-` refused): a corpus of malformed frames and HTTP bodies
 * (bad JSON, wrong types, over-long ids, frames past the caps, negative or huge `since`,
 * unknown channels, odd unicode, arrays where objects go, deep nesting, empty and binary
 * frames), each answered with its documented `NAK` code or close code; then a barrage of
 * 20,000 bad frames and 2,000 bad HTTP requests while a well-behaved client keeps syncing,
 * with the server's heapUsed after GC bounded. Towards the client (a tiny lying server, since
 * a real one cannot be made to lie): wrong ids, wrong result counts, MSGs with bad seqs,
 * frames that are not JSON; the client reports them (`SyncError`, `failures$` `bad_frame`),
 * loses nothing it can still get, and keeps working.
 */
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { WebSocket } from 'ws';
import {
  type ChannelMessage,
  createSyncClient,
  type Failure,
  type SyncClient,
  SyncError,
} from '../src/client/index.js';
import { CloseCodes, MAX_ID_LENGTH } from '../src/protocol/index.js';
import { type ChildServer, startChildServer } from './helpers/child-server.js';
import { next, until } from './helpers/harness.js';
import { honest, type LyingServer, startLyingServer } from './helpers/lying-server.js';
import { type Frame, http, RawSocket } from './helpers/raw.js';

const MB = 1024 * 1024;
/** heapUsed after GC may grow by less than this over the barrage. */
const BARRAGE_HEAP_BOUND_MB = 16;
const BARRAGE_SOCKETS = 20;
const BARRAGE_FRAMES = 20_000;
const BARRAGE_HTTP = 2_000;

const j = (v: unknown) => JSON.stringify(v);
const deep = (n: number) => '['.repeat(n) + ']'.repeat(n);
const SAFE = Number.MAX_SAFE_INTEGER;

type Expect =
  | { nak: string; id: string | null }
  /** A well-formed request the server refuses: ACK on receipt (§3 rule 1), then the NAK. */
  | { refuse: string; id: string }
  /** ACK, then (for SYN/SUB/UNS) the response SYN, both with this id. */
  | { answer: string; response: boolean; check?: (response: Frame) => void };

interface Case {
  name: string;
  frame: string | Buffer;
  /** Send as a binary frame. */
  binary?: boolean;
  expect: Expect;
}

const nak = (code: string, id: string | null = null): Expect => ({ nak: code, id });
const answer = (id: string, response = true, check?: (r: Frame) => void): Expect => ({
  answer: id,
  response,
  check,
});
const sub = (id: string, channels: unknown) => j({ id, type: 'SUB', payload: { channels } });

/** Frames a socket may get; none is over maxPayloadBytes (those have their own tests). */
const CORPUS: Case[] = [
  // not JSON, or not an object
  { name: 'truncated JSON', frame: '{"id":"t1","type":"PNG"', expect: nak('bad_request') },
  { name: 'plain text', frame: 'hello, server', expect: nak('bad_request') },
  { name: 'empty text frame', frame: '', expect: nak('bad_request') },
  { name: 'empty binary frame', frame: Buffer.alloc(0), binary: true, expect: nak('bad_request') },
  {
    name: 'binary garbage (invalid UTF-8)',
    frame: Buffer.from([0xff, 0xfe, 0x00, 0xc3, 0x28, 0xa0]),
    binary: true,
    expect: nak('bad_request'),
  },
  // TextDecoder drops a leading BOM, as a browser would: the envelope inside is what counts.
  {
    name: 'byte order mark before JSON is tolerated',
    frame: `\ufeff${j({ id: 'bom', type: 'PNG' })}`,
    expect: answer('bom', false),
  },
  { name: 'JSON number', frame: '42', expect: nak('bad_request') },
  { name: 'JSON string', frame: '"SYN"', expect: nak('bad_request') },
  { name: 'JSON null', frame: 'null', expect: nak('bad_request') },
  {
    name: 'array where the envelope goes',
    frame: j([{ id: 'arr', type: 'PNG' }]),
    expect: nak('bad_request'),
  },
  { name: '100,000-deep nested arrays', frame: deep(100_000), expect: nak('bad_request') },
  // ids
  { name: 'numeric id', frame: j({ id: 7, type: 'PNG' }), expect: nak('bad_request') },
  { name: 'empty id', frame: j({ id: '', type: 'PNG' }), expect: nak('bad_request') },
  { name: 'object id', frame: j({ id: { a: 1 }, type: 'PNG' }), expect: nak('bad_request') },
  {
    name: `id of ${MAX_ID_LENGTH + 1} characters`,
    frame: j({ id: 'x'.repeat(MAX_ID_LENGTH + 1), type: 'PNG' }),
    expect: nak('bad_request'),
  },
  {
    name: 'id of 100,000 characters',
    frame: j({ id: 'x'.repeat(100_000), type: 'PNG' }),
    expect: nak('bad_request'),
  },
  {
    name: `id of ${MAX_ID_LENGTH} characters is fine`,
    frame: j({ id: 'y'.repeat(MAX_ID_LENGTH), type: 'PNG' }),
    expect: answer('y'.repeat(MAX_ID_LENGTH), false),
  },
  // types
  { name: 'missing type', frame: j({ id: 'nt' }), expect: nak('bad_request', 'nt') },
  { name: 'unknown type', frame: j({ id: 'ut', type: 'HELLO' }), expect: nak('bad_request', 'ut') },
  {
    name: 'lower-case type',
    frame: j({ id: 'lc', type: 'syn', payload: [{}] }),
    expect: nak('bad_request', 'lc'),
  },
  { name: 'numeric type', frame: j({ id: 'num', type: 1 }), expect: nak('bad_request', 'num') },
  { name: 'client sends ACK', frame: j({ id: 'ca', type: 'ACK' }), expect: nak('bad_request', 'ca') },
  {
    name: 'client sends NAK',
    frame: j({ id: 'cn', type: 'NAK', error: { code: 'x' } }),
    expect: nak('bad_request', 'cn'),
  },
  {
    name: 'client sends MSG',
    frame: j({ id: 'cm', type: 'MSG', channel: 'ok-a', seq: 1, epoch: 'e' }),
    expect: nak('bad_request', 'cm'),
  },
  // SYN payloads
  { name: 'SYN without payload', frame: j({ id: 's1', type: 'SYN' }), expect: nak('bad_request', 's1') },
  {
    name: 'SYN with an object where the array goes',
    frame: j({ id: 's2', type: 'SYN', payload: { op: 1 } }),
    expect: nak('bad_request', 's2'),
  },
  {
    name: 'SYN with an empty array',
    frame: j({ id: 's3', type: 'SYN', payload: [] }),
    expect: nak('bad_request', 's3'),
  },
  {
    name: 'SYN with a string payload',
    frame: j({ id: 's4', type: 'SYN', payload: 'ops' }),
    expect: nak('bad_request', 's4'),
  },
  // SUB payloads and cursors
  { name: 'SUB without payload', frame: j({ id: 'u1', type: 'SUB' }), expect: nak('bad_request', 'u1') },
  {
    name: 'SUB with an array where the payload object goes',
    frame: j({ id: 'u2', type: 'SUB', payload: [] }),
    expect: nak('bad_request', 'u2'),
  },
  {
    name: 'SUB with channels as an array',
    frame: j({ id: 'u3', type: 'SUB', payload: { channels: ['ok-a'] } }),
    expect: nak('bad_request', 'u3'),
  },
  { name: 'SUB naming no channel', frame: sub('u4', {}), expect: nak('bad_request', 'u4') },
  {
    name: 'SUB with a number where the cursor goes',
    frame: sub('u5', { 'ok-a': 5 }),
    expect: nak('bad_request', 'u5'),
  },
  {
    name: 'SUB with an array where the cursor goes',
    frame: sub('u6', { 'ok-a': [] }),
    expect: nak('bad_request', 'u6'),
  },
  { name: 'negative since', frame: sub('c1', { 'ok-a': { since: -1 } }), expect: nak('bad_request', 'c1') },
  {
    name: 'fractional since',
    frame: sub('c2', { 'ok-a': { since: 1.5 } }),
    expect: nak('bad_request', 'c2'),
  },
  {
    name: 'since as a string',
    frame: sub('c3', { 'ok-a': { since: '3' } }),
    expect: nak('bad_request', 'c3'),
  },
  {
    name: 'since 1e300',
    frame: '{"id":"c4","type":"SUB","payload":{"channels":{"ok-a":{"since":1e300}}}}',
    expect: nak('bad_request', 'c4'),
  },
  {
    name: 'since 2^53 (not a safe integer)',
    frame: '{"id":"c5","type":"SUB","payload":{"channels":{"ok-a":{"since":9007199254740992}}}}',
    expect: nak('bad_request', 'c5'),
  },
  {
    name: 'since 100,000-deep nested',
    frame: `{"id":"c6","type":"SUB","payload":{"channels":{"ok-a":{"since":${deep(100_000)}}}}}`,
    expect: nak('bad_request', 'c6'),
  },
  { name: 'negative rewind', frame: sub('c7', { 'ok-a': { rewind: -5 } }), expect: nak('bad_request', 'c7') },
  {
    name: 'rewind 1e20',
    frame: '{"id":"c8","type":"SUB","payload":{"channels":{"ok-a":{"rewind":1e20}}}}',
    expect: nak('bad_request', 'c8'),
  },
  {
    name: 'numeric epoch',
    frame: sub('c9', { 'ok-a': { since: 0, epoch: 5 } }),
    expect: nak('bad_request', 'c9'),
  },
  {
    name: 'epoch of 200 characters',
    frame: sub('c10', { 'ok-a': { since: 0, epoch: 'e'.repeat(200) } }),
    expect: nak('bad_request', 'c10'),
  },
  {
    name: 'since = MAX_SAFE_INTEGER: a client ahead of the head is told its copy is stale',
    frame: sub('c11', { 'ok-a': { since: SAFE } }),
    expect: answer('c11', true, (r) =>
      expect(r.payload[0].channels['ok-a']).toMatchObject({ recovered: false }),
    ),
  },
  {
    name: 'rewind = MAX_SAFE_INTEGER: everything retained',
    frame: sub('c12', { 'ok-a': { rewind: SAFE } }),
    expect: answer('c12', true, (r) =>
      expect(r.payload[0].channels['ok-a']).toMatchObject({ recovered: true }),
    ),
  },
  // channel names
  // Refused per channel (PROTOCOL §3 rule 7): the SUB is answered, the refused entry carries
  // the error, the allowed ones are served.
  {
    name: 'unknown channel (not authorized)',
    frame: sub('n1', { secret: {} }),
    expect: answer('n1', true, (r) => {
      expect((r.payload as [{ channels: Record<string, unknown> }])[0].channels).toEqual({
        secret: { error: { code: 'forbidden', message: expect.any(String) } },
      });
    }),
  },
  {
    name: 'one unknown channel among allowed ones',
    frame: sub('n2', { 'ok-a': {}, 'admin/all': {} }),
    expect: answer('n2', true, (r) => {
      const entries = (r.payload as [{ channels: Record<string, unknown> }])[0].channels;
      expect(entries['admin/all']).toEqual({ error: { code: 'forbidden', message: expect.any(String) } });
      expect(entries['ok-a']).toMatchObject({ seq: expect.any(Number), recovered: true });
    }),
  },
  { name: 'empty channel name', frame: sub('n3', { '': {} }), expect: nak('bad_request', 'n3') },
  {
    name: 'channel of 201 characters',
    frame: sub('n4', { [`ok-${'c'.repeat(198)}`]: {} }),
    expect: nak('bad_request', 'n4'),
  },
  { name: 'channel with NUL', frame: sub('n5', { 'ok-\u0000x': {} }), expect: nak('bad_request', 'n5') },
  { name: 'channel with a newline', frame: sub('n6', { 'ok-\nx': {} }), expect: nak('bad_request', 'n6') },
  {
    name: 'channel with right-to-left override is a name like any other',
    frame: sub('n7', { 'ok-\u202eevil': {} }),
    expect: answer('n7'),
  },
  { name: 'channel with emoji', frame: sub('n8', { 'ok-🎉👩‍👩‍👧': {} }), expect: answer('n8') },
  {
    name: 'channel with a lone surrogate (JSON escape)',
    frame: '{"id":"n9","type":"SUB","payload":{"channels":{"ok-\\ud800":{}}}}',
    expect: answer('n9', true, (r) => expect(Object.keys(r.payload[0].channels)).toEqual(['ok-\ud800'])),
  },
  {
    name: 'UNS with channels not an array',
    frame: j({ id: 'x1', type: 'UNS', payload: { channels: 'ok-a' } }),
    expect: nak('bad_request', 'x1'),
  },
  {
    name: 'UNS with a NUL channel',
    frame: j({ id: 'x2', type: 'UNS', payload: { channels: ['a\u0000'] } }),
    expect: nak('bad_request', 'x2'),
  },
  {
    name: 'UNS of a channel never subscribed is fine',
    frame: j({ id: 'x3', type: 'UNS', payload: { channels: ['ok-never'] } }),
    expect: answer('x3'),
  },
  // odd unicode in ids, and operations the server does not look into
  {
    name: 'id with a lone surrogate (JSON escape)',
    frame: '{"id":"\\udc00lone","type":"PNG"}',
    expect: answer('\udc00lone', false),
  },
  { name: 'id with NUL', frame: j({ id: 'a\u0000b', type: 'PNG' }), expect: answer('a\u0000b', false) },
  {
    name: 'id with RTL and emoji',
    frame: j({ id: '\u202e🙃', type: 'PNG' }),
    expect: answer('\u202e🙃', false),
  },
  {
    name: 'a valid PNG in a binary frame',
    frame: Buffer.from(j({ id: 'bin', type: 'PNG' })),
    binary: true,
    expect: answer('bin', false),
  },
  {
    name: 'an operation 10,000 deep is the application’s business: applied and answered',
    frame: `{"id":"deep-op","type":"SYN","payload":[${deep(10_000)}]}`,
    expect: answer('deep-op'),
  },
];

const clientId = (() => {
  let n = 0;
  return (tag: string) => `${tag}-${process.pid}-${++n}`;
})();

let child: ChildServer;
let url: string;
let httpUrl: string;
const sockets: RawSocket[] = [];
const clients: SyncClient[] = [];

beforeAll(async () => {
  child = await startChildServer({ FAULT_SERVER_ALLOW: 'ok-' });
  url = `ws://127.0.0.1:${child.port}/sync`;
  httpUrl = `http://127.0.0.1:${child.port}/sync`;
});
afterAll(async () => {
  for (const s of sockets.splice(0)) s.ws.terminate();
  await Promise.all(clients.splice(0).map((c) => c.close()));
  await child?.stop();
});

async function open(tag = 'raw'): Promise<RawSocket> {
  const s = await RawSocket.open(`${url}?clientId=${clientId(tag)}`, 5000);
  sockets.push(s);
  return s;
}

/** Send one case on `sock` and check exactly what comes back. */
async function check(sock: RawSocket, c: Case): Promise<void> {
  const got = sock.next(() => true, 5000);
  sock.send(c.frame, { binary: c.binary ?? false });
  const first = await got;
  const e = c.expect;
  if ('nak' in e) {
    expect(first).toMatchObject({
      type: 'NAK',
      id: e.id,
      error: { code: e.nak, message: expect.any(String) },
    });
    return;
  }
  if ('refuse' in e) {
    expect(first).toEqual({ type: 'ACK', id: e.id });
    expect(await sock.next(() => true, 5000)).toMatchObject({
      type: 'NAK',
      id: e.id,
      error: { code: e.refuse },
    });
    return;
  }
  expect(first).toEqual({ type: 'ACK', id: e.answer });
  if (!e.response) return;
  const response = await sock.next(() => true, 5000);
  expect(response).toMatchObject({ type: 'SYN', id: e.answer });
  e.check?.(response);
}

describe('bad frames over the socket', () => {
  // One socket per case, so that a case answered wrongly cannot shift the next one's frames;
  // the last test sends the whole corpus down one socket.
  it.each(CORPUS.map((c) => [c.name, c] as const))('%s', async (_name, c) => {
    const sock = await open('case');
    await check(sock, c);
    await sock.close();
  });

  it('one socket gets the whole corpus in a row, and is still open and in sync after it', async () => {
    const sock = await open('corpus');
    for (const c of CORPUS) await check(sock, c);
    const frames = await sock.request({ id: 'after-corpus', type: 'SYN', payload: [{ id: 'after-corpus' }] });
    expect(frames.map((f: Frame) => f.type)).toEqual(['ACK', 'SYN']);
    expect(frames[1].payload).toEqual([{ id: 'after-corpus' }]);
  });

  it('a frame over maxPayloadBytes (2 MB) gets NAK too_large with its id, and the socket stays', async () => {
    const s = await open('big');
    await check(s, {
      name: '2 MB',
      frame: j({ id: 'big', type: 'SYN', payload: ['x'.repeat(2 * MB)] }),
      expect: nak('too_large', 'big'),
    });
    await check(s, {
      name: 'after',
      frame: j({ id: 'after-big', type: 'PNG' }),
      expect: answer('after-big', false),
    });
  });

  it('a 10 MB frame (over the hard cap, 4 × maxPayloadBytes) closes the socket with 1009', async () => {
    const s = await open('huge');
    s.send(j({ id: 'huge', type: 'SYN', payload: ['x'.repeat(10 * MB)] }));
    expect((await s.closed).code).toBe(CloseCodes.tooLarge);
  });

  it('a text frame that is not UTF-8 closes the socket with 1007 (ws validates text frames)', async () => {
    const s = await open('utf8');
    s.send(Buffer.from([0x7b, 0xff, 0xfe, 0x7d]), { binary: false });
    expect((await s.closed).code).toBe(1007);
  });

  it(`${100} bad frames in a row close the socket with ${CloseCodes.badFrames}`, async () => {
    const s = await open('flood');
    for (let i = 0; i < 100; i++) s.send('nope');
    expect((await s.closed).code).toBe(CloseCodes.badFrames);
    expect(s.received.filter((f: Frame) => f.type === 'NAK')).toHaveLength(100);
  });
});

describe('bad HTTP requests', () => {
  /** `id: null` sends no X-Client-Id at all. */
  const post = (
    body: string | Buffer | undefined,
    headers: Record<string, string> = {},
    id: string | null = clientId('h'),
  ) => http(httpUrl, { body, ...(id === null ? {} : { clientId: id }), headers }, 5000);

  it.each(CORPUS.filter((c) => !('answer' in c.expect)).map((c) => [c.name, c] as const))(
    'POST %s: answered with its NAK',
    async (_name, c) => {
      const r = await post(c.frame);
      const e = c.expect;
      if ('refuse' in e) {
        // The request itself was fine: 200, with the ACK and the NAK that replaces the response.
        expect(r.status).toBe(200);
        expect(r.body).toEqual([
          { type: 'ACK', id: e.id },
          expect.objectContaining({
            type: 'NAK',
            id: e.id,
            error: expect.objectContaining({ code: e.refuse }),
          }),
        ]);
      } else if ('nak' in e) {
        expect(r.status).toBe(400);
        expect(r.body).toEqual([
          expect.objectContaining({ type: 'NAK', id: e.id, error: expect.objectContaining({ code: e.nak }) }),
        ]);
      }
    },
  );

  it('no X-Client-Id, or one of 129 characters: 400 bad_request', async () => {
    for (const id of [null, '', 'c'.repeat(MAX_ID_LENGTH + 1)]) {
      const r = await post(j({ id: 'h1', type: 'PNG' }), {}, id);
      expect(r.status).toBe(400);
      expect(r.body[0]).toMatchObject({ type: 'NAK', error: { code: 'bad_request' } });
    }
  });

  it('a 2 MB body, a chunked 2 MB body, and a lying Content-Length: 413 too_large', async () => {
    const big = j({ id: 'hb', type: 'SYN', payload: ['x'.repeat(2 * MB)] });
    const a = await post(big);
    expect(a.status).toBe(413);
    expect(a.body[0]).toMatchObject({ type: 'NAK', error: { code: 'too_large' } });
    const b = await post(big, { 'Transfer-Encoding': 'chunked' });
    expect(b.status).toBe(413);
    const c = await http(
      httpUrl,
      { method: 'POST', clientId: clientId('h'), headers: { 'Content-Length': String(10 * MB) } },
      5000,
    ).catch((err: Error) => ({ status: -1, body: err.message }));
    expect(c.status).toBe(413);
  });

  it('GET and PUT: 405; OPTIONS: 204', async () => {
    expect((await http(httpUrl, { method: 'GET', clientId: 'g' }, 5000)).status).toBe(405);
    expect((await http(httpUrl, { method: 'PUT', clientId: 'g', body: '{}' }, 5000)).status).toBe(405);
    expect((await http(httpUrl, { method: 'OPTIONS' }, 5000)).status).toBe(204);
  });

  it('valid envelopes with odd unicode are answered 200', async () => {
    const r = await post('{"id":"\\ud800h","type":"PNG"}');
    expect(r.status).toBe(200);
    expect(r.body).toEqual([{ type: 'ACK', id: '\ud800h' }]);
  });
});

describe('a barrage of bad input', () => {
  it(`${BARRAGE_FRAMES} bad frames on ${BARRAGE_SOCKETS} sockets and ${BARRAGE_HTTP} bad HTTP requests: each answered, a well-behaved client keeps syncing, memory stays bounded`, async () => {
    // The well-behaved client: one op at a time, and a channel published to every 50 ms.
    const good = createSyncClient({
      url,
      clientId: clientId('good'),
      timeout: 2000,
      WebSocket: WebSocket as never,
    });
    clients.push(good);
    const failures: Failure[] = [];
    good.failures$.subscribe((f) => failures.push(f));
    const got: ChannelMessage[] = [];
    good.messages$.subscribe((m) => got.push(m));
    await good.subscribe('ok-live', { since: 0 });
    await child.call('startPublishing', { channels: ['ok-live'], intervalMs: 50 });
    let running = true;
    const results: unknown[] = [];
    const sentIds: string[] = [];
    const latency: number[] = [];
    const loop = (async () => {
      let k = 0;
      while (running) {
        const id = `good-${++k}`;
        sentIds.push(id);
        const t = performance.now();
        results.push(await good.send({ id }));
        latency.push(performance.now() - t);
      }
    })().catch((err: unknown) => results.push(err));
    await until(() => results.length >= 5, 10_000, 'the good client to sync');
    latency.length = 0;

    const before = await child.call('memory');
    const barrageStart = Date.now();
    const bad = CORPUS.filter((c) => 'nak' in c.expect);
    // Frames over 4 KB (the 100,000-deep nestings and the 100,000-character id cost the
    // parser ~0.1 s each) go once every 10 rounds, to keep the barrage's time reasonable.
    const all = [...bad, ...CORPUS.filter((c) => 'refuse' in c.expect)];
    const small = all.filter((c) => c.frame.length <= 4096);
    const large = all.filter((c) => c.frame.length > 4096);
    const perSocket = BARRAGE_FRAMES / BARRAGE_SOCKETS;
    const socks = await Promise.all(Array.from({ length: BARRAGE_SOCKETS }, () => open('barrage')));
    const nakCount = (s: RawSocket) =>
      s.received.reduce((n: number, f: Frame) => n + (f.type === 'NAK' ? 1 : 0), 0);
    await Promise.all(
      socks.map(async (s, si) => {
        // In rounds of 50 bad frames then one PNG: fewer than maxBadFrames in a row, so the
        // socket stays, and each round is awaited, so what is in flight stays bounded. Every
        // bad frame gets exactly one NAK (a refused SUB its ACK first, and its NAK may come
        // after the PNG's ACK: authorization is asynchronous).
        for (let sent = 0; sent < perSocket; ) {
          const round = Math.min(50, perSocket - sent);
          const roundNo = sent / 50;
          for (let i = 0; i < round; i++) {
            const c =
              i === 0 && roundNo % 10 === si % 10
                ? large[(si + roundNo) % large.length]!
                : small[(si + sent + i) % small.length]!;
            s.send(c.frame, { binary: c.binary ?? false });
          }
          s.send({ id: `png-${si}-${sent}`, type: 'PNG' });
          sent += round;
          await until(() => nakCount(s) >= sent, 20_000, `socket ${si}: ${sent} NAKs`);
        }
      }),
    );
    const naks = socks.reduce((n, s) => n + nakCount(s), 0);
    // Bad HTTP requests, 50 at a time.
    let http4xx = 0;
    for (let i = 0; i < BARRAGE_HTTP; i += 50) {
      const rs = await Promise.all(
        Array.from({ length: 50 }, (_, k) => {
          const c = bad[(i + k) % bad.length]!;
          return http(httpUrl, { body: c.frame, clientId: clientId('hb') }, 10_000);
        }),
      );
      http4xx += rs.filter((r) => r.status === 400).length;
    }
    const barrageMs = Date.now() - barrageStart;
    const during = [...latency].sort((a, b) => a - b);
    const pct = (p: number) =>
      Math.round(during[Math.min(during.length - 1, Math.floor((p / 100) * during.length))]! * 10) / 10;
    for (const s of socks) await s.close();
    await until(() => true);
    const after = await child.call('memory');

    running = false;
    await loop;
    const heads = (await child.call('stopPublishing')) as Record<string, number>;
    await until(
      () => good.cursors()['ok-live']?.seq === heads['ok-live'],
      10_000,
      'the good client to catch up',
    );
    const counts = await child.call('counts');
    const growth = after.memory.heapUsed - before.memory.heapUsed;
    console.log(
      `[bad-input] ${JSON.stringify({
        badFrames: naks,
        badHttp: http4xx,
        barrageMs,
        framesPerSecond: Math.round(naks / (barrageMs / 1000)),
        heapBeforeMB: Math.round((before.memory.heapUsed / MB) * 10) / 10,
        heapAfterMB: Math.round((after.memory.heapUsed / MB) * 10) / 10,
        growthMB: Math.round((growth / MB) * 10) / 10,
        boundMB: BARRAGE_HEAP_BOUND_MB,
        goodOps: results.length,
        goodOpLatencyDuringBarrageMs: { n: during.length, p50: pct(50), p99: pct(99), max: pct(100) },
        goodMessages: got.length,
        goodFailures: failures.map((f) => f.kind),
        serverStats: after.stats,
      })}`,
    );

    expect(naks).toBe(BARRAGE_FRAMES);
    expect(http4xx).toBe(BARRAGE_HTTP);
    // The good client: every op answered with its own result, applied once, every message
    // in order, and its socket never dropped.
    expect(results).toEqual(sentIds.map((id) => ({ id })));
    for (const id of sentIds) expect(counts.byId[id]).toBe(1);
    expect(got.map((m) => m.seq)).toEqual(Array.from({ length: heads['ok-live']! }, (_, i) => i + 1));
    expect(failures.filter((f) => f.kind === 'close' || f.kind === 'dial_error')).toEqual([]);
    expect(good.state).toBe('open');
    expect(after.stats.sockets).toBe(1 + sockets.filter((s) => s.ws.readyState === WebSocket.OPEN).length);
    expect(growth).toBeLessThan(BARRAGE_HEAP_BOUND_MB * MB);
  }, 120_000);
});

describe('a lying server, towards the client', () => {
  let liar: LyingServer;
  let c: SyncClient;
  let failures: Failure[];
  const make = (opts: { pollInterval?: number } = {}) => {
    c = createSyncClient({
      url: liar.wsUrl,
      clientId: clientId('lied-to'),
      timeout: 150,
      maxBackoff: 600,
      WebSocket: WebSocket as never,
      ...opts,
    });
    failures = [];
    c.failures$.subscribe((f) => failures.push(f));
    return c;
  };
  beforeAll(async () => {
    liar = await startLyingServer();
  });
  afterEach(async () => {
    await c?.close();
    liar.reset();
  });
  afterAll(async () => {
    await liar?.close();
  });
  const openClient = async () => {
    make();
    await until(() => c.state === 'open', 5000, 'open');
  };

  it('a response with the wrong id is not taken for the batch: resent over HTTP (same id), settled once', async () => {
    await openClient();
    liar.onFrame = (env, reply) => {
      if (env.type !== 'SYN') return honest(env).forEach(reply);
      reply({ id: env.id, type: 'ACK' });
      reply({ id: 'someone-else:1', type: 'SYN', payload: [{ ok: 'lie' }] });
      reply({ id: `${env.id}x`, type: 'SYN', payload: [{ ok: 'lie' }] });
    };
    const res = await c.send({ n: 1 });
    expect(res).toEqual({ ok: { n: 1 } });
    const wsSyn = liar.received.filter((e) => e.type === 'SYN').at(-1)!;
    expect(liar.posted.map((e) => e.id)).toContain(wsSyn.id);
    expect(failures.map((f) => f.kind)).toContain('syn_timeout');
  });

  it('the wrong number of results rejects that batch with bad_response; the next batch goes through', async () => {
    await openClient();
    liar.onFrame = (env, reply) => {
      if (env.type !== 'SYN') return honest(env).forEach(reply);
      reply({ id: env.id, type: 'ACK' });
      reply({ id: env.id, type: 'SYN', payload: [] });
    };
    const a = c.send({ n: 1 }).catch((e: unknown) => e);
    const b = c.send({ n: 2 }).catch((e: unknown) => e);
    for (const e of await Promise.all([a, b])) {
      expect(e).toBeInstanceOf(SyncError);
      expect((e as SyncError).code).toBe('bad_response');
    }
    liar.onFrame = (env, reply) => honest(env).forEach(reply);
    expect(await c.send({ n: 3 })).toEqual({ ok: { n: 3 } });
    expect(c.state).toBe('open');
  });

  it('a response payload that is not an array is a bad frame; the batch is resent and settled', async () => {
    await openClient();
    liar.onFrame = (env, reply) => {
      if (env.type !== 'SYN') return honest(env).forEach(reply);
      reply({ id: env.id, type: 'ACK' });
      reply({ id: env.id, type: 'SYN', payload: { ok: true } });
    };
    expect(await c.send({ n: 1 })).toEqual({ ok: { n: 1 } });
    expect(failures.map((f) => f.kind)).toContain('bad_frame');
  });

  it('MSGs with a bad seq, no epoch, a bad channel, and frames that are not JSON: bad_frame each, nothing else delivered, still open', async () => {
    await openClient();
    await c.subscribe('news');
    const got: ChannelMessage[] = [];
    c.messages$.subscribe((m) => got.push(m));
    const base = { type: 'MSG', channel: 'news', epoch: 'e1', payload: { lie: true } };
    const lies: Array<[unknown, boolean?]> = [
      [{ ...base, id: 'm0', seq: 0 }],
      [{ ...base, id: 'm1', seq: -1 }],
      [{ ...base, id: 'm2', seq: 1.5 }],
      [{ ...base, id: 'm3', seq: '1' }],
      [{ ...base, id: 'm4', seq: 2 ** 53 }],
      [{ ...base, id: 'm5', seq: 1, epoch: undefined }],
      [{ ...base, id: 'm6', seq: 1, channel: 'a\u0000b' }],
      [{ ...base, id: 'm7', seq: 1, channel: '' }],
      ['{"type":"MSG",'],
      ['not json at all'],
      [''],
      [Buffer.from([0xff, 0x00, 0xfe]), true],
      [[{ ...base, id: 'm8', seq: 1 }]],
      [{ id: null, type: 'ACK' }],
      [{ id: null, type: 'NAK', error: { code: 'bad_request', message: 'x' } }],
      [{ id: 'z', type: 'WAT' }],
    ];
    for (const [frame, binary] of lies) liar.push(frame, binary);
    liar.push({ ...base, id: 'good', seq: 1, payload: { truth: true } });
    await until(() => got.length === 1, 5000, 'the honest MSG');
    expect(got).toEqual([
      { channel: 'news', seq: 1, epoch: 'e1', payload: { truth: true }, replay: false, echo: false },
    ]);
    expect(failures.filter((f) => f.kind === 'bad_frame')).toHaveLength(lies.length);
    expect(c.state).toBe('open');
    expect(await c.send({ n: 'still' })).toEqual({ ok: { n: 'still' } });
  });

  it('a response answered twice, and an unsolicited one, settle nothing twice', async () => {
    await openClient();
    liar.onFrame = (env, reply) => {
      const frames = honest(env);
      frames.forEach(reply);
      if (env.type === 'SYN') {
        reply(frames[1]);
        reply({ id: `${c.clientId}:999`, type: 'SYN', payload: [{ ok: 'unsolicited' }] });
      }
    };
    const results = await Promise.all([1, 2, 3].map(async (n) => c.send({ n })));
    expect(results).toEqual([1, 2, 3].map((n) => ({ ok: { n } })));
    expect(await c.send({ n: 4 })).toEqual({ ok: { n: 4 } });
  });

  it('over HTTP: a 200 that is not JSON, not an array, or lacks the response is retried; then settled once', async () => {
    liar.onFrame = () => {}; // a socket that never answers: traffic moves to HTTP
    make({ pollInterval: 60_000 });
    const script: Array<(env: { id: string }) => { status: number; body: string }> = [
      () => ({ status: 200, body: '<html>proxy error</html>' }),
      () => ({ status: 200, body: j({ ok: true }) }),
      (env) => ({ status: 200, body: j([{ id: env.id, type: 'ACK' }]) }),
      (env) => ({
        status: 200,
        body: j([
          { id: env.id, type: 'ACK' },
          { id: 'other', type: 'SYN', payload: [1] },
        ]),
      }),
    ];
    let n = 0;
    liar.onHttp = (env) =>
      n < script.length ? script[n++]!(env) : { status: 200, body: j(honest(env as never)) };
    const res = await c.send({ n: 'http' });
    expect(res).toEqual({ ok: { n: 'http' } });
    const synPosts = liar.posted.filter((e) => e.type === 'SYN');
    expect(new Set(synPosts.map((e) => e.id)).size).toBe(1);
    expect(synPosts.length).toBeGreaterThanOrEqual(script.length + 1);
    expect(failures.filter((f) => f.kind === 'http_error').length).toBeGreaterThanOrEqual(script.length);
  });

  it('an HTTP request that is never answered (a half-open connection) is given up after 2T and resent, same id', async () => {
    liar.onFrame = () => {}; // a socket that never answers: traffic moves to HTTP
    make({ pollInterval: 60_000 });
    let n = 0;
    liar.onHttp = (env) => (n++ === 0 ? 'hang' : { status: 200, body: j(honest(env as never)) });
    const res = await Promise.race([
      c.send({ n: 'hung' }),
      new Promise((resolve) => setTimeout(() => resolve('still pending after 5 s'), 5000)),
    ]);
    expect(res).toEqual({ ok: { n: 'hung' } });
    const ids = liar.posted.filter((e) => e.type === 'SYN').map((e) => e.id);
    expect(ids.length).toBeGreaterThanOrEqual(2);
    expect(new Set(ids).size).toBe(1);
  });

  it('a NAK with an unknown code is a server_error for that batch only', async () => {
    await openClient();
    liar.onFrame = (env, reply) => {
      if (env.type !== 'SYN') return honest(env).forEach(reply);
      reply({ id: env.id, type: 'ACK' });
      reply({ id: env.id, type: 'NAK', error: { code: 'teapot', message: 42 } });
    };
    const err = await c.send({ n: 1 }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(SyncError);
    expect((err as SyncError).code).toBe('server_error');
    liar.onFrame = (env, reply) => honest(env).forEach(reply);
    expect(await c.send({ n: 2 })).toEqual({ ok: { n: 2 } });
  });

  it('the process saw no uncaught error (a lying server crashes nothing)', async () => {
    await openClient();
    const seen = next(c.failures$, (f) => f.kind === 'bad_frame', 2000);
    liar.push('\u0000\u0000');
    await seen;
    expect(c.state).toBe('open');
  });
});
