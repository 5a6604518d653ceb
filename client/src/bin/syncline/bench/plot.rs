//! `--plot FILE.svg`: throughput over time (top) and the latency distribution (bottom) in one
//! SVG.
//!
//! The throughput chart shows rates over buckets of about 1/RATE_POINTS of the run, rounded to
//! a 1-2-5 step (a 50 ms run gets 1 ms buckets, an hour 20 s ones), so a short run still shows
//! its shape and a long one stays readable.
//!
//! The latency chart is the usual HdrHistogram percentile plot: the x axis is
//! `-log10(1 - quantile)`, so 90%, 99%, 99.9% ... are evenly spaced and the tail is visible.
//! Its log y axis is labelled at 1-2-5 steps (or every decade over a wide range), so a narrow
//! range still has several labels.

use std::path::Path;

use anyhow::Context as _;
use hdrhistogram::Histogram;
use plotters::prelude::*;

/// Counters sampled during the run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// Seconds since the run started.
    pub seconds: f64,
    /// Records acknowledged so far.
    pub produced: u64,
    /// Records consumed so far.
    pub consumed: u64,
}

/// (x, y) points of a line.
type Series = Vec<(f64, f64)>;

/// Throughput points the chart aims at over a run.
const RATE_POINTS: f64 = 100.0;

/// The smallest 1-2-5 step (..., 0.1, 0.2, 0.5, 1, 2, 5, 10, ...) at or above `value` (> 0).
fn step_at_least(value: f64) -> f64 {
    let decade = 10f64.powf(value.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|mantissa| mantissa * decade)
        .find(|step| *step >= value * (1.0 - 1e-9))
        .unwrap_or(10.0 * decade)
}

/// Buckets one throughput point averages over: smooths the bursts of acknowledgements (a
/// batch is acknowledged at once) without hiding the run's shape.
const RATE_WINDOW_BUCKETS: f64 = 4.0;

/// A counter at `seconds`, interpolated linearly between the samples (0 at the start).
fn counter_at(samples: &[Sample], seconds: f64, counter: fn(&Sample) -> u64) -> f64 {
    let mut before = (0.0, 0.0);
    for sample in samples {
        let point = (sample.seconds, counter(sample) as f64);
        if point.0 >= seconds {
            let span = point.0 - before.0;
            return if span <= 0.0 {
                point.1
            } else {
                before.1 + (point.1 - before.1) * (seconds - before.0) / span
            };
        }
        before = point;
    }
    before.1
}

/// Records/s at the end of each bucket of the run (see the module doc), each averaged over the
/// RATE_WINDOW_BUCKETS buckets before it: (produce, consume).
pub fn rates(samples: &[Sample]) -> (Series, Series) {
    let mut produce = vec![(0.0, 0.0)];
    let mut consume = vec![(0.0, 0.0)];
    let end = samples.last().map_or(0.0, |sample| sample.seconds);
    if end <= 0.0 {
        return (produce, consume);
    }
    let bucket = step_at_least(end / RATE_POINTS);
    let window = bucket * RATE_WINDOW_BUCKETS;
    let mut times: Vec<f64> = (1..)
        .map(|index| f64::from(index) * bucket)
        .take_while(|seconds| *seconds < end)
        .collect();
    times.push(end);
    for seconds in times {
        let from = (seconds - window).max(0.0);
        let rate = |counter: fn(&Sample) -> u64| {
            (counter_at(samples, seconds, counter) - counter_at(samples, from, counter))
                / (seconds - from)
        };
        produce.push((seconds, rate(|sample| sample.produced)));
        consume.push((seconds, rate(|sample| sample.consumed)));
    }
    (produce, consume)
}

/// The x position of `quantile` on the percentile axis.
fn quantile_x(quantile: f64) -> f64 {
    -(1.0 - quantile).max(1e-9).log10()
}

