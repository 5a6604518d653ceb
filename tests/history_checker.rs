//! The fault tests' history checkers (tests/common/history.rs) catch what they claim to: each
//! kind of violation, on a history made to have exactly it, and nothing on a clean one.

mod common;

use common::history::{check_acknowledged, check_deliveries, check_replicas, Seen, Violation};

fn seen(partition: u32, offset: u64, key: &str, value: &str) -> Seen {
    Seen::keyed(partition, offset, key, value)
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

mod cas_register {
    use super::common::linearizable::{is_linearizable, Event, Op, Outcome};

    fn ev(invoked: u64, returned: u64, op: Op, outcome: Outcome) -> Event {
        Event::new(invoked, returned, op, outcome)
    }

    fn put(v: &str) -> Op {
        Op::Put(v.as_bytes().to_vec())
    }

    fn put_if(expected: u64, v: &str) -> Op {
        Op::PutIf {
            expected,
            value: v.as_bytes().to_vec(),
        }
    }

    fn read(version: u64, v: &str) -> Outcome {
        Outcome::Read(Some((version, v.as_bytes().to_vec())))
    }

    #[test]
    fn given_a_sequential_history_that_follows_the_register_should_accept_it() {
        let history = [
            ev(0, 1, put("a"), Outcome::Written(5)),
            ev(2, 3, Op::Get, read(5, "a")),
            ev(4, 5, put_if(5, "b"), Outcome::Written(9)),
            ev(6, 7, put_if(5, "c"), Outcome::Conflict(Some(9))),
            ev(8, 9, Op::Get, read(9, "b")),
        ];
        assert!(is_linearizable(None, &history));
    }

    #[test]
    fn given_a_stale_read_after_a_write_returned_should_refuse_it() {
        let history = [
            ev(0, 10, put("a"), Outcome::Written(5)),
            ev(20, 30, Op::Get, Outcome::Read(None)),
        ];
        assert!(!is_linearizable(None, &history));
        // Overlapping the write, either answer is fine.
        let overlapping = [
            ev(0, 10, put("a"), Outcome::Written(5)),
            ev(5, 15, Op::Get, Outcome::Read(None)),
        ];
        assert!(is_linearizable(None, &overlapping));
    }

    #[test]
    fn given_two_compare_and_sets_from_one_version_both_winning_should_refuse_it() {
        let history = [
            ev(0, 1, put("a"), Outcome::Written(5)),
            ev(2, 10, put_if(5, "b"), Outcome::Written(7)),
            ev(3, 11, put_if(5, "c"), Outcome::Written(8)),
        ];
        assert!(!is_linearizable(None, &history));
        // One wins, the other sees the winner's version.
        let fair = [
            ev(0, 1, put("a"), Outcome::Written(5)),
            ev(2, 10, put_if(5, "b"), Outcome::Written(7)),
            ev(3, 11, put_if(5, "c"), Outcome::Conflict(Some(7))),
        ];
        assert!(is_linearizable(None, &fair));
        // A conflict naming a version that never was is refused.
        let invented = [
            ev(0, 1, put("a"), Outcome::Written(5)),
            ev(3, 11, put_if(5, "c"), Outcome::Conflict(Some(6))),
        ];
        assert!(!is_linearizable(None, &invented));
    }

    #[test]
    fn given_a_write_with_an_unknown_outcome_should_allow_it_taken_or_not() {
        // Its value later read at the version the broker gave it.
        let taken = [
            ev(0, 1, put("a"), Outcome::Written(5)),
            ev(2, 0, put_if(5, "b"), Outcome::Unknown),
            ev(20, 21, Op::Get, read(12, "b")),
        ];
        assert!(is_linearizable(None, &taken));
        // Never seen: it may not have happened.
        let lost = [
            ev(0, 1, put("a"), Outcome::Written(5)),
            ev(2, 0, put_if(5, "b"), Outcome::Unknown),
            ev(20, 21, Op::Get, read(5, "a")),
        ];
        assert!(is_linearizable(None, &lost));
        // But it cannot take effect before it was invoked.
        let early = [
            ev(0, 1, Op::Get, read(3, "b")),
            ev(2, 0, put("b"), Outcome::Unknown),
        ];
        assert!(!is_linearizable(None, &early));
    }
}

mod cas_register_model {
    use super::common::linearizable::{is_linearizable, Event, Op, Outcome, State};
    use proptest::prelude::*;

    proptest! {
        /// Model: a history made by running operations one after another against a register
        /// is always accepted, whatever their mix; flipping one read's answer to a state the
        /// register never had is refused.
        #[test]
        fn sequential_histories_should_be_linearizable(choices in proptest::collection::vec((0u8..3, 0u64..4), 1..24)) {
            let mut state: State = None;
            let mut next_version = 1u64;
            let mut history = Vec::new();
            for (time, (kind, guess)) in choices.iter().enumerate() {
                let t = 10 * time as u64;
                let value = format!("v{time}").into_bytes();
                let version = state.as_ref().map(|(v, _)| *v);
                let (op, outcome) = match kind {
                    0 => (Op::Get, Outcome::Read(state.clone())),
                    1 => {
                        next_version += 1 + guess;
                        state = Some((next_version, value.clone()));
                        (Op::Put(value), Outcome::Written(next_version))
                    }
                    _ => {
                        let expected = version.unwrap_or(0).saturating_sub(*guess % 2);
                        if version == Some(expected) {
                            next_version += 1;
                            state = Some((next_version, value.clone()));
                            (Op::PutIf { expected, value }, Outcome::Written(next_version))
                        } else {
                            (Op::PutIf { expected, value }, Outcome::Conflict(version))
                        }
                    }
                };
                history.push(Event { invoked: t, returned: t + 5, op, outcome });
            }
            prop_assert!(is_linearizable(None, &history));
            let last = history.len() as u64 * 10;
            history.push(Event {
                invoked: last,
                returned: last + 5,
                op: Op::Get,
                outcome: Outcome::Read(Some((u64::MAX, b"never".to_vec()))),
            });
            prop_assert!(!is_linearizable(None, &history));
        }
    }
}
