//! One partition's log: an append-only sequence of record batches in segment files, with
//! sparse memory-mapped indexes, group-committed durability, crash recovery and retention.
//!
//! ## On disk (`<dir>` is one partition's directory)
//! ```text
//! <dir>/.lock                         flock'd while the log is open (one process per log),
//!                                     unless the caller locks all its logs at once (the
//!                                     broker locks its data directory: one descriptor less)
//! <dir>/<base:020>.log                segment: batches as producers encoded them (segment.rs)
//! <dir>/<base:020>.index              sparse offset -> position index          (index.rs)
//! <dir>/<base:020>.timeindex          sparse timestamp -> offset index         (index.rs)
//! <dir>/<base:020>-<gen:010>.log      a segment the cleaner wrote (generation gen > 0), with
//!                                     its `.index`/`.timeindex` named the same way
//! <dir>/segments.manifest             the committed compacted prefix (manifest.rs)
//! <dir>/recovery-point                offset below which everything was fsync'd (checkpoint.rs)
//! <dir>/.clean-shutdown               present only between a clean close and the next open
//! ```
//! Code: `open.rs` (lock, listing, recovery scan, segment creation), `append.rs` (append,
//! reservation, roll, group commit, publish, close), `read.rs` (reads, timestamp lookup,
//! retention), `truncate.rs` (cutting the log back for a replication layer), `image.rs` (an
//! image of the log for another node, its verification, and replacing a log's files with it).
//!
//! Tables are compacted by `compact.rs`; its swap is committed through the manifest and open
//! resolves what an interrupted swap left behind (see both module docs).
//!
//! ## Offsets and visibility
//! - `log start` = base offset of the oldest segment; retention deletes whole sealed segments.
//! - `end` = next offset to assign. `append` stamps the batch's base offset and leader epoch
//!   (the fields before the CRC) and writes the rest as it came (`pwritev`: 16 stamped bytes +
//!   the client's bytes from byte 16 on, no copy).
//! - Leader epoch (header bytes 12..16): `append`/`append_batch` stamp 0 (a log that is not
//!   replicated); [`Log::append_batch_at`] stamps the caller's epoch, the Raft term of the
//!   entry. Epochs never go down along a log (Raft terms only grow along any Raft log): an
//!   append below the last batch's epoch is refused ([`LogError::EpochRegressed`]), and reads
//!   return the batches with their stamped epoch.
//! - `synced` <= `end`: everything below it was covered by an fsync. The recovery point never
//!   claims more than `synced`.
//! - `visible` (reported as `durable_offset()`, `info().durable_offset`, and what `read`,
//!   `wait_durable`, `subscribe_durable`, `offset_for_timestamp` and retention go by): readers
//!   see only below it. What moves it is the log's [`Visibility`], chosen at open:
//!   - [`Visibility::Synced`] (default): `visible` = `synced`, so no reader ever sees a record
//!     that a crash could take back and whose offset could then be reused.
//!   - [`Visibility::Published`]: only [`Log::publish`] moves it (clamped to `end`,
//!     monotonic), and it may be ahead of `synced`: the owner (the replication layer) publishes
//!     what a quorum committed, so a crash that takes the local copy back loses nothing the
//!     owner cannot re-apply. The names keep saying "durable"; in this mode they mean
//!     "committed by the replication layer". An open starts it at the log start offset: the
//!     owner first cuts the log back to what it knows (see [`Log::truncate_to`]) and then
//!     publishes.
//!
//!   Retention deletes nothing at or past `min(visible, synced)`.
//!
//! ## Durability (group commit)
//! A flusher task ([`Log::spawn_flusher`]) calls [`Log::sync`] as soon as the previous sync ends
//! (`FsyncPolicy::Always`) or every N ms (`IntervalMs`). `sync` notes the end offset, fsyncs the
//! active segment and marks that end synced (and, with [`Visibility::Synced`], visible);
//! callers that arrive while an fsync runs queue behind it and usually find their data already
//! covered, so concurrent appenders share one fsync. [`Log::wait_durable`] resolves when the
//! visible offset covers an append.
//! A roll fsyncs the old segment before the new one takes writes, so sealed segments are always
//! durable and the active segment is the only one that needs syncing. With
//! [`Visibility::Published`] the flusher does nothing (it ends at once): the owner calls
//! [`Log::sync`] at its checkpoints, which fsyncs, moves `synced` and persists the recovery
//! point; rolls still fsync the old segment.
//!
//! ## Fault model
//! - `kill -9` / power loss at any point: on open without a valid clean-shutdown marker every
//!   segment is scanned (framing, contiguous offsets, leader epochs, CRC-32C). A bad or
//!   partial batch in the last segment at or after the recovery point is a torn tail: the
//!   segment is truncated to the last valid batch (before it is mapped) and the log says how
//!   many bytes it dropped. Anything else was fsync'd once — a sealed segment is synced before
//!   its successor is created, and everything below the recovery point was synced — so a bad
//!   batch there, or a log that ends below the recovery point, is interior corruption: `open`
//!   fails with [`LogError::Corrupt`] naming the file (the caller fences this partition; other
//!   partitions are unaffected). Indexes are hints: rebuilt when missing or inconsistent.
//! - Leader epochs are not covered by the CRC. Any epoch is valid, but a batch whose epoch is
//!   LOWER than the batch before it in the same log (across segment boundaries too) fails the
//!   scan like a bad CRC: a torn tail when it is in the last segment at or after the recovery
//!   point, interior corruption anywhere else. Reads check the same along each walk. A flipped
//!   bit that raises an epoch is therefore caught only by the batch after it (and not at all in
//!   the last batch); the cleaner keeps every batch's epoch when it re-encodes one.
//! - Roll order: fsync the old segment, create the successor (removed again if that fails, so
//!   a full disk leaves no empty segment behind), trim the old indexes, publish, then persist
//!   the recovery point. A crash between any two steps leaves a log that opens: at worst an
//!   empty last segment, or an untrimmed index that the open rebuilds.
//! - Clean open (marker matches the files): no scan; the tail after the last index entry is
//!   walked to check framing; batches are CRC-checked the first time a read touches them.
//! - A failed write or fsync poisons the log: all later appends and syncs fail with
//!   [`LogError::Poisoned`] until it is reopened. A full disk (`ENOSPC`) while reserving space
//!   (`fallocate`, before any byte is written) or writing is a clean [`LogError::NoSpace`]:
//!   the log's end did not move and the next append overwrites any partial bytes; appends
//!   succeed again by themselves as soon as there is space (no restart). A failed
//!   reservation keeps no blocks (the file is cut back to its written length).
//! - Opening needs no free space, so a broker restarting on a full disk serves what it has: a
//!   recovery point that cannot be rewritten is a warning (the old, lower one stays valid), a
//!   sealed index that cannot be rebuilt is served detached (reads scan the segment), and an
//!   active index that cannot grow skips entries (it is sparse). Only appends need space.
//! - Space is reserved ahead of the writes adaptively, within a broker-wide budget, and given
//!   back at seal, close and open (`preallocate.rs`; why cutting a mapped segment to its
//!   written length is safe: `file.rs`).
//! - Descriptors: the active segment keeps one (appends and fsync go through it); sealed
//!   segments and every index are served from mappings whose descriptors are closed.
//! - Files are created, renamed and deleted followed by a directory fsync before anything that
//!   depends on them is acknowledged.
//! - [`Log::truncate_to`] lowers the recovery point before it deletes anything, replaces the
//!   segment it cuts by rename (never shrinks a mapped file), and deletes later segments newest
//!   first: a crash during it reopens to the old log, the truncated log, or the old log without
//!   some of its newest whole segments — never a corrupt one (order in `truncate.rs`). After it
//!   returns, a crash reopens to exactly the truncated log.

