// Pins a table replica against a real broker and gateway: `ready` after the snapshot of the
// keys already there, changes made elsewhere arriving as `change` events, the client's own
// writes shown once, compare-and-set conflicts rejected with ConflictError, JSON and bytes, and
// `reset` for a token the gateway cannot serve.

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import { ConflictError, connect, table } from '../syncline.js';
import {
  createTable,
  httpDelete,
  httpGet,
  httpPut,
  nextEvent,
  startBroker,
  startGateway,
  stopAll,
  uniqueName,
  waitFor,
} from '../test-support/processes.mjs';

let broker;
let gateway;

before(async () => {
  broker = await startBroker();
  gateway = await startGateway(broker.addr);
});

after(stopAll);

test('ready resolves once the snapshot holds every key already in the table', async (t) => {
  const name = uniqueName('snapshot');
  await createTable(broker.addr, name);
  const appleVersion = await httpPut(gateway.url, name, 'apple', '1.20');
  const pearVersion = await httpPut(gateway.url, name, 'pear', '0.80');

  const prices = table(gateway.url, name);
  t.after(() => prices.close());
  const changes = [];
  prices.on('change', (change) => changes.push(change));
  await prices.ready;

  assert.equal(prices.status, 'online');
  assert.equal(prices.size, 2);
  assert.deepEqual(prices.get('apple'), { value: '1.20', version: appleVersion });
  assert.deepEqual(prices.get('pear'), { value: '0.80', version: pearVersion });
  assert.equal(prices.get('plum'), undefined);
  assert.deepEqual(
    [...prices.entries()].sort(([a], [b]) => a.localeCompare(b)),
    [
      ['apple', { value: '1.20', version: appleVersion }],
      ['pear', { value: '0.80', version: pearVersion }],
    ],
  );
  assert.deepEqual(changes.map((c) => [c.op, c.key, c.value]).sort(), [
    ['put', 'apple', '1.20'],
    ['put', 'pear', '0.80'],
  ]);
  assert.match(prices.token, /^\d+$/, 'caught-up gives a resume token');
});

test('a change made through the HTTP API reaches the replica as a change event', async (t) => {
  const name = uniqueName('live');
  await createTable(broker.addr, name);
  const first = await httpPut(gateway.url, name, 'a', '1');
  const live = table(gateway.url, name);
  t.after(() => live.close());
  await live.ready;

  const put = nextEvent(live, 'change', (c) => c.key === 'b');
  const version = await httpPut(gateway.url, name, 'b', '2');
  assert.deepEqual(await put, { op: 'put', key: 'b', value: '2', version, previous: undefined });
  assert.deepEqual(live.get('b'), { value: '2', version });

  const deleted = nextEvent(live, 'change', (c) => c.key === 'a');
  const deleteVersion = await httpDelete(gateway.url, name, 'a');
  assert.deepEqual(await deleted, {
    op: 'delete',
    key: 'a',
    value: undefined,
    version: deleteVersion,
    previous: { value: '1', version: first },
  });
  assert.equal(live.get('a'), undefined);
});

test('own writes show at once and are reported once, not again when the stream echoes them', async (t) => {
  const name = uniqueName('own');
  await createTable(broker.addr, name);
  const board = table(gateway.url, name);
  t.after(() => board.close());
  await board.ready;
  const changes = [];
  board.on('change', (change) => changes.push(change));

  const { version } = await board.put('k', 'v1');
  assert.deepEqual(board.get('k'), { value: 'v1', version });
  const { version: deleted } = await board.delete('k');
  assert.ok(deleted > version);
  assert.equal(board.get('k'), undefined);
  // A later change from elsewhere: once it is here, the echoes of both writes are too.
  await httpPut(gateway.url, name, 'marker', 'm');
  await waitFor(() => board.get('marker'), 'the marker');
  assert.deepEqual(
    changes.map((c) => [c.op, c.key, c.version]),
    [
      ['put', 'k', version],
      ['delete', 'k', deleted],
      ['put', 'marker', board.get('marker').version],
    ],
  );
  assert.equal(board.pending, 0);
});

test('a put with a stale ifVersion or ifAbsent rejects with ConflictError and the current version', async (t) => {
  const name = uniqueName('cas');
  await createTable(broker.addr, name);
  const cas = table(gateway.url, name);
  t.after(() => cas.close());
  await cas.ready;

  const { version: mine } = await cas.put('k', 'mine', { ifAbsent: true });
  const theirs = await httpPut(gateway.url, name, 'k', 'theirs');

  await assert.rejects(cas.put('k', 'stale', { ifVersion: mine }), (error) => {
    assert.ok(error instanceof ConflictError);
    assert.equal(error.key, 'k');
    assert.equal(error.currentVersion, theirs);
    return true;
  });
  await assert.rejects(cas.put('k', 'again', { ifAbsent: true }), (error) => {
    assert.ok(error instanceof ConflictError);
    assert.equal(error.currentVersion, theirs);
    return true;
  });
  await assert.rejects(cas.delete('absent', { ifVersion: 3 }), (error) => {
    assert.ok(error instanceof ConflictError);
    assert.equal(error.currentVersion, null, 'null: the key is absent');
    return true;
  });
  const { version } = await cas.put('k', 'fresh', { ifVersion: theirs });
  assert.ok(version > theirs);
  assert.deepEqual(await httpGet(gateway.url, name, 'k'), { value: 'fresh', version });
  assert.equal(cas.pending, 0);
});

test('json values round-trip as objects and bytes as Uint8Array, over one shared socket', async (t) => {
  const name = uniqueName('json');
  await createTable(broker.addr, name);
  const socket = connect(gateway.url);
  t.after(() => socket.close());
  const writer = socket.table(name, { json: true });
  const reader = socket.table(name, { json: true });
  await Promise.all([writer.ready, reader.ready]);

  const seen = nextEvent(reader, 'change', (c) => c.key === 'doc');
  await writer.put('doc', { n: 1, tags: ['a'] });
  assert.deepEqual((await seen).value, { n: 1, tags: ['a'] });
  assert.equal((await httpGet(gateway.url, name, 'doc')).value, '{"n":1,"tags":["a"]}');

  const bytes = new Uint8Array([0xff, 0x00, 0x80]);
  const binary = nextEvent(reader, 'change', (c) => c.key === 'blob');
  await writer.put('blob', bytes);
  assert.deepEqual((await binary).value, bytes);
  const binaryKey = new Uint8Array([0xc3, 0x28]); // not UTF-8
  const keyed = nextEvent(reader, 'change', (c) => c.key instanceof Uint8Array);
  await writer.put(binaryKey, 'under a byte key');
  assert.deepEqual((await keyed).key, binaryKey);
  assert.equal(reader.get(binaryKey).value, 'under a byte key');
});

test('a token the gateway cannot serve gets a reset and the whole table', async (t) => {
  const name = uniqueName('reset');
  await createTable(broker.addr, name);
  const version = await httpPut(gateway.url, name, 'a', '1');
  // A token naming two partitions, for a table of one: the log cannot serve it.
  const stale = table(gateway.url, name, { from: '0.0' });
  t.after(() => stale.close());
  const resets = nextEvent(stale, 'reset');
  await stale.ready;
  assert.match((await resets).token, /^\d+$/);
  assert.deepEqual([...stale.entries()], [['a', { value: '1', version }]]);
  assert.match(stale.token, /^\d+$/);
});
