//! The cluster metadata the controller will replicate: nodes, topics, and per partition its
//! replica set, leader and leader epoch. Nothing per record.
//!
//! [`Metadata::apply`] is the controller's state machine: every node applies the committed
//! commands in log order, so apply is deterministic: no clock, no randomness (topic ids and
//! times arrive inside the commands, drawn by the node that proposed them) and no I/O. A
//! command that cannot apply (a duplicate topic, too few live nodes) changes nothing and
//! returns its error, which goes back to the proposer; the log entry still counts as applied.
//! The whole state is `serde`-encodable for the controller's snapshots.
//!
//! The openraft group that orders these commands is [`super::controller`]; its state machine
//! ([`super::raft::StateMachine`]) calls [`Metadata::apply`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::placement::{place, Load, PlacementError};

/// A broker node as the controller knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Its advertised `HOST:PORT`.
    pub address: String,
    /// Whether it heartbeats within the session timeout.
    pub alive: bool,
    /// When its last heartbeat was applied (ms since the epoch, from the command).
    pub last_heartbeat_ms: u64,
    /// The id of the data directory it registered from (empty: not known).
    #[serde(default)]
    pub dir_id: String,
    /// Being removed (`syncline cluster remove-node`): it takes no new replica, so that the
    /// drain that moves its replicas away finishes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub leaving: bool,
}

/// One partition's placement and leadership.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionMeta {
    /// Nodes holding a replica (the preferred leader first).
    pub replicas: Vec<u64>,
    /// The leading node (None while no replica is alive).
    pub leader: Option<u64>,
    /// Bumped at every leader change; stamped in batches as their leader epoch.
    pub leader_epoch: u64,
    /// A reassignment in progress (`Command::Reassign`), until `Command::CompleteMove`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moving: Option<Move>,
}

/// A partition's reassignment in progress: the group's leader adds the replicas that are new
/// as learners, waits until they caught up, changes the group's membership to `target`, then
/// proposes `Command::CompleteMove` (see `cluster::moves`). A partition of one replica has no
/// group: its new node copies it, the move is fenced (`Command::FenceMove`: the old node stops
/// taking writes), the new node copies the rest and completes it (see `cluster::copy`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Move {
    /// The replica set it moves to (the preferred leader first).
    pub target: Vec<u64>,
    /// Bytes per second the leader sends to the new replicas while they catch up (0: no limit).
    pub throttle_bytes_per_sec: u64,
    /// A move of a single replica in its last step: its node takes no writes for it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fenced: bool,
}

impl PartitionMeta {
    /// The nodes that hold (or are receiving) a replica: the replica set, and the target of
    /// a move in progress.
    pub fn holders(&self) -> Vec<u64> {
        let mut holders = self.replicas.clone();
        if let Some(moving) = &self.moving {
            for node in &moving.target {
                if !holders.contains(node) {
                    holders.push(*node);
                }
            }
        }
        holders
    }
}

/// A topic incarnation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicMeta {
    /// The incarnation id (`TopicId` text).
    pub id: String,
    /// Replicas per partition.
    pub replication_factor: u32,
    /// The topic's settings as the proposer encoded them (opaque here).
    pub settings: String,
    /// Its partitions, by number.
    pub partitions: Vec<PartitionMeta>,
}

