//! Behaviour of the whole log: append/read, rolls, durability, recovery from torn tails and
//! corruption, index rebuilds, retention, poisoning. Each test drives real files in a temp dir.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use syncline_proto::batch::{BatchBuilder, BatchHeader};

use super::*;

/// Small segments and a dense index, so a few KiB exercise rolls and index lookups.
pub(crate) fn small_config() -> LogConfig {
    LogConfig {
        segment_bytes_max: 64 * 1024,
        batch_bytes_max: 16 * 1024,
        index_interval_bytes: 256,
        preallocate_bytes: 16 * 1024,
        // Test batches carry 1970s timestamps; keep age-based rolls out of tests that do not
        // ask for them.
        segment_ms: 1000 * 365 * 24 * 3600 * 1000,
        ..LogConfig::default()
    }
}

pub(crate) fn make_batch(records: usize, value_len: usize, timestamp: i64, seed: u8) -> Bytes {
    let mut builder = BatchBuilder::new();
    for i in 0..records {
        let key = format!("key-{seed}-{i}");
        let value = vec![seed.wrapping_add(i as u8); value_len];
        builder.push(
            timestamp + i as i64,
            Some(key.as_bytes()),
            Some(&value),
            &[],
        );
    }
    builder.finish().unwrap()
}

/// The bytes the log must store for `batch` appended at `base` (leader epoch 0).
fn stamped(batch: &[u8], base: u64) -> Vec<u8> {
    stamped_at(batch, base, 0)
}

/// The bytes the log must store for `batch` appended at `base` in `epoch`.
fn stamped_at(batch: &[u8], base: u64, epoch: u32) -> Vec<u8> {
    let mut out = batch.to_vec();
    out[..8].copy_from_slice(&base.to_le_bytes());
    out[12..16].copy_from_slice(&epoch.to_le_bytes());
    out
}

/// Compares lists of batches without dumping kilobytes of bytes on failure.
#[track_caller]
fn assert_batches(actual: &[Vec<u8>], expected: &[Vec<u8>], context: &str) {
    assert_eq!(
        actual.len(),
        expected.len(),
        "batch count differs ({context})"
    );
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert!(a == e, "batch {i} differs ({context})");
    }
}

/// Every visible batch, split out of successive reads.
fn read_all(log: &Log, from: u64) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut next = from;
    loop {
        let read = log.read(next, 4096).unwrap();
        if read.bytes.is_empty() {
            return out;
        }
        let mut rest = &read.bytes[..];
        while !rest.is_empty() {
            let header = BatchHeader::parse(rest).unwrap();
            out.push(rest[..header.length as usize].to_vec());
            rest = &rest[header.length as usize..];
        }
        assert!(read.next_offset > next, "read must make progress");
        next = read.next_offset;
    }
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    files.sort();
    files
}

/// Appends `count` batches of 3 records and returns the stored bytes of each, synced.
fn fill(log: &Log, count: usize, value_len: usize) -> Vec<Vec<u8>> {
    let mut stored = Vec::new();
    for i in 0..count {
        let batch = make_batch(3, value_len, 1_000 + i as i64 * 10, i as u8);
        let appended = log.append(&batch).unwrap();
        stored.push(stamped(&batch, appended.base_offset));
    }
    log.sync().unwrap();
    stored
}

#[test]
fn given_appended_batches_when_synced_should_read_back_byte_identical_with_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_config()).unwrap();
    let first = log.append(&make_batch(3, 10, 1, 1)).unwrap();
    let second = log.append(&make_batch(2, 10, 1, 2)).unwrap();
    assert_eq!((first.base_offset, first.last_offset), (0, 2));
    assert_eq!((second.base_offset, second.last_offset), (3, 4));
    log.sync().unwrap();
    let batches = read_all(&log, 0);
    assert_eq!(batches[0], stamped(&make_batch(3, 10, 1, 1), 0));
    assert_eq!(batches[1], stamped(&make_batch(2, 10, 1, 2), 3));
    // A read from inside a batch returns the whole batch that holds the offset.
    let read = log.read(4, 1 << 20).unwrap();
    assert_eq!(read.first_offset, 3);
    assert_eq!(read.next_offset, 5);
}

#[test]
fn given_unsynced_appends_when_read_should_see_only_durable_batches() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_config()).unwrap();
    log.append(&make_batch(1, 10, 1, 1)).unwrap();
    assert_eq!(log.end_offset(), 1);
    assert_eq!(log.durable_offset(), 0);
    assert!(log.read(0, 1 << 20).unwrap().bytes.is_empty());
    log.sync().unwrap();
    assert_eq!(log.durable_offset(), 1);
    assert_eq!(log.read(0, 1 << 20).unwrap().next_offset, 1);
}

#[test]
fn given_read_with_small_max_bytes_should_return_at_least_one_whole_batch() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_config()).unwrap();
    let stored = fill(&log, 4, 100);
    let read = log.read(0, 1).unwrap();
    assert_eq!(&read.bytes[..], &stored[0][..]);
    let two = stored[0].len() + stored[1].len();
    let read = log.read(0, two).unwrap();
    assert_eq!(read.bytes.len(), two);
    assert_eq!(read.next_offset, 6);
}

#[test]
fn given_segment_full_when_appending_should_roll_to_file_named_by_base_offset() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_config()).unwrap();
    let stored = fill(&log, 100, 1000);
    let files = segment_files(dir.path());
    assert!(files.len() >= 4, "expected several segments, got {files:?}");
    assert_eq!(files[0].file_name().unwrap(), "00000000000000000000.log");
    for file in &files[1..] {
        let base: u64 = file.file_stem().unwrap().to_str().unwrap().parse().unwrap();
        let data = std::fs::read(file).unwrap();
        assert_eq!(BatchHeader::parse(&data).unwrap().base_offset, base);
    }
    for file in &files[..files.len() - 1] {
        let index = file.with_extension("index");
        let len = std::fs::metadata(&index).unwrap().len();
        assert!(
            len > 0 && len < 1024,
            "sealed index must be trimmed, is {len} bytes"
        );
    }
    assert_batches(&read_all(&log, 0), &stored, "all");
    assert_eq!(log.info().segments, files.len());
}

