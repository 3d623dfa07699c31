//! Hostile-client probe: what idle, stalled, greedy or unlucky clients do to a
//! running `packet-ingest` server, measured from the outside.
//!
//! Every scenario starts a fresh server binary (spawned here, on loopback port
//! 0, addresses read from its JSON "packet-ingest listening" log line), applies
//! N misbehaving clients and then, while they stay connected, runs well-behaved
//! clients and reports what they got: a subscriber on channel 1 (subscribed
//! first), a TCP producer of 100 packets of 1 KiB on channel 1, ten gRPC health
//! checks (a new connection each, 2 s timeout each counting as a failure), the
//! server's CPU% over a 2 s idle window once the clients are connected, and its
//! VmHWM / VmRSS from `/proc/PID/status`.
//!
//! Only the public wire contract is used: the TCP frame format (SPEC §2) and the
//! gRPC service `packetingest.v1.Packets` (messages are declared here, with the
//! optional `stream_id` field 3 of SubscribeRequest, so the same probe talks to
//! older and newer servers).
//!
//! ```text
//! cargo build --release --bins --examples
//! target/release/examples/hostile_probe                      # every scenario, "before"
//! target/release/examples/hostile_probe --scenario idle-ingest --scenario partial-frame
//! target/release/examples/hostile_probe --bin /path/to/packet-ingest \
//!     --server-arg=--max-publishers=256 --json -- --ingest-idle-timeout 10s
//! ```
//!
//! Flags: `--bin PATH` server binary (default `target/release/packet-ingest` of
//! the workspace); `--scenario NAME` (repeatable, default all); `--clients N`
//! (overrides each scenario's default N); `--server-arg ARG` (repeatable) and
//! everything after `--` are appended to every server command line;
//! `--scenario-timeout SECS` bounds each scenario (default 90); `--json` prints
//! one JSON document on stdout (human lines then go to stderr). Sizes:
//! `--flood-mib` (200), `--churn-packets` (3,000,000), `--filter-channels`
//! (377,000), `--grpc-sockets` (1,100), `--nofile` (1,024). `--clients` does
//! not change the fixed rows (idle-ingest N=64 with `--max-connections 64`,
//! idle-publish N=4096). If the huge filter is refused, huge-filter retries
//! once with 370,000 channels, which fits a 1 MiB + 64 KiB decode limit.
//!
//! The servers inherit this process's open-file limit (idle-grpc-sockets runs
//! its server under `prlimit --nofile=N:N`); the probe itself needs a limit of
//! several thousand. Figures are one run on a shared machine: compare runs on
//! the same machine only.
//!
//! Scenarios: idle-ingest, half-header-ingest, partial-frame, idle-publish,
//! stalled-subscribers, stop-reading-subscribers, channel-churn, huge-filter,
//! idle-grpc-sockets, status-codes, restart-resume, hmac-crlf.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{ExitCode, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use clap::Parser;
use futures::{stream, StreamExt};
use http::uri::PathAndQuery;
use packet_ingest_protocol::{
    frame::{sha256_frame, Channel, Frame},
    pb::{PublishRequest, PublishResponse},
};
use serde_json::{json, Value};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
    process::{Child, Command},
    task::JoinSet,
    time::{sleep, timeout},
};
use tokio_util::sync::CancellationToken;
use tonic::{
    client::Grpc,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    transport::{Channel as GrpcChannel, Endpoint},
    Code, Request, Status, Streaming,
};
use tonic_prost::ProstCodec;

const SUBSCRIBE: &str = "/packetingest.v1.Packets/Subscribe";
const PUBLISH: &str = "/packetingest.v1.Packets/Publish";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const RPC_TIMEOUT: Duration = Duration::from_secs(5);
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
const IDLE_WINDOW: Duration = Duration::from_secs(2);
const SETTLE: Duration = Duration::from_millis(500);
/// Packets the well-behaved producer sends (1 KiB each, channel 1).
const GOOD_PACKETS: usize = 100;
const GOOD_CHANNEL: u32 = 1;
const KIB: usize = 1024;
const MIB: f64 = 1024.0 * 1024.0;

// ---------------------------------------------------------------------------
// Command line and plan

#[derive(Debug, Parser)]
#[command(about = "Measure what hostile clients do to a packet-ingest server")]
struct Args {
    /// Server binary to spawn.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/release/packet-ingest"))]
    bin: PathBuf,
    /// Run only these scenarios (repeat the flag); all when absent.
    #[arg(long = "scenario")]
    scenarios: Vec<String>,
    /// Misbehaving clients per scenario (each scenario has its own default).
    #[arg(long)]
    clients: Option<usize>,
    /// Extra server argument, appended to every server command line (repeatable).
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    server_args: Vec<String>,
    /// Upper bound on one scenario's wall time, in seconds.
    #[arg(long, default_value_t = 90)]
    scenario_timeout: u64,
    /// MiB of 1 KiB packets pushed by the floods (stalled subscribers, huge filter).
    #[arg(long, default_value_t = 200)]
    flood_mib: u64,
    /// Packets (one channel each) in channel-churn.
    #[arg(long, default_value_t = 3_000_000)]
    churn_packets: u32,
    /// Channels in each huge-filter subscriber's filter.
    #[arg(long, default_value_t = 377_000)]
    filter_channels: u32,
    /// Raw TCP connections to the gRPC port in idle-grpc-sockets.
    #[arg(long, default_value_t = 1100)]
    grpc_sockets: usize,
    /// Open-file limit (soft and hard) of the server in idle-grpc-sockets.
    #[arg(long, default_value_t = 1024)]
    nofile: u64,
    /// Print one JSON document on stdout; human-readable lines go to stderr.
    #[arg(long)]
    json: bool,
    /// Further server arguments.
    #[arg(last = true)]
    trailing: Vec<String>,
}

/// What every scenario needs to know.
struct Ctx {
    bin: PathBuf,
    server_args: Vec<String>,
    flood_mib: u64,
    churn_packets: u32,
    filter_channels: u32,
    nofile: u64,
    clock_ticks: f64,
    json: bool,
}

/// One row of the plan: a scenario with its parameters.
#[derive(Clone, Debug)]
enum Run {
    IdleIngest {
        n: usize,
        max_connections: Option<u32>,
    },
    HalfHeader {
        n: usize,
    },
    PartialFrame {
        n: usize,
    },
    IdlePublish {
        n: usize,
    },
    StalledSubscribers {
        n: usize,
        reads_first: usize,
    },
    ChannelChurn,
    HugeFilter,
    IdleGrpcSockets {
        n: usize,
    },
    StatusCodes,
    RestartResume,
    HmacCrlf,
}

impl Run {
    fn name(&self) -> &'static str {
        match self {
            Run::IdleIngest { .. } => "idle-ingest",
            Run::HalfHeader { .. } => "half-header-ingest",
            Run::PartialFrame { .. } => "partial-frame",
            Run::IdlePublish { .. } => "idle-publish",
            Run::StalledSubscribers { reads_first: 0, .. } => "stalled-subscribers",
            Run::StalledSubscribers { .. } => "stop-reading-subscribers",
            Run::ChannelChurn => "channel-churn",
            Run::HugeFilter => "huge-filter",
            Run::IdleGrpcSockets { .. } => "idle-grpc-sockets",
            Run::StatusCodes => "status-codes",
            Run::RestartResume => "restart-resume",
            Run::HmacCrlf => "hmac-crlf",
        }
    }

    fn label(&self, ctx: &Ctx) -> String {
        let params = match self {
            Run::IdleIngest {
                n,
                max_connections: Some(max),
            } => format!("N={n}, --max-connections {max}"),
            Run::IdleIngest { n, .. } => format!("N={n}, defaults"),
            Run::HalfHeader { n } | Run::PartialFrame { n } | Run::IdlePublish { n } => {
                format!("N={n}")
            }
            Run::StalledSubscribers { n, .. } => format!("N={n}, --memory-limit 64MiB"),
            Run::ChannelChurn => format!("{} channels", ctx.churn_packets),
            Run::HugeFilter => format!("8 x {} channels", ctx.filter_channels),
            Run::IdleGrpcSockets { n } => format!("N={n}, nofile {}", ctx.nofile),
            Run::StatusCodes | Run::RestartResume | Run::HmacCrlf => return self.name().into(),
        };
        format!("{} ({params})", self.name())
    }
}

