//! The PostgreSQL sink: applies change records to one table (`table`), exactly once.
//!
//! # What it writes
//!
//! - A record with a row (`after`) is an upsert of the row's columns that the table has (other
//!   fields are ignored):
//!   - a row with every column of the table: `INSERT ... ON CONFLICT (key) DO UPDATE`;
//!   - a row that leaves columns out (a CDC update leaves out a TOASTed column whose value did
//!     not change): an `UPDATE` of its columns where the key matches (the rows numbered, so
//!     that it returns which it found), so the columns left out keep their value; then an
//!     `INSERT ... ON CONFLICT` of only the keys that the UPDATE did not find, where the
//!     columns left out get their default. (An INSERT first would check NOT NULL before ON
//!     CONFLICT sees that the row exists, and fail for a row that is there.) That insert
//!     fails if a NOT NULL column without a default is left out: the error names the table,
//!     the key and the column, and the batch fails (and is retried with backoff) until the
//!     row exists or the record is dealt with.
//!
//!   PostgreSQL converts each JSON value to its column's type (`jsonb_populate_record(set)`):
//!   strings through the type's input function, so `numeric`, timestamps and arrays arrive as
//!   the text the source printed; `bytea` columns take the source's base64 (decoded here).
//! - A record without a row (a tombstone, or an envelope with `op = "d"`) deletes by key.
//! - The key columns are the table's primary key (else its first unique index without a
//!   predicate or expressions). Their values come from the row, or for a value the row lacks
//!   and for deletes from the record key, a JSON object such as `{"id":1}`. A record without
//!   a value for every key column is skipped and reported in the sink's status; so is a
//!   record the transforms filtered out (`apply` false), silently.
//!
//! A batch is collapsed to one change per key before it is written, with the effect of
//! applying its records in order: later columns override earlier ones, and a delete followed
//! by an upsert deletes the row before inserting it. So no statement touches a row twice
//! (which `ON CONFLICT DO UPDATE` refuses). Then, in one transaction: the deletes, the upserts
//! (statements per set of columns present), and the partitions' next offsets.
//!
//! # Delivery: exactly once
//!
//! Table `syncline_sink_offsets (sink, topic, partition, next_offset)`, created in the target
//! table's schema if missing, holds per sink and partition the offset after the last record
//! applied. It is written in the batch's transaction, so the rows and the offsets commit
//! together. Each batch locks its partitions' offset rows (`SELECT ... FOR UPDATE`, in a fixed
//! order) and skips every record below the stored offset. The group's committed offset can lag
//! the database's (a crash between the database commit and the group commit, or a partition
//! that moves to another member meanwhile): the records it redelivers are skipped, so none is
//! applied twice. The stored offsets are read in every transaction, not cached: another
//! member (after a rebalance, or a zombie one) may have moved them on since.
//!
//! A member starts reading at the group's committed offset, and the stored offsets only skip
//! records below them: they never rewind the reading. So where the database is behind the
//! group (restored from a backup taken before the last batches), the records between the
//! database's stored offsets and the group's commit are not applied again, and the restored
//! rows stay as the backup has them until their keys change again. To replay them, stop the
//! sink and rewind the group to the stored offsets (`syncline group reset-offsets connect.<name>
//! --topic T --to-offset N --partition P`).
//!
//! Two members that write the same rows at once (several topics into one table) may deadlock;
//! PostgreSQL aborts one transaction and it is retried ([`RETRIES`]). Any other failure fails
//! the batch; the runtime starts the member again, which reconnects.
//!
//! # Limits
//!
//! - A batch has at most `batch_size` records (at most 10,000, checked by the config).
//! - One statement carries at most [`STATEMENT_JSON_BYTES_MAX`] of JSON rows (a larger batch
//!   becomes several statements of the same transaction; a larger single row goes alone, up
//!   to PostgreSQL's 1 GB per value).
//! - At most [`CACHED_STATEMENTS_MAX`] upsert statements (one per column set) stay prepared.
//! - Two JSON values that differ but convert to the same key (`1` and `"1"` for an integer
//!   key) count as two keys; both in one batch fail the statement ("cannot affect row a
//!   second time"). CDC sources write one JSON form per column type.

mod plan;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context as _};
use indexmap::IndexMap;
use serde_json::{Map, Value};
use tokio_postgres::error::SqlState;
use tokio_postgres::{NoTls, Statement, Transaction};

use super::SinkRecord;
use crate::config::{redact, SinkConfig};
use plan::{chunk_ranges, chunks, Column, Plan, Table};

