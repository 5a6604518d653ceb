//! The cluster harness itself (tests/common/cluster.rs), on what a node does today: a cluster of
//! one named by `--cluster`, and independent nodes. A node keeps its port and data directory
//! over stop, kill -9 and restart; a refused start reports what the node said; dropping the
//! cluster ends every process.

mod common;

use std::time::Duration;

use common::cluster::Cluster;
use common::read_records;
use syncline_client::ProducerConfig;

/// Produces `count` records `{prefix}-{n}` to `topic` through node `id` and waits for each ack.
async fn produce(cluster: &Cluster, id: u64, topic: &str, prefix: &str, count: u32) {
    let producer = cluster
        .client(id)
        .await
        .producer(topic, ProducerConfig::default())
        .await
        .unwrap();
    for n in 0..count {
        let value = format!("{prefix}-{n}");
        producer
            .send(None, Some(value.as_bytes()), &[])
            .await
            .unwrap();
    }
    producer.close().await;
}

/// Every value of partition 0 of `topic` on node `id`, as text.
async fn values(cluster: &Cluster, id: u64, topic: &str) -> Vec<String> {
    let mut grpc = cluster.grpc(id).await;
    read_records(&mut grpc, topic, 0)
        .await
        .into_iter()
        .map(|r| String::from_utf8_lossy(&r.value.unwrap_or_default()).into_owned())
        .collect()
}

