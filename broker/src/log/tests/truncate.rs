//! `truncate_to`: cuts at batch boundaries in the active segment, across segments, at the start
//! and the end; refuses offsets inside a batch or outside the log; survives clean and crash
//! reopens; a crash at every step of it reopens to a prefix of the old log holding at least the
//! truncated one. (Random appends/truncates/reopens against a model: `tests.rs`, `mod model`.)

use std::collections::HashMap;

use syncline_proto::batch::{Batch, Batches};

use super::epoch::{append_at, epochs};
use super::*;
use crate::log::compact::{CompactOptions, CompactionFilter, Verdict};
use crate::log::truncate::Steps;

/// The next offset after a stored batch.
fn next_of(batch: &[u8]) -> u64 {
    BatchHeader::parse(batch).unwrap().next_offset()
}

/// Synced so that `read` shows everything, then every batch.
fn everything(log: &Log) -> Vec<Vec<u8>> {
    log.sync().unwrap();
    read_all(log, log.start_offset())
}

#[test]
fn given_cut_in_the_active_segment_should_drop_later_batches_and_append_at_the_cut() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_config()).unwrap();
    let stored = fill(&log, 5, 10);
    log.truncate_to(9).unwrap();
    assert_eq!(log.end_offset(), 9);
    assert_eq!(log.durable_offset(), 9, "the visible offset is clamped");
    assert_eq!(log.synced_offset(), 9);
    assert_batches(&everything(&log), &stored[..3], "kept");
    let batch = make_batch(2, 10, 1, 9);
    assert_eq!(log.append(&batch).unwrap().base_offset, 9);
    let mut expected = stored[..3].to_vec();
    expected.push(stamped(&batch, 9));
    assert_batches(&everything(&log), &expected, "appended after the cut");
}

#[test]
fn given_unsynced_appends_when_truncated_should_make_the_kept_part_synced_and_visible() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_config()).unwrap();
    let batches: Vec<Bytes> = (0..5).map(|i| make_batch(3, 10, 1, i)).collect();
    for batch in &batches {
        log.append(batch).unwrap();
    }
    assert_eq!(log.durable_offset(), 0);
    log.truncate_to(9).unwrap();
    // The kept part was copied and fsync'd: with Synced visibility it is readable at once.
    assert_eq!((log.synced_offset(), log.durable_offset()), (9, 9));
    assert_eq!(read_all(&log, 0).len(), 3);
}

#[test]
fn given_cut_in_an_early_segment_should_delete_later_segments() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_config()).unwrap();
    let stored = fill(&log, 100, 1000);
    let files = segment_files(dir.path());
    assert!(files.len() >= 4, "{files:?}");
    let offset = next_of(&stored[19]);
    log.truncate_to(offset).unwrap();
    assert_eq!(log.end_offset(), offset);
    let left = segment_files(dir.path());
    assert!(left.len() < files.len());
    assert_eq!(
        left[..],
        files[..left.len()],
        "earlier segments keep their names"
    );
    assert_eq!(log.info().segments, left.len());
    assert_batches(&everything(&log), &stored[..20], "kept");
    assert_eq!(
        log.append(&make_batch(1, 1, 1, 1)).unwrap().base_offset,
        offset
    );
}

#[test]
fn given_cut_at_a_segment_base_should_leave_an_empty_active_segment_there() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_config()).unwrap();
    let stored = fill(&log, 100, 1000);
    let second = segment_files(dir.path())[1].clone();
    let base: u64 = second
        .file_stem()
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    log.truncate_to(base).unwrap();
    assert_eq!(
        segment_files(dir.path()),
        vec![segment_files(dir.path())[0].clone(), second.clone()]
    );
    assert_eq!(std::fs::metadata(&second).unwrap().len(), 0);
    let kept = stored.iter().take_while(|b| next_of(b) <= base).count();
    assert_batches(&everything(&log), &stored[..kept], "kept");
    drop(log);
    let log = Log::open(dir.path(), small_config()).unwrap();
    assert_batches(&everything(&log), &stored[..kept], "after a crash");
}