/// Name of the offsets table, in the target table's schema.
pub const OFFSETS_TABLE: &str = "syncline_sink_offsets";
/// Bytes of JSON rows per statement: far below PostgreSQL's 1 GB value limit, and small
/// enough that one statement's parse and memory stay modest.
pub const STATEMENT_JSON_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Prepared upsert statements kept (one per set of columns seen); the cache is emptied when
/// full, as a table whose rows keep changing shape gains nothing from it.
pub const CACHED_STATEMENTS_MAX: usize = 64;
/// Attempts of a transaction that PostgreSQL aborted for a deadlock or a serialization
/// failure, before the batch fails.
pub const RETRIES: u32 = 3;
/// Warnings kept between two reads by the runtime (one per skipped record at most).
const WARNINGS_MAX: usize = 100;

/// The statements of the offsets table, prepared at open.
struct OffsetStatements {
    /// Inserts a 0 row for each partition not stored yet.
    ensure: Statement,
    /// Locks and reads the partitions' rows.
    lock: Statement,
    /// Writes the partitions' next offsets.
    store: Statement,
    delete: Statement,
}

pub struct PostgresTarget {
    client: tokio_postgres::Client,
    /// Drives the connection; aborted with the target.
    connection: tokio::task::JoinHandle<()>,
    sink: String,
    table: Table,
    offsets: OffsetStatements,
    /// Upserts by the table-order indexes of their columns.
    upserts: HashMap<Vec<usize>, Statement>,
    /// Updates of rows that lack some columns, by the same indexes.
    updates: HashMap<Vec<usize>, Statement>,
    /// Partitions known to have an offset row (rows are never deleted).
    known_partitions: HashSet<(Arc<str>, u32)>,
    warnings: Vec<String>,
}

