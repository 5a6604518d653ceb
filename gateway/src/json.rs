//! Bytes as JSON: UTF-8 text when the bytes are valid UTF-8, else base64 (standard alphabet,
//! padded) with an `*_encoding: "base64"` field beside it — the form `syncline consume --json`
//! prints.

use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Map, Value};

/// Inserts `name` (and `name_encoding` when needed) into `object` for `bytes`.
pub fn put_bytes(object: &mut Map<String, Value>, name: &str, bytes: Option<&[u8]>) {
    match bytes {
        None => {
            object.insert(name.to_string(), Value::Null);
        }
        Some(bytes) => match std::str::from_utf8(bytes) {
            Ok(text) => {
                object.insert(name.to_string(), Value::String(text.to_string()));
            }
            Err(_) => {
                object.insert(
                    name.to_string(),
                    Value::String(base64::engine::general_purpose::STANDARD.encode(bytes)),
                );
                object.insert(format!("{name}_encoding"), Value::String("base64".into()));
            }
        },
    }
}

/// Decodes `text` as the `encoding` says (`None`: UTF-8 text as is).
pub fn decode(text: &str, encoding: Option<&str>, what: &str) -> Result<Vec<u8>, String> {
    match encoding {
        None | Some("utf-8") | Some("utf8") => Ok(text.as_bytes().to_vec()),
        Some("base64") => base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|e| format!("{what} is not valid base64: {e}")),
        Some(other) => Err(format!(
            "unknown {what} encoding `{other}`: use base64 (or none for UTF-8 text)"
        )),
    }
}

/// One record of a `POST /v1/topics/{topic}/records` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordIn {
    /// The key (absent or null: unkeyed).
    #[serde(default)]
    pub key: Option<String>,
    /// `base64` when the key is.
    #[serde(default)]
    pub key_encoding: Option<String>,
    /// The value (null: a tombstone).
    #[serde(default)]
    pub value: Option<String>,
    /// `base64` when the value is.
    #[serde(default)]
    pub value_encoding: Option<String>,
}

/// A record's key and value bytes (None: unkeyed / a tombstone).
pub type KeyValue = (Option<Vec<u8>>, Option<Vec<u8>>);

impl RecordIn {
    /// The key and value bytes.
    pub fn bytes(&self) -> Result<KeyValue, String> {
        let key = self
            .key
            .as_deref()
            .map(|k| decode(k, self.key_encoding.as_deref(), "key"))
            .transpose()?;
        let value = self
            .value
            .as_deref()
            .map(|v| decode(v, self.value_encoding.as_deref(), "value"))
            .transpose()?;
        Ok((key, value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_stays_text_and_other_bytes_become_base64_saying_so() {
        let mut object = Map::new();
        put_bytes(&mut object, "key", Some(b"caf\xc3\xa9"));
        put_bytes(&mut object, "value", Some(&[0xff, 0x00]));
        assert_eq!(
            Value::Object(object),
            serde_json::json!({"key": "café", "value": "/wA=", "value_encoding": "base64"})
        );
        assert_eq!(decode("/wA=", Some("base64"), "value").unwrap(), [0xff, 0]);
        assert!(decode("x", Some("hex"), "key").unwrap_err().contains("hex"));
        assert!(decode("!!", Some("base64"), "key").is_err());
    }
}
