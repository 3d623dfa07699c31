//! Compiles `proto/packet_ingest.proto` with protox (pure Rust, no system `protoc`).
//!
//! Two outputs land in `OUT_DIR`: the prost messages and tonic client
//! (`packetingest.v1.rs`), and the encoded file descriptor set that reflection
//! serves. The server side of `Packets` is written by hand (see `src/grpc`),
//! so that deliveries are shared slices instead of per-stream copies.
use std::{env, fs, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "../../proto/packet_ingest.proto";
    println!("cargo:rerun-if-changed={proto}");
    println!("cargo:rerun-if-changed=build.rs");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);

    let descriptors = protox::compile([proto], ["../../proto"])?;
    fs::write(
        out_dir.join("packet_ingest_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;

    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .bytes(".")
        .compile_fds(descriptors)?;

    Ok(())
}
