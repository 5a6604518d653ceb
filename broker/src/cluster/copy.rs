//! Moving a partition of one replica (replication factor 1) to another node.
//!
//! Such a partition has no Raft group to add a learner to, so its move is a copy the new node
//! pulls from the node holding it, while writes continue there, then a short fence:
//!
//! 1. `Command::Reassign` names the new node as the move's target (`syncline topic reassign`,
//!    `cluster rebalance`, `cluster remove-node`).
//! 2. The target copies the partition log in rounds (`Peer.CopyPartition`): each round the
//!    holder exports an image of its log (`Log::export_image`: hard links, consistent at an end
//!    offset) and sends every file from the byte the target already holds of it; the first
//!    round sends everything, later ones what was appended since (and segments compaction
//!    rewrote). A file is identified by its name and the holder's inode, so a file replaced
//!    under the same name is sent whole, and the CRC of the receiver's last 4 KiB of it must
//!    match the holder's bytes there, so a tail the holder cut in place after a crash and
//!    wrote past is sent whole too. Rounds go on until one ships less than
//!    [`FENCE_BYTES`] (a partition written faster than the move's throttle never gets there:
//!    the move waits, warning every [`ROUNDS_WARN`] rounds), at the move's throttle.
//! 3. The target proposes `Command::FenceMove`. The holder, seeing it applied, stops taking
//!    writes for the partition (`Partition::set_handing_over`: writes are refused as NotLeader
//!    naming the target, which clients retry; a marker file keeps the fence across a restart),
//!    after the write under way, if any.
//! 4. The target's last round (not throttled) asks for a fenced image (the holder answers only
//!    once fenced), so it ends exactly where the holder's log ends for good; the target
//!    verifies the whole copy as a log (`log::verify_image`: every batch's CRC, contiguous
//!    offsets, the exact end) and marks it verified (`copy-verified`), all fsync'd.
//! 5. The target proposes `Command::CompleteMove`: the metadata's replica and leader become the
//!    target. Its reconcile pass moves the verified copy into place and opens it (producer and
//!    table state are rebuilt from the log, as after a restart); the holder's pass removes its
//!    copy. Clients follow the new leader.
//!
//! Writes are refused from step 3 to the end of step 5: the last round's bytes, one scan of
//! the log, two controller commits and an open (BENCHMARKS.md measures it).
//!
//! ## Faults
//! - Either node restarts: its applied metadata replays from an older snapshot, so nothing here
//!   acts (no fence lifted, no copy started, checked or dropped) until a read barrier showed
//!   it current; a fenced holder opens fenced meanwhile (its marker).
//! - The partition moves back to its old holder before that node dropped its fenced copy: the
//!   fence stays while a verified copy waits, and `reconcile` replaces the old log with it.
//! - The target crashes: its copy is on disk with the list of what it holds (`copy-have.json`,
//!   written after the files are fsync'd); it carries on from there after a restart. A copy
//!   marked verified goes straight to step 5.
//! - The holder crashes: a fenced partition opens fenced (its marker); the target's rounds
//!   fail until it is back.
//! - Either stays away: the holder calls the move off ([`fence_timeout`] after it saw the
//!   fence: `Command::CancelMove`) and takes writes again; a `CompleteMove` after that is
//!   refused by the controller (commands apply in one order), so no write taken after the
//!   cancel is lost. The target drops its copy when the metadata no longer moves the partition
//!   to it.
//! - A round's bytes fail their CRC-32C, or the copy does not verify: the round (or the copy)
//!   is refused and the copy starts over from what is on disk (or from nothing).
//!
//! ## On disk (the target's data directory)
//! ```text
//! ~copy-in-<topic id>-<partition>/   the copy: segment files and the manifest as in a log
//!                                    directory, plus
//!     copy-have.json                 [{"name", "len", "ino"}]: the bytes it holds of each file
//!     copy-verified                  present once the copy verified (the log's end offset)
//! ```
//! The holder's images are `~copy-out-<pid>-<n>/` (hard links), removed after each round and
//! at startup.
//!
//! It may call the controller, the metadata, the topic registry and the log's image functions.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::{FileExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{Stream, StreamExt as _};
use serde::{Deserialize, Serialize};
use syncline_proto::v1;
use tonic::Status;

use super::controller::Controller;
use super::metadata::{Command, Move};
use crate::partition::RemoteLeader;
use crate::replication::network::GroupId;
use crate::replication::snapshot::{CHUNK_BYTES_MAX, CHUNK_TIMEOUT, HEADER_BYTES_MAX};
use crate::topic::{
    Registry, TopicId, COPY_HAVE as HAVE_FILE, COPY_IN_PREFIX, COPY_VERIFIED as VERIFIED_FILE,
};

