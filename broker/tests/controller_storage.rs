//! The controller's Raft storage (issue 14): openraft's own conformance suite over
//! [`LogStore`] and [`StateMachine`], and what `raft.log` keeps over a reopen: every change
//! (vote, entries, committed, truncation, purge) comes back as it was; a torn last record (a
//! crash mid-append) is cut at open with the state before it kept; a damaged record in the
//! middle of the file is refused as corrupt instead of silently dropping what follows it.

use std::path::Path;

use openraft::storage::{IOFlushed, RaftLogStorage};
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::testing::{blank_ent, log_id};
use openraft::{RaftLogReader, StorageError};
use syncline_broker::cluster::log_store::{LogStore, LOG_FILE};
use syncline_broker::cluster::raft::{Entry, LogId, StateMachine, TypeConfig, Vote};

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<TypeConfig>> {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let log = LogStore::open(dir.path()).expect("a new log opens");
        let state_machine = StateMachine::open(dir.path()).expect("a new state machine opens");
        Ok((dir, log, state_machine))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_storage_should_pass_openrafts_conformance_suite() {
    Suite::test_all(Builder).await.unwrap();
}

/// Everything the log reports: vote, committed, last purged, last, and every entry.
#[derive(Debug, PartialEq)]
struct State {
    vote: Option<Vote>,
    committed: Option<LogId>,
    purged: Option<LogId>,
    last: Option<LogId>,
    entries: Vec<Entry>,
}

async fn state(store: &mut LogStore) -> State {
    let log_state = store.get_log_state().await.expect("log state");
    State {
        vote: store.read_vote().await.expect("vote"),
        committed: store.read_committed().await.expect("committed"),
        purged: log_state.last_purged_log_id,
        last: log_state.last_log_id,
        entries: store.try_get_log_entries(..).await.expect("entries"),
    }
}

fn id(index: u64) -> LogId {
    log_id::<TypeConfig>(1, 1, index)
}

/// Appends blank entries `from..=to` of term 1.
async fn append(store: &mut LogStore, from: u64, to: u64) {
    let entries: Vec<Entry> = (from..=to)
        .map(|index| blank_ent::<TypeConfig>(1, 1, index))
        .collect();
    store
        .append(entries, IOFlushed::noop())
        .await
        .expect("append");
}

fn log_len(dir: &Path) -> u64 {
    std::fs::metadata(dir.join(LOG_FILE))
        .expect("the log file")
        .len()
}

#[tokio::test]
async fn every_change_should_be_there_after_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = LogStore::open(dir.path()).unwrap();
    store.save_vote(&Vote::new(1, 1)).await.unwrap();
    append(&mut store, 1, 10).await;
    store.save_committed(Some(id(5))).await.unwrap();
    store.truncate_after(Some(id(8))).await.unwrap();
    store.purge(id(3)).await.unwrap();
    store.save_vote(&Vote::new_committed(2, 3)).await.unwrap();
    let before = state(&mut store).await;
    assert_eq!(before.vote, Some(Vote::new_committed(2, 3)));
    assert_eq!(before.committed, Some(id(5)));
    assert_eq!(before.purged, Some(id(3)));
    assert_eq!(before.last, Some(id(8)));
    let indexes: Vec<u64> = before.entries.iter().map(|e| e.log_id.index).collect();
    assert_eq!(indexes, vec![4, 5, 6, 7, 8]);
    drop(store);

    let mut reopened = LogStore::open(dir.path()).unwrap();
    assert_eq!(state(&mut reopened).await, before);
    // And it goes on from there.
    append(&mut reopened, 9, 9).await;
    drop(reopened);
    let mut again = LogStore::open(dir.path()).unwrap();
    assert_eq!(
        again.get_log_state().await.unwrap().last_log_id,
        Some(id(9))
    );
}

#[tokio::test]
async fn given_a_torn_last_record_open_should_cut_it_and_keep_the_state_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = LogStore::open(dir.path()).unwrap();
    store.save_vote(&Vote::new(1, 1)).await.unwrap();
    append(&mut store, 1, 4).await;
    store.save_committed(Some(id(2))).await.unwrap();
    let kept = state(&mut store).await;
    let kept_len = log_len(dir.path());
    append(&mut store, 5, 6).await;
    let full_len = log_len(dir.path());
    drop(store);

    // The crash came mid-payload, then (second round) mid-header of the last record.
    for torn_len in [full_len - 3, kept_len + 4] {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join(LOG_FILE))
            .unwrap();
        file.set_len(torn_len).unwrap();
        drop(file);
        let mut reopened = LogStore::open(dir.path()).unwrap();
        assert_eq!(state(&mut reopened).await, kept, "torn at {torn_len}");
        assert_eq!(log_len(dir.path()), kept_len, "the torn bytes are cut");
        // What comes next is appended after the cut, and read back.
        append(&mut reopened, 5, 6).await;
        drop(reopened);
        let mut again = LogStore::open(dir.path()).unwrap();
        assert_eq!(
            again.get_log_state().await.unwrap().last_log_id,
            Some(id(6))
        );
        assert_eq!(log_len(dir.path()), full_len);
    }
}

#[tokio::test]
async fn given_a_corrupt_record_in_the_middle_open_should_refuse_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = LogStore::open(dir.path()).unwrap();
    store.save_vote(&Vote::new(1, 1)).await.unwrap();
    let entries_at = log_len(dir.path());
    append(&mut store, 1, 4).await;
    store.save_committed(Some(id(2))).await.unwrap();
    append(&mut store, 5, 8).await;
    store.save_committed(Some(id(6))).await.unwrap();
    drop(store);

    // One bit flipped inside the first entries record's payload (after its 8-byte header):
    // three good records follow it, so this is no torn tail.
    let path = dir.path().join(LOG_FILE);
    let mut bytes = std::fs::read(&path).unwrap();
    let at = entries_at as usize + 8 + 4;
    bytes[at] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();

    let error = match LogStore::open(dir.path()) {
        Ok(_) => panic!("a log with a corrupt record in its middle opened"),
        Err(error) => error.to_string(),
    };
    assert!(error.contains("corrupt"), "{error}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        bytes,
        "a refused log is left as it was"
    );
}
