//! The producer's batching logic, without I/O or clocks: which partition a record goes to, and
//! when an open batch is sealed (full, lingered long enough, or flushed).
//!
//! Each partition has at most one open batch, a [`BatchBuilder`] that records are encoded into
//! as they arrive, so a batch is encoded exactly once. A sealed batch leaves as its builder: the
//! header (with the idempotent producer's sequence, which is assigned when the batch is sent)
//! and the CRC are written by [`finish_batch`]. A batch is sealed when the next record
//! would take it over `batch_bytes_max`, when it reaches `batch_bytes_max`, when its linger
//! deadline (first record + linger) passes, or on flush. A record bigger than `batch_bytes_max`
//! travels alone in its own batch. Time is passed in by the caller (tests use fake instants).
//!
//! Each batch has one outcome (`super::delivery`) that its records' futures share: the append
//! returns it with the record's index, and record `i` gets offset `base_offset + i`. Each
//! record also carries a waiter `W` (the producer's: the record's share of the memory budget),
//! handed back in record order with the sealed batch.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use syncline_proto::batch::{BatchBuilder, BatchError, HEADER_LEN};
use syncline_proto::partitioner::partition_for_key;

use super::delivery::{BatchOutcome, Completion};
use super::idempotence::Stamp;

/// Where records without a key go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnkeyedPartitioning {
    /// All unkeyed records go to one partition until its batch is sealed, then to the next
    /// partition: full batches, and still an even spread over time.
    #[default]
    Sticky,
    /// Each unkeyed record goes to the next partition in turn.
    RoundRobin,
}

/// Upper bound of a record's encoded size, length prefix included (see the record layout in
/// `syncline_proto::batch`): length varint (5) + attributes (1) + timestamp delta zigzag i64 (10)
/// + offset delta varint (5) + key length (5) + key + value length (5) + value + header count
///   (5) + per header: key length (5) + key + value length (5) + value.
pub fn record_size_max<'a>(
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    headers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
) -> usize {
    const FIXED: usize = 5 + 1 + 10 + 5 + 5 + 5 + 5;
    const PER_HEADER: usize = 5 + 5;
    let headers: usize = headers
        .into_iter()
        .map(|(key, value)| PER_HEADER + key.len() + value.len())
        .sum();
    FIXED + key.map_or(0, <[u8]>::len) + value.map_or(0, <[u8]>::len) + headers
}

/// One record to append.
#[derive(Debug, Clone, Copy)]
pub struct RecordRef<'a> {
    /// Milliseconds since the Unix epoch.
    pub timestamp: i64,
    /// The key; `None` for an unkeyed record.
    pub key: Option<&'a [u8]>,
    /// The value; `None` is a tombstone.
    pub value: Option<&'a [u8]>,
    /// Headers in order.
    pub headers: &'a [(&'a str, &'a [u8])],
}

/// A batch that left the accumulator, ready to send.
#[derive(Debug)]
pub struct SealedBatch<W> {
    /// Its partition.
    pub partition: u32,
    /// The records, encoded; [`finish_batch`] adds the header.
    pub builder: BatchBuilder,
    /// Number of records, equal to `waiters.len()`.
    pub record_count: u32,
    /// One waiter per record, in record order.
    pub waiters: Vec<W>,
    /// The outcome its records' futures read.
    pub completion: Completion,
    /// When its first record was appended: the delivery timeout counts from here.
    pub opened_at: Instant,
}

/// Writes a sealed batch's header, with the idempotent producer's fields when `stamp` is
/// given, and its CRC. Fails with an error kept from encoding a record (every record of the
/// batch then fails with it).
pub fn finish_batch(builder: BatchBuilder, stamp: Option<&Stamp>) -> Result<Bytes, BatchError> {
    match stamp {
        Some(stamp) => builder
            .producer(
                stamp.identity.header_producer_id(),
                stamp.identity.header_epoch(),
                stamp.base_sequence,
            )
            .finish(),
        None => builder.finish(),
    }
}

