//! Consumer-group administration: committed offsets (standalone commits, lookups), the list of
//! groups and one group's members, assignment and lag ([`Client::commit_offsets`],
//! [`Client::fetch_offsets`], [`Client::list_groups`], [`Client::describe_group`]).
//!
//! The types mirror the `syncline.v1` group messages with plain Rust types (`Option` instead of
//! empty strings, one [`TopicPartition`] per partition instead of `TopicPartitions` lists).

use std::collections::BTreeMap;

use syncline_proto::v1;

use crate::client::Client;
use crate::error::{Error, Result};

/// Most offsets one commit or lookup carries: the broker's limit per commit request.
pub const OFFSETS_PER_REQUEST_MAX: usize = 1000;

/// One partition of one topic.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TopicPartition {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: u32,
}

impl TopicPartition {
    /// `topic`/`partition`.
    pub fn new(topic: impl Into<String>, partition: u32) -> TopicPartition {
        TopicPartition {
            topic: topic.into(),
            partition,
        }
    }
}

impl std::fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

/// Flattens the wire's per-topic lists, sorted and without duplicates.
pub(crate) fn from_wire_partitions(lists: Vec<v1::TopicPartitions>) -> Vec<TopicPartition> {
    let mut partitions: Vec<TopicPartition> = lists
        .into_iter()
        .flat_map(|list| {
            let topic = list.topic;
            list.partitions
                .into_iter()
                .map(move |partition| TopicPartition::new(topic.clone(), partition))
        })
        .collect();
    partitions.sort();
    partitions.dedup();
    partitions
}

/// Groups partitions by topic (ascending partitions), as the wire wants them.
pub(crate) fn to_wire_partitions<'a>(
    partitions: impl IntoIterator<Item = &'a TopicPartition>,
) -> Vec<v1::TopicPartitions> {
    let mut by_topic: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
    for partition in partitions {
        by_topic
            .entry(&partition.topic)
            .or_default()
            .push(partition.partition);
    }
    by_topic
        .into_iter()
        .map(|(topic, mut partitions)| {
            partitions.sort_unstable();
            partitions.dedup();
            v1::TopicPartitions {
                topic: topic.to_owned(),
                partitions,
            }
        })
        .collect()
}

/// An offset to commit: the next offset the group will read from the partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffsetCommit {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: u32,
    /// The next offset to read (one past the last record processed).
    pub offset: u64,
    /// Free text stored with the offset (at most 4096 bytes).
    pub metadata: String,
    /// The topic incarnation ([`crate::TopicDescription::topic_id`]) the offset was read from;
    /// when set, the broker refuses the commit (FAILED_PRECONDITION) if the topic has since
    /// been deleted and created again. Empty: not checked.
    pub topic_id: String,
}

impl OffsetCommit {
    /// A commit of `offset` without metadata.
    pub fn new(topic: impl Into<String>, partition: u32, offset: u64) -> OffsetCommit {
        OffsetCommit {
            topic: topic.into(),
            partition,
            offset,
            metadata: String::new(),
            topic_id: String::new(),
        }
    }

    /// The same commit, refused by the broker unless the topic is still incarnation
    /// `topic_id`.
    pub fn for_incarnation(mut self, topic_id: impl Into<String>) -> OffsetCommit {
        self.topic_id = topic_id.into();
        self
    }

    pub(crate) fn to_wire(&self) -> v1::OffsetCommit {
        v1::OffsetCommit {
            topic: self.topic.clone(),
            partition: self.partition,
            offset: self.offset,
            metadata: self.metadata.clone(),
            topic_id: self.topic_id.clone(),
        }
    }
}

/// A group's committed offset of one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommittedOffset {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: u32,
    /// The next offset the group reads.
    pub offset: u64,
    /// What the committer stored with it.
    pub metadata: String,
    /// When it was committed, in ms since the Unix epoch.
    pub commit_timestamp_ms: i64,
}

impl CommittedOffset {
    fn from_wire(offset: v1::CommittedOffset) -> CommittedOffset {
        CommittedOffset {
            topic: offset.topic,
            partition: offset.partition,
            offset: offset.offset,
            metadata: offset.metadata,
            commit_timestamp_ms: offset.commit_timestamp_ms,
        }
    }
}

