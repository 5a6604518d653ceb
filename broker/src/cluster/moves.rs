//! Moving a partition to another replica set, driven by the partition's leader.
//!
//! A move starts when the controller commits `Command::Reassign` (`syncline topic reassign`,
//! `cluster rebalance`, `cluster remove-node`): the metadata then names the move's target
//! beside the current replicas, and every node of the target creates its replica (an empty
//! log and a group that waits to be added: `reconcile`). The node that leads the partition's
//! Raft group drives the rest, one step per pass, each step idempotent so a new leader picks
//! up where a failed one stopped:
//!
//! 1. adds each new replica as a learner (openraft `add_learner`); the leader replicates to
//!    it, by snapshot when its Raft log no longer reaches back far enough, at the move's
//!    throttle (`replication::throttle`);
//! 2. waits until every new replica holds the leader's log as it was when the wait began and
//!    is within [`CAUGHT_UP_LAG`] entries of its end;
//! 3. when the leader itself is not in the target, hands the leadership to a caught-up target
//!    replica (the new leader's pass carries on) so the group never runs without a leader;
//! 4. changes the group's voters to the target (joint consensus: both sets must acknowledge
//!    every entry until the new configuration commits), and the replicas left out leave;
//! 5. proposes `Command::CompleteMove`: the metadata's replicas become the target, and the
//!    nodes that hold a replica no longer placed on them remove it (`reconcile`).
//!
//! Writes continue throughout: the group keeps its leader and its majority at every step.
//!
//! It may call the controller, the metadata, and the replication groups.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use super::controller::Controller;
use super::metadata::{same_set, Command, Move};
use crate::replication::group::Group;
use crate::replication::network::GroupId;

/// The throttle of a move that does not name one (bytes/s): a fifth of a commodity SSD's
/// sequential write rate, so producers keep most of the disk.
pub const DEFAULT_THROTTLE_BYTES_PER_SEC: u64 = 50 * 1024 * 1024;
/// A new replica this close to the end of the leader's log (entries), once it holds the log
/// as it was when the wait began, counts as caught up. Entries are whole produce batches (up
/// to a MiB each), so a count alone says little: with only "within 1,000 entries", a 1 GiB
/// partition counted as caught up before its copy began (measured), and the move completed
/// with the new replica far behind (safe, since the joint configuration's majorities did not
/// need it, but unthrottled and under-replicated until it caught up).
pub const CAUGHT_UP_LAG: u64 = 64;
/// How often a move's progress is checked.
const POLL: Duration = Duration::from_millis(100);

/// The moves this node drives now (one task per group).
#[derive(Debug, Default)]
pub struct Movers {
    running: parking_lot::Mutex<HashSet<GroupId>>,
}

impl Movers {
    /// Starts a driver for every move of a group this node leads that has none.
    pub fn drive_all(&self, controller: &Arc<Controller>) {
        let metadata = controller.metadata();
        let me = controller.node_id();
        // Throttles of moves this node no longer drives go (see `replication::throttle`).
        controller.replicas().throttle().retain_groups(|id| {
            metadata
                .partition_by_id(&id.topic_id, id.partition)
                .is_some_and(|p| p.moving.is_some())
                && controller
                    .replicas()
                    .get(id)
                    .is_some_and(|g| g.leadership().borrow().leader == Some(me))
        });
        for (name, topic) in &metadata.topics {
            for (number, placement) in topic.partitions.iter().enumerate() {
                let Some(moving) = placement.moving.clone() else {
                    continue;
                };
                let id = GroupId {
                    topic_id: topic.id.clone(),
                    partition: number as u32,
                };
                let Some(group) = controller.replicas().get(&id) else {
                    continue;
                };
                if group.leadership().borrow().leader != Some(controller.node_id())
                    || !self.running.lock().insert(id.clone())
                {
                    continue;
                }
                let controller = controller.clone();
                let name = name.clone();
                tokio::spawn(async move {
                    let result = drive(&controller, &group, &name, &moving).await;
                    controller.movers().running.lock().remove(&id);
                    match result {
                        Ok(Step::Done) => {}
                        Ok(Step::HandedOff(to)) => {
                            tracing::info!(group = %id, to, "move: leadership handed to a replica of the target")
                        }
                        Err(error) => {
                            tracing::warn!(group = %id, %error, "move not finished; the next pass retries")
                        }
                    }
                });
            }
        }
    }
}