/// A round that ships less than this is followed by the fenced one: the bytes sent while
/// writes are refused.
pub const FENCE_BYTES: u64 = 4 << 20;
/// Rounds after which a copy that does not get below [`FENCE_BYTES`] (a partition written
/// faster than its throttle) warns, and again every as many: it never fences before, so
/// writes are never refused for longer than a small last round takes.
pub const ROUNDS_WARN: usize = 20;
/// A holder fenced for longer than this calls the move off: 30 s, plus 1 s per 64 MiB of its
/// log (the new node scans its whole copy while the fence holds: a 1 GiB partition gets 46 s).
pub fn fence_timeout(log_bytes: u64) -> Duration {
    Duration::from_secs(30 + log_bytes / (64 << 20))
}
/// How long a fenced round waits for the holder to apply the fence.
const FENCE_WAIT: Duration = Duration::from_secs(10);
/// Prefix of an image's directory on the holder.
const COPY_OUT_PREFIX: &str = "~copy-out-";
/// How long a failed copy waits before it tries again.
const RETRY: Duration = Duration::from_secs(1);

/// The bytes a receiver holds of one file (the request's `have`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HaveFile {
    /// The file name.
    pub name: String,
    /// Bytes from its start.
    pub len: u64,
    /// The holder's inode of it.
    pub ino: u64,
    /// CRC-32C of its last (up to) [`TAIL_CHECK_BYTES`] held bytes, as the receiver has them:
    /// the holder sends the file whole when its own bytes there differ (a torn tail it cut in
    /// place after a crash, then wrote past).
    #[serde(default)]
    pub tail_crc: u32,
}

/// Bytes at the end of a held file whose CRC the receiver sends ([`HaveFile::tail_crc`]).
pub const TAIL_CHECK_BYTES: u64 = 4096;

/// CRC-32C of `file`'s bytes `[len - TAIL_CHECK_BYTES, len)` (from 0 when shorter).
fn tail_crc(file: &Path, len: u64) -> std::io::Result<u32> {
    let from = len.saturating_sub(TAIL_CHECK_BYTES);
    let mut bytes = vec![0u8; (len - from) as usize];
    std::fs::File::open(file)?.read_exact_at(&mut bytes, from)?;
    Ok(crc32c::crc32c(&bytes))
}

/// One file of a round's image.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CopyFile {
    /// The file name (a segment's `.log` or the manifest).
    pub name: String,
    /// Bytes of it in the image.
    pub len: u64,
    /// The holder's inode of it.
    pub ino: u64,
    /// The first byte sent (the receiver keeps the bytes before it).
    pub from: u64,
}

/// The first message's header of a round.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CopyHeader {
    /// The log's end offset the image ends at.
    pub end_offset: u64,
    /// The files, in offset order, the manifest last.
    pub files: Vec<CopyFile>,
}

/// The copies this node runs and the fences it holds.
#[derive(Debug, Default)]
pub struct Copies {
    running: parking_lot::Mutex<HashSet<GroupId>>,
    fenced_since: parking_lot::Mutex<HashMap<GroupId, Instant>>,
    /// Held while a fence is decided from the metadata and set: the applied metadata only
    /// moves forward, so the last decision is made from the newest metadata (a tick that read
    /// an older copy never lifts a fence a fenced round just set).
    fencing: parking_lot::Mutex<()>,
    /// Set once a read barrier showed this node's metadata current since it started: until
    /// then nothing is done (after a restart the applied metadata replays from an older
    /// snapshot, and a fence lifted or a copy dropped from it would lose data).
    current: std::sync::atomic::AtomicBool,
    /// A barrier is under way.
    checking: std::sync::atomic::AtomicBool,
}

/// The copy directory of a partition.
pub fn copy_dir(data_dir: &Path, topic_id: &str, partition: u32) -> PathBuf {
    data_dir.join(format!("{COPY_IN_PREFIX}{topic_id}-{partition}"))
}

