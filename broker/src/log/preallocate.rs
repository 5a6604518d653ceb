//! Adaptive preallocation: how much segment space a log reserves ahead of its writes.
//!
//! Appends reserve blocks (`fallocate(FALLOC_FL_KEEP_SIZE)`, see `file.rs`) before writing, so a
//! full disk is a clean error before any byte of a batch is written and files do not fragment.
//! Reserving a fixed 16 MiB per partition ate small disks (three partitions with one record
//! each held 54 MiB of a 64 MiB disk), so the reservation ahead of the written end adapts:
//!
//! - Each log starts with a [`CHUNK_MIN`] chunk. When the previous chunk filled within
//!   [`GROW_WITHIN`], the next one doubles (up to the log's `preallocate_bytes`, 16 MiB by
//!   default); when it took longer than [`SHRINK_AFTER`], it halves. A busy partition reaches
//!   big chunks within a second; an idle one holds at most 64 KiB ahead.
//! - A broker-wide [`Preallocation`] budget caps the bytes reserved but not yet written across
//!   all logs (`--preallocate-bytes-max`). Past it, appends reserve exactly what the batch needs.
//! - Without `--preallocate-bytes-max` the cap is 1/16 of the data directory's file system, at
//!   most 256 MiB (4 MiB of a 64 MiB disk).
//! - Unused reservation is given back when a segment is sealed, when the log closes, when the
//!   log made no new reservation for [`SHRINK_AFTER`] (the broker's periodic checkpoint asks),
//!   and when it opens after a crash (the file is cut to its written length; see `file.rs` for why that
//!   is safe while it is mapped). A reservation that fails is released too: nothing is kept
//!   from a failed `fallocate`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// First chunk of a log, and the smallest.
pub const CHUNK_MIN: u64 = 64 * 1024;
/// A chunk that filled faster than this makes the next one twice as large.
pub const GROW_WITHIN: Duration = Duration::from_secs(1);
/// A chunk that took longer than this to fill makes the next one half as large.
pub const SHRINK_AFTER: Duration = Duration::from_secs(30);
/// Largest default of the broker-wide cap (`--preallocate-bytes-max`): 256 MiB.
pub const DEFAULT_MAX_BYTES: u64 = 256 * 1024 * 1024;
/// Without an explicit cap, at most this share of the file system is reserved ahead (1/16:
/// 4 MiB of a 64 MiB disk).
pub const DEFAULT_SHARE_DIVISOR: u64 = 16;

/// The broker-wide count of bytes reserved ahead of written data, with its cap. Shared by every
/// log through `OpenOptions`.
#[derive(Debug)]
pub struct Preallocation {
    limit: u64,
    reserved: AtomicU64,
}

impl Default for Preallocation {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_BYTES)
    }
}

impl Preallocation {
    /// A budget of at most `limit` bytes reserved ahead (0 = never reserve ahead).
    pub fn new(limit: u64) -> Self {
        Self {
            limit,
            reserved: AtomicU64::new(0),
        }
    }

    /// The cap `explicit` when set; otherwise 1/16 of the file system holding `dir`, at most
    /// [`DEFAULT_MAX_BYTES`] (that alone when the size cannot be read).
    pub fn for_data_dir(dir: &std::path::Path, explicit: Option<u64>) -> Self {
        let limit = explicit.unwrap_or_else(|| {
            filesystem_bytes(dir).map_or(DEFAULT_MAX_BYTES, |size| {
                (size / DEFAULT_SHARE_DIVISOR).min(DEFAULT_MAX_BYTES)
            })
        });
        tracing::info!(dir = %dir.display(), limit, "segment preallocation cap");
        Self::new(limit)
    }

    /// Bytes reserved ahead of written data right now (the `syncline_preallocated_bytes`
    /// gauge).
    pub fn reserved(&self) -> u64 {
        self.reserved.load(Ordering::Acquire)
    }

    /// The cap.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Takes up to `want` bytes of the budget; returns how many it got (possibly 0).
    pub(crate) fn take(&self, want: u64) -> u64 {
        let mut current = self.reserved.load(Ordering::Acquire);
        loop {
            let granted = want.min(self.limit.saturating_sub(current));
            if granted == 0 {
                return 0;
            }
            match self.reserved.compare_exchange_weak(
                current,
                current + granted,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return granted,
                Err(actual) => current = actual,
            }
        }
    }

