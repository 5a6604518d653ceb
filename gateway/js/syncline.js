// Syncline's JavaScript client: live tables and topics over the gateway's WebSocket
// (`GET /v1/ws`, protocol in gateway/src/ws.rs and gateway/src/watch.rs).
//
// A dependency-free ES module for browsers and Node (20 with --experimental-websocket, or any
// WHATWG WebSocket constructor passed as `options.WebSocket`).
//
// ## How a table stays exact across disconnects
// Every change the gateway streams carries an `id`: a resume token, the table's next offset in
// each partition *after* that change. The client applies a change and records its token in the
// same synchronous step, so the token always names exactly the prefix of the log the replica
// holds. On reconnect it subscribes with `from` = that token, and the gateway replays the
// log's records from those offsets (then `caught-up`, then live changes): nothing before the
// token comes again (no duplicate) and nothing after it is skipped (no gap). When the log
// cannot serve the token (retention or compaction removed records after it, or the partition
// count changed), the gateway sends `reset` and the whole table; the client builds a fresh
// replica aside, then swaps it in at `caught-up` and reports only the keys that differ.
//
// ## Why queued writes carry the version they expected
// A write made offline was decided on the replica as it stood then; by the time the socket is
// back, someone may have changed that key. So each queued write remembers the version it was
// based on (the caller's `ifVersion`/`ifAbsent`, or the replica's version of the key at the
// moment of the write, or "absent") and is sent as a compare-and-set. The gateway answers 412
// exactly when the key moved on meanwhile, and `onConflict` decides; without the expectation
// an old offline write would silently overwrite a newer change.

/** Most writes waiting (queued offline or in flight) per table; more are refused. */
export const WRITES_PENDING_MAX = 10_000;
/** The gateway's largest frame (FRAME_BYTES_MAX in gateway/src/ws.rs). */
export const FRAME_BYTES_MAX = 1024 * 1024;
/** Close code: the client fell behind; it resumes from its last tokens. */
export const CLOSE_TOO_SLOW = 4008;
/** Close code: the gateway did not understand a frame. */
export const CLOSE_UNSUPPORTED = 1003;
/** Close code the client uses when the socket stayed silent for two heartbeats. */
export const CLOSE_HEARTBEAT = 4000;

// Requests in flight per socket: below the gateway's 64 (REQUESTS_IN_FLIGHT_MAX), which it
// enforces by not reading the socket, which would also hold up subscribe frames and pings.
const REQUESTS_IN_FLIGHT_MAX = 32;
// Rounds of conflict resolution for one write before it is given up (someone keeps winning).
const CONFLICT_ROUNDS_MAX = 10;
// Statuses after which a queued write is retried rather than rejected: the cluster was
// unavailable (the write may or may not have been applied).
const TRANSIENT_STATUSES = new Set([429, 502, 503, 504]);
// Subscription refusals that retrying will not cure.
const FATAL_SUBSCRIBE_STATUSES = new Set([400, 401, 403]);
// Room for the frame's fields around a key and value when checking FRAME_BYTES_MAX.
const FRAME_OVERHEAD_BYTES = 512;

/** Returned by an `onConflict` function to delete the key instead of writing a value. */
export const DELETE = Symbol.for('syncline.delete');

/** A compare-and-set write found the key at another version (HTTP 412). */
export class ConflictError extends Error {
  constructor(key, currentVersion) {
    super(`version conflict on key ${String(key)}: current version ${currentVersion ?? 'absent'}`);
    this.name = 'ConflictError';
    /** The key written. */
    this.key = key;
    /** The key's version now, or null when it is absent. */
    this.currentVersion = currentVersion;
  }
}

/** The gateway refused an operation or a subscription (`status` as in HTTP). */
export class SynclineError extends Error {
  constructor(message, status, code) {
    super(message);
    this.name = 'SynclineError';
    this.status = status;
    this.code = code;
  }
}

/** The socket closed (or was not open) before the gateway answered. */
export class DisconnectedError extends Error {
  constructor(code, reason, sent) {
    super(`the WebSocket is not connected (close code ${code}${reason ? `: ${reason}` : ''})`);
    this.name = 'DisconnectedError';
    this.code = code;
    this.reason = reason;
    /** Whether the request had been sent (then the gateway may have applied it). */
    this.sent = sent;
  }
}

// ---------------------------------------------------------------------------------------------
// Bytes, keys and values on the wire

const utf8 = new TextEncoder();
const strictUtf8 = new TextDecoder('utf-8', { fatal: true });

