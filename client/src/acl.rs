//! Access control lists ([`Client::add_acls`], [`Client::remove_acls`], [`Client::list_acls`]):
//! bindings of a principal to an operation on resources, kept by the cluster's controller.
//! Each call needs `cluster-admin` (or a superuser) once the broker authenticates clients.

use syncline_proto::v1;

use crate::client::Client;
use crate::error::Result;

/// The operations, as the broker spells them.
pub const ACL_OPERATIONS: [&str; 8] = [
    "read",
    "write",
    "create",
    "delete",
    "alter",
    "describe",
    "group-read",
    "cluster-admin",
];

/// What a binding covers.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum AclResource {
    /// The topic of this name.
    Topic(String),
    /// Topics whose names start with this.
    TopicPrefix(String),
    /// The consumer group of this name.
    Group(String),
    /// Groups whose names start with this.
    GroupPrefix(String),
    /// The cluster.
    Cluster,
}

impl AclResource {
    /// `(type, name, prefix)` as the broker's `Acl` message carries them.
    fn wire(&self) -> (&'static str, &str, bool) {
        match self {
            AclResource::Topic(name) => ("topic", name, false),
            AclResource::TopicPrefix(name) => ("topic", name, true),
            AclResource::Group(name) => ("group", name, false),
            AclResource::GroupPrefix(name) => ("group", name, true),
            AclResource::Cluster => ("cluster", "", false),
        }
    }
}

/// One binding: `principal` (or `*`) may (or with `deny` may not) do `operation`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Acl {
    /// The principal, or `*` for any authenticated principal.
    pub principal: String,
    /// A deny (wins over any allow) rather than an allow.
    pub deny: bool,
    /// One of [`ACL_OPERATIONS`].
    pub operation: String,
    /// What it covers.
    pub resource: AclResource,
}

impl Acl {
    fn to_wire(&self) -> v1::Acl {
        let (resource_type, name, prefix) = self.resource.wire();
        v1::Acl {
            principal: self.principal.clone(),
            deny: self.deny,
            operation: self.operation.clone(),
            resource_type: resource_type.to_string(),
            resource_name: name.to_string(),
            prefix,
        }
    }

    fn from_wire(acl: v1::Acl) -> Acl {
        let name = acl.resource_name;
        let resource = match (acl.resource_type.as_str(), acl.prefix) {
            ("topic", false) => AclResource::Topic(name),
            ("topic", true) => AclResource::TopicPrefix(name),
            ("group", false) => AclResource::Group(name),
            ("group", true) => AclResource::GroupPrefix(name),
            _ => AclResource::Cluster,
        };
        Acl {
            principal: acl.principal,
            deny: acl.deny,
            operation: acl.operation,
            resource,
        }
    }
}

impl Client {
    /// Adds `acls`, all or none: how many were not held before.
    pub async fn add_acls(&self, acls: &[Acl]) -> Result<u32> {
        let acls: Vec<v1::Acl> = acls.iter().map(Acl::to_wire).collect();
        let response = self
            .on_any(move |mut grpc| {
                let acls = acls.clone();
                async move { grpc.add_acls(v1::AddAclsRequest { acls }).await }
            })
            .await?;
        Ok(response.added)
    }

    /// Removes `acls`: how many were held.
    pub async fn remove_acls(&self, acls: &[Acl]) -> Result<u32> {
        let acls: Vec<v1::Acl> = acls.iter().map(Acl::to_wire).collect();
        let response = self
            .on_any(move |mut grpc| {
                let acls = acls.clone();
                async move { grpc.remove_acls(v1::RemoveAclsRequest { acls }).await }
            })
            .await?;
        Ok(response.removed)
    }

    /// The bindings (of `principal` only, when given), in the broker's order.
    pub async fn list_acls(&self, principal: Option<&str>) -> Result<Vec<Acl>> {
        let principal = principal.unwrap_or_default().to_string();
        let response = self
            .on_any(move |mut grpc| {
                let principal = principal.clone();
                async move { grpc.list_acls(v1::ListAclsRequest { principal }).await }
            })
            .await?;
        Ok(response.acls.into_iter().map(Acl::from_wire).collect())
    }
}
