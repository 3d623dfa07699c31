//! The `packetingest.v1.Packets` service: `Subscribe` streams out of the hub,
//! `Publish` feeds the same verifier and hub as the TCP port.
//!
//! A Subscribe stream owns its hub `Subscription` and its `--max-subscribers`
//! permit, so both are released the moment tonic drops the stream (client gone,
//! stream ended). Heartbeats keep idle streams alive through proxies.

use std::{pin::Pin, sync::Arc, time::Duration};

use futures::{FutureExt, Stream, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::{
    cluster::{Cluster, Destination},
    error::ServiceError,
    frame::{Channel, Digest, Frame, FLAG_HMAC},
    hub::{Hub, Next, Subscription},
    ingest::unix_nanos_now,
    metrics::Metrics,
    pb::{PublishRequest, PublishResponse, SubscribeRequest},
    verify::{FrameBatch, OrderedPipeline, VerifyPool},
    wire::{ChannelFilter, Delivery},
};

pub use crate::pb_server::packets_server::{Packets, PacketsServer};

/// Requests a Publish stream gathers into one verification batch when they are
/// already buffered; a lone request is never held back waiting for more.
const PUBLISH_BATCH: usize = 256;
/// Cluster mode: how long Subscribe waits for this replica to reach a
/// `from_sequence` that the shared stream already has.
const CLUSTER_CATCH_UP: Duration = Duration::from_secs(5);

pub struct PacketsService {
    pub hub: Arc<Hub>,
    /// Where Publish sends packets (the hub, or JetStream in cluster mode).
    pub destination: Destination,
    /// Set in cluster mode: serves `from_sequence` older than local history.
    pub cluster: Option<Arc<Cluster>>,
    pub pool: VerifyPool,
    pub metrics: Arc<Metrics>,
    pub subscriber_permits: Arc<Semaphore>,
    pub max_subscribers: usize,
    pub heartbeat: Duration,
    pub max_payload: u32,
    pub max_in_flight: usize,
    /// Fired when shutdown starts: new streams are refused.
    pub draining: CancellationToken,
}

type DeliveryStream = Pin<Box<dyn Stream<Item = Result<Delivery, Status>> + Send>>;

struct SubscribeState {
    subscription: Subscription,
    heartbeat: Duration,
    metrics: Arc<Metrics>,
    done: bool,
    _permit: OwnedSemaphorePermit,
}

#[tonic::async_trait]
impl Packets for PacketsService {
    type SubscribeStream = DeliveryStream;

    async fn subscribe(
        &self,
        request: Request<SubscribeRequest>,
    ) -> Result<Response<DeliveryStream>, Status> {
        if self.draining.is_cancelled() {
            return Err(ServiceError::ShuttingDown.into());
        }
        let peer = request.remote_addr();
        let request = request.into_inner();
        let permit = Arc::clone(&self.subscriber_permits)
            .try_acquire_owned()
            .map_err(|_| ServiceError::TooManySubscribers {
                limit: self.max_subscribers,
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
        let subscription = self
            .hub
            .subscribe_with(
                ChannelFilter::new(request.channels),
                request.from_sequence,
                self.cluster.is_some(),
            )
            .map_err(ServiceError::from)?;
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
        let state = SubscribeState {
            subscription,
            heartbeat: self.heartbeat,
            metrics: Arc::clone(&self.metrics),
            done: false,
            _permit: permit,
        };
        let stream = futures::stream::unfold(state, |mut state| async move {
            if state.done {
                return None;
            }
            let item = match state.subscription.next(state.heartbeat).await {
                Next::Delivery(delivery) => Ok(delivery),
                Next::Idle => Ok(Delivery::default()),
                Next::End(end) => {
                    state.done = true;
                    state
                        .metrics
                        .subscribers_disconnected
                        .add(end.reason(), 1, 0);
                    tracing::debug!(%end, "ending subscriber stream");
                    Err(Status::from(ServiceError::from(end)))
                }
            };
            Some((item, state))
        });
        Ok(Response::new(match replay {
            Some(replay) => Box::pin(replay.chain(stream)),
            None => Box::pin(stream),
        }))
    }

    async fn publish(
        &self,
        request: Request<Streaming<PublishRequest>>,
    ) -> Result<Response<PublishResponse>, Status> {
        if self.draining.is_cancelled() {
            return Err(ServiceError::ShuttingDown.into());
        }
        let source = match request.remote_addr() {
            Some(addr) => format!("grpc/{addr}"),
            None => "grpc/unknown".to_owned(),
        };
        let mut requests = request.into_inner();
        let mut pipeline =
            OrderedPipeline::new(self.pool.clone(), Arc::from(source), self.max_in_flight);
        let mut response = PublishResponse::default();
        let mut outlet = self.destination.outlet();
        let mut storage_failed = false;
        let mut input_done = false;
        // The first problem ends the upload; packets before it still go through.
        let mut refusal: Option<Status> = None;
        loop {
            tokio::select! {
                Some(verified) = pipeline.next(), if !pipeline.is_idle() => {
                    self.metrics.record_batch(&verified);
                    response.accepted += verified.accepted.len() as u64;
                    response.rejected += verified.rejected_packets();
                    // After a storage failure nothing more is published.
                    if !storage_failed {
                        if let Err(error) = outlet.publish(verified).await {
                            storage_failed = true;
                            refusal = Some(ServiceError::from(error).into());
                            input_done = true;
                        }
                    }
                }
                first = requests.message(), if !input_done && pipeline.has_room() => {
                    let mut batch = FrameBatch { frames: Vec::new(), received_unix_nanos: unix_nanos_now() };
                    let mut next = Some(first);
                    // Take whatever else is already buffered, without waiting.
                    while let Some(message) = next.take() {
                        match message {
                            Ok(Some(request)) => match self.frame_from(request) {
                                Ok(frame) => batch.frames.push(frame),
                                Err(error) => refusal = Some(error.into()),
                            },
                            Ok(None) => input_done = true,
                            Err(status) => refusal = Some(upload_error(status, self.max_payload)),
                        }
                        if refusal.is_some() {
                            input_done = true;
                        }
                        if !input_done && batch.frames.len() < PUBLISH_BATCH {
                            next = requests.message().now_or_never();
                        }
                    }
                    pipeline.submit(batch);
                }
                else => break,
            }
        }
        match outlet.finish().await {
            Ok(last) => response.last_sequence = last.unwrap_or_default(),
            Err(error) => refusal = refusal.or(Some(ServiceError::from(error).into())),
        }
        match refusal {
            Some(status) => Err(status),
            None => Ok(Response::new(response)),
        }
    }
}

/// A request stream error. tonic refuses a message over its decode limit with
/// OUT_OF_RANGE, which this API reserves for `from_sequence`; it is an
/// oversized payload, so say so.
fn upload_error(status: Status, max_payload: u32) -> Status {
    match status.code() {
        tonic::Code::OutOfRange => ServiceError::MessageTooLarge { max: max_payload }.into(),
        _ => status,
    }
}

impl PacketsService {
    /// Turns a request into the frame a TCP producer would have sent.
    fn frame_from(&self, request: PublishRequest) -> Result<Frame, ServiceError> {
        if request.payload.len() > self.max_payload as usize {
            return Err(ServiceError::PayloadTooLong {
                length: request.payload.len(),
                max: self.max_payload,
            });
        }
        if request.hmac && !self.pool.verifier().has_hmac_key() {
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
