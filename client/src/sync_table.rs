//! [`SyncTable`]: a live, caught-up, in-memory copy of a table (a topic created with
//! cleanup=compact).
//!
//! # How it follows the table
//!
//! One task per partition:
//! 1. loads the partition's snapshot ([`Client::snapshot`]): the latest value of every live key
//!    as of the partition's durable offset H;
//! 2. tails the partition from H: one `Fetch` without waiting (it validates the position and
//!    reports the compaction horizon even when there is no new data), then `Subscribe`, applying
//!    every record in offset order. A record is applied only if its offset is at least the
//!    partition's *next offset* (one past the last record applied), so a response that starts
//!    before it (the first batch may) is never applied twice, and the next offset only moves
//!    to the end of the batches actually applied, so nothing is skipped;
//! 3. when a response's `compaction_horizon` is above the next offset (compaction removed
//!    deletes the tail has not read yet), or the position is OUT_OF_RANGE (retention or
//!    compaction removed it), it loads a fresh snapshot and *replaces* the partition's keys with
//!    it, emitting the changes the replacement implies (see [`Change::from_snapshot`]), then
//!    tails from the new H;
//! 4. on a transient failure (broker unreachable or restarting, UNAVAILABLE, a stream that
//!    ends, a node that no longer leads the partition) it waits with capped exponential
//!    backoff and resumes from the next offset, through the [`Client`]'s connection to the
//!    partition's leader (the view follows a leader change);
//! 5. a leader that is *behind* the next offset (a new leader still applying committed
//!    records: OUT_OF_RANGE past its log end, or a snapshot older than what was applied) is
//!    waited for with the same backoff, instead of re-snapshotting backwards (which would
//!    emit changes that undo applied ones, then repeat them), for up to a minute; a node
//!    behind for longer lost data, and the table then follows it as step 3 says.
//!
//! Any other failure (topic deleted, corrupt data, a protocol violation, the key limit) stops
//! the table: [`SyncTable::wait_caught_up`], [`SyncTable::wait_for`] and every [`Changes`]
//! receiver then return that error ([`SyncTable::error`] too); reads keep serving the last
//! state.
//!
//! # Consistency
//!
//! All state sits behind one lock that is never held across an `.await`. A partition's records
//! are applied, its next offset advanced and its changes published in one critical section, so
//! [`SyncTable::entries_and_changes`] returns a copy of the map and a change receiver that
//! starts exactly after it. Per key, versions only grow.
//!
//! # Limits
//!
//! - Memory is proportional to the table: every key, value and header is copied out of the
//!   response it arrived in (a slice would pin the whole response buffer). At most
//!   [`SyncTableConfig::keys_max`] keys ([`Error::TableTooLarge`] beyond). A re-snapshot holds
//!   the new snapshot of one partition beside the old one until it replaces it.
//! - Each response is at most [`SyncTableConfig::fetch_bytes_max`] bytes (plus one batch).
//! - Changes go to receivers through a bounded buffer of [`SyncTableConfig::changes_max`]
//!   changes; a receiver that falls further behind loses the oldest ones and is told how many
//!   ([`Error::ChangesLagged`]); the table itself never waits for receivers.
//! - Retries: forever for transient failures (a follower outlives broker restarts), pausing
//!   [`SyncTableConfig::retry_backoff`] doubling up to [`SyncTableConfig::retry_backoff_max`].

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt as _;
use syncline_proto::batch::Header;
use syncline_proto::partitioner::partition_for_key;
use syncline_proto::v1;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use tonic::Code;

use crate::admin::CleanupPolicy;
use crate::client::Client;
use crate::consumer::{decode_batches, ConsumerRecord};
use crate::error::{Error, Result};
use crate::routing::Target;
use crate::table::{Entry, Written};

/// [`SyncTable`] settings. The defaults suit tables of up to millions of keys.
#[derive(Debug, Clone)]
pub struct SyncTableConfig {
    /// Most keys the table may hold (over all partitions); beyond it the table stops with
    /// [`Error::TableTooLarge`] instead of exhausting memory.
    pub keys_max: usize,
    /// Changes buffered for [`Changes`] receivers; a receiver further behind loses the oldest
    /// ([`Error::ChangesLagged`]).
    pub changes_max: usize,
    /// Byte budget of one tail response (the broker returns at least one whole batch).
    pub fetch_bytes_max: u32,
    /// First pause after a transient failure, doubled after each further one.
    pub retry_backoff: Duration,
    /// Longest pause between attempts.
    pub retry_backoff_max: Duration,
}

