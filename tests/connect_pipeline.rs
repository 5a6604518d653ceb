//! A whole pipeline through the real `syncline-connect`: a PostgreSQL table captured into
//! Syncline and applied from there to a second PostgreSQL database and to Redis, under inserts,
//! updates and deletes; the target table and the cache end equal to the source, row for row.
//! The runtime's Prometheus metrics name every connector. Skipped, loudly, without PostgreSQL
//! or Redis, except under CI.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::connect::{rows_of, write_load, ConnectProcess};
use common::pg::{self, Postgres};
use common::redis::{self, Redis};
use common::BrokerProcess;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_a_source_and_sinks_when_the_table_changes_should_keep_database_and_cache_equal() {
    let test =
        "given_a_source_and_sinks_when_the_table_changes_should_keep_database_and_cache_equal";
    if pg::skip_unless_available(test) || redis::skip_unless_available(test) {
        return;
    }
    let postgres = Postgres::start().unwrap();
    let redis = Redis::start().unwrap();
    let schema = "CREATE TABLE items (id bigint PRIMARY KEY, name text NOT NULL, qty int NOT NULL)";
    postgres
        .psql(&format!(
            "{schema}; INSERT INTO items SELECT g, 'n' || g, g % 10 FROM generate_series(1, 200) g;"
        ))
        .unwrap();
    let mirror_url = postgres.create_database("mirror").unwrap();
    postgres.psql_in("mirror", schema).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(&dir.path().join("broker"));
    let config = format!(
        "[connect]\nmetrics_listen = \"127.0.0.1:0\"\n\n\
         [[source]]\nname = \"shop\"\nkind = \"postgres\"\nurl = \"{}\"\ntables = [\"public.items\"]\n\
         topic_prefix = \"shop\"\npartitions = 3\n\n\
         [[sink]]\nname = \"mirror\"\nkind = \"postgres\"\ntopics = [\"shop.public.items\"]\n\
         url = \"{mirror_url}\"\ntable = \"public.items\"\ntasks = 2\n\n\
         [[sink]]\nname = \"cache\"\nkind = \"redis\"\ntopics = [\"shop.public.items\"]\n\
         url = \"{}\"\nkey_prefix = \"items:\"\n",
        postgres.url(),
        redis.url()
    );
    let connect = ConnectProcess::start(dir.path(), &config, &broker.addr);
    connect.wait_for_log("metrics on /metrics", Duration::from_secs(30));
    let metrics_addr = connect
        .log()
        .lines()
        .find_map(|line| {
            let at = line.find("address=")?;
            line[at + "address=".len()..]
                .split_whitespace()
                .next()
                .map(str::to_owned)
        })
        .expect("the metrics address in the log");
    write_load(&postgres, 1_000, 40);

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let source = rows_of(&postgres, "postgres", "items");
        let mirror = rows_of(&postgres, "mirror", "items");
        let keys = redis.cli(&["--scan", "--pattern", "items:*"]).unwrap();
        let cached: BTreeMap<String, Value> = keys
            .lines()
            .filter(|k| !k.is_empty())
            .filter_map(|key| {
                // A key deleted between the scan and the GET reads as empty.
                let value = redis.cli(&["GET", key]).unwrap();
                let value = serde_json::from_str(value.trim()).ok()?;
                Some((key.trim_start_matches("items:").to_owned(), value))
            })
            .collect();
        if source == mirror && source == cached {
            assert!(source.len() > 250, "{} rows", source.len());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never equal: source {} rows, mirror {}, cache {}\n{}",
            source.len(),
            mirror.len(),
            cached.len(),
            connect.log()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    let text = common::scrape(&metrics_addr);
    common::promtool_check(&text);
    for connector in ["shop", "mirror", "cache"] {
        assert!(
            text.contains(&format!(
                "syncline_connect_state{{connector=\"{connector}\",state=\"failed\"}} 0"
            )),
            "{text}"
        );
    }
    assert!(text.contains("syncline_connect_records_total{connector=\"shop\",kind=\"source\"}"));
    assert!(
        text.contains("syncline_connect_lag{connector=\"mirror\""),
        "{text}"
    );
}
