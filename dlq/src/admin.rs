//! The admin HTTP API: JSON endpoints to inspect, replay and discard dead
//! letters, as an axum [`Router`] you mount where you like (feature
//! `admin`).
//!
//! | method and path | what | auth |
//! |---|---|---|
//! | `GET /messages` | list, filtered and paged: `system`, `topic`, `group`, `class`, `fingerprint`, `handler`, `status` (comma-separated), `from`, `to` (RFC 3339, on the last failure), `q` (text), `limit` (1–500, default 50), `cursor`, `total=true` (also count the matches: a full scan, so only on request) | read |
//! | `GET /messages/{id}` | one dead letter | read |
//! | `GET /stats` | depth by source and class, age of the oldest | read |
//! | `GET /audit` | the audit log, newest first (`limit`, `cursor`) | read |
//! | `GET /jobs/{id}` | a replay or discard job and its progress | read |
//! | `POST /messages/{id}/replay` | replay one, optionally edited: `{"reason", "dry_run", "again", "payload_base64" \| "payload_json", "content_type", "set_headers", "remove_headers"}`; answers the outcome | write |
//! | `POST /messages/{id}/discard` | discard one: `{"reason", "dry_run"}`; answers the outcome | write |
//! | `POST /replay` | replay `{"ids": [...]}`, `{"filter": {...}}` (not empty) or `{"all": true}`, with `reason`, `dry_run`; answers 202 with the job | write |
//! | `POST /discard` | discard `{"ids": [...]}`, `{"filter": {...}}` (not empty) or `{"all": true}`, with `reason` (required), `dry_run`; answers 202 with the job | write |
//! | `POST /jobs/{id}/resume` | run an unfinished job again (one whose run stopped on a store failure); answers 202 with it, or 409 if it has finished | write |
//!
//! Authentication, error answers and limits are those of every Surety
//! admin API ([`surety_core::admin`]). Every endpoint needs
//! `Authorization: Bearer <token>` (the scheme in any case) with a token
//! given to [`AdminApi::token`]; the token's actor name goes into the
//! audit trail. Without a valid token the answer is 401,
//! before the body is read. Dead letters hold payloads, so reads are
//! protected too unless [`AdminApi::open_reads`] says otherwise. Tokens are
//! compared as SHA-256 digests in constant time (`subtle`), and must be at
//! least [`MIN_TOKEN_LEN`] bytes: [`AdminApi::router`] refuses shorter ones.
//!
//! Bulk actions run as [jobs](crate::job) in their own task: a client that
//! disconnects does not stop them, and a restarted process resumes them
//! ([`Replayer::resume`]).
//!
//! Invalid input answers 400 (413 for a body over
//! [`AdminApi::max_body_bytes`], 415 for a body that is not JSON) with
//! `{"error": "..."}` saying what is wrong; an unknown id 404; a store
//! failure 503 with a generic message (the error itself is logged); more
//! than [`AdminApi::concurrency_limit`] requests at once 503 with
//! `Retry-After`.
//!
//! ```
//! use std::sync::Arc;
//! use surety_core::memory::MemoryTransport;
//! use surety_dlq::admin::AdminApi;
//! use surety_dlq::store::MemoryDlqStore;
//! use surety_dlq::Replayer;
//!
//! let store = Arc::new(MemoryDlqStore::new());
//! let replayer = Replayer::new(store, MemoryTransport::new()).rate_limit(50);
//! let api = AdminApi::new(replayer).token("alice", "a-long-random-s3cret-token");
//! let app: axum::Router = axum::Router::new().nest("/admin/dlq", api.router()?);
//! # let _ = app;
//! # Ok::<(), surety_dlq::admin::ConfigError>(())
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use surety_core::admin::{Access, Actor, ApiError, QueryParams, params};
/// The start-up refusal and the limits every Surety admin API shares.
pub use surety_core::admin::{
    ConfigError, DEFAULT_CONCURRENCY_LIMIT, MAX_VALUE_LEN, MIN_TOKEN_LEN,
};

use crate::letter::{DeadLetter, Status};
use crate::replay::{
    ActionReport, DiscardRequest, Edit, ReplayError, ReplayRequest, Replayer, Selection, Started,
};
use crate::store::{Depth, DlqStore, Filter, PageRequest, StoreError};

