//! `GET /v1/ws`: a WebSocket of JSON text frames, for many subscriptions and table writes over
//! one connection.
//!
//! ## Frames from the client
//! - `{"op": "auth", "token": "T"}`: the caller's bearer token, as the first frame (browsers
//!   cannot set headers on a WebSocket); `?token=T` on the URL or an `Authorization` header
//!   at the upgrade do the same.
//! - `{"op": "subscribe", "sub": "s1", "table": "prices", "from": "TOKEN"}` (`from`
//!   optional; `earliest` for a plain topic's first records): follow a table (or a plain
//!   topic, named the same way) as [`crate::watch`] describes; frames `{"sub": "s1", "event":
//!   "put" | "delete" | "caught-up" | "reset" | "record", "key", "value", "version", "id":
//!   TOKEN}`.
//! - `{"op": "unsubscribe", "sub": "s1"}`: answered `{"sub": "s1", "event": "unsubscribed"}`.
//! - `{"op": "get", "req": "r1", "table": "t", "key": "k"}`: answered `{"req": "r1",
//!   "status": 200, "key", "value", "version"}` or `{"req": "r1", "status": 404}`.
//! - `{"op": "put", "req": "r2", "table": "t", "key": "k", "value": "v", "if_version": N}` or
//!   `"if_absent": true`: answered `{"req": "r2", "status": 200, "version": N}`, or `{"req":
//!   "r2", "status": 412, "current_version": N | null, "current_value": V | null}` on a
//!   conflict.
//! - `{"op": "delete", "req": "r3", "table": "t", "key": "k", "if_version": N}` likewise.
//! - `{"op": "ping"}`: answered `{"op": "pong"}` (WebSocket pings are answered too).
//!
//! Operations (get, put, delete) on one socket run concurrently: answers can come in another
//! order than the requests, and two writes to one key sent back to back can land in either
//! order. Match answers by `req`, and send a write that must follow another once the first is
//! answered (the JS client does so per key).
//!
//! Keys and values that are not UTF-8 travel as base64 with `key_encoding` / `value_encoding`
//! `"base64"`, both ways. A refused or failed operation is answered with its HTTP-like
//! `status` and `error` (`{"sub": "s1", "event": "error", ...}` for a subscription).
//!
//! ## Limits and close codes
//! At most [`SUBSCRIPTIONS_MAX`] subscriptions and [`REQUESTS_IN_FLIGHT_MAX`] operations in
//! flight per socket; frames of at most [`FRAME_BYTES_MAX`]; `sub` names of at most
//! [`SUB_BYTES_MAX`] bytes and `req` ids of at most [`REQ_BYTES_MAX`] (longer: close 1003). A
//! browser page from another site (an `Origin` that is not the gateway's own nor allowed by
//! `--allow-origin`) is refused with 403 at the upgrade. The socket buffers at most
//! [`SOCKET_BUFFER`] frames for the client: a client whose buffer stays full for
//! [`SLOW_AFTER`] (or whose subscription fell behind the table) is closed with code **4008** (`too slow: resume from
//! your last tokens`); it reconnects and subscribes with `from` = the last `id` it saw of each
//! table. A frame that is not understood closes with **1003** (unsupported data) naming why
//! (the reason cut to the 123 bytes a close frame holds).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use syncline_client::Error;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinHandle;

use crate::http::{token, ApiError, Gateway};
use crate::json::{decode, put_bytes};
use crate::watch::{parse_start, subscribe, Out, SLOW_AFTER};

