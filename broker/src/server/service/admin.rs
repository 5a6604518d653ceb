//! Topic administration and cluster calls of the Broker service: topic descriptions, the
//! checks CreateTopic makes, DescribeCluster from the controller's metadata, the wait for a
//! topic another node just created, and CompactTopic's fan-out to the partitions' leaders.

use super::*;
use crate::cluster::metadata::PartitionMeta;
use std::time::Duration;

fn retention_override(
    value: Option<i64>,
    key: &'static str,
) -> Result<Option<Option<u64>>, ConfigError> {
    match value {
        None => Ok(None),
        Some(-1) => Ok(Some(None)),
        Some(v) if v > 0 => Ok(Some(Some(v as u64))),
        Some(v) => Err(ConfigError {
            key,
            message: format!("{v}: use a positive number, or -1 for no limit"),
        }),
    }
}

/// `message` as a call another node answers for itself only (it does not fan out again).
fn answered_locally<T>(message: T) -> Request<T> {
    let mut call = Request::new(message);
    call.metadata_mut().insert(
        LOCAL_ONLY_HEADER,
        tonic::metadata::MetadataValue::from_static("1"),
    );
    call
}

/// How long a call one node makes to another for a read (DescribeTopic, DescribeGroup
/// offsets) may take before its partitions are reported without it.
const FANOUT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// How long a CompactTopic handed to another node may take (a pass over a large partition is
/// slow; its outcome then says the node did not answer in time).
const COMPACT_FANOUT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

pub(super) fn describe(topic: &Topic) -> v1::TopicDescription {
    let settings = &topic.settings;
    let partitions = topic
        .partitions
        .iter()
        .map(|partition| match partition.log() {
            Ok(log) => {
                let info = log.info();
                let compaction = log.compaction_info();
                v1::PartitionDescription {
                    partition: partition.id,
                    log_start_offset: info.start_offset,
                    durable_offset: info.durable_offset,
                    log_end_offset: info.end_offset,
                    size_bytes: info.size_bytes,
                    segments: info.segments as u32,
                    error: String::new(),
                    dirty_ratio: compaction.dirty_ratio,
                    last_compaction_ms: compaction.last_run_ms,
                    bytes_reclaimed: compaction.bytes_reclaimed,
                    compaction_horizon: compaction.horizon,
                    records_kept_for_producers: compaction.records_kept_for_producers,
                }
            }
            Err(error) => v1::PartitionDescription {
                partition: partition.id,
                // A replica that does not lead (yet) says so: its own log may be behind.
                error: match partition.fence_reason() {
                    Some(reason) => reason.to_string(),
                    None if partition.is_replicated() => error.to_string(),
                    None => String::new(),
                },
                ..Default::default()
            },
        })
        .collect();
    v1::TopicDescription {
        name: topic.name.to_string(),
        config: Some(topic_config(settings)),
        partitions,
        topic_id: topic.id.to_string(),
    }
}

pub(super) fn cleanup_of(cleanup: Cleanup) -> v1::CleanupPolicy {
    match cleanup {
        Cleanup::Delete => v1::CleanupPolicy::Delete,
        Cleanup::Compact => v1::CleanupPolicy::Compact,
    }
}

fn topic_config(settings: &TopicSettings) -> v1::TopicConfig {
    let (fsync_policy, fsync_interval_ms) = match settings.log.fsync {
        FsyncPolicy::Always => (v1::FsyncPolicy::Always, None),
        FsyncPolicy::IntervalMs(ms) => (v1::FsyncPolicy::Interval, Some(ms)),
    };
    v1::TopicConfig {
        partitions: Some(settings.partitions),
        cleanup_policy: cleanup_of(settings.cleanup) as i32,
        retention_ms: Some(settings.log.retention_ms.map_or(-1, |v| v as i64)),
        retention_bytes: Some(settings.log.retention_bytes.map_or(-1, |v| v as i64)),
        segment_bytes: Some(settings.log.segment_bytes),
        segment_ms: Some(settings.log.segment_ms),
        fsync_policy: fsync_policy as i32,
        fsync_interval_ms,
        delete_retention_ms: Some(settings.log.delete_retention_ms),
        min_cleanable_dirty_ratio: Some(settings.log.min_cleanable_dirty_ratio),
        replication_factor: Some(settings.replication_factor),
    }
}