mod append;
mod checkpoint;
mod compact;
pub mod config;
pub mod error;
pub mod file;
mod image;
mod index;
mod manifest;
mod open;
pub mod preallocate;
mod read;
mod segment;
#[cfg(test)]
pub(crate) mod tests;
mod truncate;

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use tokio::sync::{watch, Notify};

pub use compact::{
    CompactOptions, CompactStep, CompactionFilter, CompactionInfo, CompactionOutcome, Throttle,
    Verdict,
};
pub use config::{ConfigError, FsyncPolicy, LogConfig};
pub use error::LogError;
pub use file::{FaultInjector, FaultKind, FileOpener, OsOpener, SegmentFile};
pub use image::{
    image_files, is_image_file, is_log_file, replace_files, verify_image, ImageFile, LogImage,
};
pub use preallocate::Preallocation;

/// Writes `dir/name` so that a crash leaves the old or the new file (temp file, fsync, rename,
/// directory fsync). For the partition layer's small state files.
pub fn write_file_atomically(dir: &Path, name: &str, contents: &[u8]) -> io::Result<()> {
    file::write_atomically(dir, name, contents)
}

use manifest::Manifest;
use segment::{IndexCursor, Segment, SegmentName};

/// Milliseconds since the Unix epoch, injectable for tests.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Now, in ms since the epoch.
    fn now_ms(&self) -> i64;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
    }
}

