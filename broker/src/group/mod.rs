//! The consumer group coordinator, in the manner of Kafka's KIP-848: the broker computes each
//! group's assignment and members learn it from their heartbeats.
//!
//! ## State per group (in memory; committed offsets are durable in `__offsets`)
//! - members: id, subscribed topics, session timeout, last heartbeat, **member epoch** (bumped
//!   whenever what the member is told it may read changes), `assigned` (what it was last told);
//! - the **target assignment** (`assign.rs`): balanced and sticky, recomputed when members
//!   join, leave or expire (each bumps the **group epoch**);
//! - `owner`: partition -> the member that holds it now. A partition is handed to a member only
//!   when it has no owner; the old owner keeps it (and may commit for it) until a heartbeat
//!   from it no longer lists it in `owned`, or until it leaves or its session expires. So a
//!   partition is read by at most one member at a time, and a member that gives one up commits
//!   first.
//!
//! ## Protocol
//! - `JoinGroup` adds the member (or resets a rejoining one: its partitions are released, its
//!   epoch bumped). The first member of an empty group starts the **initial delay**
//!   (`group_initial_rebalance_delay_ms`): no partition is assigned before it ends, so members
//!   started together share the work from the first assignment.
//! - `Heartbeat(epoch, owned)`: the epoch must be the member's current one (else
//!   FAILED_PRECONDITION: rejoin). Partitions the member owns per the coordinator, that are no
//!   longer in its target and that it did not list in `owned`, are released. The response is
//!   the member's target minus partitions another member still holds.
//! - `CommitOffsets` from a member needs its current epoch and ownership of every partition;
//!   without a member id (a standalone consumer or an admin tool) only while the group has no
//!   members.
//! - Members that miss heartbeats for their session timeout are removed by [`Coordinator::expire`]
//!   (called by a ticker) and their partitions freed.
//!
//! Group membership is not persisted: after a broker restart members get NOT_FOUND and join
//! again; committed offsets survive.
//!
//! Committed offsets belong to a topic incarnation (`offsets` module doc): a commit made for a
//! topic that was deleted since is answered by no call (fetch, describe, list, lag metrics),
//! also when a topic of the same name exists again.

pub mod assign;
pub mod offsets;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use syncline_proto::v1;

use crate::error::BrokerError;
use crate::topic::{validate_topic_name, Registry};
use assign::{Subscriber, TopicPartition};
use offsets::OffsetStore;

/// Offsets per commit request.
pub const COMMIT_OFFSETS_MAX: usize = 1000;
/// Bytes of metadata per committed offset.
pub const COMMIT_METADATA_MAX: usize = 4096;
/// Members per group.
pub const GROUP_MEMBERS_MAX: usize = 1000;
/// Topics a member may subscribe to.
pub const MEMBER_TOPICS_MAX: usize = 100;
/// Groups with members at once.
pub const GROUPS_MAX: usize = 10_000;
/// Session timeout bounds.
pub const SESSION_TIMEOUT_MIN_MS: u32 = 1000;
/// Session timeout bounds.
pub const SESSION_TIMEOUT_MAX_MS: u32 = 300_000;

/// Coordinator settings (from the broker config).
#[derive(Debug, Clone, Copy)]
pub struct GroupConfig {
    /// Wait before the first assignment of a group that was empty.
    pub initial_rebalance_delay: Duration,
    /// How often members heartbeat.
    pub heartbeat_interval_ms: u32,
    /// Session timeout when a member asks for none.
    pub session_timeout_default_ms: u32,
}

#[derive(Debug)]
struct Member {
    client_id: String,
    topics: BTreeSet<String>,
    session_timeout: Duration,
    last_seen: Instant,
    epoch: u32,
    assigned: BTreeSet<TopicPartition>,
}

#[derive(Debug)]
struct Group {
    epoch: u32,
    members: BTreeMap<String, Member>,
    /// No assignment before this instant (the initial delay).
    assign_after: Instant,
    /// The target assignment; `None` until computed after the initial delay.
    target: Option<HashMap<TopicPartition, String>>,
    owner: HashMap<TopicPartition, String>,
}

