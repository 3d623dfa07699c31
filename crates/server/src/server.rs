//! Assembly and lifecycle: binds the three listeners, wires hub, verifier pool,
//! ingest, gRPC (with health, reflection and tower limits) and metrics, and runs
//! the graceful shutdown of SPEC §6.
//!
//! Shutdown order: health goes NOT_SERVING and new streams are refused; the
//! ingest listener stops accepting; open ingest connections are read to EOF
//! (until half the grace period), and what they sent is verified and
//! published; the hub closes so subscribers drain and end `UNAVAILABLE`; the
//! gRPC and metrics servers stop; anything still open at the grace deadline is
//! cut.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{net::TcpListener, sync::Semaphore, task::JoinHandle};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    auth::{AuthLayer, TokenStore},
    budget::IngestBudget,
    cluster::{Cluster, ClusterError, Destination},
    config::{load_hmac_key, ConfigError, ServeArgs},
    connections::ConnectionSlots,
    frame::FrameLimits,
    grpc::{
        routes::{GrpcRoutes, PacketsLimits},
        transport::{self, TransportConfig},
        PacketsService, StreamIdentity,
    },
    hub::{Hub, HubConfig},
    ingest::{self, IngestContext},
    metrics::Metrics,
    producer::ProducerContext,
    tls,
    verify::{Verifier, VerifyPool},
};

/// The service name health reports on, besides "" (the whole server).
pub const PACKETS_SERVICE: &str = "packetingest.v1.Packets";
/// Request messages health and reflection accept (theirs are tiny).
const SMALL_SERVICE_MESSAGE: usize = 64 * 1024;
/// File descriptors kept free of the connection caps (listeners, files, NATS).
const RESERVED_FDS: u64 = 64;

/// Soft cap on one SubscribeResponse; one packet of --max-payload always fits.
const MAX_DELIVERY_BYTES: usize = 1 << 20;
/// Verification batches one producer may have in flight per pool thread.
const IN_FLIGHT_PER_THREAD: usize = 2;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {what} address {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the verification pool: {0}")]
    Pool(#[from] rayon::ThreadPoolBuildError),
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
}

/// A started server: the addresses it bound and the handle to stop it.
pub struct RunningServer {
    pub grpc_addr: SocketAddr,
    pub ingest_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    pub hub: Arc<Hub>,
    pub stream_id: Arc<str>,
    shutdown: CancellationToken,
    lifecycle: JoinHandle<()>,
}

impl RunningServer {
    /// Starts graceful shutdown (what SIGTERM does).
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Waits until the server has shut down completely.
    pub async fn wait(self) {
        if let Err(error) = self.lifecycle.await {
            tracing::error!(%error, "server task failed");
        }
    }
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { what, addr, source })
}

fn local_addr(
    listener: &TcpListener,
    what: &'static str,
    addr: SocketAddr,
) -> Result<SocketAddr, StartError> {
    listener
        .local_addr()
        .map_err(|source| StartError::Bind { what, addr, source })
}

/// Connection caps that fit the open-file limit: a cap the process cannot
/// reach would turn into accept errors instead of orderly refusals.
fn connection_caps(args: &ServeArgs, open_files: Option<u64>) -> (usize, usize) {
    let ingest = u64::from(args.max_connections);
    let grpc = u64::from(args.max_grpc_connections);
    let Some(limit) = open_files else {
        return (ingest as usize, grpc as usize);
    };
    let available = limit.saturating_sub(RESERVED_FDS).max(2);
    if ingest + grpc <= available {
        return (ingest as usize, grpc as usize);
    }
    // Shrink both in proportion, keeping at least one each.
    let scale = |cap: u64| ((cap * available) / (ingest + grpc)).max(1);
    let (ingest_cap, grpc_cap) = (scale(ingest), scale(grpc));
    tracing::warn!(
        open_files = limit,
        max_connections = ingest_cap,
        max_grpc_connections = grpc_cap,
        "the open-file limit is below --max-connections + --max-grpc-connections; lowering both"
    );
    (ingest_cap as usize, grpc_cap as usize)
}

