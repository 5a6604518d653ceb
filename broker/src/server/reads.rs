//! Read responses: a fetch response from a log read, a Subscribe stream's next message, and
//! a Snapshot's record stream. Each message takes its bytes from the broker's response budget
//! before it is built (`super::budget`).
//!
//! `Snapshot` fixes H, the live keys' offsets and a pin in the partition's writer critical
//! section (`Partition::begin_snapshot`; the module doc of `crate::partition` says why that is
//! consistent), waits until H is durable, then a blocking task walks the log below H and sends
//! the records in messages of at most `max_bytes` through a channel of
//! `SNAPSHOT_READ_AHEAD` messages: a slow client stops the walk instead of growing memory.

use std::ops::ControlFlow;
use std::sync::Arc;

use bytes::Bytes;
use prost::Message as _;
use syncline_proto::batch::{Batches, Record};
use syncline_proto::v1;
use tokio::sync::{mpsc, watch};
use tonic::Status;

use super::budget::{ResponseBudget, ResponsePermit};
use super::status::to_status;
use crate::error::BrokerError;
use crate::log::{Log, ReadBatches};
use crate::partition::{Partition, SnapshotPlan};
use crate::topic::Topic;

/// Snapshot messages buffered ahead of a slow client before the walk waits.
pub(super) const SNAPSHOT_READ_AHEAD: usize = 2;
/// Batch bytes one log read of a snapshot walk takes (1 MiB: a few reads per message).
const SNAPSHOT_READ_BYTES: usize = 1024 * 1024;
/// Protobuf framing of one `FetchedRecord` inside a `SnapshotResponse` (tag + length varint),
/// counted on top of the record's encoded length.
const RECORD_FRAMING_BYTES: usize = 6;
/// Protobuf framing of a `FetchResponse` around its batches and records (the scalar fields).
const RESPONSE_FRAMING_BYTES: usize = 64;

/// A stream message and the budget its bytes hold (see `super::budget`).
pub(super) type Budgeted<T> = (Result<T, Status>, Option<ResponsePermit>);

/// Upper estimate of a fetch response's encoded size before it is built: the batches, and with
/// decoded records up to twice as much again (for tiny records the full offset and timestamp
/// of a decoded record outweigh their stored deltas).
pub(super) fn response_bytes_estimate(batch_bytes: usize, decode: bool) -> usize {
    RESPONSE_FRAMING_BYTES + if decode { 3 * batch_bytes } else { batch_bytes }
}

/// A decoded record as the wire carries it (Fetch with `decode_records`, Snapshot).
fn fetched_record(record: Record) -> v1::FetchedRecord {
    v1::FetchedRecord {
        offset: record.offset,
        timestamp_ms: record.timestamp,
        key: record.key,
        value: record.value,
        headers: record_headers(record.headers),
    }
}

/// A record's headers as the wire carries them (Fetch, Snapshot, Get).
pub(super) fn record_headers(headers: Vec<syncline_proto::batch::Header>) -> Vec<v1::RecordHeader> {
    headers
        .into_iter()
        .map(|h| v1::RecordHeader {
            key: h.key,
            value: h.value,
        })
        .collect()
}

/// Splits fetched batches into records at or after `from` (for clients without the codec).
fn decode_records(bytes: &Bytes, from: u64) -> Result<Vec<v1::FetchedRecord>, BrokerError> {
    let mut out = Vec::new();
    for batch in Batches::new(bytes.clone()) {
        let batch = batch.map_err(|e| BrokerError::InvalidRequest(format!("stored batch: {e}")))?;
        for record in batch.records() {
            let record =
                record.map_err(|e| BrokerError::InvalidRequest(format!("stored record: {e}")))?;
            if record.offset < from {
                continue;
            }
            out.push(fetched_record(record));
        }
    }
    Ok(out)
}

/// Streams a snapshot's records (runs on a blocking thread; see the module doc). Ends early,
/// without a final message, when the client goes away or the broker shuts down (the client
/// then gets UNAVAILABLE if there is room for it in the channel).
/// How long a snapshot stream waits for a client that does not read before giving up.
const SNAPSHOT_STALL_LIMIT: std::time::Duration = std::time::Duration::from_secs(120);

