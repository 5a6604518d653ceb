//! Accepting client connections: the connection limit, the HTTP/2 handshake deadline, and
//! accept errors that are logged and backed off instead of spinning.
//!
//! - At most `max_connections` are open; one more is accepted and closed at once (the peer
//!   sees the connection close) and counted in `syncline_connections_refused_total`. Accepting
//!   and closing frees the listen backlog, where a refused peer would otherwise wait until its
//!   own timeout.
//! - A connection has `handshake_timeout_ms` to send the HTTP/2 client preface and its first
//!   SETTINGS frame; [`Connection`] counts the bytes read until then and fails the read after
//!   the deadline, which makes hyper close it. After the handshake, HTTP/2 keepalive pings (set
//!   on the server builder) find dead peers.
//! - A failed accept is logged at most once per second (with how many were not logged); when
//!   the process or the system is out of descriptors or memory the loop waits 10 ms, doubling up
//!   to 1 s, since the pending connection stays in the backlog and an immediate retry fails
//!   again.
//! - A connection can be closed from outside ([`CloseHandle`], handed to handlers in the
//!   request extensions as [`ConnectionInfo`]): its reads and writes fail from then on, so hyper
//!   drops the connection with every stream on it, and with them the response bytes they hold
//!   (used for stalled streams, `super::stall`).
//! - With TLS (`super::tls`), each accepted connection's TLS handshake runs in its own task,
//!   bounded by the handshake deadline, so a slow or silent client holds a connection slot but
//!   never the accept loop; a failed handshake (a plain-text client, an untrusted client
//!   certificate) closes the connection and is logged at most once per second. The HTTP/2
//!   handshake deadline then starts again for the decrypted stream.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::task::AtomicWaker;
use futures_util::{Stream, StreamExt as _};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;

use crate::metrics::{CONNECTIONS, CONNECTIONS_ACCEPTED_TOTAL, CONNECTIONS_REFUSED_TOTAL};

/// `max_connections` when the descriptor limit leaves room for more.
pub const MAX_CONNECTIONS_DEFAULT: u32 = 10_000;
/// The HTTP/2 client preface (RFC 9113 section 3.4), followed by a SETTINGS frame.
const PREFACE_BYTES: usize = 24;
/// An HTTP/2 frame header: 3 bytes of payload length, type, flags, stream id.
const FRAME_HEADER_BYTES: usize = 9;
/// Accept failures and refusals are logged at most this often.
const LOG_EVERY: Duration = Duration::from_secs(1);
/// First wait after an accept failed for lack of descriptors or memory; doubles up to
/// [`ACCEPT_BACKOFF_MAX`].
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The default `max_connections`: [`MAX_CONNECTIONS_DEFAULT`], or what the open-file limit
/// leaves after every partition's descriptors and the margin ([`crate::descriptors`]), when
/// that is less (at least 1, so that a broker over its descriptor budget still answers;
/// refusing to start then is the job of the descriptor check at start).
pub fn default_max_connections(open_files_limit: u64, partitions: u64) -> u32 {
    let left =
        open_files_limit.saturating_sub(crate::descriptors::descriptor_budget(partitions, 0));
    left.clamp(1, u64::from(MAX_CONNECTIONS_DEFAULT)) as u32
}

/// The connection limit in force, asked at every accept: an explicit `max_connections`, or the
/// default, which follows the partitions created and deleted since the start.
pub type ConnectionLimit = Arc<dyn Fn() -> u32 + Send + Sync>;

/// What the accept loop enforces.
#[derive(Clone)]
pub struct AcceptSettings {
    /// Open connections at most.
    pub max_connections: ConnectionLimit,
    /// Time to send the HTTP/2 preface and SETTINGS (and, with TLS, to finish its handshake).
    pub handshake_timeout: Duration,
    /// TLS for every connection, if configured.
    pub tls: Option<Arc<super::tls::Tls>>,
}