impl Copies {
    /// One pass over the single-replica partitions (every controller tick): holds or lifts the
    /// fences of this node's partitions, calls off a move fenced too long, starts the copies
    /// of moves to this node, and removes copies no move needs.
    pub fn tick(&self, controller: &Arc<Controller>) {
        let Some(registry) = controller.registry().cloned() else {
            return;
        };
        if !self.current.load(Ordering::Acquire) {
            if !self.checking.swap(true, Ordering::AcqRel) {
                let controller = controller.clone();
                tokio::spawn(async move {
                    let barrier = controller.applied_barrier(Duration::from_secs(5)).await;
                    let copies = controller.copies();
                    if barrier.is_ok() {
                        copies.current.store(true, Ordering::Release);
                    }
                    copies.checking.store(false, Ordering::Release);
                });
            }
            return;
        }
        let me = controller.node_id();
        let metadata = controller.metadata();
        let mut wanted = HashSet::new();
        for (name, topic) in &metadata.topics {
            if topic.replication_factor != 1 {
                continue;
            }
            for (number, placement) in topic.partitions.iter().enumerate() {
                let id = GroupId {
                    topic_id: topic.id.clone(),
                    partition: number as u32,
                };
                if placement.replicas == [me] {
                    self.hold(controller, &registry, name, &id);
                }
                let Some(moving) = placement.moving.clone() else {
                    continue;
                };
                if moving.target != [me] {
                    continue;
                }
                wanted.insert(id.clone());
                let Some(&source) = placement.replicas.first() else {
                    continue;
                };
                if !self.running.lock().insert(id.clone()) {
                    continue;
                }
                let controller = controller.clone();
                let registry = registry.clone();
                let name = name.clone();
                tokio::spawn(async move {
                    let result = copy_in(&controller, &registry, &name, &id, source, &moving).await;
                    if let Err(error) = result {
                        tracing::warn!(topic = %name, partition = id.partition, %error, "partition copy not finished; trying again");
                        tokio::time::sleep(RETRY).await;
                    }
                    controller.copies().running.lock().remove(&id);
                });
            }
            // A partition placed here whose copy is not in place yet keeps it.
            for (number, placement) in topic.partitions.iter().enumerate() {
                if placement.replicas.contains(&me) {
                    wanted.insert(GroupId {
                        topic_id: topic.id.clone(),
                        partition: number as u32,
                    });
                }
            }
        }
        self.fenced_since.lock().retain(|id, _| {
            metadata
                .partition_by_id(&id.topic_id, id.partition)
                .and_then(|p| p.moving.as_ref())
                .is_some_and(|m| m.fenced)
        });
        self.remove_unwanted(&registry, &wanted);
    }

    /// The holder's side: the partition refuses writes exactly while its move is fenced.
    fn hold(&self, controller: &Arc<Controller>, registry: &Registry, name: &str, id: &GroupId) {
        let Ok(topic) = registry.get(name) else {
            return;
        };
        if TopicId::parse(&id.topic_id) != Some(topic.id) {
            return;
        }
        let Ok(partition) = topic.partition(id.partition) else {
            return;
        };
        if partition.remote_leader().is_some() || partition.fence_reason().is_some() {
            return;
        }
        let fenced = match self.apply_fence(controller, partition, id) {
            Ok(fenced) => fenced,
            Err(error) => {
                tracing::warn!(topic = name, partition = id.partition, %error, "could not change the partition's hand-over fence");
                return;
            }
        };
        let Some(moving) = fenced else { return };
        let since = *self
            .fenced_since
            .lock()
            .entry(id.clone())
            .or_insert_with(Instant::now);
        let timeout = fence_timeout(partition.local_log().map_or(0, |l| l.info().size_bytes));
        if since.elapsed() < timeout {
            return;
        }
        // The target did not finish in time: call the move off (once per timeout).
        self.fenced_since.lock().insert(id.clone(), Instant::now());
        let command = Command::CancelMove {
            topic: name.to_string(),
            id: id.topic_id.clone(),
            partition: id.partition,
            target: moving.target.clone(),
        };
        let controller = controller.clone();
        let partition = id.partition;
        let name = name.to_string();
        tokio::spawn(async move {
            tracing::warn!(topic = %name, partition, ?timeout, "a fenced move did not finish in time; calling it off");
            match controller.propose(command).await {
                Ok(Ok(_)) => {
                    tracing::warn!(topic = %name, partition, "move called off: the partition stays here")
                }
                Ok(Err(error)) => {
                    tracing::info!(topic = %name, partition, %error, "the move was not called off")
                }
                Err(error) => {
                    tracing::warn!(topic = %name, partition, %error, "could not call the move off")
                }
            }
        });
    }

