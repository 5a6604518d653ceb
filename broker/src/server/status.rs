//! The one place where broker errors become gRPC statuses.
//!
//! | error | code |
//! |---|---|
//! | unknown topic, group, member or key | NOT_FOUND |
//! | duplicate topic | ALREADY_EXISTS |
//! | bad name, config, batch (also reserved attribute bits), partition, key, request (also an explicit 0 where a size or count must be positive; malformed protobuf, see `syncline_proto::codec`) | INVALID_ARGUMENT |
//! | offset outside the log; a producer sequence out of order | OUT_OF_RANGE |
//! | batch or request too large (also tonic's decode limit, see `decode_limit_to_resource_exhausted`), disk full (ENOSPC anywhere), too few descriptors for a new topic, response-bytes budget taken | RESOURCE_EXHAUSTED |
//! | partition fenced (corruption at open) or poisoned (failed write/fsync) | FAILED_PRECONDITION |
//! | CAS conflict (details: `google.rpc.Status` with a `CasConflict` `Any`) | FAILED_PRECONDITION |
//! | a partition another node leads, a group another node coordinates (details: `google.rpc.Status` with a `NotLeader` `Any`) | FAILED_PRECONDITION |
//! | stale member epoch, stale topic incarnation in a commit, partition not owned, group has members, not a table, fenced producer epoch | FAILED_PRECONDITION |
//! | a compaction pass that could not run | ABORTED |
//! | corrupt data found on read; a snapshot finding the log and key index disagree | DATA_LOSS |
//! | the cluster refused a change (too few live nodes for a placement) | FAILED_PRECONDITION |
//! | shutting down, log closed, out of file descriptors (EMFILE, ENFILE), no controller leader (election, majority down) | UNAVAILABLE |
//! | other I/O, a lock held by another process, an unclean shutdown | INTERNAL |

use tonic::Status;

use crate::error::BrokerError;
use crate::log::LogError;

/// Maps a broker error to the status clients see; the message is the error's `Display`, written
/// for people.
pub fn to_status(error: BrokerError) -> Status {
    let message = error.to_string();
    match &error {
        BrokerError::TopicNotFound { .. }
        | BrokerError::GroupNotFound { .. }
        | BrokerError::UnknownMember { .. } => Status::not_found(message),
        BrokerError::StaleMemberEpoch { .. }
        | BrokerError::StaleTopicIncarnation { .. }
        | BrokerError::NotPartitionOwner { .. }
        | BrokerError::GroupHasMembers { .. } => Status::failed_precondition(message),
        BrokerError::TopicExists { .. } => Status::already_exists(message),
        BrokerError::InvalidTopicName { .. }
        | BrokerError::InvalidConfig(_)
        | BrokerError::InvalidRequest(_)
        | BrokerError::PartitionNotFound { .. }
        | BrokerError::WrongPartitionForKey { .. } => Status::invalid_argument(message),
        BrokerError::TooLarge(_) | BrokerError::ResponseBudgetExhausted { .. } => {
            Status::resource_exhausted(message)
        }
        BrokerError::Fenced { .. } => Status::failed_precondition(message),
        // Details: a standard `google.rpc.Status` with the NotLeader as an `Any`.
        BrokerError::NotLeader {
            topic,
            partition,
            leader,
        } => syncline_proto::error_details::not_leader_status(
            message,
            &syncline_proto::v1::NotLeader {
                topic: topic.clone(),
                partition: *partition,
                leader_id: leader.id,
                leader_address: leader.address.clone(),
            },
        ),
        BrokerError::ShuttingDown
        | BrokerError::Replication { .. }
        | BrokerError::Controller(_)
        | BrokerError::ControllerUnavailable { .. } => Status::unavailable(message),
        BrokerError::ClusterRefused(_) => Status::failed_precondition(message),
        BrokerError::PermissionDenied { .. } => Status::permission_denied(message),
        BrokerError::Unauthenticated(_) => Status::unauthenticated(message),
        BrokerError::NotATable { .. } => Status::failed_precondition(message),
        BrokerError::KeyNotFound { .. } => Status::not_found(message),
        // Details: a standard `google.rpc.Status` with the CasConflict as an `Any`.
        BrokerError::CasConflict { current, .. } => {
            syncline_proto::error_details::cas_conflict_status(
                message,
                &syncline_proto::v1::CasConflict {
                    current: current.clone(),
                },
            )
        }
        BrokerError::Sequence(crate::state::SequenceError::Fenced { .. }) => {
            Status::failed_precondition(message)
        }
        BrokerError::Sequence(crate::state::SequenceError::OutOfOrder { .. }) => {
            Status::out_of_range(message)
        }
        BrokerError::Log { source, .. } => match source {
            LogError::InvalidBatch(_)
            | LogError::BatchOffsetSpan { .. }
            | LogError::NotBatchBoundary { .. }
            | LogError::Config(_) => Status::invalid_argument(message),
            LogError::BatchTooLarge { .. } | LogError::NoSpace { .. } => {
                Status::resource_exhausted(message)
            }
            LogError::OffsetOutOfRange { .. } => Status::out_of_range(message),
            LogError::Poisoned { .. } | LogError::EpochRegressed { .. } => {
                Status::failed_precondition(message)
            }
            LogError::Corrupt { .. } => Status::data_loss(message),
            LogError::Closed { .. } => Status::unavailable(message),
            LogError::Compaction { .. } => Status::aborted(message),
            LogError::Io { source, .. } if out_of_descriptors(source) => {
                Status::unavailable(message)
            }
            LogError::Io { .. } | LogError::Locked { .. } => Status::internal(message),
        },
        // Like corrupt log data: the client must not retry it forever.
        BrokerError::SnapshotInconsistent { .. } => Status::data_loss(message),
        // A full disk is the client's to wait out, wherever it struck; the message names the
        // path.
        BrokerError::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => {
            Status::resource_exhausted(message)
        }
        BrokerError::TooFewDescriptors { .. } => Status::resource_exhausted(message),
        BrokerError::Io { source, .. } if out_of_descriptors(source) => {
            Status::unavailable(message)
        }
        BrokerError::Io { .. }
        | BrokerError::DataDirLocked { .. }
        | BrokerError::DataDirFormat { .. }
        | BrokerError::DataDirIdentity { .. }
        | BrokerError::UncleanShutdown { .. } => Status::internal(message),
    }
}

