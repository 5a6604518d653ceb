//! Replication status of replicated partitions on three real nodes (issue 15): DescribeCluster
//! and `syncline cluster status` list every replica caught up after writes; a killed follower
//! drops out of the caught-up replicas (and its leaders count the partitions under-replicated
//! and the follower's lag) and is back after its restart; after a leader is killed the new
//! leader's view is reported; DescribeTopic describes the leader's log wherever the call lands.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::cluster::Cluster;
use common::cluster_sum;
use syncline_client::ClusterDescription;
use syncline_proto::v1;

/// Generous: elections take about a second, CI machines are slow and shared.
const TIMEOUT: Duration = Duration::from_secs(30);
const TOPIC: &str = "replicated";
const PARTITIONS: u32 = 3;
/// A topic with two replicas: one node holds none of a partition.
const PAIR: &str = "pair";

fn placements(
    description: &ClusterDescription,
) -> impl Iterator<Item = &syncline_client::PartitionPlacement> {
    description.partitions.iter().filter(|p| p.topic == TOPIC)
}

/// True when `TOPIC`'s partitions are all placed and each lists exactly `want(replicas)` as
/// caught up.
fn caught_up_as(description: &ClusterDescription, want: impl Fn(&[u64]) -> Vec<u64>) -> bool {
    placements(description).count() == PARTITIONS as usize
        && placements(description).all(|p| p.leader.is_some() && caught_up_is(p, &want))
}

/// True when `p` lists exactly `want(replicas)` as caught up (in any order).
fn caught_up_is(
    p: &syncline_client::PartitionPlacement,
    want: &impl Fn(&[u64]) -> Vec<u64>,
) -> bool {
    p.caught_up.iter().collect::<BTreeSet<_>>() == want(&p.replicas).iter().collect::<BTreeSet<_>>()
}

