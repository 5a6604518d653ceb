//! The deployment files under `deploy/` against the real binaries (issue 16): the compose
//! file's three brokers start as a cluster with exactly the flags it gives them (host names
//! and ports mapped to loopback), Prometheus scrapes the ports they serve metrics on, the
//! Dockerfile exposes and sets the same ports, and the systemd unit's configuration file is
//! one the broker accepts. Docker itself is not run here (see README, "Deploying").

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::cluster::Cluster;

const GRPC_PORT: &str = "7450";
const METRICS_PORT: &str = "7451";

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(file)
}

fn read(file: &str) -> String {
    std::fs::read_to_string(deploy(file)).unwrap_or_else(|e| panic!("deploy/{file}: {e}"))
}

/// Each broker service's `command:` (a one-line flow list, which is JSON), by service name.
fn compose_commands() -> BTreeMap<String, Vec<String>> {
    let text = read("docker-compose.yml");
    let mut service = None;
    let mut commands = BTreeMap::new();
    for line in text.lines() {
        if let Some(name) = line
            .strip_prefix("  ")
            .filter(|rest| !rest.starts_with(' ') && !rest.starts_with('#'))
            .and_then(|rest| rest.strip_suffix(':'))
        {
            service = Some(name.to_string());
        }
        if let (Some(name), Some(list)) = (&service, line.trim().strip_prefix("command: ")) {
            if name.starts_with("node") {
                let args: Vec<String> = serde_json::from_str(list)
                    .unwrap_or_else(|e| panic!("{name}'s command is not a flow list: {e}"));
                commands.insert(name.clone(), args);
            }
        }
    }
    commands
}

fn flag<'a>(args: &'a [String], name: &str) -> &'a str {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .unwrap_or_else(|| panic!("{name} missing from {args:?}"))
}

/// Every `--flag` that `syncline-broker --help` lists.
fn broker_flags() -> Vec<String> {
    let output = Command::new(common::binary("syncline-broker"))
        .arg("--help")
        .output()
        .expect("run syncline-broker --help");
    assert!(output.status.success(), "{output:?}");
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with("--"))
        .map(|w| w.trim_end_matches(',').to_string())
        .collect()
}