#[test]
fn given_old_active_segment_when_appending_should_roll_by_age() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(1_000_000));
    let options = OpenOptions {
        clock: clock.clone(),
        ..Default::default()
    };
    let config = LogConfig {
        segment_ms: 60_000,
        ..small_config()
    };
    let log = Log::open_with(dir.path(), config, options).unwrap();
    log.append(&make_batch(1, 10, 1, 1)).unwrap();
    clock.advance(59_999);
    log.append(&make_batch(1, 10, 1, 1)).unwrap();
    assert_eq!(segment_files(dir.path()).len(), 1);
    clock.advance(1);
    log.append(&make_batch(1, 10, 1, 1)).unwrap();
    assert_eq!(segment_files(dir.path()).len(), 2);
    assert_eq!(
        log.durable_offset(),
        2,
        "a roll makes the sealed segment durable"
    );
}

#[test]
fn given_clean_close_when_reopened_should_skip_scan_and_continue_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let stored = {
        let log = Log::open(dir.path(), small_config()).unwrap();
        let stored = fill(&log, 50, 500);
        log.close().unwrap();
        assert!(matches!(
            log.append(&make_batch(1, 1, 1, 1)),
            Err(LogError::Closed { .. })
        ));
        stored
    };
    let log = Log::open(dir.path(), small_config()).unwrap();
    assert!(log.recovery_report().clean);
    assert_batches(&read_all(&log, 0), &stored, "all");
    let next = log.append(&make_batch(1, 10, 1, 9)).unwrap();
    assert_eq!(next.base_offset, 150);
    assert!(
        !dir.path().join(".clean-shutdown").exists(),
        "marker must go at open"
    );
}

#[test]
fn given_crash_without_close_when_reopened_should_scan_and_keep_everything_synced() {
    let dir = tempfile::tempdir().unwrap();
    let stored = {
        let log = Log::open(dir.path(), small_config()).unwrap();
        fill(&log, 50, 500)
    };
    let log = Log::open(dir.path(), small_config()).unwrap();
    assert!(!log.recovery_report().clean);
    assert_eq!(log.recovery_report().bytes_truncated, 0);
    assert_eq!(
        log.recovery_report().indexes_rebuilt,
        0,
        "live indexes must equal rebuilt ones"
    );
    assert_batches(&read_all(&log, 0), &stored, "all");
    assert_eq!(
        log.append(&make_batch(1, 1, 1, 1)).unwrap().base_offset,
        150
    );
}

fn last_segment(dir: &Path) -> PathBuf {
    segment_files(dir).pop().unwrap()
}

#[test]
fn given_torn_tail_at_every_byte_when_reopened_should_truncate_to_last_valid_batch() {
    let dir = tempfile::tempdir().unwrap();
    let stored = {
        let log = Log::open(dir.path(), small_config()).unwrap();
        fill(&log, 5, 40)
    };
    let path = last_segment(dir.path());
    let full = std::fs::read(&path).unwrap();
    let last_len = stored[4].len();
    let last_start = full.len() - last_len;
    // Every cut inside the last batch (and the cut right before it).
    for cut in last_start..full.len() {
        std::fs::write(&path, &full[..cut]).unwrap();
        // The recovery point after `fill` is 0 (no roll, no close): the tail is torn, not corrupt.
        let log = Log::open(dir.path(), small_config()).unwrap();
        assert_eq!(log.end_offset(), 12, "cut at {cut}");
        assert_batches(&read_all(&log, 0), &stored[..4], &format!("cut at {cut}"));
        assert_eq!(
            log.recovery_report().bytes_truncated,
            (cut - last_start) as u64,
            "cut at {cut}"
        );
        let appended = log.append(&make_batch(1, 1, 1, 7)).unwrap();
        assert_eq!(
            appended.base_offset, 12,
            "appends continue at the right offset"
        );
        drop(log);
        std::fs::write(&path, &full).unwrap();
        std::fs::remove_file(dir.path().join("recovery-point")).unwrap();
    }
}

#[test]
fn given_flipped_bytes_in_last_batch_when_reopened_should_drop_it_and_serve_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let stored = {
        let log = Log::open(dir.path(), small_config()).unwrap();
        fill(&log, 5, 40)
    };
    let path = last_segment(dir.path());
    let full = std::fs::read(&path).unwrap();
    let last_start = full.len() - stored[4].len();
    // The leader epoch (bytes 12..16) is outside the CRC and may be any value that does not go
    // below the previous batch's: a flip that raises it is not detectable (see the fault model).
    let epoch_field = last_start + 12..last_start + 16;
    for position in (last_start..full.len())
        .step_by(7)
        .filter(|p| !epoch_field.contains(p))
    {
        let mut damaged = full.clone();
        damaged[position] ^= 0x40;
        std::fs::write(&path, &damaged).unwrap();
        let log = Log::open(dir.path(), small_config()).unwrap();
        let batches = read_all(&log, 0);
        assert_batches(&batches, &stored[..4], &format!("flip at {position}"));
        assert_eq!(
            log.recovery_report().bytes_truncated,
            stored[4].len() as u64
        );
        assert_eq!(log.append(&make_batch(1, 1, 1, 7)).unwrap().base_offset, 12);
        drop(log);
        std::fs::write(&path, &full).unwrap();
        std::fs::remove_file(dir.path().join("recovery-point")).unwrap();
    }
}

