//! Committed offsets, stored in the internal compacted topic `__offsets`.
//!
//! Every commit is one batch of records appended to the `__offsets` partition its group hashes
//! to (a table: one partition on a single node, several spread over the nodes of a cluster,
//! each coordinating the groups of the partitions it holds) and acknowledged once durable; the compaction cleaner keeps the latest record per key, so the
//! topic stays as small as the number of committed partitions. On start the store replays the
//! topic (compacted: short) into memory; reads are served from memory.
//!
//! ## Record layout
//! ```text
//! key   = group bytes | 0x00 | topic bytes | 0x00 | partition u32 big-endian
//! value = protobuf `syncline.v1.CommittedOffset` (topic, partition, offset, metadata,
//!         commit_timestamp_ms, topic_id)
//! ```
//! `topic_id` is the id of the topic incarnation the offset was committed for
//! (`crate::topic::TopicId`). A topic deleted and created again under the same name has
//! another id, so the old incarnation's commits are simply not its: the coordinator answers
//! only commits the current incarnation owns ([`crate::topic::Topic::owns_commit`]). That
//! needs no write when a topic is deleted, so no crash between a delete and a cleanup can
//! resurrect a stale offset. Stale records stay in `__offsets` (one per group and partition at
//! most, after compaction) until the key is committed again; they are dropped from memory at
//! load and when their topic is deleted. Records written before ids existed have none: they
//! belong to the incarnation that got its id at the upgrade (`legacy_offsets`).
//! Group and topic names are `[A-Za-z0-9._-]`, so the separators are unambiguous. A key's
//! latest record wins; a record in the log at a higher `__offsets` offset always replaces one
//! at a lower offset, also when two commits' durability waits finish out of order.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use parking_lot::Mutex;
use prost::Message as _;
use syncline_proto::batch::Batches;
use syncline_proto::v1;

use crate::error::BrokerError;
use crate::partition::{Partition, PlainRecord};

/// The internal topic's name.
pub const OFFSETS_TOPIC: &str = "__offsets";

/// One committed offset and where its record sits in `__offsets`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    /// The next offset to read.
    pub offset: u64,
    /// Free text from the committer.
    pub metadata: String,
    /// When it was committed.
    pub timestamp_ms: i64,
    /// The topic incarnation it was committed for (empty: before topic ids existed).
    pub topic_id: String,
    /// Offset of its record in `__offsets` (newer records win).
    version: u64,
}

/// group -> (topic, partition) -> committed offset.
type Groups = HashMap<String, BTreeMap<(String, u32), Committed>>;

/// Committed offsets of one group, by (topic, partition).
pub type GroupOffsets = Vec<((String, u32), Committed)>;

/// The committed offsets of every group this node coordinates.
///
/// A group's commits live in the `__offsets` partition its name hashes to
/// ([`super::coordinator_partition`]); this node coordinates the groups of the partitions it
/// holds (all of them in a cluster of one). Partitions held elsewhere are placeholders that
/// answer NotLeader naming the coordinator.
#[derive(Debug, Default)]
pub struct OffsetStore {
    /// `__offsets`' partitions, by number (none until the topic exists on this node).
    partitions: parking_lot::RwLock<Vec<Arc<Partition>>>,
    /// The incarnation the partitions belong to.
    topic_id: parking_lot::RwLock<Option<crate::topic::TopicId>>,
    groups: Mutex<Groups>,
    /// Why a partition's committed offsets could not be loaded (interior corruption of
    /// `__offsets`): then its groups' commits and fetches are refused naming it, instead of
    /// the whole broker refusing to start or answering from a partial history.
    unavailable: Mutex<HashMap<u32, String>>,
    /// Replicated partitions: the term this node loaded each one's commits in (they are
    /// reloaded from the log the first time a group is served in each term it leads; see
    /// [`OffsetStore::partition_of`]). The lock is held across a load.
    loaded: Mutex<HashMap<u32, u64>>,
}

