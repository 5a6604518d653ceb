//! [`GroupConsumer`]: a member of a consumer group (KIP-848 style). The broker's coordinator
//! assigns partitions; the member reads exactly the partitions of its latest assignment.
//!
//! # How it works
//!
//! [`crate::Client::group_consumer`] joins the group (so a bad name or an unknown topic fails
//! at once), then a background task:
//! - heartbeats at the interval the coordinator asks for, reporting the partitions it reads
//!   (`owned`), and reconciles each answer's assignment:
//!   - a newly assigned partition starts reading from the group's committed offset
//!     (`FetchOffsets`), or, without one, where [`GroupConsumerConfig::offset_reset`] says
//!     (earliest by default); one reader per partition, the plain consumer's fetch loop;
//!   - a partition no longer assigned is *revoked*: under one lock its entry is removed and its
//!     records still buffered are dropped (so none is handed out afterwards; the next owner
//!     reads them again from the commit), its reader is stopped, the processed position is
//!     committed synchronously, and the next heartbeat, sent at once, leaves it out of `owned`
//!     so the coordinator can hand it on;
//! - commits the processed positions every [`GroupConsumerConfig::auto_commit_interval`]
//!   (unless off), and on [`GroupConsumer::commit`] and [`GroupConsumer::close`];
//! - on NOT_FOUND (the coordinator forgot the member: session expired, broker restarted) or
//!   FAILED_PRECONDITION (stale epoch) drops every partition *without* committing (they may
//!   already belong to someone else), reports [`GroupEvent::Lost`] and joins again with the
//!   same member id; on transient errors (unreachable, UNAVAILABLE) retries with backoff,
//!   keeping its partitions until the coordinator says otherwise.
//!
//! # Delivery
//!
//! At least once. A record counts as processed once the application asks for the next one
//! ([`GroupConsumer::recv`]), commits ([`GroupConsumer::commit`]) or closes: background commits
//! (auto-commit, revocation) cover every record handed out before the one the application
//! still holds, so a crash while processing it does not skip it; `commit` and `close` cover
//! every record handed out. So process a record before asking for the next one. Records of
//! one partition come in offset order, so records with one key keep their order within a
//! member; after a partition moves, its new owner starts at the last commit and may see again
//! records the old owner processed after it.
//!
//! # Limits
//!
//! Records buffered ahead of `recv`: at most [`GroupConsumerConfig::buffered_records_max`] plus
//! one fetch response per owned partition (each at most `fetch_bytes_max` plus one batch);
//! partitions owned: [`ASSIGNED_PARTITIONS_MAX`]; topics: [`GROUP_TOPICS_MAX`]; events kept for
//! a slow [`GroupEvents`] reader: [`GroupConsumerConfig::events_buffered_max`].
//!
//! # Ending
//!
//! [`GroupConsumer::close`] commits, stops reading and leaves the group, so its partitions move
//! at once. Dropping the consumer (or [`GroupConsumer::abort`]) stops everything *without*
//! committing or leaving, as a crash would: the coordinator moves its partitions when the
//! session times out, and their next owners start at the last commit.

mod buffer;
mod config;
mod member;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot, Notify};
use tokio::task::{JoinHandle, JoinSet};

use self::buffer::{Buffer, Shared};
use self::member::Member;
use crate::client::Client;
use crate::consumer::ConsumerRecord;
use crate::error::{Error, Result};
use crate::group_admin::TopicPartition;

pub use self::config::GroupConsumerConfig;

/// Most partitions one member reads at once (one reader task each). An assignment above it is
/// a protocol error: the member could not honour it.
pub const ASSIGNED_PARTITIONS_MAX: usize = 10_000;
/// Most topics one member subscribes to (the broker's limit).
pub const GROUP_TOPICS_MAX: usize = 100;

