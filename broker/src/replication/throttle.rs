//! The throttle on the bytes a node sends to replicas that are catching up after a move
//! (`syncline topic reassign`, `cluster rebalance`, `cluster remove-node`), so a move does not
//! take the disk and network from the producers.
//!
//! One token bucket per node, shared by every move this node leads: each (group, new replica)
//! of a move in progress is registered with the move's rate, and an append with entries or a
//! snapshot chunk to such a replica first waits its turn at the lowest registered rate. Other
//! replicas (the voters) are never throttled: a move slows only the copy it makes. A replica
//! that catches up more slowly than the partition is written never catches up; the mover
//! reports it as still moving (the admin raises the throttle or waits for a quieter time).
//!
//! The bucket allows a burst of [`BURST`] of sending time, so a single 1 MiB append does not
//! wait when nothing was sent for a while.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use super::network::GroupId;

/// Sending time the bucket may bank while idle.
pub const BURST: Duration = Duration::from_millis(100);

/// This node's throttle (see the module doc).
#[derive(Debug, Default)]
pub struct Throttle {
    limits: parking_lot::Mutex<HashMap<(GroupId, u64), u64>>,
    /// When the bytes already granted are sent at the rate.
    next: tokio::sync::Mutex<Option<Instant>>,
}

impl Throttle {
    /// Throttles what this node sends to `target` in `group` to `bytes_per_sec` (0: no limit).
    pub fn set(&self, group: &GroupId, target: u64, bytes_per_sec: u64) {
        let mut limits = self.limits.lock();
        if bytes_per_sec == 0 {
            limits.remove(&(group.clone(), target));
        } else {
            limits.insert((group.clone(), target), bytes_per_sec);
        }
    }

    /// Stops throttling everything sent in `group`.
    pub fn clear_group(&self, group: &GroupId) {
        self.limits.lock().retain(|(g, _), _| g != group);
    }

    /// Keeps only the entries of groups `keep` accepts (a leader that lost its leadership
    /// mid-move, or a move completed elsewhere, leaves none behind).
    pub fn retain_groups(&self, keep: impl Fn(&GroupId) -> bool) {
        self.limits.lock().retain(|(g, _), _| keep(g));
    }

    /// The rate that applies to what is sent to `target` in `group`: the lowest registered
    /// rate when this replica is throttled, else None.
    pub fn limit(&self, group: &GroupId, target: u64) -> Option<u64> {
        let limits = self.limits.lock();
        limits.get(&(group.clone(), target))?;
        limits.values().copied().min()
    }

    /// Bytes/s registered (the lowest), if any move is throttled.
    pub fn active(&self) -> Option<u64> {
        self.limits.lock().values().copied().min()
    }

    /// Waits until `bytes` may be sent at `bytes_per_sec`.
    pub async fn take(&self, bytes_per_sec: u64, bytes: u64) {
        if bytes_per_sec == 0 || bytes == 0 {
            return;
        }
        let cost = Duration::from_secs_f64(bytes as f64 / bytes_per_sec as f64);
        let wait = {
            let mut next = self.next.lock().await;
            let now = Instant::now();
            let floor = now.checked_sub(BURST).unwrap_or(now);
            let start = next.map_or(floor, |n| n.max(floor));
            let done = start + cost;
            *next = Some(done);
            done.saturating_duration_since(now)
        };
        if !wait.is_zero() {
            metrics::histogram!(crate::metrics::REPLICATION_THROTTLE_WAIT_SECONDS)
                .record(wait.as_secs_f64());
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(p: u32) -> GroupId {
        GroupId {
            topic_id: "t".into(),
            partition: p,
        }
    }

    #[test]
    fn given_throttled_replicas_should_limit_only_them_at_the_lowest_rate() {
        let throttle = Throttle::default();
        assert_eq!(throttle.limit(&group(0), 4), None);
        throttle.set(&group(0), 4, 1000);
        throttle.set(&group(1), 5, 500);
        assert_eq!(throttle.limit(&group(0), 4), Some(500));
        assert_eq!(throttle.limit(&group(0), 2), None);
        throttle.clear_group(&group(1));
        assert_eq!(throttle.limit(&group(0), 4), Some(1000));
        throttle.set(&group(0), 4, 0);
        assert_eq!(throttle.active(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn given_a_rate_should_spread_sends_over_time_after_a_burst() {
        let throttle = Throttle::default();
        let started = Instant::now();
        // 10 sends of 100 bytes at 1000 bytes/s: 1 s of sending, less the 100 ms burst.
        for _ in 0..10 {
            throttle.take(1000, 100).await;
        }
        let elapsed = started.elapsed();
        assert!(
            elapsed >= Duration::from_millis(850) && elapsed <= Duration::from_millis(950),
            "{elapsed:?}"
        );
        // Idle long enough, a send within the burst goes at once.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let again = Instant::now();
        throttle.take(1000, 50).await;
        assert_eq!(again.elapsed(), Duration::ZERO);
    }
}
