//! The member's offset commits: the processed positions of the partitions it reads, with its
//! id and epoch, in requests of at most [`OFFSETS_PER_REQUEST_MAX`].

use std::sync::Arc;

use syncline_proto::v1;

use super::{is_fenced, Member};
use crate::error::Result;
use crate::group::Key;
use crate::group_admin::OFFSETS_PER_REQUEST_MAX;

impl Member {
    /// Commits the processed position of every partition read that moved since its last
    /// commit.
    pub(super) async fn commit_processed(&mut self) -> Result<()> {
        if !self.joined {
            return Ok(());
        }
        let offsets: Vec<v1::OffsetCommit> = {
            let buffer = self.shared.lock();
            self.readers
                .iter()
                .filter_map(|(key, reader)| {
                    let owned = buffer.owned.get(key)?;
                    let offset = buffer.committable(key, owned);
                    (owned.token == reader.token && offset > reader.committed).then(|| {
                        v1::OffsetCommit {
                            topic: key.0.to_string(),
                            partition: key.1,
                            offset,
                            ..Default::default()
                        }
                    })
                })
                .collect()
        };
        if offsets.is_empty() {
            return Ok(());
        }
        match self.send_commit(offsets).await {
            Err(error) if is_fenced(&error) => {
                tracing::warn!(group = %self.group, %error, "commit refused; joining again");
                self.lose_all();
                Err(error)
            }
            other => other,
        }
    }

    /// Sends the commits with the member's id and epoch, in requests of at most
    /// [`OFFSETS_PER_REQUEST_MAX`]; on success records the positions.
    pub(super) async fn send_commit(&mut self, mut offsets: Vec<v1::OffsetCommit>) -> Result<()> {
        while offsets.len() > OFFSETS_PER_REQUEST_MAX {
            let rest = offsets.split_off(OFFSETS_PER_REQUEST_MAX);
            self.send_commit_request(std::mem::replace(&mut offsets, rest))
                .await?;
        }
        self.send_commit_request(offsets).await
    }

    pub(super) async fn send_commit_request(
        &mut self,
        offsets: Vec<v1::OffsetCommit>,
    ) -> Result<()> {
        let committed: Vec<(Key, u64)> = offsets
            .iter()
            .map(|offset| {
                (
                    (Arc::from(offset.topic.as_str()), offset.partition),
                    offset.offset,
                )
            })
            .collect();
        let request = v1::CommitOffsetsRequest {
            group: self.group.clone(),
            member_id: self.member_id.clone(),
            member_epoch: self.epoch,
            offsets,
        };
        self.call("CommitOffsets", |mut grpc| {
            let request = request.clone();
            async move { grpc.commit_offsets(request).await }
        })
        .await?;
        tracing::debug!(group = %self.group, offsets = committed.len(), "committed");
        for (key, offset) in committed {
            if let Some(reader) = self.readers.get_mut(&key) {
                reader.committed = reader.committed.max(offset);
            }
        }
        Ok(())
    }
}
