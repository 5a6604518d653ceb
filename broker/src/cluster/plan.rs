//! Planning moves: which partitions go where when the cluster is rebalanced or a node drains.
//!
//! Pure functions of the metadata (the controller leader plans; each planned move is then an
//! ordinary `Command::Reassign`). Partitions already moving are left alone.
//!
//! - [`rebalance`]: while the live node holding the most replicas has at least two more than
//!   the one holding the fewest, one replica moves from the first to the second (a partition
//!   the second does not hold, keeping the replica's place in the list). Then the preferred
//!   leaders (first replicas) are evened out the same way by reordering replica lists, which
//!   moves no data: the preferred-leader task then moves the leaderships.
//! - [`drain`]: every replica on the node goes to the live node holding the fewest replicas
//!   among those not holding the partition; where none is left, the plan fails unless
//!   `force`, which shrinks the partition's replica set instead.

use std::collections::BTreeMap;

use super::metadata::Metadata;

/// One planned move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedMove {
    /// The topic.
    pub topic: String,
    /// Its incarnation.
    pub id: String,
    /// The partition.
    pub partition: u32,
    /// The replica set now.
    pub from: Vec<u64>,
    /// The replica set to move to (preferred leader first).
    pub to: Vec<u64>,
    /// The set is smaller than the replication factor (a forced drain).
    pub shrink: bool,
}

/// Why a drain cannot be planned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// The node is not a member.
    #[error("node {0} is not a member of the cluster")]
    UnknownNode(u64),
    /// Too few other live nodes for a partition's replication factor.
    #[error("the other live nodes ({live:?}) are too few to keep {topic}/{partition} at replication factor {factor} without node {node}: add a node first, or give --force to shrink such partitions")]
    TooFewNodes {
        /// The node to drain.
        node: u64,
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// Its replication factor.
        factor: u32,
        /// The other live nodes.
        live: Vec<u64>,
    },
    /// A replica would be left with no copy at all.
    #[error("{topic}/{partition} has its only replica on node {node} and no other live node can take it")]
    LastReplica {
        /// The node to drain.
        node: u64,
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
    },
}

/// Replicas each live node holds (moving partitions count at their target too).
fn replica_counts(metadata: &Metadata, live: &[u64]) -> BTreeMap<u64, usize> {
    let mut counts: BTreeMap<u64, usize> = live.iter().map(|n| (*n, 0)).collect();
    for partition in metadata.topics.values().flat_map(|t| &t.partitions) {
        for node in partition.holders() {
            if let Some(count) = counts.get_mut(&node) {
                *count += 1;
            }
        }
    }
    counts
}

/// The node with the most and the one with the fewest, when they differ by two or more (ties:
/// the lowest id).
fn uneven(counts: &BTreeMap<u64, usize>) -> Option<(u64, u64)> {
    let (&most, &high) = counts.iter().max_by_key(|(id, c)| (**c, u64::MAX - **id))?;
    let (&least, &low) = counts.iter().min_by_key(|(id, c)| (**c, **id))?;
    (high >= low + 2).then_some((most, least))
}

/// The first partition (by topic name, then number) not moving for which `wanted(topic,
/// partition)` holds.
fn first_partition(
    metadata: &Metadata,
    wanted: impl Fn(&str, u32) -> bool,
) -> Option<(String, u32)> {
    metadata.topics.iter().find_map(|(name, topic)| {
        topic
            .partitions
            .iter()
            .enumerate()
            .filter(|(_, p)| p.moving.is_none())
            .map(|(n, _)| n as u32)
            .find(|n| wanted(name, *n))
            .map(|n| (name.clone(), n))
    })
}

