//! `GET /v1/watch/{topic}`: a table followed over Server-Sent Events.
//!
//! ## The stream
//! 1. `event: put` for every current entry (data `{"key", "value", "version"}`, bytes as in
//!    [`crate::json`]), then `event: caught-up` (data `{}`);
//! 2. then every change as it is applied: `event: put`, or `event: delete` (data `{"key",
//!    "version"}`).
//!
//! `caught-up` and every change carry an `id:` that is a resume token: the table's next offset
//! in each partition after that event, joined by `.` (`15.7.0`). A client that reconnects with
//! `Last-Event-ID: TOKEN` (browsers' EventSource sends it by itself) or `?from=TOKEN` gets no
//! snapshot: the gateway reads the table's log from the token up to where the shared copy
//! stands, sends those records as puts and deletes in offset order, `caught-up`, and goes on
//! with the live changes, so nothing is missed and nothing repeated. When it cannot (the token
//! is for another partition count, retention removed records after it, or compaction removed
//! deletes after it), it sends `event: reset` and then the whole table as for a new client: the
//! client drops what it holds and takes the snapshot.
//!
//! A stream that fails (the topic deleted, the caller refused, a replay that cannot finish)
//! ends with `event: error` (data `{"status", "error"}`); one that ends because the
//! subscriber fell behind just ends, and the subscriber resumes from its token.
//!
//! ## Plain topics
//! A topic that is not a table streams its records: first `event: caught-up` whose `id` is
//! the starting position, then `event: record` (data `{"partition", "offset", "key", "value",
//! "timestamp"}`) with the token after it as `id`. It starts at the records produced from now
//! on, at the first retained ones with `?from=earliest`, or right after a token (a token
//! older than retention goes on from the first retained record). Each subscriber reads with a
//! consumer of its own, with the caller's credentials, so the brokers check every fetch.
//!
//! ## Fan-out
//! One [`SyncTable`] per table per gateway, opened with the gateway's own credentials and
//! shared by every subscriber, and one hub task per table that renders each change once (its
//! JSON data and the resume token after it, [`Rendered`]) into a broadcast buffer of
//! [`HUB_BUFFER`] changes. A subscriber takes the hub's receiver before its snapshot and
//! skips the changes the snapshot already holds (version below the snapshot's offset): the
//! hub renders in the table's order, so its tokens are at or past the snapshot's by the
//! first change after it. A subscriber costs its connection, a cursor and a bounded buffer of
//! [`SUBSCRIBER_BUFFER`] events; a WebSocket frame is the rendered data with the
//! subscription's name spliced in. A subscriber whose buffer stays full for
//! [`SLOW_AFTER`] (or that falls behind the table's change buffer) is disconnected; it reconnects with its last token and
//! resumes. Before serving, the caller's own credentials must be allowed to `read` the table
//! (checked with the brokers by a point read), so the gateway serves only what the caller may
//! read.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::IntoResponse as _;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use syncline_client::{
    Changes, Client, ConsumerConfig, Entry, Error, OffsetReset, StartOffset, SyncTable,
};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt as _;

use crate::http::{token, ApiError, Gateway};
use crate::json::put_bytes;

/// Events buffered per subscriber before it counts as too slow and is disconnected (the
/// default of `--subscriber-buffer-events`).
pub const SUBSCRIBER_BUFFER: usize = 4096;
/// How long a subscriber's buffer may stay full before the subscriber counts as too slow and
/// is disconnected.
pub const SLOW_AFTER: Duration = Duration::from_secs(5);
/// How long replaying what a resuming subscriber missed may take.
const REPLAY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long opening a table's shared copy (and catching it up) may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);
/// How often an idle stream sends a comment, so proxies keep it open.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Changes a table's hub buffers for its subscribers: one that falls further behind is
/// disconnected and resumes from its token.
pub const HUB_BUFFER: usize = 4096;

/// The shared copies of the tables being watched, each with its hub.
#[derive(Debug, Default)]
pub struct Tables {
    open: tokio::sync::Mutex<HashMap<String, Slot>>,
}

