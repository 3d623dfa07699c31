//! Packet verification and the ordered parallel stage that runs it off the reactor.
//!
//! `Verifier` checks one frame: SHA-256 (or HMAC-SHA256 with the deployment key)
//! over header bytes 0..12 and the payload, compared in constant time.
//! `OrderedPipeline` is how a connection uses it: batches of frames go to a
//! fixed pool of `verify-N` threads (never the tokio worker threads), up to a
//! bounded number in flight, and come back in submission order through
//! `FuturesOrdered`. The bound is the backpressure: a connection whose
//! pipeline is full stops reading its socket. Accepted packets leave here
//! already protobuf-encoded (see `wire`).
//!
//! The pool is a few threads on one job queue (a mutex, a condition variable
//! and a short spin; see `Workers`) rather than rayon's or a crossbeam
//! channel's: their idle threads spin in rounds of `sched_yield` before they
//! sleep. At a paced 50 k packets/s rayon's spinning was 45 % of the
//! server's CPU on 2 cores, and with crossbeam's shorter back-off the paced
//! p99 was still 1.2-1.6 ms against 0.6-0.9 ms with this queue (A/B on one
//! machine), the CPU taken from the reactor and the client. Nothing here
//! needs work stealing or scoped parallelism: each job is one independent
//! batch.

use std::{
    sync::{atomic::Ordering, Arc},
    time::Instant,
};

use futures::stream::{FuturesOrdered, StreamExt};
use tokio::sync::oneshot;

pub use packet_ingest_protocol::digest::{hmac_digest, Rejection, Verifier};

use crate::{
    budget::Charge,
    frame::Frame,
    wire::{EncodedPackets, EncodedPacketsBuilder, PacketFields, SequenceHint},
};

/// Frames of one source, in order, all completed by the same read.
#[derive(Debug, Default)]
pub struct FrameBatch {
    pub frames: Vec<Frame>,
    pub received_unix_nanos: i64,
    /// Ingest budget held for these bytes until they are published.
    pub charge: Option<Charge>,
    /// The batch's `verify_batch` trace span (`--otlp-endpoint`), from
    /// submission to verified; disabled (free) otherwise.
    pub span: Option<tracing::Span>,
}

impl FrameBatch {
    pub fn wire_bytes(&self) -> usize {
        self.frames.iter().map(Frame::wire_len).sum()
    }
}

/// Now, as `received_unix_nanos` carries it.
pub fn unix_nanos_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos() as i64)
}

/// The result of verifying one `FrameBatch`.
#[derive(Debug, Default)]
pub struct VerifiedBatch {
    pub accepted: EncodedPackets,
    pub accepted_bytes: u64,
    /// Rejections by `Rejection` index: (packets, wire bytes).
    pub rejected: [(u64, u64); 2],
    pub frames: u64,
    /// Time spent hashing and encoding this batch on the pool.
    pub verify_seconds: f64,
    /// `FrameBatch::received_unix_nanos`.
    pub received_unix_nanos: i64,
    /// The batch's age when a verify thread started on it.
    pub queued_seconds: f64,
    /// The batch's ingest budget, returned once it is published.
    pub charge: Option<Charge>,
    /// `FrameBatch::span`, ended when the batch is published.
    pub span: Option<tracing::Span>,
}

impl VerifiedBatch {
    pub fn rejected_packets(&self) -> u64 {
        self.rejected.iter().map(|(packets, _)| packets).sum()
    }

    pub fn rejected_for(&self, rejection: Rejection) -> (u64, u64) {
        self.rejected[rejection.index()]
    }
}

/// Verifies and encodes a batch. Runs on the pool; pure CPU work.
pub fn verify_batch(
    verifier: &Verifier,
    source: &str,
    first_source_sequence: u64,
    batch: &FrameBatch,
    expected_sequence: u64,
) -> VerifiedBatch {
    let started = Instant::now();
    let queued_seconds = crate::metrics::age_seconds(batch.received_unix_nanos);
    let estimated_body: usize = batch
        .frames
        .iter()
        .map(|frame| frame.payload.len() + source.len() + 64)
        .sum();
    let mut accepted =
        EncodedPacketsBuilder::with_capacity(batch.frames.len(), estimated_body, expected_sequence);
    let mut result = VerifiedBatch {
        frames: batch.frames.len() as u64,
        received_unix_nanos: batch.received_unix_nanos,
        queued_seconds,
        ..VerifiedBatch::default()
    };
    for (offset, frame) in batch.frames.iter().enumerate() {
        match verifier.check(frame) {
            Ok(()) => {
                result.accepted_bytes += frame.wire_len() as u64;
                accepted.push(&PacketFields {
                    channel: frame.channel(),
                    payload: &frame.payload,
                    digest: &frame.digest.0,
                    source,
                    source_sequence: first_source_sequence + offset as u64,
                    received_unix_nanos: batch.received_unix_nanos,
                });
            }
            Err(rejection) => {
                let slot = &mut result.rejected[rejection.index()];
                slot.0 += 1;
                slot.1 += frame.wire_len() as u64;
            }
        }
    }
    result.accepted = accepted.finish();
    result.verify_seconds = started.elapsed().as_secs_f64();
    result
}

