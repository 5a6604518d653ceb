//! [`GroupConsumerConfig`]: a member's settings and their bounds.

use std::time::Duration;

use crate::consumer::{ConsumerConfig, OffsetReset};
use crate::error::{Error, Result};

/// Largest `buffered_records_max`: beyond it the buffer is no longer a bound worth having.
const BUFFERED_RECORDS_LIMIT: usize = 10_000_000;
/// Most events kept for a slow event reader.
const EVENTS_BUFFERED_LIMIT: usize = 1_000_000;
/// The session timeouts the broker accepts (JoinGroup's contract).
const SESSION_TIMEOUT_MIN: Duration = Duration::from_secs(1);
const SESSION_TIMEOUT_MAX: Duration = Duration::from_secs(300);
/// The broker's default session timeout, used to bound requests when the config leaves it out.
const SESSION_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);
/// Longest fetch long-poll (as for the plain consumer).
const FETCH_MAX_WAIT_LIMIT: Duration = Duration::from_secs(60);
/// Longest pause between retries.
const RETRY_BACKOFF_LIMIT: Duration = Duration::from_secs(60);
/// Shortest auto-commit interval: commits are a durable write on the broker each.
const AUTO_COMMIT_INTERVAL_MIN: Duration = Duration::from_millis(10);
/// Group readers retry transient fetch errors for as long as the member owns the partition:
/// the heartbeat, not the reader, decides when the partition is lost.
const READER_RETRY_TIMEOUT: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// [`GroupConsumer`](super::GroupConsumer) settings. The defaults: broker-default session
/// (10 s), auto-commit every 5 s, earliest start without a commit, 10 000 records buffered.
#[derive(Debug, Clone)]
pub struct GroupConsumerConfig {
    /// How long the coordinator waits for a heartbeat before it gives this member's partitions
    /// to others; `None` = the broker's default (10 s). Within [1 s, 300 s].
    pub session_timeout: Option<Duration>,
    /// Commit the processed positions this often; `None` turns auto-commit off (then commit
    /// with [`GroupConsumer::commit`]; revocation and close still commit).
    pub auto_commit_interval: Option<Duration>,
    /// Where a partition without a committed offset starts, and what to do when a position
    /// is out of range: [`OffsetReset::Earliest`] (the default), [`OffsetReset::Latest`], or
    /// [`OffsetReset::Error`] (yield an error and do not read the partition).
    pub offset_reset: OffsetReset,
    /// Records buffered ahead of [`GroupConsumer::recv`] over all partitions (each reader may
    /// add one fetch response beyond it).
    pub buffered_records_max: usize,
    /// How long one fetch waits on the broker for new data (long-poll).
    pub fetch_max_wait: Duration,
    /// Byte budget of one fetch response (the broker returns at least one batch).
    pub fetch_bytes_max: u32,
    /// First pause before a retry of a failed heartbeat, join or fetch; doubled up to
    /// `retry_backoff_max`.
    pub retry_backoff: Duration,
    /// Longest pause between retries.
    pub retry_backoff_max: Duration,
    /// Shown by DescribeGroup for this member; `None` = `syncline-client/PID`.
    pub client_id: Option<String>,
    /// Events kept for a [`GroupEvents`] reader that has not caught up; older ones are dropped
    /// for it (it is told how many).
    pub events_buffered_max: usize,
    /// Records count as processed only when the application calls
    /// [`GroupConsumer::commit`](super::GroupConsumer::commit) or `close`, not when it asks
    /// for the next one: for an application that takes a batch of records before it applies
    /// them. Background commits (auto-commit, a revoked partition) then store only what the
    /// application committed, so a crash with a batch in hand never skips it. Default false.
    pub processed_on_commit_only: bool,
}

impl Default for GroupConsumerConfig {
    fn default() -> Self {
        GroupConsumerConfig {
            session_timeout: None,
            auto_commit_interval: Some(Duration::from_secs(5)),
            offset_reset: OffsetReset::Earliest,
            buffered_records_max: 10_000,
            fetch_max_wait: Duration::from_millis(500),
            fetch_bytes_max: 1024 * 1024,
            retry_backoff: Duration::from_millis(100),
            retry_backoff_max: Duration::from_secs(1),
            client_id: None,
            events_buffered_max: 1024,
            processed_on_commit_only: false,
        }
    }
}

