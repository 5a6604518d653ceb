//! AddAcls, RemoveAcls, ListAcls: the ACLs' wire form and where a change goes (the
//! controller in a cluster, the data directory's store on a cluster of one). The caller's
//! `cluster-admin` is checked by the handlers in `super`.

use syncline_proto::v1;
use tonic::{Request, Response, Status};

use super::super::status::to_status;
use super::BrokerService;
use crate::acl::{Acl, AclError, AclSet, Effect, Operation, Pattern, ResourceKind};
use crate::cluster::metadata::Command;
use crate::error::BrokerError;

/// Bindings one call may add or remove.
const ACLS_PER_CALL_MAX: usize = 1000;

fn kind_of(name: &str) -> Result<ResourceKind, AclError> {
    match name {
        "topic" => Ok(ResourceKind::Topic),
        "group" => Ok(ResourceKind::Group),
        "cluster" => Ok(ResourceKind::Cluster),
        other => Err(AclError(format!(
            "unknown resource type `{other}`: use topic, group or cluster"
        ))),
    }
}

fn kind_name(kind: ResourceKind) -> &'static str {
    match kind {
        ResourceKind::Topic => "topic",
        ResourceKind::Group => "group",
        ResourceKind::Cluster => "cluster",
    }
}

/// A binding from the wire, checked.
pub(super) fn from_wire(acl: &v1::Acl) -> Result<Acl, AclError> {
    let binding = Acl {
        principal: acl.principal.clone(),
        effect: if acl.deny {
            Effect::Deny
        } else {
            Effect::Allow
        },
        operation: Operation::parse(&acl.operation)?,
        resource: Pattern {
            kind: kind_of(&acl.resource_type)?,
            name: acl.resource_name.clone(),
            prefix: acl.prefix,
        },
    };
    binding.validate()?;
    Ok(binding)
}

/// A binding on the wire.
pub(super) fn to_wire(acl: &Acl) -> v1::Acl {
    v1::Acl {
        principal: acl.principal.clone(),
        deny: acl.effect == Effect::Deny,
        operation: acl.operation.name().to_string(),
        resource_type: kind_name(acl.resource.kind).to_string(),
        resource_name: acl.resource.name.clone(),
        prefix: acl.resource.prefix,
    }
}

fn bindings(acls: &[v1::Acl]) -> Result<Vec<Acl>, Status> {
    if acls.is_empty() {
        return Err(Status::invalid_argument("the call names no ACL"));
    }
    if acls.len() > ACLS_PER_CALL_MAX {
        return Err(Status::invalid_argument(format!(
            "{} ACLs in one call: at most {ACLS_PER_CALL_MAX}",
            acls.len()
        )));
    }
    acls.iter()
        .map(from_wire)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Status::invalid_argument(e.0))
}

impl BrokerService {
    /// The ACLs this node decides with.
    fn acl_set(&self) -> AclSet {
        match &self.cluster.controller {
            Some(controller) => controller.view().with(|m| m.acls.clone()),
            None => self
                .access
                .local()
                .map(|store| store.with(AclSet::clone))
                .unwrap_or_default(),
        }
    }

    /// Proposes `command` to the controller (a cluster), or applies `local` to the store.
    async fn change_acls(
        &self,
        command: Command,
        local: impl FnOnce(&crate::acl::store::AclStore) -> Result<usize, AclError>,
    ) -> Result<Option<usize>, Status> {
        if let Some(controller) = &self.cluster.controller {
            controller
                .propose(command)
                .await
                .map_err(to_status)?
                .map_err(|e| to_status(e.into()))?;
            return Ok(None);
        }
        let store = self.access.local().ok_or_else(|| {
            Status::failed_precondition("this broker keeps no ACLs (it has no data directory)")
        })?;
        local(store)
            .map(Some)
            .map_err(|e| to_status(BrokerError::InvalidRequest(e.0)))
    }

    pub(super) async fn add_acls_call(
        &self,
        request: Request<v1::AddAclsRequest>,
    ) -> Result<Response<v1::AddAclsResponse>, Status> {
        let acls = bindings(&request.get_ref().acls)?;
        let before = self.acl_set();
        let new = acls
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .filter(|a| !before.iter().any(|held| held == *a))
            .count();
        let added = self
            .change_acls(Command::AddAcls { acls: acls.clone() }, |store| {
                store.add(&acls)
            })
            .await?
            .unwrap_or(new);
        Ok(Response::new(v1::AddAclsResponse {
            added: added as u32,
        }))
    }

    pub(super) async fn remove_acls_call(
        &self,
        request: Request<v1::RemoveAclsRequest>,
    ) -> Result<Response<v1::RemoveAclsResponse>, Status> {
        let acls = bindings(&request.get_ref().acls)?;
        let before = self.acl_set();
        let held = acls
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .filter(|a| before.iter().any(|h| h == *a))
            .count();
        let removed = self
            .change_acls(Command::RemoveAcls { acls: acls.clone() }, |store| {
                store.remove(&acls)
            })
            .await?
            .unwrap_or(held);
        Ok(Response::new(v1::RemoveAclsResponse {
            removed: removed as u32,
        }))
    }

    pub(super) fn list_acls_call(
        &self,
        request: Request<v1::ListAclsRequest>,
    ) -> Result<Response<v1::ListAclsResponse>, Status> {
        let principal = request.into_inner().principal;
        let acls = self
            .acl_set()
            .iter()
            .filter(|a| principal.is_empty() || a.principal == principal)
            .map(to_wire)
            .collect();
        Ok(Response::new(v1::ListAclsResponse { acls }))
    }
}