impl Drop for PostgresTarget {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

impl PostgresTarget {
    /// Connects, reads the table's columns and key, creates the offsets table if missing and
    /// prepares the statements.
    pub async fn open(config: &SinkConfig) -> anyhow::Result<PostgresTarget> {
        let name = config
            .table
            .as_deref()
            .ok_or_else(|| anyhow!("sink {:?}: key `table` is required", config.name))?;
        let (client, connection) = tokio_postgres::connect(&config.url, NoTls)
            .await
            .with_context(|| format!("connecting to {}", redact(&config.url)))?;
        let sink = config.name.clone();
        let connection = tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(sink = %sink, error = %e, "PostgreSQL connection lost");
            }
        });
        let table = describe(&client, name)
            .await
            .with_context(|| format!("sink {:?}: key `table`", config.name))?;
        let schema_quoted = table
            .quoted
            .split_once('.')
            .map(|(schema, _)| schema.to_owned())
            .unwrap_or_default();
        let offsets_quoted = format!("{schema_quoted}.{}", quote(OFFSETS_TABLE));
        create_offsets_table(&client, &offsets_quoted).await?;
        let offsets = prepare_offsets(&client, &offsets_quoted, &table).await?;
        tracing::info!(
            sink = %config.name,
            table = %table.display,
            key = ?table.key,
            "PostgreSQL sink ready"
        );
        Ok(PostgresTarget {
            client,
            connection,
            sink: config.name.clone(),
            table,
            offsets,
            upserts: HashMap::new(),
            updates: HashMap::new(),
            known_partitions: HashSet::new(),
            warnings: Vec::new(),
        })
    }

    /// Applies a batch in one transaction (see the module doc), retrying it after a deadlock
    /// or a serialization failure.
    pub async fn apply(&mut self, batch: &[SinkRecord]) -> anyhow::Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut attempt = 1;
        loop {
            match self.apply_once(batch).await {
                Ok(warnings) => {
                    let room = WARNINGS_MAX.saturating_sub(self.warnings.len());
                    self.warnings.extend(warnings.into_iter().take(room));
                    return Ok(());
                }
                Err(e) if attempt < RETRIES && is_transient(&e) => {
                    tracing::warn!(
                        sink = %self.sink,
                        error = %format!("{e:#}"),
                        attempt,
                        "transaction aborted; retrying"
                    );
                    attempt += 1;
                }
                Err(e) => {
                    return Err(e.context(format!("applying a batch to {}", self.table.display)))
                }
            }
        }
    }

    /// The skipped records' reasons since the last call, for the sink's status.
    pub fn take_warnings(&mut self) -> Vec<String> {
        std::mem::take(&mut self.warnings)
    }

    /// One attempt; returns the warnings of records that could not be applied.
    async fn apply_once(&mut self, batch: &[SinkRecord]) -> anyhow::Result<Vec<String>> {
        // The offset after each partition's last record in this batch.
        let mut batch_next: BTreeMap<(Arc<str>, u32), u64> = BTreeMap::new();
        for record in batch {
            let next = batch_next
                .entry((record.topic.clone(), record.partition))
                .or_insert(0);
            *next = (*next).max(record.offset + 1);
        }
        let topics: Vec<&str> = batch_next.keys().map(|(topic, _)| &**topic).collect();
        let partitions = batch_next
            .keys()
            .map(|(_, partition)| i32::try_from(*partition))
            .collect::<Result<Vec<i32>, _>>()
            .context("a partition number above 2^31")?;
        let all_known = batch_next
            .keys()
            .all(|key| self.known_partitions.contains(key));

        let transaction = self.client.transaction().await?;
        if !all_known {
            transaction
                .execute(&self.offsets.ensure, &[&self.sink, &topics, &partitions])
                .await
                .context("creating the partitions' offset rows")?;
        }
        let mut stored: HashMap<(String, u32), u64> = HashMap::new();
        for row in transaction
            .query(&self.offsets.lock, &[&self.sink, &topics, &partitions])
            .await
            .context("locking the partitions' offset rows")?
        {
            let topic: String = row.get(0);
            let partition: i32 = row.get(1);
            let next: i64 = row.get(2);
            stored.insert(
                (topic, u32::try_from(partition).unwrap_or(0)),
                u64::try_from(next).unwrap_or(0),
            );
        }
        let stored_next = |record: &SinkRecord| {
            stored
                .get(&(record.topic.to_string(), record.partition))
                .copied()
                .unwrap_or(0)
        };

        let mut plan = Plan::new(&self.table);
        let mut skipped = 0u64;
        for record in batch {
            if record.offset < stored_next(record) {
                skipped += 1;
                continue;
            }
            if record.apply {
                plan.add(record);
            }
        }
        if skipped > 0 {
            tracing::info!(
                sink = %self.sink,
                skipped,
                "records below the stored offsets were applied before: skipped"
            );
        }

        for chunk in chunks(&plan.deletes()).context("encoding keys as JSON")? {
            transaction
                .execute(&self.offsets.delete, &[&chunk])
                .await
                .context("deleting rows")?;
        }
        for (columns, rows) in plan.upserts() {
            let upsert = prepared(&mut self.upserts, &transaction, &columns, || {
                upsert_sql(&self.table, &columns)
            })
            .await?;
            // Rows with every column: the upsert. Rows without some (an update that left out
            // unchanged TOASTed columns): an UPDATE of the rows the table has, then an insert
            // of the others only, since an INSERT checks NOT NULL before ON CONFLICT.
            let inserts = if columns.len() == self.table.columns.len() {
                rows
            } else {
                let update = prepared(&mut self.updates, &transaction, &columns, || {
                    update_sql(&self.table, &columns)
                })
                .await?;
                let mut found = vec![false; rows.len()];
                for (chunk, range) in chunk_ranges(&rows).context("encoding rows as JSON")? {
                    for row in transaction
                        .query(&update, &[&chunk])
                        .await
                        .context("updating rows")?
                    {
                        let ordinal: i64 = row.get(0);
                        let index = usize::try_from(ordinal - 1)
                            .ok()
                            .map(|i| range.start + i)
                            .filter(|i| range.contains(i))
                            .ok_or_else(|| anyhow!("the update returned row {ordinal}"))?;
                        found[index] = true;
                    }
                }
                rows.into_iter()
                    .zip(found)
                    .filter(|(_, found)| !found)
                    .map(|(row, _)| row)
                    .collect()
            };
            for (chunk, range) in chunk_ranges(&inserts).context("encoding rows as JSON")? {
                if let Err(e) = transaction.execute(&upsert, &[&chunk]).await {
                    let context = missing_column_error(&self.table, &inserts[range], &e)
                        .unwrap_or_else(|| "upserting rows".to_owned());
                    return Err(anyhow::Error::new(e).context(context));
                }
            }
        }

        let mut next_offsets = Vec::with_capacity(batch_next.len());
        for ((topic, partition), next) in &batch_next {
            let stored = stored
                .get(&(topic.to_string(), *partition))
                .copied()
                .unwrap_or(0);
            let next = i64::try_from((*next).max(stored)).context("an offset above 2^63")?;
            next_offsets.push(next);
        }
        transaction
            .execute(
                &self.offsets.store,
                &[&self.sink, &topics, &partitions, &next_offsets],
            )
            .await
            .context("storing the partitions' next offsets")?;
        transaction.commit().await.context("committing")?;
        self.known_partitions.extend(batch_next.into_keys());
        Ok(plan.warnings)
    }
}