impl GroupConsumerConfig {
    /// Checks each field against its bounds.
    pub fn validate(&self) -> Result<()> {
        let invalid = |key: &'static str, reason: String| Err(Error::InvalidConfig { key, reason });
        if let Some(timeout) = self.session_timeout {
            if !(SESSION_TIMEOUT_MIN..=SESSION_TIMEOUT_MAX).contains(&timeout) {
                return invalid(
                    "session_timeout",
                    format!(
                        "{timeout:?} is outside [{SESSION_TIMEOUT_MIN:?}, {SESSION_TIMEOUT_MAX:?}]"
                    ),
                );
            }
        }
        if let Some(interval) = self.auto_commit_interval {
            if interval < AUTO_COMMIT_INTERVAL_MIN {
                return invalid(
                    "auto_commit_interval",
                    format!("{interval:?} is below {AUTO_COMMIT_INTERVAL_MIN:?}"),
                );
            }
        }
        if !(1..=BUFFERED_RECORDS_LIMIT).contains(&self.buffered_records_max) {
            return invalid(
                "buffered_records_max",
                format!(
                    "{} is outside [1, {BUFFERED_RECORDS_LIMIT}]",
                    self.buffered_records_max
                ),
            );
        }
        if self.fetch_max_wait > FETCH_MAX_WAIT_LIMIT {
            return invalid(
                "fetch_max_wait",
                format!(
                    "{:?} is above the maximum of {FETCH_MAX_WAIT_LIMIT:?}",
                    self.fetch_max_wait
                ),
            );
        }
        if self.fetch_bytes_max == 0 {
            return invalid("fetch_bytes_max", "must be above 0".to_owned());
        }
        if self.retry_backoff.is_zero()
            || self.retry_backoff > self.retry_backoff_max
            || self.retry_backoff_max > RETRY_BACKOFF_LIMIT
        {
            return invalid(
                "retry_backoff",
                format!(
                    "need 0 < retry_backoff ({:?}) <= retry_backoff_max ({:?}) <= {RETRY_BACKOFF_LIMIT:?}",
                    self.retry_backoff, self.retry_backoff_max
                ),
            );
        }
        if !(1..=EVENTS_BUFFERED_LIMIT).contains(&self.events_buffered_max) {
            return invalid(
                "events_buffered_max",
                format!(
                    "{} is outside [1, {EVENTS_BUFFERED_LIMIT}]",
                    self.events_buffered_max
                ),
            );
        }
        Ok(())
    }

    /// Absent (the broker's default) unless the config sets one.
    pub(super) fn session_timeout_ms(&self) -> Option<u32> {
        self.session_timeout
            .map(|timeout| u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX))
    }

    /// How long one coordinator request may take before it counts as a transient failure.
    pub(super) fn request_timeout(&self) -> Duration {
        self.session_timeout.unwrap_or(SESSION_TIMEOUT_DEFAULT)
    }

    pub(super) fn reader_config(&self) -> ConsumerConfig {
        ConsumerConfig {
            offset_reset: self.offset_reset,
            fetch_max_wait: self.fetch_max_wait,
            fetch_bytes_max: self.fetch_bytes_max,
            retry_timeout: READER_RETRY_TIMEOUT,
            retry_backoff: self.retry_backoff.min(Duration::from_secs(1)),
            buffered_responses_max: 1,
            ..ConsumerConfig::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_validation_should_name_the_key() {
        GroupConsumerConfig::default().validate().unwrap();
        let cases: [(GroupConsumerConfig, &str); 4] = [
            (
                GroupConsumerConfig {
                    session_timeout: Some(Duration::from_millis(10)),
                    ..Default::default()
                },
                "session_timeout",
            ),
            (
                GroupConsumerConfig {
                    buffered_records_max: 0,
                    ..Default::default()
                },
                "buffered_records_max",
            ),
            (
                GroupConsumerConfig {
                    retry_backoff: Duration::from_secs(2),
                    ..Default::default()
                },
                "retry_backoff",
            ),
            (
                GroupConsumerConfig {
                    auto_commit_interval: Some(Duration::ZERO),
                    ..Default::default()
                },
                "auto_commit_interval",
            ),
        ];
        for (config, expected) in cases {
            assert!(
                matches!(config.validate(), Err(Error::InvalidConfig { key, .. }) if key == expected),
                "{expected}"
            );
        }
    }
}
