/**
 * The eviction policy of the dedupe memory under its caps (FIX14C), shared by the server's
 * in-process memory (server/dedupe.ts) and sqliteStore: take from the largest holder first
 * (the key a client's limits count under), oldest first within it, so that one principal's
 * flood evicts its own answers and a client with a few keeps them while anyone holds more.
 * redisStore does the same in Lua (redis.ts).
 */

/**
 * How far below a cap eviction goes once it is passed: a 64th of the cap (0 below 64, so a
 * small cap is kept exactly). The largest holders are found by a scan and sort of the
 * holders, so that is paid once per this many completions at a large cap, not per completion.
 */
export const evictionSlack = (cap: number): number => Math.floor(cap / 64);

/**
 * Take `need` (entries or bytes, as `size` measures them) from the largest holders first:
 * the holders are sorted by `size`, the level `L` found at which taking everything above it
 * from every holder above it frees `need`, each of those is taken from (`take`: its oldest
 * unit, returning what it freed, 0 when it has nothing left) until it is at `L`, and what is
 * still needed is taken one unit at a time from the holders at `L`, largest first. So no
 * holder loses anything while another holds more than it is left with. Exported for tests and the stores.
 */
export function shed<H>(
  holders: Iterable<H>,
  size: (h: H) => number,
  need: number,
  take: (h: H) => number,
): void {
  const list = [...holders].sort((a, b) => size(b) - size(a));
  if (list.length === 0 || need <= 0) return;
  let sum = 0;
  let level = 0;
  let i = 0;
  for (; i < list.length; i++) {
    sum += size(list[i]!);
    const below = i + 1 < list.length ? size(list[i + 1]!) : 0;
    if (sum - (i + 1) * below >= need) {
      level = Math.max(below, Math.ceil((sum - need) / (i + 1)));
      break;
    }
  }
  const top = Math.min(i + 1, list.length);
  /** Holders with nothing left to take (`take` freed 0): skipped from then on. */
  const spent = new Set<H>();
  let left = need;
  for (let k = 0; k < top && left > 0; k++) {
    const h = list[k]!;
    while (size(h) > level && left > 0) {
      const freed = take(h);
      if (freed <= 0) {
        spent.add(h);
        break;
      }
      left -= freed;
    }
  }
  // The rest, one unit at a time from the largest holders that still have some (a round per
  // pass over those at the top).
  while (left > 0) {
    let max = -1;
    for (const h of list) if (!spent.has(h)) max = Math.max(max, size(h));
    if (max < 0) break;
    for (const h of list) {
      if (left <= 0) break;
      if (spent.has(h) || size(h) < max) continue;
      const freed = take(h);
      if (freed > 0) left -= freed;
      else spent.add(h);
    }
  }
}
