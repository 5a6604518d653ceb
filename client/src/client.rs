//! [`Client`]: connections to a broker or a cluster of broker nodes (routed by the
//! `routing` module), topic administration, and the factory for producers, consumers and table
//! handles.

use std::sync::Arc;
use std::time::Duration;

use syncline_proto::batch::BATCH_LEN_MAX;
use syncline_proto::v1;
use tokio::sync::watch;

use crate::address::BrokerAddress;
use crate::admin::{
    CompactionOutcome, ListedOffset, OffsetQuery, TopicConfig, TopicDescription, TopicSummary,
};
use crate::consumer::{Consumer, ConsumerConfig};
use crate::error::{Error, Result};
use crate::group::{GroupConsumer, GroupConsumerConfig};
use crate::producer::{Producer, ProducerConfig, ProducerIdentity};
use crate::routing::{self, Failure, Grpc, Node, Router, Target};
use crate::snapshot::Snapshot;
use crate::sync_table::{SyncTable, SyncTableConfig};
use crate::table::Table;

/// How the client connects. The defaults suit a broker on a local network.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// How long to wait for the TCP connection (and each reconnection) to the broker.
    pub connect_timeout: Duration,
    /// Largest gRPC message the client sends or accepts. A fetch returns at least one whole
    /// batch (up to the codec's 64 MiB) plus up to its byte budget, so the default is twice
    /// the largest batch.
    pub message_bytes_max: usize,
    /// HTTP/2 keepalive ping interval; a broker that stops answering pings is treated as gone
    /// and in-flight requests fail (and are retried) instead of hanging.
    pub keepalive_interval: Duration,
    /// How long a keepalive ping may go unanswered.
    pub keepalive_timeout: Duration,
    /// TLS to the brokers (None: plain text).
    pub tls: Option<TlsConfig>,
    /// Credentials sent with every call (see [`ClientConfig::with_token`]).
    pub credentials: routing::Credentials,
}

/// TLS settings of a client: the CA that signed the brokers' certificates and, for mutual TLS,
/// the client's own certificate and key (all PEM, as read from the files).
#[derive(Clone, Default)]
pub struct TlsConfig {
    /// CA certificates the brokers' certificates must chain to.
    pub ca_pem: Vec<u8>,
    /// The client's certificate chain and private key (mutual TLS).
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The name the brokers' certificates must carry (default: each broker address's host).
    pub domain: Option<String>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig")
            .field("ca_pem_bytes", &self.ca_pem.len())
            .field("identity", &self.identity.is_some())
            .field("domain", &self.domain)
            .finish()
    }
}

impl TlsConfig {
    /// Reads the CA (and, when both are given, the client's certificate and key) from PEM
    /// files.
    pub fn from_files(
        ca: &std::path::Path,
        identity: Option<(&std::path::Path, &std::path::Path)>,
    ) -> Result<TlsConfig> {
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|e| Error::InvalidConfig {
                key: "tls",
                reason: format!("cannot read {}: {e}", path.display()),
            })
        };
        Ok(TlsConfig {
            ca_pem: read(ca)?,
            identity: match identity {
                Some((cert, key)) => Some((read(cert)?, read(key)?)),
                None => None,
            },
            domain: None,
        })
    }
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            connect_timeout: Duration::from_secs(5),
            message_bytes_max: 2 * BATCH_LEN_MAX as usize,
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(10),
            tls: None,
            credentials: routing::Credentials::default(),
        }
    }
}

impl ClientConfig {
    /// Sends `token` as `authorization: Bearer TOKEN` with every call (a static token or a
    /// JWT the brokers accept).
    pub fn with_token(mut self, token: &str) -> Result<ClientConfig> {
        self.credentials = routing::Credentials::new(Some(token))?;
        Ok(self)
    }

    /// Checks each field against its bounds.
    pub fn validate(&self) -> Result<()> {
        if self.connect_timeout.is_zero() {
            return Err(Error::InvalidConfig {
                key: "connect_timeout",
                reason: "must be above 0".to_owned(),
            });
        }
        if self.message_bytes_max < BATCH_LEN_MAX as usize {
            return Err(Error::InvalidConfig {
                key: "message_bytes_max",
                reason: format!(
                    "{} is below the largest batch ({BATCH_LEN_MAX} bytes)",
                    self.message_bytes_max
                ),
            });
        }
        if self.keepalive_interval.is_zero() || self.keepalive_timeout.is_zero() {
            return Err(Error::InvalidConfig {
                key: "keepalive_interval",
                reason: "keepalive interval and timeout must be above 0".to_owned(),
            });
        }
        Ok(())
    }
}

