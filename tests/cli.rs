//! Pins the `syncline` CLI contract through the real binaries: topic admin, `produce` from
//! stdin and `consume` back (values only; `--json`; keys with a separator), and one-line errors
//! with non-zero exit codes for an unknown topic, a duplicate topic, a bad name and an
//! unreachable broker; sizes with units; topic names quoted one way; and `consume`/`watch`
//! saying `reconnecting...` and `reconnected` on stderr when the broker goes and comes back.

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use common::{binary, BrokerProcess};

fn syncline(broker: &BrokerProcess, args: &[&str]) -> Output {
    Command::new(binary("syncline"))
        .args(["--broker", &broker.addr])
        .args(args)
        .output()
        .expect("run syncline")
}

fn syncline_stdin(broker: &BrokerProcess, args: &[&str], input: &[u8]) -> Output {
    let mut child = Command::new(binary("syncline"))
        .args(args)
        .env("SYNCLINE_BROKER", &broker.addr)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run syncline");
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).unwrap()
}

#[track_caller]
fn assert_one_line_error(output: &Output, needle: &str) {
    assert!(
        !output.status.success(),
        "expected failure, got success: {}",
        stdout(output)
    );
    let err = stderr(output);
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "one line expected: {err}"
    );
    assert!(err.starts_with("error:"), "{err}");
    assert!(
        err.to_lowercase().contains(needle),
        "`{needle}` not in: {err}"
    );
}

#[test]
fn given_file_when_produced_and_consumed_should_come_back_identical() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    let created = syncline(&broker, &["topic", "create", "lines", "--partitions", "3"]);
    assert!(created.status.success(), "{}", stderr(&created));

    let lines: Vec<String> = (0..500)
        .map(|i| format!("line number {i} with some text"))
        .collect();
    let input = lines.join("\n") + "\n";
    let file = dir.path().join("lines.txt");
    std::fs::write(&file, &input).unwrap();
    let produced = Command::new(binary("syncline"))
        .args(["produce", "lines", "--broker", &broker.addr])
        .stdin(std::fs::File::open(&file).unwrap())
        .output()
        .unwrap();
    assert!(produced.status.success(), "{}", stderr(&produced));
    assert!(
        stderr(&produced).contains("500"),
        "summary mentions the count: {}",
        stderr(&produced)
    );

    let consumed = syncline(
        &broker,
        &[
            "consume",
            "lines",
            "--from-beginning",
            "--max-records",
            "500",
            "--timeout-ms",
            "5000",
        ],
    );
    assert!(consumed.status.success(), "{}", stderr(&consumed));
    let mut got: Vec<String> = stdout(&consumed).lines().map(String::from).collect();
    let mut expected = lines.clone();
    got.sort();
    expected.sort();
    assert_eq!(got, expected);

    // Keyed input: same key -> same partition, order kept per key; --json carries the fields.
    let keyed: String = (0..50).map(|i| format!("user-{}:v{i}\n", i % 5)).collect();
    syncline(&broker, &["topic", "create", "keyed", "--partitions", "4"]);
    let produced = syncline_stdin(
        &broker,
        &["produce", "keyed", "--key-separator", ":"],
        keyed.as_bytes(),
    );
    assert!(produced.status.success(), "{}", stderr(&produced));
    let consumed = syncline(
        &broker,
        &[
            "consume",
            "keyed",
            "--from-beginning",
            "--json",
            "--timeout-ms",
            "2000",
        ],
    );
    assert!(consumed.status.success(), "{}", stderr(&consumed));
    let mut last: std::collections::HashMap<String, u32> = Default::default();
    let mut count = 0;
    for line in stdout(&consumed).lines() {
        let record: serde_json::Value = serde_json::from_str(line).unwrap();
        for field in ["partition", "offset", "key", "value", "timestamp"] {
            assert!(record.get(field).is_some(), "{field} missing in {line}");
        }
        let key = record["key"].as_str().unwrap().to_string();
        let version: u32 = record["value"].as_str().unwrap()[1..].parse().unwrap();
        if let Some(previous) = last.insert(key.clone(), version) {
            assert!(version > previous, "{key}: {previous} then {version}");
        }
        count += 1;
    }
    assert_eq!(count, 50);

    let listed = syncline(&broker, &["topic", "list"]);
    assert!(stdout(&listed).contains("lines") && stdout(&listed).contains("keyed"));
    let described = syncline(&broker, &["topic", "describe", "lines"]);
    assert!(described.status.success(), "{}", stderr(&described));
    let deleted = syncline(&broker, &["topic", "delete", "lines"]);
    assert!(deleted.status.success(), "{}", stderr(&deleted));
}

