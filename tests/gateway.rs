//! The gateway (issue 18) through the real binaries: `syncline-gateway` in front of a broker,
//! spoken to over plain HTTP/1.1.
//!
//! - Tables: PUT, GET (with its ETag), conditional PUT (`If-Match`, `If-None-Match: *`) with
//!   412 and the current version on a conflict, DELETE, 404 after it; binary keys and values
//!   as base64 with their encoding named.
//! - Records: a POST of a JSON array is acknowledged with offsets and read back by the CLI.
//! - Topics: listed with their kind.
//! - Auth: the caller's bearer token is passed on; the broker's UNAUTHENTICATED and
//!   PERMISSION_DENIED come back as 401 and 403 with its message.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use common::gateway::{cli_ok, header, http, json_of, next_frame, start_gateway};
use common::BrokerProcess;
use serde_json::{json, Value};

#[test]
fn tables_records_and_topics_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(&dir.path().join("data"));
    let cli = |args: &[&str]| cli_ok(&broker.addr, args);
    cli(&["topic", "create", "prices", "--cleanup", "compact"]);
    cli(&["topic", "create", "events", "--partitions", "1"]);
    let gateway = start_gateway(&broker.addr, &[]);
    let g = gateway.addr.as_str();

    let (status, headers, body) = http(g, "PUT", "/v1/tables/prices/apple", &[], b"1.20");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let v1 = json_of(&body)["version"].as_u64().unwrap();
    assert_eq!(header(&headers, "etag"), Some(format!("\"{v1}\"").as_str()));
    let (status, headers, body) = http(g, "GET", "/v1/tables/prices/apple", &[], b"");
    assert_eq!(status, 200);
    assert_eq!(
        json_of(&body),
        json!({"key": "apple", "value": "1.20", "version": v1})
    );
    assert_eq!(header(&headers, "etag"), Some(format!("\"{v1}\"").as_str()));

    // Compare-and-set by version.
    let if_match = v1.to_string();
    let (status, _, body) = http(
        g,
        "PUT",
        "/v1/tables/prices/apple",
        &[("If-Match", &if_match)],
        b"1.25",
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let v2 = json_of(&body)["version"].as_u64().unwrap();
    assert!(v2 > v1);
    let (status, _, body) = http(
        g,
        "PUT",
        "/v1/tables/prices/apple",
        &[("If-Match", &if_match)],
        b"0.99",
    );
    assert_eq!(status, 412, "a stale If-Match");
    assert_eq!(json_of(&body)["current_version"], json!(v2));
    assert_eq!(
        json_of(&body)["current_value"],
        "1.25",
        "the value that won"
    );
    let (status, _, body) = http(
        g,
        "PUT",
        "/v1/tables/prices/apple",
        &[("If-None-Match", "*")],
        b"0.99",
    );
    assert_eq!(status, 412, "If-None-Match on a present key");
    assert_eq!(json_of(&body)["current_version"], json!(v2));
    let (status, _, _) = http(
        g,
        "PUT",
        "/v1/tables/prices/pear",
        &[("If-None-Match", "*")],
        b"2.00",
    );
    assert_eq!(status, 200);
    let (status, _, body) = http(
        g,
        "PUT",
        "/v1/tables/prices/apple",
        &[("If-Match", "soon")],
        b"x",
    );
    assert_eq!(status, 400);
    assert!(json_of(&body)["error"]
        .as_str()
        .unwrap()
        .contains("If-Match"));

    // Delete, conditionally; then the key is gone.
    let (status, _, body) = http(
        g,
        "DELETE",
        "/v1/tables/prices/apple",
        &[("If-Match", &v2.to_string())],
        b"",
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let (status, _, _) = http(g, "GET", "/v1/tables/prices/apple", &[], b"");
    assert_eq!(status, 404);

    // A key with a slash, URL-encoded; binary bytes through base64.
    let (status, _, _) = http(g, "PUT", "/v1/tables/prices/fruit%2Fkiwi", &[], b"3");
    assert_eq!(status, 200);
    let (_, _, body) = http(g, "GET", "/v1/tables/prices/fruit%2Fkiwi", &[], b"");
    assert_eq!(json_of(&body)["key"], "fruit/kiwi");
    let (status, _, _) = http(
        g,
        "PUT",
        "/v1/tables/prices/%2FwA%3D?encoding=base64",
        &[],
        &[0xff, 0xfe],
    );
    assert_eq!(status, 200);
    let (status, _, body) = http(
        g,
        "GET",
        "/v1/tables/prices/%2FwA%3D?encoding=base64",
        &[],
        b"",
    );
    assert_eq!(status, 200);
    let entry = json_of(&body);
    assert_eq!(entry["key"], "/wA=");
    assert_eq!(entry["key_encoding"], "base64");
    assert_eq!(entry["value"], "//4=");
    assert_eq!(entry["value_encoding"], "base64");

    // Records into a plain topic, read back by the CLI.
    let records = json!([
        {"key": "k1", "value": "first"},
        {"value": "second"},
        {"key": "k3", "value": "dGhpcmQ=", "value_encoding": "base64"}
    ]);
    let (status, _, body) = http(
        g,
        "POST",
        "/v1/topics/events/records",
        &[("Content-Type", "application/json")],
        records.to_string().as_bytes(),
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let offsets: Vec<u64> = json_of(&body)["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, [0, 1, 2]);
    let consumed = cli(&[
        "consume",
        "events",
        "--from-beginning",
        "--max-records",
        "3",
    ]);
    assert_eq!(
        consumed.lines().collect::<Vec<_>>(),
        ["first", "second", "third"]
    );
    let json_type = [("Content-Type", "application/json")];
    let (status, _, body) = http(
        g,
        "POST",
        "/v1/topics/events/records",
        &json_type,
        b"{\"not\": 1}",
    );
    assert_eq!(status, 400);
    assert!(json_of(&body)["error"]
        .as_str()
        .unwrap()
        .contains("JSON array"));
    let (status, _, _) = http(
        g,
        "POST",
        "/v1/topics/missing/records",
        &json_type,
        b"[{\"value\": \"x\"}]",
    );
    assert_eq!(status, 404);
    // Another content type (what a cross-site form or `curl --data` sends) is refused.
    let (status, _, body) = http(
        g,
        "POST",
        "/v1/topics/events/records",
        &[("Content-Type", "text/plain")],
        b"[{\"value\": \"x\"}]",
    );
    assert_eq!(status, 415, "{}", String::from_utf8_lossy(&body));
    assert!(json_of(&body)["error"]
        .as_str()
        .unwrap()
        .contains("application/json"));

    let (status, _, body) = http(g, "GET", "/v1/topics", &[], b"");
    assert_eq!(status, 200);
    let topics = json_of(&body);
    assert!(
        topics["topics"]
            .as_array()
            .unwrap()
            .contains(&json!({"name": "prices", "partitions": 1, "table": true})),
        "{topics}"
    );
}

#[test]
fn callers_tokens_are_passed_on_and_refusals_come_back_as_401_and_403() {
    use sha2::Digest as _;
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.toml");
    let hex = |t: &str| -> String {
        sha2::Sha256::digest(t.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    std::fs::write(
        &tokens,
        format!(
            "[[token]]\nprincipal = \"admin\"\nsha256 = \"{}\"\n\n\
             [[token]]\nprincipal = \"reader\"\nsha256 = \"{}\"\n",
            hex("admin-token"),
            hex("reader-token")
        ),
    )
    .unwrap();
    let broker = BrokerProcess::start_with(
        &dir.path().join("data"),
        &[
            "--auth-tokens-file",
            tokens.to_str().unwrap(),
            "--superusers",
            "admin",
        ],
    );
    let admin = |args: &[&str]| {
        let mut all = vec!["--token", "admin-token"];
        all.extend_from_slice(args);
        let output = common::cluster::run_cli_at(&broker.addr, &all);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    admin(&["topic", "create", "prices", "--cleanup", "compact"]);
    admin(&[
        "acl",
        "add",
        "--principal",
        "reader",
        "--allow",
        "read",
        "--topic",
        "prices",
    ]);
    let gateway = start_gateway(&broker.addr, &[]);
    let g = gateway.addr.as_str();

    let (status, _, body) = http(g, "GET", "/v1/tables/prices/apple", &[], b"");
    assert_eq!(status, 401, "{}", String::from_utf8_lossy(&body));
    assert!(json_of(&body)["error"]
        .as_str()
        .unwrap()
        .contains("no credentials"));
    let (status, _, body) = http(
        g,
        "PUT",
        "/v1/tables/prices/apple",
        &[("Authorization", "Bearer reader-token")],
        b"1",
    );
    assert_eq!(status, 403, "{}", String::from_utf8_lossy(&body));
    assert!(
        json_of(&body)["error"]
            .as_str()
            .unwrap()
            .contains("may not write topic `prices`"),
        "{}",
        String::from_utf8_lossy(&body)
    );
    let (status, _, body) = http(
        g,
        "PUT",
        "/v1/tables/prices/apple",
        &[("Authorization", "Bearer admin-token")],
        b"1",
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let (status, _, body) = http(
        g,
        "GET",
        "/v1/tables/prices/apple",
        &[("Authorization", "Bearer reader-token")],
        b"",
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(json_of(&body)["value"], "1");
}

/// An SSE subscription over HTTP/1.0 (the body streams until the connection closes).
struct Events {
    reader: BufReader<TcpStream>,
}

/// One server-sent event: (event, id, data).
type Sse = (String, Option<String>, String);

impl Events {
    fn open(addr: &str, path: &str, last_event_id: Option<&str>) -> Events {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut request =
            format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: text/event-stream\r\n");
        if let Some(id) = last_event_id {
            request.push_str(&format!("Last-Event-ID: {id}\r\n"));
        }
        request.push_str("\r\n");
        stream.write_all(request.as_bytes()).unwrap();
        let mut reader = BufReader::new(stream);
        let mut status = String::new();
        reader.read_line(&mut status).unwrap();
        assert!(status.contains(" 200 "), "{status}");
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if line.trim().is_empty() {
                break;
            }
        }
        Events { reader }
    }

    /// The next event (comments and keep-alives skipped).
    fn next(&mut self) -> Sse {
        let (mut event, mut id, mut data) = (String::from("message"), None, String::new());
        let mut any = false;
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).unwrap();
            assert!(n > 0, "the stream ended");
            let line = line.trim_end_matches(['\r', '\n']);
            if line.is_empty() {
                if any {
                    return (event, id, data);
                }
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            any = true;
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value).to_string();
            match field {
                "event" => event = value,
                "id" => id = Some(value),
                "data" => data = value,
                _ => {}
            }
        }
    }

    /// The next event, as (event, key, value) with the data parsed.
    fn next_change(&mut self) -> (String, String, Option<String>, Option<String>) {
        let (event, id, data) = self.next();
        let data = json_of(data.as_bytes());
        (
            event,
            data["key"].as_str().unwrap_or_default().to_string(),
            data["value"].as_str().map(str::to_string),
            id,
        )
    }
}

/// SSE: the snapshot, `caught-up`, live changes with resume tokens; a reconnect with
/// `Last-Event-ID` to a restarted gateway gets exactly what it missed; a token the log cannot
/// serve gets `reset` and the table again.
#[test]
fn watch_streams_a_table_and_resumes_from_its_token_across_a_gateway_restart() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(&dir.path().join("data"));
    let cli = |args: &[&str]| cli_ok(&broker.addr, args);
    cli(&[
        "topic",
        "create",
        "live",
        "--cleanup",
        "compact",
        "--delete-retention-ms",
        "0",
    ]);
    let gateway = start_gateway(&broker.addr, &[]);
    let put = |g: &str, key: &str, value: &str| {
        let (status, _, body) = http(
            g,
            "PUT",
            &format!("/v1/tables/live/{key}"),
            &[],
            value.as_bytes(),
        );
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    };
    let delete = |g: &str, key: &str| {
        let (status, _, _) = http(g, "DELETE", &format!("/v1/tables/live/{key}"), &[], b"");
        assert_eq!(status, 200);
    };
    put(&gateway.addr, "a", "1");
    put(&gateway.addr, "b", "2");

    let mut events = Events::open(&gateway.addr, "/v1/watch/live", None);
    let mut snapshot = [events.next_change(), events.next_change()];
    snapshot.sort();
    assert_eq!(
        snapshot
            .iter()
            .map(|(e, k, v, _)| (e.as_str(), k.as_str(), v.as_deref()))
            .collect::<Vec<_>>(),
        [("put", "a", Some("1")), ("put", "b", Some("2"))]
    );
    let (event, first_token, _) = events.next();
    assert_eq!(event, "caught-up");
    let first_token = first_token.expect("caught-up carries a token");

    put(&gateway.addr, "c", "3");
    delete(&gateway.addr, "a");
    let (event, key, value, _) = events.next_change();
    assert_eq!(
        (event.as_str(), key.as_str(), value.as_deref()),
        ("put", "c", Some("3"))
    );
    let (event, key, _, token) = events.next_change();
    assert_eq!((event.as_str(), key.as_str()), ("delete", "a"));
    let token = token.expect("a change carries a token");
    drop(events);

    // Missed while away, and the gateway restarts meanwhile.
    put(&gateway.addr, "d", "4");
    put(&gateway.addr, "b", "22");
    delete(&gateway.addr, "c");
    drop(gateway);
    let gateway = start_gateway(&broker.addr, &[]);
    let mut events = Events::open(&gateway.addr, "/v1/watch/live", Some(&token));
    let mut missed = Vec::new();
    loop {
        let (event, id, data) = events.next();
        if event == "caught-up" {
            assert!(id.is_some());
            break;
        }
        let data = json_of(data.as_bytes());
        missed.push((
            event,
            data["key"].as_str().unwrap().to_string(),
            data["value"].as_str().map(str::to_string),
        ));
    }
    assert_eq!(
        missed,
        [
            ("put".to_string(), "d".to_string(), Some("4".to_string())),
            ("put".to_string(), "b".to_string(), Some("22".to_string())),
            ("delete".to_string(), "c".to_string(), None),
        ],
        "exactly the changes after the token, in order"
    );
    put(&gateway.addr, "e", "5");
    let (event, key, _, _) = events.next_change();
    assert_eq!((event.as_str(), key.as_str()), ("put", "e"));
    drop(events);

    // A token the log cannot serve (here: of another partition count; likewise one older
    // than what retention or compaction removed) gets `reset` and the table again.
    assert!(!first_token.contains('.'));
    let mut events = Events::open(&gateway.addr, "/v1/watch/live", Some("0.0"));
    let (event, _, _) = events.next();
    assert_eq!(event, "reset");
    let mut table = Vec::new();
    loop {
        let (event, _, data) = events.next();
        if event == "caught-up" {
            break;
        }
        let data = json_of(data.as_bytes());
        table.push((
            data["key"].as_str().unwrap().to_string(),
            data["value"].as_str().unwrap().to_string(),
        ));
    }
    table.sort();
    assert_eq!(
        table,
        [
            ("b".to_string(), "22".to_string()),
            ("d".to_string(), "4".to_string()),
            ("e".to_string(), "5".to_string()),
        ]
    );
}

/// WebSocket: a subscription and table writes over one socket; a compare-and-set conflict is
/// answered 412 with the current version; a frame that is not understood closes with 1003.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_subscribes_and_writes_with_compare_and_set() {
    use futures_util::SinkExt as _;
    use tokio_tungstenite::tungstenite::Message;
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(&dir.path().join("data"));
    let output = common::cluster::run_cli_at(
        &broker.addr,
        &["topic", "create", "board", "--cleanup", "compact"],
    );
    assert!(output.status.success());
    let gateway = start_gateway(&broker.addr, &[]);
    let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://{}/v1/ws", gateway.addr))
        .await
        .unwrap();
    let send = |frame: Value| Message::Text(frame.to_string().into());
    socket
        .send(send(
            json!({"op": "put", "req": 1, "table": "board", "key": "a", "value": "1"}),
        ))
        .await
        .unwrap();
    let read = next_frame;
    let answer = read(&mut socket).await;
    assert_eq!(answer["req"], 1);
    assert_eq!(answer["status"], 200, "{answer}");
    let v1 = answer["version"].as_u64().unwrap();

    socket
        .send(send(
            json!({"op": "subscribe", "sub": "s1", "table": "board"}),
        ))
        .await
        .unwrap();
    let put = read(&mut socket).await;
    assert_eq!(
        (
            put["sub"].as_str(),
            put["event"].as_str(),
            put["key"].as_str(),
            put["value"].as_str()
        ),
        (Some("s1"), Some("put"), Some("a"), Some("1")),
        "{put}"
    );
    let caught_up = read(&mut socket).await;
    assert_eq!(caught_up["event"], "caught-up", "{caught_up}");
    assert!(caught_up["id"].is_string());

    // A write at the version read succeeds; a second one at the same version conflicts.
    socket
        .send(send(json!({"op": "put", "req": "r2", "table": "board", "key": "a", "value": "2", "if_version": v1})))
        .await
        .unwrap();
    let mut frames = vec![read(&mut socket).await, read(&mut socket).await];
    frames.sort_by_key(|f| f["req"].is_null());
    assert_eq!(frames[0]["req"], "r2");
    assert_eq!(frames[0]["status"], 200, "{frames:?}");
    let v2 = frames[0]["version"].as_u64().unwrap();
    assert_eq!(
        (
            frames[1]["event"].as_str(),
            frames[1]["value"].as_str(),
            frames[1]["version"].as_u64()
        ),
        (Some("put"), Some("2"), Some(v2)),
        "the subscription sees the write"
    );
    socket
        .send(send(json!({"op": "put", "req": "r3", "table": "board", "key": "a", "value": "3", "if_version": v1})))
        .await
        .unwrap();
    let conflict = read(&mut socket).await;
    assert_eq!(conflict["status"], 412, "{conflict}");
    assert_eq!(conflict["current_version"], v2);
    assert_eq!(conflict["current_value"], "2", "{conflict}");
    socket
        .send(send(
            json!({"op": "get", "req": "r4", "table": "board", "key": "a"}),
        ))
        .await
        .unwrap();
    let got = read(&mut socket).await;
    assert_eq!(
        (got["status"].as_u64(), got["value"].as_str()),
        (Some(200), Some("2"))
    );
    socket
        .send(send(json!({"op": "unsubscribe", "sub": "s1"})))
        .await
        .unwrap();
    assert_eq!(read(&mut socket).await["event"], "unsubscribed");

    socket.send(send(json!({"op": "dance"}))).await.unwrap();
    let closed = read(&mut socket).await;
    assert_eq!(closed["closed"], 1003, "{closed}");
}

/// A WebSocket client that stops reading is closed with 4008 once its buffers are full; it
/// resumes from the last id it read and gets every change exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_websocket_client_is_closed_with_4008_and_resumes_from_its_token() {
    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::tungstenite::Message;
    const KEYS: usize = 300;
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(&dir.path().join("data"));
    let output = common::cluster::run_cli_at(
        &broker.addr,
        &["topic", "create", "feed", "--cleanup", "compact"],
    );
    assert!(output.status.success());
    let gateway = start_gateway(
        &broker.addr,
        &[
            "--subscriber-buffer-events",
            "8",
            "--socket-buffer-frames",
            "8",
        ],
    );
    let url = format!("ws://{}/v1/ws", gateway.addr);
    let send = |frame: Value| Message::Text(frame.to_string().into());
    let (mut socket, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    socket
        .send(send(
            json!({"op": "subscribe", "sub": "s", "table": "feed"}),
        ))
        .await
        .unwrap();
    let first = loop {
        match socket.next().await.unwrap().unwrap() {
            Message::Text(text) => break json_of(text.as_bytes()),
            _ => continue,
        }
    };
    assert_eq!(first["event"], "caught-up", "{first}");

    // Changes of 32 KiB values while the client reads nothing: more than the socket's
    // buffers and the gateway's hold.
    let addr = gateway.addr.clone();
    tokio::task::spawn_blocking(move || {
        let value = vec![b'x'; 32 * 1024];
        for i in 0..KEYS {
            let (status, _, _) = http(
                &addr,
                "PUT",
                &format!("/v1/tables/feed/k{i:03}"),
                &[],
                &value,
            );
            assert_eq!(status, 200);
        }
    })
    .await
    .unwrap();
    // Still not reading for longer than the gateway waits on a full buffer.
    tokio::time::sleep(Duration::from_secs(7)).await;

    let mut seen = Vec::new();
    let mut last_id = first["id"].as_str().unwrap().to_string();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let code = loop {
        assert!(
            seen.len() < KEYS,
            "every change arrived: the client was never closed"
        );
        let message = tokio::time::timeout_at(deadline, socket.next())
            .await
            .expect("the close within 60 s");
        match message {
            Some(Ok(Message::Text(text))) => {
                let frame = json_of(text.as_bytes());
                seen.push(frame["key"].as_str().unwrap().to_string());
                last_id = frame["id"].as_str().unwrap().to_string();
            }
            Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => continue,
            Some(Err(error)) => panic!("{error}"),
            None => break None,
        }
    };
    assert_eq!(code, Some(4008), "closed for being slow");
    assert!(seen.len() < KEYS, "it fell behind before the end");

    let (mut socket, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    socket
        .send(send(
            json!({"op": "subscribe", "sub": "s", "table": "feed", "from": last_id}),
        ))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let message = tokio::time::timeout_at(deadline, socket.next())
            .await
            .expect("caught up within 60 s")
            .unwrap()
            .unwrap();
        let Message::Text(text) = message else {
            continue;
        };
        let frame = json_of(text.as_bytes());
        assert_ne!(frame["event"], "reset", "the token is served");
        if frame["event"] == "caught-up" {
            break;
        }
        seen.push(frame["key"].as_str().unwrap().to_string());
    }
    let expected: Vec<String> = (0..KEYS).map(|i| format!("k{i:03}")).collect();
    assert_eq!(seen, expected, "every change once, in order");
}

/// A plain topic over SSE: from `earliest`, the records with their tokens; a reconnect with
/// the last token gets only what came after it; a WebSocket subscription to it works the same.
#[test]
fn watch_streams_a_plain_topic_from_an_offset_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(&dir.path().join("data"));
    let output = common::cluster::run_cli_at(
        &broker.addr,
        &["topic", "create", "clicks", "--partitions", "2"],
    );
    assert!(output.status.success());
    let gateway = start_gateway(&broker.addr, &[]);
    let g = gateway.addr.as_str();
    let post = |records: Value| {
        let (status, _, body) = http(
            g,
            "POST",
            "/v1/topics/clicks/records",
            &[("Content-Type", "application/json")],
            records.to_string().as_bytes(),
        );
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    };
    post(
        json!([{"key": "a", "value": "1"}, {"key": "b", "value": "2"}, {"key": "c", "value": "3"}]),
    );

    let mut events = Events::open(g, "/v1/watch/clicks?from=earliest", None);
    let (event, start, _) = events.next();
    assert_eq!(event, "caught-up");
    assert_eq!(
        start.as_deref(),
        Some("0.0"),
        "two partitions, from their starts"
    );
    let mut seen = Vec::new();
    let mut token = String::new();
    while seen.len() < 3 {
        let (event, id, data) = events.next();
        assert_eq!(event, "record");
        let data = json_of(data.as_bytes());
        seen.push(data["value"].as_str().unwrap().to_string());
        token = id.unwrap();
    }
    seen.sort();
    assert_eq!(seen, ["1", "2", "3"]);
    drop(events);

    post(json!([{"key": "d", "value": "4"}]));
    let mut events = Events::open(g, "/v1/watch/clicks", Some(&token));
    let (event, id, _) = events.next();
    assert_eq!(
        (event.as_str(), id.as_deref()),
        ("caught-up", Some(token.as_str()))
    );
    let (event, _, data) = events.next();
    assert_eq!(event, "record");
    assert_eq!(
        json_of(data.as_bytes())["value"],
        "4",
        "only what came after the token"
    );
}

/// A rustls client config trusting the CA in `ca` (PEM).
fn trusting(ca: &std::path::Path) -> std::sync::Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    std::sync::Arc::new(config)
}

/// One HTTPS request to the gateway, trusting `ca`; Err with the handshake's error.
fn https_get(addr: &str, ca: &std::path::Path, path: &str) -> Result<(u16, Vec<u8>), String> {
    let stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut connection = rustls::ClientConnection::new(trusting(ca), name).unwrap();
    let mut stream = stream;
    while connection.is_handshaking() {
        connection
            .complete_io(&mut stream)
            .map_err(|e| e.to_string())?;
    }
    let tls = rustls::StreamOwned::new(connection, stream);
    let (status, _, body) = common::gateway::http_on(tls, addr, "GET", path, &[], b"");
    Ok((status, body))
}

/// TLS on the gateway's own port: HTTPS and WSS with `--listen-cert`/`--listen-key`; a
/// plain-text client gets no answer and a client that does not trust the certificate fails
/// its handshake, while the gateway goes on serving; SIGHUP swaps in a new certificate for
/// new connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_serves_https_and_wss_and_reloads_its_certificate_on_sighup() {
    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::tungstenite::Message;
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(&dir.path().join("data"));
    let output = common::cluster::run_cli_at(
        &broker.addr,
        &["topic", "create", "board", "--cleanup", "compact"],
    );
    assert!(output.status.success());
    let files = common::pki::Pki::new("gateway-ca").write(dir.path(), "gw");
    let (cert, key) = (
        files.server_cert.display().to_string(),
        files.server_key.display().to_string(),
    );
    let gateway = start_gateway(
        &broker.addr,
        &["--listen-cert", &cert, "--listen-key", &key],
    );
    let g = gateway.addr.clone();

    let (status, body) = tokio::task::block_in_place(|| https_get(&g, &files.ca, "/v1/topics"))
        .expect("a TLS handshake with the gateway's certificate");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(json_of(&body)["topics"][0]["name"], "board");

    // Plain text on the TLS port: no HTTP answer, the connection is closed.
    let mut plain = TcpStream::connect(&g).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    plain
        .write_all(b"GET /v1/topics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    assert!(
        !answer.starts_with(b"HTTP/"),
        "plain text was answered: {}",
        String::from_utf8_lossy(&answer)
    );
    // A client trusting another CA fails its handshake.
    let other = common::pki::Pki::new("other-ca").write(dir.path(), "other");
    let refused = tokio::task::block_in_place(|| https_get(&g, &other.ca, "/v1/topics"));
    assert!(
        refused.is_err(),
        "a certificate from another CA was trusted"
    );

    // WSS: a subscription over TLS.
    let tcp = tokio::net::TcpStream::connect(&g).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(trusting(&files.ca));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    let (mut socket, _) = tokio_tungstenite::client_async(format!("wss://{g}/v1/ws"), tls)
        .await
        .unwrap();
    let frame = json!({"op": "put", "req": 1, "table": "board", "key": "a", "value": "1"});
    socket
        .send(Message::Text(frame.to_string().into()))
        .await
        .unwrap();
    // Operations run concurrently: subscribe once the put is acknowledged.
    loop {
        let message = tokio::time::timeout(Duration::from_secs(30), socket.next())
            .await
            .expect("an answer within 30 s")
            .expect("the socket is open")
            .unwrap();
        if let Message::Text(text) = message {
            assert_eq!(json_of(text.as_bytes())["status"], 200, "{text}");
            break;
        }
    }
    let frame = json!({"op": "subscribe", "sub": "s", "table": "board"});
    socket
        .send(Message::Text(frame.to_string().into()))
        .await
        .unwrap();
    let mut seen = Vec::new();
    while !seen.iter().any(|f: &Value| f["event"] == "caught-up") {
        let message = tokio::time::timeout(Duration::from_secs(30), socket.next())
            .await
            .expect("a frame within 30 s")
            .expect("the socket is open")
            .unwrap();
        if let Message::Text(text) = message {
            seen.push(json_of(text.as_bytes()));
        }
    }
    assert!(
        seen.iter()
            .any(|f| f["event"] == "put" && f["key"] == "a" && f["value"] == "1"),
        "{seen:?}"
    );

    // SIGHUP: a certificate from another CA, for new connections.
    std::fs::copy(&other.server_cert, &files.server_cert).unwrap();
    std::fs::copy(&other.server_key, &files.server_key).unwrap();
    let hup = Command::new("kill")
        .args(["-HUP", &gateway.child.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok((status, _)) =
            tokio::task::block_in_place(|| https_get(&g, &other.ca, "/v1/topics"))
        {
            assert_eq!(status, 200);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the new certificate is not served 30 s after SIGHUP"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        tokio::task::block_in_place(|| https_get(&g, &files.ca, "/v1/topics")).is_err(),
        "the old certificate is still served"
    );
    // The open WebSocket kept its connection.
    socket
        .send(Message::Text(json!({"op": "ping"}).to_string().into()))
        .await
        .unwrap();
    loop {
        let message = tokio::time::timeout(Duration::from_secs(30), socket.next())
            .await
            .expect("a pong within 30 s")
            .expect("the socket is open")
            .unwrap();
        if let Message::Text(text) = message {
            if json_of(text.as_bytes())["op"] == "pong" {
                break;
            }
        }
    }
}

/// The console's JSON views: the cluster's nodes, a topic's partitions with offsets, consumer
/// groups and their lag, as the CLI sees them.
#[test]
fn cluster_topic_and_group_views_show_offsets_and_lag() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(&dir.path().join("data"));
    let cli = |args: &[&str]| cli_ok(&broker.addr, args);
    cli(&["topic", "create", "orders", "--partitions", "2"]);
    let gateway = start_gateway(&broker.addr, &[]);
    let g = gateway.addr.as_str();
    let records: Vec<Value> = (0..10)
        .map(|i| json!({"key": format!("k{i}"), "value": format!("v{i}")}))
        .collect();
    let body = serde_json::to_vec(&records).unwrap();
    let (status, _, answer) = http(
        g,
        "POST",
        "/v1/topics/orders/records",
        &[("Content-Type", "application/json")],
        &body,
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
    // A group that read 4 records and committed them.
    cli(&[
        "consume",
        "orders",
        "--group",
        "billing",
        "--timeout-ms",
        "20000",
        "--max-records",
        "4",
    ]);

    let (status, _, body) = http(g, "GET", "/v1/cluster", &[], b"");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let cluster = json_of(&body);
    assert_eq!(cluster["nodes"].as_array().unwrap().len(), 1, "{cluster}");
    assert_eq!(cluster["nodes"][0]["alive"], true, "{cluster}");

    let (status, _, body) = http(g, "GET", "/v1/topics/orders", &[], b"");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let topic = json_of(&body);
    assert_eq!(topic["table"], false);
    let partitions = topic["partitions"].as_array().unwrap();
    assert_eq!(partitions.len(), 2, "{topic}");
    let ends: u64 = partitions
        .iter()
        .map(|p| p["log_end_offset"].as_u64().unwrap())
        .sum();
    assert_eq!(ends, 10, "{topic}");
    let (status, _, _) = http(g, "GET", "/v1/topics/nope", &[], b"");
    assert_eq!(status, 404);

    let (status, _, body) = http(g, "GET", "/v1/groups", &[], b"");
    assert_eq!(status, 200);
    let groups = json_of(&body);
    assert_eq!(groups["groups"][0]["group"], "billing", "{groups}");
    let (status, _, body) = http(g, "GET", "/v1/groups/billing", &[], b"");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let group = json_of(&body);
    assert_eq!(group["lag"], 6, "{group}");
    let committed: u64 = group["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["committed_offset"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(committed, 4, "{group}");
}

/// The fan-out load tool, small: every subscriber over WebSocket and over SSE gets every
/// change, and the summary has the documented JSON shape.
#[test]
fn the_gateway_bench_delivers_every_change_to_every_subscriber() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(&dir.path().join("data"));
    let gateway = start_gateway(&broker.addr, &[]);
    for transport in ["ws", "sse"] {
        let output = Command::new(common::binary("syncline-gateway-bench"))
            .args(["--gateway", &gateway.addr, "--broker", &broker.addr])
            .args([
                "--table",
                &format!("bench-{transport}"),
                "--transport",
                transport,
            ])
            .args([
                "--subscribers",
                "20",
                "--rate",
                "200",
                "--duration",
                "1",
                "--json",
            ])
            .args(["--gateway-pid", &gateway.child.id().to_string()])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{transport}: {stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let summary = json_of(stdout.as_bytes());
        assert_eq!(summary["transport"], transport);
        assert_eq!(summary["caught_up"], 20, "{summary}");
        assert_eq!(summary["changes"], 200, "{summary}");
        assert_eq!(summary["delivered"], 20 * 200, "{summary}");
        assert_eq!(summary["missing"], 0, "{summary}");
        assert!(summary["latency_ms"]["p99"].as_f64().is_some(), "{summary}");
        assert!(
            summary["gateway_rss_bytes"]["idle"].as_u64().unwrap() > 0,
            "{summary}"
        );
    }
    // 40 subscriptions with one caller: its read permission was checked with the brokers
    // (a point read) once per table and then taken from the gateway's recent checks, not once
    // per subscriber (the writer's puts are Produce calls, not Get).
    let gets = broker_gets(&broker);
    assert!(gets <= 4, "{gets} Get calls for 40 subscriptions");
}

/// How many Get calls the broker served (`syncline_requests_total{rpc="Get"}`).
fn broker_gets(broker: &BrokerProcess) -> u64 {
    let addr = broker.metrics_addr.as_deref().expect("metrics address");
    common::scrape(addr)
        .lines()
        .filter(|line| line.starts_with("syncline_requests_total{") && line.contains("rpc=\"Get\""))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// A close the client starts is answered with a close frame (a clean close, not 1006).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_close_from_the_client_is_answered() {
    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::tungstenite::Message;
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(&dir.path().join("data"));
    let gateway = start_gateway(&broker.addr, &[]);
    let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://{}/v1/ws", gateway.addr))
        .await
        .unwrap();
    socket
        .send(Message::Text(json!({"op": "ping"}).to_string().into()))
        .await
        .unwrap();
    socket.send(Message::Close(None)).await.unwrap();
    let mut answered = false;
    while let Ok(Some(message)) = tokio::time::timeout(Duration::from_secs(30), socket.next()).await
    {
        match message {
            Ok(Message::Close(_)) => answered = true,
            Ok(_) => continue,
            Err(_) => break,
        }
    }
    assert!(answered, "the gateway did not answer the close");
}

/// SSE: a token that compaction passed (a delete after it was removed) cannot be resumed
/// exactly: the gateway sends `reset` and the table as it is now (without the deleted key),
/// then `caught-up` and the live changes.
#[test]
fn a_token_older_than_the_compaction_horizon_gets_reset_and_the_current_table() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(&dir.path().join("data"));
    let cli = |args: &[&str]| cli_ok(&broker.addr, args);
    cli(&[
        "topic",
        "create",
        "menu",
        "--cleanup",
        "compact",
        "--segment-bytes",
        "65536",
        "--delete-retention-ms",
        "0",
    ]);
    let gateway = start_gateway(&broker.addr, &[]);
    let g = gateway.addr.as_str();
    let put = |key: &str, value: &str| {
        let (status, _, body) = http(
            g,
            "PUT",
            &format!("/v1/tables/menu/{key}"),
            &[],
            value.as_bytes(),
        );
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    };
    // soup is not first: the first batch of a segment keeps a record, and a kept older
    // record of a key keeps its delete.
    for key in ["bread", "salad", "soup"] {
        put(key, "on");
    }
    let mut events = Events::open(g, "/v1/watch/menu", None);
    let token = loop {
        let (event, id, _) = events.next();
        if event == "caught-up" {
            break id.expect("caught-up carries a token");
        }
    };
    drop(events);

    // After the token: soup deleted, then enough writes to seal segments; compaction removes
    // the delete (no delete retention), so the log no longer holds every change after it.
    let (status, _, _) = http(g, "DELETE", "/v1/tables/menu/soup", &[], b"");
    assert_eq!(status, 200);
    let filler = "x".repeat(4096);
    for round in 0..40 {
        put(&format!("dish-{}", round % 4), &filler);
    }
    put("bread", "off");
    // The first pass makes the delete removable; the next removes it.
    for _ in 0..2 {
        let stdout = cli(&["topic", "compact", "menu"]);
        assert!(stdout.contains("compacted menu"), "{stdout}");
    }
    let (status, _, body) = http(g, "GET", "/v1/topics/menu", &[], b"");
    assert_eq!(status, 200);
    let topic = json_of(&body);
    let horizon = topic["partitions"][0]["compaction_horizon"]
        .as_u64()
        .unwrap();
    let at: u64 = token.parse().unwrap();
    assert!(
        horizon > at,
        "compaction did not pass the token {at}: {topic}"
    );

    let mut events = Events::open(g, "/v1/watch/menu", Some(&token));
    let (event, _, _) = events.next();
    assert_eq!(event, "reset", "a token compaction passed is not resumable");
    let mut table = std::collections::BTreeMap::new();
    loop {
        let (event, key, value, _) = events.next_change();
        if event == "caught-up" {
            break;
        }
        assert_eq!(event, "put");
        table.insert(key, value.unwrap());
    }
    assert!(
        !table.contains_key("soup"),
        "the deleted key came back: {table:?}"
    );
    assert_eq!(table.get("bread").map(String::as_str), Some("off"));
    assert_eq!(table.get("salad").map(String::as_str), Some("on"));
    assert_eq!(table.len(), 2 + 4, "{table:?}");
    put("soup", "back");
    let (event, key, value, _) = events.next_change();
    assert_eq!(
        (event.as_str(), key.as_str(), value.as_deref()),
        ("put", "soup", Some("back"))
    );
}

/// Subscribers that join while changes flow (the hub renders changes once for all of them)
/// get, after their snapshot, every later change once, in order: no change older than their
/// `caught-up` token, versions strictly increasing, and snapshot + changes equal to the table.
#[test]
fn subscribers_joining_during_writes_get_every_change_once() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(&dir.path().join("data"));
    let output = common::cluster::run_cli_at(
        &broker.addr,
        &["topic", "create", "flow", "--cleanup", "compact"],
    );
    assert!(output.status.success());
    let gateway = start_gateway(&broker.addr, &[]);
    let g = gateway.addr.clone();
    let put = |g: &str, key: &str, value: &str| {
        let (status, _, body) = http(
            g,
            "PUT",
            &format!("/v1/tables/flow/{key}"),
            &[],
            value.as_bytes(),
        );
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    };
    put(&g, "k0", "start");
    let writer = {
        let g = g.clone();
        std::thread::spawn(move || {
            for i in 0..300 {
                put(&g, &format!("k{}", i % 10), &i.to_string());
            }
            put(&g, "done", "yes");
        })
    };
    let subscribers: Vec<_> = (0..6)
        .map(|n| {
            let g = g.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(40 * n));
                let mut events = Events::open(&g, "/v1/watch/flow", None);
                let mut table = std::collections::BTreeMap::new();
                let caught_up: u64 = loop {
                    let (event, key, value, id) = events.next_change();
                    if event == "caught-up" {
                        break id.unwrap().parse().unwrap();
                    }
                    table.insert(key, value.unwrap());
                };
                let mut last = None;
                loop {
                    let (event, id, data) = events.next();
                    let data = json_of(data.as_bytes());
                    let version = data["version"].as_u64().unwrap();
                    assert!(
                        version >= caught_up,
                        "{version} is in the snapshot ({caught_up})"
                    );
                    assert!(
                        last < Some(version),
                        "{version} after {last:?}: out of order or repeated"
                    );
                    assert_eq!(id.unwrap().parse::<u64>().unwrap(), version + 1);
                    last = Some(version);
                    let key = data["key"].as_str().unwrap().to_string();
                    assert_eq!(event, "put");
                    table.insert(key.clone(), data["value"].as_str().unwrap().to_string());
                    if key == "done" {
                        return table;
                    }
                }
            })
        })
        .collect();
    writer.join().unwrap();
    let mut expected = std::collections::BTreeMap::new();
    for key in (0..10).map(|i| format!("k{i}")).chain(["done".to_string()]) {
        let (status, _, body) = http(&g, "GET", &format!("/v1/tables/flow/{key}"), &[], b"");
        assert_eq!(status, 200);
        expected.insert(key, json_of(&body)["value"].as_str().unwrap().to_string());
    }
    for subscriber in subscribers {
        assert_eq!(subscriber.join().unwrap(), expected);
    }
}

