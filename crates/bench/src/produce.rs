//! The producing side of `bench`: payloads, frames, pacing, and one producer per
//! TCP connection, Publish stream or NATS connection.
//!
//! Unpaced producers must not compete with the server for the two cores, so they
//! hash nothing while sending: one block of frames (about `BLOCK_BYTES`) is built
//! and hashed up front, then written again and again with large writes. Its
//! payload index is therefore the position in the block, which the subscribers
//! know (`Plan::index_modulus`); order is checked with `source_sequence`. Paced
//! producers stamp the send time just before each write, so they build and hash
//! each frame then.

use std::{
    net::SocketAddr,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use std::fmt::Write as _;

use bytes::{BufMut, Bytes, BytesMut};
use futures::{future, stream, StreamExt};
use rand::{rngs::StdRng, Rng, RngCore, SeedableRng};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tonic::{service::interceptor::InterceptedService, transport::Channel as GrpcChannel};

use super::{nats::RawNats, BenchArgs, Content, NatsClient, Plan, Shared, Target, Via};
use packet_ingest_protocol::{
    client::{grpc_channel, grpc_endpoint, make_frame, tls_connector, BearerToken, ToolError},
    frame::{signed_header, Channel, HEADER_LEN, SIGNED_HEADER_LEN},
    pb::{packets_client::PacketsClient, PublishRequest},
};

/// Size of the pre-built block an unpaced producer writes repeatedly: large
/// enough that a write is one big syscall, small enough to build in a few ms.
pub(crate) const BLOCK_BYTES: usize = 4 << 20;
/// Payload bytes after the time and index.
const FILLER: u8 = 0xA5;
/// Most frames a paced producer builds before writing, when it is behind.
const MAX_PACED_BURST: u64 = 4096;

/// Frames in an unpaced producer's block (never more than it will send).
pub(crate) fn block_frames(size: usize, count: Option<u64>) -> u64 {
    let per_block = (BLOCK_BYTES / (HEADER_LEN + size)).max(1) as u64;
    count.map_or(per_block, |count| per_block.min(count.max(1)))
}

pub(crate) fn unix_nanos_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos() as u64)
}

/// Appends a bench payload: send time, index, then `content`. Text and random
/// content depend on the producer and index, so no two packets repeat each
/// other inside one compressed batch.
pub(crate) fn put_payload(
    dst: &mut BytesMut,
    size: usize,
    content: Content,
    producer: u32,
    sent_unix_nanos: u64,
    index: u64,
) {
    dst.put_u64(sent_unix_nanos);
    dst.put_u64(index);
    let len = size - super::MIN_PAYLOAD;
    let rng = || StdRng::seed_from_u64((u64::from(producer) << 48) ^ index);
    match content {
        Content::Filler => dst.put_bytes(FILLER, len),
        Content::Random => {
            let start = dst.len();
            dst.resize(start + len, 0);
            rng().fill_bytes(&mut dst[start..]);
        }
        Content::Text => put_text(dst, len, &mut rng()),
    }
}

/// Appends `len` bytes of log lines of the kind services write (timestamps,
/// levels, paths, ids, durations): repetitive structure, varying values, which
/// compresses the way real text payloads do (about 3-5:1), unlike the filler.
fn put_text(dst: &mut BytesMut, len: usize, rng: &mut StdRng) {
    const LEVELS: [&str; 4] = ["INFO", "INFO", "WARN", "DEBUG"];
    const METHODS: [&str; 3] = ["GET", "GET", "POST"];
    const PATHS: [&str; 5] = [
        "/v1/orders",
        "/v1/orders/items",
        "/v1/users",
        "/v2/search",
        "/healthz",
    ];
    let end = dst.len() + len;
    let mut line = String::with_capacity(192);
    while dst.len() < end {
        line.clear();
        let _ = writeln!(
            line,
            "2026-12-02T{:02}:{:02}:{:02}.{:03}Z {} api request_id={:016x} method={} path={}/{} status={} bytes={} duration_ms={}",
            rng.gen_range(0..24),
            rng.gen_range(0..60),
            rng.gen_range(0..60),
            rng.gen_range(0..1000),
            LEVELS[rng.gen_range(0..LEVELS.len())],
            rng.gen::<u64>(),
            METHODS[rng.gen_range(0..METHODS.len())],
            PATHS[rng.gen_range(0..PATHS.len())],
            rng.gen_range(1..100_000),
            [200, 200, 200, 201, 404, 500][rng.gen_range(0..6)],
            rng.gen_range(0..65_536),
            rng.gen_range(0..250),
        );
        let take = line.len().min(end - dst.len());
        dst.put_slice(&line.as_bytes()[..take]);
    }
}

