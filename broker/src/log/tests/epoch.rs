//! Leader epochs: `append_batch_at` stamps them, reads return them, they survive clean and
//! unclean reopens, and a batch whose epoch goes down is a torn tail or interior corruption.

use syncline_proto::batch::Batch;

use super::*;

/// Appends a 2-record batch at `epoch`; returns where it landed and its length in bytes.
pub(crate) fn append_at(log: &Log, epoch: u32, seed: u8) -> (Appended, usize) {
    let bytes = make_batch(2, 30, 1_000 + i64::from(seed), seed);
    let batch = Batch::parse(bytes.clone()).unwrap();
    (log.append_batch_at(&batch, epoch).unwrap(), bytes.len())
}

/// The leader epoch of every visible batch, in order.
pub(crate) fn epochs(log: &Log) -> Vec<u32> {
    read_all(log, log.start_offset())
        .iter()
        .map(|batch| BatchHeader::parse(batch).unwrap().leader_epoch)
        .collect()
}

const EPOCHS: [u32; 6] = [0, 0, 3, 3, 7, 7];

fn fill_epochs(log: &Log) -> Vec<usize> {
    let lengths = EPOCHS
        .iter()
        .enumerate()
        .map(|(i, epoch)| append_at(log, *epoch, i as u8).1)
        .collect();
    log.sync().unwrap();
    lengths
}

#[test]
fn given_epochs_stamped_when_read_should_return_them_in_the_header() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_config()).unwrap();
    fill_epochs(&log);
    assert_eq!(epochs(&log), EPOCHS);
    // `append` and `append_batch` stamp 0, which is below 7 now.
    assert!(matches!(
        log.append(&make_batch(1, 1, 1, 1)),
        Err(LogError::EpochRegressed {
            epoch: 0,
            last_epoch: 7,
            ..
        })
    ));
    let (appended, _) = append_at(&log, 9, 9);
    assert_eq!(appended.base_offset, 12, "a refused append assigns nothing");
}

#[test]
fn given_epochs_when_reopened_clean_or_after_crash_should_keep_them_and_refuse_lower() {
    for clean in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = Log::open(dir.path(), small_config()).unwrap();
            fill_epochs(&log);
            if clean {
                log.close().unwrap();
            }
        }
        let log = Log::open(dir.path(), small_config()).unwrap();
        assert_eq!(log.recovery_report().clean, clean);
        assert_eq!(epochs(&log), EPOCHS, "clean {clean}");
        let batch = Batch::parse(make_batch(1, 1, 1, 1)).unwrap();
        assert!(
            matches!(
                log.append_batch_at(&batch, 6),
                Err(LogError::EpochRegressed { last_epoch: 7, .. })
            ),
            "the last epoch is known after a {} open",
            if clean { "clean" } else { "recovering" }
        );
        assert_eq!(append_at(&log, 7, 1).0.base_offset, 12);
    }
}

#[test]
fn given_epochs_across_segments_when_reopened_should_carry_the_last_epoch_over_rolls() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = Log::open(dir.path(), small_config()).unwrap();
        append_at(&log, 4, 1);
        log.roll_now().unwrap();
        log.sync().unwrap();
    }
    // The active segment is empty: the last epoch comes from the sealed one.
    let log = Log::open(dir.path(), small_config()).unwrap();
    let batch = Batch::parse(make_batch(1, 1, 1, 1)).unwrap();
    assert!(matches!(
        log.append_batch_at(&batch, 3),
        Err(LogError::EpochRegressed { last_epoch: 4, .. })
    ));
}

/// Rewrites the leader epoch of the batch at byte `position` of `path`.
fn set_epoch(path: &Path, position: usize, epoch: u32) {
    let mut data = std::fs::read(path).unwrap();
    data[position + 12..position + 16].copy_from_slice(&epoch.to_le_bytes());
    std::fs::write(path, data).unwrap();
}

#[test]
fn given_decreasing_epoch_in_the_unsynced_tail_when_reopened_should_cut_it_as_torn() {
    let dir = tempfile::tempdir().unwrap();
    let lengths = {
        let log = Log::open(dir.path(), small_config()).unwrap();
        fill_epochs(&log)
    };
    // The recovery point is 0 (no close, no roll, no flusher): the batches may be torn.
    let last_start: usize = lengths[..5].iter().sum();
    set_epoch(&last_segment(dir.path()), last_start, 2);
    let log = Log::open(dir.path(), small_config()).unwrap();
    assert_eq!(log.end_offset(), 10);
    assert_eq!(log.recovery_report().bytes_truncated, lengths[5] as u64);
    assert_eq!(epochs(&log), EPOCHS[..5]);
}

#[test]
fn given_decreasing_epoch_below_the_recovery_point_when_reopened_should_refuse_as_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let lengths = {
        let log = Log::open(dir.path(), small_config()).unwrap();
        let lengths = fill_epochs(&log);
        log.close().unwrap();
        lengths
    };
    // Without the marker the open scans; the recovery point (12) says all of it was fsync'd.
    std::fs::remove_file(dir.path().join(".clean-shutdown")).unwrap();
    let position: usize = lengths[..4].iter().sum();
    set_epoch(&last_segment(dir.path()), position, 1);
    let error = Log::open(dir.path(), small_config()).unwrap_err();
    assert!(
        matches!(&error, LogError::Corrupt { offset: 8, reason, .. } if reason.contains("epoch")),
        "{error}"
    );
}

#[test]
fn given_first_batch_of_a_sealed_segment_below_the_previous_epoch_should_refuse_as_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = Log::open(dir.path(), small_config()).unwrap();
        append_at(&log, 5, 1);
        log.roll_now().unwrap();
        append_at(&log, 5, 2);
        log.roll_now().unwrap();
        append_at(&log, 6, 3);
        log.sync().unwrap();
    }
    let files = segment_files(dir.path());
    assert_eq!(files.len(), 3);
    set_epoch(&files[1], 0, 4);
    let error = Log::open(dir.path(), small_config()).unwrap_err();
    assert!(
        matches!(&error, LogError::Corrupt { file, .. } if *file == files[1]),
        "{error}"
    );
}
