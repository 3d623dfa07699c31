//! Cluster mode: replicas share one ordered stream through NATS JetStream.
//!
//! With `--cluster-nats`, verified packets do not go straight into the local
//! hub. Each replica's [`publish`] sequencer stores them in the JetStream
//! stream, one message per batch, the body being the batch's records exactly
//! as subscribers receive them, sequences written in. Numbering is carried by
//! the messages themselves (see [`message`]): each says which packet sequence
//! it starts at and how many it holds, and a message is stored only right
//! after the one its numbering follows (`Nats-Expected-Last-Sequence`), so the
//! packet sequence is stream-wide, dense and the same on every replica.
//! Every replica runs one ordered consumer ([`feed`]) that feeds its local
//! hub with those batches as they are (nothing re-encoded) and keeps the
//! replica's view of the stream's tip, which its sequencer numbers from.
//! `from_sequence` older than the local history is [`replay`]ed from the
//! stream. This file owns the connection, the stream's setup and retention,
//! the shared tip and the stream's state for `StreamInfo`.
//!
//! The numbering lives only in the messages, so the stream must never lose
//! its last one. Under `--cluster-max-age` every replica therefore keeps the
//! anchor alive: when the tip has not moved for a third of max-age (at least
//! a second), its sequencer stores an empty *tip* marker after it (see
//! [`publish`]). If the stream has lost every message anyway (all replicas
//! down for longer than max-age, or a purge), JetStream's state still has
//! the last stream sequence but nothing says which packet sequence came
//! next; numbering from 1 again under the same `stream_id` would hand
//! resuming clients other packets under old sequences, so a replica starting
//! then refuses to guess and exits naming the remedy (delete the stream: a
//! new one gets a new `stream_id`). A running replica that still knows the
//! tip JetStream ends at re-anchors it instead.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, SystemTime},
};

use async_nats::jetstream::{
    self,
    stream::{Config as StreamConfig, RawMessageErrorKind, StorageType},
};
use tokio::sync::{mpsc, watch};

mod feed;
pub mod message;
mod publish;
mod replay;
pub use publish::{ClusterPublisher, Placed, Stored};

pub const SUBJECT_PREFIX: &str = "packetingest";
/// The one subject batches are stored under (a batch mixes channels).
const BATCH_SUBJECT: &str = "packetingest.batch";
/// Attempts to store one message before its batches are given up.
const PUBLISH_ATTEMPTS: u32 = 5;
/// JetStream's window for dropping a republished message with the same id
/// (shortened to max-age when that is shorter: JetStream requires it).
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// Shortest keepalive interval: below it the tip messages would cost more
/// than they are worth, and max-age this short is a test setting anyway.
const KEEPALIVE_FLOOR: Duration = Duration::from_secs(1);
/// Shortest `--cluster-max-age` accepted: the keepalive (at most once a
/// second) must leave time for a retry before the tip expires. JetStream's
/// own minimum is 100 ms.
pub const MIN_MAX_AGE: Duration = Duration::from_secs(2);
/// Batches waiting for the sequencer, all connections together: bounds the
/// memory held between verification and JetStream.
const QUEUE_BATCHES: usize = 64;
/// Room kept in a message for headers and for sequences wider than reserved.
const MESSAGE_HEADROOM: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot connect to NATS at {url}: {message}")]
    Connect { url: String, message: String },
    #[error("cannot set up JetStream stream {stream}: {message}")]
    Stream { stream: String, message: String },
    #[error("JetStream did not store a batch: {0}")]
    Publish(String),
    #[error(
        "JetStream stream {stream} has no messages left (the last, stream sequence {last}, \
         was stored {idle_seconds}s ago; --cluster-max-age expired the rest, or the stream was \
         purged): the packet numbering they carried is gone, and numbering again from 1 under \
         the same stream_id would hand resuming subscribers other packets. Delete the stream \
         (e.g. `nats stream rm {stream}`) to start a new one with a new stream_id; to avoid \
         this, keep a replica running (replicas refresh an idle stream's last message) or \
         raise --cluster-max-age"
    )]
    NumberingLost {
        stream: String,
        last: u64,
        idle_seconds: u64,
    },
}

/// JetStream's duplicate window for a stream with `max_age` (zero: none):
/// JetStream refuses a window longer than max-age.
fn duplicate_window(max_age: Duration) -> Duration {
    match max_age.is_zero() {
        true => DUPLICATE_WINDOW,
        false => DUPLICATE_WINDOW.min(max_age),
    }
}

