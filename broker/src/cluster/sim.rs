//! The controller under a seeded simulator (turmoil): a failure replays from its seed.
//!
//! Each simulated host runs a real [`Controller`] (its log and snapshot in a directory of its
//! own, which survives a crash) and the real `syncline.v1.Peer` service, over turmoil's
//! simulated TCP: tonic's client through [`Peers::with_connector`], its server over a turmoil
//! listener. One seeded generator drives a workload of metadata commands proposed through
//! random nodes (`Controller::propose`, which forwards to the leader) while it cuts links
//! (their TCP segments held until repaired), isolates nodes, varies latency and crashes and
//! restarts nodes (a crash drops every task of the host without a shutdown; the directory
//! stays). Then it heals everything, waits for the nodes to converge and checks, Jepsen-style:
//!
//! - (a) Raft safety, sampled after every simulation step: no two nodes apply different
//!   entries (log ids) at one index, a leader leads under its own vote, and no node's Raft
//!   stops on a fatal error. openraft 0.10's default leader ids (`leader_id_adv`) allow
//!   several leaders in one term, ordered by node id, so "one leader per term" is not a
//!   property here; one leader per (term, node) is, and the log-id agreement is what it buys;
//! - (b) every proposal acknowledged with a success is in the final metadata: an acknowledged
//!   create is there unless a delete of that incarnation may have applied; an acknowledged
//!   delete leaves its incarnation absent and tombstoned, for good (a create acknowledged or
//!   retried later does not bring it back); a registered node is known;
//! - (c) every node ends with the same metadata and the same applied index;
//! - (d) every node restarted from its directory (all at once, cut off from each other) comes
//!   back with that metadata and applied index before hearing from anyone;
//! - (e) every node that runs is alive at its address in the settled metadata, and
//!   `__offsets` exists;
//! - every proposal answers within twice `PROPOSE_TIMEOUT` (plus the local apply).
//!
//! A second test replays one bug the simulator found (a retried create resurrected a deleted
//! topic) as a scripted scenario over the same hosts.
//!
//! The seed: `SYNCLINE_SIM_SEED` (one seed) or a fixed list; `SYNCLINE_SIM_ITERATIONS` runs
//! that many further seeds (a soak). A failure names its seed and prints every node's Raft
//! state; `SYNCLINE_SIM_LOG=FILE` (with `RUST_LOG`) writes the failed seed's logs there. Under the seed:
//! the workload, the fault schedule and turmoil's network (latencies, delivery). Not under it:
//! openraft's election timeouts (its runtime draws them from a thread-local generator), tokio's
//! `select!` branch order (seeded only with `--cfg tokio_unstable`) and hash-map order, so a
//! replay repeats the same workload and faults but not always the same interleaving: a rare
//! failure may take a few runs of its seed to come back
//! (`SYNCLINE_SIM_SEED=S SYNCLINE_SIM_ITERATIONS=N` runs seed S N times).
//! `SYNCLINE_SIM_NODES` sets the number of voters (3 by default).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{Rng as _, SeedableRng as _};
use syncline_proto::v1::peer_server::PeerServer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::{Channel, Endpoint, Uri};

use super::controller::{Controller, InternalTopic, PROPOSE_TIMEOUT};
use super::identity::Identity;
use super::metadata::{Command, Metadata};
use super::network::{Connector, Peers};
use crate::server::peer::PeerService;

const PORT: u16 = 7450;
const CLUSTER: &str = "sim";
/// Topic names the workload uses (few, so creates and deletes of one name collide).
const NAMES: [&str; 3] = ["a", "b", "c"];
/// Node ids the workload registers that never run (placement may use them).
const FAKE_NODES: [u64; 2] = [101, 102];

fn host_name(id: u64) -> String {
    format!("node{id}")
}

/// A node's data directory id (each simulated node keeps its directory across restarts).
fn dir_id(id: u64) -> String {
    format!("dir-{id}")
}

fn address(id: u64) -> String {
    format!("{}:{PORT}", host_name(id))
}

/// A turmoil stream tonic's server can serve.
struct SimStream(turmoil::net::TcpStream);

