//! Replication status of a partition group on this node, read from openraft's metrics: the
//! role, term, leader, last log index, committed and applied indexes, and on the leader, per
//! follower, the index it matched, when it last acknowledged, and whether it is caught up.
//!
//! ## Caught up
//! On the leader, a follower is *caught up* when either
//! 1. it matched every entry the leader knows as committed (`matched >= committed`) and
//!    acknowledged an append or a heartbeat within [`CAUGHT_UP_ACK_WINDOW`] (two of the
//!    longest election timeouts; a follower answering heartbeats acks every 100 ms, so only
//!    one that is down, cut off or stalled falls past it); or
//! 2. it matched the leader's whole log (nothing is in flight to it) and the cluster's
//!    metadata has its node alive: a group that sends no heartbeats while idle (quiesced)
//!    keeps its followers caught up as long as their nodes are up.
//!
//! A follower behind the commit index is out at once (neither rule holds). A dead follower of
//! a group that takes no writes still matches everything: it is out once its last ack is older
//! than the window *and* the controller has marked its node down (the node session timeout).
//! The leader itself is always caught up. A node that does not lead a group knows nothing
//! about its followers: only the leader's view counts (DescribeCluster asks the leaders).
//!
//! ## Lag
//! - in entries: the leader's last log index minus the follower's matched index (one Raft
//!   entry per produced batch, plus a blank entry per term and membership changes);
//! - in seconds: zero while caught up, else the time since this leader last saw it caught up
//!   (since the leadership began if it never did).
//!
//! ## Counters
//! [`Tracker::observe`] runs on every change of the group's metrics (the group's leadership
//! task) and counts elections this node started (a term it is a candidate or leader in) and
//! leaderships it won; a watch coalesces quick changes, so an election lost and retried
//! between two observations counts once.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use openraft::{Instant as _, ServerState};

use super::group::ELECTION_TIMEOUT_MAX_MS;
use super::types::PartitionRaft;

/// How recently a follower must have acknowledged the leader to count as caught up.
pub const CAUGHT_UP_ACK_WINDOW: Duration = Duration::from_millis(2 * ELECTION_TIMEOUT_MAX_MS);

/// This node's role in a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Leads the group.
    Leader,
    /// Follows a leader (or waits for one).
    Follower,
    /// Runs an election.
    Candidate,
    /// Replicates without a vote.
    Learner,
    /// Stopped.
    Shutdown,
}

impl Role {
    fn of(state: ServerState) -> Role {
        match state {
            ServerState::Leader => Role::Leader,
            ServerState::Follower => Role::Follower,
            ServerState::Candidate => Role::Candidate,
            ServerState::Learner => Role::Learner,
            ServerState::Shutdown => Role::Shutdown,
        }
    }
}

/// One follower as the leader sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FollowerStatus {
    /// Its node id.
    pub node: u64,
    /// The last log index it matched (None: nothing yet).
    pub matched: Option<u64>,
    /// How long ago it last acknowledged (None: never, in this leadership).
    pub acked_ago: Option<Duration>,
    /// Leader's last log index minus `matched`.
    pub lag_entries: u64,
    /// Zero while caught up; else the time since it was last seen caught up.
    pub behind_for: Duration,
    /// See the module doc.
    pub caught_up: bool,
}

/// A group's status on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupStatus {
    /// This node's role.
    pub role: Role,
    /// The current term.
    pub term: u64,
    /// The leader, if known.
    pub leader: Option<u64>,
    /// The last index in this node's Raft log.
    pub last_log_index: Option<u64>,
    /// The last index this node knows as committed.
    pub committed: Option<u64>,
    /// The last index applied to the partition log here.
    pub applied: Option<u64>,
    /// On the leader: every other voter, by node id. Empty elsewhere.
    pub followers: Vec<FollowerStatus>,
}

impl GroupStatus {
    /// True when this node leads and some follower is not caught up.
    pub fn under_replicated(&self) -> bool {
        self.role == Role::Leader && self.followers.iter().any(|f| !f.caught_up)
    }

    /// On the leader: the leader and its caught-up followers; elsewhere empty.
    pub fn caught_up(&self, me: u64) -> Vec<u64> {
        if self.role != Role::Leader {
            return Vec::new();
        }
        let mut nodes: Vec<u64> = std::iter::once(me)
            .chain(
                self.followers
                    .iter()
                    .filter(|f| f.caught_up)
                    .map(|f| f.node),
            )
            .collect();
        nodes.sort_unstable();
        nodes
    }
}

