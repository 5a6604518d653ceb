//! Each connector's status: what it is doing, where it is, how far behind, and its last error.
//!
//! Connectors update their [`Status`] in memory; the runtime publishes every connector's
//! status as JSON to the compacted status topic every [`PUBLISH_INTERVAL`] (key
//! `<connector>@<worker>`, so each `connect` process of a sink has its own entry), serves
//! them as Prometheus metrics, and `syncline connect status` reads the topic back.
//!
//! Status value (JSON):
//!
//! ```json
//! {"connector": "shop", "kind": "source", "type": "postgres", "worker": "host:4242",
//!  "state": "streaming", "position": "0/1A2B3C4", "lag": 0, "lag_unit": "bytes",
//!  "records_total": 1200, "errors_total": 0, "last_error": null, "updated_ms": 1733318400000}
//! ```
//!
//! `state` is `starting`, `snapshotting`, `streaming` (sources), `running` (sinks), `failed`
//! (the last attempt failed; it is retried with backoff, see `last_error`) or `stopped`.
//! `lag` is bytes of WAL not yet confirmed for a source, records not yet applied for a sink.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::envelope::now_ms;

/// How often the runtime publishes statuses.
pub const PUBLISH_INTERVAL: Duration = Duration::from_secs(2);

/// A status entry older than this (not updated by its worker) is shown as `stale`.
pub const STALE_AFTER_MS: i64 = 30_000;

/// One connector's status, as published.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub connector: String,
    /// `source` or `sink`.
    pub kind: String,
    /// `postgres`, `redis` or `http`.
    #[serde(rename = "type")]
    pub connector_type: String,
    /// `host:pid` of the `connect` process.
    pub worker: String,
    pub state: String,
    pub position: Option<String>,
    pub lag: Option<u64>,
    pub lag_unit: String,
    pub records_total: u64,
    pub errors_total: u64,
    pub last_error: Option<String>,
    pub updated_ms: i64,
}

#[derive(Debug)]
struct Mutable {
    state: &'static str,
    position: Option<String>,
    lag: Option<u64>,
    last_error: Option<String>,
}

/// A connector's live status, shared by its tasks and the runtime.
#[derive(Debug)]
pub struct Status {
    pub connector: String,
    pub kind: &'static str,
    pub connector_type: &'static str,
    lag_unit: &'static str,
    mutable: Mutex<Mutable>,
    records_total: AtomicU64,
    errors_total: AtomicU64,
}

impl Status {
    pub fn new(
        connector: &str,
        kind: &'static str,
        connector_type: &'static str,
        lag_unit: &'static str,
    ) -> Arc<Status> {
        Arc::new(Status {
            connector: connector.to_owned(),
            kind,
            connector_type,
            lag_unit,
            mutable: Mutex::new(Mutable {
                state: "starting",
                position: None,
                lag: None,
                last_error: None,
            }),
            records_total: AtomicU64::new(0),
            errors_total: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Mutable> {
        self.mutable
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn set_state(&self, state: &'static str) {
        self.lock().state = state;
    }

    pub fn set_position(&self, position: String) {
        self.lock().position = Some(position);
    }

    pub fn set_lag(&self, lag: u64) {
        self.lock().lag = Some(lag);
    }

    /// Counts records written (sources) or applied (sinks).
    pub fn add_records(&self, count: u64) {
        self.records_total.fetch_add(count, Ordering::Relaxed);
    }

    /// Records a failure: the state becomes `failed` until the next attempt sets another.
    pub fn fail(&self, error: &str) {
        self.errors_total.fetch_add(1, Ordering::Relaxed);
        let mut mutable = self.lock();
        mutable.state = "failed";
        mutable.last_error = Some(error.to_owned());
    }

    /// Records a problem that does not stop the connector (a TRUNCATE it cannot mirror, a
    /// record a sink could not read).
    pub fn warn(&self, error: &str) {
        self.errors_total.fetch_add(1, Ordering::Relaxed);
        self.lock().last_error = Some(error.to_owned());
    }

    pub fn report(&self, worker: &str) -> StatusReport {
        let mutable = self.lock();
        StatusReport {
            connector: self.connector.clone(),
            kind: self.kind.to_owned(),
            connector_type: self.connector_type.to_owned(),
            worker: worker.to_owned(),
            state: mutable.state.to_owned(),
            position: mutable.position.clone(),
            lag: mutable.lag,
            lag_unit: self.lag_unit.to_owned(),
            records_total: self.records_total.load(Ordering::Relaxed),
            errors_total: self.errors_total.load(Ordering::Relaxed),
            last_error: mutable.last_error.clone(),
            updated_ms: now_ms(),
        }
    }
}

/// Prometheus text for the statuses of this process.
pub fn metrics_text(statuses: &[Arc<Status>]) -> String {
    use std::fmt::Write as _;
    const STATES: [&str; 6] = [
        "starting",
        "snapshotting",
        "streaming",
        "running",
        "failed",
        "stopped",
    ];
    let reports: Vec<StatusReport> = statuses.iter().map(|s| s.report("")).collect();
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, lines: Vec<String>| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for line in lines {
            let _ = writeln!(out, "{name}{line}");
        }
    };
    let labels = |r: &StatusReport| format!("connector=\"{}\",kind=\"{}\"", r.connector, r.kind);
    family(
        "syncline_connect_records_total",
        "counter",
        "Records written by a source or applied by a sink.",
        reports
            .iter()
            .map(|r| format!("{{{}}} {}", labels(r), r.records_total))
            .collect(),
    );
    family(
        "syncline_connect_errors_total",
        "counter",
        "Failures and warnings of a connector.",
        reports
            .iter()
            .map(|r| format!("{{{}}} {}", labels(r), r.errors_total))
            .collect(),
    );
    family(
        "syncline_connect_lag",
        "gauge",
        "How far a connector is behind (bytes of WAL for sources, records for sinks).",
        reports
            .iter()
            .filter_map(|r| {
                let lag = r.lag?;
                Some(format!("{{{},unit=\"{}\"}} {lag}", labels(r), r.lag_unit))
            })
            .collect(),
    );
    family(
        "syncline_connect_state",
        "gauge",
        "1 for the connector's current state.",
        reports
            .iter()
            .flat_map(|r| {
                STATES.iter().map(move |state| {
                    format!(
                        "{{connector=\"{}\",state=\"{state}\"}} {}",
                        r.connector,
                        u8::from(r.state == *state)
                    )
                })
            })
            .collect(),
    );
    out
}
