//! [`SqliteSagaStore`]: saga instances, history and timers in SQLite, with
//! the commands written into the `surety-outbox` table in the same
//! transaction, so the outbox [`Relay`](surety_outbox::Relay) sends them.
//!
//! ```
//! use sqlx::sqlite::SqlitePoolOptions;
//! use surety_saga::sqlite::{self, SqliteSagaStore};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = SqlitePoolOptions::new().max_connections(1).connect("sqlite::memory:").await?;
//! sqlite::migrate(&pool).await?; // the saga tables and the outbox's
//! let store = SqliteSagaStore::new(pool);
//! # let _ = store;
//! # Ok(()) }
//! ```

use sqlx::sqlite::SqlitePool;
use surety_outbox::SqliteOutbox;

use crate::sql::{backend, migrator, sql_saga_store};
use crate::store::StoreError;

pub use crate::sql::MIGRATIONS_TABLE;

/// The migrations, embedded from `migrations/sqlite/` (version, description,
/// SQL).
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "create surety saga",
        include_str!("../migrations/sqlite/0001_init.sql"),
    ),
    (
        2,
        "saga created_at, history trace id, audit",
        include_str!("../migrations/sqlite/0002_created_at_and_trace.sql"),
    ),
    (
        3,
        "saga tombstones",
        include_str!("../migrations/sqlite/0003_tombstones.sql"),
    ),
    (
        4,
        "saga history from-state, commands and timer due, no-op records",
        include_str!("../migrations/sqlite/0004_history_detail_and_noops.sql"),
    ),
];

/// Creates or upgrades the saga tables (and the outbox tables, through
/// `surety_outbox::sqlite::migrate`). Safe to call on every start-up:
/// migrations run once, recorded in [`MIGRATIONS_TABLE`].
///
/// # Errors
///
/// [`StoreError::Backend`] when the database fails.
pub async fn migrate(pool: &SqlitePool) -> Result<(), StoreError> {
    surety_outbox::sqlite::migrate(pool)
        .await
        .map_err(backend)?;
    migrator(MIGRATIONS).run(pool).await.map_err(backend)?;
    Ok(())
}

/// Saga storage in SQLite. Cheap to clone (it holds the pool).
/// The write transaction starts with `BEGIN IMMEDIATE`: it takes SQLite's
/// write lock before it reads, so a concurrent writer waits (busy timeout)
/// instead of failing with `SQLITE_BUSY_SNAPSHOT`.
#[derive(Clone, Debug)]
pub struct SqliteSagaStore {
    pool: SqlitePool,
}

impl SqliteSagaStore {
    /// A store on `pool`; run [`migrate`] first.
    pub fn new(pool: SqlitePool) -> Self {
        Self { pool }
    }

    /// The pool.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

sql_saga_store!(SqliteSagaStore, SqlitePool, SqliteOutbox, |p| p
    .begin_with("BEGIN IMMEDIATE"));
