//! The consumer pipeline: handlers as `tower` services and the [`Worker`]
//! that drives them.
//!
//! A handler is a [`tower::Service`] from [`Incoming`] to [`Outcome`] with
//! [`HandlerError`] as its error. Reliability features are
//! [`tower::Layer`]s around it (deduplication in `surety-idempotency`,
//! classification, bounded retries and dead-lettering in `surety-dlq`), and
//! tower's own layers (timeouts, concurrency and rate limits) fit in the same
//! stack. The [`Worker`] pulls deliveries from a subscription, runs the
//! service in a span linked to the producer's trace, and settles each
//! delivery exactly once from the result:
//!
//! | result | settlement |
//! |---|---|
//! | `Ok(_)` | ack |
//! | transient error | nack with requeue (after the error's `retry_after`, if any), until the broker's delivery count reaches [`Worker::max_deliveries`], then reject |
//! | [`HandlerError::unavailable`] (the pipeline, not the message, failed) | nack with requeue, whatever the delivery count |
//! | permanent or poison error | reject |
//! | panic in the handler | reject (classified permanent, with the panic message) |
//!
//! The worker's own retry is deliberately simple: `surety-dlq` adds backoff
//! with jitter, delayed redelivery through the broker and dead-letter
//! envelopes as a layer that turns failures into `Ok(Outcome::RetryScheduled)`
//! or `Ok(Outcome::DeadLettered)`.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use serde::de::DeserializeOwned;
use tokio::task::JoinSet;
use tower::{Service, ServiceExt};
use tracing::Instrument;

use crate::envelope::Envelope;
use crate::error::{Classify, ErrorClass, HandlerError, TransportErrorKind};
use crate::metrics::Metrics;
use crate::port::{Delivery, DeliveryInfo, DeliveryStream, attempt_of};
use crate::trace;

/// A delivered message as a handler sees it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Incoming {
    /// The message.
    pub envelope: Envelope,
    /// Where it came from.
    pub info: DeliveryInfo,
    /// Which attempt this is, from 1 (see [`Delivery::attempt`]).
    pub attempt: u32,
}

impl Incoming {
    /// An incoming message, as a worker builds it from a delivery.
    pub fn new(envelope: Envelope, info: DeliveryInfo) -> Self {
        let attempt = attempt_of(&envelope, &info);
        Self {
            envelope,
            info,
            attempt,
        }
    }
}

/// How a handler (and its layers) finished with a message. Every outcome is
/// final: the worker acknowledges the delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Outcome {
    /// The handler ran and succeeded.
    Handled,
    /// The message was a duplicate of one already handled; the handler did not run.
    Duplicate,
    /// The failure was recorded and the message republished for a later attempt.
    RetryScheduled,
    /// The message was moved to a dead-letter destination.
    DeadLettered,
}

impl Outcome {
    /// The stable lower-case name.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Handled => "handled",
            Self::Duplicate => "duplicate",
            Self::RetryScheduled => "retry_scheduled",
            Self::DeadLettered => "dead_lettered",
        }
    }
}

/// A service that handles messages: what a [`Worker`] runs.
///
/// Implemented for every matching `tower::Service`; write one with
/// [`handler_fn`] or [`typed`].
pub trait Handler:
    Service<Incoming, Response = Outcome, Error = HandlerError, Future: Send> + Clone + Send + 'static
{
}

impl<S> Handler for S where
    S: Service<Incoming, Response = Outcome, Error = HandlerError, Future: Send>
        + Clone
        + Send
        + 'static
{
}

/// A handler from an async function of the [`Incoming`] message.
///
/// The function returns any error that implements [`Classify`].
///
/// ```
/// use surety_core::consumer::{handler_fn, Incoming};
/// use surety_core::Permanent;
///
/// let handler = handler_fn(|msg: Incoming| async move {
///     if msg.envelope.payload.is_empty() {
///         return Err(Permanent::new("empty order"));
///     }
///     Ok(())
/// });
/// # let _ = handler;
/// ```
pub fn handler_fn<F, Fut, E>(f: F) -> HandlerFn<F>
where
    F: Fn(Incoming) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Classify + std::error::Error + Send + Sync + 'static,
{
    HandlerFn { f }
}

