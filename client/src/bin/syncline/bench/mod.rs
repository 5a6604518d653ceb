//! `syncline bench`: a load generator and verifier, in the spirit of
//! kafka-producer-perf-test, iggy-bench and `nats bench`.
//!
//! Producers (each with its own connection and [`Producer`]) send records whose value carries
//! a checked header ([`payload`]); consumers (each with its own connection, reading a disjoint
//! share of the partitions) read them back and verify each one, so a run also proves that
//! nothing was lost, duplicated, reordered or corrupted. Send -> ack latency is measured per
//! record as deliveries complete ([`produce`]); send -> consumed latency per record from the
//! send time in its header ([`consume`]).
//!
//! The run ends when every producer is done and each consumer has read its partitions up to
//! the end offsets the producers left (or got nothing for [`consume::DRAIN_IDLE_TIMEOUT`]).
//! Then the report goes to stdout (human or `--json`), the plot to `--plot`, a fresh topic is
//! deleted, and a failed verification fails the command.

mod consume;
mod payload;
mod plot;
mod produce;
mod progress;
mod report;

use std::hash::BuildHasher as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use clap::Args;
use syncline_client::{
    Client, ClientConfig, Code, ConsumerConfig, OffsetReset, Producer, ProducerConfig, StartOffset,
    TopicConfig,
};
use tokio::sync::watch;
use tokio::task::JoinSet;

use self::consume::{ConsumeOutcome, ConsumerPlan, EndOffsets};
use self::payload::{Clock, Keys, VerdictCounts, Verifier, HEADER_LEN, RECORDS_PER_PRODUCER_MAX};
use self::produce::{ProduceOutcome, ProducerPlan};
use self::report::{latency_histogram, Report, ReportConfig, Throughput, Verification};
use crate::AcksArg;

/// Records a run sends without `--records` or `--duration`.
const RECORDS_DEFAULT: u64 = 1_000_000;
/// Each producer holds a connection and up to the client's 64 MiB buffer of records.
const PRODUCERS_MAX: u32 = 256;
/// Each consumer holds a connection and up to 16 fetch responses of 4 MiB.
const CONSUMERS_MAX: u32 = 256;
/// Largest record: the broker's default batch limit is 8 MiB; 1 MiB leaves room and is far
/// beyond what a throughput benchmark uses.
const RECORD_SIZE_MAX: usize = 1024 * 1024;
/// Most distinct keys; the verifier keeps one order slot per (producer, key).
const KEYS_MAX: u32 = 1_000_000;
/// Most (producer, key) order slots: 8 bytes each, so 128 MiB at most.
const STREAMS_MAX: u64 = 16 * 1024 * 1024;
/// Longest `--duration`: a day.
const DURATION_MAX_SECS: u64 = 24 * 60 * 60;

const BENCH_AFTER_HELP: &str = "\
Producers send records with a verification header in the value (magic, producer id, \
sequence, send time, CRC-32C) padded to --record-size; consumers read them back and check each \
one, so the run also proves nothing was lost, duplicated, reordered (per producer and key, or \
per producer and partition without keys) or corrupted. Partition p is read by consumer \
p mod --consumers. A fresh topic is read from its start; an existing --topic from its end \
offsets at the start of the run. Once the producers are done, the consumers read up to the \
end offsets the producers left; a consumer that gets nothing for 10 s stops, and what it did \
not read counts as lost.

Output: progress on stderr (a live bar on a terminal, else a line per second), then a summary \
on stdout: records/s and MB/s (1 MB = 10^6 bytes of keys and values) for produce and consume, \
produce latency (send -> ack, per record; and request -> ack, per batch) and end-to-end latency \
(send -> consumed) percentiles. Rates are \
over the time from the start of the run to the last acknowledgement or the last record consumed.