    /// Returns `bytes` to the budget.
    pub(crate) fn give_back(&self, bytes: u64) {
        if bytes > 0 {
            let _ = self
                .reserved
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| {
                    Some(r.saturating_sub(bytes))
                });
        }
    }
}

/// Size of the file system holding `dir` (`statvfs`).
fn filesystem_bytes(dir: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: `statvfs` is plain data, valid when zeroed.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a pointer to a local struct.
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return None;
    }
    Some(stat.f_blocks.saturating_mul(stat.f_frsize))
}

/// One log's chunk size, adapted to how fast its chunks fill.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChunkSize {
    chunk: u64,
    last_reservation: Option<Instant>,
}

impl Default for ChunkSize {
    fn default() -> Self {
        Self {
            chunk: CHUNK_MIN,
            last_reservation: None,
        }
    }
}

impl ChunkSize {
    /// The chunk to reserve now (the previous chunk just filled), at most `max` (a `max` below
    /// [`CHUNK_MIN`] is the chunk).
    pub(crate) fn next(&mut self, now: Instant, max: u64) -> u64 {
        let min = CHUNK_MIN.min(max);
        if let Some(last) = self.last_reservation {
            let took = now.saturating_duration_since(last);
            if took < GROW_WITHIN {
                self.chunk = self.chunk.saturating_mul(2);
            } else if took > SHRINK_AFTER {
                self.chunk /= 2;
            }
        }
        self.chunk = self.chunk.clamp(min, max);
        self.last_reservation = Some(now);
        self.chunk
    }

    /// A chunk size whose last reservation was at `at` (tests).
    #[cfg(test)]
    pub(crate) fn reserved_at(at: Instant) -> Self {
        Self {
            chunk: CHUNK_MIN,
            last_reservation: Some(at),
        }
    }

    /// True when the last reservation is older than [`SHRINK_AFTER`]: what is still reserved
    /// ahead of such a slow or idle log goes back.
    pub(crate) fn idle(&self, now: Instant) -> bool {
        self.last_reservation
            .is_some_and(|last| now.saturating_duration_since(last) > SHRINK_AFTER)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_fast_fills_when_chunks_requested_should_double_up_to_the_max_and_shrink_when_idle() {
        let mut size = ChunkSize::default();
        let start = Instant::now();
        let max = 1024 * 1024;
        assert_eq!(size.next(start, max), CHUNK_MIN, "the first chunk is small");
        let mut now = start;
        let mut seen = Vec::new();
        for _ in 0..6 {
            now += Duration::from_millis(10);
            seen.push(size.next(now, max));
        }
        assert_eq!(seen, [128, 256, 512, 1024, 1024, 1024].map(|k| k * 1024));
        now += SHRINK_AFTER * 2;
        assert_eq!(size.next(now, max), 512 * 1024, "an idle partition shrinks");
        now += Duration::from_secs(5);
        assert_eq!(
            size.next(now, max),
            512 * 1024,
            "a steady one keeps its chunk"
        );
    }

    #[test]
    fn given_cap_when_taken_should_grant_only_what_is_left_and_take_back_returns() {
        let budget = Preallocation::new(100);
        assert_eq!(budget.take(60), 60);
        assert_eq!(budget.take(60), 40);
        assert_eq!(budget.take(1), 0);
        budget.give_back(50);
        assert_eq!(budget.reserved(), 50);
        assert_eq!(budget.take(70), 50);
        budget.give_back(1000);
        assert_eq!(budget.reserved(), 0, "never below zero");
    }

    #[test]
    fn given_no_explicit_cap_should_take_a_sixteenth_of_the_file_system_at_most_256_mib() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Preallocation::for_data_dir(dir.path(), Some(7)).limit(), 7);
        let size = filesystem_bytes(dir.path()).unwrap();
        assert!(size > 0);
        assert_eq!(
            Preallocation::for_data_dir(dir.path(), None).limit(),
            (size / 16).min(DEFAULT_MAX_BYTES)
        );
    }
}
