//! The broker-wide budget on response bytes produced but not yet sent (`response_bytes_max`).
//!
//! Why: tonic encodes every response message into a buffer of its own (a copy, even though the
//! batches are `Bytes` slices of a segment mapping), and h2 keeps that buffer until the peer's
//! flow-control window lets it out. Without a budget a subscriber that never reads made the
//! broker read ahead and buffer without bound (64 such streams with 16 MiB messages: ~1 GiB).
//! HTTP/2 flow control does not help: h2 accepts a whole message into its send buffer whatever
//! the window, so the backpressure has to come from here.
//!
//! How:
//! - Every response message with data takes a [`ResponsePermit`] for its encoded size before it
//!   is built; dropping the permit gives the bytes back.
//! - A stream produces its next message only when the transport asks for it (no read-ahead),
//!   and [`HeldUntilSent`] keeps each message's permit until the transport asks for the message
//!   after the next one. hyper hands a message to h2 and at once asks for the next, but waits
//!   for the stream's send capacity before handing that one over, and there is capacity only
//!   once the first is written out but for at most h2's send buffer (400 KiB). So the two latest
//!   messages of a stream are counted: what h2 and hyper hold for a reader that stopped.
//! - One message takes at most max(budget / [`MESSAGE_SHARE_DIVISOR`], one batch): a single
//!   stream cannot take the whole budget. Streams together hold at most
//!   [`STREAMS_SHARE_NUMERATOR`]/[`STREAMS_SHARE_DENOMINATOR`] of it, so that unary fetches find
//!   room even while stalled subscribers hold their part.
//! - A unary response carries its permit to [`HoldUnaryPermits`] in its extensions
//!   ([`UnaryPermit`]); [`PermitBody`] hands the encoded message to hyper in two pieces, all
//!   but its last byte first, and drops the permit when hyper asks for more after the last
//!   byte: hyper hands that byte over only once the rest is (nearly) written out, as above.
//! - A stream message waits for budget as long as it takes (backpressure: nothing is read
//!   ahead); a unary fetch waits a bounded time and then answers RESOURCE_EXHAUSTED.
//! - A stream whose reader leaves its messages unread while others wait for budget loses its
//!   connection after `stalled_stream_timeout_ms` (`super::stall`): that is what frees its
//!   budget, so that stalled readers cannot keep the others waiting for good.
//!
//! Not counted: up to h2's 400 KiB send buffer per stream, and tonic's batching of stream
//! messages smaller than 32 KiB.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use http_body::{Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::codegen::http;

use super::stall::{Polled, StreamWatch};
use crate::metrics::{RESPONSE_BUDGET_WAITS_TOTAL, RESPONSE_BYTES_IN_FLIGHT};

/// A message may take 1/16 of the budget (or one batch, when that is larger): with the 256 MiB
/// default, 16 MiB, the largest fetch.
pub const MESSAGE_SHARE_DIVISOR: usize = 16;
/// Streams together may hold 3/4 of the budget; the last quarter is for unary fetches.
pub const STREAMS_SHARE_NUMERATOR: usize = 3;
/// See [`STREAMS_SHARE_NUMERATOR`].
pub const STREAMS_SHARE_DENOMINATOR: usize = 4;
/// Messages of one stream the transport may still hold: the one h2 is writing and the one
/// hyper waits to hand over (see the module doc).
const MESSAGES_HELD: usize = 2;

/// The budget: shared by every response of the broker.
#[derive(Debug)]
pub struct ResponseBudget {
    all: Arc<Semaphore>,
    streams: Arc<Semaphore>,
    budget_bytes: usize,
    streams_bytes: usize,
    /// Messages waiting for budget now (see [`ResponseBudget::has_waiters`]).
    waiting: AtomicUsize,
}

/// Bytes of the budget held by one response message; dropping it gives them back.
#[derive(Debug)]
pub struct ResponsePermit {
    all: OwnedSemaphorePermit,
    streams: Option<OwnedSemaphorePermit>,
}

