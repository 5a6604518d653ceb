//! One segment: a `<base>.log` file of whole batches, mapped once, plus its two indexes.
//!
//! ## Byte map
//! `<base-offset:020>.log` is the plain concatenation of record batches exactly as producers
//! encoded them (layout in `syncline_proto::batch`), each with its base offset stamped. No
//! segment header: the file name carries the base offset, the first batch starts at byte 0,
//! and batch k+1's base offset is batch k's next offset (the log's contiguity invariant; a
//! future cleaner keeps it by widening batches over the offsets it removes).
//!
//! ## Mapping and readers
//! The whole segment is mapped read-only once (`segment_bytes_max` for the active segment, the
//! file length for sealed ones) and wrapped in a [`Bytes`], so a read is `Bytes::slice` of the
//! mapping: no copy, no decoding. Readers only touch `[0, len)` where `len` is published
//! (release) after the bytes are written, so they never touch pages past the end of the file.
//! The file is never shrunk while mapped. A reader's `Bytes` keeps the mapping alive even after
//! retention unlinked the file.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};

use bytes::Bytes;
use memmap2::MmapOptions;
use parking_lot::RwLock;
use syncline_proto::batch::{self, BatchHeader, HEADER_LEN};

use super::error::LogError;
use super::index::{
    decode_offset_entry, decode_time_entry, offset_entry, time_entry, OffsetIndex, TimeIndex,
    OFFSET_ENTRY_BYTES, TIME_ENTRY_BYTES,
};

/// The leader epoch [`super::Log::append`] and [`super::Log::append_batch`] stamp: a log that
/// is not replicated stays at epoch 0. A replicated log stamps the Raft term
/// ([`super::Log::append_batch_at`]). The field is always stamped (never trusted from the
/// producer); the CRC does not cover it, so recovery and reads check that epochs never go down
/// along the log, which catches most flipped bits in it.
pub(crate) const DEFAULT_LEADER_EPOCH: u32 = 0;

/// A segment's file name: its base offset and its generation. Appends write generation 0,
/// `<base:020>.log`; the cleaner writes generation g > 0, `<base:020>-<g:010>.log`, and commits
/// it through the manifest (`manifest.rs`). Zero-padded so names sort by base offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct SegmentName {
    pub(crate) base: u64,
    pub(crate) generation: u64,
}

impl SegmentName {
    pub(crate) fn new(base: u64, generation: u64) -> Self {
        Self { base, generation }
    }

    /// Generation 0: a segment written by appends.
    pub(crate) fn appended(base: u64) -> Self {
        Self::new(base, 0)
    }

    pub(crate) fn stem(&self) -> String {
        if self.generation == 0 {
            format!("{:020}", self.base)
        } else {
            format!("{:020}-{:010}", self.base, self.generation)
        }
    }

    /// Parses a stem written by [`SegmentName::stem`].
    pub(crate) fn parse(stem: &str) -> Option<Self> {
        let (base, generation) = match stem.split_once('-') {
            Some((base, generation)) if generation.len() == 10 => {
                (base, generation.parse::<u64>().ok().filter(|g| *g > 0)?)
            }
            Some(_) => return None,
            None => (stem, 0),
        };
        if base.len() != 20 || !base.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(Self::new(base.parse().ok()?, generation))
    }

    pub(crate) fn log(&self, dir: &Path) -> PathBuf {
        dir.join(format!("{}.log", self.stem()))
    }
    pub(crate) fn index(&self, dir: &Path) -> PathBuf {
        dir.join(format!("{}.index", self.stem()))
    }
    pub(crate) fn time_index(&self, dir: &Path) -> PathBuf {
        dir.join(format!("{}.timeindex", self.stem()))
    }
}

/// Decides which batches get index entries. Append and the recovery scan share it, so a
/// rebuilt index is identical to the one written live.
#[derive(Debug, Clone, Copy)]
pub(crate) struct IndexCursor {
    last_position: u64,
    pub(crate) max_timestamp: i64,
    last_time: i64,
}

