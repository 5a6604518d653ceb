//! Quiescence: a group that takes no writes costs nothing. openraft's ticks (its election
//! timer and the leader's heartbeats) are switched off in idle groups, and one ping per pair
//! of nodes, for every group at once, tells followers that their leader is alive and idle.
//!
//! ## Leader side
//! A group this node leads is *quiesced* (`runtime_config().tick(false)`: no heartbeats, no
//! timer wake-ups) once it has served no write and no read barrier for [`QUIET_AFTER`], its
//! whole log is committed and applied, every voter has matched the leader's last entry, and
//! the commit index has not moved for [`QUIET_AFTER`] (so the heartbeats sent since carried it
//! to the followers), and every follower pinged this node within [`PINGED_WITHIN`] (so it
//! will hear that the group is quiet before its election timer runs out). The next write or read barrier wakes it first ([`Quiet::wake`]: ticks on
//! again); the append itself reaches the followers at once. A group with a replica down or
//! behind never quiesces: its heartbeats keep catching it up.
//!
//! ## Follower side
//! Every [`PING_INTERVAL`] each node pings each node it shares a group with
//! (`Peer.Replicate` of kind `ping`); the answer lists the groups the answering node leads and
//! has quiesced, each with its term ([`encode_quiet`]). A follower switches its group's ticks
//! off while a node it heard from within the group's *silence bound* (per group and node,
//! spread over [[`SILENT_MIN`], [`SILENT_MAX`]] so that replicas and groups do not all stand
//! at once) lists the group as quiet **at the follower's current term** (one leader per term,
//! so that node is the leader). Otherwise its ticks are on and openraft's election timer runs
//! as usual: when the leader dies, is cut off or is paused its pings go unanswered, the bound
//! passes, ticks come back and the follower, having heard nothing for longer than an election
//! timeout, stands at its next tick (with a pre-vote).
//!
//! ## Fault model
//! - Leader dead, paused or cut off: failover within the silence bound plus one election, as
//!   with heartbeats.
//! - Leader cut off from its followers only: the followers elect a new leader; the old one
//!   keeps its ticks off and believes it leads until a message of the new term reaches it. It
//!   cannot commit (its append is refused by the new term) nor pass a read barrier (a majority
//!   must confirm it), so it serves no stale or lost write; its clients retry elsewhere.
//! - A restarted node lists no quiet group (its groups start as followers) and its groups'
//!   ticks start on; its pings confirm a quiet leader at its term within a ping interval.
//! - A ping or its answer lost: the follower's ticks come back after the silence bound and it
//!   may start a needless election (the cost of a heartbeat lost with ticks on, too).

use std::collections::{HashMap, HashSet};
use std::hash::{Hash as _, Hasher as _};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::async_runtime::WatchReceiver as _;
use openraft::ServerState;
use syncline_proto::v1;
use tokio::sync::watch;

use super::group::Group;
use super::network::GroupId;
use super::Replicas;

/// How often each peer node is pinged.
pub const PING_INTERVAL: Duration = Duration::from_millis(100);
/// How long a ping may take.
const PING_TIMEOUT: Duration = Duration::from_millis(400);
/// How often every group's ticks are reconsidered.
pub const CHECK_INTERVAL: Duration = Duration::from_millis(100);
/// A leader quiesces a group idle (and its commit index still) this long.
pub const QUIET_AFTER: Duration = Duration::from_secs(1);
/// A follower trusts a quiet leader it heard from within this long at least...
pub const SILENT_MIN: Duration = Duration::from_millis(500);
/// ... and at most this long (per group and node, spread between the two).
pub const SILENT_MAX: Duration = Duration::from_millis(1000);
/// A leader quiesces a group only while each follower pinged it this recently: the follower
/// will learn that the group is quiet before its election timer runs out.
pub const PINGED_WITHIN: Duration = Duration::from_millis(300);
/// Quiet groups listed in one ping answer, at most (a node leads fewer in practice).
const QUIET_LIST_MAX: usize = 1 << 20;

