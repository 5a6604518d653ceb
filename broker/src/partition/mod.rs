//! A partition: one log plus its live state. Produce validation that needs the topic (key ->
//! partition) happens here, so the log stays a pure byte store.
//!
//! ## Snapshots (tables)
//! A snapshot is the latest value of every live key of one partition as of an offset H: the
//! result of applying the log prefix `[start, H)`, deletes left out. It is taken in three steps:
//!
//! 1. [`Partition::begin_snapshot`], under the `live` mutex (the one-writer critical section,
//!    so the key index reflects exactly `[start, applied_offset)` and no append is half done):
//!    H = `applied_offset`, the offsets of every non-tombstone slot of the key index, and a
//!    pin at H ([`Partition::pin`]) taken *before* the lock is released. Copying the offsets
//!    costs 8 bytes per live key and one pass over the index inside the lock; they are sorted
//!    after it is released.
//! 2. The caller waits until the log's durable offset covers H (`Log::wait_durable`, within
//!    one group-commit fsync): readers only ever see durable records, and a snapshot is a read.
//! 3. [`Partition::walk_snapshot`] reads the log below H in offset order and hands over the
//!    record at each collected offset (a two-pointer walk over the sorted offsets and the
//!    batches; a read starts again at the next wanted offset once it is past the current one).
//!
//! Why this is consistent: the index and H are taken in the same critical section, so every
//! collected offset is below H and is the latest record of its key in `[start, H)`, and every
//! key live in that prefix has one. Records at or above H are never read (`read_up_to(.., H)`),
//! so concurrent appends cannot leak in. The pin keeps the compaction cleaner from dropping any
//! record that is the latest of its key below H while the snapshot streams; a record the index
//! names that is missing anyway, or is a delete, is a bug or corruption and ends the walk with
//! [`BrokerError::SnapshotInconsistent`] instead of skipping the key.

use std::ops::ControlFlow;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use syncline_proto::batch::{Batch, BatchBuilder, Record, ATTR_BROKER_RESERVED};
use syncline_proto::partitioner::partition_for_key;

use crate::error::BrokerError;
use crate::log::{
    Appended, CompactOptions, CompactionFilter, CompactionOutcome, Log, LogError, Verdict,
};
use crate::state::{KeyIndex, PartitionState, ProducedBatch, SequenceCheck};

mod replica;
pub use replica::{AppliedReceiver, Replica, Submitted};
use syncline_proto::batch::Batches;
use syncline_proto::v1;

/// In a partition's log directory while it refuses writes for a move's last step (its
/// presence is what counts).
pub const HANDING_OVER_MARKER: &str = "handing-over";

/// Where a partition that has no log on this node is: fenced here, or held by another node.
#[derive(Debug, Clone)]
enum Absent {
    /// Its log refused to open (or its state to rebuild) on this node.
    Fenced(String),
    /// Another node holds it (a cluster places each partition on some nodes only).
    Remote(RemoteLeader),
}

/// The node leading a partition this node does not hold, as the cluster metadata last said.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemoteLeader {
    /// Its node id (None while the partition has no known leader).
    pub id: Option<u64>,
    /// Its advertised `HOST:PORT` (empty when unknown).
    pub address: String,
}

/// A partition: its log, the reason it is fenced, or the node that holds it.
#[derive(Debug)]
pub struct Partition {
    /// The topic name.
    pub topic: Arc<str>,
    /// Partition number.
    pub id: u32,
    /// Partitions in the topic (for the key check).
    pub partitions: u32,
    /// The log; a replicated partition's replica swaps it for another when it installs a
    /// snapshot ([`Partition::replace_log`]), under the `live` lock.
    state: Result<parking_lot::RwLock<Arc<Log>>, Absent>,
    flusher: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Key index and producer state; its lock is the partition's one-writer critical section:
    /// dedupe, CAS check, offset assignment (append) and index update happen under it.
    live: Mutex<PartitionState>,
    /// True for tables (cleanup=compact): keeps a key index.
    pub is_table: bool,
    /// The broker's current producer epochs (fencing before a new epoch writes here).
    epochs: Option<crate::topic::ProducerEpochs>,
    /// Snapshots in progress, by their offset H (count per offset). The cleaner never drops a
    /// record for being superseded by one at or above the oldest pin, so a snapshot streaming
    /// "every key's latest value below H" never loses a record under it.
    pins: Arc<Mutex<std::collections::BTreeMap<u64, usize>>>,
    /// True when the partition is a Raft group over several replicas (replication factor > 1):
    /// writes go through [`Partition::submit_batch`] to the group, reads and table lookups are
    /// served by its leader only.
    replicated: bool,
    /// The replication layer's handle, once its group runs (None: starting or stopped).
    replica: parking_lot::RwLock<Option<Arc<dyn Replica>>>,
    /// A single replica moving to another node in its last step (`cluster::copy`): writes are
    /// refused as NotLeader naming that node. Set and read under the `live` lock, so no write
    /// is half done when it is set.
    handing_over: Mutex<Option<RemoteLeader>>,
}

