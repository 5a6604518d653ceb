//! Routing in a cluster against in-process mock nodes: pins that per-partition calls (list
//! offsets, fetch, get, produce) follow a `NotLeader` to the leader, that the view refreshes
//! after a lost connection, that group calls go to the coordinator `FindCoordinator` names (and
//! follow it when it moves), that ListGroups merges every node's share, and that brokers older
//! than clusters (UNIMPLEMENTED DescribeCluster / FindCoordinator) get everything on the
//! bootstrap connection. Each mock node serves only the calls these tests make; the cluster's
//! truth (who leads what) and what DescribeCluster reports can differ, as while leadership
//! moves. The mock is shared with `failover_tests`: its partitions keep one log that every
//! node serves (as replication would), with an idempotent producer's dedupe, and a node can
//! lag behind it or lose its leadership right after an append.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use syncline_proto::batch::BatchBuilder;
use syncline_proto::error_details::not_leader_status;
use syncline_proto::partitioner::partition_for_key;
use syncline_proto::v1;
use syncline_proto::v1::broker_server::{Broker, BrokerServer};
use tokio::sync::oneshot;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Code, Request, Response, Status};

use crate::tests::{encode_plain, request_error, serve_produce_stream, snapshot_records};
use crate::{
    Client, ConsumerConfig, Error, GroupConsumerConfig, OffsetQuery, OffsetReset, ProducerConfig,
    StartOffset,
};
use syncline_proto::batch::{stamp_base_offset, Batch};

/// Partitions of every mock topic.
pub(crate) const PARTITIONS: u32 = 2;
/// The table topic (cleanup=compact) for Get.
pub(crate) const TABLE: &str = "table";

#[derive(Debug, Default)]
pub(crate) struct Cluster {
    /// Node id -> advertised address.
    nodes: Vec<(u64, String)>,
    /// Who really leads each partition (the nodes check calls against it).
    pub(crate) leaders: HashMap<(String, u32), u64>,
    /// What DescribeCluster reports (may lag behind `leaders`).
    described: HashMap<(String, u32), u64>,
    /// Whether a NotLeader names the leader.
    pub(crate) name_leader: bool,
    describe_unimplemented: bool,
    find_coordinator_unimplemented: bool,
    pub(crate) coordinator: u64,
    /// Groups each node coordinates, for ListGroups.
    groups: HashMap<u64, Vec<String>>,
    /// `(node, rpc)` of every call.
    pub(crate) calls: Vec<(u64, &'static str)>,
    /// Each partition's log, the same on every node (as replicated); empty until a batch is
    /// produced or appended to it (Fetch then serves one made-up record, as before).
    pub(crate) logs: HashMap<(String, u32), Vec<Stored>>,
    /// Every produce request a node took: `(node, partition, producer id, epoch, base
    /// sequence, batch bytes)`.
    pub(crate) produced: Vec<(u64, u32, i64, i16, i32, Bytes)>,
    /// Per node: how far it has applied the logs (it serves reads only below this), as a new
    /// leader that has not yet applied every committed record.
    pub(crate) applied_max: HashMap<u64, u64>,
    /// The next append: right after it the node loses the partition's leadership (no leader
    /// while the election runs) and its answer is lost (the call fails UNAVAILABLE).
    pub(crate) crash_after_append: bool,
    /// The group's committed offsets FetchOffsets answers (one group per mock cluster).
    pub(crate) committed: Vec<(String, u32, u64)>,
}

/// One stored batch of a mock log.
#[derive(Debug, Clone)]
pub(crate) struct Stored {
    pub(crate) base_offset: u64,
    pub(crate) producer_id: i64,
    pub(crate) base_sequence: i32,
    pub(crate) count: u32,
    /// Stamped with its base offset.
    pub(crate) batch: Bytes,
}

impl Cluster {
    fn log_end(&self, topic: &str, partition: u32) -> u64 {
        self.logs
            .get(&(topic.to_owned(), partition))
            .and_then(|log| log.last())
            .map_or(0, |last| last.base_offset + u64::from(last.count))
    }

    /// What node `node` serves of a log: up to where it has applied.
    fn visible_end(&self, node: u64, topic: &str, partition: u32) -> u64 {
        let end = self.log_end(topic, partition);
        self.applied_max.get(&node).map_or(end, |&max| end.min(max))
    }

    /// Appends `batch` as the broker does: an idempotent producer's repeat of one of its last
    /// `PARTITION_WINDOW_BATCHES` batches is acknowledged with its original offsets, a sequence
    /// gap is OUT_OF_RANGE. Returns the first and last
    /// offsets.
    pub(crate) fn append(
        &mut self,
        topic: &str,
        partition: u32,
        batch: Bytes,
    ) -> Result<(u64, u64), Status> {
        let parsed =
            Batch::parse(batch.clone()).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let header = *parsed.header();
        let base_offset = self.log_end(topic, partition);
        let log = self.logs.entry((topic.to_owned(), partition)).or_default();
        let count = header.record_count;
        if header.producer_id >= 0 {
            let last = log
                .iter()
                .rev()
                .find(|stored| stored.producer_id == header.producer_id);
            // A repeat of one of the producer's last batches (as many as the broker keeps):
            // its original offsets.
            let repeat = log
                .iter()
                .rev()
                .filter(|stored| stored.producer_id == header.producer_id)
                .take(crate::PARTITION_WINDOW_BATCHES as usize)
                .find(|stored| stored.base_sequence == header.base_sequence);
            if let Some(done) = repeat {
                return Ok((
                    done.base_offset,
                    done.base_offset + u64::from(done.count) - 1,
                ));
            }
            let expected = last.map_or(0, |last| last.base_sequence + last.count as i32);
            if header.base_sequence != expected {
                return Err(Status::out_of_range(format!(
                    "out of order sequence {} (expected {expected})",
                    header.base_sequence
                )));
            }
        }
        let mut stamped = batch.to_vec();
        stamp_base_offset(&mut stamped, base_offset);
        log.push(Stored {
            base_offset,
            producer_id: header.producer_id,
            base_sequence: header.base_sequence,
            count,
            batch: Bytes::from(stamped),
        });
        Ok((base_offset, base_offset + u64::from(count) - 1))
    }

