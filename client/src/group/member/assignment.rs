//! Taking on an assignment: starting a reader per new partition at its committed offset (or
//! where the reset policy says), revoking partitions that left it (commit first), dropping
//! every partition when the coordinator forgot the member.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use syncline_proto::v1;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tonic::Code;

use super::{Member, Reader};
use crate::admin::OffsetQuery;
use crate::consumer::{OffsetReset, PartitionReader};
use crate::error::{Error, Result};
use crate::group::buffer::Owned;
use crate::group::{key_of, partition_of, GroupEvent, Key, ASSIGNED_PARTITIONS_MAX};
use crate::group_admin::{TopicPartition, OFFSETS_PER_REQUEST_MAX};

/// Start-offset lookups (ListOffsets) in flight while a new assignment is taken on.
const RESET_LOOKUPS_IN_FLIGHT: usize = 32;

impl Member {
    /// Moves to `assignment`: releases what left it (commit first), starts what joined it.
    /// Returns whether anything was released (then the next heartbeat should go at once).
    pub(super) async fn reconcile(&mut self, assignment: Vec<TopicPartition>) -> Result<bool> {
        if assignment.len() > ASSIGNED_PARTITIONS_MAX {
            return Err(Error::Protocol(format!(
                "the coordinator assigned {} partitions, more than the maximum of \
                 {ASSIGNED_PARTITIONS_MAX} one member reads",
                assignment.len()
            )));
        }
        let target: BTreeSet<Key> = assignment.iter().map(key_of).collect();
        let revoked: BTreeSet<Key> = self
            .readers
            .keys()
            .filter(|key| !target.contains(*key))
            .cloned()
            .collect();
        if !revoked.is_empty() {
            self.revoke(&revoked).await;
        }
        let added: Vec<Key> = target
            .into_iter()
            .filter(|key| !self.readers.contains_key(key))
            .collect();
        if !added.is_empty() {
            self.start_reading(added).await?;
        }
        Ok(!revoked.is_empty())
    }

    /// Stops reading `keys` and commits what was handed out of them.
    pub(super) async fn revoke(&mut self, keys: &BTreeSet<Key>) {
        let released = self.shared.release(keys);
        let mut offsets = Vec::new();
        for (key, processed) in released {
            if let Some(reader) = self.readers.remove(&key) {
                if let Some(task) = reader.task {
                    task.abort();
                }
                if processed > reader.committed {
                    offsets.push(v1::OffsetCommit {
                        topic: key.0.to_string(),
                        partition: key.1,
                        offset: processed,
                        ..Default::default()
                    });
                }
            }
        }
        // Readers whose entry was already gone (none expected): forget them too.
        for key in keys {
            if let Some(reader) = self.readers.remove(key) {
                if let Some(task) = reader.task {
                    task.abort();
                }
            }
        }
        if !offsets.is_empty() {
            if let Err(error) = self.send_commit(offsets).await {
                // At least once: the next owner reads again from the previous commit.
                tracing::warn!(group = %self.group, %error, "commit of revoked partitions failed");
            }
        }
        let partitions: Vec<TopicPartition> = keys.iter().map(partition_of).collect();
        tracing::info!(group = %self.group, ?partitions, "partitions revoked");
        let _ = self.events.send(GroupEvent::Revoked(partitions));
    }

    /// Drops every partition without committing (the coordinator forgot the member).
    pub(super) fn lose_all(&mut self) {
        let keys: BTreeSet<Key> = self.readers.keys().cloned().collect();
        self.shared.release(&keys);
        for (_, reader) in std::mem::take(&mut self.readers) {
            if let Some(task) = reader.task {
                task.abort();
            }
        }
        self.joined = false;
        if !keys.is_empty() {
            let _ = self
                .events
                .send(GroupEvent::Lost(keys.iter().map(partition_of).collect()));
        }
    }

