//! [`SqliteStore`]: the embedded dedup store, and the transactional inbox
//! on SQLite.
//!
//! One table, `surety_idempotency`, created by [`migrate`]. Claims are one
//! `INSERT ... ON CONFLICT DO UPDATE ... WHERE` statement, atomic under
//! SQLite's single writer. Times are Unix milliseconds from this process's
//! clock (SQLite is embedded: the processes sharing a database file share
//! the machine's clock).
//!
//! Open the pool in WAL mode with a busy timeout, so that readers do not
//! wait for the writer and concurrent writers queue instead of failing:
//!
//! ```
//! use std::str::FromStr;
//! use std::time::Duration;
//! use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = std::env::temp_dir().join(format!("surety-doc-{}", uuid::Uuid::now_v7()));
//! # std::fs::create_dir_all(&dir)?;
//! # let path = dir.join("app.db");
//! let options = SqliteConnectOptions::new()
//!     .filename(&path)
//!     .create_if_missing(true)
//!     .journal_mode(SqliteJournalMode::Wal)
//!     .busy_timeout(Duration::from_secs(5));
//! let pool = SqlitePoolOptions::new().max_connections(4).connect_with(options).await?;
//! surety_idempotency::sqlite::migrate(&pool).await?;
//! let store = surety_idempotency::SqliteStore::new(pool);
//! # drop(store); std::fs::remove_dir_all(&dir)?;
//! # Ok(()) }
//! ```

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use sqlx::sqlite::{SqliteConnection, SqlitePool};
use sqlx::{Row, Sqlite};

use super::{Claim, DedupStore, Lease, LeaseToken, from_millis, millis};
use crate::error::StoreError;
use crate::inbox::{Marked, TransactionalStore};

/// The migrations, embedded from `migrations/sqlite/` (version, description,
/// SQL), in the format of `sqlx migrate`.
const MIGRATIONS: &[(i64, &str, &str)] = &[(
    20250601000000,
    "create surety idempotency",
    include_str!("../../migrations/sqlite/20250601000000_create_surety_idempotency.sql"),
)];

pub use super::MIGRATIONS_TABLE;

/// Creates or upgrades the `surety_idempotency` table.
///
/// Safe to call on every start-up: migrations run once.
pub async fn migrate(pool: &SqlitePool) -> Result<(), StoreError> {
    super::migrator(MIGRATIONS).run(pool).await?;
    Ok(())
}

/// A dedup store in SQLite. Cheap to clone (it holds the pool).
///
/// Besides [`DedupStore`], it implements [`TransactionalStore`]: a claim can
/// be completed inside the transaction of your business write (the inbox
/// pattern), see [`inbox`](crate::inbox). Inbox transactions start with
/// `BEGIN IMMEDIATE`, taking SQLite's write lock up front, so two of them
/// queue rather than fail when the second tries to write.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// A store on `pool`. Run [`migrate`] first.
    pub fn new(pool: SqlitePool) -> Self {
        Self { pool }
    }

    /// The pool.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

/// Now, in Unix milliseconds.
fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, millis)
}

const CLAIM: &str = "\
INSERT INTO surety_idempotency (key, status, token, lease_until, claims, created_at)
VALUES (?1, 'in_progress', ?2, ?3 + ?4, 1, ?3)
ON CONFLICT (key) DO UPDATE
    SET token = excluded.token, lease_until = excluded.lease_until,
        claims = surety_idempotency.claims + 1
    WHERE surety_idempotency.status = 'in_progress' AND surety_idempotency.lease_until <= ?3
RETURNING claims";

const LOOK: &str = "SELECT status, reply, lease_until FROM surety_idempotency WHERE key = ?1";

const EXTEND: &str = "\
UPDATE surety_idempotency SET lease_until = ?3
WHERE key = ?1 AND token = ?2 AND status = 'in_progress'";

const COMPLETE: &str = "\
UPDATE surety_idempotency
SET status = 'done', reply = ?3, lease_until = NULL, completed_at = ?4
WHERE key = ?1 AND token = ?2";

const RELEASE: &str =
    "DELETE FROM surety_idempotency WHERE key = ?1 AND token = ?2 AND status = 'in_progress'";

