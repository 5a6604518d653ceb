//! The coordinator against a real registry in a temp dir: assignment, the hand-over rule
//! (never two owners), expiry, fencing, standalone commits, and offsets surviving a restart.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::config::Config;
use crate::topic::{Cleanup, Registry};

struct Harness {
    _dir: tempfile::TempDir,
    _registry: Arc<Registry>,
    coordinator: Coordinator,
}

fn group_config(delay_ms: u64) -> GroupConfig {
    GroupConfig {
        initial_rebalance_delay: Duration::from_millis(delay_ms),
        heartbeat_interval_ms: 100,
        session_timeout_default_ms: 10_000,
    }
}

async fn open(dir: &std::path::Path, delay_ms: u64) -> (Arc<Registry>, Coordinator) {
    let config = Config {
        data_dir: dir.to_path_buf(),
        ..Config::default()
    };
    let registry = Arc::new(Registry::open(Arc::new(config)).unwrap());
    let coordinator = Coordinator::open(registry.clone(), group_config(delay_ms))
        .await
        .unwrap();
    (registry, coordinator)
}

async fn harness(partitions: u32, delay_ms: u64) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let (registry, coordinator) = open(dir.path(), delay_ms).await;
    let settings = registry
        .resolve_settings(Some(partitions), Some(Cleanup::Delete), |_| Ok(()))
        .unwrap();
    registry.create("t", settings).await.unwrap();
    Harness {
        _dir: dir,
        _registry: registry,
        coordinator,
    }
}

/// A member as a client sees it: its id, epoch and what it reads.
struct Client {
    id: String,
    epoch: u32,
    reading: BTreeSet<(String, u32)>,
}

impl Harness {
    /// Joins member; `None` takes the broker's default session timeout.
    fn join(&self, session_timeout_ms: Option<u32>) -> Client {
        let response = self
            .coordinator
            .join(v1::JoinGroupRequest {
                group: "g".into(),
                member_id: String::new(),
                topics: vec!["t".into()],
                session_timeout_ms,
                client_id: "test".into(),
            })
            .unwrap();
        Client {
            id: response.member_id,
            epoch: response.member_epoch,
            reading: flatten(&response.assignment),
        }
    }

    /// One heartbeat that behaves like a correct client: reads what it is given and drops
    /// (after "committing") what it is no longer given.
    fn beat(&self, client: &mut Client) {
        let response = self
            .coordinator
            .heartbeat(v1::HeartbeatRequest {
                group: "g".into(),
                member_id: client.id.clone(),
                member_epoch: client.epoch,
                owned: grouped(&client.reading),
            })
            .unwrap();
        client.epoch = response.member_epoch;
        client.reading = flatten(&response.assignment);
    }

    fn owners(&self) -> BTreeMap<(String, u32), String> {
        self.coordinator
            .describe("g")
            .unwrap()
            .partitions
            .into_iter()
            .filter(|p| !p.member_id.is_empty())
            .map(|p| ((p.topic, p.partition), p.member_id))
            .collect()
    }
}

/// No partition is read by two clients at once.
#[track_caller]
fn assert_exclusive(clients: &[&Client]) {
    let mut seen = BTreeSet::new();
    for client in clients {
        for partition in &client.reading {
            assert!(
                seen.insert(partition.clone()),
                "{partition:?} is read twice"
            );
        }
    }
}

fn round(h: &Harness, clients: &mut [&mut Client]) {
    for client in clients.iter_mut() {
        h.beat(client);
    }
}

#[tokio::test]
async fn given_three_members_over_twelve_partitions_should_give_each_four() {
    let h = harness(12, 0).await;
    let (mut a, mut b, mut c) = (h.join(None), h.join(None), h.join(None));
    for _ in 0..3 {
        round(&h, &mut [&mut a, &mut b, &mut c]);
        assert_exclusive(&[&a, &b, &c]);
    }
    for client in [&a, &b, &c] {
        assert_eq!(client.reading.len(), 4, "{:?}", client.reading);
    }
    assert_eq!(h.owners().len(), 12);
    assert_eq!(h.coordinator.describe("g").unwrap().state, "stable");
}

