//! Where saga instances live: the [`SagaStore`] port and the in-memory
//! [`MemorySagaStore`].
//!
//! One [`Write`] stores the new state (checked against the version the
//! orchestrator loaded), a history row, the outgoing commands and the timer
//! changes, all or nothing.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use surety_core::{Classify, Envelope, ErrorClass};

/// A stored saga instance.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct InstanceRecord {
    /// The saga's [name](crate::Saga::name).
    pub saga: String,
    /// The saga id (the correlation id of its messages).
    pub id: String,
    /// The state, as JSON.
    pub state: serde_json::Value,
    /// The name of the state's step.
    pub state_name: String,
    /// Bumped by every stored transition; 1 after the start.
    pub version: u64,
    /// Whether the state is final.
    pub finished: bool,
    /// When the instance last moved (the stored transition's time).
    pub updated_at: DateTime<Utc>,
    /// The schema version `state` was written at (1 unless the saga's
    /// state is upcast, see [`Orchestrator::upcast_state`](crate::Orchestrator::upcast_state)).
    pub state_version: u32,
}

/// One row of an instance's history: the input applied and where it led.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub struct HistoryRecord {
    /// The instance version this row produced.
    pub version: u64,
    /// The input, as JSON (an [`Input`](crate::Input)); `None` for the start.
    pub input: Option<serde_json::Value>,
    /// The state after the input, as JSON.
    pub state: serde_json::Value,
    /// The name of the step after the input.
    pub state_name: String,
    /// When the row was written.
    pub at: DateTime<Utc>,
    /// The trace of the input (the W3C trace id of its `traceparent`), when
    /// it came with one.
    pub trace_id: Option<String>,
    /// The name of the step before the input; `None` for the start.
    pub from_state: Option<String>,
    /// The commands the transition sent, in order.
    pub commands: Vec<SentCommand>,
    /// For a fired timer, the due time it had been set to: a timer fires
    /// once, so no two rows of an instance share a timer name and due time.
    pub timer_due: Option<DateTime<Utc>>,
}

/// A command a transition sent, as its history row names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SentCommand {
    /// Where it was sent.
    pub topic: String,
    /// Its message type.
    pub message_type: String,
    /// Its message id (the participant's deduplication key).
    pub id: String,
}

impl SentCommand {
    /// The command `message_type` with id `id`, sent to `topic`.
    pub fn new(
        topic: impl Into<String>,
        message_type: impl Into<String>,
        id: impl Into<String>,
    ) -> Self {
        Self {
            topic: topic.into(),
            message_type: message_type.into(),
            id: id.into(),
        }
    }
}

/// Inputs that changed nothing (a duplicate or late reply, an ignored
/// timer or operator action), counted per (instance version, input, outcome)
/// instead of a row each, so a reply storm cannot grow an instance's
/// history: at most one row per input kind per version the instance went
/// through.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct NoopRecord {
    /// The instance version the inputs found (they did not change it).
    pub version: u64,
    /// The input: the reply's type, `timeout <name>` or `operator <action>`.
    pub input: String,
    /// Why nothing happened: `ignored` (the definition ignored it) or
    /// `finished` (the instance had finished).
    pub outcome: String,
    /// How many such inputs arrived.
    pub count: u64,
    /// When the first arrived.
    pub first_at: DateTime<Utc>,
    /// When the last arrived.
    pub last_at: DateTime<Utc>,
    /// The trace of the last one, when it came with one.
    pub trace_id: Option<String>,
}

impl NoopRecord {
    /// One input `input` that found the instance at `version` and did
    /// nothing (`outcome`), at `at`.
    pub fn new(
        version: u64,
        input: impl Into<String>,
        outcome: impl Into<String>,
        at: DateTime<Utc>,
        trace_id: Option<String>,
    ) -> Self {
        Self {
            version,
            input: input.into(),
            outcome: outcome.into(),
            count: 1,
            first_at: at,
            last_at: at,
            trace_id,
        }
    }
}

/// A pending timer.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct TimerRecord {
    /// The saga's name.
    pub saga: String,
    /// The saga id.
    pub id: String,
    /// The timer's name.
    pub name: String,
    /// When it falls due.
    pub due: DateTime<Utc>,
}

