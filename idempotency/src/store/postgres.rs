//! [`PostgresStore`]: the production dedup store, and the transactional
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

use bytes::Bytes;
use sqlx::postgres::{PgConnection, PgPool};
use sqlx::{Postgres, Row};

use super::{Claim, DedupStore, Lease, LeaseToken, from_millis, millis};
use crate::error::StoreError;
use crate::inbox::{Marked, TransactionalStore};

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
/// let store = surety_idempotency::PostgresStore::new(pool);
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
pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    /// A store on `pool`. Run [`migrate`] first.
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

const CLAIM: &str = "\
INSERT INTO surety_idempotency AS t (key, status, token, lease_until, claims, created_at)
VALUES ($1, 'in_progress', $2, clock_timestamp() + $3::float8 * interval '1 millisecond', 1, clock_timestamp())
ON CONFLICT (key) DO UPDATE
    SET token = EXCLUDED.token, lease_until = EXCLUDED.lease_until, claims = t.claims + 1
    WHERE t.status = 'in_progress' AND t.lease_until <= clock_timestamp()
RETURNING claims";

const LOOK: &str = "\
SELECT status, reply,
    GREATEST(0, ceil(EXTRACT(EPOCH FROM (lease_until - clock_timestamp())) * 1000))::int8 AS remaining_ms
FROM surety_idempotency WHERE key = $1";

const EXTEND: &str = "\
UPDATE surety_idempotency
SET lease_until = clock_timestamp() + $3::float8 * interval '1 millisecond'
WHERE key = $1 AND token = $2 AND status = 'in_progress'";

const COMPLETE: &str = "\
UPDATE surety_idempotency
SET status = 'done', reply = $3, lease_until = NULL, completed_at = clock_timestamp()
WHERE key = $1 AND token = $2";

const RELEASE: &str =
    "DELETE FROM surety_idempotency WHERE key = $1 AND token = $2 AND status = 'in_progress'";

const MARK: &str = "\
INSERT INTO surety_idempotency AS t (key, status, token, lease_until, claims, created_at, completed_at)
VALUES ($1, 'done', $2, NULL, 1, clock_timestamp(), clock_timestamp())
ON CONFLICT (key) DO UPDATE
    SET status = 'done', token = EXCLUDED.token, lease_until = NULL, claims = t.claims + 1,
        reply = NULL, completed_at = EXCLUDED.completed_at
    WHERE t.status = 'in_progress' AND t.lease_until <= clock_timestamp()
RETURNING claims";

const PURGE_DONE: &str = "\
DELETE FROM surety_idempotency t USING (
    SELECT key FROM surety_idempotency
    WHERE status = 'done' AND completed_at < clock_timestamp() - $1::float8 * interval '1 millisecond'
    ORDER BY completed_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
) doomed
WHERE t.key = doomed.key";

const PURGE_ABANDONED: &str = "\
DELETE FROM surety_idempotency t USING (
    SELECT key FROM surety_idempotency
    WHERE status = 'in_progress' AND lease_until < clock_timestamp() - $1::float8 * interval '1 millisecond'
    ORDER BY lease_until
    LIMIT $2
    FOR UPDATE SKIP LOCKED
) doomed
WHERE t.key = doomed.key";

/// How many times a claim re-reads a key that changed between its two
/// statements before it answers busy.
const CLAIM_ATTEMPTS: usize = 3;

impl DedupStore for PostgresStore {
    async fn claim(&self, key: &str, lease: Duration) -> Result<Claim, StoreError> {
        let mut conn = self.pool.acquire().await?;
        claim_on(&mut conn, key, Some(lease)).await
    }

    async fn extend(
        &self,
        key: &str,
        token: &LeaseToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let done = sqlx::query(EXTEND)
            .bind(key)
            .bind(token.as_str())
            .bind(millis(lease) as f64)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 1 {
            Ok(())
        } else {
            Err(StoreError::LeaseLost {
                key: key.to_owned(),
            })
        }
    }

    async fn complete(
        &self,
        key: &str,
        token: &LeaseToken,
        reply: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        let mut conn = self.pool.acquire().await?;
        complete_on(&mut conn, key, token, reply).await
    }

