//! The gRPC port's connections, served with hyper directly.
//!
//! tonic's built-in server accepts without a cap, spins on accept errors and
//! gives a connection forever to send its HTTP/2 preface. Here each connection
//! takes a slot first (`--max-grpc-connections`; when all are taken the one
//! idle longest, with no call in progress, gives way), must finish TLS and
//! send its first request bytes (the HTTP/2 preface, or an HTTP/1.1 request
//! line for gRPC-Web) within `--grpc-handshake-timeout`, and runs with
//! explicit HTTP/2 limits (streams per connection, windows, send buffer,
//! header size, keepalive). HTTP/1.1 is there for gRPC-Web from browsers,
//! which cannot speak HTTP/2 without TLS: each of its requests must send its
//! headers within the same timeout, and they are capped like HTTP/2's. Every request carries the peer address (tonic's
//! `TcpConnectInfo`, so `Request::remote_addr` works) and the connection's
//! `Activity`, through which a call keeps the connection from being evicted
//! and through which the hub can close it.
//!
//! A connection that ends closes *lingering*: the socket's write side is
//! shut, and what the client still sends (HTTP/2 window updates for the last
//! response, pings) is read and dropped for a moment before the socket is
//! closed. Closing with unread bytes makes the kernel answer with a reset,
//! and a reset makes the client drop what it had received but not yet read:
//! the end of the last stream (at shutdown, the last packets and the
//! `UNAVAILABLE` status).

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    time::{Instant, Sleep},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::{body::Body, transport::server::TcpConnectInfo};
use tower::ServiceExt;
use tracing::Instrument;

use super::routes::PortService;
use crate::{
    connections::{Acceptor, Activity, BusyGuard, ConnectionSlots},
    metrics::Metrics,
};

/// The client's connection preface: "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
/// (an HTTP/1.1 request is longer than this before its headers end).
const PREFACE_LEN: usize = 24;

/// HTTP/2 and connection limits of the gRPC port.
#[derive(Clone)]
pub struct TransportConfig {
    pub handshake_timeout: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    pub max_streams_per_connection: u32,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
}

/// Per-stream receive window: what a client may send before we read it.
/// As large as the connection's, so a producer's one Publish stream can use
/// the whole of it: at 256 KiB a Publish upload of 1 KiB packets stalled on
/// window updates (median of alternating runs: 495 k pkts/s against 626 k
/// with 1 MiB), and what one connection can park unread stays 1 MiB.
const STREAM_WINDOW: u32 = 1024 * 1024;
/// Per-connection receive window, shared by its streams.
const CONNECTION_WINDOW: u32 = 1024 * 1024;
/// Largest HTTP/2 frame a client may send (RFC 9113 default: 16 KiB).
/// Publish uploads arrive in fewer, larger DATA frames, so more packets go
/// to the verify pool per hand-off; a partial frame pins at most this much
/// per connection.
const MAX_FRAME: u32 = 64 * 1024;
/// Response bytes queued per stream beyond what the client's window takes.
const SEND_BUFFER: usize = 256 * 1024;
/// Request headers HTTP/2 takes at all (beyond: HTTP 431); the routes
/// refuse more than `routes::MAX_METADATA` with `INVALID_ARGUMENT`.
const MAX_HEADER_LIST: u32 = 256 * 1024;

