//! Test harness: starts the real server on 127.0.0.1:0 and talks to it over sockets.
#![allow(dead_code)]

pub mod process;

use std::{collections::HashMap, time::Duration};

use bytes::{Bytes, BytesMut};
use clap::Parser;
use packet_ingest::{
    config::{ServeArgs, Settings},
    frame::{sha256_frame, Channel, Frame},
    pb::{packets_client::PacketsClient, Packet, SubscribeRequest, SubscribeResponse},
    server::{self, RunningServer},
};
use tokio::{io::AsyncWriteExt, net::TcpStream};
use tonic::{transport::Channel as GrpcChannel, Streaming};

/// Headless Chromium as root on a closed network: without the networking
/// flags it keeps trying to reach Google's hosts (tests/browser.rs, console.rs).
pub const HEADLESS_CHROMIUM: [&str; 8] = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
];

/// Generous bound for anything a test waits on; a hang fails instead of stalling CI.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// Every listener on an ephemeral loopback port.
pub const LOOPBACK_ADDRS: [&str; 6] = [
    "--grpc-addr",
    "127.0.0.1:0",
    "--ingest-addr",
    "127.0.0.1:0",
    "--metrics-addr",
    "127.0.0.1:0",
];

pub async fn start(extra: &[&str]) -> RunningServer {
    let mut argv = vec!["packet-ingest"];
    argv.extend_from_slice(&LOOPBACK_ADDRS);
    argv.extend_from_slice(extra);
    let args = ServeArgs::try_parse_from(argv).expect("valid test arguments");
    let settings = Settings::load(args).expect("usable test configuration");
    server::start(settings).await.expect("server starts")
}

pub async fn client(server: &RunningServer) -> PacketsClient<GrpcChannel> {
    PacketsClient::connect(format!("http://{}", server.grpc_addr))
        .await
        .expect("gRPC connect")
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

/// Subscribes; when this returns the server has registered the subscriber.
pub async fn subscribe(
    server: &RunningServer,
    channels: Vec<u32>,
    from_sequence: Option<u64>,
) -> Streaming<SubscribeResponse> {
    client(server)
        .await
        .subscribe(SubscribeRequest {
            channels,
            from_sequence,
            ..Default::default()
        })
        .await
        .expect("subscribe")
        .into_inner()
}

pub fn payload(source: usize, index: usize, size: usize) -> Bytes {
    let mut bytes = vec![0u8; size];
    for (offset, byte) in bytes.iter_mut().enumerate() {
        *byte = (source * 31 + index * 7 + offset) as u8;
    }
    Bytes::from(bytes)
}

pub fn wire(frames: &[Frame]) -> BytesMut {
    let mut out = BytesMut::new();
    for frame in frames {
        frame.encode(&mut out);
    }
    out
}

pub fn frames(channel: u32, count: usize, size: usize, source: usize) -> Vec<Frame> {
    (0..count)
        .map(|index| sha256_frame(Channel(channel), payload(source, index, size)))
        .collect()
}

/// Writes `bytes` on a fresh connection and closes the write side.
pub async fn send_bytes(server: &RunningServer, bytes: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(server.ingest_addr)
        .await
        .expect("connect ingest");
    stream.write_all(bytes).await.expect("write");
    stream.shutdown().await.expect("shutdown write side");
    stream
}

/// Reads responses until `count` packets arrived; returns packets and total `missed`.
pub async fn collect(
    stream: &mut Streaming<SubscribeResponse>,
    count: usize,
) -> (Vec<Packet>, u64) {
    let mut packets = Vec::with_capacity(count);
    let mut missed = 0;
    tokio::time::timeout(PATIENCE, async {
        while packets.len() < count {
            let response = stream
                .message()
                .await
                .expect("stream stays healthy")
                .expect("stream stays open");
            missed += response.missed;
            packets.extend(response.packets);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out with {} of {count} packets", packets.len()));
    (packets, missed)
}

/// Asserts strictly increasing sequences, and per source 0.. source_sequences in order.
pub fn assert_ordered(packets: &[Packet]) -> HashMap<String, Vec<&Packet>> {
    let mut by_source: HashMap<String, Vec<&Packet>> = HashMap::new();
    for pair in packets.windows(2) {
        assert!(
            pair[0].sequence < pair[1].sequence,
            "sequences must increase"
        );
    }
    for packet in packets {
        by_source
            .entry(packet.source.clone())
            .or_default()
            .push(packet);
    }
    for packets in by_source.values() {
        for pair in packets.windows(2) {
            assert!(pair[0].source_sequence < pair[1].source_sequence);
        }
    }
    by_source
}

/// Reads a metric value from the server's /metrics text.
pub async fn metric(server: &RunningServer, name: &str) -> f64 {
    let text = scrape(server).await;
    metric_in(&text, name)
}

pub fn metric_in(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (key, value) = line.rsplit_once(' ')?;
            (key == name).then(|| value.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

pub async fn scrape(server: &RunningServer) -> String {
    scrape_at(server.metrics_addr).await
}

/// The /metrics text of the server whose metrics port is `addr`.
pub async fn scrape_at(addr: std::net::SocketAddr) -> String {
    use tokio::io::AsyncReadExt;
    let mut stream = TcpStream::connect(addr).await.expect("metrics connect");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut out = String::new();
    stream.read_to_string(&mut out).await.expect("read");
    out
}

/// Polls `condition` until it holds; for states with no event to wait on
/// (a metric changing after a client vanished). Bounded by PATIENCE.
pub async fn eventually<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
