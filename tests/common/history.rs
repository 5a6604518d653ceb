//! Checkers for the histories fault tests record, in the manner of Jepsen: what producers had
//! acknowledged, what consumers were handed in order, and what each replica holds at the end.
//!
//! - [`check_acknowledged`]: every acknowledged record is present at its acknowledged offset,
//!   byte for byte (nothing lost, nothing changed); no record appears twice (values are unique
//!   per write, as the workloads make them); each key's acknowledged records sit in the order
//!   their producer sent them.
//! - [`check_deliveries`]: what one consumer was handed never goes backwards within a partition,
//!   and no offset it skipped turns up later in the final log (a gap that fills).
//! - [`check_replicas`]: every replica holds the same records at the same offsets.
//! - [`check_delivered_values`]: what a consumer was handed is what the log holds at that
//!   offset, byte for byte.
//! - [`check_group`]: a consumer group under faults: at least once (every acknowledged record
//!   handed to some member) and per-key order (each member reads each partition in log order,
//!   without skipping, except where an assignment of that partition let it start elsewhere).
//!
//! The CAS register's linearizability is `linearizable.rs`'s; its verdict is reported here as
//! [`Violation::NotLinearizable`] so that a test prints every kind of violation together.
//!
//! Each returns every violation found (empty: the history is fine), so a failing test prints
//! all of them, not the first.

use std::collections::{BTreeMap, BTreeSet, HashMap};

/// A record as a producer had it acknowledged, or as a reader read it.
#[derive(Clone, PartialEq, Eq)]
pub struct Seen {
    /// Its partition.
    pub partition: u32,
    /// Its offset.
    pub offset: u64,
    /// Its key (`None`: unkeyed).
    pub key: Option<Vec<u8>>,
    /// Its value.
    pub value: Vec<u8>,
}

impl Seen {
    /// A keyed record with text key and value (for tests of the checkers).
    pub fn keyed(partition: u32, offset: u64, key: &str, value: &str) -> Seen {
        Seen {
            partition,
            offset,
            key: Some(key.as_bytes().to_vec()),
            value: value.as_bytes().to_vec(),
        }
    }
}

/// `P@O key=K value=V`, key and value as (lossy) text: failure messages stay readable.
impl std::fmt::Debug for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.partition, self.offset)?;
        if let Some(key) = &self.key {
            write!(f, " key={:?}", String::from_utf8_lossy(key))?;
        }
        write!(f, " value={:?}", String::from_utf8_lossy(&self.value))
    }
}

/// One violation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// Acknowledged, but nothing is at its offset.
    Lost(Seen),
    /// Acknowledged, but another record is at its offset.
    Changed {
        /// What was acknowledged.
        acknowledged: Seen,
        /// What is there.
        found: Seen,
    },
    /// The same value at two offsets.
    Duplicated {
        /// The first.
        first: Seen,
        /// The second.
        second: Seen,
    },
    /// A key's records in an order other than their producer sent them.
    Reordered {
        /// The one sent earlier.
        earlier: Seen,
        /// The one sent later, at a lower offset.
        later: Seen,
    },
    /// A consumer was handed an offset at or below one it had already had.
    Backwards {
        /// The partition.
        partition: u32,
        /// The offset before.
        before: u64,
        /// The offset after.
        after: u64,
    },
    /// A consumer skipped an offset that the final log holds.
    GapFilled {
        /// The partition.
        partition: u32,
        /// The skipped offset.
        offset: u64,
    },
    /// An acknowledged record that no member of the consumer group was handed.
    NotDelivered(Seen),
    /// A consumer was handed a record that the log does not hold at that offset (`found`:
    /// what it holds there, if anything).
    Misdelivered {
        /// What the consumer was handed.
        delivered: Seen,
        /// What the log holds at that offset.
        found: Option<Seen>,
    },
    /// A group member's reading of a partition broke off (went back, repeated, or skipped
    /// records the log holds) more often than assignments of that partition to it explain
    /// (each assignment after the first may start it at the group's committed offset).
    Discontinuous {
        /// The member (its position in the input).
        member: usize,
        /// The partition.
        partition: u32,
        /// How many times the partition was assigned to the member.
        assignments: usize,
        /// Each break: (offset before, offset after).
        breaks: Vec<(u64, u64)>,
    },
    /// A CAS register key's history has no linearization.
    NotLinearizable {
        /// The key.
        key: String,
        /// Its history, for the failure message.
        history: String,
    },
    /// Two replicas differ.
    Diverged {
        /// The partition.
        partition: u32,
        /// Which replicas (their positions in the input).
        replicas: (usize, usize),
        /// The first offset where they differ.
        offset: u64,
    },
}

