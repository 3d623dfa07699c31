//! The ingest memory budget: bytes read from producers and not yet in the hub.
//!
//! Partial frames on TCP connections, partial messages on Publish streams, and
//! batches waiting for or in verification all draw from one byte budget
//! (`--ingest-buffer`). A producer that cannot get budget stops reading its
//! socket or stream, so TCP (or HTTP/2) flow control paces it, and nothing it
//! sends is lost; `--frame-timeout` ends connections that hold budget for a
//! frame they never finish. Once a batch is in the hub, the hub's
//! `--memory-limit` accounts for it and the budget is returned.
//!
//! A tokio `Semaphore` with one permit per byte does the bookkeeping: waiting
//! is FIFO, so a large frame is not starved by a stream of small ones. A
//! quarter of the budget is a reserve that only reads starting with no
//! unfinished frame may take, so unfinished frames (however many) never keep
//! a producer of small, whole frames from being read.
//!
//! Partial frames are what hostile producers hold: a thousand connections
//! that each send all but the last byte of a large frame would otherwise
//! keep the budget until `--frame-timeout`, and every honest producer would
//! wait as long. So a producer that has waited `EVICT_AFTER_WAIT` for budget
//! closes the connection that has been *stalled* longest: one that holds an
//! unfinished frame and on which the server has been reading, with nothing
//! arriving, for at least `STALE_PARTIAL`. A producer the server itself holds
//! back (a full pipeline, block mode) is not reading, so it is never taken
//! for stalled. When unfinished frames hold most of the budget and their
//! connections all wait for more of it, none can finish and none is
//! reading: then the frame that started first, on a connection that has
//! waited `STALE_PARTIAL`, gives way. At most one connection is closed per
//! `EVICT_AFTER_WAIT`. Connections register their unfinished frame with
//! [`IngestBudget::hold_partial`] and mark their reads with
//! [`PartialFrame::reading`].

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// How long a producer waits for budget before it evicts a stalled frame.
const EVICT_AFTER_WAIT: Duration = Duration::from_millis(100);
/// An unfinished frame younger than this is never evicted.
pub const STALE_PARTIAL: Duration = Duration::from_secs(1);

/// One unfinished frame's state, shared with its connection.
#[derive(Debug)]
struct PartialState {
    started: Instant,
    /// Since when the connection has been waiting for the client's bytes
    /// (budget granted, read outstanding); `None` while it is not reading.
    reading_since: Mutex<Option<Instant>>,
    /// Since when it has been waiting for budget to read more of the frame.
    waiting_since: Mutex<Option<Instant>>,
    /// Budget the connection holds for it.
    bytes: std::sync::atomic::AtomicUsize,
    close: CancellationToken,
}

/// Unfinished frames (or Publish messages) holding budget, by registration.
#[derive(Debug, Default)]
struct Partials {
    next_id: u64,
    open: HashMap<u64, Arc<PartialState>>,
    last_eviction: Option<Instant>,
}

/// The shared budget. Cheap to clone.
#[derive(Clone, Debug)]
pub struct IngestBudget {
    /// Most of the budget; unfinished frames draw only from here.
    semaphore: Arc<Semaphore>,
    /// A quarter kept for reads that start with no unfinished frame.
    reserve: Arc<Semaphore>,
    reserve_total: usize,
    total: usize,
    metrics: Arc<Metrics>,
    partials: Arc<Mutex<Partials>>,
}

/// An unfinished frame's registration; dropping it unregisters.
#[derive(Debug)]
pub struct PartialFrame {
    partials: Arc<Mutex<Partials>>,
    id: u64,
    state: Arc<PartialState>,
}

impl PartialFrame {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Marks the connection as waiting for the client's bytes until the
    /// guard drops (the read returned, or was given up).
    pub fn reading(&self) -> ReadingGuard {
        set(&self.state.reading_since, Some(Instant::now()));
        ReadingGuard(Arc::clone(&self.state))
    }

    /// The budget the connection holds for this frame now.
    pub fn set_bytes(&self, bytes: usize) {
        self.state
            .bytes
            .store(bytes, std::sync::atomic::Ordering::Relaxed);
    }
}

/// While it lives, the frame's connection waits for budget.
struct WaitingGuard(Arc<PartialState>);

