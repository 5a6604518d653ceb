//! Changing a running cluster (issue 16) through real processes and the `syncline` CLI.
//!
//! - A 4th node joins with `--join` under a load of idempotent producers; `syncline cluster
//!   rebalance --json` gives it its share of replicas; the producers lose nothing, duplicate
//!   nothing and keep each key's order (`check_acknowledged`), and every replica of every
//!   partition holds the same records (`check_replicas`). The joined node restarts without
//!   `--join`, and with a `--join` naming a node of another cluster it is refused.
//! - `syncline topic reassign` moves a partition while a producer writes, and refuses bad
//!   input with clear errors: an unknown node, a replica set of the wrong size, an unknown
//!   topic or partition.
//! - `syncline cluster remove-node` moves a node's replicas away, then removes it (the node
//!   stops); removing a node when the rest are too few for the replication factor is refused
//!   (unless --force); `cluster voters` refuses an even count.
//! - Partitions of one replica move by copy (`topic reassign`, and `remove-node` of the node
//!   holding them) while producers write: nothing lost, nothing duplicated, each key's order
//!   kept, no error beyond retries; the old node removes its copy and the new one keeps no
//!   leftover copy directory.

mod common;

use std::time::Duration;

use common::cluster::Cluster;
use common::history::{check_acknowledged, check_replicas, Seen};
use common::workload::{read_topic, KeyedProduce, ProduceConfig};
use syncline_client::ClusterDescription;

/// Generous: CI machines are slow and shared.
const TIMEOUT: Duration = Duration::from_secs(60);
const TOPIC: &str = "grown";
const PARTITIONS: u32 = 4;
/// How long reading a topic back may take.
const READ_BOUND: Duration = Duration::from_secs(30);

