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
//! is FIFO, so a large frame is not starved by a stream of small ones.
//!
//! Partial frames are what hostile producers hold: a thousand connections
//! that each send all but the last byte of a large frame would otherwise
//! keep the budget until `--frame-timeout`, and every honest producer would
//! wait as long. So a producer that has waited `EVICT_AFTER_WAIT` for budget
//! closes the connection whose unfinished frame is oldest (if it is older
//! than `STALE_PARTIAL`): honest frames complete in milliseconds, stalled
//! ones are the oldest. Connections register their unfinished frame with
//! [`IngestBudget::hold_partial`] for this.

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

/// Unfinished frames (or Publish messages) holding budget, by registration.
#[derive(Debug, Default)]
struct Partials {
    next_id: u64,
    open: HashMap<u64, (Instant, CancellationToken)>,
}

/// The shared budget. Cheap to clone.
#[derive(Clone, Debug)]
pub struct IngestBudget {
    semaphore: Arc<Semaphore>,
    total: usize,
    metrics: Arc<Metrics>,
    partials: Arc<Mutex<Partials>>,
}

/// An unfinished frame's registration; dropping it unregisters.
#[derive(Debug)]
pub struct PartialFrame {
    partials: Arc<Mutex<Partials>>,
    id: u64,
}

impl PartialFrame {
    pub fn id(&self) -> u64 {
        self.id
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
        IngestBudget {
            semaphore: Arc::new(Semaphore::new(total.min(Semaphore::MAX_PERMITS))),
            total,
            metrics,
            partials: Arc::default(),
        }
    }

    /// Registers an unfinished frame that started at `started`; `close`
    /// closes its connection if it is evicted.
    pub fn hold_partial(&self, started: Instant, close: CancellationToken) -> PartialFrame {
        let mut partials = self
            .partials
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let id = partials.next_id;
        partials.next_id += 1;
        partials.open.insert(id, (started, close));
        PartialFrame {
            partials: Arc::clone(&self.partials),
            id,
        }
    }

    /// Closes the connection holding the oldest stale unfinished frame
    /// (other than `except`). True if one was closed.
    fn evict_oldest_partial(&self, except: Option<u64>) -> bool {
        let mut partials = self
            .partials
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = Instant::now();
        let oldest = partials
            .open
            .iter()
            .filter(|(id, (started, close))| {
                Some(**id) != except
                    && !close.is_cancelled()
                    && now.duration_since(*started) >= STALE_PARTIAL
            })
            .min_by_key(|(_, (started, _))| *started)
            .map(|(id, _)| *id);
        let Some(id) = oldest else {
            return false;
        };
        if let Some((started, close)) = partials.open.remove(&id) {
            close.cancel();
            self.metrics.protocol_errors.add("frame_evicted", 1, 0);
            tracing::info!(
                age = ?now.duration_since(started),
                "ingest budget exhausted; closing the connection with the oldest unfinished frame"
            );
        }
        true
    }

    pub fn total(&self) -> usize {
        self.total
    }

    /// Bytes currently charged, all producers together.
    pub fn in_use(&self) -> usize {
        self.total
            .saturating_sub(self.semaphore.available_permits())
    }

    fn publish_gauge(&self) {
        self.metrics.ingest_buffered_bytes.set(self.in_use() as i64);
    }

    /// An empty charge, to grow as bytes arrive.
    pub fn charge(&self) -> Charge {
        Charge {
            budget: self.clone(),
            permit: None,
            bytes: 0,
        }
    }
}

/// Bytes one producer (or one batch) holds of the budget; returned on drop.
#[derive(Debug)]
pub struct Charge {
    budget: IngestBudget,
    permit: Option<OwnedSemaphorePermit>,
    bytes: usize,
}

impl Charge {
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    fn add(&mut self, permit: OwnedSemaphorePermit, bytes: usize) {
        match &mut self.permit {
            Some(held) => held.merge(permit),
            None => self.permit = Some(permit),
        }
        self.bytes += bytes;
        self.budget.publish_gauge();
    }

