//! The logic shared by the SQL stores: claims with retries, completion,
//! release, lease extension, retention and the inbox operations, written
//! once in [`sql_store!`] and instantiated per backend, as every Surety SQL
//! store is (ADR 0019).
//!
//! Each backend has a `dialect` module: the SQL text of each statement and
//! how its time parameters are bound and read (PostgreSQL passes durations
//! and uses the database clock; SQLite passes Unix milliseconds from this
//! process's clock). [`sql_store!`] implements
//! [`DedupStore`](super::DedupStore) and
//! [`TransactionalStore`](crate::inbox::TransactionalStore) for a store
//! struct holding the pool in a field `pool`, on that module.
//!
//! A backend's `dialect` module provides, for statements that take the key
//! first and (those that name a claim) its token second:
//!
//! - `CLAIM`: inserts a new key as claimed, or takes over an expired lease,
//!   and returns `claims`; no row when the key is done or its lease runs.
//!   Parameters: key, token, then `bind_claim(query, lease)`'s.
//! - `MARK`: `CLAIM`, but marks the key done at once (no lease); then
//!   `bind_mark`'s.
//! - `LOOK`: a key's `status` and `reply`, and what `remaining_ms(row)`
//!   (the lease's remaining milliseconds; zero or less, or `None`: expired)
//!   reads. Parameter: key.
//! - `EXTEND`: extends a held lease; then `bind_extend(query, lease)`'s.
//! - `COMPLETE`: marks a held key done with its reply (third parameter);
//!   then `bind_complete`'s.
//! - `RELEASE`: deletes a held claim.
//! - `PURGE_DONE`, `PURGE_ABANDONED`: delete keys completed, or claims
//!   whose lease expired, before the cutoff (`cutoff(older_than)`), oldest
//!   first; parameters: cutoff, limit.
//! - `BEGIN`: the statement that begins an inbox transaction (`None`: the
//!   backend's default); `Claims`: the type of the `claims` column.

use sqlx::Database;
use sqlx::query::Query;

use crate::error::StoreError;

/// A query on `DB` with its bound arguments.
pub(super) type SqlQuery<'q, DB> = Query<'q, DB, <DB as Database>::Arguments>;

/// Counts the keys held.
pub(super) const SIZE: &str = "SELECT count(*) FROM surety_idempotency";

/// How many times a claim re-reads a key that changed between its two
/// statements before it answers busy.
pub(super) const CLAIM_ATTEMPTS: usize = 3;

/// `Ok` when a fenced statement changed the key's row, else the lease on
/// `key` was lost.
pub(super) fn held(rows_affected: u64, key: &str) -> Result<(), StoreError> {
    if rows_affected == 1 {
        Ok(())
    } else {
        Err(StoreError::LeaseLost {
            key: key.to_owned(),
        })
    }
}

