//! Operating a cluster (issue 16) through real processes.
//!
//! - A node stopped with SIGTERM hands its partition leaderships and the controller's to other
//!   nodes before it exits, so a rolling restart waits for no election timeout: right after
//!   it exits, the surviving nodes already name other leaders (without the hand-off they
//!   would name the stopped node until their election timers ran out, 250-500 ms later).

mod common;

use std::time::Duration;

use common::cluster::Cluster;
use syncline_client::ClusterDescription;

/// Generous: CI machines are slow and shared.
const TIMEOUT: Duration = Duration::from_secs(30);
const TOPIC: &str = "operated";
const PARTITIONS: u32 = 3;

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
