//! The registry's part in a cluster: a new topic's `topic.toml` text for the controller to
//! commit, a topic the controller placed (this node's partitions, placeholders for the others),
//! and pointing those placeholders at their current leaders. Called by `cluster::reconcile`.

use super::*;

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
}
