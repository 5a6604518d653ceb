//! The gRPC server: the Syncline service, `grpc.health.v1.Health` and server reflection on one
//! port, with graceful shutdown.

pub mod audit;
pub mod auth;
pub mod authorize;
pub mod budget;
pub mod connections;
mod decode_limit;
pub(crate) mod peer;
pub mod quota;
mod reads;
mod service;
mod stall;
pub mod status;
pub mod tls;
mod wire_calls;

use crate::group::{Coordinator, GroupConfig};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use syncline_proto::v1::broker_server::BrokerServer;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use service::BrokerService;

use crate::config::Config;
use crate::error::BrokerError;
use crate::topic::Registry;

/// HTTP/2 windows: large enough that a multi-MiB batch or fetch is not throttled by flow control
/// on loopback (the defaults are 64 KiB).
const STREAM_WINDOW_BYTES: u32 = 8 * 1024 * 1024;
const CONNECTION_WINDOW_BYTES: u32 = 32 * 1024 * 1024;
/// How long a stopping node waits for its leaderships to move to other replicas (see
/// `replication::handoff`) before it stops serving.
const LEADERSHIP_HANDOFF_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a shutdown waits for in-flight requests and streams before dropping them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// gRPC message bodies may exceed the largest batch or fetch by this much (protobuf framing).
const MESSAGE_SLACK_BYTES: usize = 1024 * 1024;
/// The largest node-to-node message (a controller snapshot travels in one).
const PEER_MESSAGE_BYTES_MAX: usize = 256 * 1024 * 1024;

/// A broker that has recovered its topics and bound its port: "accepts connections" means
/// "ready".
#[derive(Debug)]
pub struct Broker {
    identity: crate::cluster::identity::Identity,
    controller: Option<Arc<crate::cluster::controller::Controller>>,
    registry: Arc<Registry>,
    coordinator: Arc<Coordinator>,
    listener: TcpListener,
    local_addr: SocketAddr,
    metrics: Option<(TcpListener, SocketAddr)>,
    metrics_handle: metrics_exporter_prometheus::PrometheusHandle,
}

