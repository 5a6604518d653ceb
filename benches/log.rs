//! Storage-engine benchmarks for one partition log, with the machine's own ceilings measured in
//! the same run (`baseline/*`): raw `pwrite` into the page cache and `memcpy`.
//!
//! - `append_nosync/<record>/<records per batch>`: appends only (page cache), one appender.
//! - `append_group_commit/<record>/<records per batch>`: 64 appenders, each waiting for its
//!   batch to be durable before sending the next (the flusher's continuous group commit).
//! - `durable_appenders/{1,64}`: 1-record 100 B batches acknowledged durable; the ratio between
//!   the two is the group-commit gain.
//! - `read/*`: sequential scans in 1 MiB reads: slicing the mapping; slicing and touching every
//!   cache line (what a consumer pays to look at the data at all); and the first scan after a
//!   clean reopen, which CRC-checks every batch once. `index/lookup_random`: reads at random
//!   offsets (binary search in the sparse index plus a short header walk).
//!
//! Every log lives in a fresh temp dir on the same disk as the baselines' files and is deleted
//! after each sample, so dirty pages are dropped instead of piling up across samples.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use syncline_broker::log::{Log, LogConfig};
use syncline_proto::batch::BatchBuilder;

fn batch(records: usize, value_len: usize) -> Bytes {
    let mut builder = BatchBuilder::with_capacity(records * (value_len + 32) + 64);
    let value = vec![0x5Au8; value_len];
    for i in 0..records {
        let key = (i as u64).to_le_bytes();
        builder.push(1_700_000_000_000, Some(&key), Some(&value), &[]);
    }
    builder.finish().expect("batch")
}

fn bench_dir() -> tempfile::TempDir {
    // Same disk as the project (not a tmpfs): /tmp here is on the root file system.
    tempfile::Builder::new()
        .prefix("syncline-bench-")
        .tempdir()
        .expect("tempdir")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn baselines(c: &mut Criterion) {
    let mut group = c.benchmark_group("baseline");
    let chunk = vec![0x5Au8; 256 * 1024];
    group.throughput(Throughput::Bytes(chunk.len() as u64));
    group.bench_function("pwrite_page_cache_256KiB", |b| {
        b.iter_custom(|iters| {
            let dir = bench_dir();
            let file = std::fs::File::create(dir.path().join("raw")).expect("file");
            let start = Instant::now();
            for i in 0..iters {
                file.write_all_at(&chunk, i * chunk.len() as u64)
                    .expect("pwrite");
            }
            start.elapsed()
        })
    });
    // 64 MiB: larger than the caches, so this is memory bandwidth, like a scan of a big log.
    let source = vec![0x5Au8; 64 * 1024 * 1024];
    let mut target = vec![0u8; 64 * 1024 * 1024];
    group.throughput(Throughput::Bytes(source.len() as u64));
    group.bench_function("memcpy_64MiB", |b| {
        b.iter(|| {
            target.copy_from_slice(std::hint::black_box(&source));
            std::hint::black_box(&mut target);
        })
    });
    group.finish();
}

const SHAPES: [(usize, &str); 2] = [(100, "100B"), (1024, "1KiB")];
const BATCH_RECORDS: [usize; 3] = [1, 16, 256];

fn append_nosync(c: &mut Criterion) {
    let mut group = c.benchmark_group("append_nosync");
    for (value_len, name) in SHAPES {
        for records in BATCH_RECORDS {
            let batch = batch(records, value_len);
            group.throughput(Throughput::ElementsAndBytes {
                elements: records as u64,
                bytes: batch.len() as u64,
            });
            group.bench_with_input(BenchmarkId::new(name, records), &batch, |b, batch| {
                b.iter_custom(|iters| {
                    let dir = bench_dir();
                    let log = Log::open(dir.path(), LogConfig::default()).expect("open");
                    let start = Instant::now();
                    for _ in 0..iters {
                        log.append(batch).expect("append");
                    }
                    start.elapsed()
                })
            });
        }
    }
    group.finish();
}

/// `iters` batches appended by `appenders` tasks, each waiting for durability before its next.
fn durable_run(batch: &Bytes, iters: u64, appenders: u64) -> Duration {
    let dir = bench_dir();
    let runtime = runtime();
    let log = Arc::new(Log::open(dir.path(), LogConfig::default()).expect("open"));
    runtime.block_on(async {
        let _flusher = log.spawn_flusher();
        let per_task = iters.div_ceil(appenders);
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..appenders {
            let log = log.clone();
            let batch = batch.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..per_task {
                    let appended = log.append(&batch).expect("append");
                    log.wait_durable(appended.durable_target())
                        .await
                        .expect("durable");
                }
            }));
        }
        for task in tasks {
            task.await.expect("task");
        }
        let elapsed = start.elapsed();
        // Normalise to exactly `iters` batches.
        elapsed.mul_f64(iters as f64 / (per_task * appenders) as f64)
    })
}