#[tokio::test]
async fn given_a_new_member_should_get_partitions_only_after_their_owners_release_them() {
    let h = harness(12, 0).await;
    let (mut a, mut b, mut c) = (h.join(None), h.join(None), h.join(None));
    round(&h, &mut [&mut a, &mut b, &mut c]);
    let mut d = h.join(None);
    assert!(d.reading.is_empty(), "everything is still held");
    h.beat(&mut d);
    assert!(d.reading.is_empty(), "everything is still held");
    assert_eq!(h.coordinator.describe("g").unwrap().state, "reconciling");
    // The old owners learn what they give up; the new one gets it at its next heartbeat.
    for _ in 0..3 {
        round(&h, &mut [&mut a, &mut b, &mut c, &mut d]);
        assert_exclusive(&[&a, &b, &c, &d]);
    }
    for client in [&a, &b, &c, &d] {
        assert_eq!(client.reading.len(), 3);
    }
    assert_eq!(h.coordinator.describe("g").unwrap().state, "stable");
}

#[tokio::test]
async fn given_a_slow_old_owner_its_partition_should_wait_and_it_may_still_commit() {
    let h = harness(2, 0).await;
    let mut a = h.join(None);
    h.beat(&mut a);
    assert_eq!(a.reading.len(), 2);
    let mut b = h.join(None);
    h.beat(&mut b);
    assert!(b.reading.is_empty());
    // a learns it must give one up but has not released it yet: it can commit for it.
    let response = h
        .coordinator
        .heartbeat(v1::HeartbeatRequest {
            group: "g".into(),
            member_id: a.id.clone(),
            member_epoch: a.epoch,
            owned: grouped(&a.reading),
        })
        .unwrap();
    let kept = flatten(&response.assignment);
    assert_eq!(kept.len(), 1);
    let given_up = a.reading.difference(&kept).next().cloned().unwrap();
    h.coordinator
        .commit(v1::CommitOffsetsRequest {
            group: "g".into(),
            member_id: a.id.clone(),
            member_epoch: response.member_epoch,
            offsets: vec![v1::OffsetCommit {
                topic: given_up.0.clone(),
                partition: given_up.1,
                offset: 0,
                metadata: "before release".into(),
                topic_id: String::new(),
            }],
        })
        .await
        .unwrap();
    h.beat(&mut b);
    assert!(b.reading.is_empty(), "still held by a");
    // Released: a heartbeats without it.
    a.epoch = response.member_epoch;
    a.reading = kept;
    h.beat(&mut a);
    h.beat(&mut b);
    assert_eq!(b.reading, BTreeSet::from([given_up.clone()]));
    // Now a may no longer commit for it.
    let error = h
        .coordinator
        .commit(v1::CommitOffsetsRequest {
            group: "g".into(),
            member_id: a.id.clone(),
            member_epoch: a.epoch,
            offsets: vec![v1::OffsetCommit {
                topic: given_up.0,
                partition: given_up.1,
                offset: 0,
                metadata: String::new(),
                topic_id: String::new(),
            }],
        })
        .await
        .unwrap_err();
    assert!(
        matches!(error, BrokerError::NotPartitionOwner { .. }),
        "{error}"
    );
}

#[tokio::test]
async fn given_member_silent_past_its_session_should_expire_and_free_its_partitions() {
    let h = harness(6, 0).await;
    let mut a = h.join(Some(1000));
    let mut b = h.join(Some(10_000));
    round(&h, &mut [&mut a, &mut b]);
    round(&h, &mut [&mut a, &mut b]);
    assert_eq!(b.reading.len(), 3);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    h.beat(&mut b);
    h.coordinator.expire();
    h.beat(&mut b);
    assert_eq!(b.reading.len(), 6, "a's partitions moved to b");
    let error = h
        .coordinator
        .heartbeat(v1::HeartbeatRequest {
            group: "g".into(),
            member_id: a.id.clone(),
            member_epoch: a.epoch,
            owned: Vec::new(),
        })
        .unwrap_err();
    assert!(
        matches!(error, BrokerError::UnknownMember { .. }),
        "{error}"
    );
}

