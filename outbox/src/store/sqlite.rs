//! [`SqliteOutbox`]: the outbox in SQLite, the embedded default.
//!
//! Open the pool in WAL mode with a busy timeout, so that the relay's reads
//! do not wait for the application's writes and concurrent writers queue
//! instead of failing. The relay writes too (it marks rows sent), so an
//! application transaction that reads before it writes should start with
//! `BEGIN IMMEDIATE` (`pool.begin_with("BEGIN IMMEDIATE")`): a deferred one
//! that meets another connection's write between its read and its write
//! fails with `SQLITE_BUSY_SNAPSHOT` ("database is locked") whatever the
//! busy timeout.
//!
//! ```
//! use std::time::Duration;
//! use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
//! use surety_core::Envelope;
//! use surety_outbox::SqliteOutbox;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = std::env::temp_dir().join(format!("surety-doc-{}", uuid::Uuid::now_v7()));
//! # std::fs::create_dir_all(&dir)?;
//! # let path = dir.join("shop.db");
//! let options = SqliteConnectOptions::new()
//!     .filename(&path)
//!     .create_if_missing(true)
//!     .journal_mode(SqliteJournalMode::Wal)
//!     .busy_timeout(Duration::from_secs(5));
//! let pool = SqlitePoolOptions::new().max_connections(4).connect_with(options).await?;
//! surety_outbox::sqlite::migrate(&pool).await?;
//! sqlx::query("CREATE TABLE orders (id TEXT PRIMARY KEY)").execute(&pool).await?;
//!
//! // The order and its event commit together, or neither does.
//! let mut tx = pool.begin().await?;
//! sqlx::query("INSERT INTO orders (id) VALUES ($1)").bind("o-1").execute(&mut *tx).await?;
//! let event = Envelope::builder("/shop", "order.placed").partition_key("o-1").build();
//! SqliteOutbox::enqueue(&mut tx, "orders", &event).await?;
//! tx.commit().await?;
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok(()) }
//! ```

use sqlx::Sqlite;
use sqlx::sqlite::SqlitePool;

use super::sql::{migrator, sql_outbox};
use crate::error::OutboxError;

pub use super::sql::MIGRATIONS_TABLE;

/// The database's clock in Unix milliseconds: the lease runs on it, so
/// relays whose own clocks disagree still agree on who holds it.
const NOW: &str = "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)";

/// The migrations, embedded from `migrations/sqlite/` (version,
/// description, SQL).
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "create surety outbox",
        include_str!("../../migrations/sqlite/0001_init.sql"),
    ),
    (
        2,
        "outbox lease epoch",
        include_str!("../../migrations/sqlite/0002_lease_epoch.sql"),
    ),
    (
        3,
        "outbox waiting index holds failed rows only",
        include_str!("../../migrations/sqlite/0003_waiting_index.sql"),
    ),
];

/// Creates or upgrades the outbox tables. Safe to call on every start-up:
/// migrations run once.
///
/// # Errors
///
/// [`OutboxError::Migration`] when a migration fails.
pub async fn migrate(pool: &SqlitePool) -> Result<(), OutboxError> {
    migrator(MIGRATIONS).run(pool).await?;
    Ok(())
}

/// The outbox in SQLite. Cheap to clone (it holds the pool).
///
/// Write with [`enqueue`](Self::enqueue) in your transaction; hand the
/// store to a [`Relay`](crate::Relay) to publish.
#[derive(Debug, Clone)]
pub struct SqliteOutbox {
    pool: SqlitePool,
}

sql_outbox!(SqliteOutbox, Sqlite, SqlitePool, "SQLite", NOW);