/// What the leader knows of one follower, for [`is_caught_up`].
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// The leader's commit index.
    pub committed: Option<u64>,
    /// The leader's last log index.
    pub last: Option<u64>,
    /// The follower's matched index.
    pub matched: Option<u64>,
    /// How long ago it acknowledged.
    pub acked_ago: Option<Duration>,
    /// Whether the cluster's metadata has its node alive.
    pub alive: bool,
}

/// Whether a follower is caught up (see the module doc).
pub fn is_caught_up(p: Progress) -> bool {
    let recent = p.acked_ago.is_some_and(|ago| ago <= CAUGHT_UP_ACK_WINDOW);
    (p.matched >= p.committed && recent) || (p.matched >= p.last && p.alive)
}

/// The status of every group on this node, with the liveness of nodes from `controller`'s
/// metadata.
pub fn statuses(
    controller: &crate::cluster::controller::Controller,
) -> Vec<(std::sync::Arc<super::group::Group>, GroupStatus)> {
    let alive: std::collections::BTreeSet<u64> = controller.view().with(|m| {
        m.nodes
            .iter()
            .filter(|(_, node)| node.alive)
            .map(|(id, _)| *id)
            .collect()
    });
    controller
        .replicas()
        .groups()
        .into_iter()
        .map(|group| {
            let status = group.status(&|node| alive.contains(&node));
            (group, status)
        })
        .collect()
}

#[derive(Debug, Default)]
struct Seen {
    /// The term of the last election counted.
    election_term: u64,
    /// The term of the last leadership counted.
    leader_term: u64,
    /// Per follower, when this leadership last saw it caught up.
    caught_up_at: BTreeMap<u64, Instant>,
    /// When this leadership was first observed (reset at every new term).
    leading_since: Option<(u64, Instant)>,
}

/// Follows a group's metrics for what the status needs over time.
#[derive(Debug)]
pub struct Tracker {
    me: u64,
    seen: parking_lot::Mutex<Seen>,
}

impl Tracker {
    /// A tracker of the group on node `me`.
    pub fn new(me: u64) -> Tracker {
        Tracker {
            me,
            seen: parking_lot::Mutex::default(),
        }
    }

    /// Takes one metrics change into account (cheap: a few map entries per group).
    pub fn observe(&self, metrics: &openraft::RaftMetrics<PartitionRaft>) {
        let mut seen = self.seen.lock();
        let term = metrics.current_term;
        let running_election =
            matches!(metrics.state, ServerState::Candidate | ServerState::Leader)
                && metrics.vote.leader_id.voted_for == self.me;
        if running_election && term > seen.election_term {
            seen.election_term = term;
            metrics::counter!(crate::metrics::REPLICATION_ELECTIONS_TOTAL).increment(1);
        }
        if metrics.state != ServerState::Leader {
            seen.caught_up_at.clear();
            seen.leading_since = None;
            return;
        }
        if term > seen.leader_term {
            seen.leader_term = term;
            metrics::counter!(crate::metrics::REPLICATION_LEADERSHIPS_WON_TOTAL).increment(1);
        }
        let now = Instant::now();
        if seen.leading_since.is_none_or(|(t, _)| t != term) {
            seen.leading_since = Some((term, now));
            seen.caught_up_at.clear();
        }
        // Liveness is not known here: only acknowledged progress marks a follower caught up.
        for follower in followers(self.me, metrics, &|_| false, |_| now) {
            if follower.caught_up {
                seen.caught_up_at.insert(follower.node, now);
            }
        }
    }

    /// The group's status from its current `metrics`; `alive(node)`: whether the cluster has
    /// the node alive.
    pub fn status(
        &self,
        metrics: &openraft::RaftMetrics<PartitionRaft>,
        alive: &dyn Fn(u64) -> bool,
    ) -> GroupStatus {
        let role = Role::of(metrics.state);
        let followers = if role == Role::Leader {
            let seen = self.seen.lock();
            let since = seen
                .leading_since
                .filter(|(term, _)| *term == metrics.current_term)
                .map(|(_, at)| at);
            followers(self.me, metrics, alive, |node| {
                seen.caught_up_at
                    .get(&node)
                    .copied()
                    .or(since)
                    .unwrap_or_else(Instant::now)
            })
        } else {
            Vec::new()
        };
        GroupStatus {
            role,
            term: metrics.current_term,
            leader: metrics.current_leader,
            last_log_index: metrics.last_log_index,
            committed: metrics.local_committed.as_ref().map(|id| id.index),
            applied: metrics.last_applied.as_ref().map(|id| id.index),
            followers,
        }
    }
}