/// Holds a snapshot's pin until dropped (see `Partition::pin`).
#[derive(Debug)]
pub struct SnapshotPin {
    pins: Arc<Mutex<std::collections::BTreeMap<u64, usize>>>,
    offset: u64,
}

impl Drop for SnapshotPin {
    fn drop(&mut self) {
        let mut pins = self.pins.lock();
        if let Some(count) = pins.get_mut(&self.offset) {
            *count -= 1;
            if *count == 0 {
                pins.remove(&self.offset);
            }
        }
    }
}

/// What a snapshot streams, fixed in the writer's critical section (see the module doc).
/// Dropping it releases the snapshot's pin.
#[derive(Debug)]
pub struct SnapshotPlan {
    /// H: the snapshot is the log prefix below it.
    pub high_watermark: u64,
    /// Offsets of the latest record of every live key below H, ascending.
    pub offsets: Vec<u64>,
    /// Keeps the cleaner from dropping what the snapshot still has to read.
    _pin: SnapshotPin,
}

/// A compare-and-set condition.
#[derive(Debug, Clone)]
pub struct Condition {
    /// The key.
    pub key: Bytes,
    /// `Some(v)`: the latest version must be `v`; `None`: the key must be absent or deleted.
    pub expected: Option<u64>,
}

/// Keys of a batch to index: (key, offset delta, tombstone).
type BatchKeys = Vec<(Bytes, u64, bool)>;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Printable form of a key for messages.
pub fn show_key(key: &[u8]) -> String {
    match std::str::from_utf8(key) {
        Ok(text) => text.chars().take(200).collect(),
        Err(_) => format!(
            "0x{}",
            key.iter()
                .take(100)
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        ),
    }
}

/// One plain record, as the broker receives it from clients without the codec.
#[derive(Debug, Clone)]
pub struct PlainRecord {
    /// Key (None = unkeyed).
    pub key: Option<Bytes>,
    /// Value (None = tombstone).
    pub value: Option<Bytes>,
    /// Headers.
    pub headers: Vec<(String, Bytes)>,
    /// Timestamp in ms; 0 = now.
    pub timestamp_ms: i64,
}

impl Partition {
    /// A partition serving `log`: its live state is restored from the snapshot plus the log
    /// after it, then its group-commit flusher is started.
    pub fn open(
        topic: Arc<str>,
        id: u32,
        partitions: u32,
        log: Log,
        is_table: bool,
        epochs: crate::topic::ProducerEpochs,
    ) -> Partition {
        let log = Arc::new(log);
        let live = match restore_state(&log, is_table) {
            Ok(live) => live,
            Err(reason) => {
                tracing::error!(topic = %topic, partition = id, %reason, "partition fenced: its state cannot be rebuilt from the log");
                return Partition::fenced(topic, id, partitions, reason);
            }
        };
        let flusher = log.spawn_flusher();
        // A move's last step survives a restart: writes stay refused until the cluster says
        // the move was called off (`cluster::copy`).
        let handing_over = log
            .dir()
            .join(HANDING_OVER_MARKER)
            .exists()
            .then(RemoteLeader::default);
        Partition {
            topic,
            id,
            partitions,
            state: Ok(parking_lot::RwLock::new(log)),
            flusher: Mutex::new(Some(flusher)),
            live: Mutex::new(live),
            is_table,
            epochs: Some(epochs),
            pins: Arc::default(),
            replicated: false,
            replica: parking_lot::RwLock::new(None),
            handing_over: Mutex::new(handing_over),
        }
    }

