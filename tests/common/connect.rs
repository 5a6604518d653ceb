//! The connector runtime (`syncline-connect`) as a child process, and readers of the topics it
//! writes.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use syncline_proto::v1::broker_client::BrokerClient;
use tonic::transport::Channel;

use super::binary;
use super::pg::Postgres;

/// A running `syncline-connect --config FILE --broker ADDR`.
pub struct ConnectProcess {
    pub child: Child,
    pub config: PathBuf,
    log: Arc<Mutex<Vec<String>>>,
}

impl ConnectProcess {
    /// Writes `config` to `dir/connectors.toml` and starts the runtime on it.
    pub fn start(dir: &Path, config: &str, broker: &str) -> ConnectProcess {
        let path = dir.join("connectors.toml");
        std::fs::write(&path, config).expect("write connectors.toml");
        let mut child = Command::new(binary("syncline-connect"))
            .arg("--config")
            .arg(&path)
            .args(["--broker", broker])
            .env("RUST_LOG", "info,syncline_connect=debug")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn syncline-connect");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        ConnectProcess {
            child,
            config: path,
            log,
        }
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits until a log line contains `text`.
    pub fn wait_for_log(&self, text: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log.lock().unwrap().iter().any(|l| l.contains(text)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("connect never logged {text:?}; it said:\n{}", self.log());
    }

    /// SIGKILL.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait; the exit status's success.
    pub fn stop(&mut self) -> bool {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        self.child.wait().map(|s| s.success()).unwrap_or(false)
    }
}

impl Drop for ConnectProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One record of a CDC topic.
#[derive(Debug, Clone)]
pub struct CdcRecord {
    pub partition: u32,
    pub offset: u64,
    pub key: String,
    /// `None`: a tombstone.
    pub value: Option<Value>,
    /// The `syncline.cdc.position` header: (commit LSN, LSN).
    pub position: Option<(u64, u64)>,
}

/// Every record of every partition of `topic`, in partition then offset order.
pub async fn read_cdc(client: &mut BrokerClient<Channel>, topic: &str) -> Vec<CdcRecord> {
    let partitions = client
        .describe_topic(syncline_proto::v1::DescribeTopicRequest { name: topic.into() })
        .await
        .map(|r| {
            r.into_inner()
                .topic
                .map_or(0, |t| t.partitions.len() as u32)
        })
        .unwrap_or(0);
    let mut out = Vec::new();
    for partition in 0..partitions {
        for record in super::read_records(client, topic, partition).await {
            let position = record
                .headers
                .iter()
                .find(|h| h.key == "syncline.cdc.position")
                .map(|h| {
                    let commit = u64::from_be_bytes(h.value[..8].try_into().unwrap());
                    let lsn = u64::from_be_bytes(h.value[8..16].try_into().unwrap());
                    (commit, lsn)
                });
            out.push(CdcRecord {
                partition,
                offset: record.offset,
                key: String::from_utf8(record.key.unwrap_or_default().to_vec()).unwrap(),
                value: record
                    .value
                    .map(|v| serde_json::from_slice(&v).expect("a JSON value")),
                position,
            });
        }
    }
    out
}

/// The table a CDC topic compacts to: key → the latest `after` (deleted keys absent).
pub fn fold(records: &[CdcRecord]) -> BTreeMap<String, Value> {
    let mut table = BTreeMap::new();
    for record in records {
        match &record.value {
            None => {
                table.remove(&record.key);
            }
            Some(envelope) => match envelope["op"].as_str() {
                Some("d") => {
                    table.remove(&record.key);
                }
                _ => {
                    table.insert(record.key.clone(), envelope["after"].clone());
                }
            },
        }
    }
    table
}

/// `{"id":N}` → the row as JSON, of `table` in `database` (tables keyed by `id`).
pub fn rows_of(postgres: &Postgres, database: &str, table: &str) -> BTreeMap<String, Value> {
    postgres
        .psql_in(
            database,
            &format!(
                "SELECT json_build_object('id', id)::text || E'\\t' || row_to_json(t)::text \
                 FROM {table} t ORDER BY id"
            ),
        )
        .unwrap()
        .lines()
        .filter(|l| !l.is_empty())
        .map(|line| {
            let (key, row) = line.split_once('\t').unwrap();
            (
                serde_json::from_str::<Value>(key).unwrap().to_string(),
                serde_json::from_str(row).unwrap(),
            )
        })
        .collect()
}

/// Runs `transactions` transactions of mixed inserts, updates and deletes on `items`. Every
/// fifth also loads two rows with COPY (one WAL record, so one LSN, for both) and moves a row
/// to another primary key (a delete and an insert at one LSN).
pub fn write_load(postgres: &Postgres, first_id: i64, transactions: i64) {
    for t in 0..transactions {
        let id = first_id + t * 3;
        let extra = if t % 5 == 4 {
            format!(
                "COPY items FROM PROGRAM 'printf \"{c}\\tc{c}\\t1\\n{c2}\\tc{c2}\\t2\\n\"'; \
                 UPDATE items SET id = id + 1000000 WHERE id = {moved};",
                c = 500_000 + id,
                c2 = 500_001 + id,
                moved = id - 4,
            )
        } else {
            String::new()
        };
        postgres
            .psql(&format!(
                "BEGIN; \
                 INSERT INTO items VALUES ({id}, 'n{id}', {t}), ({a}, 'n{a}', {t}), ({b}, 'n{b}', {t}); \
                 UPDATE items SET qty = qty + 1, name = name || '+' WHERE id % 7 = {m}; \
                 DELETE FROM items WHERE id = {d}; {extra} \
                 COMMIT;",
                a = id + 1,
                b = id + 2,
                m = t % 7,
                d = id - 5,
            ))
            .unwrap();
    }
}
