//! A partition group's state machine: the partition itself. Applying a committed entry runs
//! the partition's one-writer critical section ([`Partition::apply_proposal`]) on every replica
//! in log order; blank and membership entries change no record offset.
//!
//! ## Applied state (`<partition dir>/raft/applied.json`)
//! `{ last_applied, membership, end_offset }`: the last applied log id, the membership as of it
//! and the partition log's end offset right after it, written (temp file, fsync, rename,
//! directory fsync) when a snapshot is built or sent, after the partition log was fsync'd up
//! to `end_offset`, and by a snapshot install. The partition log is opened in `Published` visibility: readers see what apply
//! publishes, and the log is not fsync'd per write (the Raft log is). At open
//! ([`prepare_log`]) the partition log is cut back to `end_offset` before anything reads it;
//! openraft then re-applies the committed entries after `last_applied` from the Raft log,
//! deterministically, so they land at the same offsets with the same bytes as before.
//!
//! ## Snapshots
//! A snapshot is the partition log itself up to `end_offset`, described by the applied state.
//! - **Build** (every `raft_snapshot_every` entries, [`RaftSnapshotBuilder::build_snapshot`]):
//!   under the state machine's lock, the partition log is fsync'd and `applied.json` written
//!   (skipped when it already says so); openraft may then purge the Raft log below it, keeping
//!   `raft_snapshot_keep` entries for followers a little behind. Its data is the meta alone.
//! - **Send** (openraft asks for the current snapshot for a follower behind its purged Raft
//!   log): the same under the lock (so the meta is the applied state right now, durable), then
//!   `SnapshotImage::export` hard-links every segment file into
//!   `raft/snapshot-out-<pid>-<n>/` with each file's length and writes the manifest there; the
//!   lock keeps applies out, so the image ends exactly at the meta's `end_offset`. Failures give
//!   an image that cannot be sent (openraft retries) instead of stopping the group. The bytes go
//!   on `Peer.InstallSnapshot` (`snapshot.rs`: format, chunk CRCs, limits) and the receiver
//!   verifies them as a log before openraft sees them.
//! - **Install** ([`RaftStateMachine::install_snapshot`], on a follower, with the verified image
//!   in `raft/snapshot-in-<pid>-<n>/`):
//!   1. `raft/install.json` is written (temp file, fsync, rename, directory fsync):
//!      ```text
//!      { "staging": "snapshot-in-<pid>-<n>", "files": [every log file of the verified image],
//!        "applied": { "last_applied", "membership", "end_offset" } }
//!      ```
//!   2. in the partition's one-writer critical section ([`Partition::replace_log`]): the old
//!      log is closed; the partition directory's log files are replaced by the image's
//!      (`log::replace_files`: files the image lacks deleted, the image's renamed in, directory
//!      fsync'd), the partition's state snapshot of the old log deleted, `applied.json` written,
//!      the marker deleted (raft directory fsync'd), the staging directory removed; the log is
//!      opened again (a clean open: the verification built its indexes), the key index and
//!      producer state rebuilt from it as at any open, it is published up to its end, and log and
//!      state are swapped in together.
//!
//!   The image holds every record the follower applied, at the same offsets (both are prefixes
//!   of the same committed history; the leader's may be compacted), so no offset a reader saw
//!   is reused and the visible offset never goes back.
//!
//! ### Fault model of an install
//! - Before the marker is durable, nothing of the partition log changed: a crash leaves the old
//!   log (the staging directory is removed at the next open).
//! - Once it is, the install only goes forward: at the next open [`recover_install`] runs the
//!   rest of step 2 before the partition log opens (every step is idempotent: a file is in the
//!   staging directory or already moved, never lost), so the partition opens with the new log
//!   and the applied state the marker names. The staged files were fsync'd and verified before
//!   the marker was written.
//! - An error during the install (after the marker) fails openraft's storage call, which stops
//!   the group on this node; the node's next start finishes the install from the marker.
//! - Staging directories (`raft/snapshot-*`) a crash leaves behind are removed at open.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::{Stream, TryStreamExt as _};
use openraft::entry::RaftEntry as _;
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};
use serde::{Deserialize, Serialize};

