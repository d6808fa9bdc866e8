/**
 * The statechart as a graph, read from the machine's own definition (`machine.root`): one
 * node per state node, one edge per targeted transition (events, `after` delays, `always`,
 * invoke done/error), and the targetless ones listed inside their state. Nothing here is
 * drawn by hand, so when the chart changes the drawing follows.
 *
 * Edge keys are `source#eventType#index`, the same names `syncwire/inspect` gives the
 * transitions a client takes, which is how the live view finds the edge to light up.
 */

/** The parts of an XState v5 state node this walk reads. */
export interface StateNodeLike {
  id: string;
  key: string;
  type: 'atomic' | 'compound' | 'parallel' | 'final' | 'history';
  states: Record<string, StateNodeLike>;
  transitions: Map<string, TransitionLike[]>;
  always?: TransitionLike[];
  initial?: { target: StateNodeLike[] };
  entry: unknown[];
  exit: unknown[];
  invoke: Array<{ id: string; src: unknown }>;
  after: TransitionLike[];
}
interface TransitionLike {
  eventType: string;
  target?: StateNodeLike[] | undefined;
  guard?: unknown;
  actions: unknown[];
  reenter?: boolean;
  delay?: unknown;
}

export interface ChartNode {
  id: string;
  /** Short name: the state's key. */
  name: string;
  type: StateNodeLike['type'] | 'any';
  /** The initial child of its parent (drawn with the ● → marker). */
  initial: boolean;
  parent: string | null;
  children: string[];
  /** Small print inside the state: entry actions, invoked actors, targetless handlers. */
  lines: string[];
}

export type EdgeKind = 'event' | 'after' | 'always' | 'done' | 'error';

/** One transition on a drawn edge. */
export interface EdgePart {
  /** `source#eventType#index` (see `transitionKey` in syncwire/inspect). */
  key: string;
  /** `WS.DOWN`, `after ackTimeout`, `FRAME [isAckForInflight]`. */
  text: string;
  /** The same, as drawn: the guard on a line of its own keeps labels narrow. */
  lines: string[];
  kind: EdgeKind;
  /** Action names, for the tooltip. */
  actions: string[];
}

/**
 * One drawn arrow. Transitions between the same two states share it, one label line each:
 * the chart has about fifty transitions, and one arrow per pair keeps it readable.
 */
export interface ChartEdge {
  id: string;
  source: string;
  target: string;
  parts: EdgePart[];
  /** `after` when every part is a timeout (drawn dashed), and so on; else `event`. */
  kind: EdgeKind;
}

export interface ChartGraph {
  rootId: string;
  nodes: Map<string, ChartNode>;
  edges: ChartEdge[];
}

const nameOf = (x: unknown): string => {
  if (typeof x === 'string') return x;
  // Built-in actions (raise, sendTo, …) are functions carrying a `type`; named ones are strings.
  if (x && (typeof x === 'object' || typeof x === 'function')) {
    const t = (x as { type?: unknown }).type;
    if (typeof t === 'string') return t;
  }
  if (typeof x === 'function') return x.name || 'λ';
  return '?';
};

/** Actions that are the machine's plumbing (delays, invokes), not its behaviour. */
const plumbing = (name: string) => name.startsWith('xstate.');

/** `xstate.after.ackTimeout.connection.awaitingAck` → `after ackTimeout`, etc. */
export function eventLabel(eventType: string, delay?: unknown): { text: string; kind: EdgeKind } {
  if (eventType === '') return { text: 'always', kind: 'always' };
  if (eventType.startsWith('xstate.after.')) {
    const name = typeof delay === 'string' ? delay : eventType.slice('xstate.after.'.length).split('.')[0];
    return { text: `after ${name}`, kind: 'after' };
  }
  if (eventType.startsWith('xstate.done.actor.')) {
    return { text: `done ${shortActor(eventType.slice('xstate.done.actor.'.length))}`, kind: 'done' };
  }
  if (eventType.startsWith('xstate.error.actor.')) {
    return { text: `error ${shortActor(eventType.slice('xstate.error.actor.'.length))}`, kind: 'error' };
  }
  return { text: eventType, kind: 'event' };
}

/** Invoke ids default to `0.connection.degraded.http.posting`; show the state's key then. */
const shortActor = (id: string) => (/^\d+\./.test(id) ? (id.split('.').pop() ?? id) : id);