/// The moves that spread replicas and preferred leaders evenly over the live nodes.
pub fn rebalance(metadata: &Metadata) -> Vec<PlannedMove> {
    let live = metadata.live_nodes();
    if live.len() < 2 {
        return Vec::new();
    }
    let mut counts = replica_counts(metadata, &live);
    // (topic, partition) -> the planned replica list.
    let mut planned: BTreeMap<(String, u32), Vec<u64>> = BTreeMap::new();
    let current = |topic: &str, partition: u32, planned: &BTreeMap<(String, u32), Vec<u64>>| {
        planned
            .get(&(topic.to_string(), partition))
            .cloned()
            .or_else(|| {
                metadata
                    .topics
                    .get(topic)
                    .and_then(|t| t.partitions.get(partition as usize))
                    .map(|p| p.replicas.clone())
            })
            .unwrap_or_default()
    };
    // Replicas: most loaded to least loaded, one at a time.
    while let Some((most, least)) = uneven(&counts) {
        let candidate = first_partition(metadata, |name, n| {
            let replicas = current(name, n, &planned);
            replicas.contains(&most) && !replicas.contains(&least)
        });
        let Some((topic, partition)) = candidate else {
            break;
        };
        let mut replicas = current(&topic, partition, &planned);
        for node in replicas.iter_mut() {
            if *node == most {
                *node = least;
            }
        }
        planned.insert((topic, partition), replicas);
        *counts.entry(most).or_default() -= 1;
        *counts.entry(least).or_default() += 1;
    }
    // Preferred leaders: reorder replica lists of replicated partitions.
    let mut firsts: BTreeMap<u64, usize> = live.iter().map(|n| (*n, 0)).collect();
    for (name, topic) in &metadata.topics {
        for n in 0..topic.partitions.len() as u32 {
            if let Some(first) = current(name, n, &planned).first() {
                if let Some(count) = firsts.get_mut(first) {
                    *count += 1;
                }
            }
        }
    }
    while let Some((most, least)) = uneven(&firsts) {
        let candidate = first_partition(metadata, |name, n| {
            let replicas = current(name, n, &planned);
            replicas.first() == Some(&most) && replicas.contains(&least)
        });
        let Some((topic, partition)) = candidate else {
            break;
        };
        let mut replicas = current(&topic, partition, &planned);
        if let Some(position) = replicas.iter().position(|n| *n == least) {
            replicas.swap(0, position);
        }
        planned.insert((topic, partition), replicas);
        *firsts.entry(most).or_default() -= 1;
        *firsts.entry(least).or_default() += 1;
    }
    planned
        .into_iter()
        .filter_map(|((topic, partition), to)| {
            let meta = metadata.topics.get(&topic)?;
            let from = meta.partitions.get(partition as usize)?.replicas.clone();
            (from != to).then(|| PlannedMove {
                topic,
                id: meta.id.clone(),
                partition,
                from,
                to,
                shrink: false,
            })
        })
        .collect()
}

