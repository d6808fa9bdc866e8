/**
 * Deadlines (src/server/deadlines.ts): the one timer behind the first-frame deadline of every
 * WebSocket and the request-head deadline of every TCP connection. Real timers, short
 * deadlines; every wait is for the event, bounded.
 */
import { describe, expect, it } from 'vitest';
import { Deadlines } from '../src/server/deadlines.js';

function waitFor(cond: () => boolean, ms = 5_000): Promise<void> {
  const until = Date.now() + ms;
  return new Promise((resolve, reject) => {
    const tick = () => {
      if (cond()) resolve();
      else if (Date.now() > until) reject(new Error('timed out'));
      else setTimeout(tick, 5);
    };
    tick();
  });
}

describe('Deadlines', () => {
  it('expires keys in the order they were added, each no earlier than ms after it was added', async () => {
    const expired: Array<{ key: string; after: number }> = [];
    const added = new Map<string, number>();
    const d = new Deadlines<string>(40, (key) =>
      expired.push({ key, after: performance.now() - added.get(key)! }),
    );
    for (const key of ['a', 'b', 'c']) {
      added.set(key, performance.now());
      d.add(key);
      await new Promise((resolve) => setImmediate(resolve));
    }
    await waitFor(() => expired.length === 3);
    expect(expired.map((e) => e.key)).toEqual(['a', 'b', 'c']);
    for (const e of expired) expect(e.after).toBeGreaterThanOrEqual(40);
    expect(d.size).toBe(0);
  });

  it('a deleted key never expires; the others still do, and the timer stops when none is left', async () => {
    const expired: string[] = [];
    const d = new Deadlines<string>(30, (key) => expired.push(key));
    d.add('gone');
    d.add('kept');
    d.delete('gone');
    expect(d.has('gone')).toBe(false);
    expect(d.has('kept')).toBe(true);
    await waitFor(() => expired.length === 1);
    expect(expired).toEqual(['kept']);
    d.add('later');
    d.delete('later');
    expect(d.size).toBe(0);
    // A key added after the set emptied gets its own deadline again.
    d.add('again');
    await waitFor(() => expired.length === 2);
    expect(expired).toEqual(['kept', 'again']);
  });

  it('a key whose expiry throws does not stop the others from expiring', async () => {
    const expired: string[] = [];
    const d = new Deadlines<string>(20, (key) => {
      expired.push(key);
      if (key === 'bad') throw new Error('boom');
    });
    d.add('bad');
    d.add('good');
    await waitFor(() => expired.length === 2);
    expect(expired).toEqual(['bad', 'good']);
  });
});
