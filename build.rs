//! Compiles `proto/packet_ingest.proto` with protox (pure Rust, no system `protoc`).
//!
//! Three outputs land in `OUT_DIR`: the prost messages and tonic client
//! (`packetingest.v1.rs`), a hand-described server (`packetingest.v1.Packets.rs`)
//! whose `Subscribe` uses our own codec so a batch encoded once is shared by every
//! subscriber, and the encoded file descriptor set that reflection serves.
use std::{env, fs, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/packet_ingest.proto";
    println!("cargo:rerun-if-changed={proto}");
    println!("cargo:rerun-if-changed=build.rs");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);

    let descriptors = protox::compile([proto], ["proto"])?;
    fs::write(
        out_dir.join("packet_ingest_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;

    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .bytes(".")
        .compile_fds(descriptors)?;

    let subscribe = tonic_build::manual::Method::builder()
        .name("subscribe")
        .route_name("Subscribe")
        .input_type("crate::pb::SubscribeRequest")
        .output_type("crate::wire::Delivery")
        .codec_path("crate::wire::SubscribeCodec")
        .server_streaming()
        .build();
    let publish = tonic_build::manual::Method::builder()
        .name("publish")
        .route_name("Publish")
        .input_type("crate::pb::PublishRequest")
        .output_type("crate::pb::PublishResponse")
        .codec_path("tonic_prost::ProstCodec")
        .client_streaming()
        .build();
    let service = tonic_build::manual::Service::builder()
        .name("Packets")
        .package("packetingest.v1")
        .method(subscribe)
        .method(publish)
        .build();
    tonic_build::manual::Builder::new()
        .build_client(false)
        .compile(&[service]);
    Ok(())
}
