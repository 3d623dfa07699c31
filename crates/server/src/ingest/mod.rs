//! The TCP ingest port: a listener that admits at most `--max-connections`
//! producers, and one task per connection running read -> frame -> producer.
//!
//! Each connection reads into a `BytesMut`, splits complete frames off it
//! (zero-copy), groups them into batches and hands the batches to its
//! [`Producer`] (verify in order, then publish). Reads are sized by what is
//! coming: small while the producer trickles, 256 KiB while it streams, and a
//! frame in progress grows the buffer only as its bytes arrive. Every byte
//! held (partial frame or batch not yet published) is charged to the shared
//! ingest budget first; without budget, or with the pipeline full, or while the
//! hub makes publishing wait, the task stops reading and TCP paces the
//! producer. A connection that sends nothing for `--ingest-idle-timeout`, or
//! starts a frame it does not finish within `--frame-timeout`, is closed
//! (`protocol_errors{idle|frame_timeout}`); framing errors close it after the
//! packets before them are delivered.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncRead, AsyncWrite},
    time::Instant,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument;

mod acks;
mod reader;

use acks::Acks;
use reader::FrameReader;

use crate::{
    connections::{Acceptor, ConnectionSlots},
    frame::FrameLimits,
    metrics::Metrics,
    producer::{Producer, ProducerContext},
};

/// Largest read: big reads amortise syscalls and batch well.
const READ_CHUNK: usize = 256 * 1024;
/// Read size while the producer trickles (the last read did not fill up).
const SMALL_READ: usize = 16 * 1024;
/// Wire bytes per verification batch: small enough that one connection's
/// batches spread over every pool thread, big enough to amortise dispatch.
const BATCH_BYTES: usize = 256 * 1024;
/// A TLS client that has not finished its handshake by then is dropped.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything a connection task needs, shared by all of them.
#[derive(Clone)]
pub struct IngestContext {
    pub producer: ProducerContext,
    pub limits: FrameLimits,
    /// Set when the port speaks TLS.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub idle_timeout: Duration,
    pub frame_timeout: Duration,
}

impl IngestContext {
    fn metrics(&self) -> &Arc<Metrics> {
        &self.producer.metrics
    }
}

/// Accepts producers until `stop_accepting` fires. Connections run in `tracker`
/// and stop reading when `stop_reading` fires (the shutdown grace deadline).
pub async fn serve(
    listener: tokio::net::TcpListener,
    slots: Arc<ConnectionSlots>,
    context: IngestContext,
    tracker: TaskTracker,
    stop_accepting: CancellationToken,
    stop_reading: CancellationToken,
) {
    let mut acceptor = Acceptor::new(listener, "ingest");
    let metrics = Arc::clone(context.metrics());
    loop {
        // Accept, then take a slot: at the cap the newcomer waits for one
        // (the connection idle longest gives way to it), and the ones after
        // it wait in the kernel's accept queue: a full house is backpressure,
        // and nobody is evicted while nobody is waiting.
        let (stream, peer) = tokio::select! {
            accepted = acceptor.accept() => accepted,
            _ = stop_accepting.cancelled() => return,
        };
        let Some(slot) = slots
            .admit(&stop_accepting, || {
                metrics.protocol_errors.add("evicted_idle", 1, 0)
            })
            .await
        else {
            return;
        };
        let _ = stream.set_nodelay(true);
        let context = context.clone();
        let stop_reading = stop_reading.clone();
        let span = tracing::info_span!("ingest", peer = %peer);
        tracker.spawn(
            async move {
                let activity = Arc::clone(slot.activity());
                let connection = Connection {
                    peer,
                    context: &context,
                    activity: &activity,
                    stop_reading,
                };
                let Some(tls) = context.tls.clone() else {
                    return connection.run(stream).await;
                };
                match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, tls.accept(stream)).await {
                    Ok(Ok(stream)) => connection.run(stream).await,
                    Ok(Err(error)) => {
                        context.metrics().protocol_errors.add("tls_handshake", 1, 0);
                        tracing::info!(%error, "TLS handshake failed");
                    }
                    Err(_) => {
                        context.metrics().protocol_errors.add("tls_handshake", 1, 0);
                        tracing::info!("TLS handshake timed out");
                    }
                }
                drop(slot);
            }
            .instrument(span),
        );
    }
}

