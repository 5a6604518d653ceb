//! Catching up by snapshot: a replica that the leader's purged Raft log left behind receives a
//! copy of the leader's partition log (its segment files) and replaces its own log with it
//! (`state_machine.rs` installs it). This module is the image a snapshot carries
//! ([`SnapshotImage`], openraft's snapshot data: files in a staging directory, never the log in
//! memory) and its transfer over `Peer.InstallSnapshot`.
//!
//! ## The image
//! A staging directory of hard links to the leader's segment files and a copy of its compaction
//! manifest, with the byte count of each file that belongs to the image and the partition log's
//! end offset it ends at (`log/image.rs`: why links of a live log are a consistent image). The
//! state machine builds it when openraft asks for the current snapshot, under the state
//! machine's lock, with the applied state (last applied log id, membership, end offset) made
//! durable first: the snapshot's meta describes exactly the shipped bytes.
//!
//! ## The transfer (one client stream per attempt)
//! ```text
//! message 0  SnapshotChunk { cluster_id, from, topic_id, partition, header }
//!            header = JSON { "vote": Vote, "meta": SnapshotMeta, "end_offset": u64,
//!                            "files": [{ "name": str, "len": u64 }, ...] }
//! message i  SnapshotChunk { file, position, data, crc32c }   (i >= 1)
//!            the files in header order, each from position 0 to its len in chunks of 1 to
//!            CHUNK_BYTES_MAX bytes, no gap, no overlap; an empty file gets no chunk;
//!            crc32c = CRC-32C (Castagnoli) of data
//! answer     ReplicateResponse { payload = JSON Result<SnapshotResponse, String> }
//! ```
//! The receiver writes each file into its own staging directory as the chunks arrive (checking
//! each chunk's CRC, file and position), fsyncs every file and the directory, then verifies the
//! whole image as a log (every batch's CRC, contiguous offsets, leader epochs, the exact end
//! offset: `log::verify_image`) before openraft sees it. Anything wrong refuses the transfer
//! (an error answer; openraft's sender retries, with a new image) and removes the copy.
//!
//! Limits: header <= [`HEADER_BYTES_MAX`]; files <= [`FILES_MAX`]; a file name is a segment's
//! `.log` or `segments.manifest`, each at most once; a segment <= the topic's segment size plus
//! one batch, the manifest <= [`MANIFEST_BYTES_MAX`]; a chunk <= [`CHUNK_BYTES_MAX`]; the next
//! message within [`CHUNK_TIMEOUT`]; one transfer per group at a time on a receiver (another is
//! refused); the sender gives up on a transfer after [`transfer_timeout`] of its bytes.
//!
//! ## Staging directories (in the group's `raft/` directory)
//! `snapshot-out-<pid>-<n>` (the sender's links) and `snapshot-in-<pid>-<n>` (a receiver's
//! copy) are removed when their image is dropped: after the transfer, after a refusal, after
//! the install moved the files out. An install under way keeps its directory (its marker names
//! it, see `state_machine.rs`). What a crash leaves is removed when the partition opens.

use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt as _};
use serde::{Deserialize, Serialize};
use syncline_proto::v1;

use super::types::{SnapshotMeta, Vote};
use crate::log::{ImageFile, Log, LogConfig};

/// Most bytes of one chunk: large enough that per-message overhead is negligible, small
/// enough that a transfer holds little memory (a few chunks in flight).
pub const CHUNK_BYTES_MAX: usize = 1 << 20;
/// Most files in one image: 64k segments of the default 1 GiB are 64 TiB of partition log.
pub const FILES_MAX: usize = 65_536;
/// Most bytes of the header (65,536 file names of ~40 bytes, and the meta).
pub const HEADER_BYTES_MAX: usize = 8 << 20;
/// Most bytes of the shipped manifest: its fixed part, 16 bytes for each of at most 2^20
/// listed segments, the CRC (`log/manifest.rs`).
pub const MANIFEST_BYTES_MAX: u64 = 60 + 16 * (1 << 20) + 4;
/// A receiver waits this long for the next message before it refuses the transfer.
pub const CHUNK_TIMEOUT: Duration = Duration::from_secs(30);

/// Prefix of the staging directories.
const STAGING_PREFIX: &str = "snapshot-";

/// How long a sender gives a transfer of `bytes`: 30 s plus 1 s per 8 MiB (a replica on a slow
/// disk still gets a 10 GiB partition across in under 25 minutes).
pub fn transfer_timeout(bytes: u64) -> Duration {
    Duration::from_secs(30 + bytes / (8 << 20))
}

