//! Security (issue 17) through the real binaries: TLS on the client port.
//!
//! - A broker started with `--tls-cert`/`--tls-key` serves the CLI given `--tls-ca`: a topic
//!   created, records produced and consumed back.
//! - A plain-text CLI against the TLS port fails (exit 1) with a message that says why; a CLI
//!   trusting another CA is refused too.
//! - Mutual TLS (`--tls-client-ca`): a client without a certificate, or with one from another
//!   CA, is refused; one with a certificate from the CA is served.
//! - Tokens and JWTs authenticate (others are UNAUTHENTICATED), and admin calls are audited
//!   with their principal.
//! - SIGHUP reloads the certificates: after the files are replaced by ones from a new CA and
//!   the broker gets SIGHUP, a client trusting the new CA is served and one trusting only the
//!   old CA is refused, without a restart.
//!
//! Certificates are generated here (rcgen), never checked in.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::pki::{Files, Pki};
use common::BrokerProcess;

fn cli(broker: &BrokerProcess, tls: &[&Path], args: &[&str]) -> Output {
    let mut flags: Vec<String> = Vec::new();
    for (flag, path) in ["--tls-ca", "--tls-cert", "--tls-key"].iter().zip(tls) {
        flags.push(flag.to_string());
        flags.push(path.display().to_string());
    }
    let mut all: Vec<&str> = flags.iter().map(String::as_str).collect();
    all.extend_from_slice(args);
    common::cluster::run_cli_at(&broker.addr, &all)
}

/// `syncline --broker BROKER FLAGS ARGS` with `lines` on its stdin, run to its end.
fn produce_lines(broker: &str, flags: &[&str], args: &[&str], lines: &[u8]) -> Output {
    let mut produce = std::process::Command::new(common::binary("syncline"))
        .args(["--broker", broker])
        .args(flags)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        let mut stdin = produce.stdin.take().unwrap();
        stdin.write_all(lines).unwrap();
    }
    produce.wait_with_output().unwrap()
}

