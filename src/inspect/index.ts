/**
 * `syncwire/inspect`: the bridge from XState's inspection events to the visualizer.
 *
 * The client's `inspect` option receives XState `InspectionEvent`s, which hold live actor
 * references and snapshots with functions in them. This module turns each one into plain
 * JSON in the `@statelyai/inspect` event shape (`@xstate.actor`, `@xstate.event`,
 * `@xstate.snapshot`, plus `@xstate.microstep` for the transitions taken and `@xstate.action`
 * for what the machine emits), so the same stream feeds our visualizer, a visualizer in
 * another tab or process (through the relay, see `createInspectRelay`), or Stately's own
 * inspector. Browser-safe: the Node relay is loaded only when asked for.
 */
import type { InspectionEvent, Observer } from 'xstate';
import type { InspectRelay, InspectRelayOptions } from './relay.js';

export {
  type ChartTransition,
  type Counters,
  InspectModel,
  type SessionState,
  type TrafficEntry,
} from './model.js';
export type { InspectRelay, InspectRelayOptions } from './relay.js';

/**
 * The `@statelyai/inspect` event format these events follow (its `_version` field). Stately's
 * receivers only check that `_version` is a string; the number says which release's field
 * set we copied.
 */
export const STATELY_EVENT_VERSION = '0.7.0';

interface BaseEvent {
  /** Session id of the actor the event is about (the target, for `@xstate.event`). */
  sessionId: string;
  /** Session id of the root actor of its system: one per client. */
  rootId: string | undefined;
  /** Milliseconds since the epoch, as a string (as `@statelyai/inspect` sends it). */
  createdAt: string;
  /** Unique per event. */
  id: string;
  _version: string;
}

/** A snapshot, reduced to what survives JSON. */
export interface InspectedSnapshot {
  status: string;
  value?: unknown;
  context?: unknown;
  output?: unknown;
  error?: unknown;
  /** A promise actor's input (the HTTP request it carries). */
  input?: unknown;
  /** Child actor ids. */
  children?: string[];
}

export interface ActorEvent extends BaseEvent {
  type: '@xstate.actor';
  /** The actor's id (`socket`, `http`) or, for the root, the machine id (`connection`). */
  name: string;
  parentId: string | undefined;
  /** JSON of the machine config, as Stately's inspector expects it to draw the chart. */
  definition: string | undefined;
  snapshot: InspectedSnapshot;
}
export interface EventEvent extends BaseEvent {
  type: '@xstate.event';
  event: { type: string; [key: string]: unknown };
  /** Session id of the sender; undefined for events from outside (the client's `send`). */
  sourceId: string | undefined;
}
export interface SnapshotEvent extends BaseEvent {
  type: '@xstate.snapshot';
  event: { type: string; [key: string]: unknown };
  snapshot: InspectedSnapshot;
}
/** One transition taken, named the way the visualizer names the chart's edges. */
export interface MicrostepTransition {
  /** State node id of the source, e.g. `connection.awaitingAck`. */
  source: string;
  /** The event type the transition is keyed by; `''` for `always`. */
  eventType: string;
  /** Position among the source's transitions for that event (guards make several). */
  index: number;
  /** Target state node ids; empty for a targetless transition. */
  targets: string[];
}
/** syncwire's addition: which transitions a microstep took (Stately's receivers ignore it). */
export interface MicrostepEvent extends BaseEvent {
  type: '@xstate.microstep';
  event: { type: string; [key: string]: unknown };
  value: unknown;
  transitions: MicrostepTransition[];
}
/** syncwire's addition: an event the machine emitted (`failure`, `settled`) to the client. */
export interface ActionEvent extends BaseEvent {
  type: '@xstate.action';
  action: { type: string; params: unknown };
}

/** The events on the wire: the `@statelyai/inspect` three plus syncwire's two. */
export type SyncwireInspectionEvent = ActorEvent | EventEvent | SnapshotEvent | MicrostepEvent | ActionEvent;
/** The subset Stately's inspector understands. */
export type StatelyInspectionEvent = ActorEvent | EventEvent | SnapshotEvent;

export const isStatelyEvent = (e: SyncwireInspectionEvent): e is StatelyInspectionEvent =>
  e.type === '@xstate.actor' || e.type === '@xstate.event' || e.type === '@xstate.snapshot';

