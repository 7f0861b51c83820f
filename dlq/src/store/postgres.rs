//! The PostgreSQL store.

use sqlx::postgres::{PgPool, PgPoolOptions};

use super::StoreError;
use super::sql::{backend, sql_store};

/// Migrations shipped with the PostgreSQL store: (version, description, SQL).
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "dead letters and audit log",
        include_str!("../../migrations/postgres/0001_init.sql"),
    ),
    (
        2,
        "replay and discard jobs",
        include_str!("../../migrations/postgres/0002_jobs.sql"),
    ),
];

/// Serializes concurrent migrations of the DLQ tables (a transaction-scoped
/// advisory lock; the key is arbitrary but fixed).
const MIGRATION_LOCK: &str = "SELECT pg_advisory_xact_lock(7355608001)";

/// A [`DlqStore`](super::DlqStore) in PostgreSQL.
///
/// Tables are created unqualified, in the first schema of the connection's
/// `search_path`; give the pool a `search_path` option to keep them in a
/// schema of their own.
///
/// ```no_run
/// use surety_dlq::store::PostgresStore;
///
/// # async fn run() -> Result<PostgresStore, surety_dlq::store::StoreError> {
/// let store = PostgresStore::connect("postgres://surety:surety@127.0.0.1:5432/surety").await?;
/// # Ok(store) }
/// # let _ = run;
/// ```
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    /// A store on `pool`. Call [`migrate`](Self::migrate) once before use.
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Connects to `url` and migrates.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new().connect(url).await.map_err(backend)?;
        let store = Self::new(pool);
        store.migrate().await?;
        Ok(store)
    }

    /// The connection pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

// PostgreSQL text cannot hold a NUL byte (nor take one as a parameter): a
// filter value with one matches no stored record.
sql_store!(
    PostgresStore,
    sqlx::Postgres,
    MIGRATION_LOCK,
    MIGRATIONS,
    "strpos",
    true
);