/// DescribeCluster from the controller's applied metadata, with the leaders of the replicated
/// partitions this node holds a replica of taken from their groups when a group knows a leader
/// of a later term than the metadata: a new leader reports itself to the controller through a
/// metadata write, which waits for the controller's own election when the controller's node
/// died with the partition's leader, so a client refreshing its routing after a failover would
/// otherwise be sent to the dead leader for seconds (measured: 3.2-3.5 s from a kill to the
/// first acknowledgement in that case, against ~0.6-1 s of partition election).
fn describe_clustered(
    controller: &crate::cluster::controller::Controller,
) -> v1::DescribeClusterResponse {
    let metadata = controller.metadata();
    let local: std::collections::HashMap<(String, u32), crate::replication::group::Leadership> =
        controller
            .replicas()
            .groups()
            .into_iter()
            .map(|group| {
                let leadership = *group.leadership().borrow();
                (
                    (group.id().topic_id.clone(), group.id().partition),
                    leadership,
                )
            })
            .collect();
    let leader_of = |topic_id: &str, partition: usize, placement: &PartitionMeta| {
        routed_leader(
            placement,
            local.get(&(topic_id.to_string(), partition as u32)),
        )
    };
    let nodes = metadata
        .nodes
        .iter()
        .map(|(id, node)| v1::ClusterNode {
            id: *id,
            address: node.address.clone(),
            alive: node.alive,
            leaving: node.leaving,
        })
        .collect();
    let partitions = metadata
        .topics
        .iter()
        .flat_map(|(name, topic)| {
            topic
                .partitions
                .iter()
                .enumerate()
                .map(move |(partition, placement)| {
                    let leader = leader_of(&topic.id, partition, placement);
                    v1::PartitionPlacement {
                        topic: name.clone(),
                        partition: partition as u32,
                        leader,
                        replicas: placement.replicas.clone(),
                        // The leader holds every committed record; with one replica it is the
                        // only one (replicated partitions: see `describe_cluster_call`).
                        caught_up: leader.into_iter().collect(),
                        target_replicas: placement
                            .moving
                            .as_ref()
                            .map(|m| m.target.clone())
                            .unwrap_or_default(),
                    }
                })
        })
        .collect();
    v1::DescribeClusterResponse {
        cluster_id: controller.cluster_id().to_string(),
        controller: controller.leader(),
        nodes,
        partitions,
        voters: controller.membership().0,
    }
}

/// The leader DescribeCluster names for a partition: the metadata's, unless this node's replica
/// of it (`seen`) knows a leader of a later term (the metadata learns it only through the
/// controller).
fn routed_leader(
    placement: &PartitionMeta,
    seen: Option<&crate::replication::group::Leadership>,
) -> Option<u64> {
    match seen {
        Some(seen) if seen.leader.is_some() && seen.term > placement.leader_epoch => seen.leader,
        _ => placement.leader,
    }
}

/// How long DescribeCluster with `replication_status` waits for the nodes leading replicated
/// partitions (only `cluster status` asks: clients refresh their routing without it).
const STATUS_FANOUT_TIMEOUT: Duration = Duration::from_secs(1);

