//! [`Table`]: a key-value view of a topic created with cleanup=compact.
//!
//! # Versions
//!
//! A record's version is its offset in its partition, so a key's versions only grow. Every
//! write returns the new version and the key's partition ([`Written`]); [`Table::get`] returns
//! the latest live value with its version, [`Table::history`] the retained versions, oldest
//! first. Reads see only durable records. A read that meets a leader change (no leader known
//! yet, UNAVAILABLE, a lost connection) is retried at the partition's leader with the writes'
//! backoff, within their `delivery_timeout`.
//!
//! # Writes
//!
//! - Unconditional writes ([`Table::put`], [`Table::delete`]) go through an idempotent batching
//!   [`Producer`] (started on first use), so concurrent callers share batches.
//! - Conditional writes ([`Table::put_if`], [`Table::put_if_absent`], [`Table::delete_if`],
//!   [`Table::write_if`]) each travel alone, as one unary `Produce` with one condition, so a
//!   conflict rejects only that write (and the broker's answer carries the key's current
//!   version, which a stream response cannot). A failed condition is [`Error::Conflict`];
//!   nothing was written.
//!
//! Conditional writes are idempotent too, under their own producer id: each partition's writes
//! are numbered and sent one at a time, and a write retried after a lost answer is recognised
//! by the broker and acknowledged with its original version, instead of failing its own
//! condition. A refused write (a conflict) leaves the number free for the next write. When the
//! outcome of a write is unknown (it timed out, or an attempt was lost before the final
//! refusal) the handle takes a new producer id before its next conditional write, so that no
//! later write can be mistaken for that one.

use std::sync::Arc;

use bytes::Bytes;
use syncline_proto::partitioner::partition_for_key;
use syncline_proto::v1;
use tokio::sync::{Mutex, OnceCell};
use tokio::time::Instant;
use tonic::Code;

use crate::admin::{CleanupPolicy, TopicDescription};
use crate::client::Client;
use crate::error::{conflict_version, is_producer_fenced, Error, Result};
use crate::producer::{acknowledged, now_ms, Acks, Producer, ProducerConfig, ProducerIdentity};
use crate::routing::{Failure, Grpc};
use crate::Header;

/// What a conditional write expects of its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The key's latest version is exactly this one.
    Version(u64),
    /// The key is absent (never written, or deleted).
    Absent,
}

/// Where a write was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// The key's partition.
    pub partition: u32,
    /// The key's new version (the record's offset).
    pub version: u64,
}

/// The latest live value of a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The key's partition.
    pub partition: u32,
    /// The value's version (its record's offset).
    pub version: u64,
    /// The value.
    pub value: Bytes,
    /// The record's timestamp, ms since the Unix epoch.
    pub timestamp: i64,
    /// The record's headers.
    pub headers: Vec<Header>,
}

/// The retained versions of a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct History {
    /// The key's partition.
    pub partition: u32,
    /// Oldest first.
    pub versions: Vec<Version>,
}

/// One version of a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    /// The version (the record's offset).
    pub version: u64,
    /// The value; `None` for a delete.
    pub value: Option<Bytes>,
    /// The record's timestamp, ms since the Unix epoch.
    pub timestamp: i64,
}

/// A handle on one table (a topic created with cleanup=compact), from [`Client::table`]. Cheap
/// to clone: clones share the producer and the conditional writer.
///
/// Unconditional writes are batched with other callers' writes; each conditional write travels
/// alone, so its conflict rejects nothing else. Writes are idempotent: a retry after a lost
/// answer is acknowledged with the original version instead of being stored twice (or failing
/// its own condition).
///
/// ```no_run
/// use syncline_client::{Client, Error};
///
/// # async fn example() -> Result<(), Error> {
/// let client = Client::connect("127.0.0.1:7450").await?;
/// let table = client.table("accounts").await?;
/// let written = table.put("alice", "100").await?;
/// // Compare-and-set: only if nobody wrote since.
/// match table.put_if("alice", "90", written.version).await {
///     Ok(updated) => println!("alice is at version {}", updated.version),
///     Err(Error::Conflict { current, .. }) => println!("lost a race; now at {current:?}"),
///     Err(error) => return Err(error),
/// }
/// if let Some(entry) = table.get("alice").await? {
///     println!("{:?} at version {}", entry.value, entry.version);
/// }
/// for version in table.history("alice", 10).await?.versions {
///     println!("{}: {:?}", version.version, version.value);
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Table {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    client: Client,
    topic: String,
    partitions: u32,
    config: ProducerConfig,
    producer: OnceCell<Producer>,
    writer: ConditionalWriter,
}

