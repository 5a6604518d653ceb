//! Per-partition live state beside the log: the key index of a table and the idempotent
//! producers' recent sequences. Both are rebuilt on open from a snapshot plus the log after it.
//!
//! ## Key index (tables only) — memory per key
//! `key hash (xxh3-64) -> Slot { offset u64, fingerprint u32 (a second, independent hash),
//! tombstone bool }`: 24 bytes of entry in a hashbrown table plus one control byte, and the
//! table's power-of-two capacity slack: measured 45.9 bytes per key at 1 M keys (44 MiB;
//! `cargo bench --bench tables`), whatever the key length. Keys are not stored. Two
//! different keys with the same 64-bit hash but different fingerprints are a detected
//! collision: the second key moves to an exact map keyed by its bytes. Equal hash *and*
//! fingerprint (2^-96 per pair) is taken as the same key; reads then compare the key stored in
//! the log and report an internal error instead of returning another key's value.
//!
//! ## Producers
//! `producer id -> { epoch, next sequence, last 5 batches (base sequence, record count, base
//! offset, last offset), last seen }`. Idle producers expire after an hour, and the table keeps
//! at most 100 000 producers per partition (the least recently seen go first), so thousands of
//! short-lived CLI producers cannot grow it without bound.
//!
//! Compaction keeps a producer's recent batches whole (their headers rebuild its state if a
//! restart has to replay the log) only while the producer wrote within
//! [`PRODUCER_BATCH_PIN_MS`]: a retry, the only thing that state serves, comes within the
//! client's delivery timeout (30 s by default). So a one-shot producer (a CLI `put`, a one-off
//! compare-and-set) does not keep a superseded value for the hour its state lives.
//!
//! ## Snapshot file `state.snapshot` (little-endian, written temp + fsync + rename)
//! ```text
//! magic "SLST" | version u32 = 1 | covered_offset u64 (log end when written)
//! index_present u8 | n u64 | n x (hash u64, offset u64, fingerprint u32, tombstone u8)
//! m u64 | m x (key_len u32, key, offset u64, tombstone u8)
//! p u64 | p x (producer_id u64, epoch i16, next_sequence i32, last_seen_ms i64,
//!              k u8, k x (base_sequence i32, records u32, base_offset u64, last_offset u64))
//! crc32c u32 over everything before it
//! ```
//! A snapshot whose covered offset is past the log end (the log lost an unsynced tail) is
//! ignored: the state is rebuilt from the whole log.

use std::collections::{HashMap, VecDeque};
use std::path::Path;

use bytes::Bytes;

/// Recent batches remembered per producer and partition.
pub const PRODUCER_RECENT_BATCHES: usize = 5;
/// Producers idle longer than this are forgotten.
pub const PRODUCER_EXPIRY_MS: i64 = 3_600_000;
/// Compaction keeps a producer's recent batches whole only while it wrote this recently: four
/// times the client's default delivery timeout (30 s), within which any retry comes.
pub const PRODUCER_BATCH_PIN_MS: i64 = 120_000;
/// Producers remembered per partition at most.
pub const PRODUCERS_MAX: usize = 100_000;
const SNAPSHOT_FILE: &str = "state.snapshot";
const MAGIC: &[u8; 4] = b"SLST";

/// Latest version of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// Offset (version) of the key's latest record.
    pub offset: u64,
    /// True when that record is a delete.
    pub tombstone: bool,
}

#[derive(Debug, Clone, Copy)]
struct HashedSlot {
    offset: u64,
    fingerprint: u32,
    tombstone: bool,
}

fn hashes(key: &[u8]) -> (u64, u32) {
    let hash = xxhash_rust::xxh3::xxh3_64(key);
    let fingerprint = xxhash_rust::xxh3::xxh3_64_with_seed(key, 0x5EED_CAFE) as u32;
    (hash, fingerprint)
}

/// key -> latest version, for one partition of a table.
#[derive(Debug, Default)]
pub struct KeyIndex {
    hashed: HashMap<u64, HashedSlot>,
    exact: HashMap<Bytes, Slot>,
}