/// Default page size of listings.
pub const DEFAULT_LIMIT: u32 = 50;
/// Largest page size of listings.
pub const MAX_LIMIT: u32 = 500;
/// Error classes accepted in filters.
pub const CLASSES: [&str; 4] = crate::metrics::ERROR_CLASSES;
/// Default largest request body, in bytes.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;

/// The admin API's configuration; [`router`](Self::router) turns it into
/// an axum [`Router`].
#[derive(Clone)]
pub struct AdminApi {
    replayer: Replayer,
    access: Access,
}

impl fmt::Debug for AdminApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminApi")
            .field("replayer", &self.replayer)
            .field("access", &self.access)
            .finish()
    }
}

impl AdminApi {
    /// An API over `replayer` (and its store), with no tokens yet: every
    /// request answers 401 until one is added.
    pub fn new(replayer: Replayer) -> Self {
        Self {
            replayer,
            access: Access::new(DEFAULT_MAX_BODY_BYTES),
        }
    }

    /// Accepts `token` as a bearer token for `actor` (the name the audit
    /// trail records). Only its digest is kept. [`router`](Self::router)
    /// refuses tokens shorter than [`MIN_TOKEN_LEN`] bytes.
    pub fn token(mut self, actor: impl Into<String>, token: impl AsRef<[u8]>) -> Self {
        self.access.token(actor, token);
        self
    }

    /// Whether read endpoints need a token too (the default). Opening them
    /// exposes payloads to anyone who reaches the router: only do it behind
    /// your own authentication.
    pub fn protect_reads(mut self, protect: bool) -> Self {
        self.access.protect_reads(protect);
        self
    }

    /// Opens the read endpoints (`protect_reads(false)`).
    pub fn open_reads(self) -> Self {
        self.protect_reads(false)
    }

    /// The largest request body accepted (default
    /// [`DEFAULT_MAX_BODY_BYTES`]); larger ones answer 413.
    pub fn max_body_bytes(mut self, bytes: usize) -> Self {
        self.access.max_body_bytes(bytes);
        self
    }

    /// The most requests served at once (default
    /// [`DEFAULT_CONCURRENCY_LIMIT`]); more answer 503 with `Retry-After`.
    pub fn concurrency_limit(mut self, n: usize) -> Self {
        self.access.concurrency_limit(n);
        self
    }

    /// The router, with paths relative to where you nest it. Fails if a
    /// token is too short.
    pub fn router(self) -> Result<Router, ConfigError> {
        let reads = Router::new()
            .route("/messages", get(list))
            .route("/messages/{id}", get(get_one))
            .route("/stats", get(stats))
            .route("/audit", get(audit))
            .route("/jobs/{id}", get(get_job));
        let writes = Router::new()
            .route("/messages/{id}/replay", post(replay_one))
            .route("/messages/{id}/discard", post(discard_one))
            .route("/replay", post(replay_many))
            .route("/discard", post(discard_many))
            .route("/jobs/{id}/resume", post(resume_job));
        let access = self.access.clone();
        access.serve(reads, writes, Arc::new(self))
    }
}

type Api = Arc<AdminApi>;

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::InvalidCursor(c) => Self::bad_request(format!("invalid cursor {c:?}")),
            other => {
                // The text may name tables, hosts or data: logged, not sent.
                tracing::error!(error = %other, "DLQ admin API: store failed");
                Self::unavailable("the DLQ store")
            }
        }
    }
}

impl From<ReplayError> for ApiError {
    fn from(err: ReplayError) -> Self {
        match err {
            ReplayError::Invalid(reason) => Self::bad_request(reason),
            ReplayError::Store(e) => e.into(),
            other => {
                tracing::error!(error = %other, "DLQ admin API: action failed");
                Self::unavailable("the DLQ store")
            }
        }
    }
}

const FILTER_PARAMS: [&str; 13] = [
    "total",
    "system",
    "topic",
    "group",
    "class",
    "fingerprint",
    "handler",
    "status",
    "from",
    "to",
    "q",
    "limit",
    "cursor",
];

