/**
 * Who owns a clientId (docs/PROTOCOL.md §1, "principal binding"): the first principal that
 * uses a clientId owns it; another principal presenting it is refused `client_id_taken`
 * (HTTP 409, on the upgrade and on HTTP requests). A binding lasts `ttlMs` (the dedupe window)
 * after its last use and is refreshed on use, so it outlives every response remembered for
 * that client: dedupe keys are scoped to the principal too (dedupe.ts), and the binding is
 * what keeps a second principal from even sharing a clientId's echo suppression.
 *
 * With a `DedupeStore` that has `bind` (sqliteStore, redisStore) the store holds bindings, so
 * every process agrees; this class then only caches confirmations for a tenth of the window.
 * Without one, bindings live here, bounded by `maxEntries` (least recently used first out).
 */

import { createHash } from 'node:crypto';
import type { DedupeStore } from '../stores/types.js';

/**
 * The default principal key: strings and numbers as they are, objects with a string or
 * number `id` by that id, anything else (including `null`, the anonymous principal) as JSON.
 */
export function defaultPrincipalKey(principal: unknown): string {
  if (typeof principal === 'string') return principal;
  if (typeof principal === 'number' || typeof principal === 'bigint') return String(principal);
  if (typeof principal === 'object' && principal !== null) {
    const id = (principal as { id?: unknown }).id;
    if (typeof id === 'string' || typeof id === 'number') return String(id);
  }
  return JSON.stringify(principal) ?? 'null';
}

/** A principal's owner key: SHA-256 (base64url) of its principal key; fixed length. */
export function ownerOf(principalKey: string): string {
  return createHash('sha256').update(principalKey).digest('base64url');
}

export interface BindingsOptions {
  ttlMs: number;
  maxEntries: number;
  /** Holds bindings shared by processes when it has `bind`. */
  store: DedupeStore | undefined;
  now?: () => number;
}

export class Bindings {
  /** clientId → owner and when it was last confirmed (LRU: Map order is use order). */
  private readonly local = new Map<string, { owner: string; at: number }>();
  private readonly now: () => number;

  constructor(private readonly opts: BindingsOptions) {
    this.now = opts.now ?? Date.now;
  }

  /** Bindings held (or cached) in this process. */
  get size(): number {
    return this.local.size;
  }

  /**
   * Bind `clientId` to `owner` or refresh that binding: `true`; `false` when another owner
   * holds it. Rejects only when the store fails.
   */
  async bind(clientId: string, owner: string): Promise<boolean> {
    const at = this.now();
    const store = this.opts.store?.bind ? this.opts.store : undefined;
    const entry = this.local.get(clientId);
    if (store) {
      // A confirmation younger than a tenth of the window cannot have lapsed in the store.
      if (entry && entry.owner === owner && at - entry.at < this.opts.ttlMs / 10) return true;
      const ok = await store.bind!(clientId, owner, this.opts.ttlMs);
      if (ok) this.remember(clientId, owner, at);
      else this.local.delete(clientId);
      return ok;
    }
    if (entry && entry.owner !== owner && at - entry.at < this.opts.ttlMs) return false;
    this.remember(clientId, owner, at);
    return true;
  }

  private remember(clientId: string, owner: string, at: number): void {
    this.local.delete(clientId);
    this.local.set(clientId, { owner, at });
    while (this.local.size > this.opts.maxEntries) {
      this.local.delete(this.local.keys().next().value as string);
    }
  }
}
