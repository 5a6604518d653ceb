//! The connector runtime: runs every source and sink of a file as tasks of one process, restarts
//! a failed connector with backoff, publishes statuses, serves metrics, and stops cleanly.
//!
//! It is a client of the cluster and owns no broker state: source positions live in the
//! compacted positions topic, sink progress in consumer groups (or, for the PostgreSQL sink,
//! in the target database), statuses in the status topic. Any number of `connect` processes
//! may run the same file: sinks share their work through their consumer group; a source is
//! one replication slot, which PostgreSQL lets one process stream at a time, so a second
//! process's copy of a source waits (retrying) until the first stops.
//!
//! May call: the client crate, the source and sink modules. Called by: `main`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use syncline_client::{
    CleanupPolicy, Client, ConsumerConfig, OffsetQuery, StartOffset, TopicConfig,
};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, RuntimeConfig, SinkKind, SourceKind};
use crate::envelope::{Position, POSITION_HEADER};
use crate::status::{self, Status, StatusReport};

/// What a connector's task gets.
#[derive(Clone)]
pub struct Context {
    pub client: Client,
    pub runtime: RuntimeConfig,
    pub status: Arc<Status>,
    pub cancel: CancellationToken,
    /// `host:pid`.
    pub worker: String,
}

/// First wait before a failed connector is started again; doubled up to [`BACKOFF_MAX`].
const BACKOFF_START: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A connector that ran this long before failing starts again at [`BACKOFF_START`].
const HEALTHY_AFTER: Duration = Duration::from_secs(60);

/// Runs every connector until `cancel` fires; then stops them and publishes `stopped`.
pub async fn run(config: Config, client: Client, cancel: CancellationToken) -> anyhow::Result<()> {
    let worker = worker_name();
    ensure_topic(&client, &config.connect.positions_topic, Some(1), true).await?;
    ensure_topic(&client, &config.connect.status_topic, Some(1), true).await?;

    let mut statuses = Vec::new();
    let mut tasks = tokio::task::JoinSet::new();
    for source in &config.source {
        let status = Status::new(&source.name, "source", "postgres", "bytes");
        statuses.push(status.clone());
        let ctx = Context {
            client: client.clone(),
            runtime: config.connect.clone(),
            status,
            cancel: cancel.child_token(),
            worker: worker.clone(),
        };
        let source = source.clone();
        tasks.spawn(supervise(ctx, move |ctx| {
            let source = source.clone();
            async move {
                match source.kind {
                    SourceKind::Postgres => crate::source::postgres::run(&source, &ctx).await,
                }
            }
        }));
    }
    for sink in &config.sink {
        let connector_type = match sink.kind {
            SinkKind::Postgres => "postgres",
            SinkKind::Redis => "redis",
            SinkKind::Http => "http",
        };
        let status = Status::new(&sink.name, "sink", connector_type, "records");
        statuses.push(status.clone());
        let ctx = Context {
            client: client.clone(),
            runtime: config.connect.clone(),
            status,
            cancel: cancel.child_token(),
            worker: worker.clone(),
        };
        let sink = sink.clone();
        tasks.spawn(supervise(ctx, move |ctx| {
            let sink = sink.clone();
            async move { crate::sink::run(&sink, &ctx).await }
        }));
    }

    if let Some(listen) = &config.connect.metrics_listen {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("[connect] metrics_listen {listen}"))?;
        tracing::info!(address = %listener.local_addr()?, "metrics on /metrics");
        let statuses = statuses.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let app = axum::Router::new().route(
                "/metrics",
                axum::routing::get(move || {
                    let text = status::metrics_text(&statuses);
                    async move {
                        (
                            [(
                                axum::http::header::CONTENT_TYPE,
                                "text/plain; version=0.0.4",
                            )],
                            text,
                        )
                    }
                }),
            );
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(cancel.cancelled_owned())
                .await;
        });
    }

    let status_table = client.table(&config.connect.status_topic).await?;
    // Statuses are written concurrently and given up after a while: a broker that is down
    // must neither stall the runtime nor hold up its exit.
    let publish = |final_state: bool| {
        let statuses = statuses.clone();
        let status_table = &status_table;
        let worker = worker.clone();
        async move {
            let writes = statuses.iter().filter_map(|status| {
                if final_state {
                    status.set_state("stopped");
                }
                let report = status.report(&worker);
                let key = format!("{}@{}", report.connector, worker);
                let value = serde_json::to_vec(&report).ok()?;
                Some(async move {
                    if let Err(e) = status_table.put(key.as_bytes(), value).await {
                        tracing::debug!(error = %e, "publishing a status");
                    }
                })
            });
            let deadline = if final_state {
                PUBLISH_FINAL_TIMEOUT
            } else {
                status::PUBLISH_INTERVAL * 2
            };
            if tokio::time::timeout(deadline, futures::future::join_all(writes))
                .await
                .is_err()
            {
                tracing::debug!("publishing statuses timed out");
            }
        }
    };
    let mut interval = tokio::time::interval(status::PUBLISH_INTERVAL);
    loop {
        tokio::select! {
            _ = interval.tick() => publish(false).await,
            _ = cancel.cancelled() => break,
            Some(joined) = tasks.join_next() => {
                if let Err(e) = joined {
                    tracing::error!(error = %e, "a connector task panicked");
                }
            }
        }
    }
    while tasks.join_next().await.is_some() {}
    publish(true).await;
    Ok(())
}