/// The moves that take every replica off `node` (see the module doc).
pub fn drain(metadata: &Metadata, node: u64, force: bool) -> Result<Vec<PlannedMove>, PlanError> {
    if !metadata.nodes.contains_key(&node) {
        return Err(PlanError::UnknownNode(node));
    }
    let live: Vec<u64> = metadata
        .live_nodes()
        .into_iter()
        .filter(|n| *n != node)
        .collect();
    let mut counts = replica_counts(metadata, &live);
    let mut moves = Vec::new();
    for (name, topic) in &metadata.topics {
        for (number, partition) in topic.partitions.iter().enumerate() {
            if !partition.replicas.contains(&node) || partition.moving.is_some() {
                continue;
            }
            let target = counts
                .iter()
                .filter(|(n, _)| !partition.replicas.contains(n))
                .min_by_key(|(n, c)| (**c, **n))
                .map(|(n, _)| *n);
            let (to, shrink) = match target {
                Some(target) => {
                    *counts.entry(target).or_default() += 1;
                    let to = partition
                        .replicas
                        .iter()
                        .map(|n| if *n == node { target } else { *n })
                        .collect();
                    (to, false)
                }
                None if partition.replicas.len() == 1 => {
                    return Err(PlanError::LastReplica {
                        node,
                        topic: name.clone(),
                        partition: number as u32,
                    })
                }
                None if force => (
                    partition
                        .replicas
                        .iter()
                        .copied()
                        .filter(|n| *n != node)
                        .collect(),
                    true,
                ),
                None => {
                    return Err(PlanError::TooFewNodes {
                        node,
                        topic: name.clone(),
                        partition: number as u32,
                        factor: topic.replication_factor,
                        live,
                    })
                }
            };
            moves.push(PlannedMove {
                topic: name.clone(),
                id: topic.id.clone(),
                partition: number as u32,
                from: partition.replicas.clone(),
                to,
                shrink,
            });
        }
    }
    Ok(moves)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::metadata::Command;

    fn cluster(nodes: u64, topics: &[(&str, u32, u32)]) -> Metadata {
        let mut metadata = Metadata::default();
        for id in 1..=nodes {
            metadata
                .apply(&Command::RegisterNode {
                    id,
                    address: format!("127.0.0.1:{}", 7000 + id),
                    at_ms: 1,
                    dir_id: format!("d{id}"),
                })
                .unwrap();
        }
        for (name, partitions, factor) in topics {
            metadata
                .apply(&Command::CreateTopic {
                    name: name.to_string(),
                    id: format!("{name}-id"),
                    partitions: *partitions,
                    replication_factor: *factor,
                    settings: String::new(),
                })
                .unwrap();
        }
        metadata
    }

    fn apply_all(metadata: &mut Metadata, moves: &[PlannedMove]) {
        for m in moves {
            metadata
                .apply(&Command::Reassign {
                    topic: m.topic.clone(),
                    id: m.id.clone(),
                    partition: m.partition,
                    replicas: m.to.clone(),
                    throttle_bytes_per_sec: 0,
                    shrink: m.shrink,
                })
                .unwrap();
            // Single replicas are fenced before they complete (refused for the others).
            let _ = metadata.apply(&Command::FenceMove {
                topic: m.topic.clone(),
                id: m.id.clone(),
                partition: m.partition,
                target: m.to.clone(),
            });
            metadata
                .apply(&Command::CompleteMove {
                    topic: m.topic.clone(),
                    id: m.id.clone(),
                    partition: m.partition,
                    replicas: m.to.clone(),
                })
                .unwrap();
        }
    }

    fn spread(metadata: &Metadata) -> (BTreeMap<u64, usize>, BTreeMap<u64, usize>) {
        let mut replicas = BTreeMap::new();
        let mut firsts = BTreeMap::new();
        for p in metadata.topics.values().flat_map(|t| &t.partitions) {
            for n in &p.replicas {
                *replicas.entry(*n).or_insert(0) += 1;
            }
            *firsts.entry(p.replicas[0]).or_insert(0) += 1;
        }
        (replicas, firsts)
    }

    #[test]
    fn given_a_new_node_rebalance_should_give_it_its_share_of_replicas_and_leaders() {
        let mut metadata = cluster(3, &[("a", 6, 3), ("b", 6, 1)]);
        metadata
            .apply(&Command::RegisterNode {
                id: 4,
                address: "127.0.0.1:7004".into(),
                at_ms: 2,
                dir_id: "d4".into(),
            })
            .unwrap();
        let moves = rebalance(&metadata);
        assert!(!moves.is_empty());
        apply_all(&mut metadata, &moves);
        let (replicas, firsts) = spread(&metadata);
        // 6 x 3 + 6 x 1 = 24 replicas over 4 nodes: 6 each; 12 first replicas: 3 each.
        assert_eq!(replicas.values().copied().collect::<Vec<_>>(), vec![6; 4]);
        assert_eq!(firsts.values().copied().collect::<Vec<_>>(), vec![3; 4]);
        // Balanced: nothing more to do.
        assert_eq!(rebalance(&metadata), Vec::new());
    }

    #[test]
    fn given_a_node_to_drain_should_move_its_replicas_or_refuse_when_too_few_remain() {
        let mut metadata = cluster(4, &[("a", 4, 3), ("b", 2, 1)]);
        let moves = drain(&metadata, 2, false).unwrap();
        apply_all(&mut metadata, &moves);
        assert!(metadata
            .topics
            .values()
            .flat_map(|t| &t.partitions)
            .all(|p| !p.replicas.contains(&2)));
        metadata.apply(&Command::RemoveNode { id: 2 }).unwrap();
        // 3 nodes left, R = 3: draining another is refused, forced it shrinks.
        let error = drain(&metadata, 3, false).unwrap_err();
        assert!(matches!(error, PlanError::TooFewNodes { .. }), "{error}");
        let forced = drain(&metadata, 3, true).unwrap();
        assert!(forced
            .iter()
            .filter(|m| m.topic == "a")
            .all(|m| m.shrink && m.to.len() == 2 && !m.to.contains(&3)));
        assert_eq!(drain(&metadata, 9, false), Err(PlanError::UnknownNode(9)));
    }

    #[test]
    fn given_a_single_replica_on_the_last_node_drain_should_refuse() {
        let metadata = cluster(1, &[("a", 1, 1)]);
        assert!(matches!(
            drain(&metadata, 1, true),
            Err(PlanError::LastReplica { .. })
        ));
    }
}
