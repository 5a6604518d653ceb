//! Producer, consumer and table writes against an in-process fake broker: pins the client's side
//! of the wire contract (correlation ids, per-request errors on a live stream, retries within
//! the delivery timeout, keyed partitioning, skipping records below the fetch offset,
//! out-of-range policies, idempotent sequences and retries, compare-and-set requests) without
//! the real broker. The fake keeps whole stamped batches per partition, checks idempotent
//! producers' sequences like the broker does (next expected, repeats of recent batches, gaps),
//! checks compare-and-set conditions, and can be scripted to fail the next produce requests.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::FutureExt as _;
use prost::Message as _;
use syncline_proto::batch::{stamp_base_offset, Batch, BatchBuilder};
use syncline_proto::partitioner::partition_for_key;
use syncline_proto::v1::broker_server::{Broker, BrokerServer};
use syncline_proto::v1::{self, ErrorStatus};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Code, Request, Response, Status};

use crate::{
    CleanupPolicy, Client, ConsumerConfig, Error, OffsetReset, ProducerConfig, StartOffset,
    TopicConfig,
};

/// What the fake does with the next produce request instead of appending it.
#[derive(Debug, Clone, Copy)]
enum Scripted {
    /// Answer with `error` set (the stream goes on).
    Fail(Code),
    /// End the whole stream with UNAVAILABLE.
    BreakStream,
    /// Answer with `error` set to this code and message.
    FailWith(Code, &'static str),
    /// Append the batch, then answer UNAVAILABLE as if the acknowledgement was lost.
    LoseAck,
}

/// The fake's memory of one idempotent producer in one partition.
#[derive(Debug, Default)]
struct ProducerState {
    next_sequence: i32,
    /// `(base_sequence, base_offset, last_offset)` of the batches appended.
    appended: Vec<(i32, u64, u64)>,
}

#[derive(Debug, Default)]
struct PartitionLog {
    /// Stamped batches, in offset order.
    batches: Vec<Batch>,
    log_start_offset: u64,
    end_offset: u64,
    /// Compaction removed deletes below this offset (0: never).
    compaction_horizon: u64,
}

#[derive(Debug, Default)]
struct State {
    topics: HashMap<String, Vec<PartitionLog>>,
    cleanup_policies: HashMap<String, i32>,
    script: VecDeque<Scripted>,
    /// For unary `Produce` (conditional writes): `Fail*` and `LoseAck` apply.
    unary_script: VecDeque<Scripted>,
    produce_requests: u64,
    /// Every batch received on a produce stream, per partition, in arrival order.
    received_batches: Vec<(u32, Bytes)>,
    /// Every unary produce request, in arrival order.
    unary_requests: Vec<v1::ProduceRequest>,
    /// `(producer id, topic, partition)` → sequence state.
    producers: HashMap<(i64, String, u32), ProducerState>,
    producer_ids_issued: u64,
    /// While set, Fetch, Subscribe and Snapshot answer UNAVAILABLE and live subscriptions end
    /// with UNAVAILABLE (a broker restart as a follower sees it).
    unavailable: bool,
    /// Each new subscription's first response starts at the log start, whatever the offset
    /// asked (the first batch may start before the requested offset; this stretches it).
    subscribe_overlap: bool,
    snapshot_requests: u64,
    subscribe_requests: u64,
    /// Bumping it ends every live subscription with UNAVAILABLE (a dropped connection).
    subscription_generation: u64,
    /// Fetch, Subscribe and Snapshot requests refused because of `unavailable`.
    refused_while_unavailable: u64,
    /// The next snapshot stream ends without its final message (the broker went away).
    cut_next_snapshot: bool,
    /// Codes the next Fetch requests fail with, one each.
    fetch_failures: VecDeque<Code>,
    /// The fake group coordinator: every member of a group gets the group's `target`.
    groups: HashMap<String, FakeGroup>,
    /// Every group call, in arrival order.
    group_calls: Vec<GroupCall>,
}

/// A group of the fake coordinator. Tests set the assignment (`target`) directly; the epoch
/// changes with it. No initial delay, no hand-over protocol: the tests play both sides.
#[derive(Debug, Default)]
struct FakeGroup {
    members: std::collections::HashSet<String>,
    members_joined: u64,
    epoch: u32,
    target: Vec<(String, u32)>,
    commits: HashMap<(String, u32), u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum GroupCall {
    Join {
        member_id: String,
    },
    Heartbeat {
        epoch: u32,
        owned: Vec<(String, u32)>,
    },
    Commit {
        epoch: u32,
        offsets: Vec<(String, u32, u64)>,
    },
    Leave,
}

/// Short, so that group tests take milliseconds.
const FAKE_HEARTBEAT_INTERVAL_MS: u32 = 20;

fn wire(partitions: &[(String, u32)]) -> Vec<v1::TopicPartitions> {
    let mut by_topic: std::collections::BTreeMap<&str, Vec<u32>> = Default::default();
    for (topic, partition) in partitions {
        by_topic.entry(topic).or_default().push(*partition);
    }
    by_topic
        .into_iter()
        .map(|(topic, partitions)| v1::TopicPartitions {
            topic: topic.to_owned(),
            partitions,
        })
        .collect()
}

fn flat(lists: &[v1::TopicPartitions]) -> Vec<(String, u32)> {
    lists
        .iter()
        .flat_map(|list| {
            list.partitions
                .iter()
                .map(|partition| (list.topic.clone(), *partition))
        })
        .collect()
}

#[derive(Debug, Clone, Default)]
struct FakeBroker {
    state: Arc<Mutex<State>>,
}

impl FakeBroker {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// Appends like the real broker: verify, check key partitions, check the producer's
    /// sequence (a repeat of a recent batch gets its original offsets), check the conditions
    /// against the latest version of each key, stamp the base offset.
    fn append(
        &self,
        request: &v1::ProduceRequest,
        conditions: &[v1::Condition],
    ) -> Result<(u64, u64), Status> {
        let mut guard = self.lock();
        let state = &mut *guard;
        let partitions = state.topics.get_mut(&request.topic).ok_or_else(|| {
            Status::not_found(format!("topic `{}` does not exist", request.topic))
        })?;
        let count = partitions.len() as u32;
        let log = partitions
            .get_mut(request.partition as usize)
            .ok_or_else(|| Status::invalid_argument("no such partition"))?;
        let batch = Batch::parse(request.batch.clone())
            .map_err(|error| Status::invalid_argument(error.to_string()))?;
        for record in batch.records() {
            let record = record.map_err(|error| Status::invalid_argument(error.to_string()))?;
            if let Some(key) = &record.key {
                if partition_for_key(key, count) != request.partition {
                    return Err(Status::invalid_argument("key sent to the wrong partition"));
                }
            }
        }
        let header = *batch.header();
        let producer_key = (header.producer_id, request.topic.clone(), request.partition);
        if header.producer_id >= 0 {
            let producer = state.producers.entry(producer_key.clone()).or_default();
            if let Some(&(_, base, last)) = producer
                .appended
                .iter()
                .rev()
                .take(5)
                .find(|(sequence, _, _)| *sequence == header.base_sequence)
            {
                return Ok((base, last));
            }
            if header.base_sequence != producer.next_sequence {
                return Err(Status::out_of_range(format!(
                    "sequence gap: expected {} got {}",
                    producer.next_sequence, header.base_sequence
                )));
            }
        }
        let mut current = Vec::new();
        let mut failed = false;
        for condition in conditions {
            let latest = latest_version(log, &condition.key);
            failed |= match condition.expect {
                Some(v1::condition::Expect::Version(version)) => latest != Some(version),
                _ => latest.is_some(),
            };
            current.push(v1::KeyVersion {
                key: condition.key.clone(),
                version: latest.unwrap_or(0),
                absent: latest.is_none(),
            });
        }
        if failed {
            return Err(Status::with_details(
                Code::FailedPrecondition,
                "compare-and-set failed",
                v1::CasConflict { current }.encode_to_vec().into(),
            ));
        }
        let base_offset = log.end_offset;
        let mut stamped = BytesMut::from(&request.batch[..]);
        stamp_base_offset(&mut stamped, base_offset);
        let batch = Batch::parse(stamped.freeze()).unwrap();
        log.end_offset = batch.header().next_offset();
        let last_offset = batch.header().last_offset();
        log.batches.push(batch);
        if header.producer_id >= 0 {
            let producer = state.producers.entry(producer_key).or_default();
            producer.next_sequence = header
                .base_sequence
                .wrapping_add(header.record_count as i32);
            producer
                .appended
                .push((header.base_sequence, base_offset, last_offset));
        }
        Ok((base_offset, last_offset))
    }
}

/// The latest live version of `key` in `log` (`None`: absent or deleted).
fn latest_version(log: &PartitionLog, key: &[u8]) -> Option<u64> {
    let mut latest = None;
    for batch in &log.batches {
        for record in batch.records() {
            let record = record.unwrap();
            if record.key.as_deref() == Some(key) {
                latest = record.value.is_some().then_some(record.offset);
            }
        }
    }
    latest
}

/// The latest live record of every key in `batches` below `high_watermark`, in offset order:
/// a snapshot's records.
pub(crate) fn snapshot_records<'a>(
    batches: impl Iterator<Item = &'a Batch>,
    high_watermark: u64,
) -> Vec<v1::FetchedRecord> {
    let mut latest: HashMap<Bytes, v1::FetchedRecord> = HashMap::new();
    for batch in batches {
        for record in batch.records() {
            let record = record.unwrap();
            let Some(key) = record.key.clone() else {
                continue;
            };
            if record.offset >= high_watermark {
                continue;
            }
            match record.value {
                None => {
                    latest.remove(&key);
                }
                Some(value) => {
                    latest.insert(
                        key.clone(),
                        v1::FetchedRecord {
                            offset: record.offset,
                            timestamp_ms: record.timestamp,
                            key: Some(key),
                            value: Some(value),
                            headers: Vec::new(),
                        },
                    );
                }
            }
        }
    }
    let mut records: Vec<v1::FetchedRecord> = latest.into_values().collect();
    records.sort_by_key(|record| record.offset);
    records
}

/// Encodes a unary request's plain records into one batch with its producer fields.
pub(crate) fn encode_plain(request: &v1::ProduceRequest) -> Bytes {
    let mut builder = BatchBuilder::new();
    if request.producer_id != 0 {
        builder = builder.producer(
            request.producer_id as i64,
            request.producer_epoch as i16,
            request.base_sequence as i32,
        );
    }
    for record in &request.records {
        builder.push(
            record.timestamp_ms,
            record.key.as_deref(),
            record.value.as_deref(),
            &[],
        );
    }
    builder.finish().unwrap()
}

#[tonic::async_trait]
impl Broker for FakeBroker {
    async fn init_producer(
        &self,
        _request: Request<v1::InitProducerRequest>,
    ) -> Result<Response<v1::InitProducerResponse>, Status> {
        let mut state = self.lock();
        state.producer_ids_issued += 1;
        Ok(Response::new(v1::InitProducerResponse {
            producer_id: state.producer_ids_issued,
            producer_epoch: 0,
        }))
    }

    async fn get(
        &self,
        _request: Request<v1::GetRequest>,
    ) -> Result<Response<v1::GetResponse>, Status> {
        Err(Status::unimplemented("the fake broker has no tables"))
    }

    type SnapshotStream = std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<v1::SnapshotResponse, Status>> + Send + 'static>,
    >;

    async fn snapshot(
        &self,
        request: Request<v1::SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        let request = request.into_inner();
        let mut state = self.lock();
        state.snapshot_requests += 1;
        if state.unavailable {
            state.refused_while_unavailable += 1;
            return Err(Status::unavailable("scripted: restarting"));
        }
        let log = state
            .topics
            .get(&request.topic)
            .and_then(|partitions| partitions.get(request.partition as usize))
            .ok_or_else(|| Status::not_found("no such topic or partition"))?;
        let records = snapshot_records(log.batches.iter(), u64::MAX);
        let keys_total = records.len() as u64;
        let high_watermark = log.end_offset;
        // Two records a message, so that every snapshot of more than two keys is chunked.
        let mut messages: Vec<Result<v1::SnapshotResponse, Status>> = records
            .chunks(2)
            .map(|chunk| {
                Ok(v1::SnapshotResponse {
                    partition: request.partition,
                    high_watermark,
                    keys_total,
                    records: chunk.to_vec(),
                    last: false,
                })
            })
            .collect();
        if std::mem::take(&mut state.cut_next_snapshot) {
            messages.truncate(1);
        } else {
            messages.push(Ok(v1::SnapshotResponse {
                partition: request.partition,
                high_watermark,
                keys_total,
                records: Vec::new(),
                last: true,
            }));
        }
        Ok(Response::new(Box::pin(futures::stream::iter(messages))))
    }

