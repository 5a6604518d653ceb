//! The produce path of the Broker service: one request's validation and append (the batch is
//! checked and appended as it came, never re-encoded), its acknowledgement at the asked
//! level, and the responses of `ProduceStream`.

use super::*;

/// The bytes a produce request carries: its batch, or its records' keys and values (what the
/// produce-bytes metric counts and a produce quota charges).
pub(super) fn request_bytes(request: &v1::ProduceRequest) -> u64 {
    request.batch.len() as u64
        + request
            .records
            .iter()
            .map(|r| {
                r.key.as_ref().map_or(0, |k| k.len()) + r.value.as_ref().map_or(0, |v| v.len())
            })
            .sum::<usize>() as u64
}

impl BrokerService {
    /// Validates and appends one produce request; returns what to wait on for its ack.
    pub(super) fn append(
        &self,
        request: v1::ProduceRequest,
    ) -> Result<(Arc<Partition>, Submitted, Acks), BrokerError> {
        self.check_running()?;
        let acks = acks_of(request.acks)?;
        let (_topic, partition) = self.partition(&request.topic, request.partition)?;
        // Internal topics (`__offsets`) are written by the broker only: a client record there
        // would bypass the coordinator's fencing and be replayed as committed offsets.
        if request.topic.starts_with("__") {
            return Err(BrokerError::InvalidTopicName {
                name: request.topic.clone(),
                reason: "internal topics are written by the broker only",
            });
        }
        let limits = &self.registry.config().limits;
        let request_bytes = request_bytes(&request);
        if request.conditions.len() > 1000 {
            return Err(BrokerError::TooLarge(format!(
                "{} conditions exceed the limit of 1000 per request",
                request.conditions.len()
            )));
        }
        let conditions: Vec<Condition> = request
            .conditions
            .iter()
            .map(|c| match c.expect {
                Some(v1::condition::Expect::Version(version)) => Ok(Condition {
                    key: c.key.clone(),
                    expected: Some(version),
                }),
                Some(v1::condition::Expect::Absent(true)) => Ok(Condition {
                    key: c.key.clone(),
                    expected: None,
                }),
                _ => Err(BrokerError::InvalidRequest(
                    "a condition needs `version` or `absent: true`".into(),
                )),
            })
            .collect::<Result<_, _>>()?;
        let appended = match (request.batch.is_empty(), request.records.is_empty()) {
            (false, true) => {
                if request.batch.len() > limits.max_batch_bytes as usize {
                    return Err(BrokerError::TooLarge(format!(
                        "batch of {} bytes exceeds the broker's max_batch_bytes ({})",
                        request.batch.len(),
                        limits.max_batch_bytes
                    )));
                }
                partition.submit_batch(request.batch, &conditions)?
            }
            (true, false) => {
                if request.records.len() > limits.max_records_per_request {
                    return Err(BrokerError::TooLarge(format!(
                        "{} records exceed the limit of {} per request",
                        request.records.len(),
                        limits.max_records_per_request
                    )));
                }
                let records: Vec<PlainRecord> = request
                    .records
                    .into_iter()
                    .map(|r| PlainRecord {
                        key: r.key,
                        value: r.value,
                        headers: r.headers.into_iter().map(|h| (h.key, h.value)).collect(),
                        timestamp_ms: r.timestamp_ms,
                    })
                    .collect();
                let producer = if request.producer_id == 0 {
                    None
                } else {
                    match (
                        i64::try_from(request.producer_id),
                        i16::try_from(request.producer_epoch),
                        i32::try_from(request.base_sequence),
                    ) {
                        (Ok(id), Ok(epoch), Ok(sequence)) => Some((id, epoch, sequence)),
                        _ => {
                            return Err(BrokerError::InvalidRequest(format!(
                                "producer fields out of range: producer_id {} (< 2^63), producer_epoch {} (< 2^15), base_sequence {} (< 2^31)",
                                request.producer_id, request.producer_epoch, request.base_sequence
                            )))
                        }
                    }
                };
                partition.submit_records(&records, producer, &conditions, now_ms())?
            }
            (false, false) => {
                return Err(BrokerError::InvalidRequest(
                    "a produce request carries either `batch` or `records`, not both".into(),
                ))
            }
            (true, true) => {
                return Err(BrokerError::InvalidRequest(
                    "empty produce request: set `batch` (an encoded record batch) or `records`"
                        .into(),
                ))
            }
        };
        metrics::counter!(crate::metrics::PRODUCE_BYTES_TOTAL).increment(request_bytes);
        Ok((partition, appended, acks))
    }

    /// Waits for a write's acknowledgement at the asked level (a replicated partition's write
    /// always waits until it is applied: that is when its offsets are known).
    pub(super) async fn ack(
        partition: &Partition,
        submitted: Submitted,
        acks: Acks,
    ) -> Result<Appended, BrokerError> {
        partition
            .acknowledged(submitted, acks == Acks::Durable)
            .await
    }

    pub(super) fn produce_response(
        correlation_id: u64,
        partition: u32,
        appended: Appended,
    ) -> v1::ProduceResponse {
        v1::ProduceResponse {
            correlation_id,
            partition,
            base_offset: appended.base_offset,
            last_offset: appended.last_offset,
            error: None,
        }
    }

