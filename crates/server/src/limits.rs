//! Tower middleware of our own for the gRPC server: a deadline for unary RPCs.
//!
//! tonic's `Server::timeout` bounds the future that produces the response,
//! which for a client-streaming `Publish` is the whole upload; so it would cut
//! long-lived producers. This layer applies the deadline only to the unary
//! methods we serve, and answers `DEADLINE_EXCEEDED` as a proper gRPC status.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tonic::Status;
use tower::{BoxError, Layer, Service};

/// Unary methods this server exposes; every other route is a stream.
const UNARY_PATHS: &[&str] = &[
    "/grpc.health.v1.Health/Check",
    "/packetingest.v1.Packets/StreamInfo",
    "/packetingest.v1.Packets/PublishBatch",
];

#[derive(Clone, Copy, Debug)]
pub struct UnaryTimeoutLayer {
    timeout: Duration,
}

impl UnaryTimeoutLayer {
    pub fn new(timeout: Duration) -> Self {
        UnaryTimeoutLayer { timeout }
    }
}

impl<S> Layer<S> for UnaryTimeoutLayer {
    type Service = UnaryTimeout<S>;

    fn layer(&self, inner: S) -> UnaryTimeout<S> {
        UnaryTimeout {
            inner,
            timeout: self.timeout,
        }
    }
}

#[derive(Clone, Debug)]
pub struct UnaryTimeout<S> {
    inner: S,
    timeout: Duration,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, ResBody> Service<http::Request<B>> for UnaryTimeout<S>
where
    S: Service<http::Request<B>, Response = http::Response<ResBody>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    ResBody: Default,
{
    type Response = http::Response<ResBody>;
    type Error = BoxError;
    type Future = BoxFuture<Result<Self::Response, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let unary = UNARY_PATHS.contains(&request.uri().path());
        let response = self.inner.call(request);
        let timeout = self.timeout;
        Box::pin(async move {
            if !unary {
                return response.await.map_err(Into::into);
            }
            match tokio::time::timeout(timeout, response).await {
                Ok(result) => result.map_err(Into::into),
                Err(_) => Ok(Status::deadline_exceeded(format!(
                    "request took longer than {timeout:?} (--request-timeout)"
                ))
                .into_http()),
            }
        })
    }
}
