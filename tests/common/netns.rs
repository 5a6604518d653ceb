//! Real network faults for the cluster tests (issue 15): every node in its own network
//! namespace, joined to the test's root namespace by a veth pair into one bridge.
//!
//! A [`Net`] of `n` nodes owns a bridge `slbPID_C` holding `10.X.Y.1/24` (so the test process,
//! in the root namespace, reaches every node), and per node `i` (1..=n) a namespace
//! `syncline-PID-C-i` whose `eth0` (the far end of the veth `slvPID_C_i`) holds `10.X.Y.(10+i)`,
//! with its loopback up. `PID` and the per-process counter `C` (hex) keep the names of tests
//! running in parallel apart (interface names are at most 15 characters); `10.X.Y.0/24` is
//! picked from them too, skipping a /24 some interface already holds.
//!
//! Faults between nodes are routes inside the namespaces: [`Net::partition`] adds, in every
//! node of one group, a `blackhole` route to every node of the other, both ways. Packets are
//! dropped silently as on a cut link (no reset: a connection stalls until its own timeouts);
//! the test process still reaches every node. Routes need no kernel module beyond what
//! namespaces need, unlike iptables or tc filters (the machines this runs on have neither).
//!
//! Every node also has a proxy address, `10.X.Y.(100+i)`, a secondary address of the bridge:
//! the cluster harness has node `i` advertise [`Net::advertised`] (so the other nodes dial it
//! there), and a task of the `Net`'s own thread accepts there and forwards to the node's real
//! address (the test process dials the real one). A cut blackholes both addresses of the far
//! node. [`Net::delay`] delays a node's links, both ways: with `tc netem` on both ends of its
//! veth where the kernel has netem (the first choice: it delays every packet), otherwise (as on
//! machines without any qdisc module) by the proxy: every chunk a proxied connection forwards,
//! either way, waits the delay of the node dialled plus that of the node dialling (known by the
//! connection's source address) before it is written on, in order. It says which it used.
//!
//! Dropping the `Net` deletes the namespaces (and with them the veth pairs) and the bridge,
//! also when a test panics; [`Net::new`] first deletes what a killed test process left.

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// Nets made by this process so far (for unique names).
static NETS: AtomicU32 = AtomicU32::new(0);

/// Prefix of every namespace a `Net` creates.
const NS_PREFIX: &str = "syncline-";

/// A bridge and one network namespace per node: see the module doc.
pub struct Net {
    bridge: String,
    /// `10.X.Y.` (with the trailing dot).
    subnet: String,
    namespaces: Vec<String>,
    /// The root namespace's end of each node's veth pair.
    veths: Vec<String>,
    /// Blackhole routes added by faults: (namespace, address).
    cuts: Mutex<Vec<(String, String)>>,
    /// The proxy delay of each node (index `i - 1`), in milliseconds.
    delays: Arc<Vec<AtomicU32>>,
    /// The proxies' thread, and what stops it.
    proxies: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
}

/// How [`Net::delay`] delays a node's links.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DelayBy {
    /// `tc netem` on its veth.
    Netem,
    /// The `Net`'s user-space proxy (no netem in this kernel).
    Proxy,
}