/// Appends one SPEC §2 frame, hashing it in place (no intermediate buffers).
pub(crate) fn put_frame(
    dst: &mut BytesMut,
    channel: u32,
    size: usize,
    content: Content,
    sent_unix_nanos: u64,
    index: u64,
) {
    let start = dst.len();
    dst.put_slice(&signed_header(Channel(channel), 0, size as u32));
    dst.put_bytes(0, 32);
    put_payload(dst, size, content, channel, sent_unix_nanos, index);
    let frame = &mut dst[start..];
    let mut hasher = Sha256::new();
    hasher.update(&frame[..SIGNED_HEADER_LEN]);
    hasher.update(&frame[HEADER_LEN..]);
    frame[SIGNED_HEADER_LEN..HEADER_LEN].copy_from_slice(&hasher.finalize());
}

fn publish_request(
    channel: u32,
    size: usize,
    content: Content,
    sent_unix_nanos: u64,
    index: u64,
) -> PublishRequest {
    let mut payload = BytesMut::with_capacity(size);
    put_payload(&mut payload, size, content, channel, sent_unix_nanos, index);
    packet_ingest_protocol::client::publish_request(&make_frame(
        Channel(channel),
        payload.freeze(),
        None,
    ))
}

type Writer = Box<dyn AsyncWrite + Unpin + Send>;
type Publisher = PacketsClient<InterceptedService<GrpcChannel, BearerToken>>;

/// A Publish producer's HTTP/2 channel, for requests built by hand.
pub(crate) struct RawPublish {
    channel: GrpcChannel,
    /// `scheme://authority/packetingest.v1.Packets/Publish`
    uri: http::Uri,
    authorization: Option<http::HeaderValue>,
}

/// A producer's connection, opened before any subscriber starts.
pub(crate) enum Connected {
    Tcp {
        writer: Writer,
        local: SocketAddr,
    },
    /// The tonic client, and (uncompressed runs) the channel for pre-built
    /// request bodies.
    Publish(Box<Publisher>, Option<Box<RawPublish>>),
    Nats(async_nats::Client),
    RawNats(RawNats),
    Jetstream(async_nats::jetstream::Context),
}

impl Connected {
    /// The `source` the server will give this producer's packets; empty when
    /// it cannot be known in advance (the subscribers learn it).
    pub fn source(&self) -> Vec<u8> {
        match self {
            Connected::Tcp { local, .. } => format!("tcp/{local}").into_bytes(),
            Connected::Publish(..)
            | Connected::Nats(_)
            | Connected::RawNats(_)
            | Connected::Jetstream(_) => Vec::new(),
        }
    }
}

pub(crate) async fn connect_all(
    plan: &Plan,
    args: &BenchArgs,
) -> Result<Vec<Connected>, ToolError> {
    let mut connected = Vec::with_capacity(plan.producers);
    for _ in 0..plan.producers {
        connected.push(connect(plan, args).await?);
    }
    Ok(connected)
}

