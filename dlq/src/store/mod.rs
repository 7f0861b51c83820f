//! Where dead letters are kept: the [`DlqStore`] trait and its in-memory,
//! SQLite and PostgreSQL implementations.
//!
//! A store keeps one record per [dead-letter id](crate::DeadLetter::id_for):
//! putting the same id again (the same message failing again in the same
//! handler, after a crash or a failed replay) merges into the existing record
//! ([`DeadLetter::merge`]) and keeps its position in listings. Status changes
//! go through [`DlqStore::transition`], which is conditional on the current
//! status so that two operators cannot replay the same message twice. Every
//! operator action is also written to an audit log.
//!
//! Listings are ordered by when a record was first stored, oldest first, and
//! paged with an opaque cursor.
//!
//! The shared test suite for stores is `surety_testkit::dlq_store` (feature
//! `dlq` of surety-testkit).

mod memory;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod sql;
#[cfg(feature = "sqlite")]
pub mod sqlite;

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use surety_core::{BoxError, Classify, ErrorClass};

use crate::job::Job;
use crate::letter::{DeadLetter, Event, FailureClass, Status};

pub use memory::MemoryDlqStore;
#[cfg(feature = "postgres")]
pub use postgres::PostgresDlqStore;
#[cfg(feature = "sqlite")]
pub use sqlite::SqliteDlqStore;

/// The largest page a store returns.
pub const MAX_PAGE_SIZE: u32 = 1000;

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database failed; its [kind](surety_core::store::StoreErrorKind)
    /// decides the class (a lost connection is transient, a constraint
    /// violation permanent).
    #[error("DLQ store backend failed: {0}")]
    Backend(#[source] surety_core::store::StoreError),
    /// A stored record could not be read back. Permanent.
    #[error("DLQ store record is corrupt: {0}")]
    Corrupt(String),
    /// A paging cursor was not produced by this store.
    #[error("invalid cursor {0:?}")]
    InvalidCursor(String),
}

impl StoreError {
    /// A backend failure of an unknown kind (transient).
    pub fn backend(err: impl Into<BoxError>) -> Self {
        Self::Backend(surety_core::store::StoreError::new(
            surety_core::store::StoreErrorKind::Other,
            err,
        ))
    }
}

impl Classify for StoreError {
    fn class(&self) -> ErrorClass {
        match self {
            Self::Backend(err) => err.class(),
            Self::Corrupt(_) | Self::InvalidCursor(_) => ErrorClass::Permanent,
        }
    }
}

/// Which dead letters to list, count, replay or discard. Every field that is
/// set must match; an empty filter matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct Filter {
    /// Source transport (`rabbitmq`, `kafka`, `memory`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// Source topic or queue.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// Source consumer group.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Error class (`transient`, `permanent`, `poison`, `unknown`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class: Option<FailureClass>,
    /// Fingerprint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// Handler name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handler: Option<String>,
    /// Any of these statuses (empty: any status).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub status: Vec<Status>,
    /// Last failed at or after.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<DateTime<Utc>>,
    /// Last failed before.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<DateTime<Utc>>,
    /// Case-insensitive substring of the error message, message id, type,
    /// subject, partition key, handler or fingerprint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

impl Filter {
    /// A filter that matches everything.
    pub fn new() -> Self {
        Self::default()
    }

    /// Only this source topic.
    pub fn topic(mut self, topic: impl Into<String>) -> Self {
        self.topic = Some(topic.into());
        self
    }

    /// Only this source transport.
    pub fn system(mut self, system: impl Into<String>) -> Self {
        self.system = Some(system.into());
        self
    }