/// The percentile a position on the percentile axis stands for, as a label.
fn percentile_label(x: &f64) -> String {
    let percentile = 100.0 * (1.0 - 10f64.powf(-x));
    let label = format!("{percentile:.4}");
    let label = label.trim_end_matches('0').trim_end_matches('.');
    format!("{label}%")
}

/// Labelled values of a log axis over `low..high` (> 0): 1-2-5 steps, or only the powers of
/// ten when those would be more than `LOG_TICKS_MAX`; finer steps when a narrow range would
/// get fewer than `LOG_TICKS_MIN`.
fn log_ticks(low: f64, high: f64) -> Vec<f64> {
    const LOG_TICKS_MIN: usize = 4;
    const LOG_TICKS_MAX: usize = 12;
    let in_range = |mantissas: &[f64]| -> Vec<f64> {
        let mut ticks = Vec::new();
        let mut exponent = low.log10().floor() as i32;
        while 10f64.powi(exponent) <= high {
            for mantissa in mantissas {
                // Rounded to 12 significant digits, so that 3 * 0.1 is 0.3.
                let value = format!("{:.11e}", mantissa * 10f64.powi(exponent))
                    .parse::<f64>()
                    .unwrap_or(0.0);
                if value >= low && value <= high {
                    ticks.push(value);
                }
            }
            exponent += 1;
        }
        ticks
    };
    let steps: [&[f64]; 3] = [
        &[1.0, 2.0, 5.0],
        &[1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0],
        &[
            1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0, 7.0, 8.0, 9.0,
        ],
    ];
    let coarse = in_range(steps[0]);
    if coarse.len() > LOG_TICKS_MAX {
        return in_range(&[1.0]);
    }
    let mut ticks = coarse;
    for finer in &steps[1..] {
        if ticks.len() >= LOG_TICKS_MIN {
            break;
        }
        ticks = in_range(finer);
    }
    ticks
}