/** Whether a parsed message looks like an inspection event (a relay drops anything else). */
export function isInspectionEvent(value: unknown): value is SyncwireInspectionEvent {
  const v = value as { type?: unknown; sessionId?: unknown; _version?: unknown } | null;
  return (
    typeof v === 'object' &&
    v !== null &&
    typeof v.type === 'string' &&
    v.type.startsWith('@xstate.') &&
    typeof v.sessionId === 'string' &&
    typeof v._version === 'string'
  );
}

export interface SerializeOptions {
  /** Nesting depth kept in contexts and events; deeper values become `'[…]'`. @default 10 */
  depth?: number;
}

/**
 * A JSON-safe copy: functions dropped, `toJSON` honoured (actor refs become `{ id }`), cycles
 * and over-deep values cut, errors kept as `{ name, message }`.
 */
export function toJsonSafe(value: unknown, depth = 10): unknown {
  const ancestors: object[] = [];
  const walk = (v: unknown, d: number): unknown => {
    if (v === null || typeof v === 'string' || typeof v === 'boolean') return v;
    if (typeof v === 'number') return Number.isFinite(v) ? v : String(v);
    if (typeof v === 'bigint') return v.toString();
    if (typeof v === 'function' || typeof v === 'symbol' || v === undefined) return undefined;
    if (typeof v !== 'object') return undefined;
    if (ancestors.includes(v)) return '[Circular]';
    if (d <= 0) return '[…]';
    if (v instanceof Error) return { name: v.name, message: v.message };
    const withJson = v as { toJSON?: unknown };
    if (typeof withJson.toJSON === 'function' && !(v instanceof Date)) {
      ancestors.push(v);
      try {
        return walk((withJson.toJSON as () => unknown).call(v), d);
      } finally {
        ancestors.pop();
      }
    }
    if (v instanceof Date) return v.toISOString();
    ancestors.push(v);
    try {
      if (Array.isArray(v)) return v.map((x) => walk(x, d - 1) ?? null);
      if (v instanceof Map) return walk(Object.fromEntries(v), d);
      if (v instanceof Set) return walk([...v], d);
      if (
        typeof (globalThis as { Node?: unknown }).Node === 'function' &&
        v instanceof (globalThis as any).Node
      ) {
        return `[${(v as { nodeName?: string }).nodeName ?? 'Node'}]`;
      }
      const out: Record<string, unknown> = {};
      for (const key of Object.keys(v)) {
        const x = walk((v as Record<string, unknown>)[key], d - 1);
        if (x !== undefined) out[key] = x;
      }
      return out;
    } finally {
      ancestors.pop();
    }
  };
  return walk(value, depth);
}

type ActorRefish = {
  id: string;
  sessionId: string;
  system?: object;
  _parent?: { sessionId: string; system?: object };
  logic?: { config?: unknown };
  getSnapshot?: () => unknown;
};

function snapshotOf(snap: unknown, depth: number): InspectedSnapshot {
  if (!snap || typeof snap !== 'object') return { status: 'active' };
  const s = snap as Record<string, unknown>;
  const out: InspectedSnapshot = { status: typeof s.status === 'string' ? s.status : 'active' };
  // Pick fields rather than copy: machine snapshots also hold the machine and history nodes.
  if ('value' in s) out.value = toJsonSafe(s.value, depth);
  if (s.context !== undefined) out.context = toJsonSafe(s.context, depth);
  if (s.output !== undefined) out.output = toJsonSafe(s.output, depth);
  if (s.error !== undefined) out.error = toJsonSafe(s.error, depth);
  if (s.input !== undefined) out.input = toJsonSafe(s.input, depth);
  if (s.children && typeof s.children === 'object') out.children = Object.keys(s.children);
  return out;
}

function definitionOf(ref: ActorRefish): { name: string; definition: string } {
  const config = ref.logic?.config;
  let name = ref.id;
  if (config && typeof config === 'object') {
    if (name === ref.sessionId && typeof (config as { id?: unknown }).id === 'string') {
      name = (config as { id: string }).id;
    }
    const definition = JSON.stringify(config, (_key, value) =>
      typeof value === 'function' ? { type: value.name || 'anonymous' } : value,
    );
    return { name, definition };
  }
  return { name, definition: JSON.stringify({ id: name }) };
}

/** Name a transition taken the way the visualizer keys its edges (source, event, index). */
export function transitionKey(t: MicrostepTransition): string {
  return `${t.source}#${t.eventType}#${t.index}`;
}

