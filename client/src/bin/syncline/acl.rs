//! `syncline acl add|remove|list`: who may do what (see the broker's `acl` module).
//!
//! Output contracts (also in the commands' help):
//! - `add`: `added N ACL(s)` (and `, M already held` when some were), on stdout.
//! - `remove`: `removed N ACL(s)` (and `, M were not held` when some were not).
//! - `list`: the table `PRINCIPAL PERMISSION OPERATION RESOURCE NAME PATTERN` (`PATTERN` is
//!   `literal` or `prefix`; `NAME` is `-` for the cluster), sorted as the broker keeps them;
//!   with `--json`, exactly one JSON object: `{"acls": [{"principal": "alice", "permission":
//!   "allow", "operation": "read", "resource_type": "topic", "resource_name": "orders",
//!   "pattern": "literal"}]}`.

use std::io::{self, Write};

use anyhow::bail;
use clap::{Args, Subcommand};
use serde_json::json;
use syncline_client::{Acl, AclResource, Client, ACL_OPERATIONS};

use crate::output::table;

const LIST_HELP: &str = "\
Output: the table PRINCIPAL PERMISSION OPERATION RESOURCE NAME PATTERN (PATTERN is `literal` or \
`prefix`, NAME `-` for the cluster). With --json, exactly one JSON object: {\"acls\": \
[{\"principal\": \"alice\", \"permission\": \"allow\", \"operation\": \"read\", \"resource_type\": \
\"topic\", \"resource_name\": \"orders\", \"pattern\": \"literal\"}]}.";

const RULES_HELP: &str = "\
Operations: read, write, create, delete, alter, describe (topics); group-read, describe (groups); \
cluster-admin (the cluster). read, write, create, delete and alter of a topic imply describe of \
it; group-read of a group implies describe of it. A deny wins over any allow; without an allow \
nothing is allowed (superusers, from the broker's --superusers, may do anything). `*` as the \
principal means any authenticated principal. Changing and listing ACLs needs cluster-admin.";

#[derive(Debug, Subcommand)]
pub enum AclCommand {
    /// Allow or deny a principal operations on a topic, a group, their prefixes, or the
    /// cluster. All bindings are added or none.
    #[command(after_help = RULES_HELP)]
    Add(BindingArgs),
    /// Remove bindings (the same arguments that added them).
    #[command(after_help = RULES_HELP)]
    Remove(BindingArgs),
    /// List the bindings.
    #[command(after_help = LIST_HELP)]
    List {
        /// Only this principal's bindings.
        #[arg(long)]
        principal: Option<String>,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("effect").required(true).args(["allow", "deny"])))]
#[command(group(clap::ArgGroup::new("resource").required(true).args(["topic", "topic_prefix", "group", "group_prefix", "cluster"])))]
pub struct BindingArgs {
    /// The principal (a token's principal, a JWT's `sub`, a client certificate's common
    /// name), or `*` for any authenticated principal.
    #[arg(long)]
    principal: String,
    /// Allow these operations, comma-separated.
    #[arg(long, value_name = "OP[,OP...]", value_delimiter = ',')]
    allow: Option<Vec<String>>,
    /// Deny these operations, comma-separated (a deny wins over any allow).
    #[arg(long, value_name = "OP[,OP...]", value_delimiter = ',')]
    deny: Option<Vec<String>>,
    /// The topic of this name.
    #[arg(long, value_name = "NAME")]
    topic: Option<String>,
    /// Every topic whose name starts with PREFIX.
    #[arg(long, value_name = "PREFIX")]
    topic_prefix: Option<String>,
    /// The consumer group of this name.
    #[arg(long, value_name = "NAME")]
    group: Option<String>,
    /// Every group whose name starts with PREFIX.
    #[arg(long, value_name = "PREFIX")]
    group_prefix: Option<String>,
    /// The cluster (for cluster-admin).
    #[arg(long)]
    cluster: bool,
}

