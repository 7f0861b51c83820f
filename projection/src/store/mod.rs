//! Checkpoint stores: where each projection stands in each partition,
//! written in the read model's transaction.
//!
//! A checkpoint is the *next* offset to apply in a partition: the
//! contiguous watermark, below which every event is applied and at which
//! none is. With parallel lanes, offsets at or past the watermark that a
//! lane already applied are recorded as applied rows in the lane's
//! transaction and skipped after a restart; the watermark passes them once
//! every offset before them is applied.
//!
//! Every write of a checkpoint is fenced: it names the offset the runner
//! found stored, and fails with [`ProjectionError::Fenced`] (rolling the
//! whole transaction back) when another runner moved it since.

use std::collections::BTreeSet;
use std::future::Future;

use sqlx::{Database, Pool, Transaction};

use crate::error::ProjectionError;

#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod sql;

#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "sqlite")]
pub mod sqlite;

#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub use sql::MIGRATIONS_TABLE;

/// What is stored for one partition.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Checkpoint {
    /// The next offset to apply; `None` when nothing was stored yet.
    pub next_offset: Option<i64>,
    /// Offsets at or past `next_offset` already applied by a lane.
    pub applied: BTreeSet<i64>,
}

/// An event parked because it could not be applied (or because an earlier
/// event of its key is parked).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Parked {
    /// Its partition key (the envelope id when it has none).
    pub key: String,
    /// The partition.
    pub partition: i32,
    /// The offset.
    pub offset: i64,
    /// The event and the failure, as surety-dlq records them.
    pub letter: surety_dlq::DeadLetter,
}

/// Where a projection runner keeps its positions; see the [module](self).
pub trait CheckpointStore: Clone + Send + Sync + 'static {
    /// The database of the read model and the checkpoints.
    type Db: Database;

    /// Begins a transaction for a batch (SQLite: `BEGIN IMMEDIATE`, so a
    /// batch that reads before it writes never fails on a stale snapshot).
    fn begin(
        &self,
    ) -> impl Future<Output = Result<Transaction<'static, Self::Db>, ProjectionError>> + Send;

    /// The pool.
    fn pool(&self) -> &Pool<Self::Db>;

    /// The checkpoint of `projection` in `topic`/`partition`.
    fn load(
        &self,
        projection: &str,
        topic: &str,
        partition: i32,
    ) -> impl Future<Output = Result<Checkpoint, ProjectionError>> + Send;

    /// Moves the checkpoint from `expected` (what was loaded; `None` when
    /// there was none) to `next_offset` inside `tx`, and forgets the
    /// applied rows below `next_offset`, of which the caller knows
    /// `known_applied`.
    ///
    /// # Errors
    ///
    /// [`ProjectionError::Fenced`] when the stored checkpoint is not
    /// `expected`, or when more offsets below `next_offset` are recorded as
    /// applied than the caller knows of (another runner's lane applied
    /// them since the caller loaded the checkpoint).
    fn save(
        tx: &mut Transaction<'static, Self::Db>,
        projection: &str,
        topic: &str,
        partition: i32,
        expected: Option<i64>,
        next_offset: i64,
        known_applied: u64,
    ) -> impl Future<Output = Result<(), ProjectionError>> + Send;

    /// Records `offsets` of a partition as applied, inside `tx`.
    ///
    /// # Errors
    ///
    /// [`ProjectionError::Fenced`] when one of them was already recorded or
    /// the stored checkpoint passed it (another runner applied it).
    fn mark_applied(
        tx: &mut Transaction<'static, Self::Db>,
        projection: &str,
        topic: &str,
        partition: i32,
        offsets: &[i64],
    ) -> impl Future<Output = Result<(), ProjectionError>> + Send;

    /// Parks an event inside `tx` (the runner marks its offset applied in
    /// the same transaction).
    fn park(
        tx: &mut Transaction<'static, Self::Db>,
        projection: &str,
        topic: &str,
        parked: &Parked,
    ) -> impl Future<Output = Result<(), ProjectionError>> + Send;

    /// Removes a parked event inside `tx` (after it was applied on replay).
    fn unpark(
        tx: &mut Transaction<'static, Self::Db>,
        projection: &str,
        topic: &str,
        partition: i32,
        offset: i64,
    ) -> impl Future<Output = Result<(), ProjectionError>> + Send;

    /// The keys with parked events.
    fn parked_keys(
        &self,
        projection: &str,
        topic: &str,
    ) -> impl Future<Output = Result<std::collections::HashSet<String>, ProjectionError>> + Send;

    /// The parked events of `key`, in partition and offset order.
    fn parked(
        &self,
        projection: &str,
        topic: &str,
        key: &str,
    ) -> impl Future<Output = Result<Vec<Parked>, ProjectionError>> + Send;

    /// Every checkpoint of `projection` in `topic`, by partition (for lag
    /// and progress reporting, and for comparing versions).
    fn checkpoints(
        &self,
        projection: &str,
        topic: &str,
    ) -> impl Future<Output = Result<Vec<(i32, i64)>, ProjectionError>> + Send;
}

/// Which versions of a projection's read model exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Versions {
    /// The version that serves reads. 1 before any rebuild.
    pub live: u32,
    /// The version that served before the last promotion (a rollback
    /// target).
    pub previous: Option<u32>,
    /// The version being rebuilt, if any.
    pub shadow: Option<u32>,
}

impl Default for Versions {
    fn default() -> Self {
        Self {
            live: 1,
            previous: None,
            shadow: None,
        }
    }
}

/// Where the versions of each projection's read model are kept: which
/// serves, which is being rebuilt, which to roll back to. Each change is
/// one statement, so readers see the old version or the new one, never a
/// mix.
pub trait VersionStore: Send + Sync {
    /// The versions of `projection` (live 1, nothing else, when none were
    /// stored).
    fn versions(
        &self,
        projection: &str,
    ) -> impl Future<Output = Result<Versions, ProjectionError>> + Send;

    /// The shadow version of `projection`: the one a rebuild already
    /// started (a rebuild resumed after a crash), or a new one above every
    /// version used so far.
    fn start_shadow(
        &self,
        projection: &str,
    ) -> impl Future<Output = Result<u32, ProjectionError>> + Send;

    /// Makes `shadow` the live version and the live one the previous.
    ///
    /// # Errors
    ///
    /// [`ProjectionError::Version`] when `shadow` is not the shadow version.
    fn promote(
        &self,
        projection: &str,
        shadow: u32,
    ) -> impl Future<Output = Result<(), ProjectionError>> + Send;

    /// Swaps the live and the previous version back; returns the live one.
    ///
    /// # Errors
    ///
    /// [`ProjectionError::Version`] when there is no previous version.
    fn rollback(
        &self,
        projection: &str,
    ) -> impl Future<Output = Result<u32, ProjectionError>> + Send;

    /// Forgets the shadow version (the next rebuild takes a new one).
    fn abandon_shadow(
        &self,
        projection: &str,
    ) -> impl Future<Output = Result<(), ProjectionError>> + Send;
}

/// The checkpoint name of `version` of `projection`: `name@v{version}`.
pub fn versioned_name(projection: &str, version: u32) -> String {
    format!("{projection}@v{version}")
}
