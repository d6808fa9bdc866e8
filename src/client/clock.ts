/**
 * The statechart's default clock: every named delay of the chart on ONE platform timer.
 *
 * The chart arms and cancels a delay on nearly every frame (the ACK deadline when a SYN goes
 * out, the response deadline at its ACK, the keepalive at its response), and nearly none of
 * them ever fires: each is cancelled long before T. With the platform's `setTimeout` that is a
 * timer inserted into and unlinked from the platform's timer list three times per round trip.
 * Here a delay is an entry in a Map; the one platform timer is armed for the earliest
 * deadline and only re-armed when a new deadline is earlier, or when it fires (then it runs
 * what is due, in deadline order, and re-arms for the earliest left). A cancelled deadline
 * leaves the platform timer alone (it wakes up once for nothing and re-arms), except that
 * when the last one is cancelled the timer is cleared at the end of the current job (a
 * microtask), unless a deadline was set again by then: so an idle or closed client holds no
 * timer, and the round trip that cancels one deadline and sets the next (the ACK deadline for
 * the keepalive, and back: every round trip at one in flight) neither clears nor arms the
 * platform timer (issue 14, session 6: two `clearTimeout` and two `setTimeout` per round trip
 * before).
 *
 * Same contract as XState's `Clock`: `setTimeout(fn, ms)` runs `fn` once, no earlier than
 * `ms` milliseconds later (measured on `now`, a monotonic clock); `clearTimeout(id)` stops it.
 */
import type { Clock } from './index.js';

/** What `LazyClock` runs on: the platform's timer and a monotonic clock in milliseconds. */
export interface ClockPlatform {
  setTimeout(fn: () => void, ms: number): unknown;
  clearTimeout(id: unknown): void;
  now(): number;
}

/** The platform's timer and clock: one object for every `LazyClock` made without one (it holds no state). */
let platform: ClockPlatform | undefined;
const defaultPlatform = (): ClockPlatform =>
  (platform ??= {
    setTimeout: (fn, ms) => globalThis.setTimeout(fn, ms),
    clearTimeout: (id) => globalThis.clearTimeout(id as ReturnType<typeof setTimeout>),
    now:
      typeof globalThis.performance?.now === 'function'
        ? () => globalThis.performance.now()
        : () => Date.now(),
  });

export class LazyClock implements Clock {
  private readonly due = new Map<number, { at: number; fn: () => void }>();
  private nextId = 1;
  private timer: unknown = null;
  /** Deadline the platform timer is armed for (+∞: none). */
  private timerAt = Number.POSITIVE_INFINITY;

  constructor(private readonly platform: ClockPlatform = defaultPlatform()) {}

  setTimeout(fn: (...args: any[]) => void, ms: number): number {
    const id = this.nextId++;
    const at = this.platform.now() + Math.max(0, Number.isFinite(ms) ? ms : 0);
    this.due.set(id, { at, fn });
    if (at < this.timerAt) this.arm(at);
    return id;
  }

  clearTimeout(id: unknown): void {
    if (!this.due.delete(id as number)) return;
    if (this.due.size === 0 && !this.checking) {
      this.checking = true;
      queueMicrotask(this.disarmIfEmpty);
    }
  }

  /** A `disarmIfEmpty` microtask is queued. */
  private checking = false;
  /** The last deadline was cancelled earlier in this job: clear the platform timer unless one was set since. */
  private readonly disarmIfEmpty = () => {
    this.checking = false;
    if (this.due.size === 0) this.disarm();
  };

  /** Deadlines waiting (for tests and the inspector). */
  get size(): number {
    return this.due.size;
  }

  private disarm() {
    if (this.timer !== null) this.platform.clearTimeout(this.timer);
    this.timer = null;
    this.timerAt = Number.POSITIVE_INFINITY;
  }

  private arm(at: number) {
    this.disarm();
    this.timerAt = at;
    this.timer = this.platform.setTimeout(this.fire, Math.max(0, at - this.platform.now()));
  }

  private readonly fire = () => {
    this.timer = null;
    this.timerAt = Number.POSITIVE_INFINITY;
    const now = this.platform.now();
    const ready: Array<[number, number]> = [];
    for (const [id, d] of this.due) if (d.at <= now) ready.push([id, d.at]);
    // Deadline order; equal deadlines in the order they were set.
    ready.sort((a, b) => a[1] - b[1] || a[0] - b[0]);
    for (const [id] of ready) {
      const d = this.due.get(id);
      // A callback that ran before may have cancelled this one.
      if (d && this.due.delete(id)) d.fn();
    }
    let min = Number.POSITIVE_INFINITY;
    for (const d of this.due.values()) if (d.at < min) min = d.at;
    if (min < this.timerAt) this.arm(min);
  };
}
