//! The narrow file seam under the segment writer.
//!
//! Segment appends, preallocation and fsync go through [`SegmentFile`], so tests can run the
//! real log on a file that fails the N-th write, sync or allocation ([`FaultInjector`]).
//! Reads do not go through the seam: they slice the memory mapping of the same file.
//!
//! Fault model of the real implementation ([`OsFile`]):
//! - `write_all_at` is `pwritev` at an explicit position, looping on short writes. A failure may
//!   leave a partial write past the log's logical end; the log never advances its end for it,
//!   the next append overwrites it, and recovery truncates it if the process dies first.
//! - `allocate` is `fallocate(FALLOC_FL_KEEP_SIZE)`: blocks are reserved but the file size (what
//!   readers and recovery see) only grows with real writes. `ENOSPC` surfaces here, before any
//!   byte of the batch is written. File systems without `fallocate` skip it.
//! - `set_len(written length)` gives reserved blocks back (sealing, close, open after a crash,
//!   a failed reservation: see `preallocate.rs`). `ftruncate` frees the blocks past the new
//!   size even when the size does not change (ext4, xfs, tmpfs). `FALLOC_FL_PUNCH_HOLE` would
//!   not do: ext4 ignores a hole punched past the file size, which is where KEEP_SIZE blocks
//!   lie. It is safe on a mapped segment although DESIGN says a mapped file is never truncated
//!   in place, because that rule guards readers from pages that vanish under them, and here
//!   none can: appends go through `pwritev`, never through the mapping; readers only touch
//!   `[0, published length)`; and the cut is never below the published length (it only drops
//!   KEEP_SIZE blocks past the end, or a partial write that failed and was never published).
//!   Pages past the new end are never accessed, so no reader can fault on them.
//! - `sync_data` is `fdatasync`; after a failure the kernel may have dropped the dirty pages, so
//!   the caller poisons the log.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// What the segment writer needs from a file.
pub trait SegmentFile: Send + Sync + fmt::Debug {
    /// Writes `head` then `body` at `position`, completely.
    fn write_all_at(&self, head: &[u8], body: &[u8], position: u64) -> io::Result<()>;
    /// Makes the written data durable (`fdatasync`).
    fn sync_data(&self) -> io::Result<()>;
    /// Reserves disk blocks for `[position, position + len)` without changing the file size.
    fn allocate(&self, position: u64, len: u64) -> io::Result<()>;
    /// Sets the file size (used to drop a torn tail before mapping, and to release unused
    /// preallocated blocks at the same size when a segment is sealed).
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Current file size.
    fn len(&self) -> io::Result<u64>;
    /// True when the file is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// The underlying file, for memory-mapping.
    fn file(&self) -> &File;
}

/// Opens segment files. The default opens real files; tests wrap it to inject faults.
pub trait FileOpener: Send + Sync + fmt::Debug {
    /// Opens `path` for reading and writing, creating it when `create` is set (and failing if it
    /// exists then).
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn SegmentFile>>;
}

/// Real files.
#[derive(Debug, Default, Clone, Copy)]
pub struct OsOpener;

impl FileOpener for OsOpener {
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn SegmentFile>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(create)
            .open(path)?;
        Ok(Arc::new(OsFile {
            file,
            fallocate_unsupported: AtomicBool::new(false),
        }))
    }
}

/// A real file.
#[derive(Debug)]
pub struct OsFile {
    file: File,
    fallocate_unsupported: AtomicBool,
}

impl SegmentFile for OsFile {
    fn write_all_at(&self, head: &[u8], body: &[u8], mut position: u64) -> io::Result<()> {
        let mut storage = [IoSlice::new(head), IoSlice::new(body)];
        let mut slices: &mut [IoSlice<'_>] = &mut storage;
        IoSlice::advance_slices(&mut slices, 0);
        while !slices.is_empty() {
            let offset = libc::off_t::try_from(position)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "position overflow"))?;
            // SAFETY: `IoSlice` is guaranteed ABI-compatible with `iovec` on Unix; the pointer
            // and count describe `slices`, which outlives the call.
            let written = unsafe {
                libc::pwritev(
                    self.file.as_raw_fd(),
                    slices.as_ptr().cast::<libc::iovec>(),
                    slices.len() as libc::c_int,
                    offset,
                )
            };
            if written < 0 {
                let error = io::Error::last_os_error();
                if error.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(error);
            }
            if written == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "pwritev wrote 0 bytes",
                ));
            }
            position += written as u64;
            IoSlice::advance_slices(&mut slices, written as usize);
        }
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn allocate(&self, position: u64, len: u64) -> io::Result<()> {
        if self.fallocate_unsupported.load(Ordering::Relaxed) {
            return Ok(());
        }
        let (Ok(offset), Ok(len)) = (libc::off_t::try_from(position), libc::off_t::try_from(len))
        else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "allocation overflow",
            ));
        };
        loop {
            // SAFETY: plain syscall on an fd we own.
            let rc = unsafe {
                libc::fallocate(
                    self.file.as_raw_fd(),
                    libc::FALLOC_FL_KEEP_SIZE,
                    offset,
                    len,
                )
            };
            if rc == 0 {
                return Ok(());
            }
            let error = io::Error::last_os_error();
            match error.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => {
                    tracing::debug!("fallocate unsupported here; segments are not preallocated");
                    self.fallocate_unsupported.store(true, Ordering::Relaxed);
                    return Ok(());
                }
                _ => return Err(error),
            }
        }
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn file(&self) -> &File {
        &self.file
    }
}

