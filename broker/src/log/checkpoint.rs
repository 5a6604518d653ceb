//! Small metadata files of a log directory.
//!
//! ## Byte maps (little-endian)
//! ```text
//! recovery-point   (16 bytes)
//!   0  4  magic  "SLRP"
//!   4  8  offset u64   every offset below it was covered by an fsync
//!  12  4  crc    u32   CRC-32C of bytes [0, 12)
//!
//! .clean-shutdown  (36 bytes)
//!   0  4  magic            "SLCS"
//!   4  8  end_offset       u64  log end offset at close
//!  12  8  last_segment     u64  base offset of the last segment
//!  20  8  last_segment_len u64  its length in bytes
//!  28  4  reserved         u32  0
//!  32  4  crc              u32  CRC-32C of bytes [0, 32)
//! ```
//! Both are written by temp file + fsync + rename + directory fsync, so a crash leaves the old
//! or the new version. The marker is written only after a final fsync of all data; it is
//! removed (and the removal made durable) when the log opens, before anything can be appended,
//! so a marker never describes a log that changed after it was written.

use std::io;
use std::path::Path;

use super::file::{sync_dir, write_atomically};

pub(crate) const RECOVERY_POINT_FILE: &str = "recovery-point";
pub(crate) const CLEAN_MARKER_FILE: &str = ".clean-shutdown";

const RECOVERY_POINT_MAGIC: &[u8; 4] = b"SLRP";
const CLEAN_MARKER_MAGIC: &[u8; 4] = b"SLCS";

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut out = [0u8; 8];
    out.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(out)
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut out = [0u8; 4];
    out.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(out)
}

/// Reads the recovery point; `Ok(None)` when the file does not exist, `InvalidData` when it is
/// damaged.
pub(crate) fn read_recovery_point(dir: &Path) -> io::Result<Option<u64>> {
    let bytes = match std::fs::read(dir.join(RECOVERY_POINT_FILE)) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if bytes.len() != 16
        || &bytes[..4] != RECOVERY_POINT_MAGIC
        || crc32c::crc32c(&bytes[..12]) != u32_at(&bytes, 12)
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "recovery-point file is damaged (bad size, magic or checksum)",
        ));
    }
    Ok(Some(u64_at(&bytes, 4)))
}

pub(crate) fn write_recovery_point(dir: &Path, offset: u64) -> io::Result<()> {
    let mut bytes = Vec::with_capacity(16);
    bytes.extend_from_slice(RECOVERY_POINT_MAGIC);
    bytes.extend_from_slice(&offset.to_le_bytes());
    let crc = crc32c::crc32c(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    write_atomically(dir, RECOVERY_POINT_FILE, &bytes)
}

/// What the log looked like at a clean close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CleanMarker {
    pub(crate) end_offset: u64,
    pub(crate) last_segment: u64,
    pub(crate) last_segment_len: u64,
}

/// Reads and removes the clean-shutdown marker. A damaged marker counts as absent (the log
/// then takes the safe path and scans).
pub(crate) fn take_clean_marker(dir: &Path) -> io::Result<Option<CleanMarker>> {
    let path = dir.join(CLEAN_MARKER_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    std::fs::remove_file(&path)?;
    sync_dir(dir)?;
    if bytes.len() != 36
        || &bytes[..4] != CLEAN_MARKER_MAGIC
        || crc32c::crc32c(&bytes[..32]) != u32_at(&bytes, 32)
    {
        tracing::warn!(dir = %dir.display(), "clean-shutdown marker is damaged; scanning the log");
        return Ok(None);
    }
    Ok(Some(CleanMarker {
        end_offset: u64_at(&bytes, 4),
        last_segment: u64_at(&bytes, 12),
        last_segment_len: u64_at(&bytes, 20),
    }))
}

pub(crate) fn write_clean_marker(dir: &Path, marker: CleanMarker) -> io::Result<()> {
    let mut bytes = Vec::with_capacity(36);
    bytes.extend_from_slice(CLEAN_MARKER_MAGIC);
    bytes.extend_from_slice(&marker.end_offset.to_le_bytes());
    bytes.extend_from_slice(&marker.last_segment.to_le_bytes());
    bytes.extend_from_slice(&marker.last_segment_len.to_le_bytes());
    bytes.extend_from_slice(&0u32.to_le_bytes());
    let crc = crc32c::crc32c(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    write_atomically(dir, CLEAN_MARKER_FILE, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_recovery_point_when_written_should_read_back_and_reject_damage() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_recovery_point(dir.path()).unwrap(), None);
        write_recovery_point(dir.path(), 12345).unwrap();
        assert_eq!(read_recovery_point(dir.path()).unwrap(), Some(12345));
        let path = dir.path().join(RECOVERY_POINT_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[6] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        assert_eq!(
            read_recovery_point(dir.path()).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
    }

    #[test]
    fn given_clean_marker_when_taken_should_return_it_once() {
        let dir = tempfile::tempdir().unwrap();
        let marker = CleanMarker {
            end_offset: 9,
            last_segment: 4,
            last_segment_len: 700,
        };
        write_clean_marker(dir.path(), marker).unwrap();
        assert_eq!(take_clean_marker(dir.path()).unwrap(), Some(marker));
        assert_eq!(take_clean_marker(dir.path()).unwrap(), None);
    }
}