fn append_group_commit(c: &mut Criterion) {
    let mut group = c.benchmark_group("append_group_commit");
    group.measurement_time(Duration::from_secs(6));
    for (value_len, name) in SHAPES {
        for records in BATCH_RECORDS {
            let batch = batch(records, value_len);
            group.throughput(Throughput::ElementsAndBytes {
                elements: records as u64,
                bytes: batch.len() as u64,
            });
            group.bench_with_input(BenchmarkId::new(name, records), &batch, |b, batch| {
                b.iter_custom(|iters| durable_run(batch, iters, 64))
            });
        }
    }
    group.finish();
}

fn durable_appenders(c: &mut Criterion) {
    let mut group = c.benchmark_group("durable_appenders");
    group.measurement_time(Duration::from_secs(8));
    let batch = batch(1, 100);
    group.throughput(Throughput::Elements(1));
    for appenders in [1u64, 64] {
        group.bench_with_input(
            BenchmarkId::from_parameter(appenders),
            &appenders,
            |b, &n| b.iter_custom(|iters| durable_run(&batch, iters, n)),
        );
    }
    group.finish();
}

/// A synced log of `bytes` of 1 KiB x 256 batches, closed cleanly.
fn filled_log(bytes: usize) -> (tempfile::TempDir, u64) {
    let dir = bench_dir();
    let log = Log::open(dir.path(), LogConfig::default()).expect("open");
    let batch = batch(256, 1024);
    for _ in 0..bytes / batch.len() {
        log.append(&batch).expect("append");
    }
    log.close().expect("close");
    let end = log.end_offset();
    (dir, end)
}

fn read(c: &mut Criterion) {
    let (dir, end) = filled_log(256 * 1024 * 1024);
    let mut group = c.benchmark_group("read");
    let max_bytes = 1024 * 1024;
    {
        let log = Log::open(dir.path(), LogConfig::default()).expect("open");
        // One pass so every batch is CRC-checked once; what remains is the steady state.
        let mut next = 0;
        while next < end {
            next = log.read(next, max_bytes).expect("read").next_offset;
        }
        let sample = log.read(0, max_bytes).expect("read").bytes.len();
        group.throughput(Throughput::Bytes(sample as u64));
        group.bench_function("sequential_scan_1MiB_reads", |b| {
            let mut next = 0;
            b.iter(|| {
                if next >= end {
                    next = 0;
                }
                let read = log.read(next, max_bytes).expect("read");
                next = read.next_offset;
                std::hint::black_box(read.bytes)
            })
        });
        group.bench_function("sequential_scan_1MiB_reads_and_sum", |b| {
            // Touches every byte a consumer would receive: the cost of reading the data at all.
            let mut next = 0;
            b.iter(|| {
                if next >= end {
                    next = 0;
                }
                let read = log.read(next, max_bytes).expect("read");
                next = read.next_offset;
                let sum: u64 = read.bytes.chunks_exact(8).map(|c| c[0] as u64).sum();
                std::hint::black_box(sum)
            })
        });
        log.close().expect("close");
    }
    let total = std::fs::read_dir(dir.path())
        .expect("dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
        .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .sum::<u64>();
    group.throughput(Throughput::Bytes(total));
    group.bench_function("full_scan_after_clean_open_crc_checked", |b| {
        b.iter_custom(|iters| {
            let mut elapsed = Duration::ZERO;
            for _ in 0..iters {
                let log = Log::open(dir.path(), LogConfig::default()).expect("open");
                let start = Instant::now();
                let mut next = 0;
                while next < end {
                    next = log.read(next, max_bytes).expect("read").next_offset;
                }
                elapsed += start.elapsed();
                log.close().expect("close");
            }
            elapsed
        })
    });
    group.finish();

    let mut group = c.benchmark_group("index");
    let log = Log::open(dir.path(), LogConfig::default()).expect("open");
    // Steady state: every batch already CRC-checked once by this process (a cold random read
    // after a clean open also pays the CRC of the batch it returns: see read/full_scan_*).
    let mut next = 0;
    while next < end {
        next = log.read(next, max_bytes).expect("read").next_offset;
    }
    group.throughput(Throughput::Elements(1));
    group.bench_function("lookup_random", |b| {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        b.iter(|| {
            // xorshift: a cheap, seeded, reproducible offset sequence.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let offset = state % end;
            std::hint::black_box(log.read(offset, 1).expect("read").first_offset)
        })
    });
    group.finish();
    let _ = std::io::stderr().flush();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = baselines, append_nosync, append_group_commit, durable_appenders, read
}
criterion_main!(benches);
