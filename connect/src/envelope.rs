//! What a change looks like in Syncline: the record key, the JSON envelope (Debezium's shape,
//! so existing tools read it) and the position header.
//!
//! # Record
//!
//! - **Key**: the JSON object of the row's primary-key columns in column order, compact:
//!   `{"id":1}`, `{"tenant":"a","id":7}`. Every change of a row has the same key, so the
//!   topic is a table: it compacts to the current rows.
//! - **Value**: the envelope below. A delete writes the envelope with `op = "d"` and then a
//!   tombstone (no value) under the same key, so compaction removes the row.
//! - **Header** `syncline.cdc.position`: 16 bytes, the transaction's commit LSN then the change's
//!   own LSN, both big-endian `u64`. Snapshot rows carry the slot's consistent point and 0. A
//!   source that restarts reads the last record of each partition it writes and skips every
//!   change at or before that position, so a change already stored is not stored twice.
//!
//! # Envelope
//!
//! ```json
//! {"before": null,
//!  "after": {"id": 1, "name": "pen", "qty": 5},
//!  "source": {"version": "0.1.0", "connector": "postgresql", "name": "shop",
//!             "ts_ms": 1733318400000, "snapshot": "false", "db": "shop",
//!             "sequence": "[\"23811264\",\"23811032\"]", "schema": "public",
//!             "table": "items", "txId": 754, "lsn": 23811032, "commit_lsn": 23811264},
//!  "op": "c",
//!  "ts_ms": 1733318400012}
//! ```
//!
//! `op` is `c` (insert), `u` (update), `d` (delete) or `r` (a snapshot read). `before` is the
//! old row's key columns for updates and deletes (all its columns with `REPLICA IDENTITY FULL`).
//! A column whose large (TOASTed) value did not change is left out of an update's `after`.
//!
//! # Values
//!
//! pgoutput sends text; columns become JSON by type: `bool` → true/false; `int2`, `int4`,
//! `int8`, `oid` → numbers; `float4`, `float8` → numbers (NaN and infinities as strings);
//! `json`, `jsonb` → the JSON itself; `bytea` → base64; everything else, `numeric` included (to
//! keep its precision), → the text PostgreSQL prints.

use base64::Engine as _;
use indexmap::IndexMap;
use pg_walstream::ColumnValue;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A row: column name → JSON value, in column order.
pub type Row = IndexMap<String, Value>;

/// The header carrying a record's position.
pub const POSITION_HEADER: &str = "syncline.cdc.position";

/// The PostgreSQL type OIDs that map to other JSON than a string.
mod oid {
    pub const BOOL: u32 = 16;
    pub const BYTEA: u32 = 17;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const OID: u32 = 26;
    pub const JSON: u32 = 114;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const JSONB: u32 = 3802;
}

/// One column's value as JSON, by its type.
pub fn column_json(type_id: u32, value: &ColumnValue) -> Value {
    let bytes = match value {
        ColumnValue::Null => return Value::Null,
        ColumnValue::Binary(bytes) => {
            return Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
        }
        ColumnValue::Text(bytes) => bytes,
    };
    let text = String::from_utf8_lossy(bytes);
    match type_id {
        oid::BOOL => Value::Bool(text == "t"),
        oid::INT2 | oid::INT4 | oid::INT8 | oid::OID => match text.parse::<i64>() {
            Ok(n) => Value::from(n),
            Err(_) => Value::String(text.into_owned()),
        },
        oid::FLOAT4 | oid::FLOAT8 => match text.parse::<f64>() {
            Ok(f) if f.is_finite() => serde_json::Number::from_f64(f)
                .map(Value::Number)
                .unwrap_or_else(|| Value::String(text.into_owned())),
            _ => Value::String(text.into_owned()),
        },
        oid::JSON | oid::JSONB => {
            serde_json::from_str(&text).unwrap_or_else(|_| Value::String(text.into_owned()))
        }
        oid::BYTEA => match text.strip_prefix("\\x").map(decode_hex) {
            Some(Some(raw)) => Value::String(base64::engine::general_purpose::STANDARD.encode(raw)),
            _ => Value::String(text.into_owned()),
        },
        _ => Value::String(text.into_owned()),
    }
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The record key: `{"col":value,...}` of the key columns, in column order, compact.
pub fn key_json(row: &Row, key_columns: &[String]) -> Vec<u8> {
    let mut key = IndexMap::with_capacity(key_columns.len());
    for column in key_columns {
        key.insert(
            column.as_str(),
            row.get(column).cloned().unwrap_or(Value::Null),
        );
    }
    serde_json::to_vec(&key).unwrap_or_default()
}

/// A change's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    #[serde(rename = "c")]
    Create,
    #[serde(rename = "u")]
    Update,
    #[serde(rename = "d")]
    Delete,
    #[serde(rename = "r")]
    Read,
}

