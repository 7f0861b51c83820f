//! [`Worker`]: runs a handler over a subscription.

use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use tokio::task::JoinSet;
use tower::ServiceExt;
use tracing::Instrument;

use super::keyed::KeyedQueue;
use super::{Handler, Incoming, Outcome, Output, Response};
use crate::error::{Classify, ErrorClass, HandlerError, TransportError, TransportErrorKind};
use crate::metrics::Metrics;
use crate::port::{Delivery, DeliveryStream, Publisher, Settle};
use crate::trace;

/// Where a [`Worker`] sends the [`Output`]s of its handler's responses.
///
/// Implemented for every [`Publisher`]: each output is sent in order and
/// all are confirmed before the input is acknowledged. Implement it to
/// route outputs elsewhere.
pub trait OutputSink: Send + Sync + 'static {
    /// Sends `outputs`; `Ok` once every one is confirmed.
    fn emit(&self, outputs: Vec<Output>) -> BoxFuture<'_, Result<(), TransportError>>;
}

impl<P: Publisher + 'static> OutputSink for P {
    fn emit(&self, outputs: Vec<Output>) -> BoxFuture<'_, Result<(), TransportError>> {
        Box::pin(async move {
            let mut pending = Vec::with_capacity(outputs.len());
            for output in outputs {
                pending.push(self.send(&output.destination, output.envelope).await?);
            }
            for confirmation in pending {
                confirmation.await?;
            }
            Ok(())
        })
    }
}

/// What a [`Worker`] did, returned when it stops.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerReport {
    /// Deliveries acknowledged, whatever the outcome: the sum of
    /// `handled`, `duplicates`, `ignored`, `retries_scheduled` and
    /// `dead_lettered`.
    pub acked: u64,
    /// Acknowledged after the handler ran ([`Outcome::Handled`]).
    pub handled: u64,
    /// Acknowledged as duplicates ([`Outcome::Duplicate`]).
    pub duplicates: u64,
    /// Acknowledged without a handler for their type ([`Outcome::Ignored`]).
    pub ignored: u64,
    /// Acknowledged after a retry was scheduled ([`Outcome::RetryScheduled`]).
    pub retries_scheduled: u64,
    /// Acknowledged after being dead-lettered ([`Outcome::DeadLettered`]).
    pub dead_lettered: u64,
    /// Deliveries returned to the broker for another attempt (a transient
    /// failure, or outputs that were not confirmed).
    pub requeued: u64,
    /// Deliveries rejected (permanent, poison, or out of attempts).
    pub rejected: u64,
    /// Settlements the broker refused (the message will be redelivered).
    pub settle_failures: u64,
    /// In-flight deliveries abandoned at the shutdown deadline (they will be
    /// redelivered).
    pub abandoned: u64,
}

impl std::ops::AddAssign for WorkerReport {
    fn add_assign(&mut self, other: Self) {
        self.acked += other.acked;
        self.handled += other.handled;
        self.duplicates += other.duplicates;
        self.ignored += other.ignored;
        self.retries_scheduled += other.retries_scheduled;
        self.dead_lettered += other.dead_lettered;
        self.requeued += other.requeued;
        self.rejected += other.rejected;
        self.settle_failures += other.settle_failures;
        self.abandoned += other.abandoned;
    }
}

impl WorkerReport {
    fn add(&mut self, settled: Settled) {
        match settled {
            Settled::Acked(outcome) => {
                self.acked += 1;
                match outcome {
                    Outcome::Handled => self.handled += 1,
                    Outcome::Duplicate => self.duplicates += 1,
                    Outcome::Ignored => self.ignored += 1,
                    Outcome::RetryScheduled => self.retries_scheduled += 1,
                    Outcome::DeadLettered => self.dead_lettered += 1,
                }
            }
            Settled::Requeued => self.requeued += 1,
            Settled::Rejected => self.rejected += 1,
            Settled::Failed => self.settle_failures += 1,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Settled {
    Acked(Outcome),
    Requeued,
    Rejected,
    Failed,
}

impl Settled {
    fn as_str(self) -> &'static str {
        match self {
            Self::Acked(outcome) => outcome.as_str(),
            Self::Requeued => "requeued",
            Self::Rejected => "rejected",
            Self::Failed => "settle_failed",
        }
    }
}

/// How long a delivery whose outputs were not confirmed waits before it is
/// requeued (the broker is likely down; do not spin).
const EMIT_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Runs a [`Handler`] over a subscription: per-key order, concurrency,
/// tracing, metrics, output publishing, settlement and graceful shutdown.
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
/// assert_eq!(report.handled, 1);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Worker<S> {
    service: S,
    concurrency: usize,
    max_waiting: usize,
    max_deliveries: u32,
    max_retry_after: Duration,
    shutdown_grace: Duration,
    metrics: Metrics,
    outputs: Option<Arc<dyn OutputSink>>,
}

impl<S: fmt::Debug> fmt::Debug for Worker<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker")
            .field("service", &self.service)
            .field("concurrency", &self.concurrency)
            .field("max_waiting", &self.max_waiting)
            .field("max_deliveries", &self.max_deliveries)
            .field("max_retry_after", &self.max_retry_after)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("emits", &self.outputs.is_some())
            .finish_non_exhaustive()
    }
}