#[tokio::test]
async fn given_initial_delay_should_assign_nothing_before_it_ends() {
    let h = harness(4, 300).await;
    let mut a = h.join(None);
    assert!(a.reading.is_empty());
    assert_eq!(h.coordinator.describe("g").unwrap().state, "assigning");
    let mut b = h.join(None);
    h.beat(&mut a);
    assert!(a.reading.is_empty());
    tokio::time::sleep(Duration::from_millis(350)).await;
    round(&h, &mut [&mut a, &mut b]);
    assert_eq!(
        a.reading.len(),
        2,
        "both members share from the first assignment"
    );
    assert_eq!(b.reading.len(), 2);
}

#[tokio::test]
async fn given_stale_epoch_or_unknown_member_or_members_should_refuse_and_change_nothing() {
    let h = harness(2, 0).await;
    let mut a = h.join(None);
    h.beat(&mut a);
    let commit = |member: &str, epoch: u32| v1::CommitOffsetsRequest {
        group: "g".into(),
        member_id: member.into(),
        member_epoch: epoch,
        offsets: vec![v1::OffsetCommit {
            topic: "t".into(),
            partition: 0,
            offset: 0,
            metadata: String::new(),
            topic_id: String::new(),
        }],
    };
    let stale = h.coordinator.commit(commit(&a.id, a.epoch - 1)).await;
    assert!(
        matches!(stale, Err(BrokerError::StaleMemberEpoch { .. })),
        "{stale:?}"
    );
    let unknown = h.coordinator.commit(commit("nobody", 1)).await;
    assert!(
        matches!(unknown, Err(BrokerError::UnknownMember { .. })),
        "{unknown:?}"
    );
    let standalone = h.coordinator.commit(commit("", 0)).await;
    assert!(
        matches!(standalone, Err(BrokerError::GroupHasMembers { .. })),
        "{standalone:?}"
    );
    let stale_beat = h.coordinator.heartbeat(v1::HeartbeatRequest {
        group: "g".into(),
        member_id: a.id.clone(),
        member_epoch: a.epoch + 5,
        owned: Vec::new(),
    });
    assert!(matches!(
        stale_beat,
        Err(BrokerError::StaleMemberEpoch { .. })
    ));
    assert!(h
        .coordinator
        .fetch_offsets(v1::FetchOffsetsRequest {
            group: "g".into(),
            partitions: Vec::new(),
        })
        .unwrap()
        .is_empty());
    h.coordinator.commit(commit(&a.id, a.epoch)).await.unwrap();
    h.coordinator
        .leave(v1::LeaveGroupRequest {
            group: "g".into(),
            member_id: a.id.clone(),
            member_epoch: a.epoch,
        })
        .unwrap();
    // Without members a standalone consumer (or reset-offsets) may commit.
    h.coordinator.commit(commit("", 0)).await.unwrap();
    let past_end = h
        .coordinator
        .commit(v1::CommitOffsetsRequest {
            offsets: vec![v1::OffsetCommit {
                topic: "t".into(),
                partition: 0,
                offset: 99,
                metadata: String::new(),
                topic_id: String::new(),
            }],
            ..commit("", 0)
        })
        .await;
    assert!(
        matches!(past_end, Err(BrokerError::InvalidRequest(_))),
        "{past_end:?}"
    );
}

#[tokio::test]
async fn given_committed_offsets_should_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (registry, coordinator) = open(dir.path(), 0).await;
        let settings = registry
            .resolve_settings(Some(3), Some(Cleanup::Delete), |_| Ok(()))
            .unwrap();
        let topic = registry.create("t", settings).await.unwrap();
        let mut builder = syncline_proto::batch::BatchBuilder::new();
        builder.push(1, None, Some(b"x"), &[]);
        builder.push(1, None, Some(b"y"), &[]);
        topic
            .partition(1)
            .unwrap()
            .append_batch(builder.finish().unwrap(), &[])
            .unwrap();
        for (offset, metadata) in [(1, "first"), (2, "second")] {
            coordinator
                .commit(v1::CommitOffsetsRequest {
                    group: "standalone".into(),
                    member_id: String::new(),
                    member_epoch: 0,
                    offsets: vec![v1::OffsetCommit {
                        topic: "t".into(),
                        partition: 1,
                        offset,
                        metadata: metadata.into(),
                        topic_id: String::new(),
                    }],
                })
                .await
                .unwrap();
        }
        registry.close().await.unwrap();
    }
    let (_registry, coordinator) = open(dir.path(), 0).await;
    let offsets = coordinator
        .fetch_offsets(v1::FetchOffsetsRequest {
            group: "standalone".into(),
            partitions: Vec::new(),
        })
        .unwrap();
    assert_eq!(offsets.len(), 1);
    assert_eq!(
        (offsets[0].offset, offsets[0].metadata.as_str()),
        (2, "second")
    );
    let described = coordinator.describe("standalone").unwrap();
    assert_eq!(described.state, "empty");
    let lag: Vec<(u32, u64)> = described
        .partitions
        .iter()
        .map(|p| (p.partition, p.lag))
        .collect();
    assert_eq!(lag, vec![(0, 0), (1, 0), (2, 0)]);
    assert_eq!(coordinator.list()[0].group, "standalone");
}

