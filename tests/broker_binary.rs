//! Pins the `syncline-broker` binary's command-line contract: `--help`/`--version`, config
//! precedence (file < env < flags), clear one-line errors and exit codes for bad settings, the
//! data-dir lock, the standard health and reflection services, and the clean-shutdown marker
//! written on SIGTERM.

mod common;

use std::process::Command;

use common::{binary, run_broker, BrokerProcess};
use tokio_stream::StreamExt;

#[test]
fn given_help_and_version_flags_should_explain_and_exit_zero() {
    let help = Command::new(binary("syncline-broker"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(help.status.success());
    let text = String::from_utf8(help.stdout).unwrap();
    for option in [
        "--data-dir",
        "--listen",
        "--config",
        "--segment-bytes",
        "--fsync-policy",
        "SYNCLINE_DATA_DIR",
    ] {
        assert!(text.contains(option), "--help lacks {option}:\n{text}");
    }
    assert!(
        text.contains("./syncline-data") && text.contains("127.0.0.1:7450"),
        "{text}"
    );
    let version = Command::new(binary("syncline-broker"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(version.status.success());
    assert_eq!(
        String::from_utf8(version.stdout).unwrap().trim(),
        format!("syncline-broker {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn given_bad_settings_should_fail_with_one_line_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("broker.toml");
    std::fs::write(&config, "segment_bytes = 10\n").unwrap();
    let output = Command::new(binary("syncline-broker"))
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("error: ") && stderr.contains("segment_bytes"),
        "{stderr}"
    );

    // The environment overrides the file; a flag overrides the environment.
    std::fs::write(&config, "fsync_policy = \"sometimes\"\n").unwrap();
    let env_wins = Command::new(binary("syncline-broker"))
        .arg("--config")
        .arg(&config)
        .env("SYNCLINE_FSYNC_POLICY", "never-ever")
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    let stderr = String::from_utf8(env_wins.stderr).unwrap();
    assert!(
        stderr.contains("never-ever"),
        "env must beat the file: {stderr}"
    );
    let flag_wins = Command::new(binary("syncline-broker"))
        .arg("--config")
        .arg(&config)
        .env("SYNCLINE_FSYNC_POLICY", "never-ever")
        .args(["--fsync-policy", "nope-flag"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    let stderr = String::from_utf8(flag_wins.stderr).unwrap();
    assert!(
        stderr.contains("nope-flag"),
        "the flag must beat env: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_sizes_with_units_in_flags_env_and_file_should_start_with_those_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("broker.toml");
    std::fs::write(
        &config,
        "max_fetch_bytes = \"32MiB\"\nretention_bytes = \"1GB\"\n",
    )
    .unwrap();
    let config_arg = config.to_str().unwrap();
    let broker = BrokerProcess::start_with(
        &dir.path().join("data"),
        &[
            "--segment-bytes",
            "64MiB",
            "--max-batch-bytes",
            "1 MiB",
            "--config",
            config_arg,
        ],
    );
    let mut client = broker.client().await;
    client
        .create_topic(syncline_proto::v1::CreateTopicRequest {
            name: "sized".into(),
            config: Some(Default::default()),
        })
        .await
        .unwrap();
    let topic = client
        .describe_topic(syncline_proto::v1::DescribeTopicRequest {
            name: "sized".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .topic
        .unwrap();
    let topic_config = topic.config.unwrap();
    assert_eq!(topic_config.segment_bytes, Some(64 << 20));
    assert_eq!(topic_config.retention_bytes, Some(1_000_000_000));
    drop(broker);

    // The environment takes units too; an ambiguous one is refused naming both spellings.
    let output = Command::new(binary("syncline-broker"))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("SYNCLINE_SEGMENT_BYTES", "64M")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.contains("64M") && stderr.contains("MiB") && stderr.contains("MB"),
        "{stderr}"
    );
}

#[test]
fn given_unbindable_listen_address_should_print_the_error_once_and_exit_non_zero() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let output = run_broker(
        dir.path(),
        &["--listen", &addr, "--metrics-listen", "127.0.0.1:0"],
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    let error_lines: Vec<&str> = stderr.lines().filter(|l| l.contains(&addr)).collect();
    assert_eq!(
        error_lines.len(),
        1,
        "the startup error is printed exactly once: {stderr}"
    );
    assert!(error_lines[0].starts_with("error: "), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_running_broker_should_hold_the_data_dir_and_serve_health_and_reflection() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());

    let second = run_broker(dir.path(), &["--listen", "127.0.0.1:0"]);
    assert!(!second.status.success());
    let stderr = String::from_utf8(second.stderr).unwrap();
    assert_eq!(
        stderr.matches("in use by another broker").count(),
        1,
        "the startup error is printed exactly once: {stderr}"
    );

    let channel = tonic::transport::Channel::from_shared(broker.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    for service in ["", "syncline.v1.Broker"] {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service:?}"
        );
    }

    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        ServerReflectionRequest,
    };
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection response");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"syncline.v1.Broker".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );

    // SIGTERM: clean exit, and every partition log is marked clean.
    let mut client = broker.client().await;
    client
        .create_topic(syncline_proto::v1::CreateTopicRequest {
            name: "t".into(),
            config: Some(syncline_proto::v1::TopicConfig {
                partitions: Some(3),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    drop(client);
    assert!(broker.stop());
    for partition in 0..3 {
        assert!(dir
            .path()
            .join(format!("t/{partition}/.clean-shutdown"))
            .exists());
    }
}

/// Issue 13 item 13: `fsync = always` with an fsync interval (at start, or on CreateTopic) and
/// a heartbeat interval not below the session timeout are refused instead of half ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_contradicting_settings_should_refuse_to_start_and_to_create() {
    let dir = tempfile::tempdir().unwrap();
    for flags in [
        &["--fsync-policy", "always", "--fsync-interval-ms", "50"][..],
        &["--fsync-interval-ms", "50"][..],
        &["--group-heartbeat-interval-ms", "20000"][..],
    ] {
        let output = Command::new(binary("syncline-broker"))
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(flags)
            .output()
            .unwrap();
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert_eq!(output.status.code(), Some(2), "{flags:?}: {stderr}");
        let key = flags[flags.len() - 2]
            .trim_start_matches("--")
            .replace('-', "_");
        assert!(stderr.contains(&key), "{flags:?}: {stderr}");
    }
    let broker = common::BrokerProcess::start(&dir.path().join("data"));
    let mut client = broker.client().await;
    let error = client
        .create_topic(syncline_proto::v1::CreateTopicRequest {
            name: "t".into(),
            config: Some(syncline_proto::v1::TopicConfig {
                fsync_policy: syncline_proto::v1::FsyncPolicy::Always as i32,
                fsync_interval_ms: Some(50),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), tonic::Code::InvalidArgument, "{error:?}");
    assert!(error.message().contains("fsync_interval_ms"), "{error:?}");
}
