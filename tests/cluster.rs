//! A cluster of three real broker processes on loopback (issue 14): one controller, topics
//! spread evenly, routing through any node, groups across nodes, controller failover, a node
//! down during a delete, a full restart, and bad input.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::cluster::Cluster;
use common::history::{check_acknowledged, Seen};
use syncline_client::{
    Acks, Client, ClusterDescription, ConsumerConfig, DeliveryFuture, GroupConsumerConfig,
    OffsetCommit, ProducerConfig, StartOffset, TopicConfig,
};
use tokio::time::Instant;
use tonic::Code;

/// Generous: election timeouts are 1-2 s, but CI machines are slow and shared.
const CONTROLLER_TIMEOUT: Duration = Duration::from_secs(20);

/// The most a new controller may take after the old one is killed: the election timeout is
/// 1-2 s; this leaves room for a few split votes on a slow, shared machine.
const ELECTION_BOUND: Duration = Duration::from_secs(10);

/// Polls `probe` until it gives a value, or panics naming `what` after `timeout`.
async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `__offsets` is placed (the controller creates it once every node registered).
async fn wait_for_offsets(cluster: &Cluster, node: u64) -> ClusterDescription {
    eventually(CONTROLLER_TIMEOUT, "__offsets to be placed", || async {
        let description = cluster.describe(node).await.ok()?;
        description
            .partitions
            .iter()
            .any(|p| p.topic == "__offsets")
            .then_some(description)
    })
    .await
}

/// Leaders per node of `topic`'s partitions.
fn leaders_of(description: &ClusterDescription, topic: &str) -> BTreeMap<u64, usize> {
    let mut leaders = BTreeMap::new();
    for placement in description.partitions.iter().filter(|p| p.topic == topic) {
        *leaders
            .entry(placement.leader.expect("every partition has a leader"))
            .or_insert(0) += 1;
    }
    leaders
}

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Produces `count` keyed records `key:seq` (keys k0..k{keys-1}) through `client`.
async fn produce_keyed(client: &Client, topic: &str, count: u64, keys: u64) {
    let producer = client
        .producer(topic, ProducerConfig::default())
        .await
        .unwrap();
    let mut pending = Vec::new();
    for seq in 0..count {
        let key = format!("k{}", seq % keys);
        let value = format!("{key}:{seq}");
        pending.push(
            producer
                .enqueue(Some(key.as_bytes()), Some(value.as_bytes()), &[])
                .await
                .unwrap(),
        );
    }
    for delivery in pending {
        delivery.await.unwrap();
    }
    producer.close().await;
}

/// Reads `count` records of every partition of `topic` from the start through `client`.
async fn consume_all(client: &Client, topic: &str, count: usize) -> Vec<(u32, String)> {
    read_all(client, topic, count)
        .await
        .into_iter()
        .map(|r| (r.partition, String::from_utf8(r.value).unwrap()))
        .collect()
}

/// [`consume_all`] with offsets and keys, for the history checkers.
async fn read_all(client: &Client, topic: &str, count: usize) -> Vec<Seen> {
    read_until(client, topic, |seen, _| seen.len() >= count).await
}

/// Reads `topic` from the start until every partition in `ends` was read up to its end.
async fn read_to_ends(client: &Client, topic: &str, ends: &BTreeMap<u32, u64>) -> Vec<Seen> {
    read_until(client, topic, |_, next| {
        ends.iter()
            .all(|(p, end)| *end == 0 || next.get(p).is_some_and(|n| n >= end))
    })
    .await
}

