//! The audit log: every administrative call (topic create, delete and compaction; partition
//! moves, rebalances, node and voter changes) is logged once it is answered, on the tracing
//! target [`TARGET`], with the calling principal (`anonymous` without authentication), the
//! operation, the resource and the result (`ok`, or `refused` with the gRPC code and message).
//! Select it with the log filter, e.g. `--log info,syncline::audit=info`, or route it to its own
//! sink by target.
//!
//! It may call `server::auth` (the principal in the request's extensions).

use tonic::{Request, Status};

use super::auth::Principal;

/// The tracing target of audit records.
pub const TARGET: &str = "syncline::audit";

/// One administrative call, logged by [`Audit::record`].
#[derive(Debug)]
pub struct Audit {
    principal: String,
    operation: &'static str,
    resource: String,
}

impl Audit {
    /// The call `request` doing `operation` on `resource` (`topic:NAME`, `node:ID`, `cluster`).
    pub fn of<T>(request: &Request<T>, operation: &'static str, resource: String) -> Audit {
        let principal = request
            .extensions()
            .get::<Principal>()
            .map_or_else(|| "anonymous".to_string(), |p| p.0.clone());
        Audit {
            principal,
            operation,
            resource,
        }
    }

    /// Logs the call with its result.
    pub fn record<R>(self, result: &Result<R, Status>) {
        let Audit {
            principal,
            operation,
            resource,
        } = self;
        match result {
            Ok(_) => {
                tracing::info!(target: TARGET, %principal, operation, %resource, result = "ok", "audit")
            }
            Err(status) => tracing::info!(
                target: TARGET,
                %principal,
                operation,
                %resource,
                result = "refused",
                code = ?status.code(),
                reason = status.message(),
                "audit"
            ),
        }
    }
}
