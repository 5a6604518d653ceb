//! The bench record payload and its verifier.
//!
//! # Byte map of a record value (`--record-size` bytes, little-endian)
//!
//! | bytes  | field                                                                      |
//! |--------|----------------------------------------------------------------------------|
//! | 0..4   | magic `SLB1`                                                               |
//! | 4..8   | CRC-32C of bytes 8..32 (the header fields)                                 |
//! | 8..12  | producer id (`u32`, 0..producers)                                          |
//! | 12..16 | key index (`u32`, 0..keys; `u32::MAX` for an unkeyed record)               |
//! | 16..24 | sequence (`u64`): per producer, from 0, one per record in send order       |
//! | 24..32 | send time (`u64`), ns since the Unix epoch (from the bench's [`Clock`])    |
//! | 32..   | padding up to the record size: byte `i` is `i as u8`                       |
//!
//! The checksum covers the header only and the verifier compares the padding with its pattern:
//! as strict (any changed byte is caught), and the producer's share of the verification is a
//! CRC of 24 bytes instead of the whole record (it was ~3% of a 1 KiB producer's CPU, a cost
//! no peer's bench pays).
//!
//! A keyed record's key is `k{index}` and must be in the partition
//! [`partition_for_key`] gives it.
//!
//! # What the verifier proves
//!
//! Every consumed record is decoded and checked (length, magic, checksum, producer id, key,
//! partition). A per-producer bitmap of sequences seen finds duplicates, and after the run the
//! sequences never seen are the lost records. Order is checked per stream: per (producer, key)
//! with keys, per (producer, partition) without (the client keeps a producer's records of one
//! partition in send order). A record whose sequence is below the highest already seen on its
//! stream, and that is not a duplicate, is reordered.
//!
//! The verifier's state is shared by all consumers through atomics: each stream is read by one
//! consumer only (consumers own disjoint partitions), and a bitmap bit is set with `fetch_or`,
//! so a record seen by two consumers is still a duplicate.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use syncline_client::partition_for_key;

/// `SLB1`: Syncline bench, layout version 1.
const MAGIC: [u8; 4] = *b"SLB1";
/// The header's size; the smallest allowed record size.
pub const HEADER_LEN: usize = 32;
/// Bytes the checksum does not cover: the magic and the checksum itself.
const CRC_START: usize = 8;
/// The key index of an unkeyed record.
const UNKEYED: u32 = u32::MAX;
/// Sequences per bitmap chunk: 2^20 records, 128 KiB, allocated when first touched so
/// `--duration` runs need no size up front.
const CHUNK_RECORDS: u64 = 1 << 20;
/// Most records one producer may send: 2^32 (4096 chunks, 512 MiB of bitmap at the most).
pub const RECORDS_PER_PRODUCER_MAX: u64 = CHUNK_RECORDS * 4096;

/// Nanoseconds since the Unix epoch, read from a monotonic clock anchored once, so send times
/// and receive times in this process never go backwards when the wall clock is adjusted.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    anchor: Instant,
    anchor_ns: u64,
}

impl Clock {
    pub fn start() -> Clock {
        let anchor_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |elapsed| {
                u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX)
            });
        Clock {
            anchor: Instant::now(),
            anchor_ns,
        }
    }

    /// `at` as ns since the Unix epoch.
    pub fn ns(&self, at: Instant) -> u64 {
        let since = at.saturating_duration_since(self.anchor).as_nanos();
        self.anchor_ns
            .saturating_add(u64::try_from(since).unwrap_or(u64::MAX))
    }
}

/// The keys `k0`, `k1`, ... in one buffer, built once so sending and checking a key allocates
/// nothing.
#[derive(Debug, Default)]
pub struct Keys {
    bytes: Vec<u8>,
    ends: Vec<usize>,
    partitions: Vec<u32>,
}

impl Keys {
    /// `count` keys; `partitions` is the topic's partition count (to check where a key landed).
    pub fn new(count: u32, partitions: u32) -> Keys {
        let mut keys = Keys::default();
        for index in 0..count {
            let start = keys.bytes.len();
            keys.bytes.extend_from_slice(format!("k{index}").as_bytes());
            keys.ends.push(keys.bytes.len());
            keys.partitions
                .push(partition_for_key(&keys.bytes[start..], partitions));
        }
        keys
    }

