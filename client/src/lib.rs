//! The Syncline client library.
//!
//! - [`Client`]: connections to a broker or a cluster of broker nodes (given any live node's
//!   address, or several), sending each partition's traffic to its leader and each group's to
//!   its coordinator, and following them when they move; topic administration ([`Client::create_topic`],
//!   [`Client::delete_topic`], [`Client::list_topics`], [`Client::describe_topic`]) and offset
//!   lookups ([`Client::list_offsets`]).
//! - [`Producer`]: a batching producer. Records are encoded once into per-partition record
//!   batches (the shared codec, re-exported as [`batch`]), sent pipelined on a `ProduceStream`,
//!   and acknowledged at the chosen [`Acks`] level (durable by default). Keyed records go to
//!   [`partition_for_key`]; transient failures are retried within a delivery timeout.
//! - [`Consumer`]: reads all or chosen partitions from the earliest, latest, a given offset or a
//!   timestamp, as a `Stream` of [`ConsumerRecord`]s, with a policy for positions that retention
//!   has passed ([`OffsetReset`]).
//!
//! - [`GroupConsumer`] ([`Client::group_consumer`]): a member of a consumer group. The broker
//!   assigns partitions to the members; each reads its own from the group's committed offsets
//!   and commits what it handed out (automatically, on [`GroupConsumer::commit`], before a
//!   partition moves away, and on [`GroupConsumer::close`]). At least once; per-partition (so
//!   per-key) order. Group administration: [`Client::commit_offsets`],
//!   [`Client::fetch_offsets`], [`Client::list_groups`], [`Client::describe_group`].
//!
//! - [`Table`] ([`Client::table`]): a topic created with cleanup=compact as a key-value table:
//!   [`Table::get`] and [`Table::history`] by key, [`Table::put`] and [`Table::delete`], and
//!   compare-and-set writes ([`Table::put_if`], [`Table::put_if_absent`]) that fail with
//!   [`Error::Conflict`] naming the key's current version. Every write returns the key's new
//!   version (its offset).
//!
//! - [`SyncTable`] ([`Client::sync_table`]): a live, caught-up copy of a table. It loads every
//!   partition's snapshot ([`Client::snapshot`]), then follows each partition from there,
//!   through broker restarts and compaction, and streams every change it applies
//!   ([`SyncTable::changes`]); [`SyncTable::wait_for`] gives read-your-writes after a
//!   [`Table::put`].
//!
//! Producers are idempotent by default ([`ProducerConfig::idempotent`], [`Client::init_producer`]):
//! a retried batch is stored once, also when it is resent to a new leader after a leader
//! change. Consumers, group members and synced tables resume from their next offset at the
//! new leader, waiting for one that has not yet applied every committed record.
//!
//! Errors are one [`Error`] type; [`Error::code`] gives the broker's gRPC status code and
//! [`Error::is_transient`] tells whether a retry may help.
//!
//! # Example
//!
//! ```no_run
//! use syncline_client::{Client, ConsumerConfig, ProducerConfig, StartOffset, TopicConfig};
//!
//! # async fn example() -> Result<(), syncline_client::Error> {
//! let client = Client::connect("127.0.0.1:7450").await?;
//! client.create_topic("orders", TopicConfig::with_partitions(3)).await?;
//!
//! // Records with the same key land in the same partition, in order.
//! let producer = client.producer("orders", ProducerConfig::default()).await?;
//! let delivery = producer
//!     .send(Some(b"order-1".as_slice()), Some(b"created".as_slice()), &[])
//!     .await?;
//! println!("stored in partition {} at offset {}", delivery.partition, delivery.offset);
//!
//! // Many records in flight at once: enqueue, then await the deliveries.
//! let mut pending = Vec::new();
//! for i in 0..1000 {
//!     let value = format!("event {i}");
//!     pending.push(producer.enqueue(None, Some(value.as_bytes()), &[]).await?);
//! }
//! for delivery in pending {
//!     delivery.await?;
//! }
//!
//! // Read everything back from the beginning.
//! let config = ConsumerConfig {
//!     start: StartOffset::Earliest,
//!     ..ConsumerConfig::default()
//! };
//! let mut consumer = client.consumer("orders", config).await?;
//! while let Some(record) = consumer.recv().await {
//!     let record = record?;
//!     println!("{}@{}: {:?}", record.partition, record.offset, record.value);
//! }
//! # Ok(())
//! # }
//! ```

mod acl;
mod address;
mod admin;
mod client;
mod cluster;
mod consumer;
mod error;
mod group;
mod group_admin;
mod producer;
mod routing;
mod snapshot;
mod sync_table;
mod table;
mod wire_call;

pub use syncline_proto::batch;
pub use syncline_proto::batch::Header;
pub use syncline_proto::partitioner::partition_for_key;
/// The generated gRPC types, for calls this crate does not wrap (see [`Client::grpc`]).
pub use syncline_proto::v1;

pub use acl::{Acl, AclResource, ACL_OPERATIONS};
pub use address::{BrokerAddress, DEFAULT_PORT};
pub use admin::{
    CleanupPolicy, CompactionOutcome, FsyncPolicy, ListedOffset, OffsetQuery, PartitionDescription,
    TopicConfig, TopicDescription, TopicSummary,
};
pub use client::{Client, ClientConfig, Connectivity, TlsConfig};
pub use cluster::{
    ClusterDescription, ClusterNode, NodeRemoval, PartitionMove, PartitionPlacement,
};
pub use consumer::{Consumer, ConsumerConfig, ConsumerRecord, OffsetReset, StartOffset};
pub use error::{Error, Result};
pub use group::{
    GroupConsumer, GroupConsumerConfig, GroupEvent, GroupEvents, ASSIGNED_PARTITIONS_MAX,
    GROUP_TOPICS_MAX,
};
pub use group_admin::{
    CommittedOffset, GroupDescription, GroupMember, GroupSummary, OffsetCommit, PartitionLag,
    TopicPartition, OFFSETS_PER_REQUEST_MAX,
};
pub use producer::{
    Acks, Delivery, DeliveryFuture, Producer, ProducerConfig, ProducerIdentity,
    UnkeyedPartitioning, PARTITION_WINDOW_BATCHES,
};
pub use routing::{Credentials, Grpc};
pub use snapshot::Snapshot;
pub use sync_table::{Change, Changes, SyncTable, SyncTableConfig};
pub use table::{Entry, Expect, History, Table, Version, Written};
/// The gRPC status code in [`Error::Broker`] and [`Error::code`].
pub use tonic::Code;

#[cfg(test)]
mod failover_tests;
#[cfg(test)]
mod routing_tests;
#[cfg(test)]
mod tests;
