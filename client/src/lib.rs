//! The Syncline client library.
//!
//! Producers encode record batches with the shared codec re-exported here as [`batch`], so the
//! broker can validate and store them byte for byte. The gRPC client (admin, batching producer,
//! consumer, group consumer, `SyncTable`) and the `syncline` CLI build on it.

pub use syncline_proto::batch;