impl tonic::transport::server::Connected for SimStream {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl AsyncRead for SimStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for SimStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// tonic channels over turmoil's TCP.
fn sim_connector() -> Connector {
    Arc::new(|endpoint: Endpoint| -> Channel {
        endpoint.connect_with_connector_lazy(tower::service_fn(|uri: Uri| async move {
            let host = uri.host().unwrap_or_default().to_string();
            let port = uri.port_u16().unwrap_or(PORT);
            let stream = turmoil::net::TcpStream::connect((host.as_str(), port)).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }))
    })
}

/// One proposal of the workload.
#[derive(Debug, Clone)]
struct Op {
    seq: u64,
    command: Command,
}

/// A proposal's answer: `Ok(Ok)` applied, `Ok(Err)` applied and changed nothing (the error),
/// `Err` not acknowledged (why).
type Answer = Result<Result<(), String>, String>;

/// What happened to a proposal; `invoked`/`done` are positions in one global order of events.
#[derive(Debug, Clone)]
struct Record {
    node: u64,
    command: Command,
    invoked: u64,
    /// The position and the answer; None while in flight.
    done: Option<(u64, Answer)>,
    /// How long the proposal took to answer (simulated time).
    took: Duration,
}

#[derive(Default)]
struct History {
    clock: u64,
    records: BTreeMap<u64, Record>,
}

impl History {
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }
}

/// What the driver shares with one host.
#[derive(Default)]
struct Slot {
    controller: Option<Arc<Controller>>,
    inbox: Vec<Op>,
}

type Slots = Arc<BTreeMap<u64, Mutex<Slot>>>;