/// How a driver pass ended.
enum Step {
    /// The move is complete.
    Done,
    /// The leadership went to this target replica, whose pass carries on.
    HandedOff(u64),
}

async fn drive(
    controller: &Controller,
    group: &Arc<Group>,
    topic: &str,
    moving: &Move,
) -> Result<Step, String> {
    let me = controller.node_id();
    let id = group.id().clone();
    let target = &moving.target;
    let (voters, learners, joint) = group.membership();
    let still_moving = || {
        controller.view().with(|m| {
            m.partition_by_id(&id.topic_id, id.partition)
                .and_then(|p| p.moving.as_ref())
                .is_some_and(|m| m.target == *target)
        })
    };
    if !same_set(&voters, target) || joint {
        // 1. New replicas as learners, throttled while they catch up.
        for node in target.iter().filter(|n| !voters.contains(n)) {
            controller
                .replicas()
                .throttle()
                .set(&id, *node, moving.throttle_bytes_per_sec);
            if !learners.contains(node) {
                let address = controller
                    .address_of(*node)
                    .ok_or_else(|| format!("node {node} has no known address"))?;
                group.add_learner(*node, address).await?;
                tracing::info!(group = %id, node, throttle = moving.throttle_bytes_per_sec, "move: new replica added as a learner");
            }
        }
        // 2. Wait until they caught up (while this node serves as the group's leader and the
        //    move stands): each holds the log as it was when the wait began, and keeps within
        //    CAUGHT_UP_LAG entries of it.
        let goal = group.last_index();
        loop {
            if !group.leadership().borrow().serving || !still_moving() {
                return Err("this node no longer leads the group, or the move changed".into());
            }
            let caught_up = target.iter().filter(|n| !voters.contains(n)).all(|n| {
                group.matched_of(*n).is_some_and(|matched| matched >= goal)
                    && group.lag_of(*n).is_some_and(|lag| lag <= CAUGHT_UP_LAG)
            });
            if caught_up {
                break;
            }
            tokio::time::sleep(POLL).await;
        }
        // 3. A leader leaving the group hands over first, to a voter staying in it that holds
        //    every entry (a learner cannot lead); without one, the membership change below
        //    commits without this node, which then steps down and the rest elect a leader.
        if !target.contains(&me) {
            let to = target
                .iter()
                .copied()
                .filter(|n| voters.contains(n))
                .find(|n| group.lag_of(*n) == Some(0));
            if let Some(to) = to {
                group.transfer_to(to).await?;
                return Ok(Step::HandedOff(to));
            }
        }
        // 4. The voters become the target.
        group.change_voters(target).await?;
        tracing::info!(group = %id, voters = ?target, "move: the group's voters changed");
    } else if !group.membership_committed() {
        // The target's configuration is this replica's but not yet committed (a leader that
        // proposed it failed): commit it before the metadata says the move is done.
        group.change_voters(target).await?;
    }
    controller.replicas().throttle().clear_group(&id);
    // 5. The metadata follows.
    let (voters, _, _) = group.membership();
    controller
        .propose(Command::CompleteMove {
            topic: topic.to_string(),
            id: id.topic_id.clone(),
            partition: id.partition,
            replicas: voters,
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    metrics::counter!(crate::metrics::REPLICATION_MOVES_COMPLETED_TOTAL).increment(1);
    tracing::info!(group = %id, topic, partition = id.partition, replicas = ?target, "move completed");
    Ok(Step::Done)
}