/// The caught-up replicas of the partitions whose groups this node leads, by topic incarnation
/// id and partition, in each placement's replica order.
fn caught_up_here(
    controller: &crate::cluster::controller::Controller,
    metadata: &crate::cluster::metadata::Metadata,
) -> std::collections::HashMap<(String, u32), Vec<u64>> {
    let me = controller.node_id();
    let replicas_of = |topic_id: &str, partition: u32| {
        metadata
            .topics
            .values()
            .find(|t| t.id == topic_id)
            .and_then(|t| t.partitions.get(partition as usize))
            .map(|p| p.replicas.clone())
            .unwrap_or_default()
    };
    crate::replication::status::statuses(controller)
        .into_iter()
        .filter(|(_, status)| status.role == crate::replication::status::Role::Leader)
        .map(|(group, status)| {
            let id = group.id();
            let caught_up = status.caught_up(me);
            let ordered = replicas_of(&id.topic_id, id.partition)
                .into_iter()
                .filter(|node| caught_up.contains(node))
                .collect();
            ((id.topic_id.clone(), id.partition), ordered)
        })
        .collect()
}

/// The replication factor of a create: the request's, else the broker's default; a single
/// node serves only 1 (a cluster's placement refuses more than its live nodes).
fn replication_factor(
    requested: Option<u32>,
    default: u32,
    clustered: bool,
) -> Result<u32, Status> {
    match requested.unwrap_or(default) {
        0 => Err(Status::invalid_argument(
            "`replication_factor` 0 is outside [1, nodes]: leave it unset for the broker's default",
        )),
        factor if factor > 1 && !clustered => Err(Status::failed_precondition(format!(
            "replication factor {factor} needs {factor} nodes holding a replica of each \
             partition, but this broker runs alone: create the topic with replication \
             factor 1, or start a cluster (--cluster)"
        ))),
        factor => Ok(factor),
    }
}

/// How long a create of a replicated topic waits for its partitions' first elections.
const FIRST_ELECTION_WAIT: Duration = Duration::from_secs(10);

/// Waits (bounded) until every partition of a new replicated topic has elected a leader, so
/// that a producer starting right after the create finds them; a create is not refused for a
/// slow election (clients retry until a leader is known).
async fn wait_for_leaders(controller: &crate::cluster::controller::Controller, name: &str) {
    let elected = || {
        controller.view().with(|m| {
            m.topics
                .get(name)
                .is_none_or(|t| t.partitions.iter().all(|p| p.leader_epoch > 0))
        })
    };
    let mut applied = controller.view().subscribe();
    let deadline = tokio::time::Instant::now() + FIRST_ELECTION_WAIT;
    while !elected() {
        if tokio::time::timeout_at(deadline, applied.changed())
            .await
            .is_err()
        {
            tracing::warn!(topic = name, "partitions of a new topic have no leader after {FIRST_ELECTION_WAIT:?}; clients will retry until they do");
            return;
        }
    }
}

