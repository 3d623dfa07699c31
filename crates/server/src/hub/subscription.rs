//! A subscriber's side of the hub: its cursor into the shared ring, how it
//! takes what is ready (filtered, size-capped, with lag handled by the
//! slow-subscriber policy), and the clean-up when the client goes away.
//!
//! A delivery is built from slices of the ring's batches (one per run of
//! packets the filter takes), so nothing is copied per subscriber.
//!
//! Behind the ring (with `--data-dir`) it reads the log in large sequential
//! reads on a blocking thread, and starts the next read as soon as the
//! previous one is taken, so that sending one read overlaps reading the
//! next (when the shared read allowance has room for both).

use std::{
    collections::VecDeque,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use tokio::sync::watch;

use super::{Hub, Next, Slot, SlowSubscriberPolicy, SubscriptionEnd};
use crate::{
    log::LogRead,
    wire::{ChannelFilter, Delivery, SequencedBatch},
};

/// One subscriber's cursor into the hub. Dropping it releases everything at once.
pub struct Subscription {
    pub(super) hub: Arc<Hub>,
    pub(super) slot: Arc<Slot>,
    pub(super) cursor: u64,
    /// Still replaying from before the ring (from the log): lag policies do
    /// not apply until it reaches the ring.
    pub(super) replaying: bool,
    /// Batches read ahead from the log (large sequential reads).
    pub(super) disk: VecDeque<Arc<SequencedBatch>>,
    /// What `disk` is charged to the read allowance.
    pub(super) disk_charge: Option<ReadCharge>,
    /// The log read that continues `disk`, running while `disk` is sent.
    pub(super) read_ahead: Option<ReadAhead>,
    /// A log read from this cursor found nothing and skipped nothing (only a
    /// damaged log does that): do not ask the log again for it.
    pub(super) log_exhausted_at: Option<u64>,
    pub(super) pending_missed: u64,
    /// Filtered subscribers: packets of their channels with sequence < cursor
    /// (counted from when the hub started watching those channels).
    pub(super) matched_before_cursor: u64,
    pub(super) filter: ChannelFilter,
    pub(super) head: watch::Receiver<u64>,
    /// One batch per delivery where a whole batch is ready, so that a
    /// compressed batch is shared by every subscriber (`--compression`).
    pub(super) whole_batches: bool,
}

/// A log read started before it is needed.
pub(super) struct ReadAhead {
    /// The sequence it reads from: `disk`'s end when it started.
    pub(super) from: u64,
    read: tokio::task::JoinHandle<FinishedRead>,
}

/// A log read's result and its charge, back from the blocking thread.
type FinishedRead = (std::io::Result<LogRead>, ReadCharge);

/// Bytes of log reads charged to `Hub::disk_read_bytes` (which ring
/// eviction counts against `--memory-limit`), returned when dropped. A
/// read's charge goes with it to its blocking thread and back, so a read that
/// outlives its subscriber (gone mid-read) stays charged until it is done.
pub(super) struct ReadCharge {
    hub: Arc<Hub>,
    bytes: usize,
}

impl ReadCharge {
    /// Takes a read's size from the shared allowance (half of
    /// `--memory-limit`): `size` picks it from the room left (0: no read).
    fn reserve(hub: &Arc<Hub>, size: impl Fn(usize) -> usize) -> ReadCharge {
        let allowance = hub.config.memory_limit / 2;
        let mut in_use = hub.disk_read_bytes.load(Ordering::Acquire);
        loop {
            let bytes = size(allowance.saturating_sub(in_use));
            match hub.disk_read_bytes.compare_exchange_weak(
                in_use,
                in_use + bytes,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    return ReadCharge {
                        hub: Arc::clone(hub),
                        bytes,
                    }
                }
                Err(now) => in_use = now,
            }
        }
    }

    /// The charge becomes what the read took.
    fn settle(&mut self, actual: usize) {
        if actual >= self.bytes {
            self.hub
                .disk_read_bytes
                .fetch_add(actual - self.bytes, Ordering::AcqRel);
        } else {
            self.hub
                .disk_read_bytes
                .fetch_sub(self.bytes - actual, Ordering::AcqRel);
        }
        self.bytes = actual;
    }
}

