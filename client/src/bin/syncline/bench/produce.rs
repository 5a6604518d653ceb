//! One bench producer: sends its share of the records (paced when `--rate` is set) and, in a
//! collector task, measures each record's send -> acknowledgement latency as deliveries
//! complete.
//!
//! Deliveries are handed to the collector in chunks (no channel operation per record) and
//! queued per partition: batches of one partition are acknowledged in order, so the collector
//! needs to poll only the oldest delivery of each partition, and many batches stay in flight.

use std::collections::VecDeque;
use std::future::Future as _;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use syncline_client::{DeliveryFuture, Producer};
use tokio::sync::mpsc;

use super::payload::{Clock, Keys, PayloadWriter};
use super::report::{latency_histogram, record_latency_ns};
use super::Counters;

/// Deliveries per chunk handed to the collector: amortises the channel over many records.
const CHUNK_RECORDS: usize = 256;
/// Longest a delivery waits in the producer's chunk before the collector gets it, so a slow
/// (paced) producer's latencies are still measured when the acknowledgement arrives.
const CHUNK_AGE_MAX: Duration = Duration::from_millis(1);
/// Chunks queued for the collector; beyond this the producer waits (bounds memory when the
/// collector falls behind, which it should not: the client's buffer budget bounds records in
/// flight first).
const CHUNKS_QUEUED_MAX: usize = 4096;

/// What one producer does.
#[derive(Debug)]
pub struct ProducerPlan {
    pub id: u32,
    /// This producer's records (with `--duration`, the most one producer may send).
    pub records: u64,
    /// With `--duration`: when to stop.
    pub deadline: Option<Instant>,
    /// Records per second for this producer; `None`: as fast as possible.
    pub rate: Option<f64>,
    pub record_size: usize,
    pub keys: Arc<Keys>,
    pub clock: Clock,
    pub started: Instant,
    pub counters: Arc<Counters>,
}

/// What one producer did.
#[derive(Debug)]
pub struct ProduceOutcome {
    pub id: u32,
    /// Records enqueued (sequences 0..sent).
    pub sent: u64,
    pub acknowledged: u64,
    pub acknowledged_bytes: u64,
    pub failed: u64,
    pub first_error: Option<syncline_client::Error>,
    /// Send -> acknowledgement, µs.
    pub latency: Histogram<u64>,
    pub last_acknowledged_at: Option<Instant>,
}

/// A record on its way: when it was sent, its key and value bytes, its delivery.
#[derive(Debug)]
struct Pending {
    sent_ns: u64,
    bytes: u32,
    delivery: DeliveryFuture,
}

