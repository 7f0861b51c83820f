//! [`PostgresCheckpoints`]: checkpoints in PostgreSQL.

use sqlx::Postgres;
use sqlx::postgres::PgPool;

use super::sql::{migrator, sql_checkpoints};
use crate::error::ProjectionError;

/// The migrations, embedded from `migrations/postgres/`.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "create surety projection checkpoints",
        include_str!("../../migrations/postgres/0001_init.sql"),
    ),
    (
        2,
        "surety projection versions",
        include_str!("../../migrations/postgres/0002_versions.sql"),
    ),
    (
        3,
        "surety projection parked events",
        include_str!("../../migrations/postgres/0003_parked.sql"),
    ),
];

/// Creates or upgrades the checkpoint tables. Safe to call on every
/// start-up: migrations run once.
///
/// # Errors
///
/// [`ProjectionError::Migration`] when a migration fails.
pub async fn migrate(pool: &PgPool) -> Result<(), ProjectionError> {
    migrator(MIGRATIONS).run(pool).await?;
    Ok(())
}

sql_checkpoints!(PostgresCheckpoints, Postgres, PgPool, "BEGIN");
