//! `connectors.toml`: the connector runtime's configuration, parsed into typed structs and
//! checked as a whole before anything starts.
//!
//! Every key is documented on its field below and in the README's "Connectors" section. Unknown
//! keys are refused (a misspelt key would otherwise be ignored in silence), and every error names
//! the connector and the key: `sink "cache": key `ttl_seconds` is only for kind = "redis"`.
//!
//! ```toml
//! [connect]                       # optional
//! broker = "127.0.0.1:7450"
//!
//! [[source]]
//! name = "shop"
//! kind = "postgres"
//! url = "postgres://postgres@127.0.0.1:5432/shop"
//! tables = ["public.items"]
//! topic_prefix = "shop"           # -> topic "shop.public.items"
//!
//! [[sink]]
//! name = "cache"
//! kind = "redis"
//! topics = ["shop.public.items"]
//! url = "redis://127.0.0.1:6379/"
//!
//! [[sink.transforms]]             # applies to the sink above
//! type = "drop"
//! fields = ["password_hash"]
//! ```

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use serde::Deserialize;

use crate::transform::{self, TransformSpec};

/// Most connectors one file may declare (each is at least one task and one connection).
pub const CONNECTORS_MAX: usize = 256;
/// Most tables one PostgreSQL source may capture.
pub const SOURCE_TABLES_MAX: usize = 1024;
/// Most topics one sink may read.
pub const SINK_TOPICS_MAX: usize = 1024;
/// Most tasks (parallel consumers in the sink's group) one sink may run per process.
pub const SINK_TASKS_MAX: u32 = 64;
/// Largest sink batch (records applied in one database transaction, pipeline or POST).
pub const SINK_BATCH_MAX: usize = 10_000;
/// Most attempts of one HTTP batch before it goes to the dead-letter topic.
pub const HTTP_ATTEMPTS_MAX: u32 = 100;
/// Largest Redis `ttl_seconds`: 10 years (so the expiry fits Redis's and our integers).
pub const REDIS_TTL_SECONDS_MAX: u64 = 10 * 365 * 24 * 3600;
/// Largest first backoff of the HTTP sink: the backoff doubles up to 30 s anyway.
pub const HTTP_RETRY_BACKOFF_MAX_MS: u64 = 30_000;
/// Most extra headers of the HTTP sink's requests.
pub const HTTP_HEADERS_MAX: usize = 64;

/// The whole file.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Runtime settings (`[connect]`).
    #[serde(default)]
    pub connect: RuntimeConfig,
    /// `[[source]]` tables.
    #[serde(default)]
    pub source: Vec<SourceConfig>,
    /// `[[sink]]` tables.
    #[serde(default)]
    pub sink: Vec<SinkConfig>,
}

/// `[connect]`: where the cluster is and where the runtime keeps its own state.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Broker address(es), `HOST:PORT[,...]`. `--broker` and `SYNCLINE_BROKER` override it.
    pub broker: Option<String>,
    /// Bearer token for a cluster with authentication. `SYNCLINE_TOKEN` overrides it.
    pub token: Option<String>,
    /// Compacted topic holding each source's position (key: the source's name). Created if
    /// missing.
    #[serde(default = "default_positions_topic")]
    pub positions_topic: String,
    /// Compacted topic holding each connector's status, which `syncline connect status` reads.
    /// Created if missing.
    #[serde(default = "default_status_topic")]
    pub status_topic: String,
    /// `HOST:PORT` to serve Prometheus metrics on (`/metrics`); none if absent.
    pub metrics_listen: Option<String>,
}

fn default_positions_topic() -> String {
    "_connect.positions".to_owned()
}

fn default_status_topic() -> String {
    "_connect.status".to_owned()
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            broker: None,
            token: None,
            positions_topic: default_positions_topic(),
            status_topic: default_status_topic(),
            metrics_listen: None,
        }
    }
}

/// What a source reads from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// PostgreSQL logical replication (`pgoutput`).
    Postgres,
}