impl BrokerService {
    /// DescribeCluster in a cluster. With `replication_status`, the caught-up replicas of
    /// replicated partitions come from their leaders: this node's own groups, and one call per
    /// other leading node (marked local-only: that node answers for the groups it leads, and
    /// only those), concurrent, each bounded by [`STATUS_FANOUT_TIMEOUT`]; nodes the metadata
    /// has down are not asked. Asking leaders when someone looks costs nothing while nobody
    /// does, where leaders reporting every change to the controller would be a metadata write
    /// each time a follower falls behind or catches up.
    pub(super) async fn describe_cluster_call(
        &self,
        controller: &crate::cluster::controller::Controller,
        request: Request<v1::DescribeClusterRequest>,
    ) -> v1::DescribeClusterResponse {
        let local_only = request.metadata().contains_key(LOCAL_ONLY_HEADER);
        let mut response = describe_clustered(controller);
        if !request.get_ref().replication_status {
            return response;
        }
        let metadata = controller.metadata();
        let here = caught_up_here(controller, &metadata);
        let id_of = |topic: &str| metadata.topics.get(topic).map(|t| t.id.clone());
        if local_only {
            response.partitions.retain_mut(|p| {
                let found = id_of(&p.topic).and_then(|id| here.get(&(id, p.partition)));
                if let Some(caught_up) = found {
                    p.caught_up = caught_up.clone();
                    p.leader = Some(controller.node_id());
                }
                found.is_some()
            });
            return response;
        }
        let mut asks: std::collections::BTreeMap<String, Vec<usize>> =
            std::collections::BTreeMap::new();
        for (index, p) in response.partitions.iter_mut().enumerate() {
            let Some(topic) = metadata.topics.get(&p.topic) else {
                continue;
            };
            if topic.replication_factor <= 1 {
                continue;
            }
            p.caught_up = here
                .get(&(topic.id.clone(), p.partition))
                .cloned()
                .unwrap_or_default();
            let elsewhere = p
                .leader
                .filter(|leader| *leader != controller.node_id() && p.caught_up.is_empty())
                .and_then(|leader| metadata.nodes.get(&leader))
                .filter(|node| node.alive);
            if let Some(node) = elsewhere {
                asks.entry(node.address.clone()).or_default().push(index);
            }
        }
        let calls = asks.into_iter().map(|(address, indexes)| {
            let channel = controller.channel_to(&address);
            async move {
                let Ok(channel) = channel else {
                    return (indexes, Vec::new());
                };
                let mut client = syncline_proto::v1::broker_client::BrokerClient::new(channel);
                let call = answered_locally(v1::DescribeClusterRequest {
                    replication_status: true,
                });
                let answer =
                    tokio::time::timeout(STATUS_FANOUT_TIMEOUT, client.describe_cluster(call))
                        .await;
                match answer {
                    Ok(Ok(r)) => (indexes, r.into_inner().partitions),
                    Ok(Err(status)) => {
                        tracing::debug!(%address, %status, "no replication status from a leader");
                        (indexes, Vec::new())
                    }
                    Err(_) => {
                        tracing::debug!(%address, "no replication status from a leader in time");
                        (indexes, Vec::new())
                    }
                }
            }
        });
        for (indexes, theirs) in futures_util::future::join_all(calls).await {
            for index in indexes {
                let Some(slot) = response.partitions.get_mut(index) else {
                    continue;
                };
                if let Some(found) = theirs
                    .iter()
                    .find(|p| p.topic == slot.topic && p.partition == slot.partition)
                {
                    slot.caught_up = found.caught_up.clone();
                }
            }
        }
        response
    }

    /// The partitions of `topic` other nodes hold, by the address of the node leading them.
    fn held_elsewhere(topic: &Topic) -> std::collections::BTreeMap<String, Vec<u32>> {
        let mut by_node: std::collections::BTreeMap<String, Vec<u32>> =
            std::collections::BTreeMap::new();
        for partition in &topic.partitions {
            if let Some(leader) = partition.leader_elsewhere() {
                by_node
                    .entry(leader.address.clone())
                    .or_default()
                    .push(partition.id);
            }
        }
        by_node
    }

    /// DescribeTopic in a cluster: the partitions another node holds or leads are described
    /// by their leaders (one call per node, marked so that it does not fan out again): a
    /// replicated partition's log (start, durable = committed and applied on the leader, end)
    /// is the leader's wherever the call lands. A node that cannot be reached leaves its
    /// partitions with the error.
    pub(super) async fn describe_elsewhere(
        &self,
        topic: &Topic,
        description: &mut v1::TopicDescription,
    ) {
        let Some(controller) = &self.cluster.controller else {
            return;
        };
        let asks = Self::held_elsewhere(topic)
            .into_iter()
            .map(|(address, partitions)| {
                let channel = controller.channel_to(&address);
                let name = topic.name.to_string();
                async move {
                    let answer = match channel {
                        Ok(channel) => {
                            let mut client =
                                syncline_proto::v1::broker_client::BrokerClient::new(channel);
                            let call = answered_locally(v1::DescribeTopicRequest { name });
                            match tokio::time::timeout(FANOUT_TIMEOUT, client.describe_topic(call))
                                .await
                            {
                                Ok(Ok(r)) => Ok(r
                                    .into_inner()
                                    .topic
                                    .map(|t| t.partitions)
                                    .unwrap_or_default()),
                                Ok(Err(status)) => Err(status.message().to_string()),
                                Err(_) => Err(format!("no answer within {FANOUT_TIMEOUT:?}")),
                            }
                        }
                        Err(error) => Err(error.to_string()),
                    };
                    (address, partitions, answer)
                }
            });
        for (address, partitions, answer) in futures_util::future::join_all(asks).await {
            for slot in description
                .partitions
                .iter_mut()
                .filter(|p| partitions.contains(&p.partition))
            {
                match &answer {
                    Ok(found) => {
                        if let Some(theirs) = found.iter().find(|p| p.partition == slot.partition) {
                            *slot = theirs.clone();
                        }
                    }
                    Err(error) => slot.error = format!("node at {address}: {error}"),
                }
            }
        }
    }

