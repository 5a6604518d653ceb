//! One partition's Raft group on this node: the openraft instance, the task that hands
//! proposals to it in submission order, and the leadership this node serves by.
//!
//! A node serves a partition's clients only while it leads the group *and* has applied an
//! entry of its own term (its blank entry): by then everything committed under earlier leaders
//! is applied here, so a reader never sees the log end move backwards across a failover.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::WatchReceiver as _;
use openraft::error::{ClientWriteError, RaftError};
use openraft::impls::ProgressResponder;
use openraft::{BasicNode, ReadPolicy, ServerState};
use tokio::sync::{mpsc, oneshot, watch};

use super::network::{GroupId, GroupNetworkFactory};
use super::state_machine::PartitionStateMachine;
use super::types::{term_of, Applied, PartitionRaft, Proposal};
use crate::error::BrokerError;
use crate::partition::{AppliedReceiver, Partition, RemoteLeader, Replica};

/// A partition group's openraft handle.
pub type GroupRaft = openraft::Raft<PartitionRaft, PartitionStateMachine>;

/// How long a write may wait to be applied before the producer hears "unknown outcome".
const APPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a read barrier may take.
const READ_BARRIER_TIMEOUT: Duration = Duration::from_secs(10);

/// Raft timing of partition groups: a failed leader is replaced within about a second.
///
/// openraft's followers refuse (pre-)votes for a leader lease of `election_timeout_max` after
/// the last heartbeat they heard, and a candidate whose (pre-)vote fails waits a new election
/// timeout. When a busy leader dies, both followers heard it last at about the same moment, so
/// the first candidate (timer in `[min, max)`) is always refused and the election that
/// succeeds is the earliest second attempt: `[2 min, 2 max)` after the death when
/// `min >= max / 2`. With 500-1000 ms that measured 1.6-2.0 s from `kill -9` to the first
/// acknowledged write (BENCHMARKS.md); 250-500 ms puts it at 0.5-1 s plus the client's retry.
/// A follower grants a vote only after half a second without heartbeats (5 missed), and a
/// quiet group's followers learn it is quiet from the 100 ms pings within that lease.
pub const HEARTBEAT_MS: u64 = 100;
/// Election timeout range (ms).
pub const ELECTION_TIMEOUT_MIN_MS: u64 = 250;
/// Election timeout range (ms); also openraft's leader lease.
pub const ELECTION_TIMEOUT_MAX_MS: u64 = 500;
/// Entries between snapshots (a snapshot syncs the partition log; the Raft log below it is
/// then purged): the default of `raft_snapshot_every`. A sync per 4096 entries keeps the
/// partition log's fsyncs rare next to the Raft log's (one per group commit).
pub const SNAPSHOT_EVERY: u64 = 4096;
/// Bounds of `raft_snapshot_every`: below 8 a group would sync its partition log on almost
/// every write; above a million the Raft log (16 bytes of memory per live entry) and the
/// re-apply after a restart grow large.
pub const SNAPSHOT_EVERY_RANGE: (u64, u64) = (8, 1_000_000);
/// Entries kept in the Raft log below a snapshot, for followers a little behind (a follower
/// further behind gets a snapshot: a copy of the partition log): the default of
/// `raft_snapshot_keep`. 100k entries cost 1.6 MB of memory per group.
pub const SNAPSHOT_KEEP: u64 = 100_000;
/// Upper bound of `raft_snapshot_keep` (160 MB of Raft log slots per group).
pub const SNAPSHOT_KEEP_MAX: u64 = 10_000_000;

/// Raft settings of partition groups (the broker's `raft_snapshot_every` and
/// `raft_snapshot_keep`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupSettings {
    /// Entries between two snapshots.
    pub snapshot_every: u64,
    /// Entries kept below the last snapshot.
    pub snapshot_keep: u64,
}

impl Default for GroupSettings {
    fn default() -> Self {
        GroupSettings {
            snapshot_every: SNAPSHOT_EVERY,
            snapshot_keep: SNAPSHOT_KEEP,
        }
    }
}

type Pending = (Proposal, oneshot::Sender<Result<Applied, BrokerError>>);