fn key(group: &str, topic: &str, partition: u32) -> Bytes {
    let mut key = BytesMut::with_capacity(group.len() + topic.len() + 6);
    key.put_slice(group.as_bytes());
    key.put_u8(0);
    key.put_slice(topic.as_bytes());
    key.put_u8(0);
    key.put_u32(partition);
    key.freeze()
}

fn parse_key(key: &[u8]) -> Option<(String, String, u32)> {
    let (rest, partition) = key.split_at(key.len().checked_sub(4)?);
    let rest = rest.strip_suffix(&[0])?;
    let split = rest.iter().position(|b| *b == 0)?;
    let group = std::str::from_utf8(&rest[..split]).ok()?;
    let topic = std::str::from_utf8(&rest[split + 1..]).ok()?;
    // Names end up in metrics labels unescaped: only what a commit could have written.
    let name_ok = |name: &str| {
        !name.is_empty()
            && name.len() <= 249
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    };
    if !name_ok(group) || !name_ok(topic) {
        return None;
    }
    let partition = u32::from_be_bytes(partition.try_into().ok()?);
    Some((group.to_string(), topic.to_string(), partition))
}

impl OffsetStore {
    /// Attaches the `__offsets` topic: loads the committed offsets of every partition held
    /// here that is not loaded yet (blocking reads). Another incarnation replaces the old one.
    pub fn attach(&self, topic: &crate::topic::Topic) {
        let same = *self.topic_id.read() == Some(topic.id);
        let before: Vec<Arc<Partition>> = if same {
            self.partitions.read().clone()
        } else {
            self.groups.lock().clear();
            self.unavailable.lock().clear();
            self.loaded.lock().clear();
            Vec::new()
        };
        for partition in &topic.partitions {
            let loaded_before = before
                .get(partition.id as usize)
                .is_some_and(|old| Arc::ptr_eq(old, partition));
            // A replicated partition loads when this node first serves it as leader.
            if loaded_before || partition.remote_leader().is_some() || partition.is_replicated() {
                continue;
            }
            match load(partition) {
                Ok(groups) => self.groups.lock().extend(groups),
                Err(error) => {
                    tracing::error!(partition = partition.id, %error, "committed offsets unavailable: {OFFSETS_TOPIC} cannot be loaded");
                    self.unavailable
                        .lock()
                        .insert(partition.id, error.to_string());
                }
            }
        }
        *self.partitions.write() = topic.partitions.clone();
        *self.topic_id.write() = Some(topic.id);
    }

    /// The `__offsets` partition of `group`, if this node coordinates it: else NotLeader
    /// naming the node that does, or UNAVAILABLE while `__offsets` does not exist yet.
    pub fn partition_of(&self, group: &str) -> Result<Arc<Partition>, BrokerError> {
        let partitions = self.partitions.read();
        if partitions.is_empty() {
            return Err(BrokerError::ControllerUnavailable {
                reason: format!("{OFFSETS_TOPIC} is not created yet: the cluster is starting"),
            });
        }
        let id = super::coordinator_partition(group, partitions.len() as u32)?;
        let partition = partitions[id as usize].clone();
        let count = partitions.len() as u32;
        drop(partitions);
        if let Some(leader) = partition.remote_leader() {
            return Err(BrokerError::NotLeader {
                topic: OFFSETS_TOPIC.to_string(),
                partition: id,
                leader: leader.clone(),
            });
        }
        if partition.is_replicated() {
            self.ensure_current(&partition, count)?;
        }
        Ok(partition)
    }