/// The accepted connections of `listener` as tonic's incoming stream (it never yields an
/// error: failures are handled here, see the module doc).
pub fn accept(
    listener: TcpListener,
    settings: AcceptSettings,
) -> impl Stream<Item = Result<Connection, std::io::Error>> + Send {
    metrics::counter!(CONNECTIONS_REFUSED_TOTAL).increment(0);
    let tls = settings.tls.clone();
    let acceptor = Acceptor {
        listener,
        settings,
        open: Arc::new(AtomicUsize::new(0)),
        refusals: RateLimited::default(),
        failures: RateLimited::default(),
        backoff: ACCEPT_BACKOFF_MIN,
    };
    match tls {
        None => futures_util::stream::unfold(acceptor, |mut acceptor| async move {
            let connection = acceptor.next().await;
            Some((Ok(connection), acceptor))
        })
        .left_stream(),
        Some(tls) => tls_connections(acceptor, tls).right_stream(),
    }
}

/// The accept loop with a TLS handshake per connection, each in its own task; connections
/// come out as their handshakes finish.
fn tls_connections(
    mut acceptor: Acceptor,
    tls: Arc<super::tls::Tls>,
) -> impl Stream<Item = Result<Connection, std::io::Error>> + Send {
    let (done, connections) = tokio::sync::mpsc::channel::<Connection>(64);
    let failures = Arc::new(parking_lot::Mutex::new(RateLimited::default()));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = acceptor.next() => accepted,
                _ = done.closed() => break,
            };
            let Connection {
                inner,
                close,
                _slot,
                peer,
                ..
            } = accepted;
            let Transport::Plain(stream) = inner else {
                continue;
            };
            let handshake_timeout = acceptor.settings.handshake_timeout;
            let tls_acceptor = tls.acceptor();
            let done = done.clone();
            let failures = failures.clone();
            tokio::spawn(async move {
                let handshake =
                    tokio::time::timeout(handshake_timeout, tls_acceptor.accept(stream)).await;
                let stream = match handshake {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(error)) => {
                        if let Some(suppressed) = failures.lock().due() {
                            tracing::info!(?peer, %error, suppressed, "TLS handshake failed; connection closed");
                        }
                        return;
                    }
                    Err(_) => {
                        if let Some(suppressed) = failures.lock().due() {
                            tracing::info!(
                                ?peer,
                                timeout_ms = handshake_timeout.as_millis() as u64,
                                suppressed,
                                "no TLS handshake in time; connection closed"
                            );
                        }
                        return;
                    }
                };
                let principal = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|certs| certs.first())
                    .and_then(super::tls::principal_of);
                let _ = done
                    .send(Connection {
                        inner: Transport::Tls(Box::new(stream)),
                        close,
                        _slot,
                        peer,
                        tls: Some(super::tls::TlsInfo { principal }),
                        handshake: Some(Handshake::new(handshake_timeout)),
                    })
                    .await;
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(connections).map(Ok)
}

struct Acceptor {
    listener: TcpListener,
    settings: AcceptSettings,
    open: Arc<AtomicUsize>,
    refusals: RateLimited,
    failures: RateLimited,
    backoff: Duration,
}

