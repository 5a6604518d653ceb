//! A partition's Raft log ([`RaftLog`]): openraft's own conformance suite, and what the segment
//! files keep over a reopen: vote, committed (as of the last meta write), purged and entries come
//! back; a torn tail is cut; interior corruption (a bad record before valid ones, a bad record in
//! a sealed segment, a gap, a term going down) is refused naming the file; segments roll and
//! purges delete them; entries evicted from the cache read back byte for byte from disk; and a
//! property test runs random appends, truncations, purges and reopens against a model.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{Stream, TryStreamExt as _};
use openraft::storage::{EntryResponder, IOFlushed, RaftLogStorage, RaftStateMachine};
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::type_config::TypeConfigExt as _;
use openraft::{EntryPayload, OptionalSend, RaftLogReader, RaftSnapshotBuilder, StorageError};
use syncline_broker::replication::raft_log::{RaftLog, RaftLogError, RaftLogLimits, META_FILE};
use syncline_broker::replication::types::{
    log_id, Applied, Entry, LogId, Membership, PartitionRaft, Proposal, SnapshotMeta,
    StoredMembership, Vote,
};
use tokio::sync::Mutex;

type Snapshot = openraft::type_config::alias::SnapshotOf<PartitionRaft, Cursor<Vec<u8>>>;

/// A state machine that only records what it applied (the suite needs one).
#[derive(Clone, Default)]
struct RecordingStateMachine {
    inner: Arc<Mutex<Recorded>>,
}

#[derive(Default)]
struct Recorded {
    last_applied: Option<LogId>,
    membership: StoredMembership,
    applied: Vec<LogId>,
    snapshot: Option<(SnapshotMeta, Vec<u8>)>,
}

impl RaftSnapshotBuilder<PartitionRaft> for RecordingStateMachine {
    type SnapshotData = Cursor<Vec<u8>>;

    async fn build_snapshot(&mut self) -> Result<Snapshot, std::io::Error> {
        let mut inner = self.inner.lock().await;
        let meta = SnapshotMeta {
            last_log_id: inner.last_applied,
            last_membership: inner.membership.clone(),
        };
        let data = serde_json::to_vec(&inner.applied).map_err(std::io::Error::other)?;
        inner.snapshot = Some((meta.clone(), data.clone()));
        Ok(Snapshot {
            meta,
            snapshot: Cursor::new(data),
        })
    }
}

