//! Producer and consumer against an in-process fake broker: pins the client's side of the wire
//! contract (correlation ids, per-request errors on a live stream, retries within the delivery
//! timeout, keyed partitioning, skipping records below the fetch offset, out-of-range policies)
//! without the real broker. The fake keeps whole stamped batches per partition and can be
//! scripted to fail the next produce requests.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::BytesMut;
use futures::FutureExt as _;
use syncline_proto::batch::{stamp_base_offset, Batch};
use syncline_proto::partitioner::partition_for_key;
use syncline_proto::v1::broker_server::{Broker, BrokerServer};
use syncline_proto::v1::{self, ErrorStatus};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Code, Request, Response, Status};

use crate::{Client, ConsumerConfig, Error, OffsetReset, ProducerConfig, StartOffset, TopicConfig};

/// What the fake does with the next produce request instead of appending it.
#[derive(Debug, Clone, Copy)]
enum Scripted {
    /// Answer with `error` set (the stream goes on).
    Fail(Code),
    /// End the whole stream with UNAVAILABLE.
    BreakStream,
}

#[derive(Debug, Default)]
struct PartitionLog {
    /// Stamped batches, in offset order.
    batches: Vec<Batch>,
    log_start_offset: u64,
    end_offset: u64,
}

#[derive(Debug, Default)]
struct State {
    topics: HashMap<String, Vec<PartitionLog>>,
    script: VecDeque<Scripted>,
    produce_requests: u64,
}

#[derive(Debug, Clone, Default)]
struct FakeBroker {
    state: Arc<Mutex<State>>,
}

impl FakeBroker {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// Appends like the real broker: verify, check key partitions, stamp the base offset.
    fn append(&self, request: &v1::ProduceRequest) -> Result<(u64, u64), Status> {
        let mut state = self.lock();
        let partitions = state.topics.get_mut(&request.topic).ok_or_else(|| {
            Status::not_found(format!("topic `{}` does not exist", request.topic))
        })?;
        let count = partitions.len() as u32;
        let log = partitions
            .get_mut(request.partition as usize)
            .ok_or_else(|| Status::invalid_argument("no such partition"))?;
        let batch = Batch::parse(request.batch.clone())
            .map_err(|error| Status::invalid_argument(error.to_string()))?;
        for record in batch.records() {
            let record = record.map_err(|error| Status::invalid_argument(error.to_string()))?;
            if let Some(key) = &record.key {
                if partition_for_key(key, count) != request.partition {
                    return Err(Status::invalid_argument("key sent to the wrong partition"));
                }
            }
        }
        let base_offset = log.end_offset;
        let mut stamped = BytesMut::from(&request.batch[..]);
        stamp_base_offset(&mut stamped, base_offset);
        let batch = Batch::parse(stamped.freeze()).unwrap();
        log.end_offset = batch.header().next_offset();
        let last_offset = batch.header().last_offset();
        log.batches.push(batch);
        Ok((base_offset, last_offset))
    }
}

#[tonic::async_trait]
impl Broker for FakeBroker {
    async fn init_producer(
        &self,
        _request: Request<v1::InitProducerRequest>,
    ) -> Result<Response<v1::InitProducerResponse>, Status> {
        Ok(Response::new(v1::InitProducerResponse {
            producer_id: 1,
            producer_epoch: 0,
        }))
    }

    async fn get(
        &self,
        _request: Request<v1::GetRequest>,
    ) -> Result<Response<v1::GetResponse>, Status> {
        Err(Status::unimplemented("the fake broker has no tables"))
    }

    async fn history(
        &self,
        _request: Request<v1::HistoryRequest>,
    ) -> Result<Response<v1::HistoryResponse>, Status> {
        Err(Status::unimplemented("the fake broker has no tables"))
    }

    async fn create_topic(
        &self,
        request: Request<v1::CreateTopicRequest>,
    ) -> Result<Response<v1::CreateTopicResponse>, Status> {
        let request = request.into_inner();
        let partitions = request.config.map_or(1, |config| config.partitions.max(1));
        let mut state = self.lock();
        if state.topics.contains_key(&request.name) {
            return Err(Status::already_exists("exists"));
        }
        state.topics.insert(
            request.name.clone(),
            (0..partitions).map(|_| PartitionLog::default()).collect(),
        );
        Ok(Response::new(v1::CreateTopicResponse {
            topic: Some(describe(&request.name, partitions)),
        }))
    }

