//! The pure half of the PostgreSQL sink: the target table as the catalog describes it, and a
//! batch collapsed to one change per key (the rules are in the parent module's doc), as the
//! JSON objects that `jsonb_populate_recordset` reads. No I/O, so the rules are tested here
//! without a database.

use std::collections::BTreeMap;
use std::ops::Range;

use base64::Engine as _;
use indexmap::IndexMap;
use serde_json::{Map, Value};

use super::STATEMENT_JSON_BYTES_MAX;
use crate::sink::SinkRecord;

/// One column the sink may write.
#[derive(Debug, Clone)]
pub(super) struct Column {
    /// The name, quoted.
    pub(super) quoted: String,
    /// `bytea`: the JSON string is the source's base64, decoded before PostgreSQL sees it.
    pub(super) bytea: bool,
}

/// The target table, as the catalog describes it.
#[derive(Debug, Clone)]
pub(super) struct Table {
    /// `schema.name` for messages.
    pub(super) display: String,
    /// `"schema"."name"`.
    pub(super) quoted: String,
    /// Writable columns (not generated), in table order.
    pub(super) columns: IndexMap<String, Column>,
    /// The conflict key's columns, in index order; all in `columns`.
    pub(super) key: Vec<String>,
    /// The table has a `GENERATED ALWAYS AS IDENTITY` column: inserts must override it so
    /// that the source's values are kept.
    pub(super) overriding: bool,
}

/// JSON objects as JSON array texts of at most [`STATEMENT_JSON_BYTES_MAX`] each (a bigger
/// object alone).
pub(super) fn chunks(objects: &[Map<String, Value>]) -> serde_json::Result<Vec<String>> {
    Ok(chunk_ranges(objects)?
        .into_iter()
        .map(|(text, _)| text)
        .collect())
}

/// [`chunks`], each with the range of `objects` it holds (so a statement's answers about its
/// rows, by their 1-based ordinal in the chunk, lead back to them).
pub(super) fn chunk_ranges(
    objects: &[Map<String, Value>],
) -> serde_json::Result<Vec<(String, Range<usize>)>> {
    let mut out = Vec::new();
    let mut current = String::from("[");
    let mut start = 0;
    for (i, object) in objects.iter().enumerate() {
        let text = serde_json::to_string(object)?;
        if i > start && current.len() + text.len() + 2 > STATEMENT_JSON_BYTES_MAX {
            current.push(']');
            out.push((std::mem::replace(&mut current, String::from("[")), start..i));
            start = i;
        }
        if i > start {
            current.push(',');
        }
        current.push_str(&text);
    }
    if start < objects.len() {
        current.push(']');
        out.push((current, start..objects.len()));
    }
    Ok(out)
}

/// Row (or key) objects, as sent to `jsonb_populate_recordset`.
pub(super) type Objects = Vec<Map<String, Value>>;

/// One key's collapsed changes.
#[derive(Debug, Clone, PartialEq)]
struct Change {
    /// The key columns' values.
    key: Map<String, Value>,
    /// Delete the row first (a delete came before the last upsert, or is the last change).
    delete: bool,
    /// The row to upsert last: the batch's upserts since the last delete, merged in order.
    row: Option<Map<String, Value>>,
}

/// A batch collapsed to one change per key.
pub(super) struct Plan<'a> {
    table: &'a Table,
    /// By the key values' JSON text.
    changes: IndexMap<String, Change>,
    pub(super) warnings: Vec<String>,
}

