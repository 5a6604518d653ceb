//! `syncline-gateway`: serves a Syncline cluster over HTTP/JSON (see the crate doc).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::serve::ListenerExt as _;
use clap::Parser;
use syncline_client::{ClientConfig, TlsConfig};
use syncline_gateway::clients::Clients;
use syncline_gateway::http::{router, Gateway};
use syncline_gateway::limit::Limited;
use syncline_gateway::tls::{ServerTls, TlsFiles, TlsListener};

/// HTTP/JSON access to a Syncline cluster for browsers and apps: tables (get, put and delete
/// with compare-and-set by version), records, topics. A request's `Authorization: Bearer
/// TOKEN` is passed on to the brokers, which authenticate it and apply their ACLs.
#[derive(Debug, Parser)]
#[command(name = "syncline-gateway", version)]
struct Flags {
    /// Address to serve HTTP/1.1 and HTTP/2 on (cleartext unless --listen-cert is given)
    #[arg(long, env = "SYNCLINE_GATEWAY_LISTEN", default_value = syncline_gateway::DEFAULT_LISTEN)]
    listen: SocketAddr,

    /// Serve HTTPS (and WSS) on --listen with this certificate chain (PEM, leaf first), with
    /// --listen-key; reloaded on SIGHUP [default: plain HTTP]
    #[arg(
        long,
        env = "SYNCLINE_GATEWAY_LISTEN_CERT",
        value_name = "PEM",
        requires = "listen_key"
    )]
    listen_cert: Option<PathBuf>,

    /// The private key of --listen-cert (PEM: PKCS#8, PKCS#1 or SEC1)
    #[arg(
        long,
        env = "SYNCLINE_GATEWAY_LISTEN_KEY",
        value_name = "PEM",
        requires = "listen_cert"
    )]
    listen_key: Option<PathBuf>,

    /// Brokers to bootstrap from, HOST:PORT[,HOST:PORT...]
    #[arg(long, env = "SYNCLINE_BROKER", default_value = "127.0.0.1:7450")]
    broker: String,

    /// The gateway's own bearer token towards the brokers, used for requests that carry none
    /// [default: none: such requests are anonymous]
    #[arg(long, env = "SYNCLINE_TOKEN", hide_env_values = true)]
    token: Option<String>,

    /// Connect to the brokers with TLS, trusting this CA (PEM)
    #[arg(long, env = "SYNCLINE_TLS_CA", value_name = "PEM")]
    tls_ca: Option<PathBuf>,

    /// The gateway's client certificate towards the brokers (mutual TLS), with --tls-key
    #[arg(
        long,
        env = "SYNCLINE_TLS_CERT",
        value_name = "PEM",
        requires = "tls_key"
    )]
    tls_cert: Option<PathBuf>,

    /// The key of --tls-cert
    #[arg(
        long,
        env = "SYNCLINE_TLS_KEY",
        value_name = "PEM",
        requires = "tls_cert"
    )]
    tls_key: Option<PathBuf>,

    /// A web origin (`https://app.example.com`) whose pages may open WebSockets to the gateway,
    /// besides the gateway's own; repeat or comma-separate; `*` allows any (then every web
    /// page a user opens can act with the gateway's --token)
    #[arg(
        long,
        env = "SYNCLINE_GATEWAY_ALLOW_ORIGIN",
        value_delimiter = ',',
        value_name = "ORIGIN"
    )]
    allow_origin: Vec<String>,

    /// Connections open at once; more wait in the kernel's backlog until others close (keep
    /// it under the process's open-file limit)
    #[arg(long, env = "SYNCLINE_GATEWAY_MAX_CONNECTIONS", default_value_t = syncline_gateway::limit::CONNECTIONS_MAX, value_name = "N")]
    max_connections: usize,

    /// Events buffered per subscription before a subscriber that cannot keep up is
    /// disconnected (it resumes from its last token)
    #[arg(long, default_value_t = syncline_gateway::watch::SUBSCRIBER_BUFFER, value_name = "N")]
    subscriber_buffer_events: usize,

    /// Frames buffered per WebSocket before a client that cannot keep up is closed (code 4008)
    #[arg(long, default_value_t = syncline_gateway::ws::SOCKET_BUFFER, value_name = "N")]
    socket_buffer_frames: usize,

    /// Log filter (tracing's EnvFilter syntax)
    #[arg(long, env = "SYNCLINE_LOG", default_value = "info")]
    log: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let flags = Flags::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&flags.log))
        .with_writer(std::io::stderr)
        .init();
    let mut config = ClientConfig::default();
    if let Some(ca) = &flags.tls_ca {
        let identity = flags.tls_cert.as_deref().zip(flags.tls_key.as_deref());
        config.tls = Some(TlsConfig::from_files(ca, identity)?);
    }
    let gateway = Arc::new(Gateway {
        clients: Clients::new(flags.broker.clone(), config, flags.token.clone()),
        tables: Default::default(),
        limits: syncline_gateway::http::Limits {
            subscriber_events: flags.subscriber_buffer_events,
            socket_frames: flags.socket_buffer_frames,
        },
        origins: flags.allow_origin.clone(),
    });
    let listener = tokio::net::TcpListener::bind(flags.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", flags.listen))?;
    let local = listener.local_addr()?;
    let app = router(gateway);
    match flags.listen_cert.clone().zip(flags.listen_key.clone()) {
        Some((cert, key)) => {
            let tls = ServerTls::load(TlsFiles { cert, key })?;
            reload_on_sighup(tls.clone());
            tracing::info!(brokers = %flags.broker, "listening on {local} (TLS)");
            let listener = Limited::new(TlsListener::new(listener, tls)?, flags.max_connections);
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown())
                .await?;
        }
        None => {
            tracing::info!(brokers = %flags.broker, "listening on {local}");
            // Events are small writes: without TCP_NODELAY, Nagle's algorithm and the
            // client's delayed ACK hold some of them for ~40 ms.
            let listener = listener.tap_io(|tcp| {
                if let Err(error) = tcp.set_nodelay(true) {
                    tracing::debug!(%error, "cannot set TCP_NODELAY");
                }
            });
            axum::serve(Limited::new(listener, flags.max_connections), app)
                .with_graceful_shutdown(shutdown())
                .await?;
        }
    }
    Ok(())
}

/// Resolves at SIGTERM or Ctrl-C.
async fn shutdown() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutting down: finishing in-flight requests");
}

/// Reads the certificate files again at each SIGHUP.
fn reload_on_sighup(tls: Arc<ServerTls>) {
    let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        tracing::warn!("cannot catch SIGHUP: certificates reload only at a restart");
        return;
    };
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match tls.reload() {
                Ok(()) => tracing::info!("SIGHUP: certificate reloaded"),
                Err(error) => {
                    tracing::error!(%error, "SIGHUP: certificate not reloaded; keeping the old one")
                }
            }
        }
    });
}
