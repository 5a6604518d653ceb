//! The data directory's identity: which node it belongs to, and of which cluster.
//!
//! `DATA_DIR/node.toml`, written once, when a data directory first starts (also when a data
//! directory of an earlier single-node version first starts with this version):
//!
//! ```text
//! format = 1                       # this file's format
//! node_id = 1                      # the node this directory belongs to
//! cluster_id = "8-4-4-4-12 hex"    # random for a cluster of one; a hash of the voters for a
//!                                  # `--cluster` list (every initial node derives the same)
//! voters = "1=127.0.0.1:7450"      # the controller's initial voters (ID=HOST:PORT, by id)
//! joined = true                    # present when the node joined a running cluster (--join)
//! ```
//!
//! Fault model: written to a temp file, fsync'd, renamed, then the directory fsync'd, so a crash
//! leaves no file or the whole one. At most [`IDENTITY_BYTES_MAX`] are read. A start with another
//! `--node-id`, or with a `--cluster` list other than the recorded voters (or any list, for a
//! node that joined), is refused naming both: serving another node's data would mix two nodes'
//! logs. A data directory that belongs to a cluster restarts without `--cluster`/`--join` as
//! the member it recorded ([`adopt`]). A file that cannot be written
//! (a full disk) is a warning: the directory serves with an identity held in memory and the
//! next start writes it, because opening a data directory must never need free space.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::node::{format_voters, NodeConfig};
use crate::error::BrokerError;
use crate::topic::TopicId;

/// The identity file's name in the data directory.
pub const IDENTITY_FILE: &str = "node.toml";
/// The format this version writes and reads.
const IDENTITY_FORMAT: u32 = 1;
/// The largest identity file read (a handful of short fields; 9 voters at most).
const IDENTITY_BYTES_MAX: u64 = 64 * 1024;

/// What `node.toml` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The file's format.
    pub format: u32,
    /// The node this data directory belongs to.
    pub node_id: u64,
    /// The cluster it belongs to.
    pub cluster_id: String,
    /// The controller's initial voters, `ID=HOST:PORT,...` sorted by id.
    pub voters: String,
    /// This data directory's own random id: the cluster remembers which directory each node
    /// id belongs to, so a node id is never taken over by another (empty) directory. Files
    /// written before it existed get one at their next start.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub dir_id: String,
    /// The node joined a running cluster (`--join`); `voters` is the list the cluster was
    /// formed with.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub joined: bool,
}

/// A new data directory's own id.
pub fn new_dir_id() -> Result<String, BrokerError> {
    Ok(TopicId::random()?.to_string())
}

/// Before the data directory opens: a directory that belongs to a cluster (its identity and
/// the controller's storage are there) started without `--cluster` and `--join` takes the
/// membership it recorded, so a node restarts the same with or without those flags.
pub fn adopt(data_dir: &Path, node: &mut NodeConfig) -> Result<(), BrokerError> {
    if node.is_clustered() || !data_dir.join(super::controller::CONTROLLER_DIR).exists() {
        return Ok(());
    }
    let Some(identity) = read(&data_dir.join(IDENTITY_FILE), data_dir)? else {
        return Ok(());
    };
    if identity.joined {
        node.rejoin = true;
    } else {
        node.cluster = super::node::parse_cluster(&identity.voters).map_err(|message| {
            refuse(
                data_dir,
                format!("its recorded voters `{}`: {message}", identity.voters),
            )
        })?;
    }
    tracing::info!(cluster_id = %identity.cluster_id, voters = %identity.voters, joined = identity.joined, "the data directory belongs to a cluster: starting as its member");
    Ok(())
}

/// The data directory's recorded identity, if any.
pub fn recorded(data_dir: &Path) -> Result<Option<Identity>, BrokerError> {
    read(&data_dir.join(IDENTITY_FILE), data_dir)
}

