//! The `syncline.v1.Peer` service: node-to-node calls on the client port (controller Raft
//! messages, proposals forwarded to the controller leader, heartbeats, read index, partition
//! groups' Raft messages and snapshots). Served only
//! by a node started with `--cluster`. Every call names its cluster; a node of another cluster
//! is refused with FAILED_PRECONDITION.

use std::sync::Arc;

use syncline_proto::v1;
use syncline_proto::v1::peer_server::Peer;
use tonic::{Request, Response, Status};

use crate::cluster::controller::Controller;

/// The Peer service over this node's controller.
pub struct PeerService {
    controller: Arc<Controller>,
}

impl PeerService {
    /// Serves `controller`'s peer calls.
    pub fn new(controller: Arc<Controller>) -> PeerService {
        PeerService { controller }
    }
}

/// The stream a `Peer.CopyPartition` call answers with.
type CopyStream =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<v1::SnapshotChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Peer for PeerService {
    type CopyPartitionStream = CopyStream;

    async fn copy_partition(
        &self,
        request: Request<v1::CopyPartitionRequest>,
    ) -> Result<Response<Self::CopyPartitionStream>, Status> {
        let request = request.into_inner();
        self.controller.check_cluster(&request.cluster_id)?;
        let stream = crate::cluster::copy::serve(&self.controller, request).await?;
        Ok(Response::new(Box::pin(stream)))
    }

    async fn raft(
        &self,
        request: Request<v1::PeerRaftRequest>,
    ) -> Result<Response<v1::PeerRaftResponse>, Status> {
        let request = request.into_inner();
        self.controller.check_cluster(&request.cluster_id)?;
        let payload = self
            .controller
            .handle_raft(&request.kind, &request.payload)
            .await?;
        Ok(Response::new(v1::PeerRaftResponse {
            payload: payload.into(),
        }))
    }

    async fn propose(
        &self,
        request: Request<v1::PeerProposeRequest>,
    ) -> Result<Response<v1::PeerProposeResponse>, Status> {
        let request = request.into_inner();
        self.controller.check_cluster(&request.cluster_id)?;
        let result = self.controller.handle_propose(&request.command).await?;
        Ok(Response::new(v1::PeerProposeResponse {
            result: result.into(),
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<v1::PeerHeartbeatRequest>,
    ) -> Result<Response<v1::PeerHeartbeatResponse>, Status> {
        let request = request.into_inner();
        self.controller.check_cluster(&request.cluster_id)?;
        self.controller
            .handle_heartbeat(request.node_id, &request.address, &request.dir_id)?;
        Ok(Response::new(v1::PeerHeartbeatResponse {}))
    }

    async fn read_index(
        &self,
        request: Request<v1::PeerReadIndexRequest>,
    ) -> Result<Response<v1::PeerReadIndexResponse>, Status> {
        let request = request.into_inner();
        self.controller.check_cluster(&request.cluster_id)?;
        let committed_index = self.controller.handle_read_index().await?;
        Ok(Response::new(v1::PeerReadIndexResponse { committed_index }))
    }

    async fn replicate(
        &self,
        request: Request<v1::ReplicateRequest>,
    ) -> Result<Response<v1::ReplicateResponse>, Status> {
        let request = request.into_inner();
        self.controller.check_cluster(&request.cluster_id)?;
        let payload = self.controller.replicas().serve(request).await?;
        Ok(Response::new(v1::ReplicateResponse {
            payload: payload.into(),
        }))
    }

    async fn install_snapshot(
        &self,
        request: Request<tonic::Streaming<v1::SnapshotChunk>>,
    ) -> Result<Response<v1::ReplicateResponse>, Status> {
        let mut stream = request.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("a snapshot stream without its header"))?;
        self.controller.check_cluster(&first.cluster_id)?;
        let payload = self
            .controller
            .replicas()
            .serve_snapshot(first, stream)
            .await?;
        Ok(Response::new(v1::ReplicateResponse {
            payload: payload.into(),
        }))
    }
}
