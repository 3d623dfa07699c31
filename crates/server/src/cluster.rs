//! Cluster mode: replicas share one ordered stream through NATS JetStream.
//!
//! With `--cluster-nats`, verified packets do not go straight into the local
//! hub. Each connection publishes them, in order, to the JetStream stream
//! (`packetingest.<channel>` subjects), with a `Nats-Msg-Id` built from the
//! replica, the connection and `source_sequence`, so a retried publish is
//! stored once. Publishing is pipelined (acks awaited in order, at most
//! `MAX_IN_FLIGHT` outstanding), and a connection awaiting acks stops reading
//! its socket. Every replica runs one ordered consumer that feeds its local hub
//! with the JetStream stream sequence as `sequence`, so every subscriber on
//! every replica sees the same packets under the same numbers. A message's
//! body is the packet's pre-encoded protobuf fields (see `wire`), so nothing is
//! re-encoded on either side. `from_sequence` older than the local history is
//! replayed from the stream.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, SystemTime},
};

use async_nats::jetstream::{
    self,
    consumer::{push, DeliverPolicy},
    stream::{Config as StreamConfig, StorageType},
};
use futures::{FutureExt, Stream, StreamExt};
use tokio_util::sync::CancellationToken;

use crate::{
    frame::Channel,
    hub::Hub,
    wire::{ChannelFilter, Delivery, EncodedPacketsBuilder},
};

pub const SUBJECT_PREFIX: &str = "packetingest";
/// Unacknowledged publishes one connection may have outstanding.
const MAX_IN_FLIGHT: usize = 4096;
/// Attempts to store one packet before the connection is given up.
const PUBLISH_ATTEMPTS: u32 = 5;
/// Messages the consumer gathers into one hub batch when they are already there.
const FEED_BATCH: usize = 1024;
/// JetStream's window for dropping a republished message with the same id.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot connect to NATS at {url}: {message}")]
    Connect { url: String, message: String },
    #[error("cannot set up JetStream stream {stream}: {message}")]
    Stream { stream: String, message: String },
    #[error("JetStream did not store a packet after {PUBLISH_ATTEMPTS} attempts: {0}")]
    Publish(String),
}

/// A connection to the JetStream stream all replicas share.
pub struct Cluster {
    jetstream: jetstream::Context,
    stream: String,
    /// Distinguishes this process's message ids from other replicas' and restarts'.
    instance: u64,
    next_connection: AtomicU64,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("stream", &self.stream)
            .finish()
    }
}

fn subject(channel: Channel) -> String {
    format!("{SUBJECT_PREFIX}.{}", channel.0)
}

fn channel_of(subject: &str) -> Option<Channel> {
    let channel = subject.strip_prefix(SUBJECT_PREFIX)?.strip_prefix('.')?;
    channel.parse().ok().map(Channel)
}