    async fn delete_topic(
        &self,
        _: Request<v1::DeleteTopicRequest>,
    ) -> Result<Response<v1::DeleteTopicResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn list_topics(
        &self,
        _: Request<v1::ListTopicsRequest>,
    ) -> Result<Response<v1::ListTopicsResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn describe_topic(
        &self,
        request: Request<v1::DescribeTopicRequest>,
    ) -> Result<Response<v1::DescribeTopicResponse>, Status> {
        let name = request.into_inner().name;
        let partitions = self
            .lock()
            .topics
            .get(&name)
            .map(|partitions| partitions.len() as u32)
            .ok_or_else(|| Status::not_found(format!("topic `{name}` does not exist")))?;
        Ok(Response::new(v1::DescribeTopicResponse {
            topic: Some(describe(&name, partitions)),
        }))
    }

    async fn produce(
        &self,
        _: Request<v1::ProduceRequest>,
    ) -> Result<Response<v1::ProduceResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    type ProduceStreamStream = ReceiverStream<Result<v1::ProduceResponse, Status>>;

    async fn produce_stream(
        &self,
        request: Request<tonic::Streaming<v1::ProduceRequest>>,
    ) -> Result<Response<Self::ProduceStreamStream>, Status> {
        let mut requests = request.into_inner();
        let (responses, receiver) = mpsc::channel(64);
        let broker = self.clone();
        tokio::spawn(async move {
            while let Ok(Some(request)) = requests.message().await {
                let scripted = {
                    let mut state = broker.lock();
                    state.produce_requests += 1;
                    state.script.pop_front()
                };
                let mut response = v1::ProduceResponse {
                    correlation_id: request.correlation_id,
                    partition: request.partition,
                    ..Default::default()
                };
                match scripted {
                    Some(Scripted::BreakStream) => {
                        let _ = responses.send(Err(Status::unavailable("going away"))).await;
                        return;
                    }
                    Some(Scripted::Fail(code)) => {
                        response.error = Some(ErrorStatus {
                            code: code as i32,
                            message: format!("scripted {code:?}"),
                        });
                    }
                    None => match broker.append(&request) {
                        Ok((base_offset, last_offset)) => {
                            response.base_offset = base_offset;
                            response.last_offset = last_offset;
                        }
                        Err(status) => {
                            response.error = Some(ErrorStatus {
                                code: status.code() as i32,
                                message: status.message().to_owned(),
                            });
                        }
                    },
                }
                if responses.send(Ok(response)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn fetch(
        &self,
        request: Request<v1::FetchRequest>,
    ) -> Result<Response<v1::FetchResponse>, Status> {
        let request = request.into_inner();
        let response = {
            let state = self.lock();
            let log = state
                .topics
                .get(&request.topic)
                .and_then(|partitions| partitions.get(request.partition as usize))
                .ok_or_else(|| Status::not_found("no such topic or partition"))?;
            if request.offset < log.log_start_offset || request.offset > log.end_offset {
                return Err(Status::out_of_range(format!(
                    "offset {} is outside [{}, {}]",
                    request.offset, log.log_start_offset, log.end_offset
                )));
            }
            let mut bytes = BytesMut::new();
            let mut next_offset = request.offset;
            for batch in &log.batches {
                if batch.header().next_offset() > request.offset {
                    bytes.extend_from_slice(batch.as_bytes());
                    next_offset = batch.header().next_offset();
                }
            }
            v1::FetchResponse {
                partition: request.partition,
                batches: bytes.freeze(),
                records: Vec::new(),
                next_offset,
                high_watermark: log.end_offset,
                log_start_offset: log.log_start_offset,
            }
        };
        if response.batches.is_empty() {
            // A short long-poll: enough to keep an idle consumer from spinning.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Response::new(response))
    }

    type SubscribeStream = ReceiverStream<Result<v1::FetchResponse, Status>>;

    async fn subscribe(
        &self,
        _: Request<v1::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn list_offsets(
        &self,
        request: Request<v1::ListOffsetsRequest>,
    ) -> Result<Response<v1::ListOffsetsResponse>, Status> {
        let request = request.into_inner();
        let state = self.lock();
        let log = state
            .topics
            .get(&request.topic)
            .and_then(|partitions| partitions.get(request.partition as usize))
            .ok_or_else(|| Status::not_found("no such topic or partition"))?;
        let offset = match v1::OffsetSpec::try_from(request.spec) {
            Ok(v1::OffsetSpec::Earliest) => log.log_start_offset,
            _ => log.end_offset,
        };
        Ok(Response::new(v1::ListOffsetsResponse {
            offset,
            found: true,
        }))
    }
}

fn describe(name: &str, partitions: u32) -> v1::TopicDescription {
    v1::TopicDescription {
        name: name.to_owned(),
        config: Some(v1::TopicConfig {
            partitions,
            ..Default::default()
        }),
        partitions: (0..partitions)
            .map(|partition| v1::PartitionDescription {
                partition,
                ..Default::default()
            })
            .collect(),
    }
}

/// Starts a fake broker on a loopback port and connects a client to it.
async fn start() -> (Client, FakeBroker) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let broker = FakeBroker::default();
    let service = BrokerServer::new(broker.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let client = Client::connect(&address.to_string()).await.unwrap();
    (client, broker)
}

/// Quick retries, so failure tests take milliseconds.
fn fast_retries() -> ProducerConfig {
    ProducerConfig {
        linger: Duration::from_millis(1),
        retry_backoff: Duration::from_millis(5),
        retry_backoff_max: Duration::from_millis(20),
        ..ProducerConfig::default()
    }
}

async fn send_value(producer: &crate::Producer, value: &str) -> crate::Result<crate::Delivery> {
    producer.send(None, Some(value.as_bytes()), &[]).await
}

#[tokio::test]
async fn given_concurrent_keyed_sends_should_land_in_key_partitions_with_contiguous_offsets() {
    let (client, broker) = start().await;
    client
        .create_topic("t", TopicConfig::with_partitions(4))
        .await
        .unwrap();
    let producer = client.producer("t", fast_retries()).await.unwrap();
    assert_eq!(producer.partitions(), 4);
    let keys: Vec<String> = (0..300).map(|i| format!("key-{}", i % 17)).collect();
    let sends = keys
        .iter()
        .map(|key| producer.send(Some(key.as_bytes()), Some(b"v".as_slice()), &[]));
    let deliveries = futures::future::join_all(sends).await;
    let mut offsets_by_partition: HashMap<u32, Vec<u64>> = HashMap::new();
    for (key, delivery) in keys.iter().zip(deliveries) {
        let delivery = delivery.unwrap();
        assert_eq!(delivery.partition, partition_for_key(key.as_bytes(), 4));
        assert!(delivery.timestamp > 0);
        offsets_by_partition
            .entry(delivery.partition)
            .or_default()
            .push(delivery.offset);
    }
    for offsets in offsets_by_partition.values_mut() {
        offsets.sort_unstable();
        let expected: Vec<u64> = (0..offsets.len() as u64).collect();
        assert_eq!(*offsets, expected);
    }
    // Batching happened: far fewer requests than records.
    assert!(broker.lock().produce_requests < 300);
}

#[tokio::test]
async fn given_a_failed_request_on_the_stream_should_fail_only_that_batch() {
    let (client, broker) = start().await;
    client
        .create_topic("t", TopicConfig::with_partitions(1))
        .await
        .unwrap();
    let producer = client.producer("t", fast_retries()).await.unwrap();
    broker
        .lock()
        .script
        .push_back(Scripted::Fail(Code::InvalidArgument));
    let error = send_value(&producer, "rejected").await.unwrap_err();
    assert!(
        matches!(&error, Error::Broker { code: Code::InvalidArgument, message } if message == "scripted InvalidArgument"),
        "{error:?}"
    );
    let delivery = send_value(&producer, "accepted").await.unwrap();
    assert_eq!(delivery.offset, 0);
    assert_eq!(broker.lock().produce_requests, 2, "not retried");
}

#[tokio::test]
async fn given_transient_failures_should_retry_and_store_the_batch_once() {
    let (client, broker) = start().await;
    client
        .create_topic("t", TopicConfig::with_partitions(1))
        .await
        .unwrap();
    let producer = client.producer("t", fast_retries()).await.unwrap();
    broker.lock().script.extend([
        Scripted::Fail(Code::Unavailable),
        Scripted::BreakStream,
        Scripted::Fail(Code::Unavailable),
    ]);
    let delivery = send_value(&producer, "x").await.unwrap();
    assert_eq!(delivery.offset, 0);
    let state = broker.lock();
    assert_eq!(state.produce_requests, 4);
    assert_eq!(state.topics["t"][0].batches.len(), 1);
}

#[tokio::test]
async fn given_a_broker_that_stays_unavailable_should_fail_with_delivery_timeout() {
    let (client, broker) = start().await;
    client
        .create_topic("t", TopicConfig::with_partitions(1))
        .await
        .unwrap();
    let config = ProducerConfig {
        delivery_timeout: Duration::from_millis(300),
        ..fast_retries()
    };
    let producer = client.producer("t", config).await.unwrap();
    broker.lock().script.extend(std::iter::repeat_n(
        Scripted::Fail(Code::Unavailable),
        10_000,
    ));
    let started = std::time::Instant::now();
    let error = send_value(&producer, "x").await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    let Error::DeliveryTimeout {
        topic,
        partition,
        attempts,
        last_error,
        ..
    } = &error
    else {
        panic!("{error:?}");
    };
    assert_eq!((topic.as_str(), *partition), ("t", 0));
    assert!(*attempts >= 2, "{attempts}");
    assert!(matches!(
        last_error.as_deref(),
        Some(Error::Broker {
            code: Code::Unavailable,
            ..
        })
    ));
}

#[tokio::test]
async fn flush_should_send_lingering_records_and_wait_for_their_acks() {
    let (client, _broker) = start().await;
    client
        .create_topic("t", TopicConfig::with_partitions(2))
        .await
        .unwrap();
    let config = ProducerConfig {
        linger: Duration::from_secs(20),
        ..ProducerConfig::default()
    };
    let producer = client.producer("t", config).await.unwrap();
    let mut pending = Vec::new();
    for i in 0..10 {
        let value = format!("v{i}");
        pending.push(
            producer
                .enqueue(None, Some(value.as_bytes()), &[])
                .await
                .unwrap(),
        );
    }
    tokio::time::timeout(Duration::from_secs(5), producer.flush())
        .await
        .unwrap();
    for delivery in pending {
        let delivery = delivery.now_or_never().expect("acknowledged by flush");
        delivery.unwrap();
    }
}

#[tokio::test]
async fn records_that_can_never_be_sent_should_fail_at_once() {
    let (client, _broker) = start().await;
    client
        .create_topic("t", TopicConfig::with_partitions(1))
        .await
        .unwrap();
    let config = ProducerConfig {
        batch_bytes_max: 1024,
        buffer_bytes_max: 1024,
        ..ProducerConfig::default()
    };
    let producer = client.producer("t", config).await.unwrap();
    let big = vec![0u8; 2000];
    assert!(matches!(
        producer.send(None, Some(&big), &[]).await,
        Err(Error::RecordTooLarge { max: 1024, .. })
    ));
    let headers: Vec<(&str, &[u8])> = vec![("h", b""); 1025];
    assert!(matches!(
        producer.send(None, None, &headers).await,
        Err(Error::TooManyHeaders { count: 1025, .. })
    ));
    assert!(matches!(
        client.producer("missing", ProducerConfig::default()).await,
        Err(Error::Broker {
            code: Code::NotFound,
            ..
        })
    ));
}

/// Produces `values` to partition 0 of a one-partition topic `t` as one batch.
async fn produce_batch(client: &Client, values: &[&str]) {
    let producer = client.producer("t", fast_retries()).await.unwrap();
    let mut pending = Vec::new();
    for value in values {
        pending.push(
            producer
                .enqueue(None, Some(value.as_bytes()), &[])
                .await
                .unwrap(),
        );
    }
    producer.flush().await;
    for delivery in pending {
        delivery.await.unwrap();
    }
}

async fn next_value(consumer: &mut crate::Consumer) -> crate::Result<(u64, String)> {
    let record = tokio::time::timeout(Duration::from_secs(5), consumer.recv())
        .await
        .expect("a record within 5 s")
        .expect("stream not ended")?;
    Ok((
        record.offset,
        String::from_utf8(record.value.unwrap().to_vec()).unwrap(),
    ))
}

#[tokio::test]
async fn consumer_should_skip_records_below_its_start_offset_in_the_first_batch() {
    let (client, broker) = start().await;
    client
        .create_topic("t", TopicConfig::with_partitions(1))
        .await
        .unwrap();
    produce_batch(&client, &["a", "b", "c", "d", "e"]).await;
    produce_batch(&client, &["f", "g"]).await;
    assert_eq!(broker.lock().topics["t"][0].batches.len(), 2);
    let config = ConsumerConfig {
        start: StartOffset::Offset(3),
        ..ConsumerConfig::default()
    };
    let mut consumer = client.consumer("t", config).await.unwrap();
    assert_eq!(consumer.assignment(), [0]);
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(next_value(&mut consumer).await.unwrap());
    }
    assert_eq!(
        seen,
        [
            (3, "d".to_owned()),
            (4, "e".to_owned()),
            (5, "f".to_owned()),
            (6, "g".to_owned())
        ]
    );
    assert_eq!(consumer.position(0), Some(7));

    // Latest start sees only what comes after it.
    let mut latest = client
        .consumer("t", ConsumerConfig::default())
        .await
        .unwrap();
    produce_batch(&client, &["h"]).await;
    assert_eq!(next_value(&mut latest).await.unwrap(), (7, "h".to_owned()));
}

#[tokio::test]
async fn given_position_removed_by_retention_should_follow_the_reset_policy() {
    let (client, broker) = start().await;
    client
        .create_topic("t", TopicConfig::with_partitions(1))
        .await
        .unwrap();
    produce_batch(&client, &["a", "b", "c"]).await;
    produce_batch(&client, &["d", "e"]).await;
    {
        // Retention removes the first batch.
        let mut state = broker.lock();
        let log = &mut state.topics.get_mut("t").unwrap()[0];
        log.batches.remove(0);
        log.log_start_offset = 3;
    }
    let from_zero = |offset_reset| ConsumerConfig {
        start: StartOffset::Offset(0),
        offset_reset,
        ..ConsumerConfig::default()
    };

    let mut consumer = client
        .consumer("t", from_zero(OffsetReset::Error))
        .await
        .unwrap();
    let error = next_value(&mut consumer).await.unwrap_err();
    assert!(
        matches!(
            error,
            Error::OffsetOutOfRange {
                partition: 0,
                offset: 0,
                log_start_offset: 3,
                latest_offset: 5,
                ..
            }
        ),
        "{error:?}"
    );
    // That partition ended; no partition is left.
    assert!(consumer.recv().await.is_none());

    let mut consumer = client
        .consumer("t", from_zero(OffsetReset::Earliest))
        .await
        .unwrap();
    assert_eq!(
        next_value(&mut consumer).await.unwrap(),
        (3, "d".to_owned())
    );

    let mut consumer = client
        .consumer("t", from_zero(OffsetReset::Latest))
        .await
        .unwrap();
    produce_batch(&client, &["f"]).await;
    assert_eq!(
        next_value(&mut consumer).await.unwrap(),
        (5, "f".to_owned())
    );
}

#[tokio::test]
async fn consumer_should_refuse_partitions_the_topic_does_not_have() {
    let (client, _broker) = start().await;
    client
        .create_topic("t", TopicConfig::with_partitions(2))
        .await
        .unwrap();
    let config = ConsumerConfig {
        partitions: Some(vec![2]),
        ..ConsumerConfig::default()
    };
    assert!(matches!(
        client.consumer("t", config).await,
        Err(Error::UnknownPartition {
            partition: 2,
            partitions: 2,
            ..
        })
    ));
}

#[tokio::test]
async fn connecting_to_a_closed_port_should_name_the_address() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    drop(listener);
    let error = Client::connect(&format!("http://{address}"))
        .await
        .unwrap_err();
    assert!(matches!(&error, Error::Unreachable { .. }), "{error:?}");
    assert!(
        error
            .to_string()
            .starts_with(&format!("cannot reach the broker at {address}: ")),
        "{error}"
    );
}
