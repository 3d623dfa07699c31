//! The durable stream (SPEC §9) with the real binary: `kill -9` at random
//! moments during acknowledged full-speed ingest, torn tails, a corrupted
//! record, retention, bounded start-up, the disk → ring → live seams, the
//! directory lock, and a failing disk.
//!
//! Producers here ask for acknowledgements (flag bit 1) and send frames from
//! a [`Pool`]: frame `k` of any connection is `pool.frames[k % len]`, so a
//! stored packet is checked byte for byte from its `source_sequence` alone,
//! and an acknowledgement (`settled`, `last_sequence`) names exactly which
//! packets must survive a crash.

mod common;

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use common::{
    process::{Launch, Process},
    *,
};
use packet_ingest::{
    frame::{Channel, Frame, FLAG_ACK},
    log::segment::INDEX_EVERY,
    pb::{
        packets_client::PacketsClient, Packet, StreamInfoRequest, StreamInfoResponse,
        SubscribeRequest, SubscribeResponse,
    },
};
use packet_ingest_protocol::{
    ack::{Ack, ACK_LEN},
    client::make_frame_with,
};
use rand::{rngs::StdRng, Rng, SeedableRng};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::watch,
    task::JoinHandle,
};
use tonic::Streaming;

const TRUNCATED: &str = "packet_ingest_log_truncated_bytes_total";
const CORRUPT: &str = "packet_ingest_log_corrupt_records_total";
const WRITE_ERRORS: &str = "packet_ingest_log_write_errors_total";
const SCANNED: &str = "packet_ingest_log_recovery_scanned_bytes";
const LOG_READ: &str = "packet_ingest_log_read_bytes_total";
/// Segment record layout (see `log::segment`): header length and the offsets
/// of its count, body length and first sequence.
const RECORD_HEADER: usize = 32;

/// Frames that ask for acknowledgements, of assorted sizes and channels.
struct Pool {
    frames: Vec<Frame>,
    /// The frames on the wire, a few dozen per chunk: (bytes, frames in it).
    chunks: Vec<(Bytes, u64)>,
}

impl Pool {
    fn new(rng: &mut StdRng, count: usize, max_size: usize) -> Arc<Pool> {
        let frames: Vec<Frame> = (0..count)
            .map(|index| {
                let mut payload = vec![0u8; rng.gen_range(1..=max_size)];
                rng.fill(&mut payload[..]);
                make_frame_with(
                    Channel(index as u32 % 5),
                    Bytes::from(payload),
                    None,
                    FLAG_ACK,
                )
            })
            .collect();
        let chunks = frames
            .chunks(32)
            .map(|chunk| (wire(chunk).freeze(), chunk.len() as u64))
            .collect();
        Arc::new(Pool { frames, chunks })
    }

    fn len(&self) -> u64 {
        self.frames.len() as u64
    }

    /// The packet is exactly the frame its source sent at its source_sequence.
    fn check(&self, packet: &Packet) {
        let frame = &self.frames[(packet.source_sequence % self.len()) as usize];
        assert_eq!(
            packet.payload, frame.payload,
            "payload of sequence {}",
            packet.sequence
        );
        assert_eq!(
            packet.channel,
            frame.channel().0,
            "channel of {}",
            packet.sequence
        );
        assert_eq!(
            packet.digest.as_ref(),
            frame.digest.0.as_slice(),
            "digest of {}",
            packet.sequence
        );
    }
}

/// One TCP producer asking for acknowledgements: a task writing `passes`
/// times the pool, and a task reading `PA` records.
struct Producer {
    source: String,
    total: u64,
    /// Frames handed to the socket so far.
    written: watch::Receiver<u64>,
    acks: watch::Receiver<Ack>,
    tasks: [JoinHandle<()>; 2],
}

