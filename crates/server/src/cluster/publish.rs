//! The producer side of cluster mode. Each connection hands its verified
//! batches, in order, to the replica's one sequencer ([`ClusterPublisher`]);
//! the sequencer stores them in JetStream, one message at a time, several
//! queued batches per message when they wait together (group commit), and
//! reports back through each connection's [`Stored`] watch.
//!
//! Numbering: a message is stamped to start right after the replica's tip
//! (the last message it knows of) and published with
//! `Nats-Expected-Last-Sequence` set to the tip's stream sequence, so
//! JetStream stores it only if nothing came in between. If something did
//! (another replica), JetStream refuses it, the sequencer waits until its
//! consumer has read what came in between, re-stamps and tries again. Every
//! attempt at a message carries the same `Nats-Msg-Id`: if an earlier attempt
//! was stored after all (a lost ack), JetStream answers "duplicate" with
//! where it is, and the sequencer reads that message's numbering back. One
//! message in flight per replica keeps every connection's batches in order,
//! retries included.
//!
//! Keepalive (`--cluster-max-age` only): when the sequencer is idle and the
//! tip has not moved for [`super::keepalive_interval`], it stores an empty
//! tip marker numbered like a batch (`Pi-First` = the next packet sequence,
//! `Pi-Count` 0, `Nats-Expected-Last-Sequence` = the tip), so the stream's
//! last message is never older than max-age. Its `Nats-Msg-Id` names the tip
//! it follows: replicas that do it at once publish the same id, JetStream
//! keeps one and answers the others "duplicate"; a "wrong last sequence"
//! means someone stored after the tip, and the sequencer only re-reads it.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use tokio::time::Instant;

use async_nats::{
    header::{NATS_EXPECTED_LAST_SEQUENCE, NATS_MESSAGE_ID},
    jetstream::{self, context::PublishErrorKind},
};
use tokio::sync::{mpsc, watch};

use super::{message, read_tip, ClusterError, Shared, Tip, BATCH_SUBJECT, PUBLISH_ATTEMPTS};
use crate::wire::{EncodedPackets, SequencedBatch};

/// Batches one connection may have handed over and not yet seen stored.
const MAX_IN_FLIGHT: u64 = 16;
/// How long a refused message waits for the consumer to read what came in
/// between before the tip is read from JetStream directly.
const CONFLICT_WAIT: Duration = Duration::from_millis(500);

/// What JetStream has stored of one connection's batches.
#[derive(Clone, Debug, Default)]
pub struct Stored {
    /// Batches of the connection stored, in order.
    pub batches: u64,
    /// Sequence of the connection's last stored packet.
    pub last_sequence: Option<u64>,
    /// Set when a batch could not be stored: nothing after it is.
    pub failed: Option<Arc<str>>,
}

/// A piece of a connection's batch on its way to the sequencer.
pub(super) struct Queued {
    packets: EncodedPackets,
    connection: Arc<watch::Sender<Stored>>,
    /// Set on the last piece of a batch: the batch's number on its connection.
    batch: Option<u64>,
}

/// Where a published batch stands, for acknowledgements.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Placed {
    /// The last sequence stored for this connection so far.
    pub last_sequence: Option<u64>,
    /// The batch is stored once the connection's `Stored::batches` reaches this.
    pub durable_at: Option<u64>,
}

/// Per-connection publishing: batches in order to the sequencer, a bounded
/// number outstanding.
pub struct ClusterPublisher {
    queue: mpsc::Sender<Queued>,
    stored: Arc<watch::Sender<Stored>>,
    progress: watch::Receiver<Stored>,
    sent: u64,
    max_piece: usize,
}

impl ClusterPublisher {
    pub(super) fn new(queue: mpsc::Sender<Queued>, max_piece: usize) -> Self {
        let stored = Arc::new(watch::Sender::new(Stored::default()));
        let progress = stored.subscribe();
        ClusterPublisher {
            queue,
            stored,
            progress,
            sent: 0,
            max_piece,
        }
    }

    /// What JetStream has stored of this connection, as it changes.
    pub fn progress(&self) -> watch::Receiver<Stored> {
        self.stored.subscribe()
    }

    fn failed(stored: &Stored) -> Result<(), ClusterError> {
        match &stored.failed {
            Some(reason) => Err(ClusterError::Publish(reason.to_string())),
            None => Ok(()),
        }
    }

