//! What every Surety admin HTTP API shares (feature `admin`): bearer-token
//! authentication, the error answer, query-parameter checks and a
//! concurrency limit, as axum pieces.
//!
//! The DLQ admin API, the saga operator API and the checkout's admin page
//! are built from these, so an operator meets one behaviour everywhere:
//!
//! - `Authorization: Bearer <token>` (the scheme in any case, RFC 9110).
//!   Tokens are kept only as SHA-256 digests (`sha2`) and compared in
//!   constant time (`subtle`), every token on every request, so the time
//!   taken says nothing about which token nearly matched. A token shorter
//!   than [`MIN_TOKEN_LEN`] bytes is refused when the router is built
//!   ([`Tokens::check`]). The accepted token's actor reaches handlers as an
//!   [`Actor`] request extension, for the audit trail.
//! - Errors answer a status and `{"error": "..."}` ([`ApiError`]); a 401
//!   carries `WWW-Authenticate: Bearer`.
//! - Query parameters are checked once: only known names, each at most
//!   once, no value over [`MAX_VALUE_LEN`] bytes ([`params`]).
//! - More requests at once than the limit answer 503 with `Retry-After`
//!   ([`concurrency_limit`]).
//!
//! [`Access`] holds all of it for one API and assembles its router from
//! the read and write routes.
//!
//! ```
//! use std::sync::Arc;
//! use axum::extract::Extension;
//! use axum::{Router, middleware, routing::get};
//! use surety_core::admin::{self, Actor, Tokens};
//!
//! async fn whoami(Extension(Actor(actor)): Extension<Actor>) -> String {
//!     actor
//! }
//!
//! let mut tokens = Tokens::new();
//! tokens.add("alice", "a-long-random-s3cret-token");
//! tokens.check()?;
//! let limit = Arc::new(tokio::sync::Semaphore::new(32));
//! let app: Router = Router::new()
//!     .route("/whoami", get(whoami))
//!     .route_layer(middleware::from_fn_with_state(Arc::new(tokens), admin::require_token))
//!     .layer(middleware::from_fn_with_state(limit, admin::concurrency_limit));
//! # let _ = app;
//! # Ok::<(), surety_core::admin::ConfigError>(())
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use subtle::ConstantTimeEq as _;

/// Shortest accepted bearer token, in bytes.
pub const MIN_TOKEN_LEN: usize = 16;
/// Longest accepted query-parameter value, in bytes.
pub const MAX_VALUE_LEN: usize = 200;

/// The API is configured in a way that would make it unsafe.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A token is shorter than [`MIN_TOKEN_LEN`] bytes.
    #[error("the admin token of {actor:?} is shorter than {MIN_TOKEN_LEN} bytes")]
    TokenTooShort {
        /// The token's actor.
        actor: String,
    },
}

/// The accepted bearer tokens, each with the actor it stands for. Only
/// digests are kept; `Debug` shows how many there are.
#[derive(Clone, Default)]
pub struct Tokens {
    tokens: Vec<Token>,
}

/// An accepted token: its actor, its SHA-256 digest, and its length (only
/// to refuse short ones at start-up).
#[derive(Clone)]
struct Token {
    actor: String,
    digest: [u8; 32],
    len: usize,
}

fn digest(token: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(token).into()
}

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokens")
            .field("count", &self.tokens.len())
            .finish()
    }
}

impl Tokens {
    /// No tokens: every protected request answers 401.
    pub fn new() -> Self {
        Self::default()
    }

    /// Accepts `token` for `actor` (the name audit trails record).
    pub fn add(&mut self, actor: impl Into<String>, token: impl AsRef<[u8]>) {
        let token = token.as_ref();
        self.tokens.push(Token {
            actor: actor.into(),
            digest: digest(token),
            len: token.len(),
        });
    }

    /// How many tokens are accepted.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether no token is accepted.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Refuses a token shorter than [`MIN_TOKEN_LEN`] bytes; call it when
    /// building a router.
    pub fn check(&self) -> Result<(), ConfigError> {
        match self.tokens.iter().find(|t| t.len < MIN_TOKEN_LEN) {
            Some(short) => Err(ConfigError::TokenTooShort {
                actor: short.actor.clone(),
            }),
            None => Ok(()),
        }
    }

