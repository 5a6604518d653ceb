//! Compaction benchmarks over loopback gRPC against in-process brokers (same code as the
//! `syncline-broker` binary).
//!
//! - `bootstrap_1m_keys`: how long a replica takes to load a table of 1 M keys (3 versions
//!   each, plus some deleted keys) into a `HashMap` key -> (version, value): by replaying the
//!   full history with `Fetch` (before compaction), with the `Snapshot` RPC, and by replaying
//!   the compacted log. Compare `snapshot` with `replay_full_history` from the same run.
//! - `cleaner`: one `CompactTopic` pass with the throttle off (`compact_pass`, in bytes of input
//!   per second), and produce throughput to a plain topic alone and while another task loops
//!   `CompactTopic` on a table with the default 128 MiB/s budget and with no budget. Compare the
//!   two `produce_while_compacting_*` with `produce_alone` from the same run.
//!
//! Every bootstrap variant is checked (untimed) to end with exactly 1 M keys holding their latest
//! values at the same versions, so a broken RPC cannot make it fast by returning nothing.
//! Brokers run with the background cleaner's interval set to an hour, so only the passes the
//! bench asks for happen.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
mod common;

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use syncline_proto::batch::{BatchBuilder, Batches};
use syncline_proto::partitioner::partition_for_key;
use syncline_proto::v1::{self, broker_client::BrokerClient};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

// Data sizes. They are chosen so that the whole bench runs in about five minutes on a 2-core
// machine; every figure is a rate, so the ratios hold if they are changed.

/// Live keys of the bootstrap table (the figure).
const BOOTSTRAP_KEYS: u64 = 1_000_000;
/// Versions written of every live key; the last one is what a replica must end up with.
const BOOTSTRAP_VERSIONS: u32 = 3;
/// Extra keys written in the first round and deleted (tombstone) in the last, so that the
/// replays exercise deletes and the "exactly 1 M keys" check covers them (1 % of the keys).
const BOOTSTRAP_DELETED_KEYS: u64 = 10_000;
/// Value bytes of a bootstrap record (the "~100-byte values").
const BOOTSTRAP_VALUE_BYTES: usize = 100;
/// Partitions of the bootstrap table.
const BOOTSTRAP_PARTITIONS: u32 = 4;
/// Segment size of every table here: small enough that a table spans several segments (the
/// bootstrap table is ~360 MB, ~90 MB per partition), so passes group and rewrite segments.
const TABLE_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// Records per client-encoded batch when loading tables (~120 KB with 100-byte values).
const LOAD_RECORDS_PER_BATCH: usize = 1000;
/// Bytes per Fetch and per Snapshot message while bootstrapping (the Snapshot maximum).
const BOOTSTRAP_MESSAGE_BYTES: u32 = 4 * 1024 * 1024;

/// Keys of the `compact_pass` table; each iteration writes one new 1 KiB version of every key
/// (~64 MiB), so a pass reads ~128 MiB (the previous pass's output plus the new round) and
/// keeps about half.
const CLEANER_PASS_KEYS: u64 = 64 * 1024;
/// Keys (1 KiB values, all distinct) of the table the cleaner loops over while produce runs:
/// ~128 MiB, which every pass reads and rewrites whole (a pass rewrites every sealed segment).
const CLEANER_LOAD_KEYS: u64 = 128 * 1024;
/// Value bytes of the cleaner tables' records.
const CLEANER_VALUE_BYTES: usize = 1024;

/// Produce measured alone and next to the cleaner: 256 MiB of 1 KiB records in 256-record
/// batches on one ProduceStream with 64 requests in flight, leader acks (as `e2e`).
const PRODUCE_BATCHES: u64 = 1024;
const PRODUCE_RECORDS_PER_BATCH: usize = 256;
const PRODUCE_RECORD_BYTES: usize = 1024;
const IN_FLIGHT: usize = 64;
/// Samples of each produce variant: a sample is ~0.25 s, and the variants differ by a few
/// percent, so they get more samples than the rest.
const PRODUCE_SAMPLES: usize = 20;

