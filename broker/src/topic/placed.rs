//! The registry's part in a cluster: a new topic's `topic.toml` text for the controller to
//! commit, a topic the controller placed (this node's partitions, placeholders for the others),
//! pointing those placeholders at their current leaders, and a partition moving onto or off
//! this node (a reassignment). Called by `cluster::reconcile`.
//!
//! A partition made local by a move gets a `moved-in` marker file in its directory (no dot:
//! the log's open skips it): its replica must never initialize its Raft group with the
//! metadata's replica set (it waits for the leader to add it), even when it is listed among
//! the replicas by the time it starts (a restart after the move completed).
//!
//! Fault model of a move: onto this node, the partition's directory is made (a leftover of an
//! earlier copy is removed first) before `topic.toml` lists it as local, so a crash between
//! leaves a directory that is not listed and that the next move onto the node replaces. Off
//! this node, `topic.toml` stops listing it first, then the directory is renamed away and
//! removed: a crash leaves an unlisted directory, never a listed partition without its log.
//!
//! A partition of one replica moves by copy (`cluster::copy`): its verified copy
//! (`DATA_DIR/~copy-in-<topic id>-<partition>/`, holding [`COPY_VERIFIED`]) is renamed to the
//! partition's directory, which is listed, opened, and only then loses the marker: a crash
//! anywhere leaves the copy, or a directory that still says it is the verified copy, and the
//! next pass finishes. Without a verified copy the partition is not made local at all (an
//! empty log would lose the partition's records).

use super::*;

/// The file marking a partition whose replica a move made (see the module doc).
pub const MOVED_IN_MARKER: &str = "moved-in";
/// In a single replica's copy: present once it verified (see the module doc).
pub const COPY_VERIFIED: &str = "copy-verified";
/// In a single replica's copy: the bytes it holds of each file (`cluster::copy`).
pub const COPY_HAVE: &str = "copy-have.json";

impl Registry {
    /// A new topic's `topic.toml` text and its fresh incarnation id, for a cluster's
    /// controller to place (every node then creates it with [`Registry::create_placed`]).
    pub fn new_topic_text(
        &self,
        name: &str,
        settings: &TopicSettings,
    ) -> Result<(TopicId, String), BrokerError> {
        let id = TopicId::random()?;
        let text = toml::to_string(&self.new_meta(name, settings, id)).map_err(|e| {
            BrokerError::InvalidRequest(format!("cannot encode topic metadata: {e}"))
        })?;
        Ok((id, text))
    }

    /// Creates a topic the cluster placed: `text` is its `topic.toml` as the controller
    /// committed it; this node holds the partitions `local`, and `remote` names the leaders of
    /// the others. Idempotent: the same incarnation already here is returned as it is.
    pub async fn create_placed(
        &self,
        name: &str,
        text: &str,
        local: Vec<u32>,
        remote: &BTreeMap<u32, RemoteLeader>,
    ) -> Result<Arc<Topic>, BrokerError> {
        let mut meta: TopicMeta = toml::from_str(text).map_err(|e| {
            BrokerError::InvalidRequest(format!("the controller's topic settings: {e}"))
        })?;
        if meta.name != name {
            return Err(BrokerError::InvalidRequest(format!(
                "the controller's settings for topic `{name}` name `{}`",
                meta.name
            )));
        }
        if name != crate::group::offsets::OFFSETS_TOPIC {
            validate_topic_name(name)?;
        }
        if let Ok(existing) = self.get(&meta.name) {
            if meta.id.as_deref() == Some(existing.id.to_string().as_str()) {
                return Ok(existing);
            }
        }
        meta.local_partitions = Some(local);
        self.create_meta(meta, remote).await
    }

