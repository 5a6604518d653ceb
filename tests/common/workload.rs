//! Workloads for the replication fault tests (issue 15), each recording a history for the
//! checkers (`history.rs`, `linearizable.rs`) while faults (`faults.rs`) hit the cluster:
//!
//! - [`KeyedProduce`]: N idempotent producers (one client each, bootstrapped from every node),
//!   each writing its own keys `p{P}-k{K}` with values `p{P}-k{K}-{SEQ}` unique over the run,
//!   pipelined in one task so that each producer's records are enqueued in order. Every
//!   acknowledgement (partition, offset, key, value) is recorded in send order, every failed
//!   delivery as an error (its outcome is unknown: it may or may not be in the log, and no
//!   check counts it either way). Errors are typed ([`ProduceError`]), so that a test can tell
//!   an error the workload retried (starting a producer) from one that cost a record
//!   ([`ProduceHistory::beyond_retries`]).
//! - [`CasWorkload`]: a few clients doing `Get` and compare-and-set `put_if` (a `put` while a
//!   key is absent) on a few keys of a table; each operation is an [`Event`] with the time it
//!   was invoked and returned. A write that failed other than by a conflict, or timed out,
//!   has an unknown outcome ([`Outcome::Unknown`]): the checker lets it take effect or not. A
//!   failed `Get` constrains nothing and is left out. Each key takes at most
//!   [`CasConfig::ops_per_key`] operations (the checker's search is exponential in a key's
//!   concurrency), then a new key takes its place, so a long run checks many short histories.
//! - [`GroupWorkload`]: 2-3 members of one consumer group reading the keyed topic; each member
//!   (incarnation) records what it was handed in order and how often each partition was
//!   assigned to it ([`MemberDeliveries`]).
//! - [`Tail`]: a plain consumer of every partition from the start, recording what it was
//!   handed; when it fails it is started again from its own next offsets, as an application
//!   resuming would.
//!
//! And reading back: [`read_topic`] (every record below each partition's latest offset, through
//! the client, i.e. the leaders) and [`read_replica`] (one replica's partition log straight from
//! a stopped node's data directory, opened from a copy so the node's files stay untouched).
//!
//! Workloads run until `stop`, which returns their history; none of them panics on a broker
//! error (an error is part of the history).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use syncline_client::{
    Client, ConsumerConfig, ConsumerRecord, DeliveryFuture, Error, GroupConsumerConfig, GroupEvent,
    OffsetQuery, OffsetReset, ProducerConfig, StartOffset,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::faults::Rng;
use super::history::{MemberDeliveries, Seen, Violation};
use super::linearizable::{is_linearizable, Event, Op, Outcome};

/// Locks a history mutex (a panicked writer leaves what it wrote).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// A client bootstrapped from `addresses`, retried until it connects (a node may be down).
async fn connect(addresses: &str, stop: &watch::Receiver<bool>) -> Option<Client> {
    loop {
        match Client::connect(addresses).await {
            Ok(client) => return Some(client),
            Err(_) if *stop.borrow() => return None,
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

fn record_seen(record: &ConsumerRecord) -> Seen {
    Seen {
        partition: record.partition,
        offset: record.offset,
        key: record.key.as_ref().map(|k| k.to_vec()),
        value: record
            .value
            .as_ref()
            .map(|v| v.to_vec())
            .unwrap_or_default(),
    }
}

/// Settings of [`KeyedProduce`].
#[derive(Debug, Clone)]
pub struct ProduceConfig {
    /// Producers, each with its own client and keys.
    pub producers: usize,
    /// Keys per producer.
    pub keys_per_producer: usize,
    /// Pause between two records of one producer.
    pub pace: Duration,
    /// The producers' delivery timeout.
    pub delivery_timeout: Duration,
}

impl Default for ProduceConfig {
    fn default() -> Self {
        ProduceConfig {
            producers: 3,
            keys_per_producer: 8,
            pace: Duration::from_millis(20),
            delivery_timeout: Duration::from_secs(30),
        }
    }
}

/// A failure a [`KeyedProduce`] producer reported. Transient failures of a batch (a node
/// stopping or unreachable, a leader change) are retried inside the client until the
/// producer's delivery timeout and appear here only if that runs out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProduceError {
    /// A record's delivery failed: the client's retries ran out (the delivery timeout) or the
    /// broker refused the batch for good. Its outcome is unknown. `"VALUE (partition P):
    /// ERROR"`.
    Delivery(String),
    /// The producer refused to enqueue a record, which was never sent; the workload went on
    /// with a new producer. `"VALUE: enqueue refused: ERROR"`.
    Enqueue(String),
    /// Starting a producer failed; the workload tried again until one started.
    /// `"pP: starting a producer: ERROR"`.
    Start(String),
}

impl ProduceError {
    /// Whether the workload retried what failed until it worked, so that no record was lost
    /// to it.
    pub fn retried(&self) -> bool {
        matches!(self, ProduceError::Start(_))
    }
}

impl std::fmt::Display for ProduceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProduceError::Delivery(text)
            | ProduceError::Enqueue(text)
            | ProduceError::Start(text) => f.write_str(text),
        }
    }
}

