//! Pins the client side of tables through the real broker binary: concurrent read–CAS–retry
//! increments lose no update and every successful CAS gets its own version; the `syncline put`,
//! `get`, `history` and `delete` commands keep their output and exit-status contracts (with and
//! without `--json`, conflicts naming the current version); table calls on a topic that is not
//! a table say how to create one; and the broker's idempotent-producer contract holds for raw
//! batches (a repeat is acknowledged with its original offsets and not appended, a gap is
//! OUT_OF_RANGE, an older epoch is fenced, all of it across a restart), and a fenced batching
//! producer fails clearly.

mod common;

use std::collections::BTreeSet;
use std::process::{Command, Output};

use bytes::Bytes;
use common::{binary, BrokerProcess};
use syncline_client::{CleanupPolicy, Client, Error, ProducerConfig, Table, TopicConfig, Written};
use syncline_proto::batch::BatchBuilder;
use syncline_proto::v1::{self, broker_client::BrokerClient};
use tonic::transport::Channel;
use tonic::Code;

/// Tasks incrementing the counter at once, and increments each: 200 in all, enough for many
/// conflicts on one key without making the test slow (every successful CAS waits for an fsync).
const TASKS: u64 = 8;
const INCREMENTS_PER_TASK: u64 = 25;

async fn create_table(client: &Client, name: &str, partitions: u32) {
    let config = TopicConfig {
        partitions: Some(partitions),
        cleanup_policy: CleanupPolicy::Compact,
        ..TopicConfig::default()
    };
    client.create_topic(name, config).await.unwrap();
}

