//! Replaying and discarding dead letters, with dry runs, a rate limit,
//! optional edits and an audit trail.
//!
//! A replay sends the dead letter's original envelope back to its topic
//! (or wherever [`Replayer::route`] says), addressed to the consumer group
//! that failed it (`surety-replay-group`): same id and key, the producer's
//! headers (so `traceparent` links it to the failed trace), plus
//! `surety-replay-count` and `surety-dlq-id` so the [`DlqLayer`](crate::DlqLayer)
//! can record how it went: resolved when handled, dead again (or parked
//! after too many replays) when it fails again. Retry bookkeeping is not
//! carried over: the replay starts again at attempt 1.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use surety_core::{Envelope, Publisher};

use crate::job::{Job, JobKind};
use crate::keys;
use crate::letter::{DeadLetter, Event, Status};
use crate::metrics::DlqMetrics;
use crate::store::{DlqStore, Filter, PageRequest, StoreError, Transition};
use surety_core::BoxPublisher;

/// The most dead letters one replay or discard acts on, by default.
pub const DEFAULT_MAX_BATCH: usize = 1000;
/// Longest accepted reason.
pub const MAX_REASON_LEN: usize = 1000;

/// Which dead letters an action selects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Selection {
    /// These ids. Replays by id also take parked and already replayed
    /// dead letters.
    Ids(Vec<String>),
    /// Every dead letter matching the filter. Replays by filter only take
    /// status `dead`; discards take `dead` and `parked`.
    Filter(Filter),
}

/// Longest header name or value an edit may set (an AMQP short string).
pub const MAX_HEADER_LEN: usize = 255;
/// Most headers one edit may set or remove.
pub const MAX_EDITED_HEADERS: usize = 64;
/// The prefix of Surety's own headers, which edits may not touch (compared
/// case-insensitively).
pub const RESERVED_PREFIX: &str = "surety-";

/// A change to the payload or headers of a replayed message. Requires a
/// reason.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct Edit {
    /// A new payload.
    pub payload: Option<Bytes>,
    /// A new content type.
    pub content_type: Option<String>,
    /// Headers to set. Keys starting with `surety-` are refused.
    pub set_headers: BTreeMap<String, String>,
    /// Headers to remove.
    pub remove_headers: Vec<String>,
}

impl Edit {
    /// No change.
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces the payload.
    pub fn payload(mut self, payload: impl Into<Bytes>) -> Self {
        self.payload = Some(payload.into());
        self
    }

    /// Replaces the content type.
    pub fn content_type(mut self, content_type: impl Into<String>) -> Self {
        self.content_type = Some(content_type.into());
        self
    }