    /// Only this consumer group.
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }

    /// Only this failure class.
    pub fn class(mut self, class: impl Into<FailureClass>) -> Self {
        self.class = Some(class.into());
        self
    }

    /// Only this fingerprint.
    pub fn fingerprint(mut self, fingerprint: impl Into<String>) -> Self {
        self.fingerprint = Some(fingerprint.into());
        self
    }

    /// Only this handler.
    pub fn handler(mut self, handler: impl Into<String>) -> Self {
        self.handler = Some(handler.into());
        self
    }

    /// Only these statuses.
    pub fn status(mut self, status: impl IntoIterator<Item = Status>) -> Self {
        self.status = status.into_iter().collect();
        self
    }

    /// Only failures at or after `from` and before `to`.
    pub fn between(mut self, from: Option<DateTime<Utc>>, to: Option<DateTime<Utc>>) -> Self {
        self.from = from;
        self.to = to;
        self
    }

    /// Only records whose text contains `text` (case-insensitive).
    pub fn text(mut self, text: impl Into<String>) -> Self {
        self.text = Some(text.into());
        self
    }

    /// Whether `letter` matches (the reference semantics every store follows).
    pub fn matches(&self, letter: &DeadLetter) -> bool {
        let eq = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        eq(&self.system, &letter.source.system)
            && eq(&self.topic, &letter.source.topic)
            && eq(&self.group, &letter.source.group)
            && self.class.is_none_or(|class| class == letter.error.class)
            && eq(&self.fingerprint, &letter.fingerprint)
            && eq(&self.handler, &letter.handler)
            && (self.status.is_empty() || self.status.contains(&letter.status))
            && self.from.is_none_or(|from| letter.last_failed_at >= from)
            && self.to.is_none_or(|to| letter.last_failed_at < to)
            && self
                .text
                .as_deref()
                .is_none_or(|t| letter.search_text().contains(&t.to_lowercase()))
    }
}

/// A page to read: up to `limit` items after `cursor`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PageRequest {
    /// How many items at most (1 to [`MAX_PAGE_SIZE`]; other values are clamped).
    pub limit: u32,
    /// Where the previous page ended ([`Page::next`]); `None` for the first page.
    pub cursor: Option<String>,
}

impl PageRequest {
    /// The first page of `limit` items.
    pub fn first(limit: u32) -> Self {
        Self {
            limit,
            cursor: None,
        }
    }

    /// The page after `cursor`.
    pub fn after(limit: u32, cursor: impl Into<String>) -> Self {
        Self {
            limit,
            cursor: Some(cursor.into()),
        }
    }

    /// The limit, clamped to 1..=[`MAX_PAGE_SIZE`].
    pub fn clamped_limit(&self) -> u32 {
        self.limit.clamp(1, MAX_PAGE_SIZE)
    }
}

/// One page of results.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Page<T> {
    /// The items.
    pub items: Vec<T>,
    /// The cursor of the next page, `None` when this was the last.
    pub next: Option<String>,
}

impl<T> Page<T> {
    /// A page.
    pub fn new(items: Vec<T>, next: Option<String>) -> Self {
        Self { items, next }
    }
}

/// A conditional status change: if the record's status is one of `from`, set
/// it to `event.status` and append `event` to its history.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Transition {
    /// The statuses the record may be in.
    pub from: Vec<Status>,
    /// What happens; `event.status` is the new status.
    pub event: Event,
    /// Whether this is a replay (the replay count goes up by one).
    pub count_replay: bool,
    /// Whether this undoes a replay that could not be published (the
    /// replay count goes down by one).
    pub undo_replay: bool,
}

impl Transition {
    /// A transition from any of `from` with `event`.
    pub fn new(from: impl IntoIterator<Item = Status>, event: Event) -> Self {
        Self {
            from: from.into_iter().collect(),
            event,
            count_replay: false,
            undo_replay: false,
        }
    }

    /// Undoes a replay's count (its publish failed).
    pub fn undo_replay(mut self) -> Self {
        self.undo_replay = true;
        self
    }

    /// Counts the transition as a replay.
    pub fn replay(mut self) -> Self {
        self.count_replay = true;
        self
    }

    /// Applies the transition to `letter` if its status allows; returns
    /// whether it did (the reference semantics every store follows).
    pub fn apply(&self, letter: &mut DeadLetter) -> bool {
        if !self.from.contains(&letter.status) {
            return false;
        }
        letter.status = self.event.status;
        if self.count_replay {
            letter.replay_count = letter.replay_count.saturating_add(1);
        }
        if self.undo_replay {
            letter.replay_count = letter.replay_count.saturating_sub(1);
        }
        letter.push_event(self.event.clone());
        true
    }
}