#[test]
fn given_cut_at_the_start_should_leave_an_empty_log_at_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        retention_bytes: Some(150 * 1024),
        ..small_config()
    };
    let log = Log::open(dir.path(), config.clone()).unwrap();
    fill(&log, 300, 1000);
    let start = log.enforce_retention().unwrap().log_start_offset;
    assert!(start > 0);
    assert!(matches!(
        log.truncate_to(start - 1),
        Err(LogError::OffsetOutOfRange { requested, .. }) if requested == start - 1
    ));
    log.truncate_to(start).unwrap();
    assert_eq!((log.start_offset(), log.end_offset()), (start, start));
    assert!(everything(&log).is_empty());
    assert_eq!(segment_files(dir.path()).len(), 1);
    assert_eq!(
        log.append(&make_batch(1, 1, 1, 1)).unwrap().base_offset,
        start
    );
    drop(log);
    let log = Log::open(dir.path(), config).unwrap();
    assert_eq!((log.start_offset(), log.end_offset()), (start, start + 1));
}

#[test]
fn given_cut_at_the_end_should_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_config()).unwrap();
    let stored = fill(&log, 5, 10);
    let before = std::fs::read(last_segment(dir.path())).unwrap();
    log.truncate_to(15).unwrap();
    assert_eq!(std::fs::read(last_segment(dir.path())).unwrap(), before);
    assert_batches(&everything(&log), &stored, "unchanged");
    assert!(matches!(
        log.truncate_to(16),
        Err(LogError::OffsetOutOfRange {
            requested: 16,
            start: 0,
            end: 15
        })
    ));
}

#[test]
fn given_offset_inside_a_batch_should_refuse_naming_the_boundaries_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_config()).unwrap();
    let stored = fill(&log, 5, 10);
    let error = log.truncate_to(7).unwrap_err();
    assert!(
        matches!(
            error,
            LogError::NotBatchBoundary {
                offset: 7,
                previous: 6,
                next: 9
            }
        ),
        "{error}"
    );
    assert!(error.to_string().contains("6 and 9"), "{error}");
    assert!(!error.is_fatal());
    assert_eq!(log.end_offset(), 15);
    assert_batches(&everything(&log), &stored, "unchanged");
    assert_eq!(log.append(&make_batch(1, 1, 1, 1)).unwrap().base_offset, 15);
}

#[test]
fn given_truncated_log_when_reopened_clean_or_after_crash_should_be_exactly_the_truncated_log() {
    for clean in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let stored = {
            let log = Log::open(dir.path(), small_config()).unwrap();
            let stored = fill(&log, 100, 1000);
            log.truncate_to(next_of(&stored[40])).unwrap();
            if clean {
                log.close().unwrap();
            }
            stored
        };
        let log = Log::open(dir.path(), small_config()).unwrap();
        assert_eq!(log.recovery_report().clean, clean);
        assert_eq!(log.recovery_report().bytes_truncated, 0);
        assert_eq!(log.end_offset(), next_of(&stored[40]));
        assert_batches(&everything(&log), &stored[..41], &format!("clean {clean}"));
        assert_eq!(
            log.append(&make_batch(1, 1, 1, 1)).unwrap().base_offset,
            next_of(&stored[40])
        );
    }
}

#[test]
fn given_published_mode_when_truncated_should_clamp_visible_and_publish_up_to_the_new_end() {
    let dir = tempfile::tempdir().unwrap();
    let options = OpenOptions {
        visibility: Visibility::Published,
        ..OpenOptions::default()
    };
    let log = Log::open_with(dir.path(), small_config(), options).unwrap();
    let stored = fill(&log, 5, 10);
    log.publish(12);
    log.truncate_to(6).unwrap();
    assert_eq!(log.durable_offset(), 6);
    assert_eq!(log.publish(15), 6, "publish is clamped to the new end");
    assert_batches(&read_all(&log, 0), &stored[..2], "kept");
}

#[test]
fn given_truncated_epochs_should_let_appends_continue_from_the_kept_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_config()).unwrap();
    append_at(&log, 1, 1);
    append_at(&log, 3, 2);
    append_at(&log, 5, 3);
    log.truncate_to(2).unwrap();
    // Raft: a follower drops an uncommitted tail of a later term, then appends the leader's.
    append_at(&log, 2, 4);
    log.sync().unwrap();
    assert_eq!(epochs(&log), vec![1, 2]);
    drop(log);
    let log = Log::open(dir.path(), small_config()).unwrap();
    assert_eq!(epochs(&log), vec![1, 2]);
}

