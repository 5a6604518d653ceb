//! Who belongs to the cluster: the controller group's membership, changed through openraft.
//!
//! Every node is a member of the controller's Raft group: the initial nodes (`--cluster`) are
//! its first voters; a node added later ([`Controller::add_node`]: `--join`, `syncline cluster
//! add-node`) is a learner: it receives and applies the metadata log like a voter and holds
//! replicas, without counting in the controller's quorum. [`Controller::set_voters`]
//! (`syncline cluster voters`) changes which members vote, through joint consensus, and only
//! to an odd number of live members: an even count tolerates no more failures than the odd
//! count below it and needs a larger majority. [`Controller::remove_member`] takes a node out
//! of the group (a voter is replaced by a live learner when there is one, keeping the count;
//! otherwise the count would turn even and the removal needs `--force`).
//!
//! These run on the controller leader (the server forwards calls there). A node that is not
//! a member is refused by the leader's heartbeat handler, and stops (a removed node).

use std::collections::{BTreeMap, BTreeSet};

use openraft::async_runtime::WatchReceiver as _;
use openraft::{BasicNode, ChangeMembers};

use super::controller::Controller;
use super::node::{format_voters, Voter, VOTERS_MAX};
use crate::error::BrokerError;

impl Controller {
    /// The controller's voters and all its members (voters and learners) with their
    /// addresses, as this node's log has them.
    pub fn membership(&self) -> (Vec<u64>, BTreeMap<u64, String>) {
        let metrics = self.raft().metrics().borrow_watched().clone();
        let membership = metrics.membership_config.membership();
        let voters = membership.voter_ids().collect();
        let members = membership
            .nodes()
            .map(|(id, node)| (*id, node.addr.clone()))
            .collect();
        (voters, members)
    }

    /// Whether `node` belongs to the cluster: a member of the controller group, or, before
    /// this node's log has a membership, one of the voters the cluster was formed with.
    pub fn is_member(&self, node: u64) -> bool {
        let (_, members) = self.membership();
        if members.is_empty() {
            return self.formed_by().contains_key(&node);
        }
        members.contains_key(&node)
    }

    /// The `--cluster` list the cluster was formed with.
    pub fn formed_by_text(&self) -> String {
        let voters: Vec<Voter> = self
            .formed_by()
            .iter()
            .map(|(id, address)| Voter {
                id: *id,
                address: address.clone(),
            })
            .collect();
        format_voters(&voters)
    }

    fn leader_only(&self, what: &str) -> Result<(), BrokerError> {
        if self.leader() == Some(self.node_id()) {
            Ok(())
        } else {
            Err(BrokerError::ControllerUnavailable {
                reason: format!(
                    "{what} runs on the controller leader, and node {} is not it",
                    self.node_id()
                ),
            })
        }
    }

