//! Errors of the log layer.
//!
//! Two kinds, kept apart by [`LogError::is_fatal`]: a *rejected request* (bad batch, offset out of
//! range, full disk) changes nothing and the log keeps serving; a *broken log* (poisoned by a
//! failed write or fsync, interior corruption) refuses further writes until restart. The gRPC
//! layer maps these to a status in one place.

use std::io;
use std::path::PathBuf;

use syncline_proto::batch::BatchError;

use super::config::ConfigError;

/// An error from the partition log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The batch failed validation (framing, CRC, counts); nothing was appended.
    #[error("invalid batch: {0}")]
    InvalidBatch(#[from] BatchError),

    /// The batch is larger than the log's `batch_bytes_max`; nothing was appended.
    #[error("batch of {size} bytes exceeds the maximum batch size of {max} bytes")]
    BatchTooLarge {
        /// Size of the rejected batch.
        size: usize,
        /// The configured maximum.
        max: u32,
    },

    /// A producer batch must span exactly its records (`last_offset_delta == record_count - 1`);
    /// only the cleaner writes batches with gaps. Nothing was appended.
    #[error(
        "batch claims offsets for {} records but holds {record_count}: last_offset_delta must be record_count - 1",
        u64::from(*last_offset_delta) + 1
    )]
    BatchOffsetSpan {
        /// The batch's last offset delta.
        last_offset_delta: u32,
        /// The batch's record count.
        record_count: u32,
    },

    /// The requested offset is not in the log.
    #[error(
        "offset {requested} is out of range: the log holds offsets [{start}, {end}) and reads may start at {start} through {end}"
    )]
    OffsetOutOfRange {
        /// The offset asked for.
        requested: u64,
        /// The log start offset (first retained offset).
        start: u64,
        /// The log end offset (next offset to be assigned).
        end: u64,
    },

    /// A truncation offset inside a batch: the log can only be cut between batches.
    #[error(
        "cannot truncate at offset {offset}: it is inside the batch [{previous}, {next}); the nearest batch boundaries are {previous} and {next}"
    )]
    NotBatchBoundary {
        /// The offset asked for.
        offset: u64,
        /// The boundary below it (the batch's first offset).
        previous: u64,
        /// The boundary above it (the offset after the batch).
        next: u64,
    },

    /// An earlier write or fsync failed; the page cache may have dropped data we cannot
    /// re-verify, so the log takes no more writes until it is reopened.
    #[error("log {dir} is poisoned by an earlier I/O failure ({cause}); restart to recover")]
    Poisoned {
        /// The log directory.
        dir: PathBuf,
        /// What failed first.
        cause: String,
    },

    /// The disk is full. Nothing was appended and the log is not poisoned.
    #[error("no space left on device while {context} {path}")]
    NoSpace {
        /// What the log was doing.
        context: &'static str,
        /// The file involved.
        path: PathBuf,
    },

    /// A stored batch failed its checks (CRC, framing, offsets) where the log must not have a
    /// bad batch: before the recovery point, or on read.
    #[error("corrupt log data in {file} at byte {position} (near offset {offset}): {reason}")]
    Corrupt {
        /// The segment file.
        file: PathBuf,
        /// Byte position of the bad batch in the file.
        position: u64,
        /// The offset where the bad batch was expected.
        offset: u64,
        /// What check failed.
        reason: String,
    },

    /// An I/O error outside the append path.
    #[error("I/O error while {context} {path}: {source}")]
    Io {
        /// What the log was doing.
        context: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// Another process holds the log directory's lock.
    #[error("log directory {dir} is in use by another process (lock file {dir}/.lock is held)")]
    Locked {
        /// The log directory.
        dir: PathBuf,
    },

    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),

    /// A compaction pass stopped before it committed; the log is unchanged.
    #[error("compaction of {dir} stopped: {reason}")]
    Compaction {
        /// The log directory.
        dir: PathBuf,
        /// Why.
        reason: String,
    },

    /// A batch's leader epoch is below the last batch's: epochs (Raft terms) never go down
    /// along a log. Nothing was appended.
    #[error("log {dir}: leader epoch {epoch} is below the epoch {last_epoch} of the last batch; epochs never go down along a log")]
    EpochRegressed {
        /// The log directory.
        dir: PathBuf,
        /// The epoch asked for.
        epoch: u32,
        /// The epoch of the log's last batch.
        last_epoch: u32,
    },

    /// The log was closed.
    #[error("log {dir} is closed")]
    Closed {
        /// The log directory.
        dir: PathBuf,
    },
}

impl LogError {
    /// True when the log (not the request) is broken: it takes no more writes until reopened.
    pub fn is_fatal(&self) -> bool {
        matches!(self, LogError::Poisoned { .. } | LogError::Corrupt { .. })
    }

    pub(crate) fn io(context: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        let path = path.into();
        if source.raw_os_error() == Some(libc::ENOSPC) {
            LogError::NoSpace { context, path }
        } else {
            LogError::Io {
                context,
                path,
                source,
            }
        }
    }
}