impl Producer {
    async fn start(ingest: SocketAddr, pool: &Arc<Pool>, passes: u64) -> Producer {
        // Every producer of this test process connects from its own loopback
        // address, so no two share a `source` (tcp/IP:PORT) even when the
        // kernel hands a later connection an earlier one's port; the checks
        // number packets per source.
        static PRODUCERS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = PRODUCERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let local = std::net::Ipv4Addr::new(127, 0, (n / 250) as u8, 2 + (n % 250) as u8);
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::from((local, 0)))
            .expect("bind a loopback address");
        let stream = socket.connect(ingest).await.expect("connect ingest");
        let source = format!("tcp/{}", stream.local_addr().expect("local addr"));
        let (mut read, mut write) = stream.into_split();
        let (written_tx, written) = watch::channel(0u64);
        let (acks_tx, acks) = watch::channel(Ack::default());
        let chunks = pool.clone();
        let writer = tokio::spawn(async move {
            let mut sent = 0;
            'passes: for _ in 0..passes {
                for (bytes, count) in &chunks.chunks {
                    // A killed server resets the connection: stop there.
                    if write.write_all(bytes).await.is_err() {
                        break 'passes;
                    }
                    sent += count;
                    written_tx.send_replace(sent);
                }
            }
            let _ = write.shutdown().await;
        });
        let reader = tokio::spawn(async move {
            let mut record = [0u8; ACK_LEN];
            while read.read_exact(&mut record).await.is_ok() {
                let ack = Ack::decode(&record).expect("a PA record");
                acks_tx.send_replace(ack);
            }
        });
        Producer {
            source,
            total: passes * pool.len(),
            written,
            acks,
            tasks: [writer, reader],
        }
    }

    /// Waits until the server has settled `frames` frames.
    async fn settled(&mut self, frames: u64) -> Ack {
        let ack = tokio::time::timeout(PATIENCE, self.acks.wait_for(|ack| ack.settled >= frames))
            .await
            .unwrap_or_else(|_| panic!("{frames} frames not acknowledged in time"))
            .map(|ack| *ack);
        ack.unwrap_or_else(|_| panic!("connection closed before {frames} were acknowledged"))
    }

    async fn all_settled(&mut self) -> Ack {
        let ack = self.settled(self.total).await;
        assert_eq!(ack.rejected, 0);
        ack
    }

    /// Waits until `frames` frames have been handed to the socket.
    async fn wrote(&mut self, frames: u64) {
        tokio::time::timeout(PATIENCE, self.written.wait_for(|sent| *sent >= frames))
            .await
            .expect("producer writes in time")
            .expect("writer running");
    }

    /// The last acknowledgement, once both tasks ended (the server closed).
    async fn finish(self) -> (String, Ack) {
        for task in self.tasks {
            tokio::time::timeout(PATIENCE, task)
                .await
                .expect("producer ends")
                .expect("producer task");
        }
        let ack = *self.acks.borrow();
        (self.source, ack)
    }
}

fn data_dir_args(dir: &Path) -> Vec<String> {
    vec!["--data-dir".into(), dir.display().to_string()]
}

async fn spawn(dir: &Path, extra: &[&str]) -> Process {
    launch(Launch::default(), dir, extra).await
}

