//! Errors of the broker layers above the log (topics, partitions, requests). The gRPC layer
//! maps them to statuses in one place (`server::status`).

use std::path::PathBuf;

use crate::log::{ConfigError, LogError};

/// A broker error: either the request is rejected (nothing changed) or the partition is broken.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// No such topic.
    #[error("topic `{topic}` does not exist")]
    TopicNotFound {
        /// The name asked for.
        topic: String,
    },
    /// A topic of that name exists already.
    #[error("topic `{topic}` already exists")]
    TopicExists {
        /// The name.
        topic: String,
    },
    /// The name breaks the naming rules.
    #[error("invalid topic name `{name}`: {reason}")]
    InvalidTopicName {
        /// The name given.
        name: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// A setting is out of bounds.
    #[error("invalid topic config: {0}")]
    InvalidConfig(#[from] ConfigError),
    /// The partition number is not in the topic.
    #[error(
        "topic `{topic}` has partitions 0..{partitions}; partition {partition} does not exist"
    )]
    PartitionNotFound {
        /// The topic.
        topic: String,
        /// The partition asked for.
        partition: u32,
        /// How many the topic has.
        partitions: u32,
    },
    /// No such consumer group.
    #[error("consumer group `{group}` does not exist (no member joined it and it has no committed offsets)")]
    GroupNotFound {
        /// The group.
        group: String,
    },
    /// The member is not (or no longer) in the group: its session expired, it left, or the
    /// broker restarted. Join again.
    #[error("member `{member}` is not in consumer group `{group}` (its session expired, it left, or the broker restarted): join again")]
    UnknownMember {
        /// The group.
        group: String,
        /// The member id.
        member: String,
    },
    /// The member's epoch is not the current one: it missed an assignment change.
    #[error("member `{member}` of group `{group}` sent epoch {got}, but its current epoch is {current}: join again")]
    StaleMemberEpoch {
        /// The group.
        group: String,
        /// The member id.
        member: String,
        /// The epoch in the request.
        got: u32,
        /// The member's current epoch.
        current: u32,
    },
    /// A commit that names a topic incarnation other than the current one.
    #[error("the offset for partition {partition} of topic `{topic}` was read from incarnation {committed_for}, but the topic was deleted and created again (now {current}): read the new topic from its start or look its offsets up again")]
    StaleTopicIncarnation {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// The incarnation the commit names.
        committed_for: String,
        /// The topic's current incarnation.
        current: String,
    },
    /// A commit for (or a heartbeat claiming) a partition the member does not own.
    #[error("member `{member}` of group `{group}` does not own partition {partition} of topic `{topic}`{owner}")]
    NotPartitionOwner {
        /// The group.
        group: String,
        /// The member id.
        member: String,
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// ", member X does", why it cannot be owned (no such partition), or "".
        owner: String,
    },
    /// A standalone commit (no member id) to a group that has members.
    #[error("consumer group `{group}` has {members} active member(s): only they can commit its offsets (stop them first)")]
    GroupHasMembers {
        /// The group.
        group: String,
        /// How many.
        members: usize,
    },
    /// A keyed record was sent to a partition its key does not map to.
    #[error(
        "record {index} has a key that belongs to partition {expected} of topic `{topic}`, not {partition} (partition = murmur2(key) mod partitions)"
    )]
    WrongPartitionForKey {
        /// The topic.
        topic: String,
        /// Where it was sent.
        partition: u32,
        /// Where its key belongs.
        expected: u32,
        /// The record's index in the batch.
        index: usize,
    },
    /// The request itself is malformed.
    #[error("{0}")]
    InvalidRequest(String),
    /// The broker's response-bytes budget stayed taken by other responses for as long as a
    /// fetch waits for it.
    #[error("the broker is busy: its response-bytes budget (response_bytes_max = {budget_bytes}) stayed in use by other responses for {waited_ms} ms; retry later")]
    ResponseBudgetExhausted {
        /// The budget.
        budget_bytes: u64,
        /// How long the fetch waited.
        waited_ms: u64,
    },
    /// The request is larger than a limit allows.
    #[error("{0}")]
    TooLarge(String),
    /// The cluster controller failed a request (it is starting, or its storage failed).
    #[error("cluster controller: {0}")]
    Controller(String),
    /// No controller leader answered in time (an election is running, or a majority of the
    /// voters is down).
    #[error("the cluster controller is unavailable: {reason}")]
    ControllerUnavailable {
        /// Why.
        reason: String,
    },
    /// The controller refused a change (for example: too few live nodes for the placement).
    #[error("the cluster refused the change: {0}")]
    ClusterRefused(String),
    /// Another node holds the partition (or coordinates the group whose `__offsets` partition
    /// it is).
    #[error("this node does not lead partition {partition} of topic `{topic}`{}", match leader.id { Some(id) => format!("; node {id} at {} does", leader.address), None => "; its leader is not known yet".to_string() })]
    NotLeader {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// The node that leads it.
        leader: crate::partition::RemoteLeader,
    },
    /// A replicated write's outcome is not known: the leader lost its leadership (or stopped)
    /// after the write was proposed, so it may still commit under the next leader. An
    /// idempotent producer's retry is deduplicated; others may duplicate.
    #[error("partition {partition} of topic `{topic}`: {reason}")]
    Replication {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// What happened.
        reason: String,
    },
    /// The partition refused to open (interior corruption) and is fenced until an operator acts.
    #[error("partition {partition} of topic `{topic}` is fenced: {reason}")]
    Fenced {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// Why.
        reason: String,
    },
    /// The partition's log failed the operation.
    #[error("partition {partition} of topic `{topic}`: {source}")]
    Log {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// The log's error.
        #[source]
        source: LogError,
    },
    /// A table call on a topic that is not a table.
    #[error("topic `{topic}` is not a table: tables are topics created with cleanup=compact (`syncline topic create {topic} --cleanup compact`)")]
    NotATable {
        /// The topic.
        topic: String,
    },
    /// The key has no live value (never written, or deleted).
    #[error("key `{key}` not found in table `{topic}`")]
    KeyNotFound {
        /// The topic.
        topic: String,
        /// The key, escaped for printing.
        key: String,
    },
    /// A compare-and-set condition failed; nothing was appended.
    #[error("{message}")]
    CasConflict {
        /// What failed, for people.
        message: String,
        /// The current version of every conditioned key.
        current: Vec<syncline_proto::v1::KeyVersion>,
    },
    /// A snapshot found the log disagreeing with the key index: the record the index names as
    /// a key's live value is missing or is not a live value. A compaction bug or corruption;
    /// the snapshot stops instead of skipping the key.
    #[error("snapshot of partition {partition} of topic `{topic}` is inconsistent at offset {offset}: {reason}")]
    SnapshotInconsistent {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// The offset the key index names.
        offset: u64,
        /// What the log holds instead.
        reason: String,
    },
    /// An idempotent producer's batch was refused.
    #[error(transparent)]
    Sequence(#[from] crate::state::SequenceError),
    /// The broker is shutting down.
    #[error("the broker is shutting down")]
    ShuttingDown,
    /// The call's principal may not do what it asks (`server::authorize`).
    #[error("principal `{principal}` may not {operation} {resource}: {why}")]
    PermissionDenied {
        /// Who called.
        principal: String,
        /// The operation (`read`, `write`, ...).
        operation: crate::acl::Operation,
        /// What it was asked for (`topic `orders``, `the cluster`).
        resource: String,
        /// Denied by an ACL, or allowed by none (and how to grant it).
        why: String,
    },
    /// The call carries no principal where one is needed.
    #[error("{0}")]
    Unauthenticated(String),
    /// Metadata I/O failed.
    #[error("I/O error while {context} {path}: {source}")]
    Io {
        /// What the broker was doing.
        context: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Another broker owns the data directory.
    #[error("data directory {dir} is in use by another broker (lock file {dir}/.lock is held)")]
    DataDirLocked {
        /// The directory.
        dir: PathBuf,
    },
    /// The data directory belongs to another node or cluster (or its identity file is bad).
    #[error("data directory {dir}: {message}")]
    DataDirIdentity {
        /// The directory.
        dir: PathBuf,
        /// What does not match, and what to do.
        message: String,
    },
    /// The data directory was written by an incompatible version.
    #[error("data directory {dir} has format `{found}`; this broker reads `{expected}`")]
    DataDirFormat {
        /// The directory.
        dir: PathBuf,
        /// What the format file says.
        found: String,
        /// What this version writes.
        expected: String,
    },
    /// The open-file limit is too low for the partitions (and connections) to be served.
    #[error("{partitions} partitions{} need about {needed} file descriptors but the limit (ulimit -n) is {limit}; raise it with `ulimit -n` (or LimitNOFILE= in a systemd unit){}", if *connections > 0 { format!(" and max_connections = {connections}") } else { String::new() }, if *connections > 0 { ", or lower max_connections" } else { "" })]
    TooFewDescriptors {
        /// Partitions (existing, plus any being created).
        partitions: u64,
        /// The explicitly set connection limit (0 when it is the default, which adapts).
        connections: u64,
        /// Descriptors they need with the connections and a margin (`descriptor_budget`).
        needed: u64,
        /// The soft RLIMIT_NOFILE after raising it to the hard limit.
        limit: u64,
    },
    /// Shutdown could not close every log cleanly (its data is safe, but the next start
    /// recovers it by scanning).
    #[error("{logs} partition log(s) could not be closed cleanly (see the errors above); the next start recovers them")]
    UncleanShutdown {
        /// How many logs failed to close.
        logs: usize,
    },
}

impl BrokerError {
    pub(crate) fn io(
        context: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        BrokerError::Io {
            context,
            path: path.into(),
            source,
        }
    }
}
