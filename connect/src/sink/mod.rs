//! Sinks: topics applied to a database, a cache or a webhook.
//!
//! Each sink runs `tasks` members of its consumer group (`connect.<name>` unless `group` says
//! otherwise); every `connect` process running the same sink joins the same group, so the
//! partitions spread over all of them. A member takes up to `batch_size` records (waiting at
//! most [`LINGER`] for more once it has one), reads each value as a change
//! ([`crate::envelope::sink_change`]), applies the transforms, hands the batch to its target,
//! and commits the group's offsets once the target has applied it.
//!
//! # Delivery
//!
//! - Redis and HTTP: at least once. A crash between applying a batch and committing it applies
//!   the batch again (both writes are idempotent by key: a SET of the same value, a webhook that
//!   receives each record's topic, partition and offset to deduplicate by). An HTTP batch the
//!   webhook keeps refusing goes to the sink's dead-letter topic (`http` module doc).
//! - PostgreSQL: exactly once. The batch and the next offset of each of its partitions are
//!   written in one database transaction (table `syncline_sink_offsets`, in the target table's
//!   schema), and records below the stored offset are skipped, so a batch applied before a
//!   crash is not applied again. A member still starts reading at the group's committed
//!   offset, and the stored offsets only skip: after the database is restored to an earlier
//!   state, the records between its stored offsets and the group's commit are not applied
//!   again (`postgres` module doc).
//! - A record whose value cannot be read as a change (not JSON, not an object) is skipped and
//!   counted as an error in the sink's status, with the reason; it never stops the sink. The
//!   HTTP sink sends such records as they are (`op = "raw"`).
//! - A failing target (unreachable, refusing the write) fails the member; the runtime starts
//!   it again with backoff, from the last commit.
//!
//! Members take their records with `processed_on_commit_only`: a partition revoked while a
//! batch is in hand is committed only up to the last applied batch, so the next owner applies
//! the batch again rather than skipping it. And before applying a batch, a member drops the
//! records of partitions no longer in its assignment (revoked, or lost with its session, while
//! it gathered the batch): their next owner applies them, and an old owner that applied them
//! after the new one had moved on would write older rows over newer ones. A revocation during
//! the apply itself remains possible: the PostgreSQL sink skips such records by its stored
//! offsets; for Redis and HTTP it is part of at least once.

mod http;
mod postgres;
mod redis;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use syncline_client::{GroupConsumer, GroupConsumerConfig, TopicPartition};

use crate::config::{SinkConfig, SinkKind};
use crate::envelope::{sink_change, Row};
use crate::runtime::Context;
use crate::transform::{self, Rows};

/// Longest time between group commits while a member is behind (it commits after every batch
/// once caught up). A crash re-delivers at most this much to the next owner: the PostgreSQL
/// sink skips it by its stored offsets, Redis and HTTP apply it again (at least once).
pub const COMMIT_INTERVAL: Duration = Duration::from_secs(1);

/// How long a member waits for more records once it holds one, before it applies the batch.
pub const LINGER: Duration = Duration::from_millis(20);

/// One record for a target.
#[derive(Debug, Clone)]
pub struct SinkRecord {
    pub topic: Arc<str>,
    pub partition: u32,
    pub offset: u64,
    pub key: Option<Bytes>,
    /// The raw value (`None`: a tombstone).
    pub value: Option<Bytes>,
    /// The row to write; `None` deletes the key (unless `raw`).
    pub after: Option<Row>,
    /// `false` when a filter dropped the record, or its value could not be read and the
    /// target cannot send it as it is: the target skips it but its offset counts as applied.
    pub apply: bool,
    /// The value could not be read as a change (not JSON, not an object), so `after` is `None`
    /// without meaning a delete. Only the HTTP sink applies such a record (`op = "raw"`, the
    /// value as a string); for the others `apply` is `false`.
    pub raw: bool,
}

/// Where a sink writes.
enum Target {
    Redis(redis::RedisTarget),
    /// Boxed: the largest by far, and there is one target per member.
    Postgres(Box<postgres::PostgresTarget>),
    Http(http::HttpTarget),
}

