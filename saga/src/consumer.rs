//! Running an orchestrator in a service: the reply consumer and the timer
//! task, both for the core [`Host`](surety_core::host::Host).
//!
//! - [`reply_handler`] is a core [`Router`] with one route per reply type of
//!   a [`Steps`](crate::steps::Steps) definition. Each reply is applied to the instance named by
//!   its correlation id; a duplicate or late reply is a recorded no-op
//!   (a counted [`NoopRecord`](crate::store::NoopRecord) in the store,
//!   `surety_saga_duplicate_replies_total`, `ignored`/`finished` inputs; settled as
//!   [`Outcome::Duplicate`]). Run it in a
//!   [`Worker`](surety_core::consumer::Worker) on the saga's reply queue:
//!   replies carry the saga id as partition key, so the worker keeps one
//!   input per instance in flight while different instances run in
//!   parallel (`Worker::concurrency`). [`apply_reply`] is the same step for
//!   a hand-written [`Saga`] whose replies you route yourself.
//! - [`timer_task`] fires due timers on an interval, as a
//!   [`Host::task`](surety_core::host::Host::task). Timers are rows in the
//!   store, so they fire after a restart; the write that records a firing
//!   deletes the timer row in the same transaction and fails if another
//!   orchestrator got there first, so with several orchestrators each timer
//!   fires once.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use surety_core::consumer::Worker;
//! use surety_core::host::Host;
//! use surety_core::memory::MemoryTransport;
//! use surety_saga::{checkout, consumer, Orchestrator, store::MemorySagaStore};
//!
//! let saga = checkout::definition(checkout::Deadlines::default());
//! let orchestrator = Arc::new(
//!     Orchestrator::new(saga, MemorySagaStore::new()).reply_to("checkout.replies"),
//! );
//! let transport = MemoryTransport::new();
//! let host = Host::new()
//!     .consume(
//!         transport,
//!         "checkout.replies",
//!         "checkout",
//!         Worker::new(consumer::reply_handler(Arc::clone(&orchestrator))).concurrency(8),
//!     )
//!     .task("checkout-timers", consumer::timer_task(orchestrator, Duration::from_millis(500), 100));
//! # let _ = host;
//! ```

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use surety_core::consumer::{Incoming, Outcome, Response, Router, UnknownType, handler_fn};
use surety_core::host::Shutdown;
use surety_core::{ErrorClass, HandlerError};

use crate::definition::{Input, Saga};
use crate::orchestrator::{Orchestrator, Outcome as SagaOutcome};
use crate::steps::{ReplyTypes, StepReply};
use crate::store::SagaStore;

/// Applies `message`, a reply or event decoded from `incoming`, to the
/// instance its correlation id names, and says how to settle it.
///
/// # Errors
///
/// A message without a correlation id is a permanent error; a store
/// failure is transient (the delivery is retried).
pub async fn apply_reply<S, St>(
    orchestrator: &Orchestrator<S, St>,
    incoming: &Incoming,
    message: S::Message,
) -> Result<Response, HandlerError>
where
    S: Saga,
    St: SagaStore,
{
    let envelope = &incoming.envelope;
    let Some(id) = envelope.correlation_id.as_deref() else {
        return Err(HandlerError::permanent(format!(
            "reply {} ({}) has no correlation id: it cannot name a saga instance",
            envelope.id, envelope.event_type
        )));
    };
    // W3C traceparent: version-traceid-spanid-flags.
    let trace_id = envelope
        .headers
        .traceparent()
        .and_then(|parent| parent.split('-').nth(1));
    let outcome = orchestrator
        .handle_traced(id, Input::Message(message), trace_id)
        .await
        .map_err(HandlerError::new)?;
    Ok(Response::outcome(match outcome {
        SagaOutcome::Applied { .. } => Outcome::Handled,
        SagaOutcome::Unknown => {
            tracing::warn!(
                saga = orchestrator.saga().name(),
                id,
                event_type = %envelope.event_type,
                "a reply for an unknown saga instance; ignored"
            );
            Outcome::Ignored
        }
        // Late, duplicated or for a finished instance: nothing was written.
        _ => Outcome::Duplicate,
    }))
}

