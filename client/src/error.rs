//! The client's error type.
//!
//! One enum for the whole crate, split the way a caller decides what to do:
//! - the broker rejected a request ([`Error::Broker`]: its gRPC code and the message the broker
//!   wrote for people),
//! - the broker could not be reached ([`Error::Unreachable`], always naming the address),
//! - the caller asked for something invalid before anything was sent ([`Error::InvalidAddress`],
//!   [`Error::InvalidConfig`], [`Error::UnknownPartition`], [`Error::RecordTooLarge`],
//!   [`Error::TooManyHeaders`]),
//! - a delivery or a read gave up ([`Error::DeliveryTimeout`], [`Error::OffsetOutOfRange`]),
//! - the data or the broker's answer is wrong ([`Error::Corrupt`], [`Error::Protocol`]).
//!
//! Errors are `Clone` because one failed batch fails the delivery future of every record in it.

use std::error::Error as _;

use syncline_proto::batch::BatchError;
use tonic::Code;

/// Result with the client's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the client.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The broker address could not be parsed.
    #[error("invalid broker address {address:?}: {reason}")]
    InvalidAddress {
        /// The address as given.
        address: String,
        /// What is wrong with it.
        reason: String,
    },

    /// No connection to the broker (refused, timed out, reset, name not resolved).
    #[error("cannot reach the broker at {address}: {reason}")]
    Unreachable {
        /// The broker address, as `host:port`.
        address: String,
        /// The transport's explanation.
        reason: String,
    },

    /// The broker answered the request with an error status.
    #[error("{message}")]
    Broker {
        /// The gRPC status code (NOT_FOUND for an unknown topic, ALREADY_EXISTS, ...).
        code: Code,
        /// The broker's message, written for people.
        message: String,
    },

    /// A configuration value is outside its bounds.
    #[error("invalid {key}: {reason}")]
    InvalidConfig {
        /// The configuration key, e.g. `batch_bytes_max`.
        key: &'static str,
        /// What is wrong, with the bounds.
        reason: String,
    },

    /// A partition that the topic does not have.
    #[error("topic {topic:?} has no partition {partition} (it has {partitions})")]
    UnknownPartition {
        /// The topic.
        topic: String,
        /// The partition asked for.
        partition: u32,
        /// How many partitions the topic has.
        partitions: u32,
    },

    /// A record that cannot fit in any batch or in the producer's buffer.
    #[error("record of about {size} bytes exceeds the maximum of {max} bytes")]
    RecordTooLarge {
        /// The record's encoded size (an upper bound).
        size: usize,
        /// The limit it exceeds.
        max: usize,
    },

    /// A record with more headers than a batch may carry.
    #[error("record has {count} headers, more than the maximum of {max}")]
    TooManyHeaders {
        /// Headers on the record.
        count: usize,
        /// The maximum.
        max: u32,
    },

    /// A batch could not be delivered within the producer's delivery timeout.
    #[error(
        "delivery to {topic}/{partition} failed after {attempts} attempt(s) in {elapsed_ms} ms: {}",
        last_error.as_deref().map_or_else(|| without_error(*attempts), ToString::to_string)
    )]
    DeliveryTimeout {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// Requests sent for the batch.
        attempts: u32,
        /// Time from the batch's first record to giving up.
        elapsed_ms: u64,
        /// The last transient error, if an attempt got one.
        last_error: Option<Box<Error>>,
    },

    /// The consumer's position is outside the partition's log (retention or compaction passed
    /// it) and the consumer's policy is [`crate::OffsetReset::Error`].
    #[error(
        "offset {offset} of {topic}/{partition} is out of range \
         (log start offset {log_start_offset}, latest offset {latest_offset})"
    )]
    OffsetOutOfRange {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// The offset that was asked for.
        offset: u64,
        /// The first offset the partition still holds.
        log_start_offset: u64,
        /// The partition's latest (durable) offset.
        latest_offset: u64,
    },

    /// A fetched batch failed its checks (CRC, framing, record layout).
    #[error("corrupt data from {topic}/{partition} near offset {offset}: {source}")]
    Corrupt {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// The offset the read started from.
        offset: u64,
        /// What the batch codec found.
        source: BatchError,
    },

    /// Encoding a batch failed.
    #[error("cannot encode batch: {0}")]
    Batch(#[from] BatchError),

    /// The broker's answer does not follow the protocol (a missing field, offsets that do not
    /// match the batch sent).
    #[error("protocol error: {0}")]
    Protocol(String),

    /// The producer or consumer stopped before the operation completed.
    #[error("{0} is closed")]
    Closed(&'static str),
}

impl Error {
    /// The gRPC status code of an error the broker returned, if it is one.
    pub fn code(&self) -> Option<Code> {
        match self {
            Error::Broker { code, .. } => Some(*code),
            Error::Unreachable { .. } => Some(Code::Unavailable),
            _ => None,
        }
    }

    /// Whether retrying the same request later may succeed: the broker was unreachable or
    /// answered UNAVAILABLE (shutting down), ABORTED or DEADLINE_EXCEEDED.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Unreachable { .. } => true,
            Error::Broker { code, .. } => matches!(
                code,
                Code::Unavailable | Code::Aborted | Code::DeadlineExceeded
            ),
            _ => false,
        }
    }

    /// Converts a status from a call to the broker at `address`. A status that the transport
    /// made up (it carries a source error: connection refused, reset, ...) becomes
    /// [`Error::Unreachable`]; a status the broker sent becomes [`Error::Broker`].
    pub(crate) fn from_status(address: &str, status: tonic::Status) -> Error {
        if let Some(source) = status.source() {
            let mut parts = vec![status.message().to_owned()];
            parts.extend(chain(source));
            return Error::Unreachable {
                address: address.to_owned(),
                reason: join_unique(parts),
            };
        }
        Error::Broker {
            code: status.code(),
            message: status.message().to_owned(),
        }
    }

    /// Converts a failed connection attempt to `address`.
    pub(crate) fn from_transport(address: &str, error: &tonic::transport::Error) -> Error {
        Error::Unreachable {
            address: address.to_owned(),
            reason: join_unique(chain(error)),
        }
    }
}

