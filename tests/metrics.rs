//! Pins the Prometheus endpoint of the real broker: `/metrics` serves the documented metric
//! names with values that move with traffic, a fresh broker serves every metric of
//! `syncline_broker::metrics::METRICS` at zero (and nothing else), the Grafana dashboard charts
//! each of them, the text passes `promtool check metrics`, and the metrics address follows its
//! contract (port 0 picks a port; an explicit address that is taken refuses to start; the
//! default one being taken only warns).

mod common;

use common::{run_broker, scrape, BrokerProcess};
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

    common::promtool_check(&text);
}

/// The `# TYPE` of `name` in the exposition text.
fn exposed_type<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("# TYPE {name} ")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_fresh_broker_when_scraped_should_serve_every_listed_metric_at_zero() {
    use syncline_broker::metrics::{Kind, METRICS};
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    let text = scrape(
        broker
            .metrics_addr
            .as_deref()
            .expect("metrics address logged"),
    );
    for metric in METRICS {
        assert_eq!(
            exposed_type(&text, metric.name),
            Some(metric.kind.prometheus_type()),
            "{} is listed but a fresh broker does not serve it:\n{text}",
            metric.name
        );
        if !metric.labels.is_empty() {
            continue;
        }
        let sample_name = match metric.kind {
            Kind::Histogram => format!("{}_count", metric.name),
            _ => metric.name.to_string(),
        };
        assert_eq!(
            sample(&text, &sample_name, &[]),
            Some(0.0),
            "{sample_name} must start at zero"
        );
    }
    // The labelled request metrics are registered for every RPC with code OK.
    assert_eq!(
        sample(
            &text,
            "syncline_requests_total",
            &["rpc=\"CommitOffsets\"", "code=\"OK\""]
        ),
        Some(0.0),
        "{text}"
    );
    // And nothing is served that the list lacks.
    for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let name = line.split_whitespace().nth(2).unwrap();
        assert!(
            METRICS.iter().any(|m| m.name == name),
            "{name} is served but missing from syncline_broker::metrics::METRICS"
        );
    }
    common::promtool_check(&text);
}

#[test]
fn given_dashboard_should_chart_every_listed_metric_and_only_listed_ones() {
    use syncline_broker::metrics::METRICS;
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/grafana/syncline.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let mut queried = std::collections::BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        let targets = panel["targets"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        for target in targets {
            let expr = target["expr"].as_str().unwrap();
            for (start, _) in expr.match_indices("syncline_") {
                let name: String = expr[start..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|suffix| {
                        name.strip_suffix(suffix)
                            .filter(|base| METRICS.iter().any(|m| m.name == *base))
                    })
                    .unwrap_or(&name)
                    .to_string();
                assert!(
                    METRICS.iter().any(|m| m.name == base),
                    "the dashboard queries {name}, which the broker does not export"
                );
                queried.insert(base);
            }
        }
    }
    for metric in METRICS {
        assert!(
            queried.contains(metric.name),
            "no dashboard panel charts {}",
            metric.name
        );
    }
}

#[test]
fn given_metrics_address_taken_should_refuse_if_explicit_and_warn_if_default() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let output = run_broker(
        dir.path(),
        &["--listen", "127.0.0.1:0", "--metrics-listen", &addr],
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.contains("metrics") && stderr.contains(&addr),
        "{stderr}"
    );
}
