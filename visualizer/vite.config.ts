/**
 * Vite build of the two pages: the playground (playground/index.html) and the relay
 * visualizer (visualizer/index.html). The project root is the Vite root so both pages can
 * import the machine and src/ directly. `npm start` runs this build in-process
 * (playground/server.ts), into visualizer/dist.
 */
import { fileURLToPath } from 'node:url';
import { defineConfig } from 'vite';

const root = fileURLToPath(new URL('..', import.meta.url));

export default defineConfig({
  root,
  base: './',
  logLevel: 'warn',
  publicDir: false,
  build: {
    outDir: fileURLToPath(new URL('./dist', import.meta.url)),
    emptyOutDir: true,
    target: 'es2022',
    // The ELK worker is one 1.6 MB file, copied as-is (see chart.ts).
    chunkSizeWarningLimit: 2500,
    assetsInlineLimit: 0,
    reportCompressedSize: false,
    rollupOptions: {
      input: {
        playground: fileURLToPath(new URL('../playground/index.html', import.meta.url)),
        visualizer: fileURLToPath(new URL('./index.html', import.meta.url)),
      },
    },
  },
});
