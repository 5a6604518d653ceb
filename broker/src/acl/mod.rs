//! Access control lists: which principal may do what to which resource.
//!
//! An [`Acl`] binds a principal (or `*`, any authenticated principal) to one [`Operation`] on a
//! resource [`Pattern`] (a topic or group by literal name or by name prefix, or the cluster),
//! allowing or denying it. [`AclSet::decide`] answers a question: a matching deny wins over any
//! allow; with neither the answer is no (deny by default). `read`, `write`, `create`, `delete`
//! and `alter` on a topic imply `describe` of it, and `group-read` of a group implies
//! `describe` of it (as in Kafka), so a consumer needs no separate describe grant.
//!
//! Who stores the set: in a cluster, the controller's replicated metadata
//! (`cluster::metadata`, commands `AddAcls` / `RemoveAcls`), so every node applies the same
//! set in the same order; a cluster of one keeps it in a file of its data directory
//! ([`store`]). Superusers (from the configuration) and the check on each call live with the
//! service (`server::authorize`).
//!
//! Limits: [`ACLS_MAX`] bindings in a set, names of at most [`NAME_BYTES_MAX`] bytes.
//!
//! It may call nothing else of the broker.

pub mod store;

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Bindings one set holds at most: every call's check scans the principal's bindings.
pub const ACLS_MAX: usize = 10_000;
/// Bytes of a principal or resource name at most.
pub const NAME_BYTES_MAX: usize = 1024;
/// The principal that matches any authenticated principal.
pub const ANY_PRINCIPAL: &str = "*";

/// An operation a binding allows or denies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Operation {
    /// Read a topic's records and table entries.
    Read,
    /// Produce to a topic.
    Write,
    /// Create a topic.
    Create,
    /// Delete a topic.
    Delete,
    /// Change a topic (compaction).
    Alter,
    /// See a topic or group (listings, descriptions).
    Describe,
    /// Join, heartbeat, commit and fetch the offsets of a group.
    GroupRead,
    /// Operate the cluster: moves, nodes, voters, ACLs.
    ClusterAdmin,
}

impl Operation {
    /// Every operation, in the order the CLI lists them.
    pub const ALL: [Operation; 8] = [
        Operation::Read,
        Operation::Write,
        Operation::Create,
        Operation::Delete,
        Operation::Alter,
        Operation::Describe,
        Operation::GroupRead,
        Operation::ClusterAdmin,
    ];

    /// Its spelling on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Operation::Read => "read",
            Operation::Write => "write",
            Operation::Create => "create",
            Operation::Delete => "delete",
            Operation::Alter => "alter",
            Operation::Describe => "describe",
            Operation::GroupRead => "group-read",
            Operation::ClusterAdmin => "cluster-admin",
        }
    }

    /// The operation spelled `name`.
    pub fn parse(name: &str) -> Result<Operation, AclError> {
        Operation::ALL
            .into_iter()
            .find(|op| op.name() == name)
            .ok_or_else(|| {
                AclError(format!(
                    "unknown operation `{name}`: use {}",
                    Operation::ALL.map(Operation::name).join(", ")
                ))
            })
    }

    /// Whether an allow of `self` on a resource of `kind` also allows `asked`.
    fn implies(self, asked: Operation, kind: ResourceKind) -> bool {
        self == asked
            || (asked == Operation::Describe
                && match kind {
                    ResourceKind::Topic => matches!(
                        self,
                        Operation::Read
                            | Operation::Write
                            | Operation::Create
                            | Operation::Delete
                            | Operation::Alter
                    ),
                    ResourceKind::Group => self == Operation::GroupRead,
                    ResourceKind::Cluster => false,
                })
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What kind of thing a binding is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResourceKind {
    /// A topic (and the table it holds).
    Topic,
    /// A consumer group.
    Group,
    /// The cluster itself.
    Cluster,
}

impl ResourceKind {
    /// The operations that apply to resources of this kind.
    pub fn operations(self) -> &'static [Operation] {
        match self {
            ResourceKind::Topic => &[
                Operation::Read,
                Operation::Write,
                Operation::Create,
                Operation::Delete,
                Operation::Alter,
                Operation::Describe,
            ],
            ResourceKind::Group => &[Operation::GroupRead, Operation::Describe],
            ResourceKind::Cluster => &[Operation::ClusterAdmin],
        }
    }

    fn name(self) -> &'static str {
        match self {
            ResourceKind::Topic => "topic",
            ResourceKind::Group => "group",
            ResourceKind::Cluster => "cluster",
        }
    }
}

/// The resources a binding covers.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Pattern {
    /// Topic, group or the cluster.
    pub kind: ResourceKind,
    /// The name, or the prefix of the names (empty for the cluster).
    pub name: String,
    /// Whether `name` is a prefix.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub prefix: bool,
}

impl Pattern {
    fn covers(&self, resource: &Resource<'_>) -> bool {
        self.kind == resource.kind
            && match resource.kind {
                ResourceKind::Cluster => true,
                _ if self.prefix => resource.name.starts_with(&self.name),
                _ => resource.name == self.name,
            }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            ResourceKind::Cluster => f.write_str("the cluster"),
            kind if self.prefix => write!(f, "{}s prefixed `{}`", kind.name(), self.name),
            kind => write!(f, "{} `{}`", kind.name(), self.name),
        }
    }
}

/// One resource a call touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resource<'a> {
    /// Its kind.
    pub kind: ResourceKind,
    /// Its name (empty for the cluster).
    pub name: &'a str,
}

