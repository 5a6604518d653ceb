//! The topic registry: create, delete, list and find topics; topic metadata on disk; the data
//! directory's lock and format file.
//!
//! ## On disk
//! ```text
//! DATA_DIR/.lock                      flock: one broker per data dir
//! DATA_DIR/format-version             "syncline-data 1"
//! DATA_DIR/<topic>/topic.toml         TopicMeta (below), written temp + fsync + rename
//! DATA_DIR/<topic>/<partition>/...    one log per partition (crate::log)
//! DATA_DIR/~creating-<n>/             a create in progress (removed at startup)
//! DATA_DIR/~deleted-<n>/              a delete in progress (removed at startup)
//! DATA_DIR/~copy-in-<id>-<partition>/  a partition copy a move makes (`cluster::copy`; kept)
//! ```
//! `~` cannot appear in topic names, so work-in-progress directories never collide with
//! topics.
//!
//! `topic.toml` holds the topic's **id** (`id = "8-4-4-4-12 hex"`, 128 random bits from the
//! kernel's `getrandom`), drawn when the topic is created: a topic deleted and created again
//! under the same name is another incarnation with another id, and committed offsets belong to
//! an incarnation (see `group::offsets`). A topic written before ids existed gets one at open,
//! derived from its name and `created_ms` (so it is the same at every open even if it cannot
//! be written), persisted (metadata rewritten temp + fsync + rename, then the directory
//! fsync'd; a failure, e.g. a full disk, is a warning and the next open tries again) together
//! with `legacy_offsets = true`: it adopts the committed offsets that were stored without an
//! id, which only it can own (a re-created topic never has the flag).
//!
//! ## Crash safety
//! - Create: build the whole topic under `<name>~creating-<n>` (partition directories and
//!   `topic.toml`, each fsync'd), then rename it to `<name>` and fsync DATA_DIR. A crash leaves
//!   either no topic or the whole topic.
//! - Delete: rename `<name>` to `<name>~deleted-<n>`, fsync DATA_DIR, then remove the tree. A
//!   crash leaves either the topic or a leftover that startup removes.

mod placed;
pub use placed::{COPY_HAVE, COPY_VERIFIED, MOVED_IN_MARKER};
/// Prefix of a partition copy's directory in DATA_DIR (`cluster::copy`).
pub const COPY_IN_PREFIX: &str = "~copy-in-";

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;
use serde::{Deserialize, Serialize};

use crate::config::{Config, TopicDefaults};
use crate::error::BrokerError;
use crate::log::{
    CompactOptions, ConfigError, FsyncPolicy, Log, LogError, OpenOptions, Preallocation, Throttle,
};
use crate::partition::{Partition, RemoteLeader};
pub use crate::producer_ids::ProducerEpochs;

const FORMAT_FILE: &str = "format-version";
const FORMAT: &str = "syncline-data 1";
const META_FILE: &str = "topic.toml";
/// Longest topic name (Kafka's bound; fits a directory name).
pub const TOPIC_NAME_MAX: usize = 249;

/// Cleanup policy of a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Cleanup {
    /// Retention deletes old segments.
    Delete,
    /// A table: the latest value of each key is kept (compaction comes with the tables issue).
    Compact,
}

/// Effective settings of a topic.
#[derive(Debug, Clone, PartialEq)]
pub struct TopicSettings {
    /// Partition count.
    pub partitions: u32,
    /// Cleanup policy.
    pub cleanup: Cleanup,
    /// Log settings.
    pub log: TopicDefaults,
    /// Replicas per partition (1: a plain log on one node; more: a Raft group per partition).
    pub replication_factor: u32,
}

/// `topic.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TopicMeta {
    format: u32,
    name: String,
    partitions: u32,
    cleanup: Cleanup,
    segment_bytes: u64,
    segment_ms: u64,
    retention_ms: Option<u64>,
    retention_bytes: Option<u64>,
    fsync_policy: String,
    fsync_interval_ms: u64,
    created_ms: i64,
    #[serde(default = "default_delete_retention_ms")]
    delete_retention_ms: u64,
    #[serde(default = "default_min_cleanable_dirty_ratio")]
    min_cleanable_dirty_ratio: f64,
    /// The incarnation id (absent in topics written before ids existed: assigned at open).
    #[serde(default)]
    id: Option<String>,
    /// The topic got its id at open: committed offsets stored without an id are its.
    #[serde(default, skip_serializing_if = "is_false")]
    legacy_offsets: bool,
    /// In a cluster: the partitions this node holds (absent: all of them). The others are
    /// served by the nodes the cluster metadata names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    local_partitions: Option<Vec<u32>>,
    /// Replicas per partition (absent: 1).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    replication_factor: u32,
}

fn one() -> u32 {
    1
}

fn is_one(value: &u32) -> bool {
    *value == 1
}

fn is_false(value: &bool) -> bool {
    !value
}

/// The id of one incarnation of a topic: 128 random bits, shown as 8-4-4-4-12 lowercase hex.
/// Never zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TopicId(u128);