    /// Sets the hand-over fence of this node's `partition` (group `id`) from the newest
    /// applied metadata: held while its move is fenced, lifted when it takes writes here
    /// again (not moving, or a move that is not fenced). A partition the metadata placed
    /// elsewhere keeps its fence until its copy goes. Returns the fenced move, if any.
    fn apply_fence(
        &self,
        controller: &Controller,
        partition: &crate::partition::Partition,
        id: &GroupId,
    ) -> Result<Option<Move>, crate::error::BrokerError> {
        let _one = self.fencing.lock();
        let me = controller.node_id();
        let Some((replicas, moving)) = controller.view().with(|m| {
            m.partition_by_id(&id.topic_id, id.partition)
                .map(|p| (p.replicas.clone(), p.moving.clone()))
        }) else {
            return Ok(None);
        };
        if replicas != [me] {
            return Ok(None);
        }
        let fenced = moving.filter(|m| m.fenced);
        if fenced.is_none() && partition.is_handing_over() {
            // A verified copy of a later move back here replaces this log: it never takes
            // writes again (`reconcile` installs the copy over it).
            let waiting = controller.registry().is_some_and(|registry| {
                copy_dir(&registry.config().data_dir, &id.topic_id, id.partition)
                    .join(VERIFIED_FILE)
                    .exists()
            });
            if waiting {
                return Ok(None);
            }
        }
        let to = fenced
            .as_ref()
            .and_then(|m| m.target.first().copied())
            .map(|node| RemoteLeader {
                id: Some(node),
                address: controller.address_of(node).unwrap_or_default(),
            });
        if partition.set_handing_over(to.clone())? {
            match to.and_then(|l| l.id) {
                Some(to) => {
                    tracing::info!(topic = %partition.topic, partition = id.partition, to, "partition fenced for the end of its move: writes go to the new node")
                }
                None => {
                    tracing::info!(topic = %partition.topic, partition = id.partition, "partition takes writes again")
                }
            }
        }
        Ok(fenced)
    }

    /// Removes the copy directories of partitions no move brings here.
    fn remove_unwanted(&self, registry: &Registry, wanted: &HashSet<GroupId>) {
        let data_dir = registry.config().data_dir.clone();
        let Ok(entries) = std::fs::read_dir(&data_dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            let Some(rest) = name.strip_prefix(COPY_IN_PREFIX) else {
                continue;
            };
            let Some((topic_id, partition)) = rest.rsplit_once('-') else {
                continue;
            };
            let Ok(partition) = partition.parse::<u32>() else {
                continue;
            };
            let id = GroupId {
                topic_id: topic_id.to_string(),
                partition,
            };
            if wanted.contains(&id) || self.running.lock().contains(&id) {
                continue;
            }
            tracing::info!(dir = %entry.path().display(), "removing a partition copy no move needs");
            if let Err(error) = std::fs::remove_dir_all(entry.path()) {
                tracing::warn!(dir = %entry.path().display(), %error, "could not remove a partition copy");
            }
        }
    }
}

