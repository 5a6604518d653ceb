//! The Syncline gateway: browsers and apps reach a Syncline cluster over HTTP/JSON, without
//! gRPC. It is a client of the cluster (through `syncline-client`), so it scales apart from the
//! brokers and holds no data of its own.
//!
//! ## What it serves
//! - `GET /v1/topics`: `{"topics": [{"name", "partitions", "table"}]}`.
//! - `GET /v1/tables/{topic}/{key}`: 200 `{"key", "value", "version"}` (and an `ETag` of the
//!   version) or 404.
//! - `PUT /v1/tables/{topic}/{key}` with the value as the body; `If-Match: <version>` writes
//!   only at that version, `If-None-Match: *` only where the key is absent: 200 `{"version"}`,
//!   or 412 `{"current_version": N | null, "current_value": V | null}` on a conflict.
//! - `DELETE /v1/tables/{topic}/{key}`, with `If-Match` likewise.
//! - `POST /v1/topics/{topic}/records` with a JSON array of `{"key", "value"}`: 200
//!   `{"records": [{"partition", "offset"}]}` once all are acknowledged.
//! - `GET /v1/watch/{topic}`: the table over Server-Sent Events, resumable by token
//!   ([`watch`]).
//! - `GET /v1/ws`: a WebSocket of JSON frames: subscriptions to tables and get / put / delete
//!   with compare-and-set ([`ws`]).
//! - `GET /v1/cluster`, `GET /v1/topics/{topic}`, `GET /v1/groups`, `GET /v1/groups/{group}`:
//!   nodes, partitions with offsets, groups with lag ([`admin`]).
//!
//! With `--listen-cert` and `--listen-key` it serves HTTPS and WSS instead, reloading the
//! certificate on SIGHUP ([`tls`]).
//!
//! Keys in paths are URL-encoded UTF-8; with `?encoding=base64` the path's key is base64 of
//! arbitrary bytes. In JSON, a key or value that is not UTF-8 is base64 with
//! `"key_encoding": "base64"` / `"value_encoding": "base64"` beside it, as `syncline consume
//! --json` prints them; a request may send either form.
//!
//! ## Who is calling
//! A request's `Authorization: Bearer TOKEN` is passed on to the brokers, which authenticate
//! it and apply their ACLs (so the gateway enforces exactly the brokers' permissions and holds
//! no key material); a request without one uses the gateway's own `--token`, if any. Refusals
//! come back as 401 / 403 with the broker's message. Connections are kept per token (at most
//! [`clients::CLIENTS_MAX`]).
//!
//! It also serves the web console at `/console/` and the JS client at `/syncline.js` (with
//! `/syncline.d.ts`), compiled into the binary ([`console`]; sources in `gateway/console/`
//! and `gateway/js/`).
//!
//! Modules: [`clients`] (connections and table handles per caller), [`json`] (bytes <-> JSON),
//! [`admin`] (read-only cluster views), [`console`] (the console and the JS client), [`tls`]
//! (HTTPS on the gateway's port),
//! [`http`] (routes and the error -> HTTP status mapping), [`watch`] (SSE and the shared
//! table copies), [`ws`] (the WebSocket protocol). It may call `syncline-client` only.

pub mod admin;
pub mod clients;
pub mod console;
pub mod http;
pub mod json;
pub mod limit;
pub mod tls;
pub mod watch;
pub mod ws;

/// The gateway's default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7460";
