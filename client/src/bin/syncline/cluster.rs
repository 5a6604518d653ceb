//! `syncline cluster status [--json]`: the cluster as the broker describes it.
//!
//! Output contracts (also in the command's help):
//! - `--json`: exactly one JSON object on stdout: `{"cluster_id": "...", "controller": 1,
//!   "nodes": [{"id": 1, "address": "127.0.0.1:7450", "alive": true}, ...], "partitions":
//!   [{"topic": "t", "partition": 0, "leader": 1, "replicas": [1], "caught_up": [1]}, ...]}`;
//!   `controller` and `leader` are null when unknown; internal topics are included.
//! - Otherwise: the lines `cluster: ID` and `controller: N` (`-` when unknown), a blank line,
//!   the table `NODE ADDRESS ALIVE`, a blank line, the table `TOPIC PARTITION LEADER REPLICAS
//!   CAUGHT-UP` (node lists comma-separated, `-` when empty or unknown).
//!
//! While a partition moves, its JSON object also has `"moving_to": [ids]` and its REPLICAS
//! cell reads `1,2,3->1,2,4`. While a node is being removed, its JSON object also has
//! `"leaving": true` and its ALIVE cell reads `yes (leaving)`.
//!
//! The operations (`rebalance`, `add-node`, `remove-node`, `voters`) live in
//! `crate::operations`.
//!
//! CAUGHT-UP / `caught_up`: the replicas holding every committed record. For a replicated
//! partition that is what its leader reports: itself and the followers that matched its
//! commit index and acknowledged it within two election timeouts; empty when the leader could
//! not be asked (down, unknown, no answer within a second).

use std::io::{self, Write};

use clap::Subcommand;
use serde_json::json;
use syncline_client::{Client, ClusterDescription};

use crate::output::table;

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Show the cluster: its id, the controller, the nodes, and where every partition lives.
    #[command(after_help = "\
