//! A linearizability checker for one table key used as a compare-and-set register (the CAS
//! register workload of the fault tests), in the manner of Knossos: the Wing & Gong search
//! with memoisation of (operations linearized, register state).
//!
//! The register is the key's latest version and value (`None`: absent). Operations, each with
//! the time it was invoked and, unless its outcome is unknown (a timeout, a lost connection),
//! the time it returned:
//! - `Get` returned `Some((version, value))` or `None`;
//! - `Put(value)` returned the new version (versions only grow);
//! - `PutIf { expected, value }` returned the new version, or a conflict naming the version
//!   it found (`None`: absent).
//!
//! An operation with an unknown outcome may have taken effect at any point after its
//! invocation, or never: it is linearized anywhere after its invocation, or left out.
//!
//! The search is exponential in the number of concurrent operations, so histories are kept
//! small (a few keys, tens of operations each, a handful of clients).

use std::collections::HashSet;

/// The register's state: the latest version and value.
pub type State = Option<(u64, Vec<u8>)>;

/// What an operation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// A read.
    Get,
    /// An unconditional write of this value.
    Put(Vec<u8>),
    /// A write of `value` if the version is `expected`.
    PutIf {
        /// The version the writer expected.
        expected: u64,
        /// The value.
        value: Vec<u8>,
    },
}

/// What it returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A read's answer.
    Read(State),
    /// A write's new version.
    Written(u64),
    /// A conditional write refused: the version found (`None`: absent).
    Conflict(Option<u64>),
    /// Not known (the call timed out or its connection was lost).
    Unknown,
}

/// One operation of a history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Invoked at (any clock shared by the clients, e.g. ns since the test began).
    pub invoked: u64,
    /// Returned at (ignored when the outcome is unknown).
    pub returned: u64,
    /// The operation.
    pub op: Op,
    /// Its outcome.
    pub outcome: Outcome,
}

impl Event {
    /// An operation invoked at `invoked`, returned at `returned`, with its outcome.
    pub fn new(invoked: u64, returned: u64, op: Op, outcome: Outcome) -> Event {
        Event {
            invoked,
            returned,
            op,
            outcome,
        }
    }
}

/// The state after `event` applied to `state`, if `event`'s outcome is possible there.
fn step(state: &State, event: &Event) -> Option<State> {
    let version = state.as_ref().map(|(v, _)| *v);
    match (&event.op, &event.outcome) {
        (Op::Get, Outcome::Read(read)) => (read == state).then(|| state.clone()),
        (Op::Put(value), Outcome::Written(new)) => {
            (version.is_none_or(|v| *new > v)).then(|| Some((*new, value.clone())))
        }
        (Op::PutIf { expected, value }, Outcome::Written(new)) => {
            (version == Some(*expected) && *new > *expected).then(|| Some((*new, value.clone())))
        }
        (Op::PutIf { expected, .. }, Outcome::Conflict(found)) => {
            (*found == version && version != Some(*expected)).then(|| state.clone())
        }
        // A write whose outcome is unknown took effect with some new version: any version above
        // the current one will do for what follows, so it is modelled by the smallest the
        // broker could have given, one above.
        (Op::Put(value), Outcome::Unknown) => {
            Some(Some((version.map_or(0, |v| v + 1), value.clone())))
        }
        (Op::PutIf { expected, value }, Outcome::Unknown) => {
            (version == Some(*expected)).then(|| Some((*expected + 1, value.clone())))
        }
        (Op::Get, Outcome::Unknown) => Some(state.clone()),
        _ => None,
    }
}

/// Whether `history` (the operations on one key, any order) has a linearization from
/// `initial`. Unknown-outcome writes that took effect must be matched by what later reads saw:
/// their version is found from those reads (see [`step`]: a read naming a version the model
/// did not predict fails that path, and the search tries another).
pub fn is_linearizable(initial: State, history: &[Event]) -> bool {
    let mut events: Vec<Event> = history.to_vec();
    events.sort_by_key(|e| e.invoked);
    let n = events.len();
    assert!(
        n <= 128,
        "histories are checked 128 operations per key at most"
    );
    let mut seen: HashSet<(u128, State)> = HashSet::new();
    search(&events, 0, &initial, &mut seen)
}

fn search(events: &[Event], done: u128, state: &State, seen: &mut HashSet<(u128, State)>) -> bool {
    let n = events.len();
    // Every completed operation linearized: done (unknown ones may stay out).
    let pending_known =
        (0..n).any(|i| done & (1 << i) == 0 && events[i].outcome != Outcome::Unknown);
    if !pending_known {
        return true;
    }
    if !seen.insert((done, state.clone())) {
        return false;
    }
    // The earliest return among the known operations not yet linearized: nothing invoked after
    // it can be linearized before it.
    let horizon = (0..n)
        .filter(|i| done & (1 << i) == 0 && events[*i].outcome != Outcome::Unknown)
        .map(|i| events[i].returned)
        .min()
        .unwrap_or(u64::MAX);
    for i in 0..n {
        if done & (1 << i) != 0 || events[i].invoked > horizon {
            continue;
        }
        if let Some(next) = step(state, &events[i]) {
            if search(events, done | (1 << i), &next, seen) {
                return true;
            }
        }
        // An unknown Put whose version later reads contradict is retried below with the
        // versions they name.
        if let (Op::Put(value) | Op::PutIf { value, .. }, Outcome::Unknown) =
            (&events[i].op, &events[i].outcome)
        {
            for read in events.iter().filter_map(|e| match &e.outcome {
                Outcome::Read(Some((v, val))) if val == value => Some(*v),
                _ => None,
            }) {
                let version = state.as_ref().map(|(v, _)| *v);
                let allowed = match &events[i].op {
                    Op::PutIf { expected, .. } => version == Some(*expected) && read > *expected,
                    _ => version.is_none_or(|v| read > v),
                };
                if allowed && search(events, done | (1 << i), &Some((read, value.clone())), seen) {
                    return true;
                }
            }
        }
    }
    false
}
