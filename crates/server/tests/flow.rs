//! Flow control over real sockets: resume, slow-subscriber policies, stream
//! limits, Publish, heartbeats and ingest backpressure.

mod common;

use bytes::Bytes;
use common::*;
use packet_ingest::{
    frame::{sha256_frame, Channel},
    pb::{PublishRequest, SubscribeRequest},
};
use tokio::io::AsyncWriteExt;
use tonic::Code;

/// Sends `rounds` x `per_round` packets on one connection, waiting after each
/// round until `live` has received it, so `live` can never lag.
async fn send_paced(
    server: &packet_ingest::server::RunningServer,
    live: &mut tonic::Streaming<packet_ingest::pb::SubscribeResponse>,
    rounds: usize,
    per_round: usize,
    size: usize,
) -> Vec<packet_ingest::pb::Packet> {
    let mut connection = tokio::net::TcpStream::connect(server.ingest_addr)
        .await
        .expect("connect");
    let mut received = Vec::new();
    for round in 0..rounds {
        let frames: Vec<_> = (0..per_round)
            .map(|index| sha256_frame(Channel(1), payload(round, index, size)))
            .collect();
        connection.write_all(&wire(&frames)).await.expect("write");
        let (packets, missed) = collect(live, per_round).await;
        assert_eq!(missed, 0, "the paced subscriber never lags");
        received.extend(packets);
    }
    received
}

