//! Preferred leaders: each partition's first replica (the placement's, or the one a reassign
//! or rebalance put first) is the one that should lead it, so that leaderships, and the
//! work of serving writes that comes with them, stay spread the way the placement spread them.
//! After a failover or a rolling restart the leaderships pile onto the nodes that stayed up;
//! every [`PREFERRED_LEADER_INTERVAL`] each node hands each leadership it holds but does not
//! prefer back to the preferred replica (openraft TransferLeader, as the SIGTERM hand-off does)
//! once that replica is alive, answers this node's pings and holds every committed entry.
//! A leadership younger than [`SETTLE`] stays where it is: right after a SIGTERM hand-off the
//! stopping node (often the preferred one) still answers pings until it exits, and moving the
//! leadership back to it would cost the election the hand-off avoided.
//!
//! Fault model: as the hand-off's (`handoff`): a transfer that does not happen leaves the
//! leadership where it is until the next pass; nothing is lost either way, writes arriving
//! meanwhile get NotLeader naming the new leader.

use std::time::Duration;

use super::group::Group;
use super::handoff::REACHABLE_WITHIN;
use super::Replicas;

/// How often leaderships are moved back to their preferred replicas.
pub const PREFERRED_LEADER_INTERVAL: Duration = Duration::from_secs(5);
/// A leadership this young is not moved.
pub const SETTLE: Duration = Duration::from_secs(10);

impl Replicas {
    /// One pass (see the module doc): `alive(node)` whether the cluster has that node alive,
    /// `preferred_of(group)` the partition's preferred replica (None: leave it, e.g. while it
    /// moves). Returns how many transfers it started.
    pub async fn restore_preferred(
        &self,
        alive: &(dyn Fn(u64) -> bool + Sync),
        preferred_of: &(dyn Fn(&Group) -> Option<u64> + Sync),
    ) -> usize {
        let me = self.context.me;
        let mut started = 0;
        let now = std::time::Instant::now();
        let groups = self.groups();
        {
            let mut seen = self.serving_since.lock();
            seen.retain(|id, _| groups.iter().any(|g| g.id() == id));
        }
        for group in groups {
            let leadership = *group.leadership().borrow();
            if !leadership.serving {
                continue;
            }
            let since = {
                let mut seen = self.serving_since.lock();
                let entry = seen
                    .entry(group.id().clone())
                    .or_insert((leadership.term, now));
                if entry.0 != leadership.term {
                    *entry = (leadership.term, now);
                }
                entry.1
            };
            if now.duration_since(since) < SETTLE {
                continue;
            }
            let Some(preferred) = preferred_of(&group).filter(|p| *p != me) else {
                continue;
            };
            let reachable = alive(preferred)
                && self.liveness.answered_within(
                    preferred,
                    REACHABLE_WITHIN,
                    std::time::Instant::now(),
                );
            if !reachable || !group.status(alive).caught_up(me).contains(&preferred) {
                continue;
            }
            group.quiet().wake(group.raft());
            match group.raft().trigger().transfer_leader(preferred).await {
                Ok(()) => {
                    started += 1;
                    tracing::info!(group = %group.id(), to = preferred, "leadership moved back to the preferred replica");
                }
                Err(fatal) => {
                    tracing::warn!(group = %group.id(), %fatal, "cannot move a leadership to its preferred replica")
                }
            }
        }
        started
    }
}
