//! Pins the `syncline bench` contract through the real binaries: the `--json` report's shape
//! and a clean verification on a 2-producer, 2-consumer run; a non-zero exit with an `error:`
//! line naming the lost records when the loss-injection hook drops records; the `--plot` SVG;
//! and `--topic` on an existing topic reading only what the run produced.

mod common;

use std::process::{Command, Output};

use common::{binary, BrokerProcess};
use serde_json::Value;

fn bench(broker: &BrokerProcess, args: &[&str]) -> Output {
    Command::new(binary("syncline"))
        .arg("bench")
        .args(["--broker", &broker.addr])
        .args(args)
        .output()
        .expect("run syncline bench")
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).unwrap()
}

/// The one JSON object on stdout.
fn report(output: &Output) -> Value {
    let text = stdout(output);
    assert_eq!(
        text.trim_end().lines().count(),
        1,
        "one line expected: {text}"
    );
    serde_json::from_str(&text).unwrap_or_else(|error| panic!("{error}: {text}"))
}

/// The small run of the contract: 20,000 records of 100 bytes over 2 partitions.
const SMALL_RUN: [&str; 10] = [
    "--records",
    "20000",
    "--record-size",
    "100",
    "--partitions",
    "2",
    "--producers",
    "2",
    "--consumers",
    "2",
];

#[track_caller]
fn assert_positive(json: &Value, pointer: &str) {
    let value = json
        .pointer(pointer)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("{pointer} missing or not a number in {json}"));
    assert!(value > 0.0, "{pointer} = {value}");
}

#[test]
fn given_clean_run_when_json_should_report_every_key_and_nothing_lost() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    // Sizes take units, like the broker's settings.
    let output = bench(
        &broker,
        &[&SMALL_RUN[..], &["--json", "--batch-bytes", "256KiB"]].concat(),
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let json = report(&output);

    let config = &json["config"];
    assert_eq!(config["producers"], 2);
    assert_eq!(config["consumers"], 2);
    assert_eq!(config["partitions"], 2);
    assert_eq!(config["record_size"], 100);
    assert_eq!(config["batch_bytes"], 256 * 1024);
    assert_eq!(config["records"], 20000);
    assert_eq!(config["acks"], "durable");
    assert_eq!(config["idempotent"], true);
    assert_eq!(config["keys"], 0);
    assert!(config["rate"].is_null());
    assert!(config["topic"].as_str().unwrap().starts_with("bench-"));
    for section in ["produce", "consume"] {
        for key in ["records_per_sec", "mb_per_sec"] {
            assert_positive(&json, &format!("/{section}/{key}"));
        }
        for key in ["p50", "p90", "p99", "p999", "max"] {
            assert_positive(&json, &format!("/{section}/latency_ms/{key}"));
        }
        assert_eq!(json[section]["records"], 20000, "{section}");
    }
    let verify = &json["verify"];
    assert_eq!(verify["checked"], true);
    assert_eq!(verify["produced"], 20000);
    assert_eq!(verify["consumed"], 20000);
    for key in [
        "lost",
        "duplicated",
        "reordered",
        "corrupt",
        "produce_errors",
    ] {
        assert_eq!(verify[key], 0, "{key}");
    }

    // The fresh topic is gone afterwards.
    let topic = config["topic"].as_str().unwrap();
    let listed = Command::new(binary("syncline"))
        .args(["topic", "list", "--broker", &broker.addr])
        .output()
        .unwrap();
    assert!(!stdout(&listed).contains(topic), "{}", stdout(&listed));
}