    async fn release(&self, key: &str, token: &LeaseToken) -> Result<(), StoreError> {
        sqlx::query(RELEASE)
            .bind(key)
            .bind(token.as_str())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn purge(&self, older_than: Duration, limit: u32) -> Result<u64, StoreError> {
        let age = millis(older_than) as f64;
        let done = sqlx::query(PURGE_DONE)
            .bind(age)
            .bind(i64::from(limit))
            .execute(&self.pool)
            .await?
            .rows_affected();
        let room = u64::from(limit).saturating_sub(done);
        if room == 0 {
            return Ok(done);
        }
        let abandoned = sqlx::query(PURGE_ABANDONED)
            .bind(age)
            .bind(i64::try_from(room).unwrap_or(i64::MAX))
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(done + abandoned)
    }

    async fn size(&self) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM surety_idempotency")
            .fetch_one(&self.pool)
            .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }
}

/// Claims `key` on `conn`: in autocommit for [`DedupStore::claim`], inside
/// the caller's transaction for [`TransactionalStore::claim_in`].
///
/// With `lease` it claims for that lease; without, it marks the key done
/// right away (only sensible inside a transaction: the mark is visible if
/// and only if the transaction commits).
async fn claim_on(
    conn: &mut PgConnection,
    key: &str,
    lease: Option<Duration>,
) -> Result<Claim, StoreError> {
    for _ in 0..CLAIM_ATTEMPTS {
        let token = LeaseToken::generate();
        let claimed: Option<i32> = match lease {
            Some(lease) => {
                sqlx::query_scalar(CLAIM)
                    .bind(key)
                    .bind(token.as_str())
                    .bind(millis(lease) as f64)
                    .fetch_optional(&mut *conn)
                    .await?
            }
            None => {
                sqlx::query_scalar(MARK)
                    .bind(key)
                    .bind(token.as_str())
                    .fetch_optional(&mut *conn)
                    .await?
            }
        };
        if let Some(claims) = claimed {
            return Ok(Claim::Acquired(Lease::new(token, claims > 1)));
        }
        let row = sqlx::query(LOOK)
            .bind(key)
            .fetch_optional(&mut *conn)
            .await?;
        let Some(row) = row else {
            // Released or purged in between: claim again.
            continue;
        };
        let status: String = row.try_get("status")?;
        if status == "done" {
            let reply: Option<Vec<u8>> = row.try_get("reply")?;
            return Ok(Claim::Done {
                reply: reply.map(Bytes::from),
            });
        }
        let remaining: Option<i64> = row.try_get("remaining_ms")?;
        match remaining {
            Some(ms) if ms > 0 => {
                return Ok(Claim::Busy {
                    retry_after: from_millis(ms),
                });
            }
            // Expired in between: claim again.
            _ => continue,
        }
    }
    Ok(Claim::Busy {
        retry_after: Duration::from_millis(10),
    })
}

async fn complete_on(
    conn: &mut PgConnection,
    key: &str,
    token: &LeaseToken,
    reply: Option<&[u8]>,
) -> Result<(), StoreError> {
    let done = sqlx::query(COMPLETE)
        .bind(key)
        .bind(token.as_str())
        .bind(reply)
        .execute(&mut *conn)
        .await?;
    if done.rows_affected() == 1 {
        Ok(())
    } else {
        Err(StoreError::LeaseLost {
            key: key.to_owned(),
        })
    }
}

impl TransactionalStore for PostgresStore {
    type Database = Postgres;

    async fn begin(&self) -> Result<sqlx::Transaction<'static, Postgres>, StoreError> {
        Ok(self.pool.begin().await?)
    }

    async fn claim_in(&self, conn: &mut PgConnection, key: &str) -> Result<Claim, StoreError> {
        claim_on(conn, key, None).await
    }

    async fn complete_in(
        &self,
        conn: &mut PgConnection,
        key: &str,
        token: &LeaseToken,
        reply: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        complete_on(conn, key, token, reply).await
    }

    async fn mark_processed(
        &self,
        conn: &mut PgConnection,
        key: &str,
    ) -> Result<Marked, StoreError> {
        Ok(Marked::from(claim_on(conn, key, None).await?))
    }
}
