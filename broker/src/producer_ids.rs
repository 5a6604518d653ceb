//! Idempotent producers' ids and epochs, broker-wide: `InitProducer` hands out new ids and
//! bumps the epoch of an existing one, and every partition refuses batches from an epoch older
//! than the current one (a zombie instance of a re-initialised producer is fenced), even
//! before the new epoch has written there, and across restarts.
//!
//! ## Guarantees
//! - A new id is never an id handed out before (also across restarts and clock changes): ids
//!   come from blocks reserved durably ahead of use.
//! - After `InitProducer(id)` answered epoch E, batches of `id` with an epoch below E are
//!   refused, also after a crash, for as long as the id is remembered: while it wrote or was
//!   bumped within [`PRODUCER_EPOCH_RETENTION_MS`] (Kafka's producer-id expiration plays the
//!   same role). A re-initialisation of an id the broker forgot starts again at epoch 1.
//!
//! ## Cost and bounds
//! - `InitProducer` without an id: no write, except one fsync'd append per
//!   [`PRODUCER_ID_BLOCK`] ids (the block reservation). The unused rest of a block is skipped
//!   after a restart; ids are 63-bit, so that costs nothing that matters.
//! - `InitProducer(id)`: one fsync'd append of one line. The file is rewritten (compacted) only
//!   when it holds more than twice the remembered epochs (and at least
//!   [`FILE_LINES_COMPACT_MIN`] lines): amortised O(1) per bump, and its size is bounded by the
//!   ids remembered.
//! - Remembered epochs: ids bumped or seen writing with an epoch above 0 within the retention,
//!   at most [`PRODUCER_EPOCHS_MAX`] of them (the least recently active are forgotten first,
//!   but never one active within the last hour, which a partition may still remember). Epoch
//!   0 is never stored: it fences nothing.
//!
//! ## File `DATA_DIR/producer-epochs` (text, one record per line, appended and fsync'd)
//! ```text
//! ids-below <H>                 every id below H may have been handed out (a block reservation)
//! <id> <epoch> <last_ms>        `id` was bumped to `epoch`; last active at `last_ms`
//! <id> <epoch>                  the same, from a broker before this format (last_ms = load time)
//! ```
//! ids are decimal i64 in [1, 2^63), epochs decimal i16 in [0, 32767]. Later lines win (the
//! highest H, the highest epoch per id). An append is fsync'd before the `InitProducer` it
//! serves answers, so a torn last line (a crash mid-append: no trailing newline) was never
//! acknowledged: at open it is cut off (a truncation, which needs no free space) and logged.
//! Other lines that do not parse are skipped with a warning. A compaction writes `ids-below`
//! and one line per remembered bumped id to a temp file, fsyncs it, renames it over the file
//! and fsyncs the directory.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::error::BrokerError;

/// File name inside the data directory.
pub const EPOCHS_FILE: &str = "producer-epochs";
/// New ids reserved per durable write: InitProducer without an id writes once per this many.
pub const PRODUCER_ID_BLOCK: i64 = 1024;
/// An id neither bumped nor seen writing (with an epoch above 0) for this long is forgotten:
/// a week, far above the partitions' one-hour producer expiry.
pub const PRODUCER_EPOCH_RETENTION_MS: i64 = 7 * 24 * 3_600_000;
/// Ids whose epoch is remembered at most (beyond it the least recently active go first).
pub const PRODUCER_EPOCHS_MAX: usize = 100_000;
/// The file is never compacted below this many lines (compaction is a whole rewrite).
pub const FILE_LINES_COMPACT_MIN: usize = 1024;
/// Never forget an id active this recently: a partition may still remember its epoch (its
/// producer state expires after `state::PRODUCER_EXPIRY_MS`), and a re-initialisation must then
/// get a higher one.
const ACTIVE_KEEP_MS: i64 = crate::state::PRODUCER_EXPIRY_MS;
/// Pruning by age scans every entry: at most once per this interval.
const PRUNE_INTERVAL_MS: i64 = 3_600_000;