/// A WebSocket from a page of another site (its `Origin`) is refused unless `--allow-origin`
/// names it; the gateway's own origin and clients without an `Origin` are served; a `sub`
/// name over its limit closes the socket with 1003.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_from_other_sites_are_refused_unless_allowed() {
    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
    use tokio_tungstenite::tungstenite::Message;
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(&dir.path().join("data"));
    let gateway = start_gateway(&broker.addr, &["--allow-origin", "https://app.example.com"]);
    let connect = |origin: Option<String>| {
        let url = format!("ws://{}/v1/ws", gateway.addr);
        async move {
            let mut request = url.into_client_request().unwrap();
            if let Some(origin) = origin {
                request
                    .headers_mut()
                    .insert("Origin", origin.parse().unwrap());
            }
            tokio_tungstenite::connect_async(request).await
        }
    };
    match connect(Some("https://evil.example".into())).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403);
            let body = String::from_utf8_lossy(response.body().as_deref().unwrap_or_default());
            assert!(
                body.contains("--allow-origin https://evil.example"),
                "{body}"
            );
        }
        other => panic!("a page of another site was let in: {other:?}"),
    }
    for origin in [
        None,
        Some("https://app.example.com".to_string()),
        Some(format!("http://{}", gateway.addr)),
    ] {
        let (mut socket, _) = connect(origin.clone())
            .await
            .unwrap_or_else(|e| panic!("{origin:?} refused: {e}"));
        socket
            .send(Message::Text(json!({"op": "ping"}).to_string().into()))
            .await
            .unwrap();
        // Skips WebSocket pings: the answer is the text frame.
        assert_eq!(next_frame(&mut socket).await, json!({"op": "pong"}));
    }
    let (mut socket, _) = connect(None).await.unwrap();
    let frame = json!({"op": "subscribe", "sub": "s".repeat(200), "table": "t"});
    socket
        .send(Message::Text(frame.to_string().into()))
        .await
        .unwrap();
    loop {
        let message = tokio::time::timeout(Duration::from_secs(30), socket.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Message::Close(Some(close)) = message {
            assert_eq!(u16::from(close.code), 1003);
            assert!(close.reason.contains("`sub` is longer"), "{}", close.reason);
            break;
        }
    }
}

