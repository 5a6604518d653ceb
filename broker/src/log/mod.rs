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
//! Tables are compacted by `compact.rs`; its swap is committed through the manifest and open
//! resolves what an interrupted swap left behind (see both module docs).
//!
//! ## Offsets and visibility
//! - `log start` = base offset of the oldest segment; retention deletes whole sealed segments.
//! - `end` = next offset to assign. `append` stamps the batch's base offset and leader epoch
//!   (the fields before the CRC) and writes the rest as it came (`pwritev`: 16 stamped bytes +
//!   the client's bytes from byte 16 on, no copy).
//! - `durable` <= `end`: everything below it was covered by an fsync. `read` serves only below
//!   `durable`, so no reader ever sees a record that a crash could take back and whose offset
//!   could then be reused.
//!
//! ## Durability (group commit)
//! A flusher task ([`Log::spawn_flusher`]) calls [`Log::sync`] as soon as the previous sync ends
//! (`FsyncPolicy::Always`) or every N ms (`IntervalMs`). `sync` notes the end offset, fsyncs the
//! active segment and publishes that end as durable; callers that arrive while an fsync runs
//! queue behind it and usually find their data already covered, so concurrent appenders share
//! one fsync. [`Log::wait_durable`] resolves when the durable offset covers an append.
//! A roll fsyncs the old segment before the new one takes writes, so sealed segments are always
//! durable and the active segment is the only one that needs syncing.
//!
//! ## Fault model
//! - `kill -9` / power loss at any point: on open without a valid clean-shutdown marker every
//!   segment is scanned (framing, contiguous offsets, stamped leader epoch, CRC-32C). A bad or
//!   partial batch in the last segment at or after the recovery point is a torn tail: the
//!   segment is truncated to the last valid batch (before it is mapped) and the log says how
//!   many bytes it dropped. Anything else was fsync'd once — a sealed segment is synced before
//!   its successor is created, and everything below the recovery point was synced — so a bad
//!   batch there, or a log that ends below the recovery point, is interior corruption: `open`
//!   fails with [`LogError::Corrupt`] naming the file (the caller fences this partition; other
//!   partitions are unaffected). Indexes are hints: rebuilt when missing or inconsistent.
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

mod checkpoint;
mod compact;
pub mod config;
pub mod error;
pub mod file;
mod index;
mod manifest;
pub mod preallocate;
mod segment;
#[cfg(test)]
mod tests;

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use syncline_proto::batch;
use tokio::sync::{watch, Notify};

pub use compact::{
    CompactOptions, CompactStep, CompactionFilter, CompactionInfo, CompactionOutcome, Throttle,
    Verdict,
};
pub use config::{ConfigError, FsyncPolicy, LogConfig};
pub use error::LogError;
pub use file::{FaultInjector, FaultKind, FileOpener, OsOpener, SegmentFile};
pub use preallocate::Preallocation;

/// Writes `dir/name` so that a crash leaves the old or the new file (temp file, fsync, rename,
/// directory fsync). For the partition layer's small state files.
pub fn write_file_atomically(dir: &Path, name: &str, contents: &[u8]) -> io::Result<()> {
    file::write_atomically(dir, name, contents)
}

use checkpoint::CleanMarker;
use index::{IndexFile, OffsetIndex, TimeIndex};
use manifest::Manifest;
use segment::{IndexCursor, Indexes, Segment, SegmentName, SegmentParts};

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
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self {
            opener: Arc::new(OsOpener),
            clock: Arc::new(SystemClock),
            preallocation: Arc::new(Preallocation::default()),
            lock_dir: true,
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
    /// Durable offset at the time of the read (readers never see past it).
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
    /// Everything below is fsync'd and visible to readers.
    pub durable_offset: u64,
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
    durable_offset: AtomicU64,
    durable_tx: watch::Sender<u64>,
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

fn lock_dir(dir: &Path) -> Result<File, LogError> {
    let path = dir.join(".lock");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| LogError::io("creating the lock file", &path, e))?;
    // SAFETY: plain syscall on an fd we own.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let error = io::Error::last_os_error();
        if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(LogError::Locked {
                dir: dir.to_path_buf(),
            });
        }
        return Err(LogError::io("locking", &path, error));
    }
    Ok(file)
}

/// Lists segment files (sorted by base offset, then generation) and removes leftovers of
/// interrupted operations: temp files and indexes whose segment is gone.
fn list_segments(dir: &Path) -> Result<Vec<SegmentName>, LogError> {
    let entries = std::fs::read_dir(dir).map_err(|e| LogError::io("listing", dir, e))?;
    let mut names = Vec::new();
    let mut indexes = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| LogError::io("listing", dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.ends_with(".tmp") {
            std::fs::remove_file(entry.path())
                .map_err(|e| LogError::io("removing leftover", entry.path(), e))?;
            continue;
        }
        let Some((stem, extension)) = name.split_once('.') else {
            continue;
        };
        let Some(segment) = SegmentName::parse(stem) else {
            continue;
        };
        match extension {
            "log" => names.push(segment),
            "index" | "timeindex" => indexes.push((segment, entry.path())),
            _ => {}
        }
    }
    names.sort_unstable();
    for (segment, path) in indexes {
        if names.binary_search(&segment).is_err() {
            tracing::info!(path = %path.display(), "removing index without a segment");
            std::fs::remove_file(&path).map_err(|e| LogError::io("removing", &path, e))?;
        }
    }
    Ok(names)
}

