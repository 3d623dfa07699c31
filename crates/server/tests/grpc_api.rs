//! The gRPC port as an outside client sees it, over real sockets: reflection
//! (v1 and v1alpha: list, describe), health, StreamInfo and the stream-id
//! header, a resume naming another stream, and packets sent by the
//! `packet-ingest send` tool arriving with every field.
//!
//! What `.ci/grpcurl-smoke.sh` then repeats with a real `grpcurl` is only a
//! smoke test; the behaviour is pinned here. Neighbouring checks live where the
//! behaviour does: OUT_OF_RANGE, heartbeats and Publish counts in `flow.rs`,
//! SIGTERM (exit 0, open streams end UNAVAILABLE) in `process.rs`.

mod common;

use std::process::Stdio;

use common::*;
use packet_ingest::{
    grpc::STREAM_ID_HEADER,
    pb::{StreamInfoRequest, StreamInfoResponse, SubscribeRequest},
    server::RunningServer,
};
use prost::Message;
use prost_types::{field_descriptor_proto, FileDescriptorProto};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tonic::{transport::Channel as GrpcChannel, Code};
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};
use tonic_reflection::pb::{v1, v1alpha};

const PACKETS: &str = "packetingest.v1.Packets";
const HEALTH: &str = "grpc.health.v1.Health";

async fn channel(server: &RunningServer) -> GrpcChannel {
    tonic::transport::Endpoint::from_shared(format!("http://{}", server.grpc_addr))
        .expect("endpoint")
        .connect()
        .await
        .expect("gRPC connect")
}

/// One grpc.reflection.v1 request, its one answer.
async fn reflect(
    server: &RunningServer,
    request: v1::server_reflection_request::MessageRequest,
) -> v1::server_reflection_response::MessageResponse {
    let mut client =
        v1::server_reflection_client::ServerReflectionClient::new(channel(server).await);
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let mut responses = client
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .expect("reflection call")
        .into_inner();
    tokio::time::timeout(PATIENCE, responses.message())
        .await
        .expect("reflection answers in time")
        .expect("reflection stream healthy")
        .expect("one response")
        .message_response
        .expect("a message response")
}

