//! The idempotent producer's bookkeeping, without I/O: its identity, the sequence number of
//! each batch, and when the identity must be replaced.
//!
//! # The contract with the broker
//!
//! `InitProducer` hands out a producer id and an epoch. Every batch then carries them and a
//! `base_sequence` in its header; sequences count records per (producer, partition) from 0, and
//! the next batch's `base_sequence` is the previous one's plus its record count. The broker
//! appends a batch only if its sequence is the next one expected, acknowledges a batch it
//! already appended (one of the last [`PARTITION_WINDOW_BATCHES`] of that partition) with its
//! original offsets, answers a sequence gap with OUT_OF_RANGE, and a batch of an older epoch
//! with FAILED_PRECONDITION ("fenced").
//!
//! # What this gives the producer
//!
//! - **Exact retries.** A retried batch is the same bytes with the same sequence, so a retry
//!   after a lost acknowledgement is acknowledged with the original offsets, not stored twice.
//! - **Order.** A batch that overtakes an earlier one of its partition (the earlier one is
//!   being retried, say after a leader change) is refused with a gap; the producer retries it
//!   unless an earlier batch of the same partition and identity failed for good
//!   ([`Sequences::gap_worth_retrying`]). Not only while an earlier batch is unresolved: the
//!   earlier batch's acknowledgement is often handled just before the later batch's refusal,
//!   and the refused batch must then be retried too (it would be stored now), not failed.
//! - **The first batch alone.** A partition that does not know a producer accepts its batch
//!   whatever its sequence (the broker forgets idle producers, which then go on where they
//!   were), so nothing would stop a later batch from overtaking the first: each identity's
//!   first batch of a partition is sent alone, the next ones once it is acknowledged.
//! - **Generations in order.** A partition's batches of a new identity are sent only once
//!   every batch of the older identity in that partition is resolved, so a retry of the old id
//!   never lands behind a batch sent after it.
//! - **A window.** A batch is only sent while it is fewer than [`PARTITION_WINDOW_BATCHES`]
//!   batches after the oldest unresolved batch of its partition, so a retry always falls within
//!   what the broker remembers.
//! - **Gaps closed in order.** A batch refused as a gap waits until every earlier batch of its
//!   partition is resolved and is resent at once ([`Sequences::earlier_resolved`]), and while
//!   it waits no new batch of the partition is sent ([`Sequences::park`]). Otherwise every
//!   batch sent behind a retried one would overtake it, be refused, and wait a backoff of its
//!   own; under a steady load each batch the window let out meanwhile overtook those in turn,
//!   and the partition's batches stayed a backoff late for seconds after a leader change.
//!
//! # When a batch fails for good
//!
//! A batch that is neither acknowledged nor retried any more leaves a hole in its partition's
//! sequence (or an unknown outcome, after a timeout): every later sequence would be refused as
//! a gap. The producer then takes a new producer id before it sends the next batch; batches
//! already sent under the old id finish under it (their retries are still recognised). Each id
//! is a *generation*. A batch refused because a newer epoch of the id exists (another instance
//! took it over) fences the producer for good: it must not take the id back.

use std::collections::BTreeSet;

use syncline_proto::v1;

use crate::error::{Error, Result};

/// Batches of one partition the broker remembers per producer; a retry is recognised only
/// among them. The window of unresolved batches per partition is kept this small.
pub const PARTITION_WINDOW_BATCHES: u64 = 5;

/// An idempotent producer's id and epoch, from `InitProducer` ([`crate::Client::init_producer`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProducerIdentity {
    producer_id: u64,
    epoch: u32,
}

impl ProducerIdentity {
    /// Checks the broker's answer: the id is not 0 and fits the batch header's `i64`, the epoch
    /// its `i16`.
    pub(crate) fn from_wire(response: &v1::InitProducerResponse) -> Result<ProducerIdentity> {
        if response.producer_id == 0 || i64::try_from(response.producer_id).is_err() {
            return Err(Error::Protocol(format!(
                "InitProducer returned producer id {}, outside [1, {}]",
                response.producer_id,
                i64::MAX
            )));
        }
        if i16::try_from(response.producer_epoch).is_err() {
            return Err(Error::Protocol(format!(
                "InitProducer returned epoch {}, above {}",
                response.producer_epoch,
                i16::MAX
            )));
        }
        Ok(ProducerIdentity {
            producer_id: response.producer_id,
            epoch: response.producer_epoch,
        })
    }

