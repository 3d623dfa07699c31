//! `packet-ingest bench`: a load generator and checker, in the spirit of `nats bench`.
//!
//! N producers (TCP ingest connections, or Publish streams with `--via publish`)
//! send fixed-size packets, M subscribers (each its own HTTP/2 connection) read
//! them back, and every subscriber checks completeness and order per
//! `(source, source_sequence)`. The same tool drives a `nats-server`
//! (`--target nats`), so comparisons use the same client code on both sides.
//!
//! Payload layout (so the receiving side needs no lookup table):
//!
//! ```text
//! 0..8   send time, unix nanos, big-endian (0 unless --rate is given)
//! 8..16  producer-local index, big-endian (see `Plan::index_modulus`)
//! 16..   --payload: filler (one byte), text (log lines) or random bytes
//! ```
//!
//! `--compression gzip|zstd` asks packet-ingest for compressed Subscribe
//! responses (and compresses Publish requests); subscribers count the bytes
//! their sockets read ([`counted`]), so a run reports bytes on the wire per
//! packet beside the server's CPU.
//!
//! Producer `p` sends on channel `p` (NATS subject `bench.<p>`), so a subscriber
//! finds the producer of a packet from its channel and checks the packet's
//! `source` bytes against that producer's `tcp/IP:PORT` without allocating.
//!
//! The measurement client shares the machine with the server, so both sides are
//! kept cheap: producers write pre-built frames with large writes (frames are
//! hashed once per block, not per send), and subscribers walk the protobuf bytes
//! of each `SubscribeResponse` in place (`receive`), never building `Packet`
//! values. CPU used by this process and, with `--server-pid`, by the server is
//! read from `/proc` so results can be given per packet as well as per second.
//!
//! - [`counted`]: the byte-counting connector subscribers connect through.
//! - [`nats`]: a minimal NATS protocol client (`--nats-client raw`).
//! - [`produce`]: payloads, frames, pacing, and the TCP / Publish / NATS producers.
//! - [`walk`]: the in-place `SubscribeResponse` walker.
//! - [`receive`]: per-subscriber checks, the counting tonic codec, and the gRPC
//!   and async-nats subscribers.
//! - [`report`]: figures, the progress line, text and JSON output.

mod counted;
mod nats;
mod produce;
mod receive;
mod report;
mod walk;

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, OnceLock,
    },
    time::{Duration, Instant},
};

use clap::{Args, ValueEnum};
use tokio::task::JoinSet;

use packet_ingest_protocol::{
    client::{TlsClientArgs, ToolError},
    units::{parse_duration, parse_size},
};

pub use walk::{walk_response, PacketView, WalkError};

/// Payload bytes the bench itself uses: send time and producer-local index.
pub const MIN_PAYLOAD: usize = 16;

/// How long a subscriber waits for the server to confirm its stream before the
/// producers start anyway (grpc servers that send headers only with the first
/// message, like the Python seed design, never confirm early).
const SUBSCRIBE_GRACE: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Target {
    /// A packet-ingest server (or anything speaking its wire format and proto).
    PacketIngest,
    /// A nats-server: plain publish/subscribe, no verification.
    Nats,
    /// NATS JetStream with its file store: producers publish and await the
    /// stream's acks (pipelined), subscribers read with an ordered consumer.
    Jetstream,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Via {
    /// Producers are TCP ingest connections (SPEC §2 frames).
    Tcp,
    /// Producers are Publish RPC streams.
    Publish,
}

/// What a payload holds after its send time and index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Content {
    /// One repeated byte: cheapest to build, compresses to almost nothing.
    Filler,
    /// Log lines with varying values: compresses like real text payloads.
    Text,
    /// Random bytes: compression cannot shrink them.
    Random,
}