/// What an operator action selected.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct AuditSelection {
    /// Dead letters chosen by id.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ids: Vec<String>,
    /// Dead letters chosen by filter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<Filter>,
}

/// One operator action: who did what, when, why, and how it went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct AuditEntry {
    /// A unique id (UUIDv7).
    pub id: String,
    /// When.
    pub at: DateTime<Utc>,
    /// Who.
    pub actor: String,
    /// What: `replay` or `discard`.
    pub action: String,
    /// Why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What was selected.
    pub selection: AuditSelection,
    /// Whether the payload or headers were edited.
    #[serde(default)]
    pub edited: bool,
    /// The dead letters acted on successfully.
    pub succeeded: Vec<String>,
    /// The dead letters skipped (not found, wrong status) or failed.
    pub failed: Vec<String>,
    /// The job that carries the action out ([`Job`]). The entry is written
    /// when the job starts, before any dead letter changes, with the ids
    /// the job will act on in `planned`; it is rewritten with the outcome
    /// (`succeeded`, `failed`, `finished`) when the job ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// The dead letters the job set out to act on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub planned: Vec<String>,
    /// Whether the job has finished (`succeeded` and `failed` are final).
    #[serde(default)]
    pub finished: bool,
}

impl AuditEntry {
    /// An entry now, by `actor`, for `action`.
    pub fn new(actor: impl Into<String>, action: impl Into<String>) -> Self {
        Self {
            id: uuid::Uuid::now_v7().to_string(),
            at: Utc::now(),
            actor: actor.into(),
            action: action.into(),
            reason: None,
            selection: AuditSelection::default(),
            edited: false,
            succeeded: Vec::new(),
            failed: Vec::new(),
            job: None,
            planned: Vec::new(),
            finished: false,
        }
    }
}

/// How many dead letters wait for one source and class, and since when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Depth {
    /// Source transport.
    pub system: String,
    /// Source topic.
    pub topic: String,
    /// Source group.
    pub group: String,
    /// Failure class.
    pub class: FailureClass,
    /// Dead letters with status `dead` or `parked`.
    pub count: u64,
    /// When the oldest of them was dead-lettered.
    pub oldest: DateTime<Utc>,
}

/// Keeps dead letters and the audit log.
///
/// Used as `Arc<dyn DlqStore>` by the layer, the replayer and the admin API.
/// Implementations: [`MemoryDlqStore`], [`SqliteDlqStore`]
/// and [`PostgresDlqStore`]; all pass the shared
/// suite in `surety_testkit::dlq_store`.
///
/// ```
/// use surety_core::{DeliveryInfo, Envelope, HandlerError};
/// use surety_dlq::policy::DeadLetterReason;
/// use surety_dlq::store::{DlqStore, Filter, MemoryDlqStore, PageRequest};
/// use surety_dlq::{DeadLetter, FailureClass};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), surety_dlq::store::StoreError> {
/// let store = MemoryDlqStore::new();
/// let env = Envelope::builder("/orders", "order.placed").build();
/// let err = HandlerError::permanent("quantity must be positive");
/// let letter = DeadLetter::new(&env, &DeliveryInfo::new("memory", "orders", "billing"), &err,
///     DeadLetterReason::NotRetryable, 1, "billing", "host-1");
/// store.put(&letter).await?;
///
/// let page = store.list(&Filter::new().class(FailureClass::Permanent).text("QUANTITY"), &PageRequest::first(50)).await?;
/// assert_eq!(page.items.len(), 1);
/// assert_eq!(store.get(&letter.id).await?.unwrap().envelope.id, env.id);
/// # Ok(()) }
/// ```
#[async_trait::async_trait]
pub trait DlqStore: Send + Sync + fmt::Debug {
    /// Stores `letter`, or merges it into the record with the same id
    /// ([`DeadLetter::merge`]). Returns once the write is durable.
    async fn put(&self, letter: &DeadLetter) -> Result<(), StoreError>;