    /// Grows the charge by `bytes`, waiting for budget to be returned; while
    /// it waits, stale unfinished frames of other producers (not `own`) are
    /// evicted, oldest first. Cancel-safe.
    pub async fn grow(&mut self, bytes: usize, own: Option<&PartialFrame>) {
        if bytes == 0 {
            return;
        }
        let wanted = bytes.min(self.budget.total).min(u32::MAX as usize);
        let acquire = Arc::clone(&self.budget.semaphore).acquire_many_owned(wanted as u32);
        tokio::pin!(acquire);
        loop {
            tokio::select! {
                permit = &mut acquire => {
                    // The semaphore is never closed, so acquiring only waits.
                    if let Ok(permit) = permit {
                        self.add(permit, wanted);
                    }
                    return;
                }
                _ = tokio::time::sleep(EVICT_AFTER_WAIT) => {
                    self.budget.evict_oldest_partial(own.map(PartialFrame::id));
                }
            }
        }
    }

    /// Grows the charge by `bytes` if the budget has them now.
    pub fn try_grow(&mut self, bytes: usize) -> bool {
        if bytes == 0 {
            return true;
        }
        let Ok(wanted) = u32::try_from(bytes) else {
            return false;
        };
        match Arc::clone(&self.budget.semaphore).try_acquire_many_owned(wanted) {
            Ok(permit) => {
                self.add(permit, bytes);
                true
            }
            Err(_) => false,
        }
    }

    /// Moves `bytes` of this charge into a new one (e.g. from a connection's
    /// read buffer to the batch its frames went into).
    pub fn split_off(&mut self, bytes: usize) -> Charge {
        let bytes = bytes.min(self.bytes);
        let permit = if bytes == 0 {
            None
        } else if bytes == self.bytes {
            self.permit.take()
        } else {
            self.permit.as_mut().and_then(|held| held.split(bytes))
        };
        self.bytes -= bytes;
        Charge {
            budget: self.budget.clone(),
            permit,
            bytes,
        }
    }

    /// Returns all but `keep` bytes to the budget.
    pub fn shrink_to(&mut self, keep: usize) {
        if keep < self.bytes {
            drop(self.split_off(self.bytes - keep));
        }
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            drop(permit);
            self.budget.publish_gauge();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn charges_move_between_holders_and_return_on_drop() {
        let budget = IngestBudget::new(1000, Metrics::new());
        let mut connection = budget.charge();
        assert!(connection.try_grow(600));
        assert!(!budget.charge().try_grow(500));
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
        let budget = IngestBudget::new(100, Metrics::new());
        let mut first = budget.charge();
        first.grow(80, None).await;
        let mut second = budget.charge();
        let waiting = tokio::spawn(async move {
            second.grow(50, None).await;
            second.bytes()
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(first);
        assert_eq!(waiting.await.expect("task"), 50);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_producer_evicts_the_oldest_stale_partial_frame() {
        let budget = IngestBudget::new(100, Metrics::new());
        let (old, young) = (CancellationToken::new(), CancellationToken::new());
        let mut old_charge = budget.charge();
        old_charge.grow(60, None).await;
        let _old_frame = budget.hold_partial(Instant::now(), old.clone());
        tokio::time::advance(STALE_PARTIAL * 2).await;
        let mut young_charge = budget.charge();
        young_charge.grow(40, None).await;
        let _young_frame = budget.hold_partial(Instant::now(), young.clone());
        let mut waiter = budget.charge();
        let waiting = tokio::spawn(async move {
            waiter.grow(30, None).await;
            waiter.bytes()
        });
        // The waiter closes the old frame's connection; its charge goes with it.
        while !old.is_cancelled() {
            tokio::time::advance(EVICT_AFTER_WAIT).await;
        }
        assert!(!young.is_cancelled(), "a young frame is never evicted");
        drop(old_charge);
        assert_eq!(waiting.await.expect("task"), 30);
    }
}