use super::snapshot::SnapshotImage;
use super::types::{term_of, Applied, LogId, PartitionRaft, SnapshotMeta, StoredMembership};
use crate::partition::Partition;

/// The applied-state file inside the group's directory.
pub const APPLIED_FILE: &str = "applied.json";
/// The marker of a snapshot install under way, inside the group's directory.
pub const INSTALL_FILE: &str = "install.json";
/// The group's directory inside the partition's.
pub const RAFT_DIR: &str = "raft";

/// A partition group's snapshot with its data.
pub type Snapshot = openraft::type_config::alias::SnapshotOf<PartitionRaft, SnapshotImage>;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct AppliedFile {
    last_applied: Option<LogId>,
    membership: StoredMembership,
    end_offset: u64,
}

/// `install.json`: a snapshot install under way (see the module doc).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct InstallMarker {
    /// The staging directory (a name inside the group's directory) holding the verified image.
    staging: String,
    /// The files that make up the new partition log.
    files: Vec<String>,
    /// The applied state once installed.
    applied: AppliedFile,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    last_applied: Option<LogId>,
    membership: StoredMembership,
    /// The last snapshot: the applied state last made durable in `applied.json`.
    snapshot: Option<SnapshotMeta>,
    /// `(last_applied, end_offset)` as `applied.json` holds them.
    persisted: Option<(Option<LogId>, u64)>,
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

fn joined(error: tokio::task::JoinError) -> io::Error {
    io::Error::other(format!("a storage task failed: {error}"))
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
            persisted: None,
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
                inner.membership = file.membership.clone();
                inner.snapshot = Some(SnapshotMeta {
                    last_log_id: file.last_applied,
                    last_membership: file.membership,
                });
                inner.persisted = Some((file.last_applied, file.end_offset));
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

    /// Makes the applied state durable as a snapshot (sync of the partition log, then
    /// `applied.json`) unless it already is; returns its meta and end offset. The caller
    /// holds the lock, so no entry is applied meanwhile.
    async fn persist(&self, inner: &mut Inner) -> io::Result<(SnapshotMeta, u64)> {
        let log = self.partition.local_log().map_err(storage)?;
        let end = log.end_offset();
        if inner.persisted != Some((inner.last_applied, end)) {
            tokio::task::spawn_blocking(move || log.sync())
                .await
                .map_err(joined)?
                .map_err(|e| io::Error::other(e.to_string()))?;
            let file = AppliedFile {
                last_applied: inner.last_applied,
                membership: inner.membership.clone(),
                end_offset: end,
            };
            write_applied(&inner.dir, &file)?;
            inner.persisted = Some((inner.last_applied, end));
        }
        let meta = SnapshotMeta {
            last_log_id: inner.last_applied,
            last_membership: inner.membership.clone(),
        };
        inner.snapshot = Some(meta.clone());
        Ok((meta, end))
    }
}

fn write_applied(dir: &Path, file: &AppliedFile) -> io::Result<()> {
    let bytes = serde_json::to_vec(file).map_err(|e| invalid(e.to_string()))?;
    crate::log::write_file_atomically(dir, APPLIED_FILE, &bytes)
}