    /// The record with `id`.
    async fn get(&self, id: &str) -> Result<Option<DeadLetter>, StoreError>;

    /// Records matching `filter`, oldest first, one page at a time.
    async fn list(
        &self,
        filter: &Filter,
        page: &PageRequest,
    ) -> Result<Page<DeadLetter>, StoreError>;

    /// How many records match `filter`.
    async fn count(&self, filter: &Filter) -> Result<u64, StoreError>;

    /// Applies `transition` to the record with `id` if its status allows
    /// ([`Transition::apply`]), atomically. Returns the updated record, or
    /// `None` when there is no such record or its status did not allow it.
    async fn transition(
        &self,
        id: &str,
        transition: &Transition,
    ) -> Result<Option<DeadLetter>, StoreError>;

    /// Appends an operator action to the audit log, or replaces the entry
    /// with the same id (a job records its intent first and its outcome
    /// last), keeping its place in the log.
    async fn append_audit(&self, entry: &AuditEntry) -> Result<(), StoreError>;

    /// The audit log, newest first.
    async fn audit_log(&self, page: &PageRequest) -> Result<Page<AuditEntry>, StoreError>;

    /// Dead letters waiting (status `dead` or `parked`) by source and class.
    async fn depth(&self) -> Result<Vec<Depth>, StoreError>;

    /// Stores `job`, replacing the job with the same id. Returns once the
    /// write is durable.
    async fn put_job(&self, job: &Job) -> Result<(), StoreError>;

    /// The job with `id`.
    async fn get_job(&self, id: &str) -> Result<Option<Job>, StoreError>;

    /// Jobs that have not finished, oldest first (at most
    /// [`MAX_PAGE_SIZE`]): the ones to resume after a restart.
    async fn unfinished_jobs(&self) -> Result<Vec<Job>, StoreError>;
}

#[async_trait::async_trait]
impl<S: DlqStore + ?Sized> DlqStore for std::sync::Arc<S> {
    async fn put(&self, letter: &DeadLetter) -> Result<(), StoreError> {
        (**self).put(letter).await
    }
    async fn get(&self, id: &str) -> Result<Option<DeadLetter>, StoreError> {
        (**self).get(id).await
    }
    async fn list(
        &self,
        filter: &Filter,
        page: &PageRequest,
    ) -> Result<Page<DeadLetter>, StoreError> {
        (**self).list(filter, page).await
    }
    async fn count(&self, filter: &Filter) -> Result<u64, StoreError> {
        (**self).count(filter).await
    }
    async fn transition(
        &self,
        id: &str,
        transition: &Transition,
    ) -> Result<Option<DeadLetter>, StoreError> {
        (**self).transition(id, transition).await
    }
    async fn append_audit(&self, entry: &AuditEntry) -> Result<(), StoreError> {
        (**self).append_audit(entry).await
    }
    async fn audit_log(&self, page: &PageRequest) -> Result<Page<AuditEntry>, StoreError> {
        (**self).audit_log(page).await
    }
    async fn depth(&self) -> Result<Vec<Depth>, StoreError> {
        (**self).depth().await
    }
    async fn put_job(&self, job: &Job) -> Result<(), StoreError> {
        (**self).put_job(job).await
    }
    async fn get_job(&self, id: &str) -> Result<Option<Job>, StoreError> {
        (**self).get_job(id).await
    }
    async fn unfinished_jobs(&self) -> Result<Vec<Job>, StoreError> {
        (**self).unfinished_jobs().await
    }
}

/// Parses a numeric cursor.
pub(crate) fn parse_cursor(cursor: Option<&str>) -> Result<Option<i64>, StoreError> {
    cursor
        .map(|c| {
            c.parse::<i64>()
                .ok()
                .filter(|n| *n >= 0)
                .ok_or_else(|| StoreError::InvalidCursor(c.to_owned()))
        })
        .transpose()
}
