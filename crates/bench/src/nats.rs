//! A minimal NATS protocol client (`--nats-client raw`): PUB, SUB, MSG, PING/PONG
//! over one TCP connection, nothing else.
//!
//! Why it exists: the comparison with nats-server is only fair if the load
//! client is as cheap on the NATS side as on ours. async-nats hands every
//! message through a channel to a connection task and allocates a `Message`
//! per delivery, which at small payloads caps what one client reaches well
//! below what the server can do (and turns client slowness into "slow
//! consumer" losses). This client writes pre-built blocks of `PUB` commands
//! with large writes, like the TCP ingest producer, and parses `MSG` lines in
//! its read buffer, like the gRPC subscriber. It speaks the documented text
//! protocol (<https://docs.nats.io/reference/reference-protocols/nats-protocol>)
//! and needs no options: no TLS, no auth, no headers.

use std::{
    sync::{atomic::Ordering, Arc, Mutex},
    time::Instant,
};

use bytes::{Buf, BufMut, BytesMut};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use super::{
    produce::{put_payload, unix_nanos_now, Limit, Pacer, ProducerReport, BLOCK_BYTES},
    receive::{finish_check, lock, SubStats, TICK},
    BenchArgs, Plan, Shared,
};
use packet_ingest_protocol::client::ToolError;

const READ_CHUNK: usize = 256 << 10;

/// `nats://host:port` (or `host:port`) to `host:port`.
fn address(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    rest.trim_end_matches('/')
}

/// An open connection that has sent CONNECT and seen the server's INFO.
pub(crate) struct RawNats {
    stream: TcpStream,
    buf: BytesMut,
}

impl RawNats {
    pub async fn connect(url: &str) -> Result<Self, ToolError> {
        let addr = address(url);
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|error| format!("cannot connect to NATS at {addr}: {error}"))?;
        stream.set_nodelay(true)?;
        let mut nats = RawNats {
            stream,
            buf: BytesMut::with_capacity(READ_CHUNK),
        };
        let info = nats.read_line().await?;
        if !info.starts_with("INFO ") {
            return Err(format!("{addr} is not a NATS server (it said {info:?})").into());
        }
        // echo false: a connection never receives its own publishes.
        nats.stream
            .write_all(
                b"CONNECT {\"verbose\":false,\"pedantic\":false,\"echo\":false,\
                  \"name\":\"packet-ingest-bench\",\"lang\":\"rust\",\"version\":\"0\",\
                  \"protocol\":1}\r\n",
            )
            .await?;
        Ok(nats)
    }

    async fn read_line(&mut self) -> Result<String, ToolError> {
        loop {
            if let Some(end) = self.buf.iter().position(|&byte| byte == b'\n') {
                let line = self.buf.split_to(end + 1);
                return Ok(String::from_utf8_lossy(&line).trim_end().to_owned());
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err("NATS server closed the connection".into());
            }
        }
    }

    /// PING and wait for the PONG: the server has processed everything sent
    /// before it (a flush, and proof a SUB is in place).
    async fn round_trip(&mut self) -> Result<(), ToolError> {
        self.stream.write_all(b"PING\r\n").await?;
        loop {
            let line = self.read_line().await?;
            match line.as_str() {
                "PONG" => return Ok(()),
                "PING" => self.stream.write_all(b"PONG\r\n").await?,
                error if error.starts_with("-ERR") => {
                    return Err(format!("NATS server: {error}").into())
                }
                _ => {}
            }
        }
    }
}

