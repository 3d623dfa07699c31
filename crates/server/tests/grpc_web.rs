//! gRPC-Web on the gRPC port, over real sockets and HTTP/1.1 as browsers
//! speak it: PublishBatch, StreamInfo and a streaming Subscribe in binary
//! and text (base64) mode, CORS preflights for configured origins only,
//! auth and permissions applied as for gRPC, and HTTP/1.1 requests that are
//! not gRPC-Web refused without harming the port. The browser itself is
//! in `browser.rs`.

mod common;

use std::{net::SocketAddr, time::Duration};

use base64::Engine;
use bytes::{Buf, Bytes, BytesMut};
use common::{start, PATIENCE};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use packet_ingest::{
    frame::{sha256_frame, Channel},
    pb::{
        PublishBatchRequest, PublishRequest, PublishResponse, StreamInfoRequest,
        StreamInfoResponse, SubscribeRequest, SubscribeResponse,
    },
};
use prost::Message;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const PACKETS: &str = "/packetingest.v1.Packets/";
const BINARY: &str = "application/grpc-web+proto";
const TEXT: &str = "application/grpc-web-text";

/// One gRPC-Web call over a fresh HTTP/1.1 connection.
struct WebCall {
    status: StatusCode,
    headers: HeaderMap,
    body: Incoming,
    text: bool,
    /// Text mode: base64 not yet decoded (an incomplete group).
    text_pending: BytesMut,
    buffer: BytesMut,
}

impl WebCall {
    async fn send(
        addr: SocketAddr,
        method: &str,
        message: &impl Message,
        text: bool,
        extra: &[(&str, &str)],
    ) -> WebCall {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .expect("HTTP/1.1 handshake");
        tokio::spawn(connection);
        let mut body = vec![0u8];
        let encoded = message.encode_to_vec();
        body.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
        body.extend_from_slice(&encoded);
        let body = if text {
            base64::engine::general_purpose::STANDARD
                .encode(&body)
                .into_bytes()
        } else {
            body
        };
        let mut request = Request::post(format!("http://{addr}{PACKETS}{method}"))
            .header("content-type", if text { TEXT } else { BINARY })
            .header("accept", if text { TEXT } else { BINARY })
            .header("x-grpc-web", "1");
        for (name, value) in extra {
            request = request.header(*name, *value);
        }
        let request = request.body(Full::new(Bytes::from(body))).expect("request");
        let response = tokio::time::timeout(PATIENCE, sender.send_request(request))
            .await
            .expect("response in time")
            .expect("response");
        let (parts, body) = response.into_parts();
        WebCall {
            status: parts.status,
            headers: parts.headers,
            body,
            text,
            text_pending: BytesMut::new(),
            buffer: BytesMut::new(),
        }
    }

    /// The next frame of the response: `Ok(message)` or `Err(trailers)`;
    /// `None` when the body ends without one.
    async fn next(&mut self) -> Option<Result<Bytes, String>> {
        loop {
            if let Some(frame) = self.take_frame() {
                return Some(frame);
            }
            let chunk = tokio::time::timeout(PATIENCE, self.body.frame())
                .await
                .expect("response body in time")?
                .expect("response body");
            let Ok(data) = chunk.into_data() else {
                continue; // HTTP trailers: gRPC-Web carries its own
            };
            if self.text {
                // Each chunk is base64 with its own padding: decode group by group.
                self.text_pending.extend_from_slice(&data);
                let whole = self.text_pending.len() / 4 * 4;
                for group in self.text_pending[..whole].chunks(4) {
                    let decoded = base64::engine::general_purpose::STANDARD
                        .decode(group)
                        .expect("base64 response");
                    self.buffer.extend_from_slice(&decoded);
                }
                self.text_pending.advance(whole);
            } else {
                self.buffer.extend_from_slice(&data);
            }
        }
    }

