//! Key compaction: the cleaner rewrites sealed segments keeping only what a table needs.
//!
//! ## What a pass keeps
//! The log does not know keys' latest versions; a [`CompactionFilter`] (the partition, with its
//! key index) decides every record: [`Verdict::Keep`], [`Verdict::Superseded`] (a newer record
//! of the key is durable and below every running snapshot's offset) or
//! [`Verdict::ExpiredTombstone`] (the key's latest record is a delete whose segment was last
//! written more than `delete_retention_ms` ago). On top of the filter:
//! - a batch the filter wants whole (an idempotent producer's recent batch, whose header the
//!   producer state needs after a restart) is copied as it is; the records it keeps only for
//!   that are counted (`records_kept_for_producers`), so a pass that reclaims little says why;
//! - the first batch of every output segment keeps at least one record (its last), so that an
//!   output segment always starts at its input's base offset and never is empty;
//! - an expired tombstone is dropped only if no older record of its key survives this pass
//!   (one kept in a whole batch or as such a placeholder): otherwise a restart that rebuilds
//!   the key index from the log would bring the deleted value back. Every older record of the
//!   key lies before the tombstone, so a pass sees them first.
//!
//! ## Offsets never change
//! Kept batches keep their base offset; a batch that lost records is re-encoded with the kept
//! records at their original offset deltas and its original `last_offset_delta` (the only
//! place the broker encodes batches, with a CRC it computes). Batches dropped entirely leave a
//! gap that the previous output batch absorbs by widening its `last_offset_delta` (a header
//! change and a new CRC), so the log's contiguity invariant — batch k+1 starts where batch k
//! ends, and each segment where the previous one ends — holds after compaction exactly as
//! before. Record offsets (versions) are never rewritten.
//!
//! ## Segments and the swap
//! Consecutive sealed segments are grouped (at most `segment_bytes_max` of input, offset span
//! within a segment's u32 relative range) and each group becomes one output segment of the
//! next generation. Every input batch is CRC-checked before use: a corrupt batch stops the pass
//! (a CRC the cleaner computes must never launder bad bytes). The swap is crash-safe through
//! the manifest (`manifest.rs`): outputs written and fsync'd, directory fsync'd, manifest
//! committed, in-memory list swapped (readers keep the old mappings alive through their
//! `Arc<Segment>`/`Bytes` until they finish), old files deleted. The output file keeps the
//! newest modification time of its inputs, so tombstone expiry does not restart on every pass.
//!
//! ## Throttle
//! A [`Throttle`] (token bucket, bytes of input per second, shared by every partition's pass)
//! bounds the cleaner's I/O so it does not starve produce; a pass runs on a blocking thread.

use std::collections::{HashMap, HashSet};
use std::io::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use syncline_proto::batch::{self, Batch, BatchBuilder, BatchHeader, Batches};

use super::error::LogError;
use super::file;
use super::index::{OffsetIndex, TimeIndex};
use super::manifest::Manifest;
use super::segment::{self, IndexCursor, Indexes, Segment, SegmentName, SegmentParts};
use super::Log;

/// What the filter says about one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Still needed.
    Keep,
    /// A newer record of the same key is durable and no running snapshot needs this one.
    Superseded,
    /// The key's latest record, a delete past its retention.
    ExpiredTombstone,
}

/// Decides which records a compaction pass keeps (the partition implements it with its key
/// index and producer state).
pub trait CompactionFilter {
    /// One verdict per record of `batch` (CRC-checked, in log order) pushed to `out`.
    /// `tombstones_expired`: the batch's segment was last written at least the delete
    /// retention ago.
    fn decide(
        &self,
        batch: &Batch,
        tombstones_expired: bool,
        out: &mut Vec<Verdict>,
    ) -> Result<(), String>;

    /// Keep this batch exactly as it is (e.g. an idempotent producer's recent batch).
    fn keep_whole(&self, header: &BatchHeader) -> bool;

    /// Records at or above this offset never make an older record of their key droppable
    /// (they are not durable yet, or a running snapshot needs what they replace).
    fn limit(&self) -> u64;

    /// After a pass committed: these tombstones (key, offset), each its key's latest record,
    /// are gone from the log.
    fn tombstones_removed(&self, removed: &[(Bytes, u64)]);
}

