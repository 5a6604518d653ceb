//! Transforms: small per-record rewrites declared per connector (`[[source.transforms]]`,
//! `[[sink.transforms]]`), applied in order to the row objects of a change (`before` and
//! `after`). Anything heavier belongs to a stream processor reading the topic.
//!
//! | `type` | keys | effect |
//! |---|---|---|
//! | `keep` | `fields` | keeps only these columns |
//! | `drop` | `fields` | removes these columns |
//! | `rename` | `fields = { old = "new" }` | renames columns |
//! | `filter` | `field`, `op`, `value` | keeps the change only if the row matches (`after`, or `before` for a delete) |
//! | `mask` | `fields`, `with` (default `"****"`) | replaces the values (not null ones) |
//! | `hash` | `fields`, `salt` (default `""`) | replaces each value with the hex SHA-256 of salt + its JSON text |
//! | `route` | `field`, `topic` | sources only: sends the change to `topic` with `{value}` replaced by the field's value |
//!
//! `op` is one of `eq`, `ne`, `gt`, `ge`, `lt`, `le` (numbers compare as numbers, strings as
//! strings), `in` (`value` is an array), `exists`, `missing` (no `value`).
//!
//! The record key is the source row's primary key and is never transformed: a `keep`, `drop` or
//! `rename` of a key column changes the value only, so the topic still compacts by row.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest as _, Sha256};

use crate::config::ConfigError;
use crate::envelope::Row;

/// Most transforms of one connector.
pub const TRANSFORMS_MAX: usize = 64;

/// One `[[*.transforms]]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum TransformSpec {
    /// Keeps only these columns.
    Keep { fields: Vec<String> },
    /// Removes these columns.
    Drop { fields: Vec<String> },
    /// Renames columns: `{ old = "new" }`.
    Rename { fields: BTreeMap<String, String> },
    /// Keeps the change only if the row's `field` satisfies `op value`.
    Filter {
        field: String,
        op: FilterOp,
        value: Option<Value>,
    },
    /// Replaces these columns' values with `with`.
    Mask {
        fields: Vec<String>,
        with: Option<String>,
    },
    /// Replaces these columns' values with a salted SHA-256.
    Hash {
        fields: Vec<String>,
        salt: Option<String>,
    },
    /// Sends the change to a topic named after a field's value.
    Route { field: String, topic: String },
}

/// A filter's comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FilterOp {
    Eq,
    Ne,
    Gt,
    Ge,
    Lt,
    Le,
    In,
    Exists,
    Missing,
}

/// Checks a connector's transforms; `source` tells whether `route` is allowed.
pub fn validate(at: &str, specs: &[TransformSpec], source: bool) -> Result<(), ConfigError> {
    if specs.len() > TRANSFORMS_MAX {
        return Err(ConfigError(format!(
            "{at}: key `transforms`: {} transforms, at most {TRANSFORMS_MAX}",
            specs.len()
        )));
    }
    for (i, spec) in specs.iter().enumerate() {
        let at = format!("{at}: transforms[{i}]");
        let no_fields = |fields: &[String]| -> Result<(), ConfigError> {
            if fields.is_empty() {
                return Err(ConfigError(format!(
                    "{at}: key `fields`: list at least one field"
                )));
            }
            Ok(())
        };
        match spec {
            TransformSpec::Keep { fields }
            | TransformSpec::Drop { fields }
            | TransformSpec::Mask { fields, .. }
            | TransformSpec::Hash { fields, .. } => no_fields(fields)?,
            TransformSpec::Rename { fields } => {
                if fields.is_empty() {
                    return Err(ConfigError(format!(
                        "{at}: key `fields`: give at least one old = \"new\" pair"
                    )));
                }
            }
            TransformSpec::Filter { op, value, .. } => match (op, value) {
                (FilterOp::Exists | FilterOp::Missing, Some(_)) => {
                    return Err(ConfigError(format!(
                        "{at}: key `value`: op = \"exists\" and \"missing\" take no value"
                    )))
                }
                (FilterOp::Exists | FilterOp::Missing, None) => {}
                (FilterOp::In, Some(Value::Array(_))) => {}
                (FilterOp::In, _) => {
                    return Err(ConfigError(format!(
                        "{at}: key `value`: op = \"in\" needs an array"
                    )))
                }
                (_, None) => {
                    return Err(ConfigError(format!(
                        "{at}: key `value` is required for this op"
                    )))
                }
                (_, Some(_)) => {}
            },
            TransformSpec::Route { topic, .. } => {
                if !source {
                    return Err(ConfigError(format!(
                        "{at}: type = \"route\" is only for sources (a sink writes no topic)"
                    )));
                }
                if !topic.contains("{value}") {
                    return Err(ConfigError(format!(
                        "{at}: key `topic`: {topic:?} must contain {{value}}"
                    )));
                }
                // {value} becomes at most 128 characters; topic names are at most 249.
                if topic.len() > 249 - 128 + "{value}".len() {
                    return Err(ConfigError(format!(
                        "{at}: key `topic`: {topic:?} is too long (at most 128 characters \
                         around {{value}})"
                    )));
                }
            }
        }
    }
    Ok(())
}