    /// Sets a header.
    pub fn set_header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.set_headers.insert(key.into(), value.into());
        self
    }

    /// Removes a header.
    pub fn remove_header(mut self, key: impl Into<String>) -> Self {
        self.remove_headers.push(key.into());
        self
    }

    /// Whether the edit changes nothing.
    pub fn is_empty(&self) -> bool {
        self.payload.is_none()
            && self.content_type.is_none()
            && self.set_headers.is_empty()
            && self.remove_headers.is_empty()
    }

    /// Checks the edit: header names are 1 to [`MAX_HEADER_LEN`] token
    /// characters (RFC 9110: letters, digits and ``!#$%&'*+-.^_`|~``) and do
    /// not start with [`RESERVED_PREFIX`] in any case; values are at most
    /// [`MAX_HEADER_LEN`] bytes with no control characters (CR, LF, NUL,
    /// ...); at most [`MAX_EDITED_HEADERS`] headers; the content type is a
    /// `type/subtype` media type, optionally with parameters.
    pub fn validate(&self) -> Result<(), ReplayError> {
        let invalid = |m: String| Err(ReplayError::Invalid(m));
        let count = self.set_headers.len() + self.remove_headers.len();
        if count > MAX_EDITED_HEADERS {
            return invalid(format!(
                "{count} headers edited; at most {MAX_EDITED_HEADERS}"
            ));
        }
        for name in self.set_headers.keys().chain(&self.remove_headers) {
            if name.is_empty() || name.len() > MAX_HEADER_LEN || !name.bytes().all(is_token_byte) {
                return invalid(format!(
                    "header name {name:?} must be 1 to {MAX_HEADER_LEN} token characters \
                     (letters, digits, !#$%&'*+-.^_`|~)"
                ));
            }
            if name
                .get(..RESERVED_PREFIX.len())
                .is_some_and(|p| p.eq_ignore_ascii_case(RESERVED_PREFIX))
            {
                return invalid(format!(
                    "header {name:?} is Surety bookkeeping and cannot be edited"
                ));
            }
        }
        for (name, value) in &self.set_headers {
            if value.len() > MAX_HEADER_LEN {
                return invalid(format!(
                    "the value of header {name:?} is longer than {MAX_HEADER_LEN} bytes"
                ));
            }
            if value.chars().any(char::is_control) {
                return invalid(format!(
                    "the value of header {name:?} contains a control character (CR, LF, NUL, ...)"
                ));
            }
        }
        if let Some(ct) = &self.content_type
            && !is_media_type(ct)
        {
            return invalid(format!(
                "content type {ct:?} is not a media type like `application/json` \
                 (at most {MAX_HEADER_LEN} bytes)"
            ));
        }
        Ok(())
    }

    fn apply(&self, env: &mut Envelope) {
        if let Some(payload) = &self.payload {
            env.payload = payload.clone();
        }
        if let Some(ct) = &self.content_type {
            env.content_type = ct.clone();
        }
        for key in &self.remove_headers {
            env.headers.remove(key);
        }
        for (key, value) in &self.set_headers {
            env.headers.insert(key.clone(), value.clone());
        }
    }
}

/// A replay: what, by whom, why, and whether for real.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReplayRequest {
    /// Which dead letters.
    pub selection: Selection,
    /// Who asks (for the audit trail).
    pub actor: String,
    /// Why; required with an edit.
    pub reason: Option<String>,
    /// A change to payload or headers; only for a single id.
    pub edit: Option<Edit>,
    /// Report what would be replayed, change nothing.
    pub dry_run: bool,
    /// Also replay dead letters selected by id that were already replayed
    /// (status `replayed`). Off by default, so that a replay asked for twice
    /// (a retried request, two operators) publishes once.
    pub again: bool,
}

impl ReplayRequest {
    /// Replays the dead letters with `ids`.
    pub fn ids(actor: impl Into<String>, ids: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self::new(
            actor,
            Selection::Ids(ids.into_iter().map(Into::into).collect()),
        )
    }

    /// Replays the dead letters matching `filter`.
    pub fn filter(actor: impl Into<String>, filter: Filter) -> Self {
        Self::new(actor, Selection::Filter(filter))
    }

    /// A replay of `selection`.
    pub fn new(actor: impl Into<String>, selection: Selection) -> Self {
        Self {
            selection,
            actor: actor.into(),
            reason: None,
            edit: None,
            dry_run: false,
            again: false,
        }
    }

    /// Also replays dead letters (selected by id) already replayed.
    pub fn again(mut self, again: bool) -> Self {
        self.again = again;
        self
    }

    /// Sets the reason.
    pub fn reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    /// Sets an edit.
    pub fn edit(mut self, edit: Edit) -> Self {
        self.edit = Some(edit);
        self
    }

    /// Makes it a dry run.
    pub fn dry_run(mut self, dry_run: bool) -> Self {
        self.dry_run = dry_run;
        self
    }
}

/// A discard: what, by whom and why (required).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DiscardRequest {
    /// Which dead letters.
    pub selection: Selection,
    /// Who asks.
    pub actor: String,
    /// Why (required).
    pub reason: String,
    /// Report what would be discarded, change nothing.
    pub dry_run: bool,
}

impl DiscardRequest {
    /// Discards `selection` for `reason`.
    pub fn new(actor: impl Into<String>, selection: Selection, reason: impl Into<String>) -> Self {
        Self {
            selection,
            actor: actor.into(),
            reason: reason.into(),
            dry_run: false,
        }
    }

