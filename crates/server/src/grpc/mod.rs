//! The gRPC port: the `packetingest.v1.Packets` service, and what serves it.
//!
//! - [`transport`]: connections on hyper directly: the connection cap with
//!   idle eviction, TLS and HTTP/2 handshake deadlines, HTTP/2 limits.
//! - [`routes`]: health and reflection (tonic's, outside every limit) next to
//!   `Packets` (behind auth, the concurrency limit and load shedding).
//! - [`framing`]: reading request messages and writing responses.
//! - this module: the four methods.
//!
//! The `Packets` methods are served without tonic's codec: a Subscribe
//! response is written as the hub's shared, pre-encoded slices (tonic would
//! copy each response into a per-stream buffer, so a stalled stream would hold
//! a private megabyte), and Publish reads its messages under the ingest budget
//! (tonic would buffer a partial message outside any limit). Clients see
//! ordinary gRPC: the tests use tonic's generated client, CI uses grpcurl and
//! Python's grpcio.
//!
//! A Subscribe stream owns its hub `Subscription` and its `--max-subscribers`
//! permit, so both are released the moment the stream is dropped (client gone,
//! stream ended). Heartbeats keep idle streams alive through proxies.

pub mod framing;
pub mod routes;
pub mod transport;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use futures::StreamExt;
use http::{HeaderMap, HeaderValue};
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tonic::{body::Body, transport::server::TcpConnectInfo, Status};

use crate::{
    auth::{Allowed, Permissions},
    cluster::Cluster,
    compression::{Compression, Encoding},
    connections::{Activity, ConnectionSlots},
    error::ServiceError,
    frame::{Channel, Digest, Frame, FLAG_HMAC},
    hub::{Hub, HubStats, Next, SubscribeOptions, SubscriptionEnd},
    metrics::Metrics,
    pb::{
        PublishBatchRequest, PublishRequest, PublishResponse, StreamInfoResponse, SubscribeRequest,
    },
    producer::{Producer, ProducerContext},
    stream::StreamIdentity,
    verify::{unix_nanos_now, FrameBatch},
    wire::{ChannelFilter, Delivery},
};
use framing::{MessageReader, MessageStream};

pub use packet_ingest_protocol::client::STREAM_ID_HEADER;
/// Requests a Publish stream gathers into one verification batch when they are
/// already buffered; a lone request is never held back waiting for more.
const PUBLISH_BATCH: usize = 256;
/// Wire bytes of one Publish verification batch, at most.
const PUBLISH_BATCH_BYTES: usize = 256 * 1024;
/// Cluster mode: how long Subscribe waits for this replica to reach a
/// `from_sequence` that the shared stream already has.
const CLUSTER_CATCH_UP: Duration = Duration::from_secs(5);
/// How long a new Publish stream waits for an idle one it displaced.
const PUBLISHER_EVICTION_WAIT: Duration = Duration::from_secs(1);
/// A unary request message must arrive within this after the headers.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The limits and context of the `Packets` methods.
pub struct PacketsService {
    pub hub: Arc<Hub>,
    pub identity: StreamIdentity,
    /// Where Publish packets go, and what verifies them.
    pub producer: ProducerContext,
    /// Set in cluster mode: serves `from_sequence` older than local history.
    pub cluster: Option<Arc<Cluster>>,
    pub metrics: Arc<Metrics>,
    pub subscriber_permits: Arc<Semaphore>,
    pub max_subscribers: usize,
    /// Publish streams; when all are taken, the one idle longest gives way.
    pub publishers: Arc<ConnectionSlots>,
    pub max_filter_channels: usize,
    pub publish_idle_timeout: Duration,
    pub heartbeat: Duration,
    pub max_payload: u32,
    /// `--compression`: the encodings offered.
    pub compression: Compression,
    /// Fired when shutdown starts: new streams are refused.
    pub draining: CancellationToken,
}

