use super::*;
use crate::log::LogConfig;

fn keyed(key: &str, value: &str) -> Bytes {
    let mut builder = BatchBuilder::new();
    builder.push(1, Some(key.as_bytes()), Some(value.as_bytes()), &[]);
    builder.finish().unwrap()
}

fn put(key: &str, value: Option<&str>) -> PlainRecord {
    PlainRecord {
        key: Some(Bytes::copy_from_slice(key.as_bytes())),
        value: value.map(|v| Bytes::copy_from_slice(v.as_bytes())),
        headers: Vec::new(),
        timestamp_ms: 1,
    }
}

/// A one-partition table (every key maps to partition 0) over a fresh log in `dir`.
fn table(dir: &std::path::Path, is_table: bool) -> Partition {
    let log = Log::open(dir, LogConfig::default()).unwrap();
    Partition::open(
        Arc::from("t"),
        0,
        1,
        log,
        is_table,
        crate::topic::ProducerEpochs::default(),
    )
}

/// Walks `plan` and returns (offset, key, value) of every record handed over.
fn walk(
    partition: &Partition,
    plan: &SnapshotPlan,
) -> Result<Vec<(u64, String, String)>, BrokerError> {
    let mut out = Vec::new();
    partition.walk_snapshot(plan, 64, |record| {
        out.push((
            record.offset,
            String::from_utf8(record.key.unwrap_or_default().to_vec()).unwrap(),
            String::from_utf8(record.value.unwrap_or_default().to_vec()).unwrap(),
        ));
        ControlFlow::Continue(())
    })?;
    Ok(out)
}

#[tokio::test]
async fn given_puts_and_deletes_snapshot_should_collect_live_keys_only_below_h() {
    let dir = tempfile::tempdir().unwrap();
    let partition = table(dir.path(), true);
    // a@0 b@1 a@2 c@3 (c deleted @4) d@5..d@44 (one batch of 40 versions) e@45 (deleted @46)
    for record in [
        put("a", Some("a0")),
        put("b", Some("b1")),
        put("a", Some("a2")),
        put("c", Some("c3")),
        put("c", None),
    ] {
        partition.append_records(&[record], None, &[], 1).unwrap();
    }
    let versions: Vec<PlainRecord> = (5..45).map(|i| put("d", Some(&format!("d{i}")))).collect();
    partition.append_records(&versions, None, &[], 1).unwrap();
    partition
        .append_records(&[put("e", Some("e45")), put("e", None)], None, &[], 1)
        .unwrap();
    let plan = partition.begin_snapshot().unwrap();
    assert_eq!(plan.high_watermark, 47);
    assert_eq!(plan.offsets, vec![1, 2, 44]);
    // A small read size makes the walk jump over the superseded versions of d.
    assert_eq!(
        walk(&partition, &plan).unwrap(),
        vec![
            (1, "b".to_string(), "b1".to_string()),
            (2, "a".to_string(), "a2".to_string()),
            (44, "d".to_string(), "d44".to_string()),
        ]
    );
    // Appends after the plan was taken are not in it.
    partition
        .append_records(&[put("f", Some("f47"))], None, &[], 1)
        .unwrap();
    assert_eq!(walk(&partition, &plan).unwrap().len(), 3);
    assert_eq!(
        partition.begin_snapshot().unwrap().offsets,
        vec![1, 2, 44, 47]
    );
}