impl RaftStateMachine<PartitionRaft> for RecordingStateMachine {
    type SnapshotData = Cursor<Vec<u8>>;
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), std::io::Error> {
        let inner = self.inner.lock().await;
        Ok((inner.last_applied, inner.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), std::io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<PartitionRaft>, std::io::Error>>
            + Unpin
            + OptionalSend,
    {
        let mut inner = self.inner.lock().await;
        while let Some((entry, responder)) = entries.try_next().await? {
            if let EntryPayload::Membership(membership) = &entry.payload {
                inner.membership = StoredMembership::new(Some(entry.log_id), membership.clone());
            }
            inner.last_applied = Some(entry.log_id);
            inner.applied.push(entry.log_id);
            if let Some(responder) = responder {
                responder.send(Applied::Refused(String::new()));
            }
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
    ) -> Result<(), std::io::Error> {
        let data = snapshot.into_inner();
        let applied: Vec<LogId> = serde_json::from_slice(&data).map_err(std::io::Error::other)?;
        let mut inner = self.inner.lock().await;
        inner.applied = applied;
        inner.last_applied = meta.last_log_id;
        inner.membership = meta.last_membership.clone();
        inner.snapshot = Some((meta.clone(), data));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, std::io::Error> {
        let inner = self.inner.lock().await;
        Ok(inner.snapshot.as_ref().map(|(meta, data)| Snapshot {
            meta: meta.clone(),
            snapshot: Cursor::new(data.clone()),
        }))
    }
}

struct Builder;

impl StoreBuilder<PartitionRaft, RaftLog, RecordingStateMachine, tempfile::TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, RaftLog, RecordingStateMachine), StorageError<PartitionRaft>>
    {
        let dir = tempfile::tempdir().expect("a temporary directory");
        // Small segments and cache, so the suite also runs across rolls and disk reads.
        let limits = RaftLogLimits {
            segment_bytes_max: 256,
            cache_bytes_max: 200,
            ..RaftLogLimits::default()
        };
        let log = RaftLog::open(&dir.path().join("raft"), limits).expect("a new log opens");
        Ok((dir, log, RecordingStateMachine::default()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_partition_raft_log_should_pass_openrafts_conformance_suite() {
    Suite::test_all(Builder).await.unwrap();
}

// ---- helpers ----

fn small_limits() -> RaftLogLimits {
    RaftLogLimits {
        segment_bytes_max: 1024,
        cache_bytes_max: 512,
        ..RaftLogLimits::default()
    }
}

/// A normal entry whose batch is `bytes` bytes derived from its index.
fn normal(term: u64, index: u64, bytes: usize) -> Entry {
    let batch: Vec<u8> = (0..bytes)
        .map(|i| (index as usize * 31 + i) as u8)
        .collect();
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Normal(Proposal {
            now_ms: index as i64,
            conditions: Vec::new(),
            batch: Bytes::from(batch),
        }),
    }
}

fn membership(term: u64, index: u64) -> Entry {
    let nodes: std::collections::BTreeSet<u64> = [1, 2, 3].into_iter().collect();
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Membership(Membership::new_with_defaults(vec![nodes], [])),
    }
}

/// Appends and waits for the fsync that covers the entries.
async fn append(log: &mut RaftLog, entries: Vec<Entry>) -> Result<(), std::io::Error> {
    let (tx, rx) = PartitionRaft::oneshot();
    log.append(entries, IOFlushed::signal(tx)).await?;
    rx.await.map_err(std::io::Error::other)?
}

/// Normal entries `from..=to` of `term`, 100 bytes each.
async fn append_range(log: &mut RaftLog, term: u64, from: u64, to: u64) {
    let entries = (from..=to).map(|index| normal(term, index, 100)).collect();
    append(log, entries).await.expect("append");
}

#[derive(Debug, PartialEq)]
struct State {
    vote: Option<Vote>,
    committed: Option<LogId>,
    purged: Option<LogId>,
    last: Option<LogId>,
    entries: Vec<Entry>,
}

async fn state(log: &mut RaftLog) -> State {
    let log_state = log.get_log_state().await.expect("log state");
    State {
        vote: log.read_vote().await.expect("vote"),
        committed: log.read_committed().await.expect("committed"),
        purged: log_state.last_purged_log_id,
        last: log_state.last_log_id,
        entries: log.try_get_log_entries(..).await.expect("entries"),
    }
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("listing the log directory")
        .map(|item| item.expect("listing the log directory").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "rlog"))
        .collect();
    files.sort();
    files
}

/// A log with small segments holding entries 1..=30, appended one at a time (several segments).
async fn thirty_single_appends() -> (tempfile::TempDir, RaftLog) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut log = RaftLog::open(dir.path(), small_limits()).expect("a new log opens");
    for index in 1..=30 {
        append_range(&mut log, 1, index, index).await;
    }
    (dir, log)
}

fn open_error(dir: &Path, limits: RaftLogLimits) -> RaftLogError {
    match RaftLog::open(dir, limits) {
        Ok(_) => panic!("a corrupt log opened"),
        Err(error) => error,
    }
}

// ---- tests ----

#[tokio::test]
async fn every_change_should_be_there_after_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = RaftLog::open(dir.path(), small_limits()).unwrap();
    log.save_vote(&Vote::new(1, 1)).await.unwrap();
    append_range(&mut log, 1, 1, 10).await;
    append(&mut log, vec![membership(1, 11)]).await.unwrap();
    append_range(&mut log, 2, 12, 30).await;
    log.save_committed(Some(log_id(2, 20))).await.unwrap();
    log.truncate_after(Some(log_id(2, 25))).await.unwrap();
    log.purge(log_id(1, 3)).await.unwrap();
    log.save_vote(&Vote::new_committed(2, 3)).await.unwrap();
    let before = state(&mut log).await;
    assert_eq!(before.vote, Some(Vote::new_committed(2, 3)));
    assert_eq!(before.committed, Some(log_id(2, 20)));
    assert_eq!(before.purged, Some(log_id(1, 3)));
    assert_eq!(before.last, Some(log_id(2, 25)));
    let indexes: Vec<u64> = before.entries.iter().map(|e| e.log_id.index).collect();
    assert_eq!(indexes, (4..=25).collect::<Vec<_>>());
    drop(log);

    let mut reopened = RaftLog::open(dir.path(), small_limits()).unwrap();
    assert_eq!(state(&mut reopened).await, before);
    // And it goes on from there.
    append_range(&mut reopened, 2, 26, 26).await;
    drop(reopened);
    let mut again = RaftLog::open(dir.path(), small_limits()).unwrap();
    assert_eq!(
        again.get_log_state().await.unwrap().last_log_id,
        Some(log_id(2, 26))
    );
}

