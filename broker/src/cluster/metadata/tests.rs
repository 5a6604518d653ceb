//! Unit and model-based property tests of the metadata state machine.

use super::*;
use proptest::prelude::*;

fn register(id: u64) -> Command {
    Command::RegisterNode {
        id,
        address: format!("127.0.0.1:{}", 7450 + id),
        at_ms: 1,
        dir_id: format!("dir-{id}"),
    }
}

fn create(name: &str, id: &str, partitions: u32, replication_factor: u32) -> Command {
    Command::CreateTopic {
        name: name.into(),
        id: id.into(),
        partitions,
        replication_factor,
        settings: String::new(),
    }
}

#[test]
fn given_a_command_no_broker_would_propose_when_applied_should_change_nothing() {
    let mut metadata = Metadata::default();
    metadata.apply(&register(1)).unwrap();
    let before = metadata.clone();
    for bad in [
        create("../x", "a", 1, 1),
        create("", "a", 1, 1),
        create("t", "a", 0, 1),
        create("t", "a", u32::MAX, 1),
    ] {
        assert!(
            matches!(metadata.apply(&bad), Err(MetadataError::Invalid(_))),
            "{bad}"
        );
    }
    assert_eq!(metadata, before);
}

#[test]
fn given_three_nodes_when_a_topic_is_created_should_spread_it_and_never_use_a_down_node() {
    let mut metadata = Metadata::default();
    for id in 1..=3 {
        metadata.apply(&register(id)).unwrap();
    }
    metadata.apply(&create("t", "a", 6, 1)).unwrap();
    let mut leaders = BTreeMap::new();
    for p in &metadata.topics["t"].partitions {
        *leaders.entry(p.leader.unwrap()).or_insert(0) += 1;
    }
    assert_eq!(leaders, BTreeMap::from([(1, 2), (2, 2), (3, 2)]));

    metadata.apply(&Command::MarkDown { ids: vec![2] }).unwrap();
    metadata.apply(&create("u", "b", 4, 1)).unwrap();
    assert!(metadata.topics["u"]
        .partitions
        .iter()
        .all(|p| p.replicas != vec![2]));
    assert_eq!(
        metadata.apply(&create("v", "c", 1, 3)),
        Err(MetadataError::Placement(PlacementError::NotEnoughNodes {
            replication_factor: 3,
            live: 2
        }))
    );
    metadata
        .apply(&Command::Heartbeat { id: 2, at_ms: 5 })
        .unwrap();
    assert_eq!(metadata.live_nodes(), vec![1, 2, 3]);
}

#[test]
fn given_refused_commands_should_change_nothing() {
    let mut metadata = Metadata::default();
    metadata.apply(&register(1)).unwrap();
    metadata.apply(&create("t", "a", 2, 1)).unwrap();
    let before = metadata.clone();
    for (command, error) in [
        (
            create("t", "z", 1, 1),
            MetadataError::TopicExists("t".into()),
        ),
        (
            Command::DeleteTopic {
                name: "t".into(),
                id: "old".into(),
            },
            MetadataError::UnknownTopic {
                name: "t".into(),
                id: "old".into(),
            },
        ),
        (
            Command::Heartbeat { id: 9, at_ms: 1 },
            MetadataError::UnknownNode(9),
        ),
        (
            Command::MarkDown { ids: vec![1, 9] },
            MetadataError::UnknownNode(9),
        ),
    ] {
        assert_eq!(metadata.apply(&command), Err(error));
        assert_eq!(metadata, before);
    }
    metadata
        .apply(&Command::DeleteTopic {
            name: "t".into(),
            id: "a".into(),
        })
        .unwrap();
    assert!(metadata.topics.is_empty());
}

#[test]
fn given_a_deleted_incarnation_when_its_create_is_retried_should_not_bring_it_back() {
    let mut metadata = Metadata::default();
    metadata.apply(&register(1)).unwrap();
    metadata.apply(&create("t", "a", 2, 1)).unwrap();
    metadata
        .apply(&Command::DeleteTopic {
            name: "t".into(),
            id: "a".into(),
        })
        .unwrap();
    let deleted = metadata.clone();
    assert_eq!(metadata.apply(&create("t", "a", 2, 1)), Ok(()));
    assert_eq!(metadata, deleted);
    metadata.apply(&create("t", "b", 1, 1)).unwrap();
    assert_eq!(metadata.topics["t"].id, "b");
}

