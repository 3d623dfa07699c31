//! What a TCP listener lets clients hold: connection slots, accept back-off
//! and the process's open-file limit.
//!
//! Each listener (ingest, gRPC, admin HTTP) admits at most its cap of
//! connections. A newcomer is accepted, then waits for a slot while the ones
//! after it wait in the kernel's accept queue, so a full house is
//! backpressure (as in mini-redis) — except that a waiting newcomer makes the
//! connection that has been idle longest (nothing received, nothing in
//! progress, for at least `EVICTABLE_AFTER`) give way. A thousand squatters
//! therefore cannot keep out a producer or a health probe: they lose their
//! slots to it, while clients that are doing something keep theirs, and
//! nobody is evicted while nobody is waiting. Accept errors (EMFILE, ENFILE, ENOMEM) back off exponentially
//! instead of spinning, and the soft open-file limit is raised to the hard
//! one at start.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

/// A connection idle for less than this is never evicted.
pub const EVICTABLE_AFTER: Duration = Duration::from_secs(1);
/// How often a full listener looks again for a connection to evict.
const RECHECK: Duration = Duration::from_millis(100);
const BACKOFF_START: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Activity of one admitted connection, as the eviction policy sees it.
#[derive(Debug)]
pub struct Activity {
    /// Milliseconds since the slots' epoch when the connection last did something.
    last_active_ms: AtomicU64,
    /// Requests (gRPC) or waits on the server (ingest) in progress.
    busy: AtomicUsize,
    /// Cancelled to close the connection (eviction, or a hub that needs the
    /// memory its stalled stream holds).
    close: CancellationToken,
    epoch: Instant,
}

impl Activity {
    pub fn touch(&self) {
        self.last_active_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Marks the connection busy until the guard drops (it is then touched).
    pub fn busy(self: &Arc<Self>) -> BusyGuard {
        self.busy.fetch_add(1, Ordering::AcqRel);
        BusyGuard(Arc::clone(self))
    }

    /// Resolves when the server wants this connection closed.
    pub fn closed(&self) -> WaitForCancellationFuture<'_> {
        self.close.cancelled()
    }

    /// A handle that closes this connection.
    pub fn closer(&self) -> CancellationToken {
        self.close.clone()
    }

    fn idle_for(&self, now_ms: u64) -> Option<u64> {
        if self.busy.load(Ordering::Acquire) > 0 || self.close.is_cancelled() {
            return None;
        }
        Some(now_ms.saturating_sub(self.last_active_ms.load(Ordering::Relaxed)))
    }
}

/// Keeps a connection from being evicted while it lives.
#[derive(Debug)]
pub struct BusyGuard(Arc<Activity>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.touch();
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The slots of one listener.
#[derive(Debug)]
pub struct ConnectionSlots {
    what: &'static str,
    limit: usize,
    permits: Arc<Semaphore>,
    open: Mutex<HashMap<u64, Arc<Activity>>>,
    next_id: AtomicU64,
    epoch: Instant,
}

/// An admitted connection's slot; dropping it frees the slot.
#[derive(Debug)]
pub struct ConnectionSlot {
    slots: Arc<ConnectionSlots>,
    id: u64,
    activity: Arc<Activity>,
    _permit: OwnedSemaphorePermit,
}

impl ConnectionSlot {
    pub fn activity(&self) -> &Arc<Activity> {
        &self.activity
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.slots
            .open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&self.id);
    }
}