/** Walk a machine (`connectionMachine`, or any XState v5 machine) into a `ChartGraph`. */
export function chartGraph(machine: { root: unknown }): ChartGraph {
  const root = machine.root as StateNodeLike;
  const nodes = new Map<string, ChartNode>();
  const edges: ChartEdge[] = [];
  const initials = new Set<string>();

  const byPair = new Map<string, ChartEdge>();
  const addEdge = (source: string, target: string, part: EdgePart) => {
    const pair = `${source}->${target}`;
    let edge = byPair.get(pair);
    if (!edge) {
      edge = { id: pair, source, target, parts: [], kind: part.kind };
      byPair.set(pair, edge);
      edges.push(edge);
    } else if (edge.kind !== part.kind) edge.kind = 'event';
    edge.parts.push(part);
  };

  const handlerLine = (eventType: string, t: TransitionLike) => {
    const { text } = eventLabel(eventType, t.delay);
    const guard = t.guard ? ` [${nameOf(t.guard)}]` : '';
    const acts = t.actions.map(nameOf).filter((a) => !plumbing(a));
    return `${text}${guard}${acts.length ? ` / ${acts.join(', ')}` : ''}`;
  };

  const addTransitions = (
    node: StateNodeLike,
    eventType: string,
    list: TransitionLike[],
    lines: string[],
  ) => {
    list.forEach((t, index) => {
      const key = `${node.id}#${eventType}#${index}`;
      if (!t.target || t.target.length === 0) {
        lines.push(handlerLine(eventType, t));
        return;
      }
      const { text, kind } = eventLabel(eventType, t.delay);
      // An eventless transition is its guard: "[hasInflight]" says it all.
      const guard = t.guard ? `[${nameOf(t.guard)}]` : '';
      const drawn = kind === 'always' && guard ? [guard] : guard ? [text, guard] : [text];
      const actions = t.actions.map(nameOf).filter((a) => !plumbing(a));
      for (const target of t.target) {
        addEdge(node.id, target.id, { key, text: drawn.join(' '), lines: drawn, kind, actions });
      }
    });
  };

  const visit = (node: StateNodeLike, parent: string | null) => {
    const lines: string[] = [];
    const entry = node.entry.map(nameOf).filter((n) => !plumbing(n));
    if (entry.length) lines.push(`entry / ${entry.join(', ')}`);
    for (const inv of node.invoke)
      lines.push(`invoke ${typeof inv.src === 'string' ? inv.src : shortActor(inv.id)}`);
    const isRoot = parent === null;
    const chartNode: ChartNode = {
      id: node.id,
      name: node.key,
      type: node.type,
      initial: false,
      parent,
      children: [],
      lines,
    };
    // Initial states are marked on the node rather than drawn as pseudo-states: a dot and an
    // edge each cost the layout a layer.
    if (node.type === 'compound') for (const t of node.initial?.target ?? []) initials.add(t.id);
    if (initials.has(node.id)) chartNode.initial = true;
    nodes.set(node.id, chartNode);
    for (const [eventType, list] of node.transitions) addTransitions(node, eventType, list, lines);
    if (node.always?.length) addTransitions(node, '', node.always, lines);

    const childIds = Object.values(node.states).map((c) => c.id);
    chartNode.children.push(...childIds);
    for (const c of Object.values(node.states)) visit(c, node.id);

    if (isRoot) {
      // The root's own handlers apply in every state: shown as an "any state" note, and its
      // targeted transitions (CLOSE → closed) leave from that note.
      const anyId = `${node.id}.__any`;
      nodes.set(anyId, {
        id: anyId,
        name: 'in any state',
        type: 'any',
        initial: false,
        parent: node.id,
        children: [],
        lines,
      });
      chartNode.children.unshift(anyId);
      chartNode.lines = [];
      for (const e of edges) {
        if (e.source === node.id) {
          e.source = anyId;
          e.id = `${anyId}->${e.target}`;
        }
      }
    }
  };
  visit(root, null);
  return { rootId: root.id, nodes, edges };
}

/** The state node ids a snapshot value makes active, e.g. `{ open: 'idle' }` → root, open, open.idle. */
export function activeIds(rootId: string, value: unknown): Set<string> {
  const out = new Set<string>([rootId]);
  const walk = (prefix: string, v: unknown) => {
    if (typeof v === 'string') {
      out.add(`${prefix}.${v}`);
      return;
    }
    if (v && typeof v === 'object') {
      for (const [k, inner] of Object.entries(v as Record<string, unknown>)) {
        out.add(`${prefix}.${k}`);
        walk(`${prefix}.${k}`, inner);
      }
    }
  };
  walk(rootId, value);
  return out;
}
