//! The cluster as a broker describes it ([`Client::describe_cluster`]): nodes, the controller,
//! and each partition's leader, replicas and caught-up replicas.

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
            })
            .collect();
        partitions.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        ClusterDescription {
            cluster_id: response.cluster_id,
            controller: response.controller,
            nodes,
            partitions,
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
}
