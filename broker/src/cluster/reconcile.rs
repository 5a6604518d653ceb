//! Makes this node's local topics follow the applied cluster metadata.
//!
//! After every applied change (and at start) one pass compares the metadata with the topic
//! registry: a topic incarnation the metadata lists as deleted is removed here; a topic the
//! metadata has and this node lacks is created, with directories and logs for the partitions
//! placed on this node and placeholders (answering NotLeader) for the others; placeholders
//! are pointed at the partitions' current leaders. Each step is idempotent and crash-safe on
//! its own (the registry's create and delete are), so a node that was down during a create or
//! a delete converges on its first pass after it returns.
//!
//! Deletion only follows a tombstone (an incarnation id the metadata says was deleted), never
//! the mere absence of a topic: after a restart the applied metadata may briefly be older
//! than the topics on disk, and absence then means "not yet", not "deleted".
//!
//! It may call the controller's view and the topic registry.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::controller::Controller;
use super::metadata::Metadata;
use crate::partition::RemoteLeader;
use crate::topic::{Registry, TopicId};

/// Called with a topic's name after its local copy was deleted (the group coordinator drops
/// the members reading it).
pub type OnDeleted = Arc<dyn Fn(&str) + Send + Sync>;
/// Called after every complete pass (the group coordinator attaches `__offsets`).
pub type AfterPass = Arc<dyn Fn() + Send + Sync>;

/// How long a failed pass waits before it tries again.
const RETRY: Duration = Duration::from_secs(1);

/// Runs passes until `shutdown` turns true.
pub async fn run(
    controller: Arc<Controller>,
    registry: Arc<Registry>,
    on_deleted: OnDeleted,
    after_pass: AfterPass,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut applied = controller.view().subscribe();
    loop {
        let index = *applied.borrow_and_update();
        let metadata = controller.metadata();
        let failed = pass(&controller, &registry, &on_deleted, &metadata).await;
        let complete = failed.is_empty();
        after_pass();
        controller.set_reconciled(index, failed);
        tokio::select! {
            changed = applied.changed() => if changed.is_err() { break },
            _ = tokio::time::sleep(RETRY), if !complete => {}
            _ = shutdown.changed() => break,
        }
        if *shutdown.borrow() {
            break;
        }
    }
}

/// One pass; the topics whose step failed, with why (the next pass retries them).
async fn pass(
    controller: &Controller,
    registry: &Registry,
    on_deleted: &OnDeleted,
    metadata: &Metadata,
) -> BTreeMap<String, String> {
    let me = controller.node_id();
    let mut failed = BTreeMap::new();
    for topic in registry.list() {
        let id = topic.id.to_string();
        if metadata.deleted.contains(&id) {
            match registry.delete_incarnation(&topic.name, topic.id).await {
                Ok(()) => {
                    controller.replicas().forget_topic(&id);
                    tracing::info!(topic = %topic.name, %id, "deleted this node's copy of a deleted topic");
                    on_deleted(&topic.name);
                }
                Err(error) => {
                    tracing::warn!(topic = %topic.name, %error, "could not delete this node's copy of a deleted topic");
                    failed.insert(topic.name.to_string(), error.to_string());
                }
            }
        }
    }
    for (name, meta) in &metadata.topics {
        let mut local = Vec::new();
        let mut remote = BTreeMap::new();
        for (partition, placement) in meta.partitions.iter().enumerate() {
            let partition = partition as u32;
            // A single replica moving here is copied first (`copy`): placed here once done.
            let placed = if meta.replication_factor == 1 {
                placement.replicas.clone()
            } else {
                placement.holders()
            };
            if placed.contains(&me) {
                local.push(partition);
            } else {
                let address = placement
                    .leader
                    .and_then(|leader| metadata.nodes.get(&leader))
                    .map(|node| node.address.clone())
                    .unwrap_or_default();
                remote.insert(
                    partition,
                    RemoteLeader {
                        id: placement.leader,
                        address,
                    },
                );
            }
        }
        match registry.get(name) {
            Ok(topic) if TopicId::parse(&meta.id) == Some(topic.id) => {
                let single = meta.replication_factor == 1;
                if let Err(error) =
                    follow_moves(controller, registry, &topic, &local, &remote, single).await
                {
                    tracing::warn!(topic = %name, %error, "could not follow a partition move");
                    failed.insert(name.clone(), error);
                }
                registry.set_remote_leaders(name, &remote);
            }
            Ok(topic) => {
                // An incarnation the metadata does not (yet) list as deleted: wait for it.
                tracing::warn!(topic = %name, here = %topic.id, cluster = %meta.id, "another incarnation of the topic is here; waiting for the cluster metadata to delete it");
                failed.insert(
                    name.clone(),
                    format!(
                        "incarnation {} of the topic is here, not {}: waiting for its delete",
                        topic.id, meta.id
                    ),
                );
            }
            Err(_) => match registry
                .create_placed(name, &meta.settings, local, &remote)
                .await
            {
                Ok(topic) => {
                    tracing::info!(topic = %name, id = %topic.id, "created this node's part of a topic")
                }
                Err(error) => {
                    tracing::warn!(topic = %name, %error, "could not create this node's part of a topic");
                    failed.insert(name.clone(), error.to_string());
                    continue;
                }
            },
        }
        if meta.replication_factor > 1 {
            if let Err(error) = start_groups(controller, registry, metadata, name, meta).await {
                tracing::warn!(topic = %name, %error, "could not start this node's replication groups");
                failed.insert(name.clone(), error);
            }
        }
    }
    failed
}