/// One table's hub, opened once by the first subscriber that needs it.
type Slot = Arc<tokio::sync::Mutex<Option<Arc<Hub>>>>;

/// Tables one gateway follows at once (each holds a full copy in memory).
pub const TABLES_MAX: usize = 1024;

/// One table's shared copy and the task that renders each of its changes once for every
/// subscriber ([`Rendered`]).
#[derive(Debug)]
struct Hub {
    table: SyncTable,
    /// Taken (closing every subscriber's receiver) when the hub's task ends: the table failed,
    /// or the hub fell behind it. The next subscriber then opens a new hub.
    changes: parking_lot::Mutex<Option<broadcast::Sender<Arc<Rendered>>>>,
}

impl Hub {
    /// Subscribers receiving its changes now.
    fn receivers(&self) -> usize {
        self.changes
            .lock()
            .as_ref()
            .map_or(0, broadcast::Sender::receiver_count)
    }

    /// A receiver of the changes from now on; None once the hub ended.
    fn subscribe(&self) -> Option<broadcast::Receiver<Arc<Rendered>>> {
        self.changes
            .lock()
            .as_ref()
            .map(broadcast::Sender::subscribe)
    }
}

/// A change rendered once for every subscriber: the event's name, its data as JSON text and
/// the resume token after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// The key's partition.
    pub partition: u32,
    /// The change's version (its offset).
    pub version: u64,
    /// `put` or `delete`.
    pub name: &'static str,
    /// The data: `{"key", "value", "version"}` (`{"key", "version"}` for a delete).
    pub data: String,
    /// The resume token after the change.
    pub token: String,
}

impl Tables {
    /// The hub of `topic`'s shared, caught-up copy (opened with `client` on first use;
    /// reopened if it stopped). Each table has its own slot: a table that opens slowly (or
    /// not at all, within [`OPEN_TIMEOUT`]) holds up only its own subscribers.
    async fn get(&self, client: &Client, topic: &str) -> Result<Arc<Hub>, Error> {
        let slot = {
            let mut open = self.open.lock().await;
            if open.len() >= TABLES_MAX && !open.contains_key(topic) {
                // Forget the tables nobody watches any more before refusing.
                open.retain(|_, slot| {
                    let Ok(hub) = slot.try_lock() else {
                        return true; // being opened
                    };
                    match hub.as_ref() {
                        Some(hub) if hub.receivers() == 0 => {
                            // Ends its task, which drops the copy.
                            hub.changes.lock().take();
                            false
                        }
                        _ => true,
                    }
                });
                if open.len() >= TABLES_MAX {
                    return Err(Error::Protocol(format!(
                        "this gateway follows {TABLES_MAX} tables already"
                    )));
                }
            }
            open.entry(topic.to_string()).or_default().clone()
        };
        let mut slot = slot.lock().await;
        let mut table = None;
        if let Some(hub) = slot.as_ref() {
            if hub.table.error().is_none() {
                if hub.changes.lock().is_some() {
                    return Ok(hub.clone());
                }
                table = Some(hub.table.clone());
            }
        }
        let table = match table {
            Some(table) => table,
            None => {
                let opening = async {
                    let table = client.sync_table(topic).await?;
                    table.wait_caught_up().await?;
                    Ok::<_, Error>(table)
                };
                match tokio::time::timeout(OPEN_TIMEOUT, opening).await {
                    Ok(table) => table?,
                    Err(_) => {
                        return Err(Error::Protocol(format!(
                        "the gateway's copy of `{topic}` did not catch up within {OPEN_TIMEOUT:?}"
                    )))
                    }
                }
            }
        };
        let (_, offsets, changes) = table.entries_offsets_and_changes();
        let (sender, _) = broadcast::channel(HUB_BUFFER);
        let hub = Arc::new(Hub {
            table,
            changes: parking_lot::Mutex::new(Some(sender)),
        });
        tokio::spawn(render_changes(
            hub.clone(),
            offsets,
            changes,
            topic.to_string(),
        ));
        *slot = Some(hub.clone());
        Ok(hub)
    }
}

