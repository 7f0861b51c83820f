//! Throwaway databases for tests: a SQLite file in a fresh temporary
//! directory, and a PostgreSQL schema of its own on the test database.
//!
//! Each store crate runs its own `migrate` on the pool it gets.

#![allow(clippy::expect_used)] // Fixtures: a failure to set up panics the test, as documented.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use sqlx::AssertSqlSafe;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};

use crate::services::{postgres_url, require};

/// A SQLite database in a fresh temporary directory, removed on drop.
#[derive(Debug)]
pub struct TempSqlite {
    /// The pool, in WAL mode.
    pub pool: SqlitePool,
    dir: PathBuf,
}

impl TempSqlite {
    /// A database with `connections` connections in WAL mode, which wait
    /// up to `busy_timeout` for a lock.
    ///
    /// # Panics
    ///
    /// When the directory or the database cannot be created.
    pub async fn new(connections: u32, busy_timeout: Duration) -> Self {
        let dir = std::env::temp_dir().join(format!("surety-test-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        let options = SqliteConnectOptions::new()
            .filename(dir.join("test.db"))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(busy_timeout);
        let pool = SqlitePoolOptions::new()
            .max_connections(connections)
            .connect_with(options)
            .await
            .expect("a SQLite database in a temporary directory");
        Self { pool, dir }
    }

    /// The database file, for another process to open.
    pub fn path(&self) -> PathBuf {
        self.dir.join("test.db")
    }
}

impl Drop for TempSqlite {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A PostgreSQL schema of its own for one test, reached through a pool
/// whose `search_path` is that schema.
#[derive(Debug)]
pub struct TempSchema {
    /// The pool on the schema.
    pub pool: PgPool,
    /// The schema's name.
    pub schema: String,
    admin: PgPool,
}

impl TempSchema {
    /// A fresh schema named `{prefix}_{uuid}` on the database at
    /// `SURETY_POSTGRES_URL`; `None` (the test skips) when it is not set
    /// and services are not required.
    pub async fn new(prefix: &str, connections: u32) -> Option<Self> {
        let url = require(postgres_url())?;
        Some(Self::at(&url, prefix, connections).await)
    }

    /// [`TempSchema::new`] on the database at `url`.
    ///
    /// # Panics
    ///
    /// When PostgreSQL does not answer or the schema cannot be created.
    pub async fn at(url: &str, prefix: &str, connections: u32) -> Self {
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(url)
            .await
            .expect("PostgreSQL at SURETY_POSTGRES_URL answers");
        let schema = format!("{prefix}_{}", uuid::Uuid::now_v7().simple());
        sqlx::query(AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .execute(&admin)
            .await
            .expect("a fresh schema");
        let options = PgConnectOptions::from_str(url)
            .expect("a PostgreSQL URL")
            .options([("search_path", schema.as_str())]);
        let pool = PgPoolOptions::new()
            .max_connections(connections)
            .connect_with(options)
            .await
            .expect("a pool on the fresh schema");
        Self {
            pool,
            schema,
            admin,
        }
    }

    /// Drops the schema (call at the end of a passing test).
    ///
    /// # Panics
    ///
    /// When the schema cannot be dropped.
    pub async fn drop_schema(self) {
        self.pool.close().await;
        sqlx::query(AssertSqlSafe(format!(
            "DROP SCHEMA {} CASCADE",
            self.schema
        )))
        .execute(&self.admin)
        .await
        .expect("the schema is dropped");
    }
}
