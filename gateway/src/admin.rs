//! Read-only views of the cluster for the web console (and any script): nodes, topics with
//! their partitions and offsets, consumer groups with their lag. Each is one or a few
//! describe calls made with the caller's credentials, so the brokers' ACLs decide what is
//! shown (listings come back filtered to what the caller may describe).
//!
//! - `GET /v1/cluster`: `{"cluster_id", "controller", "voters", "nodes": [{"id", "address",
//!   "alive", "leaving"}]}`.
//! - `GET /v1/topics/{topic}`: `{"name", "table", "topic_id", "partitions": [{"partition",
//!   "leader", "replicas", "caught_up", "log_start_offset", "durable_offset",
//!   "log_end_offset", "size_bytes", "segments", "compaction_horizon", "error"}]}` (`leader` and the replica lists
//!   from the cluster's placement; a single node leads everything).
//! - `GET /v1/groups`: `{"groups": [{"group", "state", "members"}]}`.
//! - `GET /v1/groups/{group}`: `{"group", "state", "members": [{"member_id", "client_id",
//!   "topics", "assignment": ["topic/0", ...]}], "partitions": [{"topic", "partition",
//!   "owner", "committed_offset", "end_offset", "lag"}], "lag"}` (`lag` the sum).
//!
//! It may call `crate::http` (the caller's token, [`ApiError`]) and `syncline-client`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::Json;
use serde_json::{json, Value};
use syncline_client::CleanupPolicy;

use crate::http::{caller_client, ApiError, Gateway};

/// `GET /v1/cluster`.
pub async fn cluster(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let client = caller_client(&gateway, &headers).await?;
    let cluster = client.describe_cluster().await?;
    let nodes: Vec<Value> = cluster
        .nodes
        .iter()
        .map(|node| {
            json!({
                "id": node.id,
                "address": node.address,
                "alive": node.alive,
                "leaving": node.leaving,
            })
        })
        .collect();
    Ok(Json(json!({
        "cluster_id": cluster.cluster_id,
        "controller": cluster.controller,
        "voters": cluster.voters,
        "nodes": nodes,
    })))
}

/// `GET /v1/topics/{topic}`.
pub async fn topic(
    State(gateway): State<Arc<Gateway>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let client = caller_client(&gateway, &headers).await?;
    let topic = client.describe_topic(&name).await?;
    // Placement is a cluster view; a caller without describe on the cluster still sees the
    // offsets, only not who leads.
    let placement = client
        .describe_cluster()
        .await
        .map(|cluster| cluster.partitions)
        .unwrap_or_default();
    let partitions: Vec<Value> = topic
        .partitions
        .iter()
        .map(|p| {
            let placed = placement
                .iter()
                .find(|placed| placed.topic == name && placed.partition == p.partition);
            json!({
                "partition": p.partition,
                "leader": placed.and_then(|placed| placed.leader),
                "replicas": placed.map(|placed| placed.replicas.clone()).unwrap_or_default(),
                "caught_up": placed.map(|placed| placed.caught_up.clone()).unwrap_or_default(),
                "log_start_offset": p.log_start_offset,
                "durable_offset": p.durable_offset,
                "log_end_offset": p.log_end_offset,
                "size_bytes": p.size_bytes,
                "segments": p.segments,
                "compaction_horizon": p.compaction_horizon,
                "error": p.error,
            })
        })
        .collect();
    Ok(Json(json!({
        "name": topic.name,
        "table": topic.config.cleanup_policy == CleanupPolicy::Compact,
        "topic_id": topic.topic_id,
        "partitions": partitions,
    })))
}

/// `GET /v1/groups`.
pub async fn groups(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let client = caller_client(&gateway, &headers).await?;
    let groups: Vec<Value> = client
        .list_groups()
        .await?
        .into_iter()
        .map(|g| json!({"group": g.group, "state": g.state, "members": g.members}))
        .collect();
    Ok(Json(json!({ "groups": groups })))
}

/// `GET /v1/groups/{group}`.
pub async fn group(
    State(gateway): State<Arc<Gateway>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let client = caller_client(&gateway, &headers).await?;
    let group = client.describe_group(&name).await?;
    let members: Vec<Value> = group
        .members
        .iter()
        .map(|m| {
            let assignment: Vec<String> = m
                .assignment
                .iter()
                .map(|tp| format!("{}/{}", tp.topic, tp.partition))
                .collect();
            json!({
                "member_id": m.member_id,
                "client_id": m.client_id,
                "topics": m.topics,
                "assignment": assignment,
            })
        })
        .collect();
    let partitions: Vec<Value> = group
        .partitions
        .iter()
        .map(|p| {
            json!({
                "topic": p.topic,
                "partition": p.partition,
                "owner": p.owner,
                "committed_offset": p.committed_offset,
                "end_offset": p.end_offset,
                "lag": p.lag,
            })
        })
        .collect();
    let lag: u64 = group.partitions.iter().map(|p| p.lag).sum();
    Ok(Json(json!({
        "group": group.group,
        "state": group.state,
        "members": members,
        "partitions": partitions,
        "lag": lag,
    })))
}
