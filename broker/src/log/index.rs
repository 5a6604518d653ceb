//! Sparse, memory-mapped segment indexes.
//!
//! ## Byte maps (little-endian, fixed-width entries, no header)
//! ```text
//! <base>.index      entry = 8 bytes:  [0..4) relative offset u32 | [4..8) file position u32
//! <base>.timeindex  entry = 12 bytes: [0..8) timestamp ms i64     | [8..12) relative offset u32
//! ```
//! The relative offset is `offset - segment base offset`. An entry is written when at least
//! `index_interval_bytes` of log lie between it and the previous entry (the segment start, at
//! position 0, is implicit and never stored), so every stored relative offset and position is
//! non-zero and strictly increasing. A time-index entry `(t, r)` says: the largest timestamp of
//! the batches before and including relative offset `r` is `t`; it is written beside an
//! offset-index entry when `t` grew.
//!
//! ## Life cycle and fault model
//! - Active segment: the file is sized to its capacity (`segment_bytes_max /
//!   index_interval_bytes` entries) and mapped writable; blocks are reserved with `fallocate`
//!   in 64 KiB chunks ahead of the writes, so a full disk can never turn a store through the
//!   mapping into SIGBUS (an entry that cannot be reserved is skipped: the index is sparse and
//!   lookups scan forward). The entry count is found on open as the first all-zero entry.
//!   The mapping stays valid after its descriptor is closed, so an open index holds none: the
//!   file is reopened by path for the `fallocate` that grows it (once per 8 KiB of entries).
//!   Opening never needs free space: when the next entry cannot be reserved, it is skipped.
//! - Sealed segment: the used entries are written to `<name>.tmp`, fsync'd and renamed over the
//!   index (never a truncation of a mapped file in place), then mapped read-only.
//! - The index is never fsync'd while active: it may reach disk before or after the data, or
//!   partially. Recovery therefore treats it as a hint: entries past the valid data are dropped
//!   and an index that disagrees with the data is rebuilt from a scan.
//!
//! Lookups are binary searches over the mapping.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use memmap2::{Mmap, MmapMut, MmapOptions};

/// Width of an offset-index entry.
pub const OFFSET_ENTRY_BYTES: usize = 8;
/// Width of a time-index entry.
pub const TIME_ENTRY_BYTES: usize = 12;
/// A writable index file grows in chunks of this size (hundreds of entries: one chunk covers
/// megabytes of log). The file is only as long as its chunks, so opening a broker with
/// thousands of partitions reads (and keeps resident) a page or two per index, not the whole
/// capacity.
const ALLOCATE_CHUNK_BYTES: u64 = 8 * 1024;

enum Mapping {
    Writable {
        /// Mapped for the whole capacity; only `[0, allocated)` is inside the file and ever
        /// touched (pages past the end of a file must not be accessed). The mapping outlives
        /// the descriptor it was made from: growing the file reopens it by path for the one
        /// `fallocate`, so an open index holds no descriptor.
        map: MmapMut,
        /// The file's length: the end of the space reserved so far.
        allocated: u64,
    },
    Sealed(Mmap),
    Empty,
}

/// A fixed-width-entry index file.
pub(crate) struct IndexFile<const W: usize> {
    path: PathBuf,
    mapping: Mapping,
    entries: usize,
    capacity: usize,
}

