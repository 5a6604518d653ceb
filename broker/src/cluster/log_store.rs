//! The controller's Raft log, persisted under `DATA_DIR/.controller/raft.log`.
//!
//! The controller's log is small (metadata changes only: topic creates and deletes, node
//! liveness changes) and is compacted into snapshots ([`super::raft`]), so it is one
//! append-only file of records replayed into memory at open:
//!
//! ```text
//! record := len: u32 LE | crc32c(payload): u32 LE | payload: len bytes (JSON of a Record)
//! Record := Vote(vote) | Committed(log id?) | Entries([entry]) | TruncateAfter(log id?) | Purge(log id)
//! ```
//!
//! Fault model: every change is appended and fsync'd before openraft hears it is done (vote,
//! entries, truncation, committed). A crash mid-append leaves a torn last record: open keeps
//! the records before it and truncates the file there (the record was never acknowledged). A
//! bad record followed by more records is interior corruption, which no crash leaves: open
//! refuses the file naming the offset (dropping the rest could forget a vote and let the node
//! vote twice in a term).
//! The file is rewritten (temp file, fsync, rename, directory fsync) when it holds more than
//! [`REWRITE_BYTES`] of records no longer live. Open refuses a file over [`LOG_BYTES_MAX`].
//!
//! The file I/O runs on the caller's task: the controller writes a few records a minute.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::File;
use std::io::{self, Read as _, Seek as _, Write as _};
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::entry::RaftEntry as _;
use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader};
use serde::{Deserialize, Serialize};

use super::raft::{Entry, LogId, TypeConfig, Vote};

/// The log file's name inside the controller directory.
pub const LOG_FILE: &str = "raft.log";
/// The largest log file opened.
pub const LOG_BYTES_MAX: u64 = 256 * 1024 * 1024;
/// Dead bytes that trigger a rewrite.
const REWRITE_BYTES: u64 = 4 * 1024 * 1024;
/// The largest single record.
const RECORD_BYTES_MAX: u32 = 64 * 1024 * 1024;

#[derive(Serialize, Deserialize)]
enum Record {
    Vote(Vote),
    Committed(Option<LogId>),
    Entries(Vec<Entry>),
    TruncateAfter(Option<LogId>),
    Purge(LogId),
}

struct Inner {
    path: PathBuf,
    file: File,
    /// Bytes in the file.
    len: u64,
    vote: Option<Vote>,
    committed: Option<LogId>,
    purged: Option<LogId>,
    entries: BTreeMap<u64, Entry>,
}

/// The controller's log storage; cheap to clone (one shared file).
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<tokio::sync::Mutex<Inner>>,
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

fn encode(record: &Record) -> io::Result<Vec<u8>> {
    let payload = serde_json::to_vec(record).map_err(|e| invalid(e.to_string()))?;
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|len| *len <= RECORD_BYTES_MAX)
        .ok_or_else(|| {
            invalid(format!(
                "a controller log record of {} bytes",
                payload.len()
            ))
        })?;
    let mut out = Vec::with_capacity(8 + payload.len());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Decodes the records of `bytes`; returns them, the length of the valid prefix, and whether
/// what follows it is more than a torn last record (a bad record that ends before the file
/// does: interior corruption).
fn decode_all(bytes: &[u8]) -> (Vec<Record>, usize, bool) {
    let mut records = Vec::new();
    let mut at = 0usize;
    while bytes.len() - at >= 8 {
        let len = u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
        let crc = u32::from_le_bytes([bytes[at + 4], bytes[at + 5], bytes[at + 6], bytes[at + 7]]);
        let end = at + 8 + len as usize;
        if len > RECORD_BYTES_MAX || end > bytes.len() {
            break;
        }
        let payload = &bytes[at + 8..end];
        let record = (crc32c::crc32c(payload) == crc)
            .then(|| serde_json::from_slice::<Record>(payload).ok())
            .flatten();
        match record {
            Some(record) => records.push(record),
            None => return (records, at, end < bytes.len()),
        }
        at = end;
    }
    (records, at, false)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Inner {
    fn apply(&mut self, record: Record) {
        match record {
            Record::Vote(vote) => self.vote = Some(vote),
            Record::Committed(committed) => self.committed = committed,
            Record::Entries(entries) => {
                for entry in entries {
                    self.entries.insert(entry.index(), entry);
                }
            }
            Record::TruncateAfter(last) => {
                let from = last.map_or(0, |id| id.index() + 1);
                self.entries.split_off(&from);
            }
            Record::Purge(upto) => {
                let keep = self.entries.split_off(&(upto.index() + 1));
                self.entries = keep;
                if self
                    .purged
                    .as_ref()
                    .is_none_or(|p| p.index() < upto.index())
                {
                    self.purged = Some(upto);
                }
            }
        }
    }

    /// Appends `record`, fsyncs, and applies it.
    fn write(&mut self, record: Record) -> io::Result<()> {
        let bytes = encode(&record)?;
        if self.len + bytes.len() as u64 > LOG_BYTES_MAX {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                format!(
                    "{} would pass {LOG_BYTES_MAX} bytes (the controller log is compacted into \
                     snapshots long before that)",
                    self.path.display()
                ),
            ));
        }
        self.file.write_all(&bytes)?;
        self.file.sync_data()?;
        self.len += bytes.len() as u64;
        self.apply(record);
        Ok(())
    }

    /// Rewrites the file as just the live state when enough of it is dead.
    fn maybe_rewrite(&mut self) -> io::Result<()> {
        let mut out = Vec::new();
        if let Some(vote) = &self.vote {
            out.extend(encode(&Record::Vote(*vote))?);
        }
        out.extend(encode(&Record::Committed(self.committed))?);
        if let Some(purged) = &self.purged {
            out.extend(encode(&Record::Purge(*purged))?);
        }
        let entries: Vec<Entry> = self.entries.values().cloned().collect();
        if !entries.is_empty() {
            out.extend(encode(&Record::Entries(entries))?);
        }
        if self.len.saturating_sub(out.len() as u64) < REWRITE_BYTES {
            return Ok(());
        }
        let dir = self
            .path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let temp = dir.join(format!("{LOG_FILE}.rewrite"));
        let mut file = File::create(&temp)?;
        file.write_all(&out)?;
        file.sync_all()?;
        std::fs::rename(&temp, &self.path)?;
        sync_dir(&dir)?;
        let mut file = File::options().append(true).open(&self.path)?;
        file.seek(io::SeekFrom::End(0))?;
        self.file = file;
        self.len = out.len() as u64;
        Ok(())
    }
}

