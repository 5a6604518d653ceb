//! [`GroupConsumer`]: a member of a consumer group (KIP-848 style). The broker's coordinator
//! assigns partitions; the member reads exactly the partitions of its latest assignment.
//!
//! # How it works
//!
//! [`crate::Client::group_consumer`] joins the group (so a bad name or an unknown topic fails
//! at once), then a background task:
//! - heartbeats at the interval the coordinator asks for, reporting the partitions it reads
//!   (`owned`), and reconciles each answer's assignment:
//!   - a newly assigned partition starts reading from the group's committed offset
//!     (`FetchOffsets`), or, without one, where [`GroupConsumerConfig::offset_reset`] says
//!     (earliest by default); one reader per partition, the plain consumer's fetch loop;
//!   - a partition no longer assigned is *revoked*: under one lock its entry is removed and its
//!     records still buffered are dropped (so none is handed out afterwards; the next owner
//!     reads them again from the commit), its reader is stopped, the processed position is
//!     committed synchronously, and the next heartbeat, sent at once, leaves it out of `owned`
//!     so the coordinator can hand it on;
//! - commits the processed positions every [`GroupConsumerConfig::auto_commit_interval`]
//!   (unless off), and on [`GroupConsumer::commit`] and [`GroupConsumer::close`];
//! - on NOT_FOUND (the coordinator forgot the member: session expired, broker restarted) or
//!   FAILED_PRECONDITION (stale epoch) drops every partition *without* committing (they may
//!   already belong to someone else), reports [`GroupEvent::Lost`] and joins again with the
//!   same member id; on transient errors (unreachable, UNAVAILABLE) retries with backoff,
//!   keeping its partitions until the coordinator says otherwise.
//!
//! # Delivery
//!
//! At least once. A record counts as processed once the application asks for the next one
//! ([`GroupConsumer::recv`]), commits ([`GroupConsumer::commit`]) or closes: background commits
//! (auto-commit, revocation) cover every record handed out before the one the application
//! still holds, so a crash while processing it does not skip it; `commit` and `close` cover
//! every record handed out. So process a record before asking for the next one. Records of
//! one partition come in offset order, so records with one key keep their order within a
//! member; after a partition moves, its new owner starts at the last commit and may see again
//! records the old owner processed after it.
//!
//! # Limits
//!
//! Records buffered ahead of `recv`: at most [`GroupConsumerConfig::buffered_records_max`] plus
//! one fetch response per owned partition (each at most `fetch_bytes_max` plus one batch);
//! partitions owned: [`ASSIGNED_PARTITIONS_MAX`]; topics: [`GROUP_TOPICS_MAX`]; events kept for
//! a slow [`GroupEvents`] reader: [`GroupConsumerConfig::events_buffered_max`].
//!
//! # Ending
//!
//! [`GroupConsumer::close`] commits, stops reading and leaves the group, so its partitions move
//! at once. Dropping the consumer (or [`GroupConsumer::abort`]) stops everything *without*
//! committing or leaving, as a crash would: the coordinator moves its partitions when the
//! session times out, and their next owners start at the last commit.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use syncline_proto::v1;
use tokio::sync::{broadcast, mpsc, oneshot, Notify};
use tokio::task::{AbortHandle, JoinHandle, JoinSet};
use tokio::time::Instant;
use tonic::Code;

use crate::admin::OffsetQuery;
use crate::client::Client;
use crate::consumer::{ConsumerConfig, ConsumerRecord, Message, OffsetReset, PartitionReader};
use crate::error::{Error, Result};
use crate::group_admin::{
    from_wire_partitions, to_wire_partitions, TopicPartition, OFFSETS_PER_REQUEST_MAX,
};
use crate::routing::Grpc;

/// Most partitions one member reads at once (one reader task each). An assignment above it is
/// a protocol error: the member could not honour it.
pub const ASSIGNED_PARTITIONS_MAX: usize = 10_000;
/// Most topics one member subscribes to (the broker's limit).
pub const GROUP_TOPICS_MAX: usize = 100;
/// Largest `buffered_records_max`: beyond it the buffer is no longer a bound worth having.
const BUFFERED_RECORDS_LIMIT: usize = 10_000_000;
/// Most events kept for a slow event reader.
const EVENTS_BUFFERED_LIMIT: usize = 1_000_000;
/// The session timeouts the broker accepts (JoinGroup's contract).
const SESSION_TIMEOUT_MIN: Duration = Duration::from_secs(1);
const SESSION_TIMEOUT_MAX: Duration = Duration::from_secs(300);
/// The broker's default session timeout, used to bound requests when the config leaves it out.
const SESSION_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);
/// Heartbeat interval bounds, whatever the coordinator asks: not faster than this (a broker
/// bug must not become a busy loop) and not slower than a third of the session.
const HEARTBEAT_INTERVAL_MIN: Duration = Duration::from_millis(10);
/// Longest fetch long-poll (as for the plain consumer).
const FETCH_MAX_WAIT_LIMIT: Duration = Duration::from_secs(60);
/// Longest pause between retries.
const RETRY_BACKOFF_LIMIT: Duration = Duration::from_secs(60);
/// Shortest auto-commit interval: commits are a durable write on the broker each.
const AUTO_COMMIT_INTERVAL_MIN: Duration = Duration::from_millis(10);
/// Group readers retry transient fetch errors for as long as the member owns the partition:
/// the heartbeat, not the reader, decides when the partition is lost.
const READER_RETRY_TIMEOUT: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// [`GroupConsumer`] settings. The defaults: broker-default session (10 s), auto-commit every
/// Start-offset lookups (ListOffsets) in flight while a new assignment is taken on.
const RESET_LOOKUPS_IN_FLIGHT: usize = 32;

