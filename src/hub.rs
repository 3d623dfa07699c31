//! The hub: sequence numbers, the shared ring of recent batches, and delivery.
//!
//! The hub is a broadcast channel bounded in bytes as well as packets. Publishers
//! stamp each verified batch with the next sequences and append it to one ring
//! (`VecDeque` of `Arc`ed, pre-encoded batches), and a `watch` of the next
//! sequence wakes subscribers. Every subscriber is just a cursor into that ring,
//! so history replay and live delivery are the same read (no seam to race), one
//! copy of a packet serves every subscriber, and the memory held for history and
//! lagging subscribers together is the ring's, capped by `--memory-limit`.
//! A subscriber whose cursor falls off the ring is handled by the slow-subscriber
//! policy: skip ahead and report `missed` (gap), end the stream (disconnect), or,
//! in block mode, the ring may not drop what it has not read, so publishers wait
//! (that is the TCP backpressure) until it catches up or is cut after
//! `--block-timeout`.

use std::{
    collections::{HashMap, VecDeque},
    ops::Range,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::{Duration, Instant},
};

use tokio::sync::{watch, Notify};

use crate::{
    metrics::Metrics,
    wire::{ChannelFilter, Delivery, EncodedPackets, SequencedBatch},
};

/// What happens to a subscriber that falls further behind than the hub retains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SlowSubscriberPolicy {
    /// Skip to the oldest retained packet and report the loss in `missed`.
    Gap,
    /// End the stream with `RESOURCE_EXHAUSTED`.
    Disconnect,
    /// Lossless: publishers wait until the slowest subscriber catches up.
    Block,
}

#[derive(Clone, Debug)]
pub struct HubConfig {
    /// Packets kept for replay and lagging subscribers: max(--history, --subscriber-buffer).
    pub retain_packets: u64,
    /// Bytes kept for the same, whichever limit is hit first.
    pub memory_limit: usize,
    pub policy: SlowSubscriberPolicy,
    pub block_timeout: Duration,
    /// Soft cap on one response's encoded size (always at least one packet).
    pub max_delivery_bytes: usize,
}

/// Why `subscribe` refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    #[error("from_sequence {requested} is beyond the next sequence {next}; the server may have restarted, subscribe again without from_sequence or from a sequence it has")]
    OutOfRange { requested: u64, next: u64 },
    #[error("the server is shutting down")]
    ShuttingDown,
}

/// Why a subscription ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubscriptionEnd {
    #[error("subscriber fell {behind} packets behind, more than the {retained} this server retains (--slow-subscriber disconnect)")]
    Lagged { behind: u64, retained: u64 },
    #[error("subscriber made no progress for {0:?} while the hub was full (--slow-subscriber block, --block-timeout)")]
    Stuck(Duration),
    #[error("the server is shutting down")]
    ShuttingDown,
}

impl SubscriptionEnd {
    pub fn reason(&self) -> &'static str {
        match self {
            SubscriptionEnd::Lagged { .. } => "lagged",
            SubscriptionEnd::Stuck(_) => "block_timeout",
            SubscriptionEnd::ShuttingDown => "shutdown",
        }
    }
}

/// What a subscriber learns when it asks for more.
#[derive(Debug)]
pub enum Next {
    Delivery(Delivery),
    /// Nothing arrived for the heartbeat interval.
    Idle,
    End(SubscriptionEnd),
}

/// A subscriber's position, visible to publishers in block mode.
#[derive(Debug)]
struct Slot {
    cursor: AtomicU64,
    kicked: AtomicBool,
}

struct Stored {
    batch: Arc<SequencedBatch>,
    bytes: usize,
}

struct Ring {
    batches: VecDeque<Stored>,
    next_sequence: u64,
    retained_packets: u64,
    retained_bytes: usize,
    slots: Vec<Arc<Slot>>,
    closed: bool,
    /// Packets dropped off the ring so far, per channel: lets a filtered
    /// subscriber that lagged learn exactly how many of *its* packets it lost.
    evicted_by_channel: HashMap<u32, u64>,
}