/// The broker's default cleaner budget (`Config::cleaner_io_bytes_per_sec`).
const DEFAULT_CLEANER_BYTES_PER_SEC: u64 = 128 * 1024 * 1024;
/// Keeps the background cleaner out of the measurements: only requested passes run.
const CLEANER_INTERVAL_MS: u64 = 3_600_000;
/// All records carry this timestamp, so that every round encodes to the same size.
const TIMESTAMP_MS: i64 = 1_700_000_000_000;

static TOPICS: AtomicU64 = AtomicU64::new(0);

type Table = HashMap<Bytes, (u64, Bytes)>;
/// A record to load: key and value (`None` = tombstone).
type KeyedRecord = (Vec<u8>, Option<Vec<u8>>);

fn live_key(i: u64) -> Vec<u8> {
    format!("user-{i:08}").into_bytes()
}

fn deleted_key(i: u64) -> Vec<u8> {
    format!("gone-{i:08}").into_bytes()
}

/// The value of version `version` of key `i`: its identity, then filler up to `bytes`.
fn value(i: u64, version: u32, bytes: usize) -> Vec<u8> {
    let mut value = format!("v{version}-{i:08}-").into_bytes();
    value.resize(bytes, b'x');
    value
}

fn broker(prefix: &str, cleaner_io_bytes_per_sec: u64) -> common::Setup {
    common::setup_with(prefix, |config| {
        config.cleaner_interval_ms = CLEANER_INTERVAL_MS;
        config.cleaner_io_bytes_per_sec = cleaner_io_bytes_per_sec;
    })
}

async fn create_topic(
    client: &mut BrokerClient<Channel>,
    prefix: &str,
    partitions: u32,
    table: bool,
) -> String {
    let name = format!("{prefix}-{}", TOPICS.fetch_add(1, Ordering::Relaxed));
    let config = if table {
        v1::TopicConfig {
            partitions: Some(partitions),
            cleanup_policy: v1::CleanupPolicy::Compact as i32,
            segment_bytes: Some(TABLE_SEGMENT_BYTES),
            ..Default::default()
        }
    } else {
        v1::TopicConfig {
            partitions: Some(partitions),
            ..Default::default()
        }
    };
    client
        .create_topic(v1::CreateTopicRequest {
            name: name.clone(),
            config: Some(config),
        })
        .await
        .expect("create topic");
    name
}

/// Sends `batches` (partition, encoded batch) on one ProduceStream with `IN_FLIGHT`
/// outstanding and leader acks; returns the time from the first send to the last ack.
async fn produce(
    client: &mut BrokerClient<Channel>,
    topic: &str,
    batches: Vec<(u32, Bytes)>,
) -> Duration {
    let count = batches.len();
    let (tx, rx) = tokio::sync::mpsc::channel(IN_FLIGHT);
    let started = Instant::now();
    let mut responses = client
        .produce_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("stream")
        .into_inner();
    let topic = topic.to_string();
    let sender = tokio::spawn(async move {
        for (i, (partition, batch)) in batches.into_iter().enumerate() {
            let request = v1::ProduceRequest {
                correlation_id: i as u64,
                topic: topic.clone(),
                partition,
                acks: v1::Acks::Leader as i32,
                batch,
                ..Default::default()
            };
            if tx.send(request).await.is_err() {
                return;
            }
        }
    });
    for _ in 0..count {
        let response = responses.next().await.expect("ack").expect("ack status");
        assert!(response.error.is_none(), "{:?}", response.error);
    }
    let elapsed = started.elapsed();
    sender.await.expect("sender");
    elapsed
}

