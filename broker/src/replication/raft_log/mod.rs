//! A partition's Raft log: segment files of binary records under `<partition dir>/raft/`,
//! appended with group commit, read back from a bounded in-memory cache or with `pread`.
//!
//! This log carries every produced batch of a replicated partition (up to hundreds of MB/s) and
//! a node holds up to ~1,000 of them, so unlike the controller's JSON log
//! ([`crate::cluster::log_store`]) it keeps only a 16-byte slot per live entry in memory, plus
//! the most recent entries up to [`RaftLogLimits::cache_bytes_max`].
//!
//! ## Files
//! ```text
//! <dir>/<first index:020>.rlog   segment files, in index order, rolled at segment_bytes_max
//! <dir>/meta                     vote, committed log id, last purged log id
//! ```
//!
//! ## A record's bytes (all integers little-endian)
//! ```text
//! record := len: u32 (bytes after this field, 21 ..= 21 + record_bytes_max)
//!         | crc32c: u32 (CRC-32C, Castagnoli, of everything after this field: index .. payload)
//!         | index: u64 | term: u64
//!         | kind: u8 (0 blank, 1 normal, 2 membership)
//!         | payload (blank: empty; normal: a Proposal's bytes, see `types.rs`;
//!                    membership: JSON of openraft's Membership<u64, BasicNode>)
//! ```
//! A segment holds consecutive indexes starting at the index in its name, with terms that never
//! go down; the next segment starts at the index after the previous one's last.
//!
//! ## `meta`
//! ```text
//! meta := crc32c: u32 (of the JSON) | JSON {"vote": Vote?, "committed": LogId?, "purged": LogId?}
//! ```
//! Written whole (temp file, fsync, rename, directory fsync) by `save_vote`, `purge` and
//! `truncate_after` when it changes. `save_committed` is lazy: it updates memory and is persisted
//! with the next meta write (votes, purges), so the committed id read after a restart may be
//! older than the last one saved, never newer than the log. openraft documents that as allowed;
//! the partition layer re-applies from its snapshot either way.
//!
//! ## Fault model
//! - `append` encodes the entries and writes them with one `pwrite` at the end of the active
//!   segment, then returns (the entries are readable from the cache and the page cache). Its
//!   callback is called only after an `fdatasync` of every segment file written covers them:
//!   one flush at a time runs on tokio's blocking pool and takes every callback queued while
//!   the previous one ran (group commit); callbacks complete in append order.
//! - Rolling a segment fsyncs the sealed one and then the directory after creating the next, on
//!   the caller's task, so a sealed segment is always complete on disk before any byte of its
//!   successor is written (a torn record can only be in the last segment).
//! - A failed write or fsync poisons the log: that append's callback and every later operation
//!   get an error (after a failed fsync the kernel may have dropped the dirty pages), until the
//!   log is reopened. openraft stops the group on it.
//! - `save_vote`, `truncate_after` and `purge` first wait until every earlier append is flushed
//!   (openraft requires storage writes to complete in order), then do their work and fsync it
//!   before returning. `truncate_after` deletes whole later segments (last first, so no crash
//!   leaves a hole), cuts the one holding the new last entry at a record boundary, fsyncs it and
//!   the directory. `purge` writes `meta` with the new purged id before deleting the segments
//!   that hold only purged entries, so a crash in between leaves files that open skips.
//! - Open scans every segment in order. A record at the end of the LAST segment that is torn
//!   (shorter than its length, or a header cut short) or fails its CRC, with no valid record
//!   after it, is what a crash mid-append leaves: it was never acknowledged; the file is cut
//!   there (and fsync'd) and the cut logged with its byte count. Anything else is corruption no
//!   crash leaves and open refuses it with [`RaftLogError::Corrupt`] naming the file and byte
//!   position (dropping it could lose acknowledged entries): a bad record followed by a valid
//!   one (found by searching the rest of the file for a CRC-valid record of a following index),
//!   a bad record in a segment that is not the last, an index that does not follow the previous
//!   one (within a segment, across segments, or against the file name), a term that goes down.
//!   On ext4/xfs an append past the end makes the new size durable only with the data (ordered
//!   mode), so a torn append shows as a short file or garbage at its end, not as a hole in front
//!   of valid records.
//! - Entries at or below the last purged id found in files (a crash between the meta write and
//!   the deletes) are skipped, and segments made only of them are deleted at open.
//! - Reads check each record read from disk again: its CRC, and that index, term, kind and
//!   length are what the in-memory slot says.
//! - Only the active segment's descriptor stays open; sealed segments are reopened for each
//!   read (a node holds ~1,000 of these logs).
//!
//! ## Memory and cost
//! Per live entry 16 bytes (term, position, length and kind); the cache holds the newest
//! entries up to `cache_bytes_max` (8 MiB by default: with ~1,000 logs per node the owner
//! should call [`RaftLog::release_cached_through`] once entries are on every replica and
//! applied, so that idle partitions hold no cache). `open` reads every segment once (CRC of
//! every record), so its cost is the live log's size: the partition purges it at snapshots.
//! Appends are serialized by openraft (`&mut self`); the encoding and the `pwrite` (into the
//! page cache) run on the caller's task, the fsync on tokio's blocking pool.
//!
//! Limits: a record's payload is at most [`RaftLogLimits::record_bytes_max`] (larger appends are
//! refused, nothing written); a segment rolls at [`RaftLogLimits::segment_bytes_max`], at most
//! 1 GiB so that every record position fits the 32-bit slot field.

use std::collections::{BTreeSet, VecDeque};
use std::fmt::Debug;
use std::fs::File;
use std::io::{self, BufReader, Read as _};
use std::ops::{Bound, RangeBounds};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::{EntryPayload, OptionalSend, RaftLogReader};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::types::{log_id, term_of, Entry, LogId, Membership, PartitionRaft, Proposal, Vote};
use crate::log::file::{sync_dir, FileOpener, OsOpener, SegmentFile};