/// A connection to a Syncline broker or cluster. Cheap to clone: clones share the connections,
/// which multiplex every request (HTTP/2) and reconnect by themselves after a broker restart.
///
/// In a cluster the client keeps a view of the nodes and of each partition's leader (from
/// `DescribeCluster`, asked at connect and again when the view turns out wrong) and one
/// connection per node: each partition's traffic goes to its leader, each group's to its
/// coordinator, administration to the bootstrap node (or any other when it is unreachable).
#[derive(Debug, Clone)]
pub struct Client {
    router: Arc<Router>,
    connectivity: Arc<watch::Sender<Connectivity>>,
}

/// Whether the retry loops of a client's consumers, group consumers and synced tables reach
/// the broker ([`Client::connectivity`]): so that a program can say it is waiting for the
/// broker instead of staying silent while they retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Connectivity {
    /// Requests go through (or none failed yet).
    Connected,
    /// The broker is unreachable and the loops are retrying; `error` is the failure that
    /// started this outage (later failures of the same outage do not change it).
    Reconnecting {
        /// The first error of the outage.
        error: String,
    },
}

impl Client {
    /// Connects to the broker at `address` (`host:port` or `http://host:port`) with the default
    /// [`ClientConfig`]. `address` may be a comma-separated list of bootstrap addresses, tried
    /// in order until one answers. Fails with [`Error::Unreachable`] when no connection can be
    /// made.
    pub async fn connect(address: &str) -> Result<Client> {
        Client::connect_with(address, ClientConfig::default()).await
    }

    /// Connects with an explicit [`ClientConfig`] (`address` as for [`Client::connect`]).
    pub async fn connect_with(address: &str, config: ClientConfig) -> Result<Client> {
        config.validate()?;
        let addresses = address
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(BrokerAddress::parse)
            .collect::<Result<Vec<_>>>()?;
        if addresses.is_empty() {
            return Err(Error::InvalidAddress {
                address: address.to_owned(),
                reason: "no address given".to_owned(),
            });
        }
        let mut failures = Vec::with_capacity(addresses.len());
        for address in &addresses {
            match Client::connect_one(address, &config).await {
                Ok(client) => return Ok(client),
                Err(error) => failures.push(error),
            }
        }
        match failures.pop() {
            Some(error) if addresses.len() == 1 => Err(error),
            last => {
                let all: Vec<&str> = addresses.iter().map(|a| a.authority.as_str()).collect();
                let last = last.map(|e| e.to_string()).unwrap_or_default();
                Err(Error::Unreachable {
                    address: all.join(","),
                    reason: format!(
                        "none of the {} bootstrap addresses answered (the last: {last})",
                        all.len()
                    ),
                })
            }
        }
    }

    async fn connect_one(address: &BrokerAddress, config: &ClientConfig) -> Result<Client> {
        let channel = routing::endpoint(address, config)?
            .connect()
            .await
            .map_err(|error| Error::from_transport(&address.authority, &error))?;
        let bootstrap = Node {
            grpc: routing::grpc(channel.clone(), config),
            raw: routing::raw(channel, config),
            address: Arc::from(address.authority.as_str()),
        };
        let router = Arc::new(Router::new(config.clone(), bootstrap));
        // The view: without it (the node did not answer in time) every call goes to this node
        // until a refresh succeeds.
        if let Err(error) = router.refresh().await {
            tracing::debug!(broker = %address.authority, %error, "no cluster view yet");
        }
        Ok(Client {
            router,
            connectivity: Arc::new(watch::Sender::new(Connectivity::Connected)),
        })
    }

    /// Follows whether the client's retry loops reach the broker: the value changes once when
    /// an outage starts (the first transient failure) and once when a request goes through
    /// again, whichever consumer or table of this client (or its clones) sees it.
    pub fn connectivity(&self) -> watch::Receiver<Connectivity> {
        self.connectivity.subscribe()
    }