    /// Makes it a dry run.
    pub fn dry_run(mut self, dry_run: bool) -> Self {
        self.dry_run = dry_run;
        self
    }
}

/// A dead letter that was not acted on, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Skipped {
    /// The dead letter's id.
    pub id: String,
    /// Why: `not found`, `status parked`, a publish error, ...
    pub reason: String,
}

/// What a replay or discard did (or, for a dry run, would do).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ActionReport {
    /// Whether this was a dry run.
    pub dry_run: bool,
    /// The ids acted on (or that would be).
    pub done: Vec<String>,
    /// The ids left alone, with the reason.
    pub skipped: Vec<Skipped>,
    /// The ids that failed (publish errors), with the error.
    pub failed: Vec<Skipped>,
    /// The audit entry's id (none for dry runs).
    pub audit_id: Option<String>,
    /// The job that acted (none for dry runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
}

/// What [`Replayer::start_replay`] or [`Replayer::start_discard`] started.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Started {
    /// A dry run: what would be done. Nothing was written.
    DryRun(ActionReport),
    /// A job, written with its audit entry and ready to run.
    Job(Box<Job>),
}

/// How one dead letter of a job went.
enum Outcome {
    Done,
    Skipped(String),
    Failed(String),
}

/// Marks a job as running in this process while it lives.
struct RunGuard {
    running: Arc<Mutex<HashSet<String>>>,
    id: String,
}

impl RunGuard {
    fn claim(running: &Arc<Mutex<HashSet<String>>>, id: &str) -> Option<Self> {
        let mut set = running.lock().unwrap_or_else(PoisonError::into_inner);
        set.insert(id.to_owned()).then(|| Self {
            running: running.clone(),
            id: id.to_owned(),
        })
    }
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        self.running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

/// A per-letter store failure: logged in full, recorded without the
/// error text (job records are shown to API clients).
fn store_failed(job: &str, id: &str, err: &StoreError) -> Outcome {
    tracing::error!(job, dlq_id = id, error = %err, "DLQ job: the store failed for a letter");
    Outcome::Failed("the store failed (see the service's log)".into())
}

/// Whether `job` made the last change to `letter`.
fn acted_on_by(letter: &DeadLetter, job: &Job) -> bool {
    letter
        .history
        .last()
        .is_some_and(|e| e.job.as_deref() == Some(job.id.as_str()))
}

/// The status `letter` had before its last event.
fn status_before_last_event(letter: &DeadLetter) -> Status {
    let n = letter.history.len();
    n.checked_sub(2)
        .and_then(|i| letter.history.get(i))
        .map_or(Status::Dead, |e| e.status)
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_media_type(ct: &str) -> bool {
    if ct.len() > MAX_HEADER_LEN || ct.chars().any(char::is_control) {
        return false;
    }
    let essence = ct.split(';').next().unwrap_or_default().trim();
    let mut parts = essence.splitn(2, '/');
    let (Some(kind), Some(sub)) = (parts.next(), parts.next()) else {
        return false;
    };
    let token = |t: &str| !t.is_empty() && t.bytes().all(is_token_byte);
    token(kind) && token(sub) && ct.is_ascii()
}

/// A replay or discard could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplayError {
    /// The request is invalid (an HTTP 400).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The job is already running in this process.
    #[error("job {0} is already running")]
    AlreadyRunning(String),
}

type RouteFn = dyn Fn(&DeadLetter) -> String + Send + Sync;

/// Replays and discards dead letters kept in a [`DlqStore`].
///
/// ```
/// use std::sync::Arc;
/// use surety_core::{DeliveryInfo, Envelope, HandlerError, Subscriber};
/// use surety_core::memory::MemoryTransport;
/// use surety_dlq::policy::DeadLetterReason;
/// use surety_dlq::store::{DlqStore, Filter, MemoryDlqStore};
/// use surety_dlq::{DeadLetter, ReplayRequest, Replayer};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let transport = MemoryTransport::new();
/// let store = Arc::new(MemoryDlqStore::new());
/// let env = Envelope::builder("/shop", "order.placed").build();
/// let letter = DeadLetter::new(&env, &DeliveryInfo::new("memory", "orders", "billing"),
///     &HandlerError::permanent("no such customer"), DeadLetterReason::NotRetryable, 1, "billing", "h");
/// store.put(&letter).await?;
///
/// let replayer = Replayer::new(store.clone(), transport.clone());
/// let dry = replayer.replay(ReplayRequest::filter("alice", Filter::new().topic("orders")).dry_run(true)).await?;
/// assert_eq!(dry.done, [letter.id.clone()]);
///
/// let mut orders = transport.subscribe("orders", "billing").await?;
/// let report = replayer.replay(ReplayRequest::ids("alice", [letter.id.clone()]).reason("customer created")).await?;
/// assert_eq!(report.done.len(), 1);
/// # use futures::StreamExt;
/// let replayed = orders.next().await.unwrap()?;
/// assert_eq!(replayed.envelope().id, env.id); // same id
/// assert_eq!(replayed.envelope().headers.get("surety-replay-count"), Some("1"));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Replayer {
    store: Arc<dyn DlqStore>,
    publisher: BoxPublisher,
    route: Arc<RouteFn>,
    per_second: Option<u32>,
    max_batch: usize,
    metrics: DlqMetrics,
    running: Arc<Mutex<HashSet<String>>>,
    every_group: bool,
}

