//! [`SqliteCheckpoints`]: checkpoints in SQLite, the embedded default.
//!
//! Open the pool in WAL mode with a busy timeout; batches begin with
//! `BEGIN IMMEDIATE`, so concurrent lanes queue for the write lock instead
//! of failing.

use sqlx::Sqlite;
use sqlx::sqlite::SqlitePool;

use super::sql::{migrator, sql_checkpoints};
use crate::error::ProjectionError;

/// The migrations, embedded from `migrations/sqlite/`.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "create surety projection checkpoints",
        include_str!("../../migrations/sqlite/0001_init.sql"),
    ),
    (
        2,
        "surety projection versions",
        include_str!("../../migrations/sqlite/0002_versions.sql"),
    ),
    (
        3,
        "surety projection parked events",
        include_str!("../../migrations/sqlite/0003_parked.sql"),
    ),
];

/// Creates or upgrades the checkpoint tables. Safe to call on every
/// start-up: migrations run once.
///
/// # Errors
///
/// [`ProjectionError::Migration`] when a migration fails.
pub async fn migrate(pool: &SqlitePool) -> Result<(), ProjectionError> {
    migrator(MIGRATIONS).run(pool).await?;
    Ok(())
}

sql_checkpoints!(SqliteCheckpoints, Sqlite, SqlitePool, "BEGIN IMMEDIATE");
