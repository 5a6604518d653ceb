//! Topic administration types: what a topic is created with and what the broker reports.
//!
//! These mirror the `syncline.v1` messages with Rust types (enums instead of `i32`, `Option`
//! for "broker default") so callers need not touch the generated code.

use syncline_proto::v1;

use crate::error::{Error, Result};

/// What happens to old records of a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CleanupPolicy {
    /// Retention deletes whole old segments (by age and size).
    #[default]
    Delete,
    /// A table: the broker keeps the latest value of each key.
    Compact,
}

impl CleanupPolicy {
    fn to_wire(self) -> v1::CleanupPolicy {
        match self {
            CleanupPolicy::Delete => v1::CleanupPolicy::Delete,
            CleanupPolicy::Compact => v1::CleanupPolicy::Compact,
        }
    }

    /// Unknown values (a newer broker) read as `Delete`, the broker's own default.
    fn from_wire(value: i32) -> CleanupPolicy {
        match v1::CleanupPolicy::try_from(value) {
            Ok(v1::CleanupPolicy::Compact) => CleanupPolicy::Compact,
            _ => CleanupPolicy::Delete,
        }
    }

    /// `"delete"` or `"compact"`.
    pub fn as_str(self) -> &'static str {
        match self {
            CleanupPolicy::Delete => "delete",
            CleanupPolicy::Compact => "compact",
        }
    }
}

impl std::fmt::Display for CleanupPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// When the broker's log calls a write durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Continuous group commit: an fsync starts as soon as the previous one ends.
    Always,
    /// One fsync every `interval_ms` milliseconds.
    Interval {
        /// Milliseconds between fsyncs.
        interval_ms: u64,
    },
}

/// Topic settings. `None` (and `partitions: None`) take the broker's defaults; a description
/// returns the effective values.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TopicConfig {
    /// Number of partitions; `None` = broker default.
    pub partitions: Option<u32>,
    /// Delete (the default) or compact.
    pub cleanup_policy: CleanupPolicy,
    /// Age after which segments are deleted; -1 = keep forever.
    pub retention_ms: Option<i64>,
    /// Size per partition above which the oldest segments are deleted; -1 = no limit.
    pub retention_bytes: Option<i64>,
    /// Segment size at which the log rolls to a new segment.
    pub segment_bytes: Option<u64>,
    /// Segment age at which the log rolls to a new segment.
    pub segment_ms: Option<u64>,
    /// When writes become durable; `None` = broker default.
    pub fsync_policy: Option<FsyncPolicy>,
    /// Tables: how long a delete stays after compaction could remove it, in ms.
    pub delete_retention_ms: Option<u64>,
    /// Tables: share of the sealed bytes written since the last compaction that triggers the
    /// next one, in (0, 1].
    pub min_cleanable_dirty_ratio: Option<f64>,
    /// Replicas per partition; `None` = 1. Only 1 is served until replicated partitions exist.
    pub replication_factor: Option<u32>,
}

impl TopicConfig {
    /// A config with `partitions` partitions and broker defaults for everything else.
    pub fn with_partitions(partitions: u32) -> TopicConfig {
        TopicConfig {
            partitions: Some(partitions),
            ..TopicConfig::default()
        }
    }

    pub(crate) fn to_wire(&self) -> v1::TopicConfig {
        let (fsync_policy, fsync_interval_ms) = match self.fsync_policy {
            None => (v1::FsyncPolicy::Unspecified, None),
            Some(FsyncPolicy::Always) => (v1::FsyncPolicy::Always, None),
            Some(FsyncPolicy::Interval { interval_ms }) => {
                (v1::FsyncPolicy::Interval, Some(interval_ms))
            }
        };
        v1::TopicConfig {
            partitions: self.partitions,
            cleanup_policy: self.cleanup_policy.to_wire() as i32,
            retention_ms: self.retention_ms,
            retention_bytes: self.retention_bytes,
            segment_bytes: self.segment_bytes,
            segment_ms: self.segment_ms,
            fsync_policy: fsync_policy as i32,
            fsync_interval_ms,
            delete_retention_ms: self.delete_retention_ms,
            min_cleanable_dirty_ratio: self.min_cleanable_dirty_ratio,
            replication_factor: self.replication_factor,
        }
    }

