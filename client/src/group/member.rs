//! The member's background task: joining, the heartbeat loop, auto-commit and the commands
//! of the handle; what it does with an assignment is in `assignment`, its offset commits in
//! `commit`.

mod assignment;
mod commit;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use syncline_proto::v1;
use tokio::sync::{broadcast, mpsc};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;
use tonic::Code;

use super::buffer::Shared;
use super::{partition_of, Command, GroupConsumerConfig, GroupEvent, Key, TopicPartition};
use crate::client::Client;
use crate::consumer::ConsumerConfig;
use crate::error::{Error, Result};
use crate::group_admin::{from_wire_partitions, to_wire_partitions};
use crate::routing::Grpc;

/// Heartbeat interval bounds, whatever the coordinator asks: not faster than this (a broker
/// bug must not become a busy loop) and not slower than a third of the session.
const HEARTBEAT_INTERVAL_MIN: Duration = Duration::from_millis(10);

/// One partition being read.
#[derive(Debug)]
pub(super) struct Reader {
    token: u64,
    /// `None` when reading could not start (a reader error was yielded).
    task: Option<AbortHandle>,
    /// The last committed position (or the start position): commit only past it.
    committed: u64,
}

/// The background task's state: membership, epoch, readers.
pub(super) struct Member {
    pub(super) client: Client,
    pub(super) group: String,
    pub(super) topics: Vec<String>,
    pub(super) client_id: String,
    pub(super) config: GroupConsumerConfig,
    pub(super) reader_config: ConsumerConfig,
    pub(super) shared: Arc<Shared>,
    pub(super) member_id: String,
    pub(super) epoch: u32,
    /// False after the coordinator forgot the member, until it joined again.
    pub(super) joined: bool,
    pub(super) heartbeat_interval: Duration,
    /// The pause before the next retry of a failed coordinator call.
    pub(super) backoff: Duration,
    pub(super) readers: BTreeMap<Key, Reader>,
    pub(super) tasks: JoinSet<()>,
    pub(super) next_token: u64,
    pub(super) events: broadcast::Sender<GroupEvent>,
    pub(super) commands: mpsc::Receiver<Command>,
}

/// Whether the coordinator no longer knows this member as it thinks it is: join again.
fn is_fenced(error: &Error) -> bool {
    matches!(
        error,
        Error::Broker {
            code: Code::NotFound | Code::FailedPrecondition,
            ..
        }
    )
}