/// 5 s, earliest start without a commit, 10 000 records buffered.
#[derive(Debug, Clone)]
pub struct GroupConsumerConfig {
    /// How long the coordinator waits for a heartbeat before it gives this member's partitions
    /// to others; `None` = the broker's default (10 s). Within [1 s, 300 s].
    pub session_timeout: Option<Duration>,
    /// Commit the processed positions this often; `None` turns auto-commit off (then commit
    /// with [`GroupConsumer::commit`]; revocation and close still commit).
    pub auto_commit_interval: Option<Duration>,
    /// Where a partition without a committed offset starts, and what to do when a position
    /// is out of range: [`OffsetReset::Earliest`] (the default), [`OffsetReset::Latest`], or
    /// [`OffsetReset::Error`] (yield an error and do not read the partition).
    pub offset_reset: OffsetReset,
    /// Records buffered ahead of [`GroupConsumer::recv`] over all partitions (each reader may
    /// add one fetch response beyond it).
    pub buffered_records_max: usize,
    /// How long one fetch waits on the broker for new data (long-poll).
    pub fetch_max_wait: Duration,
    /// Byte budget of one fetch response (the broker returns at least one batch).
    pub fetch_bytes_max: u32,
    /// First pause before a retry of a failed heartbeat, join or fetch; doubled up to
    /// `retry_backoff_max`.
    pub retry_backoff: Duration,
    /// Longest pause between retries.
    pub retry_backoff_max: Duration,
    /// Shown by DescribeGroup for this member; `None` = `syncline-client/PID`.
    pub client_id: Option<String>,
    /// Events kept for a [`GroupEvents`] reader that has not caught up; older ones are dropped
    /// for it (it is told how many).
    pub events_buffered_max: usize,
}

impl Default for GroupConsumerConfig {
    fn default() -> Self {
        GroupConsumerConfig {
            session_timeout: None,
            auto_commit_interval: Some(Duration::from_secs(5)),
            offset_reset: OffsetReset::Earliest,
            buffered_records_max: 10_000,
            fetch_max_wait: Duration::from_millis(500),
            fetch_bytes_max: 1024 * 1024,
            retry_backoff: Duration::from_millis(100),
            retry_backoff_max: Duration::from_secs(1),
            client_id: None,
            events_buffered_max: 1024,
        }
    }
}

impl GroupConsumerConfig {
    /// Checks each field against its bounds.
    pub fn validate(&self) -> Result<()> {
        let invalid = |key: &'static str, reason: String| Err(Error::InvalidConfig { key, reason });
        if let Some(timeout) = self.session_timeout {
            if !(SESSION_TIMEOUT_MIN..=SESSION_TIMEOUT_MAX).contains(&timeout) {
                return invalid(
                    "session_timeout",
                    format!(
                        "{timeout:?} is outside [{SESSION_TIMEOUT_MIN:?}, {SESSION_TIMEOUT_MAX:?}]"
                    ),
                );
            }
        }
        if let Some(interval) = self.auto_commit_interval {
            if interval < AUTO_COMMIT_INTERVAL_MIN {
                return invalid(
                    "auto_commit_interval",
                    format!("{interval:?} is below {AUTO_COMMIT_INTERVAL_MIN:?}"),
                );
            }
        }
        if !(1..=BUFFERED_RECORDS_LIMIT).contains(&self.buffered_records_max) {
            return invalid(
                "buffered_records_max",
                format!(
                    "{} is outside [1, {BUFFERED_RECORDS_LIMIT}]",
                    self.buffered_records_max
                ),
            );
        }
        if self.fetch_max_wait > FETCH_MAX_WAIT_LIMIT {
            return invalid(
                "fetch_max_wait",
                format!(
                    "{:?} is above the maximum of {FETCH_MAX_WAIT_LIMIT:?}",
                    self.fetch_max_wait
                ),
            );
        }
        if self.fetch_bytes_max == 0 {
            return invalid("fetch_bytes_max", "must be above 0".to_owned());
        }
        if self.retry_backoff.is_zero()
            || self.retry_backoff > self.retry_backoff_max
            || self.retry_backoff_max > RETRY_BACKOFF_LIMIT
        {
            return invalid(
                "retry_backoff",
                format!(
                    "need 0 < retry_backoff ({:?}) <= retry_backoff_max ({:?}) <= {RETRY_BACKOFF_LIMIT:?}",
                    self.retry_backoff, self.retry_backoff_max
                ),
            );
        }
        if !(1..=EVENTS_BUFFERED_LIMIT).contains(&self.events_buffered_max) {
            return invalid(
                "events_buffered_max",
                format!(
                    "{} is outside [1, {EVENTS_BUFFERED_LIMIT}]",
                    self.events_buffered_max
                ),
            );
        }
        Ok(())
    }