    /// DescribeGroup in a cluster: the coordinator knows the ends of the partitions it holds
    /// only; the others' durable (and, without a commit, start) offsets come from their
    /// leaders (ListOffsets, bounded by [`FANOUT_TIMEOUT`]). A partition whose leader does not
    /// answer keeps end 0 and lag 0.
    pub(super) async fn describe_group_elsewhere(&self, response: &mut v1::DescribeGroupResponse) {
        let Some(controller) = &self.cluster.controller else {
            return;
        };
        let mut asks = Vec::new();
        for (index, lag) in response.partitions.iter().enumerate() {
            let Ok(topic) = self.registry.get(&lag.topic) else {
                continue;
            };
            let Ok(partition) = topic.partition(lag.partition) else {
                continue;
            };
            let Some(leader) = partition.leader_elsewhere() else {
                continue;
            };
            let Ok(channel) = controller.channel_to(&leader.address) else {
                continue;
            };
            let (topic, partition, committed) =
                (lag.topic.clone(), lag.partition, lag.committed_offset);
            asks.push(async move {
                let client = syncline_proto::v1::broker_client::BrokerClient::new(channel);
                let ask = |spec: v1::OffsetSpec| {
                    let request = v1::ListOffsetsRequest {
                        topic: topic.clone(),
                        partition,
                        spec: spec as i32,
                        timestamp_ms: 0,
                    };
                    let mut client = client.clone();
                    async move {
                        tokio::time::timeout(FANOUT_TIMEOUT, client.list_offsets(request))
                            .await
                            .ok()?
                            .ok()
                            .map(|r| r.into_inner().offset)
                    }
                };
                let end = ask(v1::OffsetSpec::Latest).await?;
                let from = match committed {
                    Some(offset) => offset,
                    None => ask(v1::OffsetSpec::Earliest).await?,
                };
                Some((index, end, end.saturating_sub(from)))
            });
        }
        for (index, end, lag) in futures_util::future::join_all(asks)
            .await
            .into_iter()
            .flatten()
        {
            if let Some(slot) = response.partitions.get_mut(index) {
                slot.end_offset = end;
                slot.lag = lag;
            }
        }
    }

    /// CompactTopic in a cluster: the partitions held elsewhere are compacted by their
    /// leaders (one call per node, marked so that it does not fan out again); their outcomes
    /// join this node's, in partition order. A node that cannot be reached gives its
    /// partitions an outcome with the error.
    async fn compact_elsewhere(
        &self,
        controller: &crate::cluster::controller::Controller,
        request: &v1::CompactTopicRequest,
        local_only: bool,
        outcomes: &mut Vec<v1::CompactionOutcome>,
    ) {
        let Ok(topic) = self.registry.get(&request.name) else {
            return;
        };
        if local_only {
            return;
        }
        let asks = Self::held_elsewhere(&topic)
            .into_iter()
            .map(|(address, partitions)| {
                let channel = controller.channel_to(&address);
                let request = request.clone();
                async move {
                    let answer = match channel {
                        Ok(channel) => {
                            let mut client =
                                syncline_proto::v1::broker_client::BrokerClient::new(channel);
                            let call = answered_locally(request);
                            match tokio::time::timeout(
                                COMPACT_FANOUT_TIMEOUT,
                                client.compact_topic(call),
                            )
                            .await
                            {
                                Ok(Ok(r)) => Ok(r.into_inner().partitions),
                                Ok(Err(status)) => Err(status.message().to_string()),
                                Err(_) => {
                                    Err(format!("no answer within {COMPACT_FANOUT_TIMEOUT:?}"))
                                }
                            }
                        }
                        Err(error) => Err(error.to_string()),
                    };
                    (address, partitions, answer)
                }
            });
        for (address, partitions, answer) in futures_util::future::join_all(asks).await {
            match answer {
                Ok(found) => outcomes.extend(
                    found
                        .into_iter()
                        .filter(|outcome| partitions.contains(&outcome.partition)),
                ),
                Err(error) => {
                    outcomes.extend(partitions.iter().map(|partition| v1::CompactionOutcome {
                        partition: *partition,
                        error: format!("node at {address}: {error}"),
                        ..Default::default()
                    }))
                }
            }
        }
        outcomes.sort_by_key(|outcome| outcome.partition);
    }

