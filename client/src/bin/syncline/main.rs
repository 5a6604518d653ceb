//! `syncline`: the Syncline command-line client (topics, produce from stdin, consume to stdout
//! alone or as a consumer-group member, consumer groups,
//! tables by key with `put`, `get`, `history` and `delete`, a live view of a table with `watch`,
//! and `bench`, a load generator that
//! verifies what it reads back).
//!
//! Exit status: 0 on success; 1 on failure, with one line `error: MESSAGE` on stderr; 2 for a
//! usage error (clap's message).

mod acl;
mod bench;
mod cluster;
mod group;
mod input;
mod operations;
mod output;
mod table;
mod watch;

use std::io::{self, IsTerminal as _, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use clap::{Args, Parser, Subcommand, ValueEnum};
use futures::FutureExt as _;
use syncline_client::{
    Acks, CleanupPolicy, Client, ClientConfig, Connectivity, ConsumerConfig, DeliveryFuture,
    GroupConsumerConfig, GroupEvent, OffsetReset, ProducerConfig, StartOffset, TlsConfig,
    TopicConfig,
};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::sync::mpsc;

use crate::input::{parse_line, strip_line_ending};
use crate::output::{table, write_json, write_text, TextFormat};

const ABOUT: &str = "Command-line client for the Syncline message broker";

const AFTER_HELP: &str = "\
The broker address comes from --broker (before or after the subcommand), else from the \
SYNCLINE_BROKER environment variable, else 127.0.0.1:7450.

Exit status: 0 on success; 1 on failure, with a one-line `error: MESSAGE` on stderr (unknown \
or duplicate topic, bad name, broker unreachable, ...); 2 on a usage error.

Set RUST_LOG (e.g. RUST_LOG=syncline_client=debug) for diagnostics on stderr.";

#[derive(Debug, Parser)]
#[command(name = "syncline", version, about = ABOUT, after_help = AFTER_HELP)]
struct Cli {
    /// Broker address as HOST:PORT (an http:// prefix is accepted), or a comma-separated list
    /// of bootstrap addresses tried in order until one answers.
    #[arg(
        long,
        global = true,
        env = "SYNCLINE_BROKER",
        default_value = "127.0.0.1:7450",
        value_name = "HOST:PORT[,...]"
    )]
    broker: String,

    /// Connect with TLS, trusting the brokers' certificates signed by this CA (PEM)
    #[arg(long, global = true, env = "SYNCLINE_TLS_CA", value_name = "PEM")]
    tls_ca: Option<std::path::PathBuf>,

    /// Mutual TLS: this client's certificate (PEM), with --tls-key and --tls-ca
    #[arg(long, global = true, env = "SYNCLINE_TLS_CERT", value_name = "PEM", requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<std::path::PathBuf>,

    /// Mutual TLS: the private key of --tls-cert (PEM)
    #[arg(long, global = true, env = "SYNCLINE_TLS_KEY", value_name = "PEM", requires_all = ["tls_cert", "tls_ca"])]
    tls_key: Option<std::path::PathBuf>,

    /// Bearer token sent with every call: a static token or a JWT the brokers accept
    #[arg(
        long,
        global = true,
        env = "SYNCLINE_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    token: Option<String>,

    #[command(subcommand)]
    command: Command,
}