With --json stdout holds one object: {\"config\": {...}, \"produce\": {\"records\", \"bytes\", \
\"elapsed_secs\", \"records_per_sec\", \"mb_per_sec\", \"latency_ms\": {\"p50\", \"p90\", \"p99\", \
\"p999\", \"max\", \"mean\"}}, \"batch_latency_ms\": {the same percentiles per produce request, \
request -> ack}, \"consume\": {the same keys; end-to-end latency} or null with --consumers 0, \"verify\": {\"checked\", \"produced\", \"produce_errors\", \"consumed\", \"lost\", \
\"duplicated\", \"reordered\", \"corrupt\"}}.

Exit status: 0 when every record was acknowledged and read back exactly once, in order and \
intact; 1 otherwise, after the report, with `error: verification failed: N records lost, ...` \
on stderr; 1 with `error: ...` when the run cannot go on (broker unreachable, Ctrl-C, ...); \
2 on a usage error.";

/// `syncline bench` flags.
#[derive(Debug, Args)]
#[command(after_help = BENCH_AFTER_HELP)]
pub struct BenchArgs {
    /// Producers, each with its own connection; the records are split evenly between them.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub producers: u32,

    /// Consumers, each with its own connection and a disjoint share of the partitions (at most
    /// one per partition); 0 = produce only (nothing is read back or verified).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub consumers: u32,

    /// Partitions of the topic the bench creates [default: 1]. An existing --topic keeps its
    /// own count (this must then match it, if given).
    #[arg(long, value_name = "N")]
    pub partitions: Option<u32>,

    /// Replicas per partition of the topic the bench creates (default: the broker's
    /// default_replication_factor, min(3, cluster nodes)); with R > 1 each partition is a Raft
    /// group over R nodes and `--acks durable` waits for a majority of them to fsync. At most
    /// the number of nodes. An existing --topic keeps its own.
    #[arg(long, value_name = "R")]
    pub replication_factor: Option<u32>,

    /// Value bytes per record, 32 (the verification header) to 1MiB; units accepted (1KiB).
    #[arg(
        long,
        default_value = "100",
        value_name = "SIZE",
        value_parser = syncline_proto::size::parse_size_usize
    )]
    pub record_size: usize,

    /// Records to send over all producers [default: 1000000 unless --duration].
    #[arg(long, value_name = "N", conflicts_with = "duration")]
    pub records: Option<u64>,

    /// Send for SECS seconds instead of a number of records.
    #[arg(long, value_name = "SECS")]
    pub duration: Option<u64>,

    /// Largest batch (the producer's batch_bytes_max), in bytes or with a unit (256KiB).
    #[arg(
        long,
        default_value = "1MiB",
        value_name = "SIZE",
        value_parser = syncline_proto::size::parse_size_usize
    )]
    pub batch_bytes: usize,

    /// How long a batch waits for more records after its first (the producer's linger).
    #[arg(long, default_value_t = 5, value_name = "MS")]
    pub linger_ms: u64,

    /// Produce requests in flight per producer (the producer's in_flight_max).
    #[arg(long, default_value_t = 8, value_name = "N")]
    pub in_flight: usize,

    /// Acknowledgement level the producers wait for.
    #[arg(long, value_enum, default_value = "durable", value_name = "LEVEL")]
    pub acks: AcksArg,

    /// Producers send without a producer id (no InitProducer, no sequence numbers), as
    /// `produce --no-idempotence`: measures what idempotence costs. A retried batch may then
    /// be stored twice, which the verifier reports as duplicated.
    #[arg(long)]
    pub no_idempotence: bool,

    /// Pin the send rate to R records/s over all producers, paced by a schedule (default: as
    /// fast as possible).
    #[arg(long, value_name = "R")]
    pub rate: Option<u64>,

    /// Send keys k0..k{K-1}, in turn (order is then checked per producer and key); 0 = records
    /// without keys (order checked per producer and partition).
    #[arg(long, default_value_t = 0, value_name = "K")]
    pub keys: u32,

    /// Topic to use, created if missing, never deleted; it must have no other writers during
    /// the run (default: a fresh topic `bench-<random>`, deleted after the run).
    #[arg(long, value_name = "T")]
    pub topic: Option<String>,

    /// Keep the fresh topic after the run.
    #[arg(long)]
    pub keep_topic: bool,

    /// Print the report as one JSON object on stdout (progress stays on stderr).
    #[arg(long)]
    pub json: bool,

    /// Also draw throughput over time and the latency percentiles to this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,

    /// Test hook for the verifier: consumers drop every N-th record they receive before
    /// verification, so a run must report those records lost and fail.
    #[arg(long, hide = true, value_name = "N")]
    pub debug_skip_every: Option<u64>,
}

/// Progress counters shared by producers, consumers and the progress display.
#[derive(Debug, Default)]
pub struct Counters {
    /// Records acknowledged.
    pub produced: AtomicU64,
    /// Records received by consumers.
    pub consumed: AtomicU64,
}

