//! Per-principal byte-rate quotas: one tenant cannot starve the others of produce or fetch
//! bandwidth on a node.
//!
//! ## Model
//! Each principal has a produce rate and a fetch rate (bytes per second; 0: unlimited): the
//! defaults (`--quota-produce-bytes-per-sec`, `--quota-fetch-bytes-per-sec`) or its own from
//! the quotas file (`--quotas-file`, TOML `[[quota]] principal = "P"`, `produce_bytes_per_sec`,
//! `fetch_bytes_per_sec`; a missing rate takes the default). Without authentication every
//! client is the principal `anonymous` and they share its quota.
//!
//! Each (principal, direction) is a token bucket, kept as GCRA's theoretical arrival time
//! (`tat`): a call of `n` bytes moves `tat` to `max(tat, now) + n / rate`; the response is
//! delayed by whatever of `tat - now` exceeds the burst allowance ([`BURST`] of the rate).
//! Over its quota a client is never refused: its responses arrive later, and a client with a
//! bounded number of requests in flight (every Syncline producer and consumer) then sends at
//! the rate. The bytes are charged after the work (a produce's batch once appended and
//! acknowledged, a fetch's response once read), so the first call over the quota still goes
//! through and the delay pays for it. A bucket's debt is capped at [`DELAY_MAX`] (a delay
//! never exceeds it; bytes beyond it are forgiven), so a burst long past does not keep a
//! principal throttled. Unary Produce and Fetch responses carry the delay in the
//! `syncline-throttle-ms` metadata, as Kafka's responses carry `throttle_time_ms`.
//!
//! Charged: Produce and each ProduceStream message (the batch bytes), Fetch and each Subscribe
//! message (the response's batch bytes). Not charged: tables' point reads (Get, History),
//! Snapshot streams, admin calls, and the Peer service (replication is not a tenant's traffic).
//! Quotas are per node, as Kafka's are: a principal writing to partitions led by three nodes
//! gets its rate on each of them.
//!
//! Each delay is recorded in `syncline_quota_throttle_seconds{principal, direction}` (a
//! histogram: its `_sum` is the time delayed, its `_count` the responses delayed).
//!
//! It may call `config` and `metrics`.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Deserialize;

use crate::config::QuotaSettings;

/// The principal of calls without authentication.
pub const ANONYMOUS: &str = "anonymous";
/// How far ahead of its rate a principal may be before its responses are delayed.
pub const BURST: Duration = Duration::from_millis(250);
/// Longest delay of one response, and the most debt a bucket carries (beyond it, bytes are
/// forgiven): well inside a client's request timeout, so a delayed acknowledgement is not
/// taken for a lost one, and a principal that was over its rate for long is served normally
/// again within this much time of slowing down.
pub const DELAY_MAX: Duration = Duration::from_secs(10);
/// Buckets kept at most; idle ones (no debt) are dropped first, since they hold no state.
const BUCKETS_MAX: usize = 100_000;
/// Entries of the quotas file at most.
const FILE_ENTRIES_MAX: usize = 100_000;

/// Which way the bytes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Produced to the broker.
    Produce,
    /// Fetched from it.
    Fetch,
}

impl Direction {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Direction::Produce => "produce",
            Direction::Fetch => "fetch",
        }
    }
}

/// A principal's rates (bytes per second; 0: unlimited).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Rates {
    produce: u64,
    fetch: u64,
}

