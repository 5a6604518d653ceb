//! Connections to the cluster per caller: one [`Client`] per bearer token (the gateway's own
//! credentials for requests without one), and per caller and table a [`Table`] handle (it
//! holds a producer). Both are bounded; the least recently used is dropped past the bound.
//!
//! Tokens are kept only as the key of their connection's configuration inside the client; the
//! maps are keyed by their SHA-256.

use std::collections::HashMap;
use std::time::Instant;

use parking_lot::Mutex;
use sha2::{Digest as _, Sha256};
use syncline_client::{Client, ClientConfig, Error, Producer, ProducerConfig, Table};

/// Connections kept at most (one per distinct token).
pub const CLIENTS_MAX: usize = 1024;
/// Table handles kept at most, and producers (for plain topics) likewise.
pub const TABLES_MAX: usize = 4096;

type TokenId = [u8; 32];
/// Handles by caller and topic, with when each was last used.
type ByTopic<T> = Mutex<HashMap<(Option<TokenId>, String), (T, Instant)>>;

/// The cluster as the gateway reaches it.
pub struct Clients {
    brokers: String,
    base: ClientConfig,
    own_token: Option<String>,
    clients: Mutex<HashMap<Option<TokenId>, (Client, Instant)>>,
    tables: ByTopic<Table>,
    producers: ByTopic<Producer>,
    /// Callers whose `read` of a table the brokers allowed lately (see
    /// [`Clients::read_checked`]).
    reads: ByTopic<()>,
}

/// How long an allowed `read` of a table is taken as still allowed, so that many subscribers
/// with one token (a page opened by thousands of browsers) cost the brokers one check, not
/// one each. A revoked permission takes effect on new subscriptions after this long.
pub const READ_CHECK_TTL: std::time::Duration = std::time::Duration::from_secs(5);

impl std::fmt::Debug for Clients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Clients")
            .field("brokers", &self.brokers)
            .field("own_token", &self.own_token.is_some())
            .finish()
    }
}

fn evict_oldest<K: Clone + Eq + std::hash::Hash, V>(
    map: &mut HashMap<K, (V, Instant)>,
    max: usize,
) {
    while map.len() >= max {
        let Some(oldest) = map
            .iter()
            .min_by_key(|(_, (_, used))| *used)
            .map(|(key, _)| key.clone())
        else {
            return;
        };
        map.remove(&oldest);
    }
}

impl Clients {
    /// Reaches `brokers` (a bootstrap list) with `base` (TLS), using `own_token` for requests
    /// without credentials.
    pub fn new(brokers: String, base: ClientConfig, own_token: Option<String>) -> Clients {
        Clients {
            brokers,
            base,
            own_token,
            clients: Mutex::new(HashMap::new()),
            tables: Mutex::new(HashMap::new()),
            producers: Mutex::new(HashMap::new()),
            reads: Mutex::new(HashMap::new()),
        }
    }

    /// Whether the brokers allowed `token` to read the table `topic` within
    /// [`READ_CHECK_TTL`].
    pub fn read_checked(&self, token: Option<&str>, topic: &str) -> bool {
        let key = (Self::id(token), topic.to_string());
        self.reads
            .lock()
            .get(&key)
            .is_some_and(|(_, at)| at.elapsed() < READ_CHECK_TTL)
    }

    /// Notes that the brokers allowed `token` to read the table `topic` just now.
    pub fn read_allowed(&self, token: Option<&str>, topic: &str) {
        let mut reads = self.reads.lock();
        reads.retain(|_, (_, at)| at.elapsed() < READ_CHECK_TTL);
        evict_oldest(&mut reads, TABLES_MAX);
        reads.insert((Self::id(token), topic.to_string()), ((), Instant::now()));
    }

    fn id(token: Option<&str>) -> Option<TokenId> {
        token.map(|t| Sha256::digest(t.as_bytes()).into())
    }

    /// The client of a caller presenting `token` (None: the gateway's own credentials).
    pub async fn client(&self, token: Option<&str>) -> Result<Client, Error> {
        let id = Self::id(token);
        if let Some((client, used)) = self.clients.lock().get_mut(&id) {
            *used = Instant::now();
            return Ok(client.clone());
        }
        // Connected without the lock: a slow broker holds up only this caller.
        let mut config = self.base.clone();
        if let Some(token) = token.or(self.own_token.as_deref()) {
            config = config.with_token(token)?;
        }
        let client = Client::connect_with(&self.brokers, config).await?;
        let mut clients = self.clients.lock();
        if let Some((existing, _)) = clients.get(&id) {
            return Ok(existing.clone());
        }
        evict_oldest(&mut clients, CLIENTS_MAX);
        clients.insert(id, (client.clone(), Instant::now()));
        Ok(client)
    }

    /// A handle on table `topic` for a caller presenting `token`.
    pub async fn table(&self, token: Option<&str>, topic: &str) -> Result<Table, Error> {
        let key = (Self::id(token), topic.to_string());
        if let Some((table, used)) = self.tables.lock().get_mut(&key) {
            *used = Instant::now();
            return Ok(table.clone());
        }
        let table = self.client(token).await?.table(topic).await?;
        let mut tables = self.tables.lock();
        evict_oldest(&mut tables, TABLES_MAX);
        tables.insert(key, (table.clone(), Instant::now()));
        Ok(table)
    }

    /// A producer of `topic` for a caller presenting `token`.
    pub async fn producer(&self, token: Option<&str>, topic: &str) -> Result<Producer, Error> {
        let key = (Self::id(token), topic.to_string());
        if let Some((producer, used)) = self.producers.lock().get_mut(&key) {
            *used = Instant::now();
            return Ok(producer.clone());
        }
        let producer = self
            .client(token)
            .await?
            .producer(topic, ProducerConfig::default())
            .await?;
        let mut producers = self.producers.lock();
        evict_oldest(&mut producers, TABLES_MAX);
        producers.insert(key, (producer.clone(), Instant::now()));
        Ok(producer)
    }

    /// Drops the handles on `topic` of `token`'s caller (the topic was deleted or changed).
    pub fn forget(&self, token: Option<&str>, topic: &str) {
        let key = (Self::id(token), topic.to_string());
        self.tables.lock().remove(&key);
        self.producers.lock().remove(&key);
    }
}