#[test]
fn given_a_leaving_node_should_take_no_new_replica_until_it_stays() {
    let mut metadata = Metadata::default();
    for id in 1..=4 {
        metadata.apply(&register(id)).unwrap();
    }
    metadata
        .apply(&Command::SetLeaving {
            id: 4,
            leaving: true,
        })
        .unwrap();
    // A re-registration (a restart, a new address) keeps the mark.
    metadata.apply(&register(4)).unwrap();
    assert!(metadata.nodes[&4].leaving);
    assert_eq!(metadata.live_nodes(), vec![1, 2, 3]);
    metadata.apply(&create("t", "a", 8, 3)).unwrap();
    let on_4 = |m: &Metadata| {
        m.topics["t"]
            .partitions
            .iter()
            .any(|p| p.holders().contains(&4))
    };
    assert!(!on_4(&metadata), "a new topic is placed on a leaving node");
    let before = metadata.clone();
    let refused = metadata.apply(&Command::Reassign {
        topic: "t".into(),
        id: "a".into(),
        partition: 0,
        replicas: vec![4, 2, 3],
        throttle_bytes_per_sec: 0,
        shrink: false,
    });
    match refused {
        Err(MetadataError::Refused(message)) => {
            assert!(message.contains("being removed"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(metadata, before);
    assert!(metadata
        .apply(&Command::SetLeaving {
            id: 9,
            leaving: true
        })
        .is_err());
    metadata
        .apply(&Command::SetLeaving {
            id: 4,
            leaving: false,
        })
        .unwrap();
    assert_eq!(metadata.live_nodes(), vec![1, 2, 3, 4]);
}

#[test]
fn given_a_single_replica_move_should_complete_only_once_fenced_and_cancel_back() {
    let mut metadata = Metadata::default();
    for id in 1..=3 {
        metadata.apply(&register(id)).unwrap();
    }
    metadata.apply(&create("s", "a", 1, 1)).unwrap();
    let from = metadata.topics["s"].partitions[0].replicas.clone();
    let to = vec![(1..=3).find(|n| !from.contains(n)).unwrap()];
    let reassign = Command::Reassign {
        topic: "s".into(),
        id: "a".into(),
        partition: 0,
        replicas: to.clone(),
        throttle_bytes_per_sec: 0,
        shrink: false,
    };
    let fence = |target: Vec<u64>| Command::FenceMove {
        topic: "s".into(),
        id: "a".into(),
        partition: 0,
        target,
    };
    let cancel = Command::CancelMove {
        topic: "s".into(),
        id: "a".into(),
        partition: 0,
        target: to.clone(),
    };
    let complete = Command::CompleteMove {
        topic: "s".into(),
        id: "a".into(),
        partition: 0,
        replicas: to.clone(),
    };
    let epoch = metadata.topics["s"].partitions[0].leader_epoch;
    // Nothing to fence or cancel before the move.
    assert!(metadata.apply(&fence(to.clone())).is_err());
    assert!(metadata.apply(&cancel).is_err());
    metadata.apply(&reassign).unwrap();
    // Not fenced: a completion is refused (the holder may still take writes).
    assert!(matches!(
        metadata.apply(&complete),
        Err(MetadataError::Refused(_))
    ));
    // A fence for another target changes nothing.
    assert!(metadata.apply(&fence(from.clone())).is_err());
    metadata.apply(&fence(to.clone())).unwrap();
    assert!(
        metadata.topics["s"].partitions[0]
            .moving
            .as_ref()
            .unwrap()
            .fenced
    );
    // Called off: the partition stays, unfenced, and a late completion is refused.
    metadata.apply(&cancel).unwrap();
    let p = &metadata.topics["s"].partitions[0];
    assert_eq!((p.replicas.clone(), p.moving.clone()), (from.clone(), None));
    assert!(metadata.apply(&complete).is_err());
    // Again, to the end: the new node leads in a new epoch.
    metadata.apply(&reassign).unwrap();
    metadata.apply(&fence(to.clone())).unwrap();
    metadata.apply(&complete).unwrap();
    let p = &metadata.topics["s"].partitions[0];
    assert_eq!(
        (p.replicas.clone(), p.leader, p.moving.clone()),
        (to.clone(), Some(to[0]), None)
    );
    assert!(p.leader_epoch > epoch);
    // A replicated partition has no fence.
    metadata.apply(&create("r", "b", 1, 3)).unwrap();
    assert!(metadata
        .apply(&Command::FenceMove {
            topic: "r".into(),
            id: "b".into(),
            partition: 0,
            target: vec![1, 2, 3],
        })
        .is_err());
}

#[test]
fn given_a_move_should_hold_both_sets_until_completed_and_refuse_bad_input() {
    let mut metadata = Metadata::default();
    for id in 1..=4 {
        metadata.apply(&register(id)).unwrap();
    }
    metadata.apply(&create("t", "a", 1, 3)).unwrap();
    let before = metadata.topics["t"].partitions[0].replicas.clone();
    let reassign = |replicas: Vec<u64>| Command::Reassign {
        topic: "t".into(),
        id: "a".into(),
        partition: 0,
        replicas,
        throttle_bytes_per_sec: 0,
        shrink: false,
    };
    let refused = |metadata: &mut Metadata, command: Command, wanted: &str| {
        let copy = metadata.clone();
        match metadata.apply(&command) {
            Err(MetadataError::Invalid(message) | MetadataError::Refused(message)) => {
                assert!(message.contains(wanted), "{message}")
            }
            other => panic!("{command}: {other:?}"),
        }
        assert_eq!(*metadata, copy);
    };
    refused(
        &mut metadata,
        reassign(vec![1, 2, 9]),
        "node 9 is not a member",
    );
    refused(&mut metadata, reassign(vec![1, 2]), "replication factor 3");
    refused(&mut metadata, reassign(vec![1, 1, 2]), "names a node twice");
    metadata.apply(&Command::MarkDown { ids: vec![4] }).unwrap();
    let target: Vec<u64> = vec![4, before[1], before[2]];
    refused(&mut metadata, reassign(target.clone()), "are down");
    metadata
        .apply(&Command::Heartbeat { id: 4, at_ms: 2 })
        .unwrap();
    metadata.apply(&reassign(target.clone())).unwrap();
    let p = &metadata.topics["t"].partitions[0];
    assert_eq!(p.replicas, before);
    let mut holders = p.holders();
    holders.sort_unstable();
    assert_eq!(holders.len(), 4);
    // Another target while moving is refused; the same is a retry.
    refused(&mut metadata, reassign(before.clone()), "already moving");
    metadata.apply(&reassign(target.clone())).unwrap();
    // A node holding or receiving a replica cannot be removed.
    refused(&mut metadata, Command::RemoveNode { id: 4 }, "still holds");
    refused(
        &mut metadata,
        Command::CompleteMove {
            topic: "t".into(),
            id: "a".into(),
            partition: 0,
            replicas: vec![1, 2, 3],
        }
        .clone(),
        if same_set(&target, &[1, 2, 3]) {
            ""
        } else {
            "not moving"
        },
    );
    let complete = Command::CompleteMove {
        topic: "t".into(),
        id: "a".into(),
        partition: 0,
        replicas: target.clone(),
    };
    metadata.apply(&complete).unwrap();
    let p = &metadata.topics["t"].partitions[0];
    assert_eq!(
        (p.replicas.clone(), p.moving.clone()),
        (target.clone(), None)
    );
    // A retried completion changes nothing.
    let done = metadata.clone();
    metadata.apply(&complete).unwrap();
    assert_eq!(metadata, done);
    // The node that left every replica set can be removed, twice.
    let gone = before[0];
    metadata.apply(&Command::RemoveNode { id: gone }).unwrap();
    metadata.apply(&Command::RemoveNode { id: gone }).unwrap();
    assert!(!metadata.nodes.contains_key(&gone));
}

fn command() -> impl Strategy<Value = Command> {
    prop_oneof![
        (1u64..5).prop_map(register),
        (1u64..5, 0u64..100).prop_map(|(id, at_ms)| Command::Heartbeat { id, at_ms }),
        proptest::collection::vec(1u64..5, 0..3).prop_map(|ids| Command::MarkDown { ids }),
        ("[a-c]", "[x-z]", 0u32..8, 1u32..3)
            .prop_map(|(name, id, partitions, rf)| { create(&name, &id, partitions, rf) }),
        ("[a-c]", "[x-z]").prop_map(|(name, id)| Command::DeleteTopic { name, id }),
        (
            "[a-c]",
            "[x-z]",
            0u32..3,
            proptest::collection::vec(1u64..6, 0..4)
        )
            .prop_map(|(topic, id, partition, replicas)| Command::Reassign {
                topic,
                id,
                partition,
                replicas,
                throttle_bytes_per_sec: 0,
                shrink: false,
            }),
        (
            "[a-c]",
            "[x-z]",
            0u32..3,
            proptest::collection::vec(1u64..6, 0..4)
        )
            .prop_map(|(topic, id, partition, replicas)| Command::CompleteMove {
                topic,
                id,
                partition,
                replicas,
            }),
        (
            "[a-c]",
            "[x-z]",
            0u32..3,
            proptest::collection::vec(1u64..6, 0..3),
            any::<bool>()
        )
            .prop_map(|(topic, id, partition, target, cancel)| if cancel {
                Command::CancelMove {
                    topic,
                    id,
                    partition,
                    target,
                }
            } else {
                Command::FenceMove {
                    topic,
                    id,
                    partition,
                    target,
                }
            }),
        (1u64..6, any::<bool>()).prop_map(|(id, leaving)| Command::SetLeaving { id, leaving }),
        (1u64..6).prop_map(|id| Command::RemoveNode { id }),
    ]
}

proptest! {
    /// Every node applying the same log reaches the same state (apply is deterministic),
    /// the state survives its snapshot encoding, and every partition's replicas are
    /// distinct registered nodes with the leader among them.
    #[test]
    fn applying_one_log_should_give_one_state(log in proptest::collection::vec(command(), 0..60)) {
        let mut a = Metadata::default();
        let mut b = Metadata::default();
        for command in &log {
            let ra = a.apply(command);
            let rb = b.apply(command);
            prop_assert_eq!(ra, rb);
        }
        prop_assert_eq!(&a, &b);
        let encoded = serde_json::to_string(&a).unwrap();
        let decoded: Metadata = serde_json::from_str(&encoded).unwrap();
        prop_assert_eq!(&decoded, &a);
        for topic in a.topics.values() {
            for p in &topic.partitions {
                let mut distinct = p.replicas.clone();
                distinct.sort_unstable();
                distinct.dedup();
                prop_assert_eq!(distinct.len(), topic.replication_factor as usize);
                prop_assert!(p.holders().iter().all(|n| a.nodes.contains_key(n)));
                prop_assert!(p.leader.is_none_or(|l| p.holders().contains(&l)));
                if let Some(moving) = &p.moving {
                    let mut target = moving.target.clone();
                    target.sort_unstable();
                    target.dedup();
                    prop_assert_eq!(target.len(), topic.replication_factor as usize);
                    prop_assert!(!same_set(&moving.target, &p.replicas));
                }
            }
        }
    }
}

#[test]
fn given_acl_commands_they_should_apply_all_or_nothing_and_survive_a_snapshot() {
    use crate::acl::{Acl, Effect, Operation, Pattern, Resource, ResourceKind};
    let read = Acl {
        principal: "alice".into(),
        effect: Effect::Allow,
        operation: Operation::Read,
        resource: Pattern {
            kind: ResourceKind::Topic,
            name: "orders".into(),
            prefix: false,
        },
    };
    let mut bad = read.clone();
    bad.operation = Operation::ClusterAdmin;
    let mut metadata = Metadata::default();
    let before = metadata.clone();
    assert!(metadata
        .apply(&Command::AddAcls {
            acls: vec![read.clone(), bad]
        })
        .is_err());
    assert_eq!(metadata, before, "a bad binding refuses the whole command");
    metadata
        .apply(&Command::AddAcls {
            acls: vec![read.clone()],
        })
        .unwrap();
    let decide = |m: &Metadata| {
        m.acls
            .decide("alice", Operation::Read, &Resource::topic("orders"))
    };
    assert_eq!(decide(&metadata), crate::acl::Decision::Allowed);
    // The controller's snapshot carries them; a snapshot from before ACLs has none.
    let encoded = serde_json::to_vec(&metadata).unwrap();
    let restored: Metadata = serde_json::from_slice(&encoded).unwrap();
    assert_eq!(decide(&restored), crate::acl::Decision::Allowed);
    let old: Metadata = serde_json::from_slice(&serde_json::to_vec(&before).unwrap()).unwrap();
    assert!(old.acls.is_empty());
    metadata
        .apply(&Command::RemoveAcls { acls: vec![read] })
        .unwrap();
    assert_eq!(decide(&metadata), crate::acl::Decision::NotAllowed);
}
