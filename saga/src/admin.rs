//! The operator HTTP API: list and inspect saga instances, act on one, and
//! draw the definition, as an axum [`Router`] you mount where you like
//! (feature `admin`).
//!
//! | method and path | what | auth |
//! |---|---|---|
//! | `GET /instances` | list: `saga` (type), `state` (step name), `finished` (`true`/`false`), `min_age_secs` (started at least that long ago), `stuck_secs` (unfinished and not moved for that long), `limit` (1–500, default 50); least recently moved first | read |
//! | `GET /instances/{id}` | one instance of this API's saga: its state, its history (every input, with the step it left and the one it led to, the commands it sent by type and id, time and trace id), its no-op records (duplicate and late replies, counted per version and input) and its audit trail | read |
//! | `POST /instances/{id}/retry` | re-send the current step (or the failed compensation) | write |
//! | `POST /instances/{id}/compensate` | stop and undo what was done | write |
//! | `POST /instances/{id}/resolve` | end the instance as resolved | write |
//! | `GET /definition` | the definition as a Mermaid state diagram (`text/plain`), when given to [`AdminApi::diagram`] | read |
//!
//! Actions take `{"reason": "..."}` (required, at most
//! [`MAX_REASON_LEN`] bytes). The audit entry (actor, action, reason) is
//! written *before* the action is applied; the action itself is an
//! [`Input::Operator`] recorded in the instance's history like any input.
//! An action the instance does not take at its step answers 409, an
//! unknown instance 404.
//!
//! Authentication, error answers and limits are those of every Surety admin
//! API ([`surety_core::admin`]): every endpoint needs
//! `Authorization: Bearer <token>` with a token given to
//! [`AdminApi::token`] (at least [`MIN_TOKEN_LEN`] bytes; compared as
//! SHA-256 digests in constant time), unless [`AdminApi::open_reads`]
//! opens the read endpoints. Without a valid token the answer is 401.
//! Invalid input answers 400 (413 for a body over
//! [`AdminApi::max_body_bytes`], 415 for a body that is not JSON) with
//! `{"error": "..."}`; more than [`AdminApi::concurrency_limit`] requests
//! at once 503 with `Retry-After`; a store failure 503 (the error is
//! logged, not sent).
//!
//! ```
//! use std::sync::Arc;
//! use surety_saga::admin::AdminApi;
//! use surety_saga::{checkout, store::MemorySagaStore, Orchestrator};
//!
//! let saga = checkout::definition(checkout::Deadlines::default());
//! let diagram = saga.mermaid();
//! let orchestrator = Arc::new(Orchestrator::new(saga, MemorySagaStore::new()));
//! let api = AdminApi::new(orchestrator)
//!     .token("alice", "a-long-random-s3cret-token")
//!     .diagram(diagram);
//! let app: axum::Router = axum::Router::new().nest("/admin/sagas/checkout", api.router()?);
//! # let _ = app;
//! # Ok::<(), surety_saga::admin::ConfigError>(())
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use chrono::Utc;
use serde::{Deserialize, Serialize};
use surety_core::admin::{Access, Actor, ApiError, QueryParams, params};
/// The start-up refusal and the limits every Surety admin API shares.
pub use surety_core::admin::{
    ConfigError, DEFAULT_CONCURRENCY_LIMIT, MAX_VALUE_LEN, MIN_TOKEN_LEN,
};

use crate::definition::{Input, OperatorAction, Saga};
use crate::orchestrator::{Orchestrator, Outcome, SagaError};
use crate::steps::actions;
use crate::store::{
    AuditRecord, HistoryRecord, InstanceSummary, ListFilter, NoopRecord, SagaStore, StoreError,
};

/// Default page size of listings.
pub const DEFAULT_LIMIT: usize = 50;
/// Largest page size of listings.
pub const MAX_LIMIT: usize = 500;
/// Longest accepted reason, in bytes.
pub const MAX_REASON_LEN: usize = 1000;
/// Default largest request body, in bytes.
pub const DEFAULT_MAX_BODY_BYTES: usize = 64 * 1024;

/// The operator API over one saga's orchestrator; [`router`](Self::router)
/// turns it into an axum [`Router`].
pub struct AdminApi<S, St> {
    orchestrator: Arc<Orchestrator<S, St>>,
    access: Access,
    diagram: Option<String>,
}