/// Serves until `stop` fires: then stops accepting, sends every connection
/// GOAWAY (calls in progress finish) and waits for them; `abort` closes
/// whatever is still open.
pub async fn serve(
    listener: TcpListener,
    slots: Arc<ConnectionSlots>,
    config: TransportConfig,
    routes: PortService,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
    abort: CancellationToken,
) {
    let local = listener.local_addr().ok();
    let mut acceptor = Acceptor::new(listener, "gRPC");
    let connections = TaskTracker::new();
    loop {
        // Accept, then take a slot (see `connections`): nobody is evicted
        // unless a newcomer is waiting.
        let (tcp, peer) = tokio::select! {
            accepted = acceptor.accept() => accepted,
            _ = stop.cancelled() => break,
        };
        let Some(slot) = slots
            .admit(&stop, || {
                metrics.grpc_connections_closed.inc("evicted_idle")
            })
            .await
        else {
            break;
        };
        // Small responses (heartbeats, unary replies) must not wait for Nagle.
        let _ = tcp.set_nodelay(true);
        let connection = Connection {
            peer,
            local,
            activity: Arc::clone(slot.activity()),
            config: config.clone(),
            routes: routes.clone(),
            metrics: Arc::clone(&metrics),
        };
        let (stop, abort) = (stop.clone(), abort.clone());
        connections.spawn(
            async move {
                connection.run(tcp, stop, abort).await;
                drop(slot);
            }
            .instrument(tracing::debug_span!("grpc_connection", peer = %peer)),
        );
    }
    drop(acceptor); // closes the listening socket now, not after the drain
    connections.close();
    connections.wait().await;
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

struct Connection {
    peer: SocketAddr,
    local: Option<SocketAddr>,
    activity: Arc<Activity>,
    config: TransportConfig,
    routes: PortService,
    metrics: Arc<Metrics>,
}

impl Connection {
    async fn run(self, tcp: TcpStream, stop: CancellationToken, abort: CancellationToken) {
        self.metrics.grpc_connections.inc();
        self.metrics.grpc_connections_total.inc();
        let deadline = Instant::now() + self.config.handshake_timeout;
        let io: Box<dyn Io> = match &self.config.tls {
            None => Box::new(tcp),
            Some(tls) => match tokio::time::timeout_at(deadline, tls.accept(tcp)).await {
                Ok(Ok(stream)) => Box::new(stream),
                Ok(Err(error)) => {
                    tracing::debug!(%error, "TLS handshake failed");
                    return self.closed("tls_handshake");
                }
                Err(_) => return self.closed("handshake_timeout"),
            },
        };
        let timed_out = Arc::new(AtomicBool::new(false));
        // The socket comes back here when hyper lets go of it, to close lingering.
        let (give_back, mut given_back) = tokio::sync::oneshot::channel();
        let io = PrefaceDeadline {
            inner: Some(io),
            give_back: Some(give_back),
            deadline: Some(Box::pin(tokio::time::sleep_until(deadline))),
            received: 0,
            timed_out: Arc::clone(&timed_out),
        };
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.config.handshake_timeout)
            .max_buf_size(MAX_HEADER_LIST as usize)
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(self.config.keepalive_interval)
            .keep_alive_timeout(self.config.keepalive_timeout)
            .max_concurrent_streams(self.config.max_streams_per_connection)
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .max_send_buf_size(SEND_BUFFER)
            .max_header_list_size(MAX_HEADER_LIST);
        let connect_info = TcpConnectInfo {
            local_addr: self.local,
            remote_addr: Some(self.peer),
        };
        let (routes, activity) = (self.routes.clone(), Arc::clone(&self.activity));
        let service = hyper::service::service_fn(move |request: http::Request<Incoming>| {
            let mut request = request.map(Body::new);
            request.extensions_mut().insert(connect_info.clone());
            request.extensions_mut().insert(Arc::clone(&activity));
            // The connection is busy (not evictable) until the response ends.
            let busy = activity.busy();
            let response = routes.clone().oneshot(request);
            async move {
                let response = match response.await {
                    Ok(response) => response,
                    Err(never) => match never {},
                };
                Ok::<_, std::convert::Infallible>(response.map(|body| {
                    Body::new(BusyBody {
                        inner: body,
                        _busy: busy,
                    })
                }))
            }
        });
        // Not after an eviction or the grace deadline: those close at once.
        let mut linger_after = true;
        {
            let connection = builder.serve_connection(TokioIo::new(io), service);
            tokio::pin!(connection);
            let mut draining = false;
            loop {
                tokio::select! {
                    served = connection.as_mut() => {
                        if let Err(error) = served {
                            tracing::debug!(%error, "gRPC connection ended with an error");
                        }
                        break;
                    }
                    _ = stop.cancelled(), if !draining => {
                        connection.as_mut().graceful_shutdown();
                        draining = true;
                    }
                    // Evicted at the cap, or its stalled streams hold memory.
                    _ = self.activity.closed() => {
                        linger_after = false;
                        break;
                    }
                    _ = abort.cancelled() => {
                        linger_after = false;
                        break;
                    }
                }
            }
        }
        if let (true, Ok(io)) = (linger_after, given_back.try_recv()) {
            // Still holding its slot; a newcomer at the cap may evict it.
            tokio::select! {
                _ = linger(io) => {}
                _ = self.activity.closed() => {}
                _ = abort.cancelled() => {}
            }
        }
        if timed_out.load(Ordering::Relaxed) {
            self.metrics
                .grpc_connections_closed
                .inc("handshake_timeout");
        }
        self.metrics.grpc_connections.dec();
    }

    fn closed(&self, reason: &'static str) {
        self.metrics.grpc_connections_closed.inc(reason);
        self.metrics.grpc_connections.dec();
    }
}

