//! Which service answers which path, and what stands in front of each.
//!
//! In front of everything: gRPC-Web (tonic-web translates `application/grpc-web`
//! calls, over HTTP/1.1 or HTTP/2, into ordinary gRPC calls on the same routes,
//! so browsers get the same auth and limits), and CORS for the origins
//! `--cors-origin` names (none by default: no browser page may call us).
//!
//! Health and reflection answer whatever other clients do (SPEC §8): they sit
//! behind no auth, no concurrency limit and no load shedding, so a kubelet
//! probe or `grpcurl list` works while `Packets` is saturated. `Packets` sits
//! behind bearer-token auth, the global concurrency limit (with load shedding:
//! `RESOURCE_EXHAUSTED` instead of queueing) and the unary deadline. Every
//! error a layer returns becomes a gRPC status response here.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use http::{HeaderName, HeaderValue, Method};
use tonic::{body::Body, Status};
use tower::{util::BoxCloneSyncService, BoxError, Layer, Service, ServiceBuilder, ServiceExt};
use tower_http::cors::{AllowOrigin, CorsLayer};

use super::{PacketsService, STREAM_ID_HEADER};
use crate::{auth::AuthLayer, limits::UnaryTimeoutLayer};

type Route = BoxCloneSyncService<http::Request<Body>, http::Response<Body>, Infallible>;
/// What the gRPC port serves: the routes behind gRPC-Web and CORS.
pub type PortService = Route;
type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The `Packets` methods, dispatched by path.
#[derive(Clone)]
struct PacketsMethods(Arc<PacketsService>);

impl Service<http::Request<Body>> for PacketsMethods {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let service = Arc::clone(&self.0);
        Box::pin(async move {
            let method = request
                .uri()
                .path()
                .strip_prefix(PACKETS_PREFIX)
                .unwrap_or_default()
                .to_owned();
            Ok(match method.as_str() {
                "Subscribe" => service.subscribe(request).await,
                "Publish" => service.publish(request).await,
                "StreamInfo" => service.stream_info(request).await,
                "PublishBatch" => service.publish_batch(request).await,
                _ => Status::unimplemented(format!(
                    "no method {method:?} in packetingest.v1.Packets"
                ))
                .into_http(),
            })
        })
    }
}

const PACKETS_PREFIX: &str = "/packetingest.v1.Packets/";
/// Request metadata (headers) one call may carry.
pub const MAX_METADATA: usize = 64 * 1024;
const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";
const REFLECTION_V1_PREFIX: &str = "/grpc.reflection.v1.ServerReflection/";
const REFLECTION_V1ALPHA_PREFIX: &str = "/grpc.reflection.v1alpha.ServerReflection/";

/// Turns the errors of the layers in front of `Packets` into gRPC statuses.
#[derive(Clone)]
struct StatusOnError<S>(S);

impl<S> Service<http::Request<Body>> for StatusOnError<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Send,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // A layer that is not ready (load shed) answers through `call`'s error.
        match self.0.poll_ready(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(_) => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let response = self.0.call(request);
        Box::pin(async move {
            Ok(match response.await {
                Ok(response) => response,
                Err(error) => status_for(error.into()).into_http(),
            })
        })
    }
}

fn status_for(error: BoxError) -> Status {
    if error.is::<tower::load_shed::error::Overloaded>() {
        return Status::resource_exhausted(
            "the server is at its concurrency limit (--concurrency-limit); retry with backoff",
        );
    }
    match error.downcast::<Status>() {
        Ok(status) => *status,
        Err(error) => Status::unavailable(format!("request failed: {error}")),
    }
}

/// Everything the `Packets` layers need.
pub struct PacketsLimits {
    pub auth: AuthLayer,
    pub concurrency_limit: usize,
    pub load_shed: bool,
    pub unary_timeout: Duration,
}

/// The gRPC port's router.
#[derive(Clone)]
pub struct GrpcRoutes {
    packets: Route,
    health: Route,
    reflection_v1: Route,
    reflection_v1alpha: Route,
}

impl GrpcRoutes {
    pub fn new(
        packets: Arc<PacketsService>,
        limits: PacketsLimits,
        health: Route,
        reflection_v1: Route,
        reflection_v1alpha: Route,
    ) -> Self {
        let layered = ServiceBuilder::new()
            .layer(limits.auth)
            .option_layer(limits.load_shed.then(tower::load_shed::LoadShedLayer::new))
            .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
                limits.concurrency_limit,
            ))
            .layer(UnaryTimeoutLayer::new(limits.unary_timeout))
            .service(PacketsMethods(packets));
        GrpcRoutes {
            packets: BoxCloneSyncService::new(StatusOnError(layered)),
            health,
            reflection_v1,
            reflection_v1alpha,
        }
    }

    /// The port's service: gRPC-Web translation in front of the routes, and
    /// CORS in front of that when `cors_origins` names any.
    pub fn into_service(self, cors_origins: &[String]) -> PortService {
        let grpc_web = tonic_web::GrpcWebLayer::new().layer(self);
        match cors(cors_origins) {
            None => BoxCloneSyncService::new(grpc_web),
            Some(cors) => BoxCloneSyncService::new(cors.layer(grpc_web)),
        }
    }

    /// Wraps a tonic-generated service as a route.
    pub fn route<S>(service: S) -> Route
    where
        S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        BoxCloneSyncService::new(service)
    }
}

/// CORS for gRPC-Web callers: the headers a gRPC-Web client sends (and our
/// bearer token and stream id), and the ones its code must read back.
fn cors(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow_origin = if origins.iter().any(|origin| origin == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            origins
                .iter()
                .filter_map(|origin| HeaderValue::from_str(origin).ok()),
        )
    };
    let header = HeaderName::from_static;
    Some(
        CorsLayer::new()
            .allow_origin(allow_origin)
            .allow_methods([Method::POST])
            .allow_headers([
                header("content-type"),
                header("x-grpc-web"),
                header("x-user-agent"),
                header("grpc-timeout"),
                header("authorization"),
                header(STREAM_ID_HEADER),
            ])
            .expose_headers([
                header("grpc-status"),
                header("grpc-message"),
                header("grpc-status-details-bin"),
                header(STREAM_ID_HEADER),
            ])
            .max_age(Duration::from_secs(600)),
    )
}

impl Service<http::Request<Body>> for GrpcRoutes {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let metadata: usize = request
            .headers()
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len())
            .sum();
        if metadata > MAX_METADATA {
            let status = Status::invalid_argument(format!(
                "request metadata of {metadata} bytes is over this server's limit of {MAX_METADATA} bytes"
            ));
            return Box::pin(async move { Ok(status.into_http()) });
        }
        let path = request.uri().path();
        let route = if path.starts_with(PACKETS_PREFIX) {
            self.packets.clone()
        } else if path.starts_with(HEALTH_PREFIX) {
            self.health.clone()
        } else if path.starts_with(REFLECTION_V1_PREFIX) {
            self.reflection_v1.clone()
        } else if path.starts_with(REFLECTION_V1ALPHA_PREFIX) {
            self.reflection_v1alpha.clone()
        } else {
            let status = Status::unimplemented(format!("no service at {path}"));
            return Box::pin(async move { Ok(status.into_http()) });
        };
        Box::pin(route.oneshot(request))
    }
}