impl Default for IndexCursor {
    fn default() -> Self {
        Self {
            last_position: 0,
            max_timestamp: i64::MIN,
            last_time: i64::MIN,
        }
    }
}

impl IndexCursor {
    pub(crate) fn resume(last_position: u64, max_timestamp: i64, last_time: i64) -> Self {
        Self {
            last_position,
            max_timestamp,
            last_time,
        }
    }

    /// Observes a batch at `position`; returns the entries to store for it, if any.
    pub(crate) fn observe(
        &mut self,
        relative_offset: u32,
        position: u64,
        batch_max_timestamp: i64,
        interval: u32,
    ) -> (
        Option<[u8; OFFSET_ENTRY_BYTES]>,
        Option<[u8; TIME_ENTRY_BYTES]>,
    ) {
        self.max_timestamp = self.max_timestamp.max(batch_max_timestamp);
        if position == 0 || position - self.last_position < u64::from(interval) {
            return (None, None);
        }
        self.last_position = position;
        // Positions fit u32: segments are at most 2 GiB (LogConfig::validate).
        let offset = Some(offset_entry(relative_offset, position as u32));
        let time = if self.max_timestamp > self.last_time && relative_offset > 0 {
            self.last_time = self.max_timestamp;
            Some(time_entry(self.max_timestamp, relative_offset))
        } else {
            None
        };
        (offset, time)
    }
}

/// Result of walking a segment's batches.
#[derive(Debug)]
pub(crate) struct Scan {
    /// Bytes of whole, valid batches from the start of the walk.
    pub(crate) valid_len: u64,
    /// Offset after the last valid batch.
    pub(crate) next_offset: u64,
    pub(crate) max_timestamp: i64,
    pub(crate) offset_entries: Vec<[u8; OFFSET_ENTRY_BYTES]>,
    pub(crate) time_entries: Vec<[u8; TIME_ENTRY_BYTES]>,
    pub(crate) cursor: IndexCursor,
    /// Leader epoch of the last valid batch (the `min_epoch` passed in when there is none).
    pub(crate) last_epoch: u32,
    /// Why the walk stopped before the end of `data`, if it did.
    pub(crate) stop: Option<String>,
}

/// Walks the batches of `data` (a whole segment), checking framing, contiguous offsets,
/// relative-offset range, leader epochs that never go down (starting from `min_epoch`, the
/// epoch of the batch before the segment) and (if `verify_crc`) the CRC of each, and collects
/// index entries.
pub(crate) fn scan(
    data: &[u8],
    base_offset: u64,
    interval: u32,
    verify_crc: bool,
    min_epoch: u32,
) -> Scan {
    let mut scan = Scan {
        last_epoch: min_epoch,
        valid_len: 0,
        next_offset: base_offset,
        max_timestamp: i64::MIN,
        offset_entries: Vec::new(),
        time_entries: Vec::new(),
        cursor: IndexCursor::default(),
        stop: None,
    };
    let mut position = 0usize;
    while position < data.len() {
        let expected = Expected {
            offset: scan.next_offset,
            segment_base: base_offset,
            min_epoch: scan.last_epoch,
        };
        let header = match check_batch_at(data, position, expected, verify_crc) {
            Ok(header) => header,
            Err(reason) => {
                scan.stop = Some(reason);
                break;
            }
        };
        let relative = (header.base_offset - base_offset) as u32;
        let (offset_entry, time_entry) =
            scan.cursor
                .observe(relative, position as u64, header.max_timestamp, interval);
        scan.offset_entries.extend(offset_entry);
        scan.time_entries.extend(time_entry);
        position += header.length as usize;
        scan.valid_len = position as u64;
        scan.next_offset = header.next_offset();
        scan.last_epoch = header.leader_epoch;
    }
    scan.max_timestamp = scan.cursor.max_timestamp;
    scan
}