impl<const W: usize> std::fmt::Debug for IndexFile<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IndexFile")
            .field("path", &self.path)
            .field("entries", &self.entries)
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl<const W: usize> IndexFile<W> {
    /// Opens (or creates) a writable index of `capacity` entries and drops everything from entry
    /// `keep` on (pass `usize::MAX` to keep what is there).
    pub(crate) fn open_writable(path: &Path, capacity: usize, keep: usize) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let size = (capacity * W) as u64;
        let mut existing = file.metadata()?.len();
        if existing > size {
            // Shrinking a file nobody maps yet (older versions sized it to the capacity).
            file.set_len(size)?;
            existing = size;
        }
        // SAFETY: the index file is private to this log (guarded by the directory lock); it
        // only grows while mapped, and only `[0, file length)` of the mapping is accessed.
        let map = unsafe { MmapOptions::new().len(size as usize).map_mut(&file)? };
        let mut index = IndexFile {
            path: path.to_path_buf(),
            mapping: Mapping::Writable {
                map,
                allocated: existing,
            },
            entries: 0,
            capacity,
        };
        let found = index.count_entries(capacity.min(existing as usize / W));
        index.entries = found;
        index.truncate_entries(keep.min(found));
        // Room for the next entry. Opening must not need free space (a broker restarting on a
        // full disk serves what it has): without it the next entry is skipped, as in `push`.
        if let Err(error) = index.reserve(((index.entries + 1) * W) as u64) {
            tracing::warn!(path = %path.display(), %error, "cannot reserve index space; entries are skipped until there is space");
        }
        Ok(index)
    }

    /// Maps a sealed (trimmed) index read-only. Fails with `InvalidData` when its size is not a
    /// whole number of entries.
    pub(crate) fn open_sealed(path: &Path) -> io::Result<Self> {
        let file = File::open(path)?;
        let len = file.metadata()?.len() as usize;
        if !len.is_multiple_of(W) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("index size {len} is not a multiple of {W}"),
            ));
        }
        let mapping = if len == 0 {
            Mapping::Empty
        } else {
            // SAFETY: sealed index files are never modified in place (only replaced by rename).
            Mapping::Sealed(unsafe { Mmap::map(&file)? })
        };
        Ok(IndexFile {
            path: path.to_path_buf(),
            mapping,
            entries: len / W,
            capacity: len / W,
        })
    }

    /// An index with no entries that touches no file: lookups scan the segment from its start.
    /// What a sealed segment uses when its index cannot be rebuilt on disk (a full disk at
    /// open); the next open rebuilds it.
    pub(crate) fn detached(path: &Path) -> Self {
        IndexFile {
            path: path.to_path_buf(),
            mapping: Mapping::Empty,
            entries: 0,
            capacity: 0,
        }
    }

    /// Writes exactly `entries` to `path` as a sealed index (temp file, fsync, rename; the caller
    /// fsyncs the directory) and maps it.
    pub(crate) fn write_sealed(path: &Path, entries: &[[u8; W]]) -> io::Result<Self> {
        let bytes: Vec<u8> = entries.iter().flatten().copied().collect();
        super::file::replace_file(path, &bytes)?;
        Self::open_sealed(path)
    }

    fn bytes(&self) -> &[u8] {
        match &self.mapping {
            Mapping::Writable { map, .. } => map,
            Mapping::Sealed(map) => map,
            Mapping::Empty => &[],
        }
    }

    /// The first all-zero entry marks the end (stored entries are never all zero).
    fn count_entries(&self, limit: usize) -> usize {
        let bytes = self.bytes();
        let is_zero = |i: usize| bytes[i * W..(i + 1) * W].iter().all(|b| *b == 0);
        let (mut low, mut high) = (0, limit);
        // Entries are a non-zero prefix followed by zeros (torn writes aside, which the
        // recovery's consistency check catches): binary search the boundary.
        while low < high {
            let mid = (low + high) / 2;
            if is_zero(mid) {
                high = mid;
            } else {
                low = mid + 1;
            }
        }
        low
    }

    pub(crate) fn len(&self) -> usize {
        self.entries
    }

    pub(crate) fn entry(&self, i: usize) -> [u8; W] {
        let mut out = [0u8; W];
        out.copy_from_slice(&self.bytes()[i * W..(i + 1) * W]);
        out
    }

    pub(crate) fn entries(&self) -> Vec<[u8; W]> {
        (0..self.entries).map(|i| self.entry(i)).collect()
    }

    /// Appends an entry. Returns false (and stores nothing) when the index is full, sealed, or
    /// its space cannot be reserved; a sparse index tolerates a missing entry.
    pub(crate) fn push(&mut self, entry: [u8; W]) -> bool {
        if self.entries >= self.capacity {
            return false;
        }
        let end = ((self.entries + 1) * W) as u64;
        if let Err(error) = self.reserve(end) {
            tracing::warn!(path = %self.path.display(), %error, "cannot reserve index space; entry skipped");
            return false;
        }
        let at = self.entries * W;
        match &mut self.mapping {
            Mapping::Writable { map, .. } => {
                map[at..at + W].copy_from_slice(&entry);
                self.entries += 1;
                true
            }
            _ => false,
        }
    }

    fn reserve(&mut self, end: u64) -> io::Result<()> {
        let Mapping::Writable { allocated, .. } = &mut self.mapping else {
            return Ok(());
        };
        if end <= *allocated {
            return Ok(());
        }
        let size = (self.capacity * W) as u64;
        let new_allocated = (end + ALLOCATE_CHUNK_BYTES).min(size);
        let len = new_allocated.saturating_sub(*allocated);
        if len > 0 {
            let file = OpenOptions::new().write(true).open(&self.path)?;
            if !fallocate(&file, *allocated, len)? {
                // No fallocate on this file system: grow the file (sparse) instead.
                file.set_len(new_allocated)?;
            }
        }
        *allocated = new_allocated;
        Ok(())
    }

    /// Zeroes entries from `keep` on.
    pub(crate) fn truncate_entries(&mut self, keep: usize) {
        if keep >= self.entries {
            return;
        }
        if let Mapping::Writable { map, .. } = &mut self.mapping {
            map[keep * W..self.entries * W].fill(0);
        }
        self.entries = keep;
    }

    /// Zeroes every non-zero page of a writable index, including stale entries past a zero gap
    /// that an unsynced index can hold after a crash. Pages that are already zero (holes) are
    /// only read, so they stay unallocated.
    pub(crate) fn clear_all(&mut self) {
        if let Mapping::Writable { map, allocated, .. } = &mut self.mapping {
            let inside = (*allocated as usize).min(map.len());
            for page in map[..inside].chunks_mut(4096) {
                if page.iter().any(|b| *b != 0) {
                    page.fill(0);
                }
            }
        }
        self.entries = 0;
    }

    /// Replaces the writable index by a trimmed, fsync'd, read-only copy.
    pub(crate) fn seal(&mut self) -> io::Result<()> {
        if !matches!(self.mapping, Mapping::Writable { .. }) {
            return Ok(());
        }
        let sealed = Self::write_sealed(&self.path, &self.entries())?;
        *self = sealed;
        Ok(())
    }

    /// Binary search: the last entry `i` with `key(i) <= target` (by `key`), if any.
    pub(crate) fn floor_by<K: Ord>(&self, target: K, key: impl Fn(&[u8; W]) -> K) -> Option<usize> {
        let (mut low, mut high) = (0usize, self.entries);
        while low < high {
            let mid = (low + high) / 2;
            if key(&self.entry(mid)) <= target {
                low = mid + 1;
            } else {
                high = mid;
            }
        }
        low.checked_sub(1)
    }
}

