//! One bench consumer: reads its partitions, checks every record with the shared
//! [`Verifier`] and measures send -> consumed latency, until each of its partitions reaches
//! the end offset the producers left (known once they are done).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::FutureExt as _;
use hdrhistogram::Histogram;
use syncline_client::Consumer;
use tokio::sync::watch;

use super::payload::{Clock, Verdict, VerdictCounts, Verifier};
use super::report::{latency_histogram, record_latency_ns};
use super::Counters;

/// Once the end offsets are known, a consumer that gets nothing for this long stops: what it
/// did not read is reported lost. (Records are readable once durable; with the broker's
/// default fsync policy that takes milliseconds.)
pub const DRAIN_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Records counted locally before the shared progress counter is updated.
const PUBLISH_EVERY: u64 = 1024;

/// Per partition, the offset after the last record produced: set once the producers are done.
pub type EndOffsets = Option<Arc<Vec<u64>>>;

/// What one consumer does.
#[derive(Debug)]
pub struct ConsumerPlan {
    pub id: u32,
    pub verifier: Arc<Verifier>,
    /// Test hook (`--debug-skip-every`): drop every N-th record received before verification.
    pub skip_every: Option<u64>,
    pub clock: Clock,
    pub counters: Arc<Counters>,
    pub end_offsets: watch::Receiver<EndOffsets>,
}

/// What one consumer did.
#[derive(Debug)]
pub struct ConsumeOutcome {
    pub counts: VerdictCounts,
    /// Key and value bytes of the records checked.
    pub bytes: u64,
    /// Send -> consumed, µs, of records seen for the first time.
    pub latency: Histogram<u64>,
    pub last_record_at: Option<Instant>,
}

/// Which assigned partitions have reached their end offset.
struct Progress {
    reached: Vec<bool>,
    remaining: usize,
}

impl Progress {
    /// Marks `partition` done when `consumer` is at or past its end; true when all are.
    fn update(&mut self, consumer: &Consumer, ends: &[u64], partition: u32) -> bool {
        let index = partition as usize;
        let end = ends.get(index).copied().unwrap_or(0);
        if index < self.reached.len()
            && !self.reached[index]
            && consumer
                .position(partition)
                .is_some_and(|position| position >= end)
        {
            self.reached[index] = true;
            self.remaining -= 1;
        }
        self.remaining == 0
    }
}

pub async fn run(mut consumer: Consumer, mut plan: ConsumerPlan) -> anyhow::Result<ConsumeOutcome> {
    let assignment = consumer.assignment().to_vec();
    let partitions = assignment.iter().max().map_or(0, |&last| last as usize + 1);
    let mut progress = Progress {
        reached: vec![true; partitions],
        remaining: assignment.len(),
    };
    for &partition in &assignment {
        progress.reached[partition as usize] = false;
    }
    let mut outcome = ConsumeOutcome {
        counts: VerdictCounts::default(),
        bytes: 0,
        latency: latency_histogram(),
        last_record_at: None,
    };
    let mut ends: EndOffsets = None;
    let mut since_skip: u64 = 0;
    let mut unpublished: u64 = 0;
    loop {
        let next = match consumer.recv().now_or_never() {
            Some(next) => next,
            None => {
                plan.counters
                    .consumed
                    .fetch_add(std::mem::take(&mut unpublished), Ordering::Relaxed);
                match &ends {
                    Some(_) => {
                        match tokio::time::timeout(DRAIN_IDLE_TIMEOUT, consumer.recv()).await {
                            Ok(next) => next,
                            // Stalled: the report counts what is missing.
                            Err(_) => break,
                        }
                    }
                    None => tokio::select! {
                        next = consumer.recv() => next,
                        changed = plan.end_offsets.changed() => {
                            if changed.is_err() {
                                // The run was abandoned.
                                break;
                            }
                            ends = plan.end_offsets.borrow_and_update().clone();
                            if let Some(ends) = &ends {
                                let mut done = progress.remaining == 0;
                                for &partition in &assignment {
                                    done = progress.update(&consumer, ends, partition);
                                }
                                if done {
                                    break;
                                }
                            }
                            continue;
                        }
                    },
                }
            }
        };
        let record = match next {
            Some(Ok(record)) => record,
            Some(Err(error)) => {
                return Err(error).with_context(|| format!("consumer {}", plan.id));
            }
            None => anyhow::bail!(
                "consumer {}: its partitions stopped before reaching their end",
                plan.id
            ),
        };
        unpublished += 1;
        // Test hook: pretend every `skip_every`-th record never arrived.
        let skipped = match plan.skip_every {
            Some(every) => {
                since_skip += 1;
                let skip = since_skip == every;
                if skip {
                    since_skip = 0;
                }
                skip
            }
            None => false,
        };
        if !skipped {
            let verdict = plan.verifier.check(
                record.partition,
                record.key.as_deref(),
                record.value.as_deref(),
            );
            outcome.counts.count(verdict);
            let now = Instant::now();
            if let Verdict::InOrder { sent_ns } | Verdict::Reordered { sent_ns } = verdict {
                record_latency_ns(
                    &mut outcome.latency,
                    plan.clock.ns(now).saturating_sub(sent_ns),
                );
            }
            outcome.bytes += (record.key.as_ref().map_or(0, |key| key.len())
                + record.value.as_ref().map_or(0, |value| value.len()))
                as u64;
            outcome.last_record_at = Some(now);
        }
        if unpublished >= PUBLISH_EVERY {
            plan.counters
                .consumed
                .fetch_add(std::mem::take(&mut unpublished), Ordering::Relaxed);
        }
        if let Some(ends) = &ends {
            if progress.update(&consumer, ends, record.partition) {
                break;
            }
        }
    }
    plan.counters
        .consumed
        .fetch_add(unpublished, Ordering::Relaxed);
    Ok(outcome)
}