#[derive(Debug, Clone, Copy)]
struct Entry {
    epoch: i16,
    last_ms: i64,
    /// Bumped by InitProducer (so in the file), not only seen in a partition.
    bumped: bool,
}

#[derive(Debug, Default)]
struct Epochs {
    entries: HashMap<i64, Entry>,
    last_prune_ms: i64,
}

impl Epochs {
    fn raise(&mut self, id: i64, epoch: i16, now_ms: i64, bumped: bool) {
        let entry = self.entries.entry(id).or_insert(Entry {
            epoch,
            last_ms: now_ms,
            bumped,
        });
        entry.epoch = entry.epoch.max(epoch);
        entry.last_ms = entry.last_ms.max(now_ms);
        entry.bumped |= bumped;
    }

    /// Forgets ids idle past the retention, then the least recently active beyond the cap
    /// (never one active within [`ACTIVE_KEEP_MS`]).
    fn prune(&mut self, now_ms: i64) {
        self.last_prune_ms = now_ms;
        let horizon = now_ms.saturating_sub(PRODUCER_EPOCH_RETENTION_MS);
        self.entries.retain(|_, e| e.last_ms >= horizon);
        if self.entries.len() > PRODUCER_EPOCHS_MAX {
            let keep_after = now_ms.saturating_sub(ACTIVE_KEEP_MS);
            let mut idle: Vec<(i64, i64)> = self
                .entries
                .iter()
                .filter(|(_, e)| e.last_ms < keep_after)
                .map(|(id, e)| (e.last_ms, *id))
                .collect();
            idle.sort_unstable();
            let excess = self.entries.len() - PRODUCER_EPOCHS_MAX;
            for (_, id) in idle.into_iter().take(excess) {
                self.entries.remove(&id);
            }
        }
    }
}

/// The file side: the block of ids being handed out and the append handle.
#[derive(Debug)]
struct Store {
    dir: PathBuf,
    file: File,
    /// Lines in the file now (decides when to compact).
    lines: usize,
    /// Next id to hand out.
    next_id: i64,
    /// Ids below this are reserved durably.
    ids_below: i64,
    /// In a cluster: this node's id, the high bits of every id it hands out.
    node: Option<u64>,
}

/// Ids one node of a cluster hands out (the low 31 bits).
const NODE_LOCAL_IDS: i64 = 1 << 31;

/// The current epoch of every remembered producer id, shared by the registry (which hands ids
/// and epochs out) and the partitions (which refuse older epochs). See the module doc.
#[derive(Debug, Clone, Default)]
pub struct ProducerEpochs {
    epochs: Arc<Mutex<Epochs>>,
    /// `None`: in memory only (partitions in unit tests). Locked for a whole InitProducer, so
    /// appends to the file are ordered; the epochs lock is never held across file I/O, so
    /// produce requests do not wait for an InitProducer's fsync.
    store: Option<Arc<Mutex<Store>>>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn parse_line(line: &str, load_ms: i64) -> Option<Line> {
    let parts: Vec<&str> = line.split(' ').collect();
    match parts.as_slice() {
        ["ids-below", h] => h
            .parse::<i64>()
            .ok()
            .filter(|h| *h >= 0)
            .map(Line::IdsBelow),
        [id, epoch] => Some(Line::Epoch(
            id.parse().ok().filter(|id: &i64| *id >= 0)?,
            epoch.parse().ok().filter(|e: &i16| *e >= 0)?,
            load_ms,
        )),
        [id, epoch, last_ms] => Some(Line::Epoch(
            id.parse().ok().filter(|id: &i64| *id >= 0)?,
            epoch.parse().ok().filter(|e: &i16| *e >= 0)?,
            last_ms.parse().ok()?,
        )),
        _ => None,
    }
}

enum Line {
    IdsBelow(i64),
    Epoch(i64, i16, i64),
}

impl ProducerEpochs {
    /// Loads `DATA_DIR/producer-epochs` (creating it when missing), cutting off a torn last
    /// line.
    pub fn open(data_dir: &Path) -> Result<ProducerEpochs, BrokerError> {
        Self::open_at(data_dir, now_ms())
    }

