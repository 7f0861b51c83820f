//! Replaying and discarding dead letters, with dry runs, a rate limit,
//! optional edits and an audit trail.
//!
//! A replay sends the dead letter's original envelope back to its topic
//! (or wherever [`Replayer::route`] says): same id and key, the producer's
//! headers (so `traceparent` links it to the failed trace), plus
//! `surety-replay-count` and `surety-dlq-id` so the [`DlqLayer`](crate::DlqLayer)
//! can record how it went: resolved when handled, dead again (or parked
//! after too many replays) when it fails again. Retry bookkeeping is not
//! carried over: the replay starts again at attempt 1.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use surety_core::{Envelope, Publisher};

use crate::keys;
use crate::letter::{DeadLetter, Event, Status};
use crate::metrics::DlqMetrics;
use crate::sink::DynPublisher;
use crate::store::{
    AuditEntry, AuditSelection, DlqStore, Filter, PageRequest, StoreError, Transition,
};

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

/// A change to the payload or headers of a replayed message. Requires a
/// reason.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
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
        }
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
}

type RouteFn = dyn Fn(&DeadLetter) -> String + Send + Sync;

/// Replays and discards dead letters kept in a [`DlqStore`].
///
/// ```
/// use std::sync::Arc;
/// use surety_core::{DeliveryInfo, Envelope, HandlerError, Subscriber};
/// use surety_core::memory::MemoryTransport;
/// use surety_dlq::policy::DeadLetterReason;
/// use surety_dlq::store::{DlqStore, Filter, MemoryStore};
/// use surety_dlq::{DeadLetter, ReplayRequest, Replayer};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let transport = MemoryTransport::new();
/// let store = Arc::new(MemoryStore::new());
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
    publisher: DynPublisher,
    route: Arc<RouteFn>,
    per_second: Option<u32>,
    max_batch: usize,
    metrics: DlqMetrics,
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
            publisher: DynPublisher::new(publisher),
            route: Arc::new(|letter: &DeadLetter| letter.source.topic.clone()),
            per_second: None,
            max_batch: DEFAULT_MAX_BATCH,
            metrics: DlqMetrics::default(),
        }
    }

    /// Chooses the topic a dead letter is replayed to (default: its source
    /// topic, which every group of that topic receives; route to a
    /// group-specific topic or queue to reach only the failed group).
    pub fn route(mut self, route: impl Fn(&DeadLetter) -> String + Send + Sync + 'static) -> Self {
        self.route = Arc::new(route);
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

    /// Replays as `request` says; see the module docs.
    pub async fn replay(&self, request: ReplayRequest) -> Result<ActionReport, ReplayError> {
        validate_actor(&request.actor)?;
        let edit = request.edit.as_ref().filter(|e| !e.is_empty());
        let reason = validate_reason(request.reason.as_deref(), edit.is_some())?;
        if let Some(edit) = edit {
            if !matches!(&request.selection, Selection::Ids(ids) if ids.len() == 1) {
                return Err(ReplayError::Invalid(
                    "an edit applies to exactly one dead letter: select it by id".into(),
                ));
            }
            if let Some(key) = edit
                .set_headers
                .keys()
                .chain(edit.remove_headers.iter())
                .find(|k| k.starts_with("surety-") || k.is_empty())
            {
                return Err(ReplayError::Invalid(format!(
                    "header {key:?} cannot be edited (empty, or Surety bookkeeping)"
                )));
            }
        }
        let allowed: &[Status] = match &request.selection {
            Selection::Ids(_) => &[Status::Dead, Status::Parked, Status::Replayed],
            Selection::Filter(_) => &[Status::Dead],
        };
        let (candidates, mut skipped) = self.select(&request.selection, allowed).await?;
        let mut report = ActionReport {
            dry_run: request.dry_run,
            ..ActionReport::default()
        };
        if request.dry_run {
            report.done = candidates.iter().map(|l| l.id.clone()).collect();
            report.skipped = skipped;
            for _ in &report.done {
                self.metrics.replayed("dry_run");
            }
            return Ok(report);
        }
        let mut ticker = self.per_second.map(|n| {
            let period = (Duration::from_secs(1) / n).max(Duration::from_micros(1));
            let mut t = tokio::time::interval(period);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        });
        for letter in candidates {
            if let Some(t) = ticker.as_mut() {
                t.tick().await;
            }
            let event =
                Event::new(&request.actor, "replayed", Status::Replayed).edited(edit.is_some());
            let event = match reason {
                Some(r) => event.reason(r),
                None => event,
            };
            let transition = Transition::new(allowed.iter().copied(), event).replay();
            let Some(updated) = self.store.transition(&letter.id, &transition).await? else {
                skipped.push(Skipped {
                    id: letter.id.clone(),
                    reason: "status changed meanwhile".into(),
                });
                continue;
            };
            let envelope = replay_envelope(&updated, edit);
            let topic = (self.route)(&updated);
            match self.publisher.publish(&topic, envelope).await {
                Ok(_) => {
                    self.metrics.replayed("published");
                    report.done.push(updated.id.clone());
                }
                Err(err) => {
                    self.metrics.replayed("failed");
                    let back = Transition::new(
                        [Status::Replayed],
                        Event::new(&request.actor, "replay_failed", letter.status)
                            .reason(err.to_string()),
                    );
                    if let Err(e) = self.store.transition(&letter.id, &back).await {
                        tracing::warn!(dlq_id = %letter.id, error = %e, "could not undo a failed replay");
                    }
                    report.failed.push(Skipped {
                        id: letter.id.clone(),
                        reason: format!("publish to {topic} failed: {err}"),
                    });
                }
            }
        }
        for _ in &skipped {
            self.metrics.replayed("skipped");
        }
        report.skipped = skipped;
        let mut entry = AuditEntry::new(&request.actor, "replay");
        entry.reason = reason.map(str::to_owned);
        entry.selection = audit_selection(&request.selection);
        entry.edited = edit.is_some();
        entry.succeeded = report.done.clone();
        entry.failed = report
            .skipped
            .iter()
            .chain(&report.failed)
            .map(|s| s.id.clone())
            .collect();
        self.store.append_audit(&entry).await?;
        report.audit_id = Some(entry.id);
        Ok(report)
    }

    /// Discards as `request` says: the dead letters get status `discarded`
    /// with the reason in their history.
    pub async fn discard(&self, request: DiscardRequest) -> Result<ActionReport, ReplayError> {
        validate_actor(&request.actor)?;
        let reason = validate_reason(Some(&request.reason), true)?.unwrap_or_default();
        let allowed = [Status::Dead, Status::Parked, Status::Replayed];
        let allowed: &[Status] = match &request.selection {
            Selection::Ids(_) => &allowed,
            Selection::Filter(_) => &allowed[..2],
        };
        let (candidates, mut skipped) = self.select(&request.selection, allowed).await?;
        let mut report = ActionReport {
            dry_run: request.dry_run,
            ..ActionReport::default()
        };
        if request.dry_run {
            report.done = candidates.iter().map(|l| l.id.clone()).collect();
            report.skipped = skipped;
            return Ok(report);
        }
        for letter in candidates {
            let transition = Transition::new(
                allowed.iter().copied(),
                Event::new(&request.actor, "discarded", Status::Discarded).reason(reason),
            );
            match self.store.transition(&letter.id, &transition).await? {
                Some(_) => report.done.push(letter.id),
                None => skipped.push(Skipped {
                    id: letter.id,
                    reason: "status changed meanwhile".into(),
                }),
            }
        }
        report.skipped = skipped;
        let mut entry = AuditEntry::new(&request.actor, "discard");
        entry.reason = Some(reason.to_owned());
        entry.selection = audit_selection(&request.selection);
        entry.succeeded = report.done.clone();
        entry.failed = report.skipped.iter().map(|s| s.id.clone()).collect();
        self.store.append_audit(&entry).await?;
        report.audit_id = Some(entry.id);
        Ok(report)
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
                    picked.extend(result.items.into_iter().take(room));
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

/// The message a replay publishes for `letter` (after the replay count went up).
pub fn replay_envelope(letter: &DeadLetter, edit: Option<&Edit>) -> Envelope {
    let mut env = crate::letter::strip_bookkeeping(&letter.envelope);
    if let Some(edit) = edit {
        edit.apply(&mut env);
    }
    env.headers
        .set_parsed(keys::REPLAY_COUNT, letter.replay_count);
    env.headers.insert(keys::DLQ_ID, letter.id.clone());
    if let Some(trace) = &letter.trace_id {
        env.headers.insert(keys::DLQ_TRACE_ID, trace.clone());
    }
    env
}

fn audit_selection(selection: &Selection) -> AuditSelection {
    let mut s = AuditSelection::default();
    match selection {
        Selection::Ids(ids) => s.ids = ids.clone(),
        Selection::Filter(f) => s.filter = Some(f.clone()),
    }
    s
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