pub(super) fn stream_snapshot(
    runtime: tokio::runtime::Handle,
    partition: Arc<Partition>,
    plan: SnapshotPlan,
    max_bytes: usize,
    tx: mpsc::Sender<Budgeted<v1::SnapshotResponse>>,
    mut shutdown: watch::Receiver<bool>,
    budget: Arc<ResponseBudget>,
) {
    let keys_total = plan.offsets.len() as u64;
    let message = |records: Vec<v1::FetchedRecord>, last: bool| v1::SnapshotResponse {
        partition: partition.id,
        high_watermark: plan.high_watermark,
        keys_total,
        records,
        last,
    };
    // Waits for response budget and while the client is SNAPSHOT_READ_AHEAD messages behind;
    // false once the client is gone, the broker stops, or the message could not be handed over
    // for SNAPSHOT_STALL_LIMIT (a stalled reader must not hold the snapshot's pin, which holds
    // back compaction, forever).
    let mut send = |item: Result<v1::SnapshotResponse, Status>| -> bool {
        let deliver = async {
            let permit = match &item {
                Ok(message) => Some(budget.acquire_for_stream(message.encoded_len()).await?),
                Err(_) => None,
            };
            tx.send((item, permit)).await.ok()
        };
        runtime.block_on(async {
            tokio::select! {
                delivered = tokio::time::timeout(SNAPSHOT_STALL_LIMIT, deliver) => match delivered {
                    Ok(Some(())) => true,
                    Ok(None) => false,
                    Err(_) => {
                        tracing::warn!(topic = %partition.topic, partition = partition.id, "snapshot reader stalled; ending its stream");
                        let _ = tx.try_send((Err(Status::deadline_exceeded(format!(
                            "the snapshot was not read (or the broker's response budget stayed taken) for {} s; load it again",
                            SNAPSHOT_STALL_LIMIT.as_secs()
                        ))), None));
                        false
                    }
                },
                _ = shutdown.wait_for(|stop| *stop) => {
                    let _ = tx.try_send((Err(to_status(BrokerError::ShuttingDown)), None));
                    false
                }
            }
        })
    };
    let mut chunk: Vec<v1::FetchedRecord> = Vec::new();
    let mut chunk_bytes = 0;
    let mut stopped = false;
    let walked = partition.walk_snapshot(&plan, SNAPSHOT_READ_BYTES, |record| {
        let record = fetched_record(record);
        let bytes = record.encoded_len() + RECORD_FRAMING_BYTES;
        // At least one record per message, whatever its size (a record fits in a batch, and
        // the message limit is above the batch limit).
        if !chunk.is_empty() && chunk_bytes + bytes > max_bytes {
            if !send(Ok(message(std::mem::take(&mut chunk), false))) {
                stopped = true;
                return ControlFlow::Break(());
            }
            chunk_bytes = 0;
        }
        chunk_bytes += bytes;
        chunk.push(record);
        ControlFlow::Continue(())
    });
    match walked {
        Ok(()) if stopped => {
            tracing::debug!(topic = %partition.topic, partition = partition.id, "snapshot stopped: the client went away or the broker is stopping");
        }
        Ok(()) => {
            send(Ok(message(chunk, true)));
        }
        Err(error) => {
            tracing::error!(topic = %partition.topic, partition = partition.id, high_watermark = plan.high_watermark, %error, "snapshot failed");
            send(Err(to_status(error)));
        }
    }
}

pub(super) fn fetch_response(
    partition: u32,
    read: ReadBatches,
    log: &Log,
    decode_from: Option<u64>,
) -> Result<v1::FetchResponse, BrokerError> {
    let records = match decode_from {
        Some(from) => decode_records(&read.bytes, from)?,
        None => Vec::new(),
    };
    metrics::counter!(crate::metrics::FETCH_BYTES_TOTAL).increment(read.bytes.len() as u64);
    Ok(v1::FetchResponse {
        partition,
        batches: read.bytes,
        records,
        next_offset: read.next_offset,
        high_watermark: read.high_watermark,
        log_start_offset: log.start_offset(),
        compaction_horizon: log.compaction_horizon(),
    })
}

/// One Subscribe stream's position and what it reads from.
pub(super) struct Subscription {
    pub(super) topic: Arc<Topic>,
    pub(super) partition: Arc<Partition>,
    pub(super) log: Arc<Log>,
    pub(super) durable: watch::Receiver<u64>,
    pub(super) shutdown: watch::Receiver<bool>,
    pub(super) budget: Arc<ResponseBudget>,
    pub(super) offset: u64,
    pub(super) max_bytes: usize,
    pub(super) decode_from: Option<u64>,
    pub(super) ended: bool,
}

