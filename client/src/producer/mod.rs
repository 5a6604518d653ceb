//! The batching [`Producer`].
//!
//! # How a record travels
//!
//! 1. [`Producer::enqueue`] (or [`Producer::send`]) takes room for the record in the producer's
//!    memory budget (`buffer_bytes_max`; waits while it is full), picks the partition
//!    (`partition_for_key` for keyed records, sticky or round-robin otherwise) and encodes the
//!    record straight into that partition's open batch. Nothing is copied or encoded again.
//! 2. The batch is sealed when it is full (`batch_bytes_max`), when `linger` has passed since its
//!    first record, or on [`Producer::flush`].
//! 3. A dispatcher task sends sealed batches in the order they were sealed on a
//!    `ProduceStream` call to the partition's leader (one call per node: in a cluster each
//!    carries the batches of the partitions that node leads), at most `in_flight_max` requests
//!    at a time in all; each response is matched to its request by correlation id.
//! 4. A response completes the delivery future of every record in the batch with its offset
//!    (`base_offset + index`). A transient failure (broker unreachable or UNAVAILABLE, or a node
//!    that no longer leads the partition) is retried with the same bytes, routed by the
//!    client's refreshed view of the cluster, with backoff, until `delivery_timeout` after the batch's
//!    first record; then the records fail with [`Error::DeliveryTimeout`]. Other failures fail
//!    the records at once with the broker's error.
//!
//! # Leader changes
//!
//! A per-request error on the stream is only a code and a message, so the producer reads the
//! broker's not-leader message (FAILED_PRECONDITION, "this node does not lead partition P of
//! topic `T`; ..."):
//! - naming the new leader: the client's view takes it and the batch is resent there at once
//!   (at most [`REDIRECTS_MAX`] times in a row without a pause);
//! - naming none (an election runs), or UNAVAILABLE, or a broken stream (the node died): the
//!   view is refreshed before the next attempt, and the batch waits with the backoff until a
//!   node leads again, within `delivery_timeout`.
//!
//! Every attempt is the same bytes: with idempotence the same producer id, epoch and sequence,
//! so a batch the old leader stored (and replicated) before its answer was lost is recognised
//! by the new leader and acknowledged with its original offsets, and each record's future is
//! completed once. Batches of a partition resent out of order are put back in order by the
//! sequence check (see "Ordering").
//!
//! # Idempotence (on by default)
//!
//! With [`ProducerConfig::idempotent`] the producer takes a producer id (`InitProducer`) when
//! it is created, and the dispatcher gives each batch its sequence in its partition as it sends
//! it (rules and failure handling: the `idempotence` module). A retry is the same bytes with
//! the same sequence, so the broker stores a batch once however often it is retried, and
//! acknowledges a repeat with the original offsets. At most
//! [`PARTITION_WINDOW_BATCHES`](idempotence::PARTITION_WINDOW_BATCHES) batches of one partition
//! are unresolved at a time; the dispatcher waits when a partition's window is full. When
//! another instance re-initialises the same producer id, this one is fenced: its records fail
//! with [`Error::ProducerFenced`] and it accepts no more.
//!
//! # Ordering
//!
//! Batches of one partition are sent in order on one stream. With idempotence records of one
//! key are stored in send order even across retries and leader changes: the broker refuses a
//! batch that overtakes an unacknowledged earlier one (a sequence gap) and the producer retries
//! it behind that one, as soon as every earlier batch of its partition is resolved (the
//! backoff bounds that wait); after a batch fails for good, the partition's batches under the new
//! producer id wait until the old id's batches of that partition are resolved.
//! Without idempotence a retry after a broken connection can land behind a later batch of the
//! same partition; set `in_flight_max = 1` when order must hold even then.
//!
//! Dropping the last handle of a producer still delivers what was sent; [`Producer::close`]
//! also waits for it.

mod accumulator;
mod connection;
mod delivery;
mod idempotence;

pub use accumulator::UnkeyedPartitioning;
pub use delivery::{Delivery, DeliveryFuture};
pub use idempotence::{ProducerIdentity, PARTITION_WINDOW_BATCHES};

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use syncline_proto::batch::{BATCH_LEN_MAX, HEADER_LEN, MAX_HEADERS_PER_RECORD};
use syncline_proto::error_details::not_leader_status;
use syncline_proto::v1;
use tokio::sync::{mpsc, watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use self::accumulator::{finish_batch, record_size_max, Accumulator, RecordRef, SealedBatch};
use self::connection::{Attempt, Connection};
use self::delivery::Completion;
use self::idempotence::{Next, Outcome, Sequences, Stamp};
use crate::client::Client;
use crate::error::{is_producer_fenced, not_leader_in_message, Error, Result};
use crate::routing::{Observed, Target, REDIRECTS_MAX};

/// The broker's default `max_batch_bytes`: the largest batch it accepts unless configured
/// otherwise.
pub const BROKER_BATCH_BYTES_DEFAULT: usize = 8 * 1024 * 1024;

/// How long the broker waits before it acknowledges a produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Acks {
    /// No wait: the broker answers as soon as it has assigned offsets.
    None,
    /// Written to the broker's page cache (lost if the machine crashes before an fsync).
    Leader,
    /// Covered by an fsync: survives a crash or power loss. The default.
    #[default]
    Durable,
}

