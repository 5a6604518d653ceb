//! The write path: append (validate, stamp, reserve, write, index), segment rolls, group-commit
//! durability (`sync`, the flusher, the recovery point) and close. The fault model is in the
//! module doc of `log/mod.rs`.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use syncline_proto::batch;
use tokio::sync::{watch, Notify};

use super::checkpoint::{self, CleanMarker};
use super::segment::{self, IndexCursor};
use super::{Appended, FsyncPolicy, Log, LogError, Visibility, Writer};

impl Log {
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
        self.append_verified(batch, header, segment::DEFAULT_LEADER_EPOCH)
    }

    /// Appends a batch the caller already verified ([`batch::Batch::parse`] checks framing and
    /// CRC), so the CRC is computed once per produce. Stamps leader epoch 0.
    pub fn append_batch(&self, batch: &batch::Batch) -> Result<Appended, LogError> {
        self.append_batch_at(batch, segment::DEFAULT_LEADER_EPOCH)
    }

    /// Like [`Log::append_batch`], stamping `leader_epoch` (the Raft term of the entry that
    /// carries the batch) instead of 0. Epochs never go down along a log: an epoch below the
    /// last batch's is refused with [`LogError::EpochRegressed`] and nothing is appended.
    pub fn append_batch_at(
        &self,
        batch: &batch::Batch,
        leader_epoch: u32,
    ) -> Result<Appended, LogError> {
        let bytes = batch.as_bytes();
        if bytes.len() > self.config.batch_bytes_max as usize {
            return Err(LogError::BatchTooLarge {
                size: bytes.len(),
                max: self.config.batch_bytes_max,
            });
        }
        self.append_verified(bytes, *batch.header(), leader_epoch)
    }

    fn append_verified(
        &self,
        batch: &[u8],
        header: batch::BatchHeader,
        leader_epoch: u32,
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
        let last_epoch = writer.active.last_epoch();
        if leader_epoch < last_epoch {
            return Err(LogError::EpochRegressed {
                dir: self.dir.clone(),
                epoch: leader_epoch,
                last_epoch,
            });
        }
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
        let prefix = batch::stamped_prefix(base_offset, header.length, leader_epoch);
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
        active.publish(needed, last_offset + 1, header.max_timestamp, leader_epoch);
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
    pub(super) fn roll(&self, writer: &mut Writer) -> Result<(), LogError> {
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
        let (segment, file) = Self::create_segment(
            &self.dir,
            base,
            old.last_epoch(),
            &self.config,
            &self.options,
            now,
        )?;
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
        self.mark_synced(base);
        self.persist_recovery_point(base);
        tracing::debug!(dir = %self.dir.display(), base, "rolled segment");
        Ok(())
    }

    /// Persists `offset` as the recovery point unless a larger one is already persisted. All
    /// writers (roll, flusher, close) go through here, under one lock, so the temp file is never
    /// shared and the point never moves backwards.
    pub(super) fn persist_recovery_point(&self, offset: u64) -> bool {
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

    /// Everything below `offset` was fsync'd; with [`Visibility::Synced`] it becomes visible.
    pub(super) fn mark_synced(&self, offset: u64) {
        self.synced_offset.fetch_max(offset, Ordering::AcqRel);
        if self.visibility == Visibility::Synced {
            self.raise_visible(offset);
        }
    }

    fn raise_visible(&self, offset: u64) {
        self.visible_offset.fetch_max(offset, Ordering::AcqRel);
        // Monotonic under concurrent publishers: a smaller value never overwrites a larger one.
        self.visible_tx.send_if_modified(|current| {
            if offset > *current {
                *current = offset;
                true
            } else {
                false
            }
        });
    }

    /// With [`Visibility::Published`]: makes everything below `offset` (clamped to the end
    /// offset; publish batch ends) visible to readers — `read`, `wait_durable`,
    /// `subscribe_durable`, `durable_offset`, retention — whether or not it is fsync'd yet.
    /// Monotonic: a lower offset than the current one changes nothing. Returns the visible
    /// offset. With [`Visibility::Synced`] fsync moves the visible offset and this does
    /// nothing.
    pub fn publish(&self, offset: u64) -> u64 {
        if self.visibility == Visibility::Published {
            // Under the writer lock, so a concurrent `truncate_to` cannot leave a visible
            // offset past the end it cut to.
            let _writer = self.writer.lock();
            self.raise_visible(offset.min(self.end_offset()));
        }
        self.durable_offset()
    }

    /// Makes everything appended so far fsync'd, sharing the fsync with concurrent callers
    /// (group commit); with [`Visibility::Synced`] it also becomes visible. Returns the synced
    /// offset. With [`Visibility::Published`] it also persists the recovery point (the owner
    /// calls this rarely, at its checkpoints). Blocking: call it from a blocking thread.
    pub fn sync(&self) -> Result<u64, LogError> {
        let target = self.end_offset();
        if self.synced_offset() >= target {
            return Ok(self.synced_offset());
        }
        let _turn = self.sync_lock.lock();
        // Whoever held the lock before us may have covered our target already.
        if self.synced_offset() >= target {
            return Ok(self.synced_offset());
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
        self.mark_synced(end);
        if self.visibility == Visibility::Published {
            self.persist_recovery_point(end);
        }
        Ok(self.synced_offset())
    }

    /// Resolves once everything below `offset` is visible (e.g. `Appended::durable_target`):
    /// fsync'd with [`Visibility::Synced`] (needs a running flusher ([`Log::spawn_flusher`]) or
    /// someone calling [`Log::sync`]), published with [`Visibility::Published`].
    pub async fn wait_durable(&self, offset: u64) -> Result<u64, LogError> {
        let mut rx = self.visible_tx.subscribe();
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

    /// A receiver that changes whenever the visible offset ([`Log::durable_offset`]) grows
    /// (what long-polls and subscriptions wait on).
    pub fn subscribe_durable(&self) -> watch::Receiver<u64> {
        self.visible_tx.subscribe()
    }

    /// Starts the background group commit on the current tokio runtime. It ends when the log is
    /// closed, poisoned or dropped. With [`Visibility::Published`] there is nothing for it to
    /// do (the owner syncs at its checkpoints; rolls fsync the old segment): it ends at once.
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
            self.persist_recovery_point(self.synced_offset());
        }
    }

    /// Flushes everything, records a clean shutdown and refuses further appends. The next open
    /// skips the recovery scan. Idempotent.
    pub fn close(&self) -> Result<(), LogError> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.dirty.notify_one();
        if self.poisoned.load(Ordering::Acquire) {
            self.visible_tx.send_modify(|_| {});
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
        self.mark_synced(end);
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
        self.visible_tx.send_modify(|_| {});
        tracing::info!(dir = %self.dir.display(), end, "closed log");
        Ok(())
    }
}

async fn flusher(log: Weak<Log>, dirty: Arc<Notify>) {
    loop {
        let policy = {
            let Some(log) = log.upgrade() else { return };
            if log.closed.load(Ordering::Acquire) || log.poisoned.load(Ordering::Acquire) {
                return;
            }
            if log.visibility == Visibility::Published {
                return;
            }
            if log.end_offset() <= log.synced_offset() {
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
