//! Authorization (issue 17) through the real broker binary, over gRPC with bearer tokens.
//!
//! - Every RPC of `syncline.v1.Broker` is in the table below with the permissions it needs;
//!   the table is checked against the service's descriptor, so an RPC added without an entry
//!   (and so, likely, without a check) fails the test. For each: a principal with no ACL gets
//!   PERMISSION_DENIED naming the operation and the resource (or, for the calls any
//!   authenticated principal may make, is served); the same principal granted exactly the
//!   listed permissions is not refused for permission.
//! - A refused DeleteTopic deletes nothing; a refused CreateTopic creates nothing.
//! - Listings (ListTopics, ListGroups, DescribeCluster) show only what the principal may
//!   describe.
//! - ACLs of a cluster of one survive a restart; prefix ACLs and deny-over-allow hold through
//!   the CLI.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::BrokerProcess;
use prost::Message as _;
use syncline_client::{v1, Acl, AclResource, Client, ClientConfig, Code, Grpc};

fn sha256_hex(token: &str) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A broker whose tokens are `<principal>-token` for admin (a superuser), nobody and granted.
fn start(data: &Path, tokens: &Path) -> BrokerProcess {
    let mut text = String::new();
    for principal in ["admin", "nobody", "granted"] {
        text.push_str(&format!(
            "[[token]]\nprincipal = \"{principal}\"\nsha256 = \"{}\"\n",
            sha256_hex(&format!("{principal}-token"))
        ));
    }
    std::fs::write(tokens, text).unwrap();
    BrokerProcess::start_with(
        data,
        &[
            "--auth-tokens-file",
            tokens.to_str().unwrap(),
            "--superusers",
            "admin",
        ],
    )
}

async fn client(broker: &BrokerProcess, principal: &str) -> Client {
    let config = ClientConfig::default()
        .with_token(&format!("{principal}-token"))
        .unwrap();
    Client::connect_with(&broker.addr, config).await.unwrap()
}

