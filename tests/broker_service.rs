//! Pins the broker's gRPC contract through the real `syncline-broker` binary: topic admin,
//! produce (unary and streaming, batches and plain records) and fetch round trips, long-poll
//! wake-up, live subscriptions, restarts, and the status code (and unchanged log) of every bad
//! input.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::BrokerProcess;
use syncline_proto::batch::{BatchBuilder, Batches};
use syncline_proto::partitioner::partition_for_key;
use syncline_proto::v1;
use tokio_stream::StreamExt;
use tonic::Code;

fn topic_request(name: &str, partitions: u32) -> v1::CreateTopicRequest {
    v1::CreateTopicRequest {
        name: name.into(),
        config: Some(v1::TopicConfig {
            partitions: Some(partitions),
            ..Default::default()
        }),
    }
}

fn keyed_batch(partitions: u32, partition: u32, keys: &[String], value: &str) -> Bytes {
    let mut builder = BatchBuilder::new();
    for key in keys {
        assert_eq!(partition_for_key(key.as_bytes(), partitions), partition);
        builder.push(
            1_700_000_000_000,
            Some(key.as_bytes()),
            Some(value.as_bytes()),
            &[],
        );
    }
    builder.finish().expect("batch")
}

fn produce(topic: &str, partition: u32, batch: Bytes) -> v1::ProduceRequest {
    v1::ProduceRequest {
        topic: topic.into(),
        partition,
        batch,
        ..Default::default()
    }
}

