/**
 * Test runner configuration: every suite runs against real processes on 127.0.0.1, so files
 * run in separate forks with a generous per-test timeout (no test sleeps; they wait for
 * events, bounded).
 */
import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    pool: 'forks',
    testTimeout: 30_000,
    hookTimeout: 60_000,
    reporters: ['default', './test/summary-reporter.ts'],
  },
});
