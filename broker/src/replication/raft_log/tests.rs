//! Tests of the partition groups' Raft log: recovery, faults, caching, replication reads.
use super::*;
use crate::log::file::{FaultInjector, FaultKind};
use crate::replication::types::ProposedCondition;
use openraft::type_config::TypeConfigExt as _;
use proptest::prelude::*;
use std::future::Future;
use std::sync::{Condvar, Mutex as StdMutex};

fn normal(term: u64, index: u64, bytes: usize) -> Entry {
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Normal(Proposal {
            now_ms: 7,
            conditions: vec![ProposedCondition {
                key: Bytes::from_static(b"k"),
                expected: Some(index),
            }],
            batch: Bytes::from(vec![index as u8; bytes]),
        }),
    }
}

type Completion = openraft::type_config::alias::OneshotReceiverOf<PartitionRaft, io::Result<()>>;

/// Appends `entries`; returns the receiver of its completion.
async fn append(log: &mut RaftLog, entries: Vec<Entry>) -> io::Result<Completion> {
    let (tx, rx) = PartitionRaft::oneshot();
    log.append(entries, IOFlushed::signal(tx)).await?;
    Ok(rx)
}

/// Appends `entries` and waits for their fsync.
async fn append_durably(log: &mut RaftLog, entries: Vec<Entry>) {
    let completion = append(log, entries).await.expect("append");
    completion
        .await
        .expect("a completion")
        .expect("a durable append");
}

/// A new log on files that fail what the injector says.
fn faulty_log() -> (tempfile::TempDir, FaultInjector, RaftLog) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let faults = FaultInjector::new();
    let log = RaftLog::open_with(
        dir.path(),
        RaftLogLimits::default(),
        Arc::new(faults.clone()),
    )
    .expect("a new log opens");
    (dir, faults, log)
}

/// Replication reads a bounded run of entries however far behind a follower is: at most
/// `REPLICATION_READ_BYTES_MAX` of records, one entry at least (an entry larger than the
/// bound goes alone).
#[tokio::test]
async fn replication_reads_should_stop_at_the_byte_bound_but_return_one_entry_at_least() {
    let (_dir, _faults, mut log) = faulty_log();
    let mb = 1024 * 1024;
    let entries: Vec<Entry> = (1..=10).map(|i| normal(1, i, mb)).collect();
    append_durably(&mut log, entries).await;
    let read = log.limited_get_log_entries(1, 11).await.expect("read");
    let bound = (REPLICATION_READ_BYTES_MAX / mb as u64) as usize;
    assert!(
        (1..=bound).contains(&read.len()),
        "{} entries of 1 MiB read",
        read.len()
    );
    assert_eq!(read.first().map(|e| e.log_id.index), Some(1));
    // A near-complete range still returns what there is.
    let tail = log.limited_get_log_entries(10, 11).await.expect("read");
    assert_eq!(tail.len(), 1);
    let big = normal(1, 11, REPLICATION_READ_BYTES_MAX as usize + 10);
    append_durably(&mut log, vec![big]).await;
    let alone = log.limited_get_log_entries(11, 12).await.expect("read");
    assert_eq!(alone.len(), 1, "an entry above the bound is read alone");
}

/// Whether `future` is ready at its first poll.
fn ready_now<F: Future>(future: F) -> Option<F::Output> {
    let waker = std::task::Waker::noop();
    let mut context = std::task::Context::from_waker(waker);
    let mut future = std::pin::pin!(future);
    match future.as_mut().poll(&mut context) {
        std::task::Poll::Ready(output) => Some(output),
        std::task::Poll::Pending => None,
    }
}

/// Files whose fsync waits until the gate opens, counting fsyncs.
#[derive(Debug, Default)]
struct Gate {
    state: StdMutex<(bool, u64)>,
    changed: Condvar,
}

impl Gate {
    fn open(&self) {
        self.state.lock().unwrap().0 = true;
        self.changed.notify_all();
    }
    fn syncs(&self) -> u64 {
        self.state.lock().unwrap().1
    }
    fn wait_for_syncs(&self, n: u64) {
        let mut state = self.state.lock().unwrap();
        while state.1 < n {
            state = self.changed.wait(state).unwrap();
        }
    }
}

