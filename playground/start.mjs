/**
 * `npm start`: builds the pages, starts the reference server on the SQLite file in ./.data,
 * serves the playground and prints its URL. Plain Node: tsx (a devDependency) loads the
 * TypeScript sources, so a fresh clone needs only `npm install`.
 *
 * Environment: PORT (pages, relay; default 4300), SYNC_PORT (sync server; default 4301),
 * HOST (default 127.0.0.1), DATA_DIR (default ./.data), T (timeout in ms; default 2000, so that faults show within seconds; production clients default to 15000).
 */
import { register } from 'tsx/esm/api';

register();
const { startPlayground } = await import('./server.ts');

const num = (v, d) => (v === undefined || v === '' ? d : Number(v));
const options = {
  port: num(process.env.PORT, 4300),
  syncPort: num(process.env.SYNC_PORT, 4301),
  host: process.env.HOST || '127.0.0.1',
  dataDir: process.env.DATA_DIR || '.data',
  timeout: num(process.env.T, 2000),
};

let pg;
try {
  console.log('building the pages…');
  pg = await startPlayground(options);
} catch (err) {
  if (err && err.code === 'EADDRINUSE') {
    console.error(`port in use (${err.message}); try PORT=0 SYNC_PORT=0 npm start`);
    process.exit(1);
  }
  throw err;
}

console.log(`
  syncwire playground   ${pg.url}
  relay visualizer      ${pg.visualizerUrl}
  sync server           ${pg.syncUrl}   (SQLite: ${pg.dbFile})
  inspection relay      ${pg.relayUrl}   (Stately's inspector, online: ${pg.url.replace('/playground/', '/stately')})

  Watch a Node client:  createSyncClient({ …, inspect: createRelayInspector({ url: '${pg.relayUrl}' }).inspect })
  Stop with Ctrl-C.
`);

let stopping = false;
const stop = async () => {
  if (stopping) process.exit(1);
  stopping = true;
  await pg.close();
  process.exit(0);
};
process.on('SIGINT', stop);
process.on('SIGTERM', stop);
