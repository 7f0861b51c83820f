//! [`InboxHandler`]: an idempotent handler that writes through a
//! transaction.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use surety_core::consumer::{Incoming, Response};
use surety_core::{Classify, HandlerError};
use tower::Service;

use super::{Committed, InboxTx, TransactionalStore};
use crate::idempotent::{Guard, IdempotencyLayer};
use crate::key::KeyFn;
use crate::metrics::Op;
use crate::store::Claim;

/// A handler built by [`IdempotencyLayer::inbox`]: opens a transaction,
/// claims the key in it, runs your function with the transaction as an
/// [`InboxTx`], and acknowledges once the transaction committed with the
/// message marked processed. See [the module docs](super) for what
/// happens on failure and with concurrent duplicates.
pub struct InboxHandler<St, F, K> {
    guard: Arc<Guard<St, K>>,
    f: F,
}

impl<St, F: Clone, K> Clone for InboxHandler<St, F, K> {
    fn clone(&self) -> Self {
        Self {
            guard: Arc::clone(&self.guard),
            f: self.f.clone(),
        }
    }
}

impl<St: fmt::Debug, F, K: fmt::Debug> fmt::Debug for InboxHandler<St, F, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InboxHandler")
            .field("guard", &self.guard)
            .finish_non_exhaustive()
    }
}

impl<St, K> IdempotencyLayer<St, K>
where
    St: TransactionalStore,
    K: KeyFn + Clone,
{
    /// A handler that runs `f` at most once per dedup key, with a
    /// transaction in which `f` writes its effect and which
    /// [`InboxTx::commit`] commits together with the processed mark.
    ///
    /// `f`'s error decides the delivery's fate as for any handler; its
    /// transaction, with the claim in it, rolls back. The layer's
    /// [`LeasePolicy`](crate::LeasePolicy) applies to the busy wait (when a
    /// claim made outside a transaction holds the key); a claim inside a
    /// transaction needs no lease renewal, since it ends with the
    /// transaction.
    ///
    /// ```
    /// use surety_core::consumer::{Incoming, Outcome};
    /// use surety_core::{DeliveryInfo, Envelope};
    /// use surety_core::tower::ServiceExt;
    /// use surety_idempotency::{IdempotencyLayer, InboxTx, SqliteDedupStore};
    /// # use sqlx::sqlite::SqlitePoolOptions;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool = SqlitePoolOptions::new().max_connections(1).connect("sqlite::memory:").await?;
    /// # surety_idempotency::sqlite::migrate(&pool).await?;
    /// # sqlx::query("CREATE TABLE payments (order_id TEXT)").execute(&pool).await?;
    /// let store = SqliteDedupStore::new(pool.clone());
    /// let handler = IdempotencyLayer::new(store).inbox(
    ///     |msg: Incoming, mut tx: InboxTx<SqliteDedupStore>| async move {
    ///         sqlx::query("INSERT INTO payments (order_id) VALUES (?1)")
    ///             .bind(msg.envelope.subject.clone())
    ///             .execute(&mut *tx)
    ///             .await?;
    ///         tx.commit().await
    ///     },
    /// );
    ///
    /// let env = Envelope::builder("/orders", "payment.requested").subject("o-1").build();
    /// let info = DeliveryInfo::new("memory", "payments", "billing");
    /// for expected in [Outcome::Handled, Outcome::Duplicate] {
    ///     let response = handler.clone().oneshot(Incoming::new(env.clone(), info.clone())).await?;
    ///     assert_eq!(response.outcome, expected);
    /// }
    /// let paid: i64 = sqlx::query_scalar("SELECT count(*) FROM payments").fetch_one(&pool).await?;
    /// assert_eq!(paid, 1);
    /// # Ok(()) }
    /// ```
    pub fn inbox<F, Fut, E>(&self, f: F) -> InboxHandler<St, F, K>
    where
        F: Fn(Incoming, InboxTx<St>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<Committed, E>> + Send + 'static,
        E: Classify + std::error::Error + Send + Sync + 'static,
    {
        InboxHandler {
            guard: self.guard(),
            f,
        }
    }
}

impl<St, F, Fut, E, K> Service<Incoming> for InboxHandler<St, F, K>
where
    St: TransactionalStore,
    F: Fn(Incoming, InboxTx<St>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Committed, E>> + Send + 'static,
    E: Classify + std::error::Error + Send + Sync + 'static,
    K: KeyFn,
{
    type Response = Response;
    type Error = HandlerError;
    type Future = BoxFuture<'static, Result<Response, HandlerError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, msg: Incoming) -> Self::Future {
        let guard = Arc::clone(&self.guard);
        let f = self.f.clone();
        Box::pin(async move {
            let series = guard.metrics.series(&msg.info);
            let key = guard.key.key(&msg)?;
            let (tx, lease) = match begin_claimed(&guard, &series, &key).await? {
                Claimed::Run { tx, lease } => (tx, lease),
                Claimed::Duplicate(response) => return Ok(response),
            };
            guard.took_over(&series, &key, &lease);
            let tx = InboxTx::new(
                tx,
                guard.store.clone(),
                key,
                lease.token,
                guard.metrics.clone(),
                series.handle(),
            );
            // On error the transaction was dropped with `f`'s future: the
            // claim, the mark and the business write roll back together.
            let committed = f(msg, tx).await.map_err(HandlerError::new)?;
            Ok(guard.committed(&series, committed.outputs))
        })
    }
}

/// What claiming a key inside a new transaction found.
pub(super) enum Claimed<St: TransactionalStore> {
    /// First delivery: run the handler in this transaction.
    Run {
        tx: sqlx::Transaction<'static, St::Database>,
        lease: crate::store::Lease,
    },
    /// Already processed: the duplicate's response (stored outputs).
    Duplicate(Response),
}

/// Begins a transaction and claims `key` in it, waiting out a busy key (a
/// claim made outside any transaction) for up to the busy wait.
pub(super) async fn begin_claimed<St, K>(
    guard: &Guard<St, K>,
    series: &crate::metrics::Series<'_>,
    key: &str,
) -> Result<Claimed<St>, HandlerError>
where
    St: TransactionalStore,
    K: KeyFn,
{
    let mut busy = None;
    loop {
        let mut tx = series
            .timed(
                Op::Begin,
                guard.store.immediate().is_none(),
                guard.store.begin(),
            )
            .await
            .map_err(HandlerError::new)?;
        let claim = series
            .timed(
                Op::Claim,
                guard.store.immediate().is_none(),
                guard.store.claim_in(&mut tx, key),
            )
            .await
            .map_err(HandlerError::new)?;
        match claim {
            Claim::Acquired(lease) => return Ok(Claimed::Run { tx, lease }),
            Claim::Done { reply } => {
                // Nothing was written; an error here only means the
                // connection is gone, which rolls back too.
                let _ = tx.rollback().await;
                return guard
                    .duplicate(series, key, reply)
                    .await
                    .map(Claimed::Duplicate);
            }
            Claim::Busy { retry_after } => {
                // A claim outside any transaction holds the key (the plain
                // layer on the same store).
                let _ = tx.rollback().await;
                let wait = busy.get_or_insert_with(|| guard.busy_wait());
                guard.wait_busy(series, key, retry_after, wait).await?;
            }
        }
    }
}