/// Where a call comes from, as the transport recorded it.
fn peer(request: &http::Request<Body>) -> Option<SocketAddr> {
    request
        .extensions()
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
}

impl PacketsService {
    fn headers(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Ok(value) = HeaderValue::from_str(&self.identity.id) {
            headers.insert(STREAM_ID_HEADER, value);
        }
        headers.insert("grpc-accept-encoding", self.compression.accept_header());
        headers
    }

    /// The status for `error`, counted by its refusal reason.
    fn counted(&self, error: ServiceError) -> Status {
        if let Some(reason) = error.refusal_reason() {
            self.metrics.requests_refused.inc(reason);
        }
        error.into()
    }

    fn refuse(&self, error: ServiceError) -> http::Response<Body> {
        if let Some(reason) = error.refusal_reason() {
            self.metrics.requests_refused.inc(reason);
        }
        framing::refusal(error.into(), self.headers())
    }

    /// Largest Subscribe request: every channel of the largest filter, not packed.
    fn max_subscribe_request(&self) -> usize {
        self.max_filter_channels * 6 + 1024
    }

    pub async fn subscribe(&self, request: http::Request<Body>) -> http::Response<Body> {
        match self.start_subscription(request).await {
            Ok((stream, encoding)) => {
                let mut headers = self.headers();
                if let Some(encoding) = encoding {
                    headers.insert("grpc-encoding", HeaderValue::from_static(encoding.name()));
                }
                framing::response(headers, stream)
            }
            Err(status) => framing::refusal(status, self.headers()),
        }
    }