/// A change to the metadata, as proposed to the controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// A node joins (or rejoins at a new address); it counts as alive.
    RegisterNode {
        /// Its id.
        id: u64,
        /// Its advertised address.
        address: String,
        /// When (ms since the epoch).
        at_ms: u64,
        /// Its data directory's id.
        #[serde(default)]
        dir_id: String,
    },
    /// A node is alive.
    Heartbeat {
        /// Its id.
        id: u64,
        /// When (ms since the epoch).
        at_ms: u64,
    },
    /// Nodes silent for the session timeout are down (the controller leader proposes this
    /// from its clock; apply only records it).
    MarkDown {
        /// Their ids.
        ids: Vec<u64>,
    },
    /// Create a topic, placed on the live nodes.
    CreateTopic {
        /// Its name.
        name: String,
        /// Its incarnation id.
        id: String,
        /// Partitions.
        partitions: u32,
        /// Replicas per partition.
        replication_factor: u32,
        /// Encoded settings.
        settings: String,
    },
    /// Delete a topic incarnation.
    DeleteTopic {
        /// Its name.
        name: String,
        /// The incarnation to delete (a stale delete of an older one is refused).
        id: String,
    },
    /// Replicated partitions elected leaders (each change applies only when its term is newer
    /// than the one recorded, so a late report never overwrites a newer leader).
    PartitionLeaders {
        /// The elections.
        changes: Vec<LeaderChange>,
    },
    /// Start moving a partition to another replica set (of the topic's replication factor,
    /// of registered nodes; new replicas must be alive). Moving to the replica set it has is
    /// done at once; a move to another target replaces one in progress only when it does not
    /// drop a replica the move already made a voter (the leader's driver refuses and the admin
    /// sees the move as in progress).
    Reassign {
        /// The topic.
        topic: String,
        /// Its incarnation.
        id: String,
        /// The partition.
        partition: u32,
        /// The replica set to move to (preferred leader first).
        replicas: Vec<u64>,
        /// Bytes per second sent to new replicas (0: no limit).
        throttle_bytes_per_sec: u64,
        /// Allow a replica set smaller than the replication factor (removing a node from a
        /// cluster too small to keep it, `--force`).
        #[serde(default)]
        shrink: bool,
    },
    /// A move is done: the group's voters are `replicas` (applies only when they are the
    /// move's target, so a stale report changes nothing).
    CompleteMove {
        /// The topic.
        topic: String,
        /// Its incarnation.
        id: String,
        /// The partition.
        partition: u32,
        /// The group's voters now.
        replicas: Vec<u64>,
    },
    /// The last step of moving a partition of one replica: its node stops taking writes for it
    /// so that the new node copies the rest (applies only while it moves to `target`).
    FenceMove {
        /// The topic.
        topic: String,
        /// Its incarnation.
        id: String,
        /// The partition.
        partition: u32,
        /// The move's target.
        target: Vec<u64>,
    },
    /// A move to `target` is called off: the partition stays where it is (and a fenced one
    /// takes writes again). Applies only while it moves to `target`.
    CancelMove {
        /// The topic.
        topic: String,
        /// Its incarnation.
        id: String,
        /// The partition.
        partition: u32,
        /// The move's target.
        target: Vec<u64>,
    },
    /// A node is being removed (`leaving`: it takes no new replica from now on, so a move
    /// cannot land on it while it is drained) or stays after all.
    SetLeaving {
        /// Its id.
        id: u64,
        /// Whether it is being removed.
        leaving: bool,
    },
    /// A node leaves the cluster for good (refused while it holds a replica or a move targets
    /// it).
    RemoveNode {
        /// Its id.
        id: u64,
    },
    /// Grant or deny principals operations (`syncline acl add`): all bindings or none (one
    /// that is not well formed refuses the command).
    AddAcls {
        /// The bindings.
        acls: Vec<crate::acl::Acl>,
    },
    /// Drop bindings (`syncline acl remove`); ones not held are ignored.
    RemoveAcls {
        /// The bindings.
        acls: Vec<crate::acl::Acl>,
    },
}