impl BenchArgs {
    /// `--records`, or its default when neither it nor `--duration` is given.
    fn records(&self) -> Option<u64> {
        match (self.records, self.duration) {
            (Some(records), _) => Some(records),
            (None, Some(_)) => None,
            (None, None) => Some(RECORDS_DEFAULT),
        }
    }

    fn acks(&self) -> (syncline_client::Acks, &'static str) {
        match self.acks {
            AcksArg::None => (syncline_client::Acks::None, "none"),
            AcksArg::Leader => (syncline_client::Acks::Leader, "leader"),
            AcksArg::Durable => (syncline_client::Acks::Durable, "durable"),
        }
    }

    fn producer_config(&self) -> ProducerConfig {
        ProducerConfig {
            linger: Duration::from_millis(self.linger_ms),
            batch_bytes_max: self.batch_bytes,
            in_flight_max: self.in_flight,
            acks: self.acks().0,
            idempotent: !self.no_idempotence,
            ..ProducerConfig::default()
        }
    }

    /// Checks each flag against its bounds and the relations between them (the partition
    /// count of an existing topic is checked later).
    fn validate(&self) -> anyhow::Result<()> {
        let within = |flag: &str, value: u64, min: u64, max: u64| {
            if (min..=max).contains(&value) {
                Ok(())
            } else {
                Err(anyhow::anyhow!(
                    "--{flag} {value} is outside [{min}, {max}]"
                ))
            }
        };
        within("producers", self.producers.into(), 1, PRODUCERS_MAX.into())?;
        within("consumers", self.consumers.into(), 0, CONSUMERS_MAX.into())?;
        if let Some(partitions) = self.partitions {
            within("partitions", partitions.into(), 1, u32::MAX.into())?;
        }
        // A fresh topic gets --partitions or 1; an existing one is checked once described.
        let partitions = self.partitions.or(self.topic.is_none().then_some(1));
        if let Some(partitions) = partitions.filter(|&partitions| self.consumers > partitions) {
            bail!(
                "--consumers {} is more than the {} of the topic: each consumer reads at least \
                 one partition",
                self.consumers,
                report::plural(partitions.into(), "partition")
            );
        }
        within(
            "record-size",
            self.record_size as u64,
            HEADER_LEN as u64,
            RECORD_SIZE_MAX as u64,
        )?;
        if let Some(records) = self.records {
            let max = RECORDS_PER_PRODUCER_MAX.saturating_mul(self.producers.into());
            within("records", records, 1, max)?;
        }
        if let Some(duration) = self.duration {
            within("duration", duration, 1, DURATION_MAX_SECS)?;
        }
        if let Some(rate) = self.rate {
            within("rate", rate, 1, u64::MAX)?;
        }
        within("keys", self.keys.into(), 0, KEYS_MAX.into())?;
        let streams = u64::from(self.producers) * u64::from(self.keys);
        if streams > STREAMS_MAX {
            bail!(
                "--producers {} times --keys {} is {streams}, above the verifier's limit of \
                 {STREAMS_MAX} (producer, key) pairs",
                self.producers,
                self.keys
            );
        }
        if let Some(every) = self.debug_skip_every {
            within("debug-skip-every", every, 1, u64::MAX)?;
        }
        self.producer_config()
            .validate()
            .context("invalid --batch-bytes, --linger-ms or --in-flight")?;
        Ok(())
    }
}

/// The topic a run uses.
#[derive(Debug)]
struct BenchTopic {
    name: String,
    created: bool,
    /// Delete it after the run.
    delete: bool,
    partitions: u32,
    /// Where consumers start: `None` for a created topic (its start), else each partition's
    /// end offset when the run began.
    starts: Option<Vec<u64>>,
}

/// A fresh topic name: `bench-` and 16 hex digits of per-process randomness.
fn fresh_topic_name() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos());
    let random =
        std::collections::hash_map::RandomState::new().hash_one((nanos, std::process::id()));
    format!("bench-{random:016x}")
}