async fn launch(launch: Launch<'_>, dir: &Path, extra: &[&str]) -> Process {
    let mut args = data_dir_args(dir);
    args.extend(extra.iter().map(|arg| arg.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Process::launch(launch, &args).await
}

async fn kill(process: &mut Process) {
    process.signal("KILL");
    tokio::time::timeout(PATIENCE, process.child.wait())
        .await
        .expect("killed process exits")
        .expect("wait");
}

async fn stop(process: &mut Process) {
    process.signal("TERM");
    let status = tokio::time::timeout(PATIENCE, process.child.wait())
        .await
        .expect("process exits")
        .expect("wait");
    assert_eq!(status.code(), Some(0));
}

async fn grpc(process: &Process) -> PacketsClient<tonic::transport::Channel> {
    PacketsClient::connect(format!("http://{}", process.grpc))
        .await
        .expect("connect")
        .max_decoding_message_size(64 << 20)
}

async fn stream_info(process: &Process) -> StreamInfoResponse {
    grpc(process)
        .await
        .stream_info(StreamInfoRequest::default())
        .await
        .expect("StreamInfo")
        .into_inner()
}

async fn subscribe_from(process: &Process, from: u64) -> Streaming<SubscribeResponse> {
    grpc(process)
        .await
        .subscribe(SubscribeRequest {
            from_sequence: Some(from),
            ..Default::default()
        })
        .await
        .expect("subscribe")
        .into_inner()
}

/// What a subscriber received up to a sequence.
#[derive(Default)]
struct Received {
    packets: Vec<Packet>,
    /// (first sequence of the response, its `missed`) for every `missed > 0`.
    missed: Vec<(u64, u64)>,
}

/// Reads until the packet before `end` has arrived.
async fn read_until(stream: &mut Streaming<SubscribeResponse>, end: u64) -> Received {
    let mut received = Received::default();
    tokio::time::timeout(PATIENCE, async {
        while received
            .packets
            .last()
            .is_none_or(|packet| packet.sequence + 1 < end)
        {
            let response = stream
                .message()
                .await
                .expect("stream stays healthy")
                .expect("stream stays open");
            if response.missed > 0 {
                let first = response.packets.first().map_or(0, |packet| packet.sequence);
                received.missed.push((first, response.missed));
            }
            received.packets.extend(response.packets);
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "timed out at sequence {:?} of {end}",
            received.packets.last().map(|packet| packet.sequence)
        )
    });
    received
}

/// Reads the stream from `from` to its end and checks it: dense, nothing
/// missed, every packet as its producer sent it, and every source's packets
/// numbered 0, 1, 2, ... (a source may lose its tail to a crash, never a
/// packet in the middle). Returns per source its packets' sequences.
async fn verify_stream(process: &Process, pool: &Pool, from: u64) -> HashMap<String, Vec<u64>> {
    let next = stream_info(process).await.next_sequence;
    let mut sources: HashMap<String, Vec<u64>> = HashMap::new();
    if next <= from {
        return sources;
    }
    let mut stream = subscribe_from(process, from).await;
    let received = read_until(&mut stream, next).await;
    assert_eq!(received.missed, vec![], "nothing missed from {from}");
    for (expected, packet) in (from..next).zip(&received.packets) {
        assert_eq!(packet.sequence, expected, "sequences are dense");
        pool.check(packet);
        let numbered = sources.entry(packet.source.clone()).or_default();
        assert_eq!(
            packet.source_sequence,
            numbered.len() as u64,
            "{}: no gap and no duplicate within a source",
            packet.source
        );
        numbered.push(packet.sequence);
    }
    assert_eq!(received.packets.len() as u64, next - from);
    sources
}

/// The acknowledged packets of `source` are all there, with the sequences
/// the acknowledgement named.
fn assert_acked_present(sources: &HashMap<String, Vec<u64>>, source: &str, ack: &Ack) {
    assert_eq!(ack.rejected, 0);
    if ack.settled == 0 {
        return;
    }
    let sequences = sources.get(source).map_or(&[][..], Vec::as_slice);
    assert!(
        sequences.len() as u64 >= ack.settled,
        "{source}: {} packets stored, {} acknowledged",
        sequences.len(),
        ack.settled
    );
    assert_eq!(
        sequences[ack.settled as usize - 1],
        ack.last_sequence,
        "{source}: the last acknowledged frame kept its sequence"
    );
}

/// The newest segment file of a data directory.
fn last_segment(dir: &Path) -> PathBuf {
    let mut segments = segments(dir);
    segments.pop().expect("a segment")
}

/// The segment files, oldest first.
fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut segments: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read data dir")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "log"))
        .collect();
    segments.sort();
    segments
}

/// A record's place in a segment file: (offset, length, first sequence, packets).
fn records(segment: &[u8]) -> Vec<(usize, usize, u64, u64)> {
    let mut records = Vec::new();
    let mut offset = 0;
    while offset + RECORD_HEADER <= segment.len() {
        let header = &segment[offset..offset + RECORD_HEADER];
        assert_eq!(&header[0..4], b"PIL1", "record magic at {offset}");
        let u32_at = |at: usize| u32::from_be_bytes(header[at..at + 4].try_into().expect("4"));
        let count = u64::from(u32_at(8));
        let len = RECORD_HEADER + 8 * count as usize + u32_at(12) as usize;
        let first = u64::from_be_bytes(header[16..24].try_into().expect("8"));
        records.push((offset, len, first, count));
        offset += len;
    }
    assert_eq!(offset, segment.len(), "whole records");
    records
}

/// What a crash leaves when it cuts a write short: a record header and part
/// of its body. Returns the bytes appended.
fn append_torn_record(segment: &Path, next_sequence: u64) -> u64 {
    let mut torn = Vec::new();
    torn.extend_from_slice(b"PIL1");
    torn.extend_from_slice(&0x1234_5678u32.to_be_bytes()); // CRC of the whole record
    torn.extend_from_slice(&1u32.to_be_bytes()); // one packet
    torn.extend_from_slice(&4096u32.to_be_bytes()); // of which only part arrives
    torn.extend_from_slice(&next_sequence.to_be_bytes());
    torn.extend_from_slice(&0i64.to_be_bytes());
    torn.extend_from_slice(&[0, 0, 0, 1, 0, 0, 16, 0]);
    torn.extend_from_slice(&[0xAB; 700]);
    let mut bytes = std::fs::read(segment).expect("read segment");
    bytes.extend_from_slice(&torn);
    std::fs::write(segment, &bytes).expect("write segment");
    torn.len() as u64
}

fn seed() -> u64 {
    let seed = std::env::var("PACKET_INGEST_TEST_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("seed {seed} (rerun with PACKET_INGEST_TEST_SEED={seed})");
    seed
}

/// `kill -9` at random moments while a producer sends at full speed and
/// reads acknowledgements; restart on the same directory; every
/// acknowledged packet is there with its sequence and bytes, the stream is
/// dense, the stream id unchanged, and torn tails (one appended by hand
/// every fourth round, plus whatever the kills cut) are cut and counted.
///
/// The fsync policy varies by round. All three keep acknowledged packets
/// across `kill -9` (README: the kernel has them once written), so `never`
/// and `interval` are as binding here as `always`, and faster. So does
/// `--log-io`: a round recovers a segment the last one wrote either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_packets_survive_kill_9_at_random_moments() {
    const ROUNDS: usize = 24;
    const PASSES: u64 = 2;
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(seed());
    let pool = Pool::new(&mut rng, 2048, 2048);
    let dir = tempfile::tempdir().expect("temp dir");
    let flags = |rng: &mut StdRng| -> Vec<&'static str> {
        let fsync = ["never", "never", "interval", "always"][rng.gen_range(0..4)];
        let io = ["direct", "direct", "buffered"][rng.gen_range(0..3)];
        vec![
            "--segment-bytes",
            "1MiB",
            "--log-io",
            io,
            "--fsync",
            fsync,
            "--fsync-interval",
            "5ms",
        ]
    };
    let mut process = spawn(dir.path(), &flags(&mut rng)).await;
    let stream_id = stream_info(&process).await.stream_id;
    assert!(stream_id.starts_with("disk-"), "{stream_id}");
    let mut runs: Vec<(String, Ack)> = Vec::new();
    let (mut forced_torn, mut natural_torn, mut acked_total) = (0, 0, 0);
    for round in 0..ROUNDS {
        let first = stream_info(&process).await.next_sequence;
        let mut producer = Producer::start(process.ingest, &pool, PASSES).await;
        let total = producer.total;
        // The moment: after some frames were sent, after some were
        // acknowledged, or after a short random delay.
        match rng.gen_range(0..3) {
            0 => producer.wrote(rng.gen_range(0..total)).await,
            1 => {
                producer.settled(rng.gen_range(1..total)).await;
            }
            _ => tokio::time::sleep(Duration::from_micros(rng.gen_range(0..20_000))).await,
        }
        kill(&mut process).await;
        let (source, ack) = producer.finish().await;
        let torn = match round % 4 {
            1 => append_torn_record(&last_segment(dir.path()), ack.last_sequence + 1),
            _ => 0,
        };
        process = spawn(dir.path(), &flags(&mut rng)).await;
        assert_eq!(
            process.listening["stream_id"], stream_id,
            "the stream id survives"
        );
        let truncated = process.metric(TRUNCATED).await as u64;
        assert!(
            truncated >= torn,
            "round {round}: {truncated} bytes cut, {torn} torn"
        );
        if torn > 0 {
            forced_torn += 1;
        } else if truncated > 0 {
            natural_torn += 1;
        }
        // This round's packets: dense, as sent, the acknowledged ones kept.
        let sources = verify_stream(&process, &pool, first).await;
        assert!(sources.len() <= 1, "one producer per round");
        assert_acked_present(&sources, &source, &ack);
        acked_total += ack.settled;
        runs.push((source, ack));
    }
    // And nothing acknowledged in an earlier round was lost later.
    let sources = verify_stream(&process, &pool, 1).await;
    for (source, ack) in &runs {
        assert_acked_present(&sources, source, ack);
    }
    let info = stream_info(&process).await;
    assert_eq!((info.first_sequence, info.stream_id), (1, stream_id));
    eprintln!(
        "{ROUNDS} kill -9 rounds in {:?}: {acked_total} packets acknowledged, {} stored, \
         torn tails cut: {forced_torn} appended by the test, {natural_torn} left by kills",
        started.elapsed(),
        info.next_sequence - 1
    );
    assert!(forced_torn > 0);
}

