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

use bytes::BytesMut;
use tokio::{
    io::{AsyncRead, AsyncReadExt},
    time::Instant,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument;

use crate::{
    budget::{Charge, IngestBudget, PartialFrame},
    connections::{Acceptor, ConnectionSlots},
    frame::{FrameDecoder, FrameLimits},
    metrics::Metrics,
    producer::{Producer, ProducerContext},
    verify::{unix_nanos_now, FrameBatch},
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
        // Take the slot before accepting, so a full house is real backpressure.
        let Some(slot) = slots
            .admit(&stop_accepting, || {
                metrics.protocol_errors.add("evicted_idle", 1, 0)
            })
            .await
        else {
            return;
        };
        let (stream, peer) = tokio::select! {
            accepted = acceptor.accept() => accepted,
            _ = stop_accepting.cancelled() => return,
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
    async fn run<S: AsyncRead + Unpin>(self, mut stream: S) {
        let metrics = Arc::clone(self.context.metrics());
        metrics.ingest_connections.inc();
        metrics.ingest_connections_total.inc();
        tracing::debug!("producer connected");
        let source: Arc<str> = Arc::from(format!("tcp/{}", self.peer));
        let mut producer = Producer::new(&self.context.producer, source);
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
                    if let Err(error) = producer.publish(verified).await {
                        tracing::error!(%error, "closing ingest connection: packets cannot be stored");
                        ended = Some(Ended::Outlet);
                    }
                }
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

/// A connection's read buffer and frame decoder, with its budget charge.
struct FrameReader {
    buf: BytesMut,
    decoder: FrameDecoder,
    budget: IngestBudget,
    /// Budget held for the bytes in `buf` (and, during a read, its spare room).
    charge: Charge,
    /// When the frame now in `buf` started arriving.
    frame_started: Option<Instant>,
    /// That frame, registered with the budget (which may evict it if stale).
    partial: Option<PartialFrame>,
    close: CancellationToken,
    /// The last read filled all the room it had: the producer is streaming.
    streaming: bool,
}

impl FrameReader {
    fn new(limits: FrameLimits, budget: IngestBudget, close: CancellationToken) -> Self {
        FrameReader {
            buf: BytesMut::new(),
            decoder: FrameDecoder::new(limits),
            charge: budget.charge(),
            budget,
            frame_started: None,
            partial: None,
            close,
            streaming: false,
        }
    }

    fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// When this connection is closed if nothing more arrives.
    fn deadline(&self, last_read: Instant, context: &IngestContext) -> Instant {
        let idle = last_read + context.idle_timeout;
        match self.frame_started {
            Some(started) => idle.min(started + context.frame_timeout),
            None => idle,
        }
    }

    /// Room to ask of the socket for the next read.
    fn next_read_size(&self) -> usize {
        let pending = self
            .decoder
            .pending_frame_len()
            .map_or(0, |len| len.saturating_sub(self.buf.len()));
        let base = if self.streaming {
            READ_CHUNK
        } else {
            SMALL_READ
        };
        // A frame in progress grows the buffer by at most a chunk per read.
        base.max(pending.min(READ_CHUNK))
    }

    /// One read, charged to the budget first (waiting for it if need be).
    /// The charge covers the whole buffer this connection holds (its
    /// capacity), not just the bytes in it: that is what the process pays.
    async fn read<S: AsyncRead + Unpin>(
        &mut self,
        stream: &mut S,
        activity: &Arc<crate::connections::Activity>,
    ) -> std::io::Result<usize> {
        let room = self.next_read_size();
        self.compact_if_idle();
        let grown =
            (self.buf.capacity() - self.buf.len() < room).then(|| self.grown_capacity(room));
        let holding = grown.unwrap_or(self.buf.capacity());
        let needed = holding.saturating_sub(self.charge.bytes());
        if !self.charge.try_grow(needed) {
            let _waiting = activity.busy();
            self.charge.grow(needed, self.partial.as_ref()).await;
        }
        if let Some(capacity) = grown {
            // A new buffer of exactly this size (BytesMut::reserve may double
            // it); the bytes of an unfinished frame move along.
            let mut buf = BytesMut::with_capacity(capacity);
            buf.extend_from_slice(&self.buf);
            self.buf = buf;
        }
        let spare = self.buf.capacity() - self.buf.len();
        let read = stream.read_buf(&mut self.buf).await;
        let got = *read.as_ref().unwrap_or(&0);
        self.streaming = got >= spare.min(room);
        read
    }

    /// The capacity to grow to for `room` more bytes: a frame in progress
    /// grows geometrically up to its own length (never past it, never
    /// reserved before its bytes come); anything else gets `room`.
    fn grown_capacity(&self, room: usize) -> usize {
        let len = self.buf.len();
        match self.decoder.pending_frame_len() {
            Some(frame) if frame > len => (len + room).max((2 * len).min(frame)),
            _ => len + room,
        }
    }

    /// A connection that stopped streaming with a small leftover keeps it in
    /// a small buffer, so the large one it came from can be freed.
    fn compact_if_idle(&mut self) {
        if !self.streaming && self.buf.capacity() > 2 * SMALL_READ && self.buf.len() < SMALL_READ {
            self.buf = BytesMut::from(&self.buf[..]);
            self.charge.shrink_to(self.buf.capacity());
        }
    }

    /// Splits every complete frame off the buffer and submits them in
    /// batches, each carrying its share of the charge. Returns the framing
    /// error's reason if the stream turned out to be invalid; the frames
    /// before it are still submitted.
    fn decode_into(&mut self, producer: &mut Producer) -> Result<(), &'static str> {
        let received_unix_nanos = unix_nanos_now();
        let mut batch = FrameBatch {
            received_unix_nanos,
            ..FrameBatch::default()
        };
        let mut batch_bytes = 0;
        let mut completed_any = false;
        let outcome = loop {
            match self.decoder.decode(&mut self.buf) {
                Ok(Some(frame)) => {
                    completed_any = true;
                    batch_bytes += frame.wire_len();
                    batch.frames.push(frame);
                    if batch_bytes >= BATCH_BYTES {
                        batch.charge = Some(self.charge.split_off(batch_bytes));
                        producer.submit(std::mem::replace(
                            &mut batch,
                            FrameBatch {
                                received_unix_nanos,
                                ..FrameBatch::default()
                            },
                        ));
                        batch_bytes = 0;
                    }
                }
                Ok(None) => break Ok(()),
                Err(error) => {
                    tracing::info!(%error, "closing ingest connection");
                    self.buf.clear();
                    break Err(error.reason());
                }
            }
        };
        if !batch.frames.is_empty() {
            batch.charge = Some(self.charge.split_off(batch_bytes));
            producer.submit(batch);
        }
        // What stays charged: the buffer the connection keeps.
        self.charge.shrink_to(self.buf.capacity());
        let started = match (self.buf.is_empty(), completed_any, self.frame_started) {
            (true, _, _) => None,
            (false, true, _) | (false, false, None) => Some(Instant::now()),
            (false, false, started) => started,
        };
        if started != self.frame_started {
            self.partial = started.map(|at| self.budget.hold_partial(at, self.close.clone()));
            self.frame_started = started;
        }
        outcome
    }
}