/// A clock that moves only when told (tests).
#[derive(Debug, Default)]
pub struct ManualClock(std::sync::atomic::AtomicI64);

impl ManualClock {
    /// A clock reading `now_ms`.
    pub fn new(now_ms: i64) -> Self {
        Self(std::sync::atomic::AtomicI64::new(now_ms))
    }
    /// Moves the clock by `ms`.
    pub fn advance(&self, ms: i64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// When appended batches become visible to readers (chosen at open, see the module doc).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Visibility {
    /// Visible once fsync'd: the flusher's group commit moves the visible offset (the
    /// default; a partition that is not replicated).
    #[default]
    Synced,
    /// Visible once the owner says so with [`Log::publish`] (the replication layer, when an
    /// entry is committed); fsync is separate and the owner's business ([`Log::sync`]).
    Published,
}

/// How to open a log besides its config: the file seam and the clock.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Opens segment files (real files by default; a [`FaultInjector`] in tests).
    pub opener: Arc<dyn FileOpener>,
    /// The clock for segment age and retention.
    pub clock: Arc<dyn Clock>,
    /// The budget of space reserved ahead of writes, shared by every log of a broker (a
    /// private one per log by default). See `preallocate.rs`.
    pub preallocation: Arc<Preallocation>,
    /// Take the log directory's `.lock` (the default). A caller that holds one lock over all
    /// its logs (the broker locks its data directory) turns it off, which saves a descriptor
    /// per log.
    pub lock_dir: bool,
    /// What moves the reader-visible offset: fsync (the default) or [`Log::publish`].
    pub visibility: Visibility,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self {
            opener: Arc::new(OsOpener),
            clock: Arc::new(SystemClock),
            preallocation: Arc::new(Preallocation::default()),
            lock_dir: true,
            visibility: Visibility::Synced,
        }
    }
}

/// Where an appended batch landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Offset of the batch's first record slot.
    pub base_offset: u64,
    /// Offset of its last record slot.
    pub last_offset: u64,
}

impl Appended {
    /// The end offset that must be durable for this batch to be durable.
    pub fn durable_target(&self) -> u64 {
        self.last_offset + 1
    }
}