/// Subscriptions one socket may hold.
pub const SUBSCRIPTIONS_MAX: usize = 256;
/// Operations (get, put, delete) one socket may have in flight.
pub const REQUESTS_IN_FLIGHT_MAX: usize = 64;
/// Longest subscription name (`sub`), in bytes.
pub const SUB_BYTES_MAX: usize = 128;
/// Longest request id (`req`, as JSON), in bytes.
pub const REQ_BYTES_MAX: usize = 256;
/// Largest frame the client may send.
pub const FRAME_BYTES_MAX: usize = 1024 * 1024;
/// Frames buffered for the client before it counts as too slow (the default of
/// `--socket-buffer-frames`).
pub const SOCKET_BUFFER: usize = 8192;
/// The close code of a client that fell behind.
pub const CLOSE_TOO_SLOW: u16 = 4008;
/// The close code of a frame that is not understood.
pub const CLOSE_UNSUPPORTED: u16 = 1003;
/// Queued frames written together before a flush.
const BATCH_FRAMES_MAX: usize = 64;
/// Bytes a socket buffers for reading and writing (tungstenite's default is 128 KiB each;
/// frames from browsers are small, and writes are flushed per burst).
const SOCKET_IO_BUFFER: usize = 4 * 1024;
/// How often the gateway pings an idle socket.
const PING_EVERY: Duration = Duration::from_secs(20);

/// `?token=`.
#[derive(Debug, Deserialize)]
pub struct WsQuery {
    token: Option<String>,
}

/// A frame from the client.
#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
enum Frame {
    Auth {
        token: String,
    },
    Subscribe {
        sub: String,
        table: String,
        #[serde(default)]
        from: Option<String>,
    },
    Unsubscribe {
        sub: String,
    },
    Get {
        req: Value,
        table: String,
        key: String,
        #[serde(default)]
        key_encoding: Option<String>,
    },
    Put {
        req: Value,
        table: String,
        key: String,
        #[serde(default)]
        key_encoding: Option<String>,
        value: String,
        #[serde(default)]
        value_encoding: Option<String>,
        #[serde(default)]
        if_version: Option<u64>,
        #[serde(default)]
        if_absent: bool,
    },
    Delete {
        req: Value,
        table: String,
        key: String,
        #[serde(default)]
        key_encoding: Option<String>,
        #[serde(default)]
        if_version: Option<u64>,
    },
    Ping,
}

/// The upgrade route.
pub async fn ws(
    State(gateway): State<Arc<Gateway>>,
    Query(query): Query<WsQuery>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    crate::http::check_origin(&headers, &gateway.origins)?;
    let caller = token(&headers)?.or(query.token);
    Ok(upgrade
        .max_message_size(FRAME_BYTES_MAX)
        .read_buffer_size(SOCKET_IO_BUFFER)
        .write_buffer_size(SOCKET_IO_BUFFER)
        .on_upgrade(move |socket| serve(gateway, caller, socket)))
}

/// What goes to the client: frames through a bounded queue, and a close that overtakes them.
#[derive(Clone)]
struct Outbox {
    frames: mpsc::Sender<String>,
    close: Arc<watch::Sender<Option<(u16, String)>>>,
}

impl Outbox {
    /// Queues `frame`; a queue that stays full for [`SLOW_AFTER`] means the client is too
    /// slow: the socket is closed with [`CLOSE_TOO_SLOW`] and false returned.
    async fn frame(&self, frame: Value) -> bool {
        self.text(frame.to_string()).await
    }

    /// Queues a frame already rendered as JSON text, as [`Outbox::frame`].
    async fn text(&self, frame: String) -> bool {
        // Room in the queue (the usual case) needs no timer.
        let frame = match self.frames.try_send(frame) {
            Ok(()) => return true,
            Err(mpsc::error::TrySendError::Closed(_)) => return false,
            Err(mpsc::error::TrySendError::Full(frame)) => frame,
        };
        if self.frames.send_timeout(frame, SLOW_AFTER).await.is_ok() {
            return true;
        }
        self.close(CLOSE_TOO_SLOW, "too slow: resume from your last tokens");
        false
    }

    /// Closes the socket with `code` (the first close asked for wins).
    fn close(&self, code: u16, reason: impl Into<String>) {
        let reason = reason.into();
        self.close.send_if_modified(|current| {
            if current.is_some() {
                return false;
            }
            *current = Some((code, reason));
            true
        });
    }
}

/// How long the gateway tries to hand a close frame to a client that is not reading.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(30);