    async fn start_subscription(
        &self,
        request: http::Request<Body>,
    ) -> Result<(MessageStream, Option<Encoding>), Status> {
        let refused = |error: ServiceError| -> Status {
            if let Some(reason) = error.refusal_reason() {
                self.metrics.requests_refused.inc(reason);
            }
            error.into()
        };
        if self.draining.is_cancelled() {
            return Err(ServiceError::ShuttingDown.into());
        }
        let peer = peer(&request);
        let permissions = request.extensions().get::<Permissions>().cloned();
        let close_connection = request
            .extensions()
            .get::<Arc<Activity>>()
            .map(|activity| activity.closer());
        let request_encoding = self.compression.request_encoding(request.headers())?;
        let response_encoding = self.compression.response_encoding(request.headers());
        let mut reader = MessageReader::new(
            request.into_body(),
            self.max_subscribe_request(),
            "a Subscribe request names at most --max-filter-channels channels",
        )
        .with_encoding(request_encoding);
        let request: SubscribeRequest = read_unary(&mut reader).await.inspect_err(|status| {
            if status.code() == tonic::Code::InvalidArgument {
                self.metrics.requests_refused.inc("malformed_request");
            }
        })?;
        if !request.stream_id.is_empty() && *request.stream_id != *self.identity.id {
            return Err(refused(ServiceError::StreamMismatch {
                requested: request.stream_id,
                current: self.identity.id.to_string(),
            }));
        }
        let channels = match permissions.map(|permissions| permissions.subscribe) {
            None | Some(Allowed::All) => request.channels,
            Some(Allowed::Nothing) => {
                return Err(refused(ServiceError::PermissionDenied("subscribe".into())))
            }
            // No filter means every channel the token may read.
            Some(Allowed::Only(allowed)) if request.channels.is_empty() => allowed.to_vec(),
            Some(Allowed::Only(allowed)) => {
                if let Some(channel) = request
                    .channels
                    .iter()
                    .find(|channel| allowed.binary_search(channel).is_err())
                {
                    return Err(refused(ServiceError::PermissionDenied(format!(
                        "subscribe to channel {channel}"
                    ))));
                }
                request.channels
            }
        };
        let filter = ChannelFilter::new(channels);
        let count = filter.channels().map_or(0, <[u32]>::len);
        if count > self.max_filter_channels {
            return Err(refused(ServiceError::FilterTooLarge {
                count,
                limit: self.max_filter_channels,
            }));
        }
        let permit = Arc::clone(&self.subscriber_permits)
            .try_acquire_owned()
            .map_err(|_| {
                refused(ServiceError::TooManySubscribers {
                    limit: self.max_subscribers,
                })
            })?;
        if let (Some(cluster), Some(from)) = (&self.cluster, request.from_sequence) {
            // A client moving between replicas may ask for a sequence this
            // replica's consumer has not reached yet: wait a little for it.
            if from > self.hub.next_sequence()
                && cluster
                    .next_sequence()
                    .await
                    .is_ok_and(|stream_next| from <= stream_next)
            {
                let _ =
                    tokio::time::timeout(CLUSTER_CATCH_UP, self.hub.wait_for_sequence(from)).await;
            }
        }
        let mut subscription = self
            .hub
            .subscribe_with(SubscribeOptions {
                filter,
                from_sequence: request.from_sequence,
                replay_elsewhere: self.cluster.is_some(),
                close_connection,
                label: Some(Arc::from(match peer {
                    Some(addr) => format!("grpc/{addr}"),
                    None => "grpc/unknown".to_owned(),
                })),
            })
            .map_err(|error| Status::from(ServiceError::from(error)))?;
        if response_encoding.is_some() {
            subscription.deliver_whole_batches();
        }
        // Cluster mode: what the local history no longer holds comes from JetStream first.
        let replay = match (&self.cluster, request.from_sequence) {
            (Some(cluster), Some(from)) if from.max(1) < subscription.cursor() => {
                Some(cluster.replay(
                    from.max(1),
                    subscription.cursor(),
                    subscription.filter().clone(),
                ))
            }
            _ => None,
        };
        tracing::debug!(peer = ?peer, from = ?request.from_sequence, "subscriber joined");
        let live = deliveries(
            subscription,
            permit,
            self.heartbeat,
            Arc::clone(&self.metrics),
        );
        let stream = match replay {
            Some(replay) => replay.chain(live).boxed(),
            None => live.boxed(),
        };
        // Compressing a batch takes milliseconds: it runs on the verify pool,
        // never on a reactor thread; a batch compressed before is sent as is.
        let metrics = Arc::clone(&self.metrics);
        let pool = self.producer.pool.clone();
        let messages = stream.then(move |delivery| {
            let metrics = Arc::clone(&metrics);
            let pool = pool.clone();
            async move {
                let delivery = delivery?;
                match response_encoding {
                    Some(encoding) if delivery.needs_compressing(encoding) => pool
                        .run(move || delivery.into_message(Some((encoding, &metrics.compression))))
                        .await
                        .map_err(|_| Status::unavailable("the server is shutting down")),
                    _ => Ok(delivery.into_message(
                        response_encoding.map(|encoding| (encoding, &metrics.compression)),
                    )),
                }
            }
        });
        Ok((Box::pin(messages), response_encoding))
    }

    pub async fn publish(&self, request: http::Request<Body>) -> http::Response<Body> {
        let publisher = match self.admit_publisher(request).await {
            Ok(publisher) => publisher,
            Err(refusal) => return refusal,
        };
        let reader = MessageReader::new(
            publisher.body,
            self.max_payload as usize + 64 * 1024,
            "a Publish payload is at most --max-payload bytes",
        )
        .with_budget(&self.producer.budget, publisher.close)
        .with_encoding(publisher.encoding);
        let outcome = self
            .run_publish(
                reader,
                publisher.source,
                publisher.slot.activity(),
                &publisher.allowed,
            )
            .await;
        drop((publisher.slot, publisher._counted));
        self.publish_answer(outcome)
    }

