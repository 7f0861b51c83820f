//! The dead-letter layer: classification, bounded retries and
//! dead-lettering around any handler.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use surety_core::consumer::{Handler, Incoming, Outcome, Response};
use surety_core::metrics::SeenConsumers;
use surety_core::{Classify, DeliveryInfo, Envelope, HandlerError, Publisher};
use tower::{Layer, Service, ServiceExt};

use crate::classify::Classified;
use crate::keys;
use crate::letter::{self, DeadLetter, Event, Status};
use crate::metrics::DlqMetrics;
use crate::policy::{DeadLetterReason, Decision, RetryMode, RetryPolicy};
use crate::sink::{DeadLetterSink, SinkError, StoreSink, TopicSink};
use crate::store::{DlqStore, Transition};
use surety_core::BoxPublisher;

/// Longest error message written into retry headers.
const RETRY_MESSAGE_LEN: usize = 1024;

/// Chooses the topic a delayed retry is published to.
///
/// On RabbitMQ that is the TTL queue of the retry ladder for the delay
/// (`surety_rabbitmq::topology::RetryLadder`), which dead-letters back to
/// the work queue; on Kafka a retry topic the same group consumes. Any
/// `Fn(&Incoming, u32, Duration) -> String` is a route, called with the
/// failed message, the attempt number of the retry and its delay.
///
/// ```
/// use std::time::Duration;
/// use surety_core::consumer::Incoming;
/// use surety_core::{DeliveryInfo, Envelope};
/// use surety_dlq::RetryRoute;
///
/// // Three retry topics per group, by delay.
/// let route = |msg: &Incoming, _attempt: u32, delay: Duration| {
///     let level = match delay.as_secs() { 0..=9 => 1, 10..=59 => 2, _ => 3 };
///     format!("{}.{}.retry.{level}", msg.info.topic, msg.info.group)
/// };
/// let msg = Incoming::new(Envelope::builder("/s", "t").build(), DeliveryInfo::new("kafka", "orders", "billing"));
/// assert_eq!(route.destination(&msg, 2, Duration::from_secs(30)), "orders.billing.retry.2");
/// ```
pub trait RetryRoute: Send + Sync + 'static {
    /// The topic for retry attempt `attempt` of `msg`, due after `delay`.
    fn destination(&self, msg: &Incoming, attempt: u32, delay: Duration) -> String;
}

impl<F> RetryRoute for F
where
    F: Fn(&Incoming, u32, Duration) -> String + Send + Sync + 'static,
{
    fn destination(&self, msg: &Incoming, attempt: u32, delay: Duration) -> String {
        self(msg, attempt, delay)
    }
}

#[derive(Clone)]
struct Config {
    handler: String,
    host: String,
    policy: RetryPolicy,
    retry: Option<(BoxPublisher, Arc<dyn RetryRoute>)>,
    sinks: Vec<Arc<dyn DeadLetterSink>>,
    store: Option<Arc<dyn DlqStore>>,
    park_after_replays: u32,
    redeliver_after: Duration,
    metrics: DlqMetrics,
    /// The sources whose counters exist (see [`DlqMetrics::source`]).
    sources: Arc<Mutex<SeenConsumers>>,
}

impl Config {
    /// Creates the counters of `info`'s source on its first delivery.
    fn source_seen(&self, info: &DeliveryInfo) {
        let first = self
            .sources
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .first_sight(info);
        if first {
            self.metrics.source(info);
        }
    }
}

