//! A real Redis server for integration tests (change-data-capture): `redis-server` on an
//! ephemeral loopback port, without persistence, in a fresh temporary directory; `redis-cli`
//! to talk to it.
//!
//! Binaries: `redis-server` and `redis-cli` on `PATH` (Debian's redis-server and
//! redis-tools, which `.ci/run` installs). Without them [`Redis::start`] fails and
//! [`skip_unless_available`] fails the test under CI and skips it, loudly, elsewhere.
//! Synchronous, like [`super::pg`].

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};

/// How long the server has to answer PING after a start.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Starts on a fresh port are tried this often: another process may take the port between
/// our probe releasing it and the server binding it.
const START_ATTEMPTS: usize = 5;
/// Lines of the server log quoted in a start error.
const LOG_TAIL_LINES: usize = 40;

/// Why Redis cannot run here, or `None` if it can.
pub fn unavailable() -> Option<String> {
    binaries().err().map(|why| format!("{why:#}"))
}

/// Whether test `test` must be skipped because Redis is not installed: says SKIPPED on
/// stderr and returns `true` then; fails the test instead under CI (`CI` set), where
/// `.ci/run` installs it. Use: `if redis::skip_unless_available("name") { return; }`.
pub fn skip_unless_available(test: &str) -> bool {
    match unavailable() {
        None => false,
        Some(why) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "{test}: Redis is required under CI: {why}"
            );
            eprintln!("SKIPPED {test}: Redis cannot run here ({why}); .ci/run installs it");
            true
        }
    }
}

/// A Redis server of our own on `127.0.0.1:port()`, killed (and its directory removed) when
/// dropped.
pub struct Redis {
    cli: PathBuf,
    port: u16,
    /// The server's working directory (`--dir`) and `redis.log`; removed on drop.
    _dir: tempfile::TempDir,
    server: Child,
}

impl Redis {
    /// Starts `redis-server` on a free loopback port and waits until it answers PING.
    pub fn start() -> anyhow::Result<Redis> {
        let (server_binary, cli) = binaries()?;
        let dir = tempfile::Builder::new()
            .prefix("syncline-redis-")
            .tempdir()
            .context("create the Redis temp dir")?;
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            let port = super::pg::free_port()?;
            match spawn_and_wait(&server_binary, &cli, dir.path(), port) {
                Ok(server) => {
                    return Ok(Redis {
                        cli,
                        port,
                        _dir: dir,
                        server,
                    })
                }
                // Only a lost race for the port is worth another port.
                Err(error) if format!("{error:#}").contains("Address already in use") => {
                    last_error = Some(error)
                }
                Err(error) => return Err(error),
            }
        }
        Err(last_error.expect("at least one attempt"))
    }

    /// `redis://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Runs `redis-cli --raw ARGS` against this server and returns its output, trimmed.
    /// redis-cli exits 0 on a server error reply; that comes back as the `ERR ...` text.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        run_cli(&self.cli, self.port, args)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

/// Spawns `redis-server` on `port`, working in `dir`, and waits until it answers PING; kills
/// it on failure, with an error that quotes the end of its log.
fn spawn_and_wait(
    server_binary: &Path,
    cli: &Path,
    dir: &Path,
    port: u16,
) -> anyhow::Result<Child> {
    let log_path = dir.join("redis.log");
    let log = File::create(&log_path).context("create redis.log")?;
    let mut server = Command::new(server_binary)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        // No snapshots and no append-only file: nothing a test needs outlives the server.
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .args(["--daemonize", "no"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("clone the log handle")?)
        .stderr(log)
        .spawn()
        .context("spawn redis-server")?;
    let deadline = Instant::now() + READY_TIMEOUT;
    let failure = loop {
        if let Ok(Some(status)) = server.try_wait() {
            break format!("exited ({status}) before answering PING");
        }
        if run_cli(cli, port, &["ping"]).is_ok_and(|answer| answer == "PONG") {
            return Ok(server);
        }
        if Instant::now() >= deadline {
            break format!("did not answer PING within {READY_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = server.kill();
    let _ = server.wait();
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    bail!(
        "redis-server on port {port} {failure}; its log ends:\n{}",
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    )
}

fn run_cli(cli: &Path, port: u16, args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new(cli)
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "--raw"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("run redis-cli")?;
    if !output.status.success() {
        bail!(
            "redis-cli {args:?}: {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}

/// `redis-server` and `redis-cli` from `PATH`.
fn binaries() -> anyhow::Result<(PathBuf, PathBuf)> {
    let find = |name: &str| {
        std::env::var_os("PATH")
            .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
            .unwrap_or_default()
            .into_iter()
            .map(|dir| dir.join(name))
            .find(|path| path.is_file())
            .ok_or_else(|| anyhow!("{name} is not installed (not on PATH)"))
    };
    Ok((find("redis-server")?, find("redis-cli")?))
}