#[test]
fn given_injected_loss_should_exit_non_zero_naming_the_lost_records() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    // Every 1000th record received is dropped before verification: 20 of 20,000.
    let output = bench(
        &broker,
        &[&SMALL_RUN[..], &["--json", "--debug-skip-every", "1000"]].concat(),
    );
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let err = stderr(&output);
    let error_line = err
        .lines()
        .find(|line| line.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line in: {err}"));
    assert!(
        error_line.contains("verification failed") && error_line.contains("records lost"),
        "{error_line}"
    );
    // The report still comes out, with the loss counted.
    let json = report(&output);
    let lost = json["verify"]["lost"].as_u64().unwrap();
    assert!((19..=21).contains(&lost), "lost {lost}");
    assert!(
        error_line.contains(&format!("{lost} records lost")),
        "{error_line}"
    );
    assert_eq!(json["verify"]["duplicated"], 0);
    assert_eq!(
        json["verify"]["consumed"].as_u64().unwrap() + lost,
        20000,
        "{json}"
    );
}

#[test]
fn given_plot_should_write_an_svg_and_print_the_human_summary() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(&dir.path().join("data"));
    let plot = dir.path().join("out.svg");
    let output = bench(
        &broker,
        &[
            "--records",
            "5000",
            "--keys",
            "10",
            "--partitions",
            "3",
            "--consumers",
            "2",
            "--acks",
            "leader",
            "--plot",
            plot.to_str().unwrap(),
        ],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(
        svg.starts_with("<svg") || svg.starts_with("<?xml"),
        "{}",
        &svg[..svg.len().min(100)]
    );
    // A run this short (tens of milliseconds) still gets a throughput curve: its first blue
    // line (produce) has a point per bucket of about 1% of the run rounded up to a 1-2-5 step
    // (so 40 to 101 points), not one per 100 ms sample (2 or 3 points before).
    let throughput = svg
        .split("<polyline")
        .find(|line| line.contains("stroke=\"#0000FF\""))
        .and_then(|line| line.split("points=\"").nth(1))
        .and_then(|points| points.split('"').next())
        .unwrap_or_default();
    assert!(
        throughput.split_whitespace().count() >= 30,
        "few throughput points: {throughput}"
    );
    let summary = stdout(&output);
    for needle in [
        "records/s",
        "MB/s",
        "send -> ack",
        "send -> consumed",
        "p99.9",
        "0 lost, 0 duplicated, 0 reordered, 0 corrupt",
    ] {
        assert!(summary.contains(needle), "`{needle}` not in: {summary}");
    }
}

#[test]
fn given_existing_topic_should_read_only_the_records_of_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    let args = [
        "--records",
        "3000",
        "--topic",
        "reused",
        "--partitions",
        "2",
        "--consumers",
        "2",
        "--json",
    ];
    // First run creates the topic (and keeps it: it was named); the second starts at its end.
    for run in 0..2 {
        let output = bench(&broker, &args);
        assert!(output.status.success(), "run {run}: {}", stderr(&output));
        let json = report(&output);
        assert_eq!(json["config"]["topic_created"], run == 0);
        assert_eq!(json["verify"]["consumed"], 3000, "run {run}");
        assert_eq!(json["verify"]["corrupt"], 0, "run {run}");
    }
    // Produce only: no consume section.
    let output = bench(
        &broker,
        &[
            "--records",
            "1000",
            "--topic",
            "reused",
            "--consumers",
            "0",
            "--json",
        ],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let json = report(&output);
    assert!(json["consume"].is_null());
    assert_eq!(json["verify"]["checked"], false);
    assert_eq!(json["verify"]["produced"], 1000);
    // A partition count that does not match the existing topic is refused.
    let output = bench(&broker, &["--topic", "reused", "--partitions", "3"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).starts_with("error:"), "{}", stderr(&output));
}

/// `--replication-factor R` goes into the topic the bench creates: 1 runs; a factor this
/// version does not serve is the broker's refusal, exit non-zero, and nothing is measured.
#[test]
fn given_replication_factor_should_create_the_topic_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    let output = bench(
        &broker,
        &["--records", "500", "--replication-factor", "1", "--json"],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(report(&output)["verify"]["consumed"], 500);
    let output = bench(&broker, &["--records", "500", "--replication-factor", "3"]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("replication factor 3"),
        "{}",
        stderr(&output)
    );
    assert!(stdout(&output).is_empty(), "{}", stdout(&output));
}