/// Records the identity of a node that just joined cluster `cluster_id` (formed by the list
/// `formed_by`).
pub fn create_joined(
    data_dir: &Path,
    node_id: u64,
    cluster_id: &str,
    formed_by: &str,
    dir_id: &str,
) -> Result<Identity, BrokerError> {
    let identity = Identity {
        format: IDENTITY_FORMAT,
        node_id,
        cluster_id: cluster_id.to_string(),
        voters: formed_by.to_string(),
        dir_id: dir_id.to_string(),
        joined: true,
    };
    write(data_dir, identity, true)
}

/// A new data directory's cluster id. A cluster of one draws it at random; the initial nodes of
/// a `--cluster` list derive it from the list (a hash of the voters, in the same 8-4-4-4-12
/// form), so that every one of them records the same id before they ever talk.
fn cluster_id_for(node: &NodeConfig) -> Result<String, BrokerError> {
    if !node.is_clustered() {
        return Ok(TopicId::random()?.to_string());
    }
    let hash = xxhash_rust::xxh3::xxh3_128(format_voters(&node.cluster).as_bytes());
    Ok(TopicId::from_bits(hash).to_string())
}

fn refuse(dir: &Path, message: String) -> BrokerError {
    BrokerError::DataDirIdentity {
        dir: dir.to_path_buf(),
        message,
    }
}

fn read(path: &Path, dir: &Path) -> Result<Option<Identity>, BrokerError> {
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(BrokerError::io("opening", path, error)),
    };
    let mut text = String::new();
    use std::io::Read as _;
    file.take(IDENTITY_BYTES_MAX + 1)
        .read_to_string(&mut text)
        .map_err(|error| BrokerError::io("reading", path, error))?;
    if text.len() as u64 > IDENTITY_BYTES_MAX {
        return Err(refuse(
            dir,
            format!("{IDENTITY_FILE} is larger than {IDENTITY_BYTES_MAX} bytes"),
        ));
    }
    let identity: Identity = toml::from_str(&text)
        .map_err(|error| refuse(dir, format!("{IDENTITY_FILE} cannot be read: {error}")))?;
    if identity.format != IDENTITY_FORMAT {
        return Err(refuse(
            dir,
            format!(
                "{IDENTITY_FILE} has format {}; this broker reads {IDENTITY_FORMAT}",
                identity.format
            ),
        ));
    }
    Ok(Some(identity))
}

/// Reads the data directory's identity and checks this node's settings against it, or writes
/// one for a directory that has none. `advertised` is this node's address (it names the node
/// among the voters when `--cluster` is not given).
pub fn load_or_create(
    data_dir: &Path,
    node: &NodeConfig,
    advertised: &str,
) -> Result<Identity, BrokerError> {
    let path: PathBuf = data_dir.join(IDENTITY_FILE);
    let given_voters = (!node.cluster.is_empty()).then(|| format_voters(&node.cluster));
    if let Some(identity) = read(&path, data_dir)? {
        if identity.node_id != node.id {
            return Err(refuse(
                data_dir,
                format!(
                    "it belongs to node {} of cluster {}, but this broker was started as node \
                     {}: start it with --node-id {}, or give this node its own --data-dir",
                    identity.node_id, identity.cluster_id, node.id, identity.node_id
                ),
            ));
        }
        if let (true, Some(given)) = (identity.joined, &given_voters) {
            return Err(refuse(
                data_dir,
                format!(
                    "it belongs to node {} that joined cluster {} (formed by `{}`), but \
                     --cluster gives `{given}`: start it with --join or without either flag",
                    identity.node_id, identity.cluster_id, identity.voters
                ),
            ));
        }
        if let Some(given) = given_voters {
            if given != identity.voters {
                return Err(refuse(
                    data_dir,
                    format!(
                        "it belongs to cluster {} formed by `{}`, but --cluster gives `{given}`: \
                         give the list the cluster was formed with, or another --data-dir",
                        identity.cluster_id, identity.voters
                    ),
                ));
            }
        }
        if !identity.dir_id.is_empty() {
            return Ok(identity);
        }
        let identity = Identity {
            dir_id: TopicId::random()?.to_string(),
            ..identity
        };
        return write(data_dir, identity, node.is_clustered());
    }
    let identity = Identity {
        format: IDENTITY_FORMAT,
        node_id: node.id,
        cluster_id: cluster_id_for(node)?,
        voters: given_voters.unwrap_or_else(|| format!("{}={advertised}", node.id)),
        dir_id: TopicId::random()?.to_string(),
        joined: false,
    };
    write(data_dir, identity, node.is_clustered())
}