/// The parts of a change that transforms see.
#[derive(Debug, Clone, PartialEq)]
pub struct Rows {
    /// The row before the change (updates and deletes, when known).
    pub before: Option<Row>,
    /// The row after the change (inserts, updates, snapshot reads); `None` for a delete.
    pub after: Option<Row>,
    /// The row is new downstream (an insert or a snapshot read): a filter that rejects it
    /// drops the change. Otherwise a rejected row may exist downstream, and the change becomes
    /// a delete.
    pub new_row: bool,
}

/// Applies transforms in order. `None`: a filter dropped the change. A filter never drops a
/// delete (its `before` may hold only the key), and turns an update whose new row it rejects
/// into a delete (`after` becomes `None`), so rows that stop matching leave the table.
pub fn apply(specs: &[TransformSpec], mut rows: Rows) -> Option<Rows> {
    for spec in specs {
        match spec {
            TransformSpec::Filter { field, op, value } => {
                let Some(after) = &rows.after else {
                    continue;
                };
                if !matches(after.get(field), *op, value.as_ref()) {
                    if rows.new_row {
                        return None;
                    }
                    rows.after = None;
                }
            }
            // Routing is decided on the transformed rows: [`route`].
            TransformSpec::Route { .. } => {}
            row_spec => {
                for row in [rows.before.as_mut(), rows.after.as_mut()]
                    .into_iter()
                    .flatten()
                {
                    apply_to_row(row_spec, row);
                }
            }
        }
    }
    Some(rows)
}

fn apply_to_row(spec: &TransformSpec, row: &mut Row) {
    match spec {
        TransformSpec::Keep { fields } => row.retain(|name, _| fields.iter().any(|f| f == name)),
        TransformSpec::Drop { fields } => row.retain(|name, _| !fields.iter().any(|f| f == name)),
        TransformSpec::Rename { fields } => {
            let old = std::mem::take(row);
            for (name, value) in old {
                let name = fields.get(&name).cloned().unwrap_or(name);
                row.insert(name, value);
            }
        }
        TransformSpec::Mask { fields, with } => {
            for field in fields {
                if let Some(value) = row.get_mut(field) {
                    if !value.is_null() {
                        *value = Value::String(with.clone().unwrap_or_else(|| "****".to_owned()));
                    }
                }
            }
        }
        TransformSpec::Hash { fields, salt } => {
            for field in fields {
                if let Some(value) = row.get_mut(field) {
                    if !value.is_null() {
                        let text = match &*value {
                            Value::String(text) => text.clone(),
                            other => other.to_string(),
                        };
                        let mut hasher = Sha256::new();
                        hasher.update(salt.as_deref().unwrap_or("").as_bytes());
                        hasher.update(text.as_bytes());
                        let digest = hasher.finalize();
                        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
                        *value = Value::String(hex);
                    }
                }
            }
        }
        TransformSpec::Filter { .. } | TransformSpec::Route { .. } => {}
    }
}