impl Drop for WaitingGuard {
    fn drop(&mut self) {
        set(&self.0.waiting_since, None);
    }
}

fn set(slot: &Mutex<Option<Instant>>, value: Option<Instant>) {
    *slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = value;
}

/// While it lives, the connection is reading (see `PartialFrame::reading`).
#[derive(Debug)]
pub struct ReadingGuard(Arc<PartialState>);

impl Drop for ReadingGuard {
    fn drop(&mut self) {
        set(&self.0.reading_since, None);
    }
}

impl Drop for PartialFrame {
    fn drop(&mut self) {
        self.partials
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .open
            .remove(&self.id);
    }
}

impl IngestBudget {
    pub fn new(total: usize, metrics: Arc<Metrics>) -> Self {
        let total = total.min(Semaphore::MAX_PERMITS);
        let reserve_total = total / 4;
        IngestBudget {
            semaphore: Arc::new(Semaphore::new(total - reserve_total)),
            reserve: Arc::new(Semaphore::new(reserve_total)),
            reserve_total,
            total,
            metrics,
            partials: Arc::default(),
        }
    }

    /// Registers an unfinished frame; `close` closes its connection if it
    /// is evicted as stalled.
    pub fn hold_partial(&self, close: CancellationToken) -> PartialFrame {
        let mut partials = self
            .partials
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let id = partials.next_id;
        partials.next_id += 1;
        let state = Arc::new(PartialState {
            started: Instant::now(),
            reading_since: Mutex::new(None),
            waiting_since: Mutex::new(None),
            bytes: std::sync::atomic::AtomicUsize::new(0),
            close,
        });
        partials.open.insert(id, Arc::clone(&state));
        PartialFrame {
            partials: Arc::clone(&self.partials),
            id,
            state,
        }
    }

    /// Closes one connection to free budget for a waiting producer: the one
    /// stalled longest in a read (at least `STALE_PARTIAL`), or, when
    /// unfinished frames hold more than half the budget, the oldest frame
    /// whose connection has waited for budget at least `STALE_PARTIAL`.
    /// Never `except`; at most one per `EVICT_AFTER_WAIT`.
    fn evict_for_waiter(&self, except: Option<u64>) -> bool {
        let mut partials = self
            .partials
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = Instant::now();
        if partials
            .last_eviction
            .is_some_and(|last| now.duration_since(last) < EVICT_AFTER_WAIT)
        {
            return false;
        }
        let stale_since = |slot: &Mutex<Option<Instant>>| {
            let since = (*slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))?;
            (now.duration_since(since) >= STALE_PARTIAL).then_some(since)
        };
        let candidates = || {
            partials
                .open
                .iter()
                .filter(|(id, state)| Some(**id) != except && !state.close.is_cancelled())
        };
        let stalled = candidates()
            .filter_map(|(id, state)| Some((*id, stale_since(&state.reading_since)?)))
            .min_by_key(|(_, since)| *since)
            .map(|(id, _)| (id, "stalled in the middle of a frame"));
        let held: usize = partials
            .open
            .values()
            .map(|state| state.bytes.load(std::sync::atomic::Ordering::Relaxed))
            .sum();
        let deadlocked = || {
            (held > self.total / 2)
                .then(|| {
                    candidates()
                        .filter(|(_, state)| stale_since(&state.waiting_since).is_some())
                        .min_by_key(|(_, state)| state.started)
                        .map(|(id, _)| (*id, "oldest of the unfinished frames holding the budget"))
                })
                .flatten()
        };
        let Some((id, why)) = stalled.or_else(deadlocked) else {
            return false;
        };
        if let Some(state) = partials.open.remove(&id) {
            state.close.cancel();
            self.metrics.protocol_errors.add("frame_evicted", 1, 0);
            tracing::info!(
                frame_age = ?now.duration_since(state.started),
                "ingest budget exhausted; closing a connection: {why}"
            );
        }
        partials.last_eviction = Some(now);
        true
    }

    /// Bytes currently charged, all producers together.
    pub fn in_use(&self) -> usize {
        self.total
            .saturating_sub(self.semaphore.available_permits() + self.reserve.available_permits())
    }

    fn publish_gauge(&self) {
        self.metrics.ingest_buffered_bytes.set(self.in_use() as i64);
    }

    /// An empty charge, to grow as bytes arrive.
    pub fn charge(&self) -> Charge {
        Charge {
            budget: self.clone(),
            main: Part::default(),
            reserve: Part::default(),
        }
    }
}

