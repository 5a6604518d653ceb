//! Table benchmarks: compare-and-set puts with durable acks over loopback gRPC against an
//! in-process broker (one hot key: read-CAS chains; many keys: 64 concurrent writers on
//! distinct keys), and the key index itself (insert rate and memory per key).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
mod common;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use syncline_broker::state::KeyIndex;
use syncline_proto::partitioner::partition_for_key;
use syncline_proto::v1::{self, broker_client::BrokerClient};
use tonic::transport::Channel;

const PARTITIONS: u32 = 4;
static TOPICS: AtomicU64 = AtomicU64::new(0);

async fn create_table(client: &mut BrokerClient<Channel>) -> String {
    let name = format!("table-{}", TOPICS.fetch_add(1, Ordering::Relaxed));
    client
        .create_topic(v1::CreateTopicRequest {
            name: name.clone(),
            config: Some(v1::TopicConfig {
                partitions: Some(PARTITIONS),
                cleanup_policy: v1::CleanupPolicy::Compact as i32,
                ..Default::default()
            }),
        })
        .await
        .expect("create");
    name
}

/// A durable CAS put of `key` expecting `expected` (None = absent); returns the new version.
async fn cas(
    client: &mut BrokerClient<Channel>,
    topic: &str,
    key: &Bytes,
    expected: Option<u64>,
) -> u64 {
    let request = v1::ProduceRequest {
        topic: topic.to_string(),
        partition: partition_for_key(key, PARTITIONS),
        records: vec![v1::Record {
            key: Some(key.clone()),
            value: Some(Bytes::from_static(b"0123456789abcdef0123456789abcdef")),
            ..Default::default()
        }],
        conditions: vec![v1::Condition {
            key: key.clone(),
            expect: Some(match expected {
                Some(version) => v1::condition::Expect::Version(version),
                None => v1::condition::Expect::Absent(true),
            }),
        }],
        ..Default::default()
    };
    client
        .produce(request)
        .await
        .expect("cas")
        .into_inner()
        .base_offset
}

fn cas_puts(c: &mut Criterion) {
    let common::Setup {
        runtime,
        mut client,
        _dir,
    } = common::setup("syncline-tables-");
    let mut group = c.benchmark_group("cas_put_durable");
    group.throughput(Throughput::Elements(1));
    group.bench_function("one_hot_key", |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let topic = create_table(&mut client).await;
                let key = Bytes::from_static(b"counter");
                let started = Instant::now();
                let mut version = None;
                for _ in 0..iters {
                    version = Some(cas(&mut client, &topic, &key, version).await);
                }
                started.elapsed()
            })
        })
    });
    group.bench_function("many_keys_64_writers", |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let topic = create_table(&mut client).await;
                let per_task = iters.div_ceil(64);
                let started = Instant::now();
                let mut tasks = Vec::new();
                for task in 0..64u64 {
                    let mut client = client.clone();
                    let topic = topic.clone();
                    tasks.push(tokio::spawn(async move {
                        let key = Bytes::from(format!("key-{task}"));
                        let mut version = None;
                        for _ in 0..per_task {
                            version = Some(cas(&mut client, &topic, &key, version).await);
                        }
                    }));
                }
                for task in tasks {
                    task.await.expect("task");
                }
                started
                    .elapsed()
                    .mul_f64(iters as f64 / (per_task * 64) as f64)
            })
        })
    });
    group.finish();
}

fn key_index(c: &mut Criterion) {
    let keys: Vec<Vec<u8>> = (0..1_000_000u64)
        .map(|i| format!("user-{i:08}").into_bytes())
        .collect();
    let mut index = KeyIndex::default();
    for (offset, key) in keys.iter().enumerate() {
        index.set(key, offset as u64, false);
    }
    eprintln!(
        "key index: {} keys, {} bytes of heap, {:.1} bytes per key",
        index.len(),
        index.memory_bytes(),
        index.memory_bytes() as f64 / index.len() as f64
    );
    let mut group = c.benchmark_group("key_index");
    group.throughput(Throughput::Elements(1));
    let mut i = 0usize;
    group.bench_function("update_existing_of_1M", |b| {
        b.iter(|| {
            i = (i + 7919) % keys.len();
            index.set(&keys[i], i as u64, false);
        })
    });
    group.bench_function("lookup_of_1M", |b| {
        b.iter(|| {
            i = (i + 7919) % keys.len();
            std::hint::black_box(index.get(&keys[i]))
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = key_index, cas_puts
}
criterion_main!(benches);