/// The file descriptor reflection returns for `symbol`.
async fn file_of(server: &RunningServer, symbol: &str) -> FileDescriptorProto {
    use v1::{server_reflection_request::MessageRequest, server_reflection_response as r};
    let response = reflect(server, MessageRequest::FileContainingSymbol(symbol.into())).await;
    let r::MessageResponse::FileDescriptorResponse(files) = response else {
        panic!("{symbol}: not a file descriptor response: {response:?}");
    };
    let bytes = files.file_descriptor_proto.first().expect("one file");
    FileDescriptorProto::decode(bytes.as_slice()).expect("a FileDescriptorProto")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_v1_lists_the_packets_and_health_services() {
    use v1::{server_reflection_request::MessageRequest, server_reflection_response as r};
    let server = start(&[]).await;
    let response = reflect(&server, MessageRequest::ListServices(String::new())).await;
    let r::MessageResponse::ListServicesResponse(list) = response else {
        panic!("not a list: {response:?}");
    };
    let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    for want in [PACKETS, HEALTH] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
}

/// `grpcurl list` falls back to v1alpha against servers without v1; both answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_v1alpha_lists_the_packets_service_too() {
    use v1alpha::{server_reflection_request::MessageRequest, server_reflection_response as r};
    let server = start(&[]).await;
    let mut client =
        v1alpha::server_reflection_client::ServerReflectionClient::new(channel(&server).await);
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .expect("v1alpha reflection call")
        .into_inner();
    let response = tokio::time::timeout(PATIENCE, responses.message())
        .await
        .expect("in time")
        .expect("healthy")
        .expect("one response");
    let Some(r::MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("not a list: {response:?}");
    };
    assert!(list.service.iter().any(|s| s.name == PACKETS));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_describes_the_rpcs_and_the_subscribe_request() {
    let server = start(&[]).await;

    // `grpcurl describe packetingest.v1.Packets`
    let file = file_of(&server, PACKETS).await;
    assert_eq!(file.package(), "packetingest.v1");
    let service = file
        .service
        .iter()
        .find(|s| s.name() == "Packets")
        .expect("service Packets");
    let rpc = |name: &str| {
        let m = service
            .method
            .iter()
            .find(|m| m.name() == name)
            .unwrap_or_else(|| panic!("rpc {name}"));
        (
            m.input_type(),
            m.output_type(),
            m.client_streaming(),
            m.server_streaming(),
        )
    };
    assert_eq!(
        rpc("Subscribe"),
        (
            ".packetingest.v1.SubscribeRequest",
            ".packetingest.v1.SubscribeResponse",
            false,
            true
        )
    );
    assert_eq!(
        rpc("Publish"),
        (
            ".packetingest.v1.PublishRequest",
            ".packetingest.v1.PublishResponse",
            true,
            false
        )
    );
    assert_eq!(
        rpc("StreamInfo"),
        (
            ".packetingest.v1.StreamInfoRequest",
            ".packetingest.v1.StreamInfoResponse",
            false,
            false
        )
    );

    // `grpcurl describe packetingest.v1.SubscribeRequest`
    let file = file_of(&server, "packetingest.v1.SubscribeRequest").await;
    let message = file
        .message_type
        .iter()
        .find(|m| m.name() == "SubscribeRequest")
        .expect("message SubscribeRequest");
    let field = |name: &str| {
        message
            .field
            .iter()
            .find(|f| f.name() == name)
            .unwrap_or_else(|| panic!("field {name}"))
    };
    use field_descriptor_proto::{Label, Type};
    let channels = field("channels");
    assert_eq!(
        (channels.number(), channels.label(), channels.r#type()),
        (1, Label::Repeated, Type::Uint32)
    );
    let from = field("from_sequence");
    assert_eq!((from.number(), from.r#type()), (2, Type::Uint64));
    assert!(from.proto3_optional(), "from_sequence is `optional`");
    let stream_id = field("stream_id");
    assert_eq!((stream_id.number(), stream_id.r#type()), (3, Type::String));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_serves_the_server_and_the_packets_service_and_not_found_otherwise() {
    let server = start(&[]).await;
    let mut health = HealthClient::new(channel(&server).await);
    for service in ["", PACKETS] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap_or_else(|status| panic!("check {service:?}: {status:?}"))
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "{service:?}");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .expect_err("an unknown service");
    assert_eq!(unknown.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_info_names_the_stream_in_body_and_header_and_counts_what_is_retained() {
    let server = start(&[]).await;
    let info = |response: tonic::Response<StreamInfoResponse>| {
        let header = response
            .metadata()
            .get(STREAM_ID_HEADER)
            .expect("stream-id header")
            .to_str()
            .expect("ascii")
            .to_owned();
        (header, response.into_inner())
    };

    let (header, empty) = info(
        client(&server)
            .await
            .stream_info(StreamInfoRequest {})
            .await
            .expect("StreamInfo"),
    );
    assert!(empty.stream_id.starts_with("mem-"), "{empty:?}");
    assert!(empty.stream_id.len() <= 64);
    assert_eq!(empty.stream_id, header);
    assert_eq!(empty.stream_id, &*server.stream_id);
    assert_eq!(
        (empty.next_sequence, empty.retained_packets, empty.durable),
        (1, 0, false)
    );

    // Subscribe and Publish carry the same header.
    let mut live = client(&server)
        .await
        .subscribe(SubscribeRequest::default())
        .await
        .expect("subscribe");
    assert_eq!(
        live.metadata()
            .get(STREAM_ID_HEADER)
            .map(|v| v.to_str().expect("ascii")),
        Some(header.as_str())
    );
    send_bytes(&server, &wire(&frames(7, 2, 100, 0))).await;
    collect(live.get_mut(), 2).await;

    let (_, two) = info(
        client(&server)
            .await
            .stream_info(StreamInfoRequest {})
            .await
            .expect("StreamInfo"),
    );
    assert_eq!(two.stream_id, empty.stream_id);
    assert_eq!(
        (two.first_sequence, two.next_sequence, two.retained_packets),
        (1, 3, 2)
    );
    assert!(two.retained_bytes >= 200, "{two:?}");
    assert!(two.oldest_received_unix_nanos > 0, "{two:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_resuming_another_stream_is_failed_precondition_naming_this_one() {
    let server = start(&[]).await;
    let status = client(&server)
        .await
        .subscribe(SubscribeRequest {
            from_sequence: Some(1),
            stream_id: "mem-some-other-stream".into(),
            ..Default::default()
        })
        .await
        .expect_err("another stream");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains(&*server.stream_id),
        "the message names the current stream: {}",
        status.message()
    );
    // The current id resumes.
    client(&server)
        .await
        .subscribe(SubscribeRequest {
            from_sequence: Some(1),
            stream_id: server.stream_id.to_string(),
            ..Default::default()
        })
        .await
        .expect("resume within the stream");
}

/// What `grpcurl ... Subscribe` showed of two packets cut from one input by
/// `packet-ingest send --split size`: every field of each, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packets_from_the_send_tool_arrive_in_order_with_every_field() {
    let server = start(&[]).await;
    let mut stream = subscribe(&server, vec![], Some(1)).await;

    let text = format!("{:<100}", "grpc_api: hello from packet-ingest send");
    let binary: Vec<u8> = (0..100u32).map(|i| (i * 37 + 11) as u8).collect();
    let input = [text.as_bytes(), &binary].concat();
    let mut send = tokio::process::Command::new(env!("CARGO_BIN_EXE_packet-ingest"))
        .args(["send", "--addr", &server.ingest_addr.to_string()])
        .args(["--channel", "42", "--split", "size", "--chunk-size", "100"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn packet-ingest send");
    let mut stdin = send.stdin.take().expect("stdin");
    stdin.write_all(&input).await.expect("write stdin");
    drop(stdin);
    let output = tokio::time::timeout(PATIENCE, send.wait_with_output())
        .await
        .expect("send finishes")
        .expect("send status");
    assert!(
        output.status.success(),
        "packet-ingest send: {}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );

    let (packets, missed) = collect(&mut stream, 2).await;
    assert_eq!(missed, 0);
    for (index, (packet, payload)) in packets.iter().zip([text.as_bytes(), &binary]).enumerate() {
        let mut header = Vec::from(*b"PK\x01\x00");
        header.extend_from_slice(&42u32.to_be_bytes());
        header.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        let digest = Sha256::new()
            .chain_update(&header)
            .chain_update(payload)
            .finalize();
        assert_eq!(packet.sequence, index as u64 + 1);
        assert_eq!(packet.channel, 42);
        assert_eq!(&packet.payload[..], payload);
        assert_eq!(&packet.digest[..], &digest[..]);
        assert!(
            packet.source.starts_with("tcp/127.0.0.1:"),
            "{}",
            packet.source
        );
        assert_eq!(packet.source_sequence, index as u64);
        assert!(packet.received_unix_nanos > 0);
    }
}
