/**
 * What the outbox suites (outbox, outbox-hardening, outbox-close) share: temporary directories
 * and child client processes removed after each test, a port nothing listens on, and the
 * outbox a `fileStorage` file holds for a clientId.
 */
import type { ChildProcess } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { OutboxSnapshot } from '../../src/client/index.js';

/**
 * Directories made by `tempDir()` and children added to `children`. `cleanup(between)` (call it
 * in `afterEach`) SIGKILLs the children, awaits `between` (closing the test's rig), then removes
 * the directories.
 */
export function scratch(prefix: string): {
  tempDir: () => string;
  children: Set<ChildProcess>;
  cleanup: (between?: () => Promise<void>) => Promise<void>;
} {
  const dirs: string[] = [];
  const children = new Set<ChildProcess>();
  return {
    tempDir: () => {
      const d = mkdtempSync(join(tmpdir(), `syncwire-${prefix}-`));
      dirs.push(d);
      return d;
    },
    children,
    cleanup: async (between) => {
      for (const c of children) c.kill('SIGKILL');
      children.clear();
      await between?.();
      for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
    },
  };
}

/** A loopback port that was free a moment ago and has nothing listening on it now. */
export async function closedPort(): Promise<number> {
  const srv = createServer();
  await new Promise<void>((resolve) => srv.listen(0, '127.0.0.1', resolve));
  const port = (srv.address() as { port: number }).port;
  await new Promise((resolve) => srv.close(resolve));
  return port;
}

/** The whole `fileStorage` file, parsed. */
export const fileJson = (path: string) => JSON.parse(readFileSync(path, 'utf8')) as Record<string, unknown>;

/** The outbox the `fileStorage` file at `path` holds for `clientId`. */
export const outboxIn = (path: string, clientId: string) =>
  (fileJson(path)['#outbox'] as Record<string, OutboxSnapshot> | undefined)?.[clientId];