    /// Opens the store of a node in a cluster: every id it hands out carries the node id
    /// (`node << 31 | n`, n in [1, 2^31)), so ids from different nodes never collide. A
    /// clustered data directory is new, so its `n` starts at 1.
    pub fn open_for_node(data_dir: &Path, node: u64) -> Result<ProducerEpochs, BrokerError> {
        let epochs = Self::open_at(data_dir, now_ms())?;
        if let Some(store) = &epochs.store {
            let mut store = store.lock();
            if store.ids_below == 0 {
                store.next_id = 1;
            }
            store.node = Some(node);
        }
        Ok(epochs)
    }

    fn open_at(data_dir: &Path, now_ms: i64) -> Result<ProducerEpochs, BrokerError> {
        let path = data_dir.join(EPOCHS_FILE);
        let created = !path.exists();
        let file = File::options()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(|e| BrokerError::io("opening", &path, e))?;
        if created {
            crate::topic::sync_dir(data_dir)?;
        }
        let bytes = std::fs::read(&path).map_err(|e| BrokerError::io("reading", &path, e))?;
        let whole = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        if whole < bytes.len() {
            tracing::warn!(path = %path.display(), bytes = bytes.len() - whole, "cutting off a torn last line (an InitProducer that never answered)");
            file.set_len(whole as u64)
                .and_then(|()| file.sync_all())
                .map_err(|e| BrokerError::io("truncating", &path, e))?;
        }
        let mut epochs = Epochs {
            last_prune_ms: now_ms,
            ..Epochs::default()
        };
        let (mut ids_below, mut lines) = (0i64, 0usize);
        for line in String::from_utf8_lossy(&bytes[..whole]).lines() {
            lines += 1;
            match parse_line(line, now_ms) {
                Some(Line::IdsBelow(h)) => ids_below = ids_below.max(h),
                Some(Line::Epoch(id, epoch, last_ms)) => epochs.raise(id, epoch, last_ms, true),
                None => {
                    tracing::warn!(path = %path.display(), line, "ignoring a malformed producer epoch line")
                }
            }
        }
        epochs.prune(now_ms);
        epochs.entries.retain(|_, e| e.epoch > 0);
        Ok(ProducerEpochs {
            epochs: Arc::new(Mutex::new(epochs)),
            store: Some(Arc::new(Mutex::new(Store {
                dir: data_dir.to_path_buf(),
                file,
                lines,
                // The rest of the block reserved before a restart is skipped. A new file
                // starts above the time-based ids of brokers before blocks (ms << 16), and far
                // from small ids a test or a confused client might pick by hand.
                next_id: if ids_below == 0 {
                    ((now_ms.max(0) as u64) << 16).min(i64::MAX as u64 / 2) as i64 + 1
                } else {
                    ids_below
                },
                ids_below,
                node: None,
            }))),
        })
    }

    /// The current epoch of `id`, if remembered (none: nothing to fence).
    pub fn current(&self, id: i64) -> Option<i16> {
        self.epochs.lock().entries.get(&id).map(|e| e.epoch)
    }

    /// A partition saw `id` write with `epoch`: raises the remembered epoch (epoch 0 fences
    /// nothing and is not stored).
    pub fn observe(&self, id: i64, epoch: i16) {
        if epoch > 0 {
            self.epochs.lock().raise(id, epoch, now_ms(), false);
        }
    }

    /// A new producer id (its epoch is 0).
    pub fn new_id(&self) -> Result<i64, BrokerError> {
        let Some(store) = &self.store else {
            return Err(BrokerError::InvalidRequest(
                "producer ids need a data directory".into(),
            ));
        };
        let mut store = store.lock();
        if store.next_id >= store.ids_below {
            let ids_below = store
                .next_id
                .checked_add(PRODUCER_ID_BLOCK)
                .ok_or_else(|| {
                    BrokerError::InvalidRequest("every 63-bit producer id is used".into())
                })?;
            store.append(&format!("ids-below {ids_below}\n"))?;
            store.ids_below = ids_below;
        }
        let id = store.next_id;
        store.next_id += 1;
        match store.node {
            None => Ok(id),
            Some(_) if id >= NODE_LOCAL_IDS => Err(BrokerError::InvalidRequest(
                "this node handed out every producer id it may (2^31)".into(),
            )),
            Some(node) => Ok(((node as i64) << 31) | id),
        }
    }