impl<S: Handler> Worker<S> {
    /// A worker running `service` one delivery at a time.
    pub fn new(service: S) -> Self {
        Self {
            service,
            concurrency: 1,
            max_waiting: 256,
            max_deliveries: 5,
            max_retry_after: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(30),
            metrics: Metrics::default(),
            outputs: None,
        }
    }

    /// How many deliveries are handled at once (default 1; 0 is taken as 1).
    ///
    /// Per-key order holds whatever the transport: no two deliveries with
    /// the same [partition key](crate::Envelope::partition_key) (or, for
    /// messages without one, from the same partition of a partitioned log)
    /// are in flight at once, and each key's deliveries run in the order
    /// they arrived. Different keys run in parallel.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// How many received deliveries may wait behind a busy key before the
    /// worker stops taking more from the subscription (default 256). They
    /// are unacknowledged, so they count against the broker's prefetch
    /// (0 is taken as 1).
    pub fn max_waiting(mut self, n: usize) -> Self {
        self.max_waiting = n.max(1);
        self
    }

    /// After this many deliveries of one message (the higher of the
    /// transport's delivery count and the `surety-attempt` header; see
    /// [`attempt_of`](crate::transport::attempt_of)), a transient failure rejects the
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

    /// Publishes the [`Output`]s of each response through `sink` (any
    /// [`Publisher`]) before the input is acknowledged. If one is not
    /// confirmed, the input is requeued and the handler runs again, so a
    /// handler that emits should be idempotent (`surety-idempotency` stores
    /// its outputs and re-emits them for a duplicate).
    ///
    /// Without a sink, a response with outputs is a configuration error:
    /// the input is rejected and the error logged.
    pub fn emit_to(mut self, sink: impl OutputSink) -> Self {
        self.outputs = Some(Arc::new(sink));
        self
    }