    pub(crate) fn from_wire(config: &v1::TopicConfig) -> TopicConfig {
        let fsync_policy = match v1::FsyncPolicy::try_from(config.fsync_policy) {
            Ok(v1::FsyncPolicy::Always) => Some(FsyncPolicy::Always),
            Ok(v1::FsyncPolicy::Interval) => Some(FsyncPolicy::Interval {
                interval_ms: config.fsync_interval_ms.unwrap_or(0),
            }),
            _ => None,
        };
        TopicConfig {
            partitions: config.partitions,
            cleanup_policy: CleanupPolicy::from_wire(config.cleanup_policy),
            retention_ms: config.retention_ms,
            retention_bytes: config.retention_bytes,
            segment_bytes: config.segment_bytes,
            segment_ms: config.segment_ms,
            fsync_policy,
            delete_retention_ms: config.delete_retention_ms,
            min_cleanable_dirty_ratio: config.min_cleanable_dirty_ratio,
            replication_factor: config.replication_factor,
        }
    }
}

/// One line of a topic listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSummary {
    /// The topic's name.
    pub name: String,
    /// Its number of partitions.
    pub partitions: u32,
    /// Delete or compact.
    pub cleanup_policy: CleanupPolicy,
    /// This incarnation of the topic (see [`TopicDescription::topic_id`]).
    pub topic_id: String,
}

impl TopicSummary {
    pub(crate) fn from_wire(summary: v1::TopicSummary) -> TopicSummary {
        TopicSummary {
            cleanup_policy: CleanupPolicy::from_wire(summary.cleanup_policy),
            name: summary.name,
            partitions: summary.partitions,
            topic_id: summary.topic_id,
        }
    }
}

/// A topic's effective config and the state of each partition.
#[derive(Debug, Clone, PartialEq)]
pub struct TopicDescription {
    /// The topic's name.
    pub name: String,
    /// Effective settings.
    pub config: TopicConfig,
    /// One entry per partition, in partition order.
    pub partitions: Vec<PartitionDescription>,
    /// This incarnation of the topic: a topic deleted and created again under the same name
    /// has another id (and no committed offsets). Empty from brokers without topic ids.
    pub topic_id: String,
}

impl TopicDescription {
    pub(crate) fn from_wire(description: Option<v1::TopicDescription>) -> Result<Self> {
        let Some(description) = description else {
            return Err(Error::Protocol(
                "the broker's answer has no topic description".to_owned(),
            ));
        };
        let mut partitions: Vec<PartitionDescription> = description
            .partitions
            .into_iter()
            .map(PartitionDescription::from_wire)
            .collect();
        partitions.sort_by_key(|partition| partition.partition);
        Ok(TopicDescription {
            name: description.name,
            config: description
                .config
                .as_ref()
                .map(TopicConfig::from_wire)
                .unwrap_or_default(),
            partitions,
            topic_id: description.topic_id,
        })
    }

    /// The number of partitions: the config's count, or the partitions listed when the config
    /// leaves it out.
    pub fn partition_count(&self) -> u32 {
        match self.config.partitions {
            Some(count) => count,
            None => u32::try_from(self.partitions.len()).unwrap_or(u32::MAX),
        }
    }
}

/// The state of one partition.
#[derive(Debug, Clone, PartialEq)]
pub struct PartitionDescription {
    /// The partition number.
    pub partition: u32,
    /// First retained offset.
    pub log_start_offset: u64,
    /// Offsets below this are fsync'd and visible to readers (the high watermark).
    pub durable_offset: u64,
    /// The next offset the partition will assign.
    pub log_end_offset: u64,
    /// Bytes on disk.
    pub size_bytes: u64,
    /// Number of segments.
    pub segments: u32,
    /// Why the partition is fenced, if it is.
    pub error: Option<String>,
    /// Tables: share of the sealed bytes written since the last compaction pass.
    pub dirty_ratio: f64,
    /// Tables: when the last compaction pass finished (ms since the epoch; 0 = never).
    pub last_compaction_ms: i64,
    /// Tables: bytes compaction removed over the partition's life.
    pub bytes_reclaimed: u64,
    /// Tables: deletes below this offset may have been removed by compaction (0 = none).
    pub compaction_horizon: u64,
    /// Tables: records the last compaction pass (since the broker started) kept only for
    /// idempotent producers ([`CompactionOutcome::records_kept_for_producers`]).
    pub records_kept_for_producers: u64,
}

