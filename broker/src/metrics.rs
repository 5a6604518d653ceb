//! Prometheus metrics: the names, the recorder, and the `/metrics` HTTP endpoint.
//!
//! Layers record through the `metrics` facade (a no-op until [`install`] runs), so the log and
//! the service need no handle plumbing. Per-partition gauges are read from the topic registry
//! at scrape time, so a deleted topic's series disappear with it.
//!
//! | name | type | labels | meaning |
//! |---|---|---|---|
//! | `syncline_requests_total` | counter | rpc, code | gRPC requests (ProduceStream: per message) by status code |
//! | `syncline_request_duration_seconds` | histogram | rpc | time to answer (produce: until the ack) |
//! | `syncline_produce_bytes_total` | counter | | batch bytes accepted by produce |
//! | `syncline_fetch_bytes_total` | counter | | batch bytes returned by fetch and subscribe |
//! | `syncline_records_appended_total` | counter | | records appended to logs |
//! | `syncline_batches_appended_total` | counter | | batches appended to logs |
//! | `syncline_fsync_duration_seconds` | histogram | | one group-commit fsync |
//! | `syncline_group_commit_batches` | histogram | | batches made durable by one fsync |
//! | `syncline_connections` | gauge | | open client connections |
//! | `syncline_connections_accepted_total` | counter | | accepted connections |
//! | `syncline_connections_refused_total` | counter | | connections closed at once: `max_connections` reached |
//! | `syncline_response_bytes_in_flight` | gauge | | response bytes produced but not yet sent (the `response_bytes_max` budget in use) |
//! | `syncline_response_budget_waits_total` | counter | | response messages that waited for the response-bytes budget |
//! | `syncline_partition_log_start_offset` | gauge | topic, partition | first retained offset |
//! | `syncline_partition_log_end_offset` | gauge | topic, partition | next offset to assign |
//! | `syncline_partition_durable_offset` | gauge | topic, partition | fsync'd and visible |
//! | `syncline_partition_durable_lag_records` | gauge | topic, partition | end - durable |
//! | `syncline_partition_size_bytes` | gauge | topic, partition | bytes in segments |
//! | `syncline_partition_segments` | gauge | topic, partition | segment files |
//! | `syncline_partition_fenced` | gauge | topic, partition | 1 when the partition is fenced |
//! | `syncline_preallocated_bytes` | gauge | | segment space reserved ahead of written data, all partitions (capped by `--preallocate-bytes-max`) |
//!
//! Consumer-group lag joins this table with consumer groups.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

use crate::topic::Registry;

/// gRPC requests by rpc and code.
pub const REQUESTS_TOTAL: &str = "syncline_requests_total";
/// Request latency by rpc.
pub const REQUEST_DURATION_SECONDS: &str = "syncline_request_duration_seconds";
/// Produced batch bytes.
pub const PRODUCE_BYTES_TOTAL: &str = "syncline_produce_bytes_total";
/// Fetched batch bytes.
pub const FETCH_BYTES_TOTAL: &str = "syncline_fetch_bytes_total";
/// Records appended.
pub const RECORDS_APPENDED_TOTAL: &str = "syncline_records_appended_total";
/// Batches appended.
pub const BATCHES_APPENDED_TOTAL: &str = "syncline_batches_appended_total";
/// fsync latency.
pub const FSYNC_DURATION_SECONDS: &str = "syncline_fsync_duration_seconds";
/// Batches per group commit.
pub const GROUP_COMMIT_BATCHES: &str = "syncline_group_commit_batches";
/// Open connections.
pub const CONNECTIONS: &str = "syncline_connections";
/// Accepted connections.
pub const CONNECTIONS_ACCEPTED_TOTAL: &str = "syncline_connections_accepted_total";
/// Counter: connections closed at once because `max_connections` were open.
pub const CONNECTIONS_REFUSED_TOTAL: &str = "syncline_connections_refused_total";
/// Gauge: response bytes produced but not yet sent (see `server::budget`).
pub const RESPONSE_BYTES_IN_FLIGHT: &str = "syncline_response_bytes_in_flight";
/// Counter: response messages that waited for the response-bytes budget.
pub const RESPONSE_BUDGET_WAITS_TOTAL: &str = "syncline_response_budget_waits_total";
/// Counter: offsets committed by consumer groups.
pub const OFFSET_COMMITS_TOTAL: &str = "syncline_offset_commits_total";
/// Counter: group members removed because their session expired.
pub const GROUP_SESSIONS_EXPIRED_TOTAL: &str = "syncline_group_sessions_expired_total";
/// Gauge: segment space reserved ahead of written data across all partitions.
pub const PREALLOCATED_BYTES: &str = "syncline_preallocated_bytes";
/// Counter: compaction passes committed.
pub const COMPACTION_RUNS_TOTAL: &str = "syncline_compaction_runs_total";
/// Counter: bytes of segments compaction read and rewrote.
pub const COMPACTION_BYTES_READ_TOTAL: &str = "syncline_compaction_bytes_read_total";
/// Counter: bytes compaction removed.
pub const COMPACTION_BYTES_RECLAIMED_TOTAL: &str = "syncline_compaction_bytes_reclaimed_total";