/// The reply consumer of a step-list saga ([`Steps`](crate::steps::Steps)
/// or [`Versions`](crate::steps::Versions)): a [`Router`] with a route for
/// each of its [`ReplyTypes`]; other types are rejected (permanent).
/// See the [module docs](self).
pub fn reply_handler<S, St>(orchestrator: Arc<Orchestrator<S, St>>) -> Router
where
    S: Saga<Message = StepReply> + ReplyTypes + 'static,
    St: SagaStore + 'static,
{
    let types = orchestrator.saga().reply_types();
    types.into_iter().fold(
        Router::new().unknown(UnknownType::Reject),
        |router, kind| {
            let orchestrator = Arc::clone(&orchestrator);
            router.route(
                kind,
                handler_fn(move |incoming: Incoming| {
                    let orchestrator = Arc::clone(&orchestrator);
                    async move {
                        let payload = if incoming.envelope.payload.is_empty() {
                            serde_json::Value::Null
                        } else {
                            serde_json::from_slice(&incoming.envelope.payload).map_err(|error| {
                                HandlerError::with_class(ErrorClass::Poison, error)
                            })?
                        };
                        let reply = StepReply::new(incoming.envelope.event_type.clone())
                            .with_payload(payload);
                        apply_reply(&orchestrator, &incoming, reply).await
                    }
                }),
            )
        },
    )
}

/// A background task for [`Host::task`](surety_core::host::Host::task)
/// that fires the saga's due timers every `every`, at most `batch` per
/// store query (a full batch is followed by the next one at once). Store
/// failures are logged and retried on the next tick.
pub fn timer_task<S, St>(
    orchestrator: Arc<Orchestrator<S, St>>,
    every: Duration,
    batch: usize,
) -> impl FnOnce(Shutdown) -> futures::future::BoxFuture<'static, ()> + Send + 'static
where
    S: Saga + 'static,
    St: SagaStore + 'static,
{
    move |shutdown: Shutdown| {
        Box::pin(async move {
            let stop = shutdown.wait();
            tokio::pin!(stop);
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = &mut stop => break,
                    _ = tick.tick() => {}
                }
                loop {
                    match orchestrator.fire_due_timers(Utc::now(), batch).await {
                        // A full batch: more may be due. Every fired timer
                        // is gone from the store (applied, stale or
                        // ignored-and-dropped), so this ends.
                        Ok(fired) if fired.len() >= batch.max(1) => continue,
                        Ok(_) => break,
                        Err(error) => {
                            tracing::warn!(
                                saga = orchestrator.saga().name(),
                                error = %error,
                                "firing due saga timers failed; trying again on the next tick"
                            );
                            break;
                        }
                    }
                }
            }
        })
    }
}

/// A background task for [`Host::task`](surety_core::host::Host::task)
/// that sets the gauges of `metrics` every `every`: unfinished instances of
/// the saga by step, and how many have not moved for `stuck_after`
/// ([`SagaMetrics::observe`](crate::metrics::SagaMetrics::observe)),
/// counted by the store, however many there are.
pub fn gauge_task<S, St>(
    orchestrator: Arc<Orchestrator<S, St>>,
    metrics: crate::metrics::SagaMetrics,
    every: Duration,
    stuck_after: Duration,
) -> impl FnOnce(Shutdown) -> futures::future::BoxFuture<'static, ()> + Send + 'static
where
    S: Saga + 'static,
    St: SagaStore + 'static,
{
    move |shutdown: Shutdown| {
        Box::pin(async move {
            let stop = shutdown.wait();
            tokio::pin!(stop);
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let saga = orchestrator.saga().name().to_owned();
            loop {
                tokio::select! {
                    () = &mut stop => break,
                    _ = tick.tick() => {}
                }
                let idle_since = chrono::Duration::from_std(stuck_after)
                    .ok()
                    .and_then(|d| Utc::now().checked_sub_signed(d))
                    .unwrap_or(chrono::DateTime::<Utc>::MIN_UTC);
                match orchestrator
                    .store()
                    .unfinished_counts(&saga, idle_since)
                    .await
                {
                    Ok(counts) => metrics.observe(&saga, &counts),
                    Err(error) => tracing::warn!(
                        saga,
                        error = %error,
                        "counting saga instances for the gauges failed"
                    ),
                }
            }
        })
    }
}
