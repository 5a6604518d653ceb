//! The bench report: latency histograms, rates, the `--json` object and the human summary.

use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latencies are recorded in microseconds, from 1 µs to one hour; 3 significant digits keep
/// each percentile within 0.1% at about 200 KiB per histogram.
const LATENCY_MAX_US: u64 = 3_600_000_000;
const LATENCY_SIGNIFICANT_DIGITS: u8 = 3;

/// Bytes in the MB of `mb_per_sec`: 10^6, as in iggy-bench.
const BYTES_PER_MB: f64 = 1_000_000.0;

pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_MAX_US, LATENCY_SIGNIFICANT_DIGITS)
        .unwrap_or_else(|_| unreachable!("the bounds are constants and valid"))
}

/// Records a latency given in nanoseconds (clamped to the histogram's range).
pub fn record_latency_ns(histogram: &mut Histogram<u64>, nanoseconds: u64) {
    histogram.saturating_record((nanoseconds / 1_000).clamp(1, LATENCY_MAX_US));
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl Percentiles {
    /// All zero for an empty histogram.
    pub fn of(histogram: &Histogram<u64>) -> Percentiles {
        if histogram.is_empty() {
            return Percentiles::default();
        }
        let ms = |microseconds: u64| microseconds as f64 / 1_000.0;
        Percentiles {
            p50: ms(histogram.value_at_quantile(0.50)),
            p90: ms(histogram.value_at_quantile(0.90)),
            p99: ms(histogram.value_at_quantile(0.99)),
            p999: ms(histogram.value_at_quantile(0.999)),
            max: ms(histogram.max()),
            mean: histogram.mean() / 1_000.0,
        }
    }
}

/// One direction (produce or consume) of a run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Throughput {
    /// Records acknowledged (produce) or checked (consume).
    pub records: u64,
    /// Their key and value bytes.
    pub bytes: u64,
    /// From the start of the run to the last acknowledgement or the last record consumed.
    pub elapsed_secs: f64,
    pub records_per_sec: f64,
    pub mb_per_sec: f64,
    /// Produce: send -> acknowledgement. Consume: send -> consumed (end to end).
    pub latency_ms: Percentiles,
}

impl Throughput {
    pub fn new(records: u64, bytes: u64, elapsed: Duration, latency: &Histogram<u64>) -> Self {
        let seconds = elapsed.as_secs_f64();
        let per_second = |amount: f64| if seconds > 0.0 { amount / seconds } else { 0.0 };
        Throughput {
            records,
            bytes,
            elapsed_secs: seconds,
            records_per_sec: per_second(records as f64),
            mb_per_sec: per_second(bytes as f64 / BYTES_PER_MB),
            latency_ms: Percentiles::of(latency),
        }
    }
}

/// What the run proved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Verification {
    /// False with `--consumers 0`: nothing was read back, and the counts below other than
    /// `produced` and `produce_errors` are 0.
    pub checked: bool,
    /// Records sent (acknowledged or not).
    pub produced: u64,
    /// Records whose delivery failed.
    pub produce_errors: u64,
    /// Records read back and checked.
    pub consumed: u64,
    /// Sent but never read back.
    pub lost: u64,
    /// Read back more than once.
    pub duplicated: u64,
    /// Read back after a later record of the same (producer, key) or (producer, partition).
    pub reordered: u64,
    /// Read back but not a valid record of this run (size, checksum, producer, key, partition).
    pub corrupt: u64,
}

impl Verification {
    /// `None` when everything checks out; else the one-line reason.
    pub fn failure(&self) -> Option<String> {
        let bad = self.lost + self.duplicated + self.reordered + self.corrupt + self.produce_errors;
        (bad > 0).then(|| {
            format!(
                "verification failed: {} records lost, {} duplicated, {} reordered, {} corrupt, \
                 {} failed deliveries (of {} produced, {} consumed)",
                self.lost,
                self.duplicated,
                self.reordered,
                self.corrupt,
                self.produce_errors,
                self.produced,
                self.consumed
            )
        })
    }
}

/// `1 producer`, `2 producers`.
pub fn plural(count: u64, noun: &str) -> String {
    if count == 1 {
        format!("{count} {noun}")
    } else {
        format!("{count} {noun}s")
    }
}