/// A segment file's extension.
pub const SEGMENT_EXTENSION: &str = "rlog";
/// The meta file's name.
pub const META_FILE: &str = "meta";
/// Bytes of a record before its payload: len, crc, index, term, kind.
pub const RECORD_HEADER_BYTES: usize = 4 + 4 + 8 + 8 + 1;
/// The `len` field of a record with an empty payload.
const LEN_MIN: u32 = (RECORD_HEADER_BYTES - 4) as u32;
/// How far past a bad record's expected index open looks for a valid record (a valid record
/// after a bad one means interior corruption). Wide enough for any batch a leader sends.
const CORRUPTION_SEARCH_INDEXES: u64 = 1 << 20;
/// Slots pack the record length and kind in one u32: the kind in the top 2 bits.
const KIND_SHIFT: u32 = 30;
const LEN_MASK: u32 = (1 << KIND_SHIFT) - 1;
/// Bytes of records one replication read returns at most (one entry at least): bounds an
/// append to a follower, however far behind it is.
pub const REPLICATION_READ_BYTES_MAX: u64 = 4 * 1024 * 1024;
/// The largest segment_bytes_max (record positions are u32 in memory).
const SEGMENT_BYTES_LIMIT: u64 = 1 << 30;
/// The largest record_bytes_max (the record length must fit the 30-bit slot field).
const RECORD_BYTES_LIMIT: u32 = 256 * 1024 * 1024;

const KIND_BLANK: u8 = 0;
const KIND_NORMAL: u8 = 1;
const KIND_MEMBERSHIP: u8 = 2;

/// Sizes of one Raft log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RaftLogLimits {
    /// A segment is rolled when the next append would take it past this (default 64 MiB; at
    /// most 1 GiB). An append larger than this gets a segment of its own.
    pub segment_bytes_max: u64,
    /// The largest payload of one entry (default 64 MiB; at most 256 MiB).
    pub record_bytes_max: u32,
    /// Bytes of the most recent entries kept in memory for replication (default 8 MiB).
    pub cache_bytes_max: usize,
}

impl Default for RaftLogLimits {
    fn default() -> Self {
        RaftLogLimits {
            segment_bytes_max: 64 * 1024 * 1024,
            record_bytes_max: 64 * 1024 * 1024,
            cache_bytes_max: 8 * 1024 * 1024,
        }
    }
}

impl RaftLogLimits {
    /// Checks each field's bounds.
    pub fn validate(&self) -> Result<(), RaftLogError> {
        if self.segment_bytes_max == 0 || self.segment_bytes_max > SEGMENT_BYTES_LIMIT {
            return Err(RaftLogError::Limits(format!(
                "segment_bytes_max is {}, must be in 1..={SEGMENT_BYTES_LIMIT}",
                self.segment_bytes_max
            )));
        }
        if self.record_bytes_max > RECORD_BYTES_LIMIT {
            return Err(RaftLogError::Limits(format!(
                "record_bytes_max is {}, must be at most {RECORD_BYTES_LIMIT}",
                self.record_bytes_max
            )));
        }
        Ok(())
    }
}

/// What went wrong in a Raft log.
#[derive(Debug, thiserror::Error)]
pub enum RaftLogError {
    /// A file operation failed.
    #[error("raft log: {action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// Damage no crash leaves: the log is refused.
    #[error(
        "raft log {} is corrupt at byte {position}: {reason}. Refusing to open it (dropping the \
         rest could lose acknowledged entries); remove the partition's raft directory on this \
         replica so that it catches up from the leader",
        path.display()
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Byte position in it.
        position: u64,
        /// What is wrong.
        reason: String,
    },
    /// An earlier write or fsync failed; nothing is written or acknowledged until reopened.
    #[error("raft log {} is poisoned by an earlier failure: {reason}", dir.display())]
    Poisoned {
        /// The log's directory.
        dir: PathBuf,
        /// The failure.
        reason: String,
    },
    /// An entry is larger than `record_bytes_max` (or cannot be encoded).
    #[error("raft log entry {index}: {reason}")]
    BadEntry {
        /// The entry's index.
        index: u64,
        /// Why.
        reason: String,
    },
    /// An append that does not continue the log.
    #[error("raft log append at index {got}, the log continues at {expected}")]
    NotContiguous {
        /// The next index of the log.
        expected: u64,
        /// The first index appended.
        got: u64,
    },
    /// Limits out of bounds.
    #[error("raft log limits: {0}")]
    Limits(String),
}

impl RaftLogError {
    fn io(action: &'static str, path: &Path, source: io::Error) -> Self {
        RaftLogError::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    }

    fn corrupt(path: &Path, position: u64, reason: impl Into<String>) -> Self {
        RaftLogError::Corrupt {
            path: path.to_path_buf(),
            position,
            reason: reason.into(),
        }
    }
}

impl From<RaftLogError> for io::Error {
    fn from(error: RaftLogError) -> Self {
        let kind = match &error {
            RaftLogError::Io { source, .. } => source.kind(),
            RaftLogError::Corrupt { .. } => io::ErrorKind::InvalidData,
            RaftLogError::BadEntry { .. }
            | RaftLogError::NotContiguous { .. }
            | RaftLogError::Limits(_) => io::ErrorKind::InvalidInput,
            RaftLogError::Poisoned { .. } => io::ErrorKind::Other,
        };
        io::Error::new(kind, error.to_string())
    }
}

/// A live entry's place: 16 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    term: u64,
    /// Byte position of the record in its segment.
    position: u32,
    /// The record's total length (`4 + len`) in the low 30 bits, its kind in the top 2.
    len_kind: u32,
}

// The in-memory cost per live entry that the module doc promises.
const _: () = assert!(std::mem::size_of::<Slot>() == 16);

impl Slot {
    fn new(term: u64, position: u32, record_len: u32, kind: u8) -> Slot {
        Slot {
            term,
            position,
            len_kind: record_len | (u32::from(kind) << KIND_SHIFT),
        }
    }
    fn record_len(&self) -> u32 {
        self.len_kind & LEN_MASK
    }
    fn kind(&self) -> u8 {
        (self.len_kind >> KIND_SHIFT) as u8
    }
}

/// What `meta` holds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Meta {
    vote: Option<Vote>,
    committed: Option<LogId>,
    purged: Option<LogId>,
}

/// The segment being appended to.
#[derive(Debug)]
struct Active {
    first: u64,
    file: Arc<dyn SegmentFile>,
    len: u64,
}