impl Acceptor {
    async fn next(&mut self) -> Connection {
        loop {
            match self.listener.accept().await {
                Ok((stream, peer)) => {
                    self.backoff = ACCEPT_BACKOFF_MIN;
                    // Only this loop adds, so the check and the add cannot race.
                    let limit = (self.settings.max_connections)() as usize;
                    if self.open.load(Ordering::Acquire) >= limit {
                        metrics::counter!(CONNECTIONS_REFUSED_TOTAL).increment(1);
                        if let Some(suppressed) = self.refusals.due() {
                            tracing::warn!(%peer, max_connections = limit, suppressed, "connection limit reached: closing new connections (set --max-connections)");
                        }
                        drop(stream);
                        continue;
                    }
                    // Acks are small and latency matters: no Nagle.
                    let _ = stream.set_nodelay(true);
                    return Connection {
                        inner: Transport::Plain(stream),
                        close: CloseHandle::default(),
                        _slot: Slot::take(&self.open),
                        peer: Some(peer),
                        tls: None,
                        handshake: Some(Handshake::new(self.settings.handshake_timeout)),
                    };
                }
                Err(error) => {
                    if let Some(suppressed) = self.failures.due() {
                        tracing::warn!(%error, suppressed, "accepting a connection failed");
                    }
                    if out_of_resources(&error) {
                        tokio::time::sleep(self.backoff).await;
                        self.backoff = (self.backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    }
                }
            }
        }
    }
}

/// EMFILE, ENFILE, ENOBUFS, ENOMEM: retrying at once fails again.
fn out_of_resources(error: &std::io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// "Log now" at most once per [`LOG_EVERY`], with the count of events not logged since.
#[derive(Debug, Default)]
pub(crate) struct RateLimited {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimited {
    pub(crate) fn due(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.last {
            Some(last) if now.duration_since(last) < LOG_EVERY => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// One of the `max_connections` places, counted in `syncline_connections` while taken; given
/// back when the connection is dropped.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(open: &Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Ordering::AcqRel);
        metrics::gauge!(CONNECTIONS).increment(1.0);
        metrics::counter!(CONNECTIONS_ACCEPTED_TOTAL).increment(1);
        Self(open.clone())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
        metrics::gauge!(CONNECTIONS).decrement(1.0);
    }
}

/// The HTTP/2 handshake still expected from the peer: the preface and the first frame (its
/// SETTINGS), by the deadline.
struct Handshake {
    deadline: Pin<Box<Sleep>>,
    timeout: Duration,
    /// Bytes read so far.
    read: usize,
    /// Payload length of the first frame, from its header.
    frame_length: usize,
}

impl Handshake {
    fn new(timeout: Duration) -> Self {
        Self {
            deadline: Box::pin(tokio::time::sleep(timeout)),
            timeout,
            read: 0,
            frame_length: 0,
        }
    }

    /// Counts `bytes` read from the peer; true once the preface and the first frame are in.
    fn feed(&mut self, bytes: &[u8]) -> bool {
        for byte in bytes {
            // The first 3 bytes of the frame header are its payload length, big-endian.
            if (PREFACE_BYTES..PREFACE_BYTES + 3).contains(&self.read) {
                self.frame_length = (self.frame_length << 8) | usize::from(*byte);
            }
            self.read += 1;
            if self.done() {
                return true;
            }
        }
        self.done()
    }

    fn done(&self) -> bool {
        self.read >= PREFACE_BYTES + FRAME_HEADER_BYTES + self.frame_length
    }
}

/// Closes one connection from outside: once [`CloseHandle::close`] is called, the connection's
/// reads and writes fail (the task driving it is woken for that).
#[derive(Debug, Clone, Default)]
pub struct CloseHandle(Arc<CloseState>);

#[derive(Debug, Default)]
struct CloseState {
    closed: AtomicBool,
    read: AtomicWaker,
    write: AtomicWaker,
}

impl CloseHandle {
    /// Closes the connection; true the first time.
    pub fn close(&self) -> bool {
        let first = !self.0.closed.swap(true, Ordering::AcqRel);
        self.0.read.wake();
        self.0.write.wake();
        first
    }

    /// Whether [`CloseHandle::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.0.closed.load(Ordering::Acquire)
    }

    /// An error once closed; registers `waker` (in `slot`) to learn of a later close.
    fn check(&self, slot: &AtomicWaker, cx: &Context<'_>) -> std::io::Result<()> {
        slot.register(cx.waker());
        if self.is_closed() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "connection closed by the broker",
            ));
        }
        Ok(())
    }
}

/// What a handler learns of its connection (tonic puts it in every request's extensions).
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    /// The peer's address.
    pub peer: Option<SocketAddr>,
    /// Closes the connection.
    pub close: CloseHandle,
    /// What its TLS handshake established (None: plain text).
    pub tls: Option<super::tls::TlsInfo>,
}