impl fmt::Debug for Replayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Replayer")
            .field("store", &self.store)
            .field("per_second", &self.per_second)
            .field("max_batch", &self.max_batch)
            .finish_non_exhaustive()
    }
}

impl Replayer {
    /// Replays from `store` through `publisher`, to each dead letter's
    /// source topic, without a rate limit.
    pub fn new(store: Arc<dyn DlqStore>, publisher: impl Publisher + 'static) -> Self {
        Self {
            store,
            publisher: BoxPublisher::borrowed(publisher),
            route: Arc::new(|letter: &DeadLetter| letter.source.topic.clone()),
            per_second: None,
            max_batch: DEFAULT_MAX_BATCH,
            metrics: DlqMetrics::default(),
            running: Arc::default(),
            every_group: false,
        }
    }

    /// Chooses the topic a dead letter is replayed to (default: its source
    /// topic; the copy is addressed to the failed group, see
    /// [`every_group`](Self::every_group)).
    pub fn route(mut self, route: impl Fn(&DeadLetter) -> String + Send + Sync + 'static) -> Self {
        self.route = Arc::new(route);
        self
    }

    /// Whether replays go to every consumer group of the topic (`true`) or
    /// only to the group that failed (`false`, the default). The replayed
    /// copy carries `surety-replay-group` naming the failed group; the
    /// core worker of every other group acknowledges it without handling
    /// it ([`surety_core::headers::addressed_to`]).
    pub fn every_group(mut self, every_group: bool) -> Self {
        self.every_group = every_group;
        self
    }

    /// Publishes at most `per_second` replays per second (0: no limit).
    pub fn rate_limit(mut self, per_second: u32) -> Self {
        self.per_second = (per_second > 0).then_some(per_second);
        self
    }

    /// Acts on at most `n` dead letters per request (default
    /// [`DEFAULT_MAX_BATCH`]); more ids are refused, a filter is cut there.
    pub fn max_batch(mut self, n: usize) -> Self {
        self.max_batch = n.max(1);
        self
    }