async fn open_topic(client: &Client, args: &BenchArgs) -> anyhow::Result<BenchTopic> {
    let create = |name: String| async {
        let partitions = args.partitions.unwrap_or(1);
        let config = TopicConfig {
            replication_factor: args.replication_factor,
            ..TopicConfig::with_partitions(partitions)
        };
        client
            .create_topic(&name, config)
            .await
            .with_context(|| format!("cannot create topic `{name}`"))?;
        anyhow::Ok(BenchTopic {
            name,
            created: true,
            delete: false,
            partitions,
            starts: None,
        })
    };
    let Some(name) = &args.topic else {
        let mut topic = create(fresh_topic_name()).await?;
        topic.delete = !args.keep_topic;
        return Ok(topic);
    };
    match client.describe_topic(name).await {
        Ok(description) => {
            let partitions = description.partition_count();
            if args.partitions.is_some_and(|wanted| wanted != partitions) {
                bail!(
                    "topic `{name}` has {partitions} partitions, not the {} of --partitions",
                    args.partitions.unwrap_or_default()
                );
            }
            let mut starts = vec![0; partitions as usize];
            for partition in &description.partitions {
                if let Some(start) = starts.get_mut(partition.partition as usize) {
                    *start = partition.log_end_offset;
                }
            }
            Ok(BenchTopic {
                name: name.clone(),
                created: false,
                delete: false,
                partitions,
                starts: Some(starts),
            })
        }
        Err(error) if error.code() == Some(Code::NotFound) => create(name.clone()).await,
        Err(error) => Err(error.into()),
    }
}