/// One line of a group listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSummary {
    /// The group's name.
    pub group: String,
    /// Its current members.
    pub members: u32,
    /// `empty`, `assigning` (initial delay), `reconciling` (partitions moving) or `stable`.
    pub state: String,
}

/// A group's members, assignment and per-partition lag ([`Client::describe_group`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupDescription {
    /// The group's name.
    pub group: String,
    /// `empty`, `assigning`, `reconciling` or `stable`.
    pub state: String,
    /// Bumped whenever the membership or the subscriptions change.
    pub group_epoch: u32,
    /// The members, by member id.
    pub members: Vec<GroupMember>,
    /// Every partition of the subscribed or committed topics, by topic and partition.
    pub partitions: Vec<PartitionLag>,
}

/// One member of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMember {
    /// The id the coordinator gave it.
    pub member_id: String,
    /// The free text the member sent (e.g. `host/pid`).
    pub client_id: String,
    /// Its current epoch.
    pub member_epoch: u32,
    /// The topics it subscribes to.
    pub topics: Vec<String>,
    /// What it was last told it may read.
    pub assignment: Vec<TopicPartition>,
    /// Assigned to it but still held by their previous owner.
    pub pending: Vec<TopicPartition>,
    /// Its session timeout.
    pub session_timeout_ms: u32,
    /// Time since its last heartbeat.
    pub last_heartbeat_ms_ago: u64,
}

/// The owner, committed offset and lag of one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionLag {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: u32,
    /// The member reading it, if any.
    pub owner: Option<String>,
    /// The group's committed offset, if it has one.
    pub committed_offset: Option<u64>,
    /// The partition's durable offset.
    pub end_offset: u64,
    /// Records not yet committed: end − committed (end − log start without a commit).
    pub lag: u64,
    /// Metadata stored with the committed offset.
    pub metadata: String,
}

impl GroupDescription {
    fn from_wire(response: v1::DescribeGroupResponse) -> GroupDescription {
        let mut members: Vec<GroupMember> = response
            .members
            .into_iter()
            .map(|member| GroupMember {
                member_id: member.member_id,
                client_id: member.client_id,
                member_epoch: member.member_epoch,
                topics: member.topics,
                assignment: from_wire_partitions(member.assignment),
                pending: from_wire_partitions(member.pending),
                session_timeout_ms: member.session_timeout_ms,
                last_heartbeat_ms_ago: member.last_heartbeat_ms_ago,
            })
            .collect();
        members.sort_by(|a, b| a.member_id.cmp(&b.member_id));
        let mut partitions: Vec<PartitionLag> = response
            .partitions
            .into_iter()
            .map(|partition| PartitionLag {
                topic: partition.topic,
                partition: partition.partition,
                owner: (!partition.member_id.is_empty()).then_some(partition.member_id),
                committed_offset: partition.committed_offset,
                end_offset: partition.end_offset,
                lag: partition.lag,
                metadata: partition.metadata,
            })
            .collect();
        partitions.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        GroupDescription {
            group: response.group,
            state: response.state,
            group_epoch: response.group_epoch,
            members,
            partitions,
        }
    }
}

fn too_many(what: &'static str, count: usize) -> Error {
    Error::InvalidConfig {
        key: what,
        reason: format!(
            "{count} partitions is above the maximum of {OFFSETS_PER_REQUEST_MAX} per request"
        ),
    }
}

impl Client {
    /// Commits offsets for `group` as a standalone consumer or admin tool (no member id). The
    /// broker refuses it with FAILED_PRECONDITION while the group has members: their commits
    /// would overwrite it.
    pub async fn commit_offsets(&self, group: &str, offsets: &[OffsetCommit]) -> Result<()> {
        if offsets.len() > OFFSETS_PER_REQUEST_MAX {
            return Err(too_many("offsets", offsets.len()));
        }
        let request = v1::CommitOffsetsRequest {
            group: group.to_owned(),
            member_id: String::new(),
            member_epoch: 0,
            offsets: offsets.iter().map(OffsetCommit::to_wire).collect(),
        };
        self.on_coordinator(group, |mut grpc| {
            let request = request.clone();
            async move { grpc.commit_offsets(request).await }
        })
        .await?;
        Ok(())
    }

