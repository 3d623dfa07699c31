//! The one producer path, shared by TCP connections and Publish streams:
//! frames in arrival order in, verified on the pool (in order), accepted
//! packets published to the outlet (the hub, or the cluster stream), the
//! ingest budget returned once they are published.
//!
//! A source drives it with two `select!` arms: submit while `has_room`, and
//! `next_verified` (then `publish` in the arm's handler) while not idle.
//! Publishing first keeps memory low; a full pipeline, or a publish that
//! waits in its handler (block mode, JetStream acks), stops the source being
//! read.

use std::sync::Arc;
use tracing::Instrument;

use packet_ingest_protocol::digest::Rejection;

use crate::{
    budget::IngestBudget,
    metrics::Metrics,
    outlet::{Destination, Durable, Outlet, OutletError},
    verify::{FrameBatch, OrderedPipeline, VerifiedBatch, VerifyPool},
};

/// What every producer shares.
#[derive(Clone)]
pub struct ProducerContext {
    pub pool: VerifyPool,
    pub destination: Destination,
    pub metrics: Arc<Metrics>,
    pub budget: IngestBudget,
    /// Verification batches one producer may have in flight.
    pub max_in_flight: usize,
}

/// Counts for one producer, as Publish reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProducerTotals {
    pub accepted: u64,
    pub rejected: u64,
    /// Sequence of the last accepted packet, once published.
    pub last_sequence: Option<u64>,
}

/// What publishing one verified batch did: what an acknowledgement needs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Published {
    /// Frames of the batch, accepted or rejected.
    pub frames: u64,
    pub rejected: u64,
    /// The last sequence this producer was given so far.
    pub last_sequence: Option<u64>,
    /// The batch's packets are durable once the producer's `Durable` reaches
    /// this (`None`: nothing accepted).
    pub durable_at: Option<u64>,
    /// The outlet had failed: the batch's packets were not stored.
    pub dropped: bool,
}

/// One source's verify-then-publish stage.
pub struct Producer {
    pipeline: OrderedPipeline,
    outlet: Outlet,
    metrics: Arc<Metrics>,
    totals: ProducerTotals,
    /// After the outlet fails nothing more is published.
    failed: bool,
}

impl Producer {
    pub fn new(context: &ProducerContext, source: Arc<str>) -> Self {
        Producer {
            pipeline: OrderedPipeline::new(context.pool.clone(), source, context.max_in_flight),
            outlet: context.destination.outlet(),
            metrics: Arc::clone(&context.metrics),
            totals: ProducerTotals::default(),
            failed: false,
        }
    }

    /// What acknowledgements of this producer wait on.
    pub fn durable(&self) -> Durable {
        self.outlet.durable()
    }

    pub fn source(&self) -> &Arc<str> {
        self.pipeline.source()
    }

    /// True while another batch may be submitted.
    pub fn has_room(&self) -> bool {
        !self.failed && self.pipeline.has_room()
    }

    /// True when nothing submitted is waiting to be published.
    pub fn is_idle(&self) -> bool {
        self.pipeline.is_idle()
    }

    /// Sends a batch to the pool; its frames take the next source sequences.
    pub fn submit(&mut self, mut batch: FrameBatch) {
        // A trace span only (debug level: off unless --otlp-endpoint).
        batch.span = Some(tracing::debug_span!(
            "verify_batch",
            frames = batch.frames.len(),
            bytes = batch.wire_bytes(),
            accepted = tracing::field::Empty,
            rejected = tracing::field::Empty,
        ));
        self.pipeline.submit(batch);
    }

    /// Counts a frame that never reached verification (keeps the index gap visible).
    pub fn skip_source_sequence(&mut self) {
        self.pipeline.skip_source_sequence();
    }

    /// The oldest submitted batch, once verified. Cancel-safe, so it can be a
    /// `select!` branch; publish what it returns in the branch's handler.
    pub async fn next_verified(&mut self) -> Option<VerifiedBatch> {
        self.pipeline.next().await
    }

