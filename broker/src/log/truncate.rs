//! Cutting the log back: [`Log::truncate_to`] drops every batch at or after an offset, so that a
//! replicated partition can throw away what its replication layer will apply again (at restart
//! the owner cuts back to the end recorded with its last snapshot and re-applies from there).
//!
//! ## What it does
//! The offset must be a batch boundary in `[start, end]` (`end` is a no-op). With `S` the
//! segment holding the offset and `p` the byte position of the cut in it:
//! - every later segment is deleted, newest first;
//! - `S` keeps its first `p` bytes (CRC-checked as they are scanned for its new index) and
//!   becomes the active segment, generation 0:
//!   - if no reader has touched the log since it was opened (the owner truncates right after
//!     the open, before it serves anything) and `S` is generation 0, its file is cut in place
//!     (`ftruncate`, fsync): nothing is copied. The check holds the segment-list lock, so a
//!     reader that comes meanwhile waits and then sees the new list;
//!   - otherwise the first `p` bytes are copied into a fresh `<base>.log` that replaces the
//!     old file by rename. Readers may hold slices of the old mapping (fetch responses in
//!     flight), and shrinking a mapped file would turn their next access into SIGBUS; the old
//!     inode lives on until they drop it. Cost: one copy of `p` bytes.
//! - the end offset becomes `offset`; the visible offset is clamped to it; the synced offset
//!   becomes `offset` (everything below it is fsync'd: sealed segments since their roll, the
//!   new file by this call), and so does the recovery point.
//!
//! Compacted segments (listed in the manifest, `manifest.rs`) leave the manifest before their
//! files go, exactly as retention does it, so the manifest never lists a missing file.
//!
//! ## Order and fault model
//! The recovery point is lowered to `<= offset` before anything is deleted (otherwise the next
//! open would call the shorter log interior corruption), and the clean-shutdown marker does not
//! exist while a log is open (open removes it). Then, each step made durable (file fsync,
//! directory fsync) before the next:
//! 1. (copy only) write the new copy of `S` as `<base>.log.truncating.tmp` and fsync it (an
//!    open removes `*.tmp` leftovers);
//! 2. for each later segment, newest first: if the manifest lists it, commit a manifest that
//!    ends the compacted prefix at its base; delete its files;
//! 3. rename the copy over `<base>.log` (when `S` is listed with a generation > 0 the manifest
//!    still names the old file, and an open removes the new one as a leftover), or cut `S` in
//!    place and fsync it (a size change is atomic);
//! 4. if the manifest lists `S`: commit a manifest that ends the compacted prefix at its base,
//!    then delete the old file if its name differs.
//!
//! A crash at any point therefore reopens to a prefix of the old log that holds at least the
//! truncated log: the old log (before step 2), the old log without some of its newest whole
//! segments (during step 2), or exactly the truncated log (after step 3, or step 4 when `S` was
//! compacted). Recovery never cuts anything it would call a torn tail there, and nothing is
//! corrupt. An owner that must not keep the intermediate states truncates again after the
//! reopen (truncating to the same offset is idempotent). A failure up to step 1 changes
//! nothing (the partial copy is removed; a full disk is a clean `NoSpace`); a failure after it
//! poisons the log (memory and disk may disagree) until it is reopened.
//!
//! Truncation waits for a running compaction pass (it takes the compaction lock) and holds the
//! sync and writer locks throughout, so no append, group commit, roll or retention pass
//! interleaves.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::checkpoint;
use super::index::{OffsetIndex, TimeIndex};
use super::manifest::Manifest;
use super::segment::{self, Cut, Indexes, Segment, SegmentName, SegmentParts};
use super::{file, remove_segment_files, Log, LogError, SegmentFile, Writer};

/// A test hook: stop (as if the process died) after this many durable steps.
#[derive(Debug, Default)]
pub(crate) struct Steps {
    done: usize,
    stop_after: Option<usize>,
}

