//! gRPC message compression (`--compression gzip,zstd`): which encodings are
//! on, what a call negotiated, and compressing or decompressing one message.
//!
//! Off unless `--compression` names encodings. A request message flagged
//! compressed is decompressed if its `grpc-encoding` is one of them (up to the
//! method's message limit: a small message that inflates beyond it is
//! refused, so a "zip bomb" costs at most one limit of memory); otherwise the
//! call fails `UNIMPLEMENTED` with `grpc-accept-encoding` naming what is
//! accepted, as the gRPC spec asks. A response is compressed with the first
//! enabled encoding the client lists in `grpc-accept-encoding`, message by
//! message; messages under `MIN_COMPRESSED` go uncompressed (the flag is per
//! message). Subscribe's shared batches are compressed once per batch and
//! encoding (see `wire::Delivery::into_message`); everything else once per
//! message.
//!
//! The codecs are flate2's and zstd's, the ones tonic uses; only the
//! per-message framing is ours, because the `Packets` methods are served
//! without tonic's codec (see `grpc`).

use std::io::{Read, Write};

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
};
use tonic::Status;

/// The gRPC message prefix: the compressed flag and a big-endian length.
const GRPC_PREFIX_LEN: usize = 5;

/// Messages smaller than this are sent uncompressed: heartbeats, unary
/// answers, single small packets gain nothing.
pub const MIN_COMPRESSED: usize = 512;

/// A message encoding `--compression` may enable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Encoding {
    Gzip,
    Zstd,
}

impl Encoding {
    pub const ALL: [Encoding; 2] = [Encoding::Gzip, Encoding::Zstd];

    /// The name in `grpc-encoding` and `grpc-accept-encoding`.
    pub fn name(self) -> &'static str {
        match self {
            Encoding::Gzip => "gzip",
            Encoding::Zstd => "zstd",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    fn from_name(name: &str) -> Option<Encoding> {
        Encoding::ALL
            .into_iter()
            .find(|encoding| encoding.name().eq_ignore_ascii_case(name.trim()))
    }

    /// `data` compressed, behind a gRPC prefix with the compressed flag set.
    /// Fast levels: this runs on the delivery path, once per batch.
    pub fn compress_message(self, data: &[u8]) -> Bytes {
        let mut out = BytesMut::with_capacity(GRPC_PREFIX_LEN + data.len() / 2 + 64);
        out.put_u8(1);
        out.put_u32(0); // the length, once known
        let mut writer = out.writer();
        // Writing into memory cannot fail.
        let _ = match self {
            Encoding::Gzip => {
                let mut encoder =
                    flate2::write::GzEncoder::new(&mut writer, flate2::Compression::fast());
                encoder
                    .write_all(data)
                    .and_then(|()| encoder.finish().map(|_| ()))
            }
            Encoding::Zstd => zstd::stream::copy_encode(data, &mut writer, 1),
        };
        let mut out = writer.into_inner();
        let length = (out.len() - GRPC_PREFIX_LEN) as u32;
        out[1..GRPC_PREFIX_LEN].copy_from_slice(&length.to_be_bytes());
        out.freeze()
    }

    /// Decompresses one request message, refusing more than `max` bytes out.
    pub fn decompress(self, data: &[u8], max: usize, limit: &str) -> Result<Bytes, Status> {
        let bound = (max as u64).saturating_add(1);
        let mut out = Vec::with_capacity(data.len().saturating_mul(2).min(max));
        let read = match self {
            Encoding::Gzip => flate2::read::GzDecoder::new(data)
                .take(bound)
                .read_to_end(&mut out),
            Encoding::Zstd => zstd::stream::read::Decoder::new(data)
                .and_then(|decoder| decoder.take(bound).read_to_end(&mut out)),
        };
        if let Err(error) = read {
            return Err(Status::invalid_argument(format!(
                "request message is not valid {} data: {error}",
                self.name()
            )));
        }
        if out.len() > max {
            return Err(Status::invalid_argument(format!(
                "request message decompresses to more than this server's limit of {max} bytes ({limit})"
            )));
        }
        Ok(Bytes::from(out))
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EncodingLabel {
    pub encoding: &'static str,
}

/// What compression costs and saves, per encoding.
#[derive(Clone, Debug, Default)]
pub struct CompressionMetrics {
    /// Messages compressed (a shared batch counts once, however many get it).
    pub messages: Family<EncodingLabel, Counter>,
    pub bytes_in: Family<EncodingLabel, Counter>,
    pub bytes_out: Family<EncodingLabel, Counter>,
}

impl CompressionMetrics {
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "compressed_messages",
            "Response messages compressed, by encoding (a batch shared by several subscribers counts once)",
            self.messages.clone(),
        );
        registry.register(
            "compression_input_bytes",
            "Bytes given to the compressor, by encoding",
            self.bytes_in.clone(),
        );
        registry.register(
            "compression_output_bytes",
            "Bytes the compressor produced, by encoding",
            self.bytes_out.clone(),
        );
    }

    pub fn record(&self, encoding: Encoding, input: usize, output: usize) {
        let label = EncodingLabel {
            encoding: encoding.name(),
        };
        self.messages.get_or_create(&label).inc();
        self.bytes_in.get_or_create(&label).inc_by(input as u64);
        self.bytes_out.get_or_create(&label).inc_by(output as u64);
    }

    pub fn messages(&self, encoding: Encoding) -> u64 {
        self.messages
            .get_or_create(&EncodingLabel {
                encoding: encoding.name(),
            })
            .get()
    }
}

/// The encodings `--compression` enabled, in the server's order of preference.
#[derive(Clone, Debug, Default)]
pub struct Compression {
    enabled: Vec<Encoding>,
}

impl Compression {
    pub fn new(enabled: &[Encoding]) -> Self {
        let mut unique = Vec::new();
        for encoding in enabled {
            if !unique.contains(encoding) {
                unique.push(*encoding);
            }
        }
        Compression { enabled: unique }
    }

