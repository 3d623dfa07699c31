//! The TCP ingest port: a listener that admits at most `--max-connections`
//! producers, and one task per connection running read -> frame -> verify -> hub.
//!
//! Each connection reads into a large `BytesMut`, splits complete frames off it
//! (zero-copy), groups them into batches and hands the batches to its
//! `OrderedPipeline`. Results are published in submission order. When the
//! pipeline is full, or the hub makes `publish` wait (block mode), the task
//! stops reading: the kernel's receive window fills and the producer is paced
//! by TCP itself. Framing errors close the connection after the packets before
//! them are delivered.

use std::{net::SocketAddr, sync::Arc, time::SystemTime};

use bytes::BytesMut;
use tokio::{
    io::{AsyncRead, AsyncReadExt},
    net::TcpListener,
    sync::Semaphore,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument;

use crate::{
    cluster::{Destination, Outlet},
    frame::{FrameDecoder, FrameLimits},
    metrics::Metrics,
    verify::{FrameBatch, OrderedPipeline, VerifiedBatch, VerifyPool},
};

/// Bytes asked of the socket per read; big reads amortise syscalls and batch well.
const READ_CHUNK: usize = 256 * 1024;
/// Wire bytes per verification batch: small enough that one connection's
/// batches spread over every pool thread, big enough to amortise dispatch.
const BATCH_BYTES: usize = 256 * 1024;

/// Everything a connection task needs, shared by all of them.
#[derive(Clone)]
pub struct IngestContext {
    pub destination: Destination,
    pub pool: VerifyPool,
    pub metrics: Arc<Metrics>,
    pub limits: FrameLimits,
    /// Verification batches one connection may have in flight.
    pub max_in_flight: usize,
    /// Set when the port speaks TLS.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
}

/// A TLS client that has not finished its handshake by then is dropped.
const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Accepts producers until `stop_accepting` fires. Connections run in `tracker`
/// and stop reading when `stop_reading` fires (the shutdown grace deadline).
pub async fn serve(
    listener: TcpListener,
    max_connections: usize,
    context: IngestContext,
    tracker: TaskTracker,
    stop_accepting: CancellationToken,
    stop_reading: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(max_connections));
    loop {
        // Take the permit before accepting, so a full house is real backpressure:
        // further producers wait in the kernel's accept queue.
        let permit = tokio::select! {
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
            _ = stop_accepting.cancelled() => return,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Per-connection errors (ECONNABORTED) and fd exhaustion are
                    // transient; back off briefly instead of spinning.
                    tracing::warn!(%error, "ingest accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop_accepting.cancelled() => return,
        };
        let _ = stream.set_nodelay(true);
        let context = context.clone();
        let stop_reading = stop_reading.clone();
        let span = tracing::info_span!("ingest", peer = %peer);
        tracker.spawn(
            async move {
                let _permit = permit;
                let Some(tls) = context.tls.clone() else {
                    return handle_connection(stream, peer, &context, stop_reading).await;
                };
                match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, tls.accept(stream)).await {
                    Ok(Ok(stream)) => handle_connection(stream, peer, &context, stop_reading).await,
                    Ok(Err(error)) => {
                        context.metrics.protocol_errors.add("tls_handshake", 1, 0);
                        tracing::info!(%error, "TLS handshake failed");
                    }
                    Err(_) => {
                        context.metrics.protocol_errors.add("tls_handshake", 1, 0);
                        tracing::info!("TLS handshake timed out");
                    }
                }
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
    Deadline,
    /// JetStream would not store the packets (cluster mode).
    Cluster,
}

/// Runs one producer connection to completion.
pub async fn handle_connection<S>(
    mut stream: S,
    peer: SocketAddr,
    context: &IngestContext,
    stop_reading: CancellationToken,
) where
    S: AsyncRead + Unpin,
{
    let metrics = &context.metrics;
    metrics.ingest_connections.inc();
    metrics.ingest_connections_total.inc();
    tracing::debug!("producer connected");
    let source: Arc<str> = Arc::from(format!("tcp/{peer}"));
    let mut pipeline = OrderedPipeline::new(context.pool.clone(), source, context.max_in_flight);
    let mut decoder = FrameDecoder::new(context.limits);
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut ended: Option<Ended> = None;
    let mut outlet = context.destination.outlet();

    loop {
        tokio::select! {
            // Publishing first keeps memory low and order trivially right.
            Some(verified) = pipeline.next(), if !pipeline.is_idle() => {
                // After a cluster failure the rest is dropped: the connection closes.
                if ended != Some(Ended::Cluster) && !publish(context, &mut outlet, verified).await {
                    ended = Some(Ended::Cluster);
                }
            }
            read = stream.read_buf(&mut buf), if ended.is_none() && pipeline.has_room() => {
                match read {
                    Ok(0) => ended = Some(Ended::Eof),
                    Ok(_) => {
                        if let Err(reason) = decode_and_submit(&mut decoder, &mut buf, &mut pipeline) {
                            ended = Some(Ended::Framing(reason));
                        }
                        reserve_for_next_read(&mut buf, &decoder);
                    }
                    Err(error) => {
                        tracing::debug!(%error, "ingest read failed");
                        ended = Some(Ended::ReadError);
                    }
                }
            }
            _ = stop_reading.cancelled(), if ended.is_none() => ended = Some(Ended::Deadline),
            else => break,
        }
    }

    if let Err(error) = outlet.finish().await {
        tracing::warn!(%error, "packets of this connection may not all be stored");
    }
    if let Some(Ended::Framing(reason)) = ended {
        metrics.protocol_errors.add(reason, 1, 0);
    }
    if !buf.is_empty() {
        metrics
            .protocol_errors
            .add("truncated", 1, buf.len() as u64);
        tracing::debug!(
            bytes = buf.len(),
            "connection ended mid-frame; partial frame discarded"
        );
    }
    metrics.ingest_connections.dec();
    tracing::debug!(?ended, "producer disconnected");
}

/// Splits every complete frame off `buf` and submits them in batches.
/// Returns the framing error's reason if the stream turned out to be invalid;
/// the frames before it are still submitted.
fn decode_and_submit(
    decoder: &mut FrameDecoder,
    buf: &mut BytesMut,
    pipeline: &mut OrderedPipeline,
) -> Result<(), &'static str> {
    let received_unix_nanos = unix_nanos_now();
    let mut batch = FrameBatch {
        frames: Vec::new(),
        received_unix_nanos,
    };
    let mut batch_bytes = 0;
    let outcome = loop {
        match decoder.decode(buf) {
            Ok(Some(frame)) => {
                batch_bytes += frame.wire_len();
                batch.frames.push(frame);
                if batch_bytes >= BATCH_BYTES {
                    pipeline.submit(std::mem::replace(
                        &mut batch,
                        FrameBatch {
                            frames: Vec::new(),
                            received_unix_nanos,
                        },
                    ));
                    batch_bytes = 0;
                }
            }
            Ok(None) => break Ok(()),
            Err(error) => {
                tracing::info!(%error, "closing ingest connection");
                buf.clear();
                break Err(error.reason());
            }
        }
    };
    pipeline.submit(batch);
    outcome
}

/// Makes room for the next read: the whole pending frame if its size is known.
fn reserve_for_next_read(buf: &mut BytesMut, decoder: &FrameDecoder) {
    let spare = buf.capacity() - buf.len();
    let pending_remaining = decoder
        .pending_frame_len()
        .map_or(0, |len| len.saturating_sub(buf.len()));
    if spare < READ_CHUNK / 4 || spare < pending_remaining {
        buf.reserve(pending_remaining.max(READ_CHUNK));
    }
}

/// Publishes a verified batch; false if the connection must stop (cluster failure).
async fn publish(context: &IngestContext, outlet: &mut Outlet, verified: VerifiedBatch) -> bool {
    context.metrics.record_batch(&verified);
    if verified.rejected_packets() > 0 {
        tracing::debug!(
            rejected = verified.rejected_packets(),
            "dropped frames that failed verification"
        );
    }
    match outlet.publish(verified).await {
        Ok(()) => true,
        Err(error) => {
            tracing::error!(%error, "closing ingest connection: packets cannot be stored");
            false
        }
    }
}

pub fn unix_nanos_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos() as i64)
}
