//! Operating a cluster (issue 16) through real processes.
//!
//! - A node stopped with SIGTERM hands its partition leaderships and the controller's to other
//!   nodes before it exits, so a rolling restart waits for no election timeout: right after
//!   it exits, the surviving nodes already name other leaders (without the hand-off they
//!   would name the stopped node until their election timers ran out, 250-500 ms later).
//! - A rolling restart under load loses nothing and fails no write: 3 idempotent producers
//!   (durable acks) write keyed records to a topic of 3 partitions at R = 3 and a consumer
//!   group of 3 members reads it, while each node in turn is stopped with SIGTERM, started
//!   again and waited for until every replica is caught up. Then every acknowledged record is
//!   in the topic exactly once at its acknowledged offset and each key's records are in send
//!   order (`check_acknowledged`), the group was handed every acknowledged record, each member
//!   reading its partitions in order (`check_group`), every replica holds the same records
//!   (`check_replicas`, each node's partition logs read from disk after a last stop), and the
//!   producers reported no error beyond the client's retries: no delivery failed, no enqueue
//!   was refused ([`ProduceHistory::beyond_retries`](common::workload::ProduceHistory)).

mod common;

use std::time::Duration;

use common::cluster::Cluster;
use common::history::{check_acknowledged, check_group, check_replicas, Violation};
use common::workload::{read_topic, GroupConfig, GroupWorkload, KeyedProduce, ProduceConfig};
use syncline_client::ClusterDescription;
use tokio::time::Instant;

/// Generous: CI machines are slow and shared.
const TIMEOUT: Duration = Duration::from_secs(30);
const TOPIC: &str = "operated";
const PARTITIONS: u32 = 3;

/// Every node's flags in the rolling restart: `__offsets` (the group coordinator's topic)
/// replicated too, so that the consumer group outlives each node's restart.
const ROLLING_ARGS: &[&str] = &["--default-replication-factor", "3"];
/// The rolling restart's topic, and the group reading it.
const ROLLED: &str = "rolled";
const GROUP: &str = "rolling-readers";
/// How long the producers may take to be acknowledged on every partition, with a node down or
/// just back: a leader change and the client's retry backoff (at most 1 s) take far less.
const PROGRESS_BOUND: Duration = Duration::from_secs(30);
/// How long the group may take to be handed every acknowledged record at the end, and reading
/// the topic back.
const CATCH_UP_BOUND: Duration = Duration::from_secs(30);