impl TopicId {
    /// A fresh random id.
    pub fn random() -> Result<TopicId, BrokerError> {
        let mut bytes = [0u8; 16];
        loop {
            let mut filled = 0;
            while filled < bytes.len() {
                // SAFETY: getrandom(2) writes at most `len - filled` bytes into our buffer.
                let got = unsafe {
                    libc::getrandom(bytes[filled..].as_mut_ptr().cast(), bytes.len() - filled, 0)
                };
                if got < 0 {
                    let error = std::io::Error::last_os_error();
                    if error.kind() == std::io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(BrokerError::io(
                        "drawing a topic id from",
                        "getrandom",
                        error,
                    ));
                }
                filled += got as usize;
            }
            let id = u128::from_be_bytes(bytes);
            if id != 0 {
                return Ok(TopicId(id));
            }
        }
    }

    /// The id of a topic written before ids existed: derived from what identifies that
    /// incarnation (its name and creation time), so every open agrees without a write.
    fn legacy(name: &str, created_ms: i64) -> TopicId {
        let mut input = b"syncline legacy topic id\0".to_vec();
        input.extend_from_slice(name.as_bytes());
        input.push(0);
        input.extend_from_slice(&created_ms.to_le_bytes());
        TopicId(xxhash_rust::xxh3::xxh3_128(&input).max(1))
    }

    /// Parses the 8-4-4-4-12 hex form (or 32 hex digits).
    /// The id whose bits are `bits` (0 becomes 1: an id is never zero). For ids derived from
    /// a hash, such as a cluster's id from its voter list.
    pub fn from_bits(bits: u128) -> TopicId {
        TopicId(bits.max(1))
    }

    pub fn parse(text: &str) -> Option<TopicId> {
        let hex: String = text.chars().filter(|c| *c != '-').collect();
        if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        u128::from_str_radix(&hex, 16)
            .ok()
            .filter(|id| *id != 0)
            .map(TopicId)
    }
}

impl std::fmt::Display for TopicId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hex = format!("{:032x}", self.0);
        write!(
            f,
            "{}-{}-{}-{}-{}",
            &hex[..8],
            &hex[8..12],
            &hex[12..16],
            &hex[16..20],
            &hex[20..]
        )
    }
}

// Topics written before these settings existed take the built-in defaults.
fn default_delete_retention_ms() -> u64 {
    Config::default().topic_defaults.delete_retention_ms
}
fn default_min_cleanable_dirty_ratio() -> f64 {
    Config::default().topic_defaults.min_cleanable_dirty_ratio
}

impl TopicMeta {
    fn is_local(&self, partition: u32) -> bool {
        self.local_partitions
            .as_ref()
            .is_none_or(|local| local.contains(&partition))
    }

    fn settings(&self) -> Result<TopicSettings, ConfigError> {
        Ok(TopicSettings {
            partitions: self.partitions,
            cleanup: self.cleanup,
            log: TopicDefaults {
                partitions: self.partitions,
                segment_bytes: self.segment_bytes,
                segment_ms: self.segment_ms,
                retention_ms: self.retention_ms,
                retention_bytes: self.retention_bytes,
                fsync: crate::config::parse_fsync(&self.fsync_policy, self.fsync_interval_ms)?,
                delete_retention_ms: self.delete_retention_ms,
                min_cleanable_dirty_ratio: self.min_cleanable_dirty_ratio,
            },
            replication_factor: self.replication_factor,
        })
    }
}

