//! [`InboxLayer`]: the inbox as a layer around any handler.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use sqlx::Database;
use surety_core::HandlerError;
use surety_core::consumer::{Incoming, Outcome, Response};
use tokio::sync::{MappedMutexGuard, Mutex, MutexGuard};
use tower::{Layer, Service, ServiceExt};

use super::handler::{Claimed, begin_claimed};
use super::{InboxTx, TransactionalStore};
use crate::idempotent::{Guard, IdempotencyLayer};
use crate::key::KeyFn;

impl<St, K> IdempotencyLayer<St, K>
where
    St: TransactionalStore,
    K: KeyFn + Clone,
{
    /// The inbox as a layer: for each delivery it opens a transaction,
    /// claims the key inside it, and hands the transaction to the handler
    /// (any handler: [`typed`](surety_core::consumer::typed), a router,
    /// with its own layers) through [`InboxTransaction::of`]. When the
    /// handler answers [`Outcome::Handled`], the layer stores its outputs
    /// with the mark and commits: the business write, the mark and the
    /// outputs to re-emit for duplicates become visible together, and the
    /// worker then emits the outputs. Any other answer, or an error, rolls
    /// everything back, so the redelivery runs again at once; a duplicate
    /// answers with the stored outputs without running the handler.
    ///
    /// Put it inside the DLQ layer: each retry of the DLQ layer then runs
    /// in a fresh transaction.
    ///
    /// ```
    /// use surety_core::consumer::{handler_fn, Incoming, Outcome};
    /// use surety_core::{DeliveryInfo, Envelope, HandlerError};
    /// use surety_core::tower::{Layer, ServiceExt};
    /// use surety_idempotency::{IdempotencyLayer, InboxTransaction, SqliteDedupStore};
    /// # use sqlx::sqlite::SqlitePoolOptions;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool = SqlitePoolOptions::new().max_connections(1).connect("sqlite::memory:").await?;
    /// # surety_idempotency::sqlite::migrate(&pool).await?;
    /// # sqlx::query("CREATE TABLE payments (order_id TEXT)").execute(&pool).await?;
    /// let pay = handler_fn(|msg: Incoming| async move {
    ///     let inbox = InboxTransaction::<SqliteDedupStore>::of(&msg)?;
    ///     let mut tx = inbox.lock().await?;
    ///     sqlx::query("INSERT INTO payments (order_id) VALUES (?1)")
    ///         .bind(msg.envelope.subject.clone())
    ///         .execute(&mut *tx)
    ///         .await
    ///         .map_err(HandlerError::transient)?;
    ///     Ok::<_, HandlerError>(())
    /// });
    /// let handler = IdempotencyLayer::new(SqliteDedupStore::new(pool.clone()))
    ///     .transactional()
    ///     .layer(pay);
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
    pub fn transactional(&self) -> InboxLayer<St, K> {
        InboxLayer {
            guard: self.guard(),
        }
    }
}

/// The [`tower::Layer`] built by
/// [`IdempotencyLayer::transactional`]: the transactional inbox around any
/// handler.
pub struct InboxLayer<St, K> {
    guard: Arc<Guard<St, K>>,
}

impl<St, K> Clone for InboxLayer<St, K> {
    fn clone(&self) -> Self {
        Self {
            guard: Arc::clone(&self.guard),
        }
    }
}

impl<St: fmt::Debug, K: fmt::Debug> fmt::Debug for InboxLayer<St, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InboxLayer")
            .field("guard", &self.guard)
            .finish()
    }
}

impl<S, St, K> Layer<S> for InboxLayer<St, K> {
    type Service = Inbox<S, St, K>;

    fn layer(&self, inner: S) -> Self::Service {
        Inbox {
            inner,
            guard: Arc::clone(&self.guard),
        }
    }
}

/// A handler wrapped by an [`InboxLayer`].
pub struct Inbox<S, St, K> {
    inner: S,
    guard: Arc<Guard<St, K>>,
}

impl<S: Clone, St, K> Clone for Inbox<S, St, K> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            guard: Arc::clone(&self.guard),
        }
    }
}