/// A step of the swap after which a test can stop the pass as if the process died there.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompactStep {
    /// New segment files written and synced; manifest not written.
    OutputsWritten,
    /// Manifest committed; old files still on disk, memory not swapped.
    ManifestCommitted,
    /// Memory swapped; old files not deleted yet.
    Swapped,
}

/// Settings of one pass.
#[derive(Debug, Clone, Default)]
pub struct CompactOptions {
    /// How long a delete stays after compaction could drop it.
    pub delete_retention_ms: u64,
    /// Seal the active segment first (when it holds data), so everything can be compacted.
    pub roll: bool,
    /// Shared I/O budget.
    pub throttle: Option<Arc<Throttle>>,
    /// Set to stop the pass early (broker shutdown); nothing is committed then.
    pub cancel: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// Tests: stop after this step, leaving the files as a crash there would.
    #[doc(hidden)]
    pub stop_after: Option<CompactStep>,
    /// Tests: the directory fsync after the manifest's rename fails.
    #[doc(hidden)]
    pub fail_manifest_dir_sync: bool,
}

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompactionOutcome {
    /// Bytes of the segments the pass rewrote.
    pub bytes_before: u64,
    /// Bytes of their replacements.
    pub bytes_after: u64,
    /// Records removed (superseded records and expired tombstones).
    pub records_removed: u64,
    /// Expired tombstones removed.
    pub tombstones_removed: u64,
    /// Segments rewritten.
    pub segments_before: usize,
    /// Segments written.
    pub segments_after: usize,
    /// Superseded records and expired deletes kept only because their batch is a recent batch
    /// of an idempotent producer (kept whole for its retries).
    pub records_kept_for_producers: u64,
    /// Batches kept whole for that reason.
    pub batches_kept_for_producers: u64,
}

/// Compaction progress of a log, for describe and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CompactionInfo {
    /// Share of the sealed segments' bytes written since the last pass (what a pass would
    /// newly look at).
    pub dirty_ratio: f64,
    /// When the last pass committed (ms since the epoch; 0 = never).
    pub last_run_ms: i64,
    /// Bytes removed by every pass so far.
    pub bytes_reclaimed: u64,
    /// Deletes below this offset may have been removed (0 = none).
    pub horizon: u64,
    /// The last pass since the log opened: records it kept only for idempotent producers.
    pub records_kept_for_producers: u64,
}

/// Token bucket over bytes per second, shared by all passes. Blocking (passes run on blocking
/// threads).
#[derive(Debug)]
pub struct Throttle {
    bytes_per_sec: f64,
    /// Bucket size: a tenth of a second of budget (at least 1 MiB), so a pass cannot start
    /// with a long burst.
    burst: f64,
    state: Mutex<(Instant, f64)>,
}

impl Throttle {
    /// At most `bytes_per_sec` on average, with bursts of a tenth of a second's budget.
    pub fn new(bytes_per_sec: u64) -> Self {
        let bytes_per_sec = bytes_per_sec.max(1) as f64;
        let burst = (bytes_per_sec / 10.0).max(1024.0 * 1024.0);
        Self {
            bytes_per_sec,
            burst,
            state: Mutex::new((Instant::now(), burst)),
        }
    }

    /// Takes `bytes` from the bucket, sleeping until they are available.
    pub fn acquire(&self, bytes: u64) {
        let wait = {
            let mut state = self.state.lock();
            let now = Instant::now();
            let refill = now.duration_since(state.0).as_secs_f64() * self.bytes_per_sec;
            state.0 = now;
            state.1 = (state.1 + refill).min(self.burst) - bytes as f64;
            if state.1 >= 0.0 {
                return;
            }
            Duration::from_secs_f64(-state.1 / self.bytes_per_sec)
        };
        std::thread::sleep(wait);
    }
}

/// A batch written (or about to be) to an output segment.
struct Pending {
    bytes: Vec<u8>,
    header: BatchHeader,
}

/// State a pass carries across groups.
#[derive(Default)]
struct Pass {
    /// Hashes of keys with a superseded record this pass keeps: their tombstones stay.
    kept_superseded: HashSet<u64>,
    /// Expired tombstones dropped (key, offset).
    dropped_tombstones: Vec<(Bytes, u64)>,
    records_removed: u64,
    /// Records kept only because their batch was kept whole for its producer.
    records_kept_for_producers: u64,
    /// Batches kept whole for their producer that held such records.
    batches_kept_for_producers: u64,
    /// Earliest time a kept, latest tombstone expires.
    next_tombstone_expiry_ms: Option<i64>,
}