/// A [`tower::Layer`] that makes a handler's failures safe: every failure is
/// classified, retried only when its class allows and at most as often as
/// the [`RetryPolicy`] says, and finally dead-lettered with its context.
///
/// The wrapped service never fails for a handler error: it returns
/// `Ok(Outcome::Handled)` (or whatever the handler returned),
/// `Ok(Response::outcome(Outcome::RetryScheduled))` after publishing a delayed retry, or
/// `Ok(Response::outcome(Outcome::DeadLettered))` after every sink confirmed the dead letter;
/// the worker acknowledges all three. It fails only when the message must go
/// back to the broker:
///
/// - a delayed retry or a dead-letter write failed: an
///   [`unavailable`](HandlerError::unavailable) error with a `retry_after`
///   of [`redeliver_after`](Self::redeliver_after), so the worker nacks with
///   requeue — whatever the message's delivery count, however long the DLQ
///   is down — and the message comes back later;
/// - no sink is configured: a **permanent** error, so the worker rejects it
///   to the broker's own dead-letter destination.
///
/// The layer owns the attempt bound; the worker's own
/// [`max_deliveries`](surety_core::consumer::Worker::max_deliveries) never
/// comes into play, since the layer answers every handler failure itself.
///
/// The handler is wrapped in [`Classified`] first: undecodable messages are
/// poison before it runs, and its panics are permanent failures.
///
/// ```
/// use surety_core::consumer::{handler_fn, Incoming, Worker};
/// use surety_core::memory::MemoryTransport;
/// use surety_core::{Envelope, Permanent, Publisher, Subscriber};
/// use surety_core::tower::Layer;
/// use surety_dlq::store::{DlqStore, Filter, MemoryDlqStore};
/// use surety_dlq::{DlqLayer, RetryPolicy};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let transport = MemoryTransport::new();
/// let store = MemoryDlqStore::new();
/// let layer = DlqLayer::new("billing")
///     .policy(RetryPolicy::in_place(3))
///     .dead_letter_to(transport.clone(), "orders.dlq")
///     .store(store.clone());
/// let handler = layer.layer(handler_fn(|_msg: Incoming| async move {
///     Err::<(), _>(Permanent::new("unknown customer"))
/// }));
///
/// let deliveries = transport.subscribe("orders", "billing").await?;
/// let dlq = transport.subscribe("orders.dlq", "operators").await?;
/// transport.publish("orders", Envelope::builder("/shop", "order.placed").build()).await?;
/// let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
/// let worker = tokio::spawn(Worker::new(handler).run(deliveries, async { stopped.await.ok(); }));
///
/// while store.count(&Filter::new()).await? == 0 {
///     tokio::task::yield_now().await;
/// }
/// stop.send(()).ok();
/// assert_eq!(worker.await?.acked, 1); // dead-lettered, then acknowledged
/// let letter = &store.all()[0];
/// assert_eq!(letter.error.class, "permanent");
/// assert_eq!(letter.attempts, 1); // permanent: never retried
/// # drop(dlq);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct DlqLayer {
    config: Config,
}

impl fmt::Debug for DlqLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DlqLayer")
            .field("handler", &self.config.handler)
            .field("host", &self.config.host)
            .field("policy", &self.config.policy)
            .field("delayed_retries", &self.config.retry.is_some())
            .field("sinks", &self.config.sinks)
            .field("park_after_replays", &self.config.park_after_replays)
            .finish_non_exhaustive()
    }
}

impl DlqLayer {
    /// A layer for the handler named `handler` (the name goes into dead
    /// letters, fingerprints and dead-letter ids: keep it stable), with the
    /// default [`RetryPolicy`], no sinks yet, and this machine's host name.
    pub fn new(handler: impl Into<String>) -> Self {
        Self {
            config: Config {
                handler: handler.into(),
                host: surety_core::host::host_name(),
                policy: RetryPolicy::default(),
                retry: None,
                sinks: Vec::new(),
                store: None,
                park_after_replays: 3,
                redeliver_after: Duration::from_secs(1),
                metrics: DlqMetrics::default(),
                sources: Arc::default(),
            },
        }
    }

    /// Sets the retry policy.
    pub fn policy(mut self, policy: RetryPolicy) -> Self {
        self.config.policy = policy;
        self
    }

    /// Publishes delayed retries ([`RetryMode::Delayed`]) through
    /// `publisher` to the topic `route` chooses. Without this, delayed
    /// retries wait in place.
    pub fn retry_via(
        mut self,
        publisher: impl Publisher + 'static,
        route: impl RetryRoute,
    ) -> Self {
        self.config.retry = Some((BoxPublisher::borrowed(publisher), Arc::new(route)));
        self
    }

    /// Publishes dead letters to `topic` through `publisher` (a
    /// [`TopicSink`]).
    pub fn dead_letter_to(
        self,
        publisher: impl Publisher + 'static,
        topic: impl Into<String>,
    ) -> Self {
        self.sink(TopicSink::new(publisher, topic))
    }

    /// Puts dead letters into `store` (a [`StoreSink`]), and marks replayed
    /// messages that this handler then handles as resolved there.
    pub fn store(mut self, store: impl DlqStore + 'static) -> Self {
        let store: Arc<dyn DlqStore> = Arc::new(store);
        self.config.store = Some(store.clone());
        self.sink(StoreSink::new(store))
    }

    /// Adds a sink. Every sink must confirm a dead letter before the
    /// original is acknowledged; they are written in the order added.
    pub fn sink(mut self, sink: impl DeadLetterSink) -> Self {
        self.config.sinks.push(Arc::new(sink));
        self
    }

    /// A replayed message that fails again after `n` replays is dead-lettered
    /// as [`Status::Parked`], out of reach of replays by filter (default 3;
    /// 0 never parks).
    pub fn park_after_replays(mut self, n: u32) -> Self {
        self.config.park_after_replays = n;
        self
    }