/// Checks a topic name: `[A-Za-z0-9._-]{1,249}`, not `.` or `..`, not starting with `__`
/// (reserved for internal topics).
pub fn validate_topic_name(name: &str) -> Result<(), BrokerError> {
    let invalid = |reason| {
        Err(BrokerError::InvalidTopicName {
            name: name.chars().take(300).collect(),
            reason,
        })
    };
    if name.is_empty() {
        return invalid("the name is empty");
    }
    if name.len() > TOPIC_NAME_MAX {
        return invalid("the name is longer than 249 characters");
    }
    if name == "." || name == ".." {
        return invalid("`.` and `..` are not topic names");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
    {
        return invalid("use only letters, digits, `.`, `_` and `-`");
    }
    if name == FORMAT_FILE {
        return invalid("`format-version` is the data directory's format file");
    }
    if name.starts_with("__") {
        return invalid("names starting with `__` are reserved for internal topics");
    }
    Ok(())
}

/// A topic: its settings and partitions.
#[derive(Debug)]
pub struct Topic {
    /// Name.
    pub name: Arc<str>,
    /// This incarnation's id.
    pub id: TopicId,
    /// The id was assigned at open to a topic written before ids existed: committed offsets
    /// stored without an id belong to this incarnation.
    pub legacy_offsets: bool,
    /// Effective settings.
    pub settings: TopicSettings,
    /// Partitions, indexed by number.
    pub partitions: Vec<Arc<Partition>>,
    /// Set once the topic is deleted, so in-flight streams end.
    pub deleted: AtomicBool,
}

impl Topic {
    /// Whether a committed offset stored with `topic_id` (empty: stored before ids existed)
    /// belongs to this incarnation.
    pub fn owns_commit(&self, topic_id: &str) -> bool {
        if topic_id.is_empty() {
            return self.legacy_offsets;
        }
        TopicId::parse(topic_id) == Some(self.id)
    }

    /// The partition, or NOT_FOUND-style error naming the valid range.
    pub fn partition(&self, id: u32) -> Result<&Arc<Partition>, BrokerError> {
        self.partitions
            .get(id as usize)
            .ok_or_else(|| BrokerError::PartitionNotFound {
                topic: self.name.to_string(),
                partition: id,
                partitions: self.settings.partitions,
            })
    }
}

/// All topics of a data directory.
#[derive(Debug)]
pub struct Registry {
    config: Arc<Config>,
    topics: RwLock<BTreeMap<String, Arc<Topic>>>,
    /// Serializes creates and deletes (metadata changes are rare and do I/O).
    admin: tokio::sync::Mutex<()>,
    sequence: AtomicU64,
    /// Highest epoch handed out per producer id (rebuilt from the partitions at startup).
    producer_epochs: ProducerEpochs,
    /// The cleaner's shared I/O budget (None: unthrottled).
    throttle: Option<Arc<Throttle>>,
    /// How partition logs are opened: the broker-wide preallocation budget, and no per-log
    /// lock file (the data directory's lock covers them: one descriptor per partition less).
    log_options: OpenOptions,
    _lock: File,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), BrokerError> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| BrokerError::io("syncing directory", dir, e))
}

fn file_sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

fn write_synced(path: &Path, contents: &[u8]) -> Result<(), BrokerError> {
    use std::io::Write;
    let mut temp = path.as_os_str().to_owned();
    temp.push(".tmp");
    let temp = PathBuf::from(temp);
    let mut file = File::create(&temp).map_err(|e| BrokerError::io("creating", &temp, e))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(|e| BrokerError::io("writing", &temp, e))?;
    std::fs::rename(&temp, path).map_err(|e| BrokerError::io("renaming", &temp, e))
}

impl Registry {
    /// Locks the data directory, removes interrupted creates and deletes, and opens every
    /// topic (recovering each partition's log). A partition whose log reports corruption is
    /// fenced; the rest serve.
    pub fn open(config: Arc<Config>) -> Result<Registry, BrokerError> {
        let dir = config.data_dir.clone();
        std::fs::create_dir_all(&dir).map_err(|e| BrokerError::io("creating", &dir, e))?;
        let lock_path = dir.join(".lock");
        let lock = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(|e| BrokerError::io("opening", &lock_path, e))?;
        // SAFETY: plain syscall on an fd we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(BrokerError::DataDirLocked { dir });
        }
        let format_path = dir.join(FORMAT_FILE);
        match std::fs::read_to_string(&format_path) {
            Ok(found) if found.trim() == FORMAT => {}
            Ok(found) => {
                return Err(BrokerError::DataDirFormat {
                    dir,
                    found: found.trim().to_string(),
                    expected: FORMAT.into(),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                write_synced(&format_path, format!("{FORMAT}\n").as_bytes())?;
                sync_dir(&dir)?;
            }
            Err(e) => return Err(BrokerError::io("reading", &format_path, e)),
        }
        let registry = Registry {
            config: config.clone(),
            topics: RwLock::new(BTreeMap::new()),
            admin: tokio::sync::Mutex::new(()),
            sequence: AtomicU64::new(0),
            producer_epochs: if config.node.is_clustered() {
                ProducerEpochs::open_for_node(&dir, config.node.id)?
            } else {
                ProducerEpochs::open(&dir)?
            },
            throttle: (config.cleaner_io_bytes_per_sec > 0)
                .then(|| Arc::new(Throttle::new(config.cleaner_io_bytes_per_sec))),
            log_options: OpenOptions {
                preallocation: Arc::new(Preallocation::for_data_dir(
                    &dir,
                    config.preallocate_bytes_max,
                )),
                lock_dir: false,
                ..OpenOptions::default()
            },
            _lock: lock,
        };
        let entries = std::fs::read_dir(&dir).map_err(|e| BrokerError::io("listing", &dir, e))?;
        let mut found = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| BrokerError::io("listing", &dir, e))?;
            let path = entry.path();
            if !path.is_dir() {
                continue;
            }
            let name = entry.file_name().to_string_lossy().to_string();
            if name.starts_with(COPY_IN_PREFIX) {
                // A partition copy a move is making (`cluster::copy` removes what no move needs).
                continue;
            }
            if name.contains('~') {
                tracing::info!(path = %path.display(), "removing interrupted topic create/delete");
                std::fs::remove_dir_all(&path)
                    .map_err(|e| BrokerError::io("removing", &path, e))?;
                continue;
            }
            if !path.join(META_FILE).exists() {
                tracing::warn!(path = %path.display(), "directory without topic.toml in the data dir; ignoring it");
                continue;
            }
            found.push((path.clone(), read_meta(&path)?));
        }
        // Every partition holds a descriptor: refuse to start rather than fence the ones that
        // find none. (An explicitly set connection limit joins this count.)
        let partitions = found
            .iter()
            .map(|(_, meta)| (0..meta.partitions).filter(|p| meta.is_local(*p)).count() as u64)
            .sum();
        crate::descriptors::check(partitions, explicit_connections(&config))?;
        let mut loaded = BTreeMap::new();
        for (path, meta) in found {
            let topic = registry.load_topic(&path, meta)?;
            loaded.insert(topic.name.to_string(), topic);
        }
        sync_dir(&dir)?;
        for topic in loaded.values() {
            for partition in &topic.partitions {
                for (id, epoch) in partition.producer_epochs() {
                    registry.producer_epochs.observe(id, epoch);
                }
            }
        }
        tracing::info!(dir = %dir.display(), topics = loaded.len(), "loaded topics");
        *registry.topics.write() = loaded;
        Ok(registry)
    }

    /// Opens an existing topic; a partition whose log refuses to open is fenced.
    fn load_topic(&self, path: &Path, mut meta: TopicMeta) -> Result<Arc<Topic>, BrokerError> {
        let settings = meta.settings()?;
        let id = topic_id_of(path, &mut meta)?;
        let opener = PartitionOpener {
            config: &self.config,
            options: &self.log_options,
            epochs: &self.producer_epochs,
            name: Arc::from(meta.name.as_str()),
            path,
            settings: &settings,
        };
        let partitions = (0..settings.partitions)
            .map(|id| match opener.open_if(meta.is_local(id), id) {
                Ok(partition) => Arc::new(partition),
                Err(error) => {
                    tracing::error!(topic = %meta.name, partition = id, %error, "partition fenced: its log does not open");
                    Arc::new(Partition::fenced(opener.name.clone(), id, settings.partitions, error.to_string()))
                }
            })
            .collect();
        Ok(Arc::new(Topic {
            name: opener.name.clone(),
            id,
            legacy_offsets: meta.legacy_offsets,
            settings,
            partitions,
            deleted: AtomicBool::new(false),
        }))
    }

    /// Bytes of segment space reserved ahead of written data across all partitions (the
    /// `syncline_preallocated_bytes` gauge).
    pub fn preallocated_bytes(&self) -> u64 {
        self.log_options.preallocation.reserved()
    }
}

