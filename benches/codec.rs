//! Record-batch codec throughput: encode, and decode (verify + walk every record), for 100 B and
//! 1 KiB values in batches of 1, 16 and 256 records; and `verify` (header parse + one CRC-32C
//! pass) on a 1 MiB batch. Kept short (about 45 s in all) so it can run on every change.

use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use syncline_proto::batch::{verify, Batch, BatchBuilder};

/// Value sizes: a small event and a typical JSON document.
const VALUE_LENS: [usize; 2] = [100, 1024];
/// Records per batch: unbatched, a modest linger, a full producer batch.
const RECORD_COUNTS: [usize; 3] = [1, 16, 256];
/// Size of the batch for the CRC benchmark: large enough that the header is noise.
const VERIFY_BATCH_LEN: usize = 1024 * 1024;
/// 2023-11-14T22:13:20Z; the value does not matter, only that it is fixed.
const TIMESTAMP_MS: i64 = 1_700_000_000_000;
/// A 16-byte key, typical of a UUID-keyed topic.
const KEY: &[u8] = b"user-0000-0000-1";

fn encode(record_count: usize, value: &[u8], capacity: usize) -> Bytes {
    let mut builder = BatchBuilder::with_capacity(capacity);
    for i in 0..record_count {
        builder.push(TIMESTAMP_MS + i as i64, Some(KEY), Some(value), &[]);
    }
    builder
        .finish()
        .expect("a benchmark batch is within limits")
}

/// Parses the batch and touches every record, the work a consumer does per batch.
fn decode(bytes: &Bytes) -> usize {
    let batch = Batch::parse(bytes.clone()).expect("the benchmark batch is valid");
    let mut value_bytes = 0;
    for record in batch.records() {
        let record = record.expect("the benchmark records are valid");
        value_bytes += record.value.map_or(0, |value| value.len());
    }
    value_bytes
}

fn bench_encode_decode(c: &mut Criterion) {
    for value_len in VALUE_LENS {
        let value = vec![0x5a; value_len];
        let mut encode_group = c.benchmark_group(format!("encode/value_{value_len}B"));
        for record_count in RECORD_COUNTS {
            let batch_len = encode(record_count, &value, 0).len();
            encode_group.throughput(Throughput::Bytes(batch_len as u64));
            encode_group.bench_with_input(
                BenchmarkId::new("records", record_count),
                &record_count,
                |b, &record_count| b.iter(|| encode(record_count, black_box(&value), batch_len)),
            );
        }
        encode_group.finish();

        let mut decode_group = c.benchmark_group(format!("decode/value_{value_len}B"));
        for record_count in RECORD_COUNTS {
            let batch = encode(record_count, &value, 0);
            decode_group.throughput(Throughput::Bytes(batch.len() as u64));
            decode_group.bench_with_input(
                BenchmarkId::new("records", record_count),
                &batch,
                |b, batch| b.iter(|| decode(black_box(batch))),
            );
        }
        decode_group.finish();
    }
}

fn bench_verify(c: &mut Criterion) {
    let value = vec![0x5a; 1024];
    let mut builder = BatchBuilder::with_capacity(VERIFY_BATCH_LEN + 2048);
    let mut i = 0;
    while builder.encoded_len() < VERIFY_BATCH_LEN {
        builder.push(TIMESTAMP_MS + i, Some(KEY), Some(&value), &[]);
        i += 1;
    }
    let batch = builder.finish().expect("a 1 MiB batch is within limits");
    let mut group = c.benchmark_group("verify");
    group.throughput(Throughput::Bytes(batch.len() as u64));
    group.bench_function("1MiB", |b| {
        b.iter(|| verify(black_box(&batch)).expect("the benchmark batch is valid"))
    });
    group.finish();
}

/// Short runs, about 3 s per benchmark and 45 s for the 13 of them. Plots are off: rendering
/// them takes longer than measuring; the estimates are still saved for `--baseline` comparisons.
fn config() -> Criterion {
    Criterion::default()
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(20)
        .without_plots()
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_encode_decode, bench_verify
}
criterion_main!(benches);
