//! The group coordinator through the real broker binary, spoken to over raw gRPC the way a
//! correct client behaves: three members share 12 partitions with every partition read by
//! exactly one; a member that stops heartbeating loses its partitions to the others within its
//! session timeout; a commit with a stale epoch is refused and changes nothing; committed
//! offsets survive a clean restart and a `kill -9`; describe reports lag.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::BrokerProcess;
use syncline_proto::v1;
use syncline_proto::v1::broker_client::BrokerClient;
use tonic::transport::Channel;
use tonic::Code;

type Grpc = BrokerClient<Channel>;

const FAST: [&str; 4] = [
    "--group-initial-rebalance-delay-ms",
    "200",
    "--group-heartbeat-interval-ms",
    "50",
];

struct Member {
    id: String,
    epoch: u32,
    reading: BTreeSet<(String, u32)>,
}

fn flatten(groups: &[v1::TopicPartitions]) -> BTreeSet<(String, u32)> {
    groups
        .iter()
        .flat_map(|g| g.partitions.iter().map(|p| (g.topic.clone(), *p)))
        .collect()
}

fn grouped(set: &BTreeSet<(String, u32)>) -> Vec<v1::TopicPartitions> {
    let mut map: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
    for (topic, partition) in set {
        map.entry(topic).or_default().push(*partition);
    }
    map.into_iter()
        .map(|(topic, partitions)| v1::TopicPartitions {
            topic: topic.to_string(),
            partitions,
        })
        .collect()
}

