//! `--otlp-endpoint`: the real binary exports its trace spans over OTLP/gRPC
//! to a collector in this test (opentelemetry-proto's tonic server), with the
//! packet sequence ranges as attributes.

mod common;

use std::{collections::HashMap, net::SocketAddr};

use common::{frames, process::Process, wire, PATIENCE};
use futures::StreamExt;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        trace_service_server::{TraceService, TraceServiceServer},
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    },
    common::v1::{any_value::Value, AnyValue},
    trace::v1::Span,
};
use tokio::{io::AsyncWriteExt, net::TcpStream, sync::mpsc};

/// A collector that hands every received span to the test.
struct Collector(mpsc::UnboundedSender<(Span, String)>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|resource| &resource.attributes)
                .find(|attribute| attribute.key == "service.name")
                .and_then(|attribute| text(attribute.value.as_ref()))
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    let _ = self.0.send((span, service.clone()));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn text(value: Option<&AnyValue>) -> Option<String> {
    match value?.value.as_ref()? {
        Value::StringValue(text) => Some(text.clone()),
        Value::IntValue(number) => Some(number.to_string()),
        _ => None,
    }
}

fn attributes(span: &Span) -> HashMap<String, String> {
    span.attributes
        .iter()
        .filter_map(|attribute| Some((attribute.key.clone(), text(attribute.value.as_ref())?)))
        .collect()
}

async fn start_collector() -> (SocketAddr, mpsc::UnboundedReceiver<(Span, String)>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind collector");
    let addr = listener.local_addr().expect("collector address");
    let (spans_tx, spans) = mpsc::unbounded_channel();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Collector(spans_tx)))
            .serve_with_incoming(tokio_stream_listener(listener)),
    );
    (addr, spans)
}

fn tokio_stream_listener(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<TcpStream>> {
    futures::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| stream);
        Some((accepted, listener))
    })
}

#[tokio::test]
async fn spans_reach_an_otlp_collector_with_sequence_ranges() {
    let (collector, mut spans) = start_collector().await;
    // Export batches quickly rather than every 5 s.
    std::env::set_var("OTEL_BSP_SCHEDULE_DELAY", "100");
    let server = Process::spawn(&["--otlp-endpoint", &format!("http://{collector}")]).await;
    let mut subscriber = server.subscribe().await;
    let mut producer = TcpStream::connect(server.ingest).await.expect("connect");
    producer
        .write_all(&wire(&frames(4, 10, 256, 0)))
        .await
        .expect("send");
    let mut received = 0;
    while received < 10 {
        let response = tokio::time::timeout(PATIENCE, subscriber.next())
            .await
            .expect("in time")
            .expect("open")
            .expect("response");
        received += response.packets.len();
    }

    // Every span kind, with what it carries, within PATIENCE.
    let mut seen: HashMap<String, Vec<HashMap<String, String>>> = HashMap::new();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let wanted = ["verify_batch", "publish", "deliver"];
    while !wanted.iter().all(|name| seen.contains_key(*name)) {
        let (span, service) = tokio::time::timeout_at(deadline, spans.recv())
            .await
            .unwrap_or_else(|_| panic!("spans seen so far: {seen:?}"))
            .expect("collector runs");
        assert_eq!(service, "packet-ingest");
        assert!(span.end_time_unix_nano >= span.start_time_unix_nano);
        seen.entry(span.name.clone())
            .or_default()
            .push(attributes(&span));
    }
    let first_and_last = |name: &str, first: &str, last: &str| -> (u64, u64) {
        seen[name]
            .iter()
            .filter_map(|attrs| {
                Some((
                    attrs.get(first)?.parse().ok()?,
                    attrs.get(last)?.parse().ok()?,
                ))
            })
            .fold((u64::MAX, 0), |(low, high), (a, b)| {
                (low.min(a), high.max(b))
            })
    };
    let published = first_and_last("publish", "first_sequence", "last_sequence");
    let verified: u64 = seen["verify_batch"]
        .iter()
        .filter_map(|attrs| attrs.get("accepted")?.parse::<u64>().ok())
        .sum();
    assert!(verified >= 1, "{:?}", seen["verify_batch"]);
    assert_eq!(published.0, 1, "{:?}", seen["publish"]);
    assert!(
        published.1 >= 1 && published.1 <= 10,
        "{:?}",
        seen["publish"]
    );
    let delivered = first_and_last("deliver", "from_sequence", "to_sequence");
    assert_eq!(delivered.0, 1, "{:?}", seen["deliver"]);
    drop(server);
}