/// What [`KeyedProduce`] recorded.
#[derive(Debug, Clone, Default)]
pub struct ProduceHistory {
    /// Every acknowledgement, each producer's in the order it sent them, producer after
    /// producer (the input [`super::history::check_acknowledged`] takes).
    pub acknowledged: Vec<Seen>,
    /// Records enqueued.
    pub sent: u64,
    /// Every failure (a delivery that failed, an enqueue refused, a producer that did not
    /// start).
    pub errors: Vec<ProduceError>,
}

impl ProduceHistory {
    /// The errors beyond retries: each cost a record (a delivery that failed after the
    /// client's retries, an enqueue refused). Empty when every failure was retried until it
    /// worked.
    pub fn beyond_retries(&self) -> Vec<&ProduceError> {
        self.errors.iter().filter(|e| !e.retried()).collect()
    }

    /// [`ProduceHistory::errors`] as text.
    pub fn error_texts(&self) -> Vec<String> {
        self.errors.iter().map(ToString::to_string).collect()
    }
}

/// Keyed produce with idempotent producers: see the module doc.
pub struct KeyedProduce {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<ProduceHistory>>,
    /// Acknowledgements so far per partition (for progress checks).
    acked: Arc<Mutex<BTreeMap<u32, u64>>>,
}

impl KeyedProduce {
    /// Starts `config.producers` producers writing to `topic` through `addresses`.
    pub fn start(addresses: &str, topic: &str, config: ProduceConfig) -> KeyedProduce {
        let (stop, stopped) = watch::channel(false);
        let acked: Arc<Mutex<BTreeMap<u32, u64>>> = Arc::default();
        let tasks = (0..config.producers)
            .map(|index| {
                tokio::spawn(produce(
                    index,
                    addresses.to_string(),
                    topic.to_string(),
                    config.clone(),
                    stopped.clone(),
                    acked.clone(),
                ))
            })
            .collect();
        KeyedProduce { stop, tasks, acked }
    }

    /// Acknowledgements so far, per partition.
    pub fn acknowledged_by_partition(&self) -> BTreeMap<u32, u64> {
        lock(&self.acked).clone()
    }