/// The target's side of one move: rounds, the fence, the last round, the check, the end.
async fn copy_in(
    controller: &Controller,
    registry: &Registry,
    name: &str,
    id: &GroupId,
    source: u64,
    moving: &Move,
) -> Result<(), String> {
    let topic = registry.get(name).map_err(|e| e.to_string())?;
    if TopicId::parse(&id.topic_id) != Some(topic.id) {
        return Err("this node does not know the topic's incarnation yet".into());
    }
    let config = registry.config().log_config_for(&topic.settings.log);
    let dir = copy_dir(&registry.config().data_dir, &id.topic_id, id.partition);
    let verified = dir.join(VERIFIED_FILE);
    if !moving.fenced && verified.exists() {
        // Verified for a move that was called off: its end is not where the holder's log
        // ends now. The bytes stay (the next rounds send only what they lack).
        tokio::fs::remove_file(&verified)
            .await
            .map_err(|e| format!("removing {}: {e}", verified.display()))?;
    }
    if !verified.exists() {
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let started = Instant::now();
        let mut total = 0u64;
        if !moving.fenced {
            for round in 1.. {
                let (shipped, end) = round_in(controller, &dir, id, source, false, &config).await?;
                total += shipped;
                tracing::info!(
                    topic = name,
                    partition = id.partition,
                    round,
                    shipped,
                    end_offset = end,
                    "partition copy: round done"
                );
                if shipped < FENCE_BYTES {
                    break;
                }
                if round % ROUNDS_WARN == 0 {
                    tracing::warn!(
                        topic = name,
                        partition = id.partition,
                        round,
                        shipped,
                        "partition copy: written faster than it is copied; the move waits \
                         (raise its throttle)"
                    );
                }
            }
            propose(
                controller,
                Command::FenceMove {
                    topic: name.to_string(),
                    id: id.topic_id.clone(),
                    partition: id.partition,
                    target: moving.target.clone(),
                },
            )
            .await?;
        }
        let fenced_at = Instant::now();
        let (shipped, end) = round_in(controller, &dir, id, source, true, &config).await?;
        total += shipped;
        let check = dir.clone();
        tokio::task::spawn_blocking(move || -> Result<(), String> {
            // Index and checkpoint files of an earlier check describe less than the copy.
            remove_derived(&check)?;
            crate::log::verify_image(&check, config, end)
                .map_err(|e| format!("the copy does not verify: {e}"))?;
            let path = check.join(VERIFIED_FILE);
            std::fs::write(&path, end.to_string())
                .and_then(|()| std::fs::File::open(&path)?.sync_all())
                .and_then(|()| crate::log::file::sync_dir(&check))
                .map_err(|e| format!("writing {}: {e}", path.display()))
        })
        .await
        .map_err(|e| format!("the checking task failed: {e}"))?
        .inspect_err(|_| {
            // Start over: the copy's bytes are not a log that ends where the holder's did.
            let _ = std::fs::remove_dir_all(&dir);
        })?;
        tracing::info!(
            topic = name,
            partition = id.partition,
            bytes = total,
            end_offset = end,
            copy_ms = started.elapsed().as_millis() as u64,
            fenced_ms = fenced_at.elapsed().as_millis() as u64,
            "partition copy verified"
        );
    }
    let outcome = controller
        .propose(Command::CompleteMove {
            topic: name.to_string(),
            id: id.topic_id.clone(),
            partition: id.partition,
            replicas: moving.target.clone(),
        })
        .await
        .map_err(|e| e.to_string())?;
    match outcome {
        Ok(_) => {
            metrics::counter!(crate::metrics::REPLICATION_MOVES_COMPLETED_TOTAL).increment(1);
            tracing::info!(topic = name, partition = id.partition, replicas = ?moving.target, "move completed");
            Ok(())
        }
        Err(error) => {
            // Called off meanwhile: the copy is no longer where the holder's log ends.
            let _ = tokio::fs::remove_file(&verified).await;
            Err(format!("the move did not complete: {error}"))
        }
    }
}

async fn propose(controller: &Controller, command: Command) -> Result<(), String> {
    controller
        .propose(command)
        .await
        .map_err(|e| e.to_string())?
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Removes what a check writes beside the copied files (indexes, recovery point, marker).
fn remove_derived(dir: &Path) -> Result<(), String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("listing {}: {e}", dir.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("listing {}: {e}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().to_string();
        if crate::log::is_log_file(&name) && !crate::log::is_image_file(&name) {
            std::fs::remove_file(entry.path())
                .map_err(|e| format!("removing {}: {e}", entry.path().display()))?;
        }
    }
    Ok(())
}

/// What the copy holds, as recorded and as still on disk (a file shorter than recorded, or
/// gone, counts as not held).
fn read_have(dir: &Path) -> Vec<HaveFile> {
    let Ok(bytes) = std::fs::read(dir.join(HAVE_FILE)) else {
        return Vec::new();
    };
    let have: Vec<HaveFile> = serde_json::from_slice(&bytes).unwrap_or_default();
    have.into_iter()
        .filter(|f| crate::log::is_image_file(&f.name))
        .filter(|f| std::fs::metadata(dir.join(&f.name)).is_ok_and(|m| m.len() >= f.len))
        .filter_map(|mut f| {
            f.tail_crc = tail_crc(&dir.join(&f.name), f.len).ok()?;
            Some(f)
        })
        .collect()
}

/// One round on the target: asks the holder for what it lacks and writes it. Returns the
/// bytes shipped and the end offset of the image.
async fn round_in(
    controller: &Controller,
    dir: &Path,
    id: &GroupId,
    source: u64,
    fenced: bool,
    config: &crate::log::LogConfig,
) -> Result<(u64, u64), String> {
    let have = read_have(dir);
    let address = controller
        .address_of(source)
        .ok_or_else(|| format!("node {source} has no known address"))?;
    let mut client = controller
        .peer_client(&address)
        .map_err(|e| e.to_string())?;
    let request = v1::CopyPartitionRequest {
        cluster_id: controller.cluster_id().to_string(),
        from: controller.node_id(),
        topic_id: id.topic_id.clone(),
        partition: id.partition,
        have: serde_json::to_vec(&have)
            .map_err(|e| format!("encoding the copy's files: {e}"))?
            .into(),
        fenced,
    };
    let mut stream = client
        .copy_partition(request)
        .await
        .map_err(|status| format!("node {source}: {}", status.message()))?
        .into_inner();
    let first = tokio::time::timeout(CHUNK_TIMEOUT, stream.message())
        .await
        .map_err(|_| format!("node {source} sent no copy header within {CHUNK_TIMEOUT:?}"))?
        .map_err(|status| format!("node {source}: {}", status.message()))?
        .ok_or_else(|| format!("node {source} ended the copy before its header"))?;
    let header = check_header(&first.header, &have, config)?;
    // Files the image no longer has (compacted or deleted) go.
    let entries = std::fs::read_dir(dir).map_err(|e| format!("listing {}: {e}", dir.display()))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if crate::log::is_image_file(&name) && !header.files.iter().any(|f| f.name == name) {
            std::fs::remove_file(entry.path())
                .map_err(|e| format!("removing {}: {e}", entry.path().display()))?;
        }
    }
    let shipped = write_files(dir, &header, &mut stream).await?;
    let have: Vec<HaveFile> = header
        .files
        .iter()
        .map(|f| HaveFile {
            name: f.name.clone(),
            len: f.len,
            ino: f.ino,
            tail_crc: 0,
        })
        .collect();
    let bytes = serde_json::to_vec(&have).map_err(|e| format!("encoding the copy's files: {e}"))?;
    let record = dir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        crate::log::file::sync_dir(&record)?;
        crate::log::file::write_atomically(&record, HAVE_FILE, &bytes)
    })
    .await
    .map_err(|e| format!("the recording task failed: {e}"))?
    .map_err(|e| format!("recording the copy's files in {}: {e}", dir.display()))?;
    Ok((shipped, header.end_offset))
}