/// Review: interior corruption in `__offsets` made `Coordinator::open` fail, so the whole
/// broker refused to start and every topic was down. It must fence committed offsets only
/// (commits and fetches get an error naming `__offsets`), the rest keeps working.
#[tokio::test]
async fn given_corrupt_offsets_topic_when_reopened_should_fence_offsets_only() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (registry, coordinator) = open(dir.path(), 0).await;
        let settings = registry
            .resolve_settings(Some(1), Some(Cleanup::Delete), |_| Ok(()))
            .unwrap();
        registry.create("t", settings).await.unwrap();
        // Large metadata, so a byte at a quarter of the segment sits inside the first batch.
        for metadata in ["a", "b"] {
            coordinator
                .commit(v1::CommitOffsetsRequest {
                    group: "standalone".into(),
                    member_id: String::new(),
                    member_epoch: 0,
                    offsets: vec![v1::OffsetCommit {
                        topic: "t".into(),
                        partition: 0,
                        offset: 0,
                        metadata: metadata.repeat(1000),
                        topic_id: String::new(),
                    }],
                })
                .await
                .unwrap();
        }
        registry.close().await.unwrap();
    }
    let partition_dir = dir.path().join(offsets::OFFSETS_TOPIC).join("0");
    let _ = std::fs::remove_file(partition_dir.join(".clean-shutdown"));
    let segment = partition_dir.join(format!("{:020}.log", 0));
    let mut data = std::fs::read(&segment).unwrap();
    let at = data.len() / 4;
    data[at] ^= 0x10;
    std::fs::write(&segment, data).unwrap();

    let config = Config {
        data_dir: dir.path().to_path_buf(),
        ..Config::default()
    };
    let registry = Arc::new(Registry::open(Arc::new(config)).unwrap());
    let coordinator = Coordinator::open(registry.clone(), group_config(0))
        .await
        .expect("a corrupt __offsets must not stop the broker");
    assert!(registry.get("t").is_ok());
    let fetched = coordinator.fetch_offsets(v1::FetchOffsetsRequest {
        group: "standalone".into(),
        partitions: Vec::new(),
    });
    assert!(
        matches!(&fetched, Err(BrokerError::Fenced { topic, .. }) if topic == offsets::OFFSETS_TOPIC),
        "{fetched:?}"
    );
    let committed = coordinator
        .commit(v1::CommitOffsetsRequest {
            group: "standalone".into(),
            member_id: String::new(),
            member_epoch: 0,
            offsets: vec![v1::OffsetCommit {
                topic: "t".into(),
                partition: 0,
                offset: 0,
                metadata: String::new(),
                topic_id: String::new(),
            }],
        })
        .await;
    assert!(
        matches!(&committed, Err(BrokerError::Fenced { .. })),
        "{committed:?}"
    );
    let described = coordinator.describe("standalone");
    assert!(
        matches!(&described, Err(BrokerError::Fenced { .. })),
        "{described:?}"
    );
}

