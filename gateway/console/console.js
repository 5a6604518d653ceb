// The Syncline web console: plain ES module, no build step. It reads the gateway's JSON views
// (/v1/cluster, /v1/topics, /v1/groups) and follows tables live with the JS client
// (/syncline.js) over the gateway's WebSocket. Every call carries the token typed in the
// header, so the brokers' ACLs decide what the console shows and may change.
import { table as openTable, ConflictError } from '/syncline.js';

const view = document.getElementById('view');
const statusLine = document.getElementById('status');
const tokenInput = document.getElementById('token');
tokenInput.value = sessionStorage.getItem('syncline-token') || '';

let cleanup = () => {};       // closes what the current view opened (a live table, a timer)
const REFRESH_MS = 2000;

document.getElementById('auth').addEventListener('submit', (event) => {
  event.preventDefault();
  sessionStorage.setItem('syncline-token', tokenInput.value.trim());
  route();
});
window.addEventListener('hashchange', route);
route();

function token() {
  return tokenInput.value.trim() || undefined;
}

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (token()) headers.Authorization = `Bearer ${token()}`;
  const response = await fetch(path, { ...options, headers });
  const text = await response.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch { body = { error: text }; }
  if (!response.ok) {
    const error = new Error((body && body.error) || `${response.status} ${response.statusText}`);
    error.status = response.status;
    error.body = body;
    throw error;
  }
  return body;
}

// Builds an element: el('td', {class: 'num'}, '3') or el('tr', {}, [td1, td2]).
function el(tag, attrs = {}, children = []) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name.startsWith('on')) node.addEventListener(name.slice(2), value);
    else if (value !== undefined && value !== null && value !== false) node.setAttribute(name, value);
  }
  for (const child of [].concat(children)) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function grid(headers, rows, attrs = {}) {
  return el('table', { class: 'grid', ...attrs }, [
    el('thead', {}, el('tr', {}, headers.map((h) => el('th', { class: h.num ? 'num' : null }, h.label ?? h)))),
    el('tbody', {}, rows),
  ]);
}

function show(...nodes) {
  view.replaceChildren(...nodes);
}

function showError(error) {
  show(el('div', { class: 'card' }, [el('h2', {}, 'Cannot load'), el('p', { class: 'error', id: 'error' }, error.message)]));
}

// A key as shown: its text, or 0x and hex for bytes that are not UTF-8.
function label(key) {
  if (typeof key === 'string') return key;
  return `0x${[...key].map((b) => b.toString(16).padStart(2, '0')).join('')}`;
}

// A key's identity among the rows: text keys and byte keys never collide.
function idOf(key) {
  return typeof key === 'string' ? `s${key}` : `b${label(key)}`;
}

function text(value) {
  if (value === undefined || value === null) return '';
  if (typeof value === 'string') return value;
  if (value instanceof Uint8Array) return `(${value.length} bytes, binary)`;
  return JSON.stringify(value);
}

async function route() {
  cleanup();
  cleanup = () => {};
  const [, section = 'cluster', name] = (location.hash || '#/cluster').split('/').map(decodeURIComponent);
  for (const link of document.querySelectorAll('nav a')) {
    link.classList.toggle('active', link.dataset.nav === section);
  }
  try {
    if (section === 'topics' && name) await topicView(name);
    else if (section === 'topics') await topicsView();
    else if (section === 'groups' && name) await groupView(name);
    else if (section === 'groups') await groupsView();
    else if (section === 'produce') produceView(name);
    else await clusterView();
  } catch (error) {
    showError(error);
  }
}

// Re-renders every REFRESH_MS while the view is shown.
function every(render) {
  let stopped = false;
  const timer = setInterval(async () => {
    try { if (!stopped) await render(); } catch (error) { statusLine.textContent = error.message; }
  }, REFRESH_MS);
  cleanup = () => { stopped = true; clearInterval(timer); };
}

