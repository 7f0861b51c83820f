//! The idempotent handler: [`IdempotencyLayer`] and the [`Idempotent`]
//! service it wraps handlers in.

mod guard;
mod layer;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use surety_core::HandlerError;
use surety_core::consumer::{Incoming, Outcome, Response};
use tower::Service;

pub(crate) use guard::{Guard, Step};
pub use layer::IdempotencyLayer;

use crate::error::StoreError;
use crate::key::KeyFn;
use crate::metrics::{Op, SeriesHandle};
use crate::store::{Claim, DedupStore, Lease};

/// A handler wrapped by an [`IdempotencyLayer`]: it runs the inner
/// service once per dedup key.
///
/// For each delivery it claims the key in the store, then:
///
/// | claim | what happens | result |
/// |---|---|---|
/// | acquired | the inner service runs (the lease is renewed meanwhile); on `Ok` the key is marked done with the response's outputs | the inner response, whose outputs the worker emits |
/// | acquired, inner fails | the claim is released so the next delivery runs again | the inner error |
/// | done | the inner service does not run | `Ok` with [`Outcome::Duplicate`] and the stored outputs, which the worker emits again |
/// | busy (another delivery holds a live lease) | polls for up to the [busy wait](crate::LeasePolicy::busy_wait) | a transient error with `retry_after` = the rest of the lease |
///
/// An inner `Ok(Outcome::RetryScheduled)` or `Ok(Outcome::DeadLettered)`
/// releases the claim too: the message was not handled, and its retry or
/// replay must run.
pub struct Idempotent<S, St, K> {
    inner: S,
    guard: Arc<Guard<St, K>>,
}

impl<S: Clone, St, K> Clone for Idempotent<S, St, K> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            guard: Arc::clone(&self.guard),
        }
    }
}

impl<S: fmt::Debug, St: fmt::Debug, K: fmt::Debug> fmt::Debug for Idempotent<S, St, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotent")
            .field("inner", &self.inner)
            .field("guard", &self.guard)
            .finish()
    }
}

impl<S, St, K> Service<Incoming> for Idempotent<S, St, K>
where
    S: Service<Incoming, Response = Response, Error = HandlerError> + Clone + Send + 'static,
    S::Future: Send + 'static,
    St: DedupStore,
    K: KeyFn,
{
    type Response = Response;
    type Error = HandlerError;
    type Future = IdempotentFuture<S::Future, St, K>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, msg: Incoming) -> Self::Future {
        let guard = &self.guard;
        let key = match guard.key.key(&msg) {
            Ok(key) => key,
            Err(err) => return IdempotentFuture::ready(Err(err)),
        };
        // The consumer's counters, looked up now: the handler takes the
        // message (and its delivery info) by value.
        let series = guard.metrics.handle(&msg.info);
        // A store that answers at once (in memory) is asked here, so that a
        // first delivery needs no boxed future: the claimed handler runs in
        // `IdempotentFuture` itself, and the service that was driven to
        // readiness is called without a clone.
        let claimed = guard
            .store
            .immediate()
            .map(|s| s.claim_now(&key, guard.policy.lease()));
        if let Some(claimed) = &claimed {
            guard
                .metrics
                .attach(&series)
                .observe(Op::Claim, claimed.is_ok(), 0.0);
        }
        match claimed {
            Some(Ok(Claim::Acquired(lease))) => {
                guard.took_over(&guard.metrics.attach(&series), &key, &lease);
                let guard = Arc::clone(guard);
                IdempotentFuture {
                    state: State::Running(Running {
                        guard,
                        handler: Box::pin(self.inner.call(msg)),
                        key,
                        lease,
                        series,
                        renew: Renew::NotYet,
                    }),
                }
            }
            Some(Ok(Claim::Done { reply: None })) => {
                guard.metrics.attach(&series).duplicate();
                tracing::debug!(dedup_key = %key, "duplicate delivery; the handler does not run");
                IdempotentFuture::ready(Ok(Response::outcome(Outcome::Duplicate)))
            }
            claimed => self.call_boxed(msg, key, series, claimed),
        }
    }
}

impl<S, St, K> Idempotent<S, St, K>
where
    S: Service<Incoming, Response = Response, Error = HandlerError> + Clone + Send + 'static,
    S::Future: Send + 'static,
    St: DedupStore,
    K: KeyFn,
{
    /// Every path but a claim acquired at once: one boxed future that
    /// claims (continuing from `claimed`, if the store answered at once),
    /// runs the handler under the lease and finishes.
    fn call_boxed(
        &mut self,
        msg: Incoming,
        key: String,
        series: SeriesHandle,
        claimed: Option<Result<Claim, StoreError>>,
    ) -> IdempotentFuture<S::Future, St, K> {
        // Take the service that was driven to readiness; leave a clone.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let guard = Arc::clone(&self.guard);
        IdempotentFuture {
            state: State::Boxed(Box::pin(async move {
                let series = guard.metrics.attach(&series);
                let lease = match guard.claim(&series, &key, claimed).await? {
                    Step::Skip(response) => return Ok(response),
                    Step::Run { lease } => lease,
                };
                let result = guard.hold(&series, &key, &lease, inner.call(msg)).await;
                guard.finish(&series, &key, &lease, result, None).await
            })),
        }
    }
}