impl Cli {
    /// The connection settings the flags ask for.
    fn client_config(&self) -> anyhow::Result<ClientConfig> {
        let tls = match &self.tls_ca {
            Some(ca) => {
                let identity = self.tls_cert.as_deref().zip(self.tls_key.as_deref());
                Some(TlsConfig::from_files(ca, identity)?)
            }
            None => None,
        };
        let config = ClientConfig {
            tls,
            ..ClientConfig::default()
        };
        Ok(match &self.token {
            Some(token) => config.with_token(token)?,
            None => config,
        })
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create, list, describe or delete topics.
    #[command(subcommand)]
    Topic(TopicCommand),
    /// Produce records read from stdin, one per line.
    Produce(ProduceArgs),
    /// Consume records of a topic and print them to stdout (alone, or as a member of a
    /// consumer group with --group).
    Consume(ConsumeArgs),
    /// List consumer groups, describe one (members, owners, committed offsets, lag), or reset
    /// a group's committed offsets.
    #[command(subcommand)]
    Group(group::GroupCommand),
    /// Set a key of a table, optionally only at an expected version (compare-and-set).
    Put(table::PutArgs),
    /// Print the latest value of a key of a table.
    Get(table::GetArgs),
    /// Print the retained versions of a key of a table, oldest first.
    History(table::HistoryArgs),
    /// Delete a key of a table.
    Delete(table::DeleteArgs),
    /// Follow a table: print every key once caught up, then each change as it happens.
    Watch(watch::WatchArgs),
    /// Measure produce and consume throughput and latency, verifying every record read back.
    Bench(bench::BenchArgs),
    /// Show the cluster (nodes, the controller, where every partition lives) and operate it:
    /// rebalance, add and remove nodes, set the controller's voters.
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
    /// Manage access control lists: which principal may read, write, create, delete, alter
    /// or describe which topics and groups, and who administers the cluster.
    #[command(subcommand)]
    Acl(acl::AclCommand),
    /// Run connectors (change data capture from PostgreSQL; sinks into PostgreSQL, Redis and
    /// HTTP) from a connectors.toml, or show their status: runs the `syncline-connect` binary
    /// installed beside this one (see `syncline connect --help`).
    #[command(disable_help_flag = true)]
    Connect {
        /// Arguments for `syncline-connect` (`--config FILE`, `status --json`, ...).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

#[derive(Debug, Subcommand)]
enum TopicCommand {
    /// Create a topic. Options not given take the broker's defaults.
    Create(CreateArgs),
    /// List topic names, one per line (sorted).
    List {
        /// Print a table with partitions, cleanup policy and topic id instead of names only.
        #[arg(long, short)]
        long: bool,
    },
    /// Show a topic's config and, per partition, its start, durable and end offsets and size.
    Describe {
        /// The topic.
        name: String,
    },
    /// Delete a topic and all its records.
    Delete {
        /// The topic.
        name: String,
    },
    /// Move one partition to another replica set (a cluster): the new replicas catch up as
    /// learners at --throttle, then the partition's membership changes; writes continue.
    /// Waits until the move is done (progress on stderr) unless --no-wait.
    #[command(after_help = operations::MOVES_HELP)]
    Reassign(operations::ReassignArgs),
    /// Compact a table now: keep only the latest record of each key (and deletes until their
    /// retention passes), then print what each partition reclaimed, and what it kept only
    /// because an idempotent producer wrote it in the last 2 minutes (KEPT-FOR-PRODUCERS: kept
    /// so that a retry is still recognised after a broker restart). The broker also compacts
    /// in the background once a partition's dirty ratio passes min-cleanable-dirty-ratio.
    Compact {
        /// The table.
        name: String,
        /// Leave the active segments alone (by default they are sealed first, so that every
        /// durable record is compacted).
        #[arg(long)]
        no_roll: bool,
    },
}

#[derive(Debug, Args)]
struct CreateArgs {
    /// Topic name: 1 to 249 of A-Z a-z 0-9 . _ - (not "." or "..").
    name: String,

    /// Number of partitions (default: the broker's).
    #[arg(long, value_name = "N")]
    partitions: Option<u32>,

    /// Cleanup policy: `delete` removes old segments by retention; `compact` keeps the latest
    /// record of each key (a table).
    #[arg(long, value_enum, value_name = "POLICY")]
    cleanup: Option<CleanupArg>,

    /// Delete segments older than MS milliseconds; -1 keeps records forever.
    #[arg(long, value_name = "MS", allow_negative_numbers = true)]
    retention_ms: Option<i64>,

    /// Delete the oldest segments when a partition holds more than this size (bytes, or with
    /// a unit: 10GiB, 500MB); -1 = no limit.
    #[arg(
        long,
        value_name = "SIZE",
        allow_negative_numbers = true,
        value_parser = syncline_proto::size::parse_signed_size
    )]
    retention_bytes: Option<i64>,

    /// Roll to a new segment when the next batch would pass this size (bytes, or with a unit:
    /// 64MiB, 1GiB) (default: the broker's).
    #[arg(long, value_name = "SIZE", value_parser = syncline_proto::size::parse_size)]
    segment_bytes: Option<u64>,

    /// Tables: keep a delete this many milliseconds after compaction could remove it, so
    /// that readers that are behind still see it (default: the broker's, one day).
    #[arg(long, value_name = "MS")]
    delete_retention_ms: Option<u64>,

    /// Tables: compact a partition once this share of its sealed bytes was written since the
    /// last pass, in (0, 1] (default: the broker's, 0.5).
    #[arg(long, value_name = "RATIO")]
    min_cleanable_dirty_ratio: Option<f64>,

    /// Replicas per partition, each on its own node: a partition with R > 1 is a Raft group
    /// over its R replicas, and it keeps taking writes while a majority of them is up
    /// (default: the broker's default_replication_factor, min(3, cluster nodes)). At most the
    /// number of nodes.
    #[arg(long, value_name = "R")]
    replication_factor: Option<u32>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum CleanupArg {
    Delete,
    Compact,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum AcksArg {
    /// The broker answers without waiting.
    None,
    /// Appended on the partition's leader, in its page cache (not yet on the other replicas).
    Leader,
    /// Committed: covered by an fsync (survives a crash); with replication factor R > 1,
    /// fsync'd on a majority of the partition's replicas.
    Durable,
}

#[derive(Debug, Args)]
#[command(after_help = "\
Each line of stdin (without its \\n or \\r\\n) becomes one record; an empty line is a record \
with an empty value. Records with the same key go to the same partition, in order; records \
without a key are spread over the partitions. On a line without the key separator nothing more \
is read: the records before it are produced, then the command fails naming the line.

On success a summary (records, bytes of keys and values, elapsed time, rate) goes to stderr.")]
struct ProduceArgs {
    /// The topic.
    topic: String,

    /// Split each line at the first SEP into key and value (`key<SEP>value`); a line without
    /// SEP is an error. Without this option the whole line is the value and records have no
    /// key.
    #[arg(long, value_name = "SEP")]
    key_separator: Option<String>,

    /// Acknowledgement level to wait for.
    #[arg(long, value_enum, default_value = "durable", value_name = "LEVEL")]
    acks: AcksArg,

    /// Send without a producer id: no InitProducer at start and no sequence numbers, so a
    /// batch retried after a lost answer (a leader change, a dropped connection) may be
    /// stored twice, and a retry may land behind a later batch of its partition. Only for
    /// brokers or proxies that refuse InitProducer, or data where duplicates do not matter.
    #[arg(long)]
    no_idempotence: bool,
}

#[derive(Debug, Args)]
#[command(after_help = "\
Output: one line per record. By default only the value, written as is. --print-offset prefixes \
the record's offset and a tab, --print-key the key and a tab; with both a line is \
OFFSET<TAB>KEY<TAB>VALUE. An absent key or value (tombstone) prints as nothing.

With --json each line is one object: {\"partition\":P,\"offset\":O,\"key\":K,\"value\":V,\
\"timestamp\":T} (timestamp in ms since the Unix epoch). Key and value are UTF-8 strings, or \
null when absent; bytes that are not valid UTF-8 are printed in base64 and the object then \
also has \"key_encoding\":\"base64\" or \"value_encoding\":\"base64\". Records with headers \
also have \"headers\":[{\"key\":..,\"value\":..}].

Records of one partition are printed in offset order; partitions interleave. The command \
exits 0 after --max-records records, after --timeout-ms without a record, or on Ctrl-C or \
SIGTERM. While the broker is unreachable it retries for up to 30 s, saying `reconnecting... \
(ERROR)` on stderr once, and `reconnected` when the broker is back.

With --group G the command is a member of consumer group G: the broker assigns it a share of \
the topic's partitions (all of them when it is the only member) and it reads each from the \
group's committed offset (from the earliest offset when the group has none). The --timeout-ms \
clock starts at the first assignment (a new group's first assignment waits the broker's \
initial delay, 3 s by default). Every record is flushed to stdout as it is printed; the \
offsets of the printed records are committed every 5 s, before a partition moves to another \
member, and on exit (after --max-records, --timeout-ms, Ctrl-C or SIGTERM), synchronously, \
before the command leaves the group. So a second run with the same group prints only newer \
records (at least once: a crash prints again what came after the last commit).")]
struct ConsumeArgs {
    /// The topic.
    topic: String,

    /// Start from the first retained record (default: only records produced from now on).
    #[arg(long, conflicts_with = "offset")]
    from_beginning: bool,

    /// Consume as a member of consumer group G: read the partitions the broker assigns, from
    /// the group's committed offsets, and commit what was printed (see below).
    #[arg(
        long,
        value_name = "G",
        conflicts_with_all = ["from_beginning", "offset", "partition"]
    )]
    group: Option<String>,

    /// Start at offset N in every partition read (combine with --partition to pick one); fails
    /// if a partition's log no longer or not yet holds N.
    #[arg(long, value_name = "N")]
    offset: Option<u64>,

    /// Read only partition P (default: all partitions).
    #[arg(long, value_name = "P")]
    partition: Option<u32>,

    /// Exit after printing N records.
    #[arg(long, value_name = "N")]
    max_records: Option<u64>,

    /// Exit when no record has arrived for MS milliseconds (default: run until Ctrl-C).
    #[arg(long, value_name = "MS")]
    timeout_ms: Option<u64>,

    /// Print each record's key before its value, tab-separated.
    #[arg(long)]
    print_key: bool,

    /// Print each record's offset first, tab-separated.
    #[arg(long)]
    print_offset: bool,

    /// Print each record as one JSON object per line (--print-key and --print-offset are then
    /// ignored: the object has every field).
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Connect { args } = &cli.command {
        return exec_connect(args, &cli.broker);
    }
    init_tracing();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => return fail(&anyhow!("cannot start the async runtime: {error}")),
    };
    let plain_text = cli.tls_ca.is_none();
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if is_broken_pipe(&error) => ExitCode::SUCCESS,
        Err(error) if plain_text && closed_at_connect(&error) => fail(&error.context(
            "the broker closed the connection: if it serves TLS, connect with --tls-ca CA.pem \
             (and --tls-cert/--tls-key when it asks for a client certificate)",
        )),
        Err(error) => fail(&error),
    }
}