type Job = Box<dyn FnOnce() + Send>;

/// A fixed set of named threads taking jobs from one queue. An idle thread
/// spins for a moment (`IDLE_SPIN`, on an atomic, never yielding), then parks
/// (a condition variable): queues that spin and `sched_yield` for longer
/// before parking (crossbeam's, rayon's) took, on two shared cores, the CPU
/// the reactor and the clients needed, which showed as latency tails; one
/// that parks at once pays a futex wake-up per batch at full speed. The
/// threads end when the last handle is dropped.
#[derive(Debug)]
struct Workers {
    queue: Arc<JobQueue>,
    threads: usize,
}

#[derive(Debug, Default)]
struct JobQueue {
    state: std::sync::Mutex<QueueState>,
    ready: std::sync::Condvar,
    /// Jobs in `state.jobs`, readable without the lock (for spinning).
    queued: std::sync::atomic::AtomicUsize,
}

/// How long an idle thread watches for the next job before parking: enough
/// to catch batches submitted back to back without a futex wake-up each,
/// little CPU between a paced stream's bursts. (20 µs cost Publish uploads,
/// whose reactor work competes with it, about 5 % in A/B runs.)
const IDLE_SPIN: std::time::Duration = std::time::Duration::from_micros(5);

#[derive(Default)]
struct QueueState {
    jobs: std::collections::VecDeque<Job>,
    closed: bool,
}

impl std::fmt::Debug for QueueState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueState")
            .field("jobs", &self.jobs.len())
            .field("closed", &self.closed)
            .finish()
    }
}

impl JobQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        // Jobs run outside the lock, so it is never held by a panicking job.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The next job, waiting for one; `None` once closed and empty.
    fn take(&self) -> Option<Job> {
        let spin_until = Instant::now() + IDLE_SPIN;
        while self.queued.load(Ordering::Acquire) == 0 && Instant::now() < spin_until {
            for _ in 0..32 {
                std::hint::spin_loop();
            }
        }
        let mut state = self.lock();
        loop {
            if let Some(job) = state.jobs.pop_front() {
                self.queued.fetch_sub(1, Ordering::Release);
                return Some(job);
            }
            if state.closed {
                return None;
            }
            state = self
                .ready
                .wait(state)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }
}

impl Workers {
    fn start(threads: usize) -> std::io::Result<Workers> {
        // Made first, so that if a thread cannot be started, dropping it
        // closes the queue and the threads already started end.
        let mut workers = Workers {
            queue: Arc::new(JobQueue::default()),
            threads: 0,
        };
        for index in 0..threads {
            let queue = Arc::clone(&workers.queue);
            std::thread::Builder::new()
                .name(format!("verify-{index}"))
                .spawn(move || {
                    while let Some(job) = queue.take() {
                        // A panicking job drops its reply sender (the waiting
                        // side sees the batch as lost); the thread stays.
                        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                    }
                })?;
            workers.threads += 1;
        }
        Ok(workers)
    }

    fn spawn(&self, job: impl FnOnce() + Send + 'static) {
        let mut state = self.queue.lock();
        state.jobs.push_back(Box::new(job));
        // Counted under the lock, as `take` uncounts: never below zero.
        self.queue.queued.fetch_add(1, Ordering::Release);
        drop(state);
        self.queue.ready.notify_one();
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.queue.lock().closed = true;
        self.queue.ready.notify_all();
    }
}

/// The shared CPU pool and verifier. Cheap to clone.
#[derive(Clone, Debug)]
pub struct VerifyPool {
    pool: Arc<Workers>,
    verifier: Arc<Verifier>,
    /// The hub's next sequence, so records reserve the right varint width.
    sequence_hint: SequenceHint,
}

impl VerifyPool {
    /// `threads` = 0 means one per core.
    pub fn new(
        verifier: Verifier,
        threads: usize,
        sequence_hint: SequenceHint,
    ) -> std::io::Result<Self> {
        let threads = match threads {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            threads => threads,
        };
        let pool = Workers::start(threads)?;
        Ok(VerifyPool {
            pool: Arc::new(pool),
            verifier: Arc::new(verifier),
            sequence_hint,
        })
    }

    pub fn verifier(&self) -> &Verifier {
        &self.verifier
    }

    pub fn threads(&self) -> usize {
        self.pool.threads
    }

    /// Runs other CPU-bound work that must stay off the reactor (compressing
    /// a response) on the same pool, so it shares the cores verification uses.
    pub fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> oneshot::Receiver<T> {
        let (reply, result) = oneshot::channel();
        self.pool.spawn(move || {
            // The receiver is gone only if the stream was dropped meanwhile.
            let _ = reply.send(work());
        });
        result
    }

