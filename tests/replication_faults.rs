//! Fault tests of replicated partitions (issue 15), in the manner of Jepsen: a real 3-node
//! cluster (every node in its own network namespace when the test runs as root, so that a node
//! can be cut off; on loopback otherwise, without that fault), every topic at replication
//! factor 3, workloads recording histories while a seeded nemesis injects faults, then every
//! history checked.
//!
//! Workloads (tests/common/workload.rs): keyed produce with 3 idempotent producers; a CAS
//! register workload on a table (Get and compare-and-set); a consumer group of 3 members and a
//! plain consumer reading the keyed topic. Faults (tests/common/faults.rs): kill -9 of a
//! partition leader, of a follower, of the controller leader; SIGSTOP/SIGCONT of a leader for
//! 2.5-3.5 s; a leader isolated from both other nodes (the minority), then healed; kill -9 of
//! every node and a full restart. After each fault the test waits (bounded) until every
//! partition has a running leader again and the producers have been acknowledged on every
//! partition (the cluster takes writes again).
//!
//! Then, everything healed and every node up, the workloads stop, the consumers catch up, the
//! keyed topic and the table are read back through the leaders, every node is stopped and each
//! replica's partition logs are read from its data directory, and the checkers run:
//! - every acknowledged record is present at its offset, byte for byte; no value twice; each
//!   key's records in send order (`check_acknowledged`);
//! - the plain consumer never went backwards nor skipped an offset that the final log holds
//!   (`check_deliveries`), and was handed exactly what the log holds (`check_delivered_values`);
//! - the consumer group was handed every acknowledged record (at least once), each member read
//!   each partition in log order without gaps except where a new assignment let it restart
//!   (`check_group`), and only what the log holds;
//! - every CAS key's history is linearizable (`linearizable.rs`; an operation whose outcome is
//!   unknown may have taken effect or not);
//! - every replica holds exactly the records the leaders served, at the same offsets
//!   (`check_replicas`).
//!
//! # Running
//! - CI: `cargo test --test replication_faults` runs the short version
//!   ([`every_fault_kind_once_should_lose_no_acknowledged_write`]: each fault kind once, in an
//!   order the seed picks; 35-45 s on 2 cores) and the checkers' own tests. The seed
//!   is [`DEFAULT_SEED`] unless `SYNCLINE_FAULT_SEED` is set (decimal or `0x` hex).
//! - By hand, longer: random faults for `SYNCLINE_FAULT_MINUTES` minutes (default 10):
//!   `SYNCLINE_FAULT_MINUTES=10 SYNCLINE_FAULT_SEED=42 cargo test --test replication_faults long -- --ignored --nocapture`
//!   (build the binaries first: `cargo build --workspace --bins`; run as root for the network
//!   faults).
//!
//! Every run prints its seed first; a failure prints it again with the nemesis's journal (what
//! was done to which node, when) and replays with `SYNCLINE_FAULT_SEED=<seed>`. The schedule
//! replays exactly; the cluster's timing does not, so a replay is likely, not certain, to fail
//! the same way. With `SYNCLINE_KEEP_CLUSTER=1` a failing run keeps every node's whole log and
//! data directory and prints where. A failure found here becomes a regression test in this file.
//!
//! # Bugs found here
//! Each has its regression test below: [`killed_leaders_should_not_reorder_a_producers_keys`]
//! (the idempotent producer reordered a key's records across a leader change) and
//! [`a_restarted_replica_should_never_answer_get_with_a_stale_value`] (a restarted leader
//! restored its leadership without an election and answered `Get` from a state machine not
//! yet caught up). The short version passed on seeds 1, 2, 3, 7 and 15 after both fixes.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::cluster::Cluster;
use common::faults::{every_fault_once, seed_from_env, Fault, Nemesis, Rng, SeedGuard};
use common::history::{
    check_acknowledged, check_delivered_values, check_deliveries, check_group, check_replicas,
    Seen, Violation,
};
use common::netns::Net;
use common::workload::{
    read_replica, read_topic, CasConfig, CasWorkload, GroupConfig, GroupWorkload, KeyedProduce,
    ProduceConfig, Tail,
};
use syncline_client::{CleanupPolicy, TopicConfig};
use tokio::time::Instant;

/// The short version's seed unless `SYNCLINE_FAULT_SEED` overrides it.
pub const DEFAULT_SEED: u64 = 15;

/// The keyed topic the producers write and the consumers read.
const KEYED: &str = "keyed";
const KEYED_PARTITIONS: u32 = 3;
/// The table of the CAS register workload.
const REGISTERS: &str = "registers";
const REGISTERS_PARTITIONS: u32 = 2;
/// The consumer group.
const GROUP: &str = "fault-readers";
const REPLICATION_FACTOR: u32 = 3;