/// `[[source]]`: a PostgreSQL database captured into one table topic per source table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Unique among all connectors of the file: it names the source's position, status and
    /// metrics, and defaults its slot and publication.
    pub name: String,
    /// `"postgres"`.
    pub kind: SourceKind,
    /// Connection URL of the database (`postgres://user:password@host:port/db`). The user needs
    /// the REPLICATION attribute, and CREATE on the database unless the publication exists.
    pub url: String,
    /// Tables to capture, as `schema.table`. Each needs a primary key.
    pub tables: Vec<String>,
    /// Topic names are `<topic_prefix>.<schema>.<table>`.
    pub topic_prefix: String,
    /// Replication slot (created if missing). Default `syncline_<name>` with other characters
    /// than `[a-z0-9_]` turned into `_`.
    pub slot: Option<String>,
    /// Publication (created if missing, for `tables`). Default as for `slot`.
    pub publication: Option<String>,
    /// Partitions of the topics the source creates; the broker's default if absent.
    pub partitions: Option<u32>,
    /// Copy the tables' current rows first (`op` = `"r"`) when the slot is new. Default true.
    #[serde(default = "default_true")]
    pub snapshot: bool,
    /// While no change of the captured tables arrives for this long, the source writes a
    /// logical-decoding message (`pg_logical_emit_message`) and confirms it, so the slot does
    /// not hold back WAL that other tables and databases write. 0 turns it off. Default 10,000.
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    /// Transforms applied to each change, in order.
    #[serde(default)]
    pub transforms: Vec<TransformSpec>,
}

fn default_true() -> bool {
    true
}

fn default_heartbeat_ms() -> u64 {
    10_000
}

/// Where a sink writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SinkKind {
    /// Upserts into a PostgreSQL table by the record key's columns.
    Postgres,
    /// `SET`/`DEL` (or `HSET`) of each record's key.
    Redis,
    /// Batched POSTs of the records to a webhook.
    Http,
}

impl SinkKind {
    fn as_str(self) -> &'static str {
        match self {
            SinkKind::Postgres => "postgres",
            SinkKind::Redis => "redis",
            SinkKind::Http => "http",
        }
    }
}

/// How a Redis sink stores a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RedisMode {
    /// `SET key <after as JSON>` (with `EX` when `ttl_seconds` is set).
    #[default]
    Set,
    /// `HSET key column value ...`, one field per column of `after` (then `EXPIRE`).
    Hash,
}

/// `[[sink]]`: topics applied to a database, a cache or a webhook.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// Unique among all connectors of the file.
    pub name: String,
    /// `"postgres"`, `"redis"` or `"http"`.
    pub kind: SinkKind,
    /// Topics to read (CDC topics of a source, or any topic whose values are JSON objects).
    pub topics: Vec<String>,
    /// PostgreSQL or Redis URL, or the webhook's endpoint (`http://` or `https://`).
    pub url: String,
    /// Consumer group the sink's tasks share; default `connect.<name>`. Every `connect`
    /// process running this sink joins it, so more processes share the partitions.
    pub group: Option<String>,
    /// Consumers this process runs in the group. Default 1.
    #[serde(default = "default_tasks")]
    pub tasks: u32,
    /// Most records applied at once (one transaction, pipeline or POST). Default 500.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// postgres: the target table, `schema.table` or `table`. It must exist, with a primary key
    /// or unique index on the key's columns.
    pub table: Option<String>,
    /// redis: `"set"` (default) or `"hash"`.
    pub mode: Option<RedisMode>,
    /// redis: expiry of every key written, in seconds, within [1, 10 years]. None if absent.
    pub ttl_seconds: Option<u64>,
    /// redis: prefix of every Redis key (`"items:"`). Default empty.
    pub key_prefix: Option<String>,
    /// http: attempts of one batch before its records go to the dead-letter topic. Default 5.
    pub max_attempts: Option<u32>,
    /// http: first backoff between attempts, in milliseconds, doubled each time up to 30 s.
    /// Default 200; within [1, 30000].
    pub retry_backoff_ms: Option<u64>,
    /// http: topic that receives the records of a batch that failed `max_attempts` times.
    /// Default `<name>.dlq`, created if missing.
    pub dead_letter_topic: Option<String>,
    /// http: per-request timeout, in milliseconds. Default 10,000.
    pub timeout_ms: Option<u64>,
    /// http: extra request headers (`{ Authorization = "Bearer ..." }`), at most 64. Names
    /// are HTTP tokens; values have no control characters but tab.
    pub headers: Option<BTreeMap<String, String>>,
    /// Transforms applied to each record before it is written, in order.
    #[serde(default)]
    pub transforms: Vec<TransformSpec>,
}

