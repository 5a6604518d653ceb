//! Shared helpers for integration tests: start the real `syncline-broker` binary on an
//! ephemeral loopback port, find the binaries, connect a raw gRPC client.
#![allow(dead_code)]

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
        let listen: &[&str] = if extra.contains(&"--listen") {
            &[]
        } else {
            &["--listen", "127.0.0.1:0"]
        };
        let mut child = Command::new(binary("syncline-broker"))
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
