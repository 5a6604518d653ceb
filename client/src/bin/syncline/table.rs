//! `syncline put`, `get`, `history` and `delete`: a table (a topic created with
//! `--cleanup compact`) by key.
//!
//! Output contracts (also in each command's help):
//! - `put` and `delete` print the key's new version (the record's offset).
//! - `get` prints exactly the value and a newline; an absent or deleted key is a failure
//!   (exit 1, `error: ...` on stderr).
//! - `history` prints one line per version, oldest first: `VERSION<TAB>put<TAB>VALUE`, or
//!   `VERSION<TAB>delete` for a delete.
//! - With `--json` every command prints one object per line instead (see [`json_line`]).
//! - A failed compare-and-set exits 1 with `error: version conflict on key K: current version
//!   is V` (or `...: key is absent`).

use std::borrow::Cow;
use std::io::{self, Write};

use anyhow::bail;
use base64::Engine as _;
use clap::Args;
use serde::Serialize;
use syncline_client::{Client, Expect, ProducerConfig, Table, Written};

const JSON_HELP: &str = "\
With --json each line is one object: {\"key\":K,\"value\":V,\"version\":N,\"partition\":P} (get \
and history add \"timestamp\", ms since the Unix epoch). A value that is not valid UTF-8 is \
given as \"value_b64\" (standard base64) instead of \"value\"; likewise \"key_b64\". A delete has \
\"value\":null and \"deleted\":true.";

#[derive(Debug, Args)]
#[command(after_help = format!("\
Prints the key's new version (its record's offset in the key's partition). With \
--expect-version or --expect-absent the write happens only if the key is at that version (or \
absent), checked atomically by the broker; otherwise nothing is written and the command fails \
with `error: version conflict on key K: current version is V` (or `... key is absent`).