/// A subscription whose stream fails (here: its topic is deleted under it) gets an `error`
/// frame naming why, and only that subscription ends: the socket goes on (not a 4008 "too
/// slow", which would make the client reconnect in a loop).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_subscription_gets_an_error_frame_and_the_socket_goes_on() {
    use futures_util::SinkExt as _;
    use tokio_tungstenite::tungstenite::Message;
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(&dir.path().join("data"));
    let cli = |args: &[&str]| cli_ok(&broker.addr, args);
    cli(&["topic", "create", "doomed", "--partitions", "1"]);
    let gateway = start_gateway(&broker.addr, &[]);
    let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://{}/v1/ws", gateway.addr))
        .await
        .unwrap();
    let send = |frame: Value| Message::Text(frame.to_string().into());
    socket
        .send(send(
            json!({"op": "subscribe", "sub": "d", "table": "doomed"}),
        ))
        .await
        .unwrap();
    let read = next_frame;
    let first = read(&mut socket).await;
    assert_eq!(first["event"], "caught-up", "{first}");
    cli(&["topic", "delete", "doomed"]);
    let error = read(&mut socket).await;
    assert_eq!(
        (error["sub"].as_str(), error["event"].as_str()),
        (Some("d"), Some("error")),
        "{error}"
    );
    assert!(error["status"].as_u64().unwrap() >= 400, "{error}");
    assert!(!error["error"].as_str().unwrap().is_empty(), "{error}");
    socket.send(send(json!({"op": "ping"}))).await.unwrap();
    assert_eq!(read(&mut socket).await, json!({"op": "pong"}));
}