impl Steps {
    #[cfg(test)]
    pub(crate) fn stop_after(steps: usize) -> Self {
        Self {
            done: 0,
            stop_after: Some(steps),
        }
    }

    /// Counts one durable step; errors when the test wants to stop here.
    fn step(&mut self, log: &Log) -> Result<(), LogError> {
        if self.stop_after == Some(self.done) {
            return Err(log.poison(
                "truncation stopped (test hook)",
                &std::io::Error::other("stopped"),
            ));
        }
        self.done += 1;
        Ok(())
    }
}

fn temp_path(dir: &Path, name: SegmentName) -> PathBuf {
    dir.join(format!("{}.log.truncating.tmp", name.stem()))
}

impl Log {
    /// Drops every batch at or after `offset`, which must be a batch boundary in
    /// `[start_offset, end_offset]` (`end_offset` changes nothing). Appends continue at
    /// `offset`; the visible offset is clamped to it; everything below it is fsync'd when this
    /// returns, as are the deletions. Blocking (it copies the kept part of the segment holding
    /// `offset` into a new file, see `truncate.rs`); waits for a running compaction pass.
    ///
    /// Truncating below the visible offset takes back what readers may already have seen (the
    /// visible offset goes down, which `subscribe_durable` watchers observe); a replication
    /// layer only truncates what it never published. Truncate before anything reads the log
    /// (e.g. before rebuilding indexes from it) and the cut costs no copy.
    ///
    /// Errors: [`LogError::OffsetOutOfRange`] outside the log, [`LogError::NotBatchBoundary`]
    /// inside a batch (naming the boundaries around it); both change nothing. An I/O failure
    /// after the first deletion poisons the log until it is reopened.
    pub fn truncate_to(&self, offset: u64) -> Result<(), LogError> {
        self.truncate_with(offset, &mut Steps::default())
    }