    /// Bumps the epoch of `id` durably (fencing older instances) and returns it.
    pub fn bump(&self, id: i64) -> Result<i16, BrokerError> {
        self.bump_at(id, now_ms())
    }

    fn bump_at(&self, id: i64, now_ms: i64) -> Result<i16, BrokerError> {
        let Some(store) = &self.store else {
            return Err(BrokerError::InvalidRequest(
                "producer epochs need a data directory".into(),
            ));
        };
        let mut store = store.lock();
        let epoch = match self.current(id) {
            // Unknown: it may be in use at epoch 0, which this must fence.
            None => 1,
            Some(epoch) => epoch.checked_add(1).ok_or_else(|| {
                BrokerError::InvalidRequest(format!(
                    "producer {id} has used every epoch; initialise a new producer id"
                ))
            })?,
        };
        store.append(&format!("{id} {epoch} {now_ms}\n"))?;
        let mut epochs = self.epochs.lock();
        epochs.raise(id, epoch, now_ms, true);
        if now_ms.saturating_sub(epochs.last_prune_ms) >= PRUNE_INTERVAL_MS {
            epochs.prune(now_ms);
        }
        let bumped: Vec<(i64, Entry)> = epochs
            .entries
            .iter()
            .filter(|(_, e)| e.bumped)
            .map(|(id, e)| (*id, *e))
            .collect();
        drop(epochs);
        if store.lines > FILE_LINES_COMPACT_MIN.max(2 * bumped.len()) {
            // A failed compaction leaves the appended file, which is still right.
            if let Err(error) = store.compact(&bumped) {
                tracing::warn!(%error, "compacting {EPOCHS_FILE} failed; it stays as it is");
            }
        }
        Ok(epoch)
    }
}

impl Store {
    fn path(&self) -> PathBuf {
        self.dir.join(EPOCHS_FILE)
    }

    fn append(&mut self, line: &str) -> Result<(), BrokerError> {
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.sync_data())
            .map_err(|e| BrokerError::io("appending to", self.path(), e))?;
        self.lines += 1;
        Ok(())
    }

    fn compact(&mut self, bumped: &[(i64, Entry)]) -> Result<(), BrokerError> {
        let mut text = format!("ids-below {}\n", self.ids_below);
        for (id, entry) in bumped {
            text.push_str(&format!("{id} {} {}\n", entry.epoch, entry.last_ms));
        }
        crate::log::write_file_atomically(&self.dir, EPOCHS_FILE, text.as_bytes())
            .map_err(|e| BrokerError::io("compacting", self.path(), e))?;
        self.file = File::options()
            .append(true)
            .open(self.path())
            .map_err(|e| BrokerError::io("opening", self.path(), e))?;
        self.lines = bumped.len() + 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_a_cluster_node_when_ids_are_handed_out_should_carry_its_node_id_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let epochs = ProducerEpochs::open_for_node(dir.path(), 3).unwrap();
        let first = epochs.new_id().unwrap();
        assert_eq!(first >> 31, 3);
        assert_eq!(first & ((1 << 31) - 1), 1);
        drop(epochs);
        let epochs = ProducerEpochs::open_for_node(dir.path(), 3).unwrap();
        let after = epochs.new_id().unwrap();
        assert_eq!(after >> 31, 3);
        assert!(after > first);
        let other = ProducerEpochs::open_for_node(tempfile::tempdir().unwrap().path(), 4).unwrap();
        assert_ne!(other.new_id().unwrap(), first);
    }

    fn lines(dir: &Path) -> Vec<String> {
        std::fs::read_to_string(dir.join(EPOCHS_FILE))
            .unwrap()
            .lines()
            .map(String::from)
            .collect()
    }