/// What one compaction pass did to one partition ([`crate::Client::compact_topic`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactionOutcome {
    /// The partition.
    pub partition: u32,
    /// Bytes of the segments the pass rewrote.
    pub bytes_before: u64,
    /// Bytes of their replacements.
    pub bytes_after: u64,
    /// Superseded records and expired deletes removed.
    pub records_removed: u64,
    /// Expired deletes removed.
    pub tombstones_removed: u64,
    /// Segments rewritten.
    pub segments_before: u32,
    /// Segments written.
    pub segments_after: u32,
    /// Why this partition could not be compacted, if it could not.
    pub error: Option<String>,
    /// Superseded records (and expired deletes) kept only because their batch is a recent
    /// batch of an idempotent producer (kept whole for its retries, until the producer has
    /// not written for 2 minutes).
    pub records_kept_for_producers: u64,
    /// The batches holding them.
    pub batches_kept_for_producers: u64,
}

impl CompactionOutcome {
    pub(crate) fn from_wire(outcome: v1::CompactionOutcome) -> CompactionOutcome {
        CompactionOutcome {
            partition: outcome.partition,
            bytes_before: outcome.bytes_before,
            bytes_after: outcome.bytes_after,
            records_removed: outcome.records_removed,
            tombstones_removed: outcome.tombstones_removed,
            segments_before: outcome.segments_before,
            segments_after: outcome.segments_after,
            error: (!outcome.error.is_empty()).then_some(outcome.error),
            records_kept_for_producers: outcome.records_kept_for_producers,
            batches_kept_for_producers: outcome.batches_kept_for_producers,
        }
    }
}

impl PartitionDescription {
    fn from_wire(partition: v1::PartitionDescription) -> PartitionDescription {
        PartitionDescription {
            partition: partition.partition,
            log_start_offset: partition.log_start_offset,
            durable_offset: partition.durable_offset,
            log_end_offset: partition.log_end_offset,
            size_bytes: partition.size_bytes,
            segments: partition.segments,
            error: (!partition.error.is_empty()).then_some(partition.error),
            dirty_ratio: partition.dirty_ratio,
            last_compaction_ms: partition.last_compaction_ms,
            bytes_reclaimed: partition.bytes_reclaimed,
            compaction_horizon: partition.compaction_horizon,
            records_kept_for_producers: partition.records_kept_for_producers,
        }
    }
}

/// Which offset [`crate::Client::list_offsets`] looks up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetQuery {
    /// The first retained offset.
    Earliest,
    /// The durable offset: the next offset a reader will see.
    Latest,
    /// The first offset whose timestamp is at or after this many ms since the Unix epoch.
    Timestamp(i64),
}

/// The answer to [`crate::Client::list_offsets`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListedOffset {
    /// The offset.
    pub offset: u64,
    /// For [`OffsetQuery::Timestamp`]: false when no record is that recent (`offset` is then
    /// the latest offset). Always true for the other queries.
    pub found: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_config_should_round_trip_through_the_wire_form() {
        let config = TopicConfig {
            partitions: Some(3),
            cleanup_policy: CleanupPolicy::Compact,
            retention_ms: Some(-1),
            retention_bytes: Some(1 << 30),
            segment_bytes: Some(1 << 20),
            segment_ms: None,
            fsync_policy: Some(FsyncPolicy::Interval { interval_ms: 5 }),
            delete_retention_ms: Some(60_000),
            min_cleanable_dirty_ratio: Some(0.25),
            replication_factor: Some(1),
        };
        assert_eq!(TopicConfig::from_wire(&config.to_wire()), config);
        let defaults = TopicConfig::default();
        let wire = defaults.to_wire();
        assert_eq!(wire.partitions, None, "unset must stay absent on the wire");
        assert_eq!(wire.replication_factor, None);
        assert_eq!(wire.cleanup_policy, v1::CleanupPolicy::Delete as i32);
        assert_eq!(TopicConfig::from_wire(&wire), defaults);
    }

    #[test]
    fn description_without_topic_should_be_a_protocol_error() {
        assert!(matches!(
            TopicDescription::from_wire(None),
            Err(Error::Protocol(_))
        ));
    }

    #[test]
    fn partition_count_should_fall_back_to_listed_partitions() {
        let description = TopicDescription::from_wire(Some(v1::TopicDescription {
            name: "t".into(),
            config: None,
            partitions: vec![
                v1::PartitionDescription {
                    partition: 1,
                    error: "fenced".into(),
                    ..Default::default()
                },
                v1::PartitionDescription::default(),
            ],
            ..Default::default()
        }))
        .unwrap();
        assert_eq!(description.partition_count(), 2);
        assert_eq!(description.partitions[0].partition, 0);
        assert_eq!(description.partitions[1].error.as_deref(), Some("fenced"));
    }
}
