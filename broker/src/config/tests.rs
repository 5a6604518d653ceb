//! Unit tests of `config`.
use super::*;

/// Loads the TOML file at `path` (and defaults for everything else).
fn load_file(path: impl Into<PathBuf>) -> Result<Config, ConfigLoadError> {
    Config::load(Flags {
        config: Some(path.into()),
        ..Flags::default()
    })
}

#[test]
fn given_no_settings_when_loaded_should_use_safe_defaults() {
    let config = Config::load(Flags::default()).unwrap();
    assert_eq!(config.data_dir, PathBuf::from("./syncline-data"));
    assert_eq!(config.listen.to_string(), "127.0.0.1:7450");
    assert_eq!(config.topic_defaults.fsync, FsyncPolicy::Always);
}

#[test]
fn given_file_and_flags_when_loaded_should_prefer_flags() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broker.toml");
    std::fs::write(
        &path,
        "listen = \"127.0.0.1:9000\"\nsegment_bytes = 1048576\nretention_ms = 60000\n",
    )
    .unwrap();
    let flags = Flags {
        config: Some(path),
        listen: Some("127.0.0.1:9001".parse().unwrap()),
        ..Flags::default()
    };
    let config = Config::load(flags).unwrap();
    assert_eq!(config.listen.port(), 9001, "flag beats file");
    assert_eq!(
        config.topic_defaults.segment_bytes, 1_048_576,
        "file beats default"
    );
    assert_eq!(config.topic_defaults.retention_ms, Some(60_000));
}

#[test]
fn given_environment_when_parsed_should_sit_between_file_and_flags() {
    // clap merges env below flags; checked on the parser directly (no process-wide env).
    let flags = Flags::try_parse_from(["syncline-broker", "--segment-bytes", "2097152"]).unwrap();
    assert_eq!(flags.segment_bytes, Some(2_097_152));
}

#[test]
fn given_preallocate_bytes_max_in_file_or_flag_should_set_the_broker_wide_cap() {
    let default = Config::load(Flags::default()).unwrap();
    assert_eq!(default.preallocate_bytes_max, None, "sized at start");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broker.toml");
    std::fs::write(&path, "preallocate_bytes_max = 1048576\n").unwrap();
    let from_file = Flags {
        config: Some(path.clone()),
        ..Flags::default()
    };
    let config = Config::load(from_file).unwrap();
    assert_eq!(config.preallocate_bytes_max, Some(1 << 20));
    let flags = Flags::try_parse_from([
        "syncline-broker",
        "--config",
        path.to_str().unwrap(),
        "--preallocate-bytes-max",
        "0",
    ])
    .unwrap();
    assert_eq!(Config::load(flags).unwrap().preallocate_bytes_max, Some(0));
}

#[test]
fn given_sizes_with_units_should_parse_in_flags_and_file() {
    let flags = Flags::try_parse_from([
        "syncline-broker",
        "--segment-bytes",
        "64MiB",
        "--max-batch-bytes",
        "2MiB",
        "--retention-bytes",
        "-1",
        "--cleaner-io-bytes-per-sec",
        "100MB",
    ])
    .unwrap();
    assert_eq!(flags.segment_bytes, Some(64 << 20));
    assert_eq!(flags.max_batch_bytes, Some(2 << 20));
    assert_eq!(flags.retention_bytes, Some(-1));
    assert_eq!(flags.cleaner_io_bytes_per_sec, Some(100_000_000));
    let error = Flags::try_parse_from(["syncline-broker", "--segment-bytes", "64M"])
        .unwrap_err()
        .to_string();
    assert!(error.contains("MiB") && error.contains("MB"), "{error}");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broker.toml");
    std::fs::write(
        &path,
        "segment_bytes = \"256 MiB\"\nretention_bytes = \"10GiB\"\nmax_fetch_bytes = 33554432\n",
    )
    .unwrap();
    let config = load_file(path.clone()).unwrap();
    assert_eq!(config.topic_defaults.segment_bytes, 256 << 20);
    assert_eq!(config.topic_defaults.retention_bytes, Some(10 << 30));
    assert_eq!(config.limits.max_fetch_bytes, 32 << 20);
    std::fs::write(&path, "max_batch_bytes = \"8 furlongs\"\n").unwrap();
    let error = load_file(path).unwrap_err().to_string();
    assert!(
        error.contains("max_batch_bytes") && error.contains("furlongs"),
        "{error}"
    );
}

