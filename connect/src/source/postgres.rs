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
//! 1. Checks ([`super::catalog`]): `wal_level = logical`; each table exists, is not
//!    partitioned, has a primary key (its columns, in column order, make the record key) and a
//!    replica identity that carries it. Each refusal names the table.
//! 2. The publication is created for the tables if missing (tables missing from an existing one
//!    are added); each table's topic `<prefix>.<schema>.<table>` is created (compacted) if
//!    missing.
//! 3. The position (key = the source's name in the positions topic) says whether a snapshot of
//!    this slot completed. With a slot and a completed snapshot, streaming resumes at the slot's
//!    confirmed position. Without a slot, the source records "snapshot in progress", creates the
//!    slot and copies the tables inside the snapshot it exports (`op = "r"`), and records the
//!    snapshot complete once every copied row is acknowledged. A slot whose snapshot was
//!    recorded in progress is dropped and the copy taken again; a slot the positions topic
//!    knows nothing of is left alone and the source stops with an error that says what to do.
//!    A copy taken again rewrites every row; rows deleted in between stay in the topic.
//! 4. Streaming: each transaction's changes are written in commit order, then handed to the
//!    confirmer, which waits until every record of the transaction (and of all before it) is
//!    durably acknowledged by Syncline and only then reports the transaction's end LSN to
//!    PostgreSQL as flushed. A crash anywhere makes PostgreSQL send again what was not
//!    confirmed. Source producers retry for days (not the default 30 s), so a broker outage
//!    stalls the source instead of failing records.
//! 5. No duplicates after a crash: each record's position header is its transaction's commit
//!    LSN and the change's ordinal in it (changes sharing an LSN, as COPY's rows do, stay
//!    apart). Before streaming, the source reads the last record of every partition it writes
//!    and skips every resent change at or before that position. Within a run, a reconnect's
//!    replay is skipped by commit LSN. Retries of a batch are exact through the idempotent
//!    producer. After a new snapshot, positions past its start (from an earlier history of the
//!    database, say a restored backup) are not trusted.
//!
//! # What is reported, not mirrored
//!
//! - `TRUNCATE`: a topic cannot be emptied by a record; the source logs it, counts it as an
//!   error in its status (state stays `streaming`) and goes on. Delete the topic's keys or
//!   recreate the topic if the truncation should reach readers.
//! - Changes of relations the source does not capture (a publication shared with more tables)
//!   are skipped and reported once per relation.
//! - Schema changes: a `Relation` message precedes the first change after an `ALTER TABLE`, and
//!   later changes carry the new columns (an added column appears in `after`, a dropped one
//!   disappears). Type changes change the column's JSON type accordingly. A renamed table is
//!   no longer captured under its old name (reported as above).
//!
//! # Residual risk
//!
//! A batch the broker refuses for good (not a timeout; records too large for a batch are
//! refused before they are sent) stops the source, but batches already sent behind it may
//! land; on restart their positions make the source skip the refused changes. The status
//! shows the error.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use pg_walstream::{
    ChangeEvent, EventType, LogicalReplicationStream, ReplicationStreamConfig, RetryConfig,
    RowData, SnapshotOutcome, StreamingMode,
};
use serde::{Deserialize, Serialize};
use syncline_client::{partition_for_key, DeliveryFuture, Producer, ProducerConfig};
use tokio::sync::mpsc;
use tokio_postgres::NoTls;

use super::catalog::{self, TableKey};
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
/// Snapshot rows in flight before the copy waits for their acknowledgements.
const SNAPSHOT_WINDOW: usize = 65_536;
/// Most topics one source writes (its tables' and those `route` names).
const OUTPUTS_MAX: usize = 1024;
/// How long a source's producer retries a batch: a broker outage stalls the source, it does
/// not fail records.
const SOURCE_DELIVERY_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);

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

/// A transaction's deliveries, confirmed once all are acknowledged. `end_lsn` is `None` for
/// the deliveries of a transaction cut by a reconnect: awaited, but nothing confirmed.
struct Pending {
    end_lsn: Option<u64>,
    deliveries: Vec<DeliveryFuture>,
}

/// A change ready to be transformed and written.
struct Change {
    op: Op,
    before: Option<Row>,
    after: Option<Row>,
    source: SourceInfo,
    position: Position,
}

