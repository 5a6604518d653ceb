//! The cluster as a broker describes it ([`Client::describe_cluster`]): nodes, the controller,
//! and each partition's leader, replicas and caught-up replicas; and operating it: moving
//! partitions ([`Client::reassign_partition`], [`Client::rebalance`]), adding and removing
//! nodes, setting the controller's voters.

use syncline_proto::v1;

use crate::client::Client;
use crate::error::Result;

/// One broker node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterNode {
    /// Its node id.
    pub id: u64,
    /// Its advertised `HOST:PORT`.
    pub address: String,
    /// Whether the controller sees it alive.
    pub alive: bool,
    /// Whether it is being removed (`cluster remove-node`): it takes no new replica.
    pub leaving: bool,
}

/// Where one partition lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionPlacement {
    /// The topic (internal topics included).
    pub topic: String,
    /// The partition.
    pub partition: u32,
    /// The leading node, when known.
    pub leader: Option<u64>,
    /// The nodes holding a replica.
    pub replicas: Vec<u64>,
    /// The replicas holding every committed record.
    pub caught_up: Vec<u64>,
    /// While the partition moves: the replica set it moves to (empty otherwise).
    pub target_replicas: Vec<u64>,
}

/// A cluster's nodes and placement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterDescription {
    /// The cluster's id.
    pub cluster_id: String,
    /// The controller leader's node id, when known.
    pub controller: Option<u64>,
    /// The nodes, by id.
    pub nodes: Vec<ClusterNode>,
    /// Every partition, by topic and partition.
    pub partitions: Vec<PartitionPlacement>,
    /// The controller's voters.
    pub voters: Vec<u64>,
}

/// A partition move a rebalance or a node removal started (or plans).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionMove {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: u32,
    /// Its replica set before the move.
    pub from: Vec<u64>,
    /// The replica set it moves to.
    pub to: Vec<u64>,
}

impl PartitionMove {
    fn from_wire(m: v1::PartitionMove) -> PartitionMove {
        PartitionMove {
            topic: m.topic,
            partition: m.partition,
            from: m.from,
            to: m.to,
        }
    }
}

/// What a `remove_node` call did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRemoval {
    /// Moves off the node started or still running (call again once they are done).
    pub moves: Vec<PartitionMove>,
    /// The node left the cluster.
    pub removed: bool,
}

impl ClusterDescription {
    fn from_wire(response: v1::DescribeClusterResponse) -> ClusterDescription {
        let mut nodes: Vec<ClusterNode> = response
            .nodes
            .into_iter()
            .map(|n| ClusterNode {
                id: n.id,
                address: n.address,
                alive: n.alive,
                leaving: n.leaving,
            })
            .collect();
        nodes.sort_by_key(|n| n.id);
        let mut partitions: Vec<PartitionPlacement> = response
            .partitions
            .into_iter()
            .map(|p| PartitionPlacement {
                topic: p.topic,
                partition: p.partition,
                leader: p.leader,
                replicas: p.replicas,
                caught_up: p.caught_up,
                target_replicas: p.target_replicas,
            })
            .collect();
        partitions.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        ClusterDescription {
            cluster_id: response.cluster_id,
            controller: response.controller,
            nodes,
            partitions,
            voters: response.voters,
        }
    }
}

impl Client {
    /// The cluster as the broker sees it (any node answers; the client's view takes the answer
    /// too), with the caught-up replicas of replicated partitions as their leaders report them
    /// (the answering node asks them: this call is slower than the routing refresh).
    pub async fn describe_cluster(&self) -> Result<ClusterDescription> {
        let response = self
            .on_any(|mut grpc| async move {
                grpc.describe_cluster(v1::DescribeClusterRequest {
                    replication_status: true,
                })
                .await
            })
            .await?;
        self.router().apply(response.clone());
        Ok(ClusterDescription::from_wire(response))
    }

    /// Moves partition `partition` of `topic` to the replica set `replicas` (the preferred
    /// leader first); `throttle_bytes_per_sec`: what the leader may send the new replicas per
    /// second while they catch up (None: the broker's default, 50 MiB/s; 0: no limit).
    /// Returns whether a move started (false: it had that replica set). The move runs on;
    /// [`Client::describe_cluster`] shows it until done (`target_replicas`).
    pub async fn reassign_partition(
        &self,
        topic: &str,
        partition: u32,
        replicas: &[u64],
        throttle_bytes_per_sec: Option<u64>,
    ) -> Result<bool> {
        let request = v1::ReassignPartitionRequest {
            topic: topic.to_string(),
            partition,
            replicas: replicas.to_vec(),
            throttle_bytes_per_sec,
        };
        let response = self
            .on_any(move |mut grpc| {
                let request = request.clone();
                async move { grpc.reassign_partition(request).await }
            })
            .await?;
        Ok(response.started)
    }

    /// Spreads replicas and preferred leaders evenly over the live nodes: the moves started
    /// (`dry_run`: planned only).
    pub async fn rebalance(
        &self,
        throttle_bytes_per_sec: Option<u64>,
        dry_run: bool,
    ) -> Result<Vec<PartitionMove>> {
        let response = self
            .on_any(move |mut grpc| async move {
                grpc.rebalance(v1::RebalanceRequest {
                    throttle_bytes_per_sec,
                    dry_run,
                })
                .await
            })
            .await?;
        Ok(response
            .moves
            .into_iter()
            .map(PartitionMove::from_wire)
            .collect())
    }

    /// Adds node `node_id` at `address` to the cluster (it joins the controller as a learner).
    /// Returns the cluster's id.
    pub async fn add_node(&self, node_id: u64, address: &str) -> Result<String> {
        let address = address.to_string();
        let response = self
            .on_any(move |mut grpc| {
                let address = address.clone();
                async move {
                    grpc.add_node(v1::AddNodeRequest {
                        node_id,
                        address,
                        dir_id: String::new(),
                    })
                    .await
                }
            })
            .await?;
        Ok(response.cluster_id)
    }

    /// One step of removing node `node_id`: moves its replicas away (the moves started or
    /// still running); once none are left, removes it. `force`: shrink partitions the other
    /// nodes are too few to keep at their replication factor.
    pub async fn remove_node(
        &self,
        node_id: u64,
        force: bool,
        throttle_bytes_per_sec: Option<u64>,
    ) -> Result<NodeRemoval> {
        let response = self
            .on_any(move |mut grpc| async move {
                grpc.remove_node(v1::RemoveNodeRequest {
                    node_id,
                    force,
                    throttle_bytes_per_sec,
                })
                .await
            })
            .await?;
        Ok(NodeRemoval {
            moves: response
                .moves
                .into_iter()
                .map(PartitionMove::from_wire)
                .collect(),
            removed: response.removed,
        })
    }

    /// Sets the controller's voters (an odd number of live members); returns them.
    pub async fn set_voters(&self, voters: &[u64]) -> Result<Vec<u64>> {
        let voters = voters.to_vec();
        let response = self
            .on_any(move |mut grpc| {
                let voters = voters.clone();
                async move { grpc.set_voters(v1::SetVotersRequest { voters }).await }
            })
            .await?;
        Ok(response.voters)
    }
}
