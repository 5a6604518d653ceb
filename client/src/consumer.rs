//! The [`Consumer`]: reads assigned partitions of one topic and yields records as a `Stream`.
//!
//! Each assigned partition has a task that long-polls `Fetch` from its position (waiting up to
//! `fetch_max_wait` for new data), splits the answer into batches with [`Batches`] (which checks
//! every batch's CRC), skips the records below the requested offset (the first batch may start
//! before it) and control batches, and advances to the response's `next_offset`. Records of one
//! partition arrive in offset order; partitions interleave.
//!
//! Failures: transient ones (broker unreachable, UNAVAILABLE, a node that no longer leads the
//! partition) are retried with backoff for up to `retry_timeout`, then reported; the retry
//! goes to the partition's leader as the client's view of the cluster now has it, from the
//! same position, so a leader change loses and repeats nothing. OUT_OF_RANGE (retention or
//! compaction passed the position) follows the [`OffsetReset`] policy, except for a position
//! reached by reading that lies past the answering node's log end: that node is a new leader
//! still applying committed records, and the fetch is retried like a transient failure. Any other error, or corrupt data, is yielded
//! once as an `Err` item and ends that partition; the stream ends when every partition ended.

use std::collections::{BTreeMap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use syncline_proto::batch::{BatchError, Batches, Header};
use syncline_proto::v1;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tonic::Code;

use crate::admin::OffsetQuery;
use crate::client::Client;
use crate::error::{Error, Result};

/// Where a partition starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartOffset {
    /// The first retained offset.
    Earliest,
    /// The latest offset: only records produced from now on. The default.
    #[default]
    Latest,
    /// This offset.
    Offset(u64),
    /// The first offset whose timestamp is at or after this many ms since the Unix epoch (the
    /// latest offset when no record is that recent).
    Timestamp(i64),
}

/// What to do when the broker says the position is out of range (OUT_OF_RANGE: retention or
/// compaction removed it, or it is past the end).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OffsetReset {
    /// Go on from the first retained offset.
    Earliest,
    /// Go on from the latest offset.
    Latest,
    /// Yield [`Error::OffsetOutOfRange`] and stop reading the partition. The default: records
    /// are never skipped silently.
    #[default]
    Error,
}

/// Consumer settings.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// Partitions to read; `None` (the default) reads all of them.
    pub partitions: Option<Vec<u32>>,
    /// Where each partition starts, unless `partition_starts` says otherwise.
    pub start: StartOffset,
    /// Start of particular partitions (e.g. resuming from saved positions).
    pub partition_starts: BTreeMap<u32, StartOffset>,
    /// Policy for an out-of-range position.
    pub offset_reset: OffsetReset,
    /// How long one fetch waits on the broker for new data (long-poll).
    pub fetch_max_wait: Duration,
    /// Byte budget of one fetch response (the broker returns at least one batch).
    pub fetch_bytes_max: u32,
    /// How long transient errors are retried before the consumer reports one.
    pub retry_timeout: Duration,
    /// First pause before a retry, doubled up to one second.
    pub retry_backoff: Duration,
    /// Fetch responses buffered ahead of the reader (over all partitions): bounds memory to
    /// about `buffered_responses_max * fetch_bytes_max`.
    pub buffered_responses_max: usize,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            partitions: None,
            start: StartOffset::Latest,
            partition_starts: BTreeMap::new(),
            offset_reset: OffsetReset::Error,
            fetch_max_wait: Duration::from_millis(500),
            fetch_bytes_max: 4 * 1024 * 1024,
            retry_timeout: Duration::from_secs(30),
            retry_backoff: Duration::from_millis(100),
            buffered_responses_max: 16,
        }
    }
}

/// Longest fetch long-poll: the broker takes `max_wait_ms` as a `u32`, and a minute is already
/// longer than any proxy's idle timeout.
const FETCH_MAX_WAIT_LIMIT: Duration = Duration::from_secs(60);
/// Most responses the consumer buffers ahead.
const BUFFERED_RESPONSES_LIMIT: usize = 4096;
/// Longest pause between retries.
const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(1);

