//! Subscribe to packet-ingest and print one JSON line per packet.
//!
//! ```text
//! cargo run --release --example rust_subscriber -- \
//!     --addr http://127.0.0.1:50051 --channel 3 --from 1 --count 1000 --verify
//! ```
//!
//! Lines have the shape of `packet-ingest tail --format json`. A response whose
//! `missed` is non-zero prints `{"missed": N, "before_sequence": S}` first (with
//! `--no-gaps` that ends the run, status 5). Once the server has accepted the
//! subscription, `{"ready":true}` goes to stderr; a summary line ends stderr.
//!
//! The server names its stream in the `packet-ingest-stream-id` response
//! header (printed in the ready line and the summary). A resume sends it back
//! (`--from SEQ --stream-id ID`): if the server's stream is another one (it
//! restarted without its data) the call fails `FAILED_PRECONDITION`, so two
//! streams are never mixed. With `--reconnect N` the subscriber resumes by
//! itself after the server goes away, from the sequence after the last one
//! it saw, within the same stream.
//!
//! Exit status: 0 after `--count` packets (or a clean end of stream); 1 gRPC or
//! connection error (`OUT_OF_RANGE`: the server restarted, resubscribe); 3 a
//! sequence that is not strictly increasing; 4 a digest that does not verify
//! (`--verify`, plain SHA-256 packets); 5 missed packets with `--no-gaps`;
//! 6 the stream changed under a resume (`FAILED_PRECONDITION`); 124
//! `--timeout` expired first.

