//! A node's identity through the real binary (issue 14, first step): the data directory records
//! its node id and cluster at the first start and refuses to start as another node or against
//! another cluster; node settings that contradict each other are refused with the key named;
//! `syncline cluster status [--json]` describes the cluster of one.

mod common;

use common::{run_broker, BrokerProcess};

fn stderr_of(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn given_data_dir_of_node_1_when_started_as_node_2_should_refuse_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    assert!(broker.stop());
    let identity = std::fs::read_to_string(dir.path().join("node.toml")).unwrap();
    assert!(identity.contains("node_id = 1"), "{identity}");
    assert!(identity.contains("cluster_id = \""), "{identity}");

    let output = run_broker(
        dir.path(),
        &[
            "--node-id",
            "2",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    );
    let stderr = stderr_of(&output);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("belongs to node 1 of cluster")
            && stderr.contains("started as node 2")
            && stderr.contains("--node-id 1"),
        "{stderr}"
    );
    assert!(!stderr.contains("listening on"), "{stderr}");
    // The recorded node starts as before.
    let broker = BrokerProcess::start(dir.path());
    assert!(broker.stop());
}

#[test]
fn given_contradicting_node_settings_should_refuse_to_start_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = ["--metrics-listen", "127.0.0.1:0"];
    for (args, expected) in [
        (
            vec!["--listen", "0.0.0.0:0", "--insecure-allow-remote"],
            "invalid value for `advertise`: the broker listens on 0.0.0.0:0",
        ),
        (
            vec!["--listen", "127.0.0.1:0", "--node-id", "0"],
            "invalid value for `node_id`: 0 is outside",
        ),
        (
            vec!["--listen", "127.0.0.1:7", "--cluster", "2=127.0.0.1:7"],
            "is not in the list",
        ),
        (
            vec!["--listen", "127.0.0.1:7", "--cluster", "1=127.0.0.1:8"],
            "this node advertises 127.0.0.1:7",
        ),
        (
            vec![
                "--listen",
                "127.0.0.1:7",
                "--cluster",
                "1=127.0.0.1:7,1=127.0.0.1:9",
            ],
            "node id 1 appears twice",
        ),
    ] {
        let mut all = args.clone();
        all.extend(metrics);
        let output = run_broker(dir.path(), &all);
        let stderr = stderr_of(&output);
        assert!(!output.status.success(), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert_eq!(stderr.matches("error:").count(), 1, "{stderr}");
    }
    // Nothing was recorded by the refused starts.
    assert!(!dir.path().join("node.toml").exists());
}

#[test]
fn given_listen_on_all_addresses_with_advertise_should_start() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start_with(
        dir.path(),
        &[
            "--listen",
            "0.0.0.0:0",
            "--advertise",
            "broker-1.example:7450",
            "--insecure-allow-remote",
        ],
    );
    assert!(broker.stop());
    let identity = std::fs::read_to_string(dir.path().join("node.toml")).unwrap();
    assert!(
        identity.contains("voters = \"1=broker-1.example:7450\""),
        "{identity}"
    );
}

/// `syncline cluster status [--json]` (issue 14's contract) on a cluster of one: the node,
/// itself as controller, and every partition (internal ones included) led and held by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_cluster_of_one_when_status_is_asked_should_describe_it_in_json_and_tables() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    let syncline = |args: &[&str]| {
        let output = std::process::Command::new(common::binary("syncline"))
            .args(["--broker", &broker.addr])
            .args(args)
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", stderr_of(&output));
        String::from_utf8(output.stdout).unwrap()
    };
    syncline(&["topic", "create", "t", "--partitions", "3"]);
    let identity = std::fs::read_to_string(dir.path().join("node.toml")).unwrap();
    let cluster_id = identity
        .lines()
        .find_map(|line| line.strip_prefix("cluster_id = "))
        .unwrap()
        .trim_matches('"')
        .to_string();

    let json: serde_json::Value = serde_json::from_str(&syncline(&["cluster", "status", "--json"]))
        .expect("exactly one JSON object");
    let mut partitions = vec![serde_json::json!({
        "topic": "__offsets", "partition": 0, "leader": 1, "replicas": [1], "caught_up": [1]
    })];
    for p in 0..3 {
        partitions.push(serde_json::json!({
            "topic": "t", "partition": p, "leader": 1, "replicas": [1], "caught_up": [1]
        }));
    }
    assert_eq!(
        json,
        serde_json::json!({
            "cluster_id": cluster_id,
            "controller": 1,
            "nodes": [{"id": 1, "address": broker.addr, "alive": true}],
            "partitions": partitions,
        })
    );

    let text = syncline(&["cluster", "status"]);
    assert!(
        text.starts_with(&format!(
            "cluster: {cluster_id}\ncontroller: 1\n\nNODE  ADDRESS"
        )),
        "{text}"
    );
    assert!(
        text.contains("TOPIC      PARTITION  LEADER  REPLICAS  CAUGHT-UP"),
        "{text}"
    );
    assert!(broker.stop());
}

/// Issue 14: `topic create --replication-factor R` (and the CreateTopic field) is accepted as 1;
/// above 1 it is FAILED_PRECONDITION with a clear message until replicated partitions exist
/// (a cluster of one cannot place more replicas than nodes); 0 is INVALID_ARGUMENT. A refused
/// create leaves no topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_replication_factor_above_one_should_refuse_and_create_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    let create = |name: &str, factor: &str| {
        std::process::Command::new(common::binary("syncline"))
            .args(["--broker", &broker.addr, "topic", "create", name])
            .args(["--replication-factor", factor])
            .output()
            .unwrap()
    };
    assert!(create("one", "1").status.success());
    let refused = create("three", "3");
    let stderr = stderr_of(&refused);
    assert!(!refused.status.success(), "{stderr}");
    assert!(
        stderr.starts_with("error: ")
            && stderr.contains("replication factor 3 needs 3 nodes")
            && stderr.contains("create the topic with replication factor 1"),
        "{stderr}"
    );

    let mut client = broker.client().await;
    let status = client
        .create_topic(syncline_proto::v1::CreateTopicRequest {
            name: "three".into(),
            config: Some(syncline_proto::v1::TopicConfig {
                replication_factor: Some(3),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    let zero = client
        .create_topic(syncline_proto::v1::CreateTopicRequest {
            name: "zero".into(),
            config: Some(syncline_proto::v1::TopicConfig {
                replication_factor: Some(0),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(zero.code(), tonic::Code::InvalidArgument);
    let names: Vec<String> = client
        .list_topics(syncline_proto::v1::ListTopicsRequest {})
        .await
        .unwrap()
        .into_inner()
        .topics
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names, vec!["one".to_string()]);
    assert!(broker.stop());
}
