//! The Syncline broker.
//!
//! Layers, bottom up (nothing below `server/` knows about gRPC):
//! - [`log`]: one partition's log: segments, memory-mapped indexes, durability, recovery,
//!   retention.
//! - [`partition`]: a log plus produce validation that needs the topic (keys -> partitions).
//! - [`topic`]: the topic registry, topic metadata, the data directory.
//! - [`producer_ids`]: idempotent producers' ids and epochs (fencing), broker-wide.
//! - [`group`]: the consumer group coordinator and the committed-offset store (`__offsets`).
//! - [`acl`]: access control lists (who may do what), and their store on a node of its own.
//! - [`server`]: the tonic services, request validation and the error -> status mapping.
//! - [`config`]: one `Config` from defaults < TOML file < `SYNCLINE_*` env < flags.
//! - [`descriptors`]: file descriptors a broker needs and the open-file limit check.
//! - [`metrics`]: Prometheus metric names, the recorder and the `/metrics` endpoint.

#![deny(clippy::unwrap_used, clippy::expect_used)]

pub mod acl;
pub mod cluster;
pub mod config;
pub mod descriptors;
pub mod error;
pub mod group;
pub mod log;
pub mod metrics;
pub mod partition;
pub mod producer_ids;
pub mod replication;
pub mod server;
pub mod state;
pub mod topic;
