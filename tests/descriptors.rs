//! File descriptors per partition, through the broker binary (issue 13, item 9): every
//! partition held 4 descriptors (segment, two indexes, a lock file), so 1,600 written partitions
//! under a 4,096 limit fenced 581 of them. Now an open partition holds one, and a broker whose
//! open-file limit cannot fit its partitions refuses to start with a message naming the limit.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::{binary, fenced_partitions, BrokerProcess};
use syncline_proto::v1;

const PARTITIONS: u32 = 300;

fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("list /proc/PID/fd")
        .count()
}

async fn create_and_write(broker: &BrokerProcess) {
    let mut client = broker.client().await;
    client
        .create_topic(v1::CreateTopicRequest {
            name: "many".into(),
            config: Some(v1::TopicConfig {
                partitions: Some(PARTITIONS),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    for partition in 0..PARTITIONS {
        client
            .produce(v1::ProduceRequest {
                topic: "many".into(),
                partition,
                records: vec![v1::Record {
                    value: Some(b"v".to_vec().into()),
                    ..Default::default()
                }],
                ..Default::default()
            })
            .await
            .unwrap();
    }
}

/// At most one descriptor per partition (its active segment) plus a constant.
fn assert_about_one_per_partition(broker: &BrokerProcess, when: &str) {
    let open = open_descriptors(broker.child.id());
    let partitions = PARTITIONS as usize + 1; // and `__offsets`
    assert!(
        open <= partitions + 64,
        "{when}: {open} descriptors open for {partitions} partitions"
    );
}

/// Starts the broker under `ulimit -n {limit}` (soft and hard) and waits for it to exit.
fn run_with_fd_limit(data_dir: &Path, limit: u32, extra: &[&str]) -> std::process::Output {
    Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -n {limit} && exec \"$0\" \"$@\""))
        .arg(binary("syncline-broker"))
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("run syncline-broker")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_many_written_partitions_should_hold_about_one_descriptor_each() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    create_and_write(&broker).await;
    assert_about_one_per_partition(&broker, "after writing");
    broker.kill9();
    // Recovery (no clean-shutdown marker) opens and scans every segment: it keeps no more.
    let broker = BrokerProcess::start(dir.path());
    assert_eq!(fenced_partitions(&broker), 0);
    assert_about_one_per_partition(&broker, "after recovery");
    assert!(broker.stop());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_descriptor_limit_below_the_partitions_should_refuse_to_start_naming_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    create_and_write(&broker).await;
    assert!(broker.stop());

    let output = run_with_fd_limit(dir.path(), 256, &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "refuses to start instead of fencing partitions:\n{stderr}"
    );
    assert!(
        stderr.contains(&format!("{} partitions need about", PARTITIONS + 1))
            && stderr.contains("the limit (ulimit -n) is 256")
            && stderr.contains("LimitNOFILE"),
        "the message names the limit to raise:\n{stderr}"
    );
    assert!(!stderr.contains("listening on"), "{stderr}");

    // With room for them, the same data directory starts and serves every partition.
    let broker = BrokerProcess::start(dir.path());
    assert_eq!(fenced_partitions(&broker), 0);
    assert!(broker.stop());
}

/// Issue 13 item 9: an explicitly set `--max-connections` counts against the descriptor limit
/// too; a start that cannot honour it is refused, naming both knobs.
#[test]
fn given_explicit_max_connections_over_the_descriptor_limit_should_refuse_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let output = run_with_fd_limit(dir.path(), 256, &["--max-connections", "1000"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("and max_connections = 1000 need about")
            && stderr.contains("the limit (ulimit -n) is 256")
            && stderr.contains("or lower max_connections"),
        "{stderr}"
    );
}
