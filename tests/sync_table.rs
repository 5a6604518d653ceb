//! Pins `SyncTable` and `syncline watch` through the real broker binary: two tables on one
//! topic under concurrent writers converge to the map built by reading the whole log, and the
//! one opened before the writes reports every write exactly once through its change stream; a
//! table that lives through a broker restart resumes with no gap and no duplicate; `syncline
//! watch --json` prints the table, the caught-up line and then each change, exits 0 on SIGTERM,
//! and fails with a one-line error for an unknown topic or a topic that is not a table.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use bytes::Bytes;
use common::{binary, BrokerProcess};
use syncline_client::{
    Change, Changes, CleanupPolicy, Client, ConsumerConfig, ProducerConfig, StartOffset, SyncTable,
    SyncTableConfig, TopicConfig, Written,
};

/// Generous bound on any wait that normally takes milliseconds (a loaded CI machine fsyncs
/// slowly).
const WAIT: Duration = Duration::from_secs(20);
/// Writer tasks and writes each in the convergence test: enough interleaving over 3
/// partitions to exercise batching and ordering, few enough to stay quick (every write waits
/// for an fsync).
const WRITERS: usize = 4;
const WRITES_PER_WRITER: usize = 60;
/// Keys the writers share: few, so that keys are overwritten and deleted often.
const KEYS: usize = 12;

async fn create_table(client: &Client, name: &str, partitions: u32) {
    let config = TopicConfig {
        partitions: Some(partitions),
        cleanup_policy: CleanupPolicy::Compact,
        ..TopicConfig::default()
    };
    client.create_topic(name, config).await.unwrap();
}

fn fast_config() -> SyncTableConfig {
    SyncTableConfig {
        retry_backoff: Duration::from_millis(20),
        retry_backoff_max: Duration::from_millis(250),
        ..SyncTableConfig::default()
    }
}

fn plain_writes() -> ProducerConfig {
    ProducerConfig {
        idempotent: false,
        ..ProducerConfig::default()
    }
}

async fn bounded<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, future).await.expect("timed out")
}

/// `key -> (value, version)` of a table.
fn map_of(table: &SyncTable) -> BTreeMap<Bytes, (Bytes, u64)> {
    table
        .entries()
        .into_iter()
        .map(|(key, entry)| (key, (entry.value, entry.version)))
        .collect()
}

/// The table built by reading every record of every partition from the start.
async fn reference(client: &Client, topic: &str) -> BTreeMap<Bytes, (Bytes, u64)> {
    let description = client.describe_topic(topic).await.unwrap();
    let ends: HashMap<u32, u64> = description
        .partitions
        .iter()
        .map(|partition| (partition.partition, partition.durable_offset))
        .collect();
    let mut consumer = client
        .consumer(
            topic,
            ConsumerConfig {
                start: StartOffset::Earliest,
                ..ConsumerConfig::default()
            },
        )
        .await
        .unwrap();
    let mut map = BTreeMap::new();
    let mut positions: HashMap<u32, u64> = HashMap::new();
    while ends
        .iter()
        .any(|(partition, end)| positions.get(partition).copied().unwrap_or(0) < *end)
    {
        let record = bounded(consumer.recv()).await.unwrap().unwrap();
        positions.insert(record.partition, record.offset + 1);
        let key = record.key.unwrap();
        match record.value {
            Some(value) => map.insert(key, (value, record.offset)),
            None => map.remove(&key),
        };
    }
    map
}

/// Drains `count` changes.
async fn take_changes(changes: &mut Changes, count: usize) -> Vec<Change> {
    let mut out = Vec::new();
    for _ in 0..count {
        out.push(bounded(changes.recv()).await.unwrap());
    }
    out
}

