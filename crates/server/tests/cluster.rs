//! Cluster mode against a real `nats-server -js` on loopback: replicas share one
//! ordered stream, survive a replica's death and a NATS restart.
//!
//! Needs `nats-server` on PATH (Debian package `nats-server`; `.ci/run`
//! installs it). Without it these tests say so and pass, unless
//! `PACKET_INGEST_REQUIRE_NATS=1` (set by CI), where a missing server fails.

mod common;

use std::{path::PathBuf, process::Stdio, time::Duration};

use common::{process::Process, *};
use packet_ingest::pb::{Packet, StreamInfoRequest, StreamInfoResponse, SubscribeResponse};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    process::{Child, Command},
};
use tonic::Streaming;

struct Nats {
    child: Child,
    url: String,
    port: u16,
    store: PathBuf,
}

impl Nats {
    /// Starts nats-server (port `None`: a random one), or returns None (test
    /// skipped) when it is not installed.
    async fn start(store: PathBuf, port: Option<u16>) -> Option<Nats> {
        let installed = std::process::Command::new("nats-server")
            .arg("--version")
            .output()
            .is_ok();
        if !installed {
            assert!(
                std::env::var("PACKET_INGEST_REQUIRE_NATS").is_err(),
                "nats-server is required (apt-get install nats-server)"
            );
            eprintln!("SKIPPED: nats-server is not installed (apt-get install nats-server)");
            return None;
        }
        let mut child = Command::new("nats-server")
            // nats-server reads port -1 as "pick a free one".
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &port.map_or("-1".to_owned(), |p| p.to_string()),
                "-js",
                "-sd",
            ])
            .arg(&store)
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn nats-server");
        let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let port = tokio::time::timeout(PATIENCE, async {
            while let Some(line) = lines.next_line().await.expect("nats log") {
                if let Some((_, addr)) = line.split_once("Listening for client connections on ") {
                    let port = addr.trim().rsplit(':').next().and_then(|p| p.parse().ok());
                    return port.expect("port in nats log");
                }
            }
            panic!("nats-server exited before listening");
        })
        .await
        .expect("nats-server starts");
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Some(Nats {
            child,
            url: format!("nats://127.0.0.1:{port}"),
            port,
            store,
        })
    }

    async fn stop(mut self) -> (PathBuf, u16) {
        let _ = self.child.kill().await;
        (self.store, self.port)
    }
}

fn store_dir(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("packet-ingest-nats-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("store dir");
    dir
}

async fn replica(nats: &Nats) -> packet_ingest::server::RunningServer {
    start(&["--cluster-nats", &nats.url]).await
}

async fn send_frames(addr: std::net::SocketAddr, count: usize, source: usize) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(&wire(&frames(source as u32, count, 64, source)))
        .await
        .expect("write");
    stream.shutdown().await.expect("close");
}

/// JetStream's view: (messages stored, one past the last packet sequence stored).
async fn stored(url: &str) -> (u64, u64) {
    let client = async_nats::connect(url).await.expect("nats");
    let mut stream = async_nats::jetstream::new(client)
        .get_stream("PACKETS")
        .await
        .expect("stream");
    let state = stream.info().await.expect("info").state.clone();
    let last = stream
        .get_raw_message(state.last_sequence)
        .await
        .expect("last message");
    let header = |name: &str| -> u64 {
        let value = last.headers.get(name).expect("numbering header");
        value.as_str().parse().expect("a number")
    };
    (state.messages, header("Pi-First") + header("Pi-Count"))
}

fn key(packet: &Packet) -> (u64, String, u64) {
    (
        packet.sequence,
        packet.source.clone(),
        packet.source_sequence,
    )
}