/// Reserves `[offset, offset + len)` and grows the file over it (mode 0). `Ok(false)` when the
/// file system has no fallocate (the caller then grows the file with `set_len`).
fn fallocate(file: &File, offset: u64, len: u64) -> io::Result<bool> {
    // SAFETY: plain syscall on an fd we own.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            0,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc == 0 {
        return Ok(true);
    }
    let error = io::Error::last_os_error();
    match error.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => Ok(false),
        _ => Err(error),
    }
}

/// The offset index of one segment.
pub(crate) type OffsetIndex = IndexFile<OFFSET_ENTRY_BYTES>;
/// The time index of one segment.
pub(crate) type TimeIndex = IndexFile<TIME_ENTRY_BYTES>;

pub(crate) fn offset_entry(relative_offset: u32, position: u32) -> [u8; OFFSET_ENTRY_BYTES] {
    let mut out = [0u8; OFFSET_ENTRY_BYTES];
    out[..4].copy_from_slice(&relative_offset.to_le_bytes());
    out[4..].copy_from_slice(&position.to_le_bytes());
    out
}

pub(crate) fn decode_offset_entry(entry: &[u8; OFFSET_ENTRY_BYTES]) -> (u32, u32) {
    let relative = u32::from_le_bytes([entry[0], entry[1], entry[2], entry[3]]);
    let position = u32::from_le_bytes([entry[4], entry[5], entry[6], entry[7]]);
    (relative, position)
}

pub(crate) fn time_entry(timestamp: i64, relative_offset: u32) -> [u8; TIME_ENTRY_BYTES] {
    let mut out = [0u8; TIME_ENTRY_BYTES];
    out[..8].copy_from_slice(&timestamp.to_le_bytes());
    out[8..].copy_from_slice(&relative_offset.to_le_bytes());
    out
}

