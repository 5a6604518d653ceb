//! The client's error type.
//!
//! One enum for the whole crate, split the way a caller decides what to do:
//! - the broker rejected a request ([`Error::Broker`]: its gRPC code and the message the broker
//!   wrote for people),
//! - the broker could not be reached ([`Error::Unreachable`], always naming the address),
//! - a cluster node does not lead the partition (or coordinate the group) the call was for
//!   ([`Error::NotLeader`], transient: the client refreshes its view and retries),
//! - the caller asked for something invalid before anything was sent ([`Error::InvalidAddress`],
//!   [`Error::InvalidConfig`], [`Error::UnknownPartition`], [`Error::RecordTooLarge`],
//!   [`Error::TooManyHeaders`]),
//! - a delivery or a read gave up ([`Error::DeliveryTimeout`], [`Error::OffsetOutOfRange`]),
//! - a table write lost a compare-and-set ([`Error::Conflict`]: nothing was written), a table
//!   call went to a topic that is not a table ([`Error::NotATable`]), or an idempotent producer
//!   was fenced by a newer instance of itself ([`Error::ProducerFenced`]),
//! - the data or the broker's answer is wrong ([`Error::Corrupt`], [`Error::Protocol`]).
//!
//! Errors are `Clone` because one failed batch fails the delivery future of every record in it.

use std::error::Error as _;

use bytes::Bytes;
use syncline_proto::batch::BatchError;
use syncline_proto::v1;
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

    /// The node does not lead the call's partition (or coordinate its group): the client's view
    /// of the cluster was out of date. FAILED_PRECONDITION with a `NotLeader` detail; transient
    /// (the client routes the retry to `leader_id` or refreshes its view).
    #[error("{message}")]
    NotLeader {
        /// The partition's topic (`__offsets` for a group call).
        topic: String,
        /// The partition.
        partition: u32,
        /// The leader's node id, when the node knows it.
        leader_id: Option<u64>,
        /// The leader's advertised `HOST:PORT`; empty when unknown.
        leader_address: String,
        /// The broker's message.
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
    #[error("topic `{topic}` has no partition {partition} (it has {partitions})")]
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

    /// A batch could not be delivered within the producer's delivery timeout. Its outcome is
    /// unknown when an attempt failed after it was sent (a lost connection, a leader that died
    /// before answering: `attempts` above 1, or a transport error): a node may have stored it,
    /// and a new leader may still hold it. Nothing retries it later (the producer and the
    /// table's conditional writer continue under a new producer id, so no later write is
    /// taken for it); read the key or the log to find out.
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

    /// A compare-and-set condition did not hold: nothing was written. `current` is the key's
    /// version when the broker checked (`None`: absent or deleted).
    #[error(
        "version conflict on key {}: {}",
        show_key(key),
        current.map_or_else(|| "key is absent".to_owned(), |version| format!("current version is {version}"))
    )]
    Conflict {
        /// The table.
        topic: String,
        /// The conditioned key.
        key: Bytes,
        /// Its current version, or `None` when it is absent or deleted.
        current: Option<u64>,
    },

    /// A table operation on a topic that is not a table (not created with cleanup=compact).
    #[error(
        "topic `{topic}` is not a table: tables are topics created with cleanup=compact \
         (`syncline topic create {topic} --cleanup compact`)"
    )]
    NotATable {
        /// The topic.
        topic: String,
    },

    /// A [`crate::SyncTable`]'s change receiver fell behind by more than the change buffer
    /// holds: `missed` changes were dropped for it. The table itself is complete; re-read it
    /// ([`crate::SyncTable::entries_and_changes`]) to resynchronise.
    #[error("the change receiver fell behind: {missed} change(s) were dropped for it")]
    ChangesLagged {
        /// Changes dropped for this receiver.
        missed: u64,
    },

    /// A [`crate::SyncTable`] would hold more keys than its configured maximum.
    #[error("table `{topic}` has more than {max} keys, the configured maximum (keys_max)")]
    TableTooLarge {
        /// The table.
        topic: String,
        /// The limit.
        max: usize,
    },

    /// Another instance re-initialised this idempotent producer's id (a newer epoch), so this
    /// one may not write any more: two writers with one identity would break exactly-once.
    #[error(
        "producer {producer_id} epoch {epoch} is fenced: another instance re-initialised this \
         producer id, so this one accepts no more records (broker: {message})"
    )]
    ProducerFenced {
        /// The producer id.
        producer_id: u64,
        /// This instance's (old) epoch.
        epoch: u32,
        /// The broker's message.
        message: String,
    },
}

