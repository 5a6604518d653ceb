//! Partition groups' Raft RPCs between nodes: `Peer.Replicate` on each node's advertised
//! address, over the one channel per peer address that the controller uses too ([`Peers`]),
//! so every group of a node pair shares one HTTP/2 connection. Append-entries carry their
//! entries as binary `RaftEntry` messages (a proposal's bytes as they are in the Raft log);
//! the rest of each request and every answer is serde-encoded. A snapshot goes on its own
//! client stream, `Peer.InstallSnapshot` (format, limits and checks in `snapshot.rs`).
//!
//! Heartbeats (appends without entries) have openraft's time limit (the heartbeat interval);
//! an append with entries at least [`APPEND_TTL_MIN`] plus its bytes at 8 MiB/s (the follower
//! fsyncs before it answers), and carries at most `raft_log::REPLICATION_READ_BYTES_MAX` of
//! records (what the log reader hands replication).
//!
//! Fault model: as the controller's network (`cluster::network`): no answer within the call's
//! time limit or a lost connection is Unreachable (openraft backs off and retries); a node of
//! another cluster, or one without the group, refuses the call, which openraft sees as a
//! network error naming it. A snapshot transfer has its own time limit, by its size
//! (`snapshot::transfer_timeout`; openraft's `install_snapshot_timeout` is meant for one chunk
//! of its own protocol): past it, with the receiver busy with another transfer of the group,
//! or with no image to send now, it is Unreachable (openraft backs off and asks for a new
//! snapshot); a transfer the receiver refused (a check failed) is a network error naming why
//! (openraft retries at once, then backs off).

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::v2::RaftNetworkV2;
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::{BasicNode, EntryPayload};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use syncline_proto::v1;

use super::state_machine::Snapshot;
use super::types::{log_id, term_of, Entry, LogId, PartitionRaft, Proposal, Vote};
use crate::cluster::network::Peers;

/// Entry kinds on the wire (and in the Raft log).
pub const KIND_BLANK: u32 = 0;
/// A proposal.
pub const KIND_NORMAL: u32 = 1;
/// A membership change (serde-encoded).
pub const KIND_MEMBERSHIP: u32 = 2;

/// Which group a call is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupId {
    /// The topic incarnation.
    pub topic_id: String,
    /// The partition.
    pub partition: u32,
}

impl std::fmt::Display for GroupId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.topic_id, self.partition)
    }
}

/// An append-entries request without its entries.
#[derive(Serialize, Deserialize)]
struct AppendHeader {
    vote: Vote,
    prev_log_id: Option<LogId>,
    leader_commit: Option<LogId>,
}

/// An entry as sent.
pub fn entry_to_wire(entry: &Entry) -> Result<v1::RaftEntry, String> {
    let (kind, payload) = match &entry.payload {
        EntryPayload::Blank => (KIND_BLANK, Bytes::new()),
        EntryPayload::Normal(proposal) => (KIND_NORMAL, proposal.to_bytes()),
        EntryPayload::Membership(membership) => (
            KIND_MEMBERSHIP,
            serde_json::to_vec(membership)
                .map_err(|e| format!("encoding a membership: {e}"))?
                .into(),
        ),
    };
    Ok(v1::RaftEntry {
        term: term_of(&entry.log_id),
        index: entry.log_id.index,
        kind,
        payload,
    })
}

/// An entry as received.
pub fn entry_from_wire(entry: v1::RaftEntry) -> Result<Entry, String> {
    let payload = match entry.kind {
        KIND_BLANK => EntryPayload::Blank,
        KIND_NORMAL => EntryPayload::Normal(
            Proposal::decode(entry.payload).map_err(|e| format!("entry {}: {e}", entry.index))?,
        ),
        KIND_MEMBERSHIP => EntryPayload::Membership(
            serde_json::from_slice(&entry.payload)
                .map_err(|e| format!("entry {}: membership: {e}", entry.index))?,
        ),
        other => return Err(format!("entry {}: unknown kind {other}", entry.index)),
    };
    Ok(Entry {
        log_id: log_id(entry.term, entry.index),
        payload,
    })
}

/// Makes a group's connections to its other replicas.
#[derive(Debug, Clone)]
pub struct GroupNetworkFactory {
    /// This node's cluster (a node of another cluster refuses the call).
    pub cluster_id: String,
    /// This node's id.
    pub me: u64,
    /// The group.
    pub group: GroupId,
    /// The shared channels.
    pub peers: Peers,
    /// The throttle on sends to replicas a move adds.
    pub throttle: std::sync::Arc<super::throttle::Throttle>,
}