/// The topic's id; a topic written before ids gets its derived one (see the module doc).
fn topic_id_of(path: &Path, meta: &mut TopicMeta) -> Result<TopicId, BrokerError> {
    let meta_path = path.join(META_FILE);
    let invalid = |message: String| {
        BrokerError::io(
            "parsing",
            &meta_path,
            std::io::Error::new(std::io::ErrorKind::InvalidData, message),
        )
    };
    if let Some(text) = &meta.id {
        return TopicId::parse(text)
            .ok_or_else(|| invalid(format!("`id = {text:?}` is not a topic id")));
    }
    // Written before topic ids: this incarnation gets its derived id and adopts the committed
    // offsets stored without an id.
    let id = TopicId::legacy(&meta.name, meta.created_ms);
    meta.id = Some(id.to_string());
    meta.legacy_offsets = true;
    let text = toml::to_string(&*meta).map_err(|e| invalid(e.to_string()))?;
    match write_synced(&meta_path, text.as_bytes()).and_then(|()| sync_dir(path)) {
        Ok(()) => tracing::info!(topic = %meta.name, %id, "assigned a topic id"),
        Err(error) => {
            tracing::warn!(topic = %meta.name, %id, %error, "cannot store the topic id now (it is derived, the next open tries again)")
        }
    }
    Ok(id)
}

fn read_meta(path: &Path) -> Result<TopicMeta, BrokerError> {
    let meta_path = path.join(META_FILE);
    let text = std::fs::read_to_string(&meta_path)
        .map_err(|e| BrokerError::io("reading", &meta_path, e))?;
    toml::from_str(&text).map_err(|e| {
        BrokerError::io(
            "parsing",
            &meta_path,
            std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
        )
    })
}

/// Opens the partition logs of one topic.
struct PartitionOpener<'a> {
    config: &'a Config,
    options: &'a OpenOptions,
    epochs: &'a ProducerEpochs,
    name: Arc<str>,
    path: &'a Path,
    settings: &'a TopicSettings,
}

