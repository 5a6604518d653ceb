//! A partition: one log plus its live state. Produce validation that needs the topic (key ->
//! partition) happens here, so the log stays a pure byte store.

use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use syncline_proto::batch::{Batch, BatchBuilder};
use syncline_proto::partitioner::partition_for_key;

use crate::error::BrokerError;
use crate::log::{Appended, Log, LogError};

/// A partition: its log, or the reason it is fenced.
#[derive(Debug)]
pub struct Partition {
    /// The topic name.
    pub topic: Arc<str>,
    /// Partition number.
    pub id: u32,
    /// Partitions in the topic (for the key check).
    pub partitions: u32,
    state: Result<Arc<Log>, String>,
    flusher: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// One plain record, as the broker receives it from clients without the codec.
#[derive(Debug, Clone)]
pub struct PlainRecord {
    /// Key (None = unkeyed).
    pub key: Option<Bytes>,
    /// Value (None = tombstone).
    pub value: Option<Bytes>,
    /// Headers.
    pub headers: Vec<(String, Bytes)>,
    /// Timestamp in ms; 0 = now.
    pub timestamp_ms: i64,
}

impl Partition {
    /// A partition serving `log`, with its group-commit flusher started.
    pub fn open(topic: Arc<str>, id: u32, partitions: u32, log: Log) -> Partition {
        let log = Arc::new(log);
        let flusher = log.spawn_flusher();
        Partition {
            topic,
            id,
            partitions,
            state: Ok(log),
            flusher: Mutex::new(Some(flusher)),
        }
    }

    /// A partition whose log refused to open: every request gets `reason`.
    pub fn fenced(topic: Arc<str>, id: u32, partitions: u32, reason: String) -> Partition {
        Partition {
            topic,
            id,
            partitions,
            state: Err(reason),
            flusher: Mutex::new(None),
        }
    }

    /// The log, or the fence.
    pub fn log(&self) -> Result<&Arc<Log>, BrokerError> {
        self.state.as_ref().map_err(|reason| BrokerError::Fenced {
            topic: self.topic.to_string(),
            partition: self.id,
            reason: reason.clone(),
        })
    }

    /// Why the partition is fenced, if it is.
    pub fn fence_reason(&self) -> Option<&str> {
        self.state.as_ref().err().map(String::as_str)
    }

    pub(crate) fn log_error(&self, source: LogError) -> BrokerError {
        BrokerError::Log {
            topic: self.topic.to_string(),
            partition: self.id,
            source,
        }
    }

    /// Checks every record of a verified batch: well formed, and each key in this partition.
    /// The one per-record pass of the produce path (the batch is neither copied nor re-encoded).
    pub fn check_records(&self, batch: &Batch) -> Result<(), BrokerError> {
        for (index, record) in batch.records().enumerate() {
            let record = record.map_err(|e| {
                BrokerError::InvalidRequest(format!("invalid batch: record {index}: {e}"))
            })?;
            if let Some(key) = &record.key {
                let expected = partition_for_key(key, self.partitions);
                if expected != self.id {
                    return Err(BrokerError::WrongPartitionForKey {
                        topic: self.topic.to_string(),
                        partition: self.id,
                        expected,
                        index,
                    });
                }
            }
        }
        Ok(())
    }

    /// Validates and appends an encoded batch.
    pub fn append_batch(&self, bytes: Bytes) -> Result<Appended, BrokerError> {
        let log = self.log()?;
        let batch = Batch::parse(bytes)
            .map_err(|e| BrokerError::InvalidRequest(format!("invalid batch: {e}")))?;
        self.check_records(&batch)?;
        log.append_batch(&batch).map_err(|e| self.log_error(e))
    }

    /// Encodes plain records into one batch and appends it.
    pub fn append_records(
        &self,
        records: &[PlainRecord],
        now_ms: i64,
    ) -> Result<Appended, BrokerError> {
        let log = self.log()?;
        let mut builder = BatchBuilder::with_capacity(
            records
                .iter()
                .map(|r| {
                    r.key.as_ref().map_or(0, |k| k.len())
                        + r.value.as_ref().map_or(0, |v| v.len())
                        + 32
                })
                .sum::<usize>()
                + 64,
        );
        for (index, record) in records.iter().enumerate() {
            if let Some(key) = &record.key {
                let expected = partition_for_key(key, self.partitions);
                if expected != self.id {
                    return Err(BrokerError::WrongPartitionForKey {
                        topic: self.topic.to_string(),
                        partition: self.id,
                        expected,
                        index,
                    });
                }
            }
            let headers: Vec<(&str, &[u8])> = record
                .headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_ref()))
                .collect();
            let timestamp = if record.timestamp_ms == 0 {
                now_ms
            } else {
                record.timestamp_ms
            };
            builder.push(
                timestamp,
                record.key.as_deref(),
                record.value.as_deref(),
                &headers,
            );
        }
        let bytes = builder
            .finish()
            .map_err(|e| BrokerError::InvalidRequest(format!("cannot encode records: {e}")))?;
        let batch = Batch::parse(bytes)
            .map_err(|e| BrokerError::InvalidRequest(format!("cannot encode records: {e}")))?;
        log.append_batch(&batch).map_err(|e| self.log_error(e))
    }

    /// Flushes, writes the clean-shutdown marker and stops the flusher.
    pub async fn close(&self) {
        if let Ok(log) = &self.state {
            let log = log.clone();
            let topic = self.topic.clone();
            let id = self.id;
            let result = tokio::task::spawn_blocking(move || log.close()).await;
            match result {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    tracing::error!(topic = %topic, partition = id, %error, "closing partition log failed")
                }
                Err(error) => {
                    tracing::error!(topic = %topic, partition = id, %error, "closing partition log panicked")
                }
            }
        }
        let flusher = self.flusher.lock().take();
        if let Some(flusher) = flusher {
            let _ = flusher.await;
        }
    }
}