/// An instance as an operator lists it.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub struct InstanceSummary {
    /// The saga's name.
    pub saga: String,
    /// The saga id.
    pub id: String,
    /// The name of the step it is at.
    pub state_name: String,
    /// Its version (stored transitions).
    pub version: u64,
    /// Whether it is finished.
    pub finished: bool,
    /// When it started.
    pub created_at: DateTime<Utc>,
    /// When it last moved.
    pub updated_at: DateTime<Utc>,
    /// Its state, as JSON.
    pub state: serde_json::Value,
}

/// Which instances to list; every field that is set must match.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ListFilter {
    /// Only this saga type.
    pub saga: Option<String>,
    /// Only instances at this step.
    pub state_name: Option<String>,
    /// Only finished (`true`) or unfinished (`false`) instances.
    pub finished: Option<bool>,
    /// Only instances started at or before this time (older ones).
    pub started_before: Option<DateTime<Utc>>,
    /// Only unfinished instances that have not moved since this time
    /// ("stuck").
    pub idle_since: Option<DateTime<Utc>>,
    /// At most this many, least recently moved first.
    pub limit: usize,
}

impl ListFilter {
    /// No condition, at most `limit` instances.
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            ..Self::default()
        }
    }

    fn matches(&self, instance: &InstanceSummary) -> bool {
        self.saga.as_ref().is_none_or(|s| *s == instance.saga)
            && self
                .state_name
                .as_ref()
                .is_none_or(|s| *s == instance.state_name)
            && self.finished.is_none_or(|f| f == instance.finished)
            && self
                .started_before
                .is_none_or(|at| instance.created_at <= at)
            && self
                .idle_since
                .is_none_or(|at| !instance.finished && instance.updated_at <= at)
    }
}

/// One entry of the operator audit trail.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct AuditRecord {
    /// The saga's name.
    pub saga: String,
    /// The saga id.
    pub id: String,
    /// Who acted.
    pub actor: String,
    /// What they asked for.
    pub action: String,
    /// Why, in their words.
    pub reason: String,
    /// When.
    pub at: DateTime<Utc>,
}

impl AuditRecord {
    /// An entry for `action` by `actor` on instance `id` of `saga`, now.
    pub fn new(
        saga: impl Into<String>,
        id: impl Into<String>,
        actor: impl Into<String>,
        action: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Self {
            saga: saga.into(),
            id: id.into(),
            actor: actor.into(),
            action: action.into(),
            reason: reason.into(),
            at: Utc::now(),
        }
    }
}

/// Everything one applied input changes, written in one transaction.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Write {
    /// The instance after the input; its `version` is the new version.
    pub instance: InstanceRecord,
    /// The history row for the input.
    pub history: HistoryRecord,
    /// The commands to relay, with their destination.
    pub commands: Vec<(String, Envelope)>,
    /// Timers to set or reset, by name.
    pub set_timers: Vec<(String, DateTime<Utc>)>,
    /// Timers to cancel, by name (applied before `set_timers`).
    pub cancel_timers: Vec<String>,
    /// The timer whose firing this write records: the write fails with
    /// [`StoreError::TimerGone`] unless that exact timer is still pending.
    pub fired_timer: Option<TimerRecord>,
}

/// Why a store could not load or write.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The instance changed since it was loaded (or, on a start, exists).
    #[error("saga {saga} {id} changed concurrently (expected version {expected})")]
    Conflict {
        /// The saga's name.
        saga: String,
        /// The saga id.
        id: String,
        /// The version the writer loaded.
        expected: u64,
    },
    /// The fired timer was cancelled or reset meanwhile.
    #[error("timer {name} of saga {id} is no longer pending as fired")]
    TimerGone {
        /// The saga id.
        id: String,
        /// The timer's name.
        name: String,
    },
    /// A start of an instance that finished and was purged (a start
    /// delivered again after the retention period): nothing was written.
    #[error("saga {saga} {id} finished and was purged; it is not started again")]
    Purged {
        /// The saga's name.
        saga: String,
        /// The saga id.
        id: String,
    },
    /// The database failed; its [kind](surety_core::store::StoreErrorKind)
    /// decides the class (a lost connection is transient, a constraint
    /// violation permanent).
    #[error("saga store failed: {0}")]
    Backend(#[source] surety_core::store::StoreError),
}