    fn take_frame(&mut self) -> Option<Result<Bytes, String>> {
        if self.buffer.len() < 5 {
            return None;
        }
        let flag = self.buffer[0];
        let len = u32::from_be_bytes([
            self.buffer[1],
            self.buffer[2],
            self.buffer[3],
            self.buffer[4],
        ]) as usize;
        if self.buffer.len() < 5 + len {
            return None;
        }
        self.buffer.advance(5);
        let payload = self.buffer.split_to(len).freeze();
        Some(if flag & 0x80 != 0 {
            Err(String::from_utf8_lossy(&payload).into_owned())
        } else {
            Ok(payload)
        })
    }

    /// A unary call's one message and its trailers.
    async fn unary<M: Message + Default>(mut self) -> (M, String) {
        assert_eq!(self.status, StatusCode::OK, "headers: {:?}", self.headers);
        let message = match self.next().await {
            Some(Ok(message)) => M::decode(message).expect("response message"),
            other => panic!(
                "expected a message, got {other:?} (headers {:?})",
                self.headers
            ),
        };
        match self.next().await {
            Some(Err(trailers)) => (message, trailers),
            other => panic!("expected trailers, got {other:?}"),
        }
    }

    /// The grpc-status of a call refused before any message (trailers-only).
    async fn refusal(mut self) -> String {
        if let Some(status) = self.headers.get("grpc-status") {
            return status.to_str().expect("ascii").to_owned();
        }
        match self.next().await {
            Some(Err(trailers)) => trailers,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
}

fn packet(channel: u32, payload: &[u8]) -> PublishRequest {
    let frame = sha256_frame(Channel(channel), Bytes::copy_from_slice(payload));
    PublishRequest {
        channel,
        payload: frame.payload.clone(),
        digest: Bytes::copy_from_slice(&frame.digest.0),
        hmac: false,
    }
}

fn batch(channel: u32, payloads: &[&str]) -> PublishBatchRequest {
    PublishBatchRequest {
        packets: payloads
            .iter()
            .map(|payload| packet(channel, payload.as_bytes()))
            .collect(),
    }
}

#[tokio::test]
async fn publish_batch_stream_info_and_subscribe_over_http1() {
    let server = start(&[]).await;
    let addr = server.grpc_addr;

    let call = WebCall::send(
        addr,
        "PublishBatch",
        &batch(7, &["one", "two", "three"]),
        false,
        &[],
    )
    .await;
    assert_eq!(
        call.headers.get("content-type").map(|v| v.as_bytes()),
        Some(BINARY.as_bytes())
    );
    let (answer, trailers): (PublishResponse, _) = call.unary().await;
    assert_eq!(
        (answer.accepted, answer.rejected, answer.last_sequence),
        (3, 0, 3)
    );
    assert!(trailers.contains("grpc-status:0"), "{trailers}");

    // Text mode (base64 both ways), as grpc-web's default client mode.
    let (info, _): (StreamInfoResponse, _) =
        WebCall::send(addr, "StreamInfo", &StreamInfoRequest {}, true, &[])
            .await
            .unary()
            .await;
    assert_eq!((info.first_sequence, info.next_sequence), (1, 4));
    assert!(info.stream_id.starts_with("mem-"), "{}", info.stream_id);

    // A streaming Subscribe replays, then goes live, in both modes.
    for text in [false, true] {
        let request = SubscribeRequest {
            channels: vec![7],
            from_sequence: Some(1),
            ..Default::default()
        };
        let mut call = WebCall::send(addr, "Subscribe", &request, text, &[]).await;
        assert_eq!(call.status, StatusCode::OK);
        assert_eq!(
            call.headers
                .get("packet-ingest-stream-id")
                .map(|v| v.to_str().unwrap_or_default().to_owned()),
            Some(info.stream_id.clone())
        );
        let mut seen = Vec::new();
        while seen.len() < 3 {
            match call.next().await {
                Some(Ok(message)) => {
                    let response = SubscribeResponse::decode(message).expect("response");
                    seen.extend(
                        response
                            .packets
                            .into_iter()
                            .map(|p| (p.sequence, p.payload)),
                    );
                }
                other => panic!("stream ended early: {other:?}"),
            }
        }
        assert_eq!(
            seen,
            [
                (1, Bytes::from("one")),
                (2, Bytes::from("two")),
                (3, Bytes::from("three"))
            ]
        );
    }
    // Live: a packet published after the subscription started arrives too.
    let request = SubscribeRequest {
        channels: vec![7],
        ..Default::default()
    };
    let mut live = WebCall::send(addr, "Subscribe", &request, false, &[]).await;
    common::eventually("the gRPC-Web subscriber is registered", || async {
        common::metric(&server, "packet_ingest_subscribers").await >= 1.0
    })
    .await;
    let (answer, _): (PublishResponse, _) =
        WebCall::send(addr, "PublishBatch", &batch(7, &["four"]), false, &[])
            .await
            .unary()
            .await;
    assert_eq!(answer.last_sequence, 4);
    loop {
        let message = match live.next().await {
            Some(Ok(message)) => message,
            other => panic!("live stream ended: {other:?}"),
        };
        let response = SubscribeResponse::decode(message).expect("response");
        if let Some(packet) = response.packets.first() {
            assert_eq!(
                (packet.sequence, packet.payload.as_ref()),
                (4, &b"four"[..])
            );
            break;
        }
    }
}

#[tokio::test]
async fn publish_batch_checks_every_packet_like_publish() {
    let server = start(&[]).await;
    let addr = server.grpc_addr;
    let mut request = batch(3, &["good", "bad digest", "also good"]);
    request.packets[1].digest = Bytes::from_static(&[0u8; 32]);
    let (answer, _): (PublishResponse, _) =
        WebCall::send(addr, "PublishBatch", &request, false, &[])
            .await
            .unary()
            .await;
    assert_eq!((answer.accepted, answer.rejected), (2, 1));

    // Over the size limit: INVALID_ARGUMENT (3), nothing published.
    let big = PublishBatchRequest {
        packets: (0..40).map(|_| packet(3, &vec![b'x'; 32 * 1024])).collect(),
    };
    let status = WebCall::send(addr, "PublishBatch", &big, false, &[])
        .await
        .refusal()
        .await;
    assert!(status.contains('3'), "{status}");
    let (info, _): (StreamInfoResponse, _) =
        WebCall::send(addr, "StreamInfo", &StreamInfoRequest {}, false, &[])
            .await
            .unary()
            .await;
    assert_eq!(info.next_sequence, 3, "only the two good packets");
}

#[tokio::test]
async fn tokens_and_permissions_apply_to_grpc_web() {
    let dir = tempfile::tempdir().expect("temp dir");
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "writer publish=5\nreader subscribe=5\n").expect("token file");
    let server = start(&["--auth-token-file", tokens.to_str().expect("utf-8")]).await;
    let addr = server.grpc_addr;
    let status = WebCall::send(addr, "PublishBatch", &batch(5, &["x"]), false, &[])
        .await
        .refusal()
        .await;
    assert!(
        status.contains("16"),
        "no token: UNAUTHENTICATED, got {status}"
    );
    let status = WebCall::send(
        addr,
        "PublishBatch",
        &batch(6, &["x"]),
        false,
        &[("authorization", "Bearer writer")],
    )
    .await
    .refusal()
    .await;
    assert!(
        status.contains('7'),
        "other channel: PERMISSION_DENIED, got {status}"
    );
    let (answer, _): (PublishResponse, _) = WebCall::send(
        addr,
        "PublishBatch",
        &batch(5, &["x"]),
        false,
        &[("authorization", "Bearer writer")],
    )
    .await
    .unary()
    .await;
    assert_eq!(answer.accepted, 1);
}

async fn preflight(addr: SocketAddr, origin: &str) -> (StatusCode, HeaderMap) {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("handshake");
    tokio::spawn(connection);
    let request = Request::builder()
        .method(Method::OPTIONS)
        .uri(format!("http://{addr}{PACKETS}Subscribe"))
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "content-type,x-grpc-web,authorization",
        )
        .body(Full::new(Bytes::new()))
        .expect("request");
    let response = sender.send_request(request).await.expect("response");
    (response.status(), response.headers().clone())
}