impl Member {
    pub(super) async fn run(mut self, joined: v1::JoinGroupResponse) {
        let mut next_heartbeat = match self.accept_join(joined).await {
            Ok(next) => next,
            Err(error) => return self.fail(error),
        };
        let auto_commit = self.config.auto_commit_interval;
        let mut next_auto_commit = auto_commit.map(|interval| Instant::now() + interval);
        loop {
            // Stopped readers (revoked, lost, failed) stay in the set until reaped: without
            // this each rebalance would keep their tasks' memory for good.
            while self.tasks.try_join_next().is_some() {}
            #[cfg(test)]
            self.shared
                .reader_tasks
                .store(self.tasks.len(), std::sync::atomic::Ordering::Relaxed);
            let auto_commit_at = next_auto_commit;
            tokio::select! {
                () = tokio::time::sleep_until(next_heartbeat) => {
                    next_heartbeat = match self.tick().await {
                        Ok(next) => next,
                        Err(error) => return self.fail(error),
                    };
                }
                () = async {
                    match auto_commit_at {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => {
                    if let Err(error) = self.commit_processed().await {
                        tracing::warn!(group = %self.group, %error, "auto-commit failed");
                        if !self.joined {
                            next_heartbeat = Instant::now();
                        }
                    }
                    next_auto_commit = auto_commit.map(|interval| Instant::now() + interval);
                }
                command = self.commands.recv() => match command {
                    // The handle is gone (dropped): its Drop aborts this task anyway.
                    None => return,
                    Some(Command::Commit(reply)) => {
                        let result = self.commit_processed().await;
                        if !self.joined {
                            next_heartbeat = Instant::now();
                        }
                        let _ = reply.send(result);
                    }
                    Some(Command::Close(reply)) => {
                        let result = self.close().await;
                        let _ = reply.send(result);
                        return;
                    }
                },
            }
        }
    }

    /// A heartbeat, or a join when the coordinator forgot the member. Returns when to do the
    /// next one; an error is fatal.
    async fn tick(&mut self) -> Result<Instant> {
        if !self.joined {
            return match self.join().await {
                Ok(response) => {
                    self.client.note_reachable();
                    self.backoff = self.config.retry_backoff;
                    self.accept_join(response).await
                }
                Err(error) if error.is_transient() => Ok(self.retry_later(&error, "join")),
                Err(error) => Err(error),
            };
        }
        match self.heartbeat().await {
            Ok(response) => {
                self.client.note_reachable();
                self.backoff = self.config.retry_backoff;
                self.epoch = response.member_epoch;
                self.set_interval(response.heartbeat_interval_ms);
                let assignment = from_wire_partitions(response.assignment);
                let released = self.reconcile(assignment).await?;
                Ok(if released {
                    // Tell the coordinator at once, so the new owners get them quickly.
                    Instant::now()
                } else {
                    Instant::now() + self.heartbeat_interval
                })
            }
            Err(error) if is_fenced(&error) => {
                tracing::warn!(
                    group = %self.group,
                    member = %self.member_id,
                    %error,
                    "the coordinator no longer knows this member; dropping its partitions and joining again"
                );
                self.lose_all();
                Ok(Instant::now())
            }
            Err(error) if error.is_transient() => Ok(self.retry_later(&error, "heartbeat")),
            Err(error) => Err(error),
        }
    }

    fn retry_later(&mut self, error: &Error, what: &str) -> Instant {
        self.client.note_unreachable(error);
        tracing::warn!(group = %self.group, %error, "{what} failed; retrying in {:?}", self.backoff);
        let next = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(self.config.retry_backoff_max);
        next
    }

    fn set_interval(&mut self, interval_ms: u32) {
        let session = self.config.request_timeout();
        let interval = if interval_ms == 0 {
            session / 3
        } else {
            Duration::from_millis(u64::from(interval_ms))
        };
        self.heartbeat_interval = interval.clamp(HEARTBEAT_INTERVAL_MIN, session / 3);
    }

    /// Runs one call on the group's coordinator (found with `FindCoordinator`, followed
    /// when it moves) with the request timeout (a timeout is transient).
    async fn call<T, F, Fut>(&self, what: &str, call: F) -> Result<T>
    where
        F: FnMut(Grpc) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let answer = self.client.on_coordinator(&self.group, call);
        match tokio::time::timeout(self.config.request_timeout(), answer).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(failure)) => Err(failure.into()),
            Err(_) => Err(Error::Unreachable {
                address: self.client.address().to_owned(),
                reason: format!("no answer to {what} in time"),
            }),
        }
    }

    pub(super) async fn join(&mut self) -> Result<v1::JoinGroupResponse> {
        let request = v1::JoinGroupRequest {
            group: self.group.clone(),
            member_id: self.member_id.clone(),
            topics: self.topics.clone(),
            session_timeout_ms: self.config.session_timeout_ms(),
            client_id: self.client_id.clone(),
        };
        self.call("JoinGroup", |mut grpc| {
            let request = request.clone();
            async move { grpc.join_group(request).await }
        })
        .await
    }

    async fn accept_join(&mut self, response: v1::JoinGroupResponse) -> Result<Instant> {
        if response.member_id.is_empty() {
            return Err(Error::Protocol(
                "JoinGroup answered without a member id".to_owned(),
            ));
        }
        tracing::info!(
            group = %self.group,
            member = %response.member_id,
            epoch = response.member_epoch,
            "joined the group"
        );
        self.member_id = response.member_id;
        self.shared.lock().member_id = self.member_id.clone();
        self.epoch = response.member_epoch;
        self.joined = true;
        self.set_interval(response.heartbeat_interval_ms);
        let released = self
            .reconcile(from_wire_partitions(response.assignment))
            .await?;
        Ok(if released {
            Instant::now()
        } else {
            Instant::now() + self.heartbeat_interval
        })
    }

    async fn heartbeat(&mut self) -> Result<v1::HeartbeatResponse> {
        let owned: Vec<TopicPartition> = self.readers.keys().map(partition_of).collect();
        let request = v1::HeartbeatRequest {
            group: self.group.clone(),
            member_id: self.member_id.clone(),
            member_epoch: self.epoch,
            owned: to_wire_partitions(&owned),
        };
        self.call("Heartbeat", |mut grpc| {
            let request = request.clone();
            async move { grpc.heartbeat(request).await }
        })
        .await
    }

    /// Commits, stops every reader, leaves the group.
    async fn close(&mut self) -> Result<()> {
        let committed = self.commit_processed().await;
        let keys: BTreeSet<Key> = self.readers.keys().cloned().collect();
        self.shared.release(&keys);
        self.readers.clear();
        self.tasks.abort_all();
        if self.joined {
            let request = v1::LeaveGroupRequest {
                group: self.group.clone(),
                member_id: self.member_id.clone(),
                member_epoch: self.epoch,
            };
            if let Err(error) = self
                .call("LeaveGroup", |mut grpc| {
                    let request = request.clone();
                    async move { grpc.leave_group(request).await }
                })
                .await
            {
                // The session expires by itself; nothing is lost.
                tracing::warn!(group = %self.group, %error, "leaving the group failed");
            }
            self.joined = false;
        }
        self.shared.close();
        committed
    }

    /// A fatal error: hand it to the application, stop without committing.
    fn fail(mut self, error: Error) {
        tracing::error!(group = %self.group, %error, "the group consumer stopped");
        self.lose_all();
        self.shared.lock().queue.push_back(Err(error));
        self.shared.close();
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        // However the task ends (returned, failed, aborted), readers stop and `recv` ends.
        self.tasks.abort_all();
        self.shared.close();
    }
}
