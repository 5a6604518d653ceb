//! Operating a cluster: ReassignPartition, Rebalance, AddNode, RemoveNode, SetVoters.
//!
//! Moves are ordinary controller commands (`Command::Reassign`), proposed from any node; the
//! partitions' leaders carry them out (`cluster::moves`). Membership changes (AddNode, the
//! last step of RemoveNode, SetVoters) run on the controller leader: another node hands the
//! call to it, once.

use std::sync::Arc;
use std::time::Duration;

use syncline_proto::v1;
use syncline_proto::v1::broker_client::BrokerClient;
use tonic::{Request, Response, Status};

use super::super::status::to_status;
use super::BrokerService;
use crate::cluster::controller::Controller;
use crate::cluster::metadata::Command;
use crate::cluster::moves::DEFAULT_THROTTLE_BYTES_PER_SEC;
use crate::cluster::plan::{PlanError, PlannedMove};
use crate::error::BrokerError;

/// How long a call handed to the controller leader may take.
const LEADER_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Metadata header marking a call already handed to the leader (it is not handed on again).
const FORWARDED_HEADER: &str = "syncline-forwarded";

fn moves_of(planned: &[PlannedMove]) -> Vec<v1::PartitionMove> {
    planned
        .iter()
        .map(|m| v1::PartitionMove {
            topic: m.topic.clone(),
            partition: m.partition,
            from: m.from.clone(),
            to: m.to.clone(),
        })
        .collect()
}

fn plan_error(error: PlanError) -> Status {
    match error {
        PlanError::UnknownNode(_) => Status::not_found(error.to_string()),
        _ => Status::failed_precondition(error.to_string()),
    }
}

/// The controller leader's Broker client, when another node leads (None: this node leads).
async fn leader_client(
    controller: &Controller,
    forwarded: bool,
) -> Result<Option<BrokerClient<tonic::transport::Channel>>, Status> {
    let me = controller.node_id();
    let deadline = tokio::time::Instant::now() + LEADER_CALL_TIMEOUT;
    loop {
        match controller.leader() {
            Some(leader) if leader == me => return Ok(None),
            Some(leader) if !forwarded => {
                let address = controller.address_of(leader).ok_or_else(|| {
                    Status::unavailable(format!(
                        "the controller leader {leader} has no known address"
                    ))
                })?;
                let channel = controller.channel_to(&address).map_err(to_status)?;
                return Ok(Some(BrokerClient::new(channel)));
            }
            Some(leader) => {
                return Err(Status::unavailable(format!(
                    "the call was handed to node {me} as the controller leader, but node \
                     {leader} leads now: retry"
                )))
            }
            None if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            None => {
                return Err(Status::unavailable(
                    "no controller leader is elected: retry once a majority of the voters is up",
                ))
            }
        }
    }
}

/// A status from a call handed to the leader: one the transport made up (the leader went
/// away mid-call) is UNAVAILABLE, worth a retry.
fn from_leader<T>(answer: Result<Response<T>, Status>) -> Result<Response<T>, Status> {
    answer.map_err(|status| {
        if std::error::Error::source(&status).is_some() {
            Status::unavailable(format!(
                "the controller leader did not answer ({}): retry",
                status.message()
            ))
        } else {
            status
        }
    })
}

fn handed_on<T>(
    message: T,
    credentials: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
) -> Request<T> {
    let mut call = Request::new(message);
    // The caller's bearer token goes along: the leader authenticates the same caller (a node's
    // own certificate authenticates it where there is none).
    if let Some(credentials) = credentials {
        call.metadata_mut().insert("authorization", credentials);
    }
    call.set_timeout(LEADER_CALL_TIMEOUT);
    call.metadata_mut().insert(
        FORWARDED_HEADER,
        tonic::metadata::MetadataValue::from_static("1"),
    );
    call
}

impl BrokerService {
    fn controller(&self, what: &str) -> Result<&Arc<Controller>, Status> {
        self.cluster.controller.as_ref().ok_or_else(|| {
            Status::failed_precondition(format!(
                "{what} needs a cluster: this broker is a cluster of one (start nodes with \
                 --cluster, or add this one to a cluster with --join)"
            ))
        })
    }

