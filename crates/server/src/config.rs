//! Command line and environment, checked once: the clap definitions for the
//! server and the helper subcommands, and [`Settings`], what the flags become
//! once every file is read, every key and certificate checked and every
//! derived size computed. `Settings::load` runs before the runtime starts, so
//! exit 64 (bad configuration) is decided here and nowhere else. Every server
//! flag also reads `PACKET_INGEST_<FLAG>`.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};

pub use packet_ingest_protocol::units::{parse_duration, parse_size};

use crate::{
    auth::TokenStore,
    hub::SlowSubscriberPolicy,
    log::{FsyncPolicy, LogIo, LogOptions},
    metrics::Metrics,
    tls::{self, TlsError, TlsPaths, TlsSetup},
};

/// File descriptors kept free of the connection caps: the admin port's
/// connections, listeners, log files, NATS.
const RESERVED_FDS: u64 = 64 + crate::http::ADMIN_CONNECTIONS as u64;

/// Exit status for bad configuration (sysexits.h EX_USAGE).
pub const EXIT_CONFIG: i32 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "packet-ingest",
    version,
    about = "Verified packets off raw TCP and into many ordered gRPC streams",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Frame lines or fixed-size chunks of stdin (or a file) and send them to the ingest port.
    Send(crate::tools::SendArgs),
    /// Subscribe and print packets as JSON lines or a hexdump.
    Tail(crate::tools::TailArgs),
    /// Exit 0 if the server's gRPC health check answers SERVING.
    Health(crate::tools::HealthArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Server flags (SPEC §5). Parse with `ServeArgs::try_parse_from` in tests.
#[derive(Clone, Debug, Parser)]
#[command(name = "packet-ingest")]
pub struct ServeArgs {
    /// gRPC listen address (Subscribe, Publish, health, reflection).
    #[arg(long, env = "PACKET_INGEST_GRPC_ADDR", default_value = "0.0.0.0:50051")]
    pub grpc_addr: SocketAddr,
    /// TCP ingest listen address (SPEC §2 wire format).
    #[arg(
        long,
        env = "PACKET_INGEST_INGEST_ADDR",
        default_value = "0.0.0.0:7000"
    )]
    pub ingest_addr: SocketAddr,
    /// HTTP address for GET /metrics and GET /healthz.
    #[arg(
        long,
        env = "PACKET_INGEST_METRICS_ADDR",
        default_value = "0.0.0.0:9090"
    )]
    pub metrics_addr: SocketAddr,
    /// Largest accepted payload in bytes (suffixes KiB, MiB allowed).
    #[arg(long, env = "PACKET_INGEST_MAX_PAYLOAD", default_value = "1MiB", value_parser = parse_payload_size)]
    pub max_payload: u32,
    /// Concurrent TCP ingest connections; when all are open, the one idle longest is closed for a newcomer.
    #[arg(long, env = "PACKET_INGEST_MAX_CONNECTIONS", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// An ingest connection that sends nothing for this long is closed.
    #[arg(long, env = "PACKET_INGEST_INGEST_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_positive_duration)]
    pub ingest_idle_timeout: Duration,
    /// A frame must be complete this long after its first byte arrived, or its connection is closed.
    #[arg(long, env = "PACKET_INGEST_FRAME_TIMEOUT", default_value = "10s", value_parser = parse_positive_duration)]
    pub frame_timeout: Duration,
    /// Bytes read from producers and not yet published (partial frames, Publish messages, batches in verification), all together.
    #[arg(long, env = "PACKET_INGEST_INGEST_MEMORY_LIMIT", default_value = "64MiB", value_parser = parse_memory_size)]
    pub ingest_memory_limit: u64,
    /// Concurrent gRPC connections; when all are open, the one idle longest is closed for a newcomer.
    #[arg(long, env = "PACKET_INGEST_MAX_GRPC_CONNECTIONS", default_value_t = 2048, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_grpc_connections: u32,
    /// A gRPC client must finish TLS and send the HTTP/2 preface within this.
    #[arg(long, env = "PACKET_INGEST_GRPC_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_positive_duration)]
    pub grpc_handshake_timeout: Duration,
    /// Concurrent calls on one gRPC connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS).
    #[arg(long, env = "PACKET_INGEST_MAX_STREAMS_PER_CONNECTION", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_streams_per_connection: u32,
    /// Concurrent Publish streams; more get RESOURCE_EXHAUSTED.
    #[arg(long, env = "PACKET_INGEST_MAX_PUBLISHERS", default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_publishers: u32,
    /// A Publish stream with no message for this long ends DEADLINE_EXCEEDED (packets before it kept).
    #[arg(long, env = "PACKET_INGEST_PUBLISH_IDLE_TIMEOUT", default_value = "30s", value_parser = parse_positive_duration)]
    pub publish_idle_timeout: Duration,
    /// Browser origins allowed to call the gRPC port with gRPC-Web (CORS), e.g.
    /// `https://app.example.com`; repeat or comma-separate; `*` allows any. None by default.
    #[arg(long, env = "PACKET_INGEST_CORS_ORIGIN", value_delimiter = ',', value_parser = parse_cors_origin)]
    pub cors_origin: Vec<String>,
    /// Export traces (connections, batch verify, publish, delivery, with their
    /// sequence ranges) over OTLP/gRPC to this collector, e.g. http://otel-collector:4317.
    #[arg(long, env = "PACKET_INGEST_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Message compression the gRPC port offers (gzip, zstd), comma-separated;
    /// off by default. Clients opt in per call (grpc-accept-encoding).
    #[arg(
        long,
        env = "PACKET_INGEST_COMPRESSION",
        value_delimiter = ',',
        value_enum
    )]
    pub compression: Vec<crate::compression::Encoding>,
    /// Channels one Subscribe filter may name; more get INVALID_ARGUMENT.
    #[arg(long, env = "PACKET_INGEST_MAX_FILTER_CHANNELS", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_filter_channels: u32,
    /// Concurrent Subscribe streams; more get RESOURCE_EXHAUSTED.
    #[arg(long, env = "PACKET_INGEST_MAX_SUBSCRIBERS", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_subscribers: u32,
    /// Packets a subscriber may fall behind before --slow-subscriber applies.
    #[arg(long, env = "PACKET_INGEST_SUBSCRIBER_BUFFER", default_value_t = 65536, value_parser = clap::value_parser!(u64).range(1..))]
    pub subscriber_buffer: u64,
    /// Packets kept for Subscribe.from_sequence replay.
    #[arg(long, env = "PACKET_INGEST_HISTORY", default_value_t = 65536)]
    pub history: u64,
    /// Bytes held for history and lagging subscribers together (suffixes KiB, MiB, GiB).
    #[arg(long, env = "PACKET_INGEST_MEMORY_LIMIT", default_value = "256MiB", value_parser = parse_memory_size)]
    pub memory_limit: u64,
    /// What happens to a subscriber that falls behind by more than its buffer
    /// (default: gap; catch-up with --data-dir).
    #[arg(long, env = "PACKET_INGEST_SLOW_SUBSCRIBER", value_enum)]
    pub slow_subscriber: Option<SlowSubscriberPolicy>,
    /// Directory of the durable stream: packets, numbering and stream id survive restarts.
    #[arg(long, env = "PACKET_INGEST_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// With --data-dir: delete the oldest segments beyond this many bytes (0: no limit).
    #[arg(long, env = "PACKET_INGEST_RETENTION_BYTES", default_value = "0", value_parser = parse_size)]
    pub retention_bytes: u64,
    /// With --data-dir: delete segments older than this (0s: no limit).
    #[arg(long, env = "PACKET_INGEST_RETENTION_AGE", default_value = "0s", value_parser = parse_duration)]
    pub retention_age: Duration,
    /// With --data-dir: when written packets are made durable (always, interval, never).
    #[arg(long, env = "PACKET_INGEST_FSYNC", value_enum, default_value_t = FsyncPolicy::Interval)]
    pub fsync: FsyncPolicy,
    /// With --fsync interval: how often (group commit).
    #[arg(long, env = "PACKET_INGEST_FSYNC_INTERVAL", default_value = "100ms", value_parser = parse_positive_duration)]
    pub fsync_interval: Duration,
    /// With --data-dir: how the log writes (direct: full 1 MiB writes
    /// O_DIRECT, past the page cache, smaller ones buffered; buffered: all).
    #[arg(long, env = "PACKET_INGEST_LOG_IO", value_enum, default_value_t = LogIo::Direct)]
    pub log_io: LogIo,
    /// With --data-dir: size at which a log segment is closed and a new one started.
    #[arg(long, env = "PACKET_INGEST_SEGMENT_BYTES", default_value = "64MiB", value_parser = parse_memory_size)]
    pub segment_bytes: u64,
    /// In block mode, how long a stuck subscriber may hold up ingest before it is cut.
    #[arg(long, env = "PACKET_INGEST_BLOCK_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub block_timeout: Duration,
    /// Interval of empty keep-alive responses on idle Subscribe streams.
    #[arg(long, env = "PACKET_INGEST_HEARTBEAT", default_value = "15s", value_parser = parse_duration)]
    pub heartbeat: Duration,
    /// File holding the HMAC-SHA256 key (its bytes, one trailing newline removed).
    #[arg(long, env = "PACKET_INGEST_HMAC_KEY_FILE")]
    pub hmac_key_file: Option<PathBuf>,
    /// Drop packets whose digest is plain SHA-256 (needs --hmac-key-file).
    #[arg(long, env = "PACKET_INGEST_REQUIRE_HMAC")]
    pub require_hmac: bool,
    /// File of bearer tokens, one per line; then every RPC but health needs one.
    #[arg(long, env = "PACKET_INGEST_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,
    /// PEM certificate chain: TLS on the gRPC and the ingest port.
    #[arg(long, env = "PACKET_INGEST_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "PACKET_INGEST_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA bundle: clients on both ports must present a certificate it signed.
    #[arg(long, env = "PACKET_INGEST_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// NATS URL: replicas share one ordered stream through JetStream (off by default).
    #[arg(long, env = "PACKET_INGEST_CLUSTER_NATS")]
    pub cluster_nats: Option<String>,
    /// JetStream stream name for cluster mode (subjects packetingest.>).
    #[arg(long, env = "PACKET_INGEST_CLUSTER_STREAM", default_value = "PACKETS")]
    pub cluster_stream: String,
    /// Cluster mode: the JetStream stream drops messages older than this (0s: no limit; else at least 2s).
    #[arg(long, env = "PACKET_INGEST_CLUSTER_MAX_AGE", default_value = "0s", value_parser = parse_duration)]
    pub cluster_max_age: Duration,
    /// Cluster mode: the JetStream stream drops its oldest messages beyond this size (0: no limit).
    #[arg(long, env = "PACKET_INGEST_CLUSTER_MAX_BYTES", default_value = "8GiB", value_parser = parse_size)]
    pub cluster_max_bytes: u64,
    /// Cluster mode: packets this replica's consumer may trail what is stored before producers wait.
    #[arg(long, env = "PACKET_INGEST_CLUSTER_MAX_LAG", default_value_t = 262_144, value_parser = clap::value_parser!(u64).range(1..))]
    pub cluster_max_lag: u64,
    /// Time from SIGTERM to exit: ingest drains, then streams end UNAVAILABLE.
    #[arg(long, env = "PACKET_INGEST_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
    /// Log output format; the filter comes from RUST_LOG (default info).
    #[arg(long, env = "PACKET_INGEST_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Verification threads; 0 means one per core.
    #[arg(long, env = "PACKET_INGEST_VERIFY_THREADS", default_value_t = 0)]
    pub verify_threads: usize,
    /// Concurrent gRPC requests across all connections; beyond it, load is shed.
    #[arg(long, env = "PACKET_INGEST_CONCURRENCY_LIMIT", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub concurrency_limit: u32,
    /// Refuse requests with RESOURCE_EXHAUSTED instead of queueing when at the concurrency limit.
    #[arg(long, env = "PACKET_INGEST_LOAD_SHED", default_value_t = true, action = clap::ArgAction::Set)]
    pub load_shed: bool,
    /// Deadline for unary RPCs (health checks); streams are not cut by it.
    #[arg(long, env = "PACKET_INGEST_REQUEST_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// HTTP/2 keepalive ping interval, so dead clients are found.
    #[arg(long, env = "PACKET_INGEST_HTTP2_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub http2_keepalive_interval: Duration,
    /// How long a keepalive ping may go unanswered before the connection is closed.
    #[arg(long, env = "PACKET_INGEST_HTTP2_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub http2_keepalive_timeout: Duration,
}