/// Encodes `records` (key, value or tombstone) into batches of `LOAD_RECORDS_PER_BATCH`, each
/// for the key's partition.
fn keyed_batches(records: Vec<KeyedRecord>, partitions: u32) -> Vec<(u32, Bytes)> {
    let mut by_partition: Vec<Vec<KeyedRecord>> = (0..partitions).map(|_| Vec::new()).collect();
    for record in records {
        by_partition[partition_for_key(&record.0, partitions) as usize].push(record);
    }
    let mut batches = Vec::new();
    for (partition, records) in by_partition.iter().enumerate() {
        for chunk in records.chunks(LOAD_RECORDS_PER_BATCH) {
            let bytes: usize = chunk
                .iter()
                .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len) + 32)
                .sum();
            let mut builder = BatchBuilder::with_capacity(bytes + 64);
            for (key, value) in chunk {
                builder.push(TIMESTAMP_MS, Some(key), value.as_deref(), &[]);
            }
            batches.push((partition as u32, builder.finish().expect("batch")));
        }
    }
    batches
}

/// Waits until everything appended to `topic` is durable (visible to Fetch, Snapshot and the
/// cleaner); returns each partition's durable offset.
async fn wait_durable(client: &mut BrokerClient<Channel>, topic: &str) -> Vec<u64> {
    loop {
        let description = client
            .describe_topic(v1::DescribeTopicRequest {
                name: topic.to_string(),
            })
            .await
            .expect("describe")
            .into_inner()
            .topic
            .expect("description");
        if description
            .partitions
            .iter()
            .all(|p| p.durable_offset == p.log_end_offset)
        {
            return description
                .partitions
                .iter()
                .map(|p| p.durable_offset)
                .collect();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn compact(client: &mut BrokerClient<Channel>, topic: &str) -> Vec<v1::CompactionOutcome> {
    let outcomes = client
        .compact_topic(v1::CompactTopicRequest {
            name: topic.to_string(),
            roll: true,
        })
        .await
        .expect("compact")
        .into_inner()
        .partitions;
    for outcome in &outcomes {
        assert!(outcome.error.is_empty(), "compaction: {}", outcome.error);
    }
    outcomes
}

// ---------------------------------------------------------------------------------------------
// Bootstrap

/// Writes the bootstrap table: round after round (each acked before the next, so the last
/// round holds every key's latest version), the deleted keys put in the first round and
/// deleted in the last.
async fn load_bootstrap_table(client: &mut BrokerClient<Channel>, topic: &str) -> Vec<u64> {
    for version in 0..BOOTSTRAP_VERSIONS {
        let mut records: Vec<KeyedRecord> = (0..BOOTSTRAP_KEYS)
            .map(|i| (live_key(i), Some(value(i, version, BOOTSTRAP_VALUE_BYTES))))
            .collect();
        if version == 0 {
            records.extend((0..BOOTSTRAP_DELETED_KEYS).map(|i| {
                (
                    deleted_key(i),
                    Some(value(i, version, BOOTSTRAP_VALUE_BYTES)),
                )
            }));
        } else if version == BOOTSTRAP_VERSIONS - 1 {
            records.extend((0..BOOTSTRAP_DELETED_KEYS).map(|i| (deleted_key(i), None)));
        }
        let batches = keyed_batches(records, BOOTSTRAP_PARTITIONS);
        produce(client, topic, batches).await;
    }
    wait_durable(client, topic).await
}

/// Reads one partition from offset 0 to `end` with Fetch and applies every record.
async fn replay_partition(
    mut client: BrokerClient<Channel>,
    topic: String,
    partition: u32,
    end: u64,
) -> Table {
    let mut table = Table::new();
    let mut offset = 0;
    while offset < end {
        let response = client
            .fetch(v1::FetchRequest {
                topic: topic.clone(),
                partition,
                offset,
                max_bytes: Some(BOOTSTRAP_MESSAGE_BYTES),
                ..Default::default()
            })
            .await
            .expect("fetch")
            .into_inner();
        for batch in Batches::new(response.batches) {
            let batch = batch.expect("batch");
            for record in batch.records() {
                let record = record.expect("record");
                // The first batch may start before the requested offset.
                if record.offset < offset {
                    continue;
                }
                let key = record.key.expect("table records have keys");
                match record.value {
                    Some(value) => {
                        table.insert(key, (record.offset, value));
                    }
                    None => {
                        table.remove(&key);
                    }
                }
            }
        }
        assert!(response.next_offset > offset, "fetch made no progress");
        offset = response.next_offset;
    }
    table
}

/// Every partition replayed concurrently.
async fn replay(client: &BrokerClient<Channel>, topic: &str, ends: &[u64]) -> Vec<Table> {
    let tasks: Vec<_> = ends
        .iter()
        .enumerate()
        .map(|(partition, &end)| {
            tokio::spawn(replay_partition(
                client.clone(),
                topic.to_string(),
                partition as u32,
                end,
            ))
        })
        .collect();
    let mut tables = Vec::new();
    for task in tasks {
        tables.push(task.await.expect("replay task"));
    }
    tables
}

/// Loads one partition with the Snapshot RPC.
async fn snapshot_partition(
    mut client: BrokerClient<Channel>,
    topic: String,
    partition: u32,
) -> Table {
    let mut stream = client
        .snapshot(v1::SnapshotRequest {
            topic,
            partition,
            max_bytes: Some(BOOTSTRAP_MESSAGE_BYTES),
        })
        .await
        .expect("snapshot")
        .into_inner();
    let mut table = Table::new();
    while let Some(message) = stream.next().await {
        let message = message.expect("snapshot message");
        // The key count is there for progress; a replica may as well size its map with it.
        if table.capacity() == 0 {
            table.reserve(message.keys_total as usize);
        }
        for record in message.records {
            let key = record.key.expect("table records have keys");
            let value = record.value.expect("snapshots hold no tombstones");
            table.insert(key, (record.offset, value));
        }
        if message.last {
            return table;
        }
    }
    panic!("snapshot stream ended without its last message");
}

/// Every partition snapshotted concurrently.
async fn snapshot(client: &BrokerClient<Channel>, topic: &str) -> Vec<Table> {
    let tasks: Vec<_> = (0..BOOTSTRAP_PARTITIONS)
        .map(|partition| {
            tokio::spawn(snapshot_partition(
                client.clone(),
                topic.to_string(),
                partition,
            ))
        })
        .collect();
    let mut tables = Vec::new();
    for task in tasks {
        tables.push(task.await.expect("snapshot task"));
    }
    tables
}

/// Checks that the tables hold exactly the live keys with their latest values; returns the sum
/// of their versions, which every variant must agree on.
fn check_tables(tables: &[Table], variant: &str) -> u64 {
    let keys: usize = tables.iter().map(HashMap::len).sum();
    assert_eq!(
        keys as u64, BOOTSTRAP_KEYS,
        "{variant}: wrong number of keys"
    );
    let mut versions = 0u64;
    for table in tables {
        for (key, (offset, found)) in table {
            let index: u64 = std::str::from_utf8(key)
                .ok()
                .and_then(|k| k.strip_prefix("user-"))
                .and_then(|i| i.parse().ok())
                .unwrap_or_else(|| panic!("{variant}: unexpected key {key:?}"));
            let expected = value(index, BOOTSTRAP_VERSIONS - 1, BOOTSTRAP_VALUE_BYTES);
            assert_eq!(found, &expected[..], "{variant}: stale value of {key:?}");
            versions = versions.wrapping_add(*offset);
        }
    }
    versions
}

fn bootstrap(c: &mut Criterion) {
    let common::Setup {
        runtime,
        mut client,
        _dir,
    } = broker(
        "syncline-compaction-bootstrap-",
        DEFAULT_CLEANER_BYTES_PER_SEC,
    );
    let (topic, ends) = runtime.block_on(async {
        let topic = create_topic(&mut client, "bootstrap", BOOTSTRAP_PARTITIONS, true).await;
        let started = Instant::now();
        let ends = load_bootstrap_table(&mut client, &topic).await;
        eprintln!(
            "bootstrap table: {} records in {:.1?}, partition ends {ends:?}",
            ends.iter().sum::<u64>(),
            started.elapsed()
        );
        (topic, ends)
    });
    // The sum of the latest versions, from the first checked variant.
    let reference = std::cell::Cell::new(None);
    let check = |tables: Vec<Table>, variant: &str| {
        let versions = check_tables(&tables, variant);
        match reference.get() {
            None => reference.set(Some(versions)),
            Some(expected) => assert_eq!(versions, expected, "{variant}: wrong versions"),
        }
        // Freed here, outside the timing.
        drop(tables);
    };

    let mut group = c.benchmark_group("bootstrap_1m_keys");
    group.sample_size(10);
    group.sampling_mode(SamplingMode::Flat);
    group.throughput(Throughput::Elements(BOOTSTRAP_KEYS));
    group.bench_function("replay_full_history", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let started = Instant::now();
                let tables = runtime.block_on(replay(&client, &topic, &ends));
                total += started.elapsed();
                check(tables, "replay_full_history");
            }
            total
        })
    });

    runtime.block_on(async {
        let started = Instant::now();
        let outcomes = compact(&mut client, &topic).await;
        let before: u64 = outcomes.iter().map(|o| o.bytes_before).sum();
        let after: u64 = outcomes.iter().map(|o| o.bytes_after).sum();
        let removed: u64 = outcomes.iter().map(|o| o.records_removed).sum();
        eprintln!(
            "bootstrap table compacted in {:.1?}: {before} -> {after} bytes, {removed} records removed",
            started.elapsed()
        );
        // The roll sealed the active segments: the log ends where it did.
        assert_eq!(wait_durable(&mut client, &topic).await, ends);
    });

    group.bench_function("snapshot", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let started = Instant::now();
                let tables = runtime.block_on(snapshot(&client, &topic));
                total += started.elapsed();
                check(tables, "snapshot");
            }
            total
        })
    });
    group.bench_function("replay_after_compaction", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let started = Instant::now();
                let tables = runtime.block_on(replay(&client, &topic, &ends));
                total += started.elapsed();
                check(tables, "replay_after_compaction");
            }
            total
        })
    });
    group.finish();
}