impl Inner {
    /// A read (Get, History) on `partition`'s leader. A read changes nothing, so transient
    /// failures (a leader change with no leader known yet, UNAVAILABLE, a lost connection)
    /// are retried with the writes' backoff until their `delivery_timeout`; the last failure
    /// is returned then.
    async fn read<T, F, Fut>(&self, partition: u32, mut call: F) -> Result<T, Failure>
    where
        F: FnMut(Grpc) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let deadline = Instant::now() + self.config.delivery_timeout;
        let mut backoff = self.config.retry_backoff;
        loop {
            let failure = match self
                .client
                .on_partition(&self.topic, partition, &mut call)
                .await
            {
                Ok(answer) => return Ok(answer),
                Err(failure) => failure,
            };
            let transient =
                Error::from_status(&failure.address, failure.status.clone()).is_transient();
            if !transient || Instant::now() + backoff >= deadline {
                return Err(failure);
            }
            tracing::debug!(
                topic = %self.topic,
                partition,
                status = %failure.status,
                "read failed; retrying in {backoff:?}"
            );
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.config.retry_backoff_max);
        }
    }
}

impl Table {
    /// A handle on the topic `description` describes; fails unless it is a table.
    pub(crate) fn open(
        client: Client,
        description: TopicDescription,
        config: ProducerConfig,
    ) -> Result<Table> {
        if description.config.cleanup_policy != CleanupPolicy::Compact {
            return Err(Error::NotATable {
                topic: description.name,
            });
        }
        let partitions = description.partition_count();
        if partitions == 0 {
            return Err(Error::Protocol(format!(
                "topic `{}` is described with no partitions",
                description.name
            )));
        }
        Ok(Table {
            inner: Arc::new(Inner {
                client,
                topic: description.name,
                partitions,
                config,
                producer: OnceCell::new(),
                writer: ConditionalWriter::new(partitions),
            }),
        })
    }

    /// The table's name.
    pub fn topic(&self) -> &str {
        &self.inner.topic
    }

    /// The table's partition count.
    pub fn partitions(&self) -> u32 {
        self.inner.partitions
    }

    /// The partition that holds `key`.
    pub fn partition_of(&self, key: impl AsRef<[u8]>) -> u32 {
        partition_for_key(key.as_ref(), self.inner.partitions)
    }

    /// The latest value of `key`, or `None` when it is absent or deleted.
    pub async fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Entry>> {
        let key = key.as_ref();
        let inner = &self.inner;
        let request = v1::GetRequest {
            topic: inner.topic.clone(),
            key: Bytes::copy_from_slice(key),
        };
        let response = inner
            .read(self.partition_of(key), |mut grpc| {
                let request = request.clone();
                async move { grpc.get(request).await }
            })
            .await;
        let response = match response {
            Ok(response) => response,
            // The handle found the topic when it was opened: NOT_FOUND is the key.
            Err(failure) if failure.status.code() == Code::NotFound => return Ok(None),
            Err(failure) => return Err(failure.into()),
        };
        self.check_partition(key, response.partition)?;
        Ok(Some(Entry {
            partition: response.partition,
            version: response.version,
            value: response.value,
            timestamp: response.timestamp_ms,
            headers: response
                .headers
                .into_iter()
                .map(|header| Header {
                    key: header.key,
                    value: header.value,
                })
                .collect(),
        }))
    }

