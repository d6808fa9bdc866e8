/**
 * The server-wide scheduler of channel look-ups (issue 12). Every channel a `SUB` names, on a
 * socket or in an HTTP poll, costs the store a look-up (its head, often a read) and the event
 * loop the time of it. Before, each `SUB` gave the event loop a turn every 32 channels on its
 * own, so N principals' concurrent `SUB`s each took their 32 per turn and an honest client's
 * frame waited behind N slices (2–8 principals polling 1 000 new channels slowed another
 * client 23–56 × on SQLite).
 *
 * Now every `SUB` and poll asks this one scheduler for its look-ups, a slice at a time:
 * - at most `slice` look-ups are granted per event-loop turn, all principals together, and
 *   the next grant waits for the next turn (`setImmediate`), so other sockets' I/O runs in
 *   between whatever the number of principals;
 * - grants go round-robin across keys (the key the per-principal limits count under:
 *   `Peer.limitKey`, `p:<principalKey>` or the anonymous client's address or clientId): a
 *   key with work waiting is served once per round, whatever how many `SUB`s it has queued,
 *   so an honest `SUB` of one channel waits at most one round; a request gets at most
 *   `max(1, floor(slice / keys waiting))` look-ups a turn, so a round of K keys takes at most
 *   `ceil(K / slice)` turns (FIX3);
 * - the grants of all keys together stay under `rate` look-ups per second (a token bucket,
 *   burst one second); past it, work waits its turn;
 * - the work waiting is bounded: `admit` refuses (the caller answers `NAK rate_limited`) a
 *   `SUB` that would take the look-ups admitted and not granted, server-wide, past
 *   `maxBacklog`, unless it is small (at most `smallJob` look-ups) and its key has nothing
 *   waiting: so a principal that `SUB`s a few channels rarely is not refused by the others'
 *   backlog. Past `hardBacklog` everybody is refused, small or not (issue 12, FIX1: 1 000
 *   addresses each with nothing waiting were all admitted, 897 001 look-ups waited, the heap
 *   reached 503 MiB and the process aborted). The backlog therefore never passes
 *   `hardBacklog`. The never-refused `background` jobs that free records are counted apart
 *   (`freeing`), share their key's turns and refuse nobody (FIX3).
 * - a job whose requester left (`gone()`: its socket closed, its HTTP request aborted) is
 *   granted nothing more: its waiting `turn` resolves with 0 at once (swept at least every
 *   `GONE_SWEEP_MS`), and its backlog is given back when it calls `done` (FIX1: the look-ups
 *   of 700 attackers' SUBs went on ~2 minutes after they all closed).
 */

/** Most milliseconds between two sweeps of the queues for jobs whose requester left. */
const GONE_SWEEP_MS = 50;

/**
 * Thrown where a job's `turn` granted nothing because its requester left: the `SUB` or poll
 * stops there (nothing to answer, nothing to report).
 */
export class RequesterGone extends Error {
  constructor() {
    super('the requester left');
    this.name = 'RequesterGone';
  }
}

/** Options of `LookupScheduler`. */
export interface LookupSchedulerOptions {
  /** Look-ups granted per event-loop turn, all keys together (≥ 1). */
  slice: number;
  /** Look-ups granted per second, all keys together; `Infinity` for no rate. */
  rate: number;
  /**
   * Look-ups admitted and not yet granted, all keys together, past which a job is refused
   * (`admit` returns `undefined`) unless it is small (≤ `smallJob`) and its key has nothing
   * waiting.
   */
  maxBacklog: number;
  /**
   * Look-ups admitted and not yet granted, all keys together, past which every job is
   * refused. @default `2 × maxBacklog`
   */
  hardBacklog?: number;
  /** Most look-ups of a job exempt from `maxBacklog` when its key has nothing waiting. @default 0 */
  smallJob?: number;
  /** Clock in milliseconds (tests). @default performance.now */
  now?: () => number;
}

interface Waiter {
  job: LookupJob;
  want: number;
  resolve: (granted: number) => void;
}

/**
 * The look-ups of one `SUB` or poll: ask for each slice with `turn`, and call `done` when
 * finished (or failed), which gives back what was admitted and not used.
 */
export class LookupJob {
  /** Admitted look-ups not granted yet (what this job adds to the backlog). */
  remaining: number;
  private finished = false;