/// Whole batches returned by [`Log::read`].
#[derive(Debug, Clone)]
pub struct ReadBatches {
    /// Concatenated whole batches, sliced out of the segment mapping (empty when none).
    pub bytes: Bytes,
    /// Base offset of the first batch (meaningless when empty).
    pub first_offset: u64,
    /// The offset to read from next.
    pub next_offset: u64,
    /// Visible offset ([`Log::durable_offset`]) at the time of the read (readers never see
    /// past it).
    pub high_watermark: u64,
}

/// What one retention pass removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetentionOutcome {
    /// Segments deleted.
    pub segments_deleted: usize,
    /// Bytes of log deleted.
    pub bytes_deleted: u64,
    /// Log start offset afterwards.
    pub log_start_offset: u64,
}

/// A summary of the log, for describe and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogInfo {
    /// First retained offset.
    pub start_offset: u64,
    /// Next offset to assign.
    pub end_offset: u64,
    /// Everything below is visible to readers: fsync'd ([`Visibility::Synced`]) or published
    /// as committed by the replication layer ([`Visibility::Published`]).
    pub durable_offset: u64,
    /// Everything below is fsync'd.
    pub synced_offset: u64,
    /// Bytes in all segments.
    pub size_bytes: u64,
    /// Number of segments.
    pub segments: usize,
}

/// What the last open did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// True when the clean-shutdown marker let the open skip the scan.
    pub clean: bool,
    /// Bytes of torn tail that were truncated or deleted.
    pub bytes_truncated: u64,
    /// Indexes rebuilt because they were missing or inconsistent.
    pub indexes_rebuilt: usize,
}

/// Counters for tests and metrics.
#[derive(Debug, Default)]
pub struct LogStats {
    /// fsyncs performed by `sync` (group commits).
    pub syncs: AtomicU64,
    /// Batches appended.
    pub batches_appended: AtomicU64,
    /// `batches_appended` as of the last fsync (for the group-commit size).
    pub batches_synced: AtomicU64,
}

struct Writer {
    active: Arc<Segment>,
    file: Arc<dyn SegmentFile>,
    /// End of the written bytes (what readers may see once published).
    position: u64,
    /// End of the reserved blocks (`>= position` once a batch is written).
    allocated: u64,
    cursor: IndexCursor,
    /// The adaptive reservation chunk (carried over from segment to segment).
    chunk: preallocate::ChunkSize,
    /// Bytes of `[position, allocated)` this writer counts in the broker-wide budget.
    counted: u64,
}

/// One partition's log. Share it as `Arc<Log>`; every method takes `&self`.
pub struct Log {
    dir: PathBuf,
    config: LogConfig,
    options: OpenOptions,
    segments: RwLock<Arc<Vec<Arc<Segment>>>>,
    writer: Mutex<Writer>,
    end_offset: AtomicU64,
    visibility: Visibility,
    /// Below it readers may read (what `durable_offset()` reports).
    visible_offset: AtomicU64,
    /// Below it everything was fsync'd (what the recovery point may claim).
    synced_offset: AtomicU64,
    /// Carries the visible offset.
    visible_tx: watch::Sender<u64>,
    start_offset: AtomicU64,
    sync_lock: Mutex<()>,
    poisoned: AtomicBool,
    poison_cause: Mutex<Option<String>>,
    closed: AtomicBool,
    dirty: Arc<Notify>,
    last_recovery_point: Mutex<(u64, Instant)>,
    stats: LogStats,
    recovery: RecoveryReport,
    /// The committed compaction state (segment manifest).
    manifest: Mutex<Manifest>,
    /// `manifest.horizon`, readable without the lock (every fetch reports it).
    horizon: AtomicU64,
    /// Records the last compaction pass kept only for idempotent producers (describe).
    kept_for_producers: AtomicU64,
    /// One compaction pass at a time.
    compact_lock: Mutex<()>,
    /// Set (before the segment list is taken) by every read of segment bytes since the open:
    /// while it is false no reader holds or walks a mapping, so `truncate_to` may shorten a
    /// segment file in place.
    served: AtomicBool,
    /// When the earliest tombstone the last pass kept passes its retention (i64::MAX: none).
    tombstone_expiry_ms: std::sync::atomic::AtomicI64,
    _lock: Option<File>,
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Log")
            .field("dir", &self.dir)
            .field("info", &self.info())
            .finish()
    }
}