impl ConsumerConfig {
    /// Checks each field against its bounds.
    pub fn validate(&self) -> Result<()> {
        let invalid = |key: &'static str, reason: String| Err(Error::InvalidConfig { key, reason });
        if self.fetch_max_wait > FETCH_MAX_WAIT_LIMIT {
            return invalid(
                "fetch_max_wait",
                format!(
                    "{:?} is above the maximum of {FETCH_MAX_WAIT_LIMIT:?}",
                    self.fetch_max_wait
                ),
            );
        }
        if self.fetch_bytes_max == 0 {
            return invalid("fetch_bytes_max", "must be above 0".to_owned());
        }
        if !(1..=BUFFERED_RESPONSES_LIMIT).contains(&self.buffered_responses_max) {
            return invalid(
                "buffered_responses_max",
                format!(
                    "{} is outside [1, {BUFFERED_RESPONSES_LIMIT}]",
                    self.buffered_responses_max
                ),
            );
        }
        if self.retry_backoff.is_zero() || self.retry_backoff > RETRY_BACKOFF_MAX {
            return invalid(
                "retry_backoff",
                format!(
                    "{:?} is outside (0, {RETRY_BACKOFF_MAX:?}]",
                    self.retry_backoff
                ),
            );
        }
        if matches!(&self.partitions, Some(partitions) if partitions.is_empty()) {
            return invalid(
                "partitions",
                "an empty list assigns nothing; use None for all".to_owned(),
            );
        }
        Ok(())
    }
}

/// A record read from a partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerRecord {
    /// The topic (shared by every record of the partition).
    pub topic: Arc<str>,
    /// The partition.
    pub partition: u32,
    /// Its offset in the partition.
    pub offset: u64,
    /// Milliseconds since the Unix epoch.
    pub timestamp: i64,
    /// The key, if any.
    pub key: Option<Bytes>,
    /// The value; `None` is a tombstone.
    pub value: Option<Bytes>,
    /// Headers in order.
    pub headers: Vec<Header>,
}

/// What a partition task hands the consumer.
#[derive(Debug)]
pub(crate) enum Message {
    Records {
        partition: u32,
        records: Vec<ConsumerRecord>,
        /// Position after these records.
        next_offset: u64,
    },
    Failed(Error),
}

/// Reads one topic; a `Stream` of records (see the module doc). Dropping it stops every fetch.
#[derive(Debug)]
pub struct Consumer {
    topic: String,
    assignment: Vec<u32>,
    messages: mpsc::Receiver<Message>,
    current: VecDeque<ConsumerRecord>,
    /// Position to record once `current` is used up.
    current_end: Option<(u32, u64)>,
    positions: BTreeMap<u32, u64>,
    _tasks: JoinSet<()>,
}

