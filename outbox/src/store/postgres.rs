//! [`PostgresOutbox`]: the outbox in PostgreSQL.
//!
//! ```no_run
//! use surety_core::Envelope;
//! use surety_outbox::PostgresOutbox;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = sqlx::PgPool::connect("postgres://surety:surety@127.0.0.1:5432/surety").await?;
//! surety_outbox::postgres::migrate(&pool).await?;
//!
//! let mut tx = pool.begin().await?;
//! sqlx::query("UPDATE orders SET status = 'placed' WHERE id = $1").bind("o-1").execute(&mut *tx).await?;
//! let event = Envelope::builder("/shop", "order.placed").partition_key("o-1").build();
//! PostgresOutbox::enqueue(&mut tx, "orders", &event).await?;
//! tx.commit().await?;
//! # Ok(()) }
//! ```
//!
//! Rows get their `seq` from a sequence when they are inserted, and
//! transactions may commit out of that order. Rows of one key keep their
//! order as long as the transactions writing that key are serialized, as
//! they are when each locks or updates the key's own row (the order, the
//! account) before it enqueues.

use sqlx::Postgres;
use sqlx::postgres::PgPool;

use super::sql::{migrator, sql_outbox};
use crate::error::OutboxError;

pub use super::sql::MIGRATIONS_TABLE;

/// The database's clock in Unix milliseconds: the lease runs on it, so
/// relays whose own clocks disagree still agree on who holds it.
const NOW: &str = "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::int8";

/// The migrations, embedded from `migrations/postgres/` (version,
/// description, SQL).
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "create surety outbox",
        include_str!("../../migrations/postgres/0001_init.sql"),
    ),
    (
        2,
        "outbox lease epoch",
        include_str!("../../migrations/postgres/0002_lease_epoch.sql"),
    ),
    (
        3,
        "outbox waiting index holds failed rows only",
        include_str!("../../migrations/postgres/0003_waiting_index.sql"),
    ),
];

/// Creates or upgrades the outbox tables in the current schema. Safe to
/// call from every instance at start-up: migrations run under a database
/// lock and only once.
///
/// # Errors
///
/// [`OutboxError::Migration`] when a migration fails.
pub async fn migrate(pool: &PgPool) -> Result<(), OutboxError> {
    migrator(MIGRATIONS).run(pool).await?;
    Ok(())
}

/// The outbox in PostgreSQL. Cheap to clone (it holds the pool).
///
/// Write with [`enqueue`](Self::enqueue) in your transaction; hand the
/// store to a [`Relay`](crate::Relay) to publish.
#[derive(Debug, Clone)]
pub struct PostgresOutbox {
    pool: PgPool,
}

sql_outbox!(PostgresOutbox, Postgres, PgPool, "PostgreSQL", NOW);
