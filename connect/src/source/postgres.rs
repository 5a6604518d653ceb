//! The PostgreSQL source: logical replication with the `pgoutput` plugin, through the
//! `pg_walstream` crate, into one table topic per source table.
//!
//! # Why pg_walstream
//!
//! We compared the two maintained crates that speak the replication protocol. Both stream
//! `pgoutput`, authenticate with SCRAM and run on tokio. `pgwire-replication` is smaller, but
//! it cannot create a slot that exports its snapshot, so the initial copy would be taken at
//! another moment than the slot's start, and rows written in between would be lost or
//! doubled. `pg_walstream` creates the slot with `EXPORT_SNAPSHOT`, reads the tables inside
//! that very snapshot, and only then starts streaming from the slot's consistent point, so the
//! copy and the stream meet with no gap and no overlap. It also decodes `Relation` messages,
//! which is how schema changes arrive. Its cost is a heavier build (aws-lc-rs for its TLS).
//!
//! # Life of a source
//!
//! 1. Checks: `wal_level = logical`; each table exists and has a primary key (its columns, in
//!    column order, make the record key). A missing table or key is a clear error naming it.
//! 2. The publication is created for the tables if missing (tables missing from an existing one
//!    are added); each table's topic `<prefix>.<schema>.<table>` is created (compacted) if
//!    missing.
//! 3. The position (key = the source's name in the positions topic) says whether a snapshot of
//!    this slot completed. With a slot and a completed snapshot, streaming resumes at the slot's
//!    confirmed position. Otherwise the slot is dropped if present, created again, and the
//!    tables are copied inside the snapshot it exports (`op = "r"`); the position is marked
//!    complete once every copied row is acknowledged. An interrupted snapshot is started over:
//!    its rows are written again, which leaves each table topic with the same latest rows.
//! 4. Streaming: each transaction's changes are written in commit order, then handed to the
//!    confirmer, which waits until every record of the transaction (and of all before it) is
//!    durably acknowledged by Syncline and only then reports the transaction's end LSN to
//!    PostgreSQL as flushed. A crash anywhere makes PostgreSQL send again what was not
//!    confirmed; nothing is skipped.
//! 5. No duplicates after a crash: before streaming, the source reads the last record of every
//!    partition it writes and its position header (commit LSN, change LSN), and skips every
//!    resent change at or before it. Within a run, a reconnect's replay is skipped by commit
//!    LSN. Retries of a batch are exact through the idempotent producer.
//!
//! # What is reported, not mirrored
//!
//! - `TRUNCATE`: a topic cannot be emptied by a record; the source logs it, counts it as an
//!   error in its status (state stays `streaming`) and goes on. Delete the topic's keys or
//!   recreate the topic if the truncation should reach readers.
//! - Tables without a primary key are refused at start.
//! - Schema changes: a `Relation` message precedes the first change after an `ALTER TABLE`, and
//!   later changes carry the new columns (an added column appears in `after`, a dropped one
//!   disappears). Type changes change the column's JSON type accordingly.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use pg_walstream::{
    ChangeEvent, EventType, LogicalReplicationStream, ReplicationStreamConfig, RetryConfig,
    RowData, SnapshotOutcome, StreamingMode,
};
use serde::{Deserialize, Serialize};
use syncline_client::{partition_for_key, DeliveryFuture, Producer};
use tokio::sync::mpsc;
use tokio_postgres::NoTls;

use crate::config::{split_table, SourceConfig};
use crate::envelope::{
    column_json, key_json, lsn_text, now_ms, Envelope, Op, Position, Row, SourceInfo,
    POSITION_HEADER,
};
use crate::runtime::{ensure_topic, read_tail_positions, Context};
use crate::transform::{self, Rows};

/// Transactions written but not yet confirmed; the reader waits when this many are pending.
const PENDING_TRANSACTIONS_MAX: usize = 4096;
/// How often the position record and the lag are refreshed.
const POSITION_INTERVAL: Duration = Duration::from_secs(1);

/// The source's record in the positions topic.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SourcePosition {
    /// The slot this position belongs to.
    pub slot: String,
    /// Whether the initial snapshot of this slot was completely acknowledged.
    pub snapshot_complete: bool,
    /// The slot's consistent point (the snapshot's LSN).
    pub consistent_point: Option<String>,
    /// The last end LSN confirmed to PostgreSQL.
    pub confirmed_lsn: Option<String>,
    pub updated_ms: i64,
}