/// Permits of one semaphore and how many bytes they stand for.
#[derive(Debug, Default)]
struct Part {
    permit: Option<OwnedSemaphorePermit>,
    bytes: usize,
}

impl Part {
    fn add(&mut self, permit: OwnedSemaphorePermit, bytes: usize) {
        match &mut self.permit {
            Some(held) => held.merge(permit),
            None => self.permit = Some(permit),
        }
        self.bytes += bytes;
    }

    fn split(&mut self, bytes: usize) -> Part {
        let bytes = bytes.min(self.bytes);
        let permit = if bytes == 0 {
            None
        } else if bytes == self.bytes {
            self.permit.take()
        } else {
            self.permit.as_mut().and_then(|held| held.split(bytes))
        };
        self.bytes -= bytes;
        Part { permit, bytes }
    }
}

/// Bytes one producer (or one batch) holds of the budget; returned on drop.
#[derive(Debug)]
pub struct Charge {
    budget: IngestBudget,
    main: Part,
    /// Taken from the reserve (reads that start with no unfinished frame).
    reserve: Part,
}

impl Charge {
    pub fn bytes(&self) -> usize {
        self.main.bytes + self.reserve.bytes
    }

    /// Grows the charge by `bytes`, waiting for budget to be returned; while
    /// it waits, stalled producers other than `own` may be evicted (see the
    /// module doc). With `may_reserve` (a read that starts a frame, or
    /// finishes a small one) the reserve serves too, so large unfinished
    /// frames cannot starve producers of small ones. Cancel-safe.
    pub async fn grow(&mut self, bytes: usize, may_reserve: bool, own: Option<&PartialFrame>) {
        if bytes == 0 {
            return;
        }
        let main_total = self.budget.total - self.budget.reserve_total;
        let wanted = bytes.min(main_total).min(u32::MAX as usize) as u32;
        let main = Arc::clone(&self.budget.semaphore).acquire_many_owned(wanted);
        tokio::pin!(main);
        let may_reserve = may_reserve && (wanted as usize) <= self.budget.reserve_total;
        let reserve = Arc::clone(&self.budget.reserve).acquire_many_owned(wanted);
        tokio::pin!(reserve);
        let _waiting = own.map(|frame| {
            set(&frame.state.waiting_since, Some(Instant::now()));
            WaitingGuard(Arc::clone(&frame.state))
        });
        loop {
            // The semaphores are never closed, so acquiring only waits.
            tokio::select! {
                permit = &mut main => {
                    if let Ok(permit) = permit {
                        self.main.add(permit, wanted as usize);
                    }
                    break;
                }
                permit = &mut reserve, if may_reserve => {
                    if let Ok(permit) = permit {
                        self.reserve.add(permit, wanted as usize);
                    }
                    break;
                }
                _ = tokio::time::sleep(EVICT_AFTER_WAIT) => {
                    self.budget.evict_for_waiter(own.map(PartialFrame::id));
                }
            }
        }
        self.budget.publish_gauge();
    }

    /// Grows the charge by `bytes` if the budget has them now (the reserve
    /// too with `may_reserve`, as in `grow`).
    pub fn try_grow(&mut self, bytes: usize, may_reserve: bool) -> bool {
        if bytes == 0 {
            return true;
        }
        let Ok(wanted) = u32::try_from(bytes) else {
            return false;
        };
        if let Ok(permit) = Arc::clone(&self.budget.semaphore).try_acquire_many_owned(wanted) {
            self.main.add(permit, bytes);
        } else if let Some(permit) = may_reserve
            .then(|| {
                Arc::clone(&self.budget.reserve)
                    .try_acquire_many_owned(wanted)
                    .ok()
            })
            .flatten()
        {
            self.reserve.add(permit, bytes);
        } else {
            return false;
        }
        self.budget.publish_gauge();
        true
    }

    /// Moves `bytes` of this charge into a new one (e.g. from a connection's
    /// read buffer to the batch its frames went into); reserve bytes first,
    /// so the reserve comes back as soon as batches are published.
    pub fn split_off(&mut self, bytes: usize) -> Charge {
        let reserve = self.reserve.split(bytes);
        let main = self.main.split(bytes - reserve.bytes);
        Charge {
            budget: self.budget.clone(),
            main,
            reserve,
        }
    }