/// What a table row needs: `(operation, resource)`.
#[derive(Debug, Clone, Copy)]
enum On {
    Topic(&'static str),
    Group(&'static str),
    Cluster,
}

fn acl(principal: &str, operation: &str, on: On) -> Acl {
    Acl {
        principal: principal.into(),
        deny: false,
        operation: operation.into(),
        resource: match on {
            On::Topic(name) => AclResource::Topic(name.into()),
            On::Group(name) => AclResource::Group(name.into()),
            On::Cluster => AclResource::Cluster,
        },
    }
}

const TOPIC: &str = "orders";
const GROUP: &str = "billing";

/// Every RPC and what it needs (empty: any authenticated principal).
fn table() -> Vec<(&'static str, Vec<(&'static str, On)>)> {
    let t = On::Topic(TOPIC);
    let g = On::Group(GROUP);
    vec![
        ("CreateTopic", vec![("create", On::Topic("fresh"))]),
        ("DeleteTopic", vec![("delete", t)]),
        ("ListTopics", vec![]),
        ("DescribeCluster", vec![]),
        ("DescribeTopic", vec![("describe", t)]),
        ("Produce", vec![("write", t)]),
        ("ProduceStream", vec![("write", t)]),
        ("Fetch", vec![("read", t)]),
        ("Subscribe", vec![("read", t)]),
        ("ListOffsets", vec![("describe", t)]),
        ("InitProducer", vec![]),
        ("Get", vec![("read", t)]),
        ("History", vec![("read", t)]),
        ("Snapshot", vec![("read", t)]),
        ("CompactTopic", vec![("alter", t)]),
        ("JoinGroup", vec![("group-read", g), ("read", t)]),
        ("Heartbeat", vec![("group-read", g)]),
        ("LeaveGroup", vec![("group-read", g)]),
        ("CommitOffsets", vec![("group-read", g), ("read", t)]),
        ("FetchOffsets", vec![("group-read", g)]),
        ("ListGroups", vec![]),
        ("DescribeGroup", vec![("describe", g)]),
        ("FindCoordinator", vec![]),
        ("ReassignPartition", vec![("cluster-admin", On::Cluster)]),
        ("Rebalance", vec![("cluster-admin", On::Cluster)]),
        ("AddNode", vec![("cluster-admin", On::Cluster)]),
        ("RemoveNode", vec![("cluster-admin", On::Cluster)]),
        ("SetVoters", vec![("cluster-admin", On::Cluster)]),
        ("AddAcls", vec![("cluster-admin", On::Cluster)]),
        ("RemoveAcls", vec![("cluster-admin", On::Cluster)]),
        ("ListAcls", vec![("cluster-admin", On::Cluster)]),
    ]
}

/// The Broker service's methods, from its descriptor.
fn methods() -> BTreeSet<String> {
    let set = prost_types::FileDescriptorSet::decode(v1::FILE_DESCRIPTOR_SET).unwrap();
    set.file
        .iter()
        .flat_map(|f| f.service.iter())
        .filter(|s| s.name() == "Broker")
        .flat_map(|s| s.method.iter().map(|m| m.name().to_string()))
        .collect()
}

fn outcome<T>(result: Result<tonic::Response<T>, tonic::Status>) -> (Code, String) {
    match result {
        Ok(_) => (Code::Ok, String::new()),
        Err(status) => (status.code(), status.message().to_string()),
    }
}

/// Calls `rpc` with a request naming [`TOPIC`] / [`GROUP`] (or a fresh topic for creation).
async fn call(mut grpc: Grpc, rpc: &str) -> (Code, String) {
    let topic = || TOPIC.to_string();
    let group = || GROUP.to_string();
    match rpc {
        "CreateTopic" => outcome(
            grpc.create_topic(v1::CreateTopicRequest {
                name: "fresh".into(),
                config: None,
            })
            .await,
        ),
        "DeleteTopic" => outcome(
            grpc.delete_topic(v1::DeleteTopicRequest { name: topic() })
                .await,
        ),
        "ListTopics" => outcome(grpc.list_topics(v1::ListTopicsRequest {}).await),
        "DescribeCluster" => outcome(
            grpc.describe_cluster(v1::DescribeClusterRequest::default())
                .await,
        ),
        "DescribeTopic" => outcome(
            grpc.describe_topic(v1::DescribeTopicRequest { name: topic() })
                .await,
        ),
        "Produce" => outcome(
            grpc.produce(v1::ProduceRequest {
                topic: topic(),
                ..Default::default()
            })
            .await,
        ),
        "ProduceStream" => {
            let request = v1::ProduceRequest {
                topic: topic(),
                ..Default::default()
            };
            match grpc.produce_stream(tokio_stream::iter(vec![request])).await {
                Err(status) => (status.code(), status.message().to_string()),
                Ok(response) => {
                    let mut stream = response.into_inner();
                    match stream.message().await {
                        Ok(Some(v1::ProduceResponse {
                            error: Some(error), ..
                        })) => (Code::from_i32(error.code), error.message),
                        Ok(_) => (Code::Ok, String::new()),
                        Err(status) => (status.code(), status.message().to_string()),
                    }
                }
            }
        }
        "Fetch" => outcome(
            grpc.fetch(v1::FetchRequest {
                topic: topic(),
                ..Default::default()
            })
            .await,
        ),
        "Subscribe" => outcome(
            grpc.subscribe(v1::SubscribeRequest {
                topic: topic(),
                ..Default::default()
            })
            .await,
        ),
        "ListOffsets" => outcome(
            grpc.list_offsets(v1::ListOffsetsRequest {
                topic: topic(),
                ..Default::default()
            })
            .await,
        ),
        "InitProducer" => outcome(grpc.init_producer(v1::InitProducerRequest::default()).await),
        "Get" => outcome(
            grpc.get(v1::GetRequest {
                topic: topic(),
                key: b"k".to_vec().into(),
            })
            .await,
        ),
        "History" => outcome(
            grpc.history(v1::HistoryRequest {
                topic: topic(),
                key: b"k".to_vec().into(),
                limit: None,
            })
            .await,
        ),
        "Snapshot" => outcome(
            grpc.snapshot(v1::SnapshotRequest {
                topic: topic(),
                ..Default::default()
            })
            .await,
        ),
        "CompactTopic" => outcome(
            grpc.compact_topic(v1::CompactTopicRequest {
                name: topic(),
                ..Default::default()
            })
            .await,
        ),
        "JoinGroup" => outcome(
            grpc.join_group(v1::JoinGroupRequest {
                group: group(),
                topics: vec![topic()],
                ..Default::default()
            })
            .await,
        ),
        "Heartbeat" => outcome(
            grpc.heartbeat(v1::HeartbeatRequest {
                group: group(),
                member_id: "m".into(),
                ..Default::default()
            })
            .await,
        ),
        "LeaveGroup" => outcome(
            grpc.leave_group(v1::LeaveGroupRequest {
                group: group(),
                member_id: "m".into(),
                member_epoch: 0,
            })
            .await,
        ),
        "CommitOffsets" => outcome(
            grpc.commit_offsets(v1::CommitOffsetsRequest {
                group: group(),
                offsets: vec![v1::OffsetCommit {
                    topic: topic(),
                    partition: 0,
                    offset: 0,
                    ..Default::default()
                }],
                ..Default::default()
            })
            .await,
        ),
        "FetchOffsets" => outcome(
            grpc.fetch_offsets(v1::FetchOffsetsRequest {
                group: group(),
                partitions: Vec::new(),
            })
            .await,
        ),
        "ListGroups" => outcome(grpc.list_groups(v1::ListGroupsRequest {}).await),
        "DescribeGroup" => outcome(
            grpc.describe_group(v1::DescribeGroupRequest { group: group() })
                .await,
        ),
        "FindCoordinator" => outcome(
            grpc.find_coordinator(v1::FindCoordinatorRequest { group: group() })
                .await,
        ),
        "ReassignPartition" => outcome(
            grpc.reassign_partition(v1::ReassignPartitionRequest {
                topic: topic(),
                partition: 0,
                replicas: vec![1],
                throttle_bytes_per_sec: None,
            })
            .await,
        ),
        "Rebalance" => outcome(grpc.rebalance(v1::RebalanceRequest::default()).await),
        "AddNode" => outcome(
            grpc.add_node(v1::AddNodeRequest {
                node_id: 9,
                address: "127.0.0.1:1".into(),
                ..Default::default()
            })
            .await,
        ),
        "RemoveNode" => outcome(
            grpc.remove_node(v1::RemoveNodeRequest {
                node_id: 9,
                ..Default::default()
            })
            .await,
        ),
        "SetVoters" => outcome(
            grpc.set_voters(v1::SetVotersRequest { voters: vec![1] })
                .await,
        ),
        "AddAcls" | "RemoveAcls" => {
            let acls = vec![v1::Acl {
                principal: "someone".into(),
                operation: "read".into(),
                resource_type: "topic".into(),
                resource_name: "x".into(),
                ..Default::default()
            }];
            if rpc == "AddAcls" {
                outcome(grpc.add_acls(v1::AddAclsRequest { acls }).await)
            } else {
                outcome(grpc.remove_acls(v1::RemoveAclsRequest { acls }).await)
            }
        }
        "ListAcls" => outcome(grpc.list_acls(v1::ListAclsRequest::default()).await),
        other => panic!("no call for {other}: add it to `call` and `table`"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_should_need_its_permission_and_refused_calls_should_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(&dir.path().join("data"), &dir.path().join("tokens.toml"));
    let admin = client(&broker, "admin").await;
    let nobody = client(&broker, "nobody").await;
    let granted = client(&broker, "granted").await;
    admin
        .create_topic(
            TOPIC,
            syncline_client::TopicConfig {
                cleanup_policy: syncline_client::CleanupPolicy::Compact,
                ..syncline_client::TopicConfig::with_partitions(1)
            },
        )
        .await
        .unwrap();

    let table = table();
    let listed: BTreeSet<String> = table.iter().map(|(rpc, _)| rpc.to_string()).collect();
    assert_eq!(
        listed,
        methods(),
        "the table must list every RPC of the Broker service with the permission it needs"
    );

    for (rpc, needs) in &table {
        let (code, message) = call(nobody.grpc(), rpc).await;
        if needs.is_empty() {
            assert_ne!(
                code,
                Code::PermissionDenied,
                "{rpc} is open to any authenticated principal: {message}"
            );
        } else {
            assert_eq!(
                code,
                Code::PermissionDenied,
                "{rpc} without an ACL: {message}"
            );
            let (operation, _) = needs[0];
            assert!(
                message.contains("`nobody`") && message.contains(operation),
                "{rpc}: the refusal names the principal and the operation: {message}"
            );
        }

        // A refused call changed nothing: the topic is there, `fresh` was not created.
        if matches!(*rpc, "CreateTopic" | "DeleteTopic") {
            let topics: Vec<String> = admin
                .list_topics()
                .await
                .unwrap()
                .into_iter()
                .map(|t| t.name)
                .collect();
            let expected = *rpc == "DeleteTopic" || !topics.contains(&"fresh".to_string());
            assert!(
                topics.contains(&TOPIC.to_string()) && expected,
                "after a refused {rpc}: {topics:?}"
            );
        }

        // Exactly what the table lists is enough.
        let grants: Vec<Acl> = needs
            .iter()
            .map(|(operation, on)| acl("granted", operation, *on))
            .collect();
        if !grants.is_empty() {
            admin.add_acls(&grants).await.unwrap();
        }
        // DeleteTopic granted would delete the topic the other rows use: it runs last below.
        if *rpc != "DeleteTopic" {
            let (code, message) = call(granted.grpc(), rpc).await;
            assert_ne!(
                code,
                Code::PermissionDenied,
                "{rpc} with {needs:?} granted: {message}"
            );
        }
        if !grants.is_empty() {
            admin.remove_acls(&grants).await.unwrap();
        }
    }

    // Re-initialising a producer id (which fences its holder) is for administrators.
    let status = nobody
        .grpc()
        .init_producer(v1::InitProducerRequest { producer_id: 1 })
        .await
        .expect_err("re-initialising another's producer id");
    assert_eq!(status.code(), Code::PermissionDenied, "{status}");

    // An open Subscribe stops once its `read` is revoked.
    let grant = [acl("granted", "read", On::Topic(TOPIC))];
    admin.add_acls(&grant).await.unwrap();
    let mut stream = granted
        .grpc()
        .subscribe(v1::SubscribeRequest {
            topic: TOPIC.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let table = admin.table(TOPIC).await.unwrap();
    table.put("k1", "v1").await.unwrap();
    let first = stream.message().await.unwrap();
    assert!(first.is_some());
    admin.remove_acls(&grant).await.unwrap();
    table.put("k2", "v2").await.unwrap();
    let revoked = loop {
        match stream.message().await {
            Ok(Some(message)) if message.records.is_empty() && message.batches.is_empty() => {
                continue
            }
            other => break other,
        }
    };
    let status = revoked.expect_err("a message after the revocation");
    assert_eq!(status.code(), Code::PermissionDenied, "{status}");

    // Listings show what the principal may describe.
    assert!(nobody.list_topics().await.unwrap().is_empty());
    let cluster = nobody.describe_cluster().await.unwrap();
    assert!(
        cluster.partitions.iter().all(|p| p.topic != TOPIC),
        "{cluster:?}"
    );
    admin
        .add_acls(&[acl("granted", "read", On::Topic(TOPIC))])
        .await
        .unwrap();
    let seen: Vec<String> = granted
        .list_topics()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(seen, [TOPIC], "read implies describe");

    // And the delete itself, once granted, does delete.
    admin
        .add_acls(&[acl("granted", "delete", On::Topic(TOPIC))])
        .await
        .unwrap();
    let (code, message) = call(granted.grpc(), "DeleteTopic").await;
    assert_eq!(code, Code::Ok, "{message}");
}

/// Prefix ACLs, deny over allow and `*` through the CLI; `acl list --json`; ACLs of a
/// cluster of one survive a restart.
#[test]
fn prefix_and_deny_acls_should_hold_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let tokens = dir.path().join("tokens.toml");
    let broker = start(&data, &tokens);
    let as_user = |broker: &BrokerProcess, principal: &str, args: &[&str]| {
        let token = format!("{principal}-token");
        let mut all = vec!["--token", token.as_str()];
        all.extend_from_slice(args);
        common::cluster::run_cli_at(&broker.addr, &all)
    };
    let ok = |output: std::process::Output| -> String {
        assert!(
            output.status.success(),
            "stdout: {}\nstderr: {}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let denied = |output: std::process::Output| -> String {
        assert_eq!(
            output.status.code(),
            Some(1),
            "stdout: {}\nstderr: {}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    for topic in ["team-a.orders", "team-a.payroll", "team-b.orders"] {
        ok(as_user(&broker, "admin", &["topic", "create", topic]));
    }
    let added = ok(as_user(
        &broker,
        "admin",
        &[
            "acl",
            "add",
            "--principal",
            "*",
            "--allow",
            "read,write",
            "--topic-prefix",
            "team-a.",
        ],
    ));
    assert_eq!(added.trim(), "added 2 ACL(s)");
    ok(as_user(
        &broker,
        "admin",
        &[
            "acl",
            "add",
            "--principal",
            "granted",
            "--deny",
            "write",
            "--topic",
            "team-a.payroll",
        ],
    ));
    let listed = ok(as_user(&broker, "admin", &["acl", "list", "--json"]));
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed["acls"].as_array().map(Vec::len), Some(3), "{listed}");
    assert!(
        listed["acls"].as_array().unwrap().iter().any(|a| a
            == &serde_json::json!({
                "principal": "granted", "permission": "deny", "operation": "write",
                "resource_type": "topic", "resource_name": "team-a.payroll", "pattern": "literal"
            })),
        "{listed}"
    );
    let table = ok(as_user(
        &broker,
        "admin",
        &["acl", "list", "--principal", "granted"],
    ));
    let rows: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows,
        [
            vec![
                "PRINCIPAL",
                "PERMISSION",
                "OPERATION",
                "RESOURCE",
                "NAME",
                "PATTERN"
            ],
            vec![
                "granted",
                "deny",
                "write",
                "topic",
                "team-a.payroll",
                "literal"
            ],
        ],
        "{table}"
    );
    let typo = denied(as_user(
        &broker,
        "admin",
        &[
            "acl",
            "add",
            "--principal",
            "x",
            "--allow",
            "reed",
            "--topic",
            "t",
        ],
    ));
    assert!(typo.contains("unknown operation `reed`"), "{typo}");
    // A principal without cluster-admin cannot change or list ACLs.
    let refused = denied(as_user(&broker, "granted", &["acl", "list"]));
    assert!(refused.contains("cluster-admin"), "{refused}");

    let check = |broker: &BrokerProcess| {
        let produce = |principal: &str, topic: &str| {
            let token = format!("{principal}-token");
            let mut child = std::process::Command::new(common::binary("syncline"))
                .args([
                    "--broker",
                    &broker.addr,
                    "--token",
                    &token,
                    "produce",
                    topic,
                ])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            {
                use std::io::Write as _;
                child.stdin.take().unwrap().write_all(b"x\n").unwrap();
            }
            child.wait_with_output().unwrap()
        };
        // The prefix ACL lets anyone write team-a.*, not team-b.*.
        ok(produce("nobody", "team-a.orders"));
        let refused = denied(produce("nobody", "team-b.orders"));
        // (The CLI describes the topic first: that is refused already.)
        assert!(
            refused.contains("`nobody` may not") && refused.contains("topic `team-b.orders`"),
            "{refused}"
        );
        // The deny wins over the prefix allow, for `granted` only.
        let refused = denied(produce("granted", "team-a.payroll"));
        assert!(refused.contains("an ACL denies it"), "{refused}");
        ok(produce("nobody", "team-a.payroll"));
        // Listing shows what the principal may describe.
        let topics = ok(as_user(broker, "nobody", &["topic", "list"]));
        assert_eq!(
            topics.lines().collect::<Vec<_>>(),
            ["team-a.orders", "team-a.payroll"],
            "{topics}"
        );
    };
    check(&broker);

    assert!(broker.stop(), "a clean stop");
    let broker = start(&data, &tokens);
    check(&broker);
    let removed = ok(as_user(
        &broker,
        "admin",
        &[
            "acl",
            "remove",
            "--principal",
            "granted",
            "--deny",
            "write",
            "--topic",
            "team-a.payroll",
        ],
    ));
    assert_eq!(removed.trim(), "removed 1 ACL(s)");
}