impl Acks {
    pub(crate) fn to_wire(self) -> v1::Acks {
        match self {
            Acks::None => v1::Acks::None,
            Acks::Leader => v1::Acks::Leader,
            Acks::Durable => v1::Acks::Durable,
        }
    }
}

/// Producer settings. The defaults favour safety (durable acks, idempotence) and throughput
/// (batches of up to 1 MiB, 5 ms linger, 8 requests in flight).
#[derive(Debug, Clone)]
pub struct ProducerConfig {
    /// How long a batch waits for more records after its first one.
    pub linger: Duration,
    /// Largest batch, in encoded bytes (header included); a single bigger record still goes,
    /// alone in its batch.
    pub batch_bytes_max: usize,
    /// Most produce requests awaiting a response at once.
    pub in_flight_max: usize,
    /// Memory for records not yet acknowledged; `send` waits when it is used up.
    pub buffer_bytes_max: usize,
    /// Acknowledgement level; durable by default.
    pub acks: Acks,
    /// How long after its first record a batch may take to be acknowledged, retries
    /// included. Then its records fail with [`Error::DeliveryTimeout`].
    pub delivery_timeout: Duration,
    /// First pause before a retry; doubled after each failure up to `retry_backoff_max`.
    pub retry_backoff: Duration,
    /// Longest pause between retries.
    pub retry_backoff_max: Duration,
    /// Where records without a key go.
    pub unkeyed_partitioning: UnkeyedPartitioning,
    /// Take a producer id and number every batch, so that retries never store a batch twice
    /// and keep the order of each partition (see the module doc). On by default.
    ///
    /// Turning it off saves the `InitProducer` call at start and the per-batch bookkeeping,
    /// and lets `in_flight_max` batches of one partition be unacknowledged at once instead of
    /// [`PARTITION_WINDOW_BATCHES`]; but then a batch retried after a lost answer (a leader
    /// change, a dropped connection) may be stored twice, and may land behind a later batch of
    /// its partition. Turn it off only for a broker or proxy that refuses `InitProducer`, for
    /// data where duplicates do not matter, or for short-lived single writes that should not
    /// count as a producer whose recent batches compaction keeps whole.
    pub idempotent: bool,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        ProducerConfig {
            linger: Duration::from_millis(5),
            batch_bytes_max: 1024 * 1024,
            in_flight_max: 8,
            buffer_bytes_max: 64 * 1024 * 1024,
            acks: Acks::Durable,
            delivery_timeout: Duration::from_secs(30),
            retry_backoff: Duration::from_millis(100),
            retry_backoff_max: Duration::from_secs(1),
            unkeyed_partitioning: UnkeyedPartitioning::Sticky,
            idempotent: true,
        }
    }
}

/// Bound on `in_flight_max`: each in-flight request holds a whole batch in memory and a slot in
/// the broker's per-stream limit.
const IN_FLIGHT_MAX_LIMIT: usize = 1024;
/// Smallest useful batch: a header and a small record.
const BATCH_BYTES_MIN: usize = HEADER_LEN + 64;

impl ProducerConfig {
    /// Checks each field against its bounds and the relations between them.
    pub fn validate(&self) -> Result<()> {
        let invalid = |key: &'static str, reason: String| Err(Error::InvalidConfig { key, reason });
        if !(BATCH_BYTES_MIN..=BATCH_LEN_MAX as usize).contains(&self.batch_bytes_max) {
            return invalid(
                "batch_bytes_max",
                format!(
                    "{} is outside [{BATCH_BYTES_MIN}, {BATCH_LEN_MAX}]",
                    self.batch_bytes_max
                ),
            );
        }
        if !(1..=IN_FLIGHT_MAX_LIMIT).contains(&self.in_flight_max) {
            return invalid(
                "in_flight_max",
                format!(
                    "{} is outside [1, {IN_FLIGHT_MAX_LIMIT}]",
                    self.in_flight_max
                ),
            );
        }
        if self.buffer_bytes_max < self.batch_bytes_max
            || u32::try_from(self.buffer_bytes_max).is_err()
        {
            return invalid(
                "buffer_bytes_max",
                format!(
                    "{} must be at least batch_bytes_max ({}) and at most {}",
                    self.buffer_bytes_max,
                    self.batch_bytes_max,
                    u32::MAX
                ),
            );
        }
        if self.delivery_timeout.is_zero() || self.delivery_timeout < self.linger {
            return invalid(
                "delivery_timeout",
                format!(
                    "{:?} must be above 0 and at least linger ({:?})",
                    self.delivery_timeout, self.linger
                ),
            );
        }
        if self.retry_backoff.is_zero() || self.retry_backoff > self.retry_backoff_max {
            return invalid(
                "retry_backoff",
                format!(
                    "{:?} must be above 0 and at most retry_backoff_max ({:?})",
                    self.retry_backoff, self.retry_backoff_max
                ),
            );
        }
        Ok(())
    }
}

