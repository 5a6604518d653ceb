//! A node joining a running cluster (`--join HOST:PORT`), before its controller starts.
//!
//! - **First start** (the data directory belongs to no cluster): the node asks the node at
//!   `--join` to add it (`Broker.AddNode` with its id, advertised address and data directory
//!   id; any node hands the call to the controller leader, which adds it as a learner of the
//!   controller), then records the cluster's id and the list it was formed with in
//!   `node.toml` (`joined = true`). The leader starts sending it the metadata log at once;
//!   the calls it makes before this node serves are retried.
//! - **Later starts**: the data directory already belongs to a cluster; `--join` is then only
//!   checked: the node it names must answer with the same cluster id (refused otherwise), and
//!   is skipped with a warning when it does not answer (the node's membership is on disk).
//!
//! It may call `identity` and the Broker service of the node it joins through.

use std::time::Duration;

use syncline_proto::v1;
use syncline_proto::v1::broker_client::BrokerClient;

use super::identity::{self, Identity};
use crate::config::Config;
use crate::error::BrokerError;

/// How long a first start keeps asking to be added (an election may be running).
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a later start waits for the `--join` node's cluster id.
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

fn refuse(config: &Config, message: String) -> BrokerError {
    BrokerError::DataDirIdentity {
        dir: config.data_dir.clone(),
        message,
    }
}

async fn client(
    join: &str,
    config: &Config,
) -> Result<BrokerClient<tonic::transport::Channel>, String> {
    let endpoint = super::network::peer_endpoint(join, config.tls.as_ref())
        .map_err(|e| format!("--join {join}: {e}"))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(35));
    endpoint
        .connect()
        .await
        .map(BrokerClient::new)
        .map_err(|e| format!("cannot reach {join}: {e}"))
}

/// Returns this node's identity, joining through `join` on a first start (see the module
/// doc).
pub async fn join(config: &Config, join: &str, advertised: &str) -> Result<Identity, BrokerError> {
    let node = &config.node;
    let recorded = identity::recorded(&config.data_dir)?;
    let member = config
        .data_dir
        .join(super::controller::CONTROLLER_DIR)
        .exists();
    if let (Some(identity), true) = (&recorded, member) {
        if identity.node_id != node.id {
            return Err(refuse(
                config,
                format!(
                    "it belongs to node {} of cluster {}, but this broker was started as node \
                     {}: start it with --node-id {}, or give this node its own --data-dir",
                    identity.node_id, identity.cluster_id, node.id, identity.node_id
                ),
            ));
        }
        check_same_cluster(config, join, identity).await?;
        return Ok(identity.clone());
    }
    let dir_id = match &recorded {
        Some(identity) if !identity.dir_id.is_empty() => identity.dir_id.clone(),
        _ => identity::new_dir_id()?,
    };
    let deadline = tokio::time::Instant::now() + JOIN_TIMEOUT;
    let added = loop {
        let attempt = async {
            let mut client = client(join, config).await?;
            client
                .add_node(v1::AddNodeRequest {
                    node_id: node.id,
                    address: advertised.to_string(),
                    dir_id: dir_id.clone(),
                })
                .await
                .map(tonic::Response::into_inner)
                .map_err(|status| match status.code() {
                    tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => {
                        format!("retry: {}", status.message())
                    }
                    _ => format!("refused: {}", status.message()),
                })
        };
        match attempt.await {
            Ok(added) => break added,
            Err(message) if message.starts_with("refused: ") => {
                return Err(refuse(
                    config,
                    format!(
                        "the cluster at {join} refused to add node {}: {}",
                        node.id,
                        message.trim_start_matches("refused: ")
                    ),
                ))
            }
            Err(message) if tokio::time::Instant::now() >= deadline => {
                return Err(refuse(
                    config,
                    format!(
                    "could not join the cluster through {join} within {JOIN_TIMEOUT:?}: {message}"
                ),
                ))
            }
            Err(message) => {
                tracing::info!(%join, reason = %message, "joining: retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    tracing::info!(%join, cluster_id = %added.cluster_id, formed_by = %added.formed_by, "joined the cluster");
    identity::create_joined(
        &config.data_dir,
        node.id,
        &added.cluster_id,
        &added.formed_by,
        &dir_id,
    )
}

/// A later start with `--join`: the node named must be of the recorded cluster.
async fn check_same_cluster(
    config: &Config,
    join: &str,
    identity: &Identity,
) -> Result<(), BrokerError> {
    let answer = tokio::time::timeout(CHECK_TIMEOUT, async {
        let mut client = client(join, config).await?;
        client
            .describe_cluster(v1::DescribeClusterRequest::default())
            .await
            .map(|r| r.into_inner().cluster_id)
            .map_err(|status| status.message().to_string())
    })
    .await;
    match answer {
        Ok(Ok(cluster_id)) if cluster_id == identity.cluster_id => Ok(()),
        Ok(Ok(cluster_id)) => Err(refuse(
            config,
            format!(
                "it belongs to cluster {}, but --join {join} names a node of cluster \
                 {cluster_id}: give a node of its own cluster, or start it without --join",
                identity.cluster_id
            ),
        )),
        Ok(Err(reason)) => {
            tracing::warn!(%join, %reason, "--join: the node did not answer; starting as the member recorded");
            Ok(())
        }
        Err(_) => {
            tracing::warn!(%join, "--join: the node did not answer in time; starting as the member recorded");
            Ok(())
        }
    }
}
