//! A cluster of real `syncline-broker` processes on loopback, for the cluster tests (issue 14).
//!
//! Node ids are 1..=n and every method takes a node id. The ports are chosen up front (each
//! node binds 127.0.0.1:0, notes the port, releases it) because every node is given the whole
//! `--cluster 1=127.0.0.1:P1,2=127.0.0.1:P2,...` list; node `i` gets `--node-id i`,
//! `--listen 127.0.0.1:Pi`, `--advertise 127.0.0.1:Pi`, `--metrics-listen 127.0.0.1:0` and
//! `--data-dir ROOT/node-i/data`. Its stdout and stderr go to `ROOT/node-i/broker.log` (kept
//! across restarts, each start under a `=== harness:` line), which [`Cluster::logs`] returns;
//! a test that panics while the cluster is alive prints the last lines of every node's log
//! (when the cluster is dropped), so the harness's own panics do not repeat them; with
//! `SYNCLINE_KEEP_CLUSTER` set it also keeps ROOT (whole logs, data) and prints its path.
//! A node keeps its port and data directory over [`Cluster::stop`], [`Cluster::kill`] and
//! [`Cluster::restart`]. Dropping the cluster kills every node and deletes ROOT.
//!
//! [`Cluster::start_in`] runs node `i` inside namespace `i` of a [`Net`] instead (for network
//! faults): `ip netns exec NS syncline-broker ...`, on its namespace's address with port
//! [`NETNS_PORT`] (a namespace of its own: nothing else binds there) and metrics on that
//! address too, so that the test process reaches both through the bridge. The node advertises
//! (and the `--cluster` list names) [`Net::advertised`] instead: the `Net`'s proxy to it, which
//! can delay its links. Drop the cluster
//! before the `Net` (declare the `Net` first).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use syncline_client::{Client, ClusterDescription, TopicConfig, TopicDescription};
use syncline_proto::v1::broker_client::BrokerClient;
use tonic::transport::Channel;

use super::binary;
use super::history::Seen;
use super::netns::Net;

/// The port every node listens on inside its own network namespace ([`Cluster::start_in`]).
pub const NETNS_PORT: u16 = 9092;

/// How long a node may take to log `listening on` (it recovers its data first).
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`Cluster::start`] and [`Cluster::restart_all`] wait for the nodes to agree on a
/// controller and see each other alive.
const SERVING_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a SIGTERM'd node may take to exit before the harness gives up on it.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Lines of each node's log printed when a test panics.
const PANIC_LOG_LINES: usize = 40;
/// When set, a cluster dropped while its test panics keeps its directory (every node's whole
/// log and data) and prints where, instead of deleting it.
pub const KEEP_VAR: &str = "SYNCLINE_KEEP_CLUSTER";

/// One broker node of a [`Cluster`].
pub struct Node {
    id: u64,
    /// The address it listens on and advertises: loopback, or its namespace's.
    host: String,
    port: u16,
    /// The address it advertises (and the other nodes dial) when not [`Node::address`]: a
    /// [`Net`]'s proxy for it.
    advertise: Option<String>,
    /// The network namespace it runs in (`None`: the test's own).
    netns: Option<String>,
    dir: PathBuf,
    process: Option<Child>,
    metrics: Option<String>,
    starts: u32,
    /// Whether some start of it got to `listening on`.
    served: bool,
    /// A node that joins a running cluster: started with `--join` this address instead of
    /// `--cluster` ([`Cluster::join_node`]).
    joins: Option<String>,
    /// Started without `--cluster` and `--join` (a member restarting from its data
    /// directory alone: [`Cluster::restart_bare`]).
    bare: bool,
}

impl Node {
    fn new(root: &Path, id: u64, listener: &TcpListener) -> Node {
        let dir = root.join(format!("node-{id}"));
        std::fs::create_dir_all(&dir).expect("node directory");
        Node {
            id,
            host: "127.0.0.1".to_string(),
            port: listener.local_addr().expect("local address").port(),
            advertise: None,
            netns: None,
            dir,
            process: None,
            metrics: None,
            starts: 0,
            served: false,
            joins: None,
            bare: false,
        }
    }