/// gRPC compression the bench asks for (packet-ingest's `--compression`
/// must allow it): Subscribe responses accepted compressed, Publish
/// requests sent compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    pub fn encoding(self) -> Option<tonic::codec::CompressionEncoding> {
        match self {
            Compression::None => None,
            Compression::Gzip => Some(tonic::codec::CompressionEncoding::Gzip),
            Compression::Zstd => Some(tonic::codec::CompressionEncoding::Zstd),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum NatsClient {
    /// The async-nats crate.
    AsyncNats,
    /// A minimal protocol client with pre-built PUB blocks and in-place MSG
    /// parsing, as cheap as the packet-ingest side of this tool.
    Raw,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// What to measure.
    #[arg(long, value_enum, default_value_t = Target::PacketIngest)]
    pub target: Target,
    /// How producers reach packet-ingest.
    #[arg(long, value_enum, default_value_t = Via::Tcp)]
    pub via: Via,
    /// Producer connections.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub producers: u32,
    /// Subscriber streams, each on its own connection.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub subscribers: u32,
    /// Payload size in bytes (at least 16; suffixes KiB, MiB allowed).
    #[arg(long, default_value = "1KiB", value_parser = parse_size)]
    pub size: u64,
    /// What payloads hold after their send time and index.
    #[arg(long, value_enum, default_value_t = Content::Filler)]
    pub payload: Content,
    /// Compression for Subscribe responses and Publish requests
    /// (packet-ingest only; the server must list it in --compression).
    #[arg(long, value_enum, default_value_t = Compression::None)]
    pub compression: Compression,
    /// Packets per producer (default 100000 unless --duration is given).
    #[arg(long, conflicts_with = "duration")]
    pub count: Option<u64>,
    /// Send for this long instead of a fixed count (e.g. 10s).
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Total packets per second across all producers; unpaced when absent.
    /// Paced runs stamp send times and report ingest->delivery latency.
    #[arg(long)]
    pub rate: Option<f64>,
    /// packet-ingest TCP ingest address.
    #[arg(long, default_value = "127.0.0.1:7000")]
    pub ingest_addr: SocketAddr,
    /// packet-ingest gRPC address (`host:port` or URL).
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub grpc_addr: String,
    /// nats-server URL for --target nats.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// NATS client for --target nats (raw: a minimal protocol client as cheap
    /// as ours, so the client is not what limits the comparison).
    #[arg(long, value_enum, default_value_t = NatsClient::AsyncNats)]
    pub nats_client: NatsClient,
    /// Bearer token for a server started with --auth-token-file.
    #[arg(long, env = "PACKET_INGEST_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Also report the CPU time this process (the server) used during the run;
    /// repeat for a server made of several processes (their times are summed).
    #[arg(long = "server-pid")]
    pub server_pids: Vec<u32>,
    /// After the producers finish, how long subscribers wait without progress
    /// before counting what has not arrived as lost.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// Print one JSON object with every figure instead of the text summary.
    #[arg(long)]
    pub json: bool,
    /// No progress line on stderr.
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub tls: TlsClientArgs,
}

/// Everything about a run that is fixed before the first packet is sent.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    pub target: Target,
    pub via: Via,
    pub producers: usize,
    pub size: usize,
    pub content: Content,
    /// Packets per producer; `None` means until `duration` has passed.
    pub count: Option<u64>,
    pub duration: Option<Duration>,
    /// Packets per second per producer.
    pub rate_per_producer: Option<f64>,
    /// Unpaced producers resend one pre-built block of frames, so the payload
    /// index is the position in that block: `source_sequence % index_modulus`.
    /// Paced producers (and NATS ones) stamp the real index: `u64::MAX`.
    pub index_modulus: u64,
}

impl Plan {
    fn from_args(args: &BenchArgs) -> Result<Self, ToolError> {
        let size = usize::try_from(args.size)?;
        if size < MIN_PAYLOAD {
            return Err(format!(
                "--size {size} is too small: bench payloads carry an 8-byte send time and an \
                 8-byte index, so use at least {MIN_PAYLOAD}"
            )
            .into());
        }
        if size > u32::MAX as usize {
            return Err(format!("--size {size} does not fit a frame's 32-bit length").into());
        }
        if let Some(rate) = args.rate {
            if !(rate.is_finite() && rate > 0.0) {
                return Err(format!("--rate {rate} must be a positive number").into());
            }
        }
        if args.target != Target::PacketIngest && args.via == Via::Publish {
            return Err("--via publish is for --target packet-ingest".into());
        }
        if args.target != Target::PacketIngest && args.compression != Compression::None {
            return Err("--compression is for --target packet-ingest".into());
        }
        let producers = args.producers as usize;
        let count = match (args.count, args.duration) {
            (Some(count), _) => Some(count),
            (None, Some(_)) => None,
            (None, None) => Some(100_000),
        };
        let paced = args.rate.is_some();
        let index_modulus = match (args.target, paced) {
            (Target::PacketIngest, false) => produce::block_frames(size, count),
            _ => u64::MAX,
        };
        Ok(Plan {
            target: args.target,
            via: args.via,
            producers,
            size,
            content: args.payload,
            count,
            duration: args.duration,
            rate_per_producer: args.rate.map(|rate| rate / producers as f64),
            index_modulus,
        })
    }