    /// A partition whose log refused to open: every request gets `reason`.
    pub fn fenced(topic: Arc<str>, id: u32, partitions: u32, reason: String) -> Partition {
        Partition {
            topic,
            id,
            partitions,
            state: Err(Absent::Fenced(reason)),
            flusher: Mutex::new(None),
            live: Mutex::new(PartitionState::default()),
            is_table: false,
            epochs: None,
            pins: Arc::default(),
            replicated: false,
            replica: parking_lot::RwLock::new(None),
            handing_over: Mutex::new(None),
        }
    }

    /// A partition another node holds: every call for it answers [`BrokerError::NotLeader`]
    /// naming `leader`.
    pub fn remote(topic: Arc<str>, id: u32, partitions: u32, leader: RemoteLeader) -> Partition {
        let mut partition = Partition::fenced(topic, id, partitions, String::new());
        partition.state = Err(Absent::Remote(leader));
        partition
    }

    /// The log to serve a client from, or why not here: fenced, held by another node, or (for
    /// a replicated partition) led by another replica.
    pub fn log(&self) -> Result<Arc<Log>, BrokerError> {
        let log = self.local_log()?;
        if self.replicated {
            self.check_leader()?;
        }
        Ok(log)
    }

    /// The log on this node whatever its role (the replication layer applies to it).
    pub(crate) fn local_log(&self) -> Result<Arc<Log>, BrokerError> {
        let slot = self.state.as_ref().map_err(|absent| match absent {
            Absent::Fenced(reason) => BrokerError::Fenced {
                topic: self.topic.to_string(),
                partition: self.id,
                reason: reason.clone(),
            },
            Absent::Remote(leader) => BrokerError::NotLeader {
                topic: self.topic.to_string(),
                partition: self.id,
                leader: leader.clone(),
            },
        })?;
        Ok(slot.read().clone())
    }

    /// Why the partition is fenced, if it is.
    pub fn fence_reason(&self) -> Option<&str> {
        match &self.state {
            Err(Absent::Fenced(reason)) => Some(reason),
            _ => None,
        }
    }

    /// The node holding this partition when another node does.
    pub fn remote_leader(&self) -> Option<&RemoteLeader> {
        match &self.state {
            Err(Absent::Remote(leader)) => Some(leader),
            _ => None,
        }
    }

    pub(crate) fn log_error(&self, source: LogError) -> BrokerError {
        BrokerError::Log {
            topic: self.topic.to_string(),
            partition: self.id,
            source,
        }
    }

    /// Checks every record of a verified batch: well formed, and each key in this partition.
    /// The one per-record pass of the produce path (the batch is neither copied nor re-encoded);
    /// for tables it also collects the keys to index.
    pub fn check_records(&self, batch: &Batch) -> Result<BatchKeys, BrokerError> {
        let mut keys = Vec::new();
        let base = batch.header().base_offset;
        for (index, record) in batch.records().enumerate() {
            let record = record.map_err(|e| {
                BrokerError::InvalidRequest(format!("invalid batch: record {index}: {e}"))
            })?;
            if let Some(key) = &record.key {
                let expected = partition_for_key(key, self.partitions);
                // Internal topics place records themselves (`__offsets` by group name, not
                // by record key); clients cannot write to them.
                if expected != self.id && !self.topic.starts_with("__") {
                    return Err(BrokerError::WrongPartitionForKey {
                        topic: self.topic.to_string(),
                        partition: self.id,
                        expected,
                        index,
                    });
                }
                if self.is_table {
                    keys.push((key.clone(), record.offset - base, record.value.is_none()));
                }
            } else if self.is_table {
                return Err(BrokerError::InvalidRequest(format!(
                    "record {index} has no key: every record of a table needs one"
                )));
            }
        }
        Ok(keys)
    }

    /// The one-writer critical section of a single-replica partition.
    fn append_checked(
        &self,
        batch: &Batch,
        keys: BatchKeys,
        conditions: &[Condition],
    ) -> Result<Appended, BrokerError> {
        let log = self.log()?;
        self.write_checked(
            &log,
            batch,
            keys,
            conditions,
            now_ms(),
            true,
            |log, batch| log.append_batch(batch),
        )
    }

    /// Checks what the critical section checks without writing (a replicated partition's
    /// leader refuses what it can before proposing: the apply checks again).
    pub(crate) fn check_conditions(&self, conditions: &[Condition]) -> Result<(), BrokerError> {
        if !conditions.is_empty() && !self.is_table {
            return Err(BrokerError::NotATable {
                topic: self.topic.to_string(),
            });
        }
        for condition in conditions {
            let expected = partition_for_key(&condition.key, self.partitions);
            if expected != self.id {
                return Err(BrokerError::InvalidRequest(format!(
                    "condition key `{}` belongs to partition {expected}, not {}",
                    show_key(&condition.key),
                    self.id
                )));
            }
        }
        Ok(())
    }

