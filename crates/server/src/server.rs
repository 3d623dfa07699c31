//! Assembly: from checked `Settings`, builds the hub, verifier pool, producer
//! context, ingest listener, gRPC routes and transport, and the admin HTTP
//! port, then hands them to `shutdown::run`, which waits for SIGTERM and runs
//! the phases of a graceful shutdown.

use std::{net::SocketAddr, sync::Arc};

use tokio::{net::TcpListener, sync::Semaphore, task::JoinHandle};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    auth::AuthLayer,
    budget::IngestBudget,
    cluster::{Cluster, ClusterError, ClusterOptions},
    config::Settings,
    connections::ConnectionSlots,
    frame::FrameLimits,
    grpc::{
        routes::{GrpcRoutes, PacketsLimits},
        transport::{self, TransportConfig},
        PacketsService,
    },
    hub::{Hub, HubConfig},
    ingest::{self, IngestContext},
    metrics::Metrics,
    outlet::Destination,
    producer::ProducerContext,
    shutdown::{Phases, Stages},
    stream::StreamIdentity,
    verify::{Verifier, VerifyPool},
};

pub use crate::shutdown::PACKETS_SERVICE;

/// Request messages health and reflection accept (theirs are tiny).
const SMALL_SERVICE_MESSAGE: usize = 64 * 1024;