/// Every (offset, key, value) of a partition, by fetching until the high watermark.
async fn read_partition(
    client: &mut v1::broker_client::BrokerClient<tonic::transport::Channel>,
    topic: &str,
    partition: u32,
) -> Vec<(u64, String, String)> {
    let mut out = Vec::new();
    let mut offset = 0;
    loop {
        let response = client
            .fetch(v1::FetchRequest {
                topic: topic.into(),
                partition,
                offset,
                max_bytes: Some(64 * 1024),
                ..Default::default()
            })
            .await
            .expect("fetch")
            .into_inner();
        if response.batches.is_empty() {
            return out;
        }
        for batch in Batches::new(response.batches) {
            for record in batch.expect("batch").records() {
                let record = record.expect("record");
                if record.offset < offset {
                    continue;
                }
                out.push((
                    record.offset,
                    String::from_utf8(record.key.unwrap_or_default().to_vec()).unwrap(),
                    String::from_utf8(record.value.unwrap_or_default().to_vec()).unwrap(),
                ));
            }
        }
        offset = response.next_offset;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_keyed_records_over_many_partitions_should_round_trip_in_order_per_key_and_survive_restart(
) {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    let mut client = broker.client().await;
    let partitions = 8;
    client
        .create_topic(topic_request("orders", partitions))
        .await
        .unwrap();

    // 40 keys x 25 versions, sent in per-partition batches, on one ProduceStream.
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let mut responses = client
        .produce_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let keys: Vec<String> = (0..40).map(|k| format!("key-{k}")).collect();
    let mut sent = 0u64;
    for version in 0..25 {
        for partition in 0..partitions {
            let mine: Vec<String> = keys
                .iter()
                .filter(|k| partition_for_key(k.as_bytes(), partitions) == partition)
                .cloned()
                .collect();
            if mine.is_empty() {
                continue;
            }
            let mut request = produce(
                "orders",
                partition,
                keyed_batch(partitions, partition, &mine, &format!("v{version}")),
            );
            request.correlation_id = sent;
            tx.send(request).await.unwrap();
            sent += 1;
        }
    }
    drop(tx);
    let mut acked = std::collections::HashSet::new();
    while let Some(response) = responses.next().await {
        let response = response.unwrap();
        assert!(response.error.is_none(), "{:?}", response.error);
        assert!(acked.insert(response.correlation_id));
    }
    assert_eq!(acked.len() as u64, sent);

    let check = |records: &[(u64, String, String)], partition: u32| {
        let mut last_version = std::collections::HashMap::new();
        for (_, key, value) in records {
            assert_eq!(partition_for_key(key.as_bytes(), partitions), partition);
            let version: u32 = value[1..].parse().unwrap();
            let previous = last_version.insert(key.clone(), version);
            assert!(
                previous.map_or(version == 0, |p| version == p + 1),
                "{key}: {previous:?} then {version}"
            );
        }
        records.len()
    };
    let mut total = 0;
    for partition in 0..partitions {
        total += check(
            &read_partition(&mut client, "orders", partition).await,
            partition,
        );
    }
    assert_eq!(total, 40 * 25);

    assert!(broker.stop(), "clean shutdown on SIGTERM");
    let broker = BrokerProcess::start(dir.path());
    let mut client = broker.client().await;
    let mut after = 0;
    for partition in 0..partitions {
        after += check(
            &read_partition(&mut client, "orders", partition).await,
            partition,
        );
    }
    assert_eq!(after, total, "everything is back after a restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_long_poll_fetch_when_data_arrives_should_wake_before_max_wait() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    let mut client = broker.client().await;
    client
        .create_topic(topic_request("events", 1))
        .await
        .unwrap();
    let mut poller = client.clone();
    let started = Instant::now();
    let poll = tokio::spawn(async move {
        poller
            .fetch(v1::FetchRequest {
                topic: "events".into(),
                offset: 0,
                max_wait_ms: 20_000,
                decode_records: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    client
        .produce(v1::ProduceRequest {
            topic: "events".into(),
            records: vec![v1::Record {
                key: None,
                value: Some(Bytes::from_static(b"hello")),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap();
    let response = poll.await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "woke on data, not at max wait"
    );
    assert_eq!(response.records.len(), 1);
    assert_eq!(response.records[0].value.as_deref(), Some(&b"hello"[..]));
    assert_eq!(response.next_offset, 1);

    // With nothing to read, the long poll returns empty after max_wait.
    let started = Instant::now();
    let empty = client
        .fetch(v1::FetchRequest {
            topic: "events".into(),
            offset: 1,
            max_wait_ms: 300,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(empty.batches.is_empty());
    assert!(started.elapsed() >= Duration::from_millis(250));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_subscription_should_stream_live_appends() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    let mut client = broker.client().await;
    client.create_topic(topic_request("live", 1)).await.unwrap();
    let mut stream = client
        .subscribe(v1::SubscribeRequest {
            topic: "live".into(),
            partition: 0,
            offset: 0,
            decode_records: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    for i in 0..20u32 {
        client
            .produce(v1::ProduceRequest {
                topic: "live".into(),
                acks: v1::Acks::Leader as i32,
                records: vec![v1::Record {
                    value: Some(Bytes::from(format!("m{i}"))),
                    ..Default::default()
                }],
                ..Default::default()
            })
            .await
            .unwrap();
        while seen.len() <= i as usize {
            let response = tokio::time::timeout(Duration::from_secs(10), stream.next())
                .await
                .expect("subscription delivers within 10 s")
                .unwrap()
                .unwrap();
            for record in response.records {
                seen.push(String::from_utf8(record.value.unwrap().to_vec()).unwrap());
            }
        }
    }
    let expected: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
    assert_eq!(seen, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_bad_inputs_should_get_their_status_codes_and_leave_the_log_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    let mut client = broker.client().await;
    client.create_topic(topic_request("t", 4)).await.unwrap();
    let code =
        |r: Result<tonic::Response<v1::ProduceResponse>, tonic::Status>| r.unwrap_err().code();

    // Topic admin.
    let duplicate = client
        .create_topic(topic_request("t", 4))
        .await
        .unwrap_err();
    assert_eq!(duplicate.code(), Code::AlreadyExists);
    assert!(
        duplicate.message().contains("already exists"),
        "{}",
        duplicate.message()
    );
    for bad in ["", "..", "a/b", "../../etc", "a b", &"x".repeat(250)] {
        let status = client
            .create_topic(topic_request(bad, 1))
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{bad:?}: {}",
            status.message()
        );
    }
    let too_many = client
        .create_topic(topic_request("many", 100_000))
        .await
        .unwrap_err();
    assert_eq!(too_many.code(), Code::InvalidArgument);
    let missing = client
        .describe_topic(v1::DescribeTopicRequest {
            name: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    assert_eq!(missing.message(), "topic `nope` does not exist");

    // Produce.
    let key = "k".to_string();
    let right = partition_for_key(key.as_bytes(), 4);
    let wrong = (right + 1) % 4;
    let good = keyed_batch(4, right, std::slice::from_ref(&key), "v");
    let mut builder = BatchBuilder::new();
    builder.push(1, Some(key.as_bytes()), Some(b"v"), &[]);
    let misrouted = builder.finish().unwrap();
    assert_eq!(
        code(client.produce(produce("t", wrong, misrouted)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(client.produce(produce("nope", 0, good.clone())).await),
        Code::NotFound
    );
    assert_eq!(
        code(client.produce(produce("t", 9, good.clone())).await),
        Code::InvalidArgument
    );
    let mut corrupt = good.to_vec();
    *corrupt.last_mut().unwrap() ^= 1;
    assert_eq!(
        code(
            client
                .produce(produce("t", right, Bytes::from(corrupt)))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            client
                .produce(produce("t", right, Bytes::from_static(b"short")))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(client.produce(produce("t", right, Bytes::new())).await),
        Code::InvalidArgument
    );
    let mut both = produce("t", right, good.clone());
    both.records = vec![v1::Record::default()];
    assert_eq!(code(client.produce(both).await), Code::InvalidArgument);
    let mut huge = BatchBuilder::new();
    huge.push(1, None, Some(&vec![0u8; 9 * 1024 * 1024]), &[]);
    assert_eq!(
        code(
            client
                .produce(produce("t", right, huge.finish().unwrap()))
                .await
        ),
        Code::ResourceExhausted
    );
    let mut bad_acks = produce("t", right, good.clone());
    bad_acks.acks = 99;
    assert_eq!(code(client.produce(bad_acks).await), Code::InvalidArgument);

    // Nothing was appended by any of that.
    let described = client
        .describe_topic(v1::DescribeTopicRequest { name: "t".into() })
        .await
        .unwrap()
        .into_inner()
        .topic
        .unwrap();
    assert!(described
        .partitions
        .iter()
        .all(|p| p.log_end_offset == 0 && p.size_bytes == 0));

    // Fetch and offsets.
    client.produce(produce("t", right, good)).await.unwrap();
    let out_of_range = client
        .fetch(v1::FetchRequest {
            topic: "t".into(),
            partition: right,
            offset: 5,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(out_of_range.code(), Code::OutOfRange);
    assert!(
        out_of_range.message().contains("out of range"),
        "{}",
        out_of_range.message()
    );
    let subscribe_out_of_range = client
        .subscribe(v1::SubscribeRequest {
            topic: "t".into(),
            partition: right,
            offset: 5,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(subscribe_out_of_range.code(), Code::OutOfRange);
    let latest = client
        .list_offsets(v1::ListOffsetsRequest {
            topic: "t".into(),
            partition: right,
            spec: v1::OffsetSpec::Latest as i32,
            timestamp_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(latest.offset, 1);
    let by_time = client
        .list_offsets(v1::ListOffsetsRequest {
            topic: "t".into(),
            partition: right,
            spec: v1::OffsetSpec::Timestamp as i32,
            timestamp_ms: 1_700_000_000_000,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((by_time.offset, by_time.found), (0, true));

    // Delete, then it is gone.
    client
        .delete_topic(v1::DeleteTopicRequest { name: "t".into() })
        .await
        .unwrap();
    let gone = client
        .delete_topic(v1::DeleteTopicRequest { name: "t".into() })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    assert!(!dir.path().join("t").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_open_streams_when_sigterm_should_end_them_and_exit_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProcess::start(dir.path());
    let mut client = broker.client().await;
    client.create_topic(topic_request("s", 1)).await.unwrap();
    // A produce stream whose request side stays open, and a live subscription.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut responses = client
        .produce_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut builder = BatchBuilder::new();
    builder.push(1, None, Some(b"x"), &[]);
    tx.send(produce("s", 0, builder.finish().unwrap()))
        .await
        .unwrap();
    assert!(responses.next().await.unwrap().unwrap().error.is_none());
    let mut subscription = client
        .subscribe(v1::SubscribeRequest {
            topic: "s".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(subscription.next().await.unwrap().is_ok());

    // SAFETY: kill(2) on our own child.
    unsafe {
        libc::kill(broker.child.id() as i32, libc::SIGTERM);
    }
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = broker.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "broker hangs on open streams"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success());
    assert!(dir.path().join("s/0/.clean-shutdown").exists());
    drop(tx);
}
