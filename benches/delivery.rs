//! Criterion benches of the delivery hot path: hub fan-out to N subscribers and
//! the encoding of a response.
//!
//! `cargo bench --bench delivery`.
//!
//! - `hub_fanout/N`: one batch of 64 packets published, then taken by each of
//!   N subscribers (`Subscription::next`). Building the batch is setup, not
//!   measured; encoding is measured separately below.
//! - `encode_*`: one `SubscribeResponse` of 256 packets, written by
//!   `wire::DeliveryEncoder` through tonic's own `EncodeBody` (tonic's
//!   `EncodeBuf` cannot be built outside tonic, so the real encoder is driven
//!   the way the server drives it), next to prost encoding the same packets as
//!   `pb::SubscribeResponse` — what each subscriber would cost without the
//!   encode-once design.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use http_body_util::BodyExt;
use packet_ingest::{
    frame::Channel,
    hub::{Hub, HubConfig, Next, SlowSubscriberPolicy, Subscription},
    metrics::Metrics,
    pb,
    wire::{
        ChannelFilter, Delivery, DeliveryEncoder, EncodedPackets, EncodedPacketsBuilder,
        PacketFields, Segment, SequencedBatch,
    },
};
use prost::Message;

const SOURCE: &str = "tcp/127.0.0.1:40000";
const FANOUT_BATCH: usize = 64;
const ENCODE_BATCH: usize = 256;
/// Batches built ahead (untimed) per round of the fan-out bench.
const ROUND: u64 = 256;

fn encoded_batch(packets: usize, payload_size: usize) -> EncodedPackets {
    let payload = vec![0xA5u8; payload_size];
    let mut builder = EncodedPacketsBuilder::with_capacity(packets, packets * (payload_size + 80));
    for index in 0..packets {
        builder.push(&PacketFields {
            channel: Channel(1),
            payload: &payload,
            digest: &[7; 32],
            source: SOURCE,
            source_sequence: index as u64,
            received_unix_nanos: 1_700_000_000_000_000_000,
        });
    }
    builder.finish()
}

fn hub() -> Arc<Hub> {
    Hub::new(
        HubConfig {
            retain_packets: 65536,
            memory_limit: 256 << 20,
            policy: SlowSubscriberPolicy::Gap,
            block_timeout: Duration::from_secs(5),
            max_delivery_bytes: 1 << 20,
        },
        Metrics::new(),
    )
}

async fn take(subscription: &mut Subscription) -> usize {
    match subscription.next(Duration::from_secs(5)).await {
        Next::Delivery(delivery) => delivery.encoded_len,
        other => panic!("expected a delivery, got {other:?}"),
    }
}

fn hub_fanout(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("hub_fanout");
    group.throughput(Throughput::Elements(FANOUT_BATCH as u64));
    for subscribers in [1usize, 4, 16] {
        group.bench_function(BenchmarkId::from_parameter(subscribers), |b| {
            b.iter_custom(|iters| {
                runtime.block_on(async {
                    let hub = hub();
                    let mut subs: Vec<Subscription> = (0..subscribers)
                        .map(|_| {
                            hub.subscribe(ChannelFilter::default(), None)
                                .expect("subscribe")
                        })
                        .collect();
                    let mut measured = Duration::ZERO;
                    let mut done = 0;
                    while done < iters {
                        let round = ROUND.min(iters - done);
                        let batches: Vec<EncodedPackets> = (0..round)
                            .map(|_| encoded_batch(FANOUT_BATCH, 64))
                            .collect();
                        let started = Instant::now();
                        for batch in batches {
                            hub.publish(batch).await;
                            for sub in &mut subs {
                                std::hint::black_box(take(sub).await);
                            }
                        }
                        measured += started.elapsed();
                        done += round;
                    }
                    measured
                })
            })
        });
    }
    group.finish();
}

fn delivery(batch: &Arc<SequencedBatch>) -> Delivery {
    let range = 0..batch.packets.len();
    Delivery {
        missed: 0,
        encoded_len: range.clone().map(|index| batch.record_len(index)).sum(),
        segments: vec![Segment {
            batch: Arc::clone(batch),
            range,
        }],
        filter: ChannelFilter::default(),
    }
}

/// Runs `DeliveryEncoder` through tonic's `EncodeBody`, as the server does.
async fn encode_with_tonic(delivery: Delivery) -> usize {
    let source = futures::stream::iter([Ok(delivery)]);
    let body = tonic::codec::EncodeBody::new_client(DeliveryEncoder, source, None, None);
    let mut body = std::pin::pin!(body);
    let mut bytes = 0;
    while let Some(Ok(frame)) = body.frame().await {
        if let Ok(data) = frame.into_data() {
            bytes += data.len();
        }
    }
    bytes
}

fn encoding(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    for (size, label) in [(64usize, "64B"), (1024, "1KiB")] {
        let batch = Arc::new(SequencedBatch {
            first_sequence: 1_000_000,
            packets: encoded_batch(ENCODE_BATCH, size),
        });
        let packets: Vec<pb::Packet> = (0..ENCODE_BATCH)
            .map(|index| pb::Packet {
                sequence: 1_000_000 + index as u64,
                channel: 1,
                payload: Bytes::from(vec![0xA5u8; size]),
                digest: Bytes::from_static(&[7; 32]),
                source: SOURCE.to_owned(),
                source_sequence: index as u64,
                received_unix_nanos: 1_700_000_000_000_000_000,
            })
            .collect();
        let mut group = c.benchmark_group(format!("encode_{label}"));
        group.throughput(Throughput::Elements(ENCODE_BATCH as u64));
        group.bench_function("delivery_encoder", |b| {
            b.iter(|| runtime.block_on(encode_with_tonic(delivery(&batch))))
        });
        group.bench_function("prost_subscribe_response", |b| {
            b.iter(|| {
                // What a per-subscriber prost encode would do: build and encode.
                pb::SubscribeResponse {
                    packets: packets.clone(),
                    missed: 0,
                }
                .encode_to_vec()
                .len()
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
    targets = hub_fanout, encoding
}
criterion_main!(benches);