#[tokio::test]
async fn given_explicit_zero_session_timeout_should_refuse_and_absent_take_the_default() {
    let h = harness(1, 0).await;
    let request = |session_timeout_ms| v1::JoinGroupRequest {
        group: "g".into(),
        topics: vec!["t".into()],
        session_timeout_ms,
        ..Default::default()
    };
    let refused = h.coordinator.join(request(Some(0)));
    assert!(
        matches!(&refused, Err(BrokerError::InvalidRequest(message)) if message.contains("`session_timeout_ms` 0 is outside [1000, 300000]")),
        "{refused:?}"
    );
    h.coordinator.join(request(None)).unwrap();
    let described = h.coordinator.describe("g").unwrap();
    assert_eq!(described.members[0].session_timeout_ms, 10_000);
}

fn standalone_commit(topic: &str, offset: u64) -> v1::CommitOffsetsRequest {
    v1::CommitOffsetsRequest {
        group: "standalone".into(),
        member_id: String::new(),
        member_epoch: 0,
        offsets: vec![v1::OffsetCommit {
            topic: topic.into(),
            partition: 0,
            offset,
            metadata: String::new(),
            topic_id: String::new(),
        }],
    }
}

fn committed_of(coordinator: &Coordinator) -> Vec<(String, u64)> {
    coordinator
        .fetch_offsets(v1::FetchOffsetsRequest {
            group: "standalone".into(),
            partitions: Vec::new(),
        })
        .unwrap()
        .into_iter()
        .map(|c| (c.topic, c.offset))
        .collect()
}

async fn create_with_records(registry: &Registry, name: &str, records: usize) {
    let settings = registry
        .resolve_settings(Some(1), Some(Cleanup::Delete), |_| Ok(()))
        .unwrap();
    let topic = registry.create(name, settings).await.unwrap();
    if records == 0 {
        return;
    }
    let mut builder = syncline_proto::batch::BatchBuilder::new();
    for _ in 0..records {
        builder.push(1, None, Some(b"x"), &[]);
    }
    topic
        .partition(0)
        .unwrap()
        .append_batch(builder.finish().unwrap(), &[])
        .unwrap();
}

/// Issue 13 item 1: committed offsets outlived their topic. After a delete and a re-create
/// under the same name the group starts with no committed offset (also when the broker never
/// got to forget the old ones, and after a restart), and describe shows the whole lag.
#[tokio::test]
async fn given_topic_deleted_and_recreated_should_forget_its_committed_offsets() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (registry, coordinator) = open(dir.path(), 0).await;
        create_with_records(&registry, "t", 5).await;
        create_with_records(&registry, "kept", 2).await;
        coordinator.commit(standalone_commit("t", 5)).await.unwrap();
        coordinator
            .commit(standalone_commit("kept", 2))
            .await
            .unwrap();
        // As a crash right after the delete: the coordinator is never told.
        registry.delete("t").await.unwrap();
        create_with_records(&registry, "t", 3).await;
        assert_eq!(committed_of(&coordinator), vec![("kept".into(), 2)]);
        let described = coordinator.describe("standalone").unwrap();
        let lag: Vec<(String, Option<u64>, u64)> = described
            .partitions
            .into_iter()
            .map(|p| (p.topic, p.committed_offset, p.lag))
            .collect();
        assert_eq!(lag, vec![("kept".into(), Some(2), 0)]);
        registry.close().await.unwrap();
    }
    let (registry, coordinator) = open(dir.path(), 0).await;
    assert_eq!(committed_of(&coordinator), vec![("kept".into(), 2)]);
    // The new incarnation's own commits count.
    coordinator.commit(standalone_commit("t", 1)).await.unwrap();
    assert_eq!(
        committed_of(&coordinator),
        vec![("kept".into(), 2), ("t".into(), 1)]
    );
    // Without commits left the group is gone from listings.
    registry.delete("kept").await.unwrap();
    registry.delete("t").await.unwrap();
    coordinator.topic_deleted("kept");
    coordinator.topic_deleted("t");
    assert!(coordinator.list().is_empty());
    assert!(matches!(
        coordinator.describe("standalone"),
        Err(BrokerError::GroupNotFound { .. })
    ));
    registry.close().await.unwrap();
}

