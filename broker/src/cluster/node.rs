//! This node's cluster settings: its id, the address peers and clients reach it at, and the
//! initial voters of the controller.
//!
//! `--cluster` is `ID=HOST:PORT,ID=HOST:PORT,...`: the same list on every initial node, each
//! address being that node's advertised address. `--join HOST:PORT` instead adds a new node
//! to a running cluster through any of its nodes. Without either (and without a data
//! directory that already belongs to a cluster) the node is a cluster of one.

use std::fmt;
use std::net::SocketAddr;

use crate::log::ConfigError;

/// Node ids are at least 1; this is the largest accepted (fits every id field comfortably and
/// is far beyond any real cluster).
pub const NODE_ID_MAX: u64 = 1 << 31;
/// Initial voters at most: a controller of more than 9 voters only slows commits down.
pub const VOTERS_MAX: usize = 9;

/// One initial voter of the controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Voter {
    /// Its node id.
    pub id: u64,
    /// Its advertised `HOST:PORT`.
    pub address: String,
}

/// The node settings after loading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// This node's id (>= 1).
    pub id: u64,
    /// `HOST:PORT` peers and clients use to reach this node (None: the listen address).
    pub advertise: Option<String>,
    /// The initial voters as given by `--cluster` (empty: this node alone, or a node that
    /// joins).
    pub cluster: Vec<Voter>,
    /// `--join`: a node of the cluster this node joins (or joined).
    pub join: Option<String>,
    /// The data directory belongs to a cluster this node joined (set at start from its
    /// identity, when started without `--join`).
    pub rejoin: bool,
    /// Replicas per partition when a create does not say (None: min(3, voters)).
    pub default_replication_factor: Option<u32>,
}

impl NodeConfig {
    /// Replicas per partition when a create does not say: the setting, else min(3, voters).
    pub fn replication_factor_default(&self) -> u32 {
        self.default_replication_factor
            .unwrap_or_else(|| self.cluster.len().clamp(1, 3) as u32)
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            id: 1,
            advertise: None,
            cluster: Vec::new(),
            join: None,
            rejoin: false,
            default_replication_factor: None,
        }
    }
}

impl fmt::Display for Voter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.id, self.address)
    }
}

