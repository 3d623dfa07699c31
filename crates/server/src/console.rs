//! The live console on the admin port: the page at `/` (one HTML file with
//! inline script and style, built into the binary), the figures it polls
//! (`GET /api/status`, JSON) and its live tail of one channel
//! (`GET /api/tail?channel=N`, server-sent events).
//!
//! The figures are what `StreamInfo` answers (the same function builds
//! both), the memory and disk ranges behind it, rates over the last few
//! seconds, connections, each subscriber's lag and every reject by reason.
//!
//! A tail is a hub subscription like any other: it takes one of
//! `--max-subscribers`, shows up in the subscriber count and lag list, and
//! its connection is one of the admin port's slots (an idle one gives way to
//! a probe when the port is full; the browser reconnects). A browser that
//! reads slowly must not make the server hold its backlog: a pump task reads
//! the subscription at hub speed into a small bounded queue of rendered
//! events and, when that queue is full, drops packets and counts them, to be
//! reported as one `missed` event when there is room again. Payloads are sent
//! as a short hex and printable-ASCII preview in JSON; the page inserts text
//! only (`textContent`), never markup.

use std::{
    collections::{BTreeMap, VecDeque},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::response::sse::{Event, KeepAlive, Sse};
use bytes::Bytes;
use prost::Message;
use serde::{Deserialize, Serialize};
use tokio::{
    sync::{mpsc, OwnedSemaphorePermit, Semaphore},
    time::Instant,
};

use crate::{
    error::ServiceError,
    grpc::PacketsService,
    hub::{Next, SubscribeOptions, Subscription},
    pb::{Packet, SubscribeResponse},
    wire::{ChannelFilter, Delivery},
};

/// The page, served as is.
pub const PAGE: &str = include_str!("console.html");

/// Tails open at once, whatever the admin port's connection cap: the other
/// slots stay for scrapers and probes.
pub const MAX_TAILS: usize = 4;
/// Rendered events a tail queues for its browser before it drops packets.
pub const TAIL_QUEUE: usize = 256;
/// A new tail starts this many sequences back (what the ring still holds of
/// them), so a channel that is quiet right now still shows its last packets.
pub const TAIL_REPLAY: u64 = 1000;
/// Payload bytes a tail event shows.
pub const PREVIEW_BYTES: usize = 64;
/// Subscribers listed in the status, the furthest behind first.
pub const LISTED_SUBSCRIBERS: usize = 100;
/// How often an idle tail sends an SSE comment (keeps proxies from closing it).
const TAIL_KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Rates are averaged over about this long.
const RATE_WINDOW: Duration = Duration::from_secs(5);
/// Polls closer together than this share a sample.
const MIN_SAMPLE_GAP: Duration = Duration::from_millis(200);

/// Counter readings at one instant, for rates.
#[derive(Clone, Copy, Debug)]
struct Sample {
    at: Instant,
    accepted_packets: u64,
    accepted_bytes: u64,
    delivered_packets: u64,
}

/// What the console reads, and the state of its rates and tails.
pub struct Console {
    packets: Arc<PacketsService>,
    /// Readings over the last `RATE_WINDOW` (plus the one just before it).
    samples: Mutex<VecDeque<Sample>>,
    tails: Arc<Semaphore>,
}

/// `GET /api/status`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    /// What `StreamInfo` answers.
    pub stream: StreamRange,
    /// The ring in memory.
    pub memory: MemoryRange,
    /// The log, with `--data-dir`.
    pub disk: Option<DiskRange>,
    pub rates: Rates,
    pub totals: Totals,
    pub connections: Connections,
    pub subscribers: Subscribers,
    /// Counts by reason: `verify` (frames that failed verification),
    /// `protocol` (bad framing), `refused` (RPCs refused or ended by a
    /// limit), `disconnected` (subscribers the server ended).
    pub rejects: BTreeMap<String, BTreeMap<String, u64>>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct StreamRange {
    pub stream_id: String,
    pub first_sequence: u64,
    pub next_sequence: u64,
    pub retained_packets: u64,
    pub retained_bytes: u64,
    pub oldest_received_unix_nanos: i64,
    pub durable: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct MemoryRange {
    pub first_sequence: u64,
    pub next_sequence: u64,
    pub retained_packets: u64,
    pub retained_bytes: u64,
    /// Evicted batches still held by unsent deliveries.
    pub pinned_bytes: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct DiskRange {
    pub first_sequence: u64,
    /// One past the newest sequence written.
    pub end_sequence: u64,
    pub retained_bytes: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Rates {
    /// What the rates are averaged over.
    pub window_seconds: f64,
    pub accepted_packets_per_second: f64,
    pub accepted_bytes_per_second: f64,
    pub delivered_packets_per_second: f64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Totals {
    pub received_packets: u64,
    pub accepted_packets: u64,
    pub accepted_bytes: u64,
    pub delivered_packets: u64,
    pub missed_packets: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Connections {
    pub ingest: i64,
    pub grpc: i64,
    pub publishers: i64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Subscribers {
    pub count: u64,
    pub limit: usize,
    /// The furthest behind first, at most `LISTED_SUBSCRIBERS`.
    pub list: Vec<SubscriberLag>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SubscriberLag {
    pub who: String,
    /// Empty: every channel.
    pub channels: Vec<u32>,
    pub cursor: u64,
    pub lag: u64,
}

/// `?channel=N` of a tail.
#[derive(Debug, Deserialize)]
pub struct TailQuery {
    pub channel: u32,
}

/// Why a tail was not opened.
#[derive(Debug, thiserror::Error)]
pub enum TailRefused {
    #[error("{MAX_TAILS} console tails are open already; close one and retry")]
    TooManyTails,
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error("cannot subscribe: {0}")]
    Subscribe(#[from] crate::hub::SubscribeError),
}

impl axum::response::IntoResponse for TailRefused {
    fn into_response(self) -> axum::response::Response {
        use http::StatusCode;
        let status = match &self {
            TailRefused::TooManyTails => StatusCode::TOO_MANY_REQUESTS,
            TailRefused::Service(ServiceError::TooManySubscribers { .. }) => {
                StatusCode::TOO_MANY_REQUESTS
            }
            TailRefused::Service(_) | TailRefused::Subscribe(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        (status, format!("{self}\n")).into_response()
    }
}

/// One packet as a tail shows it.
#[derive(Debug, Serialize, Deserialize)]
pub struct TailPacket {
    pub sequence: u64,
    pub channel: u32,
    pub source: String,
    pub source_sequence: u64,
    pub received_unix_nanos: i64,
    pub size: usize,
    /// The first `PREVIEW_BYTES` of the payload, in hex.
    pub hex: String,
    /// The same bytes, printable ASCII kept and every other byte as `.`.
    pub text: String,
}

impl TailPacket {
    fn new(packet: Packet) -> Self {
        let preview = &packet.payload[..packet.payload.len().min(PREVIEW_BYTES)];
        TailPacket {
            sequence: packet.sequence,
            channel: packet.channel,
            size: packet.payload.len(),
            hex: preview.iter().map(|byte| format!("{byte:02x}")).collect(),
            text: preview
                .iter()
                .map(|&byte| match byte {
                    b' '..=b'~' => byte as char,
                    _ => '.',
                })
                .collect(),
            source: packet.source,
            source_sequence: packet.source_sequence,
            received_unix_nanos: packet.received_unix_nanos,
        }
    }
}

impl Console {
    pub fn new(packets: Arc<PacketsService>) -> Arc<Self> {
        let console = Console {
            packets,
            samples: Mutex::new(VecDeque::new()),
            tails: Arc::new(Semaphore::new(MAX_TAILS)),
        };
        // The first poll's rates are measured from here.
        let first = console.sample();
        console.lock_samples().push_back(first);
        Arc::new(console)
    }

    fn lock_samples(&self) -> std::sync::MutexGuard<'_, VecDeque<Sample>> {
        self.samples
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn sample(&self) -> Sample {
        let metrics = &self.packets.metrics;
        Sample {
            at: Instant::now(),
            accepted_packets: metrics.packets_accepted.get(),
            accepted_bytes: metrics.bytes_accepted.get(),
            delivered_packets: metrics.packets_delivered.get(),
        }
    }

    /// Rates from the oldest sample in the window to `now`.
    fn rates(&self, now: Sample) -> Rates {
        let mut samples = self.lock_samples();
        if samples
            .back()
            .is_none_or(|last| now.at.duration_since(last.at) >= MIN_SAMPLE_GAP)
        {
            samples.push_back(now);
        }
        // Keep one sample at or before the window's start, so a rate always
        // spans about the window once polls have run that long.
        while samples.len() > 2 && now.at.duration_since(samples[1].at) >= RATE_WINDOW {
            samples.pop_front();
        }
        let Some(oldest) = samples.front().copied() else {
            return Rates {
                window_seconds: 0.0,
                accepted_packets_per_second: 0.0,
                accepted_bytes_per_second: 0.0,
                delivered_packets_per_second: 0.0,
            };
        };
        drop(samples);
        let seconds = now.at.duration_since(oldest.at).as_secs_f64();
        let per_second = |now: u64, then: u64| match seconds > 0.0 {
            true => now.saturating_sub(then) as f64 / seconds,
            false => 0.0,
        };
        Rates {
            window_seconds: seconds,
            accepted_packets_per_second: per_second(now.accepted_packets, oldest.accepted_packets),
            accepted_bytes_per_second: per_second(now.accepted_bytes, oldest.accepted_bytes),
            delivered_packets_per_second: per_second(
                now.delivered_packets,
                oldest.delivered_packets,
            ),
        }
    }

    /// The figures the page shows.
    pub fn status(&self) -> Status {
        let service = &self.packets;
        let metrics = &service.metrics;
        let stats = service.hub.stats();
        let info = service.stream_info_response(&stats);
        let now = self.sample();
        let reasons = |counts: BTreeMap<&'static str, u64>| -> BTreeMap<String, u64> {
            counts
                .into_iter()
                .map(|(reason, count)| (reason.to_owned(), count))
                .collect()
        };
        let rejects = BTreeMap::from([
            (
                "verify".to_owned(),
                reasons(metrics.rejected.packets_by_reason()),
            ),
            (
                "protocol".to_owned(),
                reasons(metrics.protocol_errors.packets_by_reason()),
            ),
            (
                "refused".to_owned(),
                reasons(metrics.requests_refused.by_reason()),
            ),
            (
                "disconnected".to_owned(),
                reasons(metrics.subscribers_disconnected.packets_by_reason()),
            ),
        ]);
        Status {
            stream: StreamRange {
                stream_id: info.stream_id,
                first_sequence: info.first_sequence,
                next_sequence: info.next_sequence,
                retained_packets: info.retained_packets,
                retained_bytes: info.retained_bytes,
                oldest_received_unix_nanos: info.oldest_received_unix_nanos,
                durable: info.durable,
            },
            memory: MemoryRange {
                first_sequence: stats.oldest_sequence,
                next_sequence: stats.next_sequence,
                retained_packets: stats.retained_packets,
                retained_bytes: stats.retained_bytes,
                pinned_bytes: stats.pinned_bytes,
            },
            disk: service.hub.log().map(|log| DiskRange {
                first_sequence: log.first_sequence(),
                end_sequence: log.end_sequence(),
                retained_bytes: log.retained_bytes(),
            }),
            rates: self.rates(now),
            totals: Totals {
                received_packets: metrics.packets_received.get(),
                accepted_packets: now.accepted_packets,
                accepted_bytes: now.accepted_bytes,
                delivered_packets: now.delivered_packets,
                missed_packets: metrics.packets_missed.get(),
            },
            connections: Connections {
                ingest: metrics.ingest_connections.get(),
                grpc: metrics.grpc_connections.get(),
                publishers: metrics.publishers.get(),
            },
            subscribers: Subscribers {
                count: stats.subscribers,
                limit: service.max_subscribers,
                list: service
                    .hub
                    .subscriber_positions(LISTED_SUBSCRIBERS)
                    .into_iter()
                    .map(|position| SubscriberLag {
                        who: position.label.as_deref().unwrap_or("-").to_owned(),
                        channels: position.channels.as_deref().unwrap_or_default().to_vec(),
                        cursor: position.cursor,
                        lag: position.lag,
                    })
                    .collect(),
            },
            rejects,
        }
    }

    /// Opens a tail of `channel` for the browser at `peer`: the last packets
    /// of that channel the ring holds, then live ones.
    pub fn tail(
        &self,
        channel: u32,
        peer: Option<SocketAddr>,
    ) -> Result<
        Sse<impl futures::Stream<Item = Result<Event, std::convert::Infallible>>>,
        TailRefused,
    > {
        let service = &self.packets;
        if service.draining.is_cancelled() {
            return Err(ServiceError::ShuttingDown.into());
        }
        let tail_permit = Arc::clone(&self.tails)
            .try_acquire_owned()
            .map_err(|_| TailRefused::TooManyTails)?;
        let subscriber_permit = Arc::clone(&service.subscriber_permits)
            .try_acquire_owned()
            .map_err(|_| {
                let error = ServiceError::TooManySubscribers {
                    limit: service.max_subscribers,
                };
                if let Some(reason) = error.refusal_reason() {
                    service.metrics.requests_refused.inc(reason);
                }
                error
            })?;
        let stats = service.hub.stats();
        let from = stats
            .next_sequence
            .saturating_sub(TAIL_REPLAY)
            .max(stats.oldest_sequence);
        let label = match peer {
            Some(addr) => format!("console/{addr}"),
            None => "console".to_owned(),
        };
        let subscription = service.hub.subscribe_with(SubscribeOptions {
            filter: ChannelFilter::new(vec![channel]),
            from_sequence: Some(from),
            label: Some(Arc::from(label)),
            ..SubscribeOptions::default()
        })?;
        let (events, queue) = mpsc::channel(TAIL_QUEUE);
        tokio::spawn(pump(
            subscription,
            events,
            service.draining.clone(),
            (tail_permit, subscriber_permit),
        ));
        let stream = futures::stream::unfold(queue, |mut queue| async move {
            let event = queue.recv().await?;
            Some((Ok(event), queue))
        });
        Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(TAIL_KEEP_ALIVE)))
    }
}

/// Reads `subscription` at hub speed into `events`; what does not fit is
/// counted and reported as a `missed` event once there is room. Ends when the
/// browser goes away (the queue's receiver is dropped), the subscription
/// ends, or shutdown begins; the permits are released then.
async fn pump(
    mut subscription: Subscription,
    events: mpsc::Sender<Event>,
    draining: tokio_util::sync::CancellationToken,
    _permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
) {
    let mut missed: u64 = 0;
    loop {
        tokio::select! {
            biased;
            _ = events.closed() => return,
            _ = draining.cancelled() => {
                let _ = events.try_send(end_event("the server is shutting down"));
                return;
            }
            room = events.reserve(), if missed > 0 => {
                let Ok(room) = room else { return };
                room.send(missed_event(missed));
                missed = 0;
            }
            next = subscription.next(TAIL_KEEP_ALIVE) => match next {
                Next::Delivery(delivery) => {
                    missed += delivery.missed;
                    for packet in packets_of(delivery) {
                        // Rendered only when there is room for it.
                        let Ok(room) = events.try_reserve() else {
                            missed += 1;
                            continue;
                        };
                        if missed == 0 {
                            room.send(packet_event(packet));
                            continue;
                        }
                        // Report the gap before anything after it.
                        room.send(missed_event(missed));
                        missed = 0;
                        match events.try_reserve() {
                            Ok(room) => room.send(packet_event(packet)),
                            Err(_) => missed += 1,
                        }
                    }
                }
                Next::Idle => {}
                Next::End(end) => {
                    let _ = events.try_send(end_event(&end.to_string()));
                    return;
                }
            },
        }
    }
}

/// The packets of a delivery. Its record runs are whole `packets` fields of a
/// `SubscribeResponse`, so each decodes on its own, sharing the hub's bytes.
fn packets_of(delivery: Delivery) -> impl Iterator<Item = Packet> {
    // The first chunk is the gRPC prefix and `missed`, taken already.
    delivery.into_chunks().skip(1).flat_map(|records: Bytes| {
        match SubscribeResponse::decode(records) {
            Ok(response) => response.packets,
            Err(error) => {
                // The hub encoded these itself; this is a bug, not a client's doing.
                tracing::error!(%error, "console tail cannot decode a delivery");
                Vec::new()
            }
        }
    })
}

fn packet_event(packet: Packet) -> Event {
    json_event("packet", &TailPacket::new(packet))
}

fn missed_event(missed: u64) -> Event {
    json_event("missed", &serde_json::json!({ "missed": missed }))
}

fn end_event(reason: &str) -> Event {
    json_event("end", &serde_json::json!({ "reason": reason }))
}

fn json_event(kind: &str, data: &impl Serialize) -> Event {
    // Serialising these plain structs cannot fail; an empty event would be harmless.
    Event::default()
        .event(kind)
        .data(serde_json::to_string(data).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_preview_is_short_hex_and_printable_text() {
        let payload = Bytes::from(
            [b"<b>hi</b>\x00\xff".as_slice(), &[b'x'; 100]]
                .concat()
                .to_vec(),
        );
        let packet = TailPacket::new(Packet {
            payload,
            ..Packet::default()
        });
        assert_eq!(packet.size, 111);
        assert_eq!(packet.hex.len(), PREVIEW_BYTES * 2);
        assert!(packet.hex.starts_with("3c623e6869"));
        assert_eq!(packet.text.len(), PREVIEW_BYTES);
        assert!(packet.text.starts_with("<b>hi</b>..xxx"));
    }
}
