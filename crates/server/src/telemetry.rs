//! Logging and tracing set-up: the log lines on stderr (text or JSON, level
//! from `RUST_LOG`), and with `--otlp-endpoint` an OpenTelemetry layer that
//! exports this crate's trace spans over OTLP/gRPC (tonic): `ingest` and
//! `grpc_connection` per connection, `verify_batch` and `publish` per batch
//! (with `first_sequence`/`last_sequence`), `deliver` per response (with
//! `from_sequence`/`to_sequence`). Those spans are at debug level so that they
//! cost nothing when nothing exports them; the OTLP layer alone enables them
//! (the log keeps its own level). Metrics stay Prometheus.
//!
//! The exporter runs on the tokio runtime (its batch task and channel live
//! there), so `init` is called inside it; spans are batched and sent in the
//! background (the `OTEL_BSP_*` variables tune the batching), and `shutdown`
//! flushes what is left.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{
    runtime,
    trace::{span_processor_with_async_runtime::BatchSpanProcessor, SdkTracerProvider},
    Resource,
};
use tracing_subscriber::{
    filter::Targets, layer::SubscriberExt, util::SubscriberInitExt, EnvFilter, Layer,
};

use crate::config::LogFormat;

/// What `init` set up; `shutdown` flushes the trace exporter.
#[derive(Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

#[derive(Debug, thiserror::Error)]
#[error("--otlp-endpoint {endpoint}: {message}")]
pub struct TelemetryError {
    endpoint: String,
    message: String,
}

impl Telemetry {
    /// Sends the spans still batched (bounded by the exporter's timeout).
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            if let Err(error) = provider.shutdown() {
                eprintln!("packet-ingest: flushing traces failed: {error}");
            }
        }
    }
}

/// Installs the global subscriber. Call inside the tokio runtime.
pub fn init(format: LogFormat, otlp_endpoint: Option<&str>) -> Result<Telemetry, TelemetryError> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let log = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let log = match format {
        LogFormat::Text => log.boxed(),
        LogFormat::Json => log.json().boxed(),
    }
    .with_filter(filter);
    let Some(endpoint) = otlp_endpoint else {
        tracing_subscriber::registry().with(log).init();
        return Ok(Telemetry::default());
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|error| TelemetryError {
            endpoint: endpoint.to_owned(),
            message: error.to_string(),
        })?;
    let provider = SdkTracerProvider::builder()
        .with_span_processor(BatchSpanProcessor::builder(exporter, runtime::Tokio).build())
        .with_resource(
            Resource::builder()
                .with_service_name("packet-ingest")
                .with_attribute(opentelemetry::KeyValue::new(
                    "service.version",
                    env!("CARGO_PKG_VERSION"),
                ))
                .build(),
        )
        .build();
    let traces = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("packet-ingest"))
        .with_filter(Targets::new().with_target("packet_ingest", tracing::Level::DEBUG));
    tracing_subscriber::registry().with(log).with(traces).init();
    Ok(Telemetry {
        provider: Some(provider),
    })
}