/// Which operation a [`FaultInjector`] fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// `write_all_at`
    Write,
    /// `sync_data`
    Sync,
    /// `allocate`
    Allocate,
}

/// Wraps [`OsOpener`] and fails chosen operations, for tests of the log's fault handling.
///
/// Counters are shared by every file the opener opens; `fail(kind, n, errno)` makes the n-th
/// call (1-based, counted from now) of that kind fail with `errno` once; `fail_always` makes
/// every later call fail.
#[derive(Debug, Default, Clone)]
pub struct FaultInjector {
    state: Arc<FaultState>,
}

#[derive(Debug, Default)]
struct FaultState {
    calls: [AtomicU64; 3],
    fail_at: [AtomicU64; 3],
    errno: [AtomicU64; 3],
    sticky: [AtomicBool; 3],
}

impl FaultInjector {
    /// A new injector that fails nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Fails the `nth` next call of `kind` (1 = the very next one) with `errno`.
    pub fn fail(&self, kind: FaultKind, nth: u64, errno: i32) {
        let i = kind as usize;
        let now = self.state.calls[i].load(Ordering::SeqCst);
        self.state.errno[i].store(errno as u64, Ordering::SeqCst);
        self.state.sticky[i].store(false, Ordering::SeqCst);
        self.state.fail_at[i].store(now + nth, Ordering::SeqCst);
    }

    /// Fails every call of `kind` from now on with `errno`.
    pub fn fail_always(&self, kind: FaultKind, errno: i32) {
        self.fail(kind, 1, errno);
        self.state.sticky[kind as usize].store(true, Ordering::SeqCst);
    }

    /// Stops injecting faults.
    pub fn clear(&self) {
        for i in 0..3 {
            self.state.fail_at[i].store(0, Ordering::SeqCst);
            self.state.sticky[i].store(false, Ordering::SeqCst);
        }
    }

    /// How many calls of `kind` were made so far.
    pub fn calls(&self, kind: FaultKind) -> u64 {
        self.state.calls[kind as usize].load(Ordering::SeqCst)
    }

    fn check(&self, kind: FaultKind) -> io::Result<()> {
        let i = kind as usize;
        let call = self.state.calls[i].fetch_add(1, Ordering::SeqCst) + 1;
        let fail_at = self.state.fail_at[i].load(Ordering::SeqCst);
        let hit = fail_at != 0
            && (call == fail_at || (self.state.sticky[i].load(Ordering::SeqCst) && call > fail_at));
        if hit {
            return Err(io::Error::from_raw_os_error(
                self.state.errno[i].load(Ordering::SeqCst) as i32,
            ));
        }
        Ok(())
    }
}

impl FileOpener for FaultInjector {
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn SegmentFile>> {
        Ok(Arc::new(FaultyFile {
            inner: OsOpener.open(path, create)?,
            faults: self.clone(),
        }))
    }
}

#[derive(Debug)]
struct FaultyFile {
    inner: Arc<dyn SegmentFile>,
    faults: FaultInjector,
}

impl SegmentFile for FaultyFile {
    fn write_all_at(&self, head: &[u8], body: &[u8], position: u64) -> io::Result<()> {
        self.faults.check(FaultKind::Write)?;
        self.inner.write_all_at(head, body, position)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.faults.check(FaultKind::Sync)?;
        self.inner.sync_data()
    }
    fn allocate(&self, position: u64, len: u64) -> io::Result<()> {
        self.faults.check(FaultKind::Allocate)?;
        self.inner.allocate(position, len)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn file(&self) -> &File {
        self.inner.file()
    }
}

/// `fsync` of a directory, so that file creations, renames and deletions in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes `contents` to `path` through `<path>.tmp`: write, fsync, rename. A crash leaves the old
/// file or the new one; the caller fsyncs the directory to make the rename durable.
pub(crate) fn replace_file(path: &Path, contents: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let mut temp_name = path.as_os_str().to_owned();
    temp_name.push(".tmp");
    let temp = std::path::PathBuf::from(temp_name);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&temp)?;
    file.write_all(contents)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&temp, path)
}

/// [`replace_file`] of `dir/name` followed by the directory fsync.
pub(crate) fn write_atomically(dir: &Path, name: &str, contents: &[u8]) -> io::Result<()> {
    replace_file(&dir.join(name), contents)?;
    sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_two_buffers_when_written_at_position_should_land_contiguously() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = OsOpener.open(&path, true).unwrap();
        file.write_all_at(b"abc", b"defg", 5).unwrap();
        file.allocate(0, 1 << 20).unwrap();
        assert_eq!(
            file.len().unwrap(),
            12,
            "KEEP_SIZE allocation must not grow the file"
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"\0\0\0\0\0abcdefg");
    }

    #[test]
    fn given_fault_planned_when_nth_call_made_should_fail_only_that_call() {
        let dir = tempfile::tempdir().unwrap();
        let faults = FaultInjector::new();
        let file = faults.open(&dir.path().join("f"), true).unwrap();
        faults.fail(FaultKind::Sync, 2, libc::EIO);
        assert!(file.sync_data().is_ok());
        assert_eq!(
            file.sync_data().unwrap_err().raw_os_error(),
            Some(libc::EIO)
        );
        assert!(file.sync_data().is_ok());
    }
}