fn expected(prefix: &str, count: u32) -> Vec<String> {
    (0..count).map(|n| format!("{prefix}-{n}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_cluster_of_one_should_agree_on_itself_as_controller_at_its_address() {
    let mut cluster = Cluster::start(1);
    assert_eq!(
        cluster.wait_for_controller(Duration::from_secs(10)).await,
        1
    );
    // The node registers with the controller at its first heartbeat.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let description = loop {
        let description = cluster.describe(1).await.unwrap();
        if !description.nodes.is_empty() || tokio::time::Instant::now() > deadline {
            break description;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(description.nodes.len(), 1);
    assert_eq!(description.nodes[0].id, 1);
    assert_eq!(description.nodes[0].address, cluster.node(1).address());
    assert_eq!(cluster.addresses(), cluster.node(1).address());
    // The node was given the voter list naming itself.
    assert!(
        cluster
            .logs(1)
            .contains(&format!("--cluster 1={}", cluster.node(1).address())),
        "{}",
        cluster.logs(1)
    );

    let status = cluster.run_cli(1, &["cluster", "status", "--json"]);
    assert!(status.status.success(), "{status:?}");
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(json["controller"], 1);
    assert_eq!(
        json["nodes"][0]["address"],
        cluster.node(1).address().as_str()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_records_when_node_killed_9_and_restarted_should_read_them_back_at_the_same_address()
{
    let mut cluster = Cluster::start(1);
    let address = cluster.node(1).address();
    cluster.create_topic(1, "kept", 1).await;
    produce(&cluster, 1, "kept", "before", 100).await;
    let pid = cluster.node(1).pid().unwrap();

    cluster.kill(1);
    assert!(!cluster.is_running(1));
    assert!(!process_exists(pid), "kill reaps the process");
    cluster.restart(1);

    assert_eq!(cluster.node(1).address(), address);
    assert_ne!(cluster.node(1).pid(), Some(pid));
    assert_eq!(values(&cluster, 1, "kept").await, expected("before", 100));
    // The restarted node takes writes on top of the recovered log, once it leads again.
    cluster.wait_for_controller(Duration::from_secs(10)).await;
    produce(&cluster, 1, "kept", "after", 10).await;
    let mut all = expected("before", 100);
    all.extend(expected("after", 10));
    assert_eq!(values(&cluster, 1, "kept").await, all);
    assert_eq!(cluster.logs(1).matches("=== harness: start").count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_stopped_node_should_exit_cleanly_and_restart_with_its_data() {
    let mut cluster = Cluster::start(1);
    cluster.create_topic(1, "t", 1).await;
    produce(&cluster, 1, "t", "r", 20).await;
    assert!(cluster.stop(1), "SIGTERM ends the broker with status 0");
    assert!(cluster.running().is_empty());
    assert!(
        std::net::TcpStream::connect(cluster.node(1).address()).is_err(),
        "a stopped node's port is closed"
    );
    cluster.restart(1);
    assert_eq!(cluster.running(), vec![1]);
    assert_eq!(values(&cluster, 1, "t").await, expected("r", 20));
    assert!(cluster.node(1).metrics_address().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_refused_start_should_return_what_the_node_said_and_restart_with_its_own_flags() {
    let mut cluster = Cluster::start(1);
    assert!(cluster.stop(1));
    // The data directory belongs to node 1: starting it as node 2 is refused.
    let voters = format!("2={}", cluster.node(1).address());
    let refusal = cluster
        .try_start_with(1, &["--node-id", "2", "--cluster", &voters])
        .unwrap_err();
    assert!(refusal.contains("belongs to node 1"), "{refusal}");
    assert!(cluster.running().is_empty());
    // The extra flags were for that start only.
    cluster.restart(1);
    assert_eq!(
        cluster.wait_for_controller(Duration::from_secs(10)).await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_node_outside_the_voters_should_be_refused_and_full_restart_keep_the_rest() {
    let mut cluster = Cluster::start(1);
    cluster.create_topic(1, "t", 3).await;
    let placed = cluster
        .wait_for_description(1, Duration::from_secs(10), |d| {
            d.partitions.iter().filter(|p| p.topic == "t").count() == 3
        })
        .await;
    assert!(placed
        .partitions
        .iter()
        .filter(|p| p.topic == "t")
        .all(|p| p.leader == Some(1)));
    produce(&cluster, 1, "t", "r", 10).await;

    let outsider = cluster.add_node();
    assert_eq!(outsider, 2);
    assert_ne!(cluster.node(2).address(), cluster.node(1).address());
    // It is given the voters' list, which does not name it.
    let refusal = cluster.try_start_with(outsider, &[]).unwrap_err();
    assert!(refusal.contains("is not in the list"), "{refusal}");

    cluster.kill_all();
    assert!(cluster.running().is_empty());
    cluster.restart_all();
    assert_eq!(cluster.running(), vec![1], "only nodes that served restart");
    assert!(cluster.stop_all());
    cluster.restart_all();
    let mut grpc = cluster.grpc(1).await;
    let mut kept = 0;
    for partition in 0..3 {
        kept += read_records(&mut grpc, "t", partition).await.len();
    }
    assert_eq!(kept, 10);
    assert_eq!(
        cluster.wait_for_controller(Duration::from_secs(10)).await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_independent_nodes_should_keep_separate_data_and_survive_each_others_kill() {
    let mut cluster = Cluster::start_independent(3);
    let addresses: Vec<String> = (1..=3).map(|id| cluster.node(id).address()).collect();
    assert_eq!(cluster.addresses(), addresses.join(","));
    assert!(addresses[0] != addresses[1] && addresses[1] != addresses[2]);
    for id in 1..=3 {
        let description = cluster.describe(id).await.unwrap();
        assert_eq!(description.controller, Some(id), "each is its own cluster");
    }

    cluster.create_topic(1, "only-on-1", 1).await;
    produce(&cluster, 1, "only-on-1", "x", 5).await;
    let on_2 = cluster.client(2).await.list_topics().await.unwrap();
    assert!(on_2.iter().all(|t| t.name != "only-on-1"), "{on_2:?}");

    cluster.kill(1);
    assert_eq!(cluster.running(), vec![2, 3]);
    let on_3 = cluster.run_cli(3, &["topic", "list"]);
    assert!(on_3.status.success(), "{on_3:?}");
    cluster.restart(1);
    assert_eq!(values(&cluster, 1, "only-on-1").await, expected("x", 5));
}

#[test]
fn given_running_nodes_when_cluster_dropped_should_end_every_process() {
    let cluster = Cluster::start_independent(2);
    let pids: Vec<u32> = (1..=2).map(|id| cluster.node(id).pid().unwrap()).collect();
    let root = cluster.root().to_path_buf();
    assert!(root.join("node-2").join("broker.log").exists());
    drop(cluster);
    for pid in pids {
        assert!(!process_exists(pid), "process {pid} outlived the cluster");
    }
    assert!(!root.exists(), "the cluster's directory is deleted");
}

/// Whether a process `pid` exists (a reaped child does not).
fn process_exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[should_panic(expected = "did not agree on a controller")]
async fn given_nodes_naming_different_controllers_wait_for_controller_should_give_up() {
    // Independent nodes each name themselves.
    let mut cluster = Cluster::start_independent(2);
    cluster
        .wait_for_controller(Duration::from_millis(500))
        .await;
}