    /// Waits until every partition in `partitions` has had a record acknowledged after this
    /// call: the workload makes progress everywhere. `Err` names the partitions that did not,
    /// after `timeout`.
    pub async fn wait_progress(&self, partitions: u32, timeout: Duration) -> Result<(), String> {
        let before = self.acknowledged_by_partition();
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.acknowledged_by_partition();
            let stuck: Vec<u32> = (0..partitions)
                .filter(|p| now.get(p).copied().unwrap_or(0) <= before.get(p).copied().unwrap_or(0))
                .collect();
            if stuck.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "no acknowledgement on partitions {stuck:?} within {timeout:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops sending, waits for every record in flight to be acknowledged or to fail, and
    /// returns the history.
    pub async fn stop(self) -> ProduceHistory {
        let _ = self.stop.send(true);
        let mut all = ProduceHistory::default();
        for task in self.tasks {
            let history = task.await.expect("a producer task panicked");
            all.acknowledged.extend(history.acknowledged);
            all.sent += history.sent;
            all.errors.extend(history.errors);
        }
        all
    }
}

/// One producer: see [`KeyedProduce`].
async fn produce(
    index: usize,
    addresses: String,
    topic: String,
    config: ProduceConfig,
    stop: watch::Receiver<bool>,
    acked: Arc<Mutex<BTreeMap<u32, u64>>>,
) -> ProduceHistory {
    let errors: Arc<Mutex<Vec<ProduceError>>> = Arc::default();
    let mut sent = 0;
    let producer_config = ProducerConfig {
        delivery_timeout: config.delivery_timeout,
        ..ProducerConfig::default()
    };
    // Deliveries are awaited in send order by one recorder, so that the acknowledgements are
    // recorded in the order the records were sent.
    let (pending, mut deliveries) =
        tokio::sync::mpsc::unbounded_channel::<(Vec<u8>, Vec<u8>, DeliveryFuture)>();
    let recorder = {
        let errors = errors.clone();
        tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            while let Some((key, value, delivery)) = deliveries.recv().await {
                let partition = delivery.partition();
                match delivery.await {
                    Ok(delivered) => {
                        *lock(&acked).entry(delivered.partition).or_default() += 1;
                        acknowledged.push(Seen {
                            partition: delivered.partition,
                            offset: delivered.offset,
                            key: Some(key),
                            value,
                        });
                    }
                    Err(error) => lock(&errors).push(ProduceError::Delivery(format!(
                        "{} (partition {partition}): {error}",
                        String::from_utf8_lossy(&value)
                    ))),
                }
            }
            acknowledged
        })
    };
    // Producers replaced after a refused enqueue stay alive until the end, so that their
    // records in flight still resolve.
    let mut producers = Vec::new();
    let mut seq: u64 = 0;
    'producing: while !*stop.borrow() {
        let Some(client) = connect(&addresses, &stop).await else {
            break;
        };
        let producer = match client.producer(&topic, producer_config.clone()).await {
            Ok(producer) => producer,
            Err(error) => {
                lock(&errors).push(ProduceError::Start(format!(
                    "p{index}: starting a producer: {error}"
                )));
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        while !*stop.borrow() {
            let key = format!("p{index}-k{}", seq % config.keys_per_producer as u64);
            let value = format!("{key}-{seq}");
            seq += 1;
            match producer
                .enqueue(Some(key.as_bytes()), Some(value.as_bytes()), &[])
                .await
            {
                Ok(delivery) => {
                    sent += 1;
                    if pending
                        .send((key.into_bytes(), value.into_bytes(), delivery))
                        .is_err()
                    {
                        break 'producing;
                    }
                }
                Err(error) => {
                    lock(&errors).push(ProduceError::Enqueue(format!(
                        "{value}: enqueue refused: {error}"
                    )));
                    producers.push(producer);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue 'producing;
                }
            }
            tokio::time::sleep(config.pace).await;
        }
        producers.push(producer);
    }
    drop(pending);
    let acknowledged = recorder.await.expect("the recorder panicked");
    for producer in producers {
        producer.close().await;
    }
    let errors = lock(&errors).clone();
    ProduceHistory {
        acknowledged,
        sent,
        errors,
    }
}

/// Settings of [`CasWorkload`].
#[derive(Debug, Clone)]
pub struct CasConfig {
    /// Clients, each with its own connection.
    pub clients: usize,
    /// Keys in use at once.
    pub keys: usize,
    /// Operations per key before a new key replaces it (at most 128: the checker's limit).
    pub ops_per_key: usize,
    /// Pause between two operations of one client: a random time in these bounds.
    pub pace: (Duration, Duration),
    /// An operation still pending after this has an unknown outcome.
    pub op_timeout: Duration,
    /// Every node's gRPC URL: when a `Get` answers "absent" for a key this client saw
    /// written, each node is asked the same `Get` at once and the answers are noted
    /// ([`CasHistory::anomalies`]), to show which node answers what. Empty: no probing.
    pub probe: Vec<String>,
}

impl Default for CasConfig {
    fn default() -> Self {
        CasConfig {
            clients: 4,
            keys: 3,
            ops_per_key: 40,
            pace: (Duration::from_millis(20), Duration::from_millis(80)),
            op_timeout: Duration::from_secs(20),
            probe: Vec::new(),
        }
    }
}

/// The keys in use and how many operations each has had.
struct KeyPool {
    live: Vec<(String, usize)>,
    next: usize,
    cap: usize,
}

impl KeyPool {
    /// A key for one more operation; a key that reaches the cap is replaced by a new one.
    fn take(&mut self, rng: &mut Rng) -> String {
        let i = rng.below(self.live.len() as u64) as usize;
        let (name, count) = &mut self.live[i];
        *count += 1;
        let taken = name.clone();
        if *count >= self.cap {
            self.live[i] = (format!("cas-{}", self.next), 0);
            self.next += 1;
        }
        taken
    }
}

/// What [`CasWorkload`] recorded: each key's operations.
#[derive(Debug, Clone, Default)]
pub struct CasHistory {
    /// Key -> its operations, in the order they returned.
    pub keys: BTreeMap<String, Vec<Event>>,
    /// What each node answered right after a `Get` said "absent" for a key its client had
    /// seen written (see [`CasConfig::probe`]).
    pub anomalies: Vec<String>,
}