    /// Handles deliveries until the stream ends (and what it yielded is
    /// settled) or `shutdown` resolves.
    ///
    /// On shutdown the worker stops taking deliveries, drops the stream and
    /// the deliveries waiting behind busy keys (so prefetched, unhandled
    /// messages go back to the broker) and waits up to the grace period for
    /// in-flight handlers, settling each from its result.
    pub async fn run(
        self,
        mut deliveries: DeliveryStream,
        shutdown: impl Future<Output = ()> + Send,
    ) -> WorkerReport {
        let mut report = WorkerReport::default();
        let mut tasks: JoinSet<(Settled, Option<u64>)> = JoinSet::new();
        let mut keys = KeyedQueue::default();
        let mut shutdown = std::pin::pin!(shutdown);
        let mut error_backoff = new_error_backoff();
        // With one delivery at a time, order holds without keys.
        let keyed = self.concurrency > 1;
        // Whether the subscription may yield more. Once it ended, what was
        // received (in flight, or waiting behind a busy key) still runs.
        let mut open = true;
        // The consumers (system, topic, group) whose series exist already.
        let mut consumers = crate::metrics::SeenConsumers::default();
        loop {
            if !open && tasks.is_empty() {
                break;
            }
            let has_room =
                open && tasks.len() < self.concurrency && keys.waiting() < self.max_waiting;
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                    let key = Self::finished(&mut report, done);
                    if let Some(next) = key.and_then(|key| keys.finish(key)) {
                        self.spawn(&mut tasks, next, key);
                    }
                }
                next = deliveries.next(), if has_room => match next {
                    None => open = false,
                    Some(Ok(delivery)) => {
                        self.metrics.consumer_seen(&mut consumers, delivery.info());
                        let key = if keyed { keys.key_of(&delivery) } else { None };
                        let ready = match key {
                            Some(key) => keys.admit(key, delivery),
                            None => Some(delivery),
                        };
                        if let Some(delivery) = ready {
                            self.spawn(&mut tasks, delivery, key);
                        }
                    }
                    Some(Err(err)) if err.kind() == TransportErrorKind::Closed => open = false,
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
        drop(keys);
        let drain = async {
            while let Some(done) = tasks.join_next().await {
                Self::finished(&mut report, done);
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

    fn spawn(
        &self,
        tasks: &mut JoinSet<(Settled, Option<u64>)>,
        delivery: Delivery,
        key: Option<u64>,
    ) {
        let step = process(
            self.service.clone(),
            delivery,
            self.metrics.clone(),
            self.outputs.clone(),
            self.max_deliveries,
            self.max_retry_after,
        );
        tasks.spawn(async move {
            // Handler panics are caught inside; this catches a panic in
            // settling itself, so the key is always handed back. The
            // delivery was dropped unsettled: the broker delivers it again.
            let settled = AssertUnwindSafe(step)
                .catch_unwind()
                .await
                .unwrap_or_else(|panic| {
                    tracing::error!(
                        error = crate::error::panic_message(&*panic),
                        "delivery task failed; the message will be redelivered"
                    );
                    Settled::Failed
                });
            (settled, key)
        });
    }

    fn finished(
        report: &mut WorkerReport,
        done: Result<(Settled, Option<u64>), tokio::task::JoinError>,
    ) -> Option<u64> {
        match done {
            Ok((settled, key)) => {
                report.add(settled);
                key
            }
            // Only aborted tasks end this way, and only at shutdown.
            Err(err) => {
                tracing::error!(error = %err, "delivery task ended; the message will be redelivered");
                report.settle_failures += 1;
                None
            }
        }
    }
}

/// The longest pause after consecutive subscription errors.
const MAX_ERROR_BACKOFF: Duration = Duration::from_secs(5);

/// Delays after consecutive subscription errors: 50 ms doubling to 5 s, with jitter.
fn new_error_backoff() -> impl Iterator<Item = Duration> {
    crate::retry::Backoff::exponential(Duration::from_millis(50), MAX_ERROR_BACKOFF).delays()
}

async fn process<S: Handler>(
    service: S,
    delivery: Delivery,
    metrics: Metrics,
    outputs: Option<Arc<dyn OutputSink>>,
    max_deliveries: u32,
    max_retry_after: Duration,
) -> Settled {
    let (envelope, info, settle) = delivery.into_parts();
    let span = trace::process_span(&info, &envelope);
    let incoming = Incoming::new(envelope, info.clone());
    let attempt = incoming.attempt;
    let started = Instant::now();
    let result = async {
        // A replay addressed to another consumer group: acknowledged
        // without handling.
        if !crate::headers::addressed_to(&incoming.envelope, &incoming.info.group) {
            return Ok(Response::outcome(Outcome::Ignored));
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
    .instrument(span.clone())
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
        Ok(response) => {
            emit_then_ack(response, outputs, settle, max_retry_after)
                .instrument(span)
                .await
        }
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

/// Publishes a response's outputs, then acknowledges; requeues when they
/// were not all confirmed.
async fn emit_then_ack(
    response: Response,
    sink: Option<Arc<dyn OutputSink>>,
    settle: Box<dyn Settle>,
    max_retry_after: Duration,
) -> (Settled, crate::Result<()>) {
    let Response { outcome, outputs } = response;
    if !outputs.is_empty() {
        let Some(sink) = sink else {
            tracing::error!(
                outputs = outputs.len(),
                "the handler emitted messages but the worker has no output sink (Worker::emit_to); rejecting the input"
            );
            return (Settled::Rejected, settle.reject().await);
        };
        let count = outputs.len();
        if let Err(err) = sink.emit(outputs).await {
            tracing::warn!(
                error = %err,
                outputs = count,
                "the handler's outputs were not confirmed; the input will be redelivered"
            );
            tokio::time::sleep(EMIT_RETRY_AFTER.min(max_retry_after)).await;
            return (Settled::Requeued, settle.nack(true).await);
        }
    }
    (Settled::Acked(outcome), settle.ack().await)
}