impl Cluster {
    /// Connects and makes sure the stream exists. NATS reconnects on its own later.
    pub async fn connect(url: &str, stream: &str) -> Result<Arc<Cluster>, ClusterError> {
        let client = async_nats::ConnectOptions::new()
            .name("packet-ingest")
            .connection_timeout(Duration::from_secs(5))
            .max_reconnects(None)
            .connect(url)
            .await
            .map_err(|error| ClusterError::Connect {
                url: url.to_owned(),
                message: error.to_string(),
            })?;
        let jetstream = jetstream::new(client);
        jetstream
            .get_or_create_stream(StreamConfig {
                name: stream.to_owned(),
                subjects: vec![format!("{SUBJECT_PREFIX}.>")],
                storage: StorageType::File,
                duplicate_window: DUPLICATE_WINDOW,
                ..Default::default()
            })
            .await
            .map_err(|error| ClusterError::Stream {
                stream: stream.to_owned(),
                message: error.to_string(),
            })?;
        let instance = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_nanos() as u64)
            ^ u64::from(std::process::id()) << 32;
        Ok(Arc::new(Cluster {
            jetstream,
            stream: stream.to_owned(),
            instance,
            next_connection: AtomicU64::new(0),
        }))
    }

    /// The sequence JetStream will give the next message.
    pub async fn next_sequence(&self) -> Result<u64, ClusterError> {
        let stream_error = |error: &dyn std::fmt::Display| ClusterError::Stream {
            stream: self.stream.clone(),
            message: error.to_string(),
        };
        let mut stream = self
            .jetstream
            .get_stream(&self.stream)
            .await
            .map_err(|error| stream_error(&error))?;
        let info = stream.info().await.map_err(|error| stream_error(&error))?;
        Ok(info.state.last_sequence + 1)
    }

    /// The stream's identity (SPEC §7): its name and creation time, so a
    /// stream deleted and created again under the same name is another stream.
    pub async fn identity(&self) -> Result<crate::stream::StreamIdentity, ClusterError> {
        let stream_error = |error: &dyn std::fmt::Display| ClusterError::Stream {
            stream: self.stream.clone(),
            message: error.to_string(),
        };
        let mut stream = self
            .jetstream
            .get_stream(&self.stream)
            .await
            .map_err(|error| stream_error(&error))?;
        let info = stream.info().await.map_err(|error| stream_error(&error))?;
        let created = info.created.unix_timestamp_nanos();
        let mut id = format!("js-{}-{created:x}", self.stream);
        id.truncate(64);
        Ok(crate::stream::StreamIdentity {
            id: Arc::from(id),
            durable: true,
        })
    }

    /// Publisher state for one producer connection or Publish stream.
    pub fn publisher(self: &Arc<Self>) -> ClusterPublisher {
        ClusterPublisher::new(
            Arc::clone(self),
            self.next_connection.fetch_add(1, Ordering::Relaxed),
        )
    }

    /// Feeds the local hub from the stream, starting at `next`, until `stop`.
    /// Consumer failures (NATS restarts) recreate the consumer where it left off.
    pub async fn feed(self: Arc<Self>, hub: Arc<Hub>, mut next: u64, stop: CancellationToken) {
        loop {
            match self.consume_from(&hub, &mut next, &stop).await {
                Ok(()) => return,
                Err(error) => {
                    tracing::warn!(%error, next, "JetStream consumer failed; recreating it");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                        _ = stop.cancelled() => return,
                    }
                }
            }
        }
    }

    async fn consume_from(
        &self,
        hub: &Hub,
        next: &mut u64,
        stop: &CancellationToken,
    ) -> Result<(), async_nats::Error> {
        let stream = self.jetstream.get_stream(&self.stream).await?;
        let consumer = stream
            .create_consumer(push::OrderedConfig {
                deliver_subject: self.jetstream.client().new_inbox(),
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: *next,
                },
                ..Default::default()
            })
            .await?;
        let mut messages = consumer.messages().await?;
        loop {
            let first = tokio::select! {
                message = messages.next() => message,
                _ = stop.cancelled() => return Ok(()),
            };
            let Some(first) = first else {
                return Err("consumer stream ended".into());
            };
            let mut batch = EncodedPacketsBuilder::with_capacity(1, 0, *next);
            let mut first_sequence = None;
            let mut expected = 0;
            let mut pending_message = Some(first);
            while let Some(result) = pending_message.take() {
                let message = result?;
                let sequence = message.info()?.stream_sequence;
                match (channel_of(message.subject.as_str()), sequence >= *next) {
                    (Some(channel), true) => {
                        // A hub batch holds consecutive sequences; a hole
                        // (deleted messages) starts a new batch.
                        if first_sequence.is_some() && sequence != expected {
                            let full = std::mem::replace(
                                &mut batch,
                                EncodedPacketsBuilder::with_capacity(1, 0, sequence),
                            );
                            hub.publish_at(first_sequence, full.finish()).await;
                            first_sequence = None;
                        }
                        first_sequence.get_or_insert(sequence);
                        batch.push_fields(channel, &message.payload, 0);
                        expected = sequence + 1;
                    }
                    (None, _) => {
                        tracing::warn!(subject = %message.subject, "ignoring a message outside packetingest.<channel>")
                    }
                    (_, false) => {}
                }
                *next = (*next).max(sequence + 1);
                if expected - first_sequence.unwrap_or(expected) < FEED_BATCH as u64 {
                    pending_message = messages.next().now_or_never().flatten();
                }
            }
            if first_sequence.is_some() {
                hub.publish_at(first_sequence, batch.finish()).await;
            }
        }
    }

    /// Deliveries of stored packets with `from <= sequence < until`, oldest
    /// first: how `from_sequence` older than the local history is served.
    pub fn replay(
        self: &Arc<Self>,
        from: u64,
        until: u64,
        filter: ChannelFilter,
    ) -> impl Stream<Item = Result<Delivery, tonic::Status>> + Send + 'static {
        let cluster = Arc::clone(self);
        futures::stream::once(async move {
            cluster
                .replay_consumer(from, &filter)
                .await
                .map(|messages| (messages, filter))
        })
        .flat_map(move |opened| match opened {
            Err(status) => futures::stream::once(async move { Err(status) }).boxed(),
            Ok((messages, filter)) => replay_deliveries(messages, from, until, filter).boxed(),
        })
    }

    async fn replay_consumer(
        &self,
        from: u64,
        filter: &ChannelFilter,
    ) -> Result<push::Ordered, tonic::Status> {
        let unavailable = |error: &dyn std::fmt::Display| {
            tonic::Status::unavailable(format!("cannot replay from JetStream: {error}; retry"))
        };
        let stream = self
            .jetstream
            .get_stream(&self.stream)
            .await
            .map_err(|e| unavailable(&e))?;
        let filter_subject = match filter.channels() {
            Some([only]) => subject(Channel(*only)),
            _ => String::new(),
        };
        let consumer = stream
            .create_consumer(push::OrderedConfig {
                deliver_subject: self.jetstream.client().new_inbox(),
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: from,
                },
                filter_subject,
                ..Default::default()
            })
            .await
            .map_err(|e| unavailable(&e))?;
        consumer.messages().await.map_err(|e| unavailable(&e))
    }
}

