//! Pins the client crate against the real broker binary: the batching `Producer` sends keyed
//! records over many partitions (keys land where the partitioner says, versions in order per
//! key, every delivery reports the stored offset), the `Consumer` reads every record back from
//! the earliest offset, and a consumer behind the log start gets the configured reset policy.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::BrokerProcess;
use syncline_client::{
    partition_for_key, Client, ConsumerConfig, OffsetReset, ProducerConfig, StartOffset,
    TopicConfig,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_producer_and_consumer_should_round_trip_keyed_records_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    let client = Client::connect(&broker.addr).await.unwrap();
    client
        .create_topic("users", TopicConfig::with_partitions(6))
        .await
        .unwrap();
    let producer = client
        .producer("users", ProducerConfig::default())
        .await
        .unwrap();

    let mut pending = Vec::new();
    for version in 0..50u32 {
        for user in 0..20u32 {
            let key = format!("user-{user}");
            let value = format!("{version}");
            pending.push((
                key.clone(),
                producer
                    .enqueue(Some(key.as_bytes()), Some(value.as_bytes()), &[])
                    .await
                    .unwrap(),
            ));
        }
    }
    let mut delivered: HashMap<(u32, u64), String> = HashMap::new();
    for (key, delivery) in pending {
        let delivery = delivery.await.unwrap();
        assert_eq!(delivery.partition, partition_for_key(key.as_bytes(), 6));
        assert!(delivered
            .insert((delivery.partition, delivery.offset), key)
            .is_none());
    }
    producer.close().await;

    let config = ConsumerConfig {
        start: StartOffset::Earliest,
        ..ConsumerConfig::default()
    };
    let mut consumer = client.consumer("users", config).await.unwrap();
    let mut last: HashMap<String, u32> = HashMap::new();
    let mut count = 0;
    while count < 1000 {
        let record = tokio::time::timeout(Duration::from_secs(10), consumer.recv())
            .await
            .expect("records keep coming")
            .expect("stream open")
            .unwrap();
        let key = String::from_utf8(record.key.clone().unwrap().to_vec()).unwrap();
        assert_eq!(
            delivered.get(&(record.partition, record.offset)),
            Some(&key)
        );
        let version: u32 = std::str::from_utf8(&record.value.clone().unwrap())
            .unwrap()
            .parse()
            .unwrap();
        let previous = last.insert(key.clone(), version);
        assert_eq!(previous.map_or(0, |p| p + 1), version, "{key} out of order");
        count += 1;
    }
    assert!(last.values().all(|v| *v == 49));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_offset_past_the_log_should_apply_the_reset_policy() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    let client = Client::connect(&broker.addr).await.unwrap();
    client
        .create_topic("small", TopicConfig::with_partitions(1))
        .await
        .unwrap();
    let producer = client
        .producer("small", ProducerConfig::default())
        .await
        .unwrap();
    for i in 0..3u32 {
        producer
            .send(None, Some(i.to_string().as_bytes()), &[])
            .await
            .unwrap();
    }
    let strict = ConsumerConfig {
        start: StartOffset::Offset(100),
        offset_reset: OffsetReset::Error,
        ..ConsumerConfig::default()
    };
    let mut consumer = client.consumer("small", strict).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), consumer.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(
        first.is_err(),
        "an out-of-range start is an error under OffsetReset::Error"
    );

    let lenient = ConsumerConfig {
        start: StartOffset::Offset(100),
        offset_reset: OffsetReset::Earliest,
        ..ConsumerConfig::default()
    };
    let mut consumer = client.consumer("small", lenient).await.unwrap();
    let record = tokio::time::timeout(Duration::from_secs(10), consumer.recv())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(record.offset, 0, "reset to earliest");
}

/// `enqueue_with_timestamp` stores the given timestamp (the bench passes its own send time this
/// way), next to records timestamped by the producer's clock; offsets are base + index within
/// each batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_timestamps_from_the_caller_should_be_stored_as_given() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    let client = Client::connect(&broker.addr).await.unwrap();
    client
        .create_topic("events", TopicConfig::with_partitions(1))
        .await
        .unwrap();
    let producer = client
        .producer("events", ProducerConfig::default())
        .await
        .unwrap();
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let mut pending = Vec::new();
    for i in 0..10i64 {
        let delivery = if i % 2 == 0 {
            producer
                .enqueue_with_timestamp(None, Some(b"given"), &[], 1_000_000 + i)
                .await
        } else {
            producer.enqueue(None, Some(b"clock"), &[]).await
        };
        pending.push(delivery.unwrap());
    }
    let mut offsets = Vec::new();
    for (i, delivery) in pending.into_iter().enumerate() {
        let delivery = delivery.await.unwrap();
        offsets.push(delivery.offset);
        if i % 2 == 0 {
            assert_eq!(delivery.timestamp, 1_000_000 + i as i64);
        } else {
            assert!(delivery.timestamp >= before, "{delivery:?}");
        }
    }
    assert_eq!(offsets, (0..10).collect::<Vec<u64>>());
    producer.close().await;
    let config = ConsumerConfig {
        start: StartOffset::Earliest,
        ..ConsumerConfig::default()
    };
    let mut consumer = client.consumer("events", config).await.unwrap();
    for i in 0..10i64 {
        let record = tokio::time::timeout(Duration::from_secs(10), consumer.recv())
            .await
            .expect("records keep coming")
            .expect("stream open")
            .unwrap();
        assert_eq!(record.offset, i as u64);
        if i % 2 == 0 {
            assert_eq!(record.timestamp, 1_000_000 + i);
            assert_eq!(record.value.as_deref(), Some(&b"given"[..]));
        } else {
            assert!(record.timestamp >= before);
        }
    }
}