impl Default for SyncTableConfig {
    fn default() -> Self {
        SyncTableConfig {
            keys_max: 100_000_000,
            changes_max: 16_384,
            fetch_bytes_max: 4 * 1024 * 1024,
            retry_backoff: Duration::from_millis(50),
            retry_backoff_max: Duration::from_secs(5),
        }
    }
}

/// Largest change buffer: each slot holds a [`Change`] until every receiver saw it.
const CHANGES_LIMIT: usize = 1 << 20;
/// Longest pause between attempts: a follower should notice a returning broker within a minute.
const RETRY_BACKOFF_LIMIT: Duration = Duration::from_secs(60);
/// How long a partition waits for a node that is behind what the table already applied (a
/// new leader still applying committed records) before it takes that node's snapshot anyway:
/// a node that stays behind this long lost data, and following it beats stopping.
const BEHIND_GRACE: Duration = Duration::from_secs(60);

impl SyncTableConfig {
    /// Checks each field against its bounds.
    pub fn validate(&self) -> Result<()> {
        let invalid = |key: &'static str, reason: String| Err(Error::InvalidConfig { key, reason });
        if self.keys_max == 0 {
            return invalid("keys_max", "must be above 0".to_owned());
        }
        if !(1..=CHANGES_LIMIT).contains(&self.changes_max) {
            return invalid(
                "changes_max",
                format!("{} is outside [1, {CHANGES_LIMIT}]", self.changes_max),
            );
        }
        if self.fetch_bytes_max == 0 {
            return invalid("fetch_bytes_max", "must be above 0".to_owned());
        }
        if self.retry_backoff.is_zero() || self.retry_backoff > self.retry_backoff_max {
            return invalid(
                "retry_backoff",
                format!(
                    "{:?} is outside (0, retry_backoff_max = {:?}]",
                    self.retry_backoff, self.retry_backoff_max
                ),
            );
        }
        if self.retry_backoff_max > RETRY_BACKOFF_LIMIT {
            return invalid(
                "retry_backoff_max",
                format!(
                    "{:?} is above the maximum of {RETRY_BACKOFF_LIMIT:?}",
                    self.retry_backoff_max
                ),
            );
        }
        Ok(())
    }
}

/// One change the table applied to a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The key.
    pub key: Bytes,
    /// The key's partition.
    pub partition: u32,
    /// The key's new version: the offset of the record applied. For a delete that a
    /// re-snapshot implies (the tombstone itself was compacted away) it is the last offset the
    /// new snapshot covers (H - 1), which is at or after the real tombstone and above
    /// `previous_version`.
    pub version: u64,
    /// The new value; `None` for a delete.
    pub value: Option<Bytes>,
    /// The key's version before this change; `None` when the key was absent.
    pub previous_version: Option<u64>,
    /// Whether the change comes from loading a snapshot (the first load, or a re-snapshot after
    /// compaction) rather than from a record of the log. A snapshot gives only the latest value
    /// of each key, so versions in between are not reported, and a key the new snapshot lacks
    /// is reported deleted.
    pub from_snapshot: bool,
}

/// The changes a [`SyncTable`] applies, in order per partition, from [`SyncTable::changes`]
/// or [`SyncTable::entries_and_changes`]. Bounded: see [`SyncTableConfig::changes_max`].
#[derive(Debug)]
pub struct Changes {
    receiver: broadcast::Receiver<Change>,
    shared: Arc<Shared>,
}

impl Changes {
    /// The next change. Fails with [`Error::ChangesLagged`] when this receiver fell behind (it
    /// then goes on with the oldest change still buffered), with the table's error once it
    /// stopped, and with [`Error::Closed`] once it was closed or dropped.
    pub async fn recv(&mut self) -> Result<Change> {
        match self.receiver.recv().await {
            Ok(change) => Ok(change),
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                Err(Error::ChangesLagged { missed })
            }
            Err(broadcast::error::RecvError::Closed) => Err(self.shared.stopped_error()),
        }
    }
}

