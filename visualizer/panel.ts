/**
 * One client's view: its live chart, counters and traffic timeline, fed by the
 * `InspectModel` of `syncwire/inspect`. Plain DOM; the playground and the relay page both
 * build their screens out of these.
 */
import { flatState } from '../machines/connection.js';
import { SUBSCRIPTION_STATES } from '../machines/subscription.js';
import { transitionKey } from '../src/inspect/index.js';
import type { SessionState, TrafficEntry } from '../src/inspect/model.js';
import { type ChartLayout, type ChartView, renderChart } from './chart.js';
import { eventLabel } from './graph.js';

export interface PanelOptions {
  /** Heading; the client id is shown beside it. @default 'client' */
  title?: string;
  /** Timeline rows kept in the page. @default 200 */
  maxRows?: number;
}

export interface ClientPanel {
  readonly element: HTMLElement;
  readonly chart: ChartView;
  /** Redraw from the session; `added` are the timeline entries new since the last call. */
  update(session: SessionState, added: TrafficEntry[]): void;
}

/** Make an element: `h('div', { class: 'x' }, child, 'text')`. Shared with the playground. */
export function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs: Record<string, string> = {},
  ...children: Array<Node | string>
): HTMLElementTagNameMap[K] {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'class') e.className = v;
    else e.setAttribute(k, v);
  }
  e.append(...children);
  return e;
}

const ARROW = { out: 'out →', in: 'in  ←' } as const;

function rowFor(e: TrafficEntry, t0: number, keepalive: boolean): HTMLTableRowElement {
  const time = `+${((e.at - t0) / 1000).toFixed(3)}s`;
  const tr = h('tr', {
    class: `tl tl-${e.kind}${e.dir ? ` tl-${e.dir}` : ''}${keepalive ? ' tl-keepalive' : ''}`,
    'data-kind': e.kind,
  });
  if (e.dir) tr.dataset.dir = e.dir;
  if (e.via) tr.dataset.via = e.via;
  if (e.type) tr.dataset.type = e.type;
  if (e.id) tr.dataset.id = e.id;
  let what: string;
  let badge = '';
  switch (e.kind) {
    case 'frame':
      badge = e.via ?? '';
      what = `${ARROW[e.dir ?? 'out']} ${e.type ?? '?'}`;
      break;
    case 'timeout':
      what = `timeout ${e.type}`;
      break;
    case 'socket':
      badge = 'ws';
      what = 'socket';
      break;
    case 'http':
      badge = 'http';
      what = 'http';
      break;
    case 'failure':
      what = `failure ${e.type ?? ''}`;
      break;
    default:
      what = e.kind;
  }
  tr.append(
    h('td', { class: 'tl-time' }, time),
    h('td', { class: 'tl-via' }, badge ? h('span', { class: `via via-${badge}` }, badge) : ''),
    h('td', { class: 'tl-what' }, what),
    h('td', { class: 'tl-id' }, e.id ?? ''),
    h('td', { class: 'tl-detail' }, e.detail ?? ''),
    h('td', { class: 'tl-state', title: e.state ?? '' }, e.state ?? ''),
  );
  return tr;
}