/// The latest version of each key among the records being compacted that are below the
/// filter's limit: a record with a later version here is superseded by a durable record even
/// when the key's overall latest version (the filter's view) is not durable yet — without it a
/// key written faster than the group commit could never be compacted. Keyed like the key index
/// (64-bit hash + an independent 32-bit fingerprint; a hash match with another fingerprint
/// counts as "unknown", which keeps the record). Bounded: past `LATER_VERSIONS_MAX` keys new
/// keys are not added (their records fall back to the filter's view).
#[derive(Default)]
struct LaterVersions {
    latest: HashMap<u64, (u32, u64)>,
    full: bool,
}

/// What every group of a pass reads.
#[derive(Clone, Copy)]
struct PassInputs<'a> {
    filter: &'a dyn CompactionFilter,
    later: &'a LaterVersions,
    options: &'a CompactOptions,
    now: i64,
}

/// Keys tracked by one pass's [`LaterVersions`] (~30 bytes each: at most ~60 MiB).
const LATER_VERSIONS_MAX: usize = 2_000_000;

fn key_hashes(key: &[u8]) -> (u64, u32) {
    (
        xxhash_rust::xxh3::xxh3_64(key),
        xxhash_rust::xxh3::xxh3_64_with_seed(key, 0x5EED_CAFE) as u32,
    )
}

impl LaterVersions {
    fn observe(&mut self, key: &[u8], offset: u64) {
        let (hash, fingerprint) = key_hashes(key);
        let room = self.latest.len() < LATER_VERSIONS_MAX;
        match self.latest.get_mut(&hash) {
            Some(entry) if entry.0 == fingerprint => entry.1 = entry.1.max(offset),
            Some(_) => {}
            None if room => {
                self.latest.insert(hash, (fingerprint, offset));
            }
            None => self.full = true,
        }
    }

    /// Whether a later version of `key` than `offset` was seen.
    fn supersedes(&self, key: &[u8], offset: u64) -> bool {
        let (hash, fingerprint) = key_hashes(key);
        self.latest
            .get(&hash)
            .is_some_and(|(f, latest)| *f == fingerprint && *latest > offset)
    }
}

fn key_hash(key: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(key)
}

/// Modification time of a file in ms since the epoch.
fn modified_ms(path: &std::path::Path) -> Option<i64> {
    let modified = std::fs::metadata(path).ok()?.modified().ok()?;
    let since = modified.duration_since(std::time::UNIX_EPOCH).ok()?;
    i64::try_from(since.as_millis()).ok()
}

/// Encodes the kept records of `batch` (offset deltas, last offset delta and leader epoch
/// unchanged, producer fields dropped: a batch that lost records no longer describes a producer's sequence range).
fn reencode(batch: &Batch, keep: &[bool]) -> Result<Vec<u8>, String> {
    let header = batch.header();
    let mut builder = BatchBuilder::with_capacity(batch.as_bytes().len())
        .last_offset_delta(header.last_offset_delta);
    if header.is_control() {
        builder = builder.control();
    }
    for (record, keep) in batch.records().zip(keep) {
        let record = record.map_err(|e| e.to_string())?;
        if !keep {
            continue;
        }
        let headers: Vec<(&str, &[u8])> = record
            .headers
            .iter()
            .map(|h| (h.key.as_str(), h.value.as_ref()))
            .collect();
        let delta = (record.offset - header.base_offset) as u32;
        builder
            .push_at(
                delta,
                record.timestamp,
                record.key.as_deref(),
                record.value.as_deref(),
                &headers,
            )
            .map_err(|e| e.to_string())?;
    }
    let bytes = builder.finish().map_err(|e| e.to_string())?;
    let mut bytes = bytes.to_vec();
    // The stamped prefix (base offset, length, leader epoch) is outside the CRC: the re-encoded
    // batch keeps the epoch it was appended in, so epochs still never go down along the log.
    let length = u32::try_from(bytes.len()).map_err(|e| e.to_string())?;
    let prefix = batch::stamped_prefix(header.base_offset, length, header.leader_epoch);
    bytes[..batch::STAMPED_PREFIX_LEN].copy_from_slice(&prefix);
    Ok(bytes)
}