impl BindingArgs {
    fn bindings(self) -> anyhow::Result<Vec<Acl>> {
        let resource = match (
            self.topic,
            self.topic_prefix,
            self.group,
            self.group_prefix,
            self.cluster,
        ) {
            (Some(name), ..) => AclResource::Topic(name),
            (_, Some(prefix), ..) => AclResource::TopicPrefix(prefix),
            (_, _, Some(name), ..) => AclResource::Group(name),
            (_, _, _, Some(prefix), _) => AclResource::GroupPrefix(prefix),
            _ => AclResource::Cluster,
        };
        let (deny, operations) = match (self.allow, self.deny) {
            (Some(ops), _) => (false, ops),
            (_, Some(ops)) => (true, ops),
            _ => bail!("give --allow or --deny"),
        };
        let mut bindings = Vec::new();
        for operation in operations {
            let operation = operation.trim().to_string();
            if !ACL_OPERATIONS.contains(&operation.as_str()) {
                bail!(
                    "unknown operation `{operation}`: use {}",
                    ACL_OPERATIONS.join(", ")
                );
            }
            bindings.push(Acl {
                principal: self.principal.clone(),
                deny,
                operation,
                resource: resource.clone(),
            });
        }
        if bindings.is_empty() {
            bail!("name at least one operation");
        }
        Ok(bindings)
    }
}

fn row(
    acl: &Acl,
) -> (
    String,
    &'static str,
    &str,
    &'static str,
    String,
    &'static str,
) {
    let (kind, name, pattern) = match &acl.resource {
        AclResource::Topic(name) => ("topic", name.clone(), "literal"),
        AclResource::TopicPrefix(name) => ("topic", name.clone(), "prefix"),
        AclResource::Group(name) => ("group", name.clone(), "literal"),
        AclResource::GroupPrefix(name) => ("group", name.clone(), "prefix"),
        AclResource::Cluster => ("cluster", String::new(), "literal"),
    };
    let permission = if acl.deny { "deny" } else { "allow" };
    (
        acl.principal.clone(),
        permission,
        &acl.operation,
        kind,
        name,
        pattern,
    )
}

pub async fn run(client: &Client, command: AclCommand) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    match command {
        AclCommand::Add(args) => {
            let bindings = args.bindings()?;
            let added = client.add_acls(&bindings).await?;
            let held = (bindings.len() as u32).saturating_sub(added);
            if held > 0 {
                writeln!(out, "added {added} ACL(s), {held} already held")?;
            } else {
                writeln!(out, "added {added} ACL(s)")?;
            }
        }
        AclCommand::Remove(args) => {
            let bindings = args.bindings()?;
            let removed = client.remove_acls(&bindings).await?;
            let missing = (bindings.len() as u32).saturating_sub(removed);
            if missing > 0 {
                writeln!(out, "removed {removed} ACL(s), {missing} were not held")?;
            } else {
                writeln!(out, "removed {removed} ACL(s)")?;
            }
        }
        AclCommand::List { principal, json } => {
            let acls = client.list_acls(principal.as_deref()).await?;
            if json {
                let list: Vec<serde_json::Value> = acls
                    .iter()
                    .map(|acl| {
                        let (principal, permission, operation, kind, name, pattern) = row(acl);
                        json!({
                            "principal": principal,
                            "permission": permission,
                            "operation": operation,
                            "resource_type": kind,
                            "resource_name": name,
                            "pattern": pattern,
                        })
                    })
                    .collect();
                writeln!(out, "{}", json!({ "acls": list }))?;
            } else {
                let mut rows = vec![[
                    "PRINCIPAL",
                    "PERMISSION",
                    "OPERATION",
                    "RESOURCE",
                    "NAME",
                    "PATTERN",
                ]
                .map(String::from)
                .to_vec()];
                for acl in &acls {
                    let (principal, permission, operation, kind, name, pattern) = row(acl);
                    let name = if name.is_empty() && kind == "cluster" {
                        "-".to_string()
                    } else {
                        name
                    };
                    rows.push(vec![
                        principal,
                        permission.into(),
                        operation.into(),
                        kind.into(),
                        name,
                        pattern.into(),
                    ]);
                }
                out.write_all(table(&rows).as_bytes())?;
            }
        }
    }
    out.flush()?;
    Ok(())
}
