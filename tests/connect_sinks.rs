//! The connector sinks through the real binaries: `syncline-connect` reading CDC-shaped topics
//! of a real broker into a real PostgreSQL, a real Redis, and webhooks served by the test.
//!
//! - PostgreSQL: inserts, partial updates (a TOASTed column left out), deletes (an `op = "d"`
//!   envelope and a tombstone), a delete then a re-insert, typed columns and an unreadable
//!   value end as the expected rows, and the stored offsets reach the topic's end. Then
//!   updates that leave out a NOT NULL column of existing rows are applied, the column keeping
//!   its value; one of a row the table lacks fails with an error naming table, key and column.
//! - PostgreSQL, exactly once: the connect process is killed (SIGKILL) twice while records
//!   flow, and the group's offsets are then rewound to 0, so every record is delivered again;
//!   a trigger records any update that does not move a row's version forward. There must be
//!   none, and the rows and offsets must be final.
//! - HTTP: a webhook that fails its first requests with 500 gets every record, in order per
//!   partition, with its op; one that always fails sends the records to the dead-letter topic
//!   with their origin in headers, and the sink's status shows the error; one that answers
//!   302 is not followed (a GET without the body) but dead-lettered at once, naming the
//!   Location.
//! - Redis: `set` mode with a TTL and `hash` mode mirror the rows; a delete removes the key; a
//!   partial update keeps the hash fields it leaves out; a record without a key is reported.
//!
//! Skipped, loudly, where PostgreSQL or Redis is not installed, except under CI.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::connect::ConnectProcess;
use common::pg::{self, Postgres};
use common::redis::{self, Redis};
use common::{binary, BrokerProcess};
use serde_json::{json, Value};
use syncline_client::{
    Client, ConsumerConfig, OffsetCommit, OffsetQuery, ProducerConfig, StartOffset, TopicConfig,
};
use tokio::time::Instant;

/// A short initial delay and fast heartbeats so that a sink's member gets its partitions
/// within a fraction of a second, and a short session so that a killed member's partitions
/// move on quickly (the broker's minimum is 1000 ms; 2000 leaves room on a slow machine).
const BROKER_FLAGS: &[&str] = &[
    "--group-initial-rebalance-delay-ms",
    "100",
    "--group-heartbeat-interval-ms",
    "100",
    "--group-session-timeout-ms",
    "2000",
];

/// How long any one awaited state may take (generous for a loaded CI machine; the tests
/// poll, so they take as long as the work does).
const DEADLINE: Duration = Duration::from_secs(40);