/// A captured table: its topic and key columns.
#[derive(Debug, Clone)]
struct TableInfo {
    key_columns: Vec<String>,
}

/// Column types of a relation, from the latest `Relation` message (or the snapshot's catalog).
#[derive(Debug, Clone)]
struct Relation {
    schema: String,
    table: String,
    types: HashMap<String, u32>,
}

/// One output topic of the source.
struct Output {
    producer: Producer,
    partitions: u32,
    /// Per partition: the position of the last record known to be stored or enqueued.
    tails: HashMap<u32, Position>,
}

/// A transaction's deliveries, confirmed once all are acknowledged.
struct Pending {
    end_lsn: u64,
    deliveries: Vec<DeliveryFuture>,
}

/// Runs the source until it fails or `ctx.cancel` fires.
pub async fn run(config: &SourceConfig, ctx: &Context) -> anyhow::Result<()> {
    let (admin, connection) = tokio_postgres::connect(&config.url, NoTls)
        .await
        .with_context(|| format!("connecting to {}", crate::config::redact(&config.url)))?;
    let connection_task = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "source admin connection ended");
        }
    });
    let result = run_with(config, ctx, &admin).await;
    connection_task.abort();
    result
}

async fn run_with(
    config: &SourceConfig,
    ctx: &Context,
    admin: &tokio_postgres::Client,
) -> anyhow::Result<()> {
    let status = &ctx.status;
    status.set_state("starting");
    let wal_level: String = admin.query_one("SHOW wal_level", &[]).await?.get(0);
    if wal_level != "logical" {
        bail!(
            "wal_level is {wal_level:?}: set wal_level = logical in postgresql.conf and restart \
             PostgreSQL"
        );
    }
    let database: String = admin
        .query_one("SELECT current_database()", &[])
        .await?
        .get(0);

    let mut tables = HashMap::new();
    for name in &config.tables {
        let (schema, table) =
            split_table(name).ok_or_else(|| anyhow!("table {name:?} is not \"schema.table\""))?;
        let key_columns = primary_key(admin, schema, table).await?;
        tables.insert(
            (schema.to_owned(), table.to_owned()),
            TableInfo { key_columns },
        );
    }
    ensure_publication(admin, config).await?;

    let positions = ctx.client.table(&ctx.runtime.positions_topic).await?;
    let saved: Option<SourcePosition> = positions
        .get(config.name.as_bytes())
        .await?
        .and_then(|entry| serde_json::from_slice(&entry.value).ok());
    let slot = config.slot_name();
    let slot_exists = admin
        .query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?
        .is_some();
    let snapshot_done = saved
        .as_ref()
        .is_some_and(|p| p.slot == slot && p.snapshot_complete);
    if slot_exists && config.snapshot && !snapshot_done {
        tracing::info!(source = %config.name, %slot, "the slot's snapshot never completed: dropping the slot to take it again");
        admin
            .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await
            .context("dropping the replication slot of an incomplete snapshot")?;
    } else if !slot_exists && snapshot_done {
        tracing::warn!(source = %config.name, %slot, "the replication slot is gone: copying the tables again; rows deleted meanwhile stay in the topics");
    }

    let mut outputs: HashMap<String, Output> = HashMap::new();
    for (schema, table) in tables.keys() {
        let topic = config.topic_of(schema, table);
        open_output(ctx, config, &mut outputs, &topic).await?;
    }

    let stream_config = ReplicationStreamConfig::builder(slot.clone(), config.publication_name())
        .with_protocol_version(1)
        .with_streaming_mode(StreamingMode::Off)
        .with_messages(config.heartbeat_ms > 0)
        .with_feedback_interval(Duration::from_secs(1))
        .with_retry_config(RetryConfig::default());
    let replication_url = replication_url(&config.url);
    let stream = LogicalReplicationStream::new(&replication_url, stream_config)
        .await
        .map_err(|e| anyhow!("opening a replication connection: {e}"))?;

    let mut relations: HashMap<u32, Relation> = HashMap::new();
    let mut stream = if config.snapshot {
        match stream
            .snapshot()
            .await
            .map_err(|e| anyhow!("creating the slot and its snapshot: {e}"))?
        {
            SnapshotOutcome::Available(snapshot) => {
                status.set_state("snapshotting");
                let consistent_point = snapshot.consistent_point().value();
                tracing::info!(source = %config.name, lsn = %lsn_text(consistent_point), "copying the tables");
                let mut rows = snapshot.rows();
                let started_ms = now_ms();
                let mut deliveries = Vec::new();
                let mut copied = 0u64;
                while let Some(row) = rows
                    .next_row()
                    .await
                    .map_err(|e| anyhow!("reading the snapshot: {e}"))?
                {
                    if ctx.cancel.is_cancelled() {
                        bail!("cancelled during the snapshot");
                    }
                    let relation = Relation {
                        schema: row.relation.namespace.to_string(),
                        table: row.relation.relation_name.to_string(),
                        types: row
                            .relation
                            .columns
                            .iter()
                            .map(|c| (c.name.to_string(), c.type_id))
                            .collect(),
                    };
                    let Some(info) = tables.get(&(relation.schema.clone(), relation.table.clone()))
                    else {
                        continue;
                    };
                    let after = to_row(&relation, &row.data);
                    let source = source_info(
                        config,
                        &database,
                        &relation,
                        "true",
                        started_ms,
                        None,
                        Position {
                            commit_lsn: consistent_point,
                            lsn: 0,
                        },
                    );
                    let change = Change {
                        op: Op::Read,
                        before: None,
                        after: Some(after),
                        source,
                    };
                    let position = Position {
                        commit_lsn: consistent_point,
                        lsn: 0,
                    };
                    write_change(
                        ctx,
                        config,
                        &mut outputs,
                        info,
                        &relation,
                        change,
                        position,
                        false,
                        &mut deliveries,
                    )
                    .await?;
                    copied += 1;
                }
                let stream = rows
                    .finish()
                    .await
                    .map_err(|e| anyhow!("ending the snapshot: {e}"))?;
                for delivery in deliveries {
                    delivery.await.context("writing a snapshot row")?;
                }
                status.add_records(copied);
                let position = SourcePosition {
                    slot: slot.clone(),
                    snapshot_complete: true,
                    consistent_point: Some(lsn_text(consistent_point)),
                    confirmed_lsn: None,
                    updated_ms: now_ms(),
                };
                positions
                    .put(config.name.as_bytes(), serde_json::to_vec(&position)?)
                    .await?;
                tracing::info!(source = %config.name, rows = copied, "snapshot complete");
                stream
            }
            SnapshotOutcome::Unavailable(stream) => stream,
        }
    } else {
        let mut stream = stream;
        stream
            .ensure_replication_slot()
            .await
            .map_err(|e| anyhow!("creating the replication slot: {e}"))?;
        stream
    };

    // Tails: where each partition's records end, so that a resent change is not stored twice.
    for output in outputs.values_mut() {
        let topic = output.producer.topic().to_owned();
        output.tails = read_tail_positions(&ctx.client, &topic, output.partitions).await?;
    }

    stream
        .start(None)
        .await
        .map_err(|e| anyhow!("starting replication from slot {slot}: {e}"))?;
    let feedback = stream.shared_lsn_feedback.clone();
    let mut events = stream.into_stream(ctx.cancel.child_token());
    status.set_state("streaming");
    tracing::info!(source = %config.name, %slot, "streaming");

    let confirmed = Arc::new(AtomicU64::new(0));
    let (pending_tx, mut pending_rx) = mpsc::channel::<Pending>(PENDING_TRANSACTIONS_MAX);
    let confirmer = {
        let confirmed = confirmed.clone();
        let status = status.clone();
        async move {
            while let Some(pending) = pending_rx.recv().await {
                let count = pending.deliveries.len() as u64;
                for delivery in pending.deliveries {
                    delivery
                        .await
                        .context("a change was not acknowledged by Syncline")?;
                }
                feedback.update_flushed_lsn(pending.end_lsn);
                feedback.update_applied_lsn(pending.end_lsn);
                confirmed.store(pending.end_lsn, Ordering::Release);
                status.add_records(count);
                status.set_position(lsn_text(pending.end_lsn));
            }
            anyhow::Ok(())
        }
    };
    let reporter = {
        let confirmed = confirmed.clone();
        let positions = &positions;
        let slot = slot.clone();
        async move {
            let mut written = 0;
            let mut moved_at = tokio::time::Instant::now();
            let heartbeat = Duration::from_millis(config.heartbeat_ms);
            loop {
                let tick = if config.heartbeat_ms == 0 {
                    POSITION_INTERVAL
                } else {
                    POSITION_INTERVAL.min(heartbeat)
                };
                tokio::time::sleep(tick).await;
                let lsn = confirmed.load(Ordering::Acquire);
                if lsn != 0 && lsn != written {
                    let position = SourcePosition {
                        slot: slot.clone(),
                        snapshot_complete: true,
                        consistent_point: None,
                        confirmed_lsn: Some(lsn_text(lsn)),
                        updated_ms: now_ms(),
                    };
                    positions
                        .put(config.name.as_bytes(), serde_json::to_vec(&position)?)
                        .await?;
                    written = lsn;
                    moved_at = tokio::time::Instant::now();
                }
                // Idle: a message through the slot moves its confirmed position past the WAL
                // that other tables and databases wrote meanwhile.
                if config.heartbeat_ms > 0 && moved_at.elapsed() >= heartbeat {
                    admin
                        .execute(
                            "SELECT pg_logical_emit_message(true, 'syncline.heartbeat', '')",
                            &[],
                        )
                        .await
                        .context("writing a heartbeat message")?;
                    moved_at = tokio::time::Instant::now();
                }
                let lag: Option<i64> = admin
                    .query_one(
                        "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint \
                         FROM pg_replication_slots WHERE slot_name = $1",
                        &[&slot],
                    )
                    .await
                    .ok()
                    .and_then(|row| row.get(0));
                if let Some(lag) = lag {
                    ctx.status.set_lag(lag.max(0) as u64);
                }
            }
            #[allow(unreachable_code)]
            anyhow::Ok(())
        }
    };
    let reader = async {
        let mut last_commit = 0u64;
        let mut transaction: Option<Transaction> = None;
        loop {
            let event: ChangeEvent = match events.next_event().await {
                Ok(event) => event,
                Err(pg_walstream::ReplicationError::Cancelled(_)) => return anyhow::Ok(()),
                Err(e) => bail!("replication stream: {e}"),
            };
            match event.event_type {
                EventType::Relation {
                    relation_id,
                    namespace,
                    relation_name,
                    columns,
                    ..
                } => {
                    relations.insert(
                        relation_id,
                        Relation {
                            schema: namespace.to_string(),
                            table: relation_name.to_string(),
                            types: columns
                                .iter()
                                .map(|c| (c.name.to_string(), c.type_id))
                                .collect(),
                        },
                    );
                }
                EventType::Begin {
                    transaction_id,
                    final_lsn,
                    commit_timestamp,
                } => {
                    let final_lsn = final_lsn.value();
                    transaction = Some(Transaction {
                        commit_lsn: final_lsn,
                        xid: transaction_id,
                        commit_ms: commit_timestamp.timestamp_millis(),
                        // A reconnect resends from the confirmed position: skip what this run
                        // already wrote.
                        replay: final_lsn <= last_commit,
                        deliveries: Vec::new(),
                    });
                }
                EventType::Commit { end_lsn, .. } => {
                    let Some(done) = transaction.take() else {
                        continue;
                    };
                    if !done.replay {
                        last_commit = done.commit_lsn;
                    }
                    pending_tx
                        .send(Pending {
                            end_lsn: end_lsn.value(),
                            deliveries: done.deliveries,
                        })
                        .await
                        .map_err(|_| anyhow!("the confirmer stopped"))?;
                }
                EventType::Insert {
                    relation_oid, data, ..
                } => {
                    let Some(txn) = transaction.as_mut().filter(|t| !t.replay) else {
                        continue;
                    };
                    let relation = relation_of(&relations, relation_oid)?;
                    let Some(info) = tables.get(&(relation.schema.clone(), relation.table.clone()))
                    else {
                        continue;
                    };
                    let position = Position {
                        commit_lsn: txn.commit_lsn,
                        lsn: event.lsn.value(),
                    };
                    let change = Change {
                        op: Op::Create,
                        before: None,
                        after: Some(to_row(relation, &data)),
                        source: txn.source(config, &database, relation, position),
                    };
                    write_change(
                        ctx,
                        config,
                        &mut outputs,
                        info,
                        relation,
                        change,
                        position,
                        true,
                        &mut txn.deliveries,
                    )
                    .await?;
                }
                EventType::Update {
                    relation_oid,
                    old_data,
                    new_data,
                    ..
                } => {
                    let Some(txn) = transaction.as_mut().filter(|t| !t.replay) else {
                        continue;
                    };
                    let relation = relation_of(&relations, relation_oid)?;
                    let Some(info) = tables.get(&(relation.schema.clone(), relation.table.clone()))
                    else {
                        continue;
                    };
                    let position = Position {
                        commit_lsn: txn.commit_lsn,
                        lsn: event.lsn.value(),
                    };
                    let before = old_data.as_ref().map(|old| to_row(relation, old));
                    let after = to_row(relation, &new_data);
                    // A changed primary key moves the row: a delete of the old key first.
                    if let Some(before) = &before {
                        if key_json(before, &info.key_columns)
                            != key_json(&after, &info.key_columns)
                        {
                            let delete = Change {
                                op: Op::Delete,
                                before: Some(before.clone()),
                                after: None,
                                source: txn.source(config, &database, relation, position),
                            };
                            write_change(
                                ctx,
                                config,
                                &mut outputs,
                                info,
                                relation,
                                delete,
                                position,
                                true,
                                &mut txn.deliveries,
                            )
                            .await?;
                        }
                    }
                    let change = Change {
                        op: Op::Update,
                        before,
                        after: Some(after),
                        source: txn.source(config, &database, relation, position),
                    };
                    write_change(
                        ctx,
                        config,
                        &mut outputs,
                        info,
                        relation,
                        change,
                        position,
                        true,
                        &mut txn.deliveries,
                    )
                    .await?;
                }
                EventType::Delete {
                    relation_oid,
                    old_data,
                    ..
                } => {
                    let Some(txn) = transaction.as_mut().filter(|t| !t.replay) else {
                        continue;
                    };
                    let relation = relation_of(&relations, relation_oid)?;
                    let Some(info) = tables.get(&(relation.schema.clone(), relation.table.clone()))
                    else {
                        continue;
                    };
                    let position = Position {
                        commit_lsn: txn.commit_lsn,
                        lsn: event.lsn.value(),
                    };
                    let change = Change {
                        op: Op::Delete,
                        before: Some(to_row(relation, &old_data)),
                        after: None,
                        source: txn.source(config, &database, relation, position),
                    };
                    write_change(
                        ctx,
                        config,
                        &mut outputs,
                        info,
                        relation,
                        change,
                        position,
                        true,
                        &mut txn.deliveries,
                    )
                    .await?;
                }
                EventType::Truncate {
                    tables: truncated, ..
                } => {
                    if transaction.as_ref().is_some_and(|t| t.replay) {
                        continue;
                    }
                    let names: Vec<String> = truncated.iter().map(|t| t.to_string()).collect();
                    let message = format!(
                        "TRUNCATE of {} at {} is not mirrored: the topics keep their rows \
                         (delete their keys or recreate the topics)",
                        names.join(", "),
                        lsn_text(event.lsn.value())
                    );
                    tracing::warn!(source = %config.name, "{message}");
                    status.warn(&message);
                }
                _ => {}
            }
        }
    };
    let result = tokio::select! {
        result = reader => result,
        result = confirmer => result.and_then(|()| Err(anyhow!("the confirmer stopped"))),
        result = reporter => result,
    };
    let _ = events.shutdown().await;
    for output in outputs.into_values() {
        output.producer.close().await;
    }
    result
}