const MARK: &str = "\
INSERT INTO surety_idempotency (key, status, token, lease_until, claims, created_at, completed_at)
VALUES (?1, 'done', ?2, NULL, 1, ?3, ?3)
ON CONFLICT (key) DO UPDATE
    SET status = 'done', token = excluded.token, lease_until = NULL,
        claims = surety_idempotency.claims + 1, reply = NULL, completed_at = excluded.completed_at
    WHERE surety_idempotency.status = 'in_progress' AND surety_idempotency.lease_until <= ?3
RETURNING claims";

const PURGE_DONE: &str = "\
DELETE FROM surety_idempotency WHERE key IN (
    SELECT key FROM surety_idempotency
    WHERE status = 'done' AND completed_at < ?1
    ORDER BY completed_at LIMIT ?2)";

const PURGE_ABANDONED: &str = "\
DELETE FROM surety_idempotency WHERE key IN (
    SELECT key FROM surety_idempotency
    WHERE status = 'in_progress' AND lease_until < ?1
    ORDER BY lease_until LIMIT ?2)";

/// How many times a claim re-reads a key that changed between its two
/// statements before it answers busy.
const CLAIM_ATTEMPTS: usize = 3;

impl DedupStore for SqliteStore {
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
            .bind(now_ms().saturating_add(millis(lease)))
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
        let cutoff = now_ms().saturating_sub(millis(older_than));
        let done = sqlx::query(PURGE_DONE)
            .bind(cutoff)
            .bind(i64::from(limit))
            .execute(&self.pool)
            .await?
            .rows_affected();
        let room = u64::from(limit).saturating_sub(done);
        if room == 0 {
            return Ok(done);
        }
        let abandoned = sqlx::query(PURGE_ABANDONED)
            .bind(cutoff)
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
    conn: &mut SqliteConnection,
    key: &str,
    lease: Option<Duration>,
) -> Result<Claim, StoreError> {
    for _ in 0..CLAIM_ATTEMPTS {
        let token = LeaseToken::generate();
        let now = now_ms();
        let claimed: Option<i64> = match lease {
            Some(lease) => {
                sqlx::query_scalar(CLAIM)
                    .bind(key)
                    .bind(token.as_str())
                    .bind(now)
                    .bind(millis(lease))
                    .fetch_optional(&mut *conn)
                    .await?
            }
            None => {
                sqlx::query_scalar(MARK)
                    .bind(key)
                    .bind(token.as_str())
                    .bind(now)
                    .fetch_optional(&mut *conn)
                    .await?
            }
        };
        if let Some(claims) = claimed {
            return Ok(Claim::Acquired(Lease::new(token, claims > 1)));
        }
        let Some(row) = sqlx::query(LOOK)
            .bind(key)
            .fetch_optional(&mut *conn)
            .await?
        else {
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
        let lease_until: Option<i64> = row.try_get("lease_until")?;
        match lease_until.map(|until| until.saturating_sub(now_ms())) {
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
    conn: &mut SqliteConnection,
    key: &str,
    token: &LeaseToken,
    reply: Option<&[u8]>,
) -> Result<(), StoreError> {
    let done = sqlx::query(COMPLETE)
        .bind(key)
        .bind(token.as_str())
        .bind(reply)
        .bind(now_ms())
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

impl TransactionalStore for SqliteStore {
    type Database = Sqlite;

    async fn begin(&self) -> Result<sqlx::Transaction<'static, Sqlite>, StoreError> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }

    async fn claim_in(&self, conn: &mut SqliteConnection, key: &str) -> Result<Claim, StoreError> {
        claim_on(conn, key, None).await
    }

    async fn complete_in(
        &self,
        conn: &mut SqliteConnection,
        key: &str,
        token: &LeaseToken,
        reply: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        complete_on(conn, key, token, reply).await
    }

    async fn mark_processed(
        &self,
        conn: &mut SqliteConnection,
        key: &str,
    ) -> Result<Marked, StoreError> {
        Ok(Marked::from(claim_on(conn, key, None).await?))
    }
}