function microstepTransition(t: any): MicrostepTransition {
  const source = t.source;
  const eventType: string = t.eventType ?? '';
  const list: unknown[] =
    eventType === '' ? (source?.always ?? []) : (source?.transitions?.get(eventType) ?? []);
  return {
    source: String(source?.id ?? '?'),
    eventType,
    index: Math.max(0, list.indexOf(t)),
    targets: Array.isArray(t.target) ? t.target.map((n: { id: string }) => n.id) : [],
  };
}

let eventCounter = 0;

/**
 * XState numbers sessions per actor system (`x:0`, `x:1`, …), so two clients, in one page or
 * in two processes, both have a root `x:0`. Each system gets a prefix unique to this load of
 * the module (random) and to the system (counter), which keeps sessions apart on a shared
 * relay.
 */
const loadToken = Math.random().toString(36).slice(2, 7);
let systems = 0;
const systemPrefix = new WeakMap<object, string>();
function sessionName(ref: { sessionId: string; system?: object } | undefined): string | undefined {
  if (!ref) return undefined;
  const system = ref.system;
  if (!system) return ref.sessionId;
  let prefix = systemPrefix.get(system);
  if (!prefix) {
    prefix = `${loadToken}${++systems}`;
    systemPrefix.set(system, prefix);
  }
  return `${prefix}/${ref.sessionId}`;
}

/**
 * Turn one XState inspection event into its JSON form, or `null` for the ones the visualizer
 * has no use for (`@xstate.transition`, and actions other than `emit`).
 */
export function serializeInspectionEvent(
  ev: InspectionEvent,
  options: SerializeOptions = {},
): SyncwireInspectionEvent | null {
  const depth = options.depth ?? 10;
  const ref = ev.actorRef as unknown as ActorRefish;
  const sessionId = sessionName(ref)!;
  const prefix = sessionId.slice(0, sessionId.length - ref.sessionId.length);
  const base: BaseEvent = {
    sessionId,
    rootId: ev.rootId === undefined ? undefined : `${prefix}${ev.rootId}`,
    createdAt: String(Date.now()),
    id: `${sessionId}#${++eventCounter}`,
    _version: STATELY_EVENT_VERSION,
  };
  const eventOf = (e: unknown) => toJsonSafe(e, depth) as { type: string };
  switch (ev.type) {
    case '@xstate.actor': {
      const { name, definition } = definitionOf(ref);
      // The actor is still being constructed: no snapshot yet, so report its input instead.
      const input = (ref as { options?: { input?: unknown } }).options?.input;
      const snapshot: InspectedSnapshot = { status: 'active' };
      if (input !== undefined) snapshot.input = toJsonSafe(input, depth);
      return {
        ...base,
        type: '@xstate.actor',
        name,
        parentId: sessionName(ref._parent),
        definition,
        snapshot,
      };
    }
    case '@xstate.event':
      return {
        ...base,
        type: '@xstate.event',
        event: eventOf(ev.event),
        sourceId: sessionName(ev.sourceRef as unknown as ActorRefish | undefined),
      };
    case '@xstate.snapshot':
      return {
        ...base,
        type: '@xstate.snapshot',
        event: eventOf(ev.event),
        snapshot: snapshotOf(ev.snapshot, depth),
      };
    case '@xstate.microstep':
      return {
        ...base,
        type: '@xstate.microstep',
        event: eventOf(ev.event),
        value: toJsonSafe((ev.snapshot as { value?: unknown }).value, depth),
        transitions: ev._transitions.map(microstepTransition),
      };
    case '@xstate.action': {
      if (ev.action.type !== 'xstate.emit') return null;
      return {
        ...base,
        type: '@xstate.action',
        action: { type: ev.action.type, params: toJsonSafe(ev.action.params, depth) },
      };
    }
    default:
      return null;
  }
}

/** Listener or observer of serialized events. */
export type InspectionListener =
  | ((event: SyncwireInspectionEvent) => void)
  | Partial<Observer<SyncwireInspectionEvent>>;

/**
 * Recent events for late subscribers. Actor registrations are kept apart from the ring so a
 * viewer that connects late still learns every live actor, however much traffic went by.
 */
export class ReplayBuffer {
  private readonly actors = new Map<string, SyncwireInspectionEvent>();
  private readonly recent: SyncwireInspectionEvent[] = [];
  /** Latest snapshot per session, so a late viewer draws the current state at once. */
  private readonly snapshots = new Map<string, SyncwireInspectionEvent>();

  constructor(private readonly size: number) {}