impl RaftNetworkFactory<PartitionRaft> for GroupNetworkFactory {
    type Network = GroupConnection;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> GroupConnection {
        GroupConnection {
            factory: self.clone(),
            target,
            address: node.addr.clone(),
        }
    }
}

/// A group's connection to one other replica.
pub struct GroupConnection {
    factory: GroupNetworkFactory,
    target: u64,
    address: String,
}

fn network_error(message: String) -> RPCError<PartitionRaft> {
    RPCError::Network(NetworkError::from_string(message))
}

impl GroupConnection {
    async fn call<Resp: DeserializeOwned>(
        &mut self,
        kind: &str,
        header: Vec<u8>,
        entries: Vec<v1::RaftEntry>,
        ttl: Duration,
    ) -> Result<Resp, RPCError<PartitionRaft>> {
        let mut client = self
            .factory
            .peers
            .client(&self.address)
            .map_err(network_error)?;
        let call = client.replicate(v1::ReplicateRequest {
            cluster_id: self.factory.cluster_id.clone(),
            from: self.factory.me,
            topic_id: self.factory.group.topic_id.clone(),
            partition: self.factory.group.partition,
            kind: kind.to_string(),
            header: header.into(),
            entries,
        });
        let unreachable = |message: String| {
            RPCError::Unreachable(Unreachable::from_string(format!(
                "node {} at {}: {message}",
                self.target, self.address
            )))
        };
        let response = match tokio::time::timeout(ttl, call).await {
            Err(_) => {
                return Err(unreachable(format!(
                    "no answer to a {kind} of group {} within {ttl:?}",
                    self.factory.group
                )))
            }
            Ok(Err(status)) if status.code() == tonic::Code::Unavailable => {
                return Err(unreachable(status.message().to_string()))
            }
            Ok(Err(status)) => {
                return Err(network_error(format!(
                    "node {} at {}: {}",
                    self.target,
                    self.address,
                    status.message()
                )))
            }
            Ok(Ok(response)) => response.into_inner(),
        };
        let answer: Result<Resp, String> = serde_json::from_slice(&response.payload)
            .map_err(|e| network_error(format!("decoding a {kind} answer: {e}")))?;
        answer.map_err(|message| {
            network_error(format!(
                "node {} refused {kind} of group {}: {message}",
                self.target, self.factory.group
            ))
        })
    }

    async fn call_json<Req: Serialize, Resp: DeserializeOwned>(
        &mut self,
        kind: &str,
        request: &Req,
        ttl: Duration,
    ) -> Result<Resp, RPCError<PartitionRaft>> {
        let header = serde_json::to_vec(request)
            .map_err(|e| network_error(format!("encoding a {kind} request: {e}")))?;
        self.call(kind, header, Vec::new(), ttl).await
    }
}

/// Time an append carrying entries may take at least: openraft's limit (the heartbeat interval)
/// is meant for heartbeats; an append waits for the follower's fsync, and a busy machine's
/// fsync can take far longer than 100 ms. Too short a limit made a follower behind under load
/// time out on every append and never catch up.
pub const APPEND_TTL_MIN: Duration = Duration::from_secs(2);
/// The rate below which an append is given up (bytes per second): 8 MiB/s.
const APPEND_BYTES_PER_SEC_MIN: u64 = 8 * 1024 * 1024;

/// The time limit of an append of `bytes` bytes of entries (`ttl`, openraft's, for none).
fn append_ttl(ttl: Duration, bytes: usize) -> Duration {
    if bytes == 0 {
        return ttl;
    }
    let transfer = Duration::from_millis(bytes as u64 * 1000 / APPEND_BYTES_PER_SEC_MIN);
    ttl.max(APPEND_TTL_MIN + transfer)
}

impl RaftNetworkV2<PartitionRaft> for GroupConnection {
    type SnapshotData = super::snapshot::SnapshotImage;

