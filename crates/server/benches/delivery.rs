//! Criterion benches of the delivery hot path: hub fan-out to N subscribers and
//! the encoding of a response.
//!
//! `cargo bench --bench delivery`.
//!
//! - `hub_fanout/N`: one batch of 64 packets published, then taken by each of
//!   N subscribers (`Subscription::next`). Building the batch is setup, not
//!   measured; encoding is measured separately below.
//! - `encode_*`: one `SubscribeResponse` of 256 packets: numbering a batch
//!   (`stamp`, once per batch for all subscribers), building a subscriber's
//!   response from shared slices (`shared_delivery`, per subscriber), next to
//!   prost encoding the same packets as `pb::SubscribeResponse` — what each
//!   subscriber would cost without the encode-once design.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use packet_ingest::{
    frame::Channel,
    hub::{Hub, HubConfig, Next, SlowSubscriberPolicy, Subscription},
    metrics::Metrics,
    pb,
    wire::{
        ChannelFilter, Delivery, EncodedPackets, EncodedPacketsBuilder, PacketFields,
        SequencedBatch,
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
    let mut builder =
        EncodedPacketsBuilder::with_capacity(packets, packets * (payload_size + 80), 1_000_000);
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
        Next::Delivery(delivery) => delivery.records_len(),
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

/// A subscriber's whole response: slices of the shared batch behind a prefix.
fn shared_delivery(batch: &SequencedBatch) -> usize {
    let mut delivery = Delivery::default();
    delivery.push(batch.records(0..batch.len()), batch.len());
    delivery.into_chunks().map(|chunk| chunk.len()).sum()
}

fn encoding(c: &mut Criterion) {
    for (size, label) in [(64usize, "64B"), (1024, "1KiB")] {
        let batch = encoded_batch(ENCODE_BATCH, size).stamp(1_000_000);
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
        group.bench_function("stamp", |b| {
            b.iter_batched(
                || encoded_batch(ENCODE_BATCH, size),
                |packets| packets.stamp(1_000_000).len(),
                BatchSize::LargeInput,
            )
        });
        group.bench_function("shared_delivery", |b| b.iter(|| shared_delivery(&batch)));
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
