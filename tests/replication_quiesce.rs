//! Quiescence of idle partition groups on three real nodes (issue 15, "many partitions per
//! node"): once writes stop, every group's ticks go off on every node (no heartbeats, no
//! election timers) and stay off without a single election; a write wakes its group and is
//! acknowledged; a killed leader of quiet groups is replaced (followers notice its pings
//! stopped) and the cluster takes writes again; the restarted node's groups quiesce too.

mod common;

use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::{cluster_sum, gauge};

/// Generous: elections take about a second, CI machines are slow and shared.
const TIMEOUT: Duration = Duration::from_secs(30);
const TOPIC: &str = "quiet";
const PARTITIONS: u32 = 3;

/// `(groups, quiet groups)` of every running node.
fn quiet_counts(cluster: &mut Cluster) -> Vec<(u64, f64, f64)> {
    cluster
        .running()
        .into_iter()
        .map(|id| {
            let text = common::scrape(cluster.node(id).metrics_address().expect("metrics"));
            (
                id,
                gauge(&text, "syncline_replication_groups").unwrap_or(-1.0),
                gauge(&text, "syncline_replication_groups_quiet").unwrap_or(-1.0),
            )
        })
        .collect()
}

/// Waits until every running node has all its groups quiet (and at least `groups_min`).
async fn wait_all_quiet(cluster: &mut Cluster, groups_min: f64) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let counts = quiet_counts(cluster);
        if counts
            .iter()
            .all(|(_, groups, quiet)| *groups >= groups_min && quiet == groups)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "groups not all quiet within {TIMEOUT:?}: (node, groups, quiet) {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_groups_should_quiesce_wake_on_writes_and_fail_over_when_their_leader_dies() {
    let mut cluster = Cluster::start_with_args(3, &["--default-replication-factor", "3"]);
    cluster.create_replicated(1, TOPIC, PARTITIONS, 3).await;
    cluster.produce_keys(TOPIC, 0..30).await;

    // Idle: every group of every node quiet, and no election while it stays so.
    wait_all_quiet(&mut cluster, f64::from(PARTITIONS)).await;
    let won = cluster_sum(&mut cluster, "syncline_replication_leaderships_won_total");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        cluster_sum(&mut cluster, "syncline_replication_leaderships_won_total"),
        won,
        "a leader changed in an idle cluster"
    );
    let counts = quiet_counts(&mut cluster);
    assert!(
        counts.iter().all(|(_, groups, quiet)| quiet == groups),
        "{counts:?}"
    );

    // A write wakes its group and is acknowledged; the groups quiesce again.
    cluster.produce_keys(TOPIC, 30..60).await;
    assert!(cluster_sum(&mut cluster, "syncline_replication_group_wakes_total") >= 1.0);
    assert_eq!(
        cluster_sum(&mut cluster, "syncline_replication_leaderships_won_total"),
        won,
        "waking a group changed its leader"
    );
    wait_all_quiet(&mut cluster, f64::from(PARTITIONS)).await;

    // The leader of a quiet partition dies: its followers elect a new one, writes go on.
    let description = cluster.describe(2).await.unwrap();
    let victim = description
        .partitions
        .iter()
        .find(|p| p.topic == TOPIC && p.partition == 0)
        .and_then(|p| p.leader)
        .expect("partition 0 has a leader");
    cluster.kill(victim);
    cluster.produce_keys(TOPIC, 60..90).await;
    let survivor = (1..=3).find(|id| *id != victim).unwrap();
    cluster
        .wait_for_description(survivor, TIMEOUT, |d| {
            d.partitions.iter().any(|p| {
                p.topic == TOPIC && p.partition == 0 && p.leader.is_some_and(|l| l != victim)
            })
        })
        .await;

    // Back: the restarted node's groups follow quiet leaders without elections of their own.
    cluster.restart(victim);
    cluster.produce_keys(TOPIC, 90..120).await;
    wait_all_quiet(&mut cluster, f64::from(PARTITIONS)).await;
    let mut client = cluster.grpc(survivor).await;
    let topic = client
        .describe_topic(syncline_proto::v1::DescribeTopicRequest { name: TOPIC.into() })
        .await
        .unwrap()
        .into_inner()
        .topic
        .unwrap();
    let records: u64 = topic.partitions.iter().map(|p| p.log_end_offset).sum();
    assert_eq!(records, 120, "{topic:?}");
}