    /// Points the placeholders of partitions held elsewhere at their current leaders.
    pub fn set_remote_leaders(&self, name: &str, leaders: &BTreeMap<u32, RemoteLeader>) {
        let mut topics = self.topics.write();
        let Some(topic) = topics.get(name) else {
            return;
        };
        let stale = topic.partitions.iter().any(|p| {
            p.remote_leader()
                .is_some_and(|now| leaders.get(&p.id).is_some_and(|want| want != now))
        });
        if !stale {
            return;
        }
        let partitions = topic
            .partitions
            .iter()
            .map(|p| match (p.remote_leader(), leaders.get(&p.id)) {
                (Some(_), Some(leader)) => Arc::new(Partition::remote(
                    topic.name.clone(),
                    p.id,
                    topic.settings.partitions,
                    leader.clone(),
                )),
                _ => p.clone(),
            })
            .collect();
        let updated = Arc::new(Topic {
            name: topic.name.clone(),
            id: topic.id,
            legacy_offsets: topic.legacy_offsets,
            settings: topic.settings.clone(),
            partitions,
            deleted: AtomicBool::new(false),
        });
        topics.insert(name.to_string(), updated);
    }

    /// Makes partition `partition` of topic `name` local (a replica moved onto this node): its
    /// directory and an empty log, listed in `topic.toml`. Returns the partition.
    pub async fn add_local_partition(
        &self,
        name: &str,
        partition: u32,
        copied: Option<PathBuf>,
    ) -> Result<Arc<Partition>, BrokerError> {
        let _admin = self.admin.lock().await;
        let topic = self.get(name)?;
        let current = topic.partition(partition)?.clone();
        if current.remote_leader().is_none() {
            return Ok(current);
        }
        let path = self.config.data_dir.join(name);
        let dir = path.join(partition.to_string());
        let config = self.config.clone();
        let options = self.log_options.clone();
        let epochs = self.producer_epochs.clone();
        let settings = topic.settings.clone();
        let topic_name = topic.name.clone();
        let from_copy = copied.is_some().then(|| path.join(partition.to_string()));
        let opened = tokio::task::spawn_blocking(move || -> Result<Partition, BrokerError> {
            match &copied {
                // A single replica's verified copy becomes the partition's directory (still
                // marked verified, so that a crash before the listing below keeps it).
                Some(copy) if copy.join(COPY_VERIFIED).exists() => {
                    if dir.exists() {
                        std::fs::remove_dir_all(&dir)
                            .map_err(|e| BrokerError::io("removing", &dir, e))?;
                    }
                    std::fs::rename(copy, &dir)
                        .map_err(|e| BrokerError::io("moving a partition copy to", &dir, e))?;
                    sync_dir(&path)?;
                    if let Some(data_dir) = copy.parent() {
                        sync_dir(data_dir)?;
                    }
                }
                Some(_) if dir.join(COPY_VERIFIED).exists() => {}
                Some(copy) => {
                    return Err(BrokerError::InvalidRequest(format!(
                        "partition {partition} of topic `{topic_name}` is placed here, but its \
                         copy ({}) has not verified",
                        copy.display()
                    )))
                }
                None => {
                    if dir.exists() {
                        std::fs::remove_dir_all(&dir)
                            .map_err(|e| BrokerError::io("removing", &dir, e))?;
                    }
                    std::fs::create_dir(&dir).map_err(|e| BrokerError::io("creating", &dir, e))?;
                    write_synced(&dir.join(MOVED_IN_MARKER), b"")?;
                    sync_dir(&dir)?;
                    sync_dir(&path)?;
                }
            }
            list_local(&path, settings.partitions, partition, true)?;
            let opener = PartitionOpener {
                config: &config,
                options: &options,
                epochs: &epochs,
                name: topic_name.clone(),
                path: &path,
                settings: &settings,
            };
            opener.open(partition).map_err(|source| BrokerError::Log {
                topic: topic_name.to_string(),
                partition,
                source,
            })
        })
        .await
        .map_err(|e| BrokerError::InvalidRequest(format!("partition open task failed: {e}")))??;
        if let Some(dir) = from_copy {
            for done in [COPY_VERIFIED, COPY_HAVE] {
                let _ = std::fs::remove_file(dir.join(done));
            }
            let _ = crate::log::file::sync_dir(&dir);
        }
        let opened = Arc::new(opened);
        self.replace_partition(&topic, opened.clone());
        tracing::info!(
            topic = name,
            partition,
            "a replica of the partition moved onto this node"
        );
        Ok(opened)
    }

