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
//!
//! Each returns every violation found (empty: the history is fine), so a failing test prints
//! all of them, not the first.

use std::collections::{BTreeMap, BTreeSet, HashMap};

/// A record as a producer had it acknowledged, or as a reader read it.
#[derive(Debug, Clone, PartialEq, Eq)]
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