fn plan(args: &Args) -> Vec<Run> {
    let n = |default: usize| args.clients.unwrap_or(default);
    let all = vec![
        Run::IdleIngest {
            n: 64,
            max_connections: Some(64),
        },
        Run::IdleIngest {
            n: n(1000),
            max_connections: None,
        },
        Run::HalfHeader { n: n(1000) },
        Run::PartialFrame { n: n(256) },
        Run::IdlePublish { n: n(1000) },
        Run::IdlePublish { n: 4096 },
        Run::StalledSubscribers {
            n: n(1000),
            reads_first: 0,
        },
        Run::StalledSubscribers {
            n: n(500),
            reads_first: 3,
        },
        Run::ChannelChurn,
        Run::HugeFilter,
        Run::IdleGrpcSockets {
            n: n(args.grpc_sockets),
        },
        Run::StatusCodes,
        Run::RestartResume,
        Run::HmacCrlf,
    ];
    all.into_iter()
        .filter(|run| args.scenarios.is_empty() || args.scenarios.iter().any(|s| s == run.name()))
        .collect()
}

async fn run_scenario(ctx: &Ctx, run: &Run, f: &mut Figures) -> Result<(), String> {
    match *run {
        Run::IdleIngest { n, max_connections } => idle_ingest(ctx, f, n, max_connections).await,
        Run::HalfHeader { n } => half_header_ingest(ctx, f, n).await,
        Run::PartialFrame { n } => partial_frame(ctx, f, n).await,
        Run::IdlePublish { n } => idle_publish(ctx, f, n).await,
        Run::StalledSubscribers { n, reads_first } => {
            stalled_subscribers(ctx, f, n, reads_first).await
        }
        Run::ChannelChurn => channel_churn(ctx, f).await,
        Run::HugeFilter => huge_filter(ctx, f).await,
        Run::IdleGrpcSockets { n } => idle_grpc_sockets(ctx, f, n).await,
        Run::StatusCodes => status_codes(ctx, f).await,
        Run::RestartResume => restart_resume(ctx, f).await,
        Run::HmacCrlf => hmac_crlf(ctx, f).await,
    }
}

// ---------------------------------------------------------------------------
// Reporting

/// The figures of one scenario run, printed as they are taken.
struct Figures {
    rows: Vec<(String, Value)>,
    to_stderr: bool,
}

impl Figures {
    fn put(&mut self, figure: &str, value: impl Into<Value>) {
        let value = value.into();
        self.say(&format!("  {figure}: {}", render(&value)));
        self.rows.push((figure.to_owned(), value));
    }

    fn say(&self, line: &str) {
        if self.to_stderr {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    }
}

fn render(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

fn round1(x: f64) -> Value {
    json!((x * 10.0).round() / 10.0)
}

/// "text xN, other xM" for a list of repeated messages; "-" when empty.
fn tally<I: IntoIterator<Item = String>>(items: I) -> String {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for item in items {
        *counts.entry(item).or_default() += 1;
    }
    if counts.is_empty() {
        return "-".into();
    }
    counts
        .into_iter()
        .map(|(text, count)| format!("{text} x{count}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((index, _)) => format!("{}…", &text[..index]),
        None => text.to_owned(),
    }
}

/// `CODE: message` of a gRPC status.
fn status_text(status: &Status) -> String {
    format!(
        "{}: {}",
        code_name(status.code()),
        truncate(status.message(), 160)
    )
}

/// An error and its sources on one line.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    truncate(&text, 160)
}

fn print_table(runs: &[(String, Figures)], to_stderr: bool) {
    let mut out = String::from("\n| scenario | figure | value |\n| --- | --- | --- |\n");
    for (label, figures) in runs {
        for (figure, value) in &figures.rows {
            let value = render(value).replace('|', "\\|").replace('\n', " ");
            out.push_str(&format!("| {label} | {figure} | {value} |\n"));
        }
    }
    if to_stderr {
        eprint!("{out}");
    } else {
        print!("{out}");
    }
}

// ---------------------------------------------------------------------------
// The server process and /proc

struct Server {
    child: Child,
    pid: u32,
    grpc: SocketAddr,
    ingest: SocketAddr,
    metrics: SocketAddr,
    log_lines: Arc<AtomicU64>,
}

impl Server {
    /// Spawns the server with `args` (plus the user's), optionally under
    /// `prlimit --nofile`, on the given addresses or on loopback port 0.
    async fn start(
        ctx: &Ctx,
        args: &[String],
        nofile: Option<u64>,
        addrs: Option<[SocketAddr; 3]>,
    ) -> Result<Server, String> {
        let addrs = addrs.map_or_else(
            || {
                [
                    "127.0.0.1:0".to_owned(),
                    "127.0.0.1:0".into(),
                    "127.0.0.1:0".into(),
                ]
            },
            |addrs| addrs.map(|addr| addr.to_string()),
        );
        let mut argv: Vec<String> = vec![
            "--grpc-addr".into(),
            addrs[0].clone(),
            "--ingest-addr".into(),
            addrs[1].clone(),
            "--metrics-addr".into(),
            addrs[2].clone(),
            "--log-format".into(),
            "json".into(),
        ];
        argv.extend(args.iter().cloned());
        argv.extend(ctx.server_args.iter().cloned());
        let mut command = match nofile {
            Some(limit) => {
                // prlimit sets the limit on itself and execs: the pid is the server's.
                let mut command = Command::new("prlimit");
                command
                    .arg(format!("--nofile={limit}:{limit}"))
                    .arg("--")
                    .arg(&ctx.bin);
                command
            }
            None => Command::new(&ctx.bin),
        };
        command
            .args(&argv)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .map_err(|error| format!("cannot spawn {}: {error}", ctx.bin.display()))?;
        let pid = child.id().ok_or("server exited at once")?;
        let stderr = child.stderr.take().ok_or("no stderr pipe")?;
        let mut lines = BufReader::new(stderr).lines();
        let mut tail: Vec<String> = Vec::new();
        let listening = timeout(Duration::from_secs(15), async {
            while let Ok(Some(line)) = lines.next_line().await {
                let Ok(entry) = serde_json::from_str::<Value>(&line) else {
                    tail.push(line);
                    continue;
                };
                let fields = &entry["fields"];
                if fields["message"] == "packet-ingest listening" {
                    let addr = |key: &str| fields[key].as_str().and_then(|a| a.parse().ok());
                    return addr("grpc_addr")
                        .zip(addr("ingest_addr"))
                        .zip(addr("metrics_addr"))
                        .map(|((grpc, ingest), metrics)| (grpc, ingest, metrics));
                }
                tail.push(line);
            }
            None
        })
        .await;
        let Ok(Some((grpc, ingest, metrics))) = listening else {
            let _ = child.start_kill();
            let status = match timeout(Duration::from_secs(2), child.wait()).await {
                Ok(Ok(status)) => status.to_string(),
                Ok(Err(error)) => error.to_string(),
                Err(_) => "still running".into(),
            };
            let last = tail.iter().rev().take(3).rev().cloned().collect::<Vec<_>>();
            return Err(format!(
                "server did not start ({status}); last log lines: {}",
                truncate(&last.join(" / "), 400)
            ));
        };
        let log_lines = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&log_lines);
        // Keep draining the log so the server never blocks on a full pipe.
        tokio::spawn(async move {
            while let Ok(Some(_)) = lines.next_line().await {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        });
        Ok(Server {
            child,
            pid,
            grpc,
            ingest,
            metrics,
            log_lines,
        })
    }

    /// (VmHWM, VmRSS) in MiB.
    fn memory(&self) -> (f64, f64) {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap_or_default();
        let kib = |key: &str| {
            status
                .lines()
                .find(|line| line.starts_with(key))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|value| value.parse::<f64>().ok())
                .unwrap_or(f64::NAN)
        };
        (kib("VmHWM:") / 1024.0, kib("VmRSS:") / 1024.0)
    }

    fn rss_mib(&self) -> f64 {
        self.memory().1
    }

    /// utime + stime in clock ticks.
    fn cpu_ticks(&self) -> Option<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).ok()?;
        // Fields after the parenthesised command name start at field 3 (state).
        let rest = &stat[stat.rfind(')')? + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let utime: u64 = fields.get(11)?.parse().ok()?;
        let stime: u64 = fields.get(12)?.parse().ok()?;
        Some(utime + stime)
    }

    /// The server's CPU use over `window`, in percent of one core.
    async fn cpu_percent(&self, clock_ticks: f64, window: Duration) -> Option<f64> {
        let before = self.cpu_ticks()?;
        sleep(window).await;
        let after = self.cpu_ticks()?;
        Some((after - before) as f64 / clock_ticks / window.as_secs_f64() * 100.0)
    }

