//! The ACLs of a cluster of one: a JSON file in the data directory, `acls.json`, replaced
//! whole on every change (written to `acls.json.tmp`, fsynced, renamed over it, the directory
//! fsynced), so a crash leaves the old set or the new one, never a mix. A node of a cluster
//! keeps its ACLs in the controller's metadata instead and ignores this file.
//!
//! Fault model: a file that does not parse stops the broker at start with its path (it is
//! never replaced silently: that would drop every grant); a write that fails before the rename
//! leaves the set unchanged in memory and on disk and returns the error; once renamed the
//! change stands (a failed directory sync is logged: a power loss may then bring back the
//! previous set).

use std::path::{Path, PathBuf};

use parking_lot::{Mutex, RwLock};

use super::{Acl, AclError, AclSet};

/// The file's name in the data directory.
pub const FILE_NAME: &str = "acls.json";

/// A set of ACLs kept in a file.
#[derive(Debug)]
pub struct AclStore {
    path: PathBuf,
    set: RwLock<AclSet>,
    /// Serializes changes (read, change, write, publish).
    writer: Mutex<()>,
}

impl AclStore {
    /// The set in `dir`'s file (empty when there is none).
    pub fn open(dir: &Path) -> Result<AclStore, AclError> {
        let path = dir.join(FILE_NAME);
        let set = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                AclError(format!(
                    "{} does not parse ({e}): fix or remove it (removing it drops every ACL)",
                    path.display()
                ))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => AclSet::default(),
            Err(e) => return Err(AclError(format!("cannot read {}: {e}", path.display()))),
        };
        Ok(AclStore {
            path,
            set: RwLock::new(set),
            writer: Mutex::new(()),
        })
    }

    /// Calls `f` with the set.
    pub fn with<R>(&self, f: impl FnOnce(&AclSet) -> R) -> R {
        f(&self.set.read())
    }

    /// Adds `acls`, durably: how many were new.
    pub fn add(&self, acls: &[Acl]) -> Result<usize, AclError> {
        self.change(|set| set.add(acls))
    }

    /// Removes `acls`, durably: how many were there.
    pub fn remove(&self, acls: &[Acl]) -> Result<usize, AclError> {
        self.change(|set| Ok(set.remove(acls)))
    }

    fn change(
        &self,
        f: impl FnOnce(&mut AclSet) -> Result<usize, AclError>,
    ) -> Result<usize, AclError> {
        let _writer = self.writer.lock();
        let mut next = self.set.read().clone();
        let changed = f(&mut next)?;
        if changed > 0 {
            self.write(&next)?;
            *self.set.write() = next;
        }
        Ok(changed)
    }

    fn write(&self, set: &AclSet) -> Result<(), AclError> {
        let failed =
            |e: std::io::Error| AclError(format!("cannot write {}: {e}", self.path.display()));
        let bytes = serde_json::to_vec_pretty(set)
            .map_err(|e| AclError(format!("encoding the ACLs: {e}")))?;
        let tmp = self.path.with_extension("json.tmp");
        {
            use std::io::Write as _;
            let mut file = std::fs::File::create(&tmp).map_err(failed)?;
            file.write_all(&bytes).map_err(failed)?;
            file.sync_all().map_err(failed)?;
        }
        std::fs::rename(&tmp, &self.path).map_err(failed)?;
        // The new set is in place (its bytes synced): from here the change stands. A failed
        // directory sync only leaves the rename less durable, which is logged, not refused.
        if let Some(dir) = self.path.parent() {
            if let Err(error) = std::fs::File::open(dir).and_then(|d| d.sync_all()) {
                tracing::warn!(%error, path = %self.path.display(), "ACLs written, but their directory did not sync: a power loss may bring back the previous set");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acl::{Effect, Operation, Pattern, ResourceKind};

    fn binding() -> Acl {
        Acl {
            principal: "alice".into(),
            effect: Effect::Allow,
            operation: Operation::Read,
            resource: Pattern {
                kind: ResourceKind::Topic,
                name: "orders".into(),
                prefix: false,
            },
        }
    }

    #[test]
    fn changes_survive_reopening() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = AclStore::open(dir.path()).expect("open");
        assert_eq!(store.add(&[binding()]).ok(), Some(1));
        let reopened = AclStore::open(dir.path()).expect("reopen");
        assert_eq!(reopened.with(|s| s.len()), 1);
        assert_eq!(reopened.remove(&[binding()]).ok(), Some(1));
        assert_eq!(
            AclStore::open(dir.path()).expect("open").with(|s| s.len()),
            0
        );
    }

    #[test]
    fn a_corrupt_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join(FILE_NAME), b"{not json").expect("write");
        let error = AclStore::open(dir.path()).expect_err("corrupt");
        assert!(error.0.contains(FILE_NAME), "{error}");
    }

    #[test]
    fn a_refused_change_changes_nothing() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = AclStore::open(dir.path()).expect("open");
        let mut bad = binding();
        bad.operation = Operation::ClusterAdmin;
        assert!(store.add(&[binding(), bad]).is_err());
        assert!(store.with(|s| s.is_empty()));
        assert!(!dir.path().join(FILE_NAME).exists());
    }
}
