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

mod sql;

#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "sqlite")]
pub mod sqlite;

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
    /// applied rows below `next_offset`.
    ///
    /// # Errors
    ///
    /// [`ProjectionError::Fenced`] when the stored checkpoint is not
    /// `expected`.
    fn save(
        tx: &mut Transaction<'static, Self::Db>,
        projection: &str,
        topic: &str,
        partition: i32,
        expected: Option<i64>,
        next_offset: i64,
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

    /// Every checkpoint of `projection` in `topic`, by partition (for lag
    /// and progress reporting, and for comparing versions).
    fn checkpoints(
        &self,
        projection: &str,
        topic: &str,
    ) -> impl Future<Output = Result<Vec<(i32, i64)>, ProjectionError>> + Send;
}