/// Every node's flags: `__offsets` (the group coordinator's topic) replicated too.
const NODE_ARGS: &[&str] = &["--default-replication-factor", "3"];

/// How long the producers may take to be acknowledged on every partition once the cluster has
/// recovered from a fault: a leader change and the client's retry backoff (at most 1 s).
const PROGRESS_BOUND: Duration = Duration::from_secs(30);
/// How long the consumers may take to catch up at the end.
const CATCH_UP_BOUND: Duration = Duration::from_secs(60);
/// How long reading a topic back may take.
const READ_BOUND: Duration = Duration::from_secs(60);
/// The quiet time between two faults: a random time in these bounds.
const CALM: (Duration, Duration) = (Duration::from_millis(500), Duration::from_millis(1500));

/// What the nemesis does.
enum Plan {
    /// Every fault kind once.
    EveryFaultOnce,
    /// Faults picked at random until this much time has passed.
    For(Duration),
}

/// The short version: each fault kind once under every workload, then every check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fault_kind_once_should_lose_no_acknowledged_write() {
    run(Plan::EveryFaultOnce, seed_from_env(DEFAULT_SEED)).await;
}

/// The long version, by hand: random faults for `SYNCLINE_FAULT_MINUTES` minutes (default 10).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: run by hand (see the module doc)"]
async fn long() {
    let minutes: f64 = match std::env::var("SYNCLINE_FAULT_MINUTES") {
        Ok(text) => text
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("SYNCLINE_FAULT_MINUTES={text:?} is not a number")),
        Err(_) => 10.0,
    };
    let seed = seed_from_env(DEFAULT_SEED);
    run(Plan::For(Duration::from_secs_f64(minutes * 60.0)), seed).await;
}

/// Regression (found by seed 15 of the short version, and by seeds 1-3): keyed produce alone
/// through kills of partition leaders must keep each key's acknowledged records in send order.
///
/// What the histories showed (e.g. seed 15: key `p1-k5`: value `-253` acknowledged at 2@401,
/// the earlier-sent `-245` at 2@558): after a leader change, retries of a producer's batches
/// reach the new leader out of order; a batch refused as a sequence gap is retried only if an
/// earlier batch is still unresolved *when the refusal is handled* (`overtook_earlier_batch`),
/// and the earlier batch's acknowledgement, answered right after, is often handled first, so
/// the later batch fails for good (`sequence S out of order: expected S-1`, well inside the
/// delivery timeout). The producer then takes a new producer id and stamps the partition's
/// next batches with it at once (`Sequences::next` counts only the current generation's
/// unresolved batches), while batches of the old id of that partition are still being retried;
/// those are stored after the new id's batches, each acknowledged: a key's records out of
/// order. In the stored batches: new id at seq 0 at 2@401, old id's seq 122-125 (sent earlier,
/// by their timestamps) at 2@558-587. Fails in most runs, not all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_leaders_should_not_reorder_a_producers_keys() {
    produce_through(
        &[Fault::KillLeader, Fault::KillLeader, Fault::KillLeader],
        15,
    )
    .await;
}