    /// The broker's epoch fence for an idempotent producer's batch (a zombie with an older
    /// epoch than the broker handed out is refused).
    pub(crate) fn check_fence(
        &self,
        header: &syncline_proto::batch::BatchHeader,
    ) -> Result<(), BrokerError> {
        if header.producer_id < 0 {
            return Ok(());
        }
        let current = self
            .epochs
            .as_ref()
            .and_then(|e| e.current(header.producer_id));
        if let Some(current) = current.filter(|c| header.producer_epoch < *c) {
            return Err(crate::state::SequenceError::Fenced {
                producer_id: header.producer_id,
                epoch: header.producer_epoch,
                current,
            }
            .into());
        }
        Ok(())
    }

    /// The one-writer critical section: producer dedupe, CAS check, append (by `append`),
    /// index update. `now_ms` decides idle-producer expiry; `fence` applies the broker's
    /// producer-epoch fence (a replica applying a committed entry skips it: the node-local
    /// epochs differ between replicas, and the leader fenced before proposing).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn write_checked(
        &self,
        log: &Log,
        batch: &Batch,
        keys: BatchKeys,
        conditions: &[Condition],
        now_ms: i64,
        fence: bool,
        append: impl FnOnce(&Log, &Batch) -> Result<Appended, LogError>,
    ) -> Result<Appended, BrokerError> {
        self.check_conditions(conditions)?;
        let header = *batch.header();
        let mut live = self.live.lock();
        if let Some(to) = self.handing_over.lock().as_ref() {
            return Err(BrokerError::NotLeader {
                topic: self.topic.to_string(),
                partition: self.id,
                leader: to.clone(),
            });
        }
        let idempotent = header.producer_id >= 0;
        if idempotent {
            if fence {
                self.check_fence(&header)?;
            }
            match live.producers.check(
                header.producer_id,
                header.producer_epoch,
                header.base_sequence,
            )? {
                SequenceCheck::Duplicate(done) => {
                    return Ok(Appended {
                        base_offset: done.base_offset,
                        last_offset: done.last_offset,
                    })
                }
                SequenceCheck::Append => {}
            }
        }
        if !conditions.is_empty() {
            let index = live.index.get_or_insert_with(KeyIndex::default);
            let mut failed = Vec::new();
            let mut current = Vec::new();
            for condition in conditions {
                let slot = index.get(&condition.key).filter(|s| !s.tombstone);
                let ok = match (condition.expected, slot) {
                    (None, None) => true,
                    (Some(version), Some(slot)) => slot.offset == version,
                    _ => false,
                };
                if !ok {
                    failed.push(match slot {
                        Some(slot) => format!(
                            "key `{}`: expected {}, current version is {}",
                            show_key(&condition.key),
                            condition
                                .expected
                                .map_or("absent".to_string(), |v| format!("version {v}")),
                            slot.offset
                        ),
                        None => format!(
                            "key `{}`: expected version {}, but the key is absent",
                            show_key(&condition.key),
                            condition.expected.unwrap_or_default()
                        ),
                    });
                }
                current.push(v1::KeyVersion {
                    key: condition.key.clone(),
                    version: slot.map_or(0, |s| s.offset),
                    absent: slot.is_none(),
                });
            }
            if !failed.is_empty() {
                return Err(BrokerError::CasConflict {
                    message: format!(
                        "compare-and-set failed, nothing was written: {}",
                        failed.join("; ")
                    ),
                    current,
                });
            }
        }
        let appended = append(log, batch).map_err(|e| self.log_error(e))?;
        if idempotent {
            if let Some(epochs) = &self.epochs {
                epochs.observe(header.producer_id, header.producer_epoch);
            }
            live.producers.record(
                header.producer_id,
                header.producer_epoch,
                ProducedBatch {
                    base_sequence: header.base_sequence,
                    records: header.record_count,
                    base_offset: appended.base_offset,
                    last_offset: appended.last_offset,
                },
                now_ms,
            );
        }
        if self.is_table {
            let index = live.index.get_or_insert_with(KeyIndex::default);
            for (key, delta, tombstone) in keys {
                index.set(&key, appended.base_offset + delta, tombstone);
            }
        }
        live.applied_offset = appended.last_offset + 1;
        live.dirty += 1;
        Ok(appended)
    }

    /// The latest version of `key` (tables only), counting deletes.
    pub fn latest(&self, key: &[u8]) -> Result<Option<crate::state::Slot>, BrokerError> {
        self.check_leader()?;
        if !self.is_table {
            return Err(BrokerError::NotATable {
                topic: self.topic.to_string(),
            });
        }
        Ok(self
            .live
            .lock()
            .index
            .as_ref()
            .and_then(|index| index.get(key)))
    }

    /// Pins `offset` (a snapshot's H) until the guard drops: the cleaner keeps every record
    /// that is the latest of its key below the oldest pin.
    pub fn pin(&self, offset: u64) -> SnapshotPin {
        *self.pins.lock().entry(offset).or_insert(0) += 1;
        SnapshotPin {
            pins: self.pins.clone(),
            offset,
        }
    }

    /// Starts a snapshot (tables only): H, the offsets of every live key's latest record below
    /// H, and a pin at H, all taken in the writer's critical section (see the module doc). The
    /// caller must wait until H is durable before streaming anything.
    pub fn begin_snapshot(&self) -> Result<SnapshotPlan, BrokerError> {
        // The fence first: a fenced partition does not know whether it is a table.
        self.log()?;
        if !self.is_table {
            return Err(BrokerError::NotATable {
                topic: self.topic.to_string(),
            });
        }
        let (high_watermark, mut offsets, pin) = {
            let live = self.live.lock();
            let high_watermark = live.applied_offset;
            let offsets: Vec<u64> = live
                .index
                .as_ref()
                .map(|index| index.live_offsets().collect())
                .unwrap_or_default();
            // Pinned before the lock is released: no compaction can start from a state where
            // H is known but not yet protected.
            let pin = self.pin(high_watermark);
            (high_watermark, offsets, pin)
        };
        offsets.sort_unstable();
        debug_assert!(offsets.last().is_none_or(|last| *last < high_watermark));
        Ok(SnapshotPlan {
            high_watermark,
            offsets,
            _pin: pin,
        })
    }

    /// Reads the records of `plan` in ascending offset order (blocking I/O: call from a
    /// blocking thread) and hands each to `emit`, which may stop the walk with `Break`. Reads
    /// never go past the plan's H and take at most about `read_bytes` of batches at a time. A
    /// wanted offset that holds no record, or holds a delete, is
    /// [`BrokerError::SnapshotInconsistent`].
    pub fn walk_snapshot(
        &self,
        plan: &SnapshotPlan,
        read_bytes: usize,
        mut emit: impl FnMut(Record) -> ControlFlow<()>,
    ) -> Result<(), BrokerError> {
        let log = self.log()?;
        let offsets = &plan.offsets;
        let inconsistent = |offset: u64, reason: String| BrokerError::SnapshotInconsistent {
            topic: self.topic.to_string(),
            partition: self.id,
            offset,
            reason,
        };
        let missing = |offset: u64| {
            inconsistent(
                offset,
                format!(
                    "the key index names it as a key's latest value, but the log below {} holds no record there",
                    plan.high_watermark
                ),
            )
        };
        // Index into `offsets` of the next record to hand over.
        let mut position = 0;
        while let Some(&from) = offsets.get(position) {
            let read = log
                .read_up_to(from, read_bytes, plan.high_watermark)
                .map_err(|e| self.log_error(e))?;
            for batch in Batches::new(read.bytes.clone()) {
                let wanted = offsets[position];
                if wanted >= read.next_offset {
                    break;
                }
                let batch = batch.map_err(|e| {
                    inconsistent(wanted, format!("a stored batch cannot be decoded: {e}"))
                })?;
                let batch_end = batch.header().next_offset();
                if batch_end <= wanted {
                    // Wholly before the next wanted record: skipped without decoding records.
                    continue;
                }
                for record in batch.records() {
                    let wanted = offsets[position];
                    let record = record.map_err(|e| {
                        inconsistent(wanted, format!("a stored record cannot be decoded: {e}"))
                    })?;
                    if record.offset < wanted {
                        continue;
                    }
                    if record.offset > wanted {
                        return Err(missing(wanted));
                    }
                    if record.value.is_none() {
                        return Err(inconsistent(
                            wanted,
                            "the key index says the key is live, but the record there is a delete"
                                .into(),
                        ));
                    }
                    if record.key.is_none() {
                        return Err(inconsistent(wanted, "the record there has no key".into()));
                    }
                    position += 1;
                    if emit(record).is_break() || position == offsets.len() {
                        return Ok(());
                    }
                }
                // The batch's offset range covered the wanted offset, but no record had it
                // (compaction removed it).
                if offsets[position] < batch_end {
                    return Err(missing(offsets[position]));
                }
            }
            if offsets.get(position) == Some(&from) {
                // Nothing below H at or after `from` was found (the read came back empty).
                return Err(missing(from));
            }
        }
        Ok(())
    }

    /// The oldest pinned snapshot offset, if any snapshot is in progress.
    pub fn oldest_pin(&self) -> Option<u64> {
        self.pins.lock().keys().next().copied()
    }

    /// Runs one compaction pass (tables only; blocking: call from a blocking thread).
    pub fn compact(&self, options: &CompactOptions) -> Result<CompactionOutcome, BrokerError> {
        if !self.is_table {
            return Err(BrokerError::NotATable {
                topic: self.topic.to_string(),
            });
        }
        let log = self.log()?;
        // Durable only grows and a snapshot that starts later pins an offset at or above the
        // durable offset now, so a limit taken once covers the whole pass.
        let limit = log
            .durable_offset()
            .min(self.oldest_pin().unwrap_or(u64::MAX));
        tracing::debug!(topic = %self.topic, partition = self.id, limit, "compaction pass starts");
        let filter = KeyIndexFilter {
            partition: self,
            limit,
            now_ms: now_ms(),
        };
        log.compact(&filter, options).map_err(|e| self.log_error(e))
    }

    /// Stops (Some: the node taking the partition over) or resumes (None) taking writes, once
    /// no write is under way (see `cluster::copy`); the stop is recorded durably first (a
    /// marker file in the log directory) so that a restart keeps it. True when that changed
    /// anything.
    pub fn set_handing_over(&self, to: Option<RemoteLeader>) -> Result<bool, BrokerError> {
        let log = self.local_log()?;
        let marker = log.dir().join(HANDING_OVER_MARKER);
        let _writer = self.live.lock();
        let mut current = self.handing_over.lock();
        if current.is_some() != to.is_some() {
            let done = if to.is_some() {
                std::fs::write(&marker, b"")
                    .and_then(|()| std::fs::File::open(&marker)?.sync_all())
                    .and_then(|()| crate::log::file::sync_dir(log.dir()))
            } else {
                std::fs::remove_file(&marker).and_then(|()| crate::log::file::sync_dir(log.dir()))
            };
            done.map_err(|e| BrokerError::io("recording a partition hand-over in", &marker, e))?;
        }
        let changed = current.as_ref().map(|l| l.id) != to.as_ref().map(|l| l.id);
        *current = to;
        Ok(changed)
    }

    /// True while writes are refused for a move's last step.
    pub fn is_handing_over(&self) -> bool {
        self.handing_over.lock().is_some()
    }

    /// The highest epoch this partition has seen per producer id.
    pub fn producer_epochs(&self) -> Vec<(i64, i16)> {
        self.live.lock().producers.epochs().collect()
    }

    /// Writes the state snapshot if anything changed since the last one (and forgets idle
    /// producers); gives back the space an idle log reserved ahead of its writes.
    pub fn checkpoint(&self) {
        let Ok(log) = self.local_log() else { return };
        log.release_idle_reservation();
        let mut live = self.live.lock();
        live.producers.expire(now_ms());
        if live.dirty == 0 {
            return;
        }
        // Only durable state is snapshotted: a snapshot must never cover appends a crash can
        // take back (their offsets would be reused by other records).
        if let Err(error) = log.sync() {
            tracing::warn!(topic = %self.topic, partition = self.id, %error, "no state snapshot: the log cannot sync");
            return;
        }
        if let Err(error) = live.save(log.dir()) {
            tracing::warn!(topic = %self.topic, partition = self.id, %error, "could not write the state snapshot");
        }
    }

    /// Validates and appends an encoded batch from a client (with optional CAS conditions).
    /// Attribute bits the broker reserves for its own batches are refused: nothing is appended.
    pub fn append_batch(
        &self,
        bytes: Bytes,
        conditions: &[Condition],
    ) -> Result<Appended, BrokerError> {
        self.log()?;
        let batch = Batch::parse(bytes)
            .map_err(|e| BrokerError::InvalidRequest(format!("invalid batch: {e}")))?;
        let reserved = batch.header().attributes & ATTR_BROKER_RESERVED;
        if reserved != 0 {
            return Err(BrokerError::InvalidRequest(format!(
                "invalid batch: attribute bits {reserved:#06x} (bit 4 = control) are reserved for batches the broker writes itself; clients must leave them 0"
            )));
        }
        let keys = self.check_records(&batch)?;
        self.append_checked(&batch, keys, conditions)
    }

    /// Encodes plain records into one batch (with the producer fields, if any) and appends it.
    pub fn append_records(
        &self,
        records: &[PlainRecord],
        producer: Option<(i64, i16, i32)>,
        conditions: &[Condition],
        now_ms: i64,
    ) -> Result<Appended, BrokerError> {
        self.log()?;
        let batch = encode_records(records, producer, now_ms)?;
        let keys = self.check_records(&batch)?;
        self.append_checked(&batch, keys, conditions)
    }

    /// Flushes, writes the clean-shutdown marker and stops the flusher. False when the log
    /// could not be closed cleanly (logged): its next open recovers it by scanning.
    pub async fn close(&self) -> bool {
        // A replica's group stops first: nothing is applied to the log once it closes.
        self.detach_replica().await;
        self.checkpoint();
        let mut clean = true;
        if let Ok(log) = self.local_log() {
            let topic = self.topic.clone();
            let id = self.id;
            let result = tokio::task::spawn_blocking(move || log.close()).await;
            match result {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    clean = false;
                    tracing::error!(topic = %topic, partition = id, %error, "closing partition log failed")
                }
                Err(error) => {
                    clean = false;
                    tracing::error!(topic = %topic, partition = id, %error, "closing partition log panicked")
                }
            }
        }
        let flusher = self.flusher.lock().take();
        if let Some(flusher) = flusher {
            let _ = flusher.await;
        }
        clean
    }
}

