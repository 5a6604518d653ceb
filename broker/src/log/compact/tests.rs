//! Unit tests of `compact`.
//! Compaction against a model: the full history of appended records.
use std::collections::HashMap;

use std::path::Path;

use proptest::prelude::*;
use syncline_proto::batch::Record;

use super::*;
use crate::log::tests::small_config;
use crate::log::LogConfig;

/// A filter that knows every key's latest offset (what the partition's key index holds).
#[derive(Default)]
struct ModelFilter {
    latest: HashMap<Bytes, u64>,
    whole: HashSet<u64>,
    removed: Mutex<Vec<(Bytes, u64)>>,
}

impl CompactionFilter for ModelFilter {
    fn decide(&self, batch: &Batch, expired: bool, out: &mut Vec<Verdict>) -> Result<(), String> {
        for record in batch.records() {
            let record = record.map_err(|e| e.to_string())?;
            let key = record.key.clone().ok_or("no key")?;
            let latest = self.latest.get(&key).copied().ok_or("unknown key")?;
            out.push(if latest > record.offset {
                Verdict::Superseded
            } else if record.value.is_none() && expired {
                Verdict::ExpiredTombstone
            } else {
                Verdict::Keep
            });
        }
        Ok(())
    }
    fn keep_whole(&self, header: &BatchHeader) -> bool {
        self.whole.contains(&header.base_offset)
    }
    fn limit(&self) -> u64 {
        u64::MAX
    }
    fn tombstones_removed(&self, removed: &[(Bytes, u64)]) {
        self.removed.lock().extend_from_slice(removed);
    }
}

fn config() -> LogConfig {
    small_config()
}

/// Every record visible in the log, in order, checking the contiguity of batches.
fn records(log: &Log) -> Vec<Record> {
    let mut out = Vec::new();
    let mut next = log.start_offset();
    let end = log.durable_offset();
    while next < end {
        let read = log.read(next, 1 << 20).unwrap();
        assert_eq!(read.first_offset, next, "batches must be contiguous");
        for batch in Batches::new(read.bytes.clone()) {
            let batch = batch.unwrap();
            assert_eq!(
                batch.header().base_offset,
                next,
                "batches must be contiguous"
            );
            batch::verify(batch.as_bytes()).unwrap();
            next = batch.header().next_offset();
            for record in batch.records() {
                out.push(record.unwrap());
            }
        }
        assert_eq!(read.next_offset, next);
    }
    out
}

struct History {
    /// Every record appended: offset -> (key, value).
    all: HashMap<u64, (Bytes, Option<Bytes>)>,
    filter: ModelFilter,
}

impl History {
    fn new() -> Self {
        Self {
            all: HashMap::new(),
            filter: ModelFilter::default(),
        }
    }

    fn append(&mut self, log: &Log, writes: &[(String, Option<String>)]) -> u64 {
        let mut builder = BatchBuilder::new();
        for (key, value) in writes {
            builder.push(
                1,
                Some(key.as_bytes()),
                value.as_ref().map(|v| v.as_bytes()),
                &[],
            );
        }
        let appended = log.append(&builder.finish().unwrap()).unwrap();
        for (i, (key, value)) in writes.iter().enumerate() {
            let offset = appended.base_offset + i as u64;
            let key = Bytes::from(key.clone());
            self.all
                .insert(offset, (key.clone(), value.clone().map(Bytes::from)));
            self.filter.latest.insert(key, offset);
        }
        appended.base_offset
    }