    /// The host name written into dead letters (default: this machine's).
    pub fn host(mut self, host: impl Into<String>) -> Self {
        self.config.host = host.into();
        self
    }

    /// How long the worker should wait before requeueing a message whose
    /// retry or dead letter could not be written (default 1 s).
    pub fn redeliver_after(mut self, delay: Duration) -> Self {
        self.config.redeliver_after = delay;
        self
    }

    /// Records into `metrics` (see [`DlqMetrics::register`]).
    pub fn metrics(mut self, metrics: DlqMetrics) -> Self {
        self.config.metrics = metrics;
        self
    }
}

impl<S> Layer<S> for DlqLayer {
    type Service = Dlq<S>;

    fn layer(&self, inner: S) -> Self::Service {
        let retry = self.config.retry.as_ref().map(|_| "retry");
        self.config.metrics.sinks(
            retry
                .into_iter()
                .chain(self.config.sinks.iter().map(|s| s.name())),
        );
        Dlq {
            inner: crate::classify::ClassifyLayer.layer(inner),
            config: Arc::new(self.config.clone()),
        }
    }
}

/// The service made by [`DlqLayer`].
#[derive(Clone)]
pub struct Dlq<S> {
    inner: Classified<S>,
    config: Arc<Config>,
}

impl<S> fmt::Debug for Dlq<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dlq")
            .field("handler", &self.config.handler)
            .finish_non_exhaustive()
    }
}

impl<S: Handler> Service<Incoming> for Dlq<S> {
    type Response = Response;
    type Error = HandlerError;
    type Future = BoxFuture<'static, Result<Response, HandlerError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, msg: Incoming) -> Self::Future {
        // Keep the service that was driven to readiness for the first call.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(run(self.config.clone(), inner, msg))
    }
}

async fn run<S: Handler>(
    config: Arc<Config>,
    mut inner: Classified<S>,
    mut msg: Incoming,
) -> Result<Response, HandlerError> {
    // A replay for another consumer group (the core worker already settles
    // these; this covers a layer driven without it).
    if !surety_core::headers::addressed_to(&msg.envelope, &msg.info.group) {
        return Ok(Response::outcome(Outcome::Ignored));
    }
    config.source_seen(&msg.info);
    let mut first_call = true;
    let mut first_failed_at: Option<DateTime<Utc>> = None;
    wait_until_due(&config, &msg.envelope).await;
    loop {
        let result = if std::mem::take(&mut first_call) {
            inner.call(msg.clone()).await
        } else {
            match inner.ready().await {
                Ok(service) => service.call(msg.clone()).await,
                Err(err) => Err(err),
            }
        };
        let err = match result {
            Ok(outcome) => {
                config.resolve_replay(&msg).await;
                return Ok(outcome);
            }
            Err(err) => err,
        };
        let class = err.class();
        let first = *first_failed_at
            .get_or_insert_with(|| letter::first_failed_at(&msg.envelope).unwrap_or_else(Utc::now));
        match config.policy.decide(class, msg.attempt) {
            Decision::DeadLetter(reason) => {
                return config.dead_letter(&msg, &err, reason, first).await;
            }
            Decision::Retry {
                next_attempt,
                delay,
                mode,
            } => {
                if let (RetryMode::Delayed, Some((publisher, route))) = (mode, &config.retry) {
                    let topic = route.destination(&msg, next_attempt, delay);
                    let copy = retry_copy(&msg.envelope, next_attempt, &err, first, delay);
                    return match publisher.publish(&topic, copy).await {
                        Ok(_) => {
                            config
                                .metrics
                                .retry_scheduled(&msg.info, class.as_str(), "delayed");
                            tracing::info!(
                                handler = %config.handler,
                                attempt = msg.attempt,
                                next_attempt,
                                delay = ?delay,
                                retry_topic = %topic,
                                error_class = class.as_str(),
                                "retry scheduled"
                            );
                            Ok(Response::outcome(Outcome::RetryScheduled))
                        }
                        Err(e) => {
                            config.metrics.sink_failed("retry");
                            Err(config.redeliver(SinkError::new(format!("retry topic {topic}"), e)))
                        }
                    };
                }
                config
                    .metrics
                    .retry_scheduled(&msg.info, class.as_str(), "in_place");
                tracing::debug!(
                    handler = %config.handler,
                    attempt = msg.attempt,
                    delay = ?delay,
                    error_class = class.as_str(),
                    "retrying in place"
                );
                tokio::time::sleep(delay).await;
                msg.attempt = next_attempt;
                msg.envelope.headers.set_attempt(next_attempt);
            }
        }
    }
}

