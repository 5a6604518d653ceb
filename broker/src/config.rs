//! Broker configuration: one typed [`Config`] built from, lowest precedence first, built-in
//! defaults < a TOML file (`--config`) < `SYNCLINE_*` environment variables < command-line flags.
//!
//! Every setting has the same name everywhere: flag `--segment-bytes`, environment
//! `SYNCLINE_SEGMENT_BYTES`, TOML key `segment_bytes`. The defaults are the safe choices
//! (durable fsync, loopback address, a data dir under the current folder).
//!
//! Sizes (`*_bytes`, `cleaner_io_bytes_per_sec`) take a plain number of bytes or a number with
//! a unit, the same in flags, variables and TOML (there as a string: `segment_bytes = "64MiB"`):
//! `KiB`, `MiB`, `GiB`, `TiB` are powers of 1024, `KB`, `MB`, `GB`, `TB` powers of 1000, and a
//! bare `K`/`M`/`G` is refused as ambiguous (see [`syncline_proto::size`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::Parser;
use serde::Deserialize;

use syncline_proto::size::{parse_signed_size, parse_size, parse_size_u32};

use crate::log::{ConfigError, FsyncPolicy};

/// Command-line flags (each also readable from the environment).
#[derive(Debug, Clone, Default, Parser)]
#[command(
    name = "syncline-broker",
    version,
    about = "Syncline broker: partitioned, durable, memory-mapped logs served over gRPC",
    long_about = "Syncline broker: partitioned, durable, memory-mapped logs served over gRPC.\n\n\
Settings come from, lowest precedence first: built-in defaults, the TOML file given by --config, \
SYNCLINE_* environment variables, then these flags. Sizes take a plain number of bytes or a unit: \
B, KiB, MiB, GiB, TiB (powers of 1024) or KB, MB, GB, TB (powers of 1000), e.g. 64MiB. The gRPC \
port serves the Syncline API, grpc.health.v1.Health and server reflection."
)]
pub struct Flags {
    /// Directory holding the topics' logs (created if missing) [default: ./syncline-data]
    #[arg(long, env = "SYNCLINE_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Address for all gRPC services; port 0 picks a free port (the broker logs the one it
    /// bound) [default: 127.0.0.1:7450]
    #[arg(long, env = "SYNCLINE_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,

    /// Address of the Prometheus `/metrics` endpoint; port 0 picks a free port. When the
    /// default is taken the broker runs without metrics; an explicit address that cannot be
    /// bound stops the start [default: 127.0.0.1:7451]
    #[arg(long, env = "SYNCLINE_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,

    /// TOML file with any of these settings (keys in snake_case, e.g. `segment_bytes = "64MiB"`).
    /// Sizes take B, KiB, MiB, GiB, TiB (1024-based) or KB, MB, GB, TB (1000-based); a plain
    /// number is bytes
    #[arg(long, env = "SYNCLINE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Log filter in tracing's EnvFilter syntax (RUST_LOG, when set, wins) [default: info]
    #[arg(long, env = "SYNCLINE_LOG", value_name = "FILTER")]
    pub log: Option<String>,

    /// Partitions of a topic created without a partition count [default: 1]
    #[arg(long, env = "SYNCLINE_DEFAULT_PARTITIONS", value_name = "N")]
    pub default_partitions: Option<u32>,

    /// Upper bound on partitions per topic [default: 1024]
    #[arg(long, env = "SYNCLINE_MAX_PARTITIONS", value_name = "N")]
    pub max_partitions: Option<u32>,