/// Compaction decisions from the key index: a record is superseded when its key's latest
/// version is newer and below `limit` (durable, and below every running snapshot's offset); a
/// delete that is its key's latest version goes once its retention passed. Keys the index
/// does not know are kept (keeping is always safe).
struct KeyIndexFilter<'a> {
    partition: &'a Partition,
    limit: u64,
    /// When the pass started (decides which producers' batches are still pinned).
    now_ms: i64,
}

impl CompactionFilter for KeyIndexFilter<'_> {
    fn decide(
        &self,
        batch: &Batch,
        tombstones_expired: bool,
        out: &mut Vec<Verdict>,
    ) -> Result<(), String> {
        let mut records = Vec::with_capacity(batch.header().record_count as usize);
        for record in batch.records() {
            let record = record.map_err(|e| format!("stored record: {e}"))?;
            records.push((record.key, record.offset, record.value.is_none()));
        }
        let live = self.partition.live.lock();
        let Some(index) = live.index.as_ref() else {
            out.extend(records.iter().map(|_| Verdict::Keep));
            return Ok(());
        };
        for (key, offset, tombstone) in records {
            let slot = key.as_deref().and_then(|key| index.get(key));
            out.push(match slot {
                Some(slot) if slot.offset > offset && slot.offset < self.limit => {
                    Verdict::Superseded
                }
                Some(slot)
                    if slot.offset == offset
                        && tombstone
                        && tombstones_expired
                        && offset < self.limit =>
                {
                    Verdict::ExpiredTombstone
                }
                _ => Verdict::Keep,
            });
        }
        Ok(())
    }

    fn limit(&self) -> u64 {
        self.limit
    }

    fn keep_whole(&self, header: &syncline_proto::batch::BatchHeader) -> bool {
        header.producer_id >= 0
            && self.partition.live.lock().producers.is_recent_batch(
                header.producer_id,
                header.base_offset,
                self.now_ms,
            )
    }

    fn tombstones_removed(&self, removed: &[(Bytes, u64)]) {
        let mut live = self.partition.live.lock();
        let mut changed = 0;
        if let Some(index) = live.index.as_mut() {
            for (key, offset) in removed {
                changed += u64::from(index.remove_if(key, *offset));
            }
        }
        live.dirty += changed;
    }
}

