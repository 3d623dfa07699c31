//! packet-ingest: verified packets off raw TCP and into many ordered gRPC streams.
//!
//! Producers write length-prefixed, SHA-256 (or HMAC-SHA256) digested packets to
//! a TCP port or the `Publish` RPC. Each connection's packets are framed, verified
//! on a CPU pool in parallel but accepted in their original order, numbered with
//! a hub-wide sequence, and delivered in batches to every `Subscribe` stream.
//!
//! # Layout
//!
//! In data-flow order:
//!
//! - [`config`]: flags and environment, validation (bad config exits 64).
//! - [`frame`]: the wire format and incremental decoder (no I/O, no hashing).
//! - [`verify`]: where a packet is verified: digest checks and the ordered
//!   parallel pipeline on the rayon pool.
//! - [`wire`]: protobuf encoding of accepted packets, once per batch.
//! - [`cluster`]: optional NATS JetStream stream shared by replicas.
//! - [`hub`]: sequence numbers, the shared byte-bounded ring, subscriber cursors
//!   and slow-subscriber policies.
//! - [`ingest`]: TCP listener and per-connection read -> frame -> verify -> hub.
//! - [`grpc`]: the `Packets` service (Subscribe, Publish).
//! - [`error`]: client-visible errors and their gRPC status codes.
//! - [`metrics`] and [`http`]: Prometheus metrics and the `/metrics` port.
//! - [`tls`] and [`auth`]: TLS on both ports, bearer tokens (a tower layer).
//! - [`limits`]: tower middleware of our own (unary deadline).
//! - [`server`]: assembly, health, reflection, tower limits, graceful shutdown.
//! - [`tools`]: the `send`, `tail` and `health` subcommands.
//! - [`bench`]: the `bench` load generator and checker (packet-ingest or NATS).
#![forbid(unsafe_code)]

pub mod auth;
pub mod bench;
pub mod budget;
pub mod cluster;
pub mod config;
pub mod connections;
pub mod error;
pub mod frame;
pub mod grpc;
pub mod http;
pub mod hub;
pub mod ingest;
pub mod keyfile;
pub mod limits;
pub mod metrics;
pub mod producer;
pub mod server;
pub mod tls;
pub mod tools;
pub mod verify;
pub mod wire;

/// Generated protobuf messages and the tonic client for `packetingest.v1`.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("packetingest.v1");

    /// Encoded descriptors of `proto/packet_ingest.proto`, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/packet_ingest_descriptor.bin"));
}