// ---------------------------------------------------------------------------------------------
// Cleaner

/// One new version (`round`) of every key `0..keys` of a 1-partition table, 1 KiB values.
async fn write_round(client: &mut BrokerClient<Channel>, topic: &str, keys: u64, round: u32) {
    let records = (0..keys)
        .map(|i| (live_key(i), Some(value(i, round, CLEANER_VALUE_BYTES))))
        .collect();
    produce(client, topic, keyed_batches(records, 1)).await;
    wait_durable(client, topic).await;
}

fn compact_pass(c: &mut Criterion) {
    let common::Setup {
        runtime,
        mut client,
        _dir,
    } = broker("syncline-compaction-pass-", 0);
    let mut round = 0;
    // Two rounds and passes first, so that every measured pass has the same input: the previous
    // pass's output and one new round.
    let (topic, bytes_before) = runtime.block_on(async {
        let topic = create_topic(&mut client, "pass", 1, true).await;
        let mut bytes_before = 0;
        for _ in 0..2 {
            write_round(&mut client, &topic, CLEANER_PASS_KEYS, round).await;
            round += 1;
            bytes_before = compact(&mut client, &topic).await[0].bytes_before;
        }
        (topic, bytes_before)
    });
    let mut group = c.benchmark_group("cleaner");
    group.sample_size(10);
    group.sampling_mode(SamplingMode::Flat);
    group.throughput(Throughput::Bytes(bytes_before));
    group.bench_function("compact_pass", |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    write_round(&mut client, &topic, CLEANER_PASS_KEYS, round).await;
                    round += 1;
                    let started = Instant::now();
                    let outcome = compact(&mut client, &topic).await.remove(0);
                    total += started.elapsed();
                    // Same input every time (within 1 %), and the old round went away.
                    assert!(
                        outcome.bytes_before.abs_diff(bytes_before) * 100 <= bytes_before,
                        "pass read {} bytes, expected about {bytes_before}",
                        outcome.bytes_before
                    );
                    assert!(
                        outcome.records_removed + 1 >= CLEANER_PASS_KEYS,
                        "pass removed only {} records",
                        outcome.records_removed
                    );
                }
                total
            })
        })
    });
    group.finish();
}