impl ConnectionSlots {
    pub fn new(what: &'static str, limit: usize) -> Arc<Self> {
        Arc::new(ConnectionSlots {
            what,
            limit,
            permits: Arc::new(Semaphore::new(limit)),
            open: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            epoch: Instant::now(),
        })
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn open(&self) -> usize {
        self.limit - self.permits.available_permits()
    }

    /// Waits for a free slot, evicting the longest-idle connection when full.
    /// `None` once `stop` fires. `on_evict` is told about each eviction.
    pub async fn admit(
        self: &Arc<Self>,
        stop: &CancellationToken,
        on_evict: impl Fn(),
    ) -> Option<ConnectionSlot> {
        loop {
            if stop.is_cancelled() {
                return None;
            }
            if let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() {
                return Some(self.register(permit));
            }
            if self.evict_longest_idle() {
                on_evict();
            }
            tokio::select! {
                permit = Arc::clone(&self.permits).acquire_owned() => {
                    // The semaphore is never closed.
                    if let Ok(permit) = permit {
                        return Some(self.register(permit));
                    }
                }
                _ = tokio::time::sleep(RECHECK) => {}
                _ = stop.cancelled() => return None,
            }
        }
    }

    /// A slot now if one is free; when all are taken, evicts the one idle
    /// longest (if any is idle long enough) and waits up to `wait` for its
    /// slot. `None` means refuse the newcomer.
    pub async fn try_admit(self: &Arc<Self>, wait: Duration) -> Option<ConnectionSlot> {
        if let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() {
            return Some(self.register(permit));
        }
        if !self.evict_longest_idle() {
            return None;
        }
        let permit = tokio::time::timeout(wait, Arc::clone(&self.permits).acquire_owned())
            .await
            .ok()?
            .ok()?;
        Some(self.register(permit))
    }

    fn register(self: &Arc<Self>, permit: OwnedSemaphorePermit) -> ConnectionSlot {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let activity = Arc::new(Activity {
            last_active_ms: AtomicU64::new(self.epoch.elapsed().as_millis() as u64),
            busy: AtomicUsize::new(0),
            close: CancellationToken::new(),
            epoch: self.epoch,
        });
        self.open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(id, Arc::clone(&activity));
        ConnectionSlot {
            slots: Arc::clone(self),
            id,
            activity,
            _permit: permit,
        }
    }

    /// Closes the connection idle longest, if one has been idle long enough.
    fn evict_longest_idle(&self) -> bool {
        let now_ms = self.epoch.elapsed().as_millis() as u64;
        let open = self
            .open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let longest = open
            .values()
            .filter_map(|activity| Some((activity.idle_for(now_ms)?, activity)))
            .max_by_key(|(idle, _)| *idle);
        match longest {
            Some((idle, activity)) if idle >= EVICTABLE_AFTER.as_millis() as u64 => {
                tracing::info!(
                    listener = self.what,
                    idle_ms = idle,
                    limit = self.limit,
                    "all connection slots taken; closing the connection idle longest"
                );
                activity.close.cancel();
                true
            }
            _ => false,
        }
    }
}

/// `accept` that backs off on errors instead of spinning: running out of file
/// descriptors makes every call fail at once until one is closed.
pub struct Acceptor {
    listener: TcpListener,
    what: &'static str,
    backoff: Duration,
}

impl Acceptor {
    pub fn new(listener: TcpListener, what: &'static str) -> Self {
        Acceptor {
            listener,
            what,
            backoff: BACKOFF_START,
        }
    }

    pub async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            match self.listener.accept().await {
                Ok(accepted) => {
                    self.backoff = BACKOFF_START;
                    return accepted;
                }
                // The peer gave up before we accepted: nothing to wait for.
                Err(error)
                    if matches!(
                        error.kind(),
                        std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::ConnectionReset
                    ) => {}
                Err(error) => {
                    tracing::warn!(
                        listener = self.what,
                        %error,
                        backoff = ?self.backoff,
                        "accept failed; backing off"
                    );
                    tokio::time::sleep(self.backoff).await;
                    self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }
}

/// Raises the soft open-file limit to the hard one; returns the new soft limit.
pub fn raise_open_file_limit() -> Option<u64> {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => Some(limit),
        Err(error) => {
            tracing::warn!(%error, "cannot raise the open-file limit");
            rlimit::getrlimit(rlimit::Resource::NOFILE)
                .ok()
                .map(|(soft, _)| soft)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_full_listener_evicts_the_connection_idle_longest() {
        let slots = ConnectionSlots::new("test", 2);
        let stop = CancellationToken::new();
        let first = slots.admit(&stop, || {}).await.expect("slot");
        tokio::time::advance(Duration::from_millis(10)).await;
        let second = slots.admit(&stop, || {}).await.expect("slot");
        let _busy = second.activity().busy();
        assert_eq!(slots.open(), 2);
        // Nobody idle long enough yet: the newcomer waits.
        let pending = {
            let slots = Arc::clone(&slots);
            let stop = stop.clone();
            tokio::spawn(async move { slots.admit(&stop, || {}).await.map(|slot| slot.id) })
        };
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(!first.activity().close.is_cancelled());
        // Past EVICTABLE_AFTER the idle one (not the busy one) is closed.
        tokio::time::advance(EVICTABLE_AFTER).await;
        tokio::task::yield_now().await;
        assert!(first.activity().close.is_cancelled());
        assert!(!second.activity().close.is_cancelled());
        drop(first);
        assert!(pending.await.expect("task").is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn try_admit_refuses_when_nobody_is_idle_and_evicts_when_someone_is() {
        let slots = ConnectionSlots::new("test", 1);
        let held = slots.try_admit(Duration::ZERO).await.expect("free slot");
        assert!(slots.try_admit(Duration::from_secs(1)).await.is_none());
        tokio::time::advance(EVICTABLE_AFTER).await;
        let newcomer = {
            let slots = Arc::clone(&slots);
            tokio::spawn(async move { slots.try_admit(Duration::from_secs(1)).await.is_some() })
        };
        tokio::task::yield_now().await;
        assert!(held.activity().close.is_cancelled());
        drop(held);
        assert!(newcomer.await.expect("task"));
    }

    #[tokio::test]
    async fn admit_returns_none_once_stopped() {
        let slots = ConnectionSlots::new("test", 1);
        let stop = CancellationToken::new();
        let _held = slots.admit(&stop, || {}).await.expect("slot");
        stop.cancel();
        assert!(slots.admit(&stop, || {}).await.is_none());
    }
}