Output: the lines `cluster: ID` and `controller: N` (`-` when unknown), a blank line, the table \
NODE ADDRESS ALIVE, a blank line, and the table TOPIC PARTITION LEADER REPLICAS CAUGHT-UP (internal \
topics included). CAUGHT-UP: the replicas holding every committed record, as the partition's \
leader reports them (`-` when its leader could not be asked). With --json, exactly one JSON \
object: {\"cluster_id\": \"...\", \"controller\": 1, \"nodes\": [{\"id\": 1, \"address\": \
\"HOST:PORT\", \"alive\": true}], \"partitions\": [{\"topic\": \"t\", \"partition\": 0, \"leader\": 1, \"replicas\": [1], \"caught_up\": [1]}]} \
(controller and leader are null when unknown).")]
    Status {
        /// Print one JSON object instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Spread replicas and preferred leaders evenly over the live nodes (after a node joins),
    /// moving partitions one replica at a time, and wait until the moves are done.
    #[command(after_help = crate::operations::MOVES_HELP)]
    Rebalance {
        #[command(flatten)]
        throttle: crate::operations::ThrottleArgs,
        /// Print the moves a rebalance would make, and start none.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON lines (started, progress, done) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Add a node to the cluster: it follows the controller as a learner and takes replicas
    /// from then on. A node started with --join adds itself; this is the admin's form.
    AddNode {
        /// The new node's id (an id no node of the cluster has).
        id: u64,
        /// The new node's advertised HOST:PORT.
        address: String,
    },
    /// Remove a node for good: move its replicas to the other nodes first (refused when they
    /// are too few to keep every partition at its replication factor, unless --force), then
    /// take it out of the cluster; it stops.
    #[command(after_help = crate::operations::MOVES_HELP)]
    RemoveNode {
        /// The node's id.
        id: u64,
        /// Remove it even when the other nodes are too few: such partitions shrink to fewer
        /// replicas than their replication factor (never to none); and a controller voter no
        /// other node can replace leaves an even number of voters.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        throttle: crate::operations::ThrottleArgs,
        /// Print JSON lines (started, progress, done) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print the controller's voters, or set them: an odd number (at most 9) of live nodes;
    /// the nodes left out stay members and follow as learners.
    Voters {
        /// The new voters, comma-separated node ids (none: print them).
        #[arg(value_delimiter = ',', value_name = "ID,ID,...")]
        voters: Vec<u64>,
    },
}

pub async fn run(client: &Client, command: ClusterCommand) -> anyhow::Result<()> {
    match command {
        ClusterCommand::Status { json } => {
            let cluster = client.describe_cluster().await?;
            let text = if json {
                format!("{}\n", status_json(&cluster))
            } else {
                status_text(&cluster)
            };
            let mut out = io::stdout().lock();
            out.write_all(text.as_bytes())?;
            out.flush()?;
            Ok(())
        }
        ClusterCommand::Rebalance {
            throttle,
            dry_run,
            json,
        } => crate::operations::rebalance(client, throttle, dry_run, json).await,
        ClusterCommand::AddNode { id, address } => {
            crate::operations::add_node(client, id, &address).await
        }
        ClusterCommand::RemoveNode {
            id,
            force,
            throttle,
            json,
        } => crate::operations::remove_node(client, id, force, throttle, json).await,
        ClusterCommand::Voters { voters } => crate::operations::voters(client, voters).await,
    }
}

/// The `--json` object.
pub fn status_json(cluster: &ClusterDescription) -> serde_json::Value {
    json!({
        "cluster_id": cluster.cluster_id,
        "controller": cluster.controller,
        "nodes": cluster.nodes.iter().map(|n| {
            let mut node = json!({
                "id": n.id,
                "address": n.address,
                "alive": n.alive,
            });
            if n.leaving {
                node["leaving"] = json!(true);
            }
            node
        }).collect::<Vec<_>>(),
        "partitions": cluster.partitions.iter().map(|p| {
            let mut placement = json!({
                "topic": p.topic,
                "partition": p.partition,
                "leader": p.leader,
                "replicas": p.replicas,
                "caught_up": p.caught_up,
            });
            if !p.target_replicas.is_empty() {
                placement["moving_to"] = json!(p.target_replicas);
            }
            placement
        }).collect::<Vec<_>>(),
    })
}

fn nodes(ids: &[u64]) -> String {
    if ids.is_empty() {
        return "-".into();
    }
    ids.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
}

fn or_dash(id: Option<u64>) -> String {
    id.map_or_else(|| "-".into(), |id| id.to_string())
}

/// The human form: header lines and two aligned tables.
pub fn status_text(cluster: &ClusterDescription) -> String {
    let mut node_rows = vec![vec!["NODE".into(), "ADDRESS".into(), "ALIVE".into()]];
    for node in &cluster.nodes {
        node_rows.push(vec![
            node.id.to_string(),
            node.address.clone(),
            match (node.alive, node.leaving) {
                (true, false) => "yes",
                (true, true) => "yes (leaving)",
                (false, false) => "no",
                (false, true) => "no (leaving)",
            }
            .into(),
        ]);
    }
    let mut partition_rows = vec![vec![
        "TOPIC".into(),
        "PARTITION".into(),
        "LEADER".into(),
        "REPLICAS".into(),
        "CAUGHT-UP".into(),
    ]];
    for p in &cluster.partitions {
        partition_rows.push(vec![
            p.topic.clone(),
            p.partition.to_string(),
            or_dash(p.leader),
            if p.target_replicas.is_empty() {
                nodes(&p.replicas)
            } else {
                format!("{}->{}", nodes(&p.replicas), nodes(&p.target_replicas))
            },
            nodes(&p.caught_up),
        ]);
    }
    format!(
        "cluster: {}\ncontroller: {}\n\n{}\n{}",
        cluster.cluster_id,
        or_dash(cluster.controller),
        table(&node_rows),
        table(&partition_rows)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use syncline_client::{ClusterNode, PartitionPlacement};

    fn sample() -> ClusterDescription {
        ClusterDescription {
            voters: vec![1],
            cluster_id: "c".into(),
            controller: None,
            nodes: vec![ClusterNode {
                id: 1,
                address: "127.0.0.1:7450".into(),
                alive: true,
                leaving: false,
            }],
            partitions: vec![PartitionPlacement {
                target_replicas: Vec::new(),
                topic: "t".into(),
                partition: 0,
                leader: None,
                replicas: vec![1],
                caught_up: vec![],
            }],
        }
    }

    #[test]
    fn given_unknown_controller_and_leader_should_print_null_and_dash() {
        let json = status_json(&sample());
        assert_eq!(
            json,
            serde_json::json!({
                "cluster_id": "c",
                "controller": null,
                "nodes": [{"id": 1, "address": "127.0.0.1:7450", "alive": true}],
                "partitions": [{"topic": "t", "partition": 0, "leader": null, "replicas": [1], "caught_up": []}],
            })
        );
        let text = status_text(&sample());
        assert!(
            text.starts_with("cluster: c\ncontroller: -\n\nNODE"),
            "{text}"
        );
        assert!(
            text.contains("t      0          -       1         -"),
            "{text}"
        );
    }
}