/// `acknowledged`: every acknowledgement, each producer's in the order it sent them (several
/// producers' lists may be concatenated: order is only compared between records of the same
/// key, which one producer writes). `log`: everything read back from the start of every
/// partition.
pub fn check_acknowledged(acknowledged: &[Seen], log: &[Seen]) -> Vec<Violation> {
    let mut violations = Vec::new();
    let at: HashMap<(u32, u64), &Seen> = log.iter().map(|r| ((r.partition, r.offset), r)).collect();
    for ack in acknowledged {
        match at.get(&(ack.partition, ack.offset)) {
            None => violations.push(Violation::Lost(ack.clone())),
            Some(found) if found.key != ack.key || found.value != ack.value => {
                violations.push(Violation::Changed {
                    acknowledged: ack.clone(),
                    found: (*found).clone(),
                })
            }
            Some(_) => {}
        }
    }
    let mut by_value: HashMap<&[u8], &Seen> = HashMap::new();
    for record in log {
        if let Some(first) = by_value.insert(&record.value, record) {
            violations.push(Violation::Duplicated {
                first: first.clone(),
                second: record.clone(),
            });
        }
    }
    let mut last_of_key: HashMap<&Option<Vec<u8>>, &Seen> = HashMap::new();
    for ack in acknowledged.iter().filter(|a| a.key.is_some()) {
        if let Some(earlier) = last_of_key.insert(&ack.key, ack) {
            if earlier.partition == ack.partition && earlier.offset >= ack.offset {
                violations.push(Violation::Reordered {
                    earlier: earlier.clone(),
                    later: ack.clone(),
                });
            }
        }
    }
    violations
}

/// `handed`: (partition, offset) in the order one consumer was handed them; `log`: the final
/// content of the partitions it read.
pub fn check_deliveries(handed: &[(u32, u64)], log: &[Seen]) -> Vec<Violation> {
    let mut violations = Vec::new();
    let held: BTreeMap<u32, BTreeSet<u64>> = log.iter().fold(BTreeMap::new(), |mut held, r| {
        held.entry(r.partition).or_default().insert(r.offset);
        held
    });
    let mut last: BTreeMap<u32, u64> = BTreeMap::new();
    for &(partition, offset) in handed {
        if let Some(&before) = last.get(&partition) {
            if offset <= before {
                violations.push(Violation::Backwards {
                    partition,
                    before,
                    after: offset,
                });
                continue;
            }
            let skipped = held
                .get(&partition)
                .into_iter()
                .flat_map(|offsets| offsets.range(before + 1..offset));
            for &gap in skipped {
                violations.push(Violation::GapFilled {
                    partition,
                    offset: gap,
                });
            }
        }
        last.insert(partition, offset);
    }
    violations
}