    /// PublishBatch: one request holding what a Publish upload would send,
    /// for clients that cannot stream requests (browsers over gRPC-Web).
    /// Same checks, limits, ordering and answer as Publish.
    pub async fn publish_batch(&self, request: http::Request<Body>) -> http::Response<Body> {
        let publisher = match self.admit_publisher(request).await {
            Ok(publisher) => publisher,
            Err(refusal) => return refusal,
        };
        let mut reader = MessageReader::new(
            publisher.body,
            self.max_payload as usize + 64 * 1024,
            "a PublishBatch request is at most --max-payload + 64 KiB",
        )
        .with_budget(&self.producer.budget, publisher.close)
        .with_encoding(publisher.encoding);
        let outcome = match read_unary::<PublishBatchRequest>(&mut reader).await {
            Ok(batch) => {
                let charge = reader.charge_for_taken();
                self.run_publish_batch(batch.packets, charge, publisher.source, &publisher.allowed)
                    .await
            }
            Err(status) => Err(status),
        };
        drop((publisher.slot, publisher._counted));
        self.publish_answer(outcome)
    }

    /// Takes a Publish slot for a call (refusing it while draining, without
    /// publish permission, or at `--max-publishers`).
    async fn admit_publisher(
        &self,
        request: http::Request<Body>,
    ) -> Result<Publisher, http::Response<Body>> {
        if self.draining.is_cancelled() {
            return Err(self.refuse(ServiceError::ShuttingDown));
        }
        let allowed = request
            .extensions()
            .get::<Permissions>()
            .map_or(Allowed::All, |permissions| permissions.publish.clone());
        if allowed == Allowed::Nothing {
            return Err(self.refuse(ServiceError::PermissionDenied("publish".into())));
        }
        let encoding = self
            .compression
            .request_encoding(request.headers())
            .map_err(|status| framing::refusal(status, self.headers()))?;
        let source: Arc<str> = match peer(&request) {
            Some(addr) => Arc::from(format!("grpc/{addr}")),
            None => Arc::from("grpc/unknown"),
        };
        let close = request
            .extensions()
            .get::<Arc<Activity>>()
            .map_or_else(CancellationToken::new, |activity| activity.closer());
        let Some(slot) = self.publishers.try_admit(PUBLISHER_EVICTION_WAIT).await else {
            return Err(self.refuse(ServiceError::TooManyPublishers {
                limit: self.publishers.limit(),
            }));
        };
        self.metrics.publishers.inc();
        Ok(Publisher {
            _counted: PublisherCount(self.metrics.publishers.clone()),
            slot,
            allowed,
            source,
            close,
            encoding,
            body: request.into_body(),
        })
    }

    fn publish_answer(
        &self,
        outcome: Result<crate::producer::ProducerTotals, Status>,
    ) -> http::Response<Body> {
        match outcome {
            Ok(totals) => {
                let message = framing::encode(&PublishResponse {
                    accepted: totals.accepted,
                    rejected: totals.rejected,
                    last_sequence: totals.last_sequence.unwrap_or_default(),
                });
                framing::response(
                    self.headers(),
                    Box::pin(futures::stream::iter([Ok(vec![message])])),
                )
            }
            Err(status) => framing::refusal(status, self.headers()),
        }
    }

