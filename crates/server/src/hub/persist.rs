//! The hub's log writer (with `--data-dir`): takes what the hub numbered, in
//! order, writes it to the log, and only then lets subscribers see it
//! (`Hub::mark_written`); makes it durable per `--fsync` and tells whoever
//! waits for acknowledgements (`Hub::mark_durable`).
//!
//! Writes are grouped: whatever has been numbered since the last write goes
//! in one write (and, with `--fsync always`, one fsync): group commit. The
//! file I/O runs on the blocking pool. With `--fsync interval` the fsync runs
//! on a blocking thread of its own (`LogWriter::begin_sync`) while the writer
//! goes on writing, so deliveries, which wait for the write, never wait for
//! the disk (an fsync taking 10 ms held every batch numbered meanwhile:
//! p99 10.8 ms at a paced 100 k packets/s). It is not overlapped with a
//! segment roll or the last fsync at shutdown, whose success would hide its
//! failure. A failed write (disk full, I/O error)
//! is rolled back and retried with back-off; meanwhile the ring fills with
//! unwritten batches and publishers wait, so ingest pauses (TCP backpressure)
//! and nothing acknowledged is lost. `failing` says why, for health.
//!
//! A failed fsync is different: the pages it should have written may be
//! dropped, and a later fsync that succeeds does not bring them back. So the
//! ring keeps every batch until it is *durable*, not just written, and after
//! a failed fsync the log is cut back to the last good one and everything
//! since is written again from the ring before anything is acknowledged.
//! When unsynced batches fill the ring, publishers ask for an early fsync.

use std::{sync::Arc, time::Duration};