    /// Absent (the broker's default) unless the config sets one.
    fn session_timeout_ms(&self) -> Option<u32> {
        self.session_timeout
            .map(|timeout| u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX))
    }

    /// How long one coordinator request may take before it counts as a transient failure.
    fn request_timeout(&self) -> Duration {
        self.session_timeout.unwrap_or(SESSION_TIMEOUT_DEFAULT)
    }

    fn reader_config(&self) -> ConsumerConfig {
        ConsumerConfig {
            offset_reset: self.offset_reset,
            fetch_max_wait: self.fetch_max_wait,
            fetch_bytes_max: self.fetch_bytes_max,
            retry_timeout: READER_RETRY_TIMEOUT,
            retry_backoff: self.retry_backoff.min(Duration::from_secs(1)),
            buffered_responses_max: 1,
            ..ConsumerConfig::default()
        }
    }
}

/// A change of the partitions this member reads ([`GroupConsumer::events`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum GroupEvent {
    /// These partitions were assigned; reading them has started (from the committed offsets).
    Assigned(Vec<TopicPartition>),
    /// The coordinator took these partitions away: the records handed out were committed,
    /// the ones still buffered dropped, and reading stopped.
    Revoked(Vec<TopicPartition>),
    /// The member lost its session (NOT_FOUND or FAILED_PRECONDITION from the coordinator):
    /// these partitions were dropped without a commit (they may already be someone else's)
    /// and the member is joining again.
    Lost(Vec<TopicPartition>),
}

/// A stream of [`GroupEvent`]s ([`GroupConsumer::events`]).
#[derive(Debug)]
pub struct GroupEvents {
    receiver: broadcast::Receiver<GroupEvent>,
}

impl GroupEvents {
    /// The next event; `None` once the consumer has stopped. A reader that fell more than
    /// `events_buffered_max` events behind gets [`Error::ChangesLagged`] once, then the
    /// events after the gap.
    pub async fn recv(&mut self) -> Option<Result<GroupEvent>> {
        match self.receiver.recv().await {
            Ok(event) => Some(Ok(event)),
            Err(broadcast::error::RecvError::Closed) => None,
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                Some(Err(Error::ChangesLagged { missed }))
            }
        }
    }
}

type Key = (Arc<str>, u32);

fn key_of(partition: &TopicPartition) -> Key {
    (Arc::from(partition.topic.as_str()), partition.partition)
}

fn partition_of(key: &Key) -> TopicPartition {
    TopicPartition::new(key.0.to_string(), key.1)
}

/// A partition the member reads, as the application side sees it.
#[derive(Debug)]
struct Owned {
    /// Tells this ownership apart from an earlier or later one of the same partition: a
    /// reader only delivers while its token is current.
    token: u64,
    /// One past the last record handed out (the start position before any): what a commit
    /// stores.
    processed: u64,
}

#[derive(Debug, Default)]
struct Buffer {
    /// Records (and reader errors) not yet handed out. Every record here belongs to a
    /// partition in `owned` (revocation removes both under one lock).
    queue: VecDeque<Result<ConsumerRecord>>,
    owned: HashMap<Key, Owned>,
    /// The last record handed out while the application may still be processing it (it has
    /// not called `recv`, `commit` or `close` since): its partition, ownership token and
    /// offset. Background commits (auto-commit, revocation) stop before it, since a crash
    /// while processing it must not skip it; asking for the next record, `commit` or `close`
    /// says it is done.
    in_hand: Option<(Key, u64, u64)>,
    member_id: String,
    /// The background task has ended: `recv` returns `None` once the queue is empty.
    closed: bool,
}

#[derive(Debug)]
struct Shared {
    buffer: Mutex<Buffer>,
    /// Signalled (one permit) when a record, an error or the end arrives.
    records_ready: Notify,
    /// Signalled (all waiters) when the queue shrinks.
    space_ready: Notify,
    records_max: usize,
    /// Reader tasks the background task still keeps (finished ones included), for tests.
    #[cfg(test)]
    reader_tasks: std::sync::atomic::AtomicUsize,
}

