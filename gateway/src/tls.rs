//! TLS on the gateway's own port (`--listen-cert`, `--listen-key`): rustls with the ring
//! provider, ALPN `h2` and `http/1.1` (a WebSocket upgrade is HTTP/1.1), certificates that
//! reload on SIGHUP without a restart.
//!
//! A connection must finish its handshake within [`HANDSHAKE_TIMEOUT`]; one that fails (a
//! plain-text client, a client that does not trust the certificate) is dropped and logged at
//! debug level, and the next connection is accepted. A reload that fails (a missing file, a
//! key that does not match) is logged and changes nothing; open connections keep their
//! certificate.
//!
//! The broker has its own copy of these few lines (`broker/src/server/tls.rs`, with client
//! certificates and two ALPN sets): the gateway may call `syncline-client` only, and the
//! client crate has no server side.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};

/// How long a client has to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The certificate (chain, leaf first) and key files, PEM.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The certificate chain.
    pub cert: PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// The files' certificate, handed to every handshake and swapped by [`ServerTls::reload`].
pub struct ServerTls {
    files: TlsFiles,
    current: Arc<Resolver>,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("files", &self.files)
            .finish()
    }
}

#[derive(Debug)]
struct Resolver(parking_lot::RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().clone())
    }
}
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))
}

fn certified_key(files: &TlsFiles) -> anyhow::Result<Arc<CertifiedKey>> {
    let pem = read(&files.cert)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| {
            anyhow::anyhow!("{}: not a PEM certificate list: {e}", files.cert.display())
        })?;
    if chain.is_empty() {
        anyhow::bail!(
            "{}: holds no certificate (expected `-----BEGIN CERTIFICATE-----`)",
            files.cert.display()
        );
    }
    let pem = read(&files.key)?;
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        anyhow::anyhow!(
            "{}: holds no private key in PEM (PKCS#8, PKCS#1 or SEC1): {e}",
            files.key.display()
        )
    })?;
    let key = CertifiedKey::from_der(chain, key, &provider()).map_err(|e| {
        anyhow::anyhow!("{} with {}: {e}", files.cert.display(), files.key.display())
    })?;
    Ok(Arc::new(key))
}

impl ServerTls {
    /// Loads `files`; refuses what cannot serve.
    pub fn load(files: TlsFiles) -> anyhow::Result<Arc<ServerTls>> {
        let current = Arc::new(Resolver(parking_lot::RwLock::new(certified_key(&files)?)));
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| anyhow::anyhow!("TLS settings refused: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(ServerTls {
            files,
            current,
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        }))
    }

    /// Reads the files again for new connections; on an error nothing changes.
    pub fn reload(&self) -> anyhow::Result<()> {
        let key = certified_key(&self.files)?;
        *self.current.0.write() = key;
        Ok(())
    }
}

/// Handshakes in progress at once; more connections wait in the kernel's backlog.
pub const HANDSHAKES_MAX: usize = 1024;

type Handshaken = (tokio_rustls::server::TlsStream<TcpStream>, SocketAddr);

/// The listener's connections, each through a TLS handshake of its own task (so a client
/// that stalls its handshake holds up no one else).
pub struct TlsListener {
    local: SocketAddr,
    ready: mpsc::Receiver<Handshaken>,
}

impl TlsListener {
    /// Accepts on `listener` with `tls`, until the listener is dropped.
    pub fn new(listener: TcpListener, tls: Arc<ServerTls>) -> std::io::Result<TlsListener> {
        let local = listener.local_addr()?;
        let (done, ready) = mpsc::channel(64);
        let permits = Arc::new(Semaphore::new(HANDSHAKES_MAX));
        tokio::spawn(async move {
            loop {
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    return;
                };
                let (stream, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of file descriptors, say: wait instead of spinning.
                        tracing::warn!(%error, "cannot accept a connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if done.is_closed() {
                    return;
                }
                // Small event writes must not wait for Nagle's algorithm (see main.rs).
                let _ = stream.set_nodelay(true);
                let handshake = tls.acceptor.accept(stream);
                let done = done.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                        Ok(Ok(stream)) => {
                            let _ = done.send((stream, peer)).await;
                        }
                        Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "no TLS handshake within the timeout"),
                    }
                });
            }
        });
        Ok(TlsListener { local, ready })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(accepted) => accepted,
            // The accepting task ended: only when the runtime shuts down.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