    fn spawn(
        &self,
        source: Arc<str>,
        first_source_sequence: u64,
        mut batch: FrameBatch,
    ) -> oneshot::Receiver<VerifiedBatch> {
        let (reply, result) = oneshot::channel();
        let verifier = Arc::clone(&self.verifier);
        let hint = self.sequence_hint.clone();
        self.pool.spawn(move || {
            let mut verified = verify_batch(
                &verifier,
                &source,
                first_source_sequence,
                &batch,
                hint.get(),
            );
            verified.charge = batch.charge.take();
            verified.span = batch.span.take();
            // The receiver is gone only if the connection was torn down.
            let _ = reply.send(verified);
        });
        result
    }
}

/// Per-source ordered verification: submit batches, take results in order.
pub struct OrderedPipeline {
    pool: VerifyPool,
    source: Arc<str>,
    in_flight: FuturesOrdered<oneshot::Receiver<VerifiedBatch>>,
    max_in_flight: usize,
    next_source_sequence: u64,
}

impl OrderedPipeline {
    pub fn new(pool: VerifyPool, source: Arc<str>, max_in_flight: usize) -> Self {
        OrderedPipeline {
            pool,
            source,
            in_flight: FuturesOrdered::new(),
            max_in_flight: max_in_flight.max(1),
            next_source_sequence: 0,
        }
    }

    pub fn source(&self) -> &Arc<str> {
        &self.source
    }

    pub fn has_room(&self) -> bool {
        self.in_flight.len() < self.max_in_flight
    }

    pub fn is_idle(&self) -> bool {
        self.in_flight.is_empty()
    }

    /// Sends a batch to the pool; its frames take the next source sequences.
    pub fn submit(&mut self, batch: FrameBatch) {
        if batch.frames.is_empty() {
            return;
        }
        let first = self.next_source_sequence;
        self.next_source_sequence += batch.frames.len() as u64;
        let result = self.pool.spawn(Arc::clone(&self.source), first, batch);
        self.in_flight.push_back(result);
    }

    /// Counts a frame that never reached verification (keeps the index gap visible).
    pub fn skip_source_sequence(&mut self) {
        self.next_source_sequence += 1;
    }

    /// The oldest submitted batch's result, once it is ready. `None` when idle.
    pub async fn next(&mut self) -> Option<VerifiedBatch> {
        // A dropped sender means a pool thread panicked: treat the batch as lost
        // rather than bringing the connection down with it.
        loop {
            match self.in_flight.next().await? {
                Ok(batch) => return Some(batch),
                Err(_) => {
                    tracing::error!(source = %self.source, "verification task failed");
                    continue;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{sha256_frame, Channel};
    use bytes::Bytes;

    #[tokio::test]
    async fn a_panicking_job_loses_its_result_but_not_its_thread() {
        let pool =
            VerifyPool::new(Verifier::new(None, false), 2, SequenceHint::default()).expect("pool");
        let lost = pool.run(|| -> u32 { panic!("a job fails") });
        assert!(lost.await.is_err(), "its result is gone");
        // Both threads still take work: jobs that wait for each other finish.
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let results: Vec<_> = (0..2)
            .map(|_| {
                let barrier = Arc::clone(&barrier);
                pool.run(move || {
                    barrier.wait();
                    std::thread::current().name().map(str::to_owned)
                })
            })
            .collect();
        let mut names = Vec::new();
        for result in results {
            let name = tokio::time::timeout(std::time::Duration::from_secs(10), result)
                .await
                .expect("both threads run")
                .expect("result");
            names.push(name.expect("named thread"));
        }
        names.sort();
        assert_eq!(names, vec!["verify-0", "verify-1"]);
    }

    #[test]
    fn a_closed_queue_hands_out_what_is_left_then_ends() {
        let workers = Workers::start(0).expect("no threads");
        let ran = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        for _ in 0..3 {
            let ran = Arc::clone(&ran);
            workers.spawn(move || {
                ran.fetch_add(1, Ordering::Relaxed);
            });
        }
        let queue = Arc::clone(&workers.queue);
        drop(workers);
        for _ in 0..3 {
            let job = queue.take().expect("a queued job");
            job();
        }
        assert_eq!(ran.load(Ordering::Relaxed), 3);
        assert!(queue.take().is_none(), "closed and empty: threads end");
        assert_eq!(queue.queued.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn pipeline_returns_batches_in_submission_order() {
        let pool =
            VerifyPool::new(Verifier::new(None, false), 2, SequenceHint::default()).expect("pool");
        let mut pipeline = OrderedPipeline::new(pool, Arc::from("test/src"), 64);
        // Big batches first so later, smaller ones finish earlier on the pool.
        let sizes: Vec<usize> = (0..32)
            .map(|i| if i % 2 == 0 { 200_000 } else { 1 })
            .collect();
        for (index, size) in sizes.iter().enumerate() {
            let frame = sha256_frame(Channel(index as u32), Bytes::from(vec![index as u8; *size]));
            pipeline.submit(FrameBatch {
                frames: vec![frame],
                received_unix_nanos: 1,
                charge: None,
                span: None,
            });
        }
        for index in 0..sizes.len() {
            let batch = pipeline.next().await.expect("result");
            assert_eq!(batch.accepted.len(), 1);
            assert_eq!(batch.accepted.channel(0), Channel(index as u32));
        }
        assert!(pipeline.next().await.is_none());
    }
}