impl KeyIndex {
    /// The key's latest version, if the key was ever written.
    pub fn get(&self, key: &[u8]) -> Option<Slot> {
        if let Some(slot) = self.exact.get(key) {
            return Some(*slot);
        }
        let (hash, fingerprint) = hashes(key);
        self.hashed
            .get(&hash)
            .filter(|slot| slot.fingerprint == fingerprint)
            .map(|slot| Slot {
                offset: slot.offset,
                tombstone: slot.tombstone,
            })
    }

    /// Forgets `key` if its latest version is still `offset` (compaction removed that record,
    /// a delete, from the log). Returns whether it did.
    pub fn remove_if(&mut self, key: &[u8], offset: u64) -> bool {
        if let Some(slot) = self.exact.get(key) {
            if slot.offset == offset {
                self.exact.remove(key);
                return true;
            }
            return false;
        }
        let (hash, fingerprint) = hashes(key);
        match self.hashed.get(&hash) {
            Some(slot) if slot.fingerprint == fingerprint && slot.offset == offset => {
                self.hashed.remove(&hash);
                true
            }
            _ => false,
        }
    }

    /// Records that `key`'s latest version is `offset`.
    pub fn set(&mut self, key: &[u8], offset: u64, tombstone: bool) {
        if let Some(slot) = self.exact.get_mut(key) {
            *slot = Slot { offset, tombstone };
            return;
        }
        let (hash, fingerprint) = hashes(key);
        match self.hashed.get_mut(&hash) {
            Some(slot) if slot.fingerprint != fingerprint => {
                // A different key with the same hash: keep this one exactly.
                self.exact
                    .insert(Bytes::copy_from_slice(key), Slot { offset, tombstone });
            }
            Some(slot) => {
                slot.offset = offset;
                slot.tombstone = tombstone;
            }
            None => {
                self.hashed.insert(
                    hash,
                    HashedSlot {
                        offset,
                        fingerprint,
                        tombstone,
                    },
                );
            }
        }
    }

    /// The latest version of every key ever written (live and deleted), in no particular
    /// order: the hashed slots, then the exact slots of keys whose hash collided.
    pub fn slots(&self) -> impl Iterator<Item = Slot> + '_ {
        let hashed = self.hashed.values().map(|slot| Slot {
            offset: slot.offset,
            tombstone: slot.tombstone,
        });
        hashed.chain(self.exact.values().copied())
    }

    /// Offsets of the latest record of every live key (deletes left out), in no particular
    /// order: what a snapshot streams.
    pub fn live_offsets(&self) -> impl Iterator<Item = u64> + '_ {
        self.slots()
            .filter(|slot| !slot.tombstone)
            .map(|slot| slot.offset)
    }

    /// Keys tracked.
    pub fn len(&self) -> usize {
        self.hashed.len() + self.exact.len()
    }

    /// Heap bytes held by the index (hashbrown: capacity x (entry + 1 control byte)).
    pub fn memory_bytes(&self) -> usize {
        let hashed_entry = std::mem::size_of::<(u64, HashedSlot)>() + 1;
        let exact_entry = std::mem::size_of::<(Bytes, Slot)>() + 1;
        self.hashed.capacity() * hashed_entry
            + self.exact.capacity() * exact_entry
            + self.exact.keys().map(|k| k.len()).sum::<usize>()
    }

    /// True when no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One remembered batch of a producer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducedBatch {
    /// Sequence of its first record.
    pub base_sequence: i32,
    /// Records in it.
    pub records: u32,
    /// Where it was appended.
    pub base_offset: u64,
    /// Its last offset.
    pub last_offset: u64,
}

#[derive(Debug, Clone)]
struct ProducerEntry {
    epoch: i16,
    next_sequence: i32,
    recent: VecDeque<ProducedBatch>,
    last_seen_ms: i64,
}

/// What to do with an idempotent producer's batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SequenceCheck {
    /// Append it.
    Append,
    /// Already appended: acknowledge with these offsets, append nothing.
    Duplicate(ProducedBatch),
}