{JSON_HELP}"))]
pub struct PutArgs {
    /// The table (a topic created with --cleanup compact).
    topic: String,
    /// The key.
    key: String,
    /// The value.
    value: String,
    /// Write only if the key's latest version is V.
    #[arg(long, value_name = "V", conflicts_with = "expect_absent")]
    expect_version: Option<u64>,
    /// Write only if the key is absent (never written, or deleted).
    #[arg(long)]
    expect_absent: bool,
    /// Print a JSON object instead of the version.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
#[command(after_help = format!("\
Prints the tombstone's version. With --expect-version the delete happens only if the key is at \
that version; otherwise the command fails naming the current version.

{JSON_HELP}"))]
pub struct DeleteArgs {
    /// The table.
    topic: String,
    /// The key.
    key: String,
    /// Delete only if the key's latest version is V.
    #[arg(long, value_name = "V")]
    expect_version: Option<u64>,
    /// Print a JSON object instead of the version.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
#[command(after_help = format!("\
Prints exactly the value and a newline. A key that is absent or deleted is a failure: exit \
status 1 and `error: ...` on stderr.

{JSON_HELP}"))]
pub struct GetArgs {
    /// The table.
    topic: String,
    /// The key.
    key: String,
    /// Print a JSON object with the version and partition.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
#[command(after_help = format!("\
One line per retained version, oldest first: VERSION<TAB>put<TAB>VALUE, or VERSION<TAB>delete \
for a delete. A key never written prints nothing.

{JSON_HELP}"))]
pub struct HistoryArgs {
    /// The table.
    topic: String,
    /// The key.
    key: String,
    /// Print at most the N most recent versions.
    #[arg(long, value_name = "N", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    limit: u32,
    /// Print one JSON object per version.
    #[arg(long)]
    json: bool,
}

pub async fn put(client: &Client, args: PutArgs) -> anyhow::Result<()> {
    let expect = match (args.expect_version, args.expect_absent) {
        (Some(version), _) => Some(Expect::Version(version)),
        (None, true) => Some(Expect::Absent),
        (None, false) => None,
    };
    let written = match expect {
        Some(expect) => {
            client
                .table(&args.topic)
                .await?
                .write_if(&args.key, Some(args.value.as_bytes()), expect)
                .await?
        }
        None => {
            one_shot_table(client, &args.topic)
                .await?
                .put(&args.key, &args.value)
                .await?
        }
    };
    print_written(&args.key, Some(args.value.as_bytes()), written, args.json)
}

/// A table handle for one unconditional write: not idempotent. Its one batch would otherwise
/// be an idempotent producer's recent batch, which compaction keeps whole for a while (see
/// `topic compact`); a retry of a lone put at worst writes the same value once more.
async fn one_shot_table(client: &Client, topic: &str) -> anyhow::Result<Table> {
    let config = ProducerConfig {
        idempotent: false,
        ..ProducerConfig::default()
    };
    Ok(client.table_with(topic, config).await?)
}

pub async fn delete(client: &Client, args: DeleteArgs) -> anyhow::Result<()> {
    let written = match args.expect_version {
        Some(version) => {
            client
                .table(&args.topic)
                .await?
                .delete_if(&args.key, version)
                .await?
        }
        None => {
            one_shot_table(client, &args.topic)
                .await?
                .delete(&args.key)
                .await?
        }
    };
    print_written(&args.key, None, written, args.json)
}

pub async fn get(client: &Client, args: GetArgs) -> anyhow::Result<()> {
    let table = client.table(&args.topic).await?;
    let Some(entry) = table.get(&args.key).await? else {
        bail!(
            "key {} not found in table {}: it is absent or deleted",
            args.key,
            args.topic
        );
    };
    let mut stdout = io::stdout().lock();
    if args.json {
        let line = json_line(&JsonVersion {
            key: args.key.as_bytes(),
            value: Some(&entry.value),
            version: entry.version,
            partition: entry.partition,
            timestamp: Some(entry.timestamp),
        });
        writeln!(stdout, "{line}")?;
    } else {
        stdout.write_all(&entry.value)?;
        stdout.write_all(b"\n")?;
    }
    stdout.flush()?;
    Ok(())
}

pub async fn history(client: &Client, args: HistoryArgs) -> anyhow::Result<()> {
    let table = client.table(&args.topic).await?;
    let history = table.history(&args.key, args.limit).await?;
    let mut stdout = io::BufWriter::new(io::stdout().lock());
    for version in &history.versions {
        if args.json {
            let line = json_line(&JsonVersion {
                key: args.key.as_bytes(),
                value: version.value.as_deref(),
                version: version.version,
                partition: history.partition,
                timestamp: Some(version.timestamp),
            });
            writeln!(stdout, "{line}")?;
        } else {
            stdout.write_all(&history_text_line(
                version.version,
                version.value.as_deref(),
            ))?;
        }
    }
    stdout.flush()?;
    Ok(())
}

fn print_written(
    key: &str,
    value: Option<&[u8]>,
    written: Written,
    json: bool,
) -> anyhow::Result<()> {
    let mut stdout = io::stdout().lock();
    if json {
        let line = json_line(&JsonVersion {
            key: key.as_bytes(),
            value,
            version: written.version,
            partition: written.partition,
            timestamp: None,
        });
        writeln!(stdout, "{line}")?;
    } else {
        writeln!(stdout, "{}", written.version)?;
    }
    stdout.flush()?;
    Ok(())
}

/// One line of `history`: `VERSION\tput\tVALUE\n`, or `VERSION\tdelete\n`. The value's bytes
/// are written as they are.
pub fn history_text_line(version: u64, value: Option<&[u8]>) -> Vec<u8> {
    let mut line = version.to_string().into_bytes();
    match value {
        Some(value) => {
            line.extend_from_slice(b"\tput\t");
            line.extend_from_slice(value);
        }
        None => line.extend_from_slice(b"\tdelete"),
    }
    line.push(b'\n');
    line
}

/// One version of a key, to print as JSON.
#[derive(Debug, Clone, Copy)]
pub struct JsonVersion<'a> {
    pub key: &'a [u8],
    /// `None`: a delete.
    pub value: Option<&'a [u8]>,
    pub version: u64,
    pub partition: u32,
    pub timestamp: Option<i64>,
}

#[derive(Debug, Serialize)]
struct JsonObject<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_b64: Option<String>,
    /// `Some(None)`: `null` (a delete); `None`: left out (the bytes are in `value_b64`).
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<Option<Cow<'a, str>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value_b64: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    deleted: bool,
    version: u64,
    partition: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    timestamp: Option<i64>,
}

/// Text when the bytes are UTF-8, else base64 (standard alphabet, padded).
fn text_or_b64(bytes: &[u8]) -> Result<Cow<'_, str>, String> {
    std::str::from_utf8(bytes)
        .map(Cow::Borrowed)
        .map_err(|_| base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// The JSON object of one version: `{"key":K,"value":V,"version":N,"partition":P}` plus
/// `"timestamp"` when known; `"key_b64"` / `"value_b64"` replace `"key"` / `"value"` for bytes
/// that are not UTF-8; a delete has `"value":null,"deleted":true`.
pub fn json_line(version: &JsonVersion<'_>) -> String {
    let (key, key_b64) = match text_or_b64(version.key) {
        Ok(text) => (Some(text), None),
        Err(encoded) => (None, Some(encoded)),
    };
    let (value, value_b64) = match version.value.map(text_or_b64) {
        None => (Some(None), None),
        Some(Ok(text)) => (Some(Some(text)), None),
        Some(Err(encoded)) => (None, Some(encoded)),
    };
    let object = JsonObject {
        key,
        key_b64,
        value,
        value_b64,
        deleted: version.value.is_none(),
        version: version.version,
        partition: version.partition,
        timestamp: version.timestamp,
    };
    // Serializing strings, numbers and nulls cannot fail.
    serde_json::to_string(&object).unwrap_or_else(|error| format!("{{\"error\":\"{error}\"}}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version<'a>(key: &'a [u8], value: Option<&'a [u8]>) -> JsonVersion<'a> {
        JsonVersion {
            key,
            value,
            version: 42,
            partition: 3,
            timestamp: None,
        }
    }

    #[test]
    fn json_should_give_utf8_values_as_value() {
        assert_eq!(
            json_line(&version(b"user-1", Some(b"h\xc3\xa9 \"q\""))),
            r#"{"key":"user-1","value":"hé \"q\"","version":42,"partition":3}"#
        );
        let with_timestamp = JsonVersion {
            timestamp: Some(1_700_000_000_123),
            ..version(b"k", Some(b""))
        };
        assert_eq!(
            json_line(&with_timestamp),
            r#"{"key":"k","value":"","version":42,"partition":3,"timestamp":1700000000123}"#
        );
    }

    #[test]
    fn json_should_give_other_bytes_as_value_b64_instead_of_value() {
        let line = json_line(&version(b"k", Some(&[0xff, 0x00, 0x01])));
        assert_eq!(
            line,
            r#"{"key":"k","value_b64":"/wAB","version":42,"partition":3}"#
        );
        let parsed: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert!(parsed.get("value").is_none());
        let binary_key = json_line(&version(&[0xc3, 0x28], Some(b"v")));
        assert_eq!(
            binary_key,
            r#"{"key_b64":"wyg=","value":"v","version":42,"partition":3}"#
        );
    }

    #[test]
    fn json_should_mark_a_delete_with_a_null_value() {
        assert_eq!(
            json_line(&version(b"k", None)),
            r#"{"key":"k","value":null,"deleted":true,"version":42,"partition":3}"#
        );
    }

    #[test]
    fn history_lines_should_tell_puts_from_deletes() {
        assert_eq!(history_text_line(7, Some(b"a\tb")), b"7\tput\ta\tb\n");
        assert_eq!(history_text_line(8, Some(b"")), b"8\tput\t\n");
        assert_eq!(history_text_line(9, None), b"9\tdelete\n");
    }
}
