//! Prometheus metrics: the names, the recorder, and the `/metrics` HTTP endpoint.
//!
//! Layers record through the `metrics` facade (a no-op until [`install`] runs), so the log and
//! the service need no handle plumbing. Per-partition and per-group gauges are read from the
//! topic registry and the coordinator at scrape time, so a deleted topic's series disappear
//! with it.
//!
//! [`METRICS`] is the one list of every metric the broker exports (name, type, labels, help);
//! adding a metric is one row of the `metrics!` table below. [`install`] registers every
//! recorder metric at zero (the labelled request metrics for every RPC of the service with code
//! `OK`), so a fresh broker serves each of them before its first event and dashboards and
//! `rate()` see a series from the start.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

use crate::topic::Registry;

/// How a metric is produced and what Prometheus type it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A counter recorded through the `metrics` facade.
    Counter,
    /// A gauge recorded through the `metrics` facade.
    Gauge,
    /// A histogram recorded through the `metrics` facade.
    Histogram,
    /// A gauge computed at scrape time from the topic registry or the group coordinator.
    ScrapeGauge,
}

impl Kind {
    /// The Prometheus `# TYPE` of the metric.
    pub fn prometheus_type(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge | Kind::ScrapeGauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One exported metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metric {
    /// The exported name.
    pub name: &'static str,
    /// Type and source.
    pub kind: Kind,
    /// Label names of its series.
    pub labels: &'static [&'static str],
    /// The `# HELP` text.
    pub help: &'static str,
}

/// Declares a name constant per metric and the [`METRICS`] list, from one row per metric:
/// `CONSTANT = "name", Kind, [labels], "help";`
macro_rules! metrics {
    ($($constant:ident = $name:literal, $kind:ident, [$($label:literal),*], $help:literal;)*) => {
        $(
            #[doc = concat!("`", $name, "`: ", $help)]
            pub const $constant: &str = $name;
        )*
        /// Every metric the broker exports, in exposition order of the recorder's part.
        pub const METRICS: &[Metric] = &[$(Metric {
            name: $name,
            kind: Kind::$kind,
            labels: &[$($label),*],
            help: $help,
        }),*];
    };
}

metrics! {
    REQUESTS_TOTAL = "syncline_requests_total", Counter, ["rpc", "code"], "gRPC requests by rpc and status code (ProduceStream counts each message as ProduceStreamMessage)";
    REQUEST_DURATION_SECONDS = "syncline_request_duration_seconds", Histogram, ["rpc"], "Time to answer a request; produce includes waiting for the ack";
    PRODUCE_BYTES_TOTAL = "syncline_produce_bytes_total", Counter, [], "Record batch bytes accepted by produce";
    FETCH_BYTES_TOTAL = "syncline_fetch_bytes_total", Counter, [], "Record batch bytes returned by fetch and subscribe";
    RECORDS_APPENDED_TOTAL = "syncline_records_appended_total", Counter, [], "Records appended to partition logs";
    BATCHES_APPENDED_TOTAL = "syncline_batches_appended_total", Counter, [], "Record batches appended to partition logs";
    FSYNC_DURATION_SECONDS = "syncline_fsync_duration_seconds", Histogram, [], "Duration of one group-commit fsync";
    GROUP_COMMIT_BATCHES = "syncline_group_commit_batches", Histogram, [], "Batches made durable by one group-commit fsync";
    CONNECTIONS = "syncline_connections", Gauge, [], "Open client connections";
    CONNECTIONS_ACCEPTED_TOTAL = "syncline_connections_accepted_total", Counter, [], "Accepted client connections";
    CONNECTIONS_REFUSED_TOTAL = "syncline_connections_refused_total", Counter, [], "Connections closed at once because max_connections were open";
    RESPONSE_BYTES_IN_FLIGHT = "syncline_response_bytes_in_flight", Gauge, [], "Response bytes produced but not yet sent (the response_bytes_max budget in use)";
    RESPONSE_BUDGET_WAITS_TOTAL = "syncline_response_budget_waits_total", Counter, [], "Response messages that waited for the response-bytes budget";
    STALLED_STREAMS_CLOSED_TOTAL = "syncline_stalled_streams_closed_total", Counter, [], "Response streams whose connection was closed because the reader held response budget unread for stalled_stream_timeout_ms while other responses waited";
    OFFSET_COMMITS_TOTAL = "syncline_offset_commits_total", Counter, [], "Partition offsets committed by consumer groups";
    GROUP_SESSIONS_EXPIRED_TOTAL = "syncline_group_sessions_expired_total", Counter, [], "Consumer group members removed because their session expired";
    COMPACTION_RUNS_TOTAL = "syncline_compaction_runs_total", Counter, [], "Compaction passes committed";
    COMPACTION_BYTES_READ_TOTAL = "syncline_compaction_bytes_read_total", Counter, [], "Bytes of segments read and rewritten by compaction";
    COMPACTION_BYTES_RECLAIMED_TOTAL = "syncline_compaction_bytes_reclaimed_total", Counter, [], "Bytes removed from table logs by compaction";
    PARTITION_LOG_START_OFFSET = "syncline_partition_log_start_offset", ScrapeGauge, ["topic", "partition"], "First retained offset of the partition";
    PARTITION_LOG_END_OFFSET = "syncline_partition_log_end_offset", ScrapeGauge, ["topic", "partition"], "Next offset the partition will assign";
    PARTITION_DURABLE_OFFSET = "syncline_partition_durable_offset", ScrapeGauge, ["topic", "partition"], "Offset below which the partition is fsync'd and visible";
    PARTITION_DURABLE_LAG_RECORDS = "syncline_partition_durable_lag_records", ScrapeGauge, ["topic", "partition"], "Offsets appended but not yet fsync'd (end - durable)";
    PARTITION_SIZE_BYTES = "syncline_partition_size_bytes", ScrapeGauge, ["topic", "partition"], "Bytes in the partition's segments";
    PARTITION_SEGMENTS = "syncline_partition_segments", ScrapeGauge, ["topic", "partition"], "Segment files of the partition";
    PARTITION_FENCED = "syncline_partition_fenced", ScrapeGauge, ["topic", "partition"], "1 when the partition is fenced by corruption";
    PARTITION_DIRTY_RATIO = "syncline_partition_dirty_ratio", ScrapeGauge, ["topic", "partition"], "Tables: share of the sealed bytes written since the last compaction pass";
    CONSUMER_GROUP_LAG = "syncline_consumer_group_lag", ScrapeGauge, ["group", "topic", "partition"], "Records between a group's committed offset and the partition's durable offset";
    CONSUMER_GROUP_MEMBERS = "syncline_consumer_group_members", ScrapeGauge, ["group"], "Members of a consumer group";
    PREALLOCATED_BYTES = "syncline_preallocated_bytes", ScrapeGauge, [], "Segment space reserved (fallocate) ahead of written data, all partitions (capped by preallocate_bytes_max)";
    CONTROLLER_LEADER = "syncline_controller_leader", Gauge, [], "1 on the node leading the cluster controller, else 0 (absent in a cluster of one)";
    CLUSTER_NODES_ALIVE = "syncline_cluster_nodes_alive", Gauge, [], "Nodes the controller's metadata has alive (absent in a cluster of one)";
    CLUSTER_NODES = "syncline_cluster_nodes", Gauge, [], "Nodes registered in the cluster's metadata (absent in a cluster of one)";
    REPLICATION_ELECTIONS_TOTAL = "syncline_replication_elections_total", Counter, [], "Elections this node started in partition Raft groups (terms it ran in as a candidate)";
    REPLICATION_LEADERSHIPS_WON_TOTAL = "syncline_replication_leaderships_won_total", Counter, [], "Partition leaderships this node took; summed over the nodes, the cluster's partition leader changes";
    REPLICATION_COMMIT_DURATION_SECONDS = "syncline_replication_commit_duration_seconds", Histogram, [], "Replicated partitions, on the leader: from handing a write to its Raft group to its apply (a quorum appended and fsync'd it)";
    REPLICATION_SNAPSHOTS_SENT_TOTAL = "syncline_replication_snapshots_sent_total", Counter, [], "Snapshots (copies of a partition log's segment files) this node sent to replicas behind its purged Raft log, and they installed";
    REPLICATION_THROTTLE_WAIT_SECONDS = "syncline_replication_throttle_wait_seconds", Histogram, [], "Time a send to a replica catching up after a move waited for the move throttle";
    REPLICATION_MOVES_COMPLETED_TOTAL = "syncline_replication_moves_completed_total", Counter, [], "Partition moves this node completed as the partition's leader (the new replica set took over)";
    REPLICATION_SNAPSHOTS_INSTALLED_TOTAL = "syncline_replication_snapshots_installed_total", Counter, [], "Snapshots this node installed to catch up: its partition log replaced by the leader's copy";
    REPLICATION_SNAPSHOTS_REFUSED_TOTAL = "syncline_replication_snapshots_refused_total", Counter, [], "Snapshot transfers this node refused (a chunk or the received log failed its checks, or the transfer broke off); the leader retries";
    REPLICATION_SNAPSHOT_BYTES_RECEIVED_TOTAL = "syncline_replication_snapshot_bytes_received_total", Counter, [], "Bytes of partition log received in snapshots this node verified";
    REPLICATION_GROUPS = "syncline_replication_groups", ScrapeGauge, [], "Partition Raft groups running on this node";
    REPLICATION_GROUPS_QUIET = "syncline_replication_groups_quiet", ScrapeGauge, [], "Partition Raft groups on this node with their ticks off (idle: no heartbeats, no timers)";
    REPLICATION_GROUP_WAKES_TOTAL = "syncline_replication_group_wakes_total", Counter, [], "Times a quiesced partition group this node leads was woken by a write or a linearizable read";
    REPLICATION_PARTITIONS_LED = "syncline_replication_partitions_led", ScrapeGauge, [], "Replicated partitions this node leads";
    REPLICATION_UNDER_REPLICATED_PARTITIONS = "syncline_replication_under_replicated_partitions", ScrapeGauge, [], "Replicated partitions this node leads with a follower not caught up (behind the commit index, or silent for two election timeouts while entries wait for it or its node is down)";
    REPLICATION_FOLLOWER_LAG_ENTRIES = "syncline_replication_follower_lag_entries", ScrapeGauge, ["follower"], "On a leader, per follower node: the most Raft entries (about one per produced batch) it is behind in a partition this node leads";
    QUOTA_THROTTLE_SECONDS = "syncline_quota_throttle_seconds", Histogram, ["principal", "direction"], "Delay of a response that held a principal to its produce or fetch byte-rate quota (direction: produce or fetch)";
    REPLICATION_FOLLOWER_LAG_SECONDS = "syncline_replication_follower_lag_seconds", ScrapeGauge, ["follower"], "On a leader, per follower node: the longest time since it was last caught up in a partition this node leads (0 while caught up)";
}

/// The metric named `name` in [`METRICS`].
pub fn metric(name: &str) -> Option<&'static Metric> {
    METRICS.iter().find(|m| m.name == name)
}