/// Start of tonic's message for a request message over the decode limit (`max_decoding_message_size`),
/// which tonic answers with OUT_OF_RANGE.
const DECODE_LIMIT_MESSAGE: &str = "Error, decoded message length too large";

/// tonic answers a request message over the decode limit with OUT_OF_RANGE, the code the broker
/// uses for "offset outside the log"; this turns that one status into RESOURCE_EXHAUSTED with
/// the limit (the README's promise for "too large"). Every other status passes unchanged.
pub fn decode_limit_to_resource_exhausted(status: Status, max_batch_bytes: u32) -> Status {
    if status.code() != tonic::Code::OutOfRange
        || !status.message().starts_with(DECODE_LIMIT_MESSAGE)
    {
        return status;
    }
    // "...: found {len} bytes, the limit is: {limit} bytes"
    let number_after = |marker: &str| {
        let rest = &status.message()[status.message().find(marker)? + marker.len()..];
        rest.split(' ').next()?.parse::<u64>().ok()
    };
    let size = match (number_after("found "), number_after("the limit is: ")) {
        (Some(found), Some(limit)) => {
            format!(
                "a request message of {found} bytes exceeds the broker's limit of {limit} bytes"
            )
        }
        _ => format!(
            "a request message exceeds the broker's limit ({})",
            status.message()
        ),
    };
    Status::resource_exhausted(format!(
        "{size}: batches may hold at most max_batch_bytes ({max_batch_bytes}) bytes; send smaller batches"
    ))
}

