//! The receiving side of `bench`: subscribers and the checks they make.
//!
//! At 64-byte packets the load client, not the server, is usually the limit,
//! so the gRPC subscriber never decodes `Packet` values: a custom tonic
//! `Decoder` walks each `SubscribeResponse` in tonic's own receive buffer and
//! updates the counters directly. Per packet that is a few varints, one
//! comparison of the `source` bytes against the producer's known address, and
//! two loads from the payload: no allocation, no hashing, no map lookup.

use std::{
    sync::{atomic::AtomicU64, Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use bytes::Buf;
use futures::{FutureExt, StreamExt};
use hdrhistogram::Histogram;
use tonic::{
    codec::{BufferSettings, Codec, DecodeBuf, Decoder},
    service::interceptor::InterceptedService,
    Status,
};

use super::{
    produce::unix_nanos_now,
    walk::{walk_response, PacketView},
    BenchArgs, NatsClient, Plan, Shared, Target, SUBSCRIBE_GRACE,
};
use packet_ingest_protocol::{
    client::{grpc_endpoint, BearerToken},
    pb::SubscribeRequest,
};

const SUBSCRIBE_PATH: &str = "/packetingest.v1.Packets/Subscribe";
/// How often an idle subscriber checks whether the run is over.
pub(crate) const TICK: Duration = Duration::from_millis(100);
/// NATS messages handled per lock of the stats.
const NATS_DRAIN_BATCH: usize = 512;

/// Where one producer's packets have got to, as one subscriber sees them.
#[derive(Debug)]
struct Cursor {
    next: u64,
    /// The `source` this producer's packets must carry; learned from the first
    /// packet when it cannot be known in advance (Publish).
    source: Vec<u8>,
}

/// What one subscriber has seen so far.
#[derive(Debug)]
pub(crate) struct SubStats {
    pub packets: u64,
    pub payload_bytes: u64,
    pub responses: u64,
    /// Packets the server said this subscriber lost.
    pub missed: u64,
    /// Packets skipped inside a producer's sequence (not counting the tail).
    pub gaps: u64,
    /// A packet at or below one already seen (per producer or hub sequence).
    pub order_errors: u64,
    /// Wrong length or index: not the payload the producer sent there.
    pub payload_errors: u64,
    /// Packets of channels or sources this run did not send.
    pub foreign: u64,
    /// NATS only: slow-consumer events the client library reported.
    pub slow_consumer_events: u64,
    /// packet-ingest only: bytes this subscriber's connection read from the
    /// socket (compressed or not, with HTTP/2 and TLS framing).
    pub wire_bytes: Option<Arc<AtomicU64>>,
    pub last_sequence: u64,
    pub last_at: Option<Instant>,
    cursors: Vec<Cursor>,
    size: usize,
    index_modulus: u64,
    /// Producer send time to arrival here (paced runs only).
    pub latency: Option<Histogram<u64>>,
    /// The server's `received_unix_nanos` to arrival here (paced, packet-ingest).
    pub server_latency: Option<Histogram<u64>>,
}

fn latency_histogram() -> Option<Histogram<u64>> {
    // 1 ns .. 100 s at 3 significant figures; recording saturates above.
    Histogram::new_with_bounds(1, 100_000_000_000, 3).ok()
}

impl SubStats {
    pub fn new(plan: &Plan, sources: &[Vec<u8>]) -> Self {
        let paced = plan.paced();
        SubStats {
            packets: 0,
            payload_bytes: 0,
            responses: 0,
            missed: 0,
            gaps: 0,
            order_errors: 0,
            payload_errors: 0,
            foreign: 0,
            slow_consumer_events: 0,
            wire_bytes: None,
            last_sequence: 0,
            last_at: None,
            cursors: sources
                .iter()
                .map(|source| Cursor {
                    next: 0,
                    source: source.clone(),
                })
                .collect(),
            size: plan.size,
            index_modulus: plan.index_modulus,
            latency: paced.then(latency_histogram).flatten(),
            server_latency: (paced && plan.target == Target::PacketIngest)
                .then(latency_histogram)
                .flatten(),
        }
    }

    /// Packets accounted for: delivered or reported missed.
    pub fn accounted(&self) -> u64 {
        self.packets + self.missed
    }

    /// Packets a producer sent that never arrived (gaps and the missing tail).
    pub fn lost(&self, sent: &[u64]) -> u64 {
        let tail: u64 = self
            .cursors
            .iter()
            .zip(sent)
            .map(|(cursor, sent)| sent.saturating_sub(cursor.next))
            .sum();
        self.gaps + tail
    }

    /// Checks the per-producer order and payload of one packet and counts it.
    pub(crate) fn record(&mut self, producer: usize, index: u64, payload: &[u8], now_nanos: u64) {
        let Some(cursor) = self.cursors.get_mut(producer) else {
            self.foreign += 1;
            return;
        };
        match index.cmp(&cursor.next) {
            std::cmp::Ordering::Equal => cursor.next += 1,
            std::cmp::Ordering::Greater => {
                self.gaps += index - cursor.next;
                cursor.next = index + 1;
            }
            std::cmp::Ordering::Less => self.order_errors += 1,
        }
        self.packets += 1;
        self.payload_bytes += payload.len() as u64;
        if payload.len() != self.size || payload.len() < super::MIN_PAYLOAD {
            self.payload_errors += 1;
            return;
        }
        if let Some(latency) = &mut self.latency {
            let sent = u64::from_be_bytes(payload_word(payload, 0));
            latency.saturating_record(now_nanos.saturating_sub(sent));
        }
    }

    /// A packet-ingest packet: find its producer by channel, check its source,
    /// hub sequence and payload index, then `record` it.
    fn record_packet(&mut self, packet: &PacketView<'_>, now_nanos: u64) {
        let producer = packet.channel as usize;
        let Some(cursor) = self.cursors.get_mut(producer) else {
            self.foreign += 1;
            return;
        };
        if cursor.source.is_empty() {
            // Publish: the server names the source after our connection's
            // address, which tonic does not tell us; learn it once.
            cursor.source.extend_from_slice(packet.source);
        } else if cursor.source != packet.source {
            self.foreign += 1;
            return;
        }
        if packet.sequence <= self.last_sequence {
            self.order_errors += 1;
        }
        self.last_sequence = self.last_sequence.max(packet.sequence);
        if packet.payload.len() >= super::MIN_PAYLOAD {
            let index = u64::from_be_bytes(payload_word(packet.payload, 8));
            if index != packet.source_sequence % self.index_modulus {
                self.payload_errors += 1;
            }
        }
        if let Some(server_latency) = &mut self.server_latency {
            let received = u64::try_from(packet.received_unix_nanos).unwrap_or(0);
            server_latency.saturating_record(now_nanos.saturating_sub(received));
        }
        self.record(producer, packet.source_sequence, packet.payload, now_nanos);
    }
}

/// Eight payload bytes at `offset`; the caller has checked the length.
fn payload_word(payload: &[u8], offset: usize) -> [u8; 8] {
    let mut word = [0u8; 8];
    word.copy_from_slice(&payload[offset..offset + 8]);
    word
}

pub(crate) fn lock(stats: &Mutex<SubStats>) -> MutexGuard<'_, SubStats> {
    // Counters stay meaningful even if a holder panicked.
    stats
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A tonic codec that encodes the request with prost and "decodes" responses
/// by walking them into `SubStats`. Its item is the subscriber's `accounted()`.
struct CountingCodec {
    stats: Arc<Mutex<SubStats>>,
    paced: bool,
}

struct CountingDecoder {
    stats: Arc<Mutex<SubStats>>,
    paced: bool,
}

impl Codec for CountingCodec {
    type Encode = SubscribeRequest;
    type Decode = u64;
    type Encoder = tonic_prost::ProstEncoder<SubscribeRequest>;
    type Decoder = CountingDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        CountingDecoder {
            stats: Arc::clone(&self.stats),
            paced: self.paced,
        }
    }
}

impl CountingDecoder {
    fn count(&self, message: &[u8]) -> Result<u64, Status> {
        // One clock read per response: its packets all arrived together.
        let now = match self.paced {
            true => unix_nanos_now(),
            false => 0,
        };
        let mut stats = lock(&self.stats);
        let missed = walk_response(message, |packet| stats.record_packet(&packet, now))
            .map_err(|error| Status::internal(format!("malformed SubscribeResponse: {error}")))?;
        stats.missed += missed;
        stats.responses += 1;
        stats.last_at = Some(Instant::now());
        Ok(stats.accounted())
    }
}

impl Decoder for CountingDecoder {
    type Item = u64;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<u64>, Status> {
        let len = src.remaining();
        // tonic gathers a whole message into one BytesMut, so this is the
        // normal case; the copy is only a fallback.
        let accounted = match src.chunk().len() == len {
            true => {
                let accounted = self.count(src.chunk())?;
                src.advance(len);
                accounted
            }
            false => self.count(&src.copy_to_bytes(len))?,
        };
        Ok(Some(accounted))
    }

    fn buffer_settings(&self) -> BufferSettings {
        // Responses carry up to about 1 MiB of packets.
        BufferSettings::new(256 << 10, 1 << 20)
    }
}

/// Whether a subscriber has everything, or has waited long enough.
enum Progress {
    Waiting,
    Complete,
    GaveUp(String),
}

fn progress(
    shared: &Shared,
    accounted: u64,
    last_at: Option<Instant>,
    drain: Duration,
) -> Progress {
    let (Some(total), Some(done_at)) = (shared.total_sent.get(), shared.producers_done_at.get())
    else {
        return Progress::Waiting;
    };
    if accounted >= *total {
        return Progress::Complete;
    }
    let last = last_at.map_or(*done_at, |last_at| last_at.max(*done_at));
    match last.elapsed() > drain {
        true => Progress::GaveUp(format!(
            "{} of {total} packets did not arrive within --drain-timeout {drain:?} of the last one",
            total - accounted
        )),
        false => Progress::Waiting,
    }
}

/// For subscribers whose losses are findings (NATS): done when complete or
/// when the drain timeout has passed.
pub(crate) fn finish_check(
    shared: &Shared,
    accounted: u64,
    last_at: Option<Instant>,
    drain: Duration,
) -> bool {
    !matches!(
        progress(shared, accounted, last_at, drain),
        Progress::Waiting
    )
}

/// Runs one subscriber until it has every packet the producers sent, or gives up.
pub(crate) async fn subscriber(
    plan: Arc<Plan>,
    args: Arc<BenchArgs>,
    shared: Arc<Shared>,
    stats: Arc<Mutex<SubStats>>,
    ready: tokio::sync::oneshot::Sender<()>,
) -> Result<(), String> {
    match plan.target {
        Target::PacketIngest => grpc_subscriber(&plan, &args, &shared, stats, ready).await,
        Target::Nats => match args.nats_client {
            NatsClient::Raw => super::nats::subscribe(&args, &shared, stats, ready).await,
            NatsClient::AsyncNats => nats_subscriber(&args, &shared, stats, ready).await,
        },
        Target::Jetstream => jetstream_subscriber(&args, &shared, stats, ready).await,
    }
}

/// Reads the bench's JetStream stream from its start with an ordered consumer.
async fn jetstream_subscriber(
    args: &BenchArgs,
    shared: &Shared,
    stats: Arc<Mutex<SubStats>>,
    ready: tokio::sync::oneshot::Sender<()>,
) -> Result<(), String> {
    use async_nats::jetstream::consumer::{push, DeliverPolicy};
    let client = async_nats::connect(args.nats_url.as_str())
        .await
        .map_err(|error| format!("cannot connect to {}: {error}", args.nats_url))?;
    let context = async_nats::jetstream::new(client.clone());
    let stream = context
        .get_stream(crate::produce::JETSTREAM_STREAM)
        .await
        .map_err(|error| format!("no JetStream stream: {error}"))?;
    let consumer = stream
        .create_consumer(push::OrderedConfig {
            deliver_subject: client.new_inbox(),
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(|error| format!("cannot create a JetStream consumer: {error}"))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|error| format!("cannot read the JetStream consumer: {error}"))?;
    let _ = ready.send(());
    let mut accounted = 0;
    loop {
        let last_at = lock(&stats).last_at;
        match progress(shared, accounted, last_at, args.drain_timeout) {
            Progress::Complete | Progress::GaveUp(_) => return Ok(()),
            Progress::Waiting => {}
        }
        let first = match tokio::time::timeout(TICK, messages.next()).await {
            Err(_) => continue,
            Ok(None) => return Err("the JetStream consumer ended".to_owned()),
            Ok(Some(Err(error))) => return Err(format!("JetStream consumer failed: {error}")),
            Ok(Some(Ok(message))) => message,
        };
        let now = unix_nanos_now();
        let mut stats = lock(&stats);
        let mut message = Some(first);
        let mut handled = 0;
        while let Some(current) = message.take() {
            let producer = current
                .subject
                .as_str()
                .strip_prefix("bench.")
                .and_then(|suffix| suffix.parse::<usize>().ok());
            match (producer, current.payload.len() >= super::MIN_PAYLOAD) {
                (Some(producer), true) => {
                    let index = u64::from_be_bytes(payload_word(&current.payload, 8));
                    stats.record(producer, index, &current.payload, now);
                }
                _ => stats.foreign += 1,
            }
            handled += 1;
            if handled < NATS_DRAIN_BATCH {
                message = match messages.next().now_or_never().flatten() {
                    Some(Ok(next)) => Some(next),
                    _ => None,
                };
            }
        }
        stats.responses += 1;
        stats.last_at = Some(Instant::now());
        accounted = stats.accounted();
    }
}

async fn grpc_subscriber(
    plan: &Plan,
    args: &BenchArgs,
    shared: &Shared,
    stats: Arc<Mutex<SubStats>>,
    ready: tokio::sync::oneshot::Sender<()>,
) -> Result<(), String> {
    let wire_bytes = Arc::new(AtomicU64::new(0));
    lock(&stats).wire_bytes = Some(Arc::clone(&wire_bytes));
    let endpoint = grpc_endpoint(&args.grpc_addr, &args.tls).map_err(|error| error.to_string())?;
    let channel = crate::counted::connect(&endpoint, wire_bytes)
        .await
        .map_err(|error| format!("cannot connect to {}: {error}", args.grpc_addr))?;
    let token = BearerToken::new(args.token.as_deref()).map_err(|error| error.to_string())?;
    let mut grpc = tonic::client::Grpc::new(InterceptedService::new(channel, token))
        .max_decoding_message_size(usize::MAX);
    if let Some(encoding) = args.compression.encoding() {
        grpc = grpc.accept_compressed(encoding);
    }
    grpc.ready()
        .await
        .map_err(|error| format!("gRPC connection not ready: {error}"))?;
    let codec = CountingCodec {
        stats: Arc::clone(&stats),
        paced: plan.paced(),
    };
    let call = grpc.server_streaming(
        tonic::Request::new(SubscribeRequest::default()),
        http::uri::PathAndQuery::from_static(SUBSCRIBE_PATH),
        codec,
    );
    tokio::pin!(call);
    // packet-ingest answers with headers as soon as the subscription exists;
    // servers that wait for the first message get a grace period instead.
    let mut ready = Some(ready);
    let response = tokio::select! {
        response = &mut call => response,
        () = tokio::time::sleep(SUBSCRIBE_GRACE) => {
            if let Some(ready) = ready.take() {
                let _ = ready.send(());
            }
            (&mut call).await
        }
    };
    if let Some(ready) = ready.take() {
        let _ = ready.send(());
    }
    let mut stream = response
        .map_err(|status| format!("Subscribe failed: {status}"))?
        .into_inner();
    let mut accounted = 0;
    loop {
        let last_at = lock(&stats).last_at;
        match progress(shared, accounted, last_at, args.drain_timeout) {
            Progress::Complete => return Ok(()),
            Progress::GaveUp(why) => return Err(why),
            Progress::Waiting => {}
        }
        // `message()` keeps its state in the stream, so a timeout loses nothing.
        match tokio::time::timeout(TICK, stream.message()).await {
            Err(_) => {}
            Ok(Ok(Some(now_accounted))) => accounted = now_accounted,
            Ok(Ok(None)) => return Err("the server ended the stream".to_owned()),
            Ok(Err(status)) => return Err(format!("stream failed: {status}")),
        }
    }
}

async fn nats_subscriber(
    args: &BenchArgs,
    shared: &Shared,
    stats: Arc<Mutex<SubStats>>,
    ready: tokio::sync::oneshot::Sender<()>,
) -> Result<(), String> {
    let slow = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let slow_events = Arc::clone(&slow);
    let client = async_nats::ConnectOptions::new()
        .event_callback(move |event| {
            let slow_events = Arc::clone(&slow_events);
            async move {
                if let async_nats::Event::SlowConsumer(_) = event {
                    slow_events.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        })
        .connect(args.nats_url.as_str())
        .await
        .map_err(|error| format!("cannot connect to {}: {error}", args.nats_url))?;
    let mut subscription = client
        .subscribe("bench.>")
        .await
        .map_err(|error| format!("NATS subscribe failed: {error}"))?;
    // The SUB must reach the server before any producer publishes.
    client
        .flush()
        .await
        .map_err(|error| format!("NATS flush failed: {error}"))?;
    let _ = ready.send(());
    let mut accounted = 0;
    loop {
        let last_at = {
            let mut stats = lock(&stats);
            stats.slow_consumer_events = slow.load(std::sync::atomic::Ordering::Relaxed);
            stats.last_at
        };
        match progress(shared, accounted, last_at, args.drain_timeout) {
            Progress::Complete => return Ok(()),
            // NATS losses are a finding, not a failure of the run: they are
            // counted (`lost`) and reported beside the rate.
            Progress::GaveUp(_) => return Ok(()),
            Progress::Waiting => {}
        }
        let first = match tokio::time::timeout(TICK, subscription.next()).await {
            Err(_) => continue,
            Ok(None) => return Err("the NATS subscription ended".to_owned()),
            Ok(Some(message)) => message,
        };
        let now = unix_nanos_now();
        let mut stats = lock(&stats);
        let mut message = Some(first);
        let mut handled = 0;
        while let Some(current) = message.take() {
            let producer = current
                .subject
                .as_str()
                .strip_prefix("bench.")
                .and_then(|suffix| suffix.parse::<usize>().ok());
            match (producer, current.payload.len() >= super::MIN_PAYLOAD) {
                (Some(producer), true) => {
                    let index = u64::from_be_bytes(payload_word(&current.payload, 8));
                    stats.record(producer, index, &current.payload, now);
                }
                _ => stats.foreign += 1,
            }
            handled += 1;
            if handled < NATS_DRAIN_BATCH {
                message = subscription.next().now_or_never().flatten();
            }
        }
        stats.responses += 1;
        stats.last_at = Some(Instant::now());
        accounted = stats.accounted();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(index_modulus: u64) -> Plan {
        Plan {
            target: Target::PacketIngest,
            via: crate::Via::Tcp,
            producers: 2,
            size: 16,
            content: crate::Content::Filler,
            count: Some(10),
            duration: None,
            rate_per_producer: None,
            index_modulus,
        }
    }

    fn payload(index: u64) -> Vec<u8> {
        let mut payload = vec![0u8; 16];
        payload[8..].copy_from_slice(&index.to_be_bytes());
        payload
    }

    #[test]
    fn stats_count_gaps_disorder_and_strangers() {
        let sources = vec![b"tcp/a".to_vec(), b"tcp/b".to_vec()];
        let mut stats = SubStats::new(&plan(u64::MAX), &sources);
        let body = |sequence, channel, source: &'static [u8], source_sequence| {
            (sequence, channel, source, source_sequence)
        };
        let packets = [
            body(1, 0, &b"tcp/a"[..], 0),
            body(2, 1, &b"tcp/b"[..], 0),
            body(3, 0, &b"tcp/a"[..], 2), // gap of one
            body(4, 0, &b"tcp/a"[..], 1), // out of order
            body(5, 1, &b"tcp/x"[..], 1), // not ours
            body(6, 9, &b"tcp/a"[..], 0), // no such producer
        ];
        for (sequence, channel, source, source_sequence) in packets {
            let payload = payload(source_sequence);
            stats.record_packet(
                &PacketView {
                    sequence,
                    channel,
                    payload: &payload,
                    source,
                    source_sequence,
                    ..PacketView::default()
                },
                0,
            );
        }
        assert_eq!(stats.packets, 4);
        assert_eq!(stats.gaps, 1);
        assert_eq!(stats.order_errors, 1);
        assert_eq!(stats.foreign, 2);
        assert_eq!(stats.payload_errors, 0);
        // Producer 0 sent 3 (all seen, one late), producer 1 sent 2 (one seen).
        assert_eq!(stats.lost(&[3, 2]), 2);
    }

    #[test]
    fn payload_index_is_checked_modulo_the_block() {
        let sources = vec![b"s".to_vec()];
        let mut stats = SubStats::new(&plan(4), &sources);
        for (source_sequence, index) in [(0, 0), (1, 1), (5, 1), (6, 3)] {
            let payload = payload(index);
            stats.record_packet(
                &PacketView {
                    sequence: source_sequence + 1,
                    payload: &payload,
                    source: b"s",
                    source_sequence,
                    ..PacketView::default()
                },
                0,
            );
        }
        assert_eq!(stats.payload_errors, 1);
    }
}