impl Group {
    fn new(delay: Duration) -> Self {
        Group {
            epoch: 0,
            members: BTreeMap::new(),
            assign_after: Instant::now() + delay,
            target: None,
            owner: HashMap::new(),
        }
    }

    fn state(&self, now: Instant) -> &'static str {
        if self.members.is_empty() {
            "empty"
        } else if self.target.is_none() && now < self.assign_after {
            "assigning"
        } else if self.target.as_ref().is_some_and(|target| {
            target.iter().any(|(p, m)| self.owner.get(p) != Some(m))
                || self.owner.iter().any(|(p, m)| target.get(p) != Some(m))
        }) {
            "reconciling"
        } else {
            "stable"
        }
    }

    /// Recomputes the target (after the initial delay) for the current members.
    fn retarget(&mut self, registry: &Registry, now: Instant) {
        if self.members.is_empty() {
            self.target = None;
            return;
        }
        if self.target.is_none() && now < self.assign_after {
            return;
        }
        let topics: BTreeSet<&String> = self.members.values().flat_map(|m| &m.topics).collect();
        let partitions: BTreeMap<String, u32> = topics
            .into_iter()
            .filter_map(|t| {
                registry
                    .get(t)
                    .ok()
                    .map(|topic| (t.clone(), topic.settings.partitions))
            })
            .collect();
        let subscribers: Vec<Subscriber<'_>> = self
            .members
            .iter()
            .map(|(id, m)| Subscriber {
                id,
                topics: &m.topics,
            })
            .collect();
        let previous = self.target.take().unwrap_or_default();
        self.target = Some(assign::assign(&subscribers, &partitions, &previous));
    }

    /// What `member` may read now: its target minus partitions another member holds. Takes
    /// ownership of the free ones and bumps the member's epoch when the answer changed.
    fn reconcile(&mut self, member_id: &str) {
        let Some(member) = self.members.get(member_id) else {
            return;
        };
        let mut assigned = BTreeSet::new();
        if let Some(target) = &self.target {
            for (partition, owner) in target {
                if owner != member_id {
                    continue;
                }
                match self.owner.get(partition) {
                    Some(holder) if holder != member_id => {}
                    _ => {
                        assigned.insert(partition.clone());
                    }
                }
            }
        }
        for partition in &assigned {
            self.owner.insert(partition.clone(), member_id.to_string());
        }
        if assigned != member.assigned {
            if let Some(member) = self.members.get_mut(member_id) {
                member.epoch += 1;
                member.assigned = assigned;
            }
        }
    }

    fn release_all(&mut self, member_id: &str) {
        self.owner.retain(|_, holder| holder != member_id);
    }
}

fn grouped(partitions: &BTreeSet<TopicPartition>) -> Vec<v1::TopicPartitions> {
    let mut out: Vec<v1::TopicPartitions> = Vec::new();
    for (topic, partition) in partitions {
        match out.last_mut() {
            Some(last) if &last.topic == topic => last.partitions.push(*partition),
            _ => out.push(v1::TopicPartitions {
                topic: topic.clone(),
                partitions: vec![*partition],
            }),
        }
    }
    out
}