/// Publishes to `bench.<index>`: blocks of pre-built PUB commands whose
/// payload index is rewritten in place before each write (NATS has no
/// sequence of its own, so gaps are found from it).
pub(crate) async fn produce(
    index: usize,
    mut nats: RawNats,
    plan: &Plan,
    shared: &Shared,
    limit: Limit,
    pacer: Option<Pacer>,
) -> Result<ProducerReport, ToolError> {
    let header = format!("PUB bench.{index} {}\r\n", plan.size);
    let message_len = header.len() + plan.size + 2;
    let index_at = header.len() + 8;
    let counter = &shared.sent[index];
    let mut sent = 0u64;
    let frames = (BLOCK_BYTES / message_len).max(1) as u64;
    let frames = plan.count.map_or(frames, |count| frames.min(count.max(1)));
    let mut block = BytesMut::with_capacity(frames as usize * message_len);
    let put_message = |block: &mut BytesMut, stamp: u64, packet: u64| {
        block.put_slice(header.as_bytes());
        put_payload(block, plan.size, plan.content, index as u32, stamp, packet);
        block.put_slice(b"\r\n");
    };
    match pacer {
        None => {
            for packet in 0..frames {
                put_message(&mut block, 0, packet);
            }
            while limit.allows(sent) {
                let n = limit.remaining(sent).min(frames);
                for position in 0..n {
                    let at = position as usize * message_len + index_at;
                    block[at..at + 8].copy_from_slice(&(sent + position).to_be_bytes());
                }
                nats.stream
                    .write_all(&block[..n as usize * message_len])
                    .await?;
                sent += n;
                counter.store(sent, Ordering::Relaxed);
            }
        }
        Some(pacer) => {
            while limit.allows(sent) {
                let due = pacer
                    .due(Instant::now())
                    .min(sent.saturating_add(limit.remaining(sent)))
                    .min(sent + frames);
                if due <= sent {
                    tokio::time::sleep_until(pacer.time_of(sent).into()).await;
                    continue;
                }
                let stamp = unix_nanos_now();
                for packet in sent..due {
                    put_message(&mut block, stamp, packet);
                }
                nats.stream.write_all(&block).await?;
                block.clear();
                sent = due;
                counter.store(sent, Ordering::Relaxed);
            }
        }
    }
    nats.round_trip().await?;
    Ok(ProducerReport {
        sent,
        ..ProducerReport::default()
    })
}

/// What the parser found at the front of the buffer.
enum Parsed {
    /// A MSG of `len` bytes on the wire (header, payload and trailing CRLF).
    Message {
        len: usize,
    },
    /// Another protocol line of `len` bytes.
    Line {
        len: usize,
        ping: bool,
    },
    Incomplete,
}

/// Parses one protocol item at the front of `buf`, calling `on_message` with
/// (subject, payload) for a MSG.
fn parse_one(buf: &[u8], mut on_message: impl FnMut(&[u8], &[u8])) -> Result<Parsed, String> {
    let Some(newline) = buf.iter().position(|&byte| byte == b'\n') else {
        return Ok(Parsed::Incomplete);
    };
    let line = buf[..newline]
        .strip_suffix(b"\r")
        .unwrap_or(&buf[..newline]);
    if let Some(rest) = line.strip_prefix(b"MSG ") {
        // MSG <subject> <sid> [reply-to] <#bytes>
        let mut tokens = rest.split(|&byte| byte == b' ').filter(|t| !t.is_empty());
        let subject = tokens.next().ok_or("MSG without a subject")?;
        let size = tokens
            .next_back()
            .and_then(|size| std::str::from_utf8(size).ok()?.parse::<usize>().ok())
            .ok_or("MSG without a size")?;
        let start = newline + 1;
        if buf.len() < start + size + 2 {
            return Ok(Parsed::Incomplete);
        }
        on_message(subject, &buf[start..start + size]);
        return Ok(Parsed::Message {
            len: start + size + 2,
        });
    }
    if line.starts_with(b"-ERR") {
        return Err(format!(
            "NATS server: {}",
            String::from_utf8_lossy(line).trim_end()
        ));
    }
    Ok(Parsed::Line {
        len: newline + 1,
        ping: line == b"PING",
    })
}

