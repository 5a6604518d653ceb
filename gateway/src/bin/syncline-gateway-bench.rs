//! `syncline-gateway-bench`: many WebSocket or SSE subscribers to one table from one process,
//! and a writer putting changes at a fixed rate, to measure the gateway's fan-out.
//!
//! ## What it measures
//! 1. **Connect**: `--subscribers` clients connect (at most [`CONNECTS_IN_FLIGHT`] at once)
//!    and subscribe to `--table`; each waits for its `caught-up`.
//! 2. **Idle memory**: the gateway's resident memory (`/proc/PID/status` `VmRSS`, with
//!    `--gateway-pid`) once the first subscriber is caught up (the gateway has then opened the
//!    table) and once all are idle, per subscriber after the first.
//! 3. **Fan-out**: a writer (the client crate, straight to the brokers) puts `--rate` changes
//!    per second for `--duration`; each value carries its sequence number. The latency of a
//!    delivery is from the moment the writer's put was acknowledged to the moment the frame
//!    was read at the subscriber (a delivery can beat the acknowledgement to the writer: it
//!    then counts as 0). The p50/p99/max are over every (change, subscriber) pair; every
//!    subscriber must get every change (the summary counts what was missing).
//! 4. **CPU**: CPU seconds the broker process used during the fan-out phase
//!    (`/proc/PID/stat`, with `--broker-pid`), to show it does not depend on the subscriber
//!    count; and the gateway's (with `--gateway-pid`), per delivery.
//!
//! The summary is a table, or one JSON object with `--json`. Exit code 0 when every
//! subscriber got every change, 1 otherwise.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use futures_util::{SinkExt as _, StreamExt as _};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use syncline_client::{CleanupPolicy, Client, TopicConfig};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_tungstenite::tungstenite::Message;

/// Subscribers connecting at once.
const CONNECTS_IN_FLIGHT: usize = 256;
/// Latency histogram shards (subscribers flush their samples into shard `i % SHARDS`).
const SHARDS: usize = 64;
/// Samples a subscriber keeps before flushing them into its shard.
const FLUSH_EVERY: usize = 256;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Transport {
    /// `GET /v1/ws`, one subscription per socket.
    Ws,
    /// `GET /v1/watch/{table}` (Server-Sent Events).
    Sse,
}

/// Fan-out benchmark of syncline-gateway: many subscribers to one table, a writer at a fixed
/// rate; latency from put acknowledged to delivered at every subscriber, gateway memory per
/// idle subscriber, broker CPU.
#[derive(Debug, Parser)]
#[command(name = "syncline-gateway-bench", version)]
struct Flags {
    /// The gateway, HOST:PORT
    #[arg(long, default_value = syncline_gateway::DEFAULT_LISTEN)]
    gateway: String,
    /// The brokers the writer puts to, HOST:PORT[,...]
    #[arg(long, default_value = "127.0.0.1:7450")]
    broker: String,
    /// The table (created with one partition if absent)
    #[arg(long, default_value = "gateway-bench")]
    table: String,
    /// Subscribers
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    /// How subscribers connect
    #[arg(long, value_enum, default_value_t = Transport::Ws)]
    transport: Transport,
    /// Changes per second the writer puts
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Seconds the writer runs
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Distinct keys the writer cycles through
    #[arg(long, default_value_t = 1000)]
    keys: u64,
    /// Bytes per value (at least the sequence number's)
    #[arg(long, default_value_t = 64)]
    value_bytes: usize,
    /// The gateway's process id, to read its memory
    #[arg(long)]
    gateway_pid: Option<u32>,
    /// The broker's process id, to read its CPU time
    #[arg(long)]
    broker_pid: Option<u32>,
    /// Print one JSON object instead of a table
    #[arg(long)]
    json: bool,
}

/// Put acknowledgements, by sequence number: nanoseconds since the run's start (0 = not yet).
struct Acks {
    start: Instant,
    at: Vec<AtomicU64>,
}

impl Acks {
    fn latency_us(&self, seq: usize, now: Instant) -> u64 {
        let acked = self.at.get(seq).map_or(0, |a| a.load(Ordering::Acquire));
        let now = now.duration_since(self.start).as_nanos() as u64;
        if acked == 0 || now < acked {
            0
        } else {
            (now - acked) / 1000
        }
    }
}

/// What every subscriber shares.
struct Shared {
    acks: Acks,
    shards: Vec<parking_lot::Mutex<Histogram<u64>>>,
    delivered: AtomicU64,
    caught_up: AtomicUsize,
    failed: AtomicUsize,
    /// Set when the run is over: subscribers flush their samples and end.
    stop: tokio::sync::watch::Receiver<bool>,
}