#[tokio::test]
async fn committed_alone_should_be_persisted_lazily_with_the_next_vote() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = RaftLog::open(dir.path(), small_limits()).unwrap();
    append_range(&mut log, 1, 1, 5).await;
    log.save_committed(Some(log_id(1, 4))).await.unwrap();
    assert_eq!(log.read_committed().await.unwrap(), Some(log_id(1, 4)));
    drop(log);
    let mut reopened = RaftLog::open(dir.path(), small_limits()).unwrap();
    assert_eq!(
        reopened.read_committed().await.unwrap(),
        None,
        "not written by itself"
    );
    reopened.save_committed(Some(log_id(1, 4))).await.unwrap();
    reopened.save_vote(&Vote::new(1, 2)).await.unwrap();
    drop(reopened);
    let mut again = RaftLog::open(dir.path(), small_limits()).unwrap();
    assert_eq!(again.read_committed().await.unwrap(), Some(log_id(1, 4)));
}

#[tokio::test]
async fn given_a_torn_tail_open_should_cut_it_and_keep_the_entries_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let limits = RaftLogLimits::default();
    let mut log = RaftLog::open(dir.path(), limits).unwrap();
    append_range(&mut log, 1, 1, 4).await;
    let kept = state(&mut log).await;
    let segment = segments(dir.path())[0].clone();
    let kept_len = std::fs::metadata(&segment).unwrap().len();
    append_range(&mut log, 1, 5, 5).await;
    let full_len = std::fs::metadata(&segment).unwrap().len();
    drop(log);

    // The crash came mid-payload, mid-header, and (last) left garbage after the last record.
    for (shape, torn_len) in [("mid-payload", full_len - 3), ("mid-header", kept_len + 6)] {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&segment)
            .unwrap();
        file.set_len(torn_len).unwrap();
        drop(file);
        let mut reopened = RaftLog::open(dir.path(), limits).unwrap();
        assert_eq!(state(&mut reopened).await, kept, "torn {shape}");
        assert_eq!(
            std::fs::metadata(&segment).unwrap().len(),
            kept_len,
            "the torn bytes are cut"
        );
        append_range(&mut reopened, 1, 5, 5).await;
        drop(reopened);
        let mut again = RaftLog::open(dir.path(), limits).unwrap();
        assert_eq!(
            again.get_log_state().await.unwrap().last_log_id,
            Some(log_id(1, 5))
        );
        assert_eq!(std::fs::metadata(&segment).unwrap().len(), full_len);
    }
    let mut bytes = std::fs::read(&segment).unwrap();
    bytes.extend_from_slice(&[0xAB; 37]);
    std::fs::write(&segment, &bytes).unwrap();
    let mut reopened = RaftLog::open(dir.path(), limits).unwrap();
    assert_eq!(
        reopened.get_log_state().await.unwrap().last_log_id,
        Some(log_id(1, 5))
    );
    assert_eq!(std::fs::metadata(&segment).unwrap().len(), full_len);
}

#[tokio::test]
async fn given_a_bad_record_before_valid_ones_open_should_refuse_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let limits = RaftLogLimits::default();
    let mut log = RaftLog::open(dir.path(), limits).unwrap();
    append_range(&mut log, 1, 1, 3).await;
    let segment = segments(dir.path())[0].clone();
    let second_at = std::fs::metadata(&segment).unwrap().len();
    append_range(&mut log, 1, 4, 8).await;
    drop(log);

    for flip in [second_at + 30, second_at + 2] {
        // A payload bit (bad checksum), then a length bit (the record's end is lost: open
        // searches on for a valid record of a following index).
        let original = std::fs::read(&segment).unwrap();
        let mut bytes = original.clone();
        bytes[flip as usize] ^= 0x10;
        std::fs::write(&segment, &bytes).unwrap();
        let error = open_error(dir.path(), limits);
        assert!(
            matches!(&error, RaftLogError::Corrupt { path, position, .. } if *path == segment && *position == second_at),
            "flip at {flip}: {error}"
        );
        assert_eq!(
            std::fs::read(&segment).unwrap(),
            bytes,
            "a refused log is left as it was"
        );
        std::fs::write(&segment, &original).unwrap();
    }
    assert!(RaftLog::open(dir.path(), limits).is_ok());
}

