//! Pins the connection limits of the real broker: `--max-connections` closes connections over
//! the limit at once and counts them in `syncline_connections_refused_total`; a connection that
//! does not complete the HTTP/2 handshake within `--handshake-timeout-ms` is closed; a peer that
//! stops answering HTTP/2 pings is dropped (`--keepalive-*`), while idle live clients are kept.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::probe::{metric_value, metrics_text};
use common::BrokerProcess;
use syncline_proto::v1;

/// How long a test waits for the broker to close a connection it must close (generous: the
/// deadlines under test are well below it; without the limits the connection stays open).
const CLOSE_WAIT: Duration = Duration::from_secs(15);
/// The HTTP/2 client preface.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame: length 0, type 4, no flags, stream 0.
const EMPTY_SETTINGS: [u8; 9] = [0, 0, 0, 4, 0, 0, 0, 0, 0];

/// Reads (and discards) what the broker sends until it closes the connection; panics if it is
/// still open after `CLOSE_WAIT`. Never writes, so pings stay unanswered.
fn wait_until_closed(stream: &mut TcpStream) -> Duration {
    let started = Instant::now();
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buffer = [0u8; 4096];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => return started.elapsed(),
            Ok(_) => {}
            Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(error) if error.kind() == ErrorKind::ConnectionReset => return started.elapsed(),
            Err(error) => panic!("read failed: {error}"),
        }
        assert!(
            started.elapsed() < CLOSE_WAIT,
            "the broker kept the connection open for {CLOSE_WAIT:?}"
        );
    }
}