/// A host's software: the controller, its Peer service, and an agent proposing the driver's
/// commands through it.
async fn host(
    id: u64,
    nodes: u64,
    dir: PathBuf,
    slots: Slots,
    history: Arc<Mutex<History>>,
) -> turmoil::Result {
    let voters: BTreeMap<u64, String> = (1..=nodes).map(|n| (n, address(n))).collect();
    // A fresh incarnation id each time, as the registry draws them.
    let drawn = std::sync::atomic::AtomicU64::new(0);
    let offsets: InternalTopic = Box::new(move |_| {
        let n = drawn.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok((
            format!("offsets-{id}-{n}-{}", turmoil::elapsed().as_millis()),
            String::new(),
            1,
        ))
    });
    let peers = Peers::with_connector(sim_connector());
    let identity = Identity {
        format: 1, // the file format: the controller does not read it
        node_id: id,
        cluster_id: CLUSTER.to_string(),
        voters: voters
            .iter()
            .map(|(n, a)| format!("{n}={a}"))
            .collect::<Vec<_>>()
            .join(","),
        dir_id: dir_id(id),
        joined: false,
    };
    let controller = Controller::start_with(
        &dir,
        &identity,
        address(id),
        voters,
        offsets,
        peers,
        crate::replication::group::GroupSettings::default(),
    )
    .await?;
    let listener = turmoil::net::TcpListener::bind(("0.0.0.0", PORT)).await?;
    let incoming = futures_util::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| SimStream(stream));
        Some((accepted, listener))
    });
    let (_shutdown, shutdown_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(controller.clone().run(shutdown_rx));
    // No local partitions here: the node "follows" each applied index at once.
    let follower = controller.clone();
    tokio::spawn(async move {
        let mut applied = follower.view().subscribe();
        loop {
            let index = *applied.borrow_and_update();
            follower.set_reconciled(index, BTreeMap::new());
            if applied.changed().await.is_err() {
                break;
            }
        }
    });
    let agent = controller.clone();
    let agent_slots = slots.clone();
    tokio::spawn(async move {
        loop {
            let ops = std::mem::take(&mut agent_slots[&id].lock().inbox);
            for op in ops {
                let controller = agent.clone();
                let history = history.clone();
                tokio::spawn(async move {
                    {
                        let mut history = history.lock();
                        let invoked = history.tick();
                        history.records.insert(
                            op.seq,
                            Record {
                                node: id,
                                command: op.command.clone(),
                                invoked,
                                done: None,
                                took: Duration::ZERO,
                            },
                        );
                    }
                    let started = tokio::time::Instant::now();
                    let answer = controller
                        .propose(op.command)
                        .await
                        .map(|outcome| outcome.map_err(|e| e.to_string()))
                        .map_err(|e| e.to_string());
                    let mut history = history.lock();
                    let done = history.tick();
                    if let Some(record) = history.records.get_mut(&op.seq) {
                        record.done = Some((done, answer));
                        record.took = started.elapsed();
                    }
                });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    slots[&id].lock().controller = Some(controller.clone());
    tonic::transport::Server::builder()
        .add_service(PeerServer::new(PeerService::new(controller)))
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}

/// The simulation's shape.
#[derive(Debug, Clone, Copy)]
struct Plan {
    nodes: u64,
    /// Simulated time under faults and load.
    chaos: Duration,
    /// The longest the healed cluster may take to converge.
    settle: Duration,
}

const PLAN: Plan = Plan {
    nodes: 3,
    chaos: Duration::from_secs(40),
    settle: Duration::from_secs(60),
};

/// What one simulation saw (printed through Debug).
#[derive(Debug)]
#[allow(dead_code)]
struct Summary {
    acknowledged: usize,
    proposals: usize,
    crashes: usize,
    partitions: usize,
    leaders: BTreeMap<u64, BTreeSet<u64>>,
    applied: u64,
    topics: usize,
}

struct Driver<'a> {
    sim: turmoil::Sim<'a>,
    rng: SmallRng,
    plan: Plan,
    slots: Slots,
    history: Arc<Mutex<History>>,
    /// The nodes seen leading each term (openraft may elect several per term, ordered by id).
    leaders: BTreeMap<u64, BTreeSet<u64>>,
    /// The entry (log id) the first node seen at each applied index applied there.
    applied: BTreeMap<u64, (u64, super::raft::LogId)>,
    /// Crashed nodes and the step they come back at.
    down: BTreeMap<u64, u64>,
    cut: BTreeSet<(u64, u64)>,
    /// Nodes cut off from all others, until when.
    isolated: BTreeMap<u64, u64>,
    next_seq: u64,
    next_id: u64,
    created: Vec<(String, String)>,
    crashes: usize,
    partitions: usize,
}

impl Driver<'_> {
    /// A simulation of `plan.nodes` hosts keeping their directories under `root`.
    fn new(seed: u64, plan: Plan, root: &std::path::Path) -> Self {
        let mut sim = turmoil::Builder::new()
            .rng_seed(seed)
            .simulation_duration(Duration::from_secs(3600))
            .tick_duration(Duration::from_millis(1))
            .min_message_latency(Duration::from_millis(1))
            .max_message_latency(Duration::from_millis(20))
            .build();
        let slots: Slots = Arc::new((1..=plan.nodes).map(|id| (id, Mutex::default())).collect());
        let history = Arc::new(Mutex::new(History::default()));
        for id in 1..=plan.nodes {
            let dir = root.join(host_name(id));
            let (slots, history) = (slots.clone(), history.clone());
            sim.host(host_name(id), move || {
                host(id, plan.nodes, dir.clone(), slots.clone(), history.clone())
            });
        }
        Driver {
            sim,
            rng: SmallRng::seed_from_u64(seed),
            plan,
            slots,
            history,
            leaders: BTreeMap::new(),
            applied: BTreeMap::new(),
            down: BTreeMap::new(),
            cut: BTreeSet::new(),
            isolated: BTreeMap::new(),
            next_seq: 0,
            next_id: 0,
            created: Vec::new(),
            crashes: 0,
            partitions: 0,
        }
    }

    /// Hands `command` to node `node` to propose; its sequence number in the history.
    fn propose(&mut self, node: u64, command: Command) -> u64 {
        self.next_seq += 1;
        let seq = self.next_seq;
        self.slots[&node].lock().inbox.push(Op { seq, command });
        seq
    }

    fn controller(&self, id: u64) -> Option<Arc<Controller>> {
        self.slots[&id].lock().controller.clone()
    }

    /// Steps until `done` holds, for at most `ms` simulated milliseconds.
    fn step_until(
        &mut self,
        ms: u64,
        what: &str,
        mut done: impl FnMut(&Self) -> bool,
    ) -> Result<(), String> {
        for _ in 0..ms {
            if done(self) {
                return Ok(());
            }
            self.step()?;
        }
        Err(format!(
            "not within {ms} ms: {what}\n{}",
            self.raft_states()
        ))
    }

    fn step(&mut self) -> Result<(), String> {
        self.sim.step().map_err(|e| format!("a host failed: {e}"))?;
        for (id, slot) in self.slots.iter() {
            let Some(controller) = slot.lock().controller.clone() else {
                continue;
            };
            let metrics = controller.raft_metrics();
            if let Err(fatal) = &metrics.running_state {
                return Err(format!("node {id}'s raft stopped: {fatal}"));
            }
            if metrics.state == openraft::ServerState::Leader {
                use openraft::vote::RaftLeaderId as _;
                let leader = *metrics.vote.leader_id();
                let term = metrics.current_term;
                self.leaders.entry(term).or_default().insert(*id);
                // openraft's vote orders leaders by (term, node): one leader per leader id.
                if *leader.node_id() != *id || leader.term() != term {
                    return Err(format!(
                        "node {id} leads under another node's vote {leader}"
                    ));
                }
            }
            if let Some(last) = metrics.last_applied {
                let index = last.index();
                match self.applied.get(&index) {
                    Some((other, theirs)) if *theirs != last => {
                        return Err(format!(
                            "nodes {other} and {id} applied different entries at index {index}: {theirs} and {last}"
                        ))
                    }
                    Some(_) => {}
                    None => {
                        self.applied.insert(index, (*id, last));
                    }
                }
            }
        }
        Ok(())
    }

    fn crash(&mut self, id: u64) {
        self.slots[&id].lock().controller = None;
        self.slots[&id].lock().inbox.clear();
        self.sim.crash(host_name(id));
        // Its proposals in flight are lost: their outcome is unknown.
        let mut history = self.history.lock();
        let at = history.tick();
        for record in history.records.values_mut() {
            if record.node == id && record.done.is_none() {
                record.done = Some((at, Err("lost in a crash".to_string())));
            }
        }
    }

    fn restart(&mut self, id: u64) {
        self.sim.bounce(host_name(id));
    }

    /// Cuts or repairs a link. A cut link holds its TCP segments and delivers them when
    /// repaired, as TCP retransmits across a partition: turmoil's `partition` drops them
    /// instead, which leaves a connection with a gap no real TCP has (the soak saw such a
    /// connection stall a leader's replication to one node for a whole minute after healing).
    fn set_link(&mut self, a: u64, b: u64, cut: bool) {
        let (a, b) = (a.min(b), a.max(b));
        if cut {
            self.sim.hold(host_name(a), host_name(b));
            self.cut.insert((a, b));
        } else {
            self.sim.release(host_name(a), host_name(b));
            self.cut.remove(&(a, b));
        }
    }

    /// Cuts or repairs every link of node `id`.
    fn set_node_links(&mut self, id: u64, cut: bool) {
        for other in 1..=self.plan.nodes {
            if other != id {
                self.set_link(id, other, cut);
            }
        }
    }

    fn random_node(&mut self) -> u64 {
        self.rng.random_range(1..=self.plan.nodes)
    }

    /// A random command: mostly topic creates and deletes (of incarnations some node sees, or
    /// stale ones), some node registrations and marks.
    fn random_command(&mut self) -> Command {
        let roll = self.rng.random_range(0..100);
        if roll < 45 {
            self.next_id += 1;
            let name = NAMES[self.rng.random_range(0..NAMES.len())].to_string();
            let id = format!("i{}", self.next_id);
            self.created.push((name.clone(), id.clone()));
            return Command::CreateTopic {
                name,
                id,
                partitions: self.rng.random_range(1..=4),
                replication_factor: 1,
                settings: String::new(),
            };
        }
        if roll < 85 {
            let seen = self.random_node();
            let visible: Vec<(String, String)> = self.slots[&seen]
                .lock()
                .controller
                .as_ref()
                .map(|c| {
                    c.metadata()
                        .topics
                        .iter()
                        .map(|(name, topic)| (name.clone(), topic.id.clone()))
                        .collect()
                })
                .unwrap_or_default();
            // Mostly what a node shows; else one of the latest creates, maybe still in flight
            // (or retried) at its proposer.
            let pool = match visible.is_empty() || self.rng.random_bool(0.3) {
                true => &self.created[self.created.len().saturating_sub(4)..],
                false => &visible[..],
            };
            if let Some((name, id)) = pool.get(self.rng.random_range(0..pool.len().max(1))) {
                return Command::DeleteTopic {
                    name: name.clone(),
                    id: id.clone(),
                };
            }
        }
        let fake = FAKE_NODES[self.rng.random_range(0..FAKE_NODES.len())];
        if roll < 95 {
            Command::RegisterNode {
                id: fake,
                address: format!("fake{fake}:{PORT}"),
                at_ms: 1,
                dir_id: dir_id(fake),
            }
        } else {
            let real = self.random_node();
            Command::MarkDown {
                ids: vec![fake, real],
            }
        }
    }

    /// Faults and load for `plan.chaos`.
    fn chaos(&mut self) -> Result<(), String> {
        let ms = self.plan.chaos.as_millis() as u64;
        for at in 0..ms {
            self.step()?;
            for id in due(&mut self.down, at) {
                self.restart(id);
            }
            if at % 10 != 0 {
                continue;
            }
            if self.rng.random_bool(0.25) {
                let node = self.random_node();
                let command = self.random_command();
                self.propose(node, command);
            }
            if self.rng.random_bool(0.01) {
                let (a, b) = (self.random_node(), self.random_node());
                if a != b {
                    let cut = !self.cut.contains(&(a.min(b), a.max(b)));
                    self.partitions += usize::from(cut);
                    self.set_link(a, b, cut);
                }
            }
            if self.rng.random_bool(0.005) {
                let latency = Duration::from_millis(self.rng.random_range(1..=300));
                self.sim.set_max_message_latency(latency);
            }
            if self.rng.random_bool(0.001) {
                // A node cut off from every other for a while.
                let id = self.random_node();
                self.set_node_links(id, true);
                self.partitions += 1;
                let until = at + self.rng.random_range(2000..=25_000);
                self.isolated.insert(id, until);
            }
            for id in due(&mut self.isolated, at) {
                self.set_node_links(id, false);
            }
            if self.rng.random_bool(0.004) {
                let id = self.random_node();
                if !self.down.contains_key(&id) {
                    self.crash(id);
                    self.crashes += 1;
                    let back = at + self.rng.random_range(200..=8000);
                    self.down.insert(id, back);
                }
            }
        }
        Ok(())
    }

    /// Repairs every link, restarts every crashed node, and waits until no proposal is in
    /// flight and every node has applied the same entries to the same metadata.
    fn heal_and_converge(&mut self) -> Result<(u64, Metadata), String> {
        self.isolated.clear();
        for (a, b) in self.cut.clone() {
            self.set_link(a, b, false);
        }
        self.sim.set_max_message_latency(Duration::from_millis(20));
        for id in std::mem::take(&mut self.down).into_keys() {
            self.restart(id);
        }
        let settle = self.plan.settle.as_millis() as u64;
        let mut stable_since = None;
        let mut last = None;
        for at in 0..settle {
            self.step()?;
            if at % 20 != 0 {
                continue;
            }
            let state = self.agreed();
            let in_flight = self.in_flight();
            match (&state, in_flight) {
                (Ok(now), 0) if last.as_ref() == Some(now) => {
                    if at - stable_since.unwrap_or(at) >= 4000 {
                        return state;
                    }
                }
                (Ok(now), 0) => {
                    last = Some(now.clone());
                    stable_since = Some(at);
                }
                _ => {
                    last = None;
                    stable_since = None;
                }
            }
        }
        Err(format!(
            "no convergence within {:?} of healing ({} proposals in flight): {}\n{}",
            self.plan.settle,
            self.in_flight(),
            self.agreed().err().unwrap_or_default(),
            self.raft_states()
        ))
    }

    /// Each node's Raft state, for a failure's message.
    fn raft_states(&self) -> String {
        let mut out = String::new();
        for (id, slot) in self.slots.iter() {
            let state = match slot.lock().controller.clone() {
                None => "not running".to_string(),
                Some(c) => {
                    let m = c.raft_metrics();
                    format!(
                        "{:?} term {} vote {} leader {:?} last log {:?} local committed {:?} applied {:?} snapshot {:?} purged {:?} replication {:?}",
                        m.state,
                        m.current_term,
                        m.vote,
                        m.current_leader,
                        m.last_log_index,
                        m.local_committed,
                        m.last_applied,
                        m.snapshot,
                        m.purged,
                        m.replication
                    )
                }
            };
            out.push_str(&format!("node {id}: {state}\n"));
        }
        out
    }

    fn in_flight(&self) -> usize {
        let history = self.history.lock();
        history
            .records
            .values()
            .filter(|r| r.done.is_none())
            .count()
    }

    /// The applied index and metadata every node has, or why they differ.
    fn agreed(&self) -> Result<(u64, Metadata), String> {
        let mut seen: Option<(u64, u64, Metadata)> = None;
        for (id, slot) in self.slots.iter() {
            let Some(controller) = slot.lock().controller.clone() else {
                return Err(format!("node {id} is not running"));
            };
            let applied = controller.view().applied();
            let metadata = controller.metadata();
            match &seen {
                None => seen = Some((*id, applied, metadata)),
                Some((first, index, expected)) => {
                    if applied != *index {
                        return Err(format!(
                            "node {first} applied up to {index}, node {id} up to {applied}"
                        ));
                    }
                    if metadata != *expected {
                        return Err(format!(
                            "nodes {first} and {id} applied index {applied} to different metadata:\n{expected:?}\n{metadata:?}"
                        ));
                    }
                }
            }
        }
        seen.map(|(_, index, metadata)| (index, metadata))
            .ok_or_else(|| "no nodes".to_string())
    }

    /// Crashes every node at once, restarts them cut off from each other, and checks each
    /// comes back from its directory with `expected`.
    fn restart_all_isolated(&mut self, expected: &(u64, Metadata)) -> Result<(), String> {
        let ids: Vec<u64> = (1..=self.plan.nodes).collect();
        for &id in &ids {
            self.crash(id);
        }
        for &a in &ids {
            for &b in &ids {
                if a < b {
                    self.set_link(a, b, true);
                }
            }
        }
        for &id in &ids {
            self.restart(id);
        }
        let mut waited = 0;
        loop {
            self.step()?;
            waited += 1;
            let restored = ids.iter().all(|id| {
                self.slots[id]
                    .lock()
                    .controller
                    .as_ref()
                    .is_some_and(|c| c.view().applied() >= expected.0)
            });
            if restored {
                break;
            }
            if waited > 5000 {
                let applied: Vec<Option<u64>> = ids
                    .iter()
                    .map(|id| {
                        self.slots[id]
                            .lock()
                            .controller
                            .as_ref()
                            .map(|c| c.view().applied())
                    })
                    .collect();
                return Err(format!(
                    "after a restart of every node, cut off, the applied indexes are {applied:?}, not {}",
                    expected.0
                ));
            }
        }
        self.agreed().and_then(|now| match now == *expected {
            true => Ok(()),
            false => Err(format!(
                "after a restart of every node the metadata is\n{:?}\nnot\n{:?}",
                now, expected
            )),
        })?;
        for &a in &ids {
            for &b in &ids {
                if a < b {
                    self.set_link(a, b, false);
                }
            }
        }
        Ok(())
    }
}

/// Removes from `schedule` (node -> when) the nodes due at `at`.
fn due(schedule: &mut BTreeMap<u64, u64>, at: u64) -> Vec<u64> {
    let ids: Vec<u64> = schedule
        .iter()
        .filter(|(_, when)| **when <= at)
        .map(|(id, _)| *id)
        .collect();
    for id in &ids {
        schedule.remove(id);
    }
    ids
}

/// (b): the final metadata holds every acknowledged proposal, in the order acknowledged.
fn check_history(history: &History, metadata: &Metadata) -> Result<(), String> {
    let present: BTreeMap<&str, &str> = metadata
        .topics
        .iter()
        .map(|(name, topic)| (topic.id.as_str(), name.as_str()))
        .collect();
    for (name, topic) in &metadata.topics {
        if metadata.deleted.contains(&topic.id) {
            return Err(format!(
                "topic {name} holds incarnation {} which was deleted",
                topic.id
            ));
        }
    }
    // Deletes that may have removed their incarnation (all but those refused as no-ops).
    let delete_tried: BTreeSet<&str> = history
        .records
        .values()
        .filter(|r| !matches!(r.done, Some((_, Ok(Err(_))))))
        .filter_map(|r| match &r.command {
            Command::DeleteTopic { id, .. } => Some(id.as_str()),
            _ => None,
        })
        .collect();
    // A proposal answers within its time limit (a forward started just before it may take
    // one more limit, and the node's own apply a second).
    let answers_within = 2 * PROPOSE_TIMEOUT + Duration::from_secs(2);
    if let Some((seq, late)) = history
        .records
        .iter()
        .find(|(_, r)| r.took > answers_within)
    {
        return Err(format!(
            "proposal {seq} ({} through node {}) answered after {:?}: {:?}",
            late.command, late.node, late.took, late.done
        ));
    }
    for (seq, record) in &history.records {
        let Some((done, Ok(Ok(())))) = &record.done else {
            continue;
        };
        let seq = format!("{seq} (events {}..{done})", record.invoked);
        match &record.command {
            Command::CreateTopic { name, id, .. }
                if !delete_tried.contains(id.as_str())
                    && present.get(id.as_str()) != Some(&name.as_str()) =>
            {
                return Err(format!(
                    "proposal {seq} (create {name} {id} through node {}) was acknowledged but the topic is missing",
                    record.node
                ));
            }
            Command::DeleteTopic { name, id }
                if present.contains_key(id.as_str()) || !metadata.deleted.contains(id) =>
            {
                return Err(format!(
                    "proposal {seq} (delete {name} {id} through node {}) was acknowledged but the incarnation is not deleted",
                    record.node
                ));
            }
            Command::RegisterNode { id, .. } if !metadata.nodes.contains_key(id) => {
                return Err(format!(
                    "proposal {seq} (register node {id}) was acknowledged but the node is unknown"
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

/// (e): in the settled metadata every running node is registered, alive, at its address, and
/// `__offsets` exists.
fn check_liveness(metadata: &Metadata, nodes: u64) -> Result<(), String> {
    for id in 1..=nodes {
        match metadata.nodes.get(&id) {
            Some(node) if node.alive && node.address == address(id) => {}
            other => {
                return Err(format!(
                    "node {id} runs and heartbeats but the settled metadata has it as {other:?}"
                ))
            }
        }
    }
    match metadata
        .topics
        .contains_key(crate::group::offsets::OFFSETS_TOPIC)
    {
        true => Ok(()),
        false => Err("the settled metadata has no __offsets".to_string()),
    }
}

/// Runs one simulation from `seed`.
fn simulate(seed: u64, plan: Plan) -> Result<Summary, String> {
    let root = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut driver = Driver::new(seed, plan, root.path());
    driver.chaos()?;
    let converged = driver.heal_and_converge()?;
    check_history(&driver.history.lock(), &converged.1)?;
    check_liveness(&converged.1, plan.nodes)?;
    driver.restart_all_isolated(&converged)?;
    let history = driver.history.lock();
    Ok(Summary {
        acknowledged: history
            .records
            .values()
            .filter(|r| matches!(r.done, Some((_, Ok(_)))))
            .count(),
        proposals: history.records.len(),
        crashes: driver.crashes,
        partitions: driver.partitions,
        leaders: driver.leaders.clone(),
        applied: converged.0,
        topics: converged.1.topics.len(),
    })
}

/// Bug found here: a leader crashes right after a follower took a create forwarded to it by
/// another node; the new leader commits the create and the topic is deleted; the create's
/// proposer, whose forward failed with the crash, retries it, and the retry brought the
/// deleted topic back (`Metadata::apply` created an incarnation it had tombstoned).
/// The regression runs a few seeds: the crash races the retry, and before the fix about half
/// of the runs brought the topic back (6 of seeds 1..=8 in one run, 2 of 4 in another).
#[test]
fn given_a_create_retried_after_its_topic_was_deleted_should_keep_it_deleted() {
    let seeds = match env_u64("SYNCLINE_SIM_SEED") {
        Some(seed) => vec![seed],
        None => vec![1, 3, 4, 5, 6, 8],
    };
    for seed in seeds {
        retried_create_after_delete(seed);
    }
}

fn retried_create_after_delete(seed: u64) {
    let outcome = (|| -> Result<(), String> {
        let root = tempfile::tempdir().map_err(|e| e.to_string())?;
        let mut driver = Driver::new(seed, PLAN, root.path());
        driver.heal_and_converge()?;
        let leader = driver
            .controller(1)
            .and_then(|c| c.leader())
            .ok_or("no leader after settling")?;
        let others: Vec<u64> = (1..=PLAN.nodes).filter(|id| *id != leader).collect();
        let (proposer, successor) = (others[0], others[1]);
        let last = |driver: &Driver<'_>, id: u64| {
            driver
                .controller(id)
                .and_then(|c| c.raft_metrics().last_log_index)
                .unwrap_or(0)
        };
        let entry = last(&driver, leader) + 1;
        let create = Command::CreateTopic {
            name: "t".into(),
            id: "incarnation-1".into(),
            partitions: 1,
            replication_factor: 1,
            settings: String::new(),
        };
        let created = driver.propose(proposer, create);
        // Cut the leader off as soon as the successor holds the entry, before its ack lands.
        driver.step_until(2000, "the successor takes the create", |d| {
            last(d, successor) >= entry
        })?;
        driver.crash(leader);
        let leads_with_topic = |d: &Driver<'_>, id: u64| {
            d.controller(id)
                .is_some_and(|c| c.leader() == Some(id) && c.metadata().topics.contains_key("t"))
        };
        driver.step_until(10_000, "a new leader with the topic", |d| {
            others.iter().any(|id| leads_with_topic(d, *id))
        })?;
        let new_leader = others
            .iter()
            .copied()
            .find(|id| leads_with_topic(&driver, *id))
            .unwrap_or(successor);
        let deleted = driver.propose(
            new_leader,
            Command::DeleteTopic {
                name: "t".into(),
                id: "incarnation-1".into(),
            },
        );
        driver.step_until(10_000, "the delete is acknowledged", |d| {
            matches!(
                d.history
                    .lock()
                    .records
                    .get(&deleted)
                    .and_then(|r| r.done.clone()),
                Some((_, Ok(Ok(()))))
            )
        })?;
        driver.restart(leader);
        let converged = driver.heal_and_converge()?;
        let history = driver.history.lock();
        if let Some(topic) = converged.1.topics.get("t") {
            return Err(format!(
                "the deleted topic is back ({topic:?}); its create: {:?}",
                history.records.get(&created)
            ));
        }
        check_history(&history, &converged.1)
    })();
    if let Err(failure) = outcome {
        panic!("seed {seed}: {failure}");
    }
}

/// The current seed's log lines (written to `SYNCLINE_SIM_LOG` when it fails).
static SEED_LOG: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct SeedLog;

impl std::io::Write for SeedLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        SEED_LOG.lock().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The seeds CI runs (and the regressions found by the simulator).
const SEEDS: [u64; 3] = [1, 2, 3];

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

#[test]
fn given_seeded_faults_and_crashes_when_metadata_is_proposed_should_keep_raft_safety_and_converge()
{
    let iterations = env_u64("SYNCLINE_SIM_ITERATIONS");
    let seeds: Vec<u64> = match env_u64("SYNCLINE_SIM_SEED") {
        // One seed, run `iterations` times (a failure outside the seed's control may need a few).
        Some(seed) => vec![seed; iterations.unwrap_or(1).max(1) as usize],
        // The CI seeds, then `iterations` further ones.
        None => {
            let start = SEEDS.iter().max().copied().unwrap_or(0) + 1;
            let extra = start..start + iterations.unwrap_or(0);
            SEEDS.iter().copied().chain(extra).collect()
        }
    };
    // SYNCLINE_SIM_LOG=FILE: the hosts' logs of the failed seed (RUST_LOG filters them).
    let log_file = std::env::var("SYNCLINE_SIM_LOG").ok();
    if log_file.is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(|| SeedLog)
            .with_ansi(false)
            .try_init();
    }
    for seed in seeds {
        SEED_LOG.lock().clear();
        let plan = Plan {
            nodes: env_u64("SYNCLINE_SIM_NODES")
                .unwrap_or(PLAN.nodes)
                .clamp(1, 9),
            ..PLAN
        };
        let outcome = simulate(seed, plan);
        if let (Err(_), Some(path)) = (&outcome, &log_file) {
            let _ = std::fs::write(path, &*SEED_LOG.lock());
        }
        match outcome {
            Ok(summary) => eprintln!("seed {seed}: {summary:?}"),
            Err(failure) => panic!(
                "simulation seed {seed} failed (replay: SYNCLINE_SIM_SEED={seed} cargo test -p syncline-broker --lib cluster::sim): {failure}"
            ),
        }
    }
}
