//! Data directories written by earlier versions open in place with every topic, record, table
//! value and committed offset. The fixtures under `tests/fixtures/` were written by the real
//! binaries of those versions and are never regenerated:
//!
//! - `datadir-before-topic-ids/`: the single-node broker before the hardening issue (commit
//!   fa7ea37): topics without incarnation ids, commits without them, per-partition lock files.
//! - `datadir-single-node/`: the hardened single-node broker (issue 13), the version the cluster
//!   work starts from: topic ids, the `producer-epochs` id blocks.
//!
//! Both hold the same history, made through the CLI (`syncline topic create orders --partitions
//! 3`; 30 keyed records `kN:vI` with N = I % 10; `topic create inventory --cleanup compact`;
//! `put inventory sku-1..5 count-N`, `put sku-1 count-1-updated`, `delete sku-2`; `consume
//! orders --group billing` to the end; SIGTERM), so one check serves both.

mod common;

use std::collections::BTreeMap;

use common::{copy_dir, fixture, BrokerProcess};
use syncline_proto::v1;

type Client = v1::broker_client::BrokerClient<tonic::transport::Channel>;

/// Every (key, value) of a partition in offset order.
async fn read_partition(client: &mut Client, topic: &str, partition: u32) -> Vec<(String, String)> {
    let text = |bytes: Option<bytes::Bytes>| {
        String::from_utf8_lossy(bytes.as_deref().unwrap_or_default()).into_owned()
    };
    common::read_records(client, topic, partition)
        .await
        .into_iter()
        .map(|r| (text(r.key), text(r.value)))
        .collect()
}

async fn table_value(client: &mut Client, key: &str) -> Option<String> {
    match client
        .get(v1::GetRequest {
            topic: "inventory".into(),
            key: key.as_bytes().to_vec().into(),
        })
        .await
    {
        Ok(response) => Some(String::from_utf8_lossy(&response.into_inner().value).into_owned()),
        Err(status) if status.code() == tonic::Code::NotFound => None,
        Err(status) => panic!("get {key}: {status:?}"),
    }
}

/// Checks the fixture's history through a broker of this version; returns the topic ids.
async fn check_history(broker: &BrokerProcess) -> BTreeMap<String, String> {
    let mut client = broker.client().await;
    let topics = client
        .list_topics(v1::ListTopicsRequest {})
        .await
        .unwrap()
        .into_inner()
        .topics;
    let mut ids = BTreeMap::new();
    let mut partitions = BTreeMap::new();
    for topic in &topics {
        assert!(!topic.topic_id.is_empty(), "{} has an id", topic.name);
        ids.insert(topic.name.clone(), topic.topic_id.clone());
        partitions.insert(topic.name.clone(), topic.partitions);
    }
    assert_eq!(
        partitions,
        BTreeMap::from([("inventory".into(), 1), ("orders".into(), 3)])
    );

    // Every record, each key in one partition and in produce order.
    let mut per_key: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut ends = BTreeMap::new();
    for partition in 0..3 {
        let records = read_partition(&mut client, "orders", partition).await;
        ends.insert(partition, records.len() as u64);
        for (key, value) in records {
            per_key.entry(key).or_default().push(value);
        }
    }
    assert_eq!(per_key.len(), 10);
    for (n, key) in (0..10).map(|n| (n, format!("k{n}"))) {
        let expected: Vec<String> = (0..3).map(|round| format!("v{}", n + 10 * round)).collect();
        assert_eq!(per_key[&key], expected, "{key}");
    }

    // The table's latest values, the delete included.
    assert_eq!(
        table_value(&mut client, "sku-1").await.as_deref(),
        Some("count-1-updated")
    );
    assert_eq!(table_value(&mut client, "sku-2").await, None);
    for n in 3..=5 {
        assert_eq!(
            table_value(&mut client, &format!("sku-{n}")).await,
            Some(format!("count-{n}"))
        );
    }

    // The group's committed offsets: the end of every partition.
    let committed = client
        .fetch_offsets(v1::FetchOffsetsRequest {
            group: "billing".into(),
            partitions: Vec::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .offsets;
    let committed: BTreeMap<u32, u64> = committed
        .iter()
        .filter(|c| c.topic == "orders")
        .map(|c| (c.partition, c.offset))
        .collect();
    assert_eq!(committed, ends, "committed offsets survive the upgrade");
    ids
}

async fn given_fixture_should_open_in_place_and_keep_its_ids(name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    copy_dir(&fixture(name), &data_dir);
    assert!(
        !data_dir.join("node.toml").exists(),
        "single-node versions had no identity"
    );
    let broker = BrokerProcess::start(&data_dir);
    let ids = check_history(&broker).await;
    // The first start of this version records the directory as node 1 of a cluster of one.
    let identity = std::fs::read_to_string(data_dir.join("node.toml")).unwrap();
    assert!(identity.contains("node_id = 1"), "{identity}");
    // The upgraded data dir takes writes and commits as any other.
    let mut client = broker.client().await;
    client
        .produce(v1::ProduceRequest {
            topic: "orders".into(),
            partition: 0,
            records: vec![v1::Record {
                value: Some(b"after the upgrade".to_vec().into()),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .expect("produce after the upgrade");
    assert!(broker.stop(), "clean shutdown");
    // A second start (now in this version's format) sees the same topics under the same ids.
    let broker = BrokerProcess::start(&data_dir);
    let mut client = broker.client().await;
    let again: BTreeMap<String, String> = client
        .list_topics(v1::ListTopicsRequest {})
        .await
        .unwrap()
        .into_inner()
        .topics
        .into_iter()
        .map(|t| (t.name, t.topic_id))
        .collect();
    assert_eq!(again, ids, "topic ids are stable across restarts");
    assert!(broker.stop());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_data_dir_from_before_topic_ids_should_open_in_place_with_every_record_and_offset() {
    given_fixture_should_open_in_place_and_keep_its_ids("datadir-before-topic-ids").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_single_node_data_dir_should_open_in_place_with_every_record_and_offset() {
    given_fixture_should_open_in_place_and_keep_its_ids("datadir-single-node").await;
}