impl Buffer {
    /// What a background commit of `key` may store: the position after the records handed
    /// out, but not past the record the application still holds.
    fn committable(&self, key: &Key, owned: &Owned) -> u64 {
        match &self.in_hand {
            Some((held, token, offset)) if held == key && *token == owned.token => {
                owned.processed.min(*offset)
            }
            _ => owned.processed,
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Buffer> {
        // A panic while holding the lock leaves plain data behind; go on with it.
        self.buffer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Hands one reader message to the application side; `false` when the partition is no
    /// longer owned under `token` (the reader should stop).
    async fn deliver(&self, key: &Key, token: u64, message: Message) -> bool {
        loop {
            let space = self.space_ready.notified();
            tokio::pin!(space);
            space.as_mut().enable();
            {
                let mut buffer = self.lock();
                if buffer.owned.get(key).map(|owned| owned.token) != Some(token) {
                    return false;
                }
                match message {
                    Message::Failed(error) => {
                        buffer.queue.push_back(Err(error));
                        drop(buffer);
                        self.records_ready.notify_one();
                        return false;
                    }
                    Message::Records { records, .. } if buffer.queue.len() < self.records_max => {
                        buffer.queue.extend(records.into_iter().map(Ok));
                        drop(buffer);
                        self.records_ready.notify_one();
                        return true;
                    }
                    Message::Records { .. } => {}
                }
            }
            space.await;
        }
    }

    /// Removes `keys` from the owned set and drops their buffered records, atomically: no
    /// record of theirs is handed out afterwards. Returns each one's processed position.
    fn release(&self, keys: &BTreeSet<Key>) -> Vec<(Key, u64)> {
        let mut buffer = self.lock();
        let mut released = Vec::new();
        for key in keys {
            if let Some(owned) = buffer.owned.remove(key) {
                released.push((key.clone(), buffer.committable(key, &owned)));
            }
        }
        let before = buffer.queue.len();
        buffer.queue.retain(|item| match item {
            Ok(record) => !keys.contains(&(Arc::clone(&record.topic), record.partition)),
            Err(_) => true,
        });
        let dropped = before - buffer.queue.len();
        drop(buffer);
        if dropped > 0 {
            tracing::debug!(dropped, "dropped buffered records of released partitions");
            self.space_ready.notify_waiters();
        }
        released
    }

    fn close(&self) {
        let mut buffer = self.lock();
        buffer.closed = true;
        buffer.owned.clear();
        buffer.queue.retain(Result::is_err);
        drop(buffer);
        self.records_ready.notify_one();
        self.space_ready.notify_waiters();
    }
}

/// What the application asks the background task.
enum Command {
    Commit(oneshot::Sender<Result<()>>),
    Close(oneshot::Sender<Result<()>>),
}

/// A member of a consumer group; see the module doc. Records come from [`GroupConsumer::recv`].
///
/// Dropping it stops reading at once without committing or leaving (as a crash would); call
/// [`GroupConsumer::close`] to commit and leave.
#[derive(Debug)]
pub struct GroupConsumer {
    group: String,
    shared: Arc<Shared>,
    commands: mpsc::Sender<Command>,
    task: JoinHandle<()>,
    events: broadcast::Sender<GroupEvent>,
    first_events: Option<broadcast::Receiver<GroupEvent>>,
}

impl Drop for GroupConsumer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl GroupConsumer {
    pub(crate) async fn start(
        client: Client,
        group: &str,
        topics: &[&str],
        config: GroupConsumerConfig,
    ) -> Result<GroupConsumer> {
        config.validate()?;
        let invalid = |key: &'static str, reason: &str| {
            Err(Error::InvalidConfig {
                key,
                reason: reason.to_owned(),
            })
        };
        if group.is_empty() {
            return invalid("group", "must not be empty");
        }
        if topics.is_empty() || topics.len() > GROUP_TOPICS_MAX {
            return invalid("topics", "give between 1 and 100 topics");
        }
        let topics: Vec<String> = topics
            .iter()
            .map(|topic| (*topic).to_owned())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let client_id = config
            .client_id
            .clone()
            .unwrap_or_else(|| format!("syncline-client/{}", std::process::id()));
        let shared = Arc::new(Shared {
            buffer: Mutex::new(Buffer::default()),
            records_ready: Notify::new(),
            space_ready: Notify::new(),
            records_max: config.buffered_records_max,
            #[cfg(test)]
            reader_tasks: std::sync::atomic::AtomicUsize::new(0),
        });
        let (events, first_events) = broadcast::channel(config.events_buffered_max);
        let (command_sender, commands) = mpsc::channel(16);
        let mut member = Member {
            client,
            group: group.to_owned(),
            topics,
            client_id,
            reader_config: config.reader_config(),
            config,
            shared: Arc::clone(&shared),
            member_id: String::new(),
            epoch: 0,
            joined: false,
            heartbeat_interval: Duration::from_secs(1),
            backoff: Duration::ZERO,
            readers: BTreeMap::new(),
            tasks: JoinSet::new(),
            next_token: 0,
            events: events.clone(),
            commands,
        };
        member.backoff = member.config.retry_backoff;
        // The first join is synchronous: a bad group name or an unknown topic fails here.
        let joined = member.join().await?;
        shared.lock().member_id = joined.member_id.clone();
        let task = tokio::spawn(member.run(joined));
        Ok(GroupConsumer {
            group: group.to_owned(),
            shared,
            commands: command_sender,
            task,
            events,
            first_events: Some(first_events),
        })
    }

    /// The group.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// The member id the coordinator gave this member.
    pub fn member_id(&self) -> String {
        self.shared.lock().member_id.clone()
    }

    /// The partitions this member reads now, sorted.
    pub fn assignment(&self) -> Vec<TopicPartition> {
        let buffer = self.shared.lock();
        let mut partitions: Vec<TopicPartition> = buffer.owned.keys().map(partition_of).collect();
        partitions.sort();
        partitions
    }

    /// The next offset of `partition` after the records handed out (what a commit stores), if
    /// this member reads it.
    pub fn position(&self, topic: &str, partition: u32) -> Option<u64> {
        let buffer = self.shared.lock();
        buffer
            .owned
            .get(&(Arc::from(topic), partition))
            .map(|owned| owned.processed)
    }

    /// Assignment changes: partitions assigned, revoked (after their commit) and lost. The
    /// first call sees every event since the consumer started; later calls see events from
    /// their call on.
    pub fn events(&mut self) -> GroupEvents {
        let receiver = self
            .first_events
            .take()
            .unwrap_or_else(|| self.events.subscribe());
        GroupEvents { receiver }
    }

    /// The next record, marking every record handed out before it as processed. An `Err` is a
    /// reader's failure (corrupt data, out of range under [`OffsetReset::Error`], no committed
    /// offset under it) or the member's (a coordinator error that joining again cannot fix);
    /// `None` once the consumer has stopped. Cancel-safe.
    pub async fn recv(&mut self) -> Option<Result<ConsumerRecord>> {
        // Asking for the next record says the one handed out before is processed.
        self.shared.lock().in_hand = None;
        loop {
            {
                let mut buffer = self.shared.lock();
                let was_full = buffer.queue.len() >= self.shared.records_max;
                if let Some(item) = buffer.queue.pop_front() {
                    if let Ok(record) = &item {
                        let key = (Arc::clone(&record.topic), record.partition);
                        if let Some(owned) = buffer.owned.get_mut(&key) {
                            debug_assert!(record.offset >= owned.processed);
                            owned.processed = record.offset.saturating_add(1);
                            let token = owned.token;
                            buffer.in_hand = Some((key, token, record.offset));
                        }
                    }
                    drop(buffer);
                    if was_full {
                        self.shared.space_ready.notify_waiters();
                    }
                    return Some(item);
                }
                if buffer.closed {
                    return None;
                }
            }
            self.shared.records_ready.notified().await;
        }
    }

    async fn ask(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<()>>) -> Command,
    ) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(command(reply))
            .await
            .map_err(|_| Error::Closed("group consumer"))?;
        answer.await.map_err(|_| Error::Closed("group consumer"))?
    }