async fn connect(plan: &Plan, args: &BenchArgs) -> Result<Connected, ToolError> {
    match (plan.target, plan.via) {
        (Target::Nats, _) if args.nats_client == NatsClient::Raw => {
            Ok(Connected::RawNats(RawNats::connect(&args.nats_url).await?))
        }
        (Target::Nats, _) => {
            let client = async_nats::connect(args.nats_url.as_str())
                .await
                .map_err(|error| format!("cannot connect to {}: {error}", args.nats_url))?;
            Ok(Connected::Nats(client))
        }
        (Target::Jetstream, _) => {
            let client = async_nats::connect(args.nats_url.as_str())
                .await
                .map_err(|error| format!("cannot connect to {}: {error}", args.nats_url))?;
            Ok(Connected::Jetstream(async_nats::jetstream::new(client)))
        }
        (Target::PacketIngest, Via::Tcp) => {
            let addr = args.ingest_addr;
            let stream = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|error| format!("cannot connect to ingest {addr}: {error}"))?;
            // Paced runs write a few frames at a time; don't let Nagle hold them.
            stream.set_nodelay(true)?;
            let local = stream.local_addr()?;
            let writer: Writer = match &args.tls.ca_cert {
                None => Box::new(stream),
                Some(_) => {
                    let name = args
                        .tls
                        .server_name
                        .clone()
                        .unwrap_or_else(|| addr.ip().to_string());
                    let server_name = rustls_pki_types::ServerName::try_from(name)?;
                    Box::new(
                        tls_connector(&args.tls)?
                            .connect(server_name, stream)
                            .await?,
                    )
                }
            };
            Ok(Connected::Tcp { writer, local })
        }
        (Target::PacketIngest, Via::Publish) => {
            let channel = grpc_channel(&args.grpc_addr, &args.tls)
                .await
                .map_err(|error| format!("cannot connect to {}: {error}", args.grpc_addr))?;
            let origin = grpc_endpoint(&args.grpc_addr, &args.tls)?.uri().clone();
            let raw = RawPublish {
                channel: channel.clone(),
                uri: format!(
                    "{}/packetingest.v1.Packets/Publish",
                    origin.to_string().trim_end_matches('/')
                )
                .parse()
                .map_err(|error| format!("cannot build the Publish URI: {error}"))?,
                authorization: args
                    .token
                    .as_deref()
                    .map(|token| http::HeaderValue::from_str(&format!("Bearer {token}")))
                    .transpose()
                    .map_err(|error| format!("--token: {error}"))?,
            };
            let mut client =
                PacketsClient::with_interceptor(channel, BearerToken::new(args.token.as_deref())?)
                    .max_encoding_message_size(usize::MAX)
                    .max_decoding_message_size(usize::MAX);
            if let Some(encoding) = args.compression.encoding() {
                client = client.send_compressed(encoding);
            }
            let raw = args.compression.encoding().is_none().then(|| Box::new(raw));
            Ok(Connected::Publish(Box::new(client), raw))
        }
    }
}

/// What one producer did.
#[derive(Clone, Debug, Default)]
pub(crate) struct ProducerReport {
    pub sent: u64,
    pub elapsed: Duration,
    /// Publish only: what the server's `PublishResponse` counted.
    pub accepted: Option<u64>,
    pub rejected: u64,
}

/// When a producer stops: after `count` packets or at `deadline`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limit {
    count: Option<u64>,
    deadline: Option<Instant>,
}

impl Limit {
    pub fn allows(&self, sent: u64) -> bool {
        self.count.is_none_or(|count| sent < count)
            && self
                .deadline
                .is_none_or(|deadline| Instant::now() < deadline)
    }

    pub fn remaining(&self, sent: u64) -> u64 {
        self.count
            .map_or(u64::MAX, |count| count.saturating_sub(sent))
    }
}

/// Packet `n` of a paced producer is due at `start + n / rate`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Pacer {
    start: Instant,
    rate: f64,
}

impl Pacer {
    /// How many packets should have been sent by `now`.
    pub fn due(&self, now: Instant) -> u64 {
        (now.duration_since(self.start).as_secs_f64() * self.rate) as u64 + 1
    }

    pub fn time_of(&self, packet: u64) -> Instant {
        self.start + Duration::from_secs_f64(packet as f64 / self.rate)
    }
}

/// Sends this producer's packets; `index` is also its channel.
pub(crate) async fn produce(
    index: usize,
    connection: Connected,
    plan: Arc<Plan>,
    shared: Arc<Shared>,
) -> Result<ProducerReport, ToolError> {
    let started = Instant::now();
    let limit = Limit {
        count: plan.count,
        deadline: plan.duration.map(|duration| started + duration),
    };
    let pacer = plan.rate_per_producer.map(|rate| Pacer {
        start: started,
        rate,
    });
    let mut report = match connection {
        Connected::Tcp { writer, .. } => {
            tcp_producer(index, writer, &plan, &shared, limit, pacer).await?
        }
        Connected::Publish(_, Some(raw)) if pacer.is_none() => {
            publish_prebuilt(index, *raw, &plan, &shared, limit).await?
        }
        Connected::Publish(client, _) => {
            publish_producer(index, *client, &plan, &shared, limit, pacer).await?
        }
        Connected::Nats(client) => {
            nats_producer(index, client, &plan, &shared, limit, pacer).await?
        }
        Connected::RawNats(nats) => {
            super::nats::produce(index, nats, &plan, &shared, limit, pacer).await?
        }
        Connected::Jetstream(context) => {
            jetstream_producer(index, context, &plan, &shared, limit, pacer).await?
        }
    };
    report.elapsed = started.elapsed();
    Ok(report)
}