    /// Looks up where each new partition starts and starts its reader. Partitions whose start
    /// cannot be found now (a transient error) are not taken: they stay out of `owned` and the
    /// next heartbeat tries again.
    pub(super) async fn start_reading(&mut self, added: Vec<Key>) -> Result<()> {
        let partitions: Vec<TopicPartition> = added.iter().map(partition_of).collect();
        // An assignment may hold more partitions than one lookup carries.
        let mut committed = Vec::new();
        for chunk in partitions.chunks(OFFSETS_PER_REQUEST_MAX) {
            match self.client.fetch_offsets(&self.group, Some(chunk)).await {
                Ok(offsets) => committed.extend(offsets),
                Err(error) if error.is_transient() => {
                    tracing::warn!(group = %self.group, %error, "cannot fetch committed offsets; will retry");
                    return Ok(());
                }
                Err(error) => return Err(error),
            }
        }
        let committed: HashMap<Key, u64> = committed
            .into_iter()
            .map(|offset| {
                (
                    (Arc::from(offset.topic.as_str()), offset.partition),
                    offset.offset,
                )
            })
            .collect();
        // Start offsets of partitions without a commit, looked up concurrently: a big
        // assignment must not hold the heartbeat for one round trip per partition.
        let missing: Vec<Key> = added
            .iter()
            .filter(|key| !committed.contains_key(*key))
            .cloned()
            .collect();
        let mut resets: HashMap<Key, Result<Option<u64>>> = {
            use futures::stream::StreamExt as _;
            let this = &*self;
            futures::stream::iter(missing)
                .map(|key| async move {
                    let start = this.reset_position(&key).await;
                    (key, start)
                })
                .buffer_unordered(RESET_LOOKUPS_IN_FLIGHT)
                .collect()
                .await
        };
        let mut started = Vec::new();
        for key in added {
            let start = match committed.get(&key) {
                Some(&offset) => Some(offset),
                None => match resets.remove(&key).unwrap_or(Ok(None)) {
                    Ok(start) => start,
                    Err(error) if error.is_transient() => {
                        tracing::warn!(group = %self.group, %error, "cannot look up a start offset; will retry");
                        continue;
                    }
                    Err(error) => return Err(error),
                },
            };
            self.next_token += 1;
            let token = self.next_token;
            let processed = start.unwrap_or(0);
            self.shared.lock().owned.insert(
                key.clone(),
                Owned {
                    token,
                    processed,
                    handed_out: processed,
                },
            );
            let task = match start {
                Some(offset) => Some(self.spawn_reader(key.clone(), token, offset)),
                None => {
                    let error = Error::Broker {
                        code: Code::NotFound,
                        message: format!(
                            "group {} has no committed offset for {}/{} and the offset reset \
                             policy is error",
                            self.group, key.0, key.1
                        ),
                    };
                    self.shared.lock().queue.push_back(Err(error));
                    self.shared.records_ready.notify_one();
                    None
                }
            };
            tracing::debug!(group = %self.group, topic = %key.0, partition = key.1, ?start, "reading partition");
            self.readers.insert(
                key.clone(),
                Reader {
                    token,
                    task,
                    committed: processed,
                },
            );
            started.push(partition_of(&key));
        }
        if !started.is_empty() {
            tracing::info!(group = %self.group, partitions = ?started, "partitions assigned");
            let _ = self.events.send(GroupEvent::Assigned(started));
        }
        Ok(())
    }

    /// Where a partition without a committed offset starts; `None` under
    /// [`OffsetReset::Error`].
    pub(super) async fn reset_position(&self, key: &Key) -> Result<Option<u64>> {
        let query = match self.config.offset_reset {
            OffsetReset::Earliest => OffsetQuery::Earliest,
            OffsetReset::Latest => OffsetQuery::Latest,
            OffsetReset::Error => return Ok(None),
        };
        let listed = self.client.list_offsets(&key.0, key.1, query).await?;
        Ok(Some(listed.offset))
    }

    pub(super) fn spawn_reader(&mut self, key: Key, token: u64, offset: u64) -> AbortHandle {
        let (sender, mut messages) = mpsc::channel(1);
        let reader = PartitionReader {
            client: self.client.clone(),
            topic: Arc::clone(&key.0),
            partition: key.1,
            config: self.reader_config.clone(),
            sender,
        };
        let shared = Arc::clone(&self.shared);
        self.tasks.spawn(async move {
            let forward = async move {
                while let Some(message) = messages.recv().await {
                    if !shared.deliver(&key, token, message).await {
                        break;
                    }
                }
            };
            tokio::join!(reader.run_from_known(offset), forward);
        })
    }
}