/// `--max-connections`: with the bound reached, a new connection is not served until one of
/// the open ones closes; then it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_max_connections_wait_for_one_to_close() {
    use futures_util::SinkExt as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio_tungstenite::tungstenite::Message;
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(&dir.path().join("data"));
    let gateway = start_gateway(&broker.addr, &["--max-connections", "2"]);
    let url = format!("ws://{}/v1/ws", gateway.addr);
    let (mut first, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let (mut second, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    for socket in [&mut first, &mut second] {
        socket
            .send(Message::Text(json!({"op": "ping"}).to_string().into()))
            .await
            .unwrap();
        assert_eq!(next_frame(socket).await, json!({"op": "pong"}));
    }
    // A third: the kernel completes its handshake, the gateway does not take it.
    let mut third = tokio::net::TcpStream::connect(&gateway.addr).await.unwrap();
    let request = format!(
        "GET /v1/topics HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        gateway.addr
    );
    third.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let early =
        tokio::time::timeout(Duration::from_millis(500), third.read_to_end(&mut answer)).await;
    assert!(early.is_err(), "served past the bound: {answer:?}");
    // One closes: the third is served.
    first.close(None).await.unwrap();
    drop(first);
    tokio::time::timeout(Duration::from_secs(30), third.read_to_end(&mut answer))
        .await
        .expect("served within 30 s of a connection closing")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}