async function clusterView() {
  const render = async () => {
    const [cluster, topics] = await Promise.all([api('/v1/cluster'), api('/v1/topics')]);
    const rows = cluster.nodes.map((node) => el('tr', { 'data-node': node.id }, [
      el('td', { class: 'num' }, node.id),
      el('td', {}, node.address),
      el('td', {}, el('span', { class: `pill ${node.alive ? 'ok' : 'bad'}` }, node.alive ? 'alive' : 'down')),
      el('td', {}, node.id === cluster.controller ? 'controller' : (cluster.voters.includes(node.id) ? 'voter' : '')),
      el('td', {}, node.leaving ? 'leaving' : ''),
    ]));
    show(el('div', { class: 'card' }, [
      el('h2', {}, 'Cluster'),
      el('p', {}, [`Cluster id `, el('code', { id: 'cluster-id' }, cluster.cluster_id || '(single node)'),
        ` · ${cluster.nodes.length} node(s) · ${topics.topics.length} topic(s) · controller `,
        cluster.controller ?? 'unknown']),
      grid(['Node', 'Address', 'State', 'Role', ''], rows, { id: 'cluster-nodes' }),
    ]));
    statusLine.textContent = `updated ${new Date().toLocaleTimeString()}`;
  };
  await render();
  every(render);
}

async function topicsView() {
  const { topics } = await api('/v1/topics');
  const rows = topics.map((t) => el('tr', { 'data-topic': t.name }, [
    el('td', {}, el('a', { href: `#/topics/${encodeURIComponent(t.name)}` }, t.name)),
    el('td', { class: 'num' }, t.partitions),
    el('td', {}, t.table ? el('span', { class: 'pill ok' }, 'table') : el('span', { class: 'pill' }, 'log')),
  ]));
  show(el('div', { class: 'card' }, [
    el('h2', {}, 'Topics'),
    topics.length ? grid(['Topic', { label: 'Partitions', num: true }, 'Kind'], rows, { id: 'topics' })
      : el('p', { class: 'muted' }, 'No topics yet (or none this token may describe).'),
  ]));
}

async function topicView(name) {
  const partitionsCard = el('div', { class: 'card' });
  const renderPartitions = async () => {
    const topic = await api(`/v1/topics/${encodeURIComponent(name)}`);
    const rows = topic.partitions.map((p) => el('tr', {}, [
      el('td', { class: 'num' }, p.partition),
      el('td', { class: 'num' }, p.leader ?? '–'),
      el('td', {}, p.replicas.join(', ')),
      el('td', { class: 'num' }, p.log_start_offset),
      el('td', { class: 'num' }, p.durable_offset),
      el('td', { class: 'num' }, p.log_end_offset),
      el('td', { class: 'num' }, p.size_bytes),
      el('td', { class: 'bad' }, p.error || ''),
    ]));
    partitionsCard.replaceChildren(
      el('h2', {}, [name, ' ', el('span', { class: 'pill' }, topic.table ? 'table' : 'log')]),
      grid([{ label: 'Partition', num: true }, { label: 'Leader', num: true }, 'Replicas',
        { label: 'Start', num: true }, { label: 'Durable', num: true }, { label: 'End', num: true },
        { label: 'Bytes', num: true }, ''], rows, { id: 'partitions' }),
      el('p', {}, el('a', { href: `#/produce/${encodeURIComponent(name)}` }, 'Produce a record to this topic')),
    );
    return topic;
  };
  const topic = await renderPartitions();
  show(partitionsCard);
  every(renderPartitions);
  const stopRefresh = cleanup;
  if (topic.table) {
    const live = liveTable(name);
    view.append(live.card);
    cleanup = () => { stopRefresh(); live.close(); };
  }
}