    /// A retry loop failed with a transient `error` and will try again.
    pub(crate) fn note_unreachable(&self, error: &Error) {
        self.connectivity.send_if_modified(|state| match state {
            Connectivity::Connected => {
                *state = Connectivity::Reconnecting {
                    error: error.to_string(),
                };
                true
            }
            Connectivity::Reconnecting { .. } => false,
        });
    }

    /// A request of a retry loop went through.
    pub(crate) fn note_reachable(&self) {
        self.connectivity.send_if_modified(|state| match state {
            Connectivity::Connected => false,
            Connectivity::Reconnecting { .. } => {
                *state = Connectivity::Connected;
                true
            }
        });
    }

    /// The bootstrap broker's address as `host:port` (the one of the given list that answered).
    pub fn address(&self) -> &str {
        &self.router.bootstrap().address
    }

    /// The generated gRPC client on the bootstrap connection, for calls this crate does not
    /// wrap (in a cluster, per-partition calls there may answer FAILED_PRECONDITION with a
    /// `NotLeader` detail naming the leader).
    pub fn grpc(&self) -> Grpc {
        self.router.bootstrap().grpc.clone()
    }

    pub(crate) fn router(&self) -> &Router {
        &self.router
    }

    /// Runs `call` on the leader of `topic`/`partition` (see [`Router::call`]).
    pub(crate) async fn on_partition<T, F, Fut>(
        &self,
        topic: &str,
        partition: u32,
        mut call: F,
    ) -> std::result::Result<T, Failure>
    where
        F: FnMut(Grpc) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        self.on_partition_node(topic, partition, |node: Node| call(node.grpc))
            .await
    }

    /// [`Client::on_partition`] with the node's whole connection (for calls framed by hand,
    /// `crate::wire_call`).
    pub(crate) async fn on_partition_node<T, F, Fut>(
        &self,
        topic: &str,
        partition: u32,
        call: F,
    ) -> std::result::Result<T, Failure>
    where
        F: FnMut(Node) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let (answer, _) = self
            .router
            .call_node(Target::Partition(topic, partition), call)
            .await?;
        Ok(answer)
    }

    /// [`Client::on_partition`] for a streaming call: also the address of the node that
    /// answered, for [`Client::stream_error`].
    pub(crate) async fn open_on_partition<T, F, Fut>(
        &self,
        topic: &str,
        partition: u32,
        call: F,
    ) -> Result<(T, Arc<str>)>
    where
        F: FnMut(Grpc) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        Ok(self
            .router
            .call(Target::Partition(topic, partition), call)
            .await?)
    }

    /// An error in the middle of a stream from `address` for `target`: the view takes what
    /// it says (a new leader, a lost connection) for the caller's retry.
    pub(crate) fn stream_error(
        &self,
        target: Target<'_>,
        address: &Arc<str>,
        status: tonic::Status,
    ) -> Error {
        self.router.observe(address, &status, Some(target));
        Error::from_status(address, status)
    }

    /// The settings the client was made with.
    pub(crate) fn config(&self) -> &ClientConfig {
        self.router.config()
    }

    /// [`Client::stream_error`] for a stream carrying many partitions (ProduceStream): a
    /// `NotLeader` detail names its partition.
    pub(crate) fn stream_error_any_partition(
        &self,
        address: &Arc<str>,
        status: tonic::Status,
    ) -> Error {
        self.router.observe(address, &status, None);
        Error::from_status(address, status)
    }

    /// Runs `call` on the coordinator of `group` (see [`Router::call`]).
    pub(crate) async fn on_coordinator<T, F, Fut>(
        &self,
        group: &str,
        call: F,
    ) -> std::result::Result<T, Failure>
    where
        F: FnMut(Grpc) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let (answer, _) = self.router.call(Target::Group(group), call).await?;
        Ok(answer)
    }

    /// Runs `call` on any node, failing over from the bootstrap node (see
    /// [`Router::call_any`]).
    pub(crate) async fn on_any<T, F, Fut>(&self, call: F) -> Result<T>
    where
        F: FnMut(Grpc) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        Ok(self.router.call_any(call).await?)
    }

    /// Creates a topic. Fails with ALREADY_EXISTS for a duplicate name and INVALID_ARGUMENT for
    /// a bad name or config (see [`Error::code`]).
    pub async fn create_topic(&self, name: &str, config: TopicConfig) -> Result<TopicDescription> {
        let request = v1::CreateTopicRequest {
            name: name.to_owned(),
            config: Some(config.to_wire()),
        };
        let response = self
            .on_any(|mut grpc| {
                let request = request.clone();
                async move { grpc.create_topic(request).await }
            })
            .await?;
        TopicDescription::from_wire(response.topic)
    }

    /// Deletes a topic and its data. Fails with NOT_FOUND for an unknown topic.
    pub async fn delete_topic(&self, name: &str) -> Result<()> {
        let request = v1::DeleteTopicRequest {
            name: name.to_owned(),
        };
        self.on_any(|mut grpc| {
            let request = request.clone();
            async move { grpc.delete_topic(request).await }
        })
        .await?;
        Ok(())
    }

    /// Every topic, sorted by name.
    pub async fn list_topics(&self) -> Result<Vec<TopicSummary>> {
        let response = self
            .on_any(|mut grpc| async move { grpc.list_topics(v1::ListTopicsRequest {}).await })
            .await?;
        let mut topics: Vec<TopicSummary> = response
            .topics
            .into_iter()
            .map(TopicSummary::from_wire)
            .collect();
        topics.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(topics)
    }

    /// A topic's effective config and per-partition offsets and sizes.
    pub async fn describe_topic(&self, name: &str) -> Result<TopicDescription> {
        let request = v1::DescribeTopicRequest {
            name: name.to_owned(),
        };
        let response = self
            .on_any(|mut grpc| {
                let request = request.clone();
                async move { grpc.describe_topic(request).await }
            })
            .await?;
        TopicDescription::from_wire(response.topic)
    }

    /// Runs a compaction pass over every partition of a table now and reports what each did
    /// (`roll`: seal the active segments first, so everything durable is compacted).
    pub async fn compact_topic(&self, name: &str, roll: bool) -> Result<Vec<CompactionOutcome>> {
        let request = v1::CompactTopicRequest {
            name: name.to_owned(),
            roll,
        };
        let response = self
            .on_any(|mut grpc| {
                let request = request.clone();
                async move { grpc.compact_topic(request).await }
            })
            .await?;
        Ok(response
            .partitions
            .into_iter()
            .map(CompactionOutcome::from_wire)
            .collect())
    }

    /// Looks up an offset of one partition: earliest, latest (durable), or by timestamp.
    pub async fn list_offsets(
        &self,
        topic: &str,
        partition: u32,
        query: OffsetQuery,
    ) -> Result<ListedOffset> {
        let (spec, timestamp_ms) = match query {
            OffsetQuery::Earliest => (v1::OffsetSpec::Earliest, 0),
            OffsetQuery::Latest => (v1::OffsetSpec::Latest, 0),
            OffsetQuery::Timestamp(timestamp_ms) => (v1::OffsetSpec::Timestamp, timestamp_ms),
        };
        let request = v1::ListOffsetsRequest {
            topic: topic.to_owned(),
            partition,
            spec: spec as i32,
            timestamp_ms,
        };
        let response = self
            .on_partition(topic, partition, |mut grpc| {
                let request = request.clone();
                async move { grpc.list_offsets(request).await }
            })
            .await?;
        Ok(ListedOffset {
            offset: response.offset,
            found: match query {
                OffsetQuery::Timestamp(_) => response.found,
                OffsetQuery::Earliest | OffsetQuery::Latest => true,
            },
        })
    }

    /// A batching producer for `topic`. Looks the topic up once for its partition count (keyed
    /// records must go to `partition_for_key(key, partitions)`) and, when the producer is
    /// idempotent (the default), takes a producer id.
    pub async fn producer(&self, topic: &str, config: ProducerConfig) -> Result<Producer> {
        config.validate()?;
        let description = self.describe_topic(topic).await?;
        self.start_producer(topic, description.partition_count(), config)
            .await
    }

    /// Starts a producer for a topic whose partition count is known.
    pub(crate) async fn start_producer(
        &self,
        topic: &str,
        partitions: u32,
        config: ProducerConfig,
    ) -> Result<Producer> {
        config.validate()?;
        let identity = if config.idempotent {
            Some(self.init_producer(None).await?)
        } else {
            None
        };
        Ok(Producer::start(
            self.clone(),
            topic.to_owned(),
            partitions,
            config,
            identity,
        ))
    }

    /// `InitProducer`: `None` asks for a new producer id (epoch 0); `Some(id)` re-initialises
    /// that id with the next epoch, which fences every older instance still writing under it
    /// (their batches are refused from then on). A cluster of several nodes refuses `Some`
    /// (FAILED_PRECONDITION) in this version; the producers and tables of this crate only ask
    /// for new ids.
    pub async fn init_producer(&self, producer_id: Option<u64>) -> Result<ProducerIdentity> {
        let request = v1::InitProducerRequest {
            producer_id: producer_id.unwrap_or(0),
        };
        let response = self
            .on_any(|mut grpc| async move { grpc.init_producer(request).await })
            .await?;
        ProducerIdentity::from_wire(&response)
    }

    /// [`Client::init_producer`] for a new id, retrying transient failures with a doubling
    /// `backoff` (up to `backoff_max`) until `deadline`.
    pub(crate) async fn new_producer_id_until(
        &self,
        deadline: tokio::time::Instant,
        mut backoff: Duration,
        backoff_max: Duration,
    ) -> Result<ProducerIdentity> {
        loop {
            let error = match tokio::time::timeout_at(deadline, self.init_producer(None)).await {
                Ok(Ok(identity)) => return Ok(identity),
                Ok(Err(error)) => error,
                Err(_) => {
                    return Err(Error::Unreachable {
                        address: self.address().to_owned(),
                        reason: "no answer to InitProducer in time".to_owned(),
                    })
                }
            };
            if !error.is_transient() || tokio::time::Instant::now() + backoff >= deadline {
                return Err(error);
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(backoff_max);
        }
    }

    /// A handle on table `topic` (a topic created with cleanup=compact): get, history, put,
    /// delete and compare-and-set writes. Fails with [`Error::NotATable`] for any other topic.
    pub async fn table(&self, topic: &str) -> Result<Table> {
        self.table_with(topic, ProducerConfig::default()).await
    }

    /// A table handle whose writes use `config` (acks, timeouts and retries; batching for
    /// unconditional writes).
    pub async fn table_with(&self, topic: &str, config: ProducerConfig) -> Result<Table> {
        config.validate()?;
        let description = self.describe_topic(topic).await?;
        Table::open(self.clone(), description, config)
    }

    /// `Snapshot`: the latest value of every live key of one partition of table `topic` as of
    /// the partition's durable offset H ([`Snapshot::high_watermark`], known when this
    /// returns), streamed in chunks ([`Snapshot::next_chunk`]). Tail the partition from H to
    /// follow it. Fails like the other calls: NOT_FOUND for an unknown topic or partition,
    /// FAILED_PRECONDITION for a topic that is not a table.
    pub async fn snapshot(&self, topic: &str, partition: u32) -> Result<Snapshot> {
        Snapshot::start(self, topic, partition).await
    }

    /// A live, caught-up copy of table `topic` ([`SyncTable`]) with the default
    /// [`SyncTableConfig`].
    pub async fn sync_table(&self, topic: &str) -> Result<SyncTable> {
        SyncTable::open(self, topic).await
    }

    /// A [`SyncTable`] with an explicit config.
    pub async fn sync_table_with(&self, topic: &str, config: SyncTableConfig) -> Result<SyncTable> {
        SyncTable::open_with(self, topic, config).await
    }

    /// A consumer of `topic` that reads the partitions and from the offsets `config` says.
    pub async fn consumer(&self, topic: &str, config: ConsumerConfig) -> Result<Consumer> {
        Consumer::start(self.clone(), topic, config).await
    }

    /// Joins consumer group `group` subscribing to `topics` and starts reading the partitions
    /// the coordinator assigns (see [`GroupConsumer`]). Fails at once for a bad group name, an
    /// unknown topic or a bad config.
    pub async fn group_consumer(
        &self,
        group: &str,
        topics: &[&str],
        config: GroupConsumerConfig,
    ) -> Result<GroupConsumer> {
        GroupConsumer::start(self.clone(), group, topics, config).await
    }
}