/// Widens `pending` so that it ends just before `next_base` (covering dropped batches).
fn widen(pending: &mut Pending, next_base: u64) {
    let delta = (next_base - 1 - pending.header.base_offset) as u32;
    if delta == pending.header.last_offset_delta {
        return;
    }
    pending.header.last_offset_delta = delta;
    let mut header = [0u8; batch::HEADER_LEN];
    pending.header.encode(&mut header);
    pending.bytes[..batch::HEADER_LEN].copy_from_slice(&header);
    let crc = batch::compute_crc(&pending.bytes);
    pending.header.crc = crc;
    pending.header.encode(&mut header);
    pending.bytes[..batch::HEADER_LEN].copy_from_slice(&header);
}

impl Log {
    /// Compaction progress.
    pub fn compaction_info(&self) -> CompactionInfo {
        let manifest = self.manifest.lock().clone();
        let segments = self.segments.read().clone();
        let sealed = &segments[..segments.len().saturating_sub(1)];
        let total: u64 = sealed.iter().map(|s| s.len()).sum();
        let dirty: u64 = sealed
            .iter()
            .filter(|s| s.base_offset >= manifest.clean_end)
            .map(|s| s.len())
            .sum();
        CompactionInfo {
            dirty_ratio: if total == 0 {
                0.0
            } else {
                dirty as f64 / total as f64
            },
            last_run_ms: manifest.last_run_ms,
            bytes_reclaimed: manifest.bytes_reclaimed,
            horizon: manifest.horizon,
            records_kept_for_producers: self.kept_for_producers.load(Ordering::Acquire),
        }
    }

    /// Deletes below this offset may have been removed by compaction (0 = none): a reader that
    /// was following from below it may have missed one.
    pub fn compaction_horizon(&self) -> u64 {
        self.horizon.load(Ordering::Acquire)
    }

    /// Whether a background pass is worth running: enough dirty sealed bytes, or a kept
    /// tombstone whose retention has passed.
    pub fn compaction_due(&self, min_dirty_ratio: f64) -> bool {
        let info = self.compaction_info();
        let now = self.options.clock.now_ms();
        let tombstone_due = self.tombstone_expiry_ms.load(Ordering::Acquire) <= now;
        (info.dirty_ratio > 0.0 && info.dirty_ratio >= min_dirty_ratio) || tombstone_due
    }

    /// Seals the active segment if it holds any batch, so a pass can compact everything.
    pub fn roll_now(&self) -> Result<(), LogError> {
        let mut writer = self.writer.lock();
        self.check_writable()?;
        if writer.position > 0 {
            self.roll(&mut writer)?;
        }
        Ok(())
    }