/// One group's quiescence state on this node, shared by the group and the checker.
#[derive(Debug)]
pub struct Quiet {
    /// Whether openraft's ticks are on (as last set here).
    ticking: AtomicBool,
    /// The term this node quiesced the group in as its leader (0: not quiesced as leader).
    quiet_term: AtomicU64,
    /// When the group last served a write or a read barrier.
    last_active: parking_lot::Mutex<Instant>,
    /// The commit index last seen and since when.
    committed: parking_lot::Mutex<(Option<u64>, Instant)>,
}

impl Default for Quiet {
    fn default() -> Quiet {
        let now = Instant::now();
        Quiet {
            ticking: AtomicBool::new(true),
            quiet_term: AtomicU64::new(0),
            last_active: parking_lot::Mutex::new(now),
            committed: parking_lot::Mutex::new((None, now)),
        }
    }
}

impl Quiet {
    /// A write or a read barrier is about to run: ticks on (a quiesced leader sends
    /// heartbeats again) and the idle clock restarts.
    pub fn wake(&self, raft: &super::group::GroupRaft) {
        *self.last_active.lock() = Instant::now();
        self.quiet_term.store(0, Ordering::Release);
        if !self.ticking.swap(true, Ordering::AcqRel) {
            raft.runtime_config().tick(true);
            metrics::counter!(crate::metrics::REPLICATION_GROUP_WAKES_TOTAL).increment(1);
        }
    }

    /// The term this node leads the group in with its ticks off, if it does.
    pub fn quiet_term(&self) -> Option<u64> {
        match self.quiet_term.load(Ordering::Acquire) {
            0 => None,
            term => Some(term),
        }
    }

    /// Whether the group's ticks are on.
    pub fn ticking(&self) -> bool {
        self.ticking.load(Ordering::Acquire)
    }

    fn set_ticking(&self, raft: &super::group::GroupRaft, on: bool) {
        if self.ticking.swap(on, Ordering::AcqRel) != on {
            raft.runtime_config().tick(on);
        }
    }
}

/// What this node last heard from each peer node, and when each last pinged it.
#[derive(Debug, Default)]
pub struct Liveness {
    heard: parking_lot::Mutex<HashMap<u64, Heard>>,
    pinged_by: parking_lot::Mutex<HashMap<u64, Instant>>,
}

#[derive(Debug, Clone)]
struct Heard {
    at: Instant,
    /// The groups it leads with its ticks off, and their terms.
    quiet: Arc<HashMap<GroupId, u64>>,
}

impl Liveness {
    fn heard(&self, node: u64, quiet: HashMap<GroupId, u64>) {
        self.heard.lock().insert(
            node,
            Heard {
                at: Instant::now(),
                quiet: Arc::new(quiet),
            },
        );
    }

    /// Whether `node` answered one of this node's pings within `bound` of `now`.
    pub fn answered_within(&self, node: u64, bound: Duration, now: Instant) -> bool {
        self.heard
            .lock()
            .get(&node)
            .is_some_and(|heard| now.saturating_duration_since(heard.at) < bound)
    }

    /// Notes a ping from `node` (served by [`Replicas::serve`]).
    pub fn pinged_by(&self, node: u64) {
        self.pinged_by.lock().insert(node, Instant::now());
    }

    /// Whether `node` pinged this one within [`PINGED_WITHIN`] of `now`.
    fn pinged_recently(&self, node: u64, now: Instant) -> bool {
        self.pinged_by
            .lock()
            .get(&node)
            .is_some_and(|at| now.saturating_duration_since(*at) < PINGED_WITHIN)
    }

    /// Whether a node heard from within `bound` says it leads `group` at `term`, quietly.
    fn quiet_leader(&self, group: &GroupId, term: u64, bound: Duration, now: Instant) -> bool {
        self.heard.lock().values().any(|heard| {
            now.duration_since(heard.at) < bound && heard.quiet.get(group) == Some(&term)
        })
    }
}