/// The hub's task: renders each change of the table once, with the token after it, for
/// every subscriber. Ends (and marks the hub ended) when the table fails or the hub falls
/// behind the table's change buffer; its subscribers are then disconnected and resume.
async fn render_changes(hub: Arc<Hub>, offsets: Vec<u64>, mut changes: Changes, topic: String) {
    /// Ends the hub however the task ends (a panic or an abort too), so that its subscribers
    /// see their receivers close instead of waiting forever.
    struct EndOnDrop(Arc<Hub>);
    impl Drop for EndOnDrop {
        fn drop(&mut self) {
            self.0.changes.lock().take();
        }
    }
    let _end = EndOnDrop(hub.clone());
    let mut position = offsets;
    loop {
        let change = match changes.recv().await {
            Ok(change) => change,
            Err(error) => {
                tracing::debug!(%topic, %error, "a table's hub ended");
                break;
            }
        };
        // A change that a reload of the partition implies (compaction overtook the copy) does
        // not move the token: the reload's puts come before its deletes, so a token taken in
        // between would claim deletes the client has not seen. A client that resumes from the
        // token before the reload gets `reset` instead (compaction passed it).
        if !change.from_snapshot {
            if let Some(next) = position.get_mut(change.partition as usize) {
                *next = (*next).max(change.version + 1);
            }
        }
        let out = change_out(
            &change.key,
            change.value.as_deref(),
            change.version,
            &position,
        );
        let rendered = Rendered {
            partition: change.partition,
            version: change.version,
            name: out.name(),
            data: Value::Object(out.data()).to_string(),
            token: encode(&position),
        };
        match hub.changes.lock().as_ref() {
            // No receiver is fine: no one is watching right now.
            Some(sender) => {
                let _ = sender.send(Arc::new(rendered));
            }
            // Evicted (see `Tables::get`).
            None => break,
        }
    }
}

/// `?from=TOKEN`.
#[derive(Debug, Deserialize)]
pub struct WatchQuery {
    from: Option<String>,
}

fn encode(offsets: &[u64]) -> String {
    offsets
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(".")
}

fn decode(token: &str) -> Result<Vec<u64>, ApiError> {
    token
        .split('.')
        .map(|part| part.trim().parse::<u64>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| {
            ApiError::bad_request(format!(
                "`{token}` is not a resume token (the `id` of an event: offsets joined by `.`)"
            ))
        })
}

/// One thing a subscriber is told (an SSE event, or a WebSocket frame).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Out {
    /// A key's value (from the snapshot, or a replayed change) or a delete (a replayed
    /// change); boxed, as [`Out::Record`].
    Entry(Box<EntryOut>),
    /// The snapshot (or the replay of what was missed) is complete.
    CaughtUp {
        /// The resume token here.
        token: String,
    },
    /// The token could not be served: drop what you hold, the table follows.
    Reset,
    /// The stream ends: the table or the cluster failed or refused the caller (`error`, data
    /// `{"status", "error"}`). Not sent when the subscriber itself fell behind.
    Failed {
        /// The HTTP-like status.
        status: u16,
        /// Why, for a person.
        message: String,
    },
    /// A table's change, rendered once for every subscriber by its hub.
    Change(Arc<Rendered>),
    /// A record of a plain topic (boxed: it is the largest variant, and every slot of a
    /// subscriber's buffer is as large as the largest).
    Record(Box<RecordOut>),
}

/// A key's value, or its delete, as [`Out::Entry`] tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryOut {
    /// The key.
    pub key: Bytes,
    /// Its value; None for a delete.
    pub value: Option<Bytes>,
    /// Its version.
    pub version: u64,
    /// The resume token after it (changes only).
    pub token: Option<String>,
}

/// A record of a plain topic, as [`Out::Record`] tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordOut {
    /// Its partition.
    pub partition: u32,
    /// Its offset.
    pub offset: u64,
    /// Its key (None: unkeyed).
    pub key: Option<Bytes>,
    /// Its value (None: a tombstone).
    pub value: Option<Bytes>,
    /// Its timestamp, ms since the Unix epoch.
    pub timestamp: i64,
    /// The resume token after it.
    pub token: String,
}