/// A data dir from before topic ids: commits stored without an id belong to the topic that got
/// its id at the upgrade, and to no later incarnation.
#[tokio::test]
async fn given_commits_without_topic_id_should_belong_to_the_upgraded_topic_only() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (registry, coordinator) = open(dir.path(), 0).await;
        create_with_records(&registry, "t", 4).await;
        let commits = standalone_commit("t", 4).offsets;
        let appended = coordinator
            .offsets
            .append("standalone", &commits, &[String::new()], 0)
            .unwrap();
        coordinator
            .offsets
            .publish("standalone", &commits, &[String::new()], appended, 0)
            .await
            .unwrap();
        registry.close().await.unwrap();
    }
    crate::topic::strip_topic_id_for_tests(&dir.path().join("t"));
    let (registry, coordinator) = open(dir.path(), 0).await;
    assert_eq!(committed_of(&coordinator), vec![("t".into(), 4)]);
    registry.delete("t").await.unwrap();
    create_with_records(&registry, "t", 1).await;
    assert!(committed_of(&coordinator).is_empty());
    registry.close().await.unwrap();
}

/// Issue 13 item 13: a member may not subscribe to an internal topic.
#[tokio::test]
async fn given_join_with_internal_topic_should_refuse_it() {
    let h = harness(1, 0).await;
    let joined = h.coordinator.join(v1::JoinGroupRequest {
        group: "g".into(),
        topics: vec!["t".into(), offsets::OFFSETS_TOPIC.into()],
        ..Default::default()
    });
    assert!(
        matches!(&joined, Err(BrokerError::InvalidRequest(m)) if m.contains("internal topic")),
        "{joined:?}"
    );
    assert!(h.coordinator.list().is_empty(), "nothing joined");
}

/// Issue 13 item 13: a heartbeat that claims a partition the member does not hold (another
/// member's, an unassigned one, or one that does not exist) is refused and changes nothing;
/// a member still reporting a partition being revoked from it is the legitimate case.
#[tokio::test]
async fn given_heartbeat_claiming_partitions_not_held_should_refuse_and_change_nothing() {
    let h = harness(2, 0).await;
    let mut a = h.join(None);
    h.beat(&mut a);
    assert_eq!(a.reading.len(), 2);
    // A second member: one partition is to move from `a` to `b` (revoked, still held by `a`).
    let mut b = h.join(None);
    h.beat(&mut a);
    assert_eq!(a.reading.len(), 1, "told to give one up");
    let revoked: BTreeSet<(String, u32)> = h
        .owners()
        .into_iter()
        .filter(|(p, m)| *m == a.id && !a.reading.contains(p))
        .map(|(p, _)| p)
        .collect();
    assert_eq!(
        revoked.len(),
        1,
        "still held by `a` until it stops listing it"
    );
    let claim = |client: &Client, owned: BTreeSet<(String, u32)>| v1::HeartbeatRequest {
        group: "g".into(),
        member_id: client.id.clone(),
        member_epoch: client.epoch,
        owned: grouped(&owned),
    };
    // `a` reporting the partition being revoked from it is fine (and keeps it held).
    let mut still_reading = a.reading.clone();
    still_reading.extend(revoked.iter().cloned());
    h.coordinator
        .heartbeat(claim(&a, still_reading.clone()))
        .unwrap();
    let state = || {
        let described = h.coordinator.describe("g").unwrap();
        let members: Vec<_> = described
            .members
            .into_iter()
            .map(|m| (m.member_id, m.member_epoch, m.assignment, m.pending))
            .collect();
        (h.owners(), described.group_epoch, members)
    };
    let before = state();
    for bogus in [
        ("t".to_string(), 7),                   // no such partition
        ("nope".to_string(), 0),                // no such topic
        revoked.iter().next().unwrap().clone(), // held by `a`, not `b`
    ] {
        let refused = h
            .coordinator
            .heartbeat(claim(&b, BTreeSet::from([bogus.clone()])));
        assert!(
            matches!(&refused, Err(BrokerError::NotPartitionOwner { topic, partition, .. }) if (topic.clone(), *partition) == bogus),
            "{bogus:?}: {refused:?}"
        );
        let message = refused.unwrap_err().to_string();
        assert!(message.contains("does not own"), "{message}");
    }
    assert_eq!(state(), before, "refused heartbeats change nothing");
    // The hand-over still completes for correct clients.
    h.beat(&mut a);
    h.beat(&mut b);
    h.beat(&mut b);
    assert_eq!((a.reading.len(), b.reading.len()), (1, 1));
    assert_exclusive(&[&a, &b]);
}

