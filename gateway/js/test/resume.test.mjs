// Pins resuming: when the gateway a client is on dies (SIGKILL) and comes back on its port,
// the client reconnects by itself and, from its last token, sees every change made meanwhile
// (through another gateway) exactly once, in order, with no reset; a plain topic's records
// likewise. A table followed as a topic (or the reverse) fails saying so.

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import { table, topic } from '../syncline.js';
import {
  FAST_BACKOFF,
  createTable,
  createTopic,
  http,
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
let other; // a second gateway: the "someone else" who writes while the client is away

before(async () => {
  broker = await startBroker();
  other = await startGateway(broker.addr);
});

after(stopAll);

test('a client resumes across a gateway restart with every change once and in order', async (t) => {
  const name = uniqueName('resume');
  await createTable(broker.addr, name);
  await httpPut(other.url, name, 'a', '1');
  await httpPut(other.url, name, 'b', '2');
  let gateway = await startGateway(broker.addr);
  const port = gateway.port;

  const live = table(gateway.url, name, { backoff: FAST_BACKOFF });
  t.after(() => live.close());
  await live.ready;
  const changes = [];
  const resets = [];
  const statuses = [];
  live.on('change', (c) => changes.push([c.op, c.key, c.value ?? null, c.version]));
  live.on('reset', () => resets.push(true));
  live.on('status', (status) => statuses.push(status));

  const c = await httpPut(gateway.url, name, 'c', '3');
  await waitFor(() => live.get('c'), 'c before the restart');
  assert.deepEqual(changes, [['put', 'c', '3', c]]);
  changes.length = 0;
  const tokenBefore = live.token;

  const offline = nextEvent(live, 'status', (s) => s === 'offline');
  await gateway.kill();
  await offline;
  // Missed while away, through the other gateway.
  const missed = [
    ['put', 'd', '4', await httpPut(other.url, name, 'd', '4')],
    ['put', 'b', '22', await httpPut(other.url, name, 'b', '22')],
    ['delete', 'c', null, await httpDelete(other.url, name, 'c')],
    ['put', 'a', '11', await httpPut(other.url, name, 'a', '11')],
  ];
  const online = nextEvent(live, 'status', (s) => s === 'online');
  gateway = await startGateway(broker.addr, { port });
  await online;

  assert.deepEqual(changes, missed, 'exactly the changes after the token, in order');
  assert.deepEqual(resets, [], 'the token was served: no reset');
  assert.notEqual(live.token, tokenBefore);
  assert.ok(statuses.includes('connecting'));

  // And it goes on live, still without repeating anything.
  const e = await httpPut(gateway.url, name, 'e', '5');
  await waitFor(() => live.get('e'), 'e after the restart');
  assert.deepEqual(changes, [...missed, ['put', 'e', '5', e]]);
  for (const key of ['a', 'b', 'c', 'd', 'e']) {
    assert.deepEqual(live.get(key), await httpGet(other.url, name, key), `the replica's ${key}`);
  }
});

test("a plain topic's records resume from the token across a gateway restart", async (t) => {
  const name = uniqueName('events');
  await createTopic(broker.addr, name);
  const post = async (records) => {
    const { status, body } = await http(other.url, 'POST', `/v1/topics/${name}/records`, {
      body: JSON.stringify(records),
    });
    assert.equal(status, 200, JSON.stringify(body));
  };
  await post([{ key: 'k1', value: 'one' }]);
  let gateway = await startGateway(broker.addr);
  const port = gateway.port;

  const events = topic(gateway.url, name, { from: 'earliest', backoff: FAST_BACKOFF });
  t.after(() => events.close());
  const records = [];
  events.on('record', (r) => records.push([r.offset, r.key, r.value]));
  await events.ready;
  await waitFor(() => records.length === 1, 'the first record');

  const offline = nextEvent(events, 'status', (s) => s === 'offline');
  await gateway.kill();
  await offline;
  await post([{ key: 'k2', value: 'two' }, { value: 'unkeyed' }]);
  gateway = await startGateway(broker.addr, { port });
  await waitFor(() => records.length >= 3, 'the records posted while away');
  await post([{ key: 'k3', value: 'three' }]);
  await waitFor(() => records.length >= 4, 'a live record');
  assert.deepEqual(records, [
    [0, 'k1', 'one'],
    [1, 'k2', 'two'],
    [2, null, 'unkeyed'],
    [3, 'k3', 'three'],
  ]);
});

test('a table followed as a topic, or a topic as a table, fails with an error saying so', async (t) => {
  const tableName = uniqueName('kind-table');
  const topicName = uniqueName('kind-topic');
  await createTable(broker.addr, tableName);
  await createTopic(broker.addr, topicName);
  await httpPut(other.url, tableName, 'k', 'v');
  const { status } = await http(other.url, 'POST', `/v1/topics/${topicName}/records`, {
    body: JSON.stringify([{ key: 'k', value: 'v' }]),
  });
  assert.equal(status, 200);

  const wrongTopic = topic(other.url, tableName);
  const wrongTable = table(other.url, topicName);
  t.after(() => {
    wrongTopic.close();
    wrongTable.close();
  });
  const [topicError, tableError] = await Promise.all([
    nextEvent(wrongTopic, 'error'),
    (async () => {
      await wrongTable.ready; // (a plain topic's caught-up comes first)
      const error = nextEvent(wrongTable, 'error');
      await http(other.url, 'POST', `/v1/topics/${topicName}/records`, {
        body: JSON.stringify([{ key: 'k2', value: 'v2' }]),
      });
      return error;
    })(),
  ]);
  assert.match(topicError.message, /is a table, not a plain topic/);
  assert.match(tableError.message, /is a plain topic, not a table/);
  assert.equal(wrongTable.status, 'offline');
  await assert.rejects(wrongTable.put('k', 'v'), /plain topic/);
});