/// Whether the connection was closed by the broker before it answered anything (what a
/// plain-text client sees of a TLS port).
fn closed_at_connect(error: &anyhow::Error) -> bool {
    let text = format!("{error:#}");
    // Whatever the transport made of the TLS alert it got back (a closed connection, a broken
    // pipe, a frame of a bad size, ...); not a broker that is down or far away.
    let lower = text.to_lowercase();
    text.contains("cannot reach the broker")
        && ![
            "refused",
            "timed out",
            "timeout",
            "resolve",
            "no route",
            "unreachable",
        ]
        .iter()
        .any(|other| lower.contains(other))
}

/// Prints `error: MESSAGE` on one line.
fn fail(error: &anyhow::Error) -> ExitCode {
    let message = format!("{error:#}").replace(['\n', '\r'], " ");
    eprintln!("error: {message}");
    ExitCode::FAILURE
}

/// A reader that closed our stdout (`| head`) is not a failure.
fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error
        .downcast_ref::<io::Error>()
        .is_some_and(|error| error.kind() == io::ErrorKind::BrokenPipe)
}

fn init_tracing() {
    // Quiet unless asked: stderr carries the one-line error and the produce summary.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(io::stderr().is_terminal())
        .with_writer(io::stderr)
        .init();
}

/// Says on stderr when the broker goes away and comes back, which the retry loops of
/// `consume` and `watch` otherwise hide for up to their retry timeout: `reconnecting...
/// (ERROR)` once per outage, then `reconnected`.
fn report_connectivity(client: &Client) {
    let mut changes = client.connectivity();
    tokio::spawn(async move {
        while changes.changed().await.is_ok() {
            let line = match &*changes.borrow_and_update() {
                Connectivity::Reconnecting { error } => {
                    format!("reconnecting... ({error})").replace(['\n', '\r'], " ")
                }
                Connectivity::Connected => "reconnected".to_owned(),
            };
            eprintln!("{line}");
        }
    });
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let connect = cli.client_config()?;
    let client = Client::connect_with(&cli.broker, connect.clone()).await?;
    report_connectivity(&client);
    match cli.command {
        Command::Topic(command) => topic(&client, command).await,
        Command::Produce(args) => produce(&client, args).await,
        Command::Consume(args) => match args.group.clone() {
            Some(group) => consume_group(&client, &group, args).await,
            None => consume(&client, args).await,
        },
        Command::Group(command) => group::run(&client, command).await,
        Command::Put(args) => table::put(&client, args).await,
        Command::Get(args) => table::get(&client, args).await,
        Command::History(args) => table::history(&client, args).await,
        Command::Delete(args) => table::delete(&client, args).await,
        Command::Watch(args) => watch::watch(&client, args).await,
        Command::Bench(args) => bench::run(&client, &cli.broker, &connect, args).await,
        Command::Cluster(command) => cluster::run(&client, command).await,
        Command::Acl(command) => acl::run(&client, command).await,
        Command::Connect { .. } => Err(anyhow!("`syncline connect` runs syncline-connect")),
    }
}