/// A live copy of a table: every key's latest value and version, kept up to date in the
/// background (see the module doc for how, and its limits). Cheap to clone: clones share the
/// copy; the background tasks stop when the last clone is dropped or on [`SyncTable::close`].
///
/// ```no_run
/// use syncline_client::{Client, Error};
///
/// # async fn example() -> Result<(), Error> {
/// let client = Client::connect("127.0.0.1:7450").await?;
/// let replica = client.sync_table("accounts").await?;
/// replica.wait_caught_up().await?;
/// println!("{} accounts", replica.len());
///
/// // Read your own writes.
/// let written = client.table("accounts").await?.put("alice", "100").await?;
/// replica.wait_for_write(written).await?;
/// assert_eq!(replica.get("alice").map(|entry| entry.version), Some(written.version));
///
/// // Follow every change from a consistent starting point.
/// let (entries, mut changes) = replica.entries_and_changes();
/// println!("starting from {} keys", entries.len());
/// loop {
///     let change = changes.recv().await?;
///     println!(
///         "{:?}: {:?} -> {} ({:?})",
///         change.key, change.previous_version, change.version, change.value
///     );
/// }
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct SyncTable {
    shared: Arc<Shared>,
    tasks: Arc<Tasks>,
}

#[derive(Debug)]
struct Shared {
    client: Client,
    topic: String,
    partitions: u32,
    config: SyncTableConfig,
    state: RwLock<State>,
    /// Bumped whenever a partition makes progress, fails or the table closes.
    progress: watch::Sender<u64>,
}

#[derive(Debug)]
struct State {
    partitions: Vec<PartitionState>,
    /// Keys over all partitions.
    keys: usize,
    /// `None` once the table stopped or closed: receivers then end.
    changes: Option<broadcast::Sender<Change>>,
    failed: Option<Error>,
    closed: bool,
}

#[derive(Debug, Default)]
struct PartitionState {
    entries: HashMap<Bytes, Entry>,
    /// One past the last offset applied: the next record to apply.
    next_offset: u64,
    /// The first snapshot is loaded.
    loaded: bool,
    /// The durable offset when the table was opened: caught up once `next_offset` reaches it.
    open_durable_offset: u64,
}

/// The background tasks; dropping the last handle stops them and ends the change receivers.
#[derive(Debug)]
struct Tasks {
    handles: Vec<JoinHandle<()>>,
    shared: Arc<Shared>,
}

impl Drop for Tasks {
    fn drop(&mut self) {
        for handle in &self.handles {
            handle.abort();
        }
        self.shared.close();
    }
}

impl SyncTable {
    /// Opens table `topic` with the default [`SyncTableConfig`] and starts loading it; see
    /// [`SyncTable::wait_caught_up`]. Fails with NOT_FOUND for an unknown topic and
    /// [`Error::NotATable`] for a topic that is not a table.
    pub async fn open(client: &Client, topic: &str) -> Result<SyncTable> {
        SyncTable::open_with(client, topic, SyncTableConfig::default()).await
    }

    /// [`SyncTable::open`] with an explicit config.
    pub async fn open_with(
        client: &Client,
        topic: &str,
        config: SyncTableConfig,
    ) -> Result<SyncTable> {
        config.validate()?;
        let description = client.describe_topic(topic).await?;
        if description.config.cleanup_policy != CleanupPolicy::Compact {
            return Err(Error::NotATable {
                topic: description.name,
            });
        }
        let partitions = description.partition_count();
        if partitions == 0 {
            return Err(Error::Protocol(format!(
                "topic `{topic}` is described with no partitions"
            )));
        }
        let mut states: Vec<PartitionState> =
            (0..partitions).map(|_| PartitionState::default()).collect();
        for described in &description.partitions {
            if let Some(state) = states.get_mut(described.partition as usize) {
                state.open_durable_offset = described.durable_offset;
            }
        }
        let (changes, _) = broadcast::channel(config.changes_max);
        let shared = Arc::new(Shared {
            client: client.clone(),
            topic: description.name,
            partitions,
            config,
            state: RwLock::new(State {
                partitions: states,
                keys: 0,
                changes: Some(changes),
                failed: None,
                closed: false,
            }),
            progress: watch::Sender::new(0),
        });
        let handles = (0..partitions)
            .map(|partition| tokio::spawn(follow(Arc::clone(&shared), partition)))
            .collect();
        Ok(SyncTable {
            tasks: Arc::new(Tasks {
                handles,
                shared: Arc::clone(&shared),
            }),
            shared,
        })
    }

    /// The table's name.
    pub fn topic(&self) -> &str {
        &self.shared.topic
    }

    /// The table's partition count.
    pub fn partitions(&self) -> u32 {
        self.shared.partitions
    }

    /// The latest value of `key` with its version, or `None` when the key is absent or
    /// deleted (as far as the table has applied).
    pub fn get(&self, key: impl AsRef<[u8]>) -> Option<Entry> {
        let key = key.as_ref();
        let partition = partition_for_key(key, self.shared.partitions);
        let state = self.shared.read();
        state
            .partitions
            .get(partition as usize)
            .and_then(|partition| partition.entries.get(key))
            .cloned()
    }

