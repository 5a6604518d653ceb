//! How `syncline` prints records and tables.

use std::borrow::Cow;
use std::io::{self, Write};

use base64::Engine as _;
use serde::Serialize;
use syncline_client::ConsumerRecord;

/// Which parts of a record a text line shows.
#[derive(Debug, Clone, Copy, Default)]
pub struct TextFormat {
    /// Prefix `OFFSET<TAB>`.
    pub print_offset: bool,
    /// Prefix `KEY<TAB>` (after the offset).
    pub print_key: bool,
}

/// Writes one record as a text line: `[OFFSET\t][KEY\t]VALUE\n`. Key and value bytes are
/// written as they are; an absent key or value (tombstone) is written as nothing.
pub fn write_text(
    out: &mut impl Write,
    record: &ConsumerRecord,
    format: TextFormat,
) -> io::Result<()> {
    if format.print_offset {
        write!(out, "{}\t", record.offset)?;
    }
    if format.print_key {
        out.write_all(record.key.as_deref().unwrap_or_default())?;
        out.write_all(b"\t")?;
    }
    out.write_all(record.value.as_deref().unwrap_or_default())?;
    out.write_all(b"\n")
}

/// One record as a JSON object; see [`write_json`].
#[derive(Debug, Serialize)]
struct JsonRecord<'a> {
    partition: u32,
    offset: u64,
    key: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_encoding: Option<&'static str>,
    value: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value_encoding: Option<&'static str>,
    timestamp: i64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    headers: Vec<JsonHeader<'a>>,
}

#[derive(Debug, Serialize)]
struct JsonHeader<'a> {
    key: &'a str,
    value: Cow<'a, str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value_encoding: Option<&'static str>,
}

/// Bytes as a JSON string: the UTF-8 text when valid, else base64 with the encoding named.
fn text_or_base64(bytes: &[u8]) -> (Cow<'_, str>, Option<&'static str>) {
    match std::str::from_utf8(bytes) {
        Ok(text) => (Cow::Borrowed(text), None),
        Err(_) => (
            Cow::Owned(base64::engine::general_purpose::STANDARD.encode(bytes)),
            Some("base64"),
        ),
    }
}

/// Optional bytes as an optional JSON string and its encoding; see [`text_or_base64`].
pub fn optional_text(bytes: Option<&[u8]>) -> (Option<Cow<'_, str>>, Option<&'static str>) {
    match bytes {
        None => (None, None),
        Some(bytes) => {
            let (text, encoding) = text_or_base64(bytes);
            (Some(text), encoding)
        }
    }
}

/// The JSON line of a record: `{"partition":P,"offset":O,"key":K,"value":V,"timestamp":T}`.
/// Key and value are UTF-8 strings, or `null` when absent; bytes that are not valid UTF-8 are
/// base64 (standard alphabet, padded) and the object then also has `"key_encoding":"base64"` /
/// `"value_encoding":"base64"`. `headers` (`[{"key":..,"value":..}]`) appears only when the
/// record has any.
pub fn json_line(record: &ConsumerRecord) -> String {
    let (key, key_encoding) = optional_text(record.key.as_deref());
    let (value, value_encoding) = optional_text(record.value.as_deref());
    let headers = record
        .headers
        .iter()
        .map(|header| {
            let (value, value_encoding) = text_or_base64(&header.value);
            JsonHeader {
                key: &header.key,
                value,
                value_encoding,
            }
        })
        .collect();
    let json = JsonRecord {
        partition: record.partition,
        offset: record.offset,
        key,
        key_encoding,
        value,
        value_encoding,
        timestamp: record.timestamp,
        headers,
    };
    // Serializing strings, numbers and nulls cannot fail.
    serde_json::to_string(&json).unwrap_or_else(|error| format!("{{\"error\":\"{error}\"}}"))
}