/// Reads `topic` from the start until `done(records read, next offset per partition)`.
async fn read_until(
    client: &Client,
    topic: &str,
    done: impl Fn(&[Seen], &BTreeMap<u32, u64>) -> bool,
) -> Vec<Seen> {
    let mut consumer = client
        .consumer(
            topic,
            ConsumerConfig {
                start: StartOffset::Earliest,
                fetch_max_wait: Duration::from_millis(100),
                ..ConsumerConfig::default()
            },
        )
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut next: BTreeMap<u32, u64> = BTreeMap::new();
    while !done(&seen, &next) {
        let record = tokio::time::timeout(Duration::from_secs(20), consumer.recv())
            .await
            .expect("records keep coming")
            .expect("the consumer does not end")
            .unwrap();
        // A consumer never goes back (a redelivery here would also cut the read short).
        let expected = next.entry(record.partition).or_insert(0);
        assert!(
            record.offset >= *expected,
            "partition {} went back to offset {} after {}",
            record.partition,
            record.offset,
            *expected
        );
        *expected = record.offset + 1;
        seen.push(Seen {
            partition: record.partition,
            offset: record.offset,
            key: record.key.map(|k| k.to_vec()),
            value: record.value.unwrap_or_default().to_vec(),
        });
    }
    seen
}