impl PartitionOpener<'_> {
    /// Opens partition `id` when this node holds it; else a placeholder for the node that does
    /// (its leader is filled in when the cluster metadata is applied).
    fn open_if(&self, local: bool, id: u32) -> Result<Partition, LogError> {
        if !local {
            return Ok(Partition::remote(
                self.name.clone(),
                id,
                self.settings.partitions,
                RemoteLeader::default(),
            ));
        }
        self.open(id)
    }

    /// Opens (or creates) partition `id`'s log and restores its state.
    fn open(&self, id: u32) -> Result<Partition, LogError> {
        let dir = self.path.join(id.to_string());
        let log_config = self.config.log_config_for(&self.settings.log);
        let replicated = self.settings.replication_factor > 1;
        let mut options = self.options.clone();
        if replicated {
            options.visibility = crate::log::Visibility::Published;
            // A snapshot install that a crash interrupted is finished before the log opens.
            if let Err(reason) = crate::replication::state_machine::recover_install(&dir) {
                tracing::error!(topic = %self.name, partition = id, %reason, "replica fenced");
                return Ok(Partition::fenced(
                    self.name.clone(),
                    id,
                    self.settings.partitions,
                    reason,
                ));
            }
        }
        let log = Log::open_with(&dir, log_config, options)?;
        if replicated {
            if let Err(reason) = crate::replication::state_machine::prepare_log(
                &log,
                &dir.join(crate::replication::state_machine::RAFT_DIR),
            ) {
                tracing::error!(topic = %self.name, partition = id, %reason, "replica fenced");
                return Ok(Partition::fenced(
                    self.name.clone(),
                    id,
                    self.settings.partitions,
                    reason,
                ));
            }
        }
        let partition = Partition::open(
            self.name.clone(),
            id,
            self.settings.partitions,
            log,
            self.settings.cleanup == Cleanup::Compact,
            self.epochs.clone(),
        );
        Ok(if replicated {
            partition.into_replicated()
        } else {
            partition
        })
    }
}

impl Registry {
    /// The effective settings for a create request (unset fields take the broker's defaults).
    pub fn resolve_settings(
        &self,
        partitions: Option<u32>,
        cleanup: Option<Cleanup>,
        overrides: impl FnOnce(&mut TopicDefaults) -> Result<(), ConfigError>,
    ) -> Result<TopicSettings, BrokerError> {
        let mut log = self.config.topic_defaults.clone();
        overrides(&mut log)?;
        let partitions = partitions.unwrap_or(log.partitions);
        let max = self.config.limits.max_partitions;
        if partitions == 0 || partitions > max {
            return Err(BrokerError::InvalidConfig(ConfigError {
                key: "partitions",
                message: format!("{partitions} is outside [1, {max}]"),
            }));
        }
        log.partitions = partitions;
        self.config.log_config_for(&log).validate()?;
        Ok(TopicSettings {
            partitions,
            cleanup: cleanup.unwrap_or(Cleanup::Delete),
            log,
            replication_factor: 1,
        })
    }

    /// Creates a topic (see the module doc for the crash-safe order).
    pub async fn create(
        &self,
        name: &str,
        settings: TopicSettings,
    ) -> Result<Arc<Topic>, BrokerError> {
        validate_topic_name(name)?;
        self.create_any(name, settings).await
    }

    /// The internal `__offsets` topic (a one-partition table), created on first use.
    pub async fn offsets_topic(&self) -> Result<Arc<Topic>, BrokerError> {
        let name = crate::group::offsets::OFFSETS_TOPIC;
        if let Ok(topic) = self.get(name) {
            return Ok(topic);
        }
        let settings = self.offsets_settings(1);
        match self.create_any(name, settings).await {
            Err(BrokerError::TopicExists { .. }) => self.get(name),
            other => other,
        }
    }

    async fn create_any(
        &self,
        name: &str,
        settings: TopicSettings,
    ) -> Result<Arc<Topic>, BrokerError> {
        let meta = self.new_meta(name, &settings, TopicId::random()?);
        self.create_meta(meta, &BTreeMap::new()).await
    }

    /// `topic.toml` for a new topic.
    fn new_meta(&self, name: &str, settings: &TopicSettings, id: TopicId) -> TopicMeta {
        TopicMeta {
            format: 1,
            name: name.to_string(),
            partitions: settings.partitions,
            cleanup: settings.cleanup,
            segment_bytes: settings.log.segment_bytes,
            segment_ms: settings.log.segment_ms,
            retention_ms: settings.log.retention_ms,
            retention_bytes: settings.log.retention_bytes,
            fsync_policy: match settings.log.fsync {
                FsyncPolicy::Always => "always".into(),
                FsyncPolicy::IntervalMs(_) => "interval".into(),
            },
            fsync_interval_ms: match settings.log.fsync {
                FsyncPolicy::Always => 100,
                FsyncPolicy::IntervalMs(ms) => ms,
            },
            created_ms: now_ms(),
            delete_retention_ms: settings.log.delete_retention_ms,
            min_cleanable_dirty_ratio: settings.log.min_cleanable_dirty_ratio,
            id: Some(id.to_string()),
            legacy_offsets: false,
            local_partitions: None,
            replication_factor: settings.replication_factor,
        }
    }

    /// The settings `__offsets` gets (a table of small segments, so the cleaner keeps it as
    /// small as the number of committed partitions).
    pub fn offsets_settings(&self, partitions: u32) -> TopicSettings {
        let mut log = self.config.topic_defaults.clone();
        log.partitions = partitions;
        log.segment_bytes = 64 * 1024 * 1024;
        TopicSettings {
            partitions,
            cleanup: Cleanup::Compact,
            log,
            replication_factor: 1,
        }
    }