    /// Default segment size: a segment rolls when the next batch would pass it [default: 1 GiB]
    #[arg(
        long,
        env = "SYNCLINE_SEGMENT_BYTES",
        value_name = "SIZE",
        value_parser = parse_size
    )]
    pub segment_bytes: Option<u64>,

    /// Default segment age before it rolls [default: 7 days]
    #[arg(long, env = "SYNCLINE_SEGMENT_MS", value_name = "MS")]
    pub segment_ms: Option<u64>,

    /// Default retention by age; -1 keeps records forever [default: -1]
    #[arg(
        long,
        env = "SYNCLINE_RETENTION_MS",
        value_name = "MS",
        allow_hyphen_values = true
    )]
    pub retention_ms: Option<i64>,

    /// Default retention by size, per partition (e.g. 10GiB); -1 means no limit [default: -1]
    #[arg(
        long,
        env = "SYNCLINE_RETENTION_BYTES",
        value_name = "SIZE",
        allow_hyphen_values = true,
        value_parser = parse_signed_size
    )]
    pub retention_bytes: Option<i64>,

    /// Default fsync policy: `always` (continuous group commit) or `interval` [default: always]
    #[arg(long, env = "SYNCLINE_FSYNC_POLICY", value_name = "POLICY")]
    pub fsync_policy: Option<String>,

    /// With `--fsync-policy interval`: milliseconds between fsyncs; refused with the `always`
    /// policy, which has no interval [default: 100]
    #[arg(long, env = "SYNCLINE_FSYNC_INTERVAL_MS", value_name = "MS")]
    pub fsync_interval_ms: Option<u64>,

    /// Largest record batch a produce may carry [default: 8 MiB]
    #[arg(
        long,
        env = "SYNCLINE_MAX_BATCH_BYTES",
        value_name = "SIZE",
        value_parser = parse_size_u32
    )]
    pub max_batch_bytes: Option<u32>,

    /// Largest fetch response [default: 16 MiB]
    #[arg(
        long,
        env = "SYNCLINE_MAX_FETCH_BYTES",
        value_name = "SIZE",
        value_parser = parse_size_u32
    )]
    pub max_fetch_bytes: Option<u32>,

    /// How often retention runs, in milliseconds [default: 30000]
    #[arg(long, env = "SYNCLINE_RETENTION_CHECK_MS", value_name = "MS")]
    pub retention_check_ms: Option<u64>,

    /// Tables: how long a delete (tombstone) stays after compaction could remove it, so that
    /// replicas that are behind still see it [default: 86400000, one day]
    #[arg(long, env = "SYNCLINE_DELETE_RETENTION_MS", value_name = "MS")]
    pub delete_retention_ms: Option<u64>,

    /// Tables: the cleaner compacts a partition once this share of its sealed bytes was
    /// written since the last pass, in (0, 1] [default: 0.5]
    #[arg(long, env = "SYNCLINE_MIN_CLEANABLE_DIRTY_RATIO", value_name = "RATIO")]
    pub min_cleanable_dirty_ratio: Option<f64>,

    /// How often the cleaner looks for tables to compact, in milliseconds [default: 15000]
    #[arg(long, env = "SYNCLINE_CLEANER_INTERVAL_MS", value_name = "MS")]
    pub cleaner_interval_ms: Option<u64>,

    /// The cleaner's I/O budget in bytes read per second (a size: 64MiB), shared by all
    /// partitions, so that it does not starve produce; 0 = unthrottled [default: 128 MiB]
    #[arg(
        long,
        env = "SYNCLINE_CLEANER_IO_BYTES_PER_SEC",
        value_name = "SIZE",
        value_parser = parse_size
    )]
    pub cleaner_io_bytes_per_sec: Option<u64>,

    /// Consumer groups: how long the first assignment of an empty group waits for more members
    /// to join, so that members started together share the work from the start [default: 3000]
    #[arg(
        long,
        env = "SYNCLINE_GROUP_INITIAL_REBALANCE_DELAY_MS",
        value_name = "MS"
    )]
    pub group_initial_rebalance_delay_ms: Option<u64>,

    /// Consumer groups: how often members heartbeat (they learn assignment changes from
    /// heartbeats, so this bounds how fast partitions move); must be below
    /// --group-session-timeout-ms [default: 1000]
    #[arg(long, env = "SYNCLINE_GROUP_HEARTBEAT_INTERVAL_MS", value_name = "MS")]
    pub group_heartbeat_interval_ms: Option<u32>,

    /// Consumer groups: session timeout of members that ask for none; a member silent this
    /// long is removed and its partitions move [default: 10000]
    #[arg(long, env = "SYNCLINE_GROUP_SESSION_TIMEOUT_MS", value_name = "MS")]
    pub group_session_timeout_ms: Option<u32>,

    /// Most segment space reserved ahead of written data across all partitions, in bytes.
    /// Each partition reserves (fallocate) in chunks that start at 64 KiB and double up to
    /// 16 MiB while it writes fast; past this total, appends reserve only what they write;
    /// 0 = no reservation ahead [default: 1/16 of the data directory's file system, at most
    /// 256 MiB]
    #[arg(
        long,
        env = "SYNCLINE_PREALLOCATE_BYTES_MAX",
        value_name = "SIZE",
        value_parser = parse_size
    )]
    pub preallocate_bytes_max: Option<u64>,

    /// Budget on response bytes produced but not yet sent, shared by all clients: a
    /// subscription over its share waits for its reader instead of reading ahead, and a fetch
    /// that finds the budget taken waits up to 5 s, then answers RESOURCE_EXHAUSTED. One message
    /// takes at most 1/16 of it (or one batch); streams together at most 3/4
    /// [default: 256 MiB]
    #[arg(
        long,
        env = "SYNCLINE_RESPONSE_BYTES_MAX",
        value_name = "SIZE",
        value_parser = parse_size
    )]
    pub response_bytes_max: Option<u64>,

    /// Open client connections at most; more are accepted and closed at once (counted in
    /// syncline_connections_refused_total) [default: 10000, or what the open-file limit leaves
    /// after the partitions' descriptors when that is less]
    #[arg(long, env = "SYNCLINE_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<u32>,

    /// A connection that has not sent the HTTP/2 preface and its SETTINGS within this time is
    /// closed [default: 10000]
    #[arg(long, env = "SYNCLINE_HANDSHAKE_TIMEOUT_MS", value_name = "MS")]
    pub handshake_timeout_ms: Option<u64>,

    /// How often the broker pings an HTTP/2 connection to find dead peers [default: 30000]
    #[arg(long, env = "SYNCLINE_KEEPALIVE_INTERVAL_MS", value_name = "MS")]
    pub keepalive_interval_ms: Option<u64>,

    /// A connection whose peer does not answer a ping within this time is closed
    /// [default: 20000]
    #[arg(long, env = "SYNCLINE_KEEPALIVE_TIMEOUT_MS", value_name = "MS")]
    pub keepalive_timeout_ms: Option<u64>,

    /// A response stream (Subscribe, Snapshot) whose reader has left a message holding response
    /// budget unread for this long, while other responses wait for budget, loses its connection
    /// so that the budget is freed (counted in syncline_stalled_streams_closed_total; clients
    /// reconnect and resume) [default: 30000]
    #[arg(long, env = "SYNCLINE_STALLED_STREAM_TIMEOUT_MS", value_name = "MS")]
    pub stalled_stream_timeout_ms: Option<u64>,

    /// This node's id, an integer >= 1; recorded in the data directory, which then refuses to
    /// start as another node [default: 1]
    #[arg(long, env = "SYNCLINE_NODE_ID", value_name = "ID")]
    pub node_id: Option<u64>,

    /// The controller's initial voters, `ID=HOST:PORT,ID=HOST:PORT,...`: the same list on
    /// every initial node, each address that node's --advertise address (at most 9 voters;
    /// an odd count tolerates as many failures as the next even one) [default: this node
    /// alone, a cluster of one]
    #[arg(long, env = "SYNCLINE_CLUSTER", value_name = "ID=HOST:PORT,...")]
    pub cluster: Option<String>,

    /// Join a running cluster through any of its nodes, HOST:PORT, as node --node-id (an id no
    /// other node has): the node follows the controller, then takes replicas (`syncline
    /// cluster rebalance`). Once joined, the data directory remembers its cluster: later
    /// starts may omit --join; given, it must name a node of the same cluster
    #[arg(long, env = "SYNCLINE_JOIN", value_name = "HOST:PORT")]
    pub join: Option<String>,

    /// HOST:PORT that peers and clients use to reach this node; required when --listen is an
    /// unspecified address such as 0.0.0.0 [default: the listen address]
    #[arg(long, env = "SYNCLINE_ADVERTISE", value_name = "HOST:PORT")]
    pub advertise: Option<String>,

    /// Replicas per partition of a topic created without a replication factor (including
    /// `__offsets`); each replicated partition is a Raft group over that many nodes
    /// [default: min(3, cluster nodes)]
    #[arg(long, env = "SYNCLINE_DEFAULT_REPLICATION_FACTOR", value_name = "N")]
    pub default_replication_factor: Option<u32>,

    /// Replicated partitions: Raft entries between two snapshots of a partition's group, in
    /// [8, 1000000]; a snapshot syncs the partition log and lets the Raft log below it go
    /// [default: 4096]
    #[arg(long, env = "SYNCLINE_RAFT_SNAPSHOT_EVERY", value_name = "ENTRIES")]
    pub raft_snapshot_every: Option<u64>,

    /// Replicated partitions: Raft entries a leader keeps below its last snapshot, in
    /// [0, 10000000], for replicas a little behind; a replica further behind catches up from a
    /// copy of the leader's partition log (its segment files) [default: 100000]
    #[arg(long, env = "SYNCLINE_RAFT_SNAPSHOT_KEEP", value_name = "ENTRIES")]
    pub raft_snapshot_keep: Option<u64>,

    /// TLS, authentication and the remote-bind guard.
    #[command(flatten)]
    pub security: security::SecurityFlags,
}

