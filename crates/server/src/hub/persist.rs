//! The hub's log writer (with `--data-dir`): takes what the hub numbered, in
//! order, writes it to the log, and only then lets subscribers see it
//! (`Hub::mark_written`); makes it durable per `--fsync` and tells whoever
//! waits for acknowledgements (`Hub::mark_durable`).
//!
//! Writes are grouped: whatever has been numbered since the last write goes
//! in one write (and, with `--fsync always`, one fsync): group commit. The
//! file I/O runs on the blocking pool. A failed write (disk full, I/O error)
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

use tokio::{sync::watch, time::Instant};
use tokio_util::sync::CancellationToken;

use super::Hub;
use crate::log::{FsyncPolicy, LogWriter};

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
    // Where the log ends, not where the hub is: producers may have published
    // before this task first ran, and those batches must be written too.
    let mut written = writer.end_sequence();
    let mut writer = Some(writer);
    let mut synced = written;
    let mut last_sync = Instant::now();
    let mut last_retention = Instant::now() - RETENTION_EVERY;
    let mut retry = RETRY_FIRST;
    loop {
        let batches = hub.unwritten(written, WRITE_BYTES);
        let sync_due = synced < written
            && (options.fsync == FsyncPolicy::Always
                || last_sync.elapsed() >= options.fsync_interval
                || hub.take_sync_wanted()
                || (stop.is_cancelled() && batches.is_empty()));
        let retention_due = last_retention.elapsed() >= RETENTION_EVERY;
        if batches.is_empty() && !sync_due && !retention_due {
            if stop.is_cancelled() {
                return;
            }
            let next_sync = last_sync + options.fsync_interval;
            tokio::select! {
                _ = hub.wait_assigned(written) => {}
                _ = hub.sync_wanted(), if synced < written => {}
                _ = tokio::time::sleep_until(next_sync), if synced < written => {}
                _ = tokio::time::sleep_until(last_retention + RETENTION_EVERY) => {}
                _ = stop.cancelled() => {}
            }
            continue;
        }
        let Some(mut owned) = writer.take() else {
            return;
        };
        let policy = options.fsync;
        let (owned, outcome) = tokio::task::spawn_blocking(move || {
            // The write may stop short of the last batch (at a segment's
            // end): the next round writes the rest. (end written, synced)
            let wrote = !batches.is_empty();
            let mut outcome = match wrote {
                false => Ok((written, false)),
                true => owned
                    .write(&batches)
                    .map(|end| (end, false))
                    .map_err(RoundError::Write),
            };
            match outcome {
                // Only this round's own write is undone (earlier ones are read).
                Err(_) if wrote => {
                    if let Err(error) = owned.rollback() {
                        tracing::error!(%error, "cannot roll back a failed log write");
                    }
                }
                Err(_) => {}
                Ok((end, _)) if sync_due || policy == FsyncPolicy::Always => {
                    outcome = owned
                        .sync()
                        .map(|()| (end, true))
                        .map_err(RoundError::Write);
                }
                Ok(_) => {}
            }
            // An fsync failed (this round's, or the one a segment roll does):
            // everything since the last good one is written again. Not with
            // `--fsync never`: nothing waits for fsyncs there, so the ring
            // does not keep what they cover.
            if owned.take_sync_failed() && policy != FsyncPolicy::Never {
                if let Err(RoundError::Write(error)) = outcome {
                    let from = owned.rewind_to_synced();
                    outcome = Err(RoundError::Sync { error, from });
                }
            }
            if retention_due {
                owned.apply_retention();
            }
            (owned, outcome)
        })
        .await
        .unwrap_or_else(|_| panic!("the log writer task panicked"));
        writer = Some(owned);
        if retention_due {
            last_retention = Instant::now();
        }
        match outcome {
            Ok((end, did_sync)) => {
                retry = RETRY_FIRST;
                failing.send_if_modified(|reason| reason.take().is_some());
                written = end;
                hub.mark_written(written);
                if did_sync || policy == FsyncPolicy::Never {
                    if did_sync {
                        last_sync = Instant::now();
                    }
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