impl Ring {
    fn oldest_sequence(&self) -> u64 {
        self.batches
            .front()
            .map_or(self.next_sequence, |stored| stored.batch.first_sequence)
    }

    /// Cursor of the slowest subscriber that still counts in block mode.
    fn slowest_live_cursor(&self) -> Option<u64> {
        self.slots
            .iter()
            .filter(|slot| !slot.kicked.load(Ordering::Relaxed))
            .map(|slot| slot.cursor.load(Ordering::Acquire))
            .min()
    }

    fn evicted_matching(&self, filter: &ChannelFilter) -> u64 {
        filter.channels().map_or(0, |channels| {
            channels
                .iter()
                .filter_map(|c| self.evicted_by_channel.get(c))
                .sum()
        })
    }

    /// Packets matching `filter` still in the ring with a sequence below `cursor`.
    fn retained_matching_before(&self, filter: &ChannelFilter, cursor: u64) -> u64 {
        let mut count = 0;
        for stored in self
            .batches
            .iter()
            .take_while(|stored| stored.batch.first_sequence < cursor)
        {
            let end = (cursor - stored.batch.first_sequence).min(stored.batch.packets.len() as u64);
            count += (0..end as usize)
                .filter(|index| filter.matches(stored.batch.packets.channel(*index)))
                .count() as u64;
        }
        count
    }

    /// Bytes of batches that still hold packets at or after `cursor`.
    fn bytes_from(&self, cursor: u64) -> usize {
        self.batches
            .iter()
            .rev()
            .take_while(|stored| stored.batch.end_sequence() > cursor)
            .map(|stored| stored.bytes)
            .sum()
    }
}

/// Shared by ingest connections, Publish streams and Subscribe streams.
pub struct Hub {
    ring: Mutex<Ring>,
    /// The next sequence to be assigned; its changes wake subscribers.
    head: watch::Sender<u64>,
    /// Woken whenever a subscriber advances or leaves (block mode waits on it).
    progress: Notify,
    config: HubConfig,
    metrics: Arc<Metrics>,
}

impl Hub {
    pub fn new(config: HubConfig, metrics: Arc<Metrics>) -> Arc<Self> {
        Self::starting_at(config, metrics, 1)
    }

    /// A hub whose first packet gets `next_sequence` (cluster mode continues
    /// the JetStream stream's numbering).
    pub fn starting_at(config: HubConfig, metrics: Arc<Metrics>, next_sequence: u64) -> Arc<Self> {
        Arc::new(Hub {
            ring: Mutex::new(Ring {
                batches: VecDeque::new(),
                next_sequence,
                retained_packets: 0,
                retained_bytes: 0,
                slots: Vec::new(),
                closed: false,
                evicted_by_channel: HashMap::new(),
            }),
            head: watch::Sender::new(next_sequence),
            progress: Notify::new(),
            config,
            metrics,
        })
    }

    pub fn config(&self) -> &HubConfig {
        &self.config
    }

    fn lock(&self) -> MutexGuard<'_, Ring> {
        // A panic while holding the lock leaves the ring consistent (every
        // mutation completes before anything can panic), so keep serving.
        self.ring
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The next sequence to be assigned (one past the newest packet).
    pub fn next_sequence(&self) -> u64 {
        *self.head.borrow()
    }

    /// Appends a verified batch and returns the sequences it got.
    ///
    /// In block mode this waits while the slowest subscriber would otherwise
    /// lose packets; the caller's wait is what stops its socket being read.
    pub async fn publish(&self, packets: EncodedPackets) -> Range<u64> {
        self.publish_at(None, packets).await
    }