#[test]
fn given_flipped_byte_in_sealed_segment_when_reopened_after_crash_should_refuse_naming_file() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = Log::open(dir.path(), small_config()).unwrap();
        fill(&log, 100, 1000);
    }
    let files = segment_files(dir.path());
    assert!(files.len() >= 3);
    let victim = &files[1];
    let mut data = std::fs::read(victim).unwrap();
    let middle = data.len() / 2;
    data[middle] ^= 0x01;
    std::fs::write(victim, &data).unwrap();
    let error = Log::open(dir.path(), small_config()).unwrap_err();
    assert!(error.is_fatal());
    let message = error.to_string();
    assert!(
        matches!(&error, LogError::Corrupt { file, .. } if file == victim),
        "{message}"
    );
    assert!(
        message.contains(victim.file_name().unwrap().to_str().unwrap()),
        "{message}"
    );
    // Nothing was truncated or deleted: the files are as they were.
    assert_eq!(segment_files(dir.path()), files);
}

#[test]
fn given_flipped_byte_in_sealed_segment_after_clean_close_should_never_serve_it() {
    let dir = tempfile::tempdir().unwrap();
    let stored = {
        let log = Log::open(dir.path(), small_config()).unwrap();
        let stored = fill(&log, 100, 1000);
        log.close().unwrap();
        stored
    };
    let files = segment_files(dir.path());
    let victim = &files[0];
    let mut data = std::fs::read(victim).unwrap();
    let flip = stored[0].len() + 100; // inside the second batch's records
    data[flip] ^= 0x01;
    std::fs::write(victim, &data).unwrap();
    let log = Log::open(dir.path(), small_config()).unwrap();
    assert!(log.recovery_report().clean);
    assert_eq!(log.read(0, 1).unwrap().bytes.len(), stored[0].len());
    let error = log.read(3, 1).unwrap_err();
    assert!(
        matches!(&error, LogError::Corrupt { file, .. } if file == victim),
        "{error}"
    );
    // Reading past the damage still works.
    assert!(log.read(6, 1).is_ok());
}

#[test]
fn given_deleted_index_files_when_reopened_should_rebuild_and_find_every_offset() {
    let dir = tempfile::tempdir().unwrap();
    let stored = {
        let log = Log::open(dir.path(), small_config()).unwrap();
        let stored = fill(&log, 100, 1000);
        log.close().unwrap();
        stored
    };
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path
            .extension()
            .is_some_and(|e| e == "index" || e == "timeindex")
        {
            std::fs::remove_file(path).unwrap();
        }
    }
    let log = Log::open(dir.path(), small_config()).unwrap();
    assert!(log.recovery_report().indexes_rebuilt > 0);
    for (i, batch) in stored.iter().enumerate() {
        let offset = i as u64 * 3 + 1;
        let read = log.read(offset, 1).unwrap();
        assert_eq!(&read.bytes[..], &batch[..], "offset {offset}");
    }
}

#[test]
fn given_garbage_index_when_reopened_after_crash_should_rebuild_it() {
    let dir = tempfile::tempdir().unwrap();
    let stored = {
        let log = Log::open(dir.path(), small_config()).unwrap();
        fill(&log, 100, 1000)
    };
    let files = segment_files(dir.path());
    let index = files[0].with_extension("index");
    std::fs::write(&index, vec![0xAB; 80]).unwrap();
    let log = Log::open(dir.path(), small_config()).unwrap();
    assert!(log.recovery_report().indexes_rebuilt >= 1);
    assert_batches(&read_all(&log, 0), &stored, "all");
    assert_eq!(log.read(10, 1).unwrap().first_offset, 9);
}

#[test]
fn given_offsets_outside_log_when_read_should_error_with_range() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_config()).unwrap();
    fill(&log, 2, 10);
    let error = log.read(7, 100).unwrap_err();
    assert!(matches!(
        error,
        LogError::OffsetOutOfRange {
            requested: 7,
            start: 0,
            end: 6
        }
    ));
    assert!(error.to_string().contains("[0, 6)"), "{error}");
    let at_end = log.read(6, 100).unwrap();
    assert!(at_end.bytes.is_empty());
    assert_eq!(at_end.next_offset, 6);
}

#[test]
fn given_invalid_or_oversized_batch_when_appended_should_reject_and_append_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_config()).unwrap();
    let too_big = make_batch(1, 20 * 1024, 1, 1);
    assert!(matches!(
        log.append(&too_big),
        Err(LogError::BatchTooLarge { max: 16384, .. })
    ));
    let mut bad_crc = make_batch(2, 10, 1, 1).to_vec();
    *bad_crc.last_mut().unwrap() ^= 1;
    assert!(matches!(
        log.append(&bad_crc),
        Err(LogError::InvalidBatch(_))
    ));
    assert!(matches!(
        log.append(&bad_crc[..40]),
        Err(LogError::InvalidBatch(_))
    ));
    assert_eq!(log.end_offset(), 0);
    assert_eq!(log.info().size_bytes, 0);
    assert_eq!(log.append(&make_batch(1, 10, 1, 1)).unwrap().base_offset, 0);
}

fn faulty_log(dir: &Path) -> (Log, FaultInjector) {
    let faults = FaultInjector::new();
    let options = OpenOptions {
        opener: Arc::new(faults.clone()),
        ..Default::default()
    };
    (
        Log::open_with(dir, small_config(), options).unwrap(),
        faults,
    )
}