    /// Verifies and publishes the packets of one PublishBatch request, in
    /// order; the first bad one ends it (packets before it still go through).
    async fn run_publish_batch(
        &self,
        requests: Vec<PublishRequest>,
        mut charge: Option<crate::budget::Charge>,
        source: Arc<str>,
        allowed: &Allowed,
    ) -> Result<crate::producer::ProducerTotals, Status> {
        let mut producer = Producer::new(&self.producer, source);
        let mut refusal: Option<Status> = None;
        let mut requests = requests.into_iter();
        loop {
            if refusal.is_none() && requests.len() > 0 && producer.has_room() {
                let mut batch = FrameBatch {
                    received_unix_nanos: unix_nanos_now(),
                    ..FrameBatch::default()
                };
                let mut bytes = 0;
                while batch.frames.len() < PUBLISH_BATCH && bytes < PUBLISH_BATCH_BYTES {
                    let Some(request) = requests.next() else {
                        break;
                    };
                    match self.frame_from(request, allowed) {
                        Ok(frame) => {
                            bytes += frame.wire_len();
                            batch.frames.push(frame);
                        }
                        Err(error) => {
                            refusal = Some(self.counted(error));
                            break;
                        }
                    }
                }
                // The request's bytes stay charged until its last packets are published.
                if requests.len() == 0 || refusal.is_some() {
                    batch.charge = charge.take();
                }
                if !batch.frames.is_empty() {
                    producer.submit(batch);
                }
                continue;
            }
            if producer.is_idle() {
                break;
            }
            let Some(verified) = producer.next_verified().await else {
                break;
            };
            if let Err(error) = producer.publish(verified).await {
                refusal = refusal.or(Some(ServiceError::from(error).into()));
            }
        }
        self.settle(producer, refusal).await
    }

    /// Reads, verifies and publishes one upload. The first problem ends it;
    /// packets before it still go through.
    async fn run_publish(
        &self,
        mut reader: MessageReader,
        source: Arc<str>,
        activity: &Arc<Activity>,
        allowed: &Allowed,
    ) -> Result<crate::producer::ProducerTotals, Status> {
        let mut producer = Producer::new(&self.producer, source);
        let mut refusal: Option<Status> = None;
        let mut input_done = false;
        let mut last_message = Instant::now();
        loop {
            // Held back by the server, an upload is not idle.
            let _busy = (!producer.has_room() || !producer.is_idle()).then(|| activity.busy());
            tokio::select! {
                biased;
                Some(verified) = producer.next_verified(), if !producer.is_idle() => {
                    if let Err(error) = producer.publish(verified).await {
                        refusal = refusal.or(Some(ServiceError::from(error).into()));
                        input_done = true;
                    }
                }
                _ = tokio::time::sleep_until(last_message + self.publish_idle_timeout),
                    if !input_done && producer.has_room() => {
                    self.metrics.requests_refused.inc("publish_idle");
                    refusal = Some(ServiceError::PublishIdle(self.publish_idle_timeout).into());
                    input_done = true;
                }
                _ = activity.closed(), if !input_done => {
                    self.metrics.requests_refused.inc("publish_displaced");
                    refusal = Some(ServiceError::PublishDisplaced.into());
                    input_done = true;
                }
                first = reader.next(), if !input_done && producer.has_room() => {
                    last_message = Instant::now();
                    activity.touch();
                    let mut batch = FrameBatch {
                        received_unix_nanos: unix_nanos_now(),
                        ..FrameBatch::default()
                    };
                    let mut bytes = 0;
                    let mut next = Some(first);
                    // Take whatever else is already here, without waiting.
                    while let Some(message) = next.take() {
                        match message.and_then(|message| message.ok_or(Status::ok(""))) {
                            Ok(message) => match framing::decode::<PublishRequest>(message)
                                .and_then(|request| {
                                    self.frame_from(request, allowed)
                                        .map_err(|error| self.counted(error))
                                })
                            {
                                Ok(frame) => {
                                    bytes += frame.wire_len();
                                    batch.frames.push(frame);
                                }
                                Err(status) => refusal = Some(status),
                            },
                            Err(status) if status.code() == tonic::Code::Ok => input_done = true,
                            Err(status) => refusal = Some(status),
                        }
                        if refusal.is_some() {
                            input_done = true;
                        }
                        if !input_done && batch.frames.len() < PUBLISH_BATCH && bytes < PUBLISH_BATCH_BYTES {
                            next = match reader.next_now() {
                                Ok(Some(message)) => Some(Ok(Some(message))),
                                Ok(None) if reader.is_finished() => Some(Ok(None)),
                                Ok(None) => None,
                                Err(status) => Some(Err(status)),
                            };
                        }
                    }
                    batch.charge = reader.charge_for_taken();
                    if !batch.frames.is_empty() {
                        producer.submit(batch);
                    }
                }
                else => break,
            }
        }
        self.settle(producer, refusal).await
    }