    /// The latest version of `key` in a log, `None` when absent or deleted.
    fn latest_version(&self, topic: &str, partition: u32, key: &[u8]) -> Option<u64> {
        let mut latest = None;
        for stored in self
            .logs
            .get(&(topic.to_owned(), partition))
            .into_iter()
            .flatten()
        {
            for record in Batch::parse(stored.batch.clone()).unwrap().records() {
                let record = record.unwrap();
                if record.key.as_deref() == Some(key) {
                    latest = record.value.is_some().then_some(record.offset);
                }
            }
        }
        latest
    }
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Shared(Arc<Mutex<Cluster>>);

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Cluster> {
        self.0.lock().unwrap()
    }

    pub(crate) fn calls(&self, node: u64, rpc: &str) -> usize {
        self.lock()
            .calls
            .iter()
            .filter(|(n, r)| *n == node && *r == rpc)
            .count()
    }

    /// Node `node` leads the partition now; 0: no node does (an election runs).
    pub(crate) fn lead(&self, topic: &str, partition: u32, node: u64) {
        self.lock()
            .leaders
            .insert((topic.to_owned(), partition), node);
    }

    /// The truth becomes what DescribeCluster reports.
    pub(crate) fn publish(&self) {
        let mut cluster = self.lock();
        cluster.described = cluster.leaders.clone();
    }
}

#[derive(Debug, Clone)]
struct MockNode {
    id: u64,
    shared: Shared,
}

impl MockNode {
    fn record(&self, rpc: &'static str) {
        self.shared.lock().calls.push((self.id, rpc));
    }

    /// Refuses a call for a partition this node does not lead, like a cluster node.
    fn check_leader(&self, topic: &str, partition: u32) -> Result<(), Status> {
        let cluster = self.shared.lock();
        let leader = *cluster
            .leaders
            .get(&(topic.to_owned(), partition))
            .ok_or_else(|| Status::not_found("no such partition"))?;
        if leader == self.id {
            return Ok(());
        }
        Err(not_leader(&cluster, topic, partition, leader))
    }

    /// Stores a produced batch if this node leads its partition; after it, a scripted crash
    /// (see [`Cluster::crash_after_append`]) loses the answer: `Ok(None)`.
    fn produce_batch(
        &self,
        topic: &str,
        partition: u32,
        batch: Bytes,
    ) -> Result<Option<(u64, u64)>, Status> {
        self.check_leader(topic, partition)?;
        let mut cluster = self.shared.lock();
        let header = *Batch::parse(batch.clone())
            .map_err(|e| Status::invalid_argument(e.to_string()))?
            .header();
        cluster.produced.push((
            self.id,
            partition,
            header.producer_id,
            header.producer_epoch,
            header.base_sequence,
            batch.clone(),
        ));
        let offsets = cluster.append(topic, partition, batch)?;
        if std::mem::take(&mut cluster.crash_after_append) {
            cluster.leaders.insert((topic.to_owned(), partition), 0);
            return Ok(None);
        }
        Ok(Some(offsets))
    }