/// The silence bound of `group` on node `me` (see the module doc).
fn silence_bound(group: &GroupId, me: u64) -> Duration {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    group.hash(&mut hasher);
    me.hash(&mut hasher);
    let spread = u64::try_from((SILENT_MAX - SILENT_MIN).as_millis()).unwrap_or(1);
    SILENT_MIN + Duration::from_millis(hasher.finish() % spread.max(1))
}

/// The ping answer: the quiet groups this node leads.
///
/// ```text
/// repeated: topic_id_len u16 LE | topic_id (UTF-8) | partition u32 LE | term u64 LE
/// ```
pub fn encode_quiet(groups: &[Arc<Group>]) -> Vec<u8> {
    let mut out = Vec::new();
    for group in groups {
        let Some(term) = group.quiet().quiet_term() else {
            continue;
        };
        let id = group.id();
        let Ok(len) = u16::try_from(id.topic_id.len()) else {
            continue;
        };
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(id.topic_id.as_bytes());
        out.extend_from_slice(&id.partition.to_le_bytes());
        out.extend_from_slice(&term.to_le_bytes());
    }
    out
}

/// Reads a ping answer ([`encode_quiet`]); `None` when it is malformed.
pub fn decode_quiet(mut bytes: &[u8]) -> Option<HashMap<GroupId, u64>> {
    fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, rest) = bytes.split_at_checked(n)?;
        *bytes = rest;
        Some(head)
    }
    let mut quiet = HashMap::new();
    while !bytes.is_empty() {
        if quiet.len() >= QUIET_LIST_MAX {
            return None;
        }
        let len = u16::from_le_bytes(take(&mut bytes, 2)?.try_into().ok()?);
        let topic_id = std::str::from_utf8(take(&mut bytes, usize::from(len))?).ok()?;
        let partition = u32::from_le_bytes(take(&mut bytes, 4)?.try_into().ok()?);
        let term = u64::from_le_bytes(take(&mut bytes, 8)?.try_into().ok()?);
        quiet.insert(
            GroupId {
                topic_id: topic_id.to_string(),
                partition,
            },
            term,
        );
    }
    Some(quiet)
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
        let mut peers: HashSet<u64> = HashSet::new();
        for group in replicas.groups() {
            let metrics = group.raft().metrics();
            let metrics = metrics.borrow_watched();
            peers.extend(
                metrics
                    .membership_config
                    .membership()
                    .voter_ids()
                    .filter(|node| *node != me),
            );
        }
        for node in peers {
            let Some(address) = (replicas.context.addresses)(node) else {
                continue;
            };
            let replicas = replicas.clone();
            tokio::spawn(async move {
                let Ok(mut client) = replicas.context.peers.client(&address) else {
                    return;
                };
                let request = v1::ReplicateRequest {
                    cluster_id: replicas.context.cluster_id.clone(),
                    from: me,
                    kind: "ping".into(),
                    ..Default::default()
                };
                if let Ok(Ok(answer)) =
                    tokio::time::timeout(PING_TIMEOUT, client.replicate(request)).await
                {
                    match decode_quiet(&answer.into_inner().payload) {
                        Some(quiet) => replicas.liveness.heard(node, quiet),
                        None => tracing::warn!(node, "malformed ping answer ignored"),
                    }
                }
            });
        }
    }
}

/// Switches every group's ticks on or off as the module doc says, until `shutdown`.
pub async fn watch_groups(replicas: Arc<Replicas>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(CHECK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let now = Instant::now();
        for group in replicas.groups() {
            check(&replicas, &group, now);
        }
    }
}