/// A batching producer for one topic; see the module doc. Cheap to clone: clones share the
/// batches, the connection and the budget.
#[derive(Debug, Clone)]
pub struct Producer {
    handle: Arc<Handle>,
}

/// Dropped with the last [`Producer`] clone: its `watch` sender's drop tells the dispatcher to
/// seal what is left and stop.
#[derive(Debug)]
struct Handle {
    shared: Arc<Shared>,
    _closer: watch::Sender<()>,
}

/// One record's place in a batch: its share of the memory budget, in permits (bytes). The
/// permits are taken from the semaphore and forgotten per record, and given back once per
/// batch by a [`Budget`].
type Waiter = u32;

/// A batch's share of the memory budget, given back to the semaphore when dropped.
#[derive(Debug)]
struct Budget {
    semaphore: Arc<Semaphore>,
    permits: usize,
}

impl Budget {
    /// The budget of records whose permits were forgotten.
    fn of(semaphore: &Arc<Semaphore>, waiters: &[Waiter]) -> Budget {
        Budget {
            semaphore: semaphore.clone(),
            permits: waiters.iter().map(|&permits| permits as usize).sum(),
        }
    }
}

impl Drop for Budget {
    fn drop(&mut self) {
        self.semaphore.add_permits(self.permits);
    }
}

/// A sealed batch with its place in the flush order.
#[derive(Debug)]
struct Ready {
    batch: SealedBatch<Waiter>,
    ticket: Ticket,
}

/// A batch on its way: sent at least once, waiting for its acknowledgement.
#[derive(Debug)]
struct Sent {
    partition: u32,
    record_count: u32,
    /// When the first attempt's request was handed to the connection.
    submitted_at: std::time::Instant,
    /// The batch's records' memory budget, returned when the batch is resolved.
    _budget: Budget,
    /// The outcome its records' futures read.
    completion: Completion,
    opened_at: std::time::Instant,
    /// Its idempotence fields, when the producer is idempotent.
    stamp: Option<Stamp>,
    _ticket: Ticket,
}

#[derive(Debug)]
struct Shared {
    client: Client,
    topic: String,
    config: ProducerConfig,
    accumulator: Mutex<Accumulator<Waiter>>,
    ready: mpsc::UnboundedSender<Ready>,
    /// A batch opened: the dispatcher's next linger deadline may be earlier.
    batch_opened: Notify,
    budget: Arc<Semaphore>,
    in_flight: Arc<Semaphore>,
    tracker: Arc<Tracker>,
    /// The open `ProduceStream` per node, by address.
    connections: Mutex<HashMap<Arc<str>, Arc<Connection>>>,
    next_correlation_id: AtomicU64,
    /// Sequence state of an idempotent producer.
    sequences: Option<Mutex<Sequences>>,
    /// A sent batch was resolved: a partition's window may have room again.
    sequence_resolved: Notify,
    /// Set once the sequences say the producer is fenced: `enqueue` reads this flag per record
    /// instead of taking the sequences' lock (a per-record lock cost the idempotent producer
    /// a few percent of its throughput).
    fenced: AtomicBool,
    /// Request -> acknowledgement time of batches acknowledged at their first attempt, µs.
    batch_latency: Mutex<Option<hdrhistogram::Histogram<u64>>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // No code path leaves these structures half-updated on panic.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A histogram of 1 µs .. 1 h with 3 significant digits (the bounds are valid constants, so
/// `None` cannot happen in practice).
fn new_latency_histogram() -> Option<hdrhistogram::Histogram<u64>> {
    hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 3).ok()
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX)
        })
}

