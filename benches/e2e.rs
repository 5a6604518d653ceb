//! End-to-end benchmarks over loopback gRPC against an in-process broker (same code as the
//! `syncline-broker` binary): produce 1 KiB records in 256-record batches on a `ProduceStream`
//! (64 requests in flight) with leader and durable acks, and consume them with `Fetch` in
//! 1 MiB responses.
//!
//! Each produce sample writes to a fresh topic that is deleted afterwards, so dirty pages do
//! not pile up on the disk across samples.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
mod common;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use syncline_proto::batch::BatchBuilder;
use syncline_proto::v1::{self, broker_client::BrokerClient};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

const RECORDS_PER_BATCH: usize = 256;
const RECORD_BYTES: usize = 1024;
const IN_FLIGHT: usize = 64;

fn batch() -> Bytes {
    let mut builder = BatchBuilder::with_capacity(RECORDS_PER_BATCH * (RECORD_BYTES + 32) + 64);
    let value = vec![0x42u8; RECORD_BYTES];
    for _ in 0..RECORDS_PER_BATCH {
        builder.push(1_700_000_000_000, None, Some(&value), &[]);
    }
    builder.finish().expect("batch")
}

static TOPICS: AtomicU64 = AtomicU64::new(0);

async fn create_topic(client: &mut BrokerClient<Channel>) -> String {
    let name = format!("bench-{}", TOPICS.fetch_add(1, Ordering::Relaxed));
    client
        .create_topic(v1::CreateTopicRequest {
            name: name.clone(),
            config: Some(v1::TopicConfig {
                partitions: Some(1),
                ..Default::default()
            }),
        })
        .await
        .expect("create topic");
    name
}

/// Sends `batches` batches on one ProduceStream with `IN_FLIGHT` outstanding; returns the time
/// from the first send to the last ack.
async fn produce(
    client: &mut BrokerClient<Channel>,
    topic: &str,
    batch: &Bytes,
    batches: u64,
    acks: v1::Acks,
) -> Duration {
    let (tx, rx) = tokio::sync::mpsc::channel(IN_FLIGHT);
    let started = Instant::now();
    let mut responses = client
        .produce_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("stream")
        .into_inner();
    let topic = topic.to_string();
    let batch = batch.clone();
    let sender = tokio::spawn(async move {
        for i in 0..batches {
            let request = v1::ProduceRequest {
                correlation_id: i,
                topic: topic.clone(),
                partition: 0,
                acks: acks as i32,
                batch: batch.clone(),
                ..Default::default()
            };
            if tx.send(request).await.is_err() {
                return;
            }
        }
    });
    for _ in 0..batches {
        let response = responses.next().await.expect("ack").expect("ack status");
        assert!(response.error.is_none(), "{:?}", response.error);
    }
    let elapsed = started.elapsed();
    sender.await.expect("sender");
    elapsed
}

fn produce_bench(c: &mut Criterion) {
    let mut setup = common::setup("syncline-e2e-");
    let batch = batch();
    let mut group = c.benchmark_group("e2e_produce_1KiB_x256");
    group.throughput(Throughput::ElementsAndBytes {
        elements: RECORDS_PER_BATCH as u64,
        bytes: batch.len() as u64,
    });
    for (name, acks) in [("leader", v1::Acks::Leader), ("durable", v1::Acks::Durable)] {
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter_custom(|iters| {
                setup.runtime.block_on(async {
                    let topic = create_topic(&mut setup.client).await;
                    let elapsed = produce(&mut setup.client, &topic, &batch, iters, acks).await;
                    setup
                        .client
                        .delete_topic(v1::DeleteTopicRequest { name: topic })
                        .await
                        .expect("delete");
                    elapsed
                })
            })
        });
    }
    group.finish();
}

fn consume_bench(c: &mut Criterion) {
    let mut setup = common::setup("syncline-e2e-");
    let batch = batch();
    let total_batches = 1000u64; // ~260 MiB
    let topic = setup.runtime.block_on(async {
        let topic = create_topic(&mut setup.client).await;
        produce(
            &mut setup.client,
            &topic,
            &batch,
            total_batches,
            v1::Acks::Durable,
        )
        .await;
        topic
    });
    let end = total_batches * RECORDS_PER_BATCH as u64;
    let mut group = c.benchmark_group("e2e_consume_1KiB");
    let sample = setup.runtime.block_on(async {
        setup
            .client
            .fetch(v1::FetchRequest {
                topic: topic.clone(),
                partition: 0,
                offset: 0,
                max_bytes: Some(1024 * 1024),
                ..Default::default()
            })
            .await
            .expect("fetch")
            .into_inner()
    });
    let records_per_fetch = sample.next_offset;
    group.throughput(Throughput::ElementsAndBytes {
        elements: records_per_fetch,
        bytes: sample.batches.len() as u64,
    });
    group.bench_function("fetch_1MiB", |b| {
        let mut offset = 0;
        b.iter(|| {
            if offset + records_per_fetch > end {
                offset = 0;
            }
            let response = setup.runtime.block_on(setup.client.fetch(v1::FetchRequest {
                topic: topic.clone(),
                partition: 0,
                offset,
                max_bytes: Some(1024 * 1024),
                ..Default::default()
            }));
            let response = response.expect("fetch").into_inner();
            offset = response.next_offset;
            std::hint::black_box(response.batches.len())
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    targets = produce_bench, consume_bench
}
criterion_main!(benches);