/// What [`Accumulator::append`] did.
#[derive(Debug)]
pub struct Appended<W> {
    /// The partition the record went to.
    pub partition: u32,
    /// Batches sealed by this append (the previous batch that the record did not fit into,
    /// and/or the record's own batch if it became full), in the order to send them.
    pub sealed: Vec<SealedBatch<W>>,
    /// Whether the record opened a new batch that is still open (a new linger deadline).
    pub opened: bool,
    /// The outcome of the record's batch, and the record's index in it.
    pub outcome: Arc<BatchOutcome>,
    pub index: u32,
}

#[derive(Debug)]
struct OpenBatch<W> {
    builder: BatchBuilder,
    waiters: Vec<W>,
    completion: Completion,
    opened_at: Instant,
    deadline: Instant,
}

/// Capacity a new batch buffer starts with: enough for many small records without regrowing,
/// small enough that thousands of partitions with one record each stay cheap.
const INITIAL_BATCH_CAPACITY_BYTES: usize = 16 * 1024;

/// Per-partition open batches; see the module doc.
#[derive(Debug)]
pub struct Accumulator<W> {
    partitions: u32,
    batch_bytes_max: usize,
    linger: Duration,
    unkeyed: UnkeyedPartitioning,
    /// The sticky partition, or the next round-robin partition.
    unkeyed_next: u32,
    open: Vec<Option<OpenBatch<W>>>,
    /// Per partition, the bytes and records of its last sealed batch: a new batch reserves as
    /// much, so a steady stream encodes without growing (and copying) its buffer. Growing from
    /// 16 KiB to 1 MiB copied each batch about once more (`realloc`, ~4% of a 1 KiB
    /// producer's CPU).
    last_sealed: Vec<(usize, usize)>,
}

impl<W> Accumulator<W> {
    /// An accumulator for a topic of `partitions` partitions (0 is treated as 1). `seed` picks
    /// the first partition for unkeyed records, so that many producers do not all start on
    /// partition 0.
    pub fn new(
        partitions: u32,
        batch_bytes_max: usize,
        linger: Duration,
        unkeyed: UnkeyedPartitioning,
        seed: u32,
    ) -> Self {
        let partitions = partitions.max(1);
        Accumulator {
            partitions,
            batch_bytes_max,
            linger,
            unkeyed,
            unkeyed_next: seed % partitions,
            open: (0..partitions).map(|_| None).collect(),
            last_sealed: vec![(0, 0); partitions as usize],
        }
    }

    /// The number of partitions.
    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// The partition for a record with this key: `partition_for_key` for a keyed record (the
    /// broker rejects any other), the unkeyed policy otherwise. Advances round-robin.
    fn choose_partition(&mut self, key: Option<&[u8]>) -> u32 {
        match key {
            Some(key) => partition_for_key(key, self.partitions),
            None => {
                let partition = self.unkeyed_next;
                if self.unkeyed == UnkeyedPartitioning::RoundRobin {
                    self.unkeyed_next = (partition + 1) % self.partitions;
                }
                partition
            }
        }
    }

    fn would_overflow(&self, partition: u32, record_bytes: usize) -> bool {
        match self.open.get(partition as usize) {
            Some(Some(batch)) => {
                !batch.builder.is_empty()
                    && batch.builder.encoded_len().saturating_add(record_bytes)
                        > self.batch_bytes_max
            }
            _ => false,
        }
    }

    /// Encodes `record` into its partition's open batch (opening one at `now` if needed) and
    /// returns the batches that this sealed.
    #[cfg(test)]
    pub fn append(&mut self, record: RecordRef<'_>, now: Instant, waiter: W) -> Appended<W> {
        let record_bytes =
            record_size_max(record.key, record.value, record.headers.iter().copied());
        self.append_sized(record, record_bytes, || now, waiter)
    }