/// The header, within the limits and consistent with what the receiver said it holds.
fn check_header(
    bytes: &[u8],
    have: &[HaveFile],
    config: &crate::log::LogConfig,
) -> Result<CopyHeader, String> {
    if bytes.len() > HEADER_BYTES_MAX {
        return Err(format!(
            "a copy header of {} bytes (at most {HEADER_BYTES_MAX})",
            bytes.len()
        ));
    }
    let header: CopyHeader = serde_json::from_slice(bytes)
        .map_err(|e| format!("a copy header that does not decode: {e}"))?;
    // The snapshot transfer's limits: names (each once), count, a segment's and the
    // manifest's size.
    let wire: Vec<crate::replication::snapshot::WireFile> = header
        .files
        .iter()
        .map(|f| crate::replication::snapshot::WireFile {
            name: f.name.clone(),
            len: f.len,
        })
        .collect();
    crate::replication::snapshot::check_files(&wire, config)?;
    let held_by_name: HashMap<(&str, u64), u64> = have
        .iter()
        .map(|h| ((h.name.as_str(), h.ino), h.len))
        .collect();
    for file in &header.files {
        let held = held_by_name
            .get(&(file.name.as_str(), file.ino))
            .copied()
            .unwrap_or(0);
        let manifest = !file.name.ends_with(".log");
        if file.from > file.len || (file.from > 0 && (file.from != held || manifest)) {
            return Err(format!(
                "`{}` is sent from byte {} of {}, but this node holds {held} bytes of it",
                file.name, file.from, file.len
            ));
        }
    }
    Ok(header)
}

