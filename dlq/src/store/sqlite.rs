//! The SQLite store.

use std::str::FromStr;

use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};

use super::StoreError;
use super::sql::{backend, sql_store};

/// Migrations shipped with the SQLite store: (version, description, SQL).
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "dead letters and audit log",
        include_str!("../../migrations/sqlite/0001_init.sql"),
    ),
    (
        2,
        "replay and discard jobs",
        include_str!("../../migrations/sqlite/0002_jobs.sql"),
    ),
];

/// A [`DlqStore`](super::DlqStore) in SQLite, the embedded default.
///
/// ```
/// use surety_dlq::store::{DlqStore, Filter, SqliteDlqStore};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), surety_dlq::store::StoreError> {
/// let store = SqliteDlqStore::in_memory().await?; // already migrated
/// assert_eq!(store.count(&Filter::new()).await?, 0);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct SqliteDlqStore {
    pool: SqlitePool,
}

impl SqliteDlqStore {
    /// A store on `pool`. Run [`migrate`] on the pool once before use.
    pub fn new(pool: SqlitePool) -> Self {
        Self { pool }
    }

    /// A migrated, private in-memory database (one connection, kept open for
    /// the life of the store).
    pub async fn in_memory() -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str("sqlite::memory:").map_err(backend)?;
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options)
            .await
            .map_err(backend)?;
        migrate(&pool).await?;
        Ok(Self::new(pool))
    }

    /// The connection pool.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

/// Creates or upgrades the DLQ tables on `pool` (`surety_dlq_letters`,
/// `surety_dlq_audit`, `surety_dlq_jobs` and `surety_dlq_migrations`, which
/// records the applied versions). Idempotent; safe to run from several
/// processes at once.
pub async fn migrate(pool: &SqlitePool) -> Result<(), StoreError> {
    SqliteDlqStore::new(pool.clone()).migrate().await
}

// SQLite stores text with NUL bytes; `instr` compares by length (LIKE
// would stop at the first NUL).
sql_store!(SqliteDlqStore, sqlx::Sqlite, "", MIGRATIONS, "instr", false);