#[test]
fn given_failed_write_when_appending_should_poison_until_reopened() {
    let dir = tempfile::tempdir().unwrap();
    let (log, faults) = faulty_log(dir.path());
    log.append(&make_batch(1, 10, 1, 1)).unwrap();
    faults.fail(FaultKind::Write, 1, libc::EIO);
    let error = log.append(&make_batch(1, 10, 1, 2)).unwrap_err();
    assert!(matches!(error, LogError::Poisoned { .. }), "{error}");
    assert!(error.is_fatal());
    let later = log.append(&make_batch(1, 10, 1, 3)).unwrap_err();
    assert!(later.to_string().contains("write failed"), "{later}");
    assert!(matches!(log.sync(), Err(LogError::Poisoned { .. })));
    assert_eq!(log.end_offset(), 1);
    drop(log);
    let log = Log::open(dir.path(), small_config()).unwrap();
    assert_eq!(log.end_offset(), 1);
    assert_eq!(log.append(&make_batch(1, 10, 1, 4)).unwrap().base_offset, 1);
}

#[test]
fn given_failed_fsync_should_poison_and_fail_durable_waiters() {
    let dir = tempfile::tempdir().unwrap();
    let (log, faults) = faulty_log(dir.path());
    let log = Arc::new(log);
    let appended = log.append(&make_batch(1, 10, 1, 1)).unwrap();
    faults.fail(FaultKind::Sync, 1, libc::EIO);
    assert!(matches!(log.sync(), Err(LogError::Poisoned { .. })));
    assert_eq!(
        log.durable_offset(),
        0,
        "a failed fsync must not advance durability"
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let waited = runtime.block_on(log.wait_durable(appended.durable_target()));
    assert!(matches!(waited, Err(LogError::Poisoned { .. })));
    assert!(matches!(
        log.append(&make_batch(1, 10, 1, 1)),
        Err(LogError::Poisoned { .. })
    ));
}

#[test]
fn given_full_disk_when_reserving_space_should_fail_cleanly_without_poison() {
    let dir = tempfile::tempdir().unwrap();
    let (log, faults) = faulty_log(dir.path());
    let first = make_batch(1, 10, 1, 1);
    log.append(&first).unwrap();
    faults.fail_always(FaultKind::Allocate, libc::ENOSPC);
    // The first preallocated chunk is used up by a batch larger than what is left of it.
    let big = make_batch(1, 15 * 1024, 1, 2);
    let mut saw_no_space = false;
    for _ in 0..4 {
        match log.append(&big) {
            Ok(_) => {}
            Err(LogError::NoSpace { .. }) => {
                saw_no_space = true;
                break;
            }
            Err(other) => panic!("unexpected {other}"),
        }
    }
    assert!(saw_no_space);
    let end = log.end_offset();
    faults.clear();
    assert_eq!(log.append(&big).unwrap().base_offset, end, "not poisoned");
    log.sync().unwrap();
    assert_eq!(read_all(&log, 0).len() as u64, end + 1);
}

#[test]
fn given_many_concurrent_durable_appenders_should_share_fsyncs() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(Log::open(dir.path(), small_config()).unwrap());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let flusher = log.spawn_flusher();
        let mut tasks = Vec::new();
        for task in 0..64u8 {
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..5 {
                    let appended = log.append(&make_batch(1, 10, 1, task)).unwrap();
                    let durable = log.wait_durable(appended.durable_target()).await.unwrap();
                    assert!(durable > appended.last_offset);
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        log.close().unwrap();
        flusher.await.unwrap();
    });
    let syncs = log.stats().syncs.load(std::sync::atomic::Ordering::Relaxed);
    assert!(syncs > 0);
    assert!(
        syncs < 320 / 2,
        "{syncs} fsyncs for 320 durable appends: group commit is not sharing"
    );
}

#[test]
fn given_interval_policy_when_waiting_should_become_durable_only_after_interval() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        // Long enough that a loaded CI machine cannot oversleep the 50 ms check below past it.
        fsync: FsyncPolicy::IntervalMs(2_000),
        ..small_config()
    };
    let log = Arc::new(Log::open(dir.path(), config).unwrap());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let _flusher = log.spawn_flusher();
        let started = std::time::Instant::now();
        let appended = log.append(&make_batch(2, 10, 1, 1)).unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(
            log.durable_offset(),
            0,
            "the interval policy must not sync at once"
        );
        let durable = log.wait_durable(appended.durable_target()).await.unwrap();
        assert_eq!(durable, 2);
        assert!(started.elapsed() >= std::time::Duration::from_millis(1_900));
        assert_eq!(log.read(0, 100).unwrap().next_offset, 2);
    });
}

#[test]
fn given_size_retention_when_enforced_should_delete_oldest_segments_and_move_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        retention_bytes: Some(150 * 1024),
        ..small_config()
    };
    let log = Log::open(dir.path(), config.clone()).unwrap();
    let stored = fill(&log, 300, 1000);
    let before = log.info();
    let outcome = log.enforce_retention().unwrap();
    assert!(outcome.segments_deleted > 0);
    let after = log.info();
    assert!(
        after.size_bytes >= 150 * 1024,
        "keeps at least the retention"
    );
    assert_eq!(after.size_bytes, before.size_bytes - outcome.bytes_deleted);
    assert_eq!(after.start_offset, outcome.log_start_offset);
    assert!(after.start_offset > 0 && after.start_offset.is_multiple_of(3));
    assert!(matches!(
        log.read(0, 10),
        Err(LogError::OffsetOutOfRange { start, .. }) if start == after.start_offset
    ));
    let first_kept = (after.start_offset / 3) as usize;
    assert_batches(
        &read_all(&log, after.start_offset),
        &stored[first_kept..],
        "kept",
    );
    drop(log);
    let log = Log::open(dir.path(), config).unwrap();
    assert_eq!(log.start_offset(), after.start_offset);
    assert_eq!(log.end_offset(), 900);
}

