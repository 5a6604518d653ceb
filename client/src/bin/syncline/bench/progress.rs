//! Samples the run's counters for the plot and shows progress on stderr: a live bar when
//! stderr is a terminal, else one plain line per second. It runs on its own thread, so that
//! sampling keeps its pace while producers and consumers keep the async runtime busy.

use std::io::IsTerminal as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use std::sync::mpsc;

use super::plot::Sample;
use super::Counters;

/// How often the counters are sampled (the plot's resolution): about one sample per
/// 1/SAMPLES_PER_RUN of the time run so far, so that a run of a few milliseconds still gets a
/// curve and a long one is sampled every 100 ms.
const SAMPLE_INTERVAL_MIN: Duration = Duration::from_millis(1);
const SAMPLE_INTERVAL_MAX: Duration = Duration::from_millis(100);
const SAMPLES_PER_RUN: u32 = 400;

/// The pause before the next sample, `elapsed` into the run.
fn sample_interval(elapsed: Duration) -> Duration {
    (elapsed / SAMPLES_PER_RUN).clamp(SAMPLE_INTERVAL_MIN, SAMPLE_INTERVAL_MAX)
}
/// Samples kept; past this every other one is dropped and sampling slows down by half, so a
/// long `--duration` run keeps a bounded series (an hour at full resolution).
const SAMPLES_MAX: usize = 36_000;
/// How often a plain progress line is printed when stderr is not a terminal.
const PLAIN_LINE_INTERVAL: Duration = Duration::from_secs(1);

/// How progress is shown.
enum Display {
    Bar(ProgressBar),
    Plain,
}

/// Runs until `stop` receives (or its sender is dropped: a failed run); returns the samples.
/// Blocks: call it on a thread of its own.
pub fn run(
    counters: Arc<Counters>,
    started: Instant,
    total_records: Option<u64>,
    stop: mpsc::Receiver<()>,
) -> Vec<Sample> {
    let mut display = if std::io::stderr().is_terminal() {
        Display::Bar(bar(total_records))
    } else {
        Display::Plain
    };
    let mut samples: Vec<Sample> = Vec::new();
    let mut stride: u32 = 1;
    let mut ticks: u32 = 0;
    let take = || Sample {
        seconds: started.elapsed().as_secs_f64(),
        produced: counters.produced.load(Ordering::Relaxed),
        consumed: counters.consumed.load(Ordering::Relaxed),
    };
    // Rates on the progress line are over the last second.
    let mut window = (Duration::ZERO, 0u64, 0u64);
    // A message or a dropped sender (a failed run) stops the loop; a timeout is the next tick.
    while let Err(mpsc::RecvTimeoutError::Timeout) =
        stop.recv_timeout(sample_interval(started.elapsed()))
    {
        let sample = take();
        ticks += 1;
        if ticks == stride {
            ticks = 0;
            samples.push(sample);
            if samples.len() >= SAMPLES_MAX {
                samples = samples.into_iter().step_by(2).collect();
                stride *= 2;
            }
        }
        let elapsed = Duration::from_secs_f64(sample.seconds);
        if elapsed - window.0 >= PLAIN_LINE_INTERVAL {
            let seconds = (elapsed - window.0).as_secs_f64();
            let produce_rate = (sample.produced - window.1) as f64 / seconds;
            let consume_rate = (sample.consumed - window.2) as f64 / seconds;
            let line = format!(
                "produced {} ({produce_rate:.0} records/s), consumed {} ({consume_rate:.0} records/s)",
                sample.produced, sample.consumed
            );
            match &mut display {
                Display::Bar(bar) => bar.set_message(line),
                Display::Plain => eprintln!("bench: {:.0} s: {line}", elapsed.as_secs_f64()),
            }
            window = (elapsed, sample.produced, sample.consumed);
        }
        if let (Display::Bar(bar), Some(_)) = (&display, total_records) {
            bar.set_position(sample.produced);
        }
    }
    // A last interval much shorter than the others would show a meaningless spike: fold it
    // into the one before.
    let last = take();
    let interval = sample_interval(Duration::from_secs_f64(last.seconds)).as_secs_f64();
    if samples
        .last()
        .is_some_and(|previous| last.seconds - previous.seconds < interval / 2.0)
    {
        samples.pop();
    }
    samples.push(last);
    if let Display::Bar(bar) = display {
        bar.finish_and_clear();
    }
    samples
}

/// A bar of records acknowledged out of `--records`; a spinner with `--duration`.
fn bar(total_records: Option<u64>) -> ProgressBar {
    let (bar, template) = match total_records {
        Some(total) => (
            ProgressBar::new(total),
            "{spinner} [{elapsed_precise}] {bar:30} {percent:>3}% {msg}",
        ),
        None => (
            ProgressBar::new_spinner(),
            "{spinner} [{elapsed_precise}] {msg}",
        ),
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}