    /// The soft "Max open files" of the server process.
    fn open_file_limit(&self) -> String {
        std::fs::read_to_string(format!("/proc/{}/limits", self.pid))
            .ok()
            .and_then(|limits| {
                limits
                    .lines()
                    .find(|line| line.starts_with("Max open files"))
                    .map(|line| {
                        line.split_whitespace()
                            .skip(3)
                            .take(2)
                            .collect::<Vec<_>>()
                            .join("/")
                    })
            })
            .unwrap_or_else(|| "?".into())
    }

    async fn kill(&mut self) {
        let _ = self.child.start_kill();
        let _ = timeout(Duration::from_secs(5), self.child.wait()).await;
    }
}

/// This process's soft open-file limit (the server inherits it, except under `--nofile`).
fn own_open_file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(100.0)
}

// ---------------------------------------------------------------------------
// Wire: frames, messages, gRPC plumbing

fn payload(index: usize, size: usize) -> Bytes {
    (0..size)
        .map(|offset| (index.wrapping_mul(31) + offset) as u8)
        .collect::<Vec<u8>>()
        .into()
}

/// Frames in wire format, back to back.
fn wire<I: IntoIterator<Item = Frame>>(frames: I) -> Bytes {
    let mut out = BytesMut::new();
    for frame in frames {
        frame.encode(&mut out);
    }
    out.freeze()
}

/// `count` SHA-256 frames of `size` bytes on `channel`.
fn packets(channel: u32, count: usize, size: usize) -> Bytes {
    wire((0..count).map(|i| sha256_frame(Channel(channel), payload(i, size))))
}

/// The SubscribeRequest of SPEC §4 (field 3 is ignored by servers without it).
#[derive(Clone, PartialEq, prost::Message)]
struct SubscribeRequest {
    #[prost(uint32, repeated, tag = "1")]
    channels: Vec<u32>,
    #[prost(uint64, optional, tag = "2")]
    from_sequence: Option<u64>,
    #[prost(string, tag = "3")]
    stream_id: String,
}

/// SubscribeResponse, decoded lightly: payloads, digests and sources are skipped.
#[derive(Clone, PartialEq, prost::Message)]
struct SubscribeResponse {
    #[prost(message, repeated, tag = "1")]
    packets: Vec<PacketHead>,
    #[prost(uint64, tag = "2")]
    missed: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PacketHead {
    #[prost(uint64, tag = "1")]
    sequence: u64,
    #[prost(uint32, tag = "2")]
    channel: u32,
}

/// Sends the request bytes exactly as given (for malformed messages).
#[derive(Clone, Copy, Default)]
struct RawCodec;
struct RawEncoder;
struct RawDecoder;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Windows {
    Default,
    /// 64 KiB stream and connection windows: an unread stream stalls the sender fast.
    Small,
}

/// A new HTTP/2 connection to the gRPC port.
async fn connect(addr: SocketAddr, windows: Windows) -> Result<GrpcChannel, String> {
    let mut endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|error| error.to_string())?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true);
    if windows == Windows::Small {
        endpoint = endpoint
            .initial_stream_window_size(65_535)
            .initial_connection_window_size(65_535);
    }
    match timeout(CONNECT_TIMEOUT + Duration::from_secs(1), endpoint.connect()).await {
        Ok(Ok(channel)) => Ok(channel),
        Ok(Err(error)) => Err(format!("connect: {}", error_chain(&error))),
        Err(_) => Err("connect: timed out".into()),
    }
}

fn grpc(channel: GrpcChannel) -> Grpc<GrpcChannel> {
    Grpc::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(usize::MAX)
}

async fn ready(client: &mut Grpc<GrpcChannel>) -> Result<(), Status> {
    client
        .ready()
        .await
        .map_err(|error| Status::unavailable(format!("channel not ready: {error}")))
}

/// Opens a Subscribe stream; returns it with the `packet-ingest-stream-id` header, if sent.
async fn subscribe(
    channel: GrpcChannel,
    request: SubscribeRequest,
) -> Result<(Streaming<SubscribeResponse>, Option<String>), Status> {
    let mut client = grpc(channel);
    ready(&mut client).await?;
    let response = client
        .server_streaming(
            Request::new(request),
            PathAndQuery::from_static(SUBSCRIBE),
            ProstCodec::<SubscribeRequest, SubscribeResponse>::default(),
        )
        .await?;
    let stream_id = response
        .metadata()
        .get("packet-ingest-stream-id")
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    Ok((response.into_inner(), stream_id))
}

/// A Publish stream carrying `frames`; "OK accepted=.. rejected=.." or the status.
async fn publish(channel: GrpcChannel, frames: Vec<Frame>) -> String {
    let requests: Vec<PublishRequest> = frames
        .iter()
        .map(|frame| PublishRequest {
            channel: frame.channel().0,
            payload: frame.payload.clone(),
            digest: Bytes::copy_from_slice(&frame.digest.0),
            hmac: frame.is_hmac(),
        })
        .collect();
    let mut client = grpc(channel);
    let call = async {
        ready(&mut client).await?;
        client
            .client_streaming(
                Request::new(stream::iter(requests)),
                PathAndQuery::from_static(PUBLISH),
                ProstCodec::<PublishRequest, PublishResponse>::default(),
            )
            .await
    };
    match timeout(RPC_TIMEOUT, call).await {
        Ok(Ok(response)) => {
            let response = response.into_inner();
            format!(
                "OK accepted={} rejected={} last_sequence={}",
                response.accepted, response.rejected, response.last_sequence
            )
        }
        Ok(Err(status)) => status_text(&status),
        Err(_) => "no answer within 5 s".into(),
    }
}

/// A Publish stream that is opened and never sent on; ends with the server's verdict.
async fn idle_publish_stream(channel: GrpcChannel) -> String {
    let mut client = grpc(channel);
    let call = async {
        ready(&mut client).await?;
        client
            .client_streaming(
                Request::new(stream::pending::<PublishRequest>()),
                PathAndQuery::from_static(PUBLISH),
                ProstCodec::<PublishRequest, PublishResponse>::default(),
            )
            .await
    };
    match call.await {
        Ok(_) => "OK".into(),
        Err(status) => code_name(status.code()).into(),
    }
}

// ---------------------------------------------------------------------------
// Raw TCP clients

/// Opens `n` TCP connections (128 at a time); returns the open ones and the errors.
async fn open_tcp(addr: SocketAddr, n: usize) -> (Vec<TcpStream>, Vec<String>) {
    let results: Vec<Result<TcpStream, String>> = stream::iter(0..n)
        .map(|_| async move {
            match timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => Ok(stream),
                Ok(Err(error)) => Err(error.to_string()),
                Err(_) => Err("connect timed out".into()),
            }
        })
        .buffer_unordered(128)
        .collect()
        .await;
    let mut open = Vec::new();
    let mut errors = Vec::new();
    for result in results {
        match result {
            Ok(stream) => open.push(stream),
            Err(error) => errors.push(error),
        }
    }
    (open, errors)
}

/// Writes `parts` to `stream` within `limit`; returns the bytes written and the error.
async fn write_counted(
    stream: &mut TcpStream,
    parts: &[&[u8]],
    limit: Duration,
) -> (u64, Option<String>) {
    let mut written = 0u64;
    let result = timeout(limit, async {
        for part in parts {
            for chunk in part.chunks(64 * KIB) {
                stream.write_all(chunk).await?;
                written += chunk.len() as u64;
            }
        }
        Ok::<(), std::io::Error>(())
    })
    .await;
    let error = match result {
        Ok(Ok(())) => None,
        Ok(Err(error)) => Some(error.to_string()),
        Err(_) => Some("write timed out".into()),
    };
    (written, error)
}

/// Connections the server has closed (EOF or reset) among `conns`.
async fn closed_by_server(conns: &[TcpStream]) -> usize {
    let checks = conns.iter().map(|conn| async move {
        let _ = timeout(Duration::from_millis(50), conn.readable()).await;
        let mut buf = [0u8; 4096];
        loop {
            match conn.try_read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => return false,
                Err(_) => return true,
            }
        }
    });
    futures::future::join_all(checks)
        .await
        .into_iter()
        .filter(|closed| *closed)
        .count()
}

/// What one producer connection achieved.
struct Sent {
    connected: Result<(), String>,
    bytes: u64,
    error: Option<String>,
    elapsed: Duration,
}

impl Sent {
    fn describe(&self) -> String {
        match (&self.connected, &self.error) {
            (Err(error), _) => format!("connect failed: {error}"),
            (Ok(()), None) => format!("connected, {} bytes written", self.bytes),
            (Ok(()), Some(error)) => {
                format!("connected, {} bytes written, then {error}", self.bytes)
            }
        }
    }
}

