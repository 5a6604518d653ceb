//! A real PostgreSQL server for integration tests (change-data-capture): `initdb` in a fresh
//! temporary directory, `postgres` on an ephemeral loopback port with `wal_level=logical`,
//! `psql` to run SQL, and stop, crash (SIGKILL) and restart on the same port and data.
//!
//! Binaries: `POSTGRES_BIN_DIR` if set, else the newest `/usr/lib/postgresql/<version>/bin`
//! (Debian's layout, which `.ci/run` installs), else the directory of `initdb` on `PATH`.
//! Without them [`Postgres::start`] fails and [`skip_unless_available`] fails the test under
//! CI and skips it, loudly, elsewhere.
//!
//! PostgreSQL refuses to run as root: as root the server and `initdb`/`pg_ctl` run as the
//! `postgres` OS user (created by Debian's package), with setuid/setgid between fork and exec,
//! so the child we hold is the postmaster itself and a signal to it reaches the server.
//! `psql` and `pg_isready` run as whoever we are (they connect over TCP with trust auth).
//!
//! The helper is synchronous: from an async test each call blocks its thread for one `psql`
//! run (tens of milliseconds); use a multi-thread runtime when something must progress
//! meanwhile.

use std::fs::OpenOptions;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};

/// How long the server has to accept connections after a start (initdb excluded): crash
/// recovery after [`Postgres::kill`] is part of it.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Starts on a fresh port are tried this often: another process may take the port between
/// our probe releasing it and the postmaster binding it.
const START_ATTEMPTS: usize = 5;
/// How long a restart keeps retrying while the processes of a killed server still hold its
/// shared memory ("pre-existing shared memory block is still in use").
const RESTART_RETRY_FOR: Duration = Duration::from_secs(10);
/// How long Drop's immediate shutdown may take before the postmaster gets SIGKILL.
const IMMEDIATE_SHUTDOWN_WAIT: Duration = Duration::from_secs(10);
/// Lines of the server log quoted in a start error.
const LOG_TAIL_LINES: usize = 40;

/// Why PostgreSQL cannot run here, or `None` if it can.
pub fn unavailable() -> Option<String> {
    match (bin_dir(), server_user()) {
        (Err(why), _) | (_, Err(why)) => Some(format!("{why:#}")),
        _ => None,
    }
}

/// Whether test `test` must be skipped because PostgreSQL is not installed: says SKIPPED on
/// stderr and returns `true` then; fails the test instead under CI (`CI` set), where
/// `.ci/run` installs it. Use: `if pg::skip_unless_available("name") { return; }`.
pub fn skip_unless_available(test: &str) -> bool {
    match unavailable() {
        None => false,
        Some(why) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "{test}: PostgreSQL is required under CI: {why}"
            );
            eprintln!("SKIPPED {test}: PostgreSQL cannot run here ({why}); .ci/run installs it");
            true
        }
    }
}

/// A PostgreSQL server of our own, on `127.0.0.1:port()`, superuser `postgres` with trust
/// auth. Dropping it shuts the server down (immediate) and removes its directory.
pub struct Postgres {
    bin: PathBuf,
    /// `Some((uid, gid))` of the `postgres` OS user when we are root.
    user: Option<(u32, u32)>,
    port: u16,
    /// Holds `data/` (the cluster), the server's unix socket and `postgres.log`.
    dir: tempfile::TempDir,
    /// The postmaster, while it runs.
    postmaster: Option<Child>,
}

