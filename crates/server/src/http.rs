//! The plain-HTTP side port: `GET /metrics` (Prometheus text) and `GET /healthz`
//! (200 while serving; 503 once shutdown has begun, or while the log cannot
//! be written, with the reason, for HTTP probes).

use std::sync::Arc;

use axum::{
    http::{header, StatusCode},
    response::IntoResponse,
    routing::get,
    Router,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Serves until `shutdown` fires; `/healthz` fails from when `draining`
/// fires, and while `storage_failing` holds a reason.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    draining: CancellationToken,
    storage_failing: tokio::sync::watch::Receiver<Option<String>>,
    shutdown: CancellationToken,
) {
    let app = Router::new()
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
    if let Err(error) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        tracing::error!(%error, "metrics server failed");
    }
}