    async fn append_entries(
        &mut self,
        request: AppendEntriesRequest<PartitionRaft>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<PartitionRaft>, RPCError<PartitionRaft>> {
        let header = AppendHeader {
            vote: request.vote,
            prev_log_id: request.prev_log_id,
            leader_commit: request.leader_commit,
        };
        let header = serde_json::to_vec(&header)
            .map_err(|e| network_error(format!("encoding an append: {e}")))?;
        let entries = request
            .entries
            .iter()
            .map(entry_to_wire)
            .collect::<Result<Vec<_>, _>>()
            .map_err(network_error)?;
        let bytes: usize = entries.iter().map(|e| e.payload.len()).sum();
        if let Some(rate) = self
            .factory
            .throttle
            .limit(&self.factory.group, self.target)
        {
            self.factory.throttle.take(rate, bytes as u64).await;
        }
        self.call(
            "append",
            header,
            entries,
            append_ttl(option.hard_ttl(), bytes),
        )
        .await
    }

    async fn vote(
        &mut self,
        request: VoteRequest<PartitionRaft>,
        option: RPCOption,
    ) -> Result<VoteResponse<PartitionRaft>, RPCError<PartitionRaft>> {
        self.call_json("vote", &request, option.hard_ttl()).await
    }

    async fn pre_vote(
        &mut self,
        request: VoteRequest<PartitionRaft>,
        option: RPCOption,
    ) -> Result<VoteResponse<PartitionRaft>, RPCError<PartitionRaft>> {
        self.call_json("pre_vote", &request, option.hard_ttl())
            .await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + openraft::OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<PartitionRaft>, StreamingError<PartitionRaft>> {
        let group = self.factory.group.clone();
        let unreachable = |message: String| {
            StreamingError::Unreachable(Unreachable::from_string(format!(
                "snapshot of group {group} to node {} at {}: {message}",
                self.target, self.address
            )))
        };
        let image = snapshot.snapshot;
        if let Some(reason) = image.unavailable_reason() {
            return Err(unreachable(format!("no image to send now: {reason}")));
        }
        let header = super::snapshot::TransferHeader {
            vote,
            meta: snapshot.meta,
            end_offset: image.end_offset(),
            files: image
                .files()
                .iter()
                .map(|f| super::snapshot::WireFile {
                    name: f.name.clone(),
                    len: f.len,
                })
                .collect(),
        };
        let header = serde_json::to_vec(&header).map_err(|e| {
            StreamingError::Network(NetworkError::from_string(format!(
                "encoding a snapshot header: {e}"
            )))
        })?;
        let first = v1::SnapshotChunk {
            cluster_id: self.factory.cluster_id.clone(),
            from: self.factory.me,
            topic_id: self.factory.group.topic_id.clone(),
            partition: self.factory.group.partition,
            header: header.into(),
            ..Default::default()
        };
        let bytes = image.bytes();
        let files = image.files().len();
        let mut limit = super::snapshot::transfer_timeout(bytes);
        let failure = std::sync::Arc::new(parking_lot::Mutex::new(None));
        let chunks = super::snapshot::chunks(first, image, failure.clone());
        // A replica a move adds gets its copy at the move's rate (and the time that takes).
        let throttle = self.factory.throttle.clone();
        let rate = throttle.limit(&self.factory.group, self.target);
        if let Some(rate) = rate {
            limit = limit.max(Duration::from_secs(30 + bytes * 2 / rate.max(1)));
        }
        let chunks = futures_util::StreamExt::then(chunks, move |chunk| {
            let throttle = throttle.clone();
            async move {
                if let Some(rate) = rate {
                    throttle.take(rate, chunk.data.len() as u64).await;
                }
                chunk
            }
        });
        let mut client = self
            .factory
            .peers
            .client(&self.address)
            .map_err(|e| StreamingError::Network(NetworkError::from_string(e)))?;
        tracing::info!(group = %self.factory.group, target = self.target, bytes, files, "sending a snapshot");
        let started = std::time::Instant::now();
        let call = tokio::time::timeout(limit, client.install_snapshot(chunks));
        let response = tokio::select! {
            closed = cancel => return Err(StreamingError::Closed(closed)),
            response = call => response,
        };
        let read_failure = failure.lock().take();
        let refused = |message: String| {
            let message = match &read_failure {
                Some(read) => format!("{message} (reading the image failed: {read})"),
                None => message,
            };
            StreamingError::Network(NetworkError::from_string(format!(
                "node {} refused a snapshot of group {}: {message}",
                self.target, self.factory.group
            )))
        };
        let response = match response {
            Err(_) => {
                return Err(unreachable(format!(
                    "not installed within {limit:?} ({bytes} bytes)"
                )))
            }
            Ok(Err(status)) if status.code() == tonic::Code::Unavailable => {
                return Err(unreachable(status.message().to_string()))
            }
            Ok(Err(status)) => return Err(refused(status.message().to_string())),
            Ok(Ok(response)) => response.into_inner(),
        };
        let answer: Result<SnapshotResponse<PartitionRaft>, String> =
            serde_json::from_slice(&response.payload)
                .map_err(|e| refused(format!("an answer that does not decode: {e}")))?;
        let answer = answer.map_err(refused)?;
        metrics::counter!(crate::metrics::REPLICATION_SNAPSHOTS_SENT_TOTAL).increment(1);
        tracing::info!(group = %self.factory.group, target = self.target, bytes, files, elapsed_ms = started.elapsed().as_millis() as u64, "snapshot sent and installed");
        Ok(answer)
    }

    async fn transfer_leader(
        &mut self,
        request: TransferLeaderRequest<PartitionRaft>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<PartitionRaft>, RPCError<PartitionRaft>> {
        self.call_json("transfer_leader", &request, option.hard_ttl())
            .await
    }
}

/// Serves one `Peer.InstallSnapshot` call on `group` after its first message (`header`):
/// receives and verifies the image (`snapshot::receive`), then hands it to openraft, which
/// installs it unless this replica already has what it holds. A refusal is an answer, not a
/// status: openraft's sender retries it.
pub async fn serve_snapshot<S>(
    group: &super::group::Group,
    header: &[u8],
    rest: S,
) -> Result<Vec<u8>, tonic::Status>
where
    S: futures_util::Stream<Item = Result<v1::SnapshotChunk, tonic::Status>> + Unpin,
{
    let Ok(_one) = group.receiving().try_lock() else {
        return Err(tonic::Status::unavailable(format!(
            "group {} is receiving another snapshot",
            group.id()
        )));
    };
    let encode = |answer: Result<SnapshotResponse<PartitionRaft>, String>| {
        serde_json::to_vec(&answer)
            .map_err(|e| tonic::Status::internal(format!("encoding a snapshot answer: {e}")))
    };
    let config = group
        .log_config()
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let started = std::time::Instant::now();
    let (vote, meta, image) =
        match super::snapshot::receive(group.raft_dir(), &config, header, rest).await {
            Ok(received) => received,
            Err(refusal) => {
                tracing::warn!(group = %group.id(), %refusal, "refused a snapshot");
                metrics::counter!(crate::metrics::REPLICATION_SNAPSHOTS_REFUSED_TOTAL).increment(1);
                return encode(Err(refusal));
            }
        };
    metrics::counter!(crate::metrics::REPLICATION_SNAPSHOT_BYTES_RECEIVED_TOTAL)
        .increment(image.bytes());
    tracing::info!(group = %group.id(), bytes = image.bytes(), files = image.files().len(), end = image.end_offset(), last_log_id = ?meta.last_log_id, elapsed_ms = started.elapsed().as_millis() as u64, "received and verified a snapshot");
    let snapshot = Snapshot {
        meta,
        snapshot: image,
    };
    encode(
        group
            .raft()
            .install_full_snapshot(vote, snapshot)
            .await
            .map_err(|e| e.to_string()),
    )
}

/// Serves one `Peer.Replicate` call on the group's Raft handle.
pub async fn serve(
    raft: &super::group::GroupRaft,
    request: v1::ReplicateRequest,
) -> Result<Vec<u8>, tonic::Status> {
    fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, tonic::Status> {
        serde_json::from_slice(payload).map_err(|e| {
            tonic::Status::invalid_argument(format!("a raft message that does not decode: {e}"))
        })
    }
    fn encode<T: Serialize, E: std::fmt::Display>(
        answer: Result<T, E>,
    ) -> Result<Vec<u8>, tonic::Status> {
        let answer = answer.map_err(|e| e.to_string());
        serde_json::to_vec(&answer)
            .map_err(|e| tonic::Status::internal(format!("encoding a raft answer: {e}")))
    }
    match request.kind.as_str() {
        "append" => {
            let header: AppendHeader = decode(&request.header)?;
            let entries = request
                .entries
                .into_iter()
                .map(entry_from_wire)
                .collect::<Result<Vec<_>, _>>()
                .map_err(tonic::Status::invalid_argument)?;
            let append = AppendEntriesRequest {
                vote: header.vote,
                prev_log_id: header.prev_log_id,
                entries,
                leader_commit: header.leader_commit,
            };
            encode(raft.append_entries(append).await)
        }
        "vote" => encode(raft.vote(decode(&request.header)?).await),
        "pre_vote" => encode(raft.pre_vote(decode(&request.header)?).await),
        "transfer_leader" => encode(raft.handle_transfer_leader(decode(&request.header)?).await),
        other => Err(tonic::Status::invalid_argument(format!(
            "unknown raft message kind `{other}`"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_with_entries_should_get_time_for_the_fsync_and_their_bytes() {
        let heartbeat = Duration::from_millis(150);
        assert_eq!(
            append_ttl(heartbeat, 0),
            heartbeat,
            "a heartbeat keeps openraft's limit"
        );
        assert_eq!(append_ttl(heartbeat, 100), APPEND_TTL_MIN + Duration::ZERO);
        assert_eq!(
            append_ttl(heartbeat, 8 * 1024 * 1024),
            APPEND_TTL_MIN + Duration::from_secs(1)
        );
        let long = Duration::from_secs(60);
        assert_eq!(
            append_ttl(long, 100),
            long,
            "a longer limit of openraft's stands"
        );
    }
}
