/**
 * In-process stand-ins for what a real peer cannot be made to do on cue: a WebSocket whose
 * open, frames and close the test triggers, a fetch whose answers the test writes, and a
 * clock whose timers the test fires one by one. Used by the model-based suite only; every
 * other suite talks to a real server on 127.0.0.1.
 */
import type { AnyActorRef } from 'xstate';
import type { WebSocketLike } from '../../src/client/transports.js';

export class FakeWebSocket implements WebSocketLike {
  static instances: FakeWebSocket[] = [];
  readyState = 0;
  sent: Array<{ id: string; type: string; payload?: unknown }> = [];
  onopen: ((ev: unknown) => void) | null = null;
  onclose: ((ev: { code: number; reason: string }) => void) | null = null;
  onerror: ((ev: unknown) => void) | null = null;
  onmessage: ((ev: { data: unknown }) => void) | null = null;
  closedByClient = false;

  constructor(readonly url: string) {
    FakeWebSocket.instances.push(this);
  }
  static latest(): FakeWebSocket {
    const ws = FakeWebSocket.instances.at(-1);
    if (!ws) throw new Error('no socket was dialled');
    return ws;
  }
  send(data: string): void {
    if (this.readyState !== 1) throw new Error('send on a socket that is not open');
    this.sent.push(JSON.parse(data));
  }
  close(): void {
    this.closedByClient = true;
    this.readyState = 3;
  }
  /** The server accepted the connection. */
  open(): void {
    this.readyState = 1;
    this.onopen?.({});
  }
  /** A frame from the server. */
  receive(frame: unknown): void {
    this.onmessage?.({ data: typeof frame === 'string' ? frame : JSON.stringify(frame) });
  }
  /** The connection died (error then close, as browsers report it). */
  drop(code = 1006, reason = ''): void {
    this.readyState = 3;
    this.onerror?.({});
    this.onclose?.({ code, reason });
  }
}

interface PendingFetch {
  body: { id: string; type: string; payload?: unknown };
  resolve(res: Response): void;
  reject(err: Error): void;
}

/** A fetch that parks every request until the test answers it. */
export class FakeFetch {
  pending: PendingFetch[] = [];
  requests: PendingFetch['body'][] = [];
  readonly fetch = (_url: string | URL | Request, init?: RequestInit): Promise<Response> =>
    new Promise((resolve, reject) => {
      const body = JSON.parse(String(init?.body));
      this.requests.push(body);
      const entry = { body, resolve, reject };
      this.pending.push(entry);
      init?.signal?.addEventListener('abort', () => {
        this.pending = this.pending.filter((p) => p !== entry);
        reject(new DOMException('aborted', 'AbortError'));
      });
    });
  latest(): PendingFetch {
    const p = this.pending.at(-1);
    if (!p) throw new Error('no HTTP request is pending');
    return p;
  }
  /** Answer the latest request with 200 and these envelopes. */
  reply(frames: unknown[]): void {
    const p = this.latest();
    this.pending = this.pending.filter((x) => x !== p);
    p.resolve(new Response(JSON.stringify(frames), { status: 200 }));
  }
  status(status: number, headers: Record<string, string> = {}, body = ''): void {
    const p = this.latest();
    this.pending = this.pending.filter((x) => x !== p);
    p.resolve(new Response(body, { status, headers }));
  }
  networkError(): void {
    const p = this.latest();
    this.pending = this.pending.filter((x) => x !== p);
    p.reject(new TypeError('fetch failed'));
  }
}

interface Timer {
  id: number;
  fn: () => void;
  due: number;
}

/**
 * A clock whose timers fire only when the test says which one. XState's scheduler records
 * each delayed event just before asking the clock for a timer, and forgets it when the timer
 * is cleared or fires, so live timers and scheduled events pair up in order: that is how a
 * test fires "ackTimeout" by name.
 */
export class ModelClock {
  now = 0;
  private nextId = 1;
  readonly timers = new Map<number, Timer>();
  actor?: AnyActorRef;

  setTimeout(fn: () => void, timeout: number): number {
    const id = this.nextId++;
    this.timers.set(id, { id, fn, due: this.now + timeout });
    return id;
  }
  clearTimeout(id: number): void {
    this.timers.delete(id);
  }
  /** Pending timers with the event each delivers. */
  pending(): Array<Timer & { eventType: string; delay: number }> {
    if (!this.actor) throw new Error('ModelClock: attach the actor first');
    const scheduled = Object.values(
      (
        this.actor.system.getSnapshot() as {
          _scheduledEvents: Record<string, { event: { type: string }; delay: number }>;
        }
      )._scheduledEvents,
    );
    const timers = [...this.timers.values()];
    if (scheduled.length !== timers.length) {
      throw new Error(`ModelClock: ${timers.length} timers but ${scheduled.length} scheduled events`);
    }
    return timers.map((t, i) => ({ ...t, eventType: scheduled[i]!.event.type, delay: scheduled[i]!.delay }));
  }
  /** Fire the pending timer that delivers `eventType`; returns the delay it was set with. */
  fire(eventType: string): number {
    const t = this.pending().find((x) => x.eventType === eventType);
    if (!t) {
      throw new Error(
        `no pending timer for ${eventType}; pending: ${this.pending()
          .map((p) => p.eventType)
          .join(', ')}`,
      );
    }
    this.timers.delete(t.id);
    this.now = Math.max(this.now, t.due);
    t.fn();
    return t.delay;
  }
}

/** Let promise callbacks (fetch answers, actor done events) run. Not a sleep: no timer. */
export async function flush(rounds = 5): Promise<void> {
  for (let i = 0; i < rounds; i++) await new Promise<void>((r) => setImmediate(r));
}