    /// `grpc-accept-encoding`: what this server decompresses.
    pub fn accept_header(&self) -> HeaderValue {
        let names: Vec<&str> = std::iter::once("identity")
            .chain(self.enabled.iter().map(|encoding| encoding.name()))
            .collect();
        HeaderValue::from_str(&names.join(",")).unwrap_or(HeaderValue::from_static("identity"))
    }

    /// The encoding of the request's compressed messages (`grpc-encoding`):
    /// `None` for identity; `UNIMPLEMENTED` for one that is not enabled.
    pub fn request_encoding(&self, headers: &HeaderMap) -> Result<Option<Encoding>, Status> {
        let Some(value) = headers.get("grpc-encoding") else {
            return Ok(None);
        };
        let name = value.to_str().unwrap_or_default().trim();
        if name.is_empty() || name.eq_ignore_ascii_case("identity") {
            return Ok(None);
        }
        match Encoding::from_name(name) {
            Some(encoding) if self.enabled.contains(&encoding) => Ok(Some(encoding)),
            _ => {
                let mut status = Status::unimplemented(format!(
                    "request encoding {name:?} is not enabled on this server (--compression); it accepts {}",
                    self.accept_header().to_str().unwrap_or("identity")
                ));
                status
                    .metadata_mut()
                    .insert("grpc-accept-encoding", self.accept_header_metadata());
                Err(status)
            }
        }
    }

    fn accept_header_metadata(&self) -> tonic::metadata::MetadataValue<tonic::metadata::Ascii> {
        let value = self.accept_header();
        tonic::metadata::MetadataValue::try_from(value.as_bytes())
            .unwrap_or_else(|_| tonic::metadata::MetadataValue::from_static("identity"))
    }