/// The handler returned by [`handler_fn`].
#[derive(Clone)]
pub struct HandlerFn<F> {
    f: F,
}

impl<F> fmt::Debug for HandlerFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerFn").finish_non_exhaustive()
    }
}

impl<F, Fut, E> Service<Incoming> for HandlerFn<F>
where
    F: Fn(Incoming) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Classify + std::error::Error + Send + Sync + 'static,
{
    type Response = Outcome;
    type Error = HandlerError;
    type Future = BoxFuture<'static, Result<Outcome, HandlerError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, msg: Incoming) -> Self::Future {
        let fut = (self.f)(msg);
        Box::pin(async move {
            fut.await.map_err(HandlerError::new)?;
            Ok(Outcome::Handled)
        })
    }
}

/// A handler from an async function of the decoded JSON payload `T` and the
/// [`Incoming`] message. A payload that does not decode is a
/// [poison](ErrorClass::Poison) failure and the function never runs.
///
/// ```
/// use serde::Deserialize;
/// use surety_core::consumer::{typed, Incoming};
///
/// #[derive(Deserialize)]
/// struct OrderPlaced { order_id: String }
///
/// let handler = typed(|order: OrderPlaced, _msg: Incoming| async move {
///     println!("placing {}", order.order_id);
///     Ok::<_, std::convert::Infallible>(())
/// });
/// # let _ = handler;
/// ```
pub fn typed<T, F, Fut, E>(f: F) -> Typed<T, F>
where
    T: DeserializeOwned + Send + 'static,
    F: Fn(T, Incoming) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Classify + std::error::Error + Send + Sync + 'static,
{
    Typed {
        f,
        _payload: PhantomData,
    }
}

/// The handler returned by [`typed`].
pub struct Typed<T, F> {
    f: F,
    _payload: PhantomData<fn() -> T>,
}

impl<T, F: Clone> Clone for Typed<T, F> {
    fn clone(&self) -> Self {
        Self {
            f: self.f.clone(),
            _payload: PhantomData,
        }
    }
}

impl<T, F> fmt::Debug for Typed<T, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Typed")
            .field("payload", &std::any::type_name::<T>())
            .finish_non_exhaustive()
    }
}

impl<T, F, Fut, E> Service<Incoming> for Typed<T, F>
where
    T: DeserializeOwned + Send + 'static,
    F: Fn(T, Incoming) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Classify + std::error::Error + Send + Sync + 'static,
{
    type Response = Outcome;
    type Error = HandlerError;
    type Future = BoxFuture<'static, Result<Outcome, HandlerError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, msg: Incoming) -> Self::Future {
        let payload = match msg.envelope.decode::<T>() {
            Ok(payload) => payload,
            Err(err) => return Box::pin(std::future::ready(Err(HandlerError::new(err)))),
        };
        let fut = (self.f)(payload, msg);
        Box::pin(async move {
            fut.await.map_err(HandlerError::new)?;
            Ok(Outcome::Handled)
        })
    }
}

/// What a [`Worker`] did, returned when it stops.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerReport {
    /// Deliveries acknowledged (the handler or a layer finished with them).
    pub acked: u64,
    /// Deliveries returned to the broker for another attempt.
    pub requeued: u64,
    /// Deliveries rejected (permanent, poison, or out of attempts).
    pub rejected: u64,
    /// Settlements the broker refused (the message will be redelivered).
    pub settle_failures: u64,
    /// In-flight deliveries abandoned at the shutdown deadline (they will be
    /// redelivered).
    pub abandoned: u64,
}

impl WorkerReport {
    fn finished(&mut self, done: Result<Settled, tokio::task::JoinError>) {
        match done {
            Ok(settled) => self.add(settled),
            // Handler panics are caught inside the task; this is a panic in
            // settling itself. The delivery was dropped unsettled, so the
            // broker delivers it again.
            Err(err) => {
                tracing::error!(error = %err, "delivery task failed; the message will be redelivered");
                self.settle_failures += 1;
            }
        }
    }