    /// The actor of `presented`, if it is an accepted token.
    pub fn actor_for(&self, presented: &[u8]) -> Option<&str> {
        // Digests have one length whatever the token's, and every token is
        // compared, in constant time each.
        let presented = digest(presented);
        let mut found = None;
        for t in &self.tokens {
            let equal: bool = t.digest.ct_eq(&presented).into();
            if equal && found.is_none() {
                found = Some(t.actor.as_str());
            }
        }
        found
    }
}

/// Who may call an admin router and how much it takes: the tokens, whether
/// reads need one, the body limit and the concurrency limit. An admin API
/// keeps one and builds its router with [`serve`](Self::serve).
#[derive(Clone, Debug)]
pub struct Access {
    tokens: Tokens,
    protect_reads: bool,
    max_body_bytes: usize,
    concurrency_limit: usize,
}

/// Default most requests an admin router serves at once.
pub const DEFAULT_CONCURRENCY_LIMIT: usize = 32;

impl Access {
    /// No tokens yet (every protected request answers 401), reads
    /// protected, bodies up to `max_body_bytes`, at most
    /// [`DEFAULT_CONCURRENCY_LIMIT`] requests at once.
    pub fn new(max_body_bytes: usize) -> Self {
        Self {
            tokens: Tokens::new(),
            protect_reads: true,
            max_body_bytes,
            concurrency_limit: DEFAULT_CONCURRENCY_LIMIT,
        }
    }

    /// Accepts `token` for `actor` (see [`Tokens::add`]).
    pub fn token(&mut self, actor: impl Into<String>, token: impl AsRef<[u8]>) {
        self.tokens.add(actor, token);
    }

    /// Whether read endpoints need a token too.
    pub fn protect_reads(&mut self, protect: bool) {
        self.protect_reads = protect;
    }

    /// The largest request body accepted; larger ones answer 413.
    pub fn max_body_bytes(&mut self, bytes: usize) {
        self.max_body_bytes = bytes;
    }

    /// The most requests served at once (at least 1); more answer 503 with
    /// `Retry-After`.
    pub fn concurrency_limit(&mut self, n: usize) {
        self.concurrency_limit = n.max(1);
    }

    /// `reads` (token-protected unless opened) and `writes` (always
    /// protected) as one router over `state`, with the body and
    /// concurrency limits. Fails if a token is too short.
    pub fn serve<S>(
        &self,
        reads: axum::Router<S>,
        writes: axum::Router<S>,
        state: S,
    ) -> Result<axum::Router, ConfigError>
    where
        S: Clone + Send + Sync + 'static,
    {
        use axum::middleware::from_fn_with_state;
        self.tokens.check()?;
        let auth = from_fn_with_state(Arc::new(self.tokens.clone()), require_token);
        let reads = if self.protect_reads {
            reads.route_layer(auth.clone())
        } else {
            reads
        };
        let limit = Arc::new(tokio::sync::Semaphore::new(self.concurrency_limit));
        Ok(reads
            .merge(writes.route_layer(auth))
            .with_state(state)
            .layer(axum::extract::DefaultBodyLimit::max(self.max_body_bytes))
            .layer(from_fn_with_state(limit, concurrency_limit)))
    }
}

/// The authenticated caller, in the request's extensions after
/// [`require_token`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor(pub String);

/// Middleware (`axum::middleware::from_fn_with_state`): lets a request
/// through with its [`Actor`] when it carries an accepted bearer token,
/// answers 401 otherwise (before the body is read).
pub async fn require_token(
    State(tokens): State<Arc<Tokens>>,
    mut request: Request,
    next: Next,
) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes())
        .and_then(|v| {
            // `Bearer` in any case (RFC 9110: schemes are case-insensitive).
            let (scheme, rest) = v.split_at_checked(7)?;
            scheme.eq_ignore_ascii_case(b"bearer ").then_some(rest)
        })
        .map(<[u8]>::trim_ascii);
    match presented.and_then(|t| tokens.actor_for(t)) {
        Some(actor) => {
            let actor = Actor(actor.to_owned());
            request.extensions_mut().insert(actor);
            next.run(request).await
        }
        None => ApiError::new(StatusCode::UNAUTHORIZED, "a valid bearer token is required")
            .into_response(),
    }
}