/// The statement of `sql` for `columns`, prepared once and then cached (the cache emptied
/// when full, see [`CACHED_STATEMENTS_MAX`]).
async fn prepared(
    cache: &mut HashMap<Vec<usize>, Statement>,
    transaction: &Transaction<'_>,
    columns: &[usize],
    sql: impl FnOnce() -> String,
) -> anyhow::Result<Statement> {
    if let Some(statement) = cache.get(columns) {
        return Ok(statement.clone());
    }
    if cache.len() >= CACHED_STATEMENTS_MAX {
        cache.clear();
    }
    let sql = sql();
    let statement = transaction
        .prepare(&sql)
        .await
        .with_context(|| format!("preparing {sql}"))?;
    cache.insert(columns.to_vec(), statement.clone());
    Ok(statement)
}

/// For an insert that failed a NOT NULL constraint, which row and column: the first of `rows`
/// without a value for the column PostgreSQL names, with its key.
fn missing_column_error(
    table: &Table,
    rows: &[Map<String, Value>],
    error: &tokio_postgres::Error,
) -> Option<String> {
    let db = error.as_db_error()?;
    if *db.code() != SqlState::NOT_NULL_VIOLATION {
        return None;
    }
    let column = db.column()?;
    let lacking = rows
        .iter()
        .filter(|row| row.get(column).is_none_or(Value::is_null))
        .collect::<Vec<_>>();
    let first = lacking.first()?;
    let key: Map<String, Value> = table
        .key
        .iter()
        .filter_map(|name| Some((name.clone(), first.get(name)?.clone())))
        .collect();
    let others = match lacking.len() {
        1 => String::new(),
        n => format!(" (and {} more such row(s))", n - 1),
    };
    Some(format!(
        "{}: cannot insert the row of key {}{others}: it is not in the table, and its record \
         has no value for column {column:?}, which is NOT NULL (an update that left out an \
         unchanged column, of a row the table does not have)",
        table.display,
        Value::Object(key)
    ))
}

/// Whether PostgreSQL aborted the transaction for a conflict that a retry may not meet.
fn is_transient(error: &anyhow::Error) -> bool {
    error
        .chain()
        .filter_map(|cause| cause.downcast_ref::<tokio_postgres::Error>())
        .filter_map(tokio_postgres::Error::code)
        .any(|code| {
            *code == SqlState::T_R_DEADLOCK_DETECTED || *code == SqlState::T_R_SERIALIZATION_FAILURE
        })
}

/// An identifier in double quotes, embedded quotes doubled.
fn quote(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}

/// Reads the table `name` (`schema.table`, or `table` on the search path) from the catalog.
async fn describe(client: &tokio_postgres::Client, name: &str) -> anyhow::Result<Table> {
    let quoted_name = match name.split_once('.') {
        Some((schema, table)) => format!("{}.{}", quote(schema), quote(table)),
        None => quote(name),
    };
    let row = client
        .query_opt(
            "SELECT c.oid, n.nspname::text, c.relname::text, c.relkind::text \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.oid = to_regclass($1)",
            &[&quoted_name],
        )
        .await
        .with_context(|| format!("looking up table {name}"))?
        .ok_or_else(|| anyhow!("table {name} does not exist"))?;
    let oid: u32 = row.get(0);
    let schema: String = row.get(1);
    let relation: String = row.get(2);
    let kind: String = row.get(3);
    let display = format!("{schema}.{relation}");
    if kind != "r" && kind != "p" {
        bail!("{display} is not a table (relkind {kind:?})");
    }
    let mut columns = IndexMap::new();
    let mut generated = HashSet::new();
    let mut overriding = false;
    for row in client
        .query(
            "SELECT a.attname::text, a.atttypid = 'bytea'::regtype, a.attgenerated <> '', \
                    a.attidentity = 'a' \
             FROM pg_attribute a \
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped \
             ORDER BY a.attnum",
            &[&oid],
        )
        .await
        .with_context(|| format!("reading the columns of {display}"))?
    {
        let column: String = row.get(0);
        if row.get::<_, bool>(2) {
            generated.insert(column);
            continue;
        }
        overriding |= row.get::<_, bool>(3);
        columns.insert(
            column.clone(),
            Column {
                quoted: quote(&column),
                bytea: row.get(1),
            },
        );
    }
    let key: Vec<String> = client
        .query_opt(
            "SELECT array_agg(a.attname::text ORDER BY k.ord) \
             FROM pg_index i \
             CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord) \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
             WHERE i.indrelid = $1 AND i.indisunique AND i.indisvalid AND i.indimmediate \
               AND i.indpred IS NULL AND i.indexprs IS NULL AND k.ord <= i.indnkeyatts \
             GROUP BY i.indexrelid, i.indisprimary \
             ORDER BY i.indisprimary DESC, i.indexrelid \
             LIMIT 1",
            &[&oid],
        )
        .await
        .with_context(|| format!("reading the key of {display}"))?
        .map(|row| row.get(0))
        .ok_or_else(|| {
            anyhow!(
                "{display} has no primary key (nor a unique index without a predicate or \
                 expressions), which the upserts need"
            )
        })?;
    if let Some(column) = key.iter().find(|column| generated.contains(*column)) {
        bail!("{display}: key column {column} is generated, so the sink cannot write it");
    }
    Ok(Table {
        display,
        quoted: format!("{}.{}", quote(&schema), quote(&relation)),
        columns,
        key,
        overriding,
    })
}