/// A byte flipped in the middle of a segment while the server is down: the
/// record fails its checksum when read, is counted and never delivered; the
/// records before and after it are, and `missed` says exactly what is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_record_is_reported_and_never_delivered() {
    let mut rng = StdRng::seed_from_u64(seed());
    let pool = Pool::new(&mut rng, 1024, 2048);
    let dir = tempfile::tempdir().expect("temp dir");
    let flags = ["--segment-bytes", "1MiB", "--memory-limit", "1MiB"];
    let mut process = spawn(dir.path(), &flags).await;
    let mut producer = Producer::start(process.ingest, &pool, 4).await;
    let ack = producer.all_settled().await;
    stop(&mut process).await;
    producer.finish().await;

    // A record in the middle of the first (sealed) segment.
    let path = &segments(dir.path())[0];
    let mut bytes = std::fs::read(path).expect("read segment");
    let records = records(&bytes);
    assert!(records.len() > 4, "several records: {}", records.len());
    let (offset, len, damaged_first, damaged_count) = records[records.len() / 2];
    bytes[offset + len - len / 3] ^= 0x20;
    std::fs::write(path, &bytes).expect("write segment");
    let damaged = damaged_first..damaged_first + damaged_count;

    let process = spawn(dir.path(), &flags).await;
    assert_eq!(
        process.metric(TRUNCATED).await,
        0.0,
        "only the tail is scanned"
    );
    let next = stream_info(&process).await.next_sequence;
    assert_eq!(next, ack.last_sequence + 1);
    let mut stream = subscribe_from(&process, 1).await;
    let received = read_until(&mut stream, next).await;
    for packet in &received.packets {
        assert!(
            !damaged.contains(&packet.sequence),
            "{} delivered",
            packet.sequence
        );
        pool.check(packet);
    }
    let delivered: Vec<u64> = received
        .packets
        .iter()
        .map(|packet| packet.sequence)
        .collect();
    let expected: Vec<u64> = (1..next)
        .filter(|sequence| !damaged.contains(sequence))
        .collect();
    assert_eq!(delivered, expected, "everything around the damaged record");
    assert_eq!(received.missed, vec![(damaged.end, damaged_count)]);
    assert!(process.metric(CORRUPT).await >= 1.0, "reported");
}

