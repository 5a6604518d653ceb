//! Stalled response streams (`stalled_stream_timeout_ms`): a reader that stops reading must not
//! keep the response budget (`super::budget`) from everyone else for good.
//!
//! Why: a Subscribe or Snapshot stream whose reader stops holds up to two messages of budget
//! (what h2 and hyper hold for it). A few such streams with large messages take the whole
//! streams' part of the budget, and every other stream then waits until they read or go away.
//!
//! How:
//! - [`super::budget::HeldUntilSent`] reports to its [`StreamWatch`] when it hands the transport
//!   a message holding budget, and when the transport asks for the next one. A stream stalls
//!   from the moment it hands a message until the next ask: hyper asks for the next message as
//!   soon as it could hand the last one to h2, which needs the previous one written out.
//! - One watchdog task ([`StallWatch::run`]) looks, while some response waits for budget, for
//!   streams stalled longer than the timeout, and closes their connection
//!   (`super::connections::CloseHandle`): once the reader stops, hyper no longer polls the
//!   stream, and the bytes are in h2's send buffer, so only dropping the connection frees them
//!   (hyper then drops every stream of the connection with its permits). Each such stream is
//!   counted in `syncline_stalled_streams_closed_total` and logged (at most once per second).
//!   The other streams of that connection end too; clients reconnect and resume.
//! - Not caught: a stream whose transport asked for its next message and that waits for budget
//!   while its last message is still unread; it becomes stalled once it gets its budget.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use std::time::Instant;

use tokio::sync::watch;

use super::budget::ResponseBudget;
use super::connections::{ConnectionInfo, RateLimited};
use crate::metrics::STALLED_STREAMS_CLOSED_TOTAL;

/// The watchdog looks this often (a quarter of the timeout), but not more often than this ...
const TICK_MIN: Duration = Duration::from_millis(25);
/// ... nor less often than this.
const TICK_MAX: Duration = Duration::from_secs(1);

/// The broker's watched streams and their timeout.
#[derive(Debug)]
pub struct StallWatch {
    timeout: Duration,
    streams: Mutex<HashMap<u64, Arc<Watched>>>,
    next_id: AtomicU64,
    warnings: Mutex<RateLimited>,
}

/// One watched stream.
#[derive(Debug)]
struct Watched {
    /// Since when the transport holds a message of this stream holding budget without asking
    /// for the next one.
    handed_at: Mutex<Option<Instant>>,
    connection: ConnectionInfo,
    rpc: &'static str,
    /// Counted and closed already.
    closed: AtomicBool,
}

/// A stream's registration with the [`StallWatch`]; dropping it ends the watch.
#[derive(Debug)]
pub struct StreamWatch {
    watch: Arc<StallWatch>,
    id: u64,
    entry: Arc<Watched>,
}

impl StreamWatch {
    /// The stream handed the transport a message that holds budget.
    pub fn handed(&self) {
        self.handed_at(Instant::now());
    }

    fn handed_at(&self, now: Instant) {
        let mut handed_at = self.entry.handed_at.lock();
        if handed_at.is_none() {
            *handed_at = Some(now);
        }
    }

    /// The transport asked for the next message.
    pub fn asked(&self) {
        *self.entry.handed_at.lock() = None;
    }
}

impl Drop for StreamWatch {
    fn drop(&mut self) {
        self.watch.streams.lock().remove(&self.id);
    }
}

impl StallWatch {
    /// Streams are stalled after `timeout`.
    pub fn new(timeout: Duration) -> Arc<Self> {
        metrics::counter!(STALLED_STREAMS_CLOSED_TOTAL).increment(0);
        Arc::new(Self {
            timeout,
            streams: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            warnings: Mutex::new(RateLimited::default()),
        })
    }

