//! `syncline watch TOPIC [--json]`: follows a table with a [`SyncTable`] and prints it once
//! caught up, then every change as it happens (see [`WATCH_HELP`] for the exact lines).

use std::collections::BTreeMap;
use std::io::{self, Write};

use bytes::Bytes;
use clap::Args;
use serde::Serialize;
use syncline_client::{Change, Client, Entry, Error, SyncTable};

use crate::output::optional_text;

pub const WATCH_HELP: &str = "\
Loads the whole table, prints every key once it has caught up (with the durable offsets seen \
at start), then a line saying so, then each change as it happens, until interrupted (Ctrl-C or \
SIGTERM: exit status 0). It survives broker restarts (it reconnects and resumes where it \
stopped; stderr says `reconnecting... (ERROR)` once while the broker is unreachable and \
`reconnected` when it is back) and compaction (it reloads the partition and prints the differences).

Plain output, one line each, keys sorted, key and value bytes as they are:
  KEY<TAB>VALUE                 every key once caught up
  # caught up: N keys
  put KEY<TAB>VALUE<TAB>VERSION   a change
  delete KEY<TAB>VERSION          a delete

With --json each line is one object:
  {\"key\":K,\"value\":V,\"version\":N,\"partition\":P}
  {\"caught_up\":true,\"keys\":N}
  {\"op\":\"put\",\"key\":K,\"value\":V,\"version\":N,\"previous_version\":M,\"partition\":P}
  {\"op\":\"delete\",\"key\":K,\"value\":null,\"version\":N,\"previous_version\":M,\"partition\":P}
previous_version is null for a key that was absent. Keys and values are UTF-8 strings; bytes that \
are not valid UTF-8 are base64 and the object then also has \"key_encoding\":\"base64\" or \
\"value_encoding\":\"base64\", as in `consume --json`. A VERSION is the record's offset in its \
partition; a delete found by reloading a compacted partition carries the last offset the reload \
covers.";

#[derive(Debug, Args)]
#[command(after_help = WATCH_HELP)]
pub struct WatchArgs {
    /// The table (a topic created with --cleanup compact).
    topic: String,
    /// Print one JSON object per line.
    #[arg(long)]
    json: bool,
}

/// One key of the table as a JSON line.
#[derive(Debug, Serialize)]
struct JsonEntry<'a> {
    key: Option<std::borrow::Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_encoding: Option<&'static str>,
    value: Option<std::borrow::Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value_encoding: Option<&'static str>,
    version: u64,
    partition: u32,
}

/// One change as a JSON line.
#[derive(Debug, Serialize)]
struct JsonChange<'a> {
    op: &'static str,
    key: Option<std::borrow::Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_encoding: Option<&'static str>,
    value: Option<std::borrow::Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value_encoding: Option<&'static str>,
    version: u64,
    previous_version: Option<u64>,
    partition: u32,
}

fn to_json(value: &impl Serialize) -> String {
    // Serializing strings, numbers and nulls cannot fail.
    serde_json::to_string(value).unwrap_or_else(|error| format!("{{\"error\":\"{error}\"}}"))
}

/// The line for one key of the loaded table.
pub fn entry_line(key: &[u8], entry: &Entry, json: bool) -> Vec<u8> {
    if json {
        let (key, key_encoding) = optional_text(Some(key));
        let (value, value_encoding) = optional_text(Some(&entry.value));
        let mut line = to_json(&JsonEntry {
            key,
            key_encoding,
            value,
            value_encoding,
            version: entry.version,
            partition: entry.partition,
        })
        .into_bytes();
        line.push(b'\n');
        return line;
    }
    let mut line = key.to_vec();
    line.push(b'\t');
    line.extend_from_slice(&entry.value);
    line.push(b'\n');
    line
}

/// The line saying the table has caught up.
pub fn caught_up_line(keys: usize, json: bool) -> String {
    if json {
        format!("{{\"caught_up\":true,\"keys\":{keys}}}\n")
    } else {
        format!("# caught up: {keys} keys\n")
    }
}

/// The line for one change.
pub fn change_line(change: &Change, json: bool) -> Vec<u8> {
    if json {
        let (key, key_encoding) = optional_text(Some(&change.key));
        let (value, value_encoding) = optional_text(change.value.as_deref());
        let mut line = to_json(&JsonChange {
            op: if change.value.is_some() {
                "put"
            } else {
                "delete"
            },
            key,
            key_encoding,
            value,
            value_encoding,
            version: change.version,
            previous_version: change.previous_version,
            partition: change.partition,
        })
        .into_bytes();
        line.push(b'\n');
        return line;
    }
    let mut line = Vec::new();
    match &change.value {
        Some(value) => {
            line.extend_from_slice(b"put ");
            line.extend_from_slice(&change.key);
            line.push(b'\t');
            line.extend_from_slice(value);
        }
        None => {
            line.extend_from_slice(b"delete ");
            line.extend_from_slice(&change.key);
        }
    }
    line.extend_from_slice(format!("\t{}\n", change.version).as_bytes());
    line
}

/// The changes that turn `shown` into `entries`: for a receiver that fell behind and
/// re-read the table. A delete carries the last offset the table has applied in its partition.
fn differences(
    shown: &BTreeMap<Bytes, Entry>,
    entries: &BTreeMap<Bytes, Entry>,
    table: &SyncTable,
) -> Vec<Change> {
    let mut changes = Vec::new();
    for (key, entry) in entries {
        let previous = shown.get(key).map(|shown| shown.version);
        if previous != Some(entry.version) {
            changes.push(Change {
                key: key.clone(),
                partition: entry.partition,
                version: entry.version,
                value: Some(entry.value.clone()),
                previous_version: previous,
                from_snapshot: true,
            });
        }
    }
    for (key, entry) in shown {
        if !entries.contains_key(key) {
            let applied = table
                .next_offset(entry.partition)
                .map_or(entry.version, |next| next.saturating_sub(1));
            changes.push(Change {
                key: key.clone(),
                partition: entry.partition,
                version: applied.max(entry.version),
                value: None,
                previous_version: Some(entry.version),
                from_snapshot: true,
            });
        }
    }
    changes
}

fn write_line(stdout: &mut impl Write, line: &[u8]) -> io::Result<()> {
    stdout.write_all(line)?;
    stdout.flush()
}

pub async fn watch(client: &Client, args: WatchArgs) -> anyhow::Result<()> {
    let table = client.sync_table(&args.topic).await?;
    let interrupted = interrupted();
    tokio::pin!(interrupted);
    tokio::select! {
        caught_up = table.wait_caught_up() => caught_up?,
        () = &mut interrupted => return Ok(()),
    }
    let (mut shown, mut changes) = table.entries_and_changes();
    let mut stdout = io::stdout().lock();
    for (key, entry) in &shown {
        stdout.write_all(&entry_line(key, entry, args.json))?;
    }
    write_line(
        &mut stdout,
        caught_up_line(shown.len(), args.json).as_bytes(),
    )?;
    loop {
        let change = tokio::select! {
            change = changes.recv() => change,
            () = &mut interrupted => return Ok(()),
        };
        let batch = match change {
            Ok(change) => vec![change],
            Err(Error::ChangesLagged { missed }) => {
                tracing::warn!(missed, "fell behind the table's changes; re-reading it");
                let (entries, fresh) = table.entries_and_changes();
                let batch = differences(&shown, &entries, &table);
                changes = fresh;
                batch
            }
            Err(error) => return Err(error.into()),
        };
        for change in batch {
            match &change.value {
                Some(value) => {
                    shown.insert(
                        change.key.clone(),
                        Entry {
                            partition: change.partition,
                            version: change.version,
                            value: value.clone(),
                            timestamp: 0,
                            headers: Vec::new(),
                        },
                    );
                }
                None => {
                    shown.remove(&change.key);
                }
            }
            write_line(&mut stdout, &change_line(&change, args.json))?;
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM.
async fn interrupted() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(value: &'static [u8]) -> Entry {
        Entry {
            partition: 1,
            version: 7,
            value: Bytes::from_static(value),
            timestamp: 0,
            headers: Vec::new(),
        }
    }

    fn change(value: Option<&'static [u8]>, previous_version: Option<u64>) -> Change {
        Change {
            key: Bytes::from_static(b"k"),
            partition: 2,
            version: 9,
            value: value.map(Bytes::from_static),
            previous_version,
            from_snapshot: false,
        }
    }

    #[test]
    fn plain_lines_should_match_the_documented_format() {
        assert_eq!(entry_line(b"k", &entry(b"v"), false), b"k\tv\n");
        assert_eq!(caught_up_line(3, false), "# caught up: 3 keys\n");
        assert_eq!(
            change_line(&change(Some(b"v"), None), false),
            b"put k\tv\t9\n"
        );
        assert_eq!(change_line(&change(None, Some(7)), false), b"delete k\t9\n");
    }

    #[test]
    fn json_lines_should_match_the_documented_format() {
        assert_eq!(
            entry_line(b"k", &entry(b"v"), true),
            b"{\"key\":\"k\",\"value\":\"v\",\"version\":7,\"partition\":1}\n"
        );
        assert_eq!(caught_up_line(3, true), "{\"caught_up\":true,\"keys\":3}\n");
        assert_eq!(
            String::from_utf8(change_line(&change(Some(b"v"), None), true)).unwrap(),
            "{\"op\":\"put\",\"key\":\"k\",\"value\":\"v\",\"version\":9,\
             \"previous_version\":null,\"partition\":2}\n"
        );
        assert_eq!(
            String::from_utf8(change_line(&change(None, Some(7)), true)).unwrap(),
            "{\"op\":\"delete\",\"key\":\"k\",\"value\":null,\"version\":9,\
             \"previous_version\":7,\"partition\":2}\n"
        );
    }

    #[test]
    fn json_should_base64_bytes_that_are_not_utf8_like_consume() {
        let line =
            String::from_utf8(entry_line(&[0xff, 0x00], &entry(&[0xc3, 0x28]), true)).unwrap();
        assert_eq!(
            line,
            "{\"key\":\"/wA=\",\"key_encoding\":\"base64\",\"value\":\"wyg=\",\
             \"value_encoding\":\"base64\",\"version\":7,\"partition\":1}\n"
        );
    }
}
