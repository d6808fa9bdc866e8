/**
 * The package as users get it: `npm run build` emits dist/, and every entry of the exports
 * map resolves by package name (Node's self-reference) in a plain Node process, with the
 * functions the README documents and type declarations beside them.
 */
import { execFileSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';

const root = join(import.meta.dirname, '..');
const pkg = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8'));

const expected: Record<string, string[]> = {
  '.': ['createSyncClient', 'SyncError', 'memoryStorage', 'webStorage', 'STATE_NAMES'],
  './storage/file': ['fileStorage'],
  './server': ['createSyncServer', 'memoryStore'],
  './stores/sqlite': ['sqliteStore'],
  './stores/redis': ['redisStore'],
  './inspect': ['createInspector', 'createRelayInspector', 'createInspectRelay'],
  './machine': ['connectionMachine', 'flatState'],
};

describe('package', () => {
  beforeAll(() => {
    execFileSync('npx', ['tsc', '-p', 'tsconfig.build.json'], { cwd: root, stdio: 'pipe' });
  }, 120_000);

  it.each(Object.entries(expected))('exports %s with its API and types', (entry, names) => {
    const spec = pkg.exports[entry];
    expect(spec, `exports map has ${entry}`).toBeDefined();
    expect(existsSync(join(root, spec.default)), spec.default).toBe(true);
    expect(existsSync(join(root, spec.types)), spec.types).toBe(true);
    const name = entry === '.' ? pkg.name : `${pkg.name}/${entry.slice(2)}`;
    const out = execFileSync(
      process.execPath,
      [
        '--input-type=module',
        '-e',
        `const m = await import(${JSON.stringify(name)}); console.log(JSON.stringify(Object.keys(m)));`,
      ],
      { cwd: root, encoding: 'utf8' },
    );
    const keys = JSON.parse(out.trim().split('\n').at(-1)!);
    for (const n of names) expect(keys, `${name} exports ${n}`).toContain(n);
  });

  it('the browser client bundles with no Node-only module (esbuild, platform browser)', async () => {
    const { build } = await import('esbuild');
    const out = await build({
      entryPoints: [join(root, 'src/client/index.ts')],
      bundle: true,
      platform: 'browser',
      format: 'esm',
      write: false,
      logLevel: 'silent',
      metafile: true,
    });
    const inputs = Object.keys(out.metafile?.inputs ?? {});
    expect(out.errors).toEqual([]);
    expect(inputs.some((f) => /node_modules\/ws\//.test(f))).toBe(false);
  });
});
