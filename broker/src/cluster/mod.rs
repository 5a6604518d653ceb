//! The cluster layer: who this node is and which cluster its data directory belongs to.
//!
//! Owns the node settings (`--node-id`, `--cluster`, `--join`, `--advertise`: [`node`]), the
//! data directory's identity file ([`identity`]), joining a running cluster ([`join`]), the controller's state machine over the cluster
//! metadata ([`metadata`]: nodes, topics, replica sets, leaders and leader epochs; deterministic
//! apply) and placement ([`placement`]: partitions spread evenly over live nodes). The
//! controller's Raft group that orders the metadata commands, its log and snapshot storage and
//! peer transport: [`controller`] (bootstrap, proposals, liveness), [`raft`] (openraft types and
//! the state machine), [`log_store`] (the Raft log under the data directory), [`network`] (peer
//! calls), [`reconcile`] (local topics follow the applied metadata), [`moves`] (a partition's
//! leader moves it to another replica set) and [`copy`] (a partition of one replica moves by
//! copy and a short fence); [`membership`] changes who belongs (nodes join,
//! leave, become voters) and [`plan`] which moves a rebalance or a drain makes. Without `--cluster` a
//! node is a cluster of one and none of it runs.
//!
//! Raft library: openraft, never a protocol of our own. The plan is an exactly pinned 0.10
//! alpha (`=0.10.0-alpha.N`, the newest on crates.io when the controller is wired) rather than
//! the stable 0.9 line: the replicated partitions of the next issue run one Raft group per
//! partition, and 0.10 brings `RaftNetworkV2` (streaming snapshots, no per-call connection
//! setup) and the multi-group helpers they want; pinning exactly keeps its API still.
//!
//! It may call `config`, `error`, `metrics`, the topic registry (through [`reconcile`]) and the
//! name of `group::offsets::OFFSETS_TOPIC`, and the data directory's files. The layers below
//! know only what a cluster means to them, without calling it: `partition::RemoteLeader` (a
//! partition another node holds answers NotLeader), `topic` (a topic's `local_partitions`),
//! `group` (a node started with `--cluster` leaves `__offsets` to the controller). openraft
//! types stay inside this folder (and `replication/` later); the server adapts the Peer service
//! to [`controller::Controller`] (`server/peer.rs`).

pub mod controller;
pub mod copy;
pub mod identity;
pub mod join;
pub mod log_store;
pub mod membership;
pub mod metadata;
pub mod moves;
pub mod network;
pub mod node;
pub mod placement;
pub mod plan;
pub mod raft;
pub mod reconcile;
#[cfg(test)]
mod sim;

/// What this node tells clients about the cluster: a cluster of one (this node leads and holds
/// every partition) unless it runs the controller.
#[derive(Clone, Default)]
pub struct ClusterView {
    /// The controller, when the node was started with `--cluster`.
    pub controller: Option<std::sync::Arc<controller::Controller>>,
    /// This node's id.
    pub node_id: u64,
    /// The cluster's id (from the data directory's identity).
    pub cluster_id: String,
    /// This node's advertised `HOST:PORT`.
    pub address: String,
}

impl std::fmt::Debug for ClusterView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterView")
            .field("node_id", &self.node_id)
            .field("cluster_id", &self.cluster_id)
            .field("address", &self.address)
            .field("clustered", &self.controller.is_some())
            .finish()
    }
}
