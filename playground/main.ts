/**
 * The playground page: a list several people edit, kept on the server and shared through
 * the channel `list`. Clients A and B sit side by side, each with its live chart and
 * traffic; fault buttons break one client's transports; client C joins late and replays the
 * history. Everything runs in this page with the browser's own WebSocket and fetch.
 *
 * `?T=300` shortens the timeout T (the browser tests use it).
 */
import '../visualizer/style.css';
import '../visualizer/page.css';
import './playground.css';
import { createSyncClient, type SyncClient } from '../src/client/index.js';
import { createInspector } from '../src/inspect/index.js';
import { mountVisualizer } from '../visualizer/index.js';
import { h } from '../visualizer/panel.js';
import type { ListChange, ListItem, ListOp } from './server.js';

interface Config {
  syncUrl: string;
  relayUrl: string;
  timeout: number;
  dbFile: string;
}

const cfg = (await (await fetch('../config.json', { cache: 'no-store' })).json()) as Config;
const params = new URLSearchParams(location.search);
const T = Number(params.get('T')) > 0 ? Number(params.get('T')) : cfg.timeout;

const clientsEl = document.getElementById('clients')!;
const notice = document.getElementById('notice')!;
document.querySelector<HTMLElement>('[data-testid="server-info"]')!.textContent =
  `server ${cfg.syncUrl} · SQLite ${cfg.dbFile.split(/[\\/]/).slice(-2).join('/')} · T = ${T} ms`;

const say = (text: string) => {
  notice.textContent = text;
  notice.hidden = false;
};

const inspector = createInspector();
/** Panel placement: each client's chart goes under its own list, found by client id. */
const columns = new Map<string, HTMLElement>();
const viz = await mountVisualizer(clientsEl, inspector, {
  place: (s) => {
    const col = s.clientId ? columns.get(s.clientId) : undefined;
    return col ? { parent: col, title: 'statechart & traffic' } : null;
  },
});

const FAULTS = [
  ['dropAcks', 'drop ACKs'],
  ['blackhole', 'stop answering'],
  ['blockHttp', 'block HTTP'],
] as const;

type ListClient = SyncClient<ListOp, { ok: boolean; seq?: number; changes?: ListChange[] }>;