/// The topic a row goes to: `default`, or the last `route`'s topic named after the row's field.
pub fn route(specs: &[TransformSpec], row: &Row, default: &str) -> String {
    let mut topic = default.to_owned();
    for spec in specs {
        if let TransformSpec::Route {
            field,
            topic: template,
        } = spec
        {
            let value = match row.get(field) {
                Some(Value::String(text)) => text.clone(),
                Some(Value::Null) | None => "null".to_owned(),
                Some(other) => other.to_string(),
            };
            topic = template.replace("{value}", &topic_safe(&value));
        }
    }
    topic
}

/// Whether any transform routes.
pub fn routes(specs: &[TransformSpec]) -> bool {
    specs
        .iter()
        .any(|spec| matches!(spec, TransformSpec::Route { .. }))
}

/// A field value made fit for a topic name: characters outside `[A-Za-z0-9._-]` become `_`.
fn topic_safe(value: &str) -> String {
    let mut safe: String = value
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if safe.is_empty() {
        safe.push('_');
    }
    safe.truncate(128);
    safe
}

fn matches(found: Option<&Value>, op: FilterOp, expected: Option<&Value>) -> bool {
    let found_present = found.is_some_and(|v| !v.is_null());
    match op {
        FilterOp::Exists => found_present,
        FilterOp::Missing => !found_present,
        FilterOp::In => match (found, expected) {
            (Some(found), Some(Value::Array(options))) => options
                .iter()
                .any(|option| compare(found, option) == Some(std::cmp::Ordering::Equal)),
            _ => false,
        },
        _ => {
            let (Some(found), Some(expected)) = (found, expected) else {
                return false;
            };
            let Some(ordering) = compare(found, expected) else {
                return op == FilterOp::Ne;
            };
            use std::cmp::Ordering::*;
            match op {
                FilterOp::Eq => ordering == Equal,
                FilterOp::Ne => ordering != Equal,
                FilterOp::Gt => ordering == Greater,
                FilterOp::Ge => ordering != Less,
                FilterOp::Lt => ordering == Less,
                FilterOp::Le => ordering != Greater,
                FilterOp::In | FilterOp::Exists | FilterOp::Missing => false,
            }
        }
    }
}

