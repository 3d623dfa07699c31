//! A connection's read side: the buffer, the frame decoder and the budget
//! charge. Reads are sized by what is coming (small while the producer
//! trickles, 256 KiB while it streams), a frame in progress grows the buffer
//! only as its bytes arrive, and every byte held is charged to the ingest
//! budget before it is read.

use std::sync::Arc;

use bytes::BytesMut;
use tokio::{
    io::{AsyncRead, AsyncReadExt},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use super::{IngestContext, BATCH_BYTES, READ_CHUNK, SMALL_READ};
use crate::{
    budget::{Charge, IngestBudget, PartialFrame},
    connections::Activity,
    frame::{FrameDecoder, FrameLimits},
    producer::Producer,
    verify::{unix_nanos_now, FrameBatch},
};

/// A connection's read buffer and frame decoder, with its budget charge.
pub(super) struct FrameReader {
    buf: BytesMut,
    decoder: FrameDecoder,
    budget: IngestBudget,
    /// Budget held for the bytes in `buf` (and, during a read, its spare room).
    charge: Charge,
    /// When the frame now in `buf` started arriving.
    pub(super) frame_started: Option<Instant>,
    /// Some frame so far asked for acknowledgements (flag bit 1).
    pub(super) ack_requested: bool,
    /// That frame, registered with the budget (which may evict it if stale).
    partial: Option<PartialFrame>,
    close: CancellationToken,
    /// The last read filled all the room it had: the producer is streaming.
    streaming: bool,
}

impl FrameReader {
    pub(super) fn new(limits: FrameLimits, budget: IngestBudget, close: CancellationToken) -> Self {
        FrameReader {
            buf: BytesMut::new(),
            decoder: FrameDecoder::new(limits),
            charge: budget.charge(),
            budget,
            frame_started: None,
            ack_requested: false,
            partial: None,
            close,
            streaming: false,
        }
    }

    pub(super) fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// When this connection is closed if nothing more arrives.
    pub(super) fn deadline(&self, last_read: Instant, context: &IngestContext) -> Instant {
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
    pub(super) async fn read<S: AsyncRead + Unpin>(
        &mut self,
        stream: &mut S,
        activity: &Arc<Activity>,
    ) -> std::io::Result<usize> {
        let room = self.next_read_size();
        self.compact_if_idle();
        let grown =
            (self.buf.capacity() - self.buf.len() < room).then(|| self.grown_capacity(room));
        let holding = grown.unwrap_or(self.buf.capacity());
        let needed = holding.saturating_sub(self.charge.bytes());
        // Starting a frame, or finishing a small one: the reserve may serve.
        let small = self
            .decoder
            .pending_frame_len()
            .is_none_or(|len| len <= SMALL_READ);
        if !self.charge.try_grow(needed, small) {
            let _waiting = activity.busy();
            self.charge.grow(needed, small, self.partial.as_ref()).await;
        }
        if let Some(capacity) = grown {
            // A new buffer of exactly this size (BytesMut::reserve may double
            // it); the bytes of an unfinished frame move along.
            let mut buf = BytesMut::with_capacity(capacity);
            buf.extend_from_slice(&self.buf);
            self.buf = buf;
        }
        if let Some(partial) = &self.partial {
            partial.set_bytes(self.charge.bytes());
        }
        let spare = self.buf.capacity() - self.buf.len();
        // Waiting for the client from here: a stall the budget may evict.
        let _reading = self.partial.as_ref().map(PartialFrame::reading);
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
    pub(super) fn decode_into(&mut self, producer: &mut Producer) -> Result<(), &'static str> {
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
                    self.ack_requested |= frame.wants_ack();
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
            self.partial = started.map(|_| self.budget.hold_partial(self.close.clone()));
            self.frame_started = started;
        }
        outcome
    }
}