    /// Checks the log against the history: every surviving record is the one appended at
    /// its offset, and every key's latest record survives unless it is a dropped delete.
    fn check(&self, log: &Log, tombstones_may_go: bool) {
        let survivors = records(log);
        let mut seen = HashSet::new();
        for record in &survivors {
            let (key, value) = self.all.get(&record.offset).expect("offset was appended");
            assert_eq!(record.key.as_ref(), Some(key), "key at {}", record.offset);
            assert_eq!(&record.value, value, "value at {}", record.offset);
            seen.insert(record.offset);
        }
        let removed: HashSet<u64> = self
            .filter
            .removed
            .lock()
            .iter()
            .map(|(_, offset)| *offset)
            .collect();
        // A dropped delete leaves no older value of its key behind (a restart that rebuilds
        // the key index from the log would bring it back).
        for (key, offset) in self.filter.removed.lock().iter() {
            assert!(
                !survivors
                    .iter()
                    .any(|r| r.key.as_ref() == Some(key) && r.offset < *offset),
                "an older value of {key:?} survives its dropped delete at {offset}"
            );
        }
        for (key, latest) in &self.filter.latest {
            let tombstone = self.all[latest].1.is_none();
            if seen.contains(latest) {
                assert!(
                    !removed.contains(latest),
                    "a removed tombstone is still there"
                );
                continue;
            }
            assert!(
                tombstone && tombstones_may_go && removed.contains(latest),
                "latest record of {key:?} at {latest} is missing"
            );
        }
    }
}

fn writes(n: usize, keys: usize, round: usize) -> Vec<(String, Option<String>)> {
    (0..n)
        .map(|i| {
            (
                format!("key-{}", (i * 7 + round) % keys),
                Some(format!("value-{round}-{i}-{}", "x".repeat(400))),
            )
        })
        .collect()
}

#[test]
fn given_many_versions_when_compacted_should_keep_latest_of_each_key_at_its_offset() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), config()).unwrap();
    let mut history = History::new();
    for round in 0..60 {
        history.append(&log, &writes(20, 50, round));
    }
    log.sync().unwrap();
    let before = log.info();
    let outcome = log
        .compact(
            &history.filter,
            &CompactOptions {
                roll: true,
                delete_retention_ms: u64::MAX,
                ..Default::default()
            },
        )
        .unwrap();
    let after = log.info();
    assert!(outcome.records_removed > 1000, "{outcome:?}");
    assert!(
        after.size_bytes * 4 < before.size_bytes,
        "{before:?} -> {after:?}"
    );
    assert_eq!(after.end_offset, before.end_offset);
    assert_eq!(after.start_offset, before.start_offset);
    history.check(&log, false);
    assert!(
        records(&log).len() < 50 + outcome.segments_after,
        "only the latest values and one placeholder per segment remain"
    );
    let info = log.compaction_info();
    assert_eq!(info.dirty_ratio, 0.0);
    assert_eq!(
        info.bytes_reclaimed,
        outcome.bytes_before - outcome.bytes_after
    );
    // Appends go on after the swap, and both a clean and a crash reopen agree.
    history.append(&log, &writes(5, 50, 99));
    log.close().unwrap();
    drop(log);
    let log = Log::open(dir.path(), config()).unwrap();
    assert!(log.recovery_report().clean);
    history.check(&log, false);
    drop(log);
    let log = Log::open(dir.path(), config()).unwrap();
    assert!(!log.recovery_report().clean, "no close, no marker");
    history.check(&log, false);
    assert_eq!(log.end_offset(), before.end_offset + 5);
}

#[test]
fn given_deletes_when_retention_passed_should_drop_tombstones_and_set_horizon() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), config()).unwrap();
    let mut history = History::new();
    for round in 0..10 {
        history.append(&log, &writes(20, 30, round));
    }
    let deletes: Vec<_> = (0..10).map(|k| (format!("key-{k}"), None)).collect();
    let base = history.append(&log, &deletes);
    history.append(&log, &writes(20, 30, 50).split_off(15));
    log.sync().unwrap();
    let keep_tombstones = CompactOptions {
        roll: true,
        delete_retention_ms: u64::MAX,
        ..Default::default()
    };
    let outcome = log.compact(&history.filter, &keep_tombstones).unwrap();
    assert_eq!(outcome.tombstones_removed, 0);
    assert_eq!(log.compaction_horizon(), 0);
    history.check(&log, false);
    let drop_tombstones = CompactOptions {
        roll: true,
        delete_retention_ms: 0,
        ..Default::default()
    };
    let outcome = log.compact(&history.filter, &drop_tombstones).unwrap();
    // All but the deletes whose key still has an older value kept as a segment's first
    // record (the placeholder that keeps the segment's base offset).
    assert!(outcome.tombstones_removed >= 5, "{outcome:?}");
    history.check(&log, true);
    assert!(
        log.compaction_horizon() > base,
        "horizon past the dropped deletes"
    );
    assert!(log.compaction_horizon() <= base + 10);
    let horizon = log.compaction_horizon();
    drop(log);
    let log = Log::open(dir.path(), config()).unwrap();
    assert_eq!(
        log.compaction_horizon(),
        horizon,
        "the horizon is persisted"
    );
    history.check(&log, true);
}