/// Who leads, as this node sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Leadership {
    /// True when this node leads and has applied its own term's first entry.
    pub serving: bool,
    /// The leader, if known.
    pub leader: Option<u64>,
    /// The current term.
    pub term: u64,
}

/// Resolves node ids to advertised addresses (from the cluster metadata).
pub type Addresses = Arc<dyn Fn(u64) -> Option<String> + Send + Sync>;

/// A running group.
pub struct Group {
    id: GroupId,
    topic: Arc<str>,
    partition: u32,
    me: u64,
    raft: GroupRaft,
    proposals: mpsc::UnboundedSender<Pending>,
    leadership: watch::Receiver<Leadership>,
    addresses: Addresses,
    tracker: Arc<super::status::Tracker>,
    quiet: super::quiesce::Quiet,
    /// The partition (its log's settings verify a received snapshot).
    replica_of: Arc<Partition>,
    /// The group's directory (`<partition dir>/raft`).
    raft_dir: std::path::PathBuf,
    /// Held while a snapshot is received (one at a time).
    receiving: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group")
            .field("id", &self.id)
            .field("me", &self.me)
            .field("leadership", &*self.leadership.borrow())
            .finish()
    }
}

/// What starting a group needs from the node.
#[derive(Clone)]
pub struct GroupContext {
    /// This node's id.
    pub me: u64,
    /// The cluster id (sent with every call).
    pub cluster_id: String,
    /// Shared peer channels.
    pub peers: crate::cluster::network::Peers,
    /// Node id -> address.
    pub addresses: Addresses,
    /// Snapshot cadence.
    pub settings: GroupSettings,
    /// The throttle on sends to replicas catching up after a move.
    pub throttle: Arc<super::throttle::Throttle>,
}

fn leadership_of(me: u64, metrics: &openraft::RaftMetrics<PartitionRaft>) -> Leadership {
    let leads = metrics.state == ServerState::Leader && metrics.current_leader == Some(me);
    let own_term_applied = metrics
        .last_applied
        .as_ref()
        .is_some_and(|id| term_of(id) == metrics.current_term);
    Leadership {
        serving: leads && own_term_applied,
        leader: metrics.current_leader,
        term: metrics.current_term,
    }
}