/// How long the tip may stand still before an idle replica stores an empty
/// tip marker after it (`None`: no max-age, nothing expires). A third of
/// max-age leaves two thirds for a failed attempt, its retry and the feed's
/// delay in seeing another replica's message, at three small messages per
/// max-age of idleness; never below [`KEEPALIVE_FLOOR`].
pub fn keepalive_interval(max_age: Duration) -> Option<Duration> {
    (!max_age.is_zero()).then(|| (max_age / 3).max(KEEPALIVE_FLOOR))
}

/// How to reach the stream and what it keeps.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    pub url: String,
    pub stream: String,
    /// Stream retention by age (zero: none), applied at creation and on start.
    pub max_age: Duration,
    /// Stream retention by size (zero: none), applied at creation and on start.
    pub max_bytes: u64,
    /// Packets this replica's consumer may be behind what it stored before
    /// its producers wait.
    pub max_lag: u64,
}

/// The last message a replica knows of: the stream sequence it was stored
/// at and the packet sequence the next message starts at.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tip {
    pub stream_sequence: u64,
    pub next_packet: u64,
}

/// What the feed and the sequencer of one replica share.
#[derive(Debug)]
struct Shared {
    tip: watch::Sender<Tip>,
    /// One past the last packet sequence the feed handed to the hub.
    fed: watch::Sender<u64>,
}

impl Shared {
    /// Moves the tip forward (never back): learnt from an ack or the feed.
    fn advance(&self, tip: Tip) {
        self.tip.send_if_modified(|known| {
            let newer = tip.stream_sequence > known.stream_sequence;
            if newer {
                *known = tip;
            }
            newer
        });
    }
}

impl Shared {
    /// Takes the tip JetStream reports even when it is behind the one known:
    /// JetStream lost acknowledged messages (a crash before its writes
    /// reached disk). Numbering then goes on after the highest packet
    /// sequence ever known, so the lost ones are a gap (`missed`), never
    /// reused for other packets.
    fn reset(&self, tip: Tip) {
        self.tip.send_if_modified(|known| {
            let changed = tip.stream_sequence != known.stream_sequence;
            if changed {
                if tip.stream_sequence < known.stream_sequence {
                    tracing::warn!(
                        jetstream = tip.stream_sequence,
                        known = known.stream_sequence,
                        "JetStream lost stored messages; their sequences stay unused"
                    );
                }
                *known = Tip {
                    stream_sequence: tip.stream_sequence,
                    next_packet: tip.next_packet.max(known.next_packet),
                };
            }
            changed
        });
    }
}

/// JetStream's view of the stream, for `StreamInfo`.
#[derive(Clone, Copy, Debug, Default)]
pub struct ClusterState {
    pub first_sequence: u64,
    pub next_sequence: u64,
    pub retained_bytes: u64,
    pub oldest_received_unix_nanos: i64,
}

/// A connection to the JetStream stream all replicas share.
pub struct Cluster {
    jetstream: jetstream::Context,
    stream: jetstream::stream::Stream,
    name: String,
    shared: Arc<Shared>,
    queue: mpsc::Sender<publish::Queued>,
    /// Largest batch body one message carries.
    max_body: usize,
    next_connection: AtomicU64,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("stream", &self.name)
            .finish()
    }
}

