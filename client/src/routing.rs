//! Where a [`Client`](crate::Client) sends each call in a cluster: the client's view of the
//! cluster and one connection per node.
//!
//! # The view
//!
//! Built from `DescribeCluster` when the client connects and again on a refresh: the nodes (id
//! -> advertised address, alive), each partition's leader, the controller, and each consumer
//! group's coordinator once `FindCoordinator` named it. Per-partition calls (produce, fetch,
//! subscribe, list offsets, get, history, snapshot) go to the partition's leader; group calls
//! to the group's coordinator; admin calls to the bootstrap node, failing over to the other
//! known nodes when its connection is lost.
//!
//! # Refresh
//!
//! - FAILED_PRECONDITION with a `NotLeader` detail naming a leader: the view takes that leader
//!   (partition, or group coordinator) and the call is retried there at once.
//! - `NotLeader` without a leader, a lost connection (a transport error or UNAVAILABLE), or a
//!   partition the view does not know (a topic created after the refresh): the view is marked
//!   stale and the call (or the next one) refreshes it with `DescribeCluster`, asking the
//!   bootstrap node and the other known nodes, the one that just failed last. A failed group
//!   call forgets the coordinator, so the next one asks `FindCoordinator` again.
//! - In a cluster of one there is nothing to refresh: a lost connection is left to the
//!   caller's retry policy, as before clusters.
//! - A per-request error on a `ProduceStream` carries no details: the producer takes a
//!   FAILED_PRECONDITION that is not a fence as a possible `NotLeader`, refreshes the view, and
//!   retries when the partition's leader changed.
//! - At most [`REDIRECTS_MAX`] immediate re-routes per call; then the caller's own retry policy
//!   (backoff, delivery or retry timeout) takes over, and its next attempt routes again.
//!
//! # Connections
//!
//! One tonic `Channel` per node, created on first use with the bootstrap connection's settings
//! (timeouts, keepalive, windows, message limits) and reused; a channel reconnects by itself.
//! The bootstrap connection serves its own node (same address) and every node of a cluster of
//! one, so a single broker costs one connection and one `DescribeCluster` at connect, as before.
//!
//! # Older brokers
//!
//! A broker that answers `DescribeCluster` (or `FindCoordinator`) with UNIMPLEMENTED predates
//! clusters: every call (or every group call) goes to the bootstrap connection, as before.

use std::collections::{BTreeMap, HashMap};
use std::error::Error as _;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};

use syncline_proto::error_details::not_leader;
use syncline_proto::v1::{self, broker_client::BrokerClient};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::address::BrokerAddress;
use crate::client::ClientConfig;
use crate::error::{Error, Result};

/// The generated gRPC client on one node's connection (with the client's credentials).
pub type Grpc = BrokerClient<Raw>;

/// One node's connection with the client's credentials, for calls framed by hand
/// (`ProduceStream` and `Fetch`: see `crate::wire_call`).
pub(crate) type Raw = tonic::service::interceptor::InterceptedService<Channel, Credentials>;

/// Adds the client's bearer token (if any) to every call as `authorization: Bearer TOKEN`.
#[derive(Clone, Default)]
pub struct Credentials {
    authorization: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("token", &self.authorization.is_some())
            .finish()
    }
}

