//! The controller's openraft types and state machine.
//!
//! The state machine is the [`Metadata`] (applied by [`Metadata::apply`], deterministic) held in
//! memory and shared with the rest of the node through [`MetadataView`]. Its snapshots are the
//! metadata as JSON, written to `DATA_DIR/.controller/snapshot.json` (temp file, fsync, rename,
//! directory fsync) when openraft builds or installs one, and loaded at open; openraft then
//! re-applies the committed log after it.

use std::io::{self, Cursor};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::{Stream, TryStreamExt as _};
use openraft::entry::RaftEntry as _;
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::metadata::{Command, Metadata, MetadataError};

openraft::declare_raft_types!(
    /// The controller group's types: metadata commands in, their outcome out.
    pub TypeConfig:
        D = Command,
        R = Outcome,
);

/// What applying a command gave: nothing changed when it is an error.
pub type Outcome = Result<(), MetadataError>;
/// A controller log entry.
pub type Entry = openraft::type_config::alias::EntryOf<TypeConfig>;
/// A controller log id.
pub type LogId = openraft::type_config::alias::LogIdOf<TypeConfig>;
/// A controller vote.
pub type Vote = openraft::type_config::alias::VoteOf<TypeConfig>;
/// The membership as stored.
pub type StoredMembership = openraft::type_config::alias::StoredMembershipOf<TypeConfig>;
/// A snapshot's metadata.
pub type SnapshotMeta = openraft::type_config::alias::SnapshotMetaOf<TypeConfig>;
/// A snapshot with its data.
pub type Snapshot = openraft::type_config::alias::SnapshotOf<TypeConfig, Cursor<Vec<u8>>>;
/// The controller's Raft handle.
pub type Raft = openraft::Raft<TypeConfig, StateMachine>;

/// The snapshot file inside the controller directory.
pub const SNAPSHOT_FILE: &str = "snapshot.json";
/// The largest snapshot file read.
const SNAPSHOT_BYTES_MAX: u64 = 256 * 1024 * 1024;

/// The applied metadata, readable by every part of the node.
#[derive(Debug)]
pub struct MetadataView {
    metadata: parking_lot::RwLock<Metadata>,
    /// The last applied log index (0 before anything applied).
    applied: watch::Sender<u64>,
}

impl MetadataView {
    fn new() -> MetadataView {
        MetadataView {
            metadata: parking_lot::RwLock::new(Metadata::default()),
            applied: watch::channel(0).0,
        }
    }

    /// A copy of the metadata as applied so far.
    pub fn get(&self) -> Metadata {
        self.metadata.read().clone()
    }

    /// Reads the metadata under its lock.
    pub fn with<T>(&self, read: impl FnOnce(&Metadata) -> T) -> T {
        read(&self.metadata.read())
    }

    /// Follows the applied index.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }

    /// The last applied log index.
    pub fn applied(&self) -> u64 {
        *self.applied.borrow()
    }
}

#[derive(Serialize, Deserialize)]
struct SnapshotFile {
    meta: SnapshotMeta,
    metadata: Metadata,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    last_applied: Option<LogId>,
    membership: StoredMembership,
    snapshot: Option<(SnapshotMeta, Vec<u8>)>,
}

