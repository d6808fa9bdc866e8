/**
 * What the visualizer shows, derived from the inspection stream alone (so it works the same
 * in the page and through the relay): per client, the state value, the transitions just
 * taken, a timeline of traffic (which envelope went over which transport, timeouts as they
 * fire, socket and HTTP outcomes, failures) and counters (in flight, queued, cursor per
 * channel, failures), and each channel subscription's state, read off the snapshots of the
 * connection actor's `subscription:<channel>` children (machines/subscription.ts).
 *
 * Traffic is read off the machine's own events: `SEND` commands to its `socket` child are
 * frames out over the socket, `FRAME` events into it are frames in; the `http` child's input
 * is the request out over HTTP and its done event carries the frames that came back;
 * `xstate.after.*` events are timeouts firing.
 */
import type { MicrostepTransition, SyncwireInspectionEvent } from './index.js';

export type ChartTransition = MicrostepTransition;

export interface TrafficEntry {
  /** Position in this client's timeline, from 1. */
  n: number;
  /** Milliseconds since the epoch. */
  at: number;
  kind: 'frame' | 'timeout' | 'socket' | 'http' | 'failure' | 'app';
  /** For frames: out of the client, or into it. */
  dir?: 'out' | 'in';
  via?: 'ws' | 'http';
  /** Envelope type for frames (`SYN`, `ACK`, `PNG`, `NAK`, `SUB`, `UNS`, `MSG`). */
  type?: string;
  id?: string | null;
  /** Short human text: the channel and seq of a MSG, a delay name, a close code. */
  detail?: string;
  /** The flat-ish state the client was in (the state value, shortened). */
  state?: string;
}

export interface Counters {
  /** The request on the wire: id, type, transport, number of operations. */
  inflight: { id: string; type: string; via: string; ops: number } | null;
  /** Outbox entries not yet sent. */
  queued: number;
  /** Highest seq seen per channel, with its epoch. */
  cursors: Record<string, { epoch: string; seq: number }>;
  failures: number;
  /** Failures by kind (`ack_timeout`, `close`, …). */
  failuresByKind: Record<string, number>;
  /** Timeouts fired, by delay name. */
  timeouts: Record<string, number>;
  framesOut: { ws: number; http: number };
  framesIn: { ws: number; http: number };
  missedPings: number;
}

export interface SessionState {
  /** Root session id: one per client. */
  sessionId: string;
  /** The client's id, once its machine said it. */
  clientId: string | undefined;
  /** The machine id (`connection`). */
  machine: string | undefined;
  value: unknown;
  status: string;
  /** Transitions taken in the last macrostep (what the last event did). */
  lastTransitions: ChartTransition[];
  /** The event that caused them. */
  lastEvent: string | undefined;
  timeline: TrafficEntry[];
  counters: Counters;
  /** The timeout T, from the machine's context. */
  timeout: number | undefined;
  /**
   * Each channel's subscription state (`unsubscribed`, `subscribing`, `subscribed`,
   * `resetting`, `refused`), with the error code it holds (why it was refused, or why its
   * last SUB failed), from its child actor `subscription` (system id `subscription:<channel>`).
   * `retrying`: it waits in its chart's `backoff` state for the SUB retry's delay.
   */
  subscriptions: Record<string, { state: string; error?: string; retrying?: true }>;
}

/** The id prefix of the per-channel children before S6D (now their id is `subscription`). */
const SUBSCRIPTION_PREFIX = 'subscription:';

interface ChildInfo {
  name: string;
  rootId: string;
}

const emptyCounters = (): Counters => ({
  inflight: null,
  queued: 0,
  cursors: {},
  failures: 0,
  failuresByKind: {},
  timeouts: {},
  framesOut: { ws: 0, http: 0 },
  framesIn: { ws: 0, http: 0 },
  missedPings: 0,
});