#[tokio::test]
async fn given_a_bad_record_in_a_sealed_segment_open_should_refuse_the_log() {
    let (dir, _) = thirty_single_appends().await;
    let files = segments(dir.path());
    assert!(files.len() >= 3, "{files:?}");
    // The very last byte of a sealed segment: the tail of a file, but not of the log.
    let sealed = &files[1];
    let mut bytes = std::fs::read(sealed).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(sealed, &bytes).unwrap();
    let error = open_error(dir.path(), small_limits());
    assert!(
        matches!(&error, RaftLogError::Corrupt { path, reason, .. } if path == sealed && reason.contains("not the last")),
        "{error}"
    );
}

#[tokio::test]
async fn given_a_missing_segment_open_should_refuse_the_gap() {
    let (dir, _) = thirty_single_appends().await;
    let files = segments(dir.path());
    std::fs::remove_file(&files[1]).unwrap();
    let error = open_error(dir.path(), small_limits());
    assert!(
        matches!(&error, RaftLogError::Corrupt { path, .. } if *path == files[2]),
        "{error}"
    );
}

#[tokio::test]
async fn given_a_term_going_down_open_should_refuse_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = RaftLog::open(dir.path(), RaftLogLimits::default()).unwrap();
    append_range(&mut log, 3, 1, 5).await;
    drop(log);
    // Another log's segment with entries 6.. of a lower term, put after it.
    let other = tempfile::tempdir().unwrap();
    let mut log = RaftLog::open(other.path(), RaftLogLimits::default()).unwrap();
    append_range(&mut log, 2, 6, 8).await;
    drop(log);
    let moved = segments(other.path())[0].clone();
    let target = dir.path().join(moved.file_name().unwrap());
    std::fs::copy(&moved, &target).unwrap();
    let error = open_error(dir.path(), RaftLogLimits::default());
    assert!(
        matches!(&error, RaftLogError::Corrupt { path, reason, .. } if *path == target && reason.contains("term")),
        "{error}"
    );
}

#[tokio::test]
async fn segments_should_roll_and_purge_should_delete_the_old_ones() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = RaftLog::open(dir.path(), small_limits()).unwrap();
    for index in 1..=40 {
        append_range(&mut log, 1, index, index).await;
    }
    let before = segments(dir.path());
    assert!(before.len() >= 4, "rolled into {} segments", before.len());
    for file in &before {
        assert!(std::fs::metadata(file).unwrap().len() <= 1024 + 200);
    }
    log.purge(log_id(1, 25)).await.unwrap();
    let after = segments(dir.path());
    assert!(after.len() < before.len(), "{after:?}");
    let first_kept: u64 = after[0]
        .file_stem()
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        first_kept <= 26,
        "the segment holding 26 is kept: {after:?}"
    );
    let entries = log.try_get_log_entries(..).await.unwrap();
    assert_eq!(entries.first().map(|e| e.log_id.index), Some(26));
    assert_eq!(entries.len(), 15);
    // Purging everything deletes every file; the log continues after the purge.
    log.purge(log_id(1, 40)).await.unwrap();
    assert!(segments(dir.path()).is_empty());
    append_range(&mut log, 1, 41, 41).await;
    drop(log);
    let mut reopened = RaftLog::open(dir.path(), small_limits()).unwrap();
    let state = state(&mut reopened).await;
    assert_eq!(state.purged, Some(log_id(1, 40)));
    assert_eq!(state.entries, vec![normal(1, 41, 100)]);
}

