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
//! - Unused reservation is given back when a segment is sealed, when the log closes, and when
//!   it opens after a crash (the file is cut to its written length; see `file.rs` for why that
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
/// Default of the broker-wide cap (`--preallocate-bytes-max`): 256 MiB.
pub const DEFAULT_MAX_BYTES: u64 = 256 * 1024 * 1024;

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
}