impl<S: fmt::Debug, St: fmt::Debug, K: fmt::Debug> fmt::Debug for Inbox<S, St, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inbox")
            .field("inner", &self.inner)
            .field("guard", &self.guard)
            .finish()
    }
}

impl<S, St, K> Service<Incoming> for Inbox<S, St, K>
where
    S: Service<Incoming, Response = Response, Error = HandlerError> + Clone + Send + 'static,
    S::Future: Send + 'static,
    St: TransactionalStore,
    K: KeyFn,
{
    type Response = Response;
    type Error = HandlerError;
    type Future = BoxFuture<'static, Result<Response, HandlerError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut msg: Incoming) -> Self::Future {
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let guard = Arc::clone(&self.guard);
        Box::pin(async move {
            let series = guard.metrics.series(&msg.info);
            let key = guard.key.key(&msg)?;
            let (tx, lease) = match begin_claimed(&guard, &series, &key).await? {
                Claimed::Run { tx, lease } => (tx, lease),
                Claimed::Duplicate(response) => return Ok(response),
            };
            guard.took_over(&series, &key, &lease);
            let slot = Arc::new(Mutex::new(Some(InboxTx::new(
                tx,
                guard.store.clone(),
                key,
                lease.token,
                guard.metrics.clone(),
                series.handle(),
            ))));
            msg.extensions.insert(InboxTransaction {
                slot: Arc::clone(&slot),
            });
            let result = inner.oneshot(msg).await;
            // Taken back whatever happened: dropping it rolls back.
            let tx = slot.lock().await.take();
            let response = result?;
            if response.outcome != Outcome::Handled {
                // Scheduled for a retry or dead-lettered by an inner layer:
                // nothing of this run commits, the next one runs again.
                drop(tx);
                return Ok(response);
            }
            let tx = tx.ok_or_else(|| {
                HandlerError::permanent("the inbox transaction was taken out of its slot")
            })?;
            let committed = tx
                .finish(response.outputs)
                .await
                .map_err(HandlerError::new)?;
            Ok(guard.committed(&series, committed.outputs))
        })
    }
}

/// The inbox transaction of the delivery being handled, put into
/// [`Incoming::extensions`] by an [`InboxLayer`]: write the business change
/// through it, and the layer commits it with the processed mark.
pub struct InboxTransaction<St: TransactionalStore> {
    slot: Arc<Mutex<Option<InboxTx<St>>>>,
}

impl<St: TransactionalStore> fmt::Debug for InboxTransaction<St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InboxTransaction").finish_non_exhaustive()
    }
}

impl<St: TransactionalStore> InboxTransaction<St> {
    /// The transaction of `msg`; a [permanent](surety_core::ErrorClass::Permanent)
    /// error when the handler does not run inside an [`InboxLayer`] of
    /// store type `St` (a wiring mistake, not the message's fault).
    pub fn of(msg: &Incoming) -> Result<&Self, HandlerError> {
        msg.extensions.get::<Self>().ok_or_else(|| {
            HandlerError::permanent(format!(
                "no inbox transaction for {}: the handler must run inside IdempotencyLayer::transactional with {}",
                msg.envelope.id,
                std::any::type_name::<St>()
            ))
        })
    }

    /// Locks the transaction for writing. A handler that runs again after
    /// its layer finished (it should not) gets a permanent error.
    pub async fn lock(&self) -> Result<InboxGuard<'_, St>, HandlerError> {
        let guard = MutexGuard::try_map(self.slot.lock().await, Option::as_mut)
            .map_err(|_| HandlerError::permanent("the inbox transaction has already ended"))?;
        Ok(InboxGuard { guard })
    }
}

/// The locked inbox transaction: use it as a connection (`&mut *tx`).
pub struct InboxGuard<'a, St: TransactionalStore> {
    guard: MappedMutexGuard<'a, InboxTx<St>>,
}

impl<St: TransactionalStore> fmt::Debug for InboxGuard<'_, St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InboxGuard").finish_non_exhaustive()
    }
}

impl<St: TransactionalStore> Deref for InboxGuard<'_, St> {
    type Target = <St::Database as Database>::Connection;

    fn deref(&self) -> &Self::Target {
        &self.guard
    }
}

impl<St: TransactionalStore> DerefMut for InboxGuard<'_, St> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.guard
    }
}