/// The settings of a run, as reported.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReportConfig {
    pub broker: String,
    pub topic: String,
    /// Whether the bench created the topic.
    pub topic_created: bool,
    pub producers: u32,
    pub consumers: u32,
    pub partitions: u32,
    pub record_size: usize,
    /// `--records`; null with `--duration`.
    pub records: Option<u64>,
    pub duration_secs: Option<u64>,
    pub batch_bytes: usize,
    pub linger_ms: u64,
    pub in_flight: usize,
    pub acks: &'static str,
    /// Whether the producers were idempotent (not `--no-idempotence`).
    pub idempotent: bool,
    /// Records per second over all producers; null: as fast as possible.
    pub rate: Option<u64>,
    pub keys: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub debug_skip_every: Option<u64>,
}

/// The `--json` object.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub config: ReportConfig,
    pub produce: Throughput,
    /// Produce request -> acknowledgement, per batch (first attempts), from the producers.
    pub batch_latency_ms: Percentiles,
    /// Null with `--consumers 0`.
    pub consume: Option<Throughput>,
    pub verify: Verification,
}

impl Report {
    /// The human summary (several lines, ending in a newline).
    pub fn human(&self) -> String {
        let config = &self.config;
        let mut out = String::new();
        let amount = match (config.records, config.duration_secs) {
            (_, Some(seconds)) => format!("{seconds} s"),
            (Some(records), None) => format!("{records} records"),
            (None, None) => String::new(),
        };
        let _ = writeln!(
            out,
            "bench: topic {} ({}), {}, {}, {} B records, {}, acks {}{}, keys {}, rate {}",
            config.topic,
            plural(config.partitions.into(), "partition"),
            plural(config.producers.into(), "producer"),
            plural(config.consumers.into(), "consumer"),
            config.record_size,
            amount,
            config.acks,
            if config.idempotent {
                ""
            } else {
                ", not idempotent"
            },
            config.keys,
            config
                .rate
                .map_or("unlimited".to_owned(), |rate| format!("{rate} records/s")),
        );
        let direction = |out: &mut String, name: &str, latency: &str, side: &Throughput| {
            let _ = writeln!(
                out,
                "{name}: {} records in {:.3} s: {:.0} records/s, {:.2} MB/s",
                side.records, side.elapsed_secs, side.records_per_sec, side.mb_per_sec
            );
            let l = side.latency_ms;
            let _ = writeln!(
                out,
                "  latency {latency} (ms): p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  \
                 max {:.3}  mean {:.3}",
                l.p50, l.p90, l.p99, l.p999, l.max, l.mean
            );
        };
        direction(&mut out, "produce", "send -> ack", &self.produce);
        let b = self.batch_latency_ms;
        let _ = writeln!(
            out,
            "  latency per batch, request -> ack (ms): p50 {:.3}  p90 {:.3}  p99 {:.3}  \
             p99.9 {:.3}  max {:.3}  mean {:.3}",
            b.p50, b.p90, b.p99, b.p999, b.max, b.mean
        );
        match &self.consume {
            Some(consume) => direction(&mut out, "consume", "send -> consumed", consume),
            None => out.push_str("consume: none (--consumers 0)\n"),
        }
        let v = &self.verify;
        if v.checked {
            let _ = writeln!(
                out,
                "verify: {} produced, {} consumed, {} lost, {} duplicated, {} reordered, \
                 {} corrupt, {} failed deliveries",
                v.produced,
                v.consumed,
                v.lost,
                v.duplicated,
                v.reordered,
                v.corrupt,
                v.produce_errors
            );
        } else {
            let _ = writeln!(
                out,
                "verify: {} produced, {} failed deliveries (nothing read back)",
                v.produced, v.produce_errors
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ReportConfig {
        ReportConfig {
            broker: "127.0.0.1:7450".to_owned(),
            topic: "bench-1".to_owned(),
            topic_created: true,
            producers: 2,
            consumers: 1,
            partitions: 2,
            record_size: 100,
            records: Some(1000),
            duration_secs: None,
            batch_bytes: 1 << 20,
            linger_ms: 5,
            in_flight: 8,
            acks: "durable",
            idempotent: true,
            rate: None,
            keys: 0,
            debug_skip_every: None,
        }
    }

    #[test]
    fn percentiles_should_come_from_the_histogram_in_milliseconds() {
        let mut histogram = latency_histogram();
        // 1..=1000 ms, one sample each.
        for ms in 1..=1000u64 {
            record_latency_ns(&mut histogram, ms * 1_000_000);
        }
        let p = Percentiles::of(&histogram);
        let close = |value: f64, expected: f64| (value - expected).abs() <= expected * 0.002;
        assert!(close(p.p50, 500.0), "{p:?}");
        assert!(close(p.p90, 900.0), "{p:?}");
        assert!(close(p.p99, 990.0), "{p:?}");
        assert!(close(p.p999, 999.0), "{p:?}");
        assert!(close(p.max, 1000.0), "{p:?}");
        assert!(close(p.mean, 500.5), "{p:?}");
        assert_eq!(
            Percentiles::of(&latency_histogram()),
            Percentiles::default()
        );
        // Below a microsecond still counts, as 1 µs; beyond an hour saturates.
        record_latency_ns(&mut histogram, 10);
        record_latency_ns(&mut histogram, u64::MAX);
        assert_eq!(histogram.len(), 1002);
    }

    #[test]
    fn throughput_should_divide_by_elapsed_time() {
        let histogram = latency_histogram();
        let side = Throughput::new(1000, 2_000_000, Duration::from_millis(500), &histogram);
        assert_eq!(side.records_per_sec, 2000.0);
        assert_eq!(side.mb_per_sec, 4.0);
        let instant = Throughput::new(0, 0, Duration::ZERO, &histogram);
        assert_eq!(instant.records_per_sec, 0.0);
    }

    #[test]
    fn json_should_have_every_documented_key() {
        let mut histogram = latency_histogram();
        record_latency_ns(&mut histogram, 2_000_000);
        let side = Throughput::new(10, 1000, Duration::from_secs(1), &histogram);
        let report = Report {
            config: config(),
            produce: side,
            batch_latency_ms: Percentiles::default(),
            consume: Some(side),
            verify: Verification {
                checked: true,
                produced: 10,
                consumed: 10,
                ..Verification::default()
            },
        };
        let json = serde_json::to_value(&report).unwrap();
        for section in ["produce", "consume"] {
            for key in [
                "records_per_sec",
                "mb_per_sec",
                "records",
                "bytes",
                "elapsed_secs",
            ] {
                assert!(json[section][key].is_number(), "{section}.{key}");
            }
            for key in ["p50", "p90", "p99", "p999", "max", "mean"] {
                assert!(
                    json[section]["latency_ms"][key].is_number(),
                    "{section}.latency_ms.{key}"
                );
            }
        }
        for key in ["p50", "p90", "p99", "p999", "max", "mean"] {
            assert!(
                json["batch_latency_ms"][key].is_number(),
                "batch_latency_ms.{key}"
            );
        }
        for key in [
            "produced",
            "produce_errors",
            "consumed",
            "lost",
            "duplicated",
            "reordered",
            "corrupt",
        ] {
            assert!(json["verify"][key].is_u64(), "verify.{key}");
        }
        assert_eq!(json["verify"]["checked"], true);
        assert_eq!(json["config"]["acks"], "durable");
        assert_eq!(json["config"]["records"], 1000);
        assert!(json["config"]["rate"].is_null());
        assert!(json["config"].get("debug_skip_every").is_none());
        let produce_only = Report {
            consume: None,
            ..report
        };
        assert!(serde_json::to_value(&produce_only).unwrap()["consume"].is_null());
        assert!(produce_only.human().contains("consume: none"));
    }

    #[test]
    fn failure_should_name_every_count() {
        assert_eq!(Verification::default().failure(), None);
        let failed = Verification {
            checked: true,
            produced: 100,
            consumed: 90,
            lost: 10,
            ..Verification::default()
        };
        assert_eq!(
            failed.failure().unwrap(),
            "verification failed: 10 records lost, 0 duplicated, 0 reordered, 0 corrupt, \
             0 failed deliveries (of 100 produced, 90 consumed)"
        );
    }

    #[test]
    fn human_summary_should_show_rates_and_percentiles() {
        let mut histogram = latency_histogram();
        record_latency_ns(&mut histogram, 1_500_000);
        let side = Throughput::new(1000, 100_000, Duration::from_secs(2), &histogram);
        let report = Report {
            config: config(),
            produce: side,
            batch_latency_ms: Percentiles::default(),
            consume: Some(side),
            verify: Verification {
                checked: true,
                produced: 1000,
                consumed: 1000,
                ..Verification::default()
            },
        };
        let text = report.human();
        assert!(
            text.contains("produce: 1000 records in 2.000 s: 500 records/s, 0.05 MB/s"),
            "{text}"
        );
        assert!(text.contains("p50 1.500"), "{text}");
        assert!(text.contains("send -> consumed"), "{text}");
        assert!(text.contains("0 lost, 0 duplicated, 0 reordered"), "{text}");
    }
}