    /// The committed offsets of `group`: of `partitions`, or every one it has with `None`.
    /// Partitions without a commit are left out. Sorted by topic and partition.
    pub async fn fetch_offsets(
        &self,
        group: &str,
        partitions: Option<&[TopicPartition]>,
    ) -> Result<Vec<CommittedOffset>> {
        if let Some(partitions) = partitions {
            if partitions.len() > OFFSETS_PER_REQUEST_MAX {
                return Err(too_many("partitions", partitions.len()));
            }
        }
        let request = v1::FetchOffsetsRequest {
            group: group.to_owned(),
            partitions: partitions.map(to_wire_partitions).unwrap_or_default(),
        };
        let response = self
            .on_coordinator(group, |mut grpc| {
                let request = request.clone();
                async move { grpc.fetch_offsets(request).await }
            })
            .await?;
        let mut offsets: Vec<CommittedOffset> = response
            .offsets
            .into_iter()
            .map(CommittedOffset::from_wire)
            .collect();
        offsets.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        Ok(offsets)
    }

    /// Every group the broker knows (with members or committed offsets), sorted by name. In a
    /// cluster each node coordinates a share of the groups: this asks every live node and
    /// merges the answers (a group two nodes report, while its coordinator moves, once).
    pub async fn list_groups(&self) -> Result<Vec<GroupSummary>> {
        let mut groups: Vec<GroupSummary> = Vec::new();
        for node in self.router().every_node() {
            let mut grpc = node.grpc.clone();
            let response = grpc
                .list_groups(v1::ListGroupsRequest {})
                .await
                .map_err(|status| Error::from_status(&node.address, status))?;
            groups.extend(
                response
                    .into_inner()
                    .groups
                    .into_iter()
                    .map(|group| GroupSummary {
                        group: group.group,
                        members: group.members,
                        state: group.state,
                    }),
            );
        }
        // The most members first within a name, so the coordinator's answer wins the dedup.
        groups.sort_by(|a, b| a.group.cmp(&b.group).then(b.members.cmp(&a.members)));
        groups.dedup_by(|later, first| later.group == first.group);
        Ok(groups)
    }

    /// A group's state, members and, per partition, owner, committed offset and lag. Fails with
    /// NOT_FOUND for an unknown group.
    pub async fn describe_group(&self, group: &str) -> Result<GroupDescription> {
        let request = v1::DescribeGroupRequest {
            group: group.to_owned(),
        };
        let response = self
            .on_coordinator(group, |mut grpc| {
                let request = request.clone();
                async move { grpc.describe_group(request).await }
            })
            .await?;
        Ok(GroupDescription::from_wire(response))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_should_round_trip_grouped_by_topic_and_sorted() {
        let partitions = vec![
            TopicPartition::new("b", 1),
            TopicPartition::new("a", 2),
            TopicPartition::new("a", 0),
            TopicPartition::new("a", 2),
        ];
        let wire = to_wire_partitions(&partitions);
        assert_eq!(wire.len(), 2);
        assert_eq!(wire[0].topic, "a");
        assert_eq!(wire[0].partitions, [0, 2]);
        assert_eq!(
            from_wire_partitions(wire),
            [
                TopicPartition::new("a", 0),
                TopicPartition::new("a", 2),
                TopicPartition::new("b", 1)
            ]
        );
    }

    #[test]
    fn description_should_map_empty_owner_to_none() {
        let description = GroupDescription::from_wire(v1::DescribeGroupResponse {
            group: "g".into(),
            state: "stable".into(),
            group_epoch: 3,
            members: vec![],
            partitions: vec![
                v1::PartitionLag {
                    topic: "t".into(),
                    partition: 1,
                    member_id: "m-1".into(),
                    committed_offset: Some(4),
                    end_offset: 10,
                    lag: 6,
                    metadata: String::new(),
                },
                v1::PartitionLag {
                    topic: "t".into(),
                    partition: 0,
                    end_offset: 3,
                    lag: 3,
                    ..Default::default()
                },
            ],
        });
        assert_eq!(description.partitions[0].partition, 0);
        assert_eq!(description.partitions[0].owner, None);
        assert_eq!(description.partitions[1].owner.as_deref(), Some("m-1"));
        assert_eq!(description.partitions[1].committed_offset, Some(4));
    }
}
