//! Catching up by snapshot (issue 15), on three real nodes with snapshots every 64 Raft entries
//! and none kept below them: a follower killed (kill -9) while its leader's Raft log is purged
//! past it gets the leader's partition log (its segment files) when it restarts, holds the
//! same batches at the same offsets as the leader, byte for byte, shows as caught up in
//! DescribeCluster, keeps taking part in commits, and serves reads and writes once it leads;
//! for a table, `Get` of keys written while it was down answers their latest values.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use common::cluster::Cluster;
use syncline_client::{ClusterDescription, TopicConfig};
use syncline_proto::v1;

/// Generous: elections take about a second, CI machines are slow and shared.
const TIMEOUT: Duration = Duration::from_secs(60);
const EVENTS: &str = "events";
const TABLE: &str = "table";
/// Raft entries between snapshots: small, so a few hundred writes purge the Raft log often.
const SNAPSHOT_EVERY: &str = "64";
/// Written while the follower is down: several snapshots' worth of entries (one per write).
/// `SYNCLINE_CATCH_UP_WRITES` raises it for a measurement (the install's log lines, printed,
/// give the bytes and times).
const WHILE_DOWN: u64 = 400;
/// Bytes of each value; `SYNCLINE_CATCH_UP_VALUE_BYTES` changes it (at most ~60 KiB: a record
/// fits a 64 KiB segment).
const VALUE_BYTES: usize = 700;

/// A setting of the test: the environment variable `name`, else `default`.
fn knob<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
/// Keys of the table (each written many times while the follower is down).
const KEYS: u64 = 37;

fn broker_args() -> Vec<String> {
    [
        "--raft-snapshot-every",
        SNAPSHOT_EVERY,
        // Nothing kept below a snapshot: a follower that missed one is behind the Raft log.
        "--raft-snapshot-keep",
        "0",
        // Small segments: the snapshot ships several files (`SYNCLINE_CATCH_UP_SEGMENT_BYTES`
        // changes it for a measurement).
        "--segment-bytes",
        &knob("SYNCLINE_CATCH_UP_SEGMENT_BYTES", "64KiB".to_string()),
        // No compaction during the test: a node compacts only what it leads, so leader and
        // followers would hold different (equally valid) files.
        "--cleaner-interval-ms",
        "3600000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Partition 0 of `topic` as node `id` describes it.
fn placement<'a>(
    description: &'a ClusterDescription,
    topic: &str,
) -> Option<&'a syncline_client::PartitionPlacement> {
    description
        .partitions
        .iter()
        .find(|p| p.topic == topic && p.partition == 0)
}

/// True when partition 0 of every topic in `topics` is led by `leader` (any, if None) with
/// exactly `caught_up` caught up.
fn settled(
    description: &ClusterDescription,
    topics: &[&str],
    leader: Option<u64>,
    caught_up: &[u64],
) -> bool {
    topics.iter().all(|topic| {
        placement(description, topic).is_some_and(|p| {
            let mut have = p.caught_up.clone();
            have.sort_unstable();
            p.leader.is_some() && leader.is_none_or(|l| p.leader == Some(l)) && have == caught_up
        })
    })
}

/// Writes one record per produce (one Raft entry each), acknowledged DURABLE (committed),
/// to the partition's leader as last found; finds it again (and retries) when a call fails.
#[derive(Default)]
struct Writer {
    leaders: BTreeMap<String, u64>,
}

impl Writer {
    /// The leader of partition 0 of `topic` as some answering node says.
    async fn find_leader(cluster: &Cluster, topic: &str) -> Option<u64> {
        for id in 1..=cluster.len() {
            let answer = tokio::time::timeout(Duration::from_secs(3), cluster.describe(id)).await;
            if let Ok(Ok(description)) = answer {
                if let Some(leader) = placement(&description, topic).and_then(|p| p.leader) {
                    return Some(leader);
                }
            }
        }
        None
    }

