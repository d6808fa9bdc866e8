/**
 * The client against a real reference server over real sockets on 127.0.0.1, with a real
 * fault-injecting proxy in between. One test per delivery rule (PROTOCOL.md §3) and timing
 * rule (§4); in each, every send settles exactly once with its own result and the server
 * applies each operation exactly once. T = 200 ms.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { type Failure, SyncError } from '../src/client/index.js';
import { appliedOnce, next, type Rig, reach, rig, T, until } from './helpers/harness.js';

let r: Rig;
afterEach(async () => {
  await r?.close();
});

const ops = (prefix: string, n: number) => Array.from({ length: n }, (_, i) => ({ id: `${prefix}${i}` }));

describe('delivery (§3)', () => {
  it('acknowledges a SYN before answering it, and resolves each send with its own result', async () => {
    r = await rig();
    const c = r.client();
    await reach(c, 'open');
    const res = await c.send({ id: 'a' });
    expect(res).toEqual({ id: 'a', successes: ['a'] });
    const syn = r.proxy.traffic.find((t) => t.dir === 'up' && t.frame.type === 'SYN')!;
    const replies = r.proxy.traffic.filter((t) => t.dir === 'down' && t.frame.id === syn.frame.id);
    expect(replies.map((t) => t.frame.type)).toEqual(['ACK', 'SYN']);
    appliedOnce(r.ledger, ['a']);
  });

  it('keeps one batch in flight; operations queued meanwhile travel together', async () => {
    r = await rig();
    const c = r.client();
    await reach(c, 'open');
    let open!: () => void;
    r.ledger.gate = new Promise((res) => (open = res));
    const first = c.send({ id: 'q0' });
    await r.proxy.waitFor((t) => t.dir === 'up' && t.frame.type === 'SYN');
    const rest = ops('q', 10)
      .slice(1)
      .map((o) => c.send(o));
    // While the first is unanswered, nothing else goes on the wire.
    await r.proxy.waitFor((t) => t.dir === 'down' && t.frame.type === 'ACK');
    expect(r.proxy.traffic.filter((t) => t.dir === 'up' && t.frame.type === 'SYN')).toHaveLength(1);
    r.ledger.gate = null;
    open();
    const results = await Promise.all([first, ...rest]);
    expect(results.map((x) => (x as { id: string }).id)).toEqual(ops('q', 10).map((o) => o.id));
    expect(r.ledger.batches).toEqual([
      ['q0'],
      ops('q', 10)
        .slice(1)
        .map((o) => o.id),
    ]);
    // Each SYN went up only after the previous one's response came down.
    const wire = r.proxy.traffic.filter(
      (t) => t.via === 'ws' && (t.frame.type === 'SYN' || t.frame.type === 'NAK'),
    );
    for (let i = 0; i + 1 < wire.length; i += 2) {
      expect(wire[i]!.dir).toBe('up');
      expect(wire[i + 1]!.dir).toBe('down');
      expect(wire[i + 1]!.frame.id).toBe(wire[i]!.frame.id);
    }
  });

  it('splits a long queue into batches of maxBatch, in order', async () => {
    r = await rig();
    const c = r.client({ maxBatch: 4 });
    const all = ops('b', 10);
    const results = await Promise.all(all.map((o) => c.send(o)));
    expect(results).toHaveLength(10);
    expect(r.ledger.batches.flat()).toEqual(all.map((o) => o.id));
    expect(Math.max(...r.ledger.batches.map((b) => b.length))).toBeLessThanOrEqual(4);
    appliedOnce(
      r.ledger,
      all.map((o) => o.id),
    );
  });

  it('order: operations are applied in the order they were sent, across transports', async () => {
    r = await rig();
    const c = r.client({ maxBatch: 3 });
    await reach(c, 'open');
    const sent = ops('o', 12);
    const ps = sent.slice(0, 6).map((o) => c.send(o));
    await r.proxy.waitFor((t) => t.dir === 'up' && t.frame.type === 'SYN');
    r.proxy.kill(); // the rest go over HTTP, the batch in flight is resent first
    ps.push(...sent.slice(6).map((o) => c.send(o)));
    await Promise.all(ps);
    expect(r.ledger.batches.flat()).toEqual(sent.map((o) => o.id));
  });

  it('a NAK fails only the operations of that batch; the next batch goes through', async () => {
    r = await rig({
      onSync: async (batch) => {
        if (batch.some((o) => (o as { bad?: boolean }).bad)) throw new Error('refused');
        return batch.map(() => ({ ok: true }));
      },
    });
    const c = r.client();
    await reach(c, 'open');
    const bad = c.send({ id: 'x', bad: true });
    await expect(bad).rejects.toMatchObject({ name: 'SyncError', code: 'server_error' });
    await expect(c.send({ id: 'y' })).resolves.toEqual({ ok: true });
  });

  it('onSync returning the wrong number of results rejects the batch with a typed SyncError', async () => {
    r = await rig({ onSync: async () => [] as unknown[] });
    const c = r.client();
    // The reference server refuses misaligned results itself (server_error); both are typed.
    const err = await c.send({ id: 'l' }).catch((e) => e);
    expect(err).toBeInstanceOf(SyncError);
    expect(['bad_response', 'server_error']).toContain((err as SyncError).code);
  });
});

describe('keepalive (§4)', () => {
  it('pings T after the last ACK while idle, and stays open', async () => {
    r = await rig();
    const c = r.client();
    await reach(c, 'open');
    await c.send({ id: 'k' });
    const ack = r.proxy.traffic.filter((t) => t.dir === 'down' && t.frame.type === 'SYN').at(-1)!;
    const t0 = Date.now();
    const png = await r.proxy.waitFor((t) => t.dir === 'up' && t.frame.type === 'PNG', 5 * T, 'PNG');
    const gap = Date.now() - t0;
    expect(ack).toBeDefined();
    expect(gap).toBeGreaterThanOrEqual(T * 0.8);
    await r.proxy.waitFor((t) => t.dir === 'down' && t.frame.type === 'ACK' && t.frame.id === png.frame.id);
    // A second ping follows the first one's ACK: the timer restarted on it.
    await r.proxy.waitFor(
      (t) => t.dir === 'up' && t.frame.type === 'PNG' && t.frame.id !== png.frame.id,
      5 * T,
      'second PNG',
    );
    expect(c.state).toBe('open');
  });

  it('a ping not acknowledged within T moves traffic to HTTP (a server that stops answering pings)', async () => {
    r = await rig();
    const c = r.client();
    await reach(c, 'open');
    r.proxy.filter = (dir, f) =>
      dir === 'down' && f.type === 'ACK' && !f.id?.includes('stale') ? 'drop' : 'pass';
    const failure = await next(c.failures$, (f) => f.kind === 'ping_timeout', 5 * T);
    expect(failure.state).toBe('open');
    await reach(c, 'degraded');
    const res = await c.send({ id: 'h1' });
    expect(res).toEqual({ id: 'h1', successes: ['h1'] });
    expect(r.proxy.traffic.some((t) => t.via === 'http' && t.frame.type === 'SYN')).toBe(true);
    appliedOnce(r.ledger, ['h1']);
  });

  it('re-pings on each send while degraded, three unacknowledged pings in all, then redials', async () => {
    r = await rig();
    const c = r.client({ pollInterval: 60_000 });
    await reach(c, 'open');
    r.proxy.filter = (dir, f) => (dir === 'down' && f.type === 'ACK' ? 'drop' : 'pass');
    await reach(c, 'degraded', 5 * T); // first ping missed
    const connsBefore = r.proxy.connections;
    // Each send re-pings (while under three misses); HTTP carries the operations.
    for (const id of ['r1', 'r2']) {
      const pings = r.proxy.traffic.filter((t) => t.dir === 'up' && t.frame.type === 'PNG').length;
      const p = c.send({ id });
      await r.proxy.waitFor(
        (t) =>
          t.dir === 'up' &&
          t.frame.type === 'PNG' &&
          r.proxy.traffic.filter((x) => x.dir === 'up' && x.frame.type === 'PNG').length > pings,
        5 * T,
        're-ping',
      );
      await p;
      await next(c.failures$, (f) => f.kind === 'ping_timeout', 5 * T);
    }
    // Third miss: the socket is closed and a new one dialled (with backoff).
    r.proxy.filter = () => 'pass';
    await until(() => r.proxy.connections > connsBefore, 20 * T, 'redial');
    await reach(c, 'open', 20 * T);
    const pngs = r.proxy.traffic.filter((t) => t.dir === 'up' && t.frame.type === 'PNG' && t.conn === 1);
    expect(pngs).toHaveLength(3);
    appliedOnce(r.ledger, ['r1', 'r2']);
  });

  it('an acknowledged re-ping moves traffic back to the socket', async () => {
    r = await rig();
    const c = r.client({ pollInterval: 60_000 });
    await reach(c, 'open');
    r.proxy.filter = (dir, f) => (dir === 'down' && f.type === 'ACK' ? 'drop' : 'pass');
    await reach(c, 'degraded', 5 * T);
    r.proxy.filter = () => 'pass';
    const back = reach(c, 'open', 10 * T);
    await c.send({ id: 'b1' }); // goes over HTTP and re-pings the socket
    await back;
    const before = r.proxy.traffic.length;
    await c.send({ id: 'b2' });
    const after = r.proxy.traffic.slice(before);
    expect(after.some((t) => t.via === 'ws' && t.frame.type === 'SYN')).toBe(true);
    expect(after.some((t) => t.via === 'http')).toBe(false);
    appliedOnce(r.ledger, ['b1', 'b2']);
  });
});

describe('fallback (§4)', () => {
  it('a server that never ACKs: the SYN is resent over HTTP with the same id, applied once', async () => {
    r = await rig();
    const c = r.client();
    await reach(c, 'open');
    r.proxy.filter = (dir) => (dir === 'down' ? 'drop' : 'pass');
    const res = await c.send({ id: 'n1' });
    expect(res).toEqual({ id: 'n1', successes: ['n1'] });
    const wsSyn = r.proxy.traffic.find((t) => t.via === 'ws' && t.frame.type === 'SYN')!;
    const httpSyn = r.proxy.traffic.find((t) => t.via === 'http' && t.frame.type === 'SYN')!;
    expect(httpSyn.frame.id).toBe(wsSyn.frame.id);
    appliedOnce(r.ledger, ['n1']);
  });

  it('a server that ACKs and never answers: resent over HTTP T after the ACK, same id, applied once', async () => {
    r = await rig();
    const c = r.client();
    await reach(c, 'open');
    r.proxy.filter = (dir, f) => (dir === 'down' && f.type === 'SYN' ? 'drop' : 'pass');
    const failure = next(c.failures$, (f) => f.kind === 'syn_timeout', 10 * T);
    const p = c.send({ id: 's1' });
    await r.proxy.waitFor((t) => t.dir === 'down' && t.frame.type === 'ACK');
    const acked = Date.now();
    const resent = r.proxy.waitFor((t) => t.via === 'http' && t.frame.type === 'SYN', 10 * T);
    expect(await p).toEqual({ id: 's1', successes: ['s1'] });
    expect((await failure).state).toBe('awaitingSyn');
    await resent;
    const httpAt = r.proxy.traffic.findIndex((t) => t.via === 'http');
    expect(httpAt).toBeGreaterThan(0);
    expect(Date.now() - acked).toBeGreaterThanOrEqual(T * 0.8);
    const ids = r.proxy.traffic
      .filter((t) => t.dir === 'up' && t.frame.type === 'SYN')
      .map((t) => t.frame.id);
    expect(new Set(ids).size).toBe(1);
    appliedOnce(r.ledger, ['s1']);
  });

  it('a slow server (processing past 2T): the HTTP copy is answered once processing ends, applied once', async () => {
    r = await rig();
    const c = r.client();
    await reach(c, 'open');
    let open!: () => void;
    r.ledger.gate = new Promise((res) => (open = res));
    const p = c.send({ id: 'slow' });
    await next(c.failures$, (f) => f.kind === 'syn_timeout', 10 * T);
    await r.proxy.waitFor((t) => t.via === 'http' && t.frame.type === 'SYN', 5 * T);
    open();
    expect(await p).toEqual({ id: 'slow', successes: ['slow'] });
    appliedOnce(r.ledger, ['slow']);
  });

  it('a socket killed mid-batch: the batch is resent over HTTP at once, same id, applied once', async () => {
    r = await rig();
    const c = r.client();
    await reach(c, 'open');
    let open!: () => void;
    r.ledger.gate = new Promise((res) => (open = res));
    const ps = ops('m', 5).map((o) => c.send(o));
    await r.proxy.waitFor((t) => t.dir === 'up' && t.frame.type === 'SYN');
    const closed = next(c.failures$, (f) => f.kind === 'close');
    r.proxy.kill();
    await closed;
    expect(c.state).toBe('degraded');
    r.ledger.gate = null;
    open();
    const results = await Promise.all(ps);
    expect(results.map((x) => (x as { id: string }).id)).toEqual(ops('m', 5).map((o) => o.id));
    appliedOnce(
      r.ledger,
      ops('m', 5).map((o) => o.id),
    );
    await reach(c, 'open', 20 * T); // and the socket comes back
  });

  it('HTTP answering 503 with Retry-After, then 200: retried after the delay, applied once', async () => {
    r = await rig();
    const c = r.client({ pollInterval: 60_000 });
    await reach(c, 'open');
    r.proxy.refuse = true;
    r.proxy.kill();
    await reach(c, 'degraded');
    r.proxy.httpScript.push({ status: 503, headers: { 'retry-after': '1' } });
    const t0 = Date.now();
    const failure = next(c.failures$, (f) => f.kind === 'http_error' && f.code === 503);
    const res = await c.send({ id: 'h503' });
    expect(res).toEqual({ id: 'h503', successes: ['h503'] });
    expect((await failure).code).toBe(503);
    expect(Date.now() - t0).toBeGreaterThanOrEqual(900);
    appliedOnce(r.ledger, ['h503']);
  });

  it('HTTP network errors and 5xx are retried with backoff; nothing lost', async () => {
    r = await rig();
    const c = r.client({ pollInterval: 60_000 });
    r.proxy.refuse = true;
    await reach(c, 'degraded', 5 * T);
    r.proxy.httpScript.push('network', { status: 500 }, { status: 502 }, 'network');
    const res = await c.send({ id: 'net' });
    expect(res).toEqual({ id: 'net', successes: ['net'] });
    appliedOnce(r.ledger, ['net']);
  });

  it('a dial that fails goes to HTTP; the socket is redialled with backoff and traffic returns to it', async () => {
    r = await rig();
    r.proxy.refuse = true;
    const c = r.client();
    const fail = await next(c.failures$, (f) => f.kind === 'dial_error' || f.kind === 'close', 5 * T);
    expect(fail.state).toBe('connecting');
    await reach(c, 'degraded');
    expect(await c.send({ id: 'd1' })).toEqual({ id: 'd1', successes: ['d1'] });
    r.proxy.refuse = false;
    await reach(c, 'open', 30 * T);
    expect(await c.send({ id: 'd2' })).toEqual({ id: 'd2', successes: ['d2'] });
    appliedOnce(r.ledger, ['d1', 'd2']);
  });
});

describe('outbox', () => {
  it('rejects with queue_full beyond maxQueue, and nothing else is lost', async () => {
    r = await rig();
    r.proxy.refuse = true;
    const c = r.client({ maxQueue: 3, pollInterval: 60_000 });
    r.proxy.httpScript.push('network', 'network', 'network');
    const ps = ops('f', 4).map((o) =>
      c.send(o).then(
        (v) => ({ ok: v }),
        (e) => ({ err: e }),
      ),
    );
    const out = await Promise.all(ps);
    expect(out[3]).toMatchObject({ err: { code: 'queue_full' } });
    expect(out.slice(0, 3).every((x) => 'ok' in x)).toBe(true);
    appliedOnce(r.ledger, ['f0', 'f1', 'f2']);
    expect(r.ledger.applied.has('f3')).toBe(false);
  });

  it('close() rejects what is pending with `closed`, exactly once each', async () => {
    r = await rig();
    r.proxy.refuse = true;
    const c = r.client({ pollInterval: 60_000 });
    r.proxy.httpScript.push(...Array(20).fill('network'));
    const ps = ops('z', 3).map((o) => c.send(o).catch((e) => e));
    await c.close();
    for (const e of await Promise.all(ps)) expect(e).toMatchObject({ name: 'SyncError', code: 'closed' });
    await expect(c.send({ id: 'after' })).rejects.toMatchObject({ code: 'closed' });
  });

  it('send$ and the listener API: results feed successes$ and on("successes")', async () => {
    r = await rig();
    const c = r.client();
    const seen: unknown[] = [];
    const off = c.on('successes', (list) => seen.push(...list));
    const got = next(c.successes$, (l) => l.includes('s$2'));
    c.send$.next({ id: 's$1' });
    c.send$.next({ id: 's$2' });
    await got;
    expect(seen).toEqual(['s$1', 's$2']);
    off();
    appliedOnce(r.ledger, ['s$1', 's$2']);
  });
});

describe('telemetry', () => {
  it('reports one failure per socket failure, with its kind, to failures$ and onFailure', async () => {
    r = await rig();
    const hook: Failure[] = [];
    const c = r.client({ onFailure: (f) => hook.push(f) });
    const seen: Failure[] = [];
    c.failures$.subscribe((f) => seen.push(f));
    await reach(c, 'open');
    r.proxy.kill();
    await next(c.failures$, (f) => f.kind === 'close');
    await reach(c, 'open', 30 * T);
    // ACK timeout (nothing comes down; a response alone would have settled it without ACK)
    r.proxy.filter = (dir) => (dir === 'down' ? 'drop' : 'pass');
    await c.send({ id: 't1' });
    r.proxy.filter = () => 'pass';
    const socketKinds = seen.filter((f) => f.kind !== 'http_error').map((f) => f.kind);
    expect(socketKinds.filter((k) => k === 'close')).toHaveLength(1);
    expect(socketKinds.filter((k) => k === 'ack_timeout')).toHaveLength(1);
    expect(seen.find((f) => f.kind === 'close')).toMatchObject({ state: 'open', code: expect.any(Number) });
    expect(hook).toEqual(seen);
    for (const f of seen) expect(typeof f.at).toBe('number');
  });

  it('state$ emits only the documented names', async () => {
    const { STATE_NAMES } = await import('../src/client/index.js');
    r = await rig();
    const c = r.client();
    const names: string[] = [];
    c.state$.subscribe((s) => names.push(s));
    await reach(c, 'open');
    await c.send({ id: 'n' });
    r.proxy.kill();
    await reach(c, 'degraded');
    await reach(c, 'open', 30 * T);
    await c.close();
    for (const n of names) expect(STATE_NAMES).toContain(n);
    expect(names[0]).toBe('connecting');
    expect(names.at(-1)).toBe('closed');
  });
});