    /// Its node id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Its advertised (and listen) address, `127.0.0.1:PORT` (in a namespace: `10.X.Y.Z:9092`);
    /// the same over restarts.
    pub fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// The address it advertises and the other nodes reach it at: [`Node::address`], or in
    /// a [`Net`] its proxy's (see [`Net::advertised`]).
    pub fn advertised(&self) -> String {
        self.advertise.clone().unwrap_or_else(|| self.address())
    }

    /// `http://` + [`Node::address`].
    pub fn url(&self) -> String {
        format!("http://{}", self.address())
    }

    /// Its data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The file its stdout and stderr go to.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("broker.log")
    }

    /// The Prometheus endpoint of the running process (a new port at each start).
    pub fn metrics_address(&self) -> Option<&str> {
        self.metrics.as_deref()
    }

    /// The process id while running.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Child::id)
    }

    /// Whether the harness started it and it has not exited.
    fn is_running(&mut self) -> bool {
        match &mut self.process {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }
}

/// N broker processes on loopback: see the module doc.
pub struct Cluster {
    root: tempfile::TempDir,
    nodes: Vec<Node>,
    /// The `--cluster` value every node gets (`None`: independent nodes, each a cluster of one).
    voters: Option<String>,
    /// Flags every start of every node gets (after the harness's own, which they replace).
    common: Vec<String>,
}

impl Cluster {
    /// Starts `n` nodes that form one cluster (`--cluster` naming all of them), all spawned
    /// before any is waited for, and returns once each has logged `listening on` and
    /// [`Cluster::wait_for_controller`] holds (a controller agreed, every node alive): ready
    /// for topic creation. Panics (the drop printing every node's log) if that takes over 30 s.
    pub fn start(n: u64) -> Cluster {
        Cluster::start_with_args(n, &[])
    }

    /// [`Cluster::start`] with `args` added to every start of every node (e.g. shorter
    /// timeouts). A flag of the harness's own (`--listen`, `--node-id`, ...) among them replaces
    /// the harness's.
    pub fn start_with_args(n: u64, args: &[&str]) -> Cluster {
        let mut cluster = Cluster::new(n, true, args);
        cluster.start_all();
        cluster
    }

    /// [`Cluster::start`] with node `i` in namespace `i` of `net` (see the module doc), `args`
    /// added to every start as in [`Cluster::start_with_args`].
    pub fn start_in(net: &Net, n: u64, args: &[&str]) -> Cluster {
        assert!(
            n <= net.len(),
            "a net of {} nodes has no room for {n}",
            net.len()
        );
        let mut cluster = Cluster::new(n, false, args);
        for node in &mut cluster.nodes {
            node.host = net.ip(node.id);
            node.port = NETNS_PORT;
            node.advertise = Some(net.advertised(node.id, NETNS_PORT));
            node.netns = Some(net.namespace(node.id).to_string());
        }
        cluster.voters = Some(cluster.voter_list());
        cluster.start_all();
        cluster
    }

    /// `n` nodes of one cluster (as [`Cluster::start`]), none started yet: start them with
    /// [`Cluster::start_with`], [`Cluster::try_start_with`] or [`Cluster::start_all`].
    pub fn unstarted(n: u64) -> Cluster {
        Cluster::new(n, true, &[])
    }

    /// `n` unrelated nodes, each a cluster of one (`--node-id i`, no `--cluster`): the same
    /// process handling as [`Cluster::start`] for what a single node does today.
    pub fn start_independent(n: u64) -> Cluster {
        let mut cluster = Cluster::new(n, false, &[]);
        cluster.start_all();
        cluster
    }