/// A replicated partition's new leader, as the leader reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderChange {
    /// The topic's name.
    pub topic: String,
    /// Its incarnation (a report for a deleted incarnation changes nothing).
    pub id: String,
    /// The partition.
    pub partition: u32,
    /// The leading node.
    pub leader: u64,
    /// The Raft term it leads in.
    pub term: u64,
}

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::RegisterNode { id, address, .. } => {
                write!(f, "register node {id} at {address}")
            }
            Command::Heartbeat { id, .. } => write!(f, "heartbeat of node {id}"),
            Command::MarkDown { ids } => write!(f, "mark nodes {ids:?} down"),
            Command::CreateTopic {
                name,
                id,
                partitions,
                ..
            } => {
                write!(f, "create topic {name} ({id}, {partitions} partitions)")
            }
            Command::DeleteTopic { name, id } => write!(f, "delete topic {name} ({id})"),
            Command::PartitionLeaders { changes } => {
                write!(f, "{} partition leader change(s)", changes.len())
            }
            Command::Reassign {
                topic,
                partition,
                replicas,
                ..
            } => write!(f, "move {topic}/{partition} to nodes {replicas:?}"),
            Command::CompleteMove {
                topic,
                partition,
                replicas,
                ..
            } => write!(f, "{topic}/{partition} moved to nodes {replicas:?}"),
            Command::FenceMove {
                topic, partition, ..
            } => write!(f, "fence {topic}/{partition} for the end of its move"),
            Command::CancelMove {
                topic,
                partition,
                target,
                ..
            } => write!(f, "cancel moving {topic}/{partition} to nodes {target:?}"),
            Command::SetLeaving { id, leaving: true } => {
                write!(f, "node {id} is being removed")
            }
            Command::SetLeaving { id, leaving: false } => write!(f, "node {id} stays"),
            Command::RemoveNode { id } => write!(f, "remove node {id}"),
            Command::AddAcls { acls } => write!(f, "add {} ACL(s)", acls.len()),
            Command::RemoveAcls { acls } => write!(f, "remove {} ACL(s)", acls.len()),
        }
    }
}

/// Deleted topic incarnations remembered (so a node that was down during a delete removes its
/// copy when it returns); the oldest are forgotten past this many. A node down across more
/// deletes than this keeps the forgotten topic's directory and warns about it.
pub const TOMBSTONES_MAX: usize = 10_000;

/// Why a command changed nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum MetadataError {
    /// CreateTopic of a name that exists.
    #[error("topic `{0}` already exists")]
    TopicExists(String),
    /// DeleteTopic of a name that does not exist, or of another incarnation.
    #[error("topic `{name}` with id {id} does not exist")]
    UnknownTopic {
        /// The name.
        name: String,
        /// The incarnation asked for.
        id: String,
    },
    /// A heartbeat or mark from a node that never registered.
    #[error("node {0} is not a member of the cluster")]
    UnknownNode(u64),
    /// The placement failed.
    #[error(transparent)]
    Placement(#[from] PlacementError),
    /// A command no broker would propose (a bad name, a partition count past the limit, a
    /// replica set of the wrong size).
    #[error("{0}")]
    Invalid(String),
    /// A command the cluster's state does not allow now (a partition already moving, a new
    /// replica on a node that is down, a node that still holds replicas).
    #[error("{0}")]
    Refused(String),
}

/// Partitions of one topic at most, whatever a proposer asked for (the brokers' own limit,
/// `max_partitions`, is checked before proposing; this bounds what apply allocates).
pub const PARTITIONS_MAX: u32 = 100_000;

/// A topic name a command may carry: `[A-Za-z0-9._-]{1,249}`, not `.` or `..`.
fn name_ok(name: &str) -> bool {
    (1..=249).contains(&name.len())
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The replicated cluster metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    /// Nodes by id.
    pub nodes: BTreeMap<u64, NodeInfo>,
    /// Topics by name.
    pub topics: BTreeMap<String, TopicMeta>,
    /// Ids of deleted topic incarnations, oldest first (at most [`TOMBSTONES_MAX`]).
    #[serde(default)]
    pub deleted: std::collections::VecDeque<String>,
    /// Who may do what (see `crate::acl`).
    #[serde(default, skip_serializing_if = "crate::acl::AclSet::is_empty")]
    pub acls: crate::acl::AclSet,
}

impl Metadata {
    /// The placement of partition `partition` of topic incarnation `topic_id` (a replication
    /// group's id), if the topic exists.
    pub fn partition_by_id(&self, topic_id: &str, partition: u32) -> Option<&PartitionMeta> {
        self.topics
            .values()
            .find(|t| t.id == topic_id)
            .and_then(|t| t.partitions.get(partition as usize))
    }