/// Binds every listener and starts serving. Returns once all ports are bound.
pub async fn start(args: ServeArgs) -> Result<RunningServer, StartError> {
    args.validate()?;
    let hmac_key = load_hmac_key(&args)?;
    let tls = tls::load(&args)?;
    let tokens =
        match &args.auth_token_file {
            Some(path) => Some(TokenStore::load(path.clone()).map_err(|source| {
                ConfigError::AuthTokenFile {
                    path: path.clone(),
                    source,
                }
            })?),
            None => None,
        };
    let open_files = crate::connections::raise_open_file_limit();
    let (max_ingest_connections, max_grpc_connections) = connection_caps(&args, open_files);
    let metrics = Metrics::new();
    let cluster = match &args.cluster_nats {
        Some(url) => Some(Cluster::connect(url, &args.cluster_stream).await?),
        None => None,
    };
    // In cluster mode sequences are the JetStream stream's: continue from its end.
    let (first_sequence, identity) = match &cluster {
        Some(cluster) => (cluster.next_sequence().await?, cluster.identity().await?),
        None => (1, StreamIdentity::ephemeral()),
    };
    let hub = Hub::starting_at(
        HubConfig {
            retain_packets: args.retain_packets(),
            memory_limit: usize::try_from(args.memory_limit).unwrap_or(usize::MAX),
            policy: args.slow_subscriber,
            block_timeout: args.block_timeout,
            max_delivery_bytes: MAX_DELIVERY_BYTES,
        },
        Arc::clone(&metrics),
        first_sequence,
    );
    let destination = match &cluster {
        Some(cluster) => Destination::Cluster(Arc::clone(cluster)),
        None => Destination::Hub(Arc::clone(&hub)),
    };
    let stop_feed = CancellationToken::new();
    let feed_task = cluster.as_ref().map(|cluster| {
        tokio::spawn(Arc::clone(cluster).feed(Arc::clone(&hub), first_sequence, stop_feed.clone()))
    });
    let verifier = Verifier::new(hmac_key.as_deref(), args.require_hmac);
    let pool = VerifyPool::new(verifier, args.verify_threads, hub.sequence_hint())?;
    let producer = ProducerContext {
        max_in_flight: pool.threads() * IN_FLIGHT_PER_THREAD,
        pool,
        destination,
        metrics: Arc::clone(&metrics),
        budget: IngestBudget::new(
            usize::try_from(args.ingest_memory_limit).unwrap_or(usize::MAX),
            Arc::clone(&metrics),
        ),
    };

    let grpc_listener = bind("gRPC", args.grpc_addr).await?;
    let ingest_listener = bind("ingest", args.ingest_addr).await?;
    let metrics_listener = bind("metrics", args.metrics_addr).await?;
    let grpc_addr = local_addr(&grpc_listener, "gRPC", args.grpc_addr)?;
    let ingest_addr = local_addr(&ingest_listener, "ingest", args.ingest_addr)?;
    let metrics_addr = local_addr(&metrics_listener, "metrics", args.metrics_addr)?;

    let shutdown = CancellationToken::new();
    let stop_reading = CancellationToken::new();
    let stop_grpc = CancellationToken::new();
    let abort_grpc = CancellationToken::new();
    let ingest_tasks = TaskTracker::new();

    let ingest_context = IngestContext {
        producer: producer.clone(),
        limits: FrameLimits {
            max_payload: args.max_payload,
            hmac_key_configured: hmac_key.is_some(),
        },
        tls: tls.as_ref().map(|tls| tls.ingest.clone()),
        idle_timeout: args.ingest_idle_timeout,
        frame_timeout: args.frame_timeout,
    };
    let ingest_task = tokio::spawn(ingest::serve(
        ingest_listener,
        ConnectionSlots::new("ingest", max_ingest_connections),
        ingest_context,
        ingest_tasks.clone(),
        shutdown.clone(),
        stop_reading.clone(),
    ));

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status(PACKETS_SERVICE, tonic_health::ServingStatus::Serving)
        .await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let packets = Arc::new(PacketsService {
        hub: Arc::clone(&hub),
        identity: identity.clone(),
        producer,
        cluster: cluster.clone(),
        metrics: Arc::clone(&metrics),
        subscriber_permits: Arc::new(Semaphore::new(args.max_subscribers as usize)),
        max_subscribers: args.max_subscribers as usize,
        publishers: ConnectionSlots::new("Publish", args.max_publishers as usize),
        max_filter_channels: args.max_filter_channels as usize,
        publish_idle_timeout: args.publish_idle_timeout,
        heartbeat: args.heartbeat,
        max_payload: args.max_payload,
        draining: shutdown.clone(),
    });
    let routes = GrpcRoutes::new(
        packets,
        PacketsLimits {
            auth: AuthLayer::new(tokens.clone()),
            concurrency_limit: args.concurrency_limit as usize,
            load_shed: args.load_shed,
            unary_timeout: args.request_timeout,
        },
        GrpcRoutes::route(health_service.max_decoding_message_size(SMALL_SERVICE_MESSAGE)),
        GrpcRoutes::route(
            reflection()
                .build_v1()?
                .max_decoding_message_size(SMALL_SERVICE_MESSAGE),
        ),
        GrpcRoutes::route(
            reflection()
                .build_v1alpha()?
                .max_decoding_message_size(SMALL_SERVICE_MESSAGE),
        ),
    );
    let grpc_task = tokio::spawn(transport::serve(
        grpc_listener,
        ConnectionSlots::new("gRPC", max_grpc_connections),
        TransportConfig {
            handshake_timeout: args.grpc_handshake_timeout,
            keepalive_interval: args.http2_keepalive_interval,
            keepalive_timeout: args.http2_keepalive_timeout,
            max_streams_per_connection: args.max_streams_per_connection,
            tls: tls.as_ref().map(|tls| tls.grpc.clone()),
        },
        routes,
        Arc::clone(&metrics),
        stop_grpc.clone(),
        abort_grpc.clone(),
    ));
    // The metrics port stays up through the drain, so it can be watched.
    let metrics_task = tokio::spawn(crate::http::serve(
        metrics_listener,
        Arc::clone(&metrics),
        shutdown.clone(),
        stop_grpc.clone(),
    ));

    if let Some(tokens) = tokens {
        tokio::spawn(tokens.watch(stop_grpc.clone()));
    }
    tracing::info!(
        %grpc_addr,
        %ingest_addr,
        %metrics_addr,
        stream_id = %identity.id,
        tls = tls.is_some(),
        auth = args.auth_token_file.is_some(),
        hmac = hmac_key.is_some(),
        cluster = args.cluster_nats.is_some(),
        open_files = open_files.unwrap_or_default(),
        "packet-ingest listening"
    );

    let lifecycle = tokio::spawn(lifecycle(Lifecycle {
        shutdown: shutdown.clone(),
        stop_reading,
        stop_grpc,
        abort_grpc,
        ingest_tasks,
        ingest_task,
        grpc_task,
        metrics_task,
        health,
        hub: Arc::clone(&hub),
        cluster: cluster.map(|cluster| (cluster, stop_feed, feed_task)),
        grace: args.shutdown_grace,
    }));
    Ok(RunningServer {
        grpc_addr,
        ingest_addr,
        metrics_addr,
        metrics,
        hub,
        stream_id: identity.id,
        shutdown,
        lifecycle,
    })
}