/// Adds one to the counter under `key`: read, compare-and-set, and on a conflict read again.
/// Returns the successful write.
async fn increment(table: &Table, key: &str) -> Written {
    loop {
        let attempt = match table.get(key).await.unwrap() {
            None => table.put_if_absent(key, "1").await,
            Some(entry) => {
                let value: u64 = std::str::from_utf8(&entry.value).unwrap().parse().unwrap();
                table
                    .put_if(key, (value + 1).to_string(), entry.version)
                    .await
            }
        };
        match attempt {
            Ok(written) => return written,
            Err(Error::Conflict { .. }) => continue,
            Err(error) => panic!("increment failed: {error}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn given_concurrent_read_cas_retry_increments_should_lose_no_update() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    let client = Client::connect(&broker.addr).await.unwrap();
    create_table(&client, "counters", 3).await;

    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        // A handle each: its own conditional-write producer id, so the CAS requests really
        // race at the broker.
        let table = client.table("counters").await.unwrap();
        tasks.push(tokio::spawn(async move {
            let mut versions = Vec::new();
            for _ in 0..INCREMENTS_PER_TASK {
                versions.push(increment(&table, "counter").await.version);
            }
            versions
        }));
    }
    let mut versions = BTreeSet::new();
    let total = TASKS * INCREMENTS_PER_TASK;
    for task in tasks {
        for version in task.await.unwrap() {
            assert!(versions.insert(version), "version {version} given twice");
        }
    }
    assert_eq!(versions.len() as u64, total);

    let table = client.table("counters").await.unwrap();
    let entry = table.get("counter").await.unwrap().expect("counter exists");
    assert_eq!(&entry.value[..], total.to_string().as_bytes());
    assert_eq!(Some(&entry.version), versions.last());
    // The history is exactly 1, 2, ..., 200 at the versions the CASes returned.
    let history = table.history("counter", 1000).await.unwrap();
    let values: Vec<u64> = history
        .versions
        .iter()
        .map(|version| {
            std::str::from_utf8(version.value.as_deref().unwrap())
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert_eq!(values, (1..=total).collect::<Vec<_>>());
    let history_versions: BTreeSet<u64> = history.versions.iter().map(|v| v.version).collect();
    assert_eq!(history_versions, versions);
}

fn syncline(broker: &BrokerProcess, args: &[&str]) -> Output {
    Command::new(binary("syncline"))
        .args(["--broker", &broker.addr])
        .args(args)
        .output()
        .expect("run syncline")
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).unwrap()
}

/// Runs a command that must succeed and returns its stdout.
#[track_caller]
fn ok(broker: &BrokerProcess, args: &[&str]) -> String {
    let output = syncline(broker, args);
    assert!(
        output.status.success(),
        "{args:?} failed: {}",
        stderr(&output)
    );
    stdout(&output)
}

/// Runs a command that must fail with exit status 1 and one `error:` line containing `needle`.
#[track_caller]
fn fails(broker: &BrokerProcess, args: &[&str], needle: &str) {
    let output = syncline(broker, args);
    assert_eq!(
        output.status.code(),
        Some(1),
        "{args:?}: stdout {}, stderr {}",
        stdout(&output),
        stderr(&output)
    );
    assert!(stdout(&output).is_empty(), "{args:?}: {}", stdout(&output));
    let err = stderr(&output);
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "one line expected: {err}"
    );
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains(needle), "`{needle}` not in: {err}");
}

fn version_of(printed: &str) -> u64 {
    printed
        .strip_suffix('\n')
        .and_then(|line| line.parse().ok())
        .unwrap_or_else(|| panic!("not a version and a newline: {printed:?}"))
}

/// `topic create kv --partitions N --cleanup compact`.
fn create_kv(broker: &BrokerProcess, partitions: u32) {
    let partitions = partitions.to_string();
    ok(
        broker,
        &[
            "topic",
            "create",
            "kv",
            "--partitions",
            &partitions,
            "--cleanup",
            "compact",
        ],
    );
}

fn json(line: &str) -> serde_json::Value {
    serde_json::from_str(line).unwrap_or_else(|error| panic!("{error}: {line}"))
}

#[test]
fn cli_put_get_history_delete_should_round_trip_and_report_conflicts() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    create_kv(&broker, 3);

    let first = version_of(&ok(&broker, &["put", "kv", "user-1", "hello world"]));
    assert_eq!(ok(&broker, &["get", "kv", "user-1"]), "hello world\n");
    let second = version_of(&ok(&broker, &["put", "kv", "user-1", "second"]));
    assert!(second > first, "{first} then {second}");
    assert_eq!(ok(&broker, &["get", "kv", "user-1"]), "second\n");

    let got = json(ok(&broker, &["get", "kv", "user-1", "--json"]).trim_end());
    assert_eq!(got["key"], "user-1");
    assert_eq!(got["value"], "second");
    assert_eq!(got["version"], second);
    let partition = got["partition"].as_u64().expect("partition is a number");
    assert!(partition < 3);

    let put_json = json(ok(&broker, &["put", "kv", "user-1", "third", "--json"]).trim_end());
    let third = put_json["version"].as_u64().expect("version is a number");
    assert_eq!(put_json["key"], "user-1");
    assert_eq!(put_json["value"], "third");
    assert_eq!(put_json["partition"], partition);

    // A stale expected version: non-zero, nothing written, the current version named.
    fails(
        &broker,
        &[
            "put",
            "kv",
            "user-1",
            "stale",
            "--expect-version",
            &first.to_string(),
        ],
        &format!("version conflict on key user-1: current version is {third}"),
    );
    fails(
        &broker,
        &["put", "kv", "user-1", "again", "--expect-absent"],
        &format!("current version is {third}"),
    );
    fails(
        &broker,
        &["put", "kv", "nobody", "x", "--expect-version", "3"],
        "version conflict on key nobody: key is absent",
    );
    assert_eq!(ok(&broker, &["get", "kv", "user-1"]), "third\n");
    let fourth = version_of(&ok(
        &broker,
        &[
            "put",
            "kv",
            "user-1",
            "fourth",
            "--expect-version",
            &third.to_string(),
        ],
    ));

    // Delete: get fails with exit 1, history shows the delete, the key is absent again.
    let deleted = version_of(&ok(&broker, &["delete", "kv", "user-1"]));
    assert!(deleted > fourth);
    fails(&broker, &["get", "kv", "user-1"], "user-1");
    fails(&broker, &["get", "kv", "never-written"], "not found");
    assert_eq!(
        ok(&broker, &["history", "kv", "user-1"]),
        format!(
            "{first}\tput\thello world\n{second}\tput\tsecond\n{third}\tput\tthird\n\
             {fourth}\tput\tfourth\n{deleted}\tdelete\n"
        )
    );
    assert_eq!(
        ok(&broker, &["history", "kv", "user-1", "--limit", "2"]),
        format!("{fourth}\tput\tfourth\n{deleted}\tdelete\n")
    );
    let history: Vec<serde_json::Value> = ok(&broker, &["history", "kv", "user-1", "--json"])
        .lines()
        .map(json)
        .collect();
    assert_eq!(history.len(), 5);
    for entry in &history {
        for field in ["key", "value", "version", "partition"] {
            assert!(entry.get(field).is_some(), "{field} missing in {entry}");
        }
        assert_eq!(entry["partition"], partition);
    }
    assert_eq!(history[0]["value"], "hello world");
    assert_eq!(history[0]["version"], first);
    assert_eq!(history[4]["value"], serde_json::Value::Null);
    assert_eq!(history[4]["deleted"], true);
    assert_eq!(history[4]["version"], deleted);

    let recreated = version_of(&ok(
        &broker,
        &["put", "kv", "user-1", "back", "--expect-absent"],
    ));
    let delete_json = json(
        ok(
            &broker,
            &[
                "delete",
                "kv",
                "user-1",
                "--expect-version",
                &recreated.to_string(),
                "--json",
            ],
        )
        .trim_end(),
    );
    assert_eq!(delete_json["key"], "user-1");
    assert_eq!(delete_json["value"], serde_json::Value::Null);
    assert_eq!(delete_json["deleted"], true);
    assert!(delete_json["version"].as_u64().unwrap() > recreated);
    fails(&broker, &["get", "kv", "user-1", "--json"], "user-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_calls_on_a_topic_that_is_not_a_table_should_say_how_to_create_one() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    let client = Client::connect(&broker.addr).await.unwrap();
    client
        .create_topic("events", TopicConfig::with_partitions(2))
        .await
        .unwrap();

    let error = client.table("events").await.unwrap_err();
    assert!(matches!(&error, Error::NotATable { topic } if topic == "events"));
    assert!(error.to_string().contains("--cleanup compact"), "{error}");

    let broker_for_cli = &broker;
    tokio::task::block_in_place(|| {
        fails(broker_for_cli, &["get", "events", "k"], "--cleanup compact");
        fails(
            broker_for_cli,
            &["put", "events", "k", "v"],
            "--cleanup compact",
        );
        fails(
            broker_for_cli,
            &["history", "events", "k"],
            "--cleanup compact",
        );
        fails(
            broker_for_cli,
            &["delete", "events", "k"],
            "--cleanup compact",
        );
    });

    // The broker says the same to a client that does not check first.
    let mut grpc = broker.client().await;
    let status = grpc
        .get(v1::GetRequest {
            topic: "events".into(),
            key: Bytes::from_static(b"k"),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("--cleanup compact"), "{status:?}");
    let conditional = v1::ProduceRequest {
        topic: "events".into(),
        partition: syncline_client::partition_for_key(b"k", 2),
        records: vec![v1::Record {
            key: Some(Bytes::from_static(b"k")),
            value: Some(Bytes::from_static(b"v")),
            ..Default::default()
        }],
        conditions: vec![v1::Condition {
            key: Bytes::from_static(b"k"),
            expect: Some(v1::condition::Expect::Absent(true)),
        }],
        ..Default::default()
    };
    let status = grpc.produce(conditional).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("--cleanup compact"), "{status:?}");
}

/// A batch of `records` records from producer `id` at `epoch`, starting at `sequence`.
fn producer_batch(id: u64, epoch: u32, sequence: i32, records: u32) -> Bytes {
    let mut builder = BatchBuilder::new().producer(id as i64, epoch as i16, sequence);
    for i in 0..records {
        builder.push(
            1_700_000_000_000,
            None,
            Some(format!("r{i}").as_bytes()),
            &[],
        );
    }
    builder.finish().unwrap()
}

fn produce_request(batch: Bytes) -> v1::ProduceRequest {
    v1::ProduceRequest {
        topic: "events".into(),
        partition: 0,
        batch,
        ..Default::default()
    }
}

async fn produce(
    grpc: &mut BrokerClient<Channel>,
    batch: &Bytes,
) -> Result<(u64, u64), tonic::Status> {
    grpc.produce(produce_request(batch.clone()))
        .await
        .map(|response| {
            let response = response.into_inner();
            (response.base_offset, response.last_offset)
        })
}

async fn log_end(grpc: &mut BrokerClient<Channel>) -> u64 {
    let description = grpc
        .describe_topic(v1::DescribeTopicRequest {
            name: "events".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .topic
        .unwrap();
    description.partitions[0].log_end_offset
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_idempotent_batch_should_keep_its_original_offsets_even_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    let client = Client::connect(&broker.addr).await.unwrap();
    client
        .create_topic("events", TopicConfig::with_partitions(1))
        .await
        .unwrap();
    let mut grpc = broker.client().await;
    let identity = client.init_producer(None).await.unwrap();
    let id = identity.producer_id();
    assert_eq!(identity.epoch(), 0);

    // The same bytes twice: the repeat gets the original offsets and appends nothing.
    let first = producer_batch(id, 0, 0, 3);
    assert_eq!(produce(&mut grpc, &first).await.unwrap(), (0, 2));
    assert_eq!(produce(&mut grpc, &first).await.unwrap(), (0, 2));
    assert_eq!(log_end(&mut grpc).await, 3);
    let second = producer_batch(id, 0, 3, 2);
    assert_eq!(produce(&mut grpc, &second).await.unwrap(), (3, 4));

    // A gap (sequence 7 where 5 is next) is OUT_OF_RANGE and appends nothing.
    let status = produce(&mut grpc, &producer_batch(id, 0, 7, 1))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(
        status.message().contains('5') && status.message().contains('7'),
        "{status:?}"
    );
    assert_eq!(log_end(&mut grpc).await, 5);

    // Restart on the same directory: the producer state is back.
    assert!(broker.stop(), "clean stop");
    let broker = BrokerProcess::start(dir.path());
    let mut grpc = broker.client().await;
    assert_eq!(produce(&mut grpc, &second).await.unwrap(), (3, 4));
    assert_eq!(
        log_end(&mut grpc).await,
        5,
        "no duplicate after the restart"
    );
    let status = produce(&mut grpc, &producer_batch(id, 0, 9, 1))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert_eq!(
        produce(&mut grpc, &producer_batch(id, 0, 5, 1))
            .await
            .unwrap(),
        (5, 5)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_init_producer_for_an_existing_id_older_epoch_should_be_fenced() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    let client = Client::connect(&broker.addr).await.unwrap();
    client
        .create_topic("events", TopicConfig::with_partitions(1))
        .await
        .unwrap();
    let mut grpc = broker.client().await;
    let id = client.init_producer(None).await.unwrap().producer_id();
    assert_eq!(
        produce(&mut grpc, &producer_batch(id, 0, 0, 2))
            .await
            .unwrap(),
        (0, 1)
    );

    // InitProducer(id) bumps the epoch, which fences the older instance at once: its next
    // batch is refused although the new instance has not written yet.
    let bumped = client.init_producer(Some(id)).await.unwrap();
    assert_eq!((bumped.producer_id(), bumped.epoch()), (id, 1));
    let status = produce(&mut grpc, &producer_batch(id, 0, 2, 1))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("fenced"), "{status:?}");
    assert_eq!(log_end(&mut grpc).await, 2);

    let newer = producer_batch(id, 1, 0, 1);
    assert_eq!(produce(&mut grpc, &newer).await.unwrap(), (2, 2));
    assert!(broker.stop(), "clean stop");
    let broker = BrokerProcess::start(dir.path());
    let mut grpc = broker.client().await;
    let status = produce(&mut grpc, &producer_batch(id, 0, 2, 1))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(produce(&mut grpc, &newer).await.unwrap(), (2, 2));
    assert_eq!(log_end(&mut grpc).await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batching_producer_should_be_idempotent_and_fail_clearly_when_fenced() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    let client = Client::connect(&broker.addr).await.unwrap();
    client
        .create_topic("events", TopicConfig::with_partitions(2))
        .await
        .unwrap();
    let producer = client
        .producer("events", ProducerConfig::default())
        .await
        .unwrap();
    let identity = producer.identity().expect("idempotent by default");
    let mut pending = Vec::new();
    for i in 0..100 {
        let key = format!("key-{}", i % 7);
        pending.push(
            producer
                .enqueue(Some(key.as_bytes()), Some(b"v"), &[])
                .await
                .unwrap(),
        );
    }
    for delivery in pending {
        delivery.await.unwrap();
    }

    // Another instance takes the id over and writes to both partitions: this one's next batch
    // is refused, clearly.
    let takeover = client
        .init_producer(Some(identity.producer_id()))
        .await
        .unwrap();
    let mut grpc = broker.client().await;
    for partition in 0..2 {
        let batch = producer_batch(takeover.producer_id(), takeover.epoch(), 0, 1);
        grpc.produce(v1::ProduceRequest {
            partition,
            ..produce_request(batch)
        })
        .await
        .unwrap();
    }
    let error = producer
        .send(Some(b"key-1"), Some(b"late"), &[])
        .await
        .unwrap_err();
    assert!(matches!(error, Error::ProducerFenced { .. }), "{error:?}");
    assert!(error.to_string().contains("fenced"), "{error}");
    let error = producer
        .send(Some(b"key-2"), Some(b"later"), &[])
        .await
        .unwrap_err();
    assert!(matches!(error, Error::ProducerFenced { .. }), "{error:?}");
    let description = client.describe_topic("events").await.unwrap();
    let stored: u64 = description
        .partitions
        .iter()
        .map(|partition| partition.log_end_offset)
        .sum();
    assert_eq!(stored, 100 + 2, "nothing stored after the fence");
}

/// One partition's row of `topic compact`: (records removed, records kept for producers).
fn compact_row(output: &str) -> (u64, u64) {
    let header: Vec<&str> = output
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let column = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .unwrap_or_else(|| panic!("no {name} column in {output}"))
    };
    let row: Vec<&str> = output
        .lines()
        .nth(1)
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let at = |name: &str| row[column(name)].parse::<u64>().unwrap();
    (at("RECORDS-REMOVED"), at("KEPT-FOR-PRODUCERS"))
}

/// Issue 13 item 15: `topic compact` after eight `syncline put` calls of one key reclaimed
/// nothing and said nothing, because each put was a new idempotent producer whose batch
/// compaction kept whole for an hour. Plain puts no longer pin anything; one-shot
/// compare-and-set puts (still idempotent, so a retry is recognised) are kept for a short while
/// and the compact output and `topic describe` say so.
#[test]
fn cli_puts_of_one_key_when_compacted_should_reclaim_superseded_and_say_what_it_kept() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    create_kv(&broker, 1);
    // A first record of another key: the output segment's first batch is never emptied.
    ok(&broker, &["put", "kv", "first", "x"]);
    for i in 0..8 {
        ok(&broker, &["put", "kv", "k", &format!("v{i}")]);
    }
    let compacted = ok(&broker, &["topic", "compact", "kv"]);
    assert_eq!(compact_row(&compacted), (7, 0), "{compacted}");
    assert!(!compacted.contains("kept "), "{compacted}");
    assert_eq!(
        ok(&broker, &["history", "kv", "k"]),
        "8\tput\tv7\n",
        "only the latest version is left"
    );

    // Three compare-and-set puts of one key: each its own idempotent producer.
    let mut version = version_of(&ok(&broker, &["put", "kv", "c", "c0", "--expect-absent"]));
    for value in ["c1", "c2"] {
        version = version_of(&ok(
            &broker,
            &[
                "put",
                "kv",
                "c",
                value,
                "--expect-version",
                &version.to_string(),
            ],
        ));
    }
    let compacted = ok(&broker, &["topic", "compact", "kv"]);
    assert_eq!(compact_row(&compacted), (0, 2), "{compacted}");
    assert!(
        compacted.contains("kept 2 superseded record(s)")
            && compacted.contains("idempotent producers"),
        "{compacted}"
    );
    let described = ok(&broker, &["topic", "describe", "kv"]);
    assert!(described.contains("KEPT-FOR-PRODUCERS"), "{described}");
}