fn filter_from_params(p: &BTreeMap<String, String>) -> Result<Filter, ApiError> {
    let text = |key: &str| p.get(key).cloned();
    let mut filter = Filter::new();
    filter.system = text("system");
    filter.topic = text("topic");
    filter.group = text("group");
    filter.class = p
        .get("class")
        .map(|name| name.parse::<crate::letter::FailureClass>())
        .transpose()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    filter.fingerprint = text("fingerprint");
    filter.handler = text("handler");
    filter.text = text("q");
    if let Some(status) = p.get("status") {
        filter.status = status
            .split(',')
            .map(|s| {
                Status::from_name(s.trim()).ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "unknown status {s:?}; expected dead, replaying, replayed, parked, discarded or resolved"
                    ))
                })
            })
            .collect::<Result<_, _>>()?;
    }
    let time = |key: &str| -> Result<Option<DateTime<Utc>>, ApiError> {
        p.get(key)
            .map(|v| {
                DateTime::parse_from_rfc3339(v)
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(|e| {
                        ApiError::bad_request(format!(
                            "`{key}` is not an RFC 3339 time ({v:?}): {e}"
                        ))
                    })
            })
            .transpose()
    };
    filter.from = time("from")?;
    filter.to = time("to")?;
    validate_filter(&filter)?;
    Ok(filter)
}

/// Checks a filter's values (also for filters in JSON bodies).
fn validate_filter(filter: &Filter) -> Result<(), ApiError> {
    let values = [
        ("system", &filter.system),
        ("topic", &filter.topic),
        ("group", &filter.group),
        ("fingerprint", &filter.fingerprint),
        ("handler", &filter.handler),
        ("q", &filter.text),
    ];
    for (name, value) in values {
        if let Some(v) = value {
            if v.trim().is_empty() {
                return Err(ApiError::bad_request(format!("`{name}` must not be empty")));
            }
            if v.len() > MAX_VALUE_LEN {
                return Err(ApiError::bad_request(format!(
                    "`{name}` is longer than {MAX_VALUE_LEN} bytes"
                )));
            }
            if v.chars().any(char::is_control) {
                return Err(ApiError::bad_request(format!(
                    "`{name}` contains a control character"
                )));
            }
        }
    }
    if filter.status.len() > Status::ALL.len() {
        return Err(ApiError::bad_request(format!(
            "`status` lists {} statuses; there are {}",
            filter.status.len(),
            Status::ALL.len()
        )));
    }
    if let (Some(from), Some(to)) = (filter.from, filter.to)
        && from >= to
    {
        return Err(ApiError::bad_request("`from` must be before `to`"));
    }
    Ok(())
}

fn page_from_params(p: &BTreeMap<String, String>) -> Result<PageRequest, ApiError> {
    let limit = match p.get("limit") {
        None => DEFAULT_LIMIT,
        Some(v) => v
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "`limit` must be a number from 1 to {MAX_LIMIT}, not {v:?}"
                ))
            })?,
    };
    let mut page = PageRequest::first(limit);
    if let Some(cursor) = p.get("cursor") {
        if cursor.is_empty() || cursor.len() > MAX_VALUE_LEN {
            return Err(ApiError::bad_request(format!("invalid cursor {cursor:?}")));
        }
        page.cursor = Some(cursor.clone());
    }
    Ok(page)
}

fn validate_id(id: &str) -> Result<(), ApiError> {
    if id.is_empty() || id.len() > MAX_VALUE_LEN || id.chars().any(char::is_control) {
        return Err(ApiError::bad_request(format!("invalid id {id:?}")));
    }
    Ok(())
}

#[derive(Serialize)]
struct ListBody {
    items: Vec<DeadLetter>,
    next_cursor: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    total: Option<u64>,
}

async fn list(State(api): State<Api>, query: QueryParams) -> Result<Json<ListBody>, ApiError> {
    let p = params(query, &FILTER_PARAMS)?;
    let filter = filter_from_params(&p)?;
    let page = page_from_params(&p)?;
    let store = api.replayer.store();
    let result = store.list(&filter, &page).await?;
    let total = match p.get("total").map(String::as_str) {
        None | Some("false") => None,
        Some("true") => Some(store.count(&filter).await?),
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "`total` must be true or false, not {other:?}"
            )));
        }
    };
    Ok(Json(ListBody {
        items: result.items,
        next_cursor: result.next,
        total,
    }))
}

