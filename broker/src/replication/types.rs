//! The openraft types of a partition's Raft group, and the binary form of its entries.
//!
//! A partition group uses standard Raft leader ids (one leader per term), so a log id is
//! `(term, index)` and the term is what the partition log stamps as a batch's leader epoch.
//!
//! ## A proposal's bytes (the payload of a normal entry, in the Raft log and on the wire)
//! ```text
//! proposal  := version: u8 (= 1) | now_ms: i64 LE | conditions: u32 LE | condition* | batch
//! condition := key_len: u32 LE | key | expected_flag: u8 (0 = absent, 1 = version) | version: u64 LE
//! batch     := the producer's encoded batch, as received (the rest of the payload)
//! ```
//! The batch was verified (framing, CRC-32C, records, key placement) by the leader before it was
//! proposed; it carries its own CRC, so a replica re-verifies it when it applies it.

use bytes::{Buf as _, BufMut as _, Bytes};
use serde::{Deserialize, Serialize};

use crate::partition::Condition;

openraft::declare_raft_types!(
    /// A partition group's types: a produce proposal in, what applying it gave out.
    pub PartitionRaft:
        D = Proposal,
        R = Applied,
        LeaderId = openraft::impls::leader_id_std::LeaderId<u64, u64>,
);

/// A partition log entry.
pub type Entry = openraft::type_config::alias::EntryOf<PartitionRaft>;
/// A partition log id: `(term, index)`.
pub type LogId = openraft::type_config::alias::LogIdOf<PartitionRaft>;
/// A partition group's vote.
pub type Vote = openraft::type_config::alias::VoteOf<PartitionRaft>;
/// A partition group's membership as stored.
pub type StoredMembership = openraft::type_config::alias::StoredMembershipOf<PartitionRaft>;
/// A partition group's membership.
pub type Membership = openraft::Membership<u64, openraft::BasicNode>;
/// A snapshot's metadata.
pub type SnapshotMeta = openraft::type_config::alias::SnapshotMetaOf<PartitionRaft>;

/// The proposal format version.
const PROPOSAL_VERSION: u8 = 1;
/// The most conditions one proposal carries (the produce path's limit is lower).
pub const CONDITIONS_MAX: usize = 10_000;

/// A log id from its term and index.
pub fn log_id(term: u64, index: u64) -> LogId {
    LogId::new(openraft::vote::leader_id_std::CommittedLeaderId::new(term), index)
}

/// The term of a log id (a batch's leader epoch).
pub fn term_of(log_id: &LogId) -> u64 {
    log_id.leader_id.term
}

/// A produce request as the leader proposes it: applied in log order on every replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    /// The leader's clock when it proposed (idle-producer expiry decides by it, so every
    /// replica decides the same).
    pub now_ms: i64,
    /// Compare-and-set conditions (tables).
    pub conditions: Vec<ProposedCondition>,
    /// The verified batch.
    pub batch: Bytes,
}

/// A compare-and-set condition in a proposal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProposedCondition {
    /// The key.
    pub key: Bytes,
    /// `Some(v)`: the latest version must be `v`; `None`: absent or deleted.
    pub expected: Option<u64>,
}

impl From<&Condition> for ProposedCondition {
    fn from(condition: &Condition) -> Self {
        ProposedCondition {
            key: condition.key.clone(),
            expected: condition.expected,
        }
    }
}

impl From<&ProposedCondition> for Condition {
    fn from(condition: &ProposedCondition) -> Self {
        Condition {
            key: condition.key.clone(),
            expected: condition.expected,
        }
    }
}

impl std::fmt::Display for Proposal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "batch of {} bytes, {} conditions",
            self.batch.len(),
            self.conditions.len()
        )
    }
}

/// A proposal that cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed proposal: {0}")]
pub struct ProposalError(pub String);

impl Proposal {
    /// Bytes of the encoded form.
    pub fn encoded_len(&self) -> usize {
        1 + 8
            + 4
            + self
                .conditions
                .iter()
                .map(|c| 4 + c.key.len() + 1 + 8)
                .sum::<usize>()
            + self.batch.len()
    }