    pub(crate) fn truncate_with(&self, offset: u64, steps: &mut Steps) -> Result<(), LogError> {
        let _one_pass = self.compact_lock.lock();
        let _turn = self.sync_lock.lock();
        let mut writer = self.writer.lock();
        self.check_writable()?;
        let segments = self.segments.read().clone();
        let start = segments.first().map_or(0, |s| s.base_offset);
        let end = self.end_offset();
        if offset < start || offset > end {
            return Err(LogError::OffsetOutOfRange {
                requested: offset,
                start,
                end,
            });
        }
        if offset == end {
            return Ok(());
        }
        let started = Instant::now();
        // The segment holding `offset` (offset < end, so it holds a batch at or after it).
        let index = segments
            .partition_point(|s| s.base_offset <= offset)
            .saturating_sub(1);
        let cut = &segments[index];
        let min_epoch = match index {
            0 => segment::DEFAULT_LEADER_EPOCH,
            i => segments[i - 1].last_epoch(),
        };
        let (position, scan) = self.kept_part(cut, offset, min_epoch)?;
        // Readers take the segment list before they touch a mapping and mark the log served
        // before that; holding the list's write lock, an unserved log has no reader now, and
        // any reader that comes waits for the new list. Then the cut segment can be shortened
        // in place (no copy). Otherwise it is replaced by a copy (see the module doc).
        let list_lock = self.segments.write();
        let in_place = cut.generation == 0 && !self.served.load(Ordering::SeqCst);
        let mut list_lock = in_place.then_some(list_lock);
        let name = SegmentName::appended(cut.base_offset);
        let path = name.log(&self.dir);

        // Not destructive yet: a failure leaves the log as it was.
        let copy = if in_place {
            None
        } else {
            let temp = temp_path(&self.dir, name);
            let kept = cut.data().slice(..position as usize);
            let file = self.write_copy(&temp, &kept).inspect_err(|_| {
                let _ = std::fs::remove_file(&temp);
            })?;
            Some((temp, file))
        };
        if let Err(error) = self.lower_recovery_point(offset) {
            if let Some((temp, _)) = &copy {
                let _ = std::fs::remove_file(temp);
            }
            return Err(error);
        }
        self.clamp_visible(offset);
        steps.step(self)?;

        // Destructive: a failure from here on poisons the log.
        let io = |context: &str, path: &Path| {
            let context = format!("truncation: {context} {}", path.display());
            move |error: std::io::Error| self.poison(&context, &error)
        };
        let failed =
            |error: LogError| self.poison("truncation", &std::io::Error::other(error.to_string()));
        for later in segments[index + 1..].iter().rev() {
            self.unlist(later.base_offset, steps)?;
            remove_segment_files(&self.dir, later.name()).map_err(failed)?;
            file::sync_dir(&self.dir).map_err(io("syncing", &self.dir))?;
            steps.step(self)?;
        }
        // Fresh index files (new inodes: the old ones stay mapped by the old segment until its
        // readers are done).
        for index_path in [name.index(&self.dir), name.time_index(&self.dir)] {
            match std::fs::remove_file(&index_path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io("removing the old index", &index_path)(e)),
            }
        }
        let file = match copy {
            Some((temp, file)) => {
                std::fs::rename(&temp, &path)
                    .map_err(io("renaming the truncated segment", &path))?;
                file::sync_dir(&self.dir).map_err(io("syncing", &self.dir))?;
                file
            }
            None => {
                let file = if Arc::ptr_eq(cut, &writer.active) {
                    writer.file.clone()
                } else {
                    self.options
                        .opener
                        .open(&path, false)
                        .map_err(io("opening the segment to cut", &path))?
                };
                file.set_len(position)
                    .map_err(io("cutting the segment", &path))?;
                file.sync_data().map_err(io("syncing", &path))?;
                file
            }
        };
        steps.step(self)?;
        self.unlist(cut.base_offset, steps)?;
        if cut.generation != 0 {
            remove_segment_files(&self.dir, cut.name()).map_err(failed)?;
            file::sync_dir(&self.dir).map_err(io("syncing", &self.dir))?;
            steps.step(self)?;
        }