/// Small segments and `--retention-bytes`: whole old segments are deleted,
/// `StreamInfo` and the log metrics agree on what is left, and a subscriber
/// from before it is told exactly how much it missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_whole_segments_and_resumers_are_told_what_is_gone() {
    let mut rng = StdRng::seed_from_u64(seed());
    let pool = Pool::new(&mut rng, 2048, 1024);
    let dir = tempfile::tempdir().expect("temp dir");
    let process = spawn(
        dir.path(),
        &[
            "--segment-bytes",
            "1MiB",
            "--retention-bytes",
            "3MiB",
            "--memory-limit",
            "1MiB",
        ],
    )
    .await;
    let mut producer = Producer::start(process.ingest, &pool, 8).await; // ~8 MiB
    let ack = producer.all_settled().await;
    producer.finish().await;
    // Retention runs every second; the log then holds at most the limit
    // plus the segment being written.
    eventually("retention", || async {
        process.metric("packet_ingest_log_first_sequence").await > 1.0
            && process.metric("packet_ingest_log_bytes").await <= f64::from(4u32 << 20)
    })
    .await;
    let info = stream_info(&process).await;
    let first = process.metric("packet_ingest_log_first_sequence").await as u64;
    assert_eq!(info.first_sequence, first);
    assert_eq!(info.next_sequence, ack.last_sequence + 1);
    assert_eq!(info.retained_packets, info.next_sequence - first);
    assert_eq!(
        info.retained_bytes as f64,
        process.metric("packet_ingest_log_bytes").await
    );
    assert!(info.durable);
    // Whole segments: what is left starts with the file of `first`.
    let files = segments(dir.path());
    assert_eq!(
        files.len() as f64,
        process.metric("packet_ingest_log_segments").await
    );
    let name = files[0]
        .file_name()
        .expect("name")
        .to_string_lossy()
        .to_string();
    assert_eq!(name, format!("{first:020}.log"));
    let on_disk: u64 = files
        .iter()
        .map(|file| file.metadata().expect("meta").len())
        .sum();
    assert_eq!(on_disk, info.retained_bytes);

    for from in [1, first / 2, first - 1, first] {
        let mut stream = subscribe_from(&process, from).await;
        let received = read_until(&mut stream, info.next_sequence).await;
        let expected: Vec<(u64, u64)> = match from < first {
            true => vec![(first, first - from)],
            false => vec![],
        };
        assert_eq!(received.missed, expected, "from {from}");
        assert_eq!(received.packets[0].sequence, first);
        assert_eq!(
            received.packets.len() as u64,
            info.next_sequence - first,
            "from {from}: every retained packet"
        );
    }
}

