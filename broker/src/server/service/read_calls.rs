//! The read calls of the Broker service: Fetch, Subscribe, ListOffsets, and the tables' Get,
//! History and Snapshot. Each checks the caller's permission first (`super::super::authorize`);
//! responses carry stored batches as `Bytes` slices of the segment mappings, built in
//! `super::super::reads`.

use super::*;

impl BrokerService {
    pub(super) async fn fetch_call(
        &self,
        request: Request<v1::FetchRequest>,
    ) -> Result<Response<v1::FetchResponse>, Status> {
        self.authorize_on_topic(&request, Operation::Read)?;
        let principal = request.extensions().get::<Principal>().cloned();
        let request = request.into_inner();
        self.await_topic(&request.topic).await;
        let (topic, partition, log) = self.partition_log(&request.topic, request.partition)?;
        let max_bytes = self
            .fetch_limits(request.max_bytes, request.decode_records)
            .map_err(to_status)?;
        let max_wait = request
            .max_wait_ms
            .min(self.registry.config().limits.max_wait_ms);
        let deadline = tokio::time::Instant::now() + Duration::from_millis(u64::from(max_wait));
        let mut durable = log.subscribe_durable();
        let mut shutdown = self.shutdown.clone();
        let decode_from = request.decode_records.then_some(request.offset);
        loop {
            durable.borrow_and_update();
            if topic.deleted.load(std::sync::atomic::Ordering::Acquire) {
                return Err(Status::not_found(format!(
                    "topic `{}` was deleted",
                    topic.name
                )));
            }
            let read = log
                .read(request.offset, max_bytes)
                .map_err(|e| to_status(partition.log_error(e)))?;
            if !read.bytes.is_empty()
                || tokio::time::Instant::now() >= deadline
                || *shutdown.borrow()
            {
                let delay = throttle(
                    self.quotas.as_deref(),
                    principal.as_ref(),
                    Direction::Fetch,
                    read.bytes.len() as u64,
                )
                .await;
                let permit = self
                    .fetch_permit(read.bytes.len(), request.decode_records)
                    .await
                    .map_err(to_status)?;
                let message =
                    fetch_response(partition.id, read, &log, decode_from).map_err(to_status)?;
                let mut response = Response::new(message);
                if let Some(mut permit) = permit {
                    permit.shrink_to(response.get_ref().encoded_len());
                    // Held until the transport has written the response (`super::budget`).
                    response.extensions_mut().insert(UnaryPermit::new(permit));
                }
                mark(&mut response, delay);
                return Ok(response);
            }
            tokio::select! {
                changed = durable.changed() => {
                    if changed.is_err() {
                        return Err(to_status(BrokerError::ShuttingDown));
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {}
                _ = shutdown.wait_for(|stop| *stop) => {}
            }
        }
    }

    pub(super) async fn subscribe_call(
        &self,
        request: Request<v1::SubscribeRequest>,
    ) -> Result<Response<ResponseStream<v1::FetchResponse>>, Status> {
        self.authorize_on_topic(&request, Operation::Read)?;
        let watch = self.watch_stream(request.extensions(), "Subscribe");
        let principal = request.extensions().get::<Principal>().cloned();
        let quotas = self.quotas.clone();
        let request = request.into_inner();
        self.await_topic(&request.topic).await;
        let (topic, partition, log) = self.partition_log(&request.topic, request.partition)?;
        // Validate the start offset now, so a bad one is an error status, not an empty stream.
        log.read(request.offset, 1)
            .map_err(|e| to_status(partition.log_error(e)))?;
        let subscription = Subscription {
            max_bytes: self
                .fetch_limits(request.max_bytes, request.decode_records)
                .map_err(to_status)?,
            decode_from: request.decode_records.then_some(request.offset),
            offset: request.offset,
            durable: log.subscribe_durable(),
            topic,
            partition,
            log,
            shutdown: self.shutdown.clone(),
            budget: self.budget.clone(),
            ended: false,
        };
        // Produced one message at a time, when the transport asks for it: nothing is read
        // ahead of a slow subscriber, and the budget bounds what the transport holds.
        // Over a fetch quota, the stream waits before reading its next message (holding no
        // response budget meanwhile). The caller's permission is checked again for each
        // message: once `read` is revoked, the next message is PERMISSION_DENIED instead and
        // the stream ends.
        let service = self.clone();
        let topic_name = request.topic.clone();
        let messages = Box::pin(futures_util::stream::unfold(
            (subscription, Duration::ZERO, false),
            move |(mut subscription, owed, ended)| {
                let quotas = quotas.clone();
                let principal = principal.clone();
                let service = service.clone();
                let topic_name = topic_name.clone();
                async move {
                    if ended {
                        return None;
                    }
                    if !owed.is_zero() {
                        tokio::time::sleep(owed).await;
                    }
                    let message = subscription.next_message().await?;
                    if let Err(error) = service.access.check(
                        service.cluster.controller.as_deref(),
                        principal.as_ref(),
                        Operation::Read,
                        Resource::topic(&topic_name),
                    ) {
                        return Some(((Err(to_status(error)), None), (subscription, owed, true)));
                    }
                    let owed = match &message.0 {
                        Ok(response) => charge(
                            quotas.as_deref(),
                            principal.as_ref(),
                            Direction::Fetch,
                            response.encoded_len() as u64,
                        ),
                        Err(_) => Duration::ZERO,
                    };
                    Some((message, (subscription, owed, false)))
                }
            },
        ));
        let stream: ResponseStream<v1::FetchResponse> =
            Box::pin(HeldUntilSent::watched(messages, watch));
        Ok(Response::new(stream))
    }

    pub(super) async fn list_offsets_call(
        &self,
        request: Request<v1::ListOffsetsRequest>,
    ) -> Result<Response<v1::ListOffsetsResponse>, Status> {
        self.authorize_on_topic(&request, Operation::Describe)?;
        let request = request.into_inner();
        self.await_topic(&request.topic).await;
        let (_topic, partition, log) = self.partition_log(&request.topic, request.partition)?;
        let spec = v1::OffsetSpec::try_from(request.spec).map_err(|_| {
            Status::invalid_argument(format!(
                "unknown offset spec {}: use EARLIEST, LATEST or TIMESTAMP",
                request.spec
            ))
        })?;
        let (offset, found) = match spec {
            v1::OffsetSpec::Earliest => (log.start_offset(), true),
            v1::OffsetSpec::Unspecified | v1::OffsetSpec::Latest => (log.durable_offset(), true),
            v1::OffsetSpec::Timestamp => match log
                .offset_for_timestamp(request.timestamp_ms)
                .map_err(|e| to_status(partition.log_error(e)))?
            {
                Some(offset) => (offset, true),
                None => (log.durable_offset(), false),
            },
        };
        Ok(Response::new(v1::ListOffsetsResponse { offset, found }))
    }

    pub(super) async fn get_call(
        &self,
        request: Request<v1::GetRequest>,
    ) -> Result<Response<v1::GetResponse>, Status> {
        self.authorize_on_topic(&request, Operation::Read)?;
        let request = request.into_inner();
        self.await_topic(&request.topic).await;
        // Linearizable on a replicated table: the leader confirms it still leads and has
        // applied everything committed before the read (read index).
        if let Ok(partition) = self.key_partition(&request.topic, &request.key) {
            partition.read_barrier().await.map_err(to_status)?;
        }
        let (partition, slot) = match self.latest(&request.topic, &request.key) {
            Ok(found) => found,
            Err(status) => {
                // A delete is only reported once it is durable, like any other read.
                self.wait_for_delete(&request.topic, &request.key).await;
                return Err(status);
            }
        };
        let record = self
            .read_version(&partition, &request.key, slot.offset)
            .await?;
        Ok(Response::new(v1::GetResponse {
            partition: partition.id,
            version: record.offset,
            value: record.value.unwrap_or_default(),
            timestamp_ms: record.timestamp,
            headers: record_headers(record.headers),
        }))
    }

    pub(super) async fn history_call(
        &self,
        request: Request<v1::HistoryRequest>,
    ) -> Result<Response<v1::HistoryResponse>, Status> {
        self.authorize_on_topic(&request, Operation::Read)?;
        let request = request.into_inner();
        let partition = self
            .key_partition(&request.topic, &request.key)
            .map_err(to_status)?;
        let partition_id = partition.id;
        if !partition.is_table {
            return Err(to_status(BrokerError::NotATable {
                topic: request.topic,
            }));
        }
        let limit = positive_or_default(
            request.limit,
            "limit",
            HISTORY_LIMIT_DEFAULT,
            HISTORY_LIMIT_MAX,
        )
        .map_err(to_status)? as usize;
        let log = partition.log().map_err(to_status)?.clone();
        let key = request.key.clone();
        // A scan of the partition up to the durable offset (versions are not chained).
        let versions =
            tokio::task::spawn_blocking(move || -> Result<Vec<v1::Version>, BrokerError> {
                let mut versions = std::collections::VecDeque::new();
                let mut offset = log.start_offset();
                let upper = log.durable_offset();
                while offset < upper {
                    let read = log
                        .read(offset, 4 * 1024 * 1024)
                        .map_err(|e| partition.log_error(e))?;
                    if read.bytes.is_empty() {
                        break;
                    }
                    for batch in Batches::new(read.bytes.clone()) {
                        let batch = batch.map_err(|e| {
                            BrokerError::InvalidRequest(format!("stored batch: {e}"))
                        })?;
                        for record in batch.records() {
                            let record = record.map_err(|e| {
                                BrokerError::InvalidRequest(format!("stored record: {e}"))
                            })?;
                            if record.key.as_deref() == Some(&key[..]) {
                                versions.push_back(v1::Version {
                                    version: record.offset,
                                    value: record.value,
                                    timestamp_ms: record.timestamp,
                                });
                                if versions.len() > limit {
                                    versions.pop_front();
                                }
                            }
                        }
                    }
                    offset = read.next_offset;
                }
                Ok(versions.into_iter().collect())
            })
            .await
            .map_err(|e| Status::internal(format!("history task failed: {e}")))?
            .map_err(to_status)?;
        Ok(Response::new(v1::HistoryResponse {
            partition: partition_id,
            versions,
        }))
    }

    pub(super) async fn snapshot_call(
        &self,
        request: Request<v1::SnapshotRequest>,
    ) -> Result<Response<ResponseStream<v1::SnapshotResponse>>, Status> {
        self.authorize_on_topic(&request, Operation::Read)?;
        let watch = self.watch_stream(request.extensions(), "Snapshot");
        let request = request.into_inner();
        self.check_running().map_err(to_status)?;
        self.await_topic(&request.topic).await;
        let (_topic, partition) = self
            .partition(&request.topic, request.partition)
            .map_err(to_status)?;
        let plan = partition.begin_snapshot().map_err(to_status)?;
        let log = partition.log().map_err(to_status)?.clone();
        // Readers see only durable records: nothing below H is streamed before H is.
        let mut shutdown = self.shutdown.clone();
        tokio::select! {
            durable = log.wait_durable(plan.high_watermark) => {
                durable.map_err(|e| to_status(partition.log_error(e)))?;
            }
            _ = shutdown.wait_for(|stop| *stop) => {
                return Err(to_status(BrokerError::ShuttingDown));
            }
        }
        let max_bytes = self.snapshot_limits(request.max_bytes).map_err(to_status)?;
        let (tx, rx) = mpsc::channel(SNAPSHOT_READ_AHEAD);
        let runtime = tokio::runtime::Handle::current();
        let shutdown = self.shutdown.clone();
        let budget = self.budget.clone();
        tokio::task::spawn_blocking(move || {
            stream_snapshot(runtime, partition, plan, max_bytes, tx, shutdown, budget)
        });
        let stream: ResponseStream<v1::SnapshotResponse> =
            Box::pin(HeldUntilSent::watched(ReceiverStream::new(rx), watch));
        Ok(Response::new(stream))
    }
}

/// A read request that names one topic: what its permission is checked on.
pub(super) trait OnTopic {
    /// The topic the request reads.
    fn topic(&self) -> &str;
}

macro_rules! on_topic {
    ($($request:ty),* $(,)?) => {
        $(impl OnTopic for $request {
            fn topic(&self) -> &str {
                &self.topic
            }
        })*
    };
}

on_topic!(
    v1::FetchRequest,
    v1::SubscribeRequest,
    v1::ListOffsetsRequest,
    v1::GetRequest,
    v1::HistoryRequest,
    v1::SnapshotRequest,
);