async fn tcp_producer(
    index: usize,
    mut writer: Writer,
    plan: &Plan,
    shared: &Shared,
    limit: Limit,
    pacer: Option<Pacer>,
) -> Result<ProducerReport, ToolError> {
    let channel = index as u32;
    let frame_len = HEADER_LEN + plan.size;
    let counter = &shared.sent[index];
    let mut sent = 0u64;
    match pacer {
        None => {
            let frames = block_frames(plan.size, plan.count);
            let mut block = BytesMut::with_capacity(frames as usize * frame_len);
            for position in 0..frames {
                put_frame(&mut block, channel, plan.size, plan.content, 0, position);
            }
            while limit.allows(sent) {
                let n = limit.remaining(sent).min(frames);
                writer.write_all(&block[..n as usize * frame_len]).await?;
                sent += n;
                counter.store(sent, Ordering::Relaxed);
            }
        }
        Some(pacer) => {
            let mut buf = BytesMut::new();
            while limit.allows(sent) {
                let due = pacer
                    .due(Instant::now())
                    .min(sent.saturating_add(limit.remaining(sent)))
                    .min(sent + MAX_PACED_BURST);
                if due <= sent {
                    tokio::time::sleep_until(pacer.time_of(sent).into()).await;
                    continue;
                }
                let stamp = unix_nanos_now();
                for packet in sent..due {
                    put_frame(&mut buf, channel, plan.size, plan.content, stamp, packet);
                }
                writer.write_all(&buf).await?;
                buf.clear();
                sent = due;
                counter.store(sent, Ordering::Relaxed);
            }
        }
    }
    // FIN (and TLS close_notify): the server reads to EOF and keeps everything.
    writer.shutdown().await?;
    Ok(ProducerReport {
        sent,
        ..ProducerReport::default()
    })
}

async fn publish_producer(
    index: usize,
    mut client: Publisher,
    plan: &Plan,
    shared: &Arc<Shared>,
    limit: Limit,
    pacer: Option<Pacer>,
) -> Result<ProducerReport, ToolError> {
    let channel = index as u32;
    let size = plan.size;
    let content = plan.content;
    let counter = Arc::clone(shared);
    let response = match pacer {
        None => {
            let frames = block_frames(size, plan.count);
            let block: Vec<PublishRequest> = (0..frames)
                .map(|position| publish_request(channel, size, content, 0, position))
                .collect();
            // Cloning a request clones two `Bytes` handles: no copy, no hashing.
            let requests = stream::iter(0u64..)
                .take_while(move |sent| future::ready(limit.allows(*sent)))
                .map(move |sent| {
                    counter.sent[index].store(sent + 1, Ordering::Relaxed);
                    block[(sent % frames) as usize].clone()
                });
            client.publish(requests).await?
        }
        Some(pacer) => {
            let requests = stream::unfold(0u64, move |sent| {
                let counter = Arc::clone(&counter);
                async move {
                    if !limit.allows(sent) {
                        return None;
                    }
                    if pacer.due(Instant::now()) <= sent {
                        tokio::time::sleep_until(pacer.time_of(sent).into()).await;
                    }
                    let request = publish_request(channel, size, content, unix_nanos_now(), sent);
                    counter.sent[index].store(sent + 1, Ordering::Relaxed);
                    Some((request, sent + 1))
                }
            });
            client.publish(requests).await?
        }
    }
    .into_inner();
    Ok(ProducerReport {
        sent: shared.sent[index].load(Ordering::Relaxed),
        accepted: Some(response.accepted),
        rejected: response.rejected,
        ..ProducerReport::default()
    })
}