fn flatten(groups: &[v1::TopicPartitions]) -> BTreeSet<TopicPartition> {
    groups
        .iter()
        .flat_map(|g| g.partitions.iter().map(|p| (g.topic.clone(), *p)))
        .collect()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The `__offsets` partition that holds a group's commits: its coordinator is that partition's
/// leader. The group name hashed as a record key is (Kafka's murmur2), so the mapping is
/// stable for a given partition count.
pub fn coordinator_partition(group: &str, offsets_partitions: u32) -> Result<u32, BrokerError> {
    validate_group(group)?;
    Ok(syncline_proto::partitioner::partition_for_key(
        group.as_bytes(),
        offsets_partitions.max(1),
    ))
}

/// Group names follow the topic-name rules.
fn validate_group(group: &str) -> Result<(), BrokerError> {
    validate_topic_name(group).map_err(|error| match error {
        BrokerError::InvalidTopicName { name, reason } => {
            BrokerError::InvalidRequest(format!("invalid group name `{name}`: {reason}"))
        }
        other => other,
    })
}

/// Whether a commit stored for `topic` with `topic_id` belongs to the topic's current
/// incarnation.
fn is_current(registry: &Registry, topic: &str, topic_id: &str) -> bool {
    registry
        .get(topic)
        .is_ok_and(|topic| topic.owns_commit(topic_id))
}

/// The coordinator of every consumer group of this broker.
#[derive(Debug)]
pub struct Coordinator {
    registry: Arc<Registry>,
    config: GroupConfig,
    groups: Mutex<HashMap<String, Group>>,
    offsets: OffsetStore,
    ids: AtomicU64,
}

impl Coordinator {
    /// Opens the coordinator over `registry` and loads the committed offsets. A single node
    /// creates `__offsets` (one partition) on first use; in a cluster the controller creates
    /// it and the node attaches it when its metadata arrives ([`Coordinator::attach_offsets`]).
    pub async fn open(
        registry: Arc<Registry>,
        config: GroupConfig,
    ) -> Result<Coordinator, BrokerError> {
        let topic = if registry.config().node.is_clustered() {
            registry.get(offsets::OFFSETS_TOPIC).ok()
        } else {
            Some(registry.offsets_topic().await?)
        };
        let offsets = OffsetStore::default();
        let offsets = match topic {
            Some(topic) => tokio::task::spawn_blocking(move || {
                offsets.attach(&topic);
                offsets
            })
            .await
            .map_err(|e| BrokerError::InvalidRequest(format!("loading offsets failed: {e}")))?,
            None => offsets,
        };
        let stale = offsets.forget_stale(|topic, id| is_current(&registry, topic, id));
        if stale > 0 {
            tracing::info!(
                stale,
                "ignoring committed offsets of deleted topic incarnations"
            );
        }
        Ok(Coordinator {
            registry,
            config,
            groups: Mutex::new(HashMap::new()),
            offsets,
            ids: AtomicU64::new(now_ms() as u64),
        })
    }

    /// Attaches `__offsets` as the cluster placed it (loads the partitions held here).
    pub fn attach_offsets(&self) {
        if let Ok(topic) = self.registry.get(offsets::OFFSETS_TOPIC) {
            tokio::task::block_in_place(|| self.offsets.attach(&topic));
        }
    }

    /// Whether this node coordinates `group`: else NotLeader naming the node that does.
    pub fn check_coordinator(&self, group: &str) -> Result<u32, BrokerError> {
        self.offsets
            .partition_of(group)
            .map(|partition| partition.id)
    }

    /// The `__offsets` partition `group` hashes to and its leader (this node when it holds it).
    pub fn coordinator_of(
        &self,
        group: &str,
    ) -> Result<(u32, Option<crate::partition::RemoteLeader>), BrokerError> {
        match self.offsets.partition_of(group) {
            Ok(partition) => Ok((partition.id, None)),
            Err(BrokerError::NotLeader {
                partition, leader, ..
            }) => Ok((partition, Some(leader))),
            Err(error) => Err(error),
        }
    }

    /// Absent: the broker default; an explicit value (0 included) must be within the bounds.
    fn session_timeout(&self, requested: Option<u32>) -> Result<Duration, BrokerError> {
        let ms = requested.unwrap_or(self.config.session_timeout_default_ms);
        if !(SESSION_TIMEOUT_MIN_MS..=SESSION_TIMEOUT_MAX_MS).contains(&ms) {
            return Err(BrokerError::InvalidRequest(format!(
                "`session_timeout_ms` {ms} is outside [{SESSION_TIMEOUT_MIN_MS}, {SESSION_TIMEOUT_MAX_MS}]: leave it unset for the broker default"
            )));
        }
        Ok(Duration::from_millis(u64::from(ms)))
    }

    /// Adds a member (or resets a rejoining one) and returns its first answer.
    pub fn join(
        &self,
        request: v1::JoinGroupRequest,
    ) -> Result<v1::JoinGroupResponse, BrokerError> {
        validate_group(&request.group)?;
        self.check_coordinator(&request.group)?;
        if request.topics.is_empty() {
            return Err(BrokerError::InvalidRequest(
                "a member must subscribe to at least one topic".into(),
            ));
        }
        if request.topics.len() > MEMBER_TOPICS_MAX {
            return Err(BrokerError::InvalidRequest(format!(
                "{} topics: a member subscribes to at most {MEMBER_TOPICS_MAX}",
                request.topics.len()
            )));
        }
        for topic in &request.topics {
            if topic.starts_with("__") {
                return Err(BrokerError::InvalidRequest(format!(
                    "`{topic}` is an internal topic: consumer groups cannot subscribe to it"
                )));
            }
            self.registry.get(topic)?;
        }
        if request.member_id.len() > 200 || request.client_id.len() > 200 {
            return Err(BrokerError::InvalidRequest(
                "member and client ids are at most 200 bytes".into(),
            ));
        }
        let session_timeout = self.session_timeout(request.session_timeout_ms)?;
        let now = Instant::now();
        let mut groups = self.groups.lock();
        if !groups.contains_key(&request.group) && groups.len() >= GROUPS_MAX {
            return Err(BrokerError::TooLarge(format!(
                "{GROUPS_MAX} consumer groups have members already"
            )));
        }
        let group = groups
            .entry(request.group.clone())
            .or_insert_with(|| Group::new(self.config.initial_rebalance_delay));
        if group.members.is_empty() {
            group.assign_after = now + self.config.initial_rebalance_delay;
            group.target = None;
        }
        let member_id = if request.member_id.is_empty() {
            format!(
                "{}-{:x}",
                if request.client_id.is_empty() {
                    "member"
                } else {
                    "m"
                },
                self.ids.fetch_add(1, Ordering::Relaxed)
            )
        } else {
            request.member_id.clone()
        };
        if !group.members.contains_key(&member_id) && group.members.len() >= GROUP_MEMBERS_MAX {
            return Err(BrokerError::TooLarge(format!(
                "group `{}` has {GROUP_MEMBERS_MAX} members already",
                request.group
            )));
        }
        let previous_epoch = group.members.get(&member_id).map_or(0, |m| m.epoch);
        group.release_all(&member_id);
        group.members.insert(
            member_id.clone(),
            Member {
                client_id: request.client_id,
                topics: request.topics.into_iter().collect(),
                session_timeout,
                last_seen: now,
                epoch: previous_epoch + 1,
                assigned: BTreeSet::new(),
            },
        );
        group.epoch += 1;
        group.retarget(&self.registry, now);
        group.reconcile(&member_id);
        let member = &group.members[&member_id];
        tracing::info!(group = %request.group, member = %member_id, epoch = member.epoch, members = group.members.len(), "member joined");
        Ok(v1::JoinGroupResponse {
            member_id,
            member_epoch: member.epoch,
            heartbeat_interval_ms: self.config.heartbeat_interval_ms,
            assignment: grouped(&member.assigned),
        })
    }

    fn check_member<'a>(
        group_name: &str,
        group: &'a Group,
        member_id: &str,
        epoch: u32,
    ) -> Result<&'a Member, BrokerError> {
        let member = group
            .members
            .get(member_id)
            .ok_or_else(|| BrokerError::UnknownMember {
                group: group_name.to_string(),
                member: member_id.to_string(),
            })?;
        if member.epoch != epoch {
            return Err(BrokerError::StaleMemberEpoch {
                group: group_name.to_string(),
                member: member_id.to_string(),
                got: epoch,
                current: member.epoch,
            });
        }
        Ok(member)
    }

    /// The group of a known member whose epoch is current (NOT_FOUND / FAILED_PRECONDITION
    /// otherwise).
    fn checked_group<'a>(
        groups: &'a mut HashMap<String, Group>,
        name: &str,
        member_id: &str,
        epoch: u32,
    ) -> Result<&'a mut Group, BrokerError> {
        let group = groups
            .get_mut(name)
            .ok_or_else(|| BrokerError::UnknownMember {
                group: name.to_string(),
                member: member_id.to_string(),
            })?;
        Self::check_member(name, group, member_id, epoch)?;
        Ok(group)
    }

    /// A member's heartbeat: releases what it gave up and answers what it may read now.
    pub fn heartbeat(
        &self,
        request: v1::HeartbeatRequest,
    ) -> Result<v1::HeartbeatResponse, BrokerError> {
        self.check_coordinator(&request.group)?;
        let now = Instant::now();
        let mut groups = self.groups.lock();
        let group = Self::checked_group(
            &mut groups,
            &request.group,
            &request.member_id,
            request.member_epoch,
        )?;
        // A member may report only partitions the coordinator says it holds (its assignment,
        // and those being revoked from it until it stops listing them): anything else is a
        // confused or hostile client, refused before anything changes.
        for claimed in &request.owned {
            for partition in &claimed.partitions {
                let key = (claimed.topic.clone(), *partition);
                let holder = group.owner.get(&key);
                if holder != Some(&request.member_id) {
                    return Err(BrokerError::NotPartitionOwner {
                        group: request.group.clone(),
                        member: request.member_id.clone(),
                        topic: claimed.topic.clone(),
                        partition: *partition,
                        owner: self.why_not_owner(holder, &claimed.topic, *partition),
                    });
                }
            }
        }
        let owned = flatten(&request.owned);
        // Released: held by this member, no longer its target, not reported as read.
        let target = &group.target;
        group.owner.retain(|partition, holder| {
            holder != &request.member_id
                || owned.contains(partition)
                || target.as_ref().and_then(|t| t.get(partition)) == Some(holder)
        });
        if group.target.is_none() {
            group.retarget(&self.registry, now);
        }
        group.reconcile(&request.member_id);
        let member = group.members.get_mut(&request.member_id).ok_or_else(|| {
            BrokerError::UnknownMember {
                group: request.group.clone(),
                member: request.member_id.clone(),
            }
        })?;
        member.last_seen = now;
        Ok(v1::HeartbeatResponse {
            member_epoch: member.epoch,
            heartbeat_interval_ms: self.config.heartbeat_interval_ms,
            assignment: grouped(&member.assigned),
        })
    }

    /// The tail of a [`BrokerError::NotPartitionOwner`] message: who holds the partition, or
    /// that it does not exist.
    fn why_not_owner(&self, holder: Option<&String>, topic: &str, partition: u32) -> String {
        if let Some(holder) = holder {
            return format!(", member `{holder}` does");
        }
        match self.registry.get(topic) {
            Err(_) => format!(" (no topic `{topic}` exists)"),
            Ok(found) if partition >= found.settings.partitions => format!(
                " (`{topic}` has {} partition(s))",
                found.settings.partitions
            ),
            Ok(_) => " (it was not assigned to it)".to_string(),
        }
    }

    /// Removes a member; its partitions are free at once.
    pub fn leave(&self, request: v1::LeaveGroupRequest) -> Result<(), BrokerError> {
        self.check_coordinator(&request.group)?;
        let now = Instant::now();
        let mut groups = self.groups.lock();
        let group = Self::checked_group(
            &mut groups,
            &request.group,
            &request.member_id,
            request.member_epoch,
        )?;
        Self::remove_member(
            &request.group,
            group,
            &request.member_id,
            &self.registry,
            now,
            "left",
        );
        if group.members.is_empty() {
            groups.remove(&request.group);
        }
        Ok(())
    }

    fn remove_member(
        name: &str,
        group: &mut Group,
        member_id: &str,
        registry: &Registry,
        now: Instant,
        why: &str,
    ) {
        group.members.remove(member_id);
        group.release_all(member_id);
        group.epoch += 1;
        group.retarget(registry, now);
        tracing::info!(group = %name, member = %member_id, members = group.members.len(), why, "member removed");
    }

    /// Removes members whose session expired. Call it periodically.
    pub fn expire(&self) {
        let now = Instant::now();
        let mut groups = self.groups.lock();
        let mut emptied = Vec::new();
        for (name, group) in groups.iter_mut() {
            let expired: Vec<String> = group
                .members
                .iter()
                .filter(|(_, m)| now.duration_since(m.last_seen) > m.session_timeout)
                .map(|(id, _)| id.clone())
                .collect();
            for member in expired {
                Self::remove_member(name, group, &member, &self.registry, now, "session expired");
                metrics::counter!(crate::metrics::GROUP_SESSIONS_EXPIRED_TOTAL).increment(1);
            }
            if group.members.is_empty() {
                emptied.push(name.clone());
            }
        }
        for name in emptied {
            groups.remove(&name);
        }
    }

    /// Commits offsets (after validation) durably.
    pub async fn commit(&self, request: v1::CommitOffsetsRequest) -> Result<(), BrokerError> {
        validate_group(&request.group)?;
        self.check_coordinator(&request.group)?;
        if request.offsets.len() > COMMIT_OFFSETS_MAX {
            return Err(BrokerError::InvalidRequest(format!(
                "{} offsets in one commit: at most {COMMIT_OFFSETS_MAX}",
                request.offsets.len()
            )));
        }
        let mut seen = BTreeSet::new();
        let mut topic_ids = Vec::with_capacity(request.offsets.len());
        for commit in &request.offsets {
            if commit.metadata.len() > COMMIT_METADATA_MAX {
                return Err(BrokerError::InvalidRequest(format!(
                    "metadata of {} bytes for {}/{}: at most {COMMIT_METADATA_MAX}",
                    commit.metadata.len(),
                    commit.topic,
                    commit.partition
                )));
            }
            if !seen.insert((commit.topic.clone(), commit.partition)) {
                return Err(BrokerError::InvalidRequest(format!(
                    "partition {} of `{}` appears twice in one commit",
                    commit.partition, commit.topic
                )));
            }
            let topic = self.registry.get(&commit.topic)?;
            let current = topic.id.to_string();
            if !commit.topic_id.is_empty() && commit.topic_id != current {
                return Err(BrokerError::StaleTopicIncarnation {
                    topic: commit.topic.clone(),
                    partition: commit.partition,
                    committed_for: commit.topic_id.clone(),
                    current,
                });
            }
            topic_ids.push(current);
            let partition = topic.partition(commit.partition)?;
            // In a cluster the partition may live on another node, or be led by another
            // replica: its end is not known here (as in Kafka, the offset is then stored
            // unchecked).
            if partition.remote_leader().is_some() || partition.check_leader().is_err() {
                continue;
            }
            let log = partition.log()?;
            let end = log.end_offset();
            if commit.offset > end {
                return Err(BrokerError::InvalidRequest(format!(
                    "offset {} for partition {} of `{}` is past its end ({end})",
                    commit.offset, commit.partition, commit.topic
                )));
            }
        }
        if request.offsets.is_empty() {
            return Ok(());
        }
        let now = now_ms();
        // The ownership check and the append happen under the group lock, so no other member
        // can take a partition over (and commit for it) between the two.
        let appended = {
            let groups = self.groups.lock();
            let group = groups.get(&request.group);
            if request.member_id.is_empty() {
                if let Some(group) = group.filter(|g| !g.members.is_empty()) {
                    return Err(BrokerError::GroupHasMembers {
                        group: request.group.clone(),
                        members: group.members.len(),
                    });
                }
            } else {
                let group = group.ok_or_else(|| BrokerError::UnknownMember {
                    group: request.group.clone(),
                    member: request.member_id.clone(),
                })?;
                Self::check_member(
                    &request.group,
                    group,
                    &request.member_id,
                    request.member_epoch,
                )?;
                for commit in &request.offsets {
                    let holder = group.owner.get(&(commit.topic.clone(), commit.partition));
                    if holder != Some(&request.member_id) {
                        return Err(BrokerError::NotPartitionOwner {
                            group: request.group.clone(),
                            member: request.member_id.clone(),
                            topic: commit.topic.clone(),
                            partition: commit.partition,
                            owner: holder.map_or(String::new(), |m| format!(", member `{m}` does")),
                        });
                    }
                }
            }
            self.offsets
                .append(&request.group, &request.offsets, &topic_ids, now)?
        };
        self.offsets
            .publish(&request.group, &request.offsets, &topic_ids, appended, now)
            .await
    }

    /// The committed offsets of `group` that belong to the current incarnation of their topic
    /// (all of them when `only` is empty).
    fn committed(
        &self,
        group: &str,
        only: &[(String, u32)],
    ) -> Result<offsets::GroupOffsets, BrokerError> {
        let mut offsets = self.offsets.fetch(group, only)?;
        offsets.retain(|((topic, _), c)| is_current(&self.registry, topic, &c.topic_id));
        Ok(offsets)
    }

    /// Call after `topic` was deleted: no member holds its partitions any more (a member that
    /// still reads the deleted incarnation cannot commit its position for a topic re-created
    /// under the name: its commits and heartbeats are refused and it joins again), and the
    /// committed offsets of deleted incarnations leave memory.
    pub fn topic_deleted(&self, topic: &str) {
        let now = Instant::now();
        {
            let mut groups = self.groups.lock();
            for group in groups.values_mut() {
                let held = group.owner.len();
                group.owner.retain(|(held_topic, _), _| held_topic != topic);
                let targeted = group
                    .target
                    .as_ref()
                    .is_some_and(|target| target.keys().any(|(t, _)| t == topic));
                if group.owner.len() != held || targeted {
                    group.epoch += 1;
                    group.retarget(&self.registry, now);
                }
            }
        }
        let registry = &self.registry;
        self.offsets
            .forget_stale(|topic, id| is_current(registry, topic, id));
    }

    /// Committed offsets of a group.
    pub fn fetch_offsets(
        &self,
        request: v1::FetchOffsetsRequest,
    ) -> Result<Vec<v1::CommittedOffset>, BrokerError> {
        validate_group(&request.group)?;
        let only: Vec<(String, u32)> = flatten(&request.partitions).into_iter().collect();
        Ok(self
            .committed(&request.group, &only)?
            .into_iter()
            .map(|((topic, partition), c)| v1::CommittedOffset {
                topic,
                partition,
                offset: c.offset,
                metadata: c.metadata,
                commit_timestamp_ms: c.timestamp_ms,
                topic_id: c.topic_id,
            })
            .collect())
    }

    /// Every group with members or committed offsets.
    pub fn list(&self) -> Vec<v1::GroupSummary> {
        let now = Instant::now();
        let groups = self.groups.lock();
        let mut names: BTreeSet<String> = groups.keys().cloned().collect();
        names.extend(
            self.offsets
                .groups()
                .into_iter()
                .filter(|name| self.committed(name, &[]).is_ok_and(|c| !c.is_empty())),
        );
        names
            .into_iter()
            .map(|name| match groups.get(&name) {
                Some(group) => v1::GroupSummary {
                    members: group.members.len() as u32,
                    state: group.state(now).to_string(),
                    group: name,
                },
                None => v1::GroupSummary {
                    group: name,
                    members: 0,
                    state: "empty".into(),
                },
            })
            .collect()
    }

    /// Members, assignment, committed offsets and lag of a group.
    pub fn describe(&self, name: &str) -> Result<v1::DescribeGroupResponse, BrokerError> {
        validate_group(name)?;
        self.check_coordinator(name)?;
        let now = Instant::now();
        let committed: BTreeMap<(String, u32), offsets::Committed> =
            self.committed(name, &[])?.into_iter().collect();
        let groups = self.groups.lock();
        let group = groups.get(name);
        if group.is_none() && committed.is_empty() {
            return Err(BrokerError::GroupNotFound {
                group: name.to_string(),
            });
        }
        let mut topics: BTreeSet<String> = committed.keys().map(|(t, _)| t.clone()).collect();
        let mut members = Vec::new();
        let mut owners: HashMap<TopicPartition, String> = HashMap::new();
        if let Some(group) = group {
            owners = group.owner.clone();
            for (id, member) in &group.members {
                topics.extend(member.topics.iter().cloned());
                let pending: BTreeSet<TopicPartition> = group
                    .target
                    .iter()
                    .flatten()
                    .filter(|(p, m)| *m == id && !member.assigned.contains(*p))
                    .map(|(p, _)| p.clone())
                    .collect();
                members.push(v1::GroupMember {
                    member_id: id.clone(),
                    client_id: member.client_id.clone(),
                    member_epoch: member.epoch,
                    topics: member.topics.iter().cloned().collect(),
                    assignment: grouped(&member.assigned),
                    pending: grouped(&pending),
                    session_timeout_ms: member.session_timeout.as_millis() as u32,
                    last_heartbeat_ms_ago: now.duration_since(member.last_seen).as_millis() as u64,
                });
            }
        }
        let mut partitions = Vec::new();
        for topic_name in topics {
            let Ok(topic) = self.registry.get(&topic_name) else {
                continue;
            };
            for partition in &topic.partitions {
                let key = (topic_name.clone(), partition.id);
                let (start, end) = partition
                    .log()
                    .map(|log| (log.start_offset(), log.durable_offset()))
                    .unwrap_or((0, 0));
                let commit = committed.get(&key);
                let lag = match commit {
                    Some(c) => end.saturating_sub(c.offset),
                    None => end.saturating_sub(start),
                };
                partitions.push(v1::PartitionLag {
                    topic: topic_name.clone(),
                    partition: partition.id,
                    member_id: owners.get(&key).cloned().unwrap_or_default(),
                    committed_offset: commit.map(|c| c.offset),
                    end_offset: end,
                    lag,
                    metadata: commit.map(|c| c.metadata.clone()).unwrap_or_default(),
                });
            }
        }
        Ok(v1::DescribeGroupResponse {
            group: name.to_string(),
            state: group.map_or("empty", |g| g.state(now)).to_string(),
            group_epoch: group.map_or(0, |g| g.epoch),
            members,
            partitions,
        })
    }

    /// (group, topic, partition, lag) of every committed partition, for metrics.
    pub fn lags(&self) -> Vec<(String, String, u32, u64)> {
        let mut out = Vec::new();
        for name in self.offsets.groups() {
            for ((topic, partition), committed) in self.committed(&name, &[]).unwrap_or_default() {
                let end = self
                    .registry
                    .get(&topic)
                    .ok()
                    .and_then(|t| t.partition(partition).ok().cloned())
                    .and_then(|p| p.log().ok().map(|l| l.durable_offset()));
                // A partition another node holds: its end (so the lag) is that node's to know.
                let Some(end) = end else { continue };
                out.push((
                    name.clone(),
                    topic,
                    partition,
                    end.saturating_sub(committed.offset),
                ));
            }
        }
        out
    }

    /// Members per group with members, for metrics.
    pub fn member_counts(&self) -> Vec<(String, usize)> {
        self.groups
            .lock()
            .iter()
            .map(|(name, group)| (name.clone(), group.members.len()))
            .collect()
    }
}

#[cfg(test)]
mod tests;
