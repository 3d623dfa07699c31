//! Send packets to packet-ingest: raw TCP frames, or the `Publish` RPC.
//!
//! ```text
//! cargo run --release --example rust_producer -- --addr 127.0.0.1:7000 --channel 3 --count 1000
//! cargo run --release --example rust_producer -- --via publish --addr http://127.0.0.1:50051 --count 1000
//! ```
//!
//! Packet `i` carries `<channel>:<i>|` followed by filler, `--size` bytes in all
//! (the same packets as examples/python/producer.py), with the SHA-256 digest
//! of SPEC §2. Over TCP the frames ask for acknowledgements (flag bit 1, SPEC
//! §9): after the last frame the producer half-closes and reads `PA` records
//! until every frame is settled, so exit 0 means every packet was accepted and
//! made durable (exit 1: some were rejected, or not acknowledged before the
//! server closed). `--no-ack` sends plain frames and only waits for the server
//! to close. Over Publish the server answers once the packets are durable; it
//! prints the server's counts. One JSON summary line goes to stdout.

use std::{path::PathBuf, process::ExitCode, time::Instant};

use bytes::{Bytes, BytesMut};
use clap::{Parser, ValueEnum};
use futures::StreamExt as _;
use packet_ingest_protocol::{
    ack::{Ack, ACK_LEN},
    client::make_frame_with,
    frame::{sha256_frame, Channel, FLAG_ACK},
    pb::packets_client::PacketsClient,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Request;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Via {
    /// Raw frames to the TCP ingest port (--addr HOST:PORT).
    Tcp,
    /// The client-streaming Publish RPC (--addr http://HOST:PORT).
    Publish,
}

#[derive(Debug, Parser)]
#[command(about = "Send test packets to packet-ingest over TCP or Publish")]
struct Args {
    /// How to send.
    #[arg(long, value_enum, default_value_t = Via::Tcp)]
    via: Via,
    /// TCP ingest HOST:PORT, or the gRPC endpoint for --via publish.
    #[arg(long, default_value = "127.0.0.1:7000")]
    addr: String,
    /// Channel of every packet.
    #[arg(long, default_value_t = 0)]
    channel: u32,
    /// Packets to send.
    #[arg(long, default_value_t = 10)]
    count: u64,
    /// Payload bytes per packet.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Index of the first packet.
    #[arg(long, default_value_t = 0)]
    start: u64,
    /// Bearer token file for --via publish against an --auth-token-file server.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// TCP: do not ask for acknowledgements.
    #[arg(long)]
    no_ack: bool,
}

/// Packet `index` of a run: `<channel>:<index>|` then a rotated alphabet, `size` bytes.
fn payload(channel: u32, index: u64, size: usize) -> Bytes {
    let mut out = format!("{channel}:{index}|").into_bytes();
    out.truncate(size);
    let mut i = 0u64;
    while out.len() < size {
        out.push(((index + i) % 26) as u8 + b'a');
        i += 1;
    }
    Bytes::from(out)
}

async fn send_tcp(args: &Args) -> Result<serde_json::Value, String> {
    let mut stream = tokio::net::TcpStream::connect(&args.addr)
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", args.addr))?;
    let mut wire = BytesMut::new();
    let mut bytes = 0usize;
    let flags = if args.no_ack { 0 } else { FLAG_ACK };
    for index in args.start..args.start + args.count {
        make_frame_with(
            Channel(args.channel),
            payload(args.channel, index, args.size),
            None,
            flags,
        )
        .encode(&mut wire);
        if wire.len() >= 64 * 1024 {
            bytes += wire.len();
            stream.write_all(&wire).await.map_err(|e| e.to_string())?;
            wire.clear();
        }
    }
    bytes += wire.len();
    stream.write_all(&wire).await.map_err(|e| e.to_string())?;
    stream.shutdown().await.map_err(|e| e.to_string())?;
    let mut summary =
        serde_json::json!({ "sent": args.count, "bytes": bytes, "channel": args.channel });
    if args.no_ack {
        // Wait until the server has read everything and closes.
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await.map_err(|e| e.to_string())? > 0 {}
        return Ok(summary);
    }
    // Acknowledgements until every frame is settled (or the server closes).
    let mut ack = Ack::default();
    let mut record = [0u8; ACK_LEN];
    while ack.settled < args.count && stream.read_exact(&mut record).await.is_ok() {
        ack = Ack::decode(&record)
            .ok_or("the server sent something that is not an acknowledgement")?;
    }
    summary["acknowledged"] = ack.settled.into();
    summary["last_sequence"] = ack.last_sequence.into();
    summary["rejected"] = ack.rejected.into();
    if ack.settled < args.count || ack.rejected > 0 {
        return Err(format!(
            "{} of {} packets acknowledged, {} rejected: {summary}",
            ack.settled, args.count, ack.rejected
        ));
    }
    Ok(summary)
}

async fn publish(args: &Args) -> Result<serde_json::Value, String> {
    let endpoint = match args.addr.contains("://") {
        true => args.addr.clone(),
        false => format!("http://{}", args.addr),
    };
    let mut client = PacketsClient::connect(endpoint.clone())
        .await
        .map_err(|e| format!("cannot connect to {endpoint}: {e}"))?;
    let channel = args.channel;
    let size = args.size;
    let requests = futures::stream::iter(args.start..args.start + args.count).map(move |index| {
        packet_ingest_protocol::client::publish_request(&sha256_frame(
            Channel(channel),
            payload(channel, index, size),
        ))
    });
    let mut request = Request::new(requests);
    if let Some(path) = &args.token_file {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let token = text
            .lines()
            .map(str::trim)
            .find(|line| !line.is_empty() && !line.starts_with('#'))
            .ok_or_else(|| format!("{}: no token in the file", path.display()))?;
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| format!("{}: the token is not valid header text", path.display()))?;
        request.metadata_mut().insert("authorization", value);
    }
    let response = client
        .publish(request)
        .await
        .map_err(|status| format!("{:?}: {}", status.code(), status.message()))?
        .into_inner();
    Ok(serde_json::json!({
        "accepted": response.accepted,
        "rejected": response.rejected,
        "last_sequence": response.last_sequence,
    }))
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let started = Instant::now();
    let outcome = match args.via {
        Via::Tcp => send_tcp(&args).await,
        Via::Publish => publish(&args).await,
    };
    match outcome {
        Ok(mut summary) => {
            summary["seconds"] = started.elapsed().as_secs_f64().into();
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("rust_producer: {message}");
            ExitCode::FAILURE
        }
    }
}