/// Regression (found by the long version, seed 42: keys `cas-28` and `cas-98`): `Get` is
/// linearizable, so a key written (acknowledged) before a node restarts must never be answered
/// as absent or older, by any node, while that node comes back. The long run's histories showed
/// `Get` answering "absent" right after a node restart: `cas-28` written at version 206
/// (acknowledged at 62.97 s), then a `Get` invoked at 64.00 s (node 3, a replica of the
/// table's partition, restarted at 63.74 s) answered absent; `cas-98` read at version 666 at
/// 194.14 s, then a `Get` returning at 196.16 s answered absent (node 3, a leader, restarted
/// at about 194.5 s). A restarted node cuts its partition log back to its last snapshot and
/// re-applies its Raft log: a `Get` answered from the partition's key index before the
/// re-apply got there would see the key absent.
///
/// Here: 100 keys written; then, four times: every node killed and restarted, 100 more keys
/// written, and the table partition's leader killed for 1.2 s and restarted, while `Get`s of
/// every key go to every node directly (raw gRPC, so the restarted node is asked as soon as
/// it listens). An error or a
/// not-leader answer is fine; an answer must hold the acknowledged write, and every node must
/// answer within [`GET_BOUND`]. It failed so: "node 3: k102 (written at 102) answered absent:
/// key `k102` not found in table `registers`" (node 3 the restarted leader; the other nodes
/// answered not-leader naming it). The long run's probe showed the same: right after node 3
/// was killed (as leader of registers/1) and restarted, nodes 1 and 2 said node 3 leads, and
/// node 3 answered NOT_FOUND "key `cas-61` not found" for a key acknowledged at version 429 a
/// few seconds before. An earlier version of this test (no per-call bound) also hung: a raw
/// `Get` to node 1, a follower, after four full restarts, got no answer for 12 minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_replica_should_never_answer_get_with_a_stale_value() {
    use syncline_proto::v1;

    let seed = 42;
    let (mut cluster, mut nemesis, _guard) = start(None, seed).await;
    create(&cluster, REGISTERS, 1, true, seed).await;
    nemesis.recover(&mut cluster).await;
    let client = cluster.cluster_client().await;
    let table = client
        .table(REGISTERS)
        .await
        .unwrap_or_else(|e| panic!("{}", context(&nemesis, e)));
    // Key -> its acknowledged version; keys are added while a node is down.
    let written: std::sync::Arc<std::sync::Mutex<BTreeMap<String, u64>>> = Default::default();
    let write_keys = |range: std::ops::Range<u32>| {
        let (table, written) = (table.clone(), written.clone());
        async move {
            for i in range {
                let key = format!("k{i}");
                let version = table.put(&key, format!("{key}-value")).await?.version;
                written
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(key, version);
            }
            Ok::<(), syncline_client::Error>(())
        }
    };
    write_keys(0..100)
        .await
        .unwrap_or_else(|e| panic!("{}", context(&nemesis, format!("put: {e}"))));
    let addresses: Vec<String> = (1..=3).map(|id| cluster.node(id).url()).collect();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    // One reader per node, asking that node only, over and over.
    let readers: Vec<_> = addresses
        .into_iter()
        .enumerate()
        .map(|(i, url)| {
            let (written, stopped) = (written.clone(), stopped.clone());
            tokio::spawn(async move {
                let mut stale = Vec::new();
                let mut answers = BTreeMap::<String, usize>::new();
                while !*stopped.borrow() {
                    let Ok(channel) = tonic::transport::Endpoint::from_shared(url.clone())
                        .expect("url")
                        .connect()
                        .await
                    else {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    };
                    let mut grpc = v1::broker_client::BrokerClient::new(channel);
                    let snapshot = written.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    for (key, &version) in &snapshot {
                        let get = grpc.get(v1::GetRequest {
                            topic: REGISTERS.into(),
                            key: key.clone().into_bytes().into(),
                        });
                        // A healthy cluster answers a Get (if only "not the leader") at once.
                        let Ok(answer) = tokio::time::timeout(GET_BOUND, get).await else {
                            stale.push(format!(
                                "node {}: Get {key} not answered within {GET_BOUND:?}",
                                i + 1
                            ));
                            *answers.entry("no answer".into()).or_default() += 1;
                            break;
                        };
                        let kind = match &answer {
                            Ok(response) if response.get_ref().version == version => {
                                "ok".to_string()
                            }
                            Ok(response) => {
                                stale.push(format!(
                                    "node {}: {key} at {} instead of {}",
                                    i + 1,
                                    response.get_ref().version,
                                    version
                                ));
                                "stale".to_string()
                            }
                            // The topic exists throughout: NOT_FOUND can only say the key
                            // is absent (and the client library reads it so).
                            Err(status) if status.code() == tonic::Code::NotFound => {
                                stale.push(format!(
                                    "node {}: {key} (written at {}) answered absent: {}",
                                    i + 1,
                                    version,
                                    status.message()
                                ));
                                "absent".to_string()
                            }
                            Err(status) => format!(
                                "{:?}: {}",
                                status.code(),
                                status.message().chars().take(60).collect::<String>()
                            ),
                        };
                        *answers.entry(kind).or_default() += 1;
                        if answer.is_err() && *stopped.borrow() {
                            break;
                        }
                    }
                }
                (stale, answers)
            })
        })
        .collect();
    for round in 0..4u32 {
        // As in the long run: a full restart, keys written after it, then the table's leader
        // killed for a little over a second (the others may not even elect) and restarted.
        nemesis.note(format!("round {round}: kill -9 every node, then start all"));
        tokio::task::block_in_place(|| {
            cluster.kill_all();
            cluster.restart_all();
        });
        nemesis.recover(&mut cluster).await;
        let first = 100 * (round + 1);
        write_keys(first..first + 100)
            .await
            .unwrap_or_else(|e| panic!("{}", context(&nemesis, format!("put: {e}"))));
        let controller = cluster.wait_for_controller(RECOVERY).await;
        let description = cluster
            .describe(controller)
            .await
            .unwrap_or_else(|e| panic!("{}", context(&nemesis, e)));
        let leader = description
            .partitions
            .iter()
            .find(|p| p.topic == REGISTERS)
            .and_then(|p| p.leader)
            .expect("the table's partition has a leader");
        nemesis.note(format!(
            "round {round}: kill -9 node {leader} (table leader) for 1.2 s"
        ));
        cluster.kill(leader);
        tokio::time::sleep(Duration::from_millis(1200)).await;
        tokio::task::block_in_place(|| cluster.restart(leader));
        tokio::time::sleep(Duration::from_secs(3)).await;
        nemesis.recover(&mut cluster).await;
    }
    let _ = stop.send(true);
    let mut stale = Vec::new();
    for reader in readers {
        let (found, answers) = reader.await.expect("a reader panicked");
        eprintln!("answers: {answers:?}");
        stale.extend(found);
    }
    assert!(
        stale.is_empty(),
        "{}",
        context(
            &nemesis,
            format!(
                "{} stale answers:\n{}",
                stale.len(),
                stale
                    .iter()
                    .take(50)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        )
    );
}