/// The last steps of a snapshot install, from its marker (see the module doc): the partition
/// log's files replaced by the image's, the partition's state snapshot of the old log
/// dropped, the applied state written, the marker and the staging directory removed.
/// Idempotent (a crash anywhere in it is followed by the same call at the next open). The
/// partition log must be closed. Blocking.
fn finish_install(raft_dir: &Path, log_dir: &Path, marker: &InstallMarker) -> Result<(), String> {
    if marker.staging.contains('/') || !marker.staging.starts_with("snapshot-in-") {
        return Err(format!(
            "{}: `{}` is not a staging directory",
            raft_dir.join(INSTALL_FILE).display(),
            marker.staging
        ));
    }
    let staging = raft_dir.join(&marker.staging);
    crate::log::replace_files(log_dir, &staging, &marker.files)
        .map_err(|e| format!("replacing the partition log with the snapshot's: {e}"))?;
    crate::state::PartitionState::discard(log_dir)
        .map_err(|e| format!("removing the old log's state snapshot: {e}"))?;
    write_applied(raft_dir, &marker.applied).map_err(|e| format!("writing {APPLIED_FILE}: {e}"))?;
    let path = raft_dir.join(INSTALL_FILE);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("removing {}: {e}", path.display())),
    }
    crate::log::file::sync_dir(raft_dir)
        .map_err(|e| format!("syncing {}: {e}", raft_dir.display()))?;
    if let Err(error) = std::fs::remove_dir_all(&staging) {
        if error.kind() != io::ErrorKind::NotFound {
            tracing::warn!(dir = %staging.display(), %error, "could not remove a snapshot's staging directory (removed at the next open)");
        }
    }
    Ok(())
}

/// Finishes a snapshot install that a crash interrupted and removes leftover staging
/// directories, in the group directory of the partition log in `log_dir`. Runs at open,
/// before the partition log is opened.
pub fn recover_install(log_dir: &Path) -> Result<(), String> {
    let raft_dir = log_dir.join(RAFT_DIR);
    let path = raft_dir.join(INSTALL_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let marker: InstallMarker =
                serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
            finish_install(&raft_dir, log_dir, &marker)?;
            tracing::info!(dir = %log_dir.display(), end = marker.applied.end_offset, last_applied = ?marker.applied.last_applied, "finished a snapshot install that a restart interrupted");
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(format!("reading {}: {error}", path.display())),
    }
    let removed = super::snapshot::remove_leftovers(&raft_dir, None)
        .map_err(|e| format!("removing snapshot staging directories: {e}"))?;
    if removed > 0 {
        tracing::info!(dir = %raft_dir.display(), removed, "removed snapshot staging directories a restart left behind");
    }
    Ok(())
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
    type SnapshotData = SnapshotImage;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        let mut inner = self.inner.lock().await;
        let (meta, end) = self.persist(&mut inner).await?;
        Ok(Snapshot {
            meta,
            snapshot: SnapshotImage::meta_only(end),
        })
    }
}