    fn add(&mut self, settled: Settled) {
        match settled {
            Settled::Acked => self.acked += 1,
            Settled::Requeued => self.requeued += 1,
            Settled::Rejected => self.rejected += 1,
            Settled::Failed => self.settle_failures += 1,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Settled {
    Acked,
    Requeued,
    Rejected,
    Failed,
}

impl Settled {
    fn as_str(self) -> &'static str {
        match self {
            Self::Acked => "acked",
            Self::Requeued => "requeued",
            Self::Rejected => "rejected",
            Self::Failed => "settle_failed",
        }
    }
}

/// Runs a [`Handler`] over a subscription: concurrency, tracing, metrics,
/// settlement and graceful shutdown.
///
/// ```
/// use surety_core::consumer::{handler_fn, Incoming, Worker};
/// use surety_core::{Envelope, Publisher, Subscriber, memory::MemoryTransport};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let transport = MemoryTransport::new();
/// let deliveries = transport.subscribe("orders", "audit").await?;
/// let (done_tx, mut done) = tokio::sync::mpsc::channel(1);
/// let handler = handler_fn(move |msg: Incoming| {
///     let done_tx = done_tx.clone();
///     async move {
///         done_tx.send(msg.envelope.id).await.ok();
///         Ok::<_, std::convert::Infallible>(())
///     }
/// });
///
/// let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
/// let worker = tokio::spawn(Worker::new(handler).concurrency(4).run(deliveries, async {
///     stopped.await.ok();
/// }));
///
/// let env = Envelope::builder("/orders", "order.placed").build();
/// let id = env.id.clone();
/// transport.publish("orders", env).await?;
/// assert_eq!(done.recv().await, Some(id));
///
/// stop.send(()).ok(); // graceful: in-flight handlers finish and are acked
/// let report = worker.await?;
/// assert_eq!(report.acked, 1);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Worker<S> {
    service: S,
    concurrency: usize,
    max_deliveries: u32,
    max_retry_after: Duration,
    shutdown_grace: Duration,
    metrics: Metrics,
}

impl<S: Handler> Worker<S> {
    /// A worker running `service` one delivery at a time.
    pub fn new(service: S) -> Self {
        Self {
            service,
            concurrency: 1,
            max_deliveries: 5,
            max_retry_after: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(30),
            metrics: Metrics::default(),
        }
    }

    /// How many deliveries are handled at once (default 1; 0 is taken as 1).
    /// Per-key ordering still holds: the transport does not hand out a second
    /// message of a key while the first is in flight.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// After this many deliveries of one message (as counted by the broker
    /// or the `surety-attempt` header), a transient failure rejects the
    /// message instead of requeueing it (default 5).
    pub fn max_deliveries(mut self, n: u32) -> Self {
        self.max_deliveries = n.max(1);
        self
    }

    /// Upper bound on how long a transient error's `retry_after` holds a
    /// delivery before it is requeued (default 30 s).
    pub fn max_retry_after(mut self, limit: Duration) -> Self {
        self.max_retry_after = limit;
        self
    }

    /// How long in-flight handlers may run after shutdown was requested
    /// before they are abandoned (default 30 s). Abandoned deliveries are not
    /// acknowledged; the broker delivers them again.
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.shutdown_grace = grace;
        self
    }

    /// Records into `metrics` (see [`Metrics::register`]).
    pub fn metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Handles deliveries until the stream ends or `shutdown` resolves.
    ///
    /// On shutdown the worker stops taking deliveries, drops the stream (so
    /// prefetched, unhandled messages go back to the broker) and waits up to
    /// the grace period for in-flight handlers, settling each from its result.
    pub async fn run(
        self,
        mut deliveries: DeliveryStream,
        shutdown: impl Future<Output = ()> + Send,
    ) -> WorkerReport {
        let mut report = WorkerReport::default();
        let mut tasks: JoinSet<Settled> = JoinSet::new();
        let mut shutdown = std::pin::pin!(shutdown);
        let mut error_backoff = new_error_backoff();
        loop {
            let has_room = tasks.len() < self.concurrency;
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                Some(done) = tasks.join_next(), if !tasks.is_empty() => report.finished(done),
                next = deliveries.next(), if has_room => match next {
                    None => break,
                    Some(Ok(delivery)) => {
                        tasks.spawn(process(
                            self.service.clone(),
                            delivery,
                            self.metrics.clone(),
                            self.max_deliveries,
                            self.max_retry_after,
                        ));
                    }
                    Some(Err(err)) if err.kind() == TransportErrorKind::Closed => break,
                    Some(Err(err)) => {
                        // Back off so a subscription that keeps failing does
                        // not spin; the shutdown signal still wins.
                        let delay = error_backoff.next().unwrap_or(MAX_ERROR_BACKOFF);
                        tracing::warn!(error = %err, retry_in = ?delay, "subscription error");
                        tokio::select! {
                            biased;
                            () = &mut shutdown => break,
                            () = tokio::time::sleep(delay) => {}
                        }
                        continue;
                    }
                },
            }
            error_backoff = new_error_backoff();
        }
        drop(deliveries);
        let drain = async {
            while let Some(done) = tasks.join_next().await {
                report.finished(done);
            }
        };
        if tokio::time::timeout(self.shutdown_grace, drain)
            .await
            .is_err()
        {
            report.abandoned = tasks.len() as u64;
            tracing::warn!(
                abandoned = tasks.len(),
                "shutdown grace period over; unsettled deliveries will be redelivered"
            );
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
        report
    }
}

