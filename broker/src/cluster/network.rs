//! Node-to-node calls: openraft's RPCs to the other voters, and the controller calls a node
//! makes to the controller leader (propose, heartbeat, read index). All go over the
//! `syncline.v1.Peer` gRPC service on each node's advertised address, one lazily connected
//! channel per address, with openraft's messages JSON-encoded in the payload.
//!
//! Fault model: a peer that does not answer within the call's time limit is unreachable
//! (openraft backs off and retries); a peer from another cluster refuses the call
//! (FAILED_PRECONDITION), which shows up here as a network error naming it.

use std::collections::HashMap;
use std::future::Future;
use std::io::Cursor;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::v2::RaftNetworkV2;
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::{BasicNode, OptionalSend};
use serde::de::DeserializeOwned;
use serde::Serialize;
use syncline_proto::v1;
use syncline_proto::v1::peer_client::PeerClient;
use tonic::transport::{Channel, Endpoint};

use super::raft::{Snapshot, TypeConfig, Vote};

/// How often an idle peer connection is pinged, and how long an answer may take.
const PEER_KEEPALIVE: Duration = Duration::from_secs(5);
const PEER_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a node waits to connect to a peer.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Turns a peer's endpoint into a channel: the transport seam (a simulator connects over its
/// own network; the default is tonic's TCP, connected lazily).
pub type Connector = Arc<dyn Fn(Endpoint) -> Channel + Send + Sync>;

/// HTTP/2 receive windows of a peer connection (per stream, per connection).
const PEER_STREAM_WINDOW_BYTES: u32 = 8 * 1024 * 1024;
const PEER_CONNECTION_WINDOW_BYTES: u32 = 32 * 1024 * 1024;

/// Channels to peers by address, shared by every caller on this node.
#[derive(Clone, Default)]
pub struct Peers {
    channels: Arc<parking_lot::Mutex<HashMap<String, Channel>>>,
    connector: Option<Connector>,
    /// Mutual TLS to the other nodes: this node's certificate as its client identity, the
    /// client CA as the trust root of theirs (read when a channel is made).
    tls: Option<crate::config::TlsFiles>,
}

/// The endpoint of a node at `address`: plain HTTP/2, or with `tls` mutual TLS (this node's
/// certificate and key as its identity; the other node's certificate must chain to the client
/// CA, which signs the nodes' certificates).
pub fn peer_endpoint(
    address: &str,
    tls: Option<&crate::config::TlsFiles>,
) -> Result<Endpoint, String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let endpoint = Endpoint::from_shared(format!("{scheme}://{address}"))
        .map_err(|e| format!("bad peer address `{address}`: {e}"))?;
    let Some(files) = tls else {
        return Ok(endpoint);
    };
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
    };
    let ca = files.client_ca.as_ref().ok_or(
        "TLS between nodes needs --tls-client-ca (the CA that signs the nodes' certificates)",
    )?;
    let settings = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(read(ca)?))
        .identity(tonic::transport::Identity::from_pem(
            read(&files.cert)?,
            read(&files.key)?,
        ));
    endpoint
        .tls_config(settings)
        .map_err(|e| format!("TLS settings for {address}: {e}"))
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers")
            .field(
                "addresses",
                &self.channels.lock().keys().collect::<Vec<_>>(),
            )
            .field("custom_connector", &self.connector.is_some())
            .finish()
    }
}

impl Peers {
    /// Peers whose channels `connector` makes (instead of tonic's TCP).
    pub fn with_connector(connector: Connector) -> Peers {
        Peers {
            channels: Arc::default(),
            connector: Some(connector),
            tls: None,
        }
    }

    /// Peers reached with mutual TLS (`tls`: see [`peer_endpoint`]), or in plain text.
    pub fn with_tls(tls: Option<crate::config::TlsFiles>) -> Peers {
        Peers {
            tls,
            ..Peers::default()
        }
    }

    /// Drops every channel: the next call to each peer connects again (with certificates read
    /// again, after a SIGHUP).
    pub fn reset(&self) {
        self.channels.lock().clear();
    }

    /// A client for the peer at `address` (the channel connects lazily and reconnects).
    pub fn client(&self, address: &str) -> Result<PeerClient<Channel>, String> {
        self.channel(address).map(PeerClient::new)
    }