/** `{ degraded: { http: 'posting', … } }` → `degraded.http.posting, …` for the timeline. */
export function shortValue(value: unknown): string {
  if (typeof value === 'string') return value;
  if (!value || typeof value !== 'object') return '';
  return Object.entries(value as Record<string, unknown>)
    .map(([k, v]) => {
      const inner = shortValue(v);
      if (!inner) return k;
      return inner.includes(',') ? `${k}(${inner})` : `${k}.${inner}`;
    })
    .join(', ');
}

type Frame = {
  id?: string | null;
  type?: string;
  payload?: unknown;
  channel?: string;
  seq?: number;
  epoch?: string;
  replay?: boolean;
  echo?: boolean;
  error?: { code?: string };
};

function frameDetail(f: Frame): string | undefined {
  switch (f.type) {
    case 'MSG':
      return `${f.channel} #${f.seq}${f.replay ? ' replay' : ''}${f.echo ? ' echo' : ''}`;
    case 'NAK':
      return f.error?.code;
    case 'SYN':
      return Array.isArray(f.payload)
        ? `${f.payload.length} item${f.payload.length === 1 ? '' : 's'}`
        : undefined;
    case 'SUB': {
      const ch = (f.payload as { channels?: Record<string, unknown> } | undefined)?.channels;
      return ch ? Object.keys(ch).join(', ') : undefined;
    }
    default:
      return undefined;
  }
}

export interface InspectModelOptions {
  /** Timeline entries kept per client; the oldest go first. @default 500 */
  maxTimeline?: number;
}

/**
 * Folds the event stream into one `SessionState` per client. `push` every event; `onChange`
 * tells which client changed.
 */
export class InspectModel {
  readonly sessions = new Map<string, SessionState>();
  private readonly children = new Map<string, ChildInfo>();
  private readonly listeners = new Set<(session: SessionState, entries: TrafficEntry[]) => void>();
  private readonly maxTimeline: number;
  /** Transitions collected since the last snapshot of each root. */
  private readonly pendingSteps = new Map<string, { event: string; transitions: ChartTransition[] }>();

  constructor(options: InspectModelOptions = {}) {
    this.maxTimeline = options.maxTimeline ?? 500;
  }