impl Error {
    /// The gRPC status code of an error the broker returned, if it is one.
    pub fn code(&self) -> Option<Code> {
        match self {
            Error::Broker { code, .. } => Some(*code),
            Error::Unreachable { .. } => Some(Code::Unavailable),
            Error::Conflict { .. }
            | Error::NotATable { .. }
            | Error::ProducerFenced { .. }
            | Error::NotLeader { .. } => Some(Code::FailedPrecondition),
            _ => None,
        }
    }

    /// Whether this failure says the partition's leader is gone or moving (a node down or
    /// unreachable, or not the leader any more): retries then poll at a short, fixed pace
    /// (100 ms at most) so that a write lands soon after the new
    /// leader is elected, instead of backing off exponentially.
    pub fn is_leader_change(&self) -> bool {
        match self {
            Error::Unreachable { .. } | Error::NotLeader { .. } => true,
            Error::Broker { code, .. } => *code == Code::Unavailable,
            _ => false,
        }
    }

    /// Whether retrying the same request later may succeed: the broker was unreachable or
    /// answered UNAVAILABLE (shutting down), ABORTED or DEADLINE_EXCEEDED, or the call reached
    /// a node that does not lead its partition ([`Error::NotLeader`]).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Unreachable { .. } | Error::NotLeader { .. } => true,
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
        if let Some(detail) = syncline_proto::error_details::not_leader(&status) {
            return Error::NotLeader {
                topic: detail.topic,
                partition: detail.partition,
                leader_id: detail.leader_id,
                leader_address: detail.leader_address,
                message: status.message().to_owned(),
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

/// Whether a broker error refuses an idempotent producer's batch because a newer epoch of its
/// id exists. The status code alone cannot tell: FAILED_PRECONDITION also means a fenced
/// (corrupt) partition, after which the producer must not give up its identity. The broker's
/// message for this case is "producer ID epoch E is fenced by epoch C: ...".
pub(crate) fn is_producer_fenced(code: Code, message: &str) -> bool {
    code == Code::FailedPrecondition
        && message.starts_with("producer ")
        && message.contains(" is fenced by epoch ")
}

/// The `NotLeader` a per-request error on a `ProduceStream` stands for: such an error carries
/// only a code and a message (no details), so the broker's message is read. It is
/// "this node does not lead partition P of topic `T`; node ID at ADDRESS does", or ending
/// "; its leader is not known yet" while an election runs (the broker's `NotLeader` error).
/// `None` for any other error, including other FAILED_PRECONDITIONs (a fenced producer or
/// partition, a stale topic incarnation), which must not be retried.
pub(crate) fn not_leader_in_message(code: Code, message: &str) -> Option<v1::NotLeader> {
    if code != Code::FailedPrecondition {
        return None;
    }
    let rest = message.strip_prefix("this node does not lead partition ")?;
    let (partition, rest) = rest.split_once(" of topic `")?;
    let partition = partition.parse().ok()?;
    let (topic, rest) = rest.split_once('`')?;
    let leader = rest
        .strip_prefix("; node ")
        .and_then(|rest| rest.split_once(" at "))
        .and_then(|(id, rest)| Some((id.parse::<u64>().ok()?, rest.strip_suffix(" does")?)));
    Some(v1::NotLeader {
        topic: topic.to_owned(),
        partition,
        leader_id: leader.map(|(id, _)| id),
        leader_address: leader.map_or_else(String::new, |(_, address)| address.to_owned()),
    })
}

/// The current version of `key` from the details of a failed compare-and-set (a
/// FAILED_PRECONDITION status whose details are a `google.rpc.Status` holding a `CasConflict`,
/// or the bare `CasConflict` of older brokers): `Ok(None)` when the status carries no conflict
/// (some other failed precondition), `Ok(Some(current))` with the key's version (`None`:
/// absent or deleted).
pub(crate) fn conflict_version(details: &[u8], key: &[u8]) -> Result<Option<Option<u64>>> {
    let conflict = syncline_proto::error_details::cas_conflict(details).map_err(|error| {
        Error::Protocol(format!(
            "a failed compare-and-set carries undecodable details: {error}"
        ))
    })?;
    let Some(conflict) = conflict else {
        return Ok(None);
    };
    let current = conflict
        .current
        .iter()
        .find(|current| current.key == key)
        .ok_or_else(|| {
            Error::Protocol(format!(
                "a failed compare-and-set does not report the version of key {}",
                show_key(key)
            ))
        })?;
    Ok(Some((!current.absent).then_some(current.version)))
}

/// A key for messages: the text when it is UTF-8, else its bytes escaped (`\xff`).
pub(crate) fn show_key(key: &[u8]) -> String {
    match std::str::from_utf8(key) {
        Ok(text) => text.to_owned(),
        Err(_) => key.escape_ascii().to_string(),
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
    use prost::Message as _;

    /// The broker's `NotLeader` message (broker/src/error.rs), both shapes, and errors that
    /// look alike but are not a leader change.
    #[test]
    fn stream_error_message_should_read_as_not_leader_only_when_it_is_one() {
        let named = "this node does not lead partition 3 of topic `orders.v1`; node 2 at \
                     10.0.0.2:7450 does";
        assert_eq!(
            not_leader_in_message(Code::FailedPrecondition, named),
            Some(v1::NotLeader {
                topic: "orders.v1".to_owned(),
                partition: 3,
                leader_id: Some(2),
                leader_address: "10.0.0.2:7450".to_owned(),
            })
        );
        let electing = "this node does not lead partition 0 of topic `t`; its leader is not \
                        known yet";
        assert_eq!(
            not_leader_in_message(Code::FailedPrecondition, electing),
            Some(v1::NotLeader {
                topic: "t".to_owned(),
                partition: 0,
                leader_id: None,
                leader_address: String::new(),
            })
        );
        assert_eq!(not_leader_in_message(Code::Unavailable, named), None);
        for other in [
            "producer 7 epoch 0 is fenced by epoch 1: re-initialised",
            "partition 0 of topic `t` is fenced: bad checksum",
            "this node does not lead partition x of topic `t`; node 2 at a does",
        ] {
            assert_eq!(
                not_leader_in_message(Code::FailedPrecondition, other),
                None,
                "{other}"
            );
        }
    }

    #[test]
    fn given_broker_status_should_keep_code_and_message() {
        let error = Error::from_status(
            "127.0.0.1:1",
            tonic::Status::not_found("topic `x` does not exist"),
        );
        assert!(matches!(
            &error,
            Error::Broker { code: Code::NotFound, message } if message == "topic `x` does not exist"
        ));
        assert_eq!(error.to_string(), "topic `x` does not exist");
        assert!(!error.is_transient());
        assert_eq!(error.code(), Some(Code::NotFound));
    }

    #[test]
    fn given_not_leader_detail_should_be_a_transient_not_leader_naming_the_leader() {
        let detail = v1::NotLeader {
            topic: "orders".into(),
            partition: 2,
            leader_id: Some(3),
            leader_address: "127.0.0.1:7452".into(),
        };
        let status = syncline_proto::error_details::not_leader_status("not the leader", &detail);
        let error = Error::from_status("a:1", status);
        assert!(matches!(
            &error,
            Error::NotLeader { topic, partition: 2, leader_id: Some(3), leader_address, .. }
                if topic == "orders" && leader_address == "127.0.0.1:7452"
        ));
        assert!(error.is_transient());
        assert_eq!(error.code(), Some(Code::FailedPrecondition));
        assert_eq!(error.to_string(), "not the leader");
        // A failed precondition without the detail stays final.
        let fenced = Error::from_status("a:1", tonic::Status::failed_precondition("fenced"));
        assert!(!fenced.is_transient());
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

    /// Details as the broker sends them: a `google.rpc.Status` with the conflict as an `Any`.
    fn cas_details(current: Vec<v1::KeyVersion>) -> Vec<u8> {
        syncline_proto::error_details::cas_conflict_status(
            "version conflict",
            &v1::CasConflict { current },
        )
        .details()
        .to_vec()
    }

    #[test]
    fn given_bare_cas_conflict_of_an_older_broker_should_still_decode() {
        let bare = v1::CasConflict {
            current: vec![v1::KeyVersion {
                key: Bytes::from_static(b"counter"),
                version: 7,
                absent: false,
            }],
        }
        .encode_to_vec();
        assert_eq!(conflict_version(&bare, b"counter").unwrap(), Some(Some(7)));
    }

    #[test]
    fn given_cas_conflict_details_should_decode_the_current_version_of_the_key() {
        let details = cas_details(vec![
            v1::KeyVersion {
                key: Bytes::from_static(b"other"),
                version: 1,
                absent: false,
            },
            v1::KeyVersion {
                key: Bytes::from_static(b"counter"),
                version: 42,
                absent: false,
            },
        ]);
        assert_eq!(
            conflict_version(&details, b"counter").unwrap(),
            Some(Some(42))
        );
        let absent = cas_details(vec![v1::KeyVersion {
            key: Bytes::from_static(b"counter"),
            version: 0,
            absent: true,
        }]);
        assert_eq!(conflict_version(&absent, b"counter").unwrap(), Some(None));
    }

    #[test]
    fn given_no_details_should_not_be_a_conflict() {
        assert_eq!(conflict_version(&[], b"k").unwrap(), None);
    }

    #[test]
    fn given_bad_or_incomplete_cas_details_should_be_a_protocol_error() {
        assert!(matches!(
            conflict_version(&[0xff, 0xff, 0xff], b"k"),
            Err(Error::Protocol(_))
        ));
        let other_key = cas_details(vec![v1::KeyVersion {
            key: Bytes::from_static(b"other"),
            version: 3,
            absent: false,
        }]);
        assert!(matches!(
            conflict_version(&other_key, b"k"),
            Err(Error::Protocol(_))
        ));
    }

    #[test]
    fn conflict_should_name_the_key_and_its_current_version() {
        let conflict = |current| Error::Conflict {
            topic: "t".into(),
            key: Bytes::from_static(b"user-1"),
            current,
        };
        assert_eq!(
            conflict(Some(42)).to_string(),
            "version conflict on key user-1: current version is 42"
        );
        assert_eq!(
            conflict(None).to_string(),
            "version conflict on key user-1: key is absent"
        );
        let binary = Error::Conflict {
            topic: "t".into(),
            key: Bytes::from_static(&[0xff, b'a']),
            current: Some(1),
        };
        assert_eq!(
            binary.to_string(),
            "version conflict on key \\xffa: current version is 1"
        );
        assert_eq!(conflict(None).code(), Some(Code::FailedPrecondition));
    }

    #[test]
    fn not_a_table_should_say_how_to_create_one() {
        let error = Error::NotATable {
            topic: "events".into(),
        };
        assert!(error
            .to_string()
            .contains("`syncline topic create events --cleanup compact`"));
    }

    #[test]
    fn producer_fence_should_be_told_apart_from_a_fenced_partition() {
        assert!(is_producer_fenced(
            Code::FailedPrecondition,
            "producer 7 epoch 0 is fenced by epoch 1: another instance re-initialised this producer id"
        ));
        assert!(!is_producer_fenced(
            Code::FailedPrecondition,
            "partition 0 of topic `t` is fenced: bad CRC at offset 12"
        ));
        assert!(!is_producer_fenced(
            Code::OutOfRange,
            "producer 7 epoch 0 is fenced by epoch 1"
        ));
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