impl Producer {
    /// Starts the dispatcher. `identity` is the producer's id when it is idempotent.
    pub(crate) fn start(
        client: Client,
        topic: String,
        partitions: u32,
        config: ProducerConfig,
        identity: Option<ProducerIdentity>,
    ) -> Producer {
        let (ready, ready_receiver) = mpsc::unbounded_channel();
        let (closer, closing) = watch::channel(());
        // Spreads the first sticky partition of producers started at the same time.
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.subsec_nanos());
        let accumulator = Accumulator::new(
            partitions,
            config.batch_bytes_max,
            config.linger,
            config.unkeyed_partitioning,
            seed,
        );
        let shared = Arc::new(Shared {
            client,
            topic,
            accumulator: Mutex::new(accumulator),
            ready,
            batch_opened: Notify::new(),
            budget: Arc::new(Semaphore::new(config.buffer_bytes_max)),
            in_flight: Arc::new(Semaphore::new(config.in_flight_max)),
            tracker: Arc::new(Tracker::default()),
            connections: Mutex::new(HashMap::new()),
            next_correlation_id: AtomicU64::new(1),
            sequences: identity.map(|identity| Mutex::new(Sequences::new(identity, partitions))),
            sequence_resolved: Notify::new(),
            fenced: AtomicBool::new(false),
            batch_latency: Mutex::new(new_latency_histogram()),
            config,
        });
        tokio::spawn(run_dispatcher(shared.clone(), ready_receiver, closing));
        Producer {
            handle: Arc::new(Handle {
                shared,
                _closer: closer,
            }),
        }
    }

    /// The topic this producer writes to.
    pub fn topic(&self) -> &str {
        &self.handle.shared.topic
    }

    /// The topic's partition count, as read when the producer started.
    pub fn partitions(&self) -> u32 {
        lock(&self.handle.shared.accumulator).partitions()
    }

    /// The id and epoch batches are sent under now, for an idempotent producer. It changes
    /// only after a batch failed for good (see the module doc).
    pub fn identity(&self) -> Option<ProducerIdentity> {
        self.handle
            .shared
            .sequences
            .as_ref()
            .map(|sequences| lock(sequences).identity())
    }

    /// Request -> acknowledgement time of every batch acknowledged at its first attempt so far
    /// (µs; batches that needed retries are left out), for load tools and diagnostics.
    pub fn batch_latency(&self) -> Option<hdrhistogram::Histogram<u64>> {
        lock(&self.handle.shared.batch_latency).clone()
    }

    /// Sends one record and waits until it is acknowledged at the configured level. Records
    /// sent concurrently (from several tasks, or `join_all` over many sends) share batches.
    /// To pipeline from one task in a fixed order, use [`Producer::enqueue`].
    ///
    /// `key`: `None` for an unkeyed record. `value`: `None` is a tombstone.
    pub async fn send(
        &self,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[(&str, &[u8])],
    ) -> Result<Delivery> {
        self.enqueue(key, value, headers).await?.await
    }

    /// Adds one record to its partition's batch and returns the future of its delivery,
    /// without waiting for the broker. Waits only while the memory budget is used up. Records
    /// enqueued one after another from one task are stored in that order (per partition).
    ///
    /// Fails at once for a record that can never be sent (too many headers, bigger than a
    /// batch may be or than the whole budget) and once the producer is fenced.
    pub async fn enqueue(
        &self,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[(&str, &[u8])],
    ) -> Result<DeliveryFuture> {
        self.enqueue_record(key, value, headers, None).await
    }

    /// [`Producer::enqueue`] with the record's timestamp given (ms since the Unix epoch)
    /// instead of read from the clock: an event's own time, or a time the caller already read
    /// (which spares a clock read per record).
    pub async fn enqueue_with_timestamp(
        &self,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[(&str, &[u8])],
        timestamp: i64,
    ) -> Result<DeliveryFuture> {
        self.enqueue_record(key, value, headers, Some(timestamp))
            .await
    }

    async fn enqueue_record(
        &self,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[(&str, &[u8])],
        timestamp: Option<i64>,
    ) -> Result<DeliveryFuture> {
        let shared = &self.handle.shared;
        if shared.fenced.load(Ordering::Acquire) {
            if let Some(error) = shared
                .sequences
                .as_ref()
                .and_then(|s| lock(s).fenced().cloned())
            {
                return Err(error);
            }
        }
        if headers.len() > MAX_HEADERS_PER_RECORD as usize {
            return Err(Error::TooManyHeaders {
                count: headers.len(),
                max: MAX_HEADERS_PER_RECORD,
            });
        }
        let size = record_size_max(key, value, headers.iter().copied());
        // A record must fit in one batch the broker accepts (its default max_batch_bytes is
        // 8 MiB); failing here is faster and clearer than a broker rejection.
        let record_max = (BATCH_LEN_MAX as usize - HEADER_LEN)
            .min(shared.config.buffer_bytes_max)
            .min(BROKER_BATCH_BYTES_DEFAULT - HEADER_LEN);
        let Some(permits) = u32::try_from(size).ok().filter(|_| size <= record_max) else {
            return Err(Error::RecordTooLarge {
                size,
                max: record_max,
            });
        };
        // Forgotten here, given back per batch (`Budget`).
        match shared.budget.try_acquire_many(permits) {
            Ok(permit) => permit.forget(),
            Err(_) => shared
                .budget
                .acquire_many(permits)
                .await
                .map_err(|_| Error::Closed("producer"))?
                .forget(),
        }
        let timestamp = timestamp.unwrap_or_else(now_ms);
        let record = RecordRef {
            timestamp,
            key,
            value,
            headers,
        };
        let appended = {
            let mut accumulator = lock(&shared.accumulator);
            let mut appended =
                accumulator.append_sized(record, size, || Instant::now().into_std(), permits);
            shared.push_ready(std::mem::take(&mut appended.sealed));
            if appended.opened {
                shared.batch_opened.notify_one();
            }
            appended
        };
        Ok(DeliveryFuture::new(
            appended.partition,
            appended.index,
            timestamp,
            appended.outcome,
        ))
    }

    /// Seals every open batch and waits until every record enqueued before this call is
    /// acknowledged or has failed (each record's own future says which).
    pub async fn flush(&self) {
        let shared = &self.handle.shared;
        let last = {
            let mut accumulator = lock(&shared.accumulator);
            let sealed = accumulator.drain_all();
            shared.push_ready(sealed);
            shared.tracker.last_issued()
        };
        if let Some(last) = last {
            shared.tracker.wait_through(last).await;
        }
    }

    /// Flushes, then drops this handle. Other clones keep working.
    pub async fn close(self) {
        self.flush().await;
    }
}

