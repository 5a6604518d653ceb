//! Stalled response streams (`stalled_stream_timeout_ms`): a reader that stops reading must not
//! keep the response budget (`super::budget`) from everyone else for good.
//!
//! Why: a Subscribe or Snapshot stream whose reader stops holds up to two messages of budget
//! (what h2 and hyper hold for it). A few such streams with large messages take the whole
//! streams' part of the budget, and every other stream then waits until they read or go away.
//!
//! How:
//! - [`super::budget::HeldUntilSent`] reports to its [`StreamWatch`] every time the transport
//!   polls it ([`Polled`]) and whether it still holds budget. A stream is *handed* from the
//!   moment it hands the transport a message while holding budget until the next poll: hyper
//!   asks for the next message as soon as it could hand the last one to h2, which needs the
//!   previous one written out; a reader that stops leaves its stream handed for good. A stream
//!   is *holding* when a poll found no message ready (it waits for records or for budget) while
//!   it holds budget for messages handed earlier, which may still be unread.
//! - One watchdog task ([`StallWatch::run`]) looks, while some response waits for budget, for
//!   streams handed longer than the timeout, and closes their connection
//!   (`super::connections::CloseHandle`): once the reader stops, hyper no longer polls the
//!   stream, and the bytes are in h2's send buffer, so only dropping the connection frees them
//!   (hyper then drops every stream of the connection with its permits). Each such stream is
//!   counted in `syncline_stalled_streams_closed_total` and logged (at most once per second).
//!   The other streams of that connection end too; clients reconnect and resume.
//! - When no stream is handed at all, nothing frees budget by itself: the budget is held by
//!   holding streams, each waiting (for budget, or for records) with one message that it gives
//!   back only once it gets the next. Then the stream holding longest, if longer than the
//!   timeout, has its connection closed, one per look, until budget moves again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
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

/// What the transport got from the last poll of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Polled {
    /// A message.
    Handed,
    /// Nothing yet.
    Pending,
    /// The end of the stream.
    Ended,
}

/// A watched stream's state (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Holds no budget, or was polled since it handed a message and got one ready.
    Free,
    /// Handed a message at this instant while holding budget, not polled since.
    Handed(Instant),
    /// Has had nothing ready since this instant while holding budget.
    Holding(Instant),
}

/// One watched stream.
#[derive(Debug)]
struct Watched {
    state: Mutex<State>,
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
    /// The transport polled the stream and got `polled`; `holding`: the stream holds budget
    /// (for the messages the transport may still hold).
    pub fn polled(&self, polled: Polled, holding: bool) {
        self.polled_at(polled, holding, Instant::now());
    }

    fn polled_at(&self, polled: Polled, holding: bool, now: Instant) {
        let mut state = self.entry.state.lock();
        *state = match (polled, *state) {
            _ if !holding => State::Free,
            (Polled::Handed, _) => State::Handed(now),
            (Polled::Pending, State::Holding(since)) => State::Holding(since),
            (Polled::Pending, _) => State::Holding(now),
            (Polled::Ended, _) => State::Free,
        };
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
            state: Mutex::new(State::Free),
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

    /// When `others_wait`, closes the connections of the streams handed at `now` for the timeout
    /// or longer, or when none is handed, of the one holding longest, if for the timeout or
    /// longer; returns how many streams were closed.
    pub fn close_stalled(&self, now: Instant, others_wait: bool) -> usize {
        if !others_wait {
            return 0;
        }
        let states: Vec<(Arc<Watched>, State)> = self
            .streams
            .lock()
            .values()
            .map(|entry| (entry.clone(), *entry.state.lock()))
            .collect();
        let stalled_since = |since: Instant| now.saturating_duration_since(since) >= self.timeout;
        let handed = states
            .iter()
            .filter_map(|(entry, state)| match state {
                State::Handed(since) => Some((entry, *since)),
                _ => None,
            })
            .collect::<Vec<_>>();
        let stalled: Vec<Arc<Watched>> = if handed.is_empty() {
            states
                .iter()
                .filter_map(|(entry, state)| match state {
                    State::Holding(since) if !entry.closed.load(Ordering::Acquire) => {
                        Some((entry, *since))
                    }
                    _ => None,
                })
                .min_by_key(|(_, since)| *since)
                .filter(|(_, since)| stalled_since(*since))
                .map(|(entry, _)| entry.clone())
                .into_iter()
                .collect()
        } else {
            handed
                .into_iter()
                .filter(|(_, since)| stalled_since(*since))
                .map(|(entry, _)| entry.clone())
                .collect()
        };
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
            tls: None,
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
        stalled.polled_at(Polled::Handed, true, start);
        reading.polled_at(Polled::Handed, true, start);
        idle.polled_at(Polled::Pending, true, start);
        // The reader asks for more and is handed the next message: its clock restarts.
        let later = start + Duration::from_millis(600);
        reading.polled_at(Polled::Handed, true, later);
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
        assert!(
            !idle_conn.close.is_closed(),
            "holding, but a handed stream will free budget"
        );
        assert_eq!(watch.close_stalled(now, true), 0, "closed once");
        drop((stalled, reading, idle));
        assert!(watch.streams.lock().is_empty(), "dropped watches leave");
    }

    #[test]
    fn given_only_holding_streams_when_others_wait_should_close_the_longest_holding_one_per_look() {
        let watch = StallWatch::new(Duration::from_secs(1));
        let connections = [connection(), connection(), connection(), connection()];
        let streams: Vec<StreamWatch> = connections
            .iter()
            .map(|connection| watch.watch(Some(connection), "Subscribe").unwrap())
            .collect();
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        // 0 and 1 wait holding budget (a poll that finds nothing again keeps the clock), 2
        // holds nothing, 3 was just handed a message.
        streams[0].polled_at(Polled::Pending, true, at(200));
        streams[0].polled_at(Polled::Pending, true, at(900));
        streams[1].polled_at(Polled::Pending, true, at(100));
        streams[2].polled_at(Polled::Pending, false, at(0));
        streams[3].polled_at(Polled::Handed, true, at(500));
        let closed = |index: usize| connections[index].close.is_closed();
        assert_eq!(
            watch.close_stalled(at(1150), true),
            0,
            "3 is handed: it frees budget by itself, or is closed once stalled"
        );
        streams[3].polled_at(Polled::Ended, true, at(1200));
        assert_eq!(watch.close_stalled(at(1300), false), 0, "nobody waits");
        assert_eq!(watch.close_stalled(at(1300), true), 1);
        assert!(closed(1), "the longest holding");
        assert!(!closed(0) && !closed(2) && !closed(3));
        assert_eq!(watch.close_stalled(at(1300), true), 1);
        assert!(closed(0), "next look, the next one");
        assert_eq!(watch.close_stalled(at(1300), true), 0);
        assert!(!closed(2) && !closed(3), "free streams stay");
    }
}