    /// Hands a batch to the sequencer; waits while `MAX_IN_FLIGHT` batches
    /// of this connection are not stored yet (that is the backpressure).
    pub async fn publish(&mut self, packets: EncodedPackets) -> Result<Placed, ClusterError> {
        if packets.is_empty() {
            let last_sequence = self.progress.borrow().last_sequence;
            return Ok(Placed {
                last_sequence,
                durable_at: None,
            });
        }
        let sent = self.sent;
        let stored = self
            .progress
            .wait_for(|stored| stored.failed.is_some() || sent - stored.batches < MAX_IN_FLIGHT)
            .await
            .map_err(|_| ClusterError::Publish("the sequencer stopped".into()))?
            .clone();
        Self::failed(&stored)?;
        self.sent += 1;
        let pieces = packets.split(self.max_piece);
        let count = pieces.len();
        for (index, piece) in pieces.into_iter().enumerate() {
            let queued = Queued {
                packets: piece,
                connection: Arc::clone(&self.stored),
                batch: (index + 1 == count).then_some(self.sent),
            };
            self.queue
                .send(queued)
                .await
                .map_err(|_| ClusterError::Publish("the sequencer stopped".into()))?;
        }
        Ok(Placed {
            last_sequence: stored.last_sequence,
            durable_at: Some(self.sent),
        })
    }

    /// Waits until every batch handed over is stored; the last sequence stored.
    pub async fn finish(&mut self) -> Result<Option<u64>, ClusterError> {
        let sent = self.sent;
        let stored = self
            .progress
            .wait_for(|stored| stored.failed.is_some() || stored.batches >= sent)
            .await
            .map_err(|_| ClusterError::Publish("the sequencer stopped".into()))?
            .clone();
        Self::failed(&stored)?;
        Ok(stored.last_sequence)
    }
}

/// When this replica stores an empty tip marker to keep the tip from expiring.
pub(super) struct Keepalive {
    interval: Duration,
    /// The replica's tip, watched for moves (anyone's message moves it).
    tips: watch::Receiver<Tip>,
    /// When the tip last moved, or the last keepalive was tried.
    since: Instant,
}

impl Keepalive {
    /// `age`: how long ago the current tip was stored.
    pub(super) fn new(interval: Duration, tips: watch::Receiver<Tip>, age: Duration) -> Self {
        let now = Instant::now();
        Keepalive {
            interval,
            tips,
            since: now.checked_sub(age.min(interval)).unwrap_or(now),
        }
    }

    /// Resolves once the tip has stood still for `interval`. Cancel-safe:
    /// what it learns is kept in `self`.
    async fn idle(&mut self) {
        loop {
            let deadline = self.since + self.interval;
            match tokio::time::timeout_at(deadline, self.tips.changed()).await {
                Err(_elapsed) => return,
                Ok(Ok(())) => self.since = Instant::now(),
                // The tip's sender outlives the sequencer; if not, nothing moves.
                Ok(Err(_)) => std::future::pending().await,
            }
        }
    }
}

/// Until the keepalive is due; never without one.
async fn keepalive_due(keepalive: Option<&mut Keepalive>) {
    match keepalive {
        Some(keepalive) => keepalive.idle().await,
        None => std::future::pending().await,
    }
}

/// How one attempt at storing a message ended.
enum Attempt {
    /// Stored (now, or by an earlier attempt) with packets from this sequence on.
    Stored {
        stream_sequence: u64,
        first: u64,
    },
    /// Something was stored after the tip this message was numbered against.
    Conflict {
        stale: u64,
    },
    Failed(String),
}

/// The replica's one writer to JetStream.
pub(super) struct Sequencer {
    pub(super) jetstream: jetstream::Context,
    pub(super) stream: jetstream::stream::Stream,
    pub(super) shared: Arc<Shared>,
    pub(super) queue: mpsc::Receiver<Queued>,
    /// Distinguishes this process's message ids from other replicas' and restarts'.
    pub(super) instance: u64,
    pub(super) max_body: usize,
    pub(super) max_lag: u64,
    /// Messages started so far (the message id's counter).
    pub(super) messages: u64,
    /// Set under `--cluster-max-age`.
    pub(super) keepalive: Option<Keepalive>,
}

