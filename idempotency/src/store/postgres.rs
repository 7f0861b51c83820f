//! [`PostgresDedupStore`]: the production dedup store, and the transactional
//! inbox on PostgreSQL.
//!
//! One table, `surety_idempotency`, created by [`migrate`]. Claims are one
//! `INSERT ... ON CONFLICT DO UPDATE ... WHERE` statement: a new key is
//! inserted, an expired lease is taken over, anything else is left alone,
//! so concurrent claims from any number of instances acquire a key once
//! without advisory locks. Lease times use the database clock
//! (`clock_timestamp()`), so instances with skewed clocks agree.
//! Retention deletes in bounded batches with `FOR UPDATE SKIP LOCKED`, so
//! every instance can run the cleanup at once.

use std::time::Duration;

use sqlx::postgres::{PgConnection, PgPool, PgRow};
use sqlx::{Postgres, Row};

use super::sql::{SqlQuery, sql_store};
use super::{DedupStore, millis};
use crate::error::StoreError;
use crate::inbox::TransactionalStore;

/// The migrations, embedded from `migrations/postgres/` (version, description,
/// SQL), in the format of `sqlx migrate`.
const MIGRATIONS: &[(i64, &str, &str)] = &[(
    20250601000000,
    "create surety idempotency",
    include_str!("../../migrations/postgres/20250601000000_create_surety_idempotency.sql"),
)];

pub use super::MIGRATIONS_TABLE;

/// Creates or upgrades the `surety_idempotency` table in the current schema
/// (the first schema on the connection's `search_path`).
///
/// Safe to call from every instance at start-up: migrations run under a
/// database lock and only once.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let pool = sqlx::PgPool::connect("postgres://surety:surety@127.0.0.1:5432/surety").await?;
/// surety_idempotency::postgres::migrate(&pool).await?;
/// let store = surety_idempotency::PostgresDedupStore::new(pool);
/// # let _ = store; Ok(()) }
/// ```
pub async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    super::migrator(MIGRATIONS).run(pool).await?;
    Ok(())
}

/// A dedup store in PostgreSQL. Cheap to clone (it holds the pool).
///
/// Besides [`DedupStore`], it implements [`TransactionalStore`]: a claim can
/// be completed inside the transaction of your business write (the inbox
/// pattern), see [`inbox`](crate::inbox).
#[derive(Debug, Clone)]
pub struct PostgresDedupStore {
    pool: PgPool,
}

impl PostgresDedupStore {
    /// A store on `pool`. Run [`migrate`] first.
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// What differs on Postgres: the statements on the `surety_idempotency` table
/// and their time parameters (see [`sql_store!`](super::sql::sql_store)).
mod dialect {
    use super::*;

    pub(super) const CLAIM: &str = "\
INSERT INTO surety_idempotency AS t (key, status, token, lease_until, claims, created_at)
VALUES ($1, 'in_progress', $2, clock_timestamp() + $3::float8 * interval '1 millisecond', 1, clock_timestamp())
ON CONFLICT (key) DO UPDATE
    SET token = EXCLUDED.token, lease_until = EXCLUDED.lease_until, claims = t.claims + 1
    WHERE t.status = 'in_progress' AND t.lease_until <= clock_timestamp()
RETURNING claims";

    pub(super) const LOOK: &str = "\
SELECT status, reply,
    GREATEST(0, ceil(EXTRACT(EPOCH FROM (lease_until - clock_timestamp())) * 1000))::int8 AS remaining_ms
FROM surety_idempotency WHERE key = $1";

    pub(super) const EXTEND: &str = "\
UPDATE surety_idempotency
SET lease_until = clock_timestamp() + $3::float8 * interval '1 millisecond'
WHERE key = $1 AND token = $2 AND status = 'in_progress'";

    pub(super) const COMPLETE: &str = "\
UPDATE surety_idempotency
SET status = 'done', reply = $3, lease_until = NULL, completed_at = clock_timestamp()
WHERE key = $1 AND token = $2";

    pub(super) const RELEASE: &str =
        "DELETE FROM surety_idempotency WHERE key = $1 AND token = $2 AND status = 'in_progress'";

    pub(super) const MARK: &str = "\
INSERT INTO surety_idempotency AS t (key, status, token, lease_until, claims, created_at, completed_at)
VALUES ($1, 'done', $2, NULL, 1, clock_timestamp(), clock_timestamp())
ON CONFLICT (key) DO UPDATE
    SET status = 'done', token = EXCLUDED.token, lease_until = NULL, claims = t.claims + 1,
        reply = NULL, completed_at = EXCLUDED.completed_at
    WHERE t.status = 'in_progress' AND t.lease_until <= clock_timestamp()
RETURNING claims";

    pub(super) const PURGE_DONE: &str = "\
DELETE FROM surety_idempotency t USING (
    SELECT key FROM surety_idempotency
    WHERE status = 'done' AND completed_at < clock_timestamp() - $1::float8 * interval '1 millisecond'
    ORDER BY completed_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
) doomed
WHERE t.key = doomed.key";

    pub(super) const PURGE_ABANDONED: &str = "\
DELETE FROM surety_idempotency t USING (
    SELECT key FROM surety_idempotency
    WHERE status = 'in_progress' AND lease_until < clock_timestamp() - $1::float8 * interval '1 millisecond'
    ORDER BY lease_until
    LIMIT $2
    FOR UPDATE SKIP LOCKED
) doomed
WHERE t.key = doomed.key";

    pub(super) const BEGIN: Option<&str> = None;

    pub(super) type Claims = i32;

    pub(super) fn bind_claim(
        query: SqlQuery<'_, Postgres>,
        lease: Duration,
    ) -> SqlQuery<'_, Postgres> {
        query.bind(millis(lease) as f64)
    }

    pub(super) fn bind_mark(query: SqlQuery<'_, Postgres>) -> SqlQuery<'_, Postgres> {
        query
    }

    pub(super) fn bind_extend(
        query: SqlQuery<'_, Postgres>,
        lease: Duration,
    ) -> SqlQuery<'_, Postgres> {
        query.bind(millis(lease) as f64)
    }

    pub(super) fn bind_complete(query: SqlQuery<'_, Postgres>) -> SqlQuery<'_, Postgres> {
        query
    }

    pub(super) fn cutoff(older_than: Duration) -> f64 {
        millis(older_than) as f64
    }

    pub(super) fn remaining_ms(row: &PgRow) -> Result<Option<i64>, sqlx::Error> {
        row.try_get("remaining_ms")
    }
}

sql_store!(DedupStore, TransactionalStore for PostgresDedupStore on Postgres, PgConnection, dialect);