/// What the next batch of a walk must satisfy.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Expected {
    /// Its base offset (offsets are contiguous).
    pub(crate) offset: u64,
    /// Base offset of its segment (its last offset must be within the u32 relative range).
    pub(crate) segment_base: u64,
    /// The leader epoch of the batch before it: epochs never go down along a log (Raft terms
    /// only grow), so a lower one is damage.
    pub(crate) min_epoch: u32,
}

/// Checks the batch at `position`: header, length within `data`, base offset, leader epoch and
/// relative range as `expected` says, and the CRC.
pub(crate) fn check_batch_at(
    data: &[u8],
    position: usize,
    expected: Expected,
    verify_crc: bool,
) -> Result<BatchHeader, String> {
    let Expected {
        offset: expected_offset,
        segment_base,
        min_epoch,
    } = expected;
    let rest = &data[position..];
    if rest.len() < HEADER_LEN {
        return Err(format!(
            "{} trailing bytes are too short for a batch header",
            rest.len()
        ));
    }
    let header = BatchHeader::parse(rest).map_err(|e| e.to_string())?;
    let length = header.length as usize;
    if length > rest.len() {
        return Err(format!(
            "batch of {length} bytes runs past the end of the data ({} bytes left)",
            rest.len()
        ));
    }
    if header.base_offset != expected_offset {
        return Err(format!(
            "batch base offset {} breaks the offset sequence (expected {expected_offset})",
            header.base_offset
        ));
    }
    if header.leader_epoch < min_epoch {
        return Err(format!(
            "batch leader epoch {} is lower than the epoch {min_epoch} of the batch before it (epochs never go down along a log)",
            header.leader_epoch
        ));
    }
    if header.last_offset() - segment_base > u64::from(u32::MAX) {
        return Err(format!(
            "batch last offset {} is beyond the segment's relative offset range",
            header.last_offset()
        ));
    }
    if verify_crc {
        batch::verify(&rest[..length]).map_err(|e| e.to_string())?;
    }
    Ok(header)
}

/// Structural check of an index against its segment: entries strictly increasing, positions
/// inside the data. Cheap (no data read); used when a clean open trusts the index.
pub(crate) fn check_index(indexes: &Indexes, data_len: u64) -> Result<(), String> {
    let mut previous = (0u32, 0u32);
    for i in 0..indexes.offsets.len() {
        let (relative, position) = decode_offset_entry(&indexes.offsets.entry(i));
        if relative <= previous.0 || position <= previous.1 || u64::from(position) >= data_len {
            return Err(format!(
                "offset index entry {i} ({relative}, {position}) is out of order or past the data"
            ));
        }
        previous = (relative, position);
    }
    let mut previous = (i64::MIN, 0u32);
    for i in 0..indexes.times.len() {
        let (timestamp, relative) = decode_time_entry(&indexes.times.entry(i));
        if (i > 0 && timestamp <= previous.0) || relative <= previous.1 {
            return Err(format!("time index entry {i} is out of order"));
        }
        previous = (timestamp, relative);
    }
    Ok(())
}

pub(crate) struct Indexes {
    pub(crate) offsets: OffsetIndex,
    pub(crate) times: TimeIndex,
}

/// The read side of a segment, shared by readers and the writer.
pub(crate) struct Segment {
    pub(crate) base_offset: u64,
    pub(crate) generation: u64,
    pub(crate) path: PathBuf,
    data: Bytes,
    /// Bytes of complete batches, published after they are written.
    len: AtomicU64,
    /// Offset after the last batch.
    next_offset: AtomicU64,
    max_timestamp: AtomicI64,
    /// Leader epoch of the last batch (of the batch before the segment while it is empty).
    last_epoch: AtomicU32,
    /// Timestamp that starts the segment's age (first batch's timestamp, or creation time).
    pub(crate) created_ms: AtomicI64,
    /// `[verified_len, unverified_end)` holds batches that this process has not CRC-checked yet
    /// (after a clean open, which skips the scan); reads check them once.
    verified_len: AtomicU64,
    unverified_end: u64,
    pub(crate) indexes: RwLock<Indexes>,
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment")
            .field("base_offset", &self.base_offset)
            .field("len", &self.len())
            .field("next_offset", &self.next_offset())
            .finish()
    }
}