impl Credentials {
    /// Credentials sending `token` (None: none).
    pub(crate) fn new(token: Option<&str>) -> Result<Credentials> {
        let authorization = match token {
            Some(token) => {
                let mut value: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
                    format!("Bearer {}", token.trim()).parse().map_err(|_| {
                        Error::InvalidConfig {
                            key: "token",
                            reason: "a token must be visible ASCII".to_owned(),
                        }
                    })?;
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };
        Ok(Credentials { authorization })
    }
}

impl tonic::service::Interceptor for Credentials {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> std::result::Result<tonic::Request<()>, Status> {
        if let Some(value) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// Immediate re-routes (a `NotLeader` naming another node, or a refreshed view pointing
/// elsewhere) of one call before its error goes to the caller's retry policy: a leader that
/// moves more often than this is still moving, and the caller's backoff is the better wait.
pub(crate) const REDIRECTS_MAX: u32 = 3;
/// The longest pause between retries while a partition's leader is gone or moving (a dead
/// leader is replaced 0.5-1 s after its death): a retry finds the new leader within this of
/// its election. Each retry costs a refused connect to the dead node and one DescribeCluster
/// of a live one, so 20 per second and producer while an election runs; at 100 ms the
/// measured failover (benches/replication.sh) sat on the retry grid, 50 ms later on average.
pub const LEADER_WAIT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(50);
/// How long a call keeps following a partition's or group's moving leadership (NotLeader
/// answers that do not lead anywhere new yet) before it returns the NotLeader.
pub(crate) const LEADER_MOVE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
/// The pause between those tries.
const LEADER_MOVE_BACKOFF: std::time::Duration = std::time::Duration::from_millis(100);

/// HTTP/2 flow-control windows: large enough that one stream can carry a full batch without
/// waiting for window updates (the defaults of 64 KiB throttle bulk produce and fetch).
const STREAM_WINDOW_BYTES: u32 = 8 * 1024 * 1024;
const CONNECTION_WINDOW_BYTES: u32 = 32 * 1024 * 1024;
/// The largest HTTP/2 frame the client accepts (the default is 16 KiB): room for a fetch of
/// the default 1 MiB and its fields in one frame.
const MAX_FRAME_BYTES: u32 = 2 * 1024 * 1024 + 64 * 1024;

/// The endpoint for `address` with the client's connection settings.
pub(crate) fn endpoint(address: &BrokerAddress, config: &ClientConfig) -> Result<Endpoint> {
    let uri = match &config.tls {
        Some(_) => format!("https://{}", address.authority),
        None => address.uri(),
    };
    let mut endpoint = Endpoint::from_shared(uri).map_err(|error| Error::InvalidAddress {
        address: address.authority.clone(),
        reason: error.to_string(),
    })?;
    if let Some(tls) = &config.tls {
        let mut settings = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&tls.ca_pem));
        if let Some((cert, key)) = &tls.identity {
            settings = settings.identity(tonic::transport::Identity::from_pem(cert, key));
        }
        if let Some(domain) = &tls.domain {
            settings = settings.domain_name(domain.clone());
        }
        endpoint = endpoint
            .tls_config(settings)
            .map_err(|error| Error::InvalidConfig {
                key: "tls",
                reason: error.to_string(),
            })?;
    }
    Ok(endpoint
        .connect_timeout(config.connect_timeout)
        .tcp_nodelay(true)
        // Fetched batches arrive in one DATA frame each (decoded without a copy:
        // `crate::wire_call`).
        .max_frame_size(MAX_FRAME_BYTES)
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .http2_keep_alive_interval(config.keepalive_interval)
        .keep_alive_timeout(config.keepalive_timeout)
        .keep_alive_while_idle(true))
}

/// The gRPC client on `channel` with the client's message limits.
pub(crate) fn grpc(channel: Channel, config: &ClientConfig) -> Grpc {
    BrokerClient::with_interceptor(channel, config.credentials.clone())
        .max_decoding_message_size(config.message_bytes_max)
        .max_encoding_message_size(config.message_bytes_max)
}

/// `channel` with the client's credentials, for calls framed by hand.
pub(crate) fn raw(channel: Channel, config: &ClientConfig) -> Raw {
    tonic::service::interceptor::InterceptedService::new(channel, config.credentials.clone())
}

/// One node's connection, as a call uses it.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub(crate) grpc: Grpc,
    /// The same connection, for calls framed by hand.
    pub(crate) raw: Raw,
    /// `host:port`, for errors.
    pub(crate) address: Arc<str>,
}