impl Out {
    /// The event's name: `put`, `delete`, `caught-up`, `reset`.
    pub fn name(&self) -> &'static str {
        match self {
            Out::Entry(entry) if entry.value.is_some() => "put",
            Out::Entry(_) => "delete",
            Out::Change(change) => change.name,
            Out::CaughtUp { .. } => "caught-up",
            Out::Reset => "reset",
            Out::Failed { .. } => "error",
            Out::Record(_) => "record",
        }
    }

    /// The resume token, where the event has one.
    pub fn token(&self) -> Option<&str> {
        match self {
            Out::Entry(entry) => entry.token.as_deref(),
            Out::CaughtUp { token } => Some(token),
            Out::Record(record) => Some(&record.token),
            Out::Change(change) => Some(&change.token),
            Out::Reset | Out::Failed { .. } => None,
        }
    }

    /// The event's data: `{"key", "value", "version"}` for a put, `{"key", "version"}` for a
    /// delete, `{}` otherwise.
    pub fn data(&self) -> Map<String, Value> {
        let mut data = Map::new();
        match self {
            Out::Entry(entry) => {
                put_bytes(&mut data, "key", Some(&entry.key));
                if let Some(value) = &entry.value {
                    put_bytes(&mut data, "value", Some(value));
                }
                data.insert("version".into(), json!(entry.version));
            }
            Out::Record(record) => {
                data.insert("partition".into(), json!(record.partition));
                data.insert("offset".into(), json!(record.offset));
                put_bytes(&mut data, "key", record.key.as_deref());
                put_bytes(&mut data, "value", record.value.as_deref());
                data.insert("timestamp".into(), json!(record.timestamp));
            }
            Out::Change(change) => {
                if let Ok(Value::Object(map)) = serde_json::from_str(&change.data) {
                    data = map;
                }
            }
            Out::Failed { status, message } => {
                data.insert("status".into(), json!(status));
                data.insert("error".into(), json!(message));
            }
            Out::CaughtUp { .. } | Out::Reset => {}
        }
        data
    }

    /// As a server-sent event.
    pub fn sse(&self) -> Event {
        let event = match self {
            Out::Change(change) => Event::default().event(change.name).data(&change.data),
            other => Event::default()
                .event(other.name())
                .data(Value::Object(other.data()).to_string()),
        };
        match self.token() {
            Some(token) => event.id(token),
            None => event,
        }
    }
}

fn entry_out(key: &[u8], entry: &Entry) -> Out {
    Out::Entry(Box::new(EntryOut {
        key: Bytes::copy_from_slice(key),
        value: Some(entry.value.clone()),
        version: entry.version,
        token: None,
    }))
}

fn change_out(key: &[u8], value: Option<&[u8]>, version: u64, position: &[u64]) -> Out {
    Out::Entry(Box::new(EntryOut {
        key: Bytes::copy_from_slice(key),
        value: value.map(Bytes::copy_from_slice),
        version,
        token: Some(encode(position)),
    }))
}

/// Where a subscription starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// Tables: the snapshot. Plain topics: the records produced from now on.
    Now,
    /// Plain topics: the first retained records (tables: the snapshot, as [`Start::Now`]).
    Earliest,
    /// Right after the event whose `id` this token is.
    Token(Vec<u64>),
}

/// The start a client asks for: none (or empty) is [`Start::Now`], `earliest`, or a token.
pub fn parse_start(text: Option<&str>) -> Result<Start, ApiError> {
    match text.map(str::trim) {
        None | Some("") | Some("latest") => Ok(Start::Now),
        Some("earliest") => Ok(Start::Earliest),
        Some(token) => decode(token).map(Start::Token),
    }
}

