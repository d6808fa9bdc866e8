/**
 * Deadlines on one timer: what the server arms per connection (the first-frame deadline of a
 * WebSocket, the request-head deadline of a TCP connection) without a Node `Timeout`, a
 * closure and a `close` listener per connection.
 */

/**
 * Deadlines that all lie the same `ms` after they were set, on ONE timer for all (no timer
 * per socket: a Node `Timeout` and its closure were a good part of an idle connection's
 * memory). Entries are kept in insertion order, which is deadline order, so the timer is
 * armed for the first one only; `delete` is O(1). The clock is `performance.now()` (monotonic): a
 * wall clock set back does not reorder them.
 */
export class Deadlines<K> {
  private readonly at = new Map<K, number>();
  private timer: NodeJS.Timeout | undefined;

  constructor(
    private readonly ms: number,
    private readonly expire: (key: K) => void,
  ) {}

  /** Start `key`'s deadline, `ms` from now. */
  add(key: K): void {
    const due = performance.now() + this.ms;
    this.at.set(key, due);
    if (this.timer === undefined) this.arm(due);
  }

  /** Drop `key`'s deadline (met, or the socket ended). */
  delete(key: K): void {
    this.at.delete(key);
    if (this.at.size === 0) this.stop();
  }

  has(key: K): boolean {
    return this.at.has(key);
  }

  get size(): number {
    return this.at.size;
  }

  stop(): void {
    if (this.timer !== undefined) clearTimeout(this.timer);
    this.timer = undefined;
  }

  private arm(due: number): void {
    // +1: a timer may fire a fraction of a millisecond early against performance.now().
    this.timer = setTimeout(this.fire, Math.max(0, Math.ceil(due - performance.now())) + 1);
    this.timer.unref();
  }

  private readonly fire = (): void => {
    this.timer = undefined;
    const now = performance.now();
    for (const [key, due] of this.at) {
      if (due > now) {
        this.arm(due);
        return;
      }
      this.at.delete(key);
      try {
        this.expire(key);
      } catch {
        // The key's own failure (a socket already gone); the others still expire.
      }
    }
  };
}