  constructor(
    readonly key: string,
    admitted: number,
    private readonly owner: LookupScheduler,
    /** Whether the requester left (socket closed, request aborted): then nothing more is granted. */
    readonly gone: () => boolean = () => false,
    /**
     * Freeing records (`LookupScheduler.background`): counted apart from the admitted backlog,
     * so it neither refuses `SUB`s nor takes a key's small-`SUB` exemption (FIX3).
     */
    readonly background = false,
  ) {
    this.remaining = admitted;
  }

  /**
   * Wait for this job's turn to make up to `want` look-ups; resolves with how many it may make
   * now (1 ≤ n ≤ want, at most the scheduler's slice), or 0 once the requester is `gone`
   * (stop then, and call `done`). Do them before the next `turn`.
   */
  turn(want: number): Promise<number> {
    return this.owner.enqueue(this, Math.max(1, Math.floor(want)));
  }

  /** Give back what was admitted and not granted. Idempotent. */
  done(): void {
    if (this.finished) return;
    this.finished = true;
    this.owner.settle(this, this.remaining);
    this.remaining = 0;
  }
}

/** See the module's comment. One per server. */
export class LookupScheduler {
  readonly slice: number;
  readonly rate: number;
  readonly maxBacklog: number;
  readonly hardBacklog: number;
  readonly smallJob: number;
  private lastSweep = Number.NEGATIVE_INFINITY;
  /** Keys with work waiting, in round-robin order (a served key goes to the end). */
  private readonly queues = new Map<string, Waiter[]>();
  /** Admitted and not granted look-ups, by key and in all. */
  private readonly backlogOf = new Map<string, number>();
  private backlogTotal = 0;
  /** Look-ups of `background` jobs (freeing records) not yet granted, all keys together. */
  private freeingTotal = 0;
  private tokens: number;
  private last: number;
  private scheduled = false;
  private timer: ReturnType<typeof setTimeout> | undefined;
  private closed = false;
  private readonly now: () => number;
  /** Look-ups granted so far (stats and tests). */
  granted = 0;
  /** `SUB`s refused by `admit` so far. */
  refused = 0;

  constructor(opts: LookupSchedulerOptions) {
    this.slice = Math.max(1, Math.floor(opts.slice));
    this.rate = opts.rate;
    this.maxBacklog = opts.maxBacklog;
    this.hardBacklog = Math.max(opts.maxBacklog, opts.hardBacklog ?? 2 * opts.maxBacklog);
    this.smallJob = opts.smallJob ?? 0;
    this.now = opts.now ?? (() => performance.now());
    this.tokens = Number.isFinite(this.rate) ? this.rate : 0;
    this.last = this.now();
  }

  /**
   * Look-ups admitted and not yet granted, all keys together: what `admit` bounds by
   * `maxBacklog` and `hardBacklog`. The freeing of records (`background`) is not in it.
   */
  get backlog(): number {
    return this.backlogTotal;
  }

  /** Look-ups of `background` jobs (freeing records of channels left) not yet granted. */
  get freeing(): number {
    return this.freeingTotal;
  }

  /** Look-ups admitted for `key` and not yet granted. */
  backlogFor(key: string): number {
    return this.backlogOf.get(key) ?? 0;
  }

  /** Keys with a slice request waiting. */
  get waitingKeys(): number {
    return this.queues.size;
  }

  /**
   * Admit a `SUB` or poll of `n` look-ups for `key`: its job, or `undefined` (then answer
   * `NAK rate_limited`; nothing was charged) when the backlog would pass `hardBacklog`, or
   * `maxBacklog` unless the job is small (`n ≤ smallJob`) and `key` has nothing waiting.
   * `gone` tells whether the requester left (see `LookupJob.turn`).
   */
  admit(key: string, n: number, gone?: () => boolean): LookupJob | undefined {
    const mine = this.backlogOf.get(key) ?? 0;
    const after = this.backlogTotal + n;
    const exempt = mine === 0 && n <= this.smallJob;
    if (after > this.hardBacklog || (after > this.maxBacklog && !exempt)) {
      this.refused++;
      return undefined;
    }
    this.backlogOf.set(key, mine + n);
    this.backlogTotal += n;
    return new LookupJob(key, n, this, gone);
  }

  /**
   * A job that is never refused (freeing records: work that must happen), queued under `key`
   * like the others (so it takes that key's share of the turns, no more), and counted in
   * `freeing`, not in `backlog`: it neither refuses others' `SUB`s nor `key`'s small ones
   * (FIX3: 89 principals leaving 1 000 channels each at once took the backlog to 88 040,
   * 4.4 × the hard bound, and an honest `SUB` of one channel was refused 13 times in 42).
   * Bounded by the records there are to free (`maxChannels`).
   */
  background(key: string, n: number): LookupJob {
    this.freeingTotal += n;
    return new LookupJob(key, n, this, undefined, true);
  }