/// The TOML file: the same settings as the flags, all optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    listen: Option<SocketAddr>,
    metrics_listen: Option<SocketAddr>,
    log: Option<String>,
    default_partitions: Option<u32>,
    max_partitions: Option<u32>,
    segment_bytes: Option<SizeValue>,
    segment_ms: Option<u64>,
    retention_ms: Option<i64>,
    retention_bytes: Option<SizeValue>,
    fsync_policy: Option<String>,
    fsync_interval_ms: Option<u64>,
    max_batch_bytes: Option<SizeValue>,
    max_fetch_bytes: Option<SizeValue>,
    retention_check_ms: Option<u64>,
    delete_retention_ms: Option<u64>,
    min_cleanable_dirty_ratio: Option<f64>,
    cleaner_interval_ms: Option<u64>,
    cleaner_io_bytes_per_sec: Option<SizeValue>,
    group_initial_rebalance_delay_ms: Option<u64>,
    group_heartbeat_interval_ms: Option<u32>,
    group_session_timeout_ms: Option<u32>,
    preallocate_bytes_max: Option<SizeValue>,
    response_bytes_max: Option<SizeValue>,
    max_connections: Option<u32>,
    handshake_timeout_ms: Option<u64>,
    keepalive_interval_ms: Option<u64>,
    keepalive_timeout_ms: Option<u64>,
    stalled_stream_timeout_ms: Option<u64>,
    node_id: Option<u64>,
    cluster: Option<String>,
    join: Option<String>,
    advertise: Option<String>,
    default_replication_factor: Option<u32>,
    raft_snapshot_every: Option<u64>,
    raft_snapshot_keep: Option<u64>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_client_ca: Option<PathBuf>,
    auth_tokens_file: Option<PathBuf>,
    auth_jwt_secret_file: Option<PathBuf>,
    auth_jwt_public_keys: Option<PathBuf>,
    auth_jwt_audience: Option<String>,
    superusers: Option<Vec<String>>,
    quota_produce_bytes_per_sec: Option<u64>,
    quota_fetch_bytes_per_sec: Option<u64>,
    quotas_file: Option<PathBuf>,
    insecure_allow_remote: Option<bool>,
}