/// The leader's followers (voters other than `me`) from its metrics; `caught_up_at(node)`
/// says when a follower not caught up now last was.
fn followers(
    me: u64,
    metrics: &openraft::RaftMetrics<PartitionRaft>,
    alive: &dyn Fn(u64) -> bool,
    caught_up_at: impl Fn(u64) -> Instant,
) -> Vec<FollowerStatus> {
    let committed = metrics.local_committed.as_ref().map(|id| id.index);
    let last = metrics.last_log_index;
    metrics
        .membership_config
        .membership()
        .voter_ids()
        .filter(|node| *node != me)
        .map(|node| {
            let matched = metrics
                .replication
                .as_ref()
                .and_then(|r| r.get(&node).cloned().flatten())
                .map(|id| id.index);
            let acked_ago = metrics
                .heartbeat
                .as_ref()
                .and_then(|h| h.get(&node).cloned().flatten())
                .map(|at| at.elapsed());
            let caught_up = is_caught_up(Progress {
                committed,
                last,
                matched,
                acked_ago,
                alive: alive(node),
            });
            FollowerStatus {
                node,
                matched,
                acked_ago,
                lag_entries: last.unwrap_or(0).saturating_sub(matched.unwrap_or(0)),
                behind_for: if caught_up {
                    Duration::ZERO
                } else {
                    caught_up_at(node).elapsed()
                },
                caught_up,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(
        committed: u64,
        last: u64,
        matched: Option<u64>,
        acked_ms: Option<u64>,
    ) -> Progress {
        Progress {
            committed: Some(committed),
            last: Some(last),
            matched,
            acked_ago: acked_ms.map(Duration::from_millis),
            alive: false,
        }
    }

    #[test]
    fn given_matched_commit_and_recent_ack_should_be_caught_up() {
        assert!(is_caught_up(progress(10, 12, Some(10), Some(100))));
        assert!(is_caught_up(progress(10, 12, Some(12), Some(100))));
        let nothing_yet = Progress {
            committed: None,
            last: None,
            matched: None,
            ..progress(0, 0, None, Some(100))
        };
        assert!(is_caught_up(nothing_yet));
    }

    #[test]
    fn given_behind_commit_or_stale_ack_should_not_be_caught_up() {
        assert!(!is_caught_up(progress(10, 10, Some(9), Some(100))));
        assert!(!is_caught_up(progress(10, 10, None, Some(100))));
        let stale = CAUGHT_UP_ACK_WINDOW.as_millis() as u64 + 1;
        assert!(!is_caught_up(progress(10, 10, Some(10), Some(stale))));
        assert!(!is_caught_up(progress(10, 10, Some(10), None)));
    }

    #[test]
    fn given_a_silent_follower_of_an_idle_group_should_follow_its_node_liveness() {
        let idle = |alive| Progress {
            alive,
            ..progress(10, 10, Some(10), None)
        };
        assert!(is_caught_up(idle(true)));
        assert!(!is_caught_up(idle(false)));
        // Something in flight to it: liveness alone does not do.
        let behind = Progress {
            alive: true,
            ..progress(10, 11, Some(10), None)
        };
        assert!(!is_caught_up(behind));
    }

    fn status(role: Role, followers: &[(u64, bool)]) -> GroupStatus {
        GroupStatus {
            role,
            term: 2,
            leader: Some(1),
            last_log_index: Some(5),
            committed: Some(5),
            applied: Some(5),
            followers: followers
                .iter()
                .map(|(node, caught_up)| FollowerStatus {
                    node: *node,
                    matched: Some(5),
                    acked_ago: None,
                    lag_entries: 0,
                    behind_for: Duration::ZERO,
                    caught_up: *caught_up,
                })
                .collect(),
        }
    }

    #[test]
    fn given_a_follower_behind_should_leave_it_out_and_be_under_replicated() {
        let leader = status(Role::Leader, &[(3, true), (2, false)]);
        assert_eq!(leader.caught_up(1), vec![1, 3]);
        assert!(leader.under_replicated());
        let healthy = status(Role::Leader, &[(3, true), (2, true)]);
        assert_eq!(healthy.caught_up(1), vec![1, 2, 3]);
        assert!(!healthy.under_replicated());
        let follower = status(Role::Follower, &[]);
        assert!(follower.caught_up(2).is_empty());
        assert!(!follower.under_replicated());
    }
}