/// Where a cut at an offset falls in a segment ([`Segment::cut_at`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cut {
    /// At the batch that starts at byte `position`.
    At { position: u64 },
    /// Inside the batch holding offsets `[previous, next)`.
    Inside { previous: u64, next: u64 },
}

/// What a read of one segment found.
pub(crate) struct SegmentRead {
    pub(crate) bytes: Bytes,
    pub(crate) first_offset: u64,
    pub(crate) next_offset: u64,
}

/// Maps `len` bytes of `file` read-only as `Bytes` (the file may be shorter: see module doc).
pub(crate) fn map_file(file: &File, len: u64) -> io::Result<Bytes> {
    if len == 0 {
        return Ok(Bytes::new());
    }
    // SAFETY: the log owns the file (directory lock); bytes past the file's end are never read;
    // the file is never truncated below what has been published to readers while it is mapped.
    let map = unsafe { MmapOptions::new().len(len as usize).map(file)? };
    Ok(Bytes::from_owner(map))
}

pub(crate) struct SegmentParts {
    pub(crate) base_offset: u64,
    pub(crate) generation: u64,
    pub(crate) path: PathBuf,
    pub(crate) data: Bytes,
    pub(crate) len: u64,
    pub(crate) next_offset: u64,
    pub(crate) max_timestamp: i64,
    pub(crate) last_epoch: u32,
    pub(crate) created_ms: i64,
    pub(crate) verified: bool,
    pub(crate) indexes: Indexes,
}

impl Segment {
    pub(crate) fn new(parts: SegmentParts) -> Self {
        Segment {
            base_offset: parts.base_offset,
            generation: parts.generation,
            path: parts.path,
            data: parts.data,
            len: AtomicU64::new(parts.len),
            next_offset: AtomicU64::new(parts.next_offset),
            max_timestamp: AtomicI64::new(parts.max_timestamp),
            last_epoch: AtomicU32::new(parts.last_epoch),
            created_ms: AtomicI64::new(parts.created_ms),
            verified_len: AtomicU64::new(if parts.verified { parts.len } else { 0 }),
            unverified_end: if parts.verified { 0 } else { parts.len },
            indexes: RwLock::new(parts.indexes),
        }
    }

    pub(crate) fn len(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }

    pub(crate) fn name(&self) -> SegmentName {
        SegmentName::new(self.base_offset, self.generation)
    }

    /// The mapped bytes of complete batches.
    pub(crate) fn data(&self) -> Bytes {
        self.data.slice(..self.len() as usize)
    }

    pub(crate) fn next_offset(&self) -> u64 {
        self.next_offset.load(Ordering::Acquire)
    }

    pub(crate) fn max_timestamp(&self) -> i64 {
        self.max_timestamp.load(Ordering::Acquire)
    }

    /// Leader epoch of the last batch.
    pub(crate) fn last_epoch(&self) -> u32 {
        self.last_epoch.load(Ordering::Acquire)
    }

    /// Publishes a batch the writer has written at the end of the segment.
    pub(crate) fn publish(
        &self,
        new_len: u64,
        next_offset: u64,
        max_timestamp: i64,
        leader_epoch: u32,
    ) {
        self.max_timestamp
            .fetch_max(max_timestamp, Ordering::AcqRel);
        self.last_epoch.store(leader_epoch, Ordering::Release);
        self.next_offset.store(next_offset, Ordering::Release);
        self.len.store(new_len, Ordering::Release);
    }

