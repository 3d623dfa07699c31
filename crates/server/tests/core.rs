//! Black-box tests of the core service over real sockets: ordering, filters,
//! bad input, big packets, reactor responsiveness, subscriber cleanup.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use packet_ingest::frame::{sha256_frame, signed_header, Channel};
use tokio::io::AsyncReadExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_connections_reach_two_subscribers_complete_and_in_order() {
    let server = start(&[]).await;
    let mut first = subscribe(&server, vec![], None).await;
    let mut second = subscribe(&server, vec![], None).await;
    const CONNECTIONS: usize = 4;
    const PER_CONNECTION: usize = 3000;
    let mut producers = Vec::new();
    for source in 0..CONNECTIONS {
        let addr = server.ingest_addr;
        producers.push(tokio::spawn(async move {
            // Mixed sizes so batches finish out of order on the pool.
            let frames: Vec<_> = (0..PER_CONNECTION)
                .map(|index| {
                    let size = if index % 97 == 0 {
                        200_000
                    } else {
                        index % 300
                    };
                    sha256_frame(Channel(source as u32), payload(source, index, size))
                })
                .collect();
            let bytes = wire(&frames);
            let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
            tokio::io::AsyncWriteExt::write_all(&mut stream, &bytes)
                .await
                .expect("write");
        }));
    }
    for producer in producers {
        producer.await.expect("producer");
    }
    let total = CONNECTIONS * PER_CONNECTION;
    for stream in [&mut first, &mut second] {
        let (packets, missed) = collect(stream, total).await;
        assert_eq!(missed, 0);
        assert_eq!(packets.len(), total);
        assert_eq!(packets.first().map(|p| p.sequence), Some(1));
        assert_eq!(packets.last().map(|p| p.sequence), Some(total as u64));
        let by_source = assert_ordered(&packets);
        assert_eq!(by_source.len(), CONNECTIONS);
        for packets in by_source.values() {
            let source = packets[0].channel as usize;
            for (index, packet) in packets.iter().enumerate() {
                assert_eq!(packet.source_sequence, index as u64);
                let size = if index % 97 == 0 {
                    200_000
                } else {
                    index % 300
                };
                assert_eq!(
                    packet.payload,
                    payload(source, index, size),
                    "payload {index}"
                );
                assert!(packet.source.starts_with("tcp/127.0.0.1:"));
                assert!(packet.received_unix_nanos > 0);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_filter_delivers_only_requested_channels() {
    let server = start(&[]).await;
    let mut filtered = subscribe(&server, vec![2, 5], None).await;
    let mut all = subscribe(&server, vec![], None).await;
    let frames: Vec<_> = (0..300)
        .map(|index| sha256_frame(Channel(index % 7), payload(0, index as usize, 10)))
        .collect();
    send_bytes(&server, &wire(&frames)).await;
    let (everything, _) = collect(&mut all, 300).await;
    let expected: Vec<u64> = everything
        .iter()
        .filter(|p| p.channel == 2 || p.channel == 5)
        .map(|p| p.sequence)
        .collect();
    let (packets, missed) = collect(&mut filtered, expected.len()).await;
    assert_eq!(missed, 0);
    assert_eq!(
        packets.iter().map(|p| p.sequence).collect::<Vec<_>>(),
        expected
    );
}

/// Sends 3 good frames then `bad`, and checks the good ones arrive, the
/// connection is closed (or not) as SPEC §2 says, and the service still serves.
async fn bad_input_case(bad: Vec<u8>, closes: bool, reason: &str) {
    let server = start(&["--max-payload", "4096"]).await;
    let mut stream = subscribe(&server, vec![], None).await;
    let mut bytes = wire(&frames(1, 3, 50, 0)).to_vec();
    bytes.extend_from_slice(&bad);
    let mut connection = tokio::net::TcpStream::connect(server.ingest_addr)
        .await
        .expect("connect");
    tokio::io::AsyncWriteExt::write_all(&mut connection, &bytes)
        .await
        .expect("write");
    if closes {
        // The server closes on its own; EOF arrives without us closing first.
        let mut sink = Vec::new();
        let read = tokio::time::timeout(PATIENCE, connection.read_to_end(&mut sink)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "server must close the connection"
        );
    } else {
        tokio::io::AsyncWriteExt::shutdown(&mut connection)
            .await
            .expect("shutdown");
    }
    let (packets, _) = collect(&mut stream, 3).await;
    assert_eq!(
        packets
            .iter()
            .map(|p| p.source_sequence)
            .collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    // Still serving: a fresh connection's packet arrives right after.
    send_bytes(&server, &wire(&frames(9, 1, 5, 1))).await;
    let (next, _) = collect(&mut stream, 1).await;
    assert_eq!(next[0].channel, 9);
    let counter = format!("packet_ingest_{reason}");
    eventually(&counter, || async {
        metric(&server, &counter).await >= 1.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_closes_connection_and_keeps_earlier_packets() {
    bad_input_case(
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        true,
        "protocol_errors_packets_total{reason=\"bad_magic\"}",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_version_closes_connection() {
    let mut header = signed_header(Channel(1), 0, 0).to_vec();
    header[2] = 9;
    header.extend_from_slice(&[0; 32]);
    bad_input_case(
        header,
        true,
        "protocol_errors_packets_total{reason=\"bad_version\"}",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_flags_close_connection() {
    let mut header = signed_header(Channel(1), 0x80, 0).to_vec();
    header.extend_from_slice(&[0; 32]);
    bad_input_case(
        header,
        true,
        "protocol_errors_packets_total{reason=\"bad_flags\"}",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hmac_flag_without_key_closes_connection() {
    let mut header = signed_header(Channel(1), 1, 0).to_vec();
    header.extend_from_slice(&[0; 32]);
    bad_input_case(
        header,
        true,
        "protocol_errors_packets_total{reason=\"hmac_not_configured\"}",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn length_ffffffff_closes_before_allocating() {
    let header = signed_header(Channel(1), 0, u32::MAX).to_vec();
    bad_input_case(
        header,
        true,
        "protocol_errors_packets_total{reason=\"too_long\"}",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_digest_bit_drops_packet_and_keeps_connection() {
    let server = start(&[]).await;
    let mut stream = subscribe(&server, vec![], None).await;
    let mut frames = frames(1, 5, 64, 0);
    frames[2].digest.0[17] ^= 0x04;
    send_bytes(&server, &wire(&frames)).await;
    let (packets, _) = collect(&mut stream, 4).await;
    // The dropped frame leaves a visible gap in source_sequence, none in sequence.
    assert_eq!(
        packets
            .iter()
            .map(|p| p.source_sequence)
            .collect::<Vec<_>>(),
        vec![0, 1, 3, 4]
    );
    assert_eq!(
        packets.iter().map(|p| p.sequence).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    let name = "packet_ingest_rejected_packets_total{reason=\"digest_mismatch\"}";
    assert_eq!(metric(&server, name).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eof_mid_frame_discards_partial_frame_only() {
    let server = start(&[]).await;
    let mut stream = subscribe(&server, vec![], None).await;
    let bytes = wire(&frames(1, 4, 100, 0));
    let cut = bytes.len() - 30;
    send_bytes(&server, &bytes[..cut]).await;
    let (packets, _) = collect(&mut stream, 3).await;
    assert_eq!(packets.len(), 3);
    let name = "packet_ingest_protocol_errors_packets_total{reason=\"truncated\"}";
    eventually("truncated counter", || async {
        metric(&server, name).await == 1.0
    })
    .await;
    assert_eq!(
        metric(&server, "packet_ingest_accepted_packets_total").await,
        3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_mebibyte_packet_round_trips() {
    let server = start(&[]).await;
    let mut stream = subscribe(&server, vec![], None).await;
    let big = payload(3, 3, 1 << 20);
    let frame = sha256_frame(Channel(4), big.clone());
    send_bytes(&server, &wire(std::slice::from_ref(&frame))).await;
    let (packets, _) = collect(&mut stream, 1).await;
    assert_eq!(packets[0].payload, big);
    assert_eq!(packets[0].digest, Bytes::copy_from_slice(&frame.digest.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_check_stays_fast_while_64_mib_is_verified() {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let server = start(&[]).await;
    let mut stream = subscribe(&server, vec![], None).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.grpc_addr))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut health = HealthClient::new(channel);
    let frames = frames(1, 64, 1 << 20, 0);
    let bytes = wire(&frames);
    let addr = server.ingest_addr;
    let producer = tokio::spawn(async move {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        tokio::io::AsyncWriteExt::write_all(&mut stream, &bytes)
            .await
            .expect("write");
    });
    // Wait until verification is underway, then time health checks during it.
    let (first, _) = collect(&mut stream, 1).await;
    assert_eq!(first.len(), 1);
    let mut worst = Duration::ZERO;
    for _ in 0..20 {
        let started = Instant::now();
        health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("health");
        worst = worst.max(started.elapsed());
    }
    let (rest, _) = collect(&mut stream, 63).await;
    assert_eq!(rest.len(), 63);
    producer.await.expect("producer");
    // The contract is 50 ms; shared CI machines get headroom.
    assert!(
        worst < Duration::from_millis(250),
        "health check took {worst:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_that_disconnects_mid_stream_is_cleaned_up() {
    let server = start(&[]).await;
    let mut stream = subscribe(&server, vec![], None).await;
    assert_eq!(metric(&server, "packet_ingest_subscribers").await, 1.0);
    send_bytes(&server, &wire(&frames(1, 10, 10, 0))).await;
    let (packets, _) = collect(&mut stream, 1).await;
    assert!(!packets.is_empty());
    drop(stream);
    eventually("subscriber gauge back to 0", || async {
        metric(&server, "packet_ingest_subscribers").await == 0.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_scrape_matches_the_traffic_sent() {
    let server = start(&[]).await;
    let mut first = subscribe(&server, vec![], None).await;
    let mut second = subscribe(&server, vec![], None).await;
    let mut frames = frames(1, 100, 64, 0);
    for index in [5, 50, 99] {
        frames[index].digest.0[0] ^= 1;
    }
    let frame_bytes = (packet_ingest::frame::HEADER_LEN + 64) as f64;
    let mut bytes = wire(&frames).to_vec();
    bytes.extend_from_slice(&wire(&frames[..1])[..20]); // truncated tail
    send_bytes(&server, &bytes).await;
    collect(&mut first, 97).await;
    collect(&mut second, 97).await;
    eventually("connection closed", || async {
        metric(&server, "packet_ingest_ingest_connections").await == 0.0
    })
    .await;
    let text = scrape(&server).await;
    let expect = |name: &str, value: f64| {
        assert_eq!(metric_in(&text, name), value, "{name}");
    };
    expect("packet_ingest_received_packets_total", 100.0);
    expect("packet_ingest_received_bytes_total", 100.0 * frame_bytes);
    expect("packet_ingest_accepted_packets_total", 97.0);
    expect("packet_ingest_accepted_bytes_total", 97.0 * frame_bytes);
    expect(
        "packet_ingest_rejected_packets_total{reason=\"digest_mismatch\"}",
        3.0,
    );
    expect(
        "packet_ingest_rejected_bytes_total{reason=\"digest_mismatch\"}",
        3.0 * frame_bytes,
    );
    expect(
        "packet_ingest_protocol_errors_packets_total{reason=\"truncated\"}",
        1.0,
    );
    expect(
        "packet_ingest_protocol_errors_bytes_total{reason=\"truncated\"}",
        20.0,
    );
    expect("packet_ingest_ingest_connections_accepted_total", 1.0);
    expect("packet_ingest_subscribers", 2.0);
    expect("packet_ingest_delivered_packets_total", 194.0);
    expect("packet_ingest_missed_packets_total", 0.0);
    expect("packet_ingest_hub_retained_packets", 97.0);
    assert!(metric_in(&text, "packet_ingest_verify_batch_seconds_count") >= 1.0);
    // Every batch is aged at each stage; ages only grow along the path.
    let age = |stage: &str, part: &str| {
        metric_in(
            &text,
            &format!("packet_ingest_batch_age_seconds_{part}{{stage=\"{stage}\"}}"),
        )
    };
    let batches = age("verify_start", "count");
    assert!(batches >= 1.0);
    for stage in ["verified", "publishing", "sequenced"] {
        assert_eq!(age(stage, "count"), batches, "{stage}");
    }
    assert!(age("taken", "count") >= 2.0, "each subscriber took some");
    assert!(age("verified", "sum") >= age("verify_start", "sum"));
    assert!(age("sequenced", "sum") >= age("publishing", "sum"));
    assert!(text.contains("packet_ingest_build_info{version=\""));
}