    /// The most recent `limit` retained versions of `key` (at least 1: the broker refuses 0;
    /// it returns at most 10000), oldest first. A delete is a version without a value. A
    /// key never written has no versions.
    pub async fn history(&self, key: impl AsRef<[u8]>, limit: u32) -> Result<History> {
        let key = key.as_ref();
        let inner = &self.inner;
        let request = v1::HistoryRequest {
            topic: inner.topic.clone(),
            key: Bytes::copy_from_slice(key),
            limit: Some(limit),
        };
        let response = inner
            .read(self.partition_of(key), |mut grpc| {
                let request = request.clone();
                async move { grpc.history(request).await }
            })
            .await?;
        self.check_partition(key, response.partition)?;
        Ok(History {
            partition: response.partition,
            versions: response
                .versions
                .into_iter()
                .map(|version| Version {
                    version: version.version,
                    value: version.value,
                    timestamp: version.timestamp_ms,
                })
                .collect(),
        })
    }

    /// Sets `key` to `value`, whatever its current version.
    pub async fn put(&self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Result<Written> {
        self.write(key.as_ref(), Some(value.as_ref())).await
    }

    /// Deletes `key` (writes a tombstone), whatever its current version. Returns the
    /// tombstone's version.
    pub async fn delete(&self, key: impl AsRef<[u8]>) -> Result<Written> {
        self.write(key.as_ref(), None).await
    }

    /// Sets `key` to `value` if its latest version is `expected_version`; otherwise fails with
    /// [`Error::Conflict`] naming the current version, and writes nothing.
    pub async fn put_if(
        &self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
        expected_version: u64,
    ) -> Result<Written> {
        self.write_if(key, Some(value.as_ref()), Expect::Version(expected_version))
            .await
    }

    /// Sets `key` to `value` if it is absent (never written, or deleted); otherwise fails with
    /// [`Error::Conflict`] naming the current version.
    pub async fn put_if_absent(
        &self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
    ) -> Result<Written> {
        self.write_if(key, Some(value.as_ref()), Expect::Absent)
            .await
    }

    /// Deletes `key` if its latest version is `expected_version`; otherwise fails with
    /// [`Error::Conflict`].
    pub async fn delete_if(&self, key: impl AsRef<[u8]>, expected_version: u64) -> Result<Written> {
        self.write_if(key, None, Expect::Version(expected_version))
            .await
    }

    /// Writes `value` (`None`: a delete) to `key` if `expect` holds when the broker appends it,
    /// atomically; otherwise fails with [`Error::Conflict`] and writes nothing.
    pub async fn write_if(
        &self,
        key: impl AsRef<[u8]>,
        value: Option<&[u8]>,
        expect: Expect,
    ) -> Result<Written> {
        let key = key.as_ref();
        let inner = &self.inner;
        let partition = partition_for_key(key, inner.partitions);
        inner
            .writer
            .write(inner, partition, key, value, expect)
            .await
    }

    /// Waits until every unconditional write made so far is acknowledged or has failed.
    pub async fn flush(&self) {
        if let Some(producer) = self.inner.producer.get() {
            producer.flush().await;
        }
    }

    async fn write(&self, key: &[u8], value: Option<&[u8]>) -> Result<Written> {
        let inner = &self.inner;
        let producer = inner
            .producer
            .get_or_try_init(|| {
                inner
                    .client
                    .start_producer(&inner.topic, inner.partitions, inner.config.clone())
            })
            .await?;
        let delivery = producer.send(Some(key), value, &[]).await?;
        Ok(Written {
            partition: delivery.partition,
            version: delivery.offset,
        })
    }

    fn check_partition(&self, key: &[u8], partition: u32) -> Result<()> {
        let expected = partition_for_key(key, self.inner.partitions);
        if partition != expected {
            return Err(Error::Protocol(format!(
                "the broker answered for key {} from partition {partition}; the key belongs \
                 to partition {expected}",
                crate::error::show_key(key)
            )));
        }
        Ok(())
    }
}

/// The produce request of one conditional write: one record (`value` `None`: a tombstone) with
/// one condition on its own key, under `identity` with sequence `base_sequence`.
#[allow(clippy::too_many_arguments)] // Each is one field of the request.
pub(crate) fn conditional_request(
    topic: &str,
    partition: u32,
    key: &[u8],
    value: Option<&[u8]>,
    expect: Expect,
    acks: Acks,
    identity: ProducerIdentity,
    base_sequence: i32,
    timestamp_ms: i64,
) -> v1::ProduceRequest {
    let key = Bytes::copy_from_slice(key);
    v1::ProduceRequest {
        correlation_id: 0,
        topic: topic.to_owned(),
        partition,
        acks: acks.to_wire() as i32,
        batch: Bytes::new(),
        records: vec![v1::Record {
            key: Some(key.clone()),
            value: value.map(Bytes::copy_from_slice),
            headers: Vec::new(),
            timestamp_ms,
        }],
        conditions: vec![v1::Condition {
            key,
            expect: Some(match expect {
                Expect::Version(version) => v1::condition::Expect::Version(version),
                Expect::Absent => v1::condition::Expect::Absent(true),
            }),
        }],
        producer_id: identity.producer_id(),
        producer_epoch: identity.epoch(),
        // The wire field is the header's i32, as unsigned bits.
        base_sequence: base_sequence as u32,
    }
}

/// The conditional writer's producer id; see the module doc.
#[derive(Debug, Default)]
struct WriterIdentity {
    /// The id in use and its generation (how many ids this writer had before it).
    current: Option<(ProducerIdentity, u64)>,
    /// A write's outcome is unknown: take a new id before the next write.
    needs_identity: bool,
    /// Another instance took the id over: no more writes.
    fenced: Option<Error>,
}

/// The next sequence of one partition's conditional writes, valid for one generation.
#[derive(Debug, Default)]
struct PartitionSequence {
    generation: Option<u64>,
    next_sequence: i32,
}

/// How one conditional write ended on the wire.
enum Attempted {
    Acknowledged(v1::ProduceResponse),
    /// The broker refused it: nothing was written by the final attempt. `ambiguous` when an
    /// earlier attempt was lost on the way (its fate is unknown).
    Refused {
        error: Error,
        ambiguous: bool,
    },
    /// A sequence gap: the broker's sequence for this id is not what this writer thinks.
    Gap(Error),
    /// The id was taken over by another instance.
    Fenced(Error),
    /// No answer in time: the write may or may not have been stored.
    Unknown(Error),
}

#[derive(Debug)]
struct ConditionalWriter {
    identity: Mutex<WriterIdentity>,
    /// One lock per partition: a partition's conditional writes go one at a time, in order.
    partitions: Vec<Mutex<PartitionSequence>>,
}

impl ConditionalWriter {
    fn new(partitions: u32) -> ConditionalWriter {
        ConditionalWriter {
            identity: Mutex::new(WriterIdentity::default()),
            partitions: (0..partitions)
                .map(|_| Mutex::new(PartitionSequence::default()))
                .collect(),
        }
    }

