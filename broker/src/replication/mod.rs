//! Replicated partitions: each partition with replication factor R > 1 is a Raft group
//! (openraft) over its R replicas.
//!
//! ## The choice: a Raft log per partition, applied to the partition log
//! Each group has its own Raft log (`<partition dir>/raft/`), fsync'd before an append is
//! acknowledged to the leader; the partition log is the group's state machine. Applying a
//! committed entry runs the partition's one-writer critical section (producer dedupe, CAS
//! check, offset assignment, append, key index) on every replica, in log order, with the
//! leader's clock carried in the entry, so every replica assigns the same offsets and makes
//! the same decisions. The partition log therefore only ever holds committed records: a reader
//! can never see an offset that a failover takes back, and no follower ever cuts its
//! partition log. Raft's own entries (a new term's blank entry, membership changes) take a Raft
//! index but no record offset. Why not the Raft log *as* the partition log (one write per
//! replica): offsets would have to be assigned before commit, and a CAS or dedupe decided on
//! the leader against uncommitted state would have to be undone on every leader change. The
//! second write costs no fsync (the partition log is synced at snapshots), but it costs a copy
//! into the page cache and, once written back, disk bandwidth. Measured (BENCHMARKS.md,
//! `benches/replication.sh`): at R = 3 all brokers together write 6.0 bytes to storage per
//! produced byte (two logs on three replicas) against 1.0 for a single node. Where the three
//! replicas share one disk and two cores, as on the machine of our benchmarks, that is what
//! bounds R = 3 at 1 KiB records (0.23x of a single node; 0.50x at 100 B, where per-request
//! work weighs more). One write per replica would halve those bytes; by the same measure it
//! would reach about 0.45x at 1 KiB there, still short of the 0.5x target, at the cost of the
//! fault model above. It is the first candidate when the write path is optimised as a whole
//! (the performance issue, after the gateway and the connectors).
//!
//! ## Layers
//! - `types`: the group's openraft types and the binary entry format.
//! - `raft_log`: the group's Raft log on disk (segments, group-committed fsync, recovery).
//! - `state_machine`: applies entries to the [`crate::partition::Partition`], builds and
//!   installs snapshots.
//! - `snapshot`: a snapshot's data (an image of the partition log's files) and its transfer.
//! - `group`: one running group: openraft, the ordered proposer, leadership.
//! - `network`: `Peer.Replicate` calls between nodes (one connection per node pair).
//! - `handoff`: moving this node's leaderships to other replicas before it stops.
//! - `preferred`: moving leaderships back to each partition's preferred replica.
//! - `quiesce`: idle groups switch openraft's ticks off; one ping per node pair tells
//!   followers their leader is alive and idle.
//! - `throttle`: the bytes/s limit on what a leader sends to replicas a move adds.
//! - `status`: a group's replication status (role, commit and apply indexes, followers caught
//!   up and their lag) for DescribeCluster and the metrics.
//! - this module: [`Replicas`], every group on this node, started and stopped by the cluster's
//!   reconcile pass, and the dispatch of peer calls to them.
//!
//! It may call the partition layer and the cluster's peer channels; the server calls it.

pub mod group;
pub mod handoff;
pub mod network;
pub mod preferred;
pub mod quiesce;
pub mod raft_log;
pub mod snapshot;
pub mod state_machine;
pub mod status;
pub mod throttle;
pub mod types;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use syncline_proto::v1;

use crate::cluster::metadata::LeaderChange;
use crate::partition::Partition;
use group::{Group, GroupContext};
use network::GroupId;

/// Every partition group on this node.
pub struct Replicas {
    pub(crate) context: GroupContext,
    /// What this node hears from its peers' pings (see `quiesce`).
    pub(crate) liveness: quiesce::Liveness,
    groups: parking_lot::RwLock<HashMap<GroupId, Arc<Group>>>,
    /// Serializes starts and stops.
    admin: tokio::sync::Mutex<()>,
    /// Since when this node has served each group it leads, by term (see `preferred`).
    serving_since: parking_lot::Mutex<HashMap<GroupId, (u64, std::time::Instant)>>,
    /// Leaderships this node won, for the controller's metadata (clients route by it).
    won: tokio::sync::mpsc::UnboundedSender<LeaderChange>,
    won_rx: parking_lot::Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<LeaderChange>>>,
}

impl std::fmt::Debug for Replicas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replicas")
            .field("groups", &self.groups.read().len())
            .finish()
    }
}

impl Replicas {
    /// No groups yet.
    pub fn new(context: GroupContext) -> Replicas {
        let (won, won_rx) = tokio::sync::mpsc::unbounded_channel();
        Replicas {
            context,
            liveness: quiesce::Liveness::default(),
            groups: parking_lot::RwLock::default(),
            admin: tokio::sync::Mutex::new(()),
            serving_since: parking_lot::Mutex::default(),
            won,
            won_rx: parking_lot::Mutex::new(Some(won_rx)),
        }
    }

