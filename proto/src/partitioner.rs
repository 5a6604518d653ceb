//! The key partitioner: which partition a keyed record belongs to.
//!
//! `partition = (murmur2(key) & 0x7fff_ffff) % partitions`, with Kafka's 32-bit murmur2 (seed
//! `0x9747b28c`). Kafka's choice, so keys land in the same partitions as with Kafka's default
//! partitioner, and any language can reproduce it from this page. It is part of the wire
//! contract: the broker rejects a keyed record sent to another partition, so this function must
//! never change; the test vectors below (Kafka's own) pin it.

/// Kafka's murmur2 hash of `data`.
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let length = data.len();
    let mut h: u32 = SEED ^ (length as u32);
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition of `key` in a topic of `partitions` partitions (`partitions` >= 1; 0 is
/// treated as 1).
pub fn partition_for_key(key: &[u8], partitions: u32) -> u32 {
    let positive = (murmur2(key) as u32) & 0x7fff_ffff;
    positive % partitions.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_kafka_test_vectors_when_hashed_should_match() {
        // From Kafka's UtilsTest.testMurmur2.
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            (b"abc", 479_470_107),
        ];
        for (key, expected) in cases {
            assert_eq!(murmur2(key), expected, "{}", String::from_utf8_lossy(key));
        }
    }

    #[test]
    fn given_keys_when_partitioned_should_be_stable_and_in_range() {
        assert_eq!(
            partition_for_key(b"foobar", 12),
            ((-790_332_482i32 as u32) & 0x7fff_ffff) % 12
        );
        assert_eq!(partition_for_key(b"user-1", 1), 0);
        assert_eq!(partition_for_key(b"user-1", 0), 0);
        for i in 0..1000u32 {
            assert!(partition_for_key(&i.to_le_bytes(), 7) < 7);
        }
    }
}
