//! The controller: one openraft group over the initial voters (`--cluster`, later changed by
//! `membership`) and the nodes that joined as learners, that orders every metadata change, and
//! the node-side work around it.
//!
//! - **Bootstrap.** Every initial voter initializes the group with the same voter list (openraft
//!   accepts identical initialization on each node); a node whose log already holds the
//!   membership skips it. A restarted node rejoins by itself: its vote and log are on disk.
//! - **Proposals.** [`Controller::propose`] writes a command through openraft on the leader; on
//!   another node it forwards it to the leader (`Peer.Propose`) and retries while an election
//!   runs, up to [`PROPOSE_TIMEOUT`]. It returns once the command is applied on this node and
//!   the node's local partitions follow it ([`Controller::wait_reconciled`]).
//! - **Liveness.** Every node sends `Peer.Heartbeat` to the leader each [`HEARTBEAT_INTERVAL`];
//!   the leader proposes `RegisterNode` for a node it hears from that the metadata has not (or
//!   has down, or at another address), and `MarkDown` for a live node silent for
//!   [`NODE_SESSION_TIMEOUT`] (counted from when it became leader, so a new leader does not
//!   mark everyone down). Heartbeats themselves are not logged: an idle cluster writes nothing.
//! - **Moves and preferred leaders.** Each tick the partition moves this node leads are
//!   driven (`moves`), and every 5 s leaderships go back to their preferred replicas
//!   (`replication::preferred`).
//! - **Internal topics.** The leader creates `__offsets` once every initial voter registered
//!   (or [`OFFSETS_CREATE_GRACE`] after it became leader, over the live ones).
//!
//! It may call `cluster::*`, `topic::Registry` (through [`super::reconcile`]) and `error`;
//! openraft types stay inside `cluster/`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

// tokio's clock (not std's): the same in production, and simulated time under the simulator.
use tokio::time::Instant;

use openraft::error::{ClientWriteError, InitializeError, RaftError};
use openraft::{BasicNode, SnapshotPolicy};
use syncline_proto::v1;
use tokio::sync::watch;

use super::log_store::LogStore;
use super::metadata::{Command, Metadata, MetadataError};
use super::network::{NetworkFactory, Peers};
use super::raft::{MetadataView, Outcome, Raft, StateMachine};
use crate::error::BrokerError;

/// How often a node heartbeats the controller leader (and the leader checks liveness).
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(1000);
/// A node silent this long is marked down.
pub const NODE_SESSION_TIMEOUT: Duration = Duration::from_millis(6000);
/// How long the leader may take to confirm a read index.
const READ_INDEX_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a proposal may wait for a leader and its commit.
pub const PROPOSE_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a new leader waits for every initial voter before it creates `__offsets` over the
/// nodes that are live.
pub const OFFSETS_CREATE_GRACE: Duration = Duration::from_secs(10);
/// Raft timings (ms): the leader's heartbeat, and the election timeout range. A dead leader is
/// replaced within about the election timeout.
const RAFT_HEARTBEAT_MS: u64 = 250;
const ELECTION_TIMEOUT_MIN_MS: u64 = 1000;
const ELECTION_TIMEOUT_MAX_MS: u64 = 2000;
/// Entries between controller snapshots, and entries kept before the last snapshot (few in
/// unit tests, so the simulator exercises snapshots, purges and snapshot installs).
const SNAPSHOT_EVERY: u64 = if cfg!(test) { 40 } else { 1000 };
const SNAPSHOT_KEEP: u64 = if cfg!(test) { 10 } else { 100 };

/// The controller directory inside the data directory.
pub const CONTROLLER_DIR: &str = ".controller";

/// What a node needs to know to create an internal topic the leader decided on.
/// Given a partition count, it gives the topic's (incarnation id, settings text, replication
/// factor).
pub type InternalTopic =
    Box<dyn Fn(u32) -> Result<(String, String, u32), BrokerError> + Send + Sync>;

/// This node's part of the controller.
pub struct Controller {
    raft: Raft,
    view: Arc<MetadataView>,
    me: u64,
    cluster_id: String,
    address: String,
    /// This node's data directory id.
    dir_id: String,
    voters: BTreeMap<u64, String>,
    peers: Peers,
    /// Leader side: when each node was last heard from, at which address, from which data
    /// directory.
    heard: parking_lot::Mutex<HashMap<u64, Heard>>,
    /// Set when this node must stop (its node id belongs to another data directory, or the
    /// controller's storage failed).
    fatal: watch::Sender<Option<String>>,
    /// Topics whose local copy the last reconcile pass could not make follow the metadata,
    /// with why.
    failed: parking_lot::Mutex<BTreeMap<String, String>>,
    /// Leader side: since when this node leads (None while it does not).
    leading_since: parking_lot::Mutex<Option<Instant>>,
    /// The applied index the local partitions have caught up with (set by the reconciler).
    reconciled: watch::Sender<u64>,
    /// Builds `__offsets`' (name, settings) for a partition count.
    offsets_topic: InternalTopic,
    /// This node's replicated-partition groups.
    replicas: Arc<crate::replication::Replicas>,
    /// The partition moves this node drives.
    movers: super::moves::Movers,
    /// Copies of single-replica partitions moving here, and fences of those moving away.
    copies: super::copy::Copies,
    /// The topic registry (set once the server starts; the copies of single replicas read
    /// and write partitions through it).
    registry: std::sync::OnceLock<Arc<crate::topic::Registry>>,
}