    /// Number of live keys.
    pub fn len(&self) -> usize {
        self.shared.read().keys
    }

    /// Whether the table holds no key.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A consistent copy of every live key and its entry, sorted by key.
    pub fn entries(&self) -> BTreeMap<Bytes, Entry> {
        copy_entries(&self.shared.read())
    }

    /// A consistent copy of the table and a receiver of every change applied after it: apply
    /// the changes to the copy and it stays equal to the table.
    pub fn entries_and_changes(&self) -> (BTreeMap<Bytes, Entry>, Changes) {
        let state = self.shared.read();
        let changes = self.shared.receiver(&state);
        (copy_entries(&state), changes)
    }

    /// [`SyncTable::entries_and_changes`] with each partition's next offset at the copy (one
    /// past the last record applied, by partition): the position a subscriber that resumes
    /// later reads the log from.
    pub fn entries_offsets_and_changes(&self) -> (BTreeMap<Bytes, Entry>, Vec<u64>, Changes) {
        let state = self.shared.read();
        let changes = self.shared.receiver(&state);
        let offsets = state.partitions.iter().map(|p| p.next_offset).collect();
        (copy_entries(&state), offsets, changes)
    }

    /// Each partition's next offset (one past the last record applied): where the copy stands,
    /// without copying it.
    pub fn offsets(&self) -> Vec<u64> {
        let state = self.shared.read();
        state.partitions.iter().map(|p| p.next_offset).collect()
    }

    /// A receiver of every change applied from now on, including the puts of the first
    /// snapshot load if it is not done yet.
    pub fn changes(&self) -> Changes {
        let state = self.shared.read();
        self.shared.receiver(&state)
    }

    /// The next offset the table will apply in `partition` (one past the last applied), or
    /// `None` for a partition the table does not have.
    pub fn next_offset(&self, partition: u32) -> Option<u64> {
        let state = self.shared.read();
        state
            .partitions
            .get(partition as usize)
            .map(|partition| partition.next_offset)
    }

    /// The error that stopped the table, if one did.
    pub fn error(&self) -> Option<Error> {
        self.shared.read().failed.clone()
    }

    /// Waits until every partition's first snapshot is loaded and the table has applied every
    /// record up to the durable offsets seen when it was opened. Fails with the error that
    /// stopped the table, or [`Error::Closed`].
    pub async fn wait_caught_up(&self) -> Result<()> {
        self.shared
            .wait(|state| {
                state.partitions.iter().all(|partition| {
                    partition.loaded && partition.next_offset >= partition.open_durable_offset
                })
            })
            .await
    }

    /// Waits until the table has applied `offset` of `partition` (read-your-writes: pass the
    /// version a write returned). Fails with [`Error::UnknownPartition`], the error that
    /// stopped the table, or [`Error::Closed`].
    pub async fn wait_for(&self, partition: u32, offset: u64) -> Result<()> {
        if partition >= self.shared.partitions {
            return Err(Error::UnknownPartition {
                topic: self.shared.topic.clone(),
                partition,
                partitions: self.shared.partitions,
            });
        }
        self.shared
            .wait(|state| {
                let partition = &state.partitions[partition as usize];
                partition.loaded && partition.next_offset > offset
            })
            .await
    }

    /// [`SyncTable::wait_for`] the write [`crate::Table::put`] (or `delete`, `put_if`, ...)
    /// returned.
    pub async fn wait_for_write(&self, written: Written) -> Result<()> {
        self.wait_for(written.partition, written.version).await
    }

    /// Stops following the table: the background tasks end, waits fail with
    /// [`Error::Closed`], change receivers end after the changes already buffered. The copy
    /// stays readable.
    pub fn close(&self) {
        for handle in &self.tasks.handles {
            handle.abort();
        }
        self.shared.close();
    }
}

impl State {
    /// Whether the table failed or was closed: no partition applies anything any more.
    fn is_stopped(&self) -> bool {
        self.failed.is_some() || self.closed
    }
}

fn copy_entries(state: &State) -> BTreeMap<Bytes, Entry> {
    state
        .partitions
        .iter()
        .flat_map(|partition| partition.entries.iter())
        .map(|(key, entry)| (key.clone(), entry.clone()))
        .collect()
}

impl Shared {
    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn bump(&self) {
        self.progress.send_modify(|generation| *generation += 1);
    }