    /// The id to write under, taking a new one when needed.
    async fn current(
        &self,
        client: &Client,
        config: &ProducerConfig,
        deadline: Instant,
    ) -> Result<(ProducerIdentity, u64)> {
        let mut state = self.identity.lock().await;
        if let Some(error) = &state.fenced {
            return Err(error.clone());
        }
        if let (Some(current), false) = (state.current, state.needs_identity) {
            return Ok(current);
        }
        let identity = client
            .new_producer_id_until(deadline, config.retry_backoff, config.retry_backoff_max)
            .await?;
        let generation = state.current.map_or(0, |(_, generation)| generation + 1);
        state.current = Some((identity, generation));
        state.needs_identity = false;
        Ok((identity, generation))
    }

    /// Marks the id of `generation` as unusable, if it is still the current one.
    async fn retire(&self, generation: u64, fenced: Option<Error>) {
        let mut state = self.identity.lock().await;
        if state.current.map(|(_, current)| current) != Some(generation) {
            return;
        }
        match fenced {
            Some(error) => state.fenced = Some(error),
            None => state.needs_identity = true,
        }
    }

    async fn write(
        &self,
        table: &Inner,
        partition: u32,
        key: &[u8],
        value: Option<&[u8]>,
        expect: Expect,
    ) -> Result<Written> {
        let Some(sequence) = self.partitions.get(partition as usize) else {
            return Err(Error::UnknownPartition {
                topic: table.topic.clone(),
                partition,
                partitions: table.partitions,
            });
        };
        let mut sequence = sequence.lock().await;
        let deadline = Instant::now() + table.config.delivery_timeout;
        let timestamp_ms = now_ms();
        // A gap is answered once with a new id: the write was not stored, so sending it again
        // under a fresh id is safe.
        let mut gaps = 0;
        loop {
            let (identity, generation) =
                self.current(&table.client, &table.config, deadline).await?;
            if sequence.generation != Some(generation) {
                *sequence = PartitionSequence {
                    generation: Some(generation),
                    next_sequence: 0,
                };
            }
            let request = conditional_request(
                &table.topic,
                partition,
                key,
                value,
                expect,
                table.config.acks,
                identity,
                sequence.next_sequence,
                timestamp_ms,
            );
            match self.send(table, request, key, deadline).await {
                Attempted::Acknowledged(response) => {
                    let version = acknowledged(&table.topic, partition, 1, &response);
                    if version.is_err() {
                        self.retire(generation, None).await;
                    }
                    sequence.next_sequence = sequence.next_sequence.wrapping_add(1);
                    return Ok(Written {
                        partition,
                        version: version?,
                    });
                }
                Attempted::Refused { error, ambiguous } => {
                    if ambiguous {
                        self.retire(generation, None).await;
                    }
                    return Err(error);
                }
                Attempted::Gap(error) => {
                    self.retire(generation, None).await;
                    gaps += 1;
                    if gaps > 1 {
                        return Err(error);
                    }
                    tracing::info!(
                        topic = %table.topic,
                        partition,
                        %error,
                        "conditional write refused with a sequence gap; retrying under a new producer id"
                    );
                }
                Attempted::Fenced(error) => {
                    let error = Error::ProducerFenced {
                        producer_id: identity.producer_id(),
                        epoch: identity.epoch(),
                        message: error.to_string(),
                    };
                    self.retire(generation, Some(error.clone())).await;
                    return Err(error);
                }
                Attempted::Unknown(error) => {
                    self.retire(generation, None).await;
                    return Err(error);
                }
            }
        }
    }