impl Shared {
    /// Queues sealed batches for the dispatcher. Called with the accumulator locked, so the
    /// queue (and the tickets) follow the sealing order.
    fn push_ready(&self, sealed: Vec<SealedBatch<Waiter>>) {
        for batch in sealed {
            let ready = Ready {
                batch,
                ticket: self.tracker.issue(),
            };
            if let Err(mpsc::error::SendError(ready)) = self.ready.send(ready) {
                // Only after the dispatcher stopped, which happens once every handle is gone.
                drop(Budget::of(&self.budget, &ready.batch.waiters));
                ready.batch.completion.fail(&Error::Closed("producer"));
            }
        }
    }

    fn next_request(&self, partition: u32, batch: bytes::Bytes) -> v1::ProduceRequest {
        v1::ProduceRequest {
            correlation_id: self.next_correlation_id.fetch_add(1, Ordering::Relaxed),
            topic: self.topic.clone(),
            partition,
            acks: self.config.acks.to_wire() as i32,
            batch,
            ..Default::default()
        }
    }

    /// The idempotence fields for the next batch of `partition`, once its window has room;
    /// takes a new producer id first when a batch failed for good. `None` for a producer that
    /// is not idempotent. Called by the dispatcher only, in sending order.
    async fn stamp(
        &self,
        partition: u32,
        record_count: u32,
        deadline: Instant,
        opened_at: std::time::Instant,
    ) -> Result<Option<Stamp>> {
        let Some(sequences) = &self.sequences else {
            return Ok(None);
        };
        let timed_out = |last_error: Option<Error>| Error::DeliveryTimeout {
            topic: self.topic.clone(),
            partition,
            attempts: 0,
            elapsed_ms: elapsed_ms(opened_at),
            last_error: last_error.map(Box::new),
        };
        loop {
            let resolved = self.sequence_resolved.notified();
            tokio::pin!(resolved);
            resolved.as_mut().enable();
            let next = lock(sequences).next(partition, record_count)?;
            match next {
                Next::Stamp(stamp) => return Ok(Some(stamp)),
                Next::WindowFull => {
                    if tokio::time::timeout_at(deadline, resolved).await.is_err() {
                        return Err(timed_out(None));
                    }
                }
                Next::NeedsIdentity => {
                    let renewed = self.client.new_producer_id_until(
                        deadline,
                        self.config.retry_backoff,
                        self.config.retry_backoff_max,
                    );
                    let identity = renewed.await.map_err(|error| {
                        if error.is_transient() {
                            timed_out(Some(error))
                        } else {
                            error
                        }
                    })?;
                    tracing::info!(
                        topic = %self.topic,
                        producer_id = identity.producer_id(),
                        "a batch failed for good; continuing under a new producer id"
                    );
                    lock(sequences).install(identity);
                }
            }
        }
    }

    /// Whether a failed attempt of an idempotent batch is worth retrying although it is not
    /// transient: a sequence gap because the batch overtook an earlier one that is being
    /// retried or was just acknowledged (`Sequences::gap_worth_retrying`).
    fn overtook_earlier_batch(&self, stamp: Option<&Stamp>, error: &Error) -> bool {
        match (stamp, &self.sequences) {
            (Some(stamp), Some(sequences)) => {
                error.code() == Some(tonic::Code::OutOfRange)
                    && lock(sequences).gap_worth_retrying(stamp)
            }
            _ => false,
        }
    }