/// Why a proposal handed to the leader did not come back applied.
enum Forwarded {
    /// Worth another try (no leader yet, the leader moved or did not answer).
    Retry(String),
    /// Refused for good.
    Refused(BrokerError),
}

/// What the leader last heard from a node.
#[derive(Debug, Clone)]
struct Heard {
    at: Instant,
    address: String,
    dir_id: String,
}

fn controller_error(message: impl Into<String>) -> BrokerError {
    BrokerError::Controller(message.into())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Controller {
    /// Opens the controller's storage under `data_dir` and starts this node's Raft.
    pub async fn start(
        data_dir: &Path,
        identity: &super::identity::Identity,
        address: String,
        voters: BTreeMap<u64, String>,
        offsets_topic: InternalTopic,
        settings: crate::replication::group::GroupSettings,
        tls: Option<crate::config::TlsFiles>,
    ) -> Result<Arc<Controller>, BrokerError> {
        Self::start_with(
            data_dir,
            identity,
            address,
            voters,
            offsets_topic,
            Peers::with_tls(tls),
            settings,
        )
        .await
    }

    /// Drops the channels to the other nodes (they reconnect with the certificates read again).
    pub fn reset_peer_channels(&self) {
        self.peers.reset();
    }

    /// [`Controller::start`] reaching the other nodes through `peers` (the simulator's seam).
    pub async fn start_with(
        data_dir: &Path,
        identity: &super::identity::Identity,
        address: String,
        voters: BTreeMap<u64, String>,
        offsets_topic: InternalTopic,
        peers: Peers,
        settings: crate::replication::group::GroupSettings,
    ) -> Result<Arc<Controller>, BrokerError> {
        let me = identity.node_id;
        let cluster_id = identity.cluster_id.clone();
        // Before this node takes part in any vote: a node id already registered by another
        // data directory is refused (a voter that lost its log must not count in a quorum).
        check_node_id(&peers, &cluster_id, me, &address, &identity.dir_id, &voters).await?;
        let dir = data_dir.join(CONTROLLER_DIR);
        let log = LogStore::open(&dir).map_err(|e| BrokerError::io("opening", &dir, e))?;
        let state_machine =
            StateMachine::open(&dir).map_err(|e| BrokerError::io("opening", &dir, e))?;
        let view = state_machine.view();
        let config = openraft::Config {
            cluster_name: cluster_id.clone(),
            heartbeat_interval: RAFT_HEARTBEAT_MS,
            election_timeout_min: ELECTION_TIMEOUT_MIN_MS,
            election_timeout_max: ELECTION_TIMEOUT_MAX_MS,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(SNAPSHOT_EVERY),
            max_in_snapshot_log_to_keep: SNAPSHOT_KEEP,
            // A node returning from a partition asks before it bumps the term, so it does not
            // depose a healthy leader.
            enable_pre_vote: Some(true),
            ..Default::default()
        }
        .validate()
        .map_err(|e| controller_error(format!("controller settings: {e}")))?;
        let network = NetworkFactory {
            cluster_id: cluster_id.clone(),
            me,
            peers: peers.clone(),
        };
        let raft = Raft::new(me, Arc::new(config), network, log, state_machine)
            .await
            .map_err(|e| controller_error(format!("starting the controller: {e}")))?;
        let initialized = raft
            .is_initialized()
            .await
            .map_err(|e| controller_error(format!("starting the controller: {e}")))?;
        // A node that joins (not among the voters the cluster was formed with) waits for the
        // leader to add it.
        if !initialized && voters.contains_key(&me) {
            let members: BTreeMap<u64, BasicNode> = voters
                .iter()
                .map(|(id, addr)| (*id, BasicNode { addr: addr.clone() }))
                .collect();
            match raft.initialize(members).await {
                Ok(()) | Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {}
                Err(error) => {
                    return Err(controller_error(format!(
                        "initializing the controller with voters {voters:?}: {error}"
                    )))
                }
            }
            tracing::info!(?voters, "controller initialized with its voters");
        }
        let applied = view.applied();
        let addresses: crate::replication::group::Addresses = {
            let view = view.clone();
            let voters = voters.clone();
            Arc::new(move |node| {
                view.with(|m| m.nodes.get(&node).map(|n| n.address.clone()))
                    .or_else(|| voters.get(&node).cloned())
            })
        };
        let replicas = Arc::new(crate::replication::Replicas::new(
            crate::replication::group::GroupContext {
                me,
                cluster_id: cluster_id.clone(),
                peers: peers.clone(),
                addresses,
                settings,
                throttle: Arc::default(),
            },
        ));
        Ok(Arc::new(Controller {
            raft,
            view,
            me,
            cluster_id,
            address,
            dir_id: identity.dir_id.clone(),
            voters,
            peers,
            heard: parking_lot::Mutex::new(HashMap::new()),
            fatal: watch::channel(None).0,
            failed: parking_lot::Mutex::new(BTreeMap::new()),
            leading_since: parking_lot::Mutex::new(None),
            reconciled: watch::channel(applied).0,
            offsets_topic,
            replicas,
            movers: super::moves::Movers::default(),
            copies: super::copy::Copies::default(),
            registry: std::sync::OnceLock::new(),
        }))
    }

    /// This node's Raft metrics (term, role, log, fatal errors): for the simulator's checks.
    #[cfg(test)]
    pub(crate) fn raft_metrics(&self) -> openraft::RaftMetrics<super::raft::TypeConfig> {
        use openraft::async_runtime::WatchReceiver as _;
        self.raft.metrics().borrow_watched().clone()
    }

    /// Reports the partition leaderships this node wins to the metadata (clients route by it),
    /// a batch at a time, retried until committed or superseded.
    async fn report_leaders(
        self: Arc<Self>,
        mut changes: tokio::sync::mpsc::UnboundedReceiver<super::metadata::LeaderChange>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            let first = tokio::select! {
                change = changes.recv() => match change { Some(c) => c, None => break },
                _ = shutdown.changed() => break,
            };
            // Elections after a node failure come in a burst: one command for all of them.
            tokio::time::sleep(Duration::from_millis(20)).await;
            let mut batch = vec![first];
            while let Ok(change) = changes.try_recv() {
                batch.push(change);
            }
            loop {
                let command = Command::PartitionLeaders {
                    changes: batch.clone(),
                };
                match self.propose(command).await {
                    Ok(_) => break,
                    Err(error) => {
                        tracing::debug!(%error, "reporting partition leaders failed; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                            _ = shutdown.changed() => return,
                        }
                    }
                }
            }
        }
    }

    /// Before this node stops (SIGTERM): hands its partition leaderships to caught-up
    /// followers (`replication::handoff`), then the controller's leadership to another live
    /// voter, each bounded by `timeout`, so that a rolling restart waits for no election.
    pub async fn hand_off(&self, timeout: Duration) {
        use openraft::async_runtime::WatchReceiver as _;
        let metadata = self.metadata();
        let alive = |node: u64| metadata.nodes.get(&node).is_some_and(|n| n.alive);
        let replicas_of = |group: &crate::replication::group::Group| {
            let id = group.id();
            metadata
                .partition_by_id(&id.topic_id, id.partition)
                .map(|p| p.replicas.clone())
                .unwrap_or_default()
        };
        let partitions = self.replicas.hand_off(&alive, &replicas_of, timeout).await;
        if partitions.led > 0 {
            tracing::info!(
                led = partitions.led,
                moved = partitions.moved,
                no_caught_up_follower = partitions.no_target,
                "handed off partition leaderships before stopping"
            );
        }
        if self.leader() != Some(self.me) {
            return;
        }
        let (voters, _) = self.membership();
        let Some(to) = voters.iter().copied().find(|node| {
            *node != self.me
                && alive(*node)
                && self.replicas.liveness.answered_within(
                    *node,
                    crate::replication::handoff::REACHABLE_WITHIN,
                    std::time::Instant::now(),
                )
        }) else {
            return;
        };
        if let Err(fatal) = self.raft.trigger().transfer_leader(to).await {
            tracing::warn!(%fatal, "cannot hand off the controller's leadership");
            return;
        }
        let mut metrics = self.raft.metrics();
        let me = self.me;
        let moved = tokio::time::timeout(timeout, async {
            loop {
                let leader = metrics.borrow_watched().current_leader;
                if leader.is_some_and(|l| l != me) {
                    return;
                }
                if metrics.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        match moved {
            Ok(()) => tracing::info!(to, "handed off the controller's leadership before stopping"),
            Err(_) => tracing::warn!(
                to,
                "controller leadership not handed off in time: an election follows the stop"
            ),
        }
    }

    /// Hands the leaderships this node holds but does not prefer to their preferred replicas
    /// (`replication::preferred`); partitions that move are left alone.
    async fn restore_preferred_leaders(&self) {
        let metadata = self.metadata();
        let alive = |node: u64| metadata.nodes.get(&node).is_some_and(|n| n.alive);
        let preferred_of = |group: &crate::replication::group::Group| {
            let id = group.id();
            metadata
                .partition_by_id(&id.topic_id, id.partition)
                .filter(|p| p.moving.is_none())
                .and_then(|p| p.replicas.first().copied())
        };
        self.replicas.restore_preferred(&alive, &preferred_of).await;
    }

    /// The partition moves this node drives.
    pub fn movers(&self) -> &super::moves::Movers {
        &self.movers
    }

    /// The copies of single-replica partitions this node runs.
    pub fn copies(&self) -> &super::copy::Copies {
        &self.copies
    }

    /// Hands the controller the topic registry (once, when the server starts).
    pub fn attach_registry(&self, registry: Arc<crate::topic::Registry>) {
        let _ = self.registry.set(registry);
    }

    /// The topic registry, once attached.
    pub fn registry(&self) -> Option<&Arc<crate::topic::Registry>> {
        self.registry.get()
    }

    /// A client of another node's Peer service.
    pub fn peer_client(
        &self,
        address: &str,
    ) -> Result<syncline_proto::v1::peer_client::PeerClient<tonic::transport::Channel>, BrokerError>
    {
        self.peers.client(address).map_err(controller_error)
    }

    /// The controller's openraft handle (membership changes: `membership`).
    pub(crate) fn raft(&self) -> &Raft {
        &self.raft
    }

    /// The voters the cluster was formed with (`--cluster`, or recorded when this node
    /// joined), id -> address.
    pub fn formed_by(&self) -> &BTreeMap<u64, String> {
        &self.voters
    }

    /// This node's replicated-partition groups.
    pub fn replicas(&self) -> &Arc<crate::replication::Replicas> {
        &self.replicas
    }

    /// This node's id.
    pub fn node_id(&self) -> u64 {
        self.me
    }

    /// The cluster's id.
    pub fn cluster_id(&self) -> &str {
        &self.cluster_id
    }

    /// The applied metadata.
    pub fn view(&self) -> &Arc<MetadataView> {
        &self.view
    }

    /// A copy of the applied metadata.
    pub fn metadata(&self) -> Metadata {
        self.view.get()
    }

    /// The controller leader, when known.
    pub fn leader(&self) -> Option<u64> {
        use openraft::async_runtime::WatchReceiver as _;
        self.raft.metrics().borrow_watched().current_leader
    }

    /// A node's advertised address: from the metadata, else from the voter list.
    pub fn address_of(&self, node: u64) -> Option<String> {
        self.view
            .with(|m| m.nodes.get(&node).map(|n| n.address.clone()))
            .or_else(|| self.membership().1.get(&node).cloned())
            .or_else(|| self.voters.get(&node).cloned())
    }

    /// The channel to another node (its Broker service), for calls fanned out across nodes.
    pub fn channel_to(&self, address: &str) -> Result<tonic::transport::Channel, BrokerError> {
        self.peers.channel(address).map_err(controller_error)
    }

    /// Reports that a reconcile pass over the metadata up to `index` ended, with the topics it
    /// could not make follow it (retried by the next pass).
    pub fn set_reconciled(&self, index: u64, failed: BTreeMap<String, String>) {
        *self.failed.lock() = failed;
        self.reconciled.send_replace(index);
    }

    /// Waits until the local partitions follow the metadata up to `index`.
    pub async fn wait_reconciled(&self, index: u64, timeout: Duration) -> Result<(), BrokerError> {
        let mut reconciled = self.reconciled.subscribe();
        let reached = tokio::time::timeout(timeout, reconciled.wait_for(|at| *at >= index))
            .await
            .is_ok_and(|waited| waited.is_ok());
        match reached {
            true => Ok(()),
            false => Err(controller_error(format!(
                "this node has not applied the cluster metadata up to entry {index} within {timeout:?}"
            ))),
        }
    }

    /// Checks a peer call's cluster id.
    pub fn check_cluster(&self, cluster_id: &str) -> Result<(), tonic::Status> {
        if cluster_id == self.cluster_id {
            Ok(())
        } else {
            Err(tonic::Status::failed_precondition(format!(
                "node {} belongs to cluster {}, not {cluster_id}: check --cluster on both nodes",
                self.me, self.cluster_id
            )))
        }
    }

    /// Proposes `command` and waits until it is applied here and the local partitions follow
    /// it. The outcome says whether the command changed the metadata.
    pub async fn propose(&self, command: Command) -> Result<Outcome, BrokerError> {
        let deadline = Instant::now() + PROPOSE_TIMEOUT;
        if matches!(&command, Command::CreateTopic { name, .. } if !name.starts_with("__")) {
            self.wait_formed(deadline).await?;
        }
        loop {
            let attempt = match self.propose_local(&command).await {
                Ok(done) => Ok(done),
                Err(leader) => match leader {
                    Some(leader) if leader != self.me => self.forward(leader, &command).await,
                    _ => Err(Forwarded::Retry(
                        "no controller leader is elected yet".to_string(),
                    )),
                },
            };
            match attempt {
                Ok((outcome, index)) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    self.wait_reconciled(index, left.max(Duration::from_secs(1)))
                        .await?;
                    if let Command::CreateTopic { name, .. } | Command::DeleteTopic { name, .. } =
                        &command
                    {
                        if let Some(error) = self.failed.lock().get(name) {
                            return Err(controller_error(format!(
                                "the change to topic `{name}` is committed, but this node could \
                                 not apply it yet (it retries): {error}"
                            )));
                        }
                    }
                    return Ok(outcome);
                }
                Err(Forwarded::Refused(error)) => return Err(error),
                Err(Forwarded::Retry(reason)) if Instant::now() >= deadline => {
                    return Err(BrokerError::ControllerUnavailable { reason });
                }
                Err(Forwarded::Retry(reason)) => {
                    tracing::debug!(%reason, %command, "controller proposal retried");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Waits until the cluster has formed: the leader creates `__offsets` once every initial
    /// voter registered (or after [`OFFSETS_CREATE_GRACE`]), so a topic created at startup is
    /// spread over all the nodes rather than the first to register.
    async fn wait_formed(&self, deadline: Instant) -> Result<(), BrokerError> {
        let offsets = crate::group::offsets::OFFSETS_TOPIC;
        let mut applied = self.view.subscribe();
        let formed = tokio::time::timeout_at(
            deadline,
            applied.wait_for(|_| self.view.with(|m| m.topics.contains_key(offsets))),
        )
        .await
        .is_ok_and(|waited| waited.is_ok());
        if formed {
            Ok(())
        } else {
            Err(BrokerError::ControllerUnavailable {
                reason: "the cluster has not formed yet (its nodes have not all registered with \
                         the controller)"
                    .into(),
            })
        }
    }

    /// Writes `command` through openraft when this node leads: its outcome and log index; else
    /// the leader it knows of.
    pub async fn propose_local(&self, command: &Command) -> Result<(Outcome, u64), Option<u64>> {
        // A leader cut off from the others cannot commit: give up at the deadline (the
        // command is idempotent, so a retry that finds it committed changes nothing).
        let written =
            tokio::time::timeout(PROPOSE_TIMEOUT, self.raft.client_write(command.clone()));
        let Ok(written) = written.await else {
            tracing::warn!(%command, "controller write not committed within {PROPOSE_TIMEOUT:?}");
            return Err(None);
        };
        match written {
            Ok(response) => Ok((response.data, response.log_id.index())),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward))) => {
                Err(forward.leader_id)
            }
            Err(error) => {
                tracing::warn!(%error, %command, "controller write failed");
                Err(None)
            }
        }
    }

    async fn forward(&self, leader: u64, command: &Command) -> Result<(Outcome, u64), Forwarded> {
        let address = self.address_of(leader).ok_or_else(|| {
            Forwarded::Retry(format!(
                "the controller leader {leader} has no known address"
            ))
        })?;
        let mut client = self
            .peers
            .client(&address)
            .map_err(|e| Forwarded::Refused(controller_error(e)))?;
        let bytes = serde_json::to_vec(command)
            .map_err(|e| Forwarded::Refused(controller_error(e.to_string())))?;
        let call = client.propose(v1::PeerProposeRequest {
            cluster_id: self.cluster_id.clone(),
            from: self.me,
            command: bytes.into(),
        });
        let response = match tokio::time::timeout(PROPOSE_TIMEOUT, call).await {
            Err(_) => {
                return Err(Forwarded::Retry(format!(
                    "the controller leader {leader} at {address} did not answer"
                )))
            }
            Ok(Err(status)) => {
                let message = format!(
                    "the controller leader {leader} at {address}: {}",
                    status.message()
                );
                // Not the leader any more, unreachable, or an election: try again. A refusal
                // of the command itself (it does not decode, another cluster) will not change.
                return Err(match status.code() {
                    tonic::Code::InvalidArgument => {
                        Forwarded::Refused(BrokerError::InvalidRequest(message))
                    }
                    tonic::Code::FailedPrecondition if message.contains("belongs to cluster") => {
                        Forwarded::Refused(BrokerError::ClusterRefused(message))
                    }
                    _ => Forwarded::Retry(message),
                });
            }
            Ok(Ok(response)) => response.into_inner(),
        };
        serde_json::from_slice(&response.result).map_err(|e| {
            Forwarded::Refused(controller_error(format!(
                "the controller leader's answer does not decode: {e}"
            )))
        })
    }

    /// Handles `Peer.Propose` from another node.
    pub async fn handle_propose(&self, bytes: &[u8]) -> Result<Vec<u8>, tonic::Status> {
        let command: Command = serde_json::from_slice(bytes).map_err(|e| {
            tonic::Status::invalid_argument(format!("a proposal that does not decode: {e}"))
        })?;
        // Node liveness is the leader's own to propose; peers forward topic changes, the
        // partition leaderships they won, moves and their completion, and node removals.
        if !matches!(
            command,
            Command::CreateTopic { .. }
                | Command::DeleteTopic { .. }
                | Command::PartitionLeaders { .. }
                | Command::Reassign { .. }
                | Command::CompleteMove { .. }
                | Command::FenceMove { .. }
                | Command::CancelMove { .. }
                | Command::SetLeaving { .. }
                | Command::RemoveNode { .. }
                | Command::AddAcls { .. }
                | Command::RemoveAcls { .. }
        ) {
            return Err(tonic::Status::invalid_argument(format!(
                "`{command}` cannot be forwarded: only topic changes, partition leaderships, \
                 moves, node removals and ACL changes are"
            )));
        }
        match self.propose_local(&command).await {
            Ok(done) => serde_json::to_vec(&done)
                .map_err(|e| tonic::Status::internal(format!("encoding an outcome: {e}"))),
            Err(leader) => Err(tonic::Status::failed_precondition(format!(
                "node {} is not the controller leader (leader: {leader:?})",
                self.me
            ))),
        }
    }

    /// Handles `Peer.Raft`: one openraft RPC.
    pub async fn handle_raft(&self, kind: &str, payload: &[u8]) -> Result<Vec<u8>, tonic::Status> {
        fn decode<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, tonic::Status> {
            serde_json::from_slice(payload).map_err(|e| {
                tonic::Status::invalid_argument(format!("a raft message that does not decode: {e}"))
            })
        }
        fn encode<T: serde::Serialize, E: std::fmt::Display>(
            answer: Result<T, E>,
        ) -> Result<Vec<u8>, tonic::Status> {
            let answer = answer.map_err(|e| e.to_string());
            serde_json::to_vec(&answer)
                .map_err(|e| tonic::Status::internal(format!("encoding a raft answer: {e}")))
        }
        match kind {
            "append" => encode(self.raft.append_entries(decode(payload)?).await),
            "vote" => encode(self.raft.vote(decode(payload)?).await),
            "pre_vote" => encode(self.raft.pre_vote(decode(payload)?).await),
            "snapshot" => {
                let (vote, meta, data): (super::raft::Vote, super::raft::SnapshotMeta, Vec<u8>) =
                    decode(payload)?;
                let snapshot = super::raft::Snapshot {
                    meta,
                    snapshot: std::io::Cursor::new(data),
                };
                encode(self.raft.install_full_snapshot(vote, snapshot).await)
            }
            "transfer_leader" => encode(self.raft.handle_transfer_leader(decode(payload)?).await),
            other => Err(tonic::Status::invalid_argument(format!(
                "unknown raft message kind `{other}`"
            ))),
        }
    }

    /// Handles `Peer.Heartbeat` (and this node's own heartbeat when it leads): ALREADY_EXISTS
    /// when the metadata has `node` registered from another data directory.
    pub fn handle_heartbeat(
        &self,
        node: u64,
        address: &str,
        dir_id: &str,
    ) -> Result<(), tonic::Status> {
        if !self.is_member(node) {
            return Err(tonic::Status::not_found(format!(
                "node {node} is not a member of cluster {} (it was removed, or never added): \
                 a node joins with --join",
                self.cluster_id
            )));
        }
        let registered = self.view.with(|m| {
            m.nodes
                .get(&node)
                .map(|n| n.dir_id.clone())
                .filter(|known| !known.is_empty())
        });
        if let Some(known) = registered {
            if !dir_id.is_empty() && known != dir_id {
                return Err(tonic::Status::already_exists(node_id_taken(
                    node, &known, dir_id,
                )));
            }
        }
        self.heard.lock().insert(
            node,
            Heard {
                at: Instant::now(),
                address: address.to_string(),
                dir_id: dir_id.to_string(),
            },
        );
        Ok(())
    }

    /// Turns to `Some(reason)` when this node must stop serving.
    pub fn fatal(&self) -> watch::Receiver<Option<String>> {
        self.fatal.subscribe()
    }

    /// Handles `Peer.ReadIndex`: an index that covers every change committed before the call
    /// (the leader confirms its leadership with a quorum, then waits until it applied that
    /// far: a leader that just restarted may not have applied all it committed).
    pub async fn handle_read_index(&self) -> Result<u64, tonic::Status> {
        if self.leader() != Some(self.me) {
            return Err(tonic::Status::failed_precondition(format!(
                "node {} is not the controller leader",
                self.me
            )));
        }
        self.leader_read_index(READ_INDEX_TIMEOUT)
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))
    }

    /// On the leader: the read index (see [`Controller::handle_read_index`]).
    async fn leader_read_index(&self, timeout: Duration) -> Result<u64, BrokerError> {
        let read = tokio::time::timeout(
            timeout,
            self.raft
                .ensure_linearizable(openraft::ReadPolicy::ReadIndex),
        )
        .await
        .map_err(|_| {
            controller_error("the controller leader could not confirm its leadership in time")
        })?
        .map_err(|e| controller_error(format!("controller read index: {e}")))?;
        Ok(read.index())
    }

    /// Waits until this node's applied metadata holds every change committed before the call
    /// (a read index from the leader): then a node's absence from a placement means it was
    /// moved away, not that this node has not replayed the move yet. Unlike
    /// [`Controller::read_barrier`] it does not wait for the local partitions to follow (the
    /// reconcile pass calls it).
    pub async fn applied_barrier(&self, timeout: Duration) -> Result<(), BrokerError> {
        let index = match self.leader() {
            Some(leader) if leader == self.me => self.leader_read_index(timeout).await?,
            Some(leader) => self.remote_read_index(leader, timeout).await?,
            None => return Err(controller_error("no controller leader is elected yet")),
        };
        let mut applied = self.view.subscribe();
        let reached = tokio::time::timeout(timeout, applied.wait_for(|at| *at >= index))
            .await
            .is_ok_and(|waited| waited.is_ok());
        if reached {
            Ok(())
        } else {
            Err(controller_error(format!(
                "this node has not applied the cluster metadata up to entry {index} within {timeout:?}"
            )))
        }
    }

    async fn remote_read_index(&self, leader: u64, timeout: Duration) -> Result<u64, BrokerError> {
        let address = self.address_of(leader).ok_or_else(|| {
            controller_error(format!(
                "the controller leader {leader} has no known address"
            ))
        })?;
        let mut client = self.peers.client(&address).map_err(controller_error)?;
        let call = client.read_index(v1::PeerReadIndexRequest {
            cluster_id: self.cluster_id.clone(),
        });
        match tokio::time::timeout(timeout, call).await {
            Ok(Ok(response)) => Ok(response.into_inner().committed_index),
            _ => Err(controller_error("the controller leader did not answer")),
        }
    }

    /// Makes this node's local partitions follow the metadata at least as far as the leader
    /// has applied it: for a call naming a topic this node does not know yet.
    pub async fn read_barrier(&self, timeout: Duration) -> Result<(), BrokerError> {
        let index = match self.leader() {
            Some(leader) if leader == self.me => self.leader_read_index(timeout).await?,
            Some(leader) => self.remote_read_index(leader, timeout).await?,
            None => return Err(controller_error("no controller leader is elected yet")),
        };
        self.wait_reconciled(index, timeout).await
    }

    /// Runs this node's background work until `shutdown` turns true: heartbeats to the leader,
    /// and, while leading, liveness and internal topics.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        if let Some(changes) = self.replicas.take_leader_changes() {
            tokio::spawn(self.clone().report_leaders(changes, shutdown.clone()));
            self.replicas.spawn_quiescence(shutdown.clone());
        }
        let mut tick = tokio::time::interval(HEARTBEAT_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut preferred_pass = Instant::now();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => break,
            }
            if *shutdown.borrow() {
                break;
            }
            let stopped = {
                use openraft::async_runtime::WatchReceiver as _;
                self.raft
                    .metrics()
                    .borrow_watched()
                    .running_state
                    .as_ref()
                    .err()
                    .map(|fatal| fatal.to_string())
            };
            if let Some(fatal) = stopped {
                tracing::error!(%fatal, "the controller stopped (its storage failed?)");
                self.fatal
                    .send_replace(Some(format!("the cluster controller stopped: {fatal}")));
                break;
            }
            let leader = self.leader();
            self.view.with(|m| {
                metrics::gauge!(crate::metrics::CLUSTER_NODES).set(m.nodes.len() as f64);
                metrics::gauge!(crate::metrics::CLUSTER_NODES_ALIVE)
                    .set(m.nodes.values().filter(|n| n.alive).count() as f64);
            });
            metrics::gauge!(crate::metrics::CONTROLLER_LEADER).set(if leader == Some(self.me) {
                1.0
            } else {
                0.0
            });
            {
                let mut since = self.leading_since.lock();
                match (leader == Some(self.me), since.is_some()) {
                    (true, false) => {
                        *since = Some(Instant::now());
                        self.heard.lock().clear();
                    }
                    (false, true) => *since = None,
                    _ => {}
                }
            }
            self.movers.drive_all(&self);
            self.copies.tick(&self);
            if preferred_pass.elapsed() >= crate::replication::preferred::PREFERRED_LEADER_INTERVAL
            {
                preferred_pass = Instant::now();
                self.restore_preferred_leaders().await;
            }
            match leader {
                Some(leader) if leader == self.me => {
                    if let Err(status) = self.handle_heartbeat(self.me, &self.address, &self.dir_id)
                    {
                        self.fatal.send_replace(Some(status.message().to_string()));
                    }
                    self.lead().await;
                }
                Some(leader) => self.heartbeat(leader).await,
                None => {}
            }
        }
        if let Err(error) = self.raft.shutdown().await {
            tracing::warn!(%error, "controller shutdown");
        }
    }

    async fn heartbeat(&self, leader: u64) {
        let Some(address) = self.address_of(leader) else {
            return;
        };
        let Ok(mut client) = self.peers.client(&address) else {
            return;
        };
        let call = client.heartbeat(v1::PeerHeartbeatRequest {
            cluster_id: self.cluster_id.clone(),
            node_id: self.me,
            address: self.address.clone(),
            dir_id: self.dir_id.clone(),
        });
        match tokio::time::timeout(HEARTBEAT_INTERVAL, call).await {
            Ok(Ok(_)) => {}
            Ok(Err(status))
                if status.code() == tonic::Code::AlreadyExists
                    || status.code() == tonic::Code::NotFound =>
            {
                tracing::error!(
                    reason = status.message(),
                    "this node cannot serve in the cluster"
                );
                self.fatal.send_replace(Some(status.message().to_string()));
            }
            Ok(Err(status)) => {
                tracing::debug!(leader, status = %status.message(), "heartbeat refused")
            }
            Err(_) => tracing::debug!(leader, "heartbeat timed out"),
        }
    }

    /// The leader's liveness pass and internal-topic upkeep.
    async fn lead(&self) {
        let Some(since) = *self.leading_since.lock() else {
            return;
        };
        let metadata = self.view.get();
        let heard = self.heard.lock().clone();
        let now = Instant::now();
        for (id, heard) in &heard {
            // A node removed since it was heard is not registered again.
            if now.duration_since(heard.at) >= NODE_SESSION_TIMEOUT || !self.is_member(*id) {
                continue;
            }
            let address = &heard.address;
            let known = metadata.nodes.get(id);
            if known.is_none_or(|node| {
                !node.alive || node.address != *address || node.dir_id != heard.dir_id
            }) {
                let command = Command::RegisterNode {
                    id: *id,
                    address: address.clone(),
                    at_ms: now_ms(),
                    dir_id: heard.dir_id.clone(),
                };
                if let Err(leader) = self.propose_local(&command).await {
                    tracing::debug!(?leader, "lost the controller lead while registering a node");
                    return;
                }
                tracing::info!(node = id, %address, "node is up");
            }
        }
        let silent: Vec<u64> = metadata
            .nodes
            .iter()
            .filter(|(_, node)| node.alive)
            .filter(|(id, _)| match heard.get(id) {
                Some(heard) => now.duration_since(heard.at) >= NODE_SESSION_TIMEOUT,
                None => now.duration_since(since) >= NODE_SESSION_TIMEOUT,
            })
            .map(|(id, _)| *id)
            .collect();
        if !silent.is_empty() {
            tracing::warn!(nodes = ?silent, timeout = ?NODE_SESSION_TIMEOUT, "nodes silent past the session timeout are down");
            if self
                .propose_local(&Command::MarkDown { ids: silent })
                .await
                .is_err()
            {
                return;
            }
        }
        let offsets = crate::group::offsets::OFFSETS_TOPIC;
        let metadata = self.view.get();
        if !metadata.topics.contains_key(offsets) {
            let live = metadata.live_nodes();
            let all_voters = self.voters.keys().all(|id| live.contains(id));
            if !live.is_empty() && (all_voters || now.duration_since(since) >= OFFSETS_CREATE_GRACE)
            {
                let partitions = offsets_partitions(live.len());
                match (self.offsets_topic)(partitions) {
                    Ok((id, settings, replication_factor)) => {
                        let command = Command::CreateTopic {
                            name: offsets.to_string(),
                            id,
                            partitions,
                            replication_factor,
                            settings,
                        };
                        match self.propose_local(&command).await {
                            Ok((Ok(()), _)) => {
                                tracing::info!(partitions, "created {offsets} over the live nodes")
                            }
                            Ok((Err(error), _)) => {
                                tracing::warn!(%error, "could not create {offsets}")
                            }
                            Err(_) => {}
                        }
                    }
                    Err(error) => tracing::warn!(%error, "could not describe {offsets}"),
                }
            }
        }
    }
}