/// `syncline connect ARGS`: replaces this process with `syncline-connect ARGS` (the connector
/// runtime is its own crate and binary), found beside this executable, else on PATH. The broker
/// address is passed on unless ARGS name one.
fn exec_connect(args: &[std::ffi::OsString], broker: &str) -> ExitCode {
    use std::os::unix::process::CommandExt as _;
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("syncline-connect")))
        .filter(|path| path.exists());
    let program = beside.unwrap_or_else(|| "syncline-connect".into());
    let mut command = std::process::Command::new(&program);
    // The default address is left to syncline-connect, whose file may name another.
    if broker != "127.0.0.1:7450"
        && !args
            .iter()
            .any(|a| a.to_string_lossy().starts_with("--broker"))
    {
        command.env("SYNCLINE_BROKER", broker);
    }
    let error = command.args(args).exec();
    fail(&anyhow!("cannot run {}: {error}", program.display()))
}

async fn topic(client: &Client, command: TopicCommand) -> anyhow::Result<()> {
    let mut stdout = io::stdout().lock();
    match command {
        TopicCommand::Create(args) => {
            let config = TopicConfig {
                partitions: args.partitions,
                cleanup_policy: match args.cleanup {
                    None | Some(CleanupArg::Delete) => CleanupPolicy::Delete,
                    Some(CleanupArg::Compact) => CleanupPolicy::Compact,
                },
                retention_ms: args.retention_ms,
                retention_bytes: args.retention_bytes,
                segment_bytes: args.segment_bytes,
                delete_retention_ms: args.delete_retention_ms,
                min_cleanable_dirty_ratio: args.min_cleanable_dirty_ratio,
                replication_factor: args.replication_factor,
                ..TopicConfig::default()
            };
            let description = client.create_topic(&args.name, config).await?;
            writeln!(
                stdout,
                "created topic {} with {} partition(s)",
                args.name,
                description.partition_count()
            )?;
        }
        TopicCommand::List { long } => {
            let topics = client.list_topics().await?;
            if long {
                let mut rows = vec![vec![
                    "TOPIC".to_owned(),
                    "PARTITIONS".to_owned(),
                    "CLEANUP".to_owned(),
                    "ID".to_owned(),
                ]];
                rows.extend(topics.iter().map(|topic| {
                    vec![
                        topic.name.clone(),
                        topic.partitions.to_string(),
                        topic.cleanup_policy.to_string(),
                        topic.topic_id.clone(),
                    ]
                }));
                stdout.write_all(table(&rows).as_bytes())?;
            } else {
                for topic in topics {
                    writeln!(stdout, "{}", topic.name)?;
                }
            }
        }
        TopicCommand::Describe { name } => {
            let description = client.describe_topic(&name).await?;
            let config = &description.config;
            let setting =
                |value: Option<i64>| value.map_or("default".to_owned(), |v| v.to_string());
            writeln!(stdout, "topic: {}", description.name)?;
            writeln!(stdout, "id: {}", description.topic_id)?;
            writeln!(stdout, "partitions: {}", description.partition_count())?;
            writeln!(stdout, "cleanup: {}", config.cleanup_policy)?;
            writeln!(stdout, "retention-ms: {}", setting(config.retention_ms))?;
            writeln!(
                stdout,
                "retention-bytes: {}",
                setting(config.retention_bytes)
            )?;
            let unsigned =
                |value: Option<u64>| value.map_or("default".to_owned(), |v| v.to_string());
            writeln!(stdout, "segment-bytes: {}", unsigned(config.segment_bytes))?;
            let is_table = config.cleanup_policy == CleanupPolicy::Compact;
            if is_table {
                writeln!(
                    stdout,
                    "delete-retention-ms: {}",
                    unsigned(config.delete_retention_ms)
                )?;
                writeln!(
                    stdout,
                    "min-cleanable-dirty-ratio: {}",
                    config
                        .min_cleanable_dirty_ratio
                        .map_or("default".to_owned(), |v| v.to_string())
                )?;
            }
            writeln!(stdout)?;
            let mut header = vec![
                "PARTITION",
                "START",
                "DURABLE",
                "END",
                "SIZE-BYTES",
                "SEGMENTS",
            ];
            if is_table {
                header.extend([
                    "DIRTY-RATIO",
                    "LAST-COMPACTION",
                    "RECLAIMED-BYTES",
                    "HORIZON",
                    "KEPT-FOR-PRODUCERS",
                ]);
            }
            header.push("ERROR");
            let mut rows = vec![header.into_iter().map(str::to_owned).collect::<Vec<_>>()];
            for partition in &description.partitions {
                let mut row = vec![
                    partition.partition.to_string(),
                    partition.log_start_offset.to_string(),
                    partition.durable_offset.to_string(),
                    partition.log_end_offset.to_string(),
                    partition.size_bytes.to_string(),
                    partition.segments.to_string(),
                ];
                if is_table {
                    row.push(format!("{:.2}", partition.dirty_ratio));
                    row.push(match partition.last_compaction_ms {
                        0 => "never".to_owned(),
                        ms => format_age(ms),
                    });
                    row.push(partition.bytes_reclaimed.to_string());
                    row.push(partition.compaction_horizon.to_string());
                    row.push(partition.records_kept_for_producers.to_string());
                }
                row.push(partition.error.clone().unwrap_or_default());
                rows.push(row);
            }
            stdout.write_all(table(&rows).as_bytes())?;
        }
        TopicCommand::Delete { name } => {
            client.delete_topic(&name).await?;
            writeln!(stdout, "deleted topic {name}")?;
        }
        TopicCommand::Reassign(args) => operations::reassign(client, args).await?,
        TopicCommand::Compact { name, no_roll } => {
            let outcomes = client.compact_topic(&name, !no_roll).await?;
            let mut rows = vec![[
                "PARTITION",
                "BYTES-BEFORE",
                "BYTES-AFTER",
                "RECORDS-REMOVED",
                "DELETES-REMOVED",
                "KEPT-FOR-PRODUCERS",
                "SEGMENTS",
                "ERROR",
            ]
            .map(str::to_owned)
            .to_vec()];
            let (mut before, mut after, mut failed) = (0u64, 0u64, 0usize);
            let mut kept_for_producers = 0u64;
            for outcome in &outcomes {
                before += outcome.bytes_before;
                after += outcome.bytes_after;
                kept_for_producers += outcome.records_kept_for_producers;
                failed += usize::from(outcome.error.is_some());
                rows.push(vec![
                    outcome.partition.to_string(),
                    outcome.bytes_before.to_string(),
                    outcome.bytes_after.to_string(),
                    outcome.records_removed.to_string(),
                    outcome.tombstones_removed.to_string(),
                    outcome.records_kept_for_producers.to_string(),
                    format!("{} -> {}", outcome.segments_before, outcome.segments_after),
                    outcome.error.clone().unwrap_or_default(),
                ]);
            }
            stdout.write_all(table(&rows).as_bytes())?;
            writeln!(
                stdout,
                "compacted {name}: {before} -> {after} bytes ({} reclaimed)",
                before.saturating_sub(after)
            )?;
            if kept_for_producers > 0 {
                writeln!(
                    stdout,
                    "kept {kept_for_producers} superseded record(s): they are recent writes of \
                     idempotent producers, kept whole so a retry is still recognised after a \
                     broker restart; a later compaction removes them once those producers have \
                     not written for 2 minutes"
                )?;
            }
            if failed > 0 {
                stdout.flush()?;
                bail!("{failed} partition(s) of {name} could not be compacted (see ERROR)");
            }
        }
    }
    stdout.flush()?;
    Ok(())
}