impl Drop for ReadCharge {
    fn drop(&mut self) {
        self.hub
            .disk_read_bytes
            .fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// Reads the log from `from` on a blocking thread, as much as `charge` allows.
fn spawn_log_read(
    log: Arc<crate::log::Log>,
    from: u64,
    charge: ReadCharge,
) -> tokio::task::JoinHandle<FinishedRead> {
    let size = charge.bytes;
    tokio::task::spawn_blocking(move || (log.read(from, size), charge))
}

enum Take {
    Ready(Delivery),
    Empty,
    End(SubscriptionEnd),
    /// Behind the ring: read from the log.
    Disk,
}

/// Bytes one read from the log asks for (read-ahead) when memory allows.
const DISK_READ: usize = 4 << 20;
/// The smallest read, however many subscribers are catching up.
const MIN_DISK_READ: usize = 64 << 10;
/// Reading ahead is optional: only while the allowance has this much room.
const MIN_READ_AHEAD: usize = 256 << 10;

impl Subscription {
    /// The next batch for this subscriber, or `Idle` if none came within
    /// `heartbeat` (counted from this call, i.e. from the previous response, so
    /// packets this subscriber filters out do not postpone its heartbeat).
    pub async fn next(&mut self, heartbeat: Duration) -> Next {
        let deadline = tokio::time::Instant::now() + heartbeat;
        loop {
            self.head.borrow_and_update();
            match self.take() {
                Take::Ready(delivery) => return Next::Delivery(delivery),
                Take::End(end) => return Next::End(end),
                Take::Disk => match self.take_from_disk().await {
                    Ok(Some(delivery)) => return Next::Delivery(delivery),
                    // A filtered catch-up can read far without a match: the
                    // heartbeat still goes out on time.
                    Ok(None) if tokio::time::Instant::now() >= deadline => return Next::Idle,
                    Ok(None) => continue,
                    Err(end) => return Next::End(end),
                },
                Take::Empty => {}
            }
            match tokio::time::timeout_at(deadline, self.head.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Next::End(SubscriptionEnd::ShuttingDown),
                Err(_) => return Next::Idle,
            }
        }
    }

    /// Takes what is ready without waiting; skips packets the filter excludes.
    fn take(&mut self) -> Take {
        let max_bytes = self.hub.config.max_delivery_bytes;
        loop {
            // Whether moving on may let a held publisher in (block mode): not
            // while this subscriber is at or past what the log writer has
            // made durable, since the ring holds everything from there on
            // anyway. Waking publishers that wait for an fsync at every
            // delivery: in 3 of 10 full-speed runs (1 KiB, `--data-dir`) the
            // server fell to ~485 k pkts/s at 2.6–2.8 µs a packet, against
            // 2.0–2.3 µs otherwise; none did without those wake-ups.
            let may_free_room;
            let batches = {
                let ring = self.hub.lock();
                if let Some(end) = self.slot.end_reason() {
                    return Take::End(end);
                }
                may_free_room = ring
                    .writer_cursor()
                    .is_none_or(|durable| self.cursor < durable);
                let oldest = ring.oldest_sequence();
                // In block mode only a subscriber replaying from before the
                // ring is ever behind it (producers wait for live ones).
                let catch_up = self.replaying
                    || matches!(
                        self.hub.config.policy,
                        SlowSubscriberPolicy::CatchUp | SlowSubscriberPolicy::Block
                    );
                if self.cursor < oldest
                    && catch_up
                    && self.hub.log.is_some()
                    && self.log_exhausted_at != Some(self.cursor)
                {
                    return Take::Disk;
                }
                if self.cursor >= oldest
                    && (!self.disk.is_empty()
                        || self.disk_charge.is_some()
                        || self.read_ahead.is_some())
                {
                    // Back on the ring: what was read ahead is not needed.
                    self.disk.clear();
                    self.disk_charge = None;
                    if let Some(ahead) = self.read_ahead.take() {
                        ahead.read.abort();
                    }
                }
                if self.replaying && self.cursor >= oldest {
                    // Back from the log: count this filter's packets afresh.
                    self.replaying = false;
                    if self.filter.channels().is_some() {
                        let below: Vec<Arc<SequencedBatch>> = ring
                            .batches
                            .iter()
                            .take_while(|stored| stored.batch.first_sequence < self.cursor)
                            .map(|stored| Arc::clone(&stored.batch))
                            .collect();
                        self.matched_before_cursor = ring.evicted_matching(&self.filter)
                            + super::count_matching_below(&below, &self.filter, self.cursor);
                    }
                }
                if self.cursor < oldest {
                    let behind = ring.next_sequence - self.cursor;
                    if self.hub.config.policy == SlowSubscriberPolicy::Disconnect {
                        return Take::End(SubscriptionEnd::Lagged {
                            behind,
                            retained: ring.retained_packets,
                        });
                    }
                    let lost = match self.filter.channels() {
                        None => oldest - self.cursor,
                        Some(_) => {
                            let evicted = ring.evicted_matching(&self.filter);
                            let lost = evicted.saturating_sub(self.matched_before_cursor);
                            self.matched_before_cursor = evicted;
                            lost
                        }
                    };
                    self.pending_missed += lost;
                    self.hub.metrics.packets_missed.inc_by(lost);
                    self.cursor = oldest;
                }
                if self.cursor >= ring.visible_end {
                    return match ring.closed {
                        true => Take::End(SubscriptionEnd::ShuttingDown),
                        false => Take::Empty,
                    };
                }
                // Clone the few batches this response can use; the exact walk
                // (filter, size cap) happens after the lock is released.
                let cursor = self.cursor;
                let start = ring
                    .batches
                    .partition_point(|stored| stored.batch.end_sequence() <= cursor);
                let mut approx = 0;
                let mut batches = Vec::new();
                for stored in ring.batches.range(start..) {
                    if approx >= max_bytes || stored.batch.first_sequence >= ring.visible_end {
                        break;
                    }
                    approx += stored.bytes;
                    batches.push(Arc::clone(&stored.batch));
                }
                batches
            };
            let received = batches
                .first()
                .map_or(0, |batch| batch.received_unix_nanos());
            let delivery = self.collect(batches, max_bytes);
            if delivery.is_some() && received != 0 {
                self.hub
                    .metrics
                    .batch_age
                    .taken
                    .observe(crate::metrics::age_seconds(received));
            }
            self.slot.cursor.store(self.cursor, Ordering::Release);
            self.slot.reading_log.store(false, Ordering::Release);
            if self.hub.config.policy == SlowSubscriberPolicy::Block && may_free_room {
                self.hub.progress.notify_waiters();
            }
            if let Some(delivery) = delivery {
                return Take::Ready(delivery);
            }
        }
    }

    /// The next delivery from the log (reading when its buffer is empty, and
    /// reading ahead while it is sent). `None` when the batches read held
    /// nothing for this filter.
    async fn take_from_disk(&mut self) -> Result<Option<Delivery>, SubscriptionEnd> {
        while self
            .disk
            .front()
            .is_some_and(|batch| batch.end_sequence() <= self.cursor)
        {
            self.disk.pop_front();
        }
        if self.disk.is_empty() {
            self.disk_charge = None;
            let Some(log) = self.hub.log.clone() else {
                return Ok(None);
            };
            let from = self.cursor;
            let finished = match self.read_ahead.take() {
                Some(ahead) if ahead.from == from => ahead.read.await,
                stale => {
                    if let Some(stale) = stale {
                        stale.read.abort();
                    }
                    // Stalled catch-up streams keep what they read, and the
                    // memory ring does not see it: reads share half of
                    // --memory-limit, so many catch-up subscribers get smaller
                    // reads, not more memory (but always one). Reserved before
                    // reading, so concurrent readers cannot take the same room.
                    let charge =
                        ReadCharge::reserve(&self.hub, |room| room.clamp(MIN_DISK_READ, DISK_READ));
                    spawn_log_read(log, from, charge).await
                }
            };
            let Ok((read, mut charge)) = finished else {
                return Err(SubscriptionEnd::LogUnreadable(std::io::ErrorKind::Other));
            };
            let read = match read {
                Ok(read) => read,
                Err(error) => {
                    tracing::error!(%error, from, "cannot read the log for a subscriber");
                    return Err(SubscriptionEnd::LogUnreadable(error.kind()));
                }
            };
            // The reservation becomes what was read.
            charge.settle(read.batches.iter().map(|batch| batch.body().len()).sum());
            self.disk_charge = Some(charge);
            if read.skipped > 0 {
                self.pending_missed += read.skipped;
                self.hub.metrics.packets_missed.inc_by(read.skipped);
            }
            if read.batches.is_empty() {
                // Skipped ahead, or the log holds nothing more: the ring has it.
                self.cursor = self.cursor.max(read.resume_at);
                if read.resume_at == from {
                    self.replaying = false;
                    self.log_exhausted_at = Some(from);
                }
                self.slot.cursor.store(self.cursor, Ordering::Release);
                return Ok(None);
            }
            self.disk.extend(read.batches.into_iter().map(Arc::new));
        }
        self.start_read_ahead();
        let batches: Vec<Arc<SequencedBatch>> = self.disk.iter().cloned().collect();
        let delivery = self.collect(batches, self.hub.config.max_delivery_bytes);
        self.slot.cursor.store(self.cursor, Ordering::Release);
        self.slot
            .progressed_ms
            .store(self.hub.elapsed_ms(), Ordering::Release);
        self.slot.reading_log.store(true, Ordering::Release);
        Ok(delivery)
    }

    /// Starts reading what follows `disk` from the log, if it is not in the
    /// ring (the ring takes over there) and the read allowance has room.
    fn start_read_ahead(&mut self) {
        if self.read_ahead.is_some() {
            return;
        }
        let (Some(log), Some(last)) = (self.hub.log.clone(), self.disk.back()) else {
            return;
        };
        let from = last.end_sequence();
        if from >= self.hub.lock().oldest_sequence() {
            return;
        }
        // Optional: under memory pressure a reader reads only when it must.
        let charge = ReadCharge::reserve(&self.hub, |room| match room >= MIN_READ_AHEAD {
            true => room.min(DISK_READ),
            false => 0,
        });
        if charge.bytes > 0 {
            self.read_ahead = Some(ReadAhead {
                from,
                read: spawn_log_read(log, from, charge),
            });
        }
    }

    /// Delivers whole batches one at a time where it can (for compressed
    /// streams: each batch is then compressed once for all of them).
    pub fn deliver_whole_batches(&mut self) {
        self.whole_batches = true;
    }

    /// Walks `batches` from the cursor, up to `max_bytes` of matching packets.
    fn collect(&mut self, batches: Vec<Arc<SequencedBatch>>, max_bytes: usize) -> Option<Delivery> {
        let mut delivery = Delivery::default();
        for batch in batches {
            // Sequences between batches that were never assigned are skipped, not missed.
            self.cursor = self.cursor.max(batch.first_sequence);
            let start = (self.cursor - batch.first_sequence) as usize;
            let (end, full) = match self.filter.channels() {
                None => take_all(&batch, start, max_bytes, &mut delivery),
                Some(_) => take_matching(&batch, start, &self.filter, max_bytes, &mut delivery),
            };
            self.cursor = batch.first_sequence + end as u64;
            if full || (self.whole_batches && delivery.is_whole_batch()) {
                break;
            }
        }
        let matched = delivery.packets() as u64;
        self.matched_before_cursor += matched;
        if matched == 0 {
            return None;
        }
        self.hub.metrics.packets_delivered.inc_by(matched);
        delivery.missed = std::mem::take(&mut self.pending_missed);
        Some(delivery)
    }

    /// Packets lost but not yet reported (reported with the next delivery).
    pub fn pending_missed(&self) -> u64 {
        self.pending_missed
    }

    /// The sequence this subscription will deliver next.
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    pub fn filter(&self) -> &ChannelFilter {
        &self.filter
    }
}

/// Unfiltered: one slice from `start`, as many packets as fit in `max_bytes`
/// (at least one). Returns the end index and whether the delivery is full.
fn take_all(
    batch: &Arc<SequencedBatch>,
    start: usize,
    max_bytes: usize,
    delivery: &mut Delivery,
) -> (usize, bool) {
    if start == 0 && delivery.packets() == 0 && batch.body().len() <= max_bytes {
        delivery.push_whole(batch);
        return (batch.len(), false);
    }
    let room = max_bytes.saturating_sub(delivery.records_len());
    let mut end = batch.packets_within(start, room);
    if end == start && delivery.records_len() == 0 && start < batch.len() {
        end = start + 1; // one packet always goes, whatever its size
    }
    delivery.push(batch.records(start..end), end - start);
    (end, end < batch.len())
}

/// Filtered: one slice per run of matching packets from `start`.
fn take_matching(
    batch: &SequencedBatch,
    start: usize,
    filter: &ChannelFilter,
    max_bytes: usize,
    delivery: &mut Delivery,
) -> (usize, bool) {
    let mut index = start;
    let mut run: Option<usize> = None;
    let mut run_bytes = 0;
    let mut full = false;
    while index < batch.len() {
        if filter.matches(batch.channel(index)) {
            let len = batch.record_len(index);
            if delivery.records_len() + run_bytes + len > max_bytes
                && delivery.records_len() + run_bytes > 0
            {
                full = true;
                break;
            }
            run_bytes += len;
            run.get_or_insert(index);
        } else if let Some(run_start) = run.take() {
            delivery.push(batch.records(run_start..index), index - run_start);
            run_bytes = 0;
        }
        index += 1;
    }
    if let Some(run_start) = run {
        delivery.push(batch.records(run_start..index), index - run_start);
    }
    (index, full)
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.disk_charge = None;
        // Not started yet: never starts. Running: its charge comes back
        // when it is done.
        if let Some(ahead) = self.read_ahead.take() {
            ahead.read.abort();
        }
        let mut ring = self.hub.lock();
        ring.slots.retain(|slot| !Arc::ptr_eq(slot, &self.slot));
        if let Some(channels) = self.filter.channels() {
            for channel in channels {
                if let Some(watch) = ring.watched.get_mut(channel) {
                    watch.subscribers -= 1;
                    if watch.subscribers == 0 {
                        ring.watched.remove(channel);
                    }
                }
            }
        }
        drop(ring);
        self.hub.metrics.subscribers.dec();
        self.hub.progress.notify_waiters();
    }
}