/// Orders two JSON values of the same kind. Numbers also compare with numeric strings
/// (PostgreSQL's `numeric` arrives as a string); other mixes are unordered.
fn compare(a: &Value, b: &Value) -> Option<std::cmp::Ordering> {
    let number = |v: &Value| match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.parse::<f64>().ok(),
        _ => None,
    };
    match (a, b) {
        (Value::String(a), Value::String(b)) => Some(a.cmp(b)),
        (Value::Bool(a), Value::Bool(b)) => Some(a.cmp(b)),
        (Value::Null, Value::Null) => Some(std::cmp::Ordering::Equal),
        (Value::Number(_), _) | (_, Value::Number(_)) => number(a)?.partial_cmp(&number(b)?),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn specs(toml_text: &str) -> Vec<TransformSpec> {
        #[derive(Deserialize)]
        struct File {
            transforms: Vec<TransformSpec>,
        }
        let file: File = toml::from_str(toml_text).expect("parses");
        validate("test", &file.transforms, true).expect("valid");
        file.transforms
    }

    fn rows(after: Value) -> Rows {
        Rows {
            before: None,
            after: serde_json::from_value(after).ok(),
            new_row: true,
        }
    }

    #[test]
    fn given_keep_drop_rename_mask_hash_should_rewrite_the_row() {
        let specs = specs(
            r#"
[[transforms]]
type = "drop"
fields = ["internal"]
[[transforms]]
type = "rename"
fields = { name = "title" }
[[transforms]]
type = "mask"
fields = ["email"]
[[transforms]]
type = "hash"
fields = ["ssn"]
salt = "s"
[[transforms]]
type = "keep"
fields = ["id", "title", "email", "ssn"]
"#,
        );
        let out = apply(
            &specs,
            rows(json!({"id": 1, "name": "a", "email": "x@y", "ssn": "123", "internal": 1, "extra": 2})),
        )
        .expect("kept");
        let mut hasher = Sha256::new();
        hasher.update(b"s123");
        let hex: String = hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            serde_json::to_value(out.after.expect("after")).expect("json"),
            json!({"id": 1, "title": "a", "email": "****", "ssn": hex})
        );
    }

    #[test]
    fn given_filters_should_keep_only_matching_rows() {
        let gt =
            specs("[[transforms]]\ntype = \"filter\"\nfield = \"qty\"\nop = \"gt\"\nvalue = 10\n");
        assert!(apply(&gt, rows(json!({"qty": 11}))).is_some());
        assert!(apply(&gt, rows(json!({"qty": 10}))).is_none());
        assert!(apply(&gt, rows(json!({"qty": "12.5"}))).is_some());
        assert!(apply(&gt, rows(json!({}))).is_none());
        let within = specs(
            "[[transforms]]\ntype = \"filter\"\nfield = \"s\"\nop = \"in\"\nvalue = [\"a\", \"b\"]\n",
        );
        assert!(apply(&within, rows(json!({"s": "b"}))).is_some());
        assert!(apply(&within, rows(json!({"s": "c"}))).is_none());
        // An update whose new row no longer matches becomes a delete; a delete is never
        // filtered.
        let update = Rows {
            new_row: false,
            ..rows(json!({"qty": 1}))
        };
        assert_eq!(apply(&gt, update).expect("kept").after, None);
        let delete = Rows {
            before: serde_json::from_value(json!({"id": 1})).ok(),
            after: None,
            new_row: false,
        };
        assert!(apply(&gt, delete).is_some());
        let missing = specs("[[transforms]]\ntype = \"filter\"\nfield = \"d\"\nop = \"missing\"\n");
        assert!(apply(&missing, rows(json!({"d": null}))).is_some());
        assert!(apply(&missing, rows(json!({"d": 1}))).is_none());
    }

    #[test]
    fn given_route_should_name_the_topic_after_the_field() {
        let route = specs(
            "[[transforms]]\ntype = \"route\"\nfield = \"region\"\ntopic = \"orders.{value}\"\n",
        );
        let row: Row = serde_json::from_value(json!({"region": "eu west"})).expect("row");
        assert_eq!(super::route(&route, &row, "t"), "orders.eu_west");
        assert!(routes(&route));
    }

    #[test]
    fn given_bad_transforms_should_name_the_key() {
        #[derive(Deserialize)]
        struct File {
            #[allow(dead_code)]
            transforms: Vec<TransformSpec>,
        }
        let unknown = toml::from_str::<File>("[[transforms]]\ntype = \"drop\"\nfeilds = [\"a\"]\n");
        assert!(unknown.is_err());
        let in_not_array: File = toml::from_str(
            "[[transforms]]\ntype = \"filter\"\nfield = \"a\"\nop = \"in\"\nvalue = 1\n",
        )
        .expect("parses");
        let error = validate("sink \"s\"", &in_not_array.transforms, false).expect_err("invalid");
        assert!(
            error.0.contains("transforms[0]: key `value`"),
            "{}",
            error.0
        );
        let route: File = toml::from_str(
            "[[transforms]]\ntype = \"route\"\nfield = \"a\"\ntopic = \"t.{value}\"\n",
        )
        .expect("parses");
        let error = validate("sink \"s\"", &route.transforms, false).expect_err("invalid");
        assert!(error.0.contains("only for sources"), "{}", error.0);
    }
}