/// Connects to the ingest port and writes `data` `repeat` times, then closes.
async fn tcp_send(addr: SocketAddr, data: &[u8], repeat: usize, limit: Duration) -> Sent {
    let start = Instant::now();
    let mut stream = match timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            return Sent {
                connected: Err(error.to_string()),
                bytes: 0,
                error: None,
                elapsed: start.elapsed(),
            }
        }
        Err(_) => {
            return Sent {
                connected: Err("timed out".into()),
                bytes: 0,
                error: None,
                elapsed: start.elapsed(),
            }
        }
    };
    let _ = stream.set_nodelay(true);
    let mut bytes = 0u64;
    let result = timeout(limit, async {
        for _ in 0..repeat {
            stream.write_all(data).await?;
            bytes += data.len() as u64;
        }
        stream.shutdown().await
    })
    .await;
    let error = match result {
        Ok(Ok(())) => None,
        Ok(Err(error)) => Some(error.to_string()),
        Err(_) => Some(format!("write timed out after {} s", limit.as_secs())),
    };
    Sent {
        connected: Ok(()),
        bytes,
        error,
        elapsed: start.elapsed(),
    }
}

// ---------------------------------------------------------------------------
// A subscriber that reads everything in the background

#[derive(Default)]
struct Counts {
    received: AtomicU64,
    missed: AtomicU64,
    responses: AtomicU64,
    first_sequence: AtomicU64,
    max_sequence: AtomicU64,
    ended: Mutex<Option<String>>,
}

impl Counts {
    fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
    fn received(&self) -> u64 {
        Self::get(&self.received)
    }
    fn missed(&self) -> u64 {
        Self::get(&self.missed)
    }
    fn max_sequence(&self) -> u64 {
        Self::get(&self.max_sequence)
    }
    fn first_sequence(&self) -> u64 {
        Self::get(&self.first_sequence)
    }
    fn ended(&self) -> Option<String> {
        self.ended.lock().expect("lock").clone()
    }
    fn progress(&self) -> (u64, u64, u64) {
        (self.received(), self.missed(), Self::get(&self.responses))
    }
}

struct Reader {
    counts: Arc<Counts>,
    stream_id: Option<String>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Reader {
    /// Subscribes on a new connection; returns once the server has answered.
    async fn start(addr: SocketAddr, request: SubscribeRequest) -> Result<Reader, String> {
        let channel = connect(addr, Windows::Default).await?;
        let (mut stream, stream_id) = match timeout(RPC_TIMEOUT, subscribe(channel, request)).await
        {
            Ok(Ok(opened)) => opened,
            Ok(Err(status)) => return Err(status_text(&status)),
            Err(_) => return Err("Subscribe: no answer within 5 s".into()),
        };
        let counts = Arc::new(Counts::default());
        let shared = Arc::clone(&counts);
        let task = tokio::spawn(async move {
            let end = loop {
                match stream.message().await {
                    Ok(Some(response)) => {
                        shared.missed.fetch_add(response.missed, Ordering::Relaxed);
                        if let Some(first) = response.packets.first() {
                            let _ = shared.first_sequence.compare_exchange(
                                0,
                                first.sequence,
                                Ordering::Relaxed,
                                Ordering::Relaxed,
                            );
                        }
                        if let Some(last) = response.packets.last() {
                            shared
                                .max_sequence
                                .fetch_max(last.sequence, Ordering::Relaxed);
                        }
                        shared
                            .received
                            .fetch_add(response.packets.len() as u64, Ordering::Relaxed);
                        shared.responses.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(None) => break "stream ended (OK)".to_owned(),
                    Err(status) => break status_text(&status),
                }
            };
            *shared.ended.lock().expect("lock") = Some(end);
        });
        Ok(Reader {
            counts,
            stream_id,
            task,
        })
    }

    /// Waits until `done`, the stream ends, nothing moves for `idle`, or `max` passes.
    async fn wait(&self, done: impl Fn(&Counts) -> bool, idle: Duration, max: Duration) -> bool {
        let start = Instant::now();
        let mut last = self.counts.progress();
        let mut last_change = Instant::now();
        loop {
            if done(&self.counts) {
                return true;
            }
            if self.counts.ended().is_some() || start.elapsed() >= max {
                return false;
            }
            let now = self.counts.progress();
            if now != last {
                last = now;
                last_change = Instant::now();
            } else if last_change.elapsed() >= idle {
                return false;
            }
            sleep(Duration::from_millis(10)).await;
        }
    }

    /// "open" or how the stream ended.
    fn state(&self) -> String {
        self.counts.ended().unwrap_or_else(|| "open".into())
    }
}

// ---------------------------------------------------------------------------
// The well-behaved clients and the server's state

#[derive(Default)]
struct Health {
    latencies_ms: Vec<f64>,
    errors: Vec<String>,
}

async fn health_once(addr: SocketAddr) -> Result<f64, String> {
    use tonic_health::pb::{
        health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
    };
    let start = Instant::now();
    let check = async {
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|error| error.to_string())?
            .connect_timeout(HEALTH_TIMEOUT);
        let channel = endpoint
            .connect()
            .await
            .map_err(|_| "connect failed".to_owned())?;
        let response = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map_err(|status| code_name(status.code()).to_owned())?;
        match response.into_inner().status() {
            ServingStatus::Serving => Ok(()),
            other => Err(format!("{other:?}")),
        }
    };
    match timeout(HEALTH_TIMEOUT, check).await {
        Ok(Ok(())) => Ok(start.elapsed().as_secs_f64() * 1000.0),
        Ok(Err(error)) => Err(error),
        Err(_) => Err("timeout 2 s".into()),
    }
}

/// `n` health checks in a row, each on a new connection.
async fn health_checks(addr: SocketAddr, n: usize) -> Health {
    let mut health = Health::default();
    for _ in 0..n {
        match health_once(addr).await {
            Ok(ms) => health.latencies_ms.push(ms),
            Err(error) => health.errors.push(error),
        }
    }
    health
}

fn put_health(f: &mut Figures, prefix: &str, health: Health) {
    let mut sorted = health.latencies_ms.clone();
    sorted.sort_by(f64::total_cmp);
    let total = sorted.len() + health.errors.len();
    f.put(&format!("{prefix}_ok"), format!("{}/{total}", sorted.len()));
    if sorted.is_empty() {
        f.put(&format!("{prefix}_median_ms"), "-");
        f.put(&format!("{prefix}_max_ms"), "-");
    } else {
        f.put(
            &format!("{prefix}_median_ms"),
            round1(sorted[sorted.len() / 2]),
        );
        f.put(
            &format!("{prefix}_max_ms"),
            round1(sorted[sorted.len() - 1]),
        );
    }
    f.put(&format!("{prefix}_errors"), tally(health.errors));
}

/// Server CPU% over a 2 s window in which this probe sends nothing new.
async fn idle_cpu(ctx: &Ctx, server: &Server, f: &mut Figures) {
    let logs_before = server.log_lines.load(Ordering::Relaxed);
    let value = match server.cpu_percent(ctx.clock_ticks, IDLE_WINDOW).await {
        Some(pct) => round1(pct),
        None => "n/a (server gone)".into(),
    };
    f.put("server_cpu_idle_pct", value);
    let logs = server.log_lines.load(Ordering::Relaxed) - logs_before;
    f.put("server_log_lines_idle_2s", logs);
}

/// Subscriber on channel 1, then a TCP producer of 100 x 1 KiB on channel 1,
/// then 10 health checks: what a well-behaved client gets right now.
async fn good_clients(server: &Server, f: &mut Figures) {
    let reader = Reader::start(
        server.grpc,
        SubscribeRequest {
            channels: vec![GOOD_CHANNEL],
            ..Default::default()
        },
    )
    .await;
    f.put(
        "good_subscribe",
        match &reader {
            Ok(_) => "OK".into(),
            Err(error) => error.clone(),
        },
    );
    let data = packets(GOOD_CHANNEL, GOOD_PACKETS, KIB);
    let sent = tcp_send(server.ingest, &data, 1, RPC_TIMEOUT).await;
    f.put("good_producer", sent.describe());
    match &reader {
        Ok(reader) => {
            let target = GOOD_PACKETS as u64;
            reader
                .wait(
                    |c| c.received() + c.missed() >= target,
                    Duration::from_secs(3),
                    RPC_TIMEOUT,
                )
                .await;
            f.put(
                "good_received",
                format!("{}/{GOOD_PACKETS}", reader.counts.received()),
            );
            f.put("good_missed", reader.counts.missed());
            f.put("good_subscriber_stream", reader.state());
        }
        Err(_) => f.put("good_received", "n/a (no subscriber)"),
    }
    put_health(f, "health", health_checks(server.grpc, 10).await);
}

/// Peak and current memory, log volume, and whether the server is still alive.
fn server_state(server: &mut Server, f: &mut Figures) {
    let (hwm, rss) = server.memory();
    f.put("server_vmhwm_mib", round1(hwm));
    f.put("server_vmrss_mib", round1(rss));
    f.put("server_log_lines", server.log_lines.load(Ordering::Relaxed));
    let alive = match server.child.try_wait() {
        Ok(None) => "yes".to_owned(),
        Ok(Some(status)) => format!("no, exited: {status}"),
        Err(error) => format!("unknown: {error}"),
    };
    f.put("server_alive", alive);
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|arg| (*arg).to_owned()).collect()
}

