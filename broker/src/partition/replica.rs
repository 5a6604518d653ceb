//! A replicated partition's side of the write path: what the leader checks before it proposes
//! a batch to the partition's Raft group ([`Replica`]), and what every replica runs when it
//! applies a committed proposal ([`Partition::apply_proposal`]): the same one-writer critical
//! section as a single-replica partition, with the proposal's clock, so every replica decides
//! the same and assigns the same offsets.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use syncline_proto::batch::{Batch, ATTR_BROKER_RESERVED};
use tokio::sync::oneshot;

use super::{now_ms, Condition, Partition};
use crate::error::BrokerError;
use crate::log::{Appended, Log};
use crate::replication::types::{Applied, Proposal, ProposedCondition};

/// What a replicated write resolves to once applied: its outcome, or why it has none.
pub type AppliedReceiver = oneshot::Receiver<Result<Applied, BrokerError>>;

/// The replication layer's handle on one partition's Raft group (see `replication::group`).
pub trait Replica: Send + Sync + std::fmt::Debug {
    /// Proposes `proposal` after every proposal submitted before it (the order of calls is the
    /// order in the log); the receiver resolves once it is applied on this node.
    fn submit(&self, proposal: Proposal) -> Result<AppliedReceiver, BrokerError>;
    /// Ok while this node leads the group; `NotLeader` naming the leader (if known) otherwise.
    fn check_leader(&self) -> Result<(), BrokerError>;
    /// The term this node leads (and serves) the group in, if it does.
    fn serving_term(&self) -> Option<u64>;
    /// Resolves once this node has confirmed with a majority that it still leads and has
    /// applied everything committed before the call (a linearizable read's barrier).
    fn read_barrier(&self) -> Pin<Box<dyn Future<Output = Result<(), BrokerError>> + Send + '_>>;
    /// Stops the group (the partition is closing or deleted).
    fn shutdown(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

/// A write handed to the partition: appended here, or proposed to its group.
#[derive(Debug)]
pub enum Submitted {
    /// Appended to this node's log (single replica); durable once the log syncs past it.
    Local(Appended),
    /// Proposed; offsets are assigned when the group applies it.
    Replicated(AppliedReceiver),
}

impl Partition {
    /// Marks the partition as a Raft group's replica (set at open from the topic's replication
    /// factor, before anything is served).
    pub fn into_replicated(mut self) -> Partition {
        self.replicated = true;
        self
    }

    /// True when the partition is a Raft group over several replicas.
    pub fn is_replicated(&self) -> bool {
        self.replicated
    }

    /// Attaches the running group (the replication layer calls this once it started).
    pub fn attach_replica(&self, replica: Arc<dyn Replica>) {
        *self.replica.write() = Some(replica);
    }

    /// The group's handle, if it runs.
    pub fn replica(&self) -> Option<Arc<dyn Replica>> {
        self.replica.read().clone()
    }

    /// Detaches and stops the group.
    pub async fn detach_replica(&self) {
        let replica = self.replica.write().take();
        if let Some(replica) = replica {
            replica.shutdown().await;
        }
    }

    /// Ok when this node may serve the partition's clients: always for a single replica; for a
    /// replicated one only while it leads the group.
    pub fn check_leader(&self) -> Result<(), BrokerError> {
        if !self.replicated {
            return Ok(());
        }
        match self.replica.read().as_ref() {
            Some(replica) => replica.check_leader(),
            None => Err(BrokerError::NotLeader {
                topic: self.topic.to_string(),
                partition: self.id,
                leader: super::RemoteLeader::default(),
            }),
        }
    }

    /// The node serving the partition's clients when it is another node: the holder of a
    /// partition placed elsewhere, or the leader of a replicated partition this node does not
    /// lead (when known).
    pub fn leader_elsewhere(&self) -> Option<super::RemoteLeader> {
        if let Some(leader) = self.remote_leader() {
            return Some(leader.clone());
        }
        match self.check_leader() {
            Err(BrokerError::NotLeader { leader, .. }) if leader.id.is_some() => Some(leader),
            _ => None,
        }
    }

    /// The Raft term this node serves the partition in (0 for a single replica), if it does.
    pub fn serving_term(&self) -> Option<u64> {
        if !self.replicated {
            return Some(0);
        }
        self.replica.read().as_ref().and_then(|r| r.serving_term())
    }

    fn running_replica(&self) -> Result<Arc<dyn Replica>, BrokerError> {
        self.replica
            .read()
            .clone()
            .ok_or_else(|| BrokerError::NotLeader {
                topic: self.topic.to_string(),
                partition: self.id,
                leader: super::RemoteLeader::default(),
            })
    }

    /// Waits until a read on this node is linearizable: a no-op for a single replica; for a
    /// replicated partition, the group's read barrier.
    pub async fn read_barrier(&self) -> Result<(), BrokerError> {
        if !self.replicated {
            return Ok(());
        }
        let replica = self.running_replica()?;
        replica.read_barrier().await
    }

    /// Validates a client's encoded batch and writes it: appended here (one replica) or
    /// proposed to the group (replicated). Nothing is written when it is refused.
    pub fn submit_batch(
        &self,
        bytes: Bytes,
        conditions: &[Condition],
    ) -> Result<Submitted, BrokerError> {
        if !self.replicated {
            return self.append_batch(bytes, conditions).map(Submitted::Local);
        }
        self.check_leader()?;
        let batch = Batch::parse(bytes.clone())
            .map_err(|e| BrokerError::InvalidRequest(format!("invalid batch: {e}")))?;
        let reserved = batch.header().attributes & ATTR_BROKER_RESERVED;
        if reserved != 0 {
            return Err(BrokerError::InvalidRequest(format!(
                "invalid batch: attribute bits {reserved:#06x} (bit 4 = control) are reserved for batches the broker writes itself; clients must leave them 0"
            )));
        }
        self.check_records(&batch)?;
        self.propose(&batch, bytes, conditions)
    }

    /// Encodes plain records into one batch and writes it (see [`Partition::submit_batch`]).
    pub fn submit_records(
        &self,
        records: &[super::PlainRecord],
        producer: Option<(i64, i16, i32)>,
        conditions: &[Condition],
        now_ms: i64,
    ) -> Result<Submitted, BrokerError> {
        if !self.replicated {
            return self
                .append_records(records, producer, conditions, now_ms)
                .map(Submitted::Local);
        }
        self.check_leader()?;
        let batch = super::encode_records(records, producer, now_ms)?;
        self.check_records(&batch)?;
        let bytes = batch.as_bytes().clone();
        self.propose(&batch, bytes, conditions)
    }

    fn propose(
        &self,
        batch: &Batch,
        bytes: Bytes,
        conditions: &[Condition],
    ) -> Result<Submitted, BrokerError> {
        self.check_conditions(conditions)?;
        self.check_fence(batch.header())?;
        let replica = self.running_replica()?;
        let proposal = Proposal {
            now_ms: now_ms(),
            conditions: conditions.iter().map(ProposedCondition::from).collect(),
            batch: bytes,
        };
        replica.submit(proposal).map(Submitted::Replicated)
    }

    /// Waits for a submitted write: for a single replica until the log is durable past it
    /// when `durable` (else at once); for a replicated one until the group applied it
    /// (committed on a majority, each having fsync'd it), whatever `durable` says: its offsets
    /// are assigned when it is applied.
    pub async fn acknowledged(
        &self,
        submitted: Submitted,
        durable: bool,
    ) -> Result<Appended, BrokerError> {
        match submitted {
            Submitted::Local(appended) => {
                if durable {
                    let log = self.local_log()?;
                    log.wait_durable(appended.durable_target())
                        .await
                        .map_err(|e| self.log_error(e))?;
                }
                Ok(appended)
            }
            Submitted::Replicated(receiver) => {
                let applied = receiver.await.map_err(|_| BrokerError::Replication {
                    topic: self.topic.to_string(),
                    partition: self.id,
                    reason: "the partition's replication group stopped before the write was applied; it may still be committed".into(),
                })??;
                self.applied_to_result(applied)
            }
        }
    }

    /// What a group's apply outcome means to the writer.
    pub(crate) fn applied_to_result(&self, applied: Applied) -> Result<Appended, BrokerError> {
        match applied {
            Applied::Appended {
                base_offset,
                last_offset,
            } => Ok(Appended {
                base_offset,
                last_offset,
            }),
            Applied::CasConflict { message, current } => Err(BrokerError::CasConflict {
                message,
                current: current
                    .into_iter()
                    .map(|(key, version, absent)| syncline_proto::v1::KeyVersion {
                        key,
                        version,
                        absent,
                    })
                    .collect(),
            }),
            Applied::Sequence(refusal) => Err(BrokerError::Sequence(refusal.into())),
            Applied::Refused(reason) => Err(BrokerError::InvalidRequest(reason)),
        }
    }

    /// Replaces this replica's log with another one (a snapshot installed from the leader):
    /// `reopen` gets the current log, which it must leave closed, and returns the new log
    /// opened on the same directory. Runs in the one-writer critical section: the live state
    /// (key index, producer state) is rebuilt from the new log as a partition opening from disk
    /// rebuilds it, the new log is published up to its end (it holds committed records only),
    /// and both are swapped in together, so no reader or writer sees one without the other.
    /// On an error the partition keeps its (closed) old log: the caller stops the replica.
    /// Blocking.
    pub fn replace_log(
        &self,
        reopen: impl FnOnce(&Log) -> Result<Log, String>,
    ) -> Result<(), BrokerError> {
        let broken = |reason: String| BrokerError::Replication {
            topic: self.topic.to_string(),
            partition: self.id,
            reason,
        };
        let slot = self
            .state
            .as_ref()
            .map_err(|_| broken("the partition holds no log here".into()))?;
        let mut live = self.live.lock();
        let old = slot.read().clone();
        let new = reopen(&old).map_err(&broken)?;
        // A state snapshot of the old log describes another history: rebuilt from the new log.
        crate::state::PartitionState::discard(new.dir())
            .map_err(|e| broken(format!("removing the old log's state snapshot: {e}")))?;
        let state = super::restore_state(&new, self.is_table).map_err(&broken)?;
        let visible = new.publish(new.end_offset());
        debug_assert!(
            visible >= old.durable_offset(),
            "a reader saw past the image"
        );
        *live = state;
        *slot.write() = Arc::new(new);
        Ok(())
    }

    /// Applies a committed proposal (every replica, in log order): the one-writer critical
    /// section with the proposal's clock; the batch is stamped with `leader_epoch` (the
    /// entry's Raft term). A refusal (CAS conflict, sequence) is an outcome, the same on every
    /// replica; only a storage failure is an error (the group stops on this node).
    pub fn apply_proposal(
        &self,
        proposal: &Proposal,
        leader_epoch: u32,
    ) -> Result<Applied, BrokerError> {
        let log = self.local_log()?;
        let batch = match Batch::parse(proposal.batch.clone()) {
            Ok(batch) => batch,
            Err(error) => return Ok(Applied::Refused(format!("invalid batch: {error}"))),
        };
        let keys = match self.check_records(&batch) {
            Ok(keys) => keys,
            Err(error) => return Ok(Applied::Refused(error.to_string())),
        };
        let conditions: Vec<Condition> = proposal.conditions.iter().map(Condition::from).collect();
        let result = self.write_checked(
            &log,
            &batch,
            keys,
            &conditions,
            proposal.now_ms,
            false,
            |log, batch| log.append_batch_at(batch, leader_epoch),
        );
        match result {
            Ok(appended) => Ok(Applied::Appended {
                base_offset: appended.base_offset,
                last_offset: appended.last_offset,
            }),
            Err(BrokerError::CasConflict { message, current }) => Ok(Applied::CasConflict {
                message,
                current: current
                    .into_iter()
                    .map(|k| (k.key, k.version, k.absent))
                    .collect(),
            }),
            Err(BrokerError::Sequence(error)) => Ok(Applied::Sequence(error.into())),
            Err(error @ BrokerError::Log { .. }) => Err(error),
            Err(other) => Ok(Applied::Refused(other.to_string())),
        }
    }
}