fn ok(output: &Output) -> String {
    assert!(
        output.status.success(),
        "status {:?}\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn refused(output: &Output) -> String {
    assert_eq!(
        output.status.code(),
        Some(1),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Scrapes `/metrics` at `address` with python3's urllib (`https` with `ca` when given, the
/// bearer `token` when given): (HTTP status, body).
fn scrape(address: &str, ca: Option<&Path>, token: Option<&str>) -> (u16, String) {
    let script = "import ssl, sys, urllib.request, urllib.error\n\
        addr, ca, token = sys.argv[1], sys.argv[2], sys.argv[3]\n\
        ctx = ssl.create_default_context(cafile=ca) if ca else None\n\
        req = urllib.request.Request(('https://' if ca else 'http://') + addr + '/metrics')\n\
        if token: req.add_header('Authorization', 'Bearer ' + token)\n\
        try:\n    r = urllib.request.urlopen(req, timeout=10, context=ctx); print(r.status); print(r.read().decode())\n\
        except urllib.error.HTTPError as e:\n    print(e.code); print(e.read().decode())\n\
        except Exception as e:\n    print(0); print(e)\n";
    let ca = ca.map(|p| p.display().to_string()).unwrap_or_default();
    let output = std::process::Command::new("python3")
        .args(["-c", script, address, &ca, token.unwrap_or("")])
        .output()
        .expect("python3");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (code, body) = text.split_once('\n').unwrap_or((&text, ""));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn start(data: &Path, files: &Files, mutual: bool) -> BrokerProcess {
    start_and(data, files, mutual, &[])
}

/// [`start`] with `extra` flags.
fn start_and(data: &Path, files: &Files, mutual: bool, extra: &[&str]) -> BrokerProcess {
    let mut args = vec![
        "--tls-cert".to_string(),
        files.server_cert.display().to_string(),
        "--tls-key".to_string(),
        files.server_key.display().to_string(),
        "--handshake-timeout-ms".to_string(),
        "2000".to_string(),
    ];
    if mutual {
        args.push("--tls-client-ca".into());
        args.push(files.ca.display().to_string());
    }
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    args.extend_from_slice(extra);
    BrokerProcess::start_with(data, &args)
}

#[test]
fn given_a_tls_broker_the_cli_should_round_trip_with_its_ca_and_fail_clearly_without() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("test-ca");
    let files = pki.write(dir.path(), "a");
    let broker = start(&dir.path().join("data"), &files, false);
    let ca: &[&Path] = &[&files.ca];

    ok(&cli(
        &broker,
        ca,
        &["topic", "create", "secure", "--partitions", "1"],
    ));
    let ca_flag = ["--tls-ca", files.ca.to_str().unwrap()];
    ok(&produce_lines(
        &broker.addr,
        &ca_flag,
        &["produce", "secure"],
        b"one\ntwo\n",
    ));
    let consumed = ok(&cli(
        &broker,
        ca,
        &[
            "consume",
            "secure",
            "--from-beginning",
            "--max-records",
            "2",
        ],
    ));
    assert_eq!(
        consumed.lines().collect::<Vec<_>>(),
        ["one", "two"],
        "{consumed}"
    );

    // /metrics is served over TLS too.
    let metrics = broker.metrics_addr.clone().expect("metrics address");
    let (code, body) = scrape(&metrics, Some(&files.ca), None);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("syncline_"), "{body}");
    let (code, _) = scrape(&metrics, None, None);
    assert_ne!(code, 200, "plain-text metrics from a TLS broker");

    // Plain text against the TLS port: refused, saying so.
    let stderr = refused(&cli(&broker, &[], &["topic", "list"]));
    assert!(stderr.contains("error:"), "{stderr}");
    assert!(stderr.to_lowercase().contains("tls"), "{stderr}");
    // Another CA: the broker's certificate is not trusted.
    let other = Pki::new("other-ca").write(dir.path(), "other");
    let stderr = refused(&cli(&broker, &[&other.ca], &["topic", "list"]));
    assert!(stderr.contains("error:"), "{stderr}");
}

#[test]
fn given_mutual_tls_only_clients_with_a_certificate_of_the_ca_should_be_served() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("test-ca");
    let files = pki.write(dir.path(), "a");
    let broker = start_and(
        &dir.path().join("data"),
        &files,
        true,
        &["--superusers", "operator"],
    );

    let with_cert: &[&Path] = &[&files.ca, &files.client_cert, &files.client_key];
    // The certificate's common name is the principal: it needs an ACL to create a topic.
    let stderr = refused(&cli(&broker, with_cert, &["topic", "create", "mutual"]));
    assert!(
        stderr.contains("principal `service-a` may not create topic `mutual`"),
        "{stderr}"
    );
    let (operator_cert, operator_key) = pki.issue("operator", &[], true);
    let operator_cert_path = dir.path().join("operator.pem");
    let operator_key_path = dir.path().join("operator-key.pem");
    std::fs::write(&operator_cert_path, operator_cert).unwrap();
    std::fs::write(&operator_key_path, operator_key).unwrap();
    let operator: &[&Path] = &[&files.ca, &operator_cert_path, &operator_key_path];
    ok(&cli(
        &broker,
        operator,
        &[
            "acl",
            "add",
            "--principal",
            "service-a",
            "--allow",
            "create",
            "--topic",
            "mutual",
        ],
    ));
    ok(&cli(&broker, with_cert, &["topic", "create", "mutual"]));
    // No client certificate: refused.
    refused(&cli(&broker, &[&files.ca], &["topic", "list"]));
    // A client certificate from another CA: refused.
    let other = Pki::new("other-ca").write(dir.path(), "other");
    refused(&cli(
        &broker,
        &[&files.ca, &other.client_cert, &other.client_key],
        &["topic", "list"],
    ));
    let listed = ok(&cli(&broker, with_cert, &["topic", "list"]));
    assert!(listed.contains("mutual"), "{listed}");
}

#[test]
fn given_new_certificates_sighup_should_reload_them_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let first = Pki::new("first-ca").write(dir.path(), "first");
    let broker = start(&dir.path().join("data"), &first, false);
    ok(&cli(
        &broker,
        &[&first.ca],
        &["topic", "create", "reloaded"],
    ));

    // The files in place are replaced by a new CA's, then SIGHUP.
    let second = Pki::new("second-ca").write(dir.path(), "second");
    std::fs::copy(&second.server_cert, &first.server_cert).unwrap();
    std::fs::copy(&second.server_key, &first.server_key).unwrap();
    // SAFETY: kill(2) on the broker's pid.
    let sent = unsafe { libc::kill(broker.child.id() as i32, libc::SIGHUP) };
    assert_eq!(sent, 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let output = cli(&broker, &[&second.ca], &["topic", "list"]);
        if output.status.success() {
            assert!(String::from_utf8_lossy(&output.stdout).contains("reloaded"));
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the new certificate is not served: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    refused(&cli(&broker, &[&first.ca], &["topic", "list"]));
    // A bad file and another SIGHUP: the broker keeps serving what it had.
    std::fs::write(&first.server_cert, "not a certificate").unwrap();
    // SAFETY: as above.
    assert_eq!(
        unsafe { libc::kill(broker.child.id() as i32, libc::SIGHUP) },
        0
    );
    std::thread::sleep(Duration::from_millis(300));
    ok(&cli(&broker, &[&second.ca], &["topic", "list"]));
}

/// The SHA-256 of `token` in hex (what a tokens file holds).
fn sha256_hex(token: &str) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn jwt(
    claims: serde_json::Value,
    key: &jsonwebtoken::EncodingKey,
    alg: jsonwebtoken::Algorithm,
) -> String {
    jsonwebtoken::encode(&jsonwebtoken::Header::new(alg), &claims, key).unwrap()
}

fn with_token(broker: &BrokerProcess, token: Option<&str>, args: &[&str]) -> Output {
    let mut all = Vec::new();
    if let Some(token) = token {
        all.extend(["--token", token]);
    }
    all.extend_from_slice(args);
    common::cluster::run_cli_at(&broker.addr, &all)
}

/// Static tokens and JWTs (HS256 with a secret file whose final newline is trimmed, EdDSA with
/// a public key): good credentials are served; none, an unknown token, an expired JWT, one for
/// another audience, one signed with another key are UNAUTHENTICATED with a message saying so.
#[test]
fn given_token_and_jwt_authentication_only_valid_credentials_should_be_served() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.toml");
    std::fs::write(
        &tokens,
        format!(
            "[[token]]\nprincipal = \"svc\"\nsha256 = \"{}\"\n",
            sha256_hex("static-s3cret")
        ),
    )
    .unwrap();
    let secret = dir.path().join("jwt-secret");
    std::fs::write(&secret, "hmac-secret-bytes\n").unwrap();
    let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let public = dir.path().join("jwt-keys.pem");
    std::fs::write(&public, ed.public_key_pem()).unwrap();
    let args = [
        "--auth-tokens-file".to_string(),
        tokens.display().to_string(),
        "--auth-jwt-secret-file".to_string(),
        secret.display().to_string(),
        "--auth-jwt-public-keys".to_string(),
        public.display().to_string(),
        "--auth-jwt-audience".to_string(),
        "syncline".to_string(),
        "--superusers".to_string(),
        "svc".to_string(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let broker = BrokerProcess::start_with(&dir.path().join("data"), &args);

    let hs = jsonwebtoken::EncodingKey::from_secret(b"hmac-secret-bytes");
    let ed_key = jsonwebtoken::EncodingKey::from_ed_pem(ed.serialize_pem().as_bytes()).unwrap();
    let exp = now_secs() + 600;
    let good_hs = jwt(
        serde_json::json!({"sub": "alice", "exp": exp, "aud": "syncline"}),
        &hs,
        jsonwebtoken::Algorithm::HS256,
    );
    let good_ed = jwt(
        serde_json::json!({"sub": "bob", "exp": exp, "aud": "syncline"}),
        &ed_key,
        jsonwebtoken::Algorithm::EdDSA,
    );
    ok(&with_token(
        &broker,
        Some("static-s3cret"),
        &["topic", "create", "authed"],
    ));
    // Any authenticated principal may see topics prefixed `auth`.
    ok(&with_token(
        &broker,
        Some("static-s3cret"),
        &[
            "acl",
            "add",
            "--principal",
            "*",
            "--allow",
            "describe",
            "--topic-prefix",
            "auth",
        ],
    ));
    for token in [&good_hs, &good_ed] {
        let listed = ok(&with_token(&broker, Some(token), &["topic", "list"]));
        assert!(listed.contains("authed"), "{listed}");
    }

    let expired = jwt(
        serde_json::json!({"sub": "alice", "exp": now_secs() - 3600, "aud": "syncline"}),
        &hs,
        jsonwebtoken::Algorithm::HS256,
    );
    let elsewhere = jwt(
        serde_json::json!({"sub": "alice", "exp": exp, "aud": "other"}),
        &hs,
        jsonwebtoken::Algorithm::HS256,
    );
    let forged = jwt(
        serde_json::json!({"sub": "alice", "exp": exp, "aud": "syncline"}),
        &jsonwebtoken::EncodingKey::from_secret(b"another-secret"),
        jsonwebtoken::Algorithm::HS256,
    );
    let other_ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let forged_ed = jwt(
        serde_json::json!({"sub": "bob", "exp": exp, "aud": "syncline"}),
        &jsonwebtoken::EncodingKey::from_ed_pem(other_ed.serialize_pem().as_bytes()).unwrap(),
        jsonwebtoken::Algorithm::EdDSA,
    );
    for (token, wanted) in [
        (None, "no credentials"),
        (Some("wrong-token"), "not valid"),
        (Some(expired.as_str()), "expired"),
        (Some(elsewhere.as_str()), "audience"),
        (Some(forged.as_str()), "signature"),
        (Some(forged_ed.as_str()), "signature"),
    ] {
        let stderr = refused(&with_token(&broker, token, &["topic", "delete", "authed"]));
        assert!(
            stderr.to_lowercase().contains("unauthenticated") || stderr.contains(wanted),
            "{token:?}: {stderr}"
        );
        assert!(stderr.contains(wanted), "{token:?}: {stderr}");
    }
    // Nothing was deleted by the refused calls.
    let listed = ok(&with_token(
        &broker,
        Some("static-s3cret"),
        &["topic", "list"],
    ));
    assert!(listed.contains("authed"), "{listed}");

    // /metrics needs a token too.
    let metrics = broker.metrics_addr.clone().expect("metrics address");
    let (code, body) = scrape(&metrics, None, None);
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("no credentials"), "{body}");
    let (code, body) = scrape(&metrics, None, Some("static-s3cret"));
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("syncline_"), "{body}");

    // The audit log names the principal, the operation, the resource and the result.
    refused(&with_token(
        &broker,
        Some(&good_hs),
        &["topic", "delete", "missing"],
    ));
    std::thread::sleep(Duration::from_millis(200));
    let audit: Vec<String> = broker
        .drain_log()
        .into_iter()
        .filter(|line| line.contains("syncline::audit"))
        .collect();
    let find = |parts: &[&str]| {
        audit
            .iter()
            .any(|line| parts.iter().all(|p| line.contains(p)))
    };
    assert!(
        find(&[
            "principal=svc",
            "create_topic",
            "topic:authed",
            "result=\"ok\""
        ]),
        "{audit:#?}"
    );
    assert!(
        find(&[
            "principal=svc",
            "add_acls",
            "* allow describe topic:auth*",
            "result=\"ok\""
        ]),
        "{audit:#?}"
    );
    assert!(
        find(&[
            "principal=alice",
            "delete_topic",
            "topic:missing",
            "result=\"refused\""
        ]),
        "{audit:#?}"
    );
}

/// A non-loopback listen address without TLS and authentication is refused at start, saying
/// what to configure; with --insecure-allow-remote the broker starts (and says nothing is
/// protected by serving plain text), and with TLS and tokens it starts without the flag.
#[test]
fn given_a_remote_listen_address_without_tls_and_authentication_the_broker_should_refuse_to_start()
{
    let dir = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(common::binary("syncline-broker"))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--listen", "0.0.0.0:0", "--metrics-listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    for wanted in [
        "0.0.0.0:0",
        "--tls-cert",
        "--auth-tokens-file",
        "--insecure-allow-remote",
    ] {
        assert!(stderr.contains(wanted), "{wanted}: {stderr}");
    }
    // A remote metrics address too.
    let output = std::process::Command::new(common::binary("syncline-broker"))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("metrics"), "{stderr}");

    // Asked for: it starts.
    let broker = BrokerProcess::start_with(
        &dir.path().join("data"),
        &[
            "--listen",
            "0.0.0.0:0",
            "--advertise",
            "127.0.0.1:7450",
            "--insecure-allow-remote",
        ],
    );
    drop(broker);
    // TLS and tokens: it starts without the flag.
    let pki = Pki::new("remote-ca");
    let files = pki.write(dir.path(), "r");
    let tokens = dir.path().join("tokens.toml");
    std::fs::write(
        &tokens,
        format!(
            "[[token]]\nprincipal = \"svc\"\nsha256 = \"{}\"\n",
            sha256_hex("t")
        ),
    )
    .unwrap();
    let args = [
        "--listen".to_string(),
        "0.0.0.0:0".to_string(),
        "--advertise".to_string(),
        "127.0.0.1:7450".to_string(),
        "--tls-cert".to_string(),
        files.server_cert.display().to_string(),
        "--tls-key".to_string(),
        files.server_key.display().to_string(),
        "--auth-tokens-file".to_string(),
        tokens.display().to_string(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    drop(BrokerProcess::start_with(&dir.path().join("data2"), &args));
}

/// A 3-node cluster with mutual TLS on every port: the nodes reach each other with their own
/// certificates (peer traffic: the controller, partition groups, joins), and a client with a
/// certificate of the CA creates a replicated topic, writes and reads it back. A node with TLS
/// but no client CA refuses to start in a cluster, saying why.
#[test]
fn given_a_cluster_with_mutual_tls_nodes_should_replicate_and_serve_clients() {
    use common::cluster::Cluster;
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("cluster-ca");
    let write = |name: &str, text: &str| -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let (node_cert, node_key) = pki.issue_for(
        "node",
        &["127.0.0.1", "localhost"],
        vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ],
    );
    let ca = write("ca.pem", &pki.ca.pem());
    let cert = write("node.pem", &node_cert);
    let key = write("node-key.pem", &node_key);
    let (client_cert, client_key) = pki.issue("operator", &[], true);
    let client_cert = write("client.pem", &client_cert);
    let client_key = write("client-key.pem", &client_key);
    let tls_args = [
        "--tls-cert".to_string(),
        cert.display().to_string(),
        "--tls-key".to_string(),
        key.display().to_string(),
        "--tls-client-ca".to_string(),
        ca.display().to_string(),
        "--superusers".to_string(),
        "operator".to_string(),
    ];
    let tls_args: Vec<&str> = tls_args.iter().map(String::as_str).collect();

    let mut cluster = Cluster::unstarted(3);
    // TLS without a client CA: refused in a cluster.
    let refused_start = cluster
        .try_start_with(1, &tls_args[..4])
        .expect_err("a cluster node with TLS but no client CA started");
    assert!(refused_start.contains("--tls-client-ca"), "{refused_start}");
    for id in 1..=3 {
        cluster.start_with(id, &tls_args);
    }
    let addresses = cluster.addresses();
    let tls_cli = |args: &[&str]| -> Output {
        let mut all = vec![
            "--tls-ca",
            ca.to_str().unwrap(),
            "--tls-cert",
            client_cert.to_str().unwrap(),
            "--tls-key",
            client_key.to_str().unwrap(),
        ];
        all.extend_from_slice(args);
        common::cluster::run_cli_at(&addresses, &all)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let output = tls_cli(&["cluster", "status", "--json"]);
        if output.status.success() {
            let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
            let alive = status["nodes"].as_array().map_or(0, |nodes| {
                nodes.iter().filter(|n| n["alive"] == true).count()
            });
            if !status["controller"].is_null() && alive == 3 {
                break;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the TLS cluster did not form: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    ok(&tls_cli(&[
        "topic",
        "create",
        "sealed",
        "--partitions",
        "1",
        "--replication-factor",
        "3",
    ]));
    let tls_flags = [
        "--tls-ca",
        ca.to_str().unwrap(),
        "--tls-cert",
        client_cert.to_str().unwrap(),
        "--tls-key",
        client_key.to_str().unwrap(),
    ];
    ok(&produce_lines(
        &addresses,
        &tls_flags,
        &["produce", "sealed", "--acks", "durable"],
        b"replicated\nover tls\n",
    ));
    let consumed = ok(&tls_cli(&[
        "consume",
        "sealed",
        "--from-beginning",
        "--max-records",
        "2",
    ]));
    assert_eq!(
        consumed.lines().collect::<Vec<_>>(),
        ["replicated", "over tls"],
        "{consumed}"
    );
    // Every replica caught up: the partition group replicates over mutual TLS.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let output = tls_cli(&["cluster", "status", "--json"]);
        let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_default();
        let caught_up = status["partitions"].as_array().is_some_and(|ps| {
            ps.iter()
                .filter(|p| p["topic"] == "sealed")
                .all(|p| p["caught_up"].as_array().map_or(0, Vec::len) == 3)
        });
        if caught_up {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{status}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // ACLs live in the controller's metadata: one granted through node 1 applies on every
    // node, and after a restart.
    let (reader_cert, reader_key) = pki.issue("reader", &[], true);
    let reader_cert = write("reader.pem", &reader_cert);
    let reader_key = write("reader-key.pem", &reader_key);
    let node_addresses: Vec<String> = addresses.split(',').map(str::to_string).collect();
    let as_reader = |address: &str, args: &[&str]| -> Output {
        let mut all = vec![
            "--tls-ca",
            ca.to_str().unwrap(),
            "--tls-cert",
            reader_cert.to_str().unwrap(),
            "--tls-key",
            reader_key.to_str().unwrap(),
        ];
        all.extend_from_slice(args);
        common::cluster::run_cli_at(address, &all)
    };
    let describe_everywhere = |expect_allowed: bool| {
        for address in &node_addresses {
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            loop {
                let output = as_reader(address, &["topic", "describe", "sealed"]);
                let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
                if output.status.success() == expect_allowed
                    && (expect_allowed || stderr.contains("`reader` may not describe"))
                {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "node {address}: expected allowed = {expect_allowed}: {stderr}"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    };
    describe_everywhere(false);
    ok(&common::cluster::run_cli_at(
        &node_addresses[0],
        &[
            "--tls-ca",
            ca.to_str().unwrap(),
            "--tls-cert",
            client_cert.to_str().unwrap(),
            "--tls-key",
            client_key.to_str().unwrap(),
            "acl",
            "add",
            "--principal",
            "reader",
            "--allow",
            "read",
            "--topic",
            "sealed",
        ],
    ));
    describe_everywhere(true);
    let consumed = ok(&as_reader(
        &node_addresses[2],
        &[
            "consume",
            "sealed",
            "--from-beginning",
            "--max-records",
            "2",
        ],
    ));
    assert_eq!(consumed.lines().count(), 2, "{consumed}");
    // Reading is not writing.
    let stderr = refused(&produce_lines(
        &node_addresses[1],
        &[
            "--tls-ca",
            ca.to_str().unwrap(),
            "--tls-cert",
            reader_cert.to_str().unwrap(),
            "--tls-key",
            reader_key.to_str().unwrap(),
        ],
        &["produce", "sealed"],
        b"not allowed\n",
    ));
    assert!(stderr.contains("may not write topic `sealed`"), "{stderr}");
    // The Peer service (Raft, replication) is for the nodes: a client certificate of the same
    // CA that is not a superuser is refused.
    let peer_refusal = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(
                std::fs::read(&ca).unwrap(),
            ))
            .identity(tonic::transport::Identity::from_pem(
                std::fs::read(&reader_cert).unwrap(),
                std::fs::read(&reader_key).unwrap(),
            ))
            .domain_name("localhost");
        let channel =
            tonic::transport::Endpoint::from_shared(format!("https://{}", node_addresses[0]))
                .unwrap()
                .tls_config(tls)
                .unwrap()
                .connect()
                .await
                .unwrap();
        syncline_proto::v1::peer_client::PeerClient::new(channel)
            .heartbeat(syncline_proto::v1::PeerHeartbeatRequest {
                cluster_id: "any".into(),
                node_id: 7,
                address: "127.0.0.1:1".into(),
                dir_id: "x".into(),
            })
            .await
            .expect_err("a client called the Peer service")
    });
    assert_eq!(
        peer_refusal.code(),
        tonic::Code::PermissionDenied,
        "{peer_refusal}"
    );
    assert!(cluster.stop(2), "node 2 stops cleanly");
    cluster.start_with(2, &tls_args);
    describe_everywhere(true);
}

/// The value of `name{labels...}` in a Prometheus text (0 when absent).
fn metric_value(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .find(|l| labels.iter().all(|label| l.contains(label)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// A per-principal produce quota holds a producer to its rate (within 10%, measured by the
/// broker's own byte counter once the run is going, so the start's burst allowance is out of
/// the window), by delaying its acks rather than failing them; the delays show in the metric
/// under its principal; another principal without a quota is not held to it.
#[test]
fn given_a_produce_quota_a_producer_should_be_held_to_its_rate() {
    const QUOTA: u64 = 4 * 1024 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.toml");
    std::fs::write(
        &tokens,
        format!(
            "[[token]]\nprincipal = \"bulk\"\nsha256 = \"{}\"\n\n\
             [[token]]\nprincipal = \"other\"\nsha256 = \"{}\"\n",
            sha256_hex("bulk-token"),
            sha256_hex("other-token")
        ),
    )
    .unwrap();
    let quotas = dir.path().join("quotas.toml");
    std::fs::write(
        &quotas,
        format!("[[quota]]\nprincipal = \"bulk\"\nproduce_bytes_per_sec = {QUOTA}\n"),
    )
    .unwrap();
    let broker = BrokerProcess::start_with(
        &dir.path().join("data"),
        &[
            "--auth-tokens-file",
            tokens.to_str().unwrap(),
            "--superusers",
            "bulk,other",
            "--quotas-file",
            quotas.to_str().unwrap(),
        ],
    );
    let metrics = broker.metrics_addr.clone().expect("metrics address");
    let produced = || {
        let (code, body) = scrape(&metrics, None, Some("other-token"));
        assert_eq!(code, 200, "{body}");
        (
            metric_value(&body, "syncline_produce_bytes_total", &[]),
            body,
        )
    };
    let bench = |token: &str, topic: &str, secs: &str| {
        std::process::Command::new(common::binary("syncline"))
            .args(["--broker", &broker.addr, "--token", token, "bench"])
            .args([
                "--topic",
                topic,
                "--consumers",
                "0",
                "--record-size",
                "1KiB",
            ])
            .args(["--batch-bytes", "64KiB", "--duration", secs])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let run = bench("bulk-token", "held", "9");
    // Once records flow, measure 5 s of it.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while produced().0 == 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the bench did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(1));
    let (first, _) = produced();
    let started = std::time::Instant::now();
    std::thread::sleep(Duration::from_secs(5));
    let (last, body) = produced();
    let rate = (last - first) / started.elapsed().as_secs_f64();
    let output = run.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let ratio = rate / QUOTA as f64;
    assert!(
        (0.9..=1.1).contains(&ratio),
        "produced {rate:.0} B/s against a quota of {QUOTA} B/s ({ratio:.3}x)"
    );
    let delayed = metric_value(
        &body,
        "syncline_quota_throttle_seconds_count",
        &["principal=\"bulk\"", "direction=\"produce\""],
    );
    assert!(delayed > 0.0, "no throttled response recorded:\n{body}");

    // Another principal is not held to `bulk`'s quota.
    let (before, _) = produced();
    let started = std::time::Instant::now();
    let output = bench("other-token", "free", "3")
        .wait_with_output()
        .unwrap();
    assert!(output.status.success());
    let (after, body) = produced();
    let free_rate = (after - before) / started.elapsed().as_secs_f64();
    assert!(
        free_rate > 1.5 * QUOTA as f64,
        "an unlimited principal produced only {free_rate:.0} B/s"
    );
    assert_eq!(
        metric_value(
            &body,
            "syncline_quota_throttle_seconds_count",
            &["principal=\"other\""]
        ),
        0.0
    );
}