#[test]
fn given_age_retention_when_enforced_should_delete_only_segments_older_than_limit() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(10_000_000));
    let config = LogConfig {
        retention_ms: Some(1_000),
        ..small_config()
    };
    let options = OpenOptions {
        clock: clock.clone(),
        ..Default::default()
    };
    let log = Log::open_with(dir.path(), config, options).unwrap();
    // Old records (timestamps far in the past), then fresh ones.
    for i in 0..100 {
        log.append(&make_batch(3, 1000, 1_000 + i, 1)).unwrap();
    }
    let old_end = log.end_offset();
    for _ in 0..100 {
        log.append(&make_batch(3, 1000, 10_000_000, 2)).unwrap();
    }
    log.sync().unwrap();
    let outcome = log.enforce_retention().unwrap();
    assert!(outcome.segments_deleted > 0);
    assert!(log.start_offset() <= old_end, "fresh segments must stay");
    let segments_left = log.info().segments;
    clock.advance(10_000);
    let outcome = log.enforce_retention().unwrap();
    assert_eq!(log.info().segments, 1, "only the active segment survives");
    assert_eq!(outcome.segments_deleted, segments_left - 1);
}

#[test]
fn given_reader_holding_bytes_when_retention_deletes_segment_should_still_read_them() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        retention_bytes: Some(64 * 1024),
        ..small_config()
    };
    let log = Log::open(dir.path(), config).unwrap();
    let stored = fill(&log, 200, 1000);
    let held = log.read(0, 1).unwrap().bytes;
    log.enforce_retention().unwrap();
    assert!(!dir.path().join("00000000000000000000.log").exists());
    assert_eq!(&held[..], &stored[0][..]);
}

#[test]
fn given_timestamps_when_looking_up_should_return_first_batch_at_or_after() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_config()).unwrap();
    for i in 0..200i64 {
        // Batch i holds timestamps 1000 + 10 i .. + 2
        log.append(&make_batch(3, 500, 1_000 + i * 10, 1)).unwrap();
    }
    log.sync().unwrap();
    assert_eq!(log.offset_for_timestamp(0).unwrap(), Some(0));
    assert_eq!(log.offset_for_timestamp(1_002).unwrap(), Some(0));
    assert_eq!(log.offset_for_timestamp(1_003).unwrap(), Some(3));
    assert_eq!(log.offset_for_timestamp(1_010).unwrap(), Some(3));
    assert_eq!(log.offset_for_timestamp(2_500).unwrap(), Some(150 * 3));
    assert_eq!(
        log.offset_for_timestamp(1_000 + 199 * 10 + 2).unwrap(),
        Some(199 * 3)
    );
    assert_eq!(log.offset_for_timestamp(1_000_000).unwrap(), None);
}

#[test]
fn given_open_log_when_opened_again_should_fail_with_locked() {
    let dir = tempfile::tempdir().unwrap();
    let _log = Log::open(dir.path(), small_config()).unwrap();
    let error = Log::open(dir.path(), small_config()).unwrap_err();
    assert!(matches!(error, LogError::Locked { .. }), "{error}");
}

mod review {
    //! Regression tests for bugs found in review (one per bug).
    use super::*;

    fn push(log: &Log, stored: &mut Vec<Vec<u8>>, value_len: usize, seed: &mut u8) {
        *seed = seed.wrapping_add(1);
        let batch = make_batch(1, value_len, 1_000, *seed);
        let appended = log.append(&batch).unwrap();
        stored.push(stamped(&batch, appended.base_offset));
    }

    /// A roll whose new segment cannot be created (a directory squats on its time index name),
    /// then more appends into the old segment and a later successful roll.
    fn failed_roll_then_more_appends(dir: &Path) -> (Log, Vec<Vec<u8>>) {
        let log = Log::open(dir, small_config()).unwrap();
        let (mut stored, mut seed) = (Vec::new(), 0u8);
        while log.info().size_bytes < 52 * 1024 {
            push(&log, &mut stored, 1000, &mut seed);
        }
        let failed_base = log.end_offset();
        let blocker = dir.join(format!("{failed_base:020}.timeindex"));
        std::fs::create_dir(&blocker).unwrap();
        assert!(log.append(&make_batch(1, 14 * 1024, 1_000, 200)).is_err());
        assert!(
            !dir.join(format!("{failed_base:020}.log")).exists(),
            "a failed roll must not leave its segment file"
        );
        std::fs::remove_dir(&blocker).unwrap();
        for _ in 0..3 {
            push(&log, &mut stored, 100, &mut seed);
        }
        assert!(log.end_offset() > failed_base);
        while log.info().segments < 2 {
            push(&log, &mut stored, 1000, &mut seed);
        }
        for _ in 0..5 {
            push(&log, &mut stored, 1000, &mut seed);
        }
        log.sync().unwrap();
        assert_batches(&read_all(&log, 0), &stored, "before restart");
        (log, stored)
    }

    #[test]
    fn given_failed_roll_then_crash_when_reopened_should_keep_durable_data() {
        let dir = tempfile::tempdir().unwrap();
        let (log, stored) = failed_roll_then_more_appends(dir.path());
        let durable_end = log.durable_offset();
        drop(log);
        let log = Log::open(dir.path(), small_config()).unwrap();
        assert_eq!(log.end_offset(), durable_end);
        assert_batches(&read_all(&log, 0), &stored, "after crash");
    }

    #[test]
    fn given_failed_roll_then_clean_close_when_reopened_should_open() {
        let dir = tempfile::tempdir().unwrap();
        let (log, stored) = failed_roll_then_more_appends(dir.path());
        log.close().unwrap();
        drop(log);
        let log = Log::open(dir.path(), small_config()).unwrap();
        assert_batches(&read_all(&log, 0), &stored, "after clean restart");
    }

