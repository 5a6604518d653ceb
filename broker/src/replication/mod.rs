//! Replicated partitions: each partition with replication factor R > 1 is a Raft group
//! (openraft) over its R replicas.
//!
//! (Work in progress: the module doc grows with the layer. See `types.rs` for the entry format.)

pub mod raft_log;
pub mod types;