/// Receives until the last packet has sequence `last`; returns packets and missed.
async fn receive_through(
    stream: &mut Streaming<SubscribeResponse>,
    last: u64,
) -> (Vec<Packet>, u64) {
    let mut packets: Vec<Packet> = Vec::new();
    let mut missed = 0;
    tokio::time::timeout(PATIENCE, async {
        while packets.last().is_none_or(|p| p.sequence < last) {
            let response = stream.message().await.expect("healthy").expect("open");
            missed += response.missed;
            packets.extend(response.packets);
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "timed out at {:?} waiting for sequence {last}",
            packets.last().map(|p| p.sequence)
        )
    });
    (packets, missed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_deliver_the_same_packets_with_the_same_sequences() {
    let Some(nats) = Nats::start(store_dir("share"), None).await else {
        return;
    };
    let a = replica(&nats).await;
    let b = replica(&nats).await;
    let mut on_a = subscribe(&a, vec![], None).await;
    let mut on_b = subscribe(&b, vec![], None).await;
    tokio::join!(
        send_frames(a.ingest_addr, 3000, 1),
        send_frames(b.ingest_addr, 3000, 2)
    );
    let (from_a, missed_a) = collect(&mut on_a, 6000).await;
    let (from_b, missed_b) = collect(&mut on_b, 6000).await;
    assert_eq!((missed_a, missed_b), (0, 0));
    assert_eq!(
        from_a.iter().map(key).collect::<Vec<_>>(),
        from_b.iter().map(key).collect::<Vec<_>>()
    );
    assert_eq!(
        from_a.iter().map(|p| p.sequence).collect::<Vec<_>>(),
        (1..=6000).collect::<Vec<_>>()
    );
    let by_source = assert_ordered(&from_a);
    assert_eq!(by_source.len(), 2);
    for packets in by_source.values() {
        assert_eq!(packets.len(), 3000);
        assert!(packets
            .iter()
            .enumerate()
            .all(|(i, p)| p.source_sequence == i as u64));
    }
    // A late subscriber on B resumes from sequence 1 out of JetStream.
    let history = start(&[
        "--cluster-nats",
        &nats.url,
        "--history",
        "10",
        "--subscriber-buffer",
        "10",
    ])
    .await;
    let mut replayed = subscribe(&history, vec![], Some(1)).await;
    let (again, missed) = receive_through(&mut replayed, 6000).await;
    assert_eq!(missed, 0);
    assert_eq!(
        again.iter().map(key).collect::<Vec<_>>(),
        from_a.iter().map(key).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packets_stored_by_a_killed_replica_still_reach_the_other() {
    let Some(nats) = Nats::start(store_dir("kill"), None).await else {
        return;
    };
    let b = replica(&nats).await;
    let mut on_b = subscribe(&b, vec![], None).await;
    let mut a = Process::spawn(&["--cluster-nats", &nats.url]).await;
    let a_ingest = a.ingest;
    let producer = tokio::spawn(async move {
        let Ok(mut stream) = tokio::net::TcpStream::connect(a_ingest).await else {
            return;
        };
        let _ = stream.write_all(&wire(&frames(1, 200_000, 64, 0))).await;
    });
    // Kill A mid-stream, once B has seen some of its packets.
    let (first, _) = collect(&mut on_b, 1000).await;
    let seen = first.last().map_or(0, |p| p.sequence);
    a.child.kill().await.expect("kill A");
    producer.abort();
    let stored = stored(&nats.url).await.1 - 1;
    assert!(stored >= 1000);
    // B may already have everything A stored (the kill came right after a
    // batch): then there is nothing more to wait for.
    let (rest, missed) = match seen >= stored {
        true => (Vec::new(), 0),
        false => receive_through(&mut on_b, stored).await,
    };
    assert_eq!(missed, 0);
    // Everything A had stored reached B: dense from where it was, in order,
    // at least through `stored` (A's last in-flight publishes may land after
    // `stored` was read, and the last response may carry them too).
    let sequences: Vec<u64> = rest.iter().map(|p| p.sequence).collect();
    let end = seen + 1 + sequences.len() as u64;
    assert_eq!(sequences, (seen + 1..end).collect::<Vec<_>>());
    assert!(end > stored, "B got through {} of {stored}", end - 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_reconnect_and_go_on_after_nats_restarts() {
    let Some(nats) = Nats::start(store_dir("restart"), None).await else {
        return;
    };
    let a = replica(&nats).await;
    let b = replica(&nats).await;
    let mut on_b = subscribe(&b, vec![], None).await;
    send_frames(a.ingest_addr, 500, 1).await;
    let (before, _) = collect(&mut on_b, 500).await;
    assert_eq!(before.last().map(|p| p.sequence), Some(500));

    let (store, port) = nats.stop().await;
    let _nats = Nats::start(store, Some(port)).await.expect("nats restarts");
    // Producers keep sending; once the replicas are back, packets flow again.
    let mut received: Vec<Packet> = Vec::new();
    let mut missed = 0;
    let mut round = 0;
    tokio::time::timeout(PATIENCE, async {
        while received.is_empty() {
            round += 1;
            send_frames(a.ingest_addr, 100, 100 + round).await;
            if let Ok(Some(Ok(Some(response)))) =
                tokio::time::timeout(Duration::from_secs(2), on_b.message())
                    .await
                    .map(Some)
            {
                missed += response.missed;
                received.extend(response.packets);
            }
        }
    })
    .await
    .expect("packets flow again after the NATS restart");
    assert!(received.iter().all(|p| p.sequence > 500));
    // Never silence, never a hidden gap: what B got plus what it was told it
    // missed accounts for every sequence after 500 up to the last it saw.
    let last = received.last().map_or(500, |p| p.sequence);
    assert_eq!(received.len() as u64 + missed, last - 500);
    assert_ordered(&received);
    // Publishes retried across the restart were stored once: the whole
    // stream, replayed from JetStream, holds every packet once, in order.
    let late = start(&["--cluster-nats", &_nats.url, "--history", "10"]).await;
    let mut replayed = subscribe(&late, vec![], Some(1)).await;
    let (all, _) = receive_through(&mut replayed, last).await;
    let mut keys: Vec<(String, u64)> = all
        .iter()
        .map(|p| (p.source.clone(), p.source_sequence))
        .collect();
    let count = keys.len();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), count, "a packet was stored twice");
    assert_ordered(&all);
}

/// The heart of cluster numbering: two replicas, two producers each, all
/// publishing at full speed at once. Each replica numbers its batches after
/// the last message it knows of and JetStream refuses any that another
/// replica overtook, so both replicas deliver exactly the same packets under
/// exactly the same sequences, 1..=N without a gap — and JetStream holds
/// batches, far fewer messages than packets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_publishing_at_full_speed_number_identically_and_densely() {
    const PER_PRODUCER: usize = 50_000;
    let Some(nats) = Nats::start(store_dir("race"), None).await else {
        return;
    };
    // Subscribers that fall behind hold their replica's consumer back, and
    // through --cluster-max-lag its producers: nothing is skipped.
    let paced = [
        "--cluster-nats",
        &nats.url,
        "--slow-subscriber",
        "block",
        "--cluster-max-lag",
        "20000",
    ];
    let a = start(&paced).await;
    let b = start(&paced).await;
    let mut on_a = subscribe(&a, vec![], None).await;
    let mut on_b = subscribe(&b, vec![], None).await;
    let total = 4 * PER_PRODUCER;
    let (_, (from_a, missed_a), (from_b, missed_b)) = tokio::join!(
        async {
            tokio::join!(
                send_frames(a.ingest_addr, PER_PRODUCER, 1),
                send_frames(a.ingest_addr, PER_PRODUCER, 2),
                send_frames(b.ingest_addr, PER_PRODUCER, 3),
                send_frames(b.ingest_addr, PER_PRODUCER, 4),
            )
        },
        collect(&mut on_a, total),
        collect(&mut on_b, total)
    );
    assert_eq!((missed_a, missed_b), (0, 0));
    assert_eq!(
        from_a.iter().map(|p| p.sequence).collect::<Vec<_>>(),
        (1..=total as u64).collect::<Vec<_>>()
    );
    assert_eq!(
        from_a.iter().map(key).collect::<Vec<_>>(),
        from_b.iter().map(key).collect::<Vec<_>>()
    );
    let by_source = assert_ordered(&from_a);
    assert_eq!(by_source.len(), 4);
    assert!(by_source.values().all(|p| p.len() == PER_PRODUCER));
    // Both replicas' packets are interleaved in the one numbering.
    let replica_of = |p: &Packet| matches!(p.channel, 1 | 2);
    let switches = from_a
        .windows(2)
        .filter(|w| replica_of(&w[0]) != replica_of(&w[1]))
        .count();
    eprintln!("replica switches along the stream: {switches}");
    assert!(switches > 1, "the replicas did not publish concurrently");
    let (messages, next) = stored(&nats.url).await;
    assert_eq!(next, total as u64 + 1);
    assert!(
        messages * 8 < total as u64,
        "{messages} JetStream messages for {total} packets"
    );
}

/// TCP acknowledgements in cluster mode mean "JetStream stored it": when a
/// producer is told its frames are settled, the stream already holds them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_acknowledgements_wait_for_jetstream() {
    use packet_ingest::frame::{Channel, FLAG_ACK};
    use packet_ingest_protocol::{
        ack::{Ack, ACK_LEN},
        client::make_frame_with,
    };
    use tokio::io::AsyncReadExt;
    const COUNT: usize = 2000;
    let Some(nats) = Nats::start(store_dir("acks"), None).await else {
        return;
    };
    let a = replica(&nats).await;
    let mut stream = tokio::net::TcpStream::connect(a.ingest_addr)
        .await
        .expect("connect");
    let signed: Vec<_> = (0..COUNT)
        .map(|index| make_frame_with(Channel(7), payload(9, index, 64), None, FLAG_ACK))
        .collect();
    stream.write_all(&wire(&signed)).await.expect("write");
    let mut latest = Ack::default();
    tokio::time::timeout(PATIENCE, async {
        while latest.settled < COUNT as u64 {
            let mut record = [0u8; ACK_LEN];
            stream.read_exact(&mut record).await.expect("ack record");
            latest = Ack::decode(&record).expect("valid ack");
            // Whatever is acknowledged is in JetStream already.
            let (_, next) = stored(&nats.url).await;
            assert!(
                latest.last_sequence < next,
                "acknowledged through {} while JetStream holds up to {}",
                latest.last_sequence,
                next - 1
            );
        }
    })
    .await
    .expect("every frame is acknowledged");
    assert_eq!((latest.last_sequence, latest.rejected), (COUNT as u64, 0));
}

/// The stream's JetStream state (messages, first and last stream sequence).
async fn stream_state(url: &str) -> async_nats::jetstream::stream::State {
    let client = async_nats::connect(url).await.expect("nats");
    let mut stream = async_nats::jetstream::new(client)
        .get_stream("PACKETS")
        .await
        .expect("stream");
    stream.info().await.expect("info").state.clone()
}

/// Polls JetStream until every message through stream sequence `through`
/// has expired (bounded by PATIENCE); returns the state then.
async fn expired_through(url: &str, through: u64) -> async_nats::jetstream::stream::State {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let state = stream_state(url).await;
        if state.first_sequence > through {
            return state;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "messages through {through} never expired: {state:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn stream_info(server: &packet_ingest::server::RunningServer) -> StreamInfoResponse {
    client(server)
        .await
        .stream_info(StreamInfoRequest {})
        .await
        .expect("StreamInfo")
        .into_inner()
}

/// StreamInfo's range: (first sequence, next sequence, retained packets).
fn range(info: &StreamInfoResponse) -> (u64, u64, u64) {
    (
        info.first_sequence,
        info.next_sequence,
        info.retained_packets,
    )
}

/// The smallest max-age cluster mode accepts (JetStream's own minimum is 100ms).
const MAX_AGE: &str = "2s";

/// An idle stream outlives `--cluster-max-age`: the running replica stores
/// empty tip messages, so after two max-ages of idleness, every packet and
/// the first tips expired, a replica started later continues the numbering
/// densely, and subscribers (live, resuming, replaying past the tip
/// messages from JetStream) see exactly the packets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_stream_keeps_its_numbering_past_max_age() {
    let Some(nats) = Nats::start(store_dir("keepalive"), None).await else {
        return;
    };
    let flags = ["--cluster-nats", &nats.url, "--cluster-max-age", MAX_AGE];
    let a = start(&flags).await;
    let mut on_a = subscribe(&a, vec![], None).await;
    send_frames(a.ingest_addr, 5, 1).await;
    let (before, missed) = collect(&mut on_a, 5).await;
    assert_eq!(missed, 0);
    assert_eq!(
        before.iter().map(|p| p.sequence).collect::<Vec<_>>(),
        (1..=5).collect::<Vec<_>>()
    );
    let last_batch = stream_state(&nats.url).await.last_sequence;

    // Idle until every message through the last batch has expired: only
    // the running replica's empty tip messages are left.
    let state = expired_through(&nats.url, last_batch).await;
    assert!(state.messages >= 1, "the tip expired too: {state:?}");
    assert!(state.last_sequence > last_batch);
    // Idle for another max-age, until those tips have expired in turn: the
    // replica keeps storing new ones.
    let state = expired_through(&nats.url, state.last_sequence).await;
    assert!(state.messages >= 1, "the tip expired too: {state:?}");
    assert_eq!(stored(&nats.url).await.1, 6, "the tip still says 6 is next");
    assert_eq!(range(&stream_info(&a).await), (6, 6, 0));

    let b = start(&flags).await;
    let mut resumed = subscribe(&b, vec![], Some(6)).await;
    send_frames(b.ingest_addr, 4, 2).await;
    let (after, missed) = receive_through(&mut resumed, 9).await;
    assert_eq!(missed, 0);
    assert_eq!(
        after.iter().map(|p| p.sequence).collect::<Vec<_>>(),
        (6..=9).collect::<Vec<_>>()
    );
    assert!(after.iter().all(|p| p.source_sequence < 4));
    // Checked before 6..=9 can expire in turn (max-age is short).
    let info = stream_info(&b).await;
    assert_eq!(range(&info), (6, 10, 4));
    assert!(info.oldest_received_unix_nanos > 0);
    // A replica with no local history replays 6..=9 from JetStream, past
    // the tip messages stored before them.
    let c = start(&[&flags[..], &["--history", "1", "--subscriber-buffer", "1"]].concat()).await;
    let mut replayed = subscribe(&c, vec![], Some(6)).await;
    let (again, missed) = receive_through(&mut replayed, 9).await;
    assert_eq!(missed, 0);
    assert_eq!(
        again.iter().map(key).collect::<Vec<_>>(),
        after.iter().map(key).collect::<Vec<_>>()
    );
    // The replica that stayed up saw the same numbering, dense across the idle time.
    let (live, missed) = receive_through(&mut on_a, 9).await;
    assert_eq!(missed, 0);
    assert_eq!(
        live.iter().map(key).collect::<Vec<_>>(),
        after.iter().map(key).collect::<Vec<_>>()
    );
    assert_eq!(info.stream_id, stream_info(&a).await.stream_id);
}

/// With every replica down for longer than max-age, every message expires
/// and nothing says which packet sequence comes next: a replica starting
/// then exits and says what happened and what to do, rather than guess.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_starting_after_every_message_expired_exits_naming_the_remedy() {
    let Some(nats) = Nats::start(store_dir("expired"), None).await else {
        return;
    };
    let flags = ["--cluster-nats", &nats.url, "--cluster-max-age", MAX_AGE];
    let mut a = Process::spawn(&flags).await;
    let mut on_a = a.subscribe().await;
    send_frames(a.ingest, 3, 1).await;
    collect(&mut on_a, 3).await;
    a.child.kill().await.expect("kill the only replica");
    let last = stream_state(&nats.url).await.last_sequence;
    let state = expired_through(&nats.url, last).await;
    assert_eq!(state.messages, 0);

    let binary = env!("CARGO_BIN_EXE_packet-ingest");
    let output = tokio::time::timeout(
        PATIENCE,
        Command::new(binary)
            .args(LOOPBACK_ADDRS)
            .args(flags)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the replica exits")
    .expect("runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("has no messages left") && stderr.contains("nats stream rm PACKETS"),
        "{stderr}"
    );
}
