//! Opening a log: the directory lock, listing segments, the recovery scan (or the clean-open
//! fast path), index rebuilds, and creating segments (also used by rolls). The fault model is
//! in the module doc of `log/mod.rs`.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::{Mutex, RwLock};
use tokio::sync::{watch, Notify};

use super::checkpoint::{self, CleanMarker};
use super::index::{IndexFile, OffsetIndex, TimeIndex};
use super::manifest::Manifest;
use super::segment::{self, IndexCursor, Indexes, Segment, SegmentName, SegmentParts};
use super::{
    file, preallocate, remove_segment_files, Log, LogConfig, LogError, LogStats, OpenOptions,
    RecoveryReport, SegmentFile, Visibility, Writer,
};

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

/// What a clean open knows about a segment from its neighbours.
#[derive(Debug, Clone, Copy)]
struct Around {
    /// Base offset of the next segment (`None` for the last one).
    next_base: Option<u64>,
    /// The clean-shutdown marker (the log's end, for the last segment).
    marker: Option<CleanMarker>,
    /// Leader epoch of the last batch before this segment.
    min_epoch: u32,
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
        // Leader epoch of the last batch so far: epochs never go down along the log.
        let mut epoch = segment::DEFAULT_LEADER_EPOCH;
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
                let around = Around {
                    next_base: names.get(i + 1).map(|n| n.base),
                    marker,
                    min_epoch: epoch,
                };
                Self::load_trusted(&dir, name, around, &config, file.file(), file_len)
            } else {
                None
            };
            let (next_offset, max_timestamp, cursor, indexes, last_epoch) = match trusted {
                Some(loaded) => loaded,
                None => {
                    let data = segment::map_file(file.file(), file_len)
                        .map_err(|e| LogError::io("mapping segment", &path, e))?;
                    let mut scan =
                        segment::scan(&data, base, config.index_interval_bytes, true, epoch);
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
                    (
                        scan.next_offset,
                        scan.max_timestamp,
                        scan.cursor,
                        indexes,
                        scan.last_epoch,
                    )
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
                last_epoch,
                created_ms: birth_time_ms(file.file()).unwrap_or(now).min(now),
                verified: !clean,
                indexes,
            })));
            if is_last {
                writer_parts = Some((file, cursor));
            }
            // Sealed segments drop their file handle here; the mapping stays.
            epoch = last_epoch;
            i += 1;
        }

        let (active, file, cursor) = match (segments.last(), writer_parts) {
            (Some(active), Some((file, cursor))) => (active.clone(), file, cursor),
            _ => {
                let (segment, file) = Self::create_segment(
                    &dir,
                    0,
                    segment::DEFAULT_LEADER_EPOCH,
                    &config,
                    &options,
                    now,
                )?;
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
        // Everything that survived the open is fsync'd. With `Published` nothing is visible
        // until the owner publishes (typically after it cut the log back with `truncate_to`).
        let visibility = options.visibility;
        let visible = match visibility {
            Visibility::Synced => end,
            Visibility::Published => start,
        };
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
            visibility,
            visible_offset: AtomicU64::new(visible),
            synced_offset: AtomicU64::new(end),
            visible_tx: watch::Sender::new(visible),
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
            served: AtomicBool::new(false),
            _lock: lock,
        })
    }

    /// Clean open of one segment: load its indexes and walk the tail after the last index
    /// entry. `None` when anything disagrees (the caller then scans).
    fn load_trusted(
        dir: &Path,
        name: SegmentName,
        around: Around,
        config: &LogConfig,
        file: &File,
        file_len: u64,
    ) -> Option<(u64, i64, IndexCursor, Indexes, u32)> {
        let Around {
            next_base,
            marker,
            min_epoch,
        } = around;
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
            .and_then(|()| Segment::walk_tail(&data, base, &indexes, min_epoch));
        match checked {
            Ok((next, max_timestamp, cursor, last_epoch)) => {
                let expected_next = next_base.or(marker.map(|m| m.end_offset));
                if expected_next != Some(next) {
                    tracing::warn!(dir = %dir.display(), base, next, ?expected_next, "segment does not end where the next one starts; scanning it");
                    return None;
                }
                Some((next, max_timestamp, cursor, indexes, last_epoch))
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

    /// Creates the empty segment `base` (generation 0); `last_epoch` is the epoch of the batch
    /// before it (what its first batch must not go below).
    pub(super) fn create_segment(
        dir: &Path,
        base: u64,
        last_epoch: u32,
        config: &LogConfig,
        options: &OpenOptions,
        now: i64,
    ) -> Result<(Arc<Segment>, Arc<dyn SegmentFile>), LogError> {
        let result = Self::try_create_segment(dir, base, last_epoch, config, options, now);
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
        last_epoch: u32,
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
            last_epoch,
            created_ms: now,
            verified: true,
            indexes: Indexes { offsets, times },
        }));
        Ok((segment, file))
    }
}