/// Encodes plain records into one batch (with the producer fields, if any); a record without a
/// timestamp takes `now_ms`.
pub(crate) fn encode_records(
    records: &[PlainRecord],
    producer: Option<(i64, i16, i32)>,
    now_ms: i64,
) -> Result<Batch, BrokerError> {
    let mut builder = BatchBuilder::with_capacity(
        records
            .iter()
            .map(|r| {
                r.key.as_ref().map_or(0, |k| k.len()) + r.value.as_ref().map_or(0, |v| v.len()) + 32
            })
            .sum::<usize>()
            + 64,
    );
    if let Some((id, epoch, sequence)) = producer {
        builder = builder.producer(id, epoch, sequence);
    }
    for record in records {
        let headers: Vec<(&str, &[u8])> = record
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_ref()))
            .collect();
        let timestamp = if record.timestamp_ms == 0 {
            now_ms
        } else {
            record.timestamp_ms
        };
        builder.push(
            timestamp,
            record.key.as_deref(),
            record.value.as_deref(),
            &headers,
        );
    }
    let bytes = builder
        .finish()
        .map_err(|e| BrokerError::InvalidRequest(format!("cannot encode records: {e}")))?;
    Batch::parse(bytes)
        .map_err(|e| BrokerError::InvalidRequest(format!("cannot encode records: {e}")))
}