  push(e: SyncwireInspectionEvent): void {
    if (e.type === '@xstate.actor') {
      this.actors.set(e.sessionId, e);
      return;
    }
    if (e.type === '@xstate.snapshot') {
      const done = e.snapshot.status !== 'active';
      if (done) {
        // A finished actor will send nothing more: forget it, unless it is a root (keep its end).
        if (e.rootId !== e.sessionId) {
          this.actors.delete(e.sessionId);
          this.snapshots.delete(e.sessionId);
        } else this.snapshots.set(e.sessionId, e);
      } else this.snapshots.set(e.sessionId, e);
    }
    this.recent.push(e);
    if (this.recent.length > this.size) this.recent.splice(0, this.recent.length - this.size);
  }

  /** What a new subscriber should see first, in an order that makes sense on its own. */
  replay(): SyncwireInspectionEvent[] {
    if (this.size === 0) return [...this.actors.values()];
    const inRing = new Set(this.recent);
    const first = [...this.actors.values()];
    // Snapshots that fell out of the ring go right after the registrations.
    for (const s of this.snapshots.values()) if (!inRing.has(s)) first.push(s);
    return [...first, ...this.recent];
  }
}

export interface InspectorOptions extends SerializeOptions {
  /** Events kept for subscribers that come late (a visualizer mounted after the client). @default 2000 */
  bufferSize?: number;
}

export interface Inspector {
  /** Pass this as the client's `inspect` option. */
  readonly inspect: Observer<InspectionEvent>;
  /**
   * Receive every serialized event: first the buffered ones, then live ones. Returns an
   * unsubscribe function.
   */
  subscribe(listener: InspectionListener): () => void;
  /** Stop buffering and drop listeners. */
  stop(): void;
}

const toFn = (l: InspectionListener) =>
  typeof l === 'function' ? l : (e: SyncwireInspectionEvent) => l.next?.(e);

/**
 * An inspector for the same page (or process): hand its `inspect` to `createSyncClient` and
 * `subscribe` the visualizer to it. Several clients may share one inspector; each is its own
 * session (`rootId`).
 */
export function createInspector(options: InspectorOptions = {}): Inspector {
  const buffer = new ReplayBuffer(options.bufferSize ?? 2000);
  const listeners = new Set<(e: SyncwireInspectionEvent) => void>();
  let stopped = false;
  return {
    inspect: {
      next(ev) {
        if (stopped) return;
        const e = serializeInspectionEvent(ev, options);
        if (!e) return;
        buffer.push(e);
        for (const l of listeners) {
          try {
            l(e);
          } catch (err) {
            // A broken viewer must not break the client it watches.
            console.error('syncwire/inspect: a listener threw', err);
          }
        }
      },
    },
    subscribe(listener) {
      const fn = toFn(listener);
      for (const e of buffer.replay()) fn(e);
      listeners.add(fn);
      return () => listeners.delete(fn);
    },
    stop() {
      stopped = true;
      listeners.clear();
    },
  };
}

/** Any WebSocket with the browser's shape (the browser's own, or `ws` in Node). */
export interface RelaySocket {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: unknown) => void) | null;
  onclose: ((ev: unknown) => void) | null;
  onerror: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
}
export type RelaySocketConstructor = new (url: string) => RelaySocket;

export interface RelayInspectorOptions extends SerializeOptions {
  /** The relay's WebSocket URL, e.g. `ws://127.0.0.1:4300/inspect`. */
  url: string;
  /** WebSocket implementation. @default globalThis.WebSocket, else the `ws` package (Node) */
  WebSocket?: RelaySocketConstructor;
  /** Events held while the relay is unreachable; the oldest go first. @default 2000 */
  maxPending?: number;
  /** Delay before dialling the relay again after it went away, in milliseconds. @default 1000 */
  retryMs?: number;
}

export interface RelayInspector {
  /** Pass this as the client's `inspect` option. */
  readonly inspect: Observer<InspectionEvent>;
  /** Close the connection to the relay; events are dropped from then on. */
  stop(): void;
}

/** Load `ws` only in Node, behind a specifier bundlers do not follow. */
async function nodeWebSocket(): Promise<RelaySocketConstructor> {
  const spec = 'ws';
  const mod = (await import(/* @vite-ignore */ spec)) as { WebSocket?: unknown; default?: unknown };
  return (mod.WebSocket ?? mod.default) as RelaySocketConstructor;
}