/// `--retention-age`: sealed segments go once they are older than the age
/// (the one being written stays).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_by_age_deletes_old_segments() {
    let mut rng = StdRng::seed_from_u64(seed());
    let pool = Pool::new(&mut rng, 1024, 1024);
    let dir = tempfile::tempdir().expect("temp dir");
    let process = spawn(
        dir.path(),
        &[
            "--segment-bytes",
            "1MiB",
            "--retention-age",
            "1s",
            "--memory-limit",
            "1MiB",
        ],
    )
    .await;
    let mut producer = Producer::start(process.ingest, &pool, 4).await; // ~2 MiB
    let ack = producer.all_settled().await;
    producer.finish().await;
    eventually("the sealed segments age out", || async {
        process.metric("packet_ingest_log_segments").await == 1.0
    })
    .await;
    assert_eq!(segments(dir.path()).len(), 1);
    let info = stream_info(&process).await;
    assert!(info.first_sequence > 1);
    let mut stream = subscribe_from(&process, 1).await;
    let received = read_until(&mut stream, ack.last_sequence + 1).await;
    assert_eq!(
        received.missed,
        vec![(info.first_sequence, info.first_sequence - 1)]
    );
}

/// Start-up reads a bounded tail of the last segment, however large the log:
/// the bytes recovery scanned (a metric) stay under one index interval plus
/// two records for a 1 MiB and a 48 MiB log alike (not a timing: a count).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_scans_a_bounded_tail_whatever_the_log_size() {
    let mut rng = StdRng::seed_from_u64(seed());
    let pool = Pool::new(&mut rng, 2048, 1024);
    let dir = tempfile::tempdir().expect("temp dir");
    let flags = ["--segment-bytes", "32MiB"];
    let mut scans = Vec::new();
    let mut process = spawn(dir.path(), &flags).await;
    for passes in [1, 48] {
        let mut producer = Producer::start(process.ingest, &pool, passes).await;
        producer.all_settled().await;
        producer.finish().await;
        kill(&mut process).await;
        process = spawn(dir.path(), &flags).await;
        let scanned = process.metric(SCANNED).await as u64;
        let log_bytes = process.metric("packet_ingest_log_bytes").await as u64;
        let last = std::fs::read(last_segment(dir.path())).expect("read");
        let largest = records(&last)
            .iter()
            .map(|record| record.1 as u64)
            .max()
            .unwrap_or(0);
        // From the last index entry: under one interval plus the record
        // that crosses it, the entry's record read twice (it is checked
        // first), and a header where the valid part ends.
        let bound = INDEX_EVERY + 2 * largest + RECORD_HEADER as u64;
        eprintln!("log of {log_bytes} bytes: start-up scanned {scanned} (bound {bound})");
        assert!(scanned > 0, "the tail was scanned");
        assert!(
            scanned <= bound,
            "{scanned} scanned of {log_bytes}; bound {bound}"
        );
        scans.push((log_bytes, scanned));
    }
    assert!(scans[1].0 > 20 * scans[0].0, "the log grew: {scans:?}");
}

/// A subscriber from sequence 1 while a producer runs at full speed, with a
/// 4 MiB ring: it reads from the log, then the ring, then live (and back to
/// the log whenever it falls off the ring) and sees every packet once, in
/// order. (With a 1 MiB ring, one in-flight delivery of up to 1 MiB pinned
/// past half the limit, and the server rightly closed the reader as one
/// holding memory: the test then failed about one run in six.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_from_disk_joins_ring_and_live_without_gap_or_duplicate() {
    let mut rng = StdRng::seed_from_u64(seed());
    let pool = Pool::new(&mut rng, 2048, 1024);
    let dir = tempfile::tempdir().expect("temp dir");
    let process = spawn(
        dir.path(),
        &["--segment-bytes", "1MiB", "--memory-limit", "4MiB"],
    )
    .await;
    // History that is on disk only.
    let mut before = Producer::start(process.ingest, &pool, 24).await;
    let ack = before.all_settled().await;
    before.finish().await;
    let in_ring = process.metric("packet_ingest_hub_retained_packets").await as u64;
    assert!(
        in_ring < ack.last_sequence / 2,
        "sequence 1 is only on disk"
    );

    let mut stream = subscribe_from(&process, 1).await;
    let mut racing = Producer::start(process.ingest, &pool, 24).await;
    let end = ack.last_sequence + racing.total + 1;
    let reader = tokio::spawn(async move { read_until(&mut stream, end).await });
    let racing_ack = racing.all_settled().await;
    racing.finish().await;
    assert_eq!(racing_ack.last_sequence + 1, end, "nobody else published");
    let received = reader.await.expect("reader");
    assert_eq!(received.missed, vec![]);
    let sequences: Vec<u64> = received
        .packets
        .iter()
        .map(|packet| packet.sequence)
        .collect();
    assert_eq!(sequences, (1..end).collect::<Vec<_>>());
    for packet in &received.packets {
        pool.check(packet);
    }
    assert!(process.metric(LOG_READ).await > 0.0, "it read from the log");
}

