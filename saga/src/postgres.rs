//! [`PostgresSagaStore`]: saga instances, history and timers in
//! PostgreSQL, with the commands written into the `surety-outbox` table in
//! the same transaction, so the outbox [`Relay`](surety_outbox::Relay)
//! sends them.
//!
//! A write is optimistic: the instance row is inserted (a new instance) or
//! updated `WHERE version = <loaded>`; a concurrent writer makes it fail as
//! [`StoreError::Conflict`] and the whole transaction rolls back.

use sqlx::postgres::PgPool;
use surety_outbox::PostgresOutbox;

use crate::sql::{backend, migrator, sql_saga_store};
use crate::store::{StoreError, Write};

pub use crate::sql::MIGRATIONS_TABLE;

/// The migrations, embedded from `migrations/postgres/` (version, description,
/// SQL).
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "create surety saga",
        include_str!("../migrations/postgres/0001_init.sql"),
    ),
    (
        2,
        "saga created_at, history trace id, audit",
        include_str!("../migrations/postgres/0002_created_at_and_trace.sql"),
    ),
    (
        3,
        "saga tombstones",
        include_str!("../migrations/postgres/0003_tombstones.sql"),
    ),
    (
        4,
        "saga history from-state, commands and timer due, no-op records",
        include_str!("../migrations/postgres/0004_history_detail_and_noops.sql"),
    ),
];

/// Creates or upgrades the saga tables (and the outbox tables, through
/// `surety_outbox::postgres::migrate`). Safe to call on every start-up:
/// migrations run once, recorded in [`MIGRATIONS_TABLE`].
///
/// # Errors
///
/// [`StoreError::Backend`] when the database fails.
pub async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    surety_outbox::postgres::migrate(pool)
        .await
        .map_err(backend)?;
    migrator(MIGRATIONS).run(pool).await.map_err(backend)?;
    Ok(())
}

/// Saga storage in PostgreSQL. Cheap to clone (it holds the pool).
#[derive(Clone, Debug)]
pub struct PostgresSagaStore {
    pool: PgPool,
}

impl PostgresSagaStore {
    /// A store on `pool`; run [`migrate`] first.
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

impl PostgresSagaStore {
    /// Opens a write transaction. PostgreSQL commits concurrent
    /// transactions together (its WAL flush is shared), so each write
    /// commits on its own.
    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
        self.pool.begin().await
    }

    async fn commit_write(&self, write: Write) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await.map_err(backend)?;
        Self::write_in(&mut tx, &write).await?;
        tx.commit().await.map_err(backend)
    }
}

sql_saga_store!(PostgresSagaStore, sqlx::Postgres, PostgresOutbox);