/// A change of the partitions this member reads ([`GroupConsumer::events`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum GroupEvent {
    /// These partitions were assigned; reading them has started (from the committed offsets).
    Assigned(Vec<TopicPartition>),
    /// The coordinator took these partitions away: the records handed out were committed,
    /// the ones still buffered dropped, and reading stopped.
    Revoked(Vec<TopicPartition>),
    /// The member lost its session (NOT_FOUND or FAILED_PRECONDITION from the coordinator):
    /// these partitions were dropped without a commit (they may already be someone else's)
    /// and the member is joining again.
    Lost(Vec<TopicPartition>),
}

/// A stream of [`GroupEvent`]s ([`GroupConsumer::events`]).
#[derive(Debug)]
pub struct GroupEvents {
    receiver: broadcast::Receiver<GroupEvent>,
}

impl GroupEvents {
    /// The next event; `None` once the consumer has stopped. A reader that fell more than
    /// `events_buffered_max` events behind gets [`Error::ChangesLagged`] once, then the
    /// events after the gap.
    pub async fn recv(&mut self) -> Option<Result<GroupEvent>> {
        match self.receiver.recv().await {
            Ok(event) => Some(Ok(event)),
            Err(broadcast::error::RecvError::Closed) => None,
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                Some(Err(Error::ChangesLagged { missed }))
            }
        }
    }
}

type Key = (Arc<str>, u32);

fn key_of(partition: &TopicPartition) -> Key {
    (Arc::from(partition.topic.as_str()), partition.partition)
}

fn partition_of(key: &Key) -> TopicPartition {
    TopicPartition::new(key.0.to_string(), key.1)
}

/// What the application asks the background task.
enum Command {
    Commit(oneshot::Sender<Result<()>>),
    Close(oneshot::Sender<Result<()>>),
}

/// A member of a consumer group; see the module doc. Records come from [`GroupConsumer::recv`].
///
/// Dropping it stops reading at once without committing or leaving (as a crash would); call
/// [`GroupConsumer::close`] to commit and leave.
#[derive(Debug)]
pub struct GroupConsumer {
    group: String,
    shared: Arc<Shared>,
    commands: mpsc::Sender<Command>,
    task: JoinHandle<()>,
    events: broadcast::Sender<GroupEvent>,
    first_events: Option<broadcast::Receiver<GroupEvent>>,
}