impl<'a> Plan<'a> {
    pub(super) fn new(table: &'a Table) -> Plan<'a> {
        Plan {
            table,
            changes: IndexMap::new(),
            warnings: Vec::new(),
        }
    }

    /// Adds a record's change (after the ones added before it).
    pub(super) fn add(&mut self, record: &SinkRecord) {
        let key_object: Option<Map<String, Value>> = record
            .key
            .as_deref()
            .and_then(|key| serde_json::from_slice(key).ok());
        let row = record.after.as_ref().map(|after| {
            let mut row = Map::new();
            for (name, value) in after {
                if let Some(column) = self.table.columns.get(name) {
                    row.insert(name.clone(), column_value(column, value.clone()));
                }
            }
            row
        });
        let mut key = Map::new();
        for column_name in &self.table.key {
            let from_row = row.as_ref().and_then(|row| row.get(column_name));
            let from_key = key_object.as_ref().and_then(|key| key.get(column_name));
            match from_row.or(from_key) {
                Some(value) if !value.is_null() => {
                    let value = match self.table.columns.get(column_name) {
                        Some(column) if from_row.is_none() => column_value(column, value.clone()),
                        _ => value.clone(),
                    };
                    key.insert(column_name.clone(), value);
                }
                _ => {
                    self.warnings.push(format!(
                        "{}/{}@{}: skipped: no value for key column {:?} of {} in the {}",
                        record.topic,
                        record.partition,
                        record.offset,
                        column_name,
                        self.table.display,
                        if row.is_some() {
                            "row or the record key"
                        } else {
                            "record key"
                        }
                    ));
                    return;
                }
            }
        }
        let row = row.map(|mut row| {
            for (name, value) in &key {
                row.entry(name.clone()).or_insert_with(|| value.clone());
            }
            row
        });
        let identity = Value::Array(key.values().cloned().collect()).to_string();
        match (self.changes.get_mut(&identity), row) {
            (None, row) => {
                let delete = row.is_none();
                self.changes.insert(identity, Change { key, delete, row });
            }
            (Some(change), None) => {
                change.delete = true;
                change.row = None;
            }
            (Some(change), Some(row)) => match &mut change.row {
                Some(earlier) => earlier.extend(row),
                None => change.row = Some(row),
            },
        }
    }

    /// The key objects of the rows to delete.
    pub(super) fn deletes(&self) -> Objects {
        self.changes
            .values()
            .filter(|change| change.delete)
            .map(|change| change.key.clone())
            .collect()
    }

    /// The rows to upsert, grouped by their columns (indexes into the table's columns).
    pub(super) fn upserts(&self) -> Vec<(Vec<usize>, Objects)> {
        let mut groups: BTreeMap<Vec<usize>, Objects> = BTreeMap::new();
        for row in self
            .changes
            .values()
            .filter_map(|change| change.row.as_ref())
        {
            let mut columns: Vec<usize> = row
                .keys()
                .filter_map(|name| self.table.columns.get_index_of(name))
                .collect();
            columns.sort_unstable();
            groups.entry(columns).or_default().push(row.clone());
        }
        groups.into_iter().collect()
    }
}

/// A row value made ready for `jsonb_populate_recordset`: the base64 text of a `bytea`
/// column becomes PostgreSQL's hex form; anything else stays as it is.
fn column_value(column: &Column, value: Value) -> Value {
    if !column.bytea {
        return value;
    }
    match &value {
        Value::String(text) => match base64::engine::general_purpose::STANDARD.decode(text) {
            Ok(bytes) => {
                let mut hex = String::with_capacity(2 + bytes.len() * 2);
                hex.push_str("\\x");
                for byte in bytes {
                    hex.push_str(&format!("{byte:02x}"));
                }
                Value::String(hex)
            }
            Err(_) => value,
        },
        _ => value,
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::sink::postgres::quote;
    use bytes::Bytes;
    use serde_json::json;
    use std::sync::Arc;

    pub(crate) fn table() -> Table {
        let mut columns = IndexMap::new();
        for (name, bytea) in [
            ("id", false),
            ("name", false),
            ("qty", false),
            ("blob", true),
        ] {
            columns.insert(
                name.to_owned(),
                Column {
                    quoted: quote(name),
                    bytea,
                },
            );
        }
        Table {
            display: "public.items".to_owned(),
            quoted: "\"public\".\"items\"".to_owned(),
            columns,
            key: vec!["id".to_owned()],
            overriding: false,
        }
    }

    fn record(offset: u64, key: &str, after: Option<Value>) -> SinkRecord {
        SinkRecord {
            topic: Arc::from("t"),
            partition: 0,
            offset,
            key: Some(Bytes::copy_from_slice(key.as_bytes())),
            value: None,
            after: after.map(|after| serde_json::from_value(after).expect("a row")),
            apply: true,
            raw: false,
        }
    }

    fn objects(maps: Vec<Map<String, Value>>) -> Vec<Value> {
        maps.into_iter().map(Value::Object).collect()
    }

    #[test]
    fn given_updates_of_one_key_should_merge_them_in_order() {
        let table = table();
        let mut plan = Plan::new(&table);
        plan.add(&record(
            0,
            r#"{"id":1}"#,
            Some(json!({"id": 1, "name": "a", "qty": 1})),
        ));
        // A later update without `name` (a TOASTed column left out) keeps the earlier name.
        plan.add(&record(
            1,
            r#"{"id":1}"#,
            Some(json!({"id": 1, "qty": 2, "unknown": 9})),
        ));
        plan.add(&record(
            2,
            r#"{"id":2}"#,
            Some(json!({"id": 2, "name": "b"})),
        ));
        assert!(plan.deletes().is_empty());
        let upserts = plan.upserts();
        assert_eq!(upserts.len(), 2, "two column sets: {upserts:?}");
        let all: Vec<Value> = upserts
            .into_iter()
            .flat_map(|(_, rows)| objects(rows))
            .collect();
        assert!(
            all.contains(&json!({"id": 1, "name": "a", "qty": 2})),
            "{all:?}"
        );
        assert!(all.contains(&json!({"id": 2, "name": "b"})), "{all:?}");
        assert!(plan.warnings.is_empty());
    }

    #[test]
    fn given_deletes_and_upserts_of_one_key_should_keep_their_net_effect() {
        let table = table();
        let mut plan = Plan::new(&table);
        // Insert then delete: a delete.
        plan.add(&record(
            0,
            r#"{"id":1}"#,
            Some(json!({"id": 1, "name": "a"})),
        ));
        plan.add(&record(1, r#"{"id":1}"#, None));
        // Delete then insert: a delete, then the insert (no column of the old row survives).
        plan.add(&record(2, r#"{"id":2}"#, None));
        plan.add(&record(3, r#"{"id":2}"#, Some(json!({"id": 2, "qty": 5}))));
        plan.add(&record(
            4,
            r#"{"id":2}"#,
            Some(json!({"id": 2, "name": "c"})),
        ));
        assert_eq!(
            objects(plan.deletes()),
            vec![json!({"id": 1}), json!({"id": 2})]
        );
        let upserts = plan.upserts();
        assert_eq!(upserts.len(), 1);
        assert_eq!(
            upserts[0].0,
            vec![0, 1, 2],
            "columns id, name, qty in table order"
        );
        assert_eq!(
            objects(upserts[0].1.clone()),
            vec![json!({"id": 2, "qty": 5, "name": "c"})]
        );
    }

    #[test]
    fn given_records_without_key_values_should_skip_them_with_a_warning() {
        let table = table();
        let mut plan = Plan::new(&table);
        plan.add(&record(0, "not json", None));
        plan.add(&record(1, r#"{"other":1}"#, Some(json!({"name": "x"}))));
        plan.add(&record(2, r#"{"id":null}"#, None));
        // The key fills a key column the row lacks.
        plan.add(&record(3, r#"{"id":7}"#, Some(json!({"name": "y"}))));
        assert_eq!(plan.warnings.len(), 3, "{:?}", plan.warnings);
        assert!(plan.warnings[0].starts_with("t/0@0: skipped: no value for key column \"id\""));
        let upserts = plan.upserts();
        assert_eq!(
            objects(upserts[0].1.clone()),
            vec![json!({"name": "y", "id": 7})]
        );
    }

    #[test]
    fn given_a_bytea_column_should_decode_the_base64() {
        let table = table();
        let blob = &table.columns["blob"];
        assert_eq!(column_value(blob, json!("AQL/")), json!("\\x0102ff"));
        assert_eq!(
            column_value(blob, json!("\\x01")),
            json!("\\x01"),
            "not base64: as is"
        );
        assert_eq!(
            column_value(&table.columns["name"], json!("AQL/")),
            json!("AQL/")
        );
    }

    #[test]
    fn given_rows_beyond_the_statement_limit_should_split_them() {
        let big = "x".repeat(STATEMENT_JSON_BYTES_MAX / 3);
        let rows: Vec<Map<String, Value>> = (0..4)
            .map(|i| match json!({"id": i, "name": big}) {
                Value::Object(map) => map,
                _ => unreachable!(),
            })
            .collect();
        let ranges: Vec<Range<usize>> = chunk_ranges(&rows)
            .expect("encodes")
            .into_iter()
            .map(|(_, range)| range)
            .collect();
        assert_eq!(ranges, [0..2, 2..4]);
        let texts = chunks(&rows).expect("encodes");
        assert_eq!(texts.len(), 2);
        for text in &texts {
            assert!(text.len() <= STATEMENT_JSON_BYTES_MAX);
            let parsed: Vec<Value> = serde_json::from_str(text).expect("a JSON array");
            assert_eq!(parsed.len(), 2);
        }
        assert!(chunks(&[]).expect("encodes").is_empty());
    }
}