fn default_tasks() -> u32 {
    1
}

fn default_batch_size() -> usize {
    500
}

/// A configuration error: one sentence naming the file, the connector and the key.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl Config {
    /// Reads and checks a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("{}: cannot read: {e}", path.display())))?;
        Config::parse(&text).map_err(|e| ConfigError(format!("{}: {}", path.display(), e.0)))
    }

    /// Parses and checks the text of a file.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| {
            // toml's message names the key and the line; keep it on one line.
            ConfigError(e.to_string().trim().replace('\n', " "))
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks relations between keys that serde cannot: names, kinds' own keys, bounds.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.source.is_empty() && self.sink.is_empty() {
            return Err(ConfigError(
                "no connectors: add at least one [[source]] or [[sink]]".to_owned(),
            ));
        }
        if self.source.len() + self.sink.len() > CONNECTORS_MAX {
            return Err(ConfigError(format!(
                "{} connectors: at most {CONNECTORS_MAX}",
                self.source.len() + self.sink.len()
            )));
        }
        check_topic_name(
            "[connect]",
            "positions_topic",
            &self.connect.positions_topic,
        )?;
        check_topic_name("[connect]", "status_topic", &self.connect.status_topic)?;
        let mut names = HashSet::new();
        for source in &self.source {
            let at = format!("source {:?}", source.name);
            check_connector_name(&at, &source.name)?;
            if !names.insert(source.name.clone()) {
                return Err(ConfigError(format!(
                    "{at}: key `name`: another connector has this name"
                )));
            }
            source.validate(&at)?;
        }
        for sink in &self.sink {
            let at = format!("sink {:?}", sink.name);
            check_connector_name(&at, &sink.name)?;
            if !names.insert(sink.name.clone()) {
                return Err(ConfigError(format!(
                    "{at}: key `name`: another connector has this name"
                )));
            }
            sink.validate(&at)?;
        }
        Ok(())
    }
}

impl SourceConfig {
    fn validate(&self, at: &str) -> Result<(), ConfigError> {
        check_url(at, &self.url, &["postgres://", "postgresql://"])?;
        if self.tables.is_empty() {
            return Err(ConfigError(format!(
                "{at}: key `tables`: list at least one table (\"schema.table\")"
            )));
        }
        if self.tables.len() > SOURCE_TABLES_MAX {
            return Err(ConfigError(format!(
                "{at}: key `tables`: {} tables, at most {SOURCE_TABLES_MAX}",
                self.tables.len()
            )));
        }
        let mut seen = HashSet::new();
        for table in &self.tables {
            let Some((schema, name)) = split_table(table) else {
                return Err(ConfigError(format!(
                    "{at}: key `tables`: {table:?} is not \"schema.table\""
                )));
            };
            if !seen.insert((schema, name)) {
                return Err(ConfigError(format!(
                    "{at}: key `tables`: {table:?} is listed twice"
                )));
            }
            check_topic_name(
                at,
                "topic_prefix",
                &format!("{}.{schema}.{name}", self.topic_prefix),
            )?;
        }
        if self.topic_prefix.is_empty() {
            return Err(ConfigError(format!(
                "{at}: key `topic_prefix`: must not be empty"
            )));
        }
        for (key, value) in [("slot", &self.slot), ("publication", &self.publication)] {
            if let Some(value) = value {
                if value.is_empty()
                    || value.len() > 63
                    || !value
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                {
                    return Err(ConfigError(format!(
                        "{at}: key `{key}`: {value:?} must be 1 to 63 characters of [a-z0-9_]"
                    )));
                }
            }
        }
        if self.heartbeat_ms != 0 && self.heartbeat_ms < 100 {
            return Err(ConfigError(format!(
                "{at}: key `heartbeat_ms`: {} is below 100 (0 turns heartbeats off)",
                self.heartbeat_ms
            )));
        }
        if self.partitions == Some(0) {
            return Err(ConfigError(format!(
                "{at}: key `partitions`: must be at least 1"
            )));
        }
        transform::validate(at, &self.transforms, true)
    }

