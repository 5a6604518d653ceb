//! What the PostgreSQL source checks and sets up in the database before it streams: each
//! table's key and replica identity, and the publication.

use anyhow::{bail, Context as _};

use crate::config::{split_table, SourceConfig};

/// A captured table's primary-key columns (in column order) and whether its replica identity is
/// FULL (deletes and updates then carry every old column).
#[derive(Debug, Clone)]
pub struct TableKey {
    pub key_columns: Vec<String>,
    pub identity_full: bool,
}

/// Checks one table: it exists, is a plain table, has a primary key, and a replica identity
/// that carries the key. Every refusal names the table and says what to do.
pub async fn table_key(
    admin: &tokio_postgres::Client,
    schema: &str,
    table: &str,
) -> anyhow::Result<TableKey> {
    let found = admin
        .query_opt(
            "SELECT c.relkind::text, c.relreplident::text FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2",
            &[&schema, &table],
        )
        .await?;
    let Some(found) = found else {
        bail!("table {schema}.{table} does not exist");
    };
    let kind: String = found.get(0);
    let identity: String = found.get(1);
    match kind.as_str() {
        "r" => {}
        "p" => bail!(
            "table {schema}.{table} is partitioned: capturing a partitioned table is not supported \
             yet; list its partitions in `tables` instead"
        ),
        _ => bail!("{schema}.{table} is not a table (relkind {kind:?})"),
    }
    let rows = admin
        .query(
            "SELECT a.attname::text FROM pg_index i \
             JOIN pg_class c ON c.oid = i.indrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = ANY(i.indkey) \
             WHERE n.nspname = $1 AND c.relname = $2 AND i.indisprimary \
             ORDER BY a.attnum",
            &[&schema, &table],
        )
        .await?;
    if rows.is_empty() {
        bail!(
            "table {schema}.{table} has no primary key: change data capture keys each record by \
             it (add a PRIMARY KEY, or leave the table out of `tables`)"
        );
    }
    let key_columns: Vec<String> = rows.iter().map(|row| row.get(0)).collect();
    match identity.as_str() {
        // DEFAULT: the primary key; FULL: every column.
        "d" | "f" => {}
        "n" => bail!(
            "table {schema}.{table} has REPLICA IDENTITY NOTHING: its updates and deletes carry no \
             key (ALTER TABLE ... REPLICA IDENTITY DEFAULT)"
        ),
        _ => {
            let index: Vec<String> = admin
                .query(
                    "SELECT a.attname::text FROM pg_index i \
                     JOIN pg_class c ON c.oid = i.indrelid \
                     JOIN pg_namespace n ON n.oid = c.relnamespace \
                     JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = ANY(i.indkey) \
                     WHERE n.nspname = $1 AND c.relname = $2 AND i.indisreplident \
                     ORDER BY a.attnum",
                    &[&schema, &table],
                )
                .await?
                .iter()
                .map(|row| row.get(0))
                .collect();
            if index != key_columns {
                bail!(
                    "table {schema}.{table} has REPLICA IDENTITY USING INDEX on {index:?}, not its \
                     primary key {key_columns:?}: deletes would not carry the key (ALTER TABLE \
                     ... REPLICA IDENTITY DEFAULT or FULL)"
                );
            }
        }
    }
    Ok(TableKey {
        key_columns,
        identity_full: identity == "f",
    })
}

/// Creates the publication for the source's tables if missing, and adds tables it lacks.
pub async fn ensure_publication(
    admin: &tokio_postgres::Client,
    config: &SourceConfig,
) -> anyhow::Result<()> {
    let publication = config.publication_name();
    let quoted: Vec<String> = config
        .tables
        .iter()
        .filter_map(|t| split_table(t))
        .map(|(schema, table)| format!("\"{schema}\".\"{table}\""))
        .collect();
    let exists = admin
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await?
        .is_some();
    if !exists {
        admin
            .batch_execute(&format!(
                "CREATE PUBLICATION \"{publication}\" FOR TABLE {}",
                quoted.join(", ")
            ))
            .await
            .with_context(|| format!("creating publication {publication}"))?;
        return Ok(());
    }
    let published: Vec<(String, String)> = admin
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1",
            &[&publication],
        )
        .await?
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    for table in &config.tables {
        let Some((schema, name)) = split_table(table) else {
            continue;
        };
        if !published.iter().any(|(s, t)| s == schema && t == name) {
            tracing::warn!(source = %config.name, %table, "adding the table to publication {publication}: its existing rows are copied only by a new snapshot");
            admin
                .batch_execute(&format!(
                    "ALTER PUBLICATION \"{publication}\" ADD TABLE \"{schema}\".\"{name}\""
                ))
                .await
                .with_context(|| format!("adding {table} to publication {publication}"))?;
        }
    }
    Ok(())
}

/// The URL of a replication connection (`replication=database`).
pub fn replication_url(url: &str) -> String {
    if url.contains('?') {
        format!("{url}&replication=database")
    } else {
        format!("{url}?replication=database")
    }
}