async fn serve(gateway: Arc<Gateway>, mut caller: Option<String>, socket: WebSocket) {
    use futures_util::{SinkExt as _, StreamExt as _};
    let (mut sink, mut stream) = socket.split();
    let (frames, mut frames_rx) = mpsc::channel::<String>(gateway.limits.socket_frames.max(1));
    let (close, mut close_rx) = watch::channel::<Option<(u16, String)>>(None);
    let out = Outbox {
        frames,
        close: Arc::new(close),
    };
    let writer = tokio::spawn(async move {
        // The first ping after PING_EVERY, not at once (an interval's first tick is now).
        let mut ping =
            tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
        loop {
            let message = tokio::select! {
                biased;
                changed = close_rx.changed() => {
                    let Some((code, reason)) = close_rx.borrow_and_update().clone() else {
                        if changed.is_err() { return; }
                        continue;
                    };
                    // Queued frames are dropped: the client resumes from its tokens.
                    let frame = Message::Close(Some(CloseFrame {
                        code,
                        reason: Utf8Bytes::from(close_reason(reason)),
                    }));
                    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
                        // After the client's own close, tungstenite has queued the reply and
                        // refuses another close frame: flushing sends the queued one.
                        if sink.send(frame).await.is_err() {
                            let _ = sink.flush().await;
                        }
                        let _ = sink.close().await;
                    })
                    .await;
                    return;
                }
                next = frames_rx.recv() => match next {
                    Some(frame) => Message::Text(Utf8Bytes::from(frame)),
                    None => return,
                },
                _ = ping.tick() => Message::Ping(Default::default()),
            };
            if sink.feed(message).await.is_err() {
                return;
            }
            // Frames already queued go out in the same write (one syscall for a burst, not
            // one per frame), up to a bound so a close still overtakes a long queue.
            for _ in 0..BATCH_FRAMES_MAX {
                let Ok(frame) = frames_rx.try_recv() else {
                    break;
                };
                let message = Message::Text(Utf8Bytes::from(frame));
                if sink.feed(message).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
    });
    let mut subscriptions: HashMap<String, JoinHandle<()>> = HashMap::new();
    let in_flight = Arc::new(Semaphore::new(REQUESTS_IN_FLIGHT_MAX));
    let mut operated = false;
    while let Some(Ok(message)) = stream.next().await {
        let text = match message {
            Message::Text(text) => text,
            Message::Close(_) => {
                // Answer the client's close (else it sees 1006, an unclean close).
                out.close(1000, "");
                break;
            }
            Message::Binary(_) => {
                out.close(CLOSE_UNSUPPORTED, "frames are JSON text");
                break;
            }
            _ => continue,
        };
        let frame: Frame = match serde_json::from_str(&text) {
            Ok(frame) => frame,
            Err(error) => {
                out.close(
                    CLOSE_UNSUPPORTED,
                    format!("a frame that is not understood: {error}"),
                );
                break;
            }
        };
        if let Err(why) = check_ids(&frame) {
            out.close(CLOSE_UNSUPPORTED, why);
            break;
        }
        subscriptions.retain(|_, task| !task.is_finished());
        match frame {
            Frame::Auth { token } if !operated => caller = Some(token),
            Frame::Auth { .. } => {
                out.close(CLOSE_UNSUPPORTED, "`auth` must be the first frame");
                break;
            }
            Frame::Ping => {
                operated = true;
                out.frame(json!({"op": "pong"})).await;
            }
            Frame::Subscribe { sub, table, from } => {
                operated = true;
                if subscriptions.contains_key(&sub) || subscriptions.len() >= SUBSCRIPTIONS_MAX {
                    let why = if subscriptions.contains_key(&sub) {
                        format!("subscription `{sub}` exists")
                    } else {
                        format!("at most {SUBSCRIPTIONS_MAX} subscriptions per socket")
                    };
                    out.frame(json!({"sub": sub, "event": "error", "status": 400, "error": why}))
                        .await;
                    continue;
                }
                let task = tokio::spawn(follow(
                    gateway.clone(),
                    caller.clone(),
                    sub.clone(),
                    table,
                    from,
                    out.clone(),
                ));
                subscriptions.insert(sub, task);
            }
            Frame::Unsubscribe { sub } => {
                operated = true;
                if let Some(task) = subscriptions.remove(&sub) {
                    task.abort();
                }
                out.frame(json!({"sub": sub, "event": "unsubscribed"}))
                    .await;
            }
            operation => {
                operated = true;
                let Ok(permit) = in_flight.clone().acquire_owned().await else {
                    break;
                };
                let gateway = gateway.clone();
                let caller = caller.clone();
                let out = out.clone();
                tokio::spawn(async move {
                    let answer = operate(&gateway, caller.as_deref(), operation).await;
                    out.frame(answer).await;
                    drop(permit);
                });
            }
        }
    }
    for task in subscriptions.into_values() {
        task.abort();
    }
    drop(out);
    let _ = writer.await;
}

