//! `--compression` with tonic's own gzip and zstd on the client side: what a
//! client asks for is what it gets, a batch is compressed once however many
//! subscribers receive it, compressed uploads are accepted only when enabled.

mod common;

use bytes::Bytes;
use common::{frames, metric, start, wire, PATIENCE};
use futures::StreamExt;
use packet_ingest::{
    frame::{sha256_frame, Channel},
    pb::{PublishRequest, SubscribeRequest},
};
use tokio::io::AsyncWriteExt;
use tonic::codec::CompressionEncoding;

/// Text-like payloads (compressible), 1 KiB each.
fn text_payload(index: usize) -> Bytes {
    let line = format!("reading {index}: temperature=21.5C humidity=40% status=ok; ");
    Bytes::from(line.repeat(1024 / line.len() + 1)[..1024].to_owned())
}

#[tokio::test]
async fn subscribers_share_one_compression_per_batch() {
    let server = start(&["--compression", "gzip,zstd"]).await;
    const SUBSCRIBERS: usize = 4;
    const PACKETS: usize = 2000;
    let mut streams = Vec::new();
    for _ in 0..SUBSCRIBERS {
        let response = common::client(&server)
            .await
            .accept_compressed(CompressionEncoding::Zstd)
            .subscribe(SubscribeRequest::default())
            .await
            .expect("subscribe");
        assert_eq!(
            response
                .metadata()
                .get("grpc-encoding")
                .map(|v| v.as_bytes()),
            Some(&b"zstd"[..])
        );
        streams.push(response.into_inner());
    }
    let batch: Vec<_> = (0..PACKETS)
        .map(|index| sha256_frame(Channel(1), text_payload(index)))
        .collect();
    let mut producer = tokio::net::TcpStream::connect(server.ingest_addr)
        .await
        .expect("connect");
    producer.write_all(&wire(&batch)).await.expect("send");

    let mut messages = 0u64;
    for stream in &mut streams {
        let mut received = 0;
        while received < PACKETS {
            let response = tokio::time::timeout(PATIENCE, stream.next())
                .await
                .expect("in time")
                .expect("stream open")
                .expect("response");
            for packet in &response.packets {
                assert_eq!(packet.sequence, received as u64 + 1);
                assert_eq!(packet.payload, text_payload(received));
                received += 1;
            }
            if !response.packets.is_empty() {
                messages += 1;
            }
        }
    }
    let compressed = metric(
        &server,
        r#"packet_ingest_compressed_messages_total{encoding="zstd"}"#,
    )
    .await;
    let (raw, sent) = (
        metric(
            &server,
            r#"packet_ingest_compression_input_bytes_total{encoding="zstd"}"#,
        )
        .await,
        metric(
            &server,
            r#"packet_ingest_compression_output_bytes_total{encoding="zstd"}"#,
        )
        .await,
    );
    assert!(compressed >= 1.0);
    // Without sharing every message is compressed for its subscriber.
    assert!(
        compressed * 2.0 <= messages as f64,
        "{compressed} compressions for {messages} messages to {SUBSCRIBERS} subscribers"
    );
    assert!(sent * 4.0 < raw, "text compresses: {raw} -> {sent} bytes");
}

#[tokio::test]
async fn compressed_uploads_and_gzip_subscribers() {
    let server = start(&["--compression", "gzip"]).await;
    let mut subscriber = common::client(&server)
        .await
        .accept_compressed(CompressionEncoding::Gzip)
        .subscribe(SubscribeRequest {
            channels: vec![9],
            ..Default::default()
        })
        .await
        .expect("subscribe")
        .into_inner();
    let requests: Vec<PublishRequest> = (0..100)
        .map(|index| {
            let frame = sha256_frame(Channel(9), text_payload(index));
            PublishRequest {
                channel: 9,
                payload: frame.payload.clone(),
                digest: Bytes::copy_from_slice(&frame.digest.0),
                hmac: false,
            }
        })
        .collect();
    let answer = common::client(&server)
        .await
        .send_compressed(CompressionEncoding::Gzip)
        .publish(futures::stream::iter(requests))
        .await
        .expect("compressed Publish")
        .into_inner();
    assert_eq!((answer.accepted, answer.rejected), (100, 0));
    let mut received = 0;
    while received < 100 {
        let response = tokio::time::timeout(PATIENCE, subscriber.next())
            .await
            .expect("in time")
            .expect("open")
            .expect("response");
        for packet in response.packets {
            assert_eq!(packet.payload, text_payload(received));
            received += 1;
        }
    }
    // zstd is not enabled here: a zstd upload is refused, naming what is.
    let refused = common::client(&server)
        .await
        .send_compressed(CompressionEncoding::Zstd)
        .publish(futures::stream::iter(Vec::<PublishRequest>::new()))
        .await
        .expect_err("zstd is off");
    assert_eq!(refused.code(), tonic::Code::Unimplemented, "{refused:?}");
}

#[tokio::test]
async fn compression_is_off_by_default() {
    let server = start(&[]).await;
    let refused = common::client(&server)
        .await
        .send_compressed(CompressionEncoding::Gzip)
        .publish(futures::stream::iter(Vec::<PublishRequest>::new()))
        .await
        .expect_err("no compression by default");
    assert_eq!(refused.code(), tonic::Code::Unimplemented, "{refused:?}");
    // A client that accepts gzip still gets plain responses.
    let response = common::client(&server)
        .await
        .accept_compressed(CompressionEncoding::Gzip)
        .subscribe(SubscribeRequest::default())
        .await
        .expect("subscribe");
    assert!(response.metadata().get("grpc-encoding").is_none());
    let mut stream = response.into_inner();
    let mut producer = common::send_bytes(&server, &wire(&frames(1, 3, 2048, 0))).await;
    producer.flush().await.expect("flush");
    let mut received = 0;
    while received < 3 {
        let response = tokio::time::timeout(PATIENCE, stream.next())
            .await
            .expect("in time")
            .expect("open")
            .expect("response");
        received += response.packets.len();
    }
    let text = common::scrape(&server).await;
    assert!(
        !text.contains("packet_ingest_compressed_messages_total{"),
        "nothing compressed"
    );
}
