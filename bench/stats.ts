/**
 * Small statistics and formatting for the benchmark report: medians with their min–max
 * spread, ratios taken within each run (the machines drift ~30 % between runs, so only
 * same-run ratios are comparable), and the Markdown/console table.
 */

export interface Spread {
  median: number;
  min: number;
  max: number;
  /** (max − min) / median, as a fraction. */
  spread: number;
  n: number;
}

export function summarize(values: number[]): Spread {
  const v = values.filter((x) => Number.isFinite(x)).sort((a, b) => a - b);
  if (v.length === 0)
    return { median: Number.NaN, min: Number.NaN, max: Number.NaN, spread: Number.NaN, n: 0 };
  const mid = v.length >> 1;
  const median = v.length % 2 ? v[mid]! : (v[mid - 1]! + v[mid]!) / 2;
  const min = v[0]!;
  const max = v[v.length - 1]!;
  return { median, min, max, spread: median ? (max - min) / median : 0, n: v.length };
}

/** Per-run ratios a[i] / b[i] (runs where both exist), summarized. */
export function ratios(a: number[], b: number[]): Spread {
  const r: number[] = [];
  for (let i = 0; i < Math.min(a.length, b.length); i++) {
    if (Number.isFinite(a[i]!) && Number.isFinite(b[i]!) && b[i] !== 0) r.push(a[i]! / b[i]!);
  }
  return summarize(r);
}

/** 3 significant digits, thousands separated; no exponent notation. */
export function num(x: number): string {
  if (!Number.isFinite(x)) return '–';
  const abs = Math.abs(x);
  const digits = abs >= 100 ? 0 : abs >= 10 ? 1 : abs >= 1 ? 2 : 3;
  const rounded = abs >= 1000 ? Number(x.toPrecision(3)) : Number(x.toFixed(digits));
  return rounded.toLocaleString('en-US', { maximumFractionDigits: digits });
}

/** "median (min–max)". */
export function cell(s: Spread): string {
  if (s.n === 0) return '–';
  if (s.n === 1 || s.min === s.max) return num(s.median);
  return `${num(s.median)} (${num(s.min)}–${num(s.max)})`;
}

/** "1.23× (1.1–1.4)". */
export function ratioCell(s: Spread): string {
  if (s.n === 0) return '–';
  const f = (x: number) => x.toFixed(x >= 10 ? 1 : 2);
  if (s.n === 1 || s.min === s.max) return `${f(s.median)}×`;
  return `${f(s.median)}× (${f(s.min)}–${f(s.max)})`;
}

/** A Markdown table with padded columns (the layout the repository's formatter writes). */
export function markdownTable(header: string[], rows: string[][]): string {
  const esc = (c: string) => c.replace(/\|/g, '\\|');
  const all = [header, ...rows].map((r) => header.map((_, i) => esc(r[i] ?? '')));
  const widths = header.map((_, i) => Math.max(3, ...all.map((r) => [...r[i]!].length)));
  const line = (r: string[]) =>
    `| ${r.map((c, i) => c + ' '.repeat(widths[i]! - [...c].length)).join(' | ')} |`;
  return [
    line(all[0]!),
    `| ${widths.map((w) => '-'.repeat(w)).join(' | ')} |`,
    ...all.slice(1).map(line),
  ].join('\n');
}

/** The same table with padded columns, for the terminal. */
export function textTable(header: string[], rows: string[][]): string {
  const all = [header, ...rows];
  const widths = header.map((_, i) => Math.max(...all.map((r) => (r[i] ?? '').length)));
  const line = (r: string[]) => r.map((c, i) => (c ?? '').padEnd(widths[i]!)).join('  ');
  return [line(header), widths.map((w) => '─'.repeat(w)).join('  '), ...rows.map(line)].join('\n');
}
