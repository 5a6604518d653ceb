//! Pins the Prometheus endpoint of the real broker: `/metrics` serves the documented metric
//! names with values that move with traffic, the text passes `promtool check metrics`, and the
//! metrics address follows its contract (port 0 picks a port; an explicit address that is taken
//! refuses to start; the default one being taken only warns).

mod common;

use std::io::Write;
use std::process::Command;

use common::{binary, scrape, BrokerProcess};
use syncline_proto::v1;

/// The value of the first sample of `name` whose line contains all of `labels`.
fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .find(|l| labels.iter().all(|label| l.contains(label)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_traffic_when_scraped_should_expose_moving_metrics_that_pass_promtool() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    let metrics = broker.metrics_addr.clone().expect("metrics address logged");
    let mut client = broker.client().await;
    client
        .create_topic(v1::CreateTopicRequest {
            name: "m".into(),
            config: Some(v1::TopicConfig {
                partitions: Some(2),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    for i in 0..10 {
        client
            .produce(v1::ProduceRequest {
                topic: "m".into(),
                partition: i % 2,
                records: vec![v1::Record {
                    value: Some(bytes::Bytes::from(vec![1u8; 100])),
                    ..Default::default()
                }],
                ..Default::default()
            })
            .await
            .unwrap();
    }
    client
        .fetch(v1::FetchRequest {
            topic: "m".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let _ = client
        .describe_topic(v1::DescribeTopicRequest {
            name: "missing".into(),
        })
        .await;

    let text = scrape(&metrics);
    assert_eq!(
        sample(
            &text,
            "syncline_requests_total",
            &["rpc=\"Produce\"", "code=\"OK\""]
        ),
        Some(10.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "syncline_requests_total",
            &["rpc=\"DescribeTopic\"", "code=\"NOT_FOUND\""]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "syncline_records_appended_total", &[]),
        Some(10.0)
    );
    assert!(sample(&text, "syncline_produce_bytes_total", &[]).unwrap() >= 1000.0);
    assert!(sample(&text, "syncline_fetch_bytes_total", &[]).unwrap() > 0.0);
    assert!(sample(&text, "syncline_fsync_duration_seconds_count", &[]).unwrap() >= 1.0);
    assert!(sample(&text, "syncline_group_commit_batches_count", &[]).unwrap() >= 1.0);
    assert!(
        sample(
            &text,
            "syncline_request_duration_seconds_bucket",
            &["rpc=\"Produce\"", "le=\"+Inf\""]
        )
        .unwrap()
            >= 10.0
    );
    assert!(sample(&text, "syncline_connections", &[]).unwrap() >= 1.0);
    assert_eq!(
        sample(
            &text,
            "syncline_partition_log_end_offset",
            &["topic=\"m\"", "partition=\"0\""]
        ),
        Some(5.0)
    );
    assert_eq!(
        sample(
            &text,
            "syncline_partition_durable_lag_records",
            &["topic=\"m\"", "partition=\"1\""]
        ),
        Some(0.0)
    );
    assert!(sample(&text, "syncline_partition_size_bytes", &["topic=\"m\""]).unwrap() > 0.0);

    // Every metric the Grafana dashboard queries is one the broker serves.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/grafana/syncline.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let mut queried = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for (start, _) in expr.match_indices("syncline_") {
                let name: String = expr[start..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                assert!(
                    text.contains(&format!("\n{name}")),
                    "dashboard queries {name}, which /metrics lacks"
                );
                queried += 1;
            }
        }
    }
    assert!(queried >= 10);

    // promtool (Debian's `prometheus` package; .ci/run installs it) lints names and format.
    match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        Ok(mut child) => {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
            let output = child.wait_with_output().unwrap();
            let report = format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            assert!(
                output.status.success() && report.trim().is_empty(),
                "promtool: {report}"
            );
        }
        Err(error) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "promtool is required under CI: {error}"
            );
            eprintln!("promtool not installed; skipping the lint (CI installs it)");
        }
    }
}

#[test]
fn given_metrics_address_taken_should_refuse_if_explicit_and_warn_if_default() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(binary("syncline-broker"))
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", &addr])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.contains("metrics") && stderr.contains(&addr),
        "{stderr}"
    );
}
