//! Pins the broker's `Snapshot` RPC through the real binary: for every partition of a table the
//! snapshot equals "latest value of every key, deletes left out" of the log prefix below its H
//! (rebuilt here independently with Fetch), records come in ascending offsets, H is the durable
//! offset, small `max_bytes` splits it into several messages with `last` only on the final one,
//! an empty table is one final message, wrong topics and partitions get the documented codes,
//! under concurrent writers every snapshot is exactly the prefix below its own H, and (in an
//! in-process broker whose pins the test can see) a running snapshot pins its H until the
//! client goes away, and a broker shutdown ends it without a final message.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use common::BrokerProcess;
use prost::Message as _;
use syncline_proto::partitioner::partition_for_key;
use syncline_proto::v1;
use syncline_proto::v1::broker_client::BrokerClient;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::Code;

const PARTITIONS: u32 = 3;
/// Keys written by the populating tests: enough that every partition holds dozens.
const KEYS: u32 = 120;

type Grpc = BrokerClient<Channel>;
/// key -> (offset, value): the expected content of a snapshot.
type Reference = BTreeMap<Bytes, (u64, Bytes)>;

async fn create(client: &mut Grpc, name: &str, cleanup: v1::CleanupPolicy) {
    client
        .create_topic(v1::CreateTopicRequest {
            name: name.into(),
            config: Some(v1::TopicConfig {
                partitions: Some(PARTITIONS),
                cleanup_policy: cleanup as i32,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
}

fn put(topic: &str, key: &str, value: Option<&str>) -> v1::ProduceRequest {
    v1::ProduceRequest {
        topic: topic.into(),
        partition: partition_for_key(key.as_bytes(), PARTITIONS),
        records: vec![v1::Record {
            key: Some(Bytes::copy_from_slice(key.as_bytes())),
            value: value.map(|v| Bytes::copy_from_slice(v.as_bytes())),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Several versions of every key; every 5th key deleted, every 15th written again after its
/// delete. Returns the keys deleted for good.
async fn populate(client: &mut Grpc, topic: &str) -> Vec<String> {
    let mut deleted = Vec::new();
    for round in 0..4 {
        for k in 0..KEYS {
            let key = format!("key-{k}");
            let value = format!("{key}-round-{round}-{}", "x".repeat((k % 7) as usize * 10));
            client
                .produce(put(topic, &key, Some(&value)))
                .await
                .unwrap();
        }
    }
    for k in (0..KEYS).step_by(5) {
        let key = format!("key-{k}");
        client.produce(put(topic, &key, None)).await.unwrap();
        if k % 15 == 0 {
            let value = format!("{key}-after-delete");
            client
                .produce(put(topic, &key, Some(&value)))
                .await
                .unwrap();
        } else {
            deleted.push(key);
        }
    }
    deleted
}

/// Every message of one Snapshot call.
async fn snapshot(
    client: &mut Grpc,
    topic: &str,
    partition: u32,
    max_bytes: Option<u32>,
) -> Vec<v1::SnapshotResponse> {
    let mut stream = client
        .snapshot(v1::SnapshotRequest {
            topic: topic.into(),
            partition,
            max_bytes,
        })
        .await
        .unwrap()
        .into_inner();
    let mut messages = Vec::new();
    while let Some(message) = stream.next().await {
        messages.push(message.unwrap());
    }
    messages
}

async fn snapshot_error(client: &mut Grpc, topic: &str, partition: u32) -> tonic::Status {
    match client
        .snapshot(v1::SnapshotRequest {
            topic: topic.into(),
            partition,
            max_bytes: None,
        })
        .await
    {
        Ok(response) => {
            // A status may also arrive as the stream's first item.
            let mut stream = response.into_inner();
            match stream.next().await {
                Some(Err(status)) => status,
                other => panic!("expected an error, got {other:?}"),
            }
        }
        Err(status) => status,
    }
}

/// Checks the framing of one snapshot (one H, one keys_total, `last` only on the final
/// message, ascending offsets below H) and returns H and its records.
fn records_of(messages: &[v1::SnapshotResponse], partition: u32) -> (u64, Vec<v1::FetchedRecord>) {
    assert!(!messages.is_empty(), "a snapshot has at least one message");
    let high_watermark = messages[0].high_watermark;
    let keys_total = messages[0].keys_total;
    for (i, message) in messages.iter().enumerate() {
        assert_eq!(message.partition, partition);
        assert_eq!(message.high_watermark, high_watermark, "message {i}: one H");
        assert_eq!(
            message.keys_total, keys_total,
            "message {i}: one keys_total"
        );
        assert_eq!(message.last, i + 1 == messages.len(), "message {i}: last");
    }
    let records: Vec<v1::FetchedRecord> = messages
        .iter()
        .flat_map(|m| m.records.iter().cloned())
        .collect();
    assert_eq!(
        records.len() as u64,
        keys_total,
        "keys_total counts the records"
    );
    for pair in records.windows(2) {
        assert!(
            pair[0].offset < pair[1].offset,
            "ascending offsets: {} then {}",
            pair[0].offset,
            pair[1].offset
        );
    }
    for record in &records {
        assert!(
            record.offset < high_watermark,
            "{} >= H {high_watermark}",
            record.offset
        );
        assert!(record.value.is_some(), "no tombstones ({})", record.offset);
    }
    (high_watermark, records)
}

fn as_map(records: &[v1::FetchedRecord]) -> Reference {
    let mut map = Reference::new();
    for record in records {
        let key = record.key.clone().expect("table records have keys");
        let previous = map.insert(
            key,
            (record.offset, record.value.clone().unwrap_or_default()),
        );
        assert!(previous.is_none(), "one record per key");
    }
    map
}

/// The latest live value of every key in the partition's log prefix `[0, upper)`, read with
/// Fetch (decoded records), independently of the broker's key index.
async fn reference(client: &mut Grpc, topic: &str, partition: u32, upper: u64) -> Reference {
    let mut latest: BTreeMap<Bytes, (u64, Option<Bytes>)> = BTreeMap::new();
    let mut offset = 0;
    while offset < upper {
        let response = client
            .fetch(v1::FetchRequest {
                topic: topic.into(),
                partition,
                offset,
                max_bytes: Some(64 * 1024),
                max_wait_ms: 0,
                decode_records: true,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(
            response.next_offset > offset,
            "fetch at {offset} made no progress below {upper}"
        );
        for record in response.records {
            if record.offset >= upper {
                continue;
            }
            let key = record.key.expect("table records have keys");
            latest.insert(key, (record.offset, record.value));
        }
        offset = response.next_offset;
    }
    latest
        .into_iter()
        .filter_map(|(key, (offset, value))| value.map(|value| (key, (offset, value))))
        .collect()
}

async fn durable_offset(client: &mut Grpc, topic: &str, partition: u32) -> u64 {
    client
        .list_offsets(v1::ListOffsetsRequest {
            topic: topic.into(),
            partition,
            spec: v1::OffsetSpec::Latest as i32,
            timestamp_ms: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .offset
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_versions_and_deletes_snapshot_of_each_partition_should_equal_the_log_prefix_below_h()
{
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    let mut client = broker.client().await;
    create(&mut client, "table", v1::CleanupPolicy::Compact).await;
    let deleted = populate(&mut client, "table").await;
    let mut seen_keys = 0;
    for partition in 0..PARTITIONS {
        let messages = snapshot(&mut client, "table", partition, None).await;
        let (high_watermark, records) = records_of(&messages, partition);
        assert_eq!(
            high_watermark,
            durable_offset(&mut client, "table", partition).await,
            "H is the durable offset (no writes in flight)"
        );
        let expected = reference(&mut client, "table", partition, high_watermark).await;
        assert!(!expected.is_empty(), "partition {partition} holds keys");
        let got = as_map(&records);
        assert_eq!(got, expected, "partition {partition}");
        for key in &deleted {
            assert!(!got.contains_key(key.as_bytes()), "{key} was deleted");
        }
        seen_keys += got.len();
    }
    assert_eq!(seen_keys, KEYS as usize - deleted.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_small_max_bytes_snapshot_should_come_in_several_messages_with_last_on_the_final_one()
{
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    let mut client = broker.client().await;
    create(&mut client, "table", v1::CleanupPolicy::Compact).await;
    populate(&mut client, "table").await;
    for partition in 0..PARTITIONS {
        let whole = snapshot(&mut client, "table", partition, None).await;
        assert_eq!(whole.len(), 1, "a small partition fits one default message");
        let (high_watermark, all) = records_of(&whole, partition);
        // Each record is about 40-110 bytes encoded: 256 bytes holds a few of them.
        let chunked = snapshot(&mut client, "table", partition, Some(256)).await;
        let (chunked_high_watermark, records) = records_of(&chunked, partition);
        assert_eq!(chunked_high_watermark, high_watermark);
        assert!(chunked.len() > 1, "{} records in one message", all.len());
        for message in &chunked {
            // Encoded records (each with its 2-byte field tag and length) stay within max_bytes.
            let bytes: usize = message.records.iter().map(|r| r.encoded_len() + 2).sum();
            assert!(bytes <= 256, "{bytes} bytes of records in one message");
        }
        assert_eq!(records, all, "chunking changes the framing only");
        // A record larger than max_bytes still goes out, alone in its message.
        let tiny = snapshot(&mut client, "table", partition, Some(1)).await;
        let (_, records) = records_of(&tiny, partition);
        assert_eq!(records, all);
        assert!(tiny[..tiny.len() - 1].iter().all(|m| m.records.len() == 1));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_an_empty_table_snapshot_should_be_one_final_message_with_no_keys() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    let mut client = broker.client().await;
    create(&mut client, "table", v1::CleanupPolicy::Compact).await;
    for partition in 0..PARTITIONS {
        let messages = snapshot(&mut client, "table", partition, None).await;
        assert_eq!(messages.len(), 1);
        let message = &messages[0];
        assert!(message.last);
        assert_eq!(message.keys_total, 0);
        assert_eq!(message.high_watermark, 0);
        assert!(message.records.is_empty());
    }
    // Only deletes: still empty, but H moved past them.
    client
        .produce(put("table", "gone", Some("v")))
        .await
        .unwrap();
    client.produce(put("table", "gone", None)).await.unwrap();
    let partition = partition_for_key(b"gone", PARTITIONS);
    let messages = snapshot(&mut client, "table", partition, None).await;
    assert_eq!(messages.len(), 1);
    assert!(messages[0].last && messages[0].records.is_empty());
    assert_eq!(messages[0].keys_total, 0);
    assert_eq!(messages[0].high_watermark, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_wrong_topic_or_partition_snapshot_should_fail_with_the_documented_code() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    let mut client = broker.client().await;
    create(&mut client, "table", v1::CleanupPolicy::Compact).await;
    create(&mut client, "events", v1::CleanupPolicy::Delete).await;

    let status = snapshot_error(&mut client, "events", 0).await;
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("not a table"),
        "{}",
        status.message()
    );

    let status = snapshot_error(&mut client, "nope", 0).await;
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(status.message().contains("nope"), "{}", status.message());

    let status = snapshot_error(&mut client, "table", PARTITIONS).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status
            .message()
            .contains(&format!("partition {PARTITIONS}")),
        "{}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_concurrent_writers_each_snapshot_should_equal_the_log_prefix_below_its_h() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    let mut client = broker.client().await;
    create(&mut client, "table", v1::CleanupPolicy::Compact).await;
    populate(&mut client, "table").await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for writer in 0..2u32 {
        let mut client = broker.client().await;
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut i = 0u32;
            let mut written = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("key-{}", (i * 7 + writer) % (KEYS + 30));
                // Every 4th write a delete, so keys disappear and come back while snapshots run.
                let value = format!("w{writer}-{i}");
                let value = (i % 4 != 3).then_some(value.as_str());
                let mut request = put("table", &key, value);
                // Leader acks: the writer runs ahead of the fsync, so H often has to wait.
                request.acks = v1::Acks::Leader as i32;
                client.produce(request).await.unwrap();
                i += 1;
                written += 1;
            }
            written
        }));
    }
    let mut snapshots = 0;
    let mut high_watermarks = vec![Vec::new(); PARTITIONS as usize];
    for _round in 0..4 {
        for partition in 0..PARTITIONS {
            let messages = snapshot(&mut client, "table", partition, Some(512)).await;
            let (high_watermark, records) = records_of(&messages, partition);
            let expected = reference(&mut client, "table", partition, high_watermark).await;
            assert_eq!(
                as_map(&records),
                expected,
                "partition {partition} at H {high_watermark}"
            );
            high_watermarks[partition as usize].push(high_watermark);
            snapshots += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut written = 0;
    for writer in writers {
        written += writer.await.unwrap();
    }
    assert_eq!(snapshots, 4 * PARTITIONS);
    assert!(written > 0);
    for (partition, hs) in high_watermarks.iter().enumerate() {
        assert!(
            hs.windows(2).all(|w| w[0] <= w[1]),
            "partition {partition}: H never goes back: {hs:?}"
        );
    }
}

/// An in-process broker (the binary's code) whose registry the test can look into, serving
/// until `stop` fires.
async fn in_process(
    dir: &std::path::Path,
) -> (
    Grpc,
    Arc<syncline_broker::topic::Registry>,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let config = syncline_broker::config::Config {
        data_dir: dir.to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen_explicit: true,
        ..Default::default()
    };
    let broker = syncline_broker::server::Broker::start(config)
        .await
        .unwrap();
    let url = format!("http://{}", broker.local_addr());
    let registry = broker.registry().clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(async move {
        broker
            .serve(async move {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    let client = BrokerClient::connect(url).await.unwrap();
    (client, registry, stop, served)
}

/// Bytes per value of the big table: 4000 of them (16 MiB) are far more than the HTTP/2
/// windows and the snapshot channel can hold, so a snapshot of it is still running while the
/// client has read only its first message.
const BIG_VALUE_BYTES: usize = 4096;
const BIG_KEYS: usize = 4000;

/// One-partition table `big` with BIG_KEYS keys of BIG_VALUE_BYTES each.
async fn big_table(client: &mut Grpc) {
    client
        .create_topic(v1::CreateTopicRequest {
            name: "big".into(),
            config: Some(v1::TopicConfig {
                partitions: Some(1),
                cleanup_policy: v1::CleanupPolicy::Compact as i32,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let value = Bytes::from(vec![b'v'; BIG_VALUE_BYTES]);
    for chunk in 0..BIG_KEYS / 100 {
        let records = (0..100)
            .map(|i| v1::Record {
                key: Some(Bytes::from(format!("key-{}", chunk * 100 + i))),
                value: Some(value.clone()),
                ..Default::default()
            })
            .collect();
        client
            .produce(v1::ProduceRequest {
                topic: "big".into(),
                partition: 0,
                records,
                ..Default::default()
            })
            .await
            .unwrap();
    }
}

/// Waits until no snapshot pins partition 0 of `big`. Gives up (fails) after a minute, far
/// beyond the milliseconds it takes, so a leaked pin fails the test instead of hanging it.
async fn wait_unpinned(registry: &syncline_broker::topic::Registry) {
    let topic = registry.get("big").unwrap();
    let partition = topic.partition(0).unwrap().clone();
    for _ in 0..6000 {
        if partition.oldest_pin().is_none() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!(
        "the snapshot still pins offset {:?}",
        partition.oldest_pin()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_a_client_that_goes_away_mid_snapshot_should_stop_and_release_the_pin() {
    let dir = tempfile::tempdir().unwrap();
    let (mut client, registry, stop, served) = in_process(dir.path()).await;
    big_table(&mut client).await;
    let mut stream = client
        .snapshot(v1::SnapshotRequest {
            topic: "big".into(),
            partition: 0,
            max_bytes: Some(1),
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.next().await.unwrap().unwrap();
    assert!(!first.last);
    assert_eq!(first.keys_total, BIG_KEYS as u64);
    let partition = registry.get("big").unwrap().partition(0).unwrap().clone();
    assert_eq!(
        partition.oldest_pin(),
        Some(first.high_watermark),
        "a running snapshot pins its H"
    );
    drop(stream);
    wait_unpinned(&registry).await;
    let _ = stop.send(());
    served.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_broker_shutdown_mid_snapshot_should_end_the_stream_without_a_final_message() {
    let dir = tempfile::tempdir().unwrap();
    let (mut client, registry, stop, served) = in_process(dir.path()).await;
    big_table(&mut client).await;
    let mut stream = client
        .snapshot(v1::SnapshotRequest {
            topic: "big".into(),
            partition: 0,
            max_bytes: Some(1),
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.next().await.unwrap().unwrap();
    assert!(!first.last);
    let _ = stop.send(());
    let mut received = 1;
    while let Some(item) = stream.next().await {
        match item {
            Ok(message) => {
                assert!(
                    !message.last,
                    "a stopped snapshot never claims to be complete"
                );
                received += 1;
            }
            Err(status) => {
                assert!(
                    matches!(
                        status.code(),
                        Code::Unavailable | Code::Unknown | Code::Cancelled
                    ),
                    "{status:?}"
                );
                break;
            }
        }
    }
    assert!(
        received < BIG_KEYS,
        "the stream ended early ({received} messages)"
    );
    served.await.unwrap();
    wait_unpinned(&registry).await;
}
