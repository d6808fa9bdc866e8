/**
 * Installing the package as a user would (issue 13):
 *
 * - `prepare` builds dist/, so `npm install <path or git url>` works;
 * - `npm pack` ships dist/ (every file the exports map names), the docs and the README, and no
 *   sources, tests or local data;
 * - the tarball unpacked into a scratch app (its dependencies linked from this checkout, so
 *   no network is needed) imports every entry of the exports map by package name;
 * - every ```ts block of README.md typechecks against the built package (app names the
 *   snippets leave undefined, such as `applyToDatabase`, are stubbed with `declare`).
 */
import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

const root = join(import.meta.dirname, '..');
const pkg = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8'));
let work: string;
let tarball: string;
let files: string[];

describe('install', () => {
  beforeAll(() => {
    work = mkdtempSync(join(tmpdir(), 'syncwire-pack-'));
    // `npm pack` runs `prepare` (the build) first, as `npm install <git url>` does.
    const out = execFileSync('npm', ['pack', '--json', '--pack-destination', work], {
      cwd: root,
      encoding: 'utf8',
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    const info = JSON.parse(out.slice(out.indexOf('[')))[0] as {
      filename: string;
      files: Array<{ path: string }>;
    };
    tarball = join(work, info.filename);
    files = info.files.map((f) => f.path);
  }, 180_000);

  afterAll(() => {
    if (work) rmSync(work, { recursive: true, force: true });
  });

  it('has a prepare script that builds dist/', () => {
    expect(pkg.scripts.prepare).toBe('npm run build');
  });

  it('packs dist/ with every file the exports map names, and no sources or tests', () => {
    for (const [entry, spec] of Object.entries(pkg.exports as Record<string, unknown>)) {
      if (typeof spec === 'string') {
        expect(files, entry).toContain(spec.replace(/^\.\//, ''));
        continue;
      }
      const s = spec as { types: string; default: string };
      expect(files, `${entry} code`).toContain(s.default.replace(/^\.\//, ''));
      expect(files, `${entry} types`).toContain(s.types.replace(/^\.\//, ''));
    }
    expect(files).toContain('README.md');
    expect(files).toContain('package.json');
    expect(files.some((f) => f.startsWith('docs/'))).toBe(true);
    for (const f of files)
      expect(f, 'no sources, tests or data').not.toMatch(/^(src|test|machines|\.data)\/|\.ts$(?<!\.d\.ts)/);
  });

  it('unpacked into a scratch app, every export imports by package name', () => {
    const app = join(work, 'app');
    const nm = join(app, 'node_modules');
    mkdirSync(join(nm, 'syncwire'), { recursive: true });
    writeFileSync(join(app, 'package.json'), JSON.stringify({ name: 'app', type: 'module', private: true }));
    execFileSync('tar', ['-xzf', tarball, '-C', join(nm, 'syncwire'), '--strip-components=1']);
    // Dependencies and the peers the stores need, from this checkout (offline).
    for (const dep of [...Object.keys(pkg.dependencies), 'better-sqlite3', 'ioredis']) {
      mkdirSync(dirname(join(nm, dep)), { recursive: true }); // scoped names: @types/…
      symlinkSync(join(root, 'node_modules', dep), join(nm, dep), 'dir');
    }
    const entries = Object.keys(pkg.exports).filter((e) => e !== './package.json');
    const script = entries
      .map((e) => {
        const name = e === '.' ? 'syncwire' : `syncwire/${e.slice(2)}`;
        return `{ const m = await import(${JSON.stringify(name)}); out[${JSON.stringify(name)}] = Object.keys(m).length; }`;
      })
      .join('\n');
    const result = execFileSync(
      process.execPath,
      ['--input-type=module', '-e', `const out = {};\n${script}\nconsole.log(JSON.stringify(out));`],
      { cwd: app, encoding: 'utf8' },
    );
    const counts = JSON.parse(result.trim().split('\n').at(-1)!) as Record<string, number>;
    expect(Object.keys(counts)).toHaveLength(entries.length);
    for (const [name, n] of Object.entries(counts)) expect(n, `${name} exports something`).toBeGreaterThan(0);
  }, 60_000);

  it("typechecks every ```ts block of README.md against the built package (the Node snippet with ws's types included)", () => {
    const readme = readFileSync(join(root, 'README.md'), 'utf8');
    const blocks = [...readme.matchAll(/```ts\n([\s\S]*?)```/g)].map((m) => m[1]!);
    expect(blocks.length).toBeGreaterThanOrEqual(8);
    expect(
      blocks.some((b) => b.includes("from 'ws'") && /createSyncClient\(\{\s*url:[^}]*WebSocket/.test(b)),
    ).toBe(true);
    // Inside the checkout, so `syncwire` resolves to this package by self-reference (its
    // exports map and dist/ types, as an installed copy would) and `ws` to @types/ws.
    const dir = join(root, 'test-artifacts', 'readme-snippets');
    rmSync(dir, { recursive: true, force: true });
    mkdirSync(dir, { recursive: true });
    writeFileSync(
      join(dir, 'stubs.d.ts'),
      `// The application's own names, which the README's snippets use without defining.
import type { IncomingMessage } from 'node:http';
import type { SyncClient } from 'syncwire';
import type { SyncServer } from 'syncwire/server';
declare global {
  var Sentry: { captureMessage(message: string, context?: unknown): void };
  function applyChanges(changes: unknown[]): void;
  function handleErrors(errors: unknown[]): void;
  function showConnectionBadge(state: string): void;
  var auth: { getToken(o?: { forceRefresh?: boolean }): Promise<string>; signIn(): void };
  function applyToDatabase(ops: unknown[]): Promise<Array<{ changes: unknown[] }>>;
  function userFromCookie(req: IncomingMessage): { id: string } | null;
  function canRead(user: unknown, channel: string): boolean;
  function render(payload: unknown): void;
  function replaceView(data: unknown): void;
  var db: {
    get(id: number): Promise<Record<string, unknown>>;
    putSync(change: unknown): void;
    allItems(): unknown[];
  };
  function refetchEverything(channel: string): void;
  var client: SyncClient;
  var server: SyncServer;
  var user: { id: string };
  var clientId: string;
  function hideBoard(channel: string, code: string): void;
  var url: string;
  function onSync(ops: unknown[]): unknown[];
}
export {};
`,
    );
    blocks.forEach((b, i) => {
      writeFileSync(join(dir, `snippet-${i}.ts`), `${b}\nexport {};\n`);
    });
    writeFileSync(
      join(dir, 'tsconfig.json'),
      JSON.stringify({
        compilerOptions: {
          target: 'ES2022',
          module: 'NodeNext',
          moduleResolution: 'NodeNext',
          lib: ['ES2022', 'DOM'],
          strict: true,
          noEmit: true,
          skipLibCheck: true,
          types: ['node'],
        },
        include: ['*.ts'],
      }),
    );
    let output = '';
    try {
      execFileSync(join(root, 'node_modules', '.bin', 'tsc'), ['-p', join(dir, 'tsconfig.json')], {
        cwd: dir,
        encoding: 'utf8',
        stdio: 'pipe',
      });
    } catch (err) {
      output = String((err as { stdout?: string }).stdout ?? err);
    }
    expect(output, 'tsc output for the README snippets').toBe('');
  }, 120_000);
});
