//! The SQLite store.

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};

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
/// use surety_dlq::store::{DlqStore, Filter, SqliteStore};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), surety_dlq::store::StoreError> {
/// let store = SqliteStore::in_memory().await?; // already migrated
/// assert_eq!(store.count(&Filter::new()).await?, 0);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// A store on `pool`. Call [`migrate`](Self::migrate) once before use.
    pub fn new(pool: SqlitePool) -> Self {
        Self { pool }
    }

    /// Opens (creating if missing) the database at `url` (for example
    /// `sqlite://dlq.db`) in WAL mode and migrates it.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(backend)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .connect_with(options)
            .await
            .map_err(backend)?;
        let store = Self::new(pool);
        store.migrate().await?;
        Ok(store)
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
        let store = Self::new(pool);
        store.migrate().await?;
        Ok(store)
    }

    /// The connection pool.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

// SQLite stores text with NUL bytes; `instr` compares by length (LIKE
// would stop at the first NUL).
sql_store!(SqliteStore, sqlx::Sqlite, "", MIGRATIONS, "instr", false);