#[test]
fn given_superseded_record_kept_whole_should_keep_its_tombstone() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), config()).unwrap();
    let mut history = History::new();
    history.append(&log, &writes(5, 100, 0));
    let whole = history.append(&log, &[("k".into(), Some("old".into()))]);
    history.append(&log, &writes(5, 100, 1));
    history.append(&log, &[("k".into(), None)]);
    history.append(&log, &writes(5, 100, 2));
    history.filter.whole.insert(whole);
    log.sync().unwrap();
    let options = CompactOptions {
        roll: true,
        delete_retention_ms: 0,
        ..Default::default()
    };
    let outcome = log.compact(&history.filter, &options).unwrap();
    // The superseded `old` value, kept only for its producer, is counted and reported.
    assert_eq!(
        (
            outcome.records_kept_for_producers,
            outcome.batches_kept_for_producers
        ),
        (1, 1),
        "{outcome:?}"
    );
    assert_eq!(log.compaction_info().records_kept_for_producers, 1);
    let survivors = records(&log);
    assert!(survivors.iter().any(|r| r.offset == whole), "kept whole");
    assert!(
        survivors
            .iter()
            .any(|r| r.key.as_deref() == Some(b"k".as_slice()) && r.value.is_none()),
        "the delete must stay while an older value of its key does"
    );
    assert_eq!(log.compaction_horizon(), 0);
}

#[test]
fn given_clean_log_when_compacted_again_should_leave_its_segments_alone() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), config()).unwrap();
    let mut history = History::new();
    for round in 0..40 {
        history.append(&log, &writes(20, 30, round));
    }
    log.sync().unwrap();
    let options = CompactOptions {
        roll: true,
        ..Default::default()
    };
    log.compact(&history.filter, &options).unwrap();
    let second = log
        .compact(&history.filter, &CompactOptions::default())
        .unwrap();
    // The first pass merged the small outputs' inputs; a second merges what is left; then
    // nothing changes any more.
    let third = log
        .compact(&history.filter, &CompactOptions::default())
        .unwrap();
    let names = |dir: &Path| {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".log"))
            .collect();
        names.sort();
        names
    };
    let before = names(dir.path());
    let fourth = log
        .compact(&history.filter, &CompactOptions::default())
        .unwrap();
    assert_eq!(fourth.records_removed, 0, "{second:?} {third:?} {fourth:?}");
    assert_eq!(fourth.bytes_before, fourth.bytes_after);
    assert_eq!(names(dir.path()), before, "no segment rewritten");
    history.check(&log, false);
}

#[test]
fn given_reader_holding_old_segments_when_compacted_should_still_read_them() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), config()).unwrap();
    let mut history = History::new();
    for round in 0..20 {
        history.append(&log, &writes(20, 10, round));
    }
    log.sync().unwrap();
    let held = log.read(0, 1 << 20).unwrap();
    let copy = held.bytes.to_vec();
    let options = CompactOptions {
        roll: true,
        ..Default::default()
    };
    log.compact(&history.filter, &options).unwrap();
    assert_eq!(
        &held.bytes[..],
        &copy[..],
        "a reader's bytes survive the swap"
    );
    for batch in Batches::new(held.bytes.clone()) {
        batch::verify(batch.unwrap().as_bytes()).unwrap();
    }
}