pub(crate) fn decode_time_entry(entry: &[u8; TIME_ENTRY_BYTES]) -> (i64, u32) {
    let mut ts = [0u8; 8];
    ts.copy_from_slice(&entry[..8]);
    let relative = u32::from_le_bytes([entry[8], entry[9], entry[10], entry[11]]);
    (i64::from_le_bytes(ts), relative)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: a writable index was sized to its whole capacity (2-3 MiB for a 1 GiB
    /// segment) and the crash-recovery rewrite read every page of it, so reopening a broker
    /// with 1000 partitions kept gigabytes resident. The file now grows with its entries.
    #[test]
    fn given_large_capacity_index_should_stay_as_small_as_its_entries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.index");
        let capacity = 262_144; // a 1 GiB segment at one entry per 4 KiB
        let len = |path: &Path| std::fs::metadata(path).unwrap().len();
        let mut index = OffsetIndex::open_writable(&path, capacity, usize::MAX).unwrap();
        assert!(len(&path) <= 2 * ALLOCATE_CHUNK_BYTES, "{}", len(&path));
        index.clear_all();
        for i in 1..=2000u32 {
            assert!(index.push(offset_entry(i, i * 4096)));
        }
        let used = 2000 * OFFSET_ENTRY_BYTES as u64;
        assert!(len(&path) >= used && len(&path) <= used + 2 * ALLOCATE_CHUNK_BYTES);
        drop(index);
        let mut index = OffsetIndex::open_writable(&path, capacity, usize::MAX).unwrap();
        assert_eq!(index.len(), 2000);
        index.clear_all();
        assert_eq!(index.len(), 0);
        assert!(
            len(&path) <= used + 2 * ALLOCATE_CHUNK_BYTES,
            "clear_all does not grow it"
        );
        // An index an older version sized to its capacity still opens, with its entries.
        drop(index);
        let old = dir.path().join("old.index");
        let mut index = OffsetIndex::open_writable(&old, capacity, usize::MAX).unwrap();
        assert!(index.push(offset_entry(7, 4096)));
        drop(index);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&old)
            .unwrap()
            .set_len((capacity * OFFSET_ENTRY_BYTES) as u64)
            .unwrap();
        let index = OffsetIndex::open_writable(&old, capacity, usize::MAX).unwrap();
        assert_eq!(index.len(), 1);
    }

    #[test]
    fn given_entries_when_reopened_should_count_them_and_find_floor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.index");
        let mut index = OffsetIndex::open_writable(&path, 1000, usize::MAX).unwrap();
        for i in 1..=100u32 {
            assert!(index.push(offset_entry(i * 10, i * 4096)));
        }
        drop(index);
        let index = OffsetIndex::open_writable(&path, 1000, usize::MAX).unwrap();
        assert_eq!(index.len(), 100);
        let key = |e: &[u8; 8]| decode_offset_entry(e).0;
        assert_eq!(index.floor_by(5, key), None);
        assert_eq!(index.floor_by(10, key), Some(0));
        assert_eq!(index.floor_by(15, key), Some(0));
        assert_eq!(index.floor_by(1000, key), Some(99));
        assert_eq!(index.floor_by(u32::MAX, key), Some(99));
    }

    #[test]
    fn given_writable_index_when_sealed_should_be_trimmed_to_its_entries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.timeindex");
        let mut index = TimeIndex::open_writable(&path, 1 << 16, usize::MAX).unwrap();
        index.push(time_entry(5, 1));
        index.push(time_entry(9, 7));
        index.seal().unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 24);
        let sealed = TimeIndex::open_sealed(&path).unwrap();
        assert_eq!(sealed.len(), 2);
        assert_eq!(decode_time_entry(&sealed.entry(1)), (9, 7));
        assert!(!dir.path().join("0.timeindex.tmp").exists());
    }

    #[test]
    fn given_full_index_when_pushed_should_refuse_without_panicking() {
        let dir = tempfile::tempdir().unwrap();
        let mut index = OffsetIndex::open_writable(&dir.path().join("i"), 2, usize::MAX).unwrap();
        assert!(index.push(offset_entry(1, 1)));
        assert!(index.push(offset_entry(2, 2)));
        assert!(!index.push(offset_entry(3, 3)));
        index.truncate_entries(1);
        assert_eq!(index.len(), 1);
    }
}
