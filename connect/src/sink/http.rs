//! The HTTP sink: POSTs each batch to a webhook (`url`) as a JSON array, one object per record
//! in the order of the batch (so in order per partition):
//!
//! ```json
//! [{"topic": "shop.public.items", "partition": 0, "offset": 41,
//!   "key": {"id": 1}, "value": {"id": 1, "name": "pen"}, "op": "upsert"},
//!  {"topic": "shop.public.items", "partition": 0, "offset": 42,
//!   "key": {"id": 2}, "value": null, "op": "delete"}]
//! ```
//!
//! - `key`: the record key as JSON if it parses, else as a string; `null` without one.
//! - `op = "upsert"`: `value` is the row after the transforms. `op = "delete"`: `value` is null
//!   (a CDC delete is its `op = "d"` envelope and then a tombstone: two deletes of the key).
//! - `op = "raw"`: the value could not be read as a change (not JSON, not an object); `value`
//!   is its text (invalid UTF-8 replaced), and the sink's status counts a warning.
//! - Records the transforms filtered out are not sent.
//!
//! Headers: `Content-Type: application/json`, `User-Agent: syncline-connect/VERSION`, and
//! `headers` from the configuration (which may replace them).
//!
//! # Delivery: at least once, then the dead-letter topic
//!
//! A 2xx answer accepts the POST. A 5xx, 408 or 429 answer, a timeout (`timeout_ms`, default
//! 10 s) or a connection error is retried after a backoff (`retry_backoff_ms`, default 200 ms,
//! doubled after each attempt up to 30 s, and at least the answer's `Retry-After` seconds).
//! Any other answer (another 4xx, any 3xx) is final: the same body would get the same answer.
//! Redirects are not followed (a 301, 302 or 303 would turn the POST into a GET without the
//! body, whose 2xx would count as delivered): a 3xx fails naming its `Location`, so point
//! `url` at the final endpoint. After `max_attempts` attempts (default 5) or a final answer, the
//! POST's records go to the dead-letter topic (`dead_letter_topic`, default `<name>.dlq`,
//! created if missing, not compacted) with their original key and value and the headers
//! `syncline.dlq.topic`, `syncline.dlq.partition`, `syncline.dlq.offset` (decimal text) and
//! `syncline.dlq.error` (the last error); once the broker has acknowledged them the sink moves
//! on and its status shows a warning with the reason. If the dead-letter write fails, the
//! batch fails (it is not committed) and is POSTed again after the member restarts.
//!
//! A POST the webhook accepted may still be sent again (a crash before the group commit, a
//! lost answer): receivers deduplicate by topic, partition and offset.
//!
//! # Limits
//!
//! - One POST carries at most [`BODY_BYTES_MAX`] of JSON: a bigger batch becomes several POSTs,
//!   each retried and dead-lettered on its own, in order. A bigger single record goes alone.
//! - At most [`ERROR_TEXT_MAX`] bytes of an error (with the webhook's answer) are kept.

use std::borrow::Cow;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use reqwest::header::{
    HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, LOCATION, RETRY_AFTER, USER_AGENT,
};
use serde::Serialize;
use serde_json::Value;
use syncline_client::{Producer, ProducerConfig};

use super::SinkRecord;
use crate::config::{redact, SinkConfig};
use crate::envelope::Row;
use crate::runtime::{self, Context};

/// Attempts of one POST when `max_attempts` is absent.
pub const MAX_ATTEMPTS_DEFAULT: u32 = 5;
/// First backoff when `retry_backoff_ms` is absent.
pub const RETRY_BACKOFF_DEFAULT: Duration = Duration::from_millis(200);
/// The backoff doubles up to this, and a `Retry-After` is capped to it.
pub const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Per-request timeout when `timeout_ms` is absent.
pub const TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);
/// Largest POST body: webhooks commonly refuse bodies of more than a few MiB.
pub const BODY_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Bytes of an error text kept for the status and the `syncline.dlq.error` header.
pub const ERROR_TEXT_MAX: usize = 1024;

/// Dead-letter headers.
pub const DLQ_TOPIC_HEADER: &str = "syncline.dlq.topic";
pub const DLQ_PARTITION_HEADER: &str = "syncline.dlq.partition";
pub const DLQ_OFFSET_HEADER: &str = "syncline.dlq.offset";
pub const DLQ_ERROR_HEADER: &str = "syncline.dlq.error";