/// `source` of the envelope: where and when the change happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceInfo {
    pub version: String,
    pub connector: String,
    /// The topic prefix (Debezium's logical server name).
    pub name: String,
    /// Commit time of the transaction (the snapshot's start for reads), ms since the epoch.
    pub ts_ms: i64,
    /// `"true"` for snapshot reads, else `"false"`.
    pub snapshot: String,
    pub db: String,
    /// `["<commit_lsn>","<lsn>"]` as a JSON text, as Debezium writes it.
    pub sequence: String,
    pub schema: String,
    pub table: String,
    #[serde(rename = "txId")]
    pub tx_id: Option<u32>,
    pub lsn: u64,
    pub commit_lsn: u64,
}

/// The record value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub before: Option<Row>,
    pub after: Option<Row>,
    pub source: Option<SourceInfo>,
    pub op: Op,
    /// When the connector wrote the change, ms since the epoch.
    pub ts_ms: i64,
}

/// A commit LSN and a change's LSN: the order of changes in the source's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Position {
    pub commit_lsn: u64,
    pub lsn: u64,
}

impl Position {
    /// The header's 16 bytes.
    pub fn to_header(self) -> [u8; 16] {
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&self.commit_lsn.to_be_bytes());
        bytes[8..].copy_from_slice(&self.lsn.to_be_bytes());
        bytes
    }

    /// Reads a header value; `None` unless it is exactly 16 bytes.
    pub fn from_header(bytes: &[u8]) -> Option<Position> {
        let commit: [u8; 8] = bytes.get(..8)?.try_into().ok()?;
        let lsn: [u8; 8] = bytes.get(8..16)?.try_into().ok()?;
        (bytes.len() == 16).then_some(Position {
            commit_lsn: u64::from_be_bytes(commit),
            lsn: u64::from_be_bytes(lsn),
        })
    }
}

/// An LSN as PostgreSQL prints it (`16/B374D848`).
pub fn lsn_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

/// Parses `16/B374D848`.
#[cfg(test)]
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (high, low) = text.trim().split_once('/')?;
    let high = u64::from_str_radix(high, 16).ok()?;
    let low = u64::from_str_radix(low, 16).ok()?;
    (high <= u32::MAX as u64 && low <= u32::MAX as u64).then_some((high << 32) | low)
}

/// What a sink reads from a record value: a CDC envelope, or any JSON object taken as the row
/// itself (an upsert).
#[derive(Debug, Clone, PartialEq)]
pub struct SinkChange {
    /// `None`: delete the key (a tombstone, or an envelope with `op = "d"`).
    pub after: Option<Row>,
    pub before: Option<Row>,
}