/// Refuses a `sub` or `req` longer than their limits: they are copied into every answer or
/// event of theirs, so their size bounds the socket's queued bytes.
fn check_ids(frame: &Frame) -> Result<(), String> {
    let (sub, req) = match frame {
        Frame::Subscribe { sub, .. } | Frame::Unsubscribe { sub } => (Some(sub), None),
        Frame::Get { req, .. } | Frame::Put { req, .. } | Frame::Delete { req, .. } => {
            (None, Some(req))
        }
        Frame::Auth { .. } | Frame::Ping => (None, None),
    };
    if sub.is_some_and(|sub| sub.len() > SUB_BYTES_MAX) {
        return Err(format!("`sub` is longer than {SUB_BYTES_MAX} bytes"));
    }
    if req.is_some_and(|req| req.to_string().len() > REQ_BYTES_MAX) {
        return Err(format!("`req` is longer than {REQ_BYTES_MAX} bytes"));
    }
    Ok(())
}

/// A close frame's reason: at most 123 bytes (a control frame carries 125), cut at a
/// character boundary.
fn close_reason(mut reason: String) -> String {
    const REASON_BYTES_MAX: usize = 123;
    if reason.len() > REASON_BYTES_MAX {
        let mut cut = REASON_BYTES_MAX;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason.truncate(cut);
    }
    reason
}

/// One subscription: its events as frames, until it ends (unsubscribed, or the client fell
/// behind: the socket is then closed with [`CLOSE_TOO_SLOW`]).
async fn follow(
    gateway: Arc<Gateway>,
    caller: Option<String>,
    sub: String,
    table: String,
    from: Option<String>,
    out: Outbox,
) {
    let from = match parse_start(from.as_deref()) {
        Ok(from) => from,
        Err(error) => {
            out.frame(error_frame("sub", &sub, error)).await;
            return;
        }
    };
    // Boxed: the task idles in the loop below, and should not carry the (much larger)
    // state of the subscribe call all its life.
    let mut events = match Box::pin(subscribe(&gateway, caller.as_deref(), &table, from)).await {
        Ok(events) => events,
        Err(error) => {
            out.frame(error_frame("sub", &sub, error)).await;
            return;
        }
    };
    let sub_json = Value::String(sub.clone()).to_string();
    while let Some(event) = events.recv().await {
        let failed = matches!(event, Out::Failed { .. });
        if let Out::Change(change) = &event {
            // Rendered once by the table's hub: only this subscription's fields are added.
            let data = change.data.strip_prefix('{').unwrap_or("}");
            let separator = if data == "}" { "" } else { "," };
            let frame = format!(
                r#"{{"sub":{sub_json},"event":"{}","id":"{}"{separator}{data}"#,
                change.name, change.token
            );
            if !out.text(frame).await {
                return;
            }
            continue;
        }
        let mut frame = event.data();
        frame.insert("sub".into(), json!(sub));
        frame.insert("event".into(), json!(event.name()));
        if let Some(token) = event.token() {
            frame.insert("id".into(), json!(token));
        }
        if !out.frame(Value::Object(frame)).await || failed {
            // A failure ends this subscription only (its `error` frame says why); the socket
            // and its other subscriptions go on.
            return;
        }
    }
    // The stream ended without a failure: this subscription fell behind.
    out.close(CLOSE_TOO_SLOW, "too slow: resume from your last tokens");
}

fn error_frame(field: &str, id: &str, error: ApiError) -> Value {
    let (status, body) = error.parts();
    let mut frame = match body {
        Value::Object(map) => map,
        _ => Map::new(),
    };
    frame.insert(field.into(), json!(id));
    frame.insert("status".into(), json!(status));
    if field == "sub" {
        frame.insert("event".into(), json!("error"));
    }
    Value::Object(frame)
}