/// Starts following `topic` for a caller presenting `caller`, from `start`: the receiver of
/// what to tell it. A table is followed through the shared copy once the caller's `read` is
/// checked; a plain topic by a consumer with the caller's own credentials (the brokers check
/// every fetch).
pub async fn subscribe(
    gateway: &Gateway,
    caller: Option<&str>,
    topic: &str,
    start: Start,
) -> Result<mpsc::Receiver<Out>, ApiError> {
    // A table this caller was allowed to read a moment ago is served without asking the
    // brokers again (see `clients::READ_CHECK_TTL`).
    if !gateway.clients.read_checked(caller, topic) {
        let client = gateway.clients.client(caller).await?;
        let description = client.describe_topic(topic).await?;
        if description.config.cleanup_policy != syncline_client::CleanupPolicy::Compact {
            return follow_plain(gateway, client, description, topic, start);
        }
        // The caller may read the table (a point read with its own credentials).
        let probe = gateway.clients.table(caller, topic).await?;
        probe.get(b"\0syncline-gateway-probe").await?;
        gateway.clients.read_allowed(caller, topic);
    }
    let (tx, rx) = mpsc::channel(gateway.limits.subscriber_events.max(1));
    let name = topic.to_string();
    let own = gateway.clients.client(None).await?;
    let hub = gateway.tables.get(&own, topic).await?;
    let from = match start {
        Start::Token(token) => Some(token),
        Start::Now | Start::Earliest => None,
    };
    tokio::spawn(async move {
        if let Err(error) = follow(&own, &name, &hub, from, &tx).await {
            tracing::debug!(topic = %name, %error, "a watch ended");
            tell_failure(&tx, error);
        }
    });
    Ok(rx)
}

/// Starts following a plain topic `topic` (described by `description`) from `start`, with
/// the caller's own `client`.
fn follow_plain(
    gateway: &Gateway,
    client: Client,
    description: syncline_client::TopicDescription,
    topic: &str,
    start: Start,
) -> Result<mpsc::Receiver<Out>, ApiError> {
    let starts = match start {
        Start::Token(token) if token.len() == description.partitions.len() => token,
        Start::Token(token) => {
            return Err(ApiError::bad_request(format!(
                "the token names {} partitions; `{topic}` has {}",
                token.len(),
                description.partitions.len()
            )))
        }
        Start::Earliest => description
            .partitions
            .iter()
            .map(|p| p.log_start_offset)
            .collect(),
        Start::Now => description
            .partitions
            .iter()
            .map(|p| p.durable_offset)
            .collect(),
    };
    let (tx, rx) = mpsc::channel(gateway.limits.subscriber_events.max(1));
    let name = topic.to_string();
    tokio::spawn(async move {
        if let Err(error) = follow_records(&client, &name, starts, &tx).await {
            tracing::debug!(topic = %name, %error, "a watch ended");
            tell_failure(&tx, error);
        }
    });
    Ok(rx)
}

/// A plain topic's records from `starts` (a next offset per partition), each with the token
/// after it. A position older than retention goes on from the first retained record.
async fn follow_records(
    client: &Client,
    topic: &str,
    starts: Vec<u64>,
    tx: &Sender,
) -> Result<(), Ended> {
    let mut position = starts.clone();
    send(
        tx,
        Out::CaughtUp {
            token: encode(&position),
        },
    )
    .await?;
    let mut consumer = client
        .consumer(
            topic,
            ConsumerConfig {
                partition_starts: starts
                    .iter()
                    .enumerate()
                    .map(|(p, &offset)| (p as u32, StartOffset::Offset(offset)))
                    .collect(),
                offset_reset: OffsetReset::Earliest,
                ..ConsumerConfig::default()
            },
        )
        .await?;
    loop {
        // As for tables: a subscriber that left ends its consumer now, not at the next record.
        let record = tokio::select! {
            record = consumer.recv() => record,
            _ = tx.closed() => return Err(Ended::Gone),
        };
        let Some(record) = record else { break };
        let record = record?;
        let p = record.partition as usize;
        if p >= position.len() || record.offset < position[p] {
            continue;
        }
        position[p] = record.offset + 1;
        send(
            tx,
            Out::Record(Box::new(RecordOut {
                partition: record.partition,
                offset: record.offset,
                key: record.key,
                value: record.value,
                timestamp: record.timestamp,
                token: encode(&position),
            })),
        )
        .await?;
    }
    Err(Ended::Gone)
}