impl<S, St> fmt::Debug for AdminApi<S, St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminApi")
            .field("access", &self.access)
            .finish_non_exhaustive()
    }
}

impl<S, St> AdminApi<S, St>
where
    S: Saga + 'static,
    St: SagaStore + 'static,
{
    /// An API over `orchestrator` (and its store), with no tokens yet:
    /// every request answers 401 until one is added.
    pub fn new(orchestrator: Arc<Orchestrator<S, St>>) -> Self {
        Self {
            orchestrator,
            access: Access::new(DEFAULT_MAX_BODY_BYTES),
            diagram: None,
        }
    }

    /// Accepts `token` as a bearer token for `actor` (the name the audit
    /// trail and the history record). Only its digest is kept.
    pub fn token(mut self, actor: impl Into<String>, token: impl AsRef<[u8]>) -> Self {
        self.access.token(actor, token);
        self
    }

    /// Whether read endpoints need a token too (the default): instance
    /// state holds business data.
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

    /// Serves `mermaid` (a definition's diagram, such as
    /// [`Steps::mermaid`](crate::steps::Steps::mermaid)) at `GET /definition`.
    pub fn diagram(mut self, mermaid: impl Into<String>) -> Self {
        self.diagram = Some(mermaid.into());
        self
    }

    /// The router, with paths relative to where you nest it. Fails if a
    /// token is too short.
    pub fn router(self) -> Result<Router, ConfigError> {
        let reads = Router::new()
            .route("/instances", get(list::<S, St>))
            .route("/instances/{id}", get(show::<S, St>))
            .route("/definition", get(definition::<S, St>));
        let writes = Router::new().route("/instances/{id}/{action}", post(act::<S, St>));
        let access = self.access.clone();
        access.serve(reads, writes, Arc::new(self))
    }
}

type Api<S, St> = Arc<AdminApi<S, St>>;

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        // The text may name tables, hosts or data: logged, not sent.
        tracing::error!(error = %err, "saga admin API: store failed");
        Self::unavailable("the saga store")
    }
}

impl From<SagaError> for ApiError {
    fn from(err: SagaError) -> Self {
        match err {
            SagaError::Store(store) => store.into(),
            other => {
                tracing::error!(error = %other, "saga admin API: the instance cannot be handled");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the instance's stored state cannot be handled; see the logs",
                )
            }
        }
    }
}

fn seconds(params: &BTreeMap<String, String>, key: &str) -> Result<Option<Duration>, ApiError> {
    params
        .get(key)
        .map(|v| {
            v.parse::<u64>().map(Duration::from_secs).map_err(|_| {
                ApiError::bad_request(format!("{key} must be a whole number of seconds"))
            })
        })
        .transpose()
}

fn ago(duration: Duration) -> chrono::DateTime<Utc> {
    chrono::Duration::from_std(duration)
        .ok()
        .and_then(|d| Utc::now().checked_sub_signed(d))
        .unwrap_or(chrono::DateTime::<Utc>::MIN_UTC)
}

#[derive(Serialize)]
struct Listing {
    instances: Vec<InstanceSummary>,
}

async fn list<S, St>(
    State(api): State<Api<S, St>>,
    query: QueryParams,
) -> Result<Response, ApiError>
where
    S: Saga + 'static,
    St: SagaStore + 'static,
{
    let params = params(
        query,
        &[
            "saga",
            "state",
            "finished",
            "min_age_secs",
            "stuck_secs",
            "limit",
        ],
    )?;
    let limit = match params.get("limit") {
        None => DEFAULT_LIMIT,
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| ApiError::bad_request(format!("limit must be 1 to {MAX_LIMIT}")))?,
    };
    let mut filter = ListFilter::new(limit);
    filter.saga = params.get("saga").cloned();
    filter.state_name = params.get("state").cloned();
    filter.finished = match params.get("finished").map(String::as_str) {
        None => None,
        Some("true") => Some(true),
        Some("false") => Some(false),
        Some(_) => return Err(ApiError::bad_request("finished must be true or false")),
    };
    filter.started_before = seconds(&params, "min_age_secs")?.map(ago);
    filter.idle_since = seconds(&params, "stuck_secs")?.map(ago);
    let instances = api.orchestrator.store().list(&filter).await?;
    Ok(Json(Listing { instances }).into_response())
}

