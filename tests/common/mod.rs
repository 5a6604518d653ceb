//! Shared helpers for integration tests: start the real `syncline-broker` binary on an
//! ephemeral loopback port, find the binaries, connect a raw gRPC client; real PostgreSQL
//! and Redis servers (`pg`, `redis`) for the change-data-capture tests.
#![allow(dead_code)]

pub mod cluster;
pub mod connect;
pub mod faults;
pub mod gateway;
pub mod history;
pub mod linearizable;
pub mod netns;
pub mod pg;
pub mod pki;
pub mod probe;
pub mod redis;
pub mod workload;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use syncline_proto::v1::broker_client::BrokerClient;
use tonic::transport::Channel;

/// Path of a workspace binary (built by the README's test command before the tests run).
pub fn binary(name: &str) -> PathBuf {
    let mut dir = std::env::current_exe().expect("test binary path");
    dir.pop(); // the test binary
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`, part of the README's test command)",
        path.display()
    );
    path
}

/// A running broker process.
pub struct BrokerProcess {
    pub child: Child,
    pub addr: String,
    /// The Prometheus endpoint's address.
    pub metrics_addr: Option<String>,
    pub data_dir: PathBuf,
    stderr_lines: mpsc::Receiver<String>,
}

impl BrokerProcess {
    /// Starts `syncline-broker` on 127.0.0.1:0 over `data_dir` and waits until it logs the
    /// address it bound (which it does only after recovery: ready).
    pub fn start(data_dir: &Path) -> BrokerProcess {
        Self::start_with(data_dir, &[])
    }

    /// [`BrokerProcess::start`] with more flags. `--listen ADDR` among them replaces the
    /// ephemeral port (e.g. to restart on the port a first start picked).
    pub fn start_with(data_dir: &Path, extra: &[&str]) -> BrokerProcess {
        Self::start_limited(data_dir, extra, None)
    }

    /// [`BrokerProcess::start_with`] with the open-file limit (soft and hard) set to
    /// `open_files` when given.
    pub fn start_limited(
        data_dir: &Path,
        extra: &[&str],
        open_files: Option<u64>,
    ) -> BrokerProcess {
        let listen: &[&str] = if extra.contains(&"--listen") {
            &[]
        } else {
            &["--listen", "127.0.0.1:0"]
        };
        let mut command = Command::new(binary("syncline-broker"));
        if let Some(open_files) = open_files {
            use std::os::unix::process::CommandExt;
            // SAFETY: only setrlimit(2), async-signal-safe, between fork and exec.
            unsafe {
                command.pre_exec(move || {
                    let limit = libc::rlimit {
                        rlim_cur: open_files,
                        rlim_max: open_files,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let mut child = command
            .arg("--data-dir")
            .arg(data_dir)
            .args(listen)
            .args(["--metrics-listen", "127.0.0.1:0"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn syncline-broker");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut seen = Vec::new();
        let mut metrics_addr = None;
        loop {
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(line) => {
                    if let Some(rest) = line.split("metrics listening on ").nth(1) {
                        metrics_addr = rest.split_whitespace().next().map(String::from);
                    } else if let Some(rest) = line.split("listening on ").nth(1) {
                        let addr = rest
                            .split_whitespace()
                            .next()
                            .unwrap_or_default()
                            .to_string();
                        return BrokerProcess {
                            child,
                            addr,
                            metrics_addr,
                            data_dir: data_dir.to_path_buf(),
                            stderr_lines: rx,
                        };
                    }
                    seen.push(line);
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("broker did not start; it said:\n{}", seen.join("\n"));
                }
            }
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn client(&self) -> BrokerClient<Channel> {
        BrokerClient::connect(self.url())
            .await
            .expect("connect to broker")
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024)
    }

    /// SIGTERM, then wait for a clean exit; returns the exit status success.
    pub fn stop(mut self) -> bool {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let status = self.child.wait().expect("wait broker");
        status.success()
    }

    /// SIGKILL.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Log lines printed since start (non-blocking).
    pub fn drain_log(&self) -> Vec<String> {
        self.stderr_lines.try_iter().collect()
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GETs `/metrics` from `addr` and returns the body (chunked encoding undone).
pub fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let body = response
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    // Chunked transfer encoding: drop the chunk-size lines.
    if response
        .to_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body.as_str();
        while let Some((size, tail)) = rest.split_once("\r\n") {
            let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if size == 0 {
                break;
            }
            out.push_str(&tail[..size]);
            rest = &tail[size + 2..];
        }
        return out;
    }
    body
}

/// How many partitions the broker reports fenced (`syncline_partition_fenced`).
pub fn fenced_partitions(broker: &BrokerProcess) -> usize {
    let addr = broker.metrics_addr.as_deref().expect("metrics address");
    scrape(addr)
        .lines()
        .filter(|line| line.starts_with("syncline_partition_fenced{") && line.ends_with(" 1"))
        .count()
}

/// Runs `syncline-broker --data-dir DATA_DIR ARGS...` to its end (for starts that must fail)
/// and returns its output.
pub fn run_broker(data_dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(binary("syncline-broker"))
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .output()
        .expect("run syncline-broker")
}

/// Every durable record of a partition (decoded by the broker), fetching from offset 0 up to
/// the high watermark.
pub async fn read_records(
    client: &mut BrokerClient<Channel>,
    topic: &str,
    partition: u32,
) -> Vec<syncline_proto::v1::FetchedRecord> {
    let mut records = Vec::new();
    let mut offset = 0;
    loop {
        let response = client
            .fetch(syncline_proto::v1::FetchRequest {
                topic: topic.into(),
                partition,
                offset,
                decode_records: true,
                ..Default::default()
            })
            .await
            .unwrap_or_else(|s| panic!("fetch {topic}/{partition} at {offset}: {s:?}"))
            .into_inner();
        records.extend(response.records);
        if response.next_offset >= response.high_watermark || response.next_offset == offset {
            return records;
        }
        offset = response.next_offset;
    }
}

/// Copies a fixture into a fresh directory (the broker writes to its data dir; the fixture
/// stays as the old version left it).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// `tests/fixtures/NAME`.
pub fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The value of the unlabelled sample `name` in a `/metrics` scrape.
pub fn gauge(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
}

/// The sum of the unlabelled sample `name` over the running nodes of `cluster`.
pub fn cluster_sum(cluster: &mut cluster::Cluster, name: &str) -> f64 {
    cluster
        .running()
        .into_iter()
        .filter_map(|id| cluster.node(id).metrics_address().map(scrape))
        .filter_map(|text| gauge(&text, name))
        .sum()
}

/// Lints the exposition text with promtool (Debian's `prometheus` package; .ci/run installs it).
pub fn promtool_check(text: &str) {
    match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        Ok(mut child) => {
            std::io::Write::write_all(&mut child.stdin.take().unwrap(), text.as_bytes()).unwrap();
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
