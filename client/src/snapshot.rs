//! [`Snapshot`]: the latest value of every live key of one table partition, as of its durable
//! offset H, streamed in chunks ([`Client::snapshot`]).
//!
//! The broker sends every live key's latest record (never a tombstone) in ascending offsets,
//! each message carrying H; the final message has `last` set. This module checks that the
//! answer keeps that contract (one H, ascending offsets below H, keys and values present, the
//! partition asked for, a final message) and turns each chunk into [`ConsumerRecord`]s. A
//! stream that ends before its final message is reported as UNAVAILABLE (the broker went away
//! mid-snapshot): the caller retries the whole snapshot.

use std::sync::Arc;

use futures::StreamExt as _;
use syncline_proto::batch::Header;
use syncline_proto::v1;
use tonic::Code;

use crate::client::Client;
use crate::consumer::ConsumerRecord;
use crate::error::{Error, Result};
use crate::routing::Target;

/// A snapshot being read: H and the key count are known from the first message; the records
/// come chunk by chunk from [`Snapshot::next_chunk`]. Memory: one chunk (the broker's default
/// of about 1 MiB per message) at a time.
#[derive(Debug)]
pub struct Snapshot {
    client: Client,
    topic: String,
    partition: u32,
    stream: tonic::Streaming<v1::SnapshotResponse>,
    /// The node streaming it.
    address: Arc<str>,
    high_watermark: u64,
    keys_total: u64,
    /// The first message, not yet handed out.
    first: Option<v1::SnapshotResponse>,
    /// Offset of the last record handed out (offsets must grow).
    last_offset: Option<u64>,
    finished: bool,
}

impl Snapshot {
    pub(crate) async fn start(client: &Client, topic: &str, partition: u32) -> Result<Snapshot> {
        let request = v1::SnapshotRequest {
            topic: topic.to_owned(),
            partition,
            // The broker's default message size.
            max_bytes: None,
        };
        let (mut stream, address) = client
            .open_on_partition(topic, partition, |mut grpc| {
                let request = request.clone();
                async move { grpc.snapshot(request).await }
            })
            .await?;
        let first = match stream.next().await {
            Some(Ok(first)) => first,
            Some(Err(status)) => {
                let target = Target::Partition(topic, partition);
                return Err(client.stream_error(target, &address, status));
            }
            None => return Err(ended_early(topic, partition)),
        };
        Ok(Snapshot {
            client: client.clone(),
            topic: topic.to_owned(),
            partition,
            stream,
            address,
            high_watermark: first.high_watermark,
            keys_total: first.keys_total,
            first: Some(first),
            last_offset: None,
            finished: false,
        })
    }

    /// The table.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The partition.
    pub fn partition(&self) -> u32 {
        self.partition
    }

    /// H: the snapshot holds the latest value of every key below this offset and nothing at or
    /// above it. A follower tails the partition from here.
    pub fn high_watermark(&self) -> u64 {
        self.high_watermark
    }

    /// Live keys in the whole snapshot (for progress).
    pub fn keys_total(&self) -> u64 {
        self.keys_total
    }

    /// The next chunk of records (ascending offsets; every record has a key and a value), or
    /// `None` once the final message was read.
    pub async fn next_chunk(&mut self) -> Result<Option<Vec<ConsumerRecord>>> {
        if self.finished {
            return Ok(None);
        }
        let message = match self.first.take() {
            Some(first) => first,
            None => match self.stream.next().await {
                Some(Ok(message)) => message,
                Some(Err(status)) => {
                    let target = Target::Partition(&self.topic, self.partition);
                    return Err(self.client.stream_error(target, &self.address, status));
                }
                None => return Err(ended_early(&self.topic, self.partition)),
            },
        };
        self.check(&message)?;
        self.finished = message.last;
        let partition = self.partition;
        let topic: std::sync::Arc<str> = std::sync::Arc::from(self.topic.as_str());
        Ok(Some(
            message
                .records
                .into_iter()
                .map(|record| ConsumerRecord {
                    topic: std::sync::Arc::clone(&topic),
                    partition,
                    offset: record.offset,
                    timestamp: record.timestamp_ms,
                    key: record.key,
                    value: record.value,
                    headers: record
                        .headers
                        .into_iter()
                        .map(|header| Header {
                            key: header.key,
                            value: header.value,
                        })
                        .collect(),
                })
                .collect(),
        ))
    }

    /// Checks one message against the protocol and advances `last_offset`.
    fn check(&mut self, message: &v1::SnapshotResponse) -> Result<()> {
        let context = || format!("snapshot of {}/{}", self.topic, self.partition);
        if message.partition != self.partition {
            return Err(Error::Protocol(format!(
                "{}: a message for partition {}",
                context(),
                message.partition
            )));
        }
        if message.high_watermark != self.high_watermark {
            return Err(Error::Protocol(format!(
                "{}: high watermark changed from {} to {} within one snapshot",
                context(),
                self.high_watermark,
                message.high_watermark
            )));
        }
        for record in &message.records {
            if record.key.is_none() || record.value.is_none() {
                return Err(Error::Protocol(format!(
                    "{}: record at offset {} has no key or no value",
                    context(),
                    record.offset
                )));
            }
            if record.offset >= self.high_watermark
                || self.last_offset.is_some_and(|last| record.offset <= last)
            {
                return Err(Error::Protocol(format!(
                    "{}: record offset {} is not ascending below the high watermark {}",
                    context(),
                    record.offset,
                    self.high_watermark
                )));
            }
            self.last_offset = Some(record.offset);
        }
        Ok(())
    }
}

/// The stream ended without its final message: the broker went away mid-snapshot.
fn ended_early(topic: &str, partition: u32) -> Error {
    Error::Broker {
        code: Code::Unavailable,
        message: format!("snapshot of {topic}/{partition} ended before its final message"),
    }
}