/// A size in the TOML file: an integer (bytes) or a string with a unit (`"64MiB"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum SizeValue {
    Bytes(i64),
    Text(String),
}

impl SizeValue {
    fn signed(self, key: &'static str) -> Result<i64, ConfigError> {
        match self {
            SizeValue::Bytes(bytes) => Ok(bytes),
            SizeValue::Text(text) => parse_signed_size(&text).map_err(|e| ConfigError {
                key,
                message: e.to_string(),
            }),
        }
    }

    fn unsigned(self, key: &'static str) -> Result<u64, ConfigError> {
        let bytes = match self {
            SizeValue::Bytes(bytes) => bytes,
            SizeValue::Text(text) => {
                return parse_size(&text).map_err(|e| ConfigError {
                    key,
                    message: e.to_string(),
                })
            }
        };
        u64::try_from(bytes).map_err(|_| ConfigError {
            key,
            message: format!("{bytes} is negative"),
        })
    }

    fn u32(self, key: &'static str) -> Result<u32, ConfigError> {
        let bytes = self.unsigned(key)?;
        u32::try_from(bytes).map_err(|_| ConfigError {
            key,
            message: format!("{bytes} is above {}", u32::MAX),
        })
    }
}

/// Reads an optional size of the TOML file, naming `key` when it is invalid.
fn file_size<T>(
    value: Option<SizeValue>,
    key: &'static str,
    convert: fn(SizeValue, &'static str) -> Result<T, ConfigError>,
) -> Result<Option<T>, ConfigError> {
    value.map(|v| convert(v, key)).transpose()
}

/// Defaults for topics created without explicit settings.
#[derive(Debug, Clone, PartialEq)]
pub struct TopicDefaults {
    /// Partitions.
    pub partitions: u32,
    /// Segment size in bytes.
    pub segment_bytes: u64,
    /// Segment age in ms.
    pub segment_ms: u64,
    /// Retention by age (None = forever).
    pub retention_ms: Option<u64>,
    /// Retention by size per partition (None = unlimited).
    pub retention_bytes: Option<u64>,
    /// fsync policy.
    pub fsync: FsyncPolicy,
    /// Tables: how long a delete stays after compaction could remove it, in ms.
    pub delete_retention_ms: u64,
    /// Tables: dirty share of the sealed bytes that triggers a compaction pass.
    pub min_cleanable_dirty_ratio: f64,
}

/// Bounds on what requests may ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Partitions per topic.
    pub max_partitions: u32,
    /// Bytes per produced batch.
    pub max_batch_bytes: u32,
    /// Bytes per fetch response.
    pub max_fetch_bytes: u32,
    /// Longest long-poll a fetch may ask for, in ms (30 s).
    pub max_wait_ms: u32,
    /// Plain records per produce request.
    pub max_records_per_request: usize,
    /// Response bytes produced but not yet sent, broker-wide (see `server::budget`).
    pub response_bytes_max: u64,
}

/// Bounds on connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Open connections at most; `None`: computed at start from the open-file limit (see
    /// `server::connections::default_max_connections`).
    pub max_connections: Option<u32>,
    /// Time a new connection has to send the HTTP/2 preface and SETTINGS, in ms.
    pub handshake_timeout_ms: u64,
    /// HTTP/2 ping interval, in ms.
    pub keepalive_interval_ms: u64,
    /// Time a peer has to answer a ping, in ms.
    pub keepalive_timeout_ms: u64,
    /// Time a stream may leave budget-holding messages unread while others wait for budget,
    /// before its connection is closed, in ms (see `server::stall`).
    pub stalled_stream_timeout_ms: u64,
}