#[tokio::test]
async fn entries_evicted_from_the_cache_should_read_back_the_same_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let limits = RaftLogLimits {
        segment_bytes_max: 4096,
        cache_bytes_max: 1000,
        ..RaftLogLimits::default()
    };
    let mut log = RaftLog::open(dir.path(), limits).unwrap();
    let mut written = Vec::new();
    for index in 1..=60 {
        let entry = if index % 10 == 0 {
            membership(1, index)
        } else {
            normal(1, index, 50 + index as usize)
        };
        written.push(entry.clone());
        append(&mut log, vec![entry]).await.unwrap();
    }
    assert!(log.cached_bytes() <= 1000);
    assert!(log.cached_bytes() > 0);
    let mut reader = log.get_log_reader().await;
    assert_eq!(reader.try_get_log_entries(..).await.unwrap(), written);
    // Released, the tail reads from disk the same.
    log.release_cached_through(57);
    let tail_bytes = log.cached_bytes();
    assert!(tail_bytes > 0 && tail_bytes < 1000, "{tail_bytes}");
    log.release_cached_through(60);
    assert_eq!(log.cached_bytes(), 0);
    assert_eq!(reader.try_get_log_entries(..).await.unwrap(), written);
    assert_eq!(
        reader.try_get_log_entries(5..9).await.unwrap(),
        written[4..8].to_vec()
    );
    assert_eq!(
        reader.try_get_log_entries(55..=60).await.unwrap(),
        written[54..].to_vec()
    );
    drop(log);
    drop(reader);
    let mut reopened = RaftLog::open(dir.path(), limits).unwrap();
    assert_eq!(reopened.cached_bytes(), 0);
    assert_eq!(reopened.try_get_log_entries(..).await.unwrap(), written);
}

#[tokio::test]
async fn a_record_damaged_on_disk_after_it_was_written_should_fail_its_read() {
    let (dir, mut log) = thirty_single_appends().await;
    let sealed = segments(dir.path())[0].clone();
    let mut bytes = std::fs::read(&sealed).unwrap();
    bytes[40] ^= 0x08;
    std::fs::write(&sealed, &bytes).unwrap();
    // Entry 1 was evicted from the cache long ago: its read goes to disk and checks the CRC.
    let error = log.try_get_log_entries(1..2).await.unwrap_err();
    assert!(error.to_string().contains("corrupt"), "{error}");
    // The cached tail still reads.
    assert_eq!(
        log.try_get_log_entries(30..).await.unwrap(),
        vec![normal(1, 30, 100)]
    );
}

#[tokio::test]
async fn segments_left_by_an_interrupted_purge_should_be_skipped_and_deleted_at_open() {
    let (dir, mut log) = thirty_single_appends().await;
    let before: Vec<(PathBuf, Vec<u8>)> = segments(dir.path())
        .into_iter()
        .map(|path| {
            let bytes = std::fs::read(&path).unwrap();
            (path, bytes)
        })
        .collect();
    log.purge(log_id(1, 20)).await.unwrap();
    let kept = state(&mut log).await;
    let after = segments(dir.path());
    drop(log);
    // The crash came after meta was written and before the segments were deleted.
    for (path, bytes) in &before {
        std::fs::write(path, bytes).unwrap();
    }
    let mut reopened = RaftLog::open(dir.path(), small_limits()).unwrap();
    assert_eq!(state(&mut reopened).await, kept);
    assert_eq!(
        segments(dir.path()),
        after,
        "the purged segments are deleted"
    );
}

#[tokio::test]
async fn appends_after_a_truncation_into_a_sealed_segment_should_continue_there() {
    let (dir, mut log) = thirty_single_appends().await;
    let before = segments(dir.path()).len();
    log.truncate_after(Some(log_id(1, 12))).await.unwrap();
    assert!(segments(dir.path()).len() < before);
    append_range(&mut log, 2, 13, 20).await;
    let mut expected: Vec<Entry> = (1..=12).map(|i| normal(1, i, 100)).collect();
    expected.extend((13..=20).map(|i| normal(2, i, 100)));
    assert_eq!(log.try_get_log_entries(..).await.unwrap(), expected);
    drop(log);
    let mut reopened = RaftLog::open(dir.path(), small_limits()).unwrap();
    assert_eq!(reopened.try_get_log_entries(..).await.unwrap(), expected);
    // Truncating everything, then starting again.
    reopened.truncate_after(None).await.unwrap();
    assert!(segments(dir.path()).is_empty());
    append_range(&mut reopened, 3, 1, 2).await;
    drop(reopened);
    let mut again = RaftLog::open(dir.path(), small_limits()).unwrap();
    assert_eq!(
        again.try_get_log_entries(..).await.unwrap(),
        vec![normal(3, 1, 100), normal(3, 2, 100)]
    );
}

#[tokio::test]
async fn a_corrupt_meta_file_should_be_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = RaftLog::open(dir.path(), small_limits()).unwrap();
    log.save_vote(&Vote::new(4, 1)).await.unwrap();
    drop(log);
    let path = dir.path().join(META_FILE);
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 2;
    bytes[last] ^= 0x04;
    std::fs::write(&path, &bytes).unwrap();
    let error = open_error(dir.path(), small_limits());
    assert!(
        matches!(&error, RaftLogError::Corrupt { path: p, .. } if *p == path),
        "{error}"
    );
}