/// Waits until a delayed-retry copy is due (`surety-retry-at`), at most
/// the policy's largest delay, so a malformed or far-future header cannot
/// hold a consumer for long.
async fn wait_until_due(config: &Config, env: &Envelope) {
    let Some(due) = env
        .headers
        .get(keys::RETRY_AT)
        .and_then(|v| DateTime::parse_from_rfc3339(v).ok())
    else {
        return;
    };
    let wait = (due.with_timezone(&Utc) - Utc::now())
        .to_std()
        .unwrap_or_default()
        .min(config.policy.max_delay());
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
}

/// The copy of `env` published for a delayed retry due after `delay`.
fn retry_copy(
    env: &Envelope,
    next_attempt: u32,
    err: &HandlerError,
    first: DateTime<Utc>,
    delay: Duration,
) -> Envelope {
    let mut copy = env.clone();
    let due = chrono::Duration::from_std(delay)
        .ok()
        .and_then(|d| Utc::now().checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC);
    copy.headers.insert(keys::RETRY_AT, letter::rfc3339(due));
    copy.headers.set_attempt(next_attempt);
    copy.headers.insert(keys::ERROR_CLASS, err.class().as_str());
    copy.headers
        .insert(keys::ERROR_MESSAGE, err.chain_message(RETRY_MESSAGE_LEN));
    copy.headers
        .insert(keys::FIRST_FAILED_AT, letter::rfc3339(first));
    copy
}

impl Config {
    fn actor(&self) -> String {
        format!("{}@{}", self.handler, self.host)
    }

    /// The pipeline, not the message, failed: the worker requeues the
    /// message whatever its delivery count.
    fn redeliver(&self, err: SinkError) -> HandlerError {
        tracing::error!(handler = %self.handler, error = %err, "cannot park the message; it will be redelivered");
        HandlerError::unavailable(err).retry_after(self.redeliver_after)
    }

    async fn dead_letter(
        &self,
        msg: &Incoming,
        err: &HandlerError,
        reason: DeadLetterReason,
        first_failed_at: DateTime<Utc>,
    ) -> Result<Response, HandlerError> {
        if self.sinks.is_empty() {
            return Err(HandlerError::permanent(format!(
                "no dead-letter sink is configured for `{}`: {}",
                self.handler,
                err.chain_message(RETRY_MESSAGE_LEN)
            )));
        }
        let mut letter = DeadLetter::new(
            &msg.envelope,
            &msg.info,
            err,
            reason,
            msg.attempt,
            &self.handler,
            &self.host,
        );
        // The envelope carries the first failure time only after a delayed
        // retry; in-place retries keep it here.
        letter.first_failed_at = letter.first_failed_at.min(first_failed_at);
        if self.park_after_replays > 0 && letter.replay_count >= self.park_after_replays {
            letter = letter.with_status(Status::Parked);
            self.metrics.replayed("parked");
        }
        for sink in &self.sinks {
            if let Err(e) = sink.write(&letter).await {
                self.metrics.sink_failed(sink.name());
                return Err(self.redeliver(e));
            }
        }
        self.metrics
            .dead_lettered(&msg.info, letter.error.class.as_str());
        tracing::warn!(
            handler = %self.handler,
            dlq_id = %letter.id,
            message_id = %letter.envelope.id,
            error_class = %letter.error.class,
            attempts = letter.attempts,
            reason = reason.as_str(),
            status = letter.status.as_str(),
            "message dead-lettered"
        );
        Ok(Response::outcome(Outcome::DeadLettered))
    }

    /// A replayed copy of a dead letter of this handler was handled: mark
    /// the dead letter resolved. Failing to record that only loses the
    /// bookkeeping, never the message, so errors are logged.
    async fn resolve_replay(&self, msg: &Incoming) {
        let Some(store) = &self.store else { return };
        let Some(dlq_id) = msg.envelope.headers.get(keys::DLQ_ID) else {
            return;
        };
        if dlq_id != DeadLetter::id_for(&self.handler, &msg.envelope) {
            return;
        }
        // `replaying`: the copy was handled before the replay job recorded
        // its publish.
        let transition = Transition::new(
            [Status::Replayed, Status::Replaying],
            Event::new(self.actor(), "resolved", Status::Resolved),
        );
        match store.transition(dlq_id, &transition).await {
            Ok(Some(_)) => self.metrics.replayed("resolved"),
            Ok(None) => {}
            Err(e) => tracing::warn!(dlq_id, error = %e, "could not record a successful replay"),
        }
    }
}
