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
use tower::ServiceBuilder;

use crate::{
    auth::{AuthLayer, TokenStore},
    cluster::{Cluster, ClusterError, Destination},
    config::{load_hmac_key, ConfigError, ServeArgs},
    frame::FrameLimits,
    grpc::{PacketsServer, PacketsService},
    hub::{Hub, HubConfig},
    ingest::{self, IngestContext},
    limits::UnaryTimeoutLayer,
    metrics::Metrics,
    tls,
    verify::{Verifier, VerifyPool},
};

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
    #[error("cannot set up TLS on the gRPC port: {0}")]
    GrpcTls(#[from] tonic::transport::Error),
}

/// A started server: the addresses it bound and the handle to stop it.
pub struct RunningServer {
    pub grpc_addr: SocketAddr,
    pub ingest_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    pub hub: Arc<Hub>,
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

/// Binds every listener and starts serving. Returns once all ports are bound.
pub async fn start(args: ServeArgs) -> Result<RunningServer, StartError> {
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
    let metrics = Metrics::new();
    let cluster = match &args.cluster_nats {
        Some(url) => Some(Cluster::connect(url, &args.cluster_stream).await?),
        None => None,
    };
    // In cluster mode sequences are the JetStream stream's: continue from its end.
    let first_sequence = match &cluster {
        Some(cluster) => cluster.next_sequence().await?,
        None => 1,
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
    let pool = VerifyPool::new(verifier, args.verify_threads)?;
    let max_in_flight = pool.threads() * IN_FLIGHT_PER_THREAD;

    let grpc_listener = bind("gRPC", args.grpc_addr).await?;
    let ingest_listener = bind("ingest", args.ingest_addr).await?;
    let metrics_listener = bind("metrics", args.metrics_addr).await?;
    let grpc_addr = local_addr(&grpc_listener, "gRPC", args.grpc_addr)?;
    let ingest_addr = local_addr(&ingest_listener, "ingest", args.ingest_addr)?;
    let metrics_addr = local_addr(&metrics_listener, "metrics", args.metrics_addr)?;

    let shutdown = CancellationToken::new();
    let stop_reading = CancellationToken::new();
    let stop_grpc = CancellationToken::new();
    let ingest_tasks = TaskTracker::new();

    let ingest_context = IngestContext {
        destination: destination.clone(),
        pool: pool.clone(),
        metrics: Arc::clone(&metrics),
        limits: FrameLimits {
            max_payload: args.max_payload,
            hmac_key_configured: hmac_key.is_some(),
        },
        max_in_flight,
        tls: tls.as_ref().map(|tls| tls.ingest.clone()),
    };
    let ingest_task = tokio::spawn(ingest::serve(
        ingest_listener,
        args.max_connections as usize,
        ingest_context,
        ingest_tasks.clone(),
        shutdown.clone(),
        stop_reading.clone(),
    ));

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<PacketsServer<PacketsService>>().await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let packets = PacketsService {
        hub: Arc::clone(&hub),
        destination,
        cluster: cluster.clone(),
        pool,
        metrics: Arc::clone(&metrics),
        subscriber_permits: Arc::new(Semaphore::new(args.max_subscribers as usize)),
        max_subscribers: args.max_subscribers as usize,
        heartbeat: args.heartbeat,
        max_payload: args.max_payload,
        max_in_flight,
        draining: shutdown.clone(),
    };
    // Room for a maximum-size packet plus the message's other fields.
    let max_message = args.max_payload as usize + 64 * 1024;
    let limits = ServiceBuilder::new()
        .layer(AuthLayer::new(tokens.clone()))
        .option_layer(args.load_shed.then(tower::load_shed::LoadShedLayer::new))
        // Both arms of the optional shed layer must agree on the error type.
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
            args.concurrency_limit as usize,
        ))
        .layer(UnaryTimeoutLayer::new(args.request_timeout))
        .into_inner();
    let mut grpc_builder = tonic::transport::Server::builder();
    if let Some(tls) = &tls {
        grpc_builder = grpc_builder.tls_config(tls.grpc.clone())?;
    }
    let grpc_server = grpc_builder
        .http2_keepalive_interval(Some(args.http2_keepalive_interval))
        .http2_keepalive_timeout(Some(args.http2_keepalive_timeout))
        .layer(limits)
        .add_service(health_service)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?)
        .add_service(
            PacketsServer::new(packets)
                .max_decoding_message_size(max_message)
                .max_encoding_message_size(max_message.max(MAX_DELIVERY_BYTES) * 2),
        )
        .serve_with_incoming_shutdown(
            // With our own listener tonic ignores `tcp_nodelay`: set it here, or
            // Nagle holds small responses back (up to 40 ms).
            tonic::transport::server::TcpIncoming::from(grpc_listener).with_nodelay(Some(true)),
            stop_grpc.clone().cancelled_owned(),
        );
    let grpc_task = tokio::spawn(async move {
        if let Err(error) = grpc_server.await {
            tracing::error!(%error, "gRPC server failed");
        }
    });
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
        tls = tls.is_some(),
        auth = args.auth_token_file.is_some(),
        hmac = hmac_key.is_some(),
        cluster = args.cluster_nats.is_some(),
        "packet-ingest listening"
    );

    let lifecycle = tokio::spawn(lifecycle(Lifecycle {
        shutdown: shutdown.clone(),
        stop_reading,
        stop_grpc,
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
        shutdown,
        lifecycle,
    })
}

struct Lifecycle {
    shutdown: CancellationToken,
    stop_reading: CancellationToken,
    stop_grpc: CancellationToken,
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
        .set_not_serving::<PacketsServer<PacketsService>>()
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
        grpc_task.abort();
    }
    let _ = parts.metrics_task.await;
    tracing::info!("shutdown complete");
}
