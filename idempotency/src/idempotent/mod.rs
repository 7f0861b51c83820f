//! The idempotent handler: [`IdempotencyLayer`] and the [`Idempotent`]
//! service it wraps handlers in.

mod guard;
mod layer;

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use surety_core::consumer::{Incoming, Outcome};
use surety_core::{HandlerError, Publisher};
use tower::Service;

pub(crate) use guard::{Finished, Guard, Step};
pub use layer::IdempotencyLayer;

use crate::key::KeyFn;
use crate::reply::HandlerResponse;
use crate::store::DedupStore;

/// A handler wrapped by an [`IdempotencyLayer`]: it runs the inner
/// service once per dedup key.
///
/// For each delivery it claims the key in the store, then:
///
/// | claim | what happens | result |
/// |---|---|---|
/// | acquired | the inner service runs (the lease is renewed meanwhile); on `Ok` the key is marked done with the reply, then the reply is published | the inner outcome |
/// | acquired, inner fails | the claim is released so the next delivery runs again | the inner error |
/// | done | the inner service does not run; a stored reply is published again | `Ok(Outcome::Duplicate)` |
/// | busy (another delivery holds a live lease) | polls for up to the [busy wait](crate::LeasePolicy::busy_wait) | a transient error with `retry_after` = the rest of the lease |
///
/// An inner `Ok(Outcome::RetryScheduled)` or `Ok(Outcome::DeadLettered)`
/// releases the claim too: the message was not handled, and its retry or
/// replay must run.
pub struct Idempotent<S, St, K, P> {
    inner: S,
    guard: Arc<Guard<St, K, P>>,
}

impl<S: Clone, St, K, P> Clone for Idempotent<S, St, K, P> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            guard: Arc::clone(&self.guard),
        }
    }
}

impl<S: fmt::Debug, St: fmt::Debug, K: fmt::Debug, P: fmt::Debug> fmt::Debug
    for Idempotent<S, St, K, P>
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotent")
            .field("inner", &self.inner)
            .field("guard", &self.guard)
            .finish()
    }
}

impl<S, St, K, P> Service<Incoming> for Idempotent<S, St, K, P>
where
    S: Service<Incoming, Error = HandlerError> + Clone + Send + 'static,
    S::Response: HandlerResponse,
    S::Future: Send + 'static,
    St: DedupStore,
    K: KeyFn,
    P: Publisher + 'static,
{
    type Response = Outcome;
    type Error = HandlerError;
    type Future = BoxFuture<'static, Result<Outcome, HandlerError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, msg: Incoming) -> Self::Future {
        // Take the service that was driven to readiness; leave a clone.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let guard = Arc::clone(&self.guard);
        Box::pin(async move {
            // The consumer's counters, looked up now: the handler takes the
            // message (and its delivery info) by value.
            let series = guard.metrics.series(&msg.info);
            let (key, lease) = match guard.claim(&msg, &series).await? {
                Step::Skip(outcome) => return Ok(outcome),
                Step::Run { key, lease } => (key, lease),
            };
            let result = guard
                .hold(&key, &lease, inner.call(msg))
                .await
                .map(|response| {
                    let (outcome, reply) = response.into_parts();
                    Finished {
                        outcome,
                        reply: reply.map(Box::new),
                    }
                });
            guard.finish(&series, &key, &lease, result).await
        })
    }
}