pub struct HttpTarget {
    http: reqwest::Client,
    url: String,
    max_attempts: u32,
    retry_backoff: Duration,
    dead_letter_topic: String,
    /// Created at the first dead letter.
    dead_letter: Option<Producer>,
    ctx: Context,
    name: String,
}

/// One record as the webhook receives it.
#[derive(Serialize)]
struct Outgoing<'a> {
    topic: &'a str,
    partition: u32,
    offset: u64,
    key: Value,
    value: OutgoingValue<'a>,
    op: &'static str,
}

#[derive(Serialize)]
#[serde(untagged)]
enum OutgoingValue<'a> {
    Row(&'a Row),
    Raw(Cow<'a, str>),
    Null,
}

/// Why an attempt failed.
#[derive(Debug)]
struct Failure {
    message: String,
    /// Worth another attempt.
    retry: bool,
    /// The answer's `Retry-After`, in seconds.
    retry_after: Option<Duration>,
}

impl HttpTarget {
    /// Builds the HTTP client; nothing is sent before the first batch.
    pub async fn open(config: &SinkConfig, ctx: &Context) -> anyhow::Result<HttpTarget> {
        let at = format!("sink {:?}", config.name);
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(
            USER_AGENT,
            HeaderValue::from_static(concat!("syncline-connect/", env!("CARGO_PKG_VERSION"))),
        );
        for (name, value) in config.headers.iter().flatten() {
            let name = HeaderName::from_bytes(name.as_bytes())
                .with_context(|| format!("{at}: key `headers`: {name:?}"))?;
            let value = HeaderValue::from_str(value)
                .with_context(|| format!("{at}: key `headers`: the value of {name}"))?;
            headers.insert(name, value);
        }
        let timeout = config
            .timeout_ms
            .map(Duration::from_millis)
            .unwrap_or(TIMEOUT_DEFAULT);
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .with_context(|| format!("{at}: building the HTTP client"))?;
        Ok(HttpTarget {
            http,
            url: config.url.clone(),
            max_attempts: config.max_attempts.unwrap_or(MAX_ATTEMPTS_DEFAULT),
            retry_backoff: config
                .retry_backoff_ms
                .map(Duration::from_millis)
                .unwrap_or(RETRY_BACKOFF_DEFAULT)
                .min(RETRY_BACKOFF_MAX),
            dead_letter_topic: config.dead_letter_topic_name(),
            dead_letter: None,
            ctx: ctx.clone(),
            name: config.name.clone(),
        })
    }

    /// POSTs the batch's records (in bodies of at most [`BODY_BYTES_MAX`]); a POST that fails
    /// for good sends its records to the dead-letter topic.
    pub async fn apply(&mut self, batch: &[SinkRecord]) -> anyhow::Result<()> {
        let records: Vec<&SinkRecord> = batch.iter().filter(|r| r.apply).collect();
        for (body, records) in bodies(&records)? {
            if let Err(error) = self.post(body).await {
                self.dead_letter(records, &error).await?;
            }
        }
        Ok(())
    }

    /// Sends one body until it is accepted, the attempts are used up or the answer is final;
    /// `Err` is the last error.
    async fn post(&self, body: Bytes) -> Result<(), String> {
        let mut backoff = self.retry_backoff;
        let mut attempt = 1;
        loop {
            let failure = match self.attempt(body.clone()).await {
                Ok(()) => return Ok(()),
                Err(failure) => failure,
            };
            let message = format!(
                "POST {} failed (attempt {attempt} of {}): {}",
                redact(&self.url),
                self.max_attempts,
                failure.message
            );
            if !failure.retry || attempt >= self.max_attempts {
                return Err(truncate(message));
            }
            let wait = backoff
                .max(failure.retry_after.unwrap_or_default())
                .min(RETRY_BACKOFF_MAX);
            tracing::warn!(sink = %self.name, retry_in_ms = wait.as_millis() as u64, "{message}");
            tokio::time::sleep(wait).await;
            backoff = (backoff * 2).min(RETRY_BACKOFF_MAX);
            attempt += 1;
        }
    }

    async fn attempt(&self, body: Bytes) -> Result<(), Failure> {
        let response = match self.http.post(&self.url).body(body).send().await {
            Ok(response) => response,
            // Timeouts, refused connections, resets: the webhook may be back soon. The URL is
            // left out (it may hold credentials); the caller names it redacted.
            Err(error) => {
                return Err(Failure {
                    message: error_chain(&error.without_url()),
                    retry: true,
                    retry_after: None,
                })
            }
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let location = response
            .headers()
            .get(LOCATION)
            .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned());
        // Read (a bounded part of) the body either way, so the connection can be reused.
        let text = read_prefix(response, ERROR_TEXT_MAX).await;
        if status.is_success() {
            return Ok(());
        }
        if status.is_redirection() {
            return Err(Failure {
                message: format!(
                    "HTTP {status}: a redirect to {}, not followed (a POST redirected would \
                     arrive without its body): set `url` to the final endpoint",
                    location
                        .as_deref()
                        .map_or("(no Location)".to_owned(), redact)
                ),
                retry: false,
                retry_after: None,
            });
        }
        let retry = status.is_server_error()
            || status == reqwest::StatusCode::REQUEST_TIMEOUT
            || status == reqwest::StatusCode::TOO_MANY_REQUESTS;
        let text = text.trim();
        Err(Failure {
            message: if text.is_empty() {
                format!("HTTP {status}")
            } else {
                format!("HTTP {status}: {text}")
            },
            retry,
            retry_after,
        })
    }

    /// Writes the records to the dead-letter topic and waits for the broker's
    /// acknowledgements; then reports the reason in the sink's status.
    async fn dead_letter(&mut self, records: &[&SinkRecord], error: &str) -> anyhow::Result<()> {
        let topic = self.dead_letter_topic.clone();
        let producer = match &self.dead_letter {
            Some(producer) => producer.clone(),
            None => {
                runtime::ensure_topic(&self.ctx.client, &topic, None, false)
                    .await
                    .with_context(|| format!("creating the dead-letter topic {topic}"))?;
                let producer = self
                    .ctx
                    .client
                    .producer(&topic, ProducerConfig::default())
                    .await
                    .with_context(|| format!("a producer for the dead-letter topic {topic}"))?;
                self.dead_letter = Some(producer.clone());
                producer
            }
        };
        let mut deliveries = Vec::with_capacity(records.len());
        for record in records {
            let partition = record.partition.to_string();
            let offset = record.offset.to_string();
            let headers: [(&str, &[u8]); 4] = [
                (DLQ_TOPIC_HEADER, record.topic.as_bytes()),
                (DLQ_PARTITION_HEADER, partition.as_bytes()),
                (DLQ_OFFSET_HEADER, offset.as_bytes()),
                (DLQ_ERROR_HEADER, error.as_bytes()),
            ];
            let delivery = producer
                .enqueue(record.key.as_deref(), record.value.as_deref(), &headers)
                .await
                .with_context(|| format!("writing to the dead-letter topic {topic}"))?;
            deliveries.push(delivery);
        }
        for delivery in deliveries {
            delivery
                .await
                .with_context(|| format!("writing to the dead-letter topic {topic}"))?;
        }
        if let (Some(first), Some(last)) = (records.first(), records.last()) {
            let message = format!(
                "{} record(s) ({}/{}@{} to {}/{}@{}) sent to the dead-letter topic {topic}: \
                 {error}",
                records.len(),
                first.topic,
                first.partition,
                first.offset,
                last.topic,
                last.partition,
                last.offset
            );
            tracing::warn!(sink = %self.name, "{message}");
            self.ctx.status.warn(&message);
        }
        Ok(())
    }
}

/// The records as JSON array bodies of at most [`BODY_BYTES_MAX`] each (a bigger record
/// alone), each with its records.
fn bodies<'a, 'b>(
    records: &'b [&'a SinkRecord],
) -> anyhow::Result<Vec<(Bytes, &'b [&'a SinkRecord])>> {
    let mut out = Vec::new();
    let mut body = vec![b'['];
    let mut start = 0;
    for (i, record) in records.iter().enumerate() {
        let text = serde_json::to_vec(&outgoing(record)).context("encoding a record as JSON")?;
        if i > start && body.len() + text.len() + 2 > BODY_BYTES_MAX {
            body.push(b']');
            out.push((
                Bytes::from(std::mem::replace(&mut body, vec![b'['])),
                &records[start..i],
            ));
            start = i;
        }
        if i > start {
            body.push(b',');
        }
        body.extend_from_slice(&text);
    }
    if start < records.len() {
        body.push(b']');
        out.push((Bytes::from(body), &records[start..]));
    }
    Ok(out)
}

