// Types for syncline.js: live tables and topics over a Syncline gateway's WebSocket.

/** A key: text, or bytes that are not UTF-8 (UTF-8 bytes are the same key as their text). */
export type Key = string | Uint8Array;

/** A value as stored without `json`: text, or bytes that are not UTF-8. */
export type Bytes = string | Uint8Array;

/**
 * - `connecting`: the socket is open and the subscription is catching up;
 * - `online`: caught up on an open socket (writes are sent at once);
 * - `offline`: no socket (writes queue; a reconnect is scheduled).
 */
export type Status = 'connecting' | 'online' | 'offline';

/** Why the socket went away (`code` 4008: too slow, 1003: a frame not understood, 1006: lost). */
export interface StatusDetail {
  code: number;
  reason: string;
}

/** Reconnect delays: doubling from `initialMs` up to `maxMs`, each with jitter. */
export interface Backoff {
  /** Default 250. */
  initialMs?: number;
  /** Default 10000. */
  maxMs?: number;
}

/** What the client needs of a WebSocket (the WHATWG API). */
export interface WebSocketLike {
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((event: unknown) => void) | null;
  onmessage: ((event: { data: unknown }) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
  onerror: ((event: unknown) => void) | null;
}

export type WebSocketConstructor = new (url: string) => WebSocketLike;

export interface ConnectionOptions {
  /** Bearer token, sent as the first frame (`{"op":"auth"}`). */
  token?: string;
  /** The WebSocket constructor (default `globalThis.WebSocket`). */
  WebSocket?: WebSocketConstructor;
  backoff?: Backoff;
  /** Application-level ping interval; two silent intervals drop the socket. 0 disables. Default 20000. */
  heartbeatMs?: number;
  /** A connection attempt neither opened nor failed after this long is abandoned. Default 15000. */
  connectTimeoutMs?: number;
}

/** A key's value and version (the offset of the write that set it). */
export interface Entry<V> {
  value: V;
  version: number;
}

/** A change to the replica. */
export interface Change<V> {
  op: 'put' | 'delete';
  key: Key;
  /** The new value (undefined for a delete). */
  value: V | undefined;
  /** The change's version (undefined for a delete learnt from a reset's snapshot). */
  version: number | undefined;
  /** What the replica held before (undefined when the key was absent). */
  previous: Entry<V> | undefined;
}

/** A queued write that met a conflict. */
export interface Mine<V> {
  op: 'put' | 'delete';
  /** The value written (undefined for a delete). */
  value: V | undefined;
  /** The version it was decided on (null: it expected the key absent). */
  expectedVersion: number | null;
}

/** Returned by an `onConflict` function to delete the key. */
export declare const DELETE: unique symbol;

/**
 * Decides a conflict of a queued write: the value to write (expecting `theirs.version`), `DELETE`,
 * or undefined to drop mine and keep theirs. `theirs` is null when the key is absent.
 */
export type ConflictResolver<V> = (
  key: Key,
  mine: Mine<V>,
  theirs: Entry<V> | null,
) => V | Uint8Array | typeof DELETE | undefined | Promise<V | Uint8Array | typeof DELETE | undefined>;

export type ConflictStrategy<V> = 'last-writer-wins' | 'keep-theirs' | ConflictResolver<V>;

/** A conflict a queued write met, and how `onConflict` decided it. */
export interface Conflict<V> {
  key: Key;
  mine: Mine<V>;
  theirs: Entry<V> | null;
  resolution: 'mine' | 'theirs' | 'merged';
}

/**
 * How a write ended. `version` is the version it wrote; when theirs was kept, theirs (null when
 * the key is absent); null for a delete of a key that was absent anyway. `kept` is set when a
 * conflict was resolved: `'mine'` (written again over theirs), `'theirs'` (mine dropped), or
 * `'merged'` (the `onConflict` function's value written).
 */
export interface WriteResult {
  version: number | null;
  kept?: 'mine' | 'theirs' | 'merged';
}

export interface PutOptions {
  /** Write only if the key is at this version. */
  ifVersion?: number;
  /** Write only if the key is absent. */
  ifAbsent?: boolean;
}

export interface DeleteOptions {
  /** Delete only if the key is at this version. */
  ifVersion?: number;
}

export interface TableOptions<V> {
  /** Values are JSON: stringified on write, parsed on read (default false: strings). */
  json?: boolean;
  /** How a queued write that conflicts is decided (default `'last-writer-wins'`). */
  onConflict?: ConflictStrategy<V>;
  /** A resume token (an earlier `token`): only the changes after it are streamed. */
  from?: string;
}

export interface TopicOptions {
  /** Values are JSON (parsed on read). */
  json?: boolean;
  /** `'earliest'`, `'latest'` (default: records from now on) or a resume token. */
  from?: string;
}

/** A record of a plain topic. */
export interface TopicRecord<V> {
  partition: number;
  offset: number;
  /** Null for an unkeyed record. */
  key: Key | null;
  /** Null for a tombstone. */
  value: V | null;
  /** Milliseconds since the Unix epoch. */
  timestamp: number;
  /** The resume token after this record. */
  id: string;
}

/** Most writes waiting per table (10,000); more are refused. */
export declare const WRITES_PENDING_MAX: number;
/** The gateway's largest frame (1 MiB); larger writes are refused. */
export declare const FRAME_BYTES_MAX: number;
/** Close code 4008: too slow; the client resumes from its last tokens. */
export declare const CLOSE_TOO_SLOW: 4008;
/** Close code 1003: the gateway did not understand a frame. */
export declare const CLOSE_UNSUPPORTED: 1003;
/** Close code 4000: the client dropped a socket silent for two heartbeats. */
export declare const CLOSE_HEARTBEAT: 4000;

/** A compare-and-set write found the key at another version (HTTP 412). */
export declare class ConflictError extends Error {
  constructor(key: Key, currentVersion: number | null);
  readonly name: 'ConflictError';
  readonly key: Key;
  /** The key's version now, or null when it is absent. */
  readonly currentVersion: number | null;
}

/** The gateway refused an operation or a subscription. */
export declare class SynclineError extends Error {
  constructor(message: string, status: number, code?: string);
  readonly name: 'SynclineError';
  /** As in HTTP: 400, 401, 403, 404, 429, 503... */
  readonly status: number;
  /** The cluster's code (`NOT_FOUND`, `PERMISSION_DENIED`...), when given. */
  readonly code: string | undefined;
}

/** The socket closed (or was not open) before the gateway answered. */
export declare class DisconnectedError extends Error {
  readonly name: 'DisconnectedError';
  readonly code: number;
  readonly reason: string;
  /** Whether the request had been sent (then the gateway may have applied it). */
  readonly sent: boolean;
}

/** `http(s)://host[:port][/prefix]` or `ws(s)://…` → the gateway's WebSocket URL (`…/v1/ws`). */
export declare function socketUrl(url: string | URL): string;

/** One socket to a gateway, shared by tables and topics; reconnects by itself. */
export declare class Connection {
  constructor(url: string | URL, options?: ConnectionOptions);
  readonly url: string;
  /** `online` here means only that the socket is open. */
  readonly status: Status;
  backoff: Required<Backoff>;
  table<V = Bytes>(topic: string, options?: TableOptions<V>): SyncTable<V>;
  topic<V = Bytes>(topic: string, options?: TopicOptions): Topic<V>;
  on(event: 'status', listener: (status: Status, detail?: StatusDetail) => void): this;
  off(event: 'status', listener: (status: Status, detail?: StatusDetail) => void): this;
  /** Closes the socket for good, and every table and topic on it. */
  close(): void;
}

interface SubscriptionEvents {
  status: (status: Status, detail?: StatusDetail) => void;
  /** A subscription refused by the gateway (401/403/400 end it; others are retried). */
  error: (error: SynclineError) => void;
}

/** A live replica of a table. */
export declare class SyncTable<V = Bytes> {
  /** Resolved at the first `caught-up`: the replica holds the whole table. */
  readonly ready: Promise<void>;
  readonly name: string;
  readonly status: Status;
  /** The last resume id seen: where a reconnect resumes from. */
  readonly token: string | undefined;
  /** Keys in the replica. */
  readonly size: number;
  /** Writes waiting: queued while offline, being resolved, or in flight. */
  readonly pending: number;