/// Deliveries awaited in send order by a separate task, so stdin keeps flowing while the
/// broker acknowledges. Bounded: the producer's own memory budget bounds the records in flight,
/// this bounds the futures waiting to be checked.
const PENDING_DELIVERIES_MAX: usize = 65_536;

/// The producer settings of `syncline produce`: idempotent unless `--no-idempotence`.
fn produce_config(args: &ProduceArgs) -> ProducerConfig {
    ProducerConfig {
        acks: match args.acks {
            AcksArg::None => Acks::None,
            AcksArg::Leader => Acks::Leader,
            AcksArg::Durable => Acks::Durable,
        },
        idempotent: !args.no_idempotence,
        ..ProducerConfig::default()
    }
}

async fn produce(client: &Client, args: ProduceArgs) -> anyhow::Result<()> {
    let separator = match &args.key_separator {
        Some(separator) if separator.is_empty() => bail!("--key-separator must not be empty"),
        Some(separator) => Some(separator.as_bytes().to_vec()),
        None => None,
    };
    let producer = client.producer(&args.topic, produce_config(&args)).await?;
    let started = Instant::now();

    let (pending, mut deliveries) = mpsc::channel::<DeliveryFuture>(PENDING_DELIVERIES_MAX);
    let checker = tokio::spawn(async move {
        while let Some(delivery) = deliveries.recv().await {
            delivery.await?;
        }
        Ok::<(), syncline_client::Error>(())
    });

    let mut stdin = BufReader::new(tokio::io::stdin());
    let mut line = Vec::new();
    let mut line_number: u64 = 0;
    let mut records: u64 = 0;
    let mut bytes: u64 = 0;
    let mut bad_line = None;
    loop {
        line.clear();
        let read = stdin
            .read_until(b'\n', &mut line)
            .await
            .context("cannot read stdin")?;
        if read == 0 {
            break;
        }
        line_number += 1;
        let (key, value) =
            match parse_line(strip_line_ending(&line), separator.as_deref(), line_number) {
                Ok(parsed) => parsed,
                Err(error) => {
                    bad_line = Some(error);
                    break;
                }
            };
        let delivery = producer.enqueue(key, Some(value), &[]).await?;
        records += 1;
        bytes += (key.map_or(0, <[u8]>::len) + value.len()) as u64;
        if pending.send(delivery).await.is_err() {
            // The checker stopped at a failed delivery; it reports it below.
            break;
        }
    }
    drop(pending);
    producer.flush().await;
    checker.await.context("delivery checker failed")??;
    if let Some(error) = bad_line {
        return Err(error.into());
    }
    let elapsed = started.elapsed();
    eprintln!("{}", produce_summary(records, bytes, elapsed));
    Ok(())
}