/// The example configuration at the repository root.
const EXAMPLE: &str = include_str!("../../../syncline.toml");

/// The keys of the TOML file, as serde sees them (captured from `deserialize_struct`).
fn file_keys() -> &'static [&'static str] {
    use serde::de::{Error as _, Visitor};
    struct Capture(&'static [&'static str]);
    impl<'de> serde::Deserializer<'de> for &mut Capture {
        type Error = serde::de::value::Error;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(Self::Error::custom("not a struct"))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            self.0 = fields;
            Err(Self::Error::custom("captured"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
            identifier ignored_any
        }
    }
    let mut capture = Capture(&[]);
    let _ = FileConfig::deserialize(&mut capture);
    assert!(!capture.0.is_empty());
    capture.0
}

/// The example's settings: each `#key = value` line, as (key, the line uncommented).
fn example_settings() -> Vec<(&'static str, &'static str)> {
    EXAMPLE
        .lines()
        .filter_map(|line| line.strip_prefix('#'))
        .filter_map(|line| {
            let (key, _) = line.split_once(" = ")?;
            key.bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'_')
                .then_some((key, line))
        })
        .collect()
}

#[test]
fn given_example_config_should_list_every_setting_at_its_default() {
    let settings = example_settings();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("syncline.toml");
    // Commented out, the file is valid as it is.
    std::fs::write(&path, EXAMPLE).unwrap();
    let defaults = Config::default();
    let loaded = load_file(path.clone()).unwrap();
    assert_eq!(loaded, defaults);
    // Each setting, uncommented alone, is valid and its value is the default.
    for (key, line) in &settings {
        let mut expected = defaults.clone();
        let text = match *key {
            // Only meaningful with the interval policy: checked with it.
            "fsync_interval_ms" => {
                expected.topic_defaults.fsync = FsyncPolicy::IntervalMs(100);
                format!("fsync_policy = \"interval\"\n{line}\n")
            }
            "metrics_listen" => {
                expected.metrics_listen_explicit = true;
                format!("{line}\n")
            }
            // Sized from the file system at start; the example gives the cap.
            "preallocate_bytes_max" => {
                expected.preallocate_bytes_max = Some(256 << 20);
                format!("{line}\n")
            }
            // Its default is the listen address; the example names it.
            "advertise" => {
                expected.node.advertise = Some("127.0.0.1:7450".into());
                format!("{line}\n")
            }
            // Its default is this node alone; the example names it.
            "cluster" => {
                expected.node.cluster =
                    crate::cluster::node::parse_cluster("1=127.0.0.1:7450").unwrap();
                format!("{line}\n")
            }
            // Unset by default; the example names a node to join through.
            "join" => {
                expected.node.join = Some("127.0.0.1:7450".into());
                format!("{line}\n")
            }
            // Its default follows the node count; the example names the single node's.
            "default_replication_factor" => {
                expected.node.default_replication_factor = Some(1);
                format!("{line}\n")
            }
            // Unset by default; the certificate and its key go together (the client CA with
            // both): checked as a pair, or all three.
            "tls_cert" | "tls_key" => {
                expected.tls = Some(crate::config::TlsFiles {
                    cert: "/etc/syncline/tls/broker.pem".into(),
                    key: "/etc/syncline/tls/broker-key.pem".into(),
                    client_ca: None,
                });
                "tls_cert = \"/etc/syncline/tls/broker.pem\"\n\
                 tls_key = \"/etc/syncline/tls/broker-key.pem\"\n"
                    .to_string()
            }
            "tls_client_ca" => {
                expected.tls = Some(crate::config::TlsFiles {
                    cert: "/etc/syncline/tls/broker.pem".into(),
                    key: "/etc/syncline/tls/broker-key.pem".into(),
                    client_ca: Some("/etc/syncline/tls/clients-ca.pem".into()),
                });
                format!(
                    "tls_cert = \"/etc/syncline/tls/broker.pem\"\n\
                     tls_key = \"/etc/syncline/tls/broker-key.pem\"\n{line}\n"
                )
            }
            // Unset by default; the example names a file or a value.
            "auth_tokens_file" => {
                expected.auth.tokens_file = Some("/etc/syncline/tokens.toml".into());
                format!("{line}\n")
            }
            "auth_jwt_secret_file" => {
                expected.auth.jwt_secret_file = Some("/etc/syncline/jwt-secret".into());
                format!("{line}\n")
            }
            "auth_jwt_public_keys" => {
                expected.auth.jwt_public_keys = Some("/etc/syncline/jwt-keys.pem".into());
                format!("{line}\n")
            }
            "auth_jwt_audience" => {
                expected.auth.jwt_audience = Some("syncline".into());
                format!("{line}\n")
            }
            "superusers" => {
                expected.auth.superusers = vec!["admin".into()];
                format!("{line}\n")
            }
            "quotas_file" => {
                expected.quotas.file = Some("/etc/syncline/quotas.toml".into());
                format!("{line}\n")
            }
            // Sized from the open-file limit at start; the example gives the cap.
            "max_connections" => {
                expected.connections.max_connections = Some(10_000);
                format!("{line}\n")
            }
            _ => format!("{line}\n"),
        };
        std::fs::write(&path, text).unwrap();
        let loaded =
            load_file(path.clone()).unwrap_or_else(|e| panic!("syncline.toml: `{line}`: {e}"));
        assert_eq!(
            loaded, expected,
            "syncline.toml: `{line}` is not the default"
        );
    }
    // Every key the file format knows is there, once, and every flag has its key.
    let keys: Vec<&str> = settings.iter().map(|(key, _)| *key).collect();
    for key in file_keys() {
        assert_eq!(
            keys.iter().filter(|k| *k == key).count(),
            1,
            "syncline.toml must list `{key}` once"
        );
    }
    use clap::CommandFactory;
    for arg in Flags::command().get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        let key = long.replace('-', "_");
        if !["config", "help", "version"].contains(&key.as_str()) {
            assert!(
                file_keys().contains(&key.as_str()),
                "--{long} has no TOML key `{key}`"
            );
        }
    }
}

