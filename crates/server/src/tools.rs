//! The helper subcommands a person debugs with: `send` (frame and send data to
//! the ingest port), `tail` (subscribe and print), `health` (exit 0 if SERVING).

use std::{
    io::{Read, Write},
    net::SocketAddr,
    path::PathBuf,
};

use bytes::{Bytes, BytesMut};
use clap::{Args, ValueEnum};
use tokio::io::AsyncWriteExt;

use packet_ingest_protocol::{
    ack::{Ack, ACK_LEN},
    client::{
        grpc_channel, make_frame_with, packet_json, tls_connector, BearerToken, TlsClientArgs,
        ToolError, STREAM_ID_HEADER,
    },
    frame::{Channel, FLAG_ACK},
    pb::{packets_client::PacketsClient, Packet, SubscribeRequest},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Split {
    /// One packet per line (newline removed).
    Line,
    /// Fixed-size packets of --chunk-size bytes (the last may be shorter).
    Size,
}

#[derive(Debug, Args)]
pub struct SendArgs {
    /// Ingest address to connect to.
    #[arg(long, default_value = "127.0.0.1:7000")]
    pub addr: SocketAddr,
    /// Channel of every packet sent.
    #[arg(long, default_value_t = 0)]
    pub channel: u32,
    /// How the input is cut into packets.
    #[arg(long, value_enum, default_value_t = Split::Line)]
    pub split: Split,
    /// Packet size for --split size.
    #[arg(long, default_value_t = 1024)]
    pub chunk_size: usize,
    /// Sign packets with HMAC-SHA256 using this key file (one trailing line ending removed).
    #[arg(long)]
    pub hmac_key_file: Option<PathBuf>,
    /// Ask for acknowledgements and wait for them: exit 0 only if every
    /// packet was accepted and made durable, 1 if any was rejected or is
    /// still unacknowledged after --ack-timeout.
    #[arg(long)]
    pub ack: bool,
    /// How long --ack waits for the last acknowledgement.
    #[arg(long, default_value = "30s", value_parser = packet_ingest_protocol::units::parse_duration)]
    pub ack_timeout: std::time::Duration,
    #[command(flatten)]
    pub tls: TlsClientArgs,
    /// Input file; stdin when absent.
    pub file: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TailFormat {
    /// One JSON object per packet.
    Json,
    /// A header line and a hexdump per packet.
    Hex,
}

#[derive(Debug, Args)]
pub struct TailArgs {
    /// gRPC endpoint.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub addr: String,
    /// Only these channels (repeat the flag); all when absent.
    #[arg(long = "channel")]
    pub channels: Vec<u32>,
    /// Replay retained packets from this sequence, then follow live.
    #[arg(long = "from")]
    pub from_sequence: Option<u64>,
    #[arg(long, value_enum, default_value_t = TailFormat::Json)]
    pub format: TailFormat,
    /// Exit after this many packets.
    #[arg(long)]
    pub count: Option<u64>,
    /// The stream_id printed by an earlier tail: resume only within that
    /// stream (the server refuses with FAILED_PRECONDITION if it changed).
    #[arg(long)]
    pub stream_id: Option<String>,
    /// Bearer token for a server started with --auth-token-file.
    #[arg(long, env = "PACKET_INGEST_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    #[command(flatten)]
    pub tls: TlsClientArgs,
}

#[derive(Debug, Args)]
pub struct HealthArgs {
    /// gRPC address, with or without http://.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub addr: String,
    /// Service name to check; "" is the whole server.
    #[arg(long, default_value = "")]
    pub service: String,
    #[command(flatten)]
    pub tls: TlsClientArgs,
}

/// Cuts `input` into payloads as `split` says.
pub fn split_input(input: &[u8], split: Split, chunk_size: usize) -> Vec<Bytes> {
    let input = Bytes::copy_from_slice(input);
    match split {
        Split::Line => {
            let mut out = Vec::new();
            let mut start = 0;
            for (index, byte) in input.iter().enumerate() {
                if *byte == b'\n' {
                    out.push(input.slice(start..index));
                    start = index + 1;
                }
            }
            if start < input.len() {
                out.push(input.slice(start..));
            }
            out
        }
        Split::Size => (0..input.len())
            .step_by(chunk_size.max(1))
            .map(|start| input.slice(start..(start + chunk_size.max(1)).min(input.len())))
            .collect(),
    }
}

pub async fn send(args: SendArgs) -> Result<(), ToolError> {
    let mut input = Vec::new();
    match &args.file {
        Some(path) => input = std::fs::read(path)?,
        None => {
            std::io::stdin().read_to_end(&mut input)?;
        }
    }
    let key = match &args.hmac_key_file {
        Some(path) => Some(packet_ingest_protocol::keyfile::read_key_file(path)?),
        None => None,
    };
    let payloads = split_input(&input, args.split, args.chunk_size);
    let flags = if args.ack { FLAG_ACK } else { 0 };
    let mut wire = BytesMut::new();
    for payload in &payloads {
        make_frame_with(
            Channel(args.channel),
            payload.clone(),
            key.as_deref(),
            flags,
        )
        .encode(&mut wire);
    }
    let stream = tokio::net::TcpStream::connect(args.addr).await?;
    let acked = match &args.tls.ca_cert {
        None => exchange(stream, &wire, payloads.len() as u64, &args).await?,
        Some(_) => {
            let server_name = args
                .tls
                .server_name
                .clone()
                .unwrap_or_else(|| args.addr.ip().to_string());
            let stream = tls_connector(&args.tls)?
                .connect(rustls_pki_types::ServerName::try_from(server_name)?, stream)
                .await?;
            exchange(stream, &wire, payloads.len() as u64, &args).await?
        }
    };
    eprintln!(
        "sent {} packets ({} bytes) to {}",
        payloads.len(),
        wire.len(),
        args.addr
    );
    let Some(ack) = acked else {
        return Ok(());
    };
    let sent = payloads.len() as u64;
    eprintln!(
        "acknowledged {} of {sent} packets: last sequence {}, {} rejected",
        ack.settled, ack.last_sequence, ack.rejected
    );
    if ack.settled < sent {
        return Err(format!("{} packets were not acknowledged", sent - ack.settled).into());
    }
    if ack.rejected > 0 {
        return Err(format!("{} packets were rejected", ack.rejected).into());
    }
    Ok(())
}

/// Writes the frames and closes the write side; with `--ack`, then reads
/// acknowledgements until all are settled, the server closes, or the timeout.
async fn exchange<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut stream: S,
    bytes: &[u8],
    frames: u64,
    args: &SendArgs,
) -> Result<Option<Ack>, ToolError> {
    use tokio::io::AsyncReadExt;
    stream.write_all(bytes).await?;
    stream.shutdown().await?;
    if !args.ack {
        return Ok(None);
    }
    let mut last = Ack::default();
    let read = async {
        let mut record = [0u8; ACK_LEN];
        while last.settled < frames {
            if stream.read_exact(&mut record).await.is_err() {
                break; // the server closed the connection
            }
            last = Ack::decode(&record)
                .ok_or("the server sent something that is not an acknowledgement")?;
        }
        Ok::<(), ToolError>(())
    };
    match tokio::time::timeout(args.ack_timeout, read).await {
        Ok(outcome) => outcome?,
        Err(_) => eprintln!("no further acknowledgement within {:?}", args.ack_timeout),
    }
    Ok(Some(last))
}

pub async fn tail(args: TailArgs) -> Result<(), ToolError> {
    let channel = grpc_channel(&args.addr, &args.tls).await?;
    let mut client =
        PacketsClient::with_interceptor(channel, BearerToken::new(args.token.as_deref())?)
            .max_decoding_message_size(usize::MAX);
    let response = client
        .subscribe(SubscribeRequest {
            channels: args.channels.clone(),
            from_sequence: args.from_sequence,
            stream_id: args.stream_id.clone().unwrap_or_default(),
        })
        .await?;
    let stream_id = response
        .metadata()
        .get(STREAM_ID_HEADER)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let mut stream = response.into_inner();
    let mut seen = 0u64;
    let stdout = std::io::stdout();
    // First line: the stream to resume in (`--from SEQ --stream-id ID`).
    let announce = serde_json::json!({ "stream_id": stream_id });
    match args.format {
        TailFormat::Json => writeln!(stdout.lock(), "{announce}")?,
        TailFormat::Hex => eprintln!("{announce}"),
    }
    while let Some(response) = stream.message().await? {
        let mut out = stdout.lock();
        if response.missed > 0 {
            writeln!(out, "{}", serde_json::json!({ "missed": response.missed }))?;
        }
        for packet in &response.packets {
            match args.format {
                TailFormat::Json => writeln!(out, "{}", packet_json(packet))?,
                TailFormat::Hex => write_hexdump(&mut out, packet)?,
            }
            seen += 1;
            if args.count.is_some_and(|count| seen >= count) {
                return Ok(());
            }
        }
        out.flush()?;
    }
    Ok(())
}

fn write_hexdump(out: &mut impl Write, packet: &Packet) -> std::io::Result<()> {
    writeln!(
        out,
        "#{} channel={} source={} source_sequence={} len={}",
        packet.sequence,
        packet.channel,
        packet.source,
        packet.source_sequence,
        packet.payload.len()
    )?;
    for (row, chunk) in packet.payload.chunks(16).enumerate() {
        let hex: Vec<String> = chunk.iter().map(|byte| format!("{byte:02x}")).collect();
        let text: String = chunk
            .iter()
            .map(|&byte| match byte.is_ascii_graphic() || byte == b' ' {
                true => byte as char,
                false => '.',
            })
            .collect();
        writeln!(out, "  {:08x}  {:<48} |{}|", row * 16, hex.join(" "), text)?;
    }
    Ok(())
}

pub async fn health(args: HealthArgs) -> Result<bool, ToolError> {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let channel = grpc_channel(&args.addr, &args.tls).await?;
    let response = HealthClient::new(channel)
        .check({
            let mut request = tonic::Request::new(HealthCheckRequest {
                service: args.service,
            });
            request.set_timeout(std::time::Duration::from_secs(5));
            request
        })
        .await?
        .into_inner();
    let serving =
        response.status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    println!("{}", if serving { "SERVING" } else { "NOT_SERVING" });
    Ok(serving)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_by_line_and_by_size() {
        let lines = split_input(b"a\nbb\n\nccc", Split::Line, 0);
        assert_eq!(lines, vec![&b"a"[..], b"bb", b"", b"ccc"]);
        let chunks = split_input(b"abcdefg", Split::Size, 3);
        assert_eq!(chunks, vec![&b"abc"[..], b"def", b"g"]);
    }
}