/// The future of an [`Idempotent`] handler, for one delivery.
///
/// With a store that answers at once ([`Immediate::claim_now`](crate::store::Immediate::claim_now), such as
/// [`MemoryDedupStore`](crate::MemoryDedupStore)), a first delivery claims its key
/// when the handler is called, and this future runs the inner handler's
/// future and completes the key, without a boxed future of its own (outputs,
/// a failure, a wait and the other stores take one).
///
/// The claim is made when [`Idempotent`] is called, not when this future is
/// first polled: a future that is dropped before it finishes, or never
/// polled, leaves its claim to expire after the lease, as a cancelled
/// handler does, and duplicates meanwhile are answered busy. The core
/// worker polls each handler's future at once. Like any future, it must not
/// be polled again after it returned `Ready`; if it is, it stays pending.
pub struct IdempotentFuture<F, St, K> {
    state: State<F, St, K>,
}

enum State<F, St, K> {
    /// Claimed at once: the handler runs.
    Running(Running<F, St, K>),
    /// Any other path.
    Boxed(BoxFuture<'static, Result<Response, HandlerError>>),
    /// Finished (taken once).
    Ready(Option<Result<Response, HandlerError>>),
}

struct Running<F, St, K> {
    guard: Arc<Guard<St, K>>,
    /// Boxed to be polled without pinning this future's fields (the
    /// crate has no `unsafe`); the box is the size of the handler's
    /// future, for most handlers a pointer.
    handler: Pin<Box<F>>,
    key: String,
    lease: Lease,
    series: SeriesHandle,
    renew: Renew,
}

/// The lease renewal of a running handler: started the first time the
/// handler waits, so that one finishing on its first poll gets no timer.
enum Renew {
    NotYet,
    Renewing(BoxFuture<'static, ()>),
    Off,
}

impl<F, St, K> IdempotentFuture<F, St, K> {
    fn ready(result: Result<Response, HandlerError>) -> Self {
        Self {
            state: State::Ready(Some(result)),
        }
    }
}

impl<F, St, K> fmt::Debug for IdempotentFuture<F, St, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (state, key) = match &self.state {
            State::Running(running) => ("running", Some(running.key.as_str())),
            State::Boxed(_) => ("boxed", None),
            State::Ready(_) => ("ready", None),
        };
        f.debug_struct("IdempotentFuture")
            .field("state", &state)
            .field("key", &key)
            .finish_non_exhaustive()
    }
}

impl<F, St, K> Future for IdempotentFuture<F, St, K>
where
    F: Future<Output = Result<Response, HandlerError>> + Send + 'static,
    St: DedupStore,
    K: KeyFn,
{
    type Output = Result<Response, HandlerError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                State::Ready(result) => {
                    return match result.take() {
                        Some(result) => Poll::Ready(result),
                        // Polled again after it finished.
                        None => Poll::Pending,
                    };
                }
                State::Boxed(fut) => return fut.as_mut().poll(cx),
                State::Running(running) => {
                    let Poll::Ready(out) = running.poll_handler(cx) else {
                        return Poll::Pending;
                    };
                    if let State::Running(running) =
                        std::mem::replace(&mut this.state, State::Ready(None))
                    {
                        this.state = running.finish(out);
                    }
                }
            }
        }
    }
}

impl<F, St, K> Running<F, St, K>
where
    F: Future<Output = Result<Response, HandlerError>> + Send + 'static,
    St: DedupStore,
    K: KeyFn,
{
    /// Polls the handler, renewing the lease while it waits.
    fn poll_handler(&mut self, cx: &mut Context<'_>) -> Poll<F::Output> {
        if let Poll::Ready(out) = self.handler.as_mut().poll(cx) {
            return Poll::Ready(out);
        }
        if let Renew::NotYet = self.renew {
            self.renew = match self.guard.policy.renew_every() {
                Some(every) => {
                    let (guard, key) = (Arc::clone(&self.guard), self.key.clone());
                    let token = self.lease.token.clone();
                    let series = self.series.clone();
                    Renew::Renewing(Box::pin(async move {
                        let series = guard.metrics.attach(&series);
                        guard.renew(&series, &key, &token, every).await;
                    }))
                }
                None => Renew::Off,
            };
        }
        if let Renew::Renewing(renew) = &mut self.renew
            && renew.as_mut().poll(cx).is_ready()
        {
            // The lease was lost; the handler runs on.
            self.renew = Renew::Off;
        }
        Poll::Pending
    }

    /// Completes (at once, when the store can) or releases the key.
    fn finish(self, result: Result<Response, HandlerError>) -> State<F, St, K> {
        let Running {
            guard,
            key,
            lease,
            series,
            ..
        } = self;
        let completed = match &result {
            Ok(response)
                if response.outputs.is_empty()
                    && matches!(response.outcome, Outcome::Handled | Outcome::Duplicate) =>
            {
                guard
                    .store
                    .immediate()
                    .map(|s| s.complete_now(&key, &lease.token, None))
            }
            _ => None,
        };
        if let Some(completed) = &completed {
            guard
                .metrics
                .attach(&series)
                .observe(Op::Complete, completed.is_ok(), 0.0);
        }
        if let (Some(Ok(())), Ok(_)) = (&completed, &result) {
            guard.metrics.attach(&series).processed();
            return State::Ready(Some(result));
        }
        State::Boxed(Box::pin(async move {
            let series = guard.metrics.attach(&series);
            guard.finish(&series, &key, &lease, result, completed).await
        }))
    }
}