impl<'a> Resource<'a> {
    /// The topic `name`.
    pub fn topic(name: &'a str) -> Self {
        Resource {
            kind: ResourceKind::Topic,
            name,
        }
    }

    /// The group `name`.
    pub fn group(name: &'a str) -> Self {
        Resource {
            kind: ResourceKind::Group,
            name,
        }
    }

    /// The cluster.
    pub fn cluster() -> Self {
        Resource {
            kind: ResourceKind::Cluster,
            name: "",
        }
    }
}

impl fmt::Display for Resource<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            ResourceKind::Cluster => f.write_str("the cluster"),
            kind => write!(f, "{} `{}`", kind.name(), self.name),
        }
    }
}

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Effect {
    /// The operation is allowed (unless a deny matches too).
    Allow,
    /// The operation is denied, whatever allows it.
    Deny,
}

/// One binding.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Acl {
    /// The principal, or `*` for any authenticated principal.
    pub principal: String,
    /// Allow or deny.
    pub effect: Effect,
    /// The operation.
    pub operation: Operation,
    /// The resources.
    pub resource: Pattern,
}

impl Acl {
    /// Checks the binding is well formed: a principal, an operation that applies to the
    /// resource's kind, a name for a topic or group (none for the cluster).
    pub fn validate(&self) -> Result<(), AclError> {
        if self.principal.is_empty() {
            return Err(AclError("an ACL needs a principal (or `*`)".into()));
        }
        if self.principal.len() > NAME_BYTES_MAX || self.resource.name.len() > NAME_BYTES_MAX {
            return Err(AclError(format!(
                "an ACL's principal and resource name are at most {NAME_BYTES_MAX} bytes"
            )));
        }
        let kind = self.resource.kind;
        if !kind.operations().contains(&self.operation) {
            return Err(AclError(format!(
                "operation `{}` does not apply to a {}: use {}",
                self.operation,
                kind.name(),
                kind.operations()
                    .iter()
                    .map(|op| op.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        match kind {
            ResourceKind::Cluster if !self.resource.name.is_empty() || self.resource.prefix => {
                Err(AclError("an ACL on the cluster names no resource".into()))
            }
            ResourceKind::Topic | ResourceKind::Group
                if self.resource.name.is_empty() && !self.resource.prefix =>
            {
                Err(AclError(format!(
                    "an ACL on a {} needs its name (or a prefix; an empty prefix covers all)",
                    kind.name()
                )))
            }
            _ => Ok(()),
        }
    }
}

impl fmt::Display for Acl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let effect = match self.effect {
            Effect::Allow => "allow",
            Effect::Deny => "deny",
        };
        write!(
            f,
            "{effect} `{}` {} on {}",
            self.principal, self.operation, self.resource
        )
    }
}

/// A bad ACL, or a change the set cannot take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct AclError(pub String);

/// The answer to "may P do O to R?".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// A binding allows it and none denies it.
    Allowed,
    /// A binding denies it.
    Denied,
    /// No binding allows it.
    NotAllowed,
}

/// A set of bindings (ordered, without duplicates).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AclSet {
    acls: BTreeSet<Acl>,
}

impl AclSet {
    /// The bindings, in order.
    pub fn iter(&self) -> impl Iterator<Item = &Acl> {
        self.acls.iter()
    }

    /// How many bindings it holds.
    pub fn len(&self) -> usize {
        self.acls.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.acls.is_empty()
    }

    /// Adds `acls` (all or none): how many were new.
    pub fn add(&mut self, acls: &[Acl]) -> Result<usize, AclError> {
        for acl in acls {
            acl.validate()?;
        }
        let new = acls
            .iter()
            .filter(|a| !self.acls.contains(a))
            .collect::<BTreeSet<_>>()
            .len();
        if self.acls.len() + new > ACLS_MAX {
            return Err(AclError(format!(
                "the cluster holds at most {ACLS_MAX} ACLs: remove some first"
            )));
        }
        self.acls.extend(acls.iter().cloned());
        Ok(new)
    }

    /// Removes `acls`: how many were there.
    pub fn remove(&mut self, acls: &[Acl]) -> usize {
        acls.iter().filter(|a| self.acls.remove(a)).count()
    }

    /// The bindings of exactly `principal`, found by a range of the ordered set.
    fn of<'a>(&'a self, principal: &'a str) -> impl Iterator<Item = &'a Acl> + 'a {
        let first = Acl {
            principal: principal.to_string(),
            effect: Effect::Allow,
            operation: Operation::Read,
            resource: Pattern {
                kind: ResourceKind::Topic,
                name: String::new(),
                prefix: false,
            },
        };
        self.acls
            .range(first..)
            .take_while(move |acl| acl.principal == principal)
    }

    /// May `principal` do `operation` to `resource`? (See the module doc.)
    pub fn decide(
        &self,
        principal: &str,
        operation: Operation,
        resource: &Resource<'_>,
    ) -> Decision {
        let mut allowed = false;
        // The bindings of `principal` and of `*` only: the set is ordered by principal first.
        for acl in self.of(principal).chain(self.of(ANY_PRINCIPAL)) {
            if !acl.resource.covers(resource) {
                continue;
            }
            match acl.effect {
                Effect::Deny if acl.operation == operation => return Decision::Denied,
                Effect::Allow if acl.operation.implies(operation, resource.kind) => allowed = true,
                _ => {}
            }
        }
        if allowed {
            Decision::Allowed
        } else {
            Decision::NotAllowed
        }
    }
}

#[cfg(test)]
mod tests;