impl Sequencer {
    /// Stores queued batches until every publisher and the cluster are gone.
    pub(super) async fn run(mut self) {
        let mut carried: Option<Queued> = None;
        loop {
            let first = match carried.take() {
                Some(queued) => queued,
                None => {
                    let queue = &mut self.queue;
                    tokio::select! {
                        queued = queue.recv() => match queued {
                            Some(queued) => queued,
                            None => return,
                        },
                        () = keepalive_due(self.keepalive.as_mut()) => {
                            self.keep_alive().await;
                            continue;
                        }
                    }
                }
            };
            // Whatever else is already waiting rides in the same message.
            let mut size = first.packets.byte_size();
            let mut items = vec![first];
            while let Ok(next) = self.queue.try_recv() {
                if size + next.packets.byte_size() > self.max_body {
                    carried = Some(next);
                    break;
                }
                size += next.packets.byte_size();
                items.push(next);
            }
            // Batches of a connection that already failed are not stored.
            items.retain(|item| item.connection.borrow().failed.is_none());
            if !items.is_empty() {
                self.store(items).await;
            }
        }
    }

    /// Waits while this replica's consumer is more than `max_lag` packets
    /// behind what it knows is stored (its subscribers hold it back).
    async fn paced(&self) {
        let mut fed = self.shared.fed.subscribe();
        loop {
            let next = self.shared.tip.borrow().next_packet;
            if next.saturating_sub(*fed.borrow_and_update()) <= self.max_lag {
                return;
            }
            // The tip moves only forward, and only while this waits through
            // the consumer (which also moves `fed`), so `fed` is the signal;
            // the timeout re-reads the tip after a restart of the consumer.
            let _ = tokio::time::timeout(Duration::from_millis(100), fed.changed()).await;
        }
    }

    /// Stores one message holding `items`, retrying until JetStream has it or
    /// `PUBLISH_ATTEMPTS` failures; tells each item's connection.
    async fn store(&mut self, items: Vec<Queued>) {
        self.messages += 1;
        let message_id = format!("{:x}-{}", self.instance, self.messages);
        let mut parts: Vec<EncodedPackets> = Vec::with_capacity(items.len());
        let mut owners = Vec::with_capacity(items.len());
        for item in items {
            owners.push((item.connection, item.batch, item.packets.len() as u64));
            parts.push(item.packets);
        }
        let mut failures = 0;
        let mut last_error = String::new();
        loop {
            self.paced().await;
            let tip = *self.shared.tip.borrow();
            let mut first = tip.next_packet;
            let stamped: Vec<SequencedBatch> = parts
                .into_iter()
                .map(|part| {
                    let at = first;
                    first += part.len() as u64;
                    part.stamp(at)
                })
                .collect();
            let outcome = self.attempt(&stamped, tip, &message_id).await;
            parts = stamped
                .into_iter()
                .map(EncodedPackets::from_sequenced)
                .collect();
            let count: u64 = parts.iter().map(|part| part.len() as u64).sum();
            match outcome {
                Attempt::Stored {
                    stream_sequence,
                    first,
                } => {
                    self.shared.advance(Tip {
                        stream_sequence,
                        next_packet: first + count,
                    });
                    let mut next = first;
                    for (connection, batch, packets) in &owners {
                        next += packets;
                        // A batch's last piece reports it: until then the
                        // connection's stored prefix has not moved.
                        if let Some(batch) = batch {
                            connection.send_modify(|stored| {
                                stored.last_sequence = Some(next - 1);
                                stored.batches = *batch;
                            });
                        }
                    }
                    return;
                }
                Attempt::Conflict { stale } => {
                    // Not a failure: another replica got there first. The
                    // consumer reads what it stored; then number after it.
                    let mut tip = self.shared.tip.subscribe();
                    let moved = tokio::time::timeout(
                        CONFLICT_WAIT,
                        tip.wait_for(|tip| tip.stream_sequence > stale),
                    )
                    .await
                    .is_ok_and(|seen| seen.is_ok());
                    if !moved {
                        let known = *self.shared.tip.borrow();
                        match read_tip(&self.stream, known).await {
                            Ok(tip) => self.shared.reset(tip),
                            Err(error) => {
                                failures += self.failed(&error, failures).await;
                                last_error = error;
                            }
                        }
                    }
                }
                Attempt::Failed(error) => {
                    failures += self.failed(&error, failures).await;
                    last_error = error;
                }
            }
            if failures >= PUBLISH_ATTEMPTS {
                let reason: Arc<str> = Arc::from(format!(
                    "message {message_id}, {PUBLISH_ATTEMPTS} attempts: {last_error}"
                ));
                tracing::error!(%reason, "JetStream did not store a batch; its connections stop");
                for (connection, _, _) in &owners {
                    connection.send_modify(|stored| {
                        stored.failed.get_or_insert_with(|| Arc::clone(&reason));
                    });
                }
                return;
            }
        }
    }