#[test]
fn given_sizes_with_units_when_creating_a_topic_should_store_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    let created = syncline(
        &broker,
        &[
            "topic",
            "create",
            "sized",
            "--segment-bytes",
            "64MiB",
            "--retention-bytes",
            "10GB",
        ],
    );
    assert!(created.status.success(), "{}", stderr(&created));
    let described = syncline(&broker, &["topic", "describe", "sized"]);
    let text = stdout(&described);
    assert!(text.contains("segment-bytes: 67108864"), "{text}");
    assert!(text.contains("retention-bytes: 10000000000"), "{text}");
    // -1 still means no limit; an ambiguous unit is a usage error that names both spellings.
    let unlimited = syncline(
        &broker,
        &["topic", "create", "unlimited", "--retention-bytes", "-1"],
    );
    assert!(unlimited.status.success(), "{}", stderr(&unlimited));
    let ambiguous = syncline(
        &broker,
        &["topic", "create", "vague", "--segment-bytes", "64M"],
    );
    assert_eq!(ambiguous.status.code(), Some(2));
    let err = stderr(&ambiguous);
    assert!(err.contains("MiB") && err.contains("MB"), "{err}");
}

#[test]
fn given_bad_requests_should_exit_non_zero_with_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    assert!(syncline(&broker, &["topic", "create", "dup"])
        .status
        .success());
    assert_one_line_error(
        &syncline(&broker, &["topic", "create", "dup"]),
        "already exists",
    );
    assert_one_line_error(
        &syncline(&broker, &["topic", "create", "bad/name"]),
        "invalid topic name",
    );
    assert_one_line_error(
        &syncline(&broker, &["topic", "describe", "missing"]),
        "does not exist",
    );
    assert_one_line_error(
        &syncline_stdin(&broker, &["produce", "missing"], b"x\n"),
        "does not exist",
    );
    assert_one_line_error(
        &syncline(&broker, &["consume", "missing", "--timeout-ms", "500"]),
        "does not exist",
    );
    // Topic names are quoted one way, in backticks, in the broker's errors and the client's.
    assert_one_line_error(
        &syncline(&broker, &["topic", "describe", "missing"]),
        "topic `missing` does not exist",
    );
    assert_one_line_error(
        &syncline(
            &broker,
            &["consume", "dup", "--partition", "7", "--timeout-ms", "500"],
        ),
        "topic `dup` has no partition 7",
    );
    // --broker accepted after the subcommand too, with http://; nothing listens on this port.
    let unreachable = Command::new(binary("syncline"))
        .args(["topic", "list", "--broker", "http://127.0.0.1:1"])
        .output()
        .unwrap();
    assert_one_line_error(&unreachable, "127.0.0.1:1");
}

/// A running `syncline` command whose stdout and stderr lines the test reads with timeouts.
struct Running {
    child: std::process::Child,
    stdout: std::sync::mpsc::Receiver<String>,
    stderr: std::sync::mpsc::Receiver<String>,
    /// Every stderr line seen so far.
    stderr_seen: Vec<String>,
}

impl Running {
    fn spawn(broker: &str, args: &[&str]) -> Running {
        let mut child = Command::new(binary("syncline"))
            .args(["--broker", broker])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run syncline");
        let stdout = lines_of(child.stdout.take().unwrap());
        let stderr = lines_of(child.stderr.take().unwrap());
        Running {
            child,
            stdout,
            stderr,
            stderr_seen: Vec::new(),
        }
    }

