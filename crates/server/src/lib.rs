//! packet-ingest: verified packets off raw TCP and into many ordered gRPC streams.
//!
//! Producers write length-prefixed, SHA-256 (or HMAC-SHA256) digested packets to
//! a TCP port or the `Publish` RPC. Each source's packets are framed, verified
//! on a CPU pool in parallel but accepted in their original order, numbered with
//! a stream-wide sequence, and delivered in batches to every `Subscribe` stream.
//! The wire format, digests and proto types are in `packet-ingest-protocol`.
//!
//! # Layout
//!
//! In data-flow order — where a packet is framed, verified, sequenced, stored
//! and delivered:
//!
//! - [`config`]: flags and environment, checked into settings before anything
//!   starts (bad configuration exits 64 from one place).
//! - [`connections`]: what a listener lets clients hold (slots, idle eviction,
//!   accept back-off, open-file limit).
//! - [`ingest`]: the TCP port: read -> **frame** (`protocol::frame`) -> producer.
//! - [`grpc`]: the gRPC port; `Publish` feeds the same producer path.
//! - [`budget`]: the ingest memory budget both producer paths draw from.
//! - [`producer`]: the one producer path: **verify** ([`verify`], in order on
//!   the pool) -> [`outlet`]: the hub, or the [`cluster`] stream behind one
//!   interface.
//! - [`hub`]: **sequences** each batch and keeps the shared ring; subscriber
//!   cursors and slow-subscriber policies.
//! - [`log`]: with `--data-dir`, where batches are **stored**: the segment
//!   log the hub appends to and lagging subscribers read from.
//! - [`wire`]: the delivered encoding, written once per batch; a delivery is
//!   slices of it. `grpc::framing` **delivers** them to Subscribe streams;
//!   [`compression`]: gzip and zstd per message, a batch compressed once.
//! - [`stream`]: which stream this server serves (its id).
//! - [`error`]: client-visible errors and their gRPC status codes.
//! - [`metrics`] and [`http`]: Prometheus metrics and the admin HTTP port.
//! - [`tls`], [`auth`], [`limits`]: TLS on both ports, bearer tokens, the
//!   unary deadline (tower layers).
//! - [`server`]: assembly from settings; [`shutdown`]: the phases of a
//!   graceful shutdown, one token each under one root.
//! - [`tools`]: the `send`, `tail` and `health` subcommands.

pub mod auth;
pub mod budget;
pub mod cluster;
pub mod compression;
pub mod config;
pub mod connections;
pub mod error;
pub mod grpc;
pub mod http;
pub mod hub;
pub mod ingest;
pub mod limits;
pub mod log;
pub mod metrics;
pub mod outlet;
pub mod producer;
pub mod server;
pub mod shutdown;
pub mod stream;
pub mod tls;
pub mod tools;
pub mod verify;
pub mod wire;

pub use packet_ingest_protocol::{frame, keyfile, pb};