/// How long a node may take to answer a `Get`, if only with an error.
const GET_BOUND: Duration = Duration::from_secs(10);

/// How long a test waits for the controller.
const RECOVERY: Duration = Duration::from_secs(30);

/// Runs the keyed produce workload alone through `faults` (in this order), then checks what
/// was acknowledged against what the leaders serve.
async fn produce_through(faults: &[Fault], seed: u64) {
    eprintln!("seed {seed}; faults {faults:?}");
    let net = if faults.contains(&Fault::IsolateLeader) {
        match Net::new(3) {
            Ok(net) => Some(net),
            Err(why) => {
                eprintln!("SKIPPED: network namespaces unavailable: {why}");
                return;
            }
        }
    } else {
        None
    };
    let (mut cluster, mut nemesis, _guard) = start(net.as_ref(), seed).await;
    nemesis.recover(&mut cluster).await;
    let produce = KeyedProduce::start(&cluster.addresses(), KEYED, ProduceConfig::default());
    for &fault in faults {
        if let Err(stuck) = produce
            .wait_progress(KEYED_PARTITIONS, PROGRESS_BOUND)
            .await
        {
            panic!("{}", context(&nemesis, stuck));
        }
        nemesis.run(&mut cluster, fault).await;
    }
    if let Err(stuck) = produce
        .wait_progress(KEYED_PARTITIONS, PROGRESS_BOUND)
        .await
    {
        panic!("{}", context(&nemesis, stuck));
    }
    let produced = produce.stop().await;
    let client = cluster.cluster_client().await;
    let log = read_topic(&client, KEYED, KEYED_PARTITIONS, READ_BOUND)
        .await
        .unwrap_or_else(|e| panic!("{}", context(&nemesis, e)));
    summarize_errors("producer errors", &produced.error_texts());
    let violations = check_acknowledged(&produced.acknowledged, &log);
    assert!(
        violations.is_empty(),
        "{}",
        context(
            &nemesis,
            format!(
                "{} of {} acknowledged records violate: {violations:#?}",
                violations.len(),
                produced.acknowledged.len()
            )
        )
    );
}

/// The 3-node cluster (in `net` when given), its nemesis, a guard printing the seed on a
/// failure, and the keyed topic.
async fn start(net: Option<&Net>, seed: u64) -> (Cluster, Nemesis<'_>, SeedGuard) {
    let cluster = match net {
        Some(net) => Cluster::start_in(net, 3, NODE_ARGS),
        None => Cluster::start_with_args(3, NODE_ARGS),
    };
    let nemesis = Nemesis::new(seed, net);
    let guard = SeedGuard::new(seed, nemesis.journal_handle());
    create(&cluster, KEYED, KEYED_PARTITIONS, false, seed).await;
    (cluster, nemesis, guard)
}

/// Creates `topic` at replication factor 3 through the cluster (any node).
async fn create(cluster: &Cluster, topic: &str, partitions: u32, compact: bool, seed: u64) {
    let mut config = TopicConfig::with_partitions(partitions);
    config.replication_factor = Some(REPLICATION_FACTOR);
    if compact {
        config.cleanup_policy = CleanupPolicy::Compact;
    }
    cluster
        .cluster_client()
        .await
        .create_topic(topic, config)
        .await
        .unwrap_or_else(|e| panic!("seed {seed}: create {topic}: {e}"));
}

