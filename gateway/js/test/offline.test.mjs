// Pins the offline queue against a real broker and gateways: writes made while the gateway is
// down are applied after the client is back and caught up, each expecting the version it was
// decided on. A key nobody touched meanwhile is simply written; a key someone changed through
// another gateway goes to `onConflict`: last-writer-wins (mine, at a newer version),
// keep-theirs (theirs stays), or a merge function (its value is stored). Writes queued on one
// key expect each other, not a conflict with themselves.

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import { table } from '../syncline.js';
import {
  FAST_BACKOFF,
  createTable,
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
let other; // the second gateway, through which "someone else" writes while the app is offline

before(async () => {
  broker = await startBroker();
  other = await startGateway(broker.addr);
});

after(stopAll);

/**
 * The app follows a table holding B; its gateway is killed; offline, the app puts A (nobody
 * else touches it) and B (which someone else then changes); the gateway comes back on its port.
 */
async function offlineWrites(t, onConflict) {
  const name = uniqueName('offline');
  await createTable(broker.addr, name);
  const base = await httpPut(other.url, name, 'B', 'b0');
  let gateway = await startGateway(broker.addr);
  const app = table(gateway.url, name, { onConflict, backoff: FAST_BACKOFF });
  t.after(() => app.close());
  await app.ready;
  const conflicts = [];
  app.on('conflict', (conflict) => conflicts.push(conflict));

  const offline = nextEvent(app, 'status', (status) => status === 'offline');
  await gateway.kill();
  await offline;
  const putA = app.put('A', 'mine-a');
  const putB = app.put('B', 'mine-b');
  assert.equal(app.pending, 2, 'both writes wait for the gateway');
  const theirs = await httpPut(other.url, name, 'B', 'theirs-b');

  gateway = await startGateway(broker.addr, { port: gateway.port });
  const [a, b] = await Promise.all([putA, putB]);
  assert.equal(app.pending, 0);
  // A had no conflict: written as made.
  assert.deepEqual(a, { version: a.version });
  assert.deepEqual(await httpGet(other.url, name, 'A'), { value: 'mine-a', version: a.version });
  return { name, app, base, theirs, b, conflicts };
}

// The replica converges on what the cluster holds.
async function replicaShows(app, name, key) {
  const stored = await httpGet(other.url, name, key);
  await waitFor(
    () => JSON.stringify(app.get(key)) === JSON.stringify(stored),
    `the replica's ${key} to be ${JSON.stringify(stored)}`,
  );
  return stored;
}

test('last-writer-wins: a conflicting queued write is written again over theirs', async (t) => {
  const { name, app, base, theirs, b, conflicts } = await offlineWrites(t, 'last-writer-wins');
  assert.equal(b.kept, 'mine');
  assert.ok(b.version > theirs, 'mine lands after theirs');
  assert.deepEqual(await replicaShows(app, name, 'B'), { value: 'mine-b', version: b.version });
  assert.deepEqual(conflicts, [
    {
      key: 'B',
      mine: { op: 'put', value: 'mine-b', expectedVersion: base },
      theirs: { value: 'theirs-b', version: theirs },
      resolution: 'mine',
    },
  ]);
});

test('keep-theirs: a conflicting queued write is dropped and theirs stays', async (t) => {
  const { name, app, theirs, b, conflicts } = await offlineWrites(t, 'keep-theirs');
  assert.deepEqual(b, { version: theirs, kept: 'theirs' });
  assert.deepEqual(await replicaShows(app, name, 'B'), { value: 'theirs-b', version: theirs });
  assert.deepEqual(
    conflicts.map((c) => [c.key, c.resolution]),
    [['B', 'theirs']],
  );
});

test('a merge function: its value is written over theirs', async (t) => {
  const calls = [];
  const merge = (key, mine, theirs) => {
    calls.push({ key, mine, theirs });
    return `${theirs.value}+${mine.value}`;
  };
  const { name, app, base, theirs, b } = await offlineWrites(t, merge);
  assert.deepEqual(calls, [
    {
      key: 'B',
      mine: { op: 'put', value: 'mine-b', expectedVersion: base },
      theirs: { value: 'theirs-b', version: theirs },
    },
  ]);
  assert.equal(b.kept, 'merged');
  assert.ok(b.version > theirs);
  assert.deepEqual(await replicaShows(app, name, 'B'), { value: 'theirs-b+mine-b', version: b.version });
});

test('queued writes of one key expect each other, so they never conflict with themselves', async (t) => {
  const name = uniqueName('chain');
  await createTable(broker.addr, name);
  await httpPut(other.url, name, 'M', 'm0');
  let gateway = await startGateway(broker.addr);
  // keep-theirs would drop any write that conflicted, even with the app's own earlier write.
  const app = table(gateway.url, name, { onConflict: 'keep-theirs', backoff: FAST_BACKOFF });
  t.after(() => app.close());
  await app.ready;
  const conflicts = [];
  app.on('conflict', (conflict) => conflicts.push(conflict));

  const offline = nextEvent(app, 'status', (status) => status === 'offline');
  await gateway.kill();
  await offline;
  const writes = [
    app.put('N', '1'),
    app.put('N', '2'),
    app.delete('M'),
    app.put('M', 'back'),
    app.delete('never-there'),
  ];
  assert.equal(app.pending, 5);
  gateway = await startGateway(broker.addr, { port: gateway.port });
  const [n1, n2, deleteM, putM, nothing] = await Promise.all(writes);

  assert.deepEqual(conflicts, []);
  assert.ok(n1.version < n2.version && deleteM.version < putM.version);
  assert.deepEqual([n1.kept, n2.kept, deleteM.kept, putM.kept], [undefined, undefined, undefined, undefined]);
  assert.deepEqual(nothing, { version: null }, 'a delete of a key still absent does nothing');
  assert.deepEqual(await replicaShows(app, name, 'N'), { value: '2', version: n2.version });
  assert.deepEqual(await replicaShows(app, name, 'M'), { value: 'back', version: putM.version });
  assert.equal(app.pending, 0);
});