    fn receiver(self: &Arc<Self>, state: &State) -> Changes {
        let receiver = match &state.changes {
            Some(sender) => sender.subscribe(),
            // Stopped: a receiver that ends at once.
            None => broadcast::channel(1).1,
        };
        Changes {
            receiver,
            shared: Arc::clone(self),
        }
    }

    /// Why the table no longer runs.
    fn stopped_error(&self) -> Error {
        self.read()
            .failed
            .clone()
            .unwrap_or(Error::Closed("sync table"))
    }

    fn close(&self) {
        {
            let mut state = self.write();
            state.closed = true;
            state.changes = None;
        }
        self.bump();
    }

    fn fail(&self, error: Error) {
        {
            let mut state = self.write();
            if state.failed.is_none() {
                state.failed = Some(error);
            }
            state.changes = None;
        }
        self.bump();
    }

    async fn wait(&self, mut done: impl FnMut(&State) -> bool) -> Result<()> {
        let mut progress = self.progress.subscribe();
        loop {
            {
                let state = self.read();
                if let Some(error) = &state.failed {
                    return Err(error.clone());
                }
                if state.closed {
                    return Err(Error::Closed("sync table"));
                }
                if done(&state) {
                    return Ok(());
                }
            }
            progress
                .changed()
                .await
                .map_err(|_| Error::Closed("sync table"))?;
        }
    }

    /// Loads a whole snapshot of `partition` and replaces the partition's keys with it.
    /// Returns `false`, applying nothing, when the snapshot is older than what the partition
    /// already applied and `accept_behind` is not set (the node is behind: see [`follow`]).
    async fn load_snapshot(&self, partition: u32, accept_behind: bool) -> Result<bool> {
        let mut snapshot = self.client.snapshot(&self.topic, partition).await?;
        self.client.note_reachable();
        let high_watermark = snapshot.high_watermark();
        if !accept_behind && high_watermark < self.applied_offset(partition) {
            tracing::info!(
                topic = %self.topic,
                partition,
                high_watermark,
                "the leader's snapshot is behind what this table applied; waiting for it"
            );
            return Ok(false);
        }
        let mut entries = HashMap::new();
        while let Some(records) = snapshot.next_chunk().await? {
            for record in records {
                if let Some((key, entry)) = owned_entry(record) {
                    entries.insert(key, entry);
                }
                if entries.len() > self.config.keys_max {
                    return Err(self.too_large());
                }
            }
        }
        tracing::debug!(
            topic = %self.topic,
            partition,
            high_watermark,
            keys = entries.len(),
            "snapshot loaded"
        );
        {
            let mut state = self.write();
            if state.is_stopped() {
                // Another partition stopped the table: its copy stays as it was.
                return Ok(true);
            }
            self.replace(&mut state, partition, entries, high_watermark)?;
        }
        self.bump();
        Ok(true)
    }

    /// The next offset of a loaded partition (0 before its first snapshot).
    fn applied_offset(&self, partition: u32) -> u64 {
        let state = self.read();
        let partition_state = &state.partitions[partition as usize];
        if partition_state.loaded {
            partition_state.next_offset
        } else {
            0
        }
    }

    /// Whether an OUT_OF_RANGE at the partition's next offset means the answering node is
    /// behind (the offset is past its log end, not before its log start): a new leader still
    /// applying committed records, worth waiting for instead of a re-snapshot. Counts as
    /// "removed" when the log start cannot be looked up.
    async fn is_node_behind(&self, partition: u32) -> bool {
        let next_offset = self.applied_offset(partition);
        match self
            .client
            .list_offsets(&self.topic, partition, crate::admin::OffsetQuery::Earliest)
            .await
        {
            Ok(earliest) => next_offset >= earliest.offset,
            Err(_) => false,
        }
    }

    fn too_large(&self) -> Error {
        Error::TableTooLarge {
            topic: self.topic.clone(),
            max: self.config.keys_max,
        }
    }