/// Every record is superseded by the next record with the same key (`key-<seed>-<i>` repeats
/// when a seed repeats), so a pass rewrites segments into new generations.
struct Latest(HashMap<Vec<u8>, u64>);

impl Latest {
    fn of(log: &Log) -> Self {
        let mut latest = HashMap::new();
        log.sync().unwrap();
        for batch in Batches::new(log.read_up_to(0, usize::MAX, u64::MAX).unwrap().bytes) {
            for record in batch.unwrap().records() {
                let record = record.unwrap();
                latest.insert(record.key.unwrap().to_vec(), record.offset);
            }
        }
        Self(latest)
    }
}

impl CompactionFilter for Latest {
    fn decide(&self, batch: &Batch, _expired: bool, out: &mut Vec<Verdict>) -> Result<(), String> {
        for record in batch.records() {
            let record = record.map_err(|e| e.to_string())?;
            let key = record.key.ok_or("no key")?;
            out.push(
                if self.0.get(&key[..]).is_some_and(|l| *l > record.offset) {
                    Verdict::Superseded
                } else {
                    Verdict::Keep
                },
            );
        }
        Ok(())
    }
    fn keep_whole(&self, _header: &BatchHeader) -> bool {
        false
    }
    fn limit(&self) -> u64 {
        u64::MAX
    }
    fn tombstones_removed(&self, _removed: &[(Bytes, u64)]) {}
}

/// A log of compacted segments (generation > 0) and plain ones after them. Returns every
/// batch it serves, in order, and how many of them to keep so that the cut falls inside the
/// last compacted segment (not at its base).
fn compacted_log(dir: &Path) -> (Vec<Vec<u8>>, usize) {
    let log = Log::open(dir, small_config()).unwrap();
    // Batches 30.. supersede batches 0..30 record by record (same keys).
    for i in 0..60u8 {
        log.append(&make_batch(3, 1000, 1, i % 30)).unwrap();
    }
    log.roll_now().unwrap();
    let outcome = log
        .compact(&Latest::of(&log), &CompactOptions::default())
        .unwrap();
    assert!(outcome.records_removed > 0);
    for i in 0..30u8 {
        log.append(&make_batch(3, 1000, 1, 100 + i)).unwrap();
    }
    let batches = everything(&log);
    let names: Vec<String> = segment_files(dir)
        .iter()
        .map(|p| p.file_name().unwrap().to_str().unwrap().to_string())
        .collect();
    let compacted: Vec<u64> = names
        .iter()
        .filter_map(|n| n.split_once('-'))
        .map(|(base, _)| base.parse().unwrap())
        .collect();
    assert!(compacted.len() >= 2, "{names:?}");
    let last = *compacted.last().unwrap();
    let keep = batches
        .iter()
        .position(|b| BatchHeader::parse(b).unwrap().base_offset > last)
        .unwrap();
    assert!(names
        .iter()
        .any(|n| n.starts_with(&format!("{:020}-", last))));
    (batches, keep)
}

#[test]
fn given_compacted_segments_when_truncated_into_them_should_reopen_to_the_truncated_log() {
    let dir = tempfile::tempdir().unwrap();
    let (batches, keep) = compacted_log(dir.path());
    let offset = next_of(&batches[keep - 1]);
    let before = segment_files(dir.path());
    let log = Log::open(dir.path(), small_config()).unwrap();
    log.truncate_to(offset).unwrap();
    assert_batches(&everything(&log), &batches[..keep], "kept");
    assert_eq!(
        log.append(&make_batch(1, 1, 1, 1)).unwrap().base_offset,
        offset
    );
    drop(log);
    let log = Log::open(dir.path(), small_config()).unwrap();
    assert_eq!(log.end_offset(), offset + 1);
    assert_batches(&everything(&log)[..keep], &batches[..keep], "after reopen");
    // The compacted segments before the cut stay; the cut one became a plain segment.
    let after = segment_files(dir.path());
    let cut = before
        .iter()
        .rposition(|p| p.to_str().unwrap().contains('-'))
        .unwrap();
    assert_eq!(after[..cut], before[..cut]);
    assert_eq!(after.len(), cut + 1);
    assert!(!after[cut].to_str().unwrap().contains('-'), "{after:?}");
}