/// Records `identity` (a full disk is a warning: it serves from memory, see the module doc).
///
/// In a cluster the file must be written: the node registers its directory id, and an id held
/// only in memory would be refused as another directory's at the next start.
fn write(data_dir: &Path, identity: Identity, clustered: bool) -> Result<Identity, BrokerError> {
    let path: PathBuf = data_dir.join(IDENTITY_FILE);
    let text = toml::to_string(&identity)
        .map_err(|error| refuse(data_dir, format!("cannot encode {IDENTITY_FILE}: {error}")))?;
    if let Err(error) = crate::log::write_file_atomically(data_dir, IDENTITY_FILE, text.as_bytes())
    {
        if error.raw_os_error() == Some(libc::ENOSPC) && !clustered {
            tracing::warn!(path = %path.display(), %error, "cannot record the node identity (disk full); serving with it in memory, the next start writes it");
        } else {
            return Err(BrokerError::io("writing", &path, error));
        }
    } else {
        tracing::info!(node_id = identity.node_id, cluster_id = %identity.cluster_id, voters = %identity.voters, "recorded the data directory's node identity");
    }
    Ok(identity)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::node::parse_cluster;

    #[test]
    fn given_new_data_dir_should_record_the_identity_and_check_it_on_every_start() {
        let dir = tempfile::tempdir().unwrap();
        let node = NodeConfig::default();
        let first = load_or_create(dir.path(), &node, "127.0.0.1:7450").unwrap();
        assert_eq!(first.node_id, 1);
        assert_eq!(first.voters, "1=127.0.0.1:7450");
        assert_eq!(first.cluster_id.len(), 36);
        // The same node on another port (tests bind port 0) keeps its identity.
        let again = load_or_create(dir.path(), &node, "127.0.0.1:9999").unwrap();
        assert_eq!(again, first);
        // Given explicitly, the same list is accepted; another is refused.
        let listed = NodeConfig {
            cluster: parse_cluster("1=127.0.0.1:7450").unwrap(),
            ..NodeConfig::default()
        };
        assert_eq!(
            load_or_create(dir.path(), &listed, "127.0.0.1:7450").unwrap(),
            first
        );
        let other_list = NodeConfig {
            cluster: parse_cluster("1=10.0.0.1:7450").unwrap(),
            ..NodeConfig::default()
        };
        let error = load_or_create(dir.path(), &other_list, "10.0.0.1:7450")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("formed by `1=127.0.0.1:7450`") && error.contains("1=10.0.0.1:7450"),
            "{error}"
        );
        let other_node = NodeConfig {
            id: 2,
            ..NodeConfig::default()
        };
        let error = load_or_create(dir.path(), &other_node, "127.0.0.1:7450")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("belongs to node 1") && error.contains("--node-id 1"),
            "{error}"
        );
    }

    #[test]
    fn given_damaged_identity_file_should_refuse_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(IDENTITY_FILE), "node_id = \"one\"").unwrap();
        let error = load_or_create(dir.path(), &NodeConfig::default(), "127.0.0.1:7450")
            .unwrap_err()
            .to_string();
        assert!(error.contains("node.toml cannot be read"), "{error}");
        std::fs::write(
            dir.path().join(IDENTITY_FILE),
            "format = 9\nnode_id = 1\ncluster_id = \"x\"\nvoters = \"1=a:1\"\n",
        )
        .unwrap();
        let error = load_or_create(dir.path(), &NodeConfig::default(), "127.0.0.1:7450")
            .unwrap_err()
            .to_string();
        assert!(error.contains("format 9"), "{error}");
    }
}
