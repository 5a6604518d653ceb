//! A partition group's state machine: the partition itself. Applying a committed entry runs
//! the partition's one-writer critical section ([`Partition::apply_proposal`]) on every replica
//! in log order; blank and membership entries change no record offset.
//!
//! ## Applied state (`<partition dir>/raft/applied.json`)
//! `{ last_applied, membership, end_offset }`: the last applied log id, the membership as of it
//! and the partition log's end offset right after it, written (temp file, fsync, rename,
//! directory fsync) when a snapshot is built, after the partition log was fsync'd up to
//! `end_offset`. The partition log is opened in `Published` visibility: readers see what apply
//! publishes, and the log is not fsync'd per write (the Raft log is). At open
//! ([`prepare_log`]) the partition log is cut back to `end_offset` before anything reads it;
//! openraft then re-applies the committed entries after `last_applied` from the Raft log,
//! deterministically, so they land at the same offsets with the same bytes as before.
//!
//! ## Snapshots
//! A snapshot is the partition log itself up to `end_offset`: building one writes the applied
//! state (after a sync of the partition log), so openraft may purge the Raft log below it.
//! Installing one on a follower that the leader's purged Raft log left behind needs the
//! leader's log segments shipped (not built yet: such a follower reports the error and stays
//! behind; the leader keeps `SNAPSHOT_KEEP` entries past each snapshot for this reason).

use std::io::{self, Cursor};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::{Stream, TryStreamExt as _};
use openraft::entry::RaftEntry as _;
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};
use serde::{Deserialize, Serialize};

use super::types::{term_of, Applied, LogId, PartitionRaft, SnapshotMeta, StoredMembership};
use crate::partition::Partition;

/// The applied-state file inside the group's directory.
pub const APPLIED_FILE: &str = "applied.json";

/// A partition group's snapshot with its data.
pub type Snapshot = openraft::type_config::alias::SnapshotOf<PartitionRaft, Cursor<Vec<u8>>>;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct AppliedFile {
    last_applied: Option<LogId>,
    membership: StoredMembership,
    end_offset: u64,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    last_applied: Option<LogId>,
    membership: StoredMembership,
    snapshot: Option<SnapshotMeta>,
}

/// The partition as a Raft state machine; clones share it.
#[derive(Debug, Clone)]
pub struct PartitionStateMachine {
    inner: Arc<tokio::sync::Mutex<Inner>>,
    partition: Arc<Partition>,
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

fn storage(error: crate::error::BrokerError) -> io::Error {
    io::Error::other(error.to_string())
}

impl PartitionStateMachine {
    /// Opens the state machine of `partition`, its applied state in `dir`. Refuses when the
    /// partition log does not end where the applied state says it does.
    pub fn open(dir: &Path, partition: Arc<Partition>) -> io::Result<PartitionStateMachine> {
        std::fs::create_dir_all(dir)?;
        let log = partition.local_log().map_err(storage)?;
        let path = dir.join(APPLIED_FILE);
        let mut inner = Inner {
            dir: dir.to_path_buf(),
            last_applied: None,
            membership: StoredMembership::default(),
            snapshot: None,
        };
        match std::fs::read(&path) {
            Ok(bytes) => {
                let file: AppliedFile = serde_json::from_slice(&bytes)
                    .map_err(|e| invalid(format!("{}: {e}", path.display())))?;
                let end = log.end_offset();
                if end != file.end_offset {
                    return Err(invalid(format!(
                        "{}: the partition log ends at offset {end}, but the applied state says {}",
                        path.display(),
                        file.end_offset
                    )));
                }
                inner.last_applied = file.last_applied;
                inner.membership = file.membership;
            }
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                let end = log.end_offset();
                if end != log.start_offset() {
                    return Err(invalid(format!(
                        "{} is missing, but the partition log holds offsets up to {end}",
                        path.display()
                    )));
                }
            }
            Err(error) => return Err(error),
        }
        Ok(PartitionStateMachine {
            inner: Arc::new(tokio::sync::Mutex::new(inner)),
            partition,
        })
    }

    fn write_applied(&self, inner: &Inner, end_offset: u64) -> io::Result<()> {
        let file = AppliedFile {
            last_applied: inner.last_applied,
            membership: inner.membership.clone(),
            end_offset,
        };
        let bytes = serde_json::to_vec(&file).map_err(|e| invalid(e.to_string()))?;
        crate::log::write_file_atomically(&inner.dir, APPLIED_FILE, &bytes)
    }
}