/// The process or the system ran out of file descriptors: a transient condition of the node
/// (a retry may succeed once descriptors are freed), not a broken one.
fn out_of_descriptors(error: &std::io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn offset_out_of_range() -> BrokerError {
        BrokerError::Log {
            topic: "t".into(),
            partition: 0,
            source: LogError::OffsetOutOfRange {
                requested: 9,
                start: 0,
                end: 3,
            },
        }
    }

    #[test]
    fn given_each_error_kind_should_map_to_its_code_with_the_message() {
        let status = to_status(BrokerError::TopicNotFound { topic: "t".into() });
        assert_eq!(status.code(), Code::NotFound);
        assert_eq!(status.message(), "topic `t` does not exist");
        assert_eq!(
            to_status(BrokerError::TopicExists { topic: "t".into() }).code(),
            Code::AlreadyExists
        );
        assert_eq!(to_status(offset_out_of_range()).code(), Code::OutOfRange);
        let big = BrokerError::Log {
            topic: "t".into(),
            partition: 0,
            source: LogError::BatchTooLarge { size: 10, max: 5 },
        };
        assert_eq!(to_status(big).code(), Code::ResourceExhausted);
        assert_eq!(
            to_status(BrokerError::ShuttingDown).code(),
            Code::Unavailable
        );
        let not_a_table = to_status(BrokerError::NotATable { topic: "t".into() });
        assert_eq!(not_a_table.code(), Code::FailedPrecondition);
        assert!(not_a_table.message().contains("not a table"));
        let inconsistent = to_status(BrokerError::SnapshotInconsistent {
            topic: "t".into(),
            partition: 2,
            offset: 41,
            reason: "no record there".into(),
        });
        assert_eq!(inconsistent.code(), Code::DataLoss);
        assert_eq!(
            inconsistent.message(),
            "snapshot of partition 2 of topic `t` is inconsistent at offset 41: no record there"
        );
    }

    /// Regression (issue 13, item 6): CreateTopic on a full disk answered INTERNAL.
    #[test]
    fn given_no_space_anywhere_should_be_resource_exhausted_naming_the_path() {
        let full = BrokerError::io(
            "writing",
            "/data/~creating-1/topic.toml.tmp",
            std::io::Error::from_raw_os_error(libc::ENOSPC),
        );
        let status = to_status(full);
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(status
            .message()
            .contains("/data/~creating-1/topic.toml.tmp"));
        let other = BrokerError::io(
            "writing",
            "/x",
            std::io::Error::from_raw_os_error(libc::EIO),
        );
        assert_eq!(to_status(other).code(), Code::Internal);
    }

    #[test]
    fn given_descriptor_exhaustion_should_be_unavailable_and_other_io_internal() {
        for errno in [libc::EMFILE, libc::ENFILE] {
            let log = to_status(BrokerError::Log {
                topic: "t".into(),
                partition: 0,
                source: LogError::Io {
                    context: "opening",
                    path: "/data/t-0/00000000000000000000.log".into(),
                    source: std::io::Error::from_raw_os_error(errno),
                },
            });
            assert_eq!(log.code(), Code::Unavailable, "{log:?}");
            assert!(
                log.message().contains("00000000000000000000.log"),
                "{log:?}"
            );
            let meta = to_status(BrokerError::io(
                "creating",
                "/data/t-0",
                std::io::Error::from_raw_os_error(errno),
            ));
            assert_eq!(meta.code(), Code::Unavailable, "{meta:?}");
        }
        let other = to_status(BrokerError::io(
            "creating",
            "/data/t-0",
            std::io::Error::from_raw_os_error(libc::EIO),
        ));
        assert_eq!(other.code(), Code::Internal);
    }

    #[test]
    fn given_tonic_decode_limit_status_should_become_resource_exhausted_naming_the_limit() {
        let tonic_status = Status::out_of_range(
            "Error, decoded message length too large: found 20971536 bytes, the limit is: 17825792 bytes",
        );
        let status = decode_limit_to_resource_exhausted(tonic_status, 8 << 20);
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(
            status.message(),
            "a request message of 20971536 bytes exceeds the broker's limit of 17825792 bytes: batches may hold at most max_batch_bytes (8388608) bytes; send smaller batches"
        );
        // The broker's own OUT_OF_RANGE (an offset outside the log) stays.
        let range = to_status(offset_out_of_range());
        let message = range.message().to_owned();
        let kept = decode_limit_to_resource_exhausted(range, 8 << 20);
        assert_eq!(kept.code(), Code::OutOfRange);
        assert_eq!(kept.message(), message);
    }
}