/// The source's writing side: its tables and output topics.
struct Writer<'a> {
    config: &'a SourceConfig,
    ctx: &'a Context,
    tables: HashMap<(String, String), TableKey>,
    outputs: HashMap<String, Output>,
    /// Relations whose changes were skipped (not captured), reported once each.
    reported: HashSet<(String, String)>,
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

    let mut writer = Writer {
        config,
        ctx,
        tables: HashMap::new(),
        outputs: HashMap::new(),
        reported: HashSet::new(),
    };
    for name in &config.tables {
        let (schema, table) =
            split_table(name).ok_or_else(|| anyhow!("table {name:?} is not \"schema.table\""))?;
        let key = catalog::table_key(admin, schema, table).await?;
        if transform::routes(&config.transforms) && !key.identity_full {
            bail!(
                "table {schema}.{table}: a `route` transform needs REPLICA IDENTITY FULL (deletes \
                 and moved rows must carry the routed column): ALTER TABLE {schema}.{table} \
                 REPLICA IDENTITY FULL"
            );
        }
        writer
            .tables
            .insert((schema.to_owned(), table.to_owned()), key);
    }
    catalog::ensure_publication(admin, config).await?;

    let positions = ctx.client.table(&ctx.runtime.positions_topic).await?;
    let saved: Option<SourcePosition> = positions
        .get(config.name.as_bytes())
        .await?
        .and_then(|entry| serde_json::from_slice(&entry.value).ok());
    let slot = config.slot_name();
    let ours = saved.as_ref().filter(|p| p.slot == slot);
    let slot_exists = admin
        .query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?
        .is_some();
    let mut take_snapshot = config.snapshot && !slot_exists;
    if slot_exists && config.snapshot && !ours.is_some_and(|p| p.snapshot_complete) {
        if ours.is_none() {
            bail!(
                "replication slot {slot} exists, but the positions topic {} has no snapshot of \
                 source {:?} in it: to copy the tables again drop the slot (SELECT \
                 pg_drop_replication_slot('{slot}')); to stream from it without a copy set \
                 snapshot = false",
                ctx.runtime.positions_topic,
                config.name
            );
        }
        tracing::info!(source = %config.name, %slot, "the slot's snapshot never completed: dropping the slot to take it again");
        admin
            .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await
            .context("dropping the replication slot of an incomplete snapshot")?;
        take_snapshot = true;
    } else if !slot_exists && ours.is_some_and(|p| p.snapshot_complete) {
        tracing::warn!(source = %config.name, %slot, "the replication slot is gone: copying the tables again; rows deleted meanwhile stay in the topics");
    }
    if take_snapshot {
        let position = SourcePosition {
            slot: slot.clone(),
            snapshot_complete: false,
            updated_ms: now_ms(),
            ..SourcePosition::default()
        };
        positions
            .put(config.name.as_bytes(), serde_json::to_vec(&position)?)
            .await?;
    }

    let tables: Vec<(String, String)> = writer.tables.keys().cloned().collect();
    for (schema, table) in &tables {
        writer.open_output(&config.topic_of(schema, table)).await?;
    }

    let stream_config = ReplicationStreamConfig::builder(slot.clone(), config.publication_name())
        .with_protocol_version(1)
        .with_streaming_mode(StreamingMode::Off)
        .with_messages(config.heartbeat_ms > 0)
        .with_feedback_interval(Duration::from_secs(1))
        .with_retry_config(RetryConfig::default());
    let replication_url = catalog::replication_url(&config.url);
    let stream = LogicalReplicationStream::new(&replication_url, stream_config)
        .await
        .map_err(|e| anyhow!("opening a replication connection: {e}"))?;

    let mut snapshot_point = None;
    let mut stream = if take_snapshot {
        match stream
            .snapshot()
            .await
            .map_err(|e| anyhow!("creating the slot and its snapshot: {e}"))?
        {
            SnapshotOutcome::Available(snapshot) => {
                status.set_state("snapshotting");
                let consistent_point = snapshot.consistent_point().value();
                snapshot_point = Some(consistent_point);
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
                    let position = Position {
                        commit_lsn: consistent_point,
                        lsn: 0,
                    };
                    let change = Change {
                        op: Op::Read,
                        before: None,
                        after: Some(to_row(&relation, &row.data)),
                        source: source_info(
                            config,
                            &database,
                            &relation,
                            "true",
                            started_ms,
                            None,
                            consistent_point,
                            0,
                        ),
                        position,
                    };
                    if writer
                        .write(&relation, change, false, &mut deliveries)
                        .await?
                    {
                        copied += 1;
                    }
                    if deliveries.len() >= SNAPSHOT_WINDOW {
                        for delivery in deliveries.drain(..) {
                            delivery.await.context("writing a snapshot row")?;
                        }
                    }
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
    for output in writer.outputs.values_mut() {
        let topic = output.producer.topic().to_owned();
        output.tails = read_tail_positions(&ctx.client, &topic, output.partitions).await?;
        if let Some(point) = snapshot_point {
            clamp_tails(&topic, &mut output.tails, point);
        }
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
                let Some(end_lsn) = pending.end_lsn else {
                    continue;
                };
                feedback.update_flushed_lsn(end_lsn);
                feedback.update_applied_lsn(end_lsn);
                let previous = confirmed.fetch_max(end_lsn, Ordering::AcqRel);
                status.add_records(count);
                status.set_position(lsn_text(previous.max(end_lsn)));
            }
            anyhow::Ok(())
        }
    };
    let reporter = report(config, ctx, admin, &positions, &slot, &confirmed);
    let reader = async {
        let mut last_commit = 0u64;
        let mut relations: HashMap<u32, Relation> = HashMap::new();
        let mut transaction: Option<Transaction> = None;
        loop {
            let event: ChangeEvent = match events.next_event().await {
                Ok(event) => event,
                Err(pg_walstream::ReplicationError::Cancelled(_)) => return anyhow::Ok(()),
                Err(e) => bail!("replication stream: {e}"),
            };
            let lsn = event.lsn.value();
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
                    // A transaction cut by a reconnect: its records still count before any
                    // later confirmation.
                    if let Some(cut) = transaction.take() {
                        pending_tx
                            .send(Pending {
                                end_lsn: None,
                                deliveries: cut.deliveries,
                            })
                            .await
                            .map_err(|_| anyhow!("the confirmer stopped"))?;
                    }
                    let final_lsn = final_lsn.value();
                    transaction = Some(Transaction {
                        commit_lsn: final_lsn,
                        xid: transaction_id,
                        commit_ms: commit_timestamp.timestamp_millis(),
                        // A reconnect resends from the confirmed position: skip what this run
                        // already wrote.
                        replay: final_lsn <= last_commit,
                        ordinal: 0,
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
                            end_lsn: Some(end_lsn.value()),
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
                    let after = to_row(relation, &data);
                    let change = txn.change(
                        config,
                        &database,
                        relation,
                        Op::Create,
                        None,
                        Some(after),
                        lsn,
                    );
                    writer
                        .write(relation, change, true, &mut txn.deliveries)
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
                    let before = old_data.as_ref().map(|old| to_row(relation, old));
                    let after = to_row(relation, &new_data);
                    // A changed primary key moves the row: a delete of the old key first.
                    if let (Some(before), Some(key)) = (&before, writer.key_of(relation)) {
                        if key_json(before, &key.key_columns) != key_json(&after, &key.key_columns)
                        {
                            let delete = txn.change(
                                config,
                                &database,
                                relation,
                                Op::Delete,
                                Some(before.clone()),
                                None,
                                lsn,
                            );
                            writer
                                .write(relation, delete, true, &mut txn.deliveries)
                                .await?;
                        }
                    }
                    let change = txn.change(
                        config,
                        &database,
                        relation,
                        Op::Update,
                        before,
                        Some(after),
                        lsn,
                    );
                    writer
                        .write(relation, change, true, &mut txn.deliveries)
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
                    let before = to_row(relation, &old_data);
                    let change = txn.change(
                        config,
                        &database,
                        relation,
                        Op::Delete,
                        Some(before),
                        None,
                        lsn,
                    );
                    writer
                        .write(relation, change, true, &mut txn.deliveries)
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
                        lsn_text(lsn)
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
    for output in writer.outputs.into_values() {
        output.producer.close().await;
    }
    result
}

/// Refreshes the position record, sends heartbeats while idle, and reads the slot's lag.
async fn report(
    config: &SourceConfig,
    ctx: &Context,
    admin: &tokio_postgres::Client,
    positions: &syncline_client::Table,
    slot: &str,
    confirmed: &AtomicU64,
) -> anyhow::Result<()> {
    let mut written = 0;
    let mut moved_at = tokio::time::Instant::now();
    let heartbeat = Duration::from_millis(config.heartbeat_ms);
    let tick = if config.heartbeat_ms == 0 {
        POSITION_INTERVAL
    } else {
        POSITION_INTERVAL.min(heartbeat)
    };
    loop {
        tokio::time::sleep(tick).await;
        let lsn = confirmed.load(Ordering::Acquire);
        if lsn != 0 && lsn != written {
            let position = SourcePosition {
                slot: slot.to_owned(),
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
        // Idle: a message through the slot moves its confirmed position past the WAL that other
        // tables and databases wrote meanwhile.
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
}

/// After a new snapshot at `point`, no record of this slot's stream is stored yet: a tail past
/// the snapshot's own rows comes from an earlier history of the database and is not trusted.
fn clamp_tails(topic: &str, tails: &mut HashMap<u32, Position>, point: u64) {
    let start = Position {
        commit_lsn: point,
        lsn: 0,
    };
    for (partition, tail) in tails.iter_mut() {
        if *tail > start {
            tracing::warn!(%topic, partition, tail = %lsn_text(tail.commit_lsn), snapshot = %lsn_text(point), "records past the new snapshot's start come from an earlier history: not skipping by them");
            *tail = start;
        }
    }
}

/// A transaction being read.
struct Transaction {
    commit_lsn: u64,
    xid: u32,
    commit_ms: i64,
    replay: bool,
    /// Changes so far; each change's position is (commit LSN, its ordinal).
    ordinal: u64,
    deliveries: Vec<DeliveryFuture>,
}

impl Transaction {
    #[allow(clippy::too_many_arguments)]
    fn change(
        &mut self,
        config: &SourceConfig,
        database: &str,
        relation: &Relation,
        op: Op,
        before: Option<Row>,
        after: Option<Row>,
        lsn: u64,
    ) -> Change {
        self.ordinal += 1;
        Change {
            op,
            before,
            after,
            source: source_info(
                config,
                database,
                relation,
                "false",
                self.commit_ms,
                Some(self.xid),
                self.commit_lsn,
                lsn,
            ),
            position: Position {
                commit_lsn: self.commit_lsn,
                lsn: self.ordinal,
            },
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn source_info(
    config: &SourceConfig,
    database: &str,
    relation: &Relation,
    snapshot: &str,
    ts_ms: i64,
    tx_id: Option<u32>,
    commit_lsn: u64,
    lsn: u64,
) -> SourceInfo {
    SourceInfo {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        connector: "postgresql".to_owned(),
        name: config.topic_prefix.clone(),
        ts_ms,
        snapshot: snapshot.to_owned(),
        db: database.to_owned(),
        sequence: format!("[\"{commit_lsn}\",\"{lsn}\"]"),
        schema: relation.schema.clone(),
        table: relation.table.clone(),
        tx_id,
        lsn,
        commit_lsn,
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

impl Writer<'_> {
    /// The key of a captured relation; `None` (reported once) for one the source does not
    /// capture.
    fn key_of(&mut self, relation: &Relation) -> Option<&TableKey> {
        let name = (relation.schema.clone(), relation.table.clone());
        if !self.tables.contains_key(&name) {
            if self.reported.insert(name) {
                let message = format!(
                    "changes of {}.{} are skipped: the source does not capture it (renamed, or \
                     in a publication shared with other tables)",
                    relation.schema, relation.table
                );
                tracing::warn!(source = %self.config.name, "{message}");
                self.ctx.status.warn(&message);
            }
            return None;
        }
        self.tables.get(&name)
    }

    /// Transforms and writes one change; a delete (or an update a filter turned into one) also
    /// writes a tombstone, and an update that `route`s the row elsewhere deletes it from the
    /// topic it leaves. Skips records its partition already holds when `skip_written`. Returns
    /// whether anything was written.
    async fn write(
        &mut self,
        relation: &Relation,
        change: Change,
        skip_written: bool,
        deliveries: &mut Vec<DeliveryFuture>,
    ) -> anyhow::Result<bool> {
        let Some(table) = self.key_of(relation) else {
            return Ok(false);
        };
        let key_row = change
            .after
            .as_ref()
            .or(change.before.as_ref())
            .ok_or_else(|| anyhow!("a change with neither before nor after"))?;
        let key = key_json(key_row, &table.key_columns);
        let new_row = matches!(change.op, Op::Create | Op::Read);
        let rows = Rows {
            before: change.before,
            after: change.after,
            new_row,
        };
        let Some(rows) = transform::apply(&self.config.transforms, rows) else {
            return Ok(false);
        };
        let specs = &self.config.transforms;
        let home = self.config.topic_of(&relation.schema, &relation.table);
        let before_topic = rows
            .before
            .as_ref()
            .map(|row| transform::route(specs, row, &home));
        let Some(after) = rows.after else {
            // A delete, or an update a filter turned into one.
            let topic = before_topic.unwrap_or(home);
            let envelope = Envelope {
                before: rows.before,
                after: None,
                source: Some(change.source),
                op: Op::Delete,
                ts_ms: now_ms(),
            };
            self.emit(
                &topic,
                &key,
                &envelope,
                change.position,
                skip_written,
                deliveries,
            )
            .await?;
            return Ok(true);
        };
        let topic = transform::route(specs, &after, &home);
        if let Some(left) = before_topic.filter(|t| change.op == Op::Update && *t != topic) {
            let moved = Envelope {
                before: rows.before.clone(),
                after: None,
                source: Some(change.source.clone()),
                op: Op::Delete,
                ts_ms: now_ms(),
            };
            self.emit(
                &left,
                &key,
                &moved,
                change.position,
                skip_written,
                deliveries,
            )
            .await?;
        }
        let envelope = Envelope {
            before: rows.before,
            after: Some(after),
            source: Some(change.source),
            op: change.op,
            ts_ms: now_ms(),
        };
        self.emit(
            &topic,
            &key,
            &envelope,
            change.position,
            skip_written,
            deliveries,
        )
        .await?;
        Ok(true)
    }

    /// Enqueues one envelope (and a tombstone after a delete) unless its partition already
    /// holds its position.
    async fn emit(
        &mut self,
        topic: &str,
        key: &[u8],
        envelope: &Envelope,
        position: Position,
        skip_written: bool,
        deliveries: &mut Vec<DeliveryFuture>,
    ) -> anyhow::Result<()> {
        if !self.outputs.contains_key(topic) {
            self.open_output(topic).await?;
            let output = self
                .outputs
                .get_mut(topic)
                .ok_or_else(|| anyhow!("output {topic} vanished"))?;
            output.tails = read_tail_positions(&self.ctx.client, topic, output.partitions).await?;
        }
        let output = self
            .outputs
            .get_mut(topic)
            .ok_or_else(|| anyhow!("output {topic} vanished"))?;
        let partition = partition_for_key(key, output.partitions);
        let tail = output.tails.entry(partition).or_default();
        if skip_written && position <= *tail {
            return Ok(());
        }
        *tail = (*tail).max(position);
        let value = serde_json::to_vec(envelope)?;
        let header = position.to_header();
        let headers = [(POSITION_HEADER, header.as_slice())];
        let describe = |e: syncline_client::Error| {
            anyhow!(
                "writing the change of key {} to {topic}: {e}",
                String::from_utf8_lossy(key)
            )
        };
        deliveries.push(
            output
                .producer
                .enqueue(Some(key), Some(&value), &headers)
                .await
                .map_err(describe)?,
        );
        if envelope.op == Op::Delete {
            deliveries.push(
                output
                    .producer
                    .enqueue(Some(key), None, &headers)
                    .await
                    .map_err(describe)?,
            );
        }
        Ok(())
    }

    async fn open_output(&mut self, topic: &str) -> anyhow::Result<()> {
        if self.outputs.len() >= OUTPUTS_MAX {
            bail!(
                "topic {topic} would be the source's {}th: at most {OUTPUTS_MAX} (check the \
                 `route` transform's field)",
                OUTPUTS_MAX + 1
            );
        }
        let partitions =
            ensure_topic(&self.ctx.client, topic, self.config.partitions, true).await?;
        let producer = self
            .ctx
            .client
            .producer(
                topic,
                ProducerConfig {
                    delivery_timeout: SOURCE_DELIVERY_TIMEOUT,
                    ..ProducerConfig::default()
                },
            )
            .await?;
        self.outputs.insert(
            topic.to_owned(),
            Output {
                producer,
                partitions,
                tails: HashMap::new(),
            },
        );
        Ok(())
    }
}