    async fn create_meta(
        &self,
        meta: TopicMeta,
        remote: &BTreeMap<u32, RemoteLeader>,
    ) -> Result<Arc<Topic>, BrokerError> {
        let name = meta.name.clone();
        let name = name.as_str();
        let settings = meta.settings()?;
        let id = meta.id.as_deref().and_then(TopicId::parse).ok_or_else(|| {
            BrokerError::InvalidRequest(format!("topic `{name}` has no valid id"))
        })?;
        let _admin = self.admin.lock().await;
        if self.topics.read().contains_key(name) {
            return Err(BrokerError::TopicExists { topic: name.into() });
        }
        let data_dir = self.config.data_dir.clone();
        let final_path = data_dir.join(name);
        if final_path.exists() {
            return Err(BrokerError::TopicExists { topic: name.into() });
        }
        let sequence = self.sequence.fetch_add(1, Ordering::Relaxed);
        let staging = data_dir.join(format!("~creating-{}-{sequence}", now_ms()));
        let local: Vec<u32> = (0..settings.partitions)
            .filter(|p| meta.is_local(*p))
            .collect();
        let remote = remote.clone();
        let text = toml::to_string(&meta).map_err(|e| {
            BrokerError::InvalidRequest(format!("cannot encode topic metadata: {e}"))
        })?;
        let open_partitions: u64 = self
            .list()
            .iter()
            .map(|topic| topic.partitions.len() as u64)
            .sum();
        crate::descriptors::check(
            open_partitions + local.len() as u64,
            explicit_connections(&self.config),
        )?;
        let config = self.config.clone();
        let epochs = self.producer_epochs.clone();
        let options = self.log_options.clone();
        let owned_name = name.to_string();
        let build = move || -> Result<Topic, BrokerError> {
            let built = (|| {
                std::fs::create_dir(&staging)
                    .map_err(|e| BrokerError::io("creating", &staging, e))?;
                for id in &local {
                    let dir = staging.join(id.to_string());
                    std::fs::create_dir(&dir).map_err(|e| BrokerError::io("creating", &dir, e))?;
                }
                write_synced(&staging.join(META_FILE), text.as_bytes())?;
                sync_dir(&staging)?;
                std::fs::rename(&staging, &final_path)
                    .map_err(|e| BrokerError::io("renaming", &staging, e))?;
                sync_dir(&data_dir)
            })();
            if let Err(error) = built {
                let _ = std::fs::remove_dir_all(&staging);
                return Err(error);
            }
            // A new partition that does not open (a full disk, no descriptor) fails the create:
            // a topic is never born fenced. What was made is removed again.
            let opener = PartitionOpener {
                config: &config,
                options: &options,
                epochs: &epochs,
                name: Arc::from(owned_name.as_str()),
                path: &final_path,
                settings: &settings,
            };
            let mut partitions = Vec::with_capacity(settings.partitions as usize);
            for id in 0..settings.partitions {
                if !local.contains(&id) {
                    partitions.push(Arc::new(Partition::remote(
                        opener.name.clone(),
                        id,
                        settings.partitions,
                        remote.get(&id).cloned().unwrap_or_default(),
                    )));
                    continue;
                }
                match opener.open(id) {
                    Ok(partition) => partitions.push(Arc::new(partition)),
                    Err(source) => {
                        drop(partitions);
                        // Renamed away first, as a delete does: a crash leaves a leftover
                        // that startup removes, never half a topic.
                        let doomed = data_dir.join(format!("~deleted-{}-create", now_ms()));
                        // Removed whenever the rename went through, even if the directory
                        // fsync failed (as it may in the EMFILE case being handled).
                        if let Err(error) = std::fs::rename(&final_path, &doomed).and_then(|()| {
                            let synced = file_sync_dir(&data_dir);
                            std::fs::remove_dir_all(&doomed).and(synced)
                        }) {
                            tracing::warn!(path = %final_path.display(), %error, "could not remove the topic whose create failed");
                        }
                        return Err(BrokerError::Log {
                            topic: owned_name,
                            partition: id,
                            source,
                        });
                    }
                }
            }
            Ok(Topic {
                name: opener.name.clone(),
                id,
                legacy_offsets: false,
                settings: settings.clone(),
                partitions,
                deleted: AtomicBool::new(false),
            })
        };
        let topic = tokio::task::spawn_blocking(build)
            .await
            .map_err(|e| BrokerError::InvalidRequest(format!("create task failed: {e}")))??;
        let topic = Arc::new(topic);
        self.topics.write().insert(name.to_string(), topic.clone());
        tracing::info!(
            topic = name,
            id = %topic.id,
            partitions = topic.settings.partitions,
            "created topic"
        );
        Ok(topic)
    }