/// A tick label: the value with no trailing zeros (0.5, 2, 150).
fn tick_label(value: &f64) -> String {
    let text = format!("{value:.6}");
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// Last point of the percentile axis: 99.999%.
const QUANTILE_X_MAX: f64 = 5.0;
/// Points per decade of the percentile axis.
const POINTS_PER_DECADE: u32 = 20;

/// (x, latency ms) points of a histogram's percentile curve, up to its maximum.
fn percentile_curve(histogram: &Histogram<u64>) -> Vec<(f64, f64)> {
    if histogram.is_empty() {
        return Vec::new();
    }
    let mut points = Vec::new();
    for step in 0..=(QUANTILE_X_MAX as u32 * POINTS_PER_DECADE) {
        let x = f64::from(step) / f64::from(POINTS_PER_DECADE);
        let quantile = 1.0 - 10f64.powf(-x);
        points.push((x, histogram.value_at_quantile(quantile) as f64 / 1_000.0));
        // Past the last sample's quantile every point is the maximum.
        if quantile * histogram.len() as f64 >= (histogram.len() as f64 - 1.0) && step > 0 {
            break;
        }
    }
    points.push((
        quantile_x(1.0 - 1.0 / histogram.len() as f64).min(QUANTILE_X_MAX),
        histogram.max() as f64 / 1_000.0,
    ));
    points
}

/// Draws the SVG to `path`.
pub fn draw(
    path: &Path,
    title: &str,
    samples: &[Sample],
    produce_latency: &Histogram<u64>,
    end_to_end_latency: Option<&Histogram<u64>>,
) -> anyhow::Result<()> {
    draw_inner(path, title, samples, produce_latency, end_to_end_latency)
        .with_context(|| format!("cannot draw the plot to {}", path.display()))
}

fn draw_inner(
    path: &Path,
    title: &str,
    samples: &[Sample],
    produce_latency: &Histogram<u64>,
    end_to_end_latency: Option<&Histogram<u64>>,
) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (1000, 900)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 18))?;
    let (top, bottom) = root.split_vertically(430);

    let (produce_rates, consume_rates) = rates(samples);
    let seconds_max = samples
        .last()
        .map_or(1.0, |sample| sample.seconds)
        .max(0.001);
    let rate_max = produce_rates
        .iter()
        .chain(&consume_rates)
        .map(|&(_, rate)| rate)
        .fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(&top)
        .caption("Throughput (records/s)", ("sans-serif", 16))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..seconds_max, 0.0..rate_max * 1.1)?;
    chart
        .configure_mesh()
        .x_desc("time (s)")
        .y_desc("records/s")
        .y_label_formatter(&|rate| format!("{rate:.0}"))
        .draw()?;
    chart
        .draw_series(LineSeries::new(produce_rates, BLUE.stroke_width(2)))?
        .label("produce (acknowledged)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    if end_to_end_latency.is_some() {
        chart
            .draw_series(LineSeries::new(consume_rates, RED.stroke_width(2)))?
            .label("consume")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;

    let produce_curve = percentile_curve(produce_latency);
    let end_to_end_curve = end_to_end_latency.map(percentile_curve).unwrap_or_default();
    let latencies = || {
        produce_curve
            .iter()
            .chain(&end_to_end_curve)
            .map(|&(_, ms)| ms)
    };
    // The data's range with some room, at least a factor of 4 (so that it gets several labels).
    let data_min = latencies().fold(f64::INFINITY, f64::min).max(0.001);
    let data_min = if data_min.is_finite() { data_min } else { 1.0 };
    let data_max = latencies().fold(data_min, f64::max);
    let (latency_low, latency_high) = (data_min * 0.8, (data_max * 1.25).max(data_min * 4.0));
    let mut chart = ChartBuilder::on(&bottom)
        .caption("Latency by percentile (ms, log scale)", ("sans-serif", 16))
        .margin(15)
        .margin_right(40)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(
            0.0..QUANTILE_X_MAX,
            (latency_low..latency_high)
                .log_scale()
                .with_key_points(log_ticks(latency_low, latency_high)),
        )?;
    chart
        .configure_mesh()
        // The log scale's minor lines would crowd each decade.
        .light_line_style(TRANSPARENT)
        .x_desc("percentile")
        .y_desc("latency (ms)")
        .x_labels(6)
        .x_label_formatter(&percentile_label)
        .y_label_formatter(&tick_label)
        .draw()?;
    chart
        .draw_series(LineSeries::new(produce_curve, BLUE.stroke_width(2)))?
        .label("produce: send -> ack")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    if end_to_end_latency.is_some() {
        chart
            .draw_series(LineSeries::new(end_to_end_curve, RED.stroke_width(2)))?
            .label("end to end: send -> consumed")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::report::{latency_histogram, record_latency_ns};

    /// Samples of a steady run: `per_second` records/s over `seconds`, sampled every `step`.
    fn steady(seconds: f64, step: f64, per_second: f64) -> Vec<Sample> {
        let count = (seconds / step).round() as u32;
        (1..=count)
            .map(|index| {
                let at = f64::from(index) * step;
                Sample {
                    seconds: at,
                    produced: (at * per_second).round() as u64,
                    consumed: (at * per_second).round() as u64,
                }
            })
            .collect()
    }

    #[test]
    fn given_steady_run_rates_should_be_that_rate_in_buckets_of_a_percent_of_the_run() {
        let (produce, consume) = rates(&steady(10.0, 0.1, 1000.0));
        assert_eq!(produce.len(), 101, "{produce:?}");
        assert_eq!(produce[0], (0.0, 0.0));
        for &(seconds, rate) in &produce[1..] {
            assert!((rate - 1000.0).abs() < 1.0, "{seconds}: {rate}");
        }
        assert_eq!(produce, consume);
        assert_eq!(step_at_least(0.003), 0.005);
        assert_eq!(step_at_least(0.01), 0.01);
        assert_eq!(step_at_least(18.0), 20.0);
    }

    #[test]
    fn given_very_short_run_rates_should_still_have_many_points() {
        // 40 ms sampled every millisecond (what the progress thread does at the start).
        let (produce, _) = rates(&steady(0.04, 0.001, 100_000.0));
        assert!(produce.len() >= 40, "{produce:?}");
        // A single sample (the run ended before the first tick) is a line, not a point.
        let one = [Sample {
            seconds: 0.02,
            produced: 100,
            consumed: 0,
        }];
        assert!(rates(&one).0.len() > 10);
    }

    #[test]
    fn given_narrow_latency_range_log_axis_should_label_one_two_five_steps() {
        assert_eq!(log_ticks(0.8, 60.0), [1.0, 2.0, 5.0, 10.0, 20.0, 50.0]);
        // Three 1-2-5 values are too few: every digit, plus 1.5.
        assert_eq!(log_ticks(0.095, 0.55), [0.1, 0.15, 0.2, 0.3, 0.4, 0.5]);
        // Narrower still: finer steps, at least four labels.
        assert!(log_ticks(1.1, 1.9).len() >= 4, "{:?}", log_ticks(1.1, 1.9));
        // Wide: decades only.
        assert_eq!(
            log_ticks(0.01, 10_000.0),
            [0.01, 0.1, 1.0, 10.0, 100.0, 1000.0, 10_000.0]
        );
        assert_eq!(tick_label(&0.3), "0.3");
        assert_eq!(tick_label(&20.0), "20");
    }

    #[test]
    fn percentile_axis_should_label_nines() {
        assert_eq!(percentile_label(&0.0), "0%");
        assert_eq!(percentile_label(&1.0), "90%");
        assert_eq!(percentile_label(&3.0), "99.9%");
        assert!((quantile_x(0.99) - 2.0).abs() < 1e-9);
    }

    /// The y-axis labels of the latency chart (the lower one) in an SVG the chart drew.
    fn latency_axis_labels(svg: &str) -> Vec<f64> {
        svg.split("<text")
            .skip(1)
            .filter(|text| text.contains("text-anchor=\"end\""))
            .filter(|text| {
                let y = text
                    .split("y=\"")
                    .nth(1)
                    .and_then(|rest| rest.split('"').next());
                y.and_then(|y| y.parse::<f64>().ok())
                    .is_some_and(|y| y > 450.0)
            })
            .filter_map(|text| {
                let content = text.split_once('>')?.1.split_once("</text>")?.0;
                content.trim().parse().ok()
            })
            .collect()
    }

    #[test]
    fn given_latencies_over_two_decades_should_label_the_axis_in_one_two_five_steps() {
        let mut produce = latency_histogram();
        for ms in 1..=60u64 {
            record_latency_ns(&mut produce, ms * 1_000_000);
        }
        let dir = tempfile_dir("labels");
        let path = dir.join("bench.svg");
        let samples = [Sample {
            seconds: 0.05,
            produced: 60,
            consumed: 0,
        }];
        draw(&path, "test", &samples, &produce, None).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        let labels = latency_axis_labels(&svg);
        // Before: only the decades (1 and 10) were labelled.
        assert_eq!(labels, [1.0, 2.0, 5.0, 10.0, 20.0, 50.0], "{labels:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempfile_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("syncline-plot-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn given_histograms_should_write_an_svg() {
        let mut produce = latency_histogram();
        let mut end_to_end = latency_histogram();
        for ms in 1..=100u64 {
            record_latency_ns(&mut produce, ms * 100_000);
            record_latency_ns(&mut end_to_end, ms * 300_000);
        }
        let curve = percentile_curve(&produce);
        assert!(curve.windows(2).all(|pair| pair[0].1 <= pair[1].1));
        assert_eq!(curve.last().unwrap().1, produce.max() as f64 / 1000.0);
        let dir = std::env::temp_dir().join(format!("syncline-plot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bench.svg");
        let samples = [Sample {
            seconds: 1.0,
            produced: 100,
            consumed: 100,
        }];
        draw(&path, "test", &samples, &produce, Some(&end_to_end)).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..50]);
        assert!(svg.contains("end to end"));
        // Produce only, and an empty histogram, still draw.
        draw(&path, "test", &[], &latency_histogram(), None).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