/// How long the last status publication may take at exit.
const PUBLISH_FINAL_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a connector may take to stop once cancelled (a sink leaves its group, a source
/// flushes its producers) before it is dropped.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Runs a connector again and again until cancelled, with backoff after failures. A cancelled
/// connector sees the cancellation itself and stops cleanly, within [`STOP_GRACE`].
async fn supervise<F, Fut>(ctx: Context, run: F)
where
    F: Fn(Context) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut backoff = BACKOFF_START;
    loop {
        let started = tokio::time::Instant::now();
        let attempt = ctx.clone();
        let grace = async {
            ctx.cancel.cancelled().await;
            tokio::time::sleep(STOP_GRACE).await;
        };
        let result = tokio::select! {
            result = run(attempt) => result,
            () = grace => Ok(()),
        };
        if ctx.cancel.is_cancelled() {
            ctx.status.set_state("stopped");
            return;
        }
        let message = match result {
            Ok(()) => "stopped unexpectedly".to_owned(),
            Err(e) => format!("{e:#}"),
        };
        tracing::error!(connector = %ctx.status.connector, error = %message, retry_in_ms = backoff.as_millis() as u64, "connector failed");
        ctx.status.fail(&message);
        if started.elapsed() >= HEALTHY_AFTER {
            backoff = BACKOFF_START;
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = ctx.cancel.cancelled() => {
                ctx.status.set_state("stopped");
                return;
            }
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// The topic's partition count, creating it (compacted if `compact`) when missing.
pub async fn ensure_topic(
    client: &Client,
    topic: &str,
    partitions: Option<u32>,
    compact: bool,
) -> anyhow::Result<u32> {
    if let Ok(description) = client.describe_topic(topic).await {
        return Ok(description.partition_count());
    }
    let config = TopicConfig {
        partitions,
        cleanup_policy: if compact {
            CleanupPolicy::Compact
        } else {
            CleanupPolicy::default()
        },
        ..TopicConfig::default()
    };
    match client.create_topic(topic, config).await {
        Ok(description) => Ok(description.partition_count()),
        Err(create_error) => client
            .describe_topic(topic)
            .await
            .map(|d| d.partition_count())
            .map_err(|_| anyhow!("creating topic {topic}: {create_error}")),
    }
}

/// Per partition of `topic`, the position header of its last record (`Position::default()` for
/// an empty partition or a last record without one).
pub async fn read_tail_positions(
    client: &Client,
    topic: &str,
    partitions: u32,
) -> anyhow::Result<HashMap<u32, Position>> {
    let mut tails = HashMap::new();
    for partition in 0..partitions {
        let end = client
            .list_offsets(topic, partition, OffsetQuery::Latest)
            .await?
            .offset;
        let start = client
            .list_offsets(topic, partition, OffsetQuery::Earliest)
            .await?
            .offset;
        if end <= start {
            continue;
        }
        let config = ConsumerConfig {
            partitions: Some(vec![partition]),
            start: StartOffset::Offset(end - 1),
            ..ConsumerConfig::default()
        };
        let mut consumer = client.consumer(topic, config).await?;
        let record = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .map_err(|_| anyhow!("reading the last record of {topic}/{partition}: timed out"))?
            .ok_or_else(|| {
                anyhow!("reading the last record of {topic}/{partition}: no record")
            })??;
        let position = record
            .headers
            .iter()
            .find(|h| h.key == POSITION_HEADER)
            .and_then(|h| Position::from_header(&h.value))
            .unwrap_or_default();
        tails.insert(partition, position);
    }
    Ok(tails)
}

/// Reads every status entry of the status topic (latest per key).
pub async fn read_statuses(client: &Client, topic: &str) -> anyhow::Result<Vec<StatusReport>> {
    let table = client
        .sync_table(topic)
        .await
        .with_context(|| format!("reading status topic {topic}"))?;
    table.wait_caught_up().await?;
    let mut reports: Vec<StatusReport> = table
        .entries()
        .into_values()
        .filter_map(|entry| serde_json::from_slice(&entry.value).ok())
        .collect();
    table.close();
    reports.sort_by(|a, b| (&a.connector, &a.worker).cmp(&(&b.connector, &b.worker)));
    Ok(reports)
}

fn worker_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".to_owned());
    format!("{host}:{}", std::process::id())
}