#[test]
fn given_crash_at_each_step_of_the_swap_should_open_with_old_or_new_set() {
    for step in [
        CompactStep::OutputsWritten,
        CompactStep::ManifestCommitted,
        CompactStep::Swapped,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), config()).unwrap();
        let mut history = History::new();
        for round in 0..30 {
            history.append(&log, &writes(20, 40, round));
        }
        log.sync().unwrap();
        let all_before = records(&log).len();
        // A first full pass, so the crash hits a log that already has a manifest.
        log.compact(
            &history.filter,
            &CompactOptions {
                roll: true,
                ..Default::default()
            },
        )
        .unwrap();
        for round in 30..50 {
            history.append(&log, &writes(20, 40, round));
        }
        log.sync().unwrap();
        let before = records(&log).len();
        assert!(before < all_before);
        let error = log
            .compact(
                &history.filter,
                &CompactOptions {
                    roll: true,
                    stop_after: Some(step),
                    ..Default::default()
                },
            )
            .unwrap_err();
        assert!(matches!(error, LogError::Compaction { .. }), "{error}");
        drop(log); // as if the process died: no close, no marker
        let log = Log::open(dir.path(), config()).unwrap();
        history.check(&log, false);
        let after = records(&log).len();
        match step {
            CompactStep::OutputsWritten => assert_eq!(after, before, "old set"),
            _ => assert!(after < before, "new set ({step:?})"),
        }
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".log"))
            .collect();
        assert_eq!(
            leftovers.len(),
            log.info().segments,
            "no leftover files: {leftovers:?}"
        );
        // And the next pass works.
        log.compact(
            &history.filter,
            &CompactOptions {
                roll: true,
                ..Default::default()
            },
        )
        .unwrap();
        history.check(&log, false);
    }
}

#[test]
fn given_manifest_dir_sync_failing_after_rename_should_poison_and_reopen_with_every_record() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), config()).unwrap();
    let mut history = History::new();
    for round in 0..30 {
        history.append(&log, &writes(20, 40, round));
    }
    log.sync().unwrap();
    let error = log
        .compact(
            &history.filter,
            &CompactOptions {
                roll: true,
                fail_manifest_dir_sync: true,
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(matches!(error, LogError::Poisoned { .. }), "{error}");
    assert!(
        matches!(log.roll_now(), Err(LogError::Poisoned { .. })),
        "no writes after a failed manifest commit"
    );
    drop(log);
    // The renamed manifest is what the disk holds: the outputs it lists must be there.
    let log = Log::open(dir.path(), config()).unwrap();
    history.check(&log, false);
}

#[test]
fn given_retention_deleting_compacted_segments_should_reopen_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), config()).unwrap();
    let mut history = History::new();
    for round in 0..40 {
        history.append(&log, &writes(20, 100, round));
    }
    log.sync().unwrap();
    log.compact(
        &history.filter,
        &CompactOptions {
            roll: true,
            ..Default::default()
        },
    )
    .unwrap();
    for round in 40..60 {
        history.append(&log, &writes(20, 100, round));
    }
    log.sync().unwrap();
    drop(log);
    let retention = LogConfig {
        retention_bytes: Some(200 * 1024),
        ..config()
    };
    let log = Log::open(dir.path(), retention.clone()).unwrap();
    let outcome = log.enforce_retention().unwrap();
    assert!(outcome.segments_deleted > 0);
    drop(log);
    let log = Log::open(dir.path(), retention).unwrap();
    assert!(log.start_offset() > 0);
    records(&log);
}

#[test]
fn given_corrupt_input_batch_should_stop_the_pass_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), config()).unwrap();
    let mut history = History::new();
    for round in 0..30 {
        history.append(&log, &writes(20, 40, round));
    }
    log.roll_now().unwrap();
    log.sync().unwrap();
    let first = log.segments.read()[0].path.clone();
    drop(log);
    // Flip a byte inside the first batch's records: a clean-shutdown-less open would refuse
    // it, so flip it after a clean open instead, through the mapping's file.
    let log = Log::open(dir.path(), config()).unwrap();
    log.close().unwrap();
    drop(log);
    let log = Log::open(dir.path(), config()).unwrap();
    let mut bytes = std::fs::read(&first).unwrap();
    bytes[100] ^= 0x40;
    std::fs::write(&first, &bytes).unwrap();
    let error = log
        .compact(&history.filter, &CompactOptions::default())
        .unwrap_err();
    assert!(matches!(error, LogError::Corrupt { .. }), "{error}");
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".log") && n.contains('-'))
        .collect();
    assert!(names.is_empty(), "no output left behind: {names:?}");
}

