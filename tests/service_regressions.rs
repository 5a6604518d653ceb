//! One test per bug found in review of the service layer: shutdown with a client that stops
//! reading, oversized records, decoded fetches near the message limit, long polls on a deleted
//! topic, and `syncline consume` when the broker dies.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{binary, BrokerProcess};
use syncline_client::{Client, Code, ProducerConfig, TopicConfig};
use syncline_proto::batch::BatchBuilder;
use syncline_proto::v1;
use tokio_stream::StreamExt;

fn big_batch(records: usize, value_len: usize) -> Bytes {
    let mut builder = BatchBuilder::new();
    let value = vec![7u8; value_len];
    for _ in 0..records {
        builder.push(1, None, Some(&value), &[]);
    }
    builder.finish().unwrap()
}

async fn create(
    client: &mut v1::broker_client::BrokerClient<tonic::transport::Channel>,
    name: &str,
) {
    client
        .create_topic(v1::CreateTopicRequest {
            name: name.into(),
            config: Some(v1::TopicConfig {
                partitions: Some(1),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_subscriber_that_stops_reading_when_sigterm_should_still_exit() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProcess::start(dir.path());
    let mut client = broker.client().await;
    create(&mut client, "s").await;
    for _ in 0..12 {
        client
            .produce(v1::ProduceRequest {
                topic: "s".into(),
                batch: big_batch(16, 64 * 1024),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let _never_read = client
        .subscribe(v1::SubscribeRequest {
            topic: "s".into(),
            max_bytes: Some(1024 * 1024),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // SAFETY: kill(2) on our own child.
    unsafe {
        libc::kill(broker.child.id() as i32, libc::SIGTERM);
    }
    let started = Instant::now();
    let status = loop {
        if let Some(status) = broker.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "broker hangs after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success());
    assert!(
        dir.path().join("s/0/.clean-shutdown").exists(),
        "logs closed despite the stalled stream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_record_larger_than_a_batch_should_fail_fast_and_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    let client = Client::connect(&broker.addr).await.unwrap();
    client
        .create_topic("big", TopicConfig::with_partitions(1))
        .await
        .unwrap();
    let producer = client
        .producer("big", ProducerConfig::default())
        .await
        .unwrap();
    let started = Instant::now();
    let error = producer
        .send(None, Some(&vec![7u8; 20 * 1024 * 1024]), &[])
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "no retries for a permanent error"
    );
    assert!(error.to_string().contains("exceeds the maximum"), "{error}");

    // A raw stream request over the gRPC limit gets RESOURCE_EXHAUSTED, not a silent end.
    let mut raw = broker.client().await;
    let request = v1::ProduceRequest {
        topic: "big".into(),
        batch: big_batch(1, 20 * 1024 * 1024),
        ..Default::default()
    };
    let mut responses = raw
        .produce_stream(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let status = responses.next().await.unwrap().unwrap_err();
    assert_eq!(
        status.code(),
        Code::ResourceExhausted,
        "{}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_decoded_fetch_of_large_batches_should_fit_the_message_limit() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    let mut client = broker.client().await;
    create(&mut client, "d").await;
    for _ in 0..3 {
        client
            .produce(v1::ProduceRequest {
                topic: "d".into(),
                batch: big_batch(6, 1024 * 1024),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let mut offset = 0;
    let mut records = 0;
    while offset < 18 {
        let response = client
            .fetch(v1::FetchRequest {
                topic: "d".into(),
                offset,
                max_bytes: Some(16 * 1024 * 1024),
                decode_records: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        records += response.records.len();
        offset = response.next_offset;
    }
    assert_eq!(records, 18);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_long_poll_when_topic_deleted_should_end_promptly_with_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    let mut client = broker.client().await;
    create(&mut client, "gone").await;
    let mut poller = client.clone();
    let started = Instant::now();
    let poll = tokio::spawn(async move {
        poller
            .fetch(v1::FetchRequest {
                topic: "gone".into(),
                max_wait_ms: 20_000,
                ..Default::default()
            })
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    client
        .delete_topic(v1::DeleteTopicRequest {
            name: "gone".into(),
        })
        .await
        .unwrap();
    let status = poll.await.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn given_broker_dies_during_consume_should_exit_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    let run = |args: &[&str]| {
        std::process::Command::new(binary("syncline"))
            .args(args)
            .args(["--broker", &broker.addr])
            .output()
            .unwrap()
    };
    assert!(run(&["topic", "create", "t"]).status.success());
    let consume = std::process::Command::new(binary("syncline"))
        .args([
            "consume",
            "t",
            "--from-beginning",
            "--timeout-ms",
            "3000",
            "--broker",
            &broker.addr,
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    broker.kill9();
    let output = consume.wait_with_output().unwrap();
    assert!(
        !output.status.success(),
        "consume must fail when the broker is gone"
    );
    let stderr = String::from_utf8(output.stderr).unwrap();
    // It says it is reconnecting while it retries (issue 13 item 17), then gives up with one
    // `error:` line.
    assert!(stderr.starts_with("reconnecting... ("), "{stderr}");
    assert!(
        stderr
            .trim_end()
            .lines()
            .last()
            .unwrap_or_default()
            .starts_with("error:"),
        "{stderr}"
    );
}