/// Reads a stream to its end; returns packets, total missed and the final status.
async fn drain(
    stream: &mut tonic::Streaming<packet_ingest::pb::SubscribeResponse>,
    until_sequence: u64,
) -> (Vec<packet_ingest::pb::Packet>, u64, Option<tonic::Status>) {
    let mut packets: Vec<packet_ingest::pb::Packet> = Vec::new();
    let mut missed = 0;
    let outcome = tokio::time::timeout(PATIENCE, async {
        loop {
            match stream.message().await {
                Ok(Some(response)) => {
                    missed += response.missed;
                    packets.extend(response.packets);
                    if packets.last().is_some_and(|p| p.sequence >= until_sequence) {
                        return None;
                    }
                }
                Ok(None) => return None,
                Err(status) => return Some(status),
            }
        }
    })
    .await
    .expect("stream ends or completes in time");
    (packets, missed, outcome)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_replays_then_follows_live_without_duplicate_or_gap() {
    let server = start(&[]).await;
    let mut live = subscribe(&server, vec![], None).await;
    send_bytes(&server, &wire(&frames(1, 50, 20, 0))).await;
    collect(&mut live, 50).await;
    let mut resumed = subscribe(&server, vec![], Some(31)).await;
    send_bytes(&server, &wire(&frames(1, 50, 20, 1))).await;
    let (packets, missed) = collect(&mut resumed, 70).await;
    assert_eq!(missed, 0);
    let sequences: Vec<u64> = packets.iter().map(|p| p.sequence).collect();
    assert_eq!(sequences, (31..=100).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_from_beyond_next_sequence_is_out_of_range() {
    let server = start(&[]).await;
    let mut live = subscribe(&server, vec![], None).await;
    send_bytes(&server, &wire(&frames(1, 3, 20, 0))).await;
    collect(&mut live, 3).await;
    // 4 is the next sequence: allowed, waits for it.
    let mut next = subscribe(&server, vec![], Some(4)).await;
    let status = client(&server)
        .await
        .subscribe(SubscribeRequest {
            channels: vec![],
            from_sequence: Some(5),
            ..Default::default()
        })
        .await
        .expect_err("beyond next");
    assert_eq!(status.code(), Code::OutOfRange);
    assert!(status.message().contains("from_sequence"));
    send_bytes(&server, &wire(&frames(1, 1, 20, 1))).await;
    assert_eq!(collect(&mut next, 1).await.0[0].sequence, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_older_than_retained_starts_at_oldest_and_reports_missed() {
    let server = start(&["--history", "100", "--subscriber-buffer", "100"]).await;
    let mut live = subscribe(&server, vec![], None).await;
    for round in 0..10 {
        send_bytes(&server, &wire(&frames(1, 100, 20, round))).await;
        collect(&mut live, 100).await;
    }
    let mut resumed = subscribe(&server, vec![], Some(1)).await;
    let response = tokio::time::timeout(PATIENCE, resumed.message())
        .await
        .expect("in time")
        .expect("ok")
        .expect("open");
    let first = response.packets.first().expect("packets").sequence;
    assert!(first > 1 && first <= 901, "starts at the oldest retained");
    assert_eq!(
        response.missed,
        first - 1,
        "missed counts exactly what was skipped"
    );
}

/// One stalled and one live subscriber under `policy`; 20,000 packets of 1 KiB
/// are sent paced to the live one (so it never lags), then the stalled one is
/// read to its end: its packets, total `missed`, and final status.
async fn stalled_next_to_live(
    policy: &str,
) -> (Vec<packet_ingest::pb::Packet>, u64, Option<tonic::Status>) {
    let server = start(&[
        "--slow-subscriber",
        policy,
        "--history",
        "500",
        "--subscriber-buffer",
        "500",
        "--memory-limit",
        "2MiB",
    ])
    .await;
    let mut stalled = subscribe(&server, vec![], None).await;
    let mut live = subscribe(&server, vec![], None).await;
    let received = send_paced(&server, &mut live, 40, 500, 1024).await;
    assert_eq!(received.len(), 20_000);
    drain(&mut stalled, 20_000).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gap_policy_reports_exact_missed_and_leaves_others_untouched() {
    let total = 20_000;
    // What the stalled one got plus what it was told it missed is everything.
    let (packets, missed, status) = stalled_next_to_live("gap").await;
    assert!(status.is_none(), "gap never ends the stream: {status:?}");
    assert!(missed > 0, "the stalled subscriber must have lost packets");
    assert_eq!(packets.len() as u64 + missed, total);
    assert_ordered(&packets);
    assert_eq!(packets.last().map(|p| p.sequence), Some(total));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_policy_ends_stalled_stream_with_resource_exhausted() {
    let (packets, missed, status) = stalled_next_to_live("disconnect").await;
    let status = status.expect("stream ends with an error");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.message().contains("behind"), "{}", status.message());
    assert_eq!(missed, 0);
    assert!((packets.len() as u64) < 20_000);
    assert_ordered(&packets);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_policy_loses_nothing_and_recovers_after_stuck_subscriber_is_cut() {
    let server = start(&[
        "--slow-subscriber",
        "block",
        "--block-timeout",
        "1s",
        "--history",
        "200",
        "--subscriber-buffer",
        "200",
        "--memory-limit",
        "1MiB",
    ])
    .await;
    let mut stuck = subscribe(&server, vec![], None).await;
    let mut live = subscribe(&server, vec![], None).await;
    let total = 20_000;
    let producer = {
        let addr = server.ingest_addr;
        tokio::spawn(async move {
            let mut connection = tokio::net::TcpStream::connect(addr).await.expect("connect");
            connection
                .write_all(&wire(&frames(1, total, 1024, 0)))
                .await
                .expect("write");
        })
    };
    let (packets, missed) = collect(&mut live, total).await;
    assert_eq!(missed, 0, "block mode is lossless");
    assert_eq!(packets.len(), total);
    assert_ordered(&packets);
    producer.await.expect("producer");
    let (_, stuck_missed, status) = drain(&mut stuck, total as u64).await;
    assert_eq!(stuck_missed, 0);
    let status = status.expect("the stuck subscriber was cut");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status.message().contains("block-timeout"),
        "{}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_faster_than_hub_is_paced_by_tcp_backpressure() {
    let server = start(&[
        "--slow-subscriber",
        "block",
        "--block-timeout",
        "120s",
        "--memory-limit",
        "4MiB",
    ])
    .await;
    let mut slow = subscribe(&server, vec![], None).await;
    let total = 1024; // 64 MiB: far more than the hub, socket buffers and HTTP/2 windows hold
    let producer = {
        let addr = server.ingest_addr;
        tokio::spawn(async move {
            let mut connection = tokio::net::TcpStream::connect(addr).await.expect("connect");
            connection
                .write_all(&wire(&frames(1, total, 64 << 10, 0)))
                .await
                .expect("write");
        })
    };
    eventually("hub full", || async {
        metric(&server, "packet_ingest_hub_retained_bytes").await >= (3 << 20) as f64
    })
    .await;
    assert!(
        !producer.is_finished(),
        "the producer must be held back, not buffered"
    );
    let retained = metric(&server, "packet_ingest_hub_retained_bytes").await;
    assert!(
        retained <= (4 << 20) as f64 + 70_000.0,
        "retained {retained}"
    );
    let (packets, missed) = collect(&mut slow, total).await;
    assert_eq!(missed, 0);
    assert_eq!(packets.len(), total);
    for (index, packet) in packets.iter().enumerate() {
        assert_eq!(packet.source_sequence, index as u64);
        assert_eq!(packet.payload, payload(0, index, 64 << 10));
    }
    producer
        .await
        .expect("producer finishes once the subscriber reads");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_subscribers_counts_open_streams_not_requests() {
    let server = start(&["--max-subscribers", "2"]).await;
    let first = subscribe(&server, vec![], None).await;
    let _second = subscribe(&server, vec![], None).await;
    let status = client(&server)
        .await
        .subscribe(SubscribeRequest::default())
        .await
        .expect_err("over the limit");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.message().contains("--max-subscribers"));
    drop(first);
    eventually("a permit is free again", || async {
        client(&server)
            .await
            .subscribe(SubscribeRequest::default())
            .await
            .is_ok()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_stream_gets_heartbeats() {
    let server = start(&["--heartbeat", "100ms"]).await;
    let mut stream = subscribe(&server, vec![], None).await;
    for _ in 0..2 {
        let response = tokio::time::timeout(PATIENCE, stream.message())
            .await
            .expect("in time")
            .expect("ok")
            .expect("open");
        assert!(response.packets.is_empty());
        assert_eq!(response.missed, 0);
    }
}

fn publish_request(channel: u32, payload: Bytes) -> PublishRequest {
    packet_ingest_protocol::client::publish_request(&sha256_frame(Channel(channel), payload))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_verifies_orders_and_counts() {
    let server = start(&[]).await;
    let mut stream = subscribe(&server, vec![], None).await;
    let mut requests: Vec<PublishRequest> = (0..2000)
        .map(|index| publish_request(3, payload(0, index, index % 500)))
        .collect();
    requests[10].digest = Bytes::from_static(&[1, 2, 3]);
    requests[20].payload = Bytes::from_static(b"tampered");
    let response = client(&server)
        .await
        .publish(futures::stream::iter(requests))
        .await
        .expect("publish")
        .into_inner();
    assert_eq!(response.accepted, 1998);
    assert_eq!(response.rejected, 2);
    assert_eq!(response.last_sequence, 1998);
    let (packets, _) = collect(&mut stream, 1998).await;
    assert!(packets[0].source.starts_with("grpc/127.0.0.1:"));
    let indexes: Vec<u64> = packets.iter().map(|p| p.source_sequence).collect();
    let expected: Vec<u64> = (0..2000).filter(|i| *i != 10 && *i != 20).collect();
    assert_eq!(indexes, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_oversized_payload_is_invalid_argument_and_keeps_earlier_packets() {
    let server = start(&["--max-payload", "1KiB"]).await;
    let mut stream = subscribe(&server, vec![], None).await;
    let requests = vec![
        publish_request(1, Bytes::from_static(b"one")),
        publish_request(1, Bytes::from_static(b"two")),
        publish_request(1, Bytes::from(vec![0u8; 2048])),
        publish_request(1, Bytes::from_static(b"never")),
    ];
    let status = client(&server)
        .await
        .publish(futures::stream::iter(requests))
        .await
        .expect_err("oversized");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("--max-payload"));
    let (packets, _) = collect(&mut stream, 2).await;
    assert_eq!(packets[0].payload, Bytes::from_static(b"one"));
    assert_eq!(packets[1].payload, Bytes::from_static(b"two"));
    assert_eq!(
        metric(&server, "packet_ingest_accepted_packets_total").await,
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_message_over_the_decode_limit_is_invalid_argument_every_time() {
    let server = start(&["--max-payload", "1KiB"]).await;
    for attempt in 0..10u32 {
        let requests = vec![
            publish_request(attempt, Bytes::from_static(b"one")),
            publish_request(attempt, Bytes::from_static(b"two")),
            publish_request(attempt, Bytes::from(vec![0u8; 300 << 10])),
        ];
        let status = client(&server)
            .await
            .publish(futures::stream::iter(requests))
            .await
            .expect_err("oversized");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("--max-payload"));
    }
    assert_eq!(
        metric(&server, "packet_ingest_accepted_packets_total").await,
        20.0
    );
}