    #[test]
    fn given_empty_non_last_segment_when_reopened_should_remove_it() {
        let dir = tempfile::tempdir().unwrap();
        let stored = {
            let log = Log::open(dir.path(), small_config()).unwrap();
            fill(&log, 100, 1000)
        };
        // An empty leftover between two real segments, at a base inside the first one.
        std::fs::write(dir.path().join(format!("{:020}.log", 5)), b"").unwrap();
        let log = Log::open(dir.path(), small_config()).unwrap();
        assert!(!dir.path().join(format!("{:020}.log", 5)).exists());
        assert_batches(
            &read_all(&log, 0),
            &stored,
            "after removing the empty segment",
        );
    }

    #[test]
    fn given_rotten_sealed_index_entry_after_clean_close_should_not_skip_records() {
        let dir = tempfile::tempdir().unwrap();
        let stored = {
            let log = Log::open(dir.path(), small_config()).unwrap();
            let stored = fill(&log, 100, 1000);
            log.close().unwrap();
            stored
        };
        let index = segment_files(dir.path())[0].with_extension("index");
        let mut bytes = std::fs::read(&index).unwrap();
        let relative = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
        bytes[12..16].copy_from_slice(&0x7fff_0000u32.to_le_bytes());
        std::fs::write(&index, bytes).unwrap();
        let log = Log::open(dir.path(), small_config()).unwrap();
        let read = log.read(u64::from(relative), 1).unwrap();
        assert!(read.first_offset <= u64::from(relative));
        assert_batches(&read_all(&log, 0), &stored, "after index rot");
    }

    #[test]
    fn given_extreme_client_timestamp_when_appending_after_restart_should_not_panic() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = Log::open(dir.path(), small_config()).unwrap();
            log.append(&make_batch(1, 10, i64::MIN, 1)).unwrap();
            log.close().unwrap();
        }
        let log = Log::open(dir.path(), small_config()).unwrap();
        log.append(&make_batch(1, 10, 1, 2)).unwrap();
        assert_eq!(
            log.info().segments,
            1,
            "a client timestamp must not age the segment"
        );
    }

    #[test]
    fn given_huge_retention_and_segment_age_should_mean_forever() {
        let dir = tempfile::tempdir().unwrap();
        let config = LogConfig {
            retention_ms: Some(u64::MAX),
            segment_ms: u64::MAX,
            ..small_config()
        };
        config.validate().unwrap();
        let log = Log::open(dir.path(), config).unwrap();
        let now = SystemClock.now_ms();
        for i in 0..5u8 {
            log.append(&make_batch(1, 10, now, i)).unwrap();
        }
        assert_eq!(
            log.info().segments,
            1,
            "u64::MAX segment_ms must not roll every append"
        );
        for i in 0..100u8 {
            log.append(&make_batch(3, 1000, now, i)).unwrap();
        }
        log.sync().unwrap();
        assert_eq!(log.enforce_retention().unwrap().segments_deleted, 0);
    }

    #[test]
    fn given_log_shorter_than_recovery_point_should_refuse_instead_of_reusing_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let stored = {
            let log = Log::open(dir.path(), small_config()).unwrap();
            let stored = fill(&log, 5, 40);
            log.close().unwrap();
            stored
        };
        std::fs::remove_file(dir.path().join(".clean-shutdown")).unwrap();
        let path = segment_files(dir.path()).pop().unwrap();
        let full = std::fs::read(&path).unwrap();
        std::fs::write(&path, &full[..full.len() - stored[4].len()]).unwrap();
        let error = Log::open(dir.path(), small_config()).unwrap_err();
        assert!(matches!(error, LogError::Corrupt { .. }), "{error}");
        assert!(error.to_string().contains("recovery point"), "{error}");
    }

    #[test]
    fn given_batch_claiming_more_offsets_than_records_should_reject_it() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), small_config()).unwrap();
        let mut builder = BatchBuilder::new().last_offset_delta(1_000_000);
        builder.push(1, Some(b"k"), Some(b"v"), &[]);
        let wide = builder.finish().unwrap();
        let error = log.append(&wide).unwrap_err();
        assert!(
            matches!(
                error,
                LogError::BatchOffsetSpan {
                    record_count: 1,
                    ..
                }
            ),
            "{error}"
        );
        assert_eq!(log.end_offset(), 0);
    }
}

mod model {
    //! Model-based property test: any sequence of appends (with leader epochs that never go
    //! down), reads, truncations, clean and crash restarts and retention passes agrees with a
    //! plain `Vec` of batches.
    use super::*;
    use proptest::prelude::*;
    use syncline_proto::batch::Batch;