/// Turns replayed messages into deliveries, stopping at `until` or the stream's end.
fn replay_deliveries(
    messages: push::Ordered,
    from: u64,
    until: u64,
    filter: ChannelFilter,
) -> impl Stream<Item = Result<Delivery, tonic::Status>> + Send + 'static {
    let state = (messages, from, false);
    futures::stream::unfold(state, move |(mut messages, mut expected, done)| {
        let filter = filter.clone();
        async move {
            if done || expected >= until {
                return None;
            }
            let mut delivery = Delivery::default();
            let mut finished = false;
            let mut next = messages.next().await;
            while let Some(result) = next.take() {
                let message = match result {
                    Ok(message) => message,
                    Err(error) => {
                        let status = tonic::Status::unavailable(format!("JetStream replay failed: {error}; resubscribe from the last sequence you saw"));
                        return Some((Err(status), (messages, expected, true)));
                    }
                };
                let Ok(info) = message.info() else { continue };
                let (sequence, pending) = (info.stream_sequence, info.pending);
                if sequence >= until {
                    finished = true;
                    break;
                }
                let Some(channel) = channel_of(message.subject.as_str()) else {
                    continue;
                };
                if sequence > expected && filter.channels().is_none() {
                    delivery.missed += sequence - expected;
                }
                expected = sequence + 1;
                if filter.matches(channel) {
                    let mut packets = EncodedPacketsBuilder::with_capacity(
                        1,
                        message.payload.len() + 16,
                        sequence,
                    );
                    packets.push_fields(channel, &message.payload, 0);
                    let batch = packets.finish().stamp(sequence);
                    delivery.push(batch.records(0..1), 1);
                }
                if pending == 0 || expected >= until {
                    finished = true;
                    break;
                }
                if delivery.packets() < FEED_BATCH {
                    next = messages.next().now_or_never().flatten();
                }
            }
            if finished {
                expected = until;
            }
            Some((Ok(delivery), (messages, expected, finished)))
        }
    })
}

mod publish;
pub use publish::ClusterPublisher;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_round_trip_channels() {
        assert_eq!(subject(Channel(42)), "packetingest.42");
        assert_eq!(channel_of("packetingest.42"), Some(Channel(42)));
        assert_eq!(channel_of("packetingest.x"), None);
        assert_eq!(channel_of("other.1"), None);
    }
}
