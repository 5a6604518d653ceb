//! The one place where broker errors become gRPC statuses.
//!
//! | error | code |
//! |---|---|
//! | unknown topic | NOT_FOUND |
//! | duplicate topic | ALREADY_EXISTS |
//! | bad name, config, batch, partition, key, request | INVALID_ARGUMENT |
//! | offset outside the log | OUT_OF_RANGE |
//! | batch or request too large, disk full, response-bytes budget taken | RESOURCE_EXHAUSTED |
//! | partition fenced (corruption at open) or poisoned (failed write/fsync) | FAILED_PRECONDITION |
//! | corrupt data found on read | DATA_LOSS |
//! | shutting down, log closed | UNAVAILABLE |
//! | other I/O; a snapshot finding the log and key index disagree | INTERNAL |

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
        BrokerError::ShuttingDown => Status::unavailable(message),
        BrokerError::NotATable { .. } => Status::failed_precondition(message),
        BrokerError::KeyNotFound { .. } => Status::not_found(message),
        BrokerError::CasConflict { current, .. } => {
            use prost::Message as _;
            let details = syncline_proto::v1::CasConflict {
                current: current.clone(),
            }
            .encode_to_vec();
            Status::with_details(tonic::Code::FailedPrecondition, message, details.into())
        }
        BrokerError::Sequence(crate::state::SequenceError::Fenced { .. }) => {
            Status::failed_precondition(message)
        }
        BrokerError::Sequence(crate::state::SequenceError::OutOfOrder { .. }) => {
            Status::out_of_range(message)
        }
        BrokerError::Log { source, .. } => match source {
            LogError::InvalidBatch(_) | LogError::BatchOffsetSpan { .. } | LogError::Config(_) => {
                Status::invalid_argument(message)
            }
            LogError::BatchTooLarge { .. } | LogError::NoSpace { .. } => {
                Status::resource_exhausted(message)
            }
            LogError::OffsetOutOfRange { .. } => Status::out_of_range(message),
            LogError::Poisoned { .. } => Status::failed_precondition(message),
            LogError::Corrupt { .. } => Status::data_loss(message),
            LogError::Closed { .. } => Status::unavailable(message),
            LogError::Compaction { .. } => Status::aborted(message),
            LogError::Io { .. } | LogError::Locked { .. } => Status::internal(message),
        },
        // Like corrupt log data: the client must not retry it forever.
        BrokerError::SnapshotInconsistent { .. } => Status::data_loss(message),
        BrokerError::Io { .. }
        | BrokerError::DataDirLocked { .. }
        | BrokerError::DataDirFormat { .. } => Status::internal(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn given_each_error_kind_should_map_to_its_code_with_the_message() {
        let status = to_status(BrokerError::TopicNotFound { topic: "t".into() });
        assert_eq!(status.code(), Code::NotFound);
        assert_eq!(status.message(), "topic `t` does not exist");
        assert_eq!(
            to_status(BrokerError::TopicExists { topic: "t".into() }).code(),
            Code::AlreadyExists
        );
        let range = BrokerError::Log {
            topic: "t".into(),
            partition: 0,
            source: LogError::OffsetOutOfRange {
                requested: 9,
                start: 0,
                end: 3,
            },
        };
        assert_eq!(to_status(range).code(), Code::OutOfRange);
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
}