/// Answers a get, put or delete frame.
async fn operate(gateway: &Gateway, caller: Option<&str>, frame: Frame) -> Value {
    let (req, result) = match frame {
        Frame::Get {
            req,
            table,
            key,
            key_encoding,
        } => (req, get(gateway, caller, &table, &key, key_encoding).await),
        Frame::Put {
            req,
            table,
            key,
            key_encoding,
            value,
            value_encoding,
            if_version,
            if_absent,
        } => {
            let result = match decode(&value, value_encoding.as_deref(), "value") {
                Ok(value) => {
                    let put = Write {
                        table,
                        key,
                        key_encoding,
                        value: Some(value),
                        if_version,
                        if_absent,
                    };
                    write(gateway, caller, put).await
                }
                Err(error) => Err(ApiError::bad_request(error)),
            };
            (req, result)
        }
        Frame::Delete {
            req,
            table,
            key,
            key_encoding,
            if_version,
        } => {
            let delete = Write {
                table,
                key,
                key_encoding,
                value: None,
                if_version,
                if_absent: false,
            };
            (req, write(gateway, caller, delete).await)
        }
        _ => return json!({"status": 400, "error": "not an operation"}),
    };
    match result {
        Ok(mut answer) => {
            answer.insert("req".into(), req);
            answer.insert("status".into(), json!(200));
            Value::Object(answer)
        }
        Err(error) => {
            let (status, body) = error.parts();
            let mut answer = match body {
                Value::Object(map) => map,
                _ => Map::new(),
            };
            answer.insert("req".into(), req);
            answer.insert("status".into(), json!(status));
            Value::Object(answer)
        }
    }
}

async fn get(
    gateway: &Gateway,
    caller: Option<&str>,
    table: &str,
    key: &str,
    key_encoding: Option<String>,
) -> Result<Map<String, Value>, ApiError> {
    let key = decode(key, key_encoding.as_deref(), "key").map_err(ApiError::bad_request)?;
    let handle = gateway.clients.table(caller, table).await?;
    match handle.get(&key).await? {
        Some(entry) => {
            let mut answer = Map::new();
            put_bytes(&mut answer, "key", Some(&key));
            put_bytes(&mut answer, "value", Some(&entry.value));
            answer.insert("version".into(), json!(entry.version));
            Ok(answer)
        }
        None => Err(ApiError::not_found("no such key")),
    }
}

/// A put (`value`) or delete (None) of a frame, with its condition.
struct Write {
    table: String,
    key: String,
    key_encoding: Option<String>,
    value: Option<Vec<u8>>,
    if_version: Option<u64>,
    if_absent: bool,
}

async fn write(
    gateway: &Gateway,
    caller: Option<&str>,
    write: Write,
) -> Result<Map<String, Value>, ApiError> {
    let key =
        decode(&write.key, write.key_encoding.as_deref(), "key").map_err(ApiError::bad_request)?;
    let handle = gateway.clients.table(caller, &write.table).await?;
    let written: Result<_, Error> = match (write.value, write.if_version, write.if_absent) {
        (_, Some(_), true) => {
            return Err(ApiError::bad_request(
                "give if_version or if_absent, not both",
            ))
        }
        (Some(value), None, false) => handle.put(&key, &value).await,
        (Some(value), Some(version), false) => handle.put_if(&key, &value, version).await,
        (Some(value), None, true) => handle.put_if_absent(&key, &value).await,
        (None, None, false) => handle.delete(&key).await,
        (None, Some(version), false) => handle.delete_if(&key, version).await,
        (None, None, true) => {
            return Err(ApiError::bad_request(
                "if_absent on a delete: an absent key has nothing to delete",
            ))
        }
    };
    let written = match written {
        Ok(written) => written,
        Err(error) => {
            return Err(ApiError::from(error)
                .with_current_value(&handle, &key)
                .await)
        }
    };
    let mut answer = Map::new();
    answer.insert("version".into(), json!(written.version));
    Ok(answer)
}
