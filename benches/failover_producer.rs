//! The producer of `benches/replication.sh`'s failover part: one idempotent producer
//! (`acks durable`, linger 0, one request in flight) that sends one record at a time to a topic
//! and prints one line per outcome, so the script can tell when writes resumed after it killed
//! the partition's leader.
//!
//! Run: `cargo run --release --example failover_producer -- --broker ADDR[,ADDR...] --topic T
//! [--record-size BYTES] [--secs S]`. Stdout, one line per record, flushed as it is written
//! (times in µs since the Unix epoch, `CLOCK_REALTIME`, the clock of bash's `$EPOCHREALTIME`,
//! which the script reads right before its `kill -9`):
//!
//! - `ack SEND_US ACK_US PARTITION OFFSET`: the record sent at SEND_US was acknowledged
//!   (durable: committed on a majority of its replicas) at ACK_US;
//! - `err SEND_US ERR_US MESSAGE`: it failed (after the producer's own retries, within its 30 s
//!   delivery timeout); the next record is sent anyway.
//!
//! The next record is sent only after the previous one resolved, so a record sent after the
//! kill can only be acknowledged by a node that is still alive: the script measures failover as
//! the time from the kill to the acknowledgement of the first record sent after it (see
//! `failover()` in the script). Ends after `--secs` (at most an hour), or when killed; exits 1
//! when the producer cannot be created or is fenced.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use syncline_client::{Acks, Client, Error, ProducerConfig};

/// Longest run: the script stops the producer after each kill; this bounds a forgotten one.
const SECS_MAX: u64 = 3600;
/// Largest record: a failover probe needs no more.
const RECORD_SIZE_MAX: usize = 1024 * 1024;

struct Args {
    broker: String,
    topic: String,
    record_size: usize,
    secs: u64,
}

fn parse_args() -> anyhow::Result<Args> {
    let usage = "usage: failover_producer --broker ADDR[,ADDR...] --topic T \
                 [--record-size BYTES] [--secs S]";
    let mut args = Args {
        broker: String::new(),
        topic: String::new(),
        record_size: 100,
        secs: 600,
    };
    let mut given = std::env::args().skip(1);
    while let Some(flag) = given.next() {
        let value = given
            .next()
            .with_context(|| format!("{flag} needs a value; {usage}"))?;
        match flag.as_str() {
            "--broker" => args.broker = value,
            "--topic" => args.topic = value,
            "--record-size" => args.record_size = value.parse().context(usage)?,
            "--secs" => args.secs = value.parse().context(usage)?,
            _ => bail!("unknown flag {flag}; {usage}"),
        }
    }
    if args.broker.is_empty() || args.topic.is_empty() {
        bail!("--broker and --topic are required; {usage}");
    }
    if !(1..=RECORD_SIZE_MAX).contains(&args.record_size) {
        bail!(
            "--record-size {} is outside [1, {RECORD_SIZE_MAX}]",
            args.record_size
        );
    }
    if !(1..=SECS_MAX).contains(&args.secs) {
        bail!("--secs {} is outside [1, {SECS_MAX}]", args.secs);
    }
    Ok(args)
}

/// Now, in µs since the Unix epoch (`CLOCK_REALTIME`).
fn now_us() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_micros())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    // The client's retries and routing decisions on stderr when RUST_LOG asks for them
    // (e.g. RUST_LOG=syncline_client=debug): what a failover's time was spent on.
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let client = Client::connect(&args.broker).await?;
    let config = ProducerConfig {
        linger: Duration::ZERO,
        in_flight_max: 1,
        acks: Acks::Durable,
        ..ProducerConfig::default()
    };
    let producer = client
        .producer(&args.topic, config)
        .await
        .with_context(|| format!("cannot create a producer for `{}`", args.topic))?;
    let value = vec![b'x'; args.record_size];
    let deadline = Instant::now() + Duration::from_secs(args.secs);
    while Instant::now() < deadline {
        let sent = now_us();
        match producer.send(None, Some(&value), &[]).await {
            Ok(delivery) => println!(
                "ack {sent} {} {} {}",
                now_us(),
                delivery.partition,
                delivery.offset
            ),
            Err(error @ Error::ProducerFenced { .. }) => return Err(error.into()),
            Err(error) => {
                let message = error.to_string().replace('\n', " ");
                println!("err {sent} {} {message}", now_us());
            }
        }
    }
    producer.close().await;
    Ok(())
}