    /// Publishes a verified batch's accepted packets; may wait (that is the
    /// backpressure). An error means the outlet cannot store packets: later
    /// batches are dropped.
    pub async fn publish(&mut self, mut verified: VerifiedBatch) -> Result<Published, OutletError> {
        record(&self.metrics, &verified);
        if let Some(verify_span) = verified.span.take() {
            verify_span.record("accepted", verified.accepted.len());
            verify_span.record("rejected", verified.rejected_packets());
        }
        let span = tracing::debug_span!(
            "publish",
            packets = verified.accepted.len(),
            first_sequence = tracing::field::Empty,
            last_sequence = tracing::field::Empty,
        );
        let mut published = Published {
            frames: verified.frames,
            rejected: verified.rejected_packets(),
            last_sequence: self.totals.last_sequence,
            durable_at: None,
            dropped: false,
        };
        self.totals.rejected += verified.rejected_packets();
        if verified.rejected_packets() > 0 {
            tracing::debug!(
                rejected = verified.rejected_packets(),
                "dropped frames that failed verification"
            );
        }
        if self.failed {
            published.dropped = true;
            return Ok(published);
        }
        let accepted = verified.accepted.len() as u64;
        let received_unix_nanos = verified.received_unix_nanos;
        // Returned once the packets are the hub's (or JetStream's) to account for.
        let _charge = verified.charge.take();
        match self
            .outlet
            .publish(verified.accepted)
            .instrument(span.clone())
            .await
        {
            Ok(placed) => {
                self.metrics
                    .batch_age
                    .sequenced
                    .observe(crate::metrics::age_seconds(received_unix_nanos));
                // In cluster mode the sequences may not be known yet (placed
                // later by the sequencer): record only a range that fits.
                if let Some(last) = placed
                    .last_sequence
                    .filter(|last| accepted > 0 && last.saturating_add(1) >= accepted)
                {
                    span.record("first_sequence", last + 1 - accepted);
                    span.record("last_sequence", last);
                }
                self.totals.accepted += accepted;
                if placed.last_sequence.is_some() {
                    self.totals.last_sequence = placed.last_sequence;
                }
                published.last_sequence = self.totals.last_sequence;
                published.durable_at = placed.durable_at;
                Ok(published)
            }
            Err(error) => {
                self.failed = true;
                Err(error)
            }
        }
    }

    /// Publishes everything still in flight and waits until it is stored.
    pub async fn finish(&mut self) -> Result<ProducerTotals, OutletError> {
        let mut outcome = Ok(());
        while let Some(verified) = self.next_verified().await {
            if let Err(error) = self.publish(verified).await {
                outcome = outcome.and(Err(error));
            }
        }
        outcome?;
        if let Some(last) = self.outlet.finish().await? {
            self.totals.last_sequence = Some(last);
        }
        Ok(self.totals)
    }

    pub fn totals(&self) -> ProducerTotals {
        self.totals
    }
}

/// Records the outcome of one verified batch.
fn record(metrics: &Metrics, batch: &VerifiedBatch) {
    let rejected_bytes: u64 = batch.rejected.iter().map(|(_, bytes)| bytes).sum();
    metrics.packets_received.inc_by(batch.frames);
    metrics
        .bytes_received
        .inc_by(batch.accepted_bytes + rejected_bytes);
    metrics.packets_accepted.inc_by(batch.accepted.len() as u64);
    metrics.bytes_accepted.inc_by(batch.accepted_bytes);
    for (rejection, (packets, bytes)) in Rejection::ALL.iter().zip(&metrics.rejection_handles) {
        let (count, size) = batch.rejected_for(*rejection);
        if count > 0 {
            packets.inc_by(count);
            bytes.inc_by(size);
        }
    }
    metrics.verify_seconds.observe(batch.verify_seconds);
    let ages = &metrics.batch_age;
    ages.verify_start.observe(batch.queued_seconds);
    ages.verified
        .observe(batch.queued_seconds + batch.verify_seconds);
    ages.publishing
        .observe(crate::metrics::age_seconds(batch.received_unix_nanos));
}
