//! A log's image: the files another node needs to hold the same log (the replication layer's
//! catch-up by snapshot), how a received image is checked, and how it replaces a log's files.
//!
//! ## What an image is
//! A directory holding, for a log that ends at `end_offset`:
//! ```text
//! <base:020>[-<gen:010>].log   every segment of the log, named as in the log (generation
//!                              included), in offset order; only its first `len` bytes belong
//!                              to the image (the active segment is linked whole)
//! segments.manifest            the log's compaction manifest (manifest.rs), always present
//! ```
//! with a list of `(name, len)` ([`LogImage::files`]). Indexes are not part of it: they are
//! hints that the receiver rebuilds while it verifies the image.
//!
//! ## Export (the sending side)
//! [`Log::export_image`] holds the compaction lock (no pass swaps segments or rewrites the
//! manifest meanwhile) and the writer (no append, roll or retention), hard-links every segment
//! file into the image directory and records each one's length, and writes the manifest from
//! memory. The image is consistent with `end_offset` as the log stood under those locks, and
//! stays so afterwards, because the log never changes bytes below a segment's written end in
//! place: appends go past it, truncation and compaction write new files and rename them over,
//! retention unlinks whole files (a hard link keeps the inode). Cost: one link per segment.
//!
//! ## Verify (the receiving side)
//! [`verify_image`] writes a recovery point equal to the expected end into the received
//! directory and opens it as a log: every batch of every segment is scanned (framing,
//! contiguous offsets, leader epochs that never go down, CRC-32C), and with the recovery point
//! at the end any damage is interior corruption ([`LogError::Corrupt`]), never a torn tail that
//! would be cut silently. A log that ends anywhere but the expected end is refused. The open
//! writes the indexes; a clean close leaves the clean-shutdown marker and the recovery point, so
//! that the log opens from its new place without a second scan.
//!
//! ## Replace
//! [`replace_files`] makes a log directory hold exactly a verified image's files: it deletes
//! every file the log owns there that the image does not have, then renames the image's files
//! in (over any of the same name) and fsyncs the directory. Files the log does not own (its
//! `.lock`, other layers' files and directories) are left alone. It is idempotent: after a
//! crash anywhere in it, running it again with the same list finishes it (a file is in the
//! image directory or already moved, never lost: rename is atomic). The caller records that a
//! replace is under way (with the list) before it starts, so a crash is followed by the same
//! call at the next open, before the log opens; the log must be closed while it runs.

use std::path::Path;

use super::checkpoint::{self, CLEAN_MARKER_FILE, RECOVERY_POINT_FILE};
use super::manifest::MANIFEST_FILE;
use super::segment::SegmentName;
use super::{file, Log, LogConfig, LogError, OpenOptions};

/// One file of an image: its name in the log directory and the bytes of it the image holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFile {
    /// The file name (a segment's `.log` or `segments.manifest`).
    pub name: String,
    /// Bytes from its start that belong to the image.
    pub len: u64,
}

/// What [`Log::export_image`] linked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogImage {
    /// The log's end offset the image ends at.
    pub end_offset: u64,
    /// The log's start offset (base of its first segment).
    pub start_offset: u64,
    /// The files in offset order, the manifest last.
    pub files: Vec<ImageFile>,
}

impl LogImage {
    /// Bytes of all its files.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.len).sum()
    }
}

/// True for a name the log owns in its directory: segments and their indexes, the manifest,
/// the recovery point, the clean-shutdown marker, and temp files.
pub fn is_log_file(name: &str) -> bool {
    if name.contains('/') || name.contains('\0') {
        return false;
    }
    if [MANIFEST_FILE, RECOVERY_POINT_FILE, CLEAN_MARKER_FILE].contains(&name) {
        return true;
    }
    if name.ends_with(".tmp") {
        return true;
    }
    match name.split_once('.') {
        Some((stem, "log" | "index" | "timeindex")) => SegmentName::parse(stem).is_some(),
        _ => false,
    }
}

/// True for a name an image may ship: a segment's `.log` or the manifest.
pub fn is_image_file(name: &str) -> bool {
    name == MANIFEST_FILE
        || name
            .strip_suffix(".log")
            .is_some_and(|stem| SegmentName::parse(stem).is_some())
}