impl Postgres {
    /// `initdb`, then starts the server on a free loopback port and waits until it accepts
    /// connections.
    pub fn start() -> anyhow::Result<Postgres> {
        let bin = bin_dir()?;
        let user = server_user()?;
        let dir = tempfile::Builder::new()
            .prefix("syncline-pg-")
            .tempdir()
            .context("create the PostgreSQL temp dir")?;
        if let Some((uid, gid)) = user {
            // The server user must write here (tempfile makes it 0700, owned by root).
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .with_context(|| format!("chown {} to postgres", dir.path().display()))?;
        }
        let mut server = Postgres {
            bin,
            user,
            port: 0,
            dir,
            postmaster: None,
        };
        server.initdb()?;
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            server.port = free_port()?;
            match server.spawn_and_wait() {
                Ok(()) => return Ok(server),
                // Only a lost race for the port is worth another port.
                Err(error) if format!("{error:#}").contains("could not bind") => {
                    last_error = Some(error)
                }
                Err(error) => return Err(error),
            }
        }
        Err(last_error.expect("at least one attempt"))
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        self.database_url("postgres")
    }

    /// The URL of database `database` on this server.
    pub fn database_url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The data directory (the cluster `initdb` made).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The server's log (stdout and stderr of every start, appended).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// Runs `sql` in database `postgres` with psql (unaligned, tuples only, stopping at the
    /// first error) and returns its output, trimmed.
    pub fn psql(&self, sql: &str) -> anyhow::Result<String> {
        self.psql_in("postgres", sql)
    }

    /// [`Postgres::psql`] in database `database`.
    pub fn psql_in(&self, database: &str, sql: &str) -> anyhow::Result<String> {
        let output = Command::new(self.bin.join("psql"))
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
            ])
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                database,
            ])
            .args(["-c", sql])
            // A server that hangs must fail the test, not hang it.
            .env("PGCONNECT_TIMEOUT", "10")
            .stdin(Stdio::null())
            .output()
            .context("run psql")?;
        if !output.status.success() {
            bail!(
                "psql -c {sql:?} on {database}: {}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
    }

    /// `CREATE DATABASE name`; returns its URL.
    pub fn create_database(&self, name: &str) -> anyhow::Result<String> {
        let quoted = name.replace('"', "\"\"");
        self.psql(&format!("CREATE DATABASE \"{quoted}\""))?;
        Ok(self.database_url(name))
    }

    /// Whether the postmaster is running (was started and is neither stopped nor killed).
    pub fn is_running(&mut self) -> bool {
        match self.postmaster.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Fast shutdown (`pg_ctl stop -m fast`: sessions are cut, a checkpoint is written);
    /// waits until the server has exited.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        let Some(mut postmaster) = self.postmaster.take() else {
            return Ok(());
        };
        let output = self
            .as_server_user(Command::new(self.bin.join("pg_ctl")))
            .arg("stop")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-m", "fast", "-w", "-t", "30"])
            .output()
            .context("run pg_ctl stop")?;
        if !output.status.success() {
            let _ = postmaster.kill();
            let _ = postmaster.wait();
            bail!(
                "pg_ctl stop -m fast: {}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        postmaster.wait().context("wait for the postmaster")?;
        Ok(())
    }

    /// A crash: SIGKILL to the postmaster and to every process it had forked, so nothing is
    /// flushed or shut down; the next start runs crash recovery from the WAL.
    pub fn kill(&mut self) {
        let Some(mut postmaster) = self.postmaster.take() else {
            return;
        };
        let pid = postmaster.id();
        // Read before the postmaster dies: its children are reparented then.
        let children = child_pids(pid);
        let _ = postmaster.kill();
        for child in children {
            // SAFETY: kill(2) on a pid that was a child of our postmaster a moment ago.
            unsafe {
                libc::kill(child as libc::pid_t, libc::SIGKILL);
            }
        }
        let _ = postmaster.wait();
    }

    /// Starts the server again on the same port and data directory (stopping it fast first
    /// if it runs) and waits until it accepts connections.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        if self.is_running() {
            self.stop()?;
        }
        let deadline = Instant::now() + RESTART_RETRY_FOR;
        loop {
            match self.spawn_and_wait() {
                Ok(()) => return Ok(()),
                // A process of the killed server that has not exited yet still holds the
                // old shared memory; the postmaster refuses to start until it lets go.
                Err(error)
                    if format!("{error:#}").contains("is still in use")
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(error) => return Err(error),
            }
        }
    }

    fn initdb(&self) -> anyhow::Result<()> {
        let output = self
            .as_server_user(Command::new(self.bin.join("initdb")))
            .arg("-D")
            .arg(self.data_dir())
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-locale",
            ])
            // Only for speed: a test cluster need not survive a power cut.
            .arg("--no-sync")
            .output()
            .context("run initdb")?;
        if !output.status.success() {
            bail!(
                "initdb: {}: {}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout).trim(),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(())
    }

    /// Spawns the postmaster on `self.port` and waits until it accepts connections; on
    /// failure the error quotes the end of the server log.
    fn spawn_and_wait(&mut self) -> anyhow::Result<()> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .context("open postgres.log")?;
        let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        let socket_dir = self.dir.path().display().to_string();
        let mut command = self.as_server_user(Command::new(self.bin.join("postgres")));
        command
            .arg("-D")
            .arg(self.data_dir())
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", &format!("unix_socket_directories={socket_dir}")])
            // Logical decoding, for change-data-capture: a replication slot per connector
            // and test, with room to spare.
            .args(["-c", "wal_level=logical"])
            .args(["-c", "max_wal_senders=20"])
            .args(["-c", "max_replication_slots=20"])
            // Only to keep the tests fast: no fsync and no torn-page protection. A killed
            // server still loses nothing it acknowledged (its writes are in the page cache);
            // only a machine crash would. Never a production setting. synchronous_commit
            // stays on: off, a commit is acknowledged before its WAL is written, so kill()
            // could lose the last acknowledged transactions, and with fsync off it saves
            // next to nothing.
            .args(["-c", "fsync=off"])
            .args(["-c", "full_page_writes=off"])
            .args(["-c", "shared_buffers=32MB"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("clone the log handle")?)
            .stderr(log);
        let child = command.spawn().context("spawn postgres")?;
        self.postmaster = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let exited = match self.postmaster.as_mut().map(Child::try_wait) {
                Some(Ok(None)) => None,
                Some(Ok(Some(status))) => Some(status.to_string()),
                Some(Err(error)) => Some(error.to_string()),
                None => Some("gone".to_string()),
            };
            if let Some(status) = exited {
                self.postmaster = None;
                bail!(
                    "postgres on port {} exited ({status}) before accepting connections; \
                     its log ends:\n{}",
                    self.port,
                    self.log_tail(log_start)
                );
            }
            if self.is_ready() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill();
                bail!(
                    "postgres on port {} did not accept connections within {READY_TIMEOUT:?}; \
                     its log ends:\n{}",
                    self.port,
                    self.log_tail(log_start)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn is_ready(&self) -> bool {
        Command::new(self.bin.join("pg_isready"))
            .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "postgres", "-d", "postgres", "-t", "1"])
            .stdin(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    }

    /// The last lines the server logged since byte `from` of its log.
    fn log_tail(&self, from: u64) -> String {
        let text = std::fs::read(self.log_path()).unwrap_or_default();
        let start = usize::try_from(from).unwrap_or(0).min(text.len());
        let text = String::from_utf8_lossy(&text[start..]);
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    }

    /// `command`, run as the `postgres` OS user when we are root, from the temp dir (a
    /// working directory it can enter).
    fn as_server_user(&self, mut command: Command) -> Command {
        if let Some((uid, gid)) = self.user {
            // std drops the supplementary groups too when it changes the uid.
            command.uid(uid).gid(gid);
        }
        command.current_dir(self.dir.path());
        command
    }
}

impl Drop for Postgres {
    /// Immediate shutdown (SIGQUIT: no checkpoint, but the shared memory is released), and
    /// SIGKILL if that takes too long; then the directory goes with `dir`.
    fn drop(&mut self) {
        let Some(postmaster) = self.postmaster.as_mut() else {
            return;
        };
        // SAFETY: kill(2) on our own child's pid (not yet waited for, so not reused).
        unsafe {
            libc::kill(postmaster.id() as libc::pid_t, libc::SIGQUIT);
        }
        let deadline = Instant::now() + IMMEDIATE_SHUTDOWN_WAIT;
        while Instant::now() < deadline {
            if !matches!(postmaster.try_wait(), Ok(None)) {
                self.postmaster = None;
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
    }
}

/// The directory of the PostgreSQL binaries: `POSTGRES_BIN_DIR`, else the newest
/// `/usr/lib/postgresql/<version>/bin` with an `initdb`, else that of `initdb` on `PATH`.
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    let has_all = |dir: &Path| {
        ["initdb", "postgres", "pg_ctl", "psql", "pg_isready"]
            .iter()
            .all(|name| dir.join(name).is_file())
    };
    if let Some(dir) = std::env::var_os("POSTGRES_BIN_DIR") {
        let dir = PathBuf::from(dir);
        if !has_all(&dir) {
            bail!(
                "POSTGRES_BIN_DIR={} lacks initdb, postgres, pg_ctl, psql or pg_isready",
                dir.display()
            );
        }
        return Ok(dir);
    }
    let mut versions: Vec<(Vec<u32>, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            // "15", or "9.6" before version 10.
            let version = name
                .split('.')
                .map(str::parse)
                .collect::<Result<Vec<u32>, _>>()
                .ok()?;
            let dir = entry.path().join("bin");
            has_all(&dir).then_some((version, dir))
        })
        .collect();
    versions.sort();
    if let Some((_, dir)) = versions.pop() {
        return Ok(dir);
    }
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .find(|dir| dir.join("initdb").is_file() && has_all(dir));
    on_path.ok_or_else(|| {
        anyhow!(
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb, no initdb on \
             PATH, no POSTGRES_BIN_DIR)"
        )
    })
}

