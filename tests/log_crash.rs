//! Pins the durability contract against real process death: every batch a child process saw
//! acknowledged as durable (`wait_durable`) is in the log, byte for byte, after the child is
//! killed with SIGKILL at an arbitrary point under load and the log is reopened; the log keeps
//! taking appends at the right offset afterwards.
//!
//! The child is this same test binary re-executed with `SYNCLINE_CRASH_CHILD_DIR` set, running
//! the ignored test `crash_child_appender`.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use syncline_broker::log::{Log, LogConfig};
use syncline_proto::batch::{BatchBuilder, BatchHeader};

const CHILD_ENV: &str = "SYNCLINE_CRASH_CHILD_DIR";
/// Appender tasks in the child: enough to exercise group commit across concurrent waiters.
const CHILD_TASKS: u64 = 8;

fn config() -> LogConfig {
    LogConfig {
        // Small segments, so kills also land around rolls.
        segment_bytes_max: 256 * 1024,
        batch_bytes_max: 64 * 1024,
        ..LogConfig::default()
    }
}

/// Deterministic batch content for (task, sequence), so the parent can rebuild it.
fn batch_for(task: u64, sequence: u64) -> bytes::Bytes {
    let mut builder = BatchBuilder::new();
    let records = 1 + (sequence % 7) as usize;
    for i in 0..records {
        let key = format!("t{task}-s{sequence}-r{i}");
        let value = vec![(task * 31 + sequence + i as u64) as u8; 100 + (sequence % 900) as usize];
        builder.push(
            1_700_000_000_000 + sequence as i64,
            Some(key.as_bytes()),
            Some(&value),
            &[],
        );
    }
    builder.finish().expect("batch encodes")
}

#[test]
#[ignore = "child process of given_child_killed_under_load_when_reopened_should_keep_every_durable_batch"]
fn crash_child_appender() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let log = Arc::new(Log::open(&dir, config()).expect("child opens log"));
        let _flusher = log.spawn_flusher();
        let stdout = Arc::new(std::sync::Mutex::new(std::io::stdout()));
        let round: u64 = std::env::var("SYNCLINE_CRASH_ROUND")
            .ok()
            .and_then(|r| r.parse().ok())
            .unwrap_or(0);
        let mut tasks = Vec::new();
        for task in 0..CHILD_TASKS {
            let log = log.clone();
            let stdout = stdout.clone();
            let task_id = round * 100 + task;
            tasks.push(tokio::spawn(async move {
                for sequence in 0.. {
                    let batch = batch_for(task_id, sequence);
                    let appended = log.append(&batch).expect("append");
                    log.wait_durable(appended.durable_target())
                        .await
                        .expect("durable");
                    let mut out = stdout.lock().expect("stdout");
                    writeln!(out, "{} {task_id} {sequence}", appended.base_offset).expect("write");
                    out.flush().expect("flush");
                }
            }));
        }
        for task in tasks {
            let _ = task.await;
        }
    });
}

#[test]
fn given_child_killed_under_load_when_reopened_should_keep_every_durable_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("test binary path");
    let mut acknowledged: Vec<(u64, u64, u64)> = Vec::new();
    for round in 0..3u64 {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "crash_child_appender",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, dir.path())
            .env("SYNCLINE_CRASH_ROUND", round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().expect("child stdout");
        let mut lines = BufReader::new(stdout).lines();
        // Kill at a different point each round: after some acknowledgements and some time.
        let want = 200 + round as usize * 300;
        let started = Instant::now();
        let mut seen = 0;
        while seen < want && started.elapsed() < Duration::from_secs(20) {
            let Some(Ok(line)) = lines.next() else { break };
            if let Some(ack) = parse_ack(&line) {
                acknowledged.push(ack);
                seen += 1;
            }
        }
        child.kill().expect("SIGKILL the child");
        // Acknowledgements already in the pipe were made before the kill: they count too.
        for line in lines.map_while(Result::ok) {
            if let Some(ack) = parse_ack(&line) {
                acknowledged.push(ack);
            }
        }
        let _ = child.wait();
        assert!(seen > 0, "round {round}: the child acknowledged nothing");

        let log = Log::open(dir.path(), config()).expect("reopen after kill -9");
        for &(base, task, sequence) in &acknowledged {
            let read = log.read(base, 1).expect("read acknowledged offset");
            assert_eq!(
                read.first_offset, base,
                "round {round}: batch at {base} missing"
            );
            let header = BatchHeader::parse(&read.bytes).expect("header");
            let stored = &read.bytes[..header.length as usize];
            let expected = batch_for(task, sequence);
            assert_eq!(
                stored.len(),
                expected.len(),
                "round {round}: batch at {base}"
            );
            assert!(
                stored[16..] == expected[16..],
                "round {round}: batch at {base} differs from what task {task} wrote as #{sequence}"
            );
        }
        let end = log.end_offset();
        let next = log
            .append(&batch_for(999, 1))
            .expect("append after recovery");
        assert_eq!(next.base_offset, end, "appends continue at the log end");
        log.sync().expect("sync");
        drop(log);
    }
    assert!(
        acknowledged.len() >= 1000,
        "only {} acknowledgements",
        acknowledged.len()
    );
}

fn parse_ack(line: &str) -> Option<(u64, u64, u64)> {
    let mut parts = line.split_whitespace().map(|p| p.parse::<u64>());
    match (parts.next(), parts.next(), parts.next()) {
        (Some(Ok(base)), Some(Ok(task)), Some(Ok(sequence))) => Some((base, task, sequence)),
        _ => None,
    }
}
