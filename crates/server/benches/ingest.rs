//! Criterion benches of the ingest hot path: framing, verification next to the
//! raw SHA-256 it is bounded by, and HMAC against plain SHA-256.
//!
//! `cargo bench --bench ingest`. Each group runs for a couple of seconds; the
//! figures to compare are in the same group (verify_batch vs raw sha2 over the
//! same bytes), since absolute numbers move with the machine.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use packet_ingest::{
    frame::{Channel, Frame, FrameDecoder, FrameLimits, SIGNED_HEADER_LEN},
    verify::{verify_batch, FrameBatch, Verifier},
};
use packet_ingest_protocol::client::make_frame;
use sha2::{Digest as _, Sha256};

const SIZES: [(usize, &str); 3] = [(64, "64B"), (1024, "1KiB"), (64 << 10, "64KiB")];
const SOURCE: &str = "tcp/127.0.0.1:40000";

/// About 1 MiB of frames of one payload size, as one socket read would hold.
fn frames(size: usize, hmac_key: Option<&[u8]>) -> Vec<Frame> {
    let count = ((1 << 20) / (size + 44)).clamp(16, 4096);
    (0..count)
        .map(|index| {
            let mut payload = vec![0xA5u8; size];
            payload[..8].copy_from_slice(&(index as u64).to_be_bytes());
            make_frame(Channel(1), Bytes::from(payload), hmac_key)
        })
        .collect()
}

fn wire_bytes(frames: &[Frame]) -> u64 {
    frames.iter().map(|frame| frame.wire_len() as u64).sum()
}

fn frame_decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame_decode");
    for (size, label) in SIZES {
        let frames = frames(size, None);
        let mut wire = BytesMut::new();
        for frame in &frames {
            frame.encode(&mut wire);
        }
        group.throughput(Throughput::Elements(frames.len() as u64));
        group.bench_function(BenchmarkId::from_parameter(label), |b| {
            b.iter_batched(
                // The copy of the read buffer is setup, not measured.
                || wire.clone(),
                |mut buf| {
                    let mut decoder = FrameDecoder::new(FrameLimits {
                        max_payload: 1 << 20,
                        hmac_key_configured: false,
                    });
                    let mut decoded = 0usize;
                    while let Ok(Some(frame)) = decoder.decode(&mut buf) {
                        decoded += frame.payload.len();
                    }
                    decoded
                },
                BatchSize::LargeInput,
            )
        });
    }
    group.finish();
}

/// `verify_batch` (hash, compare, pre-encode for delivery) against raw SHA-256
/// of exactly the bytes it hashes: the gap is what verification adds.
fn verification(c: &mut Criterion) {
    let verifier = Verifier::new(None, false);
    for (size, label) in SIZES {
        let frames = frames(size, None);
        let mut group = c.benchmark_group(format!("verify_{label}"));
        group.throughput(Throughput::Bytes(wire_bytes(&frames)));
        let batch = FrameBatch {
            frames: frames.clone(),
            received_unix_nanos: 1,
            charge: None,
            span: None,
        };
        group.bench_function("verify_batch", |b| {
            b.iter(|| verify_batch(&verifier, SOURCE, 0, &batch, 1_000_000))
        });
        group.bench_function("raw_sha2", |b| {
            b.iter(|| {
                let mut last = [0u8; 32];
                for frame in &frames {
                    let mut hasher = Sha256::new();
                    hasher.update(&frame.signed_header[..SIGNED_HEADER_LEN]);
                    hasher.update(&frame.payload);
                    last = hasher.finalize().into();
                }
                last
            })
        });
        group.finish();
    }
}

fn hmac_vs_sha256(c: &mut Criterion) {
    let key = b"bench-hmac-key-0123456789abcdef";
    let plain = Verifier::new(None, false);
    let keyed = Verifier::new(Some(key), false);
    for (size, label) in SIZES {
        let sha_frames = frames(size, None);
        let hmac_frames = frames(size, Some(key));
        let mut group = c.benchmark_group(format!("digest_{label}"));
        group.throughput(Throughput::Elements(sha_frames.len() as u64));
        group.bench_function("sha256", |b| {
            b.iter(|| sha_frames.iter().filter(|f| plain.check(f).is_ok()).count())
        });
        group.bench_function("hmac_sha256", |b| {
            b.iter(|| {
                hmac_frames
                    .iter()
                    .filter(|f| keyed.check(f).is_ok())
                    .count()
            })
        });
        group.finish();
    }
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = frame_decode, verification, hmac_vs_sha256
}
criterion_main!(benches);