    /// The encoding for the response: the first enabled one the client
    /// lists in `grpc-accept-encoding`.
    pub fn response_encoding(&self, headers: &HeaderMap) -> Option<Encoding> {
        let accepted: Vec<Encoding> = headers
            .get_all("grpc-accept-encoding")
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .filter_map(Encoding::from_name)
            .collect();
        self.enabled
            .iter()
            .copied()
            .find(|encoding| accepted.contains(encoding))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload() -> Vec<u8> {
        (0..100_000u32)
            .flat_map(|n| format!("packet {n} of a text-like stream; ").into_bytes())
            .take(200_000)
            .collect()
    }

    #[test]
    fn messages_round_trip_through_the_codecs_tonic_uses() {
        let data = payload();
        for encoding in Encoding::ALL {
            let message = encoding.compress_message(&data);
            assert_eq!(message[0], 1, "compressed flag");
            let length = u32::from_be_bytes([message[1], message[2], message[3], message[4]]);
            assert_eq!(length as usize, message.len() - GRPC_PREFIX_LEN);
            assert!(
                message.len() < data.len() / 4,
                "{encoding:?} compresses text"
            );
            let body = &message[GRPC_PREFIX_LEN..];
            // The reference decoders, independent of ours.
            let mut reference = Vec::new();
            match encoding {
                Encoding::Gzip => {
                    flate2::read::GzDecoder::new(body)
                        .read_to_end(&mut reference)
                        .expect("gzip");
                }
                Encoding::Zstd => reference = zstd::decode_all(body).expect("zstd"),
            }
            assert_eq!(reference, data);
            let ours = encoding.decompress(body, data.len(), "test").expect("ours");
            assert_eq!(ours, data);
        }
    }

    #[test]
    fn a_message_that_inflates_past_the_limit_is_refused() {
        let zeros = vec![0u8; 8 << 20];
        for encoding in Encoding::ALL {
            let message = encoding.compress_message(&zeros);
            assert!(
                message.len() < 64 * 1024,
                "8 MiB of zeros is a small message"
            );
            let error = encoding
                .decompress(&message[GRPC_PREFIX_LEN..], 1 << 20, "the limit")
                .expect_err("over the limit");
            assert_eq!(error.code(), tonic::Code::InvalidArgument);
            let error = encoding
                .decompress(b"not compressed at all", 1 << 20, "the limit")
                .expect_err("garbage");
            assert_eq!(error.code(), tonic::Code::InvalidArgument);
        }
    }

    #[test]
    fn negotiation_follows_the_headers() {
        let compression = Compression::new(&[Encoding::Zstd, Encoding::Gzip]);
        let mut headers = HeaderMap::new();
        assert_eq!(compression.response_encoding(&headers), None);
        assert_eq!(
            compression.request_encoding(&headers).expect("identity"),
            None
        );
        headers.insert(
            "grpc-accept-encoding",
            HeaderValue::from_static("identity, gzip"),
        );
        assert_eq!(
            compression.response_encoding(&headers),
            Some(Encoding::Gzip)
        );
        headers.insert(
            "grpc-accept-encoding",
            HeaderValue::from_static("gzip,zstd"),
        );
        assert_eq!(
            compression.response_encoding(&headers),
            Some(Encoding::Zstd)
        );
        headers.insert("grpc-encoding", HeaderValue::from_static("gzip"));
        assert_eq!(
            compression.request_encoding(&headers).expect("enabled"),
            Some(Encoding::Gzip)
        );
        headers.insert("grpc-encoding", HeaderValue::from_static("snappy"));
        let refused = compression.request_encoding(&headers).expect_err("unknown");
        assert_eq!(refused.code(), tonic::Code::Unimplemented);
        assert_eq!(
            refused
                .metadata()
                .get("grpc-accept-encoding")
                .map(|v| v.as_bytes()),
            Some(&b"identity,zstd,gzip"[..])
        );
        let off = Compression::new(&[]);
        headers.insert("grpc-encoding", HeaderValue::from_static("gzip"));
        assert!(off.request_encoding(&headers).is_err(), "off by default");
        assert_eq!(off.response_encoding(&headers), None);
    }
}