impl Log {
    /// Hard-links every segment of the log into `into` (a new directory on the same file system)
    /// and writes the manifest there: an image of the log as it ends now (see the module doc).
    /// The caller keeps appends away for the end offset to mean what it expects (the
    /// replication layer holds its state machine).
    pub fn export_image(&self, into: &Path) -> Result<LogImage, LogError> {
        let _one_pass = self.compact_lock.lock();
        let writer = self.writer.lock();
        self.check_writable()?;
        let segments = self.segments.read().clone();
        let manifest = self.manifest.lock().clone();
        std::fs::create_dir(into).map_err(|e| LogError::io("creating", into, e))?;
        let mut files = Vec::with_capacity(segments.len() + 1);
        for segment in segments.iter() {
            let name = format!("{}.log", segment.name().stem());
            let target = into.join(&name);
            std::fs::hard_link(&segment.path, &target)
                .map_err(|e| LogError::io("linking a segment into an image at", &target, e))?;
            files.push(ImageFile {
                name,
                len: segment.len(),
            });
        }
        let manifest_bytes = manifest.encode();
        let path = into.join(MANIFEST_FILE);
        std::fs::write(&path, &manifest_bytes).map_err(|e| LogError::io("writing", &path, e))?;
        files.push(ImageFile {
            name: MANIFEST_FILE.to_string(),
            len: manifest_bytes.len() as u64,
        });
        let image = LogImage {
            end_offset: self.end_offset(),
            start_offset: segments.first().map_or(0, |s| s.base_offset),
            files,
        };
        drop(writer);
        Ok(image)
    }
}

/// Checks a received image in `dir` (see the module doc): opens it as a log with `config`,
/// every batch scanned, and refuses it unless it ends exactly at `end_offset`; then closes it
/// cleanly (indexes written, clean-shutdown marker). Returns the log's start offset.
pub fn verify_image(dir: &Path, config: LogConfig, end_offset: u64) -> Result<u64, LogError> {
    // Anything below the recovery point counts as fsync'd: damage anywhere is corruption, and
    // a log that ends below it is refused by the open itself.
    checkpoint::write_recovery_point(dir, end_offset)
        .map_err(|e| LogError::io("writing the recovery point in", dir, e))?;
    let _ = std::fs::remove_file(dir.join(CLEAN_MARKER_FILE));
    let options = OpenOptions {
        lock_dir: false,
        ..OpenOptions::default()
    };
    let log = Log::open_with(dir, config, options)?;
    if log.recovery_report().clean {
        return Err(LogError::Corrupt {
            file: dir.to_path_buf(),
            position: 0,
            offset: 0,
            reason: "an image must be scanned, but its log opened as cleanly closed".into(),
        });
    }
    let end = log.end_offset();
    if end != end_offset {
        return Err(LogError::Corrupt {
            file: dir.to_path_buf(),
            position: 0,
            offset: end,
            reason: format!("the image's log ends at offset {end}, not at {end_offset}"),
        });
    }
    let start = log.start_offset();
    log.close()?;
    Ok(start)
}

/// The files of a verified image directory that go into the log directory (every file the log
/// owns there), sorted.
pub fn image_files(dir: &Path) -> Result<Vec<String>, LogError> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| LogError::io("listing", dir, e))? {
        let entry = entry.map_err(|e| LogError::io("listing", dir, e))?;
        if let Some(name) = entry.file_name().to_str().filter(|n| is_log_file(n)) {
            if !name.ends_with(".tmp") {
                names.push(name.to_string());
            }
        }
    }
    names.sort();
    Ok(names)
}

/// Makes `dir` hold exactly the log files `names` from `staged` (see the module doc);
/// idempotent. The log of `dir` must be closed.
pub fn replace_files(dir: &Path, staged: &Path, names: &[String]) -> Result<(), LogError> {
    if let Some(bad) = names.iter().find(|n| !is_log_file(n)) {
        return Err(LogError::Corrupt {
            file: staged.join(bad),
            position: 0,
            offset: 0,
            reason: "not a log file name".into(),
        });
    }
    for entry in std::fs::read_dir(dir).map_err(|e| LogError::io("listing", dir, e))? {
        let entry = entry.map_err(|e| LogError::io("listing", dir, e))?;
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if is_log_file(&name) && !names.contains(&name) {
            let path = entry.path();
            std::fs::remove_file(&path).map_err(|e| LogError::io("removing", &path, e))?;
        }
    }
    for name in names {
        let from = staged.join(name);
        let to = dir.join(name);
        match std::fs::rename(&from, &to) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && to.exists() => {}
            Err(e) => return Err(LogError::io("moving an image file into place", from, e)),
        }
    }
    file::sync_dir(dir).map_err(|e| LogError::io("syncing", dir, e))
}

