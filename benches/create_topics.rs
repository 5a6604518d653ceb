//! Topic creation time for `benches/cluster.sh`: one client connection creates N topics of P
//! partitions one after the other (each `CreateTopic` awaited before the next), so the figure is
//! the broker's (or the cluster's: controller commit and placement) and not the start of a CLI
//! process per topic, which costs 3-5 ms here against 5-20 ms per create on a single node (see
//! `create()` in benches/cluster.sh). The topics are deleted afterwards (untimed) unless
//! `--keep`. A create that fails transiently (the controller unreachable or busy, a leader
//! change) is retried after a pause, for at most [`RETRY_FOR`] per topic, and a retry that
//! finds the topic already there counts as created (the failed attempt may have committed);
//! `retries` in the report counts them. `benches/replication.sh` also creates its idle part's 1,000 replicated partitions
//! with it (`--replication-factor 3`).
//!
//! Run: `cargo run --release --example create_topics -- --broker ADDR[,ADDR...] --topics N
//! --partitions P --prefix NAME [--replication-factor R] [--keep]` (without
//! `--replication-factor`: the broker's default). Prints one JSON line on stdout: `{"topics",
//! "partitions", "secs", "ms_per_topic", "p50_ms", "p99_ms", "max_ms", "retries"}` (a topic's
//! time includes its retries); exits 1 when a create fails for good.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use syncline_client::{Client, Code, TopicConfig};

/// How long one topic's create is retried after transient failures. A controller that is busy
/// (hundreds of replicated partitions heartbeating on one shared 2-core machine) can lose its
/// leader and take many seconds to elect one and apply its log again (seen in
/// `benches/replication.sh`: 15 s and more); a minute without success means it is not coming
/// back.
const RETRY_FOR: Duration = Duration::from_secs(60);
/// Pause before a retry: a controller election takes 1-2 s.
const RETRY_PAUSE: Duration = Duration::from_millis(500);

struct Args {
    broker: String,
    topics: u32,
    partitions: u32,
    prefix: String,
    replication_factor: Option<u32>,
    keep: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let usage = "usage: create_topics --broker ADDR[,ADDR...] --topics N --partitions P \
                 --prefix NAME [--replication-factor R] [--keep]";
    let mut args = Args {
        broker: String::new(),
        topics: 100,
        partitions: 8,
        prefix: "create-bench".to_string(),
        replication_factor: None,
        keep: false,
    };
    let mut given = std::env::args().skip(1);
    while let Some(flag) = given.next() {
        if flag == "--keep" {
            args.keep = true;
            continue;
        }
        let value = given
            .next()
            .with_context(|| format!("{flag} needs a value; {usage}"))?;
        match flag.as_str() {
            "--broker" => args.broker = value,
            "--topics" => args.topics = value.parse().context(usage)?,
            "--partitions" => args.partitions = value.parse().context(usage)?,
            "--prefix" => args.prefix = value,
            "--replication-factor" => {
                args.replication_factor = Some(value.parse().context(usage)?);
            }
            _ => bail!("unknown flag {flag}; {usage}"),
        }
    }
    if args.broker.is_empty() {
        bail!("--broker is required; {usage}");
    }
    Ok(args)
}

/// The `q` quantile of sorted `values`.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let index = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len().max(1)) - 1;
    sorted.get(index).copied().unwrap_or(0.0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let client = Client::connect(&args.broker).await?;
    let names: Vec<String> = (1..=args.topics)
        .map(|n| format!("{}-{n}", args.prefix))
        .collect();
    let mut each_ms = Vec::with_capacity(names.len());
    let started = Instant::now();
    let mut retries = 0u32;
    for name in &names {
        let one = Instant::now();
        let config = TopicConfig {
            replication_factor: args.replication_factor,
            ..TopicConfig::with_partitions(args.partitions)
        };
        let mut retried = false;
        loop {
            match client.create_topic(name, config.clone()).await {
                Ok(_) => break,
                Err(error) if retried && error.code() == Some(Code::AlreadyExists) => break,
                Err(error) if one.elapsed() < RETRY_FOR && error.is_transient() => {
                    eprintln!("create topic {name}: {error}; retrying");
                    retried = true;
                    retries += 1;
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                Err(error) => {
                    return Err(error).with_context(|| format!("create topic {name}"));
                }
            }
        }
        each_ms.push(one.elapsed().as_secs_f64() * 1e3);
    }
    let secs = started.elapsed().as_secs_f64();
    if !args.keep {
        for name in &names {
            client
                .delete_topic(name)
                .await
                .with_context(|| format!("delete topic {name}"))?;
        }
    }
    each_ms.sort_by(f64::total_cmp);
    let report = serde_json::json!({
        "topics": args.topics,
        "partitions": args.partitions,
        "secs": secs,
        "ms_per_topic": secs * 1e3 / f64::from(args.topics.max(1)),
        "p50_ms": quantile(&each_ms, 0.5),
        "p99_ms": quantile(&each_ms, 0.99),
        "max_ms": each_ms.last().copied().unwrap_or(0.0),
        "retries": retries,
    });
    println!("{report}");
    Ok(())
}