    /// [`Accumulator::append`] for a caller that already computed `record_size_max` of the
    /// record; `now` is only read when a batch opens (the hot path reads no clock).
    pub fn append_sized(
        &mut self,
        record: RecordRef<'_>,
        record_bytes: usize,
        now: impl FnOnce() -> Instant,
        waiter: W,
    ) -> Appended<W> {
        let mut sealed = Vec::new();
        let mut partition = self.choose_partition(record.key);
        if self.would_overflow(partition, record_bytes) {
            sealed.extend(self.seal(partition));
            if record.key.is_none() && self.unkeyed == UnkeyedPartitioning::Sticky {
                // The sticky partition moved on; follow it.
                partition = self.choose_partition(None);
                if self.would_overflow(partition, record_bytes) {
                    sealed.extend(self.seal(partition));
                }
            }
        }
        let linger = self.linger;
        let slot = &mut self.open[partition as usize];
        let mut opened = slot.is_none();
        let batch_bytes_max = self.batch_bytes_max;
        let (last_bytes, last_records) = self.last_sealed[partition as usize];
        let batch = slot.get_or_insert_with(|| {
            let now = now();
            OpenBatch {
                // Room for the header and this record, and for as much as the partition's
                // last batch held, or a modest start that grows.
                builder: BatchBuilder::with_capacity(
                    HEADER_LEN
                        + record_bytes.max(
                            INITIAL_BATCH_CAPACITY_BYTES
                                .max(last_bytes)
                                .min(batch_bytes_max),
                        ),
                ),
                waiters: Vec::with_capacity(last_records.max(1)),
                completion: Completion::default(),
                opened_at: now,
                deadline: now + linger,
            }
        });
        batch
            .builder
            .push(record.timestamp, record.key, record.value, record.headers);
        let index = batch.waiters.len() as u32;
        batch.waiters.push(waiter);
        let outcome = batch.completion.outcome().clone();
        if batch.builder.encoded_len() >= self.batch_bytes_max {
            sealed.extend(self.seal(partition));
            opened = false;
        }
        Appended {
            partition,
            sealed,
            opened,
            outcome,
            index,
        }
    }

    /// Seals the open batch of `partition`, if any. Moves the sticky partition on when it was
    /// this one.
    fn seal(&mut self, partition: u32) -> Option<SealedBatch<W>> {
        let batch = self.open.get_mut(partition as usize)?.take()?;
        if self.unkeyed == UnkeyedPartitioning::Sticky && self.unkeyed_next == partition {
            self.unkeyed_next = (partition + 1) % self.partitions;
        }
        let record_count = batch.builder.record_count();
        self.last_sealed[partition as usize] = (batch.builder.encoded_len(), batch.waiters.len());
        Some(SealedBatch {
            partition,
            builder: batch.builder,
            record_count,
            waiters: batch.waiters,
            completion: batch.completion,
            opened_at: batch.opened_at,
        })
    }