    /// A replicated `__offsets` partition is this node's to serve only while it leads the
    /// partition's group; the commits in memory are those of the last term it led, so the
    /// first call in a new term reloads them from the log (which by then holds everything
    /// committed under earlier leaders). Commits of this term are published only after that
    /// load (the lock is held across it), so none is lost to it.
    fn ensure_current(&self, partition: &Arc<Partition>, count: u32) -> Result<(), BrokerError> {
        partition.check_leader()?;
        let term = partition.serving_term().unwrap_or(0);
        let mut loaded = self.loaded.lock();
        if loaded.get(&partition.id) == Some(&term) {
            return Ok(());
        }
        let groups = load(partition)?;
        let mut map = self.groups.lock();
        map.retain(|group, _| {
            super::coordinator_partition(group, count).ok() != Some(partition.id)
        });
        map.extend(groups);
        self.unavailable.lock().remove(&partition.id);
        loaded.insert(partition.id, term);
        Ok(())
    }

    fn partition_for(&self, group: &str) -> Result<Arc<Partition>, BrokerError> {
        let partition = self.partition_of(group)?;
        if let Some(reason) = self.unavailable.lock().get(&partition.id) {
            return Err(BrokerError::Fenced {
                topic: OFFSETS_TOPIC.to_string(),
                partition: partition.id,
                reason: reason.clone(),
            });
        }
        Ok(partition)
    }
}

/// Reads every committed offset of one `__offsets` partition.
fn load(partition: &Arc<Partition>) -> Result<Groups, BrokerError> {
    {
        let log = partition.log()?.clone();
        let mut groups = Groups::new();
        let end = log.end_offset();
        let mut offset = log.start_offset();
        let mut records = 0u64;
        while offset < end {
            let read = log
                .read_up_to(offset, 4 * 1024 * 1024, end)
                .map_err(|e| partition.log_error(e))?;
            if read.bytes.is_empty() {
                break;
            }
            for batch in Batches::new(read.bytes.clone()) {
                let batch = batch.map_err(|e| {
                    BrokerError::InvalidRequest(format!("{OFFSETS_TOPIC}: stored batch: {e}"))
                })?;
                for record in batch.records() {
                    let record = record.map_err(|e| {
                        BrokerError::InvalidRequest(format!("{OFFSETS_TOPIC}: stored record: {e}"))
                    })?;
                    let Some((group, topic, p)) = record.key.as_deref().and_then(parse_key) else {
                        tracing::warn!(
                            offset = record.offset,
                            "skipping an {OFFSETS_TOPIC} record with an unreadable key"
                        );
                        continue;
                    };
                    records += 1;
                    match record.value {
                        None => {
                            if let Some(map) = groups.get_mut(&group) {
                                map.remove(&(topic, p));
                            }
                        }
                        Some(value) => match v1::CommittedOffset::decode(value) {
                            Ok(value) => {
                                groups.entry(group).or_default().insert(
                                    (topic, p),
                                    Committed {
                                        offset: value.offset,
                                        metadata: value.metadata,
                                        timestamp_ms: value.commit_timestamp_ms,
                                        topic_id: value.topic_id,
                                        version: record.offset,
                                    },
                                );
                            }
                            Err(error) => {
                                tracing::warn!(offset = record.offset, %error, "skipping an unreadable {OFFSETS_TOPIC} value");
                            }
                        },
                    }
                }
            }
            offset = read.next_offset;
        }
        groups.retain(|_, map| !map.is_empty());
        tracing::info!(
            partition = partition.id,
            groups = groups.len(),
            records,
            "loaded committed offsets from {OFFSETS_TOPIC}"
        );
        Ok(groups)
    }
}

impl OffsetStore {
    pub fn append(
        &self,
        group: &str,
        commits: &[v1::OffsetCommit],
        topic_ids: &[String],
        now_ms: i64,
    ) -> Result<crate::partition::Submitted, BrokerError> {
        let partition = self.partition_for(group)?;
        if commits.is_empty() {
            return Err(BrokerError::InvalidRequest(
                "a commit with no offsets".into(),
            ));
        }
        let records: Vec<PlainRecord> = commits
            .iter()
            .zip(topic_ids)
            .map(|(c, topic_id)| PlainRecord {
                key: Some(key(group, &c.topic, c.partition)),
                value: Some(Bytes::from(
                    v1::CommittedOffset {
                        topic: c.topic.clone(),
                        partition: c.partition,
                        offset: c.offset,
                        metadata: c.metadata.clone(),
                        commit_timestamp_ms: now_ms,
                        topic_id: topic_id.clone(),
                    }
                    .encode_to_vec(),
                )),
                headers: Vec::new(),
                timestamp_ms: now_ms,
            })
            .collect();
        partition.submit_records(&records, None, &[], now_ms)
    }

