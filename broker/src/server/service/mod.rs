//! The `syncline.v1.Broker` service: request validation, then calls into topics and
//! partitions. Responses carry the stored batch bytes as `Bytes` slices of the segment
//! mappings (no copy). Building read responses (Fetch, Subscribe, Snapshot) lives in
//! `super::reads`; topic administration and the cluster calls in [`admin`], operating a
//! cluster (moves, nodes joining and leaving) in [`operations`], the produce path
//! in [`produce`], the read calls in [`read_calls`], what reads and tables share in
//! [`lookups`], ACL administration in [`acls`]. Every handler checks the caller's permission
//! before anything else (`super::authorize`); produce and fetch bytes are charged to the
//! caller's quota (`super::quota`).

mod acls;
mod admin;
mod lookups;
mod operations;
mod produce;
mod read_calls;

use admin::{cleanup_of, describe};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::Stream;
use prost::Message as _;
use syncline_proto::batch::Batches;
use syncline_proto::v1::{self, broker_server::Broker};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use super::audit::Audit;
use super::auth::Principal;
use super::authorize::Access;
use super::budget::{HeldUntilSent, ResponseBudget, ResponsePermit, UnaryPermit};
use super::connections::ConnectionInfo;
use super::quota::{charge, mark, throttle, Direction, Quotas};
use super::reads::{
    fetch_response, record_headers, response_bytes_estimate, stream_snapshot, Subscription,
    SNAPSHOT_READ_AHEAD,
};
use super::stall::{StallWatch, StreamWatch};
use super::status::{decode_limit_to_resource_exhausted, to_status};
use crate::acl::{Operation, Resource};
use crate::cluster::ClusterView;
use crate::config::parse_fsync;
use crate::error::BrokerError;
use crate::log::{Appended, ConfigError, FsyncPolicy, Log};
use crate::partition::{show_key, Condition, Partition, PlainRecord, Submitted};
use crate::topic::{Cleanup, Registry, Topic, TopicSettings};

/// Versions a History request returns when it does not say.
const HISTORY_LIMIT_DEFAULT: u32 = 100;
/// Most versions one History request returns: bounds the scan's answer.
const HISTORY_LIMIT_MAX: u32 = 10_000;
/// Fetch size when a request does not say (1 MiB).
const DEFAULT_FETCH_BYTES: u32 = 1024 * 1024;
/// Snapshot message size when a request does not say (1 MiB).
const DEFAULT_SNAPSHOT_BYTES: u32 = 1024 * 1024;
/// Largest snapshot message a client may ask for (4 MiB): well under the gRPC message limit
/// (twice the fetch limit plus slack), and small enough that the read-ahead stays cheap.
const SNAPSHOT_BYTES_MAX: u32 = 4 * 1024 * 1024;
/// Produce requests one `ProduceStream` may have in flight before the broker stops reading it.
const STREAM_IN_FLIGHT_MAX: usize = 1024;
/// How long a fetch waits for response budget before it answers RESOURCE_EXHAUSTED: long
/// enough to ride out a burst, short next to a client's usual deadline.
const FETCH_BUDGET_WAIT: Duration = Duration::from_secs(5);
/// The service state: the topics and the shutdown signal.
#[derive(Debug, Clone)]
pub struct BrokerService {
    registry: Arc<Registry>,
    coordinator: Arc<crate::group::Coordinator>,
    shutdown: watch::Receiver<bool>,
    budget: Arc<ResponseBudget>,
    stalls: Arc<StallWatch>,
    cluster: Arc<ClusterView>,
    access: Arc<Access>,
    quotas: Option<Arc<Quotas>>,
}

/// A topic, one of its partitions, and that partition's log.
type PartitionLog = (Arc<Topic>, Arc<Partition>, Arc<Log>);

/// How long a call naming an unknown topic waits for this node to catch up with the
/// controller in a cluster.
const TOPIC_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Marks a CompactTopic one node sends another for the partitions that node leads: it
/// compacts those and does not fan out again.
const LOCAL_ONLY_HEADER: &str = "syncline-local-only";