async fn run(plan: Plan, seed: u64) {
    let started = Instant::now();
    eprintln!(
        "replication faults: seed {seed} (replay with {}={seed})",
        common::faults::SEED_VAR
    );
    let net = match Net::new(3) {
        Ok(net) => Some(net),
        Err(why) => {
            eprintln!("SKIPPING the isolate-leader fault: network namespaces unavailable: {why}");
            None
        }
    };
    let (mut cluster, mut nemesis, _guard) = start(net.as_ref(), seed).await;
    create(&cluster, REGISTERS, REGISTERS_PARTITIONS, true, seed).await;
    nemesis.recover(&mut cluster).await;

    let addresses = cluster.addresses();
    let mut rng = Rng::new(seed);
    let produce = KeyedProduce::start(&addresses, KEYED, ProduceConfig::default());
    let cas_config = CasConfig {
        probe: (1..=3).map(|id| cluster.node(id).url()).collect(),
        ..CasConfig::default()
    };
    let cas = CasWorkload::start(&addresses, REGISTERS, cas_config, &mut rng);
    let group = GroupWorkload::start(&addresses, GROUP, KEYED, GroupConfig::default());
    let tail = Tail::start(&addresses, KEYED);
    if let Err(stuck) = produce
        .wait_progress(KEYED_PARTITIONS, PROGRESS_BOUND)
        .await
    {
        panic!(
            "{}",
            context(&nemesis, format!("before any fault: {stuck}"))
        );
    }

    let mut scheduled = match plan {
        Plan::EveryFaultOnce => every_fault_once(nemesis.rng()),
        Plan::For(_) => Vec::new(),
    };
    scheduled.reverse();
    let mut faults = 0;
    loop {
        let fault = match plan {
            Plan::EveryFaultOnce => match scheduled.pop() {
                Some(fault) => fault,
                None => break,
            },
            Plan::For(length) if started.elapsed() < length => nemesis.pick_fault(),
            Plan::For(_) => break,
        };
        nemesis.run(&mut cluster, fault).await;
        faults += 1;
        if let Err(stuck) = produce
            .wait_progress(KEYED_PARTITIONS, PROGRESS_BOUND)
            .await
        {
            panic!(
                "seed {seed}: after {fault:?} the cluster recovered but takes no writes: {stuck}\njournal:\n{}",
                nemesis.journal()
            );
        }
        let calm = nemesis.rng().between(CALM.0, CALM.1);
        tokio::time::sleep(calm).await;
    }
    nemesis.heal_all(&mut cluster).await;
    nemesis.note(format!("{faults} faults done; stopping the workloads"));

    let produced = produce.stop().await;
    let registers = cas.stop().await;
    let mut problems: Vec<String> = Vec::new();
    if let Err(missing) = group.wait_for(&produced.acknowledged, CATCH_UP_BOUND).await {
        problems.push(format!("the group did not catch up: {missing}"));
    }
    if let Err(missing) = tail.wait_for(&produced.acknowledged, CATCH_UP_BOUND).await {
        problems.push(format!("the plain consumer did not catch up: {missing}"));
    }
    let readers = group.stop().await;
    let tailed = tail.stop().await;
    nemesis.note("workloads stopped; reading back");

    let client = cluster.cluster_client().await;
    let log = read_topic(&client, KEYED, KEYED_PARTITIONS, READ_BOUND)
        .await
        .unwrap_or_else(|e| panic!("{}", context(&nemesis, e)));
    let table = read_topic(&client, REGISTERS, REGISTERS_PARTITIONS, READ_BOUND)
        .await
        .unwrap_or_else(|e| panic!("{}", context(&nemesis, e)));
    let controller = cluster.wait_for_controller(Duration::from_secs(30)).await;
    let description = cluster
        .describe(controller)
        .await
        .unwrap_or_else(|e| panic!("{}", context(&nemesis, format!("DescribeCluster: {e}"))));
    drop(client);
    let clean = tokio::task::block_in_place(|| cluster.stop_all());
    if !clean {
        problems.push("a node did not exit cleanly on SIGTERM".into());
    }

    let mut violations: Vec<Violation> = Vec::new();
    violations.extend(check_acknowledged(&produced.acknowledged, &log));
    violations.extend(check_deliveries(&tailed.handed, &log));
    violations.extend(check_delivered_values(&tailed.records, &log));
    violations.extend(check_group(&readers.members, &produced.acknowledged, &log));
    violations.extend(registers.violations());
    // Every acknowledged CAS write is in the table at its version (a `Misdelivered` here is an
    // acknowledged write that is not there as written).
    violations.extend(check_delivered_values(
        &registers.acknowledged_writes(REGISTERS_PARTITIONS),
        &table,
    ));
    // Each replica's partition log against what the leaders served.
    for (topic, served) in [(KEYED, &log), (REGISTERS, &table)] {
        for placement in description.partitions.iter().filter(|p| p.topic == topic) {
            let partition = placement.partition;
            let mut copies: Vec<Vec<Seen>> = vec![served
                .iter()
                .filter(|r| r.partition == partition)
                .cloned()
                .collect()];
            for &node in &placement.replicas {
                match read_replica(&cluster.node(node).data_dir(), topic, partition) {
                    Ok(records) => copies.push(records),
                    Err(error) => problems.push(format!(
                        "{topic}/{partition} on node {node} cannot be read: {error}"
                    )),
                }
            }
            for violation in check_replicas(&copies) {
                problems.push(format!(
                    "{topic}/{partition}: replicas {:?} (0: as served, then nodes {:?}): {violation:?}",
                    match &violation {
                        Violation::Diverged { replicas, .. } => *replicas,
                        _ => (0, 0),
                    },
                    placement.replicas
                ));
            }
        }
    }

    eprintln!(
        "replication faults, seed {seed}: {faults} faults in {:.1}s\n\
         produce: {} sent, {} acknowledged, {} failed\n\
         CAS: {}\n\
         group: {} member incarnations, {} records handed, {} errors\n\
         plain consumer: {} records handed, {} errors\n\
         log: {} records in {KEYED}, {} in {REGISTERS}\n\
         journal:\n{}",
        started.elapsed().as_secs_f64(),
        produced.sent,
        produced.acknowledged.len(),
        produced.errors.len(),
        registers.summary(),
        readers.members.len(),
        readers
            .members
            .iter()
            .map(|m| m.delivered.len())
            .sum::<usize>(),
        readers.errors.len(),
        tailed.handed.len(),
        tailed.errors.len(),
        log.len(),
        table.len(),
        nemesis.journal()
    );
    for anomaly in &registers.anomalies {
        eprintln!("CAS anomaly: {anomaly}");
    }
    summarize_errors("producer errors", &produced.error_texts());
    summarize_errors("group errors", &readers.errors);
    summarize_errors("plain consumer errors", &tailed.errors);
    assert!(
        !produced.acknowledged.is_empty() && registers.keys.values().flatten().count() > 0,
        "seed {seed}: the workloads did nothing"
    );
    assert!(
        violations.is_empty() && problems.is_empty(),
        "seed {seed}: {} violations, {} problems:\n{violations:#?}\n{}\njournal:\n{}",
        violations.len(),
        problems.len(),
        problems.join("\n"),
        nemesis.journal()
    );
}