async fn get_one(
    State(api): State<Api>,
    Path(id): Path<String>,
) -> Result<Json<DeadLetter>, ApiError> {
    validate_id(&id)?;
    match api.replayer.store().get(&id).await? {
        Some(letter) => Ok(Json(letter)),
        None => Err(not_found(&id)),
    }
}

fn not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("no dead letter {id:?}"))
}

/// 404 unless the dead letter exists (before any job or audit entry).
async fn require_letter(api: &AdminApi, id: &str) -> Result<(), ApiError> {
    validate_id(id)?;
    match api.replayer.store().get(id).await? {
        Some(_) => Ok(()),
        None => Err(not_found(id)),
    }
}

#[derive(Serialize)]
struct StatsBody {
    depth: Vec<Depth>,
    waiting: u64,
    oldest_age_seconds: Option<f64>,
}

async fn stats(State(api): State<Api>, query: QueryParams) -> Result<Json<StatsBody>, ApiError> {
    params(query, &[])?;
    let depth = api.replayer.store().depth().await?;
    let now = Utc::now();
    let oldest = depth.iter().map(|d| d.oldest).min();
    Ok(Json(StatsBody {
        waiting: depth.iter().map(|d| d.count).sum(),
        oldest_age_seconds: oldest.map(|o| (now - o).to_std().unwrap_or_default().as_secs_f64()),
        depth,
    }))
}

#[derive(Serialize)]
struct AuditBody {
    items: Vec<crate::store::AuditEntry>,
    next_cursor: Option<String>,
}

async fn audit(State(api): State<Api>, query: QueryParams) -> Result<Json<AuditBody>, ApiError> {
    let p = params(query, &["limit", "cursor"])?;
    let page = page_from_params(&p)?;
    let result = api.replayer.store().audit_log(&page).await?;
    Ok(Json(AuditBody {
        items: result.items,
        next_cursor: result.next,
    }))
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct ReplayOneBody {
    reason: Option<String>,
    dry_run: bool,
    payload_base64: Option<String>,
    payload_json: Option<serde_json::Value>,
    content_type: Option<String>,
    set_headers: BTreeMap<String, String>,
    remove_headers: Vec<String>,
    again: bool,
}

fn actor_of(actor: Option<Extension<Actor>>) -> String {
    actor.map(|Extension(Actor(a))| a).unwrap_or_default()
}

async fn replay_one(
    State(api): State<Api>,
    actor: Option<Extension<Actor>>,
    Path(id): Path<String>,
    body: Result<Json<ReplayOneBody>, JsonRejection>,
) -> Result<Json<ActionReport>, ApiError> {
    let Json(body) = body?;
    require_letter(&api, &id).await?;
    let mut edit = Edit::new();
    match (body.payload_base64, body.payload_json) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "give `payload_base64` or `payload_json`, not both",
            ));
        }
        (Some(b64), None) => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64.as_bytes())
                .map_err(|e| {
                    ApiError::bad_request(format!("`payload_base64` is not base64: {e}"))
                })?;
            edit = edit.payload(bytes);
        }
        (None, Some(json)) => {
            let bytes = serde_json::to_vec(&json)
                .map_err(|e| ApiError::bad_request(format!("`payload_json`: {e}")))?;
            edit = edit.payload(bytes).content_type("application/json");
        }
        (None, None) => {}
    }
    if let Some(ct) = body.content_type {
        edit = edit.content_type(ct);
    }
    edit.set_headers = body.set_headers;
    edit.remove_headers = body.remove_headers;
    let mut request = ReplayRequest::ids(actor_of(actor), [id])
        .dry_run(body.dry_run)
        .again(body.again);
    request.reason = body.reason;
    request.edit = Some(edit);
    let started = api.replayer.start_replay(request).await?;
    Ok(Json(run_to_end(&api, started).await?))
}

/// Runs a started job in its own task and waits for it: a client that
/// disconnects stops the wait, not the job.
async fn run_to_end(api: &AdminApi, started: Started) -> Result<ActionReport, ApiError> {
    match started {
        Started::DryRun(report) => Ok(report),
        Started::Job(job) => match api.replayer.spawn(*job).await {
            Ok(result) => Ok(result?.report()),
            Err(join) => {
                tracing::error!(error = %join, "DLQ admin API: job task failed");
                Err(ApiError::unavailable("the DLQ store"))
            }
        },
    }
}