impl Net {
    /// Creates a bridge and `n` namespaces (nodes 1..=n). `Err` says why this machine cannot
    /// (not root, no `ip`, no namespaces): callers skip their test with it (see [`net_or_skip`]).
    pub fn new(n: u64) -> Result<Net, String> {
        // SAFETY: geteuid(2) has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not root: network namespaces need root".into());
        }
        if ip(&["-V"]).is_err() {
            return Err("no `ip` command (iproute2)".into());
        }
        remove_leftovers();
        let pid = std::process::id();
        let count = NETS.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{pid:x}_{count:x}");
        let mut net = Net {
            bridge: format!("slb{tag}"),
            subnet: free_subnet(pid, count)?,
            namespaces: Vec::new(),
            veths: Vec::new(),
            cuts: Mutex::new(Vec::new()),
            delays: Arc::new((0..n).map(|_| AtomicU32::new(0)).collect()),
            proxies: None,
        };
        // On an error, dropping `net` removes what was made so far.
        net.build(&tag, n)?;
        Ok(net)
    }

    fn build(&mut self, tag: &str, n: u64) -> Result<(), String> {
        let bridge = self.bridge.clone();
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        ip(&[
            "addr",
            "add",
            &format!("{}1/24", self.subnet),
            "dev",
            &bridge,
        ])?;
        ip(&["link", "set", &bridge, "up"])?;
        for i in 1..=n {
            let ns = format!("{NS_PREFIX}{}-{i}", tag.replace('_', "-"));
            ip(&["netns", "add", &ns])?;
            self.namespaces.push(ns.clone());
            let host = format!("slv{tag}_{i:x}");
            let peer = format!("slp{tag}_{i:x}");
            ip(&["link", "add", &host, "type", "veth", "peer", "name", &peer])?;
            self.veths.push(host.clone());
            ip(&["link", "set", &peer, "netns", &ns])?;
            ip(&["link", "set", &host, "master", &bridge])?;
            ip(&["link", "set", &host, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&["-n", &ns, "link", "set", &peer, "name", "eth0"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", self.ip(i)),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&[
                "addr",
                "add",
                &format!("{}/24", self.proxy_ip(i)),
                "dev",
                &bridge,
            ])?;
        }
        self.start_proxies(n)
    }

    /// Binds every node's proxy address (port [`PROXY_PORT`]) and serves them on a thread of
    /// its own (with its own runtime: a `Net` is made and dropped inside and outside tokio).
    fn start_proxies(&mut self, n: u64) -> Result<(), String> {
        let mut listeners = Vec::new();
        for i in 1..=n {
            let at = format!("{}:{PROXY_PORT}", self.proxy_ip(i));
            let listener = std::net::TcpListener::bind(&at)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .map_err(|e| format!("bind proxy {at}: {e}"))?;
            let target: SocketAddr = format!("{}:{PROXY_PORT}", self.ip(i))
                .parse()
                .map_err(|e| format!("node address: {e}"))?;
            listeners.push((i, listener, target));
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("proxy runtime: {e}"))?;
        let (stop, stopped) = oneshot::channel::<()>();
        let delays = self.delays.clone();
        let subnet = self.subnet.clone();
        let thread = std::thread::spawn(move || {
            runtime.block_on(async move {
                for (node, listener, target) in listeners {
                    let Ok(listener) = TcpListener::from_std(listener) else {
                        continue;
                    };
                    let proxy = Proxy {
                        node,
                        target,
                        delays: delays.clone(),
                        subnet: subnet.clone(),
                    };
                    tokio::spawn(proxy.serve(listener));
                }
                let _ = stopped.await;
            });
        });
        self.proxies = Some((stop, thread));
        Ok(())
    }

    /// How many nodes.
    pub fn len(&self) -> u64 {
        self.namespaces.len() as u64
    }

    /// Node `node`'s address (1..=n), e.g. `10.X.Y.11`.
    pub fn ip(&self, node: u64) -> String {
        format!("{}{}", self.subnet, 10 + node)
    }

    /// Node `node`'s proxy address (on the bridge), e.g. `10.X.Y.101`.
    pub fn proxy_ip(&self, node: u64) -> String {
        format!("{}{}", self.subnet, 100 + node)
    }

    /// Where the other nodes reach node `node` listening on `port`: its proxy, which forwards
    /// to `ip(node):port` (only [`PROXY_PORT`] is proxied).
    pub fn advertised(&self, node: u64, port: u16) -> String {
        assert_eq!(
            port, PROXY_PORT,
            "the proxy forwards port {PROXY_PORT} only"
        );
        format!("{}:{port}", self.proxy_ip(node))
    }

    /// The bridge's address: the test process's own on this network.
    pub fn bridge_ip(&self) -> String {
        format!("{}1", self.subnet)
    }

    /// Node `node`'s namespace, for `ip netns exec NAME ...`.
    pub fn namespace(&self, node: u64) -> &str {
        let index = node
            .checked_sub(1)
            .and_then(|i| self.namespaces.get(i as usize))
            .unwrap_or_else(|| panic!("no node {node} in a net of {}", self.len()));
        index
    }

    /// `Ok` when `tc netem` works here (tried on node 1's link, then removed); `Err` says why
    /// not, for a delay test to skip with.
    pub fn netem_available(&self) -> Result<(), String> {
        self.netem(1, 0)?;
        self.heal();
        Ok(())
    }

    /// Cuts every link between a node of `a` and a node of `b`, both ways (each node keeps its
    /// links within its group, and to the test process).
    pub fn partition(&self, a: &[u64], b: &[u64]) {
        for &x in a {
            for &y in b {
                self.cut(x, y);
                self.cut(y, x);
            }
        }
    }

    /// Cuts node `node` off from every other node (not from the test process).
    pub fn isolate(&self, node: u64) {
        let others: Vec<u64> = (1..=self.len()).filter(|&n| n != node).collect();
        self.partition(&[node], &others);
    }

    /// Undoes every cut and delay: all links up again.
    pub fn heal(&self) {
        let cuts = std::mem::take(&mut *self.cuts.lock().unwrap_or_else(|e| e.into_inner()));
        for (ns, address) in cuts {
            ip(&[
                "-n",
                &ns,
                "route",
                "del",
                "blackhole",
                &format!("{address}/32"),
            ])
            .unwrap_or_else(|e| panic!("heal: {e}"));
        }
        for delay in self.delays.iter() {
            delay.store(0, Ordering::Relaxed);
        }
        for node in 1..=self.len() {
            let _ = tc(&["qdisc", "del", "dev", &self.veth(node), "root"]);
            let _ = tc_in(
                self.namespace(node),
                &["qdisc", "del", "dev", "eth0", "root"],
            );
        }
    }

    /// Delays what node `node` exchanges with the others by `ms` milliseconds each way (a
    /// round trip to it takes `2 * ms` more): with `tc netem` where the kernel has it, else by
    /// the proxy (see the module doc); returns which. Undone by [`Net::heal`].
    pub fn delay(&self, node: u64, ms: u32) -> DelayBy {
        if self.netem(node, ms).is_ok() {
            return DelayBy::Netem;
        }
        self.veth(node); // panics on a node that is not there
        self.delays[node as usize - 1].store(ms, Ordering::Relaxed);
        DelayBy::Proxy
    }

    /// `tc netem` delay of `ms` on both ends of node `node`'s link. `Err` when the kernel has
    /// no netem; nothing changed then.
    fn netem(&self, node: u64, ms: u32) -> Result<(), String> {
        let delay = format!("{ms}ms");
        let netem = ["root", "netem", "delay", delay.as_str()];
        let veth = self.veth(node);
        let outward: Vec<&str> = ["qdisc", "replace", "dev", &veth]
            .into_iter()
            .chain(netem)
            .collect();
        tc(&outward).map_err(|e| format!("tc netem is unavailable here: {e}"))?;
        let inward: Vec<&str> = ["qdisc", "replace", "dev", "eth0"]
            .into_iter()
            .chain(netem)
            .collect();
        tc_in(self.namespace(node), &inward).map(drop)
    }

    /// Adds blackhole routes to both of `to`'s addresses (its own and its proxy's) inside
    /// `from`'s namespace.
    fn cut(&self, from: u64, to: u64) {
        let mut cuts = self.cuts.lock().unwrap_or_else(|e| e.into_inner());
        for address in [self.ip(to), self.proxy_ip(to)] {
            let entry = (self.namespace(from).to_string(), address);
            if cuts.contains(&entry) {
                continue;
            }
            ip(&[
                "-n",
                &entry.0,
                "route",
                "add",
                "blackhole",
                &format!("{}/32", entry.1),
            ])
            .unwrap_or_else(|e| panic!("cut {from} -> {to}: {e}"));
            cuts.push(entry);
        }
    }

    /// The root namespace's end of node `node`'s veth pair.
    fn veth(&self, node: u64) -> String {
        self.namespace(node); // panics on a node that is not there
        self.veths[node as usize - 1].clone()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        if let Some((stop, thread)) = self.proxies.take() {
            let _ = stop.send(());
            let _ = thread.join();
        }
        for ns in &self.namespaces {
            let _ = ip(&["netns", "del", ns]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

/// The one port the proxies forward (the cluster harness's `NETNS_PORT`).
pub const PROXY_PORT: u16 = 9092;

/// Node `node`'s proxy: forwards connections to `target`, delaying them.
struct Proxy {
    node: u64,
    target: SocketAddr,
    delays: Arc<Vec<AtomicU32>>,
    /// `10.X.Y.`: a connection from `10.X.Y.(10+j)` comes from node `j`.
    subnet: String,
}

impl Proxy {
    async fn serve(self, listener: TcpListener) {
        let proxy = Arc::new(self);
        loop {
            let Ok((inbound, from)) = listener.accept().await else {
                // e.g. out of descriptors: do not spin
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            tokio::spawn(proxy.clone().forward(inbound, from));
        }
    }

    /// The delay now of a chunk between node `from_node` (0: not a node) and this one.
    fn delay(&self, from_node: u64) -> Duration {
        let of = |node: u64| {
            node.checked_sub(1)
                .and_then(|i| self.delays.get(i as usize))
                .map_or(0, |d| d.load(Ordering::Relaxed))
        };
        Duration::from_millis(u64::from(of(self.node)) + u64::from(of(from_node)))
    }

    async fn forward(self: Arc<Self>, inbound: TcpStream, from: SocketAddr) {
        let from_node = match from.ip() {
            IpAddr::V4(v4) if v4.to_string().starts_with(&self.subnet) => {
                u64::from(v4.octets()[3]).saturating_sub(10)
            }
            _ => 0,
        };
        let Ok(outbound) = TcpStream::connect(self.target).await else {
            return; // dropping `inbound` refuses it, as the node would
        };
        let _ = inbound.set_nodelay(true);
        let _ = outbound.set_nodelay(true);
        let (in_read, in_write) = inbound.into_split();
        let (out_read, out_write) = outbound.into_split();
        tokio::spawn(self.clone().pipe(in_read, out_write, from_node));
        tokio::spawn(self.pipe(out_read, in_write, from_node));
    }

    /// Copies `from` to `to`, each chunk written once its delay (as of its reading) is over,
    /// in order; shuts `to` down at `from`'s end.
    async fn pipe(self: Arc<Self>, mut from: OwnedReadHalf, mut to: OwnedWriteHalf, node: u64) {
        let (queue, mut queued) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
        let writer = tokio::spawn(async move {
            while let Some((due, chunk)) = queued.recv().await {
                tokio::time::sleep_until(due).await;
                if to.write_all(&chunk).await.is_err() {
                    return;
                }
            }
            let _ = to.shutdown().await;
        });
        let mut buffer = vec![0; 64 * 1024];
        loop {
            match from.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let due = Instant::now() + self.delay(node);
                    if queue.send((due, buffer[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
        drop(queue);
        let _ = writer.await;
    }
}

/// A `Net` of `n` nodes, or `None` after printing why this machine cannot make one: the test
/// then returns early, a skip (CI runs as root, where it runs).
pub fn net_or_skip(test: &str, n: u64) -> Option<Net> {
    match Net::new(n) {
        Ok(net) => Some(net),
        Err(why) => {
            eprintln!("SKIPPED {test}: network namespaces unavailable: {why}");
            None
        }
    }
}

/// Runs `ip ARGS...`; `Err` with its stderr when it fails.
fn ip(args: &[&str]) -> Result<String, String> {
    run("ip", args)
}

/// Runs `tc ARGS...` in the root namespace.
fn tc(args: &[&str]) -> Result<String, String> {
    run("tc", args)
}

/// Runs `tc ARGS...` inside namespace `ns`.
fn tc_in(ns: &str, args: &[&str]) -> Result<String, String> {
    let full: Vec<&str> = ["netns", "exec", ns, "tc"]
        .into_iter()
        .chain(args.iter().copied())
        .collect();
    run("ip", &full)
}

fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("`{program}` did not run: {e}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// `10.X.Y.` for a net of this process: X in 64..=127, Y any, from the pid and the counter,
/// skipping a /24 an interface of the root namespace already has an address in.
fn free_subnet(pid: u32, count: u32) -> Result<String, String> {
    let taken = ip(&["-4", "-o", "addr", "show"])?;
    let start = pid.wrapping_mul(16).wrapping_add(count);
    for step in 0..(64 * 256) {
        let slot = start.wrapping_add(step) % (64 * 256);
        let subnet = format!("10.{}.{}.", 64 + slot / 256, slot % 256);
        if !taken.contains(&format!(" {subnet}")) {
            return Ok(subnet);
        }
    }
    Err("no free 10.64-127.x.0/24 subnet".into())
}

/// Deletes the namespaces and bridges of `Net`s whose process is gone (a killed test run).
fn remove_leftovers() {
    let Ok(list) = ip(&["netns", "list"]) else {
        return;
    };
    for ns in list
        .lines()
        .filter_map(|line| line.split_whitespace().next())
    {
        let Some(rest) = ns.strip_prefix(NS_PREFIX) else {
            continue;
        };
        let mut parts = rest.split('-');
        let (Some(pid), Some(count)) = (parts.next(), parts.next()) else {
            continue;
        };
        let Ok(pid_number) = u32::from_str_radix(pid, 16) else {
            continue;
        };
        if std::path::Path::new(&format!("/proc/{pid_number}")).exists() {
            continue;
        }
        let _ = ip(&["netns", "del", ns]);
        let _ = ip(&["link", "del", &format!("slb{pid}_{count}")]);
    }
}