    /// Runs one compaction pass over the sealed segments (blocking: call it from a blocking
    /// thread). One pass at a time per log; appends and reads go on meanwhile.
    pub fn compact(
        &self,
        filter: &dyn CompactionFilter,
        options: &CompactOptions,
    ) -> Result<CompactionOutcome, LogError> {
        let _one_pass = self.compact_lock.lock();
        self.check_writable()?;
        self.mark_served();
        if options.roll {
            self.roll_now()?;
        }
        let segments = self.segments.read().clone();
        let sealed: Vec<Arc<Segment>> = segments[..segments.len().saturating_sub(1)].to_vec();
        if sealed.is_empty() {
            return Ok(CompactionOutcome::default());
        }
        let generation = self.manifest.lock().generation + 1;
        let now = self.options.clock.now_ms();
        let started = Instant::now();
        let mut pass = Pass::default();
        let later = self.later_versions(&sealed, filter.limit(), options)?;
        let inputs = PassInputs {
            filter,
            later: &later,
            options,
            now,
        };
        let mut outputs: Vec<Arc<Segment>> = Vec::new();
        let groups = self.group(&sealed);
        let mut written: Vec<SegmentName> = Vec::new();
        let result = (|| -> Result<(), LogError> {
            for group in &groups {
                let name = SegmentName::new(group[0].base_offset, generation);
                written.push(name);
                outputs.push(self.clean_group(group, name, &inputs, &mut pass)?);
            }
            file::sync_dir(&self.dir).map_err(|e| LogError::io("syncing", &self.dir, e))?;
            Ok(())
        })();
        let discard = |written: &[SegmentName]| {
            for name in written {
                let _ = super::remove_segment_files(&self.dir, *name);
            }
            let _ = file::sync_dir(&self.dir);
        };
        if let Err(error) = result {
            discard(&written);
            return Err(error);
        }
        if options.stop_after == Some(CompactStep::OutputsWritten) {
            return Err(self.stopped(CompactStep::OutputsWritten));
        }
        let bytes_before: u64 = sealed.iter().map(|s| s.len()).sum();
        let bytes_after: u64 = outputs.iter().map(|s| s.len()).sum();
        let clean_end = sealed.last().map_or(0, |s| s.next_offset());
        let new_horizon = pass
            .dropped_tombstones
            .iter()
            .map(|(_, offset)| offset + 1)
            .max()
            .unwrap_or(0);

        // Commit under the writer lock: no roll or retention pass changes the list meanwhile.
        let writer = self.writer.lock();
        if let Err(error) = self.check_writable() {
            drop(writer);
            discard(&written);
            return Err(error);
        }
        let current = self.segments.read().clone();
        let Some(first) = current.iter().position(|s| Arc::ptr_eq(s, &sealed[0])) else {
            drop(writer);
            discard(&written);
            return Err(self.compaction_error("retention removed segments during the pass"));
        };
        let still_there = current.len() > first + sealed.len()
            && current[first..first + sealed.len()]
                .iter()
                .zip(&sealed)
                .all(|(a, b)| Arc::ptr_eq(a, b));
        if !still_there {
            drop(writer);
            discard(&written);
            return Err(self.compaction_error("the segment list changed during the pass"));
        }
        let mut list: Vec<Arc<Segment>> = Vec::with_capacity(current.len());
        list.extend(current[..first].iter().cloned());
        list.extend(outputs.iter().cloned());
        list.extend(current[first + sealed.len()..].iter().cloned());
        let previous = self.manifest.lock().clone();
        let manifest = Manifest {
            generation,
            clean_end,
            horizon: previous.horizon.max(new_horizon),
            bytes_reclaimed: previous.bytes_reclaimed + bytes_before.saturating_sub(bytes_after),
            last_run_ms: now,
            tombstone_due_ms: pass.next_tombstone_expiry_ms.unwrap_or(i64::MAX),
            segments: list
                .iter()
                .filter(|s| s.base_offset < clean_end)
                .map(|s| s.name())
                .collect(),
        };
        let committed = if options.fail_manifest_dir_sync {
            file::replace_file(
                &self.dir.join(super::manifest::MANIFEST_FILE),
                &manifest.encode(),
            )
            .and(Err(std::io::Error::other(
                "injected directory fsync failure",
            )))
        } else {
            manifest.write(&self.dir)
        };
        if let Err(error) = committed {
            // The rename may already have happened (only the directory fsync failed), so the
            // manifest on disk may list the outputs: they must stay, or the next open would
            // remove the inputs as replaced and find the listed outputs missing. If it did not
            // happen, they are an uncommitted generation the next open removes. Memory and disk
            // may now disagree: poisoned until restart, which resolves it from the disk.
            drop(writer);
            return Err(self.poison("writing the segment manifest", &error));
        }
        if options.stop_after == Some(CompactStep::ManifestCommitted) {
            return Err(self.stopped(CompactStep::ManifestCommitted));
        }
        // The horizon goes up before readers can find the new segments: a fetch loads it after
        // its read, so one that read a segment without a dropped delete also sees a horizon
        // past it (the other order let a follower step over the missing delete unwarned).
        self.horizon.store(manifest.horizon, Ordering::Release);
        *self.segments.write() = Arc::new(list);
        *self.manifest.lock() = manifest;
        self.tombstone_expiry_ms.store(
            pass.next_tombstone_expiry_ms.unwrap_or(i64::MAX),
            Ordering::Release,
        );
        drop(writer);
        if options.stop_after == Some(CompactStep::Swapped) {
            return Err(self.stopped(CompactStep::Swapped));
        }
        for segment in &sealed {
            if outputs.iter().any(|kept| Arc::ptr_eq(kept, segment)) {
                continue; // unchanged: still in the list
            }
            if written.contains(&segment.name()) {
                continue;
            }
            super::remove_segment_files(&self.dir, segment.name())?;
        }
        file::sync_dir(&self.dir).map_err(|e| LogError::io("syncing", &self.dir, e))?;
        filter.tombstones_removed(&pass.dropped_tombstones);
        let outcome = CompactionOutcome {
            bytes_before,
            bytes_after,
            records_removed: pass.records_removed,
            tombstones_removed: pass.dropped_tombstones.len() as u64,
            segments_before: sealed.len(),
            segments_after: outputs.len(),
            records_kept_for_producers: pass.records_kept_for_producers,
            batches_kept_for_producers: pass.batches_kept_for_producers,
        };
        self.kept_for_producers
            .store(pass.records_kept_for_producers, Ordering::Release);
        metrics::counter!(crate::metrics::COMPACTION_RUNS_TOTAL).increment(1);
        metrics::counter!(crate::metrics::COMPACTION_BYTES_READ_TOTAL).increment(bytes_before);
        metrics::counter!(crate::metrics::COMPACTION_BYTES_RECLAIMED_TOTAL)
            .increment(bytes_before.saturating_sub(bytes_after));
        tracing::info!(
            dir = %self.dir.display(),
            bytes_before,
            bytes_after,
            records_removed = outcome.records_removed,
            tombstones_removed = outcome.tombstones_removed,
            segments_before = outcome.segments_before,
            segments_after = outcome.segments_after,
            records_kept_for_producers = outcome.records_kept_for_producers,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "compacted"
        );
        Ok(outcome)
    }