fn produce_batch() -> Bytes {
    let mut builder =
        BatchBuilder::with_capacity(PRODUCE_RECORDS_PER_BATCH * (PRODUCE_RECORD_BYTES + 32) + 64);
    let value = vec![0x42u8; PRODUCE_RECORD_BYTES];
    for _ in 0..PRODUCE_RECORDS_PER_BATCH {
        builder.push(TIMESTAMP_MS, None, Some(&value), &[]);
    }
    builder.finish().expect("batch")
}

/// Produce throughput on a broker with a `CLEANER_LOAD_KEYS` table; with `cleaner` set (the
/// broker's cleaner budget, 0 = none), another task loops CompactTopic on that table for the
/// whole benchmark, so every produce runs next to a cleaner in its steady state (the throttle's
/// one-second burst long used up).
fn produce_variant(c: &mut Criterion, name: &str, cleaner: Option<u64>) {
    let common::Setup {
        runtime,
        mut client,
        _dir,
    } = broker(
        "syncline-compaction-produce-",
        cleaner.unwrap_or(DEFAULT_CLEANER_BYTES_PER_SEC),
    );
    let table = runtime.block_on(async {
        let table = create_topic(&mut client, "load", 1, true).await;
        write_round(&mut client, &table, CLEANER_LOAD_KEYS, 0).await;
        table
    });
    let stop = Arc::new(AtomicBool::new(false));
    // Returns the passes it completed, the bytes they read and when the last one ended.
    let looper = cleaner.map(|_| {
        let mut client = client.clone();
        let stop = stop.clone();
        runtime.spawn(async move {
            let started = Instant::now();
            let (mut passes, mut bytes, mut elapsed) = (0u64, 0u64, Duration::ZERO);
            while !stop.load(Ordering::Relaxed) {
                let outcomes = compact(&mut client, &table).await;
                passes += 1;
                bytes += outcomes.iter().map(|o| o.bytes_before).sum::<u64>();
                elapsed = started.elapsed();
            }
            (passes, bytes, elapsed)
        })
    });
    let batch = produce_batch();
    let batches: Vec<(u32, Bytes)> = (0..PRODUCE_BATCHES).map(|_| (0, batch.clone())).collect();
    let mut group = c.benchmark_group("cleaner");
    group.sample_size(PRODUCE_SAMPLES);
    group.sampling_mode(SamplingMode::Flat);
    group.throughput(Throughput::Bytes(PRODUCE_BATCHES * batch.len() as u64));
    group.bench_function(name, |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let topic = create_topic(&mut client, "produce", 1, false).await;
                    total += produce(&mut client, &topic, batches.clone()).await;
                    client
                        .delete_topic(v1::DeleteTopicRequest { name: topic })
                        .await
                        .expect("delete");
                }
                total
            })
        })
    });
    group.finish();
    stop.store(true, Ordering::Relaxed);
    if let Some(looper) = looper {
        let (passes, bytes, elapsed) = runtime.block_on(looper).expect("cleaner task");
        assert!(passes > 0, "{name}: the cleaner never completed a pass");
        eprintln!(
            "{name}: the cleaner completed {passes} passes reading {:.0} MiB in {elapsed:.1?} \
             ({:.0} MiB/s) while the benchmark ran",
            bytes as f64 / (1024.0 * 1024.0),
            bytes as f64 / (1024.0 * 1024.0) / elapsed.as_secs_f64()
        );
    }
}

fn cleaner(c: &mut Criterion) {
    compact_pass(c);
    produce_variant(c, "produce_alone", None);
    produce_variant(
        c,
        "produce_while_compacting_throttled",
        Some(DEFAULT_CLEANER_BYTES_PER_SEC),
    );
    produce_variant(c, "produce_while_compacting_unthrottled", Some(0));
}

criterion_group! {
    name = benches;
    // One warm-up iteration (any positive warm-up time runs at least one) and one iteration per
    // sample: every iteration here takes long enough on its own.
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_secs(1));
    targets = bootstrap, cleaner
}
criterion_main!(benches);
