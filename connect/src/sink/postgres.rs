//! The PostgreSQL sink (being written).

use super::SinkRecord;
use crate::config::SinkConfig;

pub struct PostgresTarget;

impl PostgresTarget {
    pub async fn open(config: &SinkConfig) -> anyhow::Result<PostgresTarget> {
        anyhow::bail!(
            "sink {:?}: kind = \"postgres\" is not available yet",
            config.name
        )
    }

    pub async fn apply(&mut self, _batch: &[SinkRecord]) -> anyhow::Result<()> {
        Ok(())
    }
}