    /// The replication slot's name.
    pub fn slot_name(&self) -> String {
        self.slot
            .clone()
            .unwrap_or_else(|| default_pg_name(&self.name))
    }

    /// The publication's name.
    pub fn publication_name(&self) -> String {
        self.publication
            .clone()
            .unwrap_or_else(|| default_pg_name(&self.name))
    }

    /// The topic of a source table.
    pub fn topic_of(&self, schema: &str, table: &str) -> String {
        format!("{}.{schema}.{table}", self.topic_prefix)
    }
}

impl SinkConfig {
    fn validate(&self, at: &str) -> Result<(), ConfigError> {
        let kind = self.kind.as_str();
        match self.kind {
            SinkKind::Postgres => check_url(at, &self.url, &["postgres://", "postgresql://"])?,
            SinkKind::Redis => check_url(at, &self.url, &["redis://", "rediss://"])?,
            SinkKind::Http => check_url(at, &self.url, &["http://", "https://"])?,
        }
        if self.topics.is_empty() {
            return Err(ConfigError(format!(
                "{at}: key `topics`: list at least one topic"
            )));
        }
        if self.topics.len() > SINK_TOPICS_MAX {
            return Err(ConfigError(format!(
                "{at}: key `topics`: {} topics, at most {SINK_TOPICS_MAX}",
                self.topics.len()
            )));
        }
        for topic in &self.topics {
            check_topic_name(at, "topics", topic)?;
        }
        if self.tasks == 0 || self.tasks > SINK_TASKS_MAX {
            return Err(ConfigError(format!(
                "{at}: key `tasks`: {} is outside [1, {SINK_TASKS_MAX}]",
                self.tasks
            )));
        }
        if self.batch_size == 0 || self.batch_size > SINK_BATCH_MAX {
            return Err(ConfigError(format!(
                "{at}: key `batch_size`: {} is outside [1, {SINK_BATCH_MAX}]",
                self.batch_size
            )));
        }
        let only = |key: &str, set: bool, for_kind: SinkKind| -> Result<(), ConfigError> {
            if set && self.kind != for_kind {
                return Err(ConfigError(format!(
                    "{at}: key `{key}` is only for kind = \"{}\", not \"{kind}\"",
                    for_kind.as_str()
                )));
            }
            Ok(())
        };
        only("table", self.table.is_some(), SinkKind::Postgres)?;
        only("mode", self.mode.is_some(), SinkKind::Redis)?;
        only("ttl_seconds", self.ttl_seconds.is_some(), SinkKind::Redis)?;
        only("key_prefix", self.key_prefix.is_some(), SinkKind::Redis)?;
        only("max_attempts", self.max_attempts.is_some(), SinkKind::Http)?;
        only(
            "retry_backoff_ms",
            self.retry_backoff_ms.is_some(),
            SinkKind::Http,
        )?;
        only(
            "dead_letter_topic",
            self.dead_letter_topic.is_some(),
            SinkKind::Http,
        )?;
        only("timeout_ms", self.timeout_ms.is_some(), SinkKind::Http)?;
        only("headers", self.headers.is_some(), SinkKind::Http)?;
        if self.kind == SinkKind::Postgres {
            match &self.table {
                None => {
                    return Err(ConfigError(format!(
                        "{at}: key `table` is required for kind = \"postgres\" (the target table)"
                    )))
                }
                Some(table) if !valid_target_table(table) => {
                    return Err(ConfigError(format!(
                        "{at}: key `table`: {table:?} is not \"table\" or \"schema.table\""
                    )))
                }
                Some(_) => {}
            }
        }
        if self.ttl_seconds == Some(0) {
            return Err(ConfigError(format!(
                "{at}: key `ttl_seconds`: must be at least 1 (leave it out for no expiry)"
            )));
        }
        if let Some(ttl) = self.ttl_seconds.filter(|&ttl| ttl > REDIS_TTL_SECONDS_MAX) {
            return Err(ConfigError(format!(
                "{at}: key `ttl_seconds`: {ttl} is above {REDIS_TTL_SECONDS_MAX} (10 years)"
            )));
        }
        if let Some(attempts) = self.max_attempts {
            if attempts == 0 || attempts > HTTP_ATTEMPTS_MAX {
                return Err(ConfigError(format!(
                    "{at}: key `max_attempts`: {attempts} is outside [1, {HTTP_ATTEMPTS_MAX}]"
                )));
            }
        }
        if self.timeout_ms == Some(0) {
            return Err(ConfigError(format!(
                "{at}: key `timeout_ms`: must be at least 1"
            )));
        }
        if let Some(backoff) = self.retry_backoff_ms {
            if backoff == 0 || backoff > HTTP_RETRY_BACKOFF_MAX_MS {
                return Err(ConfigError(format!(
                    "{at}: key `retry_backoff_ms`: {backoff} is outside \
                     [1, {HTTP_RETRY_BACKOFF_MAX_MS}]"
                )));
            }
        }
        if let Some(headers) = &self.headers {
            check_headers(at, headers)?;
        }
        if let Some(topic) = &self.dead_letter_topic {
            check_topic_name(at, "dead_letter_topic", topic)?;
        }
        if let Some(group) = &self.group {
            if group.is_empty() || group.len() > 255 {
                return Err(ConfigError(format!(
                    "{at}: key `group`: must be 1 to 255 bytes"
                )));
            }
        }
        transform::validate(at, &self.transforms, false)
    }

