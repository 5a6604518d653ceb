//! The Redis sink: each record's key (its text, after `key_prefix`) holds the row.
//!
//! - `mode = "set"` (default): `SET key <after as JSON>`, with `EX ttl_seconds` when set.
//! - `mode = "hash"`: `DEL key` then `HSET key column value ...` (strings as they are, other
//!   values as JSON text), then `EXPIRE key ttl_seconds` when set. The DEL keeps a dropped
//!   column from lingering.
//! - A delete (tombstone or `op = "d"`): `DEL key`.
//!
//! A batch is one pipeline (one round trip). Records without a key are skipped and reported.

use anyhow::Context as _;
use redis::aio::MultiplexedConnection;
use serde_json::Value;

use super::SinkRecord;
use crate::config::{redact, RedisMode, SinkConfig};

pub struct RedisTarget {
    connection: MultiplexedConnection,
    mode: RedisMode,
    ttl_seconds: Option<u64>,
    key_prefix: String,
    name: String,
}

impl RedisTarget {
    pub async fn open(config: &SinkConfig) -> anyhow::Result<RedisTarget> {
        let client = redis::Client::open(config.url.as_str()).with_context(|| {
            format!("sink {:?}: key `url`: {}", config.name, redact(&config.url))
        })?;
        let connection = client
            .get_multiplexed_async_connection()
            .await
            .with_context(|| format!("connecting to {}", redact(&config.url)))?;
        Ok(RedisTarget {
            connection,
            mode: config.mode.unwrap_or_default(),
            ttl_seconds: config.ttl_seconds,
            key_prefix: config.key_prefix.clone().unwrap_or_default(),
            name: config.name.clone(),
        })
    }

    pub async fn apply(&mut self, batch: &[SinkRecord]) -> anyhow::Result<()> {
        let mut pipe = redis::pipe();
        let mut commands = 0;
        for record in batch.iter().filter(|r| r.apply) {
            let Some(key) = &record.key else {
                tracing::warn!(sink = %self.name, topic = %record.topic, partition = record.partition, offset = record.offset, "a record without a key: skipped");
                continue;
            };
            let key = format!("{}{}", self.key_prefix, String::from_utf8_lossy(key));
            match &record.after {
                None => {
                    pipe.del(&key).ignore();
                }
                Some(row) => match self.mode {
                    RedisMode::Set => {
                        let value = serde_json::to_string(row)?;
                        match self.ttl_seconds {
                            Some(ttl) => pipe.set_ex(&key, value, ttl).ignore(),
                            None => pipe.set(&key, value).ignore(),
                        };
                    }
                    RedisMode::Hash => {
                        pipe.del(&key).ignore();
                        let fields: Vec<(String, String)> = row
                            .iter()
                            .map(|(column, value)| {
                                let text = match value {
                                    Value::String(text) => text.clone(),
                                    other => other.to_string(),
                                };
                                (column.clone(), text)
                            })
                            .collect();
                        if !fields.is_empty() {
                            pipe.hset_multiple(&key, &fields).ignore();
                        }
                        if let Some(ttl) = self.ttl_seconds {
                            pipe.expire(&key, ttl as i64).ignore();
                        }
                    }
                },
            }
            commands += 1;
        }
        if commands > 0 {
            let () = pipe
                .query_async(&mut self.connection)
                .await
                .context("writing the batch to Redis")?;
        }
        Ok(())
    }
}