/// A transaction being read.
struct Transaction {
    commit_lsn: u64,
    xid: u32,
    commit_ms: i64,
    replay: bool,
    deliveries: Vec<DeliveryFuture>,
}

impl Transaction {
    fn source(
        &self,
        config: &SourceConfig,
        database: &str,
        relation: &Relation,
        position: Position,
    ) -> SourceInfo {
        source_info(
            config,
            database,
            relation,
            "false",
            self.commit_ms,
            Some(self.xid),
            position,
        )
    }
}

/// A change before it is encoded.
struct Change {
    op: Op,
    before: Option<Row>,
    after: Option<Row>,
    source: SourceInfo,
}

fn source_info(
    config: &SourceConfig,
    database: &str,
    relation: &Relation,
    snapshot: &str,
    ts_ms: i64,
    tx_id: Option<u32>,
    position: Position,
) -> SourceInfo {
    SourceInfo {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        connector: "postgresql".to_owned(),
        name: config.topic_prefix.clone(),
        ts_ms,
        snapshot: snapshot.to_owned(),
        db: database.to_owned(),
        sequence: format!("[\"{}\",\"{}\"]", position.commit_lsn, position.lsn),
        schema: relation.schema.clone(),
        table: relation.table.clone(),
        tx_id,
        lsn: position.lsn,
        commit_lsn: position.commit_lsn,
    }
}

