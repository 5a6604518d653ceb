//! Authorization: may the call's principal do what it asks? Applied by each Broker handler
//! before it looks anything up (so a refused call learns nothing of what exists and changes
//! nothing), and to the Peer service as a whole.
//!
//! ## The rules
//! - With no authentication configured every call is anonymous and allowed (a loopback-only
//!   broker, as before security existed).
//! - Superusers (`--superusers`, plus the subject of this node's own certificate) may do
//!   anything. In a cluster with mutual TLS, calls one node hands another (to the controller
//!   leader, or answered locally for a fan-out) authenticate with the node's certificate when
//!   the caller had no bearer token: list every node's certificate subject in `--superusers`
//!   (Kafka's inter-broker principal works the same way). The Peer service (Raft, replication,
//!   partition copies) takes superusers only.
//! - Anyone else needs an ACL (`crate::acl`): deny over allow, nothing without an allow.
//!   InitProducer, DescribeCluster and FindCoordinator need only authentication;
//!   DescribeCluster, ListTopics and ListGroups show only what the principal may `describe`.
//!
//! | calls | needs |
//! |---|---|
//! | Produce, ProduceStream | `write` on the topic |
//! | Fetch, Subscribe, Get, History, Snapshot | `read` on the topic |
//! | ListOffsets, DescribeTopic | `describe` on the topic |
//! | CreateTopic / DeleteTopic / CompactTopic | `create` / `delete` / `alter` on the topic |
//! | JoinGroup | `group-read` on the group and `read` on each topic it names |
//! | Heartbeat, LeaveGroup, FetchOffsets | `group-read` on the group |
//! | CommitOffsets | `group-read` on the group and `read` on each topic committed |
//! | DescribeGroup | `describe` on the group |
//! | ReassignPartition, Rebalance, AddNode, RemoveNode, SetVoters, Add/Remove/ListAcls | `cluster-admin` |
//!
//! Where the ACLs are read: the controller's applied metadata on a node of a cluster (every
//! node applies the same commands, so every node decides the same once it caught up), the
//! data directory's `acls.json` on a cluster of one (`crate::acl::store`).
//!
//! It may call `acl`, `cluster` (the applied metadata) and `server::auth` (the principal).

use std::collections::HashSet;
use std::sync::Arc;

use tonic::codegen::{http, BoxFuture, Context, Poll, Service};
use tonic::server::NamedService;
use tonic::Status;

use super::auth::Principal;
use crate::acl::store::AclStore;
use crate::acl::{Decision, Operation, Resource, ResourceKind};
use crate::cluster::controller::Controller;
use crate::error::BrokerError;

/// Who may do what: the configuration's part (authentication on or off, superusers) and the
/// ACLs of a cluster of one.
#[derive(Debug)]
pub struct Access {
    enabled: bool,
    superusers: HashSet<String>,
    local: Option<Arc<AclStore>>,
}

impl Default for Access {
    fn default() -> Self {
        Access::open()
    }
}

impl Access {
    /// No authentication: every call is allowed, no ACL store.
    pub fn open() -> Access {
        Access {
            enabled: false,
            superusers: HashSet::new(),
            local: None,
        }
    }

    /// Checks calls when `enabled` (authentication is configured), with `superusers` and the
    /// ACL store of a cluster of one.
    pub fn new(
        enabled: bool,
        superusers: impl IntoIterator<Item = String>,
        local: Option<Arc<AclStore>>,
    ) -> Access {
        Access {
            enabled,
            superusers: superusers.into_iter().collect(),
            local,
        }
    }

    /// Whether calls are checked at all.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The ACL store of a cluster of one.
    pub fn local(&self) -> Option<&Arc<AclStore>> {
        self.local.as_ref()
    }

    /// Whether `principal` may do anything.
    pub fn is_superuser(&self, principal: &Principal) -> bool {
        self.superusers.contains(&principal.0)
    }

    /// May the call's `principal` do `operation` to `resource`? ACLs come from `controller`'s
    /// metadata when this node is in a cluster, else from the local store.
    pub fn check(
        &self,
        controller: Option<&Controller>,
        principal: Option<&Principal>,
        operation: Operation,
        resource: Resource<'_>,
    ) -> Result<(), BrokerError> {
        if !self.enabled {
            return Ok(());
        }
        let Some(principal) = principal else {
            return Err(BrokerError::Unauthenticated(
                "the call carries no authenticated principal".into(),
            ));
        };
        if self.is_superuser(principal) {
            return Ok(());
        }
        let decision = match controller {
            Some(controller) => controller
                .view()
                .with(|m| m.acls.decide(&principal.0, operation, &resource)),
            None => match &self.local {
                Some(store) => store.with(|set| set.decide(&principal.0, operation, &resource)),
                None => Decision::NotAllowed,
            },
        };
        let why = match decision {
            Decision::Allowed => return Ok(()),
            Decision::Denied => "an ACL denies it".to_string(),
            Decision::NotAllowed => {
                let target = match resource.kind {
                    ResourceKind::Topic => format!("--topic {}", resource.name),
                    ResourceKind::Group => format!("--group {}", resource.name),
                    ResourceKind::Cluster => "--cluster".to_string(),
                };
                format!(
                    "no ACL allows it (an administrator grants it with `syncline acl add \
                     --principal {} --allow {operation} {target}`)",
                    principal.0
                )
            }
        };
        Err(BrokerError::PermissionDenied {
            principal: principal.0.clone(),
            operation,
            resource: resource.to_string(),
            why,
        })
    }

    /// Whether the call's `principal` may `describe` `resource` (listings leave out what it
    /// may not).
    pub fn may_describe(
        &self,
        controller: Option<&Controller>,
        principal: Option<&Principal>,
        resource: Resource<'_>,
    ) -> bool {
        self.check(controller, principal, Operation::Describe, resource)
            .is_ok()
    }
}

/// A service only superusers may call (the Peer service: node-to-node traffic) when
/// authentication is configured.
#[derive(Debug, Clone)]
pub struct SuperusersOnly<S> {
    inner: S,
    auth: Option<Arc<super::auth::Authenticator>>,
    access: Arc<Access>,
}

impl<S> SuperusersOnly<S> {
    /// Wraps `inner`: with `auth` None every call passes.
    pub fn new(
        inner: S,
        auth: Option<Arc<super::auth::Authenticator>>,
        access: Arc<Access>,
    ) -> Self {
        SuperusersOnly {
            inner,
            auth,
            access,
        }
    }
}

impl<S: NamedService> NamedService for SuperusersOnly<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, RequestBody, ResponseBody> Service<http::Request<RequestBody>> for SuperusersOnly<S>
where
    S: Service<http::Request<RequestBody>, Response = http::Response<ResponseBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResponseBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<RequestBody>) -> Self::Future {
        if let Some(auth) = &self.auth {
            let refused = match auth.authenticate_http(&request) {
                Ok(principal) if self.access.is_superuser(&principal) => None,
                Ok(principal) => Some(Status::permission_denied(format!(
                    "the Peer service is for the cluster's nodes: principal `{}` is not a \
                     superuser (list each node's certificate subject in --superusers)",
                    principal.0
                ))),
                Err(reason) => Some(Status::unauthenticated(reason)),
            };
            if let Some(status) = refused {
                return Box::pin(async move { Ok(status.into_http()) });
            }
        }
        Box::pin(self.inner.call(request))
    }
}