/// How a connection's read side ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    Eof,
    Framing(&'static str),
    ReadError,
    /// Shutdown reached the end of reading.
    Deadline,
    Idle,
    FrameTimeout,
    /// Closed to make room at the connection cap.
    Evicted,
    /// The outlet would not store the packets (cluster mode).
    Outlet,
}

struct Connection<'a> {
    peer: SocketAddr,
    context: &'a IngestContext,
    activity: &'a Arc<crate::connections::Activity>,
    stop_reading: CancellationToken,
}

impl Connection<'_> {
    /// Runs one producer connection to completion.
    async fn run<S>(self, stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mut stream, write) = tokio::io::split(stream);
        let metrics = Arc::clone(self.context.metrics());
        metrics.ingest_connections.inc();
        metrics.ingest_connections_total.inc();
        tracing::debug!("producer connected");
        let source: Arc<str> = Arc::from(format!("tcp/{}", self.peer));
        let mut producer = Producer::new(&self.context.producer, source);
        let mut acks = Acks::new(write, Some(producer.durable()));
        let mut reader = FrameReader::new(
            self.context.limits,
            self.context.producer.budget.clone(),
            self.activity.closer(),
        );
        let mut ended: Option<Ended> = None;
        let mut last_read = Instant::now();

        loop {
            let deadline = reader.deadline(last_read, self.context);
            // While the server holds this producer back it is not idle.
            let _waiting =
                (!producer.has_room() || !producer.is_idle()).then(|| self.activity.busy());
            tokio::select! {
                biased;
                Some(verified) = producer.next_verified(), if !producer.is_idle() => {
                    match producer.publish(verified).await {
                        Ok(published) => acks.note(&published),
                        Err(error) => {
                            tracing::error!(%error, "closing ingest connection: packets cannot be stored");
                            ended = Some(Ended::Outlet);
                        }
                    }
                }
                _ = acks.durable_moved(), if acks.has_pending() => acks.settle(),
                // Closing: acknowledgements still owed are given up at the deadline.
                _ = self.stop_reading.cancelled(), if ended.is_some() && acks.has_pending() => break,
                _ = self.activity.closed(), if ended.is_none() => ended = Some(Ended::Evicted),
                _ = self.stop_reading.cancelled(), if ended.is_none() => ended = Some(Ended::Deadline),
                _ = tokio::time::sleep_until(deadline), if ended.is_none() => {
                    ended = Some(match reader.frame_started.is_some() {
                        true => Ended::FrameTimeout,
                        false => Ended::Idle,
                    });
                }
                read = reader.read(&mut stream, self.activity), if ended.is_none() && producer.has_room() => {
                    match read {
                        Ok(0) => ended = Some(Ended::Eof),
                        Ok(_) => {
                            last_read = Instant::now();
                            self.activity.touch();
                            if let Err(reason) = reader.decode_into(&mut producer) {
                                ended = Some(Ended::Framing(reason));
                            }
                            if reader.ack_requested {
                                acks.enable();
                            }
                        }
                        Err(error) => {
                            tracing::debug!(%error, "ingest read failed");
                            ended = Some(Ended::ReadError);
                        }
                    }
                }
                else => break,
            }
        }

        if let Err(error) = producer.finish().await {
            tracing::warn!(%error, "packets of this connection may not all be stored");
        }
        acks.finish().await;
        match ended {
            Some(Ended::Framing(reason)) => metrics.protocol_errors.add(reason, 1, 0),
            Some(Ended::Idle) => metrics.protocol_errors.add("idle", 1, 0),
            Some(Ended::FrameTimeout) => metrics.protocol_errors.add("frame_timeout", 1, 0),
            _ => {}
        }
        let partial = reader.buffered();
        if partial > 0 && ended != Some(Ended::FrameTimeout) {
            metrics.protocol_errors.add("truncated", 1, partial as u64);
            tracing::debug!(
                bytes = partial,
                "connection ended mid-frame; partial frame discarded"
            );
        }
        metrics.ingest_connections.dec();
        tracing::debug!(?ended, "producer disconnected");
    }
}