impl Consumer {
    pub(crate) async fn start(client: Client, topic: &str, config: ConsumerConfig) -> Result<Self> {
        config.validate()?;
        let description = client.describe_topic(topic).await?;
        let partitions = description.partition_count();
        let assignment: Vec<u32> = match &config.partitions {
            None => (0..partitions).collect(),
            Some(chosen) => {
                let mut chosen = chosen.clone();
                chosen.sort_unstable();
                chosen.dedup();
                chosen
            }
        };
        for &partition in assignment.iter().chain(config.partition_starts.keys()) {
            if partition >= partitions {
                return Err(Error::UnknownPartition {
                    topic: topic.to_owned(),
                    partition,
                    partitions,
                });
            }
        }
        let mut positions = BTreeMap::new();
        // Partitions whose start the application chose (it may lie outside the log).
        let mut chosen_starts = Vec::new();
        for &partition in &assignment {
            let start = config
                .partition_starts
                .get(&partition)
                .copied()
                .unwrap_or(config.start);
            let offset = match start {
                StartOffset::Offset(offset) => {
                    chosen_starts.push(partition);
                    offset
                }
                StartOffset::Earliest => {
                    client
                        .list_offsets(topic, partition, OffsetQuery::Earliest)
                        .await?
                        .offset
                }
                StartOffset::Latest => {
                    client
                        .list_offsets(topic, partition, OffsetQuery::Latest)
                        .await?
                        .offset
                }
                StartOffset::Timestamp(timestamp_ms) => {
                    client
                        .list_offsets(topic, partition, OffsetQuery::Timestamp(timestamp_ms))
                        .await?
                        .offset
                }
            };
            positions.insert(partition, offset);
        }
        let (sender, messages) = mpsc::channel(config.buffered_responses_max);
        let mut tasks = JoinSet::new();
        let shared_topic: Arc<str> = Arc::from(topic);
        for (&partition, &offset) in &positions {
            let reader = PartitionReader {
                client: client.clone(),
                topic: Arc::clone(&shared_topic),
                partition,
                config: config.clone(),
                sender: sender.clone(),
            };
            if chosen_starts.contains(&partition) {
                tasks.spawn(reader.run(offset));
            } else {
                tasks.spawn(reader.run_from_known(offset));
            }
        }
        Ok(Consumer {
            topic: topic.to_owned(),
            assignment,
            messages,
            current: VecDeque::new(),
            current_end: None,
            positions,
            _tasks: tasks,
        })
    }

    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The partitions read, in order.
    pub fn assignment(&self) -> &[u32] {
        &self.assignment
    }

    /// The next offset this consumer will yield from `partition` (one past the last record
    /// yielded, or the start offset): the position to save for resuming later.
    pub fn position(&self, partition: u32) -> Option<u64> {
        self.positions.get(&partition).copied()
    }

    /// The next record, or an error (which ends its partition's reading); `None` once every
    /// partition has ended. The same as `StreamExt::next`.
    pub async fn recv(&mut self) -> Option<Result<ConsumerRecord>> {
        std::future::poll_fn(|context| Pin::new(&mut *self).poll_next(context)).await
    }
}

impl Stream for Consumer {
    type Item = Result<ConsumerRecord>;

    fn poll_next(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(record) = this.current.pop_front() {
                this.positions
                    .insert(record.partition, record.offset.saturating_add(1));
                return Poll::Ready(Some(Ok(record)));
            }
            if let Some((partition, next_offset)) = this.current_end.take() {
                this.positions.insert(partition, next_offset);
            }
            match this.messages.poll_recv(context) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Ready(Some(Message::Failed(error))) => return Poll::Ready(Some(Err(error))),
                Poll::Ready(Some(Message::Records {
                    partition,
                    records,
                    next_offset,
                })) => {
                    this.current = records.into();
                    this.current_end = Some((partition, next_offset));
                }
            }
        }
    }
}

/// The records of one fetch response at or after `from_offset`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Decoded {
    pub records: Vec<ConsumerRecord>,
    /// The offset after the last whole batch, if any.
    pub end_offset: Option<u64>,
    /// Whether the response ended in a partial batch (dropped; it is fetched again).
    pub truncated: bool,
}

/// Splits `batches` into verified batches and decodes the records at or after `from_offset`,
/// skipping control batches. A partial batch at the end (after at least one whole one) is
/// dropped; any other failure is corruption.
pub(crate) fn decode_batches(
    topic: &Arc<str>,
    partition: u32,
    from_offset: u64,
    batches: Bytes,
) -> Result<Decoded, BatchError> {
    let mut decoded = Decoded {
        records: Vec::new(),
        end_offset: None,
        truncated: false,
    };
    for batch in Batches::new(batches) {
        let batch = match batch {
            Ok(batch) => batch,
            Err(BatchError::TooShort { .. }) if decoded.end_offset.is_some() => {
                decoded.truncated = true;
                break;
            }
            Err(error) => return Err(error),
        };
        let header = *batch.header();
        decoded.end_offset = Some(header.next_offset());
        if header.is_control() || header.next_offset() <= from_offset {
            continue;
        }
        for record in batch.records() {
            let record = record?;
            if record.offset < from_offset {
                continue;
            }
            decoded.records.push(ConsumerRecord {
                topic: Arc::clone(topic),
                partition,
                offset: record.offset,
                timestamp: record.timestamp,
                key: record.key,
                value: record.value,
                headers: record.headers,
            });
        }
    }
    Ok(decoded)
}