    /// Appends the encoded form to `out` (see the module doc).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.reserve(self.encoded_len());
        out.put_u8(PROPOSAL_VERSION);
        out.put_i64_le(self.now_ms);
        out.put_u32_le(self.conditions.len() as u32);
        for condition in &self.conditions {
            out.put_u32_le(condition.key.len() as u32);
            out.put_slice(&condition.key);
            out.put_u8(u8::from(condition.expected.is_some()));
            out.put_u64_le(condition.expected.unwrap_or(0));
        }
        out.put_slice(&self.batch);
    }

    /// The encoded form (one allocation).
    pub fn to_bytes(&self) -> Bytes {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode(&mut out);
        out.into()
    }

    /// Decodes a proposal; the batch and keys are slices of `bytes` (no copy).
    pub fn decode(bytes: Bytes) -> Result<Proposal, ProposalError> {
        let mut rest = bytes;
        let need = |rest: &Bytes, n: usize, what: &str| {
            if rest.len() < n {
                Err(ProposalError(format!(
                    "{what}: {n} bytes needed, {} left",
                    rest.len()
                )))
            } else {
                Ok(())
            }
        };
        need(&rest, 1 + 8 + 4, "header")?;
        let version = rest.get_u8();
        if version != PROPOSAL_VERSION {
            return Err(ProposalError(format!(
                "format version {version}, this node reads {PROPOSAL_VERSION}"
            )));
        }
        let now_ms = rest.get_i64_le();
        let count = rest.get_u32_le() as usize;
        if count > CONDITIONS_MAX {
            return Err(ProposalError(format!(
                "{count} conditions, at most {CONDITIONS_MAX}"
            )));
        }
        let mut conditions = Vec::with_capacity(count);
        for index in 0..count {
            need(&rest, 4, "condition key length")?;
            let key_len = rest.get_u32_le() as usize;
            need(&rest, key_len + 9, &format!("condition {index}"))?;
            let key = rest.split_to(key_len);
            let flag = rest.get_u8();
            let version = rest.get_u64_le();
            let expected = match flag {
                0 => None,
                1 => Some(version),
                other => {
                    return Err(ProposalError(format!(
                        "condition {index}: expected-flag {other} (0 or 1)"
                    )))
                }
            };
            conditions.push(ProposedCondition { key, expected });
        }
        Ok(Proposal {
            now_ms,
            conditions,
            batch: rest,
        })
    }
}

/// What applying one proposal gave, the same on every replica (deterministic). Refusals changed
/// nothing, but still took their Raft index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Applied {
    /// Appended (or, for an idempotent producer's retry, already there) at these offsets.
    Appended {
        /// Offset of the batch's first record.
        base_offset: u64,
        /// Offset of its last record.
        last_offset: u64,
    },
    /// A compare-and-set condition failed.
    CasConflict {
        /// What failed, for people.
        message: String,
        /// `(key, current version, absent)` of every conditioned key.
        current: Vec<(Bytes, u64, bool)>,
    },
    /// The producer's sequence or epoch was refused.
    Sequence(SequenceRefusal),
    /// Refused for another reason (for people).
    Refused(String),
}

/// A refused producer batch, as [`crate::state::SequenceError`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SequenceRefusal {
    /// An older epoch.
    Fenced {
        /// The producer id.
        producer_id: i64,
        /// The batch's epoch.
        epoch: i16,
        /// The current epoch.
        current: i16,
    },
    /// A sequence gap.
    OutOfOrder {
        /// The producer id.
        producer_id: i64,
        /// Next expected sequence.
        expected: i32,
        /// The batch's base sequence.
        got: i32,
    },
}

impl From<crate::state::SequenceError> for SequenceRefusal {
    fn from(error: crate::state::SequenceError) -> Self {
        use crate::state::SequenceError;
        match error {
            SequenceError::Fenced {
                producer_id,
                epoch,
                current,
            } => SequenceRefusal::Fenced {
                producer_id,
                epoch,
                current,
            },
            SequenceError::OutOfOrder {
                producer_id,
                expected,
                got,
            } => SequenceRefusal::OutOfOrder {
                producer_id,
                expected,
                got,
            },
        }
    }
}

impl From<SequenceRefusal> for crate::state::SequenceError {
    fn from(refusal: SequenceRefusal) -> Self {
        use crate::state::SequenceError;
        match refusal {
            SequenceRefusal::Fenced {
                producer_id,
                epoch,
                current,
            } => SequenceError::Fenced {
                producer_id,
                epoch,
                current,
            },
            SequenceRefusal::OutOfOrder {
                producer_id,
                expected,
                got,
            } => SequenceError::OutOfOrder {
                producer_id,
                expected,
                got,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn condition() -> impl Strategy<Value = ProposedCondition> {
        (
            proptest::collection::vec(any::<u8>(), 0..40),
            proptest::option::of(any::<u64>()),
        )
            .prop_map(|(key, expected)| ProposedCondition {
                key: key.into(),
                expected,
            })
    }

    proptest! {
        #[test]
        fn given_any_proposal_when_encoded_then_decodes_to_itself(
            now_ms in any::<i64>(),
            conditions in proptest::collection::vec(condition(), 0..5),
            batch in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let proposal = Proposal { now_ms, conditions, batch: batch.into() };
            let bytes = proposal.to_bytes();
            prop_assert_eq!(bytes.len(), proposal.encoded_len());
            prop_assert_eq!(Proposal::decode(bytes).unwrap(), proposal);
        }

        #[test]
        fn given_any_bytes_when_decoded_then_errors_or_decodes_without_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..100),
        ) {
            let _ = Proposal::decode(bytes.into());
        }
    }

    #[test]
    fn given_a_truncated_condition_when_decoded_then_the_error_names_it() {
        let proposal = Proposal {
            now_ms: 5,
            conditions: vec![ProposedCondition {
                key: Bytes::from_static(b"key"),
                expected: Some(3),
            }],
            batch: Bytes::new(),
        };
        let bytes = proposal.to_bytes();
        let error = Proposal::decode(bytes.slice(..bytes.len() - 2)).unwrap_err();
        assert!(error.0.contains("condition 0"), "{error}");
    }
}