/// The controller's state machine; clones share it (the snapshot builder is a clone).
#[derive(Debug, Clone)]
pub struct StateMachine {
    inner: Arc<tokio::sync::Mutex<Inner>>,
    view: Arc<MetadataView>,
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

fn write_snapshot(dir: &Path, file: &SnapshotFile) -> io::Result<()> {
    use std::io::Write as _;
    let bytes = serde_json::to_vec(file).map_err(|e| invalid(e.to_string()))?;
    let temp = dir.join(format!("{SNAPSHOT_FILE}.tmp"));
    let mut out = std::fs::File::create(&temp)?;
    out.write_all(&bytes)?;
    out.sync_all()?;
    std::fs::rename(&temp, dir.join(SNAPSHOT_FILE))?;
    std::fs::File::open(dir)?.sync_all()
}

impl StateMachine {
    /// Opens the state machine in `dir`: the last snapshot, if any.
    pub fn open(dir: &Path) -> io::Result<StateMachine> {
        std::fs::create_dir_all(dir)?;
        let view = Arc::new(MetadataView::new());
        let mut inner = Inner {
            dir: dir.to_path_buf(),
            last_applied: None,
            membership: StoredMembership::default(),
            snapshot: None,
        };
        let path = dir.join(SNAPSHOT_FILE);
        match std::fs::metadata(&path) {
            Ok(found) if found.len() > SNAPSHOT_BYTES_MAX => {
                return Err(invalid(format!(
                    "{} is {} bytes; a controller snapshot is at most {SNAPSHOT_BYTES_MAX}",
                    path.display(),
                    found.len()
                )))
            }
            Ok(_) => {
                let bytes = std::fs::read(&path)?;
                let file: SnapshotFile = serde_json::from_slice(&bytes)
                    .map_err(|e| invalid(format!("{}: {e}", path.display())))?;
                let data =
                    serde_json::to_vec(&file.metadata).map_err(|e| invalid(e.to_string()))?;
                inner.last_applied = file.meta.last_log_id;
                inner.membership = file.meta.last_membership.clone();
                let index = file.meta.last_log_id.as_ref().map_or(0, |id| id.index());
                *view.metadata.write() = file.metadata;
                view.applied.send_replace(index);
                inner.snapshot = Some((file.meta, data));
            }
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
        Ok(StateMachine {
            inner: Arc::new(tokio::sync::Mutex::new(inner)),
            view,
        })
    }

    /// The shared view of the applied metadata.
    pub fn view(&self) -> Arc<MetadataView> {
        self.view.clone()
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    type SnapshotData = Cursor<Vec<u8>>;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        let mut inner = self.inner.lock().await;
        let metadata = self.view.get();
        let meta = SnapshotMeta {
            last_log_id: inner.last_applied,
            last_membership: inner.membership.clone(),
        };
        let file = SnapshotFile {
            meta: meta.clone(),
            metadata,
        };
        let dir = inner.dir.clone();
        write_snapshot(&dir, &file)?;
        let data = serde_json::to_vec(&file.metadata).map_err(|e| invalid(e.to_string()))?;
        inner.snapshot = Some((meta.clone(), data.clone()));
        Ok(Snapshot {
            meta,
            snapshot: Cursor::new(data),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = Cursor<Vec<u8>>;
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        let inner = self.inner.lock().await;
        Ok((inner.last_applied, inner.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        let mut inner = self.inner.lock().await;
        let mut last = None;
        while let Some((entry, responder)) = entries.try_next().await? {
            let outcome = match &entry.payload {
                EntryPayload::Blank => Ok(()),
                EntryPayload::Normal(command) => {
                    let outcome = self.view.metadata.write().apply(command);
                    if let Err(error) = &outcome {
                        tracing::debug!(%command, %error, "controller command changed nothing");
                    }
                    outcome
                }
                EntryPayload::Membership(membership) => {
                    inner.membership =
                        StoredMembership::new(Some(entry.log_id()), membership.clone());
                    Ok(())
                }
            };
            last = Some(entry.log_id());
            inner.last_applied = Some(entry.log_id());
            if let Some(responder) = responder {
                responder.send(outcome);
            }
        }
        if let Some(last) = last {
            self.view.applied.send_replace(last.index());
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Self::SnapshotData,
    ) -> Result<(), io::Error> {
        let data = snapshot.into_inner();
        let metadata: Metadata = serde_json::from_slice(&data)
            .map_err(|e| invalid(format!("controller snapshot: {e}")))?;
        let mut inner = self.inner.lock().await;
        let file = SnapshotFile {
            meta: meta.clone(),
            metadata: metadata.clone(),
        };
        write_snapshot(&inner.dir.clone(), &file)?;
        inner.last_applied = meta.last_log_id;
        inner.membership = meta.last_membership.clone();
        inner.snapshot = Some((meta.clone(), data));
        *self.view.metadata.write() = metadata;
        self.view
            .applied
            .send_replace(meta.last_log_id.as_ref().map_or(0, |id| id.index()));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        let inner = self.inner.lock().await;
        Ok(inner.snapshot.as_ref().map(|(meta, data)| Snapshot {
            meta: meta.clone(),
            snapshot: Cursor::new(data.clone()),
        }))
    }
}
