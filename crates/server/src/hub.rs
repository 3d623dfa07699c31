//! The hub: sequence numbers, the shared ring of recent batches, and delivery.
//!
//! The hub is a broadcast channel bounded in bytes as well as packets. Publishers
//! number each verified batch (writing the sequences into its pre-encoded
//! records) and append it to one ring (`VecDeque` of `Arc`ed batches), and a
//! `watch` of the next sequence wakes subscribers. Every subscriber is just a
//! cursor into that ring, so history replay and live delivery are the same read
//! (no seam to race), and one copy of a packet serves every subscriber.
//!
//! Memory: deliveries are slices of the ring's batches, so a stalled stream
//! holds ring memory, not copies. A batch that leaves the ring while a delivery
//! still holds it stays charged ("pinned") until released, so the ring plus
//! whatever stalled streams hold stays within `--memory-limit`; if pinned memory
//! alone passes half the limit, the connections of subscribers that fell off the
//! ring are closed (they are what holds it).
//!
//! A subscriber whose cursor falls off the ring is handled by the slow-subscriber
//! policy: skip ahead and report `missed` (gap), end the stream (disconnect), or,
//! in block mode, the ring may not drop what it has not read, so publishers wait
//! (that is the TCP backpressure) until it catches up or is cut after
//! `--block-timeout`. Per-channel bookkeeping (for exact `missed` counts of
//! filtered subscribers) exists only for channels some subscriber filters on.

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
use tokio_util::sync::CancellationToken;

use crate::{
    log::Log,
    metrics::Metrics,
    wire::{ChannelFilter, EncodedPackets, SequenceHint, SequencedBatch},
};

/// How often a publisher held back by the log writer looks again.
const WRITER_RECHECK: Duration = Duration::from_secs(1);

/// What happens to a subscriber that falls further behind than the hub retains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SlowSubscriberPolicy {
    /// Skip to the oldest retained packet and report the loss in `missed`.
    Gap,
    /// End the stream with `RESOURCE_EXHAUSTED`.
    Disconnect,
    /// Lossless: publishers wait until the slowest subscriber catches up.
    Block,
    /// With `--data-dir` (its default): a subscriber that falls off the ring
    /// reads on from the log and rejoins live; nobody waits for it.
    CatchUp,
}

#[derive(Clone, Debug)]
pub struct HubConfig {
    /// Packets kept for replay and lagging subscribers: max(--history, --subscriber-buffer).
    pub retain_packets: u64,
    /// Bytes kept for the same plus what stalled deliveries hold, whichever limit is hit first.
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
    #[error("subscriber stopped reading while the data it had not read passed half of --memory-limit; resubscribe from the last sequence seen")]
    HoldingMemory,
    #[error("the log cannot be read ({0}); resubscribe from the last sequence seen")]
    LogUnreadable(std::io::ErrorKind),
    #[error("the server is shutting down")]
    ShuttingDown,
}

impl SubscriptionEnd {
    pub fn reason(&self) -> &'static str {
        match self {
            SubscriptionEnd::Lagged { .. } => "lagged",
            SubscriptionEnd::Stuck(_) => "block_timeout",
            SubscriptionEnd::HoldingMemory => "memory",
            SubscriptionEnd::LogUnreadable(_) => "log_unreadable",
            SubscriptionEnd::ShuttingDown => "shutdown",
        }
    }
}

/// What a subscriber learns when it asks for more.
#[derive(Debug)]
pub enum Next {
    Delivery(crate::wire::Delivery),
    /// Nothing arrived for the heartbeat interval.
    Idle,
    End(SubscriptionEnd),
}

/// A subscriber's position, visible to publishers.
#[derive(Debug)]
struct Slot {
    cursor: AtomicU64,
    /// Set when the hub cut this subscriber; it ends at its next read.
    ended: Mutex<Option<SubscriptionEnd>>,
    kicked: AtomicBool,
    /// Closes the subscriber's connection: the only way to free what a stream
    /// that is not being read holds in the HTTP/2 layer.
    close_connection: Option<CancellationToken>,
    /// Who this is and what it reads, for the console.
    label: Option<Arc<str>>,
    filter: ChannelFilter,
    /// Its last delivery came from the log, at `progressed_ms` (ms since
    /// the hub started): a catch-up reader that is reading holds log reads
    /// (their own budget), not ring memory, and is not cut for the ring's.
    reading_log: AtomicBool,
    progressed_ms: AtomicU64,
}