fn relation_of(relations: &HashMap<u32, Relation>, oid: u32) -> anyhow::Result<&Relation> {
    relations
        .get(&oid)
        .ok_or_else(|| anyhow!("a change of relation {oid} came before its Relation message"))
}

fn to_row(relation: &Relation, data: &RowData) -> Row {
    let mut row = Row::with_capacity(relation.types.len());
    for (name, value) in data.iter() {
        let type_id = relation.types.get(name.as_ref()).copied().unwrap_or(25);
        row.insert(name.to_string(), column_json(type_id, value));
    }
    row
}

/// Transforms, encodes and enqueues one change (and a tombstone after a delete); skips it if
/// `skip_written` and its partition already holds it.
#[allow(clippy::too_many_arguments)]
async fn write_change(
    ctx: &Context,
    config: &SourceConfig,
    outputs: &mut HashMap<String, Output>,
    info: &TableInfo,
    relation: &Relation,
    change: Change,
    position: Position,
    skip_written: bool,
    deliveries: &mut Vec<DeliveryFuture>,
) -> anyhow::Result<()> {
    let key_row = change
        .after
        .as_ref()
        .or(change.before.as_ref())
        .ok_or_else(|| anyhow!("a change with neither before nor after"))?;
    let key = key_json(key_row, &info.key_columns);
    let rows = Rows {
        before: change.before,
        after: change.after,
        topic: config.topic_of(&relation.schema, &relation.table),
    };
    let Some(rows) = transform::apply(&config.transforms, rows) else {
        return Ok(());
    };
    if !outputs.contains_key(&rows.topic) {
        open_output(ctx, config, outputs, &rows.topic).await?;
        let output = outputs
            .get_mut(&rows.topic)
            .ok_or_else(|| anyhow!("output {} vanished", rows.topic))?;
        output.tails = read_tail_positions(&ctx.client, &rows.topic, output.partitions).await?;
    }
    let output = outputs
        .get_mut(&rows.topic)
        .ok_or_else(|| anyhow!("output {} vanished", rows.topic))?;
    let partition = partition_for_key(&key, output.partitions);
    let tail = output.tails.entry(partition).or_default();
    if skip_written && position <= *tail {
        return Ok(());
    }
    *tail = (*tail).max(position);
    let envelope = Envelope {
        before: rows.before,
        after: rows.after,
        source: Some(change.source),
        op: change.op,
        ts_ms: now_ms(),
    };
    let value = serde_json::to_vec(&envelope)?;
    let header = position.to_header();
    let headers = [(POSITION_HEADER, header.as_slice())];
    deliveries.push(
        output
            .producer
            .enqueue(Some(&key), Some(&value), &headers)
            .await?,
    );
    if change.op == Op::Delete {
        deliveries.push(output.producer.enqueue(Some(&key), None, &headers).await?);
    }
    Ok(())
}

async fn open_output(
    ctx: &Context,
    config: &SourceConfig,
    outputs: &mut HashMap<String, Output>,
    topic: &str,
) -> anyhow::Result<()> {
    let partitions = ensure_topic(&ctx.client, topic, config.partitions, true).await?;
    let producer = ctx
        .client
        .producer(topic, syncline_client::ProducerConfig::default())
        .await?;
    outputs.insert(
        topic.to_owned(),
        Output {
            producer,
            partitions,
            tails: HashMap::new(),
        },
    );
    Ok(())
}

/// The primary key's columns in column order; an error naming the table if it has none or
/// does not exist.
async fn primary_key(
    admin: &tokio_postgres::Client,
    schema: &str,
    table: &str,
) -> anyhow::Result<Vec<String>> {
    let exists = admin
        .query_opt(
            "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
            &[&schema, &table],
        )
        .await?;
    if exists.is_none() {
        bail!("table {schema}.{table} does not exist");
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
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

/// Creates the publication for the source's tables if missing, and adds tables it lacks.
async fn ensure_publication(
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
fn replication_url(url: &str) -> String {
    if url.contains('?') {
        format!("{url}&replication=database")
    } else {
        format!("{url}?replication=database")
    }
}