/// The fetch loop of one partition (also the reader of each partition a
/// [`crate::GroupConsumer`] owns).
pub(crate) struct PartitionReader {
    pub(crate) client: Client,
    pub(crate) topic: Arc<str>,
    pub(crate) partition: u32,
    pub(crate) config: ConsumerConfig,
    pub(crate) sender: mpsc::Sender<Message>,
}

/// Why a partition stopped: the reader is gone (normal) or an error was reported.
struct Stopped;

impl PartitionReader {
    /// Reads from `offset`, a position the application chose (it may be outside the log).
    pub(crate) async fn run(self, offset: u64) {
        let _ = self.read_from(offset, false).await;
    }

    /// Reads from `offset`, a position the broker gave (a committed offset, or a log bound
    /// it listed): inside what was committed, even when a new leader has not applied it yet.
    pub(crate) async fn run_from_known(self, offset: u64) {
        let _ = self.read_from(offset, true).await;
    }

    async fn report(&self, error: Error) -> Stopped {
        let _ = self.sender.send(Message::Failed(error)).await;
        Stopped
    }

    async fn read_from(&self, mut offset: u64, known: bool) -> std::result::Result<(), Stopped> {
        // The position was reached by reading (a fetch answered at it) or given by the broker,
        // so it is at most the partition's commit offset, which never goes back.
        let mut reached = known;
        let mut failing_since: Option<Instant> = None;
        let mut backoff = self.config.retry_backoff;
        let max_wait_ms = u32::try_from(self.config.fetch_max_wait.as_millis()).unwrap_or(u32::MAX);
        loop {
            let request = v1::FetchRequest {
                topic: self.topic.to_string(),
                partition: self.partition,
                offset,
                max_bytes: Some(self.config.fetch_bytes_max),
                max_wait_ms,
                decode_records: false,
            };
            let message_bytes_max = self.client.config().message_bytes_max;
            let result =
                self.client
                    .on_partition_node(&self.topic, self.partition, |node| {
                        let request = request.clone();
                        async move {
                            crate::wire_call::fetch(node.raw, &request, message_bytes_max).await
                        }
                    })
                    .await
                    .map_err(Error::from);
            let error = match result {
                Ok(response) => {
                    failing_since = None;
                    backoff = self.config.retry_backoff;
                    self.client.note_reachable();
                    offset = self.take(offset, response).await?;
                    reached = true;
                    continue;
                }
                Err(error) => error,
            };
            let behind = error.code() == Some(Code::OutOfRange)
                && reached
                && self.is_ahead_of_the_log(offset).await;
            if error.code() == Some(Code::OutOfRange) && !behind {
                offset = self.reset(offset, error).await?;
                continue;
            }
            // A fetch asks for nothing "too large" (the broker clamps max_bytes): here
            // RESOURCE_EXHAUSTED means the broker's response budget is busy, so retry. A node
            // behind the position (a new leader still applying what was committed) catches up.
            if !behind && !error.is_transient() && error.code() != Some(Code::ResourceExhausted) {
                return Err(self.report(error).await);
            }
            let since = *failing_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= self.config.retry_timeout {
                return Err(self.report(error).await);
            }
            // A busy broker (RESOURCE_EXHAUSTED) is reachable: only transport errors are an
            // outage worth a `reconnecting...`.
            if error.is_transient() {
                self.client.note_unreachable(&error);
            }
            tracing::warn!(
                topic = %self.topic,
                partition = self.partition,
                %error,
                "fetch failed; retrying in {backoff:?}"
            );
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(RETRY_BACKOFF_MAX);
        }
    }