/// Why a producer's batch is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SequenceError {
    /// An older epoch: another instance re-initialised this producer id.
    #[error("producer {producer_id} epoch {epoch} is fenced by epoch {current}: another instance re-initialised this producer id")]
    Fenced {
        /// The producer id.
        producer_id: i64,
        /// The batch's epoch.
        epoch: i16,
        /// The current epoch.
        current: i16,
    },
    /// The sequence skips ahead (a batch in between is missing) or is too old to recognise.
    #[error("producer {producer_id} sequence {got} out of order: expected {expected}")]
    OutOfOrder {
        /// The producer id.
        producer_id: i64,
        /// Next expected sequence.
        expected: i32,
        /// The batch's base sequence.
        got: i32,
    },
}

/// The idempotent producers of one partition.
#[derive(Debug, Default)]
pub struct Producers {
    entries: HashMap<i64, ProducerEntry>,
}

impl Producers {
    /// Checks a batch from `producer_id` before it is appended.
    pub fn check(
        &self,
        producer_id: i64,
        epoch: i16,
        base_sequence: i32,
    ) -> Result<SequenceCheck, SequenceError> {
        let Some(entry) = self.entries.get(&producer_id) else {
            return Ok(SequenceCheck::Append);
        };
        if epoch < entry.epoch {
            return Err(SequenceError::Fenced {
                producer_id,
                epoch,
                current: entry.epoch,
            });
        }
        if epoch > entry.epoch {
            return Ok(SequenceCheck::Append);
        }
        if let Some(batch) = entry
            .recent
            .iter()
            .find(|b| b.base_sequence == base_sequence)
        {
            return Ok(SequenceCheck::Duplicate(*batch));
        }
        if base_sequence == entry.next_sequence {
            return Ok(SequenceCheck::Append);
        }
        Err(SequenceError::OutOfOrder {
            producer_id,
            expected: entry.next_sequence,
            got: base_sequence,
        })
    }

    /// Records an appended batch.
    pub fn record(&mut self, producer_id: i64, epoch: i16, batch: ProducedBatch, now_ms: i64) {
        let entry = self.entries.entry(producer_id).or_insert(ProducerEntry {
            epoch,
            next_sequence: 0,
            recent: VecDeque::new(),
            last_seen_ms: now_ms,
        });
        if epoch > entry.epoch {
            entry.epoch = epoch;
            entry.recent.clear();
        }
        entry.next_sequence = batch.base_sequence.wrapping_add(batch.records as i32);
        entry.recent.push_back(batch);
        while entry.recent.len() > PRODUCER_RECENT_BATCHES {
            entry.recent.pop_front();
        }
        entry.last_seen_ms = entry.last_seen_ms.max(now_ms);
        if self.entries.len() > PRODUCERS_MAX + PRODUCERS_MAX / 10 {
            // Amortised: trim back to the cap once it is exceeded by 10%.
            self.expire(now_ms);
        }
    }

    /// The highest epoch seen for `producer_id`.
    pub fn epoch(&self, producer_id: i64) -> Option<i16> {
        self.entries.get(&producer_id).map(|e| e.epoch)
    }

    /// Whether the batch appended at `base_offset` is one of `producer_id`'s remembered recent
    /// batches and the producer wrote within [`PRODUCER_BATCH_PIN_MS`] before `now_ms`
    /// (compaction keeps those whole, so a restart can rebuild the producer's state for a
    /// retry).
    pub fn is_recent_batch(&self, producer_id: i64, base_offset: u64, now_ms: i64) -> bool {
        self.entries.get(&producer_id).is_some_and(|e| {
            e.last_seen_ms >= now_ms.saturating_sub(PRODUCER_BATCH_PIN_MS)
                && e.recent.iter().any(|b| b.base_offset == base_offset)
        })
    }

    /// All (producer id, epoch) pairs.
    pub fn epochs(&self) -> impl Iterator<Item = (i64, i16)> + '_ {
        self.entries.iter().map(|(id, e)| (*id, e.epoch))
    }

    /// Forgets producers idle since before `now_ms - PRODUCER_EXPIRY_MS`, and the least recently
    /// seen beyond `PRODUCERS_MAX`.
    pub fn expire(&mut self, now_ms: i64) {
        self.entries
            .retain(|_, e| e.last_seen_ms >= now_ms.saturating_sub(PRODUCER_EXPIRY_MS));
        if self.entries.len() > PRODUCERS_MAX {
            let mut seen: Vec<(i64, i64)> = self
                .entries
                .iter()
                .map(|(id, e)| (e.last_seen_ms, *id))
                .collect();
            seen.sort_unstable();
            for (_, id) in seen.iter().take(self.entries.len() - PRODUCERS_MAX) {
                self.entries.remove(id);
            }
        }
    }

    /// Producers tracked.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when none is tracked.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The live state of one partition.