/// Polls `check` until it returns `Ok`, for at most [`DEADLINE`]; fails with its last `Err`.
async fn eventually<T>(what: &str, mut check: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        match check() {
            Ok(value) => return value,
            Err(last) if Instant::now() >= deadline => {
                panic!("{what}: not within {DEADLINE:?}; last: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn insert(after: Value) -> String {
    json!({"before": null, "after": after, "op": "c", "ts_ms": 0}).to_string()
}

fn update(after: Value) -> String {
    json!({"before": null, "after": after, "op": "u", "ts_ms": 0}).to_string()
}

fn delete(key: Value) -> String {
    json!({"before": key, "after": null, "op": "d", "ts_ms": 0}).to_string()
}

/// Writes `(key, value)` records in order (a `None` value is a tombstone) and waits for their
/// acknowledgements.
async fn produce(client: &Client, topic: &str, records: &[(String, Option<String>)]) {
    let producer = client
        .producer(topic, ProducerConfig::default())
        .await
        .expect("producer");
    let mut pending = Vec::with_capacity(records.len());
    for (key, value) in records {
        pending.push(
            producer
                .enqueue(
                    Some(key.as_bytes()),
                    value.as_deref().map(str::as_bytes),
                    &[],
                )
                .await
                .expect("enqueue"),
        );
    }
    for delivery in pending {
        delivery.await.expect("delivered");
    }
}

async fn create_topic(client: &Client, topic: &str, partitions: u32) {
    client
        .create_topic(topic, TopicConfig::with_partitions(partitions))
        .await
        .expect("create topic");
}

/// Each partition's end offset.
async fn end_offsets(client: &Client, topic: &str, partitions: u32) -> Vec<u64> {
    let mut ends = Vec::new();
    for partition in 0..partitions {
        ends.push(
            client
                .list_offsets(topic, partition, OffsetQuery::Latest)
                .await
                .expect("list offsets")
                .offset,
        );
    }
    ends
}

/// `partition|next_offset` lines of the sink's stored offsets.
fn stored_offsets(postgres: &Postgres, sink: &str) -> String {
    postgres
        .psql(&format!(
            "SELECT \"partition\" || '|' || next_offset FROM syncline_sink_offsets \
             WHERE sink = '{sink}' ORDER BY \"partition\""
        ))
        .unwrap_or_default()
}

fn offsets_text(ends: &[u64]) -> String {
    ends.iter()
        .enumerate()
        .map(|(partition, end)| format!("{partition}|{end}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The connect processes' status reports of `config`, by connector name.
fn statuses(config: &Path, broker: &str) -> Result<BTreeMap<String, Value>, String> {
    let output = Command::new(binary("syncline-connect"))
        .arg("--config")
        .arg(config)
        .args(["--broker", broker, "status", "--json"])
        .output()
        .map_err(|e| e.to_string())?;
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    let reports: Vec<Value> = serde_json::from_slice(&output.stdout).map_err(|e| e.to_string())?;
    Ok(reports
        .into_iter()
        .filter_map(|report| Some((report["connector"].as_str()?.to_owned(), report)))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_cdc_changes_when_sunk_into_postgres_should_leave_the_final_rows() {
    if pg::skip_unless_available(
        "given_cdc_changes_when_sunk_into_postgres_should_leave_the_final_rows",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start_with(&dir.path().join("data"), BROKER_FLAGS);
    let postgres = Postgres::start().unwrap();
    postgres
        .psql(
            "CREATE TABLE items (id integer PRIMARY KEY, name text NOT NULL, \
             qty integer NOT NULL DEFAULT 0, price numeric(10,2), tags text[], doc jsonb, \
             blob bytea); \
             CREATE TABLE orphans (id integer PRIMARY KEY, big text NOT NULL, n integer); \
             CREATE SCHEMA shop; \
             CREATE TABLE shop.\"Tagged\" (id integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY, \
             label text, loud text GENERATED ALWAYS AS (upper(label)) STORED)",
        )
        .unwrap();
    let client = Client::connect(&broker.addr).await.unwrap();
    let topic = "shop.public.items";
    let partitions = 3;
    create_topic(&client, topic, partitions).await;

    let key = |id: u32| json!({"id": id}).to_string();
    let mut records = Vec::new();
    for id in 1..=30u32 {
        let row = json!({"id": id, "name": format!("item-{id}"), "qty": id, "price": "1.50",
                         "tags": "{a,b}", "doc": {"k": id}, "blob": "AQL/", "not_a_column": 1});
        records.push((key(id), Some(insert(row))));
    }
    // Updates that leave `name` out (a TOASTed column): it keeps its value.
    for id in (2..=30u32).step_by(2) {
        records.push((key(id), Some(update(json!({"id": id, "qty": id * 10})))));
    }
    for id in (5..=30u32).step_by(5) {
        records.push((key(id), Some(delete(json!({"id": id})))));
        records.push((key(id), None));
    }
    // A delete then an insert of the same key: the old row's columns are gone.
    records.push((key(10), Some(insert(json!({"id": 10, "name": "again"})))));
    // Not a change: skipped and reported, and its offset still counts.
    records.push((key(999), Some("not json".to_owned())));
    produce(&client, topic, &records).await;
    let ends = end_offsets(&client, topic, partitions).await;
    assert_eq!(ends.iter().sum::<u64>(), records.len() as u64);
    // An update of a row the table does not have, leaving out NOT NULL `big`: it cannot be
    // inserted, and the error says which table, key and column.
    let orphans = "shop.public.orphans";
    create_topic(&client, orphans, 1).await;
    produce(
        &client,
        orphans,
        &[
            (key(1), Some(insert(json!({"id": 1, "big": "b", "n": 1})))),
            (key(2), Some(update(json!({"id": 2, "n": 5})))),
        ],
    )
    .await;

    let config = format!(
        "[[sink]]\nname = \"mirror\"\nkind = \"postgres\"\ntopics = [\"{topic}\"]\n\
         url = \"{url}\"\ntable = \"items\"\nbatch_size = 7\n\n\
         [[sink]]\nname = \"tagged\"\nkind = \"postgres\"\ntopics = [\"{topic}\"]\n\
         url = \"{url}\"\ntable = \"shop.Tagged\"\n\
         [[sink.transforms]]\ntype = \"rename\"\nfields = {{ name = \"label\" }}\n\n\
         [[sink]]\nname = \"orphans\"\nkind = \"postgres\"\ntopics = [\"{orphans}\"]\n\
         url = \"{url}\"\ntable = \"orphans\"\n",
        url = postgres.url()
    );
    let connect = ConnectProcess::start(dir.path(), &config, &broker.addr);

    let mut expected = Vec::new();
    for id in 1..=30u32 {
        if id == 10 {
            expected.push("10|again|0||||".to_owned());
        } else if id % 5 != 0 {
            let qty = if id % 2 == 0 { id * 10 } else { id };
            expected.push(format!(
                "{id}|item-{id}|{qty}|1.50|{{a,b}}|{{\"k\": {id}}}|0102ff"
            ));
        }
    }
    let expected = expected.join("\n");
    // The other sink: the identity key keeps the source's ids, the generated column follows,
    // and the renamed column lands.
    let mut tagged = Vec::new();
    for id in (1..=30u32).filter(|id| id % 5 != 0) {
        tagged.push(format!("{id}|item-{id}|ITEM-{id}"));
        if id == 9 {
            tagged.push("10|again|AGAIN".to_owned());
        }
    }
    let tagged = tagged.join("\n");
    let want_offsets = offsets_text(&ends);
    let items_rows = || {
        postgres
            .psql(
                "SELECT id || '|' || coalesce(name, '') || '|' || qty || '|' || \
                 coalesce(price::text, '') || '|' || coalesce(tags::text, '') || '|' || \
                 coalesce(doc::text, '') || '|' || coalesce(encode(blob, 'hex'), '') \
                 FROM items ORDER BY id",
            )
            .map_err(|e| e.to_string())
    };
    eventually(
        "the table and the stored offsets reach the final state",
        || {
            let rows = items_rows()?;
            let offsets = stored_offsets(&postgres, "mirror");
            let tagged_rows = postgres
                .psql("SELECT id || '|' || label || '|' || loud FROM shop.\"Tagged\" ORDER BY id")
                .map_err(|e| e.to_string())?;
            let tagged_offsets = postgres
                .psql(
                    "SELECT \"partition\" || '|' || next_offset FROM shop.syncline_sink_offsets \
                     WHERE sink = 'tagged' ORDER BY \"partition\"",
                )
                .unwrap_or_default();
            if rows == expected
                && offsets == want_offsets
                && tagged_rows == tagged
                && tagged_offsets == want_offsets
            {
                Ok(())
            } else {
                Err(format!(
                    "rows:\n{rows}\noffsets:\n{offsets}\ntagged:\n{tagged_rows}\n\
                     tagged offsets:\n{tagged_offsets}\nconnect log:\n{}",
                    connect.log()
                ))
            }
        },
    )
    .await;
    let report = eventually("the status reports the unreadable record", || {
        let reports = statuses(&connect.config, &broker.addr)?;
        let report = reports.get("mirror").cloned().ok_or("no status yet")?;
        match report["last_error"].as_str() {
            Some(error) if error.contains("skipped: value is not JSON") => Ok(report),
            _ => Err(format!("{report}")),
        }
    })
    .await;
    assert_eq!(report["state"], "running", "{report}");

    // Updates that leave out `name` (NOT NULL, without a default) of rows the table has, in
    // batches of their own: applied, `name` kept. (An INSERT ... ON CONFLICT of the present
    // columns fails NOT NULL before it sees the conflict.) For `tagged` they carry no column
    // but the key: nothing to write.
    produce(
        &client,
        topic,
        &[
            (key(1), Some(update(json!({"id": 1, "qty": 77})))),
            (key(3), Some(update(json!({"id": 3, "price": "2.00"})))),
        ],
    )
    .await;
    let updated = expected
        .replace("1|item-1|1|1.50|", "1|item-1|77|1.50|")
        .replace("3|item-3|3|1.50|", "3|item-3|3|2.00|");
    assert_ne!(updated, expected);
    let ends = end_offsets(&client, topic, partitions).await;
    let want_offsets = offsets_text(&ends);
    eventually("partial updates of NOT NULL columns are applied", || {
        let rows = items_rows()?;
        let offsets = stored_offsets(&postgres, "mirror");
        let tagged_offsets = postgres
            .psql(
                "SELECT \"partition\" || '|' || next_offset FROM shop.syncline_sink_offsets \
                 WHERE sink = 'tagged' ORDER BY \"partition\"",
            )
            .unwrap_or_default();
        if rows == updated && offsets == want_offsets && tagged_offsets == want_offsets {
            Ok(())
        } else {
            Err(format!(
                "rows:\n{rows}\noffsets:\n{offsets}\nconnect log:\n{}",
                connect.log()
            ))
        }
    })
    .await;
    eventually(
        "the orphan update fails naming table, key and column",
        || {
            let reports = statuses(&connect.config, &broker.addr)?;
            let report = reports.get("orphans").ok_or("no status yet")?;
            let error = report["last_error"].as_str().unwrap_or_default();
            if error.contains("public.orphans")
                && error.contains("key {\"id\":2}")
                && error.contains("column \"big\"")
            {
                Ok(())
            } else {
                Err(format!("{report}"))
            }
        },
    )
    .await;
    let tagged_after = postgres
        .psql("SELECT id || '|' || label || '|' || loud FROM shop.\"Tagged\" ORDER BY id")
        .unwrap();
    assert_eq!(tagged_after, tagged, "key-only rows change nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_kills_and_a_rewound_group_when_sinking_into_postgres_should_apply_each_record_once()
{
    let test =
        "given_kills_and_a_rewound_group_when_sinking_into_postgres_should_apply_each_record_once";
    if pg::skip_unless_available(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start_with(&dir.path().join("data"), BROKER_FLAGS);
    let postgres = Postgres::start().unwrap();
    // Every applied version of a row must be newer than the one it replaces: a record applied
    // twice (its batch replayed after a crash) rewrites an older or equal version.
    postgres
        .psql(
            "CREATE TABLE counters (id integer PRIMARY KEY, version integer NOT NULL); \
             CREATE TABLE replays (id integer, old_version integer, new_version integer); \
             CREATE FUNCTION check_version() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN \
               IF NEW.version <= OLD.version THEN \
                 INSERT INTO replays VALUES (NEW.id, OLD.version, NEW.version); \
               END IF; \
               RETURN NEW; \
             END $$; \
             CREATE TRIGGER check_version BEFORE UPDATE ON counters \
               FOR EACH ROW EXECUTE FUNCTION check_version();",
        )
        .unwrap();
    let client = Client::connect(&broker.addr).await.unwrap();
    let topic = "counters";
    let partitions = 4;
    create_topic(&client, topic, partitions).await;
    let config = format!(
        "[[sink]]\nname = \"counters\"\nkind = \"postgres\"\ntopics = [\"{topic}\"]\n\
         url = \"{}\"\ntable = \"counters\"\nbatch_size = 50\n",
        postgres.url()
    );
    let mut connect = ConnectProcess::start(dir.path(), &config, &broker.addr);

    // KEYS rows, each updated to VERSIONS versions, one round of versions at a time, so
    // records keep flowing while the sink applies them and is killed.
    const KEYS: u32 = 100;
    const VERSIONS: u32 = 60;
    let total = u64::from(KEYS * VERSIONS);
    let producing = {
        let client = client.clone();
        tokio::spawn(async move {
            for version in 1..=VERSIONS {
                let round: Vec<(String, Option<String>)> = (0..KEYS)
                    .map(|id| {
                        let row = json!({"id": id, "version": version});
                        (json!({"id": id}).to_string(), Some(update(row)))
                    })
                    .collect();
                produce(&client, topic, &round).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let applied = || -> u64 {
        postgres
            .psql("SELECT coalesce(sum(next_offset), 0) FROM syncline_sink_offsets")
            .ok()
            .and_then(|text| text.parse().ok())
            .unwrap_or(0)
    };
    // Kill it twice while it applies; the second time, restart only after the dead member's
    // session expired and the group's offsets were rewound to 0, so every record comes back.
    for (kill_at, name) in [(total / 5, "first"), (total / 2, "second")] {
        eventually(
            &format!("the sink applies {kill_at} records before the {name} kill"),
            || {
                let applied = applied();
                if applied >= kill_at {
                    Ok(())
                } else {
                    Err(format!("{applied} applied"))
                }
            },
        )
        .await;
        connect.kill9();
        if name == "first" {
            connect = ConnectProcess::start(dir.path(), &config, &broker.addr);
        }
    }
    let rewind: Vec<OffsetCommit> = (0..partitions)
        .map(|partition| OffsetCommit::new(topic, partition, 0))
        .collect();
    let deadline = Instant::now() + DEADLINE;
    loop {
        // Refused while the killed member is still in the group.
        match client.commit_offsets("connect.counters", &rewind).await {
            Ok(()) => break,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("rewinding the group: {e}"),
        }
    }
    let connect = ConnectProcess::start(dir.path(), &config, &broker.addr);
    producing.await.unwrap();
    let ends = end_offsets(&client, topic, partitions).await;
    assert_eq!(ends.iter().sum::<u64>(), total);

    let want_offsets = offsets_text(&ends);
    let want_rows = format!("{KEYS}|{VERSIONS}|{VERSIONS}");
    eventually(
        "every record applied after the kills and the rewind",
        || {
            let rows = postgres
                .psql("SELECT count(*) || '|' || min(version) || '|' || max(version) FROM counters")
                .map_err(|e| e.to_string())?;
            let offsets = stored_offsets(&postgres, "counters");
            if rows == want_rows && offsets == want_offsets {
                Ok(())
            } else {
                Err(format!("rows {rows}, offsets:\n{offsets}"))
            }
        },
    )
    .await;
    let replays = postgres.psql("SELECT count(*) FROM replays").unwrap();
    let examples = postgres
        .psql("SELECT id || ': ' || old_version || ' -> ' || new_version FROM replays LIMIT 5")
        .unwrap();
    assert_eq!(replays, "0", "records applied twice, e.g.:\n{examples}");
    // The rewind delivered everything again: the skip was exercised, not just never needed.
    let log_text = connect.log();
    assert!(
        log_text.contains("records below the stored offsets were applied before: skipped"),
        "{log_text}"
    );
}

/// What a test webhook received and how it answers.
#[derive(Default)]
struct Webhook {
    /// Requests answered with 500 before it accepts (`usize::MAX`: never accepts).
    fail_first: usize,
    requests: AtomicUsize,
    /// Accepted records, in arrival order, with the request's `x-token` header.
    accepted: Mutex<Vec<(Value, Option<String>)>>,
}

/// Serves `webhook` on a free loopback port; returns its URL.
async fn serve(webhook: Arc<Webhook>) -> String {
    use axum::http::{HeaderMap, StatusCode};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
            let webhook = webhook.clone();
            async move {
                let seen = webhook.requests.fetch_add(1, Ordering::SeqCst);
                if seen < webhook.fail_first {
                    return StatusCode::INTERNAL_SERVER_ERROR;
                }
                let content_type = headers
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                if content_type != "application/json" {
                    return StatusCode::UNSUPPORTED_MEDIA_TYPE;
                }
                let token = headers
                    .get("x-token")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let Ok(Value::Array(records)) = serde_json::from_slice::<Value>(&body) else {
                    return StatusCode::BAD_REQUEST;
                };
                let mut accepted = webhook.accepted.lock().unwrap();
                accepted.extend(records.into_iter().map(|r| (r, token.clone())));
                StatusCode::OK
            }
        }),
    );
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    format!("http://{address}/hook")
}

/// Serves a webhook that answers every POST with `302 Found` to `/landing`, which accepts
/// anything (a followed redirect arrives there as a GET without the body); returns the hook's
/// URL and the count of requests that reached the landing.
async fn serve_redirect() -> (String, Arc<AtomicUsize>) {
    use axum::http::{header, StatusCode};
    let landed = Arc::new(AtomicUsize::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let counter = landed.clone();
    let app = axum::Router::new()
        .route(
            "/moved",
            axum::routing::post(|| async { (StatusCode::FOUND, [(header::LOCATION, "/landing")]) }),
        )
        .route(
            "/landing",
            axum::routing::any(move || {
                let counter = counter.clone();
                async move {
                    counter.fetch_add(1, Ordering::SeqCst);
                    StatusCode::OK
                }
            }),
        );
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (format!("http://{address}/moved"), landed)
}

/// The first `count` records of `topic` (waiting for it to be created), within `deadline`.
async fn read_records(
    client: &Client,
    topic: &str,
    count: usize,
    deadline: Instant,
    log: impl Fn() -> String,
) -> Vec<syncline_client::ConsumerRecord> {
    let config = ConsumerConfig {
        start: StartOffset::Earliest,
        ..ConsumerConfig::default()
    };
    let mut consumer = loop {
        match client.consumer(topic, config.clone()).await {
            Ok(consumer) => break consumer,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("topic {topic}: {e}\n{}", log()),
        }
    };
    let mut records = Vec::with_capacity(count);
    while records.len() < count {
        let record = tokio::time::timeout_at(deadline, consumer.recv())
            .await
            .unwrap_or_else(|_| panic!("{count} records of {topic} in time\n{}", log()))
            .expect("the consumer is open")
            .expect("a record");
        records.push(record);
    }
    records
}

/// The value of header `name` of `record`.
fn header_of(record: &syncline_client::ConsumerRecord, name: &str) -> String {
    record
        .headers
        .iter()
        .find(|h| h.key == name)
        .map(|h| String::from_utf8_lossy(&h.value).into_owned())
        .unwrap_or_else(|| panic!("header {name} on {record:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_failing_webhooks_when_sinking_over_http_should_retry_then_dead_letter() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start_with(&dir.path().join("data"), BROKER_FLAGS);
    let client = Client::connect(&broker.addr).await.unwrap();
    let flaky = Arc::new(Webhook {
        fail_first: 3,
        ..Webhook::default()
    });
    let down = Arc::new(Webhook {
        fail_first: usize::MAX,
        ..Webhook::default()
    });
    let flaky_url = serve(flaky.clone()).await;
    let down_url = serve(down.clone()).await;
    let (moved_url, landed) = serve_redirect().await;
    create_topic(&client, "hooks", 2).await;
    create_topic(&client, "hooks.down", 1).await;
    create_topic(&client, "hooks.moved", 1).await;

    let key = |id: u32| json!({"id": id}).to_string();
    let mut records = Vec::new();
    for id in 0..40u32 {
        records.push((key(id), Some(insert(json!({"id": id, "n": id})))));
    }
    records.push((key(3), Some(delete(json!({"id": 3})))));
    records.push((key(3), None));
    records.push(("plain".to_owned(), Some("not json".to_owned())));
    produce(&client, "hooks", &records).await;
    let down_records: Vec<(String, Option<String>)> = (0..5u32)
        .map(|id| (key(id), Some(insert(json!({"id": id})))))
        .collect();
    produce(&client, "hooks.down", &down_records).await;
    produce(&client, "hooks.moved", &down_records[..2]).await;
    let ends = end_offsets(&client, "hooks", 2).await;

    let config = format!(
        "[[sink]]\nname = \"flaky\"\nkind = \"http\"\ntopics = [\"hooks\"]\n\
         url = \"{flaky_url}\"\nretry_backoff_ms = 10\nheaders = {{ X-Token = \"secret\" }}\n\n\
         [[sink]]\nname = \"down\"\nkind = \"http\"\ntopics = [\"hooks.down\"]\n\
         url = \"{down_url}\"\nmax_attempts = 2\nretry_backoff_ms = 10\n\n\
         [[sink]]\nname = \"moved\"\nkind = \"http\"\ntopics = [\"hooks.moved\"]\n\
         url = \"{moved_url}\"\nmax_attempts = 3\nretry_backoff_ms = 10\n"
    );
    let connect = ConnectProcess::start(dir.path(), &config, &broker.addr);

    let accepted = eventually("the flaky webhook accepts every record", || {
        let accepted = flaky.accepted.lock().unwrap().clone();
        let seen: BTreeSet<(u64, u64)> = accepted
            .iter()
            .filter_map(|(r, _)| Some((r["partition"].as_u64()?, r["offset"].as_u64()?)))
            .collect();
        if seen.len() as u64 == ends.iter().sum::<u64>() {
            Ok(accepted)
        } else {
            Err(format!(
                "{} of {} records\n{}",
                seen.len(),
                records.len(),
                connect.log()
            ))
        }
    })
    .await;
    assert!(
        flaky.requests.load(Ordering::SeqCst) > 3,
        "it retried past the failures"
    );
    // In order per partition: the first delivery of each offset comes in offset order.
    for (partition, end) in ends.iter().enumerate() {
        let mut firsts: Vec<u64> = Vec::new();
        for (record, _) in &accepted {
            let offset = record["offset"].as_u64().unwrap();
            if record["partition"] == json!(partition) && !firsts.contains(&offset) {
                firsts.push(offset);
            }
        }
        assert_eq!(
            firsts,
            (0..*end).collect::<Vec<u64>>(),
            "partition {partition}"
        );
    }
    let ops: BTreeMap<String, Vec<&Value>> =
        accepted
            .iter()
            .fold(BTreeMap::new(), |mut ops, (record, token)| {
                assert_eq!(token.as_deref(), Some("secret"), "the configured header");
                assert_eq!(record["topic"], "hooks");
                ops.entry(record["op"].as_str().unwrap().to_owned())
                    .or_default()
                    .push(record);
                ops
            });
    assert!(ops["upsert"]
        .iter()
        .any(|r| r["key"] == json!({"id": 7}) && r["value"] == json!({"id": 7, "n": 7})));
    assert!(ops["delete"]
        .iter()
        .all(|r| r["key"] == json!({"id": 3}) && r["value"].is_null()));
    assert_eq!(ops["delete"].len(), 2, "the d envelope and the tombstone");
    assert_eq!(
        ops["raw"][0]["key"], "plain",
        "a key that is not JSON comes as a string"
    );
    assert_eq!(ops["raw"][0]["value"], "not json");

    // The webhook that is down: every record to the dead-letter topic, with its origin.
    let deadline = Instant::now() + DEADLINE;
    let dead = read_records(&client, "down.dlq", down_records.len(), deadline, || {
        connect.log()
    })
    .await;
    let mut offsets = BTreeSet::new();
    for record in &dead {
        assert_eq!(header_of(record, "syncline.dlq.topic"), "hooks.down");
        assert_eq!(header_of(record, "syncline.dlq.partition"), "0");
        let error = header_of(record, "syncline.dlq.error");
        assert!(
            error.contains("500") && error.contains("attempt 2 of 2"),
            "{error}"
        );
        let offset: usize = header_of(record, "syncline.dlq.offset").parse().unwrap();
        let (key, value) = &down_records[offset];
        assert_eq!(
            record.key.as_deref(),
            Some(key.as_bytes()),
            "the original key"
        );
        assert_eq!(
            record.value.as_deref(),
            value.as_deref().map(str::as_bytes),
            "the original value"
        );
        offsets.insert(offset);
    }
    assert_eq!(offsets.len(), down_records.len());
    // The webhook that redirects: not followed (the POST would arrive as a GET without its
    // body, and its 200 would count as delivered), not retried, dead-lettered with the Location.
    let moved = read_records(&client, "moved.dlq", 2, deadline, || connect.log()).await;
    for record in &moved {
        let error = header_of(record, "syncline.dlq.error");
        assert!(
            error.contains("302") && error.contains("/landing") && error.contains("attempt 1 of 3"),
            "{error}"
        );
    }
    assert_eq!(
        landed.load(Ordering::SeqCst),
        0,
        "the redirect was followed"
    );
    assert!(down.requests.load(Ordering::SeqCst) >= 2);
    eventually("the status shows the dead letters", || {
        let reports = statuses(&connect.config, &broker.addr)?;
        let report = reports.get("down").ok_or("no status yet")?;
        let error = report["last_error"].as_str().unwrap_or_default();
        if report["errors_total"].as_u64() >= Some(1)
            && error.contains("dead-letter topic down.dlq")
        {
            Ok(())
        } else {
            Err(format!("{report}"))
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_cdc_changes_when_sunk_into_redis_should_mirror_keys_and_hashes() {
    if redis::skip_unless_available(
        "given_cdc_changes_when_sunk_into_redis_should_mirror_keys_and_hashes",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start_with(&dir.path().join("data"), BROKER_FLAGS);
    let redis = Redis::start().unwrap();
    let client = Client::connect(&broker.addr).await.unwrap();
    let topic = "shop.items";
    create_topic(&client, topic, 2).await;
    let key = |id: u32| json!({"id": id}).to_string();
    let records = vec![
        (
            key(1),
            Some(insert(json!({"id": 1, "name": "pen", "qty": 5}))),
        ),
        (
            key(2),
            Some(insert(json!({"id": 2, "name": "ink", "qty": 1}))),
        ),
        (
            key(3),
            Some(insert(json!({"id": 3, "name": "cap", "qty": 9}))),
        ),
        // Leaves out `name` (an unchanged TOASTed column): the hash keeps its field.
        (key(2), Some(update(json!({"id": 2, "qty": 2})))),
        (key(3), Some(delete(json!({"id": 3})))),
        (key(3), None),
    ];
    produce(&client, topic, &records).await;
    // A record without a key: skipped, and reported in both sinks' status.
    let producer = client
        .producer(topic, ProducerConfig::default())
        .await
        .expect("producer");
    let keyless = insert(json!({"id": 4, "name": "nib", "qty": 1}));
    producer
        .enqueue(None, Some(keyless.as_bytes()), &[])
        .await
        .expect("enqueue")
        .await
        .expect("delivered");
    let config = format!(
        "[[sink]]\nname = \"cache\"\nkind = \"redis\"\ntopics = [\"{topic}\"]\nurl = \"{url}\"\n\
         key_prefix = \"items:\"\nttl_seconds = 300\n\n\
         [[sink]]\nname = \"hashes\"\nkind = \"redis\"\ntopics = [\"{topic}\"]\nurl = \"{url}\"\n\
         key_prefix = \"h:\"\nmode = \"hash\"\n",
        url = redis.url()
    );
    let connect = ConnectProcess::start(dir.path(), &config, &broker.addr);
    let cli = |args: &[&str]| redis.cli(args).map_err(|e| e.to_string());
    eventually("the rows mirror into keys and hashes", || {
        let one = cli(&["GET", "items:{\"id\":1}"])?;
        let two = cli(&["GET", "items:{\"id\":2}"])?;
        let gone = cli(&["EXISTS", "items:{\"id\":3}", "h:{\"id\":3}"])?;
        let hash = cli(&["HGETALL", "h:{\"id\":2}"])?;
        let parsed = |text: &str| serde_json::from_str::<Value>(text).unwrap_or_default();
        let fields: BTreeMap<&str, &str> = hash
            .lines()
            .collect::<Vec<_>>()
            .chunks(2)
            .filter_map(|pair| Some((*pair.first()?, *pair.get(1)?)))
            .collect();
        let want_fields = BTreeMap::from([("id", "2"), ("name", "ink"), ("qty", "2")]);
        if parsed(&one) == json!({"id": 1, "name": "pen", "qty": 5})
            && parsed(&two) == json!({"id": 2, "qty": 2})
            && gone == "0"
            && fields == want_fields
        {
            Ok(())
        } else {
            Err(format!(
                "{one} {two} exists={gone} {fields:?}\n{}",
                connect.log()
            ))
        }
    })
    .await;
    let ttl: i64 = cli(&["TTL", "items:{\"id\":1}"]).unwrap().parse().unwrap();
    assert!(ttl > 0 && ttl <= 300, "TTL {ttl}");
    let no_ttl: i64 = cli(&["TTL", "h:{\"id\":1}"]).unwrap().parse().unwrap();
    assert_eq!(no_ttl, -1, "no ttl_seconds: no expiry");
    eventually("both sinks report the record without a key", || {
        let reports = statuses(&connect.config, &broker.addr)?;
        for sink in ["cache", "hashes"] {
            let report = reports.get(sink).ok_or("no status yet")?;
            let error = report["last_error"].as_str().unwrap_or_default();
            if !error.contains("skipped: a record without a key") {
                return Err(format!("{report}"));
            }
            assert_eq!(report["state"], "running", "{report}");
        }
        Ok(())
    })
    .await;
}