// ---------------------------------------------------------------------------
// Scenarios

/// Scenario 1: N ingest connections that send nothing.
async fn idle_ingest(
    ctx: &Ctx,
    f: &mut Figures,
    n: usize,
    max_connections: Option<u32>,
) -> Result<(), String> {
    let extra = match max_connections {
        Some(max) => vec!["--max-connections".to_owned(), max.to_string()],
        None => Vec::new(),
    };
    let mut server = Server::start(ctx, &extra, None, None).await?;
    let (conns, errors) = open_tcp(server.ingest, n).await;
    f.put("clients_connected", format!("{}/{n}", conns.len()));
    f.put("client_errors", tally(errors));
    sleep(SETTLE).await;
    idle_cpu(ctx, &server, f).await;
    good_clients(&server, f).await;
    f.put(
        "clients_closed_by_server",
        format!("{}/{}", closed_by_server(&conns).await, conns.len()),
    );
    server_state(&mut server, f);
    drop(conns);
    server.kill().await;
    Ok(())
}

/// Scenario 2: N ingest connections that send 20 of the 44 header bytes, then nothing.
async fn half_header_ingest(ctx: &Ctx, f: &mut Figures, n: usize) -> Result<(), String> {
    let mut server = Server::start(ctx, &[], None, None).await?;
    let (mut conns, errors) = open_tcp(server.ingest, n).await;
    f.put("clients_connected", format!("{}/{n}", conns.len()));
    f.put("client_errors", tally(errors));
    let frame = packets(GOOD_CHANNEL, 1, KIB);
    let parts: [&[u8]; 1] = [&frame[..20]];
    let writes = futures::future::join_all(
        conns
            .iter_mut()
            .map(|conn| write_counted(conn, &parts, RPC_TIMEOUT)),
    )
    .await;
    let done = writes
        .iter()
        .filter(|(bytes, error)| *bytes == 20 && error.is_none())
        .count();
    f.put("half_headers_written", format!("{done}/{}", conns.len()));
    sleep(SETTLE).await;
    idle_cpu(ctx, &server, f).await;
    good_clients(&server, f).await;
    f.put(
        "clients_closed_by_server",
        format!("{}/{}", closed_by_server(&conns).await, conns.len()),
    );
    server_state(&mut server, f);
    drop(conns);
    server.kill().await;
    Ok(())
}

/// Scenario 3: N ingest connections that declare a 1 MiB payload, send all of it but
/// the last byte, and stall.
async fn partial_frame(ctx: &Ctx, f: &mut Figures, n: usize) -> Result<(), String> {
    let mut server = Server::start(ctx, &[], None, None).await?;
    let rss_before = server.rss_mib();
    f.put("server_vmrss_before_mib", round1(rss_before));
    let (mut conns, errors) = open_tcp(server.ingest, n).await;
    f.put("clients_connected", format!("{}/{n}", conns.len()));
    f.put("client_errors", tally(errors));
    let frame = wire([sha256_frame(Channel(9), payload(0, 1 << 20))]);
    let parts: [&[u8]; 1] = [&frame[..frame.len() - 1]];
    let started = Instant::now();
    let writes = futures::future::join_all(
        conns
            .iter_mut()
            .map(|conn| write_counted(conn, &parts, Duration::from_secs(30))),
    )
    .await;
    let complete = writes.iter().filter(|(_, error)| error.is_none()).count();
    let total: u64 = writes.iter().map(|(bytes, _)| bytes).sum();
    f.put(
        "partial_frames_written",
        format!("{complete}/{}", conns.len()),
    );
    f.put("bytes_written_mib", round1(total as f64 / MIB));
    f.put(
        "write_errors",
        tally(writes.into_iter().filter_map(|(_, error)| error)),
    );
    f.put("write_s", round1(started.elapsed().as_secs_f64()));
    sleep(Duration::from_secs(1)).await;
    let rss_after = server.rss_mib();
    f.put("server_vmrss_after_mib", round1(rss_after));
    f.put("server_rss_growth_mib", round1(rss_after - rss_before));
    idle_cpu(ctx, &server, f).await;
    good_clients(&server, f).await;
    f.put(
        "clients_closed_by_server",
        format!("{}/{}", closed_by_server(&conns).await, conns.len()),
    );
    server_state(&mut server, f);
    drop(conns);
    server.kill().await;
    Ok(())
}

/// Scenario 4: N Publish streams opened and never sent on, 100 per HTTP/2 connection.
async fn idle_publish(ctx: &Ctx, f: &mut Figures, n: usize) -> Result<(), String> {
    let mut server = Server::start(ctx, &[], None, None).await?;
    let connections = n.div_ceil(100);
    let addr = server.grpc;
    let results: Vec<Result<GrpcChannel, String>> = stream::iter(0..connections)
        .map(|_| connect(addr, Windows::Default))
        .buffer_unordered(16)
        .collect()
        .await;
    let (channels, connect_errors): (Vec<_>, Vec<_>) = results.into_iter().partition(Result::is_ok);
    let channels: Vec<GrpcChannel> = channels.into_iter().flatten().collect();
    f.put("connections", format!("{}/{connections}", channels.len()));
    f.put(
        "connection_errors",
        tally(connect_errors.into_iter().filter_map(Result::err)),
    );
    if channels.is_empty() {
        return Err("no gRPC connection".into());
    }
    let ended: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut streams = JoinSet::new();
    for index in 0..n {
        let channel = channels[index % channels.len()].clone();
        let ended = Arc::clone(&ended);
        streams.spawn(async move {
            let verdict = idle_publish_stream(channel).await;
            ended.lock().expect("lock").push(verdict);
        });
    }
    sleep(Duration::from_millis(1500)).await;
    let early = ended.lock().expect("lock").clone();
    f.put("streams_still_open", format!("{}/{n}", n - early.len()));
    f.put("streams_ended_early", tally(early));
    idle_cpu(ctx, &server, f).await;
    let frames: Vec<Frame> = (0..10)
        .map(|i| sha256_frame(Channel(2), payload(i, KIB)))
        .collect();
    let verdict = match connect(server.grpc, Windows::Default).await {
        Ok(channel) => publish(channel, frames).await,
        Err(error) => error,
    };
    f.put("good_publish_10", verdict);
    good_clients(&server, f).await;
    f.put(
        "idle_streams_ended_by_end",
        tally(ended.lock().expect("lock").clone()),
    );
    server_state(&mut server, f);
    drop(streams);
    server.kill().await;
    Ok(())
}

/// Opens `n` Subscribe streams on small-window connections, 50 per connection;
/// each reads `reads_first` responses once packets flow, then never reads again.
async fn open_laggards(
    addr: SocketAddr,
    n: usize,
    reads_first: usize,
    request: SubscribeRequest,
    stop: &CancellationToken,
    tasks: &mut JoinSet<()>,
) -> (Arc<Mutex<Vec<String>>>, Arc<AtomicU64>) {
    let connections = n.div_ceil(50);
    let channels: Vec<Result<GrpcChannel, String>> = stream::iter(0..connections)
        .map(|_| connect(addr, Windows::Small))
        .buffer_unordered(16)
        .collect()
        .await;
    let outcomes: Arc<Mutex<Vec<String>>> = Arc::default();
    let read_first = Arc::new(AtomicU64::new(0));
    for index in 0..n {
        let channel = channels[index % channels.len()].clone();
        let (outcomes, read_first, stop) =
            (Arc::clone(&outcomes), Arc::clone(&read_first), stop.clone());
        let request = request.clone();
        tasks.spawn(async move {
            let opened = match channel {
                Ok(channel) => timeout(Duration::from_secs(20), subscribe(channel, request)).await,
                Err(error) => {
                    outcomes.lock().expect("lock").push(error);
                    return;
                }
            };
            let mut stream = match opened {
                Ok(Ok((stream, _))) => stream,
                Ok(Err(status)) => {
                    outcomes
                        .lock()
                        .expect("lock")
                        .push(code_name(status.code()).into());
                    return;
                }
                Err(_) => {
                    outcomes
                        .lock()
                        .expect("lock")
                        .push("no answer in 20 s".into());
                    return;
                }
            };
            outcomes.lock().expect("lock").push("OK".into());
            let mut reads = 0;
            while reads < reads_first {
                tokio::select! {
                    message = stream.message() => match message {
                        Ok(Some(_)) => reads += 1,
                        _ => break,
                    },
                    _ = stop.cancelled() => break,
                }
            }
            if reads_first > 0 && reads == reads_first {
                read_first.fetch_add(1, Ordering::Relaxed);
            }
            // Hold the stream open and never poll it again.
            stop.cancelled().await;
            drop(stream);
        });
    }
    let start = Instant::now();
    while outcomes.lock().expect("lock").len() < n && start.elapsed() < Duration::from_secs(25) {
        sleep(Duration::from_millis(20)).await;
    }
    (outcomes, read_first)
}