#[tokio::test]
async fn cors_allows_only_the_configured_origins() {
    let open = start(&["--cors-origin", "http://app.example:8080"]).await;
    let (status, headers) = preflight(open.grpc_addr, "http://app.example:8080").await;
    assert!(status.is_success(), "{status}");
    assert_eq!(
        headers
            .get("access-control-allow-origin")
            .map(|v| v.as_bytes()),
        Some(&b"http://app.example:8080"[..])
    );
    let allowed = headers
        .get("access-control-allow-headers")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    for header in ["content-type", "x-grpc-web", "authorization"] {
        assert!(allowed.contains(header), "{header} not in {allowed}");
    }
    let (_, headers) = preflight(open.grpc_addr, "http://evil.example").await;
    assert!(headers.get("access-control-allow-origin").is_none());
    // A real call from the allowed origin exposes grpc-status to its script.
    let call = WebCall::send(
        open.grpc_addr,
        "StreamInfo",
        &StreamInfoRequest {},
        false,
        &[("origin", "http://app.example:8080")],
    )
    .await;
    let exposed = call
        .headers
        .get("access-control-expose-headers")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(exposed.contains("grpc-status"), "{exposed}");

    // By default no origin is allowed.
    let closed = start(&[]).await;
    let (_, headers) = preflight(closed.grpc_addr, "http://app.example:8080").await;
    assert!(headers.get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn http1_that_is_not_grpc_web_is_refused_and_the_port_stays_up() {
    let server = start(&["--grpc-handshake-timeout", "1s"]).await;
    let addr = server.grpc_addr;
    // A plain GET: 400, the connection may stay or go.
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write");
    let mut response = vec![0u8; 64];
    let read = tokio::time::timeout(PATIENCE, tcp.read(&mut response))
        .await
        .expect("answer in time")
        .expect("read");
    assert!(
        response[..read].starts_with(b"HTTP/1.1 400"),
        "{:?}",
        String::from_utf8_lossy(&response[..read])
    );
    // Headers that never end are cut off by the handshake timeout.
    let mut slow = TcpStream::connect(addr).await.expect("connect");
    slow.write_all(b"POST /packetingest.v1.Packets/StreamInfo HTTP/1.1\r\nhost: x\r\n")
        .await
        .expect("write");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(20), slow.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "a request whose headers never end is closed"
    );
    // gRPC over HTTP/2 is unaffected.
    let info = common::client(&server)
        .await
        .stream_info(StreamInfoRequest {})
        .await
        .expect("StreamInfo over HTTP/2");
    assert_eq!(info.into_inner().next_sequence, 1);
}

#[tokio::test]
async fn a_cancelled_publish_gives_back_its_slot_and_gauge() {
    let server = start(&[]).await;
    // A Publish upload that never ends, then the client goes away.
    let (tx, rx) = tokio::sync::mpsc::channel::<PublishRequest>(1);
    let mut client = common::client(&server).await;
    let call = tokio::spawn(async move {
        client
            .publish(tokio_stream_from(rx))
            .await
            .map(|response| response.into_inner().accepted)
    });
    tx.send(packet(1, b"first")).await.expect("send");
    common::eventually("the upload is counted", || async {
        common::metric(&server, "packet_ingest_publishers").await == 1.0
    })
    .await;
    call.abort();
    drop(tx);
    common::eventually("the cancelled upload is no longer counted", || async {
        common::metric(&server, "packet_ingest_publishers").await == 0.0
    })
    .await;
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<PublishRequest>,
) -> impl futures::Stream<Item = PublishRequest> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
