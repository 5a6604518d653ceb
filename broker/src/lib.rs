//! The Syncline broker.
//!
//! Layers, bottom up (nothing below `server/` knows about gRPC):
//! - [`log`]: one partition's log: segments, memory-mapped indexes, durability, recovery,
//!   retention.

#![deny(clippy::unwrap_used, clippy::expect_used)]

pub mod log;