function bytesToBase64(bytes) {
  let text = '';
  // In chunks: String.fromCharCode(...huge) overflows the stack.
  for (let i = 0; i < bytes.length; i += 0x8000) {
    text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(text);
}

function base64ToBytes(text) {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

function asBytes(value) {
  if (value instanceof Uint8Array) return value;
  if (ArrayBuffer.isView(value)) return new Uint8Array(value.buffer, value.byteOffset, value.byteLength);
  if (value instanceof ArrayBuffer) return new Uint8Array(value);
  return null;
}

// Text when the bytes are UTF-8 (as the gateway sends them), else the bytes.
function textOrBytes(bytes) {
  try {
    return strictUtf8.decode(bytes);
  } catch {
    return bytes;
  }
}

// A string that JSON would carry as a lone surrogate, which the gateway cannot parse (it would
// close the socket with 1003, and a queued write would then fail the same way on every retry).
function checkWellFormed(text, what) {
  if (typeof text.isWellFormed === 'function' ? !text.isWellFormed() : /[\uD800-\uDFFF]/u.test(text)) {
    throw new TypeError(`the ${what} holds a lone surrogate (not valid Unicode)`);
  }
}

// A key's identity in the replica: 's' + text for UTF-8 keys, 'b' + base64 for other bytes, so
// a string key and the same key given as bytes are one key, and no string can pose as bytes.
function keyOf(key) {
  if (typeof key === 'string') {
    checkWellFormed(key, 'key');
    return { id: `s${key}`, key, wire: { key } };
  }
  const bytes = asBytes(key);
  if (!bytes) throw new TypeError('a key is a string or a Uint8Array');
  const text = textOrBytes(bytes);
  if (typeof text === 'string') return { id: `s${text}`, key: text, wire: { key: text } };
  const encoded = bytesToBase64(bytes);
  return { id: `b${encoded}`, key: bytes, wire: { key: encoded, key_encoding: 'base64' } };
}

function keyFromWire(frame) {
  if (frame.key_encoding === 'base64') {
    const key = textOrBytes(base64ToBytes(frame.key));
    return typeof key === 'string' ? { id: `s${key}`, key } : { id: `b${frame.key}`, key };
  }
  return { id: `s${frame.key}`, key: frame.key };
}

function bytesOfWire(wire) {
  return wire.value_encoding === 'base64' ? base64ToBytes(wire.value) : utf8.encode(wire.value);
}

function sameWire(a, b) {
  if (a.value_encoding === b.value_encoding) return a.value === b.value;
  const x = bytesOfWire(a);
  const y = bytesOfWire(b);
  return x.length === y.length && x.every((byte, i) => byte === y[i]);
}

// ---------------------------------------------------------------------------------------------
// Events

class Emitter {
  #listeners = new Map();

  /** Calls `listener` on each `event`. */
  on(event, listener) {
    if (!this.#listeners.has(event)) this.#listeners.set(event, new Set());
    this.#listeners.get(event).add(listener);
    return this;
  }

  /** Stops calling `listener` on `event`. */
  off(event, listener) {
    this.#listeners.get(event)?.delete(listener);
    return this;
  }

  _emit(event, ...args) {
    const listeners = this.#listeners.get(event);
    if (!listeners) return;
    for (const listener of [...listeners]) {
      try {
        listener(...args);
      } catch (error) {
        // A listener's exception must not break the replica's bookkeeping: report it apart,
        // as EventTarget does.
        queueMicrotask(() => {
          throw error;
        });
      }
    }
  }
}

/** How long a socket must stay open for its loss to restart the backoff from the start. */
const STABLE_AFTER_MS = 10_000;

function backoffDelay(backoff, attempt) {
  const ceiling = Math.min(backoff.maxMs, backoff.initialMs * 2 ** Math.min(attempt, 30));
  // Jitter over the upper half, so that clients dropped together do not return together.
  return ceiling / 2 + (Math.random() * ceiling) / 2;
}

/** `http(s)://host[:port][/prefix]` or `ws(s)://…[/v1/ws]` → the WebSocket URL. */
export function socketUrl(url) {
  const parsed = new URL(String(url));
  const schemes = { 'http:': 'ws:', 'https:': 'wss:', 'ws:': 'ws:', 'wss:': 'wss:' };
  if (!(parsed.protocol in schemes)) {
    throw new TypeError(`a gateway URL is http(s):// or ws(s)://, not ${parsed.protocol}`);
  }
  parsed.protocol = schemes[parsed.protocol];
  if (!parsed.pathname.endsWith('/v1/ws')) {
    parsed.pathname = `${parsed.pathname.replace(/\/+$/, '')}/v1/ws`;
  }
  return parsed.toString();
}

// ---------------------------------------------------------------------------------------------
// The socket

/**
 * One WebSocket to a gateway, shared by any number of tables and topics (one `sub` each).
 * It reconnects after every close with exponential backoff and jitter, and each subscription
 * then resumes from its last token.
 */
export class Connection extends Emitter {
  #url;
  #WebSocket;
  #token;
  #heartbeatMs;
  #socket = null;
  #open = false;
  #closed = false;
  #status = 'connecting';
  #attempt = 0;
  #reconnectTimer = null;
  #heartbeatTimer = null;
  #connectTimeoutMs;
  #connectTimer = null;
  #heardAt = 0;
  #openedAt = 0;
  #subscribers = new Map();
  #nextSub = 0;
  #requests = new Map();
  #waiting = [];
  #nextReq = 0;

  /** @param {string | URL} url @param {object} [options] */
  constructor(url, options = {}) {
    super();
    this.#url = socketUrl(url);
    this.#WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if (typeof this.#WebSocket !== 'function') {
      throw new TypeError(
        'no WebSocket: pass options.WebSocket, or run Node 20 with --experimental-websocket',
      );
    }
    this.#token = options.token;
    this.backoff = { initialMs: 250, maxMs: 10_000, ...options.backoff };
    this.#heartbeatMs = options.heartbeatMs ?? 20_000;
    this.#connectTimeoutMs = options.connectTimeoutMs ?? 15_000;
    this.#connect();
  }

  /** The socket's URL. */
  get url() {
    return this.#url;
  }

  /** `'connecting'`, `'online'` (the socket is open) or `'offline'`. */
  get status() {
    return this.#status;
  }

  /** A live replica of the table `topic` over this socket. */
  table(topic, options = {}) {
    return new SyncTable(this, topic, options, false);
  }

  /** The records of the plain topic `topic` over this socket. */
  topic(topic, options = {}) {
    return new Topic(this, topic, options, false);
  }

  /** Closes the socket for good, and the tables and topics on it (their waiting writes fail). */
  close() {
    if (this.#closed) return;
    this.#closed = true;
    clearTimeout(this.#reconnectTimer);
    this.#abandon(this.#socket, 1000, 'closed by the client');
    for (const subscriber of [...this.#subscribers.values()]) subscriber.close();
    this.#subscribers.clear();
  }

  #setStatus(status, detail) {
    if (status === this.#status) return;
    this.#status = status;
    this._emit('status', status, detail);
  }

  #connect() {
    this.#reconnectTimer = null;
    if (this.#closed) return;
    this.#setStatus('connecting');
    let socket;
    try {
      socket = new this.#WebSocket(this.#url);
    } catch (error) {
      this.#lost(null, 1006, String(error?.message ?? error));
      return;
    }
    this.#socket = socket;
    // A connection attempt that neither opens nor fails (packets dropped) is given up.
    this.#connectTimer = setTimeout(
      () => this.#abandon(socket, 1006, 'connect timeout'),
      this.#connectTimeoutMs,
    );
    // Handlers check that their socket is still the current one: a replaced socket's late
    // events must not touch the state of its successor.
    socket.onopen = () => this.#socket === socket && this.#opened();
    socket.onmessage = (event) => this.#socket === socket && this.#received(event.data);
    socket.onclose = (event) => this.#socket === socket && this.#lost(socket, event.code, event.reason);
    // An error ends the socket too. (Browsers follow it with a close event; Node 20's
    // WebSocket does not when the connection is refused, and would leave us waiting.)
    socket.onerror = () => this.#socket === socket && this.#abandon(socket, 1006, 'network error');
  }

  // Gives up on `socket` at once (its close event, if any, is no longer awaited).
  #abandon(socket, code, reason) {
    this.#lost(socket, code, reason);
    try {
      socket?.close(code === 1006 ? undefined : code);
    } catch {
      // Not open: nothing to close.
    }
  }

  #opened() {
    clearTimeout(this.#connectTimer);
    this.#open = true;
    this.#heardAt = Date.now();
    this.#openedAt = this.#heardAt;
    // `auth` must be the first frame (browsers cannot set an Authorization header).
    if (this.#token !== undefined) this.#send({ op: 'auth', token: this.#token });
    this.#setStatus('online');
    this.#startHeartbeat();
    for (const sub of this.#subscribers.keys()) this._resubscribe(sub);
    this.#flush();
  }

  #startHeartbeat() {
    if (!(this.#heartbeatMs > 0)) return;
    // The gateway pings idle sockets, but a browser cannot see WebSocket pings; an
    // application-level ping lets the client notice a connection that died silently.
    this.#heartbeatTimer = setInterval(() => {
      if (Date.now() - this.#heardAt > 2 * this.#heartbeatMs) {
        this.#abandon(this.#socket, CLOSE_HEARTBEAT, 'no frame for two heartbeats');
        return;
      }
      this.#send({ op: 'ping' });
    }, this.#heartbeatMs);
  }

  #received(data) {
    this.#heardAt = Date.now();
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      return; // The gateway sends JSON text only.
    }
    if (typeof frame.sub === 'string') {
      this.#subscribers.get(frame.sub)?._frame(frame);
    } else if (frame.req !== undefined) {
      const request = this.#requests.get(frame.req);
      if (!request) return;
      this.#requests.delete(frame.req);
      request.resolve(frame);
      this.#flush();
    }
    // Otherwise `{"op":"pong"}`: hearing it is all it is for.
  }

  #lost(socket, code, reason) {
    if (socket) socket.onopen = socket.onmessage = socket.onclose = socket.onerror = null;
    if (this.#socket !== socket) return;
    this.#socket = null;
    this.#open = false;
    clearTimeout(this.#connectTimer);
    clearInterval(this.#heartbeatTimer);
    for (const request of this.#requests.values()) {
      request.reject(new DisconnectedError(code, reason, true));
    }
    for (const request of this.#waiting) request.reject(new DisconnectedError(code, reason, false));
    this.#requests.clear();
    this.#waiting = [];
    this.#setStatus('offline', { code, reason });
    for (const subscriber of this.#subscribers.values()) subscriber._lost(code, reason);
    if (this.#closed) return;
    // A socket that stayed up a while starts the backoff afresh; one closed soon after it
    // opened (a gateway that keeps refusing or closing it) keeps backing off, so clients do
    // not reconnect in a tight loop.
    if (this.#openedAt && Date.now() - this.#openedAt >= STABLE_AFTER_MS) this.#attempt = 0;
    this.#openedAt = 0;
    const delay = backoffDelay(this.backoff, this.#attempt++);
    this.#reconnectTimer = setTimeout(() => this.#connect(), delay);
  }

  #send(frame) {
    try {
      this.#socket.send(JSON.stringify(frame));
    } catch {
      // The socket is closing; its close event follows.
    }
  }

  #flush() {
    while (this.#open && this.#requests.size < REQUESTS_IN_FLIGHT_MAX && this.#waiting.length) {
      const request = this.#waiting.shift();
      const req = ++this.#nextReq;
      this.#requests.set(req, request);
      this.#send({ ...request.frame, req });
    }
  }

  // --- for tables and topics ---

  /** Sends an operation (`get`, `put`, `delete`); resolves with the gateway's answer frame. */
  _request(frame) {
    return new Promise((resolve, reject) => {
      if (!this.#open) {
        reject(new DisconnectedError(0, 'not connected', false));
        return;
      }
      this.#waiting.push({ frame, resolve, reject });
      this.#flush();
    });
  }

  _attach(subscriber) {
    if (this.#closed) throw new Error('the connection is closed');
    const sub = `s${++this.#nextSub}`;
    this.#subscribers.set(sub, subscriber);
    if (this.#open) this._resubscribe(sub);
    return sub;
  }

  _detach(sub) {
    if (this.#subscribers.delete(sub) && this.#open) this.#send({ op: 'unsubscribe', sub });
  }

  /** (Re)sends `sub`'s subscribe frame, from the subscriber's current token. */
  _resubscribe(sub) {
    const subscriber = this.#subscribers.get(sub);
    if (!subscriber || !this.#open) return;
    subscriber._opened();
    this.#send(subscriber._subscribeFrame(sub));
  }

  get _open() {
    return this.#open;
  }
}

// ---------------------------------------------------------------------------------------------
// What tables and topics share: one `sub` on a connection, its token, status and readiness.

class Subscription extends Emitter {
  _connection;
  _topic;
  _options;
  _sub = null;
  _token;
  _caughtUp = false; // on the current socket
  _closed = false;
  _failed = null;
  #ownsConnection;
  #status = 'connecting';
  #resolveReady;
  #rejectReady;
  #retryTimer = null;
  #errors = 0;

  constructor(connection, topic, options, ownsConnection) {
    super();
    if (typeof topic !== 'string' || topic === '') throw new TypeError('a topic name is a non-empty string');
    this._connection = connection;
    this._topic = topic;
    this._options = options;
    this._token = options.from ?? undefined;
    this.#ownsConnection = ownsConnection;
    /** Resolved at the first `caught-up`. */
    this.ready = new Promise((resolve, reject) => {
      this.#resolveReady = resolve;
      this.#rejectReady = reject;
    });
    this.ready.catch(() => {}); // Rejected on close or refusal; not unhandled if nobody waits.
  }

  // Subclasses call this once their own fields exist: attaching may subscribe at once.
  _start() {
    this._sub = this._connection._attach(this);
  }

  /** The topic's name. */
  get name() {
    return this._topic;
  }

  /** The `id` of the last event applied: where a reconnect resumes from. */
  get token() {
    return this._token;
  }

  /** `'connecting'`, `'online'` (caught up on an open socket) or `'offline'`. */
  get status() {
    return this.#status;
  }

  /** Unsubscribes (and closes the socket when the subscription owns it). */
  close() {
    if (this._closed) return;
    this._closed = true;
    clearTimeout(this.#retryTimer);
    if (this.#ownsConnection) this._connection.close();
    else this._connection._detach(this._sub);
    this.#rejectReady(new Error('closed before it caught up'));
    this.#status = 'offline';
    this._onClose();
  }

  _setStatus(status, detail) {
    if (status === this.#status || this._closed) return;
    this.#status = status;
    this._emit('status', status, detail);
  }

  _subscribeFrame(sub) {
    const frame = { op: 'subscribe', sub, table: this._topic };
    if (this._token !== undefined) frame.from = this._token;
    return frame;
  }

  _opened() {
    clearTimeout(this.#retryTimer);
    this._caughtUp = false;
    this._setStatus('connecting');
  }

  _lost(code, reason) {
    clearTimeout(this.#retryTimer);
    this._caughtUp = false;
    this._setStatus('offline', { code, reason });
  }

  _markCaughtUp() {
    this._caughtUp = true;
    this.#errors = 0;
    this._setStatus('online');
    this.#resolveReady();
  }

  _frame(frame) {
    if (this._closed || this._failed) return;
    if (frame.event === 'error') this._refused(frame);
    else this._event(frame);
  }

  // A refusal from the gateway: 400/401/403 end the subscription, others are retried.
  _refused(frame) {
    const error = new SynclineError(
      frame.error ?? `subscription to ${this._topic} refused (${frame.status})`,
      frame.status,
      frame.code,
    );
    this._emit('error', error);
    if (FATAL_SUBSCRIBE_STATUSES.has(frame.status)) {
      this._failed = error;
      this.#rejectReady(error);
      this._setStatus('offline', { code: 0, reason: error.message });
      this._connection._detach(this._sub);
      if (this.#ownsConnection) this._connection.close();
      this._onFailed(error);
      return;
    }
    // Not there yet, or the cluster is unavailable: try again later on this socket.
    const delay = backoffDelay(this._connection.backoff, this.#errors++);
    this.#retryTimer = setTimeout(() => this._connection._resubscribe(this._sub), delay);
  }

  _decodeValue(wire) {
    const value = wire.value_encoding === 'base64' ? textOrBytes(base64ToBytes(wire.value)) : wire.value;
    if (!this._options.json || typeof value !== 'string') return value;
    try {
      return JSON.parse(value);
    } catch {
      return value; // Not JSON (written by another client): the text as it is.
    }
  }

  _onClose() {}
  _onFailed() {}
}

// ---------------------------------------------------------------------------------------------
// Tables

const ABSENT = Object.freeze({ absent: true });
// A queued write's expectation when an earlier write to the same key is still waiting: it
// expects whatever that one leaves (filled in when it settles).
const AFTER_PREVIOUS = Object.freeze({ afterPrevious: true });

function expectedVersionOf(expect) {
  return expect === ABSENT ? null : expect.version;
}

/**
 * A live replica of a table: the whole table after `ready`, kept current by the gateway's
 * change stream, with writes that queue while offline.
 */
export class SyncTable extends Subscription {
  #entries = new Map(); // key id → {key, value, version, wire}
  // Deletes this client made whose echo the stream has not brought yet (key id → version):
  // an older put of that key still on its way must not bring the key back.
  #deleted = new Map();
  #staging = null; // the replica being built from a snapshot, swapped in at caught-up
  #resetting = false;
  #outbox = []; // unsettled writes, in the order they were made
  #onConflict;
  #retryTimer;

  constructor(connection, topic, options, ownsConnection) {
    super(connection, topic, options, ownsConnection);
    const onConflict = options.onConflict ?? 'last-writer-wins';
    if (
      typeof onConflict !== 'function' &&
      onConflict !== 'last-writer-wins' &&
      onConflict !== 'keep-theirs'
    ) {
      throw new TypeError("onConflict is 'last-writer-wins', 'keep-theirs' or a function");
    }
    this.#onConflict = onConflict;
    this._start();
  }

  // --- reading ---

  /** The key's value and version in the replica, or undefined when absent. */
  get(key) {
    const entry = this.#entries.get(keyOf(key).id);
    return entry && { value: entry.value, version: entry.version };
  }

  /** Whether the replica holds `key`. */
  has(key) {
    return this.#entries.has(keyOf(key).id);
  }

  /** Keys in the replica. */
  get size() {
    return this.#entries.size;
  }

  /** `[key, {value, version}]` for every key in the replica. */
  *entries() {
    for (const entry of this.#entries.values()) {
      yield [entry.key, { value: entry.value, version: entry.version }];
    }
  }

  /** Every key in the replica. */
  *keys() {
    for (const entry of this.#entries.values()) yield entry.key;
  }

  [Symbol.iterator]() {
    return this.entries();
  }

  /** Writes waiting: queued while offline, being resolved, or in flight. */
  get pending() {
    return this.#outbox.length;
  }

  // --- writing ---

  /**
   * Puts `value` at `key`. Online, it is sent at once (as a compare-and-set when `ifVersion` or
   * `ifAbsent` is given; a conflict then rejects with ConflictError). Offline, it is queued with
   * the version it expects and applied after the next `caught-up` (see `onConflict`).
   */
  put(key, value, options = {}) {
    return this.#write('put', key, value, options);
  }

  /** Deletes `key`, like `put` (with `ifVersion`). */
  delete(key, options = {}) {
    if (options.ifAbsent) {
      return Promise.reject(new TypeError('ifAbsent on a delete: an absent key has nothing to delete'));
    }
    return this.#write('delete', key, undefined, options);
  }

  #write(op, key, value, options) {
    try {
      if (this._closed) throw new Error(`table ${this._topic} is closed`);
      if (this._failed) throw this._failed;
      const { ifVersion, ifAbsent } = options;
      if (ifVersion !== undefined && ifAbsent) throw new TypeError('give ifVersion or ifAbsent, not both');
      if (ifVersion !== undefined && !(Number.isSafeInteger(ifVersion) && ifVersion >= 0)) {
        throw new TypeError('ifVersion is a version: a non-negative integer');
      }
      const { id, key: canonicalKey, wire: keyWire } = keyOf(key);
      const wire = op === 'put' ? this.#encodeValue(value) : undefined;
      // A frame over the gateway's limit would close the socket, and a queued one would do so
      // again on every reconnect: refused here. (Exact size only when it could matter: JSON
      // takes at most 6 bytes per UTF-16 unit, for `\u0000` escapes.)
      const units = keyWire.key.length + (wire?.value.length ?? 0);
      if (
        units * 6 + FRAME_OVERHEAD_BYTES > FRAME_BYTES_MAX &&
        utf8.encode(JSON.stringify({ ...keyWire, ...wire })).length + FRAME_OVERHEAD_BYTES > FRAME_BYTES_MAX
      ) {
        throw new RangeError(`the key and value exceed the gateway's ${FRAME_BYTES_MAX}-byte frame`);
      }
      if (this.#outbox.length >= WRITES_PENDING_MAX) {
        throw new Error(
          `${WRITES_PENDING_MAX} writes to ${this._topic} are already waiting for the gateway; this one is refused`,
        );
      }
      const explicit = ifVersion !== undefined ? { version: ifVersion } : ifAbsent ? ABSENT : null;
      const earlier = this.#outbox.some((write) => write.id === id);
      const replicaEntry = this.#entries.get(id);
      // What the write was decided on: used when it is queued (or its fate became unknown).
      const derived = earlier ? AFTER_PREVIOUS : replicaEntry ? { version: replicaEntry.version } : ABSENT;
      return new Promise((resolve, reject) => {
        this.#outbox.push({
          op,
          id,
          key: canonicalKey,
          keyWire,
          value,
          wire,
          explicit: explicit !== null,
          expect: explicit ?? derived,
          // Made on a live, caught-up replica: a plain write is sent unconditionally.
          madeOnline: this._caughtUp,
          conditional: explicit !== null || !this._caughtUp,
          maybeApplied: false,
          state: 'queued',
          rounds: 0,
          retries: 0,
          retryAt: 0,
          kept: undefined,
          resolve,
          reject,
        });
        this.#pump();
      });
    } catch (error) {
      return Promise.reject(error);
    }
  }

  #encodeValue(value) {
    const bytes = asBytes(value);
    if (bytes) return { value: bytesToBase64(bytes), value_encoding: 'base64' };
    if (this._options.json) {
      const text = JSON.stringify(value);
      if (text === undefined) throw new TypeError('the value has no JSON form');
      return { value: text };
    }
    if (typeof value !== 'string') {
      throw new TypeError('a value is a string or a Uint8Array (or anything JSON with { json: true })');
    }
    checkWellFormed(value, 'value');
    return { value };
  }

  // Sends what may go: only on a caught-up socket (so expectations are checked against a
  // current replica and queued writes go before newer ones), one write per key at a time (the
  // gateway runs a socket's operations concurrently, so two writes of one key in flight could
  // land in either order).
  #pump() {
    if (!this._caughtUp || this._closed || this._failed) return;
    const busy = new Set();
    const now = Date.now();
    let retryAt = Infinity;
    // (A copy: sending may settle a write at once, which takes it out of the outbox.)
    for (const write of [...this.#outbox]) {
      if (write.state === 'queued' && !busy.has(write.id)) {
        if (write.retryAt > now) retryAt = Math.min(retryAt, write.retryAt);
        else this.#send(write);
      }
      busy.add(write.id);
    }
    clearTimeout(this.#retryTimer);
    if (retryAt !== Infinity) this.#retryTimer = setTimeout(() => this.#pump(), retryAt - now);
  }

  #send(write) {
    if (write.expect === AFTER_PREVIOUS) write.expect = ABSENT; // (its predecessor vanished)
    const frame = { op: write.op, table: this._topic, ...write.keyWire, ...write.wire };
    if (write.conditional) {
      if (write.expect !== ABSENT) frame.if_version = write.expect.version;
      else if (write.op === 'put') frame.if_absent = true;
      else {
        // A delete decided on an absent key: nothing to do while it is still absent; if it
        // appeared meanwhile, that is a conflict (deletes cannot say "if absent" on the wire).
        const current = this.#entries.get(write.id);
        if (!current) this.#settle(write, { version: null });
        else this.#conflict(write, current.version);
        return;
      }
    }
    write.state = 'sent';
    this._connection._request(frame).then(
      (answer) => this.#answered(write, answer),
      (error) => this.#unanswered(write, error),
    );
  }

  #answered(write, answer) {
    if (this._closed) return;
    const maybeApplied = write.maybeApplied;
    write.maybeApplied = false;
    if (answer.status === 200) {
      this.#applyOwn(write, answer.version);
      this.#settle(
        write,
        write.kept ? { version: answer.version, kept: write.kept } : { version: answer.version },
      );
    } else if (answer.status === 412) {
      write.maybeApplied = maybeApplied;
      this.#conflict(write, answer.current_version ?? null);
    } else if (TRANSIENT_STATUSES.has(answer.status)) {
      // The cluster was unavailable; whether the write landed is unknown, so from now on it
      // carries its expectation (and a 412 showing my own value counts as applied).
      write.maybeApplied = true;
      write.conditional = true;
      write.state = 'queued';
      write.retryAt = Date.now() + backoffDelay(this._connection.backoff, write.retries++);
      this.#pump();
    } else {
      this.#fail(
        write,
        new SynclineError(answer.error ?? `status ${answer.status}`, answer.status, answer.code),
      );
    }
  }

  #unanswered(write, error) {
    if (this._closed) return;
    if (!(error instanceof DisconnectedError)) {
      this.#fail(write, error);
      return;
    }
    // Back in the queue, in its place; sent again after the next caught-up. A write that had
    // been sent may have landed: it is now conditional on what it expected.
    if (error.sent) {
      write.maybeApplied = true;
      write.conditional = true;
    }
    write.state = 'queued';
  }

  async #conflict(write, currentVersion) {
    write.state = 'resolving';
    try {
      // The caller asked for a compare-and-set on a live replica: the conflict is theirs to see.
      if (write.explicit && write.madeOnline && !write.maybeApplied) {
        this.#fail(write, new ConflictError(write.key, currentVersion));
        return;
      }
      const theirs = await this.#theirs(write, currentVersion);
      if (this._closed) return;
      // A write whose first answer was lost finds its own value: it was applied.
      if (write.maybeApplied && this.#holdsMine(write, theirs)) {
        this.#settle(write, { version: theirs?.version ?? null });
        return;
      }
      write.maybeApplied = false;
      if (write.explicit && write.madeOnline) {
        this.#fail(write, new ConflictError(write.key, theirs?.version ?? null));
        return;
      }
      if (++write.rounds > CONFLICT_ROUNDS_MAX) {
        this.#fail(
          write,
          new Error(`write to ${String(write.key)} still conflicts after ${CONFLICT_ROUNDS_MAX} rounds`),
        );
        return;
      }
      const mine = { op: write.op, value: write.value, expectedVersion: expectedVersionOf(write.expect) };
      const theirsView = theirs && { value: theirs.value, version: theirs.version };
      let resolution;
      let outcome; // the value to write, DELETE, or undefined to keep theirs
      if (this.#onConflict === 'last-writer-wins') {
        resolution = 'mine';
        outcome = write.op === 'put' ? write.value : DELETE;
      } else if (this.#onConflict === 'keep-theirs') {
        resolution = 'theirs';
      } else {
        outcome = await this.#onConflict(write.key, mine, theirsView);
        if (this._closed) return;
        resolution = outcome === undefined ? 'theirs' : 'merged';
      }
      this._emit('conflict', { key: write.key, mine, theirs: theirsView, resolution });
      if (outcome === undefined || (outcome === DELETE && !theirs)) {
        // Theirs stays (or mine was a delete of a key that is gone anyway).
        this.#settle(write, {
          version: theirs?.version ?? null,
          kept: outcome === undefined ? 'theirs' : resolution,
        });
        return;
      }
      if (outcome === DELETE) {
        write.op = 'delete';
        write.value = undefined;
        write.wire = undefined;
      } else {
        write.op = 'put';
        write.value = outcome;
        write.wire = this.#encodeValue(outcome);
      }
      // Written again, expecting what is there now.
      write.expect = theirs ? { version: theirs.version } : ABSENT;
      write.conditional = true;
      write.kept = resolution;
      write.state = 'queued';
      this.#pump();
    } catch (error) {
      if (this._closed) return;
      if (error instanceof DisconnectedError) write.state = 'queued';
      else this.#fail(write, error);
    }
  }

  // The key as it stands: the replica's copy when it is at that version, else read.
  async #theirs(write, currentVersion) {
    if (currentVersion === null) return null;
    const local = this.#entries.get(write.id);
    if (local && local.version === currentVersion) return local;
    const answer = await this._connection._request({ op: 'get', table: this._topic, ...write.keyWire });
    if (answer.status === 404) return null;
    if (answer.status !== 200)
      throw new SynclineError(answer.error ?? `status ${answer.status}`, answer.status, answer.code);
    const wire = { value: answer.value, value_encoding: answer.value_encoding };
    return { value: this._decodeValue(wire), version: answer.version, wire };
  }

  #holdsMine(write, theirs) {
    if (write.op === 'delete') return theirs === null;
    return theirs !== null && sameWire(theirs.wire, write.wire);
  }

  // The gateway acknowledged one of this client's writes at `version`: the replica shows it at
  // once (the stream's echo of it, or anything older, is then skipped).
  #applyOwn(write, version) {
    const previous = this.#entries.get(write.id);
    if (previous && previous.version >= version) return; // the stream brought it, or newer
    if ((this.#deleted.get(write.id) ?? -1) > version) return;
    if (write.op === 'put') {
      const entry = { key: write.key, value: this._decodeValue(write.wire), version, wire: write.wire };
      this.#entries.set(write.id, entry);
      this.#emitChange('put', entry, previous);
    } else {
      this.#deleted.set(write.id, version);
      if (!previous) return;
      this.#entries.delete(write.id);
      this._emit('change', {
        op: 'delete',
        key: write.key,
        value: undefined,
        version,
        previous: view(previous),
      });
    }
  }

  #settle(write, result) {
    this.#remove(write, result);
    write.resolve(result);
  }

  #fail(write, error) {
    this.#remove(write, null);
    write.reject(error);
  }

  // Takes a settled write out of the outbox and tells the next write of its key (if that one
  // was decided on it) what it left: the new version, absence, or, if it was dropped, the
  // expectation it had itself (so the next one meets the same conflict).
  #remove(write, result) {
    const at = this.#outbox.indexOf(write);
    if (at >= 0) this.#outbox.splice(at, 1);
    const next = this.#outbox.find((other) => other.id === write.id);
    if (next?.expect === AFTER_PREVIOUS) {
      const applied = result && result.kept !== 'theirs';
      if (!applied) next.expect = write.expect === AFTER_PREVIOUS ? ABSENT : write.expect;
      else if (write.op === 'delete' || result.version === null) next.expect = ABSENT;
      else next.expect = { version: result.version };
    }
    queueMicrotask(() => this.#pump());
  }

  // --- the stream ---

  _opened() {
    super._opened();
    // Without a token the gateway sends the whole table: build it aside, swap at caught-up.
    this.#staging = this._token === undefined ? new Map() : null;
    this.#resetting = false;
  }

  _lost(code, reason) {
    super._lost(code, reason);
    this.#staging = null; // An unfinished snapshot is dropped; the next socket sends it again.
  }

  _event(frame) {
    switch (frame.event) {
      case 'put':
      case 'delete':
        if (this.#staging) this.#stage(frame);
        else this.#applyChange(frame);
        // After the change: the token names the log prefix the replica now holds.
        if (frame.id !== undefined) this._token = frame.id;
        break;
      case 'reset':
        // The token could not be served: the whole table follows.
        this.#staging = new Map();
        this.#resetting = true;
        break;
      case 'caught-up':
        this._token = frame.id;
        if (this.#staging) this.#swapInSnapshot(frame.id);
        else this.#forgetEchoedDeletes(frame.id);
        this._markCaughtUp();
        this.#pump();
        break;
      case 'record':
        // (`caught-up` does not say what kind of topic it is; a record does.)
        this._refused({ status: 400, error: `${this._topic} is a plain topic, not a table: use topic()` });
        break;
      default:
        break; // `unsubscribed`, and events of later versions.
    }
  }

  #stage(frame) {
    const { id, key } = keyFromWire(frame);
    if (frame.event === 'delete') {
      this.#staging.delete(id);
      return;
    }
    const wire = { value: frame.value, value_encoding: frame.value_encoding };
    this.#staging.set(id, { key, value: this._decodeValue(wire), version: frame.version, wire });
  }

  #applyChange(frame) {
    const { id, key } = keyFromWire(frame);
    const version = frame.version;
    const deleted = this.#deleted.get(id);
    if (deleted !== undefined) {
      if (version <= deleted) {
        if (version === deleted) this.#deleted.delete(id); // the echo of my delete
        return;
      }
      this.#deleted.delete(id);
    }
    const previous = this.#entries.get(id);
    // Versions of a key only grow (a key lives in one partition; a version is its offset), so
    // an older or equal one is an acknowledged write of mine that the replica already shows.
    if (previous && version <= previous.version) return;
    if (frame.event === 'put') {
      const wire = { value: frame.value, value_encoding: frame.value_encoding };
      const entry = { key, value: this._decodeValue(wire), version, wire };
      this.#entries.set(id, entry);
      this.#emitChange('put', entry, previous);
    } else if (previous) {
      // (A delete of a key the replica does not hold changes nothing to report.)
      this.#entries.delete(id);
      this._emit('change', { op: 'delete', key, value: undefined, version, previous: view(previous) });
    }
  }

  // Swaps the snapshot in, reporting only the keys that differ from the replica it replaces.
  #swapInSnapshot(token) {
    const previousEntries = this.#entries;
    const snapshot = this.#staging;
    this.#staging = null;
    this.#entries = snapshot;
    // The snapshot is authoritative; a delete of mine it predates comes again in the stream.
    this.#deleted.clear();
    for (const [id, previous] of previousEntries) {
      if (!snapshot.has(id)) {
        this._emit('change', {
          op: 'delete',
          key: previous.key,
          value: undefined,
          version: undefined,
          previous: view(previous),
        });
      }
    }
    for (const [id, entry] of snapshot) {
      const previous = previousEntries.get(id);
      if (!previous || previous.version !== entry.version || !sameWire(previous.wire, entry.wire)) {
        this.#emitChange('put', entry, previous);
      }
    }
    if (this.#resetting) {
      this.#resetting = false;
      this._emit('reset', { token });
    }
  }

  // A delete of mine older than every partition's position has been through the stream.
  #forgetEchoedDeletes(token) {
    if (this.#deleted.size === 0 || typeof token !== 'string') return;
    const lowest = Math.min(...token.split('.').map(Number));
    for (const [id, version] of this.#deleted) if (version < lowest) this.#deleted.delete(id);
  }

  #emitChange(op, entry, previous) {
    this._emit('change', {
      op,
      key: entry.key,
      value: entry.value,
      version: entry.version,
      previous: previous && view(previous),
    });
  }

  _onClose() {
    clearTimeout(this.#retryTimer);
    this.#rejectAll(new Error(`table ${this._topic} was closed`));
  }

  _onFailed(error) {
    this.#rejectAll(error);
  }

  #rejectAll(error) {
    const writes = this.#outbox;
    this.#outbox = [];
    for (const write of writes) write.reject(error);
  }
}

function view(entry) {
  return { value: entry.value, version: entry.version };
}

// ---------------------------------------------------------------------------------------------
// Plain topics

/** The records of a plain (non-table) topic, from now, from `earliest`, or after a token. */
export class Topic extends Subscription {
  constructor(connection, topic, options, ownsConnection) {
    super(connection, topic, options, ownsConnection);
    this._start();
  }

  _event(frame) {
    if (frame.event === 'caught-up') {
      // Its id is the starting position: resuming from it reads on from there.
      this._token = frame.id;
      this._markCaughtUp();
    } else if (frame.event === 'record') {
      this._token = frame.id;
      let key = null;
      if (frame.key !== null && frame.key !== undefined) {
        key = frame.key_encoding === 'base64' ? textOrBytes(base64ToBytes(frame.key)) : frame.key;
      }
      const value =
        frame.value === null || frame.value === undefined
          ? null
          : this._decodeValue({ value: frame.value, value_encoding: frame.value_encoding });
      this._emit('record', {
        partition: frame.partition,
        offset: frame.offset,
        key,
        value,
        timestamp: frame.timestamp,
        id: frame.id,
      });
    } else if (frame.event === 'put' || frame.event === 'delete' || frame.event === 'reset') {
      this._refused({ status: 400, error: `${this._topic} is a table, not a plain topic: use table()` });
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Entry points

/** One socket to the gateway at `url`, for several tables and topics. */
export function connect(url, options = {}) {
  return new Connection(url, options);
}

/** A live replica of the table `topic`, on a socket of its own (closed with it). */
export function table(url, topic, options = {}) {
  return owning(
    new Connection(url, options),
    (connection) => new SyncTable(connection, topic, options, true),
  );
}

/** The records of the plain topic `topic`, on a socket of its own (closed with it). */
export function topic(url, topicName, options = {}) {
  return owning(
    new Connection(url, options),
    (connection) => new Topic(connection, topicName, options, true),
  );
}

function owning(connection, make) {
  try {
    return make(connection);
  } catch (error) {
    connection.close(); // Bad options: no socket left behind.
    throw error;
  }
}