/// A failure message: the seed, what failed, the journal.
fn context(nemesis: &Nemesis, what: impl std::fmt::Display) -> String {
    format!(
        "seed {}: {what}\njournal:\n{}",
        nemesis.seed(),
        nemesis.journal()
    )
}

/// Prints how many errors of each kind (their text up to the first digit-free summary).
fn summarize_errors(what: &str, errors: &[String]) {
    if errors.is_empty() {
        return;
    }
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for error in errors {
        // "VALUE (partition P): ERROR" -> "partition P: ERROR"
        let kind: String = error
            .split_once(" (")
            .map_or(error.as_str(), |(_, rest)| rest)
            .replacen("):", ":", 1)
            .chars()
            .take(120)
            .collect();
        *kinds.entry(kind).or_default() += 1;
    }
    eprintln!("{what} ({}):", errors.len());
    for (kind, count) in kinds {
        eprintln!("  {count} x {kind}");
    }
}

/// The checkers and the nemesis's random source, on histories made to hold exactly one kind of
/// violation each (tests/history_checker.rs covers `check_acknowledged`, `check_deliveries`,
/// `check_replicas` and the CAS register checker on their own; these cover what this file
/// adds: the consumer group, the values handed, the CAS workload's verdict, replicas read from
/// disk).
mod checkers {
    use std::collections::BTreeMap;

    use super::common::faults::{every_fault_once, Fault, Rng};
    use super::common::history::{
        check_delivered_values, check_group, check_replicas, MemberDeliveries, Seen, Violation,
    };
    use super::common::linearizable::{Event, Op, Outcome};
    use super::common::workload::{read_replica, CasHistory};

    /// Partition 0: a0 b1 a2 b3 a4; partition 1: c0 c1.
    fn log() -> Vec<Seen> {
        vec![
            Seen::keyed(0, 0, "a", "a-0"),
            Seen::keyed(0, 1, "b", "b-1"),
            Seen::keyed(0, 2, "a", "a-2"),
            Seen::keyed(0, 3, "b", "b-3"),
            Seen::keyed(0, 4, "a", "a-4"),
            Seen::keyed(1, 0, "c", "c-0"),
            Seen::keyed(1, 1, "c", "c-1"),
        ]
    }

