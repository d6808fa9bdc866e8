/**
 * What a fresh tester broke in the durable outbox (issue 9), against a real server, real files
 * and a real child process: operations that are not JSON are refused by `send()` and jam
 * nothing; one state file is held by one live client (a second gets a `storage` failure and
 * works from memory, a killed holder's lock goes stale and the next client recovers the
 * outbox); an HTTP status without a NAK body is retried, not final; a corrupt state file is
 * reported and kept aside.
 */
import { spawn } from 'node:child_process';
import { existsSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterEach, describe, expect, it } from 'vitest';
import { fileStorage } from '../src/client/file-storage.js';
import {
  type Failure,
  memoryStorage,
  type OutboxSnapshot,
  type Restored,
  SyncError,
} from '../src/client/index.js';
import { appliedOnce, next, type Rig, reach, rig, T, until } from './helpers/harness.js';
import { closedPort, fileJson, outboxIn, scratch } from './helpers/outbox-files.js';
import type { ScriptedHttp } from './helpers/proxy.js';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const CHILD = fileURLToPath(new URL('./fixtures/outbox-client.ts', import.meta.url));

let r: Rig | undefined;
const { tempDir, children, cleanup } = scratch('hardening');
afterEach(() =>
  cleanup(async () => {
    await r?.close();
    r = undefined;
  }),
);

/** Operations `JSON.stringify` cannot carry. */
const notJson: Record<string, () => unknown> = {
  undefined: () => undefined,
  circular: () => {
    const o: Record<string, unknown> = { id: 'circ' };
    o.self = o;
    return o;
  },
  bigint: () => ({ id: 'big', n: 10n }),
  'toJSON that throws': () => ({
    id: 'tj',
    toJSON() {
      throw new Error('boom');
    },
  }),
};

describe('send() refuses an operation that is not JSON', () => {
  for (const st of ['memory', 'file'] as const) {
    it(`${st} storage: rejects at once with bad_request, stores nothing, later operations unaffected`, async () => {
      r = await rig();
      const path = join(tempDir(), 'client.json');
      const storage = st === 'memory' ? memoryStorage() : fileStorage(path);
      const c = r.client({ storage });
      await c.loaded;
      for (const [name, make] of Object.entries(notJson)) {
        const err = await c.send(make()).then(
          () => null,
          (e: unknown) => e,
        );
        expect(err, name).toBeInstanceOf(SyncError);
        expect((err as SyncError).code, name).toBe('bad_request');
        expect(c.pending, name).toBe(0);
      }
      // send$ reports the same refusal on rejected$.
      const rejected = next(c.rejected$);
      c.send$.next(notJson.circular!());
      expect((await rejected).error.code).toBe('bad_request');
      // Nothing reached the outbox, and the client is not jammed.
      expect((storage.outbox!.load(c.clientId) as OutboxSnapshot).ops).toEqual([]);
      expect(await c.send({ id: `after-${st}` })).toEqual({ id: `after-${st}`, successes: [`after-${st}`] });
      expect(await c.send({ id: `again-${st}` })).toEqual({ id: `again-${st}`, successes: [`again-${st}`] });
      appliedOnce(r.ledger, [`after-${st}`, `again-${st}`]);
      expect(r.ledger.applied.size).toBe(2);
      if (st === 'file') expect(outboxIn(path, c.clientId)).toBeUndefined();
    });
  }
});

function runChild(env: Record<string, string>) {
  const proc = spawn(process.execPath, ['--import', 'tsx', CHILD], {
    cwd: ROOT,
    env: { ...process.env, ...env },
    stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
  });
  children.add(proc);
  const exited = new Promise<number | null>((resolve) => proc.once('exit', (code) => resolve(code)));
  const written = new Promise<{ clientId: string }>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('child: no written report within 20 s')), 20_000);
    proc.on('message', (m) => {
      if ((m as { type: string }).type === 'written') {
        clearTimeout(timer);
        resolve(m as { clientId: string });
      }
    });
    proc.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`child exited with ${code} before its report`));
    });
  });
  return { proc, written, exited };
}