/** Build a panel around a freshly rendered chart of `layout`. */
export function createClientPanel(layout: ChartLayout, options: PanelOptions = {}): ClientPanel {
  const maxRows = options.maxRows ?? 200;
  const chart = renderChart(layout);
  const stateBadge = h('span', { class: 'state-badge', 'data-testid': 'state' }, '…');
  const clientLabel = h('span', { class: 'client-id', 'data-testid': 'client-id' }, '');
  const lastEvent = h('span', { class: 'last-event', 'data-testid': 'last-event' }, '');
  // States flash by at short timeouts: the trail keeps the last few in view.
  const trail = h('div', { class: 'trail', 'data-testid': 'trail' });
  const counters = h('dl', { class: 'counters', 'data-testid': 'counters' });
  // One row per channel: the subscription chart's states (machines/subscription.ts), the
  // current one lit.
  const subscriptions = h('table', { class: 'subscriptions', 'data-testid': 'subscriptions' });
  const hidePings = h('input', { type: 'checkbox', 'data-testid': 'hide-pings' }) as HTMLInputElement;
  const zoom = h(
    'button',
    { type: 'button', class: 'zoom', title: 'fit to width / actual size', 'aria-pressed': 'false' },
    '1:1',
  );
  const tbody = h('tbody');
  const table = h(
    'table',
    { class: 'timeline', 'data-testid': 'timeline' },
    h(
      'thead',
      {},
      h('tr', {}, ...['time', 'via', 'what', 'id', 'detail', 'state'].map((c) => h('th', {}, c))),
    ),
    tbody,
  );
  const element = h(
    'section',
    { class: 'panel' },
    h(
      'header',
      { class: 'panel-head' },
      h('h2', {}, options.title ?? 'client'),
      clientLabel,
      stateBadge,
      lastEvent,
      zoom,
    ),
    trail,
    h('div', { class: 'chart-wrap' }, chart.svg),
    counters,
    subscriptions,
    h(
      'div',
      { class: 'timeline-head' },
      h('h3', {}, 'traffic'),
      h('label', { title: 'PNG/ACK pairs and the keepalive and poll timers' }, hidePings, ' hide keepalive'),
    ),
    h('div', { class: 'timeline-wrap' }, table),
  );
  hidePings.addEventListener('change', () => element.classList.toggle('hide-keepalive', hidePings.checked));
  zoom.addEventListener('click', () => {
    const actual = element.classList.toggle('actual-size');
    zoom.setAttribute('aria-pressed', String(actual));
    zoom.textContent = actual ? 'fit' : '1:1';
  });

  let t0: number | undefined;
  let marked: SessionState['lastTransitions'] | undefined;
  const pingIds = new Set<string>();
  const setCounters = (s: SessionState) => {
    const c = s.counters;
    const inflight = c.inflight
      ? `${c.inflight.type} ${c.inflight.id} via ${c.inflight.via} (${c.inflight.ops})`
      : '—';
    const cursors = Object.entries(c.cursors)
      .map(([ch, v]) => `${ch} #${v.seq}`)
      .join(', ');
    const failures = Object.entries(c.failuresByKind)
      .map(([k, n]) => `${k} ${n}`)
      .join(', ');
    const timeouts = Object.entries(c.timeouts)
      .map(([k, n]) => `${k} ${n}`)
      .join(', ');
    const items: Array<[string, string, string]> = [
      ['in flight', inflight, 'inflight'],
      ['queued', String(c.queued), 'queued'],
      ['cursor', cursors || '—', 'cursors'],
      ['failures', `${c.failures}${failures ? ` (${failures})` : ''}`, 'failures'],
      ['timeouts', timeouts || '—', 'timeouts'],
      [
        'frames',
        `out ws ${c.framesOut.ws} · http ${c.framesOut.http} / in ws ${c.framesIn.ws} · http ${c.framesIn.http}`,
        'frames',
      ],
    ];
    counters.replaceChildren(
      ...items.flatMap(([k, v, id]) => [h('dt', {}, k), h('dd', { 'data-counter': id }, v)]),
    );
  };

  let shownSubscriptions = '';
  const setSubscriptions = (s: SessionState) => {
    const key = JSON.stringify(s.subscriptions);
    if (key === shownSubscriptions) return;
    shownSubscriptions = key;
    const rows = Object.entries(s.subscriptions)
      .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))
      .map(([channel, sub]) =>
        h(
          'tr',
          {
            'data-channel': channel,
            'data-sub-state': sub.state,
            ...(sub.retrying ? { 'data-sub-retrying': 'true' } : {}),
          },
          h('th', { scope: 'row' }, channel),
          ...SUBSCRIPTION_STATES.map((state) =>
            h(
              'td',
              { class: state === sub.state ? 'sub-state current' : 'sub-state', 'data-state': state },
              state === sub.state && sub.error
                ? `${state} (${sub.error}${sub.retrying ? ', retry wait' : ''})`
                : state,
            ),
          ),
        ),
      );
    subscriptions.replaceChildren(...(rows.length ? [h('caption', {}, 'channels'), ...rows] : []));
  };

  return {
    element,
    chart,
    update(s, added) {
      const flat = s.value === undefined ? 'connecting' : flatState({ value: s.value, status: s.status });
      if (stateBadge.textContent !== flat) {
        stateBadge.textContent = flat;
        stateBadge.dataset.state = flat;
        element.dataset.state = flat;
        const step = h('span', { class: 'trail-step', 'data-state': flat }, flat);
        step.title = new Date().toLocaleTimeString();
        trail.append(step);
        while (trail.childElementCount > 12) trail.firstElementChild?.remove();
      }
      if (s.clientId && clientLabel.textContent !== s.clientId) clientLabel.textContent = s.clientId;
      if (s.value !== undefined) chart.setValue(s.value);
      if (s.lastTransitions !== marked) {
        marked = s.lastTransitions;
        chart.markTransitions(marked.map(transitionKey));
      }
      lastEvent.textContent = s.lastEvent ? `last: ${eventLabel(s.lastEvent).text}` : '';
      setCounters(s);
      setSubscriptions(s);
      if (added.length) {
        t0 ??= added[0]!.at;
        const rows = added.map((e) => {
          let keepalive = e.kind === 'timeout' && (e.type === 'keepalive' || e.type === 'pollInterval');
          if (e.kind === 'frame' && e.type === 'PNG' && e.id) {
            pingIds.add(e.id);
            keepalive = true;
          } else if (e.kind === 'frame' && e.type === 'ACK' && e.id && pingIds.has(e.id)) {
            pingIds.delete(e.id);
            keepalive = true;
          }
          return rowFor(e, t0!, keepalive);
        });
        // Newest first, so the latest traffic is in view without scrolling.
        tbody.prepend(...rows.reverse());
        while (tbody.rows.length > maxRows) tbody.lastElementChild?.remove();
        if (pingIds.size > 1000) pingIds.clear();
      }
    },
  };
}