    fn member(delivered: &[(u32, u64)], assignments: &[(u32, usize)]) -> MemberDeliveries {
        let log = log();
        MemberDeliveries {
            delivered: delivered
                .iter()
                .map(|&(p, o)| {
                    log.iter()
                        .find(|r| r.partition == p && r.offset == o)
                        .cloned()
                        .expect("in the log")
                })
                .collect(),
            assignments: assignments.iter().copied().collect::<BTreeMap<_, _>>(),
        }
    }

    #[test]
    fn given_a_group_that_read_everything_in_order_should_find_nothing() {
        let log = log();
        // Partition 1 moved from the first member to the second, which started again at the
        // commit (offset 0): a repeat, explained by its assignment.
        let first = member(
            &[(0, 0), (1, 0), (0, 1), (0, 2), (1, 1), (0, 3), (0, 4)],
            &[(0, 1), (1, 1)],
        );
        let second = member(&[(1, 0), (1, 1)], &[(1, 1)]);
        assert_eq!(check_group(&[first, second], &log, &log), vec![]);
        // A member that lost partition 0 and got it back after another member read on: one
        // jump forward per assignment after the first is allowed.
        let back_again = member(&[(0, 0), (0, 1), (0, 4)], &[(0, 2)]);
        let other = member(&[(0, 2), (0, 3)], &[(0, 1)]);
        assert_eq!(check_group(&[back_again, other], &log[..5], &log), vec![]);
    }