/// Fails reads once the deadline passes without the client's HTTP/2
/// preface; gives the socket back when dropped, to close lingering (see the
/// module's doc).
struct PrefaceDeadline {
    /// `None` only once dropped.
    inner: Option<Box<dyn Io>>,
    give_back: Option<tokio::sync::oneshot::Sender<Box<dyn Io>>>,
    deadline: Option<Pin<Box<Sleep>>>,
    received: usize,
    timed_out: Arc<AtomicBool>,
}

/// How long a closing connection's late bytes are read and dropped.
const LINGER: Duration = Duration::from_secs(2);

impl PrefaceDeadline {
    fn io(&mut self) -> Pin<&mut Box<dyn Io>> {
        match self.inner.as_mut() {
            Some(io) => Pin::new(io),
            None => unreachable!("the connection is only taken when dropped"),
        }
    }
}

impl Drop for PrefaceDeadline {
    fn drop(&mut self) {
        if let (Some(io), Some(give_back)) = (self.inner.take(), self.give_back.take()) {
            // Nobody to take it (the connection task is gone): it just closes.
            let _ = give_back.send(io);
        }
    }
}

/// Shuts the write side, then reads and drops what still arrives, until the
/// client closes or `LINGER` passes; then the socket is closed.
async fn linger(mut io: Box<dyn Io>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tokio::time::timeout(LINGER, async {
        if io.shutdown().await.is_err() {
            return;
        }
        let mut sink = [0u8; 4096];
        while let Ok(read) = io.read(&mut sink).await {
            if read == 0 {
                break;
            }
        }
    })
    .await;
}

impl AsyncRead for PrefaceDeadline {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(deadline) = self.deadline.as_mut() {
            if deadline.as_mut().poll(cx).is_ready() {
                self.timed_out.store(true, Ordering::Relaxed);
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no HTTP/2 preface within --grpc-handshake-timeout",
                )));
            }
        }
        let before = buf.filled().len();
        let read = self.io().poll_read(cx, buf);
        if read.is_ready() {
            self.received += buf.filled().len() - before;
            if self.received >= PREFACE_LEN {
                self.deadline = None;
            }
        }
        read
    }
}

impl AsyncWrite for PrefaceDeadline {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.io().poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.io().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.as_ref().is_some_and(|io| io.is_write_vectored())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io().poll_shutdown(cx)
    }
}

/// A response body that keeps its connection marked busy until it ends.
struct BusyBody {
    inner: Body,
    _busy: BusyGuard,
}

impl HttpBody for BusyBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<bytes::Bytes>, tonic::Status>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
