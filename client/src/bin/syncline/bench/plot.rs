//! `--plot FILE.svg`: throughput over time (top) and the latency distribution (bottom) in one
//! SVG.
//!
//! The latency chart is the usual HdrHistogram percentile plot: the x axis is
//! `-log10(1 - quantile)`, so 90%, 99%, 99.9% ... are evenly spaced and the tail is visible.

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

/// Records/s between consecutive samples, at the end of each interval: (produce, consume).
pub fn rates(samples: &[Sample]) -> (Series, Series) {
    let mut produce = vec![(0.0, 0.0)];
    let mut consume = vec![(0.0, 0.0)];
    let mut previous = Sample {
        seconds: 0.0,
        produced: 0,
        consumed: 0,
    };
    for sample in samples {
        let interval = sample.seconds - previous.seconds;
        if interval <= 0.0 {
            continue;
        }
        let rate = |now: u64, before: u64| now.saturating_sub(before) as f64 / interval;
        produce.push((sample.seconds, rate(sample.produced, previous.produced)));
        consume.push((sample.seconds, rate(sample.consumed, previous.consumed)));
        previous = *sample;
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
    let latency_min = latencies().fold(f64::INFINITY, f64::min).clamp(0.001, 1.0);
    let latency_max = latencies().fold(latency_min * 10.0, f64::max);
    let mut chart = ChartBuilder::on(&bottom)
        .caption("Latency by percentile (ms, log scale)", ("sans-serif", 16))
        .margin(15)
        .margin_right(40)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(
            0.0..QUANTILE_X_MAX,
            (latency_min * 0.8..latency_max * 1.5).log_scale(),
        )?;
    chart
        .configure_mesh()
        // The log scale's minor lines would crowd each decade.
        .light_line_style(TRANSPARENT)
        .x_desc("percentile")
        .y_desc("latency (ms)")
        .x_labels(6)
        .x_label_formatter(&percentile_label)
        .y_label_formatter(&|ms| format!("{ms}"))
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

    #[test]
    fn rates_should_be_differences_over_intervals() {
        let samples = [
            Sample {
                seconds: 0.5,
                produced: 100,
                consumed: 50,
            },
            Sample {
                seconds: 1.0,
                produced: 300,
                consumed: 250,
            },
        ];
        let (produce, consume) = rates(&samples);
        assert_eq!(produce, [(0.0, 0.0), (0.5, 200.0), (1.0, 400.0)]);
        assert_eq!(consume, [(0.0, 0.0), (0.5, 100.0), (1.0, 400.0)]);
    }

    #[test]
    fn percentile_axis_should_label_nines() {
        assert_eq!(percentile_label(&0.0), "0%");
        assert_eq!(percentile_label(&1.0), "90%");
        assert_eq!(percentile_label(&3.0), "99.9%");
        assert!((quantile_x(0.99) - 2.0).abs() < 1e-9);
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