/// `--log-io`: with `direct` (the default) a producer faster than the disk
/// fills the writer's 1 MiB buffer, which then goes O_DIRECT; with
/// `buffered` nothing does. Either way the log reads back complete, in
/// order and byte for byte, before and after a restart. (`--fsync always`
/// holds each write for its fsync, so batches queue into full buffers.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_and_buffered_logs_read_back_whole_across_a_restart() {
    const DIRECT: &str = "packet_ingest_log_direct_write_bytes_total";
    let mut rng = StdRng::seed_from_u64(seed());
    let pool = Pool::new(&mut rng, 2048, 2048);
    for io in ["direct", "buffered"] {
        let dir = tempfile::tempdir().expect("temp dir");
        let flags = [
            "--log-io",
            io,
            "--fsync",
            "always",
            "--segment-bytes",
            "8MiB",
        ];
        let mut process = spawn(dir.path(), &flags).await;
        let mut producer = Producer::start(process.ingest, &pool, 8).await;
        let ack = producer.all_settled().await;
        let (source, _) = producer.finish().await;
        let direct = process.metric(DIRECT).await;
        match io {
            "direct" => assert!(
                direct >= f64::from(1u32 << 20),
                "{io}: {direct} bytes direct"
            ),
            _ => assert_eq!(direct, 0.0, "{io}"),
        }
        let sources = verify_stream(&process, &pool, 1).await;
        assert_acked_present(&sources, &source, &ack);
        stop(&mut process).await;
        let process = spawn(dir.path(), &flags).await;
        assert_eq!(process.metric(TRUNCATED).await, 0.0, "{io}: a clean stop");
        assert_eq!(
            stream_info(&process).await.next_sequence,
            ack.last_sequence + 1
        );
        let sources = verify_stream(&process, &pool, 1).await;
        assert_acked_present(&sources, &source, &ack);
    }
}

/// A second process on the same directory exits 64 naming the holder; once
/// the holder is gone (even by `kill -9`) the directory is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_on_the_directory_exits_64_naming_the_holder() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut first = spawn(dir.path(), &[]).await;
    let output = tokio::time::timeout(
        PATIENCE,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_packet-ingest"))
            .args(LOOPBACK_ADDRS)
            .args(data_dir_args(dir.path()))
            .output(),
    )
    .await
    .expect("second process exits")
    .expect("run");
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains(&format!("pid {}", first.pid())), "{stderr}");
    assert!(
        stderr.contains(&dir.path().display().to_string()),
        "{stderr}"
    );
    kill(&mut first).await;
    let again = spawn(dir.path(), &[]).await;
    assert_eq!(again.listening["stream_id"], first.listening["stream_id"]);
}

/// `GET /healthz` status code.
async fn healthz(addr: SocketAddr) -> u16 {
    let mut stream = TcpStream::connect(addr).await.expect("metrics connect");
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut out = String::new();
    stream.read_to_string(&mut out).await.expect("read");
    out.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("status line")
}

async fn health(addr: SocketAddr) -> Option<i32> {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .ok()?
        .connect()
        .await
        .ok()?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: "packetingest.v1.Packets".into(),
        })
        .await
        .ok()?;
    Some(response.into_inner().status)
}

const SERVING: i32 = 1;
const NOT_SERVING: i32 = 2;

/// The common part of the write-failure tests: a producer runs until writes
/// fail; health turns NOT_SERVING (gRPC and `/healthz`) and nothing more is
/// acknowledged while they fail; `make_room` ends the failure; then health
/// recovers, everything is acknowledged and readable back from disk.
async fn writes_fail_then_recover(process: &Process, pool: &Arc<Pool>, make_room: impl FnOnce()) {
    let mut producer = Producer::start(process.ingest, pool, 12).await; // ~6 MiB
    eventually("log writes fail", || async {
        process.metric(WRITE_ERRORS).await >= 1.0
    })
    .await;
    eventually("health NOT_SERVING", || async {
        health(process.grpc).await == Some(NOT_SERVING)
    })
    .await;
    assert_eq!(healthz(process.metrics).await, 503);
    // From one failed retry to two more (the writer's back-off is the
    // clock): no acknowledgement moved in between, and not everything is
    // settled. (Not from the first failure: an fsync just before it may
    // still be on its way as an acknowledgement, coalesced every 10 ms.)
    let errors = process.metric(WRITE_ERRORS).await;
    eventually("one more failed retry", || async {
        process.metric(WRITE_ERRORS).await >= errors + 1.0
    })
    .await;
    let before = producer.acks.borrow().settled;
    eventually("two more failed retries", || async {
        process.metric(WRITE_ERRORS).await >= errors + 3.0
    })
    .await;
    let during = producer.acks.borrow().settled;
    assert_eq!(before, during, "nothing acknowledged while writes fail");
    assert!(
        during < producer.total,
        "{during} of {} acknowledged",
        producer.total
    );

    make_room();
    let ack = producer.all_settled().await;
    let (source, _) = producer.finish().await;
    eventually("health SERVING again", || async {
        health(process.grpc).await == Some(SERVING)
    })
    .await;
    assert_eq!(healthz(process.metrics).await, 200);
    // The ring holds 1 MiB: this reads the log, including what was written
    // after the failure.
    let sources = verify_stream(process, pool, 1).await;
    assert_acked_present(&sources, &source, &ack);
    assert_eq!(sources[&source].len() as u64, ack.settled);
}