    /// Hands the records of one response to the consumer; returns the next position.
    async fn take(
        &self,
        offset: u64,
        response: v1::FetchResponse,
    ) -> std::result::Result<u64, Stopped> {
        let decoded = match decode_batches(&self.topic, self.partition, offset, response.batches) {
            Ok(decoded) => decoded,
            Err(source) => {
                return Err(self
                    .report(Error::Corrupt {
                        topic: self.topic.to_string(),
                        partition: self.partition,
                        offset,
                        source,
                    })
                    .await)
            }
        };
        let next_offset = match (decoded.truncated, decoded.end_offset) {
            (true, Some(end)) => end,
            // Never move backwards, whatever the answer says.
            _ => response.next_offset.max(offset),
        };
        if decoded.records.is_empty() && next_offset == offset {
            return Ok(offset);
        }
        let message = Message::Records {
            partition: self.partition,
            records: decoded.records,
            next_offset,
        };
        if self.sender.send(message).await.is_err() {
            return Err(Stopped);
        }
        Ok(next_offset)
    }

    /// Whether an OUT_OF_RANGE position that was reached by reading lies past the log end of
    /// the node that answered (not before its log start): then that node is behind what was
    /// committed (a new leader that has not yet applied every committed record), not a
    /// position retention removed, and the fetch is retried instead of reset. When the log
    /// start cannot be looked up the position counts as removed (the reset policy decides,
    /// as before).
    async fn is_ahead_of_the_log(&self, offset: u64) -> bool {
        match self
            .client
            .list_offsets(&self.topic, self.partition, OffsetQuery::Earliest)
            .await
        {
            Ok(earliest) => offset >= earliest.offset,
            Err(_) => false,
        }
    }

    /// Applies the out-of-range policy; returns the new position.
    async fn reset(&self, offset: u64, error: Error) -> std::result::Result<u64, Stopped> {
        let query = match self.config.offset_reset {
            OffsetReset::Earliest => OffsetQuery::Earliest,
            OffsetReset::Latest => OffsetQuery::Latest,
            OffsetReset::Error => {
                let bounds = self.bounds().await;
                let error = match bounds {
                    Ok((log_start_offset, latest_offset)) => Error::OffsetOutOfRange {
                        topic: self.topic.to_string(),
                        partition: self.partition,
                        offset,
                        log_start_offset,
                        latest_offset,
                    },
                    // Without bounds, the broker's own message says it.
                    Err(_) => error,
                };
                return Err(self.report(error).await);
            }
        };
        match self
            .client
            .list_offsets(&self.topic, self.partition, query)
            .await
        {
            Ok(listed) => {
                tracing::warn!(
                    topic = %self.topic,
                    partition = self.partition,
                    offset,
                    reset_to = listed.offset,
                    "offset out of range ({error}); resetting"
                );
                Ok(listed.offset)
            }
            Err(error) => Err(self.report(error).await),
        }
    }

    async fn bounds(&self) -> Result<(u64, u64)> {
        let earliest = self
            .client
            .list_offsets(&self.topic, self.partition, OffsetQuery::Earliest)
            .await?;
        let latest = self
            .client
            .list_offsets(&self.topic, self.partition, OffsetQuery::Latest)
            .await?;
        Ok((earliest.offset, latest.offset))
    }
}

#[cfg(test)]
mod tests {
    use syncline_proto::batch::{stamp_base_offset, BatchBuilder};

    use super::*;

    /// A stamped batch at `base_offset` with one record per value.
    fn batch(base_offset: u64, values: &[&str]) -> Vec<u8> {
        let mut builder = BatchBuilder::new();
        for (index, value) in values.iter().enumerate() {
            let key = format!("k{index}");
            builder.push(
                1_000 + index as i64,
                Some(key.as_bytes()),
                Some(value.as_bytes()),
                &[("h", b"x")],
            );
        }
        let mut bytes = builder.finish().unwrap().to_vec();
        stamp_base_offset(&mut bytes, base_offset);
        bytes
    }