    /// Deletes a topic: it disappears from the registry at once, its logs are closed, and its
    /// directory is renamed away and removed.
    pub async fn delete(&self, name: &str) -> Result<(), BrokerError> {
        if name.starts_with("__") && self.topics.read().contains_key(name) {
            return Err(BrokerError::InvalidTopicName {
                name: name.into(),
                reason: "internal topics cannot be deleted",
            });
        }
        self.delete_checked(name, None).await
    }

    /// Deletes this node's copy of incarnation `id` of a topic (internal ones too), as the
    /// cluster metadata says; another incarnation of the name is left alone.
    pub async fn delete_incarnation(&self, name: &str, id: TopicId) -> Result<(), BrokerError> {
        self.delete_checked(name, Some(id)).await
    }

    async fn delete_checked(&self, name: &str, id: Option<TopicId>) -> Result<(), BrokerError> {
        let _admin = self.admin.lock().await;
        let topic = {
            let mut topics = self.topics.write();
            match topics.get(name) {
                Some(found) if id.is_none_or(|id| id == found.id) => topics.remove(name),
                _ => None,
            }
        }
        .ok_or_else(|| BrokerError::TopicNotFound { topic: name.into() })?;
        topic.deleted.store(true, Ordering::Release);
        for partition in &topic.partitions {
            partition.close().await;
        }
        let data_dir = self.config.data_dir.clone();
        let path = data_dir.join(name);
        let sequence = self.sequence.fetch_add(1, Ordering::Relaxed);
        let doomed = data_dir.join(format!("~deleted-{}-{sequence}", now_ms()));
        tokio::task::spawn_blocking(move || -> Result<(), BrokerError> {
            std::fs::rename(&path, &doomed).map_err(|e| BrokerError::io("renaming", &path, e))?;
            sync_dir(&data_dir)?;
            std::fs::remove_dir_all(&doomed).map_err(|e| BrokerError::io("removing", &doomed, e))
        })
        .await
        .map_err(|e| BrokerError::InvalidRequest(format!("delete task failed: {e}")))??;
        tracing::info!(topic = name, "deleted topic");
        Ok(())
    }

    /// The topic, or NOT_FOUND.
    pub fn get(&self, name: &str) -> Result<Arc<Topic>, BrokerError> {
        self.topics
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| BrokerError::TopicNotFound { topic: name.into() })
    }

    /// All topics, by name.
    pub fn list(&self) -> Vec<Arc<Topic>> {
        self.topics.read().values().cloned().collect()
    }

    /// The broker configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Runs retention on every partition (blocking I/O: call from a blocking thread).
    pub fn enforce_retention(&self) {
        for topic in self.list() {
            if topic.settings.cleanup != Cleanup::Delete {
                continue;
            }
            for partition in &topic.partitions {
                if let Ok(log) = partition.log() {
                    if let Err(error) = log.enforce_retention() {
                        tracing::warn!(topic = %topic.name, partition = partition.id, %error, "retention failed");
                    }
                }
            }
        }
    }

    /// The options of a compaction pass over `topic`.
    pub fn compact_options(&self, topic: &Topic, roll: bool) -> CompactOptions {
        CompactOptions {
            delete_retention_ms: topic.settings.log.delete_retention_ms,
            roll,
            throttle: self.throttle.clone(),
            ..Default::default()
        }
    }

    /// The background cleaner's round: compacts every table partition that is due (enough
    /// dirty bytes, or a kept delete past its retention). Blocking: call from a blocking
    /// thread. Stops between passes, and inside one, when `cancel` is set.
    pub fn run_cleaner(&self, cancel: &Arc<AtomicBool>) {
        for topic in self.list() {
            if topic.settings.cleanup != Cleanup::Compact {
                continue;
            }
            let mut options = self.compact_options(&topic, false);
            options.cancel = Some(cancel.clone());
            for partition in &topic.partitions {
                if cancel.load(Ordering::Acquire) || topic.deleted.load(Ordering::Acquire) {
                    return;
                }
                let Ok(log) = partition.log() else { continue };
                if !log.compaction_due(topic.settings.log.min_cleanable_dirty_ratio) {
                    continue;
                }
                match partition.compact(&options) {
                    Ok(_) => {}
                    Err(error) => {
                        tracing::warn!(topic = %topic.name, partition = partition.id, %error, "compaction pass failed; the log is unchanged");
                    }
                }
            }
        }
    }

    /// A new producer id (epoch 0), or the next epoch of `producer_id`, which fences older
    /// instances (see [`crate::producer_ids`]). Blocking (it may fsync): call from a blocking
    /// thread.
    pub fn init_producer(&self, producer_id: u64) -> Result<(i64, i16), BrokerError> {
        if producer_id == 0 {
            return Ok((self.producer_epochs.new_id()?, 0));
        }
        let id = i64::try_from(producer_id).map_err(|_| {
            BrokerError::InvalidRequest(format!(
                "producer id {producer_id} does not fit in 63 bits"
            ))
        })?;
        Ok((id, self.producer_epochs.bump(id)?))
    }

    /// Writes changed partition state snapshots (blocking I/O: call from a blocking thread).
    pub fn checkpoint(&self) {
        for topic in self.list() {
            for partition in &topic.partitions {
                partition.checkpoint();
            }
        }
    }

    /// Closes every partition: final fsync and clean-shutdown marker. Fails when a log could
    /// not be closed cleanly (each failure is logged), so the process exits non-zero.
    pub async fn close(&self) -> Result<(), BrokerError> {
        let mut unclean = 0;
        for topic in self.list() {
            for partition in &topic.partitions {
                if !partition.close().await {
                    unclean += 1;
                }
            }
        }
        if unclean > 0 {
            return Err(BrokerError::UncleanShutdown { logs: unclean });
        }
        Ok(())
    }
}

