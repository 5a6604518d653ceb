//! The Redis sink: each record's key (its text, after `key_prefix`) holds the row.
//!
//! - `mode = "set"` (default): `SET key <after as JSON>`, with `EX ttl_seconds` when set. The
//!   value is the record's row as it is, so an update that leaves out a column (a CDC update
//!   of a row whose large, TOASTed value did not change) stores the row without that column.
//! - `mode = "hash"`: `HSET key column value ...` of the row's columns (strings as they are,
//!   other values as JSON text), then `EXPIRE key ttl_seconds` when set. An upsert never
//!   deletes the hash first, so a column the update leaves out (an unchanged TOASTed value)
//!   keeps its field; in turn a field of a column dropped from the table (or from the rows by a
//!   transform) lingers until the key is deleted.
//! - A delete (tombstone or `op = "d"`): `DEL key`.
//!
//! A batch is one `MULTI`/`EXEC` transaction in one pipeline (one round trip), so each
//! record's commands (and the batch's) apply all or nothing. Records without a key are skipped
//! and reported in the sink's status.

use anyhow::Context as _;
use redis::aio::MultiplexedConnection;
use serde_json::Value;

use super::SinkRecord;
use crate::config::{redact, RedisMode, SinkConfig};
use crate::runtime::Context;

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

    pub async fn apply(&mut self, batch: &[SinkRecord], ctx: &Context) -> anyhow::Result<()> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        let mut commands = 0;
        for record in batch.iter().filter(|r| r.apply) {
            let Some(key) = &record.key else {
                let message = format!(
                    "{}/{}@{}: skipped: a record without a key (the Redis key)",
                    record.topic, record.partition, record.offset
                );
                tracing::warn!(sink = %self.name, "{message}");
                ctx.status.warn(&message);
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
                        // No DEL first: a partial update keeps the fields it leaves out.
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
                            // The config bounds it to 10 years: no overflow.
                            let ttl = i64::try_from(ttl).context("ttl_seconds above 2^63")?;
                            pipe.expire(&key, ttl).ignore();
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

#[cfg(test)]
mod tests {
    use crate::config::{Config, REDIS_TTL_SECONDS_MAX};

    fn sink(ttl: u64) -> String {
        format!(
            "[[sink]]\nname = \"cache\"\nkind = \"redis\"\ntopics = [\"t\"]\n\
             url = \"redis://127.0.0.1:6379/\"\nttl_seconds = {ttl}\n"
        )
    }

    #[test]
    fn given_a_ttl_beyond_ten_years_should_refuse_it_naming_the_key() {
        assert!(Config::parse(&sink(REDIS_TTL_SECONDS_MAX)).is_ok());
        for ttl in [REDIS_TTL_SECONDS_MAX + 1, i64::MAX as u64] {
            let error = Config::parse(&sink(ttl)).expect_err("refused").0;
            assert!(
                error.contains("sink \"cache\": key `ttl_seconds`"),
                "{error}"
            );
        }
    }
}