/// Issue 13 item 1, with a member still running: after a delete and a re-create it can no
/// longer commit the deleted incarnation's position for the new topic (nor claim its
/// partitions); joining again it gets the new partitions with no committed offset.
#[tokio::test]
async fn given_member_reading_a_deleted_topic_should_not_commit_into_its_new_incarnation() {
    let h = harness(2, 0).await;
    let mut a = h.join(None);
    h.beat(&mut a);
    assert_eq!(a.reading.len(), 2);
    h._registry.delete("t").await.unwrap();
    h.coordinator.topic_deleted("t");
    create_with_records(&h._registry, "t", 5).await;
    let commit = h
        .coordinator
        .commit(v1::CommitOffsetsRequest {
            group: "g".into(),
            member_id: a.id.clone(),
            member_epoch: a.epoch,
            offsets: vec![v1::OffsetCommit {
                topic: "t".into(),
                partition: 0,
                offset: 3,
                metadata: String::new(),
                topic_id: String::new(),
            }],
        })
        .await;
    assert!(
        matches!(
            commit,
            Err(BrokerError::NotPartitionOwner { .. } | BrokerError::StaleMemberEpoch { .. })
        ),
        "{commit:?}"
    );
    let beat = h.coordinator.heartbeat(v1::HeartbeatRequest {
        group: "g".into(),
        member_id: a.id.clone(),
        member_epoch: a.epoch,
        owned: grouped(&a.reading),
    });
    assert!(beat.is_err(), "{beat:?}");
    // The client answers a refused heartbeat by joining again under its id.
    let rejoined = h
        .coordinator
        .join(v1::JoinGroupRequest {
            group: "g".into(),
            member_id: a.id.clone(),
            topics: vec!["t".into()],
            ..Default::default()
        })
        .unwrap();
    let mut again = Client {
        id: rejoined.member_id,
        epoch: rejoined.member_epoch,
        reading: flatten(&rejoined.assignment),
    };
    h.beat(&mut again);
    assert_eq!(
        again.reading,
        BTreeSet::from([("t".to_string(), 0)]),
        "the re-created topic has one partition"
    );
    assert!(h
        .coordinator
        .fetch_offsets(v1::FetchOffsetsRequest {
            group: "g".into(),
            partitions: Vec::new(),
        })
        .unwrap()
        .is_empty());
}

/// Review finding (issue 13 item 1): a standalone consumer that read the deleted incarnation
/// could still commit its old position onto the re-created topic. A commit that names the
/// incarnation it read from is refused once the topic is another one; without a name it is
/// taken as before.
#[tokio::test]
async fn given_commit_naming_a_deleted_incarnation_should_refuse_and_keep_the_new_topic_clean() {
    let dir = tempfile::tempdir().unwrap();
    let (registry, coordinator) = open(dir.path(), 0).await;
    create_with_records(&registry, "t", 5).await;
    let old_id = registry.get("t").unwrap().id.to_string();
    let naming = |offset: u64, topic_id: &str| {
        let mut request = standalone_commit("t", offset);
        request.offsets[0].topic_id = topic_id.to_string();
        request
    };
    coordinator.commit(naming(5, &old_id)).await.unwrap();
    registry.delete("t").await.unwrap();
    coordinator.topic_deleted("t");
    create_with_records(&registry, "t", 5).await;
    let new_id = registry.get("t").unwrap().id.to_string();
    assert_ne!(old_id, new_id);

    let refused = coordinator.commit(naming(4, &old_id)).await;
    assert!(
        matches!(&refused, Err(BrokerError::StaleTopicIncarnation { committed_for, current, .. })
            if *committed_for == old_id && *current == new_id),
        "{refused:?}"
    );
    assert_eq!(
        crate::server::status::to_status(refused.unwrap_err()).code(),
        tonic::Code::FailedPrecondition
    );
    assert!(committed_of(&coordinator).is_empty(), "nothing committed");
    coordinator.commit(naming(2, &new_id)).await.unwrap();
    coordinator.commit(standalone_commit("t", 3)).await.unwrap();
    assert_eq!(committed_of(&coordinator), vec![("t".into(), 3)]);
    registry.close().await.unwrap();
}
