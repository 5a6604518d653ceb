//! The segment manifest: which segment files make up the compacted prefix of a log.
//!
//! Appends write generation-0 segments (`<base>.log`). The cleaner (`compact.rs`) rewrites a
//! run of sealed segments into new files of the next generation (`<base>-<gen>.log`) and then
//! commits the swap by writing this manifest (temp file, fsync, rename, directory fsync). The
//! manifest lists every segment of the prefix `[log start, clean_end)`; segments from
//! `clean_end` on are the generation-0 segments appends wrote since.
//!
//! ## Byte map (`segments.manifest`, little-endian)
//! ```text
//!  0   4  magic            "SLMF"
//!  4   4  version          u32 = 1
//!  8   8  generation       u64  generation of the last committed pass
//! 16   8  clean_end        u64  the listed segments cover [start, clean_end)
//! 24   8  horizon          u64  deletes below this offset may have been removed (0 = none)
//! 32   8  bytes_reclaimed  u64  bytes removed by all passes so far
//! 40   8  last_run_ms      i64  when the last pass committed (ms since the epoch)
//! 48   8  tombstone_due_ms i64  when the earliest tombstone the last pass kept expires
//!                              (i64::MAX: none), so a restart knows when to run again
//! 56   4  n                u32  segments listed
//! 60  16n n x (base u64, generation u64), ascending base
//!  ..  4  crc              u32  CRC-32C of everything before it
//! ```
//!
//! ## Fault model: a crash at any point leaves the old set or the new one
//! On open (`resolve`), with `G` the manifest's generation (0 without a manifest):
//! - a file of generation > `G` was written by a pass that never committed: deleted;
//! - a file whose base is below `clean_end` and that the manifest does not list was replaced by
//!   the committed pass (the crash came before its deletion): deleted;
//! - a listed file that is missing is corruption (`LogError::Corrupt`): committed data is gone.
//!
//! The swap order is: new files written and fsync'd, directory fsync'd, manifest committed,
//! in-memory segment list swapped, old files deleted, directory fsync'd. Retention that deletes
//! listed segments writes the shortened manifest before it deletes them.

use std::io;
use std::path::Path;

use super::error::LogError;
use super::file;
use super::segment::SegmentName;

pub(crate) const MANIFEST_FILE: &str = "segments.manifest";
const MAGIC: &[u8; 4] = b"SLMF";
const VERSION: u32 = 1;
const FIXED_LEN: usize = 60;
/// Bound on listed segments (a manifest larger than this is damage, not a real log).
const SEGMENTS_MAX: usize = 1 << 20;

/// The committed state of compaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Manifest {
    pub(crate) generation: u64,
    pub(crate) clean_end: u64,
    pub(crate) horizon: u64,
    pub(crate) bytes_reclaimed: u64,
    pub(crate) last_run_ms: i64,
    pub(crate) tombstone_due_ms: i64,
    pub(crate) segments: Vec<SegmentName>,
}

impl Default for Manifest {
    fn default() -> Self {
        Manifest {
            generation: 0,
            clean_end: 0,
            horizon: 0,
            bytes_reclaimed: 0,
            last_run_ms: 0,
            tombstone_due_ms: i64::MAX,
            segments: Vec::new(),
        }
    }
}