/**
 * An inspector that streams to a relay (`createInspectRelay`) over a WebSocket, so a client in
 * another process or tab can be watched. One JSON event per text frame: the wire of
 * `@statelyai/inspect`'s WebSocket inspector, so Stately's `createInspectorServer` works as
 * the relay too.
 */
export function createRelayInspector(options: RelayInspectorOptions): RelayInspector {
  const maxPending = options.maxPending ?? 2000;
  const retryMs = options.retryMs ?? 1000;
  // The relay replays actor registrations to late viewers; we re-send them on every reconnect
  // because a restarted relay has forgotten them.
  const registrations = new Map<string, string>();
  /** Each root's latest snapshot, so a restarted relay can draw the state before the next change. */
  const latest = new Map<string, string>();
  let pending: string[] = [];
  let socket: RelaySocket | null = null;
  let open = false;
  let stopped = false;
  let timer: ReturnType<typeof setTimeout> | undefined;

  const connect = async () => {
    if (stopped) return;
    let Ctor = options.WebSocket ?? (globalThis as { WebSocket?: RelaySocketConstructor }).WebSocket;
    if (!Ctor) {
      try {
        Ctor = await nodeWebSocket();
      } catch (err) {
        console.error('syncwire/inspect: no WebSocket implementation; pass options.WebSocket', err);
        return;
      }
    }
    if (stopped) return;
    let ws: RelaySocket;
    try {
      ws = new Ctor(options.url);
    } catch {
      return retry();
    }
    socket = ws;
    ws.onopen = () => {
      open = true;
      const queued = pending;
      pending = [];
      const sent = new Set<string>();
      const queuedSet = new Set(queued);
      for (const msg of [...registrations.values(), ...latest.values()]) {
        if (queuedSet.has(msg)) continue; // it goes below, in its place
        ws.send(msg);
        sent.add(msg);
      }
      for (const msg of queued) if (!sent.has(msg)) ws.send(msg);
    };
    ws.onclose = () => {
      if (socket !== ws) return;
      open = false;
      socket = null;
      retry();
    };
    ws.onerror = () => {
      // The close event follows; it schedules the retry.
    };
    ws.onmessage = null;
  };
  const retry = () => {
    if (stopped || timer) return;
    timer = setTimeout(() => {
      timer = undefined;
      void connect();
    }, retryMs);
  };
  void connect();

  return {
    inspect: {
      next(ev) {
        if (stopped) return;
        const e = serializeInspectionEvent(ev, options);
        if (!e) return;
        const msg = JSON.stringify(e);
        if (e.type === '@xstate.actor') registrations.set(e.sessionId, msg);
        else if (e.type === '@xstate.snapshot') {
          if (e.rootId === e.sessionId) latest.set(e.sessionId, msg);
          else if (e.snapshot.status !== 'active') registrations.delete(e.sessionId);
        }
        if (open && socket) {
          try {
            socket.send(msg);
            return;
          } catch {
            // Fall through to the queue; the close event reconnects.
          }
        }
        pending.push(msg);
        if (pending.length > maxPending) pending.splice(0, pending.length - maxPending);
      },
    },
    stop() {
      stopped = true;
      if (timer) clearTimeout(timer);
      const ws = socket;
      socket = null;
      open = false;
      try {
        ws?.close(1000, 'inspector stopped');
      } catch {
        // Closing a socket that never opened throws in some implementations.
      }
    },
  };
}

/**
 * Start a relay (Node only): producers (`createRelayInspector`, or Stately's WebSocket
 * inspector) send events, and every other connection (visualizer pages) receives them, with
 * a replay of recent events on connect. Resolves once listening.
 */
export async function createInspectRelay(options: InspectRelayOptions = {}): Promise<InspectRelay> {
  // Loaded lazily, behind a specifier bundlers do not follow, so this module stays browser-safe.
  const spec = './relay.js';
  const mod = (await import(/* @vite-ignore */ spec)) as typeof import('./relay.js');
  return mod.startInspectRelay(options);
}

/** Combine observers: e.g. our visualizer and Stately's `createBrowserInspector().inspect`. */
export function combineInspectors(
  ...observers: Array<Observer<InspectionEvent> | ((event: InspectionEvent) => void)>
): Observer<InspectionEvent> {
  return {
    next(ev) {
      for (const o of observers) {
        try {
          if (typeof o === 'function') o(ev);
          else o.next?.(ev);
        } catch (err) {
          console.error('syncwire/inspect: an inspector threw', err);
        }
      }
    },
  };
}