/// The voters as `ID=HOST:PORT,...` (the form `--cluster` takes), sorted by id.
pub fn format_voters(voters: &[Voter]) -> String {
    let mut sorted = voters.to_vec();
    sorted.sort_by_key(|v| v.id);
    sorted
        .iter()
        .map(Voter::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Checks a `HOST:PORT` address: a host, a colon, a port in [1, 65535].
fn check_address(address: &str) -> Result<(), String> {
    let (host, port) = address
        .rsplit_once(':')
        .ok_or_else(|| format!("`{address}` is not HOST:PORT"))?;
    if host.is_empty() {
        return Err(format!("`{address}` has no host"));
    }
    match port.parse::<u16>() {
        Ok(port) if port > 0 => Ok(()),
        _ => Err(format!("`{address}` has no valid port (1-65535)")),
    }
}

/// Parses `ID=HOST:PORT,ID=HOST:PORT,...`: ids >= 1 and unique, addresses unique.
pub fn parse_cluster(text: &str) -> Result<Vec<Voter>, String> {
    let mut voters: Vec<Voter> = Vec::new();
    for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (id, address) = entry
            .split_once('=')
            .ok_or_else(|| format!("`{entry}` is not ID=HOST:PORT"))?;
        let id: u64 = id
            .trim()
            .parse()
            .map_err(|_| format!("`{entry}`: the node id must be an integer >= 1"))?;
        if !(1..=NODE_ID_MAX).contains(&id) {
            return Err(format!("`{entry}`: node ids are within [1, {NODE_ID_MAX}]"));
        }
        let address = address.trim().to_string();
        check_address(&address)?;
        if let Some(other) = voters.iter().find(|v| v.id == id) {
            return Err(format!(
                "node id {id} appears twice (`{other}` and `{entry}`)"
            ));
        }
        if let Some(other) = voters.iter().find(|v| v.address == address) {
            return Err(format!(
                "address {address} appears twice (`{other}` and `{entry}`)"
            ));
        }
        voters.push(Voter { id, address });
    }
    if voters.is_empty() {
        return Err("the list is empty: give ID=HOST:PORT entries separated by commas".into());
    }
    if voters.len() > VOTERS_MAX {
        return Err(format!(
            "{} initial voters: at most {VOTERS_MAX}",
            voters.len()
        ));
    }
    Ok(voters)
}

impl NodeConfig {
    /// Whether `--cluster` was given: the node then runs the controller with those voters
    /// (even a list of just this node). Without it the node is a cluster of one, as a
    /// single-node broker always was: no controller, every partition here.
    pub fn is_clustered(&self) -> bool {
        !self.cluster.is_empty() || self.join.is_some() || self.rejoin
    }

    /// Whether this node joins (or joined) a running cluster rather than forming one.
    pub fn is_joining(&self) -> bool {
        self.cluster.is_empty() && (self.join.is_some() || self.rejoin)
    }

    /// The address this node advertises once it listens on `bound`.
    pub fn advertised(&self, bound: SocketAddr) -> String {
        self.advertise.clone().unwrap_or_else(|| bound.to_string())
    }

    /// Checks the settings against each other and the listen address (naming the key).
    pub fn validate(&self, listen: SocketAddr) -> Result<(), ConfigError> {
        let err = |key: &'static str, message: String| Err(ConfigError { key, message });
        if !(1..=NODE_ID_MAX).contains(&self.id) {
            return err(
                "node_id",
                format!("{} is outside [1, {NODE_ID_MAX}]", self.id),
            );
        }
        if let Some(advertise) = &self.advertise {
            if let Err(message) = check_address(advertise) {
                return err("advertise", message);
            }
        } else if listen.ip().is_unspecified() {
            return err(
                "advertise",
                format!(
                    "the broker listens on {listen}, which peers and clients cannot dial: set \
                     --advertise HOST:PORT to the address they should use"
                ),
            );
        }
        if let Some(join) = &self.join {
            if !self.cluster.is_empty() {
                return err(
                    "join",
                    "give --cluster to form a cluster or --join to join a running one, not both"
                        .into(),
                );
            }
            if let Err(message) = check_address(join) {
                return err("join", message);
            }
        }
        // A joining node learns the cluster's size from it; the controller checks the factor.
        let nodes = if self.is_joining() {
            VOTERS_MAX.max(NODE_ID_MAX as usize) as u32
        } else {
            self.cluster.len().max(1) as u32
        };
        if let Some(factor) = self.default_replication_factor {
            if !(1..=nodes).contains(&factor) {
                return err(
                    "default_replication_factor",
                    format!(
                        "{factor} is outside [1, {nodes}]: a partition cannot have more replicas than the cluster has nodes"
                    ),
                );
            }
        }
        if self.cluster.is_empty() {
            return Ok(());
        }
        let Some(me) = self.cluster.iter().find(|v| v.id == self.id) else {
            return err(
                "cluster",
                format!(
                    "this node (node_id = {}) is not in the list `{}`: every initial node \
                     gets the same list, which names each of them",
                    self.id,
                    format_voters(&self.cluster)
                ),
            );
        };
        let own = self
            .advertise
            .clone()
            .or_else(|| (listen.port() != 0).then(|| listen.to_string()));
        if let Some(own) = own {
            if own != me.address {
                return err(
                    "cluster",
                    format!(
                        "the list gives node {} the address {}, but this node advertises {own}: \
                         each address must be that node's --advertise (or listen) address",
                        self.id, me.address
                    ),
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listen(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn given_cluster_lists_should_parse_or_name_the_problem() {
        let voters = parse_cluster("2=b:7450, 1=a:7450").unwrap();
        assert_eq!(format_voters(&voters), "1=a:7450,2=b:7450");
        for (text, problem) in [
            ("", "empty"),
            ("1", "not ID=HOST:PORT"),
            ("x=a:1", "integer"),
            ("0=a:1", "within [1"),
            ("1=a", "not HOST:PORT"),
            ("1=:7450", "no host"),
            ("1=a:0", "valid port"),
            ("1=a:1,1=b:1", "node id 1 appears twice"),
            ("1=a:1,2=a:1", "address a:1 appears twice"),
            (
                "1=a:1,2=a:2,3=a:3,4=a:4,5=a:5,6=a:6,7=a:7,8=a:8,9=a:9,10=a:10",
                "at most 9",
            ),
        ] {
            let error = parse_cluster(text).unwrap_err();
            assert!(error.contains(problem), "{text}: {error}");
        }
    }

    #[test]
    fn given_node_settings_should_validate_their_relations() {
        let ok = NodeConfig::default();
        assert!(ok.validate(listen("127.0.0.1:7450")).is_ok());
        assert!(ok.validate(listen("127.0.0.1:0")).is_ok());
        let refused = |node: NodeConfig, at: &str, key: &str, text: &str| {
            let error = node.validate(listen(at)).unwrap_err();
            assert_eq!(error.key, key, "{error}");
            assert!(error.message.contains(text), "{error}");
        };
        refused(
            NodeConfig {
                id: 0,
                ..NodeConfig::default()
            },
            "127.0.0.1:7450",
            "node_id",
            "outside",
        );
        refused(
            NodeConfig::default(),
            "0.0.0.0:7450",
            "advertise",
            "--advertise",
        );
        let advertised = NodeConfig {
            advertise: Some("broker-1.example:7450".into()),
            ..NodeConfig::default()
        };
        assert!(advertised.validate(listen("0.0.0.0:7450")).is_ok());
        refused(
            NodeConfig {
                id: 3,
                cluster: parse_cluster("1=127.0.0.1:7450").unwrap(),
                ..NodeConfig::default()
            },
            "127.0.0.1:7450",
            "cluster",
            "not in the list",
        );
        refused(
            NodeConfig {
                cluster: parse_cluster("1=127.0.0.1:7460").unwrap(),
                ..NodeConfig::default()
            },
            "127.0.0.1:7450",
            "cluster",
            "advertises 127.0.0.1:7450",
        );
        let alone = NodeConfig {
            cluster: parse_cluster("1=127.0.0.1:7450").unwrap(),
            ..NodeConfig::default()
        };
        assert!(alone.validate(listen("127.0.0.1:7450")).is_ok());
        let three = NodeConfig {
            cluster: parse_cluster("1=127.0.0.1:7450,2=127.0.0.1:7451,3=127.0.0.1:7452").unwrap(),
            ..NodeConfig::default()
        };
        assert!(three.validate(listen("127.0.0.1:7450")).is_ok());
        assert!(three.is_clustered() && !NodeConfig::default().is_clustered());
    }
}