    /// The consumer group of the sink's tasks.
    pub fn group_name(&self) -> String {
        self.group
            .clone()
            .unwrap_or_else(|| format!("connect.{}", self.name))
    }

    /// The HTTP sink's dead-letter topic.
    pub fn dead_letter_topic_name(&self) -> String {
        self.dead_letter_topic
            .clone()
            .unwrap_or_else(|| format!("{}.dlq", self.name))
    }
}

/// `schema.table` split in two; `None` unless both parts are plain identifiers.
pub fn split_table(table: &str) -> Option<(&str, &str)> {
    let (schema, name) = table.split_once('.')?;
    (is_identifier(schema) && is_identifier(name)).then_some((schema, name))
}

fn valid_target_table(table: &str) -> bool {
    match table.split_once('.') {
        Some((schema, name)) => is_identifier(schema) && is_identifier(name),
        None => is_identifier(table),
    }
}

/// A PostgreSQL identifier that needs no quoting's care beyond double quotes: letters, digits,
/// `_` and `$`, not starting with a digit, at most 63 bytes.
pub fn is_identifier(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && !name.as_bytes()[0].is_ascii_digit()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'$')
}

fn default_pg_name(connector: &str) -> String {
    let cleaned: String = connector
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '_'
            }
        })
        .collect();
    let mut name = format!("syncline_{cleaned}");
    name.truncate(63);
    name
}

fn check_connector_name(at: &str, name: &str) -> Result<(), ConfigError> {
    if name.is_empty()
        || name.len() > 128
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
    {
        return Err(ConfigError(format!(
            "{at}: key `name`: must be 1 to 128 characters of [A-Za-z0-9_.-]"
        )));
    }
    Ok(())
}

fn check_url(at: &str, url: &str, schemes: &[&str]) -> Result<(), ConfigError> {
    if !schemes.iter().any(|scheme| url.starts_with(scheme)) {
        return Err(ConfigError(format!(
            "{at}: key `url`: {:?} must start with {}",
            redact(url),
            schemes.join(" or ")
        )));
    }
    Ok(())
}

/// A URL without its password, for messages.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.split_once('@') {
        Some((credentials, host)) => match credentials.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// HTTP header names (RFC 9110 tokens) and values (no control characters but tab).
fn check_headers(at: &str, headers: &BTreeMap<String, String>) -> Result<(), ConfigError> {
    if headers.len() > HTTP_HEADERS_MAX {
        return Err(ConfigError(format!(
            "{at}: key `headers`: {} headers, at most {HTTP_HEADERS_MAX}",
            headers.len()
        )));
    }
    for (name, value) in headers {
        let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
        if name.is_empty() || !name.bytes().all(token) {
            return Err(ConfigError(format!(
                "{at}: key `headers`: {name:?} is not a header name"
            )));
        }
        if value.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f) {
            return Err(ConfigError(format!(
                "{at}: key `headers`: the value of {name:?} has a control character"
            )));
        }
    }
    Ok(())
}