#[derive(Debug)]
struct State {
    meta: Meta,
    /// `meta` as last written to disk.
    meta_on_disk: Meta,
    /// Index of `slots[0]` (the next index when `slots` is empty).
    first_index: u64,
    slots: VecDeque<Slot>,
    /// First indexes of the segment files, the active one included.
    segments: BTreeSet<u64>,
    active: Option<Active>,
    /// The most recent entries (a suffix of the log) with their record lengths.
    cache: VecDeque<(Entry, u32)>,
    cache_bytes: usize,
    /// Bumped by truncations and purges, so that a reader that failed can tell a file changed
    /// under it from corruption.
    generation: u64,
    /// Sequence number of the last append (flushes report the sequence they covered).
    appended_seq: u64,
}

impl State {
    fn next_index(&self) -> u64 {
        self.first_index + self.slots.len() as u64
    }

    fn last_log_id(&self) -> Option<LogId> {
        match self.slots.back() {
            Some(slot) => Some(log_id(slot.term, self.next_index() - 1)),
            None => self.meta.purged,
        }
    }

    fn slot(&self, index: u64) -> Option<&Slot> {
        index
            .checked_sub(self.first_index)
            .and_then(|i| self.slots.get(i as usize))
    }

    /// Index of the first cached entry.
    fn cache_first(&self) -> u64 {
        self.next_index() - self.cache.len() as u64
    }

    fn segment_of(&self, index: u64) -> Option<u64> {
        self.segments.range(..=index).next_back().copied()
    }
}

/// Consecutive records of one segment to read.
struct Run {
    segment: u64,
    /// The open file when the segment is the active one.
    file: Option<Arc<dyn SegmentFile>>,
    first: u64,
    slots: Vec<Slot>,
}

/// One flush waiting: the files to fsync and the callback to complete after.
struct Pending {
    seq: u64,
    file: Arc<dyn SegmentFile>,
    callback: IOFlushed<PartitionRaft>,
}

#[derive(Default)]
struct FlushQueue {
    waiting: Vec<Pending>,
    running: bool,
}

struct Shared {
    dir: PathBuf,
    limits: RaftLogLimits,
    opener: Arc<dyn FileOpener>,
    state: Mutex<State>,
    flush: Mutex<FlushQueue>,
    /// The last append sequence whose flush finished (well or not).
    flushed: watch::Sender<u64>,
    poison: OnceLock<String>,
}

/// A partition's Raft log (see the module doc). Cheap to clone: clones share one log, and the
/// log reader openraft asks for is such a clone.
#[derive(Clone)]
pub struct RaftLog {
    shared: Arc<Shared>,
}

impl Debug for RaftLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftLog")
            .field("dir", &self.shared.dir)
            .finish_non_exhaustive()
    }
}

fn segment_name(first: u64) -> String {
    format!("{first:020}.{SEGMENT_EXTENSION}")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_EXTENSION)?.strip_suffix('.')?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Appends `entry`'s record to `out`; returns its total length.
fn encode_record(
    entry: &Entry,
    out: &mut Vec<u8>,
    record_bytes_max: u32,
) -> Result<u32, RaftLogError> {
    let index = entry.log_id.index;
    let start = out.len();
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&index.to_le_bytes());
    out.extend_from_slice(&term_of(&entry.log_id).to_le_bytes());
    match &entry.payload {
        EntryPayload::Blank => out.push(KIND_BLANK),
        EntryPayload::Normal(proposal) => {
            out.push(KIND_NORMAL);
            proposal.encode(out);
        }
        EntryPayload::Membership(membership) => {
            out.push(KIND_MEMBERSHIP);
            serde_json::to_writer(&mut *out, membership).map_err(|e| RaftLogError::BadEntry {
                index,
                reason: format!("membership does not encode: {e}"),
            })?;
        }
    }
    let payload = out.len() - start - RECORD_HEADER_BYTES;
    if payload > record_bytes_max as usize {
        out.truncate(start);
        return Err(RaftLogError::BadEntry {
            index,
            reason: format!("{payload} bytes, at most {record_bytes_max}"),
        });
    }
    let len = (out.len() - start - 4) as u32;
    let crc = crc32c::crc32c(&out[start + 8..]);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Ok(len + 4)
}

/// A record's fixed fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    index: u64,
    term: u64,
    kind: u8,
}

/// Checks the record that `bytes` starts with (`bytes` may run past it); returns its header and
/// total length, or why it is bad (`None` for a torn record: shorter than its header or length).
fn check_record(bytes: &[u8], record_bytes_max: u32) -> Result<(Header, usize), Option<String>> {
    if bytes.len() < 4 {
        return Err(None);
    }
    let len = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    if len < LEN_MIN || len - LEN_MIN > record_bytes_max {
        return Err(Some(format!("record length {len} out of bounds")));
    }
    let total = 4 + len as usize;
    if bytes.len() < total {
        return Err(None);
    }
    let crc = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    if crc32c::crc32c(&bytes[8..total]) != crc {
        return Err(Some("checksum mismatch".into()));
    }
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[8..16]);
    let index = u64::from_le_bytes(word);
    word.copy_from_slice(&bytes[16..24]);
    let term = u64::from_le_bytes(word);
    let kind = bytes[24];
    if kind > KIND_MEMBERSHIP {
        return Err(Some(format!("unknown entry kind {kind}")));
    }
    Ok((Header { index, term, kind }, total))
}

/// Decodes a checked record's payload into an entry.
fn decode_entry(header: Header, payload: Bytes) -> Result<Entry, String> {
    let payload = match header.kind {
        KIND_BLANK if payload.is_empty() => EntryPayload::Blank,
        KIND_BLANK => {
            return Err(format!(
                "a blank entry with {} payload bytes",
                payload.len()
            ))
        }
        KIND_NORMAL => EntryPayload::Normal(Proposal::decode(payload).map_err(|e| e.to_string())?),
        _ => EntryPayload::Membership(
            serde_json::from_slice::<Membership>(&payload)
                .map_err(|e| format!("membership: {e}"))?,
        ),
    };
    Ok(Entry {
        log_id: log_id(header.term, header.index),
        payload,
    })
}

fn read_meta(dir: &Path) -> Result<Meta, RaftLogError> {
    let path = dir.join(META_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Meta::default()),
        Err(error) => return Err(RaftLogError::io("reading", &path, error)),
    };
    if bytes.len() < 4 {
        return Err(RaftLogError::corrupt(&path, 0, "shorter than its checksum"));
    }
    let crc = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    if crc32c::crc32c(&bytes[4..]) != crc {
        return Err(RaftLogError::corrupt(&path, 0, "checksum mismatch"));
    }
    serde_json::from_slice(&bytes[4..]).map_err(|e| RaftLogError::corrupt(&path, 4, e.to_string()))
}

