//! The transactional inbox: "mark processed" in the same SQL transaction
//! as the business write, so the effect and the mark commit or roll back
//! together.
//!
//! Two ways to use it:
//!
//! - [`IdempotencyLayer::inbox`](crate::IdempotencyLayer::inbox) builds a
//!   handler that opens a transaction, claims the key inside it and marks
//!   it done there ([`TransactionalStore::claim_in`]), and hands the
//!   transaction to your function as an [`InboxTx`]. You write through it
//!   and finish with [`InboxTx::commit`] (storing a reply, if any). The key
//!   is done exactly when your write commits. If the transaction rolls back (an error, a crash, a
//!   dropped connection), neither the claim nor the mark nor the write
//!   survives, and the redelivery runs again at once. A concurrent
//!   duplicate waits for the transaction: it becomes a duplicate if the
//!   transaction commits and runs if it rolls back.
//! - [`TransactionalStore::mark_processed`] inserts the processed row in a
//!   transaction you manage yourself: a duplicate finds the row, and you
//!   roll back.
//!
//! A lease taken with [`DedupStore::claim`] can be completed inside a
//! transaction too: [`TransactionalStore::complete_in`] is fenced and fails
//! with [`StoreError::LeaseLost`] when another holder took the key over, so
//! the stale holder's transaction, business write included, rolls back.
//!
//! A holder that hangs with its transaction open blocks duplicates of its
//! key until the database ends the transaction: bound it with the
//! database's own timeouts (PostgreSQL: `idle_in_transaction_session_timeout`,
//! `statement_timeout`; SQLite: the pool's busy timeout).

mod handler;
mod layer;

use std::fmt;
use std::future::Future;
use std::ops::{Deref, DerefMut};

use sqlx::{Database, Transaction};

pub use handler::InboxHandler;
pub use layer::{Inbox, InboxGuard, InboxLayer, InboxTransaction};

use crate::error::StoreError;
use crate::metrics::{IdempotencyMetrics, Op, SeriesHandle};
use crate::reply;
use crate::store::{Claim, DedupStore, LeaseToken};
use surety_core::consumer::Output;

/// What [`TransactionalStore::mark_processed`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "a duplicate must roll back its transaction"]
pub enum Marked {
    /// First time: the key is marked processed in the transaction. Commit.
    First,
    /// Already processed: roll back, the message was handled before.
    Duplicate,
    /// Another delivery holds a live claim on the key: roll back and retry
    /// later.
    Busy,
}

impl From<Claim> for Marked {
    fn from(claim: Claim) -> Self {
        match claim {
            Claim::Acquired(_) => Self::First,
            Claim::Done { .. } => Self::Duplicate,
            Claim::Busy { .. } => Self::Busy,
        }
    }
}

/// A [`DedupStore`] in a SQL database, whose claims can be completed inside
/// a caller's transaction. Implemented by the SQLite and PostgreSQL stores.
///
/// ```
/// use surety_idempotency::{Marked, SqliteDedupStore, TransactionalStore};
/// # use sqlx::sqlite::SqlitePoolOptions;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let pool = SqlitePoolOptions::new().max_connections(1).connect("sqlite::memory:").await?;
/// # surety_idempotency::sqlite::migrate(&pool).await?;
/// # sqlx::query("CREATE TABLE shipments (order_id TEXT)").execute(&pool).await?;
/// let store = SqliteDedupStore::new(pool);
/// for _delivery in 0..2 {
///     let mut tx = store.begin().await?;
///     sqlx::query("INSERT INTO shipments (order_id) VALUES ('o-1')").execute(&mut *tx).await?;
///     match store.mark_processed(&mut tx, "/orders o-1").await? {
///         Marked::First => tx.commit().await?,
///         Marked::Duplicate | Marked::Busy => tx.rollback().await?,
///     }
/// }
/// let shipped: i64 = sqlx::query_scalar("SELECT count(*) FROM shipments").fetch_one(store.pool()).await?;
/// assert_eq!(shipped, 1);
/// # Ok(()) }
/// ```
pub trait TransactionalStore: DedupStore + Clone {
    /// The database.
    type Database: Database;

    /// Begins a transaction on the store's pool, as the inbox handler wants
    /// it (SQLite: `BEGIN IMMEDIATE`).
    fn begin(
        &self,
    ) -> impl Future<Output = Result<Transaction<'static, Self::Database>, StoreError>> + Send;

    /// Claims `key` inside the transaction on `conn` and marks it done
    /// there: the key is done if, and only if, the transaction commits.
    ///
    /// Until the transaction ends, a concurrent claim of the key waits for
    /// it (PostgreSQL: the row lock; SQLite: the write lock) and then finds
    /// the key done, or absent if the transaction rolled back. A rollback,
    /// or a connection that dies, takes the mark with it: there is no lease
    /// to wait out. A claim made outside any transaction (by
    /// [`claim`](DedupStore::claim)) whose lease still runs makes this one
    /// [`Busy`](Claim::Busy); one whose lease expired is taken over.
    fn claim_in(
        &self,
        conn: &mut <Self::Database as Database>::Connection,
        key: &str,
    ) -> impl Future<Output = Result<Claim, StoreError>> + Send;

