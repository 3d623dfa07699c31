//! Bytes on the wire: a TCP connector for tonic whose connections count what
//! they read from the kernel, so the bench can report the bytes a subscriber
//! received per packet (compressed or not, HTTP/2 and TLS framing included).
//!
//! tonic applies TLS on top of a custom connector, so the count is of the
//! bytes as they crossed the socket. Only reads are counted: a subscriber
//! writes a request and window updates, which are not what compression changes.

use std::{
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
};

use http::Uri;
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tonic::transport::{Channel, Endpoint};

/// Connects through `endpoint`, adding every byte read on the connection to `received`.
pub(crate) async fn connect(
    endpoint: &Endpoint,
    received: Arc<AtomicU64>,
) -> Result<Channel, tonic::transport::Error> {
    let connector = tower::service_fn(move |uri: Uri| {
        let received = Arc::clone(&received);
        async move {
            let host = uri.host().unwrap_or("127.0.0.1");
            // A bracketed IPv6 literal arrives with its brackets.
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
                Some("https") => 443,
                _ => 80,
            });
            let stream = TcpStream::connect((host, port)).await?;
            stream.set_nodelay(true)?;
            Ok::<_, io::Error>(TokioIo::new(CountingStream { stream, received }))
        }
    });
    endpoint.connect_with_connector(connector).await
}

/// A TCP stream that adds the bytes it reads to a shared counter.
struct CountingStream {
    stream: TcpStream,
    received: Arc<AtomicU64>,
}

impl AsyncRead for CountingStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            self.received.fetch_add(read as u64, Ordering::Relaxed);
        }
        polled
    }
}

impl AsyncWrite for CountingStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn counts_every_byte_read_and_none_written() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.expect("accept");
            socket.write_all(&[7; 100_000]).await.expect("write");
            let mut sink = Vec::new();
            socket.read_to_end(&mut sink).await.expect("read");
            sink.len()
        });
        let received = Arc::new(AtomicU64::new(0));
        let mut stream = CountingStream {
            stream: TcpStream::connect(addr).await.expect("connect"),
            received: Arc::clone(&received),
        };
        stream.write_all(&[1; 5000]).await.expect("write");
        let mut got = vec![0; 100_000];
        stream.read_exact(&mut got).await.expect("read");
        stream.shutdown().await.expect("shutdown");
        assert_eq!(server.await.expect("server"), 5000);
        assert_eq!(received.load(Ordering::Relaxed), 100_000);
    }
}