impl CasHistory {
    /// A [`Violation::NotLinearizable`] per key whose history has no linearization from an
    /// absent key.
    pub fn violations(&self) -> Vec<Violation> {
        self.keys
            .iter()
            .filter(|(_, events)| !is_linearizable(None, events))
            .map(|(key, events)| Violation::NotLinearizable {
                key: key.clone(),
                history: events
                    .iter()
                    .map(|e| format!("{e:?}"))
                    .collect::<Vec<_>>()
                    .join("\n"),
            })
            .collect()
    }

    /// Every acknowledged write as the record it stored: the key's partition (of a table of
    /// `partitions`), the version as its offset, the value.
    pub fn acknowledged_writes(&self, partitions: u32) -> Vec<Seen> {
        let mut writes = Vec::new();
        for (key, events) in &self.keys {
            for event in events {
                if let (Op::Put(value) | Op::PutIf { value, .. }, Outcome::Written(version)) =
                    (&event.op, &event.outcome)
                {
                    writes.push(Seen {
                        partition: syncline_proto::partitioner::partition_for_key(
                            key.as_bytes(),
                            partitions,
                        ),
                        offset: *version,
                        key: Some(key.as_bytes().to_vec()),
                        value: value.clone(),
                    });
                }
            }
        }
        writes
    }

    /// Operations, writes acknowledged, conflicts, unknown outcomes, keys: for the report.
    pub fn summary(&self) -> String {
        let events: Vec<&Event> = self.keys.values().flatten().collect();
        let count = |f: &dyn Fn(&Event) -> bool| events.iter().filter(|e| f(e)).count();
        format!(
            "{} operations on {} keys: {} writes acknowledged, {} conflicts, {} reads, {} unknown",
            events.len(),
            self.keys.len(),
            count(&|e| matches!(e.outcome, Outcome::Written(_))),
            count(&|e| matches!(e.outcome, Outcome::Conflict(_))),
            count(&|e| matches!(e.outcome, Outcome::Read(_))),
            count(&|e| e.outcome == Outcome::Unknown),
        )
    }
}

/// The CAS register workload: see the module doc.
pub struct CasWorkload {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    history: Arc<Mutex<BTreeMap<String, Vec<Event>>>>,
    anomalies: Arc<Mutex<Vec<String>>>,
}

impl CasWorkload {
    /// Starts the clients on table `topic` through `addresses`; `rng` seeds them.
    pub fn start(addresses: &str, topic: &str, config: CasConfig, rng: &mut Rng) -> CasWorkload {
        assert!(
            config.ops_per_key <= 128,
            "the checker takes 128 operations per key"
        );
        let (stop, stopped) = watch::channel(false);
        let history: Arc<Mutex<BTreeMap<String, Vec<Event>>>> = Arc::default();
        let pool = Arc::new(Mutex::new(KeyPool {
            live: (0..config.keys).map(|i| (format!("cas-{i}"), 0)).collect(),
            next: config.keys,
            cap: config.ops_per_key,
        }));
        let start = Instant::now();
        let anomalies: Arc<Mutex<Vec<String>>> = Arc::default();
        let tasks = (0..config.clients)
            .map(|index| {
                tokio::spawn(cas_client(CasClient {
                    index,
                    addresses: addresses.to_string(),
                    topic: topic.to_string(),
                    config: config.clone(),
                    rng: rng.fork(),
                    pool: pool.clone(),
                    history: history.clone(),
                    anomalies: anomalies.clone(),
                    start,
                    stop: stopped.clone(),
                }))
            })
            .collect();
        CasWorkload {
            stop,
            tasks,
            history,
            anomalies,
        }
    }

    /// Operations recorded so far.
    pub fn operations(&self) -> usize {
        lock(&self.history).values().map(Vec::len).sum()
    }

    /// Stops the clients (each finishes its operation) and returns the history.
    pub async fn stop(self) -> CasHistory {
        let _ = self.stop.send(true);
        for task in self.tasks {
            task.await.expect("a CAS client panicked");
        }
        CasHistory {
            keys: lock(&self.history).clone(),
            anomalies: lock(&self.anomalies).clone(),
        }
    }
}

struct CasClient {
    index: usize,
    addresses: String,
    topic: String,
    config: CasConfig,
    rng: Rng,
    pool: Arc<Mutex<KeyPool>>,
    history: Arc<Mutex<BTreeMap<String, Vec<Event>>>>,
    anomalies: Arc<Mutex<Vec<String>>>,
    start: Instant,
    stop: watch::Receiver<bool>,
}