/// Writes one record as a JSON line.
pub fn write_json(out: &mut impl Write, record: &ConsumerRecord) -> io::Result<()> {
    out.write_all(json_line(record).as_bytes())?;
    out.write_all(b"\n")
}

/// Formats rows as columns separated by two spaces, each as wide as its widest cell; the last
/// column is not padded.
pub fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|column| {
            rows.iter()
                .filter_map(|row| row.get(column))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut text = String::new();
    for row in rows {
        let mut line = String::new();
        for (column, cell) in row.iter().enumerate() {
            if column + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}  ", width = widths[column]));
            }
        }
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use syncline_client::Header;

    use super::*;

    fn record(key: Option<&'static [u8]>, value: Option<&'static [u8]>) -> ConsumerRecord {
        ConsumerRecord {
            topic: "t".into(),
            partition: 2,
            offset: 41,
            timestamp: 1_700_000_000_123,
            key: key.map(Bytes::from_static),
            value: value.map(Bytes::from_static),
            headers: Vec::new(),
        }
    }

    fn text(record: &ConsumerRecord, print_offset: bool, print_key: bool) -> Vec<u8> {
        let mut out = Vec::new();
        write_text(
            &mut out,
            record,
            TextFormat {
                print_offset,
                print_key,
            },
        )
        .unwrap();
        out
    }

    #[test]
    fn text_lines_should_print_value_with_optional_offset_and_key_prefixes() {
        let r = record(Some(b"user-1"), Some(b"hello"));
        assert_eq!(text(&r, false, false), b"hello\n");
        assert_eq!(text(&r, false, true), b"user-1\thello\n");
        assert_eq!(text(&r, true, false), b"41\thello\n");
        assert_eq!(text(&r, true, true), b"41\tuser-1\thello\n");
        let tombstone = record(None, None);
        assert_eq!(text(&tombstone, true, true), b"41\t\t\n");
    }

    #[test]
    fn json_should_have_the_documented_keys_in_order() {
        assert_eq!(
            json_line(&record(Some(b"k"), Some(b"v \"q\""))),
            r#"{"partition":2,"offset":41,"key":"k","value":"v \"q\"","timestamp":1700000000123}"#
        );
        assert_eq!(
            json_line(&record(None, None)),
            r#"{"partition":2,"offset":41,"key":null,"value":null,"timestamp":1700000000123}"#
        );
    }

    #[test]
    fn json_should_base64_invalid_utf8_and_say_so() {
        let line = json_line(&record(Some(&[0xff, 0x00]), Some(b"ok")));
        assert_eq!(
            line,
            r#"{"partition":2,"offset":41,"key":"/wA=","key_encoding":"base64","value":"ok","timestamp":1700000000123}"#
        );
        let parsed: serde_json::Value =
            serde_json::from_str(&json_line(&record(Some(b"k"), Some(&[0xc3, 0x28])))).unwrap();
        assert_eq!(parsed["value"], "wyg=");
        assert_eq!(parsed["value_encoding"], "base64");
        assert!(parsed.get("key_encoding").is_none());
    }

    #[test]
    fn json_should_list_headers_only_when_present() {
        let mut with_headers = record(None, Some(b"v"));
        with_headers.headers.push(Header {
            key: "trace".into(),
            value: Bytes::from_static(b"abc"),
        });
        let parsed: serde_json::Value = serde_json::from_str(&json_line(&with_headers)).unwrap();
        assert_eq!(
            parsed["headers"],
            serde_json::json!([{"key": "trace", "value": "abc"}])
        );
    }

    #[test]
    fn table_should_align_columns() {
        let rows = vec![
            vec!["PARTITION".to_owned(), "END".to_owned(), "SIZE".to_owned()],
            vec!["0".to_owned(), "12345".to_owned(), "7".to_owned()],
        ];
        assert_eq!(
            table(&rows),
            "PARTITION  END    SIZE\n0          12345  7\n"
        );
    }
}
