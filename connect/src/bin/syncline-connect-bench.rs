//! `syncline-connect-bench`: change data capture and sink throughput, each next to a baseline
//! measured in the same run (these machines are noisy; ratios are what we compare).
//!
//! - **Source**: the rate at which PostgreSQL alone commits `--rows` inserts (`--clients`
//!   connections, `--batch` rows per transaction), then the same load with `syncline-connect`
//!   capturing it: change events per second end to end (first commit to last record readable
//!   in Syncline) and its ratio to the database alone; then the load paced at half the
//!   database's rate for `--secs`, with the lag from commit (the envelope's `source.ts_ms`) to
//!   the record being read from Syncline, p50 and p99.
//! - **Sinks**: `--rows` change records in a topic applied by the PostgreSQL sink and by the
//!   Redis sink (time until the target holds them all), next to a plain client writing the same
//!   rows the same way (batched upserts in transactions; pipelined SETs).
//!
//! It starts `syncline-connect` itself (`--connect-bin`); the servers must be running (see
//! `benches/connect.sh`, which starts them). Prints a summary and one JSON line with `--json`.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use clap::Parser;
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use syncline_client::{Client, ConsumerConfig, StartOffset};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio_postgres::NoTls;

#[derive(Debug, Parser)]
#[command(
    name = "syncline-connect-bench",
    about = "Measures change data capture and sinks"
)]
struct Args {
    /// Broker address.
    #[arg(long, default_value = "127.0.0.1:7450")]
    broker: String,
    /// PostgreSQL URL (the user needs REPLICATION); wal_level must be logical.
    #[arg(long)]
    pg_url: String,
    /// Redis URL; the Redis sink part is skipped without it.
    #[arg(long)]
    redis_url: Option<String>,
    /// The syncline-connect binary.
    #[arg(long, default_value = "target/release/syncline-connect")]
    connect_bin: String,
    /// Rows per throughput phase.
    #[arg(long, default_value_t = 100_000)]
    rows: u64,
    /// Rows per transaction.
    #[arg(long, default_value_t = 10)]
    batch: u64,
    /// Concurrent writers.
    #[arg(long, default_value_t = 4)]
    clients: u64,
    /// Seconds of the half-rate phase.
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// Print one JSON line at the end.
    #[arg(long)]
    json: bool,
    /// PostgreSQL's own `pg_recvlogical`: adds the baseline of the same load decoded into
    /// /dev/null (the cheapest consumer of the same slot and plugin).
    #[arg(long)]
    recvlogical: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

async fn connect_pg(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Inserts `rows` rows into `table` from `clients` connections, `batch` per transaction,
/// paced to `rate` rows/s when given. Returns the elapsed time.
async fn insert_load(
    url: &str,
    table: &str,
    first_id: u64,
    rows: u64,
    batch: u64,
    clients: u64,
    rate: Option<f64>,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let per_client = rows / clients;
    for c in 0..clients {
        let url = url.to_owned();
        let table = table.to_owned();
        tasks.spawn(async move {
            let db = connect_pg(&url).await?;
            let statement = db
                .prepare(&format!(
                    "INSERT INTO {table} SELECT g, 'name ' || g, g % 100, now() \
                     FROM generate_series($1::bigint, $2::bigint) g"
                ))
                .await?;
            let start = first_id + c * per_client;
            let mut done = 0;
            while done < per_client {
                let n = batch.min(per_client - done);
                let from = (start + done) as i64;
                let to = (start + done + n - 1) as i64;
                db.execute(&statement, &[&from, &to]).await?;
                done += n;
                if let Some(rate) = rate {
                    let due = Duration::from_secs_f64((done * clients) as f64 / rate);
                    let elapsed = started.elapsed();
                    if due > elapsed {
                        tokio::time::sleep(due - elapsed).await;
                    }
                }
            }
            anyhow::Ok(())
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined??;
    }
    Ok(started.elapsed())
}

/// Reads `topic` from the start until `count` records with a value; the lag of each from its
/// commit (`source.ts_ms`) to now, and when the last arrived.
async fn read_captured(
    client: &Client,
    topic: &str,
    skip: u64,
    count: u64,
    timeout: Duration,
) -> anyhow::Result<(Histogram<u64>, Instant)> {
    let mut histogram = Histogram::<u64>::new(3)?;
    let mut consumer = client
        .consumer(
            topic,
            ConsumerConfig {
                start: StartOffset::Earliest,
                ..ConsumerConfig::default()
            },
        )
        .await?;
    let deadline = Instant::now() + timeout;
    let mut seen = 0;
    while seen < count {
        let record = tokio::time::timeout_at(deadline.into(), consumer.recv())
            .await
            .map_err(|_| anyhow!("{seen} of {count} records of {topic} arrived in {timeout:?}"))?
            .ok_or_else(|| anyhow!("the consumer of {topic} stopped"))??;
        let Some(value) = record.value else { continue };
        seen += 1;
        if seen <= skip {
            continue;
        }
        let envelope: Value = serde_json::from_slice(&value)?;
        let commit_ms = envelope["source"]["ts_ms"].as_i64().unwrap_or(0);
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis() as i64;
        histogram.record((now_ms - commit_ms).max(0) as u64)?;
    }
    Ok((histogram, Instant::now()))
}

/// Starts syncline-connect on `config` and waits until it logs `ready_text`.
async fn start_connect(
    bin: &str,
    dir: &std::path::Path,
    name: &str,
    config: &str,
    broker: &str,
    ready_text: &'static str,
) -> anyhow::Result<tokio::process::Child> {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config)?;
    let mut child = tokio::process::Command::new(bin)
        .arg("--config")
        .arg(&path)
        .args(["--broker", broker])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {bin}"))?;
    let stderr = child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        let mut ready = Some(ready_tx);
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("ERROR") {
                eprintln!("connect: {line}");
            }
            if line.contains(ready_text) {
                if let Some(ready) = ready.take() {
                    let _ = ready.send(());
                }
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(60), ready_rx)
        .await
        .map_err(|_| anyhow!("syncline-connect did not log {ready_text:?} within 60 s"))?
        .map_err(|_| anyhow!("syncline-connect exited"))?;
    Ok(child)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let dir = tempfile_dir()?;
    let db = connect_pg(&args.pg_url).await?;
    let client = Client::connect(&args.broker).await?;
    let run_id = std::process::id();
    let columns = "(id bigint PRIMARY KEY, name text NOT NULL, qty int NOT NULL, at timestamptz)";

    // 1. The database alone.
    let alone_table = format!("bench_alone_{run_id}");
    db.batch_execute(&format!("CREATE TABLE {alone_table} {columns}"))
        .await?;
    let alone = insert_load(
        &args.pg_url,
        &alone_table,
        0,
        args.rows,
        args.batch,
        args.clients,
        None,
    )
    .await?;
    let alone_rate = args.rows as f64 / alone.as_secs_f64();
    eprintln!(
        "database alone: {alone_rate:.0} rows/s ({} rows in {alone:?})",
        args.rows
    );

    // 1b. The same load decoded by pg_recvlogical into /dev/null.
    let recv_rate = match &args.recvlogical {
        Some(bin) => Some(recvlogical_baseline(&args, &db, bin, run_id, columns).await?),
        None => None,
    };

    // 2. The same load captured.
    let table = format!("bench_cdc_{run_id}");
    db.batch_execute(&format!("CREATE TABLE {table} {columns}"))
        .await?;
    let prefix = format!("bench{run_id}");
    let topic = format!("{prefix}.public.{table}");
    let source = format!(
        "[[source]]\nname = \"bench{run_id}\"\nkind = \"postgres\"\nurl = \"{}\"\n\
         tables = [\"public.{table}\"]\ntopic_prefix = \"{prefix}\"\npartitions = 1\n",
        args.pg_url
    );
    let mut connect = start_connect(
        &args.connect_bin,
        &dir,
        "source",
        &source,
        &args.broker,
        "streaming",
    )
    .await?;
    let started = Instant::now();
    let reader = {
        let client = client.clone();
        let topic = topic.clone();
        let rows = args.rows;
        tokio::spawn(async move {
            read_captured(&client, &topic, 0, rows, Duration::from_secs(600)).await
        })
    };
    insert_load(
        &args.pg_url,
        &table,
        0,
        args.rows,
        args.batch,
        args.clients,
        None,
    )
    .await?;
    let committed = started.elapsed();
    let (full_lag, last) = reader.await??;
    let captured = last.duration_since(started);
    let captured_rate = args.rows as f64 / captured.as_secs_f64();
    eprintln!(
        "captured end to end: {captured_rate:.0} changes/s ({:.2}x the database alone; commits took {committed:?}, capture {captured:?}); lag p50 {} ms p99 {} ms",
        captured_rate / alone_rate,
        full_lag.value_at_quantile(0.5),
        full_lag.value_at_quantile(0.99)
    );

    // 3. Half the database's rate, paced: the lag.
    let half = alone_rate / 2.0;
    let paced_rows = ((half * args.secs as f64) as u64 / args.clients) * args.clients;
    let reader = {
        let client = client.clone();
        let topic = topic.clone();
        let (skip, total) = (args.rows, args.rows + paced_rows);
        tokio::spawn(async move {
            read_captured(&client, &topic, skip, total, Duration::from_secs(600)).await
        })
    };
    insert_load(
        &args.pg_url,
        &table,
        args.rows,
        paced_rows,
        args.batch,
        args.clients,
        Some(half),
    )
    .await?;
    let (paced_lag, _) = reader.await??;
    eprintln!(
        "at half rate ({half:.0} rows/s, {paced_rows} rows): lag p50 {} ms p99 {} ms max {} ms",
        paced_lag.value_at_quantile(0.5),
        paced_lag.value_at_quantile(0.99),
        paced_lag.max()
    );
    let _ = connect.kill().await;
    db.batch_execute(&format!(
        "SELECT pg_drop_replication_slot('syncline_bench{run_id}'); DROP PUBLICATION syncline_bench{run_id}"
    ))
    .await
    .ok();

    // 4. Sinks: the captured topic applied to PostgreSQL and Redis, next to plain clients.
    let sink_rows = args.rows;
    let pg_sink = sink_postgres(&args, &db, &client, &dir, &topic, sink_rows, run_id).await?;
    let redis_sink = match &args.redis_url {
        Some(url) => Some(sink_redis(&args, url, &dir, &topic, sink_rows, run_id).await?),
        None => None,
    };

    if args.json {
        println!(
            "{}",
            json!({
                "rows": args.rows, "batch": args.batch, "clients": args.clients,
                "database_alone_rows_per_s": alone_rate,
                "recvlogical_rows_per_s": recv_rate,
                "captured_changes_per_s": captured_rate,
                "captured_ratio": captured_rate / alone_rate,
                "full_rate_lag_ms": {"p50": full_lag.value_at_quantile(0.5), "p99": full_lag.value_at_quantile(0.99)},
                "half_rate_rows_per_s": half,
                "half_rate_lag_ms": {"p50": paced_lag.value_at_quantile(0.5), "p99": paced_lag.value_at_quantile(0.99), "max": paced_lag.max()},
                "postgres_sink": pg_sink,
                "redis_sink": redis_sink,
            })
        );
    }
    Ok(())
}

/// The load while `pg_recvlogical` decodes it into /dev/null: rows per second from the first
/// commit until the walsender has sent the last (`pg_stat_replication.sent_lsn`).
async fn recvlogical_baseline(
    args: &Args,
    db: &tokio_postgres::Client,
    bin: &str,
    run_id: u32,
    columns: &str,
) -> anyhow::Result<f64> {
    let table = format!("bench_recv_{run_id}");
    let slot = format!("bench_recv_{run_id}");
    db.batch_execute(&format!(
        "CREATE TABLE {table} {columns}; CREATE PUBLICATION {slot} FOR TABLE {table}"
    ))
    .await?;
    // Its own statement: a slot cannot be created in a transaction that wrote.
    db.batch_execute(&format!(
        "SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')"
    ))
    .await?;
    let mut child = tokio::process::Command::new(bin)
        .args([
            "--dbname",
            &args.pg_url,
            "--slot",
            &slot,
            "--start",
            "--file",
            "/dev/null",
        ])
        .args(["--status-interval", "1", "--fsync-interval", "1"])
        .args([
            "-o",
            "proto_version=1",
            "-o",
            &format!("publication_names={slot}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {bin}"))?;
    let started = Instant::now();
    insert_load(
        &args.pg_url,
        &table,
        0,
        args.rows,
        args.batch,
        args.clients,
        None,
    )
    .await?;
    let end: String = db
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    loop {
        let done: bool = db
            .query_one(
                "SELECT coalesce(bool_or(sent_lsn >= $1::text::pg_lsn), false) \
                 FROM pg_stat_replication WHERE application_name = 'pg_recvlogical'",
                &[&end],
            )
            .await?
            .get(0);
        if done {
            break;
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("pg_recvlogical was not sent {end} in 600 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let rate = args.rows as f64 / started.elapsed().as_secs_f64();
    let _ = child.kill().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    db.batch_execute(&format!("SELECT pg_drop_replication_slot('{slot}')"))
        .await
        .ok();
    eprintln!("decoded by pg_recvlogical into /dev/null: {rate:.0} rows/s");
    Ok(rate)
}

/// The PostgreSQL sink applying `rows` records of `topic`, next to a plain client doing the same
/// upserts.
async fn sink_postgres(
    args: &Args,
    db: &tokio_postgres::Client,
    client: &Client,
    dir: &std::path::Path,
    topic: &str,
    rows: u64,
    run_id: u32,
) -> anyhow::Result<Value> {
    let columns = "(id bigint PRIMARY KEY, name text NOT NULL, qty int NOT NULL, at timestamptz)";
    let target = format!("bench_sink_{run_id}");
    let plain = format!("bench_plain_{run_id}");
    db.batch_execute(&format!(
        "CREATE TABLE {target} {columns}; CREATE TABLE {plain} {columns}"
    ))
    .await?;

    // The plain client: the same rows, 500 per transaction, the same upsert statement.
    let rows_json: Vec<Value> = (0..rows)
        .map(|i| json!({"id": i, "name": format!("name {i}"), "qty": i % 100, "at": "2026-12-04T00:00:00Z"}))
        .collect();
    let started = Instant::now();
    for chunk in rows_json.chunks(500) {
        let text = serde_json::to_string(chunk)?;
        db.batch_execute("BEGIN").await?;
        db.execute(
            &format!(
                "INSERT INTO {plain} (id, name, qty, at) SELECT id, name, qty, at FROM \
                 jsonb_populate_recordset(NULL::{plain}, $1::text::jsonb) \
                 ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, qty = EXCLUDED.qty, at = EXCLUDED.at"
            ),
            &[&text],
        )
        .await?;
        db.batch_execute("COMMIT").await?;
    }
    let plain_rate = rows as f64 / started.elapsed().as_secs_f64();

    let config = format!(
        "[[sink]]\nname = \"benchpg{run_id}\"\nkind = \"postgres\"\ntopics = [\"{topic}\"]\n\
         url = \"{}\"\ntable = \"{target}\"\nbatch_size = 500\n",
        args.pg_url
    );
    let started = Instant::now();
    let mut connect = start_connect(
        &args.connect_bin,
        dir,
        "pgsink",
        &config,
        &args.broker,
        "INFO",
    )
    .await?;
    let count_sql = format!("SELECT count(*) FROM {target}");
    // Steady rate: from the first applied row to the last (the start, group join included, is
    // reported apart).
    let mut first: Option<(Instant, u64)> = None;
    loop {
        let count = db.query_one(&count_sql, &[]).await?.get::<_, i64>(0) as u64;
        if count > 0 && first.is_none() {
            first = Some((Instant::now(), count));
        }
        if count >= rows {
            break;
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("the PostgreSQL sink applied {count} of {rows} rows in 600 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (first_at, first_count) = first.unwrap_or((started, 0));
    let startup = first_at.duration_since(started).as_secs_f64();
    let sink_rate = (rows - first_count) as f64 / first_at.elapsed().as_secs_f64();
    let _ = connect.kill().await;
    let _ = client;
    eprintln!(
        "postgres sink: {sink_rate:.0} rows/s vs a plain client {plain_rate:.0} rows/s ({:.2}x; first row applied {startup:.2} s after start)",
        sink_rate / plain_rate
    );
    Ok(
        json!({"sink_rows_per_s": sink_rate, "plain_rows_per_s": plain_rate, "ratio": sink_rate / plain_rate, "startup_s": startup}),
    )
}

/// The Redis sink applying `rows` records of `topic`, next to a plain client pipelining the same
/// SETs.
async fn sink_redis(
    args: &Args,
    url: &str,
    dir: &std::path::Path,
    topic: &str,
    rows: u64,
    run_id: u32,
) -> anyhow::Result<Value> {
    let redis = redis::Client::open(url)?;
    let mut connection = redis.get_multiplexed_async_connection().await?;
    let started = Instant::now();
    for chunk_start in (0..rows).step_by(500) {
        let mut pipe = redis::pipe();
        for i in chunk_start..(chunk_start + 500).min(rows) {
            let value = json!({"id": i, "name": format!("name {i}"), "qty": i % 100, "at": "2026-12-04 00:00:00+00"});
            pipe.set(format!("plain{run_id}:{{\"id\":{i}}}"), value.to_string())
                .ignore();
        }
        let () = pipe.query_async(&mut connection).await?;
    }
    let plain_rate = rows as f64 / started.elapsed().as_secs_f64();

    let config = format!(
        "[[sink]]\nname = \"benchredis{run_id}\"\nkind = \"redis\"\ntopics = [\"{topic}\"]\n\
         url = \"{url}\"\nkey_prefix = \"sink{run_id}:\"\nbatch_size = 500\n"
    );
    let started = Instant::now();
    let mut connect = start_connect(
        &args.connect_bin,
        dir,
        "redissink",
        &config,
        &args.broker,
        "INFO",
    )
    .await?;
    let first_probe = format!("sink{run_id}:{{\"id\":0}}");
    let probe = format!("sink{run_id}:{{\"id\":{}}}", rows - 1);
    let mut first_at = None;
    loop {
        // Records of one partition arrive in order: the last id present means all are.
        let (first, last): (bool, bool) = redis::pipe()
            .cmd("EXISTS")
            .arg(&first_probe)
            .cmd("EXISTS")
            .arg(&probe)
            .query_async(&mut connection)
            .await?;
        if first && first_at.is_none() {
            first_at = Some(Instant::now());
        }
        if last {
            break;
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("the Redis sink did not apply {rows} rows in 600 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let first_at = first_at.unwrap_or(started);
    let startup = first_at.duration_since(started).as_secs_f64();
    let sink_rate = rows as f64 / first_at.elapsed().as_secs_f64();
    let _ = connect.kill().await;
    eprintln!(
        "redis sink: {sink_rate:.0} rows/s vs a plain client {plain_rate:.0} rows/s ({:.2}x; first row applied {startup:.2} s after start)",
        sink_rate / plain_rate
    );
    Ok(
        json!({"sink_rows_per_s": sink_rate, "plain_rows_per_s": plain_rate, "ratio": sink_rate / plain_rate, "startup_s": startup}),
    )
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("syncline-connect-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