/// A sealed index that could not be written for lack of space is served detached (no entries:
/// lookups scan the segment) until the next open rebuilds it; other errors fail the open.
fn detach_on_no_space<const W: usize>(
    result: io::Result<IndexFile<W>>,
    path: &Path,
) -> Result<IndexFile<W>, LogError> {
    match result {
        Ok(index) => Ok(index),
        Err(error) if Log::is_no_space(&error) => {
            tracing::warn!(path = %path.display(), %error, "cannot write the rebuilt index; serving without it until the next open");
            Ok(IndexFile::detached(path))
        }
        Err(error) => Err(LogError::io("rebuilding index", path, error)),
    }
}

/// When the file was created (statx birth time), in ms since the epoch: a segment's age.
fn birth_time_ms(file: &File) -> Option<i64> {
    let created = file.metadata().ok()?.created().ok()?;
    let since = created.duration_since(std::time::UNIX_EPOCH).ok()?;
    i64::try_from(since.as_millis()).ok()
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
    /// Opens (or creates) the log in `dir` with real files and the system clock.
    pub fn open(dir: impl Into<PathBuf>, config: LogConfig) -> Result<Log, LogError> {
        Self::open_with(dir, config, OpenOptions::default())
    }

    /// Opens (or creates) the log in `dir`, recovering from a crash if needed.
    pub fn open_with(
        dir: impl Into<PathBuf>,
        config: LogConfig,
        options: OpenOptions,
    ) -> Result<Log, LogError> {
        let dir = dir.into();
        config.validate()?;
        if !dir.exists() {
            std::fs::create_dir_all(&dir).map_err(|e| LogError::io("creating", &dir, e))?;
            if let Some(parent) = dir.parent() {
                file::sync_dir(parent).map_err(|e| LogError::io("syncing", parent, e))?;
            }
        }
        let lock = if options.lock_dir {
            Some(lock_dir(&dir)?)
        } else {
            None
        };
        let marker = checkpoint::take_clean_marker(&dir)
            .map_err(|e| LogError::io("reading the clean-shutdown marker in", &dir, e))?;
        let recovery_point = checkpoint::read_recovery_point(&dir).map_err(|e| {
            if e.kind() == io::ErrorKind::InvalidData {
                LogError::Corrupt {
                    file: dir.join(checkpoint::RECOVERY_POINT_FILE),
                    position: 0,
                    offset: 0,
                    reason: e.to_string(),
                }
            } else {
                LogError::io("reading the recovery point in", &dir, e)
            }
        })?;
        let manifest = Manifest::read(&dir)?;
        let names = manifest.resolve(&dir, list_segments(&dir)?, remove_segment_files)?;
        if names.is_empty() {
            if let Some(point) = recovery_point.filter(|p| *p > 0) {
                return Err(LogError::Corrupt {
                    file: dir.clone(),
                    position: 0,
                    offset: point,
                    reason: format!(
                        "no segment files, but the recovery point says offsets below {point} were written"
                    ),
                });
            }
        }
        let last_name = names.last().copied();
        let clean = match (marker, last_name) {
            (Some(marker), Some(last)) => {
                let len = std::fs::metadata(last.log(&dir)).map(|m| m.len()).ok();
                marker.last_segment == last.base
                    && last.generation == 0
                    && Some(marker.last_segment_len) == len
            }
            _ => false,
        };
        let recovery_point = recovery_point.unwrap_or(0);
        let mut report = RecoveryReport {
            clean,
            ..Default::default()
        };
        let now = options.clock.now_ms();

        let mut segments: Vec<Arc<Segment>> = Vec::with_capacity(names.len() + 1);
        let mut writer_parts: Option<(Arc<dyn SegmentFile>, IndexCursor)> = None;
        // An empty non-last segment is a successor whose roll never got a batch in (its files
        // were not cleaned up): it holds nothing. The offset check between its neighbours still
        // guards the sequence.
        let last_index = names.len().saturating_sub(1);
        let mut kept = Vec::with_capacity(names.len());
        for (i, name) in names.iter().copied().enumerate() {
            let path = name.log(&dir);
            let empty = std::fs::metadata(&path)
                .map(|m| m.len() == 0)
                .unwrap_or(false);
            if empty && i < last_index && name.generation == 0 {
                tracing::warn!(path = %path.display(), "removing empty non-last segment");
                remove_segment_files(&dir, name)?;
                file::sync_dir(&dir).map_err(|e| LogError::io("syncing", &dir, e))?;
            } else {
                kept.push(name);
            }
        }
        let names = kept;
        let mut i = 0;
        while i < names.len() {
            let name = names[i];
            let base = name.base;
            let is_last = i + 1 == names.len();
            let path = name.log(&dir);
            let file = options
                .opener
                .open(&path, false)
                .map_err(|e| LogError::io("opening segment", &path, e))?;
            let mut file_len = file
                .len()
                .map_err(|e| LogError::io("reading size of", &path, e))?;
            let trusted = if clean {
                let next_base = names.get(i + 1).map(|n| n.base);
                Self::load_trusted(
                    &dir,
                    name,
                    next_base,
                    &config,
                    file.file(),
                    file_len,
                    marker,
                )
            } else {
                None
            };
            let (next_offset, max_timestamp, cursor, indexes) = match trusted {
                Some(loaded) => loaded,
                None => {
                    let data = segment::map_file(file.file(), file_len)
                        .map_err(|e| LogError::io("mapping segment", &path, e))?;
                    let mut scan = segment::scan(&data, base, config.index_interval_bytes, true);
                    drop(data);
                    if scan.stop.is_none() && !is_last && scan.next_offset != names[i + 1].base {
                        scan.stop = Some(format!(
                            "segment ends at offset {} but the next segment starts at {}",
                            scan.next_offset,
                            names[i + 1].base
                        ));
                    }
                    if let Some(reason) = scan.stop.take() {
                        // A non-last segment was fsync'd before its successor was created, and
                        // anything below the recovery point was fsync'd too: damage there is
                        // corruption, never a torn write.
                        if !is_last || scan.next_offset < recovery_point {
                            let why = if is_last {
                                format!("this data was fsync'd (recovery point {recovery_point})")
                            } else {
                                "this sealed segment was fsync'd before the next one was created"
                                    .to_string()
                            };
                            return Err(LogError::Corrupt {
                                file: path,
                                position: scan.valid_len,
                                offset: scan.next_offset,
                                reason: format!(
                                    "{reason}; {why}, so this is interior corruption, not a torn write"
                                ),
                            });
                        }
                        // Torn tail of the last segment: cut it (before it is mapped for
                        // serving).
                        let dropped = file_len - scan.valid_len;
                        tracing::warn!(
                            dir = %dir.display(),
                            segment = %path.display(),
                            valid_bytes = scan.valid_len,
                            dropped_bytes = dropped,
                            next_offset = scan.next_offset,
                            %reason,
                            "truncating torn tail of the log"
                        );
                        file.set_len(scan.valid_len)
                            .map_err(|e| LogError::io("truncating torn tail of", &path, e))?;
                        file.sync_data()
                            .map_err(|e| LogError::io("syncing", &path, e))?;
                        file_len = scan.valid_len;
                        report.bytes_truncated += dropped;
                    }
                    let is_last = i + 1 == names.len();
                    let indexes =
                        Self::indexes_from_scan(&dir, name, is_last, &config, &scan, &mut report)?;
                    (scan.next_offset, scan.max_timestamp, scan.cursor, indexes)
                }
            };
            let is_last = i + 1 == names.len();
            if is_last {
                // Blocks a crash left reserved past the written end go back to the file system
                // (the file is not mapped yet; see `preallocate.rs`).
                if let Err(error) = file.set_len(file_len) {
                    tracing::warn!(path = %path.display(), %error, "could not release preallocated space");
                }
            }
            let map_len = if is_last {
                config.segment_bytes_max.max(file_len)
            } else {
                file_len
            };
            let data = segment::map_file(file.file(), map_len)
                .map_err(|e| LogError::io("mapping segment", &path, e))?;
            segments.push(Arc::new(Segment::new(SegmentParts {
                base_offset: base,
                generation: name.generation,
                path,
                data,
                len: file_len,
                next_offset,
                max_timestamp,
                created_ms: birth_time_ms(file.file()).unwrap_or(now).min(now),
                verified: !clean,
                indexes,
            })));
            if is_last {
                writer_parts = Some((file, cursor));
            }
            // Sealed segments drop their file handle here; the mapping stays.
            i += 1;
        }

        let (active, file, cursor) = match (segments.last(), writer_parts) {
            (Some(active), Some((file, cursor))) => (active.clone(), file, cursor),
            _ => {
                let (segment, file) = Self::create_segment(&dir, 0, &config, &options, now)?;
                segments.push(segment.clone());
                (segment, file, IndexCursor::default())
            }
        };
        let end = active.next_offset();
        if end < recovery_point {
            return Err(LogError::Corrupt {
                file: active.path.clone(),
                position: active.len(),
                offset: end,
                reason: format!(
                    "the log ends at offset {end} but offsets below {recovery_point} were fsync'd (recovery point): acknowledged data is missing"
                ),
            });
        }
        if !clean {
            // What survived the crash is served from now on: make sure it is on disk.
            file.sync_data()
                .map_err(|e| LogError::io("syncing", &active.path, e))?;
        }
        // Opening must not need free space: a recovery point that cannot be written is a
        // warning. The old one stays valid (it is lower: recovery only treats less of the log
        // as known-synced), and the flusher or close writes the new one once there is room.
        let mut persisted_point = recovery_point;
        if recovery_point != end {
            match checkpoint::write_recovery_point(&dir, end) {
                Ok(()) => persisted_point = end,
                Err(error) => {
                    tracing::warn!(dir = %dir.display(), %error, "could not write the recovery point; the log serves, and writes wait for space");
                }
            }
        }
        let start = segments.first().map_or(0, |s| s.base_offset);
        let position = active.len();
        if clean {
            tracing::info!(dir = %dir.display(), start, end, "opened log after clean shutdown");
        } else {
            tracing::info!(dir = %dir.display(), start, end, truncated_bytes = report.bytes_truncated, indexes_rebuilt = report.indexes_rebuilt, "recovered log");
        }
        Ok(Log {
            dir,
            config,
            options,
            segments: RwLock::new(Arc::new(segments)),
            writer: Mutex::new(Writer {
                active,
                file,
                position,
                allocated: position,
                cursor,
                chunk: preallocate::ChunkSize::default(),
                counted: 0,
            }),
            end_offset: AtomicU64::new(end),
            durable_offset: AtomicU64::new(end),
            durable_tx: watch::Sender::new(end),
            start_offset: AtomicU64::new(start),
            sync_lock: Mutex::new(()),
            poisoned: AtomicBool::new(false),
            poison_cause: Mutex::new(None),
            closed: AtomicBool::new(false),
            dirty: Arc::new(Notify::new()),
            last_recovery_point: Mutex::new((persisted_point, Instant::now())),
            stats: LogStats::default(),
            recovery: report,
            horizon: AtomicU64::new(manifest.horizon),
            kept_for_producers: AtomicU64::new(0),
            tombstone_expiry_ms: std::sync::atomic::AtomicI64::new(manifest.tombstone_due_ms),
            manifest: Mutex::new(manifest),
            compact_lock: Mutex::new(()),
            _lock: lock,
        })
    }

    /// Clean open of one segment: load its indexes and walk the tail after the last index
    /// entry. `None` when anything disagrees (the caller then scans).
    fn load_trusted(
        dir: &Path,
        name: SegmentName,
        next_base: Option<u64>,
        config: &LogConfig,
        file: &File,
        file_len: u64,
        marker: Option<CleanMarker>,
    ) -> Option<(u64, i64, IndexCursor, Indexes)> {
        let base = name.base;
        let is_last = next_base.is_none();
        let (offsets, times) = if is_last {
            let capacity = config.index_entries_max();
            (
                OffsetIndex::open_writable(&name.index(dir), capacity, usize::MAX).ok()?,
                TimeIndex::open_writable(&name.time_index(dir), capacity, usize::MAX).ok()?,
            )
        } else {
            (
                OffsetIndex::open_sealed(&name.index(dir)).ok()?,
                TimeIndex::open_sealed(&name.time_index(dir)).ok()?,
            )
        };
        let indexes = Indexes { offsets, times };
        let data = segment::map_file(file, file_len).ok()?;
        let checked = segment::check_index(&indexes, file_len)
            .and_then(|()| Segment::walk_tail(&data, base, &indexes));
        match checked {
            Ok((next, max_timestamp, cursor)) => {
                let expected_next = next_base.or(marker.map(|m| m.end_offset));
                if expected_next != Some(next) {
                    tracing::warn!(dir = %dir.display(), base, next, ?expected_next, "segment does not end where the next one starts; scanning it");
                    return None;
                }
                Some((next, max_timestamp, cursor, indexes))
            }
            Err(reason) => {
                tracing::warn!(dir = %dir.display(), base, %reason, "segment disagrees with its index after a clean shutdown; scanning it");
                None
            }
        }
    }

    fn indexes_from_scan(
        dir: &Path,
        name: SegmentName,
        is_last: bool,
        config: &LogConfig,
        scan: &segment::Scan,
        report: &mut RecoveryReport,
    ) -> Result<Indexes, LogError> {
        let base = name.base;
        let offsets_path = name.index(dir);
        let times_path = name.time_index(dir);
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |e| LogError::io("rebuilding index", path, e)
        };
        if is_last {
            let capacity = config.index_entries_max();
            let mut offsets = OffsetIndex::open_writable(&offsets_path, capacity, usize::MAX)
                .map_err(io_err(&offsets_path))?;
            let mut times = TimeIndex::open_writable(&times_path, capacity, usize::MAX)
                .map_err(io_err(&times_path))?;
            if offsets.entries() != scan.offset_entries || times.entries() != scan.time_entries {
                report.indexes_rebuilt += 1;
            }
            // Always rewritten from the scan: an unsynced index may hold stale entries past a
            // zero gap that the entry count cannot see.
            {
                offsets.clear_all();
                times.clear_all();
                for entry in &scan.offset_entries {
                    offsets.push(*entry);
                }
                for entry in &scan.time_entries {
                    times.push(*entry);
                }
            }
            return Ok(Indexes { offsets, times });
        }
        let matches = |existing: io::Result<Vec<u8>>, expected: &[u8]| {
            existing.map(|bytes| bytes == expected).unwrap_or(false)
        };
        let expected_offsets: Vec<u8> = scan.offset_entries.iter().flatten().copied().collect();
        let expected_times: Vec<u8> = scan.time_entries.iter().flatten().copied().collect();
        let offsets_ok = matches(std::fs::read(&offsets_path), &expected_offsets);
        let times_ok = matches(std::fs::read(&times_path), &expected_times);
        if !(offsets_ok && times_ok) {
            report.indexes_rebuilt += 1;
            tracing::info!(dir = %dir.display(), base, "rebuilding missing or inconsistent index");
        }
        // A rebuilt index that cannot be written (a full disk) is served detached: lookups
        // scan the segment from its start until the next open rebuilds it. Opening must not
        // need free space.
        let offsets = detach_on_no_space(
            if offsets_ok {
                OffsetIndex::open_sealed(&offsets_path)
            } else {
                OffsetIndex::write_sealed(&offsets_path, &scan.offset_entries)
            },
            &offsets_path,
        )?;
        let times = detach_on_no_space(
            if times_ok {
                TimeIndex::open_sealed(&times_path)
            } else {
                TimeIndex::write_sealed(&times_path, &scan.time_entries)
            },
            &times_path,
        )?;
        if !(offsets_ok && times_ok) {
            if let Err(error) = file::sync_dir(dir) {
                tracing::warn!(dir = %dir.display(), %error, "cannot sync the directory after rebuilding an index");
            }
        }
        Ok(Indexes { offsets, times })
    }

    fn create_segment(
        dir: &Path,
        base: u64,
        config: &LogConfig,
        options: &OpenOptions,
        now: i64,
    ) -> Result<(Arc<Segment>, Arc<dyn SegmentFile>), LogError> {
        let result = Self::try_create_segment(dir, base, config, options, now);
        if result.is_err() {
            // Leave nothing behind: an empty segment file between two real ones would break the
            // offset sequence on the next open.
            let _ = remove_segment_files(dir, SegmentName::appended(base));
            let _ = file::sync_dir(dir);
        }
        result
    }

    fn try_create_segment(
        dir: &Path,
        base: u64,
        config: &LogConfig,
        options: &OpenOptions,
        now: i64,
    ) -> Result<(Arc<Segment>, Arc<dyn SegmentFile>), LogError> {
        let name = SegmentName::appended(base);
        let path = name.log(dir);
        // A previous attempt may have left an empty file: nothing in it was ever acknowledged.
        if std::fs::metadata(&path)
            .map(|m| m.len() == 0)
            .unwrap_or(false)
        {
            std::fs::remove_file(&path).map_err(|e| LogError::io("removing", &path, e))?;
        }
        let file = options
            .opener
            .open(&path, true)
            .map_err(|e| LogError::io("creating segment", &path, e))?;
        let capacity = config.index_entries_max();
        let offsets_path = name.index(dir);
        let times_path = name.time_index(dir);
        let offsets = OffsetIndex::open_writable(&offsets_path, capacity, 0)
            .map_err(|e| LogError::io("creating index", &offsets_path, e))?;
        let times = TimeIndex::open_writable(&times_path, capacity, 0)
            .map_err(|e| LogError::io("creating index", &times_path, e))?;
        let data = segment::map_file(file.file(), config.segment_bytes_max)
            .map_err(|e| LogError::io("mapping segment", &path, e))?;
        file::sync_dir(dir).map_err(|e| LogError::io("syncing", dir, e))?;
        let segment = Arc::new(Segment::new(SegmentParts {
            base_offset: base,
            generation: 0,
            path,
            data,
            len: 0,
            next_offset: base,
            max_timestamp: i64::MIN,
            created_ms: now,
            verified: true,
            indexes: Indexes { offsets, times },
        }));
        Ok((segment, file))
    }

    /// The log directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The configuration the log was opened with.
    pub fn config(&self) -> &LogConfig {
        &self.config
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

    /// Everything below this offset is fsync'd and visible to readers.
    pub fn durable_offset(&self) -> u64 {
        self.durable_offset.load(Ordering::Acquire)
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
        self.durable_tx.send_modify(|_| {});
        LogError::Poisoned {
            dir: self.dir.clone(),
            cause,
        }
    }

    fn is_no_space(error: &io::Error) -> bool {
        error.raw_os_error() == Some(libc::ENOSPC)
    }

    /// Validates `batch` (framing, length, CRC-32C), stamps the next offset as its base offset
    /// and appends it. The write goes to the page cache; see [`Log::wait_durable`].
    pub fn append(&self, batch: &[u8]) -> Result<Appended, LogError> {
        if batch.len() > self.config.batch_bytes_max as usize {
            return Err(LogError::BatchTooLarge {
                size: batch.len(),
                max: self.config.batch_bytes_max,
            });
        }
        let header = batch::verify(batch)?;
        self.append_verified(batch, header)
    }

    /// Appends a batch the caller already verified ([`batch::Batch::parse`] checks framing and
    /// CRC), so the CRC is computed once per produce.
    pub fn append_batch(&self, batch: &batch::Batch) -> Result<Appended, LogError> {
        let bytes = batch.as_bytes();
        if bytes.len() > self.config.batch_bytes_max as usize {
            return Err(LogError::BatchTooLarge {
                size: bytes.len(),
                max: self.config.batch_bytes_max,
            });
        }
        self.append_verified(bytes, *batch.header())
    }

    fn append_verified(
        &self,
        batch: &[u8],
        header: batch::BatchHeader,
    ) -> Result<Appended, LogError> {
        if u64::from(header.last_offset_delta) + 1 != u64::from(header.record_count) {
            // A producer batch covers exactly its records; wider batches are the cleaner's.
            return Err(LogError::BatchOffsetSpan {
                last_offset_delta: header.last_offset_delta,
                record_count: header.record_count,
            });
        }
        let length = batch.len() as u64;
        let mut writer = self.writer.lock();
        self.check_writable()?;
        let base_offset = self.end_offset.load(Ordering::Acquire);
        let last_offset = base_offset + u64::from(header.last_offset_delta);
        if writer.position > 0 && self.needs_roll(&writer, length, last_offset) {
            self.roll(&mut writer)?;
        }
        let position = writer.position;
        let needed = position + length;
        if needed > writer.allocated {
            self.reserve(&mut writer, needed)?;
        }
        // The stamped prefix (base offset, length, leader epoch) sits before the CRC'd bytes,
        // so stamping never recomputes the CRC; the rest goes out exactly as it came.
        let prefix = batch::stamped_prefix(base_offset, header.length, segment::LEADER_EPOCH);
        if let Err(error) =
            writer
                .file
                .write_all_at(&prefix, &batch[batch::STAMPED_PREFIX_LEN..], position)
        {
            if Self::is_no_space(&error) {
                return Err(LogError::io("appending to", &writer.active.path, error));
            }
            return Err(self.poison("write failed", &error));
        }
        let active = writer.active.clone();
        let relative = (base_offset - active.base_offset) as u32;
        let (offset_entry, time_entry) = writer.cursor.observe(
            relative,
            position,
            header.max_timestamp,
            self.config.index_interval_bytes,
        );
        if offset_entry.is_some() || time_entry.is_some() {
            let mut indexes = active.indexes.write();
            if let Some(entry) = offset_entry {
                indexes.offsets.push(entry);
            }
            if let Some(entry) = time_entry {
                indexes.times.push(entry);
            }
        }
        if position == 0 {
            active
                .created_ms
                .store(self.options.clock.now_ms(), Ordering::Release);
        }
        writer.position = needed;
        self.settle(&mut writer);
        active.publish(needed, last_offset + 1, header.max_timestamp);
        self.end_offset.store(last_offset + 1, Ordering::Release);
        drop(writer);
        self.stats.batches_appended.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(crate::metrics::BATCHES_APPENDED_TOTAL).increment(1);
        metrics::counter!(crate::metrics::RECORDS_APPENDED_TOTAL)
            .increment(u64::from(header.record_count));
        self.dirty.notify_one();
        Ok(Appended {
            base_offset,
            last_offset,
        })
    }

    /// Reserves blocks up to `needed` (the end of the batch about to be written) plus an
    /// adaptive chunk ahead, within the broker-wide budget (see `preallocate.rs`). Nothing of
    /// a failed reservation is kept; on a full disk it retries without the chunk ahead.
    fn reserve(&self, writer: &mut Writer, needed: u64) -> Result<(), LogError> {
        let budget = &self.options.preallocation;
        let room = self.config.segment_bytes_max.saturating_sub(needed);
        let chunk = writer
            .chunk
            .next(Instant::now(), self.config.preallocate_bytes);
        let ahead = budget.take(chunk.min(room));
        writer.counted += ahead;
        let error = match writer
            .file
            .allocate(writer.allocated, needed + ahead - writer.allocated)
        {
            Ok(()) => {
                writer.allocated = needed + ahead;
                return Ok(());
            }
            Err(error) => error,
        };
        budget.give_back(ahead);
        writer.counted -= ahead;
        self.release_reservation(writer);
        if ahead > 0 && Self::is_no_space(&error) {
            // The chunk ahead did not fit; the batch alone may.
            match writer
                .file
                .allocate(writer.position, needed - writer.position)
            {
                Ok(()) => {
                    writer.allocated = needed;
                    return Ok(());
                }
                Err(_) => self.release_reservation(writer),
            }
        }
        Err(LogError::io(
            "reserving space in",
            &writer.active.path,
            error,
        ))
    }

    /// Gives the blocks reserved past the written end back to the file system (also what a
    /// failed `fallocate` may have left) by cutting the file to its written length, and the
    /// bytes back to the budget. The cut only removes bytes no reader was ever given: see
    /// the file-length rules in `file.rs`.
    fn release_reservation(&self, writer: &mut Writer) {
        if let Err(error) = writer.file.set_len(writer.position) {
            tracing::warn!(path = %writer.active.path.display(), %error, "could not release preallocated space");
        }
        writer.allocated = writer.position;
        self.settle(writer);
    }

    /// Brings the budget in line with what this writer still has reserved ahead.
    fn settle(&self, writer: &mut Writer) {
        let ahead = writer.allocated.saturating_sub(writer.position);
        if writer.counted > ahead {
            self.options.preallocation.give_back(writer.counted - ahead);
            writer.counted = ahead;
        }
    }

    /// Gives back what an idle or slow log has reserved ahead of its writes (no new
    /// reservation for `preallocate::SHRINK_AFTER`). Called periodically by the broker.
    pub fn release_idle_reservation(&self) {
        let mut writer = self.writer.lock();
        if writer.allocated > writer.position
            && writer.chunk.idle(Instant::now())
            && self.check_writable().is_ok()
        {
            self.release_reservation(&mut writer);
        }
    }

    fn needs_roll(&self, writer: &Writer, length: u64, last_offset: u64) -> bool {
        let active = &writer.active;
        writer.position + length > self.config.segment_bytes_max
            || last_offset - active.base_offset > u64::from(u32::MAX)
            || self
                .options
                .clock
                .now_ms()
                .saturating_sub(active.created_ms.load(Ordering::Acquire))
                >= i64::try_from(self.config.segment_ms).unwrap_or(i64::MAX)
    }

    /// Seals the active segment (fsync, release preallocation, trimmed indexes, close the fd)
    /// and starts a new one at the end offset.
    fn roll(&self, writer: &mut Writer) -> Result<(), LogError> {
        let old = writer.active.clone();
        // 1. The old segment becomes durable before a successor exists: every non-last segment
        //    on disk is fully synced, so recovery treats any damage in one as corruption.
        if let Err(error) = writer.file.sync_data() {
            return Err(self.poison("fsync before roll failed", &error));
        }
        // 2. The successor. On failure `create_segment` removes what it made; the old segment
        //    stays active and nothing else changed (a full disk is a clean NoSpace).
        let base = self.end_offset.load(Ordering::Acquire);
        let now = self.options.clock.now_ms();
        let (segment, file) =
            Self::create_segment(&self.dir, base, &self.config, &self.options, now)?;
        // 3. Release the preallocated blocks past the end. The size only shrinks over bytes no
        //    reader was ever given (a partial write that failed), and ext4/xfs/tmpfs free
        //    fallocate'd blocks even when the size does not change.
        self.release_reservation(writer);
        // 4. Trimmed index copies. A failure (e.g. a full disk) leaves the untrimmed index in
        //    place, which still works; the next open checks and rebuilds it.
        {
            let mut indexes = old.indexes.write();
            if let Err(error) = indexes.offsets.seal().and_then(|()| indexes.times.seal()) {
                tracing::warn!(path = %old.path.display(), %error, "could not write the trimmed index; keeping the untrimmed one");
            }
        }
        {
            let mut segments = self.segments.write();
            let mut list = Vec::clone(&segments);
            list.push(segment.clone());
            *segments = Arc::new(list);
        }
        *writer = Writer {
            active: segment,
            file,
            position: 0,
            allocated: 0,
            cursor: IndexCursor::default(),
            chunk: writer.chunk,
            counted: 0,
        };
        self.publish_durable(base);
        self.persist_recovery_point(base);
        tracing::debug!(dir = %self.dir.display(), base, "rolled segment");
        Ok(())
    }

    /// Persists `offset` as the recovery point unless a larger one is already persisted. All
    /// writers (roll, flusher, close) go through here, under one lock, so the temp file is never
    /// shared and the point never moves backwards.
    fn persist_recovery_point(&self, offset: u64) -> bool {
        let mut last = self.last_recovery_point.lock();
        if offset <= last.0 {
            return true;
        }
        match checkpoint::write_recovery_point(&self.dir, offset) {
            Ok(()) => {
                *last = (offset, Instant::now());
                true
            }
            Err(error) => {
                // Retried at the next interval, not at every group commit (a full disk would
                // log this at every fsync).
                last.1 = Instant::now();
                tracing::warn!(dir = %self.dir.display(), %error, "could not write the recovery point");
                false
            }
        }
    }

    fn publish_durable(&self, offset: u64) {
        self.durable_offset.fetch_max(offset, Ordering::AcqRel);
        // Monotonic under concurrent publishers: a smaller value never overwrites a larger one.
        self.durable_tx.send_if_modified(|current| {
            if offset > *current {
                *current = offset;
                true
            } else {
                false
            }
        });
    }

    /// Makes everything appended so far durable and visible, sharing the fsync with concurrent
    /// callers (group commit). Returns the durable offset. Blocking: call it from a blocking
    /// thread.
    pub fn sync(&self) -> Result<u64, LogError> {
        let target = self.end_offset();
        if self.durable_offset() >= target {
            return Ok(self.durable_offset());
        }
        let _turn = self.sync_lock.lock();
        // Whoever held the lock before us may have covered our target already.
        if self.durable_offset() >= target {
            return Ok(self.durable_offset());
        }
        if self.poisoned.load(Ordering::Acquire) {
            self.check_writable()?;
        }
        let (file, end) = {
            let writer = self.writer.lock();
            (writer.file.clone(), self.end_offset.load(Ordering::Acquire))
        };
        let batches = self.stats.batches_appended.load(Ordering::Relaxed);
        let started = Instant::now();
        if let Err(error) = file.sync_data() {
            return Err(self.poison("fsync failed", &error));
        }
        metrics::histogram!(crate::metrics::FSYNC_DURATION_SECONDS)
            .record(started.elapsed().as_secs_f64());
        let previous = self.stats.batches_synced.swap(batches, Ordering::Relaxed);
        metrics::histogram!(crate::metrics::GROUP_COMMIT_BATCHES)
            .record(batches.saturating_sub(previous) as f64);
        self.stats.syncs.fetch_add(1, Ordering::Relaxed);
        self.publish_durable(end);
        Ok(self.durable_offset())
    }

    /// Resolves once everything below `offset` is durable (e.g. `Appended::durable_target`).
    /// Needs a running flusher ([`Log::spawn_flusher`]) or someone calling [`Log::sync`].
    pub async fn wait_durable(&self, offset: u64) -> Result<u64, LogError> {
        let mut rx = self.durable_tx.subscribe();
        loop {
            let durable = (*rx.borrow_and_update()).max(self.durable_offset());
            if durable >= offset {
                return Ok(durable);
            }
            self.check_writable()?;
            if rx.changed().await.is_err() {
                return Err(LogError::Closed {
                    dir: self.dir.clone(),
                });
            }
        }
    }

    /// A receiver that changes whenever the durable offset grows (what long-polls and
    /// subscriptions wait on).
    pub fn subscribe_durable(&self) -> watch::Receiver<u64> {
        self.durable_tx.subscribe()
    }

    /// True once the log was poisoned by an I/O failure.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }

    /// Starts the background group commit on the current tokio runtime. It ends when the log is
    /// closed, poisoned or dropped.
    pub fn spawn_flusher(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let log = Arc::downgrade(self);
        let dirty = self.dirty.clone();
        tokio::spawn(flusher(log, dirty))
    }

    fn maybe_write_recovery_point(&self) {
        let due = {
            let last = self.last_recovery_point.lock();
            last.1.elapsed() >= Duration::from_millis(self.config.recovery_point_interval_ms)
        };
        if due {
            self.persist_recovery_point(self.durable_offset());
        }
    }

    /// Whole batches from `from` on, up to `max_bytes` (at least one batch when any is
    /// visible), only below the durable offset. Errors when `from` is outside
    /// `[start_offset, end_offset]`.
    pub fn read(&self, from: u64, max_bytes: usize) -> Result<ReadBatches, LogError> {
        self.read_up_to(from, max_bytes, self.durable_offset())
    }

    /// Like [`Log::read`] with an explicit exclusive upper offset (for replication and the
    /// cleaner, which may read past the durable offset).
    pub fn read_up_to(
        &self,
        from: u64,
        max_bytes: usize,
        upper: u64,
    ) -> Result<ReadBatches, LogError> {
        let segments = self.segments.read().clone();
        // The start comes from the same snapshot as the segments, so a concurrent retention
        // pass cannot make this read skip silently past deleted offsets.
        let start = segments.first().map_or(0, |s| s.base_offset);
        let end = self.end_offset();
        let high_watermark = self.durable_offset();
        let upper = upper.min(end);
        if from < start || from > end {
            return Err(LogError::OffsetOutOfRange {
                requested: from,
                start,
                end,
            });
        }
        let empty = ReadBatches {
            bytes: Bytes::new(),
            first_offset: from,
            next_offset: from,
            high_watermark,
        };
        if from >= upper {
            return Ok(empty);
        }
        let first = segments
            .partition_point(|s| s.base_offset <= from)
            .saturating_sub(1);
        for segment in &segments[first..] {
            if segment.base_offset >= upper {
                break;
            }
            if let Some(read) = segment.read(from, max_bytes, upper)? {
                if read.first_offset > from.max(segment.base_offset) {
                    return Err(LogError::Corrupt {
                        file: segment.path.clone(),
                        position: 0,
                        offset: from,
                        reason: format!(
                            "read of offset {from} found the first batch at {} (offsets missing)",
                            read.first_offset
                        ),
                    });
                }
                return Ok(ReadBatches {
                    bytes: read.bytes,
                    first_offset: read.first_offset,
                    next_offset: read.next_offset,
                    high_watermark,
                });
            }
        }
        Ok(empty)
    }

    /// Base offset of the first batch holding a record with timestamp `>= timestamp_ms`, among
    /// durable batches; `None` when there is none yet.
    pub fn offset_for_timestamp(&self, timestamp_ms: i64) -> Result<Option<u64>, LogError> {
        let segments = self.segments.read().clone();
        let upper = self.durable_offset();
        for segment in segments.iter() {
            if segment.len() == 0 || segment.max_timestamp() < timestamp_ms {
                continue;
            }
            if let Some(offset) = segment.find_timestamp(timestamp_ms, upper)? {
                return Ok(Some(offset));
            }
        }
        Ok(None)
    }

    /// Deletes the oldest sealed segments beyond `retention_bytes` or older than
    /// `retention_ms`; the log start offset moves to the first remaining segment.
    pub fn enforce_retention(&self) -> Result<RetentionOutcome, LogError> {
        let writer = self.writer.lock();
        let segments = self.segments.read().clone();
        let now = self.options.clock.now_ms();
        let mut total: u64 = segments.iter().map(|s| s.len()).sum();
        let mut outcome = RetentionOutcome {
            log_start_offset: self.start_offset(),
            ..Default::default()
        };
        let sealed = &segments[..segments.len().saturating_sub(1)];
        let mut delete = 0;
        for segment in sealed {
            let over_size = self
                .config
                .retention_bytes
                .is_some_and(|limit| total - segment.len() >= limit);
            let too_old = self
                .config
                .retention_ms
                .and_then(|limit| i64::try_from(limit).ok())
                .is_some_and(|limit| segment.max_timestamp() < now.saturating_sub(limit));
            if !(over_size || too_old) || segment.next_offset() > self.durable_offset() {
                break;
            }
            total -= segment.len();
            delete += 1;
        }
        if delete == 0 {
            return Ok(outcome);
        }
        let remaining = Arc::new(segments[delete..].to_vec());
        let new_start = remaining
            .first()
            .map_or(self.end_offset(), |s| s.base_offset);
        {
            // Listed (compacted) segments leave the manifest before their files go, so an open
            // never finds a listed segment missing.
            let mut manifest = self.manifest.lock();
            if segments[..delete]
                .iter()
                .any(|s| manifest.segments.contains(&s.name()))
            {
                let mut shortened = manifest.clone();
                shortened.segments.retain(|name| name.base >= new_start);
                shortened
                    .write(&self.dir)
                    .map_err(|e| LogError::io("writing the segment manifest in", &self.dir, e))?;
                *manifest = shortened;
            }
        }
        // Readers first stop finding the segments, then the files go (mappings stay alive in
        // readers' `Bytes` until they drop them).
        *self.segments.write() = remaining;
        self.start_offset.store(new_start, Ordering::Release);
        for segment in &segments[..delete] {
            remove_segment_files(&self.dir, segment.name())?;
            outcome.segments_deleted += 1;
            outcome.bytes_deleted += segment.len();
        }
        file::sync_dir(&self.dir).map_err(|e| LogError::io("syncing", &self.dir, e))?;
        drop(writer);
        outcome.log_start_offset = new_start;
        tracing::info!(dir = %self.dir.display(), segments = outcome.segments_deleted, bytes = outcome.bytes_deleted, start = new_start, "retention deleted segments");
        Ok(outcome)
    }

    /// Flushes everything, records a clean shutdown and refuses further appends. The next open
    /// skips the recovery scan. Idempotent.
    pub fn close(&self) -> Result<(), LogError> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.dirty.notify_one();
        if self.poisoned.load(Ordering::Acquire) {
            self.durable_tx.send_modify(|_| {});
            return Err(LogError::Poisoned {
                dir: self.dir.clone(),
                cause: self.poison_cause.lock().clone().unwrap_or_default(),
            });
        }
        let _turn = self.sync_lock.lock();
        let mut writer = self.writer.lock();
        if let Err(error) = writer.file.sync_data() {
            return Err(self.poison("fsync at close failed", &error));
        }
        self.release_reservation(&mut writer);
        let end = self.end_offset();
        self.publish_durable(end);
        let marker = CleanMarker {
            end_offset: end,
            last_segment: writer.active.base_offset,
            last_segment_len: writer.position,
        };
        if !self.persist_recovery_point(end) {
            return Err(LogError::io(
                "writing the recovery point in",
                &self.dir,
                io::Error::other("see the warning above"),
            ));
        }
        checkpoint::write_clean_marker(&self.dir, marker)
            .map_err(|e| LogError::io("writing the clean-shutdown marker in", &self.dir, e))?;
        self.durable_tx.send_modify(|_| {});
        tracing::info!(dir = %self.dir.display(), end, "closed log");
        Ok(())
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

async fn flusher(log: Weak<Log>, dirty: Arc<Notify>) {
    loop {
        let policy = {
            let Some(log) = log.upgrade() else { return };
            if log.closed.load(Ordering::Acquire) || log.poisoned.load(Ordering::Acquire) {
                return;
            }
            if log.end_offset() <= log.durable_offset() {
                None
            } else {
                Some(log.config.fsync)
            }
        };
        let Some(policy) = policy else {
            dirty.notified().await;
            continue;
        };
        if let FsyncPolicy::IntervalMs(ms) = policy {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        let Some(strong) = log.upgrade() else { return };
        let result = tokio::task::spawn_blocking(move || {
            let result = strong.sync();
            if result.is_ok() {
                strong.maybe_write_recovery_point();
            }
            result
        })
        .await;
        match result {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                tracing::error!(%error, "group commit failed; flusher stops");
                return;
            }
            Err(join_error) => {
                tracing::error!(%join_error, "group commit task failed; flusher stops");
                return;
            }
        }
    }
}