    #[track_caller]
    fn stdout_until(&self, needle: &str, wait: std::time::Duration) {
        let deadline = std::time::Instant::now() + wait;
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match self.stdout.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return,
                Ok(_) => {}
                Err(_) => break,
            }
        }
        panic!("no `{needle}` on stdout within {wait:?}");
    }

    #[track_caller]
    fn stderr_until(&mut self, needle: &str, wait: std::time::Duration) -> String {
        let deadline = std::time::Instant::now() + wait;
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match self.stderr.recv_timeout(left) {
                Ok(line) => {
                    self.stderr_seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => break,
            }
        }
        panic!(
            "no `{needle}` on stderr within {wait:?}; it said: {:?}",
            self.stderr_seen
        );
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn lines_of(pipe: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead as _;
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    receiver
}

#[test]
fn given_broker_down_when_consuming_or_watching_should_say_reconnecting_then_reconnected() {
    use std::time::Duration;
    // Generous for a loaded CI machine; the retry loops notice a lost broker within a second
    // or two (the client's backoff starts at 100 ms).
    const NOTICE: Duration = Duration::from_secs(10);
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    let addr = broker.addr.clone();
    assert!(syncline(&broker, &["topic", "create", "events"])
        .status
        .success());
    assert!(
        syncline(&broker, &["topic", "create", "kv", "--cleanup", "compact"])
            .status
            .success()
    );
    let mut consume = Running::spawn(&addr, &["consume", "events", "--from-beginning"]);
    let mut watch = Running::spawn(&addr, &["watch", "kv"]);
    watch.stdout_until("# caught up", NOTICE);
    assert!(syncline_stdin(&broker, &["produce", "events"], b"before\n")
        .status
        .success());
    consume.stdout_until("before", NOTICE);

    broker.kill9();
    let line = consume.stderr_until("reconnecting...", NOTICE);
    assert!(line.contains(&addr), "the line names the broker: {line}");
    watch.stderr_until("reconnecting...", NOTICE);

    // Back on the same port: both go on where they were and say so, once.
    let broker = BrokerProcess::start_with(dir.path(), &["--listen", &addr]);
    consume.stderr_until("reconnected", Duration::from_secs(30));
    watch.stderr_until("reconnected", Duration::from_secs(30));
    assert!(syncline_stdin(&broker, &["produce", "events"], b"after\n")
        .status
        .success());
    consume.stdout_until("after", NOTICE);
    assert!(syncline(&broker, &["put", "kv", "k", "v"]).status.success());
    watch.stdout_until("put k", NOTICE);
    for running in [&mut consume, &mut watch] {
        let later: Vec<String> = running.stderr.try_iter().collect();
        running.stderr_seen.extend(later);
        let reconnecting = running
            .stderr_seen
            .iter()
            .filter(|l| l.contains("reconnecting"))
            .count();
        assert_eq!(
            reconnecting, 1,
            "once per outage: {:?}",
            running.stderr_seen
        );
    }
}

/// Issue 14: `--broker` (and `SYNCLINE_BROKER`) take a list of bootstrap addresses, tried in
/// order; when none answers, the one-line error names them all.
#[test]
fn given_bootstrap_list_should_use_the_first_that_answers_and_name_all_when_none_does() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    // A port nothing listens on: bound then released.
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().to_string()
    };
    let list = format!("{dead},{}", broker.addr);
    let created = Command::new(binary("syncline"))
        .args(["--broker", &list, "topic", "create", "boot"])
        .output()
        .unwrap();
    assert!(created.status.success(), "{}", stderr(&created));
    let listed = Command::new(binary("syncline"))
        .env("SYNCLINE_BROKER", &list)
        .args(["topic", "list"])
        .output()
        .unwrap();
    assert_eq!(stdout(&listed), "boot\n", "{}", stderr(&listed));

    let none = Command::new(binary("syncline"))
        .args(["--broker", &format!("{dead},{dead}"), "topic", "list"])
        .output()
        .unwrap();
    assert_one_line_error(&none, "none of the 2 bootstrap addresses answered");
    assert!(stderr(&none).contains(&format!("{dead},{dead}")));
    assert!(broker.stop());
}