    /// Waits until an [`OffsetStore::append`] is durable (committed, when `__offsets` is
    /// replicated), then publishes its commits.
    pub async fn publish(
        &self,
        group: &str,
        commits: &[v1::OffsetCommit],
        topic_ids: &[String],
        submitted: crate::partition::Submitted,
        now_ms: i64,
    ) -> Result<(), BrokerError> {
        if commits.is_empty() {
            return Ok(());
        }
        let partition = self.partition_for(group)?;
        let appended = partition.acknowledged(submitted, true).await?;
        let mut groups = self.groups.lock();
        let map = groups.entry(group.to_string()).or_default();
        for (i, (c, topic_id)) in commits.iter().zip(topic_ids).enumerate() {
            let version = appended.base_offset + i as u64;
            let entry = map.entry((c.topic.clone(), c.partition));
            let fresh = Committed {
                offset: c.offset,
                metadata: c.metadata.clone(),
                timestamp_ms: now_ms,
                topic_id: topic_id.clone(),
                version,
            };
            match entry {
                std::collections::btree_map::Entry::Occupied(mut slot) => {
                    if slot.get().version < version {
                        slot.insert(fresh);
                    }
                }
                std::collections::btree_map::Entry::Vacant(slot) => {
                    slot.insert(fresh);
                }
            }
        }
        metrics::counter!(crate::metrics::OFFSET_COMMITS_TOTAL).increment(commits.len() as u64);
        Ok(())
    }

    /// The committed offsets of `group` (all of them when `only` is empty).
    pub fn fetch(&self, group: &str, only: &[(String, u32)]) -> Result<GroupOffsets, BrokerError> {
        self.partition_for(group)?;
        let groups = self.groups.lock();
        let Some(map) = groups.get(group) else {
            return Ok(Vec::new());
        };
        if only.is_empty() {
            return Ok(map.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
        }
        Ok(only
            .iter()
            .filter_map(|k| map.get(k).map(|v| (k.clone(), v.clone())))
            .collect())
    }

    /// Groups with at least one committed offset.
    pub fn groups(&self) -> Vec<String> {
        self.groups.lock().keys().cloned().collect()
    }

    /// Drops from memory every committed offset that `current` (topic name, topic id of the
    /// commit) says belongs to no live topic incarnation. The records stay in `__offsets` and
    /// are ignored (see the module doc).
    pub fn forget_stale(&self, current: impl Fn(&str, &str) -> bool) -> usize {
        let mut groups = self.groups.lock();
        let mut dropped = 0;
        for map in groups.values_mut() {
            let before = map.len();
            map.retain(|(topic, _), committed| current(topic, &committed.topic_id));
            dropped += before - map.len();
        }
        groups.retain(|_, map| !map.is_empty());
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_key_when_parsed_should_give_back_its_parts() {
        let k = key("g.1", "orders-eu", 7);
        assert_eq!(parse_key(&k), Some(("g.1".into(), "orders-eu".into(), 7)));
        // A partition whose big-endian bytes contain zeros still parses.
        let k = key("g", "t", 0x0001_0000);
        assert_eq!(parse_key(&k), Some(("g".into(), "t".into(), 0x0001_0000)));
        assert_eq!(parse_key(b"no-separators"), None);
        assert_eq!(parse_key(b""), None);
        // Names a commit could not have written (they would break metrics labels).
        assert_eq!(parse_key(&key("evil\"} 1\n", "t", 0)), None);
        assert_eq!(parse_key(&key("", "t", 0)), None);
    }
}