/// Writes a round's chunks: each file cut to the byte it is sent from, then its bytes in
/// order, each chunk's CRC-32C checked; every written file fsync'd. Returns the bytes written.
async fn write_files<S>(dir: &Path, header: &CopyHeader, stream: &mut S) -> Result<u64, String>
where
    S: Stream<Item = Result<v1::SnapshotChunk, Status>> + Unpin,
{
    let mut shipped = 0u64;
    let mut chunks = 0u64;
    for (index, file) in header.files.iter().enumerate() {
        let path = dir.join(&file.name);
        let handle = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| format!("opening {}: {e}", path.display()))?;
        handle
            .set_len(file.from)
            .map_err(|e| format!("cutting {}: {e}", path.display()))?;
        let handle = Arc::new(handle);
        // One write in flight on a blocking thread while the next chunk arrives.
        let mut pending: Option<tokio::task::JoinHandle<std::io::Result<()>>> = None;
        let mut position = file.from;
        while position < file.len {
            let chunk = tokio::time::timeout(CHUNK_TIMEOUT, stream.next())
                .await
                .map_err(|_| format!("no copy chunk within {CHUNK_TIMEOUT:?}"))?
                .ok_or_else(|| {
                    format!(
                        "the copy ended with {} at byte {position} of {}",
                        file.name, file.len
                    )
                })?
                .map_err(|status| {
                    format!(
                        "the copy broke off after {chunks} chunks: {}",
                        status.message()
                    )
                })?;
            chunks += 1;
            let left = file.len - position;
            if chunk.file as usize != index
                || chunk.position != position
                || chunk.data.is_empty()
                || chunk.data.len() > CHUNK_BYTES_MAX
                || chunk.data.len() as u64 > left
            {
                return Err(format!(
                    "chunk {chunks} is for file {} at byte {} ({} bytes), but {} continues at byte {position} ({left} left)",
                    chunk.file,
                    chunk.position,
                    chunk.data.len(),
                    file.name
                ));
            }
            if crc32c::crc32c(&chunk.data) != chunk.crc32c {
                return Err(format!(
                    "chunk {chunks} ({} at byte {position}) fails its CRC-32C",
                    file.name
                ));
            }
            finish_write(pending.take(), &path).await?;
            let (writer, data, at) = (handle.clone(), chunk.data, position);
            position += data.len() as u64;
            shipped += data.len() as u64;
            pending = Some(tokio::task::spawn_blocking(move || {
                writer.write_all_at(&data, at)
            }));
        }
        finish_write(pending.take(), &path).await?;
        let syncing = handle.clone();
        tokio::task::spawn_blocking(move || syncing.sync_all())
            .await
            .map_err(|e| format!("the syncing task failed: {e}"))?
            .map_err(|e| format!("syncing {}: {e}", path.display()))?;
    }
    if stream.next().await.is_some() {
        return Err("the copy sent more than its header listed".into());
    }
    Ok(shipped)
}

/// Waits for a chunk's write, if one is under way.
async fn finish_write(
    pending: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    path: &Path,
) -> Result<(), String> {
    match pending {
        Some(write) => write
            .await
            .map_err(|e| format!("the writing task failed: {e}"))?
            .map_err(|e| format!("writing {}: {e}", path.display())),
        None => Ok(()),
    }
}