    async fn join_group(
        &self,
        request: Request<v1::JoinGroupRequest>,
    ) -> Result<Response<v1::JoinGroupResponse>, Status> {
        let request = request.into_inner();
        let mut state = self.lock();
        let group = state.groups.entry(request.group.clone()).or_default();
        let member_id = if request.member_id.is_empty() {
            group.members_joined += 1;
            format!("m-{}", group.members_joined)
        } else {
            request.member_id.clone()
        };
        group.members.insert(member_id.clone());
        let response = v1::JoinGroupResponse {
            member_id: member_id.clone(),
            member_epoch: group.epoch,
            heartbeat_interval_ms: FAKE_HEARTBEAT_INTERVAL_MS,
            assignment: wire(&group.target),
        };
        state.group_calls.push(GroupCall::Join { member_id });
        Ok(Response::new(response))
    }

    async fn heartbeat(
        &self,
        request: Request<v1::HeartbeatRequest>,
    ) -> Result<Response<v1::HeartbeatResponse>, Status> {
        let request = request.into_inner();
        let mut state = self.lock();
        state.group_calls.push(GroupCall::Heartbeat {
            epoch: request.member_epoch,
            owned: flat(&request.owned),
        });
        let group = state.groups.entry(request.group.clone()).or_default();
        if !group.members.contains(&request.member_id) {
            return Err(Status::not_found("unknown member"));
        }
        Ok(Response::new(v1::HeartbeatResponse {
            member_epoch: group.epoch,
            heartbeat_interval_ms: FAKE_HEARTBEAT_INTERVAL_MS,
            assignment: wire(&group.target),
        }))
    }

    async fn leave_group(
        &self,
        request: Request<v1::LeaveGroupRequest>,
    ) -> Result<Response<v1::LeaveGroupResponse>, Status> {
        let request = request.into_inner();
        let mut state = self.lock();
        if let Some(group) = state.groups.get_mut(&request.group) {
            group.members.remove(&request.member_id);
        }
        state.group_calls.push(GroupCall::Leave);
        Ok(Response::new(v1::LeaveGroupResponse {}))
    }

    async fn commit_offsets(
        &self,
        request: Request<v1::CommitOffsetsRequest>,
    ) -> Result<Response<v1::CommitOffsetsResponse>, Status> {
        let request = request.into_inner();
        let mut state = self.lock();
        let offsets: Vec<(String, u32, u64)> = request
            .offsets
            .iter()
            .map(|offset| (offset.topic.clone(), offset.partition, offset.offset))
            .collect();
        state.group_calls.push(GroupCall::Commit {
            epoch: request.member_epoch,
            offsets: offsets.clone(),
        });
        let group = state.groups.entry(request.group.clone()).or_default();
        if request.member_id.is_empty() {
            if !group.members.is_empty() {
                return Err(Status::failed_precondition("the group has members"));
            }
        } else if !group.members.contains(&request.member_id) {
            return Err(Status::not_found("unknown member"));
        } else if request.member_epoch != group.epoch {
            return Err(Status::failed_precondition("stale member epoch"));
        }
        for (topic, partition, offset) in offsets {
            group.commits.insert((topic, partition), offset);
        }
        Ok(Response::new(v1::CommitOffsetsResponse {}))
    }