#[tokio::test]
async fn given_a_snapshot_in_progress_should_hold_its_pin_until_the_plan_drops() {
    let dir = tempfile::tempdir().unwrap();
    let partition = table(dir.path(), true);
    partition
        .append_records(&[put("a", Some("1")), put("b", Some("2"))], None, &[], 1)
        .unwrap();
    assert_eq!(partition.oldest_pin(), None);
    let plan = partition.begin_snapshot().unwrap();
    assert_eq!(partition.oldest_pin(), Some(2));
    let mut pins_seen = Vec::new();
    partition
        .walk_snapshot(&plan, 1024, |_| {
            pins_seen.push(partition.oldest_pin());
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(pins_seen, vec![Some(2), Some(2)]);
    partition
        .append_records(&[put("c", Some("3"))], None, &[], 1)
        .unwrap();
    let later = partition.begin_snapshot().unwrap();
    assert_eq!(partition.oldest_pin(), Some(2), "the oldest pin wins");
    drop(plan);
    assert_eq!(partition.oldest_pin(), Some(3));
    drop(later);
    assert_eq!(partition.oldest_pin(), None);
}

#[tokio::test]
async fn given_an_empty_table_snapshot_should_be_empty_at_the_log_end() {
    let dir = tempfile::tempdir().unwrap();
    let partition = table(dir.path(), true);
    let plan = partition.begin_snapshot().unwrap();
    assert_eq!((plan.high_watermark, plan.offsets.len()), (0, 0));
    assert_eq!(walk(&partition, &plan).unwrap(), vec![]);
}

#[tokio::test]
async fn given_a_plain_topic_snapshot_should_be_refused_as_not_a_table() {
    let dir = tempfile::tempdir().unwrap();
    let partition = table(dir.path(), false);
    assert!(matches!(
        partition.begin_snapshot(),
        Err(BrokerError::NotATable { .. })
    ));
    assert_eq!(partition.oldest_pin(), None);
}

#[tokio::test]
async fn given_an_index_naming_a_delete_or_a_missing_record_walk_should_fail_not_skip() {
    let dir = tempfile::tempdir().unwrap();
    let partition = table(dir.path(), true);
    partition
        .append_records(&[put("a", Some("1")), put("a", None)], None, &[], 1)
        .unwrap();
    // Plans as a broken index would produce them: offset 1 is a delete; offset 2 is not in
    // the log below H.
    let delete = SnapshotPlan {
        high_watermark: 2,
        offsets: vec![0, 1],
        _pin: partition.pin(2),
    };
    let error = walk(&partition, &delete).unwrap_err();
    assert!(
        matches!(error, BrokerError::SnapshotInconsistent { offset: 1, .. }),
        "{error}"
    );
    let missing = SnapshotPlan {
        high_watermark: 2,
        offsets: vec![0, 2],
        _pin: partition.pin(2),
    };
    let error = walk(&partition, &missing).unwrap_err();
    assert!(
        matches!(error, BrokerError::SnapshotInconsistent { offset: 2, .. }),
        "{error}"
    );
    assert!(error.to_string().contains("topic `t`"), "{error}");
}

#[test]
fn given_snapshot_ahead_of_the_log_should_discard_it_and_rebuild_from_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), LogConfig::default()).unwrap();
    log.append(&keyed("a", "1")).unwrap();
    log.append(&keyed("b", "2")).unwrap();
    log.sync().unwrap();
    // A snapshot that claims more than the log holds (its tail was lost in a crash).
    let mut stale = PartitionState {
        index: Some(KeyIndex::default()),
        applied_offset: 100,
        ..Default::default()
    };
    if let Some(index) = stale.index.as_mut() {
        index.set(b"ghost", 50, false);
    }
    stale.save(dir.path()).unwrap();
    let live = restore_state(&log, true).unwrap();
    assert!(
        !dir.path().join("state.snapshot").exists(),
        "a stale snapshot is deleted"
    );
    let index = live.index.unwrap();
    assert_eq!(index.get(b"ghost"), None);
    assert_eq!(index.get(b"b").map(|s| s.offset), Some(1));
    assert_eq!(live.applied_offset, 2);
}

#[tokio::test]
async fn given_many_rounds_of_updates_when_compacted_should_drop_superseded_records() {
    many_rounds_compacted(true).await;
}

/// Regression: every key's latest version sat in the active segment, not yet durable, and
/// the pass kept every older version (the background cleaner on a busy table reclaimed
/// nothing). Versions superseded inside the sealed, durable segments must go anyway.
#[tokio::test]
async fn given_latest_versions_not_yet_durable_when_compacted_should_still_drop_superseded_records()
{
    many_rounds_compacted(false).await;
}