#[derive(Debug, Default)]
pub struct PartitionState {
    /// Present for tables.
    pub index: Option<KeyIndex>,
    /// Idempotent producers.
    pub producers: Producers,
    /// Log end covered by the state (everything below is applied).
    pub applied_offset: u64,
    /// Appends since the last snapshot.
    pub dirty: u64,
}

struct Writer(Vec<u8>);
impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
}
impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.bytes.len() < n {
            return None;
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8).map(|b| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            u64::from_le_bytes(a)
        })
    }
}

/// Limits on lengths read from a snapshot (a damaged file must not allocate wildly).
const SNAPSHOT_ENTRIES_MAX: u64 = 1 << 32;

impl PartitionState {
    /// Serialises the state (see the module doc).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer(Vec::with_capacity(
            64 + self.index.as_ref().map_or(0, |i| i.len() * 21),
        ));
        w.0.extend_from_slice(MAGIC);
        w.u32(1);
        w.u64(self.applied_offset);
        match &self.index {
            Some(index) => {
                w.u8(1);
                w.u64(index.hashed.len() as u64);
                for (hash, slot) in &index.hashed {
                    w.u64(*hash);
                    w.u64(slot.offset);
                    w.u32(slot.fingerprint);
                    w.u8(u8::from(slot.tombstone));
                }
                w.u64(index.exact.len() as u64);
                for (key, slot) in &index.exact {
                    w.u32(key.len() as u32);
                    w.0.extend_from_slice(key);
                    w.u64(slot.offset);
                    w.u8(u8::from(slot.tombstone));
                }
            }
            None => w.u8(0),
        }
        w.u64(self.producers.entries.len() as u64);
        for (id, entry) in &self.producers.entries {
            w.u64(*id as u64);
            w.0.extend_from_slice(&entry.epoch.to_le_bytes());
            w.u32(entry.next_sequence as u32);
            w.u64(entry.last_seen_ms as u64);
            w.u8(entry.recent.len() as u8);
            for batch in &entry.recent {
                w.u32(batch.base_sequence as u32);
                w.u32(batch.records);
                w.u64(batch.base_offset);
                w.u64(batch.last_offset);
            }
        }
        let crc = crc32c::crc32c(&w.0);
        w.u32(crc);
        w.0
    }

    /// Parses a snapshot; `None` when it is damaged.
    pub fn decode(bytes: &[u8]) -> Option<PartitionState> {
        if bytes.len() < 4 {
            return None;
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        if crc32c::crc32c(body) != u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]) {
            return None;
        }
        let mut r = Reader { bytes: body };
        if r.take(4)? != MAGIC || r.u32()? != 1 {
            return None;
        }
        let applied_offset = r.u64()?;
        let index = match r.u8()? {
            0 => None,
            _ => {
                let mut index = KeyIndex::default();
                let n = r.u64()?.min(SNAPSHOT_ENTRIES_MAX);
                for _ in 0..n {
                    let hash = r.u64()?;
                    let offset = r.u64()?;
                    let fingerprint = r.u32()?;
                    let tombstone = r.u8()? != 0;
                    index.hashed.insert(
                        hash,
                        HashedSlot {
                            offset,
                            fingerprint,
                            tombstone,
                        },
                    );
                }
                let m = r.u64()?.min(SNAPSHOT_ENTRIES_MAX);
                for _ in 0..m {
                    let len = r.u32()? as usize;
                    let key = Bytes::copy_from_slice(r.take(len)?);
                    let offset = r.u64()?;
                    let tombstone = r.u8()? != 0;
                    index.exact.insert(key, Slot { offset, tombstone });
                }
                Some(index)
            }
        };
        let mut producers = Producers::default();
        let p = r.u64()?.min(SNAPSHOT_ENTRIES_MAX);
        for _ in 0..p {
            let id = r.u64()? as i64;
            let epoch = r.u16()? as i16;
            let next_sequence = r.u32()? as i32;
            let last_seen_ms = r.u64()? as i64;
            let k = r.u8()?;
            let mut recent = VecDeque::new();
            for _ in 0..k {
                recent.push_back(ProducedBatch {
                    base_sequence: r.u32()? as i32,
                    records: r.u32()?,
                    base_offset: r.u64()?,
                    last_offset: r.u64()?,
                });
            }
            producers.entries.insert(
                id,
                ProducerEntry {
                    epoch,
                    next_sequence,
                    recent,
                    last_seen_ms,
                },
            );
        }
        if !r.bytes.is_empty() {
            return None;
        }
        Some(PartitionState {
            index,
            producers,
            applied_offset,
            dirty: 0,
        })
    }

    /// Writes the snapshot into `dir` (temp file, fsync, rename, directory fsync).
    pub fn save(&mut self, dir: &Path) -> std::io::Result<()> {
        crate::log::write_file_atomically(dir, SNAPSHOT_FILE, &self.encode())?;
        self.dirty = 0;
        Ok(())
    }

    /// Removes the snapshot of `dir` (and makes the removal durable).
    pub fn discard(dir: &Path) -> std::io::Result<()> {
        match std::fs::remove_file(dir.join(SNAPSHOT_FILE)) {
            Ok(()) => std::fs::File::open(dir)?.sync_all(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Loads the snapshot of `dir`, if there is a valid one.
    pub fn load(dir: &Path) -> Option<PartitionState> {
        let bytes = std::fs::read(dir.join(SNAPSHOT_FILE)).ok()?;
        let state = Self::decode(&bytes);
        if state.is_none() {
            tracing::warn!(dir = %dir.display(), "state snapshot is damaged; rebuilding from the log");
        }
        state
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[test]
    fn given_producer_batches_should_dedupe_detect_gaps_and_fence() {
        let mut producers = Producers::default();
        assert_eq!(producers.check(7, 0, 0), Ok(SequenceCheck::Append));
        let first = ProducedBatch {
            base_sequence: 0,
            records: 3,
            base_offset: 10,
            last_offset: 12,
        };
        producers.record(7, 0, first, 1);
        assert_eq!(
            producers.check(7, 0, 0),
            Ok(SequenceCheck::Duplicate(first))
        );
        assert_eq!(producers.check(7, 0, 3), Ok(SequenceCheck::Append));
        assert!(matches!(
            producers.check(7, 0, 5),
            Err(SequenceError::OutOfOrder {
                expected: 3,
                got: 5,
                ..
            })
        ));
        assert_eq!(producers.check(7, 1, 0), Ok(SequenceCheck::Append));
        producers.record(
            7,
            1,
            ProducedBatch {
                base_sequence: 0,
                records: 1,
                base_offset: 13,
                last_offset: 13,
            },
            2,
        );
        assert!(matches!(
            producers.check(7, 0, 3),
            Err(SequenceError::Fenced { current: 1, .. })
        ));
        for i in 1..=6 {
            producers.record(
                7,
                1,
                ProducedBatch {
                    base_sequence: i,
                    records: 1,
                    base_offset: 13 + i as u64,
                    last_offset: 13 + i as u64,
                },
                3,
            );
        }
        assert!(
            matches!(
                producers.check(7, 1, 0),
                Err(SequenceError::OutOfOrder { .. })
            ),
            "only the last 5 are remembered"
        );
        assert!(producers.is_recent_batch(7, 19, 3 + PRODUCER_BATCH_PIN_MS));
        assert!(
            !producers.is_recent_batch(7, 19, 3 + PRODUCER_BATCH_PIN_MS + 1),
            "a producer idle past the pin window pins nothing"
        );
        assert!(
            !producers.is_recent_batch(7, 13, 3),
            "no longer among the last 5"
        );
        producers.expire(3 + PRODUCER_EXPIRY_MS + 1);
        assert!(producers.is_empty());
    }

    #[test]
    fn given_hash_collision_should_keep_both_keys() {
        let mut index = KeyIndex::default();
        index.set(b"a", 1, false);
        // Forge a colliding entry: same hash as "b" but another fingerprint.
        let (hash, fingerprint) = hashes(b"b");
        index.hashed.insert(
            hash,
            HashedSlot {
                offset: 5,
                fingerprint: fingerprint ^ 1,
                tombstone: false,
            },
        );
        index.set(b"b", 9, false);
        assert_eq!(
            index.get(b"b"),
            Some(Slot {
                offset: 9,
                tombstone: false
            })
        );
        assert_eq!(index.exact.len(), 1);
        assert_eq!(
            index.get(b"a"),
            Some(Slot {
                offset: 1,
                tombstone: false
            })
        );
    }

    proptest! {
        /// The index (and its snapshot round trip) agrees with a BTreeMap model under random
        /// puts, deletes and restarts.
        #[test]
        fn given_random_puts_deletes_and_restarts_index_should_match_model(
            ops in proptest::collection::vec((0u8..40, any::<bool>(), any::<bool>()), 1..300)
        ) {
            let mut index = KeyIndex::default();
            let mut model: BTreeMap<Vec<u8>, Slot> = BTreeMap::new();
            for (offset, (key, delete, restart)) in ops.into_iter().enumerate() {
                let key = format!("key-{key}").into_bytes();
                index.set(&key, offset as u64, delete);
                model.insert(key, Slot { offset: offset as u64, tombstone: delete });
                if restart {
                    let state = PartitionState { index: Some(index), applied_offset: offset as u64 + 1, ..Default::default() };
                    let decoded = PartitionState::decode(&state.encode()).unwrap();
                    prop_assert_eq!(decoded.applied_offset, offset as u64 + 1);
                    index = decoded.index.unwrap();
                }
            }
            prop_assert_eq!(index.len(), model.len());
            for (key, slot) in &model {
                prop_assert_eq!(index.get(key), Some(*slot));
            }
            prop_assert_eq!(index.get(b"never"), None);
        }
    }

    #[test]
    fn given_puts_deletes_and_a_collision_live_offsets_should_cover_both_maps_and_skip_tombstones()
    {
        let mut index = KeyIndex::default();
        index.set(b"a", 1, false);
        index.set(b"b", 2, false);
        index.set(b"a", 3, false);
        index.set(b"c", 4, false);
        index.set(b"c", 5, true);
        index.set(b"d", 6, true);
        // A key in the exact map (its hash collides with another key's): live, then one deleted.
        let (hash, fingerprint) = hashes(b"x");
        index.hashed.insert(
            hash,
            HashedSlot {
                offset: 0,
                fingerprint: fingerprint ^ 1,
                tombstone: false,
            },
        );
        index.set(b"x", 7, false);
        let (hash, fingerprint) = hashes(b"y");
        index.hashed.insert(
            hash,
            HashedSlot {
                offset: 8,
                fingerprint: fingerprint ^ 1,
                tombstone: true,
            },
        );
        index.set(b"y", 9, true);
        assert_eq!(index.exact.len(), 2);
        let mut slots: Vec<Slot> = index.slots().collect();
        slots.sort_by_key(|s| s.offset);
        assert_eq!(slots.len(), index.len());
        let mut live: Vec<u64> = index.live_offsets().collect();
        live.sort_unstable();
        // a@3, b@2, the forged colliding entry @0, x@7; c, d, y and the forged @8 are deletes.
        assert_eq!(live, vec![0, 2, 3, 7]);
    }

    #[test]
    fn given_damaged_snapshot_should_decode_to_none() {
        let mut producers = Producers::default();
        producers.record(
            1,
            0,
            ProducedBatch {
                base_sequence: 0,
                records: 1,
                base_offset: 0,
                last_offset: 0,
            },
            1,
        );
        let state = PartitionState {
            producers,
            applied_offset: 1,
            ..Default::default()
        };
        let mut bytes = state.encode();
        assert!(PartitionState::decode(&bytes).is_some());
        bytes[10] ^= 1;
        assert!(PartitionState::decode(&bytes).is_none());
        assert!(PartitionState::decode(&bytes[..3]).is_none());
    }
}