    /// Ends a Publish or PublishBatch: waits for what is in verification and,
    /// with a log, for what was accepted to be durable (SPEC §9).
    async fn settle(
        &self,
        mut producer: Producer,
        refusal: Option<Status>,
    ) -> Result<crate::producer::ProducerTotals, Status> {
        let finished = producer.finish().await;
        if let (Ok(totals), Some(_)) = (&finished, self.hub.log()) {
            if let Some(last) = totals.last_sequence {
                // The sender lives as long as the hub: this only ends when reached.
                let _ = self.hub.durable().wait_for(|end| *end > last).await;
            }
        }
        match (refusal, finished) {
            (Some(status), _) => Err(status),
            (None, Err(error)) => Err(ServiceError::from(error).into()),
            (None, Ok(totals)) => Ok(totals),
        }
    }

    pub async fn stream_info(&self, request: http::Request<Body>) -> http::Response<Body> {
        if request
            .extensions()
            .get::<Permissions>()
            .is_some_and(|permissions| !permissions.stream_info)
        {
            return self.refuse(ServiceError::PermissionDenied("call StreamInfo".into()));
        }
        let encoding = match self.compression.request_encoding(request.headers()) {
            Ok(encoding) => encoding,
            Err(status) => return framing::refusal(status, self.headers()),
        };
        let mut reader =
            MessageReader::new(request.into_body(), 1024, "StreamInfoRequest has no fields")
                .with_encoding(encoding);
        if let Err(status) = read_unary::<crate::pb::StreamInfoRequest>(&mut reader).await {
            return framing::refusal(status, self.headers());
        }
        let stats = self.hub.stats();
        let mut response = self.stream_info_response(&stats);
        if let Some(cluster) = &self.cluster {
            // The stream is JetStream's: its range, size and age come from
            // there (the local hub holds only a window of it).
            match cluster.state().await {
                Ok(state) => {
                    response.first_sequence = state.first_sequence;
                    response.next_sequence = state.next_sequence.max(stats.next_sequence);
                    response.retained_packets =
                        response.next_sequence.saturating_sub(state.first_sequence);
                    response.retained_bytes = state.retained_bytes;
                    response.oldest_received_unix_nanos = state.oldest_received_unix_nanos;
                }
                Err(error) => {
                    return framing::refusal(ServiceError::from(error).into(), self.headers())
                }
            }
        }
        let message = framing::encode(&response);
        framing::response(
            self.headers(),
            Box::pin(futures::stream::iter([Ok(vec![message])])),
        )
    }

    pub fn stream_info_response(&self, stats: &HubStats) -> StreamInfoResponse {
        if let Some(log) = self.hub.log() {
            // Everything in memory is on disk too: the log is the range.
            let first = log.first_sequence().min(stats.oldest_sequence);
            return StreamInfoResponse {
                stream_id: self.identity.id.to_string(),
                first_sequence: first,
                next_sequence: stats.next_sequence,
                retained_packets: stats.next_sequence.saturating_sub(first),
                retained_bytes: log.retained_bytes(),
                oldest_received_unix_nanos: log.oldest_received_unix_nanos(),
                durable: true,
            };
        }
        StreamInfoResponse {
            stream_id: self.identity.id.to_string(),
            first_sequence: stats.oldest_sequence,
            next_sequence: stats.next_sequence,
            retained_packets: stats.retained_packets,
            retained_bytes: stats.retained_bytes,
            oldest_received_unix_nanos: stats.oldest_received_unix_nanos,
            durable: self.identity.durable,
        }
    }