impl Classify for StoreError {
    fn class(&self) -> ErrorClass {
        match self {
            StoreError::Conflict { .. } | StoreError::TimerGone { .. } => {
                ErrorClass::Transient { retry_after: None }
            }
            StoreError::Purged { .. } => ErrorClass::Permanent,
            StoreError::Backend(error) => error.class(),
        }
    }
}

/// Storage for saga instances, their history, timers and outgoing commands.
///
/// A SQL implementation writes [`Write`] in one transaction, with the
/// commands going into the outbox table so the outbox relay sends them.
pub trait SagaStore: Send + Sync {
    /// Loads an instance, if it exists.
    fn load(
        &self,
        saga: &str,
        id: &str,
    ) -> impl Future<Output = Result<Option<InstanceRecord>, StoreError>> + Send;

    /// Writes `write` atomically. The stored version must be
    /// `write.instance.version - 1` (no row at all when that is 0), else
    /// [`StoreError::Conflict`].
    fn write(&self, write: Write) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Timers of `saga` due at `now`, earliest first, at most `limit`.
    fn due_timers(
        &self,
        saga: &str,
        now: DateTime<Utc>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<TimerRecord>, StoreError>> + Send;

    /// Deletes `timer` if it is still pending with the same due time (a
    /// fired timer the definition ignored). Returns whether it was.
    fn delete_timer(
        &self,
        timer: &TimerRecord,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// An instance's history, oldest first.
    fn history(
        &self,
        saga: &str,
        id: &str,
    ) -> impl Future<Output = Result<Vec<HistoryRecord>, StoreError>> + Send;

    /// Records an input that changed nothing on instance `id`: adds
    /// `noop.count` to the record of the same (version, input, outcome),
    /// or creates it; see [`NoopRecord`].
    fn record_noop(
        &self,
        saga: &str,
        id: &str,
        noop: NoopRecord,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// An instance's no-op records, by version then input.
    fn noops(
        &self,
        saga: &str,
        id: &str,
    ) -> impl Future<Output = Result<Vec<NoopRecord>, StoreError>> + Send;

    /// Instances matching `filter`, least recently moved first.
    fn list(
        &self,
        filter: &ListFilter,
    ) -> impl Future<Output = Result<Vec<InstanceSummary>, StoreError>> + Send;

    /// The unfinished instances of `saga` counted by step: `(step, all,
    /// idle)`, where `idle` counts those that have not moved since
    /// `idle_since` (the stuck ones). Counts every instance, however many.
    fn unfinished_counts(
        &self,
        saga: &str,
        idle_since: DateTime<Utc>,
    ) -> impl Future<Output = Result<Vec<(String, u64, u64)>, StoreError>> + Send;

    /// Deletes up to `limit` instances of `saga` that finished before
    /// `before`, with their history and timers (the retention policy; the
    /// audit trail stays). Unfinished instances are never deleted. Returns
    /// how many were deleted.
    ///
    /// Each purged instance leaves a tombstone of its id: a start written
    /// for it later (a start message delivered again) fails with
    /// [`StoreError::Purged`] and the orchestrator answers
    /// [`Outcome::AlreadyStarted`](crate::Outcome::AlreadyStarted).
    /// Tombstones are kept (a saga name and id each).
    fn purge_finished(
        &self,
        saga: &str,
        before: DateTime<Utc>,
        limit: usize,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Appends to the operator audit trail.
    fn audit(&self, entry: AuditRecord) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// An instance's audit trail, oldest first.
    fn audit_log(
        &self,
        saga: &str,
        id: &str,
    ) -> impl Future<Output = Result<Vec<AuditRecord>, StoreError>> + Send;
}

type Key = (String, String);

#[derive(Debug, Default)]
struct Inner {
    instances: BTreeMap<Key, InstanceRecord>,
    history: BTreeMap<Key, Vec<HistoryRecord>>,
    noops: BTreeMap<Key, BTreeMap<(u64, String, String), NoopRecord>>,
    /// The ids of purged instances.
    purged: std::collections::BTreeSet<Key>,
    timers: BTreeMap<(String, String, String), DateTime<Utc>>,
    outbox: Vec<(String, Envelope)>,
    /// When each instance started and last moved.
    times: BTreeMap<Key, (DateTime<Utc>, DateTime<Utc>)>,
    audit: Vec<AuditRecord>,
}

/// An in-memory [`SagaStore`] for tests and examples. Clones share the data.
///
/// Its outbox is a list: [`MemorySagaStore::take_commands`] hands over what the
/// stored transitions sent.
#[derive(Clone, Debug, Default)]
pub struct MemorySagaStore {
    inner: Arc<Mutex<Inner>>,
}

impl MemorySagaStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent data (every write
        // is checked before it mutates), so a poisoned lock is still usable.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Removes and returns the commands written so far, in write order, with
    /// their destination.
    pub fn take_commands(&self) -> Vec<(String, Envelope)> {
        std::mem::take(&mut self.lock().outbox)
    }

    /// The pending timers of every saga.
    pub fn timers(&self) -> Vec<TimerRecord> {
        self.lock()
            .timers
            .iter()
            .map(|((saga, id, name), due)| TimerRecord {
                saga: saga.clone(),
                id: id.clone(),
                name: name.clone(),
                due: *due,
            })
            .collect()
    }
}

impl SagaStore for MemorySagaStore {
    async fn load(&self, saga: &str, id: &str) -> Result<Option<InstanceRecord>, StoreError> {
        Ok(self
            .lock()
            .instances
            .get(&(saga.to_owned(), id.to_owned()))
            .cloned())
    }

    async fn write(&self, write: Write) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let instance = write.instance;
        let key = (instance.saga.clone(), instance.id.clone());
        let expected = instance.version.saturating_sub(1);
        let current = inner.instances.get(&key).map_or(0, |i| i.version);
        if expected == 0 && inner.purged.contains(&key) {
            return Err(StoreError::Purged {
                saga: instance.saga,
                id: instance.id,
            });
        }
        if current != expected {
            return Err(StoreError::Conflict {
                saga: instance.saga,
                id: instance.id,
                expected,
            });
        }
        if let Some(fired) = &write.fired_timer {
            let timer_key = (fired.saga.clone(), fired.id.clone(), fired.name.clone());
            if inner.timers.get(&timer_key) != Some(&fired.due) {
                return Err(StoreError::TimerGone {
                    id: fired.id.clone(),
                    name: fired.name.clone(),
                });
            }
            inner.timers.remove(&timer_key);
        }
        for name in &write.cancel_timers {
            inner
                .timers
                .remove(&(key.0.clone(), key.1.clone(), name.clone()));
        }
        if instance.finished {
            inner
                .timers
                .retain(|(saga, id, _), _| (saga, id) != (&key.0, &key.1));
        } else {
            for (name, due) in write.set_timers {
                inner
                    .timers
                    .insert((key.0.clone(), key.1.clone(), name), due);
            }
        }
        let at = write.history.at;
        inner
            .history
            .entry(key.clone())
            .or_default()
            .push(write.history);
        inner.outbox.extend(write.commands);
        inner
            .times
            .entry(key.clone())
            .and_modify(|(_, updated)| *updated = at)
            .or_insert((at, at));
        inner.instances.insert(key, instance);
        Ok(())
    }

    async fn due_timers(
        &self,
        saga: &str,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<TimerRecord>, StoreError> {
        let mut due: Vec<TimerRecord> = self
            .lock()
            .timers
            .iter()
            .filter(|((s, _, _), at)| s == saga && **at <= now)
            .map(|((saga, id, name), at)| TimerRecord {
                saga: saga.clone(),
                id: id.clone(),
                name: name.clone(),
                due: *at,
            })
            .collect();
        due.sort_by_key(|timer| timer.due);
        due.truncate(limit);
        Ok(due)
    }

    async fn history(&self, saga: &str, id: &str) -> Result<Vec<HistoryRecord>, StoreError> {
        Ok(self
            .lock()
            .history
            .get(&(saga.to_owned(), id.to_owned()))
            .cloned()
            .unwrap_or_default())
    }

    async fn record_noop(&self, saga: &str, id: &str, noop: NoopRecord) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let key = (noop.version, noop.input.clone(), noop.outcome.clone());
        inner
            .noops
            .entry((saga.to_owned(), id.to_owned()))
            .or_default()
            .entry(key)
            .and_modify(|kept| {
                kept.count = kept.count.saturating_add(noop.count);
                kept.last_at = noop.last_at;
                kept.trace_id.clone_from(&noop.trace_id);
            })
            .or_insert(noop);
        Ok(())
    }

    async fn noops(&self, saga: &str, id: &str) -> Result<Vec<NoopRecord>, StoreError> {
        Ok(self
            .lock()
            .noops
            .get(&(saga.to_owned(), id.to_owned()))
            .map(|n| n.values().cloned().collect())
            .unwrap_or_default())
    }

    async fn unfinished_counts(
        &self,
        saga: &str,
        idle_since: DateTime<Utc>,
    ) -> Result<Vec<(String, u64, u64)>, StoreError> {
        let inner = self.lock();
        let mut counts: std::collections::BTreeMap<String, (u64, u64)> =
            std::collections::BTreeMap::new();
        for (key, instance) in &inner.instances {
            if instance.saga != saga || instance.finished {
                continue;
            }
            let updated_at = inner
                .times
                .get(key)
                .map_or(DateTime::<Utc>::MIN_UTC, |t| t.1);
            let entry = counts.entry(instance.state_name.clone()).or_default();
            entry.0 += 1;
            if updated_at <= idle_since {
                entry.1 += 1;
            }
        }
        Ok(counts
            .into_iter()
            .map(|(s, (all, idle))| (s, all, idle))
            .collect())
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<InstanceSummary>, StoreError> {
        let inner = self.lock();
        let mut found: Vec<InstanceSummary> = inner
            .instances
            .iter()
            .map(|(key, i)| {
                let (created_at, updated_at) = inner
                    .times
                    .get(key)
                    .copied()
                    .unwrap_or((DateTime::<Utc>::MIN_UTC, DateTime::<Utc>::MIN_UTC));
                InstanceSummary {
                    saga: i.saga.clone(),
                    id: i.id.clone(),
                    state_name: i.state_name.clone(),
                    version: i.version,
                    finished: i.finished,
                    created_at,
                    updated_at,
                    state: i.state.clone(),
                }
            })
            .filter(|i| filter.matches(i))
            .collect();
        found.sort_by(|a, b| a.updated_at.cmp(&b.updated_at).then(a.id.cmp(&b.id)));
        found.truncate(filter.limit);
        Ok(found)
    }

    async fn delete_timer(&self, timer: &TimerRecord) -> Result<bool, StoreError> {
        let mut inner = self.lock();
        let key = (timer.saga.clone(), timer.id.clone(), timer.name.clone());
        if inner.timers.get(&key) == Some(&timer.due) {
            inner.timers.remove(&key);
            return Ok(true);
        }
        Ok(false)
    }

    async fn purge_finished(
        &self,
        saga: &str,
        before: DateTime<Utc>,
        limit: usize,
    ) -> Result<u64, StoreError> {
        let mut inner = self.lock();
        let gone: Vec<Key> = inner
            .instances
            .iter()
            .filter(|(key, i)| {
                key.0 == saga
                    && i.finished
                    && inner
                        .times
                        .get(*key)
                        .is_some_and(|(_, moved)| *moved < before)
            })
            .map(|(key, _)| key.clone())
            .take(limit)
            .collect();
        for key in &gone {
            inner.instances.remove(key);
            inner.history.remove(key);
            inner.noops.remove(key);
            inner.times.remove(key);
            inner.purged.insert(key.clone());
        }
        Ok(u64::try_from(gone.len()).unwrap_or(u64::MAX))
    }

    async fn audit(&self, entry: AuditRecord) -> Result<(), StoreError> {
        self.lock().audit.push(entry);
        Ok(())
    }

    async fn audit_log(&self, saga: &str, id: &str) -> Result<Vec<AuditRecord>, StoreError> {
        Ok(self
            .lock()
            .audit
            .iter()
            .filter(|a| a.saga == saga && a.id == id)
            .cloned()
            .collect())
    }
}
