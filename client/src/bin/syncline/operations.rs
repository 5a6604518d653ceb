//! Operating a cluster from the CLI: `topic reassign`, `cluster rebalance`, `cluster add-node`,
//! `cluster remove-node`, `cluster voters`.
//!
//! Output contracts (also in each command's help):
//! - Moves (`topic reassign`, `cluster rebalance`, `cluster remove-node`) wait until done,
//!   printing progress to stderr (`moving: N of M partitions done (S s)` every few seconds),
//!   then a summary line on stdout: `moved TOPIC/P to nodes 1,2,4 in S s`, `rebalanced: M
//!   partition(s) moved in S s` (or `balanced: nothing to move`), `removed node N (M
//!   partition(s) moved off it in S s)`. Ctrl-C stops the waiting, not the moves.
//! - `--json` (rebalance, remove-node): one JSON object per line on stdout instead: first
//!   `{"event": "started", "moves": [{"topic": "t", "partition": 0, "from": [1,2,3], "to":
//!   [1,2,4]}]}`, then `{"event": "progress", "done": N, "total": M, "elapsed_s": S}` every
//!   few seconds, last `{"event": "done", "moved": M, "elapsed_s": S}` (remove-node adds
//!   `"removed": true`).
//! - Exit status 0 once done; 1 on a refusal (`error: MESSAGE`), e.g. an unknown node, a
//!   replica set of the wrong size, the last replica of a partition.

use std::io::Write;
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::json;
use syncline_client::{Client, PartitionMove};

/// The help text of the commands that move partitions.
pub const MOVES_HELP: &str = "\
Moves: each partition's leader adds the new replicas as learners, waits until they caught up \
(at --throttle), then changes the group's membership; writes continue throughout. The command \
waits until every move is done, printing progress to stderr (`moving: N of M partition(s) done \
(S s)`), then one summary line on stdout. Ctrl-C stops the waiting, not the moves (`syncline \
cluster status` shows them: REPLICAS `1,2,3->1,2,4`). With --json: one JSON object per line on \
stdout: {\"event\": \"started\", \"moves\": [{\"topic\": \"t\", \"partition\": 0, \"from\": \
[1,2,3], \"to\": [1,2,4]}]}, then {\"event\": \"progress\", \"done\": N, \"total\": M, \
\"elapsed_s\": S} every 3 s, last {\"event\": \"done\", \"moved\": M, \"elapsed_s\": S} \
(remove-node adds \"removed\": true). Exit status 0 once done; 1 on a refusal (unknown node, \
too few nodes, the last replica of a partition).";

/// How often a waiting command looks at the cluster.
const POLL: Duration = Duration::from_millis(500);
/// How long a step refused as transient (a controller election) is retried.
const TRANSIENT_RETRY: Duration = Duration::from_secs(60);
/// How often progress is printed.
const PROGRESS_EVERY: Duration = Duration::from_secs(3);

/// `--throttle`, shared by the move commands.
#[derive(Debug, Args, Clone, Copy)]
pub struct ThrottleArgs {
    /// Bytes per second a partition's leader sends to its new replicas while they catch up,
    /// with a unit (50MiB) or in bytes; 0 for no limit [default: the broker's, 50MiB]
    #[arg(long, value_name = "BYTES", value_parser = syncline_proto::size::parse_size)]
    pub throttle: Option<u64>,
}

/// `syncline topic reassign`.
#[derive(Debug, Args)]
pub struct ReassignArgs {
    /// The topic.
    pub topic: String,
    /// The partition to move.
    #[arg(long, short)]
    pub partition: u32,
    /// The new replica set, comma-separated node ids, the preferred leader first; as many as
    /// the topic's replication factor.
    #[arg(long, value_name = "ID,ID,...", value_delimiter = ',', required = true)]
    pub replicas: Vec<u64>,
    #[command(flatten)]
    pub throttle: ThrottleArgs,
    /// Start the move and return without waiting for it.
    #[arg(long)]
    pub no_wait: bool,
}

fn move_json(m: &PartitionMove) -> serde_json::Value {
    json!({"topic": m.topic, "partition": m.partition, "from": m.from, "to": m.to})
}

