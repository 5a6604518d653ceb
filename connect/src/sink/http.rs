//! The HTTP sink (being written).

use super::SinkRecord;
use crate::config::SinkConfig;
use crate::runtime::Context;

pub struct HttpTarget;

impl HttpTarget {
    pub async fn open(config: &SinkConfig, _ctx: &Context) -> anyhow::Result<HttpTarget> {
        anyhow::bail!(
            "sink {:?}: kind = \"http\" is not available yet",
            config.name
        )
    }

    pub async fn apply(&mut self, _batch: &[SinkRecord]) -> anyhow::Result<()> {
        Ok(())
    }
}