    /// The earliest linger deadline of the open batches.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.open.iter().flatten().map(|batch| batch.deadline).min()
    }

    /// Seals every batch whose linger deadline is at or before `now`, in partition order.
    pub fn drain_expired(&mut self, now: Instant) -> Vec<SealedBatch<W>> {
        let expired: Vec<u32> = (0..self.partitions)
            .filter(|&partition| {
                matches!(&self.open[partition as usize], Some(batch) if batch.deadline <= now)
            })
            .collect();
        expired
            .into_iter()
            .filter_map(|partition| self.seal(partition))
            .collect()
    }

    /// Seals every open batch (flush), in partition order.
    pub fn drain_all(&mut self) -> Vec<SealedBatch<W>> {
        (0..self.partitions)
            .filter_map(|partition| self.seal(partition))
            .collect()
    }

    /// Whether no batch is open.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.open.iter().all(Option::is_none)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use syncline_proto::batch::Batch;

    use super::*;

    const LINGER: Duration = Duration::from_millis(5);

    fn record<'a>(key: Option<&'a [u8]>, value: &'a [u8]) -> RecordRef<'a> {
        RecordRef {
            timestamp: 1_700_000_000_000,
            key,
            value: Some(value),
            headers: &[],
        }
    }

    fn decoded_values(batch: SealedBatch<u32>) -> Vec<Vec<u8>> {
        let bytes = finish_batch(batch.builder, None).unwrap();
        Batch::parse(bytes)
            .unwrap()
            .records()
            .map(|record| record.unwrap().value.unwrap().to_vec())
            .collect()
    }

    #[test]
    fn given_keyed_records_should_go_to_partition_for_key() {
        let mut accumulator = Accumulator::new(7, 1 << 20, LINGER, Default::default(), 0);
        let now = Instant::now();
        for i in 0..200u32 {
            let key = format!("user-{i}");
            let appended = accumulator.append(record(Some(key.as_bytes()), b"v"), now, i);
            assert_eq!(appended.partition, partition_for_key(key.as_bytes(), 7));
            assert!(appended.sealed.is_empty());
        }
    }

    #[test]
    fn given_sticky_policy_unkeyed_records_should_stay_until_the_batch_is_sealed() {
        // Batches of exactly 3 records: the 4th does not fit by the size bound.
        let encoded_one = {
            let mut builder = BatchBuilder::new();
            builder.push(1_700_000_000_000, None, Some(b"value"), &[]);
            builder.encoded_len() - HEADER_LEN
        };
        let batch_bytes_max =
            HEADER_LEN + 2 * encoded_one + record_size_max(None, Some(b"value"), []);
        let mut accumulator =
            Accumulator::new(3, batch_bytes_max, LINGER, UnkeyedPartitioning::Sticky, 1);
        let now = Instant::now();
        let mut partitions = Vec::new();
        let mut sealed_partitions = Vec::new();
        for i in 0..12u32 {
            let appended = accumulator.append(record(None, b"value"), now, i);
            partitions.push(appended.partition);
            sealed_partitions.extend(appended.sealed.iter().map(|batch| batch.partition));
        }
        // Runs of three on one partition, starting at the seed, moving on in turn.
        assert_eq!(partitions, [1, 1, 1, 2, 2, 2, 0, 0, 0, 1, 1, 1]);
        assert_eq!(sealed_partitions, [1, 2, 0]);
    }

    #[test]
    fn given_round_robin_policy_unkeyed_records_should_cycle() {
        let mut accumulator =
            Accumulator::new(4, 1 << 20, LINGER, UnkeyedPartitioning::RoundRobin, 2);
        let now = Instant::now();
        let partitions: Vec<u32> = (0..8)
            .map(|i| accumulator.append(record(None, b"v"), now, i).partition)
            .collect();
        assert_eq!(partitions, [2, 3, 0, 1, 2, 3, 0, 1]);
    }

    #[test]
    fn given_record_that_does_not_fit_should_seal_the_batch_and_open_a_new_one() {
        let mut accumulator = Accumulator::new(1, 200, LINGER, Default::default(), 0);
        let now = Instant::now();
        let value = [7u8; 40];
        let mut sealed = Vec::new();
        for i in 0..10u32 {
            let appended = accumulator.append(record(None, &value), now, i);
            sealed.extend(appended.sealed);
        }
        sealed.extend(accumulator.drain_all());
        assert!(accumulator.is_empty());
        assert!(sealed.len() > 2);
        let waiters: Vec<u32> = sealed.iter().flat_map(|b| b.waiters.clone()).collect();
        assert_eq!(waiters, (0..10).collect::<Vec<_>>(), "record order kept");
        for batch in sealed {
            let bytes = batch.builder.encoded_len();
            assert!(bytes <= 200, "batch of {bytes} bytes");
            let records = batch.waiters.len();
            assert_eq!(batch.record_count as usize, records);
            assert_eq!(decoded_values(batch), vec![value.to_vec(); records]);
        }
    }

    #[test]
    fn given_record_bigger_than_a_batch_should_travel_alone() {
        let mut accumulator = Accumulator::new(1, 100, LINGER, Default::default(), 0);
        let now = Instant::now();
        assert!(accumulator
            .append(record(None, b"small"), now, 0)
            .sealed
            .is_empty());
        let big = [1u8; 500];
        let appended = accumulator.append(record(None, &big), now, 1);
        // The open batch is sealed first, then the big record's own batch, which is full.
        assert_eq!(appended.sealed.len(), 2);
        assert_eq!(appended.sealed[0].waiters, [0]);
        assert_eq!(appended.sealed[1].waiters, [1]);
        let mut sealed = appended.sealed;
        assert_eq!(decoded_values(sealed.remove(1)), [big.to_vec()]);
        assert!(!appended.opened);
        assert!(accumulator.is_empty());
    }

    #[test]
    fn given_linger_should_seal_only_at_the_deadline_of_the_first_record() {
        let mut accumulator = Accumulator::new(2, 1 << 20, LINGER, Default::default(), 0);
        let start = Instant::now();
        assert!(
            accumulator
                .append(record(Some(b"a"), b"1"), start, 0)
                .opened
        );
        let later = start + Duration::from_millis(3);
        let key_b_partition = partition_for_key(b"b", 2);
        let appended = accumulator.append(record(Some(b"b"), b"2"), later, 1);
        assert_eq!(
            appended.opened,
            key_b_partition != partition_for_key(b"a", 2)
        );
        assert_eq!(accumulator.next_deadline(), Some(start + LINGER));

        assert!(accumulator
            .drain_expired(start + LINGER - Duration::from_millis(1))
            .is_empty());
        let expired = accumulator.drain_expired(start + LINGER);
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].opened_at, start);
        assert_eq!(expired[0].partition, partition_for_key(b"a", 2));

        let remaining = accumulator.drain_all();
        let waiters: BTreeSet<u32> = expired
            .iter()
            .chain(&remaining)
            .flat_map(|batch| batch.waiters.clone())
            .collect();
        assert_eq!(waiters, BTreeSet::from([0, 1]));
        assert_eq!(accumulator.next_deadline(), None);
    }

    #[test]
    fn given_zero_linger_should_be_due_at_once() {
        let mut accumulator = Accumulator::new(1, 1 << 20, Duration::ZERO, Default::default(), 0);
        let now = Instant::now();
        accumulator.append(record(None, b"x"), now, 0);
        accumulator.append(record(None, b"y"), now, 1);
        let mut expired = accumulator.drain_expired(now);
        assert_eq!(expired.len(), 1);
        assert_eq!(
            decoded_values(expired.remove(0)),
            [b"x".to_vec(), b"y".to_vec()]
        );
    }

    #[test]
    fn finished_batch_should_carry_the_stamped_producer_fields() {
        use crate::producer::idempotence::{Next, ProducerIdentity, Sequences};
        let mut accumulator = Accumulator::new(1, 1 << 20, LINGER, Default::default(), 0);
        accumulator.append(record(None, b"x"), Instant::now(), 0);
        let batch = accumulator.drain_all().remove(0);
        let mut sequences = Sequences::new(ProducerIdentity::for_tests(42, 3), 1);
        let Ok(Next::Stamp(stamp)) = sequences.next(0, 1) else {
            panic!("no stamp");
        };
        let bytes = finish_batch(batch.builder, Some(&stamp)).unwrap();
        let header = *Batch::parse(bytes).unwrap().header();
        assert_eq!(
            (
                header.producer_id,
                header.producer_epoch,
                header.base_sequence
            ),
            (42, 3, 0)
        );
    }

    #[test]
    fn record_size_max_should_bound_the_encoded_size() {
        let headers: [(&str, &[u8]); 2] = [("trace", b"abc"), ("", b"")];
        let key = [9u8; 300];
        let value = [8u8; 20_000];
        let mut builder = BatchBuilder::new();
        let before = builder.encoded_len();
        builder.push(-1, Some(&key), Some(&value), &headers);
        let actual = builder.encoded_len() - before;
        let bound = record_size_max(Some(&key), Some(&value), headers);
        assert!(actual <= bound, "{actual} > {bound}");
        assert!(bound - actual < 64, "bound {bound} too loose for {actual}");
    }
}