/// Latency buckets in seconds: 50 us .. 10 s (fsyncs here take ~0.2 ms, long polls up to 30 s).
const SECONDS_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0,
];
/// Group-commit sizes: 1 .. 4096 batches per fsync.
const BATCH_COUNT_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0, 4096.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (once; later calls return the same handle).
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets(SECONDS_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        metrics_exporter_prometheus::Matcher::Full(GROUP_COMMIT_BATCHES.into()),
                        BATCH_COUNT_BUCKETS,
                    )
                });
            let recorder = match builder {
                Ok(builder) => builder.build_recorder(),
                Err(error) => {
                    tracing::warn!(%error, "metric buckets rejected; using summaries");
                    PrometheusBuilder::new().build_recorder()
                }
            };
            let handle = recorder.handle();
            if let Err(error) = metrics::set_global_recorder(recorder) {
                tracing::warn!(%error, "a metrics recorder was already installed");
            }
            describe();
            handle
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        REQUESTS_TOTAL,
        "gRPC requests by rpc and status code (ProduceStream counts each message)"
    );
    describe_histogram!(
        REQUEST_DURATION_SECONDS,
        Unit::Seconds,
        "Time to answer a request; produce includes waiting for the ack"
    );
    describe_counter!(
        PRODUCE_BYTES_TOTAL,
        Unit::Bytes,
        "Record batch bytes accepted by produce"
    );
    describe_counter!(
        FETCH_BYTES_TOTAL,
        Unit::Bytes,
        "Record batch bytes returned by fetch and subscribe"
    );
    describe_counter!(RECORDS_APPENDED_TOTAL, "Records appended to partition logs");
    describe_counter!(
        BATCHES_APPENDED_TOTAL,
        "Record batches appended to partition logs"
    );
    describe_histogram!(
        FSYNC_DURATION_SECONDS,
        Unit::Seconds,
        "Duration of one group-commit fsync"
    );
    describe_histogram!(
        GROUP_COMMIT_BATCHES,
        "Batches made durable by one group-commit fsync"
    );
    describe_gauge!(CONNECTIONS, "Open client connections");
    describe_counter!(CONNECTIONS_ACCEPTED_TOTAL, "Accepted client connections");
    describe_counter!(
        CONNECTIONS_REFUSED_TOTAL,
        "Connections closed at once because max_connections were open"
    );
    describe_gauge!(
        RESPONSE_BYTES_IN_FLIGHT,
        Unit::Bytes,
        "Response bytes produced but not yet sent (the response_bytes_max budget in use)"
    );
    describe_counter!(
        RESPONSE_BUDGET_WAITS_TOTAL,
        "Response messages that waited for the response-bytes budget"
    );
    describe_counter!(COMPACTION_RUNS_TOTAL, "Compaction passes committed");
    describe_counter!(
        OFFSET_COMMITS_TOTAL,
        "Partition offsets committed by consumer groups"
    );
    describe_counter!(
        GROUP_SESSIONS_EXPIRED_TOTAL,
        "Consumer group members removed because their session expired"
    );
    describe_counter!(
        COMPACTION_BYTES_READ_TOTAL,
        Unit::Bytes,
        "Bytes of segments read and rewritten by compaction"
    );
    describe_counter!(
        COMPACTION_BYTES_RECLAIMED_TOTAL,
        Unit::Bytes,
        "Bytes removed from table logs by compaction"
    );
}

/// The text of the status code, as a label value.
pub fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Records one request's outcome and latency.
pub fn observe_request(rpc: &'static str, started: Instant, code: tonic::Code) {
    metrics::counter!(REQUESTS_TOTAL, "rpc" => rpc, "code" => code_label(code)).increment(1);
    metrics::histogram!(REQUEST_DURATION_SECONDS, "rpc" => rpc)
        .record(started.elapsed().as_secs_f64());
}