/// An unpaced, uncompressed Publish: the request body is one pre-built
/// block of gRPC-framed `PublishRequest`s (exactly what tonic would send)
/// written over and over, as the TCP producer writes a pre-built block of
/// frames. Encoding each message (a copy of every payload into tonic's
/// buffer, one core at most per stream) otherwise made the client, not the
/// server, the limit of `--via publish`.
async fn publish_prebuilt(
    index: usize,
    raw: RawPublish,
    plan: &Plan,
    shared: &Arc<Shared>,
    limit: Limit,
) -> Result<ProducerReport, ToolError> {
    use http_body_util::BodyExt as _;
    use prost::Message as _;
    let frames = block_frames(plan.size, plan.count);
    let mut block = BytesMut::new();
    let mut ends = Vec::with_capacity(frames as usize);
    for position in 0..frames {
        let message =
            publish_request(index as u32, plan.size, plan.content, 0, position).encode_to_vec();
        block.put_u8(0); // not compressed
        block.put_u32(u32::try_from(message.len())?);
        block.put_slice(&message);
        ends.push(block.len());
    }
    let block = block.freeze();
    let counter = Arc::clone(shared);
    let chunks = stream::unfold(0u64, move |sent| {
        let taken = match limit.allows(sent) {
            true => limit.remaining(sent).min(frames),
            false => 0,
        };
        let chunk = (taken > 0).then(|| block.slice(..ends[taken as usize - 1]));
        counter.sent[index].store(sent + taken, Ordering::Relaxed);
        future::ready(chunk.map(|chunk| {
            (
                Ok::<_, std::convert::Infallible>(http_body::Frame::data(chunk)),
                sent + taken,
            )
        }))
    });
    let mut request = http::Request::post(raw.uri)
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers");
    if let Some(authorization) = raw.authorization {
        request = request.header(http::header::AUTHORIZATION, authorization);
    }
    let request = request
        .body(tonic::body::Body::new(http_body_util::StreamBody::new(
            chunks,
        )))
        .map_err(|error| format!("cannot build the Publish request: {error}"))?;
    let mut channel = raw.channel;
    let response =
        tower::Service::call(tower::ServiceExt::ready(&mut channel).await?, request).await?;
    let (parts, body) = response.into_parts();
    let collected = body
        .collect()
        .await
        .map_err(|error| format!("Publish response: {error}"))?;
    // grpc-status in the trailers, or in the headers of a trailers-only answer.
    let trailers = collected.trailers().cloned().unwrap_or(parts.headers);
    let status = tonic::Status::from_header_map(&trailers)
        .unwrap_or_else(|| tonic::Status::unknown("Publish answered without grpc-status"));
    if status.code() != tonic::Code::Ok {
        return Err(status.into());
    }
    let data = collected.to_bytes();
    let response =
        packet_ingest_protocol::pb::PublishResponse::decode(data.get(5..).unwrap_or(&[]))
            .map_err(|error| format!("Publish response: {error}"))?;
    Ok(ProducerReport {
        sent: shared.sent[index].load(Ordering::Relaxed),
        accepted: Some(response.accepted),
        rejected: response.rejected,
        ..ProducerReport::default()
    })
}

/// Payload `sent` of an async-nats producer (plain or JetStream): at its time
/// when paced, carved out of `chunk`, so there is one allocation per megabytes,
/// not per message (the client copies it into its own buffer).
async fn next_payload(
    chunk: &mut BytesMut,
    plan: &Plan,
    producer: usize,
    sent: u64,
    pacer: Option<Pacer>,
) -> Bytes {
    let stamp = match pacer {
        None => 0,
        Some(pacer) => {
            if pacer.due(Instant::now()) <= sent {
                tokio::time::sleep_until(pacer.time_of(sent).into()).await;
            }
            unix_nanos_now()
        }
    };
    if chunk.capacity() < plan.size {
        *chunk = BytesMut::with_capacity(BLOCK_BYTES.max(plan.size));
    }
    put_payload(chunk, plan.size, plan.content, producer as u32, stamp, sent);
    chunk.split().freeze()
}

async fn nats_producer(
    index: usize,
    client: async_nats::Client,
    plan: &Plan,
    shared: &Shared,
    limit: Limit,
    pacer: Option<Pacer>,
) -> Result<ProducerReport, ToolError> {
    let subject = async_nats::Subject::from(format!("bench.{index}"));
    let counter = &shared.sent[index];
    let mut chunk = BytesMut::new();
    let mut sent = 0u64;
    while limit.allows(sent) {
        let payload = next_payload(&mut chunk, plan, index, sent, pacer).await;
        client
            .publish(subject.clone(), payload)
            .await
            .map_err(|error| format!("NATS publish failed: {error}"))?;
        sent += 1;
        counter.store(sent, Ordering::Relaxed);
    }
    // publish only queues; flush waits until the server has everything.
    client
        .flush()
        .await
        .map_err(|error| format!("NATS flush failed: {error}"))?;
    Ok(ProducerReport {
        sent,
        ..ProducerReport::default()
    })
}

