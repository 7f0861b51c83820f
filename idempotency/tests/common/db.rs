//! Databases for the integration tests (and `benches/dedup.rs`): a fresh
//! SQLite file, and a fresh PostgreSQL schema on the long-lived test
//! database.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use sqlx::AssertSqlSafe;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use surety_testkit::services::{postgres_url, require};

/// A SQLite database in a fresh temporary directory, removed on drop.
pub struct TempSqlite {
    pub pool: SqlitePool,
    dir: PathBuf,
}

impl TempSqlite {
    /// A migrated database with `connections` connections in WAL mode.
    pub async fn new(connections: u32) -> Self {
        Self::with_busy_timeout(connections, Duration::from_secs(10)).await
    }

    /// [`TempSqlite::new`], with connections waiting up to `busy_timeout`
    /// for a lock.
    pub async fn with_busy_timeout(connections: u32, busy_timeout: Duration) -> Self {
        let dir = std::env::temp_dir().join(format!("surety-idempotency-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        let options = SqliteConnectOptions::new()
            .filename(dir.join("test.db"))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(busy_timeout);
        let pool = SqlitePoolOptions::new()
            .max_connections(connections)
            .connect_with(options)
            .await
            .unwrap();
        surety_idempotency::sqlite::migrate(&pool).await.unwrap();
        Self { pool, dir }
    }
}

impl Drop for TempSqlite {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A PostgreSQL schema of its own for one test, on the database at
/// `SURETY_POSTGRES_URL`; `None` (the test skips) when it is not set.
pub struct TempSchema {
    pub pool: PgPool,
    pub schema: String,
    admin: PgPool,
}

impl TempSchema {
    /// A migrated schema, reached through a pool whose `search_path` is it.
    pub async fn new(connections: u32) -> Option<Self> {
        let url = require(postgres_url())?;
        Some(Self::at(&url, connections).await)
    }

    /// [`TempSchema::new`] on the database at `url`.
    pub async fn at(url: &str, connections: u32) -> Self {
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(url)
            .await
            .expect("PostgreSQL at SURETY_POSTGRES_URL answers");
        let schema = format!("surety_idem_{}", uuid::Uuid::now_v7().simple());
        sqlx::query(AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .execute(&admin)
            .await
            .unwrap();
        let options = PgConnectOptions::from_str(url)
            .unwrap()
            .options([("search_path", schema.as_str())]);
        let pool = PgPoolOptions::new()
            .max_connections(connections)
            .connect_with(options)
            .await
            .unwrap();
        surety_idempotency::postgres::migrate(&pool).await.unwrap();
        Self {
            pool,
            schema,
            admin,
        }
    }

    /// Drops the schema (call at the end of a passing test).
    pub async fn drop_schema(self) {
        self.pool.close().await;
        sqlx::query(AssertSqlSafe(format!(
            "DROP SCHEMA {} CASCADE",
            self.schema
        )))
        .execute(&self.admin)
        .await
        .unwrap();
    }
}
