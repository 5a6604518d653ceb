//! The fault side of the replication fault tests (issue 15), in the manner of Jepsen's nemesis:
//! a seeded random source and the faults it picks between, applied to a [`Cluster`] (and its
//! [`Net`] for network faults) while workloads (`workload.rs`) run against it.
//!
//! Every fault is applied, held for a while the seed decides, and undone; then
//! [`Nemesis::recover`] waits (bounded) until the cluster serves again: a controller agreed by
//! every running node and every partition led by a running node. Each step is written to a
//! journal (time since the start, what was done to which node and why that node), which
//! [`Nemesis::journal`] returns and the test prints with the seed when it fails.
//!
//! Faults ([`Fault`]):
//! - `KillLeader`: `kill -9` of the leader of a random replicated partition, restarted later;
//! - `KillFollower`: `kill -9` of a replica that does not lead a random replicated partition;
//! - `KillController`: `kill -9` of the controller leader;
//! - `PauseNode`: SIGSTOP of a random partition's leader for longer than any election timeout
//!   (partitions: 600-1200 ms, the controller: 1-2 s), then SIGCONT;
//! - `IsolateLeader`: a random partition's leader cut off from both other nodes (it is the
//!   minority, alone), then healed; needs a [`Net`] (root): skipped with a message without one;
//! - `RestartAll`: `kill -9` of every node, then all started again.
//!
//! The random source is splitmix64: tiny, no dependency, and the same sequence for a seed on
//! every machine, so a seed printed by a failure replays the same schedule (the timing of the
//! cluster's own reactions differs from run to run, so a replay is likely, not certain, to fail
//! the same way).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use syncline_client::{ClusterDescription, PartitionPlacement};
use tokio::time::Instant;

use super::cluster::Cluster;
use super::netns::Net;

/// The environment variable that overrides a test's default seed.
pub const SEED_VAR: &str = "SYNCLINE_FAULT_SEED";

/// How long [`Nemesis::recover`] waits for the cluster to serve again after a fault is undone:
/// elections take about a second, a full restart a few; room for a slow, shared machine.
pub const RECOVERY_BOUND: Duration = Duration::from_secs(60);

/// The seed from [`SEED_VAR`] when set (decimal, or hex with `0x`), else `default`. Panics on
/// a value that is not a number (a typo must not silently run another seed).
pub fn seed_from_env(default: u64) -> u64 {
    match std::env::var(SEED_VAR) {
        Ok(text) => parse_seed(&text)
            .unwrap_or_else(|| panic!("{SEED_VAR}={text:?} is not a u64 (decimal or 0x hex)")),
        Err(_) => default,
    }
}

fn parse_seed(text: &str) -> Option<u64> {
    let text = text.trim();
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

/// A seeded random source (splitmix64).
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// The sequence of `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "below(0)");
        self.next_u64() % n
    }

    /// A duration in `[low, high]`, to the millisecond.
    pub fn between(&mut self, low: Duration, high: Duration) -> Duration {
        let low_ms = low.as_millis() as u64;
        let high_ms = (high.as_millis() as u64).max(low_ms);
        Duration::from_millis(low_ms + self.below(high_ms - low_ms + 1))
    }

    /// One of `items` (not empty).
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    /// `items` in a random order (Fisher-Yates).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }

    /// An independent source for a worker, derived from this one's next number.
    pub fn fork(&mut self) -> Rng {
        Rng::new(self.next_u64())
    }
}

/// One kind of fault: see the module doc.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// `kill -9` of a partition leader.
    KillLeader,
    /// `kill -9` of a partition follower.
    KillFollower,
    /// `kill -9` of the controller leader.
    KillController,
    /// SIGSTOP of a partition leader, longer than the election timeout; SIGCONT.
    PauseNode,
    /// A partition leader cut off from the others (netns); healed.
    IsolateLeader,
    /// `kill -9` of every node; all started again.
    RestartAll,
}

impl Fault {
    /// Every kind, in a fixed order.
    pub const ALL: [Fault; 6] = [
        Fault::KillLeader,
        Fault::KillFollower,
        Fault::KillController,
        Fault::PauseNode,
        Fault::IsolateLeader,
        Fault::RestartAll,
    ];
}

/// Every kind of fault once, in an order `rng` picks: the short schedule.
pub fn every_fault_once(rng: &mut Rng) -> Vec<Fault> {
    let mut faults = Fault::ALL.to_vec();
    rng.shuffle(&mut faults);
    faults
}