/// The JetStream stream the bench publishes to (subjects `bench.>`).
pub(crate) const JETSTREAM_STREAM: &str = "PACKET_INGEST_BENCH";
/// Publishes a JetStream producer keeps unacknowledged (as cluster mode does).
const JETSTREAM_IN_FLIGHT: usize = 4096;

/// Deletes and creates the bench's stream (file storage), so every run starts empty.
pub(crate) async fn reset_jetstream(url: &str) -> Result<(), ToolError> {
    let client = async_nats::connect(url)
        .await
        .map_err(|error| format!("cannot connect to {url}: {error}"))?;
    let context = async_nats::jetstream::new(client);
    let _ = context.delete_stream(JETSTREAM_STREAM).await;
    context
        .create_stream(async_nats::jetstream::stream::Config {
            name: JETSTREAM_STREAM.to_owned(),
            subjects: vec!["bench.>".to_owned()],
            storage: async_nats::jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|error| format!("cannot create the JetStream stream: {error}"))?;
    Ok(())
}

async fn jetstream_producer(
    index: usize,
    context: async_nats::jetstream::Context,
    plan: &Plan,
    shared: &Shared,
    limit: Limit,
    pacer: Option<Pacer>,
) -> Result<ProducerReport, ToolError> {
    let subject = async_nats::Subject::from(format!("bench.{index}"));
    let counter = &shared.sent[index];
    let mut in_flight = std::collections::VecDeque::new();
    let mut chunk = BytesMut::new();
    let mut sent = 0u64;
    let settle = |ack: async_nats::jetstream::context::PublishAckFuture| async move {
        ack.await
            .map(|_| ())
            .map_err(|error| format!("JetStream did not store a message: {error}"))
    };
    while limit.allows(sent) {
        let payload = next_payload(&mut chunk, plan, index, sent, pacer).await;
        let ack = context
            .publish(subject.clone(), payload)
            .await
            .map_err(|error| format!("JetStream publish failed: {error}"))?;
        in_flight.push_back(ack);
        while in_flight.len() > JETSTREAM_IN_FLIGHT {
            if let Some(ack) = in_flight.pop_front() {
                settle(ack).await?;
            }
        }
        sent += 1;
        counter.store(sent, Ordering::Relaxed);
    }
    while let Some(ack) = in_flight.pop_front() {
        settle(ack).await?;
    }
    Ok(ProducerReport {
        sent,
        ..ProducerReport::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use packet_ingest_protocol::digest::Verifier;
    use packet_ingest_protocol::frame::{FrameDecoder, FrameLimits};

    #[test]
    fn frames_built_in_place_verify_and_carry_time_and_index() {
        let mut wire = BytesMut::new();
        put_frame(&mut wire, 3, 64, Content::Filler, 1234, 0);
        put_frame(&mut wire, 3, 64, Content::Text, 1234, 1);
        let mut decoder = FrameDecoder::new(FrameLimits {
            max_payload: 1 << 20,
            hmac_key_configured: false,
        });
        let verifier = Verifier::new(None, false);
        for expected in 0..2u64 {
            let frame = decoder.decode(&mut wire).expect("valid").expect("complete");
            assert_eq!(verifier.check(&frame), Ok(()));
            assert_eq!(frame.channel(), Channel(3));
            assert_eq!(frame.payload.len(), 64);
            assert_eq!(&frame.payload[0..8], &1234u64.to_be_bytes());
            assert_eq!(&frame.payload[8..16], &expected.to_be_bytes());
        }
        assert!(wire.is_empty());
    }

    #[test]
    fn publish_requests_carry_the_tcp_digest() {
        let request = publish_request(1, 32, Content::Random, 0, 9);
        let frame = make_frame(Channel(1), request.payload.clone(), None);
        assert_eq!(&request.digest[..], &frame.digest.0);
    }

    #[test]
    fn blocks_hold_whole_frames_and_never_more_than_the_count() {
        assert_eq!(block_frames(64 << 10, None), 63);
        assert_eq!(block_frames(16, Some(10)), 10);
        assert_eq!(block_frames(8 << 20, None), 1);
    }

    #[test]
    fn pacer_spreads_packets_over_time() {
        let start = Instant::now();
        let pacer = Pacer {
            start,
            rate: 1000.0,
        };
        assert_eq!(pacer.due(start), 1);
        assert_eq!(pacer.due(start + Duration::from_millis(10)), 11);
        assert_eq!(pacer.time_of(500), start + Duration::from_millis(500));
    }
}