/// Renders the exposition text: the recorder's metrics plus per-partition gauges.
pub fn render(
    handle: &PrometheusHandle,
    registry: &Registry,
    coordinator: Option<&crate::group::Coordinator>,
) -> String {
    let mut out = handle.render();
    let gauges: [(&str, &str); 7] = [
        (
            "syncline_partition_log_start_offset",
            "First retained offset of the partition",
        ),
        (
            "syncline_partition_log_end_offset",
            "Next offset the partition will assign",
        ),
        (
            "syncline_partition_durable_offset",
            "Offset below which the partition is fsync'd and visible",
        ),
        (
            "syncline_partition_durable_lag_records",
            "Offsets appended but not yet fsync'd (end - durable)",
        ),
        (
            "syncline_partition_size_bytes",
            "Bytes in the partition's segments",
        ),
        (
            "syncline_partition_segments",
            "Segment files of the partition",
        ),
        (
            "syncline_partition_fenced",
            "1 when the partition is fenced by corruption",
        ),
    ];
    let topics = registry.list();
    for (index, (name, help)) in gauges.iter().enumerate() {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} gauge");
        for topic in &topics {
            for partition in &topic.partitions {
                let value = match partition.log() {
                    Ok(log) => {
                        let info = log.info();
                        match index {
                            0 => info.start_offset,
                            1 => info.end_offset,
                            2 => info.durable_offset,
                            3 => info.end_offset.saturating_sub(info.durable_offset),
                            4 => info.size_bytes,
                            5 => info.segments as u64,
                            _ => 0,
                        }
                    }
                    Err(_) => u64::from(index == 6),
                };
                let _ = writeln!(
                    out,
                    "{name}{{topic=\"{}\",partition=\"{}\"}} {value}",
                    topic.name, partition.id
                );
            }
        }
    }
    let name = PREALLOCATED_BYTES;
    let _ = writeln!(
        out,
        "# HELP {name} Segment space reserved (fallocate) ahead of written data, all partitions"
    );
    let _ = writeln!(out, "# TYPE {name} gauge");
    let _ = writeln!(out, "{name} {}", registry.preallocated_bytes());
    let name = "syncline_partition_dirty_ratio";
    let _ = writeln!(
        out,
        "# HELP {name} Tables: share of the sealed bytes written since the last compaction pass"
    );
    let _ = writeln!(out, "# TYPE {name} gauge");
    for topic in &topics {
        for partition in topic.partitions.iter().filter(|p| p.is_table) {
            if let Ok(log) = partition.log() {
                let _ = writeln!(
                    out,
                    "{name}{{topic=\"{}\",partition=\"{}\"}} {}",
                    topic.name,
                    partition.id,
                    log.compaction_info().dirty_ratio
                );
            }
        }
    }
    if let Some(coordinator) = coordinator {
        let name = "syncline_consumer_group_lag";
        let _ = writeln!(
            out,
            "# HELP {name} Records between a group's committed offset and the partition's durable offset"
        );
        let _ = writeln!(out, "# TYPE {name} gauge");
        for (group, topic, partition, lag) in coordinator.lags() {
            let _ = writeln!(
                out,
                "{name}{{group=\"{group}\",topic=\"{topic}\",partition=\"{partition}\"}} {lag}"
            );
        }
        let name = "syncline_consumer_group_members";
        let _ = writeln!(out, "# HELP {name} Members of a consumer group");
        let _ = writeln!(out, "# TYPE {name} gauge");
        for (group, members) in coordinator.member_counts() {
            let _ = writeln!(out, "{name}{{group=\"{group}\"}} {members}");
        }
    }
    out
}

/// Binds the metrics address. `Ok(None)`: the default address is taken, so the broker runs
/// without metrics (logged); an explicitly configured address that cannot be bound is an error.
pub async fn bind(addr: SocketAddr, explicit: bool) -> std::io::Result<Option<TcpListener>> {
    match TcpListener::bind(addr).await {
        Ok(listener) => Ok(Some(listener)),
        Err(error) if !explicit => {
            tracing::warn!(%addr, %error, "the default metrics address is taken; serving without metrics (set --metrics-listen)");
            Ok(None)
        }
        Err(error) => Err(error),
    }
}

/// Serves `/metrics` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    registry: Arc<Registry>,
    coordinator: Arc<crate::group::Coordinator>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    use axum::routing::get;
    let router = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let handle = handle.clone();
                let registry = registry.clone();
                let coordinator = coordinator.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        render(&handle, &registry, Some(&coordinator)),
                    )
                }
            }),
        )
        .route(
            "/",
            get(|| async { "syncline-broker: metrics at /metrics\n" }),
        );
    if let Err(error) = axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
    {
        tracing::warn!(%error, "metrics endpoint stopped");
    }
}
