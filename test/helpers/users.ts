/**
 * Principals for the hardening suites: a user named by `?user=` on a socket's URL or by an
 * `X-User` header on an HTTP request, and channel names nobody has used yet.
 */

import type { IncomingMessage } from 'node:http';

/** The server's `authenticate`: the principal from `?user=` (socket) or `X-User` (HTTP); none → 401. */
export const authenticate = (req: IncomingMessage): { id: string } | null => {
  const q = new URL(req.url ?? '/', 'http://x').searchParams.get('user');
  const header = req.headers['x-user'];
  const id = q ?? (typeof header === 'string' ? header : null);
  return id ? { id } : null;
};

/** A `SUB` payload's `channels` of `n` names `<prefix>-0` … `<prefix>-(n-1)`, no cursors. */
export const fresh = (prefix: string, n: number): Record<string, Record<string, never>> =>
  Object.fromEntries(Array.from({ length: n }, (_, i) => [`${prefix}-${i}`, {}]));
