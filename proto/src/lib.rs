//! Syncline's wire format.
//!
//! - [`codec`]: the server's codec (a request that does not decode is INVALID_ARGUMENT).
//! - [`batch`]: the record-batch layout and its codec. Producers encode batches with it, the
//!   broker validates and stores them byte for byte, consumers decode them.
//! - [`error_details`]: error details in the standard `google.rpc.Status` form (a CAS
//!   conflict's current versions), written by the broker and read by clients.
//! - [`partitioner`]: the stable key -> partition function (Kafka's murmur2).
//! - [`size`]: byte sizes with units (`64MiB`), parsed alike by the broker's settings and the
//!   CLI (no wire meaning; shared here because both depend on this crate).
//! - [`wire`]: gRPC message framing of `ProduceStream` without copying batches (both ends).
//! - [`v1`]: the prost/tonic code generated from `proto/syncline.proto`.

pub mod batch;
pub mod codec;
pub mod error_details;
pub mod partitioner;
pub mod size;
pub mod wire;

/// Generated protobuf and gRPC code for package `syncline.v1`.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("syncline.v1");
    // The server, generated in a second pass with `crate::codec::RequestCodec` (see build.rs).
    include!(concat!(env!("OUT_DIR"), "/server/syncline.v1.rs"));

    /// Encoded `FileDescriptorSet` of the schema, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("syncline_descriptor");
}