impl Cluster {
    /// Connects, makes sure the stream exists with the configured retention,
    /// anchors its numbering and starts this replica's sequencer. NATS
    /// reconnects on its own later.
    pub async fn connect(options: &ClusterOptions) -> Result<Arc<Cluster>, ClusterError> {
        let client = async_nats::ConnectOptions::new()
            .name("packet-ingest")
            .connection_timeout(Duration::from_secs(5))
            .max_reconnects(None)
            .connect(&options.url)
            .await
            .map_err(|error| ClusterError::Connect {
                url: options.url.clone(),
                message: error.to_string(),
            })?;
        let max_payload = client.server_info().max_payload;
        let jetstream = jetstream::new(client);
        let stream_error = |error: &dyn std::fmt::Display| ClusterError::Stream {
            stream: options.stream.clone(),
            message: error.to_string(),
        };
        let max_bytes = match options.max_bytes {
            0 => -1,
            bytes => i64::try_from(bytes).unwrap_or(i64::MAX),
        };
        let duplicate_window = duplicate_window(options.max_age);
        let mut stream = jetstream
            .get_or_create_stream(StreamConfig {
                name: options.stream.clone(),
                subjects: vec![format!("{SUBJECT_PREFIX}.>")],
                storage: StorageType::File,
                duplicate_window,
                max_age: options.max_age,
                max_bytes,
                ..Default::default()
            })
            .await
            .map_err(|error| stream_error(&error))?;
        // An existing stream takes this replica's retention (the last one started wins).
        let config = stream.cached_info().config.clone();
        if config.max_age != options.max_age
            || config.max_bytes != max_bytes
            || config.duplicate_window != duplicate_window
        {
            tracing::info!(
                max_age = ?options.max_age,
                max_bytes,
                "updating the JetStream stream's retention"
            );
            jetstream
                .update_stream(StreamConfig {
                    max_age: options.max_age,
                    max_bytes,
                    duplicate_window,
                    ..config
                })
                .await
                .map_err(|error| stream_error(&error))?;
        }
        let info = stream.info().await.map_err(|error| stream_error(&error))?;
        let state = info.state.clone();
        if state.last_sequence > 0 && state.messages == 0 {
            return Err(ClusterError::NumberingLost {
                stream: options.stream.clone(),
                last: state.last_sequence,
                idle_seconds: age(state.last_timestamp.unix_timestamp_nanos()).as_secs(),
            });
        }
        if state.last_sequence == 0 {
            // Nats-Expected-Last-Sequence cannot say "empty", so the first
            // message is a marker every replica publishes under the same id:
            // JetStream keeps one, and batches then always follow a message.
            let mut headers = message::genesis_headers();
            headers.insert(async_nats::header::NATS_MESSAGE_ID, "packet-ingest-genesis");
            let ack = jetstream
                .publish_with_headers(BATCH_SUBJECT, headers, bytes::Bytes::new())
                .await
                .map_err(|error| stream_error(&error))?;
            ack.await.map_err(|error| stream_error(&error))?;
        }
        let tip = read_tip(&stream, Tip::default())
            .await
            .map_err(|error| stream_error(&error))?;
        // How long ago the tip was stored, by JetStream's clock against ours
        // (a skew only moves the first keepalive).
        let tip_age = match state.last_sequence {
            0 => Duration::ZERO,
            _ => age(state.last_timestamp.unix_timestamp_nanos()),
        };
        let shared = Arc::new(Shared {
            tip: watch::Sender::new(tip),
            fed: watch::Sender::new(tip.next_packet),
        });
        let max_body = max_payload
            .saturating_sub(MESSAGE_HEADROOM)
            .max(MESSAGE_HEADROOM);
        let instance = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_nanos() as u64)
            ^ u64::from(std::process::id()) << 32;
        let (queue, queued) = mpsc::channel(QUEUE_BATCHES);
        let keepalive = keepalive_interval(options.max_age)
            .map(|interval| publish::Keepalive::new(interval, shared.tip.subscribe(), tip_age));
        tokio::spawn(
            publish::Sequencer {
                jetstream: jetstream.clone(),
                stream: stream.clone(),
                shared: Arc::clone(&shared),
                queue: queued,
                instance,
                max_body,
                max_lag: options.max_lag,
                messages: 0,
                keepalive,
            }
            .run(),
        );
        Ok(Arc::new(Cluster {
            jetstream,
            stream,
            name: options.stream.clone(),
            shared,
            queue,
            max_body,
            next_connection: AtomicU64::new(0),
        }))
    }

    /// Where this replica starts: the last stored message and the packet
    /// sequence after it, as read when it connected.
    pub fn start(&self) -> Tip {
        *self.shared.tip.borrow()
    }

    /// The tip this replica knows now.
    fn tip(&self) -> Tip {
        *self.shared.tip.borrow()
    }

    fn stream_error(&self, error: &dyn std::fmt::Display) -> ClusterError {
        ClusterError::Stream {
            stream: self.name.clone(),
            message: error.to_string(),
        }
    }

    /// The packet sequence the next stored batch will start at, as JetStream has it now.
    pub async fn next_sequence(&self) -> Result<u64, ClusterError> {
        let tip = read_tip(&self.stream, self.tip())
            .await
            .map_err(|error| self.stream_error(&error))?;
        self.shared.advance(tip);
        Ok(tip.next_packet)
    }

    /// JetStream's state of the stream in packet terms (`StreamInfo`).
    pub async fn state(&self) -> Result<ClusterState, ClusterError> {
        let mut stream = self.stream.clone();
        let info = stream
            .info()
            .await
            .map_err(|error| self.stream_error(&error))?
            .clone();
        let tip = read_tip(&self.stream, self.tip())
            .await
            .map_err(|error| self.stream_error(&error))?;
        let mut state = ClusterState {
            first_sequence: tip.next_packet,
            next_sequence: tip.next_packet,
            retained_bytes: info.state.bytes,
            oldest_received_unix_nanos: 0,
        };
        if info.state.messages > 0 {
            let oldest = self
                .stream
                .get_raw_message(info.state.first_sequence)
                .await
                .map_err(|error| self.stream_error(&error))?;
            let place = message::placement(Some(&oldest.headers))
                .map_err(|error| self.stream_error(&error))?;
            state.first_sequence = place.first;
            // A marker holds no packet: the oldest one is in the message
            // holding `first`, if any packet is retained at all.
            let holder = match place.count == 0 && place.first < tip.next_packet {
                false => oldest,
                true => {
                    let at = self
                        .locate(place.first)
                        .await
                        .map_err(|error| self.stream_error(&error))?;
                    self.stream
                        .get_raw_message(at)
                        .await
                        .map_err(|error| self.stream_error(&error))?
                }
            };
            state.oldest_received_unix_nanos = holder
                .headers
                .get(message::RECEIVED)
                .and_then(|value| value.as_str().parse().ok())
                .unwrap_or(0);
        }
        Ok(state)
    }

    /// The stream's identity (SPEC §7): its name and creation time, so a
    /// stream deleted and created again under the same name is another stream.
    pub async fn identity(&self) -> Result<crate::stream::StreamIdentity, ClusterError> {
        let created = self.stream.cached_info().created.unix_timestamp_nanos();
        let mut id = format!("js-{}-{created:x}", self.name);
        id.truncate(64);
        Ok(crate::stream::StreamIdentity {
            id: Arc::from(id),
            durable: true,
        })
    }

    /// Publisher state for one producer connection or Publish stream.
    pub fn publisher(self: &Arc<Self>) -> ClusterPublisher {
        self.next_connection.fetch_add(1, Ordering::Relaxed);
        // Three quarters of a message: a piece still fits once its
        // sequences take their final width.
        ClusterPublisher::new(self.queue.clone(), self.max_body / 4 * 3)
    }
}

