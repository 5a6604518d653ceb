//! The test servers of the change-data-capture tests work: a real PostgreSQL with logical
//! WAL that keeps a committed row across a fast restart and across a crash (SIGKILL), and a
//! real Redis. Skipped, loudly, where PostgreSQL or Redis is not installed, except under CI.

mod common;

use common::pg::{self, Postgres};
use common::redis::{self, Redis};

#[test]
fn given_a_fresh_postgres_when_restarted_or_killed_should_keep_committed_rows() {
    let test = "given_a_fresh_postgres_when_restarted_or_killed_should_keep_committed_rows";
    if pg::skip_unless_available(test) {
        return;
    }
    let mut postgres = Postgres::start().unwrap();
    assert_eq!(postgres.psql("SHOW wal_level").unwrap(), "logical");
    assert_eq!(
        postgres.url(),
        format!("postgres://postgres@127.0.0.1:{}/postgres", postgres.port())
    );
    postgres
        .psql("CREATE TABLE prices (item text PRIMARY KEY, cents integer NOT NULL)")
        .unwrap();
    postgres
        .psql("INSERT INTO prices VALUES ('apple', 120)")
        .unwrap();
    let read = |postgres: &Postgres| {
        postgres
            .psql("SELECT item || '=' || cents FROM prices ORDER BY item")
            .unwrap()
    };
    assert_eq!(read(&postgres), "apple=120");

    let port = postgres.port();
    postgres.restart().unwrap();
    assert_eq!(postgres.port(), port, "a restart keeps the port");
    assert_eq!(read(&postgres), "apple=120");

    postgres
        .psql("INSERT INTO prices VALUES ('pear', 90)")
        .unwrap();
    postgres.kill();
    assert!(
        postgres.psql("SELECT 1").is_err(),
        "a killed server is gone"
    );
    postgres.restart().unwrap();
    assert_eq!(read(&postgres), "apple=120\npear=90");

    let url = postgres.create_database("orders").unwrap();
    assert!(url.ends_with("/orders"), "{url}");
    assert_eq!(
        postgres
            .psql_in("orders", "SELECT current_database()")
            .unwrap(),
        "orders"
    );
    let error = postgres.psql("SELECT * FROM missing").unwrap_err();
    assert!(format!("{error:#}").contains("missing"), "{error:#}");
}

#[test]
fn given_a_fresh_redis_when_a_key_is_set_should_get_it_back() {
    if redis::skip_unless_available("given_a_fresh_redis_when_a_key_is_set_should_get_it_back") {
        return;
    }
    let redis = Redis::start().unwrap();
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{}/", redis.port()));
    assert_eq!(
        redis.cli(&["SET", "greeting", "hello world"]).unwrap(),
        "OK"
    );
    assert_eq!(redis.cli(&["GET", "greeting"]).unwrap(), "hello world");
}