    pub(super) fn error_response(
        correlation_id: u64,
        partition: u32,
        error: BrokerError,
    ) -> v1::ProduceResponse {
        let status = to_status(error);
        v1::ProduceResponse {
            correlation_id,
            partition,
            base_offset: 0,
            last_offset: 0,
            error: Some(v1::ErrorStatus {
                code: status.code() as i32,
                message: status.message().to_string(),
            }),
        }
    }
}

impl BrokerService {
    /// `ProduceStream`: each message checked, appended and answered once acknowledged (in ack
    /// order); at most [`STREAM_IN_FLIGHT_MAX`] in flight before the stream is not read further.
    pub(super) async fn produce_stream_call(
        &self,
        request: Request<Streaming<v1::ProduceRequest>>,
    ) -> Result<Response<ResponseStream<v1::ProduceResponse>>, Status> {
        let principal = request.extensions().get::<Principal>().cloned();
        Ok(Response::new(
            self.produce_stream_responses(principal, request.into_inner()),
        ))
    }

    /// The responses of a `ProduceStream` whose requests are `inbound`: decoded by tonic
    /// (`produce_stream_call`) or by `super::super::wire_calls` (the path clients take,
    /// without copying batches).
    pub fn produce_stream_responses<S>(
        &self,
        principal: Option<Principal>,
        mut inbound: S,
    ) -> ResponseStream<v1::ProduceResponse>
    where
        S: Stream<Item = Result<v1::ProduceRequest, Status>> + Send + Unpin + 'static,
    {
        let (tx, rx) = mpsc::channel(STREAM_IN_FLIGHT_MAX);
        let service = self.clone();
        let mut shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let in_flight = Arc::new(Semaphore::new(STREAM_IN_FLIGHT_MAX));
            loop {
                let next = tokio::select! {
                    next = inbound.next() => next,
                    _ = shutdown.wait_for(|stop| *stop) => break,
                };
                let request = match next {
                    Some(Ok(request)) => request,
                    Some(Err(status)) => {
                        // E.g. a message over the size limit: tell the client instead of ending
                        // the stream as if all were well (which it would retry).
                        tracing::debug!(%status, "produce stream request failed to decode");
                        let status = decode_limit_to_resource_exhausted(
                            status,
                            service.registry.config().limits.max_batch_bytes,
                        );
                        let _ = tx.try_send(Err(status));
                        break;
                    }
                    None => break,
                };
                // Bounded in flight: the stream is not read further until acks drain.
                let permit = tokio::select! {
                    permit = in_flight.clone().acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => break,
                    },
                    _ = shutdown.wait_for(|stop| *stop) => break,
                };
                let correlation_id = request.correlation_id;
                let partition_id = request.partition;
                let bytes = request_bytes(&request);
                let message_started = Instant::now();
                let appended = service
                    .access
                    .check(
                        service.cluster.controller.as_deref(),
                        principal.as_ref(),
                        Operation::Write,
                        Resource::topic(&request.topic),
                    )
                    .map(|()| request);
                if let Ok(request) = &appended {
                    service.await_topic(&request.topic).await;
                }
                match appended.and_then(|request| service.append(request)) {
                    Err(error) => {
                        drop(permit);
                        let response = Self::error_response(correlation_id, partition_id, error);
                        observe_message(message_started, &response);
                        tokio::select! {
                            sent = tx.send(Ok(response)) => if sent.is_err() { break },
                            _ = shutdown.wait_for(|stop| *stop) => break,
                        }
                    }
                    Ok((partition, submitted @ Submitted::Replicated(_), acks))
                    | Ok((partition, submitted, acks @ Acks::Durable)) => {
                        let tx = tx.clone();
                        let mut shutdown = shutdown.clone();
                        let quotas = service.quotas.clone();
                        let principal = principal.clone();
                        tokio::spawn(async move {
                            let response = match Self::ack(&partition, submitted, acks).await {
                                Ok(appended) => {
                                    throttle(
                                        quotas.as_deref(),
                                        principal.as_ref(),
                                        Direction::Produce,
                                        bytes,
                                    )
                                    .await;
                                    Self::produce_response(correlation_id, partition_id, appended)
                                }
                                Err(error) => {
                                    Self::error_response(correlation_id, partition_id, error)
                                }
                            };
                            observe_message(message_started, &response);
                            // A client that stops reading pins this task only until shutdown.
                            tokio::select! {
                                _ = tx.send(Ok(response)) => {}
                                _ = shutdown.wait_for(|stop| *stop) => {}
                            }
                            drop(permit);
                        });
                    }
                    Ok((_, Submitted::Local(appended), _)) => {
                        // Throttled in line: the stream is not read further meanwhile.
                        throttle(
                            service.quotas.as_deref(),
                            principal.as_ref(),
                            Direction::Produce,
                            bytes,
                        )
                        .await;
                        drop(permit);
                        let response =
                            Self::produce_response(correlation_id, partition_id, appended);
                        observe_message(message_started, &response);
                        tokio::select! {
                            sent = tx.send(Ok(response)) => if sent.is_err() { break },
                            _ = shutdown.wait_for(|stop| *stop) => break,
                        }
                    }
                }
            }
        });
        Box::pin(ReceiverStream::new(rx))
    }
}