describe('fileStorage is held by one live client', () => {
  it('a second live process on the same file: storage failure "in use", its own identity, never sends the first one’s operations; after the first is killed, the next client recovers them once', async () => {
    const path = join(tempDir(), 'client.json');
    // A: a live process whose three operations are queued (its server is unreachable).
    const a = runChild({
      SYNCWIRE_FILE: path,
      SYNCWIRE_URL: `ws://127.0.0.1:${await closedPort()}/sync`,
      SYNCWIRE_OPS: '3',
    });
    const info = await a.written;
    expect(outboxIn(path, info.clientId)?.ops).toHaveLength(3);

    r = await rig();
    const failures: Failure[] = [];
    const b = r.client({ storage: fileStorage(path), onFailure: (f) => failures.push(f) });
    expect(await b.loaded).toBe(0);
    expect(failures.find((f) => f.kind === 'storage')?.reason).toMatch(/in use by another live client/);
    expect(b.clientId).not.toBe(info.clientId);
    expect(await b.send({ id: 'b-own' })).toEqual({ id: 'b-own', successes: ['b-own'] });
    await b.close();
    // B never sent A's operations, and never wrote the file: A's outbox is as A left it.
    expect(r.ledger.applied.size).toBe(1);
    appliedOnce(r.ledger, ['b-own']);
    expect(outboxIn(path, info.clientId)?.ops).toHaveLength(3);
    expect(outboxIn(path, b.clientId)).toBeUndefined();

    // A dies without releasing: its lock goes stale and C takes the file over.
    a.proc.kill('SIGKILL');
    await a.exited;
    const c = r.client({ storage: fileStorage(path, { stale: 2000 }) });
    const restored: Restored[] = [];
    c.restored$.subscribe((x) => restored.push(x));
    expect(await c.loaded).toBe(3);
    expect(c.clientId).toBe(info.clientId);
    await until(() => restored.length === 3, 10_000, 'three restored results');
    appliedOnce(r.ledger, ['crash-0', 'crash-1', 'crash-2', 'b-own']);
    await c.close();
    expect(existsSync(`${path}.lock`)).toBe(false);
  }, 40_000);

  it('two clients in one process: the second works from memory and leaves the file alone; close() releases it for the next', async () => {
    const path = join(tempDir(), 'client.json');
    r = await rig();
    r.proxy.refuse = true;
    r.proxy.httpScript = Array.from({ length: 10_000 }, () => 'network' as const);
    const first = r.client({ storage: fileStorage(path), pollInterval: 60_000 });
    await first.loaded;
    first.send({ id: 'first-queued' }).catch(() => {});
    await until(() => outboxIn(path, first.clientId)?.ops.length === 1, 5000, 'queued on disk');
    expect(existsSync(`${path}.lock`)).toBe(true);

    const failures: Failure[] = [];
    const second = r.client({ storage: fileStorage(path), onFailure: (f) => failures.push(f) });
    expect(await second.loaded).toBe(0);
    expect(second.clientId).not.toBe(first.clientId);
    expect(failures.some((f) => f.kind === 'storage' && /in use/.test(f.reason ?? ''))).toBe(true);
    r.proxy.refuse = false;
    r.proxy.httpScript = [];
    expect(await second.send({ id: 'second' })).toEqual({ id: 'second', successes: ['second'] });
    await second.close();
    expect(Object.keys(fileJson(path)['#outbox'] as object)).toEqual([first.clientId]);

    await first.close();
    expect(existsSync(`${path}.lock`)).toBe(false);
    const third = r.client({ storage: fileStorage(path) });
    const restored: Restored[] = [];
    third.restored$.subscribe((x) => restored.push(x));
    expect(await third.loaded).toBe(1);
    expect(third.clientId).toBe(first.clientId);
    await until(() => restored.length === 1, 10_000, 'restored');
    appliedOnce(r.ledger, ['first-queued', 'second']);
  }, 30_000);
});

describe('HTTP statuses without a NAK body', () => {
  const scripts: ScriptedHttp[] = [
    { status: 404 },
    { status: 405, headers: { allow: 'GET' } },
    { status: 400, headers: { 'content-type': 'text/html' }, body: '<h1>Bad Request</h1>' },
  ];
  for (const scripted of scripts) {
    it(`${scripted.status} with no syncwire NAK: retried with the same id, reported as http_error, applied once`, async () => {
      r = await rig();
      r.proxy.refuse = true;
      const c = r.client({ pollInterval: 60_000 });
      await reach(c, 'degraded', 5 * T);
      r.proxy.httpScript.push(scripted, scripted);
      const failure = next(c.failures$, (f) => f.kind === 'http_error' && f.code === scripted.status);
      const id = `s${scripted.status}`;
      expect(await c.send({ id })).toEqual({ id, successes: [id] });
      expect((await failure).reason).toMatch(/without a syncwire NAK/);
      appliedOnce(r.ledger, [id]);
    });
  }

  it('a 4xx carrying a real NAK is still final: rejected with its code, not retried', async () => {
    r = await rig();
    r.proxy.refuse = true;
    const c = r.client({ pollInterval: 60_000 });
    await reach(c, 'degraded', 5 * T);
    r.proxy.httpScript.push({
      status: 403,
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify([{ id: null, type: 'NAK', error: { code: 'forbidden', message: 'no' } }]),
    });
    const err = await c.send({ id: 'nak403' }).then(
      () => null,
      (e: unknown) => e,
    );
    expect((err as SyncError).code).toBe('forbidden');
    expect(r.ledger.applied.size).toBe(0);
  });
});

describe('a corrupt state file', () => {
  it('is reported as a storage failure, kept aside as <path>.corrupt-<ms>, and the client starts fresh', async () => {
    const dir = tempDir();
    const path = join(dir, 'client.json');
    const broken = '{"syncwire:clientId":"c-old","#outbox":{"c-old":{"ops":[{"key":"x:o1"';
    writeFileSync(path, broken);
    r = await rig();
    const failures: Failure[] = [];
    const c = r.client({ storage: fileStorage(path), onFailure: (f) => failures.push(f) });
    expect(await c.loaded).toBe(0);
    const f = failures.find((x) => x.kind === 'storage');
    expect(f?.reason).toMatch(/corrupt/);
    const aside = readdirSync(dir).filter((n) => n.startsWith('client.json.corrupt-'));
    expect(aside).toHaveLength(1);
    expect(f?.reason).toContain(aside[0]);
    expect(readFileSync(join(dir, aside[0]!), 'utf8')).toBe(broken);
    expect(await c.send({ id: 'fresh' })).toEqual({ id: 'fresh', successes: ['fresh'] });
    // A valid file again, with the client's (new) identity.
    expect(fileJson(path)['syncwire:clientId']).toBe(c.clientId);
  });
});