    fn values(decoded: &Decoded) -> Vec<(u64, String)> {
        decoded
            .records
            .iter()
            .map(|record| {
                let value = record.value.as_ref().unwrap();
                (record.offset, String::from_utf8(value.to_vec()).unwrap())
            })
            .collect()
    }

    #[test]
    fn given_first_batch_starting_before_the_offset_should_skip_records_below_it() {
        let mut bytes = batch(10, &["a", "b", "c"]);
        bytes.extend(batch(13, &["d"]));
        let decoded = decode_batches(&Arc::from("t"), 4, 12, Bytes::from(bytes)).unwrap();
        assert_eq!(values(&decoded), [(12, "c".into()), (13, "d".into())]);
        assert_eq!(decoded.end_offset, Some(14));
        assert!(!decoded.truncated);
        let record = &decoded.records[0];
        assert_eq!(record.partition, 4);
        assert_eq!(record.timestamp, 1_002);
        assert_eq!(record.key.as_deref(), Some(&b"k2"[..]));
        assert_eq!(record.headers.len(), 1);
        assert_eq!(record.headers[0].key, "h");
    }

    #[test]
    fn given_partial_last_batch_should_drop_it_and_end_at_the_whole_ones() {
        let mut bytes = batch(0, &["a"]);
        let second = batch(1, &["b", "c"]);
        bytes.extend_from_slice(&second[..second.len() - 3]);
        let decoded = decode_batches(&Arc::from("t"), 0, 0, Bytes::from(bytes)).unwrap();
        assert_eq!(values(&decoded), [(0, "a".into())]);
        assert_eq!(decoded.end_offset, Some(1));
        assert!(decoded.truncated);
    }

    #[test]
    fn given_corrupt_batch_should_fail() {
        let mut bytes = batch(0, &["a"]);
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        assert!(matches!(
            decode_batches(&Arc::from("t"), 0, 0, Bytes::from(bytes)),
            Err(BatchError::CrcMismatch { .. })
        ));
        let first_only_partial = batch(0, &["a"]);
        assert!(matches!(
            decode_batches(
                &Arc::from("t"),
                0,
                0,
                Bytes::from(first_only_partial[..70].to_vec())
            ),
            Err(BatchError::TooShort { .. })
        ));
    }

    #[test]
    fn given_control_batch_should_skip_it_but_advance() {
        let mut builder = BatchBuilder::new().control();
        builder.push(0, None, Some(b"marker"), &[]);
        let mut control = builder.finish().unwrap().to_vec();
        stamp_base_offset(&mut control, 5);
        let mut bytes = control;
        bytes.extend(batch(6, &["x"]));
        let decoded = decode_batches(&Arc::from("t"), 0, 5, Bytes::from(bytes)).unwrap();
        assert_eq!(values(&decoded), [(6, "x".into())]);
        assert_eq!(decoded.end_offset, Some(7));
    }

    #[test]
    fn given_empty_response_should_decode_nothing() {
        let decoded = decode_batches(&Arc::from("t"), 0, 3, Bytes::new()).unwrap();
        assert!(decoded.records.is_empty());
        assert_eq!(decoded.end_offset, None);
    }

    #[test]
    fn config_validation_should_name_the_key() {
        ConsumerConfig::default().validate().unwrap();
        let bad = ConsumerConfig {
            partitions: Some(vec![]),
            ..Default::default()
        };
        assert!(matches!(
            bad.validate(),
            Err(Error::InvalidConfig {
                key: "partitions",
                ..
            })
        ));
        let bad = ConsumerConfig {
            fetch_max_wait: Duration::from_secs(3600),
            ..Default::default()
        };
        assert!(matches!(
            bad.validate(),
            Err(Error::InvalidConfig {
                key: "fetch_max_wait",
                ..
            })
        ));
    }
}