    /// [`complete`](DedupStore::complete), inside the transaction on `conn`:
    /// the key becomes done, with `reply`, when, and only if, that
    /// transaction commits. Fails with [`StoreError::LeaseLost`] when
    /// `token` no longer holds the claim; the caller must then roll back.
    fn complete_in(
        &self,
        conn: &mut <Self::Database as Database>::Connection,
        key: &str,
        token: &LeaseToken,
        reply: Option<&[u8]>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// [`claim_in`](Self::claim_in) for transactions you manage yourself:
    /// [`Marked::First`] when the key was not processed (it is now marked,
    /// in this transaction), [`Marked::Duplicate`] or [`Marked::Busy`]
    /// otherwise, and then you roll back. Of concurrent transactions marking
    /// the same key, at most one commits a `First`.
    fn mark_processed(
        &self,
        conn: &mut <Self::Database as Database>::Connection,
        key: &str,
    ) -> impl Future<Output = Result<Marked, StoreError>> + Send;
}

/// The transaction an inbox handler writes through; see the
/// [module docs](self).
///
/// It dereferences to the database connection, so queries take
/// `&mut *tx`. Finish with [`commit`](Self::commit) or
/// [`commit_with_outputs`](Self::commit_with_outputs): they are the only way to
/// get the [`Committed`] an inbox handler returns. Dropping it rolls back.
pub struct InboxTx<St: TransactionalStore> {
    tx: Transaction<'static, St::Database>,
    store: St,
    key: String,
    token: LeaseToken,
    metrics: IdempotencyMetrics,
    series: SeriesHandle,
}

impl<St: TransactionalStore> InboxTx<St> {
    pub(crate) fn new(
        tx: Transaction<'static, St::Database>,
        store: St,
        key: String,
        token: LeaseToken,
        metrics: IdempotencyMetrics,
        series: SeriesHandle,
    ) -> Self {
        Self {
            tx,
            store,
            key,
            token,
            metrics,
            series,
        }
    }

    /// The message's dedup key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The underlying transaction.
    pub fn transaction(&mut self) -> &mut Transaction<'static, St::Database> {
        &mut self.tx
    }

    /// Commits: the business writes and the processed mark (written in
    /// this transaction when it claimed the key) become visible together.
    pub async fn commit(self) -> Result<Committed, StoreError> {
        self.finish(Vec::new()).await
    }

    /// Like [`commit`](Self::commit), also storing `outputs` (a reply,
    /// commands, events) with the mark; the handler answers with them, so
    /// the worker publishes them after the commit, and a duplicate answers
    /// with them again.
    pub async fn commit_with_outputs(self, outputs: Vec<Output>) -> Result<Committed, StoreError> {
        self.finish(outputs).await
    }

    async fn finish(self, outputs: Vec<Output>) -> Result<Committed, StoreError> {
        let Self {
            mut tx,
            store,
            key,
            token,
            metrics,
            series,
        } = self;
        let series = metrics.attach(&series);
        // The key was marked done by the claim in this transaction; only
        // outputs need another statement.
        if let Some(stored) = reply::encode(&outputs)? {
            series
                .timed(
                    Op::Complete,
                    store.immediate().is_none(),
                    store.complete_in(&mut tx, &key, &token, Some(&stored)),
                )
                .await?;
        }
        series
            .timed(Op::Commit, store.immediate().is_none(), async {
                tx.commit().await.map_err(StoreError::from)
            })
            .await?;
        Ok(Committed { outputs })
    }
}

impl<St: TransactionalStore> Deref for InboxTx<St> {
    type Target = <St::Database as Database>::Connection;

    fn deref(&self) -> &Self::Target {
        &self.tx
    }
}

impl<St: TransactionalStore> DerefMut for InboxTx<St> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.tx
    }
}

impl<St: TransactionalStore> fmt::Debug for InboxTx<St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InboxTx")
            .field("key", &self.key)
            .field("token", &self.token)
            .finish_non_exhaustive()
    }
}

/// Proof that an inbox handler's transaction committed with the message
/// marked processed. Only [`InboxTx::commit`] and
/// [`InboxTx::commit_with_outputs`] make one.
#[derive(Debug)]
#[must_use = "return it from the inbox handler"]
pub struct Committed {
    pub(crate) outputs: Vec<Output>,
}

impl Committed {
    /// The outputs stored with the mark.
    pub fn outputs(&self) -> &[Output] {
        &self.outputs
    }
}