    #[derive(Debug, Clone)]
    enum Op {
        Append {
            records: usize,
            value_len: usize,
            epoch_step: u32,
        },
        Truncate {
            keep_fraction: f64,
        },
        Sync,
        Read {
            from_fraction: f64,
            max_bytes: usize,
        },
        CleanRestart,
        CrashRestart,
        Retention,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (1usize..8, 0usize..2000, 0u32..2).prop_map(|(records, value_len, epoch_step)| Op::Append { records, value_len, epoch_step }),
            2 => (0.0f64..=1.0).prop_map(|keep_fraction| Op::Truncate { keep_fraction }),
            2 => Just(Op::Sync),
            3 => (0.0f64..1.0, 1usize..40_000).prop_map(|(from_fraction, max_bytes)| Op::Read { from_fraction, max_bytes }),
            1 => Just(Op::CleanRestart),
            1 => Just(Op::CrashRestart),
            1 => Just(Op::Retention),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
        #[test]
        fn given_any_operations_log_should_match_model(ops in proptest::collection::vec(op(), 1..60)) {
            let dir = tempfile::tempdir().unwrap();
            let config = LogConfig { retention_bytes: Some(100 * 1024), ..small_config() };
            let mut log = Some(Log::open(dir.path(), config.clone()).unwrap());
            // (base offset, stored bytes) of every batch, and how many are synced.
            let mut model: Vec<(u64, Vec<u8>)> = Vec::new();
            let mut synced = 0usize;
            let mut seed = 0u8;
            let mut epoch = 0u32;
            for op in ops {
                let current = log.as_ref().unwrap();
                match op {
                    Op::Append { records, value_len, epoch_step } => {
                        seed = seed.wrapping_add(1);
                        let batch = make_batch(records, value_len, 5, seed);
                        epoch += epoch_step;
                        let appended = current
                            .append_batch_at(&Batch::parse(batch.clone()).unwrap(), epoch)
                            .unwrap();
                        let expected_base = model.last().map_or(current.start_offset(), |(b, bytes)| {
                            b + u64::from(BatchHeader::parse(bytes).unwrap().last_offset_delta) + 1
                        });
                        prop_assert_eq!(appended.base_offset, expected_base);
                        model.push((appended.base_offset, stamped_at(&batch, appended.base_offset, epoch)));
                    }
                    Op::Truncate { keep_fraction } => {
                        let keep = (model.len() as f64 * keep_fraction) as usize;
                        let offset = match keep {
                            0 => current.start_offset(),
                            _ => BatchHeader::parse(&model[keep - 1].1).unwrap().next_offset(),
                        };
                        current.truncate_to(offset).unwrap();
                        model.truncate(keep);
                        // What is kept was fsync'd by the truncation; appends may go on in the
                        // epoch of the last kept batch or any later one.
                        synced = keep;
                        epoch = model.last().map_or(0, |(_, b)| BatchHeader::parse(b).unwrap().leader_epoch);
                        prop_assert_eq!((current.end_offset(), current.durable_offset()), (offset, offset));
                        let all = read_all(current, current.start_offset());
                        let expected: Vec<Vec<u8>> = model.iter().map(|(_, b)| b.clone()).collect();
                        prop_assert_eq!(all, expected);
                    }
                    Op::Sync => {
                        current.sync().unwrap();
                        synced = model.len();
                    }
                    Op::Read { from_fraction, max_bytes } => {
                        let start = current.start_offset();
                        let durable = current.durable_offset();
                        let from = start + ((durable - start) as f64 * from_fraction) as u64;
                        let read = current.read(from, max_bytes).unwrap();
                        // Rolls make sealed segments durable too, so the log may show more than
                        // the model's explicit syncs; never less.
                        let next_of = |(base, bytes): &(u64, Vec<u8>)| {
                            base + u64::from(BatchHeader::parse(bytes).unwrap().last_offset_delta) + 1
                        };
                        let synced_end = model[..synced].last().map_or(start, next_of);
                        prop_assert!(durable >= synced_end, "durable {} below synced {}", durable, synced_end);
                        let visible_count = model.iter().take_while(|b| next_of(b) <= durable).count();
                        let visible: Vec<&(u64, Vec<u8>)> = model[..visible_count].iter()
                            .filter(|(base, bytes)| base + u64::from(BatchHeader::parse(bytes).unwrap().last_offset_delta) >= from)
                            .collect();
                        if visible.is_empty() {
                            prop_assert!(read.bytes.is_empty());
                        } else {
                            prop_assert_eq!(read.first_offset, visible[0].0);
                            let mut expected = Vec::new();
                            for (_, bytes) in visible {
                                if !expected.is_empty() && expected.len() + bytes.len() > max_bytes { break; }
                                // A read never crosses a segment boundary; stop where it did.
                                if expected.len() >= read.bytes.len() { break; }
                                expected.extend_from_slice(bytes);
                            }
                            prop_assert_eq!(&read.bytes[..], &expected[..]);
                        }
                    }
                    Op::CleanRestart => {
                        let closing = log.take().unwrap();
                        closing.close().unwrap();
                        drop(closing);
                        synced = model.len();
                        log = Some(Log::open(dir.path(), config.clone()).unwrap());
                    }
                    Op::CrashRestart => {
                        // Unsynced appends may or may not survive a crash; in this in-process
                        // crash the page cache keeps them, so recovery must keep them all.
                        drop(log.take());
                        log = Some(Log::open(dir.path(), config.clone()).unwrap());
                        synced = model.len();
                    }
                    Op::Retention => {
                        current.enforce_retention().unwrap();
                        let start = current.start_offset();
                        model.retain(|(base, _)| *base >= start);
                        synced = model.iter().take_while(|(b, _)| *b < current.durable_offset()).count();
                    }
                }
                let current = log.as_ref().unwrap();
                let expected_end = model.last().map_or(current.start_offset(), |(b, bytes)| {
                    b + u64::from(BatchHeader::parse(bytes).unwrap().last_offset_delta) + 1
                });
                prop_assert_eq!(current.end_offset(), expected_end);
            }
            let current = log.as_ref().unwrap();
            current.sync().unwrap();
            let all = read_all(current, current.start_offset());
            let expected: Vec<Vec<u8>> = model.into_iter().map(|(_, b)| b).collect();
            prop_assert_eq!(all, expected);
        }
    }
}

/// Bytes allocated to `path` past its size, less two blocks of slack for the file system's
/// own metadata (ext4 counts extent-tree blocks in `st_blocks`).
fn blocks_past_end(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let metadata = std::fs::metadata(path).unwrap();
    (metadata.blocks() * 512).saturating_sub(metadata.len().div_ceil(4096) * 4096 + 8192)
}