    /// The producer id.
    pub fn producer_id(&self) -> u64 {
        self.producer_id
    }

    /// The epoch; a newer one fences older instances with the same id.
    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// The id as the batch header carries it (checked to fit by `from_wire`).
    pub(crate) fn header_producer_id(&self) -> i64 {
        i64::try_from(self.producer_id).unwrap_or(i64::MAX)
    }

    /// The epoch as the batch header carries it (checked to fit by `from_wire`).
    pub(crate) fn header_epoch(&self) -> i16 {
        i16::try_from(self.epoch).unwrap_or(i16::MAX)
    }
}

#[cfg(test)]
impl ProducerIdentity {
    pub(crate) fn for_tests(producer_id: u64, epoch: u32) -> ProducerIdentity {
        ProducerIdentity { producer_id, epoch }
    }
}

/// The idempotence fields of one sent batch and where it sits in the bookkeeping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// The identity the batch was sent under.
    pub identity: ProducerIdentity,
    /// Which identity of this producer that is (0 for the first).
    pub generation: u64,
    /// The batch's partition.
    pub partition: u32,
    /// The batch's position among the batches of its partition and generation.
    pub index: u64,
    /// The batch header's `base_sequence`.
    pub base_sequence: i32,
}

/// What [`Sequences::next`] allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Send the batch with these fields.
    Stamp(Stamp),
    /// The partition's window is full: wait until an earlier batch is resolved.
    WindowFull,
    /// A batch failed for good: take a new identity ([`Sequences::install`]) first.
    NeedsIdentity,
}

/// How a sent batch ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Acknowledged (appended now or before).
    Acknowledged,
    /// Failed for good: refused, or its outcome is unknown.
    Failed,
    /// Refused because a newer epoch of the id exists.
    Fenced(Error),
}

#[derive(Debug, Default)]
struct PartitionSequences {
    next_sequence: i32,
    next_index: u64,
    /// `(generation, index)` of every sent batch not yet resolved.
    unresolved: BTreeSet<(u64, u64)>,
    /// `(generation, index)` of the first batch that failed for good in the latest generation
    /// that had a failure: later batches of that generation leave a real gap.
    first_failed: Option<(u64, u64)>,
    /// Batches refused as a gap that wait to be resent behind the ones they overtook
    /// ([`Sequences::park`]); no new batch is sent meanwhile.
    parked: u64,
}

/// The sequence state of one idempotent producer; see the module doc.
#[derive(Debug)]
pub struct Sequences {
    identity: ProducerIdentity,
    generation: u64,
    partitions: Vec<PartitionSequences>,
    needs_identity: bool,
    fenced: Option<Error>,
}

impl Sequences {
    /// State for a producer of `partitions` partitions that starts with `identity`.
    pub fn new(identity: ProducerIdentity, partitions: u32) -> Sequences {
        Sequences {
            identity,
            generation: 0,
            partitions: (0..partitions.max(1))
                .map(|_| PartitionSequences::default())
                .collect(),
            needs_identity: false,
            fenced: None,
        }
    }

    /// The identity batches are sent under now.
    pub fn identity(&self) -> ProducerIdentity {
        self.identity
    }

    /// The error of a fenced producer, which accepts nothing any more.
    pub fn fenced(&self) -> Option<&Error> {
        self.fenced.as_ref()
    }