impl Broker {
    /// Opens the data directory (recovering every partition), then binds the listen address.
    pub async fn start(mut config: Config) -> Result<Broker, BrokerError> {
        let listen = config.listen;
        // A data directory that belongs to a cluster restarts as its member without flags.
        crate::cluster::identity::adopt(&config.data_dir, &mut config.node)?;
        let config = Arc::new(config);
        let registry = {
            let config = config.clone();
            tokio::task::spawn_blocking(move || {
                // Partition logs start their flushers on this runtime.
                let handle = tokio::runtime::Handle::current();
                let _guard = handle.enter();
                Registry::open(config)
            })
            .await
            .map_err(|e| BrokerError::InvalidRequest(format!("startup task failed: {e}")))??
        };
        let registry = Arc::new(registry);
        let coordinator = Arc::new(
            Coordinator::open(
                registry.clone(),
                GroupConfig {
                    initial_rebalance_delay: Duration::from_millis(
                        config.group_initial_rebalance_delay_ms,
                    ),
                    heartbeat_interval_ms: config.group_heartbeat_interval_ms,
                    session_timeout_default_ms: config.group_session_timeout_ms,
                },
            )
            .await?,
        );
        let metrics_handle = crate::metrics::install();
        let metrics =
            match crate::metrics::bind(config.metrics_listen, config.metrics_listen_explicit)
                .await
                .map_err(|e| {
                    BrokerError::io(
                        "binding the metrics address",
                        config.metrics_listen.to_string(),
                        e,
                    )
                })? {
                Some(listener) => {
                    let addr = listener.local_addr().map_err(|e| {
                        BrokerError::io(
                            "reading the address of",
                            config.metrics_listen.to_string(),
                            e,
                        )
                    })?;
                    Some((listener, addr))
                }
                None => None,
            };
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|e| BrokerError::io("binding", listen.to_string(), e))?;
        let local_addr = listener
            .local_addr()
            .map_err(|e| BrokerError::io("reading the address of", listen.to_string(), e))?;
        if config.node.is_clustered()
            && !config
                .data_dir
                .join(crate::cluster::controller::CONTROLLER_DIR)
                .exists()
        {
            let topics: Vec<String> = registry.list().iter().map(|t| t.name.to_string()).collect();
            if !topics.is_empty() {
                return Err(BrokerError::DataDirIdentity {
                    dir: config.data_dir.clone(),
                    message: format!(
                        "it holds topics written by a single-node broker ({}), but the broker \
                         was started with --cluster or --join: a single node's data cannot join a \
                         cluster yet. Start it without them, or give this node an empty \
                         --data-dir",
                        topics.join(", ")
                    ),
                });
            }
        }
        let advertised = config.node.advertised(local_addr);
        let identity = match &config.node.join {
            Some(join) => crate::cluster::join::join(&config, join, &advertised).await?,
            None => crate::cluster::identity::load_or_create(
                &config.data_dir,
                &config.node,
                &advertised,
            )?,
        };
        tracing::info!(node_id = identity.node_id, cluster_id = %identity.cluster_id, advertise = %advertised, "node identity");
        let controller = if config.node.is_clustered() {
            // The voters the cluster was formed with, as recorded (a node that joined records
            // the cluster's list).
            let voters: std::collections::BTreeMap<u64, String> =
                crate::cluster::node::parse_cluster(&identity.voters)
                    .map_err(|message| BrokerError::DataDirIdentity {
                        dir: config.data_dir.clone(),
                        message: format!("its recorded voters `{}`: {message}", identity.voters),
                    })?
                    .into_iter()
                    .map(|voter| (voter.id, voter.address))
                    .collect();
            let for_offsets = registry.clone();
            let replication_factor = config
                .node
                .default_replication_factor
                .unwrap_or_else(|| voters.len().clamp(1, 3) as u32);
            let offsets_topic: crate::cluster::controller::InternalTopic =
                Box::new(move |partitions| {
                    let mut settings = for_offsets.offsets_settings(partitions);
                    settings.replication_factor = replication_factor;
                    let (id, text) = for_offsets
                        .new_topic_text(crate::group::offsets::OFFSETS_TOPIC, &settings)?;
                    Ok((id.to_string(), text, replication_factor))
                });
            Some(
                crate::cluster::controller::Controller::start(
                    &config.data_dir,
                    &identity,
                    config.node.advertised(local_addr),
                    voters,
                    offsets_topic,
                    config.replication,
                    peer_tls(&config)?,
                )
                .await?,
            )
        } else {
            None
        };
        Ok(Broker {
            identity,
            controller,
            registry,
            coordinator,
            listener,
            local_addr,
            metrics,
            metrics_handle,
        })
    }

    /// The bound address (the real port when the config asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The bound metrics address, when metrics are served.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(|(_, addr)| *addr)
    }

    /// The node and cluster this broker's data directory belongs to.
    pub fn identity(&self) -> &crate::cluster::identity::Identity {
        &self.identity
    }

    /// The consumer group coordinator.
    pub fn coordinator(&self) -> &Arc<Coordinator> {
        &self.coordinator
    }

    /// The topics.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Who may do what: with `authenticated`, the configured superusers and this node's own
    /// certificate subject (the node's identity towards the others), and the ACLs of a
    /// cluster of one from the data directory.
    fn access(&self, authenticated: bool) -> Result<authorize::Access, BrokerError> {
        let config = self.registry.config();
        let mut superusers = config.auth.superusers.clone();
        if let Some(files) = &config.tls {
            if let Some(subject) = tls::subject_of(&files.cert) {
                superusers.push(subject);
            }
        }
        let local = match &self.controller {
            Some(_) => None,
            None => Some(Arc::new(
                crate::acl::store::AclStore::open(&config.data_dir)
                    .map_err(|e| BrokerError::InvalidRequest(format!("ACLs: {}", e.0)))?,
            )),
        };
        if authenticated {
            tracing::info!(
                ?superusers,
                "calls are checked against ACLs (PERMISSION_DENIED otherwise)"
            );
            if self.controller.is_some() && config.auth.superusers.is_empty() {
                tracing::warn!(
                    own = ?superusers,
                    "in a cluster with authentication the other nodes call this one with their \
                     certificates, which only superusers may: unless every node uses this \
                     node's certificate subject, list theirs in --superusers"
                );
            }
        }
        Ok(authorize::Access::new(authenticated, superusers, local))
    }

    /// Serves until `signal` resolves; then stops accepting, ends streams, lets in-flight
    /// requests finish, and closes every log (fsync + clean-shutdown marker).
    pub async fn serve(
        self,
        signal: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), BrokerError> {
        let tls = match &self.registry.config().tls {
            Some(files) => {
                let tls = Arc::new(tls::Tls::load(files.clone()).map_err(|e| {
                    BrokerError::InvalidRequest(format!("TLS on the client port: {e}"))
                })?);
                tokio::spawn(reload_on_sighup(tls.clone(), self.controller.clone()));
                tracing::info!(cert = %files.cert.display(), mutual = tls.mutual(), "TLS on the client port (certificates reload on SIGHUP)");
                Some(tls)
            }
            None => None,
        };
        let mutual_tls = tls.as_ref().is_some_and(|t| t.mutual());
        let auth = auth::Authenticator::load(&self.registry.config().auth, mutual_tls)
            .map_err(|e| BrokerError::InvalidRequest(format!("authentication: {e}")))?
            .map(Arc::new);
        if let Some(auth) = &auth {
            tracing::info!(
                ?auth,
                mutual_tls,
                "clients authenticate (UNAUTHENTICATED otherwise)"
            );
        }
        let access = Arc::new(self.access(auth.is_some())?);
        let quotas = quota::Quotas::load(&self.registry.config().quotas)
            .map_err(|e| BrokerError::InvalidRequest(format!("quotas: {e}")))?
            .map(Arc::new);
        if let Some(quotas) = &quotas {
            tracing::info!(
                ?quotas,
                "per-principal byte-rate quotas (responses over them are delayed)"
            );
        }
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let limits = self.registry.config().limits.clone();
        let response_budget = Arc::new(budget::ResponseBudget::new(limits.response_bytes_max));
        let stalls = stall::StallWatch::new(Duration::from_millis(
            self.registry.config().connections.stalled_stream_timeout_ms,
        ));
        let watchdog = tokio::spawn(
            stalls
                .clone()
                .run(response_budget.clone(), shutdown_rx.clone()),
        );
        let service = BrokerService::new(
            self.registry.clone(),
            self.coordinator.clone(),
            shutdown_rx.clone(),
            response_budget,
            stalls,
        )
        .with_cluster(crate::cluster::ClusterView {
            controller: self.controller.clone(),
            node_id: self.identity.node_id,
            cluster_id: self.identity.cluster_id.clone(),
            address: self.registry.config().node.advertised(self.local_addr),
        })
        .with_access(access.clone())
        .with_quotas(quotas);
        let message_bytes_max = 2 * limits.max_batch_bytes as usize + MESSAGE_SLACK_BYTES;
        let broker = BrokerServer::new(service.clone())
            // Twice the batch limit, so an oversized batch reaches our check and gets a clear
            // RESOURCE_EXHAUSTED (past this limit tonic answers OUT_OF_RANGE, which DecodeLimit
            // below turns into RESOURCE_EXHAUSTED).
            .max_decoding_message_size(message_bytes_max)
            // A response holds at least one whole batch (up to max_batch_bytes) and, when
            // records are decoded, about twice the batch bytes.
            .max_encoding_message_size(
                2 * limits.max_fetch_bytes.max(limits.max_batch_bytes) as usize
                    + MESSAGE_SLACK_BYTES,
            );
        let (health_reporter, health) = tonic_health::server::health_reporter();
        health_reporter
            .set_serving::<BrokerServer<BrokerService>>()
            .await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(syncline_proto::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| BrokerError::InvalidRequest(format!("reflection service: {e}")))?;

        let retention = tokio::spawn(retention_loop(
            self.registry.clone(),
            Duration::from_millis(self.registry.config().retention_check_ms),
            shutdown_rx.clone(),
        ));
        let expiry = tokio::spawn(session_expiry_loop(
            self.coordinator.clone(),
            shutdown_rx.clone(),
        ));
        if let Some(controller) = &self.controller {
            controller.attach_registry(self.registry.clone());
        }
        let cluster_tasks = self.controller.clone().map(|controller| {
            let coordinator = self.coordinator.clone();
            let after = self.coordinator.clone();
            let on_deleted: crate::cluster::reconcile::OnDeleted =
                Arc::new(move |topic: &str| coordinator.topic_deleted(topic));
            let after_pass: crate::cluster::reconcile::AfterPass =
                Arc::new(move || after.attach_offsets());
            (
                tokio::spawn(controller.clone().run(shutdown_rx.clone())),
                tokio::spawn(crate::cluster::reconcile::run(
                    controller,
                    self.registry.clone(),
                    on_deleted,
                    after_pass,
                    shutdown_rx.clone(),
                )),
            )
        });
        let peer = self.controller.clone().map(|controller| {
            authorize::SuperusersOnly::new(
                syncline_proto::v1::peer_server::PeerServer::new(peer::PeerService::new(
                    controller,
                ))
                .max_decoding_message_size(PEER_MESSAGE_BYTES_MAX)
                .max_encoding_message_size(PEER_MESSAGE_BYTES_MAX),
                auth.clone(),
                access.clone(),
            )
        });
        let cleaner = tokio::spawn(cleaner_loop(
            self.registry.clone(),
            Duration::from_millis(self.registry.config().cleaner_interval_ms),
            shutdown_rx.clone(),
        ));
        let mut grace_rx = shutdown_rx.clone();
        let mut fatal = self.controller.as_ref().map(|c| c.fatal());
        let fatal_reason = self.controller.as_ref().map(|c| c.fatal());
        let handoff_controller = self.controller.clone();
        let shutdown = async move {
            let fatal = async {
                match fatal.as_mut() {
                    Some(fatal) => {
                        let _ = fatal.wait_for(Option::is_some).await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            let signalled = tokio::select! {
                () = signal => true,
                () = fatal => {
                    tracing::error!("this node cannot stay in the cluster: shutting down");
                    false
                }
            };
            // Still serving: requests meanwhile are answered NotLeader naming the new leaders.
            if let (true, Some(controller)) = (signalled, &handoff_controller) {
                controller.hand_off(LEADERSHIP_HANDOFF_TIMEOUT).await;
            }
            tracing::info!("shutting down: no new connections; finishing in-flight requests");
            health_reporter
                .set_not_serving::<BrokerServer<BrokerService>>()
                .await;
            let _ = shutdown_tx.send(true);
        };
        let metrics_task = self.metrics.map(|(listener, addr)| {
            tracing::info!("metrics listening on {addr}");
            let mut stop = shutdown_rx.clone();
            tokio::spawn(crate::metrics::serve(
                listener,
                crate::metrics::Access {
                    tls: tls.clone(),
                    auth: auth.clone(),
                },
                self.metrics_handle.clone(),
                self.registry.clone(),
                self.coordinator.clone(),
                self.controller.clone(),
                async move {
                    let _ = stop.wait_for(|stop| *stop).await;
                },
            ))
        });
        let settings = &self.registry.config().connections;
        let max_connections: connections::ConnectionLimit = match settings.max_connections {
            Some(explicit) => Arc::new(move || explicit),
            // Follows the partitions: topics created later take descriptors from connections.
            None => {
                let registry = Arc::downgrade(&self.registry);
                let open_files = crate::descriptors::open_file_limit().unwrap_or(u64::MAX);
                Arc::new(move || {
                    let partitions = registry.upgrade().map_or(0, |registry| {
                        registry
                            .list()
                            .iter()
                            .map(|topic| u64::from(topic.settings.partitions))
                            .sum()
                    });
                    connections::default_max_connections(open_files, partitions)
                })
            }
        };
        tracing::info!(
            max_connections = max_connections(),
            handshake_timeout_ms = settings.handshake_timeout_ms,
            keepalive_interval_ms = settings.keepalive_interval_ms,
            keepalive_timeout_ms = settings.keepalive_timeout_ms,
            stalled_stream_timeout_ms = settings.stalled_stream_timeout_ms,
            response_bytes_max = limits.response_bytes_max,
            "connection and response limits"
        );
        let incoming = connections::accept(
            self.listener,
            connections::AcceptSettings {
                max_connections,
                handshake_timeout: Duration::from_millis(settings.handshake_timeout_ms),
                tls,
            },
        );
        tracing::info!("listening on {}", self.local_addr);
        let serving = tonic::transport::Server::builder()
            .initial_stream_window_size(STREAM_WINDOW_BYTES)
            .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
            .http2_keepalive_interval(Some(Duration::from_millis(settings.keepalive_interval_ms)))
            .http2_keepalive_timeout(Some(Duration::from_millis(settings.keepalive_timeout_ms)))
            .tcp_nodelay(true)
            .max_frame_size(Some(wire_calls::MAX_FRAME_BYTES))
            .add_service(health)
            .add_service(auth::Authenticated::new(reflection, auth.clone()))
            .add_optional_service(peer)
            .add_service(decode_limit::DecodeLimit::new(
                budget::HoldUnaryPermits::new(auth::Authenticated::new(
                    wire_calls::WireCalls::new(broker, service, message_bytes_max),
                    auth,
                )),
                limits.max_batch_bytes,
            ))
            .serve_with_incoming_shutdown(incoming, shutdown);
        // Clients that stop reading keep their streams (and so the server) alive: after the
        // grace period the remaining connections are dropped and the logs closed anyway.
        let grace = async move {
            let _ = grace_rx.wait_for(|stop| *stop).await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        };
        let served = tokio::select! {
            served = serving => served,
            _ = grace => {
                tracing::warn!(grace_s = SHUTDOWN_GRACE.as_secs(), "in-flight requests did not finish within the grace period; dropping their connections");
                Ok(())
            }
        };
        if let Some((controller, reconcile)) = cluster_tasks {
            let _ = reconcile.await;
            let _ = controller.await;
        }
        let _ = retention.await;
        let _ = watchdog.await;
        let _ = cleaner.await;
        let _ = expiry.await;
        if let Some(task) = metrics_task {
            let _ = task.await;
        }
        let closed = self.registry.close().await;
        if closed.is_ok() {
            tracing::info!("all logs flushed and closed");
        }
        served.map_err(|e| {
            BrokerError::io(
                "serving",
                self.local_addr.to_string(),
                std::io::Error::other(e),
            )
        })?;
        closed?;
        match fatal_reason.and_then(|reason| reason.borrow().clone()) {
            Some(reason) => Err(BrokerError::Controller(reason)),
            None => Ok(()),
        }
    }
}

/// Removes group members whose session expired, every 100 ms.
async fn session_expiry_loop(coordinator: Arc<Coordinator>, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => coordinator.expire(),
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}

/// The background cleaner: every `every`, compacts the table partitions that are due, one at a
/// time on a blocking thread (throttled by the registry's I/O budget). Shutdown cancels a pass
/// in progress (nothing of it is committed).
async fn cleaner_loop(
    registry: Arc<Registry>,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let cancel = Arc::new(std::sync::atomic::AtomicBool::new(false));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        let registry = registry.clone();
        let pass_cancel = cancel.clone();
        let mut pass = tokio::task::spawn_blocking(move || registry.run_cleaner(&pass_cancel));
        let stopping = tokio::select! {
            _ = &mut pass => false,
            stop = shutdown.wait_for(|stop| *stop) => stop.is_ok(),
        };
        if stopping {
            cancel.store(true, std::sync::atomic::Ordering::Release);
            let _ = pass.await;
            return;
        }
    }
}

async fn retention_loop(
    registry: Arc<Registry>,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        let registry = registry.clone();
        let _ = tokio::task::spawn_blocking(move || {
            registry.enforce_retention();
            registry.checkpoint();
        })
        .await;
    }
}

