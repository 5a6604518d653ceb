// Pins the client's side of the protocol against a scripted gateway (a fake WebSocket): the
// URL it opens; `auth` sent first; after a 4008 it resubscribes from its last token, and a
// `reset` rebuilds the replica reporting only the keys that differ; a socket lost mid-snapshot
// leaves no stale key; a write whose answer was lost and that finds its own value counts as
// applied; the queue is bounded; close rejects what waits.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import { CLOSE_TOO_SLOW, WRITES_PENDING_MAX, socketUrl, table } from '../syncline.js';
import { fakeGateway } from '../test-support/fake-gateway.mjs';
import { waitFor } from '../test-support/processes.mjs';

const QUICK = { initialMs: 1, maxMs: 5 };

test('gateway URLs map to the WebSocket endpoint', () => {
  assert.equal(socketUrl('http://127.0.0.1:7460'), 'ws://127.0.0.1:7460/v1/ws');
  assert.equal(socketUrl('https://example.com/sync/'), 'wss://example.com/sync/v1/ws');
  assert.equal(socketUrl('ws://example.com:80/v1/ws'), 'ws://example.com/v1/ws');
  assert.equal(socketUrl('wss://example.com'), 'wss://example.com/v1/ws');
  assert.throws(() => socketUrl('ftp://example.com'), TypeError);
});

test('auth is the first frame, then the subscription', async (t) => {
  const gateway = fakeGateway();
  const prices = table('http://gateway.test', 'prices', { WebSocket: gateway.WebSocket, token: 'T' });
  t.after(() => prices.close());
  const socket = await gateway.socket(0);
  await socket.received((f) => f.op === 'subscribe');
  assert.deepEqual(socket.sent, [
    { op: 'auth', token: 'T' },
    { op: 'subscribe', sub: socket.sent[1].sub, table: 'prices' },
  ]);
});

test('after a 4008 it resumes from its token; a reset rebuilds the replica and reports only what differs', async (t) => {
  const gateway = fakeGateway();
  const prices = table('http://gateway.test', 'prices', { WebSocket: gateway.WebSocket, backoff: QUICK });
  t.after(() => prices.close());
  const first = await gateway.socket(0);
  const { sub } = await first.received((f) => f.op === 'subscribe');
  first.frame({ sub, event: 'put', key: 'a', value: '1', version: 0 });
  first.frame({ sub, event: 'put', key: 'b', value: '2', version: 1 });
  first.frame({ sub, event: 'put', key: 'c', value: '3', version: 2 });
  first.frame({ sub, event: 'caught-up', id: '3' });
  await prices.ready;
  first.frame({ sub, event: 'put', key: 'c', value: '33', version: 3, id: '4' });
  assert.equal(prices.token, '4');

  const events = [];
  prices.on('change', (c) => events.push(['change', c.op, c.key, c.value, c.previous?.value]));
  prices.on('reset', () => events.push(['reset']));
  prices.on('status', (s) => events.push(['status', s]));
  first.drop(CLOSE_TOO_SLOW, 'too slow: resume from your last tokens');

  const second = await gateway.socket(1);
  const resubscribe = await second.received((f) => f.op === 'subscribe');
  assert.equal(resubscribe.from, '4', 'resumes from the last id it saw');
  second.frame({ sub: resubscribe.sub, event: 'reset' });
  second.frame({ sub: resubscribe.sub, event: 'put', key: 'a', value: '1', version: 0 });
  second.frame({ sub: resubscribe.sub, event: 'put', key: 'c', value: '333', version: 7 });
  second.frame({ sub: resubscribe.sub, event: 'put', key: 'd', value: '4', version: 6 });
  assert.equal(prices.get('b')?.value, '2', 'the old replica stands until caught-up');
  second.frame({ sub: resubscribe.sub, event: 'caught-up', id: '8' });

  assert.deepEqual(events, [
    ['status', 'offline'],
    ['status', 'connecting'],
    ['change', 'delete', 'b', undefined, '2'],
    ['change', 'put', 'c', '333', '33'],
    ['change', 'put', 'd', '4', undefined],
    ['reset'],
    ['status', 'online'],
  ]);
  assert.deepEqual([...prices.keys()].sort(), ['a', 'c', 'd']);
  assert.equal(prices.token, '8');
});