/// The SSE route.
pub async fn watch(
    State(gateway): State<Arc<Gateway>>,
    Path(topic): Path<String>,
    Query(query): Query<WatchQuery>,
    headers: HeaderMap,
) -> Result<axum::response::Response, ApiError> {
    let caller = token(&headers)?;
    let start = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or(query.from);
    let start = parse_start(start.as_deref())?;
    let rx = subscribe(&gateway, caller.as_deref(), &topic, start).await?;
    let events = ReceiverStream::new(rx).map(|out| Ok::<_, Infallible>(out.sse()));
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response())
}

/// Tells the subscriber why its stream ends when that is not its own slowness (the table or
/// the cluster failed, or refused it): an [`Out::Failed`] as the stream's last event.
fn tell_failure(tx: &Sender, ended: Ended) {
    if let Ended::Failed(error) = ended {
        let (status, body) = ApiError::from(error).parts();
        let message = body["error"]
            .as_str()
            .unwrap_or("the stream failed")
            .to_string();
        let _ = tx.try_send(Out::Failed { status, message });
    }
}

/// Why a subscriber's stream ended.
#[derive(Debug)]
enum Ended {
    /// The subscriber went away or fell too far behind.
    Gone,
    /// The table or the cluster failed.
    Failed(Error),
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ended::Gone => f.write_str("the subscriber went away or fell behind"),
            Ended::Failed(error) => write!(f, "{error}"),
        }
    }
}

impl From<Error> for Ended {
    fn from(error: Error) -> Ended {
        Ended::Failed(error)
    }
}

type Sender = mpsc::Sender<Out>;

/// Sends, waiting at most [`SLOW_AFTER`] for room: a buffer that stays full that long means
/// the subscriber is too slow.
async fn send(tx: &Sender, out: Out) -> Result<(), Ended> {
    // Room in the buffer (the usual case) needs no timer.
    let out = match tx.try_send(out) {
        Ok(()) => return Ok(()),
        Err(mpsc::error::TrySendError::Closed(_)) => return Err(Ended::Gone),
        Err(mpsc::error::TrySendError::Full(out)) => out,
    };
    tx.send_timeout(out, SLOW_AFTER)
        .await
        .map_err(|_| Ended::Gone)
}

async fn follow(
    client: &Client,
    topic: &str,
    hub: &Hub,
    from: Option<Vec<u64>>,
    tx: &Sender,
) -> Result<(), Ended> {
    // The hub's receiver first, then the snapshot: the hub lags the table, so every change
    // after the snapshot comes through the receiver, and those the snapshot already holds
    // (version below its offset) are skipped. The hub renders changes in the table's order,
    // so by the first change after the snapshot it has seen all the snapshot holds, and its
    // tokens are at or past the snapshot's.
    let Some(mut changes) = hub.subscribe() else {
        // The hub ended just now: the client comes back, onto a new one.
        return Err(Ended::Gone);
    };
    // A resume needs only where the copy stands; a snapshot takes the entries with it.
    let offsets = hub.table.offsets();
    let resumable = match &from {
        // Boxed (here and below): the task idles in the change loop, and should not carry
        // the larger state of these calls all its life.
        Some(token) => Box::pin(resumable(client, topic, token, &offsets)).await?,
        None => false,
    };
    let (offsets, position) = if resumable {
        let token = from.unwrap_or_default();
        let mut position = offsets.clone();
        Box::pin(replay(client, topic, &token, &offsets, &mut position, tx)).await?;
        (offsets, position)
    } else {
        if from.is_some() {
            send(tx, Out::Reset).await?;
        }
        let (entries, offsets, _) = hub.table.entries_offsets_and_changes();
        for (key, entry) in &entries {
            // Paced by the buffer: a large table waits for the subscriber to drain it (one
            // that stops reading for SLOW_AFTER is dropped, and its copy with it).
            send(tx, entry_out(key, entry)).await?;
        }
        (offsets.clone(), offsets)
    };
    send(
        tx,
        Out::CaughtUp {
            token: encode(&position),
        },
    )
    .await?;
    loop {
        // The subscriber may leave (unsubscribe, disconnect) while the table is quiet: end
        // then, not at the next change.
        let received = tokio::select! {
            received = changes.recv() => received,
            _ = tx.closed() => return Err(Ended::Gone),
        };
        let change = match received {
            Ok(change) => change,
            // Fell behind the hub's buffer: the client resumes from its token.
            Err(broadcast::error::RecvError::Lagged(_)) => return Err(Ended::Gone),
            // The hub ended (it fell behind the table, or the table failed): the client
            // resumes from its token, on a new hub.
            Err(broadcast::error::RecvError::Closed) => return Err(Ended::Gone),
        };
        let held = offsets.get(change.partition as usize).copied().unwrap_or(0);
        if change.version < held {
            continue;
        }
        send(tx, Out::Change(change)).await?;
    }
}

