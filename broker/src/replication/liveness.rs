//! Failure detection for every partition group of a node at once, so idle groups cost
//! nothing: groups send no heartbeats of their own (openraft's `enable_heartbeat` and
//! `enable_elect` are off), and one ping per peer node carries the liveness of all of them.
//!
//! - Every [`PING_INTERVAL`] each node pings each other node it shares a group with
//!   (`Peer.Replicate` of kind `ping`); any call from a node counts as hearing from it. The
//!   answer carries the node's *incarnation* (random per process start): a new incarnation
//!   means the node restarted and leads nothing any more.
//! - Every [`CHECK_INTERVAL`] each group this node follows is checked: when its leader node
//!   has been silent for the group's election timeout (a per-group, per-node value in
//!   [`ELECTION_TIMEOUT_MIN`, `ELECTION_TIMEOUT_MAX`], so replicas do not all stand at once),
//!   restarted since it was elected, or no leader is known for that long, this node starts an
//!   election with a pre-vote (which fails without disturbing anyone while a majority still
//!   hears a leader).
//!
//! Fault model: a leader that is alive but cut off from its followers is silent to them and
//! replaced; it keeps believing it leads until it hears the higher term, but it cannot commit
//! (no majority), so its writes time out and its linearizable reads (read index) fail. A slow
//! or paused node that answers pings late is treated as silent once past the timeout.

use std::collections::HashMap;
use std::hash::{Hash as _, Hasher as _};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::async_runtime::WatchReceiver as _;
use openraft::ServerState;
use syncline_proto::v1;
use tokio::sync::watch;

use super::Replicas;

/// How often each peer node is pinged.
pub const PING_INTERVAL: Duration = Duration::from_millis(150);
/// How long a ping may take.
const PING_TIMEOUT: Duration = Duration::from_millis(500);
/// How often the groups this node follows are checked.
pub const CHECK_INTERVAL: Duration = Duration::from_millis(100);
/// A follower stands after its leader is silent this long at least...
pub const ELECTION_TIMEOUT_MIN: Duration = Duration::from_millis(600);
/// ... and at most this long (per group and node, spread between the two).
pub const ELECTION_TIMEOUT_MAX: Duration = Duration::from_millis(1200);

/// What this node last heard from each peer node.
#[derive(Debug, Default)]
pub struct Liveness {
    heard: parking_lot::Mutex<HashMap<u64, Heard>>,
}

#[derive(Debug, Clone, Copy)]
struct Heard {
    at: Instant,
    incarnation: u64,
    /// When its incarnation last changed (it restarted).
    restarted: Option<Instant>,
}

impl Liveness {
    /// Notes a call or answer from `node` (its incarnation when it said; 0 when it did not).
    pub fn heard(&self, node: u64, incarnation: u64) {
        let now = Instant::now();
        let mut heard = self.heard.lock();
        let entry = heard.entry(node).or_insert(Heard {
            at: now,
            incarnation,
            restarted: None,
        });
        entry.at = now;
        if incarnation != 0 && incarnation != entry.incarnation {
            if entry.incarnation != 0 {
                entry.restarted = Some(now);
            }
            entry.incarnation = incarnation;
        }
    }

    /// When `node` was last heard from and when it last restarted.
    fn last(&self, node: u64) -> Option<Heard> {
        self.heard.lock().get(&node).copied()
    }
}

/// The election timeout of `group` on node `me`: spread over the range by a hash, so the
/// replicas of a group (and the groups of a node) do not all stand at the same moment.
fn election_timeout(group: &super::network::GroupId, me: u64, round: u64) -> Duration {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    group.hash(&mut hasher);
    me.hash(&mut hasher);
    round.hash(&mut hasher);
    let spread = (ELECTION_TIMEOUT_MAX - ELECTION_TIMEOUT_MIN).as_millis() as u64;
    ELECTION_TIMEOUT_MIN + Duration::from_millis(hasher.finish() % spread.max(1))
}

/// Pings every peer node of this node's groups, until `shutdown`.
pub async fn ping_peers(replicas: Arc<Replicas>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(PING_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let me = replicas.context.me;
        let mut peers: HashMap<u64, String> = HashMap::new();
        for group in replicas.groups() {
            let metrics = group.raft().metrics();
            let metrics = metrics.borrow_watched();
            for (node, address) in metrics.membership_config.membership().nodes() {
                if *node != me && !peers.contains_key(node) {
                    peers.insert(*node, address.addr.clone());
                }
            }
        }
        for (node, address) in peers {
            let replicas = replicas.clone();
            tokio::spawn(async move {
                let Ok(mut client) = replicas.context.peers.client(&address) else {
                    return;
                };
                let request = v1::ReplicateRequest {
                    cluster_id: replicas.context.cluster_id.clone(),
                    from: me,
                    kind: "ping".into(),
                    header: replicas.incarnation.to_le_bytes().to_vec().into(),
                    ..Default::default()
                };
                if let Ok(Ok(answer)) =
                    tokio::time::timeout(PING_TIMEOUT, client.replicate(request)).await
                {
                    let payload = answer.into_inner().payload;
                    let incarnation = payload
                        .get(..8)
                        .and_then(|b| b.try_into().ok())
                        .map_or(0, u64::from_le_bytes);
                    replicas.liveness.heard(node, incarnation);
                }
            });
        }
    }
}

/// Starts elections in the groups whose leader this node no longer hears, until `shutdown`.
pub async fn watch_leaders(replicas: Arc<Replicas>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(CHECK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Per group: since when it has had no leader this node hears (reset while it has one),
    // how many elections it started, and when the last one started.
    let mut leaderless: HashMap<super::network::GroupId, (Instant, u64, Option<Instant>)> =
        HashMap::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let me = replicas.context.me;
        let now = Instant::now();
        let groups = replicas.groups();
        leaderless.retain(|id, _| groups.iter().any(|g| g.id() == id));
        for group in groups {
            let (state, leader, voter) = {
                let metrics = group.raft().metrics();
                let metrics = metrics.borrow_watched();
                let voter = metrics
                    .membership_config
                    .membership()
                    .voter_ids()
                    .any(|id| id == me);
                (metrics.state, metrics.current_leader, voter)
            };
            if state == ServerState::Leader || !voter {
                leaderless.remove(group.id());
                continue;
            }
            let restarted = |heard: &Heard| {
                heard
                    .restarted
                    .is_some_and(|at| at > group.leader_changed_at())
            };
            // Since when this group has had no leader this node hears from.
            let entry = leaderless
                .entry(group.id().clone())
                .or_insert((now, 0, None));
            let silent_since = match leader.filter(|l| *l != me) {
                Some(leader) => match replicas.liveness.last(leader) {
                    Some(heard) if !restarted(&heard) => heard.at,
                    Some(heard) => heard.restarted.unwrap_or(entry.0),
                    None => entry.0,
                },
                None => entry.0,
            };
            let timeout = election_timeout(group.id(), me, entry.1);
            if now.duration_since(silent_since) < timeout {
                if leader.is_some() {
                    entry.0 = now;
                }
                continue;
            }
            if entry
                .2
                .is_some_and(|last: Instant| now.duration_since(last) < timeout)
            {
                continue;
            }
            entry.1 += 1;
            entry.2 = Some(now);
            tracing::debug!(group = %group.id(), ?leader, "leader silent: standing for election");
            if let Err(error) = group.raft().trigger().elect(true).await {
                tracing::debug!(group = %group.id(), %error, "election not started");
            }
        }
    }
}