mod model {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        /// Append this many entries; bump the term first when set.
        Append(u8, bool, u16),
        /// Truncate after `last - n`.
        Truncate(u8),
        /// Purge up to `first + n`.
        Purge(u8),
        Vote(u8),
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            5 => (1u8..6, any::<bool>(), 1u16..300).prop_map(|(n, bump, bytes)| Op::Append(n, bump, bytes)),
            1 => (0u8..8).prop_map(Op::Truncate),
            1 => (0u8..8).prop_map(Op::Purge),
            1 => (1u8..10).prop_map(Op::Vote),
            1 => Just(Op::Reopen),
        ]
    }

    async fn run(ops: Vec<Op>) {
        let dir = tempfile::tempdir().expect("a model step");
        let limits = RaftLogLimits {
            segment_bytes_max: 700,
            cache_bytes_max: 400,
            ..RaftLogLimits::default()
        };
        let mut log = RaftLog::open(dir.path(), limits).expect("a model step");
        // The model: live entries, purged id, vote.
        let mut entries: Vec<Entry> = Vec::new();
        let mut purged: Option<LogId> = None;
        let mut vote: Option<Vote> = None;
        let mut term = 1u64;
        for op in ops {
            let next = entries
                .last()
                .map(|e| e.log_id.index + 1)
                .or(purged.map(|p| p.index + 1))
                .unwrap_or(1);
            match op {
                Op::Append(n, bump, bytes) => {
                    if bump {
                        term += 1;
                    }
                    let new: Vec<Entry> = (next..next + u64::from(n))
                        .map(|index| normal(term, index, usize::from(bytes)))
                        .collect();
                    append(&mut log, new.clone()).await.expect("a model step");
                    entries.extend(new);
                }
                Op::Truncate(n) => {
                    let keep = entries.len().saturating_sub(usize::from(n));
                    let last = if keep == 0 {
                        purged
                    } else {
                        Some(entries[keep - 1].log_id)
                    };
                    log.truncate_after(last).await.expect("a model step");
                    entries.truncate(keep);
                }
                Op::Purge(n) => {
                    let upto = usize::from(n).min(entries.len());
                    if upto == 0 {
                        continue;
                    }
                    let id = entries[upto - 1].log_id;
                    log.purge(id).await.expect("a model step");
                    entries.drain(..upto);
                    purged = Some(id);
                }
                Op::Vote(t) => {
                    let v = Vote::new(u64::from(t) + term, 1);
                    log.save_vote(&v).await.expect("a model step");
                    vote = Some(v);
                }
                Op::Reopen => {
                    drop(log);
                    log = RaftLog::open(dir.path(), limits).expect("a model step");
                }
            }
            let got = state(&mut log).await;
            assert_eq!(got.entries, entries);
            assert_eq!(got.purged, purged);
            assert_eq!(got.vote, vote);
            assert_eq!(got.last, entries.last().map(|e| e.log_id).or(purged));
        }
        drop(log);
        let mut reopened = RaftLog::open(dir.path(), limits).expect("a model step");
        assert_eq!(
            reopened
                .try_get_log_entries(..)
                .await
                .expect("a model step"),
            entries
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
        #[test]
        fn random_operations_should_match_the_model(ops in proptest::collection::vec(op(), 1..40)) {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(run(ops));
        }
    }
}