/// Reloads the TLS certificates at every SIGHUP (a failed reload keeps the ones in use), and
/// has the connections to the other nodes made again with them.
async fn reload_on_sighup(
    tls: Arc<tls::Tls>,
    controller: Option<Arc<crate::cluster::controller::Controller>>,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hangups) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP: TLS certificates reload only at a restart");
        return;
    };
    while hangups.recv().await.is_some() {
        match tls.reload() {
            Ok(()) => {
                // Connections to the other nodes are made again with the new files.
                if let Some(controller) = &controller {
                    controller.reset_peer_channels();
                }
                tracing::info!("SIGHUP: TLS certificates reloaded")
            }
            Err(error) => {
                tracing::error!(%error, "SIGHUP: TLS certificates not reloaded; the ones in use stay")
            }
        }
    }
}

/// TLS between the nodes of a cluster: mutual, with this node's certificate and the client CA
/// (which must then sign the nodes' certificates); refused when TLS is on without a client CA.
fn peer_tls(
    config: &crate::config::Config,
) -> Result<Option<crate::config::TlsFiles>, BrokerError> {
    match &config.tls {
        Some(files) if files.client_ca.is_none() => Err(BrokerError::InvalidRequest(
            "a cluster node with --tls-cert needs --tls-client-ca too: nodes reach each other \
             with mutual TLS, each node's certificate signed by that CA"
                .into(),
        )),
        tls => Ok(tls.clone()),
    }
}