pub(crate) fn node_id_taken(node: u64, known: &str, given: &str) -> String {
    format!(
        "node id {node} is in use by another data directory (its id is {known}; this one's is \
         {given}): a node id is never reused. Start node {node} with its own data directory, \
         or give this node an id of its own"
    )
}

/// Asks every other voter whether `me` is registered from another data directory; any that
/// says so refuses the start. Voters that do not answer within a second are skipped (a new
/// cluster's nodes start in any order); the heartbeats check again once the node runs.
async fn check_node_id(
    peers: &Peers,
    cluster_id: &str,
    me: u64,
    address: &str,
    dir_id: &str,
    voters: &BTreeMap<u64, String>,
) -> Result<(), BrokerError> {
    let probes =
        voters
            .iter()
            .filter(|(id, _)| **id != me)
            .filter_map(|(_, voter)| peers.client(voter).ok())
            .map(|mut client| {
                let request = v1::PeerHeartbeatRequest {
                    cluster_id: cluster_id.to_string(),
                    node_id: me,
                    address: address.to_string(),
                    dir_id: dir_id.to_string(),
                };
                async move {
                    tokio::time::timeout(Duration::from_secs(1), client.heartbeat(request)).await
                }
            });
    for answer in futures_util::future::join_all(probes).await {
        if let Ok(Err(status)) = answer {
            if status.code() == tonic::Code::AlreadyExists {
                return Err(BrokerError::Controller(status.message().to_string()));
            }
        }
    }
    Ok(())
}

/// `__offsets` partitions in a cluster of `nodes`: several per node so groups spread, at
/// least 6 and at most 48.
pub fn offsets_partitions(nodes: usize) -> u32 {
    (2 * nodes as u32).clamp(6, 48)
}

impl From<MetadataError> for BrokerError {
    fn from(error: MetadataError) -> BrokerError {
        match error {
            MetadataError::TopicExists(topic) => BrokerError::TopicExists { topic },
            MetadataError::UnknownTopic { name, .. } => BrokerError::TopicNotFound { topic: name },
            MetadataError::Invalid(message) => BrokerError::InvalidRequest(message),
            other => BrokerError::ClusterRefused(other.to_string()),
        }
    }
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("me", &self.me)
            .field("cluster_id", &self.cluster_id)
            .field("voters", &self.voters)
            .field("leader", &self.leader())
            .finish()
    }
}