async fn many_rounds_compacted(sync_first: bool) {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        segment_bytes_max: 64 * 1024,
        batch_bytes_max: 64 * 1024,
        // No group commit in between: only rolls make data durable.
        fsync: crate::log::FsyncPolicy::IntervalMs(3_600_000),
        ..LogConfig::default()
    };
    let log = Log::open(dir.path(), config).unwrap();
    let partition = Partition::open(
        Arc::from("t"),
        0,
        1,
        log,
        true,
        crate::topic::ProducerEpochs::default(),
    );
    let value = "x".repeat(1000);
    for round in 0..30 {
        let records: Vec<PlainRecord> = (0..30)
            .map(|k| PlainRecord {
                key: Some(Bytes::from(format!("k{k}"))),
                value: Some(Bytes::from(format!("{round}{value}"))),
                headers: Vec::new(),
                timestamp_ms: 1,
            })
            .collect();
        partition.append_records(&records, None, &[], 1).unwrap();
    }
    let log = partition.log().unwrap().clone();
    if sync_first {
        log.sync().unwrap();
    }
    assert_eq!(
        log.durable_offset() < log.end_offset(),
        !sync_first,
        "the last round is durable only when synced"
    );
    let outcome = partition
        .compact(&CompactOptions {
            delete_retention_ms: u64::MAX / 2,
            ..Default::default()
        })
        .unwrap();
    assert!(outcome.segments_before > 5, "{outcome:?}");
    assert!(
        outcome.bytes_after * 10 < outcome.bytes_before,
        "{outcome:?}"
    );
}

#[tokio::test]
async fn given_state_snapshot_older_than_a_dropped_delete_when_restored_should_not_resurrect_the_key(
) {
    let dir = tempfile::tempdir().unwrap();
    let partition = table(dir.path(), true);
    // f@0 fills the segment's first batch (the placeholder a pass always keeps), so the
    // pass can drop both k@1 (superseded) and the delete k@2 (expired at once).
    partition
        .append_records(&[put("f", Some("f0"))], None, &[], 1)
        .unwrap();
    partition
        .append_records(&[put("k", Some("v1"))], None, &[], 1)
        .unwrap();
    // The state snapshot says k is live at 1.
    partition.checkpoint();
    partition
        .append_records(&[put("k", None)], None, &[], 1)
        .unwrap();
    let log = partition.log().unwrap().clone();
    log.sync().unwrap();
    let outcome = partition
        .compact(&CompactOptions {
            roll: true,
            delete_retention_ms: 0,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(outcome.tombstones_removed, 1, "{outcome:?}");
    // A crash before the next checkpoint: the restart finds the old state snapshot.
    let restored = restore_state(&log, true).unwrap();
    let index = restored.index.unwrap();
    assert!(
        index.get(b"k").is_none_or(|slot| slot.tombstone),
        "a deleted key came back: {:?}",
        index.get(b"k")
    );
    assert_eq!(index.live_offsets().collect::<Vec<_>>(), vec![0]);
}

#[test]
fn given_snapshot_behind_the_log_should_replay_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), LogConfig::default()).unwrap();
    log.append(&keyed("a", "1")).unwrap();
    log.sync().unwrap();
    let mut state = restore_state(&log, true).unwrap();
    state.save(dir.path()).unwrap();
    log.append(&keyed("a", "2")).unwrap();
    log.append(&keyed("c", "3")).unwrap();
    log.sync().unwrap();
    let live = restore_state(&log, true).unwrap();
    let index = live.index.unwrap();
    assert_eq!(index.get(b"a").map(|s| s.offset), Some(1));
    assert_eq!(index.get(b"c").map(|s| s.offset), Some(2));
}

#[tokio::test]
async fn given_client_batch_with_control_attribute_when_appended_should_refuse_and_append_nothing()
{
    let dir = tempfile::tempdir().unwrap();
    for is_table in [false, true] {
        let dir = dir.path().join(format!("table-{is_table}"));
        let partition = table(&dir, is_table);
        let mut builder = BatchBuilder::new().control();
        builder.push(1, Some(b"k"), Some(b"v"), &[]);
        let refused = partition.append_batch(builder.finish().unwrap(), &[]);
        assert!(
            matches!(&refused, Err(BrokerError::InvalidRequest(message)) if message.contains("reserved")),
            "{refused:?}"
        );
        let log = partition.log().unwrap();
        assert_eq!(log.info().end_offset, 0, "a refused batch was appended");
        if is_table {
            assert!(partition.latest(b"k").unwrap().is_none());
        }
        // The same batch without the bit is accepted.
        partition.append_batch(keyed("k", "v"), &[]).unwrap();
        assert_eq!(log.info().end_offset, 1);
    }
}