    pub fn len(&self) -> u32 {
        u32::try_from(self.ends.len()).unwrap_or(u32::MAX)
    }

    /// Key `index`; panics when out of range (callers index below [`Keys::len`]).
    pub fn get(&self, index: u32) -> &[u8] {
        let index = index as usize;
        let start = if index == 0 { 0 } else { self.ends[index - 1] };
        &self.bytes[start..self.ends[index]]
    }

    fn partition(&self, index: u32) -> u32 {
        self.partitions[index as usize]
    }
}

/// Writes payloads into one reused buffer: no allocation per record.
#[derive(Debug)]
pub struct PayloadWriter {
    buffer: Vec<u8>,
}

impl PayloadWriter {
    /// A writer of `record_size`-byte values (at least [`HEADER_LEN`]).
    pub fn new(record_size: usize) -> PayloadWriter {
        let mut buffer: Vec<u8> = (0..record_size.max(HEADER_LEN))
            .map(|index| index as u8)
            .collect();
        buffer[..4].copy_from_slice(&MAGIC);
        PayloadWriter { buffer }
    }

    /// The value of record `sequence` of `producer`; `key_index` is `None` for an unkeyed
    /// record.
    pub fn encode(
        &mut self,
        producer: u32,
        key_index: Option<u32>,
        sequence: u64,
        sent_ns: u64,
    ) -> &[u8] {
        let buffer = &mut self.buffer;
        buffer[8..12].copy_from_slice(&producer.to_le_bytes());
        buffer[12..16].copy_from_slice(&key_index.unwrap_or(UNKEYED).to_le_bytes());
        buffer[16..24].copy_from_slice(&sequence.to_le_bytes());
        buffer[24..32].copy_from_slice(&sent_ns.to_le_bytes());
        let crc = crc32c::crc32c(&buffer[CRC_START..HEADER_LEN]);
        buffer[4..8].copy_from_slice(&crc.to_le_bytes());
        buffer
    }
}

/// A decoded, checksum-verified payload header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Payload {
    pub producer: u32,
    pub key_index: Option<u32>,
    pub sequence: u64,
    pub sent_ns: u64,
}

fn le_u32(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

fn le_u64(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

/// Whether the padding of `value` (from [`HEADER_LEN`]) is the pattern: byte `i` is `i as u8`.
/// Compared 256 bytes at a time against one period of the pattern (a `memcmp` each).
fn padding_intact(value: &[u8]) -> bool {
    static PATTERN: OnceLock<[u8; 512]> = OnceLock::new();
    let pattern = PATTERN.get_or_init(|| std::array::from_fn(|index| index as u8));
    let mut at = HEADER_LEN;
    while at < value.len() {
        let phase = at % 256;
        let len = (256 - phase).min(value.len() - at);
        if value[at..at + len] != pattern[phase..phase + len] {
            return false;
        }
        at += len;
    }
    true
}

/// Decodes `value` if it has `record_size` bytes, the magic and a matching checksum.
pub fn decode(value: &[u8], record_size: usize) -> Option<Payload> {
    if value.len() != record_size || value.len() < HEADER_LEN || value[..4] != MAGIC {
        return None;
    }
    if le_u32(value, 4) != crc32c::crc32c(&value[CRC_START..HEADER_LEN]) || !padding_intact(value) {
        return None;
    }
    let key_index = le_u32(value, 12);
    Some(Payload {
        producer: le_u32(value, 8),
        key_index: (key_index != UNKEYED).then_some(key_index),
        sequence: le_u64(value, 16),
        sent_ns: le_u64(value, 24),
    })
}

/// What the verifier made of one consumed record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// First time seen, in order on its stream.
    InOrder { sent_ns: u64 },
    /// First time seen, but after a later record of its stream.
    Reordered { sent_ns: u64 },
    /// Seen before.
    Duplicate,
    /// Not a bench record of this run: wrong size, magic, checksum, producer, key or partition.
    Corrupt,
}

/// Counts of one consumer's verdicts; added up over consumers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VerdictCounts {
    pub checked: u64,
    pub duplicated: u64,
    pub reordered: u64,
    pub corrupt: u64,
}

impl VerdictCounts {
    pub fn count(&mut self, verdict: Verdict) {
        self.checked += 1;
        match verdict {
            Verdict::InOrder { .. } => {}
            Verdict::Reordered { .. } => self.reordered += 1,
            Verdict::Duplicate => self.duplicated += 1,
            Verdict::Corrupt => self.corrupt += 1,
        }
    }

