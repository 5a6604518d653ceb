//! The read side: reads below the visible offset, timestamp lookups, and retention.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;

use super::{file, remove_segment_files, Log, LogError, ReadBatches, RetentionOutcome};

impl Log {
    /// Notes that a reader is about to take the segment list and touch mappings (see
    /// `served` and `truncate.rs`). Before the list is taken, and sequentially consistent with
    /// the check in `truncate_to`.
    pub(super) fn mark_served(&self) {
        if !self.served.load(Ordering::Relaxed) {
            self.served.store(true, Ordering::SeqCst);
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
        self.mark_served();
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
        self.mark_served();
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
            // Never past what readers may see, nor past what is fsync'd.
            let keep_from = self.durable_offset().min(self.synced_offset());
            if !(over_size || too_old) || segment.next_offset() > keep_from {
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
}