/// The first message's header.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TransferHeader {
    /// The sending leader's vote.
    pub vote: Vote,
    /// What the image holds.
    pub meta: SnapshotMeta,
    /// The partition log's end offset the image ends at.
    pub end_offset: u64,
    /// The files, in order.
    pub files: Vec<WireFile>,
}

/// A file of the header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireFile {
    /// Its name in the partition directory.
    pub name: String,
    /// Its length.
    pub len: u64,
}

/// A staging directory, removed when dropped unless kept.
#[derive(Debug)]
struct Staging {
    dir: PathBuf,
    keep: bool,
}

impl Drop for Staging {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        match std::fs::remove_dir_all(&self.dir) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                tracing::warn!(dir = %self.dir.display(), %error, "could not remove a snapshot staging directory (removed at the next open)");
            }
        }
    }
}

/// A partition group's snapshot data: an image of the partition log in a staging directory
/// (see the module doc), or the meta alone (what a snapshot build reports to openraft), or
/// the reason no image could be made now (a send of it fails and openraft tries again).
#[derive(Debug)]
pub struct SnapshotImage {
    end_offset: u64,
    files: Vec<ImageFile>,
    staging: Option<Staging>,
    unavailable: Option<String>,
}

fn staging_dir(raft_dir: &Path, kind: &str) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    raft_dir.join(format!("{STAGING_PREFIX}{kind}-{}-{n}", std::process::id()))
}

impl SnapshotImage {
    /// No files: the meta of a snapshot that was built (the partition log itself is its data).
    pub fn meta_only(end_offset: u64) -> SnapshotImage {
        SnapshotImage {
            end_offset,
            files: Vec::new(),
            staging: None,
            unavailable: Some("a snapshot build reports its meta only".into()),
        }
    }

    /// No image now, for `reason`.
    pub fn unavailable(end_offset: u64, reason: String) -> SnapshotImage {
        SnapshotImage {
            end_offset,
            files: Vec::new(),
            staging: None,
            unavailable: Some(reason),
        }
    }

    /// Links an image of `log` (which must not take appends meanwhile) into a new staging
    /// directory under `raft_dir`.
    pub fn export(log: &Log, raft_dir: &Path) -> Result<SnapshotImage, String> {
        let dir = staging_dir(raft_dir, "out");
        let staging = Staging { dir, keep: false };
        let image = log
            .export_image(&staging.dir)
            .map_err(|e| format!("linking an image of the partition log: {e}"))?;
        Ok(SnapshotImage {
            end_offset: image.end_offset,
            files: image.files,
            staging: Some(staging),
            unavailable: None,
        })
    }

    /// The partition log's end offset the image ends at.
    pub fn end_offset(&self) -> u64 {
        self.end_offset
    }

    /// Its files.
    pub fn files(&self) -> &[ImageFile] {
        &self.files
    }

    /// Bytes of all its files.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.len).sum()
    }

    /// Why there is no image to send, if there is none.
    pub fn unavailable_reason(&self) -> Option<&str> {
        self.unavailable.as_deref()
    }

    /// The staging directory, if the image has one.
    pub fn dir(&self) -> Option<&Path> {
        self.staging.as_ref().map(|s| s.dir.as_path())
    }

    /// The staging directory, no longer removed when the image drops (an install takes it
    /// over); None when the image has none.
    pub fn keep(mut self) -> Option<PathBuf> {
        let staging = self.staging.as_mut()?;
        staging.keep = true;
        Some(staging.dir.clone())
    }
}

