//! The fault tests' history checkers (tests/common/history.rs) catch what they claim to: each
//! kind of violation, on a history made to have exactly it, and nothing on a clean one.

mod common;

use common::history::{check_acknowledged, check_deliveries, check_replicas, Seen, Violation};

fn seen(partition: u32, offset: u64, key: &str, value: &str) -> Seen {
    Seen {
        partition,
        offset,
        key: Some(key.as_bytes().to_vec()),
        value: value.as_bytes().to_vec(),
    }
}

fn clean() -> Vec<Seen> {
    vec![
        seen(0, 0, "a", "a:0"),
        seen(0, 1, "b", "b:1"),
        seen(0, 2, "a", "a:2"),
        seen(1, 0, "c", "c:3"),
    ]
}

#[test]
fn given_a_clean_history_should_find_nothing() {
    let log = clean();
    assert_eq!(check_acknowledged(&log, &log), vec![]);
    assert_eq!(
        check_deliveries(&[(0, 0), (1, 0), (0, 1), (0, 2)], &log),
        vec![]
    );
    assert_eq!(
        check_replicas(&[log.clone(), log.iter().rev().cloned().collect()]),
        vec![]
    );
    // An unacknowledged record in the log (its ack was cut off) is not a violation.
    let mut more = log.clone();
    more.push(seen(1, 1, "c", "c:4"));
    assert_eq!(check_acknowledged(&log, &more), vec![]);
}

#[test]
fn given_each_kind_of_violation_should_name_it() {
    let acknowledged = clean();
    // Lost: the last record is missing.
    let lost = &acknowledged[..3];
    assert_eq!(
        check_acknowledged(&acknowledged, lost),
        vec![Violation::Lost(seen(1, 0, "c", "c:3"))]
    );
    // Changed: another value at an acknowledged offset.
    let mut changed = acknowledged.clone();
    changed[1] = seen(0, 1, "b", "b:9");
    assert!(matches!(
        check_acknowledged(&acknowledged, &changed).as_slice(),
        [Violation::Changed { .. }]
    ));
    // Duplicated: a value written twice.
    let mut twice = acknowledged.clone();
    twice.push(seen(0, 3, "a", "a:2"));
    assert!(matches!(
        check_acknowledged(&acknowledged, &twice).as_slice(),
        [Violation::Duplicated { .. }]
    ));
    // Reordered: key a's second write acknowledged below its first.
    let reordered = vec![seen(0, 2, "a", "a:0"), seen(0, 0, "a", "a:2")];
    assert!(matches!(
        check_acknowledged(&reordered, &reordered).as_slice(),
        [Violation::Reordered { .. }]
    ));
    // Backwards and a gap that fills.
    let log = clean();
    assert_eq!(
        check_deliveries(&[(0, 1), (0, 0)], &log),
        vec![Violation::Backwards {
            partition: 0,
            before: 1,
            after: 0
        }]
    );
    assert_eq!(
        check_deliveries(&[(0, 0), (0, 2)], &log),
        vec![Violation::GapFilled {
            partition: 0,
            offset: 1
        }]
    );
    // Diverged replicas.
    let mut other = log.clone();
    other[2] = seen(0, 2, "a", "a:7");
    assert_eq!(
        check_replicas(&[log, other]),
        vec![Violation::Diverged {
            partition: 0,
            replicas: (0, 1),
            offset: 2
        }]
    );
}