    /// Start position and offset for a read of `offset`: the closest index entry at or below.
    fn seek(&self, offset: u64) -> (usize, u64) {
        let relative = offset
            .saturating_sub(self.base_offset)
            .min(u64::from(u32::MAX)) as u32;
        let indexes = self.indexes.read();
        match indexes
            .offsets
            .floor_by(relative, |e| decode_offset_entry(e).0)
        {
            Some(i) => {
                let (rel, position) = decode_offset_entry(&indexes.offsets.entry(i));
                if u64::from(position) >= self.len() {
                    // An entry past the data cannot be right; walking from the start is.
                    tracing::warn!(path = %self.path.display(), entry = i, "index entry past the data; scanning from the segment start");
                    return (0, self.base_offset);
                }
                (position as usize, self.base_offset + u64::from(rel))
            }
            None => (0, self.base_offset),
        }
    }

    fn expected(&self, offset: u64, min_epoch: u32) -> Expected {
        Expected {
            offset,
            segment_base: self.base_offset,
            min_epoch,
        }
    }

    fn corrupt(&self, position: usize, offset: u64, reason: String) -> LogError {
        LogError::Corrupt {
            file: self.path.clone(),
            position: position as u64,
            offset,
            reason,
        }
    }

    /// Whole batches containing offsets `>= from` and `< upper`, at most `max_bytes` (but at
    /// least one batch), as one slice of the mapping. `None` when this segment has none.
    pub(crate) fn read(
        &self,
        from: u64,
        max_bytes: usize,
        upper: u64,
    ) -> Result<Option<SegmentRead>, LogError> {
        let len = self.len() as usize;
        let data = &self.data[..len];
        let (mut position, mut expected) = self.seek(from);
        let mut start: Option<(usize, u64)> = None;
        // The epoch before the seek position is unknown: epochs are checked from there on.
        let mut epoch = 0;
        // Offsets are contiguous, so the walk stops before it parses a batch at or past
        // `upper` (bytes past what the caller may see are never touched).
        while position < len && expected < upper {
            let header = check_batch_at(data, position, self.expected(expected, epoch), false)
                .map_err(|reason| self.corrupt(position, expected, reason))?;
            epoch = header.leader_epoch;
            let batch_end = position + header.length as usize;
            if header.next_offset() > from {
                if let Some((start_position, _)) = start {
                    if batch_end - start_position > max_bytes {
                        break;
                    }
                }
                // Only batches that are returned need their CRC checked.
                self.verify_once(data, position, &header)?;
                start.get_or_insert((position, header.base_offset));
            }
            position = batch_end;
            expected = header.next_offset();
        }
        Ok(start
            .map(|(start_position, first_offset)| SegmentRead {
                bytes: self.data.slice(start_position..position.min(len)),
                first_offset,
                next_offset: expected,
            })
            .filter(|read| !read.bytes.is_empty()))
    }