impl Target {
    async fn open(config: &SinkConfig, ctx: &Context) -> anyhow::Result<Target> {
        Ok(match config.kind {
            SinkKind::Redis => Target::Redis(redis::RedisTarget::open(config).await?),
            SinkKind::Postgres => {
                Target::Postgres(Box::new(postgres::PostgresTarget::open(config).await?))
            }
            SinkKind::Http => Target::Http(http::HttpTarget::open(config, ctx).await?),
        })
    }

    async fn apply(&mut self, batch: &[SinkRecord], ctx: &Context) -> anyhow::Result<()> {
        match self {
            Target::Redis(target) => target.apply(batch, ctx).await,
            Target::Postgres(target) => {
                let applied = target.apply(batch).await;
                for warning in target.take_warnings() {
                    tracing::warn!(sink = %ctx.status.connector, "{warning}");
                    ctx.status.warn(&warning);
                }
                applied
            }
            Target::Http(target) => target.apply(batch).await,
        }
    }
}

/// How often a sink's lag (its group's, over its topics) is read.
const LAG_INTERVAL: Duration = Duration::from_secs(2);

/// Runs the sink's tasks until one fails or the runtime stops.
pub async fn run(config: &SinkConfig, ctx: &Context) -> anyhow::Result<()> {
    // A source of the same file may be about to create the topics: wait for them quietly.
    for topic in &config.topics {
        let mut said = false;
        while ctx.client.describe_topic(topic).await.is_err() {
            if !said {
                tracing::info!(sink = %config.name, %topic, "waiting for the topic to exist");
                said = true;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = ctx.cancel.cancelled() => return Ok(()),
            }
        }
    }
    let mut members = tokio::task::JoinSet::new();
    for task in 0..config.tasks {
        let config = config.clone();
        let ctx = ctx.clone();
        members.spawn(async move { member(&config, &ctx, task).await });
    }
    ctx.status.set_state("running");
    let lag = async {
        let group = config.group_name();
        loop {
            tokio::time::sleep(LAG_INTERVAL).await;
            if let Ok(description) = ctx.client.describe_group(&group).await {
                let lag: u64 = description
                    .partitions
                    .iter()
                    .filter(|p| config.topics.contains(&p.topic))
                    .map(|p| p.lag)
                    .sum();
                ctx.status.set_lag(lag);
            }
        }
    };
    tokio::pin!(lag);
    loop {
        tokio::select! {
            joined = members.join_next() => match joined {
                None => return Ok(()),
                Some(Ok(Ok(()))) => {}
                Some(Ok(Err(e))) => return Err(e),
                Some(Err(e)) => anyhow::bail!("a sink task panicked: {e}"),
            },
            () = &mut lag => {}
        }
    }
}

async fn member(config: &SinkConfig, ctx: &Context, task: u32) -> anyhow::Result<()> {
    let mut target = Target::open(config, ctx).await?;
    let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
    let group_config = GroupConsumerConfig {
        auto_commit_interval: None,
        processed_on_commit_only: true,
        client_id: Some(format!(
            "syncline-connect/{}/{}/{task}",
            ctx.worker, config.name
        )),
        ..GroupConsumerConfig::default()
    };
    let mut consumer = ctx
        .client
        .group_consumer(&config.group_name(), &topics, group_config)
        .await
        .with_context(|| format!("joining group {}", config.group_name()))?;
    let result = consume(config, ctx, &mut consumer, &mut target).await;
    match result {
        Ok(()) => {
            consumer.close().await.context("leaving the group")?;
            Ok(())
        }
        Err(e) => {
            consumer.abort();
            Err(e)
        }
    }
}