/// Topic names as the broker accepts them: 1 to 249 bytes of `[A-Za-z0-9._-]`.
fn check_topic_name(at: &str, key: &str, topic: &str) -> Result<(), ConfigError> {
    if topic.is_empty()
        || topic.len() > 249
        || !topic
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
    {
        return Err(ConfigError(format!(
            "{at}: key `{key}`: topic {topic:?} must be 1 to 249 characters of [A-Za-z0-9._-]"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(text: &str) -> String {
        match Config::parse(text) {
            Ok(_) => panic!("accepted: {text}"),
            Err(e) => e.0,
        }
    }

    const SOURCE: &str = r#"
[[source]]
name = "shop"
kind = "postgres"
url = "postgres://postgres@127.0.0.1:5432/shop"
tables = ["public.items"]
topic_prefix = "shop"
"#;

    #[test]
    fn given_a_source_and_sinks_should_parse_with_defaults() {
        let text = format!(
            "{SOURCE}\n[[source.transforms]]\ntype = \"drop\"\nfields = [\"secret\"]\n\n\
             [[sink]]\nname = \"cache\"\nkind = \"redis\"\ntopics = [\"shop.public.items\"]\n\
             url = \"redis://127.0.0.1:6379/\"\nttl_seconds = 60\n"
        );
        let config = Config::parse(&text).expect("parses");
        assert_eq!(config.source[0].slot_name(), "syncline_shop");
        assert_eq!(
            config.source[0].topic_of("public", "items"),
            "shop.public.items"
        );
        assert_eq!(config.source[0].transforms.len(), 1);
        assert!(config.source[0].snapshot);
        assert_eq!(config.sink[0].group_name(), "connect.cache");
        assert_eq!(config.sink[0].tasks, 1);
        assert_eq!(config.connect.positions_topic, "_connect.positions");
    }

    #[test]
    fn given_bad_keys_should_name_the_connector_and_the_key() {
        assert!(error_of("").contains("no connectors"));
        assert!(error_of(&SOURCE.replace("topic_prefix", "topic_prefx")).contains("topic_prefx"));
        assert!(error_of(&SOURCE.replace("\"public.items\"", "\"items\""))
            .contains("source \"shop\": key `tables`"));
        assert!(error_of(&SOURCE.replace("postgres://", "mysql://"))
            .contains("source \"shop\": key `url`"));
        let sink = "[[sink]]\nname = \"c\"\nkind = \"redis\"\ntopics = [\"t\"]\n\
                    url = \"redis://h/\"\ntable = \"x\"\n";
        assert_eq!(
            error_of(sink),
            "sink \"c\": key `table` is only for kind = \"postgres\", not \"redis\""
        );
        let sink = "[[sink]]\nname = \"c\"\nkind = \"postgres\"\ntopics = [\"t\"]\n\
                    url = \"postgres://h/db\"\n";
        assert!(error_of(sink).contains("key `table` is required"));
        let twice = format!("{SOURCE}{}", SOURCE);
        assert!(error_of(&twice).contains("another connector has this name"));
        assert!(
            error_of(&SOURCE.replace("kind = \"postgres\"", "kind = \"mysql\"")).contains("kind")
        );
    }

    #[test]
    fn given_bad_http_keys_should_name_the_key() {
        let sink = "[[sink]]\nname = \"hook\"\nkind = \"http\"\ntopics = [\"t\"]\n\
                    url = \"http://h/\"\n";
        Config::parse(&format!(
            "{sink}headers = {{ Authorization = \"Bearer x\" }}\n"
        ))
        .expect("valid headers");
        assert!(error_of(&format!("{sink}retry_backoff_ms = 0\n"))
            .contains("sink \"hook\": key `retry_backoff_ms`: 0 is outside"));
        assert!(
            error_of(&format!("{sink}headers = {{ \"Bad Name\" = \"x\" }}\n"))
                .contains("key `headers`: \"Bad Name\" is not a header name")
        );
        assert!(
            error_of(&format!("{sink}headers = {{ X-A = \"a\\nb\" }}\n"))
                .contains("key `headers`: the value of \"X-A\" has a control character")
        );
    }

    #[test]
    fn given_a_password_should_redact_it() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact("redis://h:6379/"), "redis://h:6379/");
    }
}
