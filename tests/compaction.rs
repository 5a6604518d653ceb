//! Compaction through the real broker binary: many versions of many keys, compacted, keep
//! every key's latest value at its offset and every surviving record byte for byte; deletes go
//! after their retention and fetches report the horizon; the log shrinks; the result survives a
//! clean restart and a `kill -9`; a `kill -9` in the middle of a (throttled) pass loses nothing;
//! the background cleaner compacts by itself once a partition is dirty enough.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use common::{binary, BrokerProcess};
use syncline_proto::partitioner::partition_for_key;
use syncline_proto::v1;
use syncline_proto::v1::broker_client::BrokerClient;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

type Grpc = BrokerClient<Channel>;

/// Every record ever written: (partition, offset) -> (key, value or None for a delete).
type Written = BTreeMap<(u32, u64), (Bytes, Option<Bytes>)>;

async fn create_table(client: &mut Grpc, name: &str, partitions: u32, delete_retention_ms: u64) {
    client
        .create_topic(v1::CreateTopicRequest {
            name: name.into(),
            config: Some(v1::TopicConfig {
                partitions: Some(partitions),
                cleanup_policy: v1::CleanupPolicy::Compact as i32,
                segment_bytes: Some(64 * 1024),
                delete_retention_ms: Some(delete_retention_ms),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
}

/// Writes one version of each key (value None = delete), one request per partition.
async fn write_round(
    client: &mut Grpc,
    topic: &str,
    partitions: u32,
    writes: &[(String, Option<String>)],
    written: &mut Written,
) {
    for partition in 0..partitions {
        let mine: Vec<_> = writes
            .iter()
            .filter(|(key, _)| partition_for_key(key.as_bytes(), partitions) == partition)
            .collect();
        if mine.is_empty() {
            continue;
        }
        let records = mine
            .iter()
            .map(|(key, value)| v1::Record {
                key: Some(Bytes::from(key.clone())),
                value: value.clone().map(Bytes::from),
                ..Default::default()
            })
            .collect();
        let response = client
            .produce(v1::ProduceRequest {
                topic: topic.into(),
                partition,
                records,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        for (i, (key, value)) in mine.iter().enumerate() {
            written.insert(
                (partition, response.base_offset + i as u64),
                (Bytes::from(key.clone()), value.clone().map(Bytes::from)),
            );
        }
    }
}

fn round(keys: usize, round: usize, value_len: usize) -> Vec<(String, Option<String>)> {
    (0..keys)
        .map(|k| {
            (
                format!("key-{k}"),
                Some(format!("{round}:{k}:{}", "v".repeat(value_len))),
            )
        })
        .collect()
}

/// The latest write of every key: key -> (partition, offset, value or None).
fn latest(written: &Written) -> BTreeMap<Bytes, (u32, u64, Option<Bytes>)> {
    let mut out = BTreeMap::new();
    for ((partition, offset), (key, value)) in written {
        out.insert(key.clone(), (*partition, *offset, value.clone()));
    }
    out
}

/// Every record the partition serves now, checking offsets ascend; also the highest
/// compaction horizon the fetches reported.
async fn read_partition(
    client: &mut Grpc,
    topic: &str,
    partition: u32,
) -> (Vec<v1::FetchedRecord>, u64) {
    let mut out = Vec::new();
    let mut offset = 0;
    let mut horizon = 0;
    loop {
        let response = client
            .fetch(v1::FetchRequest {
                topic: topic.into(),
                partition,
                offset,
                max_bytes: Some(1 << 20),
                decode_records: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        horizon = horizon.max(response.compaction_horizon);
        if response.batches.is_empty() {
            return (out, horizon);
        }
        for record in response.records {
            assert!(out
                .last()
                .is_none_or(|p: &v1::FetchedRecord| p.offset < record.offset));
            out.push(record);
        }
        assert!(response.next_offset > offset);
        offset = response.next_offset;
    }
}

async fn snapshot(client: &mut Grpc, topic: &str, partition: u32) -> Vec<v1::FetchedRecord> {
    let mut stream = client
        .snapshot(v1::SnapshotRequest {
            topic: topic.into(),
            partition,
            max_bytes: None,
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(message) = stream.next().await {
        let message = message.unwrap();
        out.extend(message.records);
        if message.last {
            return out;
        }
    }
    panic!("snapshot ended without its last message");
}

/// The broker serves exactly a compacted view of `written`: every record it serves is the one
/// written at that offset, every key's latest live value is served and is in the snapshot, and
/// (unless deletes may have gone) every key's latest delete too. Returns records served.
async fn check(
    client: &mut Grpc,
    topic: &str,
    partitions: u32,
    written: &Written,
    deletes_may_go: bool,
) -> usize {
    let latest = latest(written);
    let mut served = 0;
    for partition in 0..partitions {
        let (records, _) = read_partition(client, topic, partition).await;
        served += records.len();
        let offsets: std::collections::HashSet<u64> = records.iter().map(|r| r.offset).collect();
        for record in &records {
            let (key, value) = written.get(&(partition, record.offset)).unwrap_or_else(|| {
                panic!("offset {} of {partition} was never written", record.offset)
            });
            assert_eq!(record.key.as_ref(), Some(key), "key at {}", record.offset);
            assert_eq!(&record.value, value, "value at {}", record.offset);
        }
        let snap = snapshot(client, topic, partition).await;
        let mut expected: Vec<(u64, Bytes)> = Vec::new();
        for (key, (p, offset, value)) in &latest {
            if *p != partition {
                continue;
            }
            match value {
                Some(_) => {
                    assert!(
                        offsets.contains(offset),
                        "latest value of {key:?} at {offset} is gone"
                    );
                    expected.push((*offset, key.clone()));
                }
                None if !deletes_may_go => {
                    assert!(
                        offsets.contains(offset),
                        "delete of {key:?} at {offset} is gone"
                    );
                }
                None => {}
            }
        }
        expected.sort();
        let got: Vec<(u64, Bytes)> = snap
            .iter()
            .map(|r| (r.offset, r.key.clone().unwrap_or_default()))
            .collect();
        assert_eq!(got, expected, "snapshot of partition {partition}");
    }
    served
}

async fn describe(client: &mut Grpc, topic: &str) -> Vec<v1::PartitionDescription> {
    client
        .describe_topic(v1::DescribeTopicRequest { name: topic.into() })
        .await
        .unwrap()
        .into_inner()
        .topic
        .unwrap()
        .partitions
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_many_versions_when_compacted_should_keep_latest_values_and_drop_expired_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    let mut client = broker.client().await;
    let topic = "accounts";
    create_table(&mut client, topic, 2, 0).await;
    let mut written = Written::new();
    for r in 0..40 {
        write_round(&mut client, topic, 2, &round(60, r, 300), &mut written).await;
    }
    let deletes: Vec<_> = (0..15).map(|k| (format!("key-{k}"), None)).collect();
    write_round(&mut client, topic, 2, &deletes, &mut written).await;
    write_round(
        &mut client,
        topic,
        2,
        &round(60, 99, 10)[30..],
        &mut written,
    )
    .await;
    let before: u64 = describe(&mut client, topic)
        .await
        .iter()
        .map(|p| p.size_bytes)
        .sum();
    let served_before = check(&mut client, topic, 2, &written, false).await;
    assert_eq!(served_before, written.len());

    let output = Command::new(binary("syncline"))
        .args(["--broker", &broker.addr, "topic", "compact", topic])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains(&format!("compacted {topic}: ")), "{stdout}");
    assert!(stdout.contains("DELETES-REMOVED"), "{stdout}");

    let partitions = describe(&mut client, topic).await;
    let after: u64 = partitions.iter().map(|p| p.size_bytes).sum();
    assert!(after * 5 < before, "{before} -> {after} bytes");
    for p in &partitions {
        assert!(p.last_compaction_ms > 0, "{p:?}");
        assert!(p.bytes_reclaimed > 0, "{p:?}");
        assert_eq!(p.dirty_ratio, 0.0, "{p:?}");
    }
    assert!(
        partitions.iter().any(|p| p.compaction_horizon > 0),
        "{partitions:?}"
    );
    let served = check(&mut client, topic, 2, &written, true).await;
    assert!(served < 200, "{served} records remain of {}", written.len());
    let mut horizons = 0;
    for partition in 0..2 {
        horizons += read_partition(&mut client, topic, partition).await.1;
    }
    assert!(horizons > 0, "fetches from below the horizon report it");

    // Writes go on after compaction; the result survives a clean restart and a kill -9.
    write_round(&mut client, topic, 2, &round(20, 100, 10), &mut written).await;
    assert!(broker.stop());
    let broker = BrokerProcess::start(dir.path());
    let mut client = broker.client().await;
    check(&mut client, topic, 2, &written, true).await;
    write_round(&mut client, topic, 2, &round(20, 101, 10), &mut written).await;
    broker.kill9();
    let broker = BrokerProcess::start(dir.path());
    let mut client = broker.client().await;
    check(&mut client, topic, 2, &written, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_kill9_in_the_middle_of_compaction_should_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // ~4 MB/s of cleaner I/O: a pass over this table takes a few seconds.
    let throttled = ["--cleaner-io-bytes-per-sec", "4000000"];
    let mut broker = BrokerProcess::start_with(dir.path(), &throttled);
    let mut client = broker.client().await;
    let topic = "state";
    create_table(&mut client, topic, 1, u64::MAX / 2).await;
    let mut written = Written::new();
    for r in 0..60 {
        for chunk in round(200, r, 900).chunks(40) {
            write_round(&mut client, topic, 1, chunk, &mut written).await;
        }
    }
    for (attempt, wait_ms) in [400u64, 1200, 2500].into_iter().enumerate() {
        let mut compacting = client.clone();
        let pass = tokio::spawn(async move {
            compacting
                .compact_topic(v1::CompactTopicRequest {
                    name: topic.into(),
                    roll: true,
                })
                .await
        });
        tokio::time::sleep(Duration::from_millis(wait_ms)).await;
        broker.kill9();
        let _ = pass.await;
        broker = BrokerProcess::start_with(dir.path(), &throttled);
        client = broker.client().await;
        check(&mut client, topic, 1, &written, false).await;
        // More versions, so the next pass has work again.
        for r in 0..10 {
            for chunk in round(200, 1000 * (attempt + 1) + r, 900).chunks(40) {
                write_round(&mut client, topic, 1, chunk, &mut written).await;
            }
        }
    }
    // Unthrottled, a pass runs to the end; everything still checks out.
    assert!(broker.stop());
    let broker = BrokerProcess::start_with(dir.path(), &["--cleaner-io-bytes-per-sec", "0"]);
    let mut client = broker.client().await;
    let outcome = client
        .compact_topic(v1::CompactTopicRequest {
            name: topic.into(),
            roll: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(outcome.partitions[0].error.is_empty(), "{outcome:?}");
    assert!(outcome.partitions[0].records_removed > 0, "{outcome:?}");
    // Every output segment keeps its first batch's last record (so that it starts where its
    // input did); a second pass merges the now small segments and drops those too.
    let outcome = client
        .compact_topic(v1::CompactTopicRequest {
            name: topic.into(),
            roll: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        outcome.partitions[0].segments_after < outcome.partitions[0].segments_before,
        "{outcome:?}"
    );
    let served = check(&mut client, topic, 1, &written, false).await;
    assert!(served < 300, "{served}");
    let leftovers: Vec<String> = std::fs::read_dir(dir.path().join(topic).join("0"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".log"))
        .collect();
    let segments = describe(&mut client, topic).await[0].segments as usize;
    assert_eq!(
        leftovers.len(),
        segments,
        "no leftover segment files: {leftovers:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_dirty_table_background_cleaner_should_compact_it() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start_with(
        dir.path(),
        &[
            "--cleaner-interval-ms",
            "100",
            "--min-cleanable-dirty-ratio",
            "0.3",
            "--log",
            "info,syncline_broker::partition=debug",
        ],
    );
    let mut client = broker.client().await;
    let topic = "config";
    create_table(&mut client, topic, 1, u64::MAX / 2).await;
    let mut written = Written::new();
    for r in 0..30 {
        write_round(&mut client, topic, 1, &round(30, r, 1000), &mut written).await;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let p = describe(&mut client, topic).await.remove(0);
        if p.last_compaction_ms > 0 && p.bytes_reclaimed > 0 {
            break;
        }
        if std::time::Instant::now() >= deadline {
            let log: Vec<String> = broker
                .drain_log()
                .into_iter()
                .filter(|l| l.contains("compact"))
                .collect();
            panic!("the cleaner never compacted: {p:?}\n{}", log.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    check(&mut client, topic, 1, &written, false).await;
}