    /// Stores an empty tip marker after the tip this replica knows, so that
    /// max-age does not remove the stream's last message. Never retried on a
    /// conflict: that means the stream moved on, which is what was wanted.
    async fn keep_alive(&mut self) {
        let tip = *self.shared.tip.borrow();
        let mut headers = message::marker_headers(tip.next_packet);
        // Named after the tip it follows: replicas doing this at once send
        // the same id and JetStream stores one.
        let id = format!(
            "packet-ingest-tip-{}-{}",
            tip.stream_sequence, tip.next_packet
        );
        headers.insert(NATS_MESSAGE_ID, id.as_str());
        headers.insert(
            NATS_EXPECTED_LAST_SEQUENCE,
            tip.stream_sequence.to_string().as_str(),
        );
        let ack = match self
            .jetstream
            .publish_with_headers(BATCH_SUBJECT, headers, Bytes::new())
            .await
        {
            Ok(ack) => ack.await,
            Err(error) => Err(error),
        };
        let mut retry_sooner = false;
        match ack {
            // Stored now, or by another replica under the same id: either
            // way the message after the tip is this empty one.
            Ok(ack) => {
                tracing::debug!(
                    stream_sequence = ack.sequence,
                    next = tip.next_packet,
                    duplicate = ack.duplicate,
                    "stored an empty tip message: the stream's numbering outlives --cluster-max-age"
                );
                self.shared.advance(Tip {
                    stream_sequence: ack.sequence,
                    next_packet: tip.next_packet,
                });
            }
            Err(error) if error.kind() == PublishErrorKind::WrongLastSequence => {
                match read_tip(&self.stream, tip).await {
                    Ok(now) => self.shared.reset(now),
                    Err(error) => {
                        tracing::warn!(%error, "cannot read the stream's tip after a keepalive conflict");
                        retry_sooner = true;
                    }
                }
            }
            Err(error) => {
                tracing::warn!(%error, next = tip.next_packet, "could not store an empty tip message; the stream's last message may expire under --cluster-max-age");
                retry_sooner = true;
            }
        }
        if let Some(keepalive) = &mut self.keepalive {
            let now = Instant::now();
            // After a failure, try again in half an interval: two thirds of
            // max-age leave room for several attempts before the tip expires.
            let back = match retry_sooner {
                true => keepalive.interval / 2,
                false => Duration::ZERO,
            };
            keepalive.since = now.checked_sub(back).unwrap_or(now);
        }
    }

    /// Counts a failed attempt and backs off before the next one.
    async fn failed(&self, error: &str, failures: u32) -> u32 {
        tracing::debug!(%error, failures, "JetStream did not store a batch; retrying with the same id");
        if failures + 1 < PUBLISH_ATTEMPTS {
            tokio::time::sleep(Duration::from_millis(100 << (failures + 1))).await;
        }
        1
    }

    /// One publish of the message, numbered against `tip`.
    async fn attempt(&self, stamped: &[SequencedBatch], tip: Tip, message_id: &str) -> Attempt {
        let joined;
        let batch = match stamped {
            [only] => only,
            several => match SequencedBatch::concat(several) {
                Some(batch) => {
                    joined = batch;
                    &joined
                }
                None => {
                    return Attempt::Failed("batches of one message are not consecutive".into())
                }
            },
        };
        let mut headers = message::headers(batch);
        headers.insert(NATS_MESSAGE_ID, message_id);
        headers.insert(
            NATS_EXPECTED_LAST_SEQUENCE,
            tip.stream_sequence.to_string().as_str(),
        );
        let ack = match self
            .jetstream
            .publish_with_headers(BATCH_SUBJECT, headers, batch.body().clone())
            .await
        {
            Ok(ack) => ack.await,
            Err(error) => return Attempt::Failed(error.to_string()),
        };
        match ack {
            Ok(ack) if !ack.duplicate => Attempt::Stored {
                stream_sequence: ack.sequence,
                first: batch.first_sequence,
            },
            // An earlier attempt was stored: its numbering is in its headers.
            Ok(ack) => match self.stream.get_raw_message(ack.sequence).await {
                Ok(stored) => match message::placement(Some(&stored.headers)) {
                    Ok(place) => Attempt::Stored {
                        stream_sequence: ack.sequence,
                        first: place.first,
                    },
                    Err(error) => Attempt::Failed(error.to_string()),
                },
                Err(error) => Attempt::Failed(error.to_string()),
            },
            Err(error) if error.kind() == PublishErrorKind::WrongLastSequence => {
                Attempt::Conflict {
                    stale: tip.stream_sequence,
                }
            }
            Err(error) => Attempt::Failed(error.to_string()),
        }
    }
}