    /// Commits the position after the last record handed out of every partition this member
    /// reads, and waits for the broker's answer. Partitions without new records are left out.
    pub async fn commit(&self) -> Result<()> {
        // Committing says every record handed out is processed, the last one too.
        self.shared.lock().in_hand = None;
        self.ask(Command::Commit).await
    }

    /// Commits what was handed out, stops reading, and leaves the group (its partitions move
    /// to the other members at once). Records still buffered are dropped. Returns the commit's
    /// error if it failed (the member leaves anyway).
    pub async fn close(mut self) -> Result<()> {
        self.shared.lock().in_hand = None;
        let result = self.ask(Command::Close).await;
        // The task ends by itself after answering.
        let _ = (&mut self.task).await;
        result
    }

    /// Stops at once without committing or leaving, as a crash would (the same as dropping).
    pub fn abort(self) {
        self.shared.close();
    }

    #[cfg(test)]
    pub(crate) fn reader_tasks(&self) -> usize {
        self.shared
            .reader_tasks
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// One partition being read.
#[derive(Debug)]
struct Reader {
    token: u64,
    /// `None` when reading could not start (a reader error was yielded).
    task: Option<AbortHandle>,
    /// The last committed position (or the start position): commit only past it.
    committed: u64,
}

/// The background task's state: membership, epoch, readers.
struct Member {
    client: Client,
    group: String,
    topics: Vec<String>,
    client_id: String,
    config: GroupConsumerConfig,
    reader_config: ConsumerConfig,
    shared: Arc<Shared>,
    member_id: String,
    epoch: u32,
    /// False after the coordinator forgot the member, until it joined again.
    joined: bool,
    heartbeat_interval: Duration,
    /// The pause before the next retry of a failed coordinator call.
    backoff: Duration,
    readers: BTreeMap<Key, Reader>,
    tasks: JoinSet<()>,
    next_token: u64,
    events: broadcast::Sender<GroupEvent>,
    commands: mpsc::Receiver<Command>,
}

/// Whether the coordinator no longer knows this member as it thinks it is: join again.
fn is_fenced(error: &Error) -> bool {
    matches!(
        error,
        Error::Broker {
            code: Code::NotFound | Code::FailedPrecondition,
            ..
        }
    )
}

impl Member {
    async fn run(mut self, joined: v1::JoinGroupResponse) {
        let mut next_heartbeat = match self.accept_join(joined).await {
            Ok(next) => next,
            Err(error) => return self.fail(error),
        };
        let auto_commit = self.config.auto_commit_interval;
        let mut next_auto_commit = auto_commit.map(|interval| Instant::now() + interval);
        loop {
            // Stopped readers (revoked, lost, failed) stay in the set until reaped: without
            // this each rebalance would keep their tasks' memory for good.
            while self.tasks.try_join_next().is_some() {}
            #[cfg(test)]
            self.shared
                .reader_tasks
                .store(self.tasks.len(), std::sync::atomic::Ordering::Relaxed);
            let auto_commit_at = next_auto_commit;
            tokio::select! {
                () = tokio::time::sleep_until(next_heartbeat) => {
                    next_heartbeat = match self.tick().await {
                        Ok(next) => next,
                        Err(error) => return self.fail(error),
                    };
                }
                () = async {
                    match auto_commit_at {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => {
                    if let Err(error) = self.commit_processed().await {
                        tracing::warn!(group = %self.group, %error, "auto-commit failed");
                        if !self.joined {
                            next_heartbeat = Instant::now();
                        }
                    }
                    next_auto_commit = auto_commit.map(|interval| Instant::now() + interval);
                }
                command = self.commands.recv() => match command {
                    // The handle is gone (dropped): its Drop aborts this task anyway.
                    None => return,
                    Some(Command::Commit(reply)) => {
                        let result = self.commit_processed().await;
                        if !self.joined {
                            next_heartbeat = Instant::now();
                        }
                        let _ = reply.send(result);
                    }
                    Some(Command::Close(reply)) => {
                        let result = self.close().await;
                        let _ = reply.send(result);
                        return;
                    }
                },
            }
        }
    }

    /// A heartbeat, or a join when the coordinator forgot the member. Returns when to do the
    /// next one; an error is fatal.
    async fn tick(&mut self) -> Result<Instant> {
        if !self.joined {
            return match self.join().await {
                Ok(response) => {
                    self.client.note_reachable();
                    self.backoff = self.config.retry_backoff;
                    self.accept_join(response).await
                }
                Err(error) if error.is_transient() => Ok(self.retry_later(&error, "join")),
                Err(error) => Err(error),
            };
        }
        match self.heartbeat().await {
            Ok(response) => {
                self.client.note_reachable();
                self.backoff = self.config.retry_backoff;
                self.epoch = response.member_epoch;
                self.set_interval(response.heartbeat_interval_ms);
                let assignment = from_wire_partitions(response.assignment);
                let released = self.reconcile(assignment).await?;
                Ok(if released {
                    // Tell the coordinator at once, so the new owners get them quickly.
                    Instant::now()
                } else {
                    Instant::now() + self.heartbeat_interval
                })
            }
            Err(error) if is_fenced(&error) => {
                tracing::warn!(
                    group = %self.group,
                    member = %self.member_id,
                    %error,
                    "the coordinator no longer knows this member; dropping its partitions and joining again"
                );
                self.lose_all();
                Ok(Instant::now())
            }
            Err(error) if error.is_transient() => Ok(self.retry_later(&error, "heartbeat")),
            Err(error) => Err(error),
        }
    }

    fn retry_later(&mut self, error: &Error, what: &str) -> Instant {
        self.client.note_unreachable(error);
        tracing::warn!(group = %self.group, %error, "{what} failed; retrying in {:?}", self.backoff);
        let next = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(self.config.retry_backoff_max);
        next
    }

    fn set_interval(&mut self, interval_ms: u32) {
        let session = self.config.request_timeout();
        let interval = if interval_ms == 0 {
            session / 3
        } else {
            Duration::from_millis(u64::from(interval_ms))
        };
        self.heartbeat_interval = interval.clamp(HEARTBEAT_INTERVAL_MIN, session / 3);
    }

    /// Runs one call on the group's coordinator (found with `FindCoordinator`, followed
    /// when it moves) with the request timeout (a timeout is transient).
    async fn call<T, F, Fut>(&self, what: &str, call: F) -> Result<T>
    where
        F: FnMut(Grpc) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let answer = self.client.on_coordinator(&self.group, call);
        match tokio::time::timeout(self.config.request_timeout(), answer).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(failure)) => Err(failure.into()),
            Err(_) => Err(Error::Unreachable {
                address: self.client.address().to_owned(),
                reason: format!("no answer to {what} in time"),
            }),
        }
    }

    async fn join(&mut self) -> Result<v1::JoinGroupResponse> {
        let request = v1::JoinGroupRequest {
            group: self.group.clone(),
            member_id: self.member_id.clone(),
            topics: self.topics.clone(),
            session_timeout_ms: self.config.session_timeout_ms(),
            client_id: self.client_id.clone(),
        };
        self.call("JoinGroup", |mut grpc| {
            let request = request.clone();
            async move { grpc.join_group(request).await }
        })
        .await
    }

    async fn accept_join(&mut self, response: v1::JoinGroupResponse) -> Result<Instant> {
        if response.member_id.is_empty() {
            return Err(Error::Protocol(
                "JoinGroup answered without a member id".to_owned(),
            ));
        }
        tracing::info!(
            group = %self.group,
            member = %response.member_id,
            epoch = response.member_epoch,
            "joined the group"
        );
        self.member_id = response.member_id;
        self.shared.lock().member_id = self.member_id.clone();
        self.epoch = response.member_epoch;
        self.joined = true;
        self.set_interval(response.heartbeat_interval_ms);
        let released = self
            .reconcile(from_wire_partitions(response.assignment))
            .await?;
        Ok(if released {
            Instant::now()
        } else {
            Instant::now() + self.heartbeat_interval
        })
    }

    async fn heartbeat(&mut self) -> Result<v1::HeartbeatResponse> {
        let owned: Vec<TopicPartition> = self.readers.keys().map(partition_of).collect();
        let request = v1::HeartbeatRequest {
            group: self.group.clone(),
            member_id: self.member_id.clone(),
            member_epoch: self.epoch,
            owned: to_wire_partitions(&owned),
        };
        self.call("Heartbeat", |mut grpc| {
            let request = request.clone();
            async move { grpc.heartbeat(request).await }
        })
        .await
    }

    /// Moves to `assignment`: releases what left it (commit first), starts what joined it.
    /// Returns whether anything was released (then the next heartbeat should go at once).
    async fn reconcile(&mut self, assignment: Vec<TopicPartition>) -> Result<bool> {
        if assignment.len() > ASSIGNED_PARTITIONS_MAX {
            return Err(Error::Protocol(format!(
                "the coordinator assigned {} partitions, more than the maximum of \
                 {ASSIGNED_PARTITIONS_MAX} one member reads",
                assignment.len()
            )));
        }
        let target: BTreeSet<Key> = assignment.iter().map(key_of).collect();
        let revoked: BTreeSet<Key> = self
            .readers
            .keys()
            .filter(|key| !target.contains(*key))
            .cloned()
            .collect();
        if !revoked.is_empty() {
            self.revoke(&revoked).await;
        }
        let added: Vec<Key> = target
            .into_iter()
            .filter(|key| !self.readers.contains_key(key))
            .collect();
        if !added.is_empty() {
            self.start_reading(added).await?;
        }
        Ok(!revoked.is_empty())
    }

    /// Stops reading `keys` and commits what was handed out of them.
    async fn revoke(&mut self, keys: &BTreeSet<Key>) {
        let released = self.shared.release(keys);
        let mut offsets = Vec::new();
        for (key, processed) in released {
            if let Some(reader) = self.readers.remove(&key) {
                if let Some(task) = reader.task {
                    task.abort();
                }
                if processed > reader.committed {
                    offsets.push(v1::OffsetCommit {
                        topic: key.0.to_string(),
                        partition: key.1,
                        offset: processed,
                        ..Default::default()
                    });
                }
            }
        }
        // Readers whose entry was already gone (none expected): forget them too.
        for key in keys {
            if let Some(reader) = self.readers.remove(key) {
                if let Some(task) = reader.task {
                    task.abort();
                }
            }
        }
        if !offsets.is_empty() {
            if let Err(error) = self.send_commit(offsets).await {
                // At least once: the next owner reads again from the previous commit.
                tracing::warn!(group = %self.group, %error, "commit of revoked partitions failed");
            }
        }
        let partitions: Vec<TopicPartition> = keys.iter().map(partition_of).collect();
        tracing::info!(group = %self.group, ?partitions, "partitions revoked");
        let _ = self.events.send(GroupEvent::Revoked(partitions));
    }

    /// Drops every partition without committing (the coordinator forgot the member).
    fn lose_all(&mut self) {
        let keys: BTreeSet<Key> = self.readers.keys().cloned().collect();
        self.shared.release(&keys);
        for (_, reader) in std::mem::take(&mut self.readers) {
            if let Some(task) = reader.task {
                task.abort();
            }
        }
        self.joined = false;
        if !keys.is_empty() {
            let _ = self
                .events
                .send(GroupEvent::Lost(keys.iter().map(partition_of).collect()));
        }
    }

    /// Looks up where each new partition starts and starts its reader. Partitions whose start
    /// cannot be found now (a transient error) are not taken: they stay out of `owned` and the
    /// next heartbeat tries again.
    async fn start_reading(&mut self, added: Vec<Key>) -> Result<()> {
        let partitions: Vec<TopicPartition> = added.iter().map(partition_of).collect();
        // An assignment may hold more partitions than one lookup carries.
        let mut committed = Vec::new();
        for chunk in partitions.chunks(OFFSETS_PER_REQUEST_MAX) {
            match self.client.fetch_offsets(&self.group, Some(chunk)).await {
                Ok(offsets) => committed.extend(offsets),
                Err(error) if error.is_transient() => {
                    tracing::warn!(group = %self.group, %error, "cannot fetch committed offsets; will retry");
                    return Ok(());
                }
                Err(error) => return Err(error),
            }
        }
        let committed: HashMap<Key, u64> = committed
            .into_iter()
            .map(|offset| {
                (
                    (Arc::from(offset.topic.as_str()), offset.partition),
                    offset.offset,
                )
            })
            .collect();
        // Start offsets of partitions without a commit, looked up concurrently: a big
        // assignment must not hold the heartbeat for one round trip per partition.
        let missing: Vec<Key> = added
            .iter()
            .filter(|key| !committed.contains_key(*key))
            .cloned()
            .collect();
        let mut resets: HashMap<Key, Result<Option<u64>>> = {
            use futures::stream::StreamExt as _;
            let this = &*self;
            futures::stream::iter(missing)
                .map(|key| async move {
                    let start = this.reset_position(&key).await;
                    (key, start)
                })
                .buffer_unordered(RESET_LOOKUPS_IN_FLIGHT)
                .collect()
                .await
        };
        let mut started = Vec::new();
        for key in added {
            let start = match committed.get(&key) {
                Some(&offset) => Some(offset),
                None => match resets.remove(&key).unwrap_or(Ok(None)) {
                    Ok(start) => start,
                    Err(error) if error.is_transient() => {
                        tracing::warn!(group = %self.group, %error, "cannot look up a start offset; will retry");
                        continue;
                    }
                    Err(error) => return Err(error),
                },
            };
            self.next_token += 1;
            let token = self.next_token;
            let processed = start.unwrap_or(0);
            self.shared
                .lock()
                .owned
                .insert(key.clone(), Owned { token, processed });
            let task = match start {
                Some(offset) => Some(self.spawn_reader(key.clone(), token, offset)),
                None => {
                    let error = Error::Broker {
                        code: Code::NotFound,
                        message: format!(
                            "group {} has no committed offset for {}/{} and the offset reset \
                             policy is error",
                            self.group, key.0, key.1
                        ),
                    };
                    self.shared.lock().queue.push_back(Err(error));
                    self.shared.records_ready.notify_one();
                    None
                }
            };
            tracing::debug!(group = %self.group, topic = %key.0, partition = key.1, ?start, "reading partition");
            self.readers.insert(
                key.clone(),
                Reader {
                    token,
                    task,
                    committed: processed,
                },
            );
            started.push(partition_of(&key));
        }
        if !started.is_empty() {
            tracing::info!(group = %self.group, partitions = ?started, "partitions assigned");
            let _ = self.events.send(GroupEvent::Assigned(started));
        }
        Ok(())
    }

    /// Where a partition without a committed offset starts; `None` under
    /// [`OffsetReset::Error`].
    async fn reset_position(&self, key: &Key) -> Result<Option<u64>> {
        let query = match self.config.offset_reset {
            OffsetReset::Earliest => OffsetQuery::Earliest,
            OffsetReset::Latest => OffsetQuery::Latest,
            OffsetReset::Error => return Ok(None),
        };
        let listed = self.client.list_offsets(&key.0, key.1, query).await?;
        Ok(Some(listed.offset))
    }

    fn spawn_reader(&mut self, key: Key, token: u64, offset: u64) -> AbortHandle {
        let (sender, mut messages) = mpsc::channel(1);
        let reader = PartitionReader {
            client: self.client.clone(),
            topic: Arc::clone(&key.0),
            partition: key.1,
            config: self.reader_config.clone(),
            sender,
        };
        let shared = Arc::clone(&self.shared);
        self.tasks.spawn(async move {
            let forward = async move {
                while let Some(message) = messages.recv().await {
                    if !shared.deliver(&key, token, message).await {
                        break;
                    }
                }
            };
            tokio::join!(reader.run(offset), forward);
        })
    }

    /// Commits the processed position of every partition read that moved since its last
    /// commit.
    async fn commit_processed(&mut self) -> Result<()> {
        if !self.joined {
            return Ok(());
        }
        let offsets: Vec<v1::OffsetCommit> = {
            let buffer = self.shared.lock();
            self.readers
                .iter()
                .filter_map(|(key, reader)| {
                    let owned = buffer.owned.get(key)?;
                    let offset = buffer.committable(key, owned);
                    (owned.token == reader.token && offset > reader.committed).then(|| {
                        v1::OffsetCommit {
                            topic: key.0.to_string(),
                            partition: key.1,
                            offset,
                            ..Default::default()
                        }
                    })
                })
                .collect()
        };
        if offsets.is_empty() {
            return Ok(());
        }
        match self.send_commit(offsets).await {
            Err(error) if is_fenced(&error) => {
                tracing::warn!(group = %self.group, %error, "commit refused; joining again");
                self.lose_all();
                Err(error)
            }
            other => other,
        }
    }

    /// Sends the commits with the member's id and epoch, in requests of at most
    /// [`OFFSETS_PER_REQUEST_MAX`]; on success records the positions.
    async fn send_commit(&mut self, mut offsets: Vec<v1::OffsetCommit>) -> Result<()> {
        while offsets.len() > OFFSETS_PER_REQUEST_MAX {
            let rest = offsets.split_off(OFFSETS_PER_REQUEST_MAX);
            self.send_commit_request(std::mem::replace(&mut offsets, rest))
                .await?;
        }
        self.send_commit_request(offsets).await
    }

    async fn send_commit_request(&mut self, offsets: Vec<v1::OffsetCommit>) -> Result<()> {
        let committed: Vec<(Key, u64)> = offsets
            .iter()
            .map(|offset| {
                (
                    (Arc::from(offset.topic.as_str()), offset.partition),
                    offset.offset,
                )
            })
            .collect();
        let request = v1::CommitOffsetsRequest {
            group: self.group.clone(),
            member_id: self.member_id.clone(),
            member_epoch: self.epoch,
            offsets,
        };
        self.call("CommitOffsets", |mut grpc| {
            let request = request.clone();
            async move { grpc.commit_offsets(request).await }
        })
        .await?;
        tracing::debug!(group = %self.group, offsets = committed.len(), "committed");
        for (key, offset) in committed {
            if let Some(reader) = self.readers.get_mut(&key) {
                reader.committed = reader.committed.max(offset);
            }
        }
        Ok(())
    }

    /// Commits, stops every reader, leaves the group.
    async fn close(&mut self) -> Result<()> {
        let committed = self.commit_processed().await;
        let keys: BTreeSet<Key> = self.readers.keys().cloned().collect();
        self.shared.release(&keys);
        self.readers.clear();
        self.tasks.abort_all();
        if self.joined {
            let request = v1::LeaveGroupRequest {
                group: self.group.clone(),
                member_id: self.member_id.clone(),
                member_epoch: self.epoch,
            };
            if let Err(error) = self
                .call("LeaveGroup", |mut grpc| {
                    let request = request.clone();
                    async move { grpc.leave_group(request).await }
                })
                .await
            {
                // The session expires by itself; nothing is lost.
                tracing::warn!(group = %self.group, %error, "leaving the group failed");
            }
            self.joined = false;
        }
        self.shared.close();
        committed
    }

    /// A fatal error: hand it to the application, stop without committing.
    fn fail(mut self, error: Error) {
        tracing::error!(group = %self.group, %error, "the group consumer stopped");
        self.lose_all();
        self.shared.lock().queue.push_back(Err(error));
        self.shared.close();
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        // However the task ends (returned, failed, aborted), readers stop and `recv` ends.
        self.tasks.abort_all();
        self.shared.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_validation_should_name_the_key() {
        GroupConsumerConfig::default().validate().unwrap();
        let cases: [(GroupConsumerConfig, &str); 4] = [
            (
                GroupConsumerConfig {
                    session_timeout: Some(Duration::from_millis(10)),
                    ..Default::default()
                },
                "session_timeout",
            ),
            (
                GroupConsumerConfig {
                    buffered_records_max: 0,
                    ..Default::default()
                },
                "buffered_records_max",
            ),
            (
                GroupConsumerConfig {
                    retry_backoff: Duration::from_secs(2),
                    ..Default::default()
                },
                "retry_backoff",
            ),
            (
                GroupConsumerConfig {
                    auto_commit_interval: Some(Duration::ZERO),
                    ..Default::default()
                },
                "auto_commit_interval",
            ),
        ];
        for (config, expected) in cases {
            assert!(
                matches!(config.validate(), Err(Error::InvalidConfig { key, .. }) if key == expected),
                "{expected}"
            );
        }
    }
}