    /// Replaces `partition`'s keys with a snapshot as of `high_watermark`, publishing the
    /// implied changes: puts for new and changed keys (ascending versions), then deletes for
    /// keys the snapshot lacks (by key).
    fn replace(
        &self,
        state: &mut State,
        partition: u32,
        mut entries: HashMap<Bytes, Entry>,
        high_watermark: u64,
    ) -> Result<()> {
        let index = partition as usize;
        let old_len = state.partitions[index].entries.len();
        if state.keys - old_len + entries.len() > self.config.keys_max {
            return Err(self.too_large());
        }
        let mut old = std::mem::take(&mut state.partitions[index].entries);
        let mut changes = Vec::new();
        let mut puts: Vec<(&Bytes, &Entry)> = entries.iter().collect();
        puts.sort_by_key(|(_, entry)| entry.version);
        for (key, entry) in puts {
            let previous = old.remove(key).map(|old| old.version);
            if previous == Some(entry.version) {
                continue;
            }
            changes.push(Change {
                key: key.clone(),
                partition,
                version: entry.version,
                value: Some(entry.value.clone()),
                previous_version: previous,
                from_snapshot: true,
            });
        }
        let mut gone: Vec<(Bytes, Entry)> = old.into_iter().collect();
        gone.sort_by(|a, b| a.0.cmp(&b.0));
        for (key, entry) in gone {
            changes.push(Change {
                key,
                partition,
                version: high_watermark.saturating_sub(1).max(entry.version),
                value: None,
                previous_version: Some(entry.version),
                from_snapshot: true,
            });
        }
        let partition_state = &mut state.partitions[index];
        if partition_state.loaded && high_watermark < partition_state.next_offset {
            tracing::warn!(
                topic = %self.topic,
                partition,
                high_watermark,
                next_offset = partition_state.next_offset,
                "the broker's snapshot is behind what this table already applied"
            );
        }
        state.keys = state.keys - old_len + entries.len();
        let partition_state = &mut state.partitions[index];
        partition_state.entries = std::mem::take(&mut entries);
        partition_state.next_offset = high_watermark;
        partition_state.loaded = true;
        if let Some(sender) = &state.changes {
            for change in changes {
                // No receiver is not an error.
                let _ = sender.send(change);
            }
        }
        Ok(())
    }

    /// Applies the records of one tail response (offsets at or after the partition's next
    /// offset) and advances the next offset to `end_offset`.
    fn apply(
        &self,
        state: &mut State,
        partition: u32,
        records: Vec<ConsumerRecord>,
        end_offset: u64,
    ) -> Result<()> {
        let index = partition as usize;
        for record in records {
            let next_offset = state.partitions[index].next_offset;
            if record.offset < next_offset {
                continue;
            }
            let offset = record.offset;
            match owned_record(record) {
                None => {
                    tracing::debug!(
                        topic = %self.topic,
                        partition,
                        offset,
                        "skipping a record without a key"
                    );
                }
                Some((key, Some(entry))) => {
                    let value = entry.value.clone();
                    let entries = &mut state.partitions[index].entries;
                    let is_new = !entries.contains_key(&key);
                    if is_new && state.keys >= self.config.keys_max {
                        return Err(self.too_large());
                    }
                    let previous = entries.insert(key.clone(), entry).map(|old| old.version);
                    if is_new {
                        state.keys += 1;
                    }
                    publish(state, key, partition, offset, Some(value), previous);
                }
                Some((key, None)) => {
                    let removed = state.partitions[index].entries.remove(&key);
                    if let Some(removed) = removed {
                        state.keys -= 1;
                        publish(state, key, partition, offset, None, Some(removed.version));
                    }
                }
            }
            state.partitions[index].next_offset = offset + 1;
        }
        let partition_state = &mut state.partitions[index];
        partition_state.next_offset = partition_state.next_offset.max(end_offset);
        Ok(())
    }

    /// Handles one tail response; see [`Step`].
    fn handle(&self, partition: u32, response: v1::FetchResponse) -> Result<Handled> {
        // Only this partition's task moves its next offset, so it cannot change in between.
        let next_offset = self.read().partitions[partition as usize].next_offset;
        if response.compaction_horizon > next_offset {
            tracing::info!(
                topic = %self.topic,
                partition,
                next_offset,
                compaction_horizon = response.compaction_horizon,
                "compaction passed this table's position; re-snapshotting"
            );
            return Ok(Handled::Resnapshot);
        }
        let decoded = decode_batches(
            &std::sync::Arc::from(self.topic.as_str()),
            partition,
            next_offset,
            response.batches,
        )
        .map_err(|source| Error::Corrupt {
            topic: self.topic.clone(),
            partition,
            offset: next_offset,
            source,
        })?;
        let end_offset = match decoded.end_offset {
            // Resubscribed from the end of the whole batches.
            Some(end) if decoded.truncated => end,
            // The broker's next offset may pass a gap compaction left after the last batch.
            Some(end) => end.max(response.next_offset),
            None => response.next_offset,
        };
        {
            let mut state = self.write();
            if state.is_stopped() {
                // Another partition stopped the table: its copy stays as it was.
                return Ok(Handled::Stopped);
            }
            self.apply(&mut state, partition, decoded.records, end_offset)?;
        }
        self.bump();
        Ok(if decoded.truncated {
            Handled::Truncated
        } else {
            Handled::Applied
        })
    }