use std::{
    io::Write,
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use bytes::Bytes;
use clap::Parser;
use packet_ingest_protocol::{
    client::{make_frame_with, packet_json},
    frame::{Channel, FLAG_ACK},
    pb::{packets_client::PacketsClient, Packet, SubscribeRequest},
};
use tonic::{metadata::MetadataValue, Code, Request};

#[derive(Debug, Parser)]
#[command(about = "Subscribe to packet-ingest and print packets as JSON lines")]
struct Args {
    /// gRPC endpoint.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// Only this channel; repeat for several, all when absent.
    #[arg(long = "channel")]
    channels: Vec<u32>,
    /// Replay retained packets from this sequence, then follow live.
    #[arg(long = "from")]
    from_sequence: Option<u64>,
    /// Exit 0 after this many packets.
    #[arg(long)]
    count: Option<u64>,
    /// Give up (status 124) after this many seconds.
    #[arg(long)]
    timeout: Option<f64>,
    /// Check that every packet's digest is the SHA-256 of its header and payload.
    #[arg(long)]
    verify: bool,
    /// Treat a non-zero `missed` as an error (status 5).
    #[arg(long)]
    no_gaps: bool,
    /// Print no packet lines, only the summary on stderr.
    #[arg(long)]
    quiet: bool,
    /// Bearer token file (first non-empty, non-comment line), for --auth-token-file servers.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Resume only within this stream (the id a server sent before).
    #[arg(long)]
    stream_id: Option<String>,
    /// Resume up to N times after the server goes away.
    #[arg(long, default_value_t = 0)]
    reconnect: u32,
}

fn digest_ok(packet: &Packet) -> bool {
    // The digest covers the producer's flags byte, which a delivered packet
    // does not carry: a plain frame had 0, or FLAG_ACK if its producer asked
    // for acknowledgements (SPEC §9). HMAC digests need the key.
    [0, FLAG_ACK].into_iter().any(|flags| {
        let frame = make_frame_with(
            Channel(packet.channel),
            Bytes::clone(&packet.payload),
            None,
            flags,
        );
        frame.digest.0[..] == packet.digest[..]
    })
}

fn bearer(
    token_file: &Option<PathBuf>,
) -> Result<Option<MetadataValue<tonic::metadata::Ascii>>, String> {
    let Some(path) = token_file else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let token = text
        .lines()
        .map(str::trim)
        .find(|line| !line.is_empty() && !line.starts_with('#'))
        .ok_or_else(|| format!("{}: no token in the file", path.display()))?;
    format!("Bearer {token}")
        .parse()
        .map(Some)
        .map_err(|_| format!("{}: the token is not valid header text", path.display()))
}

#[derive(Default)]
struct Progress {
    seen: u64,
    missed: u64,
    last_sequence: Option<u64>,
    stream_id: String,
}

/// Follows the stream, resuming after disconnections as `--reconnect` allows.
async fn run(args: &Args, progress: &mut Progress) -> Result<u8, String> {
    progress.stream_id = args.stream_id.clone().unwrap_or_default();
    let mut attempts_left = args.reconnect;
    loop {
        match follow(args, progress).await {
            Err(Failure::Unavailable(message)) if attempts_left > 0 => {
                attempts_left -= 1;
                eprintln!(
                    "{}",
                    serde_json::json!({
                        "reconnecting": true,
                        "after": message,
                        "from_sequence": progress.last_sequence.map(|last| last + 1),
                        "stream_id": progress.stream_id,
                    })
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(Failure::Unavailable(message) | Failure::Other(message)) => return Err(message),
            Err(Failure::StreamChanged(message)) => {
                eprintln!("rust_subscriber: {message}");
                return Ok(6);
            }
            Ok(status) => return Ok(status),
        }
    }
}

enum Failure {
    /// The server went away (or is shutting down): worth resuming.
    Unavailable(String),
    /// A resume found another stream (FAILED_PRECONDITION).
    StreamChanged(String),
    Other(String),
}

impl From<tonic::Status> for Failure {
    fn from(status: tonic::Status) -> Self {
        let message = format!("{:?}: {}", status.code(), status.message());
        match status.code() {
            Code::Unavailable | Code::Unknown => Failure::Unavailable(message),
            Code::FailedPrecondition => Failure::StreamChanged(message),
            _ => Failure::Other(message),
        }
    }
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Failure::Other(message)
    }
}

/// One Subscribe call, from where the last one stopped.
async fn follow(args: &Args, progress: &mut Progress) -> Result<u8, Failure> {
    let mut client = PacketsClient::connect(args.addr.clone())
        .await
        .map_err(|e| Failure::Unavailable(format!("cannot connect to {}: {e}", args.addr)))?
        .max_decoding_message_size(usize::MAX);
    let mut request = Request::new(SubscribeRequest {
        channels: args.channels.clone(),
        from_sequence: progress
            .last_sequence
            .map(|last| last + 1)
            .or(args.from_sequence),
        stream_id: progress.stream_id.clone(),
    });
    if let Some(value) = bearer(&args.token_file)? {
        request.metadata_mut().insert("authorization", value);
    }
    let response = match client.subscribe(request).await {
        Ok(response) => response,
        Err(status)
            if status.code() == Code::OutOfRange && !status.message().contains("restart") =>
        {
            return Err(Failure::Other(format!(
                "OUT_OF_RANGE: {} (the server restarted: resubscribe)",
                status.message()
            )))
        }
        Err(status) => return Err(status.into()),
    };
    if let Some(id) = response
        .metadata()
        .get("packet-ingest-stream-id")
        .and_then(|value| value.to_str().ok())
    {
        progress.stream_id = id.to_owned();
    }
    let mut stream = response.into_inner();
    eprintln!(
        "{}",
        serde_json::json!({ "ready": true, "addr": args.addr, "stream_id": progress.stream_id })
    );

    let stdout = std::io::stdout();
    loop {
        let response = match stream.message().await {
            Ok(Some(response)) => response,
            Ok(None) => return Ok(0),
            Err(status) => return Err(status.into()),
        };
        let mut out = stdout.lock();
        if response.missed > 0 {
            progress.missed += response.missed;
            let before = response.packets.first().map(|p| p.sequence);
            let line = serde_json::json!({ "missed": response.missed, "before_sequence": before });
            writeln!(out, "{line}").map_err(|e| e.to_string())?;
            if args.no_gaps {
                eprintln!(
                    "rust_subscriber: server reports {} missed packets before sequence {before:?}",
                    response.missed
                );
                return Ok(5);
            }
        }
        for packet in &response.packets {
            if let Some(last) = progress
                .last_sequence
                .filter(|&last| packet.sequence <= last)
            {
                eprintln!(
                    "rust_subscriber: sequence {} after {last}: not strictly increasing",
                    packet.sequence
                );
                return Ok(3);
            }
            progress.last_sequence = Some(packet.sequence);
            if args.verify && !digest_ok(packet) {
                eprintln!(
                    "rust_subscriber: packet {} has a digest that does not verify",
                    packet.sequence
                );
                return Ok(4);
            }
            if !args.quiet {
                writeln!(out, "{}", packet_json(packet)).map_err(|e| e.to_string())?;
            }
            progress.seen += 1;
            if args.count.is_some_and(|count| progress.seen >= count) {
                out.flush().map_err(|e| e.to_string())?;
                return Ok(0);
            }
        }
        out.flush().map_err(|e| e.to_string())?;
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let started = Instant::now();
    let mut progress = Progress::default();
    let outcome = match args.timeout {
        Some(seconds) => {
            match tokio::time::timeout(Duration::from_secs_f64(seconds), run(&args, &mut progress))
                .await
            {
                Ok(outcome) => outcome,
                Err(_) => {
                    eprintln!(
                        "rust_subscriber: timed out after {seconds}s with {} packets{}",
                        progress.seen,
                        args.count.map(|c| format!(" of {c}")).unwrap_or_default()
                    );
                    Ok(124)
                }
            }
        }
        None => run(&args, &mut progress).await,
    };
    let mut status = match outcome {
        Ok(status) => status,
        Err(message) => {
            eprintln!("rust_subscriber: {message}");
            1
        }
    };
    if status == 0 && args.count.is_some_and(|count| progress.seen < count) {
        eprintln!(
            "rust_subscriber: stream ended after {} of {} packets",
            progress.seen,
            args.count.unwrap_or_default()
        );
        status = 1;
    }
    eprintln!(
        "{}",
        serde_json::json!({
            "received": progress.seen,
            "missed": progress.missed,
            "last_sequence": progress.last_sequence,
            "stream_id": progress.stream_id,
            "status": status,
            "seconds": started.elapsed().as_secs_f64(),
        })
    );
    ExitCode::from(status)
}