fn cli_ok(output: &std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "status {:?}\nstdout: {stdout}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn cli_refused(output: &std::process::Output) -> String {
    assert_eq!(
        output.status.code(),
        Some(1),
        "stdout: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Replicas each node holds (all topics).
fn replicas_per_node(description: &ClusterDescription) -> std::collections::BTreeMap<u64, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for p in &description.partitions {
        for node in &p.replicas {
            *counts.entry(*node).or_insert(0) += 1;
        }
    }
    counts
}

/// Every replica of `topic` holds what the leaders served.
fn check_copies(cluster: &Cluster, description: &ClusterDescription, topic: &str, log: &[Seen]) {
    for placement in description.partitions.iter().filter(|p| p.topic == topic) {
        let partition = placement.partition;
        let (copies, unreadable) =
            cluster.replica_copies(topic, partition, &placement.replicas, log);
        assert!(unreadable.is_empty(), "{unreadable:?}");
        let violations = check_replicas(&copies);
        assert!(
            violations.is_empty(),
            "{topic}/{partition} replicas (0: as served, then nodes {:?}): {violations:#?}",
            placement.replicas
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_a_joining_node_rebalance_should_give_it_its_share_while_producers_write() {
    let mut cluster = Cluster::start(3);
    cluster.create_replicated(1, TOPIC, PARTITIONS, 3).await;
    let produce = KeyedProduce::start(&cluster.addresses(), TOPIC, ProduceConfig::default());
    produce
        .wait_progress(PARTITIONS, TIMEOUT)
        .await
        .expect("the producers make progress");

    let joined = cluster.join_node(2, &[]);
    assert_eq!(joined, 4);
    cluster.wait_for_controller(TIMEOUT).await;
    let before = cluster.describe(1).await.expect("describe");
    assert_eq!(replicas_per_node(&before).get(&4), None, "{before:#?}");

    let output = cluster.run_cli(1, &["cluster", "rebalance", "--json"]);
    let stdout = cli_ok(&output);
    let events: Vec<serde_json::Value> = stdout
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect();
    assert_eq!(events[0]["event"], "started", "{stdout}");
    let started = events[0]["moves"].as_array().expect("moves").len();
    assert!(started > 0, "{stdout}");
    let done = events.last().expect("a last line");
    assert_eq!(done["event"], "done", "{stdout}");
    assert_eq!(done["moved"], started, "{stdout}");

    let after = cluster
        .wait_for_description(1, TIMEOUT, |d| {
            d.partitions
                .iter()
                .all(|p| p.target_replicas.is_empty() && p.leader.is_some())
        })
        .await;
    let counts = replicas_per_node(&after);
    let total: usize = counts.values().sum();
    let (low, high) = (
        *counts.values().min().expect("nodes"),
        *counts.values().max().expect("nodes"),
    );
    assert_eq!(counts.len(), 4, "{counts:?}");
    assert!(
        high - low <= 1 && counts[&4] >= total / 4,
        "replicas per node after the rebalance: {counts:?}"
    );
    // A second rebalance finds nothing to do.
    let again = cli_ok(&cluster.run_cli(1, &["cluster", "rebalance"]));
    assert!(again.contains("balanced: nothing to move"), "{again}");

    produce
        .wait_progress(PARTITIONS, TIMEOUT)
        .await
        .expect("the producers still make progress");
    let produced = produce.stop().await;
    let client = cluster.cluster_client().await;
    let log = read_topic(&client, TOPIC, PARTITIONS, READ_BOUND)
        .await
        .expect("read the topic back");
    let violations = check_acknowledged(&produced.acknowledged, &log);
    assert!(
        violations.is_empty(),
        "{} of {} acknowledged records violate: {violations:#?}",
        violations.len(),
        produced.acknowledged.len()
    );
    let after = cluster
        .wait_for_description(1, TIMEOUT, |d| {
            d.partitions
                .iter()
                .filter(|p| p.topic == TOPIC)
                .all(|p| p.caught_up.len() == p.replicas.len())
        })
        .await;
    check_copies(&cluster, &after, TOPIC, &log);

    // The joined node restarts as a member without --join, and refuses a --join into
    // another cluster.
    assert!(tokio::task::block_in_place(|| cluster.stop(joined)));
    let mut other = Cluster::start_independent(1);
    let foreign = other.node(1).address();
    let refused = cluster
        .try_start_with(joined, &["--join", &foreign])
        .expect_err("a --join into another cluster is refused");
    assert!(refused.contains("names a node of cluster"), "{refused}");
    other.stop_all();
    // Without --join (the joined node) or --cluster (a node that formed the cluster): each
    // restarts as the member it recorded.
    cluster.restart_bare(joined);
    assert!(tokio::task::block_in_place(|| cluster.stop(1)));
    cluster.restart_bare(1);
    cluster.wait_for_controller(TIMEOUT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_a_reassign_should_move_the_partition_while_writing_and_refuse_bad_input() {
    let mut cluster = Cluster::start(3);
    cluster.join_node(1, &[]);
    cluster.wait_for_controller(TIMEOUT).await;
    cluster.create_replicated(1, TOPIC, 1, 3).await;
    let description = cluster.describe(1).await.expect("describe");
    let placement = description
        .partitions
        .iter()
        .find(|p| p.topic == TOPIC)
        .expect("placed");
    let from = placement.replicas.clone();
    let spare = (1..=4)
        .find(|n| !from.contains(n))
        .expect("a node without a replica");
    // The first replica of the current set gives its place to the spare node.
    let mut to = from.clone();
    to[0] = spare;
    let list = to.iter().map(u64::to_string).collect::<Vec<_>>().join(",");

    // Bad input first: nothing moves.
    for (args, wanted) in [
        (
            vec!["--partition", "0", "--replicas", "1,2,9"],
            "node 9 is not a member",
        ),
        (
            vec!["--partition", "0", "--replicas", "1,2"],
            "replication factor 3",
        ),
        (
            vec!["--partition", "0", "--replicas", "1,1,2"],
            "names a node twice",
        ),
        (
            vec!["--partition", "7", "--replicas", "1,2,3"],
            "has no partition 7",
        ),
    ] {
        let mut full = vec!["topic", "reassign", TOPIC];
        full.extend(args);
        let stderr = cli_refused(&cluster.run_cli(1, &full));
        assert!(stderr.contains(wanted), "{full:?}: {stderr}");
    }
    let stderr = cli_refused(&cluster.run_cli(
        1,
        &[
            "topic",
            "reassign",
            "nope",
            "--partition",
            "0",
            "--replicas",
            "1,2,3",
        ],
    ));
    assert!(stderr.contains("nope"), "{stderr}");

    let produce = KeyedProduce::start(&cluster.addresses(), TOPIC, ProduceConfig::default());
    produce
        .wait_progress(1, TIMEOUT)
        .await
        .expect("the producers make progress");
    let stdout = cli_ok(&cluster.run_cli(
        2,
        &[
            "topic",
            "reassign",
            TOPIC,
            "--partition",
            "0",
            "--replicas",
            &list,
        ],
    ));
    assert!(
        stdout.contains(&format!("moved {TOPIC}/0 to nodes {list}")),
        "{stdout}"
    );
    produce
        .wait_progress(1, TIMEOUT)
        .await
        .expect("the producers still make progress");
    let produced = produce.stop().await;
    let client = cluster.cluster_client().await;
    let log = read_topic(&client, TOPIC, 1, READ_BOUND)
        .await
        .expect("read back");
    let violations = check_acknowledged(&produced.acknowledged, &log);
    assert!(violations.is_empty(), "{violations:#?}");
    let after = cluster
        .wait_for_description(1, TIMEOUT, |d| {
            d.partitions
                .iter()
                .filter(|p| p.topic == TOPIC)
                .all(|p| p.caught_up.len() == 3 && p.target_replicas.is_empty())
        })
        .await;
    let placement = after
        .partitions
        .iter()
        .find(|p| p.topic == TOPIC)
        .expect("placed");
    assert_eq!(placement.replicas, to);
    check_copies(&cluster, &after, TOPIC, &log);
    // The node that left the replica set removed its copy.
    let gone = from[0];
    let dir = cluster.node(gone).data_dir().join(TOPIC).join("0");
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while dir.exists() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!dir.exists(), "{} still exists", dir.display());

    // Back, throttled: 2 MiB more at 256 KiB/s cannot be copied in under ~7 s; the move waits
    // until the returning replica caught up (not merely until its copy started).
    cli_ok(&cluster.run_cli_bootstrap(&[
        "bench",
        "--topic",
        TOPIC,
        "--records",
        "2048",
        "--record-size",
        "1KiB",
        "--consumers",
        "0",
        "--acks",
        "leader",
    ]));
    let back = from
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let started = std::time::Instant::now();
    cli_ok(&cluster.run_cli(
        1,
        &[
            "topic",
            "reassign",
            TOPIC,
            "--partition",
            "0",
            "--replicas",
            &back,
            "--throttle",
            "256KiB",
        ],
    ));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(5),
        "2 MiB at 256 KiB/s moved in {took:?}: not throttled"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_remove_node_should_drain_it_then_remove_it_and_refuse_when_too_few_remain() {
    let mut cluster = Cluster::start(3);
    let extra = cluster.join_node(1, &[]);
    cluster.wait_for_controller(TIMEOUT).await;
    cluster.create_replicated(1, TOPIC, 2, 3).await;
    cluster.produce_keys(TOPIC, 0..20).await;

    // An even number of voters is refused; an unknown node is NOT_FOUND.
    let stderr = cli_refused(&cluster.run_cli(1, &["cluster", "voters", "1,2"]));
    assert!(stderr.contains("odd number"), "{stderr}");
    let stderr = cli_refused(&cluster.run_cli(1, &["cluster", "remove-node", "9"]));
    assert!(stderr.contains("node 9 is not a member"), "{stderr}");

    // Node 3 (a voter) goes: node 4 takes its replicas and its vote.
    let stdout = cli_ok(&cluster.run_cli(1, &["cluster", "remove-node", "3"]));
    assert!(stdout.contains("removed node 3"), "{stdout}");
    let after = cluster
        .wait_for_description(1, TIMEOUT, |d| !d.nodes.iter().any(|n| n.id == 3))
        .await;
    assert!(
        after.partitions.iter().all(|p| !p.replicas.contains(&3)),
        "{after:#?}"
    );
    assert!(
        after.voters.contains(&extra) && !after.voters.contains(&3),
        "{after:#?}"
    );
    // The removed node stops by itself.
    let deadline = std::time::Instant::now() + TIMEOUT;
    while cluster.is_running(3) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!cluster.is_running(3), "the removed node still runs");
    cluster.produce_keys(TOPIC, 20..30).await;

    // Three nodes left for R = 3: another removal is refused, naming --force.
    let stderr = cli_refused(&cluster.run_cli(1, &["cluster", "remove-node", "2"]));
    assert!(
        stderr.contains("too few") && stderr.contains("--force"),
        "{stderr}"
    );
}

/// After a node returns, the leaderships it preferred move back to it (the preferred-leader
/// task), so leaders stay spread: without it they stay on the nodes that were up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_a_returning_node_its_preferred_leaderships_should_move_back() {
    let mut cluster = Cluster::start(3);
    cluster.create_replicated(1, TOPIC, 3, 3).await;
    cluster.produce_keys(TOPIC, 0..10).await;
    let preferred_by = |d: &ClusterDescription| {
        d.partitions
            .iter()
            .filter(|p| p.topic == TOPIC)
            .all(|p| p.leader.is_some() && p.leader == p.replicas.first().copied())
    };
    let spread = cluster.wait_for_description(1, TIMEOUT, preferred_by).await;
    let victim = spread
        .partitions
        .iter()
        .find(|p| p.topic == TOPIC)
        .and_then(|p| p.leader)
        .expect("a leader");
    cluster.kill(victim);
    let witness = (1..=3).find(|n| *n != victim).expect("a survivor");
    cluster
        .wait_for_description(witness, TIMEOUT, |d| {
            d.partitions
                .iter()
                .filter(|p| p.topic == TOPIC)
                .all(|p| p.leader.is_some_and(|l| l != victim))
        })
        .await;
    cluster.produce_keys(TOPIC, 10..20).await;
    cluster.restart(victim);
    cluster.wait_for_controller(TIMEOUT).await;
    cluster
        .wait_for_description(witness, TIMEOUT, preferred_by)
        .await;
}

/// Partitions of one replica have no Raft group: they move by copy and a short fence
/// (`cluster::copy`), with the same guarantees to producers as a replicated move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_single_replica_partitions_reassign_and_remove_node_should_copy_them_while_writing() {
    const SINGLE: &str = "single";
    let mut cluster = Cluster::start(3);
    let extra = cluster.join_node(1, &[]);
    cluster.wait_for_controller(TIMEOUT).await;
    cluster.create_replicated(1, SINGLE, PARTITIONS, 1).await;
    let before = cluster.describe(1).await.expect("describe");
    let holder = |d: &ClusterDescription, partition: u32| {
        d.partitions
            .iter()
            .find(|p| p.topic == SINGLE && p.partition == partition)
            .and_then(|p| p.replicas.first().copied())
            .expect("placed")
    };
    let from = holder(&before, 0);
    let to = (1..=extra).find(|n| *n != from).expect("another node");

    let produce = KeyedProduce::start(&cluster.addresses(), SINGLE, ProduceConfig::default());
    produce
        .wait_progress(PARTITIONS, TIMEOUT)
        .await
        .expect("the producers make progress");
    let stdout = cli_ok(&cluster.run_cli(
        1,
        &[
            "topic",
            "reassign",
            SINGLE,
            "--partition",
            "0",
            "--replicas",
            &to.to_string(),
        ],
    ));
    assert!(
        stdout.contains(&format!("moved {SINGLE}/0 to nodes {to}")),
        "{stdout}"
    );
    produce
        .wait_progress(PARTITIONS, TIMEOUT)
        .await
        .expect("the producers still make progress");
    // The old holder drops its copy.
    let dir = cluster.node(from).data_dir().join(SINGLE).join("0");
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while dir.exists() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!dir.exists(), "{} still exists", dir.display());

    // The joined node takes a partition (if it has none), then goes: its partitions of one
    // replica move to the others first.
    let now = cluster.describe(1).await.expect("describe");
    if let Some(partition) = (1..PARTITIONS).find(|p| holder(&now, *p) != extra) {
        cli_ok(&cluster.run_cli(
            2,
            &[
                "topic",
                "reassign",
                SINGLE,
                "--partition",
                &partition.to_string(),
                "--replicas",
                &extra.to_string(),
            ],
        ));
    }
    let held: Vec<u32> = cluster
        .describe(1)
        .await
        .expect("describe")
        .partitions
        .iter()
        .filter(|p| p.topic == SINGLE && p.replicas == [extra])
        .map(|p| p.partition)
        .collect();
    assert!(!held.is_empty(), "node {extra} holds no partition");
    let stdout = cli_ok(&cluster.run_cli(1, &["cluster", "remove-node", &extra.to_string()]));
    assert!(
        stdout.contains(&format!("removed node {extra}")),
        "{stdout}"
    );
    produce
        .wait_progress(PARTITIONS, TIMEOUT)
        .await
        .expect("the producers still make progress");
    let produced = produce.stop().await;
    assert!(
        produced.beyond_retries().is_empty(),
        "{:?}",
        produced.error_texts()
    );
    let after = cluster.describe(1).await.expect("describe");
    assert_eq!(holder(&after, 0), to, "{after:#?}");
    for partition in &held {
        assert_ne!(holder(&after, *partition), extra, "{after:#?}");
    }
    let client = cluster.cluster_client().await;
    let log = read_topic(&client, SINGLE, PARTITIONS, READ_BOUND)
        .await
        .expect("read back");
    let violations = check_acknowledged(&produced.acknowledged, &log);
    assert!(violations.is_empty(), "{violations:#?}");
    // No copy directory is left behind on the nodes that took partitions.
    for node in [1u64, 2, 3] {
        let leftovers: Vec<_> = std::fs::read_dir(cluster.node(node).data_dir())
            .expect("data dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n.starts_with("~copy"))
            .collect();
        assert!(leftovers.is_empty(), "node {node}: {leftovers:?}");
    }
}

/// A copy survives its new node's crash: killed mid-copy (throttled, so the copy takes
/// seconds), the holder keeps taking writes, and once the node is back the move finishes
/// with every record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_a_single_replica_copy_when_its_new_node_is_killed_should_finish_after_a_restart() {
    const RESUMED: &str = "resumed";
    let mut cluster = Cluster::start(3);
    cluster.wait_for_controller(TIMEOUT).await;
    cluster.create_replicated(1, RESUMED, 1, 1).await;
    cluster.produce_keys(RESUMED, 0..50).await;
    cli_ok(&cluster.run_cli_bootstrap(&[
        "bench",
        "--topic",
        RESUMED,
        "--records",
        "2048",
        "--record-size",
        "1KiB",
        "--consumers",
        "0",
    ]));
    let description = cluster.describe(1).await.expect("describe");
    let from = description
        .partitions
        .iter()
        .find(|p| p.topic == RESUMED)
        .and_then(|p| p.replicas.first().copied())
        .expect("placed");
    let to = (1..=3).find(|n| *n != from).expect("another node");
    cli_ok(&cluster.run_cli(
        1,
        &[
            "topic",
            "reassign",
            RESUMED,
            "--partition",
            "0",
            "--replicas",
            &to.to_string(),
            "--throttle",
            "256KiB",
            "--no-wait",
        ],
    ));
    // Killed once its copy has begun.
    let data = cluster.node(to).data_dir();
    let copying = || {
        std::fs::read_dir(&data)
            .map(|entries| {
                entries
                    .flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with("~copy-in-"))
            })
            .unwrap_or(false)
    };
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while !copying() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(copying(), "no copy began on node {to}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.kill(to);
    // The holder still takes writes (the move is not fenced).
    cluster.produce_keys(RESUMED, 50..60).await;
    cluster.restart(to);
    cluster
        .wait_for_description(1, TIMEOUT, |d| {
            d.partitions
                .iter()
                .any(|p| p.topic == RESUMED && p.replicas == [to] && p.target_replicas.is_empty())
        })
        .await;
    cluster.produce_keys(RESUMED, 60..70).await;
    let client = cluster.cluster_client().await;
    let log = read_topic(&client, RESUMED, 1, READ_BOUND)
        .await
        .expect("read back");
    for n in 0..70 {
        let key = format!("k{n}");
        let copies = log
            .iter()
            .filter(|s| s.key.as_deref() == Some(key.as_bytes()))
            .count();
        assert_eq!(copies, 1, "{key} is there {copies} times");
    }
    assert!(log.len() >= 70 + 2048, "{} records", log.len());
}