async fn create_offsets_table(
    client: &tokio_postgres::Client,
    offsets_quoted: &str,
) -> anyhow::Result<()> {
    let exists = || async {
        client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&offsets_quoted])
            .await
            .map(|row| row.get::<_, bool>(0))
    };
    // Checked first: creating needs the CREATE privilege even when the table exists.
    if exists().await.context("looking up the offsets table")? {
        return Ok(());
    }
    let created = client
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {offsets_quoted} (\
             sink text NOT NULL, topic text NOT NULL, \"partition\" integer NOT NULL, \
             next_offset bigint NOT NULL, PRIMARY KEY (sink, topic, \"partition\"))"
        ))
        .await;
    match created {
        Ok(()) => Ok(()),
        // Another member created it at the same moment (IF NOT EXISTS does not cover that
        // race: the second create fails on the catalog's unique index).
        Err(_) if exists().await.unwrap_or(false) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("creating {offsets_quoted}")),
    }
}

async fn prepare_offsets(
    client: &tokio_postgres::Client,
    offsets: &str,
    table: &Table,
) -> anyhow::Result<OffsetStatements> {
    let prepare = |sql: String| async move {
        client
            .prepare(&sql)
            .await
            .with_context(|| format!("preparing {sql}"))
    };
    let keys = key_list(table);
    Ok(OffsetStatements {
        ensure: prepare(format!(
            "INSERT INTO {offsets} (sink, topic, \"partition\", next_offset) \
             SELECT $1::text, t, p, 0 FROM unnest($2::text[], $3::int4[]) AS u(t, p) \
             ON CONFLICT DO NOTHING"
        ))
        .await?,
        // ORDER BY before the lock: concurrent batches lock shared partitions in one order.
        lock: prepare(format!(
            "SELECT topic, \"partition\", next_offset FROM {offsets} \
             WHERE sink = $1::text \
               AND (topic, \"partition\") IN (SELECT * FROM unnest($2::text[], $3::int4[])) \
             ORDER BY topic, \"partition\" FOR UPDATE"
        ))
        .await?,
        store: prepare(format!(
            "INSERT INTO {offsets} (sink, topic, \"partition\", next_offset) \
             SELECT $1::text, t, p, o \
             FROM unnest($2::text[], $3::int4[], $4::int8[]) AS u(t, p, o) \
             ON CONFLICT (sink, topic, \"partition\") \
             DO UPDATE SET next_offset = EXCLUDED.next_offset"
        ))
        .await?,
        delete: prepare(format!(
            "DELETE FROM {table} WHERE ({keys}) IN \
             (SELECT {keys} FROM jsonb_populate_recordset(NULL::{table}, $1::text::jsonb))",
            table = table.quoted
        ))
        .await?,
    })
}