  /** Called after each event that changed a session, with the timeline entries it added. */
  onChange(listener: (session: SessionState, added: TrafficEntry[]) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  private session(rootId: string): SessionState {
    let s = this.sessions.get(rootId);
    if (!s) {
      s = {
        sessionId: rootId,
        clientId: undefined,
        machine: undefined,
        value: undefined,
        status: 'active',
        lastTransitions: [],
        lastEvent: undefined,
        timeline: [],
        counters: emptyCounters(),
        timeout: undefined,
        // Keyed by channel name: no prototype, so `__proto__` or `toString` is a channel like any.
        subscriptions: Object.create(null),
      };
      this.sessions.set(rootId, s);
    }
    return s;
  }

  push(e: SyncwireInspectionEvent): void {
    const rootId = e.rootId ?? e.sessionId;
    const isRoot = e.sessionId === rootId;
    const s = this.session(rootId);
    const added: TrafficEntry[] = [];
    const at = Number(e.createdAt) || Date.now();
    const add = (entry: Omit<TrafficEntry, 'n' | 'at' | 'state'>) => {
      const last = s.timeline[s.timeline.length - 1];
      const full: TrafficEntry = { n: (last?.n ?? 0) + 1, at, state: shortValue(s.value), ...entry };
      s.timeline.push(full);
      added.push(full);
    };
    const countFrame = (dir: 'out' | 'in', via: 'ws' | 'http', f: Frame) => {
      (dir === 'out' ? s.counters.framesOut : s.counters.framesIn)[via]++;
      if (f.type === 'MSG' && typeof f.channel === 'string' && typeof f.seq === 'number' && f.epoch) {
        const c = s.counters.cursors[f.channel];
        // A new epoch means history was reset: the cursor restarts from what arrived.
        if (!c || c.epoch !== f.epoch || f.seq > c.seq)
          s.counters.cursors[f.channel] = { epoch: f.epoch, seq: f.seq };
      }
      add({ kind: 'frame', dir, via, type: f.type, id: f.id ?? null, detail: frameDetail(f) });
    };

    switch (e.type) {
      case '@xstate.actor': {
        if (isRoot) {
          s.machine = e.name;
          const input = e.snapshot.input as { clientId?: string; timeout?: number } | undefined;
          if (input?.clientId) s.clientId = input.clientId;
          if (typeof input?.timeout === 'number') s.timeout = input.timeout;
        } else this.children.set(e.sessionId, { name: e.name, rootId });
        break;
      }
      case '@xstate.event': {
        const ev = e.event as { type: string; [k: string]: any };
        const child = isRoot ? undefined : this.children.get(e.sessionId);
        if (!isRoot) {
          if (child?.name === 'socket' || (!child && ev.type === 'SEND' && ev.frame)) {
            if (ev.type === 'SEND' && ev.frame) countFrame('out', 'ws', ev.frame as Frame);
            else if (ev.type === 'DIAL') add({ kind: 'socket', detail: 'dial' });
            else if (ev.type === 'DROP') add({ kind: 'socket', detail: 'drop' });
          } else if (ev.type === 'xstate.init' && ev.input?.envelope) {
            countFrame('out', 'http', ev.input.envelope as Frame);
          }
          break;
        }
        if (ev.type === 'FRAME' && ev.frame) countFrame('in', 'ws', ev.frame as Frame);
        else if (ev.type === 'WS.OPEN') add({ kind: 'socket', detail: 'open' });
        else if (ev.type === 'WS.DOWN') {
          add({
            kind: 'socket',
            detail:
              `${ev.wasOpen ? 'closed' : 'dial failed'} ${ev.code ?? ''}${ev.reason ? ` ${ev.reason}` : ''}`.trim(),
          });
        } else if (ev.type === 'BAD_FRAME') add({ kind: 'failure', detail: `bad frame: ${ev.reason ?? ''}` });
        else if (ev.type.startsWith('xstate.after.')) {
          const rest = ev.type.slice('xstate.after.'.length);
          const dot = rest.indexOf('.');
          const delay = dot < 0 ? rest : rest.slice(0, dot);
          const state = dot < 0 ? '' : rest.slice(dot + 1).replace(/^[^.]+\./, '');
          s.counters.timeouts[delay] = (s.counters.timeouts[delay] ?? 0) + 1;
          add({ kind: 'timeout', type: delay, detail: state });
        } else if (ev.type.startsWith('xstate.done.actor.')) {
          const out = ev.output as
            | { kind?: string; frames?: Frame[]; status?: number; reason?: string }
            | undefined;
          if (out?.kind === 'reply') {
            if ((out.frames ?? []).length === 0)
              add({ kind: 'http', detail: `HTTP ${out.status ?? ''} (empty)` });
            for (const f of out.frames ?? []) countFrame('in', 'http', f);
          } else if (out?.kind === 'retry') {
            add({
              kind: 'http',
              detail: `retry: ${out.reason ?? ''}${out.status ? ` (${out.status})` : ''}`,
            });
          }
        } else if (ev.type.startsWith('xstate.error.actor.')) {
          const err = ev.error as { message?: string } | string | undefined;
          add({
            kind: 'http',
            detail: `error: ${typeof err === 'string' ? err : (err?.message ?? 'failed')}`,
          });
        } else if (ev.type === 'CLOSE') add({ kind: 'app', detail: 'close()' });
        break;
      }
      case '@xstate.microstep': {
        if (!isRoot) break;
        const p = this.pendingSteps.get(rootId);
        if (p && p.event === e.event.type) p.transitions.push(...e.transitions);
        else this.pendingSteps.set(rootId, { event: e.event.type, transitions: [...e.transitions] });
        break;
      }
      case '@xstate.snapshot': {
        if (!isRoot) {
          const child = this.children.get(e.sessionId);
          // `forgotten` is the final state an unsubscribed channel's actor is sent to when the
          // client drops it (machines/subscription.ts): the panel keeps showing `unsubscribed`.
          // `subscribing` and `resetting` are compound (`asking` | `backoff`, the SUB retry's
          // wait): the channel's state is the top-level name.
          const value = e.snapshot.value;
          const top =
            typeof value === 'string'
              ? value
              : value && typeof value === 'object'
                ? Object.keys(value)[0]
                : undefined;
          // The actor's id is `subscription` (machines/subscription.ts; `subscription:<channel>`
          // before S6D, still read): the channel is in its context.
          const ctxChannel = (e.snapshot.context as { channel?: unknown } | undefined)?.channel;
          const channel =
            child?.name === 'subscription' && typeof ctxChannel === 'string'
              ? ctxChannel
              : child?.name.startsWith(SUBSCRIPTION_PREFIX)
                ? child.name.slice(SUBSCRIPTION_PREFIX.length)
                : undefined;
          if (channel !== undefined && top !== undefined && top !== 'forgotten') {
            const prev =
              (Object.hasOwn(s.subscriptions, channel) ? s.subscriptions[channel]?.state : undefined) ??
              'unsubscribed';
            const error = (e.snapshot.context as { error?: { code?: string } | null } | undefined)?.error
              ?.code;
            const retrying = typeof value === 'object' && Object.values(value as object)[0] === 'backoff';
            s.subscriptions[channel] = {
              state: top,
              ...(error ? { error } : {}),
              ...(retrying ? { retrying: true as const } : {}),
            };
            if (prev !== top)
              add({
                kind: 'app',
                detail: `${channel}: ${prev} → ${top}${error ? ` (${error})` : ''}`,
              });
          }
          if (e.snapshot.status !== 'active') this.children.delete(e.sessionId);
          break;
        }
        s.value = e.snapshot.value;
        s.status = e.snapshot.status;
        const ctx = e.snapshot.context as
          | {
              clientId?: string;
              timeout?: number;
              queue?: unknown[];
              missedPings?: number;
              inflight?: {
                id: string;
                type: string;
                via: string;
                payload?: unknown;
                keys?: unknown[];
              } | null;
            }
          | undefined;
        if (ctx) {
          if (ctx.clientId) s.clientId = ctx.clientId;
          if (typeof ctx.timeout === 'number') s.timeout = ctx.timeout;
          s.counters.queued = Array.isArray(ctx.queue) ? ctx.queue.length : 0;
          s.counters.missedPings = ctx.missedPings ?? 0;
          const f = ctx.inflight;
          s.counters.inflight = f
            ? {
                id: f.id,
                type: f.type,
                via: f.via,
                ops: f.type === 'SYN' && Array.isArray(f.payload) ? f.payload.length : (f.keys?.length ?? 1),
              }
            : null;
        }
        const step = this.pendingSteps.get(rootId);
        // Targetless handlers (a MSG passing through, a SEND queued) leave the mark where it was.
        const taken =
          step && step.event === e.event.type ? step.transitions.filter((t) => t.targets.length > 0) : [];
        if (taken.length > 0) {
          s.lastTransitions = taken;
          s.lastEvent = e.event.type;
        }
        this.pendingSteps.delete(rootId);
        break;
      }
      case '@xstate.action': {
        const ev = (
          e.action.params as { event?: { type?: string; kind?: string; code?: number; reason?: string } }
        )?.event;
        if (ev?.type === 'failure' && ev.kind) {
          s.counters.failures++;
          s.counters.failuresByKind[ev.kind] = (s.counters.failuresByKind[ev.kind] ?? 0) + 1;
          add({
            kind: 'failure',
            type: ev.kind,
            detail: [ev.code, ev.reason].filter((x) => x !== undefined && x !== '').join(' '),
          });
        }
        break;
      }
    }
    if (s.timeline.length > this.maxTimeline) s.timeline.splice(0, s.timeline.length - this.maxTimeline);
    for (const l of this.listeners) l(s, added);
  }
}
