//! Bearer-token authentication for the `Packets` RPCs, as one tower layer, and
//! what each token may do.
//!
//! Tokens come from `--auth-token-file`: one per line, blank lines and `#`
//! comments ignored. A line is a token alone (it may do everything) or a
//! token followed by what it may do:
//!
//! ```text
//! s3cret-reader subscribe=1,2,7 stream-info
//! s3cret-writer publish=7
//! s3cret-ops    subscribe=* publish=* stream-info
//! ```
//!
//! (tokens contain no whitespace). The file is re-read when its contents
//! change, so a rotated Kubernetes Secret takes effect without a restart. Tokens
//! are kept only as SHA-256 digests and compared in constant time against
//! every entry; the matching entry's `Permissions` travel with the request.

use std::{
    future::Future,
    path::PathBuf,
    pin::Pin,
    sync::{Arc, RwLock},
    task::{Context, Poll},
    time::Duration,
};

use sha2::{Digest as _, Sha256};
use subtle::{Choice, ConditionallySelectable, ConstantTimeEq};
use tonic::Status;
use tower::{BoxError, Layer, Service};

/// How often the token file is checked for changes.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(1);
/// Channels a token may use for one kind of call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Allowed {
    All,
    /// These channels, sorted.
    Only(Arc<[u32]>),
    Nothing,
}

impl Allowed {
    pub fn permits(&self, channel: u32) -> bool {
        match self {
            Allowed::All => true,
            Allowed::Only(channels) => channels.binary_search(&channel).is_ok(),
            Allowed::Nothing => false,
        }
    }
}

/// What the token of a call may do (absent when there is no token file).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Permissions {
    pub subscribe: Allowed,
    pub publish: Allowed,
    pub stream_info: bool,
}

impl Permissions {
    pub fn all() -> Self {
        Permissions {
            subscribe: Allowed::All,
            publish: Allowed::All,
            stream_info: true,
        }
    }

    /// Parses the words after a token; `Err` names the word it cannot use.
    fn parse<'a>(words: impl Iterator<Item = &'a str>) -> Result<Self, String> {
        let mut permissions = Permissions {
            subscribe: Allowed::Nothing,
            publish: Allowed::Nothing,
            stream_info: false,
        };
        let mut any = false;
        for word in words {
            any = true;
            let channels = |list: &str| -> Result<Allowed, String> {
                if list == "*" {
                    return Ok(Allowed::All);
                }
                let mut channels = list
                    .split(',')
                    .map(|channel| channel.trim().parse::<u32>())
                    .collect::<Result<Vec<u32>, _>>()
                    .map_err(|_| {
                        format!("{word:?} (channels are u32 numbers, comma-separated, or *)")
                    })?;
                channels.sort_unstable();
                channels.dedup();
                Ok(Allowed::Only(channels.into()))
            };
            match word.split_once('=') {
                Some(("subscribe", list)) => permissions.subscribe = channels(list)?,
                Some(("publish", list)) => permissions.publish = channels(list)?,
                None if word == "stream-info" => permissions.stream_info = true,
                _ => {
                    return Err(format!(
                        "{word:?} (use subscribe=…, publish=… or stream-info)"
                    ))
                }
            }
        }
        Ok(if any { permissions } else { Permissions::all() })
    }
}

/// The accepted tokens, as digests, with what each may do.
#[derive(Debug, Default)]
pub struct TokenSet {
    entries: Vec<([u8; 32], Permissions)>,
}

impl TokenSet {
    /// Parses a token file; lines it cannot use are skipped with a warning
    /// that names the line (never the token).
    pub fn parse(text: &str) -> TokenSet {
        let mut entries = Vec::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut words = line.split_whitespace();
            let Some(token) = words.next() else { continue };
            match Permissions::parse(words) {
                Ok(permissions) => {
                    entries.push((Sha256::digest(token.as_bytes()).into(), permissions))
                }
                Err(problem) => tracing::warn!(
                    line = number + 1,
                    "auth token file: line skipped, cannot use {problem}"
                ),
            }
        }
        TokenSet { entries }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The permissions of `token`, if it is known. Constant time in the
    /// token's contents: every entry is compared.
    pub fn permissions(&self, token: &str) -> Option<&Permissions> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = Choice::from(0);
        let mut index = 0u32;
        for (position, (known, _)) in self.entries.iter().enumerate() {
            let matched = known.ct_eq(&digest);
            index = u32::conditional_select(&index, &(position as u32), matched);
            found |= matched;
        }
        bool::from(found).then(|| &self.entries[index as usize].1)
    }

    pub fn accepts(&self, token: &str) -> bool {
        self.permissions(token).is_some()
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
fn check(tokens: &TokenSet, header: Option<&http::HeaderValue>) -> Result<Permissions, Status> {
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
    tokens
        .permissions(token)
        .cloned()
        .ok_or_else(|| Status::unauthenticated("invalid bearer token"))
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

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        if let Some(store) = &self.store {
            let tokens = store.tokens();
            match check(&tokens, request.headers().get(http::header::AUTHORIZATION)) {
                Ok(permissions) => {
                    request.extensions_mut().insert(permissions);
                }
                Err(status) => return Box::pin(async move { Ok(status.into_http()) }),
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
        assert_eq!(
            check(&set, Some(&header("Bearer s3cret"))).expect("known"),
            Permissions::all()
        );
        assert_eq!(missing.code(), tonic::Code::Unauthenticated);
        assert!(check(&set, Some(&header("Basic s3cret"))).is_err());
        assert!(check(&set, Some(&header("Bearer wrong"))).is_err());
    }

    #[test]
    fn token_lines_may_restrict_what_a_token_does() {
        let set = TokenSet::parse(
            "reader subscribe=7,1,2 stream-info\nwriter publish=7\nops subscribe=* publish=*\nbad subscribe=x\nodd frobnicate\n",
        );
        assert_eq!(set.len(), 3, "unusable lines are skipped");
        let reader = set.permissions("reader").expect("reader");
        assert!(reader.subscribe.permits(2) && !reader.subscribe.permits(3));
        assert_eq!(reader.publish, Allowed::Nothing);
        assert!(reader.stream_info);
        let writer = set.permissions("writer").expect("writer");
        assert!(writer.publish.permits(7) && !writer.publish.permits(8));
        assert_eq!(writer.subscribe, Allowed::Nothing);
        assert!(!writer.stream_info);
        let ops = set.permissions("ops").expect("ops");
        assert_eq!(
            (&ops.subscribe, &ops.publish, ops.stream_info),
            (&Allowed::All, &Allowed::All, false)
        );
        assert!(set.permissions("bad").is_none() && set.permissions("nobody").is_none());
    }
}