    /// The channel to the node at `address` (for its Broker service too).
    pub fn channel(&self, address: &str) -> Result<Channel, String> {
        let mut channels = self.channels.lock();
        if let Some(channel) = channels.get(address) {
            return Ok(channel.clone());
        }
        let endpoint = peer_endpoint(address, self.tls.as_ref())?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            // A peer cut off without a FIN (a partition, a paused process) is found by these
            // pings even while no call is in flight, so the next call does not queue on a dead
            // connection: at most PEER_KEEPALIVE + PEER_KEEPALIVE_TIMEOUT after the cut.
            .http2_keep_alive_interval(PEER_KEEPALIVE)
            .keep_alive_timeout(PEER_KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            // What a peer streams to this node (a partition copy, `copy`) is not held back by
            // HTTP/2 flow control (the defaults are 64 KiB).
            .initial_stream_window_size(PEER_STREAM_WINDOW_BYTES)
            .initial_connection_window_size(PEER_CONNECTION_WINDOW_BYTES);
        let channel = match &self.connector {
            Some(connect) => connect(endpoint),
            None => endpoint.connect_lazy(),
        };
        channels.insert(address.to_string(), channel.clone());
        Ok(channel)
    }
}

/// Makes openraft's connections to the other voters.
#[derive(Debug, Clone)]
pub struct NetworkFactory {
    /// This node's cluster (sent with every call; a node of another cluster refuses it).
    pub cluster_id: String,
    /// This node's id.
    pub me: u64,
    /// The shared channels.
    pub peers: Peers,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = Connection;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> Connection {
        Connection {
            cluster_id: self.cluster_id.clone(),
            me: self.me,
            target,
            address: node.addr.clone(),
            peers: self.peers.clone(),
        }
    }
}

/// openraft's connection to one voter.
pub struct Connection {
    cluster_id: String,
    me: u64,
    target: u64,
    address: String,
    peers: Peers,
}

fn network_error(message: String) -> RPCError<TypeConfig> {
    RPCError::Network(NetworkError::from_string(message))
}

impl Connection {
    async fn call<Req, Resp>(
        &mut self,
        kind: &str,
        request: &Req,
        ttl: Duration,
    ) -> Result<Resp, RPCError<TypeConfig>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
    {
        let payload = serde_json::to_vec(request)
            .map_err(|e| network_error(format!("encoding a {kind} request: {e}")))?;
        let mut client = self.peers.client(&self.address).map_err(network_error)?;
        let call = client.raft(v1::PeerRaftRequest {
            cluster_id: self.cluster_id.clone(),
            from: self.me,
            kind: kind.to_string(),
            payload: payload.into(),
        });
        let response = match tokio::time::timeout(ttl, call).await {
            Err(_) => {
                return Err(RPCError::Unreachable(Unreachable::from_string(format!(
                    "node {} at {} did not answer a {kind} within {ttl:?}",
                    self.target, self.address
                ))))
            }
            Ok(Err(status)) if status.code() == tonic::Code::Unavailable => {
                return Err(RPCError::Unreachable(Unreachable::from_string(format!(
                    "node {} at {}: {}",
                    self.target,
                    self.address,
                    status.message()
                ))))
            }
            Ok(Err(status)) => {
                return Err(network_error(format!(
                    "node {} at {}: {}",
                    self.target,
                    self.address,
                    status.message()
                )))
            }
            Ok(Ok(response)) => response.into_inner(),
        };
        let answer: Result<Resp, String> = serde_json::from_slice(&response.payload)
            .map_err(|e| network_error(format!("decoding a {kind} answer: {e}")))?;
        answer.map_err(|message| {
            network_error(format!("node {} refused {kind}: {message}", self.target))
        })
    }
}

impl RaftNetworkV2<TypeConfig> for Connection {
    type SnapshotData = Cursor<Vec<u8>>;

    async fn append_entries(
        &mut self,
        request: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call("append", &request, option.hard_ttl()).await
    }

    async fn vote(
        &mut self,
        request: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call("vote", &request, option.hard_ttl()).await
    }

    async fn pre_vote(
        &mut self,
        request: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call("pre_vote", &request, option.hard_ttl()).await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let request = (vote, snapshot.meta, snapshot.snapshot.into_inner());
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            answer = self.call("snapshot", &request, option.hard_ttl()) => Ok(answer?),
        }
    }

    async fn transfer_leader(
        &mut self,
        request: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call("transfer_leader", &request, option.hard_ttl())
            .await
    }
}