    /// Waits, at most `bound`, until every batch of `stamp`'s partition sent before it is
    /// resolved ([`Sequences::earlier_resolved`]): a batch refused as a gap is then resent
    /// right behind the ones it overtook. It is parked ([`Sequences::park`]: no new batch of
    /// the partition is sent) from the start of the wait until the returned guard is dropped,
    /// once it is resent.
    async fn wait_behind<'a>(&'a self, stamp: &'a Stamp, bound: Duration) -> (Behind, Parked<'a>) {
        let parked = Parked {
            shared: self,
            stamp,
        };
        let Some(sequences) = &self.sequences else {
            return (Behind::Already, parked);
        };
        lock(sequences).park(stamp);
        let deadline = Instant::now() + bound;
        let mut waited = false;
        loop {
            let resolved = self.sequence_resolved.notified();
            tokio::pin!(resolved);
            resolved.as_mut().enable();
            if lock(sequences).earlier_resolved(stamp) {
                let behind = if waited {
                    Behind::AfterWaiting
                } else {
                    Behind::Already
                };
                return (behind, parked);
            }
            if tokio::time::timeout_at(deadline, resolved).await.is_err() {
                return (Behind::TimedOut, parked);
            }
            waited = true;
        }
    }

    /// Records how a sent idempotent batch ended and wakes a dispatcher waiting for room.
    fn resolve(&self, stamp: &Stamp, outcome: &Result<u64>) {
        let Some(sequences) = &self.sequences else {
            return;
        };
        let outcome = match outcome {
            Ok(_) => Outcome::Acknowledged,
            Err(error @ Error::ProducerFenced { .. }) => Outcome::Fenced(error.clone()),
            Err(_) => Outcome::Failed,
        };
        let mut sequences = lock(sequences);
        sequences.resolve(stamp, outcome);
        if sequences.fenced().is_some() {
            self.fenced.store(true, Ordering::Release);
        }
        drop(sequences);
        self.sequence_resolved.notify_waiters();
    }

    /// Sends `request` on the stream to its partition's leader, opening a new one if there is
    /// none or it ended. Waits only when the client's view of the cluster needs a refresh.
    async fn submit(&self, request: v1::ProduceRequest) -> Result<Attempt> {
        let target = Target::Partition(&self.topic, request.partition);
        let node = self.client.router().route(target).await;
        let connection = {
            let mut connections = lock(&self.connections);
            match connections.get(&node.address) {
                Some(connection) if !connection.is_closed() => connection.clone(),
                _ => {
                    let address = node.address.clone();
                    let connection = Arc::new(Connection::open(&self.client, node));
                    connections.insert(address, connection.clone());
                    connection
                }
            }
        };
        connection.submit(request)
    }

    /// What a failed attempt at the node at `address` says about `partition`'s leader, for
    /// the retry; returns the error to go on with and whether the view now names another
    /// node to retry at once. A per-request error on the stream carries no `NotLeader`
    /// detail, so:
    /// - a FAILED_PRECONDITION with the broker's not-leader message becomes
    ///   [`Error::NotLeader`] (transient) and the view takes what it says: the new leader, or,
    ///   when none is known yet (an election), a refresh before the next attempt;
    /// - any other FAILED_PRECONDITION that is not a fence refreshes the view, and counts as
    ///   a leader change when the partition now routes to another node;
    /// - UNAVAILABLE (the node is going away) marks the view stale, so the retry asks which
    ///   node leads now.
    ///
    /// Nothing changes for a broker older than clusters, nor in a cluster of one.
    async fn leader_change(
        &self,
        partition: u32,
        address: &Arc<str>,
        error: Error,
    ) -> (Error, bool) {
        let router = self.client.router();
        let target = Target::Partition(&self.topic, partition);
        let Error::Broker { code, message } = &error else {
            return (error, false);
        };
        if let Some(detail) = not_leader_in_message(*code, message) {
            let status = not_leader_status(message.clone(), &detail);
            let observed = router.observe(address, &status, Some(target));
            if observed == Observed::Final {
                return (error, false);
            }
            let error = Error::NotLeader {
                topic: detail.topic,
                partition: detail.partition,
                leader_id: detail.leader_id,
                leader_address: detail.leader_address,
                message: message.clone(),
            };
            return (error, observed == Observed::Redirected);
        }
        match code {
            tonic::Code::FailedPrecondition
                if router.spans_nodes()
                    && !is_producer_fenced(tonic::Code::FailedPrecondition, message) =>
            {
                let _ = router.refresh().await;
                if !router.moved(address, target) {
                    return (error, false);
                }
                let error = Error::NotLeader {
                    topic: self.topic.clone(),
                    partition,
                    leader_id: None,
                    leader_address: String::new(),
                    message: error.to_string(),
                };
                (error, true)
            }
            tonic::Code::Unavailable => {
                router.mark_stale(address);
                (error, false)
            }
            _ => (error, false),
        }
    }
}

/// Seals batches whose linger ran out and sends sealed batches in order, as in-flight slots
/// free up. Stops when the last producer handle is dropped, after sending what was left.
async fn run_dispatcher(
    shared: Arc<Shared>,
    mut ready: mpsc::UnboundedReceiver<Ready>,
    mut closing: watch::Receiver<()>,
) {
    loop {
        let deadline = lock(&shared.accumulator).next_deadline();
        tokio::select! {
            // Expired batches first, so a steady stream of full batches cannot hold back
            // lingering ones.
            biased;
            () = sleep_until(deadline), if deadline.is_some() => {
                let mut accumulator = lock(&shared.accumulator);
                let expired = accumulator.drain_expired(Instant::now().into_std());
                shared.push_ready(expired);
            }
            next = ready.recv() => match next {
                Some(next) => dispatch(&shared, next).await,
                None => return,
            },
            () = shared.batch_opened.notified() => {}
            _ = closing.changed() => break,
        }
    }
    // Every handle is gone: nothing new can arrive. Send what is left.
    {
        let mut accumulator = lock(&shared.accumulator);
        let rest = accumulator.drain_all();
        shared.push_ready(rest);
    }
    while let Ok(next) = ready.try_recv() {
        dispatch(&shared, next).await;
    }
}

async fn sleep_until(deadline: Option<std::time::Instant>) {
    if let Some(deadline) = deadline {
        tokio::time::sleep_until(Instant::from_std(deadline)).await;
    }
}