/// Checks that `changes` are exactly the `puts` (in any interleaving of partitions), each once,
/// with versions strictly increasing per key and each previous version the key's version before.
fn assert_every_put_once(changes: &[Change], puts: &[(Bytes, Written)]) {
    let mut last: HashMap<Bytes, u64> = HashMap::new();
    for change in changes {
        assert!(change.value.is_some(), "only puts were written: {change:?}");
        let previous = last.insert(change.key.clone(), change.version);
        assert_eq!(change.previous_version, previous, "{change:?}");
        if let Some(previous) = previous {
            assert!(change.version > previous, "{change:?}");
        }
    }
    let mut seen: Vec<(u32, u64, Bytes)> = changes
        .iter()
        .map(|change| (change.partition, change.version, change.key.clone()))
        .collect();
    let mut written: Vec<(u32, u64, Bytes)> = puts
        .iter()
        .map(|(key, written)| (written.partition, written.version, key.clone()))
        .collect();
    seen.sort();
    written.sort();
    assert_eq!(seen, written, "every write once, nothing else");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_sync_tables_under_concurrent_writers_should_converge_to_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    let client = Client::connect(&broker.addr).await.unwrap();
    create_table(&client, "t", 3).await;
    let early = client.sync_table_with("t", fast_config()).await.unwrap();
    let mut early_changes = early.changes();
    bounded(early.wait_caught_up()).await.unwrap();

    let mut writers = Vec::new();
    for writer in 0..WRITERS {
        let table = client.table("t").await.unwrap();
        writers.push(tokio::spawn(async move {
            let mut written = Vec::new();
            for i in 0..WRITES_PER_WRITER {
                let key = format!("key-{}", (writer * 7 + i) % KEYS);
                // Every fifth write is a delete.
                let result = if i % 5 == 4 {
                    table.delete(&key).await.unwrap()
                } else {
                    table.put(&key, format!("{writer}-{i}")).await.unwrap()
                };
                written.push((Bytes::from(key), result, i % 5 != 4));
            }
            written
        }));
    }
    // The second table opens while the writers write.
    let late = client.sync_table_with("t", fast_config()).await.unwrap();
    let mut written = Vec::new();
    for writer in writers {
        written.extend(bounded(writer).await.unwrap());
    }
    bounded(late.wait_caught_up()).await.unwrap();
    let mut last_by_partition: HashMap<u32, u64> = HashMap::new();
    for (_, write, _) in &written {
        let last = last_by_partition.entry(write.partition).or_default();
        *last = (*last).max(write.version);
    }
    for (&partition, &offset) in &last_by_partition {
        bounded(early.wait_for(partition, offset)).await.unwrap();
        bounded(late.wait_for(partition, offset)).await.unwrap();
    }
    let expected = reference(&client, "t").await;
    assert!(!expected.is_empty());
    assert_eq!(map_of(&early), expected);
    assert_eq!(map_of(&late), expected);
    assert_eq!(early.len(), expected.len());

    // The early table saw every write from the log: each put, and each delete of a present key.
    let mut log = Vec::new();
    let mut consumer = client
        .consumer(
            "t",
            ConsumerConfig {
                start: StartOffset::Earliest,
                ..ConsumerConfig::default()
            },
        )
        .await
        .unwrap();
    let mut present: HashMap<Bytes, u64> = HashMap::new();
    for _ in 0..written.len() {
        let record = bounded(consumer.recv()).await.unwrap().unwrap();
        let key = record.key.unwrap();
        let previous = match &record.value {
            Some(_) => present.insert(key.clone(), record.offset),
            None => match present.remove(&key) {
                Some(previous) => Some(previous),
                None => continue, // a delete of an absent key changes nothing
            },
        };
        log.push((record.partition, record.offset, key, record.value, previous));
    }
    let changes = take_changes(&mut early_changes, log.len()).await;
    let mut seen: Vec<_> = changes
        .into_iter()
        .map(|change| {
            assert!(!change.from_snapshot, "{change:?}");
            (
                change.partition,
                change.version,
                change.key,
                change.value,
                change.previous_version,
            )
        })
        .collect();
    seen.sort();
    log.sort();
    assert_eq!(seen, log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn given_broker_restart_under_a_live_table_should_resume_with_no_gap_and_no_duplicate() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    let address = broker.addr.clone();
    let client = Client::connect(&address).await.unwrap();
    create_table(&client, "t", 2).await;
    let replica = client.sync_table_with("t", fast_config()).await.unwrap();
    let mut changes = replica.changes();
    bounded(replica.wait_caught_up()).await.unwrap();

    let mut puts = Vec::new();
    let writer = client.table("t").await.unwrap();
    for i in 0..40 {
        let key = format!("key-{}", i % 10);
        puts.push((
            Bytes::from(key.clone()),
            writer.put(&key, format!("a{i}")).await.unwrap(),
        ));
    }
    drop(writer);
    let (_, last) = puts.last().unwrap();
    bounded(replica.wait_for_write(*last)).await.unwrap();

    // Restart on the same loopback port, which the first start picked: the table reconnects
    // through its client, which keeps that address.
    assert!(broker.stop(), "clean stop");
    let broker = BrokerProcess::start_with(dir.path(), &["--listen", &address]);
    assert_eq!(broker.addr, address);
    let writer = Client::connect(&address)
        .await
        .unwrap()
        .table("t")
        .await
        .unwrap();
    for i in 0..40 {
        let key = format!("key-{}", i % 13);
        puts.push((
            Bytes::from(key.clone()),
            writer.put(&key, format!("b{i}")).await.unwrap(),
        ));
    }
    let mut last_by_partition: HashMap<u32, u64> = HashMap::new();
    for (_, write) in &puts {
        let last = last_by_partition.entry(write.partition).or_default();
        *last = (*last).max(write.version);
    }
    for (&partition, &offset) in &last_by_partition {
        bounded(replica.wait_for(partition, offset)).await.unwrap();
    }
    let received = take_changes(&mut changes, puts.len()).await;
    assert_every_put_once(&received, &puts);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), changes.recv())
            .await
            .is_err(),
        "no change beyond the writes"
    );
    assert_eq!(map_of(&replica), reference(&client, "t").await);
    assert!(replica.error().is_none());
}