    /// The live nodes' ids, ascending.
    pub fn live_nodes(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .filter(|(_, node)| node.alive && !node.leaving)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Replicas and leaderships each node carries now.
    fn load(&self) -> BTreeMap<u64, Load> {
        let mut load: BTreeMap<u64, Load> = BTreeMap::new();
        for partition in self.topics.values().flat_map(|t| &t.partitions) {
            for node in &partition.replicas {
                load.entry(*node).or_default().replicas += 1;
            }
            if let Some(leader) = partition.leader {
                load.entry(leader).or_default().leaders += 1;
            }
        }
        load
    }

    /// Applies one committed command (see the module doc).
    pub fn apply(&mut self, command: &Command) -> Result<(), MetadataError> {
        match command {
            Command::RegisterNode {
                id,
                address,
                at_ms,
                dir_id,
            } => {
                let leaving = self.nodes.get(id).is_some_and(|n| n.leaving);
                self.nodes.insert(
                    *id,
                    NodeInfo {
                        address: address.clone(),
                        alive: true,
                        last_heartbeat_ms: *at_ms,
                        dir_id: dir_id.clone(),
                        leaving,
                    },
                );
                Ok(())
            }
            Command::SetLeaving { id, leaving } => {
                let node = self
                    .nodes
                    .get_mut(id)
                    .ok_or(MetadataError::UnknownNode(*id))?;
                node.leaving = *leaving;
                Ok(())
            }
            Command::Heartbeat { id, at_ms } => {
                let node = self
                    .nodes
                    .get_mut(id)
                    .ok_or(MetadataError::UnknownNode(*id))?;
                node.alive = true;
                node.last_heartbeat_ms = node.last_heartbeat_ms.max(*at_ms);
                Ok(())
            }
            Command::MarkDown { ids } => {
                if let Some(unknown) = ids.iter().find(|id| !self.nodes.contains_key(id)) {
                    return Err(MetadataError::UnknownNode(*unknown));
                }
                for id in ids {
                    if let Some(node) = self.nodes.get_mut(id) {
                        node.alive = false;
                    }
                }
                Ok(())
            }
            Command::CreateTopic {
                name,
                id,
                partitions,
                replication_factor,
                settings,
            } => {
                if !name_ok(name) || !(1..=PARTITIONS_MAX).contains(partitions) {
                    return Err(MetadataError::Invalid(format!(
                        "topic `{}` with {partitions} partitions: names are [A-Za-z0-9._-]{{1,249}} and partitions 1 to {PARTITIONS_MAX}",
                        name.chars().take(300).collect::<String>()
                    )));
                }
                // A retried proposal of an incarnation deleted since (its proposer did not
                // hear that it applied): it was done, then undone; it never comes back.
                if self.deleted.contains(id) {
                    return Ok(());
                }
                if let Some(existing) = self.topics.get(name) {
                    // The same incarnation again is a retried proposal: already done.
                    if existing.id == *id {
                        return Ok(());
                    }
                    return Err(MetadataError::TopicExists(name.clone()));
                }
                let mut load = self.load();
                let placed = place(
                    *partitions,
                    *replication_factor,
                    &self.live_nodes(),
                    &mut load,
                )?;
                let partitions = placed
                    .into_iter()
                    .map(|p| PartitionMeta {
                        leader: Some(p.leader()),
                        replicas: p.replicas,
                        leader_epoch: 0,
                        moving: None,
                    })
                    .collect();
                self.topics.insert(
                    name.clone(),
                    TopicMeta {
                        id: id.clone(),
                        replication_factor: *replication_factor,
                        settings: settings.clone(),
                        partitions,
                    },
                );
                Ok(())
            }
            Command::DeleteTopic { name, id } => match self.topics.get(name) {
                Some(topic) if topic.id == *id => {
                    self.topics.remove(name);
                    self.deleted.push_back(id.clone());
                    if self.deleted.len() > TOMBSTONES_MAX {
                        self.deleted.pop_front();
                    }
                    Ok(())
                }
                // A retried delete of an incarnation already deleted.
                _ if self.deleted.contains(id) => Ok(()),
                _ => Err(MetadataError::UnknownTopic {
                    name: name.clone(),
                    id: id.clone(),
                }),
            },
            Command::PartitionLeaders { changes } => {
                for change in changes {
                    let Some(topic) = self.topics.get_mut(&change.topic) else {
                        continue;
                    };
                    if topic.id != change.id {
                        continue;
                    }
                    let Some(partition) = topic.partitions.get_mut(change.partition as usize)
                    else {
                        continue;
                    };
                    if change.term > partition.leader_epoch
                        && partition.holders().contains(&change.leader)
                    {
                        partition.leader = Some(change.leader);
                        partition.leader_epoch = change.term;
                    }
                }
                Ok(())
            }
            Command::Reassign {
                topic,
                id,
                partition,
                replicas,
                throttle_bytes_per_sec,
                shrink,
            } => self.reassign(
                topic,
                id,
                *partition,
                replicas,
                *throttle_bytes_per_sec,
                *shrink,
            ),
            Command::CompleteMove {
                topic,
                id,
                partition,
                replicas,
            } => {
                let single = self.factor_of(topic, id) == 1;
                let meta = self.partition_mut(topic, id, *partition)?;
                match &meta.moving {
                    Some(moving) if single && !moving.fenced => Err(MetadataError::Refused(
                        format!("{topic}/{partition} is a single replica that is not fenced yet"),
                    )),
                    Some(moving) if same_set(&moving.target, replicas) => {
                        meta.replicas = moving.target.clone();
                        meta.moving = None;
                        if single {
                            // No group elects the new node: it leads from now on.
                            meta.leader = meta.replicas.first().copied();
                            meta.leader_epoch += 1;
                        } else if meta.leader.is_some_and(|l| !meta.replicas.contains(&l)) {
                            meta.leader = None;
                        }
                        Ok(())
                    }
                    // A retried report of a move already completed.
                    None if same_set(&meta.replicas, replicas) => Ok(()),
                    _ => Err(MetadataError::Refused(format!(
                        "{topic}/{partition} is not moving to nodes {replicas:?}"
                    ))),
                }
            }
            Command::FenceMove {
                topic,
                id,
                partition,
                target,
            } => {
                let single = self.factor_of(topic, id) == 1;
                let meta = self.partition_mut(topic, id, *partition)?;
                match &mut meta.moving {
                    Some(moving) if single && moving.target == *target => {
                        moving.fenced = true;
                        Ok(())
                    }
                    _ => Err(MetadataError::Refused(format!(
                        "{topic}/{partition} is not a single replica moving to nodes {target:?}"
                    ))),
                }
            }
            Command::CancelMove {
                topic,
                id,
                partition,
                target,
            } => {
                let meta = self.partition_mut(topic, id, *partition)?;
                match &meta.moving {
                    Some(moving) if moving.target == *target => {
                        meta.moving = None;
                        Ok(())
                    }
                    _ => Err(MetadataError::Refused(format!(
                        "{topic}/{partition} is not moving to nodes {target:?}"
                    ))),
                }
            }
            Command::RemoveNode { id } => {
                if !self.nodes.contains_key(id) {
                    // Already removed (a retried proposal).
                    return Ok(());
                }
                let holding: Vec<String> = self
                    .topics
                    .iter()
                    .flat_map(|(name, t)| {
                        t.partitions
                            .iter()
                            .enumerate()
                            .filter(|(_, p)| p.holders().contains(id))
                            .map(move |(n, _)| format!("{name}/{n}"))
                    })
                    .collect();
                if !holding.is_empty() {
                    return Err(MetadataError::Refused(format!(
                        "node {id} still holds {} replica(s) ({}{}): move them first",
                        holding.len(),
                        holding
                            .iter()
                            .take(5)
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", "),
                        if holding.len() > 5 { ", ..." } else { "" }
                    )));
                }
                self.nodes.remove(id);
                Ok(())
            }
            Command::AddAcls { acls } => self
                .acls
                .add(acls)
                .map(|_| ())
                .map_err(|e| MetadataError::Invalid(e.0)),
            Command::RemoveAcls { acls } => {
                self.acls.remove(acls);
                Ok(())
            }
        }
    }