#[derive(Debug)]
struct GatedOpener(Arc<Gate>);

#[derive(Debug)]
struct GatedFile {
    inner: Arc<dyn SegmentFile>,
    gate: Arc<Gate>,
}

impl FileOpener for GatedOpener {
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn SegmentFile>> {
        Ok(Arc::new(GatedFile {
            inner: OsOpener.open(path, create)?,
            gate: Arc::clone(&self.0),
        }))
    }
}

impl SegmentFile for GatedFile {
    fn write_all_at(&self, head: &[u8], body: &[u8], position: u64) -> io::Result<()> {
        self.inner.write_all_at(head, body, position)
    }
    fn sync_data(&self) -> io::Result<()> {
        let mut state = self.gate.state.lock().unwrap();
        state.1 += 1;
        self.gate.changed.notify_all();
        while !state.0 {
            state = self.gate.changed.wait(state).unwrap();
        }
        drop(state);
        self.inner.sync_data()
    }
    fn allocate(&self, position: u64, len: u64) -> io::Result<()> {
        self.inner.allocate(position, len)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn file(&self) -> &File {
        self.inner.file()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_appends_during_a_running_fsync_they_should_share_the_next_one_and_complete_in_order()
{
    let dir = tempfile::tempdir().unwrap();
    let gate = Arc::new(Gate::default());
    let mut log = RaftLog::open_with(
        dir.path(),
        RaftLogLimits::default(),
        Arc::new(GatedOpener(Arc::clone(&gate))),
    )
    .unwrap();
    let mut completions = vec![append(&mut log, vec![normal(1, 1, 10)]).await.unwrap()];
    gate.wait_for_syncs(1);
    for index in 2..=20 {
        completions.push(append(&mut log, vec![normal(1, index, 10)]).await.unwrap());
    }
    // Appended entries are readable before they are durable.
    assert_eq!(log.try_get_log_entries(..).await.unwrap().len(), 20);
    // A vote waits for the appends before it.
    let mut voter = log.clone();
    let vote = Vote::new(2, 1);
    let mut save_vote = Box::pin(async move { voter.save_vote(&vote).await });
    assert!(
        ready_now(&mut save_vote).is_none(),
        "a vote overtook an append"
    );
    for completion in &mut completions {
        assert!(
            ready_now(completion).is_none(),
            "acknowledged before its fsync"
        );
    }
    gate.open();
    // The last completes; then every earlier one already has.
    let last = completions.pop().unwrap();
    last.await.unwrap().unwrap();
    for completion in completions {
        assert!(matches!(ready_now(completion), Some(Ok(Ok(())))));
    }
    save_vote.await.unwrap();
    assert_eq!(
        gate.syncs(),
        2,
        "19 appends queued behind one fsync share the next"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_a_failed_fsync_the_callback_should_get_the_error_and_the_log_be_poisoned() {
    let (dir, faults, mut log) = faulty_log();
    append_durably(&mut log, vec![normal(1, 1, 10)]).await;
    faults.fail(FaultKind::Sync, 1, libc::EIO);
    let completion = append(&mut log, vec![normal(1, 2, 10)]).await.unwrap();
    assert!(
        completion.await.unwrap().is_err(),
        "a failed fsync was acknowledged"
    );
    // Every later write fails, and says why.
    let error = append(&mut log, vec![normal(1, 3, 10)])
        .await
        .err()
        .unwrap();
    assert!(error.to_string().contains("poisoned"), "{error}");
    let error = log.save_vote(&Vote::new(1, 1)).await.unwrap_err();
    assert!(error.to_string().contains("poisoned"), "{error}");
    assert!(log.purge(log_id(1, 1)).await.is_err());
    drop(log);
    // Reopened, the log works again.
    let mut log = RaftLog::open(dir.path(), RaftLogLimits::default()).unwrap();
    let last = log.get_log_state().await.unwrap().last_log_id.unwrap();
    append_durably(&mut log, vec![normal(1, last.index + 1, 10)]).await;
}

#[tokio::test]
async fn given_a_failed_write_the_append_should_fail_and_poison_the_log() {
    let (_dir, faults, mut log) = faulty_log();
    faults.fail(FaultKind::Write, 1, libc::ENOSPC);
    let (tx, rx) = PartitionRaft::oneshot();
    assert!(log
        .append(vec![normal(1, 1, 10)], IOFlushed::signal(tx))
        .await
        .is_err());
    assert!(rx.await.unwrap().is_err());
    let error = append(&mut log, vec![normal(1, 1, 10)])
        .await
        .err()
        .unwrap();
    assert!(error.to_string().contains("poisoned"), "{error}");
}

#[tokio::test]
async fn an_entry_over_the_record_limit_should_be_refused_without_poisoning() {
    let dir = tempfile::tempdir().unwrap();
    let limits = RaftLogLimits {
        record_bytes_max: 100,
        ..RaftLogLimits::default()
    };
    let mut log = RaftLog::open(dir.path(), limits).unwrap();
    let error = append(&mut log, vec![normal(1, 1, 200)])
        .await
        .err()
        .unwrap();
    assert!(error.to_string().contains("at most 100"), "{error}");
    append_durably(&mut log, vec![normal(1, 1, 10)]).await;
    let error = append(&mut log, vec![normal(1, 5, 10)])
        .await
        .err()
        .unwrap();
    assert!(error.to_string().contains("continues at 2"), "{error}");
}

#[test]
fn limits_out_of_bounds_should_be_refused_naming_the_field() {
    let error = RaftLogLimits {
        segment_bytes_max: 2 << 30,
        ..RaftLogLimits::default()
    }
    .validate()
    .unwrap_err();
    assert!(error.to_string().contains("segment_bytes_max"), "{error}");
    assert!(RaftLogLimits::default().validate().is_ok());
}

#[test]
fn segment_names_should_round_trip_and_nothing_else_parse() {
    assert_eq!(segment_name(42), "00000000000000000042.rlog");
    assert_eq!(parse_segment_name(&segment_name(u64::MAX)), Some(u64::MAX));
    for other in ["meta", "meta.tmp", "42.rlog", "0000000000000000004a.rlog"] {
        assert_eq!(parse_segment_name(other), None, "{other}");
    }
}

fn entry_strategy() -> impl Strategy<Value = Entry> {
    let nodes: std::collections::BTreeSet<u64> = [1, 2, 3].into_iter().collect();
    (
        0u64..1000,
        0u64..1000,
        0u8..3,
        proptest::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(move |(term, index, kind, batch)| Entry {
            log_id: log_id(term, index),
            payload: match kind {
                0 => EntryPayload::Blank,
                1 => EntryPayload::Normal(Proposal {
                    now_ms: -3,
                    conditions: Vec::new(),
                    batch: batch.into(),
                }),
                _ => {
                    EntryPayload::Membership(Membership::new_with_defaults(vec![nodes.clone()], []))
                }
            },
        })
}

proptest! {
    #[test]
    fn given_any_entry_when_encoded_then_the_record_checks_and_decodes_to_it(entry in entry_strategy()) {
        let mut out = Vec::new();
        let len = encode_record(&entry, &mut out, 1 << 20).unwrap();
        prop_assert_eq!(len as usize, out.len());
        let (header, total) = check_record(&out, 1 << 20).unwrap();
        prop_assert_eq!(total, out.len());
        let bytes = Bytes::from(out);
        let decoded = decode_entry(header, bytes.slice(RECORD_HEADER_BYTES..)).unwrap();
        prop_assert_eq!(decoded, entry);
    }

    #[test]
    fn given_any_bytes_when_checked_then_no_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = check_record(&bytes, 1 << 20);
        let _ = find_valid_record(&bytes, 0, 1 << 20);
    }

    #[test]
    fn given_one_flipped_bit_when_checked_then_the_record_is_refused(
        entry in entry_strategy(),
        bit in any::<prop::sample::Index>(),
    ) {
        let mut out = Vec::new();
        encode_record(&entry, &mut out, 1 << 20).unwrap();
        let bit = bit.index(out.len() * 8);
        out[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(check_record(&out, 1 << 20).is_err());
    }
}