/// Starts a job in the background and answers 202 with it (a dry run
/// answers 200 with its report).
fn accepted(api: &AdminApi, started: Started) -> Response {
    match started {
        Started::DryRun(report) => Json(report).into_response(),
        Started::Job(job) => {
            let body = Json(JobBody::of(&job));
            drop(api.replayer.spawn(*job));
            (StatusCode::ACCEPTED, body).into_response()
        }
    }
}

/// A job as the API shows it.
#[derive(Serialize)]
struct JobBody {
    #[serde(flatten)]
    job: crate::job::Job,
    /// Where to follow it, relative to the router.
    location: String,
}

impl JobBody {
    fn of(job: &crate::job::Job) -> Self {
        Self {
            location: format!("jobs/{}", job.id),
            job: job.clone(),
        }
    }
}

async fn resume_job(State(api): State<Api>, Path(id): Path<String>) -> Result<Response, ApiError> {
    validate_id(&id)?;
    let Some(job) = api.replayer.job(&id).await? else {
        return Err(ApiError::not_found(format!("no job {id:?}")));
    };
    if job.finished {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("job {id:?} has finished"),
        ));
    }
    // A job already running in this process ends its new run at once.
    Ok(accepted(&api, Started::Job(Box::new(job))))
}

async fn get_job(
    State(api): State<Api>,
    Path(id): Path<String>,
) -> Result<Json<JobBody>, ApiError> {
    validate_id(&id)?;
    match api.replayer.job(&id).await? {
        Some(job) => Ok(Json(JobBody::of(&job))),
        None => Err(ApiError::not_found(format!("no job {id:?}"))),
    }
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct DiscardOneBody {
    reason: String,
    dry_run: bool,
}

async fn discard_one(
    State(api): State<Api>,
    actor: Option<Extension<Actor>>,
    Path(id): Path<String>,
    body: Result<Json<DiscardOneBody>, JsonRejection>,
) -> Result<Json<ActionReport>, ApiError> {
    let Json(body) = body?;
    require_letter(&api, &id).await?;
    let request = DiscardRequest::new(actor_of(actor), Selection::Ids(vec![id]), body.reason)
        .dry_run(body.dry_run);
    let started = api.replayer.start_discard(request).await?;
    Ok(Json(run_to_end(&api, started).await?))
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct ManyBody {
    ids: Option<Vec<String>>,
    filter: Option<Filter>,
    all: bool,
    reason: Option<String>,
    dry_run: bool,
}

fn selection(body: &mut ManyBody) -> Result<Selection, ApiError> {
    match (body.ids.take(), body.filter.take(), body.all) {
        (Some(ids), None, false) => {
            for id in &ids {
                validate_id(id)?;
            }
            Ok(Selection::Ids(ids))
        }
        (None, Some(filter), false) => {
            validate_filter(&filter)?;
            if filter == Filter::default() {
                return Err(ApiError::bad_request(
                    "an empty filter selects every dead letter: give `\"all\": true` to mean that",
                ));
            }
            Ok(Selection::Filter(filter))
        }
        (None, None, true) => Ok(Selection::Filter(Filter::default())),
        _ => Err(ApiError::bad_request(
            "give exactly one of `ids`, `filter` and `\"all\": true`",
        )),
    }
}

async fn replay_many(
    State(api): State<Api>,
    actor: Option<Extension<Actor>>,
    body: Result<Json<ManyBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(mut body) = body?;
    let selection = selection(&mut body)?;
    let mut request = ReplayRequest::new(actor_of(actor), selection).dry_run(body.dry_run);
    request.reason = body.reason;
    let started = api.replayer.start_replay(request).await?;
    Ok(accepted(&api, started))
}

async fn discard_many(
    State(api): State<Api>,
    actor: Option<Extension<Actor>>,
    body: Result<Json<ManyBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(mut body) = body?;
    let selection = selection(&mut body)?;
    let request = DiscardRequest::new(actor_of(actor), selection, body.reason.unwrap_or_default())
        .dry_run(body.dry_run);
    let started = api.replayer.start_discard(request).await?;
    Ok(accepted(&api, started))
}