    /// Like `publish`, but the batch's first sequence is given (cluster mode:
    /// the JetStream stream sequence). A sequence past the next one leaves a
    /// gap (messages deleted from the stream); one before it is moved up.
    pub async fn publish_at(
        &self,
        first_sequence: Option<u64>,
        packets: EncodedPackets,
    ) -> Range<u64> {
        if packets.is_empty() {
            let next = self.next_sequence();
            return next..next;
        }
        let count = packets.len() as u64;
        let bytes = packets.byte_size();
        let mut packets = Some(packets);
        let mut blocked: Option<(Instant, u64)> = None;
        loop {
            let progressed = self.progress.notified();
            tokio::pin!(progressed);
            progressed.as_mut().enable();
            {
                let mut ring = self.lock();
                let slowest = match self.config.policy {
                    SlowSubscriberPolicy::Block if !ring.closed => ring.slowest_live_cursor(),
                    _ => None,
                };
                if slowest.is_none_or(|cursor| self.has_room(&ring, cursor, count, bytes)) {
                    let Some(packets) = packets.take() else {
                        unreachable!("packets are taken exactly once, on the way out")
                    };
                    let range = self.append(&mut ring, first_sequence, packets, bytes, slowest);
                    drop(ring);
                    // Publishers race to here; the head only ever moves forward.
                    self.head.send_if_modified(|head| {
                        let advanced = *head < range.end;
                        *head = (*head).max(range.end);
                        advanced
                    });
                    return range;
                }
                let slowest = slowest.unwrap_or_default();
                match blocked {
                    Some((_, stuck_at)) if slowest > stuck_at => {
                        blocked = Some((Instant::now(), slowest));
                    }
                    Some((since, stuck_at)) if since.elapsed() >= self.config.block_timeout => {
                        self.kick_stuck(&ring, stuck_at);
                        blocked = None;
                        continue;
                    }
                    Some(_) => {}
                    None => blocked = Some((Instant::now(), slowest)),
                }
            }
            let since = blocked.map_or_else(Instant::now, |(since, _)| since);
            let remaining = self.config.block_timeout.saturating_sub(since.elapsed());
            let _ = tokio::time::timeout(remaining, progressed).await;
        }
    }

    /// Block mode: would appending keep every live subscriber within what is retained?
    fn has_room(&self, ring: &Ring, slowest: u64, count: u64, bytes: usize) -> bool {
        if slowest >= ring.next_sequence {
            return true; // everyone is caught up: always take one batch
        }
        let behind_after = ring.next_sequence + count - slowest;
        behind_after <= self.config.retain_packets
            && ring.bytes_from(slowest) + bytes <= self.config.memory_limit
    }

    fn kick_stuck(&self, ring: &Ring, stuck_at: u64) {
        for slot in &ring.slots {
            if slot.cursor.load(Ordering::Acquire) <= stuck_at
                && !slot.kicked.swap(true, Ordering::AcqRel)
            {
                tracing::warn!(
                    cursor = stuck_at,
                    timeout = ?self.config.block_timeout,
                    "cutting a subscriber stuck while the hub is full"
                );
            }
        }
    }

    fn append(
        &self,
        ring: &mut Ring,
        first_sequence: Option<u64>,
        packets: EncodedPackets,
        bytes: usize,
        protect_from: Option<u64>,
    ) -> Range<u64> {
        let first =
            first_sequence.map_or(ring.next_sequence, |first| first.max(ring.next_sequence));
        let count = packets.len() as u64;
        ring.batches.push_back(Stored {
            batch: Arc::new(SequencedBatch {
                first_sequence: first,
                packets,
            }),
            bytes,
        });
        ring.next_sequence = first + count;
        ring.retained_packets += count;
        ring.retained_bytes += bytes;
        // Oldest first: over the byte limit, or more packets than needed for
        // the retention count. Block mode never drops what a live subscriber
        // has not read yet.
        while let Some(front) = ring.batches.front() {
            let front_len = front.batch.packets.len() as u64;
            let over_bytes = ring.retained_bytes > self.config.memory_limit;
            let over_count = ring.retained_packets - front_len >= self.config.retain_packets;
            let unread = protect_from.is_some_and(|cursor| front.batch.end_sequence() > cursor);
            if !(over_bytes || over_count) || unread || ring.batches.len() == 1 {
                break;
            }
            ring.retained_bytes -= front.bytes;
            ring.retained_packets -= front_len;
            if let Some(evicted) = ring.batches.pop_front() {
                count_by_channel(&evicted.batch.packets, &mut ring.evicted_by_channel);
            }
        }
        self.metrics
            .hub_retained_bytes
            .set(ring.retained_bytes as i64);
        self.metrics
            .hub_retained_packets
            .set(ring.retained_packets as i64);
        first..ring.next_sequence
    }