/// Every key's values appear in the order they were produced.
fn assert_per_key_order(seen: &[(u32, String)]) {
    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    let mut partition_of: BTreeMap<String, u32> = BTreeMap::new();
    for (partition, value) in seen {
        let (key, seq) = value.split_once(':').expect("key:seq");
        let seq: u64 = seq.parse().unwrap();
        if let Some(before) = last.insert(key.to_string(), seq) {
            assert!(before < seq, "{key}: {seq} after {before}");
        }
        let first = *partition_of.entry(key.to_string()).or_insert(*partition);
        assert_eq!(first, *partition, "{key} moved partitions");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_should_agree_spread_topics_route_through_any_node_and_share_a_group() {
    let mut cluster = Cluster::start(3);
    let controller = cluster.wait_for_controller(CONTROLLER_TIMEOUT).await;
    assert!((1..=3).contains(&controller));
    let described = wait_for_offsets(&cluster, 1).await;
    assert_eq!(described.nodes.len(), 3);
    assert!(described.nodes.iter().all(|n| n.alive), "{described:?}");
    // `__offsets` is spread like any topic: 6 partitions, 2 led by each node.
    assert_eq!(
        leaders_of(&described, "__offsets"),
        BTreeMap::from([(1, 2), (2, 2), (3, 2)])
    );

    // Created through node 2; 6 partitions over 3 nodes: each leads 2.
    // Replication factor 1 here (the default is 3 on three nodes): each node then holds only
    // the partitions it leads, which this test checks.
    let created = cluster.run_cli(
        2,
        &[
            "topic",
            "create",
            "orders",
            "--partitions",
            "6",
            "--replication-factor",
            "1",
        ],
    );
    assert!(created.status.success(), "{}", stderr(&created));
    let status = cluster.run_cli(3, &["cluster", "status", "--json"]);
    assert!(status.status.success(), "{}", stderr(&status));
    let json: serde_json::Value = serde_json::from_str(stdout(&status).trim()).unwrap();
    assert_eq!(json["controller"], serde_json::json!(controller));
    assert_eq!(json["cluster_id"], serde_json::json!(described.cluster_id));
    assert_eq!(json["nodes"].as_array().unwrap().len(), 3);
    let orders: Vec<&serde_json::Value> = json["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["topic"] == "orders")
        .collect();
    assert_eq!(orders.len(), 6);
    let mut per_node = BTreeMap::new();
    for p in &orders {
        let leader = p["leader"].as_u64().unwrap();
        assert_eq!(p["replicas"], serde_json::json!([leader]));
        assert_eq!(p["caught_up"], serde_json::json!([leader]));
        *per_node.entry(leader).or_insert(0) += 1;
    }
    assert_eq!(per_node, BTreeMap::from([(1, 2), (2, 2), (3, 2)]));
    // Each node holds its own partitions only.
    for node in 1..=3u64 {
        let held: BTreeSet<String> =
            std::fs::read_dir(cluster.node(node).data_dir().join("orders"))
                .unwrap()
                .filter_map(|e| e.ok())
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
        let expected: BTreeSet<String> = orders
            .iter()
            .filter(|p| p["leader"] == serde_json::json!(node))
            .map(|p| p["partition"].to_string())
            .collect();
        assert_eq!(held, expected, "node {node}");
    }

    // Keyed records produced through node 1, read through node 3: per-key order kept.
    produce_keyed(&cluster.client(1).await, "orders", 300, 30).await;
    let seen = consume_all(&cluster.client(3).await, "orders", 300).await;
    assert_eq!(seen.len(), 300);
    assert_per_key_order(&seen);
    // Any node describes every partition, each as the node holding it sees it.
    let described = cluster
        .client(2)
        .await
        .describe_topic("orders")
        .await
        .unwrap();
    let ends: u64 = described.partitions.iter().map(|p| p.log_end_offset).sum();
    assert_eq!(ends, 300, "{described:?}");
    assert!(
        described.partitions.iter().all(|p| p.error.is_none()),
        "{described:?}"
    );

    // A table written through one node, followed live through another; CAS conflicts come
    // back with the current version whichever node the writer bootstrapped from.
    let created = cluster.run_cli(
        1,
        &[
            "topic",
            "create",
            "inventory",
            "--partitions",
            "3",
            "--cleanup",
            "compact",
        ],
    );
    assert!(created.status.success(), "{}", stderr(&created));
    let writer = cluster.client(1).await.table("inventory").await.unwrap();
    let reader = cluster
        .client(3)
        .await
        .sync_table("inventory")
        .await
        .unwrap();
    for n in 0..12 {
        writer
            .put(format!("sku-{n}"), format!("{n}"))
            .await
            .unwrap();
    }
    let first = writer.get("sku-0").await.unwrap().expect("sku-0 is there");
    let conflict = writer.put_if("sku-0", "stale", first.version + 1000).await;
    assert!(
        matches!(conflict, Err(syncline_client::Error::Conflict { .. })),
        "{conflict:?}"
    );
    for n in 0..12 {
        let written = writer.get(format!("sku-{n}")).await.unwrap().unwrap();
        reader
            .wait_for(written.partition, written.version)
            .await
            .unwrap();
    }
    assert_eq!(reader.len(), 12);
    assert_eq!(reader.get("sku-7").unwrap().value.as_ref(), b"7");

    // A group whose members bootstrapped from different nodes shares the topic.
    let config = GroupConsumerConfig {
        session_timeout: Some(Duration::from_millis(3000)),
        auto_commit_interval: Some(Duration::from_millis(200)),
        fetch_max_wait: Duration::from_millis(100),
        offset_reset: syncline_client::OffsetReset::Earliest,
        ..GroupConsumerConfig::default()
    };
    let first = cluster.client(1).await;
    let second = cluster.client(3).await;
    let mut a = first
        .group_consumer("billing", &["orders"], config.clone())
        .await
        .unwrap();
    let mut b = second
        .group_consumer("billing", &["orders"], config)
        .await
        .unwrap();
    // Read until the group has every record and a third node describes it as shared: two
    // members, each assigned some of the partitions. Both members are polled throughout, so
    // neither holds up the rebalance.
    let observer = cluster.client(2).await;
    let mut values = BTreeSet::new();
    let mut shared: Option<Vec<usize>> = None;
    let mut last_check = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(60);
    while values.len() < 300 || shared.is_none() {
        assert!(
            Instant::now() < deadline,
            "the group read {} of 300; shared: {shared:?}",
            values.len()
        );
        tokio::select! {
            Some(record) = a.recv() => {
                let record = record.unwrap();
                values.insert(String::from_utf8(record.value.unwrap_or_default().to_vec()).unwrap());
            }
            Some(record) = b.recv() => {
                let record = record.unwrap();
                values.insert(String::from_utf8(record.value.unwrap_or_default().to_vec()).unwrap());
            }
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        if shared.is_none() && last_check.elapsed() >= Duration::from_millis(200) {
            last_check = Instant::now();
            if let Ok(description) = observer.describe_group("billing").await {
                let assigned: Vec<usize> = description
                    .members
                    .iter()
                    .map(|m| m.assignment.len())
                    .collect();
                if assigned.len() == 2 && assigned.iter().all(|n| *n > 0) {
                    shared = Some(assigned);
                }
            }
        }
    }
    let expected: BTreeSet<String> = (0..300).map(|seq| format!("k{}:{seq}", seq % 30)).collect();
    assert_eq!(values, expected, "the group read every record");
    a.close().await.unwrap();
    b.close().await.unwrap();
    let description = observer.describe_group("billing").await.unwrap();
    let committed: u64 = description
        .partitions
        .iter()
        .filter_map(|p| p.committed_offset)
        .sum();
    assert_eq!(committed, 300, "{description:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_should_survive_a_controller_kill_a_node_down_during_a_delete_and_a_full_restart(
) {
    let mut cluster = Cluster::start(3);
    let controller = cluster.wait_for_controller(CONTROLLER_TIMEOUT).await;
    wait_for_offsets(&cluster, controller).await;
    let client = cluster.cluster_client().await;
    client
        .create_topic("keep", TopicConfig::with_partitions(3))
        .await
        .unwrap();
    produce_keyed(&client, "keep", 60, 6).await;
    let commits: Vec<OffsetCommit> = (0..3)
        .map(|partition| OffsetCommit {
            topic: "keep".into(),
            partition,
            offset: 1 + u64::from(partition),
            metadata: "m".into(),
            topic_id: String::new(),
        })
        .collect();
    client.commit_offsets("audit", &commits).await.unwrap();
    drop(client);

    // kill -9 of the controller leader: another is elected and creates topics.
    cluster.kill(controller);
    let killed_at = Instant::now();
    // The survivors name the dead leader until their election timeout passes.
    let next = loop {
        let next = cluster.wait_for_controller(CONTROLLER_TIMEOUT).await;
        if next != controller {
            break next;
        }
        assert!(
            killed_at.elapsed() < CONTROLLER_TIMEOUT,
            "no new controller within {CONTROLLER_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // The broker's election timeout is 1-2 s (heartbeats every 250 ms): a few rounds of it.
    let elected_after = killed_at.elapsed();
    assert!(
        elected_after < ELECTION_BOUND,
        "a new controller took {elected_after:?}"
    );
    let survivor = next;
    // The killed node is marked down after the session timeout, and new topics avoid it.
    eventually(
        CONTROLLER_TIMEOUT,
        "the killed node to be marked down",
        || async {
            let description = cluster.describe(survivor).await.ok()?;
            description
                .nodes
                .iter()
                .any(|n| n.id == controller && !n.alive)
                .then_some(())
        },
    )
    .await;
    // Replication factor 1: with a node down, 3 replicas cannot be placed (refused, as the
    // next create shows), but single replicas can, on the live nodes only.
    let refused = cluster.run_cli(
        survivor,
        &["topic", "create", "too-wide", "--partitions", "2"],
    );
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("replication factor 3 needs 3 live nodes, but 2 are live"),
        "{}",
        stderr(&refused)
    );
    let created = cluster.run_cli(
        survivor,
        &[
            "topic",
            "create",
            "after-kill",
            "--partitions",
            "2",
            "--replication-factor",
            "1",
        ],
    );
    assert!(created.status.success(), "{}", stderr(&created));
    let placed = cluster.describe(survivor).await.unwrap();
    let after: Vec<_> = placed
        .partitions
        .iter()
        .filter(|p| p.topic == "after-kill")
        .collect();
    assert_eq!(after.len(), 2);
    assert!(
        after.iter().all(|p| p.leader != Some(controller)),
        "{after:?}"
    );
    cluster.restart(controller);
    cluster.wait_for_controller(CONTROLLER_TIMEOUT).await;
    eventually(
        CONTROLLER_TIMEOUT,
        "the returned node to be up again",
        || async {
            let description = cluster.describe(survivor).await.ok()?;
            description.nodes.iter().all(|n| n.alive).then_some(())
        },
    )
    .await;
    // The returning node learns of the topic created while it was down.
    eventually(
        CONTROLLER_TIMEOUT,
        "the returned node to know after-kill",
        || async {
            let listed = cluster.run_cli(controller, &["topic", "list"]);
            stdout(&listed).contains("after-kill").then_some(())
        },
    )
    .await;

    // A node down during a delete removes its copy when it returns.
    let down = (1..=3).find(|id| *id != survivor).unwrap();
    let doomed = cluster.node(down).data_dir().join("after-kill");
    assert!(doomed.exists());
    assert!(cluster.stop(down), "node {down} stops cleanly");
    let deleted = cluster.run_cli(survivor, &["topic", "delete", "after-kill"]);
    assert!(deleted.status.success(), "{}", stderr(&deleted));
    assert!(
        doomed.exists(),
        "the stopped node cannot have deleted it yet"
    );
    cluster.restart(down);
    eventually(
        CONTROLLER_TIMEOUT,
        "the returned node to delete after-kill",
        || async { (!doomed.exists()).then_some(()) },
    )
    .await;
    let listed = cluster.run_cli(down, &["topic", "list"]);
    assert!(
        !stdout(&listed).contains("after-kill"),
        "{}",
        stdout(&listed)
    );

    // kill -9 of every node while a producer writes (acks durable), then all start again:
    // every acknowledged record is there (per-key order kept), and so are the committed
    // offsets and the topics.
    let client = cluster.cluster_client().await;
    client
        .create_topic("crash", TopicConfig::with_partitions(3))
        .await
        .unwrap();
    let acked = Arc::new(Mutex::new(Vec::new()));
    let writer = tokio::spawn(produce_until_stopped(client, "crash", acked.clone()));
    eventually(CONTROLLER_TIMEOUT, "200 acknowledged records", || async {
        (acked.lock().unwrap().len() >= 200).then_some(())
    })
    .await;
    for id in 1..=3 {
        cluster.kill(id);
    }
    writer.abort();
    let _ = writer.await;
    let acked = acked.lock().unwrap().clone();
    cluster.start_all();
    cluster.wait_for_controller(CONTROLLER_TIMEOUT).await;
    let client = cluster.client(down).await;
    // Everything each partition's log holds: the acknowledged records and maybe some whose
    // acknowledgement the kill cut off.
    // Right after the restart a partition's end may still be moving (its new leader applying
    // the committed entries), so wait until each partition's end covers its acknowledged
    // records (a lost one fails here); reading then stops at those ends.
    let mut acked_end: BTreeMap<u32, u64> = BTreeMap::new();
    for seen in &acked {
        let end = acked_end.entry(seen.partition).or_default();
        *end = (*end).max(seen.offset + 1);
    }
    let ends: BTreeMap<u32, u64> = eventually(
        CONTROLLER_TIMEOUT,
        "crash to be described, each partition holding its acknowledged records",
        || async {
            let described = client.describe_topic("crash").await.ok()?;
            let covered = described.partitions.iter().all(|p| {
                p.error.is_none()
                    && p.log_end_offset >= acked_end.get(&p.partition).copied().unwrap_or(0)
            });
            covered.then(|| {
                described
                    .partitions
                    .iter()
                    .map(|p| (p.partition, p.log_end_offset))
                    .collect::<BTreeMap<u32, u64>>()
            })
        },
    )
    .await;
    let total: u64 = ends.values().sum();
    assert!(total >= acked.len() as u64, "{total} < {}", acked.len());
    let log = read_to_ends(&client, "crash", &ends).await;
    // Every acknowledged record at its acknowledged offset, byte for byte; none twice; each
    // key's records in the order they were sent.
    let violations = check_acknowledged(&acked, &log);
    assert!(violations.is_empty(), "{violations:#?}");
    let seen = consume_all(&client, "keep", 60).await;
    assert_per_key_order(&seen);
    let mut committed = client.fetch_offsets("audit", None).await.unwrap();
    committed.sort_by_key(|c| c.partition);
    let offsets: Vec<(u32, u64)> = committed.iter().map(|c| (c.partition, c.offset)).collect();
    assert_eq!(offsets, vec![(0, 1), (1, 2), (2, 3)]);
    let listed = stdout(&cluster.run_cli(1, &["topic", "list"]));
    assert!(
        listed.contains("keep") && listed.contains("crash") && !listed.contains("after-kill"),
        "{listed}"
    );
}

/// Produces keyed records `key:seq` (keys k0..k9) into `topic` until aborted, a few hundred a
/// second, and adds each acknowledged one to `acked`.
async fn produce_until_stopped(client: Client, topic: &str, acked: Arc<Mutex<Vec<Seen>>>) {
    let producer = client
        .producer(
            topic,
            ProducerConfig {
                acks: Acks::Durable,
                linger: Duration::from_millis(5),
                ..ProducerConfig::default()
            },
        )
        .await
        .unwrap();
    let (pending, mut deliveries) = tokio::sync::mpsc::unbounded_channel();
    let recorder = tokio::spawn(async move {
        while let Some((key, value, delivery)) = deliveries.recv().await {
            let delivery: DeliveryFuture = delivery;
            if let Ok(delivered) = delivery.await {
                acked.lock().unwrap().push(Seen {
                    partition: delivered.partition,
                    offset: delivered.offset,
                    key: Some(key),
                    value,
                });
            }
        }
    });
    // Aborting this task drops the recorder's handle, not the recorder: end it too.
    let _stop = AbortOnDrop(recorder);
    for seq in 0.. {
        let key = format!("k{}", seq % 10);
        let value = format!("{key}:{seq}");
        let Ok(delivery) = producer
            .enqueue(Some(key.as_bytes()), Some(value.as_bytes()), &[])
            .await
        else {
            break;
        };
        if pending
            .send((key.into_bytes(), value.into_bytes(), delivery))
            .is_err()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Aborts the task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_cluster_input_should_get_a_clear_error() {
    let mut cluster = Cluster::start(3);
    cluster.wait_for_controller(CONTROLLER_TIMEOUT).await;
    // Every node registered (with its data directory's id) once `__offsets` is placed.
    wait_for_offsets(&cluster, 1).await;

    // More replicas than this version serves (and than there are nodes).
    let refused = cluster.run_cli(1, &["topic", "create", "wide", "--replication-factor", "5"]);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("replication factor 5"),
        "{}",
        stderr(&refused)
    );
    let listed = stdout(&cluster.run_cli(2, &["topic", "list"]));
    assert!(!listed.contains("wide"), "{listed}");

    // Producer ids: a new one through every node, all different; re-initialising an existing
    // one (which fences its older instances) is not served by a cluster yet.
    let mut ids = BTreeSet::new();
    for node in 1..=3 {
        let identity = cluster
            .client(node)
            .await
            .init_producer(None)
            .await
            .unwrap();
        ids.insert(identity.producer_id());
    }
    assert_eq!(ids.len(), 3, "{ids:?}");
    let existing = *ids.first().unwrap();
    for node in 1..=3 {
        let refused = cluster
            .client(node)
            .await
            .init_producer(Some(existing))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Some(Code::FailedPrecondition), "{refused}");
        assert!(
            refused
                .to_string()
                .contains("not supported in a cluster yet"),
            "{refused}"
        );
    }

    // A node id that is not in the list.
    assert!(cluster.stop(3));
    let unknown = cluster.try_start_with(3, &["--node-id", "9"]).unwrap_err();
    assert!(unknown.contains("is not in the list"), "{unknown}");

    // The data directory of a formed cluster started with another list.
    let mismatched = format!(
        "1={},2={},3={},4=127.0.0.1:1",
        cluster.node(1).address(),
        cluster.node(2).address(),
        cluster.node(3).address()
    );
    let mismatch = cluster
        .try_start_with(3, &["--cluster", &mismatched])
        .unwrap_err();
    assert!(
        mismatch.contains("give the list the cluster was formed with"),
        "{mismatch}"
    );

    // Node id 3 taken over by another (empty) data directory, while node 3 is down: the
    // running nodes remember which directory node 3 registered from.
    let impostor = tempfile::tempdir().unwrap();
    let dir = impostor.path().display().to_string();
    let reused = cluster
        .try_start_with(3, &["--data-dir", &dir])
        .unwrap_err();
    assert!(
        reused.contains("node id 3 is in use by another data directory"),
        "{reused}"
    );

    // (A clustered data directory started without --cluster restarts as the member it
    // recorded: tests/cluster_membership.rs.)

    // Node 3 comes back as itself.
    cluster.restart(3);
    cluster.wait_for_controller(CONTROLLER_TIMEOUT).await;
    let described = cluster.describe(1).await.unwrap();
    assert!(described.nodes.iter().all(|n| n.alive), "{described:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_of_a_single_node_broker_should_be_refused_by_a_cluster() {
    // Node 1 of a three-node list starts alone (no peer knows of it, so nothing but its data
    // directory can refuse it) on a data directory a single-node broker wrote.
    let mut cluster = Cluster::unstarted(3);
    let single = tempfile::tempdir().unwrap();
    common::copy_dir(&common::fixture("datadir-single-node"), single.path());
    let dir = single.path().display().to_string();
    let refused = cluster
        .try_start_with(1, &["--data-dir", &dir])
        .unwrap_err();
    assert!(
        refused.contains("holds topics written by a single-node broker"),
        "{refused}"
    );
}

/// SIGSTOP of the controller leader for longer than the election timeout: the other two elect
/// a controller and serve admin calls; SIGCONT: the old leader steps down, all three agree
/// again and it learns what changed while it was stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_controller_leader_should_be_replaced_and_step_down_when_it_resumes() {
    let mut cluster = Cluster::start(3);
    let paused = cluster.wait_for_controller(CONTROLLER_TIMEOUT).await;
    wait_for_offsets(&cluster, paused).await;
    let others: Vec<u64> = (1..=3).filter(|id| *id != paused).collect();
    cluster.pause(paused);
    let stopped_at = Instant::now();
    let next = eventually(
        CONTROLLER_TIMEOUT,
        "the others to elect a controller",
        || async {
            let mut named = Vec::new();
            for &id in &others {
                let description =
                    tokio::time::timeout(Duration::from_secs(2), cluster.describe(id))
                        .await
                        .ok()?
                        .ok()?;
                named.push(description.controller?);
            }
            (named[0] == named[1] && named[0] != paused).then_some(named[0])
        },
    )
    .await;
    assert!(
        stopped_at.elapsed() < Duration::from_secs(10),
        "a new controller took {:?}",
        stopped_at.elapsed()
    );
    let created = cluster.run_cli(
        next,
        &["topic", "create", "while-paused", "--partitions", "2"],
    );
    assert!(created.status.success(), "{}", stderr(&created));

    cluster.resume(paused);
    let agreed = cluster.wait_for_controller(CONTROLLER_TIMEOUT).await;
    assert_ne!(
        agreed, paused,
        "the resumed node lost the lead to a newer term"
    );
    eventually(
        CONTROLLER_TIMEOUT,
        "the resumed node to learn the new topic",
        || async {
            let listed = cluster.run_cli(paused, &["topic", "list"]);
            stdout(&listed).contains("while-paused").then_some(())
        },
    )
    .await;
}

/// A CAS register workload across the cluster: three clients, each bootstrapped from another
/// node, read and compare-and-set two keys of a table while the node holding one key's
/// partition is killed (-9) and restarted; each key's history must be linearizable (checked by
/// tests/common/linearizable.rs). With one replica per partition the key is unavailable while
/// its node is down: those calls fail, and a failed write counts as "may have happened".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cas_register_workload_should_stay_linearizable_through_a_crash() {
    use common::linearizable::{is_linearizable, Event, Op, Outcome};
    use std::sync::Arc;

    let mut cluster = Cluster::start(3);
    let controller = cluster.wait_for_controller(CONTROLLER_TIMEOUT).await;
    wait_for_offsets(&cluster, controller).await;
    let created = cluster.run_cli(
        1,
        &[
            "topic",
            "create",
            "registers",
            "--partitions",
            "3",
            "--cleanup",
            "compact",
        ],
    );
    assert!(created.status.success(), "{}", stderr(&created));
    let keys = ["r0", "r1"];
    let start = std::time::Instant::now();
    let history: Arc<Mutex<Vec<(usize, Event)>>> = Arc::default();
    let mut clients = Vec::new();
    for (n, node) in (1..=3u64).enumerate() {
        let table = cluster.client(node).await.table("registers").await.unwrap();
        let history = history.clone();
        clients.push(tokio::spawn(async move {
            let mut expected: [u64; 2] = [0, 0];
            for step in 0..70u64 {
                let k = ((step + n as u64) % 2) as usize;
                let key = keys[k];
                let value = format!("c{n}-{step}").into_bytes();
                let invoked = start.elapsed().as_nanos() as u64;
                let (op, outcome) = if step % 3 == 0 {
                    let outcome = match table.get(key).await {
                        Ok(entry) => {
                            let state = entry.map(|e| (e.version, e.value.to_vec()));
                            if let Some((version, _)) = &state {
                                expected[k] = *version;
                            }
                            Outcome::Read(state)
                        }
                        Err(_) => Outcome::Unknown,
                    };
                    (Op::Get, outcome)
                } else if expected[k] == 0 {
                    let outcome = match table.put(key, &value).await {
                        Ok(written) => {
                            expected[k] = written.version;
                            Outcome::Written(written.version)
                        }
                        Err(_) => Outcome::Unknown,
                    };
                    (Op::Put(value), outcome)
                } else {
                    let sent = expected[k];
                    let outcome = match table.put_if(key, &value, sent).await {
                        Ok(written) => {
                            expected[k] = written.version;
                            Outcome::Written(written.version)
                        }
                        Err(syncline_client::Error::Conflict { current, .. }) => {
                            expected[k] = current.unwrap_or(0);
                            Outcome::Conflict(current)
                        }
                        Err(_) => Outcome::Unknown,
                    };
                    (
                        Op::PutIf {
                            expected: sent,
                            value,
                        },
                        outcome,
                    )
                };
                let failed = outcome == Outcome::Unknown;
                let returned = start.elapsed().as_nanos() as u64;
                history.lock().unwrap().push((
                    k,
                    Event {
                        invoked,
                        returned,
                        op,
                        outcome,
                    },
                ));
                tokio::time::sleep(Duration::from_millis(if failed { 200 } else { 20 })).await;
            }
        }));
    }
    // Kill the node holding r0's partition while the clients run, then bring it back.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let description = cluster.describe(controller).await.unwrap();
    let partition = syncline_proto::partitioner::partition_for_key(b"r0", 3);
    let holder = description
        .partitions
        .iter()
        .find(|p| p.topic == "registers" && p.partition == partition)
        .and_then(|p| p.leader)
        .unwrap();
    let killed = start.elapsed().as_nanos() as u64;
    cluster.kill(holder);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    cluster.restart(holder);
    let restarted = start.elapsed().as_nanos() as u64;
    for client in clients {
        client.await.unwrap();
    }
    let history = history.lock().unwrap().clone();
    // The crash was felt (a call failed, or waited through it: the client retries while the
    // node is down), and writes went on after the node returned. A call still running at the
    // kill or started after it waits for the new leader: 250-500 ms of election (issue 15) plus
    // the client's retry, so 200 ms tells it from an ordinary call (a few ms); 500 ms, as this
    // check had before the faster failover, was missed when the election was quick (CI).
    assert!(
        history.iter().any(|(_, e)| e.outcome == Outcome::Unknown
            || (e.returned >= killed && e.returned.saturating_sub(e.invoked) > 200_000_000)),
        "no call met the crash: the kill came too late"
    );
    assert!(
        history
            .iter()
            .any(|(_, e)| e.invoked > restarted && matches!(e.outcome, Outcome::Written(_))),
        "no write after the restart"
    );
    for (k, key) in keys.iter().enumerate() {
        // A read that failed constrains nothing.
        let events: Vec<Event> = history
            .iter()
            .filter(|(of, e)| *of == k && !(e.op == Op::Get && e.outcome == Outcome::Unknown))
            .map(|(_, e)| e.clone())
            .collect();
        assert!(
            is_linearizable(None, &events),
            "{key}: not linearizable: {events:#?}"
        );
    }
}