/// The longest pause after consecutive subscription errors.
const MAX_ERROR_BACKOFF: Duration = Duration::from_secs(5);

/// Delays after consecutive subscription errors: 50 ms doubling to 5 s, with jitter.
fn new_error_backoff() -> impl Iterator<Item = Duration> {
    use backon::BackoffBuilder as _;
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(MAX_ERROR_BACKOFF)
        .with_jitter()
        .without_max_times()
        .build()
}

async fn process<S: Handler>(
    service: S,
    delivery: Delivery,
    metrics: Metrics,
    max_deliveries: u32,
    max_retry_after: Duration,
) -> Settled {
    let (envelope, info, settle) = delivery.into_parts();
    let span = trace::process_span(&info, &envelope);
    let incoming = Incoming::new(envelope, info.clone());
    let attempt = incoming.attempt;
    let started = Instant::now();
    let result = async {
        // A replay addressed to another consumer group: acked unhandled.
        if !crate::headers::addressed_to(&incoming.envelope, &incoming.info.group) {
            return Ok(Outcome::Handled);
        }
        let result = AssertUnwindSafe(service.oneshot(incoming))
            .catch_unwind()
            .await
            .unwrap_or_else(|panic| {
                Err(HandlerError::permanent(crate::error::panic_message(
                    &*panic,
                )))
            });
        if let Err(err) = &result {
            tracing::warn!(
                error_class = err.class().as_str(),
                error = %err.chain_message(1024),
                attempt,
                "handler failed"
            );
        }
        result
    }
    .instrument(span)
    .await;
    let label = match &result {
        Ok(_) => "ok",
        Err(err) => err.class().as_str(),
    };
    metrics.handler_finished(
        info.system,
        &info.topic,
        &info.group,
        label,
        started.elapsed(),
    );

    let (settled, outcome) = match result {
        Ok(_) => (Settled::Acked, settle.ack().await),
        Err(err) => match err.class() {
            ErrorClass::Transient { retry_after }
                if attempt < max_deliveries || err.is_unavailable() =>
            {
                if let Some(delay) = retry_after {
                    tokio::time::sleep(delay.min(max_retry_after)).await;
                }
                (Settled::Requeued, settle.nack(true).await)
            }
            _ => (Settled::Rejected, settle.reject().await),
        },
    };
    let settled = match outcome {
        Ok(()) => settled,
        Err(err) => {
            tracing::warn!(error = %err, "settling a delivery failed; it will be redelivered");
            Settled::Failed
        }
    };
    metrics.consumed(info.system, &info.topic, &info.group, settled.as_str());
    settled
}

/// A service that handles nothing; useful in tests and as a layer base.
#[derive(Debug, Clone, Copy, Default)]
pub struct AckAll;

impl Service<Incoming> for AckAll {
    type Response = Outcome;
    type Error = HandlerError;
    type Future = std::future::Ready<Result<Outcome, HandlerError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Incoming) -> Self::Future {
        std::future::ready(Ok(Outcome::Handled))
    }
}

impl Classify for Infallible {
    fn class(&self) -> ErrorClass {
        match *self {}
    }
}
