//! Pins issue 13 item 1 through the real binaries: committed offsets belong to one incarnation
//! of a topic. A group that consumed `orders` and committed, after `orders` is deleted and
//! created again (with or without a broker restart in between), starts the new topic from its
//! first record; `DescribeGroup` shows no stale committed offset; the topic id changes.

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use common::{binary, BrokerProcess};
use syncline_proto::v1;
use tonic::Code;

/// A short initial rebalance delay so `consume --group` is assigned quickly.
const FAST: [&str; 2] = ["--group-initial-rebalance-delay-ms", "200"];

fn syncline(broker: &BrokerProcess, args: &[&str], input: &[u8]) -> Output {
    let mut child = Command::new(binary("syncline"))
        .args(["--broker", &broker.addr])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run syncline");
    child.stdin.take().unwrap().write_all(input).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "syncline {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn stdout_lines(output: &Output) -> Vec<String> {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(String::from)
        .collect()
}

/// Creates `orders` (one partition) holding `values`; returns its topic id.
fn create_orders(broker: &BrokerProcess, values: &[String]) -> String {
    syncline(
        broker,
        &["topic", "create", "orders", "--partitions", "1"],
        b"",
    );
    syncline(broker, &["produce", "orders"], values.join("\n").as_bytes());
    let described = stdout_lines(&syncline(broker, &["topic", "describe", "orders"], b""));
    let id = described
        .iter()
        .find_map(|line| line.strip_prefix("id: "))
        .unwrap_or_else(|| panic!("no id line in {described:?}"))
        .to_string();
    assert_eq!(id.len(), 36, "{id}");
    id
}

/// `consume orders --group g` until `expected` records or 3 s without one.
fn consume_group(broker: &BrokerProcess, expected: usize) -> Vec<String> {
    let max = expected.to_string();
    stdout_lines(&syncline(
        broker,
        &[
            "consume",
            "orders",
            "--group",
            "g",
            "--max-records",
            &max,
            "--timeout-ms",
            "3000",
        ],
        b"",
    ))
}

fn values(prefix: &str, count: usize) -> Vec<String> {
    (0..count).map(|i| format!("{prefix}-{i}")).collect()
}

async fn committed(broker: &BrokerProcess) -> Vec<(String, u64, String)> {
    broker
        .client()
        .await
        .fetch_offsets(v1::FetchOffsetsRequest {
            group: "g".into(),
            partitions: Vec::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .offsets
        .into_iter()
        .map(|c| (c.topic, c.offset, c.topic_id))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_topic_deleted_and_recreated_when_group_consumes_should_read_every_new_record() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start_with(dir.path(), &FAST);
    let first_id = create_orders(&broker, &values("old", 5));
    assert_eq!(consume_group(&broker, 5), values("old", 5));
    assert_eq!(
        committed(&broker).await,
        vec![("orders".into(), 5, first_id.clone())]
    );

    // Delete and re-create in one broker run: more records than were committed, so a stale
    // offset 5 would skip the first five.
    syncline(&broker, &["topic", "delete", "orders"], b"");
    let second_id = create_orders(&broker, &values("new", 8));
    assert_ne!(
        second_id, first_id,
        "a re-created topic is another incarnation"
    );
    assert!(committed(&broker).await.is_empty());
    assert_eq!(consume_group(&broker, 8), values("new", 8));
    assert_eq!(
        committed(&broker).await,
        vec![("orders".into(), 8, second_id)]
    );

    // Delete, re-create, restart: the deleted incarnation's commit is still in `__offsets`
    // and a topic of its name exists when the broker loads it.
    syncline(&broker, &["topic", "delete", "orders"], b"");
    let third_id = create_orders(&broker, &values("newer", 10));
    assert!(broker.stop());
    let broker = BrokerProcess::start_with(dir.path(), &FAST);
    assert!(committed(&broker).await.is_empty());
    let described = broker
        .client()
        .await
        .describe_group(v1::DescribeGroupRequest { group: "g".into() })
        .await;
    match described {
        Err(status) => assert_eq!(status.code(), Code::NotFound, "{status:?}"),
        Ok(response) => {
            let partitions = response.into_inner().partitions;
            assert!(
                partitions
                    .iter()
                    .all(|p| p.committed_offset.is_none() && p.lag == 10),
                "{partitions:?}"
            );
        }
    }
    assert_eq!(consume_group(&broker, 10), values("newer", 10));
    assert_eq!(
        committed(&broker).await,
        vec![("orders".into(), 10, third_id.clone())]
    );

    // The id is stable across restarts, and so is the new commit.
    broker.kill9();
    let broker = BrokerProcess::start_with(dir.path(), &FAST);
    let topics = broker
        .client()
        .await
        .list_topics(v1::ListTopicsRequest {})
        .await
        .unwrap()
        .into_inner()
        .topics;
    assert_eq!(topics.len(), 1);
    assert_eq!(topics[0].topic_id, third_id);
    assert_eq!(
        committed(&broker).await,
        vec![("orders".into(), 10, third_id)]
    );
}