    fn new(n: u64, joined: bool, common: &[&str]) -> Cluster {
        assert!(n >= 1, "a cluster has at least one node");
        let root = tempfile::Builder::new()
            .prefix("syncline-cluster")
            .tempdir()
            .expect("cluster root directory");
        // Hold every listener until all ports are known, so that no two nodes get the same.
        let listeners: Vec<TcpListener> = (0..n)
            .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port"))
            .collect();
        let nodes: Vec<Node> = listeners
            .iter()
            .zip(1..)
            .map(|(listener, id)| Node::new(root.path(), id, listener))
            .collect();
        drop(listeners);
        let mut cluster = Cluster {
            root,
            nodes,
            voters: None,
            common: common.iter().map(|s| s.to_string()).collect(),
        };
        if joined {
            cluster.voters = Some(cluster.voter_list());
        }
        cluster
    }

    /// `1=ADDRESS1,2=ADDRESS2,...`: the `--cluster` value naming every node.
    fn voter_list(&self) -> String {
        self.nodes
            .iter()
            .map(|node| format!("{}={}", node.id, node.advertised()))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// [`Cluster::wait_serving`] from synchronous code, inside a tokio runtime or not (on a
    /// thread of its own with its own runtime); its panic is this call's.
    fn block_until_serving(&mut self) {
        std::thread::scope(|scope| {
            let waiting = scope.spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime to wait in")
                    .block_on(self.wait_serving(SERVING_TIMEOUT))
            });
            if let Err(panic) = waiting.join() {
                std::panic::resume_unwind(panic);
            }
        });
    }

    /// Waits until the running nodes serve: in a cluster, [`Cluster::wait_for_controller`];
    /// independent nodes each name themselves controller and see themselves alive.
    pub async fn wait_serving(&mut self, timeout: Duration) {
        if self.voters.is_some() {
            self.wait_for_controller(timeout).await;
            return;
        }
        for id in self.running() {
            self.wait_for_description(id, timeout, |d| {
                d.controller == Some(id) && d.nodes.iter().any(|n| n.id == id && n.alive)
            })
            .await;
        }
    }

    /// Starts the nodes `ids`, all spawned before any is waited for.
    fn start_ids(&mut self, ids: &[u64]) {
        // Spawn all first: a node may wait for its peers before it serves.
        let offsets: Vec<u64> = ids.iter().map(|&id| self.spawn(id, &[])).collect();
        for (&id, offset) in ids.iter().zip(offsets) {
            if let Err(log) = self.await_ready(id, offset) {
                panic!("node {id} did not start:\n{log}");
            }
        }
    }

    /// The directory holding every node's directory.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// How many nodes (running or not).
    pub fn len(&self) -> u64 {
        self.nodes.len() as u64
    }

    /// Node `id` (1..=n).
    pub fn node(&self, id: u64) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .unwrap_or_else(|| panic!("no node {id} in a cluster of {}", self.nodes.len()))
    }

    fn node_mut(&mut self, id: u64) -> &mut Node {
        let n = self.nodes.len();
        self.nodes
            .iter_mut()
            .find(|node| node.id == id)
            .unwrap_or_else(|| panic!("no node {id} in a cluster of {n}"))
    }

    /// Whether node `id`'s process is running (the harness started it and it has not exited).
    pub fn is_running(&mut self, id: u64) -> bool {
        self.node_mut(id).is_running()
    }

    /// The ids of the nodes whose process is running.
    pub fn running(&mut self) -> Vec<u64> {
        self.nodes
            .iter_mut()
            .filter_map(|node| node.is_running().then_some(node.id))
            .collect()
    }

    /// Every node's address, comma-separated in id order: a bootstrap list for `--broker`,
    /// `SYNCLINE_BROKER` or [`Client::connect`].
    pub fn addresses(&self) -> String {
        self.nodes
            .iter()
            .map(Node::address)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The flags of a start of node `id`: the harness's own, then the common ones, then
    /// `extra`; a harness flag named in the common ones or in `extra` is left out.
    fn args(&self, id: u64, extra: &[&str]) -> Vec<String> {
        let node = self.node(id);
        let mut own = vec![
            ("--data-dir", node.data_dir().display().to_string()),
            ("--listen", node.address()),
            ("--advertise", node.advertised()),
            ("--metrics-listen", format!("{}:0", node.host)),
            ("--node-id", id.to_string()),
        ];
        match (&node.joins, &self.voters) {
            _ if node.bare => {}
            (Some(join), _) => own.push(("--join", join.clone())),
            (None, Some(voters)) => own.push(("--cluster", voters.clone())),
            (None, None) => {}
        }
        let given: Vec<&str> = self
            .common
            .iter()
            .map(String::as_str)
            .chain(extra.iter().copied())
            .filter(|arg| arg.starts_with("--"))
            .map(|arg| arg.split('=').next().unwrap_or(arg))
            .collect();
        // Nodes in network namespaces listen on their namespace's address, in plain text.
        let remote = !node
            .host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
        own.into_iter()
            .filter(|(flag, _)| !given.contains(flag))
            .flat_map(|(flag, value)| [flag.to_string(), value])
            .chain(remote.then(|| "--insecure-allow-remote".to_string()))
            .chain(self.common.iter().cloned())
            .chain(extra.iter().map(|s| s.to_string()))
            .collect()
    }

    /// Spawns node `id` with `extra` flags; returns where this start's lines begin in its log.
    fn spawn(&mut self, id: u64, extra: &[&str]) -> u64 {
        let args = self.args(id, extra);
        let node = self.node_mut(id);
        assert!(
            !node.is_running(),
            "node {id} is already running: stop or kill it first"
        );
        node.starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.log_path())
            .expect("open the node's log");
        writeln!(
            log,
            "=== harness: start {} of node {id}: syncline-broker {}",
            node.starts,
            args.join(" ")
        )
        .expect("write the node's log");
        let offset = log.metadata().expect("log metadata").len();
        let stdout = log.try_clone().expect("clone the log handle");
        let mut command = match &node.netns {
            Some(ns) => {
                let mut command = Command::new("ip");
                command
                    .args(["netns", "exec", ns])
                    .arg(binary("syncline-broker"));
                command
            }
            None => Command::new(binary("syncline-broker")),
        };
        let child = command
            .args(&args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(log)
            .spawn()
            .expect("spawn syncline-broker");
        node.process = Some(child);
        node.metrics = None;
        offset
    }

    /// Waits until node `id` logs `listening on` after `offset`; `Err` with what it logged if
    /// it exits first (then it is no longer running) or takes longer than [`START_TIMEOUT`]
    /// (then it is killed).
    fn await_ready(&mut self, id: u64, offset: u64) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        let node = self.node_mut(id);
        let path = node.log_path();
        loop {
            let text = read_from(&path, offset);
            for line in text.lines() {
                if let Some(rest) = line.split("metrics listening on ").nth(1) {
                    node.metrics = rest.split_whitespace().next().map(String::from);
                } else if line.contains("listening on ") {
                    node.served = true;
                    return Ok(());
                }
            }
            let child = node.process.as_mut().expect("spawned");
            if let Ok(Some(status)) = child.try_wait() {
                node.process = None;
                return Err(format!("{text}\n(exited: {status})"));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                node.process = None;
                return Err(format!(
                    "{text}\n(no `listening on` within {START_TIMEOUT:?}: killed)"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the stopped or killed (or not yet started) node `id`: same port, data directory
    /// and flags. Returns once it logs `listening on`: it may not have rejoined the controller
    /// yet (call [`Cluster::wait_for_controller`] for that).
    pub fn restart(&mut self, id: u64) {
        self.start_with(id, &[]);
    }

    /// Starts every node that is not running (all at first, or every stopped or killed one
    /// again): all are spawned before any is waited for, since a node may wait for its peers
    /// before it serves. Panics with a node's log if one does not start.
    ///
    /// A first start whose port another process took between the harness picking it and the
    /// node binding it (other tests run beside this one) is retried on new ports, with fresh
    /// data directories (the `--cluster` list names the ports), up to 3 times.
    pub fn start_all(&mut self) {
        for attempt in 1.. {
            let first_start = self
                .nodes
                .iter()
                .all(|node| !node.served && node.netns.is_none());
            let down: Vec<u64> = self
                .nodes
                .iter_mut()
                .filter_map(|node| (!node.is_running()).then_some(node.id))
                .collect();
            let offsets: Vec<u64> = down.iter().map(|&id| self.spawn(id, &[])).collect();
            let mut failed = None;
            for (&id, offset) in down.iter().zip(offsets) {
                if let Err(log) = self.await_ready(id, offset) {
                    failed = Some((id, log));
                    break;
                }
            }
            match failed {
                None => break,
                Some((_, log))
                    if first_start && attempt < 3 && log.contains("Address already in use") =>
                {
                    eprintln!(
                        "harness: a node's port was taken meanwhile; starting again on new ports"
                    );
                    self.fresh_ports();
                }
                Some((id, log)) => panic!("node {id} did not start:\n{log}"),
            }
        }
        self.block_until_serving();
    }

    /// Kills every node, empties their data directories and gives them new ports (and the
    /// `--cluster` list naming them): for a first start only.
    fn fresh_ports(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.process.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
            let _ = std::fs::remove_dir_all(node.data_dir());
        }
        let listeners: Vec<TcpListener> = (0..self.nodes.len())
            .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port"))
            .collect();
        for (node, listener) in self.nodes.iter_mut().zip(&listeners) {
            node.port = listener.local_addr().expect("local address").port();
        }
        drop(listeners);
        if self.voters.is_some() {
            self.voters = Some(self.voter_list());
        }
    }

    /// [`Cluster::start_all`] with flags of each node's own (`extra(id)`, replacing harness
    /// flags they name, as in [`Cluster::start_with`]) for this start only.
    pub fn start_all_with(&mut self, extra: impl Fn(u64) -> Vec<String>) {
        let down: Vec<u64> = self
            .nodes
            .iter_mut()
            .filter_map(|node| (!node.is_running()).then_some(node.id))
            .collect();
        let offsets: Vec<u64> = down
            .iter()
            .map(|&id| {
                let flags = extra(id);
                let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
                self.spawn(id, &flags)
            })
            .collect();
        for (&id, offset) in down.iter().zip(offsets) {
            if let Err(log) = self.await_ready(id, offset) {
                panic!("node {id} did not start:\n{log}");
            }
        }
        self.block_until_serving();
    }

    /// [`Cluster::restart`] with `extra` flags for this start only (a harness flag named in
    /// them, e.g. `--node-id`, replaces the harness's). Panics with the node's log if it does
    /// not start.
    pub fn start_with(&mut self, id: u64, extra: &[&str]) {
        if let Err(log) = self.try_start_with(id, extra) {
            panic!("node {id} did not start:\n{log}");
        }
    }

    /// [`Cluster::start_with`] for a start that may be refused: `Err` holds what the node logged
    /// before it exited (the refusal), and the node is then not running.
    pub fn try_start_with(&mut self, id: u64, extra: &[&str]) -> Result<(), String> {
        let offset = self.spawn(id, extra);
        self.await_ready(id, offset)
    }

    /// SIGTERM to node `id`, then waits for it to exit; returns whether it exited cleanly
    /// (status 0). Panics (after SIGKILL) if it takes longer than [`STOP_TIMEOUT`].
    pub fn stop(&mut self, id: u64) -> bool {
        let node = self.node_mut(id);
        let mut child = node
            .process
            .take()
            .unwrap_or_else(|| panic!("node {id} is not running"));
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return status.success(),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("node {id} did not exit within {STOP_TIMEOUT:?} of SIGTERM");
                }
            }
        }
    }

    /// SIGKILL to node `id` (kill -9: no shutdown at all), and reaps it.
    pub fn kill(&mut self, id: u64) {
        let node = self.node_mut(id);
        let mut child = node
            .process
            .take()
            .unwrap_or_else(|| panic!("node {id} is not running"));
        let _ = child.kill();
        let _ = child.wait();
    }

    /// SIGSTOP to node `id`: the process stays, but does nothing (no heartbeats, no answers;
    /// its connections stay open) until [`Cluster::resume`]. A paused node still counts as
    /// running.
    pub fn pause(&mut self, id: u64) {
        self.signal(id, libc::SIGSTOP);
    }

    /// SIGCONT to a node [`Cluster::pause`]d.
    pub fn resume(&mut self, id: u64) {
        self.signal(id, libc::SIGCONT);
    }

    fn signal(&mut self, id: u64, signal: libc::c_int) {
        let pid = self
            .node(id)
            .pid()
            .unwrap_or_else(|| panic!("node {id} is not running"));
        // SAFETY: a plain syscall naming a child process this harness spawned and still owns.
        let sent = unsafe { libc::kill(pid as libc::pid_t, signal) };
        assert_eq!(sent, 0, "signal {signal} to node {id}");
    }

    /// Starts every node that has served before and is not running (all spawned before any is
    /// waited for, so that nodes waiting for a quorum do not wait for each other), and returns
    /// once they serve as after [`Cluster::start`]: a full restart after [`Cluster::stop_all`]
    /// or [`Cluster::kill_all`].
    pub fn restart_all(&mut self) {
        let stopped: Vec<u64> = self
            .nodes
            .iter_mut()
            .filter_map(|node| (node.served && !node.is_running()).then_some(node.id))
            .collect();
        self.start_ids(&stopped);
        self.block_until_serving();
    }

    /// [`Cluster::stop`] of every running node, in id order; whether all exited cleanly.
    pub fn stop_all(&mut self) -> bool {
        let mut clean = true;
        for id in self.running() {
            clean &= self.stop(id);
        }
        clean
    }

    /// [`Cluster::kill`] of every running node.
    pub fn kill_all(&mut self) {
        for id in self.running() {
            self.kill(id);
        }
    }

    /// A node `n + 1` with its own port and data directory, not started and not in the
    /// `--cluster` list the others were given (it gets that same list when started): for a
    /// node the cluster does not know, or one that reuses another's id (`--node-id` among the
    /// extra flags of [`Cluster::try_start_with`]). Returns its id.
    pub fn add_node(&mut self) -> u64 {
        let id = self.len() + 1;
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
        let node = Node::new(self.root.path(), id, &listener);
        self.nodes.push(node);
        id
    }

    /// A new node `n + 1` that joins the running cluster through node `through` (`--join`,
    /// no `--cluster`; later starts too), started with `extra` flags: returns its id once it
    /// logs `listening on` (the controller may not see it alive yet). Panics if refused.
    pub fn join_node(&mut self, through: u64, extra: &[&str]) -> u64 {
        let id = self.add_node();
        let join = self.node(through).advertised();
        self.node_mut(id).joins = Some(join);
        self.start_with(id, extra);
        id
    }

    /// Starts the stopped node `id` without `--cluster` and `--join` (and so its later starts):
    /// a member of a cluster restarts from what its data directory recorded. Panics if refused.
    pub fn restart_bare(&mut self, id: u64) {
        self.node_mut(id).bare = true;
        self.start_with(id, &[]);
    }

    /// The copies of `topic`/`partition` to compare with `check_replicas`: first what the
    /// leaders served (`served`, every partition's records), then each node of `replicas` as
    /// its data directory holds it; an `Err` per copy that cannot be read.
    pub fn replica_copies(
        &self,
        topic: &str,
        partition: u32,
        replicas: &[u64],
        served: &[Seen],
    ) -> (Vec<Vec<Seen>>, Vec<String>) {
        let mut copies: Vec<Vec<Seen>> = vec![served
            .iter()
            .filter(|r| r.partition == partition)
            .cloned()
            .collect()];
        let mut unreadable = Vec::new();
        for &node in replicas {
            match super::workload::read_replica(&self.node(node).data_dir(), topic, partition) {
                Ok(records) => copies.push(records),
                Err(error) => unreadable.push(format!(
                    "{topic}/{partition} on node {node} cannot be read: {error}"
                )),
            }
        }
        (copies, unreadable)
    }

    /// Everything node `id` logged, over all its starts.
    pub fn logs(&self, id: u64) -> String {
        read_from(&self.node(id).log_path(), 0)
    }

    /// The last `lines` lines of node `id`'s log.
    pub fn log_tail(&self, id: u64, lines: usize) -> String {
        let logs = self.logs(id);
        let all: Vec<&str> = logs.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn all_log_tails(&self) -> String {
        self.nodes
            .iter()
            .map(|node| {
                format!(
                    "--- node {} ({}), last lines of {}:\n{}",
                    node.id,
                    node.address(),
                    node.log_path().display(),
                    self.log_tail(node.id, PANIC_LOG_LINES)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// A client of node `id` alone.
    pub async fn client(&self, id: u64) -> Client {
        let address = self.node(id).address();
        Client::connect(&address)
            .await
            .unwrap_or_else(|e| panic!("connect to node {id} at {address}: {e}"))
    }

    /// Creates `topic` with `partitions` partitions (the broker's other defaults) through node
    /// `id`; panics when refused.
    pub async fn create_topic(&self, id: u64, topic: &str, partitions: u32) -> TopicDescription {
        self.client(id)
            .await
            .create_topic(topic, TopicConfig::with_partitions(partitions))
            .await
            .unwrap_or_else(|e| panic!("create topic {topic} through node {id}: {e}"))
    }

    /// Creates `topic` with `partitions` partitions of `replicas` replicas through node `id`;
    /// panics when refused.
    pub async fn create_replicated(&self, id: u64, topic: &str, partitions: u32, replicas: u32) {
        self.client(id)
            .await
            .create_topic(
                topic,
                TopicConfig {
                    partitions: Some(partitions),
                    replication_factor: Some(replicas),
                    ..TopicConfig::default()
                },
            )
            .await
            .unwrap_or_else(|e| panic!("create topic {topic} through node {id}: {e}"));
    }

    /// Produces the records `k{n}` = `value` for every `n` of `keys` to `topic` through a
    /// client of the whole cluster (idempotent, acks durable) and waits (at most 30 s each)
    /// until every one is acknowledged; panics on a failed delivery.
    pub async fn produce_keys(&self, topic: &str, keys: std::ops::Range<u32>) {
        let client = self.cluster_client().await;
        let producer = client
            .producer(topic, syncline_client::ProducerConfig::default())
            .await
            .unwrap_or_else(|e| panic!("a producer of {topic}: {e}"));
        let mut pending = Vec::new();
        for n in keys {
            let key = format!("k{n}");
            let delivery = producer
                .enqueue(Some(key.as_bytes()), Some(b"value"), &[])
                .await
                .unwrap_or_else(|e| panic!("enqueue {key} to {topic}: {e}"));
            pending.push(delivery);
        }
        for delivery in pending {
            tokio::time::timeout(Duration::from_secs(30), delivery)
                .await
                .expect("acknowledged in time")
                .unwrap_or_else(|e| panic!("delivery to {topic}: {e}"));
        }
        producer.close().await;
    }

    /// A client bootstrapped from [`Cluster::addresses`].
    pub async fn cluster_client(&self) -> Client {
        Client::connect(&self.addresses())
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.addresses()))
    }

    /// A raw gRPC client of node `id` (64 MiB messages, as [`super::BrokerProcess::client`]).
    pub async fn grpc(&self, id: u64) -> BrokerClient<Channel> {
        BrokerClient::connect(self.node(id).url())
            .await
            .unwrap_or_else(|e| panic!("connect to node {id}: {e}"))
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024)
    }

    /// `DescribeCluster` as node `id` answers it.
    pub async fn describe(&self, id: u64) -> syncline_client::Result<ClusterDescription> {
        Client::connect(&self.node(id).address())
            .await?
            .describe_cluster()
            .await
    }

    /// Polls `DescribeCluster` on every running node until all name the same controller, one
    /// of the running nodes, and all see every running node alive (until then a create can be
    /// refused for want of live nodes); returns the controller's id. Panics with what each node
    /// said last (controller, alive node ids) after `timeout` (and the cluster's drop prints
    /// their logs).
    pub async fn wait_for_controller(&mut self, timeout: Duration) -> u64 {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let running = self.running();
            assert!(!running.is_empty(), "no node is running");
            let mut seen = Vec::with_capacity(running.len());
            for &id in &running {
                let answer = tokio::time::timeout(Duration::from_secs(2), self.describe(id)).await;
                seen.push(match answer {
                    Ok(Ok(description)) => {
                        let alive: Vec<u64> = description
                            .nodes
                            .iter()
                            .filter(|node| node.alive)
                            .map(|node| node.id)
                            .collect();
                        Ok((description.controller, alive))
                    }
                    Ok(Err(error)) => Err(error.to_string()),
                    Err(_) => Err("DescribeCluster took over 2 s".to_string()),
                });
            }
            if let Some(Ok((Some(first), _))) = seen.first() {
                // A stopped node is no controller, even while the others still name it; and a
                // node the controller has not yet seen alive gets no partitions.
                let agreed = seen.iter().all(|s| {
                    matches!(s, Ok((Some(c), alive))
                        if c == first && running.iter().all(|id| alive.contains(id)))
                });
                if running.contains(first) && agreed {
                    return *first;
                }
            }
            if tokio::time::Instant::now() > deadline {
                let said: Vec<String> = running
                    .iter()
                    .zip(&seen)
                    .map(|(id, s)| format!("node {id}: {s:?}"))
                    .collect();
                panic!(
                    "the running nodes did not agree on a controller within {timeout:?}:\n{}",
                    said.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Polls `DescribeCluster` on node `id` until `done` holds for its answer, and returns that
    /// answer (e.g. a topic placed, a node marked down). Panics with the last answer after
    /// `timeout`.
    pub async fn wait_for_description(
        &self,
        id: u64,
        timeout: Duration,
        done: impl Fn(&ClusterDescription) -> bool,
    ) -> ClusterDescription {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let answer = tokio::time::timeout(Duration::from_secs(2), self.describe(id)).await;
            let last = match answer {
                Ok(Ok(description)) if done(&description) => return description,
                Ok(Ok(description)) => format!("{description:#?}"),
                Ok(Err(error)) => error.to_string(),
                Err(_) => "DescribeCluster took over 2 s".to_string(),
            };
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "node {id}'s description did not get there within {timeout:?}; last:\n{last}"
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Runs the `syncline` CLI with `--broker` node `id`'s address, to its end.
    pub fn run_cli(&self, id: u64, args: &[&str]) -> Output {
        run_cli_at(&self.node(id).address(), args)
    }

    /// Runs the `syncline` CLI with `--broker` [`Cluster::addresses`], to its end.
    pub fn run_cli_bootstrap(&self, args: &[&str]) -> Output {
        run_cli_at(&self.addresses(), args)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.process.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if std::thread::panicking() {
            eprintln!("{}", self.all_log_tails());
            if std::env::var_os(KEEP_VAR).is_some() {
                // Swap in a throwaway directory so that the drop deletes that one instead.
                if let Ok(spare) = tempfile::tempdir() {
                    let kept = std::mem::replace(&mut self.root, spare).keep();
                    eprintln!(
                        "{KEEP_VAR} is set: kept the nodes' logs and data in {}",
                        kept.display()
                    );
                }
            }
        }
    }
}

/// `syncline --broker BROKER ARGS...`, run to its end.
pub fn run_cli_at(broker: &str, args: &[&str]) -> Output {
    Command::new(binary("syncline"))
        .args(["--broker", broker])
        .args(args)
        .output()
        .expect("run syncline")
}

/// The text of `path` from byte `offset` (empty when it cannot be read).
fn read_from(path: &Path, offset: u64) -> String {
    let mut bytes = Vec::new();
    if let Ok(mut file) = File::open(path) {
        if file.seek(SeekFrom::Start(offset)).is_ok() {
            let _ = file.read_to_end(&mut bytes);
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}
