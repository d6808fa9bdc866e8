/**
 * The relay page: shows every client that streams to a relay (`createRelayInspector`), one
 * panel each. The relay URL comes from `?relay=`, else the relay this page was served with.
 */
import './style.css';
import './page.css';
import { mountVisualizer, relaySource } from './index.js';

const params = new URLSearchParams(location.search);
const relayUrl =
  params.get('relay') ?? `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/inspect`;
const status = document.getElementById('relay-status')!;
const clients = document.getElementById('clients')!;
const empty = document.getElementById('empty')!;
document.getElementById('hint')!.textContent = `createRelayInspector({ url: '${relayUrl}' })`;

const source = relaySource(relayUrl, (s) => {
  status.textContent = s === 'open' ? `relay ${relayUrl}` : 'relay unreachable, retrying…';
  status.dataset.status = s;
});
const viz = await mountVisualizer(clients, source, {
  place: () => {
    empty.hidden = true;
    return { parent: clients, title: 'client' };
  },
});
(window as unknown as { syncwireVisualizer?: unknown }).syncwireVisualizer = viz;