/// One CAS client: reads a key whose version it does not know, compare-and-sets one it
/// does (a plain put while absent), now and then reads anyway.
async fn cas_client(mut c: CasClient) {
    let Some(client) = connect(&c.addresses, &c.stop).await else {
        return;
    };
    let config = ProducerConfig {
        delivery_timeout: c.config.op_timeout,
        ..ProducerConfig::default()
    };
    let table = loop {
        match client.table_with(&c.topic, config.clone()).await {
            Ok(table) => break table,
            Err(_) if *c.stop.borrow() => return,
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    // Key -> the version this client last knew (`Some(None)`: absent; missing: unknown).
    let mut known: HashMap<String, Option<u64>> = HashMap::new();
    while !*c.stop.borrow() {
        let key = lock(&c.pool).take(&mut c.rng);
        let value = format!("c{}-{}", c.index, c.rng.next_u64()).into_bytes();
        let read_anyway = c.rng.below(10) < 3;
        let now = |start: Instant| start.elapsed().as_nanos() as u64;
        let invoked = now(c.start);
        let timeout = c.config.op_timeout;
        enum Kind {
            Get,
            Put,
            PutIf(u64),
        }
        let kind = match known.get(&key).copied() {
            None => Kind::Get,
            Some(_) if read_anyway => Kind::Get,
            Some(None) => Kind::Put,
            Some(Some(version)) => Kind::PutIf(version),
        };
        let (op, outcome) = match kind {
            Kind::Get => {
                let outcome = match tokio::time::timeout(timeout, table.get(&key)).await {
                    Ok(Ok(None)) if matches!(known.get(&key), Some(Some(_))) => {
                        let seen = known.get(&key).copied().flatten().unwrap_or_default();
                        let answers = probe_get(&c.config.probe, &c.topic, &key).await;
                        lock(&c.anomalies).push(format!(
                            "[{:.3}s] client {}: Get {key} answered absent after it saw version {seen}; each node now: {answers}",
                            invoked as f64 / 1e9,
                            c.index
                        ));
                        known.insert(key.clone(), None);
                        Outcome::Read(None)
                    }
                    Ok(Ok(entry)) => {
                        let state = entry.map(|e| (e.version, e.value.to_vec()));
                        known.insert(key.clone(), state.as_ref().map(|(v, _)| *v));
                        Outcome::Read(state)
                    }
                    _ => Outcome::Unknown,
                };
                (Op::Get, outcome)
            }
            Kind::Put => {
                let outcome = match tokio::time::timeout(timeout, table.put(&key, &value)).await {
                    Ok(Ok(written)) => {
                        known.insert(key.clone(), Some(written.version));
                        Outcome::Written(written.version)
                    }
                    _ => {
                        known.remove(&key);
                        Outcome::Unknown
                    }
                };
                (Op::Put(value), outcome)
            }
            Kind::PutIf(expected) => {
                let put = table.put_if(&key, &value, expected);
                let outcome = match tokio::time::timeout(timeout, put).await {
                    Ok(Ok(written)) => {
                        known.insert(key.clone(), Some(written.version));
                        Outcome::Written(written.version)
                    }
                    Ok(Err(Error::Conflict { current, .. })) => {
                        known.insert(key.clone(), current);
                        Outcome::Conflict(current)
                    }
                    _ => {
                        known.remove(&key);
                        Outcome::Unknown
                    }
                };
                (Op::PutIf { expected, value }, outcome)
            }
        };
        let returned = now(c.start);
        let failed = outcome == Outcome::Unknown;
        // A read that failed constrains nothing: left out.
        if !(op == Op::Get && failed) {
            lock(&c.history).entry(key).or_default().push(Event {
                invoked,
                returned,
                op,
                outcome,
            });
        }
        let pause = c.rng.between(c.config.pace.0, c.config.pace.1);
        tokio::time::sleep(if failed { pause * 4 } else { pause }).await;
    }
}

/// `Get` of `key` sent to each of `urls` directly: "node i: version V" or the error's code and
/// message, `; `-separated.
async fn probe_get(urls: &[String], topic: &str, key: &str) -> String {
    use syncline_proto::v1;
    let mut answers = Vec::new();
    for (i, url) in urls.iter().enumerate() {
        let answer = match v1::broker_client::BrokerClient::connect(url.clone()).await {
            Ok(mut grpc) => match grpc
                .get(v1::GetRequest {
                    topic: topic.to_string(),
                    key: key.as_bytes().to_vec().into(),
                })
                .await
            {
                Ok(response) => format!("version {}", response.get_ref().version),
                Err(status) => format!("{:?} {:?}", status.code(), status.message()),
            },
            Err(error) => format!("unreachable: {error}"),
        };
        answers.push(format!("node {}: {answer}", i + 1));
    }
    answers.join("; ")
}

/// Settings of [`GroupWorkload`].
#[derive(Debug, Clone)]
pub struct GroupConfig {
    /// Members.
    pub members: usize,
    /// Their consumer config.
    pub consumer: GroupConsumerConfig,
}

impl Default for GroupConfig {
    fn default() -> Self {
        GroupConfig {
            members: 3,
            consumer: GroupConsumerConfig {
                auto_commit_interval: Some(Duration::from_secs(1)),
                ..GroupConsumerConfig::default()
            },
        }
    }
}

/// What [`GroupWorkload`] recorded.
#[derive(Debug, Clone, Default)]
pub struct GroupHistory {
    /// Every member incarnation's deliveries.
    pub members: Vec<MemberDeliveries>,
    /// Errors the members reported, described.
    pub errors: Vec<String>,
}

/// A consumer group under faults: see the module doc.
pub struct GroupWorkload {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<Vec<MemberDeliveries>>>,
    handed: Arc<Mutex<BTreeSet<(u32, u64)>>>,
    errors: Arc<Mutex<Vec<String>>>,
}

impl GroupWorkload {
    /// Starts `config.members` members of `group` reading `topic` through `addresses`.
    pub fn start(addresses: &str, group: &str, topic: &str, config: GroupConfig) -> GroupWorkload {
        let (stop, stopped) = watch::channel(false);
        let handed: Arc<Mutex<BTreeSet<(u32, u64)>>> = Arc::default();
        let errors: Arc<Mutex<Vec<String>>> = Arc::default();
        let tasks = (0..config.members)
            .map(|index| {
                tokio::spawn(group_member(GroupMember {
                    index,
                    addresses: addresses.to_string(),
                    group: group.to_string(),
                    topic: topic.to_string(),
                    config: config.consumer.clone(),
                    stop: stopped.clone(),
                    handed: handed.clone(),
                    errors: errors.clone(),
                }))
            })
            .collect();
        GroupWorkload {
            stop,
            tasks,
            handed,
            errors,
        }
    }

    /// Waits until the members together were handed every record of `wanted`; `Err` with how
    /// many they were not, after `timeout`.
    pub async fn wait_for(&self, wanted: &[Seen], timeout: Duration) -> Result<(), String> {
        wait_covered(&self.handed, wanted, timeout).await
    }

    /// Stops the members (as a crash: no commit, no leave) and returns the history.
    pub async fn stop(self) -> GroupHistory {
        let _ = self.stop.send(true);
        let mut members = Vec::new();
        for task in self.tasks {
            members.extend(task.await.expect("a group member panicked"));
        }
        let errors = lock(&self.errors).clone();
        GroupHistory { members, errors }
    }
}

/// Waits until `handed` holds every (partition, offset) of `wanted`.
async fn wait_covered(
    handed: &Mutex<BTreeSet<(u32, u64)>>,
    wanted: &[Seen],
    timeout: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let missing = {
            let handed = lock(handed);
            wanted
                .iter()
                .filter(|w| !handed.contains(&(w.partition, w.offset)))
                .count()
        };
        if missing == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{missing} of {} records not handed out within {timeout:?}",
                wanted.len()
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

struct GroupMember {
    index: usize,
    addresses: String,
    group: String,
    topic: String,
    config: GroupConsumerConfig,
    stop: watch::Receiver<bool>,
    handed: Arc<Mutex<BTreeSet<(u32, u64)>>>,
    errors: Arc<Mutex<Vec<String>>>,
}

/// One member slot: joins, records what it is handed and its assignments; joins again as a
/// new incarnation if its consumer ends.
async fn group_member(mut m: GroupMember) -> Vec<MemberDeliveries> {
    let mut incarnations = Vec::new();
    while !*m.stop.borrow() {
        let Some(client) = connect(&m.addresses, &m.stop).await else {
            break;
        };
        let mut consumer = match client
            .group_consumer(&m.group, &[m.topic.as_str()], m.config.clone())
            .await
        {
            Ok(consumer) => consumer,
            Err(error) => {
                lock(&m.errors).push(format!("member {}: joining: {error}", m.index));
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let assignments: Arc<Mutex<BTreeMap<u32, usize>>> = Arc::default();
        let mut events = consumer.events();
        let counter = {
            let assignments = assignments.clone();
            let errors = m.errors.clone();
            let (index, topic) = (m.index, m.topic.clone());
            tokio::spawn(async move {
                while let Some(event) = events.recv().await {
                    match event {
                        Ok(GroupEvent::Assigned(partitions)) => {
                            for p in partitions.iter().filter(|p| p.topic == topic) {
                                *lock(&assignments).entry(p.partition).or_default() += 1;
                            }
                        }
                        Ok(_) => {}
                        Err(error) => lock(&errors).push(format!("member {index}: {error}")),
                    }
                }
            })
        };
        let mut delivered = Vec::new();
        loop {
            tokio::select! {
                _ = m.stop.changed() => break,
                next = consumer.recv() => match next {
                    Some(Ok(record)) => {
                        lock(&m.handed).insert((record.partition, record.offset));
                        delivered.push(record_seen(&record));
                    }
                    Some(Err(error)) => {
                        lock(&m.errors).push(format!("member {}: {error}", m.index));
                    }
                    None => {
                        lock(&m.errors).push(format!("member {}: the consumer ended", m.index));
                        break;
                    }
                },
            }
        }
        consumer.abort();
        // The events stream ends with the consumer's task; its counts are then final.
        let _ = tokio::time::timeout(Duration::from_secs(5), counter).await;
        let assignments = lock(&assignments).clone();
        incarnations.push(MemberDeliveries {
            delivered,
            assignments,
        });
    }
    incarnations
}

/// What [`Tail`] recorded.
#[derive(Debug, Clone, Default)]
pub struct TailHistory {
    /// (partition, offset) in the order the consumer was handed them (for
    /// [`super::history::check_deliveries`]).
    pub handed: Vec<(u32, u64)>,
    /// The records handed, same order.
    pub records: Vec<Seen>,
    /// Errors it reported (after each it resumed from its next offsets), described.
    pub errors: Vec<String>,
}

/// A plain consumer of every partition of a topic: see the module doc.
pub struct Tail {
    stop: watch::Sender<bool>,
    task: JoinHandle<TailHistory>,
    handed: Arc<Mutex<BTreeSet<(u32, u64)>>>,
}

/// How long the tail's consumer retries transient errors before it reports one: longer than
/// any fault holds.
const TAIL_RETRY: Duration = Duration::from_secs(120);

impl Tail {
    /// Starts reading `topic` from the start of every partition through `addresses`.
    pub fn start(addresses: &str, topic: &str) -> Tail {
        let (stop, stopped) = watch::channel(false);
        let handed: Arc<Mutex<BTreeSet<(u32, u64)>>> = Arc::default();
        let task = tokio::spawn(tail(
            addresses.to_string(),
            topic.to_string(),
            stopped,
            handed.clone(),
        ));
        Tail { stop, task, handed }
    }

    /// Waits until the consumer was handed every record of `wanted`.
    pub async fn wait_for(&self, wanted: &[Seen], timeout: Duration) -> Result<(), String> {
        wait_covered(&self.handed, wanted, timeout).await
    }

    /// Stops and returns the history.
    pub async fn stop(self) -> TailHistory {
        let _ = self.stop.send(true);
        self.task.await.expect("the tail panicked")
    }
}

async fn tail(
    addresses: String,
    topic: String,
    mut stop: watch::Receiver<bool>,
    handed: Arc<Mutex<BTreeSet<(u32, u64)>>>,
) -> TailHistory {
    let mut history = TailHistory::default();
    let mut next: BTreeMap<u32, u64> = BTreeMap::new();
    'consuming: while !*stop.borrow() {
        let Some(client) = connect(&addresses, &stop).await else {
            break;
        };
        let config = ConsumerConfig {
            start: StartOffset::Earliest,
            partition_starts: next
                .iter()
                .map(|(&p, &o)| (p, StartOffset::Offset(o)))
                .collect(),
            offset_reset: OffsetReset::Error,
            retry_timeout: TAIL_RETRY,
            ..ConsumerConfig::default()
        };
        let mut consumer = match client.consumer(&topic, config).await {
            Ok(consumer) => consumer,
            Err(error) => {
                history
                    .errors
                    .push(format!("starting the consumer: {error}"));
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        loop {
            tokio::select! {
                _ = stop.changed() => break 'consuming,
                record = consumer.recv() => match record {
                    Some(Ok(record)) => {
                        next.insert(record.partition, record.offset + 1);
                        lock(&handed).insert((record.partition, record.offset));
                        history.handed.push((record.partition, record.offset));
                        history.records.push(record_seen(&record));
                    }
                    Some(Err(error)) => {
                        history.errors.push(format!("{error}"));
                        continue 'consuming;
                    }
                    None => {
                        history.errors.push("the consumer ended".into());
                        continue 'consuming;
                    }
                },
            }
        }
    }
    history
}

/// Every record of `topic`'s `partitions` below each one's latest offset (looked up first),
/// through `client`: what the leaders serve. Retries transient errors until `timeout`.
pub async fn read_topic(
    client: &Client,
    topic: &str,
    partitions: u32,
    timeout: Duration,
) -> Result<Vec<Seen>, String> {
    let deadline = Instant::now() + timeout;
    let mut ends = BTreeMap::new();
    for partition in 0..partitions {
        loop {
            match client
                .list_offsets(topic, partition, OffsetQuery::Latest)
                .await
            {
                Ok(listed) => {
                    ends.insert(partition, listed.offset);
                    break;
                }
                Err(error) if Instant::now() > deadline => {
                    return Err(format!("latest offset of {topic}/{partition}: {error}"))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
    let wanted: Vec<u32> = ends
        .iter()
        .filter(|(_, &end)| end > 0)
        .map(|(&p, _)| p)
        .collect();
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    let mut consumer = client
        .consumer(
            topic,
            ConsumerConfig {
                partitions: Some(wanted.clone()),
                start: StartOffset::Earliest,
                retry_timeout: timeout,
                ..ConsumerConfig::default()
            },
        )
        .await
        .map_err(|e| format!("reading {topic}: {e}"))?;
    let mut records = Vec::new();
    let mut open: BTreeSet<u32> = wanted.into_iter().collect();
    while !open.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, consumer.recv()).await {
            Ok(Some(Ok(record))) => {
                if record.offset + 1 >= ends[&record.partition] {
                    open.remove(&record.partition);
                }
                if record.offset < ends[&record.partition] {
                    records.push(record_seen(&record));
                }
            }
            Ok(Some(Err(error))) => return Err(format!("reading {topic}: {error}")),
            Ok(None) => return Err(format!("reading {topic}: the consumer ended")),
            Err(_) => {
                return Err(format!(
                    "reading {topic}: partitions {open:?} not read to their ends {ends:?} within {timeout:?}"
                ))
            }
        }
    }
    Ok(records)
}

/// Every record of one replica's partition log, `data_dir/TOPIC/PARTITION`, of a stopped node:
/// the directory's files are copied (the Raft log under `raft/` left out) and the copy opened,
/// so that the open's recovery never touches the node's own files. Records of control batches
/// are left out.
pub fn read_replica(data_dir: &Path, topic: &str, partition: u32) -> Result<Vec<Seen>, String> {
    use syncline_broker::log::Log;
    use syncline_proto::batch::Batch;

    let dir = data_dir.join(topic).join(partition.to_string());
    let copy = tempfile::tempdir().map_err(|e| format!("a temporary directory: {e}"))?;
    let entries = std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("{}: {e}", dir.display()))?;
        let is_file = entry.file_type().map(|t| t.is_file()).unwrap_or(false);
        if is_file && entry.file_name() != ".lock" {
            std::fs::copy(entry.path(), copy.path().join(entry.file_name()))
                .map_err(|e| format!("copying {}: {e}", entry.path().display()))?;
        }
    }
    let log = Log::open(copy.path(), Default::default())
        .map_err(|e| format!("opening a copy of {}: {e}", dir.display()))?;
    let mut records = Vec::new();
    let end = log.end_offset();
    let mut offset = log.start_offset();
    while offset < end {
        let read = log
            .read_up_to(offset, 1024 * 1024, end)
            .map_err(|e| format!("{} at {offset}: {e}", dir.display()))?;
        if read.next_offset <= offset {
            break;
        }
        let mut bytes = read.bytes.clone();
        while !bytes.is_empty() {
            let header = syncline_proto::batch::BatchHeader::parse(&bytes)
                .map_err(|e| format!("{} near {offset}: {e}", dir.display()))?;
            let length = (header.length as usize).min(bytes.len());
            let batch = Batch::parse(bytes.split_to(length))
                .map_err(|e| format!("{} near {offset}: {e}", dir.display()))?;
            if batch.header().is_control() {
                continue;
            }
            for record in batch.records() {
                let record = record.map_err(|e| format!("{}: {e}", dir.display()))?;
                if record.offset >= offset {
                    records.push(Seen {
                        partition,
                        offset: record.offset,
                        key: record.key.map(|k| k.to_vec()),
                        value: record.value.map(|v| v.to_vec()).unwrap_or_default(),
                    });
                }
            }
        }
        offset = read.next_offset;
    }
    Ok(records)
}