/// Runs the bench: see the module doc.
pub async fn run(
    client: &Client,
    broker: &str,
    connect: &ClientConfig,
    args: BenchArgs,
) -> anyhow::Result<()> {
    args.validate()?;
    let topic = open_topic(client, &args).await?;
    // Ctrl-C abandons the run (dropping `measure` stops every task) but still cleans up.
    let result = tokio::select! {
        result = measure(client, broker, connect, &args, &topic) => result,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    if topic.delete {
        if let Err(error) = client.delete_topic(&topic.name).await {
            tracing::warn!(topic = %topic.name, %error, "cannot delete the bench topic");
        }
    }
    let measured = result?;
    let report = &measured.report;
    {
        let mut stdout = std::io::stdout().lock();
        if args.json {
            serde_json::to_writer(&mut stdout, report)?;
            writeln!(stdout)?;
        } else {
            stdout.write_all(report.human().as_bytes())?;
        }
        stdout.flush()?;
    }
    if let Some(path) = &args.plot {
        let config = &report.config;
        let title = format!(
            "syncline bench: {}, {}, {}, {} B records, acks {}",
            report::plural(config.producers.into(), "producer"),
            report::plural(config.consumers.into(), "consumer"),
            report::plural(config.partitions.into(), "partition"),
            config.record_size,
            config.acks
        );
        plot::draw(
            path,
            &title,
            &measured.samples,
            &measured.produce_latency,
            measured.end_to_end_latency.as_ref(),
        )?;
    }
    if let Some(failure) = report.verify.failure() {
        return Err(match &measured.first_produce_error {
            Some(error) => anyhow::anyhow!("{failure}; first failed delivery: {error}"),
            None => anyhow::anyhow!(failure),
        });
    }
    Ok(())
}

/// A finished run.
struct Measured {
    report: Report,
    samples: Vec<plot::Sample>,
    produce_latency: hdrhistogram::Histogram<u64>,
    end_to_end_latency: Option<hdrhistogram::Histogram<u64>>,
    first_produce_error: Option<syncline_client::Error>,
}

async fn measure(
    client: &Client,
    broker: &str,
    connect: &ClientConfig,
    args: &BenchArgs,
    topic: &BenchTopic,
) -> anyhow::Result<Measured> {
    let partitions = topic.partitions;
    if args.consumers > partitions {
        bail!(
            "--consumers {} is more than the {} of topic `{}`: each consumer reads at least one \
             partition",
            args.consumers,
            report::plural(partitions.into(), "partition"),
            topic.name
        );
    }
    let clock = Clock::start();
    let keys = Arc::new(Keys::new(args.keys, partitions));
    let verifier = Arc::new(Verifier::new(
        args.producers,
        partitions,
        args.record_size,
        keys.clone(),
    ));
    let counters = Arc::new(Counters::default());

    // Connect everything first, so the clock starts on a ready system.
    let mut consumers = Vec::new();
    for id in 0..args.consumers {
        let assignment: Vec<u32> = (id..partitions).step_by(args.consumers as usize).collect();
        let (start, partition_starts) = match &topic.starts {
            None => (StartOffset::Earliest, Default::default()),
            Some(starts) => (
                StartOffset::Latest,
                assignment
                    .iter()
                    .map(|&partition| {
                        let offset = starts.get(partition as usize).copied().unwrap_or(0);
                        (partition, StartOffset::Offset(offset))
                    })
                    .collect(),
            ),
        };
        let config = ConsumerConfig {
            partitions: Some(assignment),
            start,
            partition_starts,
            // Never skip silently: a gap must show up as lost records.
            offset_reset: OffsetReset::Error,
            ..ConsumerConfig::default()
        };
        let connection = Client::connect_with(broker, connect.clone()).await?;
        consumers.push(connection.consumer(&topic.name, config).await?);
    }
    let mut producers: Vec<Producer> = Vec::new();
    for _ in 0..args.producers {
        let connection = Client::connect_with(broker, connect.clone()).await?;
        let producer = connection
            .producer(&topic.name, args.producer_config())
            .await?;
        if producer.partitions() != partitions {
            bail!(
                "topic `{}` changed its partition count during the run",
                topic.name
            );
        }
        producers.push(producer);
    }

    let started = Instant::now();
    let records = args.records();
    let deadline = args
        .duration
        .map(|seconds| started + Duration::from_secs(seconds));
    // A failed run drops `stop_progress`, which stops the progress thread too.
    let (stop_progress, progress_stopped) = std::sync::mpsc::channel();
    let progress = {
        let counters = counters.clone();
        std::thread::spawn(move || progress::run(counters, started, records, progress_stopped))
    };
    let (end_offsets, end_offsets_received) = watch::channel::<EndOffsets>(None);
    let mut consuming = JoinSet::new();
    for (id, consumer) in consumers.into_iter().enumerate() {
        let plan = ConsumerPlan {
            id: id as u32,
            verifier: verifier.clone(),
            skip_every: args.debug_skip_every,
            clock,
            counters: counters.clone(),
            end_offsets: end_offsets_received.clone(),
        };
        consuming.spawn(consume::run(consumer, plan));
    }
    let mut producing = JoinSet::new();
    // Handles kept to read the producers' per-batch latency after the run.
    let producer_handles: Vec<Producer> = producers.clone();
    for (id, producer) in producers.into_iter().enumerate() {
        let id = id as u32;
        let plan = ProducerPlan {
            id,
            records: records.map_or(RECORDS_PER_PRODUCER_MAX, |records| {
                let producers = u64::from(args.producers);
                records / producers + u64::from(u64::from(id) < records % producers)
            }),
            deadline,
            rate: args
                .rate
                .map(|rate| rate as f64 / f64::from(args.producers)),
            record_size: args.record_size,
            keys: keys.clone(),
            clock,
            started,
            counters: counters.clone(),
        };
        producing.spawn(produce::run(producer, plan));
    }

    // Wait for the producers; a consumer that fails meanwhile ends the run at once.
    let mut produced: Vec<ProduceOutcome> = Vec::new();
    let mut consumed: Vec<ConsumeOutcome> = Vec::new();
    while !producing.is_empty() {
        tokio::select! {
            Some(joined) = producing.join_next() => {
                produced.push(joined.context("a producer task failed")??);
            }
            Some(joined) = consuming.join_next(), if !consuming.is_empty() => {
                consumed.push(joined.context("a consumer task failed")??);
            }
        }
    }
    let description = client.describe_topic(&topic.name).await?;
    let mut ends = vec![0; partitions as usize];
    for partition in &description.partitions {
        if let Some(end) = ends.get_mut(partition.partition as usize) {
            *end = partition.log_end_offset;
        }
    }
    let _ = end_offsets.send(Some(Arc::new(ends)));
    while let Some(joined) = consuming.join_next().await {
        consumed.push(joined.context("a consumer task failed")??);
    }
    let _ = stop_progress.send(());
    let samples = tokio::task::spawn_blocking(move || progress.join().unwrap_or_default())
        .await
        .unwrap_or_default();

    let mut batch_latency = latency_histogram();
    for producer in &producer_handles {
        if let Some(histogram) = producer.batch_latency() {
            batch_latency.add(&histogram).ok();
        }
    }
    drop(producer_handles);
    let mut produce_latency = latency_histogram();
    let mut verify = Verification {
        checked: args.consumers > 0,
        ..Verification::default()
    };
    let mut acknowledged = 0;
    let mut acknowledged_bytes = 0;
    let mut last_acknowledged_at = None;
    let mut first_produce_error = None;
    for outcome in &mut produced {
        produce_latency.add(&outcome.latency).ok();
        acknowledged += outcome.acknowledged;
        acknowledged_bytes += outcome.acknowledged_bytes;
        last_acknowledged_at = last_acknowledged_at.max(outcome.last_acknowledged_at);
        verify.produced += outcome.sent;
        verify.produce_errors += outcome.failed;
        if first_produce_error.is_none() {
            first_produce_error = outcome.first_error.take();
        }
        if verify.checked {
            verify.lost += verifier.lost(outcome.id, outcome.sent);
        }
    }
    let produce = Throughput::new(
        acknowledged,
        acknowledged_bytes,
        last_acknowledged_at.map_or(started.elapsed(), |at| at - started),
        &produce_latency,
    );
    let (consume, end_to_end_latency) = if verify.checked {
        let mut latency = latency_histogram();
        let mut counts = VerdictCounts::default();
        let mut bytes = 0;
        let mut last_record_at = None;
        for outcome in &consumed {
            latency.add(&outcome.latency).ok();
            counts.add(&outcome.counts);
            bytes += outcome.bytes;
            last_record_at = last_record_at.max(outcome.last_record_at);
        }
        verify.consumed = counts.checked;
        verify.duplicated = counts.duplicated;
        verify.reordered = counts.reordered;
        verify.corrupt = counts.corrupt;
        let elapsed = last_record_at.map_or(started.elapsed(), |at| at - started);
        (
            Some(Throughput::new(counts.checked, bytes, elapsed, &latency)),
            Some(latency),
        )
    } else {
        (None, None)
    };
    let report = Report {
        config: ReportConfig {
            broker: broker.to_owned(),
            topic: topic.name.clone(),
            topic_created: topic.created,
            producers: args.producers,
            consumers: args.consumers,
            partitions,
            record_size: args.record_size,
            records,
            duration_secs: args.duration,
            batch_bytes: args.batch_bytes,
            linger_ms: args.linger_ms,
            in_flight: args.in_flight,
            acks: args.acks().1,
            idempotent: !args.no_idempotence,
            rate: args.rate,
            keys: args.keys,
            debug_skip_every: args.debug_skip_every,
        },
        produce,
        batch_latency_ms: report::Percentiles::of(&batch_latency),
        consume,
        verify,
    };
    Ok(Measured {
        report,
        samples,
        produce_latency,
        end_to_end_latency,
        first_produce_error,
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::{Cli, Command};

    fn parse(args: &[&str]) -> Result<BenchArgs, clap::Error> {
        let mut argv = vec!["syncline", "bench"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv)?.command {
            Command::Bench(args) => Ok(args),
            other => panic!("not bench: {other:?}"),
        }
    }

    #[test]
    fn defaults_should_be_one_to_one_million_durable_unkeyed_fresh_topic() {
        let args = parse(&[]).unwrap();
        assert_eq!((args.producers, args.consumers), (1, 1));
        assert_eq!(args.partitions, None);
        assert_eq!(args.record_size, 100);
        assert_eq!(args.records(), Some(1_000_000));
        assert_eq!(args.duration, None);
        assert_eq!(args.batch_bytes, 1024 * 1024);
        assert_eq!(args.linger_ms, 5);
        assert_eq!(args.in_flight, 8);
        assert_eq!(args.acks().1, "durable");
        assert_eq!(args.rate, None);
        assert_eq!(args.keys, 0);
        assert_eq!(args.topic, None);
        assert!(!args.json && !args.keep_topic);
        assert_eq!(args.plot, None);
        assert_eq!(args.debug_skip_every, None);
        assert!(args.producer_config().idempotent);
        args.validate().unwrap();
    }

    #[test]
    fn every_flag_should_parse() {
        let args = parse(&[
            "--producers",
            "4",
            "--consumers",
            "0",
            "--partitions",
            "8",
            "--record-size",
            "1024",
            "--duration",
            "30",
            "--batch-bytes",
            "65536",
            "--linger-ms",
            "0",
            "--in-flight",
            "32",
            "--acks",
            "leader",
            "--no-idempotence",
            "--rate",
            "50000",
            "--keys",
            "100",
            "--topic",
            "t",
            "--json",
            "--plot",
            "out.svg",
            "--debug-skip-every",
            "7",
            "--broker",
            "h:1",
        ])
        .unwrap();
        assert_eq!((args.producers, args.consumers), (4, 0));
        assert_eq!(args.partitions, Some(8));
        assert_eq!(args.record_size, 1024);
        assert_eq!((args.records(), args.duration), (None, Some(30)));
        assert_eq!(
            (args.batch_bytes, args.linger_ms, args.in_flight),
            (65536, 0, 32)
        );
        assert_eq!(args.acks().1, "leader");
        assert_eq!((args.rate, args.keys), (Some(50_000), 100));
        assert_eq!(args.topic.as_deref(), Some("t"));
        assert!(args.json);
        assert_eq!(args.plot, Some(PathBuf::from("out.svg")));
        assert_eq!(args.debug_skip_every, Some(7));
        args.validate().unwrap();
        let producer = args.producer_config();
        assert_eq!(producer.acks, syncline_client::Acks::Leader);
        assert_eq!(producer.linger, Duration::ZERO);
        assert_eq!(producer.batch_bytes_max, 65536);
        assert_eq!(producer.in_flight_max, 32);
        assert!(!producer.idempotent);
    }

    #[test]
    fn records_and_duration_should_conflict() {
        assert!(parse(&["--records", "10", "--duration", "1"]).is_err());
        assert!(parse(&["--acks", "all"]).is_err());
    }

    #[test]
    fn skip_hook_should_be_hidden_from_help() {
        use clap::CommandFactory as _;
        let mut command = Cli::command();
        let bench = command.find_subcommand_mut("bench").unwrap();
        let help = bench.render_long_help().to_string();
        assert!(!help.contains("debug-skip-every"), "{help}");
        for flag in [
            "--producers",
            "--consumers",
            "--rate",
            "--plot",
            "--json",
            "--keys",
        ] {
            assert!(help.contains(flag), "{flag} missing from help");
        }
    }

    #[test]
    fn validation_should_name_the_flag_and_bounds() {
        let cases: [(&[&str], &str); 10] = [
            (&["--producers", "0"], "--producers 0 is outside [1, 256]"),
            (
                &["--consumers", "1000"],
                "--consumers 1000 is outside [0, 256]",
            ),
            (
                &["--record-size", "31"],
                "--record-size 31 is outside [32, 1048576]",
            ),
            (&["--records", "0"], "--records 0 is outside"),
            (&["--duration", "0"], "--duration 0 is outside"),
            (&["--rate", "0"], "--rate 0 is outside"),
            (&["--keys", "1000001"], "--keys 1000001 is outside"),
            (
                &["--consumers", "3", "--partitions", "2"],
                "more than the 2 partitions",
            ),
            (&["--batch-bytes", "10"], "batch_bytes_max"),
            (
                &["--debug-skip-every", "0"],
                "--debug-skip-every 0 is outside",
            ),
        ];
        for (flags, expected) in cases {
            let error = parse(flags).unwrap().validate().unwrap_err();
            let message = format!("{error:#}");
            assert!(message.contains(expected), "{flags:?}: {message}");
        }
        // Without --partitions a fresh topic has one partition.
        let error = parse(&["--consumers", "2"])
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(
            error.to_string().contains("more than the 1 partition of"),
            "{error}"
        );
        // An existing topic's count is not known yet.
        parse(&["--consumers", "2", "--topic", "t"])
            .unwrap()
            .validate()
            .unwrap();
        let error = parse(&["--producers", "256", "--keys", "1000000"])
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(
            error.to_string().contains("(producer, key) pairs"),
            "{error}"
        );
    }

    #[test]
    fn help_should_state_the_drain_timeout_in_force() {
        let stated = format!(
            "nothing for {} s stops",
            consume::DRAIN_IDLE_TIMEOUT.as_secs()
        );
        assert!(BENCH_AFTER_HELP.contains(&stated));
    }

    #[test]
    fn fresh_topic_names_should_be_valid_and_differ() {
        let first = fresh_topic_name();
        assert!(first.starts_with("bench-") && first.len() == 22, "{first}");
        assert!(first.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
        assert_ne!(first, fresh_topic_name());
    }
}