/// `sql_store!(DedupStore, TransactionalStore for $store on $db, $conn, $dialect)`
/// implements [`DedupStore`](super::DedupStore) and
/// [`TransactionalStore`](crate::inbox::TransactionalStore) (named as the
/// caller imported them) for `$store { pool: Pool<$db> }`, where `$conn` is
/// `$db`'s connection type and `$dialect` the backend's dialect module (see
/// the module docs).
macro_rules! sql_store {
    ($dedup:ident, $transactional:ident for $store:ident on $db:ty, $conn:ty, $dialect:ident) => {
        impl $store {
            /// Claims `key` on `conn`: in autocommit for `claim`, inside the
            /// caller's transaction for `claim_in`.
            ///
            /// With `lease` it claims for that lease; without, it marks the
            /// key done right away (only sensible inside a transaction: the
            /// mark is visible if and only if the transaction commits).
            async fn claim_on(
                conn: &mut $conn,
                key: &str,
                lease: Option<::std::time::Duration>,
            ) -> Result<$crate::store::Claim, $crate::error::StoreError> {
                use ::sqlx::Row as _;
                use $crate::store::{Claim, Lease, LeaseToken};
                for _ in 0..$crate::store::sql::CLAIM_ATTEMPTS {
                    let token = LeaseToken::generate();
                    let query = match lease {
                        Some(lease) => $dialect::bind_claim(
                            ::sqlx::query($dialect::CLAIM)
                                .bind(key)
                                .bind(token.as_str()),
                            lease,
                        ),
                        None => $dialect::bind_mark(
                            ::sqlx::query($dialect::MARK).bind(key).bind(token.as_str()),
                        ),
                    };
                    if let Some(row) = query.fetch_optional(&mut *conn).await? {
                        let claims: i64 = row.try_get::<$dialect::Claims, _>(0)?.into();
                        return Ok(Claim::Acquired(Lease::new(token, claims > 1)));
                    }
                    let Some(row) = ::sqlx::query($dialect::LOOK)
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
                            reply: reply.map(::bytes::Bytes::from),
                        });
                    }
                    match $dialect::remaining_ms(&row)? {
                        Some(ms) if ms > 0 => {
                            return Ok(Claim::Busy {
                                retry_after: $crate::store::from_millis(ms),
                            });
                        }
                        // Expired in between: claim again.
                        _ => continue,
                    }
                }
                Ok(Claim::Busy {
                    retry_after: ::std::time::Duration::from_millis(10),
                })
            }

            /// Completes `key` on `conn`: in autocommit for `complete`,
            /// inside the caller's transaction for `complete_in`.
            async fn complete_on(
                conn: &mut $conn,
                key: &str,
                token: &$crate::store::LeaseToken,
                reply: Option<&[u8]>,
            ) -> Result<(), $crate::error::StoreError> {
                let query = ::sqlx::query($dialect::COMPLETE)
                    .bind(key)
                    .bind(token.as_str())
                    .bind(reply);
                let done = $dialect::bind_complete(query).execute(&mut *conn).await?;
                $crate::store::sql::held(done.rows_affected(), key)
            }
        }

        impl $dedup for $store {
            async fn claim(
                &self,
                key: &str,
                lease: ::std::time::Duration,
            ) -> Result<$crate::store::Claim, $crate::error::StoreError> {
                let mut conn = self.pool.acquire().await?;
                Self::claim_on(&mut conn, key, Some(lease)).await
            }

            async fn extend(
                &self,
                key: &str,
                token: &$crate::store::LeaseToken,
                lease: ::std::time::Duration,
            ) -> Result<(), $crate::error::StoreError> {
                let query = ::sqlx::query($dialect::EXTEND)
                    .bind(key)
                    .bind(token.as_str());
                let done = $dialect::bind_extend(query, lease)
                    .execute(&self.pool)
                    .await?;
                $crate::store::sql::held(done.rows_affected(), key)
            }

            async fn complete(
                &self,
                key: &str,
                token: &$crate::store::LeaseToken,
                reply: Option<&[u8]>,
            ) -> Result<(), $crate::error::StoreError> {
                let mut conn = self.pool.acquire().await?;
                Self::complete_on(&mut conn, key, token, reply).await
            }

            async fn release(
                &self,
                key: &str,
                token: &$crate::store::LeaseToken,
            ) -> Result<(), $crate::error::StoreError> {
                ::sqlx::query($dialect::RELEASE)
                    .bind(key)
                    .bind(token.as_str())
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            /// Completed keys first, then abandoned claims, up to `limit`
            /// in all.
            async fn purge(
                &self,
                older_than: ::std::time::Duration,
                limit: u32,
            ) -> Result<u64, $crate::error::StoreError> {
                let cutoff = $dialect::cutoff(older_than);
                let done = ::sqlx::query($dialect::PURGE_DONE)
                    .bind(cutoff)
                    .bind(i64::from(limit))
                    .execute(&self.pool)
                    .await?
                    .rows_affected();
                let room = u64::from(limit).saturating_sub(done);
                if room == 0 {
                    return Ok(done);
                }
                let abandoned = ::sqlx::query($dialect::PURGE_ABANDONED)
                    .bind(cutoff)
                    .bind(i64::try_from(room).unwrap_or(i64::MAX))
                    .execute(&self.pool)
                    .await?
                    .rows_affected();
                Ok(done + abandoned)
            }

            async fn size(&self) -> Result<u64, $crate::error::StoreError> {
                use ::sqlx::Row as _;
                let row = ::sqlx::query($crate::store::sql::SIZE)
                    .fetch_one(&self.pool)
                    .await?;
                let n: i64 = row.try_get(0)?;
                Ok(u64::try_from(n).unwrap_or(0))
            }
        }

        impl $transactional for $store {
            type Database = $db;

            async fn begin(
                &self,
            ) -> Result<::sqlx::Transaction<'static, $db>, $crate::error::StoreError> {
                Ok(match $dialect::BEGIN {
                    Some(statement) => self.pool.begin_with(statement).await?,
                    None => self.pool.begin().await?,
                })
            }

            async fn claim_in(
                &self,
                conn: &mut $conn,
                key: &str,
            ) -> Result<$crate::store::Claim, $crate::error::StoreError> {
                Self::claim_on(conn, key, None).await
            }

            async fn complete_in(
                &self,
                conn: &mut $conn,
                key: &str,
                token: &$crate::store::LeaseToken,
                reply: Option<&[u8]>,
            ) -> Result<(), $crate::error::StoreError> {
                Self::complete_on(conn, key, token, reply).await
            }

            async fn mark_processed(
                &self,
                conn: &mut $conn,
                key: &str,
            ) -> Result<$crate::inbox::Marked, $crate::error::StoreError> {
                Ok($crate::inbox::Marked::from(
                    Self::claim_on(conn, key, None).await?,
                ))
            }
        }
    };
}

pub(super) use sql_store;