#[test]
fn given_bad_values_when_loaded_should_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broker.toml");
    std::fs::write(&path, "segment_bytes = 10\n").unwrap();
    let error = load_file(path.clone()).unwrap_err();
    assert!(error.to_string().contains("segment_bytes_max"), "{error}");
    std::fs::write(&path, "no_such_key = 1\n").unwrap();
    let error = load_file(path).unwrap_err();
    assert!(error.to_string().contains("no_such_key"), "{error}");
    let error = Config::load(Flags {
        fsync_policy: Some("sometimes".into()),
        ..Flags::default()
    })
    .unwrap_err();
    assert!(error.to_string().contains("fsync_policy"), "{error}");
}

/// Issue 13 item 13: settings that contradict each other are refused at start, naming the
/// key, instead of one of them being silently ignored.
#[test]
fn given_contradicting_settings_when_loaded_should_refuse_naming_the_key() {
    let refused = [
        (
            Flags {
                fsync_policy: Some("always".into()),
                fsync_interval_ms: Some(50),
                ..Flags::default()
            },
            "fsync_interval_ms",
        ),
        (
            Flags {
                fsync_interval_ms: Some(50),
                ..Flags::default()
            },
            "fsync_interval_ms",
        ),
        (
            Flags {
                group_heartbeat_interval_ms: Some(20_000),
                group_session_timeout_ms: Some(10_000),
                ..Flags::default()
            },
            "group_heartbeat_interval_ms",
        ),
    ];
    for (flags, key) in refused {
        let error = Config::load(flags).unwrap_err();
        assert!(error.to_string().contains(key), "{key}: {error}");
    }
    let interval = Config::load(Flags {
        fsync_policy: Some("interval".into()),
        fsync_interval_ms: Some(50),
        ..Flags::default()
    })
    .unwrap();
    assert_eq!(interval.topic_defaults.fsync, FsyncPolicy::IntervalMs(50));
    // A flag (or env var) that switches a file's interval policy to `always` wins: the
    // file's interval is then moot, not a contradiction (review finding).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broker.toml");
    std::fs::write(
        &path,
        "fsync_policy = \"interval\"\nfsync_interval_ms = 50\n",
    )
    .unwrap();
    let switched = Config::load(Flags {
        config: Some(path.clone()),
        fsync_policy: Some("always".into()),
        ..Flags::default()
    })
    .unwrap();
    assert_eq!(switched.topic_defaults.fsync, FsyncPolicy::Always);
    // The same contradiction within one layer is still refused.
    std::fs::write(&path, "fsync_policy = \"always\"\nfsync_interval_ms = 50\n").unwrap();
    let error = load_file(path).unwrap_err();
    assert!(error.to_string().contains("fsync_interval_ms"), "{error}");
}