impl Group {
    /// Starts the group of `partition` with its Raft state in `dir`, over `replicas` (node id
    /// -> address). A group that never ran is initialized with that membership on every
    /// replica (the same membership everywhere, so any of them may win the first election)
    /// when `initialize`; a replica a move adds starts empty instead and waits for the leader,
    /// which adds it as a learner (see `cluster::moves`).
    pub async fn start(
        context: &GroupContext,
        id: GroupId,
        partition: Arc<Partition>,
        dir: &std::path::Path,
        replicas: &BTreeMap<u64, String>,
        preferred: u64,
        initialize: bool,
    ) -> Result<Arc<Group>, String> {
        let fail = |what: &str, e: &dyn std::fmt::Display| format!("group {id}: {what}: {e}");
        let state_machine = PartitionStateMachine::open(dir, partition.clone())
            .map_err(|e| fail("opening its state", &e))?;
        let log = {
            let dir = dir.to_path_buf();
            tokio::task::spawn_blocking(move || {
                super::raft_log::RaftLog::open(&dir, super::raft_log::RaftLogLimits::default())
            })
            .await
            .map_err(|e| fail("opening its Raft log", &e))?
            .map_err(|e| fail("opening its Raft log", &e))?
        };
        let config = openraft::Config {
            cluster_name: format!("{}-{id}", context.cluster_id),
            heartbeat_interval: HEARTBEAT_MS,
            election_timeout_min: ELECTION_TIMEOUT_MIN_MS,
            election_timeout_max: ELECTION_TIMEOUT_MAX_MS,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(
                context.settings.snapshot_every,
            ),
            max_in_snapshot_log_to_keep: context.settings.snapshot_keep,
            enable_pre_vote: Some(true),
            // A restarted leader must win a new election: its state machine (the partition log
            // cut back to its last snapshot) and its committed index (saved lazily) are behind
            // until it applies its own new term's first entry, which is when it serves again.
            // Restoring its leadership at start would serve table reads from that stale state
            // (found by tests/replication_faults.rs).
            enable_leader_restore: Some(false),
            ..Default::default()
        }
        .validate()
        .map_err(|e| fail("settings", &e))?;
        let network = GroupNetworkFactory {
            cluster_id: context.cluster_id.clone(),
            me: context.me,
            group: id.clone(),
            peers: context.peers.clone(),
            throttle: context.throttle.clone(),
        };
        let raft = GroupRaft::new(context.me, Arc::new(config), network, log, state_machine)
            .await
            .map_err(|e| fail("starting", &e))?;
        let initialized = raft
            .is_initialized()
            .await
            .map_err(|e| fail("starting", &e))?;
        if !initialized && initialize {
            let members: BTreeMap<u64, BasicNode> = replicas
                .iter()
                .map(|(id, addr)| (*id, BasicNode { addr: addr.clone() }))
                .collect();
            if let Err(error) = raft.initialize(members).await {
                // Another replica's vote or entries reached this one first: it is initialized.
                tracing::debug!(group = %id, %error, "group initialization skipped");
            } else if preferred == context.me {
                // The preferred leader (the placement's first replica) stands at once, so a new
                // topic's leaders are spread as placed, and elected without waiting for an
                // election timeout.
                if let Err(error) = raft.trigger().elect(false).await {
                    tracing::debug!(group = %id, %error, "first election not started");
                }
            }
        }
        let (leadership_tx, leadership) = watch::channel(Leadership::default());
        let mut metrics = raft.metrics();
        let me = context.me;
        let tracker = Arc::new(super::status::Tracker::new(me));
        let observer = tracker.clone();
        tokio::spawn(async move {
            loop {
                let now = {
                    let current = metrics.borrow_and_update();
                    observer.observe(&current);
                    leadership_of(me, &current)
                };
                leadership_tx.send_if_modified(|current| {
                    let changed = *current != now;
                    *current = now;
                    changed
                });
                if metrics.changed().await.is_err() {
                    break;
                }
            }
        });
        let (proposals, queue) = mpsc::unbounded_channel();
        let namer = Namer {
            topic: partition.topic.clone(),
            partition: partition.id,
            addresses: context.addresses.clone(),
        };
        tokio::spawn(propose_in_order(raft.clone(), queue, namer));
        Ok(Arc::new(Group {
            id,
            topic: partition.topic.clone(),
            partition: partition.id,
            me,
            raft,
            proposals,
            leadership,
            addresses: context.addresses.clone(),
            tracker,
            quiet: super::quiesce::Quiet::default(),
            replica_of: partition,
            raft_dir: dir.to_path_buf(),
            receiving: tokio::sync::Mutex::new(()),
        }))
    }

    /// The group's quiescence state (see `replication::quiesce`).
    pub fn quiet(&self) -> &super::quiesce::Quiet {
        &self.quiet
    }

    /// The openraft handle (for peer calls).
    pub fn raft(&self) -> &GroupRaft {
        &self.raft
    }

    /// The group's directory.
    pub fn raft_dir(&self) -> &std::path::Path {
        &self.raft_dir
    }

    /// The settings of the partition log on this node.
    pub fn log_config(&self) -> Result<crate::log::LogConfig, BrokerError> {
        Ok(self.replica_of.local_log()?.config().clone())
    }

    /// Held while a snapshot is received.
    pub fn receiving(&self) -> &tokio::sync::Mutex<()> {
        &self.receiving
    }

    /// The group's id.
    pub fn id(&self) -> &GroupId {
        &self.id
    }

    /// The partition's topic and number.
    pub fn partition(&self) -> (&Arc<str>, u32) {
        (&self.topic, self.partition)
    }

    /// The group's replication status on this node (see `replication::status`); `alive(node)`:
    /// whether the cluster has that node alive.
    pub fn status(&self, alive: &dyn Fn(u64) -> bool) -> super::status::GroupStatus {
        self.tracker
            .status(&self.raft.metrics().borrow_watched(), alive)
    }