    /// Tails `partition` from its next offset until something ends the tail.
    async fn tail(&self, partition: u32, progressed: &mut bool) -> Result<Step> {
        let offset = self.read().partitions[partition as usize].next_offset;
        // The probe: validates the position (OUT_OF_RANGE) and reports the compaction horizon
        // even when no new record would make the subscription answer.
        let request = v1::FetchRequest {
            topic: self.topic.clone(),
            partition,
            offset,
            max_bytes: Some(self.config.fetch_bytes_max),
            max_wait_ms: 0,
            decode_records: false,
        };
        let probe = self
            .client
            .on_partition(&self.topic, partition, |mut grpc| {
                let request = request.clone();
                async move { grpc.fetch(request).await }
            })
            .await?;
        self.client.note_reachable();
        match self.handle(partition, probe)? {
            Handled::Resnapshot => return Ok(Step::Resnapshot),
            Handled::Truncated => return Ok(Step::Resubscribe),
            Handled::Stopped => return Ok(Step::Stop),
            Handled::Applied => *progressed = true,
        }
        let offset = self.read().partitions[partition as usize].next_offset;
        let request = v1::SubscribeRequest {
            topic: self.topic.clone(),
            partition,
            offset,
            max_bytes: Some(self.config.fetch_bytes_max),
            decode_records: false,
        };
        let (mut stream, address) = self
            .client
            .open_on_partition(&self.topic, partition, |mut grpc| {
                let request = request.clone();
                async move { grpc.subscribe(request).await }
            })
            .await?;
        loop {
            let response = match stream.next().await {
                None => return Ok(Step::Reconnect),
                Some(Err(status)) => {
                    let target = Target::Partition(&self.topic, partition);
                    return Err(self.client.stream_error(target, &address, status));
                }
                Some(Ok(response)) => response,
            };
            match self.handle(partition, response)? {
                Handled::Resnapshot => return Ok(Step::Resnapshot),
                Handled::Truncated => return Ok(Step::Resubscribe),
                Handled::Stopped => return Ok(Step::Stop),
                Handled::Applied => *progressed = true,
            }
        }
    }
}

/// Publishes one change from the log.
fn publish(
    state: &State,
    key: Bytes,
    partition: u32,
    version: u64,
    value: Option<Bytes>,
    previous_version: Option<u64>,
) {
    if let Some(sender) = &state.changes {
        // No receiver is not an error.
        let _ = sender.send(Change {
            key,
            partition,
            version,
            value,
            previous_version,
            from_snapshot: false,
        });
    }
}

/// A record's key and entry (`None`: a tombstone), copied out of the response buffer so that
/// the table does not pin it; `None` for a record without a key.
fn owned_record(record: ConsumerRecord) -> Option<(Bytes, Option<Entry>)> {
    let key = Bytes::copy_from_slice(&record.key?);
    let Some(value) = record.value else {
        return Some((key, None));
    };
    let entry = Entry {
        partition: record.partition,
        version: record.offset,
        value: Bytes::copy_from_slice(&value),
        timestamp: record.timestamp,
        headers: record
            .headers
            .into_iter()
            .map(|header| Header {
                key: header.key,
                value: Bytes::copy_from_slice(&header.value),
            })
            .collect(),
    };
    Some((key, Some(entry)))
}

/// A snapshot record as a live entry (snapshots hold no tombstones and every record has a key).
fn owned_entry(record: ConsumerRecord) -> Option<(Bytes, Entry)> {
    match owned_record(record) {
        Some((key, Some(entry))) => Some((key, entry)),
        _ => None,
    }
}

/// What one response did to the tail.
enum Handled {
    Applied,
    /// Compaction passed the position: load a fresh snapshot.
    Resnapshot,
    /// The response ended in a partial batch: resubscribe from the next offset.
    Truncated,
    /// The table stopped (another partition failed, or it was closed): nothing was applied.
    Stopped,
}

/// Why a tail ended without an error.
enum Step {
    Resnapshot,
    Resubscribe,
    /// The stream ended (the broker is shutting down): reconnect after a pause.
    Reconnect,
    /// The node's snapshot is older than what the table applied: load it again after a pause.
    Behind,
    /// The table stopped: the task ends.
    Stop,
}