#[test]
fn given_crash_at_every_step_of_a_truncation_should_reopen_to_a_prefix_holding_the_truncated_log() {
    // Unread logs are cut in place; read ones (and compacted segments) through a copy.
    let cases = [
        ("plain, in place", false, false),
        ("plain, copied", false, true),
        ("compacted", true, false),
    ];
    for (case, compacted, read_first) in cases {
        let template = tempfile::tempdir().unwrap();
        let (batches, kept) = if compacted {
            compacted_log(template.path())
        } else {
            let log = Log::open(template.path(), small_config()).unwrap();
            let stored = fill(&log, 100, 1000);
            log.close().unwrap();
            (stored, 10)
        };
        let offset = next_of(&batches[kept - 1]);
        let mut outcomes = Vec::new();
        for stop in 0.. {
            let dir = tempfile::tempdir().unwrap();
            for entry in std::fs::read_dir(template.path()).unwrap() {
                let entry = entry.unwrap();
                if entry.file_name() != ".lock" {
                    std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
                }
            }
            let log = Log::open(dir.path(), small_config()).unwrap();
            if read_first {
                log.read(0, 1).unwrap();
            }
            let finished = log
                .truncate_with(offset, &mut Steps::stop_after(stop))
                .is_ok();
            drop(log); // a crash: nothing more reaches the disk
            let log = Log::open(dir.path(), small_config())
                .unwrap_or_else(|e| panic!("{case}: reopen after stopping at step {stop}: {e}"));
            let served = everything(&log);
            assert!(
                served.len() >= kept && served.len() <= batches.len(),
                "{case}, step {stop}: {} batches",
                served.len()
            );
            assert_batches(
                &served,
                &batches[..served.len()],
                &format!("{case}, step {stop}"),
            );
            outcomes.push(served.len());
            // Truncating again finishes the job.
            log.truncate_to(offset).unwrap();
            assert_batches(
                &everything(&log),
                &batches[..kept],
                &format!("{case}, step {stop}"),
            );
            if finished {
                assert_eq!(served.len(), kept);
                break;
            }
        }
        assert!(outcomes.len() > 3, "{case}: {outcomes:?}");
        assert_eq!(
            outcomes[0],
            batches.len(),
            "{case}: before any step: the old log"
        );
    }
}

#[test]
fn given_full_disk_while_copying_the_kept_part_should_fail_cleanly_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (log, faults) = faulty_log(dir.path());
    let stored = fill(&log, 5, 10);
    log.read(0, 1).unwrap(); // served: the truncation copies
    faults.fail(FaultKind::Write, 1, libc::ENOSPC);
    let error = log.truncate_to(9).unwrap_err();
    assert!(matches!(error, LogError::NoSpace { .. }), "{error}");
    assert!(!log.is_poisoned());
    assert_eq!((log.end_offset(), log.durable_offset()), (15, 15));
    assert_batches(&everything(&log), &stored, "unchanged");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_str().unwrap().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    log.truncate_to(9).unwrap();
    assert_batches(&everything(&log), &stored[..3], "after space came back");
}

fn inode(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().ino()
}

#[test]
fn given_unread_log_when_truncated_should_cut_the_segment_file_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_config()).unwrap();
    let stored = fill(&log, 5, 10);
    let path = last_segment(dir.path());
    let before = inode(&path);
    log.truncate_to(9).unwrap();
    assert_eq!(inode(&path), before, "no copy when nobody ever read");
    let kept: usize = stored[..3].iter().map(Vec::len).sum();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), kept as u64);
    assert_batches(&everything(&log), &stored[..3], "kept");
}

#[test]
fn given_reader_holding_bytes_when_truncated_should_keep_them_intact() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_config()).unwrap();
    let stored = fill(&log, 5, 10);
    let path = last_segment(dir.path());
    let before = inode(&path);
    let held = log.read(0, 1 << 20).unwrap();
    log.truncate_to(3).unwrap();
    assert_ne!(
        inode(&path),
        before,
        "a served segment is replaced, never cut in place"
    );
    // Appends after the cut go to the new file; the bytes a reader holds are the old ones.
    log.append(&make_batch(3, 10, 1, 77)).unwrap();
    log.sync().unwrap();
    assert_eq!(&held.bytes[..], &stored.concat()[..]);
    assert_eq!(everything(&log)[0], stored[0]);
}
