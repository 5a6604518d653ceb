//! Error details in the standard gRPC rich error model.
//!
//! A failed compare-and-set answers FAILED_PRECONDITION whose `grpc-status-details-bin` trailer
//! is a `google.rpc.Status` (code, message, and the [`v1::CasConflict`] packed as a
//! `google.protobuf.Any` with type URL [`CAS_CONFLICT_TYPE_URL`]), so standard tooling (Python's
//! `grpc_status.rpc_status.from_call`, grpc-go's `status.FromError(..).Details()`) reads it.
//! Brokers before that sent the bare `CasConflict` message; [`cas_conflict`] still reads it.
//!
//! In a cluster, a call at a node that does not lead its partition answers FAILED_PRECONDITION
//! with a [`v1::NotLeader`] detail (type URL [`NOT_LEADER_TYPE_URL`]) naming the leader.

use prost::Message as _;
use tonic::{Code, Status};

use crate::v1;

/// Type URL of a `CasConflict` packed in a `google.protobuf.Any`.
pub const CAS_CONFLICT_TYPE_URL: &str = "type.googleapis.com/syncline.v1.CasConflict";

/// A FAILED_PRECONDITION status carrying `conflict` as its standard rich-error detail.
pub fn cas_conflict_status(message: impl Into<String>, conflict: &v1::CasConflict) -> Status {
    let message = message.into();
    let details = tonic_types::pb::Status {
        code: Code::FailedPrecondition as i32,
        message: message.clone(),
        details: vec![prost_types::Any {
            type_url: CAS_CONFLICT_TYPE_URL.to_owned(),
            value: conflict.encode_to_vec(),
        }],
    }
    .encode_to_vec();
    Status::with_details(Code::FailedPrecondition, message, details.into())
}

/// The `CasConflict` in a status's details: `Ok(None)` when there is none (no details, or a
/// `google.rpc.Status` without a `CasConflict` detail); an error when the details decode as
/// neither a `google.rpc.Status` nor the bare `CasConflict` older brokers sent.
pub fn cas_conflict(details: &[u8]) -> Result<Option<v1::CasConflict>, prost::DecodeError> {
    if details.is_empty() {
        return Ok(None);
    }
    // A bare `CasConflict` never decodes as a `google.rpc.Status`: its field 1 is a message
    // (length-delimited), the status's field 1 the code (a varint).
    match tonic_types::pb::Status::decode(details) {
        Ok(status) => status
            .details
            .iter()
            .find(|any| any.type_url == CAS_CONFLICT_TYPE_URL)
            .map(|any| v1::CasConflict::decode(any.value.as_slice()))
            .transpose(),
        Err(_) => v1::CasConflict::decode(details).map(Some),
    }
}

/// Type URL of a `NotLeader` packed in a `google.protobuf.Any`.
pub const NOT_LEADER_TYPE_URL: &str = "type.googleapis.com/syncline.v1.NotLeader";

/// A FAILED_PRECONDITION status saying this node does not lead the partition (or coordinate
/// the group), with `not_leader` naming the node that does as its standard rich-error detail.
pub fn not_leader_status(message: impl Into<String>, not_leader: &v1::NotLeader) -> Status {
    let message = message.into();
    let details = tonic_types::pb::Status {
        code: Code::FailedPrecondition as i32,
        message: message.clone(),
        details: vec![prost_types::Any {
            type_url: NOT_LEADER_TYPE_URL.to_owned(),
            value: not_leader.encode_to_vec(),
        }],
    }
    .encode_to_vec();
    Status::with_details(Code::FailedPrecondition, message, details.into())
}

/// The `NotLeader` detail of a status: `None` when it has none (or the details do not decode).
pub fn not_leader(status: &Status) -> Option<v1::NotLeader> {
    if status.code() != Code::FailedPrecondition || status.details().is_empty() {
        return None;
    }
    let decoded = tonic_types::pb::Status::decode(status.details()).ok()?;
    decoded
        .details
        .iter()
        .find(|any| any.type_url == NOT_LEADER_TYPE_URL)
        .and_then(|any| v1::NotLeader::decode(any.value.as_slice()).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn given_a_not_leader_status_when_read_back_should_name_the_leader() {
        let detail = v1::NotLeader {
            topic: "orders".into(),
            partition: 3,
            leader_id: Some(2),
            leader_address: "127.0.0.1:7451".into(),
        };
        let status = not_leader_status("node 1 does not lead orders/3", &detail);
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(not_leader(&status), Some(detail));
        assert_eq!(not_leader(&Status::failed_precondition("fenced")), None);
        assert_eq!(not_leader(&Status::unavailable("down")), None);
    }

    fn conflict() -> v1::CasConflict {
        v1::CasConflict {
            current: vec![v1::KeyVersion {
                key: Bytes::from_static(b"counter"),
                version: 42,
                absent: false,
            }],
        }
    }

    #[test]
    fn given_cas_conflict_status_should_carry_a_standard_google_rpc_status_with_an_any() {
        let status = cas_conflict_status("version conflict", &conflict());
        assert_eq!(status.code(), Code::FailedPrecondition);
        let rich = tonic_types::pb::Status::decode(status.details()).unwrap();
        assert_eq!(rich.code, Code::FailedPrecondition as i32);
        assert_eq!(rich.message, "version conflict");
        assert_eq!(rich.details.len(), 1);
        assert_eq!(
            rich.details[0].type_url,
            "type.googleapis.com/syncline.v1.CasConflict"
        );
        let packed = v1::CasConflict::decode(rich.details[0].value.as_slice()).unwrap();
        assert_eq!(packed, conflict());
        assert_eq!(cas_conflict(status.details()).unwrap(), Some(conflict()));
    }

    #[test]
    fn given_bare_cas_conflict_of_an_older_broker_should_still_decode() {
        let bare = conflict().encode_to_vec();
        assert_eq!(cas_conflict(&bare).unwrap(), Some(conflict()));
    }

    #[test]
    fn given_no_details_or_other_details_should_be_no_conflict() {
        assert_eq!(cas_conflict(&[]).unwrap(), None);
        let other = tonic_types::pb::Status {
            code: Code::FailedPrecondition as i32,
            message: "fenced".into(),
            details: vec![prost_types::Any {
                type_url: "type.googleapis.com/google.rpc.ErrorInfo".into(),
                value: vec![],
            }],
        }
        .encode_to_vec();
        assert_eq!(cas_conflict(&other).unwrap(), None);
        assert!(cas_conflict(&[0xff, 0xff, 0xff]).is_err());
    }
}