/// The budget stayed taken for as long as the caller could wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetTimeout;

impl ResponseBudget {
    /// A budget of `budget_bytes` (at least 1).
    pub fn new(budget_bytes: u64) -> Self {
        let budget_bytes = usize::try_from(budget_bytes)
            .unwrap_or(usize::MAX)
            .clamp(1, Semaphore::MAX_PERMITS);
        let streams_bytes =
            (budget_bytes / STREAMS_SHARE_DENOMINATOR * STREAMS_SHARE_NUMERATOR).max(1);
        metrics::gauge!(RESPONSE_BYTES_IN_FLIGHT).set(0.0);
        metrics::counter!(RESPONSE_BUDGET_WAITS_TOTAL).increment(0);
        Self {
            all: Arc::new(Semaphore::new(budget_bytes)),
            streams: Arc::new(Semaphore::new(streams_bytes)),
            budget_bytes,
            streams_bytes,
            waiting: AtomicUsize::new(0),
        }
    }

    /// Whether some response message is waiting for budget now (the stall watchdog closes
    /// stalled streams only then, `super::stall`).
    pub fn has_waiters(&self) -> bool {
        self.waiting.load(Ordering::Acquire) > 0
    }

    /// Batch bytes one message should read: its share of the budget (a read still returns at
    /// least one whole batch).
    pub fn message_bytes_max(&self) -> usize {
        (self.budget_bytes / MESSAGE_SHARE_DIVISOR).max(1)
    }

    /// The budget in bytes.
    pub fn budget_bytes(&self) -> usize {
        self.budget_bytes
    }

    /// Takes `bytes` for a stream message, waiting as long as it takes. `None` only if the
    /// budget was closed (it never is).
    pub async fn acquire_for_stream(&self, bytes: usize) -> Option<ResponsePermit> {
        let bytes = permits(bytes, self.streams_bytes);
        let mut waited = false;
        let streams = acquire(&self.streams, bytes, &mut waited, &self.waiting).await?;
        let all = acquire(&self.all, bytes, &mut waited, &self.waiting).await?;
        Some(ResponsePermit::new(all, Some(streams)))
    }

    /// Takes `bytes` for a unary response, waiting at most `wait`.
    pub async fn acquire_for_unary(
        &self,
        bytes: usize,
        wait: Duration,
    ) -> Result<ResponsePermit, BudgetTimeout> {
        let bytes = permits(bytes, self.budget_bytes);
        let mut waited = false;
        let all =
            tokio::time::timeout(wait, acquire(&self.all, bytes, &mut waited, &self.waiting)).await;
        match all {
            Ok(Some(all)) => Ok(ResponsePermit::new(all, None)),
            Ok(None) | Err(_) => Err(BudgetTimeout),
        }
    }
}

/// Permits for `bytes`: at least 1, at most the pool (a message larger than the pool, one
/// oversized batch, takes the whole pool rather than waiting forever).
fn permits(bytes: usize, pool: usize) -> u32 {
    bytes.clamp(1, pool).min(u32::MAX as usize) as u32
}

/// Takes `permits` from `semaphore`; the first time a message has to wait (`waited` false) it is
/// counted, when the wait starts (a wait that never ends must show too).
async fn acquire(
    semaphore: &Arc<Semaphore>,
    permits: u32,
    waited: &mut bool,
    waiting: &AtomicUsize,
) -> Option<OwnedSemaphorePermit> {
    if let Ok(permit) = semaphore.clone().try_acquire_many_owned(permits) {
        return Some(permit);
    }
    if !*waited {
        *waited = true;
        metrics::counter!(RESPONSE_BUDGET_WAITS_TOTAL).increment(1);
    }
    let _waiting = Waiting::new(waiting);
    semaphore.clone().acquire_many_owned(permits).await.ok()
}