    /// CRC-checks a batch about to be returned, unless this process already checked it (it
    /// appended it, scanned it at recovery, or a read checked it before: see `verified_len`).
    fn verify_once(
        &self,
        data: &[u8],
        position: usize,
        header: &BatchHeader,
    ) -> Result<(), LogError> {
        let pos = position as u64;
        if pos < self.verified_len.load(Ordering::Acquire) || pos >= self.unverified_end {
            return Ok(());
        }
        let end = position + header.length as usize;
        batch::verify(&data[position..end])
            .map_err(|e| self.corrupt(position, header.base_offset, e.to_string()))?;
        // Advance the watermark only when contiguous; otherwise a later read re-checks.
        let _ = self.verified_len.compare_exchange(
            pos,
            end as u64,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        Ok(())
    }

    /// Where a cut at `offset` (in `[base_offset, next_offset]`) falls: at a batch boundary
    /// (its byte position) or inside a batch (its first offset and the offset after it).
    pub(crate) fn cut_at(&self, offset: u64) -> Result<Cut, LogError> {
        let len = self.len() as usize;
        let data = &self.data[..len];
        let (mut position, mut expected) = self.seek(offset);
        let mut epoch = 0;
        loop {
            if expected == offset {
                return Ok(Cut::At {
                    position: position as u64,
                });
            }
            if position >= len {
                return Err(self.corrupt(
                    position,
                    expected,
                    format!("the segment ends at offset {expected}, before offset {offset}"),
                ));
            }
            let header = check_batch_at(data, position, self.expected(expected, epoch), false)
                .map_err(|reason| self.corrupt(position, expected, reason))?;
            epoch = header.leader_epoch;
            if header.next_offset() > offset {
                return Ok(Cut::Inside {
                    previous: header.base_offset,
                    next: header.next_offset(),
                });
            }
            position += header.length as usize;
            expected = header.next_offset();
        }
    }

    /// Base offset of the first batch whose max timestamp is `>= timestamp` and whose base
    /// offset is `< upper`.
    pub(crate) fn find_timestamp(
        &self,
        timestamp: i64,
        upper: u64,
    ) -> Result<Option<u64>, LogError> {
        let start_relative = {
            let indexes = self.indexes.read();
            indexes
                .times
                .floor_by(timestamp.saturating_sub(1), |e| decode_time_entry(e).0)
                .map(|i| decode_time_entry(&indexes.times.entry(i)).1)
        };
        let from = self.base_offset + u64::from(start_relative.unwrap_or(0));
        let len = self.len() as usize;
        let data = &self.data[..len];
        let (mut position, mut expected) = self.seek(from);
        let mut epoch = 0;
        while position < len && expected < upper {
            let header = check_batch_at(data, position, self.expected(expected, epoch), false)
                .map_err(|reason| self.corrupt(position, expected, reason))?;
            epoch = header.leader_epoch;
            if header.max_timestamp >= timestamp {
                return Ok(Some(header.base_offset));
            }
            position += header.length as usize;
            expected = header.next_offset();
        }
        Ok(None)
    }

    /// Walks batch headers (no CRC) from the last offset-index entry to `file_len`: the cheap
    /// consistency check of a clean open. `min_epoch` is the epoch of the batch before the
    /// segment (checked when the walk starts at the segment's first batch). Returns (next
    /// offset, max timestamp, cursor, leader epoch of the last batch or `min_epoch`).
    pub(crate) fn walk_tail(
        data: &[u8],
        base_offset: u64,
        indexes: &Indexes,
        min_epoch: u32,
    ) -> Result<(u64, i64, IndexCursor, u32), String> {
        let (mut position, mut expected) = match indexes.offsets.len() {
            0 => (0usize, base_offset),
            n => {
                let (rel, position) = decode_offset_entry(&indexes.offsets.entry(n - 1));
                (position as usize, base_offset + u64::from(rel))
            }
        };
        let last_time = match indexes.times.len() {
            0 => i64::MIN,
            n => decode_time_entry(&indexes.times.entry(n - 1)).0,
        };
        if position > data.len() {
            return Err(format!(
                "index entry points at byte {position}, past the end of the data ({} bytes)",
                data.len()
            ));
        }
        let cursor_position = position as u64;
        let mut max_timestamp = last_time;
        let mut epoch = if position == 0 { min_epoch } else { 0 };
        while position < data.len() {
            let next = Expected {
                offset: expected,
                segment_base: base_offset,
                min_epoch: epoch,
            };
            let header = check_batch_at(data, position, next, false)?;
            epoch = header.leader_epoch;
            max_timestamp = max_timestamp.max(header.max_timestamp);
            position += header.length as usize;
            expected = header.next_offset();
        }
        Ok((
            expected,
            max_timestamp,
            IndexCursor::resume(cursor_position, max_timestamp, last_time),
            epoch,
        ))
    }
}
