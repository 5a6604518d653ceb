//! Consumer groups: how long a rebalance takes and how fast offsets commit.
//!
//! - `rebalance/3_to_4_members_64_partitions`: three members own 64 partitions; a fourth joins;
//!   measured from its JoinGroup until every member reads exactly its 16 partitions and no
//!   partition is read twice. Members are simulated over raw gRPC the way a correct client
//!   behaves: a heartbeat every `heartbeat_interval_ms`, and one at once after giving
//!   partitions up. The figure is dominated by the heartbeat interval (old owners learn of the
//!   change at their next heartbeat, the new owner gets the partitions at its next one), so it
//!   is reported next to that interval, measured in the same run: the ratio is what matters.
//! - `commit/one_partition_sequential` and `commit/64_in_flight`: CommitOffsets of one
//!   partition each, durable (fsync'd into `__offsets`) before the answer; concurrent commits
//!   share group-commit fsyncs.

#[path = "common/mod.rs"]
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use syncline_proto::v1::{self, broker_client::BrokerClient};
use tonic::transport::Channel;

/// Heartbeat interval of the rebalance benchmark's broker (the production default is 1000).
const HEARTBEAT_MS: u32 = 100;
const PARTITIONS: u32 = 64;

type Grpc = BrokerClient<Channel>;

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

async fn join(client: &mut Grpc, group: &str) -> Member {
    let response = client
        .join_group(v1::JoinGroupRequest {
            group: group.into(),
            topics: vec!["events".into()],
            ..Default::default()
        })
        .await
        .expect("join")
        .into_inner();
    Member {
        id: response.member_id,
        epoch: response.member_epoch,
        reading: flatten(&response.assignment),
    }
}

/// One heartbeat; returns true when the member gave something up (it then beats again at
/// once, like a client that just committed and released).
async fn beat(client: &mut Grpc, group: &str, member: &mut Member) -> bool {
    let response = client
        .heartbeat(v1::HeartbeatRequest {
            group: group.into(),
            member_id: member.id.clone(),
            member_epoch: member.epoch,
            owned: grouped(&member.reading),
        })
        .await
        .expect("heartbeat")
        .into_inner();
    let next = flatten(&response.assignment);
    let gave_up = member.reading.difference(&next).next().is_some();
    member.epoch = response.member_epoch;
    member.reading = next;
    gave_up
}

/// Runs the members' heartbeat loops until all read `want` partitions each; returns when.
/// Each member beats on its own schedule (every `HEARTBEAT_MS`, phases spread over the
/// interval, as independent clients would) and once more right after it gave partitions up.
async fn settle(client: &mut Grpc, group: &str, members: &mut [Member], want: usize) -> Instant {
    let interval = Duration::from_millis(u64::from(HEARTBEAT_MS));
    let start = Instant::now();
    let mut next: Vec<Instant> = (0..members.len())
        .map(|i| start + interval * (i as u32 + 1) / (members.len() as u32 + 1))
        .collect();
    loop {
        let (i, at) = next
            .iter()
            .copied()
            .enumerate()
            .min_by_key(|(_, at)| *at)
            .expect("members");
        tokio::time::sleep_until(at.into()).await;
        let gave_up = beat(client, group, &mut members[i]).await;
        next[i] = if gave_up {
            Instant::now()
        } else {
            at + interval
        };
        let mut seen = BTreeSet::new();
        for member in members.iter() {
            for partition in &member.reading {
                assert!(seen.insert(partition.clone()), "read twice: {partition:?}");
            }
        }
        if members.iter().all(|m| m.reading.len() == want) {
            return Instant::now();
        }
    }
}

fn rebalance(c: &mut Criterion) {
    let mut setup = common::setup_with("syncline-bench-groups", |config| {
        config.group_initial_rebalance_delay_ms = 0;
        config.group_heartbeat_interval_ms = HEARTBEAT_MS;
    });
    setup.runtime.block_on(async {
        setup
            .client
            .create_topic(v1::CreateTopicRequest {
                name: "events".into(),
                config: Some(v1::TopicConfig {
                    partitions: Some(PARTITIONS),
                    ..Default::default()
                }),
            })
            .await
            .expect("create");
    });
    let mut group = c.benchmark_group("rebalance");
    group.sample_size(10);
    let mut run = 0u32;
    group.bench_function(
        format!("3_to_4_members_{PARTITIONS}_partitions_heartbeat_{HEARTBEAT_MS}ms"),
        |b| {
            b.iter_custom(|iterations| {
                let mut total = Duration::ZERO;
                for _ in 0..iterations {
                    run += 1;
                    let name = format!("g{run}");
                    let mut client = setup.client.clone();
                    total += setup.runtime.block_on(async {
                        let mut members = vec![
                            join(&mut client, &name).await,
                            join(&mut client, &name).await,
                            join(&mut client, &name).await,
                        ];
                        // 64 over 3 is not even: settle on "everything assigned".
                        loop {
                            for member in members.iter_mut() {
                                beat(&mut client, &name, member).await;
                            }
                            let total: usize = members.iter().map(|m| m.reading.len()).sum();
                            if total == PARTITIONS as usize {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(u64::from(HEARTBEAT_MS)))
                                .await;
                        }
                        let started = Instant::now();
                        members.push(join(&mut client, &name).await);
                        let done = settle(&mut client, &name, &mut members, 16).await;
                        for member in &members {
                            client
                                .leave_group(v1::LeaveGroupRequest {
                                    group: name.clone(),
                                    member_id: member.id.clone(),
                                    member_epoch: member.epoch,
                                })
                                .await
                                .expect("leave");
                        }
                        done - started
                    });
                }
                total
            })
        },
    );
    group.finish();
}

fn commits(c: &mut Criterion) {
    let mut setup = common::setup("syncline-bench-commits");
    setup.runtime.block_on(async {
        setup
            .client
            .create_topic(v1::CreateTopicRequest {
                name: "events".into(),
                config: Some(v1::TopicConfig {
                    partitions: Some(PARTITIONS),
                    ..Default::default()
                }),
            })
            .await
            .expect("create");
    });
    let commit = |partition: u32| v1::CommitOffsetsRequest {
        group: "standalone".into(),
        offsets: vec![v1::OffsetCommit {
            topic: "events".into(),
            partition,
            offset: 0,
            metadata: String::new(),
            topic_id: String::new(),
        }],
        ..Default::default()
    };
    let mut group = c.benchmark_group("commit");
    group.sample_size(10);
    group.throughput(Throughput::Elements(1));
    group.bench_function("one_partition_sequential", |b| {
        let mut client = setup.client.clone();
        b.iter(|| {
            setup
                .runtime
                .block_on(client.commit_offsets(commit(0)))
                .expect("commit")
        })
    });
    const IN_FLIGHT: u32 = 64;
    group.throughput(Throughput::Elements(u64::from(IN_FLIGHT)));
    group.bench_function("64_in_flight", |b| {
        b.iter(|| {
            setup.runtime.block_on(async {
                let mut tasks = Vec::new();
                for partition in 0..IN_FLIGHT {
                    let mut client = setup.client.clone();
                    let request = commit(partition);
                    tasks.push(tokio::spawn(async move {
                        client.commit_offsets(request).await.expect("commit")
                    }));
                }
                for task in tasks {
                    task.await.expect("task");
                }
            })
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(5));
    targets = rebalance, commits
}
criterion_main!(benches);
