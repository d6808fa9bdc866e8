/**
 * Client bundle size: esbuild bundles `src/client/index.ts` for the browser (ESM, minified,
 * tree-shaken; xstate and rxjs included), gzip level 9 with zlib; socket.io-client's ESM
 * entry the same way for comparison. Also proves the browser bundle pulls in no `ws` (the
 * client must use the platform WebSocket) and reports what each package weighs in it.
 *
 * Nothing is marked external: a `node:*` import in the client would fail the build (the
 * Node-only file storage lives in its own entry, `syncwire/storage/file`).
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { gzipSync } from 'node:zlib';
import { build, type Metafile } from 'esbuild';

export interface BundleResult {
  name: string;
  minBytes: number;
  gzipBytes: number;
  /** Bytes in the minified output, per package (or per project folder). */
  byPackage: Record<string, number>;
  /** Input files that came from the `ws` package: must be empty for the browser build. */
  wsInputs: string[];
  /** `node:*` imports found (must be none: the build fails on them). */
  nodeImports: string[];
  /** esbuild's metafile of the build. */
  meta: Metafile;
}

const root = new URL('..', import.meta.url).pathname;

async function bundle(name: string, entry: { file: string } | { contents: string }): Promise<BundleResult> {
  const r = await build({
    ...('file' in entry
      ? { entryPoints: [entry.file] }
      : { stdin: { contents: entry.contents, resolveDir: root, loader: 'js' as const } }),
    absWorkingDir: root,
    bundle: true,
    platform: 'browser',
    format: 'esm',
    target: 'es2020',
    minify: true,
    treeShaking: true,
    write: false,
    metafile: true,
    logLevel: 'silent',
  });
  const code = r.outputFiles[0]!.contents;
  const meta: Metafile = r.metafile;
  const out = Object.values(meta.outputs)[0]!;
  const byPackage: Record<string, number> = {};
  for (const [file, info] of Object.entries(out.inputs)) {
    const m = file.match(/node_modules\/((?:@[^/]+\/)?[^/]+)/);
    const key = m ? m[1]! : file.split('/').slice(0, 2).join('/');
    byPackage[key] = (byPackage[key] ?? 0) + info.bytesInOutput;
  }
  const nodeImports = [
    ...new Set(
      Object.values(meta.inputs).flatMap((i) =>
        i.imports.filter((x) => x.path.startsWith('node:')).map((x) => x.path),
      ),
    ),
  ];
  return {
    name,
    minBytes: code.length,
    gzipBytes: gzipSync(code, { level: 9 }).length,
    byPackage,
    wsInputs: Object.keys(meta.inputs).filter((f) => /node_modules\/ws\//.test(f)),
    nodeImports,
    meta,
  };
}

/** The packages the client's design requires (the statechart, the RxJS facade, IndexedDB through `idb`). */
const LIBRARIES = ['xstate', 'rxjs', 'idb'] as const;

/**
 * An entry that re-exports exactly the values the client's own files import from `LIBRARIES`
 * (read from the files the syncwire bundle took in, `import type` left out), so that bundling
 * it gives what those libraries weigh in the client with none of syncwire's code: the floor
 * the bundle target is measured against (issue 14).
 */
export function librariesEntry(syncwire: Metafile): string {
  const names = new Map<string, Set<string>>();
  for (const file of Object.keys(syncwire.inputs)) {
    if (file.includes('node_modules') || !/\.ts$/.test(file)) continue;
    const text = readFileSync(join(root, file), 'utf8');
    for (const m of text.matchAll(/import\s*\{([^}]*)\}\s*from\s*'([^']+)'/g)) {
      const lib = m[2]!;
      if (!(LIBRARIES as readonly string[]).includes(lib)) continue;
      const set = names.get(lib) ?? new Set<string>();
      for (const part of m[1]!.split(',')) {
        const name = part.trim();
        if (name && !name.startsWith('type ')) set.add(name.split(/\s+as\s+/)[0]!);
      }
      names.set(lib, set);
    }
  }
  return [...names]
    .filter(([, set]) => set.size > 0)
    .map(([lib, set]) => `export { ${[...set].sort().join(', ')} } from '${lib}';`)
    .join('\n');
}

export async function bundleSizes(): Promise<{
  syncwire: BundleResult;
  socketio: BundleResult;
  /** xstate, rxjs and idb alone: the values syncwire's client imports from them, nothing else. */
  libraries: BundleResult;
}> {
  const [syncwire, socketio] = await Promise.all([
    bundle('syncwire', { file: 'src/client/index.ts' }),
    bundle('socket.io-client', { contents: "export { io } from 'socket.io-client';" }),
  ]);
  const libraries = await bundle('xstate + rxjs + idb', { contents: librariesEntry(syncwire.meta) });
  return { syncwire, socketio, libraries };
}