/// Regression (issue 13, item 5): every log reserved 16 MiB ahead of its writes. The chunk now
/// starts small and grows with the write rate, a shared budget caps the total, and sealing and
/// closing give the rest back.
#[test]
fn given_shared_budget_when_logs_append_should_cap_reservations_and_give_them_back() {
    let dir = tempfile::tempdir().unwrap();
    let budget = Arc::new(Preallocation::new(200 * 1024));
    let options = OpenOptions {
        preallocation: budget.clone(),
        ..Default::default()
    };
    let config = LogConfig {
        segment_bytes_max: 4 * 1024 * 1024,
        preallocate_bytes: 1024 * 1024,
        ..small_config()
    };
    let a = Log::open_with(dir.path().join("a"), config.clone(), options.clone()).unwrap();
    let b = Log::open_with(dir.path().join("b"), config.clone(), options).unwrap();
    a.append(&make_batch(1, 100, 1, 1)).unwrap();
    let first = budget.reserved();
    assert!(
        first > 0 && first <= preallocate::CHUNK_MIN,
        "the first chunk is small: {first}"
    );
    // Fast appends double the chunk; the budget caps both logs together.
    for seed in 0..200u8 {
        a.append(&make_batch(4, 1000, 1, seed)).unwrap();
        b.append(&make_batch(4, 1000, 1, seed)).unwrap();
        assert!(budget.reserved() <= 200 * 1024, "{}", budget.reserved());
    }
    assert!(
        budget.reserved() > first,
        "the chunk grew with the write rate"
    );
    let segment = SegmentName::appended(0).log(&dir.path().join("a"));
    a.close().unwrap();
    assert_eq!(blocks_past_end(&segment), 0, "close gives the blocks back");
    drop(a);
    drop(b);
    assert_eq!(
        budget.reserved(),
        0,
        "closed and dropped logs hold no budget"
    );
}

/// A log with `small_config` and a preallocation budget of its own, without a cap.
fn log_with_own_budget(dir: &Path) -> (Log, Arc<Preallocation>) {
    let budget = Arc::new(Preallocation::new(u64::MAX));
    let options = OpenOptions {
        preallocation: budget.clone(),
        ..Default::default()
    };
    (
        Log::open_with(dir, small_config(), options).unwrap(),
        budget,
    )
}

#[test]
fn given_roll_when_segment_sealed_should_give_its_reservation_back() {
    let dir = tempfile::tempdir().unwrap();
    let (log, budget) = log_with_own_budget(dir.path());
    while log.info().segments < 2 {
        log.append(&make_batch(4, 1000, 1, 1)).unwrap();
    }
    let sealed = SegmentName::appended(0).log(dir.path());
    assert_eq!(blocks_past_end(&sealed), 0);
    let ahead = budget.reserved();
    assert!(
        ahead <= small_config().preallocate_bytes,
        "only the active segment's chunk is counted: {ahead}"
    );
}

/// A reservation that fails keeps nothing; on a full disk the append retries without the chunk
/// ahead, and fails cleanly (not poisoned, budget returned) when even that does not fit.
#[test]
fn given_failed_reservation_should_release_it_and_retry_without_the_chunk_ahead() {
    let dir = tempfile::tempdir().unwrap();
    let faults = FaultInjector::new();
    let budget = Arc::new(Preallocation::default());
    let options = OpenOptions {
        opener: Arc::new(faults.clone()),
        preallocation: budget.clone(),
        ..Default::default()
    };
    let log = Log::open_with(dir.path(), small_config(), options).unwrap();
    faults.fail(FaultKind::Allocate, 1, libc::ENOSPC);
    log.append(&make_batch(1, 10, 1, 1))
        .expect("the batch alone fits after the chunk did not");
    assert_eq!(
        budget.reserved(),
        0,
        "nothing is reserved ahead after a failure"
    );
    faults.fail_always(FaultKind::Allocate, libc::ENOSPC);
    let big = make_batch(1, 15 * 1024, 1, 2);
    let error = log.append(&big).unwrap_err();
    assert!(matches!(error, LogError::NoSpace { .. }), "{error}");
    assert!(error.to_string().contains(&*dir.path().to_string_lossy()));
    assert!(!log.is_poisoned());
    assert_eq!(budget.reserved(), 0);
    faults.clear();
    assert_eq!(
        log.append(&big).unwrap().base_offset,
        1,
        "resumes by itself"
    );
}

#[test]
fn given_caller_holding_the_lock_when_opened_should_take_no_lock_file() {
    let dir = tempfile::tempdir().unwrap();
    let unlocked = OpenOptions {
        lock_dir: false,
        ..Default::default()
    };
    let log = Log::open_with(dir.path(), small_config(), unlocked).unwrap();
    assert!(!dir.path().join(".lock").exists());
    drop(log);
    let _locked = Log::open(dir.path(), small_config()).unwrap();
    assert!(matches!(
        Log::open(dir.path(), small_config()),
        Err(LogError::Locked { .. })
    ));
}

#[test]
fn given_idle_log_when_asked_should_give_its_reservation_back() {
    let dir = tempfile::tempdir().unwrap();
    let (log, budget) = log_with_own_budget(dir.path());
    log.append(&make_batch(1, 10, 1, 1)).unwrap();
    log.release_idle_reservation();
    assert!(budget.reserved() > 0, "a log that just reserved keeps it");
    let Some(long_ago) = Instant::now().checked_sub(preallocate::SHRINK_AFTER * 2) else {
        return; // the monotonic clock started less than a minute ago
    };
    log.writer.lock().chunk = preallocate::ChunkSize::reserved_at(long_ago);
    log.release_idle_reservation();
    assert_eq!(budget.reserved(), 0, "an idle log gives it back");
    let segment = SegmentName::appended(0).log(dir.path());
    assert_eq!(blocks_past_end(&segment), 0);
    assert_eq!(log.append(&make_batch(1, 10, 1, 2)).unwrap().base_offset, 1);
}

pub(crate) mod epoch;
mod truncate;
mod visibility;
