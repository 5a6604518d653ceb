//! Generates the prost/tonic code for `proto/syncline.proto`.
//!
//! Uses the `protoc` binary shipped inside the `protoc-bin-vendored` crate, so building needs no
//! system protoc. Payload fields are generated as `bytes::Bytes` so the server hands the bytes it
//! received to the log without copying them.
//!
//! Two passes: the messages and the client with tonic's prost codec, then the server alone (its
//! messages are the first pass's, through `extern_path`) with `crate::codec::RequestCodec`, so
//! that a request that does not decode is INVALID_ARGUMENT (see `src/codec.rs`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // Build scripts run single-threaded; setting PROTOC here only affects this process.
    std::env::set_var("PROTOC", protoc);
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .bytes(".")
        .build_server(false)
        .file_descriptor_set_path(out_dir.join("syncline_descriptor.bin"))
        .compile_protos(&["proto/syncline.proto"], &["proto"])?;
    let server_dir = out_dir.join("server");
    std::fs::create_dir_all(&server_dir)?;
    tonic_prost_build::configure()
        .build_client(false)
        .extern_path(".syncline.v1", "crate::v1")
        .codec_path("crate::codec::RequestCodec")
        .out_dir(&server_dir)
        .compile_protos(&["proto/syncline.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/syncline.proto");
    Ok(())
}
