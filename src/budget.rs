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

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::Metrics;

/// The shared budget. Cheap to clone.
#[derive(Clone, Debug)]
pub struct IngestBudget {
    semaphore: Arc<Semaphore>,
    total: usize,
    metrics: Arc<Metrics>,
}

impl IngestBudget {
    pub fn new(total: usize, metrics: Arc<Metrics>) -> Self {
        IngestBudget {
            semaphore: Arc::new(Semaphore::new(total.min(Semaphore::MAX_PERMITS))),
            total,
            metrics,
        }
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

    /// Grows the charge by `bytes`, waiting for budget to be returned.
    pub async fn grow(&mut self, bytes: usize) {
        if bytes == 0 {
            return;
        }
        let wanted = bytes.min(self.budget.total).min(u32::MAX as usize);
        // The semaphore is never closed, so acquiring only waits.
        if let Ok(permit) = Arc::clone(&self.budget.semaphore)
            .acquire_many_owned(wanted as u32)
            .await
        {
            self.add(permit, wanted);
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
        first.grow(80).await;
        let mut second = budget.charge();
        let waiting = tokio::spawn(async move {
            second.grow(50).await;
            second.bytes()
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(first);
        assert_eq!(waiting.await.expect("task"), 50);
    }
}
