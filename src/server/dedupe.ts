/**
 * Exactly-once processing of `SYN`s (PROTOCOL §3 rules 3 and 4): remembers each
 * `(clientId, SYN id)` and its response, on either transport, and runs one client's batches
 * one at a time in arrival order. Memory stays bounded: remembered responses by count and
 * age, per-client queues dropped when idle, queued batches per client capped.
 *
 * When given a `DedupeStore` (`claim/complete/release`, e.g. a store shared by several server
 * processes), it is the memory of record, so a retry that lands on another process is still
 * answered from the first one's response. Without one, the in-process map is the memory.
 */

import { type NakEnvelope, nak, type SynEnvelope } from '../protocol/index.js';
import type { DedupeClaim, DedupeStore } from '../stores/types.js';

/** What a `SYN` is answered with. */
export type SynResponse = SynEnvelope | NakEnvelope;

export interface DedupeOptions {
  windowMs: number;
  maxEntries: number;
  maxQueuedPerClient: number;
  /** The shared or durable memory of record; `undefined` keeps dedupe in this process. */
  store: DedupeStore | undefined;
  /** Where failures of the store's dedupe calls are reported. */
  onError: (err: unknown, where: string) => void;
  now?: () => number;
}

interface Remembered {
  response: SynResponse;
  at: number;
}

/** How often a process polls a shared store for a duplicate another process is processing. */
const POLL_MS = 20;

const sleep = (ms: number) =>
  new Promise<void>((resolve) => {
    setTimeout(resolve, ms).unref?.();
  });

export class Dedupe {
  private readonly done = new Map<string, Remembered>();
  /** Batches being processed or queued in this process, so duplicates share one promise. */
  private readonly inflight = new Map<string, Promise<SynResponse>>();
  private readonly queues = new Map<string, { tail: Promise<unknown>; size: number }>();
  private readonly now: () => number;
  private closed = false;

  constructor(private readonly opts: DedupeOptions) {
    this.now = opts.now ?? Date.now;
  }

  /** Remembered responses held in this process (bounded by `maxEntries`). */
  get size(): number {
    return this.done.size;
  }

  /** clientIds with batches queued or running. */
  activeClientIds(): IterableIterator<string> {
    return this.queues.keys();
  }

  /**
   * Answer a `SYN`: the remembered response of a duplicate, or `process(ops)` run in this
   * client's turn. Never rejects: `process` is expected to turn its own failures into NAKs.
   */
  run(clientId: string, syn: SynEnvelope, process: () => Promise<SynResponse>): Promise<SynResponse> {
    // Length-prefixed so that no (clientId, id) pair can collide with another.
    const key = `${clientId.length}:${clientId}:${syn.id}`;
    const running = this.inflight.get(key);
    if (running) return running;
    const known = this.lookup(key);
    if (known) return Promise.resolve(known);

    const queue = this.queues.get(clientId);
    if (queue && queue.size >= this.opts.maxQueuedPerClient) {
      // Not remembered: the batch was refused before processing, a later retry may pass.
      return Promise.resolve(nak(syn.id, 'rate_limited', 'too many batches queued for this client'));
    }
    const shared = this.opts.store;
    const promise = this.enqueue(clientId, () =>
      shared ? this.runShared(shared, key, syn, process) : process(),
    ).then(
      (response) => {
        this.inflight.delete(key);
        if (!shared) this.remember(key, response);
        return response;
      },
      (err: unknown) => {
        // Not remembered: nothing says whether the batch was applied, so a retry decides.
        this.inflight.delete(key);
        this.opts.onError(err, 'dedupe');
        return nak(syn.id, 'server_error', 'internal error');
      },
    );
    this.inflight.set(key, promise);
    return promise;
  }

  /** Drop expired responses; called on a timer so idle memory shrinks too. */
  sweep(): void {
    const cutoff = this.now() - this.opts.windowMs;
    // Map order is insertion order and entries are inserted at completion, so expired
    // entries are all at the front.
    for (const [key, entry] of this.done) {
      if (entry.at > cutoff) break;
      this.done.delete(key);
    }
  }

  /** Stop polling shared stores; batches still queued are answered `server_error`. */
  close(): void {
    this.closed = true;
    this.done.clear();
  }

  private lookup(key: string): SynResponse | undefined {
    const entry = this.done.get(key);
    if (!entry) return undefined;
    if (entry.at <= this.now() - this.opts.windowMs) {
      this.done.delete(key);
      return undefined;
    }
    return entry.response;
  }

  private remember(key: string, response: SynResponse): void {
    if (this.closed) return;
    this.done.delete(key);
    this.done.set(key, { response, at: this.now() });
    this.sweep();
    // Evict the oldest: Map iteration starts with the least recently inserted.
    while (this.done.size > this.opts.maxEntries) {
      const oldest = this.done.keys().next().value as string;
      this.done.delete(oldest);
    }
  }

  private enqueue<T>(clientId: string, task: () => Promise<T>): Promise<T> {
    let queue = this.queues.get(clientId);
    if (!queue) {
      queue = { tail: Promise.resolve(), size: 0 };
      this.queues.set(clientId, queue);
    }
    const q = queue;
    q.size++;
    const result = q.tail.then(task);
    q.tail = result.then(
      () => this.dequeue(clientId, q),
      () => this.dequeue(clientId, q),
    );
    return result;
  }

  private dequeue(clientId: string, q: { size: number }): void {
    q.size--;
    if (q.size === 0 && this.queues.get(clientId) === q) this.queues.delete(clientId);
  }

  private async runShared(
    store: DedupeStore,
    key: string,
    syn: SynEnvelope,
    process: () => Promise<SynResponse>,
  ): Promise<SynResponse> {
    const deadline = this.now() + this.opts.windowMs;
    for (;;) {
      if (this.closed) return nak(syn.id, 'server_error', 'server is shutting down');
      let claim: DedupeClaim;
      try {
        claim = await store.claim(key, this.opts.windowMs);
      } catch (err) {
        this.opts.onError(err, 'store.claim');
        return nak(syn.id, 'server_error', 'dedupe store unavailable');
      }
      if (claim.status === 'done') return claim.response as SynResponse;
      if (claim.status === 'new') {
        let response: SynResponse;
        try {
          response = await process();
        } catch (err) {
          await store.release?.(key).catch((e: unknown) => this.opts.onError(e, 'store.release'));
          throw err;
        }
        try {
          await store.complete(key, response, this.opts.windowMs);
        } catch (err) {
          // The batch was applied; answering it still beats a retry that fails the same way.
          this.opts.onError(err, 'store.complete');
        }
        return response;
      }
      // Another process holds the claim: wait for its response.
      if (this.now() > deadline) return nak(syn.id, 'server_error', 'duplicate still being processed');
      await sleep(POLL_MS);
    }
  }
}