fn key_list(table: &Table) -> String {
    table
        .key
        .iter()
        .map(|column| quote(column))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The upsert of rows that have exactly `columns` (indexes into `table.columns`).
fn upsert_sql(table: &Table, columns: &[usize]) -> String {
    let names: Vec<(&String, &Column)> = columns
        .iter()
        .filter_map(|&i| table.columns.get_index(i))
        .collect();
    let list = names
        .iter()
        .map(|(_, column)| column.quoted.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let updates = names
        .iter()
        .filter(|(name, _)| !table.key.contains(name))
        .map(|(_, column)| format!("{0} = EXCLUDED.{0}", column.quoted))
        .collect::<Vec<_>>();
    let on_conflict = if updates.is_empty() {
        "DO NOTHING".to_owned()
    } else {
        format!("DO UPDATE SET {}", updates.join(", "))
    };
    format!(
        "INSERT INTO {table} ({list}){overriding} SELECT {list} \
         FROM jsonb_populate_recordset(NULL::{table}, $1::text::jsonb) \
         ON CONFLICT ({keys}) {on_conflict}",
        table = table.quoted,
        overriding = if table.overriding {
            " OVERRIDING SYSTEM VALUE"
        } else {
            ""
        },
        keys = key_list(table),
    )
}

/// For rows that have exactly `columns` (indexes into `table.columns`) but not all of the
/// table's: an UPDATE of those that exist by the key (of the non-key columns given), or
/// without any such column a SELECT of those that exist; either returns the 1-based ordinals
/// (in `$1`) of the rows found.
fn update_sql(table: &Table, columns: &[usize]) -> String {
    let names: Vec<(&String, &Column)> = columns
        .iter()
        .filter_map(|&i| table.columns.get_index(i))
        .collect();
    let sets = names
        .iter()
        .filter(|(name, _)| !table.key.contains(name))
        .map(|(_, column)| format!("{0} = (s.r).{0}", column.quoted))
        .collect::<Vec<_>>();
    let target_keys = table
        .key
        .iter()
        .map(|column| format!("t.{}", quote(column)))
        .collect::<Vec<_>>()
        .join(", ");
    let row_keys = table
        .key
        .iter()
        .map(|column| format!("(s.r).{}", quote(column)))
        .collect::<Vec<_>>()
        .join(", ");
    let rows = format!(
        "(SELECT e.n, jsonb_populate_record(NULL::{table}, e.doc) AS r \
         FROM jsonb_array_elements($1::text::jsonb) WITH ORDINALITY AS e(doc, n)) AS s",
        table = table.quoted
    );
    if sets.is_empty() {
        format!(
            "SELECT s.n FROM {rows} WHERE EXISTS \
             (SELECT 1 FROM {table} AS t WHERE ({target_keys}) = ({row_keys}))",
            table = table.quoted
        )
    } else {
        format!(
            "UPDATE {table} AS t SET {sets} FROM {rows} \
             WHERE ({target_keys}) = ({row_keys}) RETURNING s.n",
            table = table.quoted,
            sets = sets.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::plan::tests::table;
    use super::*;

    #[test]
    fn given_identifiers_with_quotes_should_double_them() {
        assert_eq!(quote("items"), "\"items\"");
        assert_eq!(quote("we\"ird"), "\"we\"\"ird\"");
    }

    #[test]
    fn given_a_column_set_should_write_an_upsert_by_the_key() {
        let table = table();
        assert_eq!(
            upsert_sql(&table, &[0, 1]),
            "INSERT INTO \"public\".\"items\" (\"id\", \"name\") SELECT \"id\", \"name\" \
             FROM jsonb_populate_recordset(NULL::\"public\".\"items\", $1::text::jsonb) \
             ON CONFLICT (\"id\") DO UPDATE SET \"name\" = EXCLUDED.\"name\""
        );
        assert!(upsert_sql(&table, &[0]).ends_with("ON CONFLICT (\"id\") DO NOTHING"));
    }

    #[test]
    fn given_a_partial_column_set_should_update_by_the_key_and_return_the_ordinals() {
        let table = table();
        let rows = "(SELECT e.n, jsonb_populate_record(NULL::\"public\".\"items\", e.doc) AS r \
                    FROM jsonb_array_elements($1::text::jsonb) WITH ORDINALITY AS e(doc, n)) AS s";
        assert_eq!(
            update_sql(&table, &[0, 2]),
            format!(
                "UPDATE \"public\".\"items\" AS t SET \"qty\" = (s.r).\"qty\" FROM {rows} \
                 WHERE (t.\"id\") = ((s.r).\"id\") RETURNING s.n"
            )
        );
        assert_eq!(
            update_sql(&table, &[0]),
            format!(
                "SELECT s.n FROM {rows} WHERE EXISTS (SELECT 1 FROM \"public\".\"items\" AS t \
                 WHERE (t.\"id\") = ((s.r).\"id\"))"
            )
        );
    }
}