/// A subscriber's view: the sequence numbers it saw.
struct Seen {
    index: usize,
    samples: Vec<u64>,
    count: u64,
}

impl Seen {
    fn record(&mut self, shared: &Shared, value: &str, now: Instant) {
        let Some(seq) = sequence(value) else { return };
        self.samples.push(shared.acks.latency_us(seq, now));
        self.count += 1;
        if self.samples.len() >= FLUSH_EVERY {
            self.flush(shared);
        }
    }

    fn flush(&mut self, shared: &Shared) {
        shared
            .delivered
            .fetch_add(self.samples.len() as u64, Ordering::Relaxed);
        let mut histogram = shared.shards[self.index % SHARDS].lock();
        for sample in self.samples.drain(..) {
            let _ = histogram.record(sample);
        }
    }
}

/// The sequence number a value starts with (`"<seq>:..."`); values of other writers are
/// ignored.
fn sequence(value: &str) -> Option<usize> {
    value.split_once(':')?.0.strip_prefix('#')?.parse().ok()
}

/// One WebSocket subscriber; `slot` (a connect slot) is released once it is caught up.
async fn subscribe_ws(
    flags: Arc<Flags>,
    shared: Arc<Shared>,
    index: usize,
    slot: OwnedSemaphorePermit,
) {
    let mut slot = Some(slot);
    let url = format!("ws://{}/v1/ws", flags.gateway);
    // TCP_NODELAY on the client too, as browsers set it.
    let Ok((mut socket, _)) = tokio_tungstenite::connect_async_with_config(&url, None, true).await
    else {
        shared.failed.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let frame = json!({"op": "subscribe", "sub": "s", "table": flags.table});
    if socket
        .send(Message::Text(frame.to_string().into()))
        .await
        .is_err()
    {
        shared.failed.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let mut seen = Seen {
        index,
        samples: Vec::with_capacity(FLUSH_EVERY),
        count: 0,
    };
    let mut live = false;
    let mut stop = shared.stop.clone();
    loop {
        let message = tokio::select! {
            _ = stop.changed() => break,
            message = socket.next() => message,
        };
        let Some(Ok(message)) = message else { break };
        let Message::Text(text) = message else {
            continue;
        };
        let now = Instant::now();
        let Ok(frame) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        match frame["event"].as_str() {
            Some("caught-up") if !live => {
                live = true;
                shared.caught_up.fetch_add(1, Ordering::Relaxed);
                slot.take();
            }
            Some("put") if live => seen.record(&shared, frame["value"].as_str().unwrap_or(""), now),
            _ => {}
        }
    }
    seen.flush(&shared);
    if !live {
        shared.failed.fetch_add(1, Ordering::Relaxed);
    }
}

/// One SSE subscriber; `slot` (a connect slot) is released once it is caught up.
async fn subscribe_sse(
    flags: Arc<Flags>,
    shared: Arc<Shared>,
    index: usize,
    slot: OwnedSemaphorePermit,
) {
    let mut slot = Some(slot);
    let Ok(mut stream) = tokio::net::TcpStream::connect(&flags.gateway).await else {
        shared.failed.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let _ = stream.set_nodelay(true);
    let request = format!(
        "GET /v1/watch/{} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n\r\n",
        flags.table, flags.gateway
    );
    if stream.write_all(request.as_bytes()).await.is_err() {
        shared.failed.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let mut lines = BufReader::new(stream).lines();
    let mut seen = Seen {
        index,
        samples: Vec::with_capacity(FLUSH_EVERY),
        count: 0,
    };
    let (mut live, mut event) = (false, String::new());
    // The body is chunked: chunk-size lines are not `event:`/`data:` lines and are skipped.
    let mut stop = shared.stop.clone();
    loop {
        let line = tokio::select! {
            _ = stop.changed() => break,
            line = lines.next_line() => line,
        };
        let Ok(Some(line)) = line else { break };
        if let Some(name) = line.strip_prefix("event: ") {
            event = name.to_string();
        } else if let Some(data) = line.strip_prefix("data: ") {
            let now = Instant::now();
            match event.as_str() {
                "caught-up" if !live => {
                    live = true;
                    shared.caught_up.fetch_add(1, Ordering::Relaxed);
                    slot.take();
                }
                "put" if live => {
                    if let Ok(frame) = serde_json::from_str::<Value>(data) {
                        seen.record(&shared, frame["value"].as_str().unwrap_or(""), now);
                    }
                }
                _ => {}
            }
        }
    }
    seen.flush(&shared);
    if !live {
        shared.failed.fetch_add(1, Ordering::Relaxed);
    }
}

/// Resident memory of `pid`, in bytes.
fn rss(pid: Option<u32>) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid?)).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// CPU time (user + system) of `pid`, in seconds.
fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid?)).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Some(ticks as f64 / hz.max(1) as f64)
}

