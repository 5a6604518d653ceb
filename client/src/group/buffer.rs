//! The application side of a member: records buffered ahead of `recv`, the partitions it
//! owns and what it handed out of each, shared by the member's task, its readers and the
//! [`GroupConsumer`](super::GroupConsumer) handle under one lock.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use super::Key;
use crate::consumer::{ConsumerRecord, Message};
use crate::error::Result;

/// A partition the member reads, as the application side sees it.
#[derive(Debug)]
pub(super) struct Owned {
    /// Tells this ownership apart from an earlier or later one of the same partition: a
    /// reader only delivers while its token is current.
    pub(super) token: u64,
    /// One past the last record processed (the start position before any): what a commit
    /// stores. Moves as records are handed out, or with
    /// [`GroupConsumerConfig::processed_on_commit_only`](super::GroupConsumerConfig) only
    /// when the application commits.
    pub(super) processed: u64,
    /// One past the last record handed out (the start position before any).
    pub(super) handed_out: u64,
}

#[derive(Debug, Default)]
pub(super) struct Buffer {
    /// Records (and reader errors) not yet handed out. Every record here belongs to a
    /// partition in `owned` (revocation removes both under one lock).
    pub(super) queue: VecDeque<Result<ConsumerRecord>>,
    pub(super) owned: HashMap<Key, Owned>,
    /// The last record handed out while the application may still be processing it (it has
    /// not called `recv`, `commit` or `close` since): its partition, ownership token and
    /// offset. Background commits (auto-commit, revocation) stop before it, since a crash
    /// while processing it must not skip it; asking for the next record, `commit` or `close`
    /// says it is done.
    pub(super) in_hand: Option<(Key, u64, u64)>,
    pub(super) member_id: String,
    /// The background task has ended: `recv` returns `None` once the queue is empty.
    pub(super) closed: bool,
}

#[derive(Debug)]
pub(super) struct Shared {
    pub(super) buffer: Mutex<Buffer>,
    /// Signalled (one permit) when a record, an error or the end arrives.
    pub(super) records_ready: Notify,
    /// Signalled (all waiters) when the queue shrinks.
    pub(super) space_ready: Notify,
    pub(super) records_max: usize,
    /// `processed` moves only on `commit` and `close` (batching applications).
    pub(super) processed_on_commit_only: bool,
    /// Reader tasks the background task still keeps (finished ones included), for tests.
    #[cfg(test)]
    pub(super) reader_tasks: std::sync::atomic::AtomicUsize,
}

impl Buffer {
    /// What a background commit of `key` may store: the position after the records handed
    /// out, but not past the record the application still holds.
    pub(super) fn committable(&self, key: &Key, owned: &Owned) -> u64 {
        match &self.in_hand {
            Some((held, token, offset)) if held == key && *token == owned.token => {
                owned.processed.min(*offset)
            }
            _ => owned.processed,
        }
    }
}

impl Shared {
    /// Every record handed out is processed (the application committed or closed).
    pub(super) fn mark_all_processed(&self) {
        let mut buffer = self.lock();
        buffer.in_hand = None;
        for owned in buffer.owned.values_mut() {
            owned.processed = owned.handed_out;
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Buffer> {
        // A panic while holding the lock leaves plain data behind; go on with it.
        self.buffer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Hands one reader message to the application side; `false` when the partition is no
    /// longer owned under `token` (the reader should stop).
    pub(super) async fn deliver(&self, key: &Key, token: u64, message: Message) -> bool {
        loop {
            let space = self.space_ready.notified();
            tokio::pin!(space);
            space.as_mut().enable();
            {
                let mut buffer = self.lock();
                if buffer.owned.get(key).map(|owned| owned.token) != Some(token) {
                    return false;
                }
                match message {
                    Message::Failed(error) => {
                        buffer.queue.push_back(Err(error));
                        drop(buffer);
                        self.records_ready.notify_one();
                        return false;
                    }
                    Message::Records { records, .. } if buffer.queue.len() < self.records_max => {
                        buffer.queue.extend(records.into_iter().map(Ok));
                        drop(buffer);
                        self.records_ready.notify_one();
                        return true;
                    }
                    Message::Records { .. } => {}
                }
            }
            space.await;
        }
    }

    /// Removes `keys` from the owned set and drops their buffered records, atomically: no
    /// record of theirs is handed out afterwards. Returns each one's processed position.
    pub(super) fn release(&self, keys: &BTreeSet<Key>) -> Vec<(Key, u64)> {
        let mut buffer = self.lock();
        let mut released = Vec::new();
        for key in keys {
            if let Some(owned) = buffer.owned.remove(key) {
                released.push((key.clone(), buffer.committable(key, &owned)));
            }
        }
        let before = buffer.queue.len();
        buffer.queue.retain(|item| match item {
            Ok(record) => !keys.contains(&(Arc::clone(&record.topic), record.partition)),
            Err(_) => true,
        });
        let dropped = before - buffer.queue.len();
        drop(buffer);
        if dropped > 0 {
            tracing::debug!(dropped, "dropped buffered records of released partitions");
            self.space_ready.notify_waiters();
        }
        released
    }

    pub(super) fn close(&self) {
        let mut buffer = self.lock();
        buffer.closed = true;
        buffer.owned.clear();
        buffer.queue.retain(Result::is_err);
        drop(buffer);
        self.records_ready.notify_one();
        self.space_ready.notify_waiters();
    }
}