  get(key: Key): Entry<V> | undefined;
  has(key: Key): boolean;
  entries(): IterableIterator<[Key, Entry<V>]>;
  keys(): IterableIterator<Key>;
  [Symbol.iterator](): IterableIterator<[Key, Entry<V>]>;

  /**
   * Online: sent at once; with `ifVersion`/`ifAbsent`, a conflict rejects with ConflictError.
   * Offline (or before `ready`): queued with the version it expects, applied after the next
   * caught-up; a conflict then goes to `onConflict`. Rejects with an Error when
   * WRITES_PENDING_MAX writes are waiting, and with TypeError/RangeError for a bad key or value.
   */
  put(key: Key, value: V | Uint8Array, options?: PutOptions): Promise<WriteResult>;
  delete(key: Key, options?: DeleteOptions): Promise<WriteResult>;

  on(event: 'change', listener: (change: Change<V>) => void): this;
  /** After a reset's snapshot replaced the replica (its changes were emitted before). */
  on(event: 'reset', listener: (info: { token: string }) => void): this;
  on(event: 'conflict', listener: (conflict: Conflict<V>) => void): this;
  on<E extends keyof SubscriptionEvents>(event: E, listener: SubscriptionEvents[E]): this;
  off(event: 'change' | 'reset' | 'conflict' | keyof SubscriptionEvents, listener: (...args: any[]) => void): this;

  /** Unsubscribes (closing its own socket); waiting writes are rejected. */
  close(): void;
}

/** The records of a plain topic. */
export declare class Topic<V = Bytes> {
  /** Resolved at the first `caught-up` (the starting position is known). */
  readonly ready: Promise<void>;
  readonly name: string;
  readonly status: Status;
  /** The resume token after the last record seen. */
  readonly token: string | undefined;

  on(event: 'record', listener: (record: TopicRecord<V>) => void): this;
  on<E extends keyof SubscriptionEvents>(event: E, listener: SubscriptionEvents[E]): this;
  off(event: 'record' | keyof SubscriptionEvents, listener: (...args: any[]) => void): this;
  close(): void;
}

/** One socket to the gateway at `url`, for several tables and topics. */
export declare function connect(url: string | URL, options?: ConnectionOptions): Connection;

/** A live replica of the table `topic` on a socket of its own. */
export declare function table<V = Bytes>(
  url: string | URL,
  topic: string,
  options?: ConnectionOptions & TableOptions<V>,
): SyncTable<V>;

/** The records of the plain topic `topic` on a socket of its own. */
export declare function topic<V = Bytes>(
  url: string | URL,
  topic: string,
  options?: ConnectionOptions & TopicOptions,
): Topic<V>;