    /// Returns all but `keep` bytes to the budget.
    pub fn shrink_to(&mut self, keep: usize) {
        if keep < self.bytes() {
            drop(self.split_off(self.bytes() - keep));
        }
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        if self.main.permit.take().is_some() | self.reserve.permit.take().is_some() {
            self.budget.publish_gauge();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn charges_move_between_holders_and_return_on_drop() {
        // 750 bytes of main budget, 250 of reserve.
        let budget = IngestBudget::new(1000, Metrics::new());
        let mut connection = budget.charge();
        assert!(connection.try_grow(600, false));
        assert!(!budget.charge().try_grow(300, false), "main has 150 left");
        assert!(!budget.charge().try_grow(300, true), "the reserve has 250");
        let mut fresh = budget.charge();
        assert!(fresh.try_grow(200, true), "a fresh read takes the reserve");
        assert_eq!(budget.in_use(), 800);
        drop(fresh);
        let batch = connection.split_off(400);
        assert_eq!((connection.bytes(), batch.bytes()), (200, 400));
        assert_eq!(budget.in_use(), 600);
        drop(batch);
        assert_eq!(budget.in_use(), 200);
        connection.shrink_to(50);
        assert_eq!(budget.in_use(), 50);
        let all = connection.split_off(50);
        assert_eq!(connection.bytes(), 0);
        drop(all);
        assert_eq!(budget.in_use(), 0);
    }

    #[tokio::test]
    async fn a_waiting_grow_completes_when_budget_returns() {
        let budget = IngestBudget::new(1000, Metrics::new());
        let mut first = budget.charge();
        first.grow(600, true, None).await;
        let mut second = budget.charge();
        let waiting = tokio::spawn(async move {
            second.grow(300, true, None).await;
            second.bytes()
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(first);
        assert_eq!(waiting.await.expect("task"), 300);
    }

    #[tokio::test]
    async fn unfinished_frames_cannot_take_the_reserve() {
        let budget = IngestBudget::new(1000, Metrics::new());
        let mut hog = budget.charge();
        hog.grow(750, true, None).await;
        let partial = budget.hold_partial(CancellationToken::new());
        let mut unfinished = budget.charge();
        assert!(!unfinished.try_grow(100, false));
        let started = tokio::time::timeout(
            Duration::from_millis(50),
            unfinished.grow(100, false, Some(&partial)),
        )
        .await;
        assert!(
            started.is_err(),
            "an unfinished frame waits for the main budget"
        );
        let mut fresh = budget.charge();
        fresh.grow(100, true, None).await;
        assert_eq!(fresh.bytes(), 100);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_producer_evicts_the_connection_stalled_longest() {
        let budget = IngestBudget::new(1000, Metrics::new());
        let (old, young) = (CancellationToken::new(), CancellationToken::new());
        let held_back = CancellationToken::new();
        let mut old_charge = budget.charge();
        old_charge.grow(400, true, None).await;
        let old_frame = budget.hold_partial(old.clone());
        let _old_reading = old_frame.reading();
        // Holds budget but the server is not reading it: never "stalled".
        let mut held_charge = budget.charge();
        held_charge.grow(200, true, None).await;
        let _held_frame = budget.hold_partial(held_back.clone());
        tokio::time::advance(STALE_PARTIAL * 2).await;
        let mut young_charge = budget.charge();
        young_charge.grow(100, true, None).await;
        let young_frame = budget.hold_partial(young.clone());
        let _young_reading = young_frame.reading();
        let mut waiter = budget.charge();
        let waiting = tokio::spawn(async move {
            waiter.grow(300, true, None).await;
            waiter.bytes()
        });
        // The waiter closes the old frame's connection; its charge goes with it.
        while !old.is_cancelled() {
            tokio::time::advance(EVICT_AFTER_WAIT).await;
        }
        assert!(!young.is_cancelled(), "a recent read is never evicted");
        assert!(
            !held_back.is_cancelled(),
            "a producer the server holds back is not stalled"
        );
        drop(old_charge);
        assert_eq!(waiting.await.expect("task"), 300);
    }
}