    /// Adds node `id` at `address` as a learner of the controller (a node that joins; on the
    /// leader). `dir_id`: the joining node's data directory (empty from an admin). Adding a
    /// member again at the same address is a no-op; a node id in use by another data directory
    /// or by a live node at another address is refused.
    pub async fn add_node(&self, id: u64, address: &str, dir_id: &str) -> Result<(), BrokerError> {
        self.leader_only("adding a node")?;
        if !(1..=super::node::NODE_ID_MAX).contains(&id) {
            return Err(BrokerError::InvalidRequest(format!(
                "node id {id} is outside [1, {}]",
                super::node::NODE_ID_MAX
            )));
        }
        if address.rsplit_once(':').is_none_or(|(host, port)| {
            host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0)
        }) {
            return Err(BrokerError::InvalidRequest(format!(
                "`{address}` is not HOST:PORT"
            )));
        }
        let metadata = self.metadata();
        if let Some(known) = metadata.nodes.get(&id) {
            if !dir_id.is_empty() && !known.dir_id.is_empty() && known.dir_id != dir_id {
                return Err(BrokerError::ClusterRefused(
                    super::controller::node_id_taken(id, &known.dir_id, dir_id),
                ));
            }
            if known.alive && known.address != address {
                return Err(BrokerError::ClusterRefused(format!(
                    "node id {id} is in use by the live node at {}: give the new node an id of \
                     its own",
                    known.address
                )));
            }
        }
        if let Some((other, _)) = metadata
            .nodes
            .iter()
            .find(|(other, node)| **other != id && node.alive && node.address == address)
        {
            return Err(BrokerError::ClusterRefused(format!(
                "{address} is the address of live node {other}"
            )));
        }
        let (_, members) = self.membership();
        if members.get(&id).is_some_and(|known| known == address) {
            return Ok(());
        }
        if members.contains_key(&id) && self.membership().0.contains(&id) {
            return Err(BrokerError::ClusterRefused(format!(
                "node {id} is a controller voter at {}: remove it first to give its id another \
                 address",
                members[&id]
            )));
        }
        self.raft()
            .add_learner(
                id,
                BasicNode {
                    addr: address.to_string(),
                },
                false,
            )
            .await
            .map_err(|e| BrokerError::Controller(format!("adding node {id} at {address}: {e}")))?;
        tracing::info!(node = id, %address, "node added to the cluster (a learner of the controller)");
        Ok(())
    }

    /// Sets the controller's voters (on the leader): an odd number, at most
    /// [`VOTERS_MAX`], of live members. Voters left out stay members, as learners.
    pub async fn set_voters(&self, voters: &[u64]) -> Result<Vec<u64>, BrokerError> {
        self.leader_only("changing the controller's voters")?;
        let set: BTreeSet<u64> = voters.iter().copied().collect();
        if set.len() != voters.len() {
            return Err(BrokerError::InvalidRequest(format!(
                "the voters {voters:?} name a node twice"
            )));
        }
        if set.len().is_multiple_of(2) || set.len() > VOTERS_MAX {
            return Err(BrokerError::InvalidRequest(format!(
                "{} voters: give an odd number, at most {VOTERS_MAX} (an even number tolerates no \
                 more failed voters than one fewer, and needs a larger majority)",
                set.len()
            )));
        }
        let (_, members) = self.membership();
        let metadata = self.metadata();
        for node in &set {
            if !members.contains_key(node) {
                return Err(BrokerError::InvalidRequest(format!(
                    "node {node} is not a member of the cluster (members: {:?})",
                    members.keys().collect::<Vec<_>>()
                )));
            }
            if !metadata.nodes.get(node).is_some_and(|n| n.alive) {
                return Err(BrokerError::ClusterRefused(format!(
                    "node {node} is down: a new voter must be alive"
                )));
            }
        }
        self.raft()
            .change_membership(set.clone(), true)
            .await
            .map_err(|e| BrokerError::Controller(format!("changing the voters to {set:?}: {e}")))?;
        tracing::info!(voters = ?set, "controller voters changed");
        Ok(set.into_iter().collect())
    }

    /// Takes node `id` out of the controller group (on the leader). A voter is replaced by the
    /// live learner of the lowest id, if any; otherwise the voters would turn even (or none),
    /// which needs `force` (never none).
    pub async fn remove_member(&self, id: u64, force: bool) -> Result<(), BrokerError> {
        self.leader_only("removing a node")?;
        let (voters, members) = self.membership();
        if !members.contains_key(&id) {
            return Ok(());
        }
        if id == self.node_id() {
            // The leader does not remove itself: it hands the leadership to another voter,
            // which the caller's retry reaches.
            let metadata = self.metadata();
            let reachable = |node: u64| {
                metadata.nodes.get(&node).is_some_and(|n| n.alive)
                    && self.replicas().liveness.answered_within(
                        node,
                        crate::replication::handoff::REACHABLE_WITHIN,
                        std::time::Instant::now(),
                    )
            };
            if let Some(to) = voters.iter().copied().find(|v| *v != id && reachable(*v)) {
                self.raft()
                    .trigger()
                    .transfer_leader(to)
                    .await
                    .map_err(|e| BrokerError::Controller(e.to_string()))?;
                return Err(BrokerError::ControllerUnavailable {
                    reason: format!(
                        "node {id} led the controller and is the node being removed: it handed \
                         its leadership to node {to}; retry"
                    ),
                });
            }
        }
        if voters.contains(&id) {
            let metadata = self.metadata();
            let replacement = members.keys().copied().find(|node| {
                !voters.contains(node)
                    && *node != id
                    && metadata.nodes.get(node).is_some_and(|n| n.alive)
            });
            let mut new: BTreeSet<u64> = voters.iter().copied().filter(|v| *v != id).collect();
            if let Some(replacement) = replacement {
                new.insert(replacement);
            }
            if new.is_empty() {
                return Err(BrokerError::ClusterRefused(format!(
                    "node {id} is the controller's only voter: add another node and make it a \
                     voter first (`syncline cluster voters`)"
                )));
            }
            if new.len().is_multiple_of(2) && !force {
                return Err(BrokerError::ClusterRefused(format!(
                    "node {id} is one of the controller's {} voters and no other live node can \
                     take its place: add a node first, set an odd set of voters without it \
                     (`syncline cluster voters`), or give --force to leave {} voters",
                    voters.len(),
                    new.len()
                )));
            }
            self.raft()
                .change_membership(new.clone(), false)
                .await
                .map_err(|e| {
                    BrokerError::Controller(format!("changing the voters to {new:?}: {e}"))
                })?;
            tracing::info!(node = id, voters = ?new, "voter removed from the controller");
        } else {
            let gone: BTreeSet<u64> = [id].into();
            self.raft()
                .change_membership(ChangeMembers::RemoveNodes(gone), false)
                .await
                .map_err(|e| BrokerError::Controller(format!("removing node {id}: {e}")))?;
            tracing::info!(node = id, "learner removed from the controller");
        }
        Ok(())
    }
}