function addClient(name: string, note: string): ListClient {
  const clientId = `${name}-${Math.random().toString(36).slice(2, 8)}`;
  const column = h('section', { class: 'client', 'data-client': name });
  columns.set(clientId, column);

  // The README's pattern: the list is the snapshot plus every change of changes$, in order.
  const items = new Map<string, ListItem>();
  const list = h('ul', { 'data-testid': 'items' });
  const status = h('div', { class: 'status', 'data-testid': 'status' });
  const snapshotInfo = h('div', { class: 'status', 'data-testid': 'snapshot' });
  const input = h('input', {
    type: 'text',
    placeholder: 'add an item…',
    'data-testid': 'new-item',
    maxlength: '200',
  });
  const form = h('form', {}, input, h('button', { type: 'submit', 'data-testid': 'add' }, 'Add'));
  const pending = new Set<string>();
  const faults = h('div', { class: 'faults' }, h('span', { class: 'label' }, 'faults:'));
  column.append(
    h(
      'div',
      { class: 'app' },
      h('h2', {}, `Client ${name}`, h('small', {}, `${clientId} · ${note}`)),
      form,
      list,
      faults,
      status,
      snapshotInfo,
    ),
  );
  clientsEl.append(column);

  const client: ListClient = createSyncClient({
    url: cfg.syncUrl,
    clientId,
    timeout: T,
    channels: { list: { snapshot: true } },
    inspect: inspector.inspect,
  });

  const render = () => {
    const rows = [...items.values()].map((item) =>
      h(
        'li',
        {
          'data-testid': 'item',
          'data-id': item.id,
          'data-done': String(item.done),
          class: item.done ? 'done' : '',
        },
        h('input', {
          type: 'checkbox',
          title: 'done',
          'data-testid': 'toggle',
          ...(item.done ? { checked: '' } : {}),
        }),
        h('span', { class: 'text' }, item.text),
        h('button', { type: 'button', title: 'remove', 'data-testid': 'remove' }, '×'),
      ),
    );
    for (const text of pending)
      rows.push(h('li', { class: 'pending', 'data-testid': 'pending' }, `${text} (sending…)`));
    list.replaceChildren(...rows);
  };
  client.snapshots$.subscribe((s) => {
    items.clear();
    for (const item of s.data as ListItem[]) items.set(item.id, item);
    snapshotInfo.textContent = `started from a snapshot at seq ${s.seq}`;
    render();
  });
  client.changes$.subscribe((changes) => {
    for (const c of changes as ListChange[]) {
      if (c.value) items.set(c.id, c.value);
      else items.delete(c.id);
    }
    render();
  });
  client.resets$.subscribe((r) =>
    say(`client ${name}: history of ${r.channel} could not be recovered (new epoch)`),
  );

  const send = (op: ListOp, what: string) => {
    const t0 = performance.now();
    client.send(op).then(
      (r) => {
        status.textContent = `${what}: ${r.ok ? `ok, seq ${r.seq}` : 'not applied'} (${Math.round(performance.now() - t0)} ms)`;
      },
      (err: Error & { code?: string }) => {
        status.textContent = `${what}: failed ${err.code ?? ''} ${err.message}`;
      },
    );
  };
  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const text = input.value.trim();
    if (!text) return;
    input.value = '';
    pending.add(text);
    render();
    const t0 = performance.now();
    client.send({ op: 'add', text }).then(
      (r) => {
        pending.delete(text);
        render();
        status.textContent = `add "${text}": ${r.ok ? `ok, seq ${r.seq}` : 'not applied'} (${Math.round(performance.now() - t0)} ms)`;
      },
      (err: Error & { code?: string }) => {
        pending.delete(text);
        render();
        status.textContent = `add "${text}": failed ${err.code ?? ''} ${err.message}`;
      },
    );
  });
  list.addEventListener('click', (ev) => {
    const btn = (ev.target as HTMLElement).closest('button[data-testid="remove"]');
    const id = btn?.closest('li')?.getAttribute('data-id');
    if (id) send({ op: 'remove', id }, `remove ${items.get(id)?.text ?? id}`);
  });
  // The checkbox shows the list's state, not the click: the change arrives from the channel.
  list.addEventListener('click', (ev) => {
    const box = (ev.target as HTMLElement).closest('input[data-testid="toggle"]') as HTMLInputElement | null;
    const id = box?.closest('li')?.getAttribute('data-id');
    if (!box || !id) return;
    ev.preventDefault();
    send({ op: 'toggle', id }, `toggle ${items.get(id)?.text ?? id}`);
  });

  for (const [key, label] of FAULTS) {
    const b = h('button', { type: 'button', 'data-fault': key, 'aria-pressed': 'false' }, label);
    b.addEventListener('click', () => {
      const on = !client.debug.faults[key];
      client.debug.faults[key] = on;
      b.setAttribute('aria-pressed', String(on));
    });
    faults.append(b);
  }
  const kill = h('button', { type: 'button', 'data-action': 'kill-socket' }, 'kill the socket');
  kill.addEventListener('click', () => {
    status.textContent = client.debug.killSocket() ? 'socket killed' : 'no socket to kill';
  });
  faults.append(kill);
  return client;
}

const clients: Record<string, ListClient> = {
  A: addClient('A', 'edits'),
  B: addClient('B', 'edits'),
};

const join = document.getElementById('join') as HTMLButtonElement;
join.addEventListener('click', () => {
  join.disabled = true;
  clients.C = addClient('C', 'joined late, starts from a snapshot');
});

const restart = document.getElementById('restart') as HTMLButtonElement;
restart.addEventListener('click', async () => {
  restart.disabled = true;
  say('restarting the server…');
  try {
    const res = await fetch('../admin/restart', { method: 'POST' });
    const body = (await res.json()) as { ms?: number };
    say(`server restarted (${body.ms ?? '?'} ms): same SQLite file, same port`);
  } catch (err) {
    say(`restart failed: ${(err as Error).message}`);
  } finally {
    restart.disabled = false;
  }
});

// For the browser tests and for poking around from the console.
(window as unknown as { playground: unknown }).playground = { clients, viz, inspector, T };