/// Rebuilds the live state: the snapshot if it is usable, then every batch after it.
fn restore_state(log: &Log, is_table: bool) -> Result<PartitionState, String> {
    let end = log.end_offset();
    let mut state = match PartitionState::load(log.dir()) {
        // A snapshot below the compaction horizon may name a key as live whose delete, at or
        // after the snapshot's offset, compaction has since removed (with the older values):
        // the replay would never see the delete and the key would come back. Rebuild instead.
        Some(state)
            if state.applied_offset <= end
                && state.applied_offset >= log.start_offset()
                && state.applied_offset >= log.compaction_horizon() =>
        {
            state
        }
        Some(_) => {
            // Delete it, so that a later crash cannot bring this stale snapshot back once the
            // log has grown past its offset again.
            tracing::warn!(dir = %log.dir().display(), "state snapshot does not match the log; rebuilding from the log");
            PartitionState::discard(log.dir())
                .map_err(|e| format!("cannot remove the stale state snapshot: {e}"))?;
            PartitionState::default()
        }
        None => PartitionState::default(),
    };
    if state.applied_offset < log.start_offset() {
        state.applied_offset = log.start_offset();
    }
    if is_table && state.index.is_none() {
        state.index = Some(KeyIndex::default());
        state.applied_offset = log.start_offset();
    }
    let mut offset = state.applied_offset;
    let started = std::time::Instant::now();
    let mut replayed = 0u64;
    while offset < end {
        let read = match log.read_up_to(offset, 4 * 1024 * 1024, end) {
            Ok(read) if !read.bytes.is_empty() => read,
            Ok(_) => break,
            Err(error) => return Err(format!("replaying the log at offset {offset}: {error}")),
        };
        for batch in Batches::new(read.bytes.clone()) {
            let batch = batch.map_err(|e| format!("replaying the log at offset {offset}: {e}"))?;
            let header = *batch.header();
            if header.next_offset() <= offset {
                continue;
            }
            if header.producer_id >= 0 {
                state.producers.record(
                    header.producer_id,
                    header.producer_epoch,
                    ProducedBatch {
                        base_sequence: header.base_sequence,
                        records: header.record_count,
                        base_offset: header.base_offset,
                        last_offset: header.last_offset(),
                    },
                    now_ms(),
                );
            }
            if let Some(index) = state.index.as_mut() {
                for record in batch.records() {
                    let record =
                        record.map_err(|e| format!("replaying the log at offset {offset}: {e}"))?;
                    if let Some(key) = &record.key {
                        index.set(key, record.offset, record.value.is_none());
                    }
                }
            }
            replayed += 1;
        }
        offset = read.next_offset;
    }
    if offset < end {
        return Err(format!(
            "replay stopped at offset {offset}, before the log end {end}"
        ));
    }
    state.applied_offset = end;
    if replayed > 0 {
        state.dirty = replayed;
        tracing::info!(dir = %log.dir().display(), batches = replayed, keys = state.index.as_ref().map_or(0, |i| i.len()), elapsed_ms = started.elapsed().as_millis() as u64, "rebuilt partition state from the log");
    }
    Ok(state)
}

#[cfg(test)]
mod tests;