/// The broker's configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Where topics live.
    pub data_dir: PathBuf,
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Prometheus endpoint address.
    pub metrics_listen: SocketAddr,
    /// True when `metrics_listen` was configured (then failing to bind it is an error).
    pub metrics_listen_explicit: bool,
    /// Log filter.
    pub log: String,
    /// Topic defaults.
    pub topic_defaults: TopicDefaults,
    /// Request limits.
    pub limits: Limits,
    /// Connection limits.
    pub connections: ConnectionLimits,
    /// How often retention runs.
    pub retention_check_ms: u64,
    /// How often the cleaner looks for tables to compact.
    pub cleaner_interval_ms: u64,
    /// The cleaner's I/O budget (bytes read per second; 0 = unthrottled).
    pub cleaner_io_bytes_per_sec: u64,
    /// Wait before the first assignment of an empty group.
    pub group_initial_rebalance_delay_ms: u64,
    /// How often group members heartbeat.
    pub group_heartbeat_interval_ms: u32,
    /// Session timeout of members that ask for none.
    pub group_session_timeout_ms: u32,
    /// Most segment space reserved ahead of written data, across all partitions (None: 1/16
    /// of the data directory's file system, at most 256 MiB).
    pub preallocate_bytes_max: Option<u64>,
    /// This node's id, address and the controller's initial voters.
    pub node: crate::cluster::node::NodeConfig,
    /// Raft settings of replicated partitions' groups.
    pub replication: crate::replication::group::GroupSettings,
    /// TLS on the client port (None: plain text).
    pub tls: Option<TlsFiles>,
    /// Authentication (`server::auth`).
    pub auth: AuthFiles,
    /// Per-principal byte-rate quotas (`server::quota`).
    pub quotas: QuotaSettings,
    /// Serve a non-loopback address without TLS and authentication.
    pub insecure_allow_remote: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./syncline-data"),
            listen: SocketAddr::from(([127, 0, 0, 1], 7450)),
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 7451)),
            metrics_listen_explicit: false,
            log: "info".into(),
            topic_defaults: TopicDefaults {
                partitions: 1,
                segment_bytes: 1024 * 1024 * 1024,
                segment_ms: 7 * 24 * 3600 * 1000,
                retention_ms: None,
                retention_bytes: None,
                fsync: FsyncPolicy::Always,
                delete_retention_ms: 86_400_000,
                min_cleanable_dirty_ratio: 0.5,
            },
            limits: Limits {
                max_partitions: 1024,
                max_batch_bytes: 8 * 1024 * 1024,
                max_fetch_bytes: 16 * 1024 * 1024,
                max_wait_ms: 30_000,
                max_records_per_request: 100_000,
                response_bytes_max: 256 * 1024 * 1024,
            },
            connections: ConnectionLimits {
                max_connections: None,
                handshake_timeout_ms: 10_000,
                keepalive_interval_ms: 30_000,
                keepalive_timeout_ms: 20_000,
                stalled_stream_timeout_ms: 30_000,
            },
            retention_check_ms: 30_000,
            cleaner_interval_ms: 15_000,
            cleaner_io_bytes_per_sec: 128 * 1024 * 1024,
            group_initial_rebalance_delay_ms: 3000,
            group_heartbeat_interval_ms: 1000,
            group_session_timeout_ms: 10_000,
            preallocate_bytes_max: None,
            node: crate::cluster::node::NodeConfig::default(),
            replication: crate::replication::group::GroupSettings::default(),
            tls: None,
            auth: AuthFiles::default(),
            quotas: QuotaSettings::default(),
            insecure_allow_remote: false,
        }
    }
}

/// Why the configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ConfigLoadError {
    /// The TOML file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The TOML file is not valid.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// A value is out of bounds.
    #[error(transparent)]
    Invalid(#[from] ConfigError),
}

fn retention(value: i64, key: &'static str) -> Result<Option<u64>, ConfigError> {
    match value {
        -1 => Ok(None),
        v if v > 0 => Ok(Some(v as u64)),
        v => Err(ConfigError {
            key,
            message: format!("{v}: use a positive number, or -1 for no limit"),
        }),
    }
}

/// Checks a `min_cleanable_dirty_ratio`: in (0, 1].
pub fn check_dirty_ratio(ratio: f64) -> Result<(), ConfigError> {
    if ratio > 0.0 && ratio <= 1.0 {
        Ok(())
    } else {
        Err(ConfigError {
            key: "min_cleanable_dirty_ratio",
            message: format!("{ratio} is outside (0, 1]"),
        })
    }
}

/// An fsync interval set explicitly under the `always` policy would be ignored: refused, so
/// nobody believes they configured interval fsyncs (or `always`) when they did not.
pub fn check_fsync_interval(
    policy: FsyncPolicy,
    interval_ms: Option<u64>,
) -> Result<(), ConfigError> {
    match (policy, interval_ms) {
        (FsyncPolicy::Always, Some(ms)) => Err(ConfigError {
            key: "fsync_interval_ms",
            message: format!(
                "{ms} is set, but fsync_policy is `always` (which fsyncs continuously and has \
                 no interval): set fsync_policy = `interval`, or leave fsync_interval_ms out"
            ),
        }),
        _ => Ok(()),
    }
}

