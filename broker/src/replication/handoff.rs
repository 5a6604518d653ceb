//! Handing this node's partition leaderships to other replicas before it stops (SIGTERM), so
//! that a rolling restart costs no election timeouts: each group this node leads is asked to
//! transfer its leadership (openraft's TransferLeader: the target campaigns at once, and the
//! other replicas grant its vote despite the leader lease) to a follower that holds every
//! committed entry, and the stop waits, bounded, until those groups have another leader.
//!
//! A target must be alive in the metadata and have answered this node's last pings (every
//! 100 ms) within [`REACHABLE_WITHIN`]: in a rolling restart the node stopped just before is
//! still alive in the metadata for seconds.
//!
//! Fault model: a group with no such caught-up follower is left to an ordinary election after
//! the stop (moving it would lose nothing, but the target would first have to catch up); a
//! transfer that does not complete within the bound, or whose target stops answering pings
//! for [`GIVE_UP_SILENT`], is left the same way. Either way the
//! node stops as before: the hand-off only shortens the time without a leader, it is never
//! needed for safety. Writes arriving meanwhile get NotLeader naming the new leader, or are
//! retried by the producer (idempotent) when their outcome is unknown.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use super::group::Group;
use super::Replicas;

/// A hand-off target answered this node's pings at most this long ago.
pub const REACHABLE_WITHIN: Duration = Duration::from_millis(250);
/// A transfer whose target has not answered a ping for this long is given up.
pub const GIVE_UP_SILENT: Duration = Duration::from_millis(500);
/// How often the wait for moved leaderships looks again.
const POLL: Duration = Duration::from_millis(20);

/// What a hand-off did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct HandOff {
    /// Groups this node led when it began.
    pub led: usize,
    /// Of those, the groups another replica leads by the end.
    pub moved: usize,
    /// Of those, the groups with no caught-up follower to move to.
    pub no_target: usize,
}

/// The follower a group's leadership goes to: the first caught-up follower in the
/// partition's replica order, starting after the placement's preferred leader when that is
/// this node (so leaderships spread instead of piling onto one node).
fn target(me: u64, caught_up: &[u64], replicas: &[u64]) -> Option<u64> {
    let start = replicas.iter().position(|r| *r == me).map_or(0, |i| i + 1);
    (0..replicas.len())
        .map(|k| replicas[(start + k) % replicas.len()])
        .find(|r| *r != me && caught_up.contains(r))
}

impl Replicas {
    /// Transfers every leadership of this node to a caught-up follower and waits, at most
    /// `timeout`, until each of them has moved. `alive(node)`: whether the cluster has that
    /// node alive; `replicas_of(group)`: the partition's replica list (preferred first).
    pub async fn hand_off(
        &self,
        alive: &(dyn Fn(u64) -> bool + Sync),
        replicas_of: &(dyn Fn(&Group) -> Vec<u64> + Sync),
        timeout: Duration,
    ) -> HandOff {
        let me = self.context.me;
        let reachable = |node: u64| {
            alive(node)
                && self
                    .liveness
                    .answered_within(node, REACHABLE_WITHIN, std::time::Instant::now())
        };
        let mut report = HandOff::default();
        let mut moving: Vec<(Arc<Group>, u64)> = Vec::new();
        for group in self.groups() {
            if group.leadership().borrow().leader != Some(me) {
                continue;
            }
            report.led += 1;
            let status = group.status(alive);
            let caught_up: Vec<u64> = status
                .caught_up(me)
                .into_iter()
                .filter(|node| reachable(*node))
                .collect();
            let Some(to) = target(me, &caught_up, &replicas_of(&group)) else {
                report.no_target += 1;
                continue;
            };
            // A quiet group ticks again, so that the new leader's term starts as any other.
            group.quiet().wake(group.raft());
            match group.raft().trigger().transfer_leader(to).await {
                Ok(()) => moving.push((group, to)),
                Err(fatal) => {
                    tracing::warn!(group = %group.id(), %fatal, "cannot hand off a leadership")
                }
            }
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut pending: BTreeSet<usize> = (0..moving.len()).collect();
        while !pending.is_empty() && tokio::time::Instant::now() < deadline {
            let now = std::time::Instant::now();
            pending.retain(|&index| {
                let (group, to) = &moving[index];
                let moved = group
                    .leadership()
                    .borrow()
                    .leader
                    .is_some_and(|leader| leader != me);
                if moved {
                    report.moved += 1;
                    return false;
                }
                if !self.liveness.answered_within(*to, GIVE_UP_SILENT, now) {
                    tracing::warn!(group = %group.id(), to, "hand-off target stopped answering: an election follows the stop");
                    return false;
                }
                true
            });
            tokio::time::sleep(POLL).await;
        }
        for index in pending {
            tracing::warn!(group = %moving[index].0.id(), "leadership not handed off in time: an election follows the stop");
        }
        report
    }
}

#[cfg(test)]
mod tests {
    use super::target;

    #[test]
    fn given_caught_up_followers_should_pick_the_next_in_replica_order() {
        assert_eq!(target(1, &[1, 2, 3], &[1, 2, 3]), Some(2));
        assert_eq!(target(2, &[1, 2, 3], &[1, 2, 3]), Some(3));
        assert_eq!(target(3, &[1, 2, 3], &[1, 2, 3]), Some(1), "wraps around");
        assert_eq!(
            target(1, &[1, 3], &[1, 2, 3]),
            Some(3),
            "skips a lagging follower"
        );
    }

    #[test]
    fn given_no_caught_up_follower_should_pick_none() {
        assert_eq!(target(1, &[1], &[1, 2, 3]), None);
        assert_eq!(target(1, &[], &[1, 2, 3]), None);
    }
}
