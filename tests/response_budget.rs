//! Pins the broker-wide response-bytes budget (`--response-bytes-max`): subscribers that never
//! read hold at most their share of it, so the broker's memory stays bounded by the budget instead
//! of growing with every stalled stream, other clients are still served meanwhile, and a stalled
//! stream resumes losing nothing once it reads; streams whose readers stall while others wait for
//! budget lose their connection after `--stalled-stream-timeout-ms`, so the others move on.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::probe::{anonymous_memory_bytes, metric_value, metrics_text};
use common::BrokerProcess;
use syncline_proto::batch::BatchBuilder;
use syncline_proto::v1;
use syncline_proto::v1::broker_client::BrokerClient;
use tonic::transport::Channel;

const MIB: u64 = 1024 * 1024;
/// The budget under test: small, so that the stalled streams below would exceed it many times.
const BUDGET_BYTES: u64 = 32 * MIB;
/// Stalled subscribers. Without the budget each buffers the whole topic encoded (about twice its
/// 8 MiB with decoded records): about 1 GiB in all, far above the bound checked.
const STALLED_STREAMS: usize = 64;
/// Connections the stalled streams share (several streams per connection, like a real client).
const CONNECTIONS: usize = 8;
/// The topic: 8 batches of 1 MiB (1,024 records of 1 KiB).
const BATCHES: usize = 8;
const RECORDS_PER_BATCH: usize = 1024;
const VALUE_BYTES: usize = 1024;
/// What each stalled stream asks for: the broker's largest fetch, with decoded records (the
/// shape of the reported finding).
const STREAM_MAX_BYTES: u32 = 16 * MIB as u32;

async fn connect(broker: &BrokerProcess) -> BrokerClient<Channel> {
    broker.client().await
}

/// A broker with a response budget of `budget_bytes`, and its topic `big` (1 partition) holding
/// `batches` batches of `records` records of `VALUE_BYTES`.
async fn start_with_topic(
    dir: &std::path::Path,
    budget_bytes: u64,
    batches: usize,
    records: usize,
) -> (BrokerProcess, BrokerClient<Channel>) {
    start_with_topic_and(dir, budget_bytes, batches, records, &[]).await
}