fn write_meta(dir: &Path, meta: &Meta) -> Result<(), RaftLogError> {
    let path = dir.join(META_FILE);
    let json = serde_json::to_vec(meta)
        .map_err(|e| RaftLogError::io("encoding", &path, io::Error::other(e)))?;
    let mut bytes = Vec::with_capacity(4 + json.len());
    bytes.extend_from_slice(&crc32c::crc32c(&json).to_le_bytes());
    bytes.extend_from_slice(&json);
    crate::log::write_file_atomically(dir, META_FILE, &bytes)
        .map_err(|e| RaftLogError::io("writing", &path, e))
}

/// What scanning one segment found.
struct Scanned {
    /// (index, slot) of every valid record.
    records: Vec<(u64, Slot)>,
    /// Bytes of valid records.
    valid_len: u64,
    /// Bytes in the file.
    file_len: u64,
}

/// Scans one segment; `expected` is the index its first record must have, `last_term` the term
/// of the record before it. Returns its records, and cuts nothing (the caller decides).
fn scan_segment(
    path: &Path,
    first: u64,
    mut last_term: u64,
    is_last: bool,
    limits: &RaftLogLimits,
) -> Result<Scanned, RaftLogError> {
    let file = File::open(path).map_err(|e| RaftLogError::io("opening", path, e))?;
    let file_len = file
        .metadata()
        .map_err(|e| RaftLogError::io("reading the size of", path, e))?
        .len();
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut records = Vec::new();
    let mut position = 0u64;
    let mut expected = first;
    let mut buffer = Vec::new();
    // Why the record at `position` is bad, if it is.
    let bad: Option<String> = loop {
        if position == file_len {
            break None;
        }
        let mut len_bytes = [0u8; 4];
        let available = (file_len - position).min(4) as usize;
        if let Err(error) = reader.read_exact(&mut len_bytes[..available]) {
            return Err(RaftLogError::io("reading", path, error));
        }
        if available < 4 {
            break Some("a record header cut short".into());
        }
        let len = u32::from_le_bytes(len_bytes);
        if len < LEN_MIN || len - LEN_MIN > limits.record_bytes_max {
            break Some(format!("record length {len} out of bounds"));
        }
        let total = 4 + u64::from(len);
        if position + total > file_len {
            break Some(format!(
                "a record of {total} bytes with {} left in the file",
                file_len - position
            ));
        }
        buffer.clear();
        buffer.extend_from_slice(&len_bytes);
        buffer.resize(total as usize, 0);
        reader
            .read_exact(&mut buffer[4..])
            .map_err(|e| RaftLogError::io("reading", path, e))?;
        let header = match check_record(&buffer, limits.record_bytes_max) {
            Ok((header, _)) => header,
            Err(reason) => break Some(reason.unwrap_or_else(|| "torn".into())),
        };
        // A valid record in the wrong place is no torn write: corruption wherever it is.
        if header.index != expected {
            return Err(RaftLogError::corrupt(
                path,
                position,
                format!("record of index {}, expected {expected}", header.index),
            ));
        }
        if header.term < last_term {
            return Err(RaftLogError::corrupt(
                path,
                position,
                format!(
                    "index {} has term {}, lower than the term {last_term} before it",
                    header.index, header.term
                ),
            ));
        }
        if position + total > u64::from(u32::MAX) {
            return Err(RaftLogError::corrupt(
                path,
                position,
                "a segment longer than 4 GiB (this log writes at most 1 GiB plus one append)",
            ));
        }
        last_term = header.term;
        records.push((
            header.index,
            Slot::new(header.term, position as u32, total as u32, header.kind),
        ));
        expected += 1;
        position += total;
    };
    if let Some(reason) = bad {
        if !is_last {
            return Err(RaftLogError::corrupt(
                path,
                position,
                format!("{reason}, in a segment that is not the last"),
            ));
        }
        // A torn tail, unless a valid record of a following index comes after it.
        let mut rest = Vec::new();
        let mut file = File::open(path).map_err(|e| RaftLogError::io("opening", path, e))?;
        std::io::Seek::seek(&mut file, io::SeekFrom::Start(position + 1))
            .map_err(|e| RaftLogError::io("seeking", path, e))?;
        file.read_to_end(&mut rest)
            .map_err(|e| RaftLogError::io("reading", path, e))?;
        if let Some(found) = find_valid_record(&rest, expected, limits.record_bytes_max) {
            return Err(RaftLogError::corrupt(
                path,
                position,
                format!(
                    "{reason}, followed by a valid record at byte {}",
                    position + 1 + found as u64
                ),
            ));
        }
    }
    Ok(Scanned {
        records,
        valid_len: position,
        file_len,
    })
}

/// The position in `bytes` of a valid record whose index is in `expected ..= expected +
/// CORRUPTION_SEARCH_INDEXES`, if there is one.
fn find_valid_record(bytes: &[u8], expected: u64, record_bytes_max: u32) -> Option<usize> {
    let last = expected.saturating_add(CORRUPTION_SEARCH_INDEXES);
    (0..bytes.len().saturating_sub(RECORD_HEADER_BYTES - 1)).find(|&at| {
        let mut word = [0u8; 8];
        word.copy_from_slice(&bytes[at + 8..at + 16]);
        let index = u64::from_le_bytes(word);
        (expected..=last).contains(&index) && check_record(&bytes[at..], record_bytes_max).is_ok()
    })
}

impl RaftLog {
    /// Opens (or creates) the log in `dir` (`<partition dir>/raft/`), cutting a torn tail and
    /// refusing interior corruption (see the module doc). Blocking file I/O.
    pub fn open(dir: &Path, limits: RaftLogLimits) -> Result<RaftLog, RaftLogError> {
        Self::open_with(dir, limits, Arc::new(OsOpener))
    }