    pub fn add(&mut self, other: &VerdictCounts) {
        self.checked += other.checked;
        self.duplicated += other.duplicated;
        self.reordered += other.reordered;
        self.corrupt += other.corrupt;
    }
}

/// One producer's sequences seen, in lazily allocated chunks.
#[derive(Debug)]
struct SeenBitmap {
    chunks: Box<[OnceLock<Box<[AtomicU64]>>]>,
}

impl SeenBitmap {
    fn new() -> SeenBitmap {
        let chunks = (0..RECORDS_PER_PRODUCER_MAX / CHUNK_RECORDS)
            .map(|_| OnceLock::new())
            .collect();
        SeenBitmap { chunks }
    }

    /// Marks `sequence` seen; true when it was already. `sequence` is below
    /// [`RECORDS_PER_PRODUCER_MAX`].
    fn insert(&self, sequence: u64) -> bool {
        let chunk = self.chunks[(sequence / CHUNK_RECORDS) as usize]
            .get_or_init(|| (0..CHUNK_RECORDS / 64).map(|_| AtomicU64::new(0)).collect());
        let bit = sequence % CHUNK_RECORDS;
        let mask = 1u64 << (bit % 64);
        chunk[(bit / 64) as usize].fetch_or(mask, Ordering::Relaxed) & mask != 0
    }

    /// How many sequences below `end` were seen.
    fn count_below(&self, end: u64) -> u64 {
        let mut seen = 0;
        for (chunk_index, chunk) in self.chunks.iter().enumerate() {
            let chunk_start = chunk_index as u64 * CHUNK_RECORDS;
            if chunk_start >= end {
                break;
            }
            let Some(words) = chunk.get() else { continue };
            for (word_index, word) in words.iter().enumerate() {
                let word_start = chunk_start + word_index as u64 * 64;
                if word_start >= end {
                    break;
                }
                let mut bits = word.load(Ordering::Relaxed);
                let valid = end - word_start;
                if valid < 64 {
                    bits &= (1u64 << valid) - 1;
                }
                seen += u64::from(bits.count_ones());
            }
        }
        seen
    }
}

/// The shared verification state of one run; see the module doc.
#[derive(Debug)]
pub struct Verifier {
    record_size: usize,
    partitions: u32,
    keys: std::sync::Arc<Keys>,
    seen: Vec<SeenBitmap>,
    /// Per stream: one past the highest sequence seen (0: none yet).
    stream_ends: Vec<AtomicU64>,
}