async fn create(client: &mut Grpc, partitions: u32) {
    client
        .create_topic(v1::CreateTopicRequest {
            name: "events".into(),
            config: Some(v1::TopicConfig {
                partitions: Some(partitions),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
}

async fn join(client: &mut Grpc, session_timeout_ms: u32) -> Member {
    let response = client
        .join_group(v1::JoinGroupRequest {
            group: "g".into(),
            topics: vec!["events".into()],
            session_timeout_ms: Some(session_timeout_ms),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    Member {
        id: response.member_id,
        epoch: response.member_epoch,
        reading: flatten(&response.assignment),
    }
}

async fn beat(client: &mut Grpc, member: &mut Member) {
    let response = client
        .heartbeat(v1::HeartbeatRequest {
            group: "g".into(),
            member_id: member.id.clone(),
            member_epoch: member.epoch,
            owned: grouped(&member.reading),
        })
        .await
        .unwrap()
        .into_inner();
    member.epoch = response.member_epoch;
    member.reading = flatten(&response.assignment);
}

/// A member that joined alone and heartbeated until it reads `partitions` partitions.
async fn joined_reading(client: &mut Grpc, partitions: usize) -> Member {
    let mut member = join(client, 10_000).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while member.reading.len() != partitions {
        assert!(Instant::now() < deadline, "never assigned {partitions}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        beat(client, &mut member).await;
    }
    member
}

#[track_caller]
fn assert_exclusive(members: &[&Member]) {
    let mut seen = BTreeSet::new();
    for member in members {
        for partition in &member.reading {
            assert!(seen.insert(partition.clone()), "{partition:?} read twice");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_three_members_should_share_and_move_a_silent_members_partitions() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start_with(dir.path(), &FAST);
    let mut client = broker.client().await;
    create(&mut client, 12).await;
    let mut a = join(&mut client, 10_000).await;
    let mut b = join(&mut client, 10_000).await;
    let mut silent = join(&mut client, 1000).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while [&a, &b, &silent].iter().any(|m| m.reading.len() != 4) {
        assert!(Instant::now() < deadline, "never settled");
        for member in [&mut a, &mut b, &mut silent] {
            beat(&mut client, member).await;
        }
        assert_exclusive(&[&a, &b, &silent]);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // `silent` stops heartbeating (as if killed): its partitions move within its session.
    let stopped = Instant::now();
    while a.reading.len() + b.reading.len() < 12 {
        assert!(
            Instant::now() < deadline,
            "the silent member's partitions never moved"
        );
        beat(&mut client, &mut a).await;
        beat(&mut client, &mut b).await;
        assert!(
            a.reading.is_disjoint(&b.reading),
            "no partition is read twice"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let moved_after = stopped.elapsed();
    assert!(
        moved_after >= Duration::from_millis(900),
        "{moved_after:?}: not before the session ended"
    );
    assert_eq!((a.reading.len(), b.reading.len()), (6, 6));
    let error = client
        .heartbeat(v1::HeartbeatRequest {
            group: "g".into(),
            member_id: silent.id.clone(),
            member_epoch: silent.epoch,
            owned: grouped(&silent.reading),
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::NotFound, "{error:?}");
    let groups = client
        .list_groups(v1::ListGroupsRequest {})
        .await
        .unwrap()
        .into_inner()
        .groups;
    assert_eq!(groups.len(), 1);
    assert_eq!((groups[0].group.as_str(), groups[0].members), ("g", 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_commits_should_refuse_stale_epochs_and_survive_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start_with(dir.path(), &FAST);
    let mut client = broker.client().await;
    create(&mut client, 2).await;
    for _ in 0..5 {
        client
            .produce(v1::ProduceRequest {
                topic: "events".into(),
                partition: 0,
                records: vec![v1::Record {
                    value: Some(Bytes::from_static(b"x")),
                    ..Default::default()
                }],
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let member = joined_reading(&mut client, 2).await;
    let commit = |epoch: u32, offset: u64| v1::CommitOffsetsRequest {
        group: "g".into(),
        member_id: member.id.clone(),
        member_epoch: epoch,
        offsets: vec![v1::OffsetCommit {
            topic: "events".into(),
            partition: 0,
            offset,
            metadata: "m".into(),
            topic_id: String::new(),
        }],
    };
    client
        .commit_offsets(commit(member.epoch, 3))
        .await
        .unwrap();
    let stale = client
        .commit_offsets(commit(member.epoch - 1, 5))
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition, "{stale:?}");
    assert!(stale.message().contains("epoch"), "{}", stale.message());
    let fetch = v1::FetchOffsetsRequest {
        group: "g".into(),
        partitions: Vec::new(),
    };
    let offsets = client
        .fetch_offsets(fetch.clone())
        .await
        .unwrap()
        .into_inner()
        .offsets;
    assert_eq!(offsets.len(), 1);
    assert_eq!(offsets[0].offset, 3, "the stale commit changed nothing");
    let described = client
        .describe_group(v1::DescribeGroupRequest { group: "g".into() })
        .await
        .unwrap()
        .into_inner();
    let lag: Vec<(u32, Option<u64>, u64)> = described
        .partitions
        .iter()
        .map(|p| (p.partition, p.committed_offset, p.lag))
        .collect();
    assert_eq!(lag, vec![(0, Some(3), 2), (1, None, 0)]);
    assert_eq!(described.members.len(), 1);

    assert!(broker.stop());
    let broker = BrokerProcess::start_with(dir.path(), &FAST);
    let mut client = broker.client().await;
    let offsets = client
        .fetch_offsets(fetch.clone())
        .await
        .unwrap()
        .into_inner()
        .offsets;
    assert_eq!((offsets[0].offset, offsets[0].metadata.as_str()), (3, "m"));
    // Membership is not kept: the old member must join again.
    let error = client
        .heartbeat(v1::HeartbeatRequest {
            group: "g".into(),
            member_id: member.id.clone(),
            member_epoch: member.epoch,
            owned: Vec::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::NotFound);
    // A standalone commit (no members now), then kill -9: the acknowledged commit is there.
    client
        .commit_offsets(v1::CommitOffsetsRequest {
            group: "g".into(),
            offsets: vec![v1::OffsetCommit {
                topic: "events".into(),
                partition: 0,
                offset: 5,
                metadata: String::new(),
                topic_id: String::new(),
            }],
            ..Default::default()
        })
        .await
        .unwrap();
    broker.kill9();
    let broker = BrokerProcess::start_with(dir.path(), &FAST);
    let mut client = broker.client().await;
    let offsets = client
        .fetch_offsets(fetch)
        .await
        .unwrap()
        .into_inner()
        .offsets;
    assert_eq!(offsets[0].offset, 5);
    let topics = client
        .list_topics(v1::ListTopicsRequest {})
        .await
        .unwrap()
        .into_inner()
        .topics;
    assert!(
        topics.iter().all(|t| !t.name.starts_with("__")),
        "internal topics are not listed"
    );
    let error = client
        .delete_topic(v1::DeleteTopicRequest {
            name: "__offsets".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
}

/// Review: `Produce` into `__offsets` was accepted, so anyone could rewrite any group's
/// committed offsets without being a member (no fencing), and a key with a crafted group name
/// (quotes, newlines) was replayed at the next start and printed unescaped into the
/// `syncline_consumer_group_lag` labels. Only the coordinator writes internal topics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_produce_into_offsets_topic_should_refuse_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start_with(dir.path(), &FAST);
    let mut client = broker.client().await;
    create(&mut client, 1).await;
    let mut key = b"evil\"} 1\n\x00events\x00".to_vec();
    key.extend_from_slice(&0u32.to_be_bytes());
    let value = v1::CommittedOffset {
        topic: "events".into(),
        partition: 0,
        offset: 0,
        metadata: String::new(),
        ..Default::default()
    };
    let error = client
        .produce(v1::ProduceRequest {
            topic: "__offsets".into(),
            partition: 0,
            acks: v1::Acks::Durable as i32,
            records: vec![v1::Record {
                key: Some(Bytes::from(key)),
                value: Some(Bytes::from(prost::Message::encode_to_vec(&value))),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument, "{error:?}");
    broker.stop();
    let broker = BrokerProcess::start_with(dir.path(), &FAST);
    let mut client = broker.client().await;
    let groups = client
        .list_groups(v1::ListGroupsRequest {})
        .await
        .unwrap()
        .into_inner()
        .groups;
    assert!(groups.is_empty(), "{groups:?}");
}

/// Issue 13 item 13, as a hostile client found it: JoinGroup on an internal topic was
/// accepted, and a Heartbeat could claim partitions the member never got (or that do not
/// exist). Both are refused with a clear message and change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_internal_topic_join_or_bogus_owned_claim_should_refuse() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start_with(dir.path(), &FAST);
    let mut client = broker.client().await;
    create(&mut client, 2).await;
    let error = client
        .join_group(v1::JoinGroupRequest {
            group: "g".into(),
            topics: vec!["__offsets".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument, "{error:?}");
    assert!(error.message().contains("internal topic"), "{error:?}");

    let mut member = joined_reading(&mut client, 2).await;
    for bogus in [("events", 99), ("__offsets", 0), ("missing", 0)] {
        let mut claimed = member.reading.clone();
        claimed.insert((bogus.0.to_string(), bogus.1));
        let error = client
            .heartbeat(v1::HeartbeatRequest {
                group: "g".into(),
                member_id: member.id.clone(),
                member_epoch: member.epoch,
                owned: grouped(&claimed),
            })
            .await
            .unwrap_err();
        assert_eq!(
            error.code(),
            Code::FailedPrecondition,
            "{bogus:?}: {error:?}"
        );
        assert!(error.message().contains("does not own"), "{error:?}");
    }
    // Nothing changed: the same epoch still heartbeats and keeps both partitions.
    let epoch = member.epoch;
    beat(&mut client, &mut member).await;
    assert_eq!((member.epoch, member.reading.len()), (epoch, 2));
}