/// Cuts a replicated partition's log back to the end its last snapshot recorded (what was
/// applied after it is applied again from the Raft log), then publishes it to readers. Runs
/// at open, before anything reads the log. `raft_dir` is the group's directory.
pub fn prepare_log(log: &crate::log::Log, raft_dir: &Path) -> Result<(), String> {
    let path = raft_dir.join(APPLIED_FILE);
    let end = match std::fs::read(&path) {
        Ok(bytes) => {
            let file: AppliedFile =
                serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
            file.end_offset
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => log.start_offset(),
        Err(error) => return Err(format!("reading {}: {error}", path.display())),
    };
    if end > log.end_offset() {
        return Err(format!(
            "{} says the partition log was synced up to offset {end}, but it ends at {}",
            path.display(),
            log.end_offset()
        ));
    }
    if end < log.end_offset() {
        let dropped = log.end_offset() - end;
        log.truncate_to(end).map_err(|e| {
            format!("cutting the partition log back to its last snapshot ({end}): {e}")
        })?;
        tracing::info!(dir = %log.dir().display(), end, dropped, "cut the partition log back to its last snapshot; the Raft log re-applies the rest");
    }
    log.publish(end);
    Ok(())
}

impl RaftSnapshotBuilder<PartitionRaft> for PartitionStateMachine {
    type SnapshotData = Cursor<Vec<u8>>;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        let mut inner = self.inner.lock().await;
        let log = self.partition.local_log().map_err(storage)?.clone();
        let end = log.end_offset();
        tokio::task::spawn_blocking(move || log.sync())
            .await
            .map_err(io::Error::other)?
            .map_err(|e| io::Error::other(e.to_string()))?;
        self.write_applied(&inner, end)?;
        let meta = SnapshotMeta {
            last_log_id: inner.last_applied,
            last_membership: inner.membership.clone(),
        };
        inner.snapshot = Some(meta.clone());
        let data = serde_json::to_vec(&end).map_err(|e| invalid(e.to_string()))?;
        Ok(Snapshot {
            meta,
            snapshot: Cursor::new(data),
        })
    }
}

impl RaftStateMachine<PartitionRaft> for PartitionStateMachine {
    type SnapshotData = Cursor<Vec<u8>>;
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        let inner = self.inner.lock().await;
        Ok((inner.last_applied, inner.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm:
            Stream<Item = Result<EntryResponder<PartitionRaft>, io::Error>> + Unpin + OptionalSend,
    {
        let mut inner = self.inner.lock().await;
        let log = self.partition.local_log().map_err(storage)?.clone();
        let mut applied_any = false;
        while let Some((entry, responder)) = entries.try_next().await? {
            let outcome = match &entry.payload {
                EntryPayload::Blank => Applied::Refused(String::new()),
                EntryPayload::Normal(proposal) => {
                    let epoch = u32::try_from(term_of(&entry.log_id())).map_err(|_| {
                        invalid(format!(
                            "term {} does not fit a batch's leader epoch",
                            term_of(&entry.log_id())
                        ))
                    })?;
                    self.partition
                        .apply_proposal(proposal, epoch)
                        .map_err(storage)?
                }
                EntryPayload::Membership(membership) => {
                    inner.membership =
                        StoredMembership::new(Some(entry.log_id()), membership.clone());
                    Applied::Refused(String::new())
                }
            };
            inner.last_applied = Some(entry.log_id());
            applied_any = true;
            if let Some(responder) = responder {
                responder.send(outcome);
            }
        }
        if applied_any {
            // Readers see it now: it is committed (on a majority of Raft logs, each fsync'd).
            log.publish(log.end_offset());
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        _snapshot: Self::SnapshotData,
    ) -> Result<(), io::Error> {
        Err(io::Error::other(format!(
            "partition {} of topic `{}`: this replica is behind the leader's Raft log (snapshot up to {:?}); catching up from a copy of the leader's log is not supported yet",
            self.partition.id, self.partition.topic, meta.last_log_id
        )))
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        let inner = self.inner.lock().await;
        Ok(inner.snapshot.clone().map(|meta| Snapshot {
            meta,
            snapshot: Cursor::new(Vec::new()),
        }))
    }
}