impl LogStore {
    /// Opens (or creates) the log in `dir`, truncating a torn tail.
    pub fn open(dir: &Path) -> io::Result<LogStore> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(LOG_FILE);
        let mut file = File::options()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)?;
        let size = file.metadata()?.len();
        if size > LOG_BYTES_MAX {
            return Err(invalid(format!(
                "{} is {size} bytes; the controller log is at most {LOG_BYTES_MAX}",
                path.display()
            )));
        }
        let mut bytes = Vec::with_capacity(size as usize);
        file.read_to_end(&mut bytes)?;
        let (records, valid, interior) = decode_all(&bytes);
        if interior {
            return Err(invalid(format!(
                "{} is corrupt at byte {valid}: a record that fails its checksum is followed by \
                 more records, which a torn write cannot leave. Refusing to open it (dropping \
                 the rest could lose votes or acknowledged entries); restore the node's data \
                 directory, or remove the node's controller directory so that it catches up \
                 from the leader",
                path.display()
            )));
        }
        if valid < bytes.len() {
            tracing::warn!(
                path = %path.display(),
                kept = valid,
                dropped = bytes.len() - valid,
                "controller log: truncating a torn or unreadable tail"
            );
            file.set_len(valid as u64)?;
            file.sync_all()?;
        }
        sync_dir(dir)?;
        let mut inner = Inner {
            path,
            file,
            len: valid as u64,
            vote: None,
            committed: None,
            purged: None,
            entries: BTreeMap::new(),
        };
        for record in records {
            inner.apply(record);
        }
        Ok(LogStore {
            inner: Arc::new(tokio::sync::Mutex::new(inner)),
        })
    }

    /// The vote and the last log index (for tests and status).
    pub async fn last_index(&self) -> Option<u64> {
        let inner = self.inner.lock().await;
        inner
            .entries
            .keys()
            .next_back()
            .copied()
            .or(inner.purged.as_ref().map(|p| p.index()))
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let inner = self.inner.lock().await;
        Ok(inner.entries.range(range).map(|(_, e)| e.clone()).collect())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Ok(self.inner.lock().await.vote)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let inner = self.inner.lock().await;
        let last = inner
            .entries
            .values()
            .next_back()
            .map(|e| e.log_id())
            .or(inner.purged);
        Ok(LogState {
            last_purged_log_id: inner.purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        self.inner.lock().await.write(Record::Vote(*vote))
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        let mut inner = self.inner.lock().await;
        if inner.committed == committed {
            return Ok(());
        }
        inner.write(Record::Committed(committed))
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(self.inner.lock().await.committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let result = self.inner.lock().await.write(Record::Entries(entries));
        match &result {
            Ok(()) => callback.io_completed(Ok(())),
            Err(error) => {
                callback.io_completed(Err(io::Error::new(error.kind(), error.to_string())))
            }
        }
        result
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        self.inner
            .lock()
            .await
            .write(Record::TruncateAfter(last_log_id))
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        let mut inner = self.inner.lock().await;
        inner.write(Record::Purge(log_id))?;
        inner.maybe_rewrite()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_a_torn_last_record_when_decoded_should_keep_the_records_before_it() {
        let mut bytes = encode(&Record::Committed(None)).unwrap();
        let first = bytes.len();
        bytes.extend(encode(&Record::Committed(None)).unwrap());
        bytes.truncate(bytes.len() - 3);
        let (records, valid, interior) = decode_all(&bytes);
        assert_eq!(records.len(), 1);
        assert_eq!(valid, first);
        assert!(!interior);

        let mut flipped = encode(&Record::Committed(None)).unwrap();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x40;
        assert_eq!(decode_all(&flipped).1, 0);
        // The same bad record followed by a good one: corruption, not a torn tail.
        flipped.extend(encode(&Record::Committed(None)).unwrap());
        let (_, valid, interior) = decode_all(&flipped);
        assert_eq!(valid, 0);
        assert!(interior);
    }
}
