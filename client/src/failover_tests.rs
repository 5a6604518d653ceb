//! Leader changes, against the in-process mock cluster of `routing_tests` (one log per
//! partition that every node serves, as replication would): pins that the producer resends a
//! batch with its same producer id, epoch and sequence to the new leader, waits while no
//! leader is known, keeps each partition's order and acknowledges every record once; that a
//! consumer, a group member and a `SyncTable` resume from their next offset on the new leader
//! (waiting for a new leader that has not applied everything yet) with no gap and no
//! duplicate; and that a compare-and-set write whose answer was lost is resent under the same
//! sequence, so the broker's dedupe, not a second condition check, answers it.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use bytes::Bytes;
use syncline_proto::batch::BatchBuilder;

use crate::routing_tests::{key_for, MockCluster, Shared, TABLE};
use crate::tests::fast_retries;
use crate::{
    Client, ConsumerConfig, GroupConsumerConfig, OffsetReset, ProducerConfig, StartOffset,
    SyncTableConfig,
};

/// Bounds every wait, so a regression fails instead of hanging.
const WAIT: Duration = Duration::from_secs(20);

/// How long the tests' elections last: long enough for several retries with backoff.
const ELECTION: Duration = Duration::from_millis(150);

async fn bounded<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, future)
        .await
        .expect("no progress within the bound")
}

/// Three mock nodes, every partition led by node 1, and a client bootstrapped there.
async fn start() -> (MockCluster, Client) {
    let cluster = MockCluster::start(3).await;
    let client = Client::connect(cluster.address(1)).await.unwrap();
    (cluster, client)
}

/// A member of group `g` reading `events`, with quick retries and short long-polls.
async fn join_quickly(client: &Client) -> crate::GroupConsumer {
    let config = GroupConsumerConfig {
        retry_backoff: Duration::from_millis(5),
        retry_backoff_max: Duration::from_millis(20),
        fetch_max_wait: Duration::from_millis(20),
        ..GroupConsumerConfig::default()
    };
    client
        .group_consumer("g", &["events"], config)
        .await
        .unwrap()
}

/// After `delay`, node `node` leads `topic`/`partition` (what DescribeCluster reports too).
fn elect_later(shared: &Shared, topic: &str, partition: u32, node: u64, delay: Duration) {
    let shared = shared.clone();
    let topic = topic.to_owned();
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        shared.lead(&topic, partition, node);
        shared.publish();
    });
}

/// Appends `values` to a log, one single-record batch each, keyed `key`.
fn append_values(shared: &Shared, topic: &str, partition: u32, key: &str, values: &[&str]) {
    let mut cluster = shared.lock();
    for value in values {
        let mut builder = BatchBuilder::new();
        builder.push(0, Some(key.as_bytes()), Some(value.as_bytes()), &[]);
        cluster
            .append(topic, partition, builder.finish().unwrap())
            .unwrap();
    }
}

/// Every record value of a log, in offset order.
fn log_values(shared: &Shared, topic: &str, partition: u32) -> Vec<String> {
    let cluster = shared.lock();
    let mut values = Vec::new();
    for stored in cluster
        .logs
        .get(&(topic.to_owned(), partition))
        .into_iter()
        .flatten()
    {
        let batch = syncline_proto::batch::Batch::parse(stored.batch.clone()).unwrap();
        for record in batch.records() {
            let value = record.unwrap().value.unwrap();
            values.push(String::from_utf8(value.to_vec()).unwrap());
        }
    }
    values
}