    /// Proposes the planned moves and returns the ones that started; the ones the controller
    /// refused are left out with a warning (another move of the partition started meanwhile).
    async fn start_moves(
        controller: &Controller,
        planned: Vec<PlannedMove>,
        throttle: u64,
    ) -> Result<Vec<PlannedMove>, Status> {
        let mut started = Vec::with_capacity(planned.len());
        for m in planned {
            let command = Command::Reassign {
                topic: m.topic.clone(),
                id: m.id.clone(),
                partition: m.partition,
                replicas: m.to.clone(),
                throttle_bytes_per_sec: throttle,
                shrink: m.shrink,
            };
            match controller.propose(command).await.map_err(to_status)? {
                Ok(()) => started.push(m),
                Err(error) => {
                    tracing::warn!(topic = %m.topic, partition = m.partition, %error, "planned move not started")
                }
            }
        }
        Ok(started)
    }

    pub(super) async fn reassign_partition_call(
        &self,
        request: Request<v1::ReassignPartitionRequest>,
    ) -> Result<Response<v1::ReassignPartitionResponse>, Status> {
        let controller = self.controller("moving a partition")?;
        let request = request.into_inner();
        let metadata = controller.metadata();
        let topic = metadata.topics.get(&request.topic).ok_or_else(|| {
            to_status(BrokerError::TopicNotFound {
                topic: request.topic.clone(),
            })
        })?;
        let placement = topic
            .partitions
            .get(request.partition as usize)
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "topic `{}` has no partition {} (it has {})",
                    request.topic,
                    request.partition,
                    topic.partitions.len()
                ))
            })?;
        if request.replicas.len() != topic.replication_factor as usize {
            return Err(Status::invalid_argument(format!(
                "topic `{}` has replication factor {}: give {} distinct node id(s), the \
                 preferred leader first, not {}",
                request.topic,
                topic.replication_factor,
                topic.replication_factor,
                request.replicas.len()
            )));
        }
        let started = !crate::cluster::metadata::same_set(&placement.replicas, &request.replicas);
        let command = Command::Reassign {
            topic: request.topic.clone(),
            id: topic.id.clone(),
            partition: request.partition,
            replicas: request.replicas.clone(),
            throttle_bytes_per_sec: request
                .throttle_bytes_per_sec
                .unwrap_or(DEFAULT_THROTTLE_BYTES_PER_SEC),
            shrink: false,
        };
        controller
            .propose(command)
            .await
            .map_err(to_status)?
            .map_err(|e| to_status(e.into()))?;
        tracing::info!(topic = %request.topic, partition = request.partition, replicas = ?request.replicas, started, "partition reassigned");
        Ok(Response::new(v1::ReassignPartitionResponse { started }))
    }

    pub(super) async fn rebalance_call(
        &self,
        request: Request<v1::RebalanceRequest>,
    ) -> Result<Response<v1::RebalanceResponse>, Status> {
        let controller = self.controller("rebalancing")?;
        let request = request.into_inner();
        let metadata = controller.metadata();
        let mut planned: Vec<PlannedMove> = crate::cluster::plan::rebalance(&metadata);
        if !request.dry_run {
            let throttle = request
                .throttle_bytes_per_sec
                .unwrap_or(DEFAULT_THROTTLE_BYTES_PER_SEC);
            planned = Self::start_moves(controller, planned, throttle).await?;
            tracing::info!(moves = planned.len(), throttle, "rebalance started");
        }
        Ok(Response::new(v1::RebalanceResponse {
            moves: moves_of(&planned),
        }))
    }

    pub(super) async fn add_node_call(
        &self,
        request: Request<v1::AddNodeRequest>,
    ) -> Result<Response<v1::AddNodeResponse>, Status> {
        let controller = self.controller("adding a node")?;
        let forwarded = request.metadata().contains_key(FORWARDED_HEADER);
        let credentials = request.metadata().get("authorization").cloned();
        let request = request.into_inner();
        if let Some(mut leader) = leader_client(controller, forwarded).await? {
            return from_leader(leader.add_node(handed_on(request, credentials)).await);
        }
        controller
            .add_node(request.node_id, &request.address, &request.dir_id)
            .await
            .map_err(to_status)?;
        // A node whose removal was started and is added again stays.
        if controller
            .metadata()
            .nodes
            .get(&request.node_id)
            .is_some_and(|n| n.leaving)
        {
            controller
                .propose(Command::SetLeaving {
                    id: request.node_id,
                    leaving: false,
                })
                .await
                .map_err(to_status)?
                .map_err(|e| to_status(e.into()))?;
        }
        Ok(Response::new(v1::AddNodeResponse {
            cluster_id: controller.cluster_id().to_string(),
            formed_by: controller.formed_by_text(),
        }))
    }

    pub(super) async fn remove_node_call(
        &self,
        request: Request<v1::RemoveNodeRequest>,
    ) -> Result<Response<v1::RemoveNodeResponse>, Status> {
        let controller = self.controller("removing a node")?;
        let forwarded = request.metadata().contains_key(FORWARDED_HEADER);
        let credentials = request.metadata().get("authorization").cloned();
        let request = request.into_inner();
        let node = request.node_id;
        let metadata = controller.metadata();
        if !metadata.nodes.contains_key(&node) && !controller.membership().1.contains_key(&node) {
            return Err(Status::not_found(format!(
                "node {node} is not a member of the cluster (members: {:?})",
                metadata.nodes.keys().collect::<Vec<_>>()
            )));
        }
        let planned = crate::cluster::plan::drain(&metadata, node, request.force)
            .or_else(|error| match error {
                // Removed from the metadata already (a retried last step).
                PlanError::UnknownNode(_) => Ok(Vec::new()),
                other => Err(other),
            })
            .map_err(plan_error)?;
        // From here no move lands on the node (a rebalance running meanwhile included): the
        // drain below finishes, and nothing is placed on it between the last check and its
        // removal.
        if metadata.nodes.get(&node).is_some_and(|n| !n.leaving) {
            controller
                .propose(Command::SetLeaving {
                    id: node,
                    leaving: true,
                })
                .await
                .map_err(to_status)?
                .map_err(|e| to_status(e.into()))?;
            tracing::info!(
                node,
                "node marked as being removed: it takes no new replica"
            );
        }
        if !planned.is_empty() {
            let throttle = request
                .throttle_bytes_per_sec
                .unwrap_or(DEFAULT_THROTTLE_BYTES_PER_SEC);
            let planned = Self::start_moves(controller, planned, throttle).await?;
            tracing::info!(
                node,
                moves = planned.len(),
                "moving the replicas off a node before it is removed"
            );
            return Ok(Response::new(v1::RemoveNodeResponse {
                moves: moves_of(&planned),
                removed: false,
            }));
        }
        // Moves still running onto or off the node.
        let running: Vec<v1::PartitionMove> = metadata
            .topics
            .iter()
            .flat_map(|(name, topic)| {
                topic
                    .partitions
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| p.holders().contains(&node))
                    .map(move |(n, p)| v1::PartitionMove {
                        topic: name.clone(),
                        partition: n as u32,
                        from: p.replicas.clone(),
                        to: p
                            .moving
                            .as_ref()
                            .map(|m| m.target.clone())
                            .unwrap_or_default(),
                    })
            })
            .collect();
        if !running.is_empty() {
            return Ok(Response::new(v1::RemoveNodeResponse {
                moves: running,
                removed: false,
            }));
        }
        if let Some(mut leader) = leader_client(controller, forwarded).await? {
            return from_leader(leader.remove_node(handed_on(request, credentials)).await);
        }
        controller
            .remove_member(node, request.force)
            .await
            .map_err(to_status)?;
        controller
            .propose(Command::RemoveNode { id: node })
            .await
            .map_err(to_status)?
            .map_err(|e| to_status(e.into()))?;
        tracing::info!(node, "node removed from the cluster");
        Ok(Response::new(v1::RemoveNodeResponse {
            moves: Vec::new(),
            removed: true,
        }))
    }

    pub(super) async fn set_voters_call(
        &self,
        request: Request<v1::SetVotersRequest>,
    ) -> Result<Response<v1::SetVotersResponse>, Status> {
        let controller = self.controller("changing the controller's voters")?;
        let forwarded = request.metadata().contains_key(FORWARDED_HEADER);
        let credentials = request.metadata().get("authorization").cloned();
        let request = request.into_inner();
        if let Some(mut leader) = leader_client(controller, forwarded).await? {
            return from_leader(leader.set_voters(handed_on(request, credentials)).await);
        }
        let voters = controller
            .set_voters(&request.voters)
            .await
            .map_err(to_status)?;
        Ok(Response::new(v1::SetVotersResponse { voters }))
    }
}