/// `produced N records (B bytes) in S s (R records/s, X <unit>/s)` (one line, to stderr).
fn produce_summary(records: u64, bytes: u64, elapsed: Duration) -> String {
    let seconds = elapsed.as_secs_f64().max(1e-6);
    format!(
        "produced {records} {} ({bytes} bytes) in {:.3} s ({:.0} records/s, {})",
        if records == 1 { "record" } else { "records" },
        elapsed.as_secs_f64(),
        records as f64 / seconds,
        byte_rate(bytes as f64 / seconds),
    )
}

/// A byte rate in B/s, KiB/s or MiB/s.
fn byte_rate(bytes_per_second: f64) -> String {
    const KIB: f64 = 1024.0;
    if bytes_per_second < KIB {
        format!("{bytes_per_second:.0} B/s")
    } else if bytes_per_second < KIB * KIB {
        format!("{:.1} KiB/s", bytes_per_second / KIB)
    } else {
        format!("{:.2} MiB/s", bytes_per_second / (KIB * KIB))
    }
}

async fn consume(client: &Client, args: ConsumeArgs) -> anyhow::Result<()> {
    let (start, offset_reset) = match (args.from_beginning, args.offset) {
        // Retention may pass the first offset between lookup and fetch: start over there.
        (true, _) => (StartOffset::Earliest, OffsetReset::Earliest),
        // An explicit offset that is gone is an error, not a silent skip.
        (false, Some(offset)) => (StartOffset::Offset(offset), OffsetReset::Error),
        (false, None) => (StartOffset::Latest, OffsetReset::Latest),
    };
    let config = ConsumerConfig {
        partitions: args.partition.map(|partition| vec![partition]),
        start,
        offset_reset,
        ..ConsumerConfig::default()
    };
    if args.max_records == Some(0) {
        // Still check that the topic and partition exist.
        client.consumer(&args.topic, config).await?;
        return Ok(());
    }
    let mut consumer = client.consumer(&args.topic, config).await?;
    let idle_timeout = args.timeout_ms.map(Duration::from_millis);
    let format = TextFormat {
        print_offset: args.print_offset,
        print_key: args.print_key,
    };
    let mut stdout = io::BufWriter::new(io::stdout().lock());
    let mut printed: u64 = 0;
    let ctrl_c = stop_signal();
    tokio::pin!(ctrl_c);
    loop {
        let next = match consumer.recv().now_or_never() {
            Some(next) => next,
            None => {
                // Nothing buffered: show what we have before waiting.
                stdout.flush()?;
                let wait = async {
                    match idle_timeout {
                        Some(timeout) => tokio::time::timeout(timeout, consumer.recv()).await.ok(),
                        None => Some(consumer.recv().await),
                    }
                };
                tokio::select! {
                    next = wait => match next {
                        Some(next) => next,
                        None => {
                            // Idle for --timeout-ms. Quiet because the topic is quiet, or
                            // because the broker is gone (the consumer retries silently)?
                            client.describe_topic(&args.topic).await?;
                            break;
                        }
                    },
                    _ = &mut ctrl_c => break,
                }
            }
        };
        let record = match next {
            Some(record) => record?,
            None => break,
        };
        if args.json {
            write_json(&mut stdout, &record)?;
        } else {
            write_text(&mut stdout, &record, format)?;
        }
        printed += 1;
        if args.max_records.is_some_and(|max| printed >= max) {
            break;
        }
    }
    stdout.flush()?;
    Ok(())
}