/// Tests: makes `DATA_DIR/<topic>/topic.toml` look written before topic ids (no `id`).
#[cfg(test)]
pub(crate) fn strip_topic_id_for_tests(topic_dir: &Path) {
    let path = topic_dir.join(META_FILE);
    let old: String = std::fs::read_to_string(&path)
        .unwrap_or_default()
        .lines()
        .filter(|line| !line.starts_with("id ="))
        .map(|line| format!("{line}\n"))
        .collect();
    assert!(std::fs::write(&path, old).is_ok(), "{}", path.display());
}

/// Descriptors an explicitly set `max_connections` claims beside the partitions (a default
/// limit adapts to what the partitions leave, so it claims none).
fn explicit_connections(config: &Config) -> u64 {
    config.connections.max_connections.map_or(0, u64::from)
}

/// Whether a log error means the request was bad (vs the partition being broken).
pub fn is_request_error(error: &LogError) -> bool {
    !error.is_fatal()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_topic_ids_should_print_as_uuid_and_parse_back() {
        let id = TopicId::random().unwrap();
        let text = id.to_string();
        assert_eq!(text.len(), 36);
        assert_eq!(text.matches('-').count(), 4);
        assert_eq!(TopicId::parse(&text), Some(id));
        assert_ne!(
            TopicId::random().unwrap(),
            id,
            "128 random bits do not repeat"
        );
        assert_eq!(TopicId::parse("00000000-0000-0000-0000-000000000000"), None);
        assert_eq!(TopicId::parse("not-an-id"), None);
    }

    /// A data dir written before topic ids: the topic gets an id at open, keeps it across
    /// restarts, and adopts the committed offsets stored without an id; a re-created topic is
    /// another incarnation that adopts nothing.
    #[tokio::test]
    async fn given_topic_without_id_when_opened_should_persist_an_id_that_adopts_old_commits() {
        let dir = tempfile::tempdir().unwrap();
        let config = Arc::new(Config {
            data_dir: dir.path().to_path_buf(),
            ..Config::default()
        });
        let registry = Registry::open(config.clone()).unwrap();
        let settings = registry
            .resolve_settings(Some(1), None, |_| Ok(()))
            .unwrap();
        let created = registry.create("orders", settings.clone()).await.unwrap();
        assert!(!created.legacy_offsets);
        assert!(created.owns_commit(&created.id.to_string()));
        assert!(
            !created.owns_commit(""),
            "a new topic adopts no id-less commit"
        );
        registry.close().await.unwrap();
        drop((created, registry));
        strip_topic_id_for_tests(&dir.path().join("orders"));
        let meta_path = dir.path().join("orders").join(META_FILE);

        let registry = Registry::open(config.clone()).unwrap();
        let upgraded = registry.get("orders").unwrap();
        assert!(upgraded.legacy_offsets);
        let meta: TopicMeta =
            toml::from_str(&std::fs::read_to_string(&meta_path).unwrap()).unwrap();
        assert_eq!(
            TopicId::legacy("orders", meta.created_ms),
            upgraded.id,
            "derived, so an open that cannot write it still agrees"
        );
        assert_eq!(meta.id, Some(upgraded.id.to_string()), "and persisted");
        assert!(upgraded.owns_commit(""));
        assert!(!upgraded.owns_commit(&TopicId::random().unwrap().to_string()));
        let id = upgraded.id;
        registry.close().await.unwrap();
        drop((upgraded, registry));

        let registry = Registry::open(config.clone()).unwrap();
        let reopened = registry.get("orders").unwrap();
        assert_eq!((reopened.id, reopened.legacy_offsets), (id, true));
        registry.delete("orders").await.unwrap();
        let recreated = registry.create("orders", settings).await.unwrap();
        assert_ne!(recreated.id, id);
        assert!(!recreated.owns_commit("") && !recreated.owns_commit(&id.to_string()));
        registry.close().await.unwrap();
    }

    #[test]
    fn given_names_when_validated_should_accept_only_the_allowed_charset() {
        for good in ["orders", "a", "A.b_c-9", &"x".repeat(249)] {
            assert!(validate_topic_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "../etc",
            "a b",
            "é",
            "__offsets",
            &"x".repeat(250),
            "a~b",
        ] {
            assert!(
                matches!(
                    validate_topic_name(bad),
                    Err(BrokerError::InvalidTopicName { .. })
                ),
                "{bad}"
            );
        }
    }
}