/// Middleware (`axum::middleware::from_fn_with_state`): serves at most the
/// semaphore's permits at once and answers 503 with `Retry-After` beyond.
pub async fn concurrency_limit(
    State(limit): State<Arc<tokio::sync::Semaphore>>,
    request: Request,
    next: Next,
) -> Response {
    match limit.try_acquire() {
        Ok(_permit) => next.run(request).await,
        Err(_) => {
            let mut response = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many concurrent requests; try again",
            )
            .into_response();
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            response
        }
    }
}

/// An error answer: a status and `{"error": "..."}`. The message is for the
/// operator; never put a store's error text in it (log that instead).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    /// An answer with `status` and `message`.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    /// 400 with `message` saying what is wrong with the input.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// 404 with `message`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    /// 503: `what` (a store, say) is unavailable; try again later.
    pub fn unavailable(what: &str) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{what} is unavailable; try again later"),
        )
    }

    /// The status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            Json(ErrorBody {
                error: &self.message,
            }),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

impl From<JsonRejection> for ApiError {
    /// 415 for a body that is not JSON, 413 for one over the body limit,
    /// 400 for the rest, with axum's reason.
    fn from(rejection: JsonRejection) -> Self {
        let status = match rejection.status() {
            s @ (StatusCode::UNSUPPORTED_MEDIA_TYPE | StatusCode::PAYLOAD_TOO_LARGE) => s,
            _ => StatusCode::BAD_REQUEST,
        };
        Self::new(status, rejection.body_text())
    }
}

/// A handler's query string, rejected or not: pass it to [`params`].
pub type QueryParams = Result<Query<Vec<(String, String)>>, QueryRejection>;

/// The query parameters, each at most once, only from `allowed`, none over
/// [`MAX_VALUE_LEN`] bytes; 400 saying which one is wrong otherwise.
pub fn params(query: QueryParams, allowed: &[&str]) -> Result<BTreeMap<String, String>, ApiError> {
    let Query(pairs) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let mut out = BTreeMap::new();
    for (key, value) in pairs {
        if !allowed.contains(&key.as_str()) {
            return Err(ApiError::bad_request(format!(
                "unknown query parameter {key:?}; expected one of {}",
                allowed.join(", ")
            )));
        }
        if value.len() > MAX_VALUE_LEN {
            return Err(ApiError::bad_request(format!(
                "query parameter {key:?} is longer than {MAX_VALUE_LEN} bytes"
            )));
        }
        if out.insert(key.clone(), value).is_some() {
            return Err(ApiError::bad_request(format!(
                "query parameter {key:?} is given twice"
            )));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_maps_to_its_actor_and_no_other() {
        let mut tokens = Tokens::new();
        tokens.add("alice", "alice-token-0123456789");
        tokens.add("bob", "bob-token-0123456789ab");
        assert_eq!(tokens.actor_for(b"bob-token-0123456789ab"), Some("bob"));
        assert_eq!(tokens.actor_for(b"alice-token-0123456789"), Some("alice"));
        assert_eq!(tokens.actor_for(b"alice-token-012345678"), None);
        assert_eq!(tokens.actor_for(b""), None);
        assert!(tokens.check().is_ok());
        tokens.add("carol", "short");
        assert!(matches!(
            tokens.check(),
            Err(ConfigError::TokenTooShort { actor }) if actor == "carol"
        ));
        assert_eq!(format!("{tokens:?}"), "Tokens { count: 3 }");
    }

    #[test]
    fn params_refuse_unknown_repeated_and_long_values() {
        let q = |pairs: &[(&str, &str)]| -> QueryParams {
            Ok(Query(
                pairs
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            ))
        };
        let ok = params(q(&[("a", "1"), ("b", "2")]), &["a", "b"]).expect("accepted");
        assert_eq!(ok.get("b").map(String::as_str), Some("2"));
        let message = |r: Result<_, ApiError>| r.expect_err("refused").message().to_owned();
        assert!(message(params(q(&[("c", "1")]), &["a"])).contains("unknown query parameter"));
        assert!(message(params(q(&[("a", "1"), ("a", "2")]), &["a"])).contains("twice"));
        let long = "x".repeat(MAX_VALUE_LEN + 1);
        assert!(message(params(q(&[("a", &long)]), &["a"])).contains("longer than"));
    }
}