impl Subscription {
    /// The next message: waits for durable records, then for budget. `None` ends the stream
    /// (shutdown, or after an error message).
    pub(super) async fn next_message(&mut self) -> Option<Budgeted<v1::FetchResponse>> {
        if self.ended {
            return None;
        }
        loop {
            self.durable.borrow_and_update();
            if self
                .topic
                .deleted
                .load(std::sync::atomic::Ordering::Acquire)
            {
                return self.end(Status::not_found(format!(
                    "topic `{}` was deleted",
                    self.topic.name
                )));
            }
            let read = match self.log.read(self.offset, self.max_bytes) {
                Ok(read) => read,
                Err(error) => return self.end(to_status(self.partition.log_error(error))),
            };
            if !read.bytes.is_empty() {
                let estimate =
                    response_bytes_estimate(read.bytes.len(), self.decode_from.is_some());
                let mut permit = tokio::select! {
                    permit = self.budget.acquire_for_stream(estimate) => permit?,
                    _ = self.shutdown.wait_for(|stop| *stop) => return None,
                };
                self.offset = read.next_offset;
                return match fetch_response(self.partition.id, read, &self.log, self.decode_from) {
                    Ok(response) => {
                        permit.shrink_to(response.encoded_len());
                        Some((Ok(response), Some(permit)))
                    }
                    Err(error) => self.end(to_status(error)),
                };
            }
            if self.log.is_closed() {
                // Nothing more will arrive in this log (its partition closed, or its replica
                // installed a snapshot and serves another log): the client subscribes again.
                return self.end(Status::unavailable(format!(
                    "the log of partition {} of `{}` was closed on this node (it stops, or its replica installed a snapshot); subscribe again",
                    self.partition.id, self.topic.name
                )));
            }
            tokio::select! {
                changed = self.durable.changed() => changed.ok()?,
                _ = self.shutdown.wait_for(|stop| *stop) => return None,
            }
        }
    }

    fn end(&mut self, status: Status) -> Option<Budgeted<v1::FetchResponse>> {
        self.ended = true;
        Some((Err(status), None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A topic of one partition over a fresh log in `dir`.
    fn topic(dir: &std::path::Path) -> Arc<Topic> {
        let log = Log::open(dir, crate::log::LogConfig::default()).unwrap();
        let partition = Arc::new(Partition::open(
            Arc::from("t"),
            0,
            1,
            log,
            false,
            crate::topic::ProducerEpochs::default(),
        ));
        Arc::new(Topic {
            name: Arc::from("t"),
            id: crate::topic::TopicId::random().unwrap(),
            legacy_offsets: false,
            settings: crate::topic::TopicSettings {
                partitions: 1,
                cleanup: crate::topic::Cleanup::Delete,
                log: crate::config::Config::default().topic_defaults,
                replication_factor: 1,
            },
            partitions: vec![partition],
            deleted: std::sync::atomic::AtomicBool::new(false),
        })
    }

    #[tokio::test]
    async fn given_a_subscription_waiting_on_a_log_when_the_log_closes_should_end_with_unavailable()
    {
        let dir = tempfile::tempdir().unwrap();
        let topic = topic(dir.path());
        let partition = topic.partitions[0].clone();
        let log = partition.log().unwrap();
        let (_stop, shutdown) = watch::channel(false);
        let mut subscription = Subscription {
            durable: log.subscribe_durable(),
            topic,
            partition,
            log: log.clone(),
            shutdown,
            budget: Arc::new(ResponseBudget::new(1 << 20)),
            offset: 0,
            max_bytes: 1 << 20,
            decode_from: None,
            ended: false,
        };
        let waiting = tokio::spawn(async move {
            let message = subscription.next_message().await;
            (
                message.map(|(m, _)| m.map(|_| ())),
                subscription.next_message().await.is_none(),
            )
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "nothing to send yet");
        // A replica that installs a snapshot closes the log its readers hold.
        log.close().unwrap();
        let (message, then_none) = tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("the subscription ends instead of waiting forever")
            .unwrap();
        let status = message.unwrap().unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
        assert!(then_none);
    }
}