/// Outcome of pushing `packets` 1 KiB packets through one TCP connection while
/// `reader` (unfiltered) reads.
struct Flood {
    sent: Sent,
    delivered_s: f64,
    complete: bool,
    packets: u64,
    /// What the good subscriber got of this flood.
    received: u64,
    missed: u64,
}

async fn flood(server: &Server, reader: &Reader, packets_count: u64) -> Flood {
    const CHUNK_PACKETS: usize = 256;
    let chunk = packets(GOOD_CHANNEL, CHUNK_PACKETS, KIB);
    let repeats = (packets_count as usize).div_ceil(CHUNK_PACKETS);
    let total = (repeats * CHUNK_PACKETS) as u64;
    let target = reader.counts.max_sequence() + total;
    let (received, missed) = (reader.counts.received(), reader.counts.missed());
    let start = Instant::now();
    let sent = tcp_send(server.ingest, &chunk, repeats, Duration::from_secs(60)).await;
    let complete = reader
        .wait(
            |c| c.max_sequence() >= target,
            Duration::from_secs(5),
            Duration::from_secs(60),
        )
        .await;
    Flood {
        sent,
        delivered_s: start.elapsed().as_secs_f64(),
        complete,
        packets: total,
        received: reader.counts.received() - received,
        missed: reader.counts.missed() - missed,
    }
}

fn put_flood(f: &mut Figures, prefix: &str, flood: &Flood) {
    f.put(&format!("{prefix}_producer"), flood.sent.describe());
    f.put(
        &format!("{prefix}_write_mib_s"),
        round1(flood.sent.bytes as f64 / MIB / flood.sent.elapsed.as_secs_f64()),
    );
    let rate = if flood.complete {
        let payload_mib = flood.packets as f64 * KIB as f64 / MIB;
        round1(payload_mib / flood.delivered_s)
    } else {
        "n/a (good subscriber never saw the last packet)".into()
    };
    f.put(&format!("{prefix}_delivered_mib_s"), rate);
    f.put(
        &format!("{prefix}_good_received"),
        format!("{}/{}", flood.received, flood.packets),
    );
    f.put(&format!("{prefix}_good_missed"), flood.missed);
}

/// Sends one packet every 100 ms until every open laggard has read its first
/// responses (or 10 s pass); returns the packets sent.
async fn warm_up(server: &Server, opened: usize, read_first: &AtomicU64) -> u64 {
    let frame = packets(GOOD_CHANNEL, 1, KIB);
    let Ok(Ok(mut producer)) = timeout(CONNECT_TIMEOUT, TcpStream::connect(server.ingest)).await
    else {
        return 0;
    };
    let start = Instant::now();
    let mut sent = 0;
    while (read_first.load(Ordering::Relaxed) as usize) < opened
        && start.elapsed() < Duration::from_secs(10)
    {
        if timeout(RPC_TIMEOUT, producer.write_all(&frame))
            .await
            .is_err()
        {
            break;
        }
        sent += 1;
        sleep(Duration::from_millis(100)).await;
    }
    let _ = producer.shutdown().await;
    sent
}

/// Scenario 5: Stalled (or stop-reading) subscribers under a 200 MiB flood with
/// `--memory-limit 64MiB`, while one good subscriber reads everything.
async fn stalled_subscribers(
    ctx: &Ctx,
    f: &mut Figures,
    n: usize,
    reads_first: usize,
) -> Result<(), String> {
    let mut server = Server::start(ctx, &args(&["--memory-limit", "64MiB"]), None, None).await?;
    let stop = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let (outcomes, read_first) = open_laggards(
        server.grpc,
        n,
        reads_first,
        SubscribeRequest::default(),
        &stop,
        &mut tasks,
    )
    .await;
    f.put(
        "laggard_subscribes",
        tally(outcomes.lock().expect("lock").clone()),
    );
    idle_cpu(ctx, &server, f).await;
    let reader = Reader::start(server.grpc, SubscribeRequest::default()).await?;
    if reads_first > 0 {
        let opened = outcomes
            .lock()
            .expect("lock")
            .iter()
            .filter(|o| *o == "OK")
            .count();
        let sent = warm_up(&server, opened, &read_first).await;
        reader
            .wait(
                |c| c.received() >= sent,
                Duration::from_secs(2),
                RPC_TIMEOUT,
            )
            .await;
        f.put(
            "laggards_that_read_first",
            format!(
                "{}/{n} read {reads_first} responses ({sent} warm-up packets, 1 per 100 ms), then stopped reading",
                read_first.load(Ordering::Relaxed)
            ),
        );
    }
    f.put("server_vmrss_before_flood_mib", round1(server.rss_mib()));
    let result = flood(&server, &reader, ctx.flood_mib * 1024).await;
    put_flood(f, "flood", &result);
    f.put("flood_good_stream", reader.state());
    let (hwm, rss) = server.memory();
    f.put("server_vmhwm_after_flood_mib", round1(hwm));
    f.put("server_vmrss_after_flood_mib", round1(rss));
    drop(reader);
    good_clients(&server, f).await;
    server_state(&mut server, f);
    stop.cancel();
    drop(tasks);
    server.kill().await;
    Ok(())
}

/// Scenario 6: One producer sends one 16 B packet on each of millions of channels.
async fn channel_churn(ctx: &Ctx, f: &mut Figures) -> Result<(), String> {
    let count = ctx.churn_packets as usize;
    let data = wire((0..count).map(|i| {
        let payload = Bytes::copy_from_slice(&[(i as u32).to_be_bytes(); 4].concat());
        sha256_frame(Channel(i as u32), payload)
    }));
    let mut server = Server::start(ctx, &[], None, None).await?;
    let one = Reader::start(
        server.grpc,
        SubscribeRequest {
            channels: vec![1],
            ..Default::default()
        },
    )
    .await?;
    let all = Reader::start(server.grpc, SubscribeRequest::default()).await?;
    let rss_before = server.rss_mib();
    f.put("server_vmrss_before_mib", round1(rss_before));
    let sent = tcp_send(server.ingest, &data, 1, Duration::from_secs(60)).await;
    f.put("producer", sent.describe());
    f.put("producer_s", round1(sent.elapsed.as_secs_f64()));
    let target = count as u64;
    all.wait(
        |c| c.max_sequence() >= target,
        Duration::from_secs(5),
        Duration::from_secs(30),
    )
    .await;
    let rss_after = server.rss_mib();
    f.put("server_vmrss_after_mib", round1(rss_after));
    sleep(Duration::from_secs(2)).await;
    let rss_later = server.rss_mib();
    f.put("server_vmrss_after_2s_mib", round1(rss_later));
    f.put("server_rss_kept_mib", round1(rss_later - rss_before));
    f.put(
        "kept_bytes_per_channel",
        round1((rss_later - rss_before) * MIB / count as f64),
    );
    f.put(
        "channel1_subscriber_received",
        format!(
            "{}/1 (missed {})",
            one.counts.received(),
            one.counts.missed()
        ),
    );
    f.put(
        "unfiltered_subscriber_received",
        format!("{}/{count}", all.counts.received()),
    );
    f.put("unfiltered_subscriber_missed", all.counts.missed());
    drop((one, all, data));
    idle_cpu(ctx, &server, f).await;
    good_clients(&server, f).await;
    server_state(&mut server, f);
    server.kill().await;
    Ok(())
}