    /// [`RaftLog::open`] with a file opener (tests inject faults with it).
    pub fn open_with(
        dir: &Path,
        limits: RaftLogLimits,
        opener: Arc<dyn FileOpener>,
    ) -> Result<RaftLog, RaftLogError> {
        limits.validate()?;
        std::fs::create_dir_all(dir).map_err(|e| RaftLogError::io("creating", dir, e))?;
        let meta = read_meta(dir)?;
        let purged_index = meta.purged.map(|id| id.index);
        let mut names: Vec<u64> = Vec::new();
        let listing = std::fs::read_dir(dir).map_err(|e| RaftLogError::io("listing", dir, e))?;
        for item in listing {
            let item = item.map_err(|e| RaftLogError::io("listing", dir, e))?;
            if let Some(first) = item.file_name().to_str().and_then(parse_segment_name) {
                names.push(first);
            }
        }
        names.sort_unstable();
        let mut removed = false;
        // Segments whose successor starts at or below purged + 1 hold only purged entries: an
        // interrupted purge. Delete them without reading.
        if let Some(purged) = purged_index {
            let mut keep_from = 0;
            for (i, window) in names.windows(2).enumerate() {
                if window[1] <= purged.saturating_add(1) {
                    keep_from = i + 1;
                }
            }
            for first in names.drain(..keep_from) {
                let path = dir.join(segment_name(first));
                std::fs::remove_file(&path).map_err(|e| RaftLogError::io("removing", &path, e))?;
                removed = true;
            }
        }

        let mut state = State {
            meta: meta.clone(),
            meta_on_disk: meta,
            first_index: purged_index.map_or(0, |p| p + 1),
            slots: VecDeque::new(),
            segments: BTreeSet::new(),
            active: None,
            cache: VecDeque::new(),
            cache_bytes: 0,
            generation: 0,
            appended_seq: 0,
        };
        let mut last: Option<(u64, u64)> = None; // (index, term) of the last record read
        let count = names.len();
        for (i, &first) in names.iter().enumerate() {
            let path = dir.join(segment_name(first));
            if let Some((index, _)) = last {
                if first != index + 1 {
                    return Err(RaftLogError::corrupt(
                        &path,
                        0,
                        format!(
                            "the segment starts at index {first}, the one before ends at {index}"
                        ),
                    ));
                }
            }
            let is_last = i + 1 == count;
            let scanned = scan_segment(
                &path,
                first,
                last.map_or(0, |(_, term)| term),
                is_last,
                &limits,
            )?;
            if scanned.valid_len < scanned.file_len {
                tracing::warn!(
                    path = %path.display(),
                    kept_bytes = scanned.valid_len,
                    dropped_bytes = scanned.file_len - scanned.valid_len,
                    "raft log: cutting a torn tail (an append the crash interrupted, never acknowledged)"
                );
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(|e| RaftLogError::io("opening", &path, e))?;
                file.set_len(scanned.valid_len)
                    .map_err(|e| RaftLogError::io("truncating", &path, e))?;
                file.sync_all()
                    .map_err(|e| RaftLogError::io("syncing", &path, e))?;
            }
            let all_purged = scanned
                .records
                .last()
                .is_none_or(|(index, _)| purged_index.is_some_and(|p| *index <= p));
            if all_purged {
                // Empty (only the last can be: created, then the crash) or only purged entries
                // (a purge the crash interrupted): nothing to keep, and appending to it could
                // leave a gap.
                if let Some((index, slot)) = scanned.records.last() {
                    last = Some((*index, slot.term));
                }
                std::fs::remove_file(&path).map_err(|e| RaftLogError::io("removing", &path, e))?;
                removed = true;
                continue;
            }
            for (index, slot) in &scanned.records {
                last = Some((*index, slot.term));
                if purged_index.is_some_and(|p| *index <= p) {
                    continue;
                }
                if state.slots.is_empty() {
                    state.first_index = *index;
                }
                state.slots.push_back(*slot);
            }
            state.segments.insert(first);
            if is_last {
                let file = opener
                    .open(&path, false)
                    .map_err(|e| RaftLogError::io("opening", &path, e))?;
                state.active = Some(Active {
                    first,
                    file,
                    len: scanned.valid_len,
                });
            }
        }
        if state.slots.is_empty() {
            state.first_index = purged_index.map_or(0, |p| p + 1);
        }
        if removed {
            sync_dir(dir).map_err(|e| RaftLogError::io("syncing", dir, e))?;
        }
        let (flushed, _) = watch::channel(0);
        Ok(RaftLog {
            shared: Arc::new(Shared {
                dir: dir.to_path_buf(),
                limits,
                opener,
                state: Mutex::new(state),
                flush: Mutex::new(FlushQueue::default()),
                flushed,
                poison: OnceLock::new(),
            }),
        })
    }

    /// The log's directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Bytes of entries held in the cache (for metrics and tests).
    pub fn cached_bytes(&self) -> usize {
        self.shared.state.lock().cache_bytes
    }

    /// Drops cached entries up to and including `index`: call it once every replica has them
    /// and they are applied (nothing will read them soon), so that an idle partition holds no
    /// cache. Later reads of them go to disk.
    pub fn release_cached_through(&self, index: u64) {
        let mut state = self.shared.state.lock();
        while state
            .cache
            .front()
            .is_some_and(|(entry, _)| entry.log_id.index <= index)
        {
            if let Some((_, len)) = state.cache.pop_front() {
                state.cache_bytes -= len as usize;
            }
        }
    }

