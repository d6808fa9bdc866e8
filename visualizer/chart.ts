/**
 * Draws a laid-out `ChartGraph` as SVG and lights it up live: active states from the
 * snapshot value, the transitions just taken from the microsteps.
 *
 * Layout runs once per page (the chart is the same for every client); each client's panel
 * renders its own SVG from that layout.
 */
/// <reference types="vite/client" />
import ELKModule from 'elkjs/lib/elk-api.js';
// ELK itself (1.6 MB of compiled Java) runs in a worker, copied as-is rather than bundled:
// the page stays responsive and the Vite build stays fast.
import elkWorkerUrl from 'elkjs/lib/elk-worker.min.js?url';
import { activeIds, type ChartEdge, type ChartGraph, type ChartNode } from './graph.js';
import {
  type ChartLayout,
  type ElkLike,
  LABEL_LINE_H,
  type LayoutTweaks,
  LINE_H,
  layoutChart,
  TITLE_H,
} from './layout.js';

export type { ChartLayout, LayoutTweaks } from './layout.js';

const SVG_NS = 'http://www.w3.org/2000/svg';

/** Lay a chart out in the page, with ELK in a worker. */
export async function layoutInBrowser(graph: ChartGraph, tweaks: LayoutTweaks = {}): Promise<ChartLayout> {
  const ELK = ((ELKModule as unknown as { default?: unknown }).default ?? ELKModule) as new (opts: {
    workerUrl: string;
  }) => ElkLike;
  const elk = new ELK({ workerUrl: elkWorkerUrl });
  try {
    return await layoutChart(graph, elk, tweaks);
  } finally {
    elk.terminateWorker?.();
  }
}

function el<K extends keyof SVGElementTagNameMap>(tag: K, attrs: Record<string, string | number> = {}) {
  const e = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  return e;
}

export interface ChartView {
  readonly svg: SVGSVGElement;
  /** Light the states of this snapshot value. */
  setValue(value: unknown): void;
  /** Mark these edges (by transition key) as just taken; earlier marks fade. */
  markTransitions(keys: string[]): void;
}

/** Render a laid-out chart into a fresh SVG element. */
let charts = 0;

