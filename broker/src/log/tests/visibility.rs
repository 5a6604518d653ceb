//! Visibility modes: with `Published` only `publish` moves what readers see (not fsync), fsync
//! moves the synced offset that the recovery point persists, the flusher stays idle, and
//! retention stops at the lower of the two.

use std::time::Duration;

use futures_util::FutureExt as _;

use super::*;

fn published() -> OpenOptions {
    OpenOptions {
        visibility: Visibility::Published,
        ..OpenOptions::default()
    }
}

fn open_published(dir: &Path, config: LogConfig) -> Log {
    Log::open_with(dir, config, published()).unwrap()
}

#[test]
fn given_published_mode_when_synced_should_not_become_visible_until_published() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_published(dir.path(), small_config());
    let stored = fill(&log, 4, 10); // appends 12 offsets and syncs
    assert_eq!(log.synced_offset(), 12);
    assert_eq!(log.durable_offset(), 0, "fsync does not publish");
    assert!(log.read(0, 1 << 20).unwrap().bytes.is_empty());
    assert_eq!(log.offset_for_timestamp(0).unwrap(), None);

    assert_eq!(log.publish(6), 6);
    let read = log.read(0, 1 << 20).unwrap();
    assert_eq!((read.next_offset, read.high_watermark), (6, 6));
    assert_batches(&read_all(&log, 0), &stored[..2], "published prefix");
    assert_eq!(log.publish(3), 6, "publish never goes back");
    assert_eq!(log.publish(1_000), 12, "publish is clamped to the end");
    let info = log.info();
    assert_eq!((info.durable_offset, info.synced_offset), (12, 12));
    assert_batches(&read_all(&log, 0), &stored, "everything");
}

#[test]
fn given_published_mode_when_published_past_the_synced_offset_should_serve_it() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_published(dir.path(), small_config());
    let batch = make_batch(3, 10, 1, 1);
    log.append(&batch).unwrap();
    log.publish(3);
    assert_eq!((log.durable_offset(), log.synced_offset()), (3, 0));
    assert_eq!(read_all(&log, 0), vec![stamped(&batch, 0)]);
}

#[test]
fn given_synced_mode_when_published_should_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_config()).unwrap();
    log.append(&make_batch(3, 10, 1, 1)).unwrap();
    assert_eq!(
        log.publish(3),
        0,
        "in Synced mode only fsync makes batches visible"
    );
    log.sync().unwrap();
    assert_eq!(log.durable_offset(), 3);
}

#[test]
fn given_published_mode_waiters_should_wake_on_publish_not_on_fsync() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_published(dir.path(), small_config());
    let appended = log.append(&make_batch(3, 10, 1, 1)).unwrap();
    let mut changes = log.subscribe_durable();
    let mut wait = Box::pin(log.wait_durable(appended.durable_target()));
    assert!(wait.as_mut().now_or_never().is_none());
    log.sync().unwrap();
    assert!(
        wait.as_mut().now_or_never().is_none(),
        "fsync must not wake"
    );
    assert!(!changes.has_changed().unwrap());
    log.publish(appended.durable_target());
    assert_eq!(wait.now_or_never().unwrap().unwrap(), 3);
    assert!(changes.has_changed().unwrap());
    assert_eq!(*changes.borrow_and_update(), 3);
}

#[test]
fn given_published_mode_flusher_should_not_fsync_appends() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(open_published(dir.path(), small_config()));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let flusher = log.spawn_flusher();
        log.append(&make_batch(3, 10, 1, 1)).unwrap();
        // The flusher of a Published log ends at once; a Synced one would be fsyncing now.
        tokio::time::timeout(Duration::from_secs(10), flusher)
            .await
            .expect("the flusher of a Published log ends")
            .unwrap();
    });
    assert_eq!(log.stats().syncs.load(Ordering::Relaxed), 0);
    assert_eq!(log.synced_offset(), 0);
}

#[test]
fn given_published_past_synced_when_crashed_should_persist_only_the_synced_offset() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = open_published(dir.path(), small_config());
        fill(&log, 3, 10); // 9 offsets, synced: the recovery point says 9
        log.append(&make_batch(3, 10, 1, 1)).unwrap();
        log.publish(12);
        assert_eq!((log.durable_offset(), log.synced_offset()), (12, 9));
    }
    assert_eq!(
        checkpoint::read_recovery_point(dir.path()).unwrap(),
        Some(9),
        "the recovery point never claims more than was fsync'd"
    );
    // The unsynced batch is a tail recovery may cut; here the page cache kept it.
    let log = open_published(dir.path(), small_config());
    assert_eq!(log.end_offset(), 12);
    assert_eq!((log.durable_offset(), log.synced_offset()), (0, 12));
    assert!(log.read(0, 1 << 20).unwrap().bytes.is_empty());
    log.publish(12);
    assert_eq!(read_all(&log, 0).len(), 4);
}

#[test]
fn given_published_mode_when_rolled_should_sync_the_old_segment_but_not_publish() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_published(dir.path(), small_config());
    log.append(&make_batch(3, 10, 1, 1)).unwrap();
    log.roll_now().unwrap();
    assert_eq!((log.synced_offset(), log.durable_offset()), (3, 0));
    assert_eq!(
        checkpoint::read_recovery_point(dir.path()).unwrap(),
        Some(3)
    );
}

#[test]
fn given_published_mode_retention_should_stop_at_the_visible_offset() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        retention_bytes: Some(150 * 1024),
        ..small_config()
    };
    let log = open_published(dir.path(), config);
    fill(&log, 300, 1000);
    assert!(log.info().segments > 4);
    let outcome = log.enforce_retention().unwrap();
    assert_eq!(outcome.segments_deleted, 0, "nothing is visible yet");
    // Visible up to the middle: retention stops at the segment holding it.
    let middle = log.end_offset() / 2;
    log.publish(middle);
    let outcome = log.enforce_retention().unwrap();
    assert!(outcome.segments_deleted > 0);
    assert!(outcome.log_start_offset <= middle);
    log.publish(log.end_offset());
    assert!(log.enforce_retention().unwrap().log_start_offset > middle);
}