#[tokio::test]
async fn given_leader_lost_after_an_append_producer_should_resend_the_same_sequence_to_the_new_leader_and_ack_each_record_once(
) {
    let (cluster, client) = start().await;
    let shared = &cluster.shared;
    let producer = client.producer("events", fast_retries()).await.unwrap();
    let key = key_for(0);
    let send_all = |values: Vec<String>| {
        let producer = producer.clone();
        let key = key.clone();
        async move {
            let mut pending = Vec::new();
            for value in &values {
                pending.push(
                    producer
                        .enqueue(Some(key.as_bytes()), Some(value.as_bytes()), &[])
                        .await
                        .unwrap(),
                );
                // Several batches in flight at once.
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let mut offsets = Vec::new();
            for delivery in pending {
                offsets.push(delivery.await.unwrap().offset);
            }
            offsets
        }
    };
    let before: Vec<String> = (0..5).map(|i| format!("a{i}")).collect();
    assert_eq!(bounded(send_all(before)).await, [0, 1, 2, 3, 4]);

    // The next append is stored, then node 1 loses the partition and its answer is lost; no
    // leader is known for a while (NotLeader without a leader, at node 1 and in
    // DescribeCluster), then node 2 leads.
    shared.lock().crash_after_append = true;
    elect_later(shared, "events", 0, 2, ELECTION);
    let after: Vec<String> = (0..20).map(|i| format!("b{i}")).collect();
    let offsets = bounded(send_all(after)).await;

    assert_eq!(
        offsets,
        (5..25).collect::<Vec<u64>>(),
        "acknowledged once each, in send order"
    );
    let mut expected: Vec<String> = (0..5).map(|i| format!("a{i}")).collect();
    expected.extend((0..20).map(|i| format!("b{i}")));
    assert_eq!(
        log_values(shared, "events", 0),
        expected,
        "stored once each, in order"
    );
    let cluster_state = shared.lock();
    // Every attempt of a batch carried the same producer id, epoch and sequence.
    let mut fields_of: BTreeMap<Vec<u8>, HashSet<(i64, i16, i32)>> = BTreeMap::new();
    for (_, _, id, epoch, sequence, batch) in &cluster_state.produced {
        // The batch minus its stamped prefix (base offset), which retries leave alone anyway.
        fields_of
            .entry(batch.to_vec())
            .or_default()
            .insert((*id, *epoch, *sequence));
    }
    assert!(fields_of.values().all(|fields| fields.len() == 1));
    let lost = cluster_state
        .produced
        .iter()
        .filter(|(node, ..)| *node == 1)
        .last()
        .unwrap()
        .clone();
    assert!(
        cluster_state
            .produced
            .iter()
            .any(|(node, _, id, epoch, sequence, batch)| *node == 2
                && (*id, *epoch, *sequence, batch) == (lost.2, lost.3, lost.4, &lost.5)),
        "the batch whose answer was lost went to the new leader with its sequence"
    );
    assert!(
        shared_calls(&cluster_state, 1, "Produce") > 1,
        "node 1 refused retries while no leader was known"
    );
}

fn shared_calls(cluster: &crate::routing_tests::Cluster, node: u64, rpc: &str) -> usize {
    cluster
        .calls
        .iter()
        .filter(|(n, r)| *n == node && *r == rpc)
        .count()
}

#[tokio::test]
async fn given_a_not_leader_naming_the_new_leader_on_the_stream_producer_should_follow_it_without_waiting_for_a_refresh(
) {
    let (cluster, client) = start().await;
    let shared = &cluster.shared;
    let config = ProducerConfig {
        // A pause this long would fail the bound below: the redirect must not wait.
        retry_backoff: Duration::from_secs(10),
        retry_backoff_max: Duration::from_secs(10),
        ..fast_retries()
    };
    let producer = client.producer("events", config).await.unwrap();
    let key = key_for(0);
    producer
        .send(Some(key.as_bytes()), Some(b"a".as_slice()), &[])
        .await
        .unwrap();
    // Node 3 leads now; DescribeCluster still says node 1, which names node 3.
    shared.lead("events", 0, 3);
    let delivery = tokio::time::timeout(
        Duration::from_secs(5),
        producer.send(Some(key.as_bytes()), Some(b"b".as_slice()), &[]),
    )
    .await
    .expect("redirected at once")
    .unwrap();
    assert_eq!(delivery.offset, 1);
    assert_eq!(shared.calls(3, "Produce"), 1);
    assert_eq!(log_values(shared, "events", 0), ["a", "b"]);
}

#[tokio::test]
async fn given_a_leader_change_consumer_should_resume_from_its_next_offset_and_wait_for_a_new_leader_that_is_behind(
) {
    let cluster = MockCluster::start(3).await;
    let shared = &cluster.shared;
    append_values(
        shared,
        "events",
        0,
        "k",
        &["v0", "v1", "v2", "v3", "v4", "v5"],
    );
    let client = Client::connect(cluster.address(1)).await.unwrap();
    let config = ConsumerConfig {
        partitions: Some(vec![0]),
        start: StartOffset::Earliest,
        // Resetting would read again from the start (Earliest) or fail (Error): neither may
        // happen on a leader change.
        offset_reset: OffsetReset::Earliest,
        retry_backoff: Duration::from_millis(5),
        fetch_max_wait: Duration::from_millis(20),
        ..ConsumerConfig::default()
    };
    let mut consumer = client.consumer("events", config).await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..3 {
        let record = bounded(consumer.recv()).await.unwrap().unwrap();
        seen.push((record.offset, record.value.unwrap()));
    }
    // An election, then node 2 leads but has applied only the first two records for a while.
    shared.lock().applied_max.insert(2, 2);
    shared.lead("events", 0, 0);
    elect_later(shared, "events", 0, 2, ELECTION);
    {
        let shared = shared.clone();
        tokio::spawn(async move {
            tokio::time::sleep(ELECTION * 3).await;
            shared.lock().applied_max.remove(&2);
        });
    }
    for _ in 3..6 {
        let record = bounded(consumer.recv()).await.unwrap().unwrap();
        seen.push((record.offset, record.value.unwrap()));
    }
    let expected: Vec<(u64, Bytes)> = (0..6).map(|i| (i, Bytes::from(format!("v{i}")))).collect();
    assert_eq!(seen, expected, "no gap, no repeat");
    assert!(shared.calls(2, "Fetch") > 0);
}

#[tokio::test]
async fn given_a_leader_change_group_member_should_keep_its_partitions_and_read_on_from_the_new_leader(
) {
    let cluster = MockCluster::start(3).await;
    let shared = &cluster.shared;
    append_values(shared, "events", 0, "k", &["v0", "v1", "v2"]);
    append_values(shared, "events", 1, "j", &["w0"]);
    let client = Client::connect(cluster.address(1)).await.unwrap();
    let mut member = join_quickly(&client).await;
    let mut events = member.events();
    let mut seen = Vec::new();
    for _ in 0..4 {
        let record = bounded(member.recv()).await.unwrap().unwrap();
        seen.push((record.partition, record.offset));
    }
    // Partition 0 and the group's coordinator move (an election first).
    shared.lead("events", 0, 0);
    elect_later(shared, "events", 0, 3, ELECTION);
    shared.lock().coordinator = 2;
    append_values(shared, "events", 0, "k", &["v3", "v4"]);
    for _ in 0..2 {
        let record = bounded(member.recv()).await.unwrap().unwrap();
        seen.push((record.partition, record.offset));
    }
    seen.sort_unstable();
    assert_eq!(seen, [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (1, 0)]);
    assert!(shared.calls(3, "Fetch") > 0);
    member.close().await.unwrap();
    assert!(
        shared.calls(2, "LeaveGroup") == 1,
        "left at the new coordinator"
    );
    let mut lost = false;
    while let Ok(Some(event)) = tokio::time::timeout(Duration::from_millis(50), events.recv()).await
    {
        lost |= matches!(event, Ok(crate::GroupEvent::Lost(_)));
    }
    assert!(!lost, "a leader change is not a lost session");
}

#[tokio::test]
async fn given_a_leader_change_sync_table_should_resume_from_its_next_offset_without_repeating_a_change(
) {
    let cluster = MockCluster::start(3).await;
    let shared = &cluster.shared;
    let partition = 0;
    let key = key_for(partition);
    shared.lock().logs.entry((TABLE.to_owned(), 1)).or_default();
    append_values(shared, TABLE, partition, &key, &["1", "2"]);
    let client = Client::connect(cluster.address(1)).await.unwrap();
    let config = SyncTableConfig {
        retry_backoff: Duration::from_millis(5),
        retry_backoff_max: Duration::from_millis(20),
        ..SyncTableConfig::default()
    };
    let table = client.sync_table_with(TABLE, config).await.unwrap();
    bounded(table.wait_caught_up()).await.unwrap();
    let (_, mut changes) = table.entries_and_changes();
    append_values(shared, TABLE, partition, &key, &["3"]);
    bounded(table.wait_for(partition, 2)).await.unwrap();

    // The leader is lost; node 3 takes over having applied only the first record, then
    // catches up; meanwhile two more writes commit.
    shared.lock().applied_max.insert(3, 1);
    shared.lead(TABLE, partition, 0);
    elect_later(shared, TABLE, partition, 3, ELECTION);
    append_values(shared, TABLE, partition, &key, &["4", "5"]);
    {
        let shared = shared.clone();
        tokio::spawn(async move {
            tokio::time::sleep(ELECTION * 3).await;
            shared.lock().applied_max.remove(&3);
        });
    }
    bounded(table.wait_for(partition, 4)).await.unwrap();
    let mut versions = Vec::new();
    while let Ok(change) = tokio::time::timeout(Duration::from_millis(100), changes.recv()).await {
        let change = change.unwrap();
        versions.push((change.version, change.value, change.from_snapshot));
    }
    assert_eq!(
        versions,
        [
            (2, Some(Bytes::from("3")), false),
            (3, Some(Bytes::from("4")), false),
            (4, Some(Bytes::from("5")), false),
        ],
        "each change once, in order, none undone by an older snapshot"
    );
    assert_eq!(table.get(&key).unwrap().version, 4);
    assert!(shared.calls(3, "Subscribe") + shared.calls(3, "Fetch") > 0);
}

#[tokio::test]
async fn given_cas_answer_lost_with_the_leader_the_retry_should_carry_the_same_sequence_and_get_the_original_version(
) {
    let (cluster, client) = start().await;
    let shared = &cluster.shared;
    let table = client.table_with(TABLE, fast_retries()).await.unwrap();
    let key = key_for(0);
    let first = table.put_if_absent(&key, "1").await.unwrap();
    assert_eq!(first.version, 0);

    // The write is stored, then the leader dies before answering; node 2 takes over.
    shared.lock().crash_after_append = true;
    elect_later(shared, TABLE, 0, 2, ELECTION);
    let second = bounded(table.put_if(&key, "2", first.version))
        .await
        .expect("the broker recognises the retry instead of failing its condition");
    assert_eq!(second.version, 1, "the original version");
    assert_eq!(log_values(shared, TABLE, 0), ["1", "2"], "stored once");
    let attempts: Vec<_> = shared
        .lock()
        .produced
        .iter()
        .filter(|(.., batch)| log_batch_value(batch) == "2")
        .map(|(node, _, id, epoch, sequence, _)| (*node, *id, *epoch, *sequence))
        .collect();
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    let (first_node, second_node) = (attempts[0].0, attempts[1].0);
    assert_eq!((first_node, second_node), (1, 2));
    let fields = |attempt: (u64, i64, i16, i32)| (attempt.1, attempt.2, attempt.3);
    assert_eq!(
        fields(attempts[0]),
        fields(attempts[1]),
        "same producer id, epoch and sequence"
    );
    // A Get follows the leader too (the mock answers with its node id as the version).
    assert_eq!(bounded(table.get(&key)).await.unwrap().unwrap().version, 2);
}

/// The value of a one-record batch.
fn log_batch_value(batch: &Bytes) -> String {
    let batch = syncline_proto::batch::Batch::parse(batch.clone()).unwrap();
    let record = batch.records().next().unwrap().unwrap();
    String::from_utf8(record.value.unwrap().to_vec()).unwrap()
}

#[tokio::test]
async fn given_no_leader_for_a_while_table_get_should_wait_for_the_new_one() {
    let (cluster, client) = start().await;
    let shared = &cluster.shared;
    let table = client.table_with(TABLE, fast_retries()).await.unwrap();
    let key = key_for(0);
    shared.lead(TABLE, 0, 0);
    elect_later(shared, TABLE, 0, 3, ELECTION);
    let entry = bounded(table.get(&key)).await.unwrap().unwrap();
    // The mock answers with its node id as the version.
    assert_eq!(entry.version, 3, "answered by the new leader");
    assert!(
        shared.calls(1, "Get") > 1,
        "refused while no leader was known"
    );
}

#[tokio::test]
async fn given_a_committed_offset_past_a_new_leaders_applied_end_group_member_should_wait_for_it_not_reset(
) {
    let (cluster, client) = start().await;
    let shared = &cluster.shared;
    append_values(shared, "events", 0, "k", &["v0", "v1", "v2", "v3", "v4"]);
    shared
        .lock()
        .logs
        .entry(("events".to_owned(), 1))
        .or_default();
    {
        let mut state = shared.lock();
        state.committed.push(("events".to_owned(), 0, 3));
        // Node 1 has just become leader and has applied only two records.
        state.applied_max.insert(1, 2);
    }
    {
        let shared = shared.clone();
        tokio::spawn(async move {
            tokio::time::sleep(ELECTION).await;
            shared.lock().applied_max.remove(&1);
        });
    }
    // Its reset policy is Earliest (the default): resetting would read again from offset 0.
    let mut member = join_quickly(&client).await;
    let mut offsets = Vec::new();
    for _ in 0..2 {
        let record = bounded(member.recv()).await.unwrap().unwrap();
        offsets.push((record.partition, record.offset));
    }
    assert_eq!(offsets, [(0, 3), (0, 4)], "from the commit, nothing again");
    member.abort();
}
