//! Graceful shutdown (SPEC §6) as named phases, one token each.
//!
//! All phase tokens are children of one root token, so cancelling the root
//! (the grace deadline) ends every phase at once, while a normal shutdown
//! cancels them one after another:
//!
//! 1. `draining` (SIGTERM): health goes `NOT_SERVING`, new streams are
//!    refused, the ingest listener stops accepting, `/healthz` fails.
//! 2. Open ingest connections are read to EOF; at half the grace period
//!    `stop_reading` fires and they stop reading. Whatever was read is still
//!    verified and published.
//! 3. Cluster mode: the replica's feed catches up with what it stored;
//!    `--data-dir`: the log writer writes and syncs what was numbered.
//! 4. `closing`: the hub closes (subscribers drain what is there and end
//!    `UNAVAILABLE`), gRPC connections get GOAWAY, the admin port stops.
//! 5. At the grace deadline the root is cancelled: whatever is still open is
//!    closed.

use std::{sync::Arc, time::Duration};

use tokio::task::JoinHandle;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{cluster::Cluster, hub::Hub};

/// The service name health reports on, besides "" (the whole server).
pub const PACKETS_SERVICE: &str = "packetingest.v1.Packets";

/// The phases' tokens, children of one root.
#[derive(Clone, Debug)]
pub struct Phases {
    root: CancellationToken,
    pub draining: CancellationToken,
    pub stop_reading: CancellationToken,
    pub closing: CancellationToken,
}

impl Phases {
    pub fn new() -> Self {
        let root = CancellationToken::new();
        Phases {
            draining: root.child_token(),
            stop_reading: root.child_token(),
            closing: root.child_token(),
            root,
        }
    }

    /// Fires only at the grace deadline: close everything still open.
    pub fn aborted(&self) -> CancellationToken {
        self.root.clone()
    }
}

impl Default for Phases {
    fn default() -> Self {
        Phases::new()
    }
}

/// What the phases stop, in order.
pub struct Stages {
    pub ingest_accept: JoinHandle<()>,
    pub ingest_connections: TaskTracker,
    pub grpc: JoinHandle<()>,
    pub admin_http: JoinHandle<()>,
    pub health: tonic_health::server::HealthReporter,
    pub hub: Arc<Hub>,
    /// Cluster mode: the stream, and the feed into the hub with its stop signal.
    pub cluster: Option<(Arc<Cluster>, CancellationToken, Option<JoinHandle<()>>)>,
    /// `--data-dir`: the log writer and its stop signal (it writes and syncs
    /// what is numbered, then ends).
    pub log: Option<(CancellationToken, JoinHandle<()>)>,
}

/// Waits for `draining`, then runs the phases within `grace`.
pub async fn run(phases: Phases, stages: Stages, grace: Duration) {
    phases.draining.cancelled().await;
    let deadline = tokio::time::Instant::now() + grace;
    tracing::info!(?grace, "shutting down");
    for service in [PACKETS_SERVICE, ""] {
        stages
            .health
            .set_service_status(service, tonic_health::ServingStatus::NotServing)
            .await;
    }

    // The accept loop watches `draining`; once it returns no connection is added.
    let _ = stages.ingest_accept.await;
    stages.ingest_connections.close();
    let read_deadline = tokio::time::Instant::now() + grace / 2;
    tokio::select! {
        _ = stages.ingest_connections.wait() => {}
        _ = tokio::time::sleep_until(read_deadline) => {
            tracing::warn!("ingest connections still open at half the grace period; reading stops");
            phases.stop_reading.cancel();
            // Already-read bytes are still verified and published; block mode
            // cannot hold this up once the hub closes.
            let _ = tokio::time::timeout_at(deadline, stages.ingest_connections.wait()).await;
        }
    }

    if let Some((cluster, stop_feed, feed_task)) = stages.cluster {
        // What this replica stored must reach its own subscribers before they end.
        if let Ok(target) = cluster.next_sequence().await {
            if tokio::time::timeout_at(deadline, stages.hub.wait_for_sequence(target))
                .await
                .is_err()
            {
                tracing::warn!(
                    target,
                    "cluster feed did not catch up before the grace deadline"
                );
            }
        }
        stop_feed.cancel();
        if let Some(feed_task) = feed_task {
            let _ = feed_task.await;
        }
    }

    if let Some((stop_log, writer)) = stages.log {
        // Everything numbered is written and synced before subscribers end.
        stop_log.cancel();
        if tokio::time::timeout_at(deadline, writer).await.is_err() {
            tracing::warn!("the log writer did not finish before the grace deadline");
        }
    }

    stages.hub.close();
    phases.closing.cancel();
    let mut grpc = stages.grpc;
    if tokio::time::timeout_at(deadline, &mut grpc).await.is_err() {
        tracing::warn!("streams still open at the grace deadline; closing them");
        phases.root.cancel();
        let _ = grpc.await;
    }
    let _ = stages.admin_http.await;
    tracing::info!("shutdown complete");
}