    /// Makes partition `partition` of topic `name` a placeholder pointing at `leader` (this
    /// node's replica moved away): the replica stops, `topic.toml` stops listing it, and its
    /// directory is removed.
    pub async fn remove_local_partition(
        &self,
        name: &str,
        partition: u32,
        leader: RemoteLeader,
    ) -> Result<(), BrokerError> {
        let _admin = self.admin.lock().await;
        let topic = self.get(name)?;
        let current = topic.partition(partition)?.clone();
        if current.remote_leader().is_some() {
            return Ok(());
        }
        let placeholder = Arc::new(Partition::remote(
            topic.name.clone(),
            partition,
            topic.settings.partitions,
            leader,
        ));
        self.replace_partition(&topic, placeholder);
        current.close().await;
        drop(current);
        let path = self.config.data_dir.join(name);
        let dir = path.join(partition.to_string());
        let partitions = topic.settings.partitions;
        let sequence = self.sequence.fetch_add(1, Ordering::Relaxed);
        let data_dir = self.config.data_dir.clone();
        tokio::task::spawn_blocking(move || -> Result<(), BrokerError> {
            list_local(&path, partitions, partition, false)?;
            if dir.exists() {
                let doomed = data_dir.join(format!("~deleted-{}-{sequence}", now_ms()));
                std::fs::rename(&dir, &doomed).map_err(|e| BrokerError::io("renaming", &dir, e))?;
                sync_dir(&path)?;
                std::fs::remove_dir_all(&doomed)
                    .map_err(|e| BrokerError::io("removing", &doomed, e))?;
            }
            Ok(())
        })
        .await
        .map_err(|e| {
            BrokerError::InvalidRequest(format!("partition removal task failed: {e}"))
        })??;
        tracing::info!(
            topic = name,
            partition,
            "this node's replica of the partition moved away"
        );
        Ok(())
    }

    /// Swaps one partition of `topic` (the same incarnation) in the registry.
    fn replace_partition(&self, topic: &Arc<Topic>, partition: Arc<Partition>) {
        let mut topics = self.topics.write();
        let Some(now) = topics.get(topic.name.as_ref()) else {
            return;
        };
        if now.id != topic.id {
            return;
        }
        let partitions = now
            .partitions
            .iter()
            .map(|p| {
                if p.id == partition.id {
                    partition.clone()
                } else {
                    p.clone()
                }
            })
            .collect();
        let updated = Arc::new(Topic {
            name: now.name.clone(),
            id: now.id,
            legacy_offsets: now.legacy_offsets,
            settings: now.settings.clone(),
            partitions,
            deleted: AtomicBool::new(false),
        });
        topics.insert(topic.name.to_string(), updated);
    }
}

/// Lists partition `partition` in (`local`) or out of the local partitions of the topic at
/// `path` (of `partitions` partitions), in its `topic.toml` (written synced, then the directory
/// synced).
fn list_local(
    path: &Path,
    partitions: u32,
    partition: u32,
    local: bool,
) -> Result<(), BrokerError> {
    let mut meta = read_meta(path)?;
    let mut listed = meta
        .local_partitions
        .clone()
        .unwrap_or_else(|| (0..partitions).collect());
    listed.retain(|p| *p != partition);
    if local {
        listed.push(partition);
        listed.sort_unstable();
    }
    meta.local_partitions = Some(listed);
    let text = toml::to_string(&meta)
        .map_err(|e| BrokerError::InvalidRequest(format!("cannot encode topic metadata: {e}")))?;
    write_synced(&path.join(META_FILE), text.as_bytes())?;
    sync_dir(path)
}