    /// Reads the sealed segments once (framing only; the rewrite checks every CRC before it
    /// commits) for the latest version of each key below `limit`.
    fn later_versions(
        &self,
        sealed: &[Arc<Segment>],
        limit: u64,
        options: &CompactOptions,
    ) -> Result<LaterVersions, LogError> {
        let mut later = LaterVersions::default();
        for segment in sealed {
            if segment.base_offset >= limit {
                break;
            }
            for batch in Batches::new(segment.data()) {
                let batch = batch.map_err(|e| LogError::Corrupt {
                    file: segment.path.clone(),
                    position: 0,
                    offset: segment.base_offset,
                    reason: format!("compaction found a bad batch: {e}"),
                })?;
                if let Some(throttle) = &options.throttle {
                    throttle.acquire(batch.as_bytes().len() as u64);
                }
                if batch.header().base_offset >= limit {
                    break;
                }
                for record in batch.records() {
                    let record = record.map_err(|e| self.compaction_error(&e.to_string()))?;
                    if let (Some(key), true) = (record.key.as_deref(), record.offset < limit) {
                        later.observe(key, record.offset);
                    }
                }
            }
            if options
                .cancel
                .as_ref()
                .is_some_and(|c| c.load(Ordering::Acquire))
            {
                return Err(self.compaction_error("cancelled (shutting down)"));
            }
        }
        if later.full {
            tracing::warn!(dir = %self.dir.display(), keys = LATER_VERSIONS_MAX, "compaction tracks the latest versions of its first keys only; later keys rely on the key index");
        }
        Ok(later)
    }

    fn stopped(&self, step: CompactStep) -> LogError {
        self.compaction_error(&format!("stopped after {step:?} (test hook)"))
    }

    fn compaction_error(&self, reason: &str) -> LogError {
        LogError::Compaction {
            dir: self.dir.clone(),
            reason: reason.to_string(),
        }
    }

    /// Consecutive segments whose inputs fit one output segment.
    fn group(&self, sealed: &[Arc<Segment>]) -> Vec<Vec<Arc<Segment>>> {
        let mut groups: Vec<Vec<Arc<Segment>>> = Vec::new();
        let mut size = 0u64;
        for segment in sealed {
            let fits = groups.last().is_some_and(|group| {
                size + segment.len() <= self.config.segment_bytes_max
                    && segment.next_offset() - group[0].base_offset <= u64::from(u32::MAX)
            });
            if fits {
                size += segment.len();
                if let Some(group) = groups.last_mut() {
                    group.push(segment.clone());
                }
            } else {
                size = segment.len();
                groups.push(vec![segment.clone()]);
            }
        }
        groups
    }

