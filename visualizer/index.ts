/**
 * The visualizer's entry for pages: `mountVisualizer(element, source)` draws one panel per
 * client found in an inspection stream (an in-page `createInspector()`, or a relay socket).
 * The chart is laid out once from `connectionMachine` and shared by every panel.
 */
import { connectionMachine } from '../machines/connection.js';
import type { InspectionListener, SyncwireInspectionEvent } from '../src/inspect/index.js';
import { InspectModel, type SessionState, type TrafficEntry } from '../src/inspect/model.js';
import { type ChartLayout, layoutInBrowser } from './chart.js';
import { chartGraph } from './graph.js';
import { type ClientPanel, createClientPanel } from './panel.js';

export { type ChartLayout, type ChartView, layoutInBrowser, renderChart } from './chart.js';
export { activeIds, type ChartGraph, chartGraph } from './graph.js';
export { layoutChart } from './layout.js';
export { type ClientPanel, createClientPanel } from './panel.js';

/** Anything that delivers serialized inspection events: `createInspector()`, `relaySource()`. */
export interface InspectionSource {
  subscribe(listener: InspectionListener): () => void;
}

export interface VisualizerOptions {
  /**
   * Where each client's panel goes, and its title. Return `null` to skip a client.
   * @default appended to the mount element, titled by its client id
   */
  place?: (session: SessionState) => { parent: HTMLElement; title: string } | null;
  /** Timeline rows kept per panel. @default 200 */
  maxRows?: number;
}

export interface Visualizer {
  readonly model: InspectModel;
  /** Panels by root session id. */
  readonly panels: Map<string, ClientPanel>;
  destroy(): void;
}

let layoutPromise: Promise<ChartLayout> | undefined;
/** The connection chart, laid out once per page. `?elk.<option>=<value>` tweaks ELK, for experiments. */
export function connectionLayout(): Promise<ChartLayout> {
  const tweaks: Record<string, string> = {};
  if (typeof location !== 'undefined') {
    for (const [k, v] of new URLSearchParams(location.search))
      if (/^(elk\.|node:|syncwire\.)/.test(k)) tweaks[k] = v;
  }
  layoutPromise ??= layoutInBrowser(chartGraph(connectionMachine), tweaks);
  return layoutPromise;
}

/** Mount panels for every client in `source` under `element`. */
export async function mountVisualizer(
  element: HTMLElement,
  source: InspectionSource,
  options: VisualizerOptions = {},
): Promise<Visualizer> {
  const layout = await connectionLayout();
  const model = new InspectModel();
  const panels = new Map<string, ClientPanel>();
  const skipped = new Set<string>();
  const pending = new Map<string, TrafficEntry[]>();
  let scheduled = false;

  const flush = () => {
    scheduled = false;
    for (const [id, added] of pending) {
      const s = model.sessions.get(id);
      if (!s) continue;
      let panel = panels.get(id);
      if (!panel) {
        if (skipped.has(id)) continue;
        const where = options.place
          ? options.place(s)
          : { parent: element, title: s.clientId ?? `client ${panels.size + 1}` };
        if (!where) {
          skipped.add(id);
          continue;
        }
        panel = createClientPanel(layout, { title: where.title, maxRows: options.maxRows });
        panel.element.dataset.session = id;
        where.parent.append(panel.element);
        panels.set(id, panel);
      }
      panel.update(s, added);
    }
    pending.clear();
  };
  // One redraw per frame however many events arrive; hidden tabs get no frames, so use a timer.
  const schedule = () => {
    if (scheduled) return;
    scheduled = true;
    if (typeof requestAnimationFrame === 'function' && !document.hidden) requestAnimationFrame(flush);
    else setTimeout(flush, 50);
  };
  const offModel = model.onChange((s, added) => {
    const list = pending.get(s.sessionId);
    if (list) list.push(...added);
    else pending.set(s.sessionId, [...added]);
    schedule();
  });
  const off = source.subscribe((e: SyncwireInspectionEvent) => model.push(e));
  return {
    model,
    panels,
    destroy() {
      off();
      offModel();
      for (const p of panels.values()) p.element.remove();
      panels.clear();
    },
  };
}

/**
 * A source reading a relay (`createInspectRelay`) from the page, redialling when it drops.
 * The relay replays live actors and recent events on connect, so the page can come late.
 */
export function relaySource(url: string, onStatus?: (status: 'open' | 'closed') => void): InspectionSource {
  const listeners = new Set<(e: SyncwireInspectionEvent) => void>();
  // A reconnect replays what the relay holds; events already seen are skipped by id.
  const seen = new Set<string>();
  let ws: WebSocket | null = null;
  let stopped = false;
  const connect = () => {
    if (stopped) return;
    ws = new WebSocket(url);
    ws.onopen = () => onStatus?.('open');
    ws.onmessage = (m) => {
      if (typeof m.data !== 'string') return;
      let e: SyncwireInspectionEvent;
      try {
        e = JSON.parse(m.data);
      } catch {
        return;
      }
      if (e.id) {
        if (seen.has(e.id)) return;
        seen.add(e.id);
        if (seen.size > 50_000) for (const id of [...seen].slice(0, 25_000)) seen.delete(id);
      }
      for (const l of listeners) l(e);
    };
    ws.onclose = () => {
      onStatus?.('closed');
      if (!stopped && listeners.size > 0) setTimeout(connect, 1000);
    };
  };
  return {
    subscribe(listener) {
      const fn =
        typeof listener === 'function' ? listener : (e: SyncwireInspectionEvent) => listener.next?.(e);
      listeners.add(fn);
      if (!ws) connect();
      return () => {
        listeners.delete(fn);
        if (listeners.size === 0) {
          stopped = true;
          ws?.close();
        }
      };
    },
  };
}