    fn check_coordinator(&self) -> Result<(), Status> {
        let cluster = self.shared.lock();
        if cluster.coordinator == self.id || cluster.find_coordinator_unimplemented {
            return Ok(());
        }
        Err(not_leader(&cluster, "__offsets", 0, cluster.coordinator))
    }
}

/// A NotLeader as the broker sends it: its message (broker/src/error.rs, the only thing a
/// per-request error on a stream keeps) and the detail. Leader 0: none known (an election).
fn not_leader(cluster: &Cluster, topic: &str, partition: u32, leader: u64) -> Status {
    let address = cluster
        .nodes
        .iter()
        .find(|(id, _)| *id == leader)
        .map(|(_, address)| address.clone())
        .unwrap_or_default();
    let named = cluster.name_leader && leader != 0;
    let detail = v1::NotLeader {
        topic: topic.to_owned(),
        partition,
        leader_id: named.then_some(leader),
        leader_address: if named {
            address.clone()
        } else {
            String::new()
        },
    };
    let message = if named {
        format!(
            "this node does not lead partition {partition} of topic `{topic}`; node {leader} at \
             {address} does"
        )
    } else {
        format!(
            "this node does not lead partition {partition} of topic `{topic}`; its leader is \
             not known yet"
        )
    };
    not_leader_status(message, &detail)
}

/// The log's batches node `node` serves from `offset`: at most one (so a test sees each
/// step), `None` when there is nothing new; OUT_OF_RANGE past what the node applied.
fn read_log(
    cluster: &Cluster,
    node: u64,
    topic: &str,
    partition: u32,
    offset: u64,
) -> Result<Option<v1::FetchResponse>, Status> {
    let end = cluster.visible_end(node, topic, partition);
    if offset > end {
        return Err(Status::out_of_range(format!(
            "offset {offset} is out of range: the log holds offsets [0, {end}) and reads may \
             start at 0 through {end}"
        )));
    }
    let stored = cluster
        .logs
        .get(&(topic.to_owned(), partition))
        .into_iter()
        .flatten()
        .find(|stored| stored.base_offset + u64::from(stored.count) > offset)
        .filter(|stored| stored.base_offset + u64::from(stored.count) <= end);
    Ok(stored.map(|stored| v1::FetchResponse {
        partition,
        batches: stored.batch.clone(),
        next_offset: stored.base_offset + u64::from(stored.count),
        high_watermark: end,
        ..Default::default()
    }))
}

fn topic_description(name: &str) -> v1::TopicDescription {
    v1::TopicDescription {
        name: name.to_owned(),
        config: Some(v1::TopicConfig {
            partitions: Some(PARTITIONS),
            cleanup_policy: if name == TABLE {
                v1::CleanupPolicy::Compact as i32
            } else {
                v1::CleanupPolicy::Delete as i32
            },
            ..Default::default()
        }),
        partitions: (0..PARTITIONS)
            .map(|partition| v1::PartitionDescription {
                partition,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

type Answer<T> = Result<Response<T>, Status>;

/// The assignment the mock coordinator gives its one member.
fn every_events_partition() -> Vec<v1::TopicPartitions> {
    vec![v1::TopicPartitions {
        topic: "events".to_owned(),
        partitions: (0..PARTITIONS).collect(),
    }]
}

fn unimplemented<T>() -> Answer<T> {
    Err(Status::unimplemented("not in this mock"))
}

#[tonic::async_trait]
impl Broker for MockNode {
    async fn describe_cluster(
        &self,
        _: Request<v1::DescribeClusterRequest>,
    ) -> Answer<v1::DescribeClusterResponse> {
        self.record("DescribeCluster");
        let cluster = self.shared.lock();
        if cluster.describe_unimplemented {
            return unimplemented();
        }
        Ok(Response::new(v1::DescribeClusterResponse {
            voters: vec![1],
            cluster_id: "mock".to_owned(),
            controller: Some(1),
            nodes: cluster
                .nodes
                .iter()
                .map(|(id, address)| v1::ClusterNode {
                    id: *id,
                    address: address.clone(),
                    alive: true,
                    leaving: false,
                })
                .collect(),
            partitions: cluster
                .described
                .iter()
                .map(|((topic, partition), leader)| v1::PartitionPlacement {
                    target_replicas: Vec::new(),
                    topic: topic.clone(),
                    partition: *partition,
                    leader: (*leader != 0).then_some(*leader),
                    replicas: vec![*leader],
                    caught_up: vec![*leader],
                })
                .collect(),
        }))
    }

    async fn reassign_partition(
        &self,
        _: Request<v1::ReassignPartitionRequest>,
    ) -> Answer<v1::ReassignPartitionResponse> {
        unimplemented()
    }

    async fn rebalance(&self, _: Request<v1::RebalanceRequest>) -> Answer<v1::RebalanceResponse> {
        unimplemented()
    }

    async fn add_node(&self, _: Request<v1::AddNodeRequest>) -> Answer<v1::AddNodeResponse> {
        unimplemented()
    }

    async fn remove_node(
        &self,
        _: Request<v1::RemoveNodeRequest>,
    ) -> Answer<v1::RemoveNodeResponse> {
        unimplemented()
    }

    async fn set_voters(&self, _: Request<v1::SetVotersRequest>) -> Answer<v1::SetVotersResponse> {
        unimplemented()
    }

    async fn add_acls(&self, _: Request<v1::AddAclsRequest>) -> Answer<v1::AddAclsResponse> {
        unimplemented()
    }

    async fn remove_acls(
        &self,
        _: Request<v1::RemoveAclsRequest>,
    ) -> Answer<v1::RemoveAclsResponse> {
        unimplemented()
    }

    async fn list_acls(&self, _: Request<v1::ListAclsRequest>) -> Answer<v1::ListAclsResponse> {
        unimplemented()
    }

    async fn find_coordinator(
        &self,
        request: Request<v1::FindCoordinatorRequest>,
    ) -> Answer<v1::FindCoordinatorResponse> {
        self.record("FindCoordinator");
        let _ = request;
        let cluster = self.shared.lock();
        if cluster.find_coordinator_unimplemented {
            return unimplemented();
        }
        let (node_id, address) = cluster
            .nodes
            .iter()
            .find(|(id, _)| *id == cluster.coordinator)
            .cloned()
            .ok_or_else(|| Status::unavailable("no coordinator"))?;
        Ok(Response::new(v1::FindCoordinatorResponse {
            node_id,
            address,
            partition: 0,
        }))
    }

    async fn describe_topic(
        &self,
        request: Request<v1::DescribeTopicRequest>,
    ) -> Answer<v1::DescribeTopicResponse> {
        self.record("DescribeTopic");
        Ok(Response::new(v1::DescribeTopicResponse {
            topic: Some(topic_description(&request.into_inner().name)),
        }))
    }

    async fn list_offsets(
        &self,
        request: Request<v1::ListOffsetsRequest>,
    ) -> Answer<v1::ListOffsetsResponse> {
        self.record("ListOffsets");
        let request = request.into_inner();
        self.check_leader(&request.topic, request.partition)?;
        let offset = if request.spec == v1::OffsetSpec::Earliest as i32 {
            0
        } else {
            // The answering node's id, so a test sees who answered.
            self.id
        };
        Ok(Response::new(v1::ListOffsetsResponse {
            offset,
            found: true,
        }))
    }

    async fn fetch(&self, request: Request<v1::FetchRequest>) -> Answer<v1::FetchResponse> {
        self.record("Fetch");
        let request = request.into_inner();
        self.check_leader(&request.topic, request.partition)?;
        let key = (request.topic.clone(), request.partition);
        if self.shared.lock().logs.contains_key(&key) {
            let read = read_log(
                &self.shared.lock(),
                self.id,
                &request.topic,
                request.partition,
                request.offset,
            )?;
            if let Some(response) = read {
                return Ok(Response::new(response));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            return Ok(Response::new(v1::FetchResponse {
                partition: request.partition,
                next_offset: request.offset,
                ..Default::default()
            }));
        }
        if request.offset > 0 {
            // One record per partition; then nothing new (a short long-poll).
            tokio::time::sleep(Duration::from_millis(20)).await;
            return Ok(Response::new(v1::FetchResponse {
                partition: request.partition,
                next_offset: request.offset,
                high_watermark: 1,
                ..Default::default()
            }));
        }
        let mut builder = BatchBuilder::new();
        let value = format!("from node {}", self.id);
        builder.push(0, None, Some(value.as_bytes()), &[]);
        Ok(Response::new(v1::FetchResponse {
            partition: request.partition,
            batches: builder
                .finish()
                .map_err(|e| Status::internal(e.to_string()))?,
            next_offset: 1,
            high_watermark: 1,
            ..Default::default()
        }))
    }

    async fn get(&self, request: Request<v1::GetRequest>) -> Answer<v1::GetResponse> {
        self.record("Get");
        let request = request.into_inner();
        let partition = partition_for_key(&request.key, PARTITIONS);
        self.check_leader(&request.topic, partition)?;
        Ok(Response::new(v1::GetResponse {
            partition,
            version: self.id,
            value: Bytes::from(format!("from node {}", self.id)),
            ..Default::default()
        }))
    }

    async fn init_producer(
        &self,
        _: Request<v1::InitProducerRequest>,
    ) -> Answer<v1::InitProducerResponse> {
        self.record("InitProducer");
        Ok(Response::new(v1::InitProducerResponse {
            producer_id: 7,
            producer_epoch: 0,
        }))
    }

    type ProduceStreamStream = ReceiverStream<Result<v1::ProduceResponse, Status>>;

    /// Per-request errors carry no details (ErrorStatus is code and message only), as on the
    /// broker's stream.
    async fn produce_stream(
        &self,
        request: Request<tonic::Streaming<v1::ProduceRequest>>,
    ) -> Answer<Self::ProduceStreamStream> {
        self.record("ProduceStream");
        let node = self.clone();
        let stream = serve_produce_stream(request.into_inner(), move |request| {
            node.record("Produce");
            let mut response = v1::ProduceResponse {
                correlation_id: request.correlation_id,
                partition: request.partition,
                ..Default::default()
            };
            match node.produce_batch(&request.topic, request.partition, request.batch) {
                Ok(Some((base_offset, last_offset))) => {
                    response.base_offset = base_offset;
                    response.last_offset = last_offset;
                }
                // The node crashed after the append: the stream breaks.
                Ok(None) => return None,
                Err(status) => response.error = Some(request_error(&status)),
            }
            Some(response)
        });
        Ok(Response::new(stream))
    }

    async fn commit_offsets(
        &self,
        _: Request<v1::CommitOffsetsRequest>,
    ) -> Answer<v1::CommitOffsetsResponse> {
        self.record("CommitOffsets");
        self.check_coordinator()?;
        Ok(Response::new(v1::CommitOffsetsResponse {}))
    }

    async fn fetch_offsets(
        &self,
        _: Request<v1::FetchOffsetsRequest>,
    ) -> Answer<v1::FetchOffsetsResponse> {
        self.record("FetchOffsets");
        self.check_coordinator()?;
        let offsets = self
            .shared
            .lock()
            .committed
            .iter()
            .map(|(topic, partition, offset)| v1::CommittedOffset {
                topic: topic.clone(),
                partition: *partition,
                offset: *offset,
                ..Default::default()
            })
            .collect();
        Ok(Response::new(v1::FetchOffsetsResponse { offsets }))
    }

    async fn describe_group(
        &self,
        request: Request<v1::DescribeGroupRequest>,
    ) -> Answer<v1::DescribeGroupResponse> {
        self.record("DescribeGroup");
        self.check_coordinator()?;
        Ok(Response::new(v1::DescribeGroupResponse {
            group: request.into_inner().group,
            state: "empty".to_owned(),
            ..Default::default()
        }))
    }

    async fn list_groups(
        &self,
        _: Request<v1::ListGroupsRequest>,
    ) -> Answer<v1::ListGroupsResponse> {
        self.record("ListGroups");
        let groups = self
            .shared
            .lock()
            .groups
            .get(&self.id)
            .cloned()
            .unwrap_or_default();
        Ok(Response::new(v1::ListGroupsResponse {
            groups: groups
                .into_iter()
                .map(|group| v1::GroupSummary {
                    group,
                    members: 0,
                    state: "empty".to_owned(),
                })
                .collect(),
        }))
    }

    async fn create_topic(
        &self,
        _: Request<v1::CreateTopicRequest>,
    ) -> Answer<v1::CreateTopicResponse> {
        unimplemented()
    }

    async fn delete_topic(
        &self,
        _: Request<v1::DeleteTopicRequest>,
    ) -> Answer<v1::DeleteTopicResponse> {
        unimplemented()
    }

    async fn list_topics(
        &self,
        _: Request<v1::ListTopicsRequest>,
    ) -> Answer<v1::ListTopicsResponse> {
        self.record("ListTopics");
        Ok(Response::new(v1::ListTopicsResponse { topics: vec![] }))
    }

    /// A conditional write (plain records with the producer fields): dedupe first, then the
    /// conditions, then the append, as the broker's critical section does.
    async fn produce(&self, request: Request<v1::ProduceRequest>) -> Answer<v1::ProduceResponse> {
        self.record("Produce");
        let request = request.into_inner();
        self.check_leader(&request.topic, request.partition)?;
        let batch = encode_plain(&request);
        {
            let cluster = self.shared.lock();
            let repeat = cluster
                .logs
                .get(&(request.topic.clone(), request.partition))
                .into_iter()
                .flatten()
                .any(|stored| {
                    stored.producer_id == request.producer_id as i64
                        && stored.base_sequence == request.base_sequence as i32
                });
            for condition in request.conditions.iter().filter(|_| !repeat) {
                let current =
                    cluster.latest_version(&request.topic, request.partition, &condition.key);
                let holds = match condition.expect {
                    Some(v1::condition::Expect::Version(version)) => current == Some(version),
                    Some(v1::condition::Expect::Absent(_)) | None => current.is_none(),
                };
                if !holds {
                    return Err(syncline_proto::error_details::cas_conflict_status(
                        "version conflict",
                        &v1::CasConflict {
                            current: vec![v1::KeyVersion {
                                key: condition.key.clone(),
                                version: current.unwrap_or(0),
                                absent: current.is_none(),
                            }],
                        },
                    ));
                }
            }
        }
        match self.produce_batch(&request.topic, request.partition, batch)? {
            Some((base_offset, last_offset)) => Ok(Response::new(v1::ProduceResponse {
                correlation_id: request.correlation_id,
                partition: request.partition,
                base_offset,
                last_offset,
                error: None,
            })),
            None => Err(Status::unavailable("the node went away")),
        }
    }

    type SubscribeStream = ReceiverStream<Result<v1::FetchResponse, Status>>;

    /// Streams the log from the offset while this node leads the partition; then a
    /// NotLeader ends the stream.
    async fn subscribe(
        &self,
        request: Request<v1::SubscribeRequest>,
    ) -> Answer<Self::SubscribeStream> {
        self.record("Subscribe");
        let request = request.into_inner();
        self.check_leader(&request.topic, request.partition)?;
        let (sender, receiver) = tokio::sync::mpsc::channel(4);
        let node = self.clone();
        tokio::spawn(async move {
            let mut offset = request.offset;
            loop {
                let read = node
                    .check_leader(&request.topic, request.partition)
                    .and_then(|()| {
                        read_log(
                            &node.shared.lock(),
                            node.id,
                            &request.topic,
                            request.partition,
                            offset,
                        )
                    });
                match read {
                    Ok(Some(response)) => {
                        offset = response.next_offset;
                        if sender.send(Ok(response)).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => tokio::time::sleep(Duration::from_millis(10)).await,
                    Err(status) => {
                        let _ = sender.send(Err(status)).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn history(&self, _: Request<v1::HistoryRequest>) -> Answer<v1::HistoryResponse> {
        unimplemented()
    }

    type SnapshotStream = ReceiverStream<Result<v1::SnapshotResponse, Status>>;

    /// The latest value of every key below what this node applied, in one message.
    async fn snapshot(
        &self,
        request: Request<v1::SnapshotRequest>,
    ) -> Answer<Self::SnapshotStream> {
        self.record("Snapshot");
        let request = request.into_inner();
        self.check_leader(&request.topic, request.partition)?;
        let cluster = self.shared.lock();
        let high_watermark = cluster.visible_end(self.id, &request.topic, request.partition);
        let batches: Vec<Batch> = cluster
            .logs
            .get(&(request.topic.clone(), request.partition))
            .into_iter()
            .flatten()
            .map(|stored| Batch::parse(stored.batch.clone()).unwrap())
            .collect();
        let records = snapshot_records(batches.iter(), high_watermark);
        let (sender, receiver) = tokio::sync::mpsc::channel(1);
        sender
            .try_send(Ok(v1::SnapshotResponse {
                partition: request.partition,
                high_watermark,
                keys_total: records.len() as u64,
                records,
                last: true,
            }))
            .unwrap();
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn compact_topic(
        &self,
        _: Request<v1::CompactTopicRequest>,
    ) -> Answer<v1::CompactTopicResponse> {
        unimplemented()
    }

    async fn join_group(&self, _: Request<v1::JoinGroupRequest>) -> Answer<v1::JoinGroupResponse> {
        self.record("JoinGroup");
        self.check_coordinator()?;
        Ok(Response::new(v1::JoinGroupResponse {
            member_id: "member-1".to_owned(),
            member_epoch: 1,
            heartbeat_interval_ms: 50,
            assignment: every_events_partition(),
        }))
    }

    async fn heartbeat(&self, _: Request<v1::HeartbeatRequest>) -> Answer<v1::HeartbeatResponse> {
        self.record("Heartbeat");
        self.check_coordinator()?;
        Ok(Response::new(v1::HeartbeatResponse {
            member_epoch: 1,
            heartbeat_interval_ms: 50,
            assignment: every_events_partition(),
        }))
    }

    async fn leave_group(
        &self,
        _: Request<v1::LeaveGroupRequest>,
    ) -> Answer<v1::LeaveGroupResponse> {
        self.record("LeaveGroup");
        self.check_coordinator()?;
        Ok(Response::new(v1::LeaveGroupResponse {}))
    }
}

/// A running mock cluster: node `i + 1` listens on `addresses[i]`.
pub(crate) struct MockCluster {
    pub(crate) shared: Shared,
    addresses: Vec<String>,
    stops: Vec<Option<(oneshot::Sender<()>, tokio::task::JoinHandle<()>)>>,
}

impl MockCluster {
    /// `nodes` nodes; every partition of `events` and of the table led by node 1, reported so.
    pub(crate) async fn start(nodes: u64) -> MockCluster {
        let shared = Shared::default();
        let mut addresses = Vec::new();
        let mut stops = Vec::new();
        let mut listeners = Vec::new();
        for _ in 0..nodes {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            addresses.push(listener.local_addr().unwrap().to_string());
            listeners.push(listener);
        }
        {
            let mut cluster = shared.lock();
            cluster.nodes = (1..=nodes).zip(addresses.iter().cloned()).collect();
            cluster.name_leader = true;
            cluster.coordinator = 1;
            for topic in ["events", TABLE] {
                for partition in 0..PARTITIONS {
                    cluster.leaders.insert((topic.to_owned(), partition), 1);
                }
            }
        }
        shared.publish();
        for (index, listener) in listeners.into_iter().enumerate() {
            let node = MockNode {
                id: index as u64 + 1,
                shared: shared.clone(),
            };
            let (stop, stopped) = oneshot::channel::<()>();
            let server = tokio::spawn(async move {
                let _ = tonic::transport::Server::builder()
                    .add_service(BrokerServer::new(node))
                    .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                        let _ = stopped.await;
                    })
                    .await;
            });
            stops.push(Some((stop, server)));
        }
        MockCluster {
            shared,
            addresses,
            stops,
        }
    }

    pub(crate) fn address(&self, node: u64) -> &str {
        &self.addresses[node as usize - 1]
    }

    /// Stops node `node`: its listener closes, its connections end.
    pub(crate) async fn stop(&mut self, node: u64) {
        if let Some((stop, server)) = self.stops[node as usize - 1].take() {
            let _ = stop.send(());
            let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
        }
    }
}

/// A key that goes to `partition`.
pub(crate) fn key_for(partition: u32) -> String {
    (0..)
        .map(|i| format!("key-{i}"))
        .find(|key| partition_for_key(key.as_bytes(), PARTITIONS) == partition)
        .unwrap()
}

#[tokio::test]
async fn given_a_stale_view_per_partition_calls_should_follow_not_leader_to_the_leader() {
    let cluster = MockCluster::start(3).await;
    let shared = &cluster.shared;
    let client = Client::connect(cluster.address(1)).await.unwrap();
    assert_eq!(client.router().controller(), Some(1));
    // Leadership moves after the client's view was built.
    shared.lead("events", 0, 2);
    let listed = client
        .list_offsets("events", 0, OffsetQuery::Latest)
        .await
        .unwrap();
    assert_eq!(listed.offset, 2, "answered by the leader");
    assert_eq!(shared.calls(1, "ListOffsets"), 1, "refused once by node 1");
    // The view took the leader from the detail: the next call goes straight there.
    client
        .list_offsets("events", 0, OffsetQuery::Latest)
        .await
        .unwrap();
    assert_eq!(shared.calls(1, "ListOffsets"), 1);
    assert_eq!(shared.calls(2, "ListOffsets"), 2);
    assert_eq!(shared.calls(1, "DescribeCluster"), 1, "no refresh needed");

    // Get: the key's partition moves to node 3.
    let table = client.table(TABLE).await.unwrap();
    let partition = table.partition_of("k");
    shared.lead(TABLE, partition, 3);
    let entry = table.get("k").await.unwrap().unwrap();
    assert_eq!(entry.value, Bytes::from("from node 3"));
    assert_eq!(shared.calls(1, "Get"), 1);
    assert_eq!(shared.calls(3, "Get"), 1);

    // Fetch: partition 1 moves to node 3; the consumer reads from there.
    shared.lead("events", 1, 3);
    let config = ConsumerConfig {
        partitions: Some(vec![1]),
        start: StartOffset::Offset(0),
        ..ConsumerConfig::default()
    };
    let mut consumer = client.consumer("events", config).await.unwrap();
    let record = consumer.recv().await.unwrap().unwrap();
    assert_eq!(record.value, Some(Bytes::from("from node 3")));
    assert_eq!(shared.calls(2, "Fetch"), 0);
    assert!(shared.calls(3, "Fetch") >= 1);
}

#[tokio::test]
async fn given_a_not_leader_without_a_leader_should_refresh_the_view_and_retry() {
    let cluster = MockCluster::start(2).await;
    let shared = &cluster.shared;
    shared.lock().name_leader = false;
    let client = Client::connect(cluster.address(1)).await.unwrap();
    shared.lead("events", 0, 2);
    shared.publish();
    let listed = client
        .list_offsets("events", 0, OffsetQuery::Latest)
        .await
        .unwrap();
    assert_eq!(listed.offset, 2);
    assert_eq!(
        shared.calls(1, "DescribeCluster"),
        2,
        "connect, then the refresh"
    );
}

#[tokio::test]
async fn producer_should_keep_one_stream_per_leader_and_follow_a_moved_partition() {
    let cluster = MockCluster::start(2).await;
    let shared = &cluster.shared;
    shared.lead("events", 1, 2);
    shared.publish();
    let client = Client::connect(cluster.address(1)).await.unwrap();
    let config = ProducerConfig {
        linger: Duration::from_millis(1),
        retry_backoff: Duration::from_millis(5),
        ..ProducerConfig::default()
    };
    let producer = client.producer("events", config).await.unwrap();
    for partition in 0..PARTITIONS {
        let key = key_for(partition);
        producer
            .send(Some(key.as_bytes()), Some(b"v".as_slice()), &[])
            .await
            .unwrap();
    }
    assert_eq!(shared.calls(1, "ProduceStream"), 1);
    assert_eq!(shared.calls(2, "ProduceStream"), 1);
    assert_eq!(shared.calls(1, "Produce"), 1);
    assert_eq!(shared.calls(2, "Produce"), 1);

    // Partition 0 moves to node 2; the stream's per-request error has no detail, so the
    // producer refreshes the view and resends there.
    shared.lead("events", 0, 2);
    shared.publish();
    let key = key_for(0);
    let delivery = producer
        .send(Some(key.as_bytes()), Some(b"moved".as_slice()), &[])
        .await
        .unwrap();
    assert_eq!(delivery.partition, 0);
    assert_eq!(
        shared.calls(1, "Produce"),
        2,
        "refused once by the old leader"
    );
    assert_eq!(shared.calls(2, "Produce"), 2);
}

#[tokio::test]
async fn given_a_lost_leader_the_view_should_refresh_from_another_node() {
    let mut cluster = MockCluster::start(3).await;
    cluster.shared.lead("events", 0, 2);
    cluster.shared.publish();
    let client = Client::connect(cluster.address(1)).await.unwrap();
    let listed = client
        .list_offsets("events", 0, OffsetQuery::Latest)
        .await
        .unwrap();
    assert_eq!(listed.offset, 2);
    // Node 2 goes away and node 3 takes its partition.
    cluster.stop(2).await;
    cluster.shared.lead("events", 0, 3);
    cluster.shared.publish();
    let shared = &cluster.shared;
    let listed = client
        .list_offsets("events", 0, OffsetQuery::Latest)
        .await
        .unwrap();
    assert_eq!(listed.offset, 3);
    assert_eq!(
        shared.calls(1, "DescribeCluster"),
        2,
        "connect, then the refresh"
    );
}

#[tokio::test]
async fn group_calls_should_go_to_the_coordinator_and_follow_it_when_it_moves() {
    let cluster = MockCluster::start(2).await;
    let shared = &cluster.shared;
    shared.lock().coordinator = 2;
    let client = Client::connect(cluster.address(1)).await.unwrap();
    client.fetch_offsets("g", None).await.unwrap();
    client.commit_offsets("g", &[]).await.unwrap();
    client.describe_group("g").await.unwrap();
    assert_eq!(
        shared.calls(1, "FindCoordinator"),
        1,
        "asked once, then remembered"
    );
    assert_eq!(shared.calls(2, "FetchOffsets"), 1);
    assert_eq!(shared.calls(2, "CommitOffsets"), 1);
    assert_eq!(shared.calls(2, "DescribeGroup"), 1);
    assert_eq!(shared.calls(1, "FetchOffsets"), 0);
    // The coordinator moves to node 1: node 2 says so, the call follows.
    shared.lock().coordinator = 1;
    client.fetch_offsets("g", None).await.unwrap();
    assert_eq!(shared.calls(2, "FetchOffsets"), 2);
    assert_eq!(shared.calls(1, "FetchOffsets"), 1);
}

#[tokio::test]
async fn group_consumer_should_join_at_the_coordinator_and_fetch_from_each_leader() {
    let cluster = MockCluster::start(3).await;
    let shared = &cluster.shared;
    {
        let mut state = shared.lock();
        state.coordinator = 3;
        state.leaders.insert(("events".to_owned(), 0), 2);
        state.leaders.insert(("events".to_owned(), 1), 3);
    }
    shared.publish();
    let client = Client::connect(cluster.address(1)).await.unwrap();
    let config = GroupConsumerConfig {
        offset_reset: OffsetReset::Earliest,
        ..GroupConsumerConfig::default()
    };
    let mut consumer = client
        .group_consumer("g", &["events"], config)
        .await
        .unwrap();
    let mut values = Vec::new();
    for _ in 0..PARTITIONS {
        let record = consumer.recv().await.unwrap().unwrap();
        values.push(record.value.unwrap());
    }
    values.sort();
    assert_eq!(
        values,
        [Bytes::from("from node 2"), Bytes::from("from node 3")]
    );
    consumer.close().await.unwrap();
    assert_eq!(shared.calls(1, "FindCoordinator"), 1);
    assert_eq!(shared.calls(3, "JoinGroup"), 1);
    assert_eq!(shared.calls(3, "LeaveGroup"), 1);
    for node in [1, 2] {
        for rpc in ["JoinGroup", "Heartbeat", "LeaveGroup", "CommitOffsets"] {
            assert_eq!(shared.calls(node, rpc), 0, "{rpc} at node {node}");
        }
    }
    assert_eq!(shared.calls(1, "Fetch"), 0);
}

#[tokio::test]
async fn list_groups_should_merge_every_nodes_share() {
    let cluster = MockCluster::start(2).await;
    {
        let mut state = cluster.shared.lock();
        state.groups.insert(1, vec!["b".to_owned()]);
        state.groups.insert(2, vec!["a".to_owned(), "c".to_owned()]);
    }
    let client = Client::connect(cluster.address(2)).await.unwrap();
    let groups = client.list_groups().await.unwrap();
    let names: Vec<&str> = groups.iter().map(|g| g.group.as_str()).collect();
    assert_eq!(names, ["a", "b", "c"]);
}

#[tokio::test]
async fn given_a_broker_older_than_clusters_everything_should_use_the_bootstrap_connection() {
    let cluster = MockCluster::start(2).await;
    let shared = &cluster.shared;
    {
        let mut state = shared.lock();
        state.describe_unimplemented = true;
        state.find_coordinator_unimplemented = true;
    }
    let client = Client::connect(cluster.address(1)).await.unwrap();
    client
        .list_offsets("events", 0, OffsetQuery::Latest)
        .await
        .unwrap();
    client.fetch_offsets("g", None).await.unwrap();
    assert_eq!(shared.calls(1, "ListOffsets"), 1);
    assert_eq!(shared.calls(1, "FetchOffsets"), 1);
    // A NotLeader from an old broker is an answer, not a reason to look elsewhere.
    shared.lead("events", 0, 2);
    let error = client
        .list_offsets("events", 0, OffsetQuery::Latest)
        .await
        .unwrap_err();
    assert!(matches!(error, Error::NotLeader { .. }), "{error:?}");
    assert_eq!(shared.calls(2, "ListOffsets"), 0);
    assert_eq!(
        shared.calls(1, "DescribeCluster"),
        1,
        "asked once, at connect"
    );
}

#[tokio::test]
async fn given_an_unimplemented_find_coordinator_group_calls_should_use_the_bootstrap_node() {
    let cluster = MockCluster::start(2).await;
    let shared = &cluster.shared;
    shared.lock().find_coordinator_unimplemented = true;
    let client = Client::connect(cluster.address(2)).await.unwrap();
    client.describe_group("g").await.unwrap();
    client.describe_group("g").await.unwrap();
    assert_eq!(shared.calls(2, "DescribeGroup"), 2);
    assert_eq!(shared.calls(2, "FindCoordinator"), 1, "not asked again");
}

#[tokio::test]
async fn a_cluster_of_one_should_be_served_on_the_bootstrap_connection() {
    let cluster = MockCluster::start(1).await;
    let shared = &cluster.shared;
    // It advertises an address the client cannot use (as behind a proxy).
    shared.lock().nodes = vec![(1, "unreachable.invalid:1".to_owned())];
    let client = Client::connect(cluster.address(1)).await.unwrap();
    client
        .list_offsets("events", 0, OffsetQuery::Latest)
        .await
        .unwrap();
    client.describe_group("g").await.unwrap();
    assert_eq!(
        shared.calls(1, "FindCoordinator"),
        0,
        "one node coordinates everything"
    );
    let offset = client
        .list_offsets(
            "unknown-topic-is-the-brokers-to-refuse",
            0,
            OffsetQuery::Latest,
        )
        .await
        .unwrap_err();
    assert_eq!(offset.code(), Some(Code::NotFound));
    assert_eq!(
        shared.calls(1, "DescribeCluster"),
        1,
        "no refresh in a cluster of one"
    );
}

#[tokio::test]
async fn given_the_bootstrap_node_down_admin_calls_should_fail_over_to_another_node() {
    let mut cluster = MockCluster::start(2).await;
    let client = Client::connect(cluster.address(1)).await.unwrap();
    cluster.stop(1).await;
    client.list_topics().await.unwrap();
    assert_eq!(cluster.shared.calls(2, "ListTopics"), 1);
    // A view refresh after the loss asks node 2 as well.
    cluster.shared.lead("events", 0, 2);
    cluster.shared.publish();
    let listed = client
        .list_offsets("events", 0, OffsetQuery::Latest)
        .await
        .unwrap();
    assert_eq!(listed.offset, 2);
    assert_eq!(cluster.shared.calls(2, "DescribeCluster"), 1);
}

#[tokio::test]
async fn given_an_unusable_advertised_address_calls_should_go_to_the_bootstrap_node_and_end() {
    let cluster = MockCluster::start(2).await;
    let shared = &cluster.shared;
    shared.lock().nodes[1].1 = "https://node-2:7450".to_owned();
    shared.lead("events", 0, 2);
    shared.publish();
    let client = Client::connect(cluster.address(1)).await.unwrap();
    let error = client
        .list_offsets("events", 0, OffsetQuery::Latest)
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            Error::NotLeader {
                leader_id: Some(2),
                ..
            }
        ),
        "{error:?}"
    );
    let redirects = crate::routing::REDIRECTS_MAX as usize;
    assert_eq!(shared.calls(1, "ListOffsets"), 1 + redirects, "bounded");
}

#[tokio::test]
async fn given_an_absurd_partition_number_in_an_answer_the_view_should_not_allocate_for_it() {
    // A Vec indexed by partition would allocate 64 GiB for each of these (and abort).
    let cluster = MockCluster::start(3).await;
    let shared = &cluster.shared;
    shared.lead("events", u32::MAX, 2);
    shared.publish();
    let client = Client::connect(cluster.address(1)).await.unwrap();
    let listed = client
        .list_offsets("events", u32::MAX, OffsetQuery::Latest)
        .await
        .unwrap();
    assert_eq!(listed.offset, 2, "routed by DescribeCluster");
    assert_eq!(shared.calls(1, "ListOffsets"), 0);

    // Learnt from a NotLeader detail instead.
    shared.lead("events", u32::MAX - 1, 3);
    let listed = client
        .list_offsets("events", u32::MAX - 1, OffsetQuery::Latest)
        .await
        .unwrap();
    assert_eq!(listed.offset, 3, "followed the NotLeader");
    assert_eq!(shared.calls(1, "ListOffsets"), 1);
    client
        .list_offsets("events", u32::MAX - 1, OffsetQuery::Latest)
        .await
        .unwrap();
    assert_eq!(shared.calls(3, "ListOffsets"), 2, "remembered");
}