#[cfg(test)]
mod tests {
    use super::super::tests::{make_batch, small_config};
    use super::*;

    fn filled(dir: &Path, batches: u8) -> Log {
        let log = Log::open(dir, small_config()).unwrap();
        for seed in 0..batches {
            log.append(&make_batch(20, 200, 1_000, seed)).unwrap();
        }
        log
    }

    fn copy_image(image_dir: &Path, image: &LogImage, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for file in &image.files {
            let bytes = std::fs::read(image_dir.join(&file.name)).unwrap();
            std::fs::write(to.join(&file.name), &bytes[..file.len as usize]).unwrap();
        }
    }

    fn all_batches(log: &Log) -> Vec<u8> {
        let mut out = Vec::new();
        let mut offset = log.start_offset();
        while offset < log.end_offset() {
            let read = log.read_up_to(offset, 1 << 20, log.end_offset()).unwrap();
            if read.bytes.is_empty() {
                break;
            }
            out.extend_from_slice(&read.bytes);
            offset = read.next_offset;
        }
        out
    }

    #[test]
    fn given_a_log_of_several_segments_when_exported_and_verified_should_hold_the_same_batches() {
        let root = tempfile::tempdir().unwrap();
        let log = filled(&root.path().join("source"), 60);
        assert!(log.info().segments > 2, "{:?}", log.info());
        let image_dir = root.path().join("image");
        let image = log.export_image(&image_dir).unwrap();
        assert_eq!(image.end_offset, log.end_offset());
        assert_eq!(image.files.last().unwrap().name, MANIFEST_FILE);
        // Appends after the export do not change the image.
        log.append(&make_batch(5, 10, 2_000, 99)).unwrap();
        let received = root.path().join("received");
        copy_image(&image_dir, &image, &received);
        assert_eq!(
            verify_image(&received, small_config(), image.end_offset).unwrap(),
            0
        );
        let copy = Log::open(&received, small_config()).unwrap();
        assert!(
            copy.recovery_report().clean,
            "verified images close cleanly"
        );
        assert_eq!(copy.end_offset(), image.end_offset);
        let original = all_batches(&log);
        let copied = all_batches(&copy);
        assert_eq!(copied[..], original[..copied.len()]);
    }

    #[test]
    fn given_an_image_with_a_flipped_bit_when_verified_should_be_refused_as_corrupt() {
        let root = tempfile::tempdir().unwrap();
        let log = filled(&root.path().join("source"), 30);
        let image_dir = root.path().join("image");
        let image = log.export_image(&image_dir).unwrap();
        let received = root.path().join("received");
        copy_image(&image_dir, &image, &received);
        // A bit in the middle of the last segment (a torn tail, were it not verified).
        let last = &image.files[image.files.len() - 2];
        let path = received.join(&last.name);
        let mut bytes = std::fs::read(&path).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x10;
        std::fs::write(&path, &bytes).unwrap();
        let error = verify_image(&received, small_config(), image.end_offset).unwrap_err();
        assert!(matches!(error, LogError::Corrupt { .. }), "{error}");
    }

    #[test]
    fn given_an_image_that_ends_early_or_late_when_verified_should_be_refused() {
        let root = tempfile::tempdir().unwrap();
        let log = filled(&root.path().join("source"), 10);
        let image_dir = root.path().join("image");
        let image = log.export_image(&image_dir).unwrap();
        for claimed in [image.end_offset + 1, image.end_offset - 20] {
            let received = root.path().join(format!("received-{claimed}"));
            copy_image(&image_dir, &image, &received);
            let error = verify_image(&received, small_config(), claimed).unwrap_err();
            assert!(matches!(error, LogError::Corrupt { .. }), "{error}");
        }
    }