        let capacity = self.config.index_entries_max();
        let mut offsets = OffsetIndex::open_writable(&name.index(&self.dir), capacity, 0)
            .map_err(io("creating index", &name.index(&self.dir)))?;
        let mut times = TimeIndex::open_writable(&name.time_index(&self.dir), capacity, 0)
            .map_err(io("creating index", &name.time_index(&self.dir)))?;
        for entry in &scan.offset_entries {
            offsets.push(*entry);
        }
        for entry in &scan.time_entries {
            times.push(*entry);
        }
        let map_len = self.config.segment_bytes_max.max(position);
        let data = segment::map_file(file.file(), map_len).map_err(io("mapping segment", &path))?;
        let active = Arc::new(Segment::new(SegmentParts {
            base_offset: cut.base_offset,
            generation: 0,
            path,
            data,
            len: position,
            next_offset: offset,
            max_timestamp: scan.max_timestamp,
            last_epoch: scan.last_epoch,
            created_ms: cut.created_ms.load(Ordering::Acquire),
            verified: true,
            indexes: Indexes { offsets, times },
        }));
        let mut list = segments[..index].to_vec();
        list.push(active.clone());
        match list_lock.as_mut() {
            Some(locked) => **locked = Arc::new(list),
            None => *self.segments.write() = Arc::new(list),
        }
        drop(list_lock);
        self.options.preallocation.give_back(writer.counted);
        *writer = Writer {
            active,
            file,
            position,
            allocated: position,
            cursor: scan.cursor,
            chunk: writer.chunk,
            counted: 0,
        };
        self.end_offset.store(offset, Ordering::Release);
        self.clamp_visible(offset);
        self.synced_offset.store(offset, Ordering::Release);
        // Everything kept is fsync'd now: with `Synced` that makes it visible.
        self.mark_synced(offset);
        self.persist_recovery_point(offset);
        drop(writer);
        tracing::info!(dir = %self.dir.display(), from = end, to = offset, in_place, segments_deleted = segments.len() - 1 - index, elapsed_ms = started.elapsed().as_millis() as u64, "truncated log");
        Ok(())
    }

    /// Where the cut at `offset` falls in `cut` (a batch boundary, else
    /// [`LogError::NotBatchBoundary`]) and the CRC-checked scan of what it keeps.
    fn kept_part(
        &self,
        cut: &Segment,
        offset: u64,
        min_epoch: u32,
    ) -> Result<(u64, segment::Scan), LogError> {
        let position = match cut.cut_at(offset)? {
            Cut::At { position } => position,
            Cut::Inside { previous, next } => {
                return Err(LogError::NotBatchBoundary {
                    offset,
                    previous,
                    next,
                })
            }
        };
        let scan = segment::scan(
            &cut.data()[..position as usize],
            cut.base_offset,
            self.config.index_interval_bytes,
            true,
            min_epoch,
        );
        if let Some(reason) = scan.stop {
            return Err(LogError::Corrupt {
                file: cut.path.clone(),
                position: scan.valid_len,
                offset: scan.next_offset,
                reason: format!("truncation found a bad batch in the part it keeps: {reason}"),
            });
        }
        Ok((position, scan))
    }

    /// Writes `kept` (the first bytes of the segment being cut) to `temp` and fsyncs it.
    fn write_copy(&self, temp: &Path, kept: &[u8]) -> Result<Arc<dyn SegmentFile>, LogError> {
        match std::fs::remove_file(temp) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(LogError::io("removing leftover", temp, e)),
        }
        let file = self
            .options
            .opener
            .open(temp, true)
            .map_err(|e| LogError::io("creating the truncated segment", temp, e))?;
        if !kept.is_empty() {
            file.write_all_at(&[], kept, 0)
                .map_err(|e| LogError::io("writing the truncated segment", temp, e))?;
        }
        file.sync_data()
            .map_err(|e| LogError::io("syncing the truncated segment", temp, e))?;
        Ok(file)
    }

    /// Persists a recovery point of at most `offset` (it may go down, unlike the usual
    /// monotonic one).
    fn lower_recovery_point(&self, offset: u64) -> Result<(), LogError> {
        let mut last = self.last_recovery_point.lock();
        if last.0 <= offset {
            return Ok(());
        }
        checkpoint::write_recovery_point(&self.dir, offset)
            .map_err(|e| LogError::io("writing the recovery point in", &self.dir, e))?;
        *last = (offset, Instant::now());
        Ok(())
    }

    /// Readers stop seeing anything at or after `offset`.
    fn clamp_visible(&self, offset: u64) {
        self.visible_offset.fetch_min(offset, Ordering::AcqRel);
        self.visible_tx.send_if_modified(|current| {
            if *current > offset {
                *current = offset;
                true
            } else {
                false
            }
        });
    }

    /// If the manifest lists the segment at `base`, commits one whose compacted prefix ends
    /// there (the segment and everything after it leave it), like retention does.
    fn unlist(&self, base: u64, steps: &mut Steps) -> Result<(), LogError> {
        let mut manifest = self.manifest.lock();
        // Every listed segment starts below `clean_end`.
        if manifest.clean_end <= base {
            return Ok(());
        }
        let shortened = Manifest {
            clean_end: manifest.clean_end.min(base),
            segments: manifest
                .segments
                .iter()
                .copied()
                .filter(|name| name.base < base)
                .collect(),
            ..manifest.clone()
        };
        shortened
            .write(&self.dir)
            .map_err(|e| self.poison("truncation: writing the segment manifest", &e))?;
        *manifest = shortened;
        drop(manifest);
        steps.step(self)
    }
}