test('a socket lost halfway through the first snapshot leaves no key the next snapshot lacks', async (t) => {
  const gateway = fakeGateway();
  const prices = table('http://gateway.test', 'prices', { WebSocket: gateway.WebSocket, backoff: QUICK });
  t.after(() => prices.close());
  const first = await gateway.socket(0);
  const { sub } = await first.received((f) => f.op === 'subscribe');
  first.frame({ sub, event: 'put', key: 'gone', value: 'x', version: 0 });
  first.drop(1006);
  const second = await gateway.socket(1);
  const again = await second.received((f) => f.op === 'subscribe');
  assert.equal(again.from, undefined, 'no token yet: the whole table again');
  second.frame({ sub: again.sub, event: 'put', key: 'kept', value: 'y', version: 2 });
  second.frame({ sub: again.sub, event: 'caught-up', id: '3' });
  await prices.ready;
  assert.deepEqual([...prices.entries()], [['kept', { value: 'y', version: 2 }]]);
});

test('a write whose answer was lost with its socket, found applied after reconnecting, resolves as applied', async (t) => {
  const gateway = fakeGateway();
  const board = table('http://gateway.test', 'board', {
    WebSocket: gateway.WebSocket,
    backoff: QUICK,
    onConflict: () => assert.fail('not a conflict: the value is mine'),
  });
  t.after(() => board.close());
  const first = await gateway.socket(0);
  const { sub } = await first.received((f) => f.op === 'subscribe');
  first.frame({ sub, event: 'caught-up', id: '0' });
  await board.ready;
  const written = board.put('k', 'mine');
  const put = await first.received((f) => f.op === 'put');
  assert.equal(put.if_absent, undefined, 'online, a plain put is unconditional');
  first.drop(1006); // The gateway applied it (version 5), but the answer is lost.

  const second = await gateway.socket(1);
  const resubscribe = await second.received((f) => f.op === 'subscribe');
  assert.equal(resubscribe.from, '0');
  second.frame({ sub: resubscribe.sub, event: 'put', key: 'k', value: 'mine', version: 5, id: '6' });
  second.frame({ sub: resubscribe.sub, event: 'caught-up', id: '6' });
  const retry = await second.received((f) => f.op === 'put');
  assert.equal(retry.if_absent, true, 'sent again, it now expects what it was decided on');
  second.frame({ req: retry.req, status: 412, current_version: 5 });
  assert.deepEqual(await written, { version: 5 });
  assert.equal(board.pending, 0);
});

test('the queue is bounded, and close rejects the writes still waiting', async (t) => {
  const gateway = fakeGateway();
  const board = table('http://gateway.test', 'board', { WebSocket: gateway.WebSocket });
  t.after(() => board.close());
  const waiting = [];
  for (let i = 0; i < WRITES_PENDING_MAX; i++) waiting.push(board.put(`k${i}`, 'v').catch((e) => e));
  assert.equal(board.pending, WRITES_PENDING_MAX);
  await assert.rejects(board.put('one-more', 'v'), /already waiting/);
  await assert.rejects(board.put('bad', 42), TypeError, 'a value is a string unless json');
  await assert.rejects(board.put('bad', '\uD800'), TypeError, 'no lone surrogates');
  board.close();
  const outcomes = await Promise.all(waiting);
  assert.ok(outcomes.every((e) => e instanceof Error && /closed/.test(e.message)));
  await assert.rejects(board.ready, /closed/);
  await waitFor(() => gateway.sockets.every((s) => s.readyState === 3), 'the socket closed');
});