/// Resolves on Ctrl-C (SIGINT) or SIGTERM.
async fn stop_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            // Without a SIGTERM handler, only Ctrl-C stops the command.
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}

/// How often `consume --group` commits what it printed while running.
const GROUP_COMMIT_INTERVAL: Duration = Duration::from_secs(5);

/// `consume --group`: see the command's help.
async fn consume_group(client: &Client, group: &str, args: ConsumeArgs) -> anyhow::Result<()> {
    let config = GroupConsumerConfig {
        // Commits are made here, after the records are flushed to stdout.
        auto_commit_interval: None,
        offset_reset: OffsetReset::Earliest,
        client_id: Some(format!("syncline-cli/{}", std::process::id())),
        ..GroupConsumerConfig::default()
    };
    let mut consumer = client
        .group_consumer(group, &[args.topic.as_str()], config)
        .await?;
    if args.max_records == Some(0) {
        consumer.close().await?;
        return Ok(());
    }
    let mut events = consumer.events();
    let idle_timeout = args.timeout_ms.map(Duration::from_millis);
    let format = TextFormat {
        print_offset: args.print_offset,
        print_key: args.print_key,
    };
    let mut stdout = io::stdout().lock();
    let mut printed: u64 = 0;
    let mut assigned = !consumer.assignment().is_empty();
    let mut idle_since = tokio::time::Instant::now();
    let mut last_commit = tokio::time::Instant::now();
    let stop = stop_signal();
    tokio::pin!(stop);
    let outcome: anyhow::Result<()> = loop {
        let idle_deadline = match (assigned, idle_timeout) {
            (true, Some(timeout)) => Some(idle_since + timeout),
            _ => None,
        };
        let commit_due = last_commit + GROUP_COMMIT_INTERVAL;
        tokio::select! {
            next = consumer.recv() => {
                let record = match next {
                    Some(Ok(record)) => record,
                    Some(Err(error)) => break Err(error.into()),
                    None => break Ok(()),
                };
                let written = if args.json {
                    write_json(&mut stdout, &record)
                } else {
                    write_text(&mut stdout, &record, format)
                };
                // Flushed before the next record is taken: whatever a commit covers is out.
                if let Err(error) = written.and_then(|()| stdout.flush()) {
                    // This record was taken but not printed, and `close` (like `commit`)
                    // would cover it: stop without committing (as a crash; at least once,
                    // the printed ones after the last commit come again).
                    consumer.abort();
                    return Err(error.into());
                }
                printed += 1;
                idle_since = tokio::time::Instant::now();
                if args.max_records.is_some_and(|max| printed >= max) {
                    break Ok(());
                }
            }
            event = events.recv() => {
                if let Some(Ok(GroupEvent::Assigned(_))) = event {
                    if !assigned {
                        assigned = true;
                        idle_since = tokio::time::Instant::now();
                    }
                }
            }
            () = async {
                match idle_deadline {
                    Some(deadline) => tokio::time::sleep_until(deadline).await,
                    None => std::future::pending().await,
                }
            } => break Ok(()),
            () = tokio::time::sleep_until(commit_due) => {
                if let Err(error) = consumer.commit().await {
                    tracing::warn!(%error, "commit failed; retrying later");
                }
                last_commit = tokio::time::Instant::now();
            }
            () = &mut stop => break Ok(()),
        }
    };
    // Commit what was printed, then leave; report the first failure.
    let closed = consumer.close().await;
    outcome?;
    closed?;
    Ok(())
}