/// Reads the stdout lines of a child on a thread, so the test can wait with a timeout.
fn lines_of(stdout: std::process::ChildStdout) -> mpsc::Receiver<String> {
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    receiver
}

fn next_json(lines: &mpsc::Receiver<String>) -> serde_json::Value {
    let line = lines
        .recv_timeout(WAIT)
        .expect("a line from syncline watch");
    serde_json::from_str(&line).unwrap_or_else(|error| panic!("{line}: {error}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_json_should_print_the_table_then_caught_up_then_each_change() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    let client = Client::connect(&broker.addr).await.unwrap();
    create_table(&client, "t", 2).await;
    let table = client.table("t").await.unwrap();
    let b = table.put("b", "2").await.unwrap();
    let a = table.put("a", "1").await.unwrap();
    table.put("gone", "x").await.unwrap();
    table.delete("gone").await.unwrap();

    let mut child = Command::new(binary("syncline"))
        .args(["--broker", &broker.addr, "watch", "t", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = lines_of(child.stdout.take().unwrap());
    // Keys sorted, then the caught-up line.
    assert_eq!(
        next_json(&lines),
        serde_json::json!({"key": "a", "value": "1", "version": a.version, "partition": a.partition})
    );
    assert_eq!(
        next_json(&lines),
        serde_json::json!({"key": "b", "value": "2", "version": b.version, "partition": b.partition})
    );
    assert_eq!(
        next_json(&lines),
        serde_json::json!({"caught_up": true, "keys": 2})
    );

    let updated = table.put("a", "3").await.unwrap();
    assert_eq!(
        next_json(&lines),
        serde_json::json!({"op": "put", "key": "a", "value": "3", "version": updated.version,
                           "previous_version": a.version, "partition": a.partition})
    );
    let deleted = table.delete("b").await.unwrap();
    assert_eq!(
        next_json(&lines),
        serde_json::json!({"op": "delete", "key": "b", "value": null, "version": deleted.version,
                           "previous_version": b.version, "partition": b.partition})
    );

    // SIGTERM ends a watch normally.
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

#[test]
fn watch_should_fail_with_one_line_for_an_unknown_topic_or_a_plain_topic() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    let run = |args: &[&str]| {
        Command::new(binary("syncline"))
            .args(["--broker", &broker.addr])
            .args(args)
            .output()
            .unwrap()
    };
    assert!(run(&["topic", "create", "events"]).status.success());
    for (topic, needle) in [("missing", "does not exist"), ("events", "not a table")] {
        let output = run(&["watch", topic]);
        assert_eq!(output.status.code(), Some(1), "{output:?}");
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(
            stderr.starts_with("error:") && stderr.contains(needle),
            "{stderr}"
        );
        assert!(output.stdout.is_empty());
    }
    let unreachable = Command::new(binary("syncline"))
        .args(["--broker", "127.0.0.1:1", "watch", "t"])
        .output()
        .unwrap();
    assert_eq!(unreachable.status.code(), Some(1));
    assert!(String::from_utf8(unreachable.stderr)
        .unwrap()
        .starts_with("error: cannot reach the broker at 127.0.0.1:1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn given_compaction_past_the_position_during_an_outage_should_resnapshot_and_emit_the_diff() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    let address = broker.addr.clone();
    let client = Client::connect(&address).await.unwrap();
    let config = TopicConfig {
        partitions: Some(1),
        cleanup_policy: CleanupPolicy::Compact,
        // Deletes expire at once, every append after a millisecond starts a new segment (the
        // cleaner only rewrites sealed ones), and any new data makes a partition worth
        // cleaning: the background cleaner soon removes a delete.
        delete_retention_ms: Some(0),
        segment_ms: Some(1),
        min_cleanable_dirty_ratio: Some(0.01),
        ..TopicConfig::default()
    };
    client.create_topic("t", config).await.unwrap();
    // Not idempotent: the cleaner keeps an idempotent producer's recent batches whole.
    let writer = client.table_with("t", plain_writes()).await.unwrap();
    let a = writer.put("a", "1").await.unwrap();
    let b = writer.put("b", "1").await.unwrap();
    let c = writer.put("c", "1").await.unwrap();
    drop(writer);
    let replica = client.sync_table_with("t", fast_config()).await.unwrap();
    bounded(replica.wait_caught_up()).await.unwrap();
    let (_, mut changes) = replica.entries_and_changes();
    let position = replica.next_offset(0).unwrap();
    assert_eq!(position, c.version + 1);

    // While the table cannot reach it (the broker runs on another port), the log moves on and
    // compaction removes a delete the table has not read.
    assert!(broker.stop(), "clean stop");
    // The cleaner looks every 50 ms instead of every 15 s.
    let elsewhere = BrokerProcess::start_with(dir.path(), &["--cleaner-interval-ms", "50"]);
    assert_ne!(elsewhere.addr, address);
    let other = Client::connect(&elsewhere.addr).await.unwrap();
    let writer = other.table_with("t", plain_writes()).await.unwrap();
    let a2 = writer.put("a", "2").await.unwrap();
    let b_deleted = writer.delete("b").await.unwrap();
    tokio::time::sleep(Duration::from_millis(2)).await; // the next append rolls a segment
    let d = writer.put("d", "1").await.unwrap();
    drop(writer);
    // Wait for the cleaner to remove the delete (the horizon passes it).
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let description = other.describe_topic("t").await.unwrap();
        if description.partitions[0].compaction_horizon > b_deleted.version {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the cleaner did not remove the delete at {}: {description:?}\n{}",
            b_deleted.version,
            elsewhere.drain_log().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(elsewhere.stop(), "clean stop");

    // Back on the table's address: it re-snapshots and reports the difference.
    let _broker = BrokerProcess::start_with(dir.path(), &["--listen", &address]);
    let mut received = take_changes(&mut changes, 3).await;
    received.sort_by(|x, y| x.key.cmp(&y.key));
    let summary: Vec<_> = received
        .iter()
        .map(|change| {
            (
                change.key.clone(),
                change.value.clone(),
                change.previous_version,
                change.from_snapshot,
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (
                Bytes::from("a"),
                Some(Bytes::from("2")),
                Some(a.version),
                true
            ),
            (Bytes::from("b"), None, Some(b.version), true),
            (Bytes::from("d"), Some(Bytes::from("1")), None, true),
        ]
    );
    assert_eq!(received[0].version, a2.version);
    assert!(
        received[1].version >= b_deleted.version,
        "{:?}",
        received[1]
    );
    assert_eq!(received[2].version, d.version);
    assert_eq!(
        map_of(&replica),
        BTreeMap::from([
            (Bytes::from("a"), (Bytes::from("2"), a2.version)),
            (Bytes::from("c"), (Bytes::from("1"), c.version)),
            (Bytes::from("d"), (Bytes::from("1"), d.version)),
        ])
    );
    assert!(replica.next_offset(0).unwrap() > d.version);
    assert!(replica.error().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn given_table_opened_after_compaction_should_equal_one_that_watched_from_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    let client = Client::connect(&broker.addr).await.unwrap();
    let config = TopicConfig {
        partitions: Some(3),
        cleanup_policy: CleanupPolicy::Compact,
        // Deletes may go at the first pass: the late table must not miss them either way.
        delete_retention_ms: Some(0),
        ..TopicConfig::default()
    };
    client.create_topic("t", config).await.unwrap();
    let watcher = client.sync_table_with("t", fast_config()).await.unwrap();
    bounded(watcher.wait_caught_up()).await.unwrap();
    let writer = client.table_with("t", plain_writes()).await.unwrap();
    let mut last = None;
    for round in 0..20 {
        for key in 0..KEYS {
            let key = format!("key-{key}");
            let written = if (round + key.len()) % 7 == 3 {
                writer.delete(&key).await.unwrap()
            } else {
                writer.put(&key, format!("{round}")).await.unwrap()
            };
            last = Some(written);
        }
    }
    let outcomes = client.compact_topic("t", true).await.unwrap();
    assert!(outcomes.iter().all(|o| o.error.is_none()), "{outcomes:?}");
    assert!(
        outcomes.iter().map(|o| o.records_removed).sum::<u64>() > 0,
        "{outcomes:?}"
    );
    // Writes after the pass, too.
    for key in 0..KEYS / 2 {
        last = Some(writer.put(format!("key-{key}"), "after").await.unwrap());
    }
    let late = client.sync_table_with("t", fast_config()).await.unwrap();
    bounded(late.wait_caught_up()).await.unwrap();
    let last = last.unwrap();
    bounded(watcher.wait_for_write(last)).await.unwrap();
    bounded(late.wait_for_write(last)).await.unwrap();
    // Partitions other than the last write's are caught up by wait_caught_up (the late table
    // opened after every write was durable).
    assert_eq!(map_of(&late), map_of(&watcher));
    assert_eq!(map_of(&late), reference(&client, "t").await);
    assert!(late.error().is_none() && watcher.error().is_none());
}