/// Counts one waiting message while it lives (a cancelled wait is dropped too).
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(waiting: &'a AtomicUsize) -> Self {
        waiting.fetch_add(1, Ordering::AcqRel);
        Self(waiting)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ResponsePermit {
    fn new(all: OwnedSemaphorePermit, streams: Option<OwnedSemaphorePermit>) -> Self {
        metrics::gauge!(RESPONSE_BYTES_IN_FLIGHT).increment(all.num_permits() as f64);
        Self { all, streams }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.all.num_permits()
    }

    /// Gives back what a message built smaller than estimated does not need (keeps at least 1).
    pub fn shrink_to(&mut self, bytes: usize) {
        let excess = self.bytes().saturating_sub(bytes.max(1));
        if excess == 0 {
            return;
        }
        drop(self.all.split(excess));
        if let Some(streams) = &mut self.streams {
            drop(streams.split(excess.min(streams.num_permits().saturating_sub(1))));
        }
        metrics::gauge!(RESPONSE_BYTES_IN_FLIGHT).decrement(excess as f64);
    }
}

impl Drop for ResponsePermit {
    fn drop(&mut self) {
        metrics::gauge!(RESPONSE_BYTES_IN_FLIGHT).decrement(self.bytes() as f64);
    }
}

/// A response stream whose items carry their permits: keeps the permits of the last
/// [`MESSAGES_HELD`] messages, dropping the oldest when the transport asks for another message
/// (see the module doc).
pub struct HeldUntilSent<S> {
    inner: S,
    held: VecDeque<ResponsePermit>,
    /// Told when a message holding budget is handed over and when the next is asked for
    /// (`super::stall`).
    watch: Option<StreamWatch>,
}

impl<S> HeldUntilSent<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Self::watched(inner, None)
    }

    /// Wraps `inner`, reporting to `watch`.
    pub fn watched(inner: S, watch: Option<StreamWatch>) -> Self {
        Self {
            inner,
            held: VecDeque::with_capacity(MESSAGES_HELD),
            watch,
        }
    }
}

impl<S, T> Stream for HeldUntilSent<S>
where
    S: Stream<Item = (T, Option<ResponsePermit>)> + Unpin,
{
    type Item = T;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let this = self.get_mut();
        // Asked for another message: the oldest held one has left the transport.
        if this.held.len() >= MESSAGES_HELD {
            this.held.pop_front();
        }
        let (polled, outcome) = match Pin::new(&mut this.inner).poll_next(cx) {
            Poll::Ready(Some((item, permit))) => {
                this.held.extend(permit);
                (Polled::Handed, Poll::Ready(Some(item)))
            }
            Poll::Ready(None) => {
                this.held.clear();
                (Polled::Ended, Poll::Ready(None))
            }
            Poll::Pending => (Polled::Pending, Poll::Pending),
        };
        if let Some(watch) = &this.watch {
            watch.polled(polled, !this.held.is_empty());
        }
        outcome
    }
}

/// A unary response's permit on its way from the handler to [`HoldUnaryPermits`], in the
/// response extensions (which must be `Clone`).
#[derive(Debug, Clone)]
pub struct UnaryPermit(Arc<parking_lot::Mutex<Option<ResponsePermit>>>);

impl UnaryPermit {
    /// Wraps `permit`.
    pub fn new(permit: ResponsePermit) -> Self {
        Self(Arc::new(parking_lot::Mutex::new(Some(permit))))
    }

    fn take(&self) -> Option<ResponsePermit> {
        self.0.lock().take()
    }
}

/// Wraps a tonic service: responses that carry a [`UnaryPermit`] get a [`PermitBody`].
#[derive(Debug, Clone)]
pub struct HoldUnaryPermits<S> {
    inner: S,
}