fn remove_segment_files(dir: &Path, name: SegmentName) -> Result<(), LogError> {
    // The .log goes first: an index without its segment is cleaned up at the next open.
    for path in [name.log(dir), name.index(dir), name.time_index(dir)] {
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(LogError::io("deleting segment file", &path, e)),
        }
    }
    Ok(())
}

impl Log {
    /// The log directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The configuration the log was opened with.
    pub fn config(&self) -> &LogConfig {
        &self.config
    }

    /// The options the log was opened with (to open its directory again the same way).
    pub fn open_options(&self) -> OpenOptions {
        self.options.clone()
    }

    /// What the last open found.
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.recovery
    }

    /// Counters.
    pub fn stats(&self) -> &LogStats {
        &self.stats
    }

    /// Next offset to assign.
    pub fn end_offset(&self) -> u64 {
        self.end_offset.load(Ordering::Acquire)
    }

    /// Everything below this offset is visible to readers. With [`Visibility::Synced`] it is
    /// also fsync'd; with [`Visibility::Published`] it is what the owner published (committed
    /// by the replication layer) and may be ahead of [`Log::synced_offset`].
    pub fn durable_offset(&self) -> u64 {
        self.visible_offset.load(Ordering::Acquire)
    }

    /// Everything below this offset is fsync'd.
    pub fn synced_offset(&self) -> u64 {
        self.synced_offset.load(Ordering::Acquire)
    }

    /// The visibility mode the log was opened with.
    pub fn visibility(&self) -> Visibility {
        self.visibility
    }

    /// First retained offset.
    pub fn start_offset(&self) -> u64 {
        self.start_offset.load(Ordering::Acquire)
    }

    /// Offsets, size and segment count.
    pub fn info(&self) -> LogInfo {
        let segments = self.segments.read().clone();
        LogInfo {
            start_offset: self.start_offset(),
            end_offset: self.end_offset(),
            durable_offset: self.durable_offset(),
            synced_offset: self.synced_offset(),
            size_bytes: segments.iter().map(|s| s.len()).sum(),
            segments: segments.len(),
        }
    }

    fn check_writable(&self) -> Result<(), LogError> {
        if self.poisoned.load(Ordering::Acquire) {
            return Err(LogError::Poisoned {
                dir: self.dir.clone(),
                cause: self
                    .poison_cause
                    .lock()
                    .clone()
                    .unwrap_or_else(|| "unknown".into()),
            });
        }
        if self.closed.load(Ordering::Acquire) {
            return Err(LogError::Closed {
                dir: self.dir.clone(),
            });
        }
        Ok(())
    }

    fn poison(&self, context: &str, error: &io::Error) -> LogError {
        let cause = format!("{context}: {error}");
        tracing::error!(dir = %self.dir.display(), %cause, "log poisoned: no more writes until restart");
        self.poison_cause.lock().get_or_insert(cause.clone());
        self.poisoned.store(true, Ordering::Release);
        self.visible_tx.send_modify(|_| {});
        LogError::Poisoned {
            dir: self.dir.clone(),
            cause,
        }
    }

    fn is_no_space(error: &io::Error) -> bool {
        error.raw_os_error() == Some(libc::ENOSPC)
    }

    /// True once the log was closed: nothing is appended to it any more (a replica that
    /// installed a snapshot serves another log since).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// True once the log was poisoned by an I/O failure.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        let counted = std::mem::take(&mut self.writer.get_mut().counted);
        self.options.preallocation.give_back(counted);
        // Wakes the flusher so it notices the log is gone.
        self.dirty.notify_one();
    }
}