/// Runs `plan` on `producer`. Fails only when a record cannot be enqueued at all; failed
/// deliveries are counted in the outcome.
pub async fn run(producer: Producer, plan: ProducerPlan) -> anyhow::Result<ProduceOutcome> {
    let (chunks, chunks_received) = mpsc::channel(CHUNKS_QUEUED_MAX);
    // Unconstrained: polling a delivery spends tokio's cooperative budget, which would make
    // the collector yield every 128 records and see acknowledgements late. It only ever polls
    // what is ready, so it cannot starve anyone for long.
    let collector = tokio::spawn(tokio::task::unconstrained(collect(
        chunks_received,
        producer.partitions(),
        plan.clock,
        plan.counters.clone(),
    )));
    let mut writer = PayloadWriter::new(plan.record_size);
    let mut chunk: Vec<Pending> = Vec::with_capacity(CHUNK_RECORDS);
    let mut chunk_opened = plan.started;
    let mut sequence: u64 = 0;
    let keys = u64::from(plan.keys.len());
    let enqueued = loop {
        if sequence >= plan.records {
            break Ok(());
        }
        let now = Instant::now();
        if plan.deadline.is_some_and(|deadline| now >= deadline) {
            break Ok(());
        }
        if let Some(rate) = plan.rate {
            // Record n is due n / rate after the start: the average rate holds even though
            // the timer wakes in whole milliseconds (records due meanwhile go together).
            let due = plan.started + Duration::from_secs_f64(sequence as f64 / rate);
            if due > now {
                if !chunk.is_empty() && chunks.send(std::mem::take(&mut chunk)).await.is_err() {
                    break Ok(());
                }
                tokio::time::sleep_until(due.into()).await;
                continue;
            }
        }
        let key_index = (keys > 0).then(|| (sequence % keys) as u32);
        let key = key_index.map(|index| plan.keys.get(index));
        let sent_ns = plan.clock.ns(now);
        let value = writer.encode(plan.id, key_index, sequence, sent_ns);
        let bytes = value.len() + key.map_or(0, <[u8]>::len);
        // The record's timestamp is its send time: one clock read per record, not two.
        let timestamp = i64::try_from(sent_ns / 1_000_000).unwrap_or(i64::MAX);
        let delivery = match producer
            .enqueue_with_timestamp(key, Some(value), &[], timestamp)
            .await
        {
            Ok(delivery) => delivery,
            Err(error) => break Err(error),
        };
        sequence += 1;
        if chunk.is_empty() {
            chunk_opened = now;
        }
        chunk.push(Pending {
            sent_ns,
            bytes: u32::try_from(bytes).unwrap_or(u32::MAX),
            delivery,
        });
        if chunk.len() >= CHUNK_RECORDS || now.duration_since(chunk_opened) >= CHUNK_AGE_MAX {
            let full = std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK_RECORDS));
            if chunks.send(full).await.is_err() {
                break Ok(());
            }
        }
    };
    if !chunk.is_empty() {
        let _ = chunks.send(chunk).await;
    }
    drop(chunks);
    // Seal the lingering batches now rather than after the linger.
    producer.flush().await;
    drop(producer);
    let collected = collector
        .await
        .map_err(|error| anyhow::anyhow!("producer {} collector failed: {error}", plan.id))?;
    if let Err(error) = enqueued {
        return Err(anyhow::Error::new(error).context(format!("producer {}", plan.id)));
    }
    Ok(ProduceOutcome {
        id: plan.id,
        sent: sequence,
        acknowledged: collected.acknowledged,
        acknowledged_bytes: collected.bytes,
        failed: collected.failed,
        first_error: collected.first_error,
        latency: collected.latency,
        last_acknowledged_at: collected.last_acknowledged_at,
    })
}

#[derive(Debug)]
struct Collected {
    acknowledged: u64,
    bytes: u64,
    failed: u64,
    first_error: Option<syncline_client::Error>,
    latency: Histogram<u64>,
    last_acknowledged_at: Option<Instant>,
}

/// Resolves deliveries as they complete until the producer is done and every delivery has.
async fn collect(
    mut chunks: mpsc::Receiver<Vec<Pending>>,
    partitions: u32,
    clock: Clock,
    counters: Arc<Counters>,
) -> Collected {
    let mut queues: Vec<VecDeque<Pending>> =
        (0..partitions.max(1)).map(|_| VecDeque::new()).collect();
    let last_queue = queues.len() - 1;
    let mut producing = true;
    let mut collected = Collected {
        acknowledged: 0,
        bytes: 0,
        failed: 0,
        first_error: None,
        latency: latency_histogram(),
        last_acknowledged_at: None,
    };
    std::future::poll_fn(|context| {
        while producing {
            match chunks.poll_recv(context) {
                Poll::Ready(Some(chunk)) => {
                    for pending in chunk {
                        // The producer picks a partition below its partition count.
                        let queue = (pending.delivery.partition() as usize).min(last_queue);
                        queues[queue].push_back(pending);
                    }
                }
                Poll::Ready(None) => producing = false,
                Poll::Pending => break,
            }
        }
        // One clock reading for everything that completed together.
        let mut now: Option<(Instant, u64)> = None;
        let mut acknowledged: u64 = 0;
        for queue in &mut queues {
            while let Some(front) = queue.front_mut() {
                let Poll::Ready(result) = Pin::new(&mut front.delivery).poll(context) else {
                    break;
                };
                let (_, now_ns) = *now.get_or_insert_with(|| {
                    let instant = Instant::now();
                    (instant, clock.ns(instant))
                });
                match result {
                    Ok(_) => {
                        record_latency_ns(
                            &mut collected.latency,
                            now_ns.saturating_sub(front.sent_ns),
                        );
                        acknowledged += 1;
                        collected.bytes += u64::from(front.bytes);
                    }
                    Err(error) => {
                        collected.failed += 1;
                        collected.first_error.get_or_insert(error);
                    }
                }
                queue.pop_front();
            }
        }
        if acknowledged > 0 {
            collected.acknowledged += acknowledged;
            collected.last_acknowledged_at = now.map(|(instant, _)| instant);
            counters.produced.fetch_add(acknowledged, Ordering::Relaxed);
        }
        if !producing && queues.iter().all(VecDeque::is_empty) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    collected
}