    fn check_poison(&self) -> Result<(), RaftLogError> {
        match self.shared.poison.get() {
            Some(reason) => Err(RaftLogError::Poisoned {
                dir: self.shared.dir.clone(),
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    fn poison(&self, error: &RaftLogError) {
        let _ = self.shared.poison.set(error.to_string());
        tracing::error!(dir = %self.shared.dir.display(), %error, "raft log poisoned");
    }

    /// Waits until every append made so far is flushed.
    async fn barrier(&self) -> Result<(), RaftLogError> {
        let seq = self.shared.state.lock().appended_seq;
        let mut flushed = self.shared.flushed.subscribe();
        // The sender lives in `shared`, which `self` holds: the wait cannot see it closed.
        let _ = flushed.wait_for(|done| *done >= seq).await;
        self.check_poison()
    }

    fn path_of(&self, first: u64) -> PathBuf {
        self.shared.dir.join(segment_name(first))
    }

    /// Writes `bytes` (records of `entries`, lengths in `lens`) at the end of the log; returns
    /// the append's sequence number and the file to fsync.
    fn write_batch(
        &self,
        entries: Vec<Entry>,
        lens: &[u32],
        bytes: &[u8],
    ) -> Result<(u64, Arc<dyn SegmentFile>), RaftLogError> {
        let limits = &self.shared.limits;
        let mut state = self.shared.state.lock();
        let Some(head) = entries.first() else {
            return Err(RaftLogError::BadEntry {
                index: state.next_index(),
                reason: "an empty batch".into(),
            });
        };
        let first = head.log_id.index;
        let expected = state.next_index();
        // A log that never held an entry may start anywhere; after that it continues.
        let fresh = state.slots.is_empty() && state.meta.purged.is_none() && state.active.is_none();
        if fresh {
            state.first_index = first;
        } else if first != expected {
            return Err(RaftLogError::NotContiguous {
                expected,
                got: first,
            });
        }
        if let Some(last) = state.last_log_id() {
            let term = term_of(&head.log_id);
            if term < term_of(&last) {
                return Err(RaftLogError::BadEntry {
                    index: first,
                    reason: format!("term {term} below the log's last term {}", term_of(&last)),
                });
            }
        }
        // Roll when the batch does not fit (a batch larger than a segment gets its own).
        let roll = state.active.as_ref().is_some_and(|active| {
            active.len > 0
                && (active.len + bytes.len() as u64 > limits.segment_bytes_max
                    || active.len + bytes.len() as u64 > u64::from(u32::MAX))
        });
        if roll {
            if let Some(sealed) = state.active.take() {
                let path = self.path_of(sealed.first);
                sealed
                    .file
                    .sync_data()
                    .map_err(|e| RaftLogError::io("syncing", &path, e))?;
            }
        }
        if state.active.is_none() {
            let path = self.path_of(first);
            let file = self
                .shared
                .opener
                .open(&path, true)
                .map_err(|e| RaftLogError::io("creating", &path, e))?;
            sync_dir(&self.shared.dir)
                .map_err(|e| RaftLogError::io("syncing", &self.shared.dir, e))?;
            state.segments.insert(first);
            state.active = Some(Active {
                first,
                file,
                len: 0,
            });
        }
        let Some(active) = state.active.as_mut() else {
            return Err(RaftLogError::Limits(
                "no active segment after creating one".into(),
            ));
        };
        if active.len + bytes.len() as u64 > u64::from(u32::MAX) {
            return Err(RaftLogError::BadEntry {
                index: first,
                reason: format!(
                    "an append of {} bytes is larger than a segment can hold",
                    bytes.len()
                ),
            });
        }
        let start = active.len;
        let path = self.shared.dir.join(segment_name(active.first));
        active
            .file
            .write_all_at(bytes, &[], start)
            .map_err(|e| RaftLogError::io("writing", &path, e))?;
        active.len += bytes.len() as u64;
        let file = Arc::clone(&active.file);
        let mut position = start as u32;
        for (entry, &len) in entries.iter().zip(lens) {
            let kind = match entry.payload {
                EntryPayload::Blank => KIND_BLANK,
                EntryPayload::Normal(_) => KIND_NORMAL,
                EntryPayload::Membership(_) => KIND_MEMBERSHIP,
            };
            state
                .slots
                .push_back(Slot::new(term_of(&entry.log_id), position, len, kind));
            position += len;
        }
        for (entry, &len) in entries.into_iter().zip(lens) {
            state.cache.push_back((entry, len));
            state.cache_bytes += len as usize;
        }
        while state.cache_bytes > limits.cache_bytes_max {
            let Some((_, len)) = state.cache.pop_front() else {
                break;
            };
            state.cache_bytes -= len as usize;
        }
        state.appended_seq += 1;
        Ok((state.appended_seq, file))
    }

    /// Queues a flush of `file` for the append `seq`, starting the flusher if none runs.
    fn queue_flush(
        &self,
        seq: u64,
        file: Arc<dyn SegmentFile>,
        callback: IOFlushed<PartitionRaft>,
    ) {
        let start = {
            let mut queue = self.shared.flush.lock();
            queue.waiting.push(Pending {
                seq,
                file,
                callback,
            });
            !std::mem::replace(&mut queue.running, true)
        };
        if start {
            let log = self.clone();
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn_blocking(move || log.run_flusher());
                }
                // Outside a runtime (a synchronous caller): flush on this thread.
                Err(_) => log.run_flusher(),
            }
        }
    }

    /// Flushes queued appends until none is left: each round fsyncs every file the waiting
    /// appends wrote (once each) and completes their callbacks in order.
    fn run_flusher(&self) {
        loop {
            let batch = {
                let mut queue = self.shared.flush.lock();
                if queue.waiting.is_empty() {
                    queue.running = false;
                    return;
                }
                std::mem::take(&mut queue.waiting)
            };
            let mut result = self.check_poison();
            if result.is_ok() {
                let mut synced: Vec<&Arc<dyn SegmentFile>> = Vec::new();
                for pending in &batch {
                    if synced.iter().any(|file| Arc::ptr_eq(file, &pending.file)) {
                        continue;
                    }
                    if let Err(error) = pending.file.sync_data() {
                        let error = RaftLogError::io("syncing", &self.shared.dir, error);
                        self.poison(&error);
                        result = Err(error);
                        break;
                    }
                    synced.push(&pending.file);
                }
            }
            let last_seq = batch.last().map_or(0, |pending| pending.seq);
            for pending in batch {
                let outcome = match &result {
                    Ok(()) => Ok(()),
                    Err(error) => Err(io::Error::other(error.to_string())),
                };
                pending.callback.io_completed(outcome);
            }
            self.shared
                .flushed
                .send_modify(|done| *done = (*done).max(last_seq));
        }
    }

    /// Reads entries `[start, end)` (within the live log) from the cache and the segments.
    /// The end (exclusive) of the longest run of entries from `start` (before `end`) whose
    /// records take at most `bytes_max` bytes, one entry at least.
    fn limited_end(&self, start: u64, end: u64, bytes_max: u64) -> u64 {
        let state = self.shared.state.lock();
        let mut total = 0u64;
        for index in start.max(state.first_index)..end.min(state.next_index()) {
            let Some(slot) = state.slot(index) else {
                return end;
            };
            total += u64::from(slot.record_len());
            if total > bytes_max && index > start {
                return index;
            }
        }
        end
    }

    fn read_range(&self, start: u64, end: u64) -> Result<Vec<Entry>, RaftLogError> {
        // A truncation or purge may change a file under a read: then the read starts over.
        let mut attempts = 0;
        loop {
            attempts += 1;
            let (plan, cached, generation) = {
                let state = self.shared.state.lock();
                let start = start.max(state.first_index);
                let end = end.min(state.next_index());
                if start >= end {
                    return Ok(Vec::new());
                }
                let cache_first = state.cache_first();
                let cached: Vec<Entry> = if end > cache_first {
                    let from = start.max(cache_first);
                    state
                        .cache
                        .range((from - cache_first) as usize..(end - cache_first) as usize)
                        .map(|(entry, _)| entry.clone())
                        .collect()
                } else {
                    Vec::new()
                };
                // Runs of consecutive records of one segment to read from disk.
                let mut plan: Vec<Run> = Vec::new();
                let disk_end = end.min(cache_first);
                for index in start..disk_end {
                    let Some(slot) = state.slot(index).copied() else {
                        break;
                    };
                    let Some(segment) = state.segment_of(index) else {
                        break;
                    };
                    match plan.last_mut() {
                        Some(run) if run.segment == segment => run.slots.push(slot),
                        _ => {
                            let file = state
                                .active
                                .as_ref()
                                .filter(|active| active.first == segment)
                                .map(|active| Arc::clone(&active.file));
                            plan.push(Run {
                                segment,
                                file,
                                first: index,
                                slots: vec![slot],
                            });
                        }
                    }
                }
                (plan, cached, state.generation)
            };
            let mut entries = Vec::new();
            let mut failed = None;
            for run in plan {
                match self.read_run(run) {
                    Ok(read) => entries.extend(read),
                    Err(error) => {
                        failed = Some(error);
                        break;
                    }
                }
            }
            match failed {
                None => {
                    entries.extend(cached);
                    return Ok(entries);
                }
                Some(error) => {
                    if attempts >= 3 || self.shared.state.lock().generation == generation {
                        return Err(error);
                    }
                }
            }
        }
    }

    /// Reads and checks consecutive records of one segment.
    fn read_run(&self, run: Run) -> Result<Vec<Entry>, RaftLogError> {
        let Run {
            segment,
            file,
            first,
            slots,
        } = run;
        let path = self.path_of(segment);
        let Some(head) = slots.first() else {
            return Ok(Vec::new());
        };
        let start = u64::from(head.position);
        let span: u64 = slots.iter().map(|slot| u64::from(slot.record_len())).sum();
        let mut buffer = vec![0u8; span as usize];
        let file = match file {
            Some(file) => file,
            None => self
                .shared
                .opener
                .open(&path, false)
                .map_err(|e| RaftLogError::io("opening", &path, e))?,
        };
        file.file()
            .read_exact_at(&mut buffer, start)
            .map_err(|e| RaftLogError::io("reading", &path, e))?;
        let buffer = Bytes::from(buffer);
        let mut entries = Vec::with_capacity(slots.len());
        let mut at = 0usize;
        for (i, slot) in slots.iter().enumerate() {
            let index = first + i as u64;
            let position = start + at as u64;
            let (header, total) = check_record(&buffer[at..], self.shared.limits.record_bytes_max)
                .map_err(|reason| {
                    RaftLogError::corrupt(&path, position, reason.unwrap_or_else(|| "torn".into()))
                })?;
            let expected = Header {
                index,
                term: slot.term,
                kind: slot.kind(),
            };
            if header != expected || total != slot.record_len() as usize {
                return Err(RaftLogError::corrupt(
                    &path,
                    position,
                    format!(
                        "read {header:?} of {total} bytes, expected {expected:?} of {}",
                        slot.record_len()
                    ),
                ));
            }
            let payload = buffer.slice(at + RECORD_HEADER_BYTES..at + total);
            let entry = decode_entry(header, payload)
                .map_err(|reason| RaftLogError::corrupt(&path, position, reason))?;
            entries.push(entry);
            at += total;
        }
        Ok(entries)
    }

    /// Writes `meta` when it differs from what is on disk.
    fn persist_meta(&self, state: &mut State) -> Result<(), RaftLogError> {
        if state.meta == state.meta_on_disk {
            return Ok(());
        }
        let meta = state.meta.clone();
        if let Err(error) = write_meta(&self.shared.dir, &meta) {
            self.poison(&error);
            return Err(error);
        }
        state.meta_on_disk = meta;
        Ok(())
    }

    fn do_truncate_after(&self, last: Option<LogId>) -> Result<(), RaftLogError> {
        let mut state = self.shared.state.lock();
        let keep_next = last.map_or(0, |id| id.index + 1).max(state.first_index);
        if keep_next >= state.next_index() {
            return Ok(());
        }
        let dir = self.shared.dir.clone();
        let cut_segment = state.segment_of(keep_next);
        let doomed: Vec<u64> = state.segments.range(keep_next..).rev().copied().collect();
        let mut removed = false;
        for first in doomed {
            let path = self.path_of(first);
            if state
                .active
                .as_ref()
                .is_some_and(|active| active.first == first)
            {
                state.active = None;
            }
            std::fs::remove_file(&path).map_err(|e| RaftLogError::io("removing", &path, e))?;
            state.segments.remove(&first);
            removed = true;
        }
        // The segment holding `keep_next` (if it starts before it) is cut at its record.
        if let Some(first) = cut_segment.filter(|first| *first < keep_next) {
            let Some(slot) = state.slot(keep_next).copied() else {
                return Err(RaftLogError::NotContiguous {
                    expected: state.next_index(),
                    got: keep_next,
                });
            };
            let path = self.path_of(first);
            let file = match state.active.take() {
                Some(active) if active.first == first => active.file,
                _ => self
                    .shared
                    .opener
                    .open(&path, false)
                    .map_err(|e| RaftLogError::io("opening", &path, e))?,
            };
            let len = u64::from(slot.position);
            file.set_len(len)
                .map_err(|e| RaftLogError::io("truncating", &path, e))?;
            file.sync_data()
                .map_err(|e| RaftLogError::io("syncing", &path, e))?;
            state.active = Some(Active { first, file, len });
        }
        if removed {
            sync_dir(&dir).map_err(|e| RaftLogError::io("syncing", &dir, e))?;
        }
        let keep = (keep_next - state.first_index) as usize;
        state.slots.truncate(keep);
        while state
            .cache
            .back()
            .is_some_and(|(entry, _)| entry.log_id.index >= keep_next)
        {
            if let Some((_, len)) = state.cache.pop_back() {
                state.cache_bytes -= len as usize;
            }
        }
        state.generation += 1;
        if state.meta.committed.is_some_and(|c| c.index >= keep_next) {
            // openraft never truncates committed entries; keep meta consistent anyway.
            state.meta.committed = last;
        }
        self.persist_meta(&mut state)
    }

    fn do_purge(&self, upto: LogId) -> Result<(), RaftLogError> {
        let mut state = self.shared.state.lock();
        if state.meta.purged.is_some_and(|p| p.index >= upto.index) {
            return Ok(());
        }
        state.meta.purged = Some(upto);
        self.persist_meta(&mut state)?;
        let next = state.next_index();
        let new_first = upto.index + 1;
        // Forget the entries.
        let drop = new_first
            .saturating_sub(state.first_index)
            .min(state.slots.len() as u64) as usize;
        let cache_first = state.cache_first();
        state.slots.drain(..drop);
        if new_first >= next {
            state.slots.clear();
            state.cache.clear();
            state.cache_bytes = 0;
        } else if new_first > cache_first {
            for _ in 0..(new_first - cache_first) {
                if let Some((_, len)) = state.cache.pop_front() {
                    state.cache_bytes -= len as usize;
                }
            }
        }
        state.first_index = new_first.max(state.first_index);
        // Delete the segments holding only purged entries.
        let firsts: Vec<u64> = state.segments.iter().copied().collect();
        let mut removed = false;
        for (i, &first) in firsts.iter().enumerate() {
            let last_index = match firsts.get(i + 1) {
                Some(next_first) => next_first - 1,
                None => next.saturating_sub(1),
            };
            if last_index > upto.index {
                break;
            }
            if state
                .active
                .as_ref()
                .is_some_and(|active| active.first == first)
            {
                state.active = None;
            }
            let path = self.path_of(first);
            std::fs::remove_file(&path).map_err(|e| RaftLogError::io("removing", &path, e))?;
            state.segments.remove(&first);
            removed = true;
        }
        state.generation += 1;
        if removed {
            let dir = self.shared.dir.clone();
            sync_dir(&dir).map_err(|e| RaftLogError::io("syncing", &dir, e))?;
        }
        Ok(())
    }
}

fn range_to_indexes<RB: RangeBounds<u64>>(range: &RB) -> (u64, u64) {
    let start = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => e.saturating_add(1),
        Bound::Excluded(&e) => e,
        Bound::Unbounded => u64::MAX,
    };
    (start, end)
}

impl RaftLogReader<PartitionRaft> for RaftLog {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let (start, end) = range_to_indexes(&range);
        Ok(self.read_range(start, end)?)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Ok(self.shared.state.lock().meta.vote)
    }