    /// Watches a stream of `rpc` on `connection`; `None` (not watched) when the connection is
    /// unknown (a service not behind our accept loop).
    pub fn watch(
        self: &Arc<Self>,
        connection: Option<&ConnectionInfo>,
        rpc: &'static str,
    ) -> Option<StreamWatch> {
        let entry = Arc::new(Watched {
            handed_at: Mutex::new(None),
            connection: connection?.clone(),
            rpc,
            closed: AtomicBool::new(false),
        });
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.streams.lock().insert(id, entry.clone());
        Some(StreamWatch {
            watch: self.clone(),
            id,
            entry,
        })
    }

    /// Closes the connections of the streams stalled at `now` for the timeout or longer, when
    /// `others_wait`; returns how many streams were closed.
    pub fn close_stalled(&self, now: Instant, others_wait: bool) -> usize {
        if !others_wait {
            return 0;
        }
        let stalled: Vec<Arc<Watched>> = self
            .streams
            .lock()
            .values()
            .filter(|entry| {
                entry
                    .handed_at
                    .lock()
                    .is_some_and(|since| now.saturating_duration_since(since) >= self.timeout)
            })
            .cloned()
            .collect();
        let mut closed = 0;
        for entry in stalled {
            if entry.closed.swap(true, Ordering::AcqRel) {
                continue;
            }
            closed += 1;
            entry.connection.close.close();
            metrics::counter!(STALLED_STREAMS_CLOSED_TOTAL).increment(1);
            if let Some(suppressed) = self.warnings.lock().due() {
                let peer = entry
                    .connection
                    .peer
                    .map_or_else(|| "unknown".to_owned(), |peer| peer.to_string());
                tracing::warn!(
                    %peer,
                    rpc = entry.rpc,
                    stalled_stream_timeout_ms = self.timeout.as_millis() as u64,
                    suppressed,
                    "closing the connection of a stream whose reader left response budget unread while other responses wait for it (set --stalled-stream-timeout-ms)"
                );
            }
        }
        closed
    }

    /// The watchdog: every quarter of the timeout, closes stalled streams while `budget` has
    /// waiters; ends at shutdown.
    pub async fn run(
        self: Arc<Self>,
        budget: Arc<ResponseBudget>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let tick = (self.timeout / 4).clamp(TICK_MIN, TICK_MAX);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(tick) => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            self.close_stalled(Instant::now(), budget.has_waiters());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::connections::CloseHandle;

    fn connection() -> ConnectionInfo {
        ConnectionInfo {
            peer: None,
            close: CloseHandle::default(),
        }
    }

    #[test]
    fn given_a_stream_handed_a_message_long_ago_when_others_wait_should_close_its_connection_once()
    {
        let watch = StallWatch::new(Duration::from_secs(1));
        let (stalled_conn, reading_conn, idle_conn) = (connection(), connection(), connection());
        let stalled = watch.watch(Some(&stalled_conn), "Subscribe").unwrap();
        let reading = watch.watch(Some(&reading_conn), "Subscribe").unwrap();
        let idle = watch.watch(Some(&idle_conn), "Snapshot").unwrap();
        assert!(watch.watch(None, "Subscribe").is_none());
        let start = Instant::now();
        stalled.handed_at(start);
        reading.handed_at(start);
        idle.asked();
        // The reader asks for more and is handed the next message: its clock restarts.
        reading.asked();
        reading.handed_at(start + Duration::from_millis(600));
        // Handed again without an ask in between: the clock keeps running.
        stalled.handed_at(start + Duration::from_millis(600));
        let now = start + Duration::from_millis(1200);
        assert_eq!(
            watch.close_stalled(now, false),
            0,
            "nobody waits for budget"
        );
        assert!(!stalled_conn.close.is_closed());
        assert_eq!(watch.close_stalled(now, true), 1);
        assert!(stalled_conn.close.is_closed());
        assert!(!reading_conn.close.is_closed(), "handed 600 ms ago");
        assert!(!idle_conn.close.is_closed(), "asked for more: not stalled");
        assert_eq!(watch.close_stalled(now, true), 0, "closed once");
        drop((stalled, reading, idle));
        assert!(watch.streams.lock().is_empty(), "dropped watches leave");
    }
}