// A table followed live: the rows change as puts and deletes arrive; search filters by key;
// edits are compare-and-set on the version the row shows.
function liveTable(name) {
  const synced = openTable(location.origin, name, { token: token() });
  const state = el('span', { class: 'pill', id: 'live-state' }, 'connecting');
  const search = el('input', { id: 'search', type: 'search', placeholder: 'search keys' });
  const body = el('tbody', { id: 'table-rows' });
  const message = el('p', { class: 'error', id: 'table-error' });
  const count = el('span', { class: 'muted', id: 'row-count' });
  const newKey = el('input', { id: 'new-key', placeholder: 'key' });
  const newValue = el('input', { id: 'new-value', placeholder: 'value' });
  const addForm = el('form', { id: 'add-form', class: 'row' }, [
    newKey, newValue, el('button', { type: 'submit' }, 'Add (only if absent)')]);
  const rows = new Map();          // key id (see idOf) -> <tr>
  const order = [];                // key ids, sorted: where a new row goes
  const card = el('div', { class: 'card' }, [
    el('h3', {}, ['Live table ', state, ' ', count]),
    el('div', { class: 'row' }, [search]),
    message,
    el('table', { class: 'grid', id: 'live-table' }, [
      el('thead', {}, el('tr', {}, [el('th', {}, 'Key'), el('th', {}, 'Value'), el('th', { class: 'num' }, 'Version'), el('th', {}, '')])),
      body,
    ]),
    el('h3', {}, 'Add a key'),
    addForm,
  ]);

  const matches = (key) => label(key).toLowerCase().includes(search.value.toLowerCase());
  const fail = (error) => {
    message.textContent = error instanceof ConflictError
      ? `Conflict: ${label(error.key)} is now at version ${error.currentVersion ?? '(deleted)'}; your change was not applied.`
      : error.message;
  };
  const renderCount = () => { count.textContent = `${rows.size} key(s)`; };

  function rowFor(key, entry) {
    const valueCell = el('td', { class: 'value' }, text(entry.value));
    const edit = el('button', { class: 'secondary', 'data-action': 'edit' }, 'Edit');
    const remove = el('button', { class: 'danger', 'data-action': 'delete' }, 'Delete');
    const tr = el('tr', { 'data-key': label(key) }, [el('td', {}, label(key)), valueCell,
      el('td', { class: 'num' }, entry.version), el('td', {}, [edit, ' ', remove])]);
    edit.addEventListener('click', () => {
      tr.editing = true;   // changes from elsewhere do not replace the row while it is edited
      const input = el('input', { value: text(entry.value), 'data-edit': label(key), size: 40 });
      const save = el('button', { 'data-action': 'save' }, 'Save');
      valueCell.replaceChildren(el('form', { class: 'row' }, [input, save]));
      valueCell.querySelector('form').addEventListener('submit', async (event) => {
        event.preventDefault();
        message.textContent = '';
        try {
          await synced.put(key, input.value, { ifVersion: entry.version });
        } catch (error) {
          fail(error);
        }
        // Show what the table holds now (the edit, or the value that won the race).
        tr.editing = false;
        const now = synced.get(key);
        if (now) upsert(key, now); else removeRow(key);
      });
      input.focus();
    });
    remove.addEventListener('click', async () => {
      message.textContent = '';
      try { await synced.delete(key, { ifVersion: entry.version }); } catch (error) { fail(error); }
    });
    tr.hidden = !matches(key);
    return tr;
  }

  function upsert(key, entry) {
    const id = idOf(key);
    const old = rows.get(id);
    if (old?.editing) {
      // Keep the editor (it still compares against the version it started from); say that
      // the value moved on.
      old.querySelector('td.num').textContent = `${entry.version} (changed elsewhere)`;
      return;
    }
    const tr = rowFor(key, entry);
    if (old) old.replaceWith(tr);
    else {
      // Keep rows sorted by key: binary search for the first id after this one.
      let low = 0;
      let high = order.length;
      while (low < high) {
        const middle = (low + high) >> 1;
        if (order[middle] < id) low = middle + 1; else high = middle;
      }
      if (low < order.length) rows.get(order[low]).before(tr); else body.append(tr);
      order.splice(low, 0, id);
    }
    rows.set(id, tr);
    tr.classList.add('flash');
    renderCount();
  }

  function removeRow(key) {
    const id = idOf(key);
    const tr = rows.get(id);
    if (!tr) return;
    tr.remove();
    rows.delete(id);
    order.splice(order.indexOf(id), 1);
    renderCount();
  }

  synced.on('status', (s) => {
    state.textContent = s;
    state.className = `pill ${s === 'online' ? 'ok' : s === 'offline' ? 'bad' : ''}`;
  });
  synced.on('change', (change) => {
    if (change.op === 'delete') removeRow(change.key);
    else upsert(change.key, { value: change.value, version: change.version });
  });
  synced.ready.then(() => {
    state.textContent = 'live';
    state.className = 'pill ok';
    card.setAttribute('data-ready', 'true');
  }, fail);
  search.addEventListener('input', () => {
    for (const tr of rows.values()) tr.hidden = !matches(tr.dataset.key);
  });
  addForm.addEventListener('submit', async (event) => {
    event.preventDefault();
    message.textContent = '';
    try {
      await synced.put(newKey.value, newValue.value, { ifAbsent: true });
      newKey.value = ''; newValue.value = '';
    } catch (error) { fail(error); }
  });
  return { card, close: () => synced.close() };
}