/// Producer index from a `bench.<index>` subject.
fn producer_of(subject: &[u8]) -> Option<usize> {
    std::str::from_utf8(subject.strip_prefix(b"bench.")?)
        .ok()?
        .parse()
        .ok()
}

/// Handles every complete item in `buf`; returns the subscriber's
/// `accounted()` and whether the server sent a PING.
fn consume(buf: &mut BytesMut, stats: &Mutex<SubStats>) -> Result<(u64, bool), String> {
    let now = unix_nanos_now();
    let mut stats = lock(stats);
    let mut consumed = 0;
    let mut ping = false;
    loop {
        let parsed = parse_one(&buf[consumed..], |subject, payload| {
            match (producer_of(subject), payload.len() >= super::MIN_PAYLOAD) {
                (Some(producer), true) => {
                    let mut index = [0u8; 8];
                    index.copy_from_slice(&payload[8..16]);
                    stats.record(producer, u64::from_be_bytes(index), payload, now);
                }
                _ => stats.foreign += 1,
            }
        })?;
        match parsed {
            Parsed::Message { len } => consumed += len,
            Parsed::Line { len, ping: is_ping } => {
                consumed += len;
                ping |= is_ping;
            }
            Parsed::Incomplete => break,
        }
    }
    buf.advance(consumed);
    stats.responses += 1;
    stats.last_at = Some(Instant::now());
    Ok((stats.accounted(), ping))
}

pub(crate) async fn subscribe(
    args: &BenchArgs,
    shared: &Shared,
    stats: Arc<Mutex<SubStats>>,
    ready: tokio::sync::oneshot::Sender<()>,
) -> Result<(), String> {
    let mut nats = RawNats::connect(&args.nats_url)
        .await
        .map_err(|error| error.to_string())?;
    nats.stream
        .write_all(b"SUB bench.> 1\r\n")
        .await
        .map_err(|error| error.to_string())?;
    nats.round_trip().await.map_err(|error| error.to_string())?;
    let _ = ready.send(());
    let RawNats {
        mut stream,
        mut buf,
    } = nats;
    let mut accounted = 0;
    loop {
        let last_at = lock(&stats).last_at;
        if finish_check(shared, accounted, last_at, args.drain_timeout) {
            return Ok(());
        }
        buf.reserve(READ_CHUNK);
        match tokio::time::timeout(TICK, stream.read_buf(&mut buf)).await {
            Err(_) => continue,
            Ok(Err(error)) => return Err(format!("NATS connection failed: {error}")),
            Ok(Ok(0)) => return Err("NATS server closed the connection".to_owned()),
            Ok(Ok(_)) => {}
        }
        let (now_accounted, ping) = consume(&mut buf, &stats)?;
        accounted = now_accounted;
        if ping {
            stream
                .write_all(b"PONG\r\n")
                .await
                .map_err(|error| error.to_string())?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_messages_lines_and_partial_input() {
        let wire = b"MSG bench.3 1 5\r\nhello\r\nPING\r\nMSG bench.0 1 _INBOX.x 2\r\nhi\r\nMSG bench.1 1 9\r\nabc";
        let mut seen = Vec::new();
        let mut at = 0;
        let mut record =
            |subject: &[u8], payload: &[u8]| seen.push((producer_of(subject), payload.to_vec()));
        while let Parsed::Message { len } | Parsed::Line { len, .. } =
            parse_one(&wire[at..], &mut record).expect("valid")
        {
            at += len;
        }
        assert_eq!(
            seen,
            vec![(Some(3), b"hello".to_vec()), (Some(0), b"hi".to_vec())]
        );
        assert_eq!(&wire[at..], b"MSG bench.1 1 9\r\nabc");
        assert!(parse_one(b"-ERR 'Slow Consumer'\r\n", |_, _| {}).is_err());
        assert_eq!(address("nats://127.0.0.1:4222/"), "127.0.0.1:4222");
        assert_eq!(producer_of(b"other.1"), None);
    }
}
