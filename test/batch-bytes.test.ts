/**
 * FIX14D F3: the client cuts its `SYN`s by bytes as well as by `maxBatch` (`maxBatchBytes`,
 * default 256 KiB of operations' JSON), so operations that each fit the server's
 * `maxPayloadBytes` (1 MiB) are never refused together in one oversized frame; an operation
 * alone over the server's limit gets `too_large` alone. Real server (through the loopback proxy).
 */
import { afterEach, describe, expect, it } from 'vitest';
import { SyncError } from '../src/client/index.js';
import { appliedOnce, type Rig, rig } from './helpers/harness.js';

let r: Rig | undefined;
afterEach(async () => {
  await r?.close();
  r = undefined;
});

const big = (id: string, bytes: number) => ({ id, pad: 'x'.repeat(bytes) });
/** Each promise's outcome: 'ok' or the SyncError's code. */
const outcomes = (ps: Promise<unknown>[]) =>
  Promise.all(
    ps.map((p) =>
      p.then(
        () => 'ok',
        (e: unknown) => (e instanceof SyncError ? e.code : String(e)),
      ),
    ),
  );

describe('batches bounded in bytes', () => {
  it('4 operations of 300,000 bytes sent in one tick are all applied, one per SYN (the default budget)', async () => {
    r = await rig();
    const c = r.client();
    await c.loaded;
    const ids = ['b0', 'b1', 'b2', 'b3'];
    expect(await outcomes(ids.map((id) => c.send(big(id, 300_000))))).toEqual(['ok', 'ok', 'ok', 'ok']);
    appliedOnce(r.ledger, ids);
    expect(r.ledger.batches).toEqual(ids.map((id) => [id]));
    await c.close();
  }, 30_000);

  it('small operations share a SYN up to maxBatchBytes, and the run is cut before the one that would pass it', async () => {
    r = await rig();
    const c = r.client({ maxBatchBytes: 2_500 });
    await c.loaded;
    // Each operation's JSON is 1,016 characters: two fit 2,500, a third would not.
    const ids = ['s0', 's1', 's2', 's3', 's4'];
    expect(await outcomes(ids.map((id) => c.send(big(id, 990))))).toEqual(ids.map(() => 'ok'));
    appliedOnce(r.ledger, ids);
    // The first SYN may leave alone (sent before the rest were queued); every later one holds ≤ 2.
    expect(r.ledger.batches.flat()).toEqual(ids);
    expect(r.ledger.batches.every((b) => b.length <= 2)).toBe(true);
    expect(r.ledger.batches.some((b) => b.length === 2)).toBe(true);
    await c.close();
  }, 30_000);

  it('a 2 MB operation among six of 300 KB: it alone is refused `too_large` (final: dropped), the six are applied', async () => {
    r = await rig();
    const c = r.client();
    await c.loaded;
    const ids = ['m0', 'm1', 'm2', 'HUGE', 'm3', 'm4', 'm5'];
    const got = await outcomes(ids.map((id) => c.send(big(id, id === 'HUGE' ? 2_000_000 : 300_000))));
    expect(got).toEqual(ids.map((id) => (id === 'HUGE' ? 'too_large' : 'ok')));
    appliedOnce(
      r.ledger,
      ids.filter((id) => id !== 'HUGE'),
    );
    expect(r.ledger.applied.has('HUGE')).toBe(false);
    // The socket was never closed for an oversized frame: the client is still open and sends.
    expect(await outcomes([c.send({ id: 'after' })])).toEqual(['ok']);
    await c.close();
  }, 30_000);

  it('maxBatchBytes is validated like the other options', async () => {
    r = await rig();
    expect(() => r!.client({ maxBatchBytes: 0 })).toThrow(RangeError);
    expect(() => r!.client({ maxBatchBytes: 1.5 })).toThrow(RangeError);
  });
});
