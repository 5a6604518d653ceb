//! Per-log configuration: one typed struct with safe defaults and a `validate()` that names the
//! key and its bounds.

use syncline_proto::batch::{BATCH_LEN_MAX, HEADER_LEN};

/// When the log calls `fdatasync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FsyncPolicy {
    /// Continuous group commit: a flush starts as soon as the previous one ends and covers
    /// everything appended meanwhile. The default: readers and `DURABLE` acks wait at most about
    /// one fsync.
    #[default]
    Always,
    /// One flush every N milliseconds while there is unflushed data. Fewer fsyncs, but readers
    /// and durable acks wait up to N ms.
    IntervalMs(u64),
}

/// A configuration value out of its bounds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid value for `{key}`: {message}")]
pub struct ConfigError {
    /// The config key, as users spell it.
    pub key: &'static str,
    /// What is wrong and what the bounds are.
    pub message: String,
}

/// Configuration of one partition log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// A segment rolls when the next batch would take it past this size. Bounded by 2 GiB
    /// because index entries store file positions as `u32` (and every segment is mapped whole).
    pub segment_bytes_max: u64,
    /// A non-empty active segment rolls when it is older than this (its first batch's timestamp).
    pub segment_ms: u64,
    /// Largest batch `append` accepts.
    pub batch_bytes_max: u32,
    /// One offset-index entry per this many bytes of log (sparse index).
    pub index_interval_bytes: u32,
    /// Segment space is reserved (`fallocate`) in chunks of this size ahead of the writes, so a
    /// full disk shows up as a clean error before a write, and files do not fragment.
    pub preallocate_bytes: u64,
    /// When to fsync.
    pub fsync: FsyncPolicy,
    /// Delete the oldest sealed segments while the log is larger than this.
    pub retention_bytes: Option<u64>,
    /// Delete sealed segments whose newest record is older than this.
    pub retention_ms: Option<u64>,
    /// The flusher persists the recovery point at most this often (and at every roll and close).
    pub recovery_point_interval_ms: u64,
}

/// 2 GiB: positions in the offset index are `u32`, and a whole segment is mapped at once.
pub const SEGMENT_BYTES_LIMIT: u64 = 2 * 1024 * 1024 * 1024;
/// 64 KiB: smaller segments would roll on nearly every batch.
pub const SEGMENT_BYTES_MIN: u64 = 64 * 1024;

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            segment_bytes_max: 1024 * 1024 * 1024,
            segment_ms: 7 * 24 * 3600 * 1000,
            batch_bytes_max: 8 * 1024 * 1024,
            index_interval_bytes: 4096,
            preallocate_bytes: 16 * 1024 * 1024,
            fsync: FsyncPolicy::Always,
            retention_bytes: None,
            retention_ms: None,
            recovery_point_interval_ms: 10_000,
        }
    }
}

impl LogConfig {
    /// Checks every field and the relations between them.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |key: &'static str, message: String| Err(ConfigError { key, message });
        if !(SEGMENT_BYTES_MIN..=SEGMENT_BYTES_LIMIT).contains(&self.segment_bytes_max) {
            return err(
                "segment_bytes_max",
                format!(
                    "{} is outside [{SEGMENT_BYTES_MIN}, {SEGMENT_BYTES_LIMIT}]",
                    self.segment_bytes_max
                ),
            );
        }
        if self.segment_ms == 0 {
            return err("segment_ms", "must be at least 1".into());
        }
        if (self.batch_bytes_max as usize) < HEADER_LEN || self.batch_bytes_max > BATCH_LEN_MAX {
            return err(
                "batch_bytes_max",
                format!(
                    "{} is outside [{HEADER_LEN}, {BATCH_LEN_MAX}]",
                    self.batch_bytes_max
                ),
            );
        }
        if u64::from(self.batch_bytes_max) > self.segment_bytes_max {
            return err(
                "batch_bytes_max",
                format!(
                    "{} is larger than segment_bytes_max ({}): such a batch could never be stored",
                    self.batch_bytes_max, self.segment_bytes_max
                ),
            );
        }
        if !(128..=(16 * 1024 * 1024)).contains(&self.index_interval_bytes) {
            return err(
                "index_interval_bytes",
                format!("{} is outside [128, 16777216]", self.index_interval_bytes),
            );
        }
        if !(4096..=(1024 * 1024 * 1024)).contains(&self.preallocate_bytes) {
            return err(
                "preallocate_bytes",
                format!("{} is outside [4096, 1073741824]", self.preallocate_bytes),
            );
        }
        if let FsyncPolicy::IntervalMs(ms) = self.fsync {
            if !(1..=3_600_000).contains(&ms) {
                return err("fsync_interval_ms", format!("{ms} is outside [1, 3600000]"));
            }
        }
        if self.retention_bytes == Some(0) {
            return err("retention_bytes", "must be at least 1 (or unset)".into());
        }
        if self.retention_ms == Some(0) {
            return err("retention_ms", "must be at least 1 (or unset)".into());
        }
        if self.recovery_point_interval_ms == 0 {
            return err("recovery_point_interval_ms", "must be at least 1".into());
        }
        Ok(())
    }

    /// Offset-index capacity in entries: at most one entry per `index_interval_bytes`.
    pub(crate) fn index_entries_max(&self) -> usize {
        (self.segment_bytes_max / u64::from(self.index_interval_bytes)) as usize + 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_defaults_when_validated_should_pass() {
        assert_eq!(LogConfig::default().validate(), Ok(()));
    }

    #[test]
    fn given_batch_larger_than_segment_when_validated_should_name_the_key() {
        let config = LogConfig {
            segment_bytes_max: SEGMENT_BYTES_MIN,
            batch_bytes_max: 1024 * 1024,
            ..LogConfig::default()
        };
        let error = config.validate().unwrap_err();
        assert_eq!(error.key, "batch_bytes_max");
        assert!(error.message.contains("segment_bytes_max"), "{error}");
    }

    #[test]
    fn given_out_of_range_values_when_validated_should_reject_each() {
        let cases: Vec<(LogConfig, &str)> = vec![
            (
                LogConfig {
                    segment_bytes_max: 1,
                    ..Default::default()
                },
                "segment_bytes_max",
            ),
            (
                LogConfig {
                    segment_bytes_max: SEGMENT_BYTES_LIMIT + 1,
                    ..Default::default()
                },
                "segment_bytes_max",
            ),
            (
                LogConfig {
                    index_interval_bytes: 1,
                    ..Default::default()
                },
                "index_interval_bytes",
            ),
            (
                LogConfig {
                    fsync: FsyncPolicy::IntervalMs(0),
                    ..Default::default()
                },
                "fsync_interval_ms",
            ),
            (
                LogConfig {
                    retention_bytes: Some(0),
                    ..Default::default()
                },
                "retention_bytes",
            ),
            (
                LogConfig {
                    segment_ms: 0,
                    ..Default::default()
                },
                "segment_ms",
            ),
        ];
        for (config, key) in cases {
            assert_eq!(config.validate().map_err(|e| e.key), Err(key));
        }
    }
}