    /// Turns a request into the frame a TCP producer would have sent.
    fn frame_from(
        &self,
        request: PublishRequest,
        allowed: &Allowed,
    ) -> Result<Frame, ServiceError> {
        if !allowed.permits(request.channel) {
            return Err(ServiceError::PermissionDenied(format!(
                "publish to channel {}; packets before it were accepted",
                request.channel
            )));
        }
        if request.payload.len() > self.max_payload as usize {
            return Err(ServiceError::PayloadTooLong {
                length: request.payload.len(),
                max: self.max_payload,
            });
        }
        if request.hmac && !self.producer.pool.verifier().has_hmac_key() {
            return Err(ServiceError::HmacNotConfigured);
        }
        let flags = if request.hmac { FLAG_HMAC } else { 0 };
        // A digest of the wrong length is counted as a mismatch like any other:
        // all zeros stands in for it (no input hashes to it in practice).
        let digest = <[u8; 32]>::try_from(request.digest.as_ref()).unwrap_or([0u8; 32]);
        Ok(Frame::new(
            Channel(request.channel),
            flags,
            request.payload,
            Digest(digest),
        ))
    }
}

/// An admitted Publish or PublishBatch call. Dropped when the call ends,
/// also when it is cancelled (client gone, deadline): slot and gauge follow.
struct Publisher {
    _counted: PublisherCount,
    slot: crate::connections::ConnectionSlot,
    allowed: Allowed,
    source: Arc<str>,
    /// Fires when the connection is to close (evicted, holding memory).
    close: CancellationToken,
    /// The request's `grpc-encoding`.
    encoding: Option<Encoding>,
    body: Body,
}

/// Keeps `packet_ingest_publishers` right however a call ends.
struct PublisherCount(prometheus_client::metrics::gauge::Gauge);

impl Drop for PublisherCount {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Reads the one request message of a unary or server-streaming call.
async fn read_unary<M: prost::Message + Default>(reader: &mut MessageReader) -> Result<M, Status> {
    match tokio::time::timeout(REQUEST_TIMEOUT, reader.next()).await {
        Err(_) => Err(ServiceError::RequestTimeout(REQUEST_TIMEOUT).into()),
        Ok(Err(status)) => Err(status),
        Ok(Ok(None)) => Err(ServiceError::MissingRequest.into()),
        Ok(Ok(Some(message))) => framing::decode(message),
    }
}

/// A subscription's live deliveries: heartbeats when idle, and the status
/// that ends it. Holds the `--max-subscribers` permit while it lives.
fn deliveries(
    subscription: crate::hub::Subscription,
    permit: OwnedSemaphorePermit,
    heartbeat: Duration,
    metrics: Arc<Metrics>,
) -> impl futures::Stream<Item = Result<Delivery, Status>> + Send + 'static {
    let state = (subscription, permit, false);
    futures::stream::unfold(state, move |(mut subscription, permit, done)| {
        let metrics = Arc::clone(&metrics);
        async move {
            if done {
                return None;
            }
            let from = subscription.cursor();
            let (item, done) = match subscription.next(heartbeat).await {
                Next::Delivery(delivery) => {
                    // A trace span only (debug level: off unless --otlp-endpoint).
                    let _span = tracing::debug_span!(
                        "deliver",
                        packets = delivery.packets(),
                        missed = delivery.missed,
                        from_sequence = from,
                        to_sequence = subscription.cursor().saturating_sub(1),
                    )
                    .entered();
                    (Ok(delivery), false)
                }
                Next::Idle => (Ok(Delivery::heartbeat()), false),
                Next::End(end) => {
                    if end != SubscriptionEnd::HoldingMemory {
                        metrics.subscribers_disconnected.add(end.reason(), 1, 0);
                    }
                    tracing::debug!(%end, "ending subscriber stream");
                    (Err(Status::from(ServiceError::from(end))), true)
                }
            };
            Some((item, (subscription, permit, done)))
        }
    })
}