    /// In a cluster, waits (briefly) for a topic this node does not know yet: it may have
    /// just been created through another node, whose metadata reached the controller leader
    /// before this node. Nothing happens in a cluster of one or when the topic is known.
    pub(super) async fn await_topic(&self, name: &str) {
        if let Some(controller) = &self.cluster.controller {
            if self.registry.get(name).is_err() {
                if let Err(error) = controller.read_barrier(TOPIC_WAIT).await {
                    tracing::debug!(topic = name, %error, "read barrier for an unknown topic");
                }
            }
        }
    }

    pub(super) async fn create_topic_call(
        &self,
        request: Request<v1::CreateTopicRequest>,
    ) -> Result<Response<v1::CreateTopicResponse>, Status> {
        let request = request.into_inner();
        let config = request.config.unwrap_or_default();
        let node = &self.registry.config().node;
        let default_factor = match &self.cluster.controller {
            // min(3, the voters the cluster was formed with), as on the nodes that formed it.
            Some(controller) => node
                .default_replication_factor
                .unwrap_or_else(|| controller.formed_by().len().clamp(1, 3) as u32),
            None => node.replication_factor_default(),
        };
        let replication_factor = replication_factor(
            config.replication_factor,
            default_factor,
            self.cluster.controller.is_some(),
        )?;
        let cleanup = match v1::CleanupPolicy::try_from(config.cleanup_policy) {
            Ok(v1::CleanupPolicy::Unspecified) | Ok(v1::CleanupPolicy::Delete) => Cleanup::Delete,
            Ok(v1::CleanupPolicy::Compact) => Cleanup::Compact,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "unknown cleanup policy {}: use delete or compact",
                    config.cleanup_policy
                )))
            }
        };
        let fsync_policy = v1::FsyncPolicy::try_from(config.fsync_policy).map_err(|_| {
            Status::invalid_argument(format!(
                "unknown fsync policy {}: use always or interval",
                config.fsync_policy
            ))
        })?;
        let settings = self
            .registry
            .resolve_settings(config.partitions, Some(cleanup), |log| {
                if let Some(value) = retention_override(config.retention_ms, "retention_ms")? {
                    log.retention_ms = value;
                }
                if let Some(value) = retention_override(config.retention_bytes, "retention_bytes")?
                {
                    log.retention_bytes = value;
                }
                if let Some(bytes) = config.segment_bytes {
                    log.segment_bytes = bytes;
                }
                if let Some(ms) = config.segment_ms {
                    log.segment_ms = ms;
                }
                if let Some(ms) = config.delete_retention_ms {
                    log.delete_retention_ms = ms;
                }
                if let Some(ratio) = config.min_cleanable_dirty_ratio {
                    crate::config::check_dirty_ratio(ratio)?;
                    log.min_cleanable_dirty_ratio = ratio;
                }
                match fsync_policy {
                    v1::FsyncPolicy::Unspecified => {
                        // The broker's default policy, with this interval if it has one.
                        if let (FsyncPolicy::IntervalMs(_), Some(ms)) =
                            (log.fsync, config.fsync_interval_ms)
                        {
                            log.fsync = FsyncPolicy::IntervalMs(ms);
                        }
                    }
                    v1::FsyncPolicy::Always => log.fsync = parse_fsync("always", 0)?,
                    v1::FsyncPolicy::Interval => {
                        log.fsync =
                            parse_fsync("interval", config.fsync_interval_ms.unwrap_or(100))?
                    }
                }
                crate::config::check_fsync_interval(log.fsync, config.fsync_interval_ms)
            })
            .map_err(to_status)?;
        let mut settings = settings;
        settings.replication_factor = replication_factor;
        let topic = match &self.cluster.controller {
            None => self
                .registry
                .create(&request.name, settings)
                .await
                .map_err(to_status)?,
            Some(controller) => {
                crate::topic::validate_topic_name(&request.name).map_err(to_status)?;
                let (id, text) = self
                    .registry
                    .new_topic_text(&request.name, &settings)
                    .map_err(to_status)?;
                let command = crate::cluster::metadata::Command::CreateTopic {
                    name: request.name.clone(),
                    id: id.to_string(),
                    partitions: settings.partitions,
                    replication_factor,
                    settings: text,
                };
                controller
                    .propose(command)
                    .await
                    .map_err(to_status)?
                    .map_err(|e| to_status(e.into()))?;
                if replication_factor > 1 {
                    wait_for_leaders(controller, &request.name).await;
                }
                self.registry.get(&request.name).map_err(to_status)?
            }
        };
        Ok(Response::new(v1::CreateTopicResponse {
            topic: Some(describe(&topic)),
        }))
    }

    pub(super) async fn delete_topic_call(
        &self,
        request: Request<v1::DeleteTopicRequest>,
    ) -> Result<Response<v1::DeleteTopicResponse>, Status> {
        let name = request.into_inner().name;
        match &self.cluster.controller {
            None => self.registry.delete(&name).await.map_err(to_status)?,
            Some(controller) => {
                if name.starts_with("__") {
                    return Err(to_status(BrokerError::InvalidTopicName {
                        name,
                        reason: "internal topics cannot be deleted",
                    }));
                }
                self.await_topic(&name).await;
                let id = controller
                    .view()
                    .with(|m| m.topics.get(&name).map(|t| t.id.clone()))
                    .ok_or_else(|| {
                        to_status(BrokerError::TopicNotFound {
                            topic: name.clone(),
                        })
                    })?;
                let command = crate::cluster::metadata::Command::DeleteTopic {
                    name: name.clone(),
                    id,
                };
                controller
                    .propose(command)
                    .await
                    .map_err(to_status)?
                    .map_err(|e| to_status(e.into()))?;
            }
        }
        // Its committed offsets are already ignored (they carry the deleted incarnation's
        // id); this frees their memory and takes its partitions from group members.
        self.coordinator.topic_deleted(&name);
        Ok(Response::new(v1::DeleteTopicResponse {}))
    }

    pub(super) async fn compact_topic_call(
        &self,
        request: Request<v1::CompactTopicRequest>,
    ) -> Result<Response<v1::CompactTopicResponse>, Status> {
        let local_only = request.metadata().contains_key(LOCAL_ONLY_HEADER);
        let request = request.into_inner();
        self.check_running().map_err(to_status)?;
        self.await_topic(&request.name).await;
        let topic = self.registry.get(&request.name).map_err(to_status)?;
        if topic.settings.cleanup != Cleanup::Compact {
            return Err(to_status(BrokerError::NotATable {
                topic: request.name,
            }));
        }
        let options = self.registry.compact_options(&topic, request.roll);
        // One partition after another on a blocking thread, like the background cleaner
        // (one pass per log at a time; the throttle is shared).
        let outcomes = tokio::task::spawn_blocking(move || {
            topic
                .partitions
                .iter()
                .filter(|partition| partition.remote_leader().is_none())
                .map(|partition| match partition.compact(&options) {
                    Ok(outcome) => v1::CompactionOutcome {
                        partition: partition.id,
                        bytes_before: outcome.bytes_before,
                        bytes_after: outcome.bytes_after,
                        records_removed: outcome.records_removed,
                        tombstones_removed: outcome.tombstones_removed,
                        segments_before: outcome.segments_before as u32,
                        segments_after: outcome.segments_after as u32,
                        error: String::new(),
                        records_kept_for_producers: outcome.records_kept_for_producers,
                        batches_kept_for_producers: outcome.batches_kept_for_producers,
                    },
                    Err(error) => v1::CompactionOutcome {
                        partition: partition.id,
                        error: error.to_string(),
                        ..Default::default()
                    },
                })
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| Status::internal(format!("compaction task failed: {e}")))?;
        let mut outcomes = outcomes;
        if let Some(controller) = &self.cluster.controller {
            self.compact_elsewhere(controller, &request, local_only, &mut outcomes)
                .await;
        }
        Ok(Response::new(v1::CompactTopicResponse {
            partitions: outcomes,
        }))
    }

    pub(super) async fn find_coordinator_call(
        &self,
        request: Request<v1::FindCoordinatorRequest>,
    ) -> Result<Response<v1::FindCoordinatorResponse>, Status> {
        let group = request.into_inner().group;
        let offsets_partitions = self
            .registry
            .get(crate::group::offsets::OFFSETS_TOPIC)
            .map_or(1, |topic| topic.settings.partitions);
        if self.cluster.controller.is_some() {
            let (partition, leader) = self.coordinator.coordinator_of(&group).map_err(to_status)?;
            return Ok(Response::new(match leader {
                None => v1::FindCoordinatorResponse {
                    node_id: self.cluster.node_id,
                    address: self.cluster.address.clone(),
                    partition,
                },
                Some(crate::partition::RemoteLeader {
                    id: Some(node_id),
                    address,
                }) => v1::FindCoordinatorResponse {
                    node_id,
                    address,
                    partition,
                },
                Some(_) => {
                    return Err(Status::unavailable(format!(
                        "the coordinator of group `{group}` (partition {partition} of \
                         __offsets) has no leader right now"
                    )))
                }
            }));
        }
        let partition =
            crate::group::coordinator_partition(&group, offsets_partitions).map_err(to_status)?;
        // A cluster of one coordinates every group.
        Ok(Response::new(v1::FindCoordinatorResponse {
            node_id: self.cluster.node_id,
            address: self.cluster.address.clone(),
            partition,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::group::Leadership;

    fn placement(leader: Option<u64>, leader_epoch: u64) -> PartitionMeta {
        PartitionMeta {
            replicas: vec![1, 2, 3],
            leader,
            leader_epoch,
            moving: None,
        }
    }

    fn seen(leader: Option<u64>, term: u64) -> Leadership {
        Leadership {
            serving: false,
            leader,
            term,
        }
    }

    #[test]
    fn given_a_replica_knowing_a_later_leader_should_route_to_it_before_the_metadata_does() {
        // The controller's node died with the partition's leader: the metadata still names
        // the dead leader of term 2 while the surviving replicas elected node 2 in term 3.
        let stale = placement(Some(1), 2);
        assert_eq!(routed_leader(&stale, Some(&seen(Some(2), 3))), Some(2));
    }

    #[test]
    fn given_no_later_leader_here_should_route_by_the_metadata() {
        let current = placement(Some(1), 3);
        assert_eq!(routed_leader(&current, None), Some(1), "no replica here");
        assert_eq!(
            routed_leader(&current, Some(&seen(Some(1), 3))),
            Some(1),
            "same term"
        );
        assert_eq!(
            routed_leader(&current, Some(&seen(Some(2), 2))),
            Some(1),
            "a replica behind the metadata (cut off, or not yet caught up) is not believed"
        );
        assert_eq!(
            routed_leader(&current, Some(&seen(None, 4))),
            Some(1),
            "an election under way names nobody new"
        );
    }
}