async fn write(flags: &Flags, client: &Client, shared: &Arc<Shared>) -> anyhow::Result<u64> {
    let table = client.table(&flags.table).await?;
    let total = flags.rate * flags.duration;
    let interval = Duration::from_secs_f64(1.0 / flags.rate as f64);
    let in_flight = Arc::new(Semaphore::new(1024));
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = tokio::task::JoinSet::new();
    let pad = "x".repeat(flags.value_bytes);
    for seq in 0..total {
        ticker.tick().await;
        let permit = in_flight.clone().acquire_owned().await?;
        let mut value = format!("#{seq}:{pad}");
        value.truncate(flags.value_bytes.max(value.find(':').unwrap_or(0) + 1));
        let key = format!("k{}", seq % flags.keys);
        let (table, shared) = (table.clone(), shared.clone());
        tasks.spawn(async move {
            let _permit = permit;
            let written = table.put(key.as_bytes(), value.as_bytes()).await;
            let nanos = shared.acks.start.elapsed().as_nanos() as u64;
            shared.acks.at[seq as usize].store(nanos.max(1), Ordering::Release);
            written.map(|_| ())
        });
    }
    let mut failed = 0;
    while let Some(done) = tasks.join_next().await {
        if !matches!(done, Ok(Ok(()))) {
            failed += 1;
        }
    }
    Ok(failed)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let flags = Arc::new(Flags::parse());
    anyhow::ensure!(
        flags.rate > 0 && flags.duration > 0,
        "--rate and --duration must be > 0"
    );
    let client = Client::connect(&flags.broker).await?;
    if client.describe_topic(&flags.table).await.is_err() {
        let config = TopicConfig {
            partitions: Some(1),
            cleanup_policy: CleanupPolicy::Compact,
            ..TopicConfig::default()
        };
        client.create_topic(&flags.table, config).await?;
    }
    let total = (flags.rate * flags.duration) as usize;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let shared = Arc::new(Shared {
        stop: stopped,
        acks: Acks {
            start: Instant::now(),
            at: (0..total).map(|_| AtomicU64::new(0)).collect(),
        },
        shards: (0..SHARDS)
            .map(|_| {
                parking_lot::Mutex::new(
                    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"),
                )
            })
            .collect(),
        delivered: AtomicU64::new(0),
        caught_up: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
    });

    let connecting = Instant::now();
    let gate = Arc::new(Semaphore::new(CONNECTS_IN_FLIGHT));
    let mut subscribers = tokio::task::JoinSet::new();
    let mut rss_before = None;
    for index in 0..flags.subscribers {
        if index == 1 {
            // The first subscriber made the gateway open the table: the baseline is after it.
            let _ = gate
                .clone()
                .acquire_many_owned(CONNECTS_IN_FLIGHT as u32)
                .await?;
            tokio::time::sleep(Duration::from_millis(500)).await;
            rss_before = rss(flags.gateway_pid);
        }
        let slot = gate.clone().acquire_owned().await?;
        let (flags, shared) = (flags.clone(), shared.clone());
        match flags.transport {
            Transport::Ws => subscribers.spawn(subscribe_ws(flags, shared, index, slot)),
            Transport::Sse => subscribers.spawn(subscribe_sse(flags, shared, index, slot)),
        };
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while shared.caught_up.load(Ordering::Relaxed) + shared.failed.load(Ordering::Relaxed)
        < flags.subscribers
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {} of {} subscribers caught up within 120 s",
            shared.caught_up.load(Ordering::Relaxed),
            flags.subscribers
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let connect_time = connecting.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_idle = rss(flags.gateway_pid);

    let cpu_before = cpu_seconds(flags.broker_pid);
    let gateway_cpu_before = cpu_seconds(flags.gateway_pid);
    let writing = Instant::now();
    let put_failures = write(&flags, &client, &shared).await?;
    let write_time = writing.elapsed();
    // Let the last changes reach everyone: until no sample arrives for 2 s (up to 30 s).
    let live = shared.caught_up.load(Ordering::Relaxed) as u64;
    let expected = live * total as u64;
    let drain = Instant::now() + Duration::from_secs(30);
    let mut last = (shared.delivered.load(Ordering::Relaxed), Instant::now());
    while Instant::now() < drain && last.1.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let delivered = shared.delivered.load(Ordering::Relaxed);
        if delivered != last.0 {
            last = (delivered, Instant::now());
        }
    }
    let cpu_after = cpu_seconds(flags.broker_pid);
    let gateway_cpu_after = cpu_seconds(flags.gateway_pid);
    let _ = stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(30), async {
        while subscribers.join_next().await.is_some() {}
    })
    .await;
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
    for shard in &shared.shards {
        histogram.add(&*shard.lock()).expect("same bounds");
    }
    let delivered = histogram.len();
    let per_subscriber = rss_before
        .zip(rss_idle)
        .map(|(before, idle)| idle.saturating_sub(before) / (flags.subscribers.max(2) - 1) as u64);
    let broker_cpu = cpu_before.zip(cpu_after).map(|(a, b)| b - a);
    let gateway_cpu = gateway_cpu_before
        .zip(gateway_cpu_after)
        .map(|(a, b)| b - a);
    let transport = match flags.transport {
        Transport::Ws => "ws",
        Transport::Sse => "sse",
    };
    let summary = json!({
        "transport": transport,
        "subscribers": flags.subscribers,
        "caught_up": live,
        "failed": shared.failed.load(Ordering::Relaxed),
        "connect_seconds": connect_time.as_secs_f64(),
        "changes": total,
        "put_failures": put_failures,
        "write_seconds": write_time.as_secs_f64(),
        "rate_achieved": total as f64 / write_time.as_secs_f64(),
        "delivered": delivered,
        "expected": expected,
        "missing": expected.saturating_sub(delivered),
        "deliveries_per_second": delivered as f64 / write_time.as_secs_f64(),
        "latency_ms": {
            "p50": histogram.value_at_quantile(0.50) as f64 / 1000.0,
            "p99": histogram.value_at_quantile(0.99) as f64 / 1000.0,
            "p999": histogram.value_at_quantile(0.999) as f64 / 1000.0,
            "max": histogram.max() as f64 / 1000.0,
        },
        "gateway_rss_bytes": {"before": rss_before, "idle": rss_idle, "per_subscriber": per_subscriber},
        "broker_cpu_seconds": broker_cpu,
        "gateway_cpu_seconds": gateway_cpu,
        "gateway_cpu_us_per_delivery": gateway_cpu.map(|cpu| cpu * 1e6 / delivered.max(1) as f64),
    });
    if flags.json {
        println!("{summary}");
    } else {
        print_table(&summary);
    }
    let complete = expected == delivered && put_failures == 0;
    std::process::exit(if complete { 0 } else { 1 });
}