/// Removes every staging directory in `raft_dir` except `keep` (what a crash left behind).
pub fn remove_leftovers(raft_dir: &Path, keep: Option<&str>) -> std::io::Result<usize> {
    let entries = match std::fs::read_dir(raft_dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(error) => return Err(error),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with(STAGING_PREFIX) && Some(name) != keep && entry.path().is_dir() {
            std::fs::remove_dir_all(entry.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// The messages of a transfer: `first` (routing and header), then the image's bytes in chunks,
/// read from its files as the network takes them. A read error ends the stream early (the
/// receiver then refuses the incomplete transfer) and is left in `failure`.
pub fn chunks(
    first: v1::SnapshotChunk,
    image: SnapshotImage,
    failure: Arc<parking_lot::Mutex<Option<String>>>,
) -> impl Stream<Item = v1::SnapshotChunk> + Send + 'static {
    let dir = image.dir().map(Path::to_path_buf);
    let files = image
        .files
        .iter()
        .map(|f| (f.name.clone(), 0, f.len))
        .collect();
    match dir {
        Some(dir) => file_chunks(first, dir, files, Box::new(image), failure).left_stream(),
        None => {
            *failure.lock() = Some("the image has no files to send".into());
            futures_util::stream::iter([first]).right_stream()
        }
    }
}

/// The messages of a transfer of `files` in `dir` (name, first byte, end): `first`, then each
/// file's bytes from its first byte in chunks of at most [`CHUNK_BYTES_MAX`], read as the
/// network takes them (`file` is the index in `files`). `keep` lives as long as the stream
/// (what keeps the files there). A read error ends the stream early and is left in `failure`.
pub fn file_chunks(
    first: v1::SnapshotChunk,
    dir: PathBuf,
    files: Vec<(String, u64, u64)>,
    keep: Box<dyn std::any::Any + Send>,
    failure: Arc<parking_lot::Mutex<Option<String>>>,
) -> impl Stream<Item = v1::SnapshotChunk> + Send + 'static {
    struct Reader {
        dir: PathBuf,
        files: Vec<(String, u64, u64)>,
        _keep: Box<dyn std::any::Any + Send>,
        file: usize,
        position: u64,
        open: Option<std::fs::File>,
    }
    impl Reader {
        /// The next chunk, blocking; None at the end.
        fn next(&mut self) -> Result<Option<v1::SnapshotChunk>, String> {
            loop {
                let Some((name, from, len)) = self.files.get(self.file) else {
                    return Ok(None);
                };
                let position = self.position.max(*from);
                if position >= *len {
                    self.file += 1;
                    self.position = 0;
                    self.open = None;
                    continue;
                }
                let path = self.dir.join(name);
                if self.open.is_none() {
                    self.open = Some(
                        std::fs::File::open(&path)
                            .map_err(|e| format!("opening {}: {e}", path.display()))?,
                    );
                }
                let handle = self.open.as_ref().ok_or("no open file")?;
                let want = (len - position).min(CHUNK_BYTES_MAX as u64) as usize;
                let mut data = vec![0u8; want];
                handle
                    .read_exact_at(&mut data, position)
                    .map_err(|e| format!("reading {} at {position}: {e}", path.display()))?;
                let chunk = v1::SnapshotChunk {
                    file: self.file as u32,
                    position,
                    crc32c: crc32c::crc32c(&data),
                    data: data.into(),
                    ..Default::default()
                };
                self.position = position + want as u64;
                return Ok(Some(chunk));
            }
        }
    }
    let reader = Reader {
        dir,
        files,
        _keep: keep,
        file: 0,
        position: 0,
        open: None,
    };
    let head = futures_util::stream::iter([first]);
    let body = futures_util::stream::unfold(Some(reader), move |reader| {
        let failure = failure.clone();
        async move {
            let mut reader = reader?;
            let read = tokio::task::spawn_blocking(move || {
                let next = reader.next();
                (reader, next)
            })
            .await;
            match read {
                Ok((reader, Ok(Some(chunk)))) => Some((chunk, Some(reader))),
                Ok((_, Ok(None))) => None,
                Ok((_, Err(error))) => {
                    *failure.lock() = Some(error);
                    None
                }
                Err(error) => {
                    *failure.lock() = Some(format!("the reading task failed: {error}"));
                    None
                }
            }
        }
    });
    // One chunk is read when the network takes the one before (HTTP/2 flow control bounds
    // what is in flight): a transfer holds a few MiB at most.
    head.chain(body)
}

/// Why a transfer was refused (sent back to the leader as its answer).
pub type Refusal = String;

/// Receives a transfer into a new staging directory under `raft_dir` after its first message
/// (`header`): checks every chunk, fsyncs the files, verifies the image as a log with `config`
/// (the replica's own partition log settings) and returns the snapshot to install.
pub async fn receive<S>(
    raft_dir: &Path,
    config: &LogConfig,
    header: &[u8],
    mut rest: S,
) -> Result<(Vote, SnapshotMeta, SnapshotImage), Refusal>
where
    S: Stream<Item = Result<v1::SnapshotChunk, tonic::Status>> + Unpin,
{
    if header.len() > HEADER_BYTES_MAX {
        return Err(format!(
            "a snapshot header of {} bytes (at most {HEADER_BYTES_MAX})",
            header.len()
        ));
    }
    let header: TransferHeader = serde_json::from_slice(header)
        .map_err(|e| format!("a snapshot header that does not decode: {e}"))?;
    check_files(&header.files, config)?;
    let staging = Staging {
        dir: staging_dir(raft_dir, "in"),
        keep: false,
    };
    let dir = staging.dir.clone();
    tokio::fs::create_dir(&dir)
        .await
        .map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let mut file = 0usize;
    let mut written = 0u64;
    let mut out: Option<tokio::fs::File> = None;
    let mut chunks = 0u64;
    loop {
        // Skip the files that are complete (or empty) and close them durably.
        while let Some(wire) = header.files.get(file) {
            if out.is_none() {
                let path = dir.join(&wire.name);
                out = Some(
                    tokio::fs::File::create(&path)
                        .await
                        .map_err(|e| format!("creating {}: {e}", path.display()))?,
                );
            }
            if written < wire.len {
                break;
            }
            if let Some(done) = out.take() {
                done.sync_all()
                    .await
                    .map_err(|e| format!("syncing {}: {e}", wire.name))?;
            }
            file += 1;
            written = 0;
        }
        let next = tokio::time::timeout(CHUNK_TIMEOUT, rest.next())
            .await
            .map_err(|_| {
                format!("no snapshot chunk within {CHUNK_TIMEOUT:?} (after {chunks} chunks)")
            })?;
        let chunk = match next {
            None => break,
            Some(Ok(chunk)) => chunk,
            Some(Err(status)) => {
                return Err(format!(
                    "the transfer broke off after {chunks} chunks: {}",
                    status.message()
                ))
            }
        };
        chunks += 1;
        let Some(wire) = header.files.get(file) else {
            return Err(format!(
                "chunk {chunks} comes after the last file's last byte"
            ));
        };
        if chunk.file as usize != file || chunk.position != written {
            return Err(format!(
                "chunk {chunks} is for file {} at byte {}, but file {file} ({}) continues at byte {written}",
                chunk.file, chunk.position, wire.name
            ));
        }
        let left = wire.len - written;
        if chunk.data.is_empty()
            || chunk.data.len() > CHUNK_BYTES_MAX
            || chunk.data.len() as u64 > left
        {
            return Err(format!(
                "chunk {chunks} of {} carries {} bytes (1 to {}, and {left} are left in the file)",
                wire.name,
                chunk.data.len(),
                CHUNK_BYTES_MAX
            ));
        }
        if crc32c::crc32c(&chunk.data) != chunk.crc32c {
            return Err(format!(
                "chunk {chunks} ({} at byte {written}) fails its CRC-32C",
                wire.name
            ));
        }
        let handle = out.as_mut().ok_or("no open file for a chunk")?;
        tokio::io::AsyncWriteExt::write_all(handle, &chunk.data)
            .await
            .map_err(|e| format!("writing {}: {e}", wire.name))?;
        written += chunk.data.len() as u64;
    }
    if let Some(wire) = header.files.get(file) {
        return Err(format!(
            "the transfer ended with file {file} ({}) at byte {written} of {}",
            wire.name, wire.len
        ));
    }
    let config = config.clone();
    let end_offset = header.end_offset;
    let check_dir = dir.clone();
    tokio::task::spawn_blocking(move || {
        crate::log::file::sync_dir(&check_dir)
            .map_err(|e| format!("syncing {}: {e}", check_dir.display()))?;
        crate::log::verify_image(&check_dir, config, end_offset)
            .map_err(|e| format!("the received partition log does not verify: {e}"))
    })
    .await
    .map_err(|e| format!("the verifying task failed: {e}"))??;
    let files = header
        .files
        .iter()
        .map(|f| ImageFile {
            name: f.name.clone(),
            len: f.len,
        })
        .collect();
    Ok((
        header.vote,
        header.meta,
        SnapshotImage {
            end_offset,
            files,
            staging: Some(staging),
            unavailable: None,
        },
    ))
}

/// The header's file list within the limits (see the module doc).
pub(crate) fn check_files(files: &[WireFile], config: &LogConfig) -> Result<(), Refusal> {
    if files.len() > FILES_MAX {
        return Err(format!(
            "a snapshot of {} files (at most {FILES_MAX})",
            files.len()
        ));
    }
    let segment_max = config
        .segment_bytes_max
        .saturating_add(u64::from(config.batch_bytes_max));
    let mut seen = std::collections::HashSet::with_capacity(files.len());
    for file in files {
        if !crate::log::is_image_file(&file.name) {
            return Err(format!(
                "`{}` is not a file of a partition log's image",
                file.name.chars().take(100).collect::<String>()
            ));
        }
        if !seen.insert(file.name.as_str()) {
            return Err(format!("`{}` is listed twice", file.name));
        }
        let max = if file.name.ends_with(".log") {
            segment_max
        } else {
            MANIFEST_BYTES_MAX
        };
        if file.len > max {
            return Err(format!(
                "`{}` has {} bytes (at most {max})",
                file.name, file.len
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::tests::{make_batch, small_config};

    /// A log of a few segments in `dir` and an image of it linked under `raft_dir`.
    fn exported(dir: &Path, raft_dir: &Path, batches: u8) -> (Log, SnapshotImage) {
        let log = Log::open(dir, small_config()).unwrap();
        for seed in 0..batches {
            log.append(&make_batch(10, 300, 1_000, seed)).unwrap();
        }
        std::fs::create_dir_all(raft_dir).unwrap();
        let image = SnapshotImage::export(&log, raft_dir).unwrap();
        (log, image)
    }

    fn header(image: &SnapshotImage) -> TransferHeader {
        TransferHeader {
            vote: Vote::new(3, 1),
            meta: SnapshotMeta::default(),
            end_offset: image.end_offset(),
            files: image
                .files()
                .iter()
                .map(|f| WireFile {
                    name: f.name.clone(),
                    len: f.len,
                })
                .collect(),
        }
    }

    /// The image's chunks after the first message.
    async fn body(image: SnapshotImage) -> Vec<v1::SnapshotChunk> {
        let failure = Arc::new(parking_lot::Mutex::new(None));
        let mut all: Vec<v1::SnapshotChunk> =
            chunks(v1::SnapshotChunk::default(), image, failure.clone())
                .collect()
                .await;
        assert!(failure.lock().is_none());
        all.remove(0);
        all
    }

    async fn receive_all(
        raft_dir: &Path,
        header: &TransferHeader,
        body: Vec<v1::SnapshotChunk>,
    ) -> Result<(Vote, SnapshotMeta, SnapshotImage), Refusal> {
        let header = serde_json::to_vec(header).unwrap();
        let stream = futures_util::stream::iter(body.into_iter().map(Ok));
        receive(raft_dir, &small_config(), &header, stream).await
    }

    fn staging_dirs(raft_dir: &Path) -> Vec<String> {
        std::fs::read_dir(raft_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_str().unwrap().to_string())
            .filter(|n| n.starts_with(STAGING_PREFIX))
            .collect()
    }

    #[tokio::test]
    async fn given_an_image_when_sent_in_chunks_should_arrive_whole_and_verified() {
        let root = tempfile::tempdir().unwrap();
        let (log, image) = exported(&root.path().join("leader"), &root.path().join("out"), 40);
        let header = header(&image);
        let sent_dir = image.dir().unwrap().to_path_buf();
        let body = body(image).await;
        assert!(body.iter().all(|c| c.data.len() <= CHUNK_BYTES_MAX));
        assert!(!sent_dir.exists(), "the sender's links go once sent");
        let raft_dir = root.path().join("in");
        std::fs::create_dir_all(&raft_dir).unwrap();
        let (vote, _, received) = receive_all(&raft_dir, &header, body).await.unwrap();
        assert_eq!(vote, Vote::new(3, 1));
        assert_eq!(received.end_offset(), log.end_offset());
        let dir = received.dir().unwrap().to_path_buf();
        for file in received.files() {
            assert_eq!(
                std::fs::metadata(dir.join(&file.name)).unwrap().len(),
                file.len
            );
        }
        drop(received);
        assert!(
            staging_dirs(&raft_dir).is_empty(),
            "dropped images leave nothing"
        );
    }

    #[tokio::test]
    async fn given_a_corrupt_chunk_when_received_should_refuse_the_transfer_and_remove_its_copy() {
        let root = tempfile::tempdir().unwrap();
        let (_log, image) = exported(&root.path().join("leader"), &root.path().join("out"), 40);
        let header = header(&image);
        let mut body = body(image).await;
        let raft_dir = root.path().join("in");
        std::fs::create_dir_all(&raft_dir).unwrap();
        let mut data = body[1].data.to_vec();
        data[7] ^= 0x01;
        body[1].data = data.into();
        let refusal = receive_all(&raft_dir, &header, body).await.unwrap_err();
        assert!(refusal.contains("CRC"), "{refusal}");
        assert!(staging_dirs(&raft_dir).is_empty());
    }

    #[tokio::test]
    async fn given_a_corrupt_batch_with_a_matching_chunk_crc_should_be_refused_by_verification() {
        let root = tempfile::tempdir().unwrap();
        let (_log, image) = exported(&root.path().join("leader"), &root.path().join("out"), 40);
        let header = header(&image);
        let mut body = body(image).await;
        let raft_dir = root.path().join("in");
        std::fs::create_dir_all(&raft_dir).unwrap();
        // Damage the sender's bytes themselves (the chunk's CRC is computed over them).
        let last = body.len() - 2;
        let mut data = body[last].data.to_vec();
        let middle = data.len() / 2;
        data[middle] ^= 0x40;
        body[last].crc32c = crc32c::crc32c(&data);
        body[last].data = data.into();
        let refusal = receive_all(&raft_dir, &header, body).await.unwrap_err();
        assert!(refusal.contains("does not verify"), "{refusal}");
        assert!(staging_dirs(&raft_dir).is_empty());
    }

    #[tokio::test]
    async fn given_chunks_out_of_order_missing_or_past_the_end_should_be_refused() {
        let root = tempfile::tempdir().unwrap();
        let (_log, image) = exported(&root.path().join("leader"), &root.path().join("out"), 40);
        let header = header(&image);
        let body = body(image).await;
        let raft_dir = root.path().join("in");
        std::fs::create_dir_all(&raft_dir).unwrap();
        let mut swapped = body.clone();
        swapped.swap(0, 1);
        let refusal = receive_all(&raft_dir, &header, swapped).await.unwrap_err();
        assert!(refusal.contains("continues at byte"), "{refusal}");
        let mut short = body.clone();
        short.pop();
        let refusal = receive_all(&raft_dir, &header, short).await.unwrap_err();
        assert!(refusal.contains("the transfer ended"), "{refusal}");
        let mut long = body.clone();
        long.push(body[0].clone());
        let refusal = receive_all(&raft_dir, &header, long).await.unwrap_err();
        assert!(refusal.contains("after the last file"), "{refusal}");
        assert!(staging_dirs(&raft_dir).is_empty());
    }

    #[tokio::test]
    async fn given_a_header_outside_the_limits_should_be_refused_before_any_byte_is_written() {
        let root = tempfile::tempdir().unwrap();
        let raft_dir = root.path().join("in");
        std::fs::create_dir_all(&raft_dir).unwrap();
        let file = |name: &str, len: u64| WireFile {
            name: name.into(),
            len,
        };
        let base = TransferHeader {
            vote: Vote::new(1, 1),
            meta: SnapshotMeta::default(),
            end_offset: 0,
            files: Vec::new(),
        };
        for (files, expected) in [
            (vec![file("../etc/passwd", 1)], "not a file"),
            (vec![file("00000000000000000000.index", 1)], "not a file"),
            (
                vec![
                    file("00000000000000000000.log", 1),
                    file("00000000000000000000.log", 1),
                ],
                "twice",
            ),
            (vec![file("00000000000000000000.log", 1 << 40)], "at most"),
            (
                (0..=FILES_MAX as u64)
                    .map(|i| file(&format!("{i:020}.log"), 0))
                    .collect(),
                "files (at most",
            ),
        ] {
            let header = TransferHeader {
                files,
                ..base.clone()
            };
            let refusal = receive_all(&raft_dir, &header, Vec::new())
                .await
                .unwrap_err();
            assert!(refusal.contains(expected), "{refusal}");
        }
        assert!(staging_dirs(&raft_dir).is_empty());
    }

    #[test]
    fn given_leftover_staging_directories_should_remove_them_and_nothing_else() {
        let root = tempfile::tempdir().unwrap();
        for name in ["snapshot-in-1-0", "snapshot-out-1-3", "keep-me"] {
            std::fs::create_dir(root.path().join(name)).unwrap();
        }
        std::fs::write(root.path().join("applied.json"), b"{}").unwrap();
        assert_eq!(remove_leftovers(root.path(), None).unwrap(), 2);
        assert!(root.path().join("keep-me").exists());
        assert!(root.path().join("applied.json").exists());
    }
}