/// How long ago `unix_nanos` was by this host's clock (zero if in the future).
fn age(unix_nanos: i128) -> Duration {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos() as i128);
    Duration::from_nanos(u64::try_from(now - unix_nanos).unwrap_or(0))
}

/// The tip as JetStream has it: its last message and where that one ends.
/// `known` is the tip this replica knows: if JetStream ends at the same
/// message, that is the answer even when the message itself has expired
/// (a running replica can still continue, and re-anchor, the numbering).
async fn read_tip(stream: &jetstream::stream::Stream, known: Tip) -> Result<Tip, String> {
    let mut stream = stream.clone();
    let last = stream
        .info()
        .await
        .map_err(|e| e.to_string())?
        .state
        .last_sequence;
    if last == 0 {
        return Ok(Tip {
            stream_sequence: 0,
            next_packet: 1,
        });
    }
    if last == known.stream_sequence {
        return Ok(known);
    }
    let stored = stream.get_raw_message(last).await.map_err(|error| {
        let gone = match error.kind() {
            RawMessageErrorKind::NoMessageFound => {
                " (it expired under --cluster-max-age or was purged)"
            }
            _ => "",
        };
        format!(
            "cannot read the stream's last message {last}{gone} to continue its numbering: {error}"
        )
    })?;
    let place = message::placement(Some(&stored.headers)).map_err(|e| e.to_string())?;
    Ok(Tip {
        stream_sequence: last,
        next_packet: place.next(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        frame::Channel,
        wire::{EncodedPacketsBuilder, PacketFields, SequencedBatch},
    };

    /// A stored batch from `first`, one packet per entry of `channels`
    /// (shared with the message format's tests).
    pub(super) fn batch(first: u64, channels: &[u32]) -> SequencedBatch {
        let mut builder = EncodedPacketsBuilder::with_capacity(channels.len(), 0, first);
        for (index, channel) in channels.iter().enumerate() {
            builder.push(&PacketFields {
                channel: Channel(*channel),
                payload: &[7; 40],
                digest: &[1; 32],
                source: "tcp/127.0.0.1:9",
                source_sequence: index as u64,
                received_unix_nanos: 5,
            });
        }
        builder.finish().stamp(first)
    }

    /// A marker (genesis or keepalive tip) saying the next packet is `next`,
    /// decoded the way every reader decodes it.
    pub(super) fn marker(next: u64) -> SequencedBatch {
        message::decode(Some(&message::marker_headers(next)), bytes::Bytes::new())
            .expect("a marker decodes")
    }

    #[test]
    fn the_duplicate_window_fits_within_max_age() {
        assert_eq!(duplicate_window(Duration::ZERO), DUPLICATE_WINDOW);
        assert_eq!(
            duplicate_window(Duration::from_secs(2)),
            Duration::from_secs(2)
        );
        assert_eq!(
            duplicate_window(Duration::from_secs(3600)),
            DUPLICATE_WINDOW
        );
    }

    #[test]
    fn keepalive_refreshes_a_third_of_max_age_and_at_most_once_a_second() {
        assert_eq!(keepalive_interval(Duration::ZERO), None);
        assert_eq!(
            keepalive_interval(Duration::from_secs(2)),
            Some(Duration::from_secs(1))
        );
        assert_eq!(
            keepalive_interval(Duration::from_secs(3600)),
            Some(Duration::from_secs(1200))
        );
    }
}