/// Makes this node's copy of a topic follow moves of its partitions: a partition placed here
/// (`local`: a replica, or the target of a move) that is a placeholder gets its log (for a
/// topic of `single` replicas, the verified copy its move made: `copy`); one held
/// here that is placed elsewhere now loses its copy, but only once this node's metadata is
/// known current (a read barrier on the controller leader): while a restarted node replays
/// the controller's log, an older placement is "not yet", not "moved away".
async fn follow_moves(
    controller: &Controller,
    registry: &Registry,
    topic: &crate::topic::Topic,
    local: &[u32],
    remote: &BTreeMap<u32, RemoteLeader>,
    single: bool,
) -> Result<(), String> {
    for partition in &topic.partitions {
        let placed_here = local.contains(&partition.id);
        let mut held_here = partition.remote_leader().is_none();
        if single && placed_here && held_here && partition.is_handing_over() {
            // This node's old copy, fenced when the partition moved away, and the partition
            // moved back by a copy since: the verified copy replaces it (the old one never
            // takes writes again).
            let copy = super::copy::copy_dir(
                &registry.config().data_dir,
                &topic.id.to_string(),
                partition.id,
            );
            if copy.join(crate::topic::COPY_VERIFIED).exists() {
                let leader = remote.get(&partition.id).cloned().unwrap_or_default();
                registry
                    .remove_local_partition(&topic.name, partition.id, leader)
                    .await
                    .map_err(|e| e.to_string())?;
                held_here = false;
            }
        }
        if placed_here && !held_here {
            let copied = single.then(|| {
                super::copy::copy_dir(
                    &registry.config().data_dir,
                    &topic.id.to_string(),
                    partition.id,
                )
            });
            registry
                .add_local_partition(&topic.name, partition.id, copied)
                .await
                .map_err(|e| e.to_string())?;
        } else if held_here && !placed_here && partition.fence_reason().is_none() {
            controller
                .applied_barrier(Duration::from_secs(5))
                .await
                .map_err(|e| e.to_string())?;
            let current = controller.metadata();
            let still_elsewhere = current
                .topics
                .get(topic.name.as_ref())
                .filter(|t| TopicId::parse(&t.id) == Some(topic.id))
                .and_then(|t| t.partitions.get(partition.id as usize))
                .is_some_and(|p| {
                    // A single replica moving here is not held here until its copy is in.
                    let placed = if single {
                        p.replicas.clone()
                    } else {
                        p.holders()
                    };
                    !placed.contains(&controller.node_id())
                });
            if !still_elsewhere {
                continue;
            }
            controller
                .replicas()
                .forget(&crate::replication::network::GroupId {
                    topic_id: topic.id.to_string(),
                    partition: partition.id,
                });
            let leader = remote.get(&partition.id).cloned().unwrap_or_default();
            registry
                .remove_local_partition(&topic.name, partition.id, leader)
                .await
                .map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// Starts the Raft groups of this node's replicas of a replicated topic (those not running).
async fn start_groups(
    controller: &Controller,
    registry: &Registry,
    metadata: &Metadata,
    name: &str,
    meta: &super::metadata::TopicMeta,
) -> Result<(), String> {
    let me = controller.node_id();
    let topic = registry.get(name).map_err(|e| e.to_string())?;
    if TopicId::parse(&meta.id) != Some(topic.id) {
        return Ok(());
    }
    for (number, placement) in meta.partitions.iter().enumerate() {
        let holders = placement.holders();
        if !holders.contains(&me) {
            continue;
        }
        let partition = topic.partition(number as u32).map_err(|e| e.to_string())?;
        if !partition.is_replicated() || partition.fence_reason().is_some() {
            continue;
        }
        let replicas: BTreeMap<u64, String> = holders
            .iter()
            .map(|node| {
                let address = metadata
                    .nodes
                    .get(node)
                    .map(|n| n.address.clone())
                    .or_else(|| controller.address_of(*node))
                    .unwrap_or_default();
                (*node, address)
            })
            .collect();
        let id = crate::replication::network::GroupId {
            topic_id: meta.id.clone(),
            partition: number as u32,
        };
        let preferred = placement.replicas.first().copied().unwrap_or(me);
        // A replica a move added starts empty and waits for the leader to add it, whatever
        // the placement says by the time it starts.
        let moved_in = partition
            .local_log()
            .map(|log| log.dir().join(crate::topic::MOVED_IN_MARKER).exists())
            .unwrap_or(true);
        let initialize = placement.replicas.contains(&me) && !moved_in;
        let replicas = if initialize {
            replicas
                .into_iter()
                .filter(|(node, _)| placement.replicas.contains(node))
                .collect()
        } else {
            replicas
        };
        controller
            .replicas()
            .ensure(id, partition, &replicas, preferred, initialize)
            .await?;
    }
    Ok(())
}