use tokio::{sync::watch, task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;

use super::Hub;
use crate::log::{FsyncPolicy, LogWriter, SyncDone, SyncJob};

/// Numbered bytes one write takes at most.
const WRITE_BYTES: usize = 8 << 20;
const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(2);
/// Retention is applied this often (and after start).
const RETENTION_EVERY: Duration = Duration::from_secs(1);

/// Why a round of the writer failed.
#[derive(Debug, thiserror::Error)]
enum RoundError {
    /// The write failed; it was rolled back.
    #[error("{0}")]
    Write(std::io::Error),
    /// The fsync failed; the log was cut back to the last good one, `from`.
    #[error("fsync failed ({error}); writing again from sequence {from}")]
    Sync { error: std::io::Error, from: u64 },
}

/// Runs until `stop` fires and everything numbered by then is written and
/// synced. `failing` holds the reason writes fail, `None` while they succeed.
pub async fn write_log(
    hub: Arc<Hub>,
    writer: LogWriter,
    failing: watch::Sender<Option<String>>,
    stop: CancellationToken,
) {
    let options = writer.log().options().clone();
    let policy = options.fsync;
    // Where the log ends, not where the hub is: producers may have published
    // before this task first ran, and those batches must be written too.
    let mut written = writer.end_sequence();
    let mut writer = Some(writer);
    let mut synced = written;
    let mut last_sync = Instant::now();
    let mut last_retention = Instant::now() - RETENTION_EVERY;
    let mut retry = RETRY_FIRST;
    // With `--fsync interval` the fsync runs beside the writer, so batches
    // numbered meanwhile are written and delivered without waiting for the
    // disk; its result is taken by the next round.
    let mut syncing: Option<JoinHandle<SyncDone>> = None;
    let mut sync_done: Option<SyncDone> = None;
    loop {
        let batches = hub.unwritten(written, WRITE_BYTES);
        let Some(owned) = writer.as_ref() else {
            return;
        };
        // A segment roll fsyncs the old segment on the writer's thread, and
        // shutting down ends with one last fsync there: neither beside a
        // running one (whose failure they would hide).
        if syncing.is_some() && (stop.is_cancelled() || (!batches.is_empty() && owned.needs_roll()))
        {
            sync_done = Some(finished(&mut syncing).await);
            continue;
        }
        let background = policy == FsyncPolicy::Interval && !stop.is_cancelled();
        let sync_due = synced < written
            && syncing.is_none()
            && sync_done.is_none()
            && (policy == FsyncPolicy::Always
                || last_sync.elapsed() >= options.fsync_interval
                || hub.take_sync_wanted()
                || (stop.is_cancelled() && batches.is_empty()));
        let retention_due = last_retention.elapsed() >= RETENTION_EVERY;
        if batches.is_empty() && !sync_due && !retention_due && sync_done.is_none() {
            if stop.is_cancelled() {
                return;
            }
            let next_sync = last_sync + options.fsync_interval;
            let waiting = syncing.is_none() && synced < written;
            tokio::select! {
                _ = hub.wait_assigned(written) => {}
                _ = hub.sync_wanted(), if waiting => {}
                _ = tokio::time::sleep_until(next_sync), if waiting => {}
                done = finished(&mut syncing), if syncing.is_some() => sync_done = Some(done),
                _ = tokio::time::sleep_until(last_retention + RETENTION_EVERY) => {}
                _ = stop.cancelled() => {}
            }
            continue;
        }
        let Some(mut owned) = writer.take() else {
            return;
        };
        let done = sync_done.take();
        let (owned, round, outcome) = tokio::task::spawn_blocking(move || {
            let mut round = Round::default();
            // A background fsync's result first: if it failed, nothing is
            // written until the log is cut back (below).
            let mut outcome = match done.map(|done| owned.finish_sync(done)) {
                Some(Err(error)) => Err(RoundError::Write(error)),
                Some(Ok(durable)) => {
                    round.durable = Some(durable);
                    Ok(())
                }
                None => Ok(()),
            };
            // The write may stop short of the last batch (at a segment's
            // end): the next round writes the rest.
            let wrote = outcome.is_ok() && !batches.is_empty();
            if wrote {
                outcome = owned
                    .write(&batches)
                    .map(|_| round.wrote = true)
                    .map_err(RoundError::Write);
            }
            match outcome {
                // Only this round's own write is undone (earlier ones are read).
                Err(_) if wrote => {
                    if let Err(error) = owned.rollback() {
                        tracing::error!(%error, "cannot roll back a failed log write");
                    }
                }
                Err(_) => {}
                Ok(()) if sync_due && background => match owned.begin_sync() {
                    Ok(job) => round.job = Some(job),
                    Err(error) => outcome = Err(RoundError::Write(error)),
                },
                Ok(()) if sync_due || (wrote && policy == FsyncPolicy::Always) => {
                    outcome = owned.sync().map_err(RoundError::Write);
                    round.synced = outcome.is_ok();
                }
                Ok(()) => {}
            }
            // An fsync failed (this round's, a background one, or the one a
            // segment roll does): everything since the last good one is
            // written again. Not with `--fsync never`: nothing waits for
            // fsyncs there, so the ring does not keep what they cover.
            if owned.take_sync_failed() && policy != FsyncPolicy::Never {
                if let Err(RoundError::Write(error)) = outcome {
                    let from = owned.rewind_to_synced();
                    outcome = Err(RoundError::Sync { error, from });
                }
            }
            if retention_due {
                owned.apply_retention();
            }
            (owned, round, outcome)
        })
        .await
        .unwrap_or_else(|_| panic!("the log writer task panicked"));
        let end = owned.end_sequence();
        writer = Some(owned);
        if retention_due {
            last_retention = Instant::now();
        }
        // What a background fsync made durable counts even if this round's write failed.
        if let Some(durable) = round.durable.filter(|_| policy != FsyncPolicy::Never) {
            synced = synced.max(durable);
            hub.mark_durable(synced);
        }
        match outcome {
            Ok(()) => {
                retry = RETRY_FIRST;
                failing.send_if_modified(|reason| reason.take().is_some());
                if round.wrote {
                    written = end;
                    hub.mark_written(written);
                }
                if round.synced || round.job.is_some() {
                    last_sync = Instant::now();
                }
                if let Some(job) = round.job {
                    syncing = Some(tokio::task::spawn_blocking(move || job.run()));
                }
                if round.synced || policy == FsyncPolicy::Never {
                    synced = written;
                    hub.mark_durable(synced);
                }
            }
            Err(error) => {
                if let RoundError::Sync { from, .. } = error {
                    written = from;
                }
                hub.metrics.log_write_errors.inc();
                tracing::error!(%error, retry = ?retry, "log write failed; ingest pauses until it succeeds");
                failing.send_replace(Some(format!("log writes fail: {error}")));
                tokio::select! {
                    _ = tokio::time::sleep(retry) => {}
                    // Shutting down while the disk fails: nothing more can be saved.
                    _ = stop.cancelled(), if retry >= RETRY_MAX => return,
                }
                retry = (retry * 2).min(RETRY_MAX);
            }
        }
    }
}

/// What one round of the writer did.
#[derive(Default)]
struct Round {
    /// It wrote batches (the log's new end is the writer's end sequence).
    wrote: bool,
    /// It fsynced everything written, on the writer's thread.
    synced: bool,
    /// A background fsync it took the result of made the log durable to here.
    durable: Option<u64>,
    /// The background fsync it started.
    job: Option<SyncJob>,
}

/// The result of the background fsync in `syncing`, which must be running.
async fn finished(syncing: &mut Option<JoinHandle<SyncDone>>) -> SyncDone {
    let Some(handle) = syncing.as_mut() else {
        return std::future::pending().await;
    };
    let done = handle
        .await
        .unwrap_or_else(|_| panic!("the log's fsync task panicked"));
    *syncing = None;
    done
}