impl Verifier {
    pub fn new(
        producers: u32,
        partitions: u32,
        record_size: usize,
        keys: std::sync::Arc<Keys>,
    ) -> Verifier {
        let streams_per_producer = if keys.len() > 0 {
            keys.len()
        } else {
            partitions
        };
        let streams = producers as usize * streams_per_producer as usize;
        Verifier {
            record_size,
            partitions,
            keys,
            seen: (0..producers).map(|_| SeenBitmap::new()).collect(),
            stream_ends: (0..streams).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Checks one record read from `partition`.
    pub fn check(&self, partition: u32, key: Option<&[u8]>, value: Option<&[u8]>) -> Verdict {
        let Some(payload) = value.and_then(|value| decode(value, self.record_size)) else {
            return Verdict::Corrupt;
        };
        if payload.producer as usize >= self.seen.len()
            || payload.sequence >= RECORDS_PER_PRODUCER_MAX
            || partition >= self.partitions
        {
            return Verdict::Corrupt;
        }
        let stream_in_producer = match (payload.key_index, key) {
            (Some(index), Some(key))
                if index < self.keys.len()
                    && key == self.keys.get(index)
                    && partition == self.keys.partition(index) =>
            {
                index
            }
            (None, None) if self.keys.len() == 0 => partition,
            _ => return Verdict::Corrupt,
        };
        if self.seen[payload.producer as usize].insert(payload.sequence) {
            return Verdict::Duplicate;
        }
        let streams_per_producer = self.stream_ends.len() / self.seen.len();
        let stream = payload.producer as usize * streams_per_producer + stream_in_producer as usize;
        // One consumer reads each stream, so a load and a store suffice.
        let end = &self.stream_ends[stream];
        if payload.sequence < end.load(Ordering::Relaxed) {
            return Verdict::Reordered {
                sent_ns: payload.sent_ns,
            };
        }
        end.store(payload.sequence + 1, Ordering::Relaxed);
        Verdict::InOrder {
            sent_ns: payload.sent_ns,
        }
    }

    /// Records of `producer` below sequence `sent` that were never seen.
    pub fn lost(&self, producer: u32, sent: u64) -> u64 {
        sent.saturating_sub(self.seen[producer as usize].count_below(sent))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    const SIZE: usize = 100;

    fn value(producer: u32, key_index: Option<u32>, sequence: u64) -> Vec<u8> {
        PayloadWriter::new(SIZE)
            .encode(producer, key_index, sequence, 1_000 + sequence)
            .to_vec()
    }

    fn unkeyed(producers: u32, partitions: u32) -> Verifier {
        Verifier::new(
            producers,
            partitions,
            SIZE,
            Arc::new(Keys::new(0, partitions)),
        )
    }

    #[test]
    fn given_encoded_payload_should_decode_every_field() {
        let mut writer = PayloadWriter::new(SIZE);
        let encoded = writer.encode(7, Some(3), 42, 123_456_789).to_vec();
        assert_eq!(encoded.len(), SIZE);
        assert_eq!(&encoded[..4], b"SLB1");
        assert_eq!(
            decode(&encoded, SIZE),
            Some(Payload {
                producer: 7,
                key_index: Some(3),
                sequence: 42,
                sent_ns: 123_456_789
            })
        );
        let unkeyed = writer.encode(0, None, 0, 5).to_vec();
        assert_eq!(decode(&unkeyed, SIZE).unwrap().key_index, None);
        // The smallest record is the header alone.
        let minimal = PayloadWriter::new(HEADER_LEN)
            .encode(1, None, 2, 3)
            .to_vec();
        assert_eq!(decode(&minimal, HEADER_LEN).unwrap().sequence, 2);
    }

    #[test]
    fn given_any_flipped_bit_or_wrong_length_should_not_decode() {
        let good = value(1, None, 9);
        for byte in 0..SIZE {
            let mut bad = good.clone();
            bad[byte] ^= 0x10;
            assert_eq!(decode(&bad, SIZE), None, "flip in byte {byte}");
        }
        assert_eq!(decode(&good[..SIZE - 1], SIZE), None);
        assert_eq!(decode(&good, SIZE + 1), None);
    }

    #[test]
    fn given_every_record_once_in_order_should_find_nothing_wrong() {
        let verifier = unkeyed(2, 2);
        let mut counts = VerdictCounts::default();
        for sequence in 0..1000 {
            for producer in 0..2 {
                let partition = (sequence % 2) as u32;
                let verdict =
                    verifier.check(partition, None, Some(&value(producer, None, sequence)));
                assert!(
                    matches!(verdict, Verdict::InOrder { sent_ns } if sent_ns == 1_000 + sequence)
                );
                counts.count(verdict);
            }
        }
        assert_eq!(
            counts,
            VerdictCounts {
                checked: 2000,
                ..Default::default()
            }
        );
        assert_eq!(verifier.lost(0, 1000), 0);
        assert_eq!(verifier.lost(1, 1000), 0);
    }

    #[test]
    fn given_missing_records_should_count_them_lost() {
        let verifier = unkeyed(1, 1);
        for sequence in (0..100).filter(|sequence| sequence % 10 != 3) {
            verifier.check(0, None, Some(&value(0, None, sequence)));
        }
        assert_eq!(verifier.lost(0, 100), 10);
        // Records sent after the last one seen are lost too.
        assert_eq!(verifier.lost(0, 150), 60);
    }

    #[test]
    fn given_a_record_twice_should_count_a_duplicate() {
        let verifier = unkeyed(1, 2);
        let record = value(0, None, 5);
        assert!(matches!(
            verifier.check(0, None, Some(&record)),
            Verdict::InOrder { .. }
        ));
        assert_eq!(verifier.check(0, None, Some(&record)), Verdict::Duplicate);
        // Also when it shows up in another partition (by another consumer).
        assert_eq!(verifier.check(1, None, Some(&record)), Verdict::Duplicate);
    }

    #[test]
    fn given_records_swapped_within_a_stream_should_count_a_reorder() {
        let verifier = unkeyed(1, 2);
        assert!(matches!(
            verifier.check(0, None, Some(&value(0, None, 1))),
            Verdict::InOrder { .. }
        ));
        // Another partition is another stream: a lower sequence there is in order.
        assert!(matches!(
            verifier.check(1, None, Some(&value(0, None, 0))),
            Verdict::InOrder { .. }
        ));
        assert!(matches!(
            verifier.check(0, None, Some(&value(0, None, 2))),
            Verdict::InOrder { .. }
        ));
        assert!(matches!(
            verifier.check(0, None, Some(&value(0, None, 3))),
            Verdict::InOrder { .. }
        ));
        assert!(matches!(
            verifier.check(1, None, Some(&value(0, None, 5))),
            Verdict::InOrder { .. }
        ));
        assert!(matches!(
            verifier.check(1, None, Some(&value(0, None, 4))),
            Verdict::Reordered { sent_ns: 1_004 }
        ));
        assert_eq!(verifier.lost(0, 6), 0);
    }

    #[test]
    fn given_keys_order_should_be_checked_per_key_and_keys_in_their_partition() {
        let partitions = 4;
        let keys = Arc::new(Keys::new(3, partitions));
        let verifier = Verifier::new(1, partitions, SIZE, keys.clone());
        let at = |index: u32| keys.partition(index);
        // Key 0 gets sequences 0 and 2, key 1 gets 1 and 3; interleaved is fine.
        for (sequence, key) in [(0, 0), (1, 1), (3, 1), (2, 0)] {
            let verdict = verifier.check(
                at(key),
                Some(keys.get(key)),
                Some(&value(0, Some(key), sequence)),
            );
            assert!(matches!(verdict, Verdict::InOrder { .. }), "{sequence}");
        }
        let verdict = verifier.check(at(2), Some(keys.get(2)), Some(&value(0, Some(2), 9)));
        assert!(matches!(verdict, Verdict::InOrder { .. }));
        let verdict = verifier.check(at(2), Some(keys.get(2)), Some(&value(0, Some(2), 8)));
        assert!(matches!(verdict, Verdict::Reordered { .. }));
        // A key that does not match its index, a key in the wrong partition, a missing key.
        let wrong_key = verifier.check(at(0), Some(keys.get(1)), Some(&value(0, Some(0), 20)));
        assert_eq!(wrong_key, Verdict::Corrupt);
        let elsewhere = (at(0) + 1) % partitions;
        let misplaced = verifier.check(elsewhere, Some(keys.get(0)), Some(&value(0, Some(0), 21)));
        assert_eq!(misplaced, Verdict::Corrupt);
        assert_eq!(
            verifier.check(at(0), None, Some(&value(0, Some(0), 22))),
            Verdict::Corrupt
        );
    }

    #[test]
    fn given_foreign_or_corrupt_records_should_count_them_corrupt() {
        let verifier = unkeyed(2, 1);
        let mut corrupted = value(0, None, 1);
        corrupted[50] ^= 0xff;
        assert_eq!(verifier.check(0, None, Some(&corrupted)), Verdict::Corrupt);
        assert_eq!(verifier.check(0, None, Some(b"hello")), Verdict::Corrupt);
        assert_eq!(verifier.check(0, None, None), Verdict::Corrupt);
        // An unknown producer id, a key on an unkeyed run.
        assert_eq!(
            verifier.check(0, None, Some(&value(2, None, 0))),
            Verdict::Corrupt
        );
        assert_eq!(
            verifier.check(0, Some(b"k0"), Some(&value(0, None, 0))),
            Verdict::Corrupt
        );
        // A corrupt record is not marked seen.
        assert_eq!(verifier.lost(0, 2), 2);
    }

    #[test]
    fn bitmap_should_count_across_chunks_and_partial_words() {
        let bitmap = SeenBitmap::new();
        for sequence in [
            0,
            63,
            64,
            CHUNK_RECORDS - 1,
            CHUNK_RECORDS,
            3 * CHUNK_RECORDS + 5,
        ] {
            assert!(!bitmap.insert(sequence));
        }
        assert!(bitmap.insert(64));
        assert_eq!(bitmap.count_below(64), 2);
        assert_eq!(bitmap.count_below(65), 3);
        assert_eq!(bitmap.count_below(CHUNK_RECORDS + 1), 5);
        assert_eq!(bitmap.count_below(u64::MAX), 6);
    }
}