    /// Writes `key` = `value` to `topic`; returns its offset.
    async fn put(&mut self, cluster: &Cluster, topic: &str, key: &str, value: &str) -> u64 {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let leader = match self.leaders.get(topic) {
                Some(leader) => Some(*leader),
                None => Self::find_leader(cluster, topic).await,
            };
            if let Some(leader) = leader {
                let request = v1::ProduceRequest {
                    topic: topic.into(),
                    partition: 0,
                    records: vec![v1::Record {
                        key: Some(Bytes::copy_from_slice(key.as_bytes())),
                        value: Some(Bytes::copy_from_slice(value.as_bytes())),
                        ..Default::default()
                    }],
                    ..Default::default()
                };
                let call = async {
                    let mut grpc = cluster.grpc(leader).await;
                    grpc.produce(request).await
                };
                match tokio::time::timeout(Duration::from_secs(10), call).await {
                    Ok(Ok(response)) => {
                        self.leaders.insert(topic.to_string(), leader);
                        return response.into_inner().base_offset;
                    }
                    Ok(Err(status)) => eprintln!("(retrying) produce to node {leader}: {status}"),
                    Err(_) => eprintln!("(retrying) produce to node {leader} timed out"),
                }
                self.leaders.remove(topic);
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no write to {topic} acknowledged within {TIMEOUT:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Writes `count` records to each of `topics`, keys `k<i % KEYS>`; notes the table's latest
    /// value per key in `latest`.
    async fn write(
        &mut self,
        cluster: &Cluster,
        topics: &[&str],
        from: u64,
        count: u64,
        latest: &mut BTreeMap<String, String>,
    ) {
        for i in from..from + count {
            let key = format!("k{}", i % KEYS);
            let value = format!(
                "v{i}-{}",
                "x".repeat(knob("SYNCLINE_CATCH_UP_VALUE_BYTES", VALUE_BYTES))
            );
            for topic in topics {
                self.put(cluster, topic, &key, &value).await;
                if *topic == TABLE {
                    latest.insert(key.clone(), value.clone());
                }
            }
        }
    }
}

/// Every batch of partition 0 of `topic` as node `id` serves it (it must lead): the batches'
/// bytes as stored, and the end offset.
async fn fetch_all(cluster: &Cluster, id: u64, topic: &str) -> (Vec<u8>, u64) {
    let mut grpc = cluster.grpc(id).await;
    let mut offset = 0;
    let mut out = Vec::new();
    loop {
        let response = grpc
            .fetch(v1::FetchRequest {
                topic: topic.into(),
                partition: 0,
                offset,
                max_bytes: Some(4 << 20),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("fetch {topic} from node {id} at {offset}: {e}"))
            .into_inner();
        out.extend_from_slice(&response.batches);
        if response.next_offset >= response.high_watermark || response.batches.is_empty() {
            return (out, response.next_offset);
        }
        offset = response.next_offset;
    }
}

/// The partition log of partition 0 of `topic` on node `id`'s disk: its segment files'
/// bytes, concatenated in offset order.
fn on_disk(data_dir: &Path, topic: &str) -> Vec<u8> {
    let dir: PathBuf = data_dir.join(topic).join("0");
    let mut segments: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    segments.sort();
    segments
        .iter()
        .flat_map(|p| std::fs::read(p).unwrap())
        .collect()
}

/// Lines of node `id`'s log that say a snapshot was installed.
fn installs(cluster: &Cluster, id: u64) -> usize {
    cluster
        .logs(id)
        .lines()
        .filter(|l| l.contains("installed a snapshot"))
        .count()
}

/// Makes `target` the leader of partition 0 of `topic` (all three nodes running), the Raft
/// way: the third node is paused while a few writes commit on the leader and `target`, so its
/// log is the shorter one; then the leader is killed and the third node resumed: only `target`
/// can win the election. Returns what the old leader served just before it died (every batch,
/// and the end offset), or None when `target` already led; the old leader is restarted.
async fn lead_by(
    cluster: &mut Cluster,
    writer: &mut Writer,
    topic: &str,
    target: u64,
    next: &mut u64,
    latest: &mut BTreeMap<String, String>,
) -> Option<(Vec<u8>, u64)> {
    let description = cluster.describe(target).await.unwrap();
    let leader = placement(&description, topic)
        .and_then(|p| p.leader)
        .unwrap();
    if leader == target {
        return None;
    }
    let third = (1..=3).find(|n| *n != leader && *n != target).unwrap();
    cluster.pause(third);
    writer.write(cluster, &[topic], *next, 10, latest).await;
    *next += 10;
    let before = fetch_all(cluster, leader, topic).await;
    cluster.kill(leader);
    cluster.resume(third);
    writer.leaders.clear();
    cluster
        .wait_for_description(target, TIMEOUT, |d| {
            placement(d, topic).is_some_and(|p| p.leader == Some(target))
        })
        .await;
    cluster.restart(leader);
    cluster
        .wait_for_description(target, TIMEOUT, |d| {
            settled(d, &[topic], Some(target), &[1, 2, 3])
        })
        .await;
    Some(before)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_behind_the_leaders_purged_raft_log_should_catch_up_by_snapshot_and_then_lead() {
    let args = broker_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut cluster = Cluster::start_with_args(3, &args);
    let client = cluster.client(1).await;
    for (topic, cleanup) in [
        (EVENTS, syncline_client::CleanupPolicy::Delete),
        (TABLE, syncline_client::CleanupPolicy::Compact),
    ] {
        client
            .create_topic(
                topic,
                TopicConfig {
                    partitions: Some(1),
                    replication_factor: Some(3),
                    cleanup_policy: cleanup,
                    ..TopicConfig::default()
                },
            )
            .await
            .unwrap();
    }
    let all = [1, 2, 3];
    let both = [EVENTS, TABLE];
    let mut writer = Writer::default();
    let mut latest = BTreeMap::new();
    writer.write(&cluster, &both, 0, 20, &mut latest).await;
    let description = cluster
        .wait_for_description(1, TIMEOUT, |d| settled(d, &both, None, &all))
        .await;

    // A follower of both partitions goes down (kill -9) and misses several snapshots: the
    // leaders' Raft logs no longer hold what it lacks.
    let leaders: Vec<u64> = both
        .iter()
        .filter_map(|t| placement(&description, t).and_then(|p| p.leader))
        .collect();
    let victim = *all
        .iter()
        .find(|n| !leaders.contains(n))
        .unwrap_or_else(|| panic!("every node leads one of the two partitions: {leaders:?}"));
    cluster.kill(victim);
    let while_down = knob("SYNCLINE_CATCH_UP_WRITES", WHILE_DOWN);
    let written = std::time::Instant::now();
    writer
        .write(&cluster, &both, 20, while_down, &mut latest)
        .await;
    let mut next = 20 + while_down;
    let others: Vec<u64> = all.iter().copied().filter(|n| *n != victim).collect();
    assert_eq!(installs(&cluster, victim), 0);

    // Back: it catches up, by a snapshot of each partition, and shows as caught up.
    eprintln!(
        "wrote {while_down} records to each partition in {:?} while node {victim} was down",
        written.elapsed()
    );
    let restarted = std::time::Instant::now();
    cluster.restart(victim);
    let description = cluster
        .wait_for_description(others[0], TIMEOUT, |d| settled(d, &both, None, &all))
        .await;
    eprintln!(
        "node {victim} restarted and caught up in {:?}",
        restarted.elapsed()
    );
    assert!(
        installs(&cluster, victim) >= 2,
        "node {victim} caught up without installing a snapshot of each partition:\n{}",
        cluster.log_tail(victim, 60)
    );
    let scraped = common::scrape(cluster.node(victim).metrics_address().unwrap());
    let installed = scraped
        .lines()
        .find_map(|l| l.strip_prefix("syncline_replication_snapshots_installed_total "))
        .and_then(|v| v.trim().parse::<f64>().ok());
    assert!(installed >= Some(2.0), "installed: {installed:?}");
    for line in cluster.logs(victim).lines().filter(|l| {
        l.contains("installed a snapshot") || l.contains("received and verified a snapshot")
    }) {
        eprintln!("node {victim}: {line}");
    }
    // Byte for byte its leader's partition log, on disk.
    for topic in both {
        let leader = placement(&description, topic).unwrap().leader.unwrap();
        let expected = on_disk(&cluster.node(leader).data_dir(), topic);
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let copy = on_disk(&cluster.node(victim).data_dir(), topic);
            if copy == expected {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{topic}: node {victim} holds {} bytes of log, its leader {leader} {}",
                copy.len(),
                expected.len()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    // It takes part in commits and wins elections: it becomes the leader of both partitions
    // (each leader in turn killed while the caught-up node holds a longer log than the third).
    // Making it lead the second partition pauses and kills nodes, which may cost it the
    // first (an election while it had no quorum): go round until it leads both.
    let mut before = BTreeMap::new();
    for round in 0.. {
        assert!(
            round < 4,
            "node {victim} does not keep the leadership of both partitions"
        );
        for topic in both {
            if let Some(served) = lead_by(
                &mut cluster,
                &mut writer,
                topic,
                victim,
                &mut next,
                &mut latest,
            )
            .await
            {
                before.insert(topic, served);
            }
        }
        let description = cluster.describe(victim).await.unwrap();
        if both
            .iter()
            .all(|topic| placement(&description, topic).and_then(|p| p.leader) == Some(victim))
        {
            break;
        }
    }
    for topic in both {
        before
            .entry(topic)
            .or_insert(fetch_all(&cluster, victim, topic).await);
    }

    // As leader it serves the same batches at the same offsets as the old leader, byte for
    // byte...
    for (topic, (bytes, end)) in &before {
        let (served, served_end) = fetch_all(&cluster, victim, topic).await;
        assert_eq!(served_end, *end, "{topic}");
        assert!(
            served == *bytes,
            "{topic}: node {victim} serves other bytes"
        );
    }
    // ... `Get` of every key (most written while it was down) answers its latest value ...
    let mut grpc = cluster.grpc(victim).await;
    for (key, value) in &latest {
        let answer = grpc
            .get(v1::GetRequest {
                topic: TABLE.into(),
                key: Bytes::copy_from_slice(key.as_bytes()),
            })
            .await
            .unwrap_or_else(|e| panic!("Get {key} from node {victim}: {e}"))
            .into_inner();
        assert_eq!(answer.value, value.as_bytes(), "{key}");
    }
    // ... and it takes writes at the next offsets.
    let events_end = before[EVENTS].1;
    let offset = writer.put(&cluster, EVENTS, "after", "failover").await;
    assert_eq!(
        offset, events_end,
        "the next offset after the old leader's end"
    );
    let (_, end) = fetch_all(&cluster, victim, EVENTS).await;
    assert_eq!(end, events_end + 1);
    assert_eq!(
        Writer::find_leader(&cluster, EVENTS).await,
        Some(victim),
        "written through the caught-up node"
    );
}