/// Not a performance assertion: prints the time to append and fsync 10,000 entries of 1 KiB in
/// batches of 100, for comparison with the partition log's fsync path.
/// `cargo test -p syncline-broker --test partition_raft_storage -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_append_and_fsync_of_10000_entries_of_1_kib() {
    let dir =
        tempfile::tempdir_in(std::env::var("RAFT_LOG_BENCH_DIR").unwrap_or_else(|_| ".".into()))
            .unwrap();
    let mut log = RaftLog::open(dir.path(), RaftLogLimits::default()).unwrap();
    // The entries are made before the clock starts (the test build is unoptimised).
    let batches: Vec<Vec<Entry>> = (0..100u64)
        .map(|batch| {
            (0..100)
                .map(|i| normal(1, 1 + batch * 100 + i, 1024))
                .collect()
        })
        .collect();
    let started = std::time::Instant::now();
    for entries in batches.clone() {
        append(&mut log, entries).await.unwrap();
    }
    let elapsed = started.elapsed();
    eprintln!(
        "raft log: 10,000 x 1 KiB in 100 batches of 100, each waited for its fsync: {elapsed:?} \
         ({:.0} entries/s, {:.2} ms per batch)",
        10_000.0 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1000.0 / 100.0
    );
    // Pipelined: all batches appended without waiting, then every callback.
    let counter = syncline_broker::log::file::FaultInjector::new();
    let mut log = RaftLog::open_with(
        &dir.path().join("pipelined"),
        RaftLogLimits::default(),
        Arc::new(counter.clone()),
    )
    .unwrap();
    let started = std::time::Instant::now();
    let mut waits = Vec::new();
    let mut in_append = std::time::Duration::ZERO;
    for entries in batches {
        let (tx, rx) = PartitionRaft::oneshot();
        let call = std::time::Instant::now();
        log.append(entries, IOFlushed::signal(tx)).await.unwrap();
        in_append += call.elapsed();
        waits.push(rx);
    }
    let appended = started.elapsed();
    for rx in waits {
        rx.await.unwrap().unwrap();
    }
    let elapsed = started.elapsed();
    eprintln!(
        "raft log: the same, pipelined (group commit): {elapsed:?} ({:.0} entries/s, {} fsyncs; \
         all appended after {appended:?}, {in_append:?} of it inside append)",
        10_000.0 / elapsed.as_secs_f64(),
        counter.calls(syncline_broker::log::file::FaultKind::Sync)
    );
    // The floor: 100 plain writes of 100 KiB, each followed by fdatasync, on the same disk.
    let path = dir.path().join("baseline");
    let file = std::fs::File::create(&path).unwrap();
    let chunk = vec![7u8; 100 * 1024];
    let started = std::time::Instant::now();
    for _ in 0..100 {
        std::io::Write::write_all(&mut &file, &chunk).unwrap();
        file.sync_data().unwrap();
    }
    let elapsed = started.elapsed();
    eprintln!(
        "baseline: 100 x (write 100 KiB + fdatasync): {elapsed:?} ({:.2} ms each)",
        elapsed.as_secs_f64() * 1000.0 / 100.0
    );
}

/// The entry at `index` that the crash test writes: its size varies with the index.
fn crash_entry(index: u64) -> Entry {
    normal(1, index, (index as usize * 7919) % 3000 + 10)
}

const CRASH_DIR_ENV: &str = "RAFT_LOG_CRASH_DIR";

fn crash_limits() -> RaftLogLimits {
    RaftLogLimits {
        segment_bytes_max: 64 * 1024,
        cache_bytes_max: 16 * 1024,
        ..RaftLogLimits::default()
    }
}

/// The child of the crash test (does nothing unless the parent set its directory): appends
/// batches forever, printing each acknowledged last index, and purges now and then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn crash_child_appends_until_killed() {
    let Ok(dir) = std::env::var(CRASH_DIR_ENV) else {
        return;
    };
    let mut log = RaftLog::open(Path::new(&dir), crash_limits()).unwrap();
    let mut next = log
        .get_log_state()
        .await
        .unwrap()
        .last_log_id
        .map_or(1, |id| id.index + 1);
    let mut round = 0u64;
    loop {
        round += 1;
        let count = round % 17 + 1;
        let entries: Vec<Entry> = (next..next + count).map(crash_entry).collect();
        append(&mut log, entries).await.unwrap();
        next += count;
        println!("acked {}", next - 1);
        if round.is_multiple_of(25) && next > 200 {
            log.purge(log_id(1, next - 150)).await.unwrap();
        }
    }
}