/// How long each fault is held: a killed node stays down, a paused node stopped, an isolated
/// node cut off, for a time in these bounds (the pause and the cut are longer than the
/// controller's election timeout of 1-2 s, so both partition groups and the controller elect).
const DOWN: (Duration, Duration) = (Duration::from_millis(1000), Duration::from_millis(3000));
const PAUSED: (Duration, Duration) = (Duration::from_millis(2500), Duration::from_millis(3500));
const CUT_OFF: (Duration, Duration) = (Duration::from_millis(3000), Duration::from_millis(5000));

/// Applies faults to a cluster and waits for it to recover; keeps a journal of what it did.
/// Its methods need a multi-threaded tokio runtime: a node's (re)start blocks its thread
/// (`block_in_place`) while the workloads' tasks go on on the others.
pub struct Nemesis<'a> {
    net: Option<&'a Net>,
    rng: Rng,
    seed: u64,
    started: Instant,
    journal: Arc<Mutex<Vec<String>>>,
}

impl<'a> Nemesis<'a> {
    /// A nemesis drawing from `seed`; `net` (the cluster runs in it) for network faults.
    pub fn new(seed: u64, net: Option<&'a Net>) -> Nemesis<'a> {
        Nemesis {
            net,
            // Its own stream: the workloads' sources are derived from the seed differently.
            rng: Rng::new(seed ^ 0x6E65_6D65_7369_7321),
            seed,
            started: Instant::now(),
            journal: Arc::default(),
        }
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The random source (for picking faults).
    pub fn rng(&mut self) -> &mut Rng {
        &mut self.rng
    }

    /// Whether network faults can be applied.
    pub fn has_net(&self) -> bool {
        self.net.is_some()
    }

    /// A handle on the journal (shared: a failure guard prints it).
    pub fn journal_handle(&self) -> Arc<Mutex<Vec<String>>> {
        self.journal.clone()
    }

    /// Every entry so far, one a line.
    pub fn journal(&self) -> String {
        self.journal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .join("\n")
    }

    /// Adds a line to the journal (also printed as it happens).
    pub fn note(&self, what: impl AsRef<str>) {
        let line = format!(
            "[{:7.2}s] {}",
            self.started.elapsed().as_secs_f64(),
            what.as_ref()
        );
        eprintln!("nemesis: {line}");
        self.journal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(line);
    }

    /// A fault the seed picks among every kind (network faults only with a net).
    pub fn pick_fault(&mut self) -> Fault {
        let kinds: Vec<Fault> = Fault::ALL
            .into_iter()
            .filter(|f| *f != Fault::IsolateLeader || self.net.is_some())
            .collect();
        *self.rng.pick(&kinds)
    }

    /// Applies `fault`, holds it, undoes it, and waits (bounded) for the cluster to recover.
    /// Panics (naming the seed) when the cluster does not recover.
    pub async fn run(&mut self, cluster: &mut Cluster, fault: Fault) {
        let description = self.describe(cluster).await;
        match fault {
            Fault::KillLeader => {
                let (placement, leader) = self.pick_led(&description);
                let role = format!("leader of {}/{}", placement.topic, placement.partition);
                self.kill_for_a_while(cluster, leader, &role).await;
            }
            Fault::KillFollower => {
                let (placement, leader) = self.pick_led(&description);
                let followers: Vec<u64> = placement
                    .replicas
                    .iter()
                    .copied()
                    .filter(|&r| r != leader)
                    .collect();
                let follower = *self.rng.pick(&followers);
                let role = format!(
                    "follower of {}/{}, led by {leader}",
                    placement.topic, placement.partition
                );
                self.kill_for_a_while(cluster, follower, &role).await;
            }
            Fault::KillController => {
                let controller = description
                    .controller
                    .unwrap_or_else(|| panic!("seed {}: no controller to kill", self.seed));
                self.kill_for_a_while(cluster, controller, "controller leader")
                    .await;
            }
            Fault::PauseNode => {
                let (placement, leader) = self.pick_led(&description);
                let paused = self.rng.between(PAUSED.0, PAUSED.1);
                self.note(format!(
                    "SIGSTOP node {leader} (leader of {}/{}) for {paused:?}",
                    placement.topic, placement.partition
                ));
                cluster.pause(leader);
                tokio::time::sleep(paused).await;
                self.note(format!("SIGCONT node {leader}"));
                cluster.resume(leader);
            }
            Fault::IsolateLeader => {
                let Some(net) = self.net else {
                    self.note(
                        "SKIPPED isolate-leader: no network namespaces here (not root, or no `ip`)",
                    );
                    return;
                };
                let (placement, leader) = self.pick_led(&description);
                let cut = self.rng.between(CUT_OFF.0, CUT_OFF.1);
                self.note(format!(
                    "isolate node {leader} (leader of {}/{}; it is the minority) for {cut:?}",
                    placement.topic, placement.partition
                ));
                net.isolate(leader);
                tokio::time::sleep(cut).await;
                self.note("heal");
                net.heal();
            }
            Fault::RestartAll => {
                self.note("kill -9 every node, then start all");
                tokio::task::block_in_place(|| {
                    cluster.kill_all();
                    cluster.restart_all();
                });
            }
        }
        self.recover(cluster).await;
    }

    /// `kill -9` of `node` (`role`: why it was picked, for the journal), down for a time in
    /// [`DOWN`], then started again.
    async fn kill_for_a_while(&mut self, cluster: &mut Cluster, node: u64, role: &str) {
        let down = self.rng.between(DOWN.0, DOWN.1);
        self.note(format!("kill -9 node {node} ({role}) for {down:?}"));
        cluster.kill(node);
        tokio::time::sleep(down).await;
        self.note(format!("restart node {node}"));
        restart(cluster, node);
    }

    /// Undoes every standing network fault and starts every node that is down; then
    /// [`Nemesis::recover`].
    pub async fn heal_all(&mut self, cluster: &mut Cluster) {
        if let Some(net) = self.net {
            net.heal();
        }
        let down: Vec<u64> = (1..=cluster.len())
            .filter(|&id| !cluster.is_running(id))
            .collect();
        for id in down {
            self.note(format!("start node {id} (was down)"));
            restart(cluster, id);
        }
        self.recover(cluster).await;
    }

    /// Waits (up to [`RECOVERY_BOUND`]) until every running node agrees on a controller and
    /// sees the others alive, and the controller's metadata names a running leader for every
    /// partition. Panics naming the seed and what was missing.
    pub async fn recover(&mut self, cluster: &mut Cluster) {
        let started = Instant::now();
        let controller = cluster.wait_for_controller(RECOVERY_BOUND).await;
        let running = cluster.running();
        loop {
            let leaderless: Vec<String> = match cluster.describe(controller).await {
                Ok(description) => description
                    .partitions
                    .iter()
                    .filter(|p| !p.leader.is_some_and(|l| running.contains(&l)))
                    .map(|p| format!("{}/{} (leader {:?})", p.topic, p.partition, p.leader))
                    .collect(),
                Err(error) => vec![format!("DescribeCluster on node {controller}: {error}")],
            };
            if leaderless.is_empty() {
                break;
            }
            if started.elapsed() > RECOVERY_BOUND {
                panic!(
                    "seed {}: the cluster did not recover within {RECOVERY_BOUND:?}: no running \
                     leader for {}\njournal:\n{}",
                    self.seed,
                    leaderless.join(", "),
                    self.journal()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.note(format!(
            "recovered in {:.2}s (controller {controller})",
            started.elapsed().as_secs_f64()
        ));
    }

    /// The controller's description (every node is up when a fault starts).
    async fn describe(&self, cluster: &mut Cluster) -> ClusterDescription {
        let controller = cluster.wait_for_controller(RECOVERY_BOUND).await;
        cluster
            .describe(controller)
            .await
            .unwrap_or_else(|e| panic!("seed {}: DescribeCluster: {e}", self.seed))
    }

    /// A random replicated partition (more than one replica) and its leader.
    fn pick_led(&mut self, description: &ClusterDescription) -> (PartitionPlacement, u64) {
        let replicated: Vec<&PartitionPlacement> = description
            .partitions
            .iter()
            .filter(|p| p.replicas.len() > 1 && p.leader.is_some())
            .collect();
        assert!(
            !replicated.is_empty(),
            "seed {}: no replicated partition with a leader: {description:#?}",
            self.seed
        );
        let placement = (*self.rng.pick(&replicated)).clone();
        let leader = placement.leader.unwrap_or_default();
        (placement, leader)
    }
}

/// [`Cluster::restart`] without holding up the runtime's other tasks (the workloads) while the
/// node recovers: it blocks its thread polling the node's log.
fn restart(cluster: &mut Cluster, id: u64) {
    tokio::task::block_in_place(|| cluster.restart(id));
}

/// Prints the seed (and the journal) when the test panics while it is alive: every failure
/// names the seed to replay it with, the harness's own panics too.
pub struct SeedGuard {
    seed: u64,
    journal: Arc<Mutex<Vec<String>>>,
}

impl SeedGuard {
    /// A guard for `seed`, printing `journal` on a panic.
    pub fn new(seed: u64, journal: Arc<Mutex<Vec<String>>>) -> SeedGuard {
        SeedGuard { seed, journal }
    }
}

impl Drop for SeedGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let journal = self.journal.lock().unwrap_or_else(|e| e.into_inner());
            eprintln!(
                "FAILED with seed {seed}: replay with {SEED_VAR}={seed}\njournal:\n{}",
                journal.join("\n"),
                seed = self.seed
            );
        }
    }
}