export function renderChart(layout: ChartLayout): ChartView {
  const { graph } = layout;
  // Marker ids are document-wide: each chart gets its own, so hiding one chart spares the rest.
  const uid = `c${++charts}`;
  const svg = el('svg', {
    viewBox: `0 0 ${Math.ceil(layout.width)} ${Math.ceil(layout.height)}`,
    // The natural size, for "1:1"; CSS scales it to the panel's width otherwise.
    width: Math.ceil(layout.width),
    height: Math.ceil(layout.height),
    class: 'chart',
    role: 'img',
    'aria-label': `statechart ${graph.rootId}`,
  }) as SVGSVGElement;
  const defs = el('defs');
  for (const [id, cls] of [
    [`${uid}-arrow`, 'arrow'],
    [`${uid}-arrow-hot`, 'arrow hot'],
  ] as const) {
    const m = el('marker', {
      id: `${id}`,
      viewBox: '0 0 10 10',
      refX: 9,
      refY: 5,
      // Fixed size: a hot edge is drawn thicker, and its arrowhead should not grow with it.
      markerUnits: 'userSpaceOnUse',
      markerWidth: 9,
      markerHeight: 9,
      orient: 'auto-start-reverse',
    });
    m.append(el('path', { d: 'M 0 0 L 10 5 L 0 10 z', class: cls }));
    defs.append(m);
  }
  svg.append(defs);

  const title = el('text', { x: 14, y: 20, class: 'chart-title' });
  title.textContent = graph.rootId;
  svg.append(title);

  const nodeLayer = el('g', { class: 'nodes' });
  const edgeLayer = el('g', { class: 'edges' });
  const labelLayer = el('g', { class: 'labels' });
  svg.append(nodeLayer, edgeLayer, labelLayer);

  const nodeEls = new Map<string, SVGGElement>();
  // Parents first, so children paint over them.
  const order: ChartNode[] = [];
  const visit = (id: string) => {
    const n = graph.nodes.get(id);
    if (!n) return;
    if (id !== graph.rootId) order.push(n);
    for (const c of n.children) visit(c);
  };
  visit(graph.rootId);
  for (const n of order) {
    const b = layout.boxes.get(n.id);
    if (!b) continue;
    const parent = n.parent ? graph.nodes.get(n.parent) : undefined;
    const region = parent?.type === 'parallel';
    const g = el('g', {
      class: `state state-${n.type}${region ? ' region' : ''}`,
      'data-state': n.id,
      transform: `translate(${b.x},${b.y})`,
    });
    if (n.initial) {
      g.append(el('circle', { cx: -14, cy: 12, r: 4, class: 'initial-dot' }));
      g.append(
        el('path', { d: 'M -10 12 L -1 12', class: 'initial-line', 'marker-end': `url(#${uid}-arrow)` }),
      );
    }
    g.append(el('rect', { width: b.width, height: b.height, rx: n.type === 'any' ? 2 : 8, class: 'box' }));
    if (n.type === 'final')
      g.append(
        el('rect', { x: 3, y: 3, width: b.width - 6, height: b.height - 6, rx: 6, class: 'box-inner' }),
      );
    const t = el('text', { x: 10, y: 15, class: 'state-name' });
    t.textContent = n.type === 'parallel' ? `${n.name}  ‖` : n.name;
    g.append(t);
    n.lines.forEach((line, i) => {
      const l = el('text', { x: 10, y: TITLE_H + 8 + i * LINE_H, class: 'state-line' });
      l.textContent = line;
      g.append(l);
    });
    const tip = el('title');
    tip.textContent = n.id;
    g.append(tip);
    nodeEls.set(n.id, g);
    nodeLayer.append(g);
  }

  /** Per transition key: the arrow it is drawn on, and its own line of the label. */
  const edgeEls = new Map<string, Array<SVGElement>>();
  const remember = (key: string, e: SVGElement) => edgeEls.set(key, [...(edgeEls.get(key) ?? []), e]);
  for (const e of graph.edges) {
    const geo = layout.edges.get(e.id);
    if (!geo || geo.points.length < 2) continue;
    const g = el('g', { class: `edge edge-${e.kind}`, 'data-edge': e.id });
    const d = geo.points
      .map((p, i) => `${i === 0 ? 'M' : 'L'} ${p.x.toFixed(1)} ${p.y.toFixed(1)}`)
      .join(' ');
    g.append(el('path', { d, class: 'edge-path', 'marker-end': `url(#${uid}-arrow)` }));
    const tip = el('title');
    tip.textContent = `${e.source} → ${e.target}\n${e.parts
      .map((p) => `${p.text}${p.actions.length ? ` / ${p.actions.join(', ')}` : ''}`)
      .join('\n')}`;
    g.append(tip);
    edgeLayer.append(g);
    for (const p of e.parts) remember(p.key, g);
    const lines = e.parts.filter((p) => p.text);
    if (geo.label && lines.length) {
      const lg = el('g', { class: `edge-label edge-${e.kind}`, 'data-edge': e.id });
      lg.append(
        el('rect', {
          x: geo.label.x - 2,
          y: geo.label.y,
          width: geo.label.width + 2,
          height: geo.label.height,
          rx: 3,
          class: 'label-bg',
        }),
      );
      const text = el('text', { class: 'label-text' });
      let row = 0;
      for (const p of lines) {
        p.lines.forEach((line, i) => {
          const span = el('tspan', {
            x: geo.label!.x + 1,
            y: geo.label!.y + ++row * LABEL_LINE_H - 1,
            class: `part part-${p.kind}${i > 0 ? ' guard' : ''}`,
            'data-key': p.key,
          });
          span.textContent = line;
          text.append(span);
          remember(p.key, span);
        });
      }
      lg.append(text, tip.cloneNode(true));
      labelLayer.append(lg);
      for (const p of e.parts) remember(p.key, lg);
    }
  }

  let marked: SVGElement[] = [];
  return {
    svg,
    setValue(value) {
      const active = activeIds(graph.rootId, value);
      for (const [id, g] of nodeEls) g.classList.toggle('active', active.has(id));
    },
    markTransitions(keys) {
      const now: SVGElement[] = [];
      for (const k of keys) for (const e of edgeEls.get(k) ?? []) if (!now.includes(e)) now.push(e);
      // Two steps of history: what the last event did (hot), and the one before (warm).
      for (const e of Array.from(svg.querySelectorAll('.warm'))) e.classList.remove('warm');
      for (const e of marked) {
        e.classList.remove('hot');
        if (!now.includes(e)) e.classList.add('warm');
        e.querySelector('.edge-path')?.setAttribute('marker-end', `url(#${uid}-arrow)`);
      }
      for (const e of now) {
        e.classList.add('hot');
        e.querySelector('.edge-path')?.setAttribute('marker-end', `url(#${uid}-arrow-hot)`);
      }
      marked = now;
    },
  };
}

export type { ChartEdge };
