//! What the read and table calls of the Broker service share: fetch and snapshot limits, the
//! response-budget permit of a fetch, and a table key's latest durable version.

use super::*;

impl BrokerService {
    /// Bytes of batches one response may carry: the request's, at most the fetch limit and the
    /// message's share of the response budget. Decoded records roughly double a response, so
    /// a decoding fetch reads half as much to stay within the message limit.
    pub(super) fn fetch_limits(
        &self,
        max_bytes: Option<u32>,
        decode_records: bool,
    ) -> Result<usize, BrokerError> {
        let limit = self.registry.config().limits.max_fetch_bytes;
        let bytes = (positive_or_default(max_bytes, "max_bytes", DEFAULT_FETCH_BYTES, limit)?
            as usize)
            .min(self.budget.message_bytes_max());
        Ok(if decode_records {
            (bytes / 2).max(1)
        } else {
            bytes
        })
    }

    /// Record bytes one snapshot message may carry: the request's, or 1 MiB, at most 4 MiB and
    /// at most the fetch limit.
    pub(super) fn snapshot_limits(&self, max_bytes: Option<u32>) -> Result<usize, BrokerError> {
        let max = SNAPSHOT_BYTES_MAX.min(self.registry.config().limits.max_fetch_bytes);
        Ok(
            (positive_or_default(max_bytes, "max_bytes", DEFAULT_SNAPSHOT_BYTES, max)? as usize)
                .min(self.budget.message_bytes_max()),
        )
    }

    /// Budget for a fetch response of `batch_bytes`: waits up to [`FETCH_BUDGET_WAIT`].
    pub(super) async fn fetch_permit(
        &self,
        batch_bytes: usize,
        decode: bool,
    ) -> Result<Option<ResponsePermit>, BrokerError> {
        if batch_bytes == 0 {
            return Ok(None);
        }
        let started = Instant::now();
        self.budget
            .acquire_for_unary(
                response_bytes_estimate(batch_bytes, decode),
                FETCH_BUDGET_WAIT,
            )
            .await
            .map(Some)
            .map_err(|_| BrokerError::ResponseBudgetExhausted {
                budget_bytes: self.budget.budget_bytes() as u64,
                waited_ms: started.elapsed().as_millis() as u64,
            })
    }

    /// The partition of `key` in table `topic` and the key's live latest version.
    pub(super) fn latest(
        &self,
        topic: &str,
        key: &[u8],
    ) -> Result<(Arc<Partition>, crate::state::Slot), Status> {
        let partition = self.key_partition(topic, key).map_err(to_status)?;
        match partition.latest(key).map_err(to_status)? {
            Some(slot) if !slot.tombstone => Ok((partition, slot)),
            _ => Err(to_status(BrokerError::KeyNotFound {
                topic: topic.to_string(),
                key: show_key(key),
            })),
        }
    }

    /// Waits until the key's latest record (a delete) is durable, if it is one.
    pub(super) async fn wait_for_delete(&self, topic: &str, key: &[u8]) {
        let Ok(partition) = self.key_partition(topic, key) else {
            return;
        };
        if let (Ok(Some(slot)), Ok(log)) = (partition.latest(key), partition.log()) {
            let _ = log.wait_durable(slot.offset + 1).await;
        }
    }

    /// The record at `offset`, once it is durable (reads never see more).
    pub(super) async fn read_version(
        &self,
        partition: &Partition,
        key: &[u8],
        offset: u64,
    ) -> Result<syncline_proto::batch::Record, Status> {
        let log = partition.log().map_err(to_status)?;
        log.wait_durable(offset + 1)
            .await
            .map_err(|e| to_status(partition.log_error(e)))?;
        let read = log
            .read(offset, 1)
            .map_err(|e| to_status(partition.log_error(e)))?;
        for batch in Batches::new(read.bytes) {
            let batch = batch.map_err(|e| Status::data_loss(format!("stored batch: {e}")))?;
            for record in batch.records() {
                let record =
                    record.map_err(|e| Status::data_loss(format!("stored record: {e}")))?;
                if record.offset == offset {
                    if record.key.as_deref() != Some(key) {
                        return Err(Status::internal(format!(
                            "key index collision at offset {offset}: the record there has another key"
                        )));
                    }
                    return Ok(record);
                }
            }
        }
        Err(Status::internal(format!(
            "key index points at offset {offset}, which holds no record"
        )))
    }
}
