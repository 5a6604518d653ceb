//! The cluster layer: who this node is and which cluster its data directory belongs to.
//!
//! Owns the node settings (`--node-id`, `--cluster`, `--advertise`: [`node`]), the data
//! directory's identity file ([`identity`]), the controller's state machine over the cluster
//! metadata ([`metadata`]: nodes, topics, replica sets, leaders and leader epochs; deterministic
//! apply) and placement ([`placement`]: partitions spread evenly over live nodes). The
//! controller's Raft group that orders the metadata commands, its log and snapshot storage and
//! peer transport come next; until they do, a node is a cluster of one and a `--cluster` list
//! naming other nodes is refused at start with a clear error rather than half-served.
//!
//! Raft library: openraft, never a protocol of our own. The plan is an exactly pinned 0.10
//! alpha (`=0.10.0-alpha.N`, the newest on crates.io when the controller is wired) rather than
//! the stable 0.9 line: the replicated partitions of the next issue run one Raft group per
//! partition, and 0.10 brings `RaftNetworkV2` (streaming snapshots, no per-call connection
//! setup) and the multi-group helpers they want; pinning exactly keeps its API still.
//!
//! It may call `config`, `error` and the data directory's files; `log/`, `partition`, `topic`
//! and `group/` know nothing of it, and openraft types will stay inside this folder and
//! `replication/`.

pub mod identity;
pub mod metadata;
pub mod node;
pub mod placement;

/// What this node tells clients about the cluster: until the controller lands, a cluster of one
/// (this node leads and holds every partition).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterView {
    /// This node's id.
    pub node_id: u64,
    /// The cluster's id (from the data directory's identity).
    pub cluster_id: String,
    /// This node's advertised `HOST:PORT`.
    pub address: String,
}