/// The replicated groups (the topic's and `__offsets`') that `node` leads.
fn led_by(description: &ClusterDescription, node: u64) -> Vec<(String, u32)> {
    description
        .partitions
        .iter()
        .filter(|p| p.replicas.len() > 1 && p.leader == Some(node))
        .map(|p| (p.topic.clone(), p.partition))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_a_node_stopped_with_sigterm_should_hand_its_leaderships_over_before_it_exits() {
    let mut cluster = Cluster::start(3);
    cluster.create_replicated(1, TOPIC, PARTITIONS, 3).await;
    cluster.produce_keys(TOPIC, 0..30).await;
    // Every replica caught up (a leadership goes only to a follower holding every committed
    // entry); then idle long enough that the groups quiesce, so the hand-off wakes them.
    for id in 1..=3 {
        cluster
            .wait_for_description(id, TIMEOUT, |d| {
                d.partitions
                    .iter()
                    .filter(|p| p.replicas.len() > 1)
                    .all(|p| p.leader.is_some() && p.caught_up.len() == p.replicas.len())
            })
            .await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The controller's node, if it leads a partition group; else a node that does.
    let description = cluster.describe(1).await.expect("describe");
    let controller = description.controller.expect("a controller");
    let stopped = if led_by(&description, controller).is_empty() {
        (1..=3)
            .find(|id| !led_by(&description, *id).is_empty())
            .expect("some node leads a group")
    } else {
        controller
    };
    let led = led_by(&description, stopped);
    assert!(!led.is_empty());
    let exited = tokio::task::block_in_place(|| cluster.stop(stopped));
    assert!(exited, "node {stopped} exits cleanly on SIGTERM");

    // At once, no polling: a survivor already names other leaders for every group the stopped
    // node led, and another controller if it was the controller.
    let witness = (1..=3).find(|id| *id != stopped).expect("a survivor");
    let after = cluster.describe(witness).await.expect("describe");
    for (topic, partition) in &led {
        let placement = after
            .partitions
            .iter()
            .find(|p| p.topic == *topic && p.partition == *partition)
            .expect("still placed");
        assert!(
            placement.leader.is_some_and(|l| l != stopped),
            "{topic}/{partition} still led by the stopped node {stopped}: {placement:?}"
        );
    }
    if stopped == controller {
        assert!(
            after.controller.is_some_and(|c| c != stopped),
            "the controller's leadership stayed with the stopped node: {:?}",
            after.controller
        );
    }
    let log = cluster.logs(stopped);
    assert!(
        log.contains("handed off partition leaderships before stopping"),
        "{log}"
    );

    // The partitions take writes from their new leaders; the node rejoins.
    cluster.produce_keys(TOPIC, 30..40).await;
    cluster.restart(stopped);
    cluster.wait_serving(TIMEOUT).await;
}

/// Waits until every node's description has a leader for every replicated group and every
/// replica of it caught up (a caught-up follower is what a hand-off moves a leadership to).
async fn wait_all_caught_up(cluster: &Cluster) {
    for id in 1..=3 {
        cluster
            .wait_for_description(id, TIMEOUT, |d| {
                d.partitions
                    .iter()
                    .filter(|p| p.replicas.len() > 1)
                    .all(|p| p.leader.is_some() && p.caught_up.len() == p.replicas.len())
            })
            .await;
    }
}

/// Waits until the producers have been acknowledged on every partition; panics naming `when`
/// after [`PROGRESS_BOUND`].
async fn progress(produce: &KeyedProduce, when: impl std::fmt::Display) {
    if let Err(stuck) = produce.wait_progress(PARTITIONS, PROGRESS_BOUND).await {
        panic!("{when}: {stuck}");
    }
}

/// The rolling restart of the module doc: nodes 1, 2, 3 in turn, each stopped with SIGTERM,
/// the producers acknowledged on every partition while it is down, then started again and
/// waited for until every replica of every replicated group is caught up (the next stop's
/// hand-off needs a caught-up follower) and the producers are acknowledged everywhere again.
/// 14-23 s on 2 cores. It was seen to fail when a record is dropped from what is read back
/// (lost, handed to the group but not in the log, replicas diverged), with a 150 ms delivery
/// timeout (hundreds of deliveries failed beyond retries) and with a broker that does not cut
/// its partition log back to its last snapshot at start (the restarted node never catches up).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_load_when_every_node_is_restarted_in_turn_should_lose_nothing_and_fail_no_write() {
    let started = Instant::now();
    let mut cluster = Cluster::start_with_args(3, ROLLING_ARGS);
    cluster.create_replicated(1, ROLLED, PARTITIONS, 3).await;
    wait_all_caught_up(&cluster).await;
    let addresses = cluster.addresses();
    let produce = KeyedProduce::start(&addresses, ROLLED, ProduceConfig::default());
    let group = GroupWorkload::start(&addresses, GROUP, ROLLED, GroupConfig::default());
    progress(&produce, "before the restarts").await;

    let mut journal = Vec::new();
    for node in 1..=3 {
        let began = Instant::now();
        let exited = tokio::task::block_in_place(|| cluster.stop(node));
        assert!(exited, "node {node} exits cleanly on SIGTERM");
        let stopped_in = began.elapsed();
        // The two others take writes on every partition while it is down.
        progress(&produce, format!("node {node} stopped")).await;
        tokio::task::block_in_place(|| cluster.restart(node));
        cluster.wait_serving(TIMEOUT).await;
        wait_all_caught_up(&cluster).await;
        progress(&produce, format!("node {node} back and caught up")).await;
        journal.push(format!(
            "node {node}: stopped in {:.2} s, back and caught up after {:.2} s",
            stopped_in.as_secs_f64(),
            began.elapsed().as_secs_f64()
        ));
    }

    let produced = produce.stop().await;
    let mut problems = Vec::new();
    if let Err(missing) = group.wait_for(&produced.acknowledged, CATCH_UP_BOUND).await {
        problems.push(format!("the group did not catch up: {missing}"));
    }
    let readers = group.stop().await;
    let client = cluster.cluster_client().await;
    let log = read_topic(&client, ROLLED, PARTITIONS, CATCH_UP_BOUND)
        .await
        .unwrap_or_else(|e| panic!("reading {ROLLED} back: {e}"));
    drop(client);
    let description = cluster.describe(1).await.expect("describe");
    if !tokio::task::block_in_place(|| cluster.stop_all()) {
        problems.push("a node did not exit cleanly on SIGTERM at the end".into());
    }

    let mut violations: Vec<Violation> = Vec::new();
    violations.extend(check_acknowledged(&produced.acknowledged, &log));
    violations.extend(check_group(&readers.members, &produced.acknowledged, &log));
    for placement in description.partitions.iter().filter(|p| p.topic == ROLLED) {
        let partition = placement.partition;
        let (copies, unreadable) =
            cluster.replica_copies(ROLLED, partition, &placement.replicas, &log);
        problems.extend(unreadable);
        for violation in check_replicas(&copies) {
            problems.push(format!(
                "{ROLLED}/{partition} (copy 0: as served, then nodes {:?}): {violation:?}",
                placement.replicas
            ));
        }
    }
    let beyond_retries = produced.beyond_retries();
    eprintln!(
        "rolling restart in {:.1} s: {}\nproduce: {} sent, {} acknowledged, {} errors ({} beyond retries)\n\
         group: {} member incarnations, {} records handed, {} errors\nlog: {} records",
        started.elapsed().as_secs_f64(),
        journal.join("; "),
        produced.sent,
        produced.acknowledged.len(),
        produced.errors.len(),
        beyond_retries.len(),
        readers.members.len(),
        readers
            .members
            .iter()
            .map(|m| m.delivered.len())
            .sum::<usize>(),
        readers.errors.len(),
        log.len(),
    );
    for error in &produced.errors {
        eprintln!("  producer: {error}");
    }
    for error in &readers.errors {
        eprintln!("  group: {error}");
    }
    assert!(
        produced.acknowledged.len() >= 100,
        "the producers barely ran: {} acknowledged",
        produced.acknowledged.len()
    );
    assert!(
        beyond_retries.is_empty(),
        "{} producer errors beyond retries:\n{}",
        beyond_retries.len(),
        beyond_retries
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        violations.is_empty() && problems.is_empty(),
        "{} violations, {} problems:\n{violations:#?}\n{}",
        violations.len(),
        problems.len(),
        problems.join("\n")
    );
}
