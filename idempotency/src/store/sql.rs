//! The logic shared by the SQL stores: claims with retries, completion,
//! release, lease extension, retention and the inbox operations, written
//! once over [`Dialect`].
//!
//! Each backend implements [`Dialect`] on its sqlx database type: the SQL
//! text and how its time parameters are bound and read (PostgreSQL passes
//! durations and uses the database clock; SQLite passes Unix milliseconds
//! from this process's clock). [`sql_store!`] then implements
//! [`DedupStore`](super::DedupStore) and
//! [`TransactionalStore`](crate::inbox::TransactionalStore) for a store
//! struct holding the pool in a field `pool`, on top of [`Sql`].

use std::marker::PhantomData;
use std::time::Duration;

use bytes::Bytes;
use sqlx::query::Query;
use sqlx::{
    ColumnIndex, Database, Decode, Encode, Executor, IntoArguments, Pool, Row, Transaction, Type,
};

use super::{Claim, Lease, LeaseToken, from_millis};
use crate::error::StoreError;

/// A query on `DB` with its bound arguments.
pub(super) type SqlQuery<'q, DB> = Query<'q, DB, <DB as Database>::Arguments>;

/// What differs between the SQL backends: the statements on the
/// `surety_idempotency` table and their time parameters.
///
/// Every statement takes the key as its first parameter; those that name a
/// claim take its token second ([`COMPLETE`](Self::COMPLETE) then the
/// reply). The `bind_*` functions bind the parameters after those.
pub(super) trait Dialect: Database {
    /// Inserts a new key as claimed, or takes over an expired lease, and
    /// returns `claims`; returns no row when the key is done or its lease
    /// runs. Parameters: key, token, then [`bind_claim`](Self::bind_claim).
    const CLAIM: &'static str;
    /// [`CLAIM`](Self::CLAIM), but marks the key done at once (no lease).
    /// Parameters: key, token, then [`bind_mark`](Self::bind_mark).
    const MARK: &'static str;
    /// Reads a key's `status` and `reply`, and what
    /// [`remaining_ms`](Self::remaining_ms) needs. Parameter: key.
    const LOOK: &'static str;
    /// Extends a held lease. Parameters: key, token, then
    /// [`bind_extend`](Self::bind_extend).
    const EXTEND: &'static str;
    /// Marks a held key done with its reply. Parameters: key, token, reply,
    /// then [`bind_complete`](Self::bind_complete).
    const COMPLETE: &'static str;
    /// Deletes a held claim. Parameters: key, token.
    const RELEASE: &'static str;
    /// Deletes keys completed before the cutoff, oldest first. Parameters:
    /// [`Cutoff`](Self::Cutoff), limit.
    const PURGE_DONE: &'static str;
    /// Deletes claims whose lease expired before the cutoff, oldest first.
    /// Parameters: [`Cutoff`](Self::Cutoff), limit.
    const PURGE_ABANDONED: &'static str;
    /// The statement that begins an inbox transaction; `None`: the
    /// backend's default.
    const BEGIN: Option<&'static str>;

    /// The type of the `claims` column.
    type Claims: Into<i64> + for<'r> Decode<'r, Self> + Type<Self>;
    /// The retention parameter of the purge statements.
    type Cutoff: Copy + for<'q> Encode<'q, Self> + Type<Self>;

