//! Golden on-disk fixtures: log directories written by format version 1 (checked in under
//! `tests/fixtures/log-v1/`) that every later version must still open and read identically, plus
//! damaged copies (a torn tail, a bit flip in a sealed segment) that must keep being handled the
//! same way. Regenerate only on a deliberate format change:
//! `SYNCLINE_REGENERATE_FIXTURES=1 cargo test --test log_fixtures`.

use std::path::{Path, PathBuf};

use syncline_broker::log::{Log, LogConfig, LogError};
use syncline_proto::batch::{BatchBuilder, BatchHeader};

/// The config the fixtures were written with: 64 KiB segments so 80 batches span two segments.
fn config() -> LogConfig {
    LogConfig {
        segment_bytes_max: 64 * 1024,
        batch_bytes_max: 16 * 1024,
        index_interval_bytes: 1024,
        ..LogConfig::default()
    }
}

const BATCHES: u64 = 80;

/// Batch `i` of the fixture: `1 + i % 3` records with ~1 KiB values, fixed timestamps.
fn fixture_batch(i: u64) -> bytes::Bytes {
    let mut builder = BatchBuilder::new();
    for r in 0..(1 + i % 3) {
        let key = format!("key-{i}-{r}");
        let value = vec![(i * 7 + r) as u8; 1000];
        builder.push(
            1_700_000_000_000 + (i * 10 + r) as i64,
            Some(key.as_bytes()),
            Some(&value),
            &[("origin", b"fixture")],
        );
    }
    builder.finish().expect("fixture batch")
}

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/log-v1")
}

fn regenerate(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
    let log = Log::open(dir, config()).expect("open");
    for i in 0..BATCHES {
        log.append(&fixture_batch(i)).expect("append");
    }
    log.close().expect("close");
    drop(log);
    std::fs::remove_file(dir.join(".lock")).expect("remove lock");
}

/// Copies the checked-in fixture to a temp dir (opening a log may modify it).
fn copy_fixture() -> tempfile::TempDir {
    let source = fixture_dir();
    if std::env::var_os("SYNCLINE_REGENERATE_FIXTURES").is_some() {
        regenerate(&source);
    }
    let target = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(&source).expect("fixture dir exists") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), target.path().join(entry.file_name())).expect("copy");
    }
    target
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    out.sort();
    out
}

/// Reads every batch and checks it against `fixture_batch` (payload bytes and offsets).
fn assert_reads_fixture(log: &Log, batches: u64) {
    let mut next = 0;
    let mut offset = 0;
    for i in 0..batches {
        let read = log.read(next, 1).expect("read");
        let header = BatchHeader::parse(&read.bytes).expect("header");
        assert_eq!(header.base_offset, offset, "batch {i}");
        let expected = fixture_batch(i);
        assert!(read.bytes[16..] == expected[16..], "batch {i} differs");
        offset += 1 + i % 3;
        next = read.next_offset;
    }
    assert_eq!(log.end_offset(), offset);
}

#[test]
fn given_v1_fixture_when_opened_should_read_every_batch_identically() {
    let dir = copy_fixture();
    assert!(
        segments(dir.path()).len() >= 2,
        "fixture must span segments"
    );
    let log = Log::open(dir.path(), config()).expect("open fixture");
    assert!(log.recovery_report().clean, "fixture was closed cleanly");
    assert_reads_fixture(&log, BATCHES);
    assert_eq!(
        log.offset_for_timestamp(1_700_000_000_405)
            .expect("time lookup"),
        Some(81)
    );
}

#[test]
fn given_v1_fixture_without_marker_when_opened_should_scan_and_agree() {
    let dir = copy_fixture();
    std::fs::remove_file(dir.path().join(".clean-shutdown")).expect("marker");
    let log = Log::open(dir.path(), config()).expect("open fixture");
    assert!(!log.recovery_report().clean);
    assert_eq!(
        log.recovery_report().indexes_rebuilt,
        0,
        "checked-in indexes must be exact"
    );
    assert_reads_fixture(&log, BATCHES);
}

#[test]
fn given_v1_fixture_with_torn_tail_should_truncate_last_batch_only() {
    let dir = copy_fixture();
    std::fs::remove_file(dir.path().join(".clean-shutdown")).expect("marker");
    let last = segments(dir.path()).pop().expect("segment");
    let len = std::fs::metadata(&last).expect("meta").len();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&last)
        .expect("open");
    file.set_len(len - 500).expect("tear");
    drop(file);
    // The fixture's recovery point is its end; a torn tail past a stale point is what a crash
    // leaves, so move the point back to the start of the last segment like a roll would.
    let base: u64 = last
        .file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| s.parse().ok())
        .expect("base");
    let mut point = b"SLRP".to_vec();
    point.extend_from_slice(&base.to_le_bytes());
    let crc = crc32c(&point);
    point.extend_from_slice(&crc.to_le_bytes());
    std::fs::write(dir.path().join("recovery-point"), point).expect("recovery point");
    let log = Log::open(dir.path(), config()).expect("open torn fixture");
    assert!(log.recovery_report().bytes_truncated > 0);
    assert_reads_fixture(&log, BATCHES - 1);
}

#[test]
fn given_v1_fixture_with_flipped_bit_in_sealed_segment_should_refuse_to_open() {
    let dir = copy_fixture();
    std::fs::remove_file(dir.path().join(".clean-shutdown")).expect("marker");
    let first = segments(dir.path()).remove(0);
    let mut data = std::fs::read(&first).expect("read");
    data[5000] ^= 0x10;
    std::fs::write(&first, data).expect("write");
    let error = Log::open(dir.path(), config()).expect_err("must refuse");
    assert!(
        matches!(&error, LogError::Corrupt { file, .. } if *file == first),
        "{error}"
    );
}

/// CRC-32C (Castagnoli), bitwise: independent of the crate the log uses.
fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for byte in bytes {
        crc ^= u32::from(*byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}