impl Rates {
    fn of(self, direction: Direction) -> u64 {
        match direction {
            Direction::Produce => self.produce,
            Direction::Fetch => self.fetch,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct QuotasFile {
    #[serde(default)]
    quota: Vec<QuotaEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct QuotaEntry {
    principal: String,
    produce_bytes_per_sec: Option<u64>,
    fetch_bytes_per_sec: Option<u64>,
}

/// The quotas of this node and their buckets.
#[derive(Debug)]
pub struct Quotas {
    defaults: Rates,
    principals: HashMap<String, Rates>,
    buckets: Mutex<HashMap<(String, Direction), Instant>>,
}

impl Quotas {
    /// The quotas `settings` configure; None when no rate is limited anywhere (nothing is
    /// charged then).
    pub fn load(settings: &QuotaSettings) -> Result<Option<Quotas>, String> {
        let defaults = Rates {
            produce: settings.produce_bytes_per_sec,
            fetch: settings.fetch_bytes_per_sec,
        };
        let mut principals = HashMap::new();
        if let Some(path) = &settings.file {
            for entry in read_file(path)? {
                if entry.principal.is_empty() {
                    return Err(format!(
                        "{}: a quota with an empty principal",
                        path.display()
                    ));
                }
                let rates = Rates {
                    produce: entry.produce_bytes_per_sec.unwrap_or(defaults.produce),
                    fetch: entry.fetch_bytes_per_sec.unwrap_or(defaults.fetch),
                };
                if principals.insert(entry.principal.clone(), rates).is_some() {
                    return Err(format!(
                        "{}: principal `{}` has two quotas",
                        path.display(),
                        entry.principal
                    ));
                }
            }
        }
        let limited =
            defaults != Rates::default() || principals.values().any(|r| *r != Rates::default());
        if !limited {
            return Ok(None);
        }
        Ok(Some(Quotas {
            defaults,
            principals,
            buckets: Mutex::new(HashMap::new()),
        }))
    }

    fn rate(&self, principal: &str, direction: Direction) -> u64 {
        self.principals
            .get(principal)
            .unwrap_or(&self.defaults)
            .of(direction)
    }

    /// Charges `bytes` to `principal` at `now`: how long to delay the response.
    pub fn charge(
        &self,
        principal: &str,
        direction: Direction,
        bytes: u64,
        now: Instant,
    ) -> Duration {
        let rate = self.rate(principal, direction);
        if rate == 0 || bytes == 0 {
            return Duration::ZERO;
        }
        let cost = Duration::from_secs_f64(bytes as f64 / rate as f64);
        let mut buckets = self.buckets.lock();
        if buckets.len() >= BUCKETS_MAX
            && !buckets.contains_key(&(principal.to_string(), direction))
        {
            buckets.retain(|_, tat| *tat > now);
        }
        let tat = buckets
            .entry((principal.to_string(), direction))
            .or_insert(now);
        *tat = ((*tat).max(now) + cost).min(now + DELAY_MAX + BURST);
        tat.saturating_duration_since(now).saturating_sub(BURST)
    }
}

fn read_file(path: &Path) -> Result<Vec<QuotaEntry>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let parsed: QuotasFile =
        toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    if parsed.quota.len() > FILE_ENTRIES_MAX {
        return Err(format!(
            "{}: {} quotas, at most {FILE_ENTRIES_MAX}",
            path.display(),
            parsed.quota.len()
        ));
    }
    Ok(parsed.quota)
}

/// What `bytes` cost `principal`: the delay its response owes (zero without quotas), recorded
/// in the metric. [`throttle`] waits it out; a stream may wait before its next message.
pub fn charge(
    quotas: Option<&Quotas>,
    principal: Option<&super::auth::Principal>,
    direction: Direction,
    bytes: u64,
) -> Duration {
    let Some(quotas) = quotas else {
        return Duration::ZERO;
    };
    let principal = principal.map_or(ANONYMOUS, |p| p.0.as_str());
    let delay = quotas.charge(principal, direction, bytes, Instant::now());
    if !delay.is_zero() {
        metrics::histogram!(
            crate::metrics::QUOTA_THROTTLE_SECONDS,
            "principal" => principal.to_string(),
            "direction" => direction.label()
        )
        .record(delay.as_secs_f64());
    }
    delay
}

/// Delays the caller by what `bytes` cost `principal` (see [`charge`]): the delay.
pub async fn throttle(
    quotas: Option<&Quotas>,
    principal: Option<&super::auth::Principal>,
    direction: Direction,
    bytes: u64,
) -> Duration {
    let delay = charge(quotas, principal, direction, bytes);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    delay
}

/// The metadata key that tells a client how long its response was delayed, in ms.
pub const THROTTLE_HEADER: &str = "syncline-throttle-ms";

/// Marks `response` with the delay it took (nothing when none).
pub fn mark<T>(response: &mut tonic::Response<T>, delay: Duration) {
    if delay.is_zero() {
        return;
    }
    if let Ok(value) = delay.as_millis().to_string().parse() {
        response.metadata_mut().insert(THROTTLE_HEADER, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quotas(produce: u64) -> Quotas {
        Quotas::load(&QuotaSettings {
            produce_bytes_per_sec: produce,
            fetch_bytes_per_sec: 0,
            file: None,
        })
        .unwrap()
        .unwrap()
    }

    #[test]
    fn without_a_rate_nothing_is_charged() {
        let settings = QuotaSettings::default();
        assert!(Quotas::load(&settings).unwrap().is_none());
        let q = quotas(1000);
        assert_eq!(
            q.charge("a", Direction::Fetch, 1 << 30, Instant::now()),
            Duration::ZERO,
            "fetch is unlimited"
        );
    }

    #[test]
    fn a_client_over_its_rate_is_delayed_to_it_after_the_burst() {
        let q = quotas(1000);
        let start = Instant::now();
        // 250 ms of burst: 250 bytes go through undelayed.
        assert_eq!(
            q.charge("a", Direction::Produce, 250, start),
            Duration::ZERO
        );
        // The next 1000 bytes cost a second.
        assert_eq!(
            q.charge("a", Direction::Produce, 1000, start),
            Duration::from_millis(1000)
        );
        // The debt is capped: a huge call delays by DELAY_MAX at most.
        let capped = q.charge("c", Direction::Produce, 1 << 40, start);
        assert_eq!(capped, DELAY_MAX);
        // Another principal has its own bucket.
        assert_eq!(
            q.charge("b", Direction::Produce, 250, start),
            Duration::ZERO
        );
        // Having waited it out, the client is even again.
        let later = start + Duration::from_millis(1250);
        assert_eq!(
            q.charge("a", Direction::Produce, 250, later),
            Duration::ZERO
        );
    }

    #[test]
    fn a_steady_client_converges_to_its_rate() {
        // A client that sends the next batch once the last is answered.
        let q = quotas(1_000_000);
        let mut now = Instant::now();
        let start = now;
        let mut sent = 0u64;
        while now < start + Duration::from_secs(20) {
            let delay = q.charge("a", Direction::Produce, 16_384, now);
            sent += 16_384;
            now += delay + Duration::from_micros(100);
        }
        let rate = sent as f64 / (now - start).as_secs_f64();
        assert!((rate / 1_000_000.0 - 1.0).abs() < 0.02, "{rate}");
    }

    #[test]
    fn the_file_overrides_the_defaults_per_principal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("quotas.toml");
        std::fs::write(
            &path,
            "[[quota]]\nprincipal = \"bulk\"\nproduce_bytes_per_sec = 100\n\n\
             [[quota]]\nprincipal = \"vip\"\nproduce_bytes_per_sec = 0\n",
        )
        .unwrap();
        let q = Quotas::load(&QuotaSettings {
            produce_bytes_per_sec: 1000,
            fetch_bytes_per_sec: 0,
            file: Some(path.clone()),
        })
        .unwrap()
        .unwrap();
        assert_eq!(q.rate("bulk", Direction::Produce), 100);
        assert_eq!(q.rate("vip", Direction::Produce), 0);
        assert_eq!(q.rate("anyone", Direction::Produce), 1000);
        std::fs::write(&path, "[[quota]]\nprincipal = \"x\"\nproduce = 1\n").unwrap();
        let error = Quotas::load(&QuotaSettings {
            file: Some(path),
            ..QuotaSettings::default()
        })
        .unwrap_err();
        assert!(error.contains("produce"), "{error}");
    }
}