    #[test]
    fn given_a_replace_interrupted_anywhere_when_run_again_should_leave_exactly_the_image() {
        let root = tempfile::tempdir().unwrap();
        let source = filled(&root.path().join("source"), 40);
        let image_dir = root.path().join("image");
        let image = source.export_image(&image_dir).unwrap();
        let received = root.path().join("received");
        copy_image(&image_dir, &image, &received);
        verify_image(&received, small_config(), image.end_offset).unwrap();
        let names = image_files(&received).unwrap();
        for stop_after in 0..names.len() {
            let target = root.path().join(format!("target-{stop_after}"));
            let old = filled(&target, 3);
            old.close().unwrap();
            drop(old);
            std::fs::write(target.join("other-layer.json"), b"{}").unwrap();
            let staged = root.path().join(format!("staged-{stop_after}"));
            copy_dir(&received, &staged);
            // A crash after `stop_after` renames.
            for name in &names[..stop_after] {
                std::fs::rename(staged.join(name), target.join(name)).unwrap();
            }
            replace_files(&target, &staged, &names).unwrap();
            replace_files(&target, &staged, &names).unwrap();
            let mut held: Vec<String> = std::fs::read_dir(&target)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_str().unwrap().to_string())
                .filter(|n| is_log_file(n))
                .collect();
            held.sort();
            assert_eq!(held, names);
            assert!(target.join("other-layer.json").exists());
            let log = Log::open(&target, small_config()).unwrap();
            assert_eq!(log.end_offset(), image.end_offset);
            assert!(log.recovery_report().clean);
        }
    }

    /// Drops every record below `cutoff` (as if a later version of its key existed).
    struct DropBelow(u64);

    impl crate::log::CompactionFilter for DropBelow {
        fn decide(
            &self,
            batch: &syncline_proto::batch::Batch,
            _tombstones_expired: bool,
            out: &mut Vec<crate::log::Verdict>,
        ) -> Result<(), String> {
            for record in batch.records() {
                let record = record.map_err(|e| e.to_string())?;
                out.push(if record.offset < self.0 {
                    crate::log::Verdict::Superseded
                } else {
                    crate::log::Verdict::Keep
                });
            }
            Ok(())
        }
        fn keep_whole(&self, _header: &syncline_proto::batch::BatchHeader) -> bool {
            false
        }
        fn limit(&self) -> u64 {
            u64::MAX
        }
        fn tombstones_removed(&self, _removed: &[(bytes::Bytes, u64)]) {}
    }

    #[test]
    fn given_a_compacted_log_when_exported_and_verified_should_keep_its_generations_and_manifest() {
        let root = tempfile::tempdir().unwrap();
        let log = filled(&root.path().join("source"), 60);
        log.sync().unwrap();
        let cutoff = log.end_offset() / 2;
        let outcome = log
            .compact(
                &DropBelow(cutoff),
                &crate::log::CompactOptions {
                    roll: true,
                    delete_retention_ms: u64::MAX,
                    ..Default::default()
                },
            )
            .unwrap();
        assert!(outcome.records_removed > 0, "{outcome:?}");
        log.append(&make_batch(5, 10, 2_000, 99)).unwrap();
        let image_dir = root.path().join("image");
        let image = log.export_image(&image_dir).unwrap();
        assert!(
            image.files.iter().any(|f| f.name.contains('-')),
            "compacted segments ship under their generation: {:?}",
            image.files
        );
        let received = root.path().join("received");
        copy_image(&image_dir, &image, &received);
        verify_image(&received, small_config(), image.end_offset).unwrap();
        let copy = Log::open(&received, small_config()).unwrap();
        assert_eq!(all_batches(&copy), all_batches(&log));
        assert_eq!(copy.compaction_horizon(), log.compaction_horizon());
        assert_eq!(
            copy.compaction_info().bytes_reclaimed,
            log.compaction_info().bytes_reclaimed
        );
    }

    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }

    #[test]
    fn given_names_should_tell_log_files_from_others() {
        assert!(is_log_file("00000000000000000000.log"));
        assert!(is_log_file("00000000000000000100-0000000002.index"));
        assert!(is_log_file("segments.manifest"));
        assert!(is_log_file("recovery-point"));
        assert!(!is_log_file(".lock"));
        assert!(!is_log_file("raft"));
        assert!(!is_log_file("state.snapshot"));
        assert!(!is_log_file("../00000000000000000000.log"));
        assert!(is_image_file("00000000000000000000.log"));
        assert!(!is_image_file("00000000000000000000.index"));
        assert!(!is_image_file("recovery-point"));
    }
}