    /// Records into `metrics`.
    pub fn metrics(mut self, metrics: DlqMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn DlqStore> {
        &self.store
    }

    /// Replays as `request` says, to the end: a dry run, or a [`Job`]
    /// started and run in this task. Dropping the future mid-way stops the
    /// job where it is; [`resume`](Self::resume) finishes it. See
    /// [`start_replay`](Self::start_replay) to run it in the background.
    pub async fn replay(&self, request: ReplayRequest) -> Result<ActionReport, ReplayError> {
        match self.start_replay(request).await? {
            Started::DryRun(report) => Ok(report),
            Started::Job(job) => Ok(self.run(*job).await?.report()),
        }
    }

    /// Discards as `request` says, to the end: the dead letters get status
    /// `discarded` with the reason in their history. Like
    /// [`replay`](Self::replay), it runs as a [`Job`].
    pub async fn discard(&self, request: DiscardRequest) -> Result<ActionReport, ReplayError> {
        match self.start_discard(request).await? {
            Started::DryRun(report) => Ok(report),
            Started::Job(job) => Ok(self.run(*job).await?.report()),
        }
    }

    /// Validates `request` and picks the dead letters. A dry run answers
    /// what would be replayed; otherwise the audit entry and then the job
    /// are written (nothing else has changed yet) and the job is returned,
    /// ready for [`run`](Self::run) or [`spawn`](Self::spawn).
    pub async fn start_replay(&self, request: ReplayRequest) -> Result<Started, ReplayError> {
        validate_actor(&request.actor)?;
        let edit = request.edit.as_ref().filter(|e| !e.is_empty());
        let reason = validate_reason(request.reason.as_deref(), edit.is_some())?;
        if let Some(edit) = edit {
            if !matches!(&request.selection, Selection::Ids(ids) if ids.len() == 1) {
                return Err(ReplayError::Invalid(
                    "an edit applies to exactly one dead letter: select it by id".into(),
                ));
            }
            edit.validate()?;
        }
        let allowed: &[Status] = match (&request.selection, request.again) {
            (Selection::Ids(_), false) => &[Status::Dead, Status::Parked],
            (Selection::Ids(_), true) => &[Status::Dead, Status::Parked, Status::Replayed],
            (Selection::Filter(_), _) => &[Status::Dead],
        };
        let (candidates, skipped) = self.select(&request.selection, allowed).await?;
        if request.dry_run {
            let mut report = ActionReport {
                dry_run: true,
                ..ActionReport::default()
            };
            report.done = candidates.iter().map(|l| l.id.clone()).collect();
            report.skipped = skipped;
            for _ in &report.done {
                self.metrics.replayed("dry_run");
            }
            return Ok(Started::DryRun(report));
        }
        let mut job = Job::new(
            JobKind::Replay,
            &request.actor,
            reason,
            request.selection,
            allowed,
        );
        job.edit = edit.cloned();
        job.ids = candidates.into_iter().map(|l| l.id).collect();
        job.skipped = skipped;
        self.record_intent(&job).await?;
        Ok(Started::Job(Box::new(job)))
    }

    /// Like [`start_replay`](Self::start_replay), for a discard.
    pub async fn start_discard(&self, request: DiscardRequest) -> Result<Started, ReplayError> {
        validate_actor(&request.actor)?;
        let reason = validate_reason(Some(&request.reason), true)?.unwrap_or_default();
        let allowed: &[Status] = match &request.selection {
            Selection::Ids(_) => &[Status::Dead, Status::Parked, Status::Replayed],
            Selection::Filter(_) => &[Status::Dead, Status::Parked],
        };
        let (candidates, skipped) = self.select(&request.selection, allowed).await?;
        if request.dry_run {
            let mut report = ActionReport {
                dry_run: true,
                ..ActionReport::default()
            };
            report.done = candidates.iter().map(|l| l.id.clone()).collect();
            report.skipped = skipped;
            return Ok(Started::DryRun(report));
        }
        let mut job = Job::new(
            JobKind::Discard,
            &request.actor,
            Some(reason),
            request.selection,
            allowed,
        );
        job.ids = candidates.into_iter().map(|l| l.id).collect();
        job.skipped = skipped;
        self.record_intent(&job).await?;
        Ok(Started::Job(Box::new(job)))
    }

    /// The audit entry first, then the job: if either write fails nothing
    /// has been acted on, and a job in the store always has its entry.
    async fn record_intent(&self, job: &Job) -> Result<(), ReplayError> {
        self.store.append_audit(&job.audit_entry()).await?;
        self.store.put_job(job).await?;
        Ok(())
    }

    /// The job with `id`, as last written.
    pub async fn job(&self, id: &str) -> Result<Option<Job>, ReplayError> {
        Ok(self.store.get_job(id).await?)
    }

    /// Runs `job` in a background task ([`run`](Self::run)), retrying with
    /// a doubling backoff (about two minutes in all) when the store fails;
    /// after that the job stays unfinished for [`resume`](Self::resume).
    /// Dropping the handle does not stop it.
    pub fn spawn(&self, job: Job) -> tokio::task::JoinHandle<Result<Job, ReplayError>> {
        let replayer = self.clone();
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(100);
            let mut job = job;
            loop {
                match replayer.run(job.clone()).await {
                    Err(ReplayError::Store(e)) if delay < Duration::from_secs(60) => {
                        tracing::warn!(job = %job.id, error = %e, "DLQ job stopped on a store error; retrying");
                        tokio::time::sleep(delay).await;
                        delay *= 2;
                        if let Ok(Some(latest)) = replayer.store.get_job(&job.id).await {
                            job = latest;
                        }
                    }
                    other => return other,
                }
            }
        })
    }

    /// Runs the jobs a previous process left unfinished, one after the
    /// other, and returns them finished. Call it once at start-up (with one
    /// replayer per store; two processes resuming one job could publish its
    /// in-flight letter twice, with the same message id).
    pub async fn resume(&self) -> Result<Vec<Job>, ReplayError> {
        let mut out = Vec::new();
        for job in self.store.unfinished_jobs().await? {
            match self.run(job).await {
                Ok(job) => out.push(job),
                Err(ReplayError::AlreadyRunning(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Runs `job` from where it stands to the end: each remaining dead
    /// letter is acted on and recorded; then the audit entry gets the
    /// outcome and the job is marked finished. Stops with an error only when
    /// the store fails while a letter's state is unknown (the job stays
    /// unfinished, to be run again); a job already running in this process
    /// answers [`ReplayError::AlreadyRunning`].
    pub async fn run(&self, mut job: Job) -> Result<Job, ReplayError> {
        let _running = RunGuard::claim(&self.running, &job.id)
            .ok_or_else(|| ReplayError::AlreadyRunning(job.id.clone()))?;
        if job.finished {
            return Ok(job);
        }
        let mut ticker = match job.kind {
            JobKind::Replay => self.per_second.map(|n| {
                let period = (Duration::from_secs(1) / n).max(Duration::from_micros(1));
                let mut t = tokio::time::interval(period);
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                t
            }),
            JobKind::Discard => None,
        };
        while let Some(id) = job.ids.get(job.next).cloned() {
            let outcome = match job.kind {
                JobKind::Replay => {
                    if let Some(t) = ticker.as_mut() {
                        t.tick().await;
                    }
                    self.replay_letter(&job, &id).await?
                }
                JobKind::Discard => self.discard_letter(&job, &id).await?,
            };
            match outcome {
                Outcome::Done => job.done.push(id),
                Outcome::Skipped(reason) => {
                    if job.kind == JobKind::Replay {
                        self.metrics.replayed("skipped");
                    }
                    job.skipped.push(Skipped { id, reason });
                }
                Outcome::Failed(reason) => job.failed.push(Skipped { id, reason }),
            }
            job.next += 1;
            job.updated_at = Utc::now();
            self.store.put_job(&job).await?;
        }
        job.finished = true;
        job.updated_at = Utc::now();
        self.store.append_audit(&job.audit_entry()).await?;
        self.store.put_job(&job).await?;
        Ok(job)
    }

    /// Replays one dead letter of `job`.
    async fn replay_letter(&self, job: &Job, id: &str) -> Result<Outcome, StoreError> {
        let letter = match self.store.get(id).await {
            Ok(Some(letter)) => letter,
            Ok(None) => return Ok(Outcome::Skipped("not found".into())),
            Err(e) => return Ok(store_failed(&job.id, id, &e)),
        };
        if acted_on_by(&letter, job) {
            // Claimed by this job before it stopped: publish again if the
            // publish was not recorded.
            return if letter.status == Status::Replaying {
                let previous = status_before_last_event(&letter);
                self.publish_claimed(job, letter, previous).await
            } else {
                Ok(Outcome::Done)
            };
        }
        if !job.allowed.contains(&letter.status) {
            return Ok(Outcome::Skipped(format!(
                "status {}",
                letter.status.as_str()
            )));
        }
        let previous = letter.status;
        let mut event = Event::new(&job.actor, "replaying", Status::Replaying)
            .edited(job.edit.is_some())
            .job(&job.id);
        event.reason = job.reason.clone();
        let claim = Transition::new([previous], event).replay();
        let claimed = match self.store.transition(id, &claim).await {
            Ok(Some(claimed)) => claimed,
            Ok(None) => return Ok(Outcome::Skipped("status changed meanwhile".into())),
            Err(e) => {
                // Did the claim commit? Read it back; if that fails too,
                // stop: the job is resumed later and looks again.
                let now = self.store.get(id).await?;
                match now {
                    Some(l) if acted_on_by(&l, job) && l.status == Status::Replaying => l,
                    _ => return Ok(store_failed(&job.id, id, &e)),
                }
            }
        };
        self.publish_claimed(job, claimed, previous).await
    }

    /// Publishes a dead letter this job claimed, then records the outcome:
    /// `replayed`, or back to `previous` with the count restored.
    async fn publish_claimed(
        &self,
        job: &Job,
        claimed: DeadLetter,
        previous: Status,
    ) -> Result<Outcome, StoreError> {
        let mut envelope = replay_envelope(&claimed, job.edit.as_ref());
        if self.every_group {
            envelope.headers.remove(keys::REPLAY_GROUP);
        }
        let topic = (self.route)(&claimed);
        match self.publisher.publish(&topic, envelope).await {
            Ok(_) => {
                self.metrics.replayed("published");
                let mut event = Event::new(&job.actor, "replayed", Status::Replayed)
                    .edited(job.edit.is_some())
                    .job(&job.id);
                event.reason = job.reason.clone();
                // `None`: the copy was handled (resolved) or failed again
                // (dead) before this; it was published all the same. A
                // store error leaves it `replaying` for the resumed job.
                self.store
                    .transition(&claimed.id, &Transition::new([Status::Replaying], event))
                    .await?;
                Ok(Outcome::Done)
            }
            Err(err) => {
                self.metrics.replayed("failed");
                let back = Transition::new(
                    [Status::Replaying],
                    Event::new(&job.actor, "replay_failed", previous)
                        .reason(err.to_string())
                        .job(&job.id),
                )
                .undo_replay();
                self.store.transition(&claimed.id, &back).await?;
                Ok(Outcome::Failed(format!("publish to {topic} failed: {err}")))
            }
        }
    }

    /// Discards one dead letter of `job`.
    async fn discard_letter(&self, job: &Job, id: &str) -> Result<Outcome, StoreError> {
        let letter = match self.store.get(id).await {
            Ok(Some(letter)) => letter,
            Ok(None) => return Ok(Outcome::Skipped("not found".into())),
            Err(e) => return Ok(store_failed(&job.id, id, &e)),
        };
        if acted_on_by(&letter, job) {
            return Ok(Outcome::Done);
        }
        if !job.allowed.contains(&letter.status) {
            return Ok(Outcome::Skipped(format!(
                "status {}",
                letter.status.as_str()
            )));
        }
        let mut event = Event::new(&job.actor, "discarded", Status::Discarded).job(&job.id);
        event.reason = job.reason.clone();
        let transition = Transition::new([letter.status], event);
        match self.store.transition(id, &transition).await {
            Ok(Some(_)) => Ok(Outcome::Done),
            Ok(None) => Ok(Outcome::Skipped("status changed meanwhile".into())),
            Err(e) => match self.store.get(id).await? {
                Some(l) if acted_on_by(&l, job) => Ok(Outcome::Done),
                _ => Ok(store_failed(&job.id, id, &e)),
            },
        }
    }

    /// The dead letters `selection` picks that are in an `allowed` status,
    /// and the ones it picks that are not.
    async fn select(
        &self,
        selection: &Selection,
        allowed: &[Status],
    ) -> Result<(Vec<DeadLetter>, Vec<Skipped>), ReplayError> {
        let mut picked = Vec::new();
        let mut skipped = Vec::new();
        match selection {
            Selection::Ids(ids) => {
                if ids.is_empty() {
                    return Err(ReplayError::Invalid("no ids given".into()));
                }
                if ids.len() > self.max_batch {
                    return Err(ReplayError::Invalid(format!(
                        "{} ids given; at most {} per request",
                        ids.len(),
                        self.max_batch
                    )));
                }
                let mut seen = std::collections::HashSet::new();
                for id in ids {
                    if !seen.insert(id.as_str()) {
                        continue;
                    }
                    match self.store.get(id).await? {
                        None => skipped.push(Skipped {
                            id: id.clone(),
                            reason: "not found".into(),
                        }),
                        Some(l) if !allowed.contains(&l.status) => skipped.push(Skipped {
                            id: id.clone(),
                            reason: format!("status {}", l.status.as_str()),
                        }),
                        Some(l) => picked.push(l),
                    }
                }
            }
            Selection::Filter(filter) => {
                let mut filter = filter.clone();
                filter.status = if filter.status.is_empty() {
                    allowed.to_vec()
                } else {
                    filter
                        .status
                        .iter()
                        .copied()
                        .filter(|s| allowed.contains(s))
                        .collect()
                };
                if filter.status.is_empty() {
                    return Ok((picked, skipped));
                }
                let mut page = PageRequest::first(self.max_batch.min(500) as u32);
                loop {
                    let result = self.store.list(&filter, &page).await?;
                    let room = self.max_batch - picked.len();
                    // The store's query should select exactly this; never
                    // act on a letter the filter does not match.
                    picked.extend(
                        result
                            .items
                            .into_iter()
                            .filter(|l| filter.matches(l))
                            .take(room),
                    );
                    match result.next {
                        Some(next) if picked.len() < self.max_batch => {
                            page = PageRequest::after(page.limit, next);
                        }
                        _ => break,
                    }
                }
            }
        }
        Ok((picked, skipped))
    }
}

/// The message a replay publishes for `letter` (after the replay count went
/// up), addressed to the group that failed it (`surety-replay-group`).
pub fn replay_envelope(letter: &DeadLetter, edit: Option<&Edit>) -> Envelope {
    let mut env = crate::letter::strip_bookkeeping(&letter.envelope);
    if let Some(edit) = edit {
        edit.apply(&mut env);
    }
    env.headers
        .insert(keys::REPLAY_GROUP, letter.source.group.clone());
    env.headers
        .set_parsed(keys::REPLAY_COUNT, letter.replay_count);
    env.headers.insert(keys::DLQ_ID, letter.id.clone());
    if let Some(trace) = &letter.trace_id {
        env.headers.insert(keys::DLQ_TRACE_ID, trace.clone());
    }
    env
}

fn validate_actor(actor: &str) -> Result<(), ReplayError> {
    if actor.trim().is_empty() || actor.len() > 200 {
        return Err(ReplayError::Invalid(
            "actor must be 1 to 200 characters".into(),
        ));
    }
    Ok(())
}

fn validate_reason(reason: Option<&str>, required: bool) -> Result<Option<&str>, ReplayError> {
    let reason = reason.map(str::trim).filter(|r| !r.is_empty());
    match reason {
        None if required => Err(ReplayError::Invalid("a reason is required".into())),
        Some(r) if r.len() > MAX_REASON_LEN => Err(ReplayError::Invalid(format!(
            "reason is longer than {MAX_REASON_LEN} bytes"
        ))),
        other => Ok(other),
    }
}