    /// Writes the compacted copy of `group` as segment `name` and returns it, mapped; returns
    /// the input itself when it is a single segment with nothing to remove.
    fn clean_group(
        &self,
        group: &[Arc<Segment>],
        name: SegmentName,
        inputs: &PassInputs<'_>,
        pass: &mut Pass,
    ) -> Result<Arc<Segment>, LogError> {
        let PassInputs {
            filter,
            later,
            options,
            now,
        } = *inputs;
        let path = name.log(&self.dir);
        let out_file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| LogError::io("creating compacted segment", &path, e))?;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, &out_file);
        let removed_before = pass.records_removed;
        let group_base = group[0].base_offset;
        let group_end = group.last().map_or(group_base, |s| s.next_offset());
        let mut position = 0u64;
        let mut cursor = IndexCursor::default();
        let mut offset_entries = Vec::new();
        let mut time_entries = Vec::new();
        let mut pending: Option<Pending> = None;
        let mut newest_input_ms: Option<i64> = None;
        let mut verdicts = Vec::new();
        let mut keep = Vec::new();
        let write_err = |e| LogError::io("writing compacted segment", &path, e);
        let mut emit = |pending: Pending,
                        out: &mut std::io::BufWriter<&std::fs::File>,
                        position: &mut u64|
         -> Result<(), LogError> {
            out.write_all(&pending.bytes).map_err(write_err)?;
            let relative = (pending.header.base_offset - group_base) as u32;
            let (o, t) = cursor.observe(
                relative,
                *position,
                pending.header.max_timestamp,
                self.config.index_interval_bytes,
            );
            offset_entries.extend(o);
            time_entries.extend(t);
            *position += pending.bytes.len() as u64;
            Ok(())
        };
        for (segment_index, segment) in group.iter().enumerate() {
            let modified = modified_ms(&segment.path);
            if let Some(ms) = modified {
                newest_input_ms = Some(newest_input_ms.map_or(ms, |n: i64| n.max(ms)));
            }
            let retention = i64::try_from(options.delete_retention_ms).unwrap_or(i64::MAX);
            let expires_ms = modified.map_or(i64::MAX, |m| m.saturating_add(retention));
            let expired = expires_ms <= now;
            let data = segment.data();
            let mut batches = Batches::new(data.clone());
            let mut first_batch = segment_index == 0;
            loop {
                let at = batches.position();
                let Some(batch) = batches.next() else { break };
                let corrupt = |reason: String| LogError::Corrupt {
                    file: segment.path.clone(),
                    position: at as u64,
                    offset: segment.base_offset,
                    reason: format!("compaction found a bad batch: {reason}"),
                };
                // `Batches` checks framing and the CRC of every batch it yields.
                let batch = batch.map_err(|e| corrupt(e.to_string()))?;
                if let Some(throttle) = &options.throttle {
                    throttle.acquire(batch.as_bytes().len() as u64);
                }
                if options
                    .cancel
                    .as_ref()
                    .is_some_and(|c| c.load(Ordering::Acquire))
                {
                    return Err(self.compaction_error("cancelled (shutting down)"));
                }
                let header = *batch.header();
                verdicts.clear();
                filter
                    .decide(&batch, expired, &mut verdicts)
                    .map_err(|reason| self.compaction_error(&reason))?;
                if verdicts.len() != header.record_count as usize {
                    return Err(self.compaction_error("the filter gave a wrong number of verdicts"));
                }
                let whole = filter.keep_whole(&header);
                keep.clear();
                let mut records = Vec::with_capacity(verdicts.len());
                let mut has_tombstone = false;
                for (record, verdict) in batch.records().zip(&verdicts) {
                    let record = record.map_err(|e| corrupt(e.to_string()))?;
                    let hash = record.key.as_deref().map(key_hash);
                    let verdict = match (verdict, record.key.as_deref()) {
                        (Verdict::Keep, Some(key)) if later.supersedes(key, record.offset) => {
                            &Verdict::Superseded
                        }
                        _ => verdict,
                    };
                    let kept = match verdict {
                        Verdict::Keep => true,
                        Verdict::Superseded => whole,
                        Verdict::ExpiredTombstone => {
                            whole || hash.is_some_and(|h| pass.kept_superseded.contains(&h))
                        }
                    };
                    keep.push(kept);
                    has_tombstone |= record.value.is_none();
                    records.push((record.key, record.offset, hash, *verdict));
                }
                if first_batch && !keep.iter().any(|k| *k) {
                    // The output segment starts where its input did: keep the last record.
                    if let Some(last) = keep.last_mut() {
                        *last = true;
                    }
                }
                first_batch = false;
                let kept_before = pass.records_kept_for_producers;
                for ((key, offset, hash, verdict), kept) in records.into_iter().zip(&keep) {
                    if whole && *kept && verdict != Verdict::Keep {
                        pass.records_kept_for_producers += 1;
                    }
                    match (verdict, kept) {
                        (Verdict::Superseded, true) => {
                            pass.kept_superseded.extend(hash);
                        }
                        (Verdict::Superseded, false) => pass.records_removed += 1,
                        (Verdict::ExpiredTombstone, false) => {
                            pass.records_removed += 1;
                            if let Some(key) = key {
                                pass.dropped_tombstones.push((key, offset));
                            }
                        }
                        (Verdict::ExpiredTombstone, true) => {}
                        (Verdict::Keep, _) => {}
                    }
                }
                if pass.records_kept_for_producers > kept_before {
                    pass.batches_kept_for_producers += 1;
                }
                // Tombstones still waiting for their retention.
                if !expired && has_tombstone && verdicts.contains(&Verdict::Keep) {
                    pass.next_tombstone_expiry_ms = Some(
                        pass.next_tombstone_expiry_ms
                            .map_or(expires_ms, |t| t.min(expires_ms)),
                    );
                }
                if !keep.iter().any(|k| *k) {
                    continue;
                }
                let bytes = if keep.iter().all(|k| *k) {
                    batch.as_bytes().to_vec()
                } else {
                    reencode(&batch, &keep).map_err(|reason| {
                        self.compaction_error(&format!(
                            "re-encoding the batch at offset {}: {reason}",
                            header.base_offset
                        ))
                    })?
                };
                let header = BatchHeader::parse(&bytes).map_err(|e| {
                    self.compaction_error(&format!("re-encoded batch does not parse: {e}"))
                })?;
                if let Some(mut previous) = pending.take() {
                    widen(&mut previous, header.base_offset);
                    emit(previous, &mut out, &mut position)?;
                }
                pending = Some(Pending { bytes, header });
            }
        }
        let Some(mut last) = pending.take() else {
            return Err(self.compaction_error("a compacted segment came out empty"));
        };
        widen(&mut last, group_end);
        emit(last, &mut out, &mut position)?;
        out.flush().map_err(write_err)?;
        drop(out);
        if group.len() == 1 && pass.records_removed == removed_before {
            // Nothing to remove: the segment stays as it is (no fsync, no new name).
            drop(out_file);
            super::remove_segment_files(&self.dir, name)?;
            return Ok(group[0].clone());
        }
        if let Some(ms) = newest_input_ms {
            let time = std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
            if let Err(error) = out_file.set_modified(time) {
                tracing::warn!(path = %path.display(), %error, "could not keep the inputs' modification time");
            }
        }
        out_file
            .sync_all()
            .map_err(|e| LogError::io("syncing compacted segment", &path, e))?;
        // Check what was written before anything depends on it.
        let data = segment::map_file(&out_file, position)
            .map_err(|e| LogError::io("mapping compacted segment", &path, e))?;
        let scan = segment::scan(
            &data,
            group_base,
            self.config.index_interval_bytes,
            true,
            segment::DEFAULT_LEADER_EPOCH,
        );
        if let Some(reason) = scan.stop {
            return Err(self.compaction_error(&format!(
                "the compacted segment {} does not verify: {reason}",
                path.display()
            )));
        }
        if scan.next_offset != group_end {
            return Err(self.compaction_error(&format!(
                "the compacted segment ends at {} instead of {group_end}",
                scan.next_offset
            )));
        }
        let offsets = OffsetIndex::write_sealed(&name.index(&self.dir), &offset_entries)
            .map_err(|e| LogError::io("writing index", name.index(&self.dir), e))?;
        let times = TimeIndex::write_sealed(&name.time_index(&self.dir), &time_entries)
            .map_err(|e| LogError::io("writing index", name.time_index(&self.dir), e))?;
        Ok(Arc::new(Segment::new(SegmentParts {
            base_offset: group_base,
            generation: name.generation,
            path,
            data,
            len: position,
            next_offset: group_end,
            max_timestamp: scan.max_timestamp,
            last_epoch: scan.last_epoch,
            created_ms: group[0].created_ms.load(Ordering::Acquire),
            verified: true,
            indexes: Indexes { offsets, times },
        })))
    }
}

#[cfg(test)]
mod tests;