/// Disk full, for real: the data directory is on a 16 MiB tmpfs, all but
/// 1 MiB taken by a ballast file, in the server's own mount namespace (`unshare`
/// as an unprivileged user namespace); the test frees the space through
/// `/proc/PID/root`. Where user namespaces are not allowed (some container
/// sandboxes) this test says so and passes, unless
/// `PACKET_INGEST_REQUIRE_TMPFS` is set; the file-size-limit test below
/// covers the same path there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_pauses_ingest_and_health_until_space_returns() {
    let mount = tempfile::tempdir().expect("temp dir");
    let mount_path = mount.path().display().to_string();
    assert!(!mount_path.contains('\''), "{mount_path}");
    let probe = std::process::Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "sh", "-c"])
        .arg(format!("mount -t tmpfs -o size=1m probe '{mount_path}'"))
        .output();
    if !probe.as_ref().is_ok_and(|output| output.status.success()) {
        assert!(
            std::env::var("PACKET_INGEST_REQUIRE_TMPFS").is_err(),
            "a tmpfs in a user namespace is required: {probe:?}"
        );
        eprintln!("SKIPPED: cannot mount a tmpfs in a user namespace here: {probe:?}");
        return;
    }
    let script = format!(
        "mount -t tmpfs -o size=16m packet-ingest-test '{mount_path}' \
         && head -c 15728640 /dev/zero > '{mount_path}/ballast' && exec \"$0\" \"$@\""
    );
    let wrapper = [
        "unshare",
        "--user",
        "--map-root-user",
        "--mount",
        "sh",
        "-c",
        script.as_str(),
    ];
    let mut rng = StdRng::seed_from_u64(seed());
    let pool = Pool::new(&mut rng, 1024, 1024);
    let data = mount.path().join("data");
    let process = launch(
        Launch {
            wrapper: &wrapper,
            listen: None,
        },
        &data,
        &["--segment-bytes", "64MiB", "--memory-limit", "1MiB"],
    )
    .await;
    let ballast = PathBuf::from(format!("/proc/{}/root{mount_path}/ballast", process.pid()));
    assert!(ballast.exists(), "the tmpfs is reachable through /proc");
    writes_fail_then_recover(&process, &pool, || {
        std::fs::remove_file(&ballast).expect("free the space");
    })
    .await;
}

/// A write error without root or namespaces: the server runs under a file
/// size limit (`prlimit --fsize`, SIGXFSZ ignored by the wrapper so the
/// write fails with EFBIG instead of killing the process), which the test
/// lifts on the running process. Afterwards a restart recovers everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_error_pauses_ingest_and_health_until_writes_succeed() {
    let limit = (2u64 << 20).to_string();
    let script = format!("trap '' XFSZ; exec prlimit --fsize={limit}:unlimited -- \"$0\" \"$@\"");
    let wrapper = ["sh", "-c", script.as_str()];
    let mut rng = StdRng::seed_from_u64(seed());
    let pool = Pool::new(&mut rng, 1024, 1024);
    let dir = tempfile::tempdir().expect("temp dir");
    let flags = ["--segment-bytes", "64MiB", "--memory-limit", "1MiB"];
    let mut process = launch(
        Launch {
            wrapper: &wrapper,
            listen: None,
        },
        dir.path(),
        &flags,
    )
    .await;
    let pid = process.pid().to_string();
    writes_fail_then_recover(&process, &pool, || {
        let status = std::process::Command::new("prlimit")
            .args(["--pid", &pid, "--fsize=unlimited:unlimited"])
            .status()
            .expect("run prlimit");
        assert!(status.success());
    })
    .await;
    let stored = stream_info(&process).await.next_sequence;
    stop(&mut process).await;
    let process = spawn(dir.path(), &flags).await;
    assert_eq!(process.metric(TRUNCATED).await, 0.0);
    assert_eq!(stream_info(&process).await.next_sequence, stored);
    verify_stream(&process, &pool, 1).await;
}