/// Reads a record value for a sink. `Err` names what is wrong.
pub fn sink_change(value: Option<&[u8]>) -> Result<SinkChange, String> {
    let Some(value) = value else {
        return Ok(SinkChange {
            after: None,
            before: None,
        });
    };
    // A Row (an IndexMap) keeps the columns in the order the value lists them; a `Value`
    // would sort them.
    let top: Row = match serde_json::from_slice(value) {
        Ok(top) => top,
        Err(e) => {
            return Err(match serde_json::from_slice::<Value>(value) {
                Ok(_) => "value is not a JSON object".to_owned(),
                Err(_) => format!("value is not JSON: {e}"),
            })
        }
    };
    if top.contains_key("op") && (top.contains_key("after") || top.contains_key("before")) {
        let envelope: Envelope = serde_json::from_slice(value)
            .map_err(|e| format!("value is not a change envelope: {e}"))?;
        let after = match envelope.op {
            Op::Delete => None,
            _ => envelope.after,
        };
        return Ok(SinkChange {
            after,
            before: envelope.before,
        });
    }
    Ok(SinkChange {
        after: Some(top),
        before: None,
    })
}

/// The milliseconds since the Unix epoch now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use serde_json::json;

    fn text(s: &str) -> ColumnValue {
        ColumnValue::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn given_typed_columns_should_map_them_to_json() {
        assert_eq!(column_json(oid::INT4, &text("42")), json!(42));
        assert_eq!(
            column_json(oid::INT8, &text("-9000000000")),
            json!(-9_000_000_000i64)
        );
        assert_eq!(column_json(oid::BOOL, &text("t")), json!(true));
        assert_eq!(column_json(oid::FLOAT8, &text("1.5")), json!(1.5));
        assert_eq!(column_json(oid::FLOAT8, &text("NaN")), json!("NaN"));
        assert_eq!(
            column_json(oid::JSONB, &text("{\"a\": [1]}")),
            json!({"a": [1]})
        );
        assert_eq!(column_json(oid::BYTEA, &text("\\x0102ff")), json!("AQL/"));
        assert_eq!(column_json(1700, &text("12.340")), json!("12.340"));
        assert_eq!(column_json(25, &ColumnValue::Null), Value::Null);
    }

    #[test]
    fn given_key_columns_should_write_them_in_column_order() {
        let mut row = Row::new();
        row.insert("tenant".into(), json!("a"));
        row.insert("name".into(), json!("x"));
        row.insert("id".into(), json!(7));
        let key = key_json(&row, &["tenant".to_owned(), "id".to_owned()]);
        assert_eq!(key, br#"{"tenant":"a","id":7}"#);
    }

    #[test]
    fn given_positions_should_round_trip_and_order() {
        let a = Position {
            commit_lsn: 10,
            lsn: 3,
        };
        let b = Position {
            commit_lsn: 10,
            lsn: 4,
        };
        let c = Position {
            commit_lsn: 11,
            lsn: 1,
        };
        assert!(a < b && b < c);
        assert_eq!(Position::from_header(&b.to_header()), Some(b));
        assert_eq!(Position::from_header(&[0; 15]), None);
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(lsn_text(0x16_B374_D848), "16/B374D848");
    }

    #[test]
    fn given_record_values_should_read_them_as_sink_changes() {
        let delete = br#"{"before":{"id":1},"after":null,"source":null,"op":"d","ts_ms":1}"#;
        assert_eq!(sink_change(Some(delete)).expect("ok").after, None);
        let update = br#"{"before":null,"after":{"id":1,"b":2},"op":"u","ts_ms":1}"#;
        let change = sink_change(Some(update)).expect("ok");
        assert_eq!(
            change.after.expect("after").keys().collect::<Vec<_>>(),
            ["id", "b"]
        );
        let plain = br#"{"id":2,"name":"x"}"#;
        assert!(sink_change(Some(plain)).expect("ok").after.is_some());
        assert!(sink_change(None).expect("ok").after.is_none());
        assert!(sink_change(Some(b"[1]")).is_err());
        assert!(sink_change(Some(b"nope")).is_err());
    }
}
