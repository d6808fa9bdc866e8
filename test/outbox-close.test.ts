/**
 * FIX14D F1: `close()` before `loaded` keeps what `send()` accepted. Operations sent and
 * closed while a `fileStorage` is still claiming its lock (same tick on a free file; seconds
 * while a SIGKILLed holder's lock goes stale) reject `closed`, and stay in the file's outbox
 * for the next client, which sends them once. Real server, real files, a real child process.
 */
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterEach, describe, expect, it } from 'vitest';
import { fileStorage } from '../src/client/file-storage.js';
import type { Restored, SyncClient } from '../src/client/index.js';
import { appliedOnce, type Rig, rig, until } from './helpers/harness.js';
import { closedPort, outboxIn, scratch } from './helpers/outbox-files.js';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const CHILD = fileURLToPath(new URL('./fixtures/outbox-client.ts', import.meta.url));

let r: Rig | undefined;
const { tempDir, children, cleanup } = scratch('close');
afterEach(() =>
  cleanup(async () => {
    await r?.close();
    r = undefined;
  }),
);

/** Send `ids`, close at once (same tick), and collect each promise's outcome. */
async function sendThenClose(c: SyncClient, ids: string[]): Promise<string[]> {
  const outcomes = ids.map((id) =>
    c.send({ id }).then(
      () => 'ok',
      (e: { code?: string }) => e.code ?? 'error',
    ),
  );
  await c.close();
  return Promise.all(outcomes);
}

/** The next client on `path` loads `ids` and sends each once. */
async function nextClientSends(path: string, clientId: string, ids: string[]): Promise<void> {
  const d = r!.client({ storage: fileStorage(path, { stale: 2000 }) });
  const restored: Restored[] = [];
  d.restored$.subscribe((x) => restored.push(x));
  expect(await d.loaded).toBe(ids.length);
  expect(d.clientId).toBe(clientId);
  await until(() => restored.length === ids.length, 10_000, 'restored results');
  expect(restored.every((x) => 'result' in x)).toBe(true);
  appliedOnce(r!.ledger, ids);
  await d.close();
  expect(existsSync(`${path}.lock`)).toBe(false);
}

describe('close() before loaded keeps the accepted operations in the durable outbox', () => {
  it('a free file: send() x10 and close() in the same tick reject `closed`; the file keeps all 10; the next client sends them once', async () => {
    r = await rig();
    const path = join(tempDir(), 'client.json');
    // A first client gives the file its identity.
    const z = r.client({ storage: fileStorage(path) });
    await z.loaded;
    await z.send({ id: 'z' });
    await z.close();

    const a = r.client({ storage: fileStorage(path) });
    expect(a.clientId).toBe(z.clientId);
    const ids = Array.from({ length: 10 }, (_, i) => `L${i}`);
    expect(await sendThenClose(a, ids)).toEqual(ids.map(() => 'closed'));
    expect(outboxIn(path, a.clientId)?.ops.map((o) => (o.op as { id: string }).id)).toEqual(ids);
    expect(existsSync(`${path}.lock`)).toBe(false);
    expect(r.ledger.applied.has('L0')).toBe(false);
    await nextClientSends(path, a.clientId, ids);
  }, 30_000);

  it('a new file (no identity yet): the same', async () => {
    r = await rig();
    const path = join(tempDir(), 'client.json');
    const a = r.client({ storage: fileStorage(path) });
    const ids = ['n0', 'n1', 'n2'];
    expect(await sendThenClose(a, ids)).toEqual(ids.map(() => 'closed'));
    expect(outboxIn(path, a.clientId)?.ops).toHaveLength(3);
    await nextClientSends(path, a.clientId, ids);
  }, 30_000);

  it('a stale lock of a SIGKILLed holder: close() waits for it to go stale, writes the 10, releases; the next client sends them and the dead one’s once', async () => {
    const path = join(tempDir(), 'client.json');
    // A live holder with one queued operation (its server is unreachable), then killed.
    const h = spawn(process.execPath, ['--import', 'tsx', CHILD], {
      cwd: ROOT,
      env: {
        ...process.env,
        SYNCWIRE_FILE: path,
        SYNCWIRE_URL: `ws://127.0.0.1:${await closedPort()}/sync`,
        SYNCWIRE_OPS: '1',
      },
      stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
    });
    children.add(h);
    const info = await new Promise<{ clientId: string }>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('child: no written report within 20 s')), 20_000);
      h.on('message', (m) => {
        clearTimeout(timer);
        resolve(m as { clientId: string });
      });
    });
    const exited = new Promise((resolve) => h.once('exit', resolve));
    h.kill('SIGKILL');
    await exited;
    expect(existsSync(`${path}.lock`)).toBe(true);

    r = await rig();
    const a = r.client({ storage: fileStorage(path, { stale: 2000 }) });
    expect(a.clientId).toBe(info.clientId);
    const ids = Array.from({ length: 10 }, (_, i) => `S${i}`);
    expect(await sendThenClose(a, ids)).toEqual(ids.map(() => 'closed'));
    expect(outboxIn(path, a.clientId)?.ops).toHaveLength(11);
    expect(existsSync(`${path}.lock`)).toBe(false);
    await nextClientSends(path, a.clientId, ['crash-0', ...ids]);
  }, 40_000);
});