    /// Follows who leads.
    pub fn leadership(&self) -> watch::Receiver<Leadership> {
        self.leadership.clone()
    }

    /// This node's id.
    pub fn me(&self) -> u64 {
        self.me
    }

    /// The group's membership as this replica knows it: (voters, learners), and whether it
    /// is a joint configuration (a membership change half done).
    pub fn membership(&self) -> (Vec<u64>, Vec<u64>, bool) {
        let metrics = self.raft.metrics().borrow_watched().clone();
        let membership = metrics.membership_config.membership();
        let voters: Vec<u64> = membership.voter_ids().collect();
        let learners: Vec<u64> = membership.learner_ids().collect();
        let joint = membership.get_joint_config().len() > 1;
        (voters, learners, joint)
    }

    /// Whether the membership this replica goes by is committed (a change proposed by a
    /// leader that failed may still be undone by the next one).
    pub fn membership_committed(&self) -> bool {
        let metrics = self.raft.metrics().borrow_watched().clone();
        metrics.membership_config.log_id() == metrics.committed_membership_config.log_id()
    }

    /// On the leader: the last index of `node`'s log known to match the leader's (0: none
    /// yet), if it is replicated to.
    pub fn matched_of(&self, node: u64) -> Option<u64> {
        let metrics = self.raft.metrics().borrow_watched().clone();
        let replication = metrics.replication.as_ref()?;
        Some(replication.get(&node)?.as_ref().map_or(0, |m| m.index))
    }

    /// The last index of this replica's log.
    pub fn last_index(&self) -> u64 {
        self.raft
            .metrics()
            .borrow_watched()
            .last_log_index
            .unwrap_or(0)
    }

    /// On the leader: how far `node`'s log is behind the leader's (entries), if it is
    /// replicated to.
    pub fn lag_of(&self, node: u64) -> Option<u64> {
        let matched = self.matched_of(node)?;
        Some(self.last_index().saturating_sub(matched))
    }

    /// On the leader: adds `node` at `address` as a learner (it catches up without voting).
    pub async fn add_learner(&self, node: u64, address: String) -> Result<(), String> {
        self.quiet.wake(&self.raft);
        self.raft
            .add_learner(node, BasicNode { addr: address }, false)
            .await
            .map(|_| ())
            .map_err(|e| format!("adding node {node} to group {} as a learner: {e}", self.id))
    }

    /// On the leader: makes `voters` the group's voters through joint consensus; replicas
    /// that are not among them leave the group.
    pub async fn change_voters(&self, voters: &[u64]) -> Result<(), String> {
        self.quiet.wake(&self.raft);
        let voters: std::collections::BTreeSet<u64> = voters.iter().copied().collect();
        self.raft
            .change_membership(voters.clone(), false)
            .await
            .map(|_| ())
            .map_err(|e| format!("changing group {}'s voters to {voters:?}: {e}", self.id))
    }

    /// On the leader: hands the leadership to `node` (it must hold every committed entry).
    pub async fn transfer_to(&self, node: u64) -> Result<(), String> {
        self.quiet.wake(&self.raft);
        self.raft
            .trigger()
            .transfer_leader(node)
            .await
            .map_err(|e| format!("handing group {}'s leadership to node {node}: {e}", self.id))
    }

    fn not_leader(&self, leader: Option<u64>) -> BrokerError {
        let leader = leader.filter(|l| *l != self.me);
        BrokerError::NotLeader {
            topic: self.topic.to_string(),
            partition: self.partition,
            leader: RemoteLeader {
                id: leader,
                address: leader
                    .and_then(|id| (self.addresses)(id))
                    .unwrap_or_default(),
            },
        }
    }

    fn unknown_outcome(&self, reason: String) -> BrokerError {
        BrokerError::Replication {
            topic: self.topic.to_string(),
            partition: self.partition,
            reason,
        }
    }
}

/// Names errors after the partition.
#[derive(Clone)]
struct Namer {
    topic: Arc<str>,
    partition: u32,
    addresses: Addresses,
}