    /// Sends `request`, retrying transient failures with backoff until `deadline`.
    async fn send(
        &self,
        table: &Inner,
        request: v1::ProduceRequest,
        key: &[u8],
        deadline: Instant,
    ) -> Attempted {
        let config = &table.config;
        let mut backoff = config.retry_backoff;
        let mut attempts: u32 = 0;
        let mut lost = false;
        let started = std::time::Instant::now();
        loop {
            attempts += 1;
            let produced =
                table
                    .client
                    .on_partition(&table.topic, request.partition, |mut grpc| {
                        let request = request.clone();
                        async move { grpc.produce(request).await }
                    });
            let answer = tokio::time::timeout_at(deadline, produced).await;
            let error = match answer {
                Ok(Ok(response)) => return Attempted::Acknowledged(response),
                Ok(Err(failure)) => match classify(&table.topic, key, failure) {
                    Ok(error) if error.is_transient() => error,
                    Ok(error) => return refused(error, lost),
                    Err(attempted) => return attempted,
                },
                Err(_) => {
                    return Attempted::Unknown(Error::DeliveryTimeout {
                        topic: table.topic.clone(),
                        partition: request.partition,
                        attempts,
                        elapsed_ms: u64::try_from(started.elapsed().as_millis())
                            .unwrap_or(u64::MAX),
                        last_error: None,
                    })
                }
            };
            // A transient failure may have happened after the broker stored the write; a node
            // that does not lead the partition stored nothing.
            lost |= !matches!(error, Error::NotLeader { .. });
            if Instant::now() + backoff >= deadline {
                return Attempted::Unknown(Error::DeliveryTimeout {
                    topic: table.topic.clone(),
                    partition: request.partition,
                    attempts,
                    elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                    last_error: Some(Box::new(error)),
                });
            }
            tracing::warn!(
                topic = %table.topic,
                partition = request.partition,
                attempts,
                %error,
                "conditional write failed; retrying in {backoff:?}"
            );
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(config.retry_backoff_max);
        }
    }
}

fn refused(error: Error, ambiguous: bool) -> Attempted {
    Attempted::Refused { error, ambiguous }
}

/// Turns a failed conditional write's status into the error to return (`Ok`), or into an
/// outcome that needs the writer's attention (`Err`: a sequence gap, a fence).
fn classify(topic: &str, key: &[u8], failure: Failure) -> Result<Error, Attempted> {
    let Failure { status, address } = failure;
    let code = status.code();
    if code == Code::FailedPrecondition {
        match conflict_version(status.details(), key) {
            Ok(Some(current)) => {
                return Ok(Error::Conflict {
                    topic: topic.to_owned(),
                    key: Bytes::copy_from_slice(key),
                    current,
                })
            }
            Ok(None) => {}
            Err(error) => return Ok(error),
        }
        if is_producer_fenced(code, status.message()) {
            return Err(Attempted::Fenced(Error::from_status(&address, status)));
        }
    }
    if code == Code::OutOfRange {
        return Err(Attempted::Gap(Error::from_status(&address, status)));
    }
    Ok(Error::from_status(&address, status))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditional_request_should_carry_one_record_one_condition_and_the_sequence() {
        let identity = ProducerIdentity::for_tests(12, 3);
        let request = conditional_request(
            "accounts",
            2,
            b"alice",
            Some(b"100"),
            Expect::Version(41),
            Acks::Durable,
            identity,
            7,
            1_700_000_000_000,
        );
        assert_eq!(request.topic, "accounts");
        assert_eq!(request.partition, 2);
        assert_eq!(request.acks, v1::Acks::Durable as i32);
        assert!(request.batch.is_empty());
        assert_eq!(request.records.len(), 1);
        let record = &request.records[0];
        assert_eq!(record.key.as_deref(), Some(b"alice".as_slice()));
        assert_eq!(record.value.as_deref(), Some(b"100".as_slice()));
        assert_eq!(record.timestamp_ms, 1_700_000_000_000);
        assert_eq!(
            request.conditions,
            [v1::Condition {
                key: Bytes::from_static(b"alice"),
                expect: Some(v1::condition::Expect::Version(41)),
            }]
        );
        assert_eq!(
            (
                request.producer_id,
                request.producer_epoch,
                request.base_sequence
            ),
            (12, 3, 7)
        );
    }

    #[test]
    fn conditional_delete_if_absent_should_be_a_tombstone_expecting_absence() {
        let request = conditional_request(
            "t",
            0,
            b"k",
            None,
            Expect::Absent,
            Acks::Leader,
            ProducerIdentity::for_tests(1, 0),
            i32::MAX,
            0,
        );
        assert_eq!(request.records[0].value, None);
        assert_eq!(
            request.conditions[0].expect,
            Some(v1::condition::Expect::Absent(true))
        );
        // Sequences are the header's i32, sent as their unsigned bits.
        assert_eq!(request.base_sequence, i32::MAX as u32);
    }
}
