//! File descriptors: what the broker needs, and the open-file limit it runs under.
//!
//! An open partition holds one descriptor: its active segment's file (appends `pwritev` and
//! `fdatasync` through it). Everything else is mapped, and a mapping stays valid after its
//! descriptor is closed: sealed segments and all indexes keep no descriptor (a writable index
//! reopens its file by path for the rare `fallocate` that grows it), and one lock on the data
//! directory replaces per-partition lock files. On top come client connections (one socket
//! each) and a margin for listeners, the runtime, and files opened briefly (recovery,
//! compaction, checkpoints).
//!
//! At start the broker raises its soft `RLIMIT_NOFILE` to the hard limit; if the partitions
//! (plus an explicitly set connection limit) still do not fit, it refuses to start with a
//! message naming the limit to raise, instead of fencing the partitions that find no
//! descriptor. Creating a topic that would not fit is refused the same way.

use crate::error::BrokerError;

/// Descriptors an open partition holds (its active segment file).
pub const PER_PARTITION: u64 = 1;
/// Descriptors for everything that is neither a partition nor a connection: stdio, listeners,
/// the runtime's epoll and wakers, the data-directory lock, files open for a moment.
pub const MARGIN: u64 = 64;

/// Descriptors the broker needs for `partitions` open partitions and `connections` client
/// connections.
pub fn descriptor_budget(partitions: u64, connections: u64) -> u64 {
    partitions
        .saturating_mul(PER_PARTITION)
        .saturating_add(connections)
        .saturating_add(MARGIN)
}

/// The soft open-file limit, if it can be read (`None` also for "unlimited").
pub fn open_file_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscall with a valid pointer to a local struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0
        || limit.rlim_cur == libc::RLIM_INFINITY
    {
        return None;
    }
    Some(limit.rlim_cur)
}

/// Raises the soft open-file limit to the hard limit; returns the soft limit afterwards.
pub fn raise_open_file_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                tracing::warn!(error = %std::io::Error::last_os_error(), "cannot raise the open-file limit to the hard limit");
            }
        }
    }
    open_file_limit()
}

/// Fails with [`BrokerError::TooFewDescriptors`] when `partitions` and `connections` do not
/// fit the current open-file limit.
pub fn check(partitions: u64, connections: u64) -> Result<(), BrokerError> {
    let Some(limit) = open_file_limit() else {
        return Ok(());
    };
    let needed = descriptor_budget(partitions, connections);
    if needed > limit {
        return Err(BrokerError::TooFewDescriptors {
            partitions,
            connections,
            needed,
            limit,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_partitions_and_connections_should_need_one_each_plus_the_margin() {
        assert_eq!(descriptor_budget(0, 0), MARGIN);
        assert_eq!(descriptor_budget(1600, 0), 1600 + MARGIN);
        assert_eq!(descriptor_budget(1600, 1000), 2600 + MARGIN);
        assert_eq!(descriptor_budget(u64::MAX, 1), u64::MAX);
    }

    #[test]
    fn given_more_partitions_than_the_limit_should_name_the_limit_to_raise() {
        let limit = open_file_limit().unwrap_or(u64::MAX);
        if limit == u64::MAX {
            return;
        }
        let error = check(limit, 0).unwrap_err().to_string();
        assert!(error.contains("ulimit -n"), "{error}");
        assert!(
            error.contains(&format!("the limit (ulimit -n) is {limit}")),
            "{error}"
        );
        assert!(check(0, 0).is_ok() || limit < MARGIN);
    }
}