impl ServeArgs {
    /// Packets the hub keeps: enough for both history and the subscriber buffer.
    pub fn retain_packets(&self) -> u64 {
        self.history.max(self.subscriber_buffer)
    }

    /// Checks that the flags fit together (each parsed fine on its own).
    pub fn validate(&self) -> Result<(), ConfigError> {
        // One frame being assembled and one being verified must both fit.
        let needed = 2 * (u64::from(self.max_payload) + 64 * 1024);
        if self.ingest_memory_limit < needed {
            return Err(ConfigError::IngestMemoryTooSmall {
                limit: self.ingest_memory_limit,
                needed,
            });
        }
        let max_age = self.cluster_max_age;
        if !max_age.is_zero() && max_age < crate::cluster::MIN_MAX_AGE {
            return Err(ConfigError::ClusterMaxAgeTooShort { max_age });
        }
        Ok(())
    }
}

/// Configuration that parsed but cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--hmac-key-file: {0}")]
    HmacKeyFile(packet_ingest_protocol::keyfile::KeyFileError),
    #[error("--ingest-memory-limit {limit} is too small: it must hold two frames of --max-payload ({needed} bytes or more)")]
    IngestMemoryTooSmall { limit: u64, needed: u64 },
    #[error("--require-hmac needs --hmac-key-file")]
    RequireHmacWithoutKey,
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("--slow-subscriber catch-up needs --data-dir (subscribers catch up from the log)")]
    CatchUpWithoutDataDir,
    #[error("--data-dir and --cluster-nats cannot be used together: in cluster mode JetStream keeps the stream")]
    DataDirWithCluster,
    #[error("--cluster-max-age {max_age:?} is too short: use 0s (no limit) or at least 2s, so that replicas can refresh an idle stream's last message before it expires")]
    ClusterMaxAgeTooShort { max_age: Duration },
    #[error(transparent)]
    Log(#[from] crate::log::LogError),
    #[error("cannot read --auth-token-file {path}: {source}")]
    AuthTokenFile {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The server's configuration, checked and loaded: what `server::start` builds from.
pub struct Settings {
    pub args: ServeArgs,
    pub hmac_key: Option<Vec<u8>>,
    pub tls: Option<TlsSetup>,
    pub tokens: Option<Arc<TokenStore>>,
    /// The soft open-file limit after raising it to the hard one.
    pub open_files: Option<u64>,
    /// `--max-connections` and `--max-grpc-connections`, lowered to fit `open_files`.
    pub max_ingest_connections: usize,
    pub max_grpc_connections: usize,
    /// Packets the hub keeps: enough for both history and the subscriber buffer.
    pub retain_packets: u64,
    pub memory_limit: usize,
    pub ingest_memory_limit: usize,
    pub slow_subscriber: SlowSubscriberPolicy,
    /// The durable stream, with `--data-dir`: opened (locked and recovered)
    /// here, so a directory in use is a configuration error.
    pub log: Option<crate::log::Opened>,
    pub metrics: Arc<Metrics>,
}

impl Settings {
    /// Reads the files the flags name and checks that everything fits
    /// together. Also raises the open-file limit (the caps depend on it).
    pub fn load(args: ServeArgs) -> Result<Settings, ConfigError> {
        args.validate()?;
        let hmac_key = load_hmac_key(&args)?;
        let tls = tls::load(TlsPaths {
            cert: args.tls_cert.as_deref(),
            key: args.tls_key.as_deref(),
            client_ca: args.tls_client_ca.as_deref(),
        })?;
        let tokens = match &args.auth_token_file {
            Some(path) => Some(TokenStore::load(path.clone()).map_err(|source| {
                ConfigError::AuthTokenFile {
                    path: path.clone(),
                    source,
                }
            })?),
            None => None,
        };
        let slow_subscriber = match (args.slow_subscriber, &args.data_dir) {
            (Some(SlowSubscriberPolicy::CatchUp), None) => {
                return Err(ConfigError::CatchUpWithoutDataDir)
            }
            (Some(policy), _) => policy,
            (None, Some(_)) => SlowSubscriberPolicy::CatchUp,
            (None, None) => SlowSubscriberPolicy::Gap,
        };
        if args.data_dir.is_some() && args.cluster_nats.is_some() {
            return Err(ConfigError::DataDirWithCluster);
        }
        let metrics = Metrics::new();
        let log = match &args.data_dir {
            None => None,
            Some(dir) => Some(crate::log::Log::open(
                LogOptions {
                    dir: dir.clone(),
                    segment_bytes: args.segment_bytes,
                    retention_bytes: (args.retention_bytes > 0).then_some(args.retention_bytes),
                    retention_age: (!args.retention_age.is_zero()).then_some(args.retention_age),
                    fsync: args.fsync,
                    fsync_interval: args.fsync_interval,
                    io: args.log_io,
                },
                Arc::clone(&metrics),
            )?),
        };
        let open_files = crate::connections::raise_open_file_limit();
        let (max_ingest_connections, max_grpc_connections) = connection_caps(&args, open_files);
        Ok(Settings {
            retain_packets: args.retain_packets(),
            memory_limit: usize::try_from(args.memory_limit).unwrap_or(usize::MAX),
            ingest_memory_limit: usize::try_from(args.ingest_memory_limit).unwrap_or(usize::MAX),
            slow_subscriber,
            log,
            metrics,
            args,
            hmac_key,
            tls,
            tokens,
            open_files,
            max_ingest_connections,
            max_grpc_connections,
        })
    }
}

/// Connection caps that fit the open-file limit: a cap the process cannot
/// reach would turn into accept errors instead of orderly refusals.
fn connection_caps(args: &ServeArgs, open_files: Option<u64>) -> (usize, usize) {
    let ingest = u64::from(args.max_connections);
    let grpc = u64::from(args.max_grpc_connections);
    let Some(limit) = open_files else {
        return (ingest as usize, grpc as usize);
    };
    let available = limit.saturating_sub(RESERVED_FDS).max(2);
    if ingest + grpc <= available {
        return (ingest as usize, grpc as usize);
    }
    // Shrink both in proportion, keeping at least one each.
    let scale = |cap: u64| ((cap * available) / (ingest + grpc)).max(1);
    let (ingest_cap, grpc_cap) = (scale(ingest), scale(grpc));
    tracing::warn!(
        open_files = limit,
        max_connections = ingest_cap,
        max_grpc_connections = grpc_cap,
        "the open-file limit is below --max-connections + --max-grpc-connections; lowering both"
    );
    (ingest_cap as usize, grpc_cap as usize)
}

/// Reads the HMAC key: the file's bytes with one trailing line ending removed.
pub fn load_hmac_key(args: &ServeArgs) -> Result<Option<Vec<u8>>, ConfigError> {
    let Some(path) = &args.hmac_key_file else {
        if args.require_hmac {
            return Err(ConfigError::RequireHmacWithoutKey);
        }
        return Ok(None);
    };
    packet_ingest_protocol::keyfile::read_key_file(path)
        .map(Some)
        .map_err(ConfigError::HmacKeyFile)
}

fn parse_positive_duration(value: &str) -> Result<Duration, String> {
    match parse_duration(value)? {
        duration if duration.is_zero() => Err("must be more than 0".to_owned()),
        duration => Ok(duration),
    }
}

/// A CORS origin as browsers send it: `scheme://host[:port]`, or `*`.
fn parse_cors_origin(value: &str) -> Result<String, String> {
    if value == "*" {
        return Ok(value.to_owned());
    }
    let invalid = || {
        format!("{value:?} is not an origin: write scheme://host[:port] (no path, no trailing slash), or *")
    };
    let (scheme, authority) = value.split_once("://").ok_or_else(invalid)?;
    let authority_ok = !authority.is_empty()
        && !authority.contains(['/', '?', '#', '@'])
        && authority.parse::<http::uri::Authority>().is_ok();
    if !matches!(scheme, "http" | "https") || !authority_ok {
        return Err(invalid());
    }
    // Browsers send the scheme and host in lower case; so must the list.
    Ok(value.to_ascii_lowercase())
}

/// Bytes with an optional binary suffix: `1048576`, `64KiB`, `1MiB`, `2GiB`.
fn parse_payload_size(value: &str) -> Result<u32, String> {
    const LIMIT: u64 = 64 << 20;
    match parse_size(value)? {
        0 => Err("must be at least 1 byte".to_owned()),
        size if size > LIMIT => Err(format!("{size} is over the supported maximum of 64MiB")),
        size => Ok(size as u32),
    }
}

fn parse_memory_size(value: &str) -> Result<u64, String> {
    match parse_size(value)? {
        size if size < (1 << 20) => Err("must be at least 1MiB".to_owned()),
        size => Ok(size),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cors_origins_are_bare_origins() {
        let parsed = ServeArgs::try_parse_from([
            "x",
            "--cors-origin",
            "https://App.example.com,http://127.0.0.1:8080",
            "--cors-origin=*",
        ])
        .expect("origins parse");
        assert_eq!(
            parsed.cors_origin,
            ["https://app.example.com", "http://127.0.0.1:8080", "*"]
        );
        for bad in [
            "app.example.com",
            "https://app.example.com/",
            "https://app.example.com/page",
            "ftp://app.example.com",
            "https://app.example.com?x=1",
            "",
        ] {
            assert!(parse_cors_origin(bad).is_err(), "{bad:?} accepted");
        }
        let defaults = ServeArgs::try_parse_from(["x"]).expect("defaults parse");
        assert!(defaults.cors_origin.is_empty(), "no origin by default");
    }

    #[test]
    fn connection_caps_shrink_to_fit_the_open_file_limit() {
        let args = ServeArgs::try_parse_from(["x"]).expect("defaults parse");
        assert_eq!(connection_caps(&args, None), (1024, 2048));
        assert_eq!(connection_caps(&args, Some(1 << 20)), (1024, 2048));
        let (ingest, grpc) = connection_caps(&args, Some(1024));
        assert!(ingest + grpc <= 1024 - RESERVED_FDS as usize);
        assert!(ingest >= 1 && grpc > ingest);
    }

    #[test]
    fn defaults_match_the_contract() {
        let args = ServeArgs::try_parse_from(["packet-ingest"]).expect("defaults parse");
        assert_eq!(args.grpc_addr.port(), 50051);
        assert_eq!(args.ingest_addr.port(), 7000);
        assert_eq!(args.metrics_addr.port(), 9090);
        assert_eq!(args.max_payload, 1 << 20);
        assert_eq!(args.memory_limit, 256 << 20);
        assert_eq!(args.slow_subscriber, None);
        assert_eq!(args.block_timeout, Duration::from_secs(5));
        assert_eq!(args.heartbeat, Duration::from_secs(15));
        assert_eq!(args.shutdown_grace, Duration::from_secs(10));
    }

    #[test]
    fn sizes_and_durations_parse_with_units() {
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size("3"), Ok(3));
        assert!(parse_size("ten").is_err());
        assert!(parse_size("5XB").is_err());
        assert!(parse_size("99999999999999999999GiB").is_err());
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("soon").is_err());
        assert!(ServeArgs::try_parse_from(["x", "--max-payload", "0"]).is_err());
        assert!(ServeArgs::try_parse_from(["x", "--slow-subscriber", "maybe"]).is_err());
    }

    #[test]
    fn cluster_max_age_is_none_or_long_enough_to_refresh() {
        let validate = |age: &str| {
            ServeArgs::try_parse_from(["x", "--cluster-max-age", age])
                .expect("parses")
                .validate()
        };
        assert!(validate("0s").is_ok());
        assert!(validate("2s").is_ok());
        assert!(validate("24h").is_ok());
        assert!(matches!(
            validate("1500ms"),
            Err(ConfigError::ClusterMaxAgeTooShort { .. })
        ));
    }

    #[test]
    fn hmac_key_drops_one_trailing_line_ending() {
        let dir = std::env::temp_dir().join(format!("pi-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("key");
        std::fs::write(&path, b"secret\r\n\r\n").expect("write key");
        let args =
            ServeArgs::try_parse_from(["x", "--hmac-key-file", path.to_str().expect("utf8")])
                .expect("parse");
        assert_eq!(
            load_hmac_key(&args).expect("key"),
            Some(b"secret\r\n".to_vec())
        );
        let missing = ServeArgs::try_parse_from(["x", "--require-hmac"]).expect("parse");
        assert!(matches!(
            load_hmac_key(&missing),
            Err(ConfigError::RequireHmacWithoutKey)
        ));
        std::fs::remove_dir_all(&dir).ok();
    }
}