/// Whether the log still holds every change after `token` (else the client re-snapshots).
async fn resumable(
    client: &Client,
    topic: &str,
    token: &[u64],
    offsets: &[u64],
) -> Result<bool, Ended> {
    if token.len() != offsets.len() || token.iter().zip(offsets).any(|(t, n)| t > n) {
        return Ok(false);
    }
    let description = client.describe_topic(topic).await?;
    Ok(description.partitions.iter().all(|p| {
        let at = token.get(p.partition as usize).copied().unwrap_or(0);
        let behind = offsets.get(p.partition as usize).copied().unwrap_or(0);
        at >= behind || (at >= p.log_start_offset && p.compaction_horizon <= at)
    }))
}

/// Sends the records of `[token, offsets)` of each partition, in offset order per partition.
async fn replay(
    client: &Client,
    topic: &str,
    token: &[u64],
    offsets: &[u64],
    position: &mut [u64],
    tx: &Sender,
) -> Result<(), Ended> {
    let behind: Vec<u32> = (0..token.len() as u32)
        .filter(|&p| token[p as usize] < offsets[p as usize])
        .collect();
    position.copy_from_slice(token);
    if behind.is_empty() {
        return Ok(());
    }
    let mut consumer = client
        .consumer(
            topic,
            ConsumerConfig {
                partitions: Some(behind.clone()),
                partition_starts: behind
                    .iter()
                    .map(|&p| (p, StartOffset::Offset(token[p as usize])))
                    .collect(),
                offset_reset: OffsetReset::Error,
                fetch_max_wait: Duration::from_millis(100),
                ..ConsumerConfig::default()
            },
        )
        .await?;
    let done = |consumer: &syncline_client::Consumer| {
        behind
            .iter()
            .all(|&p| consumer.position(p).unwrap_or(0) >= offsets[p as usize])
    };
    let deadline = tokio::time::Instant::now() + REPLAY_TIMEOUT;
    while !done(&consumer) {
        if tx.is_closed() {
            return Err(Ended::Gone);
        }
        if tokio::time::Instant::now() > deadline {
            return Err(Ended::Failed(Error::Protocol(format!(
                "the replay of `{topic}` did not finish within {REPLAY_TIMEOUT:?}"
            ))));
        }
        let record = match tokio::time::timeout(Duration::from_millis(200), consumer.recv()).await {
            Err(_) => continue,
            Ok(None) => return Err(Ended::Gone),
            Ok(Some(record)) => record?,
        };
        let p = record.partition as usize;
        if record.offset >= offsets[p] || record.offset < position[p] {
            continue;
        }
        let Some(key) = record.key.as_deref() else {
            continue;
        };
        position[p] = record.offset + 1;
        tx.send(change_out(
            key,
            record.value.as_deref(),
            record.offset,
            position,
        ))
        .await
        .map_err(|_| Ended::Gone)?;
    }
    position.copy_from_slice(offsets);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_a_subscriber_buffer_should_keep_its_slots_small() {
        // Every slot of a subscriber's buffer is the size of the largest variant (tokio's
        // channel allocates slots in blocks of 32): keep large payloads boxed.
        assert!(
            std::mem::size_of::<Out>() <= 32,
            "{}",
            std::mem::size_of::<Out>()
        );
    }
}
