//! Pins the broker side of tables through the real binary: every put acknowledged before a
//! SIGKILL is readable with Get after the restart (the key index is rebuilt from the snapshot
//! plus the log), a clean restart restores the index from its snapshot, Get and History see
//! deletes, CAS conflicts carry the current versions, a duplicate idempotent batch is
//! acknowledged with its original offsets after a restart, and InitProducer appends little to
//! `producer-epochs` while ids stay unique and fences hold across a `kill -9`.

mod common;

use std::collections::HashMap;

use bytes::Bytes;
use common::BrokerProcess;
use syncline_proto::batch::BatchBuilder;
use syncline_proto::partitioner::partition_for_key;
use syncline_proto::v1;
use tokio_stream::StreamExt;
use tonic::Code;

const PARTITIONS: u32 = 4;

async fn create_table(client: &mut v1::broker_client::BrokerClient<tonic::transport::Channel>) {
    client
        .create_topic(v1::CreateTopicRequest {
            name: "table".into(),
            config: Some(v1::TopicConfig {
                partitions: Some(PARTITIONS),
                cleanup_policy: v1::CleanupPolicy::Compact as i32,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
}

fn put(key: &str, value: Option<&str>) -> v1::ProduceRequest {
    v1::ProduceRequest {
        topic: "table".into(),
        partition: partition_for_key(key.as_bytes(), PARTITIONS),
        records: vec![v1::Record {
            key: Some(Bytes::copy_from_slice(key.as_bytes())),
            value: value.map(|v| Bytes::copy_from_slice(v.as_bytes())),
            ..Default::default()
        }],
        ..Default::default()
    }
}

async fn get(
    client: &mut v1::broker_client::BrokerClient<tonic::transport::Channel>,
    key: &str,
) -> Result<(u64, String), Code> {
    client
        .get(v1::GetRequest {
            topic: "table".into(),
            key: Bytes::copy_from_slice(key.as_bytes()),
        })
        .await
        .map(|r| {
            let r = r.into_inner();
            (r.version, String::from_utf8(r.value.to_vec()).unwrap())
        })
        .map_err(|s| s.code())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_puts_acknowledged_before_kill9_should_all_be_readable_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProcess::start(dir.path());
    let mut client = broker.client().await;
    create_table(&mut client).await;
    let mut latest: HashMap<String, (u64, String)> = HashMap::new();
    for round in 0..3 {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let mut responses = client
            .produce_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let mut sent = HashMap::new();
        for i in 0..600u64 {
            let key = format!("key-{}", i % 150);
            let value = format!("r{round}-v{i}");
            let mut request = put(&key, Some(&value));
            request.correlation_id = i;
            sent.insert(i, (key, value));
            tx.send(request).await.unwrap();
        }
        drop(tx);
        let mut acked = Vec::new();
        while let Some(response) = responses.next().await {
            let response = response.unwrap();
            assert!(response.error.is_none());
            acked.push((response.base_offset, response.correlation_id));
        }
        for (offset, id) in acked {
            let (key, value) = sent.remove(&id).unwrap();
            let entry = latest.entry(key).or_insert((0, String::new()));
            if offset >= entry.0 {
                *entry = (offset, value);
            }
        }
        // Round 0 ends with a clean stop (index from its snapshot), round 1 with SIGKILL
        // (snapshot plus the log after it).
        match round {
            0 => assert!(broker.stop()),
            1 => broker.kill9(),
            _ => break,
        }
        broker = BrokerProcess::start(dir.path());
        client = broker.client().await;
        for (key, (version, value)) in &latest {
            assert_eq!(
                get(&mut client, key).await,
                Ok((*version, value.clone())),
                "round {round}: {key}"
            );
        }
    }
    for (key, (version, value)) in &latest {
        assert_eq!(
            get(&mut client, key).await,
            Ok((*version, value.clone())),
            "{key}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_deletes_and_cas_should_answer_get_history_and_conflicts() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    let mut client = broker.client().await;
    create_table(&mut client).await;
    let v1_offset = client
        .produce(put("user", Some("a")))
        .await
        .unwrap()
        .into_inner()
        .base_offset;
    let v2_offset = client
        .produce(put("user", Some("b")))
        .await
        .unwrap()
        .into_inner()
        .base_offset;
    assert_eq!(get(&mut client, "user").await, Ok((v2_offset, "b".into())));

    // CAS against a stale version: FAILED_PRECONDITION with the current version in details.
    let mut stale = put("user", Some("c"));
    stale.conditions = vec![v1::Condition {
        key: Bytes::from_static(b"user"),
        expect: Some(v1::condition::Expect::Version(v1_offset)),
    }];
    let status = client.produce(stale).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status
            .message()
            .contains(&format!("current version is {v2_offset}")),
        "{}",
        status.message()
    );
    // The details are a standard google.rpc.Status with the CasConflict packed as an Any.
    let conflict = syncline_proto::error_details::cas_conflict(status.details())
        .unwrap()
        .expect("a CasConflict detail");
    assert_eq!(conflict.current[0].version, v2_offset);
    assert!(!conflict.current[0].absent);
    let mut fresh = put("user", Some("c"));
    fresh.conditions = vec![v1::Condition {
        key: Bytes::from_static(b"user"),
        expect: Some(v1::condition::Expect::Version(v2_offset)),
    }];
    let v3_offset = client
        .produce(fresh)
        .await
        .unwrap()
        .into_inner()
        .base_offset;

    // Delete: Get says NOT_FOUND, "absent" CAS succeeds, History shows every version.
    client.produce(put("user", None)).await.unwrap();
    assert_eq!(get(&mut client, "user").await, Err(Code::NotFound));
    let mut absent = put("user", Some("d"));
    absent.conditions = vec![v1::Condition {
        key: Bytes::from_static(b"user"),
        expect: Some(v1::condition::Expect::Absent(true)),
    }];
    client.produce(absent).await.unwrap();
    let history = client
        .history(v1::HistoryRequest {
            topic: "table".into(),
            key: Bytes::from_static(b"user"),
            limit: None,
        })
        .await
        .unwrap()
        .into_inner();
    let values: Vec<Option<String>> = history
        .versions
        .iter()
        .map(|v| {
            v.value
                .as_ref()
                .map(|b| String::from_utf8(b.to_vec()).unwrap())
        })
        .collect();
    assert_eq!(
        values,
        vec![
            Some("a".into()),
            Some("b".into()),
            Some("c".into()),
            None,
            Some("d".into())
        ]
    );
    assert_eq!(history.versions[2].version, v3_offset);
    let limited = client
        .history(v1::HistoryRequest {
            topic: "table".into(),
            key: Bytes::from_static(b"user"),
            limit: Some(2),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(limited.versions.len(), 2);
    assert_eq!(limited.versions[1].value.as_deref(), Some(&b"d"[..]));

    // Not a table.
    client
        .create_topic(v1::CreateTopicRequest {
            name: "plain".into(),
            config: Some(v1::TopicConfig {
                partitions: Some(1),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let status = client
        .get(v1::GetRequest {
            topic: "plain".into(),
            key: Bytes::from_static(b"k"),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("--cleanup compact"),
        "{}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_retried_idempotent_batch_after_restart_should_ack_original_offsets_once() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    let mut client = broker.client().await;
    client
        .create_topic(v1::CreateTopicRequest {
            name: "events".into(),
            config: Some(v1::TopicConfig {
                partitions: Some(1),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let producer = client
        .init_producer(v1::InitProducerRequest { producer_id: 0 })
        .await
        .unwrap()
        .into_inner();
    let batch = |sequence: i32, epoch: i16| {
        let mut builder =
            BatchBuilder::new().producer(producer.producer_id as i64, epoch, sequence);
        builder.push(1, None, Some(b"x"), &[]);
        builder.push(1, None, Some(b"y"), &[]);
        builder.finish().unwrap()
    };
    let send = |batch: Bytes| v1::ProduceRequest {
        topic: "events".into(),
        batch,
        ..Default::default()
    };
    let first = client
        .produce(send(batch(0, 0)))
        .await
        .unwrap()
        .into_inner();
    let again = client
        .produce(send(batch(0, 0)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (again.base_offset, again.last_offset),
        (first.base_offset, first.last_offset)
    );
    let gap = client.produce(send(batch(5, 0))).await.unwrap_err();
    assert_eq!(gap.code(), Code::OutOfRange, "{}", gap.message());

    // SIGKILL and restart: the producer state comes back from the log.
    broker.kill9();
    let broker = BrokerProcess::start(dir.path());
    let mut client = broker.client().await;
    let retried = client
        .produce(send(batch(0, 0)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        retried.base_offset, first.base_offset,
        "retry after restart is not appended again"
    );
    let next = client
        .produce(send(batch(2, 0)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next.base_offset, first.last_offset + 1);
    // A re-initialised producer fences the old epoch.
    let bumped = client
        .init_producer(v1::InitProducerRequest {
            producer_id: producer.producer_id,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(bumped.producer_epoch, 1);
    client.produce(send(batch(0, 1))).await.unwrap();
    let fenced = client.produce(send(batch(4, 0))).await.unwrap_err();
    assert_eq!(fenced.code(), Code::FailedPrecondition);
    assert!(fenced.message().contains("fenced"), "{}", fenced.message());
    let end = client
        .list_offsets(v1::ListOffsetsRequest {
            topic: "events".into(),
            spec: v1::OffsetSpec::Latest as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .offset;
    assert_eq!(end, 6, "three distinct batches of two records");

    // A bump with no batch after it still fences after a SIGKILL + restart (it is persisted).
    let bumped = client
        .init_producer(v1::InitProducerRequest {
            producer_id: producer.producer_id,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(bumped.producer_epoch, 2);
    broker.kill9();
    let broker = BrokerProcess::start(dir.path());
    let mut client = broker.client().await;
    let fenced = client.produce(send(batch(2, 1))).await.unwrap_err();
    assert_eq!(
        fenced.code(),
        Code::FailedPrecondition,
        "{}",
        fenced.message()
    );
}

async fn init_producer(
    client: &mut v1::broker_client::BrokerClient<tonic::transport::Channel>,
    producer_id: u64,
) -> (u64, u32) {
    let response = client
        .init_producer(v1::InitProducerRequest { producer_id })
        .await
        .unwrap()
        .into_inner();
    (response.producer_id, response.producer_epoch)
}

/// Issue 13 item 13: `producer-epochs` was rewritten whole on every InitProducer that bumped an
/// epoch and only grew. New ids now cost one appended line per block of ids, a bump one
/// appended line; ids never repeat and fences hold across a `kill -9`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_many_init_producers_should_append_little_and_keep_ids_and_fences() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    let mut client = broker.client().await;
    let file = dir.path().join("producer-epochs");
    let lines = || std::fs::read_to_string(&file).unwrap().lines().count();
    let mut ids = Vec::new();
    for _ in 0..200 {
        let (id, epoch) = init_producer(&mut client, 0).await;
        assert_eq!(epoch, 0);
        ids.push(id);
    }
    assert_eq!(lines(), 1, "one reserved block of ids, one line");
    for expected in 1..=5 {
        assert_eq!(init_producer(&mut client, ids[0]).await, (ids[0], expected));
    }
    assert_eq!(lines(), 6, "each bump appends one line");
    broker.kill9();
    let broker = BrokerProcess::start(dir.path());
    let mut client = broker.client().await;
    let (fresh, _) = init_producer(&mut client, 0).await;
    assert!(ids.iter().all(|id| *id < fresh), "ids never repeat");
    assert_eq!(
        init_producer(&mut client, ids[0]).await,
        (ids[0], 6),
        "the fence survived"
    );
}
