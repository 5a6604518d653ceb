//! Change data capture from a real PostgreSQL into Syncline through the real `syncline-connect`
//! binary: the snapshot plus the stream equal the table row for row under concurrent writes;
//! kill -9 of the connector loses and duplicates nothing; PostgreSQL and broker restarts are
//! survived; schema changes, TRUNCATE, tables without a primary key and bad configuration are
//! handled or reported clearly. Skipped, loudly, without PostgreSQL, except under CI.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use common::connect::{fold, read_cdc, rows_of, write_load, CdcRecord, ConnectProcess};
use common::pg::{self, Postgres};
use common::BrokerProcess;
use serde_json::Value;

fn source_config(postgres: &Postgres, tables: &str, extra: &str) -> String {
    format!(
        "[[source]]\nname = \"shop\"\nkind = \"postgres\"\nurl = \"{}\"\ntables = [{tables}]\n\
         topic_prefix = \"shop\"\npartitions = 2\n{extra}\n",
        postgres.url()
    )
}

/// Polls until the topic folds to the table, or panics with the difference.
async fn wait_until_mirrored(
    broker: &BrokerProcess,
    postgres: &Postgres,
    table: &str,
    topic: &str,
    connect: &ConnectProcess,
) -> Vec<CdcRecord> {
    let mut client = broker.client().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let expected = rows_of(postgres, "postgres", table);
        let records = read_cdc(&mut client, topic).await;
        let got = fold(&records);
        if got == expected {
            return records;
        }
        if Instant::now() > deadline {
            let missing: Vec<_> = expected
                .keys()
                .filter(|k| !got.contains_key(*k))
                .take(5)
                .collect();
            let extra: Vec<_> = got
                .keys()
                .filter(|k| !expected.contains_key(*k))
                .take(5)
                .collect();
            panic!(
                "topic {topic} never matched {table}: {} rows vs {} keys; missing {missing:?}, \
                 extra {extra:?}\nconnect said:\n{}",
                expected.len(),
                got.len(),
                connect.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Each change position appears once among the non-tombstone records (a duplicate would be a
/// change stored twice). Snapshot rows (LSN 0) are left out: a snapshot has no per-row position.
fn assert_no_duplicate_changes(records: &[CdcRecord]) {
    let mut seen: HashMap<(u64, u64, String, String), u64> = HashMap::new();
    for record in records {
        let (Some(position), Some(value)) = (record.position, &record.value) else {
            continue;
        };
        if position.1 == 0 {
            continue;
        }
        let op = value["op"].as_str().unwrap_or_default().to_owned();
        *seen
            .entry((position.0, position.1, record.key.clone(), op))
            .or_default() += 1;
    }
    let duplicates: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).take(5).collect();
    assert!(
        duplicates.is_empty(),
        "changes stored twice: {duplicates:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_a_table_under_writes_when_captured_should_mirror_it_row_for_row() {
    let test = "given_a_table_under_writes_when_captured_should_mirror_it_row_for_row";
    if pg::skip_unless_available(test) {
        return;
    }
    let postgres = Postgres::start().unwrap();
    postgres
        .psql(
            "CREATE TABLE items (id bigint PRIMARY KEY, name text NOT NULL, qty int NOT NULL); \
             INSERT INTO items SELECT g, 'n' || g, g % 10 FROM generate_series(1, 500) g;",
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(&dir.path().join("broker"));
    let connect = ConnectProcess::start(
        dir.path(),
        &source_config(&postgres, "\"public.items\"", ""),
        &broker.addr,
    );
    // Writes race the snapshot and go on while streaming.
    write_load(&postgres, 1_000, 60);
    let records =
        wait_until_mirrored(&broker, &postgres, "items", "shop.public.items", &connect).await;
    assert!(
        records
            .iter()
            .any(|r| r.value.as_ref().is_some_and(|v| v["op"] == "r")),
        "no snapshot rows"
    );
    assert!(records.len() > 600, "{} records", records.len());
    assert!(records.iter().any(|r| r.value.is_none()), "no tombstones");
    let update = records
        .iter()
        .filter_map(|r| r.value.as_ref())
        .find(|v| v["op"] == "u")
        .expect("an update");
    assert_eq!(update["source"]["connector"], "postgresql");
    assert_eq!(update["source"]["table"], "items");
    assert!(update["source"]["txId"].as_u64().is_some());
    assert!(update["source"]["lsn"].as_u64().unwrap() > 0);
    assert_no_duplicate_changes(&records);
}

fn inserted_once(records: &[CdcRecord], first_id: i64, transactions: i64) {
    let mut creates: HashMap<String, u32> = HashMap::new();
    for record in records {
        if let Some(value) = &record.value {
            if value["op"] == "c" {
                *creates.entry(record.key.clone()).or_default() += 1;
            }
        }
    }
    for t in 0..transactions {
        for id in first_id + t * 3..first_id + t * 3 + 3 {
            let key = format!("{{\"id\":{id}}}");
            assert_eq!(creates.get(&key), Some(&1), "inserts of {key}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_the_connector_killed_mid_stream_when_restarted_should_lose_and_duplicate_nothing() {
    let test =
        "given_the_connector_killed_mid_stream_when_restarted_should_lose_and_duplicate_nothing";
    if pg::skip_unless_available(test) {
        return;
    }
    let postgres = Postgres::start().unwrap();
    postgres
        .psql(
            "CREATE TABLE items (id bigint PRIMARY KEY, name text NOT NULL, qty int NOT NULL); \
             INSERT INTO items SELECT g, 'n' || g, 1 FROM generate_series(1, 100) g;",
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(&dir.path().join("broker"));
    let config = source_config(&postgres, "\"public.items\"", "");
    let mut connect = ConnectProcess::start(dir.path(), &config, &broker.addr);
    connect.wait_for_log("streaming", Duration::from_secs(30));
    std::thread::scope(|scope| {
        let writer = scope.spawn(|| write_load(&postgres, 1_000, 150));
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(700));
            connect.kill9();
            connect = ConnectProcess::start(dir.path(), &config, &broker.addr);
        }
        writer.join().unwrap();
    });
    let records =
        wait_until_mirrored(&broker, &postgres, "items", "shop.public.items", &connect).await;
    assert_no_duplicate_changes(&records);
    inserted_once(&records, 1_000, 150);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_postgres_and_broker_restarts_when_streaming_should_catch_up() {
    let test = "given_postgres_and_broker_restarts_when_streaming_should_catch_up";
    if pg::skip_unless_available(test) {
        return;
    }
    let mut postgres = Postgres::start().unwrap();
    postgres
        .psql("CREATE TABLE items (id bigint PRIMARY KEY, name text NOT NULL, qty int NOT NULL)")
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("broker");
    let mut broker = BrokerProcess::start(&data);
    let addr = broker.addr.clone();
    let connect = ConnectProcess::start(
        dir.path(),
        &source_config(&postgres, "\"public.items\"", ""),
        &addr,
    );
    connect.wait_for_log("streaming", Duration::from_secs(30));
    write_load(&postgres, 1_000, 20);
    postgres.restart().unwrap();
    write_load(&postgres, 2_000, 20);
    assert!(broker.stop());
    write_load(&postgres, 3_000, 20);
    broker = BrokerProcess::start_with(&data, &["--listen", &addr]);
    write_load(&postgres, 4_000, 20);
    let records =
        wait_until_mirrored(&broker, &postgres, "items", "shop.public.items", &connect).await;
    assert_no_duplicate_changes(&records);
    for first in [1_000, 2_000, 3_000, 4_000] {
        inserted_once(&records, first, 20);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_schema_changes_transforms_and_truncate_should_follow_or_report_them() {
    let test = "given_schema_changes_transforms_and_truncate_should_follow_or_report_them";
    if pg::skip_unless_available(test) {
        return;
    }
    let postgres = Postgres::start().unwrap();
    postgres
        .psql(
            "CREATE TABLE items (id bigint PRIMARY KEY, name text NOT NULL, qty int NOT NULL, \
             secret text); \
             INSERT INTO items SELECT g, 'n' || g, g, 's' FROM generate_series(1, 10) g;",
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(&dir.path().join("broker"));
    let transforms = "[[source.transforms]]\ntype = \"drop\"\nfields = [\"secret\"]\n\
                      [[source.transforms]]\ntype = \"filter\"\nfield = \"qty\"\nop = \"gt\"\nvalue = 2\n";
    let connect = ConnectProcess::start(
        dir.path(),
        &source_config(&postgres, "\"public.items\"", transforms),
        &broker.addr,
    );
    connect.wait_for_log("streaming", Duration::from_secs(30));
    postgres
        .psql(
            "ALTER TABLE items ADD COLUMN color text; UPDATE items SET color = 'red' WHERE id = 5; \
             ALTER TABLE items DROP COLUMN name; INSERT INTO items VALUES (11, 20, 't', 'blue');",
        )
        .unwrap();
    let mut client = broker.client().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let table = loop {
        let table = fold(&read_cdc(&mut client, "shop.public.items").await);
        if table.contains_key("{\"id\":11}") && table["{\"id\":5}"].get("color").is_some() {
            break table;
        }
        assert!(
            Instant::now() < deadline,
            "changes never arrived: {table:?}\n{}",
            connect.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // The filter kept rows with qty > 2; the drop removed `secret`; the schema followed.
    assert!(!table.contains_key("{\"id\":1}") && !table.contains_key("{\"id\":2}"));
    assert_eq!(
        table["{\"id\":5}"],
        serde_json::json!({"id": 5, "name": "n5", "qty": 5, "color": "red"})
    );
    assert_eq!(
        table["{\"id\":11}"],
        serde_json::json!({"id": 11, "qty": 20, "color": "blue"})
    );

    // A delete of a kept row, and an update that stops a row matching, both leave the topic.
    postgres
        .psql("DELETE FROM items WHERE id = 4; UPDATE items SET qty = 1 WHERE id = 6")
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let table = fold(&read_cdc(&mut client, "shop.public.items").await);
        if !table.contains_key("{\"id\":4}") && !table.contains_key("{\"id\":6}") {
            assert!(table.contains_key("{\"id\":7}"));
            break;
        }
        assert!(Instant::now() < deadline, "rows 4 and 6 stayed: {table:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    postgres.psql("TRUNCATE items").unwrap();
    connect.wait_for_log("TRUNCATE of public.items", Duration::from_secs(30));

    // `syncline connect status --json` (through the CLI) reports it, still streaming.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let output = std::process::Command::new(common::binary("syncline"))
            .args(["--broker", &broker.addr, "connect", "--config"])
            .arg(&connect.config)
            .args(["status", "--json"])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let reports: Value = serde_json::from_slice(&output.stdout).unwrap();
        let shop = reports
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["connector"] == "shop")
            .cloned();
        if let Some(shop) = shop.filter(|s| s["errors_total"].as_u64() >= Some(1)) {
            assert_eq!(shop["state"], "streaming");
            assert_eq!(shop["kind"], "source");
            assert_eq!(shop["type"], "postgres");
            assert_eq!(shop["lag_unit"], "bytes");
            assert!(shop["records_total"].as_u64() >= Some(10), "{shop}");
            assert!(
                shop["last_error"].as_str().unwrap().contains("TRUNCATE"),
                "{shop}"
            );
            assert!(shop["position"].as_str().unwrap().contains('/'), "{shop}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "status never showed the TRUNCATE: {reports}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[test]
fn given_a_table_without_a_primary_key_or_a_bad_file_should_say_so() {
    let test = "given_a_table_without_a_primary_key_or_a_bad_file_should_say_so";
    if pg::skip_unless_available(test) {
        return;
    }
    let postgres = Postgres::start().unwrap();
    postgres.psql("CREATE TABLE logs (line text)").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(&dir.path().join("broker"));
    let connect = ConnectProcess::start(
        dir.path(),
        &source_config(&postgres, "\"public.logs\"", ""),
        &broker.addr,
    );
    connect.wait_for_log(
        "table public.logs has no primary key",
        Duration::from_secs(30),
    );
    drop(connect);
    postgres
        .psql(
            "CREATE TABLE parted (id int PRIMARY KEY) PARTITION BY RANGE (id); \
             CREATE TABLE parted_1 PARTITION OF parted FOR VALUES FROM (0) TO (100)",
        )
        .unwrap();
    let connect = ConnectProcess::start(
        dir.path(),
        &source_config(&postgres, "\"public.parted\"", "").replace("shop", "parts"),
        &broker.addr,
    );
    connect.wait_for_log(
        "table public.parted is partitioned",
        Duration::from_secs(30),
    );

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        source_config(&postgres, "\"public.logs\"", "").replace("topic_prefix", "topic_prefx"),
    )
    .unwrap();
    let output = std::process::Command::new(common::binary("syncline-connect"))
        .arg("--config")
        .arg(&bad)
        .arg("--check")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("error: ") && stderr.contains("topic_prefx"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_writes_to_other_tables_when_idle_should_advance_the_slot_with_heartbeats() {
    let test = "given_writes_to_other_tables_when_idle_should_advance_the_slot_with_heartbeats";
    if pg::skip_unless_available(test) {
        return;
    }
    let postgres = Postgres::start().unwrap();
    postgres
        .psql(
            "CREATE TABLE items (id bigint PRIMARY KEY, name text NOT NULL, qty int NOT NULL); \
             CREATE TABLE noise (id serial PRIMARY KEY, line text)",
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(&dir.path().join("broker"));
    let connect = ConnectProcess::start(
        dir.path(),
        &source_config(&postgres, "\"public.items\"", "heartbeat_ms = 200"),
        &broker.addr,
    );
    connect.wait_for_log("streaming", Duration::from_secs(30));
    postgres
        .psql("INSERT INTO noise (line) SELECT repeat('x', 100) FROM generate_series(1, 2000)")
        .unwrap();
    let written = postgres.psql("SELECT pg_current_wal_lsn()").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let behind = postgres
            .psql(&format!(
                "SELECT confirmed_flush_lsn < '{written}'::pg_lsn FROM pg_replication_slots \
                 WHERE slot_name = 'syncline_shop'"
            ))
            .unwrap();
        if behind == "f" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the slot stayed behind {written}\n{}",
            connect.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_a_route_transform_should_send_rows_by_field_and_move_them_between_topics() {
    let test = "given_a_route_transform_should_send_rows_by_field_and_move_them_between_topics";
    if pg::skip_unless_available(test) {
        return;
    }
    let postgres = Postgres::start().unwrap();
    postgres
        .psql(
            "CREATE TABLE items (id bigint PRIMARY KEY, name text NOT NULL, qty int NOT NULL, \
             region text); \
             INSERT INTO items VALUES (1, 'a', 1, 'eu'), (2, 'b', 2, 'us'), (3, 'c', 3, 'eu');",
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(&dir.path().join("broker"));
    let route = "[[source.transforms]]\ntype = \"route\"\nfield = \"region\"\n\
                 topic = \"orders.{value}\"\n";
    // Without REPLICA IDENTITY FULL a route is refused: deletes would not carry the region.
    let connect = ConnectProcess::start(
        dir.path(),
        &source_config(&postgres, "\"public.items\"", route),
        &broker.addr,
    );
    connect.wait_for_log("needs REPLICA IDENTITY FULL", Duration::from_secs(30));
    drop(connect);
    postgres
        .psql("ALTER TABLE items REPLICA IDENTITY FULL")
        .unwrap();
    let connect = ConnectProcess::start(
        dir.path(),
        &source_config(&postgres, "\"public.items\"", route),
        &broker.addr,
    );
    connect.wait_for_log("streaming", Duration::from_secs(60));
    // Row 3 moves from eu to us; row 1 is deleted; row 4 arrives in us.
    postgres
        .psql(
            "UPDATE items SET region = 'us' WHERE id = 3; DELETE FROM items WHERE id = 1; \
             INSERT INTO items VALUES (4, 'd', 4, 'us')",
        )
        .unwrap();
    let mut client = broker.client().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let eu = fold(&read_cdc(&mut client, "orders.eu").await);
        let us = fold(&read_cdc(&mut client, "orders.us").await);
        let keys = |t: &BTreeMap<String, Value>| t.keys().cloned().collect::<Vec<_>>();
        if keys(&eu).is_empty() && keys(&us) == ["{\"id\":2}", "{\"id\":3}", "{\"id\":4}"] {
            assert_eq!(us["{\"id\":3}"]["region"], "us");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "eu {eu:?}, us {us:?}\n{}",
            connect.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