/// `replicas`: each replica's records of the same partitions (any order).
pub fn check_replicas(replicas: &[Vec<Seen>]) -> Vec<Violation> {
    let mut violations = Vec::new();
    let sorted: Vec<BTreeMap<(u32, u64), &Seen>> = replicas
        .iter()
        .map(|records| {
            records
                .iter()
                .map(|r| ((r.partition, r.offset), r))
                .collect()
        })
        .collect();
    for (i, left) in sorted.iter().enumerate() {
        for (j, right) in sorted.iter().enumerate().skip(i + 1) {
            let keys: BTreeSet<&(u32, u64)> = left.keys().chain(right.keys()).collect();
            let mut reported = BTreeSet::new();
            for key in keys {
                if left.get(key) != right.get(key) && reported.insert(key.0) {
                    violations.push(Violation::Diverged {
                        partition: key.0,
                        replicas: (i, j),
                        offset: key.1,
                    });
                }
            }
        }
    }
    violations
}

/// `delivered`: records one consumer was handed; `log`: the final content of the partitions.
/// Each must be in the log at its offset with the same key and value.
pub fn check_delivered_values(delivered: &[Seen], log: &[Seen]) -> Vec<Violation> {
    let at: HashMap<(u32, u64), &Seen> = log.iter().map(|r| ((r.partition, r.offset), r)).collect();
    delivered
        .iter()
        .filter_map(|d| match at.get(&(d.partition, d.offset)) {
            Some(found) if found.key == d.key && found.value == d.value => None,
            found => Some(Violation::Misdelivered {
                delivered: d.clone(),
                found: found.map(|f| (*f).clone()),
            }),
        })
        .collect()
}

/// What one member (one incarnation: a member that joins again under a new id is another) of
/// a consumer group was handed, and how often each partition was assigned to it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemberDeliveries {
    /// Records in the order the member was handed them.
    pub delivered: Vec<Seen>,
    /// Partition -> how many times it was assigned to this member.
    pub assignments: BTreeMap<u32, usize>,
}

/// `members`: every member of one group reading the partitions of `log`; `acknowledged`: what
/// producers had acknowledged. Reports acknowledged records no member was handed
/// ([`Violation::NotDelivered`]), records handed that the log does not hold
/// ([`Violation::Misdelivered`]), and members whose reading of a partition broke off more often
/// than its assignments explain ([`Violation::Discontinuous`]): within one assignment a member
/// reads its partition in log order without a gap, so each key's records reach it in order.
pub fn check_group(
    members: &[MemberDeliveries],
    acknowledged: &[Seen],
    log: &[Seen],
) -> Vec<Violation> {
    let mut violations = Vec::new();
    let handed: BTreeSet<(u32, u64)> = members
        .iter()
        .flat_map(|m| m.delivered.iter().map(|d| (d.partition, d.offset)))
        .collect();
    for ack in acknowledged {
        if !handed.contains(&(ack.partition, ack.offset)) {
            violations.push(Violation::NotDelivered(ack.clone()));
        }
    }
    let held: BTreeMap<u32, BTreeSet<u64>> = log.iter().fold(BTreeMap::new(), |mut held, r| {
        held.entry(r.partition).or_default().insert(r.offset);
        held
    });
    for (index, member) in members.iter().enumerate() {
        violations.extend(check_delivered_values(&member.delivered, log));
        let mut last: BTreeMap<u32, u64> = BTreeMap::new();
        let mut breaks: BTreeMap<u32, Vec<(u64, u64)>> = BTreeMap::new();
        for d in &member.delivered {
            if let Some(before) = last.insert(d.partition, d.offset) {
                // The next offset the log holds after `before` is the one due.
                let due = held
                    .get(&d.partition)
                    .and_then(|offsets| offsets.range(before + 1..).next().copied());
                if due != Some(d.offset) {
                    breaks
                        .entry(d.partition)
                        .or_default()
                        .push((before, d.offset));
                }
            }
        }
        for (partition, breaks) in breaks {
            let assignments = member.assignments.get(&partition).copied().unwrap_or(0);
            if breaks.len() + 1 > assignments.max(1) {
                violations.push(Violation::Discontinuous {
                    member: index,
                    partition,
                    assignments,
                    breaks,
                });
            }
        }
    }
    violations
}