/// Soft cap on one SubscribeResponse; one packet of --max-payload always fits.
const MAX_DELIVERY_BYTES: usize = 1 << 20;
/// Verification batches one producer may have in flight per pool thread.
const IN_FLIGHT_PER_THREAD: usize = 2;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {what} address {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the verification pool: {0}")]
    Pool(std::io::Error),
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
    /// Cancelled by `shutdown()`: the first phase of the graceful shutdown.
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
pub async fn start(settings: Settings) -> Result<RunningServer, StartError> {
    let Settings {
        args,
        hmac_key,
        tls,
        tokens,
        open_files,
        max_ingest_connections,
        max_grpc_connections,
        retain_packets,
        memory_limit,
        ingest_memory_limit,
        slow_subscriber,
        log,
        metrics,
    } = settings;
    let cluster = match &args.cluster_nats {
        Some(url) => Some(
            Cluster::connect(&ClusterOptions {
                url: url.clone(),
                stream: args.cluster_stream.clone(),
                max_age: args.cluster_max_age,
                max_bytes: args.cluster_max_bytes,
                max_lag: args.cluster_max_lag,
            })
            .await?,
        ),
        None => None,
    };
    let hub_config = HubConfig {
        retain_packets,
        memory_limit,
        policy: slow_subscriber,
        block_timeout: args.block_timeout,
        max_delivery_bytes: MAX_DELIVERY_BYTES,
    };
    // Numbering continues the durable stream's: the log's, or JetStream's.
    let (hub, identity, log_writer) = match (log, &cluster) {
        (Some(opened), _) => {
            let identity = StreamIdentity {
                id: Arc::from(opened.log.stream_id()),
                durable: true,
            };
            let hub = Hub::with_log(
                hub_config,
                Arc::clone(&metrics),
                Arc::clone(&opened.log),
                opened.next_sequence,
            );
            (hub, identity, Some(opened.writer))
        }
        (None, Some(cluster)) => {
            let next = cluster.start().next_packet;
            let hub = Hub::starting_at(hub_config, Arc::clone(&metrics), next);
            (hub, cluster.identity().await?, None)
        }
        (None, None) => (
            Hub::starting_at(hub_config, Arc::clone(&metrics), 1),
            StreamIdentity::ephemeral(),
            None,
        ),
    };
    // Why log writes fail, while they do (health reports it).
    let (log_failing, log_failing_rx) = tokio::sync::watch::channel(None::<String>);
    let stop_log = CancellationToken::new();
    let log_task = log_writer.map(|writer| {
        tokio::spawn(crate::hub::persist::write_log(
            Arc::clone(&hub),
            writer,
            log_failing,
            stop_log.clone(),
        ))
    });
    let destination = match &cluster {
        Some(cluster) => Destination::Cluster(Arc::clone(cluster)),
        None => Destination::Hub(Arc::clone(&hub)),
    };
    let stop_feed = CancellationToken::new();
    let feed_task = cluster.as_ref().map(|cluster| {
        // The consumer starts after the last message the hub's numbering follows.
        let after = cluster.start().stream_sequence + 1;
        tokio::spawn(Arc::clone(cluster).feed(Arc::clone(&hub), after, stop_feed.clone()))
    });
    let verifier = Verifier::new(hmac_key.as_deref(), args.require_hmac);
    let pool = VerifyPool::new(verifier, args.verify_threads, hub.sequence_hint())
        .map_err(StartError::Pool)?;
    let producer = ProducerContext {
        max_in_flight: pool.threads() * IN_FLIGHT_PER_THREAD,
        pool,
        destination,
        metrics: Arc::clone(&metrics),
        budget: IngestBudget::new(ingest_memory_limit, Arc::clone(&metrics)),
    };

    let grpc_listener = bind("gRPC", args.grpc_addr).await?;
    let ingest_listener = bind("ingest", args.ingest_addr).await?;
    let metrics_listener = bind("metrics", args.metrics_addr).await?;
    let grpc_addr = local_addr(&grpc_listener, "gRPC", args.grpc_addr)?;
    let ingest_addr = local_addr(&ingest_listener, "ingest", args.ingest_addr)?;
    let metrics_addr = local_addr(&metrics_listener, "metrics", args.metrics_addr)?;

    let phases = Phases::new();
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
        phases.draining.clone(),
        phases.stop_reading.clone(),
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
        compression: crate::compression::Compression::new(&args.compression),
        draining: phases.draining.clone(),
    });
    let console = crate::console::Console::new(Arc::clone(&packets));
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
        routes.into_service(&args.cors_origin),
        Arc::clone(&metrics),
        phases.closing.clone(),
        phases.aborted(),
    ));
    // The metrics port stays up through the drain, so it can be watched.
    let metrics_task = tokio::spawn(crate::http::serve(
        metrics_listener,
        Arc::clone(&metrics),
        console,
        phases.draining.clone(),
        log_failing_rx.clone(),
        phases.closing.clone(),
    ));
    // gRPC health follows the log: not serving while it cannot be written.
    tokio::spawn(report_storage(
        health.clone(),
        log_failing_rx,
        phases.draining.clone(),
    ));

    if let Some(tokens) = tokens {
        tokio::spawn(tokens.watch(phases.closing.clone()));
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

    let shutdown = phases.draining.clone();
    let lifecycle = tokio::spawn(crate::shutdown::run(
        phases,
        Stages {
            ingest_accept: ingest_task,
            ingest_connections: ingest_tasks,
            grpc: grpc_task,
            admin_http: metrics_task,
            health,
            hub: Arc::clone(&hub),
            cluster: cluster
                .clone()
                .map(|cluster| (cluster, stop_feed, feed_task)),
            log: log_task.map(|task| (stop_log, task)),
        },
        args.shutdown_grace,
    ));

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

/// Keeps `packetingest.v1.Packets` health `NOT_SERVING` while log writes fail.
async fn report_storage(
    health: tonic_health::server::HealthReporter,
    mut failing: tokio::sync::watch::Receiver<Option<String>>,
    draining: CancellationToken,
) {
    loop {
        tokio::select! {
            changed = failing.changed() => if changed.is_err() { return },
            _ = draining.cancelled() => return,
        }
        let status = match failing.borrow_and_update().is_some() {
            true => tonic_health::ServingStatus::NotServing,
            false => tonic_health::ServingStatus::Serving,
        };
        if !draining.is_cancelled() {
            health.set_service_status(PACKETS_SERVICE, status).await;
        }
    }
}