#[derive(Serialize)]
struct Shown {
    instance: InstanceSummary,
    history: Vec<HistoryRecord>,
    noops: Vec<NoopRecord>,
    audit: Vec<AuditRecord>,
}

fn check_id(id: &str) -> Result<(), ApiError> {
    if id.is_empty() || id.len() > MAX_VALUE_LEN {
        return Err(ApiError::bad_request(format!(
            "an instance id is 1 to {MAX_VALUE_LEN} bytes"
        )));
    }
    Ok(())
}

fn not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("no instance {id:?}"))
}

async fn show<S, St>(
    State(api): State<Api<S, St>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError>
where
    S: Saga + 'static,
    St: SagaStore + 'static,
{
    check_id(&id)?;
    let store = api.orchestrator.store();
    let saga = api.orchestrator.saga().name();
    let Some(record) = store.load(saga, &id).await? else {
        return Err(not_found(&id));
    };
    let history = store.history(saga, &id).await?;
    let noops = store.noops(saga, &id).await?;
    let audit = store.audit_log(saga, &id).await?;
    let started = history
        .first()
        .map_or(chrono::DateTime::<Utc>::MIN_UTC, |h| h.at);
    let moved = history.last().map_or(started, |h| h.at);
    let instance = InstanceSummary {
        saga: record.saga,
        id: record.id,
        state_name: record.state_name,
        version: record.version,
        finished: record.finished,
        created_at: started,
        updated_at: moved,
        state: record.state,
    };
    Ok(Json(Shown {
        instance,
        history,
        noops,
        audit,
    })
    .into_response())
}

async fn definition<S, St>(State(api): State<Api<S, St>>) -> Result<Response, ApiError>
where
    S: Saga + 'static,
    St: SagaStore + 'static,
{
    match &api.diagram {
        Some(diagram) => Ok((
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            diagram.clone(),
        )
            .into_response()),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "no diagram was configured for this saga",
        )),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionBody {
    reason: String,
}

#[derive(Serialize)]
struct Acted<'a> {
    action: &'a str,
    state: String,
    version: u64,
    finished: bool,
    commands: usize,
}

async fn act<S, St>(
    State(api): State<Api<S, St>>,
    Extension(Actor(actor)): Extension<Actor>,
    Path((id, action)): Path<(String, String)>,
    body: Result<Json<ActionBody>, JsonRejection>,
) -> Result<Response, ApiError>
where
    S: Saga + 'static,
    St: SagaStore + 'static,
{
    check_id(&id)?;
    let action = match action.as_str() {
        actions::RETRY => actions::RETRY,
        actions::COMPENSATE => actions::COMPENSATE,
        actions::RESOLVE => actions::RESOLVE,
        other => {
            return Err(ApiError::not_found(format!(
                "no action {other:?}; expected retry, compensate or resolve"
            )));
        }
    };
    // A body that is not the expected JSON is a bad request (415 and 413
    // keep their meaning), as on the DLQ admin API.
    let Json(body) = body?;
    let reason = body.reason.trim();
    if reason.is_empty() || reason.len() > MAX_REASON_LEN {
        return Err(ApiError::bad_request(format!(
            "reason is required, at most {MAX_REASON_LEN} bytes"
        )));
    }
    let store = api.orchestrator.store();
    let saga = api.orchestrator.saga().name();
    if store.load(saga, &id).await?.is_none() {
        return Err(not_found(&id));
    }
    // The audit trail first: an action that lands is always explained.
    store
        .audit(AuditRecord::new(saga, &id, &actor, action, reason))
        .await?;
    let input = Input::Operator(OperatorAction::new(action, actor, reason));
    match api.orchestrator.handle(&id, input).await? {
        Outcome::Applied {
            version,
            state_name,
            finished,
            commands,
        } => Ok(Json(Acted {
            action,
            state: state_name,
            version,
            finished,
            commands,
        })
        .into_response()),
        Outcome::Finished => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("instance {id:?} has finished"),
        )),
        Outcome::Unknown => Err(not_found(&id)),
        _ => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("instance {id:?} does not take {action} at its current step"),
        )),
    }
}