/// Takes an in-flight slot, stamps the batch (idempotence), submits its first attempt (in
/// dispatch order) and leaves the rest to a delivery task.
async fn dispatch(shared: &Arc<Shared>, ready: Ready) {
    let Ready { batch, ticket } = ready;
    let SealedBatch {
        partition,
        builder,
        record_count,
        waiters,
        completion,
        opened_at,
    } = batch;
    let budget = Budget::of(&shared.budget, &waiters);
    drop(waiters);
    let Ok(slot) = shared.in_flight.clone().acquire_owned().await else {
        completion.fail(&Error::Closed("producer"));
        return;
    };
    // A batch that waited for a slot past its deadline is not sent at all: sending it now
    // could store records whose futures already say they failed.
    let deadline = Instant::from_std(opened_at) + shared.config.delivery_timeout;
    if Instant::now() >= deadline {
        let error = Error::DeliveryTimeout {
            topic: shared.topic.clone(),
            partition,
            attempts: 0,
            elapsed_ms: elapsed_ms(opened_at),
            last_error: None,
        };
        completion.fail(&error);
        return;
    }
    let stamp = match shared
        .stamp(partition, record_count, deadline, opened_at)
        .await
    {
        Ok(stamp) => stamp,
        Err(error) => {
            completion.fail(&error);
            return;
        }
    };
    let encoded = match finish_batch(builder, stamp.as_ref()) {
        Ok(encoded) => encoded,
        Err(error) => {
            if let (Some(stamp), Some(sequences)) = (&stamp, &shared.sequences) {
                // Never sent: the next batch takes its sequence.
                lock(sequences).unassign(stamp);
            }
            completion.fail(&Error::Batch(error));
            return;
        }
    };
    let mut sent = Sent {
        partition,
        record_count,
        submitted_at: std::time::Instant::now(),
        _budget: budget,
        completion,
        opened_at,
        stamp,
        _ticket: ticket,
    };
    let request = shared.next_request(partition, encoded.clone());
    sent.submitted_at = std::time::Instant::now();
    let first = shared.submit(request).await;
    tokio::spawn(deliver(shared.clone(), sent, encoded, first, slot));
}

/// Ends a [`Sequences::park`] when dropped (after the resend is on its way, so that no new
/// batch goes before it), and wakes a dispatcher waiting for room.
struct Parked<'a> {
    shared: &'a Shared,
    stamp: &'a Stamp,
}

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        if let Some(sequences) = &self.shared.sequences {
            lock(sequences).unpark(self.stamp);
        }
        self.shared.sequence_resolved.notify_waiters();
    }
}

/// What [`Shared::wait_behind`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Behind {
    /// Every earlier batch was resolved already when it looked.
    Already,
    /// Every earlier batch is resolved now; it waited for the last of them.
    AfterWaiting,
    /// Some earlier batch was still unresolved after the bound.
    TimedOut,
}

