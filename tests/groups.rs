//! Pins consumer groups end to end through the real broker binary and the client's
//! `GroupConsumer`: every partition is read by exactly one member and a crashed member's
//! partitions move to the others within the session timeout; at-least-once delivery with
//! per-key order across members that crash and restart; a commit with a stale epoch is refused
//! and changes nothing; committed offsets survive a broker restart; and the `syncline consume
//! --group` / `syncline group ...` commands.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{binary, BrokerProcess};
use syncline_client::{
    Client, Code, GroupConsumer, GroupConsumerConfig, ProducerConfig, TopicConfig, TopicPartition,
};
use syncline_proto::v1;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// A short initial delay (the default 3 s would dominate every test) and a fast heartbeat, so
/// partitions move within a fraction of a second.
const BROKER_FLAGS: &[&str] = &[
    "--group-initial-rebalance-delay-ms",
    "200",
    "--group-heartbeat-interval-ms",
    "100",
];

/// Short sessions so that a crashed member's partitions move quickly (the broker's minimum is
/// 1000 ms; 2000 leaves room for a slow CI machine between heartbeats).
const SESSION_TIMEOUT: Duration = Duration::from_millis(2000);

fn member_config() -> GroupConsumerConfig {
    GroupConsumerConfig {
        session_timeout: Some(SESSION_TIMEOUT),
        auto_commit_interval: Some(Duration::from_millis(200)),
        retry_backoff: Duration::from_millis(20),
        retry_backoff_max: Duration::from_millis(200),
        fetch_max_wait: Duration::from_millis(100),
        ..GroupConsumerConfig::default()
    }
}

async fn produce_keyed(client: &Client, topic: &str, count: u64, keys: u64, from: u64) {
    let producer = client
        .producer(topic, ProducerConfig::default())
        .await
        .unwrap();
    let mut pending = Vec::new();
    for i in from..from + count {
        let key = format!("k{}", i % keys);
        let value = format!("{key}:{i}");
        pending.push(
            producer
                .enqueue(Some(key.as_bytes()), Some(value.as_bytes()), &[])
                .await
                .unwrap(),
        );
    }
    producer.flush().await;
    for delivery in pending {
        delivery.await.unwrap();
    }
}

/// Polls `check` until it returns `Some` or `timeout` passes.
async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What one member task saw: (partition, offset, value).
type Seen = Arc<Mutex<Vec<(u32, u64, String)>>>;

/// Runs a member in a task that records what it receives until told to abort (no commit, no
/// leave) or close (commit and leave).
fn spawn_member(
    mut consumer: GroupConsumer,
) -> (Seen, oneshot::Sender<bool>, tokio::task::JoinHandle<()>) {
    let seen: Seen = Arc::default();
    let (stop, mut stopped) = oneshot::channel::<bool>();
    let record_seen = Arc::clone(&seen);
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                next = consumer.recv() => match next {
                    Some(Ok(record)) => record_seen.lock().unwrap().push((
                        record.partition,
                        record.offset,
                        String::from_utf8(record.value.unwrap_or_default().to_vec()).unwrap(),
                    )),
                    Some(Err(error)) => panic!("member failed: {error}"),
                    None => return,
                },
                close = &mut stopped => {
                    if close.unwrap_or(false) {
                        consumer.close().await.unwrap();
                    } else {
                        consumer.abort();
                    }
                    return;
                }
            }
        }
    });
    (seen, stop, task)
}