    pub fn paced(&self) -> bool {
        self.rate_per_producer.is_some()
    }
}

/// State the producers, subscribers and the progress line share.
#[derive(Debug)]
pub(crate) struct Shared {
    /// Packets each producer has handed to the kernel (or the client library).
    pub sent: Vec<AtomicU64>,
    /// Packets all producers sent in total, once they have all finished.
    pub total_sent: OnceLock<u64>,
    pub producers_done_at: OnceLock<Instant>,
    /// When the first producer started: time zero of every rate.
    pub started: OnceLock<Instant>,
}

impl Shared {
    fn new(producers: usize) -> Self {
        Shared {
            sent: (0..producers).map(|_| AtomicU64::new(0)).collect(),
            total_sent: OnceLock::new(),
            producers_done_at: OnceLock::new(),
            started: OnceLock::new(),
        }
    }

    pub fn sent_now(&self) -> u64 {
        self.sent
            .iter()
            .map(|sent| sent.load(Ordering::Relaxed))
            .sum()
    }
}

/// Runs the benchmark; `Ok(false)` when a subscriber saw loss, a gap or disorder.
pub async fn run(args: BenchArgs) -> Result<bool, ToolError> {
    let plan = Arc::new(Plan::from_args(&args)?);
    let shared = Arc::new(Shared::new(plan.producers));
    let args = Arc::new(args);
    if plan.target == Target::Jetstream {
        produce::reset_jetstream(&args.nats_url).await?;
    }

    // Producers connect first: their local addresses are the sources the
    // subscribers will check packets against.
    let connected = produce::connect_all(&plan, &args).await?;
    let sources: Vec<Vec<u8>> = connected.iter().map(produce::Connected::source).collect();

    let mut subscribers = Vec::new();
    let mut ready = Vec::new();
    for _ in 0..args.subscribers {
        let stats = Arc::new(Mutex::new(receive::SubStats::new(&plan, &sources)));
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(receive::subscriber(
            Arc::clone(&plan),
            Arc::clone(&args),
            Arc::clone(&shared),
            Arc::clone(&stats),
            ready_tx,
        ));
        subscribers.push((stats, task));
        ready.push(ready_rx);
    }
    for ready_rx in ready {
        // A subscriber that failed drops its sender without sending.
        let _ = ready_rx.await;
    }
    // Fail fast (before any packet is sent) if a subscriber could not subscribe.
    for (_, task) in &mut subscribers {
        if task.is_finished() {
            return Err(match task.await {
                Ok(Err(error)) => error.into(),
                Ok(Ok(())) => "a subscriber ended before the run started".into(),
                Err(join) => join.into(),
            });
        }
    }

    let cpu_before = report::CpuSample::take(&args.server_pids);
    let sampler = report::CpuSampler::start(args.server_pids.clone());
    let started = Instant::now();
    let _ = shared.started.set(started);
    let progress = (!args.quiet).then(|| {
        tokio::spawn(report::progress(
            Arc::clone(&shared),
            subscribers
                .iter()
                .map(|(stats, _)| Arc::clone(stats))
                .collect(),
        ))
    });

    let mut producers = JoinSet::new();
    for (index, connection) in connected.into_iter().enumerate() {
        producers.spawn(produce::produce(
            index,
            connection,
            Arc::clone(&plan),
            Arc::clone(&shared),
        ));
    }
    let mut producer_reports = Vec::new();
    while let Some(joined) = producers.join_next().await {
        producer_reports.push(joined??);
    }
    let _ = shared.producers_done_at.set(Instant::now());
    let _ = shared.total_sent.set(shared.sent_now());

    let mut outcomes = Vec::new();
    for (stats, task) in subscribers {
        let error = match task.await {
            Ok(Ok(())) => None,
            Ok(Err(error)) => Some(error),
            Err(join) => Some(format!("subscriber task failed: {join}")),
        };
        outcomes.push((stats, error));
    }
    let last_delivery = outcomes
        .iter()
        .filter_map(|(stats, _)| receive::lock(stats).last_at)
        .max();
    let cpu_after = sampler.finish(last_delivery);
    if let Some(progress) = progress {
        progress.abort();
        eprintln!();
    }

    let result = report::BenchReport::build(
        &plan,
        &args,
        &shared,
        started,
        &producer_reports,
        outcomes,
        cpu_before,
        cpu_after,
    );
    match args.json {
        true => println!("{}", result.to_json()),
        false => print!("{}", result.to_text()),
    }
    Ok(result.ok())
}