/// `Some((uid, gid))` of the `postgres` OS user when we are root (the server refuses to run
/// as root), `None` when we are not.
fn server_user() -> anyhow::Result<Option<(u32, u32)>> {
    // SAFETY: geteuid(2) cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let name = c"postgres";
    let mut buffer = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: a zeroed passwd is a valid out-parameter (pointers null, numbers 0).
    let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; getpwnam_r writes only into `entry` and
    // `buffer` (its length given), and is thread-safe unlike getpwnam.
    let code = unsafe {
        libc::getpwnam_r(
            name.as_ptr(),
            &mut entry,
            buffer.as_mut_ptr(),
            buffer.len(),
            &mut result,
        )
    };
    if code != 0 || result.is_null() {
        bail!(
            "running as root, and PostgreSQL refuses root, but there is no `postgres` OS user \
             to run it as (Debian's postgresql package creates it; or `useradd postgres`)"
        );
    }
    Ok(Some((entry.pw_uid, entry.pw_gid)))
}

/// A loopback port free a moment ago (bound to port 0, then released).
pub(crate) fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// The pids whose parent is `parent` (from `/proc/*/stat`).
fn child_pids(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            // "PID (COMM) STATE PPID ...": COMM may hold spaces and parentheses, so read
            // after the last ')'.
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    let rest = &stat[stat.rfind(')')? + 1..];
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(parent)
        })
        .collect()
}