impl Drop for GroupConsumer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl GroupConsumer {
    pub(crate) async fn start(
        client: Client,
        group: &str,
        topics: &[&str],
        config: GroupConsumerConfig,
    ) -> Result<GroupConsumer> {
        config.validate()?;
        let invalid = |key: &'static str, reason: &str| {
            Err(Error::InvalidConfig {
                key,
                reason: reason.to_owned(),
            })
        };
        if group.is_empty() {
            return invalid("group", "must not be empty");
        }
        if topics.is_empty() || topics.len() > GROUP_TOPICS_MAX {
            return invalid("topics", "give between 1 and 100 topics");
        }
        let topics: Vec<String> = topics
            .iter()
            .map(|topic| (*topic).to_owned())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let client_id = config
            .client_id
            .clone()
            .unwrap_or_else(|| format!("syncline-client/{}", std::process::id()));
        let shared = Arc::new(Shared {
            buffer: Mutex::new(Buffer::default()),
            records_ready: Notify::new(),
            space_ready: Notify::new(),
            records_max: config.buffered_records_max,
            processed_on_commit_only: config.processed_on_commit_only,
            #[cfg(test)]
            reader_tasks: std::sync::atomic::AtomicUsize::new(0),
        });
        let (events, first_events) = broadcast::channel(config.events_buffered_max);
        let (command_sender, commands) = mpsc::channel(16);
        let mut member = Member {
            client,
            group: group.to_owned(),
            topics,
            client_id,
            reader_config: config.reader_config(),
            config,
            shared: Arc::clone(&shared),
            member_id: String::new(),
            epoch: 0,
            joined: false,
            heartbeat_interval: Duration::from_secs(1),
            backoff: Duration::ZERO,
            readers: BTreeMap::new(),
            tasks: JoinSet::new(),
            next_token: 0,
            events: events.clone(),
            commands,
        };
        member.backoff = member.config.retry_backoff;
        // The first join is synchronous: a bad group name or an unknown topic fails here.
        let joined = member.join().await?;
        shared.lock().member_id = joined.member_id.clone();
        let task = tokio::spawn(member.run(joined));
        Ok(GroupConsumer {
            group: group.to_owned(),
            shared,
            commands: command_sender,
            task,
            events,
            first_events: Some(first_events),
        })
    }

    /// The group.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// The member id the coordinator gave this member.
    pub fn member_id(&self) -> String {
        self.shared.lock().member_id.clone()
    }

    /// The partitions this member reads now, sorted.
    pub fn assignment(&self) -> Vec<TopicPartition> {
        let buffer = self.shared.lock();
        let mut partitions: Vec<TopicPartition> = buffer.owned.keys().map(partition_of).collect();
        partitions.sort();
        partitions
    }

    /// The next offset of `partition` after the records handed out (what a commit stores), if
    /// this member reads it.
    pub fn position(&self, topic: &str, partition: u32) -> Option<u64> {
        let buffer = self.shared.lock();
        buffer
            .owned
            .get(&(Arc::from(topic), partition))
            .map(|owned| owned.processed)
    }

    /// Assignment changes: partitions assigned, revoked (after their commit) and lost. The
    /// first call sees every event since the consumer started; later calls see events from
    /// their call on.
    pub fn events(&mut self) -> GroupEvents {
        let receiver = self
            .first_events
            .take()
            .unwrap_or_else(|| self.events.subscribe());
        GroupEvents { receiver }
    }

    /// The next record, marking every record handed out before it as processed. An `Err` is a
    /// reader's failure (corrupt data, out of range under [`OffsetReset::Error`], no committed
    /// offset under it) or the member's (a coordinator error that joining again cannot fix);
    /// `None` once the consumer has stopped. Cancel-safe.
    pub async fn recv(&mut self) -> Option<Result<ConsumerRecord>> {
        // Asking for the next record says the one handed out before is processed.
        self.shared.lock().in_hand = None;
        loop {
            {
                let mut buffer = self.shared.lock();
                let was_full = buffer.queue.len() >= self.shared.records_max;
                if let Some(item) = buffer.queue.pop_front() {
                    if let Ok(record) = &item {
                        let key = (Arc::clone(&record.topic), record.partition);
                        let on_commit_only = self.shared.processed_on_commit_only;
                        if let Some(owned) = buffer.owned.get_mut(&key) {
                            debug_assert!(record.offset >= owned.handed_out);
                            owned.handed_out = record.offset.saturating_add(1);
                            if !on_commit_only {
                                owned.processed = owned.handed_out;
                                let token = owned.token;
                                buffer.in_hand = Some((key, token, record.offset));
                            }
                        }
                    }
                    drop(buffer);
                    if was_full {
                        self.shared.space_ready.notify_waiters();
                    }
                    return Some(item);
                }
                if buffer.closed {
                    return None;
                }
            }
            self.shared.records_ready.notified().await;
        }
    }

    async fn ask(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<()>>) -> Command,
    ) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(command(reply))
            .await
            .map_err(|_| Error::Closed("group consumer"))?;
        answer.await.map_err(|_| Error::Closed("group consumer"))?
    }

    /// Commits the position after the last record handed out of every partition this member
    /// reads, and waits for the broker's answer. Partitions without new records are left out.
    pub async fn commit(&self) -> Result<()> {
        // Committing says every record handed out is processed, the last one too.
        self.shared.mark_all_processed();
        self.ask(Command::Commit).await
    }

    /// Commits what was handed out, stops reading, and leaves the group (its partitions move
    /// to the other members at once). Records still buffered are dropped. Returns the commit's
    /// error if it failed (the member leaves anyway).
    pub async fn close(mut self) -> Result<()> {
        self.shared.mark_all_processed();
        let result = self.ask(Command::Close).await;
        // The task ends by itself after answering.
        let _ = (&mut self.task).await;
        result
    }

    /// Stops at once without committing or leaving, as a crash would (the same as dropping).
    pub fn abort(self) {
        self.shared.close();
    }

    #[cfg(test)]
    pub(crate) fn reader_tasks(&self) -> usize {
        self.shared
            .reader_tasks
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}