/// Why a delivery timed out when no attempt returned an error.
fn without_error(attempts: u32) -> String {
    if attempts == 0 {
        "not sent in time: earlier requests held every in-flight slot".to_owned()
    } else {
        "no response from the broker in time".to_owned()
    }
}

/// The messages of `error` and of each of its sources.
fn chain(error: &(dyn std::error::Error + 'static)) -> Vec<String> {
    let mut parts = Vec::new();
    let mut current = Some(error);
    while let Some(error) = current {
        parts.push(error.to_string());
        current = error.source();
    }
    parts
}

/// Joins messages with ": ", leaving out empty ones, generic wrappers ("transport error") and
/// any already contained in an earlier one: transport errors wrap several layers (tonic,
/// hyper, the connector, io) whose top message alone says nothing and whose innermost cause
/// ("Connection refused (os error 111)") is the useful part.
fn join_unique(parts: Vec<String>) -> String {
    let mut kept: Vec<String> = Vec::new();
    for part in parts {
        if part.is_empty() || part == "transport error" || kept.iter().any(|k| k.contains(&part)) {
            continue;
        }
        kept.push(part);
    }
    if kept.is_empty() {
        "transport error".to_owned()
    } else {
        kept.join(": ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_broker_status_should_keep_code_and_message() {
        let error = Error::from_status(
            "127.0.0.1:1",
            tonic::Status::not_found("topic \"x\" does not exist"),
        );
        assert!(matches!(
            &error,
            Error::Broker { code: Code::NotFound, message } if message == "topic \"x\" does not exist"
        ));
        assert_eq!(error.to_string(), "topic \"x\" does not exist");
        assert!(!error.is_transient());
        assert_eq!(error.code(), Some(Code::NotFound));
    }

    #[test]
    fn given_unavailable_from_broker_should_be_transient() {
        let error = Error::from_status("a:1", tonic::Status::unavailable("shutting down"));
        assert!(error.is_transient());
        assert!(matches!(error, Error::Broker { .. }));
    }

    #[test]
    fn given_status_with_source_should_be_unreachable_naming_the_address() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        let status = tonic::Status::from_error(Box::new(io));
        let error = Error::from_status("127.0.0.1:7450", status);
        assert!(matches!(error, Error::Unreachable { .. }), "{error:?}");
        let text = error.to_string();
        assert!(
            text.starts_with("cannot reach the broker at 127.0.0.1:7450"),
            "{text}"
        );
        assert!(text.contains("connection refused"), "{text}");
        assert!(error.is_transient());
    }

    #[test]
    fn delivery_timeout_should_name_partition_attempts_and_cause() {
        let error = Error::DeliveryTimeout {
            topic: "t".into(),
            partition: 2,
            attempts: 3,
            elapsed_ms: 30_000,
            last_error: Some(Box::new(Error::Unreachable {
                address: "h:1".into(),
                reason: "refused".into(),
            })),
        };
        assert_eq!(
            error.to_string(),
            "delivery to t/2 failed after 3 attempt(s) in 30000 ms: \
             cannot reach the broker at h:1: refused"
        );
    }
}
