//! The PostgreSQL store.

use sqlx::postgres::PgPool;

use super::StoreError;
use super::sql::sql_store;

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
/// use surety_dlq::store::PostgresDlqStore;
///
/// # async fn run() -> Result<PostgresDlqStore, surety_dlq::store::StoreError> {
/// let pool = surety_dlq::sqlx::PgPool::connect("postgres://surety:surety@127.0.0.1:5432/surety")
///     .await
///     .map_err(surety_dlq::store::StoreError::backend)?;
/// surety_dlq::store::postgres::migrate(&pool).await?;
/// let store = PostgresDlqStore::new(pool);
/// # Ok(store) }
/// # let _ = run;
/// ```
#[derive(Debug, Clone)]
pub struct PostgresDlqStore {
    pool: PgPool,
}

impl PostgresDlqStore {
    /// A store on `pool`. Run [`migrate`] on the pool once before use.
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// The connection pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

// PostgreSQL text cannot hold a NUL byte (nor take one as a parameter): a
// filter value with one matches no stored record.
/// Creates or upgrades the DLQ tables on `pool` (`surety_dlq_letters`,
/// `surety_dlq_audit`, `surety_dlq_jobs` and `surety_dlq_migrations`, which
/// records the applied versions). Idempotent; safe to run from several
/// processes at once (an advisory lock orders them).
pub async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    PostgresDlqStore::new(pool.clone()).migrate().await
}

sql_store!(
    PostgresDlqStore,
    sqlx::Postgres,
    MIGRATION_LOCK,
    MIGRATIONS,
    "strpos",
    true
);
