//! Pins the broker-wide response-bytes budget (`--response-bytes-max`): subscribers that never
//! read hold at most their share of it, so the broker's memory stays bounded by the budget instead
//! of growing with every stalled stream, other clients are still served meanwhile, and a stalled
//! stream resumes losing nothing once it reads.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::probe::{anonymous_memory_bytes, metric_value, metrics_text};
use common::BrokerProcess;
use syncline_proto::batch::BatchBuilder;
use syncline_proto::v1;
use syncline_proto::v1::broker_client::BrokerClient;
use tonic::transport::Channel;

const MIB: u64 = 1024 * 1024;
/// The budget under test: small, so that the stalled streams below would exceed it many times.
const BUDGET_BYTES: u64 = 32 * MIB;
/// Stalled subscribers. Without the budget each buffers the whole topic encoded (about twice its
/// 8 MiB with decoded records): about 1 GiB in all, far above the bound checked.
const STALLED_STREAMS: usize = 64;
/// Connections the stalled streams share (several streams per connection, like a real client).
const CONNECTIONS: usize = 8;
/// The topic: 8 batches of 1 MiB (1,024 records of 1 KiB).
const BATCHES: usize = 8;
const RECORDS_PER_BATCH: usize = 1024;
const VALUE_BYTES: usize = 1024;
/// What each stalled stream asks for: the broker's largest fetch, with decoded records (the
/// shape of the reported finding).
const STREAM_MAX_BYTES: u32 = 16 * MIB as u32;

fn batch() -> Bytes {
    let mut builder = BatchBuilder::new();
    let value = vec![7u8; VALUE_BYTES];
    for _ in 0..RECORDS_PER_BATCH {
        builder.push(1, None, Some(&value), &[]);
    }
    builder.finish().unwrap()
}

async fn connect(broker: &BrokerProcess) -> BrokerClient<Channel> {
    broker.client().await
}

async fn stalled_subscribe(
    client: &mut BrokerClient<Channel>,
) -> tonic::Streaming<v1::FetchResponse> {
    client
        .subscribe(v1::SubscribeRequest {
            topic: "big".into(),
            max_bytes: STREAM_MAX_BYTES,
            decode_records: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

/// The largest anonymous memory of `pid` seen over `period`.
async fn peak_anonymous_memory(pid: u32, period: Duration) -> u64 {
    let started = Instant::now();
    let mut peak = 0;
    while started.elapsed() < period {
        peak = peak.max(anonymous_memory_bytes(pid));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    peak
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_many_subscribers_that_never_read_when_budget_is_small_should_bound_memory_and_keep_serving(
) {
    let dir = tempfile::tempdir().unwrap();
    let budget = BUDGET_BYTES.to_string();
    let broker = BrokerProcess::start_with(dir.path(), &["--response-bytes-max", &budget]);
    let metrics = broker.metrics_addr.clone().expect("metrics address");
    let pid = broker.child.id();
    let mut client = connect(&broker).await;
    client
        .create_topic(v1::CreateTopicRequest {
            name: "big".into(),
            config: Some(v1::TopicConfig {
                partitions: 1,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let batch = batch();
    for _ in 0..BATCHES {
        client
            .produce(v1::ProduceRequest {
                topic: "big".into(),
                batch: batch.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let records = (BATCHES * RECORDS_PER_BATCH) as u64;
    let baseline = anonymous_memory_bytes(pid);

    // One stream on a connection of its own (read at the end), the others stalled for good.
    let mut survivor_client = connect(&broker).await;
    let mut survivor = stalled_subscribe(&mut survivor_client).await;
    let mut clients = Vec::new();
    for _ in 0..CONNECTIONS {
        clients.push(connect(&broker).await);
    }
    let mut stalled = Vec::new();
    for index in 0..STALLED_STREAMS - 1 {
        stalled.push(stalled_subscribe(&mut clients[index % CONNECTIONS]).await);
    }
    let peak = peak_anonymous_memory(pid, Duration::from_secs(3)).await;
    let grown = peak.saturating_sub(baseline);
    eprintln!(
        "anonymous memory: baseline {} MiB, peak {} MiB with {STALLED_STREAMS} stalled streams",
        baseline / MIB,
        peak / MIB
    );
    // Encoded copies of the messages the budget admits, plus HTTP/2 and allocator slack. Measured
    // ~40 MiB growth with the budget; ~1 GiB without it.
    let bound = 3 * BUDGET_BYTES;
    assert!(
        grown < bound,
        "stalled subscribers grew the broker by {} MiB (bound {} MiB)",
        grown / MIB,
        bound / MIB
    );

    // Another client is still served: it produces and fetches while the budget is taken.
    let mut other = connect(&broker).await;
    let produced = tokio::time::timeout(
        Duration::from_secs(10),
        other.produce(v1::ProduceRequest {
            topic: "big".into(),
            records: vec![v1::Record {
                value: Some(Bytes::from_static(b"still served")),
                ..Default::default()
            }],
            ..Default::default()
        }),
    )
    .await
    .expect("produce answered in time")
    .unwrap()
    .into_inner();
    assert_eq!(produced.base_offset, records);
    let fetched = tokio::time::timeout(
        Duration::from_secs(10),
        other.fetch(v1::FetchRequest {
            topic: "big".into(),
            offset: records,
            decode_records: true,
            ..Default::default()
        }),
    )
    .await
    .expect("fetch answered in time")
    .unwrap()
    .into_inner();
    assert_eq!(fetched.records.len(), 1);
    assert_eq!(
        fetched.records[0].value.as_deref(),
        Some(&b"still served"[..])
    );

    let text = metrics_text(&metrics);
    let waits = metric_value(&text, "syncline_response_budget_waits_total");
    assert!(waits.unwrap_or(0.0) > 0.0, "budget waits: {waits:?}");
    let in_flight = metric_value(&text, "syncline_response_bytes_in_flight").unwrap_or(-1.0);
    assert!(
        in_flight > 0.0 && in_flight <= BUDGET_BYTES as f64,
        "bytes in flight {in_flight} outside (0, {BUDGET_BYTES}]"
    );

    // The stalled streams go away; their budget returns and the survivor gets every record.
    drop(stalled);
    drop(clients);
    let mut next = 0;
    while next <= records {
        let message = tokio::time::timeout(Duration::from_secs(30), survivor.message())
            .await
            .expect("the survivor's stream moves once the others are gone")
            .unwrap()
            .expect("stream open");
        for record in &message.records {
            assert_eq!(record.offset, next, "records in order, none lost");
            next += 1;
        }
    }
    let text = metrics_text(&metrics);
    drop(survivor);
    drop(survivor_client);
    assert!(metric_value(&text, "syncline_response_bytes_in_flight").is_some());
    assert!(broker.stop(), "clean exit");
}