/// The child process, killed if the test fails before it does.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Kills a process appending to the log (SIGKILL, at a different point each round) and checks
/// that everything it acknowledged is there after a reopen, byte for byte, and that the log
/// goes on from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_a_killed_appender_every_acknowledged_entry_should_survive() {
    use std::io::BufRead as _;
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut last_acked = 0u64;
    for round in 0..4u64 {
        let mut child = std::process::Command::new(&exe)
            .args([
                "--exact",
                "crash_child_appends_until_killed",
                "--ignored",
                "--nocapture",
            ])
            .env(CRASH_DIR_ENV, dir.path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut child = KillOnDrop(child);
        let mut lines = std::io::BufReader::new(stdout).lines();
        // Kill after a different number of acknowledgements each round.
        let kill_after = 40 + round * 37;
        let mut seen = 0;
        while seen < kill_after {
            let line = lines.next().expect("the child stopped early").unwrap();
            if let Some(index) = line.strip_prefix("acked ") {
                last_acked = index.parse().unwrap();
                seen += 1;
            }
        }
        child.0.kill().unwrap();
        child.0.wait().unwrap();
        // What the child printed after the kill point may still be in the pipe.
        for line in lines.map_while(Result::ok) {
            if let Some(index) = line.strip_prefix("acked ") {
                last_acked = index.parse().unwrap();
            }
        }

        let mut log = RaftLog::open(dir.path(), crash_limits()).unwrap();
        let state = state(&mut log).await;
        let last = state.last.expect("entries").index;
        assert!(
            last >= last_acked,
            "round {round}: acknowledged {last_acked}, log ends at {last}"
        );
        let first = state.purged.map_or(1, |p| p.index + 1);
        let expected: Vec<Entry> = (first..=last).map(crash_entry).collect();
        assert_eq!(state.entries, expected, "round {round}");
    }
    // The runs went through rolls and purges.
    let mut log = RaftLog::open(dir.path(), crash_limits()).unwrap();
    assert!(log
        .get_log_state()
        .await
        .unwrap()
        .last_purged_log_id
        .is_some());
    assert!(segments(dir.path()).len() > 1);
}

/// The golden fixture's directory: a log written by format version 1 that every later version
/// must still open and read identically. Regenerate only on a deliberate format change:
/// `SYNCLINE_REGENERATE_FIXTURES=1 cargo test -p syncline-broker --test partition_raft_storage golden`.
fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/raft-log-v1")
}

/// 512-byte segments, so the fixture spans several files.
fn golden_limits() -> RaftLogLimits {
    RaftLogLimits {
        segment_bytes_max: 512,
        ..RaftLogLimits::default()
    }
}

/// Entries 1..=12 of the fixture: proposals with conditions, a membership change at 2, and the
/// blank entry a new leader writes at 8 (term 2 starts there).
fn golden_entries() -> Vec<Entry> {
    (1..=12u64)
        .map(|index| {
            let term = if index < 8 { 1 } else { 2 };
            match index {
                2 => membership(term, index),
                8 => Entry {
                    log_id: log_id(term, index),
                    payload: EntryPayload::Blank,
                },
                _ => Entry {
                    log_id: log_id(term, index),
                    payload: EntryPayload::Normal(Proposal {
                        now_ms: 1_700_000_000_000 + index as i64,
                        conditions: vec![syncline_broker::replication::types::ProposedCondition {
                            key: Bytes::from(format!("key-{index}")),
                            expected: (index % 2 == 0).then_some(index),
                        }],
                        batch: Bytes::from(vec![index as u8; 60]),
                    }),
                },
            }
        })
        .collect()
}

#[tokio::test]
async fn the_golden_v1_log_should_open_and_read_the_same() {
    let golden = golden_dir();
    if std::env::var("SYNCLINE_REGENERATE_FIXTURES").is_ok() {
        let _ = std::fs::remove_dir_all(&golden);
        let mut log = RaftLog::open(&golden, golden_limits()).unwrap();
        log.save_vote(&Vote::new_committed(2, 1)).await.unwrap();
        for chunk in golden_entries().chunks(4) {
            append(&mut log, chunk.to_vec()).await.unwrap();
        }
        log.save_committed(Some(log_id(2, 10))).await.unwrap();
        log.purge(log_id(1, 1)).await.unwrap();
    }
    // Opened from a copy: open may write (cuts, deletes), the fixture must stay as checked in.
    let copy = tempfile::tempdir().unwrap();
    for item in std::fs::read_dir(&golden).expect("the fixture is checked in") {
        let path = item.unwrap().path();
        std::fs::copy(&path, copy.path().join(path.file_name().unwrap())).unwrap();
    }
    let mut log = RaftLog::open(copy.path(), golden_limits()).unwrap();
    let state = state(&mut log).await;
    assert_eq!(state.vote, Some(Vote::new_committed(2, 1)));
    assert_eq!(state.committed, Some(log_id(2, 10)));
    // Entry 1 is purged but still in the first segment: skipped.
    assert_eq!(state.purged, Some(log_id(1, 1)));
    assert_eq!(state.entries, golden_entries()[1..].to_vec());
    assert!(
        segments(copy.path()).len() >= 2,
        "the fixture spans segments"
    );
}