fn print_table(summary: &Value) {
    println!(
        "{} subscribers over {} ({} caught up, {} failed) in {:.1} s",
        summary["subscribers"],
        summary["transport"],
        summary["caught_up"],
        summary["failed"],
        summary["connect_seconds"].as_f64().unwrap_or(0.0)
    );
    println!(
        "{} changes at {:.0}/s: {} deliveries of {} ({} missing), {:.0} deliveries/s",
        summary["changes"],
        summary["rate_achieved"].as_f64().unwrap_or(0.0),
        summary["delivered"],
        summary["expected"],
        summary["missing"],
        summary["deliveries_per_second"].as_f64().unwrap_or(0.0)
    );
    let latency = &summary["latency_ms"];
    println!(
        "put acknowledged -> delivered: p50 {} ms, p99 {} ms, p99.9 {} ms, max {} ms",
        latency["p50"], latency["p99"], latency["p999"], latency["max"]
    );
    let rss = &summary["gateway_rss_bytes"];
    if let Some(per) = rss["per_subscriber"].as_u64() {
        println!(
            "gateway memory: {} MiB before, {} MiB idle with subscribers: {:.1} KiB per subscriber",
            rss["before"].as_u64().unwrap_or(0) >> 20,
            rss["idle"].as_u64().unwrap_or(0) >> 20,
            per as f64 / 1024.0
        );
    }
    if let Some(cpu) = summary["broker_cpu_seconds"].as_f64() {
        println!("broker CPU during the writes: {cpu:.2} s");
    }
    if let Some(cpu) = summary["gateway_cpu_seconds"].as_f64() {
        println!(
            "gateway CPU during the writes: {cpu:.2} s ({:.2} us per delivery)",
            summary["gateway_cpu_us_per_delivery"]
                .as_f64()
                .unwrap_or(0.0)
        );
    }
}