/// How long ago `ms` (since the Unix epoch) was, e.g. `42s ago`.
fn format_age(ms: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let seconds = (now - ms).max(0) / 1000;
    match seconds {
        s if s < 120 => format!("{s}s ago"),
        s if s < 7200 => format!("{}m ago", s / 60),
        s if s < 172_800 => format!("{}h ago", s / 3600),
        s => format!("{}d ago", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_definition_should_be_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn broker_option_should_be_accepted_before_and_after_the_subcommand() {
        let before = Cli::try_parse_from(["syncline", "--broker", "h:1", "topic", "list"]).unwrap();
        let after = Cli::try_parse_from(["syncline", "topic", "list", "--broker", "h:2"]).unwrap();
        assert_eq!(before.broker, "h:1");
        assert_eq!(after.broker, "h:2");
    }

    #[test]
    fn produce_should_be_idempotent_unless_told_not_to_be() {
        let config = |extra: &[&str]| {
            let parsed =
                Cli::try_parse_from([&["syncline", "produce", "t"][..], extra].concat()).unwrap();
            match parsed.command {
                Command::Produce(args) => produce_config(&args),
                other => panic!("{other:?}"),
            }
        };
        assert!(config(&[]).idempotent);
        assert!(!config(&["--no-idempotence"]).idempotent);
        assert_eq!(config(&["--acks", "leader"]).acks, Acks::Leader);
    }

    #[test]
    fn consume_should_reject_from_beginning_with_offset() {
        assert!(Cli::try_parse_from([
            "syncline",
            "consume",
            "t",
            "--from-beginning",
            "--offset",
            "3"
        ])
        .is_err());
        let parsed = Cli::try_parse_from([
            "syncline",
            "consume",
            "t",
            "--partition",
            "1",
            "--max-records",
            "5",
            "--timeout-ms",
            "100",
            "--print-key",
            "--print-offset",
            "--json",
        ])
        .unwrap();
        let Command::Consume(args) = parsed.command else {
            panic!("not consume");
        };
        assert_eq!(args.partition, Some(1));
        assert_eq!(args.max_records, Some(5));
        assert_eq!(args.timeout_ms, Some(100));
        assert!(args.print_key && args.print_offset && args.json);
    }

    #[test]
    fn topic_create_should_accept_negative_retention() {
        let parsed = Cli::try_parse_from([
            "syncline",
            "topic",
            "create",
            "t",
            "--partitions",
            "3",
            "--cleanup",
            "compact",
            "--retention-ms",
            "-1",
            "--retention-bytes",
            "-1",
        ])
        .unwrap();
        let Command::Topic(TopicCommand::Create(args)) = parsed.command else {
            panic!("not topic create");
        };
        assert_eq!(args.partitions, Some(3));
        assert!(matches!(args.cleanup, Some(CleanupArg::Compact)));
        assert_eq!(args.retention_ms, Some(-1));
        assert_eq!(args.retention_bytes, Some(-1));
    }

    #[test]
    fn produce_acks_should_default_to_durable() {
        let parsed = Cli::try_parse_from(["syncline", "produce", "t"]).unwrap();
        let Command::Produce(args) = parsed.command else {
            panic!("not produce");
        };
        assert!(matches!(args.acks, AcksArg::Durable));
        assert!(args.key_separator.is_none());
    }

    #[test]
    fn put_should_take_one_condition_at_most() {
        assert!(Cli::try_parse_from([
            "syncline",
            "put",
            "t",
            "k",
            "v",
            "--expect-version",
            "3",
            "--expect-absent"
        ])
        .is_err());
        let parsed =
            Cli::try_parse_from(["syncline", "put", "t", "k", "v", "--expect-version", "3"])
                .unwrap();
        assert!(matches!(parsed.command, Command::Put(_)));
        for args in [
            &["syncline", "get", "t", "k", "--json"][..],
            &["syncline", "history", "t", "k", "--limit", "5"],
            &["syncline", "delete", "t", "k", "--expect-version", "1"],
            &[
                "syncline",
                "put",
                "t",
                "k",
                "v",
                "--expect-absent",
                "--json",
            ],
        ] {
            Cli::try_parse_from(args).unwrap();
        }
        assert!(Cli::try_parse_from(["syncline", "history", "t", "k", "--limit", "0"]).is_err());
    }

    #[test]
    fn summary_should_report_records_bytes_time_and_rate() {
        assert_eq!(
            produce_summary(1000, 2 * 1024 * 1024, Duration::from_millis(500)),
            "produced 1000 records (2097152 bytes) in 0.500 s (2000 records/s, 4.00 MiB/s)"
        );
        assert_eq!(
            produce_summary(1, 15, Duration::from_secs(1)),
            "produced 1 record (15 bytes) in 1.000 s (1 records/s, 15 B/s)"
        );
        assert_eq!(byte_rate(2048.0), "2.0 KiB/s");
    }
}