/// What a call is about, for routing it and reading its failures.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Target<'a> {
    /// A call for one partition: its leader.
    Partition(&'a str, u32),
    /// A group call: the group's coordinator.
    Group(&'a str),
}

/// A call that failed at `address`: the status as the node sent it (details included), for
/// callers that read more than the code. Converts into [`Error`] with `?`.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) status: Status,
    pub(crate) address: Arc<str>,
}

impl From<Failure> for Error {
    fn from(failure: Failure) -> Error {
        Error::from_status(&failure.address, failure.status)
    }
}

/// How the view took a failed call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Observed {
    /// A `NotLeader` named another node: retry there now.
    Redirected,
    /// The view may be wrong (lost connection, leader unknown): refresh, then route again.
    Stale,
    /// Nothing about routing: the error is the answer.
    Final,
}

/// Whether `status` says the connection to the node was lost (the transport made it up) or the
/// node is going away.
pub(crate) fn is_lost_connection(status: &Status) -> bool {
    status.source().is_some() || status.code() == Code::Unavailable
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Mode {
    /// No `DescribeCluster` answered yet: everything to the bootstrap node.
    #[default]
    Unknown,
    /// Route by the view.
    Routing,
    /// The broker predates clusters: everything to the bootstrap node, for good.
    Bootstrap,
}

#[derive(Debug)]
struct Member {
    address: Arc<str>,
    alive: bool,
    /// Created on first use.
    grpc: Option<(Grpc, Raw)>,
    /// Its address does not parse: calls go to the bootstrap node instead.
    unusable: bool,
}

#[derive(Debug, Default)]
struct View {
    mode: Mode,
    nodes: BTreeMap<u64, Member>,
    /// Per topic, per partition: the leading node, `None` while it has none. A map, not a
    /// vector indexed by partition: the partition numbers come from the servers' answers, and
    /// one absurd number (`u32::MAX`) must not allocate gigabytes.
    leaders: HashMap<String, HashMap<u32, Option<u64>>>,
    controller: Option<u64>,
    coordinators: HashMap<String, u64>,
    /// The broker answered `FindCoordinator` with UNIMPLEMENTED.
    no_find_coordinator: bool,
    /// The next routed call refreshes first.
    stale: bool,
    /// The node whose connection was lost last: asked last on a refresh.
    suspect: Option<Arc<str>>,
    /// Bumped by every refresh, so concurrent refreshes collapse into one.
    generation: u64,
}

/// The view and the connections; shared by a client and its clones.
#[derive(Debug)]
pub(crate) struct Router {
    config: ClientConfig,
    bootstrap: Node,
    view: Mutex<View>,
    refreshing: tokio::sync::Mutex<()>,
}

impl Router {
    pub(crate) fn new(config: ClientConfig, bootstrap: Node) -> Router {
        Router {
            config,
            bootstrap,
            view: Mutex::new(View::default()),
            refreshing: tokio::sync::Mutex::new(()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, View> {
        // Every update leaves the view consistent: a panic elsewhere cannot tear it.
        self.view
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn config(&self) -> &ClientConfig {
        &self.config
    }

    pub(crate) fn bootstrap(&self) -> &Node {
        &self.bootstrap
    }

    /// The connection to node `id`: the bootstrap one for its own address and in a cluster of
    /// one, else the node's own (created now if it is the first use).
    fn node(&self, view: &mut View, id: u64) -> Option<Node> {
        let single = view.nodes.len() <= 1;
        let member = view.nodes.get_mut(&id)?;
        if single || member.address == self.bootstrap.address || member.unusable {
            return Some(self.bootstrap.clone());
        }
        if member.grpc.is_none() {
            let endpoint = BrokerAddress::parse(&member.address)
                .and_then(|address| endpoint(&address, &self.config));
            match endpoint {
                Ok(endpoint) => {
                    let channel = endpoint.connect_lazy();
                    member.grpc = Some((
                        grpc(channel.clone(), &self.config),
                        raw(channel, &self.config),
                    ));
                }
                Err(error) => {
                    // The bootstrap node's answer (NotLeader, say) tells the caller the rest.
                    tracing::warn!(
                        node = id,
                        %error,
                        "unusable advertised address; sending its calls to the bootstrap node"
                    );
                    member.unusable = true;
                    return Some(self.bootstrap.clone());
                }
            }
        }
        let (grpc, raw) = member.grpc.clone()?;
        Some(Node {
            grpc,
            raw,
            address: member.address.clone(),
        })
    }

    /// Whether the view routes across more than one node (else everything goes to the
    /// bootstrap node and nothing needs a lookup).
    fn spans_nodes_in(view: &View) -> bool {
        view.mode == Mode::Routing && view.nodes.len() > 1
    }

    /// Whether the view routes across more than one node.
    pub(crate) fn spans_nodes(&self) -> bool {
        Router::spans_nodes_in(&self.lock())
    }

    /// Where `target` goes by the view as it is, without refreshing: `None` when the view
    /// does not know the partition or the coordinator.
    fn cached(&self, target: Target<'_>) -> Option<Node> {
        let mut view = self.lock();
        if !Router::spans_nodes_in(&view) {
            return Some(self.bootstrap.clone());
        }
        match target {
            Target::Partition(topic, partition) => {
                let leader = *view.leaders.get(topic)?.get(&partition)?;
                // No leader right now: the bootstrap node answers NotLeader, which the
                // caller's retry policy waits out.
                match leader {
                    Some(id) => self.node(&mut view, id),
                    None => Some(self.bootstrap.clone()),
                }
            }
            Target::Group(group) => {
                if view.no_find_coordinator {
                    return Some(self.bootstrap.clone());
                }
                let id = *view.coordinators.get(group)?;
                self.node(&mut view, id)
            }
        }
    }

    /// Where `target` goes by the view as it is; the bootstrap node when the view does not know
    /// it.
    fn cached_or_bootstrap(&self, target: Target<'_>) -> Node {
        self.cached(target)
            .unwrap_or_else(|| self.bootstrap.clone())
    }

    /// Where `target` goes: refreshes a stale view first, refreshes once for a partition the
    /// view does not know, asks `FindCoordinator` for a group whose coordinator it does not
    /// know. Falls back to the bootstrap node (whose answer says what is wrong).
    pub(crate) async fn route(&self, target: Target<'_>) -> Node {
        if self.lock().stale {
            // A failed refresh leaves the old view; the call then fails and is retried.
            let _ = self.refresh().await;
        }
        if let Some(node) = self.cached(target) {
            return node;
        }
        match target {
            Target::Partition(..) => {
                let _ = self.refresh().await;
            }
            Target::Group(group) => {
                let _ = self.find_coordinator(group).await;
            }
        }
        self.cached_or_bootstrap(target)
    }

    /// The nodes to try for a call any node answers: the bootstrap node first, then the other
    /// live nodes, the one that failed last at the end.
    pub(crate) fn any_nodes(&self) -> Vec<Node> {
        let mut view = self.lock();
        let mut nodes = vec![self.bootstrap.clone()];
        if !Router::spans_nodes_in(&view) {
            return nodes;
        }
        let suspect = view.suspect.clone();
        let ids: Vec<u64> = view
            .nodes
            .iter()
            .filter(|(_, member)| member.alive && member.address != self.bootstrap.address)
            .map(|(id, _)| *id)
            .collect();
        let mut last = Vec::new();
        for id in ids {
            if let Some(node) = self.node(&mut view, id) {
                if node.address == self.bootstrap.address {
                    // An unusable address, served by the bootstrap node: already listed.
                } else if Some(&node.address) == suspect.as_ref() {
                    last.push(node);
                } else {
                    nodes.push(node);
                }
            }
        }
        if suspect.as_ref() == Some(&self.bootstrap.address) {
            nodes.rotate_left(1);
        }
        nodes.extend(last);
        nodes
    }

    /// One connection per live node (the bootstrap one alone for a cluster of one or an older
    /// broker): for calls whose answer each node gives for its own share (ListGroups).
    pub(crate) fn every_node(&self) -> Vec<Node> {
        let mut nodes = self.any_nodes();
        nodes.sort_by(|a, b| a.address.cmp(&b.address));
        nodes.dedup_by(|a, b| a.address == b.address);
        nodes
    }

    /// Asks `DescribeCluster` of any node and replaces the view with the answer. Concurrent
    /// refreshes collapse into one. An UNIMPLEMENTED answer (a broker older than clusters)
    /// sends everything to the bootstrap node from then on.
    pub(crate) async fn refresh(&self) -> Result<()> {
        let seen = self.lock().generation;
        let _refreshing = self.refreshing.lock().await;
        if self.lock().generation != seen {
            return Ok(());
        }
        let answer = self
            .ask_any("DescribeCluster", |mut grpc| async move {
                grpc.describe_cluster(v1::DescribeClusterRequest {
                    replication_status: false,
                })
                .await
            })
            .await?;
        match answer {
            Some(cluster) => self.apply(cluster),
            None => {
                let mut view = self.lock();
                view.mode = Mode::Bootstrap;
                view.stale = false;
                view.generation += 1;
            }
        }
        Ok(())
    }

    /// Asks the nodes in [`Router::any_nodes`] order, each within the connect timeout, until
    /// one answers: a lost connection or no answer in time moves on to the next node, any
    /// other error is the answer. `None`: the node does not know the call (UNIMPLEMENTED).
    async fn ask_any<T, F, Fut>(&self, what: &str, mut call: F) -> Result<Option<T>>
    where
        F: FnMut(Grpc) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<T>, Status>>,
    {
        let mut last_error = None;
        for node in self.any_nodes() {
            let answer = tokio::time::timeout(self.config.connect_timeout, call(node.grpc.clone()));
            match answer.await {
                Ok(Ok(response)) => return Ok(Some(response.into_inner())),
                Ok(Err(status)) if status.code() == Code::Unimplemented => return Ok(None),
                Ok(Err(status)) if is_lost_connection(&status) => {
                    last_error = Some(Error::from_status(&node.address, status));
                }
                Ok(Err(status)) => return Err(Error::from_status(&node.address, status)),
                Err(_) => {
                    last_error = Some(Error::Unreachable {
                        address: node.address.to_string(),
                        reason: format!("no answer to {what} in time"),
                    });
                }
            }
        }
        Err(last_error.unwrap_or_else(|| Error::Unreachable {
            address: self.bootstrap.address.to_string(),
            reason: format!("no node to ask {what}"),
        }))
    }

    /// Replaces the view with a `DescribeCluster` answer (keeping the connections of nodes
    /// whose address did not change, and the known coordinators).
    pub(crate) fn apply(&self, cluster: v1::DescribeClusterResponse) {
        let mut view = self.lock();
        if view.mode == Mode::Bootstrap {
            return;
        }
        let mut old = std::mem::take(&mut view.nodes);
        for node in cluster.nodes {
            let address: Arc<str> = Arc::from(node.address.as_str());
            let grpc = old
                .remove(&node.id)
                .filter(|member| member.address == address)
                .and_then(|member| member.grpc);
            view.nodes.insert(
                node.id,
                Member {
                    address,
                    alive: node.alive,
                    grpc,
                    unusable: false,
                },
            );
        }
        view.leaders.clear();
        for placement in cluster.partitions {
            view.leaders
                .entry(placement.topic)
                .or_default()
                .insert(placement.partition, placement.leader);
        }
        view.controller = cluster.controller;
        view.mode = Mode::Routing;
        view.stale = false;
        view.suspect = None;
        view.generation += 1;
    }

    /// The controller leader's id, as of the last refresh.
    #[cfg(test)]
    pub(crate) fn controller(&self) -> Option<u64> {
        self.lock().controller
    }

    /// Asks any node which node coordinates `group` and remembers it.
    async fn find_coordinator(&self, group: &str) -> Result<()> {
        let request = v1::FindCoordinatorRequest {
            group: group.to_owned(),
        };
        let answer = self
            .ask_any("FindCoordinator", |mut grpc| {
                let request = request.clone();
                async move { grpc.find_coordinator(request).await }
            })
            .await?;
        let mut view = self.lock();
        match answer {
            Some(found) => {
                learn_node(&mut view, found.node_id, &found.address);
                view.coordinators.insert(group.to_owned(), found.node_id);
            }
            None => view.no_find_coordinator = true,
        }
        Ok(())
    }

    /// Takes what a failed call at `node` says about the view; see the module doc.
    pub(crate) fn observe(
        &self,
        address: &Arc<str>,
        status: &Status,
        target: Option<Target<'_>>,
    ) -> Observed {
        let mut view = self.lock();
        if view.mode == Mode::Bootstrap {
            return Observed::Final;
        }
        if let Some(detail) = not_leader(status) {
            let Some(leader) = detail.leader_id else {
                forget(&mut view, target);
                view.stale = true;
                return Observed::Stale;
            };
            learn_node(&mut view, leader, &detail.leader_address);
            match target {
                Some(Target::Group(group)) => {
                    view.coordinators.insert(group.to_owned(), leader);
                }
                // The detail names the partition (a stream carries many).
                Some(Target::Partition(..)) | None => {
                    view.leaders
                        .entry(detail.topic)
                        .or_default()
                        .insert(detail.partition, Some(leader));
                }
            }
            if view.mode != Mode::Routing {
                // Learnt from a NotLeader before any DescribeCluster answered: the next call
                // routes by a full view.
                view.stale = true;
            }
            let redirected = view
                .nodes
                .get(&leader)
                .is_some_and(|member| member.address != *address);
            return if redirected {
                Observed::Redirected
            } else {
                Observed::Stale
            };
        }
        if is_lost_connection(status) {
            forget(&mut view, target);
            drop(view);
            self.mark_stale(address);
            return Observed::Stale;
        }
        Observed::Final
    }

    /// Whether `status` is a NotLeader worth waiting out: routing by a cluster view, and the
    /// leader it names (if any) is a node this client can reach (so the answer will change
    /// once the election or the new leader's catch-up is over).
    fn leadership_moving(&self, status: &Status) -> bool {
        let Some(detail) = not_leader(status) else {
            return false;
        };
        let view = self.lock();
        if view.mode == Mode::Bootstrap {
            return false;
        }
        detail.leader_id.is_none_or(|leader| {
            view.nodes
                .get(&leader)
                .is_some_and(|member| !member.unusable)
        })
    }

    /// Whether `target` now routes to another node than the one at `address`.
    pub(crate) fn moved(&self, address: &Arc<str>, target: Target<'_>) -> bool {
        self.cached(target)
            .is_some_and(|now| now.address != *address)
    }

    /// Runs `call` on `target`'s node, following `NotLeader` answers and refreshing the view
    /// after a lost connection (at most [`REDIRECTS_MAX`] re-routes); any other failure is
    /// returned as it came. Also returns the address of the node that answered.
    pub(crate) async fn call<T, F, Fut>(
        &self,
        target: Target<'_>,
        mut call: F,
    ) -> std::result::Result<(T, Arc<str>), Failure>
    where
        F: FnMut(Grpc) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<T>, Status>>,
    {
        self.call_node(target, |node: Node| call(node.grpc)).await
    }

    /// [`Router::call`] with the node's whole connection (for calls framed by hand).
    pub(crate) async fn call_node<T, F, Fut>(
        &self,
        target: Target<'_>,
        mut call: F,
    ) -> std::result::Result<(T, Arc<str>), Failure>
    where
        F: FnMut(Node) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<T>, Status>>,
    {
        let mut redirects = 0;
        let started = std::time::Instant::now();
        loop {
            let node = self.route(target).await;
            let status = match call(node.clone()).await {
                Ok(response) => return Ok((response.into_inner(), node.address)),
                Err(status) => status,
            };
            let mut retry = redirects < REDIRECTS_MAX
                && match self.observe(&node.address, &status, Some(target)) {
                    Observed::Redirected => true,
                    Observed::Stale => self.relocate(&node, target).await,
                    Observed::Final => false,
                };
            // A replicated partition's leadership is moving (an election, or a leader that has
            // not caught up yet): wait for it, within a bound, instead of failing the call.
            if !retry && started.elapsed() < LEADER_MOVE_WAIT && self.leadership_moving(&status) {
                tokio::time::sleep(LEADER_MOVE_BACKOFF).await;
                let _ = self.refresh().await;
                if let Target::Group(group) = target {
                    let _ = self.find_coordinator(group).await;
                }
                redirects = 0;
                retry = true;
            }
            if !retry {
                return Err(Failure {
                    status,
                    address: node.address,
                });
            }
            redirects += 1;
        }
    }

    /// After a failure that made the view stale: refreshes it (and looks the group's
    /// coordinator up again); whether `target` now goes elsewhere than `node`.
    async fn relocate(&self, node: &Node, target: Target<'_>) -> bool {
        if self.lock().stale {
            let _ = self.refresh().await;
        }
        if let Target::Group(group) = target {
            if self.cached(target).is_none() {
                let _ = self.find_coordinator(group).await;
            }
        }
        self.moved(&node.address, target)
    }

    /// Runs `call` on any node: the bootstrap node, then each other known node while the
    /// connection is lost.
    pub(crate) async fn call_any<T, F, Fut>(&self, mut call: F) -> std::result::Result<T, Failure>
    where
        F: FnMut(Grpc) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<T>, Status>>,
    {
        let mut last = None;
        for node in self.any_nodes() {
            match call(node.grpc.clone()).await {
                Ok(response) => return Ok(response.into_inner()),
                Err(status) if status.source().is_some() => {
                    tracing::debug!(broker = %node.address, %status, "node unreachable");
                    self.mark_stale(&node.address);
                    last = Some(Failure {
                        status,
                        address: node.address,
                    });
                }
                Err(status) => {
                    return Err(Failure {
                        status,
                        address: node.address,
                    })
                }
            }
        }
        Err(last.unwrap_or_else(|| Failure {
            status: Status::unavailable("no broker node to call"),
            address: self.bootstrap.address.clone(),
        }))
    }

    /// The connection to `node` was lost: the next routed call refreshes the view, asking that
    /// node last. Pointless in a cluster of one (nothing else to ask, nowhere else to go).
    pub(crate) fn mark_stale(&self, address: &Arc<str>) {
        let mut view = self.lock();
        if Router::spans_nodes_in(&view) || view.mode == Mode::Unknown {
            view.stale = true;
            view.suspect = Some(address.clone());
        }
    }
}

/// Adds node `id` at `address` to the view (or moves it there); an empty address keeps what
/// the view knows.
fn learn_node(view: &mut View, id: u64, address: &str) {
    if address.is_empty() {
        return;
    }
    match view.nodes.get_mut(&id) {
        Some(member) if &*member.address == address => {}
        Some(member) => {
            member.address = Arc::from(address);
            member.grpc = None;
            member.unusable = false;
        }
        None => {
            view.nodes.insert(
                id,
                Member {
                    address: Arc::from(address),
                    alive: true,
                    grpc: None,
                    unusable: false,
                },
            );
        }
    }
}

/// Forgets where `target` goes, so the next call looks it up again.
fn forget(view: &mut View, target: Option<Target<'_>>) {
    if let Some(Target::Group(group)) = target {
        view.coordinators.remove(group);
    }
}