    async fn fetch_offsets(
        &self,
        request: Request<v1::FetchOffsetsRequest>,
    ) -> Result<Response<v1::FetchOffsetsResponse>, Status> {
        let request = request.into_inner();
        let state = self.lock();
        let wanted = flat(&request.partitions);
        let offsets = state
            .groups
            .get(&request.group)
            .map(|group| {
                group
                    .commits
                    .iter()
                    .filter(|(key, _)| wanted.is_empty() || wanted.contains(key))
                    .map(|((topic, partition), offset)| v1::CommittedOffset {
                        topic: topic.clone(),
                        partition: *partition,
                        offset: *offset,
                        ..Default::default()
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(Response::new(v1::FetchOffsetsResponse { offsets }))
    }

    async fn list_groups(
        &self,
        _request: Request<v1::ListGroupsRequest>,
    ) -> Result<Response<v1::ListGroupsResponse>, Status> {
        Err(Status::unimplemented(
            "the fake broker does not list groups",
        ))
    }

    async fn describe_group(
        &self,
        _request: Request<v1::DescribeGroupRequest>,
    ) -> Result<Response<v1::DescribeGroupResponse>, Status> {
        Err(Status::unimplemented(
            "the fake broker does not describe groups",
        ))
    }

    async fn compact_topic(
        &self,
        _request: Request<v1::CompactTopicRequest>,
    ) -> Result<Response<v1::CompactTopicResponse>, Status> {
        Err(Status::unimplemented("the fake broker has no tables"))
    }

    async fn history(
        &self,
        _request: Request<v1::HistoryRequest>,
    ) -> Result<Response<v1::HistoryResponse>, Status> {
        Err(Status::unimplemented("the fake broker has no tables"))
    }

    async fn create_topic(
        &self,
        request: Request<v1::CreateTopicRequest>,
    ) -> Result<Response<v1::CreateTopicResponse>, Status> {
        let request = request.into_inner();
        let partitions = request
            .config
            .and_then(|config| config.partitions)
            .map_or(1, |n| n.max(1));
        let mut state = self.lock();
        if state.topics.contains_key(&request.name) {
            return Err(Status::already_exists("exists"));
        }
        state.topics.insert(
            request.name.clone(),
            (0..partitions).map(|_| PartitionLog::default()).collect(),
        );
        let cleanup_policy = request.config.map_or(0, |config| config.cleanup_policy);
        state
            .cleanup_policies
            .insert(request.name.clone(), cleanup_policy);
        Ok(Response::new(v1::CreateTopicResponse {
            topic: Some(describe(&request.name, partitions, cleanup_policy)),
        }))
    }

    async fn delete_topic(
        &self,
        _: Request<v1::DeleteTopicRequest>,
    ) -> Result<Response<v1::DeleteTopicResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn list_topics(
        &self,
        _: Request<v1::ListTopicsRequest>,
    ) -> Result<Response<v1::ListTopicsResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn describe_cluster(
        &self,
        _: Request<v1::DescribeClusterRequest>,
    ) -> Result<Response<v1::DescribeClusterResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn find_coordinator(
        &self,
        _: Request<v1::FindCoordinatorRequest>,
    ) -> Result<Response<v1::FindCoordinatorResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn reassign_partition(
        &self,
        _: Request<v1::ReassignPartitionRequest>,
    ) -> Result<Response<v1::ReassignPartitionResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn rebalance(
        &self,
        _: Request<v1::RebalanceRequest>,
    ) -> Result<Response<v1::RebalanceResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn add_node(
        &self,
        _: Request<v1::AddNodeRequest>,
    ) -> Result<Response<v1::AddNodeResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn remove_node(
        &self,
        _: Request<v1::RemoveNodeRequest>,
    ) -> Result<Response<v1::RemoveNodeResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn set_voters(
        &self,
        _: Request<v1::SetVotersRequest>,
    ) -> Result<Response<v1::SetVotersResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn add_acls(
        &self,
        _: Request<v1::AddAclsRequest>,
    ) -> Result<Response<v1::AddAclsResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn remove_acls(
        &self,
        _: Request<v1::RemoveAclsRequest>,
    ) -> Result<Response<v1::RemoveAclsResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn list_acls(
        &self,
        _: Request<v1::ListAclsRequest>,
    ) -> Result<Response<v1::ListAclsResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn describe_topic(
        &self,
        request: Request<v1::DescribeTopicRequest>,
    ) -> Result<Response<v1::DescribeTopicResponse>, Status> {
        let name = request.into_inner().name;
        let state = self.lock();
        let partitions = state
            .topics
            .get(&name)
            .map(|partitions| partitions.len() as u32)
            .ok_or_else(|| Status::not_found(format!("topic `{name}` does not exist")))?;
        let cleanup_policy = state.cleanup_policies.get(&name).copied().unwrap_or(0);
        let mut description = describe(&name, partitions, cleanup_policy);
        for (described, log) in description.partitions.iter_mut().zip(&state.topics[&name]) {
            described.durable_offset = log.end_offset;
            described.log_end_offset = log.end_offset;
            described.log_start_offset = log.log_start_offset;
        }
        Ok(Response::new(v1::DescribeTopicResponse {
            topic: Some(description),
        }))
    }

    async fn produce(
        &self,
        request: Request<v1::ProduceRequest>,
    ) -> Result<Response<v1::ProduceResponse>, Status> {
        let mut request = request.into_inner();
        let scripted = {
            let mut state = self.lock();
            state.unary_requests.push(request.clone());
            state.unary_script.pop_front()
        };
        match scripted {
            Some(Scripted::Fail(code)) => return Err(Status::new(code, "scripted")),
            Some(Scripted::FailWith(code, message)) => return Err(Status::new(code, message)),
            _ => {}
        }
        let conditions = std::mem::take(&mut request.conditions);
        request.batch = encode_plain(&request);
        let (base_offset, last_offset) = self.append(&request, &conditions)?;
        if matches!(scripted, Some(Scripted::LoseAck)) {
            return Err(Status::unavailable("scripted: acknowledgement lost"));
        }
        Ok(Response::new(v1::ProduceResponse {
            correlation_id: request.correlation_id,
            partition: request.partition,
            base_offset,
            last_offset,
            error: None,
        }))
    }

    type ProduceStreamStream = ReceiverStream<Result<v1::ProduceResponse, Status>>;

    async fn produce_stream(
        &self,
        request: Request<tonic::Streaming<v1::ProduceRequest>>,
    ) -> Result<Response<Self::ProduceStreamStream>, Status> {
        let broker = self.clone();
        let stream = serve_produce_stream(request.into_inner(), move |request| {
            let scripted = {
                let mut state = broker.lock();
                state.produce_requests += 1;
                state
                    .received_batches
                    .push((request.partition, request.batch.clone()));
                state.script.pop_front()
            };
            let mut response = v1::ProduceResponse {
                correlation_id: request.correlation_id,
                partition: request.partition,
                ..Default::default()
            };
            match scripted {
                Some(Scripted::BreakStream) => return None,
                Some(Scripted::Fail(code)) => {
                    response.error = Some(ErrorStatus {
                        code: code as i32,
                        message: format!("scripted {code:?}"),
                    });
                }
                Some(Scripted::FailWith(code, message)) => {
                    response.error = Some(ErrorStatus {
                        code: code as i32,
                        message: message.to_owned(),
                    });
                }
                Some(Scripted::LoseAck) => {
                    let _ = broker.append(&request, &[]);
                    response.error = Some(ErrorStatus {
                        code: Code::Unavailable as i32,
                        message: "scripted: acknowledgement lost".to_owned(),
                    });
                }
                None => match broker.append(&request, &[]) {
                    Ok((base_offset, last_offset)) => {
                        response.base_offset = base_offset;
                        response.last_offset = last_offset;
                    }
                    Err(status) => response.error = Some(request_error(&status)),
                },
            }
            Some(response)
        });
        Ok(Response::new(stream))
    }

    async fn fetch(
        &self,
        request: Request<v1::FetchRequest>,
    ) -> Result<Response<v1::FetchResponse>, Status> {
        let request = request.into_inner();
        let response = {
            let mut state = self.lock();
            if let Some(code) = state.fetch_failures.pop_front() {
                return Err(Status::new(code, "scripted"));
            }
            if state.unavailable {
                state.refused_while_unavailable += 1;
                return Err(Status::unavailable("scripted: restarting"));
            }
            let log = state
                .topics
                .get(&request.topic)
                .and_then(|partitions| partitions.get(request.partition as usize))
                .ok_or_else(|| Status::not_found("no such topic or partition"))?;
            if request.offset < log.log_start_offset || request.offset > log.end_offset {
                return Err(Status::out_of_range(format!(
                    "offset {} is outside [{}, {}]",
                    request.offset, log.log_start_offset, log.end_offset
                )));
            }
            let mut bytes = BytesMut::new();
            let mut next_offset = request.offset;
            for batch in &log.batches {
                if batch.header().next_offset() > request.offset {
                    bytes.extend_from_slice(batch.as_bytes());
                    next_offset = batch.header().next_offset();
                }
            }
            v1::FetchResponse {
                partition: request.partition,
                batches: bytes.freeze(),
                records: Vec::new(),
                next_offset,
                high_watermark: log.end_offset,
                log_start_offset: log.log_start_offset,
                compaction_horizon: log.compaction_horizon,
            }
        };
        if response.batches.is_empty() {
            // A short long-poll: enough to keep an idle consumer from spinning.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Response::new(response))
    }

    type SubscribeStream = ReceiverStream<Result<v1::FetchResponse, Status>>;

    async fn subscribe(
        &self,
        request: Request<v1::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let request = request.into_inner();
        let (overlap, generation) = {
            let mut state = self.lock();
            state.subscribe_requests += 1;
            if state.unavailable {
                state.refused_while_unavailable += 1;
                return Err(Status::unavailable("scripted: restarting"));
            }
            let log = state
                .topics
                .get(&request.topic)
                .and_then(|partitions| partitions.get(request.partition as usize))
                .ok_or_else(|| Status::not_found("no such topic or partition"))?;
            if request.offset < log.log_start_offset || request.offset > log.end_offset {
                return Err(Status::out_of_range("offset outside the log"));
            }
            (state.subscribe_overlap, state.subscription_generation)
        };
        let (sender, receiver) = mpsc::channel(4);
        let broker = self.clone();
        tokio::spawn(async move {
            let mut offset = request.offset;
            let mut read_from = if overlap { 0 } else { offset };
            loop {
                let response = 'read: {
                    let state = broker.lock();
                    let log = state
                        .topics
                        .get(&request.topic)
                        .and_then(|partitions| partitions.get(request.partition as usize));
                    let log = match log {
                        Some(log)
                            if !state.unavailable
                                && state.subscription_generation == generation =>
                        {
                            log
                        }
                        _ => break 'read Err(Status::unavailable("scripted: restarting")),
                    };
                    let mut bytes = BytesMut::new();
                    let mut next_offset = offset;
                    for batch in &log.batches {
                        if batch.header().next_offset() > read_from {
                            bytes.extend_from_slice(batch.as_bytes());
                            next_offset = next_offset.max(batch.header().next_offset());
                        }
                    }
                    Ok((!bytes.is_empty()).then(|| v1::FetchResponse {
                        partition: request.partition,
                        batches: bytes.freeze(),
                        records: Vec::new(),
                        next_offset,
                        high_watermark: log.end_offset,
                        log_start_offset: log.log_start_offset,
                        compaction_horizon: log.compaction_horizon,
                    }))
                };
                match response {
                    Err(status) => {
                        let _ = sender.send(Err(status)).await;
                        return;
                    }
                    Ok(Some(response)) => {
                        offset = response.next_offset;
                        read_from = offset;
                        if sender.send(Ok(response)).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => {
                        if sender.is_closed() {
                            return;
                        }
                        // The fake has no wake-ups: poll the log.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn list_offsets(
        &self,
        request: Request<v1::ListOffsetsRequest>,
    ) -> Result<Response<v1::ListOffsetsResponse>, Status> {
        let request = request.into_inner();
        let state = self.lock();
        let log = state
            .topics
            .get(&request.topic)
            .and_then(|partitions| partitions.get(request.partition as usize))
            .ok_or_else(|| Status::not_found("no such topic or partition"))?;
        let offset = match v1::OffsetSpec::try_from(request.spec) {
            Ok(v1::OffsetSpec::Earliest) => log.log_start_offset,
            _ => log.end_offset,
        };
        Ok(Response::new(v1::ListOffsetsResponse {
            offset,
            found: true,
        }))
    }
}

fn describe(name: &str, partitions: u32, cleanup_policy: i32) -> v1::TopicDescription {
    v1::TopicDescription {
        name: name.to_owned(),
        config: Some(v1::TopicConfig {
            partitions: Some(partitions),
            cleanup_policy,
            ..Default::default()
        }),
        partitions: (0..partitions)
            .map(|partition| v1::PartitionDescription {
                partition,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// Serves one `ProduceStream` call: `answer` gives each request's response, or `None` to end
/// the stream with UNAVAILABLE (as a broker going away).
pub(crate) fn serve_produce_stream<F>(
    mut requests: tonic::Streaming<v1::ProduceRequest>,
    mut answer: F,
) -> ReceiverStream<Result<v1::ProduceResponse, Status>>
where
    F: FnMut(v1::ProduceRequest) -> Option<v1::ProduceResponse> + Send + 'static,
{
    let (responses, receiver) = mpsc::channel(64);
    tokio::spawn(async move {
        while let Ok(Some(request)) = requests.message().await {
            let response = match answer(request) {
                Some(response) => Ok(response),
                None => Err(Status::unavailable("going away")),
            };
            let ended = response.is_err();
            if responses.send(response).await.is_err() || ended {
                return;
            }
        }
    });
    ReceiverStream::new(receiver)
}

/// A failed request on a stream, as the broker answers it (code and message; no details).
pub(crate) fn request_error(status: &Status) -> ErrorStatus {
    ErrorStatus {
        code: status.code() as i32,
        message: status.message().to_owned(),
    }
}

/// Starts a fake broker on a loopback port and connects a client to it.
async fn start() -> (Client, FakeBroker) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let broker = FakeBroker::default();
    let service = BrokerServer::new(broker.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let client = Client::connect(&address.to_string()).await.unwrap();
    (client, broker)
}

/// Quick retries, so failure tests take milliseconds.
pub(crate) fn fast_retries() -> ProducerConfig {
    ProducerConfig {
        linger: Duration::from_millis(1),
        retry_backoff: Duration::from_millis(5),
        retry_backoff_max: Duration::from_millis(20),
        ..ProducerConfig::default()
    }
}

async fn send_value(producer: &crate::Producer, value: &str) -> crate::Result<crate::Delivery> {
    producer.send(None, Some(value.as_bytes()), &[]).await
}

#[tokio::test]
async fn given_concurrent_keyed_sends_should_land_in_key_partitions_with_contiguous_offsets() {
    let (client, broker) = start().await;
    client
        .create_topic("t", TopicConfig::with_partitions(4))
        .await
        .unwrap();
    let producer = client.producer("t", fast_retries()).await.unwrap();
    assert_eq!(producer.partitions(), 4);
    let keys: Vec<String> = (0..300).map(|i| format!("key-{}", i % 17)).collect();
    let sends = keys
        .iter()
        .map(|key| producer.send(Some(key.as_bytes()), Some(b"v".as_slice()), &[]));
    let deliveries = futures::future::join_all(sends).await;
    let mut offsets_by_partition: HashMap<u32, Vec<u64>> = HashMap::new();
    for (key, delivery) in keys.iter().zip(deliveries) {
        let delivery = delivery.unwrap();
        assert_eq!(delivery.partition, partition_for_key(key.as_bytes(), 4));
        assert!(delivery.timestamp > 0);
        offsets_by_partition
            .entry(delivery.partition)
            .or_default()
            .push(delivery.offset);
    }
    for offsets in offsets_by_partition.values_mut() {
        offsets.sort_unstable();
        let expected: Vec<u64> = (0..offsets.len() as u64).collect();
        assert_eq!(*offsets, expected);
    }
    // Batching happened: far fewer requests than records.
    assert!(broker.lock().produce_requests < 300);
}

#[tokio::test]
async fn given_a_failed_request_on_the_stream_should_fail_only_that_batch() {
    let (client, broker) = start().await;
    client
        .create_topic("t", TopicConfig::with_partitions(1))
        .await
        .unwrap();
    let producer = client.producer("t", fast_retries()).await.unwrap();
    broker
        .lock()
        .script
        .push_back(Scripted::Fail(Code::InvalidArgument));
    let error = send_value(&producer, "rejected").await.unwrap_err();
    assert!(
        matches!(&error, Error::Broker { code: Code::InvalidArgument, message } if message == "scripted InvalidArgument"),
        "{error:?}"
    );
    let delivery = send_value(&producer, "accepted").await.unwrap();
    assert_eq!(delivery.offset, 0);
    assert_eq!(broker.lock().produce_requests, 2, "not retried");
}

#[tokio::test]
async fn given_transient_failures_should_retry_and_store_the_batch_once() {
    let (client, broker) = start().await;
    client
        .create_topic("t", TopicConfig::with_partitions(1))
        .await
        .unwrap();
    let producer = client.producer("t", fast_retries()).await.unwrap();
    broker.lock().script.extend([
        Scripted::Fail(Code::Unavailable),
        Scripted::BreakStream,
        Scripted::Fail(Code::Unavailable),
    ]);
    let delivery = send_value(&producer, "x").await.unwrap();
    assert_eq!(delivery.offset, 0);
    let state = broker.lock();
    assert_eq!(state.produce_requests, 4);
    assert_eq!(state.topics["t"][0].batches.len(), 1);
}

#[tokio::test]
async fn given_a_broker_that_stays_unavailable_should_fail_with_delivery_timeout() {
    let (client, broker) = start().await;
    client
        .create_topic("t", TopicConfig::with_partitions(1))
        .await
        .unwrap();
    let config = ProducerConfig {
        delivery_timeout: Duration::from_millis(300),
        ..fast_retries()
    };
    let producer = client.producer("t", config).await.unwrap();
    broker.lock().script.extend(std::iter::repeat_n(
        Scripted::Fail(Code::Unavailable),
        10_000,
    ));
    let started = std::time::Instant::now();
    let error = send_value(&producer, "x").await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    let Error::DeliveryTimeout {
        topic,
        partition,
        attempts,
        last_error,
        ..
    } = &error
    else {
        panic!("{error:?}");
    };
    assert_eq!((topic.as_str(), *partition), ("t", 0));
    assert!(*attempts >= 2, "{attempts}");
    assert!(matches!(
        last_error.as_deref(),
        Some(Error::Broker {
            code: Code::Unavailable,
            ..
        })
    ));
}

#[tokio::test]
async fn flush_should_send_lingering_records_and_wait_for_their_acks() {
    let (client, _broker) = start().await;
    client
        .create_topic("t", TopicConfig::with_partitions(2))
        .await
        .unwrap();
    let config = ProducerConfig {
        linger: Duration::from_secs(20),
        ..ProducerConfig::default()
    };
    let producer = client.producer("t", config).await.unwrap();
    let mut pending = Vec::new();
    for i in 0..10 {
        let value = format!("v{i}");
        pending.push(
            producer
                .enqueue(None, Some(value.as_bytes()), &[])
                .await
                .unwrap(),
        );
    }
    tokio::time::timeout(Duration::from_secs(5), producer.flush())
        .await
        .unwrap();
    for delivery in pending {
        let delivery = delivery.now_or_never().expect("acknowledged by flush");
        delivery.unwrap();
    }
}

#[tokio::test]
async fn records_that_can_never_be_sent_should_fail_at_once() {
    let (client, _broker) = start().await;
    client
        .create_topic("t", TopicConfig::with_partitions(1))
        .await
        .unwrap();
    let config = ProducerConfig {
        batch_bytes_max: 1024,
        buffer_bytes_max: 1024,
        ..ProducerConfig::default()
    };
    let producer = client.producer("t", config).await.unwrap();
    let big = vec![0u8; 2000];
    assert!(matches!(
        producer.send(None, Some(&big), &[]).await,
        Err(Error::RecordTooLarge { max: 1024, .. })
    ));
    let headers: Vec<(&str, &[u8])> = vec![("h", b""); 1025];
    assert!(matches!(
        producer.send(None, None, &headers).await,
        Err(Error::TooManyHeaders { count: 1025, .. })
    ));
    assert!(matches!(
        client.producer("missing", ProducerConfig::default()).await,
        Err(Error::Broker {
            code: Code::NotFound,
            ..
        })
    ));
}

/// Produces `values` to partition 0 of a one-partition topic `t` as one batch.
async fn produce_batch(client: &Client, values: &[&str]) {
    let producer = client.producer("t", fast_retries()).await.unwrap();
    let mut pending = Vec::new();
    for value in values {
        pending.push(
            producer
                .enqueue(None, Some(value.as_bytes()), &[])
                .await
                .unwrap(),
        );
    }
    producer.flush().await;
    for delivery in pending {
        delivery.await.unwrap();
    }
}

async fn next_value(consumer: &mut crate::Consumer) -> crate::Result<(u64, String)> {
    let record = tokio::time::timeout(Duration::from_secs(5), consumer.recv())
        .await
        .expect("a record within 5 s")
        .expect("stream not ended")?;
    Ok((
        record.offset,
        String::from_utf8(record.value.unwrap().to_vec()).unwrap(),
    ))
}

#[tokio::test]
async fn given_broker_unavailable_then_back_connectivity_should_change_once_each_way() {
    let (client, broker) = start().await;
    client
        .create_topic("t", TopicConfig::with_partitions(2))
        .await
        .unwrap();
    let mut connectivity = client.connectivity();
    assert_eq!(*connectivity.borrow(), crate::Connectivity::Connected);
    let config = ConsumerConfig {
        fetch_max_wait: Duration::from_millis(10),
        retry_backoff: Duration::from_millis(5),
        ..ConsumerConfig::default()
    };
    let _consumer = client.consumer("t", config).await.unwrap();
    broker.lock().unavailable = true;
    tokio::time::timeout(Duration::from_secs(5), connectivity.changed())
        .await
        .unwrap()
        .unwrap();
    match &*connectivity.borrow_and_update() {
        crate::Connectivity::Reconnecting { error } => {
            assert!(error.contains("scripted: restarting"), "{error}")
        }
        other => panic!("{other:?}"),
    }
    // Both partitions keep failing: still one outage, no new change.
    let refused = broker.lock().refused_while_unavailable;
    while broker.lock().refused_while_unavailable < refused + 6 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(!connectivity.has_changed().unwrap());
    broker.lock().unavailable = false;
    tokio::time::timeout(Duration::from_secs(5), connectivity.changed())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        *connectivity.borrow_and_update(),
        crate::Connectivity::Connected
    );
}

#[tokio::test]
async fn consumer_should_skip_records_below_its_start_offset_in_the_first_batch() {
    let (client, broker) = start().await;
    client
        .create_topic("t", TopicConfig::with_partitions(1))
        .await
        .unwrap();
    produce_batch(&client, &["a", "b", "c", "d", "e"]).await;
    produce_batch(&client, &["f", "g"]).await;
    assert_eq!(broker.lock().topics["t"][0].batches.len(), 2);
    let config = ConsumerConfig {
        start: StartOffset::Offset(3),
        ..ConsumerConfig::default()
    };
    let mut consumer = client.consumer("t", config).await.unwrap();
    assert_eq!(consumer.assignment(), [0]);
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(next_value(&mut consumer).await.unwrap());
    }
    assert_eq!(
        seen,
        [
            (3, "d".to_owned()),
            (4, "e".to_owned()),
            (5, "f".to_owned()),
            (6, "g".to_owned())
        ]
    );
    assert_eq!(consumer.position(0), Some(7));

    // Latest start sees only what comes after it.
    let mut latest = client
        .consumer("t", ConsumerConfig::default())
        .await
        .unwrap();
    produce_batch(&client, &["h"]).await;
    assert_eq!(next_value(&mut latest).await.unwrap(), (7, "h".to_owned()));
}

#[tokio::test]
async fn given_broker_out_of_response_budget_consumer_should_retry_the_fetch() {
    let (client, broker) = start().await;
    client
        .create_topic("t", TopicConfig::with_partitions(1))
        .await
        .unwrap();
    produce_batch(&client, &["a", "b"]).await;
    // The broker's response-bytes budget is taken: RESOURCE_EXHAUSTED means "busy" for a fetch.
    broker
        .lock()
        .fetch_failures
        .extend([Code::ResourceExhausted, Code::ResourceExhausted]);
    let config = ConsumerConfig {
        start: StartOffset::Offset(0),
        ..ConsumerConfig::default()
    };
    let connectivity = client.connectivity();
    let mut consumer = client.consumer("t", config).await.unwrap();
    assert_eq!(
        next_value(&mut consumer).await.unwrap(),
        (0, "a".to_owned())
    );
    assert_eq!(
        next_value(&mut consumer).await.unwrap(),
        (1, "b".to_owned())
    );
    assert!(broker.lock().fetch_failures.is_empty());
    // A busy broker is reachable: no `reconnecting...` for it (a merge once reported it).
    assert!(
        !connectivity.has_changed().unwrap(),
        "{:?}",
        *connectivity.borrow()
    );
}

#[tokio::test]
async fn given_position_removed_by_retention_should_follow_the_reset_policy() {
    let (client, broker) = start().await;
    client
        .create_topic("t", TopicConfig::with_partitions(1))
        .await
        .unwrap();
    produce_batch(&client, &["a", "b", "c"]).await;
    produce_batch(&client, &["d", "e"]).await;
    {
        // Retention removes the first batch.
        let mut state = broker.lock();
        let log = &mut state.topics.get_mut("t").unwrap()[0];
        log.batches.remove(0);
        log.log_start_offset = 3;
    }
    let from_zero = |offset_reset| ConsumerConfig {
        start: StartOffset::Offset(0),
        offset_reset,
        ..ConsumerConfig::default()
    };

    let mut consumer = client
        .consumer("t", from_zero(OffsetReset::Error))
        .await
        .unwrap();
    let error = next_value(&mut consumer).await.unwrap_err();
    assert!(
        matches!(
            error,
            Error::OffsetOutOfRange {
                partition: 0,
                offset: 0,
                log_start_offset: 3,
                latest_offset: 5,
                ..
            }
        ),
        "{error:?}"
    );
    // That partition ended; no partition is left.
    assert!(consumer.recv().await.is_none());

    let mut consumer = client
        .consumer("t", from_zero(OffsetReset::Earliest))
        .await
        .unwrap();
    assert_eq!(
        next_value(&mut consumer).await.unwrap(),
        (3, "d".to_owned())
    );

    let mut consumer = client
        .consumer("t", from_zero(OffsetReset::Latest))
        .await
        .unwrap();
    produce_batch(&client, &["f"]).await;
    assert_eq!(
        next_value(&mut consumer).await.unwrap(),
        (5, "f".to_owned())
    );
}

#[tokio::test]
async fn consumer_should_refuse_partitions_the_topic_does_not_have() {
    let (client, _broker) = start().await;
    client
        .create_topic("t", TopicConfig::with_partitions(2))
        .await
        .unwrap();
    let config = ConsumerConfig {
        partitions: Some(vec![2]),
        ..ConsumerConfig::default()
    };
    assert!(matches!(
        client.consumer("t", config).await,
        Err(Error::UnknownPartition {
            partition: 2,
            partitions: 2,
            ..
        })
    ));
}

#[tokio::test]
async fn connecting_to_a_closed_port_should_name_the_address() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    drop(listener);
    let error = Client::connect(&format!("http://{address}"))
        .await
        .unwrap_err();
    assert!(matches!(&error, Error::Unreachable { .. }), "{error:?}");
    assert!(
        error
            .to_string()
            .starts_with(&format!("cannot reach the broker at {address}: ")),
        "{error}"
    );
}

/// The producer fields of a batch as sent: `(producer_id, epoch, base_sequence, records)`.
fn producer_fields(batch: &Bytes) -> (i64, i16, i32, u32) {
    let header = *Batch::parse(batch.clone()).unwrap().header();
    (
        header.producer_id,
        header.producer_epoch,
        header.base_sequence,
        header.record_count,
    )
}

/// Enqueues `values` as one batch (unkeyed, one partition) and waits for each delivery.
async fn send_batch(producer: &crate::Producer, values: &[&str]) -> Vec<crate::Result<u64>> {
    let mut pending = Vec::new();
    for value in values {
        pending.push(
            producer
                .enqueue(None, Some(value.as_bytes()), &[])
                .await
                .unwrap(),
        );
    }
    producer.flush().await;
    let mut offsets = Vec::new();
    for delivery in pending {
        offsets.push(delivery.await.map(|delivery| delivery.offset));
    }
    offsets
}

#[tokio::test]
async fn idempotent_batches_should_carry_the_producer_id_and_sequences_counting_records() {
    let (client, broker) = start().await;
    client
        .create_topic("t", TopicConfig::with_partitions(1))
        .await
        .unwrap();
    let producer = client.producer("t", fast_retries()).await.unwrap();
    let identity = producer.identity().expect("idempotent by default");
    assert_eq!(identity.epoch(), 0);
    let id = identity.producer_id() as i64;
    send_batch(&producer, &["a", "b", "c"]).await;
    send_batch(&producer, &["d", "e"]).await;
    send_batch(&producer, &["f"]).await;
    let sent: Vec<_> = broker
        .lock()
        .received_batches
        .iter()
        .map(|(_, batch)| producer_fields(batch))
        .collect();
    assert_eq!(sent, [(id, 0, 0, 3), (id, 0, 3, 2), (id, 0, 5, 1)]);
}

#[tokio::test]
async fn non_idempotent_producer_should_send_batches_without_producer_fields() {
    let (client, broker) = start().await;
    client
        .create_topic("t", TopicConfig::with_partitions(1))
        .await
        .unwrap();
    let config = ProducerConfig {
        idempotent: false,
        ..fast_retries()
    };
    let producer = client.producer("t", config).await.unwrap();
    assert_eq!(producer.identity(), None);
    send_batch(&producer, &["a"]).await;
    let (_, batch) = broker.lock().received_batches[0].clone();
    assert_eq!(producer_fields(&batch), (-1, -1, -1, 1));
    assert_eq!(broker.lock().producer_ids_issued, 0);
}

#[tokio::test]
async fn given_lost_acknowledgement_retry_should_resend_the_same_bytes_and_store_once() {
    let (client, broker) = start().await;
    client
        .create_topic("t", TopicConfig::with_partitions(1))
        .await
        .unwrap();
    let producer = client.producer("t", fast_retries()).await.unwrap();
    broker
        .lock()
        .script
        .extend([Scripted::LoseAck, Scripted::Fail(Code::Unavailable)]);
    let offsets = send_batch(&producer, &["x", "y"]).await;
    assert_eq!(
        offsets.into_iter().map(Result::unwrap).collect::<Vec<_>>(),
        [0, 1]
    );
    let state = broker.lock();
    assert_eq!(state.received_batches.len(), 3, "two retries");
    let first = &state.received_batches[0].1;
    for (_, retry) in &state.received_batches[1..] {
        assert_eq!(retry, first, "a retry is the same bytes, same sequence");
    }
    assert_eq!(state.topics["t"][0].batches.len(), 1, "stored once");
    assert_eq!(state.topics["t"][0].end_offset, 2);
}

#[tokio::test]
async fn given_batch_that_overtook_a_retried_one_should_retry_behind_it_in_order() {
    let (client, broker) = start().await;
    client
        .create_topic("t", TopicConfig::with_partitions(1))
        .await
        .unwrap();
    // Every record fills its batch, so the two records travel in two batches at once.
    let config = ProducerConfig {
        batch_bytes_max: 128,
        ..fast_retries()
    };
    let producer = client.producer("t", config).await.unwrap();
    let value = "v".repeat(100);
    // The partition's first batch goes alone; then two at once.
    let zeroth = producer
        .enqueue(None, Some(format!("0{value}").as_bytes()), &[])
        .await
        .unwrap();
    assert_eq!(zeroth.await.unwrap().offset, 0);
    // The first of the two is lost; the second then arrives with a sequence gap.
    broker
        .lock()
        .script
        .push_back(Scripted::Fail(Code::Unavailable));
    let first = producer
        .enqueue(None, Some(format!("1{value}").as_bytes()), &[])
        .await
        .unwrap();
    let second = producer
        .enqueue(None, Some(format!("2{value}").as_bytes()), &[])
        .await
        .unwrap();
    let (first, second) = (first.await.unwrap(), second.await.unwrap());
    assert_eq!((first.offset, second.offset), (1, 2), "send order kept");
    let state = broker.lock();
    let sequences: Vec<i32> = state
        .received_batches
        .iter()
        .map(|(_, batch)| producer_fields(batch).2)
        .collect();
    assert!(sequences.len() >= 4, "{sequences:?}");
    assert_eq!(&sequences[..3], [0, 1, 2]);
}

/// Regression (benches/replication.sh, rolling): under a steady load, one batch retried after
/// a backoff made every later batch of its partition overtake one that was waiting out a
/// backoff: each was refused as a gap and waited a backoff of its own, and each batch the window
/// let out meanwhile overtook those in turn, for as long as the load kept the window full
/// (seconds after a leader change, each batch a backoff late). A batch refused as a gap is now
/// resent as soon as the batches it overtook are resolved, so the gaps end within a window.
#[tokio::test]
async fn given_steady_load_after_a_retried_batch_gap_refusals_should_end_within_a_window() {
    use crate::producer::PARTITION_WINDOW_BATCHES;

    let (client, broker) = start().await;
    client
        .create_topic("t", TopicConfig::with_partitions(1))
        .await
        .unwrap();
    // One record per batch; a backoff far longer than the pace, as in a real cluster (100 ms
    // against a batch every few ms).
    let config = ProducerConfig {
        batch_bytes_max: 128,
        linger: Duration::from_millis(1),
        retry_backoff: Duration::from_millis(50),
        retry_backoff_max: Duration::from_millis(200),
        ..ProducerConfig::default()
    };
    let producer = client.producer("t", config).await.unwrap();
    let value = "v".repeat(100);
    send_value(&producer, &value).await.unwrap();
    broker
        .lock()
        .script
        .push_back(Scripted::Fail(Code::Unavailable));
    // A record every 2 ms for about a second.
    let mut deliveries = Vec::new();
    for _ in 0..400 {
        let delivery = producer
            .enqueue(None, Some(value.as_bytes()), &[])
            .await
            .unwrap();
        deliveries.push(delivery);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut offsets = Vec::new();
    for delivery in deliveries {
        offsets.push(delivery.await.unwrap().offset);
    }
    assert_eq!(offsets, (1..=400).collect::<Vec<u64>>(), "send order kept");
    let state = broker.lock();
    let stored = state.topics["t"][0].batches.len();
    let refused = state.received_batches.len() - stored;
    // The scripted failure, then at most the batches in flight behind it, refused once or twice
    // while the chain drains. Before the fix: one refusal per batch sent after the failure.
    assert!(
        refused <= 1 + 2 * PARTITION_WINDOW_BATCHES as usize,
        "{refused} of {} requests not stored",
        state.received_batches.len()
    );
}

#[tokio::test]
async fn given_batch_refused_for_good_should_continue_under_a_new_producer_id_from_sequence_zero() {
    let (client, broker) = start().await;
    client
        .create_topic("t", TopicConfig::with_partitions(1))
        .await
        .unwrap();
    let producer = client.producer("t", fast_retries()).await.unwrap();
    let first_id = producer.identity().unwrap().producer_id();
    send_batch(&producer, &["a", "b"]).await;
    broker
        .lock()
        .script
        .push_back(Scripted::Fail(Code::ResourceExhausted));
    let refused = send_batch(&producer, &["c"]).await;
    assert!(matches!(
        refused[0],
        Err(Error::Broker {
            code: Code::ResourceExhausted,
            ..
        })
    ));
    let offsets = send_batch(&producer, &["d"]).await;
    assert_eq!(*offsets[0].as_ref().unwrap(), 2);
    let renewed = producer.identity().unwrap().producer_id();
    assert_ne!(renewed, first_id);
    let (_, last) = broker.lock().received_batches.last().unwrap().clone();
    assert_eq!(producer_fields(&last), (renewed as i64, 0, 0, 1));
}

#[tokio::test]
async fn given_fenced_producer_should_fail_clearly_and_refuse_later_records() {
    let (client, broker) = start().await;
    client
        .create_topic("t", TopicConfig::with_partitions(1))
        .await
        .unwrap();
    let producer = client.producer("t", fast_retries()).await.unwrap();
    broker.lock().script.push_back(Scripted::FailWith(
        Code::FailedPrecondition,
        "producer 1 epoch 0 is fenced by epoch 1: another instance re-initialised this producer id",
    ));
    let error = send_value(&producer, "x").await.unwrap_err();
    assert!(
        matches!(
            error,
            Error::ProducerFenced {
                producer_id: 1,
                epoch: 0,
                ..
            }
        ),
        "{error:?}"
    );
    assert!(error.to_string().contains("is fenced"), "{error}");
    let later = producer.enqueue(None, Some(b"y"), &[]).await.unwrap_err();
    assert!(matches!(later, Error::ProducerFenced { .. }), "{later:?}");
    assert_eq!(
        broker.lock().producer_ids_issued,
        1,
        "the id is not taken back"
    );
}

async fn table(client: &Client, partitions: u32) -> crate::Table {
    let config = TopicConfig {
        partitions: Some(partitions),
        cleanup_policy: CleanupPolicy::Compact,
        ..TopicConfig::default()
    };
    client.create_topic("table", config).await.unwrap();
    client.table_with("table", fast_retries()).await.unwrap()
}

#[tokio::test]
async fn table_handle_should_refuse_a_topic_that_is_not_a_table() {
    let (client, _broker) = start().await;
    client
        .create_topic("events", TopicConfig::with_partitions(1))
        .await
        .unwrap();
    let error = client.table("events").await.unwrap_err();
    assert!(matches!(&error, Error::NotATable { topic } if topic == "events"));
    assert!(error.to_string().contains("--cleanup compact"), "{error}");
}

#[tokio::test]
async fn given_conflict_should_report_the_current_version_and_leave_the_sequence_free() {
    let (client, broker) = start().await;
    let table = table(&client, 3).await;
    let created = table.put_if_absent("k", "1").await.unwrap();
    assert_eq!(created.partition, partition_for_key(b"k", 3));
    assert_eq!(created.version, 0);
    let error = table.put_if("k", "2", 5).await.unwrap_err();
    assert!(
        matches!(&error, Error::Conflict { current: Some(0), key, .. } if key == "k"),
        "{error:?}"
    );
    assert_eq!(
        error.to_string(),
        "version conflict on key k: current version is 0"
    );
    let absent = table.put_if_absent("k", "2").await.unwrap_err();
    assert!(matches!(
        absent,
        Error::Conflict {
            current: Some(0),
            ..
        }
    ));
    let missing = table.put_if("other", "x", 3).await.unwrap_err();
    assert!(
        matches!(missing, Error::Conflict { current: None, .. }),
        "{missing:?}"
    );
    assert_eq!(
        missing.to_string(),
        "version conflict on key other: key is absent"
    );
    let updated = table.put_if("k", "2", 0).await.unwrap();
    assert_eq!(updated.version, 1);

    let state = broker.lock();
    let fields: Vec<(u64, u32, Option<v1::condition::Expect>)> = state
        .unary_requests
        .iter()
        .filter(|request| request.records[0].key.as_deref() == Some(b"k".as_slice()))
        .map(|request| {
            (
                request.producer_id,
                request.base_sequence,
                request.conditions[0].expect,
            )
        })
        .collect();
    let id = fields[0].0;
    assert_ne!(id, 0);
    use v1::condition::Expect;
    assert_eq!(
        fields,
        [
            (id, 0, Some(Expect::Absent(true))),
            // Refused writes do not use up the sequence.
            (id, 1, Some(Expect::Version(5))),
            (id, 1, Some(Expect::Absent(true))),
            (id, 1, Some(Expect::Version(0))),
        ]
    );
}

#[tokio::test]
async fn given_lost_acknowledgement_conditional_write_should_get_its_original_version() {
    let (client, broker) = start().await;
    let table = table(&client, 1).await;
    broker.lock().unary_script.push_back(Scripted::LoseAck);
    // Without idempotence the retry would fail its own condition (the key exists now).
    let written = table.put_if_absent("k", "v").await.unwrap();
    assert_eq!(written.version, 0);
    let state = broker.lock();
    assert_eq!(state.unary_requests.len(), 2);
    assert_eq!(
        state.unary_requests[0], state.unary_requests[1],
        "the retry is the same request, same sequence"
    );
    assert_eq!(state.topics["table"][0].end_offset, 1, "stored once");
}

#[tokio::test]
async fn given_unknown_outcome_next_conditional_write_should_use_a_new_producer_id() {
    let (client, broker) = start().await;
    let config = ProducerConfig {
        delivery_timeout: Duration::from_millis(200),
        ..fast_retries()
    };
    let topic_config = TopicConfig {
        partitions: Some(1),
        cleanup_policy: CleanupPolicy::Compact,
        ..TopicConfig::default()
    };
    client.create_topic("table", topic_config).await.unwrap();
    let table = client.table_with("table", config).await.unwrap();
    table.put_if_absent("a", "1").await.unwrap();
    broker
        .lock()
        .unary_script
        .extend(std::iter::repeat_n(Scripted::Fail(Code::Unavailable), 1000));
    let error = table.put_if("a", "2", 0).await.unwrap_err();
    assert!(matches!(error, Error::DeliveryTimeout { .. }), "{error:?}");
    broker.lock().unary_script.clear();
    match table.put_if("a", "2", 0).await {
        Ok(_) => {}
        // The timed-out write's outcome was unknown: a retry of it still in flight when the
        // script was cleared may land first (seen on a loaded CI machine).
        Err(Error::Conflict {
            current: Some(1), ..
        }) => {}
        Err(other) => panic!("{other:?}"),
    }
    let state = broker.lock();
    let first = &state.unary_requests[0];
    assert!(
        state
            .unary_requests
            .iter()
            .any(|r| r.producer_id != first.producer_id && r.base_sequence == 0),
        "the next conditional write starts a new producer id at sequence 0"
    );
}

// ---------------------------------------------------------------------------------------------
// SyncTable against the fake: snapshot then tail, resuming without duplicates, re-snapshots on
// a compaction horizon and on OUT_OF_RANGE, read-your-writes, change events.

/// A generous bound on waits that should end within milliseconds.
const WAIT: Duration = Duration::from_secs(10);

async fn bounded<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, future)
        .await
        .expect("timed out waiting")
}

fn sync_config() -> crate::SyncTableConfig {
    crate::SyncTableConfig {
        retry_backoff: Duration::from_millis(5),
        retry_backoff_max: Duration::from_millis(20),
        ..crate::SyncTableConfig::default()
    }
}

/// The table's map as `key -> (value, version)` strings.
fn contents(table: &crate::SyncTable) -> std::collections::BTreeMap<String, (String, u64)> {
    table
        .entries()
        .into_iter()
        .map(|(key, entry)| {
            (
                String::from_utf8(key.to_vec()).unwrap(),
                (
                    String::from_utf8(entry.value.to_vec()).unwrap(),
                    entry.version,
                ),
            )
        })
        .collect()
}

fn expected(pairs: &[(&str, &str, u64)]) -> std::collections::BTreeMap<String, (String, u64)> {
    pairs
        .iter()
        .map(|(key, value, version)| (key.to_string(), (value.to_string(), *version)))
        .collect()
}

/// A change as `(key, value, version, previous_version, from_snapshot)`.
type Seen = (String, Option<String>, u64, Option<u64>, bool);

fn seen(change: crate::Change) -> Seen {
    (
        String::from_utf8(change.key.to_vec()).unwrap(),
        change
            .value
            .map(|value| String::from_utf8(value.to_vec()).unwrap()),
        change.version,
        change.previous_version,
        change.from_snapshot,
    )
}

async fn next_changes(changes: &mut crate::Changes, count: usize) -> Vec<Seen> {
    let mut out = Vec::new();
    for _ in 0..count {
        out.push(seen(bounded(changes.recv()).await.unwrap()));
    }
    out
}

/// Makes the fake unreachable for followers (and ends their subscriptions), runs `change` on
/// its state, then makes it reachable again: a broker restart during which the log changed.
fn while_down(broker: &FakeBroker, change: impl FnOnce(&mut State)) {
    let mut state = broker.lock();
    state.unavailable = true;
    change(&mut state);
}

fn back_up(broker: &FakeBroker) {
    broker.lock().unavailable = false;
}

/// Compacts a partition like the broker's cleaner: keeps each key's latest record, drops every
/// delete, and moves the compaction horizon to the end of the log.
fn compact(log: &mut PartitionLog) {
    let mut latest: HashMap<Bytes, u64> = HashMap::new();
    for batch in &log.batches {
        for record in batch.records() {
            let record = record.unwrap();
            latest.insert(record.key.unwrap(), record.offset);
        }
    }
    let mut kept = Vec::new();
    for batch in &log.batches {
        for record in batch.records() {
            let record = record.unwrap();
            let key = record.key.clone().unwrap();
            if latest[&key] != record.offset || record.value.is_none() {
                continue;
            }
            let mut builder = BatchBuilder::new();
            builder.push(record.timestamp, Some(&key), record.value.as_deref(), &[]);
            let mut bytes = BytesMut::from(&builder.finish().unwrap()[..]);
            stamp_base_offset(&mut bytes, record.offset);
            kept.push(Batch::parse(bytes.freeze()).unwrap());
        }
    }
    log.batches = kept;
    log.compaction_horizon = log.end_offset;
}

#[tokio::test]
async fn sync_table_should_load_the_snapshot_then_tail_with_previous_versions() {
    let (client, broker) = start().await;
    let writer = table(&client, 1).await;
    writer.put("a", "1").await.unwrap(); // 0
    writer.put("b", "1").await.unwrap(); // 1
    writer.put("a", "2").await.unwrap(); // 2
    writer.put("c", "1").await.unwrap(); // 3
    writer.delete("c").await.unwrap(); // 4

    let replica = client
        .sync_table_with("table", sync_config())
        .await
        .unwrap();
    bounded(replica.wait_caught_up()).await.unwrap();
    assert_eq!(
        contents(&replica),
        expected(&[("a", "2", 2), ("b", "1", 1)])
    );
    assert_eq!(replica.len(), 2);
    assert_eq!(replica.next_offset(0), Some(5));
    assert_eq!(broker.lock().snapshot_requests, 1);

    let (before, mut changes) = replica.entries_and_changes();
    assert_eq!(before.len(), 2);
    let written = writer.put("b", "2").await.unwrap();
    assert_eq!(written.version, 5);
    bounded(replica.wait_for_write(written)).await.unwrap();
    assert_eq!(replica.get("b").unwrap().version, 5);
    writer.delete("a").await.unwrap(); // 6
    writer.put("d", "1").await.unwrap(); // 7
    writer.delete("nothing").await.unwrap(); // 8: a delete of an absent key changes nothing
    let last = writer.put("d", "2").await.unwrap(); // 9
    bounded(replica.wait_for_write(last)).await.unwrap();
    assert_eq!(
        next_changes(&mut changes, 4).await,
        [
            ("b".into(), Some("2".into()), 5, Some(1), false),
            ("a".into(), None, 6, Some(2), false),
            ("d".into(), Some("1".into()), 7, None, false),
            ("d".into(), Some("2".into()), 9, Some(7), false),
        ]
    );
    assert_eq!(
        contents(&replica),
        expected(&[("b", "2", 5), ("d", "2", 9)])
    );
    // Only the tail was used after the first load.
    assert_eq!(broker.lock().snapshot_requests, 1);
}

#[tokio::test]
async fn sync_table_changes_from_open_should_rebuild_the_table() {
    let (client, _broker) = start().await;
    let writer = table(&client, 3).await;
    for i in 0..20 {
        writer
            .put(format!("k{}", i % 7), format!("v{i}"))
            .await
            .unwrap();
    }
    let replica = client
        .sync_table_with("table", sync_config())
        .await
        .unwrap();
    // Subscribed before the first load: the load arrives as puts without previous versions.
    let mut changes = replica.changes();
    bounded(replica.wait_caught_up()).await.unwrap();
    let mut rebuilt = std::collections::BTreeMap::new();
    for _ in 0..7 {
        let change = bounded(changes.recv()).await.unwrap();
        assert!(change.from_snapshot);
        assert_eq!(change.previous_version, None);
        rebuilt.insert(change.key, (change.value.unwrap(), change.version));
    }
    let table: std::collections::BTreeMap<_, _> = replica
        .entries()
        .into_iter()
        .map(|(key, entry)| (key, (entry.value, entry.version)))
        .collect();
    assert_eq!(rebuilt, table);
}

#[tokio::test]
async fn given_resumed_subscription_overlapping_applied_records_should_apply_each_once() {
    let (client, broker) = start().await;
    let writer = table(&client, 2).await;
    broker.lock().subscribe_overlap = true;
    let replica = client
        .sync_table_with("table", sync_config())
        .await
        .unwrap();
    bounded(replica.wait_caught_up()).await.unwrap();
    let mut changes = replica.changes();
    let mut written = Vec::new();
    for round in 0..4 {
        for i in 0..5 {
            written.push(
                writer
                    .put(format!("k{i}"), format!("{round}"))
                    .await
                    .unwrap(),
            );
        }
        for last in &written {
            bounded(replica.wait_for_write(*last)).await.unwrap();
        }
        // Drop every subscription: the table resubscribes, and the fake's first response
        // starts at the log start again.
        broker.lock().subscription_generation += 1;
    }
    let received = next_changes(&mut changes, written.len()).await;
    let mut by_partition: HashMap<u32, Vec<u64>> = HashMap::new();
    for change in &received {
        let partition = partition_for_key(change.0.as_bytes(), 2);
        by_partition.entry(partition).or_default().push(change.2);
    }
    let mut expected_by_partition: HashMap<u32, Vec<u64>> = HashMap::new();
    for write in &written {
        expected_by_partition
            .entry(write.partition)
            .or_default()
            .push(write.version);
    }
    assert_eq!(
        by_partition, expected_by_partition,
        "every write once, in order"
    );
    // No further change is pending (a duplicate would be).
    assert!(
        tokio::time::timeout(Duration::from_millis(100), changes.recv())
            .await
            .is_err(),
        "no duplicate"
    );
    assert!(broker.lock().subscribe_requests >= 2 * 4);
    assert_eq!(
        broker.lock().snapshot_requests,
        2,
        "resumed, not re-snapshotted"
    );
}

#[tokio::test]
async fn given_compaction_horizon_above_the_position_should_resnapshot_and_emit_the_diff() {
    let (client, broker) = start().await;
    let writer = table(&client, 1).await;
    writer.put("a", "1").await.unwrap(); // 0
    writer.put("b", "1").await.unwrap(); // 1
    writer.put("c", "1").await.unwrap(); // 2
    let replica = client
        .sync_table_with("table", sync_config())
        .await
        .unwrap();
    bounded(replica.wait_caught_up()).await.unwrap();
    let (_, mut changes) = replica.entries_and_changes();

    while_down(&broker, |_| {});
    writer.put("a", "2").await.unwrap(); // 3
    writer.delete("b").await.unwrap(); // 4
    writer.put("d", "1").await.unwrap(); // 5
    writer.put("x", "1").await.unwrap(); // 6
    writer.delete("x").await.unwrap(); // 7
    compact(&mut broker.lock().topics.get_mut("table").unwrap()[0]);
    back_up(&broker);

    assert_eq!(
        next_changes(&mut changes, 3).await,
        [
            ("a".into(), Some("2".into()), 3, Some(0), true),
            ("d".into(), Some("1".into()), 5, None, true),
            // The tombstone is gone: the delete carries the snapshot's last offset.
            ("b".into(), None, 7, Some(1), true),
        ]
    );
    assert_eq!(
        contents(&replica),
        expected(&[("a", "2", 3), ("c", "1", 2), ("d", "1", 5)])
    );
    assert_eq!(replica.next_offset(0), Some(8));
    assert_eq!(broker.lock().snapshot_requests, 2);
    // And tails on from the new H.
    let written = writer.put("e", "1").await.unwrap();
    assert_eq!(
        next_changes(&mut changes, 1).await,
        [("e".into(), Some("1".into()), written.version, None, false)]
    );
}

#[tokio::test]
async fn given_position_out_of_range_should_resnapshot() {
    let (client, broker) = start().await;
    let writer = table(&client, 1).await;
    writer.put("a", "1").await.unwrap(); // 0
    writer.put("b", "1").await.unwrap(); // 1
    let replica = client
        .sync_table_with("table", sync_config())
        .await
        .unwrap();
    bounded(replica.wait_caught_up()).await.unwrap();
    let (_, mut changes) = replica.entries_and_changes();

    while_down(&broker, |_| {});
    writer.put("b", "2").await.unwrap(); // 2
    writer.put("c", "1").await.unwrap(); // 3
    {
        // Retention removes the first two batches: the table's position (2) is still in the
        // log, so remove one more to pass it.
        let mut state = broker.lock();
        let log = &mut state.topics.get_mut("table").unwrap()[0];
        log.batches.drain(..3);
        log.log_start_offset = 3;
    }
    back_up(&broker);
    assert_eq!(
        next_changes(&mut changes, 3).await,
        [
            ("c".into(), Some("1".into()), 3, None, true),
            ("a".into(), None, 3, Some(0), true),
            ("b".into(), None, 3, Some(1), true),
        ]
    );
    assert_eq!(contents(&replica), expected(&[("c", "1", 3)]));
    assert_eq!(broker.lock().snapshot_requests, 2);
}

#[tokio::test]
async fn wait_for_should_wait_for_the_offset_and_refuse_unknown_partitions() {
    let (client, _broker) = start().await;
    let writer = table(&client, 2).await;
    let replica = client
        .sync_table_with("table", sync_config())
        .await
        .unwrap();
    bounded(replica.wait_caught_up()).await.unwrap();
    assert!(replica.is_empty());
    let partition = writer.partition_of("k");
    // Nothing at offset 0 yet: the wait does not end.
    assert!(
        tokio::time::timeout(Duration::from_millis(100), replica.wait_for(partition, 0))
            .await
            .is_err()
    );
    let waiting = {
        let replica = replica.clone();
        tokio::spawn(async move { replica.wait_for(partition, 0).await })
    };
    let written = writer.put("k", "v").await.unwrap();
    assert_eq!((written.partition, written.version), (partition, 0));
    bounded(waiting).await.unwrap().unwrap();
    assert_eq!(replica.get("k").unwrap().value, "v");
    assert!(matches!(
        replica.wait_for(2, 0).await,
        Err(Error::UnknownPartition { partition: 2, .. })
    ));
    replica.close();
    assert!(matches!(
        replica.wait_for(partition, 100).await,
        Err(Error::Closed(_))
    ));
}

#[tokio::test]
async fn slow_change_receiver_should_be_told_it_lagged() {
    let (client, _broker) = start().await;
    let writer = table(&client, 1).await;
    let config = crate::SyncTableConfig {
        changes_max: 2,
        ..sync_config()
    };
    let replica = client.sync_table_with("table", config).await.unwrap();
    bounded(replica.wait_caught_up()).await.unwrap();
    let mut changes = replica.changes();
    let mut last = None;
    for i in 0..5 {
        last = Some(writer.put(format!("k{i}"), "v").await.unwrap());
    }
    bounded(replica.wait_for_write(last.unwrap()))
        .await
        .unwrap();
    assert!(matches!(
        changes.recv().await,
        Err(Error::ChangesLagged { missed: 3 })
    ));
    assert_eq!(changes.recv().await.unwrap().version, 3);
}

#[tokio::test]
async fn sync_table_should_refuse_a_topic_that_is_not_a_table_and_report_snapshot_errors() {
    let (client, broker) = start().await;
    client
        .create_topic("events", TopicConfig::with_partitions(1))
        .await
        .unwrap();
    assert!(matches!(
        client.sync_table("events").await,
        Err(Error::NotATable { .. })
    ));
    assert!(matches!(
        client.sync_table("missing").await,
        Err(Error::Broker {
            code: Code::NotFound,
            ..
        })
    ));
    // The topic disappears under the table: NOT_FOUND is not retried.
    table(&client, 1).await;
    let replica = client
        .sync_table_with("table", sync_config())
        .await
        .unwrap();
    bounded(replica.wait_caught_up()).await.unwrap();
    broker.lock().topics.remove("table");
    broker.lock().subscription_generation += 1;
    let error = bounded(replica.wait_for(0, 0)).await.unwrap_err();
    assert!(
        matches!(
            error,
            Error::Broker {
                code: Code::NotFound,
                ..
            }
        ),
        "{error:?}"
    );
    assert!(replica.error().is_some());
}

#[tokio::test]
async fn given_broker_unavailable_for_a_while_should_resume_from_the_next_offset_without_a_snapshot(
) {
    let (client, broker) = start().await;
    let writer = table(&client, 1).await;
    writer.put("a", "1").await.unwrap(); // 0
    let replica = client
        .sync_table_with("table", sync_config())
        .await
        .unwrap();
    bounded(replica.wait_caught_up()).await.unwrap();
    let (_, mut changes) = replica.entries_and_changes();
    while_down(&broker, |_| {});
    writer.put("a", "2").await.unwrap(); // 1
    writer.put("b", "1").await.unwrap(); // 2
                                         // The table tries to resume while the broker is down, and is refused.
    bounded(async {
        while broker.lock().refused_while_unavailable == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
    back_up(&broker);
    let last = writer.put("a", "3").await.unwrap(); // 3
    bounded(replica.wait_for_write(last)).await.unwrap();
    assert_eq!(
        next_changes(&mut changes, 3).await,
        [
            ("a".into(), Some("2".into()), 1, Some(0), false),
            ("b".into(), Some("1".into()), 2, None, false),
            ("a".into(), Some("3".into()), 3, Some(1), false),
        ]
    );
    assert_eq!(
        broker.lock().snapshot_requests,
        1,
        "resumed, not re-snapshotted"
    );
    assert!(replica.error().is_none());
}

#[tokio::test]
async fn snapshot_call_should_give_h_then_every_live_key_in_ascending_chunks() {
    let (client, _broker) = start().await;
    let writer = table(&client, 1).await;
    for (key, value) in [("a", "1"), ("b", "1"), ("c", "1"), ("a", "2"), ("d", "1")] {
        writer.put(key, value).await.unwrap();
    }
    writer.delete("b").await.unwrap(); // 5
    let mut snapshot = client.snapshot("table", 0).await.unwrap();
    assert_eq!(snapshot.high_watermark(), 6);
    assert_eq!(snapshot.keys_total(), 3);
    let mut chunks = 0;
    let mut records = Vec::new();
    while let Some(chunk) = snapshot.next_chunk().await.unwrap() {
        chunks += 1;
        records.extend(chunk.into_iter().map(|record| {
            (
                String::from_utf8(record.key.unwrap().to_vec()).unwrap(),
                record.offset,
            )
        }));
    }
    assert_eq!(
        records,
        [
            ("c".to_owned(), 2),
            ("a".to_owned(), 3),
            ("d".to_owned(), 4)
        ]
    );
    assert_eq!(chunks, 3, "two records a message, then the final one");
    assert!(snapshot.next_chunk().await.unwrap().is_none());
    let missing = client.snapshot("missing", 0).await.unwrap_err();
    assert_eq!(missing.code(), Some(Code::NotFound));
}

#[tokio::test]
async fn given_snapshot_cut_short_sync_table_should_load_it_again() {
    let (client, broker) = start().await;
    let writer = table(&client, 1).await;
    for key in ["a", "b", "c"] {
        writer.put(key, "1").await.unwrap();
    }
    broker.lock().cut_next_snapshot = true;
    let replica = client
        .sync_table_with("table", sync_config())
        .await
        .unwrap();
    bounded(replica.wait_caught_up()).await.unwrap();
    assert_eq!(
        contents(&replica),
        expected(&[("a", "1", 0), ("b", "1", 1), ("c", "1", 2)])
    );
    assert_eq!(broker.lock().snapshot_requests, 2);
    assert!(replica.error().is_none());
}

#[tokio::test]
async fn given_one_partition_stops_the_table_the_others_should_stop_applying_too() {
    let (client, _broker) = start().await;
    let writer = table(&client, 2).await;
    // One key in each partition, then a table that holds at most those two.
    let key_in = |partition: u32, skip: &str| {
        (0..)
            .map(|i| format!("k{i}"))
            .find(|key| key != skip && writer.partition_of(key) == partition)
            .unwrap()
    };
    let first = key_in(0, "");
    let second = key_in(1, "");
    let extra = key_in(0, &first);
    writer.put(&first, "1").await.unwrap();
    let kept = writer.put(&second, "1").await.unwrap();
    let config = crate::SyncTableConfig {
        keys_max: 2,
        ..sync_config()
    };
    let replica = client.sync_table_with("table", config).await.unwrap();
    bounded(replica.wait_caught_up()).await.unwrap();
    // A third key stops the table (partition 0's follower hits the key limit)...
    writer.put(&extra, "1").await.unwrap();
    let error = bounded(replica.wait_for(0, u64::MAX - 1))
        .await
        .unwrap_err();
    assert!(matches!(error, Error::TableTooLarge { .. }), "{error:?}");
    // ...so a later write to partition 1 must not change the copy: reads serve the last state.
    let later = writer.put(&second, "2").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(replica.get(&second).unwrap().version, kept.version);
    assert!(replica.next_offset(1).unwrap() <= later.version);
}

// ----- Group consumer against the fake coordinator ------------------------------------------

/// Appends one batch of `values` to `topic`/`partition` of the fake, as a produce would.
fn append_values(broker: &FakeBroker, topic: &str, partition: u32, values: &[&str]) {
    let mut builder = BatchBuilder::new();
    for value in values {
        builder.push(1_000, None, Some(value.as_bytes()), &[]);
    }
    let request = v1::ProduceRequest {
        topic: topic.to_owned(),
        partition,
        batch: builder.finish().unwrap(),
        ..Default::default()
    };
    broker.append(&request, &[]).unwrap();
}

/// Sets the assignment every member of `group` gets from now on (a new epoch).
fn assign(broker: &FakeBroker, group: &str, partitions: &[(&str, u32)]) {
    let mut state = broker.lock();
    let group = state.groups.entry(group.to_owned()).or_default();
    group.epoch += 1;
    group.target = partitions
        .iter()
        .map(|(topic, partition)| ((*topic).to_owned(), *partition))
        .collect();
}

fn group_calls(broker: &FakeBroker) -> Vec<GroupCall> {
    broker.lock().group_calls.clone()
}

/// Waits (up to 5 s) until the calls so far satisfy `done`; returns them.
async fn wait_for_calls(
    broker: &FakeBroker,
    done: impl Fn(&[GroupCall]) -> bool,
) -> Vec<GroupCall> {
    bounded(async {
        loop {
            let calls = group_calls(broker);
            if done(&calls) {
                return calls;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
}

fn manual_commits() -> crate::GroupConsumerConfig {
    crate::GroupConsumerConfig {
        auto_commit_interval: None,
        retry_backoff: Duration::from_millis(5),
        retry_backoff_max: Duration::from_millis(20),
        ..crate::GroupConsumerConfig::default()
    }
}

async fn next_group_record(consumer: &mut crate::GroupConsumer) -> (String, u32, u64, String) {
    let record = bounded(consumer.recv())
        .await
        .expect("consumer running")
        .expect("a record");
    (
        record.topic.to_string(),
        record.partition,
        record.offset,
        String::from_utf8(record.value.unwrap().to_vec()).unwrap(),
    )
}

async fn next_event(events: &mut crate::GroupEvents) -> crate::GroupEvent {
    bounded(events.recv())
        .await
        .expect("events")
        .expect("no lag")
}

fn tp(topic: &str, partition: u32) -> crate::TopicPartition {
    crate::TopicPartition::new(topic, partition)
}

#[tokio::test]
async fn given_committed_offset_when_assigned_should_read_from_it() {
    let (client, broker) = start().await;
    client
        .create_topic("t", TopicConfig::with_partitions(1))
        .await
        .unwrap();
    append_values(&broker, "t", 0, &["a", "b", "c", "d", "e"]);
    assign(&broker, "g", &[("t", 0)]);
    broker
        .lock()
        .groups
        .get_mut("g")
        .unwrap()
        .commits
        .insert(("t".into(), 0), 2);
    let mut consumer = client
        .group_consumer("g", &["t"], manual_commits())
        .await
        .unwrap();
    let mut events = consumer.events();
    assert_eq!(
        next_event(&mut events).await,
        crate::GroupEvent::Assigned(vec![tp("t", 0)])
    );
    assert_eq!(consumer.member_id(), "m-1");
    assert_eq!(consumer.assignment(), [tp("t", 0)]);
    for (offset, value) in [(2, "c"), (3, "d"), (4, "e")] {
        assert_eq!(
            next_group_record(&mut consumer).await,
            ("t".to_owned(), 0, offset, value.to_owned())
        );
    }
    assert_eq!(consumer.position("t", 0), Some(5));
    consumer.commit().await.unwrap();
    assert_eq!(broker.lock().groups["g"].commits[&("t".to_owned(), 0)], 5);
}

#[tokio::test]
async fn given_revocation_should_commit_processed_positions_before_reporting_the_release() {
    let (client, broker) = start().await;
    client
        .create_topic("t", TopicConfig::with_partitions(2))
        .await
        .unwrap();
    append_values(&broker, "t", 0, &["a", "b", "c"]);
    append_values(&broker, "t", 1, &["x", "y"]);
    assign(&broker, "g", &[("t", 0), ("t", 1)]);
    let mut consumer = client
        .group_consumer("g", &["t"], manual_commits())
        .await
        .unwrap();
    let mut events = consumer.events();
    let mut seen = Vec::new();
    for _ in 0..5 {
        seen.push(next_group_record(&mut consumer).await);
    }
    // Per-partition order holds whatever the interleaving.
    let offsets = |partition: u32| -> Vec<u64> {
        seen.iter()
            .filter(|record| record.1 == partition)
            .map(|record| record.2)
            .collect()
    };
    assert_eq!(offsets(0), [0, 1, 2]);
    assert_eq!(offsets(1), [0, 1]);

    assign(&broker, "g", &[("t", 1)]);
    let epoch = broker.lock().groups["g"].epoch;
    let calls = wait_for_calls(&broker, |calls| {
        calls.iter().any(|call| {
            matches!(call, GroupCall::Heartbeat { owned, .. } if owned == &[("t".to_owned(), 1)])
        })
    })
    .await;
    let commit = calls
        .iter()
        .position(|call| {
            matches!(call, GroupCall::Commit { epoch: e, offsets }
                if *e == epoch && offsets == &[("t".to_owned(), 0, 3)])
        })
        .expect("a commit of partition 0 at offset 3 with the new epoch");
    let released = calls
        .iter()
        .position(|call| {
            matches!(call, GroupCall::Heartbeat { owned, .. } if owned == &[("t".to_owned(), 1)])
        })
        .unwrap();
    assert!(commit < released, "commit before release: {calls:?}");
    // Partition 1 was not revoked: nothing committed for it yet.
    assert!(!calls
        .iter()
        .any(|call| matches!(call, GroupCall::Commit { offsets, .. }
        if offsets.iter().any(|offset| offset.1 == 1))));
    let mut revoked = None;
    while revoked.is_none() {
        if let crate::GroupEvent::Revoked(partitions) = next_event(&mut events).await {
            revoked = Some(partitions);
        }
    }
    assert_eq!(revoked.unwrap(), [tp("t", 0)]);
    assert_eq!(consumer.assignment(), [tp("t", 1)]);
}

#[tokio::test]
async fn given_not_found_should_rejoin_without_committing_and_read_again_from_the_commit() {
    let (client, broker) = start().await;
    client
        .create_topic("t", TopicConfig::with_partitions(1))
        .await
        .unwrap();
    append_values(&broker, "t", 0, &["a", "b", "c"]);
    assign(&broker, "g", &[("t", 0)]);
    let mut consumer = client
        .group_consumer("g", &["t"], manual_commits())
        .await
        .unwrap();
    let mut events = consumer.events();
    assert!(matches!(
        next_event(&mut events).await,
        crate::GroupEvent::Assigned(_)
    ));
    assert_eq!(next_group_record(&mut consumer).await.2, 0);
    assert_eq!(next_group_record(&mut consumer).await.2, 1);

    // The coordinator forgets the member (session expired, broker restarted).
    broker.lock().groups.get_mut("g").unwrap().members.clear();
    assert_eq!(
        next_event(&mut events).await,
        crate::GroupEvent::Lost(vec![tp("t", 0)])
    );
    assert_eq!(
        next_event(&mut events).await,
        crate::GroupEvent::Assigned(vec![tp("t", 0)])
    );
    let calls = group_calls(&broker);
    let joins: Vec<&GroupCall> = calls
        .iter()
        .filter(|call| matches!(call, GroupCall::Join { .. }))
        .collect();
    assert_eq!(
        joins,
        [
            &GroupCall::Join {
                member_id: "m-1".into()
            },
            &GroupCall::Join {
                member_id: "m-1".into()
            }
        ],
        "rejoined with the same id"
    );
    assert!(
        !calls
            .iter()
            .any(|call| matches!(call, GroupCall::Commit { .. })),
        "no commit for partitions it no longer owns: {calls:?}"
    );
    // Without a commit, the partition starts over from the earliest offset.
    assert_eq!(next_group_record(&mut consumer).await.2, 0);
}

#[tokio::test]
async fn given_revoked_partition_its_buffered_records_should_not_be_handed_out() {
    let (client, broker) = start().await;
    client
        .create_topic("t", TopicConfig::with_partitions(1))
        .await
        .unwrap();
    append_values(&broker, "t", 0, &["a", "b", "c", "d", "e", "f"]);
    assign(&broker, "g", &[("t", 0)]);
    let mut consumer = client
        .group_consumer("g", &["t"], manual_commits())
        .await
        .unwrap();
    let mut events = consumer.events();
    // One record handed out; the rest of the response is buffered.
    assert_eq!(next_group_record(&mut consumer).await.2, 0);
    assign(&broker, "g", &[]);
    loop {
        if let crate::GroupEvent::Revoked(partitions) = next_event(&mut events).await {
            assert_eq!(partitions, [tp("t", 0)]);
            break;
        }
    }
    let more = tokio::time::timeout(Duration::from_millis(300), consumer.recv()).await;
    assert!(
        more.is_err(),
        "nothing handed out after revocation: {more:?}"
    );
    // Record 0 was still held (no `recv` after it): no commit covers it, so its next owner
    // reads it again.
    assert!(!broker.lock().groups["g"]
        .commits
        .contains_key(&("t".to_owned(), 0)));
    assert!(consumer.assignment().is_empty());
}

#[tokio::test]
async fn given_processed_on_commit_only_when_a_batch_in_hand_is_revoked_should_commit_only_what_was_committed(
) {
    let (client, broker) = start().await;
    client
        .create_topic("t", TopicConfig::with_partitions(1))
        .await
        .unwrap();
    append_values(&broker, "t", 0, &["a", "b", "c", "d", "e", "f"]);
    assign(&broker, "g", &[("t", 0)]);
    let config = crate::GroupConsumerConfig {
        processed_on_commit_only: true,
        auto_commit_interval: Some(Duration::from_millis(20)),
        ..manual_commits()
    };
    let mut consumer = client.group_consumer("g", &["t"], config).await.unwrap();
    let mut events = consumer.events();
    // A first batch, committed by the application.
    for _ in 0..2 {
        next_group_record(&mut consumer).await;
    }
    consumer.commit().await.unwrap();
    // A second batch in hand (three records asked for one after another), not committed.
    for _ in 0..3 {
        next_group_record(&mut consumer).await;
    }
    // Auto-commits and the revocation store only the application's commit: offset 2.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assign(&broker, "g", &[]);
    loop {
        if let crate::GroupEvent::Revoked(_) = next_event(&mut events).await {
            break;
        }
    }
    let committed = broker.lock().groups["g"]
        .commits
        .get(&("t".to_owned(), 0))
        .copied();
    assert_eq!(committed, Some(2), "{:?}", group_calls(&broker));
}

#[tokio::test]
async fn auto_commit_should_commit_handed_out_records_and_close_should_commit_then_leave() {
    let (client, broker) = start().await;
    client
        .create_topic("t", TopicConfig::with_partitions(1))
        .await
        .unwrap();
    append_values(&broker, "t", 0, &["a", "b", "c"]);
    assign(&broker, "g", &[("t", 0)]);
    let config = crate::GroupConsumerConfig {
        auto_commit_interval: Some(Duration::from_millis(50)),
        ..manual_commits()
    };
    let mut consumer = client.group_consumer("g", &["t"], config).await.unwrap();
    for _ in 0..2 {
        next_group_record(&mut consumer).await;
    }
    // Record 1 is still held: the auto-commit covers record 0 only.
    wait_for_calls(&broker, |calls| {
        calls.iter().any(|call| {
            matches!(call, GroupCall::Commit { offsets, .. } if offsets == &[("t".to_owned(), 0, 1)])
        })
    })
    .await;
    // No new record: no more commits.
    let commits = |calls: &[GroupCall]| {
        calls
            .iter()
            .filter(|call| matches!(call, GroupCall::Commit { .. }))
            .count()
    };
    let before = commits(&group_calls(&broker));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(commits(&group_calls(&broker)), before);

    next_group_record(&mut consumer).await;
    consumer.close().await.unwrap();
    let calls = group_calls(&broker);
    let last_two = &calls[calls.len() - 2..];
    assert!(
        matches!(&last_two[0], GroupCall::Commit { offsets, .. } if offsets == &[("t".to_owned(), 0, 3)]),
        "{calls:?}"
    );
    assert_eq!(last_two[1], GroupCall::Leave);
    assert!(broker.lock().groups["g"].members.is_empty());
}

#[tokio::test]
async fn abort_should_neither_commit_nor_leave() {
    let (client, broker) = start().await;
    client
        .create_topic("t", TopicConfig::with_partitions(1))
        .await
        .unwrap();
    append_values(&broker, "t", 0, &["a"]);
    assign(&broker, "g", &[("t", 0)]);
    let mut consumer = client
        .group_consumer("g", &["t"], crate::GroupConsumerConfig::default())
        .await
        .unwrap();
    next_group_record(&mut consumer).await;
    consumer.abort();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let calls = group_calls(&broker);
    assert!(
        !calls
            .iter()
            .any(|call| matches!(call, GroupCall::Commit { .. } | GroupCall::Leave)),
        "{calls:?}"
    );
    assert_eq!(broker.lock().groups["g"].members.len(), 1);
}

#[tokio::test]
async fn standalone_commit_and_fetch_offsets_should_round_trip() {
    let (client, _broker) = start().await;
    client
        .commit_offsets(
            "g",
            &[
                crate::OffsetCommit::new("t", 1, 7),
                crate::OffsetCommit::new("t", 0, 3),
            ],
        )
        .await
        .unwrap();
    let all = client.fetch_offsets("g", None).await.unwrap();
    assert_eq!(
        all.iter()
            .map(|offset| (offset.partition, offset.offset))
            .collect::<Vec<_>>(),
        [(0, 3), (1, 7)]
    );
    let one = client
        .fetch_offsets("g", Some(&[tp("t", 1)]))
        .await
        .unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].offset, 7);
}

/// The record the application holds (handed out, the next `recv` not yet called) may still be
/// in processing: a background commit (auto-commit, revocation) covering it would skip it if
/// the application crashed before finishing it.
#[tokio::test]
async fn background_commits_should_not_cover_the_record_the_application_still_holds() {
    let (client, broker) = start().await;
    client
        .create_topic("t", TopicConfig::with_partitions(1))
        .await
        .unwrap();
    append_values(&broker, "t", 0, &["a", "b", "c"]);
    assign(&broker, "g", &[("t", 0)]);
    let config = crate::GroupConsumerConfig {
        auto_commit_interval: Some(Duration::from_millis(20)),
        ..manual_commits()
    };
    let mut consumer = client.group_consumer("g", &["t"], config).await.unwrap();
    let mut events = consumer.events();
    assert_eq!(next_group_record(&mut consumer).await.2, 0);
    assert_eq!(next_group_record(&mut consumer).await.2, 1);
    // Asking for record 1 said record 0 is done: auto-commit may store 1, never 2 while record
    // 1 is still held.
    wait_for_calls(&broker, |calls| {
        calls.iter().any(|call| {
            matches!(call, GroupCall::Commit { offsets, .. } if offsets == &[("t".to_owned(), 0, 1)])
        })
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The revocation commit must not cover it either.
    assign(&broker, "g", &[]);
    loop {
        if let crate::GroupEvent::Revoked(_) = next_event(&mut events).await {
            break;
        }
    }
    let calls = group_calls(&broker);
    assert!(
        !calls
            .iter()
            .any(|call| matches!(call, GroupCall::Commit { offsets, .. }
            if offsets.iter().any(|offset| offset.2 > 1))),
        "a commit covered the record still held: {calls:?}"
    );
    assert_eq!(broker.lock().groups["g"].commits[&("t".to_owned(), 0)], 1);
}

/// Waiting in `recv` means the application is done with what it held: an idle member's
/// commits cover everything it was handed (no duplicate for its next owner).
#[tokio::test]
async fn given_application_waiting_in_recv_background_commits_should_cover_every_record() {
    let (client, broker) = start().await;
    client
        .create_topic("t", TopicConfig::with_partitions(1))
        .await
        .unwrap();
    append_values(&broker, "t", 0, &["a", "b"]);
    assign(&broker, "g", &[("t", 0)]);
    let mut consumer = client
        .group_consumer("g", &["t"], manual_commits())
        .await
        .unwrap();
    let mut events = consumer.events();
    assert_eq!(next_group_record(&mut consumer).await.2, 0);
    assert_eq!(next_group_record(&mut consumer).await.2, 1);
    let waiting = tokio::time::timeout(Duration::from_millis(100), consumer.recv()).await;
    assert!(waiting.is_err(), "no third record");
    assign(&broker, "g", &[]);
    loop {
        if let crate::GroupEvent::Revoked(_) = next_event(&mut events).await {
            break;
        }
    }
    assert_eq!(broker.lock().groups["g"].commits[&("t".to_owned(), 0)], 2);
}

/// Every revocation stops a reader task; a long-lived member must not keep them all.
#[tokio::test]
async fn stopped_reader_tasks_should_not_accumulate_over_rebalances() {
    let (client, broker) = start().await;
    client
        .create_topic("t", TopicConfig::with_partitions(1))
        .await
        .unwrap();
    append_values(&broker, "t", 0, &["a"]);
    let mut consumer = client
        .group_consumer("g", &["t"], manual_commits())
        .await
        .unwrap();
    let mut events = consumer.events();
    // Rebalances of partition 0 away and back.
    const REBALANCES: usize = 20;
    for _ in 0..REBALANCES {
        assign(&broker, "g", &[("t", 0)]);
        while !matches!(
            next_event(&mut events).await,
            crate::GroupEvent::Assigned(_)
        ) {}
        assign(&broker, "g", &[]);
        while !matches!(next_event(&mut events).await, crate::GroupEvent::Revoked(_)) {}
    }
    // Give the loop a few turns (heartbeats) to reap.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        consumer.reader_tasks() <= 1,
        "{} reader tasks kept after {REBALANCES} revocations",
        consumer.reader_tasks()
    );
}

/// A member may own up to `ASSIGNED_PARTITIONS_MAX` partitions, more than one offset lookup
/// carries: the start positions are looked up in several requests.
#[tokio::test]
async fn given_more_new_partitions_than_one_offset_lookup_carries_should_read_them_all() {
    let (client, broker) = start().await;
    let partitions = crate::OFFSETS_PER_REQUEST_MAX as u32 + 1;
    client
        .create_topic("t", TopicConfig::with_partitions(partitions))
        .await
        .unwrap();
    let all: Vec<(&str, u32)> = (0..partitions).map(|partition| ("t", partition)).collect();
    assign(&broker, "g", &all);
    append_values(&broker, "t", partitions - 1, &["last"]);
    // Committed offsets for all, so that the start needs no per-partition ListOffsets.
    broker
        .lock()
        .groups
        .get_mut("g")
        .unwrap()
        .commits
        .extend((0..partitions).map(|partition| (("t".to_owned(), partition), 0)));
    let mut consumer = client
        .group_consumer("g", &["t"], manual_commits())
        .await
        .unwrap();
    let record = bounded(consumer.recv()).await.expect("consumer running");
    let record = record.expect("a record, not the member's failure");
    assert_eq!((record.partition, record.offset), (partitions - 1, 0));
    assert_eq!(consumer.assignment().len(), partitions as usize);
}
