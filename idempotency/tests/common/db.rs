//! Databases for the integration tests (and `benches/dedup.rs`): testkit's
//! throwaway SQLite file and PostgreSQL schema, migrated for
//! surety-idempotency.

use std::time::Duration;

use surety_testkit::services::{postgres_url, require};

/// A migrated SQLite database in a fresh temporary directory.
pub struct TempSqlite(surety_testkit::db::TempSqlite);

impl std::ops::Deref for TempSqlite {
    type Target = surety_testkit::db::TempSqlite;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl TempSqlite {
    /// A migrated database with `connections` connections in WAL mode.
    pub async fn new(connections: u32) -> Self {
        Self::with_busy_timeout(connections, Duration::from_secs(10)).await
    }

    /// [`TempSqlite::new`], with connections waiting up to `busy_timeout`
    /// for a lock.
    pub async fn with_busy_timeout(connections: u32, busy_timeout: Duration) -> Self {
        let db = surety_testkit::db::TempSqlite::new(connections, busy_timeout).await;
        surety_idempotency::sqlite::migrate(&db.pool).await.unwrap();
        Self(db)
    }
}

/// A migrated PostgreSQL schema of its own for one test.
pub type TempSchema = surety_testkit::db::TempSchema;

/// A migrated schema on the database at `SURETY_POSTGRES_URL`; `None` (the
/// test skips) when it is not set.
pub async fn temp_schema(connections: u32) -> Option<TempSchema> {
    let url = require(postgres_url())?;
    Some(temp_schema_at(&url, connections).await)
}

/// [`temp_schema`] on the database at `url`.
pub async fn temp_schema_at(url: &str, connections: u32) -> TempSchema {
    let schema = TempSchema::at(url, "surety_idem", connections).await;
    surety_idempotency::postgres::migrate(&schema.pool)
        .await
        .unwrap();
    schema
}