/// Parses an fsync policy name.
pub fn parse_fsync(policy: &str, interval_ms: u64) -> Result<FsyncPolicy, ConfigError> {
    match policy {
        "always" => Ok(FsyncPolicy::Always),
        "interval" => Ok(FsyncPolicy::IntervalMs(interval_ms)),
        other => Err(ConfigError {
            key: "fsync_policy",
            message: format!("`{other}`: use `always` or `interval`"),
        }),
    }
}

impl Config {
    /// Builds the configuration from flags (which clap already merged with the environment)
    /// and the optional TOML file they name.
    pub fn load(flags: Flags) -> Result<Config, ConfigLoadError> {
        let file = match &flags.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let mut config = Config::default();
        let defaults = config.clone();
        config.data_dir = flags
            .data_dir
            .or(file.data_dir)
            .unwrap_or(defaults.data_dir);
        config.listen = flags.listen.or(file.listen).unwrap_or(defaults.listen);
        if let Some(addr) = flags.metrics_listen.or(file.metrics_listen) {
            config.metrics_listen = addr;
            config.metrics_listen_explicit = true;
        }
        config.log = flags.log.or(file.log).unwrap_or(defaults.log);
        let topic = &mut config.topic_defaults;
        topic.partitions = flags
            .default_partitions
            .or(file.default_partitions)
            .unwrap_or(topic.partitions);
        topic.segment_bytes = flags
            .segment_bytes
            .or(file_size(
                file.segment_bytes,
                "segment_bytes",
                SizeValue::unsigned,
            )?)
            .unwrap_or(topic.segment_bytes);
        topic.segment_ms = flags
            .segment_ms
            .or(file.segment_ms)
            .unwrap_or(topic.segment_ms);
        if let Some(value) = flags.retention_ms.or(file.retention_ms) {
            topic.retention_ms = retention(value, "retention_ms")?;
        }
        if let Some(value) = flags.retention_bytes.or(file_size(
            file.retention_bytes,
            "retention_bytes",
            SizeValue::signed,
        )?) {
            topic.retention_bytes = retention(value, "retention_bytes")?;
        }
        let interval = flags.fsync_interval_ms.or(file.fsync_interval_ms);
        // Which layer (0 default, 1 file, 2 env or flag) set each: an interval is refused only
        // when it was given at least as high as the policy, so a flag or env var can switch a
        // file's `interval` policy to `always` without editing the file.
        let layer = |flag: bool, file: bool| if flag { 2 } else { u8::from(file) };
        let policy_layer = layer(flags.fsync_policy.is_some(), file.fsync_policy.is_some());
        let interval_layer = layer(
            flags.fsync_interval_ms.is_some(),
            file.fsync_interval_ms.is_some(),
        );
        if let Some(policy) = flags.fsync_policy.or(file.fsync_policy) {
            topic.fsync = parse_fsync(&policy, interval.unwrap_or(100))?;
        }
        if interval_layer >= policy_layer {
            check_fsync_interval(topic.fsync, interval)?;
        }
        let limits = &mut config.limits;
        limits.max_partitions = flags
            .max_partitions
            .or(file.max_partitions)
            .unwrap_or(limits.max_partitions);
        limits.max_batch_bytes = flags
            .max_batch_bytes
            .or(file_size(
                file.max_batch_bytes,
                "max_batch_bytes",
                SizeValue::u32,
            )?)
            .unwrap_or(limits.max_batch_bytes);
        limits.max_fetch_bytes = flags
            .max_fetch_bytes
            .or(file_size(
                file.max_fetch_bytes,
                "max_fetch_bytes",
                SizeValue::u32,
            )?)
            .unwrap_or(limits.max_fetch_bytes);
        config.retention_check_ms = flags
            .retention_check_ms
            .or(file.retention_check_ms)
            .unwrap_or(config.retention_check_ms);
        let topic = &mut config.topic_defaults;
        topic.delete_retention_ms = flags
            .delete_retention_ms
            .or(file.delete_retention_ms)
            .unwrap_or(topic.delete_retention_ms);
        topic.min_cleanable_dirty_ratio = flags
            .min_cleanable_dirty_ratio
            .or(file.min_cleanable_dirty_ratio)
            .unwrap_or(topic.min_cleanable_dirty_ratio);
        config.cleaner_interval_ms = flags
            .cleaner_interval_ms
            .or(file.cleaner_interval_ms)
            .unwrap_or(config.cleaner_interval_ms);
        config.cleaner_io_bytes_per_sec = flags
            .cleaner_io_bytes_per_sec
            .or(file_size(
                file.cleaner_io_bytes_per_sec,
                "cleaner_io_bytes_per_sec",
                SizeValue::unsigned,
            )?)
            .unwrap_or(config.cleaner_io_bytes_per_sec);
        config.group_initial_rebalance_delay_ms = flags
            .group_initial_rebalance_delay_ms
            .or(file.group_initial_rebalance_delay_ms)
            .unwrap_or(config.group_initial_rebalance_delay_ms);
        config.group_heartbeat_interval_ms = flags
            .group_heartbeat_interval_ms
            .or(file.group_heartbeat_interval_ms)
            .unwrap_or(config.group_heartbeat_interval_ms);
        config.group_session_timeout_ms = flags
            .group_session_timeout_ms
            .or(file.group_session_timeout_ms)
            .unwrap_or(config.group_session_timeout_ms);
        config.preallocate_bytes_max = flags.preallocate_bytes_max.or(file_size(
            file.preallocate_bytes_max,
            "preallocate_bytes_max",
            SizeValue::unsigned,
        )?);
        config.limits.response_bytes_max = flags
            .response_bytes_max
            .or(file_size(
                file.response_bytes_max,
                "response_bytes_max",
                SizeValue::unsigned,
            )?)
            .unwrap_or(config.limits.response_bytes_max);
        let connections = &mut config.connections;
        connections.max_connections = flags.max_connections.or(file.max_connections);
        connections.handshake_timeout_ms = flags
            .handshake_timeout_ms
            .or(file.handshake_timeout_ms)
            .unwrap_or(connections.handshake_timeout_ms);
        connections.keepalive_interval_ms = flags
            .keepalive_interval_ms
            .or(file.keepalive_interval_ms)
            .unwrap_or(connections.keepalive_interval_ms);
        connections.keepalive_timeout_ms = flags
            .keepalive_timeout_ms
            .or(file.keepalive_timeout_ms)
            .unwrap_or(connections.keepalive_timeout_ms);
        connections.stalled_stream_timeout_ms = flags
            .stalled_stream_timeout_ms
            .or(file.stalled_stream_timeout_ms)
            .unwrap_or(connections.stalled_stream_timeout_ms);
        let node = &mut config.node;
        node.id = flags.node_id.or(file.node_id).unwrap_or(node.id);
        node.advertise = flags.advertise.or(file.advertise);
        node.join = flags.join.or(file.join);
        node.default_replication_factor = flags
            .default_replication_factor
            .or(file.default_replication_factor);
        let replication = &mut config.replication;
        replication.snapshot_every = flags
            .raft_snapshot_every
            .or(file.raft_snapshot_every)
            .unwrap_or(replication.snapshot_every);
        replication.snapshot_keep = flags
            .raft_snapshot_keep
            .or(file.raft_snapshot_keep)
            .unwrap_or(replication.snapshot_keep);
        if let Some(cluster) = flags.cluster.or(file.cluster) {
            node.cluster =
                crate::cluster::node::parse_cluster(&cluster).map_err(|message| ConfigError {
                    key: "cluster",
                    message,
                })?;
        }
        let security = flags.security;
        config.tls = security::tls_files(
            security.tls_cert.or(file.tls_cert),
            security.tls_key.or(file.tls_key),
            security.tls_client_ca.or(file.tls_client_ca),
        )?;
        config.auth = AuthFiles {
            tokens_file: security.auth_tokens_file.or(file.auth_tokens_file),
            jwt_secret_file: security.auth_jwt_secret_file.or(file.auth_jwt_secret_file),
            jwt_public_keys: security.auth_jwt_public_keys.or(file.auth_jwt_public_keys),
            jwt_audience: security.auth_jwt_audience.or(file.auth_jwt_audience),
            superusers: security::principals(security.superusers.or(file.superusers)),
        };
        config.quotas = QuotaSettings {
            produce_bytes_per_sec: security
                .quota_produce_bytes_per_sec
                .or(file.quota_produce_bytes_per_sec)
                .unwrap_or(0),
            fetch_bytes_per_sec: security
                .quota_fetch_bytes_per_sec
                .or(file.quota_fetch_bytes_per_sec)
                .unwrap_or(0),
            file: security.quotas_file.or(file.quotas_file),
        };
        config.insecure_allow_remote =
            security.insecure_allow_remote || file.insecure_allow_remote.unwrap_or(false);
        config.validate()?;
        Ok(config)
    }