  /** Stop granting: every waiting `turn` resolves at once (the server is closing). */
  close(): void {
    this.closed = true;
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
    for (const q of this.queues.values()) for (const w of q) w.resolve(w.want);
    this.queues.clear();
  }

  /** @internal `LookupJob.turn`. */
  enqueue(job: LookupJob, want: number): Promise<number> {
    if (this.closed) return Promise.resolve(want);
    if (job.gone()) return Promise.resolve(0);
    return new Promise<number>((resolve) => {
      const q = this.queues.get(job.key);
      const w: Waiter = { job, want, resolve };
      if (q) q.push(w);
      else this.queues.set(job.key, [w]);
      this.schedule();
    });
  }

  /** @internal Take `n` admitted look-ups of `job` off the backlog (granted or given back). */
  settle(job: LookupJob, n: number): void {
    if (n <= 0) return;
    if (job.background) {
      this.freeingTotal = Math.max(0, this.freeingTotal - n);
      return;
    }
    const left = (this.backlogOf.get(job.key) ?? 0) - n;
    if (left > 0) this.backlogOf.set(job.key, left);
    else this.backlogOf.delete(job.key);
    this.backlogTotal = Math.max(0, this.backlogTotal - n);
  }

  private schedule(): void {
    if (this.scheduled || this.timer || this.queues.size === 0) return;
    this.scheduled = true;
    setImmediate(() => {
      this.scheduled = false;
      this.grant();
    });
  }

  /**
   * One event-loop turn's grants: at most `slice` look-ups, one request per key per round, and
   * at most `max(1, floor(slice / keys waiting))` look-ups to a request, so that a turn serves
   * `min(keys, slice)` keys and a key waits at most `ceil(keys / slice)` turns for its slice
   * (FIX3: with a whole slice to one request, 100 principals' loops of 100-channel `SUB`s made
   * a round 100 turns long, and with turns of ~30 ms of other I/O an honest `SUB` of one
   * channel waited 1–6 s).
   */
  private grant(): void {
    if (this.closed) return;
    const limited = Number.isFinite(this.rate);
    if (limited) {
      const t = this.now();
      this.tokens = Math.min(this.rate, this.tokens + ((t - this.last) * this.rate) / 1000);
      this.last = t;
    }
    this.sweep();
    let room = this.slice;
    const quantum = Math.max(1, Math.floor(this.slice / Math.max(1, this.queues.size)));
    while (room > 0 && this.queues.size > 0) {
      const [key, q] = this.queues.entries().next().value as [string, Waiter[]];
      const w = q[0]!;
      if (w.job.gone()) {
        // Its requester left: nothing granted, no token spent.
        q.shift();
        if (q.length === 0) this.queues.delete(key);
        w.resolve(0);
        continue;
      }
      const n = Math.min(w.want, room, quantum);
      if (limited && this.tokens < n) {
        // Over the server-wide rate: wait until this request's slice is earned.
        // (At most GONE_SWEEP_MS at a time: the requests of requesters that left are swept
        // meanwhile, their backlog given back while the others wait.)
        const ms = Math.min(GONE_SWEEP_MS, Math.max(1, Math.ceil(((n - this.tokens) * 1000) / this.rate)));
        this.timer = setTimeout(() => {
          this.timer = undefined;
          this.grant();
        }, ms);
        return;
      }
      if (limited) this.tokens -= n;
      room -= n;
      this.granted += n;
      q.shift();
      this.queues.delete(key);
      if (q.length > 0) this.queues.set(key, q); // to the end of the round
      const charged = Math.min(n, w.job.remaining);
      w.job.remaining -= charged;
      this.settle(w.job, charged);
      w.resolve(n);
    }
    this.schedule();
  }

  /**
   * Resolve with 0 every waiting request whose requester left, at most every `GONE_SWEEP_MS`
   * (so while the rate makes the others wait, the backlog of the ones that left still goes).
   */
  private sweep(): void {
    const t = this.now();
    if (t - this.lastSweep < GONE_SWEEP_MS) return;
    this.lastSweep = t;
    for (const [key, q] of [...this.queues]) {
      const kept = q.filter((w) => {
        if (!w.job.gone()) return true;
        w.resolve(0);
        return false;
      });
      if (kept.length === 0) this.queues.delete(key);
      else if (kept.length !== q.length) this.queues.set(key, kept);
    }
  }
}
