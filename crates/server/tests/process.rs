//! Tests of the real binary as a process: SIGTERM drain and exit status, and
//! memory (peak RSS) with a stalled subscriber.

mod common;

use std::net::SocketAddr;

use common::{process::Process, *};
use tokio::{io::AsyncWriteExt, process::Command};
use tonic::Code;

async fn health(addr: SocketAddr) -> Option<i32> {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .ok()?
        .connect()
        .await
        .ok()?;
    let mut client = HealthClient::new(channel);
    let response = client
        .check(HealthCheckRequest {
            service: "packetingest.v1.Packets".into(),
        })
        .await
        .ok()?;
    Some(response.into_inner().status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_ingest_delivers_everything_then_ends_streams_unavailable() {
    let mut server = Process::spawn(&["--shutdown-grace", "20s"]).await;
    let mut stream = server.subscribe().await;
    let mut producer = tokio::net::TcpStream::connect(server.ingest)
        .await
        .expect("connect");
    producer
        .write_all(&wire(&frames(1, 5000, 100, 0)))
        .await
        .expect("write");
    server.signal("TERM");

    // Health turns NOT_SERVING while the open producer is still being read.
    const NOT_SERVING: i32 = 2;
    eventually("health NOT_SERVING", || async {
        health(server.grpc).await == Some(NOT_SERVING)
    })
    .await;
    // New producers are refused; the open one is still read until EOF.
    eventually("ingest listener closed", || async {
        tokio::net::TcpStream::connect(server.ingest).await.is_err()
    })
    .await;
    producer
        .write_all(&wire(&frames(1, 1000, 100, 1)))
        .await
        .expect("still read");
    producer.shutdown().await.expect("EOF");

    let (packets, missed) = collect(&mut stream, 6000).await;
    assert_eq!(missed, 0);
    assert_ordered(&packets);
    let end = tokio::time::timeout(PATIENCE, stream.message())
        .await
        .expect("stream ends");
    let status = end.expect_err("stream ends with a status");
    assert_eq!(status.code(), Code::Unavailable);
    let exit = tokio::time::timeout(PATIENCE, server.child.wait())
        .await
        .expect("exits")
        .expect("status");
    assert_eq!(exit.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configuration_exits_64_with_one_line() {
    for args in [
        vec!["--max-payload", "lots"],
        vec!["--slow-subscriber", "sometimes"],
        vec!["--require-hmac"],
        vec!["--hmac-key-file", "/nonexistent/key"],
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_packet-ingest"))
            .args(LOOPBACK_ADDRS)
            .args(&args)
            .output()
            .await
            .expect("run");
        assert_eq!(output.status.code(), Some(64), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_subscriber_keeps_rss_under_memory_limit_while_1_gib_passes() {
    const LIMIT: u64 = 128 << 20;
    let server = Process::spawn(&["--memory-limit", "128MiB"]).await;
    let _stalled = server.subscribe().await;
    let mut live = server.subscribe().await;
    let mut producer = tokio::net::TcpStream::connect(server.ingest)
        .await
        .expect("connect");
    let (rounds, per_round) = (64, 16); // 1 GiB of 1 MiB packets
    let round_bytes: Vec<_> = (0..4)
        .map(|round| wire(&frames(1, per_round, 1 << 20, round)))
        .collect();
    let mut received = 0;
    for round in 0..rounds {
        producer
            .write_all(&round_bytes[round % 4])
            .await
            .expect("write");
        let (packets, missed) = collect(&mut live, per_round).await;
        assert_eq!(missed, 0);
        received += packets.len();
    }
    assert_eq!(received, rounds * per_round);
    let peak = server.peak_rss();
    eprintln!(
        "peak RSS with a stalled subscriber after 1 GiB: {} MiB",
        peak >> 20
    );
    assert!(
        peak < LIMIT + (64 << 20),
        "peak RSS {} MiB with a 128 MiB limit",
        peak >> 20
    );
}