    /// Binds [`CLAIM`](Self::CLAIM)'s parameters for a lease of `lease`.
    fn bind_claim(query: SqlQuery<'_, Self>, lease: Duration) -> SqlQuery<'_, Self>;
    /// Binds [`MARK`](Self::MARK)'s parameters.
    fn bind_mark(query: SqlQuery<'_, Self>) -> SqlQuery<'_, Self>;
    /// Binds [`EXTEND`](Self::EXTEND)'s parameters for a lease of `lease`
    /// from now.
    fn bind_extend(query: SqlQuery<'_, Self>, lease: Duration) -> SqlQuery<'_, Self>;
    /// Binds [`COMPLETE`](Self::COMPLETE)'s parameters.
    fn bind_complete(query: SqlQuery<'_, Self>) -> SqlQuery<'_, Self>;
    /// The purge statements' parameter for keys older than `older_than`,
    /// taken once for both.
    fn cutoff(older_than: Duration) -> Self::Cutoff;
    /// How long the lease on a row of [`LOOK`](Self::LOOK) still runs, in
    /// milliseconds (zero or less, or `None`: it expired).
    fn remaining_ms(row: &Self::Row) -> Result<Option<i64>, sqlx::Error>;
    /// How many rows a statement changed.
    fn rows_affected(done: &Self::QueryResult) -> u64;
}

const SIZE: &str = "SELECT count(*) FROM surety_idempotency";

/// How many times a claim re-reads a key that changed between its two
/// statements before it answers busy.
const CLAIM_ATTEMPTS: usize = 3;

/// The store operations on dialect `D`.
pub(super) struct Sql<D>(PhantomData<D>);

impl<D: Dialect> Sql<D>
where
    for<'c> &'c mut D::Connection: Executor<'c, Database = D>,
    D::Arguments: IntoArguments<D>,
    for<'q> &'q str: Encode<'q, D> + Type<D>,
    for<'q> Option<&'q [u8]>: Encode<'q, D> + Type<D>,
    i64: for<'q> Encode<'q, D> + for<'r> Decode<'r, D> + Type<D>,
    String: for<'r> Decode<'r, D> + Type<D>,
    Vec<u8>: for<'r> Decode<'r, D> + Type<D>,
    &'static str: ColumnIndex<D::Row>,
    usize: ColumnIndex<D::Row>,
{
    /// [`DedupStore::claim`](super::DedupStore::claim).
    pub(super) async fn claim(
        pool: &Pool<D>,
        key: &str,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        let mut conn = pool.acquire().await?;
        Self::claim_on(&mut conn, key, Some(lease)).await
    }

    /// Claims `key` on `conn`: in autocommit for
    /// [`DedupStore::claim`](super::DedupStore::claim), inside the caller's
    /// transaction for
    /// [`TransactionalStore::claim_in`](crate::inbox::TransactionalStore::claim_in).
    ///
    /// With `lease` it claims for that lease; without, it marks the key done
    /// right away (only sensible inside a transaction: the mark is visible if
    /// and only if the transaction commits).
    pub(super) async fn claim_on(
        conn: &mut D::Connection,
        key: &str,
        lease: Option<Duration>,
    ) -> Result<Claim, StoreError> {
        for _ in 0..CLAIM_ATTEMPTS {
            let token = LeaseToken::generate();
            let query = match lease {
                Some(lease) => {
                    D::bind_claim(sqlx::query(D::CLAIM).bind(key).bind(token.as_str()), lease)
                }
                None => D::bind_mark(sqlx::query(D::MARK).bind(key).bind(token.as_str())),
            };
            if let Some(row) = query.fetch_optional(&mut *conn).await? {
                let claims: i64 = row.try_get::<D::Claims, _>(0)?.into();
                return Ok(Claim::Acquired(Lease::new(token, claims > 1)));
            }
            let Some(row) = sqlx::query(D::LOOK)
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
            match D::remaining_ms(&row)? {
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

    /// [`DedupStore::extend`](super::DedupStore::extend).
    pub(super) async fn extend(
        pool: &Pool<D>,
        key: &str,
        token: &LeaseToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let query = sqlx::query(D::EXTEND).bind(key).bind(token.as_str());
        let done = D::bind_extend(query, lease).execute(pool).await?;
        held(D::rows_affected(&done), key)
    }

    /// [`DedupStore::complete`](super::DedupStore::complete).
    pub(super) async fn complete(
        pool: &Pool<D>,
        key: &str,
        token: &LeaseToken,
        reply: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        let mut conn = pool.acquire().await?;
        Self::complete_on(&mut conn, key, token, reply).await
    }

    /// Completes `key` on `conn`: in autocommit for
    /// [`DedupStore::complete`](super::DedupStore::complete), inside the
    /// caller's transaction for
    /// [`TransactionalStore::complete_in`](crate::inbox::TransactionalStore::complete_in).
    pub(super) async fn complete_on(
        conn: &mut D::Connection,
        key: &str,
        token: &LeaseToken,
        reply: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        let query = sqlx::query(D::COMPLETE)
            .bind(key)
            .bind(token.as_str())
            .bind(reply);
        let done = D::bind_complete(query).execute(&mut *conn).await?;
        held(D::rows_affected(&done), key)
    }

    /// [`DedupStore::release`](super::DedupStore::release).
    pub(super) async fn release(
        pool: &Pool<D>,
        key: &str,
        token: &LeaseToken,
    ) -> Result<(), StoreError> {
        sqlx::query(D::RELEASE)
            .bind(key)
            .bind(token.as_str())
            .execute(pool)
            .await?;
        Ok(())
    }

    /// [`DedupStore::purge`](super::DedupStore::purge): completed keys
    /// first, then abandoned claims, up to `limit` in all.
    pub(super) async fn purge(
        pool: &Pool<D>,
        older_than: Duration,
        limit: u32,
    ) -> Result<u64, StoreError> {
        let cutoff = D::cutoff(older_than);
        let done = sqlx::query(D::PURGE_DONE)
            .bind(cutoff)
            .bind(i64::from(limit))
            .execute(pool)
            .await?;
        let done = D::rows_affected(&done);
        let room = u64::from(limit).saturating_sub(done);
        if room == 0 {
            return Ok(done);
        }
        let abandoned = sqlx::query(D::PURGE_ABANDONED)
            .bind(cutoff)
            .bind(i64::try_from(room).unwrap_or(i64::MAX))
            .execute(pool)
            .await?;
        Ok(done + D::rows_affected(&abandoned))
    }

    /// [`DedupStore::size`](super::DedupStore::size).
    pub(super) async fn size(pool: &Pool<D>) -> Result<u64, StoreError> {
        let row = sqlx::query(SIZE).fetch_one(pool).await?;
        let n: i64 = row.try_get(0)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// [`TransactionalStore::begin`](crate::inbox::TransactionalStore::begin),
    /// with [`Dialect::BEGIN`].
    pub(super) async fn begin(pool: &Pool<D>) -> Result<Transaction<'static, D>, StoreError> {
        Ok(match D::BEGIN {
            Some(statement) => pool.begin_with(statement).await?,
            None => pool.begin().await?,
        })
    }
}

/// `Ok` when a fenced statement changed the key's row, else the lease on
/// `key` was lost.
fn held(rows_affected: u64, key: &str) -> Result<(), StoreError> {
    if rows_affected == 1 {
        Ok(())
    } else {
        Err(StoreError::LeaseLost {
            key: key.to_owned(),
        })
    }
}

/// `sql_store!(DedupStore, TransactionalStore for $store on $db, $conn)`
/// implements [`DedupStore`](super::DedupStore) and
/// [`TransactionalStore`](crate::inbox::TransactionalStore) (named as the
/// caller imported them) for `$store { pool: Pool<$db> }` on
/// [`Sql<$db>`](Sql), where `$conn` is `$db`'s connection type.
macro_rules! sql_store {
    ($dedup:ident, $transactional:ident for $store:ident on $db:ty, $conn:ty) => {
        impl $dedup for $store {
            async fn claim(
                &self,
                key: &str,
                lease: ::std::time::Duration,
            ) -> Result<$crate::store::Claim, $crate::error::StoreError> {
                $crate::store::sql::Sql::<$db>::claim(&self.pool, key, lease).await
            }

            async fn extend(
                &self,
                key: &str,
                token: &$crate::store::LeaseToken,
                lease: ::std::time::Duration,
            ) -> Result<(), $crate::error::StoreError> {
                $crate::store::sql::Sql::<$db>::extend(&self.pool, key, token, lease).await
            }

            async fn complete(
                &self,
                key: &str,
                token: &$crate::store::LeaseToken,
                reply: Option<&[u8]>,
            ) -> Result<(), $crate::error::StoreError> {
                $crate::store::sql::Sql::<$db>::complete(&self.pool, key, token, reply).await
            }

            async fn release(
                &self,
                key: &str,
                token: &$crate::store::LeaseToken,
            ) -> Result<(), $crate::error::StoreError> {
                $crate::store::sql::Sql::<$db>::release(&self.pool, key, token).await
            }

            async fn purge(
                &self,
                older_than: ::std::time::Duration,
                limit: u32,
            ) -> Result<u64, $crate::error::StoreError> {
                $crate::store::sql::Sql::<$db>::purge(&self.pool, older_than, limit).await
            }

            async fn size(&self) -> Result<u64, $crate::error::StoreError> {
                $crate::store::sql::Sql::<$db>::size(&self.pool).await
            }
        }

        impl $transactional for $store {
            type Database = $db;

            async fn begin(
                &self,
            ) -> Result<::sqlx::Transaction<'static, $db>, $crate::error::StoreError> {
                $crate::store::sql::Sql::<$db>::begin(&self.pool).await
            }

            async fn claim_in(
                &self,
                conn: &mut $conn,
                key: &str,
            ) -> Result<$crate::store::Claim, $crate::error::StoreError> {
                $crate::store::sql::Sql::<$db>::claim_on(conn, key, None).await
            }

            async fn complete_in(
                &self,
                conn: &mut $conn,
                key: &str,
                token: &$crate::store::LeaseToken,
                reply: Option<&[u8]>,
            ) -> Result<(), $crate::error::StoreError> {
                $crate::store::sql::Sql::<$db>::complete_on(conn, key, token, reply).await
            }

            async fn mark_processed(
                &self,
                conn: &mut $conn,
                key: &str,
            ) -> Result<$crate::inbox::Marked, $crate::error::StoreError> {
                Ok($crate::inbox::Marked::from(
                    $crate::store::sql::Sql::<$db>::claim_on(conn, key, None).await?,
                ))
            }
        }
    };
}

pub(super) use sql_store;