/// Subscribes `count` times with `filter` on small-window connections, never
/// reading; returns the open streams and each attempt's outcome.
async fn huge_subscribers(
    addr: SocketAddr,
    filter: &[u32],
    count: usize,
) -> (Vec<Streaming<SubscribeResponse>>, Vec<String>) {
    let attempts = (0..count).map(|_| async move {
        let channel = connect(addr, Windows::Small).await?;
        let request = SubscribeRequest {
            channels: filter.to_vec(),
            ..Default::default()
        };
        match timeout(Duration::from_secs(15), subscribe(channel, request)).await {
            Ok(Ok((stream, _))) => Ok(stream),
            Ok(Err(status)) => Err(status_text(&status)),
            Err(_) => Err("no answer in 15 s".into()),
        }
    });
    let mut open = Vec::new();
    let mut outcomes = Vec::new();
    for result in futures::future::join_all(attempts).await {
        match result {
            Ok(stream) => {
                open.push(stream);
                outcomes.push("OK".into());
            }
            Err(error) => outcomes.push(error),
        }
    }
    (open, outcomes)
}

/// Scenario 7: Ingest rate without and with 8 lagging subscribers whose filters hold
/// hundreds of thousands of channels (none of them the producer's).
async fn huge_filter(ctx: &Ctx, f: &mut Figures) -> Result<(), String> {
    /// Fits the default 1 MiB + 64 KiB decode limit, if the full size does not.
    const FALLBACK_CHANNELS: u32 = 370_000;
    let mut server = Server::start(ctx, &[], None, None).await?;
    let reader = Reader::start(server.grpc, SubscribeRequest::default()).await?;
    let packets_count = ctx.flood_mib * 1024;
    // The first flood pays for growing the ring to its limit: warm up, then measure.
    let warm_up = flood(&server, &reader, packets_count).await;
    f.put(
        "warm_up_flood_delivered_mib_s",
        if warm_up.complete {
            round1(warm_up.packets as f64 * KIB as f64 / MIB / warm_up.delivered_s)
        } else {
            "incomplete".into()
        },
    );
    let without = flood(&server, &reader, packets_count).await;
    put_flood(f, "without_huge", &without);
    let mut huge = Vec::new();
    let rss_before = server.rss_mib();
    f.put("server_vmrss_before_huge_mib", round1(rss_before));
    for channels in [ctx.filter_channels, FALLBACK_CHANNELS] {
        let filter: Vec<u32> = (2..).take(channels as usize).collect();
        let encoded = prost::Message::encoded_len(&SubscribeRequest {
            channels: filter.clone(),
            ..Default::default()
        });
        f.put(&format!("filter_{channels}_request_bytes"), encoded);
        let started = Instant::now();
        let (open, outcomes) = huge_subscribers(server.grpc, &filter, 8).await;
        f.put(&format!("filter_{channels}_subscribe"), tally(outcomes));
        f.put(
            &format!("filter_{channels}_subscribe_s"),
            round1(started.elapsed().as_secs_f64()),
        );
        huge = open;
        // Retry once, smaller, only if the full size was refused.
        if !huge.is_empty() || channels <= FALLBACK_CHANNELS {
            break;
        }
    }
    f.put("huge_filter_subscribers_open", format!("{}/8", huge.len()));
    let rss_after = server.rss_mib();
    f.put("server_vmrss_after_huge_mib", round1(rss_after));
    f.put("server_rss_growth_huge_mib", round1(rss_after - rss_before));
    idle_cpu(ctx, &server, f).await;
    let with = flood(&server, &reader, packets_count).await;
    put_flood(f, "with_huge", &with);
    drop(reader);
    good_clients(&server, f).await;
    server_state(&mut server, f);
    drop(huge);
    server.kill().await;
    Ok(())
}

/// Scenario 8: The server under a 1024 open-file limit; 1,100 raw TCP connections to
/// the gRPC port that never speak.
async fn idle_grpc_sockets(ctx: &Ctx, f: &mut Figures, n: usize) -> Result<(), String> {
    let mut server = Server::start(ctx, &[], Some(ctx.nofile), None).await?;
    f.put("server_open_file_limit", server.open_file_limit());
    let (conns, errors) = open_tcp(server.grpc, n).await;
    f.put("clients_connected", format!("{}/{n}", conns.len()));
    f.put("client_errors", tally(errors));
    sleep(Duration::from_secs(1)).await;
    idle_cpu(ctx, &server, f).await;
    good_clients(&server, f).await;
    // More than socket buffers hold: the write completes only if the server reads.
    let chunk = packets(3, 256, KIB);
    let sent = tcp_send(server.ingest, &chunk, 64, Duration::from_secs(3)).await;
    f.put(
        "ingest_16mib_on_channel_3_within_3s",
        match (&sent.connected, &sent.error) {
            (Ok(()), None) => format!("read by the server in {:.1} s", sent.elapsed.as_secs_f64()),
            _ => format!("not read: {}", sent.describe()),
        },
    );
    f.put(
        "clients_closed_by_server",
        format!("{}/{}", closed_by_server(&conns).await, conns.len()),
    );
    server_state(&mut server, f);
    // Release the sockets: does the server recover, and did the producer's packets land?
    drop(conns);
    sleep(Duration::from_secs(2)).await;
    put_health(
        f,
        "after_release_health",
        health_checks(server.grpc, 3).await,
    );
    match Reader::start(
        server.grpc,
        SubscribeRequest {
            channels: vec![GOOD_CHANNEL],
            from_sequence: Some(1),
            ..Default::default()
        },
    )
    .await
    {
        Ok(replay) => {
            replay
                .wait(
                    |c| c.received() >= GOOD_PACKETS as u64,
                    Duration::from_secs(1),
                    Duration::from_secs(3),
                )
                .await;
            f.put(
                "after_release_replay_from_1",
                format!(
                    "{}/{GOOD_PACKETS} of the good producer's packets",
                    replay.counts.received()
                ),
            );
        }
        Err(error) => f.put("after_release_replay_from_1", error),
    }
    f.put(
        "after_release_cpu_pct",
        match server.cpu_percent(ctx.clock_ticks, IDLE_WINDOW).await {
            Some(pct) => round1(pct),
            None => "n/a".into(),
        },
    );
    server.kill().await;
    Ok(())
}

/// First status a Subscribe call produces: the call's own, or its first message's.
async fn subscribe_status<F>(call: F) -> String
where
    F: std::future::Future<Output = Result<Option<Status>, Status>>,
{
    match timeout(Duration::from_secs(15), call).await {
        Ok(Ok(None)) => "OK (stream open, no error within 2 s)".into(),
        Ok(Ok(Some(status))) | Ok(Err(status)) => status_text(&status),
        Err(_) => "no answer within 15 s".into(),
    }
}

/// Scenario 9: An oversized and a malformed Subscribe request: which status each gets.
async fn status_codes(ctx: &Ctx, f: &mut Figures) -> Result<(), String> {
    let mut server = Server::start(ctx, &[], None, None).await?;
    let channel = connect(server.grpc, Windows::Default).await?;

    let oversized = SubscribeRequest {
        channels: (0..2_000_000).collect(),
        ..Default::default()
    };
    f.put(
        "oversized_request_bytes",
        prost::Message::encoded_len(&oversized),
    );
    let call = {
        let channel = channel.clone();
        async move {
            let (mut stream, _) = subscribe(channel, oversized).await?;
            Ok(
                match timeout(Duration::from_secs(2), stream.message()).await {
                    Ok(Err(status)) => Some(status),
                    _ => None,
                },
            )
        }
    };
    f.put(
        "oversized_subscribe_2M_channels",
        subscribe_status(call).await,
    );

    let call = {
        let channel = channel.clone();
        async move {
            let mut client = grpc(channel);
            ready(&mut client).await?;
            let mut stream = client
                .server_streaming(
                    Request::new(Bytes::from_static(&[0xFF, 0xFF, 0xFF])),
                    PathAndQuery::from_static(SUBSCRIBE),
                    RawCodec,
                )
                .await?
                .into_inner();
            Ok(
                match timeout(Duration::from_secs(2), stream.message()).await {
                    Ok(Err(status)) => Some(status),
                    _ => None,
                },
            )
        }
    };
    f.put("malformed_subscribe_ff_ff_ff", subscribe_status(call).await);
    drop(channel);
    good_clients(&server, f).await;
    server_state(&mut server, f);
    server.kill().await;
    Ok(())
}