    /// What replication reads: at most [`REPLICATION_READ_BYTES_MAX`] of records (at least one
    /// entry), so one append to a follower stays small and quick to read, send and fsync,
    /// however far behind the follower is.
    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<Entry>, io::Error> {
        let end = self.limited_end(start, end, REPLICATION_READ_BYTES_MAX);
        Ok(self.read_range(start, end)?)
    }
}

impl RaftLogStorage<PartitionRaft> for RaftLog {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<PartitionRaft>, io::Error> {
        let state = self.shared.state.lock();
        Ok(LogState {
            last_purged_log_id: state.meta.purged,
            last_log_id: state.last_log_id(),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        self.barrier().await?;
        let mut state = self.shared.state.lock();
        state.meta.vote = Some(*vote);
        Ok(self.persist_meta(&mut state)?)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        // Lazy: written with the next vote or purge (see the module doc).
        self.shared.state.lock().meta.committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(self.shared.state.lock().meta.committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<PartitionRaft>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let result = self.check_poison().and_then(|()| {
            let mut bytes = Vec::new();
            let mut lens = Vec::with_capacity(entries.len());
            let mut previous: Option<&Entry> = None;
            for entry in &entries {
                if let Some(previous) = previous {
                    if entry.log_id.index != previous.log_id.index + 1
                        || term_of(&entry.log_id) < term_of(&previous.log_id)
                    {
                        return Err(RaftLogError::BadEntry {
                            index: entry.log_id.index,
                            reason: format!(
                                "{} follows {} in one append: not consecutive, or the term \
                                 goes down",
                                entry.log_id, previous.log_id
                            ),
                        });
                    }
                }
                previous = Some(entry);
                lens.push(encode_record(
                    entry,
                    &mut bytes,
                    self.shared.limits.record_bytes_max,
                )?);
            }
            Ok((bytes, lens))
        });
        let (bytes, lens) = match result {
            Ok(encoded) => encoded,
            Err(error) => {
                callback.io_completed(Err(io::Error::other(error.to_string())));
                return Err(error.into());
            }
        };
        if entries.is_empty() {
            // Nothing to write, but the callback still waits for earlier appends.
            let file = self
                .shared
                .state
                .lock()
                .active
                .as_ref()
                .map(|a| Arc::clone(&a.file));
            match file {
                Some(file) => {
                    let seq = self.shared.state.lock().appended_seq;
                    self.queue_flush(seq, file, callback);
                }
                None => callback.io_completed(Ok(())),
            }
            return Ok(());
        }
        match self.write_batch(entries, &lens, &bytes) {
            Ok((seq, file)) => {
                self.queue_flush(seq, file, callback);
                Ok(())
            }
            Err(error) => {
                if matches!(error, RaftLogError::Io { .. }) {
                    self.poison(&error);
                }
                callback.io_completed(Err(io::Error::other(error.to_string())));
                Err(error.into())
            }
        }
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        self.barrier().await?;
        let result = self.do_truncate_after(last_log_id);
        if let Err(error) = &result {
            if matches!(error, RaftLogError::Io { .. }) {
                self.poison(error);
            }
        }
        Ok(result?)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        self.barrier().await?;
        let result = self.do_purge(log_id);
        if let Err(error) = &result {
            if matches!(error, RaftLogError::Io { .. }) {
                self.poison(error);
            }
        }
        Ok(result?)
    }
}

#[cfg(test)]
mod tests;