/// Serves `Peer.CopyPartition` on the holder: checks that the partition moves from here to
/// the caller, waits for the fence on a fenced round, exports an image and streams what the
/// caller lacks of it at the move's throttle.
pub async fn serve(
    controller: &Controller,
    request: v1::CopyPartitionRequest,
) -> Result<impl Stream<Item = Result<v1::SnapshotChunk, Status>> + Send + 'static, Status> {
    let registry = controller
        .registry()
        .ok_or_else(|| Status::unavailable("this node is starting"))?;
    let metadata = controller.metadata();
    let me = controller.node_id();
    let (name, topic_meta) = metadata
        .topics
        .iter()
        .find(|(_, t)| t.id == request.topic_id)
        .ok_or_else(|| Status::not_found(format!("no topic {} here", request.topic_id)))?;
    let moving = topic_meta
        .partitions
        .get(request.partition as usize)
        .filter(|p| topic_meta.replication_factor == 1 && p.replicas == [me])
        .and_then(|p| p.moving.clone())
        .filter(|m| m.target == [request.from])
        .ok_or_else(|| {
            Status::failed_precondition(format!(
                "{name}/{} is not a single replica moving from node {me} to node {}",
                request.partition, request.from
            ))
        })?;
    let topic = registry
        .get(name)
        .map_err(|e| Status::not_found(e.to_string()))?;
    let partition = topic
        .partition(request.partition)
        .map_err(|e| Status::not_found(e.to_string()))?
        .clone();
    let log = partition
        .local_log()
        .map_err(|e| Status::not_found(e.to_string()))?;
    if request.fenced {
        let deadline = Instant::now() + FENCE_WAIT;
        let id = GroupId {
            topic_id: request.topic_id.clone(),
            partition: request.partition,
        };
        loop {
            // The fence as soon as this node applied it (not at its next tick).
            let fenced = controller
                .copies()
                .apply_fence(controller, &partition, &id)
                .map_err(|e| Status::unavailable(e.to_string()))?;
            if fenced.is_some() && partition.is_handing_over() {
                break;
            }
            if Instant::now() >= deadline {
                return Err(Status::unavailable(format!(
                    "{name}/{} is not fenced here yet",
                    request.partition
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    if request.have.len() > HEADER_BYTES_MAX {
        return Err(Status::invalid_argument(
            "a copy request listing too many files",
        ));
    }
    let have: Vec<HaveFile> = serde_json::from_slice(&request.have).map_err(|e| {
        Status::invalid_argument(format!("a copy request that does not decode: {e}"))
    })?;
    static SEQUENCE: AtomicU64 = AtomicU64::new(0);
    let out = registry.config().data_dir.join(format!(
        "{COPY_OUT_PREFIX}{}-{}",
        std::process::id(),
        SEQUENCE.fetch_add(1, Ordering::Relaxed)
    ));
    let image_dir = out.clone();
    let (image, files) = tokio::task::spawn_blocking(move || -> Result<_, String> {
        let image = log
            .export_image(&image_dir)
            .map_err(|e| format!("exporting an image: {e}"))?;
        let mut files = Vec::with_capacity(image.files.len());
        for file in &image.files {
            let ino = std::fs::metadata(image_dir.join(&file.name))
                .map_err(|e| format!("reading {}: {e}", file.name))?
                .ino();
            let from = have
                .iter()
                .find(|h| h.name == file.name && h.ino == ino && h.len <= file.len)
                .filter(|_| file.name.ends_with(".log"))
                // The receiver's last bytes must be this file's: else it is sent whole.
                .filter(|h| {
                    tail_crc(&image_dir.join(&file.name), h.len).is_ok_and(|c| c == h.tail_crc)
                })
                .map_or(0, |h| h.len);
            files.push(CopyFile {
                name: file.name.clone(),
                len: file.len,
                ino,
                from,
            });
        }
        Ok((image, files))
    })
    .await
    .map_err(|e| Status::internal(format!("the export task failed: {e}")))?
    .map_err(|e| {
        let _ = std::fs::remove_dir_all(&out);
        Status::internal(e)
    })?;
    let guard = RemoveOnDrop(out.clone());
    let header = CopyHeader {
        end_offset: image.end_offset,
        files: files.clone(),
    };
    let header =
        serde_json::to_vec(&header).map_err(|e| Status::internal(format!("encoding: {e}")))?;
    let bytes: u64 = files.iter().map(|f| f.len - f.from).sum();
    tracing::info!(topic = %name, partition = request.partition, to = request.from, bytes, end_offset = image.end_offset, fenced = request.fenced, "sending a partition copy round");
    let first = v1::SnapshotChunk {
        header: header.into(),
        ..Default::default()
    };
    let parts = files
        .iter()
        .map(|f| (f.name.clone(), f.from, f.len))
        .collect();
    let failure = Arc::new(parking_lot::Mutex::new(None));
    let chunks =
        crate::replication::snapshot::file_chunks(first, out, parts, Box::new(guard), failure);
    let throttle = controller.replicas().throttle().clone();
    // The fenced round is small and writes wait for it: not throttled.
    let rate = if request.fenced {
        0
    } else {
        moving.throttle_bytes_per_sec
    };
    Ok(chunks.then(move |chunk| {
        let throttle = throttle.clone();
        async move {
            throttle.take(rate, chunk.data.len() as u64).await;
            Ok(chunk)
        }
    }))
}

/// Removes an image directory when the round that sends it ends.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_a_header_sending_a_file_from_a_byte_the_receiver_lacks_when_checked_should_be_refused()
    {
        let config = crate::log::tests::small_config();
        let have = vec![HaveFile {
            name: "00000000000000000000.log".into(),
            len: 100,
            ino: 7,
            tail_crc: 0,
        }];
        let header = |from: u64, ino: u64| {
            serde_json::to_vec(&CopyHeader {
                end_offset: 10,
                files: vec![CopyFile {
                    name: "00000000000000000000.log".into(),
                    len: 200,
                    ino,
                    from,
                }],
            })
            .unwrap()
        };
        assert!(check_header(&header(100, 7), &have, &config).is_ok());
        assert!(check_header(&header(0, 8), &have, &config).is_ok());
        assert!(
            check_header(&header(100, 8), &have, &config).is_err(),
            "another file of the same name"
        );
        assert!(check_header(&header(50, 7), &have, &config).is_err());
        let bad = serde_json::to_vec(&CopyHeader {
            end_offset: 0,
            files: vec![CopyFile {
                name: "../etc/passwd".into(),
                len: 1,
                ino: 1,
                from: 0,
            }],
        })
        .unwrap();
        assert!(check_header(&bad, &[], &config).is_err());
    }
}