#[test]
fn given_throttle_should_pace_bytes() {
    let throttle = Throttle::new(1_000_000);
    let started = Instant::now();
    throttle.acquire(1_048_576); // the initial burst
    throttle.acquire(200_000);
    assert!(started.elapsed() >= Duration::from_millis(150));
}

#[derive(Debug, Clone)]
enum Op {
    Append(Vec<(u8, bool)>),
    Compact { roll: bool, drop_tombstones: bool },
    Reopen { clean: bool },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => proptest::collection::vec((0u8..12, proptest::bool::weighted(0.15)), 1..8)
            .prop_map(Op::Append),
        2 => (any::<bool>(), any::<bool>())
            .prop_map(|(roll, drop_tombstones)| Op::Compact { roll, drop_tombstones }),
        1 => any::<bool>().prop_map(|clean| Op::Reopen { clean }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn given_any_appends_compactions_and_reopens_log_should_match_history(
        ops in proptest::collection::vec(op(), 1..40)
    ) {
        let dir = tempfile::tempdir().unwrap();
        let config = small_config();
        let mut log = Log::open(dir.path(), config.clone()).unwrap();
        let mut history = History::new();
        let mut round = 0usize;
        let mut dropped_any = false;
        for op in ops {
            match op {
                Op::Append(writes) => {
                    round += 1;
                    let writes: Vec<_> = writes
                        .into_iter()
                        .map(|(k, delete)| {
                            (format!("k{k}"), (!delete).then(|| format!("v{round}-{}", "y".repeat(1200))))
                        })
                        .collect();
                    history.append(&log, &writes);
                    log.sync().unwrap();
                }
                Op::Compact { roll, drop_tombstones } => {
                    let options = CompactOptions {
                        roll,
                        delete_retention_ms: if drop_tombstones { 0 } else { u64::MAX },
                        ..Default::default()
                    };
                    log.compact(&history.filter, &options).unwrap();
                    dropped_any |= drop_tombstones;
                }
                Op::Reopen { clean } => {
                    if clean {
                        log.close().unwrap();
                    }
                    drop(log);
                    log = Log::open(dir.path(), config.clone()).unwrap();
                }
            }
            history.check(&log, dropped_any);
        }
    }
}

#[test]
fn given_batches_of_several_epochs_when_compacted_should_keep_each_batch_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let epochs = [1u32, 1, 2, 5];
    {
        let log = Log::open(dir.path(), config()).unwrap();
        let mut filter = ModelFilter::default();
        for (i, epoch) in epochs.iter().enumerate() {
            // Every batch loses its "shared" record to the next one, so it is re-encoded.
            let own = format!("own-{i}");
            let mut builder = BatchBuilder::new();
            builder.push(1, Some(b"shared"), Some(b"v"), &[]);
            builder.push(1, Some(own.as_bytes()), Some(b"v"), &[]);
            let batch = Batch::parse(builder.finish().unwrap()).unwrap();
            let appended = log.append_batch_at(&batch, *epoch).unwrap();
            filter
                .latest
                .insert(Bytes::from_static(b"shared"), appended.base_offset);
            filter.latest.insert(Bytes::from(own), appended.last_offset);
        }
        log.roll_now().unwrap();
        let outcome = log.compact(&filter, &CompactOptions::default()).unwrap();
        assert_eq!(outcome.records_removed, 3);
        assert_eq!(crate::log::tests::epoch::epochs(&log), epochs);
    }
    // The recovery scan checks that epochs never go down: the compacted segment passes.
    let log = Log::open(dir.path(), config()).unwrap();
    assert!(!log.recovery_report().clean);
    assert_eq!(crate::log::tests::epoch::epochs(&log), epochs);
}
