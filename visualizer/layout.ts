/**
 * Lays a `ChartGraph` out with ELK (layered; compound states laid out together with their
 * children, so edges may cross levels). Pure: it is handed an ELK instance, a worker-backed
 * one in the page (chart.ts) or elkjs's bundled one in Node.
 */
import type { ElkExtendedEdge, ElkNode } from 'elkjs/lib/elk-api.js';
import type { ChartGraph, ChartNode } from './graph.js';

/** Text metrics: the page font is fixed (see style.css), so widths can be estimated. */
const TITLE_PX = 7.95;
const LINE_PX = 6.4;
const LABEL_PX = 6.4;
export const TITLE_H = 18;
export const LINE_H = 13;
export const LABEL_LINE_H = 12;

export interface ChartLayout {
  graph: ChartGraph;
  width: number;
  height: number;
  boxes: Map<string, { x: number; y: number; width: number; height: number }>;
  edges: Map<
    string,
    {
      points: Array<{ x: number; y: number }>;
      label?: { x: number; y: number; width: number; height: number };
    }
  >;
}

export const headerHeight = (n: ChartNode) => TITLE_H + 6 + n.lines.length * LINE_H;

function nodeSize(n: ChartNode): { width: number; height: number } {
  const textW = Math.max(n.name.length * TITLE_PX, ...n.lines.map((l) => l.length * LINE_PX));
  return { width: Math.ceil(textW + 24), height: headerHeight(n) + 8 };
}

/** What `layoutChart` needs of ELK; Node passes `new (require('elkjs'))()`. */
export interface ElkLike {
  layout(g: ElkNode): Promise<ElkNode>;
  terminateWorker?(): void;
}

/** Extra ELK options, for experiments (`?elk.x=y` on the pages). */
export type LayoutTweaks = Record<string, string>;

/** Lay the graph out. Coordinates come back absolute (ELK's `json.*Coords: ROOT`). */
export async function layoutChart(
  graph: ChartGraph,
  elk: ElkLike,
  tweaks: LayoutTweaks = {},
): Promise<ChartLayout> {
  const toElk = (n: ChartNode): ElkNode => {
    const kids = n.children.map((id) => graph.nodes.get(id)!).filter(Boolean);
    // Room on the left for the initial-state marker.
    const extra: Record<string, string> = {};
    for (const [k, v] of Object.entries(tweaks)) {
      if (k.startsWith(`node:${n.id}:`)) extra[k.slice(`node:${n.id}:`.length)] = v;
    }
    const margins = {
      layoutOptions: {
        ...(n.initial ? { 'elk.margins': '[top=0,left=18,bottom=0,right=0]' } : {}),
        ...extra,
      },
    };
    if (kids.length === 0) return { id: n.id, ...nodeSize(n), ...margins };
    const parallel = n.type === 'parallel';
    const top = headerHeight(n) + 6;
    return {
      id: n.id,
      layoutOptions: {
        ...margins.layoutOptions,
        'elk.padding': `[top=${top},left=14,bottom=14,right=14]`,
        // Regions of a parallel state sit side by side, as in Harel's notation.
        ...(parallel ? { 'elk.direction': 'RIGHT' } : {}),
        // Minimum width so the header text fits.
        'elk.nodeSize.constraints': 'MINIMUM_SIZE',
        'elk.nodeSize.minimum': `(${nodeSize(n).width}, ${top + 20})`,
      },
      children: kids.map(toElk),
    };
  };
  const root = graph.nodes.get(graph.rootId)!;
  // Regions of a parallel state have no edges between them, so ELK sets them side by side
  // and the chart grows too wide for a half-page panel. Invisible edges stack them instead.
  const hints: ElkExtendedEdge[] = [];
  if (tweaks['syncwire.stackRegions'] !== 'false') {
    for (const n of graph.nodes.values()) {
      if (n.type !== 'parallel') continue;
      const regions = n.children.filter((id) => (graph.nodes.get(id)?.children.length ?? 0) > 0);
      for (let i = 1; i < regions.length; i++) {
        hints.push({
          id: `__hint:${regions[i - 1]}->${regions[i]}`,
          sources: [regions[i - 1]!],
          targets: [regions[i]!],
        });
      }
    }
  }
  const edges: ElkExtendedEdge[] = graph.edges.map((e) => {
    const lines = e.parts.flatMap((p) => p.lines);
    return {
      id: e.id,
      sources: [e.source],
      targets: [e.target],
      labels: lines.length
        ? [
            {
              text: lines.join('\n'),
              width: Math.ceil(Math.max(...lines.map((l) => l.length)) * LABEL_PX + 6),
              height: lines.length * LABEL_LINE_H + 3,
            },
          ]
        : [],
    };
  });
  const input: ElkNode = {
    id: root.id,
    layoutOptions: {
      'elk.algorithm': 'layered',
      'elk.direction': 'DOWN',
      'elk.hierarchyHandling': 'INCLUDE_CHILDREN',
      'elk.json.edgeCoords': 'ROOT',
      'elk.json.shapeCoords': 'ROOT',
      'elk.edgeRouting': 'ORTHOGONAL',
      // The machine's declaration order is its reading order (connecting, open, awaitingAck,
      // …): transitions back up that order are the ones drawn upwards.
      'elk.layered.considerModelOrder.strategy': 'NODES_AND_EDGES',
      'elk.layered.cycleBreaking.strategy': 'MODEL_ORDER',
      'elk.layered.nodePlacement.strategy': 'BRANDES_KOEPF',
      'elk.layered.spacing.nodeNodeBetweenLayers': '28',
      'elk.layered.spacing.edgeNodeBetweenLayers': '12',
      'elk.spacing.nodeNode': '22',
      'elk.spacing.edgeNode': '10',
      'elk.spacing.edgeEdge': '7',
      'elk.spacing.edgeLabel': '3',
      'elk.edgeLabels.placement': 'CENTER',
      'elk.layered.mergeEdges': 'false',
      'elk.padding': '[top=30,left=14,bottom=14,right=14]',
      ...Object.fromEntries(Object.entries(tweaks).filter(([k]) => k.startsWith('elk.'))),
    },
    children: root.children.map((id) => toElk(graph.nodes.get(id)!)),
    edges: [...edges, ...hints],
  };
  const out = await elk.layout(input);
  const boxes: ChartLayout['boxes'] = new Map();
  const walk = (n: ElkNode) => {
    boxes.set(n.id, { x: n.x ?? 0, y: n.y ?? 0, width: n.width ?? 0, height: n.height ?? 0 });
    for (const c of n.children ?? []) walk(c);
  };
  walk(out);
  const edgeOut: ChartLayout['edges'] = new Map();
  const collect = (n: ElkNode) => {
    for (const e of (n.edges ?? []) as ElkExtendedEdge[]) {
      const points: Array<{ x: number; y: number }> = [];
      for (const s of e.sections ?? []) {
        points.push(s.startPoint, ...(s.bendPoints ?? []), s.endPoint);
      }
      const l = e.labels?.[0];
      edgeOut.set(e.id, {
        points,
        label:
          l && l.x !== undefined
            ? { x: l.x, y: l.y ?? 0, width: l.width ?? 0, height: l.height ?? 0 }
            : undefined,
      });
    }
    for (const c of n.children ?? []) collect(c);
  };
  collect(out);
  return { graph, width: out.width ?? 600, height: out.height ?? 400, boxes, edges: edgeOut };
}