    #[test]
    fn given_an_acknowledged_record_no_member_was_handed_should_report_it_not_delivered() {
        let log = log();
        let reader = member(
            &[(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (1, 0)],
            &[(0, 1), (1, 1)],
        );
        assert_eq!(
            check_group(&[reader], &log, &log),
            vec![Violation::NotDelivered(Seen::keyed(1, 1, "c", "c-1"))]
        );
    }

    #[test]
    fn given_a_member_that_went_back_or_skipped_within_one_assignment_should_report_it() {
        let log = log();
        // Reordered: 2 before 1, within one assignment (per-key order of key a and b broken).
        let reordered = member(&[(0, 0), (0, 2), (0, 1), (0, 3), (0, 4)], &[(0, 1)]);
        let violations = check_group(&[reordered], &log[..5], &log);
        assert!(
            matches!(violations.as_slice(), [Violation::Discontinuous { member: 0, partition: 0, assignments: 1, breaks }] if breaks.len() == 3),
            "{violations:#?}"
        );
        // Skipped offset 2 (a gap the log holds) without a new assignment, though another
        // member read it: at least once holds, the order within the member does not.
        let skipping = member(&[(0, 0), (0, 1), (0, 3), (0, 4)], &[(0, 1)]);
        let other = member(&[(0, 2)], &[(0, 1)]);
        let violations = check_group(&[skipping, other], &log[..5], &log);
        assert_eq!(
            violations,
            vec![Violation::Discontinuous {
                member: 0,
                partition: 0,
                assignments: 1,
                breaks: vec![(1, 3)],
            }]
        );
    }

    #[test]
    fn given_a_record_handed_that_the_log_does_not_hold_should_report_it_misdelivered() {
        let log = log();
        let wrong = vec![
            Seen::keyed(0, 0, "a", "a-0"),
            Seen::keyed(0, 1, "b", "b-9"),
            Seen::keyed(1, 7, "c", "c-7"),
        ];
        assert_eq!(
            check_delivered_values(&wrong, &log),
            vec![
                Violation::Misdelivered {
                    delivered: Seen::keyed(0, 1, "b", "b-9"),
                    found: Some(Seen::keyed(0, 1, "b", "b-1")),
                },
                Violation::Misdelivered {
                    delivered: Seen::keyed(1, 7, "c", "c-7"),
                    found: None,
                },
            ]
        );
        // The group checker checks what each member was handed the same way.
        let mut liar = member(&[(0, 0)], &[(0, 1)]);
        liar.delivered[0].value = b"a-x".to_vec();
        assert!(matches!(
            check_group(&[liar], &[], &log).as_slice(),
            [Violation::Misdelivered { .. }]
        ));
    }

    #[test]
    fn given_cas_histories_should_flag_only_the_key_without_a_linearization() {
        let put_if = |expected: u64, value: &str| Op::PutIf {
            expected,
            value: value.as_bytes().to_vec(),
        };
        let read =
            |version: u64, value: &str| Outcome::Read(Some((version, value.as_bytes().to_vec())));
        let mut history = CasHistory::default();
        // Fine: a compare-and-set whose answer was lost (unknown) was applied, as a later read
        // shows.
        history.keys.insert(
            "fine".into(),
            vec![
                Event::new(0, 1, Op::Put(b"x".to_vec()), Outcome::Written(3)),
                Event::new(2, 9, put_if(3, "y"), Outcome::Unknown),
                Event::new(10, 11, Op::Get, read(4, "y")),
            ],
        );
        // A lost write: acknowledged at version 3, then a read of the key as absent.
        history.keys.insert(
            "lost".into(),
            vec![
                Event::new(0, 1, Op::Put(b"x".to_vec()), Outcome::Written(3)),
                Event::new(5, 6, Op::Get, Outcome::Read(None)),
            ],
        );
        // Two compare-and-sets from the same version, both acknowledged.
        history.keys.insert(
            "both-won".into(),
            vec![
                Event::new(0, 1, Op::Put(b"x".to_vec()), Outcome::Written(3)),
                Event::new(2, 5, put_if(3, "y"), Outcome::Written(4)),
                Event::new(6, 8, put_if(3, "z"), Outcome::Written(5)),
            ],
        );
        let flagged: Vec<String> = history
            .violations()
            .into_iter()
            .map(|v| match v {
                Violation::NotLinearizable { key, .. } => key,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(flagged, vec!["both-won".to_string(), "lost".to_string()]);
        assert!(
            history.summary().contains("8 operations on 3 keys"),
            "{}",
            history.summary()
        );
    }

    /// A replica written with the log API under `DATA/TOPIC/PARTITION` reads back record for
    /// record; another with one value changed is caught as diverged at that offset.
    #[test]
    fn given_replicas_on_disk_should_read_them_and_catch_a_divergence() {
        use syncline_broker::log::Log;
        use syncline_proto::batch::BatchBuilder;

        let write = |root: &std::path::Path, values: &[&str]| {
            let log = Log::open(root.join("t").join("0"), Default::default()).expect("open");
            for chunk in values.chunks(2) {
                let mut builder = BatchBuilder::new();
                for value in chunk {
                    builder.push(1_700_000_000_000, Some(b"k"), Some(value.as_bytes()), &[]);
                }
                log.append(&builder.finish().expect("encode"))
                    .expect("append");
            }
            log.sync().expect("sync");
            log.close().expect("close");
        };
        let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        write(one.path(), &["v0", "v1", "v2", "v3", "v4"]);
        write(two.path(), &["v0", "v1", "v2", "XX", "v4"]);
        let first = read_replica(one.path(), "t", 0).expect("read the first replica");
        let values: Vec<&[u8]> = first.iter().map(|r| r.value.as_slice()).collect();
        assert_eq!(values, [b"v0", b"v1", b"v2", b"v3", b"v4"]);
        assert_eq!(
            first.iter().map(|r| r.offset).collect::<Vec<_>>(),
            [0, 1, 2, 3, 4]
        );
        let second = read_replica(two.path(), "t", 0).expect("read the second replica");
        assert_eq!(
            check_replicas(&[first.clone(), first.clone(), second]),
            vec![
                Violation::Diverged {
                    partition: 0,
                    replicas: (0, 2),
                    offset: 3
                },
                Violation::Diverged {
                    partition: 0,
                    replicas: (1, 2),
                    offset: 3
                },
            ]
        );
        // A replica missing the tail differs too (a lagging follower is not identical).
        assert_eq!(
            check_replicas(&[first.clone(), first[..4].to_vec()]),
            vec![Violation::Diverged {
                partition: 0,
                replicas: (0, 1),
                offset: 4
            }]
        );
    }

    #[test]
    fn given_a_seed_the_schedule_should_replay_and_cover_every_fault() {
        let draw = |seed: u64| {
            let mut rng = Rng::new(seed);
            let faults = every_fault_once(&mut rng);
            let numbers: Vec<u64> = (0..8).map(|_| rng.below(1000)).collect();
            (faults, numbers)
        };
        assert_eq!(draw(15), draw(15), "the same seed draws the same schedule");
        assert_ne!(draw(15).1, draw(16).1, "another seed draws another");
        for seed in 0..50 {
            let mut faults = draw(seed).0;
            faults.sort_by_key(|f| Fault::ALL.iter().position(|g| g == f));
            assert_eq!(
                faults,
                Fault::ALL.to_vec(),
                "seed {seed} skips a fault kind"
            );
        }
        let mut rng = Rng::new(1);
        for _ in 0..1000 {
            let d = rng.between(
                std::time::Duration::from_millis(5),
                std::time::Duration::from_millis(9),
            );
            assert!((5..=9).contains(&d.as_millis()), "{d:?}");
        }
    }
}