    /// Starts a subscription: live from now, or replay from `from_sequence` then live.
    pub fn subscribe(
        self: &Arc<Self>,
        filter: ChannelFilter,
        from_sequence: Option<u64>,
    ) -> Result<Subscription, SubscribeError> {
        self.subscribe_with(filter, from_sequence, false)
    }

    /// `subscribe`, but a `from_sequence` older than what is retained starts
    /// at the oldest retained packet *without* counting the rest as missed:
    /// the caller replays `[from_sequence, replay_until())` from elsewhere.
    pub fn subscribe_with(
        self: &Arc<Self>,
        filter: ChannelFilter,
        from_sequence: Option<u64>,
        replay_elsewhere: bool,
    ) -> Result<Subscription, SubscribeError> {
        let mut ring = self.lock();
        if ring.closed {
            return Err(SubscribeError::ShuttingDown);
        }
        let next = ring.next_sequence;
        let oldest = ring.oldest_sequence();
        let (cursor, missed) = match from_sequence {
            None => (next, 0),
            Some(requested) if requested > next => {
                return Err(SubscribeError::OutOfRange { requested, next })
            }
            Some(requested) => {
                let requested = requested.max(1);
                match (requested < oldest, replay_elsewhere) {
                    (true, false) => (oldest, oldest - requested),
                    (true, true) => (oldest, 0),
                    (false, _) => (requested, 0),
                }
            }
        };
        // A filtered subscriber counts its channels' packets below its cursor,
        // so a later lag can be reported exactly (see `take`).
        let matched_before_cursor = match filter.channels() {
            None => 0,
            Some(_) => {
                ring.evicted_matching(&filter) + ring.retained_matching_before(&filter, cursor)
            }
        };
        let slot = Arc::new(Slot {
            cursor: AtomicU64::new(cursor),
            kicked: AtomicBool::new(false),
        });
        ring.slots.push(Arc::clone(&slot));
        drop(ring);
        self.metrics.subscribers.inc();
        if missed > 0 {
            self.metrics.packets_missed.inc_by(missed);
        }
        Ok(Subscription {
            hub: Arc::clone(self),
            slot,
            cursor,
            pending_missed: missed,
            matched_before_cursor,
            filter,
            head: self.head.subscribe(),
        })
    }

    /// Waits until every sequence below `target` has been published here.
    pub async fn wait_for_sequence(&self, target: u64) {
        let mut head = self.head.subscribe();
        // The sender lives as long as the hub, so this only ends when reached.
        let _ = head.wait_for(|next| *next >= target).await;
    }

    /// Stops taking packets; subscribers drain what is there and then end.
    pub fn close(&self) {
        self.lock().closed = true;
        self.head.send_modify(|_| {});
        self.progress.notify_waiters();
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }
}

/// Adds each packet of `packets` to its channel's count (runs of one channel
/// cost one map update).
fn count_by_channel(packets: &EncodedPackets, counts: &mut HashMap<u32, u64>) {
    let mut run: Option<(u32, u64)> = None;
    for index in 0..packets.len() {
        let channel = packets.channel(index).0;
        run = match run {
            Some((current, length)) if current == channel => Some((current, length + 1)),
            Some((current, length)) => {
                *counts.entry(current).or_default() += length;
                Some((channel, 1))
            }
            None => Some((channel, 1)),
        };
    }
    if let Some((channel, length)) = run {
        *counts.entry(channel).or_default() += length;
    }
}

mod subscription;
pub use subscription::Subscription;

#[cfg(test)]
mod tests;