impl RaftStateMachine<PartitionRaft> for PartitionStateMachine {
    type SnapshotData = SnapshotImage;
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
        image: Self::SnapshotData,
    ) -> Result<(), io::Error> {
        let mut inner = self.inner.lock().await;
        let end = image.end_offset();
        let bytes = image.bytes();
        let Some(staging) = image.keep() else {
            return Err(invalid(format!(
                "partition {} of topic `{}`: a snapshot to install without its files",
                self.partition.id, self.partition.topic
            )));
        };
        let raft_dir = inner.dir.clone();
        let log_dir = self
            .partition
            .local_log()
            .map_err(storage)?
            .dir()
            .to_path_buf();
        let applied = AppliedFile {
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
            end_offset: end,
        };
        let partition = self.partition.clone();
        let started = std::time::Instant::now();
        tokio::task::spawn_blocking(move || -> io::Result<()> {
            let files = crate::log::image_files(&staging).map_err(|e| io::Error::other(e.to_string()))?;
            let marker = InstallMarker {
                staging: staging
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default()
                    .to_string(),
                files,
                applied,
            };
            let bytes = serde_json::to_vec(&marker).map_err(|e| invalid(e.to_string()))?;
            // From here on the install only goes forward: a crash is followed by
            // `recover_install` at the next open.
            crate::log::write_file_atomically(&raft_dir, INSTALL_FILE, &bytes)?;
            partition
                .replace_log(|old| {
                    if let Err(error) = old.close() {
                        tracing::warn!(dir = %log_dir.display(), %error, "the replaced partition log did not close cleanly");
                    }
                    finish_install(&raft_dir, &log_dir, &marker)?;
                    crate::log::Log::open_with(&log_dir, old.config().clone(), old.open_options())
                        .map_err(|e| format!("opening the installed partition log: {e}"))
                })
                .map_err(storage)
        })
        .await
        .map_err(joined)??;
        inner.last_applied = meta.last_log_id;
        inner.membership = meta.last_membership.clone();
        inner.snapshot = Some(meta.clone());
        inner.persisted = Some((meta.last_log_id, end));
        metrics::counter!(crate::metrics::REPLICATION_SNAPSHOTS_INSTALLED_TOTAL).increment(1);
        tracing::info!(topic = %self.partition.topic, partition = self.partition.id, last_applied = ?meta.last_log_id, end, bytes, elapsed_ms = started.elapsed().as_millis() as u64, "installed a snapshot: the partition log is the leader's copy");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        let mut inner = self.inner.lock().await;
        let Some(last) = inner.snapshot.clone() else {
            return Ok(None);
        };
        // The image is made now, of the applied state made durable now: its meta describes
        // exactly its bytes, and openraft may purge the Raft log below it. Failures become an
        // image that cannot be sent (openraft tries again) rather than a stopped group.
        let (meta, end) = match self.persist(&mut inner).await {
            Ok(done) => done,
            Err(error) => {
                tracing::warn!(topic = %self.partition.topic, partition = self.partition.id, %error, "no snapshot image: the applied state could not be made durable");
                let end = inner.persisted.map_or(0, |p| p.1);
                return Ok(Some(Snapshot {
                    meta: last,
                    snapshot: SnapshotImage::unavailable(end, error.to_string()),
                }));
            }
        };
        let log = self.partition.local_log().map_err(storage)?;
        let raft_dir = inner.dir.clone();
        let image = tokio::task::spawn_blocking(move || SnapshotImage::export(&log, &raft_dir))
            .await
            .map_err(joined)?;
        let image = match image {
            Ok(image) if image.end_offset() == end => image,
            Ok(image) => SnapshotImage::unavailable(
                end,
                format!(
                    "the image ends at offset {}, the applied state at {end}",
                    image.end_offset()
                ),
            ),
            Err(reason) => {
                tracing::warn!(topic = %self.partition.topic, partition = self.partition.id, %reason, "no snapshot image");
                SnapshotImage::unavailable(end, reason)
            }
        };
        drop(inner);
        Ok(Some(Snapshot {
            meta,
            snapshot: image,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::{Log, LogConfig, OpenOptions, Visibility};
    use crate::replication::types::{log_id, Entry, Proposal};
    use bytes::Bytes;
    use futures_util::StreamExt as _;
    use syncline_proto::batch::BatchBuilder;

    /// Small segments, so a few hundred entries make several.
    fn config() -> LogConfig {
        LogConfig {
            segment_bytes_max: 64 * 1024,
            batch_bytes_max: 16 * 1024,
            index_interval_bytes: 256,
            preallocate_bytes: 16 * 1024,
            ..LogConfig::default()
        }
    }

    /// A table partition replica in `dir` as the topic registry opens one (recovery of an
    /// install, `Published` visibility, the log cut back to the applied state), and its state
    /// machine. Not marked replicated, so its key index is readable without a group.
    fn replica(dir: &Path) -> (Arc<Partition>, PartitionStateMachine) {
        recover_install(dir).unwrap();
        let options = OpenOptions {
            visibility: Visibility::Published,
            lock_dir: false,
            ..OpenOptions::default()
        };
        let log = Log::open_with(dir, config(), options).unwrap();
        prepare_log(&log, &dir.join(RAFT_DIR)).unwrap();
        let partition = Arc::new(Partition::open(
            Arc::from("t"),
            0,
            1,
            log,
            true,
            crate::topic::ProducerEpochs::default(),
        ));
        let machine = PartitionStateMachine::open(&dir.join(RAFT_DIR), partition.clone()).unwrap();
        (partition, machine)
    }

    /// Entry `index` of term 1: key `k<index % 7>` = `v<index>`.
    fn entry(index: u64) -> Entry {
        let mut builder = BatchBuilder::new();
        let key = format!("k{}", index % 7);
        let value = format!("v{index}-{}", "x".repeat(1000));
        builder.push(1_000, Some(key.as_bytes()), Some(value.as_bytes()), &[]);
        Entry {
            log_id: log_id(1, index),
            payload: EntryPayload::Normal(Proposal {
                now_ms: 1_000,
                conditions: Vec::new(),
                batch: builder.finish().unwrap(),
            }),
        }
    }

    async fn apply(machine: &mut PartitionStateMachine, indexes: std::ops::RangeInclusive<u64>) {
        let entries: Vec<_> = indexes.map(|i| Ok((entry(i), None))).collect();
        machine
            .apply(futures_util::stream::iter(entries))
            .await
            .unwrap();
    }

    fn batches(partition: &Partition) -> (u64, Vec<u8>) {
        let log = partition.local_log().unwrap();
        let mut out = Vec::new();
        let mut offset = log.start_offset();
        while offset < log.end_offset() {
            let read = log.read_up_to(offset, 1 << 20, log.end_offset()).unwrap();
            out.extend_from_slice(&read.bytes);
            offset = read.next_offset;
        }
        (log.end_offset(), out)
    }

    /// The leader's current snapshot, shipped through the transfer into `raft_dir`.
    async fn shipped(leader: &mut PartitionStateMachine, raft_dir: &Path) -> Snapshot {
        let snapshot = leader.get_current_snapshot().await.unwrap().unwrap();
        assert!(snapshot.snapshot.unavailable_reason().is_none());
        let header = crate::replication::snapshot::TransferHeader {
            vote: crate::replication::types::Vote::new(1, 1),
            meta: snapshot.meta.clone(),
            end_offset: snapshot.snapshot.end_offset(),
            files: snapshot
                .snapshot
                .files()
                .iter()
                .map(|f| crate::replication::snapshot::WireFile {
                    name: f.name.clone(),
                    len: f.len,
                })
                .collect(),
        };
        let failure = Arc::new(parking_lot::Mutex::new(None));
        let body = crate::replication::snapshot::chunks(
            syncline_proto::v1::SnapshotChunk::default(),
            snapshot.snapshot,
            failure,
        )
        .skip(1)
        .map(Ok);
        let header = serde_json::to_vec(&header).unwrap();
        let (_, meta, image) =
            crate::replication::snapshot::receive(raft_dir, &config(), &header, Box::pin(body))
                .await
                .unwrap();
        Snapshot {
            meta,
            snapshot: image,
        }
    }

    #[tokio::test]
    async fn given_a_replica_far_behind_when_it_installs_the_leaders_snapshot_should_hold_the_leaders_log_keys_and_applied_state(
    ) {
        let root = tempfile::tempdir().unwrap();
        let (leader, mut leader_machine) = replica(&root.path().join("leader"));
        let follower_dir = root.path().join("follower");
        let (follower, mut follower_machine) = replica(&follower_dir);
        apply(&mut leader_machine, 1..=300).await;
        apply(&mut follower_machine, 1..=20).await;
        leader_machine.build_snapshot().await.unwrap();
        apply(&mut leader_machine, 301..=310).await;
        let snapshot = shipped(&mut leader_machine, &follower_dir.join(RAFT_DIR)).await;
        assert_eq!(snapshot.meta.last_log_id, Some(log_id(1, 310)), "built now");
        assert!(leader.local_log().unwrap().info().segments > 2);

        follower_machine
            .install_snapshot(&snapshot.meta, snapshot.snapshot)
            .await
            .unwrap();
        assert_eq!(batches(&follower), batches(&leader));
        assert_eq!(
            follower_machine.applied_state().await.unwrap().0,
            Some(log_id(1, 310))
        );
        for key in 0..7 {
            let key = format!("k{key}");
            assert_eq!(
                follower.latest(key.as_bytes()).unwrap(),
                leader.latest(key.as_bytes()).unwrap(),
                "{key}"
            );
        }
        let log = follower.local_log().unwrap();
        assert_eq!(log.durable_offset(), log.end_offset(), "published");
        let raft_dir = follower_dir.join(RAFT_DIR);
        assert!(!raft_dir.join(INSTALL_FILE).exists());
        assert!(std::fs::read_dir(&raft_dir).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_str()
            .unwrap()
            .starts_with("snapshot-")));

        // Entries after the snapshot land where they land on the leader.
        apply(&mut leader_machine, 311..=330).await;
        apply(&mut follower_machine, 311..=330).await;
        assert_eq!(batches(&follower), batches(&leader));

        // And the installed log opens again from disk (cut back to the installed state,
        // whose applied state says where).
        let expected = batches(&follower);
        drop(follower_machine);
        assert!(follower.close().await);
        drop(follower);
        let (reopened, machine) = replica(&follower_dir);
        let mut machine = machine;
        assert_eq!(
            machine.applied_state().await.unwrap().0,
            Some(log_id(1, 310))
        );
        apply(&mut machine, 311..=330).await;
        assert_eq!(batches(&reopened), expected);
    }

    #[tokio::test]
    async fn given_a_crash_in_the_middle_of_an_install_when_reopened_should_finish_it() {
        let root = tempfile::tempdir().unwrap();
        let (leader, mut leader_machine) = replica(&root.path().join("leader"));
        apply(&mut leader_machine, 1..=200).await;
        leader_machine.build_snapshot().await.unwrap();
        let expected = batches(&leader);
        let follower_dir = root.path().join("follower");
        let raft_dir = follower_dir.join(RAFT_DIR);
        for renamed in [0, 1, 3, usize::MAX] {
            let _ = std::fs::remove_dir_all(&follower_dir);
            let (follower, mut follower_machine) = replica(&follower_dir);
            apply(&mut follower_machine, 1..=30).await;
            follower_machine.build_snapshot().await.unwrap();
            let snapshot = shipped(&mut leader_machine, &raft_dir).await;
            // What `install_snapshot` does up to the marker, then part of the replace.
            let end = snapshot.snapshot.end_offset();
            let staging = snapshot.snapshot.keep().unwrap();
            let files = crate::log::image_files(&staging).unwrap();
            let marker = InstallMarker {
                staging: staging.file_name().unwrap().to_str().unwrap().into(),
                files: files.clone(),
                applied: AppliedFile {
                    last_applied: snapshot.meta.last_log_id,
                    membership: snapshot.meta.last_membership.clone(),
                    end_offset: end,
                },
            };
            crate::log::write_file_atomically(
                &raft_dir,
                INSTALL_FILE,
                &serde_json::to_vec(&marker).unwrap(),
            )
            .unwrap();
            for name in files.iter().take(renamed) {
                std::fs::rename(staging.join(name), follower_dir.join(name)).unwrap();
            }
            // The crash: nothing is closed.
            drop(follower_machine);
            drop(follower);
            let (follower, mut machine) = replica(&follower_dir);
            assert_eq!(batches(&follower), expected, "after {renamed} renames");
            assert_eq!(
                machine.applied_state().await.unwrap().0,
                Some(log_id(1, 200))
            );
            assert!(!raft_dir.join(INSTALL_FILE).exists());
            assert!(!staging.exists());
            apply(&mut machine, 201..=205).await;
            assert!(follower.close().await);
        }
    }

    #[tokio::test]
    async fn given_a_leader_with_nothing_snapshotted_should_have_no_current_snapshot() {
        let root = tempfile::tempdir().unwrap();
        let (_leader, mut machine) = replica(&root.path().join("leader"));
        apply(&mut machine, 1..=3).await;
        assert!(machine.get_current_snapshot().await.unwrap().is_none());
        let built = machine.build_snapshot().await.unwrap();
        assert!(built.snapshot.unavailable_reason().is_some(), "meta only");
        let current = machine.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta.last_log_id, Some(log_id(1, 3)));
        let bytes: Bytes = std::fs::read(root.path().join("leader/raft").join(APPLIED_FILE))
            .unwrap()
            .into();
        let applied: AppliedFile = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(applied.end_offset, current.snapshot.end_offset());
    }
}