    /// Checks bounds and relations, naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |key: &'static str, message: String| Err(ConfigError { key, message });
        security::check_remote(self)?;
        security::check_cluster(self)?;
        self.node.validate(self.listen)?;
        let limits = &self.limits;
        if !(1..=100_000).contains(&limits.max_partitions) {
            return err(
                "max_partitions",
                format!("{} is outside [1, 100000]", limits.max_partitions),
            );
        }
        let partitions = self.topic_defaults.partitions;
        if partitions == 0 || partitions > limits.max_partitions {
            return err(
                "default_partitions",
                format!(
                    "{partitions} is outside [1, max_partitions = {}]",
                    limits.max_partitions
                ),
            );
        }
        if !(1024..=syncline_proto::batch::BATCH_LEN_MAX).contains(&limits.max_batch_bytes) {
            return err(
                "max_batch_bytes",
                format!(
                    "{} is outside [1024, {}]",
                    limits.max_batch_bytes,
                    syncline_proto::batch::BATCH_LEN_MAX
                ),
            );
        }
        if !(1024..=(256 * 1024 * 1024)).contains(&limits.max_fetch_bytes) {
            return err(
                "max_fetch_bytes",
                format!("{} is outside [1024, 268435456]", limits.max_fetch_bytes),
            );
        }
        if limits.max_fetch_bytes < limits.max_batch_bytes {
            return err(
                "max_fetch_bytes",
                format!(
                    "{} is below max_batch_bytes ({}): a fetch must fit the largest batch",
                    limits.max_fetch_bytes, limits.max_batch_bytes
                ),
            );
        }
        const MIB: u64 = 1024 * 1024;
        if !(MIB..=(1 << 40)).contains(&limits.response_bytes_max) {
            return err(
                "response_bytes_max",
                format!(
                    "{} is outside [1048576, 1099511627776]",
                    limits.response_bytes_max
                ),
            );
        }
        let connections = &self.connections;
        if connections.max_connections == Some(0) {
            return err("max_connections", "must be at least 1".into());
        }
        for (key, value) in [
            ("handshake_timeout_ms", connections.handshake_timeout_ms),
            ("keepalive_interval_ms", connections.keepalive_interval_ms),
            ("keepalive_timeout_ms", connections.keepalive_timeout_ms),
        ] {
            if !(1..=3_600_000).contains(&value) {
                return err(key, format!("{value} is outside [1, 3600000]"));
            }
        }
        let stalled = connections.stalled_stream_timeout_ms;
        if !(100..=3_600_000).contains(&stalled) {
            return err(
                "stalled_stream_timeout_ms",
                format!("{stalled} is outside [100, 3600000]"),
            );
        }
        if self.retention_check_ms == 0 {
            return err("retention_check_ms", "must be at least 1".into());
        }
        if self.cleaner_interval_ms == 0 {
            return err("cleaner_interval_ms", "must be at least 1".into());
        }
        check_dirty_ratio(self.topic_defaults.min_cleanable_dirty_ratio)?;
        if self.group_initial_rebalance_delay_ms > 300_000 {
            return err(
                "group_initial_rebalance_delay_ms",
                format!("{} is above 300000", self.group_initial_rebalance_delay_ms),
            );
        }
        if !(10..=60_000).contains(&self.group_heartbeat_interval_ms) {
            return err(
                "group_heartbeat_interval_ms",
                format!(
                    "{} is outside [10, 60000]",
                    self.group_heartbeat_interval_ms
                ),
            );
        }
        let (min, max) = (
            crate::group::SESSION_TIMEOUT_MIN_MS,
            crate::group::SESSION_TIMEOUT_MAX_MS,
        );
        if !(min..=max).contains(&self.group_session_timeout_ms) {
            return err(
                "group_session_timeout_ms",
                format!(
                    "{} is outside [{min}, {max}]",
                    self.group_session_timeout_ms
                ),
            );
        }
        if self.group_heartbeat_interval_ms >= self.group_session_timeout_ms {
            return err(
                "group_heartbeat_interval_ms",
                format!(
                    "{} is not below group_session_timeout_ms ({}): members would expire \
                     between two heartbeats",
                    self.group_heartbeat_interval_ms, self.group_session_timeout_ms
                ),
            );
        }
        let replication = &self.replication;
        let (min, max) = crate::replication::group::SNAPSHOT_EVERY_RANGE;
        if !(min..=max).contains(&replication.snapshot_every) {
            return err(
                "raft_snapshot_every",
                format!("{} is outside [{min}, {max}]", replication.snapshot_every),
            );
        }
        let max = crate::replication::group::SNAPSHOT_KEEP_MAX;
        if replication.snapshot_keep > max {
            return err(
                "raft_snapshot_keep",
                format!("{} is outside [0, {max}]", replication.snapshot_keep),
            );
        }
        // The per-topic log config must be valid with these defaults.
        self.log_config_for(&self.topic_defaults).validate()
    }

    /// The log configuration for a topic with `settings`.
    pub fn log_config_for(&self, settings: &TopicDefaults) -> crate::log::LogConfig {
        crate::log::LogConfig {
            segment_bytes_max: settings.segment_bytes,
            segment_ms: settings.segment_ms,
            batch_bytes_max: self
                .limits
                .max_batch_bytes
                .min(settings.segment_bytes.min(u64::from(u32::MAX)) as u32),
            fsync: settings.fsync,
            retention_bytes: settings.retention_bytes,
            retention_ms: settings.retention_ms,
            ..crate::log::LogConfig::default()
        }
    }
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigLoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigLoadError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigLoadError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

mod security;
pub use security::{AuthFiles, QuotaSettings, SecurityFlags, TlsFiles};

#[cfg(test)]
mod tests;