impl Namer {
    fn not_leader(&self, leader: Option<u64>) -> BrokerError {
        BrokerError::NotLeader {
            topic: self.topic.to_string(),
            partition: self.partition,
            leader: RemoteLeader {
                id: leader,
                address: leader
                    .and_then(|id| (self.addresses)(id))
                    .unwrap_or_default(),
            },
        }
    }

    fn unknown(&self, reason: String) -> BrokerError {
        BrokerError::Replication {
            topic: self.topic.to_string(),
            partition: self.partition,
            reason,
        }
    }
}

/// Hands proposals to openraft one at a time in submission order (openraft appends them in
/// the order it receives them), and their outcomes back to the writers.
async fn propose_in_order(
    raft: GroupRaft,
    mut queue: mpsc::UnboundedReceiver<Pending>,
    namer: Namer,
) {
    while let Some((proposal, reply)) = queue.recv().await {
        let proposed = std::time::Instant::now();
        let (responder, rx) = ProgressResponder::complete_only();
        if let Err(fatal) = raft.client_write_ff(proposal, Some(responder)).await {
            let _ = reply.send(Err(
                namer.unknown(format!("the replication group stopped: {fatal}"))
            ));
            continue;
        }
        let namer = namer.clone();
        tokio::spawn(async move {
            let outcome = match tokio::time::timeout(APPLY_TIMEOUT, rx).await {
                Ok(Ok(Ok(response))) => {
                    metrics::histogram!(crate::metrics::REPLICATION_COMMIT_DURATION_SECONDS)
                        .record(proposed.elapsed().as_secs_f64());
                    Ok(response.data)
                }
                Ok(Ok(Err(ClientWriteError::ForwardToLeader(forward)))) => {
                    Err(namer.not_leader(forward.leader_id))
                }
                Ok(Ok(Err(other))) => Err(namer.unknown(other.to_string())),
                Ok(Err(_)) => Err(namer.unknown(
                    "the replication group stopped before the write was applied; it may still be committed".into(),
                )),
                Err(_) => Err(namer.unknown(format!(
                    "the write was not applied within {APPLY_TIMEOUT:?} (no majority of replicas reachable?); it may still be committed"
                ))),
            };
            let _ = reply.send(outcome);
        });
    }
}

impl Replica for Group {
    fn submit(&self, proposal: Proposal) -> Result<AppliedReceiver, BrokerError> {
        let leadership = *self.leadership.borrow();
        if !leadership.serving {
            return Err(self.not_leader(leadership.leader));
        }
        self.quiet.wake(&self.raft);
        let (reply, receiver) = oneshot::channel();
        self.proposals
            .send((proposal, reply))
            .map_err(|_| self.unknown_outcome("the replication group stopped".into()))?;
        Ok(receiver)
    }

    fn check_leader(&self) -> Result<(), BrokerError> {
        let leadership = *self.leadership.borrow();
        if leadership.serving {
            Ok(())
        } else {
            Err(self.not_leader(leadership.leader))
        }
    }

    fn serving_term(&self) -> Option<u64> {
        let leadership = *self.leadership.borrow();
        leadership.serving.then_some(leadership.term)
    }

    fn read_barrier(&self) -> Pin<Box<dyn Future<Output = Result<(), BrokerError>> + Send + '_>> {
        Box::pin(async move {
            self.quiet.wake(&self.raft);
            let result = tokio::time::timeout(
                READ_BARRIER_TIMEOUT,
                self.raft.ensure_linearizable(ReadPolicy::ReadIndex),
            )
            .await;
            match result {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(RaftError::APIError(error))) => {
                    let leader = match &error {
                        openraft::error::LinearizableReadError::ForwardToLeader(forward) => {
                            forward.leader_id
                        }
                        _ => None,
                    };
                    Err(self.not_leader(leader))
                }
                Ok(Err(error)) => Err(self.unknown_outcome(format!("read barrier: {error}"))),
                Err(_) => Err(self.unknown_outcome(format!(
                    "could not confirm the leadership with a majority of replicas within {READ_BARRIER_TIMEOUT:?}"
                ))),
            }
        })
    }

    fn shutdown(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            if let Err(error) = self.raft.shutdown().await {
                tracing::warn!(group = %self.id, %error, "replication group did not stop cleanly");
            }
        })
    }
}