impl<S> HoldUnaryPermits<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for HoldUnaryPermits<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tonic::codegen::Service<http::Request<B>> for HoldUnaryPermits<S>
where
    S: tonic::codegen::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<PermitBody>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let response = self.inner.call(request);
        Box::pin(async move {
            let mut response = response.await?;
            let permit = response
                .extensions_mut()
                .remove::<UnaryPermit>()
                .and_then(|permit| permit.take());
            Ok(response.map(|inner| PermitBody {
                inner,
                permit,
                tail: None,
                tail_handed_over: false,
            }))
        })
    }
}

/// A response body holding its permit until the transport has (nearly) written it (see the
/// module doc).
pub struct PermitBody {
    inner: tonic::body::Body,
    permit: Option<ResponsePermit>,
    /// The last byte of the message, handed over after the rest.
    tail: Option<Bytes>,
    tail_handed_over: bool,
}

impl http_body::Body for PermitBody {
    type Data = Bytes;
    type Error = <tonic::body::Body as http_body::Body>::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Some(tail) = this.tail.take() {
            this.tail_handed_over = true;
            return Poll::Ready(Some(Ok(Frame::data(tail))));
        }
        if std::mem::take(&mut this.tail_handed_over) {
            // Asked for more after the last byte: the rest has left.
            this.permit = None;
        }
        let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) if this.permit.is_some() => frame,
            other => return other,
        };
        Poll::Ready(Some(Ok(match frame.into_data() {
            Ok(mut data) if data.len() >= 2 => {
                this.tail = Some(data.split_off(data.len() - 1));
                Frame::data(data)
            }
            Ok(data) => Frame::data(data),
            Err(frame) => frame,
        })))
    }

    fn is_end_stream(&self) -> bool {
        self.tail.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    const MIB: u64 = 1024 * 1024;

    #[tokio::test]
    async fn given_streams_holding_their_share_when_unary_asks_should_find_room() {
        let budget = ResponseBudget::new(16 * MIB);
        let streams_bytes = 12 * MIB as usize;
        let held = budget.acquire_for_stream(streams_bytes).await.unwrap();
        assert_eq!(held.bytes(), streams_bytes);
        // The streams' part is gone: another stream message waits ...
        let waiting =
            tokio::time::timeout(Duration::from_millis(50), budget.acquire_for_stream(1)).await;
        assert!(waiting.is_err(), "a stream message must wait");
        // ... but a unary response gets the reserve.
        let unary = budget
            .acquire_for_unary(MIB as usize, Duration::from_millis(50))
            .await
            .unwrap();
        assert_eq!(unary.bytes(), MIB as usize);
        let too_much = budget
            .acquire_for_unary(4 * MIB as usize, Duration::from_millis(50))
            .await;
        assert_eq!(too_much.unwrap_err(), BudgetTimeout);
        drop(held);
        let later = budget
            .acquire_for_unary(4 * MIB as usize, Duration::from_millis(50))
            .await;
        assert!(later.is_ok());
    }

    #[tokio::test]
    async fn given_a_message_waiting_for_budget_should_show_waiters_until_it_gets_it() {
        let budget = Arc::new(ResponseBudget::new(4 * MIB));
        let held = budget.acquire_for_stream(3 * MIB as usize).await.unwrap();
        assert!(!budget.has_waiters(), "nobody waits");
        let waiting = budget.clone();
        let waiter =
            tokio::spawn(async move { waiting.acquire_for_stream(1).await.map(|p| p.bytes()) });
        let started = std::time::Instant::now();
        while !budget.has_waiters() {
            assert!(started.elapsed() < Duration::from_secs(5), "no waiter seen");
            tokio::task::yield_now().await;
        }
        drop(held);
        assert_eq!(waiter.await.unwrap(), Some(1));
        assert!(!budget.has_waiters(), "the waiter got its budget");
    }

    #[tokio::test]
    async fn given_a_watched_stream_should_stall_from_handing_a_message_until_the_next_ask() {
        use crate::server::connections::{CloseHandle, ConnectionInfo};
        use crate::server::stall::StallWatch;
        use futures_util::FutureExt;
        let budget = ResponseBudget::new(16 * MIB);
        let connection = ConnectionInfo {
            peer: None,
            close: CloseHandle::default(),
            tls: None,
        };
        let stalls = StallWatch::new(Duration::ZERO);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut stream = HeldUntilSent::watched(
            tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
            stalls.watch(Some(&connection), "Subscribe"),
        );
        tx.send((0, budget.acquire_for_stream(1000).await)).unwrap();
        assert_eq!(stream.next().await, Some(0));
        // The transport asks for more (nothing there yet): holding, but with a handed stream
        // somewhere ...
        assert_eq!(stream.next().now_or_never(), None);
        let other_connection = ConnectionInfo {
            peer: None,
            close: CloseHandle::default(),
            tls: None,
        };
        let mut other = HeldUntilSent::watched(
            futures_util::stream::iter([(7, budget.acquire_for_stream(1000).await)]),
            stalls.watch(Some(&other_connection), "Subscribe"),
        );
        assert_eq!(other.next().await, Some(7));
        // ... the handed one is closed, not the holding one.
        assert_eq!(stalls.close_stalled(std::time::Instant::now(), true), 1);
        assert!(other_connection.close.is_closed());
        assert!(!connection.close.is_closed());
        // The other ends (gives its budget back); ours is handed the next message (message 0's
        // budget still held) and not polled since: stalled.
        assert_eq!(other.next().await, None);
        tx.send((1, None)).unwrap();
        assert_eq!(stream.next().await, Some(1));
        assert_eq!(stalls.close_stalled(std::time::Instant::now(), true), 1);
        assert!(connection.close.is_closed());
    }

    #[tokio::test]
    async fn given_message_larger_than_the_pool_when_acquired_should_take_the_whole_pool() {
        let budget = ResponseBudget::new(4 * MIB);
        let permit = budget.acquire_for_stream(64 * MIB as usize).await.unwrap();
        assert_eq!(permit.bytes(), 3 * MIB as usize);
    }

    #[tokio::test]
    async fn given_a_permit_when_shrunk_should_give_back_the_excess() {
        let budget = ResponseBudget::new(4 * MIB);
        let mut permit = budget.acquire_for_stream(2 * MIB as usize).await.unwrap();
        permit.shrink_to(1000);
        assert_eq!(permit.bytes(), 1000);
        assert_eq!(budget.all.available_permits(), 4 * MIB as usize - 1000);
        assert_eq!(budget.streams.available_permits(), 3 * MIB as usize - 1000);
        drop(permit);
        assert_eq!(budget.all.available_permits(), 4 * MIB as usize);
    }

    #[tokio::test]
    async fn given_a_stream_when_polled_should_hold_the_last_two_messages_only() {
        let budget = Arc::new(ResponseBudget::new(16 * MIB));
        let mut items = Vec::new();
        for index in 0..4 {
            items.push((index, budget.acquire_for_stream(1000).await));
        }
        let mut stream = HeldUntilSent::new(futures_util::stream::iter(items));
        let in_use = |budget: &ResponseBudget| 16 * MIB as usize - budget.all.available_permits();
        assert_eq!(stream.next().await, Some(0));
        assert_eq!(in_use(&budget), 4000, "nothing polled after message 0 yet");
        assert_eq!(stream.next().await, Some(1));
        assert_eq!(in_use(&budget), 4000, "message 0 may still be in h2");
        assert_eq!(stream.next().await, Some(2));
        assert_eq!(
            in_use(&budget),
            3000,
            "asked for 2: message 0 was written out"
        );
        assert_eq!(stream.next().await, Some(3));
        assert_eq!(in_use(&budget), 2000);
        assert_eq!(stream.next().await, None);
        assert_eq!(in_use(&budget), 0);
    }
}