fn partitions_seen(seen: &Seen) -> BTreeSet<u32> {
    seen.lock().unwrap().iter().map(|record| record.0).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_should_split_the_partitions_and_take_over_a_crashed_members_share() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start_with(dir.path(), BROKER_FLAGS);
    let client = Client::connect(&broker.addr).await.unwrap();
    client
        .create_topic("events", TopicConfig::with_partitions(12))
        .await
        .unwrap();
    produce_keyed(&client, "events", 1200, 120, 0).await;

    let mut members = Vec::new();
    for _ in 0..3 {
        let consumer = client
            .group_consumer("g", &["events"], member_config())
            .await
            .unwrap();
        let id = consumer.member_id();
        members.push((id, spawn_member(consumer)));
    }
    // Every partition owned by exactly one member, as the coordinator sees it.
    let description = eventually(
        Duration::from_secs(15),
        "a stable 3-member group",
        || async {
            let description = client.describe_group("g").await.ok()?;
            let owned: usize = description
                .members
                .iter()
                .map(|member| member.assignment.len())
                .sum();
            (description.members.len() == 3
                && owned == 12
                && description.partitions.iter().all(|p| p.owner.is_some()))
            .then_some(description)
        },
    )
    .await;
    let mut owner_of: BTreeMap<u32, String> = BTreeMap::new();
    for member in &description.members {
        assert!(
            (3..=5).contains(&member.assignment.len()),
            "balanced: {description:?}"
        );
        for partition in &member.assignment {
            assert_eq!(partition.topic, "events");
            assert!(owner_of
                .insert(partition.partition, member.member_id.clone())
                .is_none());
        }
    }
    assert_eq!(owner_of.len(), 12);
    // And as the records show: everything read, each partition by its owner only.
    eventually(Duration::from_secs(15), "all 1200 records read", || async {
        let total: usize = members
            .iter()
            .map(|(_, (seen, _, _))| seen.lock().unwrap().len())
            .sum();
        (total >= 1200).then_some(())
    })
    .await;
    for (id, (seen, _, _)) in &members {
        for partition in partitions_seen(seen) {
            assert_eq!(&owner_of[&partition], id, "partition {partition}");
        }
    }

    // Crash member 0: no commit, no leave. Its partitions move within the session timeout.
    let (crashed_id, (_, stop, task)) = members.remove(0);
    let crashed: BTreeSet<u32> = owner_of
        .iter()
        .filter(|(_, owner)| **owner == crashed_id)
        .map(|(partition, _)| *partition)
        .collect();
    stop.send(false).unwrap();
    task.await.unwrap();
    let started = Instant::now();
    eventually(
        SESSION_TIMEOUT * 4,
        "the crashed member's partitions to move",
        || async {
            let description = client.describe_group("g").await.ok()?;
            (description.members.len() == 2
                && description.partitions.iter().all(|partition| {
                    partition
                        .owner
                        .as_ref()
                        .is_some_and(|owner| *owner != crashed_id)
                }))
            .then_some(())
        },
    )
    .await;
    assert!(started.elapsed() < SESSION_TIMEOUT * 3);
    // The survivors now read the moved partitions.
    produce_keyed(&client, "events", 1200, 120, 1200).await;
    eventually(
        Duration::from_secs(15),
        "the moved partitions to be read",
        || async {
            let read: BTreeSet<u32> = members
                .iter()
                .flat_map(|(_, (seen, _, _))| partitions_seen(seen))
                .collect();
            crashed.is_subset(&read).then_some(())
        },
    )
    .await;
    for (_, (_, stop, task)) in members {
        stop.send(true).unwrap();
        task.await.unwrap();
    }
}

/// A seeded xorshift generator: the crash points differ per seed and a failure names it.
struct Rng(u64);

