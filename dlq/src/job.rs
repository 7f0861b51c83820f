//! Replay and discard jobs: a bulk action with an id, written to the store
//! before it acts and after every dead letter it handles, so that it can be
//! queried while it runs and resumed after a crash or a restart.
//!
//! A job's life:
//!
//! 1. [`Replayer::start_replay`](crate::Replayer::start_replay) (or
//!    `start_discard`) validates the request, picks the dead letters, writes
//!    the audit entry (who, why, what selection, the ids it will act on) and
//!    then the job. If either write fails, nothing has changed.
//! 2. [`Replayer::run`](crate::Replayer::run) acts on one dead letter at a
//!    time. A replay claims the letter (`replaying`, replay count + 1, an
//!    event naming the job), publishes, and only then marks it `replayed`; a
//!    failed publish puts the status and the count back. A discard is one
//!    conditional status change. A letter that cannot be acted on is recorded
//!    as skipped or failed and the job goes on. After each letter the job's
//!    progress (`next`) is written.
//! 3. When the last letter is done, the audit entry is rewritten with the
//!    outcome and the job is marked finished.
//!
//! A process killed at any point leaves every dead letter either published
//! (with its audit entry) or still replayable: [`Replayer::resume`](crate::Replayer::resume)
//! runs the unfinished jobs again; a letter the job had claimed but not yet
//! confirmed is published again (same message id: consumers deduplicate it).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::letter::Status;
use crate::replay::{ActionReport, Edit, Selection, Skipped};
use crate::store::{AuditEntry, AuditSelection};

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// Publish the dead letters again.
    Replay,
    /// Mark the dead letters discarded.
    Discard,
}

impl JobKind {
    /// The stable lower-case name (also the audit entry's action).
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Replay => "replay",
            Self::Discard => "discard",
        }
    }
}

/// A replay or discard job; see the [module docs](self).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Job {
    /// A unique id (UUIDv7, so ids sort by creation time).
    pub id: String,
    /// Replay or discard.
    pub kind: JobKind,
    /// Who asked.
    pub actor: String,
    /// Why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What was selected.
    pub selection: Selection,
    /// The edit applied to the replayed message (replays of one id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edit: Option<Edit>,
    /// The statuses a dead letter may have to be acted on.
    pub allowed: Vec<Status>,
    /// When the job was created.
    pub created_at: DateTime<Utc>,
    /// When its progress was last written.
    pub updated_at: DateTime<Utc>,
    /// The audit entry recording the action.
    pub audit_id: String,
    /// The dead letters the job acts on, in order.
    pub ids: Vec<String>,
    /// How many of `ids` have been handled.
    pub next: usize,
    /// The ids acted on.
    pub done: Vec<String>,
    /// The ids left alone (not found, status), with the reason.
    pub skipped: Vec<Skipped>,
    /// The ids that failed (a publish or store error), with the reason.
    pub failed: Vec<Skipped>,
    /// Whether the job has finished.
    pub finished: bool,
}

impl Job {
    /// A new, unstarted job.
    pub(crate) fn new(
        kind: JobKind,
        actor: &str,
        reason: Option<&str>,
        selection: Selection,
        allowed: &[Status],
    ) -> Self {
        let now = Utc::now();
        Self {
            id: uuid::Uuid::now_v7().to_string(),
            kind,
            actor: actor.to_owned(),
            reason: reason.map(str::to_owned),
            selection,
            edit: None,
            allowed: allowed.to_vec(),
            created_at: now,
            updated_at: now,
            audit_id: uuid::Uuid::now_v7().to_string(),
            ids: Vec::new(),
            next: 0,
            done: Vec::new(),
            skipped: Vec::new(),
            failed: Vec::new(),
            finished: false,
        }
    }

    /// What the job has done so far (all of it once finished).
    pub fn report(&self) -> ActionReport {
        ActionReport {
            done: self.done.clone(),
            skipped: self.skipped.clone(),
            failed: self.failed.clone(),
            audit_id: Some(self.audit_id.clone()),
            job_id: Some(self.id.clone()),
            ..ActionReport::default()
        }
    }

    /// The job's audit entry as it stands: the intent before it runs, the
    /// outcome once finished.
    pub fn audit_entry(&self) -> AuditEntry {
        let mut entry = AuditEntry::new(&self.actor, self.kind.as_str());
        entry.id = self.audit_id.clone();
        entry.at = self.created_at;
        entry.reason = self.reason.clone();
        entry.selection = match &self.selection {
            Selection::Ids(ids) => AuditSelection {
                ids: ids.clone(),
                filter: None,
            },
            Selection::Filter(f) => AuditSelection {
                ids: Vec::new(),
                filter: Some(f.clone()),
            },
        };
        entry.edited = self.edit.as_ref().is_some_and(|e| !e.is_empty());
        entry.job = Some(self.id.clone());
        entry.planned = self.ids.clone();
        entry.finished = self.finished;
        entry.succeeded = self.done.clone();
        entry.failed = self
            .skipped
            .iter()
            .chain(&self.failed)
            .map(|s| s.id.clone())
            .collect();
        entry
    }
}