/// A catch-up reader that delivered within this long counts as reading.
const READING_RECENTLY: Duration = Duration::from_secs(1);

impl Slot {
    fn new(
        cursor: u64,
        close_connection: Option<CancellationToken>,
        label: Option<Arc<str>>,
        filter: ChannelFilter,
    ) -> Slot {
        Slot {
            cursor: AtomicU64::new(cursor),
            ended: Mutex::new(None),
            kicked: AtomicBool::new(false),
            close_connection,
            label,
            filter,
            reading_log: AtomicBool::new(false),
            progressed_ms: AtomicU64::new(0),
        }
    }

    fn end(&self, why: SubscriptionEnd) -> bool {
        let first = !self.kicked.swap(true, Ordering::AcqRel);
        if first {
            let mut ended = self.ended.lock().unwrap_or_else(|p| p.into_inner());
            *ended = Some(why);
        }
        first
    }

    fn end_reason(&self) -> Option<SubscriptionEnd> {
        if !self.kicked.load(Ordering::Acquire) {
            return None;
        }
        *self.ended.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct Stored {
    batch: Arc<SequencedBatch>,
    bytes: usize,
}

/// Counts for one channel some subscriber filters on.
#[derive(Debug, Default)]
struct Watch {
    subscribers: usize,
    /// Packets of this channel evicted from the ring since it was first watched.
    evicted: u64,
}

struct Ring {
    batches: VecDeque<Stored>,
    /// One past the newest sequence assigned.
    next_sequence: u64,
    /// One past the newest sequence subscribers may read: `next_sequence` in
    /// memory mode, what the log writer has written with `--data-dir`.
    visible_end: u64,
    /// The log writer's position: the ring never drops what it has not written.
    writer: Option<Arc<Slot>>,
    retained_packets: u64,
    retained_bytes: usize,
    /// Evicted batches that some delivery still holds, charged until released.
    pinned: Vec<Stored>,
    pinned_bytes: usize,
    slots: Vec<Arc<Slot>>,
    closed: bool,
    watched: HashMap<u32, Watch>,
}

impl Ring {
    fn oldest_sequence(&self) -> u64 {
        self.batches
            .front()
            .map_or(self.next_sequence, |stored| stored.batch.first_sequence)
    }

    /// The log writer's cursor, if there is a log.
    fn writer_cursor(&self) -> Option<u64> {
        self.writer
            .as_ref()
            .map(|writer| writer.cursor.load(Ordering::Acquire))
    }

    /// Cursor of the slowest subscriber that still counts in block mode.
    /// With a log, subscribers replaying from it (behind the ring) do not:
    /// they read from disk, and holding producers for them would stop ingest
    /// for as long as any client takes to replay. (Without a log nobody is
    /// behind the ring but across a gap in the numbering, cluster mode's
    /// deleted messages, and that subscriber still counts.)
    fn slowest_live_cursor(&self) -> Option<u64> {
        self.slots
            .iter()
            .filter(|slot| !slot.kicked.load(Ordering::Relaxed))
            .map(|slot| slot.cursor.load(Ordering::Acquire))
            .filter(|cursor| !self.replaying_from_log(*cursor))
            .min()
    }

    /// A subscriber at `cursor` is behind the ring and there is a log: it
    /// reads from disk (block mode neither waits for it nor cuts it).
    fn replaying_from_log(&self, cursor: u64) -> bool {
        self.writer.is_some() && cursor < self.oldest_sequence()
    }

    fn evicted_matching(&self, filter: &ChannelFilter) -> u64 {
        filter.channels().map_or(0, |channels| {
            channels
                .iter()
                .filter_map(|channel| self.watched.get(channel))
                .map(|watch| watch.evicted)
                .sum()
        })
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

    /// Drops pinned batches no delivery holds any more.
    fn release_pinned(&mut self) {
        if self.pinned.is_empty() {
            return;
        }
        let mut released = 0;
        self.pinned.retain(|stored| {
            let held = stored.batch.is_referenced_elsewhere();
            if !held {
                released += stored.bytes;
            }
            held
        });
        self.pinned_bytes -= released;
    }

    fn count_evicted(&mut self, batch: &SequencedBatch) {
        if self.watched.is_empty() {
            return;
        }
        for index in 0..batch.len() {
            if let Some(watch) = self.watched.get_mut(&batch.channel(index).0) {
                watch.evicted += 1;
            }
        }
    }
}

/// A snapshot for `StreamInfo` and the console.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HubStats {
    pub oldest_sequence: u64,
    pub next_sequence: u64,
    pub retained_packets: u64,
    pub retained_bytes: u64,
    pub pinned_bytes: u64,
    pub oldest_received_unix_nanos: i64,
    pub subscribers: u64,
}

/// Shared by ingest connections, Publish streams and Subscribe streams.
pub struct Hub {
    ring: Mutex<Ring>,
    /// The end of what subscribers may read (`Ring::visible_end`); its changes
    /// wake subscribers.
    head: watch::Sender<u64>,
    /// The next sequence to be assigned; wakes the log writer.
    assigned: watch::Sender<u64>,
    /// One past the newest sequence made durable (acknowledgements wait on
    /// it): published in memory mode, fsynced per policy with a log.
    durable: watch::Sender<u64>,
    log: Option<Arc<Log>>,
    /// Woken whenever a subscriber advances or leaves (block mode waits on it).
    progress: Notify,
    /// When the hub started (slot progress times count from it).
    started: Instant,
    /// Publishers wait for the log writer's fsync (see `want_sync`).
    sync_wanted: Notify,
    sync_wanted_flag: AtomicBool,
    config: HubConfig,
    metrics: Arc<Metrics>,
    sequence_hint: SequenceHint,
    /// Bytes read from the log that subscribers hold (catch-up read-ahead):
    /// each read is sized so that together they stay within half of
    /// `--memory-limit` (see `Subscription::take_from_disk`).
    disk_read_bytes: std::sync::atomic::AtomicUsize,
}

impl Hub {
    pub fn new(config: HubConfig, metrics: Arc<Metrics>) -> Arc<Self> {
        Self::starting_at(config, metrics, 1)
    }

    /// A hub whose first packet gets `next_sequence` (cluster mode continues
    /// the JetStream stream's numbering).
    pub fn starting_at(config: HubConfig, metrics: Arc<Metrics>, next_sequence: u64) -> Arc<Self> {
        Self::build(config, metrics, next_sequence, None)
    }

    /// A hub whose batches are written to `log` before subscribers see them;
    /// numbering continues from the log's end. Run `persist::write_log` with
    /// the log's writer.
    pub fn with_log(
        config: HubConfig,
        metrics: Arc<Metrics>,
        log: Arc<Log>,
        next_sequence: u64,
    ) -> Arc<Self> {
        Self::build(config, metrics, next_sequence, Some(log))
    }

    fn build(
        config: HubConfig,
        metrics: Arc<Metrics>,
        next_sequence: u64,
        log: Option<Arc<Log>>,
    ) -> Arc<Self> {
        let writer = log.as_ref().map(|_| {
            Arc::new(Slot::new(
                next_sequence,
                None,
                None,
                ChannelFilter::default(),
            ))
        });
        Arc::new(Hub {
            ring: Mutex::new(Ring {
                batches: VecDeque::new(),
                next_sequence,
                visible_end: next_sequence,
                writer,
                retained_packets: 0,
                retained_bytes: 0,
                pinned: Vec::new(),
                pinned_bytes: 0,
                slots: Vec::new(),
                closed: false,
                watched: HashMap::new(),
            }),
            head: watch::Sender::new(next_sequence),
            assigned: watch::Sender::new(next_sequence),
            durable: watch::Sender::new(next_sequence),
            log,
            progress: Notify::new(),
            started: Instant::now(),
            sync_wanted: Notify::new(),
            sync_wanted_flag: AtomicBool::new(false),
            config,
            metrics,
            sequence_hint: {
                let hint = SequenceHint::default();
                hint.set(next_sequence);
                hint
            },
            disk_read_bytes: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// The next sequence, readable by the verification pool without locking.
    pub fn sequence_hint(&self) -> SequenceHint {
        self.sequence_hint.clone()
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
        *self.assigned.borrow()
    }

    /// One past the newest sequence made durable; changes as it advances.
    pub fn durable(&self) -> watch::Receiver<u64> {
        self.durable.subscribe()
    }

    pub fn log(&self) -> Option<&Arc<Log>> {
        self.log.as_ref()
    }

    pub fn stats(&self) -> HubStats {
        let mut ring = self.lock();
        ring.release_pinned();
        HubStats {
            oldest_sequence: ring.oldest_sequence(),
            next_sequence: ring.next_sequence,
            retained_packets: ring.retained_packets,
            retained_bytes: ring.retained_bytes as u64,
            pinned_bytes: ring.pinned_bytes as u64,
            oldest_received_unix_nanos: ring
                .batches
                .front()
                .map_or(0, |stored| stored.batch.received_unix_nanos()),
            subscribers: ring.slots.len() as u64,
        }
    }

    /// Every subscriber's position, the furthest behind first; at most `limit` of them.
    pub fn subscriber_positions(&self, limit: usize) -> Vec<SubscriberPosition> {
        let ring = self.lock();
        let next = ring.next_sequence;
        let mut positions: Vec<SubscriberPosition> = ring
            .slots
            .iter()
            .map(|slot| {
                let cursor = slot.cursor.load(Ordering::Acquire);
                SubscriberPosition {
                    label: slot.label.clone(),
                    channels: slot.filter.shared_channels(),
                    cursor,
                    lag: next.saturating_sub(cursor),
                }
            })
            .collect();
        drop(ring);
        positions.sort_by_key(|position| std::cmp::Reverse(position.lag));
        positions.truncate(limit);
        positions
    }

    /// Numbers a verified batch, appends it and returns the sequences it got.
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
                let block_slowest = match self.config.policy {
                    SlowSubscriberPolicy::Block if !ring.closed => ring.slowest_live_cursor(),
                    _ => None,
                };
                let writer = ring.writer_cursor();
                // The ring keeps what the slowest (block mode) has not read
                // and what the log writer has not written.
                let protect = match (block_slowest, writer) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                if protect.is_none_or(|cursor| self.has_room(&ring, cursor, count, bytes)) {
                    let Some(packets) = packets.take() else {
                        unreachable!("packets are taken exactly once, on the way out")
                    };
                    let range = self.append(&mut ring, first_sequence, packets, bytes, protect);
                    let visible = ring.writer.is_none();
                    drop(ring);
                    // Publishers race to here; the watches only ever move forward.
                    let advance = |watch: &watch::Sender<u64>| {
                        watch.send_if_modified(|end| {
                            let advanced = *end < range.end;
                            *end = (*end).max(range.end);
                            advanced
                        });
                    };
                    advance(&self.assigned);
                    if visible {
                        advance(&self.head);
                        advance(&self.durable);
                    }
                    return range;
                }
                // Held back by the log writer (a slow or failing disk, or
                // batches waiting for their fsync): wait for it below,
                // nobody is cut for it.
                if writer
                    .is_some_and(|writer| block_slowest.is_none_or(|slowest| writer <= slowest))
                {
                    self.want_sync();
                }
                let slowest =
                    block_slowest.filter(|slowest| writer.is_none_or(|writer| *slowest < writer));
                if let Some(slowest) = slowest {
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
                } else {
                    blocked = None;
                }
            }
            let remaining = match blocked {
                Some((since, _)) => self.config.block_timeout.saturating_sub(since.elapsed()),
                None => WRITER_RECHECK,
            };
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
            let cursor = slot.cursor.load(Ordering::Acquire);
            // Subscribers replaying from the log are not what holds producers.
            if cursor <= stuck_at
                && !ring.replaying_from_log(cursor)
                && slot.end(SubscriptionEnd::Stuck(self.config.block_timeout))
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
        let batch = Arc::new(packets.stamp(first));
        ring.next_sequence = batch.end_sequence();
        if ring.writer.is_none() {
            ring.visible_end = ring.next_sequence;
        }
        self.sequence_hint.set(ring.next_sequence);
        ring.retained_packets += batch.len() as u64;
        ring.retained_bytes += bytes;
        ring.batches.push_back(Stored { batch, bytes });
        ring.release_pinned();
        // Oldest first: over the byte limit (pinned deliveries included), or
        // more packets than needed for the retention count. Block mode never
        // drops what a live subscriber has not read yet.
        while let Some(front) = ring.batches.front() {
            let front_len = front.batch.len() as u64;
            // Catch-up reads from the log count too: all of it is one limit.
            let held = ring.retained_bytes
                + ring.pinned_bytes
                + self.disk_read_bytes.load(Ordering::Acquire);
            let over_bytes = held > self.config.memory_limit;
            let over_count = ring.retained_packets - front_len >= self.config.retain_packets;
            let unread = protect_from.is_some_and(|cursor| front.batch.end_sequence() > cursor);
            if !(over_bytes || over_count) || unread || ring.batches.len() == 1 {
                break;
            }
            let Some(evicted) = ring.batches.pop_front() else {
                break;
            };
            ring.retained_bytes -= evicted.bytes;
            ring.retained_packets -= front_len;
            ring.count_evicted(&evicted.batch);
            if evicted.batch.is_referenced_elsewhere() {
                ring.pinned_bytes += evicted.bytes;
                ring.pinned.push(evicted);
            }
        }
        if ring.pinned_bytes > self.config.memory_limit / 2 {
            self.close_laggards(ring);
        }
        self.metrics
            .hub_retained_bytes
            .set(ring.retained_bytes as i64);
        self.metrics
            .hub_retained_packets
            .set(ring.retained_packets as i64);
        self.metrics.hub_pinned_bytes.set(ring.pinned_bytes as i64);
        first..ring.next_sequence
    }

    /// Pinned deliveries passed half the memory limit: close the connections
    /// of subscribers that fell off the ring, which are what holds them.
    fn close_laggards(&self, ring: &Ring) {
        let oldest = ring.oldest_sequence();
        let now = self.elapsed_ms();
        for slot in &ring.slots {
            let reading_log = slot.reading_log.load(Ordering::Acquire)
                && now.saturating_sub(slot.progressed_ms.load(Ordering::Acquire))
                    < READING_RECENTLY.as_millis() as u64;
            if slot.cursor.load(Ordering::Acquire) < oldest
                && !reading_log
                && slot.end(SubscriptionEnd::HoldingMemory)
            {
                if let Some(close) = &slot.close_connection {
                    close.cancel();
                }
                // Counted here: a closed connection's stream never reports its end.
                self.metrics.subscribers_disconnected.add(
                    SubscriptionEnd::HoldingMemory.reason(),
                    1,
                    0,
                );
                tracing::warn!(
                    pinned_bytes = ring.pinned_bytes,
                    "closing the connection of a subscriber that stopped reading while holding memory"
                );
            }
        }
    }

    /// The log writer's view: batches numbered but not yet written, from
    /// `from`, about `max_bytes` of them.
    pub fn unwritten(&self, from: u64, max_bytes: usize) -> Vec<Arc<SequencedBatch>> {
        let ring = self.lock();
        let start = ring
            .batches
            .partition_point(|stored| stored.batch.end_sequence() <= from);
        let mut bytes = 0;
        let mut batches = Vec::new();
        for stored in ring.batches.range(start..) {
            if bytes >= max_bytes {
                break;
            }
            bytes += stored.bytes;
            batches.push(Arc::clone(&stored.batch));
        }
        batches
    }

    /// Waits until something at or after `from` is numbered (for the writer).
    pub async fn wait_assigned(&self, from: u64) {
        let mut assigned = self.assigned.subscribe();
        let _ = assigned.wait_for(|next| *next > from).await;
    }

    /// The log writer has written everything below `end`: subscribers may
    /// read it.
    pub fn mark_written(&self, end: u64) {
        let mut ring = self.lock();
        ring.visible_end = ring.visible_end.max(end);
        drop(ring);
        self.head.send_if_modified(|head| {
            let advanced = *head < end;
            *head = (*head).max(end);
            advanced
        });
    }

    /// Everything below `end` is durable (per `--fsync`): acknowledgements
    /// may go out, and the ring may drop it (until then a failed fsync may
    /// need it written again).
    pub fn mark_durable(&self, end: u64) {
        if let Some(writer) = &self.lock().writer {
            writer.cursor.store(end, Ordering::Release);
        }
        self.durable.send_if_modified(|durable| {
            let advanced = *durable < end;
            *durable = (*durable).max(end);
            advanced
        });
        self.progress.notify_waiters();
    }

    fn elapsed_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Publishers are held back by batches not yet durable: the log writer
    /// should fsync now rather than at its interval.
    fn want_sync(&self) {
        self.sync_wanted_flag.store(true, Ordering::Release);
        self.sync_wanted.notify_one();
    }

    /// Waits until a publisher asks for an early fsync (for the log writer).
    pub async fn sync_wanted(&self) {
        self.sync_wanted.notified().await;
    }

    /// Whether a publisher asked for an early fsync since the last call.
    pub fn take_sync_wanted(&self) -> bool {
        self.sync_wanted_flag.swap(false, Ordering::AcqRel)
    }

    /// Starts a subscription: live from now, or replay from `from_sequence` then live.
    pub fn subscribe(
        self: &Arc<Self>,
        filter: ChannelFilter,
        from_sequence: Option<u64>,
    ) -> Result<Subscription, SubscribeError> {
        self.subscribe_with(SubscribeOptions {
            filter,
            from_sequence,
            ..SubscribeOptions::default()
        })
    }

    /// `subscribe` with every option.
    pub fn subscribe_with(
        self: &Arc<Self>,
        options: SubscribeOptions,
    ) -> Result<Subscription, SubscribeError> {
        let SubscribeOptions {
            filter,
            from_sequence,
            replay_elsewhere,
            close_connection,
            label,
        } = options;
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
                let on_disk = self.log.as_ref().map(|log| log.first_sequence());
                match (requested < oldest, on_disk, replay_elsewhere) {
                    (false, _, _) => (requested, 0),
                    // Replayed from the log; only what retention deleted is missed.
                    (true, Some(first), _) => {
                        let cursor = requested.max(first).min(oldest);
                        (cursor, cursor - requested)
                    }
                    (true, None, true) => (oldest, 0),
                    (true, None, false) => (oldest, oldest - requested),
                }
            }
        };
        let replaying = cursor < oldest;
        // A filtered subscriber counts its channels' packets below its cursor,
        // so a later lag can be reported exactly (see `Subscription::take`):
        // evictions counted so far, plus the retained ones below the cursor,
        // which are counted after the lock is released.
        let (evicted_before, retained_before) = match filter.channels() {
            None => (0, Vec::new()),
            Some(channels) => {
                for channel in channels {
                    ring.watched.entry(*channel).or_default().subscribers += 1;
                }
                let below: Vec<Arc<SequencedBatch>> = ring
                    .batches
                    .iter()
                    .take_while(|stored| stored.batch.first_sequence < cursor)
                    .map(|stored| Arc::clone(&stored.batch))
                    .collect();
                (ring.evicted_matching(&filter), below)
            }
        };
        let slot = Arc::new(Slot::new(cursor, close_connection, label, filter.clone()));
        ring.slots.push(Arc::clone(&slot));
        drop(ring);
        let matched_before_cursor =
            evicted_before + count_matching_below(&retained_before, &filter, cursor);
        self.metrics.subscribers.inc();
        if missed > 0 {
            self.metrics.packets_missed.inc_by(missed);
        }
        Ok(Subscription {
            hub: Arc::clone(self),
            slot,
            cursor,
            replaying,
            disk: VecDeque::new(),
            disk_charge: None,
            read_ahead: None,
            log_exhausted_at: None,
            pending_missed: missed,
            matched_before_cursor,
            filter,
            head: self.head.subscribe(),
            whole_batches: false,
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

/// How a subscription starts.
#[derive(Debug, Default)]
pub struct SubscribeOptions {
    pub filter: ChannelFilter,
    pub from_sequence: Option<u64>,
    /// A `from_sequence` older than what is retained starts at the oldest
    /// retained packet *without* counting the rest as missed: the caller
    /// replays them from elsewhere (cluster mode, the disk log).
    pub replay_elsewhere: bool,
    /// The subscriber's connection, closed if it holds memory it will not read.
    pub close_connection: Option<CancellationToken>,
    /// Who subscribes (`grpc/ADDR`, `console/ADDR`), shown by the console.
    pub label: Option<Arc<str>>,
}

/// One subscriber as the console shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubscriberPosition {
    pub label: Option<Arc<str>>,
    /// The channels it filters on; `None` is every channel.
    pub channels: Option<Arc<[u32]>>,
    /// The next sequence the hub will hand it.
    pub cursor: u64,
    /// Sequences assigned that the hub has not handed it yet (the stream's
    /// own buffers may hold more it has not read).
    pub lag: u64,
}

/// Packets of `filter`'s channels with a sequence below `cursor`.
fn count_matching_below(
    batches: &[Arc<SequencedBatch>],
    filter: &ChannelFilter,
    cursor: u64,
) -> u64 {
    let mut count = 0;
    for batch in batches {
        let end = (cursor.saturating_sub(batch.first_sequence)).min(batch.len() as u64);
        count += (0..end as usize)
            .filter(|index| filter.matches(batch.channel(*index)))
            .count() as u64;
    }
    count
}

pub mod persist;
mod subscription;
pub use subscription::Subscription;

#[cfg(test)]
mod tests;