impl Rng {
    fn below(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % bound
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_crashing_at_random_points_should_still_process_every_record_in_key_order() {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        | 1;
    println!("seed {seed}");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start_with(dir.path(), BROKER_FLAGS);
    let client = Client::connect(&broker.addr).await.unwrap();
    client
        .create_topic("orders", TopicConfig::with_partitions(6))
        .await
        .unwrap();
    const RECORDS: u64 = 3000;
    const KEYS: u64 = 30;
    produce_keyed(&client, "orders", RECORDS, KEYS, 0).await;

    let config = GroupConsumerConfig {
        session_timeout: Some(Duration::from_millis(1000)),
        ..member_config()
    };
    let mut processed: BTreeSet<u64> = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut incarnations = 0;
    while (processed.len() as u64) < RECORDS {
        assert!(
            Instant::now() < deadline,
            "seed {seed}: only {} of {RECORDS} processed",
            processed.len()
        );
        incarnations += 1;
        // Two members; each processes a random number of records, then crashes or closes.
        let mut pair = Vec::new();
        for _ in 0..2 {
            let consumer = client
                .group_consumer("workers", &["orders"], config.clone())
                .await
                .unwrap();
            pair.push((consumer, 50 + rng.below(800), rng.below(3) != 0));
        }
        for (mut consumer, budget, crash) in pair {
            // Per key, the sequence numbers this incarnation processed, in order.
            let mut last_by_key: BTreeMap<String, u64> = BTreeMap::new();
            let idle = Duration::from_millis(if crash { 1500 } else { 3000 });
            for _ in 0..budget {
                let record = match tokio::time::timeout(idle, consumer.recv()).await {
                    Ok(Some(record)) => record.unwrap(),
                    Ok(None) => panic!("seed {seed}: member stopped"),
                    Err(_) => break,
                };
                let value = String::from_utf8(record.value.unwrap().to_vec()).unwrap();
                let (key, sequence) = value.split_once(':').unwrap();
                let sequence: u64 = sequence.parse().unwrap();
                if let Some(last) = last_by_key.insert(key.to_owned(), sequence) {
                    assert!(
                        sequence > last,
                        "seed {seed}: key {key} went from {last} to {sequence}"
                    );
                }
                processed.insert(sequence);
            }
            if crash {
                consumer.abort();
            } else {
                consumer.close().await.unwrap();
            }
        }
    }
    println!("seed {seed}: {incarnations} rounds");
    assert_eq!(processed.len() as u64, RECORDS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_epoch_commit_should_be_refused_and_offsets_should_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start_with(dir.path(), BROKER_FLAGS);
    let client = Client::connect(&broker.addr).await.unwrap();
    client
        .create_topic("t", TopicConfig::with_partitions(2))
        .await
        .unwrap();
    produce_keyed(&client, "t", 10, 5, 0).await;
    let mut grpc = client.grpc();
    let joined = grpc
        .join_group(v1::JoinGroupRequest {
            group: "g".into(),
            member_id: String::new(),
            topics: vec!["t".into()],
            session_timeout_ms: Some(10_000),
            client_id: "test".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first_epoch = joined.member_epoch;
    let member_id = joined.member_id.clone();
    let (epoch, assignment) = eventually(Duration::from_secs(10), "an assignment", || {
        let mut grpc = grpc.clone();
        let member_id = member_id.clone();
        async move {
            let response = grpc
                .heartbeat(v1::HeartbeatRequest {
                    group: "g".into(),
                    member_id,
                    member_epoch: first_epoch,
                    owned: vec![],
                })
                .await
                .ok()?
                .into_inner();
            (!response.assignment.is_empty())
                .then_some((response.member_epoch, response.assignment))
        }
    })
    .await;
    assert_ne!(epoch, first_epoch, "the assignment changed the epoch");
    let partition = assignment[0].partitions[0];
    let commit = |member_epoch: u32, offset: u64| v1::CommitOffsetsRequest {
        group: "g".into(),
        member_id: member_id.clone(),
        member_epoch,
        offsets: vec![v1::OffsetCommit {
            topic: "t".into(),
            partition,
            offset,
            ..Default::default()
        }],
    };
    grpc.commit_offsets(commit(epoch, 3)).await.unwrap();
    let refused = grpc
        .commit_offsets(commit(first_epoch, 1))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    let committed = |offsets: Vec<syncline_client::CommittedOffset>| -> Vec<(u32, u64)> {
        offsets
            .into_iter()
            .map(|offset| (offset.partition, offset.offset))
            .collect()
    };
    assert_eq!(
        committed(client.fetch_offsets("g", None).await.unwrap()),
        [(partition, 3)]
    );
    // A standalone commit is refused while the group has members.
    let standalone = client
        .commit_offsets(
            "g",
            &[syncline_client::OffsetCommit::new("t", partition, 2)],
        )
        .await
        .unwrap_err();
    assert_eq!(standalone.code(), Some(Code::FailedPrecondition));

    let address = broker.addr.clone();
    assert!(broker.stop());
    let mut flags = BROKER_FLAGS.to_vec();
    flags.extend(["--listen", &address]);
    let _broker = BrokerProcess::start_with(dir.path(), &flags);
    let offsets = eventually(Duration::from_secs(10), "the restarted broker", || async {
        client.fetch_offsets("g", None).await.ok()
    })
    .await;
    assert_eq!(committed(offsets), [(partition, 3)]);
    let only = client
        .fetch_offsets("g", Some(&[TopicPartition::new("t", partition)]))
        .await
        .unwrap();
    assert_eq!(only.len(), 1);
}

fn syncline(broker: &BrokerProcess, args: &[&str]) -> Output {
    Command::new(binary("syncline"))
        .args(["--broker", &broker.addr])
        .args(args)
        .output()
        .expect("run syncline")
}

fn lines(output: &Output) -> Vec<String> {
    String::from_utf8(output.stdout.clone())
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
}

#[track_caller]
fn assert_success(output: &Output) {
    assert!(
        output.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_group_consume_should_commit_what_it_printed_and_reset_offsets_should_rewind() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start_with(dir.path(), BROKER_FLAGS);
    let client = Client::connect(&broker.addr).await.unwrap();
    client
        .create_topic("t", TopicConfig::with_partitions(3))
        .await
        .unwrap();
    produce_keyed(&client, "t", 20, 7, 0).await;
    let consume = ["consume", "t", "--group", "cg", "--timeout-ms", "1500"];

    let first = syncline(&broker, &consume);
    assert_success(&first);
    let mut printed = lines(&first);
    printed.sort();
    let mut expected: Vec<String> = (0..20).map(|i| format!("k{}:{i}", i % 7)).collect();
    expected.sort();
    assert_eq!(printed, expected);

    let second = syncline(&broker, &consume);
    assert_success(&second);
    assert!(lines(&second).is_empty(), "{:?}", lines(&second));

    let described = syncline(&broker, &["group", "describe", "cg"]);
    assert_success(&described);
    let text = lines(&described);
    assert_eq!(text[0], "group: cg");
    assert!(text[1].starts_with("state: "), "{text:?}");
    assert_eq!(text[3], "members: 0");
    let header: Vec<&str> = text[5].split_whitespace().collect();
    assert_eq!(
        header,
        ["TOPIC", "PARTITION", "MEMBER", "COMMITTED", "END", "LAG"]
    );
    let rows: Vec<Vec<&str>> = text[6..]
        .iter()
        .map(|line| line.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 3, "{text:?}");
    for row in &rows {
        assert_eq!(row[0], "t");
        assert_eq!(row[2], "-", "no owner after the member left");
        assert_eq!(row[3], row[4], "committed = end");
        assert_eq!(row[5], "0", "lag 0");
    }

    let listed = syncline(&broker, &["group", "list"]);
    assert_success(&listed);
    assert!(lines(&listed).contains(&"cg".to_owned()));
    let long = syncline(&broker, &["group", "list", "--long"]);
    assert_success(&long);
    assert_eq!(
        lines(&long)[0].split_whitespace().collect::<Vec<_>>(),
        ["GROUP", "MEMBERS", "STATE"]
    );

    let reset = syncline(
        &broker,
        &[
            "group",
            "reset-offsets",
            "cg",
            "--topic",
            "t",
            "--to-earliest",
        ],
    );
    assert_success(&reset);
    let reset_lines = lines(&reset);
    assert_eq!(
        reset_lines[0].split_whitespace().collect::<Vec<_>>(),
        ["TOPIC", "PARTITION", "NEW-OFFSET"]
    );
    assert_eq!(reset_lines.len(), 4);
    assert!(reset_lines[1..].iter().all(|line| line.ends_with(" 0")));

    let third = syncline(&broker, &consume);
    assert_success(&third);
    assert_eq!(lines(&third).len(), 20);

    // Refused, with one clear line, while the group has a member.
    let member = client
        .group_consumer("cg", &["t"], member_config())
        .await
        .unwrap();
    let refused = syncline(
        &broker,
        &[
            "group",
            "reset-offsets",
            "cg",
            "--topic",
            "t",
            "--to-latest",
        ],
    );
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.starts_with("error: group cg has 1 member(s)"),
        "{stderr}"
    );
    member.close().await.unwrap();

    // Usage errors exit 2.
    let usage = syncline(&broker, &["group", "reset-offsets", "cg", "--topic", "t"]);
    assert_eq!(usage.status.code(), Some(2));
}

/// A record the command took but could not print (stdout closed: `| head`, a dead pipe) must
/// not be committed, or the group's next run skips it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_group_consume_should_not_commit_a_record_it_failed_to_print() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start_with(dir.path(), BROKER_FLAGS);
    let client = Client::connect(&broker.addr).await.unwrap();
    client
        .create_topic("t", TopicConfig::with_partitions(1))
        .await
        .unwrap();
    produce_keyed(&client, "t", 5, 5, 0).await;
    let mut child = Command::new(binary("syncline"))
        .args(["--broker", &broker.addr])
        .args([
            "consume",
            "t",
            "--group",
            "dead-pipe",
            "--timeout-ms",
            "1500",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run syncline");
    // Close the reading end: the first write fails with a broken pipe.
    drop(child.stdout.take());
    // A reader that went away is not a failure (`| head`), but what it did not get stays
    // uncommitted.
    let output = child.wait_with_output().unwrap();
    assert_success(&output);
    let committed = client.fetch_offsets("dead-pipe", None).await.unwrap();
    assert!(
        committed.iter().all(|offset| offset.offset == 0),
        "nothing was printed, nothing may be committed: {committed:?}"
    );
}