    /// Issue 13 item 13: InitProducer without an id wrote (rewrote) the file every time.
    #[test]
    fn given_new_ids_should_write_once_per_block_and_never_repeat_after_restart() {
        let dir = tempfile::tempdir().unwrap();
        let epochs = ProducerEpochs::open(dir.path()).unwrap();
        let first: Vec<i64> = (0..PRODUCER_ID_BLOCK)
            .map(|_| epochs.new_id().unwrap())
            .collect();
        assert_eq!(lines(dir.path()).len(), 1, "one write for a whole block");
        epochs.new_id().unwrap();
        assert_eq!(lines(dir.path()).len(), 2, "the next block");
        drop(epochs);
        let epochs = ProducerEpochs::open(dir.path()).unwrap();
        let after = epochs.new_id().unwrap();
        assert!(
            first.iter().all(|id| *id > 0 && *id < after),
            "{after} repeats an id"
        );
        let mut sorted = first.clone();
        sorted.dedup();
        assert_eq!(sorted.len(), first.len());
    }

    /// Issue 13 item 13: every bump rewrote the whole file, which only grew. Bumps append one
    /// line, survive a restart, and compaction keeps the file bounded by the remembered ids.
    #[test]
    fn given_many_bumps_should_append_and_keep_the_file_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let epochs = ProducerEpochs::open_at(dir.path(), 0).unwrap();
        let id = epochs.new_id().unwrap();
        for expected in 1..=3 {
            assert_eq!(epochs.bump_at(id, 10).unwrap(), expected);
        }
        assert_eq!(
            lines(dir.path()).len(),
            4,
            "ids-below + three appended bumps"
        );
        drop(epochs);
        let epochs = ProducerEpochs::open_at(dir.path(), 20).unwrap();
        assert_eq!(epochs.current(id), Some(3), "the fence survives a restart");
        assert_eq!(epochs.bump_at(id, 30).unwrap(), 4);
        // Many bumps of one id: the file stays small.
        for _ in 0..3000 {
            epochs.bump_at(id, 40).unwrap();
        }
        assert!(lines(dir.path()).len() <= FILE_LINES_COMPACT_MIN + 1);
        assert_eq!(epochs.current(id), Some(3004));
        // Ids idle past the retention are forgotten and leave the file.
        for other in 1_000_000..1_002_000 {
            epochs.bump_at(other, 50).unwrap();
        }
        let later = 50 + PRODUCER_EPOCH_RETENTION_MS + PRUNE_INTERVAL_MS;
        epochs.bump_at(7, later).unwrap();
        assert_eq!(epochs.current(1_000_000), None);
        let kept = lines(dir.path());
        assert!(kept.len() <= 3, "{} lines", kept.len());
        drop(epochs);
        let epochs = ProducerEpochs::open_at(dir.path(), later).unwrap();
        assert_eq!(epochs.current(7), Some(1));
        assert_eq!(epochs.current(id), None);
    }

    #[test]
    fn given_torn_last_line_or_old_format_should_load_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        // A file of the previous format (`id epoch`), then a torn append.
        std::fs::write(dir.path().join(EPOCHS_FILE), "41 3\n42 2\n43 9").unwrap();
        let epochs = ProducerEpochs::open(dir.path()).unwrap();
        assert_eq!(
            (epochs.current(41), epochs.current(42), epochs.current(43)),
            (Some(3), Some(2), None)
        );
        // The next append starts on its own line.
        assert_eq!(epochs.bump(42).unwrap(), 3);
        drop(epochs);
        let epochs = ProducerEpochs::open(dir.path()).unwrap();
        assert_eq!(epochs.current(42), Some(3));
        assert_eq!(epochs.current(43), None);
        assert!(epochs.new_id().unwrap() >= 1);
    }

    #[test]
    fn given_unknown_id_when_bumped_should_fence_epoch_zero() {
        let dir = tempfile::tempdir().unwrap();
        let epochs = ProducerEpochs::open(dir.path()).unwrap();
        epochs.observe(5, 0);
        assert_eq!(epochs.current(5), None, "epoch 0 is not stored");
        assert_eq!(epochs.bump(5).unwrap(), 1);
        epochs.observe(5, 7);
        assert_eq!(epochs.bump(5).unwrap(), 8);
    }
}