/// Whether a tail or snapshot failure is worth retrying: the broker is unreachable, restarting
/// or overloaded, or the stream broke on the way.
fn is_retryable(error: &Error) -> bool {
    error.is_transient()
        || matches!(
            error.code(),
            Some(Code::Cancelled | Code::Unknown | Code::Internal | Code::ResourceExhausted)
        )
}

/// The task that follows one partition for as long as the table lives.
async fn follow(shared: Arc<Shared>, partition: u32) {
    let topic = shared.topic.clone();
    let mut backoff = shared.config.retry_backoff;
    let mut need_snapshot = true;
    // Snapshots loaded without a tail response since: a second one in a row pauses first, so
    // a broker that keeps answering OUT_OF_RANGE is not hammered.
    let mut snapshots_in_a_row = 0u32;
    // Since when the partition's leader has been behind what the table applied.
    let mut behind_since: Option<tokio::time::Instant> = None;
    loop {
        if shared.read().is_stopped() {
            // Another partition's failure stops the whole table (see the module doc).
            return;
        }
        let outcome = if need_snapshot {
            if snapshots_in_a_row > 0 {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(shared.config.retry_backoff_max);
            }
            snapshots_in_a_row += 1;
            let accept_behind = behind_since.is_some_and(|since| since.elapsed() >= BEHIND_GRACE);
            match shared.load_snapshot(partition, accept_behind).await {
                Ok(true) => Ok(None),
                Ok(false) => Ok(Some(Step::Behind)),
                Err(error) => Err(error),
            }
        } else {
            let mut progressed = false;
            let result = shared.tail(partition, &mut progressed).await.map(Some);
            if progressed {
                // A response was applied: the connection is healthy again.
                backoff = shared.config.retry_backoff;
                snapshots_in_a_row = 0;
                behind_since = None;
            }
            result
        };
        let error = match outcome {
            Ok(None) => {
                need_snapshot = false;
                behind_since = None;
                continue;
            }
            Ok(Some(Step::Behind)) => {
                behind_since.get_or_insert_with(tokio::time::Instant::now);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(shared.config.retry_backoff_max);
                continue;
            }
            Ok(Some(Step::Resnapshot)) => {
                need_snapshot = true;
                continue;
            }
            Ok(Some(Step::Resubscribe)) => continue,
            Ok(Some(Step::Stop)) => return,
            Ok(Some(Step::Reconnect)) => {
                tracing::info!(%topic, partition, "subscription ended; reconnecting in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(shared.config.retry_backoff_max);
                continue;
            }
            Err(error) => error,
        };
        if !need_snapshot
            && error.code() == Some(Code::OutOfRange)
            && shared.is_node_behind(partition).await
        {
            let since = *behind_since.get_or_insert_with(tokio::time::Instant::now);
            if since.elapsed() < BEHIND_GRACE {
                tracing::info!(%topic, partition, %error, "the leader is behind this table's position; waiting for it");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(shared.config.retry_backoff_max);
                continue;
            }
        }
        if !need_snapshot && error.code() == Some(Code::OutOfRange) {
            tracing::warn!(%topic, partition, %error, "position out of range; re-snapshotting");
            need_snapshot = true;
            continue;
        }
        if is_retryable(&error) {
            if error.is_transient() {
                shared.client.note_unreachable(&error);
            }
            tracing::warn!(%topic, partition, %error, "retrying in {backoff:?}");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(shared.config.retry_backoff_max);
            continue;
        }
        tracing::error!(%topic, partition, %error, "the table stopped following this partition");
        shared.fail(error);
        return;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_validation_should_name_the_key() {
        SyncTableConfig::default().validate().unwrap();
        let bad = |config: SyncTableConfig| match config.validate() {
            Err(Error::InvalidConfig { key, .. }) => key,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            bad(SyncTableConfig {
                changes_max: 0,
                ..Default::default()
            }),
            "changes_max"
        );
        assert_eq!(
            bad(SyncTableConfig {
                keys_max: 0,
                ..Default::default()
            }),
            "keys_max"
        );
        assert_eq!(
            bad(SyncTableConfig {
                retry_backoff: Duration::from_secs(10),
                ..Default::default()
            }),
            "retry_backoff"
        );
        assert_eq!(
            bad(SyncTableConfig {
                retry_backoff_max: Duration::from_secs(3600),
                ..Default::default()
            }),
            "retry_backoff_max"
        );
    }
}