/// One resume attempt's result as figures.
async fn put_resume(f: &mut Figures, prefix: &str, addr: SocketAddr, request: SubscribeRequest) {
    match Reader::start(addr, request).await {
        Ok(reader) => {
            reader
                .wait(|_| false, Duration::from_secs(1), Duration::from_secs(5))
                .await;
            let c = &reader.counts;
            f.put(&format!("{prefix}_packets"), c.received());
            if c.received() > 0 {
                f.put(
                    &format!("{prefix}_sequences"),
                    format!("{}..{}", c.first_sequence(), c.max_sequence()),
                );
            }
            f.put(&format!("{prefix}_missed"), c.missed());
            f.put(
                &format!("{prefix}_status"),
                format!("Subscribe OK; stream {}", reader.state()),
            );
        }
        Err(error) => f.put(&format!("{prefix}_status"), error),
    }
}

/// Scenario 10: Resume with from_sequence after a kill -9 and restart (memory mode).
async fn restart_resume(ctx: &Ctx, f: &mut Figures) -> Result<(), String> {
    let mut first = Server::start(ctx, &[], None, None).await?;
    let addrs = [first.grpc, first.ingest, first.metrics];
    let live = Reader::start(first.grpc, SubscribeRequest::default()).await?;
    f.put(
        "stream_id_before",
        live.stream_id
            .clone()
            .unwrap_or_else(|| "(no packet-ingest-stream-id header)".into()),
    );
    let sent = tcp_send(first.ingest, &packets(GOOD_CHANNEL, 10, 64), 1, RPC_TIMEOUT).await;
    f.put("producer_before", sent.describe());
    live.wait(|c| c.received() >= 10, Duration::from_secs(2), RPC_TIMEOUT)
        .await;
    let last = live.counts.max_sequence();
    f.put("last_sequence_before", last);
    first.kill().await;
    live.wait(|_| false, Duration::from_secs(3), Duration::from_secs(3))
        .await;
    f.put("live_stream_after_kill_9", live.state());
    let mut second = match Server::start(ctx, &[], None, Some(addrs)).await {
        Ok(server) => {
            f.put("restarted_on_same_ports", "yes");
            server
        }
        Err(error) => {
            f.put(
                "restarted_on_same_ports",
                format!("no ({error}); fresh ports"),
            );
            Server::start(ctx, &[], None, None).await?
        }
    };
    let watcher = Reader::start(second.grpc, SubscribeRequest::default()).await?;
    f.put(
        "stream_id_after",
        watcher
            .stream_id
            .clone()
            .unwrap_or_else(|| "(no packet-ingest-stream-id header)".into()),
    );
    let sent = tcp_send(
        second.ingest,
        &packets(GOOD_CHANNEL, 20, 64),
        1,
        RPC_TIMEOUT,
    )
    .await;
    f.put("producer_after", sent.describe());
    watcher
        .wait(|c| c.received() >= 20, Duration::from_secs(2), RPC_TIMEOUT)
        .await;
    f.put("accepted_after_restart", watcher.counts.received());
    let from = last + 1;
    put_resume(
        f,
        &format!("resume_from_{from}"),
        second.grpc,
        SubscribeRequest {
            from_sequence: Some(from),
            ..Default::default()
        },
    )
    .await;
    match live.stream_id.clone() {
        Some(stream_id) => {
            put_resume(
                f,
                &format!("resume_from_{from}_with_old_stream_id"),
                second.grpc,
                SubscribeRequest {
                    from_sequence: Some(from),
                    stream_id,
                    ..Default::default()
                },
            )
            .await
        }
        None => f.put(
            "resume_with_old_stream_id",
            "not possible: the server sent no stream id to resume with",
        ),
    }
    server_state(&mut second, f);
    second.kill().await;
    Ok(())
}

/// Runs `packet-ingest send --hmac-key-file KEY --addr ADDR` with `input` on stdin.
async fn run_send(ctx: &Ctx, key: &Path, addr: SocketAddr, input: &str) -> (String, String) {
    let child = Command::new(&ctx.bin)
        .arg("send")
        .arg("--hmac-key-file")
        .arg(key)
        .arg("--addr")
        .arg(addr.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(error) => return (format!("cannot run send: {error}"), String::new()),
    };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(input.as_bytes()).await;
    }
    match timeout(Duration::from_secs(10), child.wait_with_output()).await {
        Ok(Ok(output)) => (
            output.status.to_string(),
            truncate(String::from_utf8_lossy(&output.stderr).trim(), 200),
        ),
        Ok(Err(error)) => (format!("error: {error}"), String::new()),
        Err(_) => ("timed out after 10 s".into(), String::new()),
    }
}

/// Scenario 11: An HMAC key file ending in CRLF: do `send`'s packets verify?
async fn hmac_crlf(ctx: &Ctx, f: &mut Figures) -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("hostile-probe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|error| error.to_string())?;
    let crlf = dir.join("hmac-crlf.key");
    let lf = dir.join("hmac-lf.key");
    std::fs::write(&crlf, b"secret\r\n").map_err(|error| error.to_string())?;
    std::fs::write(&lf, b"secret\n").map_err(|error| error.to_string())?;
    let key_arg = vec!["--hmac-key-file".to_owned(), crlf.display().to_string()];
    let result = async {
        let mut server = Server::start(ctx, &key_arg, None, None).await?;
        let reader = Reader::start(server.grpc, SubscribeRequest::default()).await?;
        let lines = "line 1\nline 2\nline 3\nline 4\nline 5\n";
        let (status, stderr) = run_send(ctx, &crlf, server.ingest, lines).await;
        f.put("send_crlf_key_exit", status);
        f.put("send_crlf_key_stderr", stderr);
        reader
            .wait(|c| c.received() >= 5, Duration::from_secs(2), RPC_TIMEOUT)
            .await;
        let crlf_received = reader.counts.received();
        f.put("delivered_with_crlf_key", format!("{crlf_received}/5"));
        // Control: the same key without the carriage return, to the same server.
        let (status, _) = run_send(ctx, &lf, server.ingest, lines).await;
        f.put("send_lf_key_exit (control)", status);
        reader
            .wait(
                |c| c.received() >= crlf_received + 5,
                Duration::from_secs(2),
                RPC_TIMEOUT,
            )
            .await;
        f.put(
            "delivered_with_lf_key (control)",
            format!("{}/5", reader.counts.received() - crlf_received),
        );
        server_state(&mut server, f);
        server.kill().await;
        Ok::<(), String>(())
    }
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

// ---------------------------------------------------------------------------

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let runs = plan(&args);
    if runs.is_empty() {
        eprintln!("no scenario matches {:?}", args.scenarios);
        return ExitCode::from(2);
    }
    if let Some(limit) = own_open_file_limit().filter(|limit| *limit < 8192) {
        eprintln!(
            "warning: this probe may open over 4,000 sockets but its open-file limit is {limit}; raise it (ulimit -n)"
        );
    }
    let mut server_args = args.server_args.clone();
    server_args.extend(args.trailing.iter().cloned());
    let ctx = Ctx {
        bin: args.bin.clone(),
        server_args,
        flood_mib: args.flood_mib,
        churn_packets: args.churn_packets,
        filter_channels: args.filter_channels,
        nofile: args.nofile,
        clock_ticks: clock_ticks(),
        json: args.json,
    };
    let say = |line: &str| {
        if ctx.json {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    };
    say(&format!(
        "hostile_probe: server {} extra args {:?}, scenario timeout {} s",
        ctx.bin.display(),
        ctx.server_args,
        args.scenario_timeout
    ));
    let mut done: Vec<(String, Figures)> = Vec::new();
    let mut documents = Vec::new();
    for run in runs {
        let label = run.label(&ctx);
        say(&format!("\n== {label} =="));
        let mut figures = Figures {
            rows: Vec::new(),
            to_stderr: ctx.json,
        };
        let started = Instant::now();
        let limit = Duration::from_secs(args.scenario_timeout);
        match timeout(limit, run_scenario(&ctx, &run, &mut figures)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => figures.put("error", error),
            Err(_) => figures.put(
                "error",
                format!("scenario timed out after {} s", limit.as_secs()),
            ),
        }
        figures.put("scenario_wall_s", round1(started.elapsed().as_secs_f64()));
        documents.push(json!({
            "scenario": run.name(),
            "label": label,
            "figures": figures.rows.iter().map(|(k, v)| (k.clone(), v.clone())).collect::<serde_json::Map<_, _>>(),
        }));
        done.push((label, figures));
        // Let sockets of the previous server drain before the next one starts.
        sleep(Duration::from_millis(300)).await;
    }
    print_table(&done, ctx.json);
    if ctx.json {
        let document = json!({
            "bin": ctx.bin.display().to_string(),
            "server_args": ctx.server_args,
            "runs": documents,
        });
        println!("{}", serde_json::to_string_pretty(&document).expect("json"));
    }
    ExitCode::SUCCESS
}