    /// The replication factor of topic incarnation `id` (0 when it does not exist).
    fn factor_of(&self, topic: &str, id: &str) -> u32 {
        self.topics
            .get(topic)
            .filter(|t| t.id == id)
            .map_or(0, |t| t.replication_factor)
    }

    fn partition_mut(
        &mut self,
        topic: &str,
        id: &str,
        partition: u32,
    ) -> Result<&mut PartitionMeta, MetadataError> {
        let unknown = || MetadataError::UnknownTopic {
            name: topic.to_string(),
            id: id.to_string(),
        };
        let meta = self.topics.get_mut(topic).ok_or_else(unknown)?;
        if meta.id != id {
            return Err(unknown());
        }
        let partitions = meta.partitions.len();
        meta.partitions.get_mut(partition as usize).ok_or_else(|| {
            MetadataError::Invalid(format!(
                "topic `{topic}` has no partition {partition} (it has {partitions})"
            ))
        })
    }

    fn reassign(
        &mut self,
        topic: &str,
        id: &str,
        partition: u32,
        replicas: &[u64],
        throttle_bytes_per_sec: u64,
        shrink: bool,
    ) -> Result<(), MetadataError> {
        let invalid = |message: String| Err(MetadataError::Invalid(message));
        let mut distinct = replicas.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        if distinct.len() != replicas.len() {
            return invalid(format!("the replica set {replicas:?} names a node twice"));
        }
        if let Some(unknown) = replicas.iter().find(|n| !self.nodes.contains_key(n)) {
            return invalid(format!(
                "node {unknown} is not a member of the cluster (members: {:?})",
                self.nodes.keys().collect::<Vec<_>>()
            ));
        }
        let alive: Vec<u64> = self.live_nodes();
        let leaving: Vec<u64> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.leaving)
            .map(|(id, _)| *id)
            .collect();
        let factor = self
            .topics
            .get(topic)
            .filter(|t| t.id == id)
            .map_or(0, |t| t.replication_factor as usize);
        let meta = self.partition_mut(topic, id, partition)?;
        let size_ok = if shrink {
            (1..=factor).contains(&replicas.len())
        } else {
            replicas.len() == factor
        };
        if !size_ok {
            return invalid(format!(
                "topic `{topic}` has replication factor {factor}: give {factor} distinct node \
                 id(s), not {}",
                replicas.len()
            ));
        }
        let refused = |message: String| Err(MetadataError::Refused(message));
        if let Some(moving) = &mut meta.moving {
            if same_set(&moving.target, replicas) {
                // The move in progress again: a retried proposal, or a new throttle.
                moving.throttle_bytes_per_sec = throttle_bytes_per_sec;
                return Ok(());
            }
            return refused(format!(
                "{topic}/{partition} is already moving to nodes {:?}: wait until that move is \
                 done",
                moving.target
            ));
        }
        if same_set(&meta.replicas, replicas) {
            // Already there: a new preferred order at most.
            meta.replicas = replicas.to_vec();
            return Ok(());
        }
        if let Some(leaving) = replicas
            .iter()
            .find(|n| !meta.replicas.contains(n) && leaving.contains(n))
        {
            return refused(format!(
                "node {leaving} is being removed from the cluster: it takes no new replica"
            ));
        }
        let dead: Vec<u64> = replicas
            .iter()
            .copied()
            .filter(|n| !meta.replicas.contains(n) && !alive.contains(n))
            .collect();
        if !dead.is_empty() {
            return refused(format!(
                "node(s) {dead:?} are down: a new replica must be alive to catch up"
            ));
        }
        meta.moving = Some(Move {
            target: replicas.to_vec(),
            throttle_bytes_per_sec,
            fenced: false,
        });
        Ok(())
    }
}

/// Whether two replica sets hold the same nodes (in any order).
pub fn same_set(a: &[u64], b: &[u64]) -> bool {
    let mut a = a.to_vec();
    let mut b = b.to_vec();
    a.sort_unstable();
    b.sort_unstable();
    a == b
}

#[cfg(test)]
mod tests;