impl Manifest {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(FIXED_LEN + 16 * self.segments.len() + 4);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.generation.to_le_bytes());
        out.extend_from_slice(&self.clean_end.to_le_bytes());
        out.extend_from_slice(&self.horizon.to_le_bytes());
        out.extend_from_slice(&self.bytes_reclaimed.to_le_bytes());
        out.extend_from_slice(&self.last_run_ms.to_le_bytes());
        out.extend_from_slice(&self.tombstone_due_ms.to_le_bytes());
        out.extend_from_slice(&(self.segments.len() as u32).to_le_bytes());
        for name in &self.segments {
            out.extend_from_slice(&name.base.to_le_bytes());
            out.extend_from_slice(&name.generation.to_le_bytes());
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Manifest, String> {
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let u32_at = |at: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&bytes[at..at + 4]);
            u32::from_le_bytes(b)
        };
        if bytes.len() < FIXED_LEN + 4 {
            return Err(format!("{} bytes is too short for a manifest", bytes.len()));
        }
        if &bytes[..4] != MAGIC {
            return Err("bad magic".into());
        }
        let crc_at = bytes.len() - 4;
        if crc32c::crc32c(&bytes[..crc_at]) != u32_at(crc_at) {
            return Err("checksum mismatch".into());
        }
        let version = u32_at(4);
        if version != VERSION {
            return Err(format!(
                "manifest version {version} is not supported (this broker reads {VERSION})"
            ));
        }
        let n = u32_at(56) as usize;
        if n > SEGMENTS_MAX || FIXED_LEN + 16 * n + 4 != bytes.len() {
            return Err(format!(
                "{n} segments do not fit a manifest of {} bytes",
                bytes.len()
            ));
        }
        let segments: Vec<SegmentName> = (0..n)
            .map(|i| {
                let at = FIXED_LEN + 16 * i;
                SegmentName::new(u64_at(at), u64_at(at + 8))
            })
            .collect();
        if segments.windows(2).any(|w| w[0].base >= w[1].base) {
            return Err("segments are not in ascending base order".into());
        }
        Ok(Manifest {
            generation: u64_at(8),
            clean_end: u64_at(16),
            horizon: u64_at(24),
            bytes_reclaimed: u64_at(32),
            last_run_ms: u64_at(40) as i64,
            tombstone_due_ms: u64_at(48) as i64,
            segments,
        })
    }

    /// The manifest of `dir`, or the empty one (generation 0) when there is none.
    pub(crate) fn read(dir: &Path) -> Result<Manifest, LogError> {
        let path = dir.join(MANIFEST_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => Manifest::decode(&bytes).map_err(|reason| LogError::Corrupt {
                file: path,
                position: 0,
                offset: 0,
                reason: format!("segment manifest is damaged: {reason}"),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Manifest::default()),
            Err(e) => Err(LogError::io("reading", path, e)),
        }
    }

    /// Commits this manifest: temp file, fsync, rename, directory fsync.
    pub(crate) fn write(&self, dir: &Path) -> io::Result<()> {
        file::write_atomically(dir, MANIFEST_FILE, &self.encode())
    }

    /// Applies the manifest to the segment files found in the directory (sorted): deletes what
    /// an interrupted pass left behind and returns the live set, ascending by base offset.
    pub(crate) fn resolve(
        &self,
        dir: &Path,
        found: Vec<SegmentName>,
        remove: impl Fn(&Path, SegmentName) -> Result<(), LogError>,
    ) -> Result<Vec<SegmentName>, LogError> {
        let mut live = Vec::with_capacity(found.len());
        let mut removed = 0;
        for name in found {
            let listed = self.segments.binary_search(&name).is_ok();
            let stale = if name.generation > self.generation {
                Some("written by a compaction that never committed")
            } else if name.base < self.clean_end && !listed {
                Some("replaced by a committed compaction")
            } else if name.generation > 0 && !listed {
                Some("a compacted segment the manifest does not list")
            } else {
                None
            };
            match stale {
                Some(why) => {
                    tracing::info!(dir = %dir.display(), segment = %name.stem(), why, "removing leftover segment");
                    remove(dir, name)?;
                    removed += 1;
                }
                None => live.push(name),
            }
        }
        if removed > 0 {
            file::sync_dir(dir).map_err(|e| LogError::io("syncing", dir, e))?;
        }
        for name in &self.segments {
            if live.binary_search(name).is_err() {
                return Err(LogError::Corrupt {
                    file: name.log(dir),
                    position: 0,
                    offset: name.base,
                    reason: "the segment manifest lists this segment but the file is missing"
                        .into(),
                });
            }
        }
        if let Some(pair) = live.windows(2).find(|w| w[0].base == w[1].base) {
            return Err(LogError::Corrupt {
                file: pair[1].log(dir),
                position: 0,
                offset: pair[1].base,
                reason: format!(
                    "two live segments start at offset {} ({} and {})",
                    pair[0].base,
                    pair[0].stem(),
                    pair[1].stem()
                ),
            });
        }
        Ok(live)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            generation: 3,
            clean_end: 300,
            horizon: 120,
            bytes_reclaimed: 4096,
            last_run_ms: 1_700_000_000_000,
            tombstone_due_ms: 1_700_086_400_000,
            segments: vec![SegmentName::new(0, 3), SegmentName::new(200, 2)],
        }
    }

    #[test]
    fn given_manifest_when_encoded_should_decode_identically() {
        let m = manifest();
        assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
    }

    #[test]
    fn given_any_flipped_bit_should_refuse_the_manifest() {
        let bytes = manifest().encode();
        for bit in 0..bytes.len() * 8 {
            let mut damaged = bytes.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            assert!(Manifest::decode(&damaged).is_err(), "bit {bit}");
        }
        assert!(Manifest::decode(&bytes[..bytes.len() - 1]).is_err());
    }

    #[test]
    fn given_leftovers_when_resolved_should_keep_exactly_the_committed_set() {
        let dir = tempfile::tempdir().unwrap();
        let m = manifest();
        let found = vec![
            SegmentName::new(0, 0),   // replaced by the pass: removed
            SegmentName::new(0, 3),   // listed
            SegmentName::new(0, 4),   // uncommitted pass: removed
            SegmentName::new(100, 0), // replaced: removed
            SegmentName::new(200, 2), // listed
            SegmentName::new(300, 0), // appended after clean_end: kept
        ];
        let removed = std::cell::RefCell::new(Vec::new());
        let live = m
            .resolve(dir.path(), found, |_, name| {
                removed.borrow_mut().push(name);
                Ok(())
            })
            .unwrap();
        assert_eq!(
            live,
            vec![
                SegmentName::new(0, 3),
                SegmentName::new(200, 2),
                SegmentName::new(300, 0)
            ]
        );
        assert_eq!(
            removed.into_inner(),
            vec![
                SegmentName::new(0, 0),
                SegmentName::new(0, 4),
                SegmentName::new(100, 0)
            ]
        );
    }

    #[test]
    fn given_listed_segment_missing_when_resolved_should_report_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let error = manifest()
            .resolve(dir.path(), vec![SegmentName::new(0, 3)], |_, _| Ok(()))
            .unwrap_err();
        assert!(matches!(error, LogError::Corrupt { .. }), "{error}");
    }
}