/// The bytes of a connection: as they come, or through TLS.
enum Transport {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// An accepted client connection: counted (metrics and the limit) while open, and closed when
/// its HTTP/2 handshake does not arrive in time or when its [`CloseHandle`] is used.
pub struct Connection {
    inner: Transport,
    close: CloseHandle,
    _slot: Slot,
    peer: Option<SocketAddr>,
    tls: Option<super::tls::TlsInfo>,
    handshake: Option<Handshake>,
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            Transport::Tls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            Transport::Tls(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(stream) => Pin::new(stream).poll_flush(cx),
            Transport::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            Transport::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            Transport::Tls(stream) => Pin::new(stream.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Transport::Plain(stream) => stream.is_write_vectored(),
            Transport::Tls(stream) => stream.is_write_vectored(),
        }
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let Err(error) = this.close.check(&this.close.0.read, cx) {
            return Poll::Ready(Err(error));
        }
        let Some(handshake) = &mut this.handshake else {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        };
        if handshake.deadline.as_mut().poll(cx).is_ready() {
            tracing::debug!(
                timeout_ms = handshake.timeout.as_millis() as u64,
                bytes = handshake.read,
                "closing a connection that did not complete the HTTP/2 handshake in time"
            );
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "no HTTP/2 handshake within {} ms",
                    handshake.timeout.as_millis()
                ),
            )));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            if handshake.feed(&buf.filled()[before..]) {
                this.handshake = None;
            }
        }
        polled
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if let Err(error) = this.close.check(&this.close.0.write, cx) {
            return Poll::Ready(Err(error));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let Err(error) = this.close.check(&this.close.0.write, cx) {
            return Poll::Ready(Err(error));
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if let Err(error) = this.close.check(&this.close.0.write, cx) {
            return Poll::Ready(Err(error));
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for Connection {
    type ConnectInfo = ConnectionInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        ConnectionInfo {
            peer: self.peer,
            close: self.close.clone(),
            tls: self.tls.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_descriptor_limit_should_leave_room_for_partitions_and_the_margin() {
        assert_eq!(default_max_connections(1_048_576, 100), 10_000);
        assert_eq!(default_max_connections(4096, 1000), 4096 - 1000 - 64);
        assert_eq!(default_max_connections(1024, 5000), 1, "never zero");
    }

    #[tokio::test]
    async fn given_preface_and_settings_in_pieces_should_finish_after_the_frame_payload() {
        let mut handshake = Handshake {
            deadline: Box::pin(tokio::time::sleep(Duration::ZERO)),
            timeout: Duration::ZERO,
            read: 0,
            frame_length: 0,
        };
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        // SETTINGS with one 6-byte setting.
        let header = [0, 0, 6, 4, 0, 0, 0, 0, 0];
        assert!(!handshake.feed(&preface[..10]));
        assert!(!handshake.feed(&preface[10..]));
        assert!(!handshake.feed(&header[..2]));
        assert!(!handshake.feed(&header[2..]));
        assert!(!handshake.feed(&[0; 5]));
        assert!(handshake.feed(&[0; 1]));
    }

    #[tokio::test]
    async fn given_a_connection_closed_from_outside_should_fail_its_pending_read_and_writes() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _peer = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (stream, peer) = listener.accept().await.unwrap();
        let mut connection = Connection {
            inner: Transport::Plain(stream),
            close: CloseHandle::default(),
            _slot: Slot::take(&Arc::new(AtomicUsize::new(0))),
            peer: Some(peer),
            tls: None,
            handshake: None,
        };
        let info = tonic::transport::server::Connected::connect_info(&connection);
        assert!(info.peer.is_some());
        let reading = tokio::spawn(async move {
            let read = connection.read(&mut [0u8; 8]).await;
            (read, connection)
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!reading.is_finished(), "the peer sent nothing");
        assert!(info.close.close());
        assert!(!info.close.close(), "closed once");
        let (read, mut connection) = tokio::time::timeout(Duration::from_secs(5), reading)
            .await
            .expect("the pending read is woken")
            .unwrap();
        let aborted = std::io::ErrorKind::ConnectionAborted;
        assert_eq!(read.unwrap_err().kind(), aborted);
        assert_eq!(connection.write(b"x").await.unwrap_err().kind(), aborted);
    }

    #[test]
    fn given_events_within_a_second_should_log_once_and_count_the_rest() {
        let mut limited = RateLimited::default();
        assert_eq!(limited.due(), Some(0));
        assert_eq!(limited.due(), None);
        assert_eq!(limited.due(), None);
        limited.last = Some(Instant::now() - LOG_EVERY);
        assert_eq!(limited.due(), Some(2));
    }
}