/// DescribeTopic of `topic` through every node gives the same start, durable and end offsets,
/// all `records` committed (durable = end), and no partition in error.
async fn assert_described_alike(cluster: &Cluster, topic: &str, records: u64) {
    let mut seen = Vec::new();
    for id in 1..=3 {
        let mut grpc = cluster.grpc(id).await;
        let description = grpc
            .describe_topic(v1::DescribeTopicRequest { name: topic.into() })
            .await
            .unwrap()
            .into_inner()
            .topic
            .unwrap();
        for p in &description.partitions {
            assert!(p.error.is_empty(), "{topic} through node {id}: {p:?}");
            assert_eq!(p.durable_offset, p.log_end_offset, "node {id}: {p:?}");
        }
        let ends: Vec<(u64, u64, u64)> = description
            .partitions
            .iter()
            .map(|p| (p.log_start_offset, p.durable_offset, p.log_end_offset))
            .collect();
        assert_eq!(ends.iter().map(|e| e.2).sum::<u64>(), records, "node {id}");
        seen.push(ends);
    }
    assert!(seen.windows(2).all(|w| w[0] == w[1]), "{topic}: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_replicated_partitions_should_report_caught_up_replicas_and_follow_a_killed_follower()
{
    let mut cluster = Cluster::start(3);
    cluster.create_replicated(1, TOPIC, PARTITIONS, 3).await;
    cluster.produce_keys(TOPIC, 0..60).await;

    // Every replica caught up, as any node reports it.
    let healthy = |p: &[u64]| p.to_vec();
    for id in 1..=3 {
        cluster
            .wait_for_description(id, TIMEOUT, |d| caught_up_as(d, healthy))
            .await;
    }
    let output = cluster.run_cli(2, &["cluster", "status"]);
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8_lossy(&output.stdout);
    let rows: Vec<&str> = text.lines().filter(|l| l.starts_with(TOPIC)).collect();
    assert_eq!(rows.len(), PARTITIONS as usize, "{text}");
    for row in &rows {
        let columns: Vec<&str> = row.split_whitespace().collect();
        let as_set = |s: &str| s.split(',').map(String::from).collect::<BTreeSet<_>>();
        assert_eq!(as_set(columns[3]), as_set(columns[4]), "{text}");
    }
    let output = cluster.run_cli(3, &["cluster", "status", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let replicated: Vec<&serde_json::Value> = json["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["topic"] == TOPIC)
        .collect();
    assert!(
        replicated
            .iter()
            .all(|p| p["caught_up"].as_array().unwrap().len() == 3),
        "{json}"
    );
    // Every group led exactly once and none under-replicated. The `__offsets` groups may
    // still be electing right after startup (a node counts a group it leads only once it
    // has won), so the sums are awaited rather than sampled once.
    let expected_led = PARTITIONS + offsets_led(&cluster).await;
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let led = cluster_sum(&mut cluster, "syncline_replication_partitions_led") as u32;
        let under = cluster_sum(
            &mut cluster,
            "syncline_replication_under_replicated_partitions",
        );
        if led == expected_led && under == 0.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "partitions led {led} (want {expected_led}), under-replicated {under} (want 0)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let won = cluster_sum(&mut cluster, "syncline_replication_leaderships_won_total");
    let elections = cluster_sum(&mut cluster, "syncline_replication_elections_total");
    assert!(won >= f64::from(PARTITIONS), "leaderships won: {won}");
    assert!(
        elections >= won,
        "elections {elections} < leaderships {won}"
    );
    let commits = cluster_sum(
        &mut cluster,
        "syncline_replication_commit_duration_seconds_count",
    );
    assert!(commits >= 1.0, "commit latencies recorded: {commits}");
    // A follower's replica is its leader's to report, not a fenced partition here.
    for id in 1..=3 {
        let text = common::scrape(cluster.node(id).metrics_address().unwrap());
        let fenced: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("syncline_partition_fenced{") && !l.ends_with(" 0"))
            .collect();
        assert!(fenced.is_empty(), "node {id}: {fenced:?}");
    }

    // DescribeTopic through every node (each a replica) describes the leaders' logs.
    assert_described_alike(&cluster, TOPIC, 60).await;
    // And through a node holding no replica (two replicas of three nodes).
    cluster.create_replicated(1, PAIR, PARTITIONS, 2).await;
    cluster.produce_keys(PAIR, 0..40).await;
    assert_described_alike(&cluster, PAIR, 40).await;

    // Kill a node that leads none of the topic's partitions if there is one, else any
    // follower of partition 0: it drops out of every caught-up list once its leaders stop
    // hearing from it, and the topic still takes writes.
    let description = cluster.describe(1).await.unwrap();
    let leaders: BTreeSet<u64> = placements(&description).filter_map(|p| p.leader).collect();
    let victim = (1..=3).find(|id| !leaders.contains(id)).unwrap_or_else(|| {
        let p0 = placements(&description).next().unwrap();
        *p0.replicas.iter().find(|r| Some(**r) != p0.leader).unwrap()
    });
    let witness = (1..=3).find(|id| *id != victim).unwrap();
    cluster.kill(victim);
    cluster.produce_keys(TOPIC, 0..30).await;
    let without = move |p: &[u64]| p.iter().copied().filter(|r| *r != victim).collect();
    cluster
        .wait_for_description(witness, TIMEOUT, |d| {
            placements(d)
                .filter(|p| p.leader != Some(victim))
                .all(|p| !p.caught_up.contains(&victim))
                && placements(d).any(|p| p.leader != Some(victim) && caught_up_is(p, &without))
        })
        .await;
    let under = cluster_sum(
        &mut cluster,
        "syncline_replication_under_replicated_partitions",
    );
    assert!(under >= 1.0, "under-replicated partitions: {under}");
    let lagging = cluster
        .running()
        .into_iter()
        .filter_map(|id| cluster.node(id).metrics_address().map(common::scrape))
        .any(|text| {
            text.lines().any(|l| {
                l.starts_with(&format!(
                    "syncline_replication_follower_lag_seconds{{follower=\"{victim}\"}} "
                )) && l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) > Some(0.0)
            })
        });
    assert!(lagging, "no leader reports node {victim} lagging");

    // Back after its restart: caught up again everywhere.
    cluster.restart(victim);
    for id in 1..=3 {
        cluster
            .wait_for_description(id, TIMEOUT, |d| caught_up_as(d, healthy))
            .await;
    }

    // A killed leader: once a new one is elected, the caught-up replicas are the new leader's
    // view, without the old leader, asked through any surviving node.
    let description = cluster.describe(1).await.unwrap();
    let p0 = placements(&description).next().unwrap().clone();
    let old = p0.leader.unwrap();
    cluster.kill(old);
    cluster.produce_keys(TOPIC, 0..30).await;
    let witness = (1..=3).find(|id| *id != old).unwrap();
    let without_old = move |p: &[u64]| p.iter().copied().filter(|r| *r != old).collect();
    cluster
        .wait_for_description(witness, TIMEOUT, |d| {
            placements(d).any(|p| {
                p.partition == p0.partition
                    && p.leader.is_some_and(|l| l != old)
                    && caught_up_is(p, &without_old)
            })
        })
        .await;
}

/// The `__offsets` partitions that are replicated (they are Raft groups too, led somewhere).
async fn offsets_led(cluster: &Cluster) -> u32 {
    let description = cluster.describe(1).await.unwrap();
    description
        .partitions
        .iter()
        .filter(|p| p.topic == "__offsets" && p.replicas.len() > 1)
        .count() as u32
}