fn print_line(line: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

/// Waits until none of `moves` is in progress (their partitions have no move target), with
/// progress.
async fn wait_moves(
    client: &Client,
    moves: &[PartitionMove],
    json: bool,
    started: Instant,
) -> anyhow::Result<()> {
    let total = moves.len();
    let mut last_report = Instant::now();
    loop {
        let cluster = client.describe_cluster().await?;
        let pending = moves
            .iter()
            .filter(|m| {
                cluster.partitions.iter().any(|p| {
                    p.topic == m.topic
                        && p.partition == m.partition
                        && (!p.target_replicas.is_empty() || !same_set(&p.replicas, &m.to))
                })
            })
            .count();
        if pending == 0 {
            return Ok(());
        }
        if last_report.elapsed() >= PROGRESS_EVERY {
            last_report = Instant::now();
            let elapsed = started.elapsed().as_secs_f64();
            if json {
                print_line(
                    &json!({"event": "progress", "done": total - pending, "total": total,
                        "elapsed_s": round1(elapsed)})
                    .to_string(),
                )?;
            } else {
                eprintln!(
                    "moving: {} of {total} partition(s) done ({elapsed:.0} s)",
                    total - pending
                );
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

fn same_set(a: &[u64], b: &[u64]) -> bool {
    let mut a = a.to_vec();
    let mut b = b.to_vec();
    a.sort_unstable();
    b.sort_unstable();
    a == b
}

fn round1(seconds: f64) -> f64 {
    (seconds * 10.0).round() / 10.0
}

fn nodes(ids: &[u64]) -> String {
    ids.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
}

/// `syncline topic reassign`.
pub async fn reassign(client: &Client, args: ReassignArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let moving = client
        .reassign_partition(
            &args.topic,
            args.partition,
            &args.replicas,
            args.throttle.throttle,
        )
        .await?;
    let target = format!("{}/{}", args.topic, args.partition);
    if !moving {
        return print_line(&format!(
            "{target} already has replicas {}: nothing to move",
            nodes(&args.replicas)
        ));
    }
    if args.no_wait {
        return print_line(&format!(
            "moving {target} to nodes {} (see `syncline cluster status`)",
            nodes(&args.replicas)
        ));
    }
    let planned = PartitionMove {
        topic: args.topic.clone(),
        partition: args.partition,
        from: Vec::new(),
        to: args.replicas.clone(),
    };
    wait_moves(client, &[planned], false, started).await?;
    print_line(&format!(
        "moved {target} to nodes {} in {:.1} s",
        nodes(&args.replicas),
        started.elapsed().as_secs_f64()
    ))
}

/// `syncline cluster rebalance`.
pub async fn rebalance(
    client: &Client,
    throttle: ThrottleArgs,
    dry_run: bool,
    json: bool,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let moves = client.rebalance(throttle.throttle, dry_run).await?;
    if json {
        print_line(
            &json!({"event": if dry_run { "planned" } else { "started" },
                "moves": moves.iter().map(move_json).collect::<Vec<_>>()})
            .to_string(),
        )?;
    } else if dry_run || !moves.is_empty() {
        for m in &moves {
            eprintln!(
                "{} {}/{}: {} -> {}",
                if dry_run { "would move" } else { "moving" },
                m.topic,
                m.partition,
                nodes(&m.from),
                nodes(&m.to)
            );
        }
    }
    if dry_run {
        if !json {
            print_line(&format!("planned: {} move(s)", moves.len()))?;
        }
        return Ok(());
    }
    wait_moves(client, &moves, json, started).await?;
    let elapsed = started.elapsed().as_secs_f64();
    if json {
        print_line(
            &json!({"event": "done", "moved": moves.len(), "elapsed_s": round1(elapsed)})
                .to_string(),
        )
    } else if moves.is_empty() {
        print_line("balanced: nothing to move")
    } else {
        print_line(&format!(
            "rebalanced: {} partition(s) moved in {elapsed:.1} s",
            moves.len()
        ))
    }
}

/// `syncline cluster remove-node`.
/// Whether `node` is still a member of the cluster (true when that cannot be told).
async fn is_member(client: &Client, node: u64) -> bool {
    match client.describe_cluster().await {
        Ok(cluster) => cluster.nodes.iter().any(|n| n.id == node),
        Err(_) => true,
    }
}

pub async fn remove_node(
    client: &Client,
    node: u64,
    force: bool,
    throttle: ThrottleArgs,
    json: bool,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut all: Vec<PartitionMove> = Vec::new();
    let mut announced = false;
    let mut transient_since: Option<Instant> = None;
    loop {
        let step = match client.remove_node(node, force, throttle.throttle).await {
            Ok(step) => {
                transient_since = None;
                step
            }
            // A leader change (the removed node may have led the controller): retry a while.
            Err(error)
                if error.is_transient()
                    && transient_since.get_or_insert_with(Instant::now).elapsed()
                        < TRANSIENT_RETRY =>
            {
                tracing::debug!(%error, "remove-node: retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            // An earlier call was accepted and the node is gone: the removal went through, and
            // this answer is to a retry whose first attempt's reply was lost (say, a leader
            // change right after the removal committed).
            Err(error) if announced && !is_member(client, node).await => {
                tracing::debug!(%error, "remove-node: the node is no longer a member");
                break;
            }
            Err(error) => return Err(error.into()),
        };
        for m in &step.moves {
            if !all
                .iter()
                .any(|k| k.topic == m.topic && k.partition == m.partition)
            {
                all.push(m.clone());
            }
        }
        if !announced {
            announced = true;
            if json {
                print_line(
                    &json!({"event": "started",
                        "moves": step.moves.iter().map(move_json).collect::<Vec<_>>()})
                    .to_string(),
                )?;
            } else {
                for m in &step.moves {
                    eprintln!(
                        "moving {}/{}: {} -> {}",
                        m.topic,
                        m.partition,
                        nodes(&m.from),
                        nodes(&m.to)
                    );
                }
            }
        }
        if step.removed {
            break;
        }
        let waiting: Vec<PartitionMove> = step
            .moves
            .into_iter()
            .filter(|m| !m.to.is_empty())
            .collect();
        wait_moves(client, &waiting, json, started).await?;
        tokio::time::sleep(POLL).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    if json {
        print_line(
            &json!({"event": "done", "moved": all.len(), "elapsed_s": round1(elapsed),
                "removed": true})
            .to_string(),
        )
    } else {
        print_line(&format!(
            "removed node {node} ({} partition(s) moved off it in {elapsed:.1} s)",
            all.len()
        ))
    }
}

/// `syncline cluster add-node`.
pub async fn add_node(client: &Client, node: u64, address: &str) -> anyhow::Result<()> {
    let cluster_id = client.add_node(node, address).await?;
    print_line(&format!(
        "added node {node} at {address} to cluster {cluster_id}: start it with --node-id {node} \
         --advertise {address} --join <any node> (then `syncline cluster rebalance` gives it its \
         share)"
    ))
}

/// `syncline cluster voters`.
pub async fn voters(client: &Client, set: Vec<u64>) -> anyhow::Result<()> {
    let voters = if set.is_empty() {
        client.describe_cluster().await?.voters
    } else {
        client.set_voters(&set).await?
    };
    print_line(&format!("voters: {}", nodes(&voters)))
}