    /// Assigns the next batch of `partition` (of `record_count` records) its sequence, if the
    /// window allows. Fails for a fenced producer.
    pub fn next(&mut self, partition: u32, record_count: u32) -> Result<Next> {
        if let Some(error) = &self.fenced {
            return Err(error.clone());
        }
        if self.needs_identity {
            return Ok(Next::NeedsIdentity);
        }
        let generation = self.generation;
        let partitions = self.partitions.len();
        let state = self.partitions.get_mut(partition as usize).ok_or_else(|| {
            Error::Protocol(format!(
                "batch for partition {partition} of a producer with {partitions} partitions"
            ))
        })?;
        let oldest = state
            .unresolved
            .range((generation, 0)..)
            .next()
            .map(|&(_, index)| index);
        if oldest.is_some_and(|oldest| state.next_index - oldest >= PARTITION_WINDOW_BATCHES) {
            return Ok(Next::WindowFull);
        }
        // An older identity's batch still being retried would land behind this one.
        if state.unresolved.range(..(generation, 0)).next().is_some() {
            return Ok(Next::WindowFull);
        }
        // It would overtake the batches waiting to be resent, be refused as a gap and wait in
        // turn: under a steady load the partition would never get out of that.
        if state.parked > 0 {
            return Ok(Next::WindowFull);
        }
        // The first batch of an identity in a partition goes alone: a partition that does not
        // know the producer yet accepts any sequence, so a later batch that overtook the first
        // (say the first was refused by a leader not yet serving, and retried) would be stored
        // before it.
        if state.next_index > 0 && state.unresolved.contains(&(generation, 0)) {
            return Ok(Next::WindowFull);
        }
        let stamp = Stamp {
            identity: self.identity,
            generation,
            partition,
            index: state.next_index,
            base_sequence: state.next_sequence,
        };
        // Sequences are i32 in the batch header and wrap, as the broker's do.
        state.next_sequence = state
            .next_sequence
            .wrapping_add(i32::try_from(record_count).unwrap_or(i32::MAX));
        state.next_index += 1;
        state.unresolved.insert((generation, stamp.index));
        Ok(Next::Stamp(stamp))
    }

    /// Takes back the most recent stamp of its partition, for a batch that was never sent.
    pub fn unassign(&mut self, stamp: &Stamp) {
        if stamp.generation != self.generation {
            return;
        }
        if let Some(state) = self.partitions.get_mut(stamp.partition as usize) {
            if state.next_index == stamp.index + 1 {
                state.next_index = stamp.index;
                state.next_sequence = stamp.base_sequence;
                state.unresolved.remove(&(stamp.generation, stamp.index));
            }
        }
    }

    /// Starts a new generation with `identity`: sequences start again at 0.
    pub fn install(&mut self, identity: ProducerIdentity) {
        self.identity = identity;
        self.generation += 1;
        self.needs_identity = false;
        for state in &mut self.partitions {
            state.next_sequence = 0;
            state.next_index = 0;
        }
    }

    /// Records how a sent batch ended. A failure or fence of an older generation changes
    /// nothing: that identity is no longer used.
    pub fn resolve(&mut self, stamp: &Stamp, outcome: Outcome) {
        if let Some(state) = self.partitions.get_mut(stamp.partition as usize) {
            state.unresolved.remove(&(stamp.generation, stamp.index));
            if matches!(outcome, Outcome::Failed) {
                let failed = (stamp.generation, stamp.index);
                state.first_failed = match state.first_failed {
                    Some(first) if first.0 == failed.0 => Some(first.min(failed)),
                    Some(first) if first.0 > failed.0 => Some(first),
                    _ => Some(failed),
                };
            }
        }
        if stamp.generation != self.generation {
            return;
        }
        match outcome {
            Outcome::Acknowledged => {}
            Outcome::Failed => self.needs_identity = true,
            Outcome::Fenced(error) => self.fenced = Some(error),
        }
    }

    /// Notes that `stamp`, refused as a gap, waits to be resent behind the batches it
    /// overtook: until [`Sequences::unpark`], no new batch of its partition is sent, so that
    /// the refused batches go again in order before any later one.
    pub fn park(&mut self, stamp: &Stamp) {
        if let Some(state) = self.partitions.get_mut(stamp.partition as usize) {
            state.parked += 1;
        }
    }

    /// Ends a [`Sequences::park`] of `stamp`, as it is resent.
    pub fn unpark(&mut self, stamp: &Stamp) {
        if let Some(state) = self.partitions.get_mut(stamp.partition as usize) {
            state.parked = state.parked.saturating_sub(1);
        }
    }