pub(super) type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Records the request's outcome and latency (see `crate::metrics`).
fn finish<T>(rpc: &'static str, started: Instant, result: Result<T, Status>) -> Result<T, Status> {
    let code = match &result {
        Ok(_) => tonic::Code::Ok,
        Err(status) => status.code(),
    };
    crate::metrics::observe_request(rpc, started, code);
    result
}

/// Records one ProduceStream message like a unary request.
fn observe_message(started: Instant, response: &v1::ProduceResponse) {
    let code = response
        .error
        .as_ref()
        .map_or(tonic::Code::Ok, |e| tonic::Code::from_i32(e.code));
    crate::metrics::observe_request("ProduceStreamMessage", started, code);
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Acks {
    None,
    Leader,
    Durable,
}

fn acks_of(value: i32) -> Result<Acks, BrokerError> {
    match v1::Acks::try_from(value) {
        Ok(v1::Acks::Unspecified) | Ok(v1::Acks::Durable) => Ok(Acks::Durable),
        Ok(v1::Acks::Leader) => Ok(Acks::Leader),
        Ok(v1::Acks::None) => Ok(Acks::None),
        Err(_) => Err(BrokerError::InvalidRequest(format!(
            "unknown acks value {value}: use ACKS_NONE, ACKS_LEADER or ACKS_DURABLE"
        ))),
    }
}

/// A request's optional positive number: absent takes `default`, larger than `max` is capped at
/// `max`, and an explicit 0 is refused (proto3 `optional` tells it apart from "not set", so a 0
/// never silently means the default).
fn positive_or_default(
    value: Option<u32>,
    field: &'static str,
    default: u32,
    max: u32,
) -> Result<u32, BrokerError> {
    match value {
        None => Ok(default.min(max)),
        Some(0) => Err(BrokerError::InvalidRequest(format!(
            "`{field}` 0 is outside [1, {max}]: leave it unset for the default ({default}); larger values are capped at {max}"
        ))),
        Some(value) => Ok(value.min(max)),
    }
}

impl BrokerService {
    /// A service over `registry`; streams end when `shutdown` turns true, and report to
    /// `stalls`.
    pub fn new(
        registry: Arc<Registry>,
        coordinator: Arc<crate::group::Coordinator>,
        shutdown: watch::Receiver<bool>,
        budget: Arc<ResponseBudget>,
        stalls: Arc<StallWatch>,
    ) -> Self {
        Self {
            registry,
            coordinator,
            shutdown,
            budget,
            stalls,
            cluster: Arc::new(ClusterView {
                node_id: 1,
                ..ClusterView::default()
            }),
            access: Arc::new(Access::open()),
            quotas: None,
        }
    }

    /// The same service, holding principals to `quotas` (`super::quota`).
    pub fn with_quotas(mut self, quotas: Option<Arc<Quotas>>) -> Self {
        self.quotas = quotas;
        self
    }

    /// The same service, checking calls against `access` (`super::authorize`).
    pub fn with_access(mut self, access: Arc<Access>) -> Self {
        self.access = access;
        self
    }

    /// May the principal of `request` do `operation` to `resource`? PERMISSION_DENIED naming
    /// both when not (see `super::authorize`).
    fn authorize<T>(
        &self,
        request: &Request<T>,
        operation: Operation,
        resource: Resource<'_>,
    ) -> Result<(), Status> {
        self.access
            .check(
                self.cluster.controller.as_deref(),
                request.extensions().get::<Principal>(),
                operation,
                resource,
            )
            .map_err(to_status)
    }

    /// [`Self::authorize`] of `operation` on the topic a read request names.
    fn authorize_on_topic<T: read_calls::OnTopic>(
        &self,
        request: &Request<T>,
        operation: Operation,
    ) -> Result<(), Status> {
        self.authorize(
            request,
            operation,
            Resource::topic(request.get_ref().topic()),
        )
    }

    /// Whether the principal of a call with `extensions` may see `resource` in a listing.
    fn may_describe(&self, extensions: &tonic::Extensions, resource: Resource<'_>) -> bool {
        self.access.may_describe(
            self.cluster.controller.as_deref(),
            extensions.get::<Principal>(),
            resource,
        )
    }

    /// The same service, describing the cluster as `view` (the binary's node identity).
    pub fn with_cluster(mut self, view: ClusterView) -> Self {
        self.cluster = Arc::new(view);
        self
    }

    /// The stall watch of a stream of `rpc` answering a request with `extensions`.
    fn watch_stream(
        &self,
        extensions: &tonic::Extensions,
        rpc: &'static str,
    ) -> Option<StreamWatch> {
        self.stalls.watch(extensions.get::<ConnectionInfo>(), rpc)
    }

    fn partition(
        &self,
        topic: &str,
        partition: u32,
    ) -> Result<(Arc<Topic>, Arc<Partition>), BrokerError> {
        let topic = self.registry.get(topic)?;
        let partition = topic.partition(partition)?.clone();
        Ok((topic, partition))
    }

    /// The partition that holds `key` in `topic` (by the key partitioner).
    fn key_partition(&self, topic: &str, key: &[u8]) -> Result<Arc<Partition>, BrokerError> {
        let topic = self.registry.get(topic)?;
        let id = syncline_proto::partitioner::partition_for_key(key, topic.settings.partitions);
        Ok(topic.partition(id)?.clone())
    }

    /// A partition and its log, for the read RPCs.
    fn partition_log(&self, topic: &str, partition: u32) -> Result<PartitionLog, Status> {
        let (topic, partition) = self.partition(topic, partition).map_err(to_status)?;
        let log = partition.log().map_err(to_status)?.clone();
        Ok((topic, partition, log))
    }

    fn check_running(&self) -> Result<(), BrokerError> {
        if *self.shutdown.borrow() {
            return Err(BrokerError::ShuttingDown);
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl Broker for BrokerService {
    async fn create_topic(
        &self,
        request: Request<v1::CreateTopicRequest>,
    ) -> Result<Response<v1::CreateTopicResponse>, Status> {
        let started = Instant::now();
        let span = tracing::debug_span!("rpc", rpc = "CreateTopic");
        let audit = Audit::of(
            &request,
            "create_topic",
            format!("topic:{}", request.get_ref().name),
        );
        let result = async move {
            self.authorize(
                &request,
                Operation::Create,
                Resource::topic(&request.get_ref().name),
            )?;
            self.create_topic_call(request).await
        }
        .instrument(span)
        .await;
        audit.record(&result);
        finish("CreateTopic", started, result)
    }

    async fn delete_topic(
        &self,
        request: Request<v1::DeleteTopicRequest>,
    ) -> Result<Response<v1::DeleteTopicResponse>, Status> {
        let started = Instant::now();
        let span = tracing::debug_span!("rpc", rpc = "DeleteTopic");
        let audit = Audit::of(
            &request,
            "delete_topic",
            format!("topic:{}", request.get_ref().name),
        );
        let result = async move {
            self.authorize(
                &request,
                Operation::Delete,
                Resource::topic(&request.get_ref().name),
            )?;
            self.delete_topic_call(request).await
        }
        .instrument(span)
        .await;
        audit.record(&result);
        finish("DeleteTopic", started, result)
    }

    async fn reassign_partition(
        &self,
        request: Request<v1::ReassignPartitionRequest>,
    ) -> Result<Response<v1::ReassignPartitionResponse>, Status> {
        let started = Instant::now();
        let span = tracing::debug_span!("rpc", rpc = "ReassignPartition");
        let audit = Audit::of(
            &request,
            "reassign_partition",
            format!(
                "topic:{}/{}",
                request.get_ref().topic,
                request.get_ref().partition
            ),
        );
        let result = async move {
            self.authorize(&request, Operation::ClusterAdmin, Resource::cluster())?;
            self.reassign_partition_call(request).await
        }
        .instrument(span)
        .await;
        audit.record(&result);
        finish("ReassignPartition", started, result)
    }

    async fn rebalance(
        &self,
        request: Request<v1::RebalanceRequest>,
    ) -> Result<Response<v1::RebalanceResponse>, Status> {
        let started = Instant::now();
        let span = tracing::debug_span!("rpc", rpc = "Rebalance");
        let audit = Audit::of(&request, "rebalance", "cluster".to_string());
        let result = async move {
            self.authorize(&request, Operation::ClusterAdmin, Resource::cluster())?;
            self.rebalance_call(request).await
        }
        .instrument(span)
        .await;
        audit.record(&result);
        finish("Rebalance", started, result)
    }

    async fn add_node(
        &self,
        request: Request<v1::AddNodeRequest>,
    ) -> Result<Response<v1::AddNodeResponse>, Status> {
        let started = Instant::now();
        let span = tracing::debug_span!("rpc", rpc = "AddNode");
        let audit = Audit::of(
            &request,
            "add_node",
            format!("node:{}", request.get_ref().node_id),
        );
        let result = async move {
            self.authorize(&request, Operation::ClusterAdmin, Resource::cluster())?;
            self.add_node_call(request).await
        }
        .instrument(span)
        .await;
        audit.record(&result);
        finish("AddNode", started, result)
    }

    async fn remove_node(
        &self,
        request: Request<v1::RemoveNodeRequest>,
    ) -> Result<Response<v1::RemoveNodeResponse>, Status> {
        let started = Instant::now();
        let span = tracing::debug_span!("rpc", rpc = "RemoveNode");
        let audit = Audit::of(
            &request,
            "remove_node",
            format!("node:{}", request.get_ref().node_id),
        );
        let result = async move {
            self.authorize(&request, Operation::ClusterAdmin, Resource::cluster())?;
            self.remove_node_call(request).await
        }
        .instrument(span)
        .await;
        audit.record(&result);
        finish("RemoveNode", started, result)
    }

    async fn set_voters(
        &self,
        request: Request<v1::SetVotersRequest>,
    ) -> Result<Response<v1::SetVotersResponse>, Status> {
        let started = Instant::now();
        let span = tracing::debug_span!("rpc", rpc = "SetVoters");
        let audit = Audit::of(
            &request,
            "set_voters",
            format!("voters:{:?}", request.get_ref().voters),
        );
        let result = async move {
            self.authorize(&request, Operation::ClusterAdmin, Resource::cluster())?;
            self.set_voters_call(request).await
        }
        .instrument(span)
        .await;
        audit.record(&result);
        finish("SetVoters", started, result)
    }

    async fn describe_cluster(
        &self,
        request: Request<v1::DescribeClusterRequest>,
    ) -> Result<Response<v1::DescribeClusterResponse>, Status> {
        let started = Instant::now();
        let view = &self.cluster;
        // Any authenticated principal may call it; it shows the topics it may describe.
        let principal = request.extensions().get::<Principal>().cloned();
        let visible = |partition: &v1::PartitionPlacement| {
            self.access.may_describe(
                view.controller.as_deref(),
                principal.as_ref(),
                Resource::topic(&partition.topic),
            )
        };
        if let Some(controller) = &view.controller {
            let mut response = self.describe_cluster_call(controller, request).await;
            response.partitions.retain(visible);
            return finish("DescribeCluster", started, Ok(Response::new(response)));
        }
        let me = view.node_id;
        // A cluster of one: this node is the controller and leads and holds every partition.
        let partitions = self
            .registry
            .list()
            .iter()
            .flat_map(|topic| {
                (0..topic.settings.partitions).map(|partition| v1::PartitionPlacement {
                    topic: topic.name.to_string(),
                    partition,
                    leader: Some(me),
                    replicas: vec![me],
                    caught_up: vec![me],
                    target_replicas: Vec::new(),
                })
            })
            .collect();
        let mut response = v1::DescribeClusterResponse {
            cluster_id: view.cluster_id.clone(),
            controller: Some(me),
            nodes: vec![v1::ClusterNode {
                id: me,
                address: view.address.clone(),
                alive: true,
                leaving: false,
            }],
            partitions,
            voters: vec![me],
        };
        response.partitions.retain(visible);
        finish("DescribeCluster", started, Ok(Response::new(response)))
    }

    async fn list_topics(
        &self,
        request: Request<v1::ListTopicsRequest>,
    ) -> Result<Response<v1::ListTopicsResponse>, Status> {
        let started = Instant::now();
        let span = tracing::debug_span!("rpc", rpc = "ListTopics");
        let result = async move {
            let topics = self
                .registry
                .list()
                .iter()
                // Internal topics (`__offsets`) stay out of listings; describe still works.
                .filter(|topic| !topic.name.starts_with("__"))
                .filter(|topic| {
                    self.may_describe(request.extensions(), Resource::topic(&topic.name))
                })
                .map(|topic| v1::TopicSummary {
                    name: topic.name.to_string(),
                    partitions: topic.settings.partitions,
                    cleanup_policy: cleanup_of(topic.settings.cleanup) as i32,
                    topic_id: topic.id.to_string(),
                })
                .collect();
            Ok(Response::new(v1::ListTopicsResponse { topics }))
        }
        .instrument(span)
        .await;
        finish("ListTopics", started, result)
    }

    async fn describe_topic(
        &self,
        request: Request<v1::DescribeTopicRequest>,
    ) -> Result<Response<v1::DescribeTopicResponse>, Status> {
        let started = Instant::now();
        let span = tracing::debug_span!("rpc", rpc = "DescribeTopic");
        let result = async move {
            self.authorize(
                &request,
                Operation::Describe,
                Resource::topic(&request.get_ref().name),
            )?;
            let local_only = request.metadata().contains_key(LOCAL_ONLY_HEADER);
            let name = request.into_inner().name;
            self.await_topic(&name).await;
            let topic = self.registry.get(&name).map_err(to_status)?;
            let mut description = describe(&topic);
            if !local_only {
                self.describe_elsewhere(&topic, &mut description).await;
            }
            Ok(Response::new(v1::DescribeTopicResponse {
                topic: Some(description),
            }))
        }
        .instrument(span)
        .await;
        finish("DescribeTopic", started, result)
    }

    async fn produce(
        &self,
        request: Request<v1::ProduceRequest>,
    ) -> Result<Response<v1::ProduceResponse>, Status> {
        let started = Instant::now();
        let span = tracing::debug_span!("rpc", rpc = "Produce");
        let result = async move {
            self.authorize(
                &request,
                Operation::Write,
                Resource::topic(&request.get_ref().topic),
            )?;
            let principal = request.extensions().get::<Principal>().cloned();
            let request = request.into_inner();
            let correlation_id = request.correlation_id;
            let partition_id = request.partition;
            let bytes = produce::request_bytes(&request);
            self.await_topic(&request.topic).await;
            let (partition, submitted, acks) = self.append(request).map_err(to_status)?;
            let appended = Self::ack(&partition, submitted, acks)
                .await
                .map_err(to_status)?;
            let delay = throttle(
                self.quotas.as_deref(),
                principal.as_ref(),
                Direction::Produce,
                bytes,
            )
            .await;
            let mut response = Response::new(Self::produce_response(
                correlation_id,
                partition_id,
                appended,
            ));
            mark(&mut response, delay);
            Ok(response)
        }
        .instrument(span)
        .await;
        finish("Produce", started, result)
    }

    type ProduceStreamStream = ResponseStream<v1::ProduceResponse>;

    async fn produce_stream(
        &self,
        request: Request<Streaming<v1::ProduceRequest>>,
    ) -> Result<Response<Self::ProduceStreamStream>, Status> {
        let started = Instant::now();
        let span = tracing::debug_span!("rpc", rpc = "ProduceStream");
        let result = self.produce_stream_call(request).instrument(span).await;
        finish("ProduceStream", started, result)
    }

    async fn fetch(
        &self,
        request: Request<v1::FetchRequest>,
    ) -> Result<Response<v1::FetchResponse>, Status> {
        let started = Instant::now();
        let span = tracing::debug_span!("rpc", rpc = "Fetch");
        let result = self.fetch_call(request).instrument(span).await;
        finish("Fetch", started, result)
    }

    type SubscribeStream = ResponseStream<v1::FetchResponse>;

    async fn subscribe(
        &self,
        request: Request<v1::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let started = Instant::now();
        let span = tracing::debug_span!("rpc", rpc = "Subscribe");
        let result = self.subscribe_call(request).instrument(span).await;
        finish("Subscribe", started, result)
    }

    async fn list_offsets(
        &self,
        request: Request<v1::ListOffsetsRequest>,
    ) -> Result<Response<v1::ListOffsetsResponse>, Status> {
        let started = Instant::now();
        let span = tracing::debug_span!("rpc", rpc = "ListOffsets");
        let result = self.list_offsets_call(request).instrument(span).await;
        finish("ListOffsets", started, result)
    }

    async fn init_producer(
        &self,
        request: Request<v1::InitProducerRequest>,
    ) -> Result<Response<v1::InitProducerResponse>, Status> {
        let started = Instant::now();
        let registry = self.registry.clone();
        // Re-initialising an id fences whoever holds it: only an administrator may, since ids
        // are not bound to principals.
        if request.get_ref().producer_id != 0 {
            if let Err(status) =
                self.authorize(&request, Operation::ClusterAdmin, Resource::cluster())
            {
                return finish("InitProducer", started, Err(status));
            }
        }
        let producer_id = request.into_inner().producer_id;
        if producer_id != 0 && self.cluster.controller.is_some() {
            // Each node keeps the epochs of the ids it issued; a bump must reach every node
            // holding a partition the producer writes, which the next cluster issue brings.
            return finish(
                "InitProducer",
                started,
                Err(Status::failed_precondition(format!(
                    "re-initialising producer id {producer_id} (to fence an older instance) is \
                     not supported in a cluster yet: initialise a new producer id instead"
                ))),
            );
        }
        // It may fsync (an epoch bump, a new block of ids).
        let result = tokio::task::spawn_blocking(move || registry.init_producer(producer_id))
            .await
            .map_err(|e| BrokerError::InvalidRequest(format!("init producer task failed: {e}")))
            .and_then(|result| result)
            .map(|(id, epoch)| {
                Response::new(v1::InitProducerResponse {
                    producer_id: id as u64,
                    producer_epoch: epoch as u32,
                })
            })
            .map_err(to_status);
        finish("InitProducer", started, result)
    }

    async fn get(
        &self,
        request: Request<v1::GetRequest>,
    ) -> Result<Response<v1::GetResponse>, Status> {
        let started = Instant::now();
        let result = self.get_call(request).await;
        finish("Get", started, result)
    }

    async fn history(
        &self,
        request: Request<v1::HistoryRequest>,
    ) -> Result<Response<v1::HistoryResponse>, Status> {
        let started = Instant::now();
        let result = self.history_call(request).await;
        finish("History", started, result)
    }

    type SnapshotStream = ResponseStream<v1::SnapshotResponse>;

    async fn snapshot(
        &self,
        request: Request<v1::SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        let started = Instant::now();
        let span = tracing::debug_span!("rpc", rpc = "Snapshot");
        let result = self.snapshot_call(request).instrument(span).await;
        finish("Snapshot", started, result)
    }

    async fn compact_topic(
        &self,
        request: Request<v1::CompactTopicRequest>,
    ) -> Result<Response<v1::CompactTopicResponse>, Status> {
        let started = Instant::now();
        let audit = Audit::of(
            &request,
            "compact_topic",
            format!("topic:{}", request.get_ref().name),
        );
        let result = async move {
            self.authorize(
                &request,
                Operation::Alter,
                Resource::topic(&request.get_ref().name),
            )?;
            self.compact_topic_call(request).await
        }
        .await;
        audit.record(&result);
        finish("CompactTopic", started, result)
    }

    async fn join_group(
        &self,
        request: Request<v1::JoinGroupRequest>,
    ) -> Result<Response<v1::JoinGroupResponse>, Status> {
        let started = Instant::now();
        let result = async move {
            self.authorize(
                &request,
                Operation::GroupRead,
                Resource::group(&request.get_ref().group),
            )?;
            // A member takes partitions of its topics from the others: it must be able to
            // read them (and learns nothing of topics it may not).
            for topic in &request.get_ref().topics {
                self.authorize(&request, Operation::Read, Resource::topic(topic))?;
            }
            self.check_running().map_err(to_status)?;
            let response = self
                .coordinator
                .join(request.into_inner())
                .map_err(to_status)?;
            Ok(Response::new(response))
        }
        .await;
        finish("JoinGroup", started, result)
    }

    async fn heartbeat(
        &self,
        request: Request<v1::HeartbeatRequest>,
    ) -> Result<Response<v1::HeartbeatResponse>, Status> {
        let started = Instant::now();
        let result = async move {
            self.authorize(
                &request,
                Operation::GroupRead,
                Resource::group(&request.get_ref().group),
            )?;
            self.check_running().map_err(to_status)?;
            let response = self
                .coordinator
                .heartbeat(request.into_inner())
                .map_err(to_status)?;
            Ok(Response::new(response))
        }
        .await;
        finish("Heartbeat", started, result)
    }

    async fn leave_group(
        &self,
        request: Request<v1::LeaveGroupRequest>,
    ) -> Result<Response<v1::LeaveGroupResponse>, Status> {
        let started = Instant::now();
        let result = async move {
            self.authorize(
                &request,
                Operation::GroupRead,
                Resource::group(&request.get_ref().group),
            )?;
            self.coordinator
                .leave(request.into_inner())
                .map_err(to_status)?;
            Ok(Response::new(v1::LeaveGroupResponse {}))
        }
        .await;
        finish("LeaveGroup", started, result)
    }

    async fn commit_offsets(
        &self,
        request: Request<v1::CommitOffsetsRequest>,
    ) -> Result<Response<v1::CommitOffsetsResponse>, Status> {
        let started = Instant::now();
        // A commit outside a member (empty member id) is an offset reset: audited.
        let audit = request.get_ref().member_id.is_empty().then(|| {
            Audit::of(
                &request,
                "reset_offsets",
                format!("group:{}", request.get_ref().group),
            )
        });
        let result = async move {
            self.authorize(
                &request,
                Operation::GroupRead,
                Resource::group(&request.get_ref().group),
            )?;
            for commit in &request.get_ref().offsets {
                self.authorize(&request, Operation::Read, Resource::topic(&commit.topic))?;
            }
            self.check_running().map_err(to_status)?;
            self.coordinator
                .commit(request.into_inner())
                .await
                .map_err(to_status)?;
            Ok(Response::new(v1::CommitOffsetsResponse {}))
        }
        .await;
        if let Some(audit) = audit {
            audit.record(&result);
        }
        finish("CommitOffsets", started, result)
    }

    async fn fetch_offsets(
        &self,
        request: Request<v1::FetchOffsetsRequest>,
    ) -> Result<Response<v1::FetchOffsetsResponse>, Status> {
        let started = Instant::now();
        let result = async move {
            self.authorize(
                &request,
                Operation::GroupRead,
                Resource::group(&request.get_ref().group),
            )?;
            let extensions = request.extensions().clone();
            let mut offsets = self
                .coordinator
                .fetch_offsets(request.into_inner())
                .map_err(to_status)?;
            offsets.retain(|o| self.may_describe(&extensions, Resource::topic(&o.topic)));
            Ok(Response::new(v1::FetchOffsetsResponse { offsets }))
        }
        .await;
        finish("FetchOffsets", started, result)
    }

    async fn list_groups(
        &self,
        request: Request<v1::ListGroupsRequest>,
    ) -> Result<Response<v1::ListGroupsResponse>, Status> {
        let started = Instant::now();
        let result = async move {
            let mut groups = self.coordinator.list();
            groups.retain(|g| self.may_describe(request.extensions(), Resource::group(&g.group)));
            Ok(Response::new(v1::ListGroupsResponse { groups }))
        }
        .await;
        finish("ListGroups", started, result)
    }

    async fn describe_group(
        &self,
        request: Request<v1::DescribeGroupRequest>,
    ) -> Result<Response<v1::DescribeGroupResponse>, Status> {
        let started = Instant::now();
        let result = async move {
            self.authorize(
                &request,
                Operation::Describe,
                Resource::group(&request.get_ref().group),
            )?;
            let extensions = request.extensions().clone();
            let mut response = self
                .coordinator
                .describe(&request.into_inner().group)
                .map_err(to_status)?;
            // Offsets and lag only of the topics the caller may describe.
            response
                .partitions
                .retain(|p| self.may_describe(&extensions, Resource::topic(&p.topic)));
            self.describe_group_elsewhere(&mut response).await;
            Ok(Response::new(response))
        }
        .await;
        finish("DescribeGroup", started, result)
    }

    async fn find_coordinator(
        &self,
        request: Request<v1::FindCoordinatorRequest>,
    ) -> Result<Response<v1::FindCoordinatorResponse>, Status> {
        let started = Instant::now();
        let result = async move { self.find_coordinator_call(request).await }.await;
        finish("FindCoordinator", started, result)
    }

    async fn add_acls(
        &self,
        request: Request<v1::AddAclsRequest>,
    ) -> Result<Response<v1::AddAclsResponse>, Status> {
        let started = Instant::now();
        let audit = Audit::of(&request, "add_acls", acls_audited(&request.get_ref().acls));
        let result = async move {
            self.authorize(&request, Operation::ClusterAdmin, Resource::cluster())?;
            self.add_acls_call(request).await
        }
        .await;
        audit.record(&result);
        finish("AddAcls", started, result)
    }

    async fn remove_acls(
        &self,
        request: Request<v1::RemoveAclsRequest>,
    ) -> Result<Response<v1::RemoveAclsResponse>, Status> {
        let started = Instant::now();
        let audit = Audit::of(
            &request,
            "remove_acls",
            acls_audited(&request.get_ref().acls),
        );
        let result = async move {
            self.authorize(&request, Operation::ClusterAdmin, Resource::cluster())?;
            self.remove_acls_call(request).await
        }
        .await;
        audit.record(&result);
        finish("RemoveAcls", started, result)
    }

    async fn list_acls(
        &self,
        request: Request<v1::ListAclsRequest>,
    ) -> Result<Response<v1::ListAclsResponse>, Status> {
        let started = Instant::now();
        let result = self
            .authorize(&request, Operation::ClusterAdmin, Resource::cluster())
            .and_then(|()| self.list_acls_call(request));
        finish("ListAcls", started, result)
    }
}

/// The audit log's resource for an ACL change: the bindings, as `acl add` spells them.
fn acls_audited(acls: &[v1::Acl]) -> String {
    let shown: Vec<String> = acls
        .iter()
        .take(20)
        .map(|a| {
            format!(
                "{} {} {} {}:{}{}",
                a.principal,
                if a.deny { "deny" } else { "allow" },
                a.operation,
                a.resource_type,
                a.resource_name,
                if a.prefix { "*" } else { "" }
            )
        })
        .collect();
    let more = acls.len().saturating_sub(shown.len());
    if more > 0 {
        format!("acls:[{}, and {more} more]", shown.join("; "))
    } else {
        format!("acls:[{}]", shown.join("; "))
    }
}