fn outgoing(record: &SinkRecord) -> Outgoing<'_> {
    let key = match &record.key {
        None => Value::Null,
        Some(key) => serde_json::from_slice(key)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(key).into_owned())),
    };
    let (value, op) = if record.raw {
        let text = record
            .value
            .as_deref()
            .map(String::from_utf8_lossy)
            .unwrap_or_default();
        (OutgoingValue::Raw(text), "raw")
    } else {
        match &record.after {
            Some(row) => (OutgoingValue::Row(row), "upsert"),
            None => (OutgoingValue::Null, "delete"),
        }
    };
    Outgoing {
        topic: &record.topic,
        partition: record.partition,
        offset: record.offset,
        key,
        value,
        op,
    }
}

/// Up to `limit` bytes of the answer's body, as text.
async fn read_prefix(mut response: reqwest::Response, limit: usize) -> String {
    let mut bytes = Vec::new();
    while bytes.len() < limit {
        match response.chunk().await {
            Ok(Some(chunk)) => bytes.extend_from_slice(&chunk),
            Ok(None) | Err(_) => break,
        }
    }
    bytes.truncate(limit);
    String::from_utf8_lossy(&bytes).into_owned()
}

/// An error with its causes, `: `-separated (reqwest's own text hides the cause: "error
/// sending request").
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// At most [`ERROR_TEXT_MAX`] bytes, cut at a character boundary.
fn truncate(mut text: String) -> String {
    if text.len() > ERROR_TEXT_MAX {
        let mut end = ERROR_TEXT_MAX;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::Arc;

    fn record(offset: u64, key: Option<&str>, value: &str, after: Option<Value>) -> SinkRecord {
        SinkRecord {
            topic: Arc::from("t"),
            partition: 1,
            offset,
            key: key.map(|k| Bytes::copy_from_slice(k.as_bytes())),
            value: Some(Bytes::copy_from_slice(value.as_bytes())),
            after: after.map(|after| serde_json::from_value(after).expect("a row")),
            apply: true,
            raw: false,
        }
    }

    #[test]
    fn given_upserts_deletes_and_raw_values_should_encode_each_op() {
        let upsert = record(1, Some(r#"{"id":1}"#), "", Some(json!({"id": 1, "b": 2})));
        let delete = record(2, Some("plain-key"), "", None);
        let mut raw = record(3, None, "not json", None);
        raw.raw = true;
        let records = [&upsert, &delete, &raw];
        let split = bodies(&records).expect("encodes");
        assert_eq!(split.len(), 1);
        let sent: Value = serde_json::from_slice(&split[0].0).expect("JSON");
        assert_eq!(
            sent,
            json!([
                {"topic": "t", "partition": 1, "offset": 1, "key": {"id": 1},
                 "value": {"id": 1, "b": 2}, "op": "upsert"},
                {"topic": "t", "partition": 1, "offset": 2, "key": "plain-key",
                 "value": null, "op": "delete"},
                {"topic": "t", "partition": 1, "offset": 3, "key": null,
                 "value": "not json", "op": "raw"},
            ])
        );
    }

    #[test]
    fn given_records_beyond_the_body_limit_should_split_them_in_order() {
        let big = "x".repeat(BODY_BYTES_MAX / 3);
        let records: Vec<SinkRecord> = (0..5)
            .map(|i| record(i, None, "", Some(json!({"data": big}))))
            .collect();
        let references: Vec<&SinkRecord> = records.iter().collect();
        let split = bodies(&references).expect("encodes");
        assert_eq!(split.len(), 3);
        let mut offsets = Vec::new();
        for (body, records) in &split {
            assert!(body.len() <= BODY_BYTES_MAX);
            let sent: Vec<Value> = serde_json::from_slice(body).expect("a JSON array");
            assert_eq!(sent.len(), records.len());
            offsets.extend(sent.iter().map(|r| r["offset"].as_u64().expect("offset")));
        }
        assert_eq!(offsets, [0, 1, 2, 3, 4]);
        assert!(bodies(&[]).expect("encodes").is_empty());
    }

    #[test]
    fn given_a_long_error_should_cut_it_at_a_character() {
        let text = truncate("é".repeat(ERROR_TEXT_MAX));
        assert!(text.len() <= ERROR_TEXT_MAX);
        assert!(text.chars().all(|c| c == 'é'));
    }
}
