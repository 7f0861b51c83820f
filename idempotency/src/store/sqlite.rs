//! [`SqliteDedupStore`]: the embedded dedup store, and the transactional inbox
//! on SQLite.
//!
//! One table, `surety_idempotency`, created by [`migrate`]. Claims are one
//! `INSERT ... ON CONFLICT DO UPDATE ... WHERE` statement, atomic under
//! SQLite's single writer. Times are Unix milliseconds from this process's
//! clock (SQLite is embedded: the processes sharing a database file share
//! the machine's clock).
//!
//! Open the pool in WAL mode with a busy timeout, so that readers do not
//! wait for the writer and concurrent writers queue instead of failing:
//!
//! ```
//! use std::time::Duration;
//! use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = std::env::temp_dir().join(format!("surety-doc-{}", uuid::Uuid::now_v7()));
//! # std::fs::create_dir_all(&dir)?;
//! # let path = dir.join("app.db");
//! let options = SqliteConnectOptions::new()
//!     .filename(&path)
//!     .create_if_missing(true)
//!     .journal_mode(SqliteJournalMode::Wal)
//!     .busy_timeout(Duration::from_secs(5));
//! let pool = SqlitePoolOptions::new().max_connections(4).connect_with(options).await?;
//! surety_idempotency::sqlite::migrate(&pool).await?;
//! let store = surety_idempotency::SqliteDedupStore::new(pool);
//! # drop(store); std::fs::remove_dir_all(&dir)?;
//! # Ok(()) }
//! ```

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::sqlite::{SqliteConnection, SqlitePool, SqliteRow};
use sqlx::{Row, Sqlite};

use super::sql::{SqlQuery, sql_store};
use super::{DedupStore, millis};
use crate::error::StoreError;
use crate::inbox::TransactionalStore;

/// The migrations, embedded from `migrations/sqlite/` (version, description,
/// SQL), in the format of `sqlx migrate`.
const MIGRATIONS: &[(i64, &str, &str)] = &[(
    20250601000000,
    "create surety idempotency",
    include_str!("../../migrations/sqlite/20250601000000_create_surety_idempotency.sql"),
)];

pub use super::MIGRATIONS_TABLE;

/// Creates or upgrades the `surety_idempotency` table.
///
/// Safe to call on every start-up: migrations run once.
pub async fn migrate(pool: &SqlitePool) -> Result<(), StoreError> {
    super::migrator(MIGRATIONS).run(pool).await?;
    Ok(())
}

/// A dedup store in SQLite. Cheap to clone (it holds the pool).
///
/// Besides [`DedupStore`], it implements [`TransactionalStore`]: a claim can
/// be completed inside the transaction of your business write (the inbox
/// pattern), see [`inbox`](crate::inbox). Inbox transactions start with
/// `BEGIN IMMEDIATE`, taking SQLite's write lock up front, so two of them
/// queue rather than fail when the second tries to write.
#[derive(Debug, Clone)]
pub struct SqliteDedupStore {
    pool: SqlitePool,
}

impl SqliteDedupStore {
    /// A store on `pool`. Run [`migrate`] first.
    pub fn new(pool: SqlitePool) -> Self {
        Self { pool }
    }

    /// The pool.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

/// Now, in Unix milliseconds.
fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, millis)
}

/// What differs on Sqlite: the statements on the `surety_idempotency` table
/// and their time parameters (see [`sql_store!`](super::sql::sql_store)).
mod dialect {
    use super::*;

    pub(super) const CLAIM: &str = "\
INSERT INTO surety_idempotency (key, status, token, lease_until, claims, created_at)
VALUES (?1, 'in_progress', ?2, ?3 + ?4, 1, ?3)
ON CONFLICT (key) DO UPDATE
    SET token = excluded.token, lease_until = excluded.lease_until,
        claims = surety_idempotency.claims + 1
    WHERE surety_idempotency.status = 'in_progress' AND surety_idempotency.lease_until <= ?3
RETURNING claims";

    pub(super) const LOOK: &str =
        "SELECT status, reply, lease_until FROM surety_idempotency WHERE key = ?1";

    pub(super) const EXTEND: &str = "\
UPDATE surety_idempotency SET lease_until = ?3
WHERE key = ?1 AND token = ?2 AND status = 'in_progress'";

    pub(super) const COMPLETE: &str = "\
UPDATE surety_idempotency
SET status = 'done', reply = ?3, lease_until = NULL, completed_at = ?4
WHERE key = ?1 AND token = ?2";

    pub(super) const RELEASE: &str =
        "DELETE FROM surety_idempotency WHERE key = ?1 AND token = ?2 AND status = 'in_progress'";

    pub(super) const MARK: &str = "\
INSERT INTO surety_idempotency (key, status, token, lease_until, claims, created_at, completed_at)
VALUES (?1, 'done', ?2, NULL, 1, ?3, ?3)
ON CONFLICT (key) DO UPDATE
    SET status = 'done', token = excluded.token, lease_until = NULL,
        claims = surety_idempotency.claims + 1, reply = NULL, completed_at = excluded.completed_at
    WHERE surety_idempotency.status = 'in_progress' AND surety_idempotency.lease_until <= ?3
RETURNING claims";

    pub(super) const PURGE_DONE: &str = "\
DELETE FROM surety_idempotency WHERE key IN (
    SELECT key FROM surety_idempotency
    WHERE status = 'done' AND completed_at < ?1
    ORDER BY completed_at LIMIT ?2)";

    pub(super) const PURGE_ABANDONED: &str = "\
DELETE FROM surety_idempotency WHERE key IN (
    SELECT key FROM surety_idempotency
    WHERE status = 'in_progress' AND lease_until < ?1
    ORDER BY lease_until LIMIT ?2)";

    pub(super) const BEGIN: Option<&str> = Some("BEGIN IMMEDIATE");

    pub(super) type Claims = i64;

    pub(super) fn bind_claim(query: SqlQuery<'_, Sqlite>, lease: Duration) -> SqlQuery<'_, Sqlite> {
        query.bind(now_ms()).bind(millis(lease))
    }

    pub(super) fn bind_mark(query: SqlQuery<'_, Sqlite>) -> SqlQuery<'_, Sqlite> {
        query.bind(now_ms())
    }

    pub(super) fn bind_extend(
        query: SqlQuery<'_, Sqlite>,
        lease: Duration,
    ) -> SqlQuery<'_, Sqlite> {
        query.bind(now_ms().saturating_add(millis(lease)))
    }

    pub(super) fn bind_complete(query: SqlQuery<'_, Sqlite>) -> SqlQuery<'_, Sqlite> {
        query.bind(now_ms())
    }

    pub(super) fn cutoff(older_than: Duration) -> i64 {
        now_ms().saturating_sub(millis(older_than))
    }

    pub(super) fn remaining_ms(row: &SqliteRow) -> Result<Option<i64>, sqlx::Error> {
        let lease_until: Option<i64> = row.try_get("lease_until")?;
        Ok(lease_until.map(|until| until.saturating_sub(now_ms())))
    }
}

sql_store!(DedupStore, TransactionalStore for SqliteDedupStore on Sqlite, SqliteConnection, dialect);
