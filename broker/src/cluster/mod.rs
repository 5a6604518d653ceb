//! The cluster layer: who this node is and which cluster its data directory belongs to.
//!
//! Owns the node settings (`--node-id`, `--cluster`, `--advertise`: [`node`]) and the data
//! directory's identity file ([`identity`]). The controller (an openraft group holding the
//! cluster metadata), placement and liveness will live here too; until they do, a node is a
//! cluster of one and a `--cluster` list naming other nodes is refused at start with a clear
//! error rather than half-served.
//!
//! It may call `config`, `error` and the data directory's files; `log/`, `partition`, `topic`
//! and `group/` know nothing of it, and openraft types will stay inside this folder and
//! `replication/`.

pub mod identity;
pub mod node;

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