/// Waits for the batch's acknowledgement, retrying transient failures until the delivery
/// timeout, and resolves every record's future.
async fn deliver(
    shared: Arc<Shared>,
    sent: Sent,
    encoded: bytes::Bytes,
    first: Result<Attempt>,
    _slot: OwnedSemaphorePermit,
) {
    let config = &shared.config;
    let partition = sent.partition;
    let opened_at = Instant::from_std(sent.opened_at);
    let deadline = opened_at + config.delivery_timeout;
    let mut attempt = first;
    let mut attempts: u32 = 1;
    let mut backoff = config.retry_backoff;
    let mut last_error: Option<Error> = None;
    let timed_out = |attempts: u32, last_error: Option<Error>| Error::DeliveryTimeout {
        topic: shared.topic.clone(),
        partition,
        attempts,
        elapsed_ms: elapsed_ms(sent.opened_at),
        last_error: last_error.map(Box::new),
    };
    // Retries sent at once, without a pause, because a NotLeader named the new leader; after
    // REDIRECTS_MAX in a row the leader is still moving and the backoff is the better wait.
    let mut redirects: u32 = 0;
    // A gap refusal answered although every earlier batch was already resolved is resent at
    // once, but only once in a row: should the broker answer the gap again, the backoff paces
    // the retries.
    let mut gap_resent_at_once = false;
    let outcome = loop {
        let mut redirected = false;
        // A batch refused as a gap, parked until its resend below is on its way.
        let mut parked = None;
        let result = match &mut attempt {
            Ok(pending) => match tokio::time::timeout_at(deadline, pending.response()).await {
                Ok(Err(error)) => {
                    let (error, to_new_leader) = shared
                        .leader_change(partition, pending.address(), error)
                        .await;
                    redirected = to_new_leader;
                    Err(error)
                }
                Ok(result) => result,
                Err(_) => break Err(timed_out(attempts, last_error)),
            },
            Err(error) => Err(error.clone()),
        };
        match result {
            Ok(response) => {
                if attempts == 1 {
                    let micros = sent.submitted_at.elapsed().as_micros();
                    if let Some(histogram) = lock(&shared.batch_latency).as_mut() {
                        histogram.saturating_record(u64::try_from(micros).unwrap_or(u64::MAX));
                    }
                }
                break acknowledged(&shared.topic, partition, sent.record_count, &response);
            }
            Err(error)
                if error.is_transient()
                    || shared.overtook_earlier_batch(sent.stamp.as_ref(), &error) =>
            {
                if Instant::now() + backoff >= deadline {
                    break Err(timed_out(attempts, Some(error)));
                }
                let overtook = !error.is_transient();
                if error.is_transient() {
                    tracing::warn!(
                        topic = %shared.topic,
                        partition,
                        attempts,
                        %error,
                        "produce failed; retrying in {backoff:?}"
                    );
                } else {
                    tracing::debug!(
                        topic = %shared.topic,
                        partition,
                        attempts,
                        %error,
                        "batch overtook an earlier one that is being retried; retrying behind it"
                    );
                }
                last_error = Some(error);
                if redirected && redirects < REDIRECTS_MAX {
                    redirects += 1;
                } else if let (true, Some(stamp)) = (overtook, &sent.stamp) {
                    // Right behind the batches it overtook: resent as soon as they are all
                    // resolved, not after a backoff of its own. Batches refused while an
                    // earlier one waited out a backoff would otherwise each wait one too, and
                    // every batch the window lets out meanwhile would overtake them in turn:
                    // under a steady load the partition's batches stayed a backoff late for
                    // seconds after a leader change (benches/replication.sh, rolling).
                    redirects = 0;
                    let (behind, guard) = shared.wait_behind(stamp, backoff).await;
                    parked = Some(guard);
                    match behind {
                        Behind::AfterWaiting => gap_resent_at_once = false,
                        Behind::Already if !gap_resent_at_once => gap_resent_at_once = true,
                        Behind::Already => {
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(config.retry_backoff_max);
                        }
                        Behind::TimedOut => backoff = (backoff * 2).min(config.retry_backoff_max),
                    }
                } else if last_error.as_ref().is_some_and(Error::is_leader_change) {
                    // Waiting for an election: poll at a short, fixed pace.
                    redirects = 0;
                    tokio::time::sleep(backoff.min(crate::routing::LEADER_WAIT_BACKOFF)).await;
                } else {
                    redirects = 0;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(config.retry_backoff_max);
                }
                attempts += 1;
                attempt = shared
                    .submit(shared.next_request(partition, encoded.clone()))
                    .await;
                drop(parked);
            }
            Err(error) => break Err(error),
        }
    };
    let outcome = match (outcome, &sent.stamp) {
        (Err(Error::Broker { code, message }), Some(stamp))
            if is_producer_fenced(code, &message) =>
        {
            Err(Error::ProducerFenced {
                producer_id: stamp.identity.producer_id(),
                epoch: stamp.identity.epoch(),
                message,
            })
        }
        (outcome, _) => outcome,
    };
    if let Some(stamp) = &sent.stamp {
        shared.resolve(stamp, &outcome);
    }
    match outcome {
        Ok(base_offset) => sent.completion.acknowledge(base_offset),
        Err(error) => sent.completion.fail(&error),
    }
}

fn elapsed_ms(since: std::time::Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Checks an acknowledgement against the batch sent (`record_count` records to `partition`);
/// returns the base offset.
pub(crate) fn acknowledged(
    topic: &str,
    partition: u32,
    record_count: u32,
    response: &v1::ProduceResponse,
) -> Result<u64> {
    let spans = response
        .last_offset
        .checked_sub(response.base_offset)
        .and_then(|span| span.checked_add(1));
    if response.partition != partition || spans != Some(u64::from(record_count)) {
        return Err(Error::Protocol(format!(
            "produce to {topic}/{} of {} records was acknowledged for partition {} \
             with offsets {}..={}",
            partition, record_count, response.partition, response.base_offset, response.last_offset
        )));
    }
    Ok(response.base_offset)
}

/// Which sealed batches are still in progress, for [`Producer::flush`]: each gets a ticket with
/// an increasing number when sealed, returned when the batch is done.
#[derive(Debug, Default)]
struct Tracker {
    state: Mutex<TrackerState>,
    done: Notify,
}

#[derive(Debug, Default)]
struct TrackerState {
    next: u64,
    in_progress: BTreeSet<u64>,
}

#[derive(Debug)]
struct Ticket {
    tracker: Arc<Tracker>,
    number: u64,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        lock(&self.tracker.state).in_progress.remove(&self.number);
        self.tracker.done.notify_waiters();
    }
}

impl Tracker {
    fn issue(self: &Arc<Self>) -> Ticket {
        let mut state = lock(&self.state);
        let number = state.next;
        state.next += 1;
        state.in_progress.insert(number);
        Ticket {
            tracker: self.clone(),
            number,
        }
    }

    fn last_issued(&self) -> Option<u64> {
        lock(&self.state).next.checked_sub(1)
    }

    /// Waits until every ticket numbered `last` or lower is returned.
    async fn wait_through(&self, last: u64) {
        loop {
            let notified = self.done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let oldest = lock(&self.state).in_progress.first().copied();
            if oldest.is_none_or(|oldest| oldest > last) {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests;