#[test]
fn given_stalled_stream_timeout_should_load_from_file_and_flags_and_check_bounds() {
    let defaults = Config::load(Flags::default()).unwrap();
    assert_eq!(defaults.connections.stalled_stream_timeout_ms, 30_000);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broker.toml");
    std::fs::write(&path, "stalled_stream_timeout_ms = 500\n").unwrap();
    let from_file = load_file(path.clone()).unwrap();
    assert_eq!(from_file.connections.stalled_stream_timeout_ms, 500);
    let flags = Flags::try_parse_from([
        "syncline-broker",
        "--config",
        path.to_str().unwrap(),
        "--stalled-stream-timeout-ms",
        "1000",
    ])
    .unwrap();
    let config = Config::load(flags).unwrap();
    assert_eq!(config.connections.stalled_stream_timeout_ms, 1000);
    for value in [99, 3_600_001] {
        let error = Config::load(Flags {
            stalled_stream_timeout_ms: Some(value),
            ..Flags::default()
        })
        .unwrap_err();
        assert!(
            error.to_string().contains("stalled_stream_timeout_ms"),
            "{error}"
        );
    }
}

#[test]
fn given_budget_and_connection_settings_should_load_from_file_and_flags_and_check_bounds() {
    let defaults = Config::load(Flags::default()).unwrap();
    assert_eq!(defaults.limits.response_bytes_max, 256 * 1024 * 1024);
    assert_eq!(defaults.connections.max_connections, None);
    assert_eq!(defaults.connections.handshake_timeout_ms, 10_000);
    assert_eq!(defaults.connections.keepalive_interval_ms, 30_000);
    assert_eq!(defaults.connections.keepalive_timeout_ms, 20_000);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broker.toml");
    std::fs::write(
        &path,
        "response_bytes_max = 33554432\nmax_connections = 4\nhandshake_timeout_ms = 500\n",
    )
    .unwrap();
    let flags = Flags::try_parse_from([
        "syncline-broker",
        "--config",
        path.to_str().unwrap(),
        "--keepalive-interval-ms",
        "1000",
        "--keepalive-timeout-ms",
        "700",
        "--max-connections",
        "5",
    ])
    .unwrap();
    let config = Config::load(flags).unwrap();
    assert_eq!(config.limits.response_bytes_max, 32 * 1024 * 1024);
    assert_eq!(
        config.connections.max_connections,
        Some(5),
        "flag beats file"
    );
    assert_eq!(config.connections.handshake_timeout_ms, 500);
    assert_eq!(config.connections.keepalive_interval_ms, 1000);
    assert_eq!(config.connections.keepalive_timeout_ms, 700);
    for (flags, key) in [
        (
            Flags {
                response_bytes_max: Some(1000),
                ..Flags::default()
            },
            "response_bytes_max",
        ),
        (
            Flags {
                max_connections: Some(0),
                ..Flags::default()
            },
            "max_connections",
        ),
        (
            Flags {
                handshake_timeout_ms: Some(0),
                ..Flags::default()
            },
            "handshake_timeout_ms",
        ),
    ] {
        let error = Config::load(flags).unwrap_err();
        assert!(error.to_string().contains(key), "{error}");
    }
}

#[test]
fn given_raft_snapshot_settings_in_file_or_flags_should_reach_the_groups_within_bounds() {
    let default = Config::load(Flags::default()).unwrap();
    assert_eq!(
        default.replication,
        crate::replication::group::GroupSettings::default()
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broker.toml");
    std::fs::write(&path, "raft_snapshot_every = 64\nraft_snapshot_keep = 0\n").unwrap();
    let config = load_file(path.clone()).unwrap();
    assert_eq!(config.replication.snapshot_every, 64);
    assert_eq!(config.replication.snapshot_keep, 0);
    let flags = Flags::try_parse_from([
        "syncline-broker",
        "--config",
        path.to_str().unwrap(),
        "--raft-snapshot-every",
        "128",
    ])
    .unwrap();
    let config = Config::load(flags).unwrap();
    assert_eq!(config.replication.snapshot_every, 128, "a flag wins");
    assert_eq!(config.replication.snapshot_keep, 0);
    for (text, key) in [
        ("raft_snapshot_every = 7\n", "raft_snapshot_every"),
        ("raft_snapshot_keep = 10000001\n", "raft_snapshot_keep"),
    ] {
        std::fs::write(&path, text).unwrap();
        let error = load_file(path.clone()).unwrap_err().to_string();
        assert!(error.contains(key), "{error}");
    }
}