/// [`start_with_topic`] with more broker flags.
async fn start_with_topic_and(
    dir: &std::path::Path,
    budget_bytes: u64,
    batches: usize,
    records: usize,
    extra: &[&str],
) -> (BrokerProcess, BrokerClient<Channel>) {
    let budget = budget_bytes.to_string();
    let mut args = vec!["--response-bytes-max", &budget];
    args.extend_from_slice(extra);
    let broker = BrokerProcess::start_with(dir, &args);
    let mut client = connect(&broker).await;
    client
        .create_topic(v1::CreateTopicRequest {
            name: "big".into(),
            config: Some(v1::TopicConfig {
                partitions: Some(1),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let mut builder = BatchBuilder::new();
    let value = vec![7u8; VALUE_BYTES];
    for _ in 0..records {
        builder.push(1, None, Some(&value), &[]);
    }
    let batch: Bytes = builder.finish().unwrap();
    for _ in 0..batches {
        client
            .produce(v1::ProduceRequest {
                topic: "big".into(),
                batch: batch.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    (broker, client)
}

async fn stalled_subscribe(
    client: &mut BrokerClient<Channel>,
) -> tonic::Streaming<v1::FetchResponse> {
    client
        .subscribe(v1::SubscribeRequest {
            topic: "big".into(),
            max_bytes: Some(STREAM_MAX_BYTES),
            decode_records: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

/// `syncline_response_bytes_in_flight` of the broker serving metrics at `metrics`.
fn bytes_in_flight(metrics: &str) -> f64 {
    metric_value(&metrics_text(metrics), "syncline_response_bytes_in_flight").unwrap_or(0.0)
}

/// Waits (up to 15 s) until `holders` hold at least `bytes` of the budget.
async fn wait_for_budget_taken(metrics: &str, bytes: u64, holders: &str) {
    let started = Instant::now();
    while bytes_in_flight(metrics) < bytes as f64 {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{holders} hold no budget: {} bytes in flight",
            bytes_in_flight(metrics)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads the first `count` records from `stream`, checking their order; each message must come
/// within `wait` (`moves` says what is expected).
async fn read_in_order(
    stream: &mut tonic::Streaming<v1::FetchResponse>,
    count: u64,
    wait: Duration,
    moves: &str,
) {
    let mut next = 0;
    while next < count {
        let message = tokio::time::timeout(wait, stream.message())
            .await
            .expect(moves)
            .unwrap()
            .expect("stream open");
        for record in &message.records {
            assert_eq!(record.offset, next, "records in order, none lost");
            next += 1;
        }
    }
}

/// The largest anonymous memory of `pid` seen over `period`.
async fn peak_anonymous_memory(pid: u32, period: Duration) -> u64 {
    let started = Instant::now();
    let mut peak = 0;
    while started.elapsed() < period {
        peak = peak.max(anonymous_memory_bytes(pid));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    peak
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_many_subscribers_that_never_read_when_budget_is_small_should_bound_memory_and_keep_serving(
) {
    let dir = tempfile::tempdir().unwrap();
    let (broker, _client) =
        start_with_topic(dir.path(), BUDGET_BYTES, BATCHES, RECORDS_PER_BATCH).await;
    let metrics = broker.metrics_addr.clone().expect("metrics address");
    let pid = broker.child.id();
    let records = (BATCHES * RECORDS_PER_BATCH) as u64;
    let baseline = anonymous_memory_bytes(pid);

    // One stream on a connection of its own (read at the end), the others stalled for good.
    let mut survivor_client = connect(&broker).await;
    let mut survivor = stalled_subscribe(&mut survivor_client).await;
    let mut clients = Vec::new();
    for _ in 0..CONNECTIONS {
        clients.push(connect(&broker).await);
    }
    let mut stalled = Vec::new();
    for index in 0..STALLED_STREAMS - 1 {
        stalled.push(stalled_subscribe(&mut clients[index % CONNECTIONS]).await);
    }
    let peak = peak_anonymous_memory(pid, Duration::from_secs(3)).await;
    let grown = peak.saturating_sub(baseline);
    eprintln!(
        "anonymous memory: baseline {} MiB, peak {} MiB with {STALLED_STREAMS} stalled streams",
        baseline / MIB,
        peak / MIB
    );
    // Encoded copies of the messages the budget admits, plus HTTP/2 and allocator slack. Measured
    // ~40 MiB growth with the budget; ~1 GiB without it.
    let bound = 3 * BUDGET_BYTES;
    assert!(
        grown < bound,
        "stalled subscribers grew the broker by {} MiB (bound {} MiB)",
        grown / MIB,
        bound / MIB
    );

    // Another client is still served: it produces and fetches while the budget is taken.
    let mut other = connect(&broker).await;
    let produced = tokio::time::timeout(
        Duration::from_secs(10),
        other.produce(v1::ProduceRequest {
            topic: "big".into(),
            records: vec![v1::Record {
                value: Some(Bytes::from_static(b"still served")),
                ..Default::default()
            }],
            ..Default::default()
        }),
    )
    .await
    .expect("produce answered in time")
    .unwrap()
    .into_inner();
    assert_eq!(produced.base_offset, records);
    let fetched = tokio::time::timeout(
        Duration::from_secs(10),
        other.fetch(v1::FetchRequest {
            topic: "big".into(),
            offset: records,
            decode_records: true,
            ..Default::default()
        }),
    )
    .await
    .expect("fetch answered in time")
    .unwrap()
    .into_inner();
    assert_eq!(fetched.records.len(), 1);
    assert_eq!(
        fetched.records[0].value.as_deref(),
        Some(&b"still served"[..])
    );

    let text = metrics_text(&metrics);
    let waits = metric_value(&text, "syncline_response_budget_waits_total");
    assert!(waits.unwrap_or(0.0) > 0.0, "budget waits: {waits:?}");
    let in_flight = metric_value(&text, "syncline_response_bytes_in_flight").unwrap_or(-1.0);
    assert!(
        in_flight > 0.0 && in_flight <= BUDGET_BYTES as f64,
        "bytes in flight {in_flight} outside (0, {BUDGET_BYTES}]"
    );

    // The stalled streams go away; their budget returns and the survivor gets every record.
    drop(stalled);
    drop(clients);
    read_in_order(
        &mut survivor,
        records + 1,
        Duration::from_secs(30),
        "the survivor's stream moves once the others are gone",
    )
    .await;
    let text = metrics_text(&metrics);
    drop(survivor);
    drop(survivor_client);
    assert!(metric_value(&text, "syncline_response_bytes_in_flight").is_some());
    assert!(broker.stop(), "clean exit");
}

/// A hand-made HTTP/2 client that sends unary Fetch requests and never lets a response in: its
/// SETTINGS give every stream a window of 0 bytes, so the broker cannot send any DATA and each
/// encoded response stays in the broker's send buffers.
struct StalledUnaryClient {
    stream: std::net::TcpStream,
    next_stream_id: u32,
}

impl StalledUnaryClient {
    const PREFACE: &'static [u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    const DATA: u8 = 0;
    const HEADERS: u8 = 1;
    const SETTINGS: u8 = 4;
    const END_STREAM: u8 = 0x1;
    const END_HEADERS: u8 = 0x4;
    /// SETTINGS_INITIAL_WINDOW_SIZE.
    const INITIAL_WINDOW_SIZE: u16 = 0x4;

    fn connect(addr: &str) -> Self {
        use std::io::Write;
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream.write_all(Self::PREFACE).unwrap();
        let mut settings = Self::INITIAL_WINDOW_SIZE.to_be_bytes().to_vec();
        settings.extend_from_slice(&0u32.to_be_bytes());
        let mut client = Self {
            stream,
            next_stream_id: 1,
        };
        client.frame(Self::SETTINGS, 0, 0, &settings);
        client
    }

    fn frame(&mut self, kind: u8, flags: u8, stream_id: u32, payload: &[u8]) {
        use std::io::Write;
        let length = (payload.len() as u32).to_be_bytes();
        let mut frame = vec![length[1], length[2], length[3], kind, flags];
        frame.extend_from_slice(&stream_id.to_be_bytes());
        frame.extend_from_slice(payload);
        self.stream.write_all(&frame).unwrap();
    }

    /// Sends one Fetch on a new stream (headers as HPACK literals without indexing).
    fn fetch(&mut self, request: &v1::FetchRequest) {
        use prost::Message;
        let mut headers = Vec::new();
        for (name, value) in [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/syncline.v1.Broker/Fetch"),
            (":authority", "localhost"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ] {
            headers.push(0);
            headers.push(name.len() as u8);
            headers.extend_from_slice(name.as_bytes());
            headers.push(value.len() as u8);
            headers.extend_from_slice(value.as_bytes());
        }
        let message = request.encode_to_vec();
        let mut body = vec![0];
        body.extend_from_slice(&(message.len() as u32).to_be_bytes());
        body.extend_from_slice(&message);
        let id = self.next_stream_id;
        self.next_stream_id += 2;
        self.frame(Self::HEADERS, Self::END_HEADERS, id, &headers);
        self.frame(Self::DATA, Self::END_STREAM, id, &body);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_unary_fetches_never_read_should_hold_the_budget_until_sent_and_refuse_more() {
    /// 8 MiB: one message takes at most 512 KiB of it, so 16 stalled 512 KiB fetches fill it.
    const BUDGET: u64 = 8 * MIB;
    const STALLED_FETCHES: usize = 24;
    let dir = tempfile::tempdir().unwrap();
    // 4 MiB in batches of 64 KiB: a fetch gets its 512 KiB share in whole batches.
    let (broker, mut client) = start_with_topic(dir.path(), BUDGET, 64, 64).await;
    let metrics = broker.metrics_addr.clone().expect("metrics address");
    let fetch = v1::FetchRequest {
        topic: "big".into(),
        max_bytes: Some(MIB as u32),
        ..Default::default()
    };
    let mut stalled = StalledUnaryClient::connect(&broker.addr);
    for _ in 0..STALLED_FETCHES {
        stalled.fetch(&fetch);
    }
    // The responses the broker made wait in its send buffers, each holding its bytes.
    let in_flight = || bytes_in_flight(&metrics);
    wait_for_budget_taken(&metrics, BUDGET / 2, "unsent fetch responses").await;
    assert!(in_flight() <= BUDGET as f64);
    // A fetch that finds the budget taken waits, then is refused with RESOURCE_EXHAUSTED.
    let refused = client.fetch(fetch.clone()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused}");
    assert!(
        refused.message().contains("response_bytes_max"),
        "{refused}"
    );
    // Once the stalled client is gone its bytes return, and fetches are served again.
    drop(stalled);
    let started = Instant::now();
    while in_flight() > 0.0 {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "budget not returned"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let served = client.fetch(fetch).await.unwrap().into_inner();
    assert!(!served.batches.is_empty());
    assert!(broker.stop(), "clean exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_stalled_subscribers_holding_the_budget_should_close_them_after_the_stall_timeout_and_serve_a_healthy_one(
) {
    /// Stalled streams, several per connection: together they want far more than the streams'
    /// part of the budget (24 MiB), so without the stall timeout every later stream waits.
    const STALLED: usize = 16;
    const STALLED_CONNECTIONS: usize = 4;
    const STALL_TIMEOUT_MS: &str = "1000";
    let dir = tempfile::tempdir().unwrap();
    let (broker, _client) = start_with_topic_and(
        dir.path(),
        BUDGET_BYTES,
        BATCHES,
        RECORDS_PER_BATCH,
        &["--stalled-stream-timeout-ms", STALL_TIMEOUT_MS],
    )
    .await;
    let metrics = broker.metrics_addr.clone().expect("metrics address");
    let pid = broker.child.id();
    let records = (BATCHES * RECORDS_PER_BATCH) as u64;
    let baseline = anonymous_memory_bytes(pid);
    let mut clients = Vec::new();
    for _ in 0..STALLED_CONNECTIONS {
        clients.push(connect(&broker).await);
    }
    let mut stalled = Vec::new();
    for index in 0..STALLED {
        stalled.push(stalled_subscribe(&mut clients[index % STALLED_CONNECTIONS]).await);
    }
    // The stalled streams take the streams' part of the budget.
    wait_for_budget_taken(&metrics, BUDGET_BYTES / 2, "stalled streams").await;

    // A healthy subscriber on a connection of its own gets every record while the stalled
    // clients are still connected (their streams kept, never read).
    let mut healthy_client = connect(&broker).await;
    let mut healthy = stalled_subscribe(&mut healthy_client).await;
    let memory = tokio::spawn(peak_anonymous_memory(pid, Duration::from_secs(3)));
    read_in_order(
        &mut healthy,
        records,
        Duration::from_secs(10),
        "the healthy stream moves while stalled streams hold the budget",
    )
    .await;
    let peak = memory.await.unwrap();
    let grown = peak.saturating_sub(baseline);
    let bound = 3 * BUDGET_BYTES;
    assert!(
        grown < bound,
        "the broker grew by {} MiB (bound {} MiB)",
        grown / MIB,
        bound / MIB
    );

    let text = metrics_text(&metrics);
    let closed = metric_value(&text, "syncline_stalled_streams_closed_total").unwrap_or(0.0);
    assert!(closed > 0.0, "stalled streams closed: {closed}");
    // A stalled stream learns that its connection was closed once it reads; one whose
    // connection stayed open moves (all read at once: unread streams of a connection hold its
    // HTTP/2 window).
    let readers: Vec<_> = stalled
        .drain(..)
        .map(|mut stream| {
            tokio::spawn(async move {
                let mut received = 0;
                while received < records {
                    match tokio::time::timeout(Duration::from_secs(10), stream.message()).await {
                        Ok(Ok(Some(message))) => received += message.records.len() as u64,
                        Ok(Ok(None)) | Ok(Err(_)) => return true,
                        Err(_) => panic!("a stalled stream neither ends nor moves once read"),
                    }
                }
                false
            })
        })
        .collect();
    let mut ended = 0;
    for reader in readers {
        ended += usize::from(reader.await.unwrap());
    }
    assert!(ended > 0, "no stalled stream was closed");
    drop(clients);
    drop(healthy);
    drop(healthy_client);
    assert!(broker.stop(), "clean exit");
}
