//! packet-ingest-protocol: what any producer or consumer of packet-ingest needs.
//!
//! # Layout
//!
//! In the order a packet meets them:
//!
//! - [`frame`]: the TCP wire format (SPEC §2): the 44-byte header, the
//!   incremental decoder the server frames with, the encoder producers use.
//! - [`digest`]: SHA-256 / HMAC-SHA256 over a frame, and the `Verifier`.
//! - [`ack`]: the acknowledgement records the TCP port sends back (SPEC §9).
//! - [`keyfile`]: how key files are read (one trailing line ending removed).
//! - [`pb`]: the generated protobuf messages and tonic client of
//!   `packetingest.v1` (`proto/packet_ingest.proto`).
//! - [`client`]: reaching a server (TLS, bearer token), building frames and
//!   Publish requests, printing packets.
//! - [`units`]: durations and sizes as command lines write them.

pub mod ack;
pub mod client;
pub mod digest;
pub mod frame;
pub mod keyfile;
pub mod units;

/// Generated protobuf messages and the tonic client for `packetingest.v1`.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("packetingest.v1");

    /// Encoded descriptors of `proto/packet_ingest.proto`, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/packet_ingest_descriptor.bin"));
}