    /// Whether every batch of `stamp`'s partition sent before it (earlier ones of its
    /// generation, and any of an older generation) is resolved. A retry of a batch refused as
    /// a gap then carries the sequence the broker expects next (unless an earlier batch failed
    /// for good, which [`Sequences::gap_worth_retrying`] tells).
    pub fn earlier_resolved(&self, stamp: &Stamp) -> bool {
        self.partitions
            .get(stamp.partition as usize)
            .is_none_or(|state| {
                state
                    .unresolved
                    .range(..(stamp.generation, stamp.index))
                    .next()
                    .is_none()
            })
    }

    /// Whether a sequence gap answered for `stamp` is worth retrying: it is not its
    /// generation's first batch, and no earlier batch of its partition and generation failed
    /// for good. Every earlier batch is then unresolved (`stamp` overtook it) or acknowledged
    /// (stored, so the retry of `stamp` is the next sequence), so the gap closes. The batch's
    /// delivery timeout bounds the retries should a broker keep answering the gap anyway.
    pub fn gap_worth_retrying(&self, stamp: &Stamp) -> bool {
        if stamp.index == 0 {
            return false;
        }
        self.partitions
            .get(stamp.partition as usize)
            .is_some_and(|state| match state.first_failed {
                Some((generation, index)) => generation != stamp.generation || index > stamp.index,
                None => true,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(sequences: &mut Sequences, partition: u32, records: u32) -> Stamp {
        match sequences.next(partition, records).unwrap() {
            Next::Stamp(stamp) => stamp,
            other => panic!("expected a stamp, got {other:?}"),
        }
    }

    /// The first batch of `partition`, acknowledged (the next ones may go together).
    fn first_acknowledged(sequences: &mut Sequences, partition: u32, records: u32) -> Stamp {
        let first = stamp(sequences, partition, records);
        sequences.resolve(&first, Outcome::Acknowledged);
        first
    }

    /// Regression (bench at R = 3): a producer's second batch overtook its first (refused by
    /// a leader not yet serving, then retried) and was stored first; the first then failed as
    /// out of order. The first batch of a partition now goes alone.
    #[test]
    fn first_batch_of_a_partition_should_go_alone() {
        let mut sequences = Sequences::new(ProducerIdentity::for_tests(1, 0), 2);
        let first = stamp(&mut sequences, 0, 3);
        assert_eq!(sequences.next(0, 1).unwrap(), Next::WindowFull);
        // Other partitions are not held.
        let other = stamp(&mut sequences, 1, 1);
        assert_eq!(other.base_sequence, 0);
        sequences.resolve(&first, Outcome::Acknowledged);
        let second = stamp(&mut sequences, 0, 1);
        let third = stamp(&mut sequences, 0, 1);
        assert_eq!((second.base_sequence, third.base_sequence), (3, 4));
    }

    #[test]
    fn sequences_should_count_records_per_partition_from_zero() {
        let identity = ProducerIdentity::for_tests(9, 2);
        let mut sequences = Sequences::new(identity, 2);
        let first = first_acknowledged(&mut sequences, 0, 3);
        let other_partition = stamp(&mut sequences, 1, 10);
        let second = stamp(&mut sequences, 0, 4);
        let third = stamp(&mut sequences, 0, 1);
        assert_eq!(
            (
                first.base_sequence,
                second.base_sequence,
                third.base_sequence
            ),
            (0, 3, 7)
        );
        assert_eq!(other_partition.base_sequence, 0);
        assert_eq!(first.identity, identity);
        assert_eq!((first.index, second.index, third.index), (0, 1, 2));
    }

    #[test]
    fn given_window_of_unresolved_batches_should_hold_the_next_until_the_oldest_resolves() {
        let mut sequences = Sequences::new(ProducerIdentity::for_tests(1, 0), 2);
        first_acknowledged(&mut sequences, 0, 1);
        let sent: Vec<Stamp> = (0..PARTITION_WINDOW_BATCHES)
            .map(|_| stamp(&mut sequences, 0, 1))
            .collect();
        assert_eq!(sequences.next(0, 1).unwrap(), Next::WindowFull);
        // Another partition is not held.
        stamp(&mut sequences, 1, 1);
        // Resolving a later batch does not help: the retry of the oldest must stay within
        // what the broker remembers.
        sequences.resolve(&sent[3], Outcome::Acknowledged);
        assert_eq!(sequences.next(0, 1).unwrap(), Next::WindowFull);
        sequences.resolve(&sent[0], Outcome::Acknowledged);
        assert_eq!(stamp(&mut sequences, 0, 1).base_sequence, 6);
    }

    #[test]
    fn given_batch_failed_for_good_should_need_a_new_identity_and_restart_sequences() {
        let mut sequences = Sequences::new(ProducerIdentity::for_tests(1, 0), 1);
        first_acknowledged(&mut sequences, 0, 2);
        let first = stamp(&mut sequences, 0, 2);
        let second = stamp(&mut sequences, 0, 2);
        sequences.resolve(&first, Outcome::Failed);
        assert_eq!(sequences.next(0, 1).unwrap(), Next::NeedsIdentity);
        let renewed = ProducerIdentity::for_tests(2, 0);
        sequences.install(renewed);
        // The old generation's batches finish under the old id first; their gaps are real now.
        assert!(!sequences.gap_worth_retrying(&second));
        assert_eq!(sequences.next(0, 1).unwrap(), Next::WindowFull);
        sequences.resolve(&second, Outcome::Failed);
        let third = stamp(&mut sequences, 0, 1);
        assert_eq!(
            (third.identity, third.generation, third.base_sequence),
            (renewed, 1, 0)
        );
        // A failure of the old generation changes nothing for the new one, whose first batch
        // goes alone.
        assert_eq!(sequences.next(0, 1).unwrap(), Next::WindowFull);
        sequences.resolve(&third, Outcome::Acknowledged);
        assert!(matches!(sequences.next(0, 1).unwrap(), Next::Stamp(_)));
    }

    #[test]
    fn given_earlier_batch_acknowledged_before_the_gap_is_handled_should_retry_the_gap() {
        let mut sequences = Sequences::new(ProducerIdentity::for_tests(1, 0), 1);
        let zeroth = first_acknowledged(&mut sequences, 0, 2);
        assert!(!sequences.gap_worth_retrying(&zeroth));
        let first = stamp(&mut sequences, 0, 2);
        let second = stamp(&mut sequences, 0, 2);
        assert!(sequences.gap_worth_retrying(&second));
        sequences.resolve(&first, Outcome::Acknowledged);
        assert!(sequences.gap_worth_retrying(&second));
    }

    #[test]
    fn given_earlier_batch_failed_for_good_should_not_retry_a_later_gap() {
        let mut sequences = Sequences::new(ProducerIdentity::for_tests(1, 0), 1);
        first_acknowledged(&mut sequences, 0, 2);
        let first = stamp(&mut sequences, 0, 2);
        let second = stamp(&mut sequences, 0, 2);
        let third = stamp(&mut sequences, 0, 2);
        sequences.resolve(&second, Outcome::Failed);
        assert!(!sequences.gap_worth_retrying(&third));
        // The batch before the failure may still close its own gap.
        assert!(sequences.gap_worth_retrying(&first));
    }

    #[test]
    fn given_a_parked_batch_should_send_no_new_batch_of_its_partition_until_it_is_unparked() {
        let mut sequences = Sequences::new(ProducerIdentity::for_tests(1, 0), 2);
        first_acknowledged(&mut sequences, 0, 2);
        first_acknowledged(&mut sequences, 1, 2);
        let first = stamp(&mut sequences, 0, 2);
        let second = stamp(&mut sequences, 0, 2);
        sequences.park(&second);
        assert_eq!(sequences.next(0, 2).unwrap(), Next::WindowFull);
        assert!(
            matches!(sequences.next(1, 2).unwrap(), Next::Stamp(_)),
            "partitions apart"
        );
        sequences.resolve(&first, Outcome::Acknowledged);
        assert_eq!(sequences.next(0, 2).unwrap(), Next::WindowFull);
        sequences.unpark(&second);
        assert!(matches!(sequences.next(0, 2).unwrap(), Next::Stamp(_)));
    }

    #[test]
    fn given_earlier_batches_unresolved_should_say_so_until_each_is_resolved() {
        let mut sequences = Sequences::new(ProducerIdentity::for_tests(1, 0), 2);
        let zeroth = first_acknowledged(&mut sequences, 0, 2);
        assert!(sequences.earlier_resolved(&zeroth));
        let first = stamp(&mut sequences, 0, 2);
        let second = stamp(&mut sequences, 0, 2);
        let other_partition = first_acknowledged(&mut sequences, 1, 2);
        assert!(sequences.earlier_resolved(&first));
        assert!(!sequences.earlier_resolved(&second));
        assert!(
            sequences.earlier_resolved(&other_partition),
            "partitions apart"
        );
        sequences.resolve(&first, Outcome::Acknowledged);
        assert!(sequences.earlier_resolved(&second));
        // A batch of an older generation still unresolved comes before every newer one.
        let third = stamp(&mut sequences, 0, 2);
        sequences.resolve(&second, Outcome::Failed);
        sequences.install(ProducerIdentity::for_tests(2, 0));
        let mut newer = third;
        newer.generation = 1;
        newer.index = 0;
        assert!(!sequences.earlier_resolved(&newer));
        sequences.resolve(&third, Outcome::Failed);
        assert!(sequences.earlier_resolved(&newer));
    }

    /// Regression (fault test, seed 15): batches of a new producer id overtook the old id's
    /// batches still being retried in the same partition.
    #[test]
    fn given_older_identity_batches_unresolved_should_hold_the_partition_new_batches() {
        let mut sequences = Sequences::new(ProducerIdentity::for_tests(1, 0), 2);
        first_acknowledged(&mut sequences, 0, 1);
        let first = stamp(&mut sequences, 0, 1);
        let second = stamp(&mut sequences, 0, 1);
        sequences.resolve(&first, Outcome::Failed);
        sequences.install(ProducerIdentity::for_tests(2, 0));
        assert_eq!(sequences.next(0, 1).unwrap(), Next::WindowFull);
        // Another partition has nothing of the old id in flight.
        assert_eq!(stamp(&mut sequences, 1, 1).generation, 1);
        sequences.resolve(&second, Outcome::Failed);
        let third = stamp(&mut sequences, 0, 1);
        assert_eq!((third.generation, third.base_sequence), (1, 0));
    }

    #[test]
    fn given_fence_should_refuse_every_later_batch() {
        let mut sequences = Sequences::new(ProducerIdentity::for_tests(1, 0), 1);
        let first = stamp(&mut sequences, 0, 1);
        let fence = Error::ProducerFenced {
            producer_id: 1,
            epoch: 0,
            message: "fenced".into(),
        };
        sequences.resolve(&first, Outcome::Fenced(fence));
        assert!(matches!(
            sequences.next(0, 1),
            Err(Error::ProducerFenced { producer_id: 1, .. })
        ));
        assert!(sequences.fenced().is_some());
    }

    #[test]
    fn unassign_should_give_the_sequence_back_to_the_next_batch() {
        let mut sequences = Sequences::new(ProducerIdentity::for_tests(1, 0), 1);
        first_acknowledged(&mut sequences, 0, 3);
        let unsent = stamp(&mut sequences, 0, 2);
        sequences.unassign(&unsent);
        let next = stamp(&mut sequences, 0, 1);
        assert_eq!((next.base_sequence, next.index), (3, 1));
    }

    #[test]
    fn identity_from_the_broker_should_fit_the_batch_header() {
        let ok = ProducerIdentity::from_wire(&v1::InitProducerResponse {
            producer_id: 77,
            producer_epoch: 3,
        })
        .unwrap();
        assert_eq!((ok.header_producer_id(), ok.header_epoch()), (77, 3));
        for (producer_id, producer_epoch) in [(0, 0), (u64::MAX, 0), (1, 40_000)] {
            assert!(matches!(
                ProducerIdentity::from_wire(&v1::InitProducerResponse {
                    producer_id,
                    producer_epoch
                }),
                Err(Error::Protocol(_))
            ));
        }
    }
}
