//! Bearer-token authentication for every RPC except health, as one tower layer.
//!
//! Tokens come from `--auth-token-file` (one per line, blank lines and `#`
//! comments ignored). The file is re-read when its contents change, so a
//! rotated Kubernetes Secret takes effect without a restart. Tokens are kept
//! only as SHA-256 digests and compared in constant time against every entry.

use std::{
    future::Future,
    path::PathBuf,
    pin::Pin,
    sync::{Arc, RwLock},
    task::{Context, Poll},
    time::Duration,
};

use sha2::{Digest as _, Sha256};
use subtle::{Choice, ConstantTimeEq};
use tonic::Status;
use tower::{BoxError, Layer, Service};

/// How often the token file is checked for changes.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(1);
/// Paths open to anyone: probes must work without credentials.
const PUBLIC_PREFIX: &str = "/grpc.health.v1.Health/";

/// The accepted tokens, as digests.
#[derive(Debug, Default)]
pub struct TokenSet {
    digests: Vec<[u8; 32]>,
}

impl TokenSet {
    pub fn parse(text: &str) -> TokenSet {
        let digests = text
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .map(|token| Sha256::digest(token.as_bytes()).into())
            .collect();
        TokenSet { digests }
    }

    pub fn len(&self) -> usize {
        self.digests.len()
    }

    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// Constant time in the token's contents: every entry is compared.
    pub fn accepts(&self, token: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let matched = self
            .digests
            .iter()
            .fold(Choice::from(0), |found, known| found | known.ct_eq(&digest));
        matched.into()
    }
}

/// The live token set plus the file it comes from.
#[derive(Debug)]
pub struct TokenStore {
    path: PathBuf,
    current: RwLock<(Arc<TokenSet>, [u8; 32])>,
}

impl TokenStore {
    /// Reads the file once; an unreadable file is a configuration error.
    pub fn load(path: PathBuf) -> std::io::Result<Arc<TokenStore>> {
        let text = std::fs::read(&path)?;
        let fingerprint = Sha256::digest(&text).into();
        let tokens = TokenSet::parse(&String::from_utf8_lossy(&text));
        if tokens.is_empty() {
            tracing::warn!(path = %path.display(), "auth token file holds no tokens: every RPC but health is refused");
        }
        Ok(Arc::new(TokenStore {
            path,
            current: RwLock::new((Arc::new(tokens), fingerprint)),
        }))
    }

    pub fn tokens(&self) -> Arc<TokenSet> {
        let current = self
            .current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        Arc::clone(&current.0)
    }

    /// Re-reads the file; swaps the set in if the contents changed.
    pub fn reload(&self) {
        let text = match std::fs::read(&self.path) {
            Ok(text) => text,
            Err(error) => {
                tracing::warn!(path = %self.path.display(), %error, "cannot re-read auth token file; keeping the current tokens");
                return;
            }
        };
        let fingerprint: [u8; 32] = Sha256::digest(&text).into();
        let mut current = self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if current.1 == fingerprint {
            return;
        }
        let tokens = TokenSet::parse(&String::from_utf8_lossy(&text));
        tracing::info!(path = %self.path.display(), tokens = tokens.len(), "auth tokens reloaded");
        *current = (Arc::new(tokens), fingerprint);
    }

    /// Polls the file until `stop` fires. Polling (not inotify) also sees the
    /// symlink swap Kubernetes uses to update mounted Secrets.
    pub async fn watch(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let mut ticks = tokio::time::interval(RELOAD_INTERVAL);
        loop {
            tokio::select! {
                _ = ticks.tick() => {
                    let store = Arc::clone(&self);
                    // File I/O off the reactor.
                    let _ = tokio::task::spawn_blocking(move || store.reload()).await;
                }
                _ = stop.cancelled() => return,
            }
        }
    }
}

/// Why a request was refused; the message tells the client what to send.
fn check(tokens: &TokenSet, header: Option<&http::HeaderValue>) -> Result<(), Status> {
    let Some(header) = header else {
        return Err(Status::unauthenticated(
            "missing credentials: send the header 'authorization: Bearer <token>'",
        ));
    };
    let value = header.to_str().unwrap_or_default();
    let token = match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim(),
        _ => {
            return Err(Status::unauthenticated(
                "malformed authorization header: expected 'Bearer <token>'",
            ))
        }
    };
    match tokens.accepts(token) {
        true => Ok(()),
        false => Err(Status::unauthenticated("invalid bearer token")),
    }
}

#[derive(Clone, Debug)]
pub struct AuthLayer {
    store: Option<Arc<TokenStore>>,
}

impl AuthLayer {
    /// `None` disables authentication.
    pub fn new(store: Option<Arc<TokenStore>>) -> Self {
        AuthLayer { store }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            store: self.store.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Auth<S> {
    inner: S,
    store: Option<Arc<TokenStore>>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, ResBody> Service<http::Request<B>> for Auth<S>
where
    S: Service<http::Request<B>, Response = http::Response<ResBody>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = BoxError;
    type Future = BoxFuture<Result<Self::Response, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if let Some(store) = &self.store {
            if !request.uri().path().starts_with(PUBLIC_PREFIX) {
                let tokens = store.tokens();
                if let Err(status) =
                    check(&tokens, request.headers().get(http::header::AUTHORIZATION))
                {
                    return Box::pin(async move { Ok(status.into_http()) });
                }
            }
        }
        let response = self.inner.call(request);
        Box::pin(async move { response.await.map_err(Into::into) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_skip_blank_lines_and_comments() {
        let set = TokenSet::parse("# ops team\nalpha\n\n  beta  \n#gamma\n");
        assert_eq!(set.len(), 2);
        assert!(set.accepts("alpha"));
        assert!(set.accepts("beta"));
        assert!(!set.accepts("gamma"));
        assert!(!set.accepts(""));
        assert!(!set.accepts("alph"));
    }

    #[test]
    fn header_forms() {
        let set = TokenSet::parse("s3cret");
        let header = |value: &str| http::HeaderValue::from_str(value).expect("header");
        assert!(check(&set, Some(&header("Bearer s3cret"))).is_ok());
        assert!(check(&set, Some(&header("bearer s3cret"))).is_ok());
        let missing = check(&set, None).expect_err("missing");
        assert_eq!(missing.code(), tonic::Code::Unauthenticated);
        assert!(check(&set, Some(&header("Basic s3cret"))).is_err());
        assert!(check(&set, Some(&header("Bearer wrong"))).is_err());
    }
}