/// The RPC label values: every method of the services in `syncline.proto`, plus
/// `ProduceStreamMessage` (one per message of a `ProduceStream`).
pub fn rpc_names() -> Vec<String> {
    use prost::Message as _;
    let mut names = Vec::new();
    match prost_types::FileDescriptorSet::decode(syncline_proto::v1::FILE_DESCRIPTOR_SET) {
        Ok(set) => {
            for file in &set.file {
                for service in &file.service {
                    names.extend(service.method.iter().filter_map(|m| m.name.clone()));
                }
            }
        }
        Err(error) => tracing::warn!(%error, "cannot read the service descriptor"),
    }
    names.push("ProduceStreamMessage".into());
    names
}

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
            describe_and_register();
            handle
        })
        .clone()
}

/// Describes every recorder metric and registers it at zero.
fn describe_and_register() {
    let rpcs = rpc_names();
    for metric in METRICS {
        let (name, help) = (metric.name, metric.help);
        match metric.kind {
            Kind::Counter => {
                metrics::describe_counter!(name, help);
                if metric.labels.is_empty() {
                    metrics::counter!(name).increment(0);
                }
            }
            Kind::Gauge => {
                metrics::describe_gauge!(name, help);
                if metric.labels.is_empty() {
                    metrics::gauge!(name).increment(0.0);
                }
            }
            Kind::Histogram => {
                metrics::describe_histogram!(name, help);
                if metric.labels.is_empty() {
                    // Registered with no samples: served with zero counts.
                    let _ = metrics::histogram!(name);
                }
            }
            Kind::ScrapeGauge => {}
        }
    }
    // The quota series of the principal of unauthenticated calls, so the metric is served.
    for direction in ["produce", "fetch"] {
        let _ = metrics::histogram!(QUOTA_THROTTLE_SECONDS, "principal" => "anonymous", "direction" => direction);
    }
    for rpc in rpcs {
        metrics::counter!(REQUESTS_TOTAL, "rpc" => rpc.clone(), "code" => "OK").increment(0);
        let _ = metrics::histogram!(REQUEST_DURATION_SECONDS, "rpc" => rpc);
    }
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

/// Writes the `# HELP` and `# TYPE` lines of a scrape-time metric from [`METRICS`].
fn header(out: &mut String, name: &str) {
    if let Some(metric) = metric(name) {
        let _ = writeln!(out, "# HELP {name} {}", metric.help);
        let _ = writeln!(out, "# TYPE {name} {}", metric.kind.prometheus_type());
    }
}

/// Renders the exposition text: the recorder's metrics plus the scrape-time gauges.
pub fn render(
    handle: &PrometheusHandle,
    registry: &Registry,
    coordinator: Option<&crate::group::Coordinator>,
    controller: Option<&crate::cluster::controller::Controller>,
) -> String {
    let mut out = handle.render();
    let gauges = [
        PARTITION_LOG_START_OFFSET,
        PARTITION_LOG_END_OFFSET,
        PARTITION_DURABLE_OFFSET,
        PARTITION_DURABLE_LAG_RECORDS,
        PARTITION_SIZE_BYTES,
        PARTITION_SEGMENTS,
        PARTITION_FENCED,
    ];
    let topics = registry.list();
    for (index, name) in gauges.iter().enumerate() {
        header(&mut out, name);
        for topic in &topics {
            // Partitions held or led by other nodes are theirs to report.
            for partition in topic
                .partitions
                .iter()
                .filter(|p| p.remote_leader().is_none())
                .filter(|p| !p.is_replicated() || p.check_leader().is_ok())
            {
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
    header(&mut out, name);
    let _ = writeln!(out, "{name} {}", registry.preallocated_bytes());
    let name = PARTITION_DIRTY_RATIO;
    header(&mut out, name);
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
        let name = CONSUMER_GROUP_LAG;
        header(&mut out, name);
        for (group, topic, partition, lag) in coordinator.lags() {
            let _ = writeln!(
                out,
                "{name}{{group=\"{group}\",topic=\"{topic}\",partition=\"{partition}\"}} {lag}"
            );
        }
        let name = CONSUMER_GROUP_MEMBERS;
        header(&mut out, name);
        for (group, members) in coordinator.member_counts() {
            let _ = writeln!(out, "{name}{{group=\"{group}\"}} {members}");
        }
    }
    render_replication(&mut out, controller);
    out
}

/// The replication gauges: counts per node, follower lags per follower node (the worst over
/// the partitions this node leads), so their series grow with the nodes, not the partitions.
fn render_replication(
    out: &mut String,
    controller: Option<&crate::cluster::controller::Controller>,
) {
    let groups = controller
        .map(crate::replication::status::statuses)
        .unwrap_or_default();
    let quiet = groups
        .iter()
        .filter(|(group, _)| !group.quiet().ticking())
        .count();
    let statuses: Vec<_> = groups.into_iter().map(|(_, status)| status).collect();
    let led = statuses
        .iter()
        .filter(|s| s.role == crate::replication::status::Role::Leader);
    let mut entries = std::collections::BTreeMap::<u64, u64>::new();
    let mut seconds = std::collections::BTreeMap::<u64, f64>::new();
    for follower in led.clone().flat_map(|s| &s.followers) {
        let worst = entries.entry(follower.node).or_default();
        *worst = (*worst).max(follower.lag_entries);
        let worst = seconds.entry(follower.node).or_default();
        *worst = worst.max(follower.behind_for.as_secs_f64());
    }
    for (name, value) in [
        (REPLICATION_GROUPS, statuses.len()),
        (REPLICATION_GROUPS_QUIET, quiet),
        (REPLICATION_PARTITIONS_LED, led.clone().count()),
        (
            REPLICATION_UNDER_REPLICATED_PARTITIONS,
            led.filter(|s| s.under_replicated()).count(),
        ),
    ] {
        header(out, name);
        let _ = writeln!(out, "{name} {value}");
    }
    let name = REPLICATION_FOLLOWER_LAG_ENTRIES;
    header(out, name);
    for (node, lag) in entries {
        let _ = writeln!(out, "{name}{{follower=\"{node}\"}} {lag}");
    }
    let name = REPLICATION_FOLLOWER_LAG_SECONDS;
    header(out, name);
    for (node, lag) in seconds {
        let _ = writeln!(out, "{name}{{follower=\"{node}\"}} {lag:.3}");
    }
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

/// Who may scrape: TLS as on the client port, and a bearer token when clients authenticate.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// TLS (the client port's certificate).
    pub tls: Option<Arc<crate::server::tls::Tls>>,
    /// Token checks.
    pub auth: Option<Arc<crate::server::auth::Authenticator>>,
}

/// Serves `/metrics` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    access: Access,
    handle: PrometheusHandle,
    registry: Arc<Registry>,
    coordinator: Arc<crate::group::Coordinator>,
    controller: Option<Arc<crate::cluster::controller::Controller>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    use axum::routing::get;
    let Access { tls, auth } = access;
    let router = axum::Router::new()
        .route(
            "/metrics",
            get(move |headers: axum::http::HeaderMap| {
                let handle = handle.clone();
                let registry = registry.clone();
                let coordinator = coordinator.clone();
                let controller = controller.clone();
                let auth = auth.clone();
                async move {
                    use axum::response::IntoResponse as _;
                    // With authentication configured, a scrape needs a bearer token too (the
                    // metrics name topics and groups).
                    if let Some(auth) = &auth {
                        let authorization = headers
                            .get(axum::http::header::AUTHORIZATION)
                            .map(|v| v.as_bytes());
                        if let Err(reason) = auth.authenticate(authorization, None) {
                            return (axum::http::StatusCode::UNAUTHORIZED, format!("{reason}\n"))
                                .into_response();
                        }
                    }
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        render(
                            &handle,
                            &registry,
                            Some(&coordinator),
                            controller.as_deref(),
                        ),
                    )
                        .into_response()
                }
            }),
        )
        .route(
            "/",
            get(|| async { "syncline-broker: metrics at /metrics\n" }),
        );
    let served = match tls {
        Some(tls) => {
            axum::serve(TlsListener { listener, tls }, router)
                .with_graceful_shutdown(shutdown)
                .await
        }
        None => {
            axum::serve(listener, router)
                .with_graceful_shutdown(shutdown)
                .await
        }
    };
    if let Err(error) = served {
        tracing::warn!(%error, "metrics endpoint stopped");
    }
}

/// The metrics port's connections with the client port's TLS (handshakes of at most 5 s; one
/// that fails or times out is dropped and the next connection accepted).
struct TlsListener {
    listener: TcpListener,
    tls: Arc<crate::server::tls::Tls>,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((stream, peer)) = self.listener.accept().await else {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            };
            let handshake = self.tls.metrics_acceptor().accept(stream);
            match tokio::time::timeout(std::time::Duration::from_secs(5), handshake).await {
                Ok(Ok(stream)) => return (stream, peer),
                Ok(Err(error)) => {
                    tracing::debug!(%peer, %error, "metrics: TLS handshake failed")
                }
                Err(_) => tracing::debug!(%peer, "metrics: no TLS handshake within 5 s"),
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_the_metric_list_should_hold_unique_prometheus_conventional_names() {
        let mut names = std::collections::HashSet::new();
        for metric in METRICS {
            assert!(names.insert(metric.name), "{} listed twice", metric.name);
            assert!(metric.name.starts_with("syncline_"), "{}", metric.name);
            assert_eq!(
                metric.kind == Kind::Counter,
                metric.name.ends_with("_total"),
                "counters and only counters end in _total: {}",
                metric.name
            );
            assert!(!metric.help.is_empty(), "{}", metric.name);
        }
    }

    #[test]
    fn given_the_service_descriptor_should_name_every_rpc() {
        let rpcs = rpc_names();
        for rpc in ["Produce", "Fetch", "CommitOffsets", "ProduceStreamMessage"] {
            assert!(rpcs.iter().any(|r| r == rpc), "{rpc} missing from {rpcs:?}");
        }
    }
}