async function groupsView() {
  const render = async () => {
    const { groups } = await api('/v1/groups');
    const rows = groups.map((g) => el('tr', { 'data-group': g.group }, [
      el('td', {}, el('a', { href: `#/groups/${encodeURIComponent(g.group)}` }, g.group)),
      el('td', {}, g.state),
      el('td', { class: 'num' }, g.members),
    ]));
    show(el('div', { class: 'card' }, [
      el('h2', {}, 'Consumer groups'),
      groups.length ? grid(['Group', 'State', { label: 'Members', num: true }], rows, { id: 'groups' })
        : el('p', { class: 'muted' }, 'No consumer groups.'),
    ]));
  };
  await render();
  every(render);
}

async function groupView(name) {
  const render = async () => {
    const group = await api(`/v1/groups/${encodeURIComponent(name)}`);
    const members = group.members.map((m) => el('tr', {}, [
      el('td', {}, m.member_id), el('td', {}, m.client_id), el('td', {}, m.assignment.join(', ')),
    ]));
    const partitions = group.partitions.map((p) => el('tr', {}, [
      el('td', {}, p.topic), el('td', { class: 'num' }, p.partition), el('td', {}, p.owner || '–'),
      el('td', { class: 'num' }, p.committed_offset ?? '–'), el('td', { class: 'num' }, p.end_offset),
      el('td', { class: 'num' }, p.lag),
    ]));
    show(el('div', { class: 'card' }, [
      el('h2', {}, [name, ' ', el('span', { class: 'pill' }, group.state)]),
      el('p', {}, ['Total lag: ', el('strong', { id: 'group-lag' }, group.lag), ' record(s)']),
      el('h3', {}, 'Members'),
      grid(['Member', 'Client', 'Assignment'], members),
      el('h3', {}, 'Partitions'),
      grid(['Topic', { label: 'Partition', num: true }, 'Owner', { label: 'Committed', num: true },
        { label: 'End', num: true }, { label: 'Lag', num: true }], partitions, { id: 'group-partitions' }),
    ]));
  };
  await render();
  every(render);
}

function produceView(topic) {
  const topicInput = el('input', { id: 'produce-topic', value: topic || '', placeholder: 'topic', required: true });
  const key = el('input', { id: 'produce-key', placeholder: 'key (optional)' });
  const value = el('textarea', { id: 'produce-value', rows: 4, cols: 60, placeholder: 'value' });
  const result = el('p', { id: 'produce-result' });
  const form = el('form', { id: 'produce-form' }, [
    el('div', { class: 'row' }, [topicInput, key]),
    el('div', { class: 'row' }, [value]),
    el('button', { type: 'submit' }, 'Produce'),
    result,
  ]);
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    result.className = '';
    const record = { value: value.value };
    if (key.value) record.key = key.value;
    try {
      const answer = await api(`/v1/topics/${encodeURIComponent(topicInput.value)}/records`, {
        method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify([record]),
      });
      const [written] = answer.records;
      result.className = 'ok';
      result.textContent = `Written to partition ${written.partition} at offset ${written.offset}.`;
    } catch (error) {
      result.className = 'error';
      result.textContent = error.message;
    }
  });
  show(el('div', { class: 'card' }, [el('h2', {}, 'Produce a record'), form]));
}