struct Lifecycle {
    shutdown: CancellationToken,
    stop_reading: CancellationToken,
    stop_grpc: CancellationToken,
    abort_grpc: CancellationToken,
    ingest_tasks: TaskTracker,
    ingest_task: JoinHandle<()>,
    grpc_task: JoinHandle<()>,
    metrics_task: JoinHandle<()>,
    health: tonic_health::server::HealthReporter,
    hub: Arc<Hub>,
    /// Cluster mode: the stream, and the feed into the hub with its stop signal.
    cluster: Option<(Arc<Cluster>, CancellationToken, Option<JoinHandle<()>>)>,
    grace: Duration,
}

async fn lifecycle(parts: Lifecycle) {
    parts.shutdown.cancelled().await;
    let deadline = tokio::time::Instant::now() + parts.grace;
    tracing::info!(grace = ?parts.grace, "shutting down");
    parts
        .health
        .set_service_status(PACKETS_SERVICE, tonic_health::ServingStatus::NotServing)
        .await;
    parts
        .health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;

    // The accept loop watches `shutdown`; once it returns no connection is added.
    let _ = parts.ingest_task.await;
    parts.ingest_tasks.close();
    let read_deadline = tokio::time::Instant::now() + parts.grace / 2;
    tokio::select! {
        _ = parts.ingest_tasks.wait() => {}
        _ = tokio::time::sleep_until(read_deadline) => {
            tracing::warn!("ingest connections still open at half the grace period; reading stops");
            parts.stop_reading.cancel();
            // Already-read bytes are still verified and published; block mode
            // cannot hold this up once the hub closes.
            let _ = tokio::time::timeout_at(deadline, parts.ingest_tasks.wait()).await;
        }
    }

    if let Some((cluster, stop_feed, feed_task)) = parts.cluster {
        // What this replica stored must reach its own subscribers before they end.
        if let Ok(target) = cluster.next_sequence().await {
            if tokio::time::timeout_at(deadline, parts.hub.wait_for_sequence(target))
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
    parts.hub.close();
    parts.stop_grpc.cancel();
    let mut grpc_task = parts.grpc_task;
    if tokio::time::timeout_at(deadline, &mut grpc_task)
        .await
        .is_err()
    {
        tracing::warn!("streams still open at the grace deadline; closing them");
        parts.abort_grpc.cancel();
        let _ = grpc_task.await;
    }
    let _ = parts.metrics_task.await;
    tracing::info!("shutdown complete");
}