async fn consume(
    config: &SinkConfig,
    ctx: &Context,
    consumer: &mut GroupConsumer,
    target: &mut Target,
) -> anyhow::Result<()> {
    let mut batch = Vec::with_capacity(config.batch_size);
    let mut committed_at = tokio::time::Instant::now();
    loop {
        let first = tokio::select! {
            record = consumer.recv() => record,
            _ = ctx.cancel.cancelled() => return Ok(()),
        };
        let Some(first) = first else {
            anyhow::bail!("the group consumer stopped");
        };
        batch.push(to_sink_record(config, ctx, first?));
        let deadline = tokio::time::Instant::now() + LINGER;
        while batch.len() < config.batch_size {
            match tokio::time::timeout_at(deadline, consumer.recv()).await {
                Ok(Some(record)) => batch.push(to_sink_record(config, ctx, record?)),
                Ok(None) => anyhow::bail!("the group consumer stopped"),
                Err(_) => break,
            }
        }
        // A batch that did not fill up means the member caught up: commit now. Behind, commit
        // once per COMMIT_INTERVAL (each commit is a durable write on the broker).
        let caught_up = batch.len() < config.batch_size;
        let dropped = retain_assigned(&mut batch, &consumer.assignment());
        if dropped > 0 {
            tracing::info!(
                sink = %config.name,
                dropped,
                "records of partitions no longer assigned to this member: left to their new owner"
            );
        }
        if batch.is_empty() {
            continue;
        }
        target.apply(&batch, ctx).await?;
        if caught_up || committed_at.elapsed() >= COMMIT_INTERVAL {
            consumer
                .commit()
                .await
                .context("committing the group's offsets")?;
            committed_at = tokio::time::Instant::now();
        }
        ctx.status
            .add_records(batch.iter().filter(|r| r.apply).count() as u64);
        if let Some(last) = batch.last() {
            ctx.status.set_position(format!(
                "{}/{}@{}",
                last.topic,
                last.partition,
                last.offset + 1
            ));
        }
        batch.clear();
    }
}

/// Keeps the records of the partitions in `assignment` (sorted, as
/// [`GroupConsumer::assignment`] returns it); returns how many it dropped.
fn retain_assigned(batch: &mut Vec<SinkRecord>, assignment: &[TopicPartition]) -> usize {
    let before = batch.len();
    batch.retain(|record| {
        assignment
            .binary_search_by(|owned| {
                (owned.topic.as_str(), owned.partition).cmp(&(&*record.topic, record.partition))
            })
            .is_ok()
    });
    before - batch.len()
}

fn to_sink_record(
    config: &SinkConfig,
    ctx: &Context,
    record: syncline_client::ConsumerRecord,
) -> SinkRecord {
    let mut sink_record = SinkRecord {
        topic: record.topic.clone(),
        partition: record.partition,
        offset: record.offset,
        key: record.key.clone(),
        value: record.value.clone(),
        after: None,
        apply: true,
        raw: false,
    };
    match sink_change(record.value.as_deref()) {
        Ok(change) => {
            // A row a filter rejects is deleted downstream (it may be there from before).
            let rows = Rows {
                before: change.before,
                after: change.after,
                new_row: false,
            };
            match transform::apply(&config.transforms, rows) {
                Some(rows) => sink_record.after = rows.after,
                None => sink_record.apply = false,
            }
        }
        Err(reason) => {
            // The HTTP sink passes such a record on as it is; the others cannot write it.
            let sent_raw = config.kind == SinkKind::Http;
            let message = format!(
                "{}/{}@{}: {}: {reason}",
                record.topic,
                record.partition,
                record.offset,
                if sent_raw {
                    "sent as op = \"raw\""
                } else {
                    "skipped"
                }
            );
            tracing::warn!(sink = %config.name, "{message}");
            ctx.status.warn(&message);
            sink_record.apply = sent_raw;
            sink_record.raw = sent_raw;
        }
    }
    sink_record
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(topic: &str, partition: u32, offset: u64) -> SinkRecord {
        SinkRecord {
            topic: Arc::from(topic),
            partition,
            offset,
            key: None,
            value: None,
            after: None,
            apply: true,
            raw: false,
        }
    }

    #[test]
    fn given_records_of_revoked_partitions_should_drop_them_before_the_apply() {
        let mut batch = vec![
            record("a", 0, 5),
            record("a", 1, 7),
            record("b", 0, 1),
            record("a", 0, 6),
            record("b", 2, 3),
        ];
        // Partition a/1 was revoked and b/2 lost while the batch was gathered.
        let assignment = [TopicPartition::new("a", 0), TopicPartition::new("b", 0)];
        assert_eq!(retain_assigned(&mut batch, &assignment), 2);
        let kept: Vec<(String, u32, u64)> = batch
            .iter()
            .map(|r| (r.topic.to_string(), r.partition, r.offset))
            .collect();
        assert_eq!(
            kept,
            [
                ("a".to_owned(), 0, 5),
                ("b".to_owned(), 0, 1),
                ("a".to_owned(), 0, 6)
            ]
        );
        assert_eq!(
            retain_assigned(&mut batch, &[]),
            3,
            "nothing assigned any more"
        );
        assert!(batch.is_empty());
    }
}