fn check(replicas: &Replicas, group: &Group, now: Instant) {
    let me = replicas.context.me;
    let quiet = group.quiet();
    let raft = group.raft();
    let metrics = raft.metrics();
    let metrics = metrics.borrow_watched();
    let committed = metrics.local_committed.as_ref().map(|id| id.index);
    let committed_since = {
        let mut seen = quiet.committed.lock();
        if seen.0 != committed {
            *seen = (committed, now);
        }
        seen.1
    };
    if metrics.state == ServerState::Leader && metrics.current_leader == Some(me) {
        if quiet.quiet_term() == Some(metrics.current_term) {
            return;
        }
        let last = metrics.last_log_index;
        let settled = committed.is_some()
            && committed == last
            && metrics.last_applied.as_ref().map(|id| id.index) == last
            && metrics.replication.as_ref().is_some_and(|followers| {
                metrics
                    .membership_config
                    .membership()
                    .voter_ids()
                    .filter(|node| *node != me)
                    .all(|node| {
                        followers
                            .get(&node)
                            .is_some_and(|matched| matched.as_ref().map(|id| id.index) == last)
                            && replicas.liveness.pinged_recently(node, now)
                    })
            });
        let idle = now.duration_since(*quiet.last_active.lock()) >= QUIET_AFTER
            && now.duration_since(committed_since) >= QUIET_AFTER;
        if settled && idle {
            quiet
                .quiet_term
                .store(metrics.current_term, Ordering::Release);
            quiet.set_ticking(raft, false);
            tracing::debug!(group = %group.id(), term = metrics.current_term, "quiesced");
        } else {
            // A leader that took over with its ticks off (a follower of a quiet group that
            // won a transfer) must heartbeat.
            quiet.quiet_term.store(0, Ordering::Release);
            quiet.set_ticking(raft, true);
        }
        return;
    }
    // Not (or no longer) leading: a quiet term of this node means nothing any more.
    quiet.quiet_term.store(0, Ordering::Release);
    let voter = metrics
        .membership_config
        .membership()
        .voter_ids()
        .any(|node| node == me);
    let confirmed = voter
        && metrics.state == ServerState::Follower
        && replicas.liveness.quiet_leader(
            group.id(),
            metrics.current_term,
            silence_bound(group.id(), me),
            now,
        );
    quiet.set_ticking(raft, !confirmed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_list_should_decode_what_was_encoded_and_refuse_a_torn_one() {
        let mut bytes = Vec::new();
        for (topic_id, partition, term) in [("t-1", 0u32, 5u64), ("another", 7, 9)] {
            bytes.extend_from_slice(&(topic_id.len() as u16).to_le_bytes());
            bytes.extend_from_slice(topic_id.as_bytes());
            bytes.extend_from_slice(&partition.to_le_bytes());
            bytes.extend_from_slice(&term.to_le_bytes());
        }
        let quiet = decode_quiet(&bytes).expect("decodes");
        assert_eq!(
            quiet.get(&GroupId {
                topic_id: "another".into(),
                partition: 7
            }),
            Some(&9)
        );
        assert_eq!(quiet.len(), 2);
        for cut in 1..bytes.len() {
            if cut == 2 + 3 + 4 + 8 {
                continue; // a whole first entry
            }
            assert!(decode_quiet(&bytes[..cut]).is_none(), "cut at {cut}");
        }
        assert_eq!(decode_quiet(&[]).map(|q| q.len()), Some(0));
    }

    #[test]
    fn liveness_should_confirm_only_a_recent_quiet_leader_at_the_same_term() {
        let liveness = Liveness::default();
        let group = GroupId {
            topic_id: "t".into(),
            partition: 1,
        };
        liveness.heard(2, HashMap::from([(group.clone(), 4)]));
        let now = Instant::now();
        let bound = Duration::from_millis(600);
        assert!(liveness.quiet_leader(&group, 4, bound, now));
        assert!(!liveness.quiet_leader(&group, 5, bound, now), "other term");
        assert!(
            !liveness.quiet_leader(&group, 4, bound, now + bound),
            "silent too long"
        );
        let other = GroupId {
            topic_id: "t".into(),
            partition: 2,
        };
        assert!(!liveness.quiet_leader(&other, 4, bound, now));
    }

    #[test]
    fn silence_bounds_should_spread_over_the_range() {
        let bounds: HashSet<Duration> = (0..50)
            .map(|partition| {
                silence_bound(
                    &GroupId {
                        topic_id: "t".into(),
                        partition,
                    },
                    1,
                )
            })
            .collect();
        assert!(bounds.len() > 10);
        assert!(bounds.iter().all(|b| *b >= SILENT_MIN && *b < SILENT_MAX));
    }
}