#[test]
fn given_the_compose_file_should_name_flags_and_ports_the_broker_and_prometheus_agree_on() {
    let commands = compose_commands();
    assert_eq!(
        commands.keys().collect::<Vec<_>>(),
        ["node1", "node2", "node3"],
        "three broker services"
    );
    let known = broker_flags();
    let voters = flag(&commands["node1"], "--cluster").to_string();
    for (name, args) in &commands {
        for arg in args.iter().filter(|a| a.starts_with("--")) {
            assert!(known.contains(arg), "{name}: {arg} is not a broker flag");
        }
        let id = flag(args, "--node-id");
        assert_eq!(format!("node{id}"), *name);
        assert_eq!(flag(args, "--cluster"), voters, "{name}: one voter list");
        assert_eq!(flag(args, "--advertise"), format!("{name}:{GRPC_PORT}"));
        assert_eq!(flag(args, "--listen"), format!("0.0.0.0:{GRPC_PORT}"));
        assert_eq!(
            flag(args, "--metrics-listen"),
            format!("0.0.0.0:{METRICS_PORT}")
        );
        assert!(
            voters.contains(&format!("{id}={name}:{GRPC_PORT}")),
            "{voters} names {name}"
        );
    }

    let prometheus = read("prometheus/prometheus.yml");
    let targets: Vec<&str> = prometheus
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- targets: "))
        .collect();
    assert_eq!(targets.len(), 1, "{prometheus}");
    let targets: Vec<String> = serde_json::from_str(targets[0]).expect("a flow list");
    let expected: Vec<String> = commands
        .keys()
        .map(|name| format!("{name}:{METRICS_PORT}"))
        .collect();
    assert_eq!(targets, expected);

    let dockerfile = read("Dockerfile");
    assert!(
        dockerfile.contains(&format!("EXPOSE {GRPC_PORT} {METRICS_PORT}")),
        "{dockerfile}"
    );
    for setting in [
        format!("SYNCLINE_LISTEN=0.0.0.0:{GRPC_PORT}"),
        format!("SYNCLINE_METRICS_LISTEN=0.0.0.0:{METRICS_PORT}"),
        "SYNCLINE_DATA_DIR=/var/lib/syncline".to_string(),
    ] {
        assert!(dockerfile.contains(&setting), "Dockerfile sets {setting}");
    }
    let compose = read("docker-compose.yml");
    for mount in [
        "./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml",
        "./grafana/syncline.json:/var/lib/grafana/dashboards/syncline.json",
        "./grafana/provisioning:/etc/grafana/provisioning",
    ] {
        assert!(compose.contains(mount), "compose mounts {mount}");
        let source = mount.split(':').next().unwrap().trim_start_matches("./");
        assert!(deploy(source).exists(), "deploy/{source} exists");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_the_compose_flags_three_brokers_should_form_a_cluster_replicating_by_default() {
    let commands = compose_commands();
    let mut cluster = Cluster::unstarted(3);
    // Service names and container ports mapped to each node's loopback port.
    let addresses: BTreeMap<String, String> = (1..=3)
        .map(|id| {
            (
                format!("node{id}:{GRPC_PORT}"),
                cluster.node(id).advertised(),
            )
        })
        .collect();
    let translate = |id: u64| -> Vec<String> {
        commands[&format!("node{id}")]
            .iter()
            .map(|arg| {
                let mut arg = arg.clone();
                for (service, address) in &addresses {
                    arg = arg.replace(service, address);
                }
                match arg.as_str() {
                    a if a == format!("0.0.0.0:{GRPC_PORT}") => {
                        addresses[&format!("node{id}:{GRPC_PORT}")].clone()
                    }
                    a if a == format!("0.0.0.0:{METRICS_PORT}") => "127.0.0.1:0".to_string(),
                    _ => arg,
                }
            })
            .collect()
    };
    cluster.start_all_with(translate);

    let description = cluster.describe(2).await.expect("describe");
    assert_eq!(description.nodes.len(), 3);
    assert!(description.nodes.iter().all(|n| n.alive), "{description:?}");
    let topic = cluster.create_topic(1, "deployed", 2).await;
    assert_eq!(topic.partitions.len(), 2);
    let description = cluster.describe(3).await.expect("describe");
    for placement in description
        .partitions
        .iter()
        .filter(|p| p.topic == "deployed")
    {
        assert_eq!(
            placement.replicas.len(),
            3,
            "--default-replication-factor 3: {placement:?}"
        );
    }
    // The harness gives each node a bounded time to exit.
    let stopped = tokio::task::block_in_place(|| cluster.stop_all());
    assert!(stopped, "every node exits cleanly on SIGTERM");
}

#[test]
fn given_the_systemd_unit_its_configuration_file_should_start_a_broker() {
    let unit = read("systemd/syncline.service");
    assert!(
        unit.contains(
            "ExecStart=/usr/local/bin/syncline-broker --config /etc/syncline/syncline.toml"
        ),
        "{unit}"
    );
    let config = read("systemd/syncline.toml");
    let data_dir = config
        .lines()
        .find_map(|l| l.strip_prefix("data_dir = "))
        .expect("data_dir");
    assert_eq!(data_dir, "\"/var/lib/syncline\"");
    assert!(unit.contains("StateDirectory=syncline"), "{unit}");
    assert!(unit.contains("ReadWritePaths=/var/lib/syncline"), "{unit}");

    // The file as shipped (every key known: the broker refuses unknown ones), with this
    // machine's data directory, loopback addresses and a cluster of this node alone given as
    // flags, which win over the file.
    let mut cluster = Cluster::unstarted(1);
    let path = cluster.root().join("syncline.toml");
    std::fs::write(&path, &config).expect("write the config");
    let path = path.display().to_string();
    cluster
        .try_start_with(1, &["--config", &path])
        .unwrap_or_else(|log| panic!("the broker refused deploy/systemd/syncline.toml:\n{log}"));
    assert!(cluster.stop(1), "exits cleanly on SIGTERM");
}
