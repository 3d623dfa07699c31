//! The plain-HTTP side port: `GET /metrics` (Prometheus text), `GET /healthz`
//! (200 while serving; 503 once shutdown has begun, or while the log cannot
//! be written, with the reason, for HTTP probes), and the live console (`/`,
//! `/api/status`, `/api/tail`; see [`crate::console`]). Like the other ports it
//! holds at most a few connections (`ADMIN_CONNECTIONS`, idle ones give way)
//! and gives each request's headers a deadline, so idle sockets on it cannot
//! use up the process's file descriptors.

use std::sync::Arc;

use axum::{
    extract::{ConnectInfo, Query},
    http::{header, StatusCode},
    response::{Html, IntoResponse},
    routing::get,
    Json, Router,
};
use hyper::{body::Incoming, server::conn::http1};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::ServiceExt;

use crate::{
    connections::{Acceptor, ConnectionSlots},
    console::{Console, TailQuery},
    metrics::Metrics,
};

/// Connections the admin port serves at once (scrapers, probes, people):
/// when all are open, the one idle longest gives way to a newcomer.
pub const ADMIN_CONNECTIONS: usize = 32;
/// A request's headers must arrive within this (idle keep-alive connections
/// are closed by it too).
const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves until `shutdown` fires; `/healthz` fails from when `draining`
/// fires, and while `storage_failing` holds a reason.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    console: Arc<Console>,
    draining: CancellationToken,
    storage_failing: tokio::sync::watch::Receiver<Option<String>>,
    shutdown: CancellationToken,
) {
    let status = Arc::clone(&console);
    let app = Router::new()
        .route("/", get(|| async { Html(crate::console::PAGE) }))
        .route(
            "/api/status",
            get(move || {
                let console = Arc::clone(&status);
                async move {
                    (
                        [(header::CACHE_CONTROL, "no-store")],
                        Json(console.status()),
                    )
                }
            }),
        )
        .route(
            "/api/tail",
            get(
                move |Query(query): Query<TailQuery>,
                      ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>| {
                    let tail = console.tail(query.channel, Some(peer));
                    async move { tail }
                },
            ),
        )
        .route(
            "/metrics",
            get(move || {
                let metrics = Arc::clone(&metrics);
                async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        metrics.render(),
                    )
                        .into_response()
                }
            }),
        )
        .route(
            "/healthz",
            get(move || {
                let draining = draining.clone();
                let failing = storage_failing.borrow().clone();
                async move {
                    match (draining.is_cancelled(), failing) {
                        (true, _) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "shutting down\n".to_owned(),
                        ),
                        (false, Some(reason)) => {
                            (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n"))
                        }
                        (false, None) => (StatusCode::OK, "ok\n".to_owned()),
                    }
                }
            }),
        );
    let slots = ConnectionSlots::new("admin HTTP", ADMIN_CONNECTIONS);
    let mut acceptor = Acceptor::new(listener, "admin HTTP");
    let connections = TaskTracker::new();
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = acceptor.accept() => accepted,
            _ = shutdown.cancelled() => break,
        };
        let Some(slot) = slots.admit(&shutdown, || {}).await else {
            break;
        };
        let app = app.clone();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let activity = Arc::clone(slot.activity());
            let service = hyper::service::service_fn(move |request: http::Request<Incoming>| {
                let busy = activity.busy();
                let mut request = request.map(axum::body::Body::new);
                request.extensions_mut().insert(ConnectInfo(peer));
                let response = app.clone().oneshot(request);
                async move {
                    let _busy = busy;
                    response.await
                }
            });
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            let connection = builder.serve_connection(TokioIo::new(tcp), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = slot.activity().closed() => {}
                _ = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(HEADER_READ_TIMEOUT, connection).await;
                }
            }
        });
    }
    drop(acceptor);
    connections.close();
    connections.wait().await;
}
