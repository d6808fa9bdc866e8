/**
 * Type tests for the typed server (issue 13): `createSyncServer<Op, Result, P, Channels>`
 * types `onSync`'s operations and results, the principal, and `publish`'s payload per channel.
 * Checked by `tsc --noEmit` (which covers test/): each `@ts-expect-error` line must be an
 * error, and the `expectTypeOf` assertions must hold. The servers are never started: the
 * calls sit inside functions that are only type-checked.
 */
import { describe, expectTypeOf, it } from 'vitest';
import {
  createSyncServer,
  type PublishResult,
  type SyncContext,
  type SyncServer,
  type SyncServerOptions,
} from '../src/server/index.js';

type Op = { kind: 'add'; text: string } | { kind: 'remove'; id: number };
type Result = { ok: boolean; id: number };
type User = { id: string; admin: boolean };
type Channels = { [K: `board-${number}`]: { changes: Result[] }; presence: { online: string[] } };

describe('typed server', () => {
  it('infers Op, Result and the principal from onSync and authenticate', () => {
    const make = () =>
      createSyncServer({
        onSync: (ops: Op[], ctx) => {
          expectTypeOf(ctx.principal).toEqualTypeOf<User>();
          return ops.map((op, i) => ({ ok: op.kind === 'add', id: i }));
        },
        authenticate: (): User | null => ({ id: 'u', admin: false }),
      });
    expectTypeOf(make).returns.resolves.toMatchTypeOf<SyncServer>();
  });

  it('explicit parameters type onSync, results and channel payloads', () => {
    const options: SyncServerOptions<Op, Result, User, Channels> = {
      onSync: async (ops, ctx) => {
        expectTypeOf(ops).toEqualTypeOf<Op[]>();
        expectTypeOf(ctx).toEqualTypeOf<SyncContext<User, Channels>>();
        const results = ops.map((_, i) => ({ ok: true, id: i }));
        await ctx.publish('board-7', { changes: results });
        await ctx.publish('presence', { online: [ctx.principal.id] });
        // @ts-expect-error a payload of the wrong shape for this channel
        await ctx.publish('board-7', { online: [] });
        // @ts-expect-error a channel the map does not name
        await ctx.publish('chat', { text: 'hi' });
        return results;
      },
    };
    const start = async () => {
      const server = await createSyncServer(options);
      expectTypeOf(server).toEqualTypeOf<SyncServer<Channels>>();
      expectTypeOf(server.publish('board-1', { changes: [] })).resolves.toEqualTypeOf<PublishResult>();
      // @ts-expect-error the server's publish is typed by the same map
      await server.publish('presence', { changes: [] });
    };
    expectTypeOf(start).returns.resolves.toBeVoid();
  });

  it('refuses an onSync whose results are not Result', () => {
    const bad = () =>
      createSyncServer<Op, Result>({
        // @ts-expect-error results must be Result[]
        onSync: (ops) => ops.map(() => 'done'),
      });
    expectTypeOf(bad).toBeFunction();
  });

  it('refuses an onSync that reads an operation field Op does not have', () => {
    const bad = () =>
      createSyncServer<Op, Result>({
        onSync: (ops) =>
          ops.map((op) => ({
            ok: true,
            // @ts-expect-error `id` only exists on the remove variant
            id: op.id,
          })),
      });
    expectTypeOf(bad).toBeFunction();
  });

  it('without type parameters everything stays unknown (backward compatible)', () => {
    const opts: SyncServerOptions = { onSync: (ops) => ops };
    expectTypeOf(opts.onSync).parameter(0).toEqualTypeOf<unknown[]>();
    expectTypeOf<SyncServer['publish']>().parameter(0).toEqualTypeOf<string>();
  });
});