async fn list_topics(client: &mut v1::broker_client::BrokerClient<tonic::transport::Channel>) {
    client
        .list_topics(v1::ListTopicsRequest {})
        .await
        .expect("an open connection is served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_max_connections_open_when_another_connects_should_close_it_at_once_and_count_it() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start_with(dir.path(), &["--max-connections", "4"]);
    let metrics = broker.metrics_addr.clone().expect("metrics address");
    let refused = || {
        metric_value(
            &metrics_text(&metrics),
            "syncline_connections_refused_total",
        )
    };
    assert_eq!(refused(), Some(0.0), "registered at zero at start");

    // Four idle but valid gRPC connections (each client has its own).
    let mut clients = Vec::new();
    for _ in 0..4 {
        let mut client = broker.client().await;
        list_topics(&mut client).await;
        clients.push(client);
    }
    let mut fifth = TcpStream::connect(&broker.addr).unwrap();
    // The broker may have closed it already (then the write fails): either way it must close.
    let _ = fifth.write_all(PREFACE);
    wait_until_closed(&mut fifth);
    assert_eq!(refused(), Some(1.0));
    for client in &mut clients {
        list_topics(client).await;
    }

    // A closed connection gives its place back.
    clients.pop();
    let started = Instant::now();
    loop {
        let attempt = tokio::time::timeout(Duration::from_secs(5), async {
            let mut client = v1::broker_client::BrokerClient::connect(broker.url()).await?;
            client.list_topics(v1::ListTopicsRequest {}).await?;
            Ok::<_, Box<dyn std::error::Error>>(())
        })
        .await;
        if matches!(attempt, Ok(Ok(()))) {
            break;
        }
        assert!(
            started.elapsed() < CLOSE_WAIT,
            "no place freed after a client left: {attempt:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(broker.stop(), "clean exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_connection_without_http2_handshake_should_be_closed_after_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    // Short, but long enough for a real client's handshake on a loaded machine.
    let broker = BrokerProcess::start_with(dir.path(), &["--handshake-timeout-ms", "2000"]);
    // Never sends a byte.
    let mut silent = TcpStream::connect(&broker.addr).unwrap();
    // Sends half the preface, then nothing.
    let mut partial = TcpStream::connect(&broker.addr).unwrap();
    partial.write_all(&PREFACE[..10]).unwrap();
    // Sends the preface but not its SETTINGS frame.
    let mut no_settings = TcpStream::connect(&broker.addr).unwrap();
    no_settings.write_all(PREFACE).unwrap();
    // A real client completes the handshake and then idles past the timeout.
    let mut client = broker.client().await;
    list_topics(&mut client).await;

    wait_until_closed(&mut silent);
    wait_until_closed(&mut partial);
    wait_until_closed(&mut no_settings);
    // The real client, idle past the deadline, is still served (the deadline ends with the
    // handshake).
    tokio::time::sleep(Duration::from_millis(3000)).await;
    list_topics(&mut client).await;
    assert!(broker.stop(), "clean exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_peer_that_stops_answering_pings_should_be_dropped_while_live_idle_clients_stay() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start_with(
        dir.path(),
        &[
            "--keepalive-interval-ms",
            "300",
            // Long enough for a live client's ack on a loaded machine.
            "--keepalive-timeout-ms",
            "1500",
        ],
    );
    // Completes the handshake, then never writes again: the broker's pings go unanswered.
    let mut dead = TcpStream::connect(&broker.addr).unwrap();
    dead.write_all(PREFACE).unwrap();
    dead.write_all(&EMPTY_SETTINGS).unwrap();
    // A live client (its HTTP/2 stack answers pings) idles for many ping intervals.
    let mut client = broker.client().await;
    list_topics(&mut client).await;

    wait_until_closed(&mut dead);
    // Several ping intervals.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    list_topics(&mut client).await;
    assert!(broker.stop(), "clean exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_descriptors_exhausted_when_accept_fails_should_log_and_serve_again_once_freed() {
    /// Open files the broker may have: enough to start, few enough that the idle scrapes below
    /// take the rest.
    const OPEN_FILES: u64 = 128;
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start_limited(dir.path(), &[], Some(OPEN_FILES));
    let metrics = broker.metrics_addr.clone().expect("metrics address");
    // Idle connections to the metrics endpoint (its own listener, not under max_connections)
    // until the broker holds all the descriptors it may have (not many more: the listen
    // backlog behind them is short).
    let open_files = || {
        std::fs::read_dir(format!("/proc/{}/fd", broker.child.id()))
            .unwrap()
            .count()
    };
    let mut scrapers = Vec::new();
    while open_files() < OPEN_FILES as usize {
        assert!(
            scrapers.len() < 2 * OPEN_FILES as usize,
            "descriptors never ran out"
        );
        scrapers.push(TcpStream::connect(&metrics).unwrap());
        if scrapers.len() % 8 == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // A client now waits in the listen backlog: the broker has no descriptor to accept it with.
    let url = broker.url();
    let waiting = tokio::spawn(async move {
        let mut client = v1::broker_client::BrokerClient::connect(url).await?;
        client.list_topics(v1::ListTopicsRequest {}).await?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    });
    let started = Instant::now();
    let mut log = Vec::new();
    while !log
        .iter()
        .any(|line: &String| line.contains("accepting a connection failed"))
    {
        assert!(
            started.elapsed() < CLOSE_WAIT,
            "no accept failure logged; the broker said:\n{}",
            log.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        log.extend(broker.drain_log());
    }
    // Descriptors come back: the waiting client is accepted and served.
    drop(scrapers);
    tokio::time::timeout(CLOSE_WAIT, waiting)
        .await
        .expect("the waiting client is served once descriptors are free")
        .unwrap()
        .expect("served");
    log.extend(broker.drain_log());
    let failures = log
        .iter()
        .filter(|line| line.contains("accepting a connection failed"))
        .count();
    // At most one line a second (rate-limited), not one per retry.
    assert!(
        failures as u64 <= started.elapsed().as_secs() + 1,
        "{failures} accept failures logged in {:?}",
        started.elapsed()
    );
    assert!(broker.stop(), "clean exit");
}

/// Review finding (issue 13 items 8 and 9): the default connection limit was computed once at
/// start, so partitions created later could take the descriptors it had promised to
/// connections. It now follows the partitions: after a big CreateTopic under a 256-descriptor
/// limit, only what the partitions leave is admitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_default_limit_when_topics_take_descriptors_should_admit_only_what_is_left() {
    const OPEN_FILES: u64 = 256;
    // With `__offsets`, the partitions then hold 189 descriptors; 64 are the broker's own:
    // 256 - 189 - 64 = 3 connections are left.
    const PARTITIONS: u32 = 188;
    let dir = tempfile::tempdir().unwrap();
    let broker =
        BrokerProcess::start_limited(dir.path(), &["--max-partitions", "1024"], Some(OPEN_FILES));
    let metrics = broker.metrics_addr.clone().expect("metrics address");
    let mut admin = broker.client().await;
    admin
        .create_topic(v1::CreateTopicRequest {
            name: "wide".into(),
            config: Some(v1::TopicConfig {
                partitions: Some(PARTITIONS),
                ..Default::default()
            }),
        })
        .await
        .expect("the partitions fit the descriptor limit");
    let mut clients = vec![admin];
    for _ in 0..2 {
        let mut client = broker.client().await;
        list_topics(&mut client).await;
        clients.push(client);
    }
    let mut fourth = TcpStream::connect(&broker.addr).unwrap();
    let _ = fourth.write_all(PREFACE);
    wait_until_closed(&mut fourth);
    assert_eq!(
        metric_value(
            &metrics_text(&metrics),
            "syncline_connections_refused_total"
        ),
        Some(1.0)
    );
    for client in &mut clients {
        list_topics(client).await;
    }
    assert!(broker.stop(), "clean exit");
}