    /// Runs the quiescence of every group (see `quiesce`) until `shutdown`.
    pub fn spawn_quiescence(self: &Arc<Self>, shutdown: tokio::sync::watch::Receiver<bool>) {
        tokio::spawn(quiesce::ping_peers(self.clone(), shutdown.clone()));
        tokio::spawn(quiesce::watch_groups(self.clone(), shutdown));
    }

    /// The leaderships this node wins, as they happen (taken once, by the controller's
    /// reporter).
    pub fn take_leader_changes(
        &self,
    ) -> Option<tokio::sync::mpsc::UnboundedReceiver<LeaderChange>> {
        self.won_rx.lock().take()
    }

    /// The running group, if any.
    pub fn get(&self, id: &GroupId) -> Option<Arc<Group>> {
        self.groups.read().get(id).cloned()
    }

    /// Every running group.
    pub fn groups(&self) -> Vec<Arc<Group>> {
        self.groups.read().values().cloned().collect()
    }

    /// Starts the group of `partition` (a replica placed on this node) unless it runs, and
    /// attaches it to the partition. `preferred` is the placement's first replica;
    /// `initialize`: whether this replica is one of the group's first (else a move adds it,
    /// and it waits for the leader).
    pub async fn ensure(
        &self,
        id: GroupId,
        partition: &Arc<Partition>,
        replicas: &BTreeMap<u64, String>,
        preferred: u64,
        initialize: bool,
    ) -> Result<(), String> {
        if self.groups.read().contains_key(&id) && partition.replica().is_some() {
            return Ok(());
        }
        let _admin = self.admin.lock().await;
        if self.groups.read().contains_key(&id) && partition.replica().is_some() {
            return Ok(());
        }
        let dir = partition
            .local_log()
            .map_err(|e| e.to_string())?
            .dir()
            .join(state_machine::RAFT_DIR);
        let group = Group::start(
            &self.context,
            id.clone(),
            partition.clone(),
            &dir,
            replicas,
            preferred,
            initialize,
        )
        .await?;
        partition.attach_replica(group.clone());
        let mut leadership = group.leadership();
        let won = self.won.clone();
        let me = self.context.me;
        let (topic, number, topic_id) = (
            partition.topic.to_string(),
            partition.id,
            id.topic_id.clone(),
        );
        tokio::spawn(async move {
            let mut reported = None;
            loop {
                let now = *leadership.borrow_and_update();
                if now.serving && reported != Some(now.term) {
                    reported = Some(now.term);
                    let change = LeaderChange {
                        topic: topic.clone(),
                        id: topic_id.clone(),
                        partition: number,
                        leader: me,
                        term: now.term,
                    };
                    if won.send(change).is_err() {
                        break;
                    }
                }
                if leadership.changed().await.is_err() {
                    break;
                }
            }
        });
        self.groups.write().insert(id.clone(), group);
        tracing::info!(group = %id, topic = %partition.topic, partition = partition.id, replicas = ?replicas.keys().collect::<Vec<_>>(), "replication group started");
        Ok(())
    }

    /// Forgets the groups of a topic incarnation (their partitions stop them when they close).
    pub fn forget_topic(&self, topic_id: &str) {
        self.groups.write().retain(|id, _| id.topic_id != topic_id);
    }

    /// Forgets one group (its replica moved away; the partition stops it when it closes).
    pub fn forget(&self, id: &GroupId) {
        self.groups.write().remove(id);
        self.context.throttle.clear_group(id);
    }

    /// The throttle on sends to replicas catching up after a move.
    pub fn throttle(&self) -> &Arc<throttle::Throttle> {
        &self.context.throttle
    }

    /// Serves a `Peer.InstallSnapshot` call after its `first` message.
    pub async fn serve_snapshot<S>(
        &self,
        first: v1::SnapshotChunk,
        rest: S,
    ) -> Result<Vec<u8>, tonic::Status>
    where
        S: futures_util::Stream<Item = Result<v1::SnapshotChunk, tonic::Status>> + Unpin,
    {
        let id = GroupId {
            topic_id: first.topic_id.clone(),
            partition: first.partition,
        };
        let Some(group) = self.get(&id) else {
            return Err(tonic::Status::not_found(format!(
                "node {} holds no running replica of group {id} (yet)",
                self.context.me
            )));
        };
        network::serve_snapshot(&group, &first.header, rest).await
    }

    /// Serves a `Peer.Replicate` call.
    pub async fn serve(&self, request: v1::ReplicateRequest) -> Result<Vec<u8>, tonic::Status> {
        if request.kind == "ping" {
            self.liveness.pinged_by(request.from);
            return Ok(quiesce::encode_quiet(&self.groups()));
        }
        let id = GroupId {
            topic_id: request.topic_id.clone(),
            partition: request.partition,
        };
        let Some(group) = self.get(&id) else {
            return Err(tonic::Status::not_found(format!(
                "node {} holds no running replica of group {id} (yet)",
                self.context.me
            )));
        };
        network::serve(group.raft(), request).await
    }
}
